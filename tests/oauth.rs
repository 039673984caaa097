//! OAuth towards IMAP for password-only POP3 clients (issue 14), with real parts: a private
//! Dovecot whose `oauth2` passdb checks each token at the introspection endpoint of the test
//! authorization server (tests/common/oauthserver.rs); the user `alice` gets in only with a
//! token. aiopopd enrols her with `--oauth2-authorize` through the real redirect, then serves
//! POP3 sessions whose PASS is the password that unlocks her token store.

mod common;

use common::dovecot::Dovecot;
use common::oauthserver::{browse, http, OAuthServer};
use common::pop3::{self, expected_retr, replies, Reply};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PW: &str = "pop3-only-pw";
const LOGIN: &str = "USER alice\r\nPASS pop3-only-pw\r\n";

fn msg(i: usize) -> Vec<u8> {
    format!("Subject: oauth {i}\r\n\r\n.dot line\r\nbody {i}\r\n").into_bytes()
}

/// A relay in front of the authorization server's token endpoint, which the test can cut:
/// the provider unreachable for aiopopd while Dovecot still checks tokens.
struct Relay {
    port: u16,
    down: Arc<AtomicBool>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let d = down.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                if d.load(Ordering::SeqCst) {
                    continue; // Dropped: closed without an answer.
                }
                let Ok(s) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let (mut a, mut b) = (c.try_clone().unwrap(), s.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
                let (mut a, mut b) = (s, c);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Relay { port, down }
    }
}

/// One user, `alice`, with an `"oauth2"` section naming the test server (its token endpoint
/// through the relay), and the aiopopd arguments that serve her.
struct Setup {
    server: OAuthServer,
    dovecot: Dovecot,
    relay: Relay,
    users: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Setup {
    fn new(mechanism: &str) -> Setup {
        let server = OAuthServer::start();
        // Sessions at once for one user from one address: above Dovecot's default of 10.
        let dovecot =
            server.start_dovecot_with("protocol imap {\n  mail_max_userip_connections = 50\n}\n");
        let relay = Relay::start(server.port());
        let users = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let redirect = TcpListener::bind("127.0.0.1:0").unwrap();
        let redirect_port = redirect.local_addr().unwrap().port();
        drop(redirect);
        let mut provider = server.provider_json("mail", redirect_port);
        provider["token_url"] = format!("http://127.0.0.1:{}/token", relay.port).into();
        provider["mechanism"] = mechanism.into();
        let file = serde_json::json!({
            "hostname": "127.0.0.1", "port": dovecot.imap_port, "ssl": false,
            "oauth2": provider,
        });
        std::fs::write(users.path().join("alice"), file.to_string()).unwrap();
        Setup {
            server,
            dovecot,
            relay,
            users,
            state,
        }
    }

    fn args(&self) -> Vec<String> {
        [
            "--user-dir",
            self.users.path().to_str().unwrap(),
            "--state-dir",
            self.state.path().to_str().unwrap(),
            "--allow-plaintext-auth",
            "-l",
            "-d",
            "pop.test",
            "--auth-failure-delay",
            "0",
        ]
        .map(String::from)
        .to_vec()
    }

    fn store(&self) -> PathBuf {
        self.state.path().join("oauth2").join("alice")
    }

    /// `aiopopd --oauth2-authorize alice`, the password on stdin; `then` acts on the
    /// printed instructions (opens the URL, pastes, approves a device code). Its output and
    /// status.
    fn enrol(&self, then: impl FnOnce(&str, &mut dyn Write)) -> (bool, String) {
        let mut child = Command::new(pop3::BIN)
            .args(["--oauth2-authorize", "alice"])
            .args(self.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{PW}").unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut shown = String::new();
        // Up to the device-flow line if there is one, else the redirect line.
        loop {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            shown.push_str(&line);
            if line.starts_with("Or, on any device") {
                break;
            }
        }
        then(&shown, &mut stdin);
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        shown.push_str(&rest);
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let ok = child.wait().unwrap().success();
        (ok, format!("{shown}{err}"))
    }

    /// Enrols through the browser's redirect to aiopopd's loopback listener.
    fn enrol_by_browser(&self) {
        let (ok, out) = self.enrol(|shown, _| {
            let url = authorize_line(shown);
            let (_, answer) = browse(&url);
            let answer = answer.expect("the redirect reaches aiopopd's listener");
            assert!(
                String::from_utf8_lossy(&answer.body).contains("you can close this window"),
                "{answer:?}"
            );
        });
        assert!(ok, "{out}");
    }

    fn session(&self, script: &str) -> (Vec<Reply>, String) {
        let r = pop3::run(&self.args(), script.as_bytes());
        (replies(&r.stdout, script), r.stderr)
    }
}

/// The authorize URL: the line of its own that starts with the server's address.
fn authorize_line(shown: &str) -> String {
    shown
        .lines()
        .find(|l| l.starts_with("http://") && l.contains("/authorize?"))
        .unwrap_or_else(|| panic!("no authorize URL in:\n{shown}"))
        .to_string()
}

fn deliver(s: &Setup, n: usize) {
    for i in 1..=n {
        s.dovecot.deliver("alice", "INBOX", &msg(i));
    }
}

/// Enrolment through the real redirect, then sessions byte-exact over XOAUTH2 with the cached
/// access token (no request to the provider); the store holds no token in clear, mode 0600.
#[test]
fn enrolment_then_sessions_byte_exact_over_xoauth2() {
    let s = Setup::new("XOAUTH2");
    deliver(&s, 2);
    // Run as root (CI), the enrolment hands the store to the owner of --state-dir (the
    // service's user under systemd's StateDirectory=).
    let root = nix_uid(Path::new("/proc/self/status")) == Some(0);
    if root {
        std::os::unix::fs::chown(s.state.path(), Some(65534), Some(65534)).unwrap();
    }
    s.enrol_by_browser();
    if root {
        use std::os::unix::fs::MetadataExt;
        for p in [s.store(), s.store().parent().unwrap().to_path_buf()] {
            assert_eq!(
                std::fs::metadata(&p).unwrap().uid(),
                65534,
                "{}",
                p.display()
            );
        }
    }
    let c = s.server.counters();
    assert_eq!((c.authorize, c.token_authorization_code), (1, 1), "{c:?}");
    check_store(&s.store());
    let (r, log) = s.session(&format!("{LOGIN}STAT\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(r[4].body.as_deref(), Some(&expected_retr(&msg(1))[..]));
    assert_eq!(r[5].body.as_deref(), Some(&expected_retr(&msg(2))[..]));
    let after = s.server.counters();
    assert_eq!(after.token_refresh_token, 0, "{after:?}");
    assert!(!log.contains(PW), "{log}");
}

/// The effective uid, from /proc/self/status (`Uid: real effective ...`).
fn nix_uid(status: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(status).ok()?;
    let line = text.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The store as written: the KDF's parameters, a nonce, sealed bytes; nothing else.
fn check_store(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).expect("the token store");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["cipher", "kdf", "nonce", "sealed", "version"]);
    assert_eq!(v["kdf"]["algorithm"], "argon2id");
}

/// A wrong password opens nothing and asks the provider nothing: `[AUTH]` and a `login
/// failed:` line, as for any wrong password.
#[test]
fn a_wrong_password_asks_the_provider_nothing() {
    let s = Setup::new("XOAUTH2");
    s.enrol_by_browser();
    let before = s.server.counters();
    let (r, log) = s.session("USER alice\r\nPASS not-it\r\nQUIT\r\n");
    assert_eq!(r[2].status, "-ERR [AUTH] Authentication failed.", "{log}");
    assert!(log.contains("login failed: user=alice"), "{log}");
    assert_eq!(s.server.counters(), before);
}

/// A token the provider has ended early (IMAP refuses it): refreshed once, the session goes on.
/// And one about to expire is refreshed before use.
#[test]
fn a_refused_or_expiring_token_is_refreshed_once() {
    let s = Setup::new("XOAUTH2");
    deliver(&s, 1);
    s.enrol_by_browser();
    s.server.expire_all();
    let (r, log) = s.session(&format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert!(log.contains("refreshing it"), "{log}");
    assert_eq!(s.server.counters().token_refresh_token, 1);
    // Tokens that live 30 s: less than the minute a session wants left, so refreshed first.
    s.server.set_access_lifetime(Duration::from_secs(30));
    s.server.expire_all();
    let (r, log) = s.session(&format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(s.server.counters().token_refresh_token, 2);
    let (r, log) = s.session(&format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(s.server.counters().token_refresh_token, 3);
    assert_eq!(s.server.counters().refresh_reuse, 0);
}

/// Sixteen sessions started together after the token expired: one refresh (at most two),
/// never a rotated refresh token sent twice (which would revoke the grant), all served.
#[test]
fn sixteen_sessions_after_expiry_refresh_once() {
    let s = Setup::new("XOAUTH2");
    deliver(&s, 1);
    s.server.set_access_lifetime(Duration::from_secs(30));
    s.enrol_by_browser();
    s.server.set_access_lifetime(Duration::from_secs(3600));
    let script = format!("{LOGIN}STAT\r\nRETR 1\r\nQUIT\r\n");
    std::thread::scope(|sc| {
        let all: Vec<_> = (0..16).map(|_| sc.spawn(|| s.session(&script))).collect();
        for t in all {
            let (r, log) = t.join().unwrap();
            assert!(r.len() == 6 && r.iter().all(Reply::ok), "{r:?}\n{log}");
        }
    });
    let c = s.server.counters();
    assert!(
        (1..=2).contains(&c.token_refresh_token),
        "{} refreshes: {c:?}",
        c.token_refresh_token
    );
    assert_eq!(c.refresh_reuse, 0, "{c:?}");
}

/// The provider unreachable: a cached token still serves; an expired one can't be refreshed:
/// `[SYS/TEMP]`, not a login failure.
#[test]
fn the_provider_down_serves_from_cache_and_is_temporary_otherwise() {
    let s = Setup::new("XOAUTH2");
    deliver(&s, 1);
    s.enrol_by_browser();
    s.relay.down.store(true, Ordering::SeqCst);
    let (r, log) = s.session(&format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    // Expiring tokens from now on: the next session must refresh, and can't.
    s.relay.down.store(false, Ordering::SeqCst);
    s.server.set_access_lifetime(Duration::from_secs(30));
    s.server.expire_all();
    let (r, _) = s.session(&format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}");
    s.relay.down.store(true, Ordering::SeqCst);
    let (r, log) = s.session(&format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert_eq!(
        r[2].status, "-ERR [SYS/TEMP] Account is temporarily unavailable; try again later.",
        "{log}"
    );
    assert!(!log.contains("login failed"), "{log}");
}

/// A revoked grant (`invalid_grant`): `[SYS/PERM]`, and a log line telling the administrator to
/// enrol again; never a `login failed:` line (fail2ban must not ban the user for it).
#[test]
fn a_revoked_grant_is_sys_perm_with_the_fix() {
    let s = Setup::new("XOAUTH2");
    s.server.set_access_lifetime(Duration::from_secs(30));
    s.enrol_by_browser();
    s.server.revoke_all();
    let (r, log) = s.session(&format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r[2].status.starts_with("-ERR [SYS/PERM]"), "{r:?}\n{log}");
    assert!(log.contains("--oauth2-authorize"), "{log}");
    assert!(!log.contains("login failed"), "{log}");
}

/// OAUTHBEARER (RFC 7628) instead of XOAUTH2, and the redirected URL pasted on stdin (a
/// browser on another machine) instead of reaching the listener.
#[test]
fn oauthbearer_and_a_pasted_redirect() {
    let s = Setup::new("OAUTHBEARER");
    deliver(&s, 1);
    let (ok, out) = s.enrol(|shown, stdin| {
        let url = authorize_line(shown);
        let r = http("GET", &url, None);
        assert_eq!(r.status, 302, "{r:?}");
        let location = r.header("location").unwrap().to_string();
        writeln!(stdin, "{location}").unwrap();
    });
    assert!(ok, "{out}");
    let (r, log) = s.session(&format!("{LOGIN}RETR 1\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(r[3].body.as_deref(), Some(&expected_retr(&msg(1))[..]));
}

/// The device flow (RFC 8628), offered because the provider has a device endpoint: approved
/// on "another device", the enrolment completes without any redirect.
#[test]
fn the_device_flow_enrols_too() {
    let s = Setup::new("XOAUTH2");
    deliver(&s, 1);
    s.server.set_device_interval(1);
    let (ok, out) = s.enrol(|shown, _| {
        let line = shown
            .lines()
            .find(|l| l.starts_with("Or, on any device"))
            .unwrap_or_else(|| panic!("no device code in:\n{shown}"));
        let code = line.rsplit(' ').next().unwrap();
        assert!(s.server.approve_device(code), "{line}");
    });
    assert!(ok, "{out}");
    assert!(s.server.counters().token_device_code >= 1);
    let (r, log) = s.session(&format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
}

/// Not enrolled: `[SYS/PERM]` with the command to run, no `login failed:` line.
#[test]
fn not_enrolled_is_sys_perm() {
    let s = Setup::new("XOAUTH2");
    let (r, log) = s.session(&format!("{LOGIN}QUIT\r\n"));
    assert!(r[2].status.starts_with("-ERR [SYS/PERM]"), "{r:?}\n{log}");
    assert!(log.contains("--oauth2-authorize"), "{log}");
    assert!(!log.contains("login failed"), "{log}");
}
