//! The POP3 wire format, and nothing else: parsing one command line into a typed [`Command`],
//! and the dot-stuffing writer that frames a message for RETR and TOP.
//!
//! No I/O, no state: the session decides what a command means, the connection decides where
//! bytes come from.

use crate::secret::Secret;

/// RFC 2449 §4: a command line is at most 255 octets including its CRLF.
pub const MAX_COMMAND_LINE: usize = 255;

/// A message number as the client sees it: 1-based, fixed for the session.
pub type MsgNo = u32;

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    User(Vec<u8>),
    Pass(Secret),
    Apop,
    Quit,
    Capa,
    Stls,
    Stat,
    List(Option<MsgNo>),
    Uidl(Option<MsgNo>),
    Retr(MsgNo),
    Top(MsgNo, u64),
    Dele(MsgNo),
    Noop,
    Rset,
    /// `AUTH` alone lists the mechanisms; otherwise a mechanism and maybe an initial response.
    Auth(Option<Auth>),
}

/// RFC 5034 AUTH: the mechanism (upper-cased) and the initial response as sent (base64, or `=`
/// for an empty one), which may carry a password.
#[derive(Debug, PartialEq, Eq)]
pub struct Auth {
    pub mechanism: String,
    pub initial: Option<Secret>,
}

/// Why a line is not a command. Each becomes a fixed `-ERR` text; none echoes the input.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum ParseError {
    Unknown,
    Syntax(&'static str),
}

impl ParseError {
    pub fn reply_text(self) -> &'static str {
        match self {
            ParseError::Unknown => "Unknown command.",
            ParseError::Syntax(s) => s,
        }
    }
}

impl Command {
    /// Parses one command line without its line end (CRLF or bare LF already stripped).
    pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
        let (verb, rest) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &b""[..]),
        };
        if verb.eq_ignore_ascii_case(b"TOP") {
            return parse_top(rest);
        }
        let mut upper = [0u8; 4];
        if verb.len() != 4 {
            return Err(ParseError::Unknown);
        }
        for (u, &b) in upper.iter_mut().zip(verb) {
            *u = b.to_ascii_uppercase();
        }
        match &upper {
            // PASS takes the rest of the line verbatim: passwords may contain spaces.
            b"PASS" if rest.is_empty() => Err(ParseError::Syntax("PASS needs a password.")),
            b"PASS" => Ok(Command::Pass(Secret::new(rest.to_vec()))),
            b"USER" if rest.is_empty() || rest.contains(&b' ') => {
                Err(ParseError::Syntax("USER needs one user name."))
            }
            b"USER" => Ok(Command::User(rest.to_vec())),
            b"APOP" => Ok(Command::Apop),
            b"QUIT" => none(rest, Command::Quit),
            b"CAPA" => none(rest, Command::Capa),
            b"STLS" => none(rest, Command::Stls),
            b"STAT" => none(rest, Command::Stat),
            b"NOOP" => none(rest, Command::Noop),
            b"RSET" => none(rest, Command::Rset),
            b"LIST" => optional_msg(rest).map(Command::List),
            b"UIDL" => optional_msg(rest).map(Command::Uidl),
            b"AUTH" if rest.is_empty() => Ok(Command::Auth(None)),
            b"AUTH" => parse_auth(rest),
            b"RETR" => Ok(Command::Retr(msg_no(args(rest, 1)?[0])?)),
            b"DELE" => Ok(Command::Dele(msg_no(args(rest, 1)?[0])?)),
            _ => Err(ParseError::Unknown),
        }
    }
}

fn parse_auth(rest: &[u8]) -> Result<Command, ParseError> {
    let (mech, initial) = match rest.iter().position(|&b| b == b' ') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    // RFC 4422 §3.1: 1 to 20 of A-Z, 0-9, '-', '_'.
    let valid = !mech.is_empty()
        && mech.len() <= 20
        && mech
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    if !valid || initial.is_some_and(|i| i.is_empty() || i.contains(&b' ')) {
        return Err(ParseError::Syntax(
            "AUTH needs a mechanism and at most one initial response.",
        ));
    }
    Ok(Command::Auth(Some(Auth {
        mechanism: String::from_utf8_lossy(mech).to_ascii_uppercase(),
        initial: initial.map(|i| Secret::new(i.to_vec())),
    })))
}

/// TOP is the one three-letter verb, so it can't go through the four-letter table above.
fn parse_top(rest: &[u8]) -> Result<Command, ParseError> {
    let a = args(rest, 2)?;
    let n = msg_no(a[0])?;
    let lines = number(a[1]).ok_or(ParseError::Syntax(
        "TOP needs a message number and a line count.",
    ))?;
    Ok(Command::Top(n, lines))
}

fn none(rest: &[u8], c: Command) -> Result<Command, ParseError> {
    if rest.is_empty() {
        Ok(c)
    } else {
        Err(ParseError::Syntax("This command takes no arguments."))
    }
}

fn args(rest: &[u8], n: usize) -> Result<Vec<&[u8]>, ParseError> {
    let a: Vec<&[u8]> = rest.split(|&b| b == b' ').collect();
    if rest.is_empty() || a.len() != n || a.iter().any(|s| s.is_empty()) {
        return Err(ParseError::Syntax(if n == 1 {
            "This command needs one message number."
        } else {
            "TOP needs a message number and a line count."
        }));
    }
    Ok(a)
}

fn optional_msg(rest: &[u8]) -> Result<Option<MsgNo>, ParseError> {
    if rest.is_empty() {
        Ok(None)
    } else {
        let a = args(rest, 1)?;
        msg_no(a[0]).map(Some)
    }
}

/// A decimal number of at most 19 digits (so it fits u64); no sign, no spaces.
fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

fn msg_no(s: &[u8]) -> Result<MsgNo, ParseError> {
    match number(s) {
        Some(n) if n >= 1 => Ok(MsgNo::try_from(n).unwrap_or(MsgNo::MAX)),
        Some(_) => Err(ParseError::Syntax("Message numbers start at 1.")),
        None => Err(ParseError::Syntax("Invalid message number.")),
    }
}

/// Frames message octets for a POP3 multi-line reply: dot-stuffs lines that start with `.`,
/// turns bare LF into CRLF, and ends the message with CRLF if it lacks one. Fed in chunks of any
/// size; keeps only two bits of state between them. Optionally stops after the header block and
/// `body_lines` lines of body (TOP).
#[derive(Debug)]
pub struct DotStuffer {
    /// Octets of the current line seen so far (0: at the start of a line).
    line_len: u64,
    last_was_cr: bool,
    /// For TOP: `None` while in the header; `Some(n)` = body lines still to send.
    top: Option<Top>,
    done: bool,
}

#[derive(Debug, Clone, Copy)]
enum Top {
    Header { lines: u64 },
    Body { remaining: u64 },
}

impl DotStuffer {
    pub fn new() -> DotStuffer {
        DotStuffer {
            line_len: 0,
            last_was_cr: false,
            top: None,
            done: false,
        }
    }

    /// For TOP: the header block, the blank line, then at most `lines` body lines.
    pub fn top(lines: u64) -> DotStuffer {
        DotStuffer {
            top: Some(Top::Header { lines }),
            ..DotStuffer::new()
        }
    }

    /// True once TOP has all it wants: the caller can stop fetching.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Appends the framed form of `chunk` to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 64 + 4);
        while !chunk.is_empty() && !self.done {
            if self.line_len == 0 {
                if let Some(Top::Body { remaining: 0 }) = self.top {
                    self.done = true;
                    return;
                }
                if chunk[0] == b'.' {
                    out.push(b'.');
                }
            }
            match memchr::memchr(b'\n', chunk) {
                Some(i) => {
                    let line = &chunk[..i];
                    out.extend_from_slice(line);
                    let cr_before = if i == 0 {
                        self.last_was_cr
                    } else {
                        line[i - 1] == b'\r'
                    };
                    if !cr_before {
                        out.push(b'\r');
                    }
                    out.push(b'\n');
                    // An empty line is "\n" or "\r\n" (the CR possibly in an earlier chunk).
                    let len = self.line_len + i as u64;
                    self.end_line(len == 0 || (len == 1 && cr_before));
                    self.line_len = 0;
                    self.last_was_cr = false;
                    chunk = &chunk[i + 1..];
                }
                None => {
                    out.extend_from_slice(chunk);
                    self.line_len += chunk.len() as u64;
                    self.last_was_cr = chunk[chunk.len() - 1] == b'\r';
                    chunk = &[];
                }
            }
        }
    }

    fn end_line(&mut self, empty: bool) {
        self.top = match self.top {
            None => None,
            Some(Top::Header { lines }) if empty => Some(Top::Body { remaining: lines }),
            Some(h @ Top::Header { .. }) => Some(h),
            Some(Top::Body { remaining }) => Some(Top::Body {
                remaining: remaining.saturating_sub(1),
            }),
        };
        if let Some(Top::Body { remaining: 0 }) = self.top {
            self.done = true;
        }
    }

    /// Ends the message: a final CRLF if the last line lacked one, then the `.` terminator.
    pub fn finish(self, out: &mut Vec<u8>) {
        if self.line_len > 0 && !self.done {
            if !self.last_was_cr {
                out.push(b'\r');
            }
            out.push(b'\n');
        }
        out.extend_from_slice(b".\r\n");
    }
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_case_insensitively() {
        assert_eq!(Command::parse(b"stat"), Ok(Command::Stat));
        assert_eq!(Command::parse(b"ReTr 12"), Ok(Command::Retr(12)));
        assert_eq!(Command::parse(b"top 1 0"), Ok(Command::Top(1, 0)));
        assert_eq!(Command::parse(b"LIST"), Ok(Command::List(None)));
        assert_eq!(Command::parse(b"UIDL 3"), Ok(Command::Uidl(Some(3))));
        assert_eq!(
            Command::parse(b"USER bob"),
            Ok(Command::User(b"bob".to_vec()))
        );
    }

    #[test]
    fn pass_takes_the_rest_of_the_line() {
        assert_eq!(
            Command::parse(b"PASS  a b\xff c "),
            Ok(Command::Pass(Secret::new(b" a b\xff c ".to_vec())))
        );
    }

    #[test]
    fn refuses_bad_arguments() {
        for bad in [
            &b"RETR"[..],
            b"RETR 0",
            b"RETR -1",
            b"RETR x",
            b"RETR 1 2",
            b"RETR  1",
            b"TOP 1",
            b"TOP 1 -1",
            b"STAT 1",
            b"LIST 1 2",
            b"USER",
            b"PASS",
            b"DELE 99999999999999999999999",
        ] {
            assert!(
                matches!(Command::parse(bad), Err(ParseError::Syntax(_))),
                "{bad:?}"
            );
        }
        for unknown in [&b""[..], b"XYZZY", b"RETRX 1", b"\0", b"\xff\xfe", b"TO"] {
            assert_eq!(
                Command::parse(unknown),
                Err(ParseError::Unknown),
                "{unknown:?}"
            );
        }
    }

    #[test]
    fn auth_takes_a_mechanism_and_an_optional_initial_response() {
        assert_eq!(Command::parse(b"AUTH"), Ok(Command::Auth(None)));
        assert_eq!(
            Command::parse(b"auth cram-md5"),
            Ok(Command::Auth(Some(Auth {
                mechanism: "CRAM-MD5".into(),
                initial: None
            })))
        );
        assert_eq!(
            Command::parse(b"AUTH PLAIN AGEAYg=="),
            Ok(Command::Auth(Some(Auth {
                mechanism: "PLAIN".into(),
                initial: Some(Secret::new(b"AGEAYg==".to_vec()))
            })))
        );
        for bad in [
            &b"AUTH PLAIN a b"[..],
            b"AUTH P\xff",
            b"AUTH PLAIN ",
            b"AUTH ABCDEFGHIJKLMNOPQRSTU",
        ] {
            assert!(
                matches!(Command::parse(bad), Err(ParseError::Syntax(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn huge_message_numbers_do_not_overflow() {
        assert_eq!(
            Command::parse(b"RETR 9999999999"),
            Ok(Command::Retr(MsgNo::MAX))
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = Command::parse(b"PASS hunter2").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    fn frame(chunks: &[&[u8]], top: Option<u64>) -> Vec<u8> {
        let mut d = top.map_or_else(DotStuffer::new, DotStuffer::top);
        let mut out = Vec::new();
        for c in chunks {
            d.push(c, &mut out);
        }
        d.finish(&mut out);
        out
    }

    #[test]
    fn dot_stuffs_and_fixes_line_ends() {
        assert_eq!(
            frame(&[b"a\r\n.b\r\n.\r\nc"], None),
            b"a\r\n..b\r\n..\r\nc\r\n.\r\n"
        );
        assert_eq!(frame(&[b"a\nb\n"], None), b"a\r\nb\r\n.\r\n");
        assert_eq!(frame(&[b""], None), b".\r\n");
        assert_eq!(frame(&[b"x\r"], None), b"x\r\n.\r\n");
    }

    #[test]
    fn framing_is_independent_of_chunking() {
        let msg = b"H: v\r\n.x\r\n\r\n.\r\nline\nbare\r\n..two\r\nend";
        let whole = frame(&[msg], None);
        for size in 1..msg.len() {
            let chunks: Vec<&[u8]> = msg.chunks(size).collect();
            assert_eq!(frame(&chunks, None), whole, "chunk size {size}");
        }
        for lines in 0..4 {
            let whole = frame(&[msg], Some(lines));
            for size in 1..msg.len() {
                let chunks: Vec<&[u8]> = msg.chunks(size).collect();
                assert_eq!(
                    frame(&chunks, Some(lines)),
                    whole,
                    "top {lines} chunk {size}"
                );
            }
        }
    }

    #[test]
    fn top_sends_header_blank_line_and_n_body_lines() {
        let msg = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n";
        assert_eq!(frame(&[msg], Some(0)), b"A: 1\r\nB: 2\r\n\r\n.\r\n");
        assert_eq!(
            frame(&[msg], Some(2)),
            b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n.\r\n"
        );
        assert_eq!(frame(&[msg], Some(99)), frame(&[msg], None));
        // A message without a body: all of it.
        assert_eq!(frame(&[b"A: 1\r\n"], Some(0)), b"A: 1\r\n.\r\n");
    }
}
