//! The IMAP byte stream, shared between the `imap` crate and the two responses aiopopd reads
//! itself: message bodies (`UID FETCH n BODY.PEEK[]<o.l>`) and the listing at login.
//!
//! Why: the crate re-parses a response from its start after every line it reads, so a 20 KB
//! message costs ~335 parses and ~90% of aiopopd's CPU (BENCHMARKS.md, "Profile"), and it keeps
//! ~2.6 KB of parsed structure per listed message. Here a body is a few memchr calls and one
//! copy, and the listing keeps 16 bytes a message.
//!
//! How the two readers share one stream safely: [`Shared`] hands the crate at most one line per
//! `read`, so the crate's own buffer never holds bytes past a line end; between commands it is
//! empty, and whatever the server sent meanwhile waits in our buffer for whichever reader comes
//! next. Our commands use their own tag prefix, so they never collide with the crate's.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;

/// A response line longer than this is a broken or hostile server.
const MAX_LINE: usize = 64 << 10;
const BUF: usize = 64 << 10;

struct Wire<S> {
    stream: S,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    tags: u32,
    /// Set when a command of ours failed mid-way: what comes next on the stream could be the
    /// rest of an old response (even a message body made to look like IMAP), so nothing more
    /// is read or sent, by us or by the crate.
    broken: bool,
}

/// A handle on the stream; clones share it (the crate holds one, the maildrop another).
pub struct Shared<S>(Rc<RefCell<Wire<S>>>);

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<S: Read + Write> Shared<S> {
    pub fn new(stream: S) -> Shared<S> {
        Shared(Rc::new(RefCell::new(Wire {
            stream,
            buf: vec![0; BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            tags: 0,
            broken: false,
        })))
    }
}

impl<S: Read> Wire<S> {
    /// Reads more from the stream; false at EOF.
    fn fill(&mut self) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.stream.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n > 0)
    }

    /// The next line, CRLF included.
    fn line(&mut self, into: &mut Vec<u8>) -> io::Result<()> {
        into.clear();
        loop {
            let avail = &self.buf[self.start..self.end];
            if let Some(i) = memchr::memchr(b'\n', avail) {
                into.extend_from_slice(&avail[..=i]);
                self.start += i + 1;
                return Ok(());
            }
            into.extend_from_slice(avail);
            self.start = self.end;
            if into.len() > MAX_LINE {
                return Err(io::Error::other("IMAP response line too long"));
            }
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Exactly `n` octets, appended to `out` (or dropped, with `None`).
    fn literal(&mut self, mut n: u64, mut out: Option<&mut Vec<u8>>) -> io::Result<()> {
        while n > 0 {
            if self.start == self.end && !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let take = usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(self.end - self.start);
            if let Some(out) = out.as_deref_mut() {
                out.extend_from_slice(&self.buf[self.start..self.start + take]);
            }
            self.start += take;
            n -= take as u64;
        }
        Ok(())
    }
}

impl<S: Read> Read for Shared<S> {
    /// At most one line per call (see the module comment).
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut w = self.0.borrow_mut();
        if w.broken {
            return Err(io::Error::other("the IMAP connection failed earlier"));
        }
        if w.start == w.end && !w.fill()? {
            return Ok(0);
        }
        let avail = &w.buf[w.start..w.end];
        let line = memchr::memchr(b'\n', avail).map_or(avail.len(), |i| i + 1);
        let n = line.min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        w.start += n;
        Ok(n)
    }
}

impl<S: Write> Write for Shared<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut w = self.0.borrow_mut();
        if w.broken {
            return Err(io::Error::other("the IMAP connection failed earlier"));
        }
        w.stream.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().stream.flush()
    }
}

/// How one of our commands ended, when it didn't end OK.
#[derive(Debug)]
pub enum Failed {
    Io(io::Error),
    /// Tagged NO, with its text.
    No(String),
    /// Tagged BAD, untagged BYE, or something that isn't IMAP.
    Broken(String),
}

impl From<io::Error> for Failed {
    fn from(e: io::Error) -> Failed {
        Failed::Io(e)
    }
}

/// What `run` hands each untagged response to: the response, the body buffer, and its length
/// before this response (to take back a literal that wasn't ours).
type Each<'a> = dyn FnMut(&Untagged, Option<&mut Vec<u8>>, usize) + 'a;

/// One untagged response, its literals read: the text outside them, and whether the literal
/// that followed `BODY[]<...>` went to the caller's buffer.
struct Untagged {
    text: Vec<u8>,
    body_taken: bool,
}

impl<S: Read + Write> Shared<S> {
    /// Sends `command` with a fresh tag of ours and reads the responses, handing each untagged
    /// one to `each`. `body` receives the octets of the literal that follows `section` (e.g.
    /// `BODY[]<0>`), which may be at most `max` octets. A failure other than a tagged NO leaves
    /// the stream unusable.
    fn run(
        &self,
        command: &str,
        body: Option<(&mut Vec<u8>, &[u8], u64)>,
        each: &mut Each<'_>,
    ) -> Result<(), Failed> {
        if self.0.borrow().broken {
            return Err(Failed::Broken("the IMAP connection failed earlier".into()));
        }
        let result = self.run_once(command, body, each);
        if matches!(result, Err(Failed::Io(_)) | Err(Failed::Broken(_))) {
            self.0.borrow_mut().broken = true;
        }
        result
    }

    fn run_once(
        &self,
        command: &str,
        body: Option<(&mut Vec<u8>, &[u8], u64)>,
        each: &mut Each<'_>,
    ) -> Result<(), Failed> {
        let (mut body, section, max) = match body {
            Some((b, section, max)) => (Some(b), section, max),
            None => (None, &b""[..], 0),
        };
        let mut w = self.0.borrow_mut();
        w.tags += 1;
        let tag = format!("p{}", w.tags);
        w.stream
            .write_all(format!("{tag} {command}\r\n").as_bytes())?;
        w.stream.flush()?;
        let mut line = Vec::new();
        loop {
            w.line(&mut line)?;
            if let Some(rest) = line
                .strip_prefix(tag.as_bytes())
                .and_then(|r| r.strip_prefix(b" "))
            {
                let text = String::from_utf8_lossy(rest).trim_end().to_string();
                let (status, detail) = text.split_once(' ').unwrap_or((&text, ""));
                return match status.to_ascii_uppercase().as_str() {
                    "OK" => Ok(()),
                    "NO" => Err(Failed::No(detail.to_string())),
                    _ => Err(Failed::Broken(text)),
                };
            }
            if !line.starts_with(b"* ") {
                return Err(Failed::Broken(crate::log::truncated(&line)));
            }
            if line[2..].len() >= 3 && line[2..5].eq_ignore_ascii_case(b"BYE") {
                return Err(Failed::Broken(crate::log::truncated(&line)));
            }
            // Read the response whole: every literal, and the line that continues after it.
            let before = body.as_deref().map_or(0, Vec::len);
            let mut u = Untagged {
                text: Vec::new(),
                body_taken: false,
            };
            // Only FETCH responses carry literals here; any other line is text, whatever its end.
            let fetch = is_fetch(&line);
            loop {
                let Some((text, n)) = split_literal(&line).filter(|_| fetch) else {
                    u.text.extend_from_slice(&line);
                    break;
                };
                u.text.extend_from_slice(text);
                let for_body = body.is_some() && ends_with(text, section) && !u.body_taken;
                if for_body && n > max {
                    // More than was asked for: a server that ignored the partial fetch.
                    return Err(Failed::Broken(format!(
                        "a body of {n} octets for {max} asked"
                    )));
                }
                match body.as_deref_mut() {
                    Some(b) if for_body => {
                        w.literal(n, Some(b))?;
                        u.body_taken = true;
                    }
                    _ => w.literal(n, None)?,
                }
                w.line(&mut line)?;
            }
            each(&u, body.as_deref_mut(), before);
        }
    }

    /// Appends up to `len` octets of message `uid` from `offset` to `out`. `Ok(false)` if the
    /// message is gone: the server answered without it, or with a NIL body (Dovecot does that
    /// for a message another session expunged). Past the end a body is `""` or `{0}`: `Ok(true)`.
    pub fn fetch_body(
        &self,
        uid: u32,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<bool, Failed> {
        let mut found = false;
        let cmd = format!("UID FETCH {uid} (UID BODY.PEEK[]<{offset}.{len}>)");
        // The answer names the section with its origin: BODY[]<offset>.
        let section = format!("BODY[]<{offset}>");
        self.run(
            &cmd,
            Some((out, section.as_bytes(), len)),
            &mut |u, out, before| {
                let ours =
                    is_fetch(&u.text) && number_after(&u.text, b"UID ") == Some(u64::from(uid));
                let body = ours && !found && (u.body_taken || body_is_empty_string(&u.text));
                if body {
                    found = true;
                } else if u.body_taken {
                    // Not ours after all (or a second copy): take back what was appended.
                    if let Some(out) = out {
                        out.truncate(before);
                    }
                }
            },
        )?;
        Ok(found)
    }

    /// The server's capabilities, upper-cased. Read here rather than by the crate, whose
    /// parser fails on an untagged `* NO` (a quota warning) in the response.
    pub fn capabilities(&self) -> Result<Vec<String>, Failed> {
        let mut caps = Vec::new();
        self.run("CAPABILITY", None, &mut |u, _, _| {
            let text = String::from_utf8_lossy(&u.text);
            if let Some(list) = text
                .get(..13)
                .filter(|p| p.eq_ignore_ascii_case("* CAPABILITY "))
                .map(|_| &text[13..])
            {
                caps.extend(list.split_whitespace().map(str::to_ascii_uppercase));
            }
        })?;
        Ok(caps)
    }

    /// `FETCH 1:* (UID RFC822.SIZE FLAGS)`, one message at a time as the lines arrive:
    /// `each(uid, size, flags)` with the flags as the raw list text.
    pub fn list(&self, each: &mut dyn FnMut(u32, u64, &[u8])) -> Result<(), Failed> {
        self.run("FETCH 1:* (UID RFC822.SIZE FLAGS)", None, &mut |u, _, _| {
            if !is_fetch(&u.text) {
                return;
            }
            let uid = number_after(&u.text, b"UID ").and_then(|n| u32::try_from(n).ok());
            let size = number_after(&u.text, b"RFC822.SIZE ");
            if let (Some(uid), Some(size)) = (uid, size) {
                each(uid, size, flags(&u.text));
            }
        })
    }
}

/// `... {123}\r\n` (or `{123+}`): the text before the literal and its length.
fn split_literal(line: &[u8]) -> Option<(&[u8], u64)> {
    let line = line
        .strip_suffix(b"\r\n")
        .or_else(|| line.strip_suffix(b"\n"))?;
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = inner[open + 1..]
        .strip_suffix(b"+")
        .unwrap_or(&inner[open + 1..]);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some((&line[..open], n))
}

/// True if the text before a literal ends with `section` (case-insensitive).
fn ends_with(text: &[u8], section: &[u8]) -> bool {
    let t = trim_end(text);
    t.len() >= section.len() && t[t.len() - section.len()..].eq_ignore_ascii_case(section)
}

fn trim_end(t: &[u8]) -> &[u8] {
    let end = t
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &t[..end]
}

/// `BODY[]` or `BODY[]<n>` followed by `""`: a body that is there but empty (past the end).
fn body_is_empty_string(text: &[u8]) -> bool {
    let Some(i) = text
        .windows(6)
        .position(|w| w.eq_ignore_ascii_case(b"BODY[]"))
    else {
        return false;
    };
    let mut rest = &text[i + 6..];
    if rest.first() == Some(&b'<') {
        match rest.iter().position(|&b| b == b'>') {
            Some(j) => rest = &rest[j + 1..],
            None => return false,
        }
    }
    rest.starts_with(b" \"\"")
}

/// `* n FETCH (`
fn is_fetch(text: &[u8]) -> bool {
    let rest = text.get(2..).unwrap_or_default();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0
        && rest[digits..].len() >= 7
        && rest[digits..digits + 7].eq_ignore_ascii_case(b" FETCH ")
}

/// The number after the data item `item` (e.g. `UID `), where `item` starts an item: after
/// `(` or a space.
fn number_after(text: &[u8], item: &[u8]) -> Option<u64> {
    let mut from = 0;
    while let Some(i) = text[from..]
        .windows(item.len())
        .position(|w| w.eq_ignore_ascii_case(item))
    {
        let at = from + i;
        from = at + 1;
        if at == 0 || !(text[at - 1] == b'(' || text[at - 1] == b' ') {
            continue;
        }
        let digits: &[u8] = &text[at + item.len()..];
        let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 || n > 19 {
            continue;
        }
        return Some(
            digits[..n]
                .iter()
                .fold(0u64, |v, d| v * 10 + u64::from(d - b'0')),
        );
    }
    None
}

/// The text inside `FLAGS (...)`.
fn flags(text: &[u8]) -> &[u8] {
    let Some(i) = text
        .windows(7)
        .position(|w| w.eq_ignore_ascii_case(b"FLAGS ("))
    else {
        return b"";
    };
    let rest = &text[i + 7..];
    let end = rest.iter().position(|&b| b == b')').unwrap_or(rest.len());
    &rest[..end]
}

/// True if the space-separated flag list holds `flag` (case-insensitive, as IMAP flags are).
pub fn has_flag(list: &[u8], flag: &str) -> bool {
    list.split(|&b| b == b' ')
        .any(|f| f.eq_ignore_ascii_case(flag.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server script played back: what it sends, and what it received.
    struct Canned {
        input: Vec<u8>,
        pos: usize,
        piece: usize,
        sent: Vec<u8>,
    }

    impl Read for Canned {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.piece.min(buf.len()).min(self.input.len() - self.pos);
            buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    impl Write for Canned {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn wire(input: &[u8], piece: usize) -> Shared<Canned> {
        Shared::new(Canned {
            input: input.to_vec(),
            pos: 0,
            piece,
            sent: Vec::new(),
        })
    }

    #[test]
    fn reads_a_body_whatever_the_order_and_the_noise_around_it() {
        let body = b"Subject: x\r\n\r\n{5}\r\n) BODY[]<0> {3}\r\n";
        let script = [
            &b"* 4 FETCH (FLAGS (\\Seen) UID 9)\r\n* 3 EXISTS\r\n"[..],
            format!("* 2 FETCH (BODY[]<0> {{{}}}\r\n", body.len()).as_bytes(),
            body,
            b" UID 7)\r\np1 OK done\r\n",
        ]
        .concat();
        for piece in [1, 2, 7, 64, 100_000] {
            let w = wire(&script, piece);
            let mut out = b"before".to_vec();
            assert!(w.fetch_body(7, 0, 1000, &mut out).unwrap(), "piece {piece}");
            assert_eq!(&out[6..], body, "piece {piece}");
            let sent = String::from_utf8(w.0.borrow().stream.sent.clone()).unwrap();
            assert_eq!(sent, "p1 UID FETCH 7 (UID BODY.PEEK[]<0.1000>)\r\n");
        }
    }

    #[test]
    fn an_expunged_message_and_a_past_the_end_body() {
        let w = wire(b"p1 OK nothing\r\n", 64);
        assert!(!w.fetch_body(7, 0, 10, &mut Vec::new()).unwrap());
        let w = wire(b"* 2 FETCH (UID 7 BODY[]<99> \"\")\r\np1 OK done\r\n", 64);
        let mut out = Vec::new();
        assert!(w.fetch_body(7, 99, 10, &mut out).unwrap());
        assert!(out.is_empty());
        let w = wire(b"* 2 FETCH (UID 7 BODY[]<0> {0}\r\n)\r\np1 OK done\r\n", 64);
        assert!(w.fetch_body(7, 0, 10, &mut out).unwrap());
        // Dovecot's answer for a message another session expunged.
        let w = wire(b"* 2 FETCH (UID 7 BODY[]<0> NIL)\r\np1 OK done\r\n", 64);
        assert!(!w.fetch_body(7, 0, 10, &mut out).unwrap());
        let w = wire(b"p1 NO [EXPUNGEISSUED] gone\r\n", 64);
        assert!(
            matches!(w.fetch_body(7, 0, 10, &mut Vec::new()), Err(Failed::No(t)) if t.contains("EXPUNGEISSUED"))
        );
        let w = wire(b"* BYE shutting down\r\n", 64);
        assert!(matches!(
            w.fetch_body(7, 0, 10, &mut Vec::new()),
            Err(Failed::Broken(_))
        ));
        let w = wire(b"* 2 FETCH (UID 7 BODY[]<0> {10}\r\nshort", 64);
        assert!(matches!(
            w.fetch_body(7, 0, 10, &mut Vec::new()),
            Err(Failed::Io(_))
        ));
    }

    #[test]
    fn a_failed_command_leaves_the_stream_unusable() {
        // The first fetch dies inside its literal; the rest of that body looks like an answer
        // to the next command, and must never be taken for one.
        let script = b"* 1 FETCH (UID 8 BODY[]<0> {100}\r\nx\r\n* 1 FETCH (UID 9 BODY[]<0> {6}\r\nEVIL!\n)\r\np2 OK\r\n";
        // The stream ends inside the first literal (as a timeout would cut it).
        let mut out = Vec::new();
        let cut = Shared::new(Canned {
            input: script[..40].to_vec(),
            pos: 0,
            piece: 4096,
            sent: Vec::new(),
        });
        assert!(matches!(
            cut.fetch_body(8, 0, 1000, &mut out),
            Err(Failed::Io(_))
        ));
        assert!(matches!(
            cut.fetch_body(9, 0, 1000, &mut out),
            Err(Failed::Broken(_))
        ));
        let mut buf = [0u8; 8];
        assert!(
            Read::read(&mut cut.clone(), &mut buf).is_err(),
            "the crate can't read either"
        );
    }

    #[test]
    fn a_body_larger_than_asked_or_without_our_origin_is_refused() {
        let w = wire(
            b"* 1 FETCH (UID 7 BODY[]<0> {20}\r\n01234567890123456789)\r\np1 OK\r\n",
            64,
        );
        assert!(matches!(
            w.fetch_body(7, 0, 5, &mut Vec::new()),
            Err(Failed::Broken(_))
        ));
        let w = wire(b"* 1 FETCH (UID 7 BODY[] {5}\r\n01234)\r\np1 OK\r\n", 64);
        let mut out = Vec::new();
        assert!(!w.fetch_body(7, 100, 5, &mut out).unwrap());
        assert!(out.is_empty());
    }

    #[test]
    fn literals_are_read_only_in_fetch_responses() {
        let w = wire(b"* OK [ALERT] text that ends like {12}\r\n* 1 FETCH (UID 7 BODY[]<0> {2}\r\nok)\r\np1 OK\r\n", 64);
        let mut out = Vec::new();
        assert!(w.fetch_body(7, 0, 5, &mut out).unwrap());
        assert_eq!(out, b"ok");
    }

    #[test]
    fn another_messages_body_is_not_taken() {
        let w = wire(b"* 1 FETCH (UID 3 BODY[]<0> {3}\r\nabc)\r\n* 2 FETCH (UID 7 BODY[]<0> {3}\r\nxyz)\r\np1 OK\r\n", 5);
        let mut out = Vec::new();
        assert!(w.fetch_body(7, 0, 10, &mut out).unwrap());
        assert_eq!(out, b"xyz");
    }

    #[test]
    fn lists_uid_size_and_flags() {
        let w = wire(
            b"* 1 FETCH (UID 3 RFC822.SIZE 120 FLAGS (\\Seen $Popped))\r\n\
              * 2 FETCH (FLAGS () RFC822.SIZE 7 UID 4)\r\n* 2 EXISTS\r\np1 OK\r\n",
            3,
        );
        let mut got = Vec::new();
        w.list(&mut |uid, size, flags| {
            got.push((uid, size, String::from_utf8_lossy(flags).into_owned()))
        })
        .unwrap();
        assert_eq!(
            got,
            [
                (3, 120, "\\Seen $Popped".to_string()),
                (4, 7, String::new())
            ]
        );
        assert!(has_flag(b"\\Seen $Popped", "$popped") && !has_flag(b"\\Seen", "$Popped"));
    }

    #[test]
    fn capabilities_survive_an_untagged_no() {
        let w = wire(
            b"* NO [ALERT] Quota exceeded\r\n* CAPABILITY IMAP4rev1 UIDPLUS move\r\np1 OK\r\n",
            9,
        );
        assert_eq!(w.capabilities().unwrap(), ["IMAP4REV1", "UIDPLUS", "MOVE"]);
    }

    #[test]
    fn hands_the_crate_one_line_at_a_time() {
        let mut w = wire(b"* OK a\r\n* OK b\r\nrest", 100);
        let mut buf = [0u8; 64];
        assert_eq!(w.read(&mut buf).unwrap(), 8);
        assert_eq!(w.read(&mut buf).unwrap(), 8);
        assert_eq!(w.read(&mut buf).unwrap(), 4);
        assert_eq!(w.read(&mut buf).unwrap(), 0);
    }
}
