//! `aiopopd --check` against a private Dovecot, and the configuration errors a person reads on
//! stderr: each mistake an operator makes with the IMAP options is named with its fix, and the
//! ones that used to wait for `--imap-timeout` (plain IMAP against a TLS port) answer within
//! seconds.

mod common;

use common::dovecot::Dovecot;
use common::pop3::BIN;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Out {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs aiopopd with `args`, `stdin` piped in, stdout and stderr captured separately.
fn aiopopd(args: &[&str], stdin: &[u8]) -> Out {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start aiopopd");
    let mut input = child.stdin.take().expect("stdin");
    let _ = input.write_all(stdin);
    drop(input);
    let out = child.wait_with_output().expect("aiopopd output");
    // Shown by the test harness when a test fails (or with --nocapture).
    println!(
        "$ aiopopd {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Out {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

fn check(args: &[&str]) -> Out {
    let mut a = vec!["--check"];
    a.extend_from_slice(args);
    aiopopd(&a, b"")
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        .unwrap_or(false)
}

#[test]
fn plain_port_passes_with_greeting_and_capabilities() {
    let d = Dovecot::start();
    let port = d.imap_port.to_string();
    let o = check(&["-H", "127.0.0.1", "-p", &port]);
    assert!(o.ok, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("greeting: * OK"), "{}", o.stdout);
    assert!(
        o.stdout.contains("capabilities before login: "),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("AUTH= PLAIN"), "{}", o.stdout);
    assert!(!o.stdout.contains("FAIL"), "{}", o.stdout);
    assert!(
        o.stdout.contains("everything checked is fine"),
        "{}",
        o.stdout
    );
}

#[test]
fn imaps_with_the_right_ca_passes_and_names_the_certificate() {
    let d = Dovecot::start();
    let port = d.imaps_port.to_string();
    let ca = d.ca_cert_path().to_str().unwrap().to_string();
    let o = check(&["-H", "127.0.0.1", "-s", "-p", &port, "--imap-ca", &ca]);
    assert!(o.ok, "{}\n{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("TLS: certificate verified for 127.0.0.1"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("valid until"), "{}", o.stdout);
    // Dovecot on Debian's OpenSSL 3 negotiates TLS 1.3.
    assert!(
        o.stdout.contains("ok    TLS version: TLS 1.3, TLS13_"),
        "{}",
        o.stdout
    );
    // STARTTLS on the plain port, verified the same way.
    let plain = d.imap_port.to_string();
    let o = check(&[
        "-H",
        "127.0.0.1",
        "--imap-starttls",
        "-p",
        &plain,
        "--imap-ca",
        &ca,
    ]);
    assert!(o.ok, "{}\n{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("capabilities after STARTTLS"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("ok    TLS version: TLS 1.3, TLS13_"),
        "{}",
        o.stdout
    );
}

#[test]
fn imaps_without_the_ca_is_untrusted_and_suggests_imap_ca() {
    let d = Dovecot::start();
    let port = d.imaps_port.to_string();
    let o = check(&["-H", "127.0.0.1", "-s", "-p", &port]);
    assert!(!o.ok);
    assert_eq!(o.code, Some(1));
    assert!(o.stdout.contains("FAIL"), "{}", o.stdout);
    assert!(o.stdout.contains("--imap-ca"), "{}", o.stdout);
}

#[test]
fn implicit_tls_against_the_plain_port_says_drop_s() {
    let d = Dovecot::start();
    let port = d.imap_port.to_string();
    let o = check(&["-H", "127.0.0.1", "-s", "-p", &port]);
    assert!(!o.ok);
    assert!(o.stdout.contains("answered in clear text"), "{}", o.stdout);
    assert!(
        o.stdout.contains("this is a plain IMAP port: drop -s"),
        "{}",
        o.stdout
    );
    assert!(o.took < Duration::from_secs(5), "{:?}", o.took);
}

#[test]
fn plain_against_the_tls_port_says_add_s_within_seconds() {
    let d = Dovecot::start();
    let port = d.imaps_port.to_string();
    let o = check(&["-H", "127.0.0.1", "-p", &port]);
    assert!(!o.ok);
    assert!(
        o.stdout.contains("this looks like a TLS port: add -s"),
        "{}",
        o.stdout
    );
    assert!(o.took < Duration::from_secs(5), "took {:?}", o.took);
}

#[test]
fn closed_port_and_unknown_host_are_named() {
    let port = closed_port().to_string();
    let o = check(&["-H", "127.0.0.1", "-p", &port]);
    assert!(!o.ok);
    assert!(o.stdout.contains("connection refused"), "{}", o.stdout);
    assert!(o.stdout.contains("check -p"), "{}", o.stdout);

    let o = check(&["-H", "nonexistent.invalid", "-s"]);
    assert!(!o.ok);
    assert!(o.stdout.contains("doesn't resolve"), "{}", o.stdout);
    assert!(o.stdout.contains("unknown host: check -H"), "{}", o.stdout);
}

#[test]
fn user_dir_names_each_bad_file() {
    let d = Dovecot::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("alice"),
        format!(
            r#"{{"hostname": "127.0.0.1", "port": {}, "ssl": false}}"#,
            d.imap_port
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("bob"),
        r#"{"hostname": "127.0.0.1", "port": 143, "mailbx": "Archive"}"#,
    )
    .unwrap();
    let path = dir.path().to_str().unwrap();
    let o = check(&["--user-dir", path]);
    assert!(!o.ok, "{}", o.stdout);
    let fail: Vec<&str> = o
        .stdout
        .lines()
        .filter(|l| l.starts_with("  FAIL"))
        .collect();
    assert_eq!(fail.len(), 1, "{}", o.stdout);
    assert!(
        fail[0].contains("bob") && fail[0].contains("mailbx"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("alice: IMAP user alice at 127.0.0.1"),
        "{}",
        o.stdout
    );
    // alice's server was tried.
    assert!(o.stdout.contains("greeting: * OK"), "{}", o.stdout);

    std::fs::remove_file(dir.path().join("bob")).unwrap();
    let o = check(&["--user-dir", path]);
    assert!(o.ok, "{}", o.stdout);
}

#[test]
fn user_login_with_the_password_on_stdin() {
    let d = Dovecot::start();
    d.deliver("alice", "INBOX", b"Subject: one\r\n\r\nbody\r\n");
    let port = d.imap_port.to_string();
    let args = ["--check", "-H", "127.0.0.1", "-p", &port, "-u", "alice"];
    let o = aiopopd(&args, b"alice-pw\n");
    assert!(o.ok, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("login as alice accepted"), "{}", o.stdout);
    assert!(
        o.stdout.contains("capabilities after login"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("mailbox INBOX opened") && o.stdout.contains("1 messages listed"),
        "{}",
        o.stdout
    );
    assert!(!o.stdout.contains("alice-pw") && !o.stderr.contains("alice-pw"));

    let o = aiopopd(&args, b"wrong\n");
    assert!(!o.ok);
    assert!(o.stdout.contains("FAIL  login as alice"), "{}", o.stdout);
    assert!(o.stdout.contains("check the password"), "{}", o.stdout);

    let o = aiopopd(&args, b"");
    assert!(!o.ok);
    assert!(o.stdout.contains("no password"), "{}", o.stdout);

    // -u belongs to --check.
    let o = aiopopd(&["-H", "127.0.0.1", "-u", "alice"], b"");
    assert_eq!(o.code, Some(2));
    assert!(o.stderr.contains("--check"), "{}", o.stderr);
}

#[test]
fn pop3_certificate_and_key() {
    let d = Dovecot::start();
    let port = d.imap_port.to_string();
    let dir = tempfile::tempdir().unwrap();
    let pair = rcgen::generate_simple_self_signed(vec!["pop.test".to_string()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["other.test".to_string()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let other_key = dir.path().join("other-key.pem");
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
    std::fs::write(&other_key, other.signing_key.serialize_pem()).unwrap();
    let (cert, key, other_key) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        other_key.to_str().unwrap(),
    );
    let base = ["-H", "127.0.0.1", "-p", &port, "-d", "pop.test"];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        check(&a)
    };

    let o = with(&["--ssl-cert", cert, "--ssl-key", key]);
    assert!(o.ok, "{}\n{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("the key is the certificate's"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("DNS:pop.test"), "{}", o.stdout);
    assert!(o.stdout.contains("self-signed"), "{}", o.stdout);

    let o = with(&["--ssl-cert", cert, "--ssl-key", other_key]);
    assert!(!o.ok);
    assert!(o.stdout.contains("not this certificate's"), "{}", o.stdout);

    let missing = dir.path().join("missing.pem");
    let o = with(&["--ssl-cert", cert, "--ssl-key", missing.to_str().unwrap()]);
    assert!(!o.ok);
    assert!(o.stdout.contains("missing.pem"), "{}", o.stdout);

    if !is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o000)).unwrap();
        let o = with(&["--ssl-cert", cert, "--ssl-key", key]);
        assert!(!o.ok);
        assert!(o.stdout.contains("Permission denied"), "{}", o.stdout);
        assert!(
            o.stdout.contains("readable by the user aiopopd runs as"),
            "{}",
            o.stdout
        );
    }
    // Pasted from ExecStart= as shipped: %d is systemd's, and the report says what to give.
    let o = with(&["--ssl-cert", "%d/cert.pem", "--ssl-key", "%d/key.pem"]);
    assert!(!o.ok);
    assert!(o.stdout.contains("LoadCredential="), "{}", o.stdout);
    // Root reads any file: a directory stands for a key that can't be read.
    let o = with(&[
        "--ssl-cert",
        cert,
        "--ssl-key",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!o.ok, "{}", o.stdout);
    assert!(o.stdout.contains("FAIL"), "{}", o.stdout);
}

#[test]
fn listener_options_print_the_socket_activation_line_on_stderr() {
    let o = aiopopd(&["-P", "9955", "-H", "localhost"], b"");
    assert_eq!(o.code, Some(2));
    assert!(
        o.stderr
            .contains("systemd-socket-activate -l 127.0.0.1:9955 --accept --inetd"),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains(" -H localhost"), "{}", o.stderr);
    assert!(
        o.stderr.contains("ListenStream=127.0.0.1:9955"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("server_args = -H localhost"),
        "{}",
        o.stderr
    );
    // The client (stdout here) gets one line, no detail.
    assert_eq!(
        o.stdout,
        "-ERR [SYS/PERM] aiopopd is misconfigured; see the server log.\r\n"
    );
}

#[test]
fn a_mistyped_option_gets_a_suggestion() {
    let o = aiopopd(&["-H", "localhost", "--imap-sll"], b"");
    assert_eq!(o.code, Some(2));
    assert!(
        o.stderr.contains("did you mean --imap-ssl?"),
        "{}",
        o.stderr
    );
    let o = aiopopd(&["-H", "localhost", "--imap-host", "x"], b"");
    assert!(o.stderr.contains("--imap-hostname"), "{}", o.stderr);
    // Under --check: on stderr too, exit status 1, and no POP3 line on stdout.
    let o = aiopopd(&["--check", "-H", "localhost", "--imap-sll"], b"");
    assert_eq!(o.code, Some(1));
    assert!(
        o.stderr.contains("did you mean --imap-ssl?"),
        "{}",
        o.stderr
    );
    assert!(o.stdout.is_empty(), "{}", o.stdout);
}

#[test]
fn no_options_says_what_is_needed() {
    let o = aiopopd(&[], b"");
    assert_eq!(o.code, Some(2));
    assert!(
        o.stderr.contains("-H/--imap-hostname HOST is required"),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("aiopopd --check"), "{}", o.stderr);
}

/// The same mistakes in a real session: the log line (stderr with -l) names the fix.
#[test]
fn session_log_lines_name_the_fix() {
    let d = Dovecot::start();
    let script = b"USER alice\r\nPASS alice-pw\r\nQUIT\r\n";
    let session = |extra: &[&str]| {
        let mut a = vec!["-l", "--allow-plaintext-auth", "--auth-failure-delay", "0"];
        a.extend_from_slice(extra);
        aiopopd(&a, script)
    };
    let plain = d.imap_port.to_string();
    let o = session(&["-H", "127.0.0.1", "-s", "-p", &plain]);
    assert!(o.stdout.contains("-ERR [SYS/TEMP]"), "{}", o.stdout);
    assert!(o.stderr.contains("drop -s"), "{}", o.stderr);

    let tls = d.imaps_port.to_string();
    let o = session(&["-H", "127.0.0.1", "-s", "-p", &tls]);
    assert!(o.stderr.contains("--imap-ca"), "{}", o.stderr);

    let closed = closed_port().to_string();
    let o = session(&["-H", "127.0.0.1", "-p", &closed]);
    assert!(
        o.stderr.contains("nothing listens on that port"),
        "{}",
        o.stderr
    );
}

/// The capabilities that change what aiopopd does, each said yes or no. This Dovecot offers ID
/// before login, and UIDPLUS, MOVE and NAMESPACE only once logged in (hence -u).
#[test]
fn the_capabilities_that_matter_are_each_named() {
    let d = Dovecot::start();
    let port = d.imap_port.to_string();
    let args = ["--check", "-H", "127.0.0.1", "-p", &port, "-u", "alice"];
    let o = aiopopd(&args, b"alice-pw\n");
    assert!(o.ok, "{}\n{}", o.stdout, o.stderr);
    // One note after each capabilities line, in CAPS_THAT_MATTER's order.
    let notes: Vec<&str> = o
        .stdout
        .lines()
        .skip_while(|l| !l.contains("capabilities after login: "))
        .filter_map(|l| l.strip_prefix("  note  "))
        .collect();
    let after = notes.first().copied().unwrap_or_default();
    assert!(
        after.starts_with("UIDPLUS yes, MOVE yes, STARTTLS "),
        "{}",
        o.stdout
    );
    assert!(after.contains(", ID yes, NAMESPACE yes, "), "{}", o.stdout);
    let before = o
        .stdout
        .lines()
        .skip_while(|l| !l.contains("capabilities before login: "))
        .find_map(|l| l.strip_prefix("  note  "))
        .unwrap_or_default();
    assert!(
        before.contains("STARTTLS yes")
            && before.contains(", ID yes, ")
            && before.ends_with("-u USER shows them)"),
        "{}",
        o.stdout
    );
}

/// A certificate made with rcgen for pop.test, valid until `days` (and an hour, so the whole
/// days left don't depend on when the check runs) from now; `days` may be negative. The files,
/// and the expiry date as the report prints it.
fn certificate_expiring_in(dir: &std::path::Path, days: i64) -> (String, String, String) {
    use std::time::SystemTime;
    let mut params = rcgen::CertificateParams::new(vec!["pop.test".to_string()]).unwrap();
    let offset = Duration::from_secs(days.unsigned_abs() * 86_400);
    let hour = Duration::from_secs(3600);
    params.not_after = match days >= 0 {
        true => SystemTime::now() + offset + hour,
        false => SystemTime::now() - offset + hour,
    }
    .into();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (
        dir.join(format!("cert{days}.pem")),
        dir.join(format!("key{days}.pem")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (
        c.to_str().unwrap().to_string(),
        k.to_str().unwrap().to_string(),
        params.not_after.date().to_string(),
    )
}

/// The POP3 certificate's expiry: the date and the days left; a note under three weeks; a
/// FAIL once expired, with the fix.
#[test]
fn pop3_certificate_expiry_is_reported() {
    let d = Dovecot::start();
    let port = d.imap_port.to_string();
    let dir = tempfile::tempdir().unwrap();
    let with = |days: i64| {
        let (cert, key, until) = certificate_expiring_in(dir.path(), days);
        let a = [
            "-H",
            "127.0.0.1",
            "-p",
            &port,
            "-d",
            "pop.test",
            "--ssl-cert",
            &cert,
            "--ssl-key",
            &key,
        ];
        (check(&a), until)
    };

    let (o, until) = with(100);
    assert!(o.ok, "{}\n{}", o.stdout, o.stderr);
    let line = format!(" to {until} (100 days left)");
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("  ok    certificate: ") && l.ends_with(&line)),
        "{line:?} not in:\n{}",
        o.stdout
    );

    let (o, until) = with(10);
    assert!(o.ok, "a note, not a problem: {}", o.stdout);
    let line = format!(" to {until}: expires in 10 days");
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("  note  certificate: ") && l.ends_with(&line)),
        "{line:?} not in:\n{}",
        o.stdout
    );

    let (o, until) = with(-2);
    assert_eq!(o.code, Some(1), "{}", o.stdout);
    let line = format!(" to {until}: EXPIRED");
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("  FAIL  certificate: ") && l.ends_with(&line)),
        "{line:?} not in:\n{}",
        o.stdout
    );
    assert!(o.stdout.contains("fix: renew it"), "{}", o.stdout);
}
