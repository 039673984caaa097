//! The IMAP side, owned end to end: aiopopd's own client, laid out from the wire up.
//!
//! - `proto`: sans I/O. Commands encoded; the server's bytes decoded into responses by a real
//!   tokenizer, with a named bound on everything the server controls.
//! - `client`: the blocking driver. One buffer, tags, a deadline per command, the queue of
//!   body fetches sent ahead, a failure that sticks.
//! - `transport`: TCP and TLS (native-tls), timeouts.
//! - `digest`: `%m`, the header digests and their cache under `--state-dir`.
//! - `maildrop`: the `Maildrop` and `Backend` implementations: connect, STARTTLS, log in,
//!   snapshot, bodies, the UPDATE at QUIT. The one place IMAP failures become maildrop errors.
//!
//! Nothing here imports the POP3 side (`session`, `pop3`) or `config`: what it needs comes in
//! [`Settings`], an [`crate::account::Account`] and a [`crate::secret::Secret`].

pub mod client;
pub mod digest;
pub mod maildrop;
pub mod proto;
pub mod transport;

pub use maildrop::{ImapBackend, ImapMaildrop};

use crate::account::Accounts;
use std::path::PathBuf;
use std::time::Duration;

/// What DELE means, and so which messages are listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDele {
    /// List unseen messages; DELE adds \Seen.
    Seen,
    /// List messages without the keyword; DELE adds it.
    Keyword(String),
    /// List all; DELE = \Deleted + UID EXPUNGE of exactly those UIDs.
    Expunge,
    /// List all; DELE moves to the folder.
    Move(String),
    /// List all; DELE does nothing.
    Keep,
}

/// How to reach and use the IMAP server.
#[derive(Debug, Clone)]
pub struct Settings {
    pub accounts: Accounts,
    /// Extra trust anchors for the IMAP server's certificate (PEM).
    pub ca: Option<PathBuf>,
    pub on_dele: OnDele,
    pub max_messages: Option<usize>,
    /// Connecting, and each command from send to its tagged reply.
    pub timeout: Duration,
    /// What identifies each message besides its UID (`--uidl-format %g`, `%m`).
    pub ids: Ids,
    /// Where the `%m` digests are kept between sessions (`--state-dir`).
    pub state_dir: Option<PathBuf>,
}

/// What each message's UIDL needs from the server besides UID and UIDVALIDITY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ids {
    None,
    /// `%g`: the server's own identifier.
    Server,
    /// `%m`: a digest of the header.
    HeaderDigest,
}
