//! The IMAP byte stream, shared between the `imap` crate and the responses aiopopd reads
//! itself: message bodies (`UID FETCH n BODY.PEEK[]<o.l>`), the listing at login, CAPABILITY.
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
//!
//! Body fetches may be sent ahead ([`Shared::prefetch`]) so the server works while the POP3
//! client reads: each is a [`Request`] in a queue whose answers are read as they are needed,
//! every body routed to its request by UID and origin (a server may interleave them), so there
//! is never more than one request open per UID and origin. Answers read before they are wanted
//! are held up to a limit, past which they are dropped and asked for again when wanted. Before
//! any other command, ours or the crate's, the queue is drained and its answers thrown away.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::rc::Rc;

/// A response line longer than this is a broken or hostile server.
const MAX_LINE: usize = 64 << 10;
const BUF: usize = 64 << 10;

/// Reads the stream in lines and literals.
struct Reader<S> {
    stream: S,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// A body fetch sent and not yet taken by `fetch_body`.
struct Request {
    tag: String,
    uid: u32,
    offset: u64,
    len: u64,
    /// What it was expected to hold in memory once answered, for `prefetch`'s budget.
    cost: u64,
    /// The body, once read (empty for `""`); `None` until then, or for good if the server
    /// answered without it.
    body: Option<Vec<u8>>,
    /// The tagged answer once read: `Ok`, or the text of a NO.
    done: Option<Result<(), String>>,
    /// The body came but was thrown away (over the limit of what is held): ask again.
    dropped: bool,
}

impl Request {
    fn at(&self, uid: u32, offset: u64) -> bool {
        (self.uid, self.offset) == (uid, offset)
    }

    fn open(&self) -> bool {
        self.body.is_none() && !self.dropped && self.done.is_none()
    }
}

struct Wire<S> {
    io: Reader<S>,
    requests: VecDeque<Request>,
    /// How many octets of answers read before they were wanted may be held (`prefetch` sets it).
    hold: u64,
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
            io: Reader {
                stream,
                buf: vec![0; BUF].into_boxed_slice(),
                start: 0,
                end: 0,
            },
            requests: VecDeque::new(),
            hold: 0,
            tags: 0,
            broken: false,
        })))
    }
}

impl<S: Read> Reader<S> {
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

impl<S: Read + Write> Read for Shared<S> {
    /// At most one line per call (see the module comment).
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut w = self.0.borrow_mut();
        w.ready_for_other_command().map_err(into_io)?;
        let r = &mut w.io;
        if r.start == r.end && !r.fill()? {
            return Ok(0);
        }
        let avail = &r.buf[r.start..r.end];
        let line = memchr::memchr(b'\n', avail).map_or(avail.len(), |i| i + 1);
        let n = line.min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        r.start += n;
        Ok(n)
    }
}

impl<S: Read + Write> Write for Shared<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut w = self.0.borrow_mut();
        w.ready_for_other_command().map_err(into_io)?;
        w.io.stream.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().io.stream.flush()
    }
}

fn into_io(e: Failed) -> io::Error {
    match e {
        Failed::Io(e) => e,
        Failed::No(t) | Failed::Broken(t) => io::Error::other(t),
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

/// A tagged status line: OK, or the text of a NO; anything else breaks the stream.
fn status(line: &[u8], rest: &[u8]) -> Result<Result<(), String>, Failed> {
    let text = String::from_utf8_lossy(rest).trim_end().to_string();
    let (status, detail) = text.split_once(' ').unwrap_or((&text, ""));
    match status.to_ascii_uppercase().as_str() {
        "OK" => Ok(Ok(())),
        "NO" => Ok(Err(detail.to_string())),
        _ => Err(Failed::Broken(crate::log::truncated(line))),
    }
}

/// The text after `tag ` if `line` is tagged with it.
fn tagged<'a>(line: &'a [u8], tag: &str) -> Option<&'a [u8]> {
    line.strip_prefix(tag.as_bytes())?.strip_prefix(b" ")
}

/// An untagged `BYE`: the server is going away.
fn is_bye(line: &[u8]) -> bool {
    line.get(2..5)
        .is_some_and(|w| w.eq_ignore_ascii_case(b"BYE"))
}

/// A body literal and the origin it was sent for.
type Body = (u64, Vec<u8>);

impl<S: Read> Reader<S> {
    /// Reads the rest of the untagged response that starts with `line`: every literal, and the
    /// line that continues after each. Returns the text outside the literals and, if a literal
    /// followed `BODY[]<origin>` and `room(origin)` says a request takes it (the most octets a
    /// request at that origin asked for), that origin and literal; a literal longer than that
    /// is a server ignoring the partial fetch, and breaks the stream. Others are skipped. Only
    /// FETCH responses carry literals here; any other line is text, whatever its end.
    fn response(
        &mut self,
        mut line: Vec<u8>,
        room: &dyn Fn(u64) -> Option<u64>,
    ) -> Result<(Vec<u8>, Option<Body>), Failed> {
        let fetch = is_fetch(&line);
        let mut text = Vec::new();
        let mut body = None;
        loop {
            let Some((before, n)) = split_literal(&line).filter(|_| fetch) else {
                text.extend_from_slice(&line);
                return Ok((text, body));
            };
            text.extend_from_slice(before);
            let wanted = body_origin(before)
                .filter(|_| body.is_none())
                .and_then(|o| room(o).map(|max| (o, max)));
            match wanted {
                Some((_, max)) if n > max => {
                    // More than was asked for: a server that ignored the partial fetch.
                    return Err(Failed::Broken(format!(
                        "a body of {n} octets for {max} asked"
                    )));
                }
                Some((origin, _)) => {
                    // n <= max, which is at most a chunk.
                    let mut b = Vec::with_capacity(n as usize);
                    self.literal(n, Some(&mut b))?;
                    body = Some((origin, b));
                }
                None => self.literal(n, None)?,
            }
            self.line(&mut line)?;
        }
    }
}

impl<S: Read + Write> Wire<S> {
    fn usable(&self) -> Result<(), Failed> {
        if self.broken {
            return Err(Failed::Broken("the IMAP connection failed earlier".into()));
        }
        Ok(())
    }

    /// Marks the stream unusable after a failure that isn't a tagged NO.
    fn check<T>(&mut self, result: Result<T, Failed>) -> Result<T, Failed> {
        if matches!(result, Err(Failed::Io(_)) | Err(Failed::Broken(_))) {
            self.broken = true;
        }
        result
    }

    /// Before any command other than a body fetch: read every answer still owed and forget
    /// them, so the next response on the stream belongs to that command.
    fn ready_for_other_command(&mut self) -> Result<(), Failed> {
        self.usable()?;
        if self.requests.is_empty() {
            return Ok(());
        }
        self.requests.retain(|r| r.done.is_none());
        // Nothing kept: the bodies still to come are read and thrown away.
        self.hold = 0;
        let drained = self.pump_until(None, |w| w.requests.iter().all(|r| r.done.is_some()));
        self.requests.clear();
        self.check(drained)
    }

    /// Sends these body fetches, in one write: (uid, offset, len, cost).
    fn send(&mut self, fetches: &[(u32, u64, u64, u64)]) -> Result<(), Failed> {
        let mut out = String::new();
        for &(uid, offset, len, cost) in fetches {
            self.tags += 1;
            let tag = format!("p{}", self.tags);
            let _ = write!(
                out,
                "{tag} UID FETCH {uid} (UID BODY.PEEK[]<{offset}.{len}>)\r\n"
            );
            self.requests.push_back(Request {
                tag,
                uid,
                offset,
                len,
                cost,
                body: None,
                done: None,
                dropped: false,
            });
        }
        self.io.stream.write_all(out.as_bytes())?;
        self.io.stream.flush()?;
        Ok(())
    }

    /// Reads responses to the queued requests until `enough`. The body of request `wanted` is
    /// always kept; others only while what is held stays within `hold`.
    fn pump_until(
        &mut self,
        wanted: Option<usize>,
        enough: impl Fn(&Self) -> bool,
    ) -> Result<(), Failed> {
        let mut line = Vec::new();
        while !enough(self) {
            self.io.line(&mut line)?;
            if !line.starts_with(b"* ") {
                let request = self
                    .requests
                    .iter_mut()
                    .find(|r| r.done.is_none() && tagged(&line, &r.tag).is_some());
                let Some(r) = request else {
                    return Err(Failed::Broken(crate::log::truncated(&line)));
                };
                r.done = Some(status(&line, tagged(&line, &r.tag).unwrap_or_default())?);
                continue;
            }
            if is_bye(&line) {
                return Err(Failed::Broken(crate::log::truncated(&line)));
            }
            let requests = &self.requests;
            let held: u64 = requests
                .iter()
                .filter_map(|r| r.body.as_ref())
                .map(|b| b.len() as u64)
                .sum();
            let hold = self.hold;
            // Any open request's body is read (to know it came, and for whom); whether it is
            // kept is decided below.
            let room = |origin: u64| {
                requests
                    .iter()
                    .filter(|r| r.offset == origin && r.open())
                    .map(|r| r.len)
                    .max()
            };
            let (text, body) = self.io.response(std::mem::take(&mut line), &room)?;
            if !is_fetch(&text) {
                continue;
            }
            let Some(uid) = number_after(&text, b"UID ") else {
                continue;
            };
            let Some((origin, body)) = body.or_else(|| quoted_body(&text)) else {
                continue;
            };
            let request = self
                .requests
                .iter_mut()
                .enumerate()
                .find(|(_, r)| u64::from(r.uid) == uid && r.offset == origin && r.open());
            // Not ours (or a second copy): dropped.
            if let Some((i, r)) = request {
                if body.len() as u64 > r.len {
                    return Err(Failed::Broken(format!(
                        "a body of {} octets for {} asked",
                        body.len(),
                        r.len
                    )));
                }
                if wanted == Some(i) || held + body.len() as u64 <= hold {
                    r.body = Some(body);
                } else {
                    r.dropped = true;
                }
            }
        }
        Ok(())
    }

    /// The answer to the fetch (uid, offset, len): one sent ahead (its body cut to `len` if it
    /// asked for more), or one sent now.
    fn take(&mut self, uid: u32, offset: u64, len: u64) -> Result<Request, Failed> {
        if let Some(i) = self.requests.iter().position(|r| r.at(uid, offset)) {
            self.pump_until(Some(i), |w| w.requests[i].done.is_some())?;
            let mut r = self.requests.remove(i).expect("the index was just found");
            if r.len >= len && !r.dropped {
                if let Some(body) = &mut r.body {
                    body.truncate(usize::try_from(len).unwrap_or(usize::MAX));
                }
                return Ok(r);
            }
            // Asked for less, or thrown away: ask again, now that no answer can go astray.
        }
        self.send(&[(uid, offset, len, len)])?;
        let i = self.requests.len() - 1;
        self.pump_until(Some(i), |w| w.requests[i].done.is_some())?;
        Ok(self.requests.remove(i).expect("the index was just found"))
    }
}

impl<S: Read + Write> Shared<S> {
    /// Sends `command` with a fresh tag of ours and reads the responses, handing the text of
    /// each untagged one (literals left out) to `each`. A failure other than a tagged NO leaves
    /// the stream unusable.
    fn run(&self, command: &str, each: &mut dyn FnMut(&[u8])) -> Result<(), Failed> {
        let mut w = self.0.borrow_mut();
        w.ready_for_other_command()?;
        let result = Self::run_once(&mut w, command, each);
        w.check(result)
    }

    fn run_once(w: &mut Wire<S>, command: &str, each: &mut dyn FnMut(&[u8])) -> Result<(), Failed> {
        w.tags += 1;
        let tag = format!("p{}", w.tags);
        w.io.stream
            .write_all(format!("{tag} {command}\r\n").as_bytes())?;
        w.io.stream.flush()?;
        let mut line = Vec::new();
        loop {
            w.io.line(&mut line)?;
            if let Some(rest) = tagged(&line, &tag) {
                return status(&line, rest)?.map_err(Failed::No);
            }
            if !line.starts_with(b"* ") || is_bye(&line) {
                return Err(Failed::Broken(crate::log::truncated(&line)));
            }
            let (text, _) = w.io.response(std::mem::take(&mut line), &|_| None)?;
            each(&text);
        }
    }

    /// Appends up to `len` octets of message `uid` from `offset` to `out`. `Ok(false)` if the
    /// message is gone: the server answered without it, or with a NIL body (Dovecot does that
    /// for a message another session expunged). Past the end a body is `""` or `{0}`: `Ok(true)`.
    /// A body may come as a literal or as a quoted string.
    pub fn fetch_body(
        &self,
        uid: u32,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<bool, Failed> {
        let mut w = self.0.borrow_mut();
        w.usable()?;
        let taken = w.take(uid, offset, len);
        let r = w.check(taken)?;
        r.done.expect("taken when done").map_err(Failed::No)?;
        match r.body {
            Some(body) if out.is_empty() => *out = body,
            Some(body) => out.extend_from_slice(&body),
            None => return Ok(false),
        }
        Ok(true)
    }

    /// Sends fetches of the first `len` octets of the messages `next` (uid, expected size) ahead,
    /// nearest first: the nearest whatever its size, then as many as fit in `budget` octets and
    /// `most` commands, counting those already sent; `fetch_body` then finds their answers.
    /// Answers read before they are wanted (another fetch came first) are held up to `budget`
    /// octets, whatever the sizes said; past that they are dropped and fetched again when
    /// wanted. Answers held for messages no longer in the window are forgotten. A failure is
    /// left for the fetch that would meet it.
    pub fn prefetch(
        &self,
        len: u64,
        budget: u64,
        most: usize,
        next: &mut dyn Iterator<Item = (u32, u64)>,
    ) {
        let mut w = self.0.borrow_mut();
        if w.broken {
            return;
        }
        let mut window = Vec::new();
        let mut total = 0;
        for (uid, size) in next.take(most) {
            let cost = size.min(len);
            if total + cost > budget && !window.is_empty() {
                break;
            }
            total += cost;
            window.push((uid, 0, len, cost));
        }
        w.hold = budget;
        w.requests
            .retain(|r| r.done.is_none() || window.iter().any(|&(u, o, _, _)| r.at(u, o)));
        let mut queued: u64 = w.requests.iter().map(|r| r.cost).sum();
        window.retain(|&(u, o, _, _)| !w.requests.iter().any(|r| r.at(u, o)));
        let mut send = Vec::new();
        for f in window {
            let count = w.requests.len() + send.len();
            if (queued + f.3 > budget && count > 0) || count >= most {
                break;
            }
            queued += f.3;
            send.push(f);
        }
        if !send.is_empty() {
            let sent = w.send(&send);
            let _ = w.check(sent);
        }
    }

    /// The server's capabilities, upper-cased. Read here rather than by the crate, whose
    /// parser fails on an untagged `* NO` (a quota warning) in the response.
    pub fn capabilities(&self) -> Result<Vec<String>, Failed> {
        let mut caps = Vec::new();
        self.run("CAPABILITY", &mut |text| {
            let text = String::from_utf8_lossy(text);
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
    /// `each(uid, size, flags)` with the flags as the raw list text. A server may split one
    /// message's items over several FETCH responses (RFC 3501 lets it send any of them at any
    /// time): they are put together by message number, up to `exists` (what EXAMINE said, or
    /// an EXISTS during the listing), and so kept for at most that many messages, with at most `MAX_SPLIT_FLAGS` octets of flags
    /// each. A message whose FLAGS never came is listed as if it had none: served twice is
    /// better than never served.
    pub fn list(&self, exists: u32, each: &mut dyn FnMut(u32, u64, &[u8])) -> Result<(), Failed> {
        let mut parts: HashMap<u64, Parts> = HashMap::new();
        let mut exists = u64::from(exists);
        self.run("FETCH 1:* (UID RFC822.SIZE FLAGS)", &mut |text| {
            let Some(seq) = fetch_number(text) else {
                if let Some(n) = exists_number(text) {
                    exists = exists.max(n);
                }
                return;
            };
            let uid = number_after(text, b"UID ").and_then(|n| u32::try_from(n).ok());
            let size = number_after(text, b"RFC822.SIZE ");
            let flags = flags(text);
            if let (Some(uid), Some(size), Some(flags)) = (uid, size, flags) {
                // The usual case: all in one response.
                parts.remove(&seq);
                return each(uid, size, flags);
            }
            if seq == 0 || seq > exists {
                return;
            }
            let p = parts.entry(seq).or_default();
            p.uid = p.uid.or(uid);
            p.size = p.size.or(size);
            if let Some(f) = flags {
                // Cut between flags, never inside one (a cut keyword could be another).
                let keep = if f.len() <= MAX_SPLIT_FLAGS {
                    f.len()
                } else {
                    f[..MAX_SPLIT_FLAGS]
                        .iter()
                        .rposition(|&b| b == b' ')
                        .unwrap_or(0)
                };
                p.flags = Some(f[..keep].to_vec());
            }
            if let (Some(uid), Some(size), Some(flags)) = (p.uid, p.size, &p.flags) {
                each(uid, size, flags);
                parts.remove(&seq);
            }
        })?;
        let mut rest: Vec<_> = parts.into_values().collect();
        rest.sort_by_key(|p| p.uid);
        for p in rest {
            if let (Some(uid), Some(size)) = (p.uid, p.size) {
                each(uid, size, p.flags.as_deref().unwrap_or_default());
            }
        }
        Ok(())
    }
}

/// Flags kept of a message whose listing is split over several responses (a longer list is
/// cut: a keyword lost there can only make a message be listed, never hidden).
const MAX_SPLIT_FLAGS: usize = 1024;

/// What has come of one message's listing so far.
#[derive(Default)]
struct Parts {
    uid: Option<u32>,
    size: Option<u64>,
    flags: Option<Vec<u8>>,
}

/// `... {123}\r\n` (or `{123+}`): the text before the literal and its length.
fn split_literal(line: &[u8]) -> Option<(&[u8], u64)> {
    let line = line
        .strip_suffix(b"\r\n")
        .or_else(|| line.strip_suffix(b"\n"))?;
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let n = inner[open + 1..]
        .strip_suffix(b"+")
        .unwrap_or(&inner[open + 1..]);
    Some((&line[..open], digits(n)?))
}

/// The origin of a text that ends with `BODY[]<origin>` (before a literal).
fn body_origin(text: &[u8]) -> Option<u64> {
    let t = trim_end(text).strip_suffix(b">")?;
    let open = t.iter().rposition(|&b| b == b'<')?;
    let section = &t[..open];
    if section.len() < 6 || !section[section.len() - 6..].eq_ignore_ascii_case(b"BODY[]") {
        return None;
    }
    digits(&t[open + 1..])
}

fn digits(d: &[u8]) -> Option<u64> {
    if d.is_empty() || d.len() > 19 || !d.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(d.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

fn trim_end(t: &[u8]) -> &[u8] {
    let end = t
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &t[..end]
}

/// `BODY[]<origin> "..."`: a body sent as a quoted string (short, without CR or LF; usually
/// `""`, past the end): its origin and octets.
fn quoted_body(text: &[u8]) -> Option<Body> {
    let i = text
        .windows(7)
        .position(|w| w.eq_ignore_ascii_case(b"BODY[]<"))?;
    let rest = &text[i + 7..];
    let close = rest.iter().position(|&b| b == b'>')?;
    let origin = digits(&rest[..close])?;
    let mut quoted = rest[close + 1..].strip_prefix(b" \"")?.iter();
    let mut body = Vec::new();
    loop {
        match quoted.next()? {
            b'"' => return Some((origin, body)),
            b'\\' => body.push(*quoted.next()?),
            &c => body.push(c),
        }
    }
}

/// `* n FETCH (`
fn is_fetch(text: &[u8]) -> bool {
    fetch_number(text).is_some()
}

/// The message number of `* n FETCH (`.
fn fetch_number(text: &[u8]) -> Option<u64> {
    let rest = text.strip_prefix(b"* ")?;
    let n = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let fetch = rest.get(n..n + 7)?;
    fetch
        .eq_ignore_ascii_case(b" FETCH ")
        .then(|| digits(&rest[..n]))?
}

/// The number of `* n EXISTS`.
fn exists_number(text: &[u8]) -> Option<u64> {
    let rest = text.strip_prefix(b"* ")?;
    let n = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let word = trim_end(rest.get(n..)?);
    word.eq_ignore_ascii_case(b" EXISTS")
        .then(|| digits(&rest[..n]))?
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
fn flags(text: &[u8]) -> Option<&[u8]> {
    let i = text
        .windows(7)
        .position(|w| w.eq_ignore_ascii_case(b"FLAGS ("))?;
    let rest = &text[i + 7..];
    let end = rest.iter().position(|&b| b == b')').unwrap_or(rest.len());
    Some(&rest[..end])
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
            let sent = String::from_utf8(w.0.borrow().io.stream.sent.clone()).unwrap();
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

    /// What `list` hands on for this server script: (uid, size, flags).
    fn listed(script: &[u8], piece: usize) -> Vec<(u32, u64, String)> {
        let mut got = Vec::new();
        wire(script, piece)
            .list(10, &mut |uid, size, flags| {
                got.push((uid, size, String::from_utf8_lossy(flags).into_owned()))
            })
            .unwrap();
        got
    }

    #[test]
    fn lists_uid_size_and_flags() {
        let got = listed(
            b"* 1 FETCH (UID 3 RFC822.SIZE 120 FLAGS (\\Seen $Popped))\r\n\
              * 2 FETCH (FLAGS () RFC822.SIZE 7 UID 4)\r\n* 2 EXISTS\r\np1 OK\r\n",
            3,
        );
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
    fn a_listing_split_over_several_responses_is_put_together() {
        let got = listed(
            b"* 1 FETCH (UID 3)\r\n* 2 FETCH (FLAGS (\\Seen))\r\n\
              * 1 FETCH (RFC822.SIZE 120 FLAGS (\\Seen))\r\n\
              * 2 FETCH (UID 4 RFC822.SIZE 7 FLAGS ())\r\n\
              * 3 FETCH (UID 5 RFC822.SIZE 9)\r\n* 2 FETCH (FLAGS (\\Deleted))\r\np1 OK\r\n",
            11,
        );
        assert_eq!(
            got,
            [
                (3, 120, "\\Seen".to_string()),
                (4, 7, String::new()),
                // FLAGS never came: listed as if it had none.
                (5, 9, String::new()),
            ]
        );
    }

    #[test]
    fn a_split_listing_keeps_to_exists_and_cuts_flags_between_words() {
        let long = format!("{} POP3RetrievedOld", "k".repeat(1010));
        let script = format!(
            "* 1 FETCH (UID 3)\r\n* 1 FETCH (RFC822.SIZE 9 FLAGS ({long}))\r\n\
             * 7 FETCH (UID 70)\r\n* 7 FETCH (RFC822.SIZE 1 FLAGS ())\r\n\
             * 3 EXISTS\r\n* 3 FETCH (UID 30)\r\n* 3 FETCH (RFC822.SIZE 2 FLAGS ())\r\np1 OK\r\n"
        );
        let mut got = Vec::new();
        wire(script.as_bytes(), 50)
            .list(2, &mut |uid, size, flags| {
                got.push((uid, size, String::from_utf8_lossy(flags).into_owned()))
            })
            .unwrap();
        // Message 7 is beyond every EXISTS; 3 came with an EXISTS during the listing.
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [3, 30]);
        assert_eq!(got[0].2, "k".repeat(1010), "cut between flags");
        assert!(!has_flag(got[0].2.as_bytes(), "POP3Retrieved"));
    }

    #[test]
    fn a_body_may_be_a_quoted_string() {
        let w = wire(
            b"* 2 FETCH (UID 7 BODY[]<256> \"a\\\"b\\\\c\")\r\np1 OK\r\n",
            4,
        );
        let mut out = Vec::new();
        assert!(w.fetch_body(7, 256, 100, &mut out).unwrap());
        assert_eq!(out, b"a\"b\\c");
    }

    #[test]
    fn capabilities_survive_an_untagged_no() {
        let w = wire(
            b"* NO [ALERT] Quota exceeded\r\n* CAPABILITY IMAP4rev1 UIDPLUS move\r\np1 OK\r\n",
            9,
        );
        assert_eq!(w.capabilities().unwrap(), ["IMAP4REV1", "UIDPLUS", "MOVE"]);
    }

    fn sent(w: &Shared<Canned>) -> String {
        String::from_utf8(w.0.borrow().io.stream.sent.clone()).unwrap()
    }

    fn body(uid: u32, origin: u64, data: &str) -> String {
        format!(
            "* 1 FETCH (UID {uid} BODY[]<{origin}> {{{}}}\r\n{data})\r\n",
            data.len()
        )
    }

    #[test]
    fn fetches_sent_ahead_are_answered_from_the_queue_in_any_order() {
        // Answers arrive interleaved and out of order, as RFC 3501 allows.
        let script = [
            body(8, 0, "eight"),
            "p2 OK\r\n".into(),
            body(7, 0, "seven"),
            "* 9 EXISTS\r\np1 OK\r\n".into(),
            "* 3 FETCH (UID 9 BODY[]<0> NIL)\r\np3 OK\r\n".into(),
        ]
        .concat();
        let w = wire(script.as_bytes(), 7);
        let mut next = [(7, 5), (8, 5), (9, 5)].into_iter();
        w.prefetch(100, 1000, 16, &mut next);
        assert_eq!(
            sent(&w),
            "p1 UID FETCH 7 (UID BODY.PEEK[]<0.100>)\r\n\
             p2 UID FETCH 8 (UID BODY.PEEK[]<0.100>)\r\n\
             p3 UID FETCH 9 (UID BODY.PEEK[]<0.100>)\r\n"
        );
        let mut out = Vec::new();
        assert!(w.fetch_body(8, 0, 100, &mut out).unwrap());
        assert_eq!(out, b"eight");
        out.clear();
        assert!(w.fetch_body(7, 0, 100, &mut out).unwrap());
        assert_eq!(out, b"seven");
        assert!(!w.fetch_body(9, 0, 100, &mut out).unwrap(), "gone");
        assert_eq!(sent(&w).lines().count(), 3, "nothing asked twice");
    }

    #[test]
    fn prefetch_keeps_to_its_budget_and_never_asks_twice() {
        let w = wire(b"", 64);
        // The nearest is sent whatever its size; then what fits in 100 octets, at most 3.
        let sizes = [(1, 500), (2, 40), (3, 40), (4, 40), (5, 1)];
        w.prefetch(1000, 100, 3, &mut sizes.into_iter());
        assert_eq!(sent(&w).lines().count(), 1, "{}", sent(&w));
        let w = wire(b"", 64);
        w.prefetch(1000, 100, 3, &mut sizes[1..].iter().copied());
        assert_eq!(sent(&w).lines().count(), 2);
        w.prefetch(1000, 100, 3, &mut sizes[1..].iter().copied());
        assert_eq!(sent(&w).lines().count(), 2, "already in flight");
        assert!(sent(&w).contains("UID FETCH 3 "));
    }

    #[test]
    fn any_other_command_first_drains_what_was_sent_ahead() {
        let script = [
            body(7, 0, "seven"),
            "p1 OK\r\n".into(),
            "p2 NO [EXPUNGEISSUED] gone\r\n".into(),
            "* CAPABILITY IMAP4rev1\r\np3 OK\r\n".into(),
            "* OK for the crate\r\n".into(),
        ]
        .concat();
        let mut w = wire(script.as_bytes(), 5);
        w.prefetch(100, 1000, 16, &mut [(7, 5), (8, 5)].into_iter());
        assert_eq!(w.capabilities().unwrap(), ["IMAP4REV1"]);
        let mut line = Vec::new();
        let mut buf = [0u8; 64];
        while !line.ends_with(b"\n") {
            let n = w.read(&mut buf).unwrap();
            line.extend_from_slice(&buf[..n]);
        }
        assert_eq!(line, b"* OK for the crate\r\n");
        // The answers were forgotten: a fetch now asks again.
        assert!(w.fetch_body(7, 0, 100, &mut Vec::new()).is_err());
        assert!(sent(&w).ends_with("p4 UID FETCH 7 (UID BODY.PEEK[]<0.100>)\r\n"));
    }

    #[test]
    fn one_request_open_per_message_and_origin() {
        // A TOP (less asked) of a message fetched ahead takes that answer, cut; a RETR after it
        // asks again. No second request for the same place is ever open, so an answer can't
        // go to the wrong one, however the server interleaves them.
        let x = "x".repeat(80);
        let script = [
            body(7, 0, &x),
            "p1 OK\r\n".into(),
            body(7, 0, &x),
            "p2 OK\r\n".into(),
        ]
        .concat();
        let w = wire(script.as_bytes(), 9);
        w.prefetch(100, 1000, 16, &mut [(7, 80)].into_iter());
        let mut out = Vec::new();
        assert!(w.fetch_body(7, 0, 50, &mut out).unwrap());
        assert_eq!(out.len(), 50);
        assert_eq!(sent(&w).lines().count(), 1, "the TOP sent nothing");
        out.clear();
        assert!(w.fetch_body(7, 0, 100, &mut out).unwrap());
        assert_eq!(out.len(), 80);
        assert_eq!(sent(&w).lines().count(), 2);
    }

    #[test]
    fn answers_read_early_are_held_within_the_budget_whatever_the_sizes_said() {
        // Listed as 1 octet each, served as 100: only 150 octets of early answers are kept;
        // one dropped is fetched again when wanted.
        let b = "b".repeat(100);
        let script = [
            body(1, 0, &b),
            "p1 OK\r\n".into(),
            body(2, 0, &b),
            "p2 OK\r\n".into(),
            body(3, 0, &b),
            "p3 OK\r\n".into(),
            body(9, 0, "nine"),
            "p4 OK\r\n".into(),
            body(2, 0, &b),
            "p5 OK\r\n".into(),
        ]
        .concat();
        let w = wire(script.as_bytes(), 64);
        w.prefetch(100, 150, 16, &mut [(1, 1), (2, 1), (3, 1)].into_iter());
        let mut out = Vec::new();
        assert!(w.fetch_body(9, 0, 100, &mut out).unwrap());
        assert_eq!(out, b"nine");
        let held: usize =
            w.0.borrow()
                .requests
                .iter()
                .filter_map(|r| r.body.as_ref())
                .map(Vec::len)
                .sum();
        assert!(held <= 150, "{held}");
        for uid in [2, 1] {
            out.clear();
            assert!(w.fetch_body(uid, 0, 100, &mut out).unwrap(), "uid {uid}");
            assert_eq!(out, b.as_bytes(), "uid {uid}");
        }
        assert!(sent(&w).ends_with("p5 UID FETCH 2 (UID BODY.PEEK[]<0.100>)\r\n"));
    }

    #[test]
    fn an_answer_past_the_limit_is_asked_again_never_taken_for_gone() {
        // Past what may be held, uid 2's early answer is dropped; asked for later, it is
        // fetched again (not "gone"). A shorter request at the same origin (a TOP of uid 5)
        // doesn't make the longer early answer look like a server ignoring the length.
        let b = "b".repeat(200);
        let script = [
            body(1, 0, &b),
            "p1 OK\r\n".into(),
            body(2, 0, &b),
            "p2 OK\r\n".into(),
            body(5, 0, "top"),
            "p3 OK\r\n".into(),
            body(2, 0, &b),
            "p4 OK\r\n".into(),
        ]
        .concat();
        let w = wire(script.as_bytes(), 64);
        w.prefetch(256, 200, 16, &mut [(1, 1), (2, 1)].into_iter());
        let mut out = Vec::new();
        assert!(w.fetch_body(5, 0, 64, &mut out).unwrap());
        assert_eq!(out, b"top");
        for uid in [2, 1] {
            out.clear();
            assert!(w.fetch_body(uid, 0, 256, &mut out).unwrap(), "uid {uid}");
            assert_eq!(out, b.as_bytes(), "uid {uid}");
        }
        assert_eq!(sent(&w).lines().count(), 4);
    }

    #[test]
    fn a_fetch_for_something_not_sent_ahead_reads_past_those_that_were() {
        // A second chunk of message 7 while 8 was fetched ahead: 8's answer is kept.
        let script = [
            body(8, 0, "eight"),
            "p1 OK\r\n".into(),
            body(7, 100, "rest"),
            "p2 OK\r\n".into(),
        ]
        .concat();
        let w = wire(script.as_bytes(), 3);
        w.prefetch(100, 1000, 16, &mut [(8, 5)].into_iter());
        let mut out = Vec::new();
        assert!(w.fetch_body(7, 100, 100, &mut out).unwrap());
        assert_eq!(out, b"rest");
        out.clear();
        assert!(w.fetch_body(8, 0, 100, &mut out).unwrap());
        assert_eq!(out, b"eight");
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
