//! Hostile input (issue 8): the corpus in `tests/hostile/` (one case per file, format in its
//! README), plus what doesn't fit a transcript: memory while a 100 MB line streams in, IMAP
//! injection through credentials, and a distinctive password that must never reach the log.
//!
//! Every run is against a scripted fake IMAP server (`common::fakeimap`), so "nothing changed"
//! and "nothing injected" are read off the commands it received. Every wait is bounded.

mod common;

use common::fakeimap::{
    base64_encode, peak_rss_kib, run_within, secret_forms, status_lines, Act, Aiopopd, FakeImap,
    Finished, GREETING, MUTATING,
};
use common::pop3::BIN;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The longest one case may take before it counts as a hang.
const LIMIT: Duration = Duration::from_secs(20);

/// The fake's mailbox: three small messages, the second with dot-lines.
fn fake_builder() -> common::fakeimap::Builder {
    FakeImap::builder()
        .message(b"Subject: one\r\n\r\nfirst body\r\n")
        .message(b"Subject: two\r\n\r\n.a dot line\r\n..two dots\r\n.\r\nend\r\n")
        .message(b"Subject: three\r\nX: y\r\n\r\nl1\r\nl2\r\nl3\r\n")
}

/// IMAP commands a POP3 session may send (besides the mutations a case allows).
const SESSION_VERBS: &[&str] = &[
    "CAPABILITY",
    "LOGIN",
    "AUTHENTICATE",
    "EXAMINE",
    "SELECT",
    "FETCH",
    "UID FETCH",
    "LOGOUT",
];

#[derive(Debug, Default)]
struct Case {
    name: String,
    input: Vec<u8>,
    /// (count, prefix) of the expected status lines, in order.
    expect: Vec<(usize, String)>,
    logs: Vec<String>,
    nologs: Vec<String>,
    nologlines: Vec<String>,
    changes: Vec<String>,
    logins: Option<usize>,
    args: Vec<String>,
    tls: Option<String>,
    socket: bool,
    faults: Vec<(String, Act)>,
}

fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = *b.get(i + 1).ok_or("a lone backslash at the end")?;
        i += 2;
        match c {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'0' => out.push(0),
            b'\\' => out.push(b'\\'),
            b'x' => {
                let hex = s.get(i..i + 2).ok_or("\\x needs two hex digits")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|e| format!("\\x{hex}: {e}"))?);
                i += 2;
            }
            c => return Err(format!("unknown escape \\{}", c as char)),
        }
    }
    Ok(out)
}

/// An IMAP tag as aiopopd makes them: letters, then a number (`a1`, `p1`).
fn is_tag(tag: &str) -> bool {
    let digits = tag.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    digits.len() < tag.len() && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

fn parse_case(name: &str, text: &str) -> Result<Case, String> {
    let mut c = Case {
        name: name.to_string(),
        ..Case::default()
    };
    for (no, line) in text.lines().enumerate() {
        let err = |e: String| format!("{name}:{}: {e}", no + 1);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once(' ')
            .ok_or_else(|| err(format!("no directive: {line:?}")))?;
        let count_and_rest = |v: &str| -> Result<(usize, String), String> {
            let (n, rest) = v.split_once(' ').unwrap_or((v, ""));
            let n = n.parse().map_err(|e| err(format!("count {n:?}: {e}")))?;
            Ok((n, rest.to_string()))
        };
        match key {
            "C:" => {
                c.input.extend(unescape(value).map_err(err)?);
                c.input.extend_from_slice(b"\r\n");
            }
            "C>" => c.input.extend(unescape(value).map_err(err)?),
            "C*" => {
                let (n, text) = count_and_rest(value)?;
                let bytes = unescape(&text).map_err(err)?;
                for _ in 0..n {
                    c.input.extend_from_slice(&bytes);
                }
            }
            "C#" => {
                let hex: String = value.split_whitespace().collect();
                for i in (0..hex.len()).step_by(2) {
                    let byte = hex
                        .get(i..i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| err(format!("bad hex at {i}")))?;
                    c.input.push(byte);
                }
            }
            "S:" => c.expect.push((1, value.to_string())),
            "S*" => c.expect.push(count_and_rest(value)?),
            "log:" => c.logs.push(value.to_string()),
            "nolog:" => c.nologs.push(value.to_string()),
            "nologline:" => c.nologlines.push(value.to_string()),
            "changes:" => c.changes.push(value.to_string()),
            "logins:" => c.logins = Some(value.parse().map_err(|e| err(format!("logins: {e}")))?),
            "args:" => c.args.extend(value.split_whitespace().map(str::to_string)),
            "tls:" if value == "implicit" || value == "stls" => c.tls = Some(value.to_string()),
            "via:" if value == "socket" => c.socket = true,
            "fault:" => {
                let mut w = value.splitn(3, ' ');
                let (mut verb, mut act) = (w.next().unwrap_or("").to_string(), w.next());
                // Two-word verbs: UID FETCH, UID STORE.
                if verb == "UID" {
                    verb = format!("UID {}", act.unwrap_or(""));
                    act = w.next();
                }
                let text = value.rsplit(' ').next().unwrap_or("").to_string();
                let act = match act {
                    Some("no") => Act::No(text),
                    Some("bad") => Act::Bad(text),
                    Some("bye") => Act::Bye(text),
                    Some("close") => Act::Close,
                    Some("stall") => Act::Stall,
                    a => return Err(err(format!("unknown fault action {a:?}"))),
                };
                c.faults.push((verb, act));
            }
            _ => return Err(err(format!("unknown directive {key:?}"))),
        }
    }
    Ok(c)
}

/// What a run of a case produced.
struct Outcome {
    stdout: Vec<u8>,
    stderr: String,
    ok_exit: bool,
    elapsed: Duration,
}

fn tls_args(dir: &Path, mode: &str) -> Vec<String> {
    let mut a = vec![
        "--ssl-cert".to_string(),
        dir.join("cert.pem").to_str().unwrap().to_string(),
        "--ssl-key".to_string(),
        dir.join("key.pem").to_str().unwrap().to_string(),
        "--ssl-generate".to_string(),
    ];
    if mode == "stls" {
        a.push("--stls".to_string());
    }
    a
}

/// The client as a TCP socket handed to aiopopd on stdin and stdout (as inetd does); it sends
/// `input`, shuts down its write side, and reads until aiopopd closes.
fn run_over_socket(args: &[String], input: &[u8]) -> Result<Outcome, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let mut client =
        TcpStream::connect(listener.local_addr().unwrap()).map_err(|e| e.to_string())?;
    let (server, _) = listener.accept().map_err(|e| e.to_string())?;
    let fd_in: OwnedFd = server.try_clone().map_err(|e| e.to_string())?.into();
    let fd_out: OwnedFd = server.into();
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::from(fd_in))
        .stdout(Stdio::from(fd_out))
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut s);
        s
    });
    let mut writer = client.try_clone().map_err(|e| e.to_string())?;
    let input = input.to_vec();
    let w = thread::spawn(move || {
        let _ = writer.write_all(&input);
        let _ = writer.shutdown(Shutdown::Write);
    });
    client.set_read_timeout(Some(LIMIT)).unwrap();
    let mut stdout = Vec::new();
    let read = client.read_to_end(&mut stdout);
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("aiopopd did not exit within {LIMIT:?}"));
        }
        thread::sleep(Duration::from_millis(5));
    };
    read.map_err(|e| format!("reading from aiopopd: {e}"))?;
    let _ = w.join();
    Ok(Outcome {
        stdout,
        stderr: String::from_utf8_lossy(&stderr.join().unwrap()).into_owned(),
        ok_exit: status.success(),
        elapsed: started.elapsed(),
    })
}

fn run_case(c: &Case) -> Result<(), String> {
    let mut b = fake_builder();
    for (verb, act) in &c.faults {
        // Every time (a server that is down stays down across aiopopd's connections).
        for nth in 1..=20 {
            b = b.on_nth(verb, nth, act.clone());
        }
    }
    let fake = b.start();
    let tmp = tempfile::tempdir().unwrap();
    let mut args = fake.args();
    args.push("-v".to_string());
    args.extend(c.args.iter().cloned());
    if let Some(mode) = &c.tls {
        args.extend(tls_args(tmp.path(), mode));
    }
    let out = if c.socket {
        run_over_socket(&args, &c.input)?
    } else {
        let a = Aiopopd::spawn(&args);
        a.send(&c.input);
        let started = Instant::now();
        // finish() panics on a hang; turn that into this case's failure.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.finish(LIMIT)))
            .map_err(|_| format!("aiopopd did not exit within {LIMIT:?}"))?;
        Outcome {
            ok_exit: r.status.success(),
            stdout: r.stdout,
            stderr: r.stderr,
            elapsed: started.elapsed(),
        }
    };
    let mut problems = Vec::new();
    if out.stderr.contains("internal error") || out.stderr.contains("panicked") {
        problems.push("aiopopd panicked".to_string());
    }
    if !out.ok_exit {
        problems.push("aiopopd exited with an error status".to_string());
    }
    for line in out.stderr.lines() {
        let b = line.as_bytes();
        if !(b.len() >= 3 && b[0] == b'<' && b[1].is_ascii_digit() && b[2] == b'>') {
            problems.push(format!("a log line without a <N> priority: {line:?}"));
        }
    }
    // Status lines against the expectations.
    let got = status_lines(&out.stdout);
    let mut want = Vec::new();
    for (n, prefix) in &c.expect {
        want.extend(std::iter::repeat_n(prefix.as_str(), *n));
    }
    let mismatch = got.len() != want.len() || got.iter().zip(&want).any(|(g, w)| !g.starts_with(w));
    if mismatch {
        let first = got
            .iter()
            .zip(&want)
            .position(|(g, w)| !g.starts_with(w))
            .unwrap_or(got.len().min(want.len()));
        let show = |v: &[&str]| {
            v.iter()
                .skip(first.saturating_sub(2))
                .take(6)
                .map(|s| format!("    {s:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let got_s: Vec<&str> = got.iter().map(String::as_str).collect();
        problems.push(format!(
            "status lines differ from line {} on ({} expected, {} sent)\n  expected:\n{}\n  sent:\n{}",
            first + 1,
            want.len(),
            got.len(),
            show(&want),
            show(&got_s)
        ));
    }
    for l in &c.logs {
        if !out.stderr.contains(l.as_str()) {
            problems.push(format!("the log lacks {l:?}"));
        }
    }
    for l in &c.nologs {
        if out.stderr.contains(l.as_str()) {
            problems.push(format!("the log contains {l:?}"));
        }
    }
    for l in &c.nologlines {
        if out.stderr.lines().any(|line| line.starts_with(l.as_str())) {
            problems.push(format!("a log line starts with {l:?}"));
        }
    }
    // The IMAP side: nothing injected, nothing changed unless listed.
    for r in fake.received() {
        if !r.is_command {
            continue;
        }
        let line = String::from_utf8_lossy(&r.line);
        let tag = line.split(' ').next().unwrap_or("");
        let tag_ok = is_tag(tag);
        let verb = r.verb();
        let allowed = SESSION_VERBS.contains(&verb.as_str())
            || (MUTATING.contains(&verb.as_str()) && c.changes.contains(&r.command()));
        if !tag_ok || !allowed {
            problems.push(format!("unexpected IMAP command {line:?}"));
        }
    }
    if fake.changes() != c.changes {
        problems.push(format!(
            "IMAP changes {:?}, expected {:?}",
            fake.changes(),
            c.changes
        ));
    }
    let attempts = String::from_utf8_lossy(&c.input)
        .lines()
        .filter(|l| {
            let l = l.to_ascii_uppercase();
            l.starts_with("PASS ") || l.starts_with("AUTH ")
        })
        .count();
    match c.logins {
        Some(n) if fake.logins() != n => {
            problems.push(format!("{} IMAP logins, expected {n}", fake.logins()))
        }
        None if fake.logins() > attempts => problems.push(format!(
            "{} IMAP logins for {attempts} PASS/AUTH commands",
            fake.logins()
        )),
        _ => {}
    }
    if out.elapsed > Duration::from_secs(10) {
        problems.push(format!("took {:?}", out.elapsed));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}:\n  {}\n  log:\n{}",
            c.name,
            problems.join("\n  "),
            out.stderr
                .lines()
                .take(20)
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        ))
    }
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile")
}

fn load_corpus() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("tests/hostile")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "case"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(p).unwrap();
            parse_case(&name, &text).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

/// Runs every case of the corpus (four at a time) and reports all that fail.
#[test]
fn hostile_corpus() {
    let cases = load_corpus();
    assert!(cases.len() >= 60, "the corpus has {} cases", cases.len());
    let queue = Arc::new(Mutex::new(cases.iter().collect::<Vec<_>>()));
    let failures = Mutex::new(Vec::new());
    thread::scope(|s| {
        for _ in 0..4 {
            let (queue, failures) = (&queue, &failures);
            s.spawn(move || loop {
                let Some(c) = queue.lock().unwrap().pop() else {
                    return;
                };
                if let Err(e) = run_case(c) {
                    failures.lock().unwrap().push(e);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    let bytes: usize = cases.iter().map(|c| c.input.len()).sum();
    eprintln!(
        "hostile corpus: {} cases, {bytes} octets of input, {} failed",
        cases.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// The corpus format itself: escapes, repetition, hex.
#[test]
fn corpus_format_parses_as_documented() {
    let c = parse_case(
        "t",
        "# comment\nC: A\\r\\0\\x41\\\\\nC> B\nC* 3 ab\nC# 0d 0A\nS: +OK\nS* 2 -ERR\nlogins: 0\n",
    )
    .unwrap();
    assert_eq!(c.input, b"A\r\0A\\\r\nBababab\r\n");
    assert_eq!(c.expect, [(1, "+OK".into()), (2, "-ERR".into())]);
    assert_eq!(c.logins, Some(0));
    assert!(parse_case("t", "X: y\n").is_err());
    assert!(parse_case("t", "C: \\q\n").is_err());
}

/// Writes the fuzz targets' seed corpus (`fuzz/seeds/`, git-ignored) from this corpus, so the
/// fuzzers start from every shape of input the tests know. `scripts/fuzz` runs it first; as an
/// ordinary test it also keeps the seed writer working.
#[test]
fn write_fuzz_seeds() {
    const MAX: usize = 8 << 10;
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = seeds.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let messages: Vec<&[u8]> = vec![
        b"Subject: dots\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n",
        b"Subject: bare LF\n\nline one\nline two\n",
        b"Subject: no final newline\r\n\r\nlast line",
        b"Subject: cr\r\n\r\nlone\rcr\r\n\r\r\n\r",
        b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n",
        b"Subject: header only\r\n",
        b"",
        b".\r\n",
    ];
    for (i, m) in messages.iter().enumerate() {
        for (piece, top) in [(255u8, 255u8), (0, 0), (6, 2), (1, 130)] {
            write(
                "dot_stuffer",
                &format!("msg{i}-{piece}-{top}"),
                &[&[piece, top][..], m].concat(),
            );
        }
    }
    // Server sides as the fake IMAP server and Dovecot answer; the first byte's low three bits
    // pick the command (0: two body fetches of UID 7, 1: the same after fetches sent ahead,
    // 2: CAPABILITY, 3: the listing, 4: LOGIN, 5: the decoder alone, 6: EXAMINE, 7: a relayed
    // AUTHENTICATE), the rest the read size (see fuzz/fuzz_targets/imap_response.rs).
    let responses: Vec<(u8, &[u8])> = vec![
        (0, b"* 3 FETCH (UID 7 BODY[]<0> {16}\r\n0123456789abcdef)\r\na1 OK Fetch completed.\r\n\
              * 3 FETCH (UID 7 BODY[]<16> {0}\r\n)\r\na2 OK Fetch completed.\r\n"),
        (0, b"* 3 FETCH (UID 7 BODY[]<0> NIL)\r\na1 OK Fetch completed.\r\n"),
        (8, b"* 3 FETCH (UID 7 BODY[]<0> \"\")\r\na1 OK done\r\n"),
        (1, b"* NO [ALERT] Quota exceeded\r\n* 2 FETCH (FLAGS (\\Seen) UID 5)\r\n\
              * 3 FETCH (UID 7 BODY[]<0> {3}\r\nabc)\r\na2 OK done\r\na1 NO [EXPUNGEISSUED] gone\r\n"),
        (0, b"* 3 FETCH (UID 8 BODY[]<0> {3}\r\nxyz)\r\na1 OK done\r\n"),
        (16, b"* BYE shutting down\r\n"),
        (0, b"* 3 FETCH (UID 7 BODY[]<0> {10}\r\nabc"),
        (2, b"* CAPABILITY IMAP4rev1 UIDPLUS MOVE\r\na1 OK Capability completed.\r\n"),
        (10, b"* NO [ALERT] 99% full\r\n* CAPABILITY IMAP4rev1 LITERAL+\r\na1 OK\r\n"),
        (3, b"* 1 FETCH (UID 1 RFC822.SIZE 123 FLAGS (\\Seen))\r\n\
              * 2 FETCH (UID 5 RFC822.SIZE 4 FLAGS ())\r\na1 OK Fetch completed.\r\n"),
        (11, b"* 1 FETCH (UID 1 RFC822.SIZE 3 FLAGS () BODY[HEADER] {5}\r\nab)\r\n)\r\n\
              * 1 EXISTS\r\n* 2 FETCH (UID abc)\r\n* 3 FETCH (UID 3)\r\na1 BAD what\r\n"),
        (4, b"* OK IMAP ready\r\na1 NO [AUTHENTICATIONFAILED] a1 LOGIN alice s3cret-pw\r\n"),
        (5, b"* 1 FETCH (BODYSTRUCTURE ((((((((((\r\n* 2 FETCH (UID 2 BODY[]<0> {3}\r\nabc)\r\n"),
        (6, b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] x\r\n* OK [PERMANENTFLAGS (\\Seen \\*)] y\r\na1 OK\r\n"),
        (7, b"+ PDEyMzQ+\r\n+ \r\na1 OK done\r\n"),
    ];
    for (i, (how, bytes)) in responses.iter().enumerate() {
        write(
            "imap_response",
            &format!("server{i}"),
            &[&[*how][..], bytes].concat(),
        );
    }
    // PROXY protocol headers as balancers send them, and trusted-network lists (see
    // fuzz/fuzz_targets/proxy_header.rs).
    for (name, bytes) in [
        (
            "v1",
            &b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nUSER a\r\n"[..],
        ),
        ("v1-unknown", b"PROXY UNKNOWN\r\n"),
        (
            "v2-tcp4",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0f\x01\x02\x03\x04\x05\x06\x07\x08\x00\x01\x00\x02\x04\x00\x00",
        ),
        ("v2-local", b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"),
        ("cidrs", b"10.0.0.0/8,::ffff:0:0/96,2001:db8::/32"),
    ] {
        write("proxy_header", name, bytes);
    }
    for c in load_corpus() {
        let input = &c.input[..c.input.len().min(MAX)];
        write("parse_command", &c.name, input);
        for (j, line) in input.split(|&b| b == b'\n').enumerate().take(40) {
            write("parse_command", &format!("{}-{j}", c.name), line);
        }
        // Session set-ups (see fuzz/fuzz_targets/session.rs): plain text allowed, three small
        // messages; then variations: a failing fetch and a vanished message, a 300 KB message
        // with a failing commit and STLS and relayed SASL offered, a client that times out.
        for (k, (flags, mailbox, fail, piece, sizes)) in [
            (0x01u8, 3u8, 0u8, 255u8, [3u8, 20, 50]),
            (0x01, 3 | (2 << 3), 2, 7, [3, 20, 50]),
            (0x4d, 3, 0, 0, [3, 254, 50]),
            (0x13, 2, 3, 31, [3, 20, 50]),
        ]
        .into_iter()
        .enumerate()
        {
            let mut seed = vec![flags, mailbox, fail, piece];
            seed.extend_from_slice(&sizes[..usize::from(mailbox & 7)]);
            seed.extend_from_slice(input);
            write("session", &format!("{}-{k}", c.name), &seed);
        }
    }
}

/// Streams `total` octets without a line end into `stdin`, then `tail`.
fn stream(mut stdin: impl Write, total: usize, tail: &[u8]) {
    let chunk = vec![b'x'; 1 << 20];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        if stdin.write_all(&chunk[..n]).is_err() {
            return;
        }
        left -= n;
    }
    let _ = stdin.write_all(tail);
}

/// A 100 MB line, as a command and as a SASL response, is discarded as it arrives: the
/// process's peak RSS stays small.
#[test]
fn a_100_mb_line_does_not_grow_memory() {
    const TOTAL: usize = 100 << 20;
    const BOUND_KIB: u64 = 20 << 10;
    let fake = fake_builder().start();
    for (what, head, tail, expect) in [
        (
            "command",
            &b""[..],
            &b"\r\nNOOP\r\n"[..],
            &["-ERR Line too long.", "+OK"][..],
        ),
        (
            "SASL response",
            b"AUTH PLAIN\r\n",
            b"\r\nNOOP\r\n",
            &["-ERR SASL response too long.", "+OK"],
        ),
    ] {
        let mut child = Command::new(BIN)
            .args(fake.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let started = Instant::now();
        stdin.write_all(head).unwrap();
        stream(&mut stdin, TOTAL, tail);
        // Wait for the NOOP's reply: the whole line has been read by then.
        let deadline = Instant::now() + LIMIT;
        let replies = loop {
            let lines = status_lines(&out.lock().unwrap());
            if lines.len() > expect.len() {
                break lines;
            }
            assert!(Instant::now() < deadline, "{what}: no reply; got {lines:?}");
            thread::sleep(Duration::from_millis(10));
        };
        let peak = peak_rss_kib(pid).expect("VmHWM");
        let elapsed = started.elapsed();
        drop(stdin);
        let deadline = Instant::now() + LIMIT;
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{what}: aiopopd did not exit");
            thread::sleep(Duration::from_millis(5));
        }
        reader.join().unwrap();
        eprintln!("{what}: 100 MB line in {elapsed:?}, peak RSS {peak} KiB");
        let tail: Vec<&str> = replies[1..].iter().map(String::as_str).collect();
        assert_eq!(tail, expect, "{what}");
        assert!(
            peak < BOUND_KIB,
            "{what}: peak RSS {peak} KiB after a 100 MB line (bound {BOUND_KIB} KiB)"
        );
    }
}

/// One scenario of the password test: its input, and the fake's credentials.
struct Scenario {
    what: &'static str,
    input: Vec<u8>,
    extra: Vec<&'static str>,
    fault: Option<(&'static str, Act)>,
}

/// A distinctive password, in every way a client can send it and every way a login can end,
/// never shows in the log (-l -v), raw or in base64, and is never echoed to the client.
#[test]
fn a_distinctive_password_never_reaches_the_log() {
    const USER: &str = "alice";
    for password in [
        &b"Zq7-distinctive-0417"[..],
        "pässwörd-Ünïcode-0417".as_bytes(),
    ] {
        let plain = |pw: &[u8]| {
            let mut v = vec![0u8];
            v.extend_from_slice(USER.as_bytes());
            v.push(0);
            v.extend_from_slice(pw);
            base64_encode(&v)
        };
        let pw = String::from_utf8_lossy(password).into_owned();
        let ir = plain(password);
        let b64 = |s: &[u8]| base64_encode(s);
        let s = |what, input: String| Scenario {
            what,
            input: input.into_bytes(),
            extra: vec![],
            fault: None,
        };
        let mut scenarios = vec![
            s(
                "USER/PASS, then QUIT",
                format!("USER {USER}\r\nPASS {pw}\r\nSTAT\r\nQUIT\r\n"),
            ),
            s(
                "USER/PASS wrong, then right",
                format!("USER {USER}\r\nPASS x{pw}\r\nUSER {USER}\r\nPASS {pw}\r\n"),
            ),
            s(
                "PASS with a CR",
                format!("USER {USER}\r\nPASS {pw}\r{pw}\r\n"),
            ),
            s(
                "PASS after login",
                format!("USER {USER}\r\nPASS {pw}\r\nPASS {pw}\r\nUSER {pw}\r\n"),
            ),
            s("PASS without USER", format!("PASS {pw}\r\n")),
            s(
                "PASS too long",
                format!("USER {USER}\r\nPASS {}{pw}\r\n", "x".repeat(300)),
            ),
            s(
                "AUTH PLAIN initial response",
                format!("AUTH PLAIN {ir}\r\nQUIT\r\n"),
            ),
            s(
                "AUTH PLAIN continuation",
                format!("AUTH PLAIN\r\n{ir}\r\nQUIT\r\n"),
            ),
            s(
                "AUTH PLAIN wrong password",
                format!("AUTH PLAIN {}\r\n", plain(&[password, b"x"].concat())),
            ),
            s(
                "AUTH PLAIN another authzid",
                format!(
                    "AUTH PLAIN {}\r\n",
                    b64(&[b"bob\0alice\0", password].concat())
                ),
            ),
            s(
                "AUTH LOGIN",
                format!(
                    "AUTH LOGIN\r\n{}\r\n{}\r\n",
                    b64(USER.as_bytes()),
                    b64(password)
                ),
            ),
            s(
                "AUTH PLAIN of an unknown mechanism, response pipelined",
                format!("AUTH PLAINX\r\n{ir}\r\n"),
            ),
            s(
                "AUTH PLAIN garbled, response pipelined",
                format!("AUTH PLAIN !\r\n{ir}\r\n"),
            ),
            s(
                "AUTH after login, response pipelined",
                format!("AUTH PLAIN {ir}\r\nAUTH PLAIN\r\n{ir}\r\n"),
            ),
        ];
        scenarios.push(Scenario {
            what: "USER/PASS refused without TLS, AUTH response pipelined",
            input: format!("USER {USER}\r\nPASS {pw}\r\nAUTH PLAIN\r\n{ir}\r\n").into_bytes(),
            extra: vec!["--no-plaintext"],
            fault: None,
        });
        scenarios.push(Scenario {
            what: "IMAP down",
            input: format!("USER {USER}\r\nPASS {pw}\r\nAUTH PLAIN {ir}\r\n").into_bytes(),
            extra: vec![],
            fault: Some((GREETING, Act::Bye("down".into()))),
        });
        scenarios.push(Scenario {
            what: "IMAP unavailable",
            input: format!("USER {USER}\r\nPASS {pw}\r\n").into_bytes(),
            extra: vec![],
            fault: Some(("LOGIN", Act::No("[UNAVAILABLE] later".into()))),
        });
        scenarios.push(Scenario {
            what: "IMAP BAD",
            input: format!("AUTH PLAIN {ir}\r\n").into_bytes(),
            extra: vec![],
            fault: Some(("AUTHENTICATE", Act::Bad("what".into()))),
        });
        let forms = secret_forms(password);
        let mut failures = Vec::new();
        for sc in &scenarios {
            let mut b = fake_builder().credentials(USER, password);
            if let Some((verb, act)) = &sc.fault {
                b = b.on(verb, act.clone());
            }
            let fake = b.start();
            let mut args = fake.args();
            if sc.extra.contains(&"--no-plaintext") {
                args.retain(|a| a != "--allow-plaintext-auth");
            }
            args.push("-v".into());
            let r: Finished = run_within(&args, &sc.input, LIMIT);
            r.assert_clean();
            for form in &forms {
                if r.stderr.contains(form.as_str()) {
                    failures.push(format!(
                        "{} ({pw}): the log holds {form:?}:\n{}",
                        sc.what, r.stderr
                    ));
                }
                if String::from_utf8_lossy(&r.stdout).contains(form.as_str()) {
                    failures.push(format!("{} ({pw}): echoed to the client", sc.what));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }
}

/// CR, LF and NUL in a user name or password, by every way of logging in, never make an IMAP
/// command of their own; quotes, backslashes and literal syntax reach IMAP intact.
#[test]
fn credentials_never_inject_imap_commands() {
    const INJECT: &str = "a9 DELETE INBOX";
    let bad: Vec<Vec<u8>> = vec![
        b"\r".to_vec(),
        b"\n".to_vec(),
        b"\0".to_vec(),
        b"\r\n".to_vec(),
        format!("\r\n{INJECT}\r\n").into_bytes(),
        format!("\r{INJECT}").into_bytes(),
        format!("\0{INJECT}").into_bytes(),
    ];
    let harmless: Vec<Vec<u8>> = vec![
        b"\"".to_vec(),
        b"\\".to_vec(),
        b"\\\"".to_vec(),
        b"{5}".to_vec(),
        b"{15+}".to_vec(),
        format!("\" {INJECT}").into_bytes(),
        format!(") {INJECT} (").into_bytes(),
        b"%*".to_vec(),
    ];
    // How a client can carry (user, password): each returns the POP3 input.
    type Way = fn(&[u8], &[u8]) -> Vec<u8>;
    let user_pass: Way = |u, p| [b"USER ", u, b"\r\nPASS ", p, b"\r\n"].concat();
    let plain_ir: Way = |u, p| {
        let blob = [b"\0", u, b"\0", p].concat();
        format!("AUTH PLAIN {}\r\n", base64_encode(&blob)).into_bytes()
    };
    let plain_cont: Way = |u, p| {
        let blob = [b"\0", u, b"\0", p].concat();
        format!("AUTH PLAIN\r\n{}\r\n", base64_encode(&blob)).into_bytes()
    };
    let login: Way = |u, p| {
        format!(
            "AUTH LOGIN\r\n{}\r\n{}\r\n",
            base64_encode(u),
            base64_encode(p)
        )
        .into_bytes()
    };
    let ways: [(&str, Way); 4] = [
        ("USER/PASS", user_pass),
        ("AUTH PLAIN", plain_ir),
        ("AUTH PLAIN continued", plain_cont),
        ("AUTH LOGIN", login),
    ];
    let mut runs = Vec::new();
    for (way, f) in ways {
        for (bytes, is_bad) in bad
            .iter()
            .map(|b| (b, true))
            .chain(harmless.iter().map(|b| (b, false)))
        {
            for in_user in [false, true] {
                if way == "USER/PASS" && in_user && bytes.contains(&b' ') {
                    // USER takes one word: such a name is refused before any login.
                    continue;
                }
                let (user, pw) = if in_user {
                    ([b"alice", &bytes[..]].concat(), b"pw".to_vec())
                } else {
                    (b"alice".to_vec(), [b"pw", &bytes[..]].concat())
                };
                runs.push((way, f, user, pw, is_bad));
            }
        }
    }
    let failures = Mutex::new(Vec::new());
    let queue = Mutex::new(runs.iter().collect::<Vec<_>>());
    thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some((way, f, user, pw, is_bad)) = queue.lock().unwrap().pop() else {
                    return;
                };
                let what = format!(
                    "{way}, user {:?}, password {:?}",
                    String::from_utf8_lossy(user),
                    String::from_utf8_lossy(pw)
                );
                // The fake holds exactly these credentials: where they are harmless, the login
                // must succeed, so they were passed byte for byte.
                let fake = fake_builder()
                    .credentials(&String::from_utf8_lossy(user), pw)
                    .start();
                let r = run_within(&fake.args(), &f(user, pw), LIMIT);
                let mut problems = Vec::new();
                if r.stderr.contains("internal error") {
                    problems.push("panicked".to_string());
                }
                // Every command is one of the session's: text after a CR LF would show as a
                // command of its own (tag a9, verb DELETE).
                for rec in fake.received().iter().filter(|r| r.is_command) {
                    let line = String::from_utf8_lossy(&rec.line).into_owned();
                    let tag = line.split(' ').next().unwrap_or("");
                    if !is_tag(tag) || !SESSION_VERBS.contains(&rec.verb().as_str()) {
                        problems.push(format!("unexpected IMAP command {line:?}"));
                    }
                }
                if fake.logins() > 1 {
                    problems.push(format!("{} IMAP logins", fake.logins()));
                }
                let logged_in = status_lines(&r.stdout)
                    .iter()
                    .any(|l| l.starts_with("+OK Logged in"));
                // A LF in USER/PASS just ends the POP3 line early: a different password, a
                // failed login. Everything else is refused, or (harmless) accepted.
                let splits_line = *way == "USER/PASS"
                    && *is_bad
                    && (user.contains(&b'\n') || pw.contains(&b'\n'));
                if *is_bad && !splits_line && fake.logins() != 0 {
                    problems.push("CR/LF/NUL credentials reached IMAP".to_string());
                }
                if *is_bad && logged_in {
                    problems.push("logged in".to_string());
                }
                if !*is_bad && !logged_in {
                    problems.push(format!(
                        "not logged in: {:?}; IMAP got {:?}",
                        status_lines(&r.stdout),
                        fake.commands()
                    ));
                }
                if !problems.is_empty() {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{what}: {}", problems.join("; ")));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} runs failed:\n{}",
        failures.len(),
        runs.len(),
        failures.join("\n")
    );
}
