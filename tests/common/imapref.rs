//! The reference IMAP client for servers the tests can't inspect with their own tools (Cyrus,
//! Courier): what a server serves as `BODY[]` and `RFC822.SIZE`, its flags and UIDs, and APPEND
//! and CREATE, all through the `imap` crate on the server's plain port, independently of the
//! code under test.
//! Mailbox names are given as the server shows them (UTF-8) and sent in modified UTF-7.
#![allow(dead_code)]

use std::net::TcpStream;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A mailbox name in IMAP's modified UTF-7 (RFC 3501 5.1.3), as servers expect it; written
/// here from the RFC, independently of aiopopd's own encoder.
pub fn mutf7(name: &str) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";
    let mut out = String::new();
    let mut run: Vec<u16> = Vec::new();
    let flush = |run: &mut Vec<u16>, out: &mut String| {
        if run.is_empty() {
            return;
        }
        let bytes: Vec<u8> = run.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        for chunk in bytes.chunks(3) {
            let n = chunk.len();
            let v = (u32::from(chunk[0]) << 16)
                | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
                | u32::from(*chunk.get(2).unwrap_or(&0));
            for i in 0..=n {
                out.push(B64[((v >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out.push('-');
        run.clear();
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut run, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            run.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut run, &mut out);
    out
}

#[test]
fn mutf7_examples() {
    assert_eq!(mutf7("Entwürfe & Co"), "Entw&APw-rfe &- Co");
    assert_eq!(
        mutf7("~peter/mail/台北/日本語"),
        "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    );
}

/// Where and as whom to log in.
#[derive(Clone, Debug)]
pub struct Account {
    pub port: u16,
    pub user: String,
    pub password: String,
}

impl Account {
    pub fn login(&self) -> imap::Session<TcpStream> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to IMAP");
        tcp.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        tcp.set_write_timeout(Some(TIMEOUT)).expect("timeout");
        let mut client = imap::Client::new(tcp);
        client.read_greeting().expect("IMAP greeting");
        client
            .login(&self.user, &self.password)
            .map_err(|(e, _)| e)
            .unwrap_or_else(|e| panic!("IMAP LOGIN {} on port {}: {e}", self.user, self.port))
    }

    /// EXAMINEs `mailbox` (by hand: the crate panics on an untagged NO inside a SELECT
    /// response); None if the server refuses (no such mailbox). UIDs ascending.
    fn examine(&self, mailbox: &str) -> Option<(imap::Session<TcpStream>, Vec<u32>)> {
        let mut session = self.login();
        let quoted = mutf7(mailbox).replace('\\', "\\\\").replace('"', "\\\"");
        if session
            .run_command_and_read_response(format!("EXAMINE \"{quoted}\""))
            .is_err()
        {
            let _ = session.logout();
            return None;
        }
        let mut uids: Vec<u32> = session
            .uid_search("ALL")
            .expect("IMAP UID SEARCH ALL")
            .into_iter()
            .collect();
        uids.sort_unstable();
        Some((session, uids))
    }

    /// Each message's `BODY[]`, one message at a time, sorted by UID.
    pub fn bodies(&self, mailbox: &str) -> Vec<(u32, Vec<u8>)> {
        let (mut session, uids) = self
            .examine(mailbox)
            .unwrap_or_else(|| panic!("EXAMINE {mailbox:?} failed"));
        let mut result = Vec::with_capacity(uids.len());
        for uid in uids {
            let fetches = session
                .uid_fetch(uid.to_string(), "(UID BODY.PEEK[])")
                .unwrap_or_else(|e| panic!("IMAP UID FETCH {uid}: {e}"));
            let body = fetches
                .iter()
                .find(|f| f.uid == Some(uid))
                .and_then(|f| f.body())
                .unwrap_or_else(|| panic!("IMAP served no BODY[] for uid {uid}"))
                .to_vec();
            result.push((uid, body));
        }
        let _ = session.logout();
        result
    }

    /// Each message's `RFC822.SIZE`, sorted by UID.
    pub fn sizes(&self, mailbox: &str) -> Vec<(u32, u32)> {
        self.fetch_all(mailbox, "(UID RFC822.SIZE)", |f| {
            f.size.expect("RFC822.SIZE")
        })
    }

    /// Every message's UID and flags (without the session flag `\Recent`), sorted by UID; a
    /// mailbox that doesn't exist gives an empty list.
    pub fn flags(&self, mailbox: &str) -> Vec<(u32, Vec<String>)> {
        self.fetch_all(mailbox, "(UID FLAGS)", |f| {
            f.flags()
                .iter()
                .map(|f| f.to_string())
                .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
                .collect()
        })
    }

    fn fetch_all<T>(
        &self,
        mailbox: &str,
        items: &str,
        get: impl Fn(&imap::types::Fetch) -> T,
    ) -> Vec<(u32, T)> {
        let Some((mut session, uids)) = self.examine(mailbox) else {
            return Vec::new();
        };
        let mut result = Vec::with_capacity(uids.len());
        if !uids.is_empty() {
            let fetches = session
                .uid_fetch("1:*", items)
                .unwrap_or_else(|e| panic!("IMAP UID FETCH 1:* {items}: {e}"));
            for f in fetches.iter() {
                if let Some(uid) = f.uid {
                    result.push((uid, get(f)));
                }
            }
        }
        let _ = session.logout();
        result.sort_by_key(|r| r.0);
        assert_eq!(
            result.iter().map(|r| r.0).collect::<Vec<_>>(),
            uids,
            "{items} for every UID"
        );
        result
    }

    /// APPENDs each message (as is: the server may refuse what it considers malformed) to
    /// `mailbox`, in order, over one session.
    pub fn append(&self, mailbox: &str, messages: &[Vec<u8>]) {
        let mut session = self.login();
        let encoded = mutf7(mailbox);
        for m in messages {
            session
                .append(&encoded, m)
                .finish()
                .unwrap_or_else(|e| panic!("IMAP APPEND to {mailbox:?} ({} octets): {e}", m.len()));
        }
        let _ = session.logout();
    }

    /// SELECTs `mailbox` (read-write) and logs out: what a mail client's first look does.
    pub fn select(&self, mailbox: &str) {
        let mut session = self.login();
        session
            .select(mutf7(mailbox))
            .unwrap_or_else(|e| panic!("SELECT {mailbox:?}: {e}"));
        let _ = session.logout();
    }

    /// Adds `flags` to message `uid` of `mailbox`.
    pub fn add_flags(&self, mailbox: &str, uid: u32, flags: &[&str]) {
        let mut session = self.login();
        session.select(mutf7(mailbox)).expect("SELECT");
        session
            .uid_store(uid.to_string(), format!("+FLAGS ({})", flags.join(" ")))
            .unwrap_or_else(|e| panic!("UID STORE {uid} +FLAGS {flags:?}: {e}"));
        let _ = session.logout();
    }

    /// CREATEs `mailbox` (the server's full name); an existing mailbox is fine.
    pub fn create(&self, mailbox: &str) {
        let mut session = self.login();
        let encoded = mutf7(mailbox);
        if let Err(e) = session.create(&encoded) {
            // Cyrus says "Mailbox already exists"; Courier only "Cannot create this folder.":
            // then a LIST shows whether it exists (Courier refuses a NIL reference).
            let exists = e.to_string().to_ascii_lowercase().contains("exists")
                || session
                    .list(Some(""), Some("*"))
                    .map(|l| l.iter().any(|n| n.name() == encoded))
                    .unwrap_or(false);
            assert!(exists, "IMAP CREATE {mailbox:?}: {e}");
        }
        let _ = session.logout();
    }

    /// Each message's RFC 8474 EMAILID (OBJECTID), sorted by UID. Over a bare connection:
    /// the crate fails on a FETCH item it doesn't know.
    #[allow(dead_code)] // Used by some test binaries only.
    pub fn emailids(&self, mailbox: &str) -> Vec<(u32, String)> {
        use std::io::{BufRead, BufReader, Write};
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to IMAP");
        tcp.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut w = tcp.try_clone().expect("clone");
        let mut r = BufReader::new(tcp);
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut ids = Vec::new();
        let mut line = String::new();
        r.read_line(&mut line).expect("greeting");
        for (tag, cmd) in [
            (
                "a",
                format!("LOGIN {} {}", quote(&self.user), quote(&self.password)),
            ),
            ("b", format!("EXAMINE {}", quote(&mutf7(mailbox)))),
            ("c", "UID FETCH 1:* (UID EMAILID)".to_string()),
            ("d", "LOGOUT".to_string()),
        ] {
            write!(w, "{tag} {cmd}\r\n").expect("write");
            loop {
                line.clear();
                assert!(r.read_line(&mut line).expect("read") > 0, "closed at {cmd}");
                if let Some(rest) = line.strip_prefix(&format!("{tag} ")) {
                    assert!(rest.starts_with("OK"), "{cmd}: {line}");
                    break;
                }
                let field = |name: &str| {
                    let at = line.find(name)? + name.len();
                    let rest = line[at..].trim_start_matches([' ', '(']);
                    let end = rest.find([' ', ')'])?;
                    Some(rest[..end].to_string())
                };
                if let (Some(uid), Some(id)) = (field("UID "), field("EMAILID ")) {
                    ids.push((uid.parse().expect("UID"), id));
                }
            }
        }
        ids.sort_unstable();
        ids
    }

    /// The mailbox's UIDVALIDITY.
    pub fn uidvalidity(&self, mailbox: &str) -> u32 {
        let mut session = self.login();
        let m = session.examine(mutf7(mailbox)).expect("EXAMINE");
        let _ = session.logout();
        m.uid_validity.expect("UIDVALIDITY")
    }
}
