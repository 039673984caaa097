//! The POP3 wire format as a strict client reads it: status lines and dot-stuffed multi-line
//! replies (RFC 1939 §3). Every framing fault is reported, never smoothed over, because this
//! client doubles as a conformance check for servers.
//!
//! No sockets here: [`Conn`] works over any `Read + Write`, and [`Unstuffer`] over byte slices,
//! so both are tested with byte literals. What the replies mean is `check`'s business.

use crate::Failure;
use std::io::{ErrorKind, Read, Write};

/// RFC 2449 §4: a status line is at most 512 octets, its CRLF included.
pub const MAX_STATUS_LINE: usize = 512;
/// How much one read asks for.
const CHUNK: usize = 16 * 1024;

/// One status line, `+OK ...` or `-ERR ...`.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    /// The whole line without its CRLF.
    pub line: Vec<u8>,
}

impl Reply {
    /// What follows `+OK ` or `-ERR `.
    pub fn text(&self) -> &[u8] {
        let indicator = if self.ok { 3 } else { 4 };
        self.line.get(indicator + 1..).unwrap_or_default()
    }
}

/// The size of a multi-line reply once un-stuffed: what RFC 1939 counts for LIST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Body {
    /// Octets without stuffing dots and without the terminating `.` line; each line's CRLF
    /// counts.
    pub octets: u64,
    pub lines: u64,
}

/// A connection to a POP3 server, with the read buffer the strict reader needs. The buffer
/// is ours (no `BufReader`), so that STLS can check it is empty before TLS starts.
pub struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    /// `buf[pos..]` is not consumed yet.
    pos: usize,
}

impl<S: Read + Write> Conn<S> {
    pub fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buf: Vec::with_capacity(CHUNK),
            pos: 0,
        }
    }

    /// Bytes received but not consumed by any reply yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Sends one command line; `line` is without its CRLF.
    pub fn send(&mut self, line: &[u8]) -> Result<(), Failure> {
        let mut wire = Vec::with_capacity(line.len() + 2);
        wire.extend_from_slice(line);
        wire.extend_from_slice(b"\r\n");
        let sent = self
            .stream
            .write_all(&wire)
            .and_then(|()| self.stream.flush());
        // The line may be PASS: don't leave the password in freed memory.
        wire.fill(0);
        sent.map_err(|e| io_failure(e, "sending"))
    }

    /// Reads one status line.
    pub fn status(&mut self) -> Result<Reply, Failure> {
        let line = self.line()?;
        parse_status(&line)
    }

    /// Reads what follows an AUTH step: a SASL challenge (`+ base64`, returned decoded) or a
    /// final status line.
    pub fn challenge_or_status(&mut self) -> Result<Result<Vec<u8>, Reply>, Failure> {
        let line = self.line()?;
        match line
            .strip_prefix(b"+ ")
            .or_else(|| (line == b"+\r\n").then_some(&b"\r\n"[..]))
        {
            Some(rest) if !line.starts_with(b"+OK") => {
                let text = rest.strip_suffix(b"\r\n").unwrap_or(rest);
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map(Ok)
                    .map_err(|_| {
                        Failure(format!(
                            "the SASL challenge {} is not base64",
                            printable(&line)
                        ))
                    })
            }
            _ => parse_status(&line).map(Err),
        }
    }

    /// One line as sent, CRLF included, at most a status line long.
    fn line(&mut self) -> Result<Vec<u8>, Failure> {
        let mut scanned = 0;
        loop {
            let unread = &self.buf[self.pos..];
            if let Some(i) = unread[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i + 1;
                if end > MAX_STATUS_LINE {
                    return Err(too_long());
                }
                let line = unread[..end].to_vec();
                self.pos += end;
                return Ok(line);
            }
            if unread.len() >= MAX_STATUS_LINE {
                return Err(too_long());
            }
            scanned = unread.len();
            if !self.fill()? {
                return Err(Failure(if scanned == 0 {
                    "the server closed the connection".into()
                } else {
                    "the server closed the connection in the middle of a status line".into()
                }));
            }
        }
    }

    /// Reads the rest of a multi-line reply, through its terminating `.` line, and hands the
    /// un-stuffed bytes to `sink` as they come (a RETR need not fit in memory).
    pub fn multiline(
        &mut self,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), Failure>,
    ) -> Result<Body, Failure> {
        let mut unstuffer = Unstuffer::new();
        let mut decoded = Vec::with_capacity(CHUNK);
        loop {
            let unread = &self.buf[self.pos..];
            decoded.clear();
            let end = unstuffer.feed(unread, &mut decoded)?;
            self.pos += end.unwrap_or(unread.len());
            if !decoded.is_empty() {
                sink(&decoded)?;
            }
            if end.is_some() {
                return Ok(unstuffer.body());
            }
            if !self.fill()? {
                return Err(Failure(
                    "the server closed the connection before the end of the multi-line reply \
                     (no terminating '.' line)"
                        .into(),
                ));
            }
        }
    }

    /// Reads more into the buffer; false at the end of the stream.
    fn fill(&mut self) -> Result<bool, Failure> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos >= CHUNK {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + CHUNK, 0);
        loop {
            match self.stream.read(&mut self.buf[old..]) {
                Ok(n) => {
                    self.buf.truncate(old + n);
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(io_failure(e, "waiting for the server"));
                }
            }
        }
    }
}

fn too_long() -> Failure {
    Failure(format!(
        "the status line is longer than {MAX_STATUS_LINE} octets (RFC 2449 §4)"
    ))
}

/// Words an I/O error; a read timeout shows as WouldBlock or TimedOut.
pub fn io_failure(e: std::io::Error, doing: &str) -> Failure {
    Failure(match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("timed out {doing} (see --timeout)")
        }
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
            format!("the server closed the connection ({e})")
        }
        _ => format!("connection error {doing}: {e}"),
    })
}

/// `line` ends in LF; it must be `+OK[ text]` or `-ERR[ text]` ending in CRLF.
fn parse_status(line: &[u8]) -> Result<Reply, Failure> {
    let Some(body) = line.strip_suffix(b"\r\n") else {
        return Err(Failure(format!(
            "the status line {} ends in a bare LF, not CRLF",
            printable(line)
        )));
    };
    if body.contains(&b'\r') {
        return Err(Failure(format!(
            "the status line {} contains a stray CR",
            printable(body)
        )));
    }
    let ok = body == b"+OK" || body.starts_with(b"+OK ");
    let err = body == b"-ERR" || body.starts_with(b"-ERR ");
    if !ok && !err {
        return Err(Failure(format!(
            "expected a status line (+OK or -ERR), got {}",
            printable(body)
        )));
    }
    Ok(Reply {
        ok,
        line: body.to_vec(),
    })
}

/// Where the un-stuffer is within a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    LineStart,
    /// A `.` began the line: the next byte decides between stuffing and the terminator.
    Dot,
    /// `.` CR began the line: only LF (the terminator) may follow.
    DotCr,
    Middle,
    /// After a CR within a line.
    Cr,
}

/// Removes byte-stuffing from a multi-line reply and finds its end, refusing bare LFs and
/// dot lines that aren't stuffed. A lone CR is passed on: it is message content, not framing
/// (Dovecot serves one as stored).
#[derive(Debug)]
pub struct Unstuffer {
    at: At,
    body: Body,
}

impl Unstuffer {
    pub fn new() -> Unstuffer {
        Unstuffer {
            at: At::LineStart,
            body: Body {
                octets: 0,
                lines: 0,
            },
        }
    }

    /// What has been un-stuffed so far.
    pub fn body(&self) -> Body {
        self.body
    }

    /// Un-stuffs `input` into `out`. Returns how much of `input` the reply took once its
    /// terminating line is complete (the rest belongs to what follows), None while more is
    /// needed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, Failure> {
        let start = out.len();
        for (i, &b) in input.iter().enumerate() {
            let line = self.body.lines + 1;
            self.at = match (self.at, b) {
                (At::DotCr, b'\n') => {
                    self.body.octets += (out.len() - start) as u64;
                    return Ok(Some(i + 1));
                }
                (At::Cr, b'\n') => {
                    out.push(b);
                    self.body.lines += 1;
                    At::LineStart
                }
                (_, b'\n') => {
                    return Err(Failure(format!(
                        "line {line} of the multi-line reply ends in a bare LF, not CRLF"
                    )));
                }
                (At::Dot, b'\r') => At::DotCr,
                // The stuffing dot was dropped; this one is content.
                (At::Dot, b'.') => {
                    out.push(b);
                    At::Middle
                }
                (At::Dot | At::DotCr, _) => {
                    return Err(Failure(format!(
                        "line {line} of the multi-line reply starts with '.' but is neither \
                         byte-stuffed ('..') nor the terminating '.' line"
                    )));
                }
                (At::LineStart, b'.') => At::Dot,
                (_, b'\r') => {
                    out.push(b);
                    At::Cr
                }
                (_, _) => {
                    out.push(b);
                    At::Middle
                }
            };
        }
        self.body.octets += (out.len() - start) as u64;
        Ok(None)
    }
}

/// Bytes from the server made safe for a terminal: control characters and invalid UTF-8
/// become `\xNN`, so a hostile server can't send escape sequences to the user's terminal.
pub fn printable(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() && c != '\t' {
                let mut utf8 = [0u8; 4];
                for b in c.encode_utf8(&mut utf8).bytes() {
                    s.push_str(&format!("\\x{b:02x}"));
                }
            } else {
                s.push(c);
            }
        }
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A stream that reads `input` a few bytes at a time and records what is written.
    struct Trickle {
        input: Cursor<Vec<u8>>,
        step: usize,
        sent: Vec<u8>,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.step);
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn conn(input: &[u8], step: usize) -> Conn<Trickle> {
        Conn::new(Trickle {
            input: Cursor::new(input.to_vec()),
            step,
            sent: Vec::new(),
        })
    }

    /// Un-stuffs one multi-line reply; returns the content and what was left behind it.
    fn unstuff(input: &[u8], step: usize) -> Result<(Vec<u8>, Body, Vec<u8>), Failure> {
        let mut c = conn(input, step);
        let mut content = Vec::new();
        let body = c.multiline(&mut |b| {
            content.extend_from_slice(b);
            Ok(())
        })?;
        let mut rest = c.buf[c.pos..].to_vec();
        c.stream.input.read_to_end(&mut rest).unwrap();
        Ok((content, body, rest))
    }

    #[test]
    fn unstuffs_in_any_chunking() {
        let wire = b"Subject: x\r\n\r\n..dot\r\n...\r\nlone\rCR\r\n.\r\n+OK next\r\n";
        for step in 1..=wire.len() {
            let (content, body, rest) = unstuff(wire, step).unwrap();
            assert_eq!(
                content, b"Subject: x\r\n\r\n.dot\r\n..\r\nlone\rCR\r\n",
                "{step}"
            );
            assert_eq!(body.octets, content.len() as u64);
            assert_eq!(body.lines, 5);
            assert_eq!(rest, b"+OK next\r\n");
        }
    }

    #[test]
    fn empty_reply() {
        let (content, body, _) = unstuff(b".\r\n", 1).unwrap();
        assert!(content.is_empty());
        assert_eq!(
            body,
            Body {
                octets: 0,
                lines: 0
            }
        );
    }

    #[test]
    fn refuses_framing_faults() {
        let cases: [(&[u8], &str); 6] = [
            (
                b"a\r\n.dot\r\n.\r\n",
                "line 2 of the multi-line reply starts with '.'",
            ),
            (
                b".\rx\r\n.\r\n",
                "line 1 of the multi-line reply starts with '.'",
            ),
            (
                b"a\nb\r\n.\r\n",
                "line 1 of the multi-line reply ends in a bare LF",
            ),
            (
                b"a\r\n.\n",
                "line 2 of the multi-line reply ends in a bare LF",
            ),
            (b"a\r\nb\r\n", "no terminating '.' line"),
            (b"a\r\n.", "no terminating '.' line"),
        ];
        for (wire, expected) in cases {
            for step in [1, 3, 100] {
                let e = unstuff(wire, step).unwrap_err();
                assert!(e.0.contains(expected), "{wire:?} / {step}: {e}");
            }
        }
    }

    #[test]
    fn status_lines() {
        let mut c = conn(b"+OK\r\n-ERR [AUTH] no\r\n+OK hi there\r\n", 2);
        assert_eq!(c.status().unwrap().text(), b"");
        let err = c.status().unwrap();
        assert!(!err.ok);
        assert_eq!(err.text(), b"[AUTH] no");
        assert_eq!(c.status().unwrap().line, b"+OK hi there");
        assert_eq!(
            c.status().unwrap_err().0,
            "the server closed the connection"
        );

        let bad: [(&[u8], &str); 6] = [
            (b"+OK\n", "bare LF"),
            (b"+OK a\rb\r\n", "stray CR"),
            (b"+OKAY\r\n", "expected a status line"),
            (b"* OK\r\n", "expected a status line"),
            (b"+OK half", "in the middle of a status line"),
            (&[b'x'; 600], "longer than 512 octets"),
        ];
        for (wire, expected) in bad {
            let e = conn(wire, 7).status().unwrap_err();
            assert!(e.0.contains(expected), "{wire:?}: {e}");
        }
        let mut long = b"+OK ".to_vec();
        long.resize(510, b'a');
        long.extend_from_slice(b"\r\n");
        // Read whole or in pieces, 512 octets is allowed and 513 is not.
        for step in [100, 1000] {
            assert!(conn(&long, step).status().unwrap().ok, "{step}");
            long.insert(4, b'a');
            let e = conn(&long, step).status().unwrap_err();
            assert!(e.0.contains("longer than 512 octets"), "{step}: {e}");
            long.remove(4);
        }
    }

    #[test]
    fn sends_crlf() {
        let mut c = conn(b"", 1);
        c.send(b"STAT").unwrap();
        assert_eq!(c.stream.sent, b"STAT\r\n");
    }

    #[test]
    fn printable_escapes_controls() {
        assert_eq!(
            printable(b"a\tb\x1b[31m\xff\xc3\xa9"),
            "a\tb\\x1b[31m\\xffé"
        );
        assert_eq!(printable("\u{9b}".as_bytes()), "\\xc2\\x9b");
    }
}
