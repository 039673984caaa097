//! Runs the aiopopd-client binary against a tiny scripted POP3 server (for the faults a real
//! server won't make) and against a private Dovecot's own POP3 server (plain, POP3S, STLS).
//! Tests against aiopopd itself live elsewhere.

mod common;

use common::dovecot::Dovecot;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const CLIENT: &str = env!("CARGO_BIN_EXE_aiopopd-client");

/// Message 1 of the scripted server, un-stuffed: 59 octets, one line starting with a dot.
const MSG1: &str = "From: a@example.org\r\nSubject: first\r\n\r\nHello\r\n.hidden dot\r\n";
const MSG2: &str = "Subject: second\r\n\r\nBye\r\n";

/// What the scripted server does with one command line.
enum Act {
    Say(Vec<u8>),
    /// Say this, then close the connection.
    SayAndClose(Vec<u8>),
}

fn say(s: &str) -> Act {
    Act::Say(s.as_bytes().to_vec())
}

/// Dot-stuffs `msg` and adds the terminator, as RETR sends it.
fn stuffed(msg: &str) -> String {
    let mut s = String::new();
    for line in msg.split_inclusive("\r\n") {
        if line.starts_with('.') {
            s.push('.');
        }
        s.push_str(line);
    }
    s + ".\r\n"
}

/// A well-behaved POP3 server holding MSG1 and MSG2 for alice / alice-pw.
fn good(line: &str) -> Act {
    let msgs = [MSG1, MSG2];
    match line {
        "CAPA" => say("+OK Capability list follows\r\nUSER\r\nUIDL\r\nTOP\r\n.\r\n"),
        "USER alice" => say("+OK\r\n"),
        "PASS alice-pw" => say("+OK Logged in.\r\n"),
        _ if line.starts_with("PASS ") => say("-ERR [AUTH] Authentication failed.\r\n"),
        "STAT" => say(&format!("+OK 2 {}\r\n", MSG1.len() + MSG2.len())),
        "LIST" => say(&format!(
            "+OK 2 messages:\r\n1 {}\r\n2 {}\r\n.\r\n",
            MSG1.len(),
            MSG2.len()
        )),
        "UIDL" => say("+OK\r\n1 000001\r\n2 000002\r\n.\r\n"),
        "RETR 1" | "RETR 2" => {
            let msg = msgs[usize::from(line.as_bytes()[5] - b'1')];
            say(&format!("+OK {} octets\r\n{}", msg.len(), stuffed(msg)))
        }
        "DELE 1" | "DELE 2" => say("+OK Marked to be deleted.\r\n"),
        "NOOP" | "RSET" => say("+OK\r\n"),
        "QUIT" => Act::SayAndClose(b"+OK Logging out.\r\n".to_vec()),
        _ => say("-ERR Unknown command.\r\n"),
    }
}

/// Serves one connection on 127.0.0.1 (greeting, then `act` for every command line); the
/// handle yields the command lines received. Gives up after a while if no client comes, as
/// when the client fails before connecting.
fn scripted(
    greeting: &'static str,
    act: impl Fn(&str) -> Act + Send + 'static,
) -> (String, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port().to_string();
    listener.set_nonblocking(true).expect("nonblocking");
    let handle = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut tcp = loop {
            match listener.accept() {
                Ok((tcp, _)) => break tcp,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Err(_) => return Vec::new(),
            }
        };
        tcp.set_nonblocking(false).expect("blocking");
        tcp.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut received = Vec::new();
        if tcp.write_all(greeting.as_bytes()).is_err() {
            return received;
        }
        let mut reader = BufReader::new(tcp.try_clone().expect("clone"));
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(n) if n > 0 => {}
                _ => return received,
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            let act = act(&line);
            received.push(line);
            match act {
                Act::Say(bytes) => {
                    if tcp.write_all(&bytes).is_err() {
                        return received;
                    }
                }
                Act::SayAndClose(bytes) => {
                    let _ = tcp.write_all(&bytes);
                    return received;
                }
            }
        }
    });
    (port, handle)
}

fn run(args: &[&str]) -> Output {
    run_with(Command::new(CLIENT).args(args), None)
}

/// The client as alice (`-p plain:alice-pw`) on `port`, with `extra` arguments.
fn alice(port: &str, extra: &[&str]) -> Output {
    let mut args = vec!["-n", port, "-u", "alice", "-p", "plain:alice-pw"];
    args.extend_from_slice(extra);
    run(&args)
}

/// Runs the client (with `--timeout 10` unless the test chose one), feeding `stdin` if given
/// (else stdin is empty).
fn run_with(cmd: &mut Command, stdin: Option<&str>) -> Output {
    if !cmd.get_args().any(|a| a == "--timeout") {
        cmd.args(["--timeout", "10"]);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run aiopopd-client");
    let mut pipe = child.stdin.take().expect("stdin");
    if let Some(input) = stdin {
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    drop(pipe);
    child.wait_with_output().expect("wait for aiopopd-client")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and that the password never shows; returns stdout.
fn assert_passed(out: &Output, password: &str) -> String {
    let (o, e) = (stdout(out), stderr(out));
    assert!(out.status.success(), "status {}\n{o}\n{e}", out.status);
    assert!(
        o.contains(">>> PASS ...\n") || o.contains(">>> AUTH "),
        "{o}"
    );
    assert!(!o.contains(password) && !e.contains(password), "{o}\n{e}");
    assert!(o.ends_with("*** check passed: every step succeeded and every reply was well-formed\n"));
    o
}

/// Asserts failure with exit status 1 and `reason` on stderr; returns stderr.
fn assert_failed(out: &Output, reason: &str) -> String {
    let e = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{}\n{e}", stdout(out));
    assert!(e.contains(reason), "expected {reason:?} in:\n{e}");
    e
}

const DEFAULT_COMMANDS: [&str; 10] = [
    "CAPA",
    "USER alice",
    "PASS alice-pw",
    "STAT",
    "LIST",
    "UIDL",
    "RETR 1",
    "NOOP",
    "RSET",
    "QUIT",
];

#[test]
fn normal_session_passes() {
    let (port, server) = scripted("+OK POP3 ready\r\n", good);
    let out = alice(&port, &[]);
    let o = assert_passed(&out, "alice-pw");
    assert_eq!(server.join().unwrap(), DEFAULT_COMMANDS);
    for line in [
        "<<< +OK POP3 ready\n>>> CAPA\n",
        ">>> USER alice\n<<< +OK\n>>> PASS ...\n<<< +OK Logged in.\n",
        ">>> LIST\n<<< +OK 2 messages:\n<<< 1 59\n<<< 2 24\n<<< .\n",
        ">>> RETR 1\n<<< +OK 59 octets\n<<< From: a@example.org\n<<< Subject: first\n",
        ">>> RSET\n<<< +OK\n>>> QUIT\n<<< +OK Logging out.\n",
    ] {
        assert!(o.contains(line), "{line:?} not in\n{o}");
    }
    assert!(!o.contains("Hello"), "the body is not shown:\n{o}");
}

#[test]
fn delete_sends_dele_and_no_rset() {
    let (port, server) = scripted("+OK\r\n", good);
    let out = alice(&port, &["-d"]);
    assert_passed(&out, "alice-pw");
    let got = server.join().unwrap();
    assert_eq!(got[6..], ["RETR 1", "DELE 1", "NOOP", "QUIT"]);
}

#[test]
fn retr_all_and_retr_n() {
    let (port, server) = scripted("+OK\r\n", good);
    let out = alice(&port, &["--all"]);
    let o = assert_passed(&out, "alice-pw");
    assert!(o.contains("<<< Subject: second\n"), "{o}");
    assert_eq!(server.join().unwrap()[6..8], ["RETR 1", "RETR 2"]);

    let (port, server) = scripted("+OK\r\n", good);
    let out = alice(&port, &["--retr", "2"]);
    assert_passed(&out, "alice-pw");
    assert_eq!(server.join().unwrap()[6], "RETR 2");

    let (port, _server) = scripted("+OK\r\n", good);
    let out = alice(&port, &["--retr", "3"]);
    assert_failed(&out, "--retr 3: the server lists only 2 messages");
}

#[test]
fn retr_octets_not_matching_list_are_reported() {
    // LIST claims three octets fewer than RETR then sends (STAT agrees with LIST). Two more
    // would be the CRLF that framing adds to a message without one, which is accepted.
    let (port, server) = scripted("+OK\r\n", |line| match line {
        "STAT" => say(&format!("+OK 2 {}\r\n", MSG1.len() - 3 + MSG2.len())),
        "LIST" => say(&format!(
            "+OK\r\n1 {}\r\n2 {}\r\n.\r\n",
            MSG1.len() - 3,
            MSG2.len()
        )),
        _ => good(line),
    });
    let out = alice(&port, &["-d"]);
    assert_failed(
        &out,
        "FAILED: server sent 59 octets for message 1 but LIST said 56",
    );
    let got = server.join().unwrap();
    assert_eq!(
        got.last().map(String::as_str),
        Some("RETR 1"),
        "no DELE, no QUIT"
    );
}

#[test]
fn unstuffed_dot_line_is_reported() {
    let (port, _server) = scripted("+OK\r\n", |line| match line {
        "RETR 1" => say(&format!("+OK\r\n{MSG1}.\r\n")),
        _ => good(line),
    });
    let out = alice(&port, &[]);
    assert_failed(
        &out,
        "RETR 1: line 5 of the multi-line reply starts with '.' but is neither byte-stuffed",
    );
}

#[test]
fn missing_terminator_is_reported() {
    // The server hangs up in the middle of the message.
    let (port, _server) = scripted("+OK\r\n", |line| match line {
        "RETR 1" => Act::SayAndClose(b"+OK\r\nFrom: a@example.org\r\nSubject: fi".to_vec()),
        _ => good(line),
    });
    let out = alice(&port, &[]);
    assert_failed(
        &out,
        "RETR 1: the server closed the connection before the end of the multi-line reply",
    );
}

#[test]
fn bare_lf_is_reported() {
    let (port, _server) = scripted("+OK\r\n", |line| match line {
        "UIDL" => say("+OK\r\n1 000001\n2 000002\r\n.\r\n"),
        _ => good(line),
    });
    let out = alice(&port, &[]);
    assert_failed(
        &out,
        "UIDL: line 1 of the multi-line reply ends in a bare LF",
    );
}

#[test]
fn err_replies_are_reported() {
    let (port, server) = scripted("+OK\r\n", good);
    let out = run(&["-n", &port, "-u", "alice", "-p", "plain:wrong-pw"]);
    assert_failed(&out, "the server refused the login");
    assert!(stdout(&out).contains("<<< -ERR [AUTH] Authentication failed.\n"));
    assert_eq!(server.join().unwrap().len(), 3, "nothing after PASS");

    let (port, _server) = scripted("+OK\r\n", |line| match line {
        "NOOP" => say("-ERR no\r\n"),
        _ => good(line),
    });
    let out = alice(&port, &[]);
    assert_failed(&out, "NOOP: the server answered -ERR no");
}

#[test]
fn server_without_capa_is_fine() {
    let (port, _server) = scripted("+OK\r\n", |line| match line {
        "CAPA" => say("-ERR Unknown command.\r\n"),
        _ => good(line),
    });
    let out = alice(&port, &[]);
    let o = assert_passed(&out, "alice-pw");
    assert!(o.contains("*** no CAPA"), "{o}");
}

#[test]
fn silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port().to_string();
    // The kernel accepts the connection; nobody ever greets.
    let started = Instant::now();
    let out = run(&[
        "-n",
        &port,
        "-u",
        "alice",
        "-p",
        "plain:x",
        "--timeout",
        "1",
    ]);
    drop(listener);
    assert_failed(
        &out,
        "greeting: timed out waiting for the server (see --timeout)",
    );
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[test]
fn connection_refused_is_reported() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().unwrap().port().to_string()
    };
    let out = run(&[
        "-H",
        "127.0.0.1",
        "-n",
        &port,
        "-u",
        "alice",
        "-p",
        "plain:x",
    ]);
    assert_failed(&out, "cannot connect to 127.0.0.1 port");
}

#[test]
fn password_from_env() {
    let (port, _server) = scripted("+OK\r\n", good);
    let out = run_with(
        Command::new(CLIENT)
            .args(["-n", &port, "-u", "alice", "-p", "env:CLIENT_TEST_PW"])
            .env("CLIENT_TEST_PW", "alice-pw"),
        None,
    );
    assert_passed(&out, "alice-pw");

    let out = run_with(
        Command::new(CLIENT)
            .args(["-n", &port, "-u", "alice", "-p", "env:CLIENT_TEST_PW"])
            .env_remove("CLIENT_TEST_PW"),
        None,
    );
    assert_failed(&out, "env:CLIENT_TEST_PW: the variable is not set");
}

#[test]
fn password_from_pass() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("pass.sh");
    std::fs::write(
        &source,
        "#!/bin/sh\n\
         if [ \"$1\" != mail/alice ]; then\n\
         \x20 echo \"Error: $1 is not in the password store.\" >&2; exit 1\n\
         fi\n\
         printf 'alice-pw\\nlogin: alice\\n'\n",
    )
    .expect("write fake pass");
    // Installed by another process: had this one written the executable, a fork by a test
    // running in parallel could still hold it open for writing, and exec would fail (ETXTBSY).
    let installed = Command::new("install")
        .args(["-m", "755"])
        .arg(&source)
        .arg(dir.path().join("pass"))
        .status()
        .expect("run install");
    assert!(installed.success());
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let (port, server) = scripted("+OK\r\n", good);
    let out = run_with(
        Command::new(CLIENT)
            .args(["-n", &port, "-u", "alice", "-p", "pass:mail/alice"])
            .env("PATH", &path),
        None,
    );
    assert_passed(&out, "alice-pw");
    assert_eq!(
        server.join().unwrap()[2],
        "PASS alice-pw",
        "the first line only"
    );

    let out = run_with(
        Command::new(CLIENT)
            .args(["-n", &port, "-u", "alice", "-p", "pass:mail/bob"])
            .env("PATH", &path),
        None,
    );
    let e = assert_failed(&out, "`pass mail/bob` failed");
    assert!(e.contains("mail/bob is not in the password store"), "{e}");
}

#[test]
fn password_from_stdin() {
    let (port, server) = scripted("+OK\r\n", good);
    let out = run_with(
        Command::new(CLIENT).args(["-n", &port, "-u", "alice"]),
        Some("alice-pw\n"),
    );
    assert_passed(&out, "alice-pw");
    assert_eq!(server.join().unwrap()[2], "PASS alice-pw");

    let out = run_with(
        Command::new(CLIENT).args(["-n", &port, "-u", "alice"]),
        None,
    );
    assert_failed(&out, "no password: stdin is empty");
}

#[test]
fn command_line_errors_exit_2() {
    for args in [
        &["-p", "plain:x"][..],
        &["-u", "alice", "-s", "--stls"],
        &["-u", "alice", "--insecure"],
        &["-u", "alice", "-p", "hunter2"],
        &["-u", "alice", "--bogus"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("hunter2"));
    }
    let help = Command::new(CLIENT).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(stdout(&help).contains("--password-source"));
    let version = Command::new(CLIENT).arg("-V").output().unwrap();
    assert!(stdout(&version).starts_with("aiopopd-client "));
}

// --- Against Dovecot's own POP3 server -------------------------------------------------------

const DOVECOT_MSG1: &[u8] =
    b"From: a@example.org\r\nSubject: dovecot one\r\n\r\nHello\r\n.leading dot\r\n";
const DOVECOT_MSG2: &[u8] = b"From: b@example.org\nSubject: dovecot two\n\nbare LF on disk\n";

fn dovecot() -> Dovecot {
    let dovecot = Dovecot::start();
    dovecot.deliver("alice", "INBOX", DOVECOT_MSG1);
    dovecot.deliver("alice", "INBOX", DOVECOT_MSG2);
    dovecot
}

#[test]
fn dovecot_plain() {
    let dovecot = dovecot();
    let port = dovecot.pop3_port.to_string();
    let out = alice(&port, &["-H", "127.0.0.1", "--all"]);
    let o = assert_passed(&out, "alice-pw");
    assert!(o.contains("<<< Subject: dovecot one\n"), "{o}");
    assert!(o.contains("<<< Subject: dovecot two\n"), "{o}");
    assert!(!o.contains("*** TLS"), "{o}");
}

#[test]
fn dovecot_delete_removes_message_1() {
    let dovecot = dovecot();
    let port = dovecot.pop3_port.to_string();
    let out = alice(&port, &["-H", "127.0.0.1", "-d"]);
    assert_passed(&out, "alice-pw");
    assert_eq!(dovecot.mailbox_status("alice", "INBOX", "messages"), "1");
}

#[test]
fn dovecot_pop3s_with_ca() {
    let dovecot = dovecot();
    let port = dovecot.pop3s_port.to_string();
    let ca = dovecot.ca_cert_path().to_str().unwrap().to_string();
    let out = alice(&port, &["-s", "-H", "127.0.0.1", "--ca", &ca]);
    let o = assert_passed(&out, "alice-pw");
    assert!(o.starts_with("*** TLS started\n<<< +OK"), "{o}");
}

#[test]
fn dovecot_pop3s_without_ca_fails_on_the_certificate() {
    let dovecot = dovecot();
    let port = dovecot.pop3s_port.to_string();
    let out = alice(&port, &["-s", "-H", "127.0.0.1"]);
    let e = assert_failed(&out, "FAILED: TLS handshake with 127.0.0.1 failed");
    assert!(e.contains("certificate verify failed"), "{e}");
    assert!(e.contains("--ca FILE"), "{e}");
    assert!(stdout(&out).is_empty(), "nothing was exchanged");
}

#[test]
fn dovecot_pop3s_insecure_works_and_warns() {
    let dovecot = dovecot();
    let port = dovecot.pop3s_port.to_string();
    let out = alice(&port, &["-s", "-H", "127.0.0.1", "--insecure"]);
    assert_passed(&out, "alice-pw");
    assert!(
        stderr(&out).contains("WARNING: --insecure"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn dovecot_stls_with_ca() {
    let dovecot = dovecot();
    let port = dovecot.pop3_port.to_string();
    let ca = dovecot.ca_cert_path().to_str().unwrap().to_string();
    // By name this time, so the certificate's DNS name is what gets checked.
    let out = alice(&port, &["--stls", "-H", "localhost", "--ca", &ca]);
    let o = assert_passed(&out, "alice-pw");
    assert!(o.contains(">>> STLS\n<<< +OK"), "{o}");
    let after_tls = o.split("*** TLS started\n").nth(1).expect("TLS started");
    assert!(
        after_tls.starts_with(">>> CAPA\n"),
        "CAPA again after STLS:\n{o}"
    );
}

// Against aiopopd itself, run per connection by systemd-socket-activate as in production.

fn aiopopd_args(d: &Dovecot, tls: Option<bool>) -> Vec<String> {
    let mut a = common::pop3::args(d);
    // Dovecot's passwd-file holds {PLAIN} passwords: CRAM-MD5 can be relayed.
    a.extend(["--sasl".to_string(), "PLAIN,LOGIN,CRAM-MD5".to_string()]);
    // The certificate is Dovecot's test one, valid for localhost.
    a.retain(|s| s != "pop.test");
    a.retain(|s| s != "-d");
    a.extend(["-d".to_string(), "localhost".to_string()]);
    if let Some(stls) = tls {
        a.retain(|s| s != "--allow-plaintext-auth");
        a.extend([
            "--ssl-cert".to_string(),
            d.ca_cert_path().to_str().unwrap().to_string(),
            "--ssl-key".to_string(),
            d.dir().join("key.pem").to_str().unwrap().to_string(),
        ]);
        if stls {
            a.push("--stls".to_string());
        }
    }
    a
}

fn against_aiopopd(tls: Option<bool>, extra: &[&str]) -> (Dovecot, Output) {
    let d = dovecot();
    let act = common::activate::Activator::start(true, &aiopopd_args(&d, tls));
    let port = act.port.to_string();
    let ca = d.ca_cert_path().to_str().unwrap().to_string();
    let mut args = vec![
        "-H",
        "localhost",
        "-n",
        &port,
        "-u",
        "alice",
        "-p",
        "plain:alice-pw",
    ];
    match tls {
        Some(false) => args.extend(["-s", "--ca", &ca]),
        Some(true) => args.extend(["--stls", "--ca", &ca]),
        None => {}
    }
    args.extend(extra);
    let out = run(&args);
    drop(act);
    (d, out)
}

#[test]
fn aiopopd_plain() {
    let (_d, out) = against_aiopopd(None, &["--all"]);
    assert_passed(&out, "alice-pw");
}

#[test]
fn aiopopd_implicit_tls() {
    let (_d, out) = against_aiopopd(Some(false), &["--all"]);
    assert_passed(&out, "alice-pw");
}

#[test]
fn aiopopd_stls() {
    let (_d, out) = against_aiopopd(Some(true), &["--all"]);
    let text = assert_passed(&out, "alice-pw");
    assert!(text.contains("STLS"), "{text}");
}

#[test]
fn aiopopd_delete_applies_the_on_dele_action() {
    // The default --on-dele seen: message 1 gets \Seen, nothing is removed.
    let (d, out) = against_aiopopd(None, &["-d"]);
    assert_passed(&out, "alice-pw");
    let flags = d.flags("alice", "INBOX");
    assert_eq!(flags.len(), 2);
    assert_eq!(flags[0].1, vec!["\\Seen".to_string()]);
    assert!(flags[1].1.is_empty());
}

#[test]
fn a_message_without_a_final_line_end_is_accepted_with_a_note() {
    let d = Dovecot::start();
    d.deliver(
        "alice",
        "INBOX",
        b"Subject: no final newline\r\n\r\nlast line",
    );
    let act = common::activate::Activator::start(true, &common::pop3::args(&d));
    let port = act.port.to_string();
    let out = alice(&port, &["-H", "127.0.0.1", "--all"]);
    let text = assert_passed(&out, "alice-pw");
    assert!(text.contains("*** (2 octets more than listed"), "{text}");
}

#[test]
fn aiopopd_with_sasl_plain_and_cram_md5() {
    for mech in ["PLAIN", "CRAM-MD5"] {
        let (_d, out) = against_aiopopd(None, &["--auth", mech]);
        let text = assert_passed(&out, "alice-pw");
        assert!(text.contains(&format!(">>> AUTH {mech}")), "{text}");
    }
    let d = dovecot();
    let act = common::activate::Activator::start(true, &aiopopd_args(&d, None));
    let port = act.port.to_string();
    let out = run(&[
        "-H",
        "localhost",
        "-n",
        &port,
        "-u",
        "alice",
        "-p",
        "plain:nope",
        "--auth",
        "CRAM-MD5",
    ]);
    assert_failed(
        &out,
        "the server refused the login: -ERR [AUTH] Authentication failed.",
    );
}
