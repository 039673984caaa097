//! The command line as typed, turned into a validated [`Config`] in one step. Option names
//! follow the Python client.py where it had them. Nothing here reads a password, a file or the
//! network: that happens once the whole command line is known to be good.

use crate::password::PasswordSource;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::Duration;

pub const USAGE: &str = "\
aiopopd-client: check a POP3 server as a strict client would, printing the session.

Usage: aiopopd-client -u USER [options]

Connection:
  -H, --hostname HOST        the POP3 server (default localhost)
  -n, --port PORT            default 110, or 995 with -s
  -s, --ssl                  implicit TLS (POP3S)
      --stls                 start TLS with STLS on the plain connection
      --ca FILE              also trust the certificate(s) in this PEM file
      --insecure             do NOT check the server's certificate (for testing only)
      --timeout SECS         connect and reply timeout (default 60)
Login:
  -u, --username USER        the POP3 user name (required)
  -p, --password-source SRC  pass:NAME   first line of `pass NAME`
                             plain:VALUE the password itself (visible to other users in ps)
                             env:VAR     the environment variable VAR
                             Default: ask on the terminal without echo, or read one line
                             from stdin when stdin is not a terminal.
What to retrieve:
      --retr N               RETR message N instead of 1 (repeatable)
      --all                  RETR every message
      --auth MECH            log in with SASL: PLAIN or CRAM-MD5 (default: USER and PASS)
  -d, --delete               DELE the retrieved messages, and QUIT without RSET
Other:
  -h, --help                 this text
  -V, --version              the version

The session: CAPA, USER, PASS, STAT, LIST, UIDL, RETR 1 (if there is a message; only its
header is shown), DELE 1 (only with -d), NOOP, RSET (unless -d), QUIT. Every reply is checked:
multi-line framing and byte-stuffing, and that RETR sends as many octets as LIST announced.
Stdout carries the transcript only. Stderr gets, at the end, a one-line summary (messages and
octets retrieved, the time and rate of the RETRs, the session's time), and, when it is a
terminal, a progress line redrawn during a RETR that runs longer than a quarter second.
Exit status: 0 when every step succeeded, 1 when one failed (the reason goes to stderr), 2 for
a bad command line.
";

/// How the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Plain,
    /// TLS from the first byte (`-s`, POP3S).
    Implicit,
    /// Plain first, then STLS (RFC 2595).
    Stls,
}

/// Which certificates the TLS connection accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The system's roots.
    System,
    /// The system's roots and the certificates in this PEM file.
    Ca(PathBuf),
    /// Anything (`--insecure`).
    Insecure,
}

/// How the client logs in; the login step in `check` is the one place that matches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// USER, then PASS.
    UserPass,
    /// `--auth PLAIN`: RFC 4616, as an initial response.
    Plain,
    /// `--auth CRAM-MD5`: RFC 2195; the password never leaves this process.
    CramMd5,
}

/// Which messages to RETR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retr {
    /// Message 1, if the maildrop isn't empty.
    First,
    /// These messages, in this order (`--retr N`, repeatable).
    These(Vec<u32>),
    /// Every message (`--all`).
    All,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub trust: Trust,
    pub timeout: Duration,
    pub user: String,
    pub password: PasswordSource,
    pub auth: Auth,
    pub retr: Retr,
    pub delete: bool,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Action {
    Check(Box<Config>),
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
    let host: String = a
        .opt_value_from_str(["-H", "--hostname"])
        .map_err(arg)?
        .unwrap_or_else(|| "localhost".to_string());
    let port: Option<u16> = a.opt_value_from_str(["-n", "--port"]).map_err(arg)?;
    let user: Option<String> = a.opt_value_from_str(["-u", "--username"]).map_err(arg)?;
    let password = match a
        .opt_value_from_os_str(["-p", "--password-source"], |s| {
            Ok::<_, String>(s.to_os_string())
        })
        .map_err(arg)?
    {
        Some(s) => PasswordSource::parse(&s)?,
        None => PasswordSource::Ask,
    };
    let delete = a.contains(["-d", "--delete"]);
    let implicit = a.contains(["-s", "--ssl"]);
    let stls = a.contains("--stls");
    let ca: Option<PathBuf> = a.opt_value_from_os_str("--ca", path).map_err(arg)?;
    let insecure = a.contains("--insecure");
    let timeout: u64 = a
        .opt_value_from_str("--timeout")
        .map_err(arg)?
        .unwrap_or(60);
    let numbers: Vec<u32> = a.values_from_str("--retr").map_err(arg)?;
    let all = a.contains("--all");
    let auth = match a.opt_value_from_str::<_, String>("--auth").map_err(arg)? {
        None => Auth::UserPass,
        Some(m) if m.eq_ignore_ascii_case("PLAIN") => Auth::Plain,
        Some(m) if m.eq_ignore_ascii_case("CRAM-MD5") => Auth::CramMd5,
        Some(m) => return Err(format!("--auth {m:?}: use PLAIN or CRAM-MD5")),
    };
    let rest = a.finish();
    if !rest.is_empty() {
        return Err(aiopopd::config::unexpected_arguments(
            &rest,
            USAGE,
            "aiopopd-client",
        ));
    }

    let user = user.ok_or("-u/--username is required")?;
    // Both go on a command line of their own: a CR or LF would smuggle in another command.
    if user.is_empty() || user.contains(['\r', '\n', '\0']) {
        return Err("-u/--username: give a non-empty name without CR, LF or NUL".into());
    }
    if host.is_empty() {
        return Err("-H/--hostname must not be empty".into());
    }
    let security = match (implicit, stls) {
        (false, false) => Security::Plain,
        (true, false) => Security::Implicit,
        (false, true) => Security::Stls,
        (true, true) => return Err("give either -s/--ssl or --stls, not both".into()),
    };
    let trust = match (ca, insecure) {
        (None, false) => Trust::System,
        (Some(ca), false) => Trust::Ca(ca),
        (None, true) => Trust::Insecure,
        (Some(_), true) => return Err("give either --ca or --insecure, not both".into()),
    };
    if security == Security::Plain && trust != Trust::System {
        return Err("--ca and --insecure only matter with -s/--ssl or --stls".into());
    }
    if timeout == 0 {
        return Err("--timeout must be at least 1 second".into());
    }
    if numbers.contains(&0) {
        return Err("--retr: messages are numbered from 1".into());
    }
    // With -d the second DELE of a message would fail.
    if let Some(n) = numbers
        .iter()
        .enumerate()
        .find_map(|(i, n)| numbers[..i].contains(n).then_some(n))
    {
        return Err(format!("--retr {n} is given twice"));
    }
    let retr = match (numbers.is_empty(), all) {
        (true, false) => Retr::First,
        (false, false) => Retr::These(numbers),
        (true, true) => Retr::All,
        (false, true) => return Err("give either --retr or --all, not both".into()),
    };
    Ok(Action::Check(Box::new(Config {
        port: port.unwrap_or(if security == Security::Implicit {
            995
        } else {
            110
        }),
        host,
        security,
        trust,
        timeout: Duration::from_secs(timeout),
        user,
        password,
        auth,
        retr,
        delete,
    })))
}

fn arg(e: pico_args::Error) -> String {
    e.to_string()
}

fn path(s: &OsStr) -> Result<PathBuf, &'static str> {
    Ok(PathBuf::from(s))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn parse_ok(args: &[&str]) -> Config {
        match parse(args.iter().map(OsString::from).collect()) {
            Ok(Action::Check(c)) => *c,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn parse_err(args: &[&str]) -> String {
        match parse(args.iter().map(OsString::from).collect()) {
            Err(e) => e,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = parse_ok(&["-u", "alice"]);
        assert_eq!((c.host.as_str(), c.port), ("localhost", 110));
        assert_eq!(c.security, Security::Plain);
        assert_eq!(c.trust, Trust::System);
        assert_eq!(c.timeout, Duration::from_secs(60));
        assert_eq!(c.retr, Retr::First);
        assert!(!c.delete);
        assert!(matches!(c.password, PasswordSource::Ask));
        assert_eq!(parse_ok(&["-u", "a", "-s"]).port, 995);
        assert_eq!(parse_ok(&["-u", "a", "-s", "-n", "1995"]).port, 1995);
        assert_eq!(parse_ok(&["-u", "a", "--stls"]).port, 110);
    }

    #[test]
    fn retr_choices() {
        let c = parse_ok(&["-u", "a", "--retr", "2", "--retr", "5"]);
        assert_eq!(c.retr, Retr::These(vec![2, 5]));
        assert_eq!(parse_ok(&["-u", "a", "--all"]).retr, Retr::All);
        parse_err(&["-u", "a", "--all", "--retr", "1"]);
        parse_err(&["-u", "a", "--retr", "0"]);
        parse_err(&["-u", "a", "--retr", "2", "--retr", "2"]);
    }

    #[test]
    fn refuses_contradictions_and_leftovers() {
        assert!(parse_err(&[]).contains("--username"));
        parse_err(&["-u", "a\r\nDELE 1"]);
        parse_err(&["-u", "a", "-s", "--stls"]);
        parse_err(&["-u", "a", "-s", "--ca", "x", "--insecure"]);
        assert!(parse_err(&["-u", "a", "--insecure"]).contains("only matter"));
        parse_err(&["-u", "a", "--timeout", "0"]);
        parse_err(&["-u", "a", "extra"]);
        let e = parse_err(&["-u", "a", "--tiemout", "3"]);
        assert!(e.contains("did you mean --timeout?"), "{e}");
        parse_err(&["-u", "a", "-p", "secret"]);
        parse_err(&["-u", "a", "--auth", "GSSAPI"]);
        assert_eq!(
            parse_ok(&["-u", "a", "--auth", "cram-md5"]).auth,
            Auth::CramMd5
        );
    }
}
