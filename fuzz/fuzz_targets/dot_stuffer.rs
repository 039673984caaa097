//! The framing of RETR and TOP: `DotStuffer` fed a message in pieces of any size.
//!
//! A strict POP3 client reading the output must find CRLF line ends only, every line starting with
//! '.' stuffed, exactly one terminator at the end; un-stuffed, RETR gives back the message with
//! line ends made CRLF (and a final CRLF added if missing), and TOP a prefix of that at a line
//! boundary, with at most n lines after the header's blank line. Chunking never changes the output.
#![no_main]

use aiopopd::pop3::DotStuffer;
use libfuzzer_sys::fuzz_target;

fn frame(msg: &[u8], piece: usize, top: Option<u64>) -> Vec<u8> {
    let mut d = top.map_or_else(DotStuffer::new, DotStuffer::top);
    let mut out = Vec::new();
    for chunk in msg.chunks(piece.max(1)) {
        if d.is_done() {
            break;
        }
        d.push(chunk, &mut out);
    }
    d.finish(&mut out);
    out
}

/// Reads a framed reply as a client would; returns the un-stuffed lines.
fn unframe(out: &[u8]) -> Vec<Vec<u8>> {
    assert!(out.ends_with(b".\r\n"), "no terminator");
    let mut lines = Vec::new();
    let mut rest = out;
    loop {
        let i = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("every line ends in CRLF");
        let line = &rest[..i];
        assert!(!line.contains(&b'\n'), "bare LF in {line:?}");
        rest = &rest[i + 2..];
        if line == b"." {
            assert!(rest.is_empty(), "data after the terminator");
            return lines;
        }
        let line = match line.strip_prefix(b".") {
            Some(l) => {
                assert!(l.starts_with(b"."), "unstuffed dot line");
                l
            }
            None => line,
        };
        lines.push(line.to_vec());
    }
}

/// The message as RETR must deliver it: LF made CRLF, a final line end added.
fn normalised(msg: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(msg.len() + 16);
    for (i, &b) in msg.iter().enumerate() {
        if b == b'\n' && (i == 0 || msg[i - 1] != b'\r') {
            v.push(b'\r');
        }
        v.push(b);
    }
    if v.ends_with(b"\r") {
        v.push(b'\n');
    } else if !v.is_empty() && !v.ends_with(b"\n") {
        v.extend_from_slice(b"\r\n");
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let (piece, top, msg) = match data {
        [p, t, rest @ ..] => (
            usize::from(*p) + 1,
            (*t < 128).then_some(u64::from(*t % 8)),
            rest,
        ),
        _ => return,
    };
    let whole = frame(msg, msg.len().max(1), None);
    assert_eq!(frame(msg, piece, None), whole, "RETR depends on chunking");
    let lines = unframe(&whole);
    let joined: Vec<u8> = lines
        .iter()
        .flat_map(|l| [&l[..], b"\r\n"].concat())
        .collect();
    assert_eq!(joined, normalised(msg), "RETR content");
    if let Some(n) = top {
        let t = frame(msg, msg.len().max(1), Some(n));
        assert_eq!(frame(msg, piece, Some(n)), t, "TOP depends on chunking");
        let top_lines = unframe(&t);
        assert!(lines.starts_with(&top_lines), "TOP is not a prefix of RETR");
        if let Some(blank) = top_lines.iter().position(|l| l.is_empty()) {
            assert!(
                (top_lines.len() - blank - 1) as u64 <= n,
                "TOP {n} sent {} body lines",
                top_lines.len() - blank - 1
            );
        }
    }
});
