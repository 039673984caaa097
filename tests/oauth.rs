//! OAuth towards IMAP for password-only POP3 clients (issue 14), with real parts: a private
//! Dovecot whose `oauth2` passdb checks each token at the introspection endpoint of the test
//! authorization server (tests/common/oauthserver.rs); the user `alice` gets in only with a
//! token. aiopopd enrols her with `--oauth2-authorize` through the real redirect, then serves
//! POP3 sessions whose PASS is the password that unlocks her token store.

mod common;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use common::dovecot::Dovecot;
use common::oauthserver::{browse, http, try_http, OAuthServer, Outage, CLIENT_SECRET};
use common::pop3::{self, expected_retr, replies, Reply};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// The provider offers the device flow: enrolment prints a line about it.
    device: bool,
    /// No --state-dir: the state directory comes from $STATE_DIRECTORY (systemd's).
    state_from_env: bool,
}

impl Setup {
    fn new(mechanism: &str) -> Setup {
        Setup::with(mechanism, |_| {})
    }

    /// Like [`Setup::new`], the `"oauth2"` section changed by `edit` first.
    fn with(mechanism: &str, edit: impl FnOnce(&mut Value)) -> Setup {
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
        edit(&mut provider);
        let device = provider.get("device_authorization_url").is_some();
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
            device,
            state_from_env: false,
        }
    }

    /// Rewrites the `"oauth2"` section of alice's file.
    fn edit_provider(&self, edit: impl FnOnce(&mut Value)) {
        let path = self.users.path().join("alice");
        let mut file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut file["oauth2"]);
        std::fs::write(&path, file.to_string()).unwrap();
    }

    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["--user-dir", self.users.path().to_str().unwrap()]
            .map(String::from)
            .to_vec();
        if !self.state_from_env {
            a.push("--state-dir".into());
            a.push(self.state.path().to_str().unwrap().into());
        }
        a.extend(
            [
                "--allow-plaintext-auth",
                "-l",
                "-d",
                "pop.test",
                "--auth-failure-delay",
                "0",
            ]
            .map(String::from),
        );
        a
    }

    /// aiopopd with these arguments and `extra`, and $STATE_DIRECTORY as the setup wants it.
    fn command(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(pop3::BIN);
        c.args(extra).args(self.args());
        if self.state_from_env {
            // systemd may list several directories; the first is the state directory.
            let dirs = format!("{}:/nonexistent/second", self.state.path().display());
            c.env("STATE_DIRECTORY", dirs);
        } else {
            c.env_remove("STATE_DIRECTORY");
        }
        c
    }

    fn store(&self) -> PathBuf {
        self.state.path().join("oauth2").join("alice")
    }

    /// `aiopopd --oauth2-authorize alice`, the password on stdin; `then` acts on the
    /// printed instructions (opens the URL, pastes, approves a device code). Its output and
    /// status.
    fn enrol(&self, then: impl FnOnce(&str, &mut dyn Write)) -> (bool, String) {
        let mut child = self
            .command(&["--oauth2-authorize", "alice"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{PW}").unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut shown = String::new();
        // Up to the line about the redirect, then the one about the device flow if the
        // provider offers it: reading further would wait for the enrolment's end.
        let mut redirect_line = false;
        loop {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            shown.push_str(&line);
            if redirect_line {
                break;
            }
            redirect_line = line.starts_with("The browser is sent back to");
            if redirect_line && !self.device {
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

    /// Enrols through the browser's redirect to aiopopd's loopback listener; the output.
    fn enrol_by_browser(&self) -> String {
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
        out
    }

    fn session(&self, script: &str) -> (Vec<Reply>, String) {
        self.session_with(&[], script)
    }

    /// A session (as inetd runs it) with more arguments; the replies and the log.
    fn session_with(&self, extra: &[&str], script: &str) -> (Vec<Reply>, String) {
        let mut child = self
            .command(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let script_bytes = script.as_bytes().to_vec();
        // From a thread: replies must not block against the script.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&script_bytes);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        (
            replies(&out.stdout, script),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
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
    check_store(&s);
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

/// The store as written: the KDF (argon2id) with its parameters, a nonce, sealed bytes;
/// nothing else. None of the tokens the server ever issued, nor the password, shows in it:
/// not in clear, not base64 (either alphabet, padded or not) in the text, and not inside any
/// of its base64 fields decoded (which catches an encoding at any alignment).
fn check_store(s: &Setup) {
    use std::os::unix::fs::PermissionsExt;
    let path = s.store();
    let meta = std::fs::metadata(&path).expect("the token store");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read(&path).unwrap();
    let v: Value = serde_json::from_slice(&text).unwrap();
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort_unstable();
        k
    };
    assert_eq!(keys(&v), ["cipher", "kdf", "nonce", "sealed", "version"]);
    let kdf = &v["kdf"];
    assert_eq!(
        keys(kdf),
        [
            "algorithm",
            "iterations",
            "memory_kib",
            "parallelism",
            "salt"
        ]
    );
    assert_eq!(kdf["algorithm"], "argon2id");
    let param = |k: &str| {
        kdf[k]
            .as_u64()
            .filter(|&n| n >= 1)
            .unwrap_or_else(|| panic!("kdf {k}: {kdf}"))
    };
    // Argon2 needs 8 KiB per lane at least; a store asking less would not open.
    assert!(param("memory_kib") >= 8 * param("parallelism"), "{kdf}");
    param("iterations");
    let mut secrets = s.server.issued_access_tokens();
    let refresh = s.server.issued_refresh_tokens();
    assert!(!secrets.is_empty() && !refresh.is_empty());
    secrets.extend(refresh);
    secrets.push(PW.to_string());
    let mut decoded = Vec::new();
    for field in [&kdf["salt"], &v["nonce"], &v["sealed"]] {
        let field = field.as_str().unwrap();
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            decoded.extend(engine.decode(field).ok());
        }
    }
    assert!(!decoded.is_empty());
    for secret in &secrets {
        let b = secret.as_bytes();
        for shown in [
            b.to_vec(),
            STANDARD.encode(b).into_bytes(),
            STANDARD_NO_PAD.encode(b).into_bytes(),
            URL_SAFE.encode(b).into_bytes(),
            URL_SAFE_NO_PAD.encode(b).into_bytes(),
        ] {
            assert!(
                !contains(&text, &shown),
                "{} holds {:?}",
                path.display(),
                String::from_utf8_lossy(&shown)
            );
        }
        for d in &decoded {
            assert!(
                !contains(d, b),
                "a base64 field of the store decodes to a token"
            );
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
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
#[test]
fn a_refused_token_is_refreshed_once() {
    let s = Setup::new("XOAUTH2");
    deliver(&s, 1);
    s.enrol_by_browser();
    s.server.expire_all();
    let (r, log) = s.session(&format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert!(log.contains("refreshing it"), "{log}");
    assert_eq!(s.server.counters().token_refresh_token, 1);
    // Written back by the session: still none of the (old or rotated) tokens in clear.
    check_store(&s);
}

/// A token about to expire (30 s left, less than the minute a session wants) is refreshed
/// before use: IMAP never sees a stale one. A test of its own: after the refused token above,
/// Dovecot's auth penalty would delay every later login from 127.0.0.1 by 4 s.
#[test]
fn an_expiring_token_is_refreshed_before_use() {
    let s = Setup::new("XOAUTH2");
    deliver(&s, 1);
    s.server.set_access_lifetime(Duration::from_secs(30));
    s.enrol_by_browser();
    for n in 1..=2 {
        let (r, log) = s.session(&format!("{LOGIN}STAT\r\nQUIT\r\n"));
        assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
        assert!(!log.contains("refreshing it"), "{log}");
        let c = s.server.counters();
        assert_eq!((c.token_refresh_token, c.refresh_reuse), (n, 0), "{c:?}");
        assert_eq!(c.introspect, c.introspect_active, "{c:?}");
    }
    check_store(&s);
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

const SYS_TEMP: &str = "-ERR [SYS/TEMP] Account is temporarily unavailable; try again later.";

/// A token endpoint slower than --imap-timeout when the session must refresh: `[SYS/TEMP]`
/// once the timeout has passed (not when the provider finally answers), and no `login
/// failed:` line.
#[test]
fn a_slow_token_endpoint_is_temporary_within_the_timeout() {
    let s = Setup::new("XOAUTH2");
    // Tokens that live 30 s: the session refreshes before it goes to IMAP.
    s.server.set_access_lifetime(Duration::from_secs(30));
    s.enrol_by_browser();
    s.server.set_delay(Duration::from_secs(10));
    let started = Instant::now();
    let (r, log) = s.session_with(&["--imap-timeout", "2"], &format!("{LOGIN}QUIT\r\n"));
    let took = started.elapsed();
    assert_eq!(r[2].status, SYS_TEMP, "{r:?}\n{log}");
    assert!(!log.contains("login failed"), "{log}");
    // It waited for the timeout, and not for the 10 s answer.
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(7),
        "{took:?}\n{log}"
    );
}

/// A token endpoint that says "later" with a status and a JSON error (`503` or `429`,
/// `{"error":"temporarily_unavailable"}`) when the token has expired: `[SYS/TEMP]`, not
/// `[SYS/PERM]`; the grant is intact once the provider is back.
#[test]
fn a_503_or_429_with_a_json_error_is_temporary() {
    let s = Setup::new("XOAUTH2");
    deliver(&s, 1);
    s.server.set_access_lifetime(Duration::from_secs(30));
    s.enrol_by_browser();
    let script = format!("{LOGIN}STAT\r\nQUIT\r\n");
    for (outage, status) in [(Outage::Unavailable, 503), (Outage::RateLimited, 429)] {
        s.server.set_down(outage);
        let (r, log) = s.session(&script);
        assert_eq!(r[2].status, SYS_TEMP, "HTTP {status}: {r:?}\n{log}");
        assert!(log.contains("temporarily_unavailable"), "{log}");
        assert!(!log.contains("login failed"), "{log}");
    }
    s.server.set_down(Outage::Up);
    let (r, log) = s.session(&script);
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    let c = s.server.counters();
    assert_eq!((c.token_refresh_token, c.refresh_reuse), (1, 0), "{c:?}");
}

/// A provider without a device endpoint (Gmail's case): the enrolment through the real
/// redirect works, and neither offers nor mentions a device code.
#[test]
fn enrolment_without_a_device_endpoint_offers_no_device_code() {
    let s = Setup::with("XOAUTH2", |p| {
        p.as_object_mut()
            .unwrap()
            .remove("device_authorization_url");
    });
    deliver(&s, 1);
    let out = s.enrol_by_browser();
    assert!(!out.contains("on any device"), "{out}");
    assert!(!out.to_lowercase().contains("device"), "{out}");
    let c = s.server.counters();
    assert_eq!((c.device, c.token_device_code), (0, 0), "{c:?}");
    assert_eq!(c.token_authorization_code, 1, "{c:?}");
    let (r, log) = s.session(&format!("{LOGIN}RETR 1\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(r[3].body.as_deref(), Some(&expected_retr(&msg(1))[..]));
}

/// A redirect to the loopback listener whose `state` isn't this enrolment's, carrying a code
/// the server really issued for aiopopd's redirect URI and PKCE challenge: aiopopd exchanges
/// nothing and ends the enrolment saying why (so the genuine redirect then finds nobody);
/// enrolling again works.
#[test]
fn a_redirect_with_a_forged_state_exchanges_nothing() {
    let s = Setup::new("XOAUTH2");
    let mut genuine = String::new();
    let (ok, out) = s.enrol(|shown, _| {
        genuine = authorize_line(shown);
        let forged: Vec<String> = genuine
            .split('&')
            .map(|p| match p.strip_prefix("state=") {
                Some(_) => "state=forged".to_string(),
                None => p.to_string(),
            })
            .collect();
        let (location, answer) = browse(&forged.join("&"));
        assert!(location.contains("code=") && location.contains("state=forged"));
        let answer = answer.expect("the forged redirect reaches aiopopd's listener");
        assert!(
            String::from_utf8_lossy(&answer.body).contains("authorization failed"),
            "{answer:?}"
        );
    });
    assert!(!ok, "{out}");
    assert!(out.contains("state doesn't match"), "{out}");
    let c = s.server.counters();
    assert_eq!(
        (c.token_authorization_code, c.token_errors),
        (0, 0),
        "{c:?}"
    );
    assert!(!s.store().exists());
    let r = http("GET", &genuine, None);
    let location = r.header("location").expect("a redirect").to_string();
    assert!(try_http("GET", &location, None).is_err(), "still listening");
    s.enrol_by_browser();
    assert_eq!(s.server.counters().token_authorization_code, 1);
    assert!(s.store().exists());
}

/// A confidential client (Google's "desktop app" has a secret): with `client_secret` in the
/// section the server that requires it enrols and refreshes; without it, its refusal
/// (`invalid_client`) is in the session's log (`[SYS/PERM]`) and the enrolment's error.
#[test]
fn a_client_secret_is_sent_and_its_absence_reported() {
    let s = Setup::with("XOAUTH2", |p| {
        p.as_object_mut()
            .unwrap()
            .remove("device_authorization_url");
        p["client_secret"] = CLIENT_SECRET.into();
    });
    deliver(&s, 1);
    s.server.set_require_client_secret(true);
    s.server.set_access_lifetime(Duration::from_secs(30));
    s.enrol_by_browser();
    let script = format!("{LOGIN}STAT\r\nQUIT\r\n");
    let (r, log) = s.session(&script);
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    let c = s.server.counters();
    assert_eq!(
        (
            c.token_authorization_code,
            c.token_refresh_token,
            c.token_errors
        ),
        (1, 1, 0),
        "{c:?}"
    );
    s.edit_provider(|p| {
        p.as_object_mut().unwrap().remove("client_secret");
    });
    let (r, log) = s.session(&script);
    assert!(r[2].status.starts_with("-ERR [SYS/PERM]"), "{r:?}\n{log}");
    assert!(log.contains("invalid_client"), "{log}");
    assert!(!log.contains("login failed"), "{log}");
    let (ok, out) = s.enrol(|shown, _| {
        browse(&authorize_line(shown));
    });
    assert!(!ok, "{out}");
    assert!(
        out.contains("exchanging the code") && out.contains("invalid_client"),
        "{out}"
    );
    assert_eq!(s.server.counters().token_errors, 2);
}

/// AUTH PLAIN and AUTH LOGIN (RFC 5034) with the same password open the store as PASS does:
/// every reply after the login is the same, byte for byte.
#[test]
fn auth_plain_and_auth_login_give_the_same_session() {
    let s = Setup::new("XOAUTH2");
    deliver(&s, 2);
    s.enrol_by_browser();
    let rest = "STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 2 0\r\nQUIT\r\n";
    let (by_pass, log) = s.session(&format!("{LOGIN}{rest}"));
    assert!(by_pass.iter().all(Reply::ok), "{by_pass:?}\n{log}");
    let plain = STANDARD.encode(format!("\0alice\0{PW}"));
    let (by_plain, log) = s.session(&format!("AUTH PLAIN {plain}\r\n{rest}"));
    assert!(by_plain.iter().all(Reply::ok), "{by_plain:?}\n{log}");
    let (user, pw) = (STANDARD.encode("alice"), STANDARD.encode(PW));
    let (by_login, log) = s.session(&format!("AUTH LOGIN\r\n{user}\r\n{pw}\r\n{rest}"));
    assert!(
        by_login[1].status.starts_with("+ ") && by_login[2].status.starts_with("+ "),
        "{by_login:?}\n{log}"
    );
    assert!(by_login[3..].iter().all(Reply::ok), "{by_login:?}\n{log}");
    assert_eq!(
        by_pass[6].body.as_deref(),
        Some(&expected_retr(&msg(1))[..])
    );
    assert_eq!(by_pass[3..], by_plain[2..]);
    assert_eq!(by_pass[3..], by_login[4..]);
    assert_eq!(s.server.counters().token_refresh_token, 0);
}

/// No --state-dir: the enrolment writes the store under $STATE_DIRECTORY (its first path,
/// as systemd's StateDirectory= sets it), and sessions read it from there.
#[test]
fn the_state_directory_defaults_to_state_directory_env() {
    let mut s = Setup::new("XOAUTH2");
    s.state_from_env = true;
    deliver(&s, 1);
    let out = s.enrol_by_browser();
    assert!(
        out.contains(&s.store().display().to_string()),
        "the store's path: {out}"
    );
    check_store(&s);
    let (r, log) = s.session(&format!("{LOGIN}RETR 1\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(r[3].body.as_deref(), Some(&expected_retr(&msg(1))[..]));
    assert_eq!(s.server.counters().token_refresh_token, 0);
}
