//! `--uidl-format`: how a message's UID and the mailbox's UIDVALIDITY (or the server's own
//! identifier of the message) become a POP3 unique-id.
//!
//! The syntax follows Dovecot's `pop3_uidl_format` for the variables that make sense over
//! IMAP: `%u` (UID) and `%v` (UIDVALIDITY), with an optional zero-padded width and `X` for
//! lower-case hex (Dovecot prints `%X` in lower case), `%g` (the server's stable identifier:
//! EMAILID, X-GM-MSGID or X-GUID; it survives a UIDVALIDITY change), `%m` (a digest of the
//! header, `imap/digest.rs`; it survives a move to another server too), and `%%`. The default,
//! `%08Xu%08Xv`, is Dovecot's, so a mailbox that moves from Dovecot's POP3 to aiopopd keeps its
//! UIDLs and clients don't download everything again.

use std::fmt::Write;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var {
        width: usize,
        hex: bool,
        uid: bool,
    },
    /// `%g`.
    ServerId,
    /// `%m`.
    HeaderDigest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidlFormat(Vec<Part>);

pub const DEFAULT: &str = "%08Xu%08Xv";

/// RFC 1939 §7: 1 to 70 characters in the range 0x21 to 0x7E.
const MAX_LEN: usize = 70;

impl UidlFormat {
    pub fn parse(s: &str) -> Result<UidlFormat, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                if !('\x21'..='\x7e').contains(&c) {
                    return Err(format!("character {c:?} is not allowed in a UIDL"));
                }
                lit.push(c);
                continue;
            }
            let mut width = 0usize;
            while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
                width = width * 10 + d as usize;
                if width > MAX_LEN {
                    return Err("width too large".into());
                }
                chars.next();
            }
            let hex = chars.peek() == Some(&'X');
            if hex {
                chars.next();
            }
            let id_part = match chars.peek() {
                Some('g') => Some(Part::ServerId),
                Some('m') => Some(Part::HeaderDigest),
                _ => None,
            };
            if let Some(part) = id_part.filter(|_| width == 0 && !hex) {
                chars.next();
                if !lit.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut lit)));
                }
                parts.push(part);
                continue;
            }
            let uid = match chars.next() {
                Some('u') => true,
                Some('v') => false,
                Some('%') if width == 0 && !hex => {
                    lit.push('%');
                    continue;
                }
                other => {
                    return Err(format!(
                        "unknown variable {:?}: use %u (UID), %v (UIDVALIDITY) or %g (the \
                         server's message identifier)",
                        other.map_or(String::new(), String::from)
                    ))
                }
            };
            if !lit.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut lit)));
            }
            parts.push(Part::Var { width, hex, uid });
        }
        if !lit.is_empty() {
            parts.push(Part::Literal(lit));
        }
        let f = UidlFormat(parts);
        let unique = |p: &Part| {
            matches!(
                p,
                Part::Var { uid: true, .. } | Part::ServerId | Part::HeaderDigest
            )
        };
        if !f.0.iter().any(unique) {
            return Err(
                "the format must contain %u, %g or %m, or every message gets the same UIDL".into(),
            );
        }
        if f.needs_server_id() && f.needs_header_digest() {
            return Err("use %g or %m, not both".into());
        }
        // The longest result is with the largest values (widest numbers); an identifier is
        // made to fit (see `format`).
        // With an identifier as long as one may be after `format` shortens it (an MD5 in hex).
        let id = "x".repeat(32);
        let longest = f
            .format(u32::MAX, u32::MAX, Some(&id))
            .len()
            .max(f.format(0, 0, Some(&id)).len());
        if longest > MAX_LEN {
            return Err(format!(
                "results can be {longest} characters; POP3 allows 70"
            ));
        }
        Ok(f)
    }

    /// True if the format needs the server's identifier of each message (`%g`).
    pub fn needs_server_id(&self) -> bool {
        self.0.contains(&Part::ServerId)
    }

    /// True if the format needs a digest of each message's header (`%m`).
    pub fn needs_header_digest(&self) -> bool {
        self.0.contains(&Part::HeaderDigest)
    }

    /// True if each message's UIDL needs something from the server besides UID and
    /// UIDVALIDITY (`%g` or `%m`): the identifier passed to `format`.
    pub fn needs_id(&self) -> bool {
        self.needs_server_id() || self.needs_header_digest()
    }

    /// The UIDL. `id` is the server's identifier for `%g` (required then); one that would make
    /// the UIDL longer than POP3 allows is replaced by its MD5 in hex, deterministically.
    pub fn format(&self, uid: u32, uidvalidity: u32, id: Option<&str>) -> String {
        let mut s = String::with_capacity(16);
        for p in &self.0 {
            // Writing to a String can't fail.
            let _ = match *p {
                Part::Literal(ref l) => s.write_str(l),
                Part::ServerId | Part::HeaderDigest => s.write_str(id.unwrap_or("")),
                Part::Var {
                    width,
                    hex,
                    uid: is_uid,
                } => {
                    let v = if is_uid { uid } else { uidvalidity };
                    if hex {
                        write!(s, "{v:0width$x}")
                    } else {
                        write!(s, "{v:0width$}")
                    }
                }
            };
        }
        match id {
            // Once: if that doesn't fit either, the format itself is too long (refused by
            // `parse`).
            Some(long) if s.len() > MAX_LEN && long.len() > 32 => {
                let short = md5_hex(long.as_bytes());
                self.format(uid, uidvalidity, Some(&short))
            }
            _ => s,
        }
    }
}

fn md5_hex(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    Md5::digest(data).iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Makes the UIDLs of one session unique, deterministically: the second message (in mailbox
/// order) with a UIDL already given gets `.2` appended, the third `.3`, and so on (cut to fit).
/// Not the UID: after a move to another server the UIDs differ, the order doesn't. Returns
/// the UIDs of the messages changed, for the log.
pub fn make_unique(uidls: &mut [String], uids: &[u32]) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    let mut changed = Vec::new();
    for (u, &uid) in uidls.iter_mut().zip(uids) {
        if seen.insert(u.clone()) {
            continue;
        }
        let base = u.clone();
        for n in 2.. {
            let suffix = format!(".{n}");
            let mut candidate = base.clone();
            candidate.truncate(MAX_LEN - suffix.len());
            candidate.push_str(&suffix);
            if seen.insert(candidate.clone()) {
                *u = candidate;
                break;
            }
        }
        changed.push(uid);
    }
    changed
}

impl Default for UidlFormat {
    fn default() -> Self {
        UidlFormat::parse(DEFAULT).expect("the default format is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_matches_dovecot() {
        let f = UidlFormat::default();
        assert_eq!(f.format(1, 0x5f3a2b1c, None), "000000015f3a2b1c");
        assert_eq!(f.format(0xabc, 7, None), "00000abc00000007");
    }

    #[test]
    fn decimal_literals_and_percent() {
        let f = UidlFormat::parse("v%v.u%u%%").unwrap();
        assert_eq!(f.format(42, 9, None), "v9.u42%");
        assert_eq!(
            UidlFormat::parse("%5u").unwrap().format(42, 0, None),
            "00042"
        );
    }

    #[test]
    fn server_ids_fit_and_stay_unique() {
        let f = UidlFormat::parse("%g").unwrap();
        assert!(f.needs_server_id() && !UidlFormat::default().needs_server_id());
        assert_eq!(f.format(3, 9, Some("M6d99ac3275bb4e")), "M6d99ac3275bb4e");
        let long = "x".repeat(255);
        let u = f.format(3, 9, Some(&long));
        assert_eq!(u.len(), 32, "a long id is replaced by its MD5: {u}");
        assert_eq!(u, f.format(4, 1, Some(&long)), "deterministic");
        let mut uidls = vec!["a".to_string(), "b".into(), "a".into(), "a".into()];
        assert_eq!(make_unique(&mut uidls, &[1, 2, 10, 11]), [10, 11]);
        assert_eq!(uidls, ["a", "b", "a.2", "a.3"]);
        // A suffixed UIDL never takes another message's own.
        let mut uidls = vec!["a".to_string(), "a.2".into(), "a".into()];
        make_unique(&mut uidls, &[1, 2, 3]);
        assert_eq!(uidls, ["a", "a.2", "a.3"]);
        assert!(UidlFormat::parse("G%g").is_ok() && UidlFormat::parse("%5g").is_err());
        let m = UidlFormat::parse("%m").unwrap();
        assert!(m.needs_header_digest() && m.needs_id() && !m.needs_server_id());
        assert!(UidlFormat::parse("%g%m").is_err());
    }

    #[test]
    fn uidls_never_exceed_70() {
        assert!(UidlFormat::parse(&format!("{}%g", "a".repeat(48))).is_err());
        let f = UidlFormat::parse(&format!("{}%g", "a".repeat(38))).unwrap();
        for id in ["b".repeat(30), "c".repeat(40), "d".repeat(255)] {
            assert!(f.format(1, 1, Some(&id)).len() <= MAX_LEN);
        }
    }

    #[test]
    fn refuses_bad_formats() {
        for bad in [
            "",
            "%v",
            "%x",
            "%",
            "a b%u",
            "%u\u{e9}",
            "%99u",
            "%u%u%u%u%u%u%u%u",
        ] {
            assert!(UidlFormat::parse(bad).is_err(), "{bad:?}");
        }
    }
}
