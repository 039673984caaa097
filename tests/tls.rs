//! TLS on both sides, with real clients (Python's poplib, curl, openssl s_client) and Dovecot's
//! IMAPS/STARTTLS: implicit TLS and STLS towards the client, verified TLS towards IMAP.

mod common;

use common::activate::Activator;
use common::dovecot::Dovecot;
use common::pop3::{args, expected_retr, replies, run};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

/// aiopopd's TLS options, reusing the test Dovecot's certificate (valid for 127.0.0.1).
fn tls_args(d: &Dovecot, stls: bool) -> Vec<String> {
    let mut a = vec![
        "-H".to_string(),
        "127.0.0.1".into(),
        "-p".into(),
        d.imap_port.to_string(),
        "-l".into(),
        "-d".into(),
        "pop.test".into(),
        "--ssl-cert".into(),
        d.ca_cert_path().to_str().unwrap().into(),
        "--ssl-key".into(),
        d.dir().join("key.pem").to_str().unwrap().into(),
    ];
    if stls {
        a.push("--stls".into());
    }
    a
}

fn mailbox(d: &Dovecot) {
    d.deliver("alice", "INBOX", b"Subject: one\r\n\r\n.dot\r\nbody\r\n");
    d.deliver("alice", "INBOX", b"Subject: two\n\nbare lf\n");
}

fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const POPLIB: &str = r#"
import poplib, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
if sys.argv[3] == "implicit":
    p = poplib.POP3_SSL("127.0.0.1", int(sys.argv[1]), context=ctx, timeout=30)
else:
    p = poplib.POP3("127.0.0.1", int(sys.argv[1]), timeout=30)
    before = p.capa()
    try:
        p.user("alice")
        print("USER before STLS was accepted")
    except poplib.error_proto as e:
        print("before:", e.args[0].decode())
    p.stls(ctx)
    after = p.capa()
    print("STLS" in before, "STLS" in after, "USER" in before, "USER" in after)
p.user("alice")
p.pass_("alice-pw")
n = p.stat()[0]
for i in range(1, n + 1):
    sys.stdout.write(b"".join(l + b"\r\n" for l in p.retr(i)[1]).hex() + "\n")
p.quit()
"#;

fn check_bodies(d: &Dovecot, hex_lines: &[&str]) {
    let bodies = d.imap_bodies("alice", "alice-pw", "INBOX");
    assert_eq!(hex_lines.len(), bodies.len());
    for (hex, (_, body)) in hex_lines.iter().zip(&bodies) {
        let expected: String = expected_retr(body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(*hex, expected);
    }
}

#[test]
fn implicit_tls_with_poplib_curl_and_openssl() {
    let d = Dovecot::start();
    mailbox(&d);
    let a = Activator::start(true, &tls_args(&d, false));
    let ca = d.ca_cert_path().to_str().unwrap();
    let out = python(POPLIB, &[&a.port.to_string(), ca, "implicit"]);
    check_bodies(&d, &out.lines().collect::<Vec<_>>());

    let curl = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            ca,
            "-u",
            "alice:alice-pw",
        ])
        .arg(format!("pop3s://127.0.0.1:{}/1", a.port))
        .output()
        .unwrap();
    assert!(
        curl.status.success(),
        "{}",
        String::from_utf8_lossy(&curl.stderr)
    );
    assert_eq!(
        curl.stdout,
        expected_retr(&d.imap_bodies("alice", "alice-pw", "INBOX")[0].1)
    );

    let script = "CAPA\r\nUSER alice\r\nPASS alice-pw\r\nSTAT\r\nQUIT\r\n";
    let out = openssl(
        &["-connect", &format!("127.0.0.1:{}", a.port), "-CAfile", ca],
        script,
    );
    let r = replies(&out, script);
    assert!(r[1].body_str().contains("USER\r\n") && !r[1].body_str().contains("STLS"));
    assert_eq!(r[4].status, "+OK 2 53");
}

/// openssl s_client with `script` on stdin; returns what the server sent after the handshake.
fn openssl(args: &[&str], script: &str) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .arg("s_client")
        .args(["-quiet", "-no_ign_eof"])
        // Verify whenever a CA is given: a test must not pass by ignoring a bad certificate.
        .args(if args.contains(&"-CAfile") {
            &["-verify_return_error"][..]
        } else {
            &[]
        })
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl");
    let mut stdin = child.stdin.take().unwrap();
    let script = script.to_string();
    let w = std::thread::spawn(move || {
        // Give the handshake a moment so the script isn't taken as handshake input timing.
        std::thread::sleep(Duration::from_millis(300));
        let _ = stdin.write_all(script.as_bytes());
        std::thread::sleep(Duration::from_secs(2));
    });
    let out = child.wait_with_output().unwrap();
    w.join().unwrap();
    out.stdout
}

#[test]
fn stls_with_poplib_openssl_and_curl() {
    let d = Dovecot::start();
    mailbox(&d);
    let a = Activator::start(true, &tls_args(&d, true));
    let ca = d.ca_cert_path().to_str().unwrap();
    let out = python(POPLIB, &[&a.port.to_string(), ca, "stls"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "before: -ERR [AUTH] Plaintext authentication is not allowed without TLS."
    );
    assert_eq!(
        lines[1], "True False False True",
        "CAPA: STLS only before, USER only after"
    );
    check_bodies(&d, &lines[2..]);

    let script = "USER alice\r\nPASS alice-pw\r\nSTAT\r\nQUIT\r\n";
    let out = openssl(
        &[
            "-connect",
            &format!("127.0.0.1:{}", a.port),
            "-starttls",
            "pop3",
            "-CAfile",
            ca,
        ],
        script,
    );
    // After STLS there is no second greeting: just the replies to the script.
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("+OK Send your password.\r\n+OK Logged in, 2 messages.\r\n+OK 2 "),
        "{text}"
    );
    assert!(
        text.ends_with("+OK pop.test POP3 proxy signing off.\r\n"),
        "{text}"
    );

    let curl = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "--ssl-reqd",
            "--cacert",
            ca,
            "-u",
            "alice:alice-pw",
        ])
        .arg(format!("pop3://127.0.0.1:{}/2", a.port))
        .output()
        .unwrap();
    assert!(
        curl.status.success(),
        "{}",
        String::from_utf8_lossy(&curl.stderr)
    );
    assert_eq!(
        curl.stdout,
        expected_retr(&d.imap_bodies("alice", "alice-pw", "INBOX")[1].1)
    );
}

#[test]
fn plaintext_pipelined_behind_stls_is_refused() {
    let d = Dovecot::start();
    let a = Activator::start(true, &tls_args(&d, true));
    let mut s = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"STLS\r\nUSER alice\r\nPASS alice-pw\r\n")
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.ends_with("-ERR Nothing may follow STLS before the TLS handshake.\r\n"),
        "{text}"
    );
    assert!(!d.log_contents().contains("imap-login: Login"));
}

#[test]
fn stls_is_not_offered_without_certificates_or_on_implicit_tls() {
    let d = Dovecot::start();
    let r = run(&args(&d), b"CAPA\r\nSTLS\r\n");
    let r = replies(&r.stdout, "CAPA\r\nSTLS\r\n");
    assert!(!r[1].body_str().contains("STLS"));
    assert_eq!(r[2].status, "-ERR STLS is not available.");
}

#[test]
fn ssl_generate_creates_a_usable_pair_once() {
    let d = Dovecot::start();
    mailbox(&d);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let mut a = args(&d);
    a.extend(
        [
            "--ssl-cert",
            cert.to_str().unwrap(),
            "--ssl-key",
            key.to_str().unwrap(),
            "--ssl-generate",
        ]
        .map(String::from),
    );
    let act = Activator::start(true, &a);
    // The Activator's own readiness probe may already have generated the pair.
    let script = "USER alice\r\nPASS alice-pw\r\nSTAT\r\nQUIT\r\n";
    let out = openssl(&["-connect", &format!("127.0.0.1:{}", act.port)], script);
    let r = replies(&out, script);
    let san = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&san.stdout).contains("DNS:pop.test"),
        "made for the -d host name"
    );
    assert_eq!(r[3].status, "+OK 2 53", "{r:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let first = std::fs::read(&cert).unwrap();
    let _ = openssl(
        &["-connect", &format!("127.0.0.1:{}", act.port)],
        "QUIT\r\n",
    );
    assert_eq!(
        std::fs::read(&cert).unwrap(),
        first,
        "reused, not regenerated"
    );
}

#[test]
fn a_tls_1_1_client_is_refused() {
    let d = Dovecot::start();
    let a = Activator::start(true, &tls_args(&d, false));
    // SECLEVEL=0, or this machine's OpenSSL would refuse TLS 1.1 by itself and prove nothing.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-tls1_1",
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            "-connect",
        ])
        .arg(format!("127.0.0.1:{}", a.port))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("alert"), "refused with a TLS alert: {text}");
    assert!(!text.contains("+OK"));
    // The same openssl without -tls1_1 gets through, so the refusal is about the version.
    let ok = openssl(
        &[
            "-connect",
            &format!("127.0.0.1:{}", a.port),
            "-CAfile",
            d.ca_cert_path().to_str().unwrap(),
        ],
        "QUIT\r\n",
    );
    assert!(String::from_utf8_lossy(&ok).starts_with("+OK pop.test"));
}

#[test]
fn plain_text_on_the_tls_port_gets_nothing_and_changes_nothing() {
    let d = Dovecot::start();
    let a = Activator::start(true, &tls_args(&d, false));
    let mut s = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"USER alice\r\nPASS alice-pw\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).contains("+OK"));
}

fn imap_session(extra: &[&str], port: u16, d: &Dovecot) -> Vec<common::pop3::Reply> {
    let mut a: Vec<String> = [
        "-H",
        "localhost",
        "-p",
        &port.to_string(),
        "--allow-plaintext-auth",
        "-l",
        "--auth-failure-delay",
        "0",
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    let script = "USER alice\r\nPASS alice-pw\r\nSTAT\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n";
    let r = replies(&run(&a, script.as_bytes()).stdout, script);
    if r.get(3).is_some_and(|r| r.ok()) {
        // Both messages, the second fetched ahead while the first was sent: byte-exact.
        let bodies = d.imap_bodies("alice", "alice-pw", "INBOX");
        for (i, (_, body)) in bodies.iter().enumerate() {
            assert_eq!(
                r[4 + i].body.as_deref(),
                Some(&expected_retr(body)[..]),
                "RETR {}",
                i + 1
            );
        }
    }
    r
}

#[test]
fn imap_tls_is_verified() {
    let d = Dovecot::start();
    mailbox(&d);
    let ca = d.ca_cert_path().to_str().unwrap().to_string();
    let r = imap_session(&["-s", "--imap-ca", &ca], d.imaps_port, &d);
    assert_eq!(
        r[3].status, "+OK 2 53",
        "implicit TLS with --imap-ca: {r:?}"
    );
    let r = imap_session(&["-s"], d.imaps_port, &d);
    assert_eq!(
        r[2].status, "-ERR [SYS/TEMP] Account is temporarily unavailable; try again later.",
        "untrusted"
    );
    let r = imap_session(&["--imap-starttls", "--imap-ca", &ca], d.imap_port, &d);
    assert_eq!(r[3].status, "+OK 2 53", "STARTTLS: {r:?}");
    let r = imap_session(&["--imap-starttls"], d.imap_port, &d);
    assert!(
        r[2].status.starts_with("-ERR [SYS/TEMP]"),
        "STARTTLS untrusted"
    );
}

#[test]
fn clear_imap_to_a_remote_host_is_refused_at_startup() {
    let out = run(
        &["-H", "192.0.2.1", "--allow-plaintext-auth"].map(String::from),
        b"QUIT\r\n",
    );
    assert!(!out.ok);
    assert!(out.stderr.contains("--imap-plaintext"), "{}", out.stderr);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("-ERR [SYS/PERM]"));
}
