//! The command parser and the line reader in front of it.
//!
//! `Command::parse` on the raw input must not panic and must hold the invariants the session
//! relies on (message numbers from 1, USER one non-empty word, ...), whatever the case of the verb.
//! The input is also read as a byte stream through `conn::Conn`, in pieces of a size taken from
//! the first byte: the lines must be the same in any chunking, and match a plain model of RFC 1939
//! framing (LF ends a line, one CR before it is dropped, lines over 255 octets with CRLF are
//! refused whole).
#![no_main]

use aiopopd::conn::{Conn, Transport};
use aiopopd::pop3::{Command, MAX_COMMAND_LINE};
use aiopopd::session::{Line, Peer};
use libfuzzer_sys::fuzz_target;
use std::io::{self, Read, Write};

/// An in-memory client connection that hands out its input `piece` bytes at a time.
struct Script<'a> {
    input: &'a [u8],
    piece: usize,
}

impl Read for Script<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.piece.min(buf.len()).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Script<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Script<'_> {
    fn is_secure(&self) -> bool {
        false
    }
    fn can_start_tls(&self) -> bool {
        false
    }
    fn start_tls(&mut self) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Lines as `Conn` reads them: `Some(line)` or `None` for one refused as too long.
fn read_all(input: &[u8], piece: usize) -> Vec<Option<Vec<u8>>> {
    let mut conn = Conn::new(Script { input, piece });
    let mut lines = Vec::new();
    loop {
        match conn.read_line().expect("in-memory reads don't fail") {
            Line::Command(l) => lines.push(Some(l)),
            Line::TooLong => lines.push(None),
            Line::Eof => return lines,
        }
    }
}

/// The same, by the book.
fn model(input: &[u8]) -> Vec<Option<Vec<u8>>> {
    let mut parts: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    parts.pop(); // the part after the last LF is not a line (EOF drops it)
    parts
        .into_iter()
        .map(|l| {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            (l.len() + 2 <= MAX_COMMAND_LINE).then(|| l.to_vec())
        })
        .collect()
}

fn check_parse(line: &[u8]) {
    let parsed = Command::parse(line);
    // The verb is case-insensitive: upper-casing it changes nothing.
    let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let mut upper = line.to_vec();
    upper[..verb_end].make_ascii_uppercase();
    assert_eq!(Command::parse(&upper), parsed, "case of the verb matters");
    let Ok(cmd) = parsed else { return };
    let verb = &upper[..verb_end];
    match cmd {
        Command::Retr(n) | Command::Dele(n) | Command::Top(n, _) => {
            assert!(n >= 1, "message number 0 accepted")
        }
        Command::List(Some(n)) | Command::Uidl(Some(n)) => assert!(n >= 1),
        Command::User(name) => {
            assert!(!name.is_empty() && !name.contains(&b' '), "USER {name:?}");
            assert_eq!(verb, b"USER");
        }
        Command::Pass(p) => {
            assert!(!p.expose().is_empty());
            assert_eq!(verb, b"PASS");
            // PASS keeps the rest of the line exactly.
            assert_eq!(p.expose(), &line[5..]);
        }
        Command::Auth(Some(a)) => {
            assert_eq!(verb, b"AUTH");
            assert!(!a.mechanism.is_empty() && a.mechanism.len() <= 20);
            assert!(a
                .initial
                .as_ref()
                .is_none_or(|i| !i.expose().is_empty() && !i.expose().contains(&b' ')));
        }
        Command::Quit => assert_eq!(verb, b"QUIT"),
        Command::Stat => assert_eq!(verb, b"STAT"),
        Command::Noop => assert_eq!(verb, b"NOOP"),
        Command::Rset => assert_eq!(verb, b"RSET"),
        Command::Capa => assert_eq!(verb, b"CAPA"),
        Command::Stls => assert_eq!(verb, b"STLS"),
        Command::Apop => assert_eq!(verb, b"APOP"),
        Command::Auth(None) | Command::List(None) | Command::Uidl(None) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    check_parse(data);
    let piece = data.first().map_or(1, |&b| usize::from(b % 64) + 1);
    let lines = read_all(data, piece);
    assert_eq!(lines, model(data), "Conn framing, pieces of {piece}");
    for line in lines.into_iter().flatten() {
        check_parse(&line);
    }
});
