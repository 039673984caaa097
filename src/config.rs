//! The command line as typed, turned into a validated [`Config`] in one step. Option names
//! follow the earlier Python aiopopd. Nothing here opens a connection.

use crate::log;
use crate::uidl::UidlFormat;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

pub const USAGE: &str = "\
aiopopd: serve one POP3 session on stdin/stdout (or systemd's fd 3), proxied to an IMAP server.

Usage: aiopopd -H HOST [options]      (run by systemd, xinetd or systemd-socket-activate)

IMAP server:
  -H, --imap-hostname HOST   IMAP server (required unless --user-dir)
  -p, --imap-port PORT       default 993 with -s, else 143
  -s, --imap-ssl             implicit TLS to the IMAP server
      --mailbox NAME         mailbox served as the maildrop (default INBOX)
      --user-dir DIR         one JSON file per POP3 user name (alias --path):
                             {\"hostname\", \"port\", \"ssl\", \"username\"?, \"mailbox\"?}
      --imap-timeout SECS    connect and read timeout towards IMAP (default 60)
POP3 side:
  -d, --hostname NAME        name in the greeting (default: this host's name)
      --allow-plaintext-auth allow USER/PASS on an unencrypted connection
      --on-dele ACTION       seen (default), keyword:NAME, expunge, move:FOLDER, keep
      --uidl-format FMT      default %08Xu%08Xv (Dovecot's): %u UID, %v UIDVALIDITY
      --max-messages N       list at most N messages (oldest first)
      --timeout SECS         idle timeout towards the client (default 600)
Logging:
  -l, --systemd-logging      log to stderr with <N> prefixes (when stderr isn't the client)
  -v, --verbose              debug logs (never passwords)
  -h, --help                 this text
  -V, --version              the version
";

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImapServer {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Where logins go: one fixed server (`-H`), or one per user from `--user-dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Fixed(ImapServer),
    UserDir(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub mailbox: String,
    pub allow_plaintext_auth: bool,
    pub hostname: String,
    pub on_dele: OnDele,
    pub uidl_format: UidlFormat,
    pub max_messages: Option<usize>,
    pub timeout: Duration,
    pub imap_timeout: Duration,
    pub log_target: log::Target,
    pub verbose: bool,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Action {
    Serve(Box<Config>),
    Help,
    Version,
}

pub fn parse(args: Vec<OsString>) -> Result<Action, String> {
    let mut a = pico_args::Arguments::from_vec(args);
    if a.contains(["-h", "--help"]) {
        return Ok(Action::Help);
    }
    if a.contains(["-V", "--version"]) {
        return Ok(Action::Version);
    }
    for (short, long) in [
        ("-P", "--listen-port"),
        ("-r", "--listen-all"),
        ("-n", "--no-setuid"),
    ] {
        if a.contains([short, long]) {
            return Err(format!(
                "{short}/{long} is gone: aiopopd no longer listens itself. Run it from \
                 systemd (aiopopd.socket with Accept=yes), xinetd, or \
                 `systemd-socket-activate --accept --inetd -l PORT aiopopd ...`"
            ));
        }
    }
    let host: Option<String> = a
        .opt_value_from_str(["-H", "--imap-hostname"])
        .map_err(arg)?;
    let port: Option<u16> = a.opt_value_from_str(["-p", "--imap-port"]).map_err(arg)?;
    let tls = a.contains(["-s", "--imap-ssl"]);
    let mailbox: String = a
        .opt_value_from_str("--mailbox")
        .map_err(arg)?
        .unwrap_or_else(|| "INBOX".to_string());
    let mut user_dir: Option<PathBuf> = a.opt_value_from_os_str("--user-dir", path).map_err(arg)?;
    if let Some(p) = a.opt_value_from_os_str("--path", path).map_err(arg)? {
        user_dir = Some(p);
    }
    let allow_plaintext_auth = a.contains("--allow-plaintext-auth");
    let hostname = a
        .opt_value_from_str(["-d", "--hostname"])
        .map_err(arg)?
        .unwrap_or_else(default_hostname);
    let on_dele = match a
        .opt_value_from_str::<_, String>("--on-dele")
        .map_err(arg)?
    {
        Some(s) => parse_on_dele(&s)?,
        None => OnDele::Seen,
    };
    let uidl_format = match a
        .opt_value_from_str::<_, String>("--uidl-format")
        .map_err(arg)?
    {
        Some(s) => UidlFormat::parse(&s).map_err(|e| format!("--uidl-format {s:?}: {e}"))?,
        None => UidlFormat::default(),
    };
    let max_messages: Option<usize> = a.opt_value_from_str("--max-messages").map_err(arg)?;
    if max_messages == Some(0) {
        return Err("--max-messages must be at least 1".into());
    }
    let timeout = seconds(
        a.opt_value_from_str("--timeout").map_err(arg)?,
        600,
        "--timeout",
    )?;
    let imap_timeout = seconds(
        a.opt_value_from_str("--imap-timeout").map_err(arg)?,
        60,
        "--imap-timeout",
    )?;
    let log_target = if a.contains(["-l", "--systemd-logging"]) {
        log::Target::Stderr
    } else {
        log::Target::Syslog
    };
    let verbose = a.contains(["-v", "--verbose"]);
    let rest = a.finish();
    if !rest.is_empty() {
        let rest: Vec<_> = rest.iter().map(|s| s.to_string_lossy()).collect();
        return Err(format!("unexpected arguments: {}", rest.join(" ")));
    }
    check_mailbox_name(&mailbox, "--mailbox")?;
    let source = match (host, user_dir) {
        (Some(host), None) => Source::Fixed(ImapServer {
            port: port.unwrap_or(if tls { 993 } else { 143 }),
            host,
            tls,
        }),
        (None, Some(dir)) => Source::UserDir(dir),
        (Some(_), Some(_)) => return Err("give either -H or --user-dir, not both".into()),
        (None, None) => return Err("-H/--imap-hostname is required (or --user-dir)".into()),
    };
    Ok(Action::Serve(Box::new(Config {
        source,
        mailbox,
        allow_plaintext_auth,
        hostname,
        on_dele,
        uidl_format,
        max_messages,
        timeout,
        imap_timeout,
        log_target,
        verbose,
    })))
}

fn arg(e: pico_args::Error) -> String {
    e.to_string()
}

fn path(s: &std::ffi::OsStr) -> Result<PathBuf, &'static str> {
    Ok(PathBuf::from(s))
}

fn seconds(v: Option<u64>, default: u64, name: &str) -> Result<Duration, String> {
    match v.unwrap_or(default) {
        0 => Err(format!("{name} must be at least 1 second")),
        s => Ok(Duration::from_secs(s)),
    }
}

fn parse_on_dele(s: &str) -> Result<OnDele, String> {
    let bad = || format!("--on-dele {s:?}: use seen, keyword:NAME, expunge, move:FOLDER or keep");
    Ok(match s.split_once(':') {
        None if s == "seen" => OnDele::Seen,
        None if s == "expunge" => OnDele::Expunge,
        None if s == "keep" => OnDele::Keep,
        Some(("keyword", k)) => {
            // An IMAP atom that isn't a system flag (RFC 3501 flag-keyword).
            let atom = !k.is_empty()
                && k.bytes()
                    .all(|b| b > b' ' && b < 0x7f && !b"(){%*\"\\]".contains(&b));
            if !atom {
                return Err(format!("--on-dele keyword:{k:?}: not a valid IMAP keyword"));
            }
            OnDele::Keyword(k.to_string())
        }
        Some(("move", f)) => {
            check_mailbox_name(f, "--on-dele move:")?;
            OnDele::Move(f.to_string())
        }
        _ => return Err(bad()),
    })
}

/// Mailbox names go into IMAP quoted strings: printable ASCII only (non-ASCII names would need
/// modified UTF-7, which we don't do yet).
fn check_mailbox_name(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() || !name.bytes().all(|b| (b' '..0x7f).contains(&b)) {
        return Err(format!(
            "{what} {name:?}: use a non-empty printable ASCII mailbox name"
        ));
    }
    Ok(())
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Config, String> {
        match parse(args.iter().map(OsString::from).collect())? {
            Action::Serve(c) => Ok(*c),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = p(&["-H", "imap.example.com"]).unwrap();
        assert!(matches!(
            c.source,
            Source::Fixed(ImapServer { port: 143, .. })
        ));
        assert_eq!(c.mailbox, "INBOX");
        assert_eq!(c.on_dele, OnDele::Seen);
        assert_eq!(c.timeout, Duration::from_secs(600));
        let tls = p(&["-H", "h", "-s"]).unwrap().source;
        assert!(matches!(tls, Source::Fixed(ImapServer { port: 993, .. })));
    }

    #[test]
    fn on_dele_actions() {
        let on = |s: &str| p(&["-H", "h", "--on-dele", s]).map(|c| c.on_dele);
        assert_eq!(on("expunge"), Ok(OnDele::Expunge));
        assert_eq!(on("keyword:$Popped"), Ok(OnDele::Keyword("$Popped".into())));
        assert_eq!(
            on("move:Archive/POP"),
            Ok(OnDele::Move("Archive/POP".into()))
        );
        for bad in [
            "delete",
            "keyword:",
            "keyword:a b",
            "keyword:\\Seen",
            "move:",
            "seen:x",
        ] {
            assert!(on(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_listener_options_and_leftovers() {
        assert!(p(&["-H", "h", "-P", "110"])
            .unwrap_err()
            .contains("systemd-socket-activate"));
        assert!(p(&["-H", "h", "extra"]).is_err());
        assert!(p(&[]).is_err());
        assert!(p(&["-H", "h", "--timeout", "0"]).is_err());
        assert!(p(&["-H", "h", "--user-dir", "/x"]).is_err());
        assert_eq!(
            p(&["--path", "/x"]).unwrap().source,
            Source::UserDir("/x".into())
        );
    }
}
