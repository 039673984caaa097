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
    /// Log in with OAuth tokens aiopopd keeps (the file's `"oauth2"` section), not the password.
    pub oauth2: Option<crate::oauth::flow::Provider>,
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
    oauth2: Option<crate::oauth::flow::Provider>,
}

fn yes() -> bool {
    true
}

impl Accounts {
    /// The account for this POP3 user name. An unknown user (no file of that name in a
    /// directory that can be read) is `Error::Auth`, the same as a wrong password. Anything
    /// that is the server's fault rather than the client's is `Error::Perm`, naming the path
    /// and the problem: a `--user-dir` that is missing or can't be searched (which would make
    /// every user look unknown, and fail2ban ban them for it), and a user file that can't be
    /// read or used.
    pub fn lookup(&self, user: &str) -> Result<Account, Error> {
        match &self.source {
            Source::Fixed(server) => Ok(Account {
                server: server.clone(),
                username: user.to_string(),
                mailbox: self.mailbox.clone(),
                oauth2: None,
            }),
            Source::UserDir(dir) => self.read_user_file(dir, user),
        }
    }

    fn read_user_file(&self, dir: &Path, user: &str) -> Result<Account, Error> {
        if user.contains('/') || user.starts_with('.') || user.is_empty() {
            return Err(Error::Auth("user name not allowed in --user-dir".into()));
        }
        let path = dir.join(user);
        let bad = |what: &str| Error::Perm(format!("user file {}: {what}", path.display()));
        // Metadata first: a FIFO or a directory must not be opened and read.
        let problem = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => None,
            Ok(_) => Some("not a regular file".to_string()),
            Err(e) => Some(match dir_problem(dir) {
                Some(p) => return Err(Error::Perm(format!("--user-dir {}: {p}", dir.display()))),
                None if e.kind() != io::ErrorKind::NotFound => e.to_string(),
                None if std::fs::symlink_metadata(&path).is_ok() => {
                    "a symbolic link to a file that doesn't exist".to_string()
                }
                None => return Err(Error::Auth("unknown user".into())),
            }),
        };
        if let Some(p) = problem {
            return Err(bad(&p));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| bad(&e.to_string()))?;
        let file: UserFile = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let security = match (file.ssl, file.starttls) {
            (true, _) => Security::Tls,
            (false, true) => Security::StartTls,
            (false, false) => Security::Plain,
        };
        if file.hostname.is_empty() || file.hostname.chars().any(|c| c.is_control() || c == ' ') {
            return Err(bad("\"hostname\" must be a host name or address"));
        }
        if file.port == 0 {
            return Err(bad("\"port\" must be 1 to 65535"));
        }
        // An IMAP login the server can only refuse would be logged as a failed login, and
        // fail2ban would count the administrator's mistake against the user.
        if let Some(name) = &file.username {
            if name.is_empty() || name.chars().any(char::is_control) {
                return Err(bad(
                    "\"username\" must be a non-empty name without control characters",
                ));
            }
        }
        let mailbox = file.mailbox.unwrap_or_else(|| self.mailbox.clone());
        check_mailbox_name(&mailbox, "\"mailbox\"").map_err(|e| bad(&e))?;
        let server = Server {
            host: file.hostname,
            port: file.port,
            security,
        };
        check_plaintext(&server, self.plaintext_allowed).map_err(|e| bad(&e))?;
        if let Some(p) = &file.oauth2 {
            p.check().map_err(|e| bad(&format!("\"oauth2\": {e}")))?;
        }
        Ok(Account {
            server,
            username: file.username.unwrap_or_else(|| user.to_string()),
            mailbox,
            oauth2: file.oauth2,
        })
    }
}

/// Why `dir` can't be used to look users up, if it can't: it must be a directory this process
/// may search (`dir/.` resolves only then). Without this check every user would look unknown.
fn dir_problem(dir: &Path) -> Option<String> {
    match std::fs::metadata(dir.join(".")) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some("not a directory".into()),
        Err(e) => Some(e.to_string()),
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

    #[test]
    fn server_faults_are_perm_never_an_unknown_user() {
        let dir = tempfile::tempdir().unwrap();
        let perm = |a: &Accounts, user: &str, what: &str| match a.lookup(user) {
            Err(Error::Perm(d)) => assert!(d.contains(what), "{user}: {d}"),
            other => panic!("{user}: {other:?}"),
        };
        // The directory missing, or not a directory: every user, known or not.
        let gone = accounts(&dir.path().join("missing"));
        perm(&gone, "alice", "--user-dir ");
        perm(&gone, "alice", "No such file or directory");
        std::fs::write(dir.path().join("plain"), "").unwrap();
        perm(
            &accounts(&dir.path().join("plain")),
            "alice",
            "Not a directory",
        );
        // The directory fine: no file is an unknown user; a broken file is the server's fault.
        let a = accounts(dir.path());
        assert!(matches!(a.lookup("nobody"), Err(Error::Auth(_))));
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        perm(&a, "sub", "not a regular file");
        std::os::unix::fs::symlink("nowhere", dir.path().join("link")).unwrap();
        perm(&a, "link", "symbolic link");
        for (name, text, what) in [
            ("json", "{\"hostname\": ", "EOF"),
            ("array", "[]", "expected struct UserFile"),
            ("port", r#"{"hostname": "h", "port": 0}"#, "\"port\""),
            ("host", r#"{"hostname": "", "port": 993}"#, "\"hostname\""),
            (
                "user",
                r#"{"hostname": "h", "port": 993, "username": ""}"#,
                "\"username\"",
            ),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
            perm(
                &a,
                name,
                &format!("user file {}", dir.path().join(name).display()),
            );
            perm(&a, name, what);
        }
        std::fs::write(dir.path().join("bytes"), b"\xff\xfe").unwrap();
        perm(&a, "bytes", "UTF-8");
    }
}
