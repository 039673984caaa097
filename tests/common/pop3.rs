//! Running the built aiopopd on a scripted stdin, as inetd would, and reading its replies back
//! as a strict POP3 client would: status lines, and multi-line bodies un-stuffed.
#![allow(dead_code)]

use super::dovecot::Dovecot;
use std::io::Write;
use std::process::{Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_aiopopd");

pub struct Run {
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub ok: bool,
}

/// The usual arguments towards a test Dovecot's plain IMAP port.
pub fn args(d: &Dovecot) -> Vec<String> {
    [
        "-H",
        "127.0.0.1",
        "-p",
        &d.imap_port.to_string(),
        "--allow-plaintext-auth",
        "-l",
        "-d",
        "pop.test",
        // Refused logins answer at once in tests (2 s by default).
        "--auth-failure-delay",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs aiopopd with `args`, feeding `script` on stdin; stderr (the log, with -l) captured.
pub fn run(args: &[String], script: &[u8]) -> Run {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start aiopopd");
    let mut stdin = child.stdin.take().expect("stdin");
    let script = script.to_vec();
    // Write from a thread: big replies must not deadlock against a big script.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&script);
    });
    let out = child.wait_with_output().expect("aiopopd output");
    writer.join().expect("writer");
    Run {
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        ok: out.status.success(),
    }
}

/// Runs a session with Dovecot's defaults plus `extra` arguments.
pub fn session(d: &Dovecot, extra: &[&str], script: &str) -> Run {
    let mut a = args(d);
    a.extend(extra.iter().map(|s| s.to_string()));
    run(&a, script.as_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: String,
    /// The un-stuffed body of a multi-line reply, each line ending in CRLF.
    pub body: Option<Vec<u8>>,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.status.starts_with("+OK")
    }
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(self.body.as_deref().unwrap_or_default()).into_owned()
    }
}

/// Which commands get a multi-line answer when they succeed.
fn multi_line(cmd: &str) -> bool {
    let mut w = cmd.split_whitespace();
    let verb = w.next().unwrap_or("").to_ascii_uppercase();
    let has_arg = w.next().is_some();
    match verb.as_str() {
        "CAPA" | "RETR" | "TOP" => true,
        "LIST" | "UIDL" | "AUTH" => !has_arg,
        _ => false,
    }
}

/// Splits `out` into the greeting and one reply per command of `script`, strictly: every line
/// must end in CRLF, and every line of a body that starts with '.' must be stuffed. Stops at the
/// end of the output (a session that was closed early has fewer replies).
pub fn replies(out: &[u8], script: &str) -> Vec<Reply> {
    let mut lines = Lines { rest: out };
    let mut replies = Vec::new();
    let mut cmds = std::iter::once("").chain(script.split("\r\n"));
    while let Some(status) = lines.next() {
        let status = String::from_utf8_lossy(status).into_owned();
        let cmd = cmds.next().unwrap_or("");
        let mut body = None;
        if status.starts_with("+OK") && multi_line(cmd) {
            let mut b = Vec::new();
            loop {
                let Some(line) = lines.next() else {
                    panic!("multi-line reply to {cmd:?} has no terminator: {}", b.len())
                };
                if line == b"." {
                    break;
                }
                let line = match line.strip_prefix(b".") {
                    Some(rest) => {
                        assert!(
                            rest.starts_with(b"."),
                            "unstuffed dot line in reply to {cmd}"
                        );
                        rest
                    }
                    None => line,
                };
                b.extend_from_slice(line);
                b.extend_from_slice(b"\r\n");
            }
            body = Some(b);
        }
        replies.push(Reply { status, body });
    }
    replies
}

struct Lines<'a> {
    rest: &'a [u8],
}

impl<'a> Lines<'a> {
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let i = self
            .rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or_else(|| {
                panic!(
                    "line without CRLF: {:?}",
                    String::from_utf8_lossy(&self.rest[..self.rest.len().min(80)])
                )
            });
        let line = &self.rest[..i];
        assert!(!line.contains(&b'\n'), "bare LF inside a line");
        self.rest = &self.rest[i + 2..];
        Some(line)
    }
}

/// What RETR must send for a message IMAP serves as `imap`: the same octets, with a final
/// CRLF added only if the message lacks one.
pub fn expected_retr(imap: &[u8]) -> Vec<u8> {
    let mut v = imap.to_vec();
    if !v.ends_with(b"\r\n") {
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// What `TOP n lines` must send: the header, the blank line, then `lines` body lines.
pub fn expected_top(imap: &[u8], lines: usize) -> Vec<u8> {
    let full = expected_retr(imap);
    let header_end = full
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(full.len(), |i| i + 4);
    let mut end = header_end;
    for _ in 0..lines {
        match full[end..].windows(2).position(|w| w == b"\r\n") {
            Some(i) => end += i + 2,
            None => {
                end = full.len();
                break;
            }
        }
    }
    full[..end].to_vec()
}

/// A `--user-dir` with one file, `DIR/<pop3_user>`, pointing at `d`'s plain IMAP port (as
/// `imap_user` if given), and aiopopd's arguments to use it. Keep the directory alive.
pub fn user_dir(
    d: &Dovecot,
    pop3_user: &str,
    imap_user: Option<&str>,
) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let username = imap_user.map_or(String::new(), |u| format!(r#", "username": "{u}""#));
    std::fs::write(
        dir.path().join(pop3_user),
        format!(
            r#"{{"hostname": "127.0.0.1", "port": {}, "ssl": false{username}}}"#,
            d.imap_port
        ),
    )
    .expect("write the user file");
    let args = [
        "--user-dir",
        dir.path().to_str().expect("utf-8 path"),
        "--allow-plaintext-auth",
        "-l",
        "--auth-failure-delay",
        "0",
    ]
    .map(String::from)
    .to_vec();
    (dir, args)
}
