//! Where one user's login goes: the IMAP server (host, port, how it is protected), the IMAP
//! user name and the mailbox. Either fixed for every user (`-H`), or read per user from a
//! `--user-dir` file. The IMAP side takes an [`Account`] and needs nothing else from here.

use crate::maildrop::Error;
use serde::Deserialize;
use std::io;
use std::path::{Path, PathBuf};

/// How the IMAP connection is protected. Certificates are always verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Implicit TLS (port 993).
    Tls,
    /// STARTTLS on the plain port; no fallback to clear.
    StartTls,
    /// Clear text: loopback only unless `--imap-plaintext`.
    Plain,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub security: Security,
}

/// What one login needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub server: Server,
    /// The IMAP user name (the POP3 one unless a `--user-dir` file says otherwise).
    pub username: String,
    pub mailbox: String,
}

/// Where logins go: one fixed server (`-H`), or one per user from `--user-dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Fixed(Server),
    UserDir(PathBuf),
}

/// The accounts of this service: the source, and the defaults a user's file may leave out.
#[derive(Debug, Clone)]
pub struct Accounts {
    pub source: Source,
    /// `--mailbox`.
    pub mailbox: String,
    /// `--imap-plaintext`: clear-text IMAP to a host that isn't loopback was allowed.
    pub plaintext_allowed: bool,
}

/// `DIR/<user>` as the Python aiopopd's server.py read it. `ssl` defaults to true there, and
/// here; `"starttls": true` with `"ssl": false` asks for STARTTLS. Unknown keys are refused, so
/// a typo (`"mailbx"`) is an error naming the file and the key, not a silent default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFile {
    hostname: String,
    port: u16,
    #[serde(default = "yes")]
    ssl: bool,
    #[serde(default)]
    starttls: bool,
    username: Option<String>,
    mailbox: Option<String>,
}

fn yes() -> bool {
    true
}

impl Accounts {
    /// The account for this POP3 user name. An unknown user is `Error::Auth`, the same as a
    /// wrong password; a file that can't be used is `Error::Perm`, naming the file.
    pub fn lookup(&self, user: &str) -> Result<Account, Error> {
        match &self.source {
            Source::Fixed(server) => Ok(Account {
                server: server.clone(),
                username: user.to_string(),
                mailbox: self.mailbox.clone(),
            }),
            Source::UserDir(dir) => self.read_user_file(dir, user),
        }
    }

    fn read_user_file(&self, dir: &Path, user: &str) -> Result<Account, Error> {
        if user.contains('/') || user.starts_with('.') || user.is_empty() {
            return Err(Error::Auth("user name not allowed in --user-dir".into()));
        }
        let path = dir.join(user);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Auth("unknown user".into()))
            }
            Err(e) => return Err(Error::Perm(format!("{}: {e}", path.display()))),
        };
        let bad = |what: &str| Error::Perm(format!("{}: {what}", path.display()));
        let file: UserFile = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let security = match (file.ssl, file.starttls) {
            (true, _) => Security::Tls,
            (false, true) => Security::StartTls,
            (false, false) => Security::Plain,
        };
        let mailbox = file.mailbox.unwrap_or_else(|| self.mailbox.clone());
        check_mailbox_name(&mailbox, "\"mailbox\"").map_err(|e| bad(&e))?;
        let server = Server {
            host: file.hostname,
            port: file.port,
            security,
        };
        check_plaintext(&server, self.plaintext_allowed).map_err(|e| bad(&e))?;
        Ok(Account {
            server,
            username: file.username.unwrap_or_else(|| user.to_string()),
            mailbox,
        })
    }
}

/// The user's password would cross the network in clear: only to loopback, unless the operator
/// says so explicitly. (A name counts as loopback only if every address it resolves to is.)
pub fn check_plaintext(server: &Server, allowed: bool) -> Result<(), String> {
    if server.security != Security::Plain || allowed || is_loopback(&server.host, server.port) {
        return Ok(());
    }
    Err(format!(
        "clear-text IMAP to {} would send passwords over the network in clear: use -s \
         (implicit TLS) or --imap-starttls, or --imap-plaintext if you really mean it",
        server.host
    ))
}

pub fn is_loopback(host: &str, port: u16) -> bool {
    use std::net::ToSocketAddrs;
    match (host, port).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// Mailbox names go into IMAP quoted strings (in modified UTF-7): any text without control
/// characters.
pub fn check_mailbox_name(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(format!(
            "{what} {name:?}: use a non-empty mailbox name without control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts(dir: &Path) -> Accounts {
        Accounts {
            source: Source::UserDir(dir.to_path_buf()),
            mailbox: "INBOX".into(),
            plaintext_allowed: false,
        }
    }

    #[test]
    fn user_files_are_read_with_defaults_and_unknown_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a"),
            r#"{"hostname": "imap.example.com", "port": 993}"#,
        )
        .unwrap();
        let a = accounts(dir.path()).lookup("a").unwrap();
        assert_eq!(a.server.security, Security::Tls);
        assert_eq!((a.username.as_str(), a.mailbox.as_str()), ("a", "INBOX"));
        std::fs::write(
            dir.path().join("b"),
            r#"{"hostname": "h", "port": 993, "mailbx": "Archive"}"#,
        )
        .unwrap();
        let e = accounts(dir.path()).lookup("b").unwrap_err();
        assert!(
            matches!(&e, Error::Perm(d) if d.contains("mailbx") && d.contains("/b")),
            "{e}"
        );
        assert!(matches!(
            accounts(dir.path()).lookup("nobody"),
            Err(Error::Auth(_))
        ));
        assert!(matches!(
            accounts(dir.path()).lookup("../a"),
            Err(Error::Auth(_))
        ));
        std::fs::write(
            dir.path().join("c"),
            r#"{"hostname": "192.0.2.1", "port": 143, "ssl": false}"#,
        )
        .unwrap();
        assert!(matches!(
            accounts(dir.path()).lookup("c"),
            Err(Error::Perm(d)) if d.contains("--imap-plaintext")
        ));
    }
}
