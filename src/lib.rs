//! aiopopd as a library: the parts the `aiopopd` binary wires together, public so that the
//! fuzz targets and benchmarks can drive the POP3 core (parser, session) without sockets.
//!
//! The protocol core (`pop3`, `session`, `maildrop`) knows nothing of sockets, TLS or IMAP;
//! `imap` is the one backend (its own IMAP client, `src/imap/`); `account`, `secret` and `sasl`
//! hold what both sides name; `conn`, `fd` and `tls` are the I/O edges.
#![deny(unsafe_code)]

pub mod account;
pub mod check;
pub mod config;
pub mod conn;
pub mod fd;
pub mod imap;
pub mod log;
pub mod maildrop;
pub mod oauth;
pub mod pop3;
pub mod proxy;
pub mod sasl;
pub mod secret;
pub mod session;
pub mod statefile;
pub mod terminal;
pub mod tls;
pub mod uidl;
