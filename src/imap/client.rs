//! The blocking IMAP driver: one read buffer, the decoder, tags, the queue of body fetches sent
//! ahead, a deadline on every command, and a failure that sticks.
//!
//! Every byte the server sends passes through [`proto::Decoder`] and its bounds; nothing else
//! reads the stream. A command's deadline (`timeout`) runs from when it is sent (or, for a fetch
//! sent ahead, from when its answer is first waited for) to its tagged reply, however slowly the
//! bytes trickle in. After anything other than a tagged NO (an I/O error, a timeout, a BAD, a
//! BYE, a crossed bound) the stream is out of step or untrustworthy, and every later call fails
//! at once: the rest of a cut response (even a message body made to look like IMAP) is never
//! read as the answer to another command.
//!
//! Body fetches may be sent ahead ([`Client::prefetch`]) so the server works while the POP3
//! client reads: each is a [`Request`] whose answer is read when it is needed, every body routed
//! to its request by UID and origin (a server may interleave them); one request open per UID and
//! origin. Answers read before they are wanted are held up to a limit, past which they are
//! dropped and asked for again. Before any other command the queue is drained.

use super::proto::{self, Body, Code, Decoder, Fetch, Response, Status, Violation};
use crate::secret::Secret;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};
use zeroize::Zeroize;

/// What the driver reads from and writes to.
pub trait Transport: Read + Write {
    /// The longest the next read may wait.
    fn set_read_timeout(&mut self, left: Duration) -> io::Result<()>;
}

/// The read buffer.
const BUF: usize = 64 << 10;
/// Listing entries kept, whatever the server says EXISTS is (16 octets each in the snapshot).
pub const MAX_LISTED: usize = 500_000;
/// A size no message has; beyond it RFC822.SIZE is garbage (and sums can't overflow).
pub const MAX_SIZE: u64 = 1 << 40;
/// Listing entries split over several responses and not yet complete.
const MAX_PENDING: usize = 20_000;
/// Messages left out of the listing that are logged one by one; the rest are counted.
const MAX_LEFT_OUT_LOGGED: usize = 20;
/// Challenges in one AUTHENTICATE exchange (SCRAM needs 2, CRAM-MD5 and PLAIN 1).
pub const MAX_SASL_ROUNDS: usize = 8;

/// How a command failed.
#[derive(Debug)]
pub enum Failure {
    /// A tagged NO: the command failed, the connection is fine.
    No { code: Option<Code>, text: String },
    /// Anything else: I/O, timeout, BAD, BYE, a crossed bound, a protocol violation. Sticks.
    Broken(String),
    /// The deadline passed. Sticks.
    Timeout(String),
}

impl Failure {
    /// For the log: the server's text, never trusted to be short.
    pub fn detail(&self) -> String {
        match self {
            Failure::No { code, text } => match code {
                Some(c) => format!("NO [{} {}] {}", c.name, c.args, text).replace(" ]", "]"),
                None => format!("NO {text}"),
            },
            Failure::Broken(t) | Failure::Timeout(t) => t.clone(),
        }
    }
}

/// A body fetch sent and not yet taken by `fetch_body`.
struct Request {
    tag: String,
    uid: u32,
    offset: u64,
    len: u64,
    /// What it was expected to hold in memory once answered, for `prefetch`'s budget.
    cost: u64,
    /// The body once read (empty for `""`); `None` until then, or for good if the server
    /// answered without one.
    body: Option<Vec<u8>>,
    /// The server answered NIL: no such body.
    nil: bool,
    /// The tagged answer once read: `Ok`, or the NO.
    done: Option<Result<(), (Option<Code>, String)>>,
    /// The body came but was thrown away (over the limit of what is held): ask again.
    dropped: bool,
}

impl Request {
    fn at(&self, uid: u32, offset: u64) -> bool {
        (self.uid, self.offset) == (uid, offset)
    }

    fn open(&self) -> bool {
        self.body.is_none() && !self.nil && !self.dropped && self.done.is_none()
    }
}

/// Mailboxes kept from one LIST.
pub const MAX_LISTED_MAILBOXES: usize = 10_000;

/// One mailbox of a LIST: its name as the server writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxEntry {
    pub attributes: Vec<String>,
    pub delimiter: Option<String>,
    pub name: String,
}

/// What SELECT/EXAMINE told us.
#[derive(Debug, Default)]
pub struct Selected {
    pub exists: u32,
    pub uidvalidity: Option<u32>,
    pub permanent_flags: Option<Vec<String>>,
}

/// One message of the listing: `marks` has bit i set if it carries the i-th flag asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub uid: u32,
    pub size: u64,
    pub marks: u8,
}

/// The listing, and what was left out of it and why (for the log).
#[derive(Debug, Default)]
pub struct Listing {
    pub entries: Vec<Entry>,
    /// Each entry's stable identifier, when one was asked for (`list`'s `id_item`).
    pub ids: Vec<Box<str>>,
    /// Entries taken in (kept, filtered out or left out): never more than EXISTS.
    pub seen: u64,
    /// `(description, why)` of the first messages left out.
    pub left_out: Vec<String>,
    pub left_out_count: usize,
    /// Entries past `most` were not kept.
    pub cut: bool,
}

/// A listing entry split over several responses.
#[derive(Default)]
struct Partial {
    uid: Option<u32>,
    size: Option<u64>,
    marks: Option<u8>,
    id: Option<String>,
    garbage: Option<String>,
}

pub struct Client<S> {
    stream: S,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    decoder: Decoder,
    tags: u32,
    requests: VecDeque<Request>,
    /// How many octets of answers read before they were wanted may be held.
    hold: u64,
    failed: Option<String>,
    timeout: Duration,
    /// Strings removed from the server's text before it reaches a log (the password in its
    /// forms, from the login on).
    redact: Vec<Secret>,
    /// The capabilities as last announced (greeting, CAPABILITY, a response code); `None`
    /// when they may have changed since (after a login that didn't say).
    caps: Option<Vec<String>>,
    /// Tags of commands sent ahead whose answer nobody waits for (ID): the next command's
    /// reading takes their tagged replies in passing.
    owed: Vec<String>,
}

impl<S: Transport> Client<S> {
    pub fn new(stream: S, timeout: Duration) -> Client<S> {
        Client {
            stream,
            buf: vec![0; BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            decoder: Decoder::new(),
            tags: 0,
            requests: VecDeque::new(),
            hold: 0,
            failed: None,
            timeout,
            redact: Vec::new(),
            caps: None,
            owed: Vec::new(),
        }
    }

    /// The stream, for STARTTLS; `Err` if the server sent anything after the OK, which
    /// would otherwise be taken as protected data (the client's side of CVE-2011-0411).
    pub fn into_stream(self) -> Result<S, Failure> {
        if self.start != self.end || !self.decoder.is_idle() {
            return Err(Failure::Broken(
                "the server sent data after the STARTTLS OK".into(),
            ));
        }
        Ok(self.stream)
    }

    /// Bytes held for responses: the read buffer, what is held for the response being read,
    /// and bodies read ahead. For tests of the bounds.
    pub fn held(&self) -> usize {
        self.buf.len()
            + self.decoder.held()
            + self
                .requests
                .iter()
                .filter_map(|r| r.body.as_ref())
                .map(Vec::capacity)
                .sum::<usize>()
    }

    fn usable(&self) -> Result<(), Failure> {
        match &self.failed {
            Some(why) => Err(Failure::Broken(format!(
                "the IMAP connection failed earlier ({why})"
            ))),
            None => Ok(()),
        }
    }

    /// Makes a failure other than NO stick.
    fn check<T>(&mut self, r: Result<T, Failure>) -> Result<T, Failure> {
        if let Err(Failure::Broken(why) | Failure::Timeout(why)) = &r {
            self.failed.get_or_insert_with(|| why.clone());
        }
        r
    }

    /// The server's text as it may be logged: the secrets being used removed (before anything
    /// could cut one in half), then control characters replaced and the length capped.
    fn scrub(&self, text: &str) -> String {
        const MOST: usize = 300;
        let mut t = text.to_string();
        for s in &self.redact {
            let s = String::from_utf8_lossy(s.expose());
            if s.len() >= 3 {
                t = t.replace(s.as_ref(), "<password>");
            }
        }
        let mut clean: String = t
            .chars()
            .take(MOST)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        if t.chars().count() > MOST {
            clean.push_str("...");
        }
        clean
    }

    /// A tagged NO as a failure, its code and text as they may be logged.
    fn refused(&self, code: Option<Code>, text: &str) -> Failure {
        Failure::No {
            code: code.map(|c| Code {
                name: self.scrub(&c.name),
                args: self.scrub(&c.args),
            }),
            text: self.scrub(text),
        }
    }

    fn broken(&self, what: &str, line: &str) -> Failure {
        Failure::Broken(format!("{what}: {}", self.scrub(line)))
    }

    /// The next complete response, by `deadline`.
    fn response(&mut self, deadline: Instant, room: Room<'_>) -> Result<Response, Failure> {
        // A body asked for may come as a quoted string: that much more text is allowed.
        let quoted = match room {
            Room::Bodies(_) => self
                .requests
                .iter()
                .filter(|r| r.open())
                .map(|r| r.len)
                .max(),
            Room::None => None,
        };
        self.decoder.allow_quoted_body(quoted.unwrap_or(0));
        loop {
            if self.start < self.end {
                let requests = &self.requests;
                let fed = self
                    .decoder
                    .feed(&self.buf[self.start..self.end], &|o| match room {
                        Room::Bodies(f) => f(requests, o),
                        Room::None => None,
                    });
                match fed {
                    Ok((n, r)) => {
                        self.start += n;
                        if let Some(r) = r {
                            return Ok(r);
                        }
                    }
                    Err(v) => return Err(Failure::Broken(self.violation(v))),
                }
            }
            self.fill(deadline)?;
        }
    }

    fn violation(&self, v: Violation) -> String {
        self.scrub(&format!("the IMAP server sent {v}"))
    }

    /// Reads more into the buffer, waiting until `deadline` at most.
    fn fill(&mut self, deadline: Instant) -> Result<(), Failure> {
        self.start = 0;
        self.end = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out());
            }
            let r = self
                .stream
                .set_read_timeout(left)
                .and_then(|()| self.stream.read(&mut self.buf));
            match r {
                Ok(0) => {
                    return Err(Failure::Broken(
                        "the IMAP server closed the connection".into(),
                    ))
                }
                Ok(n) => {
                    self.end = n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.timed_out())
                }
                // Below TLS the deadline may surface as any error.
                Err(_) if Instant::now() >= deadline => return Err(self.timed_out()),
                Err(e) => {
                    return Err(Failure::Broken(format!(
                        "reading from the IMAP server: {e}"
                    )))
                }
            }
        }
    }

    fn timed_out(&self) -> Failure {
        Failure::Timeout(format!(
            "the IMAP server did not answer within {} s (--imap-timeout)",
            self.timeout.as_secs()
        ))
    }

    fn write(&mut self, data: &[u8]) -> Result<(), Failure> {
        self.stream
            .write_all(data)
            .and_then(|()| self.stream.flush())
            .map_err(|e| Failure::Broken(format!("writing to the IMAP server: {e}")))
    }

    fn next_tag(&mut self) -> String {
        self.tags += 1;
        format!("a{}", self.tags)
    }

    /// The greeting: `Ok(true)` for PREAUTH.
    pub fn greeting(&mut self) -> Result<bool, Failure> {
        let deadline = Instant::now() + self.timeout;
        let r = match self.response(deadline, Room::None) {
            // A TLS port waits for the client's hello and never greets in clear.
            Err(Failure::Timeout(why)) => Err(Failure::Timeout(format!(
                "{why}, not even a greeting: if this port expects TLS from the first byte \
                 (IMAPS, 993), add -s (or \"ssl\": true in a --user-dir file)"
            ))),
            r => r,
        };
        let r = self.check(r)?;
        if let Response::Status { code, .. } = &r {
            self.note_caps(code);
        }
        match r {
            Response::Status {
                status: Status::Ok, ..
            } => Ok(false),
            Response::Status {
                status: Status::Preauth,
                ..
            } => Ok(true),
            Response::Status {
                status: Status::Bye,
                text,
                ..
            } => self.check(Err(self.broken("the IMAP server said BYE", &text))),
            Response::Status { text, .. } => self.check(Err(self.broken("greeted with", &text))),
            other => self.check(Err(self.broken("greeted with", &format!("{other:?}")))),
        }
    }

    /// Sends one command (its line without tag and CRLF) and reads to its tagged reply, handing
    /// every untagged response to `each`. A tagged NO is `Failure::No`; BAD, BYE and anything
    /// unexpected break the connection.
    pub fn run(
        &mut self,
        command: &[u8],
        each: &mut dyn FnMut(Response),
    ) -> Result<Option<Code>, Failure> {
        self.usable()?;
        let r = self.drain();
        self.check(r)?;
        let r = self.run_once(command, each, false);
        self.check(r)
    }

    /// Whether the server gives message 1's identifier in FETCH `item` (for an extension a
    /// server has without advertising it, Dovecot's X-GUID): a BAD (unknown item) is a plain
    /// "no" here, not a broken connection, and so is an OK without the identifier.
    pub fn fetches_id(&mut self, item: &str) -> Result<bool, Failure> {
        self.usable()?;
        let r = self.drain();
        self.check(r)?;
        let mut found = false;
        let command = format!("FETCH 1 ({item})");
        let r = self.run_once(
            command.as_bytes(),
            &mut |r| {
                found |= matches!(r, Response::Fetch { items, .. } if items.id.is_some());
            },
            true,
        );
        match self.check(r) {
            Ok(_) => Ok(found),
            Err(Failure::No { .. }) => Ok(false),
            Err(f) => Err(f),
        }
    }

    fn run_once(
        &mut self,
        command: &[u8],
        each: &mut dyn FnMut(Response),
        bad_is_no: bool,
    ) -> Result<Option<Code>, Failure> {
        let tag = self.next_tag();
        let mut line = Vec::with_capacity(tag.len() + command.len() + 3);
        line.extend_from_slice(tag.as_bytes());
        line.push(b' ');
        line.extend_from_slice(command);
        line.extend_from_slice(b"\r\n");
        let sent = self.write(&line);
        line.zeroize();
        sent?;
        let deadline = Instant::now() + self.timeout;
        self.tagged_reply(&tag, deadline, each, bad_is_no)
    }

    /// A command's tagged reply: OK (its capabilities noted), a NO, or a BAD, which breaks the
    /// connection unless the caller takes it as a refusal (`bad_is_no`: AUTHENTICATE, probes).
    fn finished(
        &mut self,
        status: Status,
        code: Option<Code>,
        text: &str,
        bad_is_no: bool,
    ) -> Result<Option<Code>, Failure> {
        match status {
            Status::Ok => {
                self.note_caps(&code);
                Ok(code)
            }
            Status::No => Err(self.refused(code, text)),
            _ if bad_is_no => Err(self.refused(code, &format!("BAD {text}"))),
            _ => Err(self.broken("BAD", text)),
        }
    }

    fn tagged_reply(
        &mut self,
        tag: &str,
        deadline: Instant,
        each: &mut dyn FnMut(Response),
        bad_is_no: bool,
    ) -> Result<Option<Code>, Failure> {
        loop {
            match self.response(deadline, Room::None)? {
                Response::Tagged { tag: t, .. } if self.owed_reply(&t) => {}
                Response::Tagged {
                    tag: t,
                    status,
                    code,
                    text,
                } if t == tag.as_bytes() => return self.finished(status, code, &text, bad_is_no),
                Response::Tagged { text, .. } => {
                    return Err(self.broken("a reply with a tag never sent", &text))
                }
                Response::Status {
                    status: Status::Bye,
                    text,
                    ..
                } => return Err(self.broken("the IMAP server said BYE", &text)),
                Response::Continue(_) => {
                    return Err(Failure::Broken("an unexpected continuation request".into()))
                }
                Response::Capability(c) => {
                    self.caps = Some(c.clone());
                    each(Response::Capability(c))
                }
                r => {
                    if let Response::Status { code, .. } = &r {
                        self.note_caps(code);
                    }
                    each(r)
                }
            }
        }
    }

    /// A `[CAPABILITY ...]` response code announces them.
    fn note_caps(&mut self, code: &Option<Code>) {
        if let Some(c) = code.as_ref().filter(|c| c.name == "CAPABILITY") {
            let caps = c.args.split_whitespace().map(str::to_ascii_uppercase);
            self.caps = Some(caps.collect());
        }
    }

    /// True (and forgotten) if `tag` is that of a command sent ahead with nobody waiting.
    fn owed_reply(&mut self, tag: &[u8]) -> bool {
        match self.owed.iter().position(|t| t.as_bytes() == tag) {
            Some(i) => {
                self.owed.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Sends a command whose answer nobody waits for; the next command takes it in passing.
    pub fn send_ahead(&mut self, command: &[u8]) -> Result<(), Failure> {
        self.usable()?;
        let r = self.drain();
        self.check(r)?;
        let tag = self.next_tag();
        let line = [tag.as_bytes(), b" ", command, b"\r\n"].concat();
        let r = self.write(&line);
        self.check(r)?;
        self.owed.push(tag);
        Ok(())
    }

    /// The server's capabilities, upper-cased: as last announced, else asked for.
    pub fn capabilities(&mut self) -> Result<Vec<String>, Failure> {
        if let Some(caps) = &self.caps {
            return Ok(caps.clone());
        }
        self.run(b"CAPABILITY", &mut drop)?;
        Ok(self.caps.clone().unwrap_or_default())
    }

    /// After a login: the capabilities change, unless its OK announced them.
    fn logged_in(&mut self, r: Result<Option<Code>, Failure>) -> Result<Option<Code>, Failure> {
        if let Ok(code) = &r {
            if code.as_ref().is_none_or(|c| c.name != "CAPABILITY") {
                self.caps = None;
            }
        }
        r
    }

    /// The forms of a password a server could echo back.
    fn start_redacting(&mut self, user: &str, password: &Secret) {
        let pw = password.expose();
        let mut plain = Vec::with_capacity(user.len() + pw.len() + 2);
        plain.push(0);
        plain.extend_from_slice(user.as_bytes());
        plain.push(0);
        plain.extend_from_slice(pw);
        let forms = [
            pw.to_vec(),
            proto::quoted(pw).unwrap_or_default(),
            BASE64.encode(pw).into_bytes(),
            BASE64.encode(&plain).into_bytes(),
        ];
        plain.zeroize();
        self.redact = forms
            .into_iter()
            .filter(|f| !f.is_empty())
            .map(Secret::new)
            .collect();
        // Longest first: a quoted form contains the bare one.
        self.redact
            .sort_by_key(|s| std::cmp::Reverse(s.expose().len()));
    }

    /// LOGIN, or AUTHENTICATE PLAIN where LOGIN's quoted strings can't carry the name or the
    /// password (8-bit). `Failure::No` carries the server's reason, with the password removed.
    pub fn login(&mut self, user: &str, password: &Secret) -> Result<Option<Code>, Failure> {
        self.start_redacting(user, password);
        let r = match (
            proto::quoted(user.as_bytes()),
            proto::quoted(password.expose()),
        ) {
            (Some(u), Some(mut p)) => {
                let mut cmd = Vec::with_capacity(6 + u.len() + 1 + p.len());
                cmd.extend_from_slice(b"LOGIN ");
                cmd.extend_from_slice(&u);
                cmd.push(b' ');
                cmd.extend_from_slice(&p);
                p.zeroize();
                let r = self.run(&cmd, &mut drop);
                cmd.zeroize();
                r
            }
            _ => {
                let mut response = Vec::new();
                response.push(0);
                response.extend_from_slice(user.as_bytes());
                response.push(0);
                response.extend_from_slice(password.expose());
                // Answered once: a server asking again gets `*`, never the password twice.
                let mut response = Some(Secret::new(response));
                self.authenticate("PLAIN", None, &mut |_| {
                    response.take().map(|r| r.expose().to_vec())
                })
            }
        };
        // The forms stay (wiped when the client is dropped): the server's text is scrubbed of
        // them for the whole session.
        self.logged_in(r)
    }

    /// AUTHENTICATE `mechanism`: each challenge (decoded, at most [`proto::MAX_CHALLENGE`]) goes
    /// to `answer`, whose reply is sent; `None` cancels (`*`). `initial` answers the server's
    /// first, empty challenge if the client sent one with its AUTH.
    pub fn authenticate(
        &mut self,
        mechanism: &str,
        initial: Option<Vec<u8>>,
        answer: &mut dyn FnMut(&[u8]) -> Option<Vec<u8>>,
    ) -> Result<Option<Code>, Failure> {
        self.usable()?;
        let r = self.drain();
        self.check(r)?;
        let r = self.authenticate_once(mechanism, initial, answer);
        let r = self.check(r);
        self.logged_in(r)
    }

    fn authenticate_once(
        &mut self,
        mechanism: &str,
        mut initial: Option<Vec<u8>>,
        answer: &mut dyn FnMut(&[u8]) -> Option<Vec<u8>>,
    ) -> Result<Option<Code>, Failure> {
        let tag = self.next_tag();
        self.write(format!("{tag} AUTHENTICATE {mechanism}\r\n").as_bytes())?;
        let mut deadline = Instant::now() + self.timeout;
        let mut rounds = 0;
        loop {
            match self.response(deadline, Room::None)? {
                Response::Continue(text) => {
                    let challenge = BASE64.decode(text.trim_ascii()).map_err(|_| {
                        self.broken(
                            "a challenge that isn't base64",
                            &String::from_utf8_lossy(&text),
                        )
                    })?;
                    if challenge.len() > proto::MAX_CHALLENGE {
                        return Err(Failure::Broken(format!(
                            "the IMAP server sent a SASL challenge of {} octets (bound MAX_CHALLENGE, {} KiB)",
                            challenge.len(),
                            proto::MAX_CHALLENGE >> 10
                        )));
                    }
                    rounds += 1;
                    if rounds > MAX_SASL_ROUNDS {
                        return Err(Failure::Broken(format!(
                            "the IMAP server sent more than {MAX_SASL_ROUNDS} SASL challenges \
                             (bound MAX_SASL_ROUNDS)"
                        )));
                    }
                    // The time the POP3 client takes to answer is not the server's.
                    let asked = Instant::now();
                    let reply = match initial.take() {
                        Some(i) if challenge.is_empty() => Some(i),
                        _ => answer(&challenge),
                    };
                    deadline += asked.elapsed();
                    let mut line = match reply {
                        Some(mut r) => {
                            let mut l = BASE64.encode(&r).into_bytes();
                            r.zeroize();
                            l.extend_from_slice(b"\r\n");
                            l
                        }
                        None => b"*\r\n".to_vec(),
                    };
                    let sent = self.write(&line);
                    line.zeroize();
                    sent?;
                }
                Response::Tagged {
                    tag: t,
                    status,
                    code,
                    text,
                } if t == tag.as_bytes() => {
                    // A BAD to AUTHENTICATE is a refusal too (Dovecot: a cancelled exchange).
                    return self.finished(status, code, &text, true);
                }
                Response::Tagged { text, .. } => {
                    return Err(self.broken("a reply with a tag never sent", &text))
                }
                Response::Status {
                    status: Status::Bye,
                    text,
                    ..
                } => return Err(self.broken("the IMAP server said BYE", &text)),
                _ => {}
            }
        }
    }

    /// SELECT or EXAMINE.
    /// SELECT or EXAMINE `mailbox`, named as the server writes it (modified UTF-7).
    pub fn select(&mut self, examine: bool, mailbox: &str) -> Result<Selected, Failure> {
        let verb = if examine { "EXAMINE" } else { "SELECT" };
        let mut s = Selected::default();
        self.run(
            format!("{verb} {}", proto::wire_mailbox(mailbox)).as_bytes(),
            &mut |r| match r {
                Response::Exists(n) => s.exists = n,
                Response::Status { code: Some(c), .. } => match c.name.as_str() {
                    "UIDVALIDITY" => {
                        s.uidvalidity = c.args.trim().parse().ok();
                    }
                    "PERMANENTFLAGS" => {
                        let flags = c.args.trim().trim_start_matches('(').trim_end_matches(')');
                        s.permanent_flags =
                            Some(flags.split_whitespace().map(str::to_string).collect());
                    }
                    _ => {}
                },
                _ => {}
            },
        )?;
        Ok(s)
    }

    /// The first personal namespace (RFC 2342): its prefix and delimiter as the server writes
    /// them; `None` if the server has no NAMESPACE.
    pub fn namespace(&mut self) -> Result<Option<(String, Option<String>)>, Failure> {
        if !self.capabilities()?.iter().any(|c| c == "NAMESPACE") {
            return Ok(None);
        }
        let mut found = None;
        self.run(b"NAMESPACE", &mut |r| {
            if let Response::Namespace(personal) = r {
                found = personal
                    .into_iter()
                    .next()
                    .map(|(p, d)| (String::from_utf8_lossy(&p).into_owned(), d));
            }
        })?;
        Ok(found)
    }

    /// `LIST "" pattern`, the pattern as the server writes names: the mailboxes found, at most
    /// [`MAX_LISTED_MAILBOXES`]. With `special_use`, asks for the RFC 6154 attributes too
    /// (`RETURN (SPECIAL-USE)`, for servers with LIST-EXTENDED that give them only when asked).
    pub fn list_mailboxes(
        &mut self,
        pattern: &str,
        special_use: bool,
    ) -> Result<Vec<MailboxEntry>, Failure> {
        let mut found = Vec::new();
        let mut cmd = format!("LIST \"\" {}", proto::wire_mailbox(pattern));
        if special_use {
            cmd.push_str(" RETURN (SPECIAL-USE)");
        }
        self.run(cmd.as_bytes(), &mut |r| {
            if let Response::List {
                attributes,
                delimiter,
                name,
            } = r
            {
                // Names and attributes of absurd length are not kept (memory bound).
                let sane = name.len() <= 1024 && attributes.len() <= 16;
                if found.len() < MAX_LISTED_MAILBOXES && sane {
                    found.push(MailboxEntry {
                        attributes,
                        delimiter,
                        name: String::from_utf8_lossy(&name).into_owned(),
                    });
                }
            }
        })?;
        Ok(found)
    }

    /// `FETCH 1:* (UID RFC822.SIZE FLAGS)`: the messages for which `keep` says yes, at most
    /// `most` of them (and never more than [`MAX_LISTED`]), with `interest`'s flags as marks.
    /// Items split over several responses are put together by message number, up to `exists`
    /// (what EXAMINE said, or an EXISTS meanwhile); an entry whose FLAGS never came is taken as
    /// having none (served twice beats never served). Entries with no or garbage UID or size are
    /// left out and described in the listing.
    pub fn list(
        &mut self,
        exists: u32,
        interest: &[&str],
        id_item: Option<&str>,
        most: usize,
        keep: &dyn Fn(&Entry) -> bool,
    ) -> Result<Listing, Failure> {
        let most = most.min(MAX_LISTED);
        let mut listing = Listing::default();
        let mut pending: HashMap<u32, Partial> = HashMap::new();
        let mut exists = exists;
        let marks_of = |flags: &[String]| -> u8 {
            interest
                .iter()
                .enumerate()
                .filter(|(_, f)| flags.iter().any(|x| x.eq_ignore_ascii_case(f)))
                .fold(0, |m, (i, _)| m | (1 << i))
        };
        fn finish(
            listing: &mut Listing,
            most: usize,
            keep: &dyn Fn(&Entry) -> bool,
            id_item: Option<&str>,
            seq: u32,
            p: Partial,
        ) {
            listing.seen += 1;
            let what = match p.uid {
                Some(uid) => format!("UID {uid}"),
                None => format!("message {seq}"),
            };
            let why = match (p.uid, p.size, &p.garbage) {
                (_, _, Some(g)) => Some(format!("{g} is not valid")),
                (None, _, _) => Some("no UID".to_string()),
                (_, None, _) => Some("no RFC822.SIZE".to_string()),
                (_, Some(s), _) if s > MAX_SIZE => Some(format!("RFC822.SIZE {s} is absurd")),
                _ => id_item
                    .filter(|_| p.id.is_none())
                    .map(|item| format!("no {item}")),
            };
            if let Some(why) = why {
                listing.left_out_count += 1;
                if listing.left_out.len() < MAX_LEFT_OUT_LOGGED {
                    listing.left_out.push(format!("{what}: {why}"));
                }
                return;
            }
            let e = Entry {
                uid: p.uid.unwrap_or_default(),
                size: p.size.unwrap_or_default(),
                marks: p.marks.unwrap_or(0),
            };
            if !keep(&e) {
                return;
            }
            if listing.entries.len() >= most {
                listing.cut = true;
                return;
            }
            listing.entries.push(e);
            if let Some(id) = p.id.filter(|_| id_item.is_some()) {
                listing.ids.push(id.into_boxed_str());
            }
        }
        let command = match id_item {
            Some(item) => format!("FETCH 1:* (UID RFC822.SIZE FLAGS {item})"),
            None => "FETCH 1:* (UID RFC822.SIZE FLAGS)".to_string(),
        };
        self.run(command.as_bytes(), &mut |r| {
            let (seq, items) = match r {
                Response::Fetch { seq, items } => (seq, items),
                Response::Exists(n) => {
                    exists = exists.max(n);
                    return;
                }
                _ => return,
            };
            // Never more entries than messages: a server repeating a number gets nothing for it.
            if seq == 0 || seq > exists || listing.seen >= u64::from(exists) {
                return;
            }
            let Fetch {
                uid,
                size,
                flags,
                id,
                garbage,
                ..
            } = items;
            let marks = flags.as_deref().map(marks_of);
            let garbage = garbage.into_iter().next();
            let complete = |uid: bool, size: bool, marks: bool, id: bool| {
                uid && size && marks && (id || id_item.is_none())
            };
            let whole = garbage.is_some()
                || complete(uid.is_some(), size.is_some(), marks.is_some(), id.is_some());
            if whole {
                // The usual case: all in one response (which makes earlier parts old news).
                pending.remove(&seq);
                let p = Partial {
                    uid,
                    size,
                    marks,
                    id,
                    garbage,
                };
                return finish(&mut listing, most, keep, id_item, seq, p);
            }
            if !pending.contains_key(&seq) && pending.len() >= MAX_PENDING {
                return;
            }
            // The later response wins: its FLAGS are the newer state.
            let p = pending.entry(seq).or_default();
            p.uid = uid.or(p.uid);
            p.size = size.or(p.size);
            p.marks = marks.or(p.marks);
            p.id = id.or(p.id.take());
            p.garbage = garbage.or(p.garbage.take());
            let done = complete(
                p.uid.is_some(),
                p.size.is_some(),
                p.marks.is_some(),
                p.id.is_some(),
            );
            if p.garbage.is_some() || done {
                if let Some(p) = pending.remove(&seq) {
                    finish(&mut listing, most, keep, id_item, seq, p);
                }
            }
        })?;
        // What stayed incomplete: listed if UID and size came (flags taken as none).
        let mut rest: Vec<(u32, Partial)> = pending.into_iter().collect();
        rest.sort_by_key(|(seq, _)| *seq);
        for (seq, p) in rest {
            if listing.seen < u64::from(exists) {
                finish(&mut listing, most, keep, id_item, seq, p);
            }
        }
        // The descriptions quote the server.
        listing.left_out = listing.left_out.iter().map(|d| self.scrub(d)).collect();
        Ok(listing)
    }

    /// A command on a set of UIDs whose answer carries nothing we need (STORE, EXPUNGE, COPY,
    /// MOVE): `UID verb set args`.
    pub fn uid_command(&mut self, verb: &str, set: &str, args: &str) -> Result<(), Failure> {
        let cmd = if args.is_empty() {
            format!("UID {verb} {set}")
        } else {
            format!("UID {verb} {set} {args}")
        };
        self.run(cmd.as_bytes(), &mut drop).map(|_| ())
    }

    /// `UID SEARCH criteria`: the UIDs found.
    /// `None` unless a `* SEARCH` answer came, every token a UID, and at most [`MAX_LISTED`]
    /// of them: a deletion may depend on the answer, so anything else is "don't know".
    pub fn uid_search(&mut self, criteria: &str) -> Result<Option<Vec<u32>>, Failure> {
        let mut uids = Some(Vec::new());
        let mut answered = false;
        self.run(format!("UID SEARCH {criteria}").as_bytes(), &mut |r| {
            if let Response::Search(found) = r {
                answered = true;
                if let Some(u) = uids.as_mut() {
                    u.extend(found);
                    if u.len() > MAX_LISTED {
                        uids = None;
                    }
                }
            }
        })?;
        Ok(uids.filter(|_| answered))
    }

    /// Ends the session politely; errors don't matter any more.
    pub fn logout(&mut self) {
        if self.usable().is_ok() {
            let _ = self.run(b"LOGOUT", &mut drop);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Bodies, and fetches sent ahead

    /// Before any command other than a body fetch: read every answer still owed and forget
    /// them, so the next response on the stream belongs to that command.
    fn drain(&mut self) -> Result<(), Failure> {
        self.requests.retain(|r| r.done.is_none());
        if self.requests.is_empty() {
            return Ok(());
        }
        // Nothing kept: the bodies still to come are read and thrown away.
        self.hold = 0;
        let deadline = Instant::now() + self.timeout;
        let r = self.pump_until(None, deadline, |c| {
            c.requests.iter().all(|r| r.done.is_some())
        });
        self.requests.clear();
        r
    }

    /// Sends these body fetches in one write: (uid, offset, len, cost).
    fn send(&mut self, fetches: &[(u32, u64, u64, u64)]) -> Result<(), Failure> {
        let mut out = String::new();
        for &(uid, offset, len, cost) in fetches {
            let tag = self.next_tag();
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
                nil: false,
                done: None,
                dropped: false,
            });
        }
        self.write(out.as_bytes())
    }

    /// Reads responses to the queued requests until `enough`. The body of request `wanted` is
    /// always kept; others only while what is held stays within `hold`.
    fn pump_until(
        &mut self,
        wanted: Option<usize>,
        deadline: Instant,
        enough: impl Fn(&Self) -> bool,
    ) -> Result<(), Failure> {
        while !enough(self) {
            let response = self.response(
                deadline,
                Room::Bodies(&|requests, origin| {
                    // Any open request's body is read (to know it came, and for whom); whether it
                    // is kept is decided below.
                    requests
                        .iter()
                        .filter(|r| r.offset == origin && r.open())
                        .map(|r| r.len)
                        .max()
                }),
            )?;
            let (uid, origin, body) = match response {
                Response::Tagged { tag, .. } if self.owed_reply(&tag) => continue,
                Response::Tagged {
                    tag,
                    status,
                    code,
                    text,
                } => {
                    let Some(r) = self
                        .requests
                        .iter_mut()
                        .find(|r| r.done.is_none() && r.tag.as_bytes() == tag)
                    else {
                        return Err(self.broken("a reply with a tag never sent", &text));
                    };
                    r.done = Some(match status {
                        Status::Ok => Ok(()),
                        Status::No => Err((code, text)),
                        _ => return Err(self.broken("BAD", &text)),
                    });
                    continue;
                }
                Response::Status {
                    status: Status::Bye,
                    text,
                    ..
                } => return Err(self.broken("the IMAP server said BYE", &text)),
                Response::Continue(_) => {
                    return Err(Failure::Broken("an unexpected continuation request".into()))
                }
                Response::Fetch {
                    items:
                        Fetch {
                            uid: Some(uid),
                            body: Some((origin, body)),
                            ..
                        },
                    ..
                } => (uid, origin, body),
                _ => continue,
            };
            let held: u64 = self
                .requests
                .iter()
                .filter_map(|r| r.body.as_ref())
                .map(|b| b.len() as u64)
                .sum();
            let hold = self.hold;
            let found = self
                .requests
                .iter_mut()
                .enumerate()
                .find(|(_, r)| r.uid == uid && r.offset == origin && r.open());
            // Not ours (or a second copy): dropped.
            let Some((i, r)) = found else { continue };
            match body {
                Body::Nil => r.nil = true,
                Body::Octets(b) => {
                    if b.len() as u64 > r.len {
                        return Err(Failure::Broken(format!(
                            "the IMAP server sent a body of {} octets for {} asked",
                            b.len(),
                            r.len
                        )));
                    }
                    if wanted == Some(i) || held + b.len() as u64 <= hold {
                        r.body = Some(b);
                    } else {
                        r.dropped = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// The answer to the fetch (uid, offset, len): one sent ahead (its body cut to `len` if it
    /// asked for more), or one sent now.
    fn take(&mut self, uid: u32, offset: u64, len: u64) -> Result<Request, Failure> {
        if let Some(i) = self.requests.iter().position(|r| r.at(uid, offset)) {
            let deadline = Instant::now() + self.timeout;
            self.pump_until(Some(i), deadline, |c| c.requests[i].done.is_some())?;
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
        let deadline = Instant::now() + self.timeout;
        self.pump_until(Some(i), deadline, |c| c.requests[i].done.is_some())?;
        Ok(self.requests.remove(i).expect("the index was just found"))
    }

    /// Appends up to `len` octets of message `uid` from `offset` to `out`. `Ok(false)` if the
    /// server has no such body: it answered NIL (Dovecot, for a message expunged meanwhile), or
    /// without a FETCH at all. Past the end a body is `""` or `{0}`: `Ok(true)`, nothing added.
    pub fn fetch_body(
        &mut self,
        uid: u32,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<bool, Failure> {
        self.usable()?;
        let taken = self.take(uid, offset, len);
        let r = self.check(taken)?;
        if let Some(Err((code, text))) = r.done {
            return Err(self.refused(code, &text));
        }
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
    /// Answers read before they are wanted are held up to `budget` octets, whatever the sizes
    /// said; past that they are dropped and fetched again when wanted. Answers held for messages
    /// no longer in the window are forgotten. A failure is left for the fetch that would meet it.
    pub fn prefetch(
        &mut self,
        len: u64,
        budget: u64,
        most: usize,
        next: &mut dyn Iterator<Item = (u32, u64)>,
    ) {
        if self.failed.is_some() {
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
        self.hold = budget;
        self.requests
            .retain(|r| r.done.is_none() || window.iter().any(|&(u, o, _, _)| r.at(u, o)));
        let mut queued: u64 = self.requests.iter().map(|r| r.cost).sum();
        window.retain(|&(u, o, _, _)| !self.requests.iter().any(|r| r.at(u, o)));
        let mut send = Vec::new();
        for f in window {
            let count = self.requests.len() + send.len();
            if (queued + f.3 > budget && count > 0) || count >= most {
                break;
            }
            queued += f.3;
            send.push(f);
        }
        if !send.is_empty() {
            let sent = self.send(&send);
            let _ = self.check(sent);
        }
    }
}

/// What a response being read may carry: no body, or the bodies of the requests open (the most
/// octets a body at an origin may have).
#[derive(Clone, Copy)]
enum Room<'a> {
    None,
    Bodies(&'a dyn Fn(&VecDeque<Request>, u64) -> Option<u64>),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: its bytes handed out `piece` at a time; what we send is recorded.
    struct Canned {
        input: Vec<u8>,
        pos: usize,
        piece: usize,
        sent: Vec<u8>,
    }

    impl Read for Canned {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.pos == self.input.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.piece.min(buf.len()).min(self.input.len() - self.pos);
            buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    impl Write for Canned {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Transport for Canned {
        fn set_read_timeout(&mut self, _: Duration) -> io::Result<()> {
            Ok(())
        }
    }

    fn client(script: &[u8], piece: usize) -> Client<Canned> {
        Client::new(
            Canned {
                input: script.to_vec(),
                pos: 0,
                piece,
                sent: Vec::new(),
            },
            Duration::from_secs(5),
        )
    }

    fn sent(c: &Client<Canned>) -> String {
        String::from_utf8(c.stream.sent.clone()).unwrap()
    }

    fn body(uid: u32, origin: u64, data: &str) -> String {
        format!(
            "* 1 FETCH (UID {uid} BODY[]<{origin}> {{{}}}\r\n{data})\r\n",
            data.len()
        )
    }

    #[test]
    fn reads_a_body_in_any_split() {
        let body = b"Subject: x\r\n\r\n* 1 FETCH (fake) a1 OK\r\n";
        let mut script = format!("* 2 FETCH (UID 7 BODY[]<0> {{{}}}\r\n", body.len()).into_bytes();
        script.extend_from_slice(body);
        script.extend_from_slice(b" FLAGS (\\Seen))\r\na1 OK done\r\n");
        for piece in 1..script.len() {
            let mut c = client(&script, piece);
            let mut out = b"pre".to_vec();
            assert!(c.fetch_body(7, 0, 1000, &mut out).unwrap(), "piece {piece}");
            assert_eq!(&out[3..], body, "piece {piece}");
            assert_eq!(sent(&c), "a1 UID FETCH 7 (UID BODY.PEEK[]<0.1000>)\r\n");
        }
    }

    #[test]
    fn nil_or_no_fetch_is_no_body_and_empty_is_the_end() {
        let mut out = Vec::new();
        assert!(!client(b"a1 OK nothing\r\n", 64)
            .fetch_body(7, 0, 10, &mut out)
            .unwrap());
        assert!(
            client(b"* 2 FETCH (UID 7 BODY[]<99> \"\")\r\na1 OK\r\n", 64)
                .fetch_body(7, 99, 10, &mut out)
                .unwrap()
        );
        assert!(
            client(b"* 2 FETCH (UID 7 BODY[]<0> {0}\r\n)\r\na1 OK\r\n", 64)
                .fetch_body(7, 0, 10, &mut out)
                .unwrap()
        );
        assert!(out.is_empty());
        assert!(!client(b"* 2 FETCH (UID 7 BODY[]<0> NIL)\r\na1 OK\r\n", 64)
            .fetch_body(7, 0, 10, &mut out)
            .unwrap());
        assert!(matches!(
            client(b"a1 NO [EXPUNGEISSUED] gone\r\n", 64).fetch_body(7, 0, 10, &mut out),
            Err(Failure::No { code: Some(c), .. }) if c.name == "EXPUNGEISSUED"
        ));
        assert!(matches!(
            client(b"* BYE shutting down\r\n", 64).fetch_body(7, 0, 10, &mut out),
            Err(Failure::Broken(_))
        ));
        assert!(matches!(
            client(b"* 2 FETCH (UID 7 BODY[]<0> {10}\r\nshort", 64).fetch_body(7, 0, 10, &mut out),
            Err(Failure::Timeout(_))
        ));
    }

    #[test]
    fn a_failure_sticks() {
        // The first fetch dies inside its literal; the rest of that body looks like an answer to
        // the next command, and must never be taken for one.
        let script = b"* 1 FETCH (UID 8 BODY[]<0> {100}\r\nx\r\n* 1 FETCH (UID 9 BODY[]<0> {6}\r\nEVIL!\n)\r\na2 OK\r\n";
        let mut c = client(&script[..40], 4096);
        let mut out = Vec::new();
        assert!(c.fetch_body(8, 0, 1000, &mut out).is_err());
        assert!(matches!(
            c.fetch_body(9, 0, 1000, &mut out),
            Err(Failure::Broken(_))
        ));
        assert!(c.capabilities().is_err());
    }

    #[test]
    fn bodies_longer_than_asked_or_elsewhere_are_refused_or_ignored() {
        let mut out = Vec::new();
        assert!(matches!(
            client(
                b"* 1 FETCH (UID 7 BODY[]<0> {20}\r\n01234567890123456789)\r\na1 OK\r\n",
                64
            )
            .fetch_body(7, 0, 5, &mut out),
            Err(Failure::Broken(_))
        ));
        assert!(matches!(
            client(
                b"* 1 FETCH (UID 7 BODY[]<0> \"0123456789\")\r\na1 OK\r\n",
                64
            )
            .fetch_body(7, 0, 5, &mut out),
            Err(Failure::Broken(_))
        ));
        // Another message's body, and one at another origin, are not ours.
        let mut c = client(
            b"* 1 FETCH (UID 3 BODY[]<0> {3}\r\nabc)\r\n* 1 FETCH (UID 7 BODY[]<100> {3}\r\nxyz)\r\na1 OK\r\n",
            5,
        );
        assert!(!c.fetch_body(7, 0, 10, &mut out).unwrap());
    }

    #[test]
    fn a_uid_in_a_quoted_body_does_not_route_it() {
        let mut c = client(b"* 3 FETCH (BODY[]<0> \"x UID 7\" UID 9)\r\na1 OK\r\n", 7);
        let mut out = Vec::new();
        assert!(!c.fetch_body(7, 0, 100, &mut out).unwrap());
        assert!(out.is_empty());
    }

    fn listed(script: &[u8], piece: usize, exists: u32, most: usize) -> Listing {
        client(script, piece)
            .list(exists, &["\\Seen"], None, most, &|_| true)
            .unwrap()
    }

    #[test]
    fn lists_uid_size_and_marks() {
        let l = listed(
            b"* 1 FETCH (UID 3 RFC822.SIZE 120 FLAGS (\\Seen $Popped))\r\n\
              * 2 FETCH (FLAGS () RFC822.SIZE 7 UID 4)\r\n* 2 EXISTS\r\na1 OK\r\n",
            3,
            2,
            10,
        );
        assert_eq!(
            l.entries,
            [
                Entry {
                    uid: 3,
                    size: 120,
                    marks: 1
                },
                Entry {
                    uid: 4,
                    size: 7,
                    marks: 0
                }
            ]
        );
    }

    #[test]
    fn a_split_listing_is_put_together_within_exists() {
        let l = listed(
            b"* 1 FETCH (UID 3)\r\n* 2 FETCH (FLAGS (\\Seen))\r\n\
              * 1 FETCH (RFC822.SIZE 120 FLAGS (\\Seen))\r\n\
              * 2 FETCH (UID 4 RFC822.SIZE 7 FLAGS ())\r\n\
              * 3 FETCH (UID 5 RFC822.SIZE 9)\r\n* 7 FETCH (UID 70 RFC822.SIZE 1 FLAGS ())\r\na1 OK\r\n",
            11,
            3,
            10,
        );
        let uids: Vec<u32> = l.entries.iter().map(|e| e.uid).collect();
        // 7 is beyond EXISTS; 5's FLAGS never came: listed as if it had none.
        assert_eq!(uids, [3, 4, 5]);
        assert_eq!(l.entries[0].marks, 1);
    }

    #[test]
    fn garbage_entries_are_left_out_and_said_why() {
        let l = listed(
            b"* 1 FETCH (UID abc RFC822.SIZE 1 FLAGS ())\r\n* 2 FETCH (UID 2 RFC822.SIZE -1 FLAGS ())\r\n\
              * 3 FETCH (UID 3 RFC822.SIZE 18446744073709551615 FLAGS ())\r\n* 4 FETCH (RFC822.SIZE 5 FLAGS ())\r\n\
              * 5 FETCH (UID 5 RFC822.SIZE 5 FLAGS ())\r\na1 OK\r\n",
            64,
            5,
            10,
        );
        assert_eq!(l.entries.len(), 1);
        assert_eq!(l.left_out_count, 4);
        let all = l.left_out.join("; ");
        for part in [
            "message 1: UID abc",
            "UID 2: RFC822.SIZE -1",
            "UID 3: RFC822.SIZE 18446744073709551615 is absurd",
            "message 4: no UID",
        ] {
            assert!(all.contains(part), "{all}");
        }
    }

    #[test]
    fn a_listing_never_keeps_more_than_asked() {
        let mut script = b"* 4000000000 EXISTS\r\n".to_vec();
        for i in 1..=5000u32 {
            script.extend_from_slice(
                format!("* {i} FETCH (UID {i} RFC822.SIZE 1 FLAGS ())\r\n").as_bytes(),
            );
        }
        script.extend_from_slice(b"a1 OK\r\n");
        let l = listed(&script, 4096, 1, 10);
        assert_eq!(l.entries.len(), 10);
        assert!(l.cut);
    }

    #[test]
    fn fetches_sent_ahead_are_answered_in_any_order() {
        let script = [
            body(8, 0, "eight"),
            "a2 OK\r\n".into(),
            body(7, 0, "seven"),
            "* 9 EXISTS\r\na1 OK\r\n".into(),
            "* 3 FETCH (UID 9 BODY[]<0> NIL)\r\na3 OK\r\n".into(),
        ]
        .concat();
        let mut c = client(script.as_bytes(), 7);
        c.prefetch(100, 1000, 16, &mut [(7, 5), (8, 5), (9, 5)].into_iter());
        assert_eq!(
            sent(&c),
            "a1 UID FETCH 7 (UID BODY.PEEK[]<0.100>)\r\n\
             a2 UID FETCH 8 (UID BODY.PEEK[]<0.100>)\r\n\
             a3 UID FETCH 9 (UID BODY.PEEK[]<0.100>)\r\n"
        );
        let mut out = Vec::new();
        assert!(c.fetch_body(8, 0, 100, &mut out).unwrap());
        assert_eq!(out, b"eight");
        out.clear();
        assert!(c.fetch_body(7, 0, 100, &mut out).unwrap());
        assert_eq!(out, b"seven");
        assert!(!c.fetch_body(9, 0, 100, &mut out).unwrap(), "gone");
        assert_eq!(sent(&c).lines().count(), 3, "nothing asked twice");
    }

    #[test]
    fn prefetch_keeps_to_its_budget_and_never_asks_twice() {
        let sizes = [(1, 500), (2, 40), (3, 40), (4, 40), (5, 1)];
        let mut c = client(b"", 64);
        c.prefetch(1000, 100, 3, &mut sizes.into_iter());
        assert_eq!(sent(&c).lines().count(), 1);
        let mut c = client(b"", 64);
        c.prefetch(1000, 100, 3, &mut sizes[1..].iter().copied());
        assert_eq!(sent(&c).lines().count(), 2);
        c.prefetch(1000, 100, 3, &mut sizes[1..].iter().copied());
        assert_eq!(sent(&c).lines().count(), 2, "already in flight");
    }

    #[test]
    fn any_other_command_first_drains_what_was_sent_ahead() {
        let script = [
            body(7, 0, "seven"),
            "a1 OK\r\n".into(),
            "a2 NO [EXPUNGEISSUED] gone\r\n".into(),
            "* CAPABILITY IMAP4rev1\r\na3 OK\r\n".into(),
        ]
        .concat();
        let mut c = client(script.as_bytes(), 5);
        c.prefetch(100, 1000, 16, &mut [(7, 5), (8, 5)].into_iter());
        assert_eq!(c.capabilities().unwrap(), ["IMAP4REV1"]);
        assert!(c.requests.is_empty());
    }

    #[test]
    fn one_request_open_per_message_and_origin() {
        let x = "x".repeat(80);
        let script = [
            body(7, 0, &x),
            "a1 OK\r\n".into(),
            body(7, 0, &x),
            "a2 OK\r\n".into(),
        ]
        .concat();
        let mut c = client(script.as_bytes(), 9);
        c.prefetch(100, 1000, 16, &mut [(7, 80)].into_iter());
        let mut out = Vec::new();
        assert!(c.fetch_body(7, 0, 50, &mut out).unwrap());
        assert_eq!(out.len(), 50);
        assert_eq!(sent(&c).lines().count(), 1, "the TOP sent nothing");
        out.clear();
        assert!(c.fetch_body(7, 0, 100, &mut out).unwrap());
        assert_eq!(out.len(), 80);
        assert_eq!(sent(&c).lines().count(), 2);
    }

    #[test]
    fn answers_read_early_are_held_within_the_budget() {
        let b = "b".repeat(100);
        let script = [
            body(1, 0, &b),
            "a1 OK\r\n".into(),
            body(2, 0, &b),
            "a2 OK\r\n".into(),
            body(3, 0, &b),
            "a3 OK\r\n".into(),
            body(9, 0, "nine"),
            "a4 OK\r\n".into(),
            body(2, 0, &b),
            "a5 OK\r\n".into(),
        ]
        .concat();
        let mut c = client(script.as_bytes(), 64);
        c.prefetch(100, 150, 16, &mut [(1, 1), (2, 1), (3, 1)].into_iter());
        let mut out = Vec::new();
        assert!(c.fetch_body(9, 0, 100, &mut out).unwrap());
        let held: usize = c
            .requests
            .iter()
            .filter_map(|r| r.body.as_ref())
            .map(Vec::len)
            .sum();
        assert!(held <= 150, "{held}");
        for uid in [2, 1] {
            out.clear();
            assert!(c.fetch_body(uid, 0, 100, &mut out).unwrap(), "uid {uid}");
            assert_eq!(out, b.as_bytes(), "uid {uid}");
        }
        assert!(sent(&c).ends_with("a5 UID FETCH 2 (UID BODY.PEEK[]<0.100>)\r\n"));
    }

    #[test]
    fn login_refusals_never_carry_the_password() {
        let mut c = client(
            b"a1 NO you said a1 LOGIN \"alice\" \"s3cr\\\"et\" and s3cr\"et\r\n",
            64,
        );
        let e = c
            .login("alice", &Secret::new(b"s3cr\"et".to_vec()))
            .unwrap_err();
        let d = e.detail();
        assert!(!d.contains("s3cr"), "{d}");
        assert!(sent(&c).starts_with("a1 LOGIN \"alice\" \"s3cr\\\"et\"\r\n"));
        // 8-bit passwords go by AUTHENTICATE PLAIN; its base64 is scrubbed too.
        let b64 = BASE64.encode(b"\0alice\0p\xc3\xa4ss");
        let script = format!("+ \r\na1 NO bad {b64}\r\n");
        let mut c = client(script.as_bytes(), 64);
        let e = c
            .login("alice", &Secret::new("päss".as_bytes().to_vec()))
            .unwrap_err();
        assert!(!e.detail().contains(&b64), "{}", e.detail());
        assert_eq!(sent(&c), format!("a1 AUTHENTICATE PLAIN\r\n{b64}\r\n"));
    }

    #[test]
    fn server_text_is_scrubbed_everywhere_and_cleaned() {
        let pw = Secret::new(b"hunter2secret".to_vec());
        let mut c = client(b"a1 NO [UNAVAILABLE you sent hunter2secret] no\r\n", 64);
        let d = c.login("alice", &pw).unwrap_err().detail();
        assert!(!d.contains("hunter2"), "{d}");
        // Cut only after scrubbing; still scrubbed after the login.
        let bye = format!("a1 OK\r\n* BYE {}hunter2secret\r\n", "x".repeat(55));
        let mut c = client(bye.as_bytes(), 64);
        c.login("alice", &pw).unwrap();
        let d = c.capabilities().unwrap_err().detail();
        assert!(!d.contains("hunter2") && !d.contains("hunter"), "{d}");
        // A NO to a fetch: control characters replaced, length capped.
        let no = format!("a1 NO \x1b[31m{}\r\n", "y".repeat(5000));
        let d = client(no.as_bytes(), 64)
            .fetch_body(7, 0, 10, &mut Vec::new())
            .unwrap_err()
            .detail();
        assert!(!d.contains('\x1b') && d.len() < 400, "{d}");
    }

    #[test]
    fn plain_answers_once_and_challenges_are_counted() {
        let mut c = client(b"+ \r\n+ \r\na1 NO no\r\n", 64);
        assert!(c
            .login("alice", &Secret::new("pä".as_bytes().to_vec()))
            .is_err());
        let sent = sent(&c);
        assert!(sent.ends_with("\r\n*\r\n"), "{sent}");
        assert_eq!(sent.lines().count(), 3, "{sent}");
        let mut c = client("+ \r\n".repeat(100).as_bytes(), 64);
        let r = c.authenticate("SCRAM-SHA-256", None, &mut |_| Some(b"x".to_vec()));
        assert!(matches!(r, Err(Failure::Broken(t)) if t.contains("MAX_SASL_ROUNDS")));
    }

    #[test]
    fn a_listing_never_has_more_entries_than_exists() {
        let mut script = Vec::new();
        for uid in 1..=50 {
            script.extend_from_slice(
                format!("* 1 FETCH (UID {uid} RFC822.SIZE 1 FLAGS ())\r\n").as_bytes(),
            );
        }
        script.extend_from_slice(b"a1 OK\r\n");
        assert_eq!(listed(&script, 512, 1, 100).entries.len(), 1);
    }

    #[test]
    fn sasl_challenges_are_bounded_and_a_cancel_is_a_star() {
        let big = BASE64.encode(vec![b'x'; proto::MAX_CHALLENGE + 1]);
        let mut c = client(format!("+ {big}\r\n").as_bytes(), 4096);
        let mut asked = 0;
        let r = c.authenticate("CRAM-MD5", None, &mut |_| {
            asked += 1;
            Some(b"x".to_vec())
        });
        assert!(matches!(r, Err(Failure::Broken(_))));
        assert_eq!(asked, 0, "never relayed");
        let mut c = client(b"+ PDE+\r\na1 BAD cancelled\r\n", 3);
        let r = c.authenticate("CRAM-MD5", None, &mut |ch| {
            assert_eq!(ch, b"<1>");
            None
        });
        assert!(matches!(r, Err(Failure::No { .. })));
        assert_eq!(sent(&c), "a1 AUTHENTICATE CRAM-MD5\r\n*\r\n");
    }

    #[test]
    fn select_reads_what_it_needs_past_untagged_no() {
        let mut c = client(
            b"* NO [ALERT] Quota\r\n* 3 EXISTS\r\n* OK [UIDVALIDITY 77] ok\r\n\
              * OK [PERMANENTFLAGS (\\Seen $Popped \\*)] ok\r\na1 OK [READ-ONLY] done\r\n",
            5,
        );
        let s = c.select(true, "INBOX").unwrap();
        assert_eq!((s.exists, s.uidvalidity), (3, Some(77)));
        assert_eq!(s.permanent_flags.unwrap(), ["\\Seen", "$Popped", "\\*"]);
        assert_eq!(sent(&c), "a1 EXAMINE \"INBOX\"\r\n");
    }

    #[test]
    fn caps_announced_in_an_authenticate_ok_are_taken() {
        // Dovecot and Cyrus: pre-login caps in the greeting, the post-login ones in the OK.
        let mut c = client(
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN ID] ready\r\n+ \r\n\
              a1 OK [CAPABILITY IMAP4rev1 UIDPLUS MOVE NAMESPACE] Logged in\r\n",
            64,
        );
        c.greeting().unwrap();
        c.login("alice", &Secret::new("pä".as_bytes().to_vec()))
            .unwrap();
        let caps = c.capabilities().unwrap();
        assert!(caps.iter().any(|x| x == "UIDPLUS"), "{caps:?}");
    }

    #[test]
    fn searches_lists_and_identifiers_are_bounded() {
        let line = format!("* SEARCH {}\r\n", "1 ".repeat(30_000).trim_end());
        let mut script = line.repeat(20).into_bytes();
        script.extend_from_slice(b"a1 OK\r\n");
        assert_eq!(client(&script, 65536).uid_search("DELETED").unwrap(), None);
        assert_eq!(
            client(b"a1 OK\r\n", 64).uid_search("DELETED").unwrap(),
            None
        );
        let id = "g".repeat(60_000);
        let mut script = Vec::new();
        for i in 1..=70u32 {
            let r = format!("* {i} FETCH (UID {i} RFC822.SIZE 1 FLAGS () X-GUID \"{id}\")\r\n");
            script.extend_from_slice(r.as_bytes());
        }
        script.extend_from_slice(b"a1 OK\r\n");
        let l = client(&script, 65536)
            .list(70, &[], Some("X-GUID"), 1000, &|_| true)
            .unwrap();
        assert!(
            l.entries.is_empty() && l.left_out_count == 70,
            "ids past 255 are garbage"
        );
        let name = "n".repeat(60_000);
        let mut script = format!("* LIST () \"/\" \"{name}\"\r\n")
            .repeat(50)
            .into_bytes();
        script.extend_from_slice(b"a1 OK\r\n");
        assert!(client(&script, 65536)
            .list_mailboxes("*", false)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn after_starttls_nothing_may_be_buffered() {
        let mut c = client(b"a1 OK begin\r\n* OK injected\r\n", 4096);
        c.run(b"STARTTLS", &mut drop).unwrap();
        assert!(c.into_stream().is_err());
    }
}
