//! The IMAP protocol, sans I/O: commands encoded to bytes, and the server's bytes decoded into
//! [`Response`]s by a real tokenizer, with a named bound on everything the server controls.
//!
//! Nothing here reads or writes a socket or knows why a command was sent: the driver
//! (`client.rs`) feeds bytes in as they arrive and acts on the responses. A response is held
//! until it is complete (its text outside literals, the literals it carries), then parsed in one
//! go; so however the bytes are split, the same responses come out, and nothing the server sends
//! can make this code hold more than the bounds below or recurse deeper than [`MAX_DEPTH`].

use std::fmt;

/// The text of one response outside its literals (all its lines together).
pub const MAX_LINE: usize = 64 << 10;
/// Parenthesised lists inside lists.
pub const MAX_DEPTH: usize = 32;
/// A literal that isn't a body chunk we asked for; and all such literals of one response.
pub const MAX_LITERAL: u64 = 64 << 10;
/// A SASL challenge, decoded. Never relayed to the POP3 client longer.
pub const MAX_CHALLENGE: usize = 16 << 10;
/// A message identifier (EMAILID, X-GM-MSGID, X-GUID): RFC 8474's objectid maximum.
pub const MAX_ID: usize = 255;

// ---------------------------------------------------------------------------------------------
// Encoding

/// `s` as an IMAP quoted string, or `None` if it can't be one: quoted strings are 7-bit and
/// hold no CR, LF or NUL (RFC 3501 §9), so such bytes can never end or split a command.
pub fn quoted(s: &[u8]) -> Option<Vec<u8>> {
    if s.iter()
        .any(|&b| b == 0 || b == b'\r' || b == b'\n' || b >= 0x80)
    {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    for &b in s {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    Some(out)
}

/// A mailbox name as a quoted string in modified UTF-7. Names hold no control characters
/// (checked where they are configured), so this always succeeds.
pub fn mailbox(name: &str) -> String {
    wire_mailbox(&mutf7(name))
}

/// A mailbox name already as the server writes it (modified UTF-7), as a quoted string.
pub fn wire_mailbox(name: &str) -> String {
    format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A mailbox name in IMAP's modified UTF-7 (RFC 3501 5.1.3): printable ASCII as it is, `&` as
/// `&-`, every other run of characters as `&`, the modified BASE64 of its UTF-16, and `-`.
pub fn mutf7(name: &str) -> String {
    use base64::engine::general_purpose::{GeneralPurpose, NO_PAD};
    use base64::Engine as _;
    const MUTF7: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::IMAP_MUTF7, NO_PAD);
    fn flush(out: &mut String, run: &mut Vec<u8>) {
        if !run.is_empty() {
            out.push('&');
            out.push_str(&MUTF7.encode(&run));
            out.push('-');
            run.clear();
        }
    }
    let mut out = String::new();
    let mut run = Vec::new();
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut out, &mut run);
            match c {
                '&' => out.push_str("&-"),
                c => out.push(c),
            }
        } else {
            for unit in c.encode_utf16(&mut [0; 2]) {
                run.extend_from_slice(&unit.to_be_bytes());
            }
        }
    }
    flush(&mut out, &mut run);
    out
}

/// UIDs as a compact IMAP sequence set: `1:3,7,9:12`.
pub fn uid_set(uids: &[u32]) -> String {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Decoding: what comes out

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    Bye,
    Preauth,
}

/// A response code: `[NAME args]`, the name upper-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    pub name: String,
    pub args: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Octets(Vec<u8>),
    /// The server has no such body (Dovecot says so for a message expunged meanwhile).
    Nil,
}

/// The items of one FETCH response that aiopopd asks for; others are skipped. An item whose
/// value isn't what the grammar says is described in `garbage` instead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetch {
    pub uid: Option<u32>,
    pub size: Option<u64>,
    pub flags: Option<Vec<String>>,
    /// `BODY[]<origin>` and its value (the first one, if a response has several).
    pub body: Option<(u64, Body)>,
    /// The server's stable identifier of the message: RFC 8474 `EMAILID (id)`, Gmail's
    /// `X-GM-MSGID n`, Dovecot's `X-GUID id`; printable ASCII only, else garbage.
    pub id: Option<String>,
    pub garbage: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `tag OK|NO|BAD [code] text`.
    Tagged {
        tag: Vec<u8>,
        status: Status,
        code: Option<Code>,
        text: String,
    },
    /// `+ text`: a SASL challenge (still base64) or a go-ahead.
    Continue(Vec<u8>),
    /// `* OK|NO|BAD|BYE|PREAUTH [code] text`.
    Status {
        status: Status,
        code: Option<Code>,
        text: String,
    },
    /// `* CAPABILITY ...`, upper-cased.
    Capability(Vec<String>),
    Exists(u32),
    Expunge(u32),
    Fetch {
        seq: u32,
        items: Fetch,
    },
    Search(Vec<u32>),
    /// `* LIST (attributes) delimiter name`: the name as the server writes it (modified
    /// UTF-7), attributes as written (`\Archive`, `\Noselect`, ...).
    List {
        attributes: Vec<String>,
        delimiter: Option<String>,
        name: Vec<u8>,
    },
    /// `* NAMESPACE personal other shared`: the personal namespaces, (prefix, delimiter).
    Namespace(Vec<(Vec<u8>, Option<String>)>),
    /// Well-formed, and of no interest here.
    Other,
}

/// The server broke the protocol or crossed a bound. After this the stream can't be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A response's text outside literals passed [`MAX_LINE`].
    LineTooLong,
    /// Lists nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A literal longer than its bound: what a body chunk asked for, else [`MAX_LITERAL`].
    LiteralTooLong { len: u64, max: u64 },
    /// Something that isn't IMAP.
    Malformed(String),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::LineTooLong => write!(
                f,
                "a response longer than {} KiB outside literals (bound MAX_LINE)",
                MAX_LINE >> 10
            ),
            Violation::TooDeep => {
                write!(f, "lists nested deeper than {MAX_DEPTH} (bound MAX_DEPTH)")
            }
            Violation::LiteralTooLong { len, max } => write!(
                f,
                "a literal of {len} octets where at most {max} were expected (bound MAX_LITERAL \
                 or the body chunk asked for)"
            ),
            Violation::Malformed(what) => write!(f, "not IMAP: {what}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding: bytes to responses

/// A literal's value, as kept.
#[derive(Debug)]
enum Lit {
    Data(Vec<u8>),
    /// A body chunk we asked for (the decoder was told so).
    Body(Vec<u8>),
    /// A body nobody asked for: read and thrown away.
    Skipped,
}

enum State {
    /// Reading a line of the response's text.
    Line,
    /// Reading a literal's octets; `keep` collects them unless it is being skipped.
    Literal {
        left: u64,
        keep: Option<Vec<u8>>,
        body: bool,
    },
}

/// Turns the server's bytes into responses. Bytes may be fed in any split.
pub struct Decoder {
    /// The current response's text outside literals, CRLFs removed; a literal stands where its
    /// `{n}` is, looked up by that position in `lits`.
    text: Vec<u8>,
    /// Where the current line starts in `text`.
    line_start: usize,
    lits: Vec<(usize, Lit)>,
    /// Octets of non-body literals kept for this response.
    lit_total: u64,
    /// True once the first line showed a response that may carry literals.
    may_have_literals: Option<bool>,
    depth: usize,
    state: State,
    /// How much longer than MAX_LINE a response's text may be: a body chunk asked for may come
    /// as a quoted string rather than a literal (a long line with no CR or LF in it).
    quoted_room: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            text: Vec::new(),
            line_start: 0,
            lits: Vec::new(),
            lit_total: 0,
            may_have_literals: None,
            depth: 0,
            state: State::Line,
            quoted_room: 0,
        }
    }

    /// Allows a response's text `len` octets beyond MAX_LINE, for a body chunk of that length
    /// asked for, which a server may send as a quoted string (checked against what was asked
    /// once parsed). 0 when no body is asked for.
    pub fn allow_quoted_body(&mut self, len: u64) {
        self.quoted_room = usize::try_from(len).unwrap_or(usize::MAX);
    }

    /// Octets held for the response being read: the bounds keep this small.
    pub fn held(&self) -> usize {
        self.text.capacity()
            + self
                .lits
                .iter()
                .map(|(_, l)| match l {
                    Lit::Data(d) | Lit::Body(d) => d.capacity(),
                    Lit::Skipped => 0,
                })
                .sum::<usize>()
    }

    /// True if no part of a response has been fed since the last one completed.
    pub fn is_idle(&self) -> bool {
        self.text.is_empty() && self.lits.is_empty() && matches!(self.state, State::Line)
    }

    /// Consumes bytes from `input` until a response is complete or the input is used up.
    /// Returns how many bytes were consumed and the response, if one completed. `room(origin)`
    /// says how many octets a body chunk at that origin may hold (`None`: nobody asked for one,
    /// and such a body is read and thrown away).
    pub fn feed(
        &mut self,
        input: &[u8],
        room: &dyn Fn(u64) -> Option<u64>,
    ) -> Result<(usize, Option<Response>), Violation> {
        let mut used = 0;
        while used < input.len() {
            let rest = &input[used..];
            match &mut self.state {
                State::Literal { left, keep, body } => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(rest.len());
                    if let Some(k) = keep.as_mut() {
                        k.extend_from_slice(&rest[..take]);
                    }
                    *left -= take as u64;
                    used += take;
                    if *left == 0 {
                        let lit = match (keep.take(), *body) {
                            (Some(d), true) => Lit::Body(d),
                            (Some(d), false) => Lit::Data(d),
                            (None, _) => Lit::Skipped,
                        };
                        self.lits.push((self.text.len(), lit));
                        self.line_start = self.text.len();
                        self.state = State::Line;
                    }
                }
                State::Line => {
                    let (part, ends) = match memchr::memchr(b'\n', rest) {
                        Some(i) => (&rest[..i], true),
                        None => (rest, false),
                    };
                    if self.text.len() + part.len() > MAX_LINE.saturating_add(self.quoted_room) {
                        return Err(Violation::LineTooLong);
                    }
                    self.text.extend_from_slice(part);
                    used += part.len() + usize::from(ends);
                    if ends {
                        if self.text.last() == Some(&b'\r') {
                            self.text.pop();
                        }
                        if let Some(r) = self.line_end(room)? {
                            return Ok((used, Some(r)));
                        }
                    }
                }
            }
        }
        Ok((used, None))
    }

    /// A line of the response ended: either a literal follows, or the response is complete.
    fn line_end(
        &mut self,
        room: &dyn Fn(u64) -> Option<u64>,
    ) -> Result<Option<Response>, Violation> {
        let may = *self
            .may_have_literals
            .get_or_insert_with(|| carries_data(&self.text));
        if may {
            let line = &self.text[self.line_start..];
            let (depth, literal) = scan(line, self.depth)?;
            self.depth = depth;
            if let Some((brace, len)) = literal {
                let at = self.line_start + brace;
                // A body chunk is `BODY[]<origin> {n}` at the top level of a FETCH.
                let origin =
                    body_origin(&self.text[..at]).filter(|_| depth == 1 && is_fetch(&self.text));
                // One body chunk per response is kept, bounded by what was asked; any other
                // literal (a second body, a body nobody asked for, anything else) counts
                // against MAX_LITERAL for the whole response, and only non-bodies are kept.
                let asked = origin
                    .filter(|_| !self.lits.iter().any(|(_, l)| matches!(l, Lit::Body(_))))
                    .and_then(room);
                let (keep, body) = match asked {
                    Some(max) => {
                        if len > max {
                            return Err(Violation::LiteralTooLong { len, max });
                        }
                        (Some(Vec::with_capacity(len as usize)), true)
                    }
                    None => {
                        if len > MAX_LITERAL || self.lit_total + len > MAX_LITERAL {
                            return Err(Violation::LiteralTooLong {
                                len,
                                max: MAX_LITERAL - self.lit_total.min(MAX_LITERAL),
                            });
                        }
                        self.lit_total += len;
                        let keep = origin.is_none().then(|| Vec::with_capacity(len as usize));
                        (keep, false)
                    }
                };
                // The `{n}` stays in the text to mark where the literal goes.
                self.text.truncate(at + brace_len(&self.text[at..]));
                if len == 0 {
                    let lit = match (keep, body) {
                        (Some(d), true) => Lit::Body(d),
                        (Some(d), false) => Lit::Data(d),
                        (None, _) => Lit::Skipped,
                    };
                    self.lits.push((self.text.len(), lit));
                    self.line_start = self.text.len();
                } else {
                    self.state = State::Literal {
                        left: len,
                        keep,
                        body,
                    };
                }
                return Ok(None);
            }
        }
        let lits = std::mem::take(&mut self.lits);
        let parsed = parse(&self.text, lits);
        // The text's buffer is kept for the next response (it is bounded by MAX_LINE).
        self.text.clear();
        self.line_start = 0;
        self.lit_total = 0;
        self.may_have_literals = None;
        self.depth = 0;
        parsed.map(Some)
    }
}

/// The length of the `{n}` at the start of `s`.
fn brace_len(s: &[u8]) -> usize {
    s.iter().position(|&b| b == b'}').map_or(s.len(), |i| i + 1)
}

/// True for responses whose data may hold lists and literals: untagged ones other than the
/// status responses, whose text is free text (an `[ALERT]` may end in `{12}` and mean nothing).
fn carries_data(first_line: &[u8]) -> bool {
    let Some(rest) = first_line.strip_prefix(b"* ") else {
        return false;
    };
    let word = rest.split(|&b| b == b' ').next().unwrap_or_default();
    !["OK", "NO", "BAD", "BYE", "PREAUTH"]
        .iter()
        .any(|s| word.eq_ignore_ascii_case(s.as_bytes()))
}

fn is_fetch(text: &[u8]) -> bool {
    let mut words = text.split(|&b| b == b' ');
    words.next() == Some(b"*")
        && words
            .next()
            .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit))
        && words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(b"FETCH"))
}

/// The origin if `before` (the text up to a literal) ends with `BODY[]<origin> ` or `BODY[] `.
fn body_origin(before: &[u8]) -> Option<u64> {
    let before = before.strip_suffix(b" ")?;
    let start = before
        .iter()
        .rposition(|&b| b == b' ' || b == b'(')
        .map_or(0, |i| i + 1);
    origin_of(&before[start..])
}

/// `BODY[]<n>` → n; `BODY[]` → 0 (whole-body answers count from the start).
fn origin_of(item: &[u8]) -> Option<u64> {
    if item.len() < 6 || !item[..6].eq_ignore_ascii_case(b"BODY[]") {
        return None;
    }
    match &item[6..] {
        [] => Some(0),
        [b'<', digits @ .., b'>'] => number(digits),
        _ => None,
    }
}

/// Walks one line outside quoted strings, once: the nesting depth after it, and a literal
/// `{n}` at its end (position of the brace, length).
fn scan(line: &[u8], mut depth: usize) -> Result<(usize, Option<(usize, u64)>), Violation> {
    let mut i = 0;
    let mut last_brace = None;
    while i < line.len() {
        match line[i] {
            b'"' => {
                i += 1;
                while i < line.len() && line[i] != b'"' {
                    i += if line[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'(' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Violation::TooDeep);
                }
            }
            b')' => depth = depth.saturating_sub(1),
            b'{' => last_brace = Some(i),
            _ => {}
        }
        i += 1;
    }
    let literal = match (last_brace, line.last()) {
        (Some(i), Some(b'}')) if i + 1 < line.len() => {
            let inner = &line[i + 1..line.len() - 1];
            let digits = inner.strip_suffix(b"+").unwrap_or(inner);
            let len = number(digits)
                .ok_or_else(|| Violation::Malformed(format!("literal {}", lossy(&line[i..]))))?;
            Some((i, len))
        }
        _ => None,
    };
    Ok((depth, literal))
}

/// Server bytes as text for a log line. Not cut here: the driver removes the password from it
/// first, then cuts (a password cut in half would no longer be found).
fn lossy(s: &[u8]) -> String {
    String::from_utf8_lossy(&s[..s.len().min(MAX_LINE)]).into_owned()
}

/// Digits only, as IMAP numbers are; `None` for anything else or an overflow.
fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Parsing a complete response

#[derive(Debug)]
enum Tok<'a> {
    Atom(&'a [u8]),
    Quoted(Vec<u8>),
    Literal(Lit),
    Open,
    Close,
    End,
}

struct Tokens<'a> {
    text: &'a [u8],
    pos: usize,
    lits: Vec<(usize, Lit)>,
}

impl<'a> Tokens<'a> {
    fn next(&mut self) -> Result<Tok<'a>, Violation> {
        let t = self.text;
        while self.pos < t.len() && t[self.pos] == b' ' {
            self.pos += 1;
        }
        let Some(&c) = t.get(self.pos) else {
            return Ok(Tok::End);
        };
        match c {
            b'(' => {
                self.pos += 1;
                Ok(Tok::Open)
            }
            b')' => {
                self.pos += 1;
                Ok(Tok::Close)
            }
            b'"' => {
                let mut s = Vec::new();
                let mut i = self.pos + 1;
                loop {
                    match t.get(i) {
                        None => {
                            return Err(Violation::Malformed("unterminated quoted string".into()))
                        }
                        Some(b'"') => break,
                        Some(b'\\') => {
                            s.extend(t.get(i + 1));
                            i += 2;
                        }
                        Some(&b) => {
                            s.push(b);
                            i += 1;
                        }
                    }
                }
                self.pos = i + 1;
                Ok(Tok::Quoted(s))
            }
            b'{' => {
                let end = self.pos + brace_len(&t[self.pos..]);
                let lit = self
                    .lits
                    .iter()
                    .position(|(at, _)| *at == end)
                    .map(|i| self.lits.swap_remove(i).1)
                    .ok_or_else(|| {
                        Violation::Malformed("a literal in the middle of a line".into())
                    })?;
                self.pos = end;
                Ok(Tok::Literal(lit))
            }
            _ => {
                let start = self.pos;
                while self.pos < t.len() && !b" ()\"{".contains(&t[self.pos]) {
                    self.pos += 1;
                }
                Ok(Tok::Atom(&t[start..self.pos]))
            }
        }
    }

    /// The rest of the text, untokenized (for resp-text).
    fn rest(&self) -> &'a [u8] {
        let r = &self.text[self.pos.min(self.text.len())..];
        r.strip_prefix(b" ").unwrap_or(r)
    }

    /// Skips one value (an atom, string, literal or a list of them).
    fn skip_value(&mut self, depth: usize) -> Result<(), Violation> {
        match self.next()? {
            Tok::Open => self.skip_list(depth + 1),
            Tok::Close | Tok::End => Err(Violation::Malformed("a value missing".into())),
            _ => Ok(()),
        }
    }

    /// Skips to the `)` that closes a list already opened.
    fn skip_list(&mut self, depth: usize) -> Result<(), Violation> {
        if depth > MAX_DEPTH {
            return Err(Violation::TooDeep);
        }
        loop {
            match self.next()? {
                Tok::Close => return Ok(()),
                Tok::Open => self.skip_list(depth + 1)?,
                Tok::End => return Err(Violation::Malformed("a list not closed".into())),
                _ => {}
            }
        }
    }
}

fn word(s: &[u8]) -> String {
    String::from_utf8_lossy(s).into_owned()
}

/// Parses a complete response: its text (CRLFs removed) and its literals.
fn parse(text: &[u8], lits: Vec<(usize, Lit)>) -> Result<Response, Violation> {
    let mut toks = Tokens { text, pos: 0, lits };
    if let Some(rest) = text.strip_prefix(b"+") {
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        return Ok(Response::Continue(rest.trim_ascii_end().to_vec()));
    }
    let first = match toks.next()? {
        Tok::Atom(a) => a,
        _ => return Err(Violation::Malformed(lossy(text))),
    };
    if first != b"*" {
        let tag = first.to_vec();
        let (status, code, text) = status_of(&mut toks)?;
        if !matches!(status, Status::Ok | Status::No | Status::Bad) {
            return Err(Violation::Malformed(lossy(text.as_bytes())));
        }
        return Ok(Response::Tagged {
            tag,
            status,
            code,
            text,
        });
    }
    let save = toks.pos;
    let Tok::Atom(second) = toks.next()? else {
        return Err(Violation::Malformed(lossy(text)));
    };
    if let Some(n) = number(second) {
        let n =
            u32::try_from(n).map_err(|_| Violation::Malformed(format!("message number {n}")))?;
        let Tok::Atom(kind) = toks.next()? else {
            return Err(Violation::Malformed(lossy(text)));
        };
        return Ok(match kind.to_ascii_uppercase().as_slice() {
            b"EXISTS" => Response::Exists(n),
            b"EXPUNGE" => Response::Expunge(n),
            b"FETCH" => Response::Fetch {
                seq: n,
                items: fetch_items(&mut toks)?,
            },
            _ => Response::Other,
        });
    }
    match second.to_ascii_uppercase().as_slice() {
        b"CAPABILITY" => {
            let mut caps = Vec::new();
            while let Tok::Atom(a) = toks.next()? {
                caps.push(word(a).to_ascii_uppercase());
            }
            Ok(Response::Capability(caps))
        }
        b"SEARCH" => {
            // All numbers, or it isn't an answer to trust (a deletion may depend on it).
            let mut uids = Vec::new();
            loop {
                match toks.next()? {
                    Tok::End => return Ok(Response::Search(uids)),
                    Tok::Atom(a) => match number(a).and_then(|n| u32::try_from(n).ok()) {
                        Some(n) => uids.push(n),
                        None => return Ok(Response::Other),
                    },
                    _ => return Ok(Response::Other),
                }
            }
        }
        b"LIST" => list_data(&mut toks),
        b"NAMESPACE" => namespace_data(&mut toks),
        b"OK" | b"NO" | b"BAD" | b"BYE" | b"PREAUTH" => {
            toks.pos = save;
            let (status, code, text) = status_of(&mut toks)?;
            Ok(Response::Status { status, code, text })
        }
        _ => Ok(Response::Other),
    }
}

/// `OK|NO|BAD|BYE|PREAUTH [code] text` from the tokenizer's position.
fn status_of(toks: &mut Tokens<'_>) -> Result<(Status, Option<Code>, String), Violation> {
    let Tok::Atom(s) = toks.next()? else {
        return Err(Violation::Malformed("no status".into()));
    };
    let status = match s.to_ascii_uppercase().as_slice() {
        b"OK" => Status::Ok,
        b"NO" => Status::No,
        b"BAD" => Status::Bad,
        b"BYE" => Status::Bye,
        b"PREAUTH" => Status::Preauth,
        _ => return Err(Violation::Malformed(format!("status {}", lossy(s)))),
    };
    let rest = toks.rest();
    let (code, text) = match rest.strip_prefix(b"[") {
        Some(inner) => match inner.iter().position(|&b| b == b']') {
            Some(end) => {
                let c = &inner[..end];
                let (name, args) = match c.iter().position(|&b| b == b' ') {
                    Some(sp) => (&c[..sp], &c[sp + 1..]),
                    None => (c, &c[c.len()..]),
                };
                let after = &inner[end + 1..];
                (
                    Some(Code {
                        name: word(name).to_ascii_uppercase(),
                        args: word(args),
                    }),
                    after.strip_prefix(b" ").unwrap_or(after),
                )
            }
            None => (None, rest),
        },
        None => (None, rest),
    };
    Ok((status, code, word(text)))
}

/// A string value (`astring` or `nstring`): an atom, a quoted string or a literal; `None` for
/// NIL.
fn string_value(tok: Tok<'_>) -> Result<Option<Vec<u8>>, Violation> {
    match tok {
        Tok::Atom(a) if a.eq_ignore_ascii_case(b"NIL") => Ok(None),
        Tok::Atom(a) => Ok(Some(a.to_vec())),
        Tok::Quoted(q) => Ok(Some(q)),
        Tok::Literal(Lit::Data(d) | Lit::Body(d)) => Ok(Some(d)),
        _ => Err(Violation::Malformed("a string missing".into())),
    }
}

fn list_data(toks: &mut Tokens<'_>) -> Result<Response, Violation> {
    if !matches!(toks.next()?, Tok::Open) {
        return Err(Violation::Malformed("LIST without attributes".into()));
    }
    let mut attributes = Vec::new();
    loop {
        match toks.next()? {
            Tok::Close => break,
            Tok::Atom(a) => attributes.push(word(a)),
            _ => return Err(Violation::Malformed("LIST with a non-attribute".into())),
        }
    }
    let delimiter = string_value(toks.next()?)?.map(|d| word(&d));
    let name = string_value(toks.next()?)?
        .ok_or_else(|| Violation::Malformed("LIST without a name".into()))?;
    Ok(Response::List {
        attributes,
        delimiter,
        name,
    })
}

/// The first of NAMESPACE's three values: `NIL` or `(("prefix" "delim" ext...) ...)`.
fn namespace_data(toks: &mut Tokens<'_>) -> Result<Response, Violation> {
    let mut personal = Vec::new();
    match toks.next()? {
        Tok::Atom(a) if a.eq_ignore_ascii_case(b"NIL") => {}
        Tok::Open => loop {
            match toks.next()? {
                Tok::Close => break,
                Tok::Open => {
                    let prefix = string_value(toks.next()?)?.unwrap_or_default();
                    let delimiter = string_value(toks.next()?)?.map(|d| word(&d));
                    personal.push((prefix, delimiter));
                    // Extensions (RFC 4466), up to this namespace's `)`.
                    toks.skip_list(2)?;
                }
                _ => return Err(Violation::Malformed("a namespace that isn't a list".into())),
            }
        },
        _ => return Err(Violation::Malformed("NAMESPACE without a list".into())),
    }
    Ok(Response::Namespace(personal))
}

/// `(name value name value ...)` of a FETCH response.
fn fetch_items(toks: &mut Tokens<'_>) -> Result<Fetch, Violation> {
    let mut f = Fetch::default();
    if !matches!(toks.next()?, Tok::Open) {
        return Err(Violation::Malformed("FETCH without a list".into()));
    }
    loop {
        let name = match toks.next()? {
            Tok::Close => return Ok(f),
            Tok::Atom(a) => a,
            _ => return Err(Violation::Malformed("a FETCH item without a name".into())),
        };
        let upper = name.to_ascii_uppercase();
        match upper.as_slice() {
            b"UID" => match toks.next()? {
                Tok::Atom(a) => match number(a)
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|&n| n > 0)
                {
                    Some(n) => f.uid = f.uid.or(Some(n)),
                    None => f.garbage.push(format!("UID {}", lossy(a))),
                },
                _ => f.garbage.push("UID without a number".into()),
            },
            b"EMAILID" | b"X-GM-MSGID" | b"X-GUID" => {
                let value = match toks.next()? {
                    // EMAILID's value is a list of one objectid; more than one is garbage.
                    Tok::Open => {
                        let v = string_value(toks.next()?)?;
                        match toks.next()? {
                            Tok::Close => v,
                            _ => {
                                toks.skip_list(2)?;
                                None
                            }
                        }
                    }
                    other => string_value(other)?,
                };
                match value {
                    // RFC 8474: at most 255 characters; nothing longer is kept per message.
                    Some(v)
                        if !v.is_empty()
                            && v.len() <= MAX_ID
                            && v.iter().all(|b| (0x21..0x7f).contains(b)) =>
                    {
                        f.id = f.id.or(Some(word(&v)));
                    }
                    v => f.garbage.push(format!(
                        "{} {}",
                        word(name),
                        v.map_or("NIL".into(), |v| lossy(&v))
                    )),
                }
            }
            b"RFC822.SIZE" => match toks.next()? {
                Tok::Atom(a) => match number(a) {
                    Some(n) => f.size = f.size.or(Some(n)),
                    None => f.garbage.push(format!("RFC822.SIZE {}", lossy(a))),
                },
                _ => f.garbage.push("RFC822.SIZE without a number".into()),
            },
            b"FLAGS" => {
                if !matches!(toks.next()?, Tok::Open) {
                    return Err(Violation::Malformed("FLAGS without a list".into()));
                }
                let mut flags = Vec::new();
                loop {
                    match toks.next()? {
                        Tok::Close => break,
                        Tok::Atom(a) => flags.push(word(a)),
                        _ => return Err(Violation::Malformed("FLAGS with a non-flag".into())),
                    }
                }
                f.flags = Some(flags);
            }
            _ if origin_of(name).is_some() => {
                let origin = origin_of(name).unwrap_or(0);
                let body = match toks.next()? {
                    Tok::Literal(Lit::Body(d) | Lit::Data(d)) => Some(Body::Octets(d)),
                    Tok::Literal(Lit::Skipped) => None,
                    Tok::Quoted(q) => Some(Body::Octets(q)),
                    Tok::Atom(a) if a.eq_ignore_ascii_case(b"NIL") => Some(Body::Nil),
                    _ => return Err(Violation::Malformed("a body that isn't a string".into())),
                };
                if f.body.is_none() {
                    f.body = body.map(|b| (origin, b));
                }
            }
            _ => {
                // A section with spaces or lists in it (`BODY[HEADER.FIELDS (FROM)]`) runs to
                // the atom that closes the bracket.
                if name.contains(&b'[') && !name.contains(&b']') {
                    loop {
                        match toks.next()? {
                            Tok::Atom(a) if a.contains(&b']') => break,
                            Tok::End => {
                                return Err(Violation::Malformed("a section not closed".into()))
                            }
                            _ => {}
                        }
                    }
                }
                toks.skip_value(1)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every response in `input`, fed in pieces of `piece` bytes.
    fn decode(
        input: &[u8],
        piece: usize,
        room: &dyn Fn(u64) -> Option<u64>,
    ) -> Result<Vec<Response>, Violation> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (n, r) = d.feed(rest, room)?;
                rest = &rest[n..];
                out.extend(r);
            }
        }
        assert!(d.is_idle(), "a response left unfinished");
        Ok(out)
    }

    /// The same responses whatever the split, every split from 1 byte up.
    fn all_splits(
        input: &[u8],
        room: &dyn Fn(u64) -> Option<u64>,
    ) -> Result<Vec<Response>, Violation> {
        let whole = decode(input, input.len().max(1), room);
        for piece in 1..input.len().min(200) {
            assert_eq!(decode(input, piece, room), whole, "split at {piece}");
        }
        whole
    }

    fn any(_: u64) -> Option<u64> {
        Some(1 << 20)
    }

    fn none(_: u64) -> Option<u64> {
        None
    }

    #[test]
    fn tagged_status_with_code() {
        let r = all_splits(
            b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
            &none,
        )
        .unwrap();
        assert_eq!(
            r,
            [Response::Tagged {
                tag: b"a1".to_vec(),
                status: Status::No,
                code: Some(Code {
                    name: "AUTHENTICATIONFAILED".into(),
                    args: String::new()
                }),
                text: "Authentication failed.".into()
            }]
        );
    }

    #[test]
    fn select_data() {
        let r = all_splits(
            b"* 3 EXISTS\r\n* OK [UIDVALIDITY 1700000000] UIDs valid\r\n\
              * OK [PERMANENTFLAGS (\\Seen \\*)] Limited\r\n* FLAGS (\\Seen)\r\n\
              * CAPABILITY IMAP4rev1 uidplus\r\n* SEARCH 2 5\r\n* 2 EXPUNGE\r\n",
            &none,
        )
        .unwrap();
        assert_eq!(r[0], Response::Exists(3));
        assert!(
            matches!(&r[1], Response::Status { status: Status::Ok, code: Some(c), .. } if c.name == "UIDVALIDITY" && c.args == "1700000000")
        );
        assert!(
            matches!(&r[2], Response::Status { code: Some(c), .. } if c.args == "(\\Seen \\*)")
        );
        assert_eq!(r[3], Response::Other);
        assert_eq!(
            r[4],
            Response::Capability(vec!["IMAP4REV1".into(), "UIDPLUS".into()])
        );
        assert_eq!(r[5], Response::Search(vec![2, 5]));
        assert_eq!(r[6], Response::Expunge(2));
    }

    #[test]
    fn fetch_items_in_any_order_and_bodies_in_every_form() {
        let r = all_splits(
            b"* 1 FETCH (FLAGS (\\Seen $Popped) RFC822.SIZE 120 UID 3)\r\n\
              * 2 FETCH (UID 7 BODY[]<0> {5}\r\nhe)lo)\r\n\
              * 3 FETCH (BODY[]<256> \"a\\\"b\" UID 8)\r\n\
              * 4 FETCH (UID 9 BODY[]<0> NIL)\r\n",
            &any,
        )
        .unwrap();
        let items = |i: usize| match &r[i] {
            Response::Fetch { items, .. } => items.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            items(0),
            Fetch {
                uid: Some(3),
                size: Some(120),
                flags: Some(vec!["\\Seen".into(), "$Popped".into()]),
                ..Fetch::default()
            }
        );
        assert_eq!(items(1).body, Some((0, Body::Octets(b"he)lo".to_vec()))));
        assert_eq!(items(2).body, Some((256, Body::Octets(b"a\"b".to_vec()))));
        assert_eq!(items(2).uid, Some(8));
        assert_eq!(items(3).body, Some((0, Body::Nil)));
    }

    #[test]
    fn stable_ids_in_their_three_forms() {
        let r = all_splits(
            b"* 1 FETCH (UID 1 EMAILID (M6d99ac3275bb4e))\r\n\
              * 2 FETCH (X-GM-MSGID 1278455344230334865 UID 2)\r\n\
              * 3 FETCH (UID 3 X-GUID \"a4c8e21f7b3e6a6578060000c5b8d2aa\")\r\n\
              * 4 FETCH (UID 4 X-GUID NIL)\r\n",
            &none,
        )
        .unwrap();
        let id = |i: usize| match &r[i] {
            Response::Fetch { items, .. } => items.id.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(id(0).as_deref(), Some("M6d99ac3275bb4e"));
        assert_eq!(id(1).as_deref(), Some("1278455344230334865"));
        assert_eq!(id(2).as_deref(), Some("a4c8e21f7b3e6a6578060000c5b8d2aa"));
        assert_eq!(id(3), None);
        assert!(matches!(&r[3], Response::Fetch { items, .. } if items.garbage.len() == 1));
    }

    #[test]
    fn a_uid_inside_a_quoted_body_is_not_the_uid() {
        let r = all_splits(b"* 3 FETCH (BODY[]<0> \"x UID 7\" UID 9)\r\n", &any).unwrap();
        assert!(matches!(&r[0], Response::Fetch { items, .. } if items.uid == Some(9)));
    }

    #[test]
    fn literals_only_in_data_never_in_status_text() {
        let r = all_splits(
            b"* OK [ALERT] text that ends like {12}\r\n* 1 FETCH (UID 7 BODY[]<0> {2}\r\nok)\r\n",
            &any,
        )
        .unwrap();
        assert_eq!(r.len(), 2);
        assert!(
            matches!(&r[1], Response::Fetch { items, .. } if items.body == Some((0, Body::Octets(b"ok".to_vec()))))
        );
    }

    #[test]
    fn unknown_items_are_skipped_with_their_lists_and_literals() {
        let r = all_splits(
            b"* 1 FETCH (ENVELOPE (NIL \"s\" ((NIL NIL \"a\" \"b\")) {3}\r\nx y) \
              BODY[HEADER.FIELDS (FROM TO)] {4}\r\nab\r\n UID 4)\r\n",
            &none,
        )
        .unwrap();
        assert!(matches!(&r[0], Response::Fetch { items, .. } if items.uid == Some(4)));
    }

    #[test]
    fn garbage_values_are_reported_not_guessed() {
        let r = all_splits(b"* 1 FETCH (UID abc RFC822.SIZE -1 FLAGS ())\r\n", &none).unwrap();
        let Response::Fetch { items, .. } = &r[0] else {
            panic!()
        };
        assert_eq!((items.uid, items.size), (None, None));
        assert_eq!(items.garbage.len(), 2, "{:?}", items.garbage);
    }

    #[test]
    fn list_and_namespace() {
        let r = all_splits(
            b"* LIST (\\HasNoChildren \\Archive) \".\" INBOX.Archive\r\n\
              * LIST () \"/\" {9}\r\nEntw&APw-\r\n* LIST (\\Noselect) NIL \"\"\r\n\
              * NAMESPACE ((\"INBOX.\" \".\")) NIL ((\"#shared.\" \".\"))\r\n\
              * NAMESPACE ((\"\" \"/\" \"X-PARAM\" (\"a\"))) NIL NIL\r\n",
            &none,
        )
        .unwrap();
        assert_eq!(
            r[0],
            Response::List {
                attributes: vec!["\\HasNoChildren".into(), "\\Archive".into()],
                delimiter: Some(".".into()),
                name: b"INBOX.Archive".to_vec()
            }
        );
        assert!(matches!(&r[1], Response::List { name, .. } if name == b"Entw&APw-"));
        assert!(matches!(
            &r[2],
            Response::List {
                delimiter: None,
                ..
            }
        ));
        assert_eq!(
            r[3],
            Response::Namespace(vec![(b"INBOX.".to_vec(), Some(".".into()))])
        );
        assert_eq!(
            r[4],
            Response::Namespace(vec![(Vec::new(), Some("/".into()))])
        );
    }

    #[test]
    fn a_continuation_is_its_text() {
        let r = all_splits(b"+ PDEyMz4=\r\n+\r\n", &none).unwrap();
        assert_eq!(
            r,
            [
                Response::Continue(b"PDEyMz4=".to_vec()),
                Response::Continue(Vec::new())
            ]
        );
    }

    #[test]
    fn bounds() {
        // An endless line.
        let long = [b"* OK ".as_slice(), &vec![b'x'; MAX_LINE + 1], b"\r\n"].concat();
        assert_eq!(decode(&long, 4096, &none), Err(Violation::LineTooLong));
        // 3,000 `{0}` literals keep adding text: the same bound.
        let mut many = b"* 1 FETCH (X".to_vec();
        for _ in 0..30_000 {
            many.extend_from_slice(b" {0}\r\n");
        }
        assert_eq!(decode(&many, 4096, &none), Err(Violation::LineTooLong));
        // Deep nesting, in one line or across literals.
        let deep = [
            b"* 1 FETCH (BODYSTRUCTURE ".as_slice(),
            &[b'('; 5000],
            b"\r\n",
        ]
        .concat();
        assert_eq!(decode(&deep, 4096, &none), Err(Violation::TooDeep));
        let mut deep2 = b"* 1 FETCH (X".to_vec();
        for _ in 0..40 {
            deep2.extend_from_slice(b" ({0}\r\n");
        }
        assert_eq!(decode(&deep2, 7, &none), Err(Violation::TooDeep));
        // A literal past its bound; a body past what was asked.
        let lit = b"* 1 FETCH (X {70000}\r\n";
        assert!(matches!(
            decode(lit, 5, &none),
            Err(Violation::LiteralTooLong { .. })
        ));
        let body = b"* 1 FETCH (UID 1 BODY[]<0> {11}\r\n";
        assert_eq!(
            decode(body, 5, &|_| Some(10)),
            Err(Violation::LiteralTooLong { len: 11, max: 10 })
        );
        // Non-body literals of one response, together.
        let mut two = b"* 1 FETCH (X {40000}\r\n".to_vec();
        two.extend(vec![b'a'; 40000]);
        two.extend_from_slice(b" Y {40000}\r\n");
        assert!(matches!(
            decode(&two, 999, &none),
            Err(Violation::LiteralTooLong { .. })
        ));
    }

    #[test]
    fn a_body_nobody_asked_for_is_read_and_dropped() {
        let mut input = b"* 1 FETCH (UID 1 BODY[]<0> {60000}\r\n".to_vec();
        input.extend(vec![b'z'; 60_000]);
        input.extend_from_slice(b")\r\n* 2 EXISTS\r\n");
        let r = decode(&input, 4096, &none).unwrap();
        assert!(
            matches!(&r[0], Response::Fetch { items, .. } if items.body.is_none() && items.uid == Some(1))
        );
        assert_eq!(r[1], Response::Exists(2));
        // ... but not past MAX_LITERAL: nobody asked for it.
        let big = b"* 1 FETCH (UID 1 BODY[]<0> {100000}\r\n";
        assert!(matches!(
            decode(big, 99, &none),
            Err(Violation::LiteralTooLong { .. })
        ));
    }

    #[test]
    fn one_body_per_response_is_kept() {
        // A response repeating a body item can't hold more than one chunk asked for: the
        // others count against MAX_LITERAL and are not kept.
        let r = all_splits(
            b"* 1 FETCH (UID 7 BODY[]<0> {3}\r\nabc BODY[]<0> {3}\r\nxyz)\r\n",
            &|_| Some(3),
        )
        .unwrap();
        assert!(
            matches!(&r[0], Response::Fetch { items, .. } if items.body == Some((0, Body::Octets(b"abc".to_vec()))))
        );
        let mut many = b"* 1 FETCH (UID 7".to_vec();
        for _ in 0..5 {
            many.extend_from_slice(b" BODY[]<0> {30000}\r\n");
            many.extend(vec![b'b'; 30000]);
        }
        many.extend_from_slice(b")\r\n");
        assert!(matches!(
            decode(&many, 4096, &|_| Some(30000)),
            Err(Violation::LiteralTooLong { .. })
        ));
    }

    #[test]
    fn a_quoted_body_may_be_as_long_as_the_chunk_asked_for() {
        let big = [
            b"* 1 FETCH (UID 7 BODY[]<0> \"".as_slice(),
            &vec![b'q'; 100_000],
            b"\")\r\n",
        ]
        .concat();
        assert_eq!(decode(&big, 4096, &any), Err(Violation::LineTooLong));
        let mut d = Decoder::new();
        d.allow_quoted_body(100_000);
        let mut rest = &big[..];
        let mut got = None;
        while !rest.is_empty() {
            let (n, r) = d.feed(rest, &any).unwrap();
            rest = &rest[n..];
            got = got.or(r);
        }
        assert!(matches!(got, Some(Response::Fetch { items, .. })
            if matches!(&items.body, Some((0, Body::Octets(b))) if b.len() == 100_000)));
    }

    #[test]
    fn braces_cost_one_pass() {
        // 65,000 `{` once made the literal search quadratic (a second of CPU per response).
        let braces = [b"* 1 XYZ ".as_slice(), &vec![b'{'; 65_000], b"\r\n"].concat();
        assert_eq!(decode(&braces, 4096, &none).unwrap(), [Response::Other]);
    }

    #[test]
    fn not_imap_is_a_violation() {
        for bad in [
            b"hello\r\n".as_slice(),
            b"* 1 FETCH UID 3\r\n",
            b"* 1 FETCH (UID 3\r\n",
            b"* 1 FETCH (BODY[]<0> \"open\r\n",
            b"a1 MAYBE\r\n",
            b"* 99999999999 EXISTS\r\n",
        ] {
            assert!(
                decode(bad, 3, &any).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn mailbox_names_go_in_modified_utf7() {
        // RFC 3501's example, and names Outlook and Thunderbird use.
        assert_eq!(
            mutf7("~peter/mail/台北/日本語"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert_eq!(mutf7("Entwürfe & Co"), "Entw&APw-rfe &- Co");
        assert_eq!(mutf7("Gelöschte Elemente"), "Gel&APY-schte Elemente");
        assert_eq!(mutf7("😀"), "&2D3eAA-");
        assert_eq!(mailbox("a\"b\\"), "\"a\\\"b\\\\\"");
    }

    #[test]
    fn quoted_refuses_what_would_split_a_command() {
        assert_eq!(quoted(b"p\"w\\"), Some(b"\"p\\\"w\\\\\"".to_vec()));
        for bad in [b"a\r\nb".as_slice(), b"a\0", "pä".as_bytes()] {
            assert_eq!(quoted(bad), None);
        }
    }

    #[test]
    fn uid_sets_are_compact() {
        assert_eq!(uid_set(&[9, 1, 2, 3, 7, 10, 11, 12]), "1:3,7,9:12");
        assert_eq!(uid_set(&[5]), "5");
    }
}
