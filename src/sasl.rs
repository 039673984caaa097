//! SASL mechanism names, defined once for the POP3 side (what AUTH offers) and the IMAP side
//! (what it asks the server for).

/// Mechanisms aiopopd runs itself: it decodes them and logs in as with USER/PASS.
pub const LOCAL: [&str; 2] = ["PLAIN", "LOGIN"];

/// Mechanisms relayed to the IMAP server step by step, so the secret never exists here.
/// Channel-binding (-PLUS) variants are never offered: the binding would be to our TLS session,
/// not the server's.
pub const RELAYED: [&str; 5] = [
    "CRAM-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
    "XOAUTH2",
    "OAUTHBEARER",
];

/// True for a mechanism in [`RELAYED`] (names are upper case).
pub fn is_relayed(mechanism: &str) -> bool {
    RELAYED.contains(&mechanism)
}
