//! `aiopopd --check`: the service's own options, tried out by a person before the socket is
//! enabled. It connects to the IMAP server as a session would (TLS or STARTTLS with the same
//! verification), reads the greeting and CAPABILITY, loads the POP3 certificate and key, reads
//! every `--user-dir` file, and with `-u USER` logs in and opens the mailbox. Each finding is
//! one line on stdout (`ok`, `note`, `FAIL` with the likely fix); the exit status is 0 only if
//! nothing failed.
//!
//! It owns no protocol: the IMAP exchange is `imap::client`, the TLS setup
//! `imap::transport::connector` and `tls::server_config`, the user files `account`, the login
//! the session's own `ImapBackend`. What it adds is the diagnosis: telling a TLS port from a
//! plain one within seconds (not after `--imap-timeout`), and naming the option that fixes it.

use crate::account::{Account, Accounts, Security, Server, Source};
use crate::config::{ClientTls, Config};
use crate::imap::client::{Client, Failure};
use crate::imap::transport::{self, Stream, Timed};
use crate::imap::{ImapBackend, OnDele};
use crate::maildrop::{Backend, Error, Maildrop};
use crate::secret::Secret;
use crate::tls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// An IMAP server greets at once; a TLS port says nothing until the client's hello. Silence
/// this long after connecting means a TLS port.
const GREETING_WAIT: Duration = Duration::from_secs(3);
/// Connecting waits at most this long here (or `--imap-timeout`, if shorter).
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// A certificate that expires sooner than this is worth a note.
const EXPIRY_NOTE_DAYS: i64 = 21;
/// The capabilities that change what aiopopd does, in the order they are reported.
const CAPS_THAT_MATTER: [&str; 7] = [
    "UIDPLUS",
    "MOVE",
    "STARTTLS",
    "LOGINDISABLED",
    "ID",
    "NAMESPACE",
    "OBJECTID",
];

/// Runs every check the configuration calls for and prints the report.
pub fn run(config: &Config, user: Option<&str>) -> ExitCode {
    if config.verbose {
        crate::log::init(crate::log::Target::Stderr, true, true);
    }
    let mut r = Report::default();
    let accounts = &config.imap.accounts;
    if let Some(t) = &config.tls {
        pop3_tls(&mut r, t, &config.hostname);
    }
    // The servers to try, and (with -u) the account to log in with.
    let mut servers: Vec<(Server, String)> = Vec::new();
    match &accounts.source {
        Source::Fixed(server) => servers.push((server.clone(), "-H".into())),
        Source::UserDir(dir) => {
            for (name, account) in user_dir(&mut r, accounts, dir) {
                match servers.iter_mut().find(|(s, _)| *s == account.server) {
                    Some((_, users)) => users.push_str(&format!(", {name}")),
                    None => servers.push((account.server, format!("users {name}"))),
                }
            }
        }
    }
    let login =
        match user {
            None => None,
            Some(user) => login_account(&mut r, accounts, user).and_then(|account| {
                match read_password(user, &account) {
                    Ok(pw) => Some((user, account, pw)),
                    Err(e) => {
                        r.fail(
                            &e,
                            "give the password on the terminal, or as the first line of stdin",
                        );
                        None
                    }
                }
            }),
        };
    if let Some((_, account, _)) = &login {
        if !servers.iter().any(|(s, _)| *s == account.server) {
            servers.push((account.server.clone(), format!("user {}", account.username)));
        }
    }
    for (server, source) in &servers {
        heading(&format!(
            "IMAP server {}:{} ({}; {source})",
            server.host,
            server.port,
            match server.security {
                Security::Tls => "implicit TLS, -s",
                Security::StartTls => "STARTTLS, --imap-starttls",
                Security::Plain => "clear text",
            }
        ));
        let client = probe(&mut r, server, config);
        match (client, &login) {
            (Some(c), Some((user, account, pw))) if account.server == *server => {
                log_in(&mut r, c, user, account, pw, config)
            }
            (Some(mut c), _) => c.logout(),
            (None, _) => {}
        }
    }
    if servers.is_empty() && config.tls.is_none() {
        r.note("nothing to check");
    }
    println!();
    if r.problems == 0 {
        println!(
            "aiopopd --check: everything checked is fine ({} checks)",
            r.oks
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "aiopopd --check: {} problem{} (FAIL above, each with its likely fix)",
            r.problems,
            if r.problems == 1 { "" } else { "s" }
        );
        ExitCode::FAILURE
    }
}

/// The findings, printed as they are made so a slow step shows where it is.
#[derive(Default)]
struct Report {
    problems: usize,
    oks: usize,
}

impl Report {
    fn ok(&mut self, what: &str) {
        self.oks += 1;
        say("ok  ", what);
    }
    fn note(&mut self, what: &str) {
        say("note", what);
    }
    fn fail(&mut self, what: &str, fix: &str) {
        self.problems += 1;
        say("FAIL", what);
        if !fix.is_empty() {
            println!("          fix: {fix}");
        }
    }
}

fn say(mark: &str, what: &str) {
    println!("  {mark}  {what}");
    let _ = io::stdout().flush();
}

fn heading(what: &str) {
    println!("{what}");
    let _ = io::stdout().flush();
}

// ---------------------------------------------------------------------------------------------
// POP3 side: the certificate and key.

fn pop3_tls(r: &mut Report, t: &ClientTls, hostname: &str) {
    let f = &t.files;
    heading(&format!(
        "POP3 TLS: --ssl-cert {} --ssl-key {} ({})",
        f.cert.display(),
        f.key.display(),
        if t.stls {
            "STLS, port 110 style"
        } else {
            "implicit TLS, port 995 style"
        }
    ));
    if running_as_root() {
        r.note(
            "running as root: a file readable here may not be readable by the service's user \
             (systemd LoadCredential= reads as root; xinetd runs as `user`)",
        );
    }
    let specifier = [&f.cert, &f.key]
        .iter()
        .any(|p| p.to_string_lossy().contains("%d"));
    if specifier {
        r.fail(
            "the paths hold %d, which only systemd expands (to the service's credentials \
             directory)",
            "check the LoadCredential= sources instead: --ssl-cert /etc/aiopopd/fullchain.pem \
             --ssl-key /etc/aiopopd/privkey.pem (the files the unit names)",
        );
        return;
    }
    let mut files = f.clone();
    if let Some(name) = files.generate_for.take() {
        match (f.cert.exists(), f.key.exists()) {
            (false, false) => {
                r.note(&format!(
                    "both files are missing: --ssl-generate will create a self-signed pair for \
                     {name} at the first connection (fetchers such as Gmail refuse it)"
                ));
                return;
            }
            (true, true) => {}
            _ => {
                r.fail(
                    "--ssl-generate: only one of the two files exists, so none will be generated",
                    "remove the one that exists, or supply the other",
                );
                return;
            }
        }
    }
    match tls::server_config(&files) {
        Ok(_) => r.ok("the certificate chain and the key load, and the key is the certificate's"),
        Err(e) => {
            let fix = pop3_fix(&e);
            r.fail(&e, fix);
        }
    }
    let Ok(certs) = CertificateDer::pem_file_iter(&files.cert) else {
        return;
    };
    let now = unix_now();
    let certs: Vec<_> = certs.filter_map(Result::ok).collect();
    for (i, der) in certs.iter().enumerate() {
        let what = match i {
            0 => "certificate".to_string(),
            _ => format!("chain certificate {i}"),
        };
        let Some(c) = x509::parse(der) else {
            r.note(&format!("{what}: can't be read as X.509 here"));
            continue;
        };
        let names = match c.names.is_empty() {
            true => "no subjectAltName".to_string(),
            false => c.names.join(", "),
        };
        let line = format!(
            "{what}: {}; {names}; issued by {}; valid {} to {}",
            c.subject,
            c.issuer,
            date(c.not_before),
            date(c.not_after)
        );
        let days = (c.not_after - now).div_euclid(86_400);
        if c.not_after < now {
            r.fail(
                &format!("{line}: EXPIRED"),
                "renew it (e.g. certbot renew) and point --ssl-cert/--ssl-key at the new files",
            );
        } else if c.not_before > now {
            r.fail(
                &format!("{line}: not valid yet"),
                "check the system clock, or the certificate's start date",
            );
        } else if days < EXPIRY_NOTE_DAYS {
            r.note(&format!("{line}: expires in {days} days"));
        } else {
            r.ok(&format!("{line} ({days} days left)"));
        }
        if i == 0 {
            if !c.names.is_empty() && !c.names.iter().any(|n| names_host(n, hostname)) {
                r.note(&format!(
                    "the certificate doesn't name {hostname} (-d, the greeting's name); POP3 \
                     clients check the name they connect to, which must be one of its names"
                ));
            }
            if c.subject == c.issuer && certs.len() == 1 {
                r.note(
                    "self-signed: fetchers such as Gmail refuse it; use a certificate from a \
                     public CA (e.g. Let's Encrypt) for real use",
                );
            }
        }
    }
}

fn pop3_fix(e: &str) -> &'static str {
    if e.contains("Permission denied") {
        "make the file readable by the user aiopopd runs as (under systemd, LoadCredential= \
         reads it as root and hands the service a private copy; under xinetd, a group that may \
         read it), never world-readable for the key"
    } else if e.contains("No such file") {
        "check the path"
    } else if e.contains("private key") {
        "--ssl-key must name a PEM private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC \
         PRIVATE KEY)"
    } else if e.contains("no certificate") || e.contains("reading certificates") {
        "--ssl-cert must name PEM CERTIFICATE blocks: the server's certificate first, then the \
         intermediates (certbot's fullchain.pem)"
    } else if e.contains("KeyMismatch") || e.contains("InconsistentKeys") {
        "the key is not this certificate's: take both from the same issuance (certbot: \
         privkey.pem and fullchain.pem of the same live/ directory)"
    } else {
        ""
    }
}

/// Whether certificate name `n` (`DNS:x`, `IP:x`, or a wildcard) covers `host`.
fn names_host(n: &str, host: &str) -> bool {
    let n = n.split_once(':').map_or(n, |(_, v)| v).to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    match n.strip_prefix("*.") {
        Some(rest) => host
            .split_once('.')
            .is_some_and(|(first, tail)| !first.is_empty() && tail == rest),
        None => n == host,
    }
}

fn running_as_root() -> bool {
    // The real and effective uid are the second and third fields of /proc's Uid: line.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// --user-dir.

/// Every file in `dir`, read as a login would read it; the good ones with their accounts.
fn user_dir(r: &mut Report, accounts: &Accounts, dir: &Path) -> Vec<(String, Account)> {
    heading(&format!("--user-dir {}", dir.display()));
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            r.fail(
                &format!("{}: {e}", dir.display()),
                "the directory must exist and be readable and searchable by the user aiopopd \
                 runs as (systemd: ReadOnlyPaths=/BindReadOnlyPaths= if it is under /home)",
            );
            return Vec::new();
        }
    };
    let mut names = Vec::new();
    for entry in entries.flatten() {
        match entry.file_name().into_string() {
            Ok(name) if name.starts_with('.') => r.note(&format!(
                "{name}: ignored (names starting with . are never looked up)"
            )),
            Ok(name) => names.push(name),
            Err(name) => r.note(&format!(
                "{}: ignored (not UTF-8: no POP3 user name can name it)",
                name.to_string_lossy()
            )),
        }
    }
    names.sort();
    let mut good = Vec::new();
    for name in names {
        match accounts.lookup(&name) {
            Ok(a) => {
                r.ok(&format!(
                    "{name}: IMAP user {} at {}:{} ({}), mailbox {}",
                    a.username,
                    a.server.host,
                    a.server.port,
                    match a.server.security {
                        Security::Tls => "TLS",
                        Security::StartTls => "STARTTLS",
                        Security::Plain => "clear text",
                    },
                    a.mailbox
                ));
                good.push((name, a));
            }
            Err(e) => r.fail(
                &format!("{name}: {}", e.detail()),
                "each file is JSON: {\"hostname\": \"imap.example.com\", \"port\": 993} plus, \
                 if needed, \"ssl\" (default true), \"starttls\", \"username\", \"mailbox\"",
            ),
        }
    }
    if good.is_empty() {
        r.note("no usable user file: every login would be refused as an unknown user");
    }
    good
}

/// The account `-u USER` logs in with.
fn login_account(r: &mut Report, accounts: &Accounts, user: &str) -> Option<Account> {
    match accounts.lookup(user) {
        Ok(a) => Some(a),
        Err(Error::Auth(why)) => {
            r.fail(
                &format!("-u {user}: {why}"),
                "name a user that has a file in --user-dir",
            );
            None
        }
        Err(e) => {
            r.fail(&format!("-u {user}: {}", e.detail()), "");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The IMAP server.

type Conn = Client<Stream>;

const TLS_PORT_FIX: &str = "this looks like a TLS port: add -s (implicit TLS), or use the \
    plain IMAP port (usually 143) for clear text or --imap-starttls";
const PLAIN_PORT_FIX: &str = "this is a plain IMAP port: drop -s (and use --imap-starttls), \
    or use the IMAPS port (usually 993)";

/// Resolves, connects, does TLS as configured, reads the greeting and the capabilities:
/// the connection, ready for a login, if all went well.
fn probe(r: &mut Report, server: &Server, config: &Config) -> Option<Conn> {
    let timeout = config.imap.timeout;
    let ca = config.imap.ca.as_deref();
    let where_ = format!("{}:{}", server.host, server.port);
    let addrs: Vec<SocketAddr> = match (server.host.as_str(), server.port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            r.fail(
                &format!("{}: the name doesn't resolve ({e})", server.host),
                transport::RESOLVE_HINT,
            );
            return None;
        }
    };
    let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    if shown.is_empty() {
        r.fail(
            &format!("{}: the name has no addresses", server.host),
            transport::RESOLVE_HINT,
        );
        return None;
    }
    r.ok(&format!("{} resolves to {}", server.host, shown.join(", ")));
    let wait = timeout.min(CONNECT_WAIT);
    let mut failed = Vec::new();
    let mut tcp = None;
    for addr in &addrs {
        let t0 = Instant::now();
        match TcpStream::connect_timeout(addr, wait) {
            Ok(s) => {
                r.ok(&format!(
                    "connected to {addr} in {} ms",
                    t0.elapsed().as_millis()
                ));
                tcp = Some(s);
                break;
            }
            Err(e) => failed.push((addr, e)),
        }
    }
    let Some(tcp) = tcp else {
        for (addr, e) in failed {
            match e.kind() {
                io::ErrorKind::ConnectionRefused => r.fail(
                    &format!("{addr}: connection refused"),
                    transport::REFUSED_HINT,
                ),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => r.fail(
                    &format!("{addr}: no answer within {} s", wait.as_secs()),
                    "a firewall drops the connection, or the address or port is wrong: check \
                     -H/-p and the firewalls on the way",
                ),
                _ => r.fail(&format!("{addr}: {e}"), "check -H and -p"),
            }
        }
        return None;
    };
    for (addr, e) in failed {
        r.note(&format!("{addr}: {e} (another address worked)"));
    }
    let _ = tcp.set_nodelay(true);
    let mut c = match server.security {
        Security::Tls => {
            let s = handshake(r, tcp, server, ca, timeout)?;
            Client::new(s, timeout)
        }
        Security::Plain | Security::StartTls => {
            if !clear_greeting(r, &tcp, &where_) {
                return None;
            }
            Client::new(Stream::Plain(Timed::new(tcp, timeout)), timeout)
        }
    };
    if let Err(f) = c.greeting() {
        r.fail(
            &format!("greeting: {}", f.detail()),
            "the server may be at its limit of connections from one address (Dovecot \
             mail_max_userip_connections)",
        );
        return None;
    }
    let mut caps = capabilities(r, &mut c, "before login")?;
    let has = |caps: &[String], cap: &str| caps.iter().any(|c| c == cap);
    let upgrade = match server.security {
        Security::StartTls if !has(&caps, "STARTTLS") => {
            r.fail(
                "the server doesn't offer STARTTLS",
                "use -s with its IMAPS port (usually 993) if it has one, or enable TLS on the \
                 server; aiopopd never falls back to clear text",
            );
            return None;
        }
        Security::StartTls => true,
        Security::Plain if has(&caps, "LOGINDISABLED") => {
            if !has(&caps, "STARTTLS") {
                r.fail(
                    "the server refuses logins in clear (LOGINDISABLED) and offers no STARTTLS",
                    "use -s (IMAPS, usually port 993) or --imap-starttls, or allow clear-text \
                     logins on the server (Dovecot disable_plaintext_auth = no)",
                );
                return None;
            }
            r.note(
                "the server refuses logins in clear (LOGINDISABLED): sessions upgrade with \
                 STARTTLS (say --imap-starttls to make that explicit)",
            );
            true
        }
        _ => false,
    };
    if upgrade {
        if let Err(f) = c.run(b"STARTTLS", &mut drop) {
            r.fail(&format!("STARTTLS: {}", f.detail()), "");
            return None;
        }
        let Ok(Stream::Plain(t)) = c.into_stream() else {
            r.fail("STARTTLS: the server sent data after its OK", "");
            return None;
        };
        let s = handshake(r, t.into_tcp(), server, ca, timeout)?;
        c = Client::new(s, timeout);
        caps = capabilities(r, &mut c, "after STARTTLS")?;
    }
    if let Source::Fixed(_) = config.imap.accounts.source {
        for m in config.sasl.iter().flatten() {
            if crate::sasl::is_relayed(m) && !has(&caps, &format!("AUTH={m}")) {
                r.fail(
                    &format!("--sasl {m}: the server doesn't advertise AUTH={m}"),
                    "remove it from --sasl: a client that picks it would fail to log in",
                );
            }
        }
    }
    if server.security == Security::Plain && !upgrade {
        r.note("clear text: passwords cross this connection unencrypted (loopback only, unless --imap-plaintext)");
    }
    Some(c)
}

/// Before reading a clear-text greeting: does the port speak IMAP at all? A TLS port says
/// nothing (or, if it said something, a TLS record); a POP3 or SMTP port says so.
fn clear_greeting(r: &mut Report, tcp: &TcpStream, where_: &str) -> bool {
    let mut buf = [0u8; 128];
    let started = Instant::now();
    let peeked = loop {
        let left = GREETING_WAIT.saturating_sub(started.elapsed());
        if left.is_zero() {
            break Err(io::ErrorKind::TimedOut.into());
        }
        if let Err(e) = tcp.set_read_timeout(Some(left)) {
            break Err(e);
        }
        match tcp.peek(&mut buf) {
            // Wait for a whole line (or a full buffer) before judging.
            Ok(n) if n > 0 && n < buf.len() && !buf[..n].contains(&b'\n') && buf[0] == b'*' => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other,
        }
    };
    let _ = tcp.set_read_timeout(None);
    let fail_tls = |r: &mut Report, what: String| r.fail(&what, TLS_PORT_FIX);
    match peeked {
        Ok(0) => {
            r.fail(
                &format!("{where_} closed the connection without a greeting"),
                "check -p; the server may also refuse this address, or be at its connection limit",
            );
            false
        }
        Ok(n) => {
            let got = &buf[..n];
            let line = printable(got);
            if n >= 2 && matches!(got[0], 0x15 | 0x16) && got[1] == 0x03 {
                fail_tls(
                    r,
                    format!("{where_} answered with a TLS record, not a greeting"),
                );
                false
            } else if got.starts_with(b"* OK") || got.starts_with(b"* PREAUTH") {
                r.ok(&format!("greeting: {line}"));
                true
            } else if got.starts_with(b"* BYE") {
                r.fail(
                    &format!("the server refused the connection: {line}"),
                    "the server may be at its limit of connections from one address (Dovecot \
                     mail_max_userip_connections), or refuse this client",
                );
                false
            } else if got.starts_with(b"+OK") {
                r.fail(
                    &format!("{where_} is a POP3 server ({line}), not IMAP"),
                    "check -p: IMAP is usually 143, IMAPS 993",
                );
                false
            } else {
                r.fail(
                    &format!("{where_} doesn't greet as an IMAP server does: {line}"),
                    "check -H and -p: IMAP is usually 143, IMAPS 993",
                );
                false
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            fail_tls(
                r,
                format!(
                    "{where_} sent no greeting within {} s",
                    GREETING_WAIT.as_secs()
                ),
            );
            false
        }
        Err(e) => {
            r.fail(&format!("{where_}: waiting for the greeting: {e}"), "");
            false
        }
    }
}

/// The TLS handshake as a session does it (the same connector: system roots plus `--imap-ca`,
/// host name checked); the certificate reported.
fn handshake(
    r: &mut Report,
    tcp: TcpStream,
    server: &Server,
    ca: Option<&Path>,
    timeout: Duration,
) -> Option<Stream> {
    let connector = match transport::connector(ca) {
        Ok(c) => c,
        Err((e, _)) => {
            r.fail(
                &e,
                "--imap-ca must name a readable PEM file of CA certificates",
            );
            return None;
        }
    };
    let (t, first) = Timed::recording(tcp, timeout);
    let trusted = match ca {
        Some(ca) => format!("the system's roots and --imap-ca {}", ca.display()),
        None => "the system's roots".to_string(),
    };
    match connector.connect(&server.host, t) {
        Ok(s) => {
            let cert = s
                .peer_certificate()
                .ok()
                .flatten()
                .and_then(|c| c.to_der().ok());
            let about = match cert.as_deref().and_then(x509::parse) {
                Some(c) => {
                    let days = (c.not_after - unix_now()).div_euclid(86_400);
                    if days < EXPIRY_NOTE_DAYS {
                        r.note(&format!(
                            "the IMAP server's certificate expires in {days} days"
                        ));
                    }
                    format!(
                        ": {}; {}; issued by {}; valid until {} ({days} days)",
                        c.subject,
                        c.names.join(", "),
                        c.issuer,
                        date(c.not_after)
                    )
                }
                None => String::new(),
            };
            r.ok(&format!(
                "TLS: certificate verified for {} against {trusted}{about}",
                server.host
            ));
            // native-tls doesn't say what was negotiated; the server's hello, recorded on
            // the way in, does.
            match server_hello(&first.borrow()) {
                Some((version, suite)) => r.ok(&format!("TLS version: {version}, {suite}")),
                None => r.note("TLS version: the server's hello couldn't be read"),
            }
            Some(Stream::Tls(Box::new(s)))
        }
        Err(e) => {
            let text = e.to_string();
            let got = first.borrow();
            let clear = got.starts_with(b"* ") || got.starts_with(b"+OK");
            let fix = match clear {
                true => PLAIN_PORT_FIX,
                false => transport::tls_hint(&text).unwrap_or(""),
            };
            let what = match clear {
                true => format!(
                    "TLS handshake with {}:{}: the server answered in clear text (\"{}...\")",
                    server.host,
                    server.port,
                    printable(&got).trim_end()
                ),
                false => format!(
                    "TLS handshake with {}:{} (trusting {trusted}): {text}",
                    server.host, server.port
                ),
            };
            r.fail(&what, fix);
            None
        }
    }
}

fn capabilities(r: &mut Report, c: &mut Conn, when: &str) -> Option<Vec<String>> {
    match c.capabilities() {
        Ok(caps) => {
            r.ok(&format!("capabilities {when}: {}", caps.join(" ")));
            let mut line = Vec::new();
            for cap in CAPS_THAT_MATTER {
                let yes = caps.iter().any(|c| c == cap);
                line.push(format!("{cap} {}", if yes { "yes" } else { "no" }));
            }
            let auth: Vec<&str> = caps
                .iter()
                .filter_map(|c| c.strip_prefix("AUTH="))
                .collect();
            line.push(format!(
                "AUTH= {}",
                if auth.is_empty() {
                    "none".to_string()
                } else {
                    auth.join(" ")
                }
            ));
            let mut line = line.join(", ");
            if when != "after login" {
                // Dovecot, for one, lists UIDPLUS and MOVE only once logged in.
                line.push_str(
                    " (before login: servers often list more after it; -u USER shows them)",
                );
            }
            r.note(&line);
            Some(caps)
        }
        Err(f) => {
            r.fail(&format!("CAPABILITY: {}", f.detail()), "");
            None
        }
    }
}

/// `-u`: the login on the probed connection (and the capabilities after it), then the
/// session's own path: login, mailbox found and opened, the listing taken; nothing changed.
fn log_in(
    r: &mut Report,
    mut c: Conn,
    user: &str,
    account: &Account,
    pw: &Secret,
    config: &Config,
) {
    match c.login(&account.username, pw) {
        Ok(_) => r.ok(&format!("login as {} accepted", account.username)),
        Err(f) => {
            let fix = match &f {
                Failure::No {
                    code: Some(code), ..
                } if code.name == "PRIVACYREQUIRED" => {
                    "the server wants TLS before a login: use -s or --imap-starttls"
                }
                Failure::No { .. } => {
                    "check the password, and the IMAP user name (with --user-dir, \"username\" \
                     in the user's file; else the POP3 user name as given)"
                }
                _ => "",
            };
            r.fail(
                &format!("login as {}: {}", account.username, f.detail()),
                fix,
            );
            return;
        }
    }
    let caps = capabilities(r, &mut c, "after login");
    c.logout();
    if let Some(caps) = caps {
        let has = |cap: &str| caps.iter().any(|c| c == cap);
        match &config.imap.on_dele {
            OnDele::Expunge if !has("UIDPLUS") => r.note(
                "no UIDPLUS: --on-dele expunge sends a plain EXPUNGE only when no other \
                 message is marked \\Deleted (else the messages stay marked)",
            ),
            OnDele::Move(_) if !has("MOVE") => {
                r.note("no MOVE: --on-dele move copies, marks \\Deleted and expunges instead")
            }
            _ => {}
        }
    }
    let mut backend = ImapBackend::new(config.imap.clone());
    match backend.login(user, pw) {
        Ok(mut maildrop) => {
            let listed = maildrop.messages();
            let octets: u64 = listed.iter().map(|m| m.size).sum();
            r.ok(&format!(
                "mailbox {} opened as a session opens it: {} messages listed, {octets} octets, \
                 UIDVALIDITY {} (nothing was changed)",
                account.mailbox,
                listed.len(),
                maildrop.uidvalidity()
            ));
            maildrop.logout();
        }
        Err(e) => {
            let fix = match &e {
                Error::Perm(_) => {
                    "check --mailbox (or \"mailbox\" in the user's file) and --on-dele's folder \
                     or keyword"
                }
                Error::InUse(_) => "another client holds the mailbox; try again later",
                _ => "",
            };
            r.fail(&format!("opening the maildrop: {e}"), fix);
        }
    }
}

/// The password for `-u`: from the terminal without echo, else the first line of stdin.
fn read_password(user: &str, account: &Account) -> Result<Secret, String> {
    let prompt = format!(
        "IMAP password for {user} (IMAP user {} at {}): ",
        account.username, account.server.host
    );
    match crate::terminal::read_secret(&prompt) {
        Ok(Some(pw)) => Ok(pw),
        Ok(None) => Err(format!("-u {user}: no password (stdin is empty)")),
        Err(e) => Err(format!("-u {user}: reading the password: {e}")),
    }
}

/// The protocol version and cipher suite a TLS server chose, from its first octets: the
/// ServerHello (RFC 8446 4.1.3; RFC 5246 7.4.1.3), whose `supported_versions` extension names
/// TLS 1.3 and later, where the legacy version field stays at 1.2. Names as rustls spells them.
fn server_hello(b: &[u8]) -> Option<(String, String)> {
    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
    }
    // The record: handshake (22), a version, a length; then the handshake message: ServerHello
    // (2) and a 3-octet length. (A HelloRetryRequest has the same form and the same choices.)
    if *b.first()? != 22 || *b.get(5)? != 2 {
        return None;
    }
    let hello = b.get(9..)?;
    let legacy = u16_at(hello, 0)?;
    let session_id = *hello.get(34)? as usize;
    let at = 35 + session_id;
    let suite = u16_at(hello, at)?;
    let mut version = legacy;
    // Compression (1 octet), then the extensions' total length and each (type, length, data).
    let mut ext = at + 3 + 2;
    let end = (ext + u16_at(hello, at + 3).unwrap_or(0) as usize).min(hello.len());
    while ext + 4 <= end {
        let (kind, len) = (u16_at(hello, ext)?, u16_at(hello, ext + 2)? as usize);
        if kind == 43 && len == 2 {
            version = u16_at(hello, ext + 4)?;
        }
        ext += 4 + len;
    }
    let version = match version {
        0x0304 => "TLS 1.3".to_string(),
        0x0303 => "TLS 1.2".to_string(),
        v => format!("{:?}", rustls::ProtocolVersion::from(v)),
    };
    Some((version, format!("{:?}", rustls::CipherSuite::from(suite))))
}

/// Server bytes made safe to print: one line, printable ASCII, at most 100 characters.
fn printable(b: &[u8]) -> String {
    let line = b.split(|&c| c == b'\r' || c == b'\n').next().unwrap_or(b);
    let mut s: String = line
        .iter()
        .take(100)
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect();
    if line.len() > 100 {
        s.push_str("...");
    }
    s
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `2027-03-01` for seconds since the epoch (UTC).
fn date(t: i64) -> String {
    let (y, m, d) = x509::civil(t.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Just enough DER to name a certificate: subject and issuer (CN, O), the subjectAltName
/// DNS names and IP addresses, and the validity period. No signature is checked here (rustls
/// and OpenSSL do that); anything unexpected gives `None`.
mod x509 {
    pub struct Cert {
        pub subject: String,
        pub issuer: String,
        /// `DNS:name` and `IP:address`.
        pub names: Vec<String>,
        /// Seconds since the epoch.
        pub not_before: i64,
        pub not_after: i64,
    }

    /// One TLV: (tag, contents, what follows).
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&len, rest) = rest.split_first()?;
        let (len, rest) = if len < 0x80 {
            (len as usize, rest)
        } else {
            let n = (len & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }

    fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        match tlv(input)? {
            (t, c, rest) if t == tag => Some((c, rest)),
            _ => None,
        }
    }

    pub fn parse(der: &[u8]) -> Option<Cert> {
        let (cert, _) = expect(der, 0x30)?;
        let (tbs, _) = expect(cert, 0x30)?;
        let mut rest = tbs;
        if let Some((0xa0, _, r)) = tlv(rest) {
            rest = r;
        }
        let (_, rest) = expect(rest, 0x02)?; // serial
        let (_, rest) = expect(rest, 0x30)?; // signature algorithm
        let (issuer, rest) = expect(rest, 0x30)?;
        let (validity, rest) = expect(rest, 0x30)?;
        let (subject, rest) = expect(rest, 0x30)?;
        let (_, mut rest) = expect(rest, 0x30)?; // public key
        let (nb, v) = tlv(validity).map(|(t, c, r)| ((t, c), r))?;
        let (na, _) = tlv(v).map(|(t, c, r)| ((t, c), r))?;
        let mut names = Vec::new();
        while let Some((tag, c, r)) = tlv(rest) {
            if tag == 0xa3 {
                names = alt_names(c).unwrap_or_default();
            }
            rest = r;
        }
        Some(Cert {
            subject: name(subject),
            issuer: name(issuer),
            names,
            not_before: time(nb.0, nb.1)?,
            not_after: time(na.0, na.1)?,
        })
    }

    /// `CN=..., O=...` of a Name (other attributes left out).
    fn name(mut n: &[u8]) -> String {
        let mut parts = Vec::new();
        while let Some((0x31, set, r)) = tlv(n) {
            let mut s = set;
            while let Some((0x30, atv, r2)) = tlv(s) {
                if let Some((oid, v)) = expect(atv, 0x06) {
                    let label = match oid {
                        [0x55, 0x04, 0x03] => Some("CN"),
                        [0x55, 0x04, 0x0a] => Some("O"),
                        [0x55, 0x04, 0x0b] => Some("OU"),
                        _ => None,
                    };
                    if let (Some(label), Some((_, value, _))) = (label, tlv(v)) {
                        parts.push(format!("{label}={}", String::from_utf8_lossy(value)));
                    }
                }
                s = r2;
            }
            n = r;
        }
        match parts.is_empty() {
            true => "(no CN or O)".to_string(),
            false => parts.join(", "),
        }
    }

    fn alt_names(ext_wrapper: &[u8]) -> Option<Vec<String>> {
        let (mut exts, _) = expect(ext_wrapper, 0x30)?;
        while let Some((0x30, ext, r)) = tlv(exts) {
            let (oid, mut v) = expect(ext, 0x06)?;
            if oid == [0x55, 0x1d, 0x11] {
                if let Some((0x01, _, r2)) = tlv(v) {
                    v = r2; // critical
                }
                let (octets, _) = expect(v, 0x04)?;
                let (mut gn, _) = expect(octets, 0x30)?;
                let mut out = Vec::new();
                while let Some((tag, c, r3)) = tlv(gn) {
                    match tag {
                        0x82 => out.push(format!("DNS:{}", String::from_utf8_lossy(c))),
                        0x87 => {
                            let ip = match c.len() {
                                4 => <[u8; 4]>::try_from(c)
                                    .ok()
                                    .map(|a| std::net::IpAddr::from(a).to_string()),
                                16 => <[u8; 16]>::try_from(c)
                                    .ok()
                                    .map(|a| std::net::IpAddr::from(a).to_string()),
                                _ => None,
                            };
                            if let Some(ip) = ip {
                                out.push(format!("IP:{ip}"));
                            }
                        }
                        _ => {}
                    }
                    gn = r3;
                }
                return Some(out);
            }
            exts = r;
        }
        Some(Vec::new())
    }

    /// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as epoch seconds.
    fn time(tag: u8, c: &[u8]) -> Option<i64> {
        let s = std::str::from_utf8(c).ok()?.strip_suffix('Z')?;
        let (year, rest) = match tag {
            0x17 if s.len() == 12 => {
                let yy: i64 = s[..2].parse().ok()?;
                (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
            }
            0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
            _ => return None,
        };
        let num = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
        let (mo, d, h, mi, se) = (num(0)?, num(2)?, num(4)?, num(6)?, num(8)?);
        Some(days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The date of a day number (the inverse of `days_from_civil`).
    pub fn civil(z: i64) -> (i64, i64, i64) {
        let z = z + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        (
            if m <= 2 {
                yoe + era * 400 + 1
            } else {
                yoe + era * 400
            },
            m,
            d,
        )
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn dates_round_trip() {
            assert_eq!(super::days_from_civil(1970, 1, 1), 0);
            assert_eq!(super::days_from_civil(2000, 3, 1), 11_017);
            assert_eq!(super::civil(11_017), (2000, 3, 1));
            assert_eq!(super::time(0x17, b"491231235959Z"), Some(2_524_607_999));
            assert_eq!(super::time(0x18, b"19700101000000Z"), Some(0));
        }

        #[test]
        fn reads_a_generated_certificate() {
            let pair = rcgen::generate_simple_self_signed(vec![
                "pop.example".to_string(),
                "192.0.2.7".to_string(),
            ])
            .unwrap();
            let c = super::parse(pair.cert.der()).unwrap();
            assert_eq!(c.names, ["DNS:pop.example", "IP:192.0.2.7"]);
            assert!(c.not_after > c.not_before);
            assert!(c.subject.contains("CN="), "{}", c.subject);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::server_hello;
    use crate::imap::transport::Timed;
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::time::Duration;

    /// The first octets a rustls server offering only `versions` sends to native-tls (the
    /// IMAP side's TLS), as `--check` records them.
    fn recorded_hello(versions: &[&'static rustls::SupportedProtocolVersion]) -> Vec<u8> {
        let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pair.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![pair.cert.der().clone()], key)
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            let mut conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            while conn.is_handshaking() {
                if conn.complete_io(&mut tcp).is_err() {
                    break;
                }
            }
        });
        let connector = native_tls::TlsConnector::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (t, first) = Timed::recording(tcp, Duration::from_secs(10));
        let s = connector.connect("localhost", t).unwrap();
        drop(s);
        server.join().unwrap();
        let got = first.borrow().clone();
        got
    }

    #[test]
    fn reads_the_version_and_suite_a_server_chose() {
        let hello = recorded_hello(&[&rustls::version::TLS13]);
        let (version, suite) = server_hello(&hello).unwrap();
        assert_eq!(version, "TLS 1.3");
        assert!(suite.starts_with("TLS13_"), "{suite}");
        let hello = recorded_hello(&[&rustls::version::TLS12]);
        let (version, suite) = server_hello(&hello).unwrap();
        assert_eq!(version, "TLS 1.2");
        assert!(suite.starts_with("TLS_ECDHE_"), "{suite}");
    }

    #[test]
    fn anything_else_is_no_answer_and_no_panic() {
        let hello = recorded_hello(&[&rustls::version::TLS13]);
        // Every truncation and every corrupted octet: an answer or None, never a panic.
        for n in 0..hello.len() {
            let _ = server_hello(&hello[..n]);
            let mut bad = hello.clone();
            bad[n] ^= 0xff;
            let _ = server_hello(&bad);
        }
        assert_eq!(server_hello(b"* OK IMAP4rev1 ready\r\n"), None);
        assert_eq!(server_hello(b""), None);
    }
}
