//! The command line as typed, turned into a validated [`Config`] in one step. Option names
//! follow the earlier Python aiopopd. Nothing here opens a connection.

use crate::account::{check_mailbox_name, check_plaintext, Accounts, Security, Server, Source};
use crate::imap::{self, OnDele};
use crate::log;
use crate::tls;
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
      --imap-starttls        STARTTLS on the plain IMAP port (never falls back to clear)
      --imap-ca FILE         also trust these PEM certificates for the IMAP server
      --imap-plaintext       allow clear-text IMAP to a host that isn't loopback
      --mailbox NAME         mailbox served as the maildrop (default INBOX)
      --user-dir DIR         one JSON file per POP3 user name (alias --path):
                             {\"hostname\", \"port\", \"ssl\", \"username\"?, \"mailbox\"?,
                             \"oauth2\"?: the provider; see --oauth2-authorize}
      --imap-timeout SECS    bound on connecting and on each IMAP command (default 60)
POP3 side:
      --ssl-cert FILE        TLS certificate chain (PEM); with --ssl-key turns TLS on:
      --ssl-key FILE         implicit TLS from the first byte (port 995 style)
      --stls                 start in clear and offer STLS instead (port 110 style)
      --ssl-generate         create a self-signed pair in those files if both are missing
  -d, --hostname NAME        name in the greeting (default: this host's name)
      --allow-plaintext-auth allow USER/PASS on an unencrypted connection
      --sasl MECH,...        offer exactly these SASL mechanisms (default: PLAIN, LOGIN);
                             CRAM-MD5, SCRAM-SHA-1/256, XOAUTH2, OAUTHBEARER are relayed
                             to the IMAP server (-H), never decoded
      --on-dele ACTION       seen (default), keyword:NAME, expunge, move:FOLDER, keep
      --uidl-format FMT      default %08Xu%08Xv (Dovecot's): %u UID, %v UIDVALIDITY,
                             %g the server's message id (survives a UIDVALIDITY change),
                             %m a digest of the header (survives a move of server too)
      --state-dir DIR        where %m's digests and OAuth token stores are kept
                             (default $STATE_DIRECTORY, else /var/lib/aiopopd)
      --max-messages N       list at most N messages (oldest first)
      --timeout SECS         idle timeout towards the client (default 600)
      --handshake-timeout SECS  the TLS handshake must end within this (default 30)
      --login-timeout SECS   log in within this of connecting, or be cut (default 180)
      --auth-failure-delay SECS  wait before answering a refused login (default 2; 0: none)
      --proxy-protocol-from CIDR,...  connections from these networks (a load balancer)
                             must start with a PROXY header (v1 or v2); its source is
                             then the client's address (log, rip=)
Checking the set-up (a report on stdout; exit status 0 only if everything is fine):
      --check                with the service's options (paste them from ExecStart=):
                             connect to the IMAP server (TLS, greeting, capabilities),
                             load --ssl-cert/--ssl-key, read every --user-dir file
  -u, --user USER            with --check: also log in as USER (the password from the
                             terminal, else the first line of stdin) and open the mailbox
OAuth (a --user-dir user whose file has an \"oauth2\" section):
      --oauth2-authorize USER  enrol USER once: asks for the POP3 password that will
                             unlock the tokens (the first line of stdin if not a
                             terminal), prints the provider's URL, waits for the grant
                             and writes the token store under --state-dir
Logging:
  -l, --systemd-logging      log to stderr with <N> prefixes (when stderr isn't the client)
  -v, --verbose              debug logs (never passwords)
  -h, --help                 this text
  -V, --version              the version
";

/// TLS towards the POP3 client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub files: tls::Files,
    /// Start in clear and offer STLS, rather than TLS from the first byte.
    pub stls: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Everything the IMAP side needs.
    pub imap: imap::Settings,
    pub tls: Option<ClientTls>,
    pub allow_plaintext_auth: bool,
    pub sasl: Option<Vec<String>>,
    pub hostname: String,
    pub uidl_format: UidlFormat,
    pub timeout: Duration,
    /// `--handshake-timeout`: the whole TLS handshake (implicit or after STLS).
    pub handshake_timeout: Duration,
    /// `--login-timeout`: from connect to a successful login, whatever the client sends.
    pub login_timeout: Duration,
    pub auth_failure_delay: Duration,
    /// `--proxy-protocol-from`: peers that must send a PROXY header first (empty: none).
    pub proxy_protocol_from: Vec<crate::proxy::Cidr>,
    pub log_target: log::Target,
    pub verbose: bool,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Action {
    Serve(Box<Config>),
    /// `--oauth2-authorize USER`: the one-time OAuth enrolment of a `--user-dir` user.
    Authorize {
        config: Box<Config>,
        user: String,
    },
    /// `--check`: test the set-up and report (src/check.rs); with `-u`, a login as this user.
    Check {
        config: Box<Config>,
        user: Option<String>,
    },
    Help,
    Version,
}

pub fn parse(args: Vec<OsString>) -> Result<Action, String> {
    let typed = args.clone();
    let mut a = pico_args::Arguments::from_vec(args);
    if a.contains(["-h", "--help"]) {
        return Ok(Action::Help);
    }
    if a.contains(["-V", "--version"]) {
        return Ok(Action::Version);
    }
    if let Some(msg) = listener_options(&typed) {
        return Err(msg);
    }
    let authorize: Option<String> = a.opt_value_from_str("--oauth2-authorize").map_err(arg)?;
    let check = a.contains("--check");
    let check_user: Option<String> = a.opt_value_from_str(["-u", "--user"]).map_err(arg)?;
    if check_user.is_some() && !check {
        return Err("-u/--user USER goes with --check (a test login as USER)".into());
    }
    let host: Option<String> = a
        .opt_value_from_str(["-H", "--imap-hostname"])
        .map_err(arg)?;
    let port: Option<u16> = match a
        .opt_value_from_str::<_, String>(["-p", "--imap-port"])
        .map_err(arg)?
    {
        None => None,
        Some(p) => Some(p.parse().map_err(|_| {
            let mut msg = format!("-p/--imap-port {p:?}: not a port number (1 to 65535)");
            if p.contains('/') {
                msg.push_str(
                    ".\n-p is the IMAP port here. The Python aiopopd's -p/--path (the \
                     directory of per-user files) is --user-dir DIR (alias --path DIR).",
                );
            }
            msg
        })?),
    };
    if port == Some(0) {
        return Err("-p/--imap-port 0: not a port number (1 to 65535)".into());
    }
    let imap_tls = a.contains(["-s", "--imap-ssl"]);
    let imap_starttls = a.contains("--imap-starttls");
    let imap_ca: Option<PathBuf> = a.opt_value_from_os_str("--imap-ca", path).map_err(arg)?;
    let imap_plaintext = a.contains("--imap-plaintext");
    let ssl_cert: Option<PathBuf> = a.opt_value_from_os_str("--ssl-cert", path).map_err(arg)?;
    let ssl_key: Option<PathBuf> = a.opt_value_from_os_str("--ssl-key", path).map_err(arg)?;
    let stls = a.contains("--stls");
    let ssl_generate = a.contains("--ssl-generate");
    let mailbox: String = a
        .opt_value_from_str("--mailbox")
        .map_err(arg)?
        .unwrap_or_else(|| "INBOX".to_string());
    let mut user_dir: Option<PathBuf> = a.opt_value_from_os_str("--user-dir", path).map_err(arg)?;
    if let Some(p) = a.opt_value_from_os_str("--path", path).map_err(arg)? {
        user_dir = Some(p);
    }
    let allow_plaintext_auth = a.contains("--allow-plaintext-auth");
    let sasl = match a.opt_value_from_str::<_, String>("--sasl").map_err(arg)? {
        None => None,
        Some(list) => {
            let known = crate::sasl::LOCAL.iter().chain(crate::sasl::RELAYED.iter());
            let known: Vec<&str> = known.copied().collect();
            let mut mechs = Vec::new();
            for m in list.split(',').map(|m| m.trim().to_ascii_uppercase()) {
                if !known.contains(&m.as_str()) {
                    return Err(format!(
                        "--sasl: unknown mechanism {m:?} (known: {})",
                        known.join(", ")
                    ));
                }
                mechs.push(m);
            }
            Some(mechs)
        }
    };
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
    // systemd's StateDirectory= sets STATE_DIRECTORY (several paths colon-separated).
    let state_dir: Option<PathBuf> = a
        .opt_value_from_os_str("--state-dir", path)
        .map_err(arg)?
        .or_else(|| {
            std::env::var_os("STATE_DIRECTORY")
                .and_then(|v| std::env::split_paths(&v).next())
                .or_else(|| Some(PathBuf::from("/var/lib/aiopopd")))
        });
    if max_messages == Some(0) {
        return Err("--max-messages must be at least 1".into());
    }
    let timeout = seconds(
        a.opt_value_from_str("--timeout").map_err(arg)?,
        600,
        "--timeout",
    )?;
    let handshake_timeout = seconds(
        a.opt_value_from_str("--handshake-timeout").map_err(arg)?,
        30,
        "--handshake-timeout",
    )?;
    let login_timeout = seconds(
        a.opt_value_from_str("--login-timeout").map_err(arg)?,
        180,
        "--login-timeout",
    )?;
    let auth_failure_delay = Duration::from_secs(
        a.opt_value_from_str("--auth-failure-delay")
            .map_err(arg)?
            .unwrap_or(2),
    );
    let mut proxy_protocol_from = Vec::new();
    for list in a
        .values_from_str::<_, String>("--proxy-protocol-from")
        .map_err(arg)?
    {
        proxy_protocol_from.extend(
            crate::proxy::parse_list(&list).map_err(|e| format!("--proxy-protocol-from {e}"))?,
        );
    }
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
        return Err(leftovers(&rest));
    }
    check_mailbox_name(&mailbox, "--mailbox")?;
    let security = match (imap_tls, imap_starttls) {
        (true, true) => return Err("give either -s/--imap-ssl or --imap-starttls, not both".into()),
        (true, false) => Security::Tls,
        (false, true) => Security::StartTls,
        (false, false) => Security::Plain,
    };
    if user_dir.is_some() {
        let relayed: Vec<&String> = sasl
            .iter()
            .flatten()
            .filter(|m| crate::sasl::is_relayed(m))
            .collect();
        if !relayed.is_empty() {
            return Err(format!(
                "--sasl {}: relayed mechanisms need a fixed IMAP server (-H); with --user-dir \
                 the server depends on a user name the exchange doesn't tell beforehand",
                relayed
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
    }
    let source = match (host, user_dir) {
        (Some(host), None) => {
            let server = Server {
                port: port.unwrap_or(if imap_tls { 993 } else { 143 }),
                host,
                security,
            };
            check_plaintext(&server, imap_plaintext)?;
            Source::Fixed(server)
        }
        (None, Some(dir)) => Source::UserDir(dir),
        (Some(_), Some(_)) => return Err("give either -H or --user-dir, not both".into()),
        (None, None) => {
            return Err(
                "-H/--imap-hostname HOST is required (or --user-dir DIR): the IMAP \
                        server to serve mail from, e.g. -H imap.example.com -s for IMAPS on \
                        port 993.\n\
                        Try the options first with: aiopopd --check -H imap.example.com -s"
                    .into(),
            )
        }
    };
    if let Some(ca) = &imap_ca {
        if !ca.is_file() {
            return Err(format!("--imap-ca {}: no such file", ca.display()));
        }
    }
    let tls = match (ssl_cert, ssl_key) {
        (Some(cert), Some(key)) => Some(ClientTls {
            files: tls::Files {
                cert,
                key,
                generate_for: ssl_generate.then(|| hostname.clone()),
            },
            stls,
        }),
        (None, None) if stls || ssl_generate => {
            return Err("--stls and --ssl-generate need --ssl-cert and --ssl-key".into())
        }
        (None, None) => None,
        _ => return Err("give both --ssl-cert and --ssl-key".into()),
    };
    let config = Box::new(Config {
        imap: imap::Settings {
            accounts: Accounts {
                source,
                mailbox,
                plaintext_allowed: imap_plaintext,
            },
            ca: imap_ca,
            on_dele,
            max_messages,
            timeout: imap_timeout,
            ids: if uidl_format.needs_server_id() {
                imap::Ids::Server
            } else if uidl_format.needs_header_digest() {
                imap::Ids::HeaderDigest
            } else {
                imap::Ids::None
            },
            state_dir,
        },
        tls,
        allow_plaintext_auth,
        sasl,
        hostname,
        uidl_format,
        timeout,
        handshake_timeout,
        login_timeout,
        auth_failure_delay,
        proxy_protocol_from,
        log_target,
        verbose,
    });
    if let Some(user) = authorize {
        if !matches!(config.imap.accounts.source, Source::UserDir(_)) {
            return Err(
                "--oauth2-authorize needs --user-dir: the provider is in the user's file".into(),
            );
        }
        return Ok(Action::Authorize { config, user });
    }
    Ok(match check {
        true => Action::Check {
            config,
            user: check_user,
        },
        false => Action::Serve(config),
    })
}

/// The Python aiopopd's listener options (`-P PORT`, `-r`, `-n`): this aiopopd never listens.
/// The error shows the lines that do what the command line asked for, with its other options.
fn listener_options(typed: &[OsString]) -> Option<String> {
    let mut port: Option<String> = None;
    let mut all = false;
    let mut found = Vec::new();
    let mut rest: Vec<String> = Vec::new();
    let mut args = typed.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = args.next() {
        match a.as_str() {
            "-P" | "--listen-port" => {
                found.push("-P/--listen-port");
                port = args.next();
            }
            "-r" | "--listen-all" => {
                found.push("-r/--listen-all");
                all = true;
            }
            "-n" | "--no-setuid" => found.push("-n/--no-setuid"),
            // The Python aiopopd's per-user variant had -p/--path DIR; -p is the port here.
            "-p" => match args.next() {
                Some(v) if v.parse::<u16>().is_err() => {
                    rest.push("--user-dir".into());
                    rest.push(v);
                }
                Some(v) => {
                    rest.push(a);
                    rest.push(v);
                }
                None => rest.push(a),
            },
            _ => match a.strip_prefix("--listen-port=") {
                Some(p) => {
                    found.push("-P/--listen-port");
                    port = Some(p.to_string());
                }
                None => rest.push(a),
            },
        }
    }
    if found.is_empty() {
        return None;
    }
    found.dedup();
    let bin = std::env::current_exe()
        .ok()
        .filter(|p| p.is_absolute())
        .map_or("/usr/local/bin/aiopopd".to_string(), |p| {
            p.display().to_string()
        });
    let port = port.unwrap_or_else(|| "PORT".into());
    let listen = match all {
        true => port.clone(),
        false => format!("127.0.0.1:{port}"),
    };
    let quoted: Vec<String> = rest.iter().map(|a| shell_word(a)).collect();
    let args = quoted.join(" ");
    let sep = if args.is_empty() { "" } else { " " };
    let mut unit_args = quoted.clone();
    if !rest.iter().any(|a| a == "-l" || a == "--systemd-logging") {
        unit_args.push("-l".into());
    }
    let unit_args = unit_args.join(" ");
    let xinetd_args: Vec<&str> = rest
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "-l" && *a != "--systemd-logging")
        .collect();
    let mut msg = format!(
        "{} {}: those are the Python aiopopd's listener options. This aiopopd never listens \
         itself: it serves the one connection it is started for, on stdin/stdout or systemd's \
         fd 3. Let one of these listen on port {port} instead (same options, less {}):\n\
         \n\
         by hand (testing):\n\
         \x20   systemd-socket-activate -l {listen} --accept --inetd {bin}{sep}{args}\n\
         \n\
         systemd (see systemd/aiopopd.socket and systemd/aiopopd@.service):\n\
         \x20   aiopopd.socket:    [Socket]  ListenStream={listen}  Accept=yes\n\
         \x20   aiopopd@.service:  [Service] ExecStart={bin} {unit_args}\n\
         \x20                      StandardInput=socket  StandardOutput=socket  StandardError=journal\n\
         \n\
         xinetd (see xinetd/aiopopd):\n\
         \x20   service aiopopd {{ type = UNLISTED  port = {port}  socket_type = stream  wait = no\n\
         \x20                      user = aiopopd  server = {bin}  server_args = {}{} }}",
        if found.len() == 1 { "option" } else { "options" },
        found.join(", "),
        found.join(", "),
        xinetd_args.join(" "),
        match all {
            true => "",
            false => "\n\x20                      bind = 127.0.0.1",
        },
    );
    if !all {
        msg.push_str(
            "\n(127.0.0.1: loopback only, as the Python aiopopd without -r. For every address, as \
             -r did: -l PORT, ListenStream=PORT, and no bind line for xinetd.)",
        );
    }
    if found.contains(&"-n/--no-setuid") {
        msg.push_str(
            "\n-n/--no-setuid has no equivalent: aiopopd never starts as root to drop privileges; \
             run it as its own user (systemd DynamicUser=yes, xinetd user = aiopopd).",
        );
    }
    if rest.iter().any(|a| a == "--user-dir") && typed.iter().any(|a| a == "-p") {
        msg.push_str(
            "\n-p DIR (the Python aiopopd's --path) is --user-dir DIR here; -p is the IMAP port.",
        );
    }
    msg.push_str("\nThen try the options with: aiopopd --check ");
    msg.push_str(&args);
    Some(msg)
}

/// An argument as a POSIX shell reads it back (for the command lines in error messages).
fn shell_word(a: &str) -> String {
    let plain = !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%,+".contains(&b));
    match plain {
        true => a.to_string(),
        false => format!("'{}'", a.replace('\'', "'\\''")),
    }
}

/// Every option name a usage text lists (aliases included): what a mistyped option is
/// compared with.
fn options_in(usage: &str) -> Vec<&str> {
    let mut names: Vec<&str> = usage
        .split(|c: char| c.is_whitespace() || ",()".contains(c))
        .map(|w| w.trim_end_matches(['.', ':', ';']))
        .filter(|w| {
            w.len() >= 2
                && w.starts_with('-')
                && w[1..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '-')
                && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Arguments nobody took: for each unknown option, the known ones it is likely a typo of.
fn leftovers(rest: &[OsString]) -> String {
    unexpected_arguments(rest, USAGE, "aiopopd")
}

/// What `leftovers` says, for any program whose options `usage` lists (aiopopd-client's too).
pub fn unexpected_arguments(rest: &[OsString], usage: &str, program: &str) -> String {
    let rest: Vec<String> = rest
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let mut msg = format!("unexpected arguments: {}", rest.join(" "));
    let known = options_in(usage);
    for r in &rest {
        let name = r.split_once('=').map_or(r.as_str(), |(n, _)| n);
        if !name.starts_with('-') || name.len() < 2 {
            continue;
        }
        let close = suggestions(name, &known);
        if !close.is_empty() {
            msg.push_str(&format!(
                "\n{name}: unknown option; did you mean {}?",
                close.join(" or ")
            ));
        } else {
            msg.push_str(&format!("\n{name}: unknown option (see {program} --help)"));
        }
    }
    msg
}

/// Known options within edit distance 2 of `typed`, or that `typed` is the start of.
fn suggestions<'a>(typed: &str, known: &[&'a str]) -> Vec<&'a str> {
    // `-imap-ssl` for `--imap-ssl`.
    let long = match typed.starts_with("--") {
        true => typed.to_string(),
        false if typed.len() > 2 => format!("-{typed}"),
        false => typed.to_string(),
    };
    // A short option is one letter: everything is within 2 of it.
    if long.len() <= 2 {
        return Vec::new();
    }
    let mut close: Vec<(usize, &str)> = known
        .iter()
        .filter(|k| k.starts_with("--"))
        .filter_map(|k| {
            let d = edit_distance(&long, k);
            let prefix = long.len() >= 5 && k.starts_with(long.as_str());
            // Completions first (`--imap-host`), then by distance.
            (d <= 2 || prefix).then_some((if prefix { 1 } else { d }, *k))
        })
        .collect();
    close.sort();
    close.into_iter().map(|(_, k)| k).collect()
}

/// Levenshtein distance (insertions, deletions, substitutions), over bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, &x) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &y) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(x != y))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
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
        let c = p(&["-H", "localhost"]).unwrap();
        assert!(matches!(
            c.imap.accounts.source,
            Source::Fixed(Server { port: 143, .. })
        ));
        assert_eq!(c.imap.accounts.mailbox, "INBOX");
        assert_eq!(c.imap.on_dele, OnDele::Seen);
        assert_eq!(c.timeout, Duration::from_secs(600));
        assert_eq!(c.handshake_timeout, Duration::from_secs(30));
        assert_eq!(c.login_timeout, Duration::from_secs(180));
        let tls = p(&["-H", "imap.example.com", "-s"])
            .unwrap()
            .imap
            .accounts
            .source;
        assert!(matches!(tls, Source::Fixed(Server { port: 993, .. })));
    }

    #[test]
    fn clear_text_imap_only_to_loopback_unless_allowed() {
        for local in ["127.0.0.1", "::1", "localhost", "127.1.2.3"] {
            assert!(p(&["-H", local]).is_ok(), "{local}");
        }
        for remote in ["192.0.2.1", "0.0.0.0", "imap.example.com.invalid"] {
            let e = p(&["-H", remote]).unwrap_err();
            assert!(e.contains("--imap-plaintext"), "{remote}: {e}");
            assert!(p(&["-H", remote, "--imap-plaintext"]).is_ok());
            assert!(p(&["-H", remote, "--imap-starttls"]).is_ok());
        }
        assert!(p(&["-H", "::1", "-s", "--imap-starttls"]).is_err());
    }

    #[test]
    fn tls_options_go_together() {
        assert!(p(&["-H", "::1", "--ssl-cert", "c"]).is_err());
        assert!(p(&["-H", "::1", "--stls"]).is_err());
        let c = p(&["-H", "::1", "--ssl-cert", "c", "--ssl-key", "k", "--stls"]).unwrap();
        assert!(c.tls.unwrap().stls);
    }

    #[test]
    fn on_dele_actions() {
        let on = |s: &str| p(&["-H", "127.0.0.1", "--on-dele", s]).map(|c| c.imap.on_dele);
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
        assert!(p(&["-H", "h", "--login-timeout", "0"]).is_err());
        assert!(p(&["-H", "h", "--handshake-timeout", "0"]).is_err());
        assert!(p(&["-H", "h", "--user-dir", "/x"]).is_err());
        assert_eq!(
            p(&["--path", "/x"]).unwrap().imap.accounts.source,
            Source::UserDir("/x".into())
        );
    }

    #[test]
    fn listener_options_show_the_lines_to_use_instead() {
        let e = p(&["-P", "110", "-r", "-H", "imap.example.com", "-s"]).unwrap_err();
        assert!(e.contains("-l 110 --accept --inetd "), "{e}");
        assert!(e.contains(" -H imap.example.com -s\n"), "{e}");
        assert!(e.contains("ListenStream=110 "), "{e}");
        assert!(!e.contains("bind = "), "{e}");
        // The Python per-user variant: -p was its directory.
        let e = p(&["-p", "/etc/aiopopd/users", "--listen-port=995", "-n"]).unwrap_err();
        assert!(e.contains("-l 127.0.0.1:995 "), "{e}");
        assert!(e.contains(" --user-dir /etc/aiopopd/users"), "{e}");
        assert!(e.contains("DynamicUser=yes"), "{e}");
        let e = p(&["-P", "1", "-H", "h", "--mailbox", "My Mail"]).unwrap_err();
        assert!(e.contains("-H h --mailbox 'My Mail'"), "{e}");
        let e = p(&["-H", "h", "-p", "/etc/users"]).unwrap_err();
        assert!(e.contains("--user-dir"), "{e}");
    }

    #[test]
    fn mistyped_options_get_suggestions() {
        let known = options_in(USAGE);
        for k in [
            "--imap-ssl",
            "--user-dir",
            "--path",
            "--check",
            "--user",
            "-H",
        ] {
            assert!(known.contains(&k), "{k}: {known:?}");
        }
        assert_eq!(suggestions("--imap-sll", &known), ["--imap-ssl"]);
        assert_eq!(suggestions("-imap-ssl", &known), ["--imap-ssl"]);
        assert_eq!(suggestions("--imap-host", &known)[0], "--imap-hostname");
        assert!(suggestions("--completely-else", &known).is_empty());
        assert!(suggestions("-x", &known).is_empty());
        let e = p(&["-H", "h", "--ssl-crt", "c"]).unwrap_err();
        assert!(e.contains("did you mean --ssl-cert?"), "{e}");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn check_and_its_user() {
        let a = parse(
            ["--check", "-H", "localhost", "-u", "alice"]
                .iter()
                .map(OsString::from)
                .collect(),
        )
        .unwrap();
        assert!(matches!(a, Action::Check { user: Some(ref u), .. } if u == "alice"));
        assert!(p(&["-H", "localhost", "--user", "alice"])
            .unwrap_err()
            .contains("--check"));
    }
}
