//! The small interface between the POP3 session and the mail store behind it: log in, take a
//! snapshot, read message octets in chunks, and apply the deletions at the end.
//!
//! The IMAP implementation lives in `imap/`; tests use an in-memory one. Nothing here knows
//! about POP3 replies: `Error` says what kind of failure happened, the session picks the reply.

use crate::secret::Secret;
use std::fmt;

/// One message of the snapshot taken at login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    pub uid: u32,
    pub size: u64,
}

/// What went wrong, and the detail for the log (never for the client).
#[derive(Debug)]
pub enum Error {
    /// The server refused the credentials.
    Auth(String),
    /// The server says the mailbox is in use (RFC 5530 INUSE).
    InUse(String),
    /// The server can't be reached or failed; worth trying again later. After this the
    /// maildrop's connection is unusable.
    Temp(String),
    /// A setup problem that won't go away by retrying (e.g. the mailbox can't hold keywords).
    Perm(String),
    /// The message was removed by another client during the session. The maildrop is still
    /// usable.
    Gone,
    /// The server can't do what was asked of it (a SASL mechanism it doesn't offer): no login
    /// was tried.
    Unsupported(String),
}

impl Error {
    /// The detail alone, without the kind.
    pub fn detail(&self) -> &str {
        match self {
            Error::Auth(d)
            | Error::InUse(d)
            | Error::Temp(d)
            | Error::Perm(d)
            | Error::Unsupported(d) => d,
            Error::Gone => "message no longer exists",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Auth(d) => write!(f, "authentication failed: {d}"),
            Error::InUse(d) => write!(f, "mailbox in use: {d}"),
            Error::Temp(d) => write!(f, "temporary failure: {d}"),
            Error::Perm(d) => write!(f, "permanent failure: {d}"),
            Error::Gone => f.write_str("message no longer exists"),
            Error::Unsupported(d) => write!(f, "not supported: {d}"),
        }
    }
}

/// The POP3 client's side of a relayed SASL exchange.
pub trait SaslClient {
    /// Carries a challenge to the client and returns its decoded answer; `None` if the client
    /// cancelled, sent garbage or left.
    fn challenge(&mut self, challenge: &[u8]) -> Option<Vec<u8>>;
}

/// Logs in; one attempt per call. Implementations hold whatever they need to connect.
pub trait Backend {
    type Maildrop: Maildrop;
    fn login(&mut self, user: &str, password: &Secret) -> Result<Self::Maildrop, Error>;

    /// Runs `mechanism` against the server, relaying each challenge to `client`, so the secret
    /// never exists here. `initial` is the client's initial response, if it sent one with AUTH.
    /// `Error::Unsupported` if the server doesn't offer the mechanism.
    fn authenticate(
        &mut self,
        mechanism: &str,
        initial: Option<Vec<u8>>,
        client: &mut dyn SaslClient,
    ) -> Result<Self::Maildrop, Error> {
        let _ = (initial, client);
        Err(Error::Perm(format!("{mechanism} can't be relayed")))
    }
}

/// An opened maildrop: a fixed snapshot of messages. Changes happen only in `commit`.
pub trait Maildrop {
    fn uidvalidity(&self) -> u32;
    /// The messages the session lists, oldest first; fixed for the session.
    fn messages(&self) -> &[Message];
    /// The server's own stable identifier of message `index` (of `messages`), if the backend
    /// was asked to list them (`--uidl-format %g`).
    fn stable_id(&self, index: usize) -> Option<&str> {
        let _ = index;
        None
    }
    /// Appends up to `len` octets of message `uid` starting at `offset` to `out`. Fewer than
    /// `len` octets means the message ended. `Error::Gone` if the message no longer exists.
    fn fetch(&mut self, uid: u32, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), Error>;
    /// A hint: the first `len` octets of these messages (nearest first) are likely to be
    /// fetched next. A backend may ask for some now, so that its server works while the client
    /// reads, and serve them from `fetch` later; it bounds what it holds. Failures are left for
    /// `fetch` to meet.
    fn prefetch(&mut self, len: u64, next: &mut dyn Iterator<Item = Message>) {
        let _ = (len, next);
    }
    /// The UPDATE state: applies the deletion of these UIDs. `Ok` may carry a remark for the
    /// client (e.g. a deletion that could only be partly honoured, by design).
    fn commit(&mut self, deleted: &[u32]) -> Result<Option<&'static str>, Error>;
    /// Ends the backend session politely; errors don't matter any more.
    fn logout(&mut self);
}
