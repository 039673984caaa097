//! The maildrop over one synchronous IMAP session (the `imap` crate, pinned; see CRATES.md).
//!
//! Login opens the mailbox read-only (EXAMINE) and takes one snapshot; RETR/TOP read with
//! `BODY.PEEK[]<offset.length>` so nothing changes; only `commit` (POP3's UPDATE state) selects
//! the mailbox read-write and touches exactly the DELE'd UIDs. SELECT and EXAMINE go through
//! `run_command_and_read_response` because the crate's own `select`/`examine` panic on an
//! untagged `* NO` (rust-imap #282). IMAP text never reaches the POP3 client: errors carry it
//! to the log only.

use crate::config::{check_plaintext, ImapSecurity, ImapServer, OnDele, Source};
use crate::imapwire::{self, Shared};
use crate::maildrop::{Backend, Error, Maildrop, Message, SaslClient};
use crate::pop3::Secret;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// How to reach and use the IMAP server.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: Source,
    /// Extra trust anchors for the IMAP server's certificate (PEM).
    pub ca: Option<PathBuf>,
    pub plaintext_allowed: bool,
    pub mailbox: String,
    pub on_dele: OnDele,
    pub max_messages: Option<usize>,
    pub timeout: Duration,
}

pub struct ImapBackend {
    settings: Settings,
    /// A connection opened early to learn the SASL mechanisms (CAPA/AUTH before login),
    /// kept for the login that follows.
    connected: Option<(Connection, std::time::Instant)>,
}

/// The byte stream under the IMAP session.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<native_tls::TlsStream<TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

type Session = imap::Session<Shared<Stream>>;

/// Body fetches sent ahead (see `Maildrop::prefetch`) expect at most this many octets in all
/// (by the listed sizes; the nearest message is sent whatever its size), and answers read
/// before they are wanted are held up to as many. Over a link with a round trip, this is what
/// bounds the throughput (512 KiB in 10 ms: ~50 MB/s; 128 KiB made a 300-message session 3×
/// slower at 10 ms, BENCHMARKS.md). Answers not yet read wait in the socket buffers, or in
/// the server if those are full: a server whose output stays blocked may drop the connection
/// (Dovecot: after 5 minutes), which a POP3 client pausing that long mid-session then meets as
/// a clean `-ERR [SYS/TEMP]`.
const PREFETCH_BUDGET: u64 = 512 << 10;
/// ... and are at most this many commands.
const PREFETCH_MOST: usize = 64;

/// A connection not yet logged in: the crate's client, and our handle on the same stream.
struct Connection {
    client: imap::Client<Shared<Stream>>,
    wire: Shared<Stream>,
}

/// Where one user's login goes.
struct Account {
    server: ImapServer,
    username: String,
    mailbox: String,
}

impl ImapBackend {
    pub fn new(settings: Settings) -> ImapBackend {
        ImapBackend {
            settings,
            connected: None,
        }
    }

    fn account(&self, user: &str) -> Result<Account, Error> {
        match &self.settings.source {
            Source::Fixed(server) => Ok(Account {
                server: server.clone(),
                username: user.to_string(),
                mailbox: self.settings.mailbox.clone(),
            }),
            Source::UserDir(dir) => self.account_from_file(dir, user),
        }
    }

    /// `DIR/<user>`: `{"hostname", "port", "ssl"?, "username"?, "mailbox"?}` as the Python
    /// aiopopd's server.py read it (`ssl` defaults to true there, and here); `"starttls": true`
    /// with `"ssl": false` asks for STARTTLS.
    fn account_from_file(&self, dir: &std::path::Path, user: &str) -> Result<Account, Error> {
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
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let hostname = v["hostname"]
            .as_str()
            .ok_or_else(|| bad("no \"hostname\""))?;
        let port = v["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| bad("no valid \"port\""))?;
        let flag = |key: &str, default: bool| match &v[key] {
            serde_json::Value::Null => Ok(default),
            s => s
                .as_bool()
                .ok_or_else(|| bad(&format!("\"{key}\" must be true or false"))),
        };
        let security = match (flag("ssl", true)?, flag("starttls", false)?) {
            (true, _) => ImapSecurity::Tls,
            (false, true) => ImapSecurity::StartTls,
            (false, false) => ImapSecurity::Plain,
        };
        let opt_str = |key: &str| match &v[key] {
            serde_json::Value::Null => Ok(None),
            s => s
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| bad(&format!("\"{key}\" must be a string"))),
        };
        let mailbox = opt_str("mailbox")?.unwrap_or_else(|| self.settings.mailbox.clone());
        if crate::config::check_mailbox_name(&mailbox, "\"mailbox\"").is_err() {
            return Err(bad(
                "\"mailbox\" must be a non-empty name without control characters",
            ));
        }
        let server = ImapServer {
            host: hostname.to_string(),
            port,
            security,
        };
        check_plaintext(&server, self.settings.plaintext_allowed).map_err(|e| bad(&e))?;
        Ok(Account {
            server,
            username: opt_str("username")?.unwrap_or_else(|| user.to_string()),
            mailbox,
        })
    }
}

impl ImapBackend {
    /// The connection for this account: the one opened early, if it went to the same server,
    /// or a new one.
    fn client(&mut self, server: &ImapServer) -> Result<Connection, Error> {
        // Servers close idle connections that haven't logged in (Dovecot after a minute or
        // so), while a POP3 client may wait 10 minutes between CAPA and PASS.
        const FRESH: std::time::Duration = std::time::Duration::from_secs(30);
        match self.connected.take() {
            Some((c, at))
                if at.elapsed() < FRESH
                    && matches!(&self.settings.source, Source::Fixed(s) if s == server) =>
            {
                Ok(c)
            }
            _ => connect(server, self.settings.timeout, self.settings.ca.as_deref()),
        }
    }

    /// After LOGIN or AUTHENTICATE: open the mailbox and take the snapshot.
    fn open_maildrop(
        &self,
        mut session: Session,
        wire: Shared<Stream>,
        mailbox: String,
    ) -> Result<ImapMaildrop, Error> {
        let s = &self.settings;
        match open(&mut session, &wire, &mailbox, &s.on_dele, s.max_messages) {
            Ok(snapshot) => Ok(ImapMaildrop {
                session,
                wire,
                mailbox,
                on_dele: s.on_dele.clone(),
                snapshot,
            }),
            Err(e) => {
                let _ = session.logout();
                Err(e)
            }
        }
    }
}

impl Backend for ImapBackend {
    type Maildrop = ImapMaildrop;

    fn login(&mut self, user: &str, password: &Secret) -> Result<ImapMaildrop, Error> {
        let account = self.account(user)?;
        let conn = self.client(&account.server)?;
        let session = login(conn.client, &account.username, password)?;
        self.open_maildrop(session, conn.wire, account.mailbox)
    }

    /// Only with a fixed server: with --user-dir the server depends on a user name that a
    /// relayed exchange doesn't tell us beforehand.
    fn relayable_mechanisms(&mut self) -> Vec<String> {
        let Source::Fixed(server) = &self.settings.source else {
            return Vec::new();
        };
        let server = server.clone();
        let conn = match self.client(&server) {
            Ok(c) => c,
            Err(e) => {
                crate::log::warning(&format!(
                    "asking the IMAP server for its SASL mechanisms: {e}"
                ));
                return Vec::new();
            }
        };
        let mechs = match conn.wire.capabilities() {
            Ok(caps) => crate::session::RELAYED_MECHANISMS
                .iter()
                .filter(|m| caps.contains(&format!("AUTH={m}")))
                .map(|m| m.to_string())
                .collect(),
            Err(e) => {
                crate::log::warning(&format!("IMAP CAPABILITY: {e:?}"));
                return Vec::new();
            }
        };
        self.connected = Some((conn, std::time::Instant::now()));
        mechs
    }

    fn authenticate(
        &mut self,
        mechanism: &str,
        initial: Option<Vec<u8>>,
        client: &mut dyn SaslClient,
    ) -> Result<ImapMaildrop, Error> {
        let Source::Fixed(server) = &self.settings.source else {
            return Err(Error::Perm(
                "SASL relay needs a fixed IMAP server (-H)".into(),
            ));
        };
        let server = server.clone();
        let conn = self.client(&server)?;
        let relay = RelayAuth {
            client: std::cell::RefCell::new(client),
            initial: std::cell::RefCell::new(initial),
        };
        let session = conn
            .client
            .authenticate(mechanism, &relay)
            .map_err(|(e, _)| match e {
                imap::Error::No(no) => classify_no(&no.information),
                imap::Error::Bad(bad) => {
                    Error::Auth(format!("AUTHENTICATE refused as BAD: {}", bad.information))
                }
                e => imap_error(e),
            })?;
        self.open_maildrop(session, conn.wire, self.settings.mailbox.clone())
    }
}

/// Carries the server's challenges to the POP3 client and its answers back. The crate wants
/// `&self`, hence the cells; a client that cancels gets an empty answer sent, which the
/// server refuses (the crate can't send IMAP's `*`).
struct RelayAuth<'a> {
    client: std::cell::RefCell<&'a mut dyn SaslClient>,
    /// The client's initial response answers the server's first, empty challenge.
    initial: std::cell::RefCell<Option<Vec<u8>>>,
}

impl imap::Authenticator for RelayAuth<'_> {
    type Response = Vec<u8>;
    fn process(&self, challenge: &[u8]) -> Vec<u8> {
        if challenge.is_empty() {
            if let Some(initial) = self.initial.borrow_mut().take() {
                return initial;
            }
        }
        self.client
            .borrow_mut()
            .challenge(challenge)
            .unwrap_or_default()
    }
}

fn connect(
    server: &ImapServer,
    timeout: Duration,
    ca: Option<&std::path::Path>,
) -> Result<Connection, Error> {
    let where_ = format!("{}:{}", server.host, server.port);
    let addrs = (server.host.as_str(), server.port)
        .to_socket_addrs()
        .map_err(|e| Error::Temp(format!("resolving {where_}: {e}")))?;
    let mut last = None;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut tcp = tcp.ok_or_else(|| {
        Error::Temp(format!(
            "connecting to {where_}: {}",
            last.map_or("no addresses".to_string(), |e| e.to_string())
        ))
    })?;
    let io_err = |e: io::Error| Error::Temp(format!("{where_}: {e}"));
    tcp.set_read_timeout(Some(timeout)).map_err(io_err)?;
    tcp.set_write_timeout(Some(timeout)).map_err(io_err)?;
    tcp.set_nodelay(true).map_err(io_err)?;
    let stream = match server.security {
        ImapSecurity::Plain => Stream::Plain(tcp),
        ImapSecurity::Tls => tls_wrap(tcp, &server.host, ca, &where_)?,
        ImapSecurity::StartTls => {
            starttls(&mut tcp).map_err(|e| Error::Temp(format!("{where_}: {e}")))?;
            tls_wrap(tcp, &server.host, ca, &where_)?
        }
    };
    let wire = Shared::new(stream);
    let mut client = imap::Client::new(wire.clone());
    if server.security != ImapSecurity::StartTls {
        let greeting = client.read_greeting().map_err(imap_error)?;
        if !greeting.starts_with(b"* OK") {
            return Err(Error::Temp(format!(
                "{where_} greeted with {}",
                crate::log::truncated(&greeting)
            )));
        }
    }
    Ok(Connection { client, wire })
}

/// TLS 1.2+ with the certificate and host name verified against the system roots and `ca`.
/// There is deliberately no way to skip verification: the user's password crosses this link.
fn tls_wrap(
    tcp: TcpStream,
    host: &str,
    ca: Option<&std::path::Path>,
    where_: &str,
) -> Result<Stream, Error> {
    let mut builder = native_tls::TlsConnector::builder();
    builder.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca)
            .map_err(|e| Error::Perm(format!("--imap-ca {}: {e}", ca.display())))?;
        for block in pem_blocks(&pem) {
            let cert = native_tls::Certificate::from_pem(block)
                .map_err(|e| Error::Perm(format!("--imap-ca {}: {e}", ca.display())))?;
            builder.add_root_certificate(cert);
        }
    }
    let connector = builder
        .build()
        .map_err(|e| Error::Temp(format!("TLS setup: {e}")))?;
    let tls = connector
        .connect(host, tcp)
        .map_err(|e| Error::Temp(format!("TLS to {where_}: {e}")))?;
    Ok(Stream::Tls(Box::new(tls)))
}

/// Each `-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----` block of a PEM file.
fn pem_blocks(pem: &[u8]) -> Vec<&[u8]> {
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = find(rest, b"-----BEGIN CERTIFICATE-----") {
        let Some(end) = find(&rest[start..], END) else {
            break;
        };
        blocks.push(&rest[start..start + end + END.len()]);
        rest = &rest[start + end + END.len()..];
    }
    blocks
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// STARTTLS by hand (the crate has no public way on our own socket): greeting, CAPABILITY
/// must list STARTTLS, then STARTTLS must be answered OK. Read a byte at a time so nothing sent
/// after the OK is buffered and later mistaken for protected data.
fn starttls(tcp: &mut TcpStream) -> io::Result<()> {
    let greeting = read_line_raw(tcp)?;
    if !greeting.starts_with(b"* OK") {
        return Err(io::Error::other(format!(
            "greeted with {}",
            crate::log::truncated(&greeting)
        )));
    }
    tcp.write_all(b"s0 CAPABILITY\r\n")?;
    let mut offered = false;
    loop {
        let line = read_line_raw(tcp)?;
        if line.starts_with(b"* CAPABILITY ") {
            let caps = String::from_utf8_lossy(&line).to_ascii_uppercase();
            offered |= caps.split_whitespace().any(|c| c == "STARTTLS");
        }
        if line.starts_with(b"s0 ") {
            break;
        }
    }
    if !offered {
        return Err(io::Error::other("the server does not offer STARTTLS"));
    }
    tcp.write_all(b"s1 STARTTLS\r\n")?;
    loop {
        let line = read_line_raw(tcp)?;
        if line.starts_with(b"s1 OK") {
            return Ok(());
        }
        if line.starts_with(b"s1 ") {
            return Err(io::Error::other(format!(
                "STARTTLS refused: {}",
                crate::log::truncated(&line)
            )));
        }
    }
}

fn read_line_raw(tcp: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.last() != Some(&b'\n') {
        if tcp.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
        if line.len() > 16 << 10 {
            return Err(io::Error::other("IMAP line too long"));
        }
    }
    Ok(line)
}

/// PLAIN carries any bytes; LOGIN's quoted strings are 7-bit only (RFC 3501 §9).
struct Plain<'a>(&'a str, &'a Secret);

impl imap::Authenticator for Plain<'_> {
    type Response = Vec<u8>;
    fn process(&self, _challenge: &[u8]) -> Vec<u8> {
        let mut r = Vec::with_capacity(self.0.len() + self.1.expose().len() + 2);
        r.push(0);
        r.extend_from_slice(self.0.as_bytes());
        r.push(0);
        r.extend_from_slice(self.1.expose());
        r
    }
}

fn login(
    client: imap::Client<Shared<Stream>>,
    user: &str,
    password: &Secret,
) -> Result<Session, Error> {
    let pw = password.expose();
    if user
        .bytes()
        .chain(pw.iter().copied())
        .any(|b| b == b'\r' || b == b'\n' || b == 0)
    {
        // The session refuses these first; this is the second lock on the door.
        return Err(Error::Auth("credentials contain CR, LF or NUL".into()));
    }
    let result = match std::str::from_utf8(pw) {
        Ok(p) if user.is_ascii() && p.is_ascii() => client.login(user, p),
        _ => client.authenticate("PLAIN", &Plain(user, password)),
    };
    result.map_err(|(e, _)| match e {
        imap::Error::No(no) => classify_no(&no.information),
        imap::Error::Bad(bad) => Error::Temp(format!("login refused as BAD: {}", bad.information)),
        e => imap_error(e),
    })
}

/// A tagged NO to LOGIN/AUTHENTICATE: RFC 5530 codes say whether it's the credentials.
/// (imap-proto doesn't parse these codes, so they arrive at the start of the text.)
fn classify_no(text: &str) -> Error {
    let detail = text.to_string();
    let code = text
        .strip_prefix('[')
        .and_then(|t| t.split([']', ' ']).next())
        .unwrap_or("")
        .to_ascii_uppercase();
    match code.as_str() {
        "UNAVAILABLE" | "SERVERBUG" | "LIMIT" | "OVERQUOTA" => Error::Temp(detail),
        "INUSE" => Error::InUse(detail),
        _ => Error::Auth(detail),
    }
}

fn wire_error(what: &str, e: imapwire::Failed) -> Error {
    match e {
        imapwire::Failed::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Error::Temp(format!("{what}: the IMAP server timed out"))
        }
        imapwire::Failed::Io(e) => Error::Temp(format!("{what}: {e}")),
        imapwire::Failed::No(t) => Error::Temp(format!("{what}: NO {t}")),
        imapwire::Failed::Broken(t) => Error::Temp(format!("{what}: {t}")),
    }
}

fn imap_error(e: imap::Error) -> Error {
    match e {
        imap::Error::Io(e) if e.kind() == io::ErrorKind::WouldBlock => {
            Error::Temp("IMAP server timed out".into())
        }
        e => Error::Temp(format!("IMAP: {e}")),
    }
}

/// A mailbox name as an IMAP quoted string, in modified UTF-7 (names hold no control
/// characters; checked at startup).
fn quoted(s: &str) -> String {
    let s = mutf7(s);
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A mailbox name in IMAP's modified UTF-7 (RFC 3501 5.1.3): printable ASCII as it is, `&` as
/// `&-`, every other run of characters as `&`, the modified BASE64 of its UTF-16, and `-`.
fn mutf7(name: &str) -> String {
    use base64::engine::general_purpose::{GeneralPurpose, NO_PAD};
    use base64::Engine as _;
    const MUTF7: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::IMAP_MUTF7, NO_PAD);
    fn flush(out: &mut String, run: &mut Vec<u8>) {
        if !run.is_empty() {
            out.push('&');
            out.push_str(&MUTF7.encode(&run));
            out.push('-');
            run.clear();
        }
    }
    let mut out = String::new();
    let mut run = Vec::new();
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut out, &mut run);
            match c {
                '&' => out.push_str("&-"),
                c => out.push(c),
            }
        } else {
            for unit in c.encode_utf16(&mut [0; 2]) {
                run.extend_from_slice(&unit.to_be_bytes());
            }
        }
    }
    flush(&mut out, &mut run);
    out
}

/// What SELECT/EXAMINE told us.
struct Selected {
    exists: u32,
    uidvalidity: Option<u32>,
    permanent_flags: Option<Vec<String>>,
}

fn select(session: &mut Session, cmd: &str, mailbox: &str) -> Result<Selected, Error> {
    let data = session
        .run_command_and_read_response(format!("{cmd} {}", quoted(mailbox)))
        .map_err(|e| match e {
            imap::Error::No(no) => Error::Perm(format!("{cmd} {mailbox}: {}", no.information)),
            e => imap_error(e),
        })?;
    let mut s = Selected {
        exists: 0,
        uidvalidity: None,
        permanent_flags: None,
    };
    for line in data.split(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end();
        if let Some(n) = line
            .strip_prefix("* ")
            .and_then(|l| l.strip_suffix(" EXISTS"))
        {
            s.exists = n.parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("* OK [UIDVALIDITY ") {
            s.uidvalidity = rest.split(']').next().and_then(|v| v.parse().ok());
        } else if let Some(rest) = line.strip_prefix("* OK [PERMANENTFLAGS (") {
            let flags = rest.split(')').next().unwrap_or("");
            s.permanent_flags = Some(flags.split_whitespace().map(str::to_string).collect());
        }
    }
    Ok(s)
}

/// The snapshot taken at login.
#[derive(Debug)]
struct Snapshot {
    uidvalidity: u32,
    messages: Vec<Message>,
}

fn open(
    session: &mut Session,
    wire: &Shared<Stream>,
    mailbox: &str,
    on_dele: &OnDele,
    max: Option<usize>,
) -> Result<Snapshot, Error> {
    if let OnDele::Keyword(k) = on_dele {
        // EXAMINE reports no permanent flags, so ask SELECT whether keywords can be stored.
        let sel = select(session, "SELECT", mailbox)?;
        let flags = sel.permanent_flags.unwrap_or_default();
        if !flags
            .iter()
            .any(|f| f == "\\*" || f.eq_ignore_ascii_case(k))
        {
            return Err(Error::Perm(format!(
                "mailbox {mailbox} can't store the keyword {k} (PERMANENTFLAGS: {})",
                flags.join(" ")
            )));
        }
    }
    let sel = select(session, "EXAMINE", mailbox)?;
    let uidvalidity = sel
        .uidvalidity
        .ok_or_else(|| Error::Temp(format!("no UIDVALIDITY for {mailbox}")))?;
    // The count is the server's word: don't let it size an allocation.
    let mut messages = Vec::with_capacity((sel.exists as usize).min(1 << 16));
    if sel.exists > 0 {
        wire.list(sel.exists, &mut |uid, size, flags| {
            let listed = match on_dele {
                OnDele::Seen => !imapwire::has_flag(flags, "\\Seen"),
                OnDele::Keyword(k) => !imapwire::has_flag(flags, k),
                OnDele::Expunge | OnDele::Move(_) | OnDele::Keep => true,
            };
            if listed {
                messages.push(Message { uid, size });
            }
        })
        .map_err(|e| wire_error("listing", e))?;
    }
    // Unsolicited FETCH lines (another client changing flags) could repeat a UID.
    messages.sort_by_key(|m| m.uid);
    messages.dedup_by_key(|m| m.uid);
    if let Some(max) = max {
        messages.truncate(max);
    }
    session.take_all_unsolicited().for_each(drop);
    Ok(Snapshot {
        uidvalidity,
        messages,
    })
}

pub struct ImapMaildrop {
    session: Session,
    wire: Shared<Stream>,
    mailbox: String,
    on_dele: OnDele,
    snapshot: Snapshot,
}

impl ImapMaildrop {
    /// The UPDATE state's IMAP commands for `--on-dele`, each recorded in `applied` once the
    /// server has said OK to it.
    fn apply(
        &mut self,
        set: &str,
        applied: &mut Vec<String>,
    ) -> Result<Option<&'static str>, Error> {
        let sel = select(&mut self.session, "SELECT", &self.mailbox)?;
        if sel.uidvalidity != Some(self.snapshot.uidvalidity) {
            return Err(Error::Temp(format!(
                "UIDVALIDITY of {} changed during the session",
                self.mailbox
            )));
        }
        let (uidplus, has_move) = match &self.on_dele {
            OnDele::Expunge | OnDele::Move(_) => {
                let caps = self
                    .wire
                    .capabilities()
                    .map_err(|e| wire_error("CAPABILITY", e))?;
                let has = |c: &str| caps.iter().any(|x| x == c);
                (has("UIDPLUS"), has("MOVE"))
            }
            _ => (false, false),
        };
        let session = &mut self.session;
        let mut step = |cmd: String| -> Result<(), Error> {
            session
                .run_command_and_check_ok(&cmd)
                .map_err(|e| Error::Temp(format!("{cmd}: {e}")))?;
            applied.push(cmd);
            Ok(())
        };
        let mut remark = None;
        match &self.on_dele {
            OnDele::Keep => {}
            OnDele::Seen => step(format!("UID STORE {set} +FLAGS.SILENT (\\Seen)"))?,
            OnDele::Keyword(k) => step(format!("UID STORE {set} +FLAGS.SILENT ({k})"))?,
            OnDele::Move(folder) if has_move => step(format!("UID MOVE {set} {}", quoted(folder)))?,
            OnDele::Expunge | OnDele::Move(_) => {
                // Without MOVE, a move is a copy and a deletion.
                if let OnDele::Move(folder) = &self.on_dele {
                    step(format!("UID COPY {set} {}", quoted(folder)))?;
                }
                step(format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"))?;
                if uidplus {
                    step(format!("UID EXPUNGE {set}"))?;
                } else {
                    // A plain EXPUNGE would also remove other clients' \Deleted mail.
                    remark =
                        Some("marked \\Deleted but not expunged: the IMAP server lacks UIDPLUS");
                }
            }
        }
        Ok(remark)
    }
}

impl Maildrop for ImapMaildrop {
    fn uidvalidity(&self) -> u32 {
        self.snapshot.uidvalidity
    }

    fn messages(&self) -> &[Message] {
        &self.snapshot.messages
    }

    fn fetch(&mut self, uid: u32, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), Error> {
        match self.wire.fetch_body(uid, offset, len, out) {
            Ok(true) => Ok(()),
            // No answer for the UID: another client expunged it.
            Ok(false) => Err(Error::Gone),
            Err(imapwire::Failed::No(text)) if text.contains("EXPUNGEISSUED") => Err(Error::Gone),
            Err(e) => Err(wire_error(&format!("UID FETCH {uid}"), e)),
        }
    }

    fn prefetch(&mut self, len: u64, next: &mut dyn Iterator<Item = Message>) {
        let next = &mut next.map(|m| (m.uid, m.size));
        self.wire
            .prefetch(len, PREFETCH_BUDGET, PREFETCH_MOST, next);
    }

    fn commit(&mut self, deleted: &[u32]) -> Result<Option<&'static str>, Error> {
        if self.on_dele == OnDele::Keep {
            return Ok(None);
        }
        let set = uid_set(deleted);
        let mut applied: Vec<String> = Vec::new();
        match self.apply(&set, &mut applied) {
            Ok(remark) => {
                crate::log::info(&format!(
                    "update of UIDs {set} in {} applied: [{}]",
                    self.mailbox,
                    applied.join("; ")
                ));
                Ok(remark)
            }
            // Whatever the failure, the log must say exactly what was and wasn't done.
            Err(e) => Err(Error::Temp(format!(
                "update of UIDs {set} in {} failed: {}; applied before the failure: [{}]",
                self.mailbox,
                e.detail(),
                applied.join("; ")
            ))),
        }
    }

    fn logout(&mut self) {
        let _ = self.session.logout();
    }
}

/// UIDs (sorted) as a compact IMAP sequence set: `1:3,7,9:12`.
fn uid_set(uids: &[u32]) -> String {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_names_go_in_modified_utf7() {
        // RFC 3501's example, and names Outlook and Thunderbird use.
        assert_eq!(
            mutf7("~peter/mail/台北/日本語"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert_eq!(mutf7("Entwürfe & Co"), "Entw&APw-rfe &- Co");
        assert_eq!(mutf7("Gelöschte Elemente"), "Gel&APY-schte Elemente");
        assert_eq!(mutf7("😀"), "&2D3eAA-");
        assert_eq!(quoted("a\"b\\"), "\"a\\\"b\\\\\"");
    }

    #[test]
    fn uid_sets_are_compact() {
        assert_eq!(uid_set(&[9, 1, 2, 3, 7, 10, 11, 12]), "1:3,7,9:12");
        assert_eq!(uid_set(&[5]), "5");
    }

    #[test]
    fn login_failures_are_classified_by_response_code() {
        assert!(matches!(
            classify_no("[AUTHENTICATIONFAILED] Authentication failed."),
            Error::Auth(_)
        ));
        assert!(matches!(
            classify_no("[UNAVAILABLE] Try later"),
            Error::Temp(_)
        ));
        assert!(matches!(classify_no("[INUSE] locked"), Error::InUse(_)));
        assert!(matches!(classify_no("Login failed"), Error::Auth(_)));
    }
}
