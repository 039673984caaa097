//! The POP3 state machine (RFC 1939, 2449, 3206) over a [`Backend`]: AUTHORIZATION, then
//! TRANSACTION on a fixed snapshot, then UPDATE on QUIT.
//!
//! It reads command lines from and writes replies to a [`Peer`]; it knows nothing of sockets,
//! TLS or IMAP. DELE only marks: the maildrop is changed in one place, `update`, after QUIT.

use crate::log;
use crate::maildrop::{Backend, Error, Maildrop, Message, SaslClient};
use crate::pop3::{Auth, Command, DotStuffer, MsgNo, ParseError};
use crate::sasl;
use crate::secret::Secret;
use crate::uidl::UidlFormat;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use std::io::{self, Write};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Octets asked of the backend per round trip for RETR: big enough that a typical message is one
/// round trip, small enough that memory stays bounded whatever the message size.
pub const RETR_CHUNK: u64 = 256 << 10;
/// TOP usually wants a few KB of header: ask for less first, then continue in RETR_CHUNKs.
pub const TOP_FIRST_CHUNK: u64 = 64 << 10;
/// After a RETR, how many of the next messages the backend is told it may fetch ahead.
const PREFETCH_HINT: usize = 64;
/// Bad commands before login tolerated before we hang up (Dovecot-style budget).
pub const MAX_BAD_COMMANDS: u32 = 3;
/// Failed logins on one connection before we hang up.
pub const MAX_FAILED_LOGINS: u32 = 3;
/// AUTH exchanges the client cancelled (`*`) before we hang up. A cancel is the client's right
/// (RFC 5034), not a bad command; but a relayed exchange opens an IMAP connection each time, so
/// endless ones are bounded too.
pub const MAX_CANCELLED_AUTHS: u32 = 10;
/// A SASL response line may be far longer than a command (OAuth tokens run to several KB);
/// RFC 5034 lets the server bound it.
pub const MAX_SASL_LINE: usize = 16 << 10;

/// What the session reads from: whole lines, with the over-long ones already discarded.
pub enum Line {
    /// A command line without its line end.
    Command(Vec<u8>),
    /// A line longer than allowed; it was discarded through its end.
    TooLong,
    /// The client closed the connection (a partial last line is dropped).
    Eof,
}

/// The client side of the session. Output written to it may be buffered; `read_line` flushes
/// it before it waits for input, so pipelined commands get their replies in batches.
pub trait Peer: Write {
    fn read_line(&mut self) -> io::Result<Line>;
    /// A SASL response line, up to [`MAX_SASL_LINE`] octets.
    fn read_sasl_line(&mut self) -> io::Result<Line>;
    /// True when the connection is encrypted (credentials may cross it).
    fn is_secure(&self) -> bool;
    /// True if STLS can be offered now (configured, and not yet TLS).
    fn can_start_tls(&self) -> bool;
    /// True if the client sent bytes not yet read as commands.
    fn has_pending_input(&self) -> bool;
    /// Makes TLS ready before STLS is answered (the certificate and key are read then, not at
    /// start). `Err` says what failed, naming the file, for the log; the connection stays plain.
    fn prepare_tls(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Flushes pending replies and performs the TLS handshake (STLS).
    fn start_tls(&mut self) -> io::Result<()>;
    /// The client has logged in: `--login-timeout` no longer applies, only the idle timeout.
    fn end_login_deadline(&mut self) {}
    /// True if reads and writes now fail because `--login-timeout` has passed (not the idle
    /// timeout).
    fn login_deadline_passed(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub hostname: String,
    pub allow_plaintext_auth: bool,
    pub uidl_format: UidlFormat,
    /// `--sasl`: offer exactly these mechanisms (upper case); `None`: PLAIN and LOGIN.
    pub sasl: Option<Vec<String>>,
    /// The earliest a refused login gets its `-ERR [AUTH]`, counted from when the client's
    /// credentials were complete: a floor, not an addition, so that the answer comes at the
    /// same time whether the IMAP server was asked (a known `--user-dir` user) or not (an
    /// unknown one).
    pub auth_failure_delay: Duration,
    /// `--login-timeout`, for the words of the cut (the peer enforces it).
    pub login_timeout: Duration,
}

/// What happened, for the one summary line logged per session.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub user: Option<String>,
    pub listed: usize,
    pub retrieved: usize,
    pub deleted: usize,
    pub bytes: u64,
    pub outcome: &'static str,
}

enum State<M> {
    Authorization { user: Option<String> },
    Transaction(Transaction<M>),
}

struct Transaction<M> {
    drop: M,
    deleted: Vec<bool>,
    /// Every message's UIDL, worked out at login when they come from the server's identifiers
    /// (`%g`), made unique across the session; `None`: from UID and UIDVALIDITY as asked.
    uidls: Option<Vec<String>>,
}

/// How a command handler leaves the session.
enum Next<M> {
    Continue(State<M>),
    /// Close the connection; the outcome goes to the summary.
    End(&'static str),
}

pub struct Session<B: Backend> {
    backend: B,
    settings: Settings,
    summary: Summary,
    bad_commands: u32,
    failed_logins: u32,
    cancelled_auths: u32,
}

/// How a SASL exchange with the client stopped short.
enum Stop {
    Cancelled,
    Invalid,
    TooLong,
    Gone,
    Io(io::Error),
}

/// One answer from the client to a `+ challenge`.
fn ask<P: Peer>(peer: &mut P, challenge: &[u8]) -> Result<Vec<u8>, Stop> {
    let line = format!("+ {}\r\n", BASE64.encode(challenge));
    peer.write_all(line.as_bytes()).map_err(Stop::Io)?;
    match peer.read_sasl_line().map_err(Stop::Io)? {
        Line::Command(l) if l == b"*" => Err(Stop::Cancelled),
        Line::Command(l) => BASE64.decode(Zeroizing::new(l)).map_err(|_| Stop::Invalid),
        Line::TooLong => Err(Stop::TooLong),
        Line::Eof => Err(Stop::Gone),
    }
}

/// The POP3 client's end of a relayed exchange; remembers why it stopped, if it did.
struct Relay<'a, P> {
    peer: &'a mut P,
    stopped: Option<Stop>,
    first: Option<Vec<u8>>,
    /// When the client's last answer arrived: what the server says next is the login's result.
    answered: Instant,
}

impl<P: Peer> SaslClient for Relay<'_, P> {
    fn challenge(&mut self, challenge: &[u8]) -> Option<Vec<u8>> {
        if self.stopped.is_some() {
            return None;
        }
        match ask(self.peer, challenge) {
            Ok(answer) => {
                self.answered = Instant::now();
                if self.first.is_none() {
                    self.first = Some(answer.clone());
                }
                Some(answer)
            }
            Err(stop) => {
                self.stopped = Some(stop);
                None
            }
        }
    }
}

/// What of an unknown command may be logged: a short all-letter verb (a probe's `GET`, `EHLO`),
/// else only its length. The line may be a SASL answer sent after a refused AUTH, i.e. a
/// password in base64, and base64 has no spaces to cut at.
fn verb_for_log(line: &[u8]) -> String {
    let verb = line.split(|&b| b == b' ').next().unwrap_or_default();
    if (1..=4).contains(&verb.len()) && verb.iter().all(u8::is_ascii_alphabetic) {
        String::from_utf8_lossy(verb).to_ascii_uppercase()
    } else {
        format!("({} octets)", line.len())
    }
}

/// A user name without control characters (USER's, being one word, has no spaces either).
/// AUTH PLAIN and LOGIN names must pass too: a newline in one could forge a log line.
fn valid_user(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b >= b' ' && b != 0x7f)
}

/// The user name a relayed exchange carries, for the log only (never the secret part).
fn sasl_user(mechanism: &str, first: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(first);
    let field = |prefix: &str, sep: char| {
        text.split(sep)
            .find_map(|f| f.strip_prefix(prefix))
            .map(str::to_string)
    };
    let user = match mechanism {
        "CRAM-MD5" => text.rsplit_once(' ').map(|(u, _)| u.to_string()),
        "SCRAM-SHA-1" | "SCRAM-SHA-256" => field("n=", ','),
        "XOAUTH2" => field("user=", '\x01'),
        "OAUTHBEARER" => field("a=", ','),
        _ => None,
    }?;
    Some(log::truncated(user.as_bytes()))
}

impl<B: Backend> Session<B> {
    pub fn new(backend: B, settings: Settings) -> Session<B> {
        Session {
            backend,
            settings,
            summary: Summary::default(),
            bad_commands: 0,
            failed_logins: 0,
            cancelled_auths: 0,
        }
    }

    /// Serves the whole session. Returns the summary; I/O errors towards the client end the
    /// session quietly (the client is gone), with nothing changed on the server.
    pub fn run<P: Peer>(mut self, peer: &mut P) -> Summary {
        let outcome = match self.serve(peer) {
            Ok(outcome) => outcome,
            Err(e) if e.kind() == io::ErrorKind::TimedOut && peer.login_deadline_passed() => {
                // Not logged in within --login-timeout, however busy the client kept us.
                let secs = self.settings.login_timeout.as_secs();
                log::warning(&format!(
                    "login timeout: rip={} not logged in within {secs} s (--login-timeout)",
                    log::peer()
                ));
                let _ = reply(
                    peer,
                    false,
                    &format!("Timeout: log in within {secs} s; closing."),
                );
                let _ = peer.flush();
                "login-timeout"
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                // Best effort: the client may be gone already.
                let _ = reply(peer, false, "Autologout; idle for too long.");
                let _ = peer.flush();
                "timeout"
            }
            Err(_) => "client-gone",
        };
        self.summary.outcome = outcome;
        self.summary
    }

    fn serve<P: Peer>(&mut self, peer: &mut P) -> io::Result<&'static str> {
        let greeting = format!("{} POP3 proxy ready.", self.settings.hostname);
        reply(peer, true, &greeting)?;
        let mut state = State::Authorization { user: None };
        loop {
            // A PASS line carries a password: wiped when dropped.
            let line = match peer.read_line() {
                Ok(Line::Command(line)) => Zeroizing::new(line),
                Ok(Line::TooLong) => {
                    state = match self.bad(peer, "Line too long.", state)? {
                        Next::Continue(s) => s,
                        Next::End(outcome) => return Ok(outcome),
                    };
                    continue;
                }
                Ok(Line::Eof) => {
                    self.abandon(state);
                    return Ok("client-gone");
                }
                Err(e) => {
                    self.abandon(state);
                    return Err(e);
                }
            };
            let next = match Command::parse(&line) {
                Err(e) => {
                    if e == ParseError::Unknown {
                        log::debug(&format!("unknown command {}", verb_for_log(&line)));
                    }
                    self.bad(peer, e.reply_text(), state)
                }
                Ok(cmd) => match state {
                    State::Authorization { user } => self.authorization(peer, user, cmd),
                    State::Transaction(t) => self.transaction(peer, t, cmd),
                },
            }?;
            match next {
                Next::Continue(s) => {
                    if matches!(s, State::Transaction(_)) {
                        // Logged in: from here on only the idle timeout applies.
                        peer.end_login_deadline();
                    }
                    state = s
                }
                Next::End(outcome) => {
                    peer.flush()?;
                    return Ok(outcome);
                }
            }
        }
    }

    /// Refuses a bad command. Before login they count against a small budget, so a client that
    /// speaks something other than POP3 (or probes us) is soon disconnected.
    fn bad<P: Peer>(
        &mut self,
        peer: &mut P,
        text: &str,
        state: State<B::Maildrop>,
    ) -> io::Result<Next<B::Maildrop>> {
        reply(peer, false, text)?;
        if matches!(state, State::Authorization { .. }) {
            self.bad_commands += 1;
            if self.bad_commands >= MAX_BAD_COMMANDS {
                reply(peer, false, "Too many bad commands; closing.")?;
                peer.flush()?;
                self.abandon(state);
                return Ok(Next::End("too-many-bad-commands"));
            }
        }
        Ok(Next::Continue(state))
    }

    /// The session ends without QUIT: nothing changes on the server.
    fn abandon(&mut self, state: State<B::Maildrop>) {
        if let State::Transaction(mut t) = state {
            t.drop.logout();
        }
    }

    fn authorization<P: Peer>(
        &mut self,
        peer: &mut P,
        user: Option<String>,
        cmd: Command,
    ) -> io::Result<Next<B::Maildrop>> {
        let same = |user| Ok(Next::Continue(State::Authorization { user }));
        match cmd {
            Command::Capa => {
                self.capa(peer, true)?;
                same(user)
            }
            Command::Quit => {
                reply(peer, true, "Bye.")?;
                Ok(Next::End("quit-before-login"))
            }
            Command::Noop => {
                reply(peer, true, "")?;
                same(user)
            }
            Command::User(name) => {
                if !self.auth_allowed(peer) {
                    reply(
                        peer,
                        false,
                        "[AUTH] Plaintext authentication is not allowed without TLS.",
                    )?;
                    return same(None);
                }
                match String::from_utf8(name) {
                    Ok(name) if valid_user(&name) && !name.contains(' ') => {
                        reply(peer, true, "Send your password.")?;
                        same(Some(name))
                    }
                    _ => {
                        reply(peer, false, "[AUTH] Invalid user name.")?;
                        same(None)
                    }
                }
            }
            Command::Pass(password) => match user {
                None => self.bad(
                    peer,
                    "Send USER first.",
                    State::Authorization { user: None },
                ),
                Some(_) if !self.auth_allowed(peer) => {
                    reply(
                        peer,
                        false,
                        "[AUTH] Plaintext authentication is not allowed without TLS.",
                    )?;
                    same(None)
                }
                Some(user) => self.login(peer, user, password),
            },
            Command::Apop => {
                reply(peer, false, "APOP is not supported; use USER and PASS.")?;
                same(user)
            }
            Command::Auth(None) if self.auth_allowed(peer) => {
                // Not in RFC 5034, but Outlook and others ask this way.
                let mut list = String::from("+OK Supported mechanisms follow\r\n");
                for m in self.mechanisms() {
                    list.push_str(m);
                    list.push_str("\r\n");
                }
                list.push_str(".\r\n");
                peer.write_all(list.as_bytes())?;
                same(None)
            }
            Command::Auth(_) if !self.auth_allowed(peer) => {
                reply(
                    peer,
                    false,
                    "[AUTH] Plaintext authentication is not allowed without TLS.",
                )?;
                same(None)
            }
            Command::Auth(Some(auth)) => self.auth(peer, auth),
            Command::Stls => self.stls(peer, user),
            _ => self.bad(peer, "Log in first.", State::Authorization { user }),
        }
    }

    /// RFC 2595: switch to TLS, then start AUTHORIZATION afresh.
    fn stls<P: Peer>(
        &mut self,
        peer: &mut P,
        user: Option<String>,
    ) -> io::Result<Next<B::Maildrop>> {
        if !peer.can_start_tls() {
            let text = if peer.is_secure() {
                "Already using TLS."
            } else {
                "STLS is not available."
            };
            return self.bad(peer, text, State::Authorization { user });
        }
        if peer.has_pending_input() {
            // Commands pipelined behind STLS were sent in clear and could have been injected
            // by a man in the middle (CVE-2011-0411): never carry them into the TLS session.
            log::warning("client sent data after STLS before the TLS handshake; closing");
            reply(
                peer,
                false,
                "Nothing may follow STLS before the TLS handshake.",
            )?;
            return Ok(Next::End("stls-pipelined"));
        }
        if let Err(why) = peer.prepare_tls() {
            // The administrator's problem, said in clear before any handshake, rather than a
            // connection reset that looks like a network fault. The client may retry later.
            log::error(&format!("STLS refused: TLS is not available: {why}"));
            reply(
                peer,
                false,
                "[SYS/TEMP] TLS is not available; try again later.",
            )?;
            return Ok(Next::Continue(State::Authorization { user }));
        }
        reply(peer, true, "Begin TLS negotiation.")?;
        match peer.start_tls() {
            Ok(()) => Ok(Next::Continue(State::Authorization { user: None })),
            Err(e) => {
                log_handshake_failure(&e);
                Ok(Next::End("tls-failed"))
            }
        }
    }

    fn auth_allowed<P: Peer>(&self, peer: &P) -> bool {
        peer.is_secure() || self.settings.allow_plaintext_auth
    }

    fn login<P: Peer>(
        &mut self,
        peer: &mut P,
        user: String,
        password: Secret,
    ) -> io::Result<Next<B::Maildrop>> {
        // The client's part is done: every refusal is timed from here.
        let started = Instant::now();
        if !valid_user(&user) {
            log::login_failed(&user, "user name with control characters");
            return self.login_failed(peer, "[AUTH] Authentication failed.", started);
        }
        // Bytes that would end or split an IMAP command never leave this process.
        if password
            .expose()
            .iter()
            .any(|&b| b == b'\r' || b == b'\n' || b == 0)
        {
            log::login_failed(&user, "password contains CR, LF or NUL");
            return self.login_failed(peer, "[AUTH] Authentication failed.", started);
        }
        let result = self.backend.login(&user, &password);
        self.login_result(peer, &user, result, started)
    }

    /// The end of every kind of login: TRANSACTION, or the right `-ERR`. `started`: when the
    /// client's last credentials arrived.
    fn login_result<P: Peer>(
        &mut self,
        peer: &mut P,
        user: &str,
        result: Result<B::Maildrop, Error>,
        started: Instant,
    ) -> io::Result<Next<B::Maildrop>> {
        // Client-controlled: never raw into a log line.
        let user = &log::truncated(user.as_bytes());
        match result {
            Ok(drop) => {
                let n = drop.messages().len();
                self.summary.user = Some(user.to_string());
                self.summary.listed = n;
                log::info(&format!("user={user} logged in, {n} messages listed"));
                let uidls = self.uidls(&drop);
                reply(peer, true, &format!("Logged in, {n} messages."))?;
                Ok(Next::Continue(State::Transaction(Transaction {
                    drop,
                    deleted: vec![false; n],
                    uidls,
                })))
            }
            Err(e) => {
                match &e {
                    Error::Auth(_) => log::login_failed(user, &e.to_string()),
                    Error::InUse(_) => log::warning(&format!("user={user} login: {e}")),
                    _ => log::error(&format!("user={user} login: {e}")),
                }
                self.login_failed(peer, error_reply(&e, During::Login), started)
            }
        }
    }

    /// With `%g` or `%m`, every UIDL at once: two messages with the same identifier must
    /// still differ (a later one gets `.2`, `.3`, ... appended), and which one does mustn't change
    /// from one session to the next.
    fn uidls(&self, drop: &B::Maildrop) -> Option<Vec<String>> {
        let format = &self.settings.uidl_format;
        if !format.needs_id() {
            return None;
        }
        let v = drop.uidvalidity();
        let messages = drop.messages();
        let mut uidls: Vec<String> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| format.format(m.uid, v, drop.stable_id(i)))
            .collect();
        let uids: Vec<u32> = messages.iter().map(|m| m.uid).collect();
        let changed = crate::uidl::make_unique(&mut uidls, &uids);
        if !changed.is_empty() {
            log::warning(&format!(
                "messages with the same identifier: UIDs {} get .2, .3, ... appended to stay \
                 unique",
                changed
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        Some(uidls)
    }

    /// The mechanisms offered, known without asking the IMAP server: PLAIN and LOGIN, or
    /// what `--sasl` names (relayed ones only that way: whether the server can complete them
    /// is its secret until one is tried).
    fn mechanisms(&self) -> Vec<&'static str> {
        let all = sasl::LOCAL.iter().chain(sasl::RELAYED.iter());
        match &self.settings.sasl {
            None => sasl::LOCAL.to_vec(),
            Some(named) => all
                .filter(|m| named.iter().any(|n| n == *m))
                .copied()
                .collect(),
        }
    }

    /// RFC 5034 AUTH. PLAIN and LOGIN are decoded here and log in like USER/PASS; the other
    /// mechanisms are relayed to the server, so the secret never exists in this process.
    fn auth<P: Peer>(&mut self, peer: &mut P, auth: Auth) -> io::Result<Next<B::Maildrop>> {
        let mech = auth.mechanism;
        if !self.mechanisms().contains(&mech.as_str()) {
            return self.bad(
                peer,
                "Unsupported authentication mechanism.",
                State::Authorization { user: None },
            );
        }
        let initial = match auth.initial {
            None => None,
            Some(i) if i.expose() == b"=" => Some(Vec::new()),
            Some(i) => match BASE64.decode(i.expose()) {
                Ok(v) => Some(v),
                Err(_) => return self.sasl_stopped(peer, Stop::Invalid),
            },
        };
        match mech.as_str() {
            "PLAIN" => {
                let response = Zeroizing::new(match initial {
                    Some(r) => r,
                    None => match ask(peer, b"") {
                        Ok(r) => r,
                        Err(stop) => return self.sasl_stopped(peer, stop),
                    },
                });
                // authzid NUL authcid NUL passwd (RFC 4616)
                let mut parts = response.splitn(3, |&b| b == 0);
                let (Some(authzid), Some(authcid), Some(passwd)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return self.sasl_stopped(peer, Stop::Invalid);
                };
                let user = String::from_utf8_lossy(authcid).into_owned();
                if !authzid.is_empty() && authzid != authcid {
                    log::login_failed(&user, "PLAIN with a different authorization identity");
                    return self.login_failed(
                        peer,
                        "[AUTH] Authentication failed.",
                        Instant::now(),
                    );
                }
                self.login(peer, user, Secret::new(passwd.to_vec()))
            }
            "LOGIN" => {
                let user = match initial.map_or_else(|| ask(peer, b"Username:"), Ok) {
                    Ok(u) => String::from_utf8_lossy(&u).into_owned(),
                    Err(stop) => return self.sasl_stopped(peer, stop),
                };
                match ask(peer, b"Password:") {
                    Ok(p) => self.login(peer, user, Secret::new(p)),
                    Err(stop) => self.sasl_stopped(peer, stop),
                }
            }
            _ => {
                let mut relay = Relay {
                    peer: &mut *peer,
                    stopped: None,
                    first: initial.clone(),
                    answered: Instant::now(),
                };
                let result = self.backend.authenticate(&mech, initial, &mut relay);
                let (stopped, first) = (relay.stopped.take(), relay.first.take());
                let answered = relay.answered;
                if let Some(stop) = stopped {
                    // The empty answer sent in its place may still have completed the login
                    // (SCRAM's last step is empty): the client said no, so log out again.
                    if let Ok(mut drop) = result {
                        drop.logout();
                    }
                    return self.sasl_stopped(peer, stop);
                }
                if let Err(Error::Unsupported(why)) = &result {
                    // The administrator's --sasl and the server disagree: not a failed login.
                    log::warning(&format!("AUTH {mech}: {why}"));
                    return self.bad(
                        peer,
                        "Unsupported authentication mechanism.",
                        State::Authorization { user: None },
                    );
                }
                let user = first
                    .and_then(|f| sasl_user(&mech, &f))
                    .unwrap_or_else(|| format!("({mech})"));
                self.login_result(peer, &user, result, answered)
            }
        }
    }

    /// The client cancelled or garbled a SASL exchange (RFC 5034: a negative response). A
    /// cancel is the client's right, not a bad command: it has its own, larger budget.
    fn sasl_stopped<P: Peer>(&mut self, peer: &mut P, stop: Stop) -> io::Result<Next<B::Maildrop>> {
        let text = match stop {
            Stop::Io(e) => return Err(e),
            Stop::Gone => return Ok(Next::End("client-gone")),
            Stop::Cancelled => {
                reply(peer, false, "Authentication cancelled.")?;
                self.cancelled_auths += 1;
                if self.cancelled_auths >= MAX_CANCELLED_AUTHS {
                    reply(peer, false, "Too many cancelled authentications; closing.")?;
                    return Ok(Next::End("too-many-cancelled-auths"));
                }
                return Ok(Next::Continue(State::Authorization { user: None }));
            }
            Stop::Invalid => "Invalid SASL response.",
            Stop::TooLong => "SASL response too long.",
        };
        self.bad(peer, text, State::Authorization { user: None })
    }

    /// A refused login. `[AUTH]` refusals answer no sooner than `--auth-failure-delay` after
    /// `started` (when the client's credentials were complete). Slows down password guessing
    /// through us, as Dovecot's auth_failure_delay does; and, being a floor rather than an
    /// addition, makes every refusal answer at the same point whether the IMAP server was asked
    /// (a known `--user-dir` user) or not (an unknown name, a bad user name): how long it takes
    /// doesn't tell which names exist. That holds as long as the IMAP server refuses within the
    /// delay; a server slower than that shows through (logged with -v).
    fn login_failed<P: Peer>(
        &mut self,
        peer: &mut P,
        text: &str,
        started: Instant,
    ) -> io::Result<Next<B::Maildrop>> {
        if text.starts_with("[AUTH]") {
            peer.flush()?;
            let delay = self.settings.auth_failure_delay;
            let took = started.elapsed();
            match delay.checked_sub(took) {
                Some(rest) => std::thread::sleep(rest),
                None if !delay.is_zero() => log::debug(&format!(
                    "the refusal took {:.3}s, longer than --auth-failure-delay {}s: refusals \
                     the IMAP server isn't asked about (unknown --user-dir users) answer sooner",
                    took.as_secs_f64(),
                    delay.as_secs_f64()
                )),
                None => {}
            }
        }
        reply(peer, false, text)?;
        self.failed_logins += 1;
        if self.failed_logins >= MAX_FAILED_LOGINS {
            reply(peer, false, "Too many failed logins; closing.")?;
            return Ok(Next::End("too-many-failed-logins"));
        }
        Ok(Next::Continue(State::Authorization { user: None }))
    }

    fn capa<P: Peer>(&mut self, peer: &mut P, authorization: bool) -> io::Result<()> {
        let mut caps = String::from("+OK Capability list follows\r\n");
        caps.push_str("TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n");
        if peer.can_start_tls() {
            caps.push_str("STLS\r\n");
        }
        if authorization && self.auth_allowed(peer) {
            caps.push_str("USER\r\n");
            let mechs = self.mechanisms().join(" ");
            if !mechs.is_empty() {
                caps.push_str("SASL ");
                caps.push_str(&mechs);
                caps.push_str("\r\n");
            }
        }
        caps.push_str(concat!(
            "IMPLEMENTATION aiopopd ",
            env!("CARGO_PKG_VERSION"),
            "\r\n.\r\n"
        ));
        peer.write_all(caps.as_bytes())
    }

    fn transaction<P: Peer>(
        &mut self,
        peer: &mut P,
        mut t: Transaction<B::Maildrop>,
        cmd: Command,
    ) -> io::Result<Next<B::Maildrop>> {
        match cmd {
            Command::Stat => {
                let (n, size) = t.live().fold((0u64, 0u64), |(n, s), (_, m)| {
                    (n + 1, s.saturating_add(m.size))
                });
                reply(peer, true, &format!("{n} {size}"))?;
            }
            Command::List(None) => {
                let mut out = String::from("+OK Scan list follows\r\n");
                for (no, m) in t.live() {
                    out.push_str(&format!("{no} {}\r\n", m.size));
                }
                out.push_str(".\r\n");
                peer.write_all(out.as_bytes())?;
            }
            Command::Uidl(None) => {
                let mut out = String::from("+OK Unique-ID listing follows\r\n");
                for (no, _) in t.live() {
                    let uidl = t.uidl(no, &self.settings.uidl_format);
                    out.push_str(&format!("{no} {uidl}\r\n"));
                }
                out.push_str(".\r\n");
                peer.write_all(out.as_bytes())?;
            }
            Command::List(Some(no)) => match t.get(no) {
                Ok(m) => reply(peer, true, &format!("{no} {}", m.size))?,
                Err(text) => reply(peer, false, text)?,
            },
            Command::Uidl(Some(no)) => match t.get(no) {
                Ok(_) => {
                    let uidl = t.uidl(no as usize, &self.settings.uidl_format);
                    reply(peer, true, &format!("{no} {uidl}"))?
                }
                Err(text) => reply(peer, false, text)?,
            },
            Command::Retr(no) => return self.send_message(peer, t, no, None),
            Command::Top(no, lines) => return self.send_message(peer, t, no, Some(lines)),
            Command::Dele(no) => match t.get(no) {
                Ok(_) => {
                    t.deleted[no as usize - 1] = true;
                    reply(peer, true, "Marked to be deleted.")?
                }
                Err(text) => reply(peer, false, text)?,
            },
            Command::Noop => reply(peer, true, "")?,
            Command::Rset => {
                t.deleted.iter_mut().for_each(|d| *d = false);
                let n = t.deleted.len();
                reply(peer, true, &format!("{n} messages"))?
            }
            Command::Capa => self.capa(peer, false)?,
            Command::Quit => return self.update(peer, t),
            Command::User(_) | Command::Pass(_) | Command::Apop | Command::Auth(_) => {
                reply(peer, false, "Already logged in.")?
            }
            Command::Stls => reply(peer, false, "STLS is only allowed before login.")?,
        }
        Ok(Next::Continue(State::Transaction(t)))
    }

    /// RETR and TOP: stream the message in chunks as the backend serves them. The first chunk is
    /// fetched before `+OK`, so a message that vanished gets a clean `-ERR`; a failure after `+OK`
    /// ends the session without the terminating `.`, so the client can't take a truncated message
    /// for a whole one.
    fn send_message<P: Peer>(
        &mut self,
        peer: &mut P,
        mut t: Transaction<B::Maildrop>,
        no: MsgNo,
        top: Option<u64>,
    ) -> io::Result<Next<B::Maildrop>> {
        let m = match t.get(no) {
            Ok(m) => *m,
            Err(text) => {
                reply(peer, false, text)?;
                return Ok(Next::Continue(State::Transaction(t)));
            }
        };
        let mut want = if top.is_some() {
            TOP_FIRST_CHUNK
        } else {
            RETR_CHUNK
        };
        let mut chunk = Vec::new();
        match t.drop.fetch(m.uid, 0, want, &mut chunk) {
            // Nothing where the listing promised octets: not an empty message, a broken answer.
            Ok(()) if chunk.is_empty() && m.size > 0 => {
                log::error(&format!(
                    "fetching uid {}: an empty body for a message listed as {} octets",
                    m.uid, m.size
                ));
                let broken = Error::Temp(String::new());
                reply(peer, false, error_reply(&broken, During::Retrieve))?;
                return Ok(Next::Continue(State::Transaction(t)));
            }
            Ok(()) => {}
            Err(Error::Gone) => {
                reply(peer, false, error_reply(&Error::Gone, During::Retrieve))?;
                return Ok(Next::Continue(State::Transaction(t)));
            }
            Err(e) => {
                log::error(&format!("fetching uid {}: {e}", m.uid));
                reply(peer, false, error_reply(&e, During::Retrieve))?;
                self.abandon(State::Transaction(t));
                return Ok(Next::End("imap-failed"));
            }
        }
        match top {
            None => reply(peer, true, &format!("{} octets", m.size))?,
            Some(_) => reply(peer, true, "Top of message follows.")?,
        }
        let mut stuffer = top.map_or_else(DotStuffer::new, DotStuffer::top);
        let mut out = Vec::new();
        let mut offset = 0u64;
        loop {
            stuffer.push(&chunk, &mut out);
            peer.write_all(&out)?;
            self.summary.bytes += out.len() as u64;
            out.clear();
            offset += chunk.len() as u64;
            if (chunk.len() as u64) < want || stuffer.is_done() {
                break;
            }
            chunk.clear();
            want = RETR_CHUNK;
            match t.drop.fetch(m.uid, offset, want, &mut chunk) {
                // An empty body ("" or {0}) is the server saying the message ends here, even
                // short of the listed size: servers list sizes that differ from the octets
                // they serve (Exchange), and a message whose real size is a multiple of the
                // chunk would otherwise never arrive. A server failing says NIL, NO or
                // nothing, and those cut the message below.
                Ok(()) if chunk.is_empty() && offset < m.size => {
                    log::warning(&format!(
                        "uid {} ends at {offset} octets, listed as {}: the server's \
                         RFC822.SIZE differs from what it serves",
                        m.uid, m.size
                    ));
                }
                Ok(()) => {}
                // A server may answer NIL right at the end of a message whose size is a multiple
                // of the chunk: the octets sent are then exactly the listed size. Anywhere else
                // the message was cut short (or its size lied), and ending it with "." would
                // hand the client a truncated message as whole.
                Err(Error::Gone) if offset == m.size => break,
                Err(e) => {
                    log::error(&format!(
                        "fetching uid {} at offset {offset}: {e}; message left unterminated",
                        m.uid
                    ));
                    self.abandon(State::Transaction(t));
                    return Ok(Next::End("imap-failed-mid-message"));
                }
            }
        }
        stuffer.finish(&mut out);
        peer.write_all(&out)?;
        let first = match top {
            None => {
                self.summary.retrieved += 1;
                RETR_CHUNK
            }
            Some(_) => TOP_FIRST_CHUNK,
        };
        // A client that reads a message (or its top) will likely want the next ones the same
        // way: have the server start on them while this one is on its way.
        let next: Vec<Message> = (no as usize..t.deleted.len())
            .filter(|&i| !t.deleted[i])
            .filter_map(|i| t.drop.messages().get(i).copied())
            .take(PREFETCH_HINT)
            .collect();
        t.drop.prefetch(first, &mut next.into_iter());
        Ok(Next::Continue(State::Transaction(t)))
    }

    /// QUIT in TRANSACTION: apply the deletions, then say goodbye.
    fn update<P: Peer>(
        &mut self,
        peer: &mut P,
        mut t: Transaction<B::Maildrop>,
    ) -> io::Result<Next<B::Maildrop>> {
        let uids: Vec<u32> = t
            .drop
            .messages()
            .iter()
            .zip(&t.deleted)
            .filter(|(_, &d)| d)
            .map(|(m, _)| m.uid)
            .collect();
        let result = if uids.is_empty() {
            Ok(None)
        } else {
            t.drop.commit(&uids)
        };
        let next = match result {
            Ok(remark) => {
                self.summary.deleted = uids.len();
                let mut text = format!("{} POP3 proxy signing off", self.settings.hostname);
                if let Some(r) = remark {
                    text.push_str(" (");
                    text.push_str(r);
                    text.push(')');
                }
                text.push('.');
                reply(peer, true, &text).map(|()| Next::End("quit"))
            }
            Err(e) => {
                log::error(&format!("update failed: {e}"));
                reply(peer, false, error_reply(&e, During::Update))
                    .map(|()| Next::End("update-failed"))
            }
        };
        // The client has its answer; the IMAP goodbye (which may first read answers to fetches
        // sent ahead) needn't keep it waiting.
        let flushed = peer.flush();
        t.drop.logout();
        flushed?;
        next
    }
}

impl<M: Maildrop> Transaction<M> {
    /// The UIDL of message `no` (1-based, existing).
    fn uidl(&self, no: usize, format: &UidlFormat) -> String {
        match &self.uidls {
            Some(all) => all[no - 1].clone(),
            None => format.format(
                self.drop.messages()[no - 1].uid,
                self.drop.uidvalidity(),
                None,
            ),
        }
    }

    /// The messages not marked deleted, with their message numbers.
    fn live(&self) -> impl Iterator<Item = (usize, &Message)> {
        self.drop
            .messages()
            .iter()
            .zip(&self.deleted)
            .enumerate()
            .filter(|(_, (_, &d))| !d)
            .map(|(i, (m, _))| (i + 1, m))
    }

    fn get(&self, no: MsgNo) -> Result<&Message, &'static str> {
        let i = no as usize - 1;
        match self.drop.messages().get(i) {
            None => Err("No such message."),
            Some(_) if self.deleted[i] => Err("That message is marked deleted."),
            Some(m) => Ok(m),
        }
    }
}

/// A failed TLS handshake: a client that just went away is normal; anything else is worth a
/// clear line (an old client, a plain-text client on the TLS port, a bad certificate).
pub fn log_handshake_failure(e: &io::Error) {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
            log::debug(&format!("client left during the TLS handshake: {e}"))
        }
        io::ErrorKind::TimedOut => {
            log::warning(&format!("TLS handshake timeout: rip={} {e}", log::peer()))
        }
        _ => log::warning(&format!("TLS handshake failed: rip={} {e}", log::peer())),
    }
}

/// What the session was doing when the maildrop failed.
#[derive(Clone, Copy)]
enum During {
    Login,
    Retrieve,
    Update,
}

/// The one place maildrop errors become replies: a short RFC 3206 code and fixed words; the
/// detail went to the log.
fn error_reply(e: &Error, during: During) -> &'static str {
    match (during, e) {
        (During::Login, Error::Auth(_)) => "[AUTH] Authentication failed.",
        (During::Login, Error::InUse(_)) => "[IN-USE] Mailbox is in use; try again later.",
        (During::Login, Error::Perm(_)) => {
            "[SYS/PERM] The mailbox can't be served; tell the administrator."
        }
        (During::Login, _) => "[SYS/TEMP] Account is temporarily unavailable; try again later.",
        (During::Retrieve, Error::Gone) => "That message was deleted by another client.",
        (During::Retrieve, _) => "[SYS/TEMP] The mail server failed; try again later.",
        (During::Update, _) => "[SYS/TEMP] Some deleted messages were not removed.",
    }
}

/// A one-line reply. `text` is always ours: never an IMAP line or an error's text.
fn reply<W: Write>(w: &mut W, ok: bool, text: &str) -> io::Result<()> {
    let status = if ok { "+OK" } else { "-ERR" };
    if text.is_empty() {
        write!(w, "{status}\r\n")
    } else {
        write!(w, "{status} {text}\r\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// An in-memory maildrop: messages by UID, with scripted failures.
    #[derive(Default, Clone)]
    struct Fake {
        messages: Vec<(u32, Vec<u8>)>,
        password: &'static str,
        /// Fail the fetch at this offset (after `+OK` when > 0).
        fail_at: Option<u64>,
        gone: Vec<u32>,
        /// Answer `Gone` (a NIL body, or no FETCH) from this offset on.
        gone_at: Option<u64>,
        /// Answer with no octets from this offset on.
        empty_at: Option<u64>,
        commits: std::rc::Rc<std::cell::RefCell<Vec<Vec<u32>>>>,
        commit_fails: bool,
        /// What `prefetch` was told: (length, UIDs).
        hints: std::rc::Rc<std::cell::RefCell<Vec<Hint>>>,
    }

    type Hint = (u64, Vec<u32>);

    impl Backend for Fake {
        type Maildrop = Fake;
        fn login(&mut self, user: &str, password: &Secret) -> Result<Fake, Error> {
            match (user, password.expose()) {
                ("down", _) => Err(Error::Temp("connection refused".into())),
                (_, p) if p == self.password.as_bytes() => Ok(self.clone()),
                _ => Err(Error::Auth("bad password".into())),
            }
        }
    }

    impl Maildrop for Fake {
        fn uidvalidity(&self) -> u32 {
            0x1234
        }
        fn messages(&self) -> &[Message] {
            // Leak is fine in a test: a stable slice derived from the messages.
            Box::leak(
                self.messages
                    .iter()
                    .map(|(uid, m)| Message {
                        uid: *uid,
                        size: m.len() as u64,
                    })
                    .collect::<Vec<_>>()
                    .into_boxed_slice(),
            )
        }
        fn fetch(&mut self, uid: u32, off: u64, len: u64, out: &mut Vec<u8>) -> Result<(), Error> {
            if self.gone.contains(&uid) {
                return Err(Error::Gone);
            }
            if self.fail_at == Some(off) {
                return Err(Error::Temp("connection lost".into()));
            }
            if self.gone_at.is_some_and(|g| off >= g) {
                return Err(Error::Gone);
            }
            if self.empty_at.is_some_and(|e| off >= e) {
                return Ok(());
            }
            let m = &self.messages.iter().find(|(u, _)| *u == uid).unwrap().1;
            let start = (off as usize).min(m.len());
            let end = (start + len as usize).min(m.len());
            out.extend_from_slice(&m[start..end]);
            Ok(())
        }
        fn prefetch(&mut self, len: u64, next: &mut dyn Iterator<Item = Message>) {
            self.hints
                .borrow_mut()
                .push((len, next.map(|m| m.uid).collect()));
        }
        fn commit(&mut self, deleted: &[u32]) -> Result<Option<&'static str>, Error> {
            if self.commit_fails {
                return Err(Error::Temp("BYE".into()));
            }
            self.commits.borrow_mut().push(deleted.to_vec());
            Ok(None)
        }
        fn logout(&mut self) {}
    }

    struct Pipe {
        input: VecDeque<u8>,
        output: Vec<u8>,
        secure: bool,
        /// STLS offered, and what preparing TLS gives.
        stls: Option<Result<(), String>>,
        /// A client that waits for each reply: nothing is ever pending behind a command.
        lockstep: bool,
    }

    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Peer for Pipe {
        fn read_line(&mut self) -> io::Result<Line> {
            match self.input.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let mut l: Vec<u8> = self.input.drain(..=i).collect();
                    l.pop();
                    if l.last() == Some(&b'\r') {
                        l.pop();
                    }
                    Ok(Line::Command(l))
                }
                None => Ok(Line::Eof),
            }
        }
        fn is_secure(&self) -> bool {
            self.secure
        }
        fn read_sasl_line(&mut self) -> io::Result<Line> {
            self.read_line()
        }
        fn can_start_tls(&self) -> bool {
            self.stls.is_some() && !self.secure
        }
        fn prepare_tls(&mut self) -> Result<(), String> {
            self.stls.clone().unwrap_or(Err("not offered".into()))
        }
        fn has_pending_input(&self) -> bool {
            !self.lockstep && !self.input.is_empty()
        }
        fn start_tls(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }
    }

    fn fake() -> Fake {
        Fake {
            messages: vec![
                (3, b"Subject: a\r\n\r\nbody\r\n.dot\r\n".to_vec()),
                (7, b"Subject: b\n\nbare\nlf".to_vec()),
                (9, vec![b'x'; 3 * RETR_CHUNK as usize + 5]),
            ],
            password: "pw",
            ..Fake::default()
        }
    }

    fn settings() -> Settings {
        Settings {
            hostname: "pop.test".into(),
            allow_plaintext_auth: true,
            uidl_format: UidlFormat::default(),
            sasl: None,
            auth_failure_delay: Duration::ZERO,
            login_timeout: Duration::from_secs(180),
        }
    }

    fn run_with(backend: Fake, settings: Settings, script: &str) -> (String, Summary) {
        let mut pipe = Pipe {
            input: script.bytes().collect(),
            output: Vec::new(),
            secure: false,
            stls: None,
            lockstep: false,
        };
        let summary = Session::new(backend, settings).run(&mut pipe);
        (String::from_utf8_lossy(&pipe.output).into_owned(), summary)
    }

    fn run(script: &str) -> String {
        run_with(fake(), settings(), script).0
    }

    /// A peer whose login deadline passes after `deadline_after` lines unless the session ends
    /// it first; with its input used up, it times out as an idle client would.
    struct Clocked {
        pipe: Pipe,
        deadline_after: usize,
        served: usize,
        logged_in: bool,
    }

    impl Write for Clocked {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.pipe.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Peer for Clocked {
        fn read_line(&mut self) -> io::Result<Line> {
            if self.login_deadline_passed() || self.pipe.input.is_empty() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.served += 1;
            self.pipe.read_line()
        }
        fn read_sasl_line(&mut self) -> io::Result<Line> {
            self.read_line()
        }
        fn is_secure(&self) -> bool {
            false
        }
        fn can_start_tls(&self) -> bool {
            false
        }
        fn has_pending_input(&self) -> bool {
            false
        }
        fn start_tls(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }
        fn end_login_deadline(&mut self) {
            self.logged_in = true;
        }
        fn login_deadline_passed(&self) -> bool {
            !self.logged_in && self.served >= self.deadline_after
        }
    }

    fn run_clocked(script: &str, deadline_after: usize) -> (String, Summary) {
        let mut peer = Clocked {
            pipe: Pipe {
                input: script.bytes().collect(),
                output: Vec::new(),
                secure: false,
                stls: None,
                lockstep: true,
            },
            deadline_after,
            served: 0,
            logged_in: false,
        };
        let s = Settings {
            login_timeout: Duration::from_secs(42),
            ..settings()
        };
        let summary = Session::new(fake(), s).run(&mut peer);
        (
            String::from_utf8_lossy(&peer.pipe.output).into_owned(),
            summary,
        )
    }

    #[test]
    fn a_client_that_keeps_busy_without_logging_in_is_cut_at_the_login_deadline() {
        let (out, summary) = run_clocked(&"NOOP\r\n".repeat(10), 3);
        assert_eq!(
            transcript(&out),
            [
                "+OK pop.test POP3 proxy ready.",
                "+OK",
                "+OK",
                "+OK",
                "-ERR Timeout: log in within 42 s; closing."
            ]
        );
        assert_eq!(summary.outcome, "login-timeout");
    }

    #[test]
    fn after_login_the_login_deadline_no_longer_applies() {
        let (out, summary) = run_clocked(&format!("{LOGIN}{}", "NOOP\r\n".repeat(5)), 2);
        let t = transcript(&out);
        assert_eq!(t.len(), 1 + 2 + 5 + 1, "{t:?}");
        assert_eq!(t.last().unwrap(), &"-ERR Autologout; idle for too long.");
        assert_eq!(summary.outcome, "timeout");
    }

    /// Replies only, one string per reply line (multi-line bodies elided).
    fn transcript(out: &str) -> Vec<&str> {
        out.split("\r\n")
            .filter(|l| l.starts_with("+OK") || l.starts_with("-ERR"))
            .collect()
    }

    const LOGIN: &str = "USER u\r\nPASS pw\r\n";

    #[test]
    fn greeting_login_stat_list_uidl_quit() {
        let out = run(&format!(
            "{LOGIN}STAT\r\nLIST\r\nUIDL 2\r\nLIST 3\r\nQUIT\r\n"
        ));
        let size = 3 * RETR_CHUNK + 5;
        assert_eq!(
            out,
            format!(
                "+OK pop.test POP3 proxy ready.\r\n+OK Send your password.\r\n\
                 +OK Logged in, 3 messages.\r\n+OK 3 {}\r\n\
                 +OK Scan list follows\r\n1 26\r\n2 19\r\n3 {size}\r\n.\r\n\
                 +OK 2 0000000700001234\r\n+OK 3 {size}\r\n\
                 +OK pop.test POP3 proxy signing off.\r\n",
                26 + 19 + size
            )
        );
    }

    #[test]
    fn retr_is_dot_stuffed_with_crlf() {
        let out = run(&format!("{LOGIN}RETR 1\r\nRETR 2\r\nTOP 1 0\r\n"));
        assert!(out.contains(
            "+OK 26 octets\r\nSubject: a\r\n\r\nbody\r\n..dot\r\n.\r\n\
             +OK 19 octets\r\nSubject: b\r\n\r\nbare\r\nlf\r\n.\r\n\
             +OK Top of message follows.\r\nSubject: a\r\n\r\n.\r\n"
        ));
    }

    #[test]
    fn large_messages_stream_in_chunks_and_arrive_whole() {
        let (out, summary) = run_with(fake(), settings(), &format!("{LOGIN}RETR 3\r\nQUIT\r\n"));
        let body = "x".repeat(3 * RETR_CHUNK as usize + 5);
        assert!(out.contains(&format!("octets\r\n{body}\r\n.\r\n")));
        assert_eq!(summary.retrieved, 1);
    }

    #[test]
    fn failure_mid_message_never_sends_the_terminator() {
        let mut f = fake();
        f.fail_at = Some(RETR_CHUNK);
        let (out, summary) = run_with(f, settings(), &format!("{LOGIN}RETR 3\r\nNOOP\r\n"));
        assert!(
            out.ends_with(&"x".repeat(100)),
            "no terminator, nothing after"
        );
        assert_eq!(summary.outcome, "imap-failed-mid-message");
    }

    #[test]
    fn a_message_that_vanishes_mid_way_is_never_ended_with_a_dot() {
        // NIL (or no FETCH) for a later chunk, short of the listed size: cut, not ".".
        let mut f = fake();
        f.gone_at = Some(RETR_CHUNK);
        let (out, summary) = run_with(f, settings(), &format!("{LOGIN}RETR 3\r\nNOOP\r\n"));
        assert!(out.ends_with(&"x".repeat(100)), "no terminator");
        assert_eq!(summary.outcome, "imap-failed-mid-message");
        // An empty body there instead is the server's own end of the message (its listed size
        // was wrong, as Exchange's can be): ended with "."; the session goes on.
        let mut f = fake();
        f.empty_at = Some(RETR_CHUNK);
        let (out, _) = run_with(f, settings(), &format!("{LOGIN}RETR 3\r\nNOOP\r\n"));
        assert!(out.ends_with(&format!("{}\r\n.\r\n+OK\r\n", "x".repeat(100))));
        // An empty first answer for a message listed with octets: -ERR, and the session goes on.
        let mut f = fake();
        f.empty_at = Some(0);
        let (out, _) = run_with(f, settings(), &format!("{LOGIN}RETR 1\r\nNOOP\r\n"));
        assert!(
            out.ends_with("-ERR [SYS/TEMP] The mail server failed; try again later.\r\n+OK\r\n")
        );
        // Right at the listed size (a size that is a multiple of the chunk), NIL is the end.
        let mut f = fake();
        f.messages[2].1 = vec![b'y'; 2 * RETR_CHUNK as usize];
        f.gone_at = Some(2 * RETR_CHUNK);
        let (out, _) = run_with(f, settings(), &format!("{LOGIN}RETR 3\r\nNOOP\r\n"));
        assert!(out.contains(&format!("{}\r\n.\r\n+OK", "y".repeat(100))));
    }

    #[test]
    fn failure_before_the_first_octet_is_a_clean_error() {
        let mut f = fake();
        f.fail_at = Some(0);
        let (out, _) = run_with(f, settings(), &format!("{LOGIN}RETR 1\r\nNOOP\r\n"));
        assert!(out.ends_with("-ERR [SYS/TEMP] The mail server failed; try again later.\r\n"));
    }

    #[test]
    fn a_message_removed_elsewhere_gives_err_and_the_session_goes_on() {
        let mut f = fake();
        f.gone = vec![7];
        let out = run_with(f, settings(), &format!("{LOGIN}RETR 2\r\nNOOP\r\n")).0;
        assert_eq!(
            transcript(&out)[3..],
            ["-ERR That message was deleted by another client.", "+OK"]
        );
    }

    #[test]
    fn dele_marks_and_only_quit_commits() {
        let f = fake();
        let commits = f.commits.clone();
        let script =
            format!("{LOGIN}DELE 1\r\nDELE 1\r\nRETR 1\r\nSTAT\r\nLIST\r\nDELE 3\r\nQUIT\r\n");
        let (out, summary) = run_with(f, settings(), &script);
        let t = transcript(&out);
        assert_eq!(t[4], "-ERR That message is marked deleted.");
        assert_eq!(t[5], "-ERR That message is marked deleted.");
        assert_eq!(t[6], format!("+OK 2 {}", 19 + 3 * RETR_CHUNK + 5));
        assert!(out.contains("+OK Scan list follows\r\n2 19\r\n3 "));
        assert_eq!(*commits.borrow(), vec![vec![3, 9]]);
        assert_eq!(summary.deleted, 2);
    }

    #[test]
    fn rset_and_eof_change_nothing() {
        let f = fake();
        let commits = f.commits.clone();
        run_with(
            f.clone(),
            settings(),
            &format!("{LOGIN}DELE 1\r\nRSET\r\nQUIT\r\n"),
        );
        run_with(f, settings(), &format!("{LOGIN}DELE 1\r\nDELE 2\r\n"));
        assert!(commits.borrow().is_empty());
    }

    #[test]
    fn failed_update_is_an_err() {
        let mut f = fake();
        f.commit_fails = true;
        let out = run_with(f, settings(), &format!("{LOGIN}DELE 1\r\nQUIT\r\n")).0;
        assert!(out.ends_with("-ERR [SYS/TEMP] Some deleted messages were not removed.\r\n"));
    }

    #[test]
    fn auth_errors_carry_response_codes() {
        let out = run("USER u\r\nPASS wrong\r\nUSER down\r\nPASS x\r\nPASS pw\r\n");
        assert_eq!(
            transcript(&out)[1..],
            [
                "+OK Send your password.",
                "-ERR [AUTH] Authentication failed.",
                "+OK Send your password.",
                "-ERR [SYS/TEMP] Account is temporarily unavailable; try again later.",
                "-ERR Send USER first.",
            ]
        );
    }

    #[test]
    fn plaintext_auth_is_refused_unless_allowed() {
        let s = Settings {
            allow_plaintext_auth: false,
            ..settings()
        };
        let (out, summary) = run_with(fake(), s, &format!("CAPA\r\n{LOGIN}"));
        assert!(!out.contains("\r\nUSER\r\n"));
        assert!(out.contains("-ERR [AUTH] Plaintext authentication is not allowed without TLS."));
        assert!(summary.user.is_none());
    }

    #[test]
    fn passwords_with_cr_or_nul_never_reach_the_backend() {
        let out = run("USER u\r\nPASS p\rw\r\nUSER u\r\nPASS p\0w\r\n");
        assert_eq!(
            transcript(&out)
                .iter()
                .filter(|l| l.contains("[AUTH]"))
                .count(),
            2
        );
    }

    #[test]
    fn bad_commands_before_login_are_budgeted() {
        let (out, summary) = run_with(fake(), settings(), "FOO\r\nSTAT\r\nRETR x\r\nNOOP\r\n");
        assert_eq!(
            transcript(&out)[1..],
            [
                "-ERR Unknown command.",
                "-ERR Log in first.",
                "-ERR Invalid message number.",
                "-ERR Too many bad commands; closing.",
            ]
        );
        assert_eq!(summary.outcome, "too-many-bad-commands");
    }

    #[test]
    fn capa_lists_the_extensions() {
        let out = run("CAPA\r\n");
        assert!(out.contains(
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n\
             PIPELINING\r\nUSER\r\nSASL PLAIN LOGIN\r\nIMPLEMENTATION aiopopd "
        ));
    }

    #[test]
    fn auth_plain_and_login_log_in_like_user_pass() {
        // "\0u\0pw" and "u\0u\0pw", then LOGIN's two prompts.
        let out = run("AUTH PLAIN AHUAcHc=\r\nQUIT\r\n");
        assert_eq!(transcript(&out)[1], "+OK Logged in, 3 messages.");
        let out = run("AUTH PLAIN\r\ndQB1AHB3\r\nQUIT\r\n");
        assert!(out.contains("+ \r\n+OK Logged in, 3 messages."), "{out}");
        let out = run("AUTH LOGIN\r\ndQ==\r\ncHc=\r\nQUIT\r\n");
        assert!(
            out.contains("+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n+OK Logged in"),
            "{out}"
        );
    }

    #[test]
    fn auth_failures_cancel_and_garbage() {
        let out = run(concat!(
            "AUTH PLAIN AHUAd3Jvbmc=\r\n", // wrong password
            "AUTH PLAIN\r\n*\r\n",         // cancelled
            "AUTH PLAIN eHh4\r\n",         // no NULs
            "AUTH PLAIN dgB1AHB3\r\n",     // authzid "v" isn't the user
        ));
        assert_eq!(
            transcript(&out)[1..],
            [
                "-ERR [AUTH] Authentication failed.",
                "-ERR Authentication cancelled.",
                "-ERR Invalid SASL response.",
                "-ERR [AUTH] Authentication failed.",
            ]
        );
    }

    #[test]
    fn a_cancelled_auth_is_not_a_bad_command() {
        let cancel = "AUTH PLAIN\r\n*\r\nAUTH LOGIN\r\ndQ==\r\n*\r\n".repeat(2);
        let (out, summary) = run_with(fake(), settings(), &format!("{cancel}FOO\r\nNOOP\r\n"));
        let t = transcript(&out);
        assert_eq!(t[1..5], ["-ERR Authentication cancelled."; 4]);
        assert_eq!(t[5..], ["-ERR Unknown command.", "+OK"]);
        assert_eq!(summary.outcome, "client-gone");
        // A cancelled exchange after bad commands doesn't tip the budget either.
        let (out, _) = run_with(
            fake(),
            settings(),
            &format!("FOO\r\nBAR\r\n{cancel}{LOGIN}"),
        );
        assert!(out.ends_with("+OK Logged in, 3 messages.\r\n"), "{out}");
        // Endless cancels are bounded on their own.
        let many = "AUTH PLAIN\r\n*\r\n".repeat(MAX_CANCELLED_AUTHS as usize + 1);
        let (out, summary) = run_with(fake(), settings(), &many);
        assert!(out.ends_with(
            "-ERR Authentication cancelled.\r\n\
             -ERR Too many cancelled authentications; closing.\r\n"
        ));
        assert_eq!(summary.outcome, "too-many-cancelled-auths");
    }

    #[test]
    fn stls_without_a_usable_certificate_is_a_clear_err_and_the_session_goes_on() {
        let mut pipe = Pipe {
            input: "CAPA\r\nSTLS\r\nSTLS\r\nSTLS\r\nNOOP\r\nQUIT\r\n"
                .bytes()
                .collect(),
            output: Vec::new(),
            secure: false,
            stls: Some(Err(
                "reading the private key from /k.pem: no such file".into()
            )),
            lockstep: true,
        };
        let s = Settings {
            allow_plaintext_auth: false,
            ..settings()
        };
        let summary = Session::new(fake(), s).run(&mut pipe);
        let out = String::from_utf8_lossy(&pipe.output).into_owned();
        assert!(
            out.contains("PIPELINING\r\nSTLS\r\nIMPLEMENTATION"),
            "{out}"
        );
        let t = transcript(&out);
        assert_eq!(
            t[2..],
            [
                "-ERR [SYS/TEMP] TLS is not available; try again later.",
                "-ERR [SYS/TEMP] TLS is not available; try again later.",
                "-ERR [SYS/TEMP] TLS is not available; try again later.",
                "+OK",
                "+OK Bye.",
            ]
        );
        assert_eq!(summary.outcome, "quit-before-login");
        assert!(!pipe.secure);
    }

    #[test]
    fn auth_lists_mechanisms_and_refuses_unknown_ones() {
        let out = run("AUTH\r\nAUTH GSSAPI\r\nAUTH CRAM-MD5\r\n");
        assert!(out.contains("+OK Supported mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n"));
        assert_eq!(
            transcript(&out)
                .iter()
                .filter(|l| l.contains("Unsupported"))
                .count(),
            2
        );
        let s = Settings {
            sasl: Some(vec!["LOGIN".into()]),
            ..settings()
        };
        let (out, _) = run_with(fake(), s, "CAPA\r\nAUTH PLAIN AHUAcHc=\r\n");
        assert!(out.contains("SASL LOGIN\r\n"));
        assert!(out.ends_with("-ERR Unsupported authentication mechanism.\r\n"));
    }

    #[test]
    fn after_a_retr_or_top_the_next_live_messages_are_hinted_for_prefetch() {
        let f = fake();
        let hints = f.hints.clone();
        let script = format!("{LOGIN}RETR 1\r\nDELE 2\r\nRETR 3\r\nRETR 1\r\nTOP 1 0\r\nQUIT\r\n");
        let (out, _) = run_with(f, settings(), &script);
        assert!(out.ends_with("signing off.\r\n"));
        // Messages 1, 2, 3 are UIDs 3, 7, 9. After RETR 3 nothing is left; after TOP, the next
        // messages' tops.
        assert_eq!(
            *hints.borrow(),
            [
                (RETR_CHUNK, vec![7, 9]),
                (RETR_CHUNK, vec![]),
                (RETR_CHUNK, vec![9]),
                (TOP_FIRST_CHUNK, vec![9]),
            ]
        );
    }

    #[test]
    fn unknown_commands_are_logged_by_verb_or_length_only() {
        assert_eq!(verb_for_log(b"ehlo x"), "EHLO");
        assert_eq!(verb_for_log(b"AGFsaWNlAHNlY3JldA=="), "(20 octets)");
        assert_eq!(verb_for_log(b"abcde"), "(5 octets)");
    }

    #[test]
    fn sasl_user_names_must_pass_the_user_test() {
        // "\0a\tb\0pw" and "\0a\nb\0pw": refused before the backend is asked.
        let out = run("AUTH PLAIN AGEJYgBwdw==\r\nAUTH PLAIN AGEKYgBwdw==\r\n");
        assert_eq!(
            transcript(&out)
                .iter()
                .filter(|l| l.contains("[AUTH]"))
                .count(),
            2
        );
    }

    #[test]
    fn every_complete_command_before_eof_is_answered() {
        let out = run(&format!("{LOGIN}{}", "NOOP\r\n".repeat(1000)));
        assert_eq!(transcript(&out).len(), 3 + 1000);
    }
}
