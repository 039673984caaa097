//! `--uidl-format`: how a message's UID and the mailbox's UIDVALIDITY become a POP3 unique-id.
//!
//! The syntax follows Dovecot's `pop3_uidl_format` for the two variables that make sense over
//! IMAP: `%u` (UID) and `%v` (UIDVALIDITY), with an optional zero-padded width and `X` for
//! lower-case hex (Dovecot prints `%X` in lower case), and `%%`. The default, `%08Xu%08Xv`, is
//! Dovecot's, so a mailbox that moves from Dovecot's POP3 to aiopopd keeps its UIDLs and clients
//! don't download everything again.

use std::fmt::Write;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var { width: usize, hex: bool, uid: bool },
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
            let uid = match chars.next() {
                Some('u') => true,
                Some('v') => false,
                Some('%') if width == 0 && !hex => {
                    lit.push('%');
                    continue;
                }
                other => {
                    return Err(format!(
                        "unknown variable {:?}: use %u (UID) or %v (UIDVALIDITY)",
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
        if !f.0.iter().any(|p| matches!(p, Part::Var { uid: true, .. })) {
            return Err("the format must contain %u, or every message gets the same UIDL".into());
        }
        // The longest result is with the largest values (widest numbers).
        let longest = f.format(u32::MAX, u32::MAX).len().max(f.format(0, 0).len());
        if longest > MAX_LEN {
            return Err(format!(
                "results can be {longest} characters; POP3 allows 70"
            ));
        }
        Ok(f)
    }

    pub fn format(&self, uid: u32, uidvalidity: u32) -> String {
        let mut s = String::with_capacity(16);
        for p in &self.0 {
            // Writing to a String can't fail.
            let _ = match *p {
                Part::Literal(ref l) => s.write_str(l),
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
        s
    }
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
        assert_eq!(f.format(1, 0x5f3a2b1c), "000000015f3a2b1c");
        assert_eq!(f.format(0xabc, 7), "00000abc00000007");
    }

    #[test]
    fn decimal_literals_and_percent() {
        let f = UidlFormat::parse("v%v.u%u%%").unwrap();
        assert_eq!(f.format(42, 9), "v9.u42%");
        assert_eq!(UidlFormat::parse("%5u").unwrap().format(42, 0), "00042");
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
