//! SASL through aiopopd against a private Dovecot: PLAIN and LOGIN decoded by aiopopd, and
//! CRAM-MD5 and SCRAM (offered when `--sasl` names them) relayed step by step, with the
//! client's answers computed here (Python's hmac/hashlib), never by aiopopd, which never sees
//! the password.

mod common;

use common::activate::Activator;
use common::dovecot::Dovecot;
use common::pop3::{args, replies, session};
use std::process::Command;

/// A SASL client in Python: `mech password` on the command line, prints each server line.
const CLIENT: &str = r#"
import base64, hashlib, hmac, os, socket, sys
port, mech, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = socket.create_connection(("127.0.0.1", port), timeout=30)
f = s.makefile("rb")
def line():
    l = f.readline().decode("latin-1").rstrip("\r\n")
    print("S:", l)
    return l
def send(x):
    print("C:", x)
    s.sendall(x.encode() + b"\r\n")
b64 = lambda b: base64.b64encode(b).decode()
unb64 = lambda t: base64.b64decode(t)
line()
send("AUTH " + mech)
if mech == "CRAM-MD5":
    chal = unb64(line()[2:])
    send(b64((user + " " + hmac.new(password.encode(), chal, hashlib.md5).hexdigest()).encode()))
elif mech.startswith("SCRAM-"):
    h = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}[mech]
    line()  # the empty challenge: client first
    nonce = b64(os.urandom(18))
    bare = "n=" + user + ",r=" + nonce
    send(b64(("n,," + bare).encode()))
    first = unb64(line()[2:]).decode()
    attrs = dict(a.split("=", 1) for a in first.split(","))
    salted = hashlib.pbkdf2_hmac(h, password.encode(), unb64(attrs["s"]), int(attrs["i"]))
    ckey = hmac.new(salted, b"Client Key", h).digest()
    skey = hashlib.new(h, ckey).digest()
    final_bare = "c=biws,r=" + attrs["r"]
    auth_msg = (bare + "," + first + "," + final_bare).encode()
    sig = hmac.new(skey, auth_msg, h).digest()
    proof = bytes(a ^ b for a, b in zip(ckey, sig))
    send(b64((final_bare + ",p=" + b64(proof)).encode()))
    l = line()
    if l.startswith("+ "):
        server_final = unb64(l[2:]).decode()
        skey2 = hmac.new(salted, b"Server Key", h).digest()
        expect = b64(hmac.new(skey2, auth_msg, h).digest())
        print("server signature ok:", server_final == "v=" + expect)
        send("")
    else:
        print("S-early:", l)
        sys.exit(0)
l = line()
if l.startswith("+OK"):
    send("STAT"); line()
send("QUIT"); line()
"#;

fn python_auth(port: u16, mech: &str, password: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", CLIENT, &port.to_string(), mech, "alice", password])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dovecot() -> Dovecot {
    let d = Dovecot::start();
    d.deliver("alice", "INBOX", b"Subject: one\r\n\r\nbody\r\n");
    d
}

/// What an administrator whose IMAP server completes the challenge-response mechanisms names.
const RELAYED: &str = "PLAIN,LOGIN,CRAM-MD5,SCRAM-SHA-1,SCRAM-SHA-256";

fn relay_args(d: &Dovecot) -> Vec<String> {
    let mut a = args(d);
    a.extend(["--sasl".to_string(), RELAYED.to_string()]);
    a
}

/// CAPA and AUTH list PLAIN and LOGIN, or what --sasl names, and never ask the IMAP server:
/// a server may advertise mechanisms it can't complete (GNU Mailutils imap4d: CRAM-MD5 and
/// SCRAM with no stored secrets), and every anonymous CAPA would hold an IMAP connection.
#[test]
fn capa_and_auth_offer_plain_and_login_or_what_sasl_names_without_asking_imap() {
    let fake = common::fakeimap::FakeImap::builder()
        .capability("AUTH=CRAM-MD5")
        .capability("AUTH=SCRAM-SHA-256")
        .start();
    let script = "CAPA\r\nAUTH\r\nQUIT\r\n";
    let mut a = fake.args();
    let r = replies(&common::pop3::run(&a, script.as_bytes()).stdout, script);
    assert!(
        r[1].body_str().contains("SASL PLAIN LOGIN\r\n"),
        "{}",
        r[1].body_str()
    );
    assert_eq!(r[2].body_str(), "PLAIN\r\nLOGIN\r\n");
    assert_eq!(
        fake.connections(),
        0,
        "CAPA and AUTH never contact the IMAP server"
    );
    a.extend(["--sasl".into(), RELAYED.into()]);
    let r = replies(&common::pop3::run(&a, script.as_bytes()).stdout, script);
    assert!(
        r[1].body_str()
            .contains("SASL PLAIN LOGIN CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-256\r\n"),
        "{}",
        r[1].body_str()
    );
    assert_eq!(
        r[2].body_str(),
        "PLAIN\r\nLOGIN\r\nCRAM-MD5\r\nSCRAM-SHA-1\r\nSCRAM-SHA-256\r\n"
    );
    assert_eq!(fake.connections(), 0);
    let d = dovecot();
    let r = replies(&session(&d, &["--sasl", "cram-md5"], script).stdout, script);
    assert!(r[1].body_str().contains("SASL CRAM-MD5\r\n"));
}

/// A mechanism --sasl names but the server doesn't advertise: `-ERR`, no AUTHENTICATE sent, and
/// a warning for the administrator rather than a `login failed:` line that fail2ban counts.
#[test]
fn a_mechanism_the_server_does_not_offer_is_unsupported_not_a_failed_login() {
    let fake = common::fakeimap::FakeImap::builder()
        .capability("AUTH=CRAM-MD5")
        .start();
    let mut a = fake.args();
    a.extend(["--sasl", RELAYED].map(String::from));
    let script = "AUTH SCRAM-SHA-1\r\nQUIT\r\n";
    let out = common::pop3::run(&a, script.as_bytes());
    let r = replies(&out.stdout, script);
    assert_eq!(r[1].status, "-ERR Unsupported authentication mechanism.");
    assert!(!out.stderr.contains("login failed"), "{}", out.stderr);
    assert!(out.stderr.contains("AUTH=SCRAM-SHA-1"), "{}", out.stderr);
    assert_eq!(fake.logins(), 0, "{:?}", fake.commands());
}

#[test]
fn plain_and_login_work_with_dovecot_and_with_user_dir() {
    let d = dovecot();
    // AGFsaWNlAGFsaWNlLXB3 = "\0alice\0alice-pw"; YWxpY2U= "alice"; YWxpY2UtcHc= "alice-pw"
    let script = "AUTH PLAIN AGFsaWNlAGFsaWNlLXB3\r\nSTAT\r\nQUIT\r\n";
    let r = replies(&session(&d, &[], script).stdout, script);
    assert_eq!(r[1].status, "+OK Logged in, 1 messages.");
    let out = session(
        &d,
        &[],
        "AUTH LOGIN\r\nYWxpY2U=\r\nYWxpY2UtcHc=\r\nQUIT\r\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n+OK Logged in, 1 messages.\r\n"),
        "{text}"
    );

    let (_dir, a) = common::pop3::user_dir(&d, "alice", None);
    let script = "CAPA\r\nAUTH PLAIN AGFsaWNlAGFsaWNlLXB3\r\nQUIT\r\n";
    let r = replies(&common::pop3::run(&a, script.as_bytes()).stdout, script);
    assert!(
        r[1].body_str().contains("SASL PLAIN LOGIN\r\n"),
        "no relay with --user-dir"
    );
    assert_eq!(r[2].status, "+OK Logged in, 1 messages.");
}

#[test]
fn challenge_response_mechanisms_are_relayed_and_the_password_never_passes() {
    let d = dovecot();
    let mut a = relay_args(&d);
    a.push("-v".into());
    let act = Activator::start(true, &a);
    for mech in ["CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"] {
        let out = python_auth(act.port, mech, "alice-pw");
        // Everything aiopopd received is in the C: lines; the password is in none of them.
        for sent in out.lines().filter(|l| l.starts_with("C:")) {
            assert!(
                !sent.contains("alice-pw") && !sent.contains("YWxpY2UtcHc"),
                "{sent}"
            );
        }
        assert!(
            out.contains("S: +OK Logged in, 1 messages."),
            "{mech}: {out}"
        );
        assert!(out.contains("S: +OK 1 "), "{mech}: {out}");
        if mech.starts_with("SCRAM") {
            assert!(
                out.contains("server signature ok: True"),
                "{mech}: the server's proof passes through: {out}"
            );
        }
        let out = python_auth(act.port, mech, "wrong-password");
        assert!(
            out.contains("-ERR [AUTH] Authentication failed."),
            "{mech}: {out}"
        );
    }
    let log = act.log();
    assert!(log.contains("user=alice logged in"), "{log}");
    assert!(log.contains("login failed: user=alice "), "{log}");
    for secret in ["alice-pw", "YWxpY2UtcHc", "wrong-password"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
}

#[test]
fn sasl_responses_may_be_long_but_are_bounded() {
    let d = dovecot();
    // A 10 KB answer is read (and is no valid PLAIN); a 20 KB one is refused as too long.
    let script = format!(
        "AUTH PLAIN\r\n{}\r\nAUTH PLAIN\r\n{}\r\nNOOP\r\n",
        "QUFB".repeat(2500),
        "QUFB".repeat(5000)
    );
    let out = String::from_utf8_lossy(&session(&d, &[], &script).stdout).into_owned();
    assert!(
        out.contains(
            "+ \r\n-ERR Invalid SASL response.\r\n+ \r\n-ERR SASL response too long.\r\n+OK\r\n"
        ),
        "{out}"
    );
}

#[test]
fn curl_logs_in_with_cram_md5() {
    let d = dovecot();
    let act = Activator::start(true, &relay_args(&d));
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-u",
            "alice:alice-pw",
            "--login-options",
            "AUTH=CRAM-MD5",
        ])
        .arg(format!("pop3://127.0.0.1:{}/1", act.port))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"Subject: one\r\n\r\nbody\r\n");
}

#[test]
fn auth_is_refused_before_tls_unless_plaintext_is_allowed_and_never_logged() {
    let d = dovecot();
    let a = [
        "-H",
        "127.0.0.1",
        "-p",
        &d.imap_port.to_string(),
        "-l",
        "-v",
    ]
    .map(String::from);
    let script = "AUTH PLAIN AGFsaWNlAGFsaWNlLXB3\r\nAUTH\r\nQUIT\r\n";
    let out = common::pop3::run(&a, script.as_bytes());
    let r = replies(&out.stdout, script);
    assert!(r[1].status.starts_with("-ERR [AUTH] "));
    assert!(r[2].status.starts_with("-ERR [AUTH] "));
    // With plaintext allowed: a wrong PLAIN password appears nowhere in the log, raw or base64.
    // AGFsaWNlAFplYnJhLVF1YXJ0ei05MQ== = "\0alice\0Zebra-Quartz-91"
    let script = "AUTH PLAIN AGFsaWNlAFplYnJhLVF1YXJ0ei05MQ==\r\nQUIT\r\n";
    let out = session(&d, &["-v"], script);
    assert!(replies(&out.stdout, script)[1]
        .status
        .starts_with("-ERR [AUTH]"));
    for secret in [
        "Zebra-Quartz-91",
        "AGFsaWNlAFplYnJhLVF1YXJ0ei05MQ",
        "WmVicmEtUXVhcnR6LTkx",
    ] {
        assert!(
            !out.stderr.contains(secret),
            "{secret} in the log: {}",
            out.stderr
        );
    }
    assert!(
        out.stderr.contains("login failed: user=alice "),
        "{}",
        out.stderr
    );
}

/// A scripted IMAP server offering only token mechanisms (Dovecot can't check OAuth tokens
/// without an OAuth server): accepts the token `good`, answers any other with RFC 7628's error
/// challenge, and records every line it receives.
struct OAuthServer {
    port: u16,
    received: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl OAuthServer {
    fn start() -> OAuthServer {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = received.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().unwrap();
                    let mut r = BufReader::new(conn);
                    let mut line = || {
                        let mut l = String::new();
                        r.read_line(&mut l).ok().filter(|n| *n > 0)?;
                        let l = l.trim_end().to_string();
                        log.lock().unwrap().push(l.clone());
                        Some(l)
                    };
                    let _ = w.write_all(b"* OK fake IMAP ready\r\n");
                    while let Some(l) = line() {
                        let (tag, cmd) = l.split_once(' ').unwrap_or((&l, ""));
                        let reply = if cmd == "CAPABILITY" {
                            format!("* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 AUTH=OAUTHBEARER AUTH=SCRAM-SHA-256-PLUS\r\n{tag} OK done\r\n")
                        } else if cmd.starts_with("AUTHENTICATE ") {
                            let _ = w.write_all(b"+ \r\n");
                            let Some(token) = line() else { return };
                            let token =
                                String::from_utf8(base64_decode(&token)).unwrap_or_default();
                            if token.contains("auth=Bearer good\u{1}") {
                                format!("{tag} OK authenticated\r\n")
                            } else {
                                // {"status":"401","schemes":"bearer","scope":"mail"}
                                let _ = w.write_all(b"+ eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=\r\n");
                                let _ = line();
                                format!("{tag} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n")
                            }
                        } else if cmd.starts_with("SELECT ") {
                            format!("* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n{tag} OK [READ-WRITE] done\r\n")
                        } else if cmd == "LOGOUT" {
                            format!("* BYE bye\r\n{tag} OK done\r\n")
                        } else {
                            format!("{tag} BAD unexpected\r\n")
                        };
                        let _ = w.write_all(reply.as_bytes());
                    }
                });
            }
        });
        OAuthServer { port, received }
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import base64,sys; sys.stdout.buffer.write(base64.b64decode(sys.argv[1]))",
            s,
        ])
        .output()
        .unwrap();
    out.stdout
}

#[test]
fn oauth_tokens_and_their_error_challenge_pass_through_unchanged() {
    let server = OAuthServer::start();
    let a = [
        "-H",
        "127.0.0.1",
        "-p",
        &server.port.to_string(),
        "--allow-plaintext-auth",
        "-l",
        "--auth-failure-delay",
        "0",
        "--sasl",
        "PLAIN,LOGIN,XOAUTH2,OAUTHBEARER,SCRAM-SHA-256",
    ]
    .map(String::from);
    // user=alice^Aauth=Bearer good^A^A, and the same with a bad token.
    let good = "dXNlcj1hbGljZQFhdXRoPUJlYXJlciBnb29kAQE=";
    let bad = "dXNlcj1hbGljZQFhdXRoPUJlYXJlciBiYWQBAQ==";
    let script = format!("CAPA\r\nAUTH XOAUTH2 {bad}\r\n\r\nAUTH OAUTHBEARER\r\n*\r\nAUTH SCRAM-SHA-256\r\nAUTH XOAUTH2 {good}\r\nQUIT\r\n");
    let out = common::pop3::run(&a, script.as_bytes());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SASL PLAIN LOGIN SCRAM-SHA-256 XOAUTH2 OAUTHBEARER\r\n"),
        "{text}"
    );
    // The server offers only SCRAM-SHA-256-PLUS: never taken for SCRAM-SHA-256.
    assert!(
        text.contains("-ERR Unsupported authentication mechanism.\r\n"),
        "{text}"
    );
    assert!(
        text.contains("+ eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=\r\n-ERR [AUTH] Authentication failed.\r\n"),
        "the error challenge reaches the client unchanged: {text}"
    );
    assert!(
        text.contains("+ \r\n-ERR Authentication cancelled.\r\n"),
        "{text}"
    );
    assert!(text.contains("+OK Logged in, 0 messages.\r\n"), "{text}");
    let got = server.received();
    assert!(
        got.contains(&bad.to_string()) && got.contains(&good.to_string()),
        "tokens relayed unchanged: {got:?}"
    );
    assert!(
        out.stderr.contains("login failed: user=alice "),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("Bearer") && !out.stderr.contains(good));
}
