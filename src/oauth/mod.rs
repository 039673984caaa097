//! OAuth 2.0 towards the IMAP server for POP3 clients that only know passwords (issue 14): the
//! token store, sealed with the POP3 password.

pub mod enrol;
pub mod flow;
pub mod http;
pub mod store;
#[cfg(test)]
mod testing;
pub mod token;
