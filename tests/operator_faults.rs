//! The operator's mistakes are not the user's (issue 15): a `--user-dir` that is missing or
//! unreadable, a broken user file, a certificate STLS can't load. Each must give the client a
//! clear `-ERR [SYS/...]` and the log a line naming the path and the problem, never `-ERR
//! [AUTH]` or a `login failed:` line (which the shipped fail2ban filter counts against the
//! client). Also: refusals take the same time whether or not the user name exists, and a
//! cancelled AUTH is not a bad command. The built aiopopd runs on a pipe, its log on stderr.

mod common;

use common::dovecot::Dovecot;
use common::pop3::{args, replies, run, user_dir, BIN};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// `user_dir`'s arguments with `--auth-failure-delay SECS` instead of its 0.
fn user_dir_args(args: &[String], delay: &str) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(x) = it.next() {
        if x == "--auth-failure-delay" {
            it.next();
        } else {
            a.push(x.clone());
        }
    }
    a.extend(["--auth-failure-delay".into(), delay.into()]);
    a
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Runs aiopopd as an unprivileged user (nobody) when the tests run as root, so that file
/// permissions apply to it; as the current user otherwise.
fn run_unprivileged(a: &[String], script: &str) -> common::pop3::Run {
    if !is_root() {
        return run(a, script.as_bytes());
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(a)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .expect("setpriv aiopopd");
    common::pop3::Run {
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        ok: out.status.success(),
    }
}

/// A user-file path's mode (for the unprivileged run: only root's own access is taken away).
fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

const LOGIN: &str = "USER alice\r\nPASS alice-pw\r\nQUIT\r\n";

/// The login's reply and the log, checked: the server's fault, not a failed login.
fn assert_server_fault(r: &common::pop3::Run, script: &str, in_log: &[&str]) {
    let rs = replies(&r.stdout, script);
    assert!(
        rs[2].status.starts_with("-ERR [SYS/PERM] "),
        "{rs:?}\n{}",
        r.stderr
    );
    assert!(!r.stderr.contains("login failed:"), "{}", r.stderr);
    for s in in_log {
        assert!(r.stderr.contains(s), "{s:?} not in the log:\n{}", r.stderr);
    }
    assert!(r.ok);
}

#[test]
fn a_missing_or_unreadable_user_dir_is_a_server_fault_for_every_user() {
    let d = Dovecot::start();
    let (dir, a) = user_dir(&d, "alice", None);
    // Missing: known and unknown names alike.
    let gone = dir.path().join("gone");
    let gone_args: Vec<String> = a
        .iter()
        .map(|x| match x == dir.path().to_str().unwrap() {
            true => gone.to_str().unwrap().to_string(),
            false => x.clone(),
        })
        .collect();
    for script in [LOGIN, "USER nobody\r\nPASS x\r\nQUIT\r\n"] {
        let r = run(&gone_args, script.as_bytes());
        let what = format!("--user-dir {}: No such file or directory", gone.display());
        assert_server_fault(&r, script, &[&what]);
    }
    // Not a directory.
    std::fs::write(&gone, "").unwrap();
    let r = run(&gone_args, LOGIN.as_bytes());
    assert_server_fault(&r, LOGIN, &["Not a directory"]);
    // A directory aiopopd may not search.
    chmod(dir.path(), 0o700);
    if !is_root() {
        chmod(dir.path(), 0o000);
    }
    let r = run_unprivileged(&a, LOGIN);
    chmod(dir.path(), 0o755);
    let what = format!("--user-dir {}: Permission denied", dir.path().display());
    assert_server_fault(&r, LOGIN, &[&what]);
    // The directory fine: an unknown name is a failed login as before, a known one works.
    let script = "USER bob\r\nPASS x\r\nQUIT\r\n";
    let r = run(&a, script.as_bytes());
    let rs = replies(&r.stdout, script);
    assert_eq!(rs[2].status, "-ERR [AUTH] Authentication failed.");
    assert!(
        r.stderr
            .contains("login failed: user=bob rip=pipe reason=authentication failed: unknown user"),
        "{}",
        r.stderr
    );
    let r = run(&a, LOGIN.as_bytes());
    assert!(replies(&r.stdout, LOGIN)[2].ok(), "{}", r.stderr);
}

#[test]
fn a_broken_user_file_is_a_server_fault_naming_the_file() {
    let d = Dovecot::start();
    let (dir, a) = user_dir(&d, "alice", None);
    let file = dir.path().join("alice");
    let good = std::fs::read_to_string(&file).unwrap();
    let cases: &[(&str, &str)] = &[
        (r#"{"hostname": "127.0.0.1", "port": "#, "EOF while parsing"),
        (
            r#"{"hostname": "127.0.0.1", "port": 143, "mailbx": "x"}"#,
            "unknown field `mailbx`",
        ),
        (
            r#"{"hostname": "127.0.0.1", "port": 143, "ssl": false, "username": ""}"#,
            "\"username\" must be",
        ),
        (
            r#"{"hostname": "127.0.0.1", "port": 0}"#,
            "\"port\" must be",
        ),
    ];
    for (text, problem) in cases {
        std::fs::write(&file, text).unwrap();
        let r = run(&a, LOGIN.as_bytes());
        let what = format!(
            "user=alice login: permanent failure: user file {}: ",
            file.display()
        );
        assert_server_fault(&r, LOGIN, &[&what, problem]);
    }
    // Not a regular file; a symbolic link to nothing.
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    assert_server_fault(&run(&a, LOGIN.as_bytes()), LOGIN, &["not a regular file"]);
    std::fs::remove_dir(&file).unwrap();
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &file).unwrap();
    assert_server_fault(&run(&a, LOGIN.as_bytes()), LOGIN, &["symbolic link"]);
    // Unreadable.
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, &good).unwrap();
    chmod(dir.path(), 0o755);
    chmod(&file, if is_root() { 0o600 } else { 0o000 });
    let r = run_unprivileged(&a, LOGIN);
    let what = format!("user file {}: Permission denied", file.display());
    assert_server_fault(&r, LOGIN, &[&what]);
}

/// One refused login, timed from sending PASS to reading the reply.
fn refusal_time(a: &[String], user: &str) -> (Duration, String) {
    let mut child = Command::new(BIN)
        .args(a)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start aiopopd");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    write!(stdin, "USER {user}\r\n").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("+OK"), "{line}");
    let start = Instant::now();
    write!(stdin, "PASS wrong-password\r\n").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let took = start.elapsed();
    assert_eq!(line, "-ERR [AUTH] Authentication failed.\r\n");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (took, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Both refusals, at the same time (in parallel: the test takes one delay, not two).
fn known_and_unknown(a: &[String]) -> [(Duration, String); 2] {
    std::thread::scope(|s| {
        let known = s.spawn(|| refusal_time(a, "alice"));
        let unknown = s.spawn(|| refusal_time(a, "bob"));
        [known.join().unwrap(), unknown.join().unwrap()]
    })
}

/// An existing `--user-dir` user's refusal waits for the IMAP server; an unknown name's
/// never asks it. The answer must not tell them apart: `--auth-failure-delay` is a floor from
/// when PASS arrived, not a wait added after the refusal. This Dovecot takes about a second to
/// refuse (its own auth_failure_delay), so with aiopopd's delay at 0 the two differ by that
/// much (the timing oracle); with aiopopd's default of 2 s they must not. Not a timed test in
/// the flaky sense: only lower bounds, and a difference well under the oracle's.
#[test]
fn known_and_unknown_user_names_are_refused_after_the_same_time() {
    // A fresh Dovecot for each round: it adds a penalty to repeated failures from one address.
    let dovecot = || Dovecot::start_with_config("auth_failure_delay = 1 secs\n");
    let margin = Duration::from_millis(250);

    let d = dovecot();
    let (_dir, base) = user_dir(&d, "alice", None);
    let [(known, log), (unknown, _)] = known_and_unknown(&user_dir_args(&base, "0"));
    assert!(
        known >= unknown + margin + Duration::from_millis(100),
        "the set-up must show the oracle: known {known:?}, unknown {unknown:?}\n{log}"
    );
    let imap_refusal = known;

    let d = dovecot();
    let (_dir, base) = user_dir(&d, "alice", None);
    let delay = Duration::from_secs(2);
    let [(known, klog), (unknown, ulog)] = known_and_unknown(&user_dir_args(&base, "2"));
    assert!(
        imap_refusal < delay,
        "Dovecot took {imap_refusal:?}: beyond the delay"
    );
    assert!(known >= delay && unknown >= delay, "{known:?} {unknown:?}");
    let diff = known.abs_diff(unknown);
    eprintln!("refusals: Dovecot alone {imap_refusal:?}; known {known:?}, unknown {unknown:?}");
    assert!(
        diff < margin,
        "known {known:?} and unknown {unknown:?} differ by {diff:?}\n{klog}"
    );
    // Both are failed logins for fail2ban; only the known one reached the IMAP server.
    assert!(klog.contains("login failed: user=alice rip=pipe reason=authentication failed: "));
    assert!(
        ulog.contains("login failed: user=bob rip=pipe reason=authentication failed: unknown user")
    );
}

/// aiopopd on a pipe, spoken to one command at a time (STLS must not be pipelined).
struct Lockstep {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Lockstep {
    fn start(a: &[String]) -> Lockstep {
        let mut child = Command::new(BIN)
            .args(a)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start aiopopd");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut s = Lockstep {
            child,
            stdin,
            stdout,
        };
        assert!(s.line().starts_with("+OK"));
        s
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        assert!(l.ends_with("\r\n"), "{l:?}");
        l.truncate(l.len() - 2);
        l
    }

    fn ask(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        write!(stdin, "{command}\r\n").unwrap();
        self.line()
    }

    /// The lines of a multi-line reply after its status line.
    fn body(&mut self) -> Vec<String> {
        std::iter::from_fn(|| Some(self.line()))
            .take_while(|l| l != ".")
            .collect()
    }

    /// Closes stdin; the exit status and the log.
    fn finish(mut self) -> (bool, String) {
        drop(self.stdin.take());
        let out = self.child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn stls_args(d: &Dovecot, cert: &Path, key: &Path) -> Vec<String> {
    let mut a = args(d);
    a.retain(|x| x != "--allow-plaintext-auth");
    a.extend([
        "--stls".into(),
        "--ssl-cert".into(),
        cert.to_str().unwrap().into(),
        "--ssl-key".into(),
        key.to_str().unwrap().into(),
        "--timeout".into(),
        "30".into(),
    ]);
    a
}

/// A certificate or key STLS can't load: `-ERR` in clear, and a log line naming the file and
/// the problem, not a closed connection. CAPA still lists STLS (what is configured doesn't
/// change with a file read: a client that saw no STLS might tell its user to turn TLS off), and
/// the next connection uses the files once they are fixed.
#[test]
fn stls_with_a_certificate_that_cant_be_loaded_answers_err_in_clear() {
    let d = Dovecot::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let err = "-ERR [SYS/TEMP] TLS is not available; try again later.";
    let a = stls_args(&d, &cert, &key);

    // Both missing.
    let mut s = Lockstep::start(&a);
    assert!(s.ask("CAPA").starts_with("+OK"));
    assert!(s.body().contains(&"STLS".to_string()));
    assert_eq!(s.ask("STLS"), err);
    // Not a bad command, and the session goes on in clear (without USER: no TLS yet).
    assert_eq!(s.ask("STLS"), err);
    assert_eq!(s.ask("STLS"), err);
    assert_eq!(s.ask("NOOP"), "+OK");
    assert!(s.ask("USER alice").starts_with("-ERR [AUTH] Plaintext"));
    assert_eq!(s.ask("QUIT"), "+OK Bye.");
    let (ok, log) = s.finish();
    assert!(ok, "{log}");
    let want = format!(
        "STLS refused: TLS is not available: reading certificates from {}: ",
        cert.display()
    );
    assert!(
        log.contains(&want) && log.contains("No such file or directory"),
        "{log}"
    );

    // The certificate in place, the key not a key.
    std::fs::copy(d.ca_cert_path(), &cert).unwrap();
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nnot base64\n").unwrap();
    let mut s = Lockstep::start(&a);
    assert_eq!(s.ask("STLS"), err);
    assert_eq!(s.ask("QUIT"), "+OK Bye.");
    let (_, log) = s.finish();
    assert!(
        log.contains(&format!("reading the private key from {}", key.display())),
        "{log}"
    );

    // Fixed: the next connection starts TLS.
    std::fs::copy(d.dir().join("key.pem"), &key).unwrap();
    let mut s = Lockstep::start(&a);
    assert_eq!(s.ask("STLS"), "+OK Begin TLS negotiation.");
    let (_, log) = s.finish();
    assert!(!log.contains("STLS refused"), "{log}");
}

/// RFC 5034: `*` cancels an AUTH exchange. That is the client's right, not a bad command: it
/// gets `-ERR`, doesn't count against the bad-command budget, and isn't a failed login; a login
/// after it works. Also for a relayed mechanism (the challenge came from Dovecot).
#[test]
fn a_cancelled_auth_is_not_a_bad_command() {
    let d = Dovecot::start();
    // "\0alice\0alice-pw"
    let plain = "AGFsaWNlAGFsaWNlLXB3";
    let script = format!(
        "FOO\r\nBAR\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN\r\nYWxpY2U=\r\n*\r\nAUTH CRAM-MD5\r\n*\r\n\
         AUTH PLAIN\r\n*\r\nNOOP\r\nAUTH PLAIN {plain}\r\nSTAT\r\nQUIT\r\n"
    );
    let r = common::pop3::session(&d, &["--sasl", "PLAIN,LOGIN,CRAM-MD5"], &script);
    let out = String::from_utf8_lossy(&r.stdout);
    let status: Vec<&str> = out
        .split("\r\n")
        .filter(|l| l.starts_with("+OK") || l.starts_with("-ERR"))
        .collect();
    assert_eq!(
        status[1..],
        [
            "-ERR Unknown command.",
            "-ERR Unknown command.",
            "-ERR Authentication cancelled.",
            "-ERR Authentication cancelled.",
            "-ERR Authentication cancelled.",
            "-ERR Authentication cancelled.",
            "+OK",
            "+OK Logged in, 0 messages.",
            "+OK 0 0",
            "+OK pop.test POP3 proxy signing off.",
        ],
        "{out}\n{}",
        r.stderr
    );
    assert!(!r.stderr.contains("login failed:"), "{}", r.stderr);
}

const CLIENT: &str = env!("CARGO_BIN_EXE_aiopopd-client");

/// aiopopd-client's summary goes to stderr, stdout stays the transcript alone, and without a
/// terminal there is no progress line.
#[test]
fn the_client_summarises_on_stderr_and_leaves_stdout_alone() {
    let d = Dovecot::start();
    d.deliver("alice", "INBOX", b"Subject: one\r\n\r\nbody\r\n");
    d.deliver(
        "alice",
        "INBOX",
        &[&b"Subject: two\r\n\r\n"[..], &[b'x'; 5000], b"\r\n"].concat(),
    );
    let out = Command::new(CLIENT)
        .args([
            "-H",
            "127.0.0.1",
            "-n",
            &d.pop3_port.to_string(),
            "-u",
            "alice",
        ])
        .args(["-p", "plain:alice-pw", "--all", "--timeout", "10"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{o}\n{e}");
    let passed = "*** check passed: every step succeeded and every reply was well-formed\n";
    assert!(o.ends_with(passed), "{o}");
    assert!(!o.contains("retrieved"), "{o}");
    let summary = e.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("aiopopd-client: 2 messages retrieved, 5040 octets in ")
            && summary.contains("/s); session "),
        "{e}"
    );
    assert!(!e.contains('\r') && e.lines().count() == 1, "{e:?}");
}

/// A POP3 server that sends message 1 (`size` octets) in `pieces` parts, `gap` apart.
fn slow_server(size: usize, pieces: usize, gap: Duration) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let mut w = sock.try_clone().unwrap();
        let mut r = BufReader::new(sock);
        let body: Vec<u8> = (0..size / 64)
            .flat_map(|_| [[b'y'; 62].as_slice(), b"\r\n"].concat())
            .collect();
        w.write_all(b"+OK ready\r\n").unwrap();
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let cmd = line.trim_end().to_string();
            line.clear();
            let reply = match cmd.as_str() {
                "CAPA" => "-ERR\r\n".to_string(),
                "STAT" => format!("+OK 1 {}\r\n", body.len()),
                "LIST" => format!("+OK\r\n1 {}\r\n.\r\n", body.len()),
                "UIDL" => "+OK\r\n1 a\r\n.\r\n".to_string(),
                "RETR 1" => {
                    w.write_all(b"+OK\r\n").unwrap();
                    for part in body.chunks(body.len().div_ceil(pieces)) {
                        std::thread::sleep(gap);
                        w.write_all(part).unwrap();
                    }
                    ".\r\n".to_string()
                }
                _ => "+OK\r\n".to_string(),
            };
            w.write_all(reply.as_bytes()).unwrap();
        }
    });
    port
}

/// On a terminal (here a pseudo-terminal from `script`), a RETR that takes 1.6 s shows a
/// progress line redrawn in place at most four times a second, erased at the end.
#[test]
fn the_client_shows_progress_on_a_terminal_during_a_long_retr() {
    let port = slow_server(64 << 10, 16, Duration::from_millis(100));
    let cmd = format!("{CLIENT} -H 127.0.0.1 -n {port} -u alice -p plain:pw --timeout 10");
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script(1)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let draws = text.matches("\rRETR 1: ").count();
    assert!((2..=7).contains(&draws), "{draws} draws:\n{text:?}");
    assert!(text.contains(" of 64.0 KiB ("), "{text:?}");
    assert!(text.contains("\r\x1b[K"), "erased: {text:?}");
    assert!(text.contains("aiopopd-client: 1 message retrieved, 65536 octets in "));
}

/// Implicit TLS (no --stls) with a certificate or key that can't be loaded: nothing can be said
/// to the client before its TLS hello, so it gets nothing at all (no clear-text `-ERR` that
/// would be garbage to a TLS client), and the log exactly one line naming the file and the
/// problem.
#[test]
fn implicit_tls_with_a_certificate_that_cant_be_loaded_logs_one_line_and_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (cert, key, missing, not_pem) = (p("cert.pem"), p("key.pem"), p("gone.pem"), p("x.pem"));
    let pair = rcgen::generate_simple_self_signed(vec!["pop.test".to_string()]).unwrap();
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
    std::fs::write(&not_pem, "this is not PEM\n").unwrap();
    let cases = [
        (
            &missing,
            &key,
            format!("TLS: reading certificates from {missing}: "),
            "No such file or directory",
        ),
        (
            &not_pem,
            &key,
            format!("TLS: no certificate in {not_pem}"),
            "",
        ),
        (
            &cert,
            &missing,
            format!("TLS: reading the private key from {missing}: "),
            "No such file or directory",
        ),
        (
            &cert,
            &not_pem,
            format!("TLS: no private key in {not_pem} "),
            "(expected a PEM block such as BEGIN PRIVATE KEY)",
        ),
    ];
    for (c, k, what, problem) in cases {
        // The IMAP server is never reached: no Dovecot needed.
        let a: Vec<String> = ["-H", "127.0.0.1", "-l", "--ssl-cert", c, "--ssl-key", k]
            .map(String::from)
            .to_vec();
        // What a confused client might send in clear; a TLS client's hello gets the same.
        let r = run(&a, b"CAPA\r\nQUIT\r\n");
        assert!(
            r.stdout.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&r.stdout)
        );
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{}", r.stderr);
        assert!(
            lines[0].starts_with(&format!("<3>{what}")) && lines[0].contains(problem),
            "{what:?} {problem:?} not in {:?}",
            lines[0]
        );
        assert!(!r.ok, "the operator's fault, not a session that ended well");
    }
}

/// Runs `cmd` (a shell command) on a pseudo-terminal, as someone trying it by hand would;
/// `input` is typed at the given times. The terminal's output, `\r\n` made `\n`.
fn on_a_terminal(cmd: &str, input: &[(Duration, &[u8])]) -> String {
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("script(1)");
    let mut stdin = child.stdin.take().unwrap();
    let start = Instant::now();
    for (at, bytes) in input {
        std::thread::sleep(at.saturating_sub(start.elapsed()));
        // It may have finished already.
        let _ = stdin.write_all(bytes);
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n")
}

/// `cmd` run by hand: its exit status and, after it, whether the terminal (the shared open
/// file, so also the shell's) is still in O_NONBLOCK, which breaks the programs run after it.
/// Both are written to files, not the terminal, so they survive a terminal left stopped or
/// non-blocking.
fn by_hand(cmd: &str, input: &[(Duration, &[u8])]) -> (String, Option<i32>, bool) {
    let dir = tempfile::tempdir().unwrap();
    let (status, flags) = (dir.path().join("status"), dir.path().join("flags"));
    let script = format!(
        "{cmd}; echo $? >{}; grep ^flags: /proc/self/fdinfo/0 >{}",
        status.display(),
        flags.display()
    );
    let text = on_a_terminal(&script, input);
    let code = std::fs::read_to_string(&status)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let flags = std::fs::read_to_string(&flags).unwrap_or_default();
    let flags = flags.trim_start_matches("flags:").trim();
    let nonblocking = u32::from_str_radix(flags, 8).expect("fdinfo flags") & 0o4000 != 0;
    (text, code, nonblocking)
}

/// A configuration error at a terminal: the explanation with its fix, whole, and status 2;
/// no POP3 `-ERR` line (there is no client); the terminal as it was.
#[test]
fn configuration_errors_at_a_terminal_explain_the_fix() {
    let (text, code, nonblocking) = by_hand(BIN, &[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.starts_with("aiopopd: -H/--imap-hostname HOST is required (or --user-dir DIR)"),
        "{text:?}"
    );
    assert!(
        text.ends_with(
            "Try the options first with: aiopopd --check -H imap.example.com -s\n\
             (see aiopopd --help)\n"
        ),
        "{text:?}"
    );
    assert!(!text.contains("-ERR"), "{text:?}");
    assert!(!nonblocking, "the terminal was left non-blocking");

    let (text, code, nonblocking) = by_hand(&format!("{BIN} -P 9955 -H localhost"), &[]);
    assert_eq!(code, Some(2), "{text}");
    for fix in [
        "aiopopd: option -P/--listen-port: those are the Python aiopopd's listener options.",
        &format!(
            "\n    systemd-socket-activate -l 127.0.0.1:9955 --accept --inetd {BIN} -H localhost\n"
        ),
        "[Socket]  ListenStream=127.0.0.1:9955  Accept=yes\n",
        &format!("[Service] ExecStart={BIN} -H localhost -l\n"),
        &format!("server = {BIN}  server_args = -H localhost\n"),
        "\nThen try the options with: aiopopd --check -H localhost\n(see aiopopd --help)\n",
    ] {
        assert!(text.contains(fix), "{fix:?} not in:\n{text}");
    }
    assert!(text.ends_with("(see aiopopd --help)\n"), "{text:?}");
    assert!(!text.contains("-ERR"), "{text:?}");
    assert!(!nonblocking, "the terminal was left non-blocking");
}

/// The same with the terminal's output stopped (Ctrl-S) while aiopopd explains, as when the
/// person scrolls back: the explanation waits for Ctrl-Q and then arrives whole. A write to a
/// terminal left in O_NONBLOCK fails instead (EAGAIN), and the text is lost.
#[test]
fn a_configuration_error_at_a_stopped_terminal_waits_and_arrives_whole() {
    let (ctrl_s, ctrl_q) = (&b"\x13"[..], &b"\x11"[..]);
    let cmd = format!("sleep 0.3; {BIN} -P 9955 -H localhost");
    let input = [
        (Duration::ZERO, ctrl_s),
        (Duration::from_millis(1300), ctrl_q),
    ];
    let (text, code, nonblocking) = by_hand(&cmd, &input);
    assert_eq!(code, Some(2), "{text:?}");
    assert!(
        text.starts_with("aiopopd: option -P/--listen-port: "),
        "{text:?}"
    );
    assert!(text.ends_with("(see aiopopd --help)\n"), "{text:?}");
    assert!(!nonblocking, "the terminal was left non-blocking");
}

/// A configuration error under systemd's StandardError=journal ($JOURNAL_STREAM names fd 2):
/// one log entry per line of the explanation, each with the error priority prefix, and the fix
/// in full; the client (stdout) its one `-ERR` line. With $JOURNAL_STREAM naming another file,
/// stderr is not the journal: plain text, no prefixes.
#[test]
fn configuration_errors_in_the_journal_are_one_entry_per_line() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("journal");
    std::fs::File::create(&log).unwrap();
    let run_with = |journal_stream: String| {
        let stderr = std::fs::File::create(&log).unwrap();
        let out = Command::new(BIN)
            .args(["-P", "9955", "-H", "localhost"])
            .env("JOURNAL_STREAM", journal_stream)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert_eq!(
            out.stdout,
            b"-ERR [SYS/PERM] aiopopd is misconfigured; see the server log.\r\n"
        );
        std::fs::read_to_string(&log).unwrap()
    };
    let m = std::fs::metadata(&log).unwrap();
    let text = run_with(format!("{}:{}", m.dev(), m.ino()));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0], "<3>configuration error (the fix follows):",
        "{text}"
    );
    assert!(
        lines.iter().all(|l| l.starts_with("<3>") && l.len() > 3),
        "{text}"
    );
    for fix in [
        "\n<3>option -P/--listen-port: those are the Python aiopopd's listener options.",
        &format!("\n<3>    systemd-socket-activate -l 127.0.0.1:9955 --accept --inetd {BIN} -H localhost\n"),
        "[Socket]  ListenStream=127.0.0.1:9955  Accept=yes\n",
        &format!("[Service] ExecStart={BIN} -H localhost -l\n"),
        &format!("server = {BIN}  server_args = -H localhost\n"),
        "\n<3>Then try the options with: aiopopd --check -H localhost\n",
    ] {
        assert!(text.contains(fix), "{fix:?} not in:\n{text}");
    }

    let d = std::fs::metadata(dir.path()).unwrap();
    let text = run_with(format!("{}:{}", d.dev(), d.ino()));
    assert!(
        text.starts_with("aiopopd: option -P/--listen-port: "),
        "{text}"
    );
    assert!(!text.contains("<3>"), "{text}");
    assert!(text.ends_with("(see aiopopd --help)\n"), "{text}");
}
