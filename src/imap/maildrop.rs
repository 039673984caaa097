//! The maildrop over one IMAP session: connect (TLS or STARTTLS), log in, SELECT the mailbox
//! and take one snapshot; RETR/TOP read with `BODY.PEEK[]<offset.length>` so nothing changes;
//! only `commit` (POP3's UPDATE state) selects the mailbox again, checks its UIDVALIDITY and
//! touches exactly the DELE'd UIDs. IMAP text never reaches the POP3 client: [`to_error`], the
//! one place IMAP failures become maildrop errors, carries it to the log only.

use super::client::{Client, Entry, Failure, MailboxEntry};
use super::transport::{self, Stream, Timed};
use super::{digest, proto, OnDele, Settings};
use crate::account::{Account, Security, Server, Source};
use crate::log;
use crate::maildrop::{Backend, Error, Maildrop, Message, SaslClient};
use crate::oauth::flow::Provider;
use crate::oauth::store::Store;
use crate::oauth::token;
use crate::secret::Secret;
use std::collections::HashMap;
use std::time::Duration;

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

type Conn = Client<Stream>;

/// Messages one session lists when each needs an identifier (`%g`, `%m`): with its UIDL
/// string, about 150 octets a message, this keeps a session within its memory bound.
const MAX_LISTED_WITH_IDS: usize = 100_000;

/// What was being done when IMAP failed, for [`to_error`].
#[derive(Clone, Copy)]
enum Step<'a> {
    Login,
    Select(&'a str),
    Fetch(u32),
    Other(&'a str),
}

/// The one place IMAP failures become maildrop errors: RFC 5530 codes say whether a NO is
/// about the credentials, the mailbox or the server; a broken connection is always temporary.
fn to_error(step: Step<'_>, f: Failure) -> Error {
    let what = match step {
        Step::Login => "login".to_string(),
        Step::Select(m) => format!("opening {m}"),
        Step::Fetch(uid) => format!("UID FETCH {uid}"),
        Step::Other(w) => w.to_string(),
    };
    let detail = format!("{what}: {}", f.detail());
    let Failure::No { code, .. } = &f else {
        return Error::Temp(detail);
    };
    match (code.as_ref().map(|c| c.name.as_str()), step) {
        (Some("UNAVAILABLE" | "SERVERBUG" | "LIMIT" | "OVERQUOTA"), _) => Error::Temp(detail),
        (Some("INUSE"), _) => Error::InUse(detail),
        // The server's policy (e.g. no login in clear), not the user's password.
        (Some("PRIVACYREQUIRED" | "CONTACTADMIN"), Step::Login) => Error::Perm(detail),
        (_, Step::Login) => Error::Auth(detail),
        (_, Step::Select(_)) => Error::Perm(detail),
        (Some("EXPUNGEISSUED"), Step::Fetch(_)) => Error::Gone,
        _ => Error::Temp(detail),
    }
}

pub struct ImapBackend {
    settings: Settings,
}

impl ImapBackend {
    pub fn new(settings: Settings) -> ImapBackend {
        ImapBackend { settings }
    }

    /// A connection to `server` ready for a login: TLS or STARTTLS as configured, and
    /// STARTTLS too where the server refuses logins in clear (LOGINDISABLED).
    fn conn(&self, server: &Server) -> Result<Conn, Error> {
        let (timeout, ca) = (self.settings.timeout, self.settings.ca.as_deref());
        let c = connect(server, timeout, ca)?;
        if server.security != Security::Plain {
            return Ok(c);
        }
        ready_for_login(c, server, timeout, ca)
    }

    /// After LOGIN or AUTHENTICATE: say who we are if asked, open the mailbox and take the
    /// snapshot.
    /// `cache_key` names whose `%m` digests these are (user, server, mailbox); `None` keeps none.
    fn open_maildrop(
        &self,
        mut client: Conn,
        mailbox: String,
        cache_key: Option<String>,
    ) -> Result<ImapMaildrop, Error> {
        let s = &self.settings;
        identify(&mut client);
        let mut opened = || -> Result<_, Error> {
            let mailbox = resolve(&mut client, &mailbox)?;
            // The target is checked now, not at QUIT after the client took the mail.
            let move_to = match &s.on_dele {
                OnDele::Move(folder) => Some(resolve(&mut client, folder)?),
                _ => None,
            };
            if move_to.as_deref() == Some(mailbox.as_str()) {
                // Each message would come back with a new UID and be served again, for ever.
                return Err(Error::Perm(format!(
                    "move:{} is the mailbox served ({mailbox}): choose another folder",
                    move_to.as_deref().unwrap_or_default()
                )));
            }
            let mut snapshot = open(&mut client, &mailbox, &s.on_dele, s.max_messages, s.ids)?;
            if s.ids == super::Ids::HeaderDigest {
                let dir = s.state_dir.as_deref().filter(|_| cache_key.is_some());
                let key = cache_key.as_deref().unwrap_or("");
                let mut cache = digest::Cache::open(dir, key, snapshot.uidvalidity);
                add_digests(&mut client, &mut snapshot, &mut cache, &mailbox)?;
                let uids: Vec<u32> = snapshot.messages.iter().map(|m| m.uid).collect();
                cache.save(&uids);
            }
            Ok((mailbox, move_to, snapshot))
        };
        match opened() {
            Ok((mailbox, move_to, snapshot)) => Ok(ImapMaildrop {
                client,
                mailbox,
                move_to,
                on_dele: s.on_dele.clone(),
                snapshot,
            }),
            Err(e) => {
                client.logout();
                Err(e)
            }
        }
    }
}

/// Where a server drops the connection at connect or login, a limit on connections from one
/// address is the usual cause: every session comes from this host.
const LIMIT_HINT: &str = "(if this happens with many sessions at once, it may be the IMAP \
    server's limit on connections from one address: Dovecot mail_max_userip_connections, \
    Courier MAXPERIP, Cyrus maxlogins_per_host; see the README, \"Several sessions at once\")";

/// The greeting failed or the server hung up at login: the detail, with [`LIMIT_HINT`] when
/// the server went away.
fn dropped(step: Step<'_>, f: Failure) -> Error {
    let went_away = matches!(&f, Failure::Broken(t) if t.contains("closed the connection")
        || t.contains("said BYE"));
    match to_error(step, f) {
        Error::Temp(d) if went_away => Error::Temp(format!("{d} {LIMIT_HINT}")),
        e => e,
    }
}

/// Connects, with TLS or STARTTLS as configured, and reads the greeting.
fn connect(
    server: &Server,
    timeout: Duration,
    ca: Option<&std::path::Path>,
) -> Result<Conn, Error> {
    let where_ = format!("{}:{}", server.host, server.port);
    let tcp = transport::connect(server, timeout).map_err(Error::Temp)?;
    let step = Step::Other(&where_);
    let stream = match server.security {
        Security::Tls => tls(tcp, server, timeout, ca)?,
        Security::Plain | Security::StartTls => Stream::Plain(Timed::new(tcp, timeout)),
    };
    let mut c = Client::new(stream, timeout);
    c.greeting().map_err(|f| dropped(step, f))?;
    match server.security {
        Security::StartTls => starttls(c, server, timeout, ca),
        _ => Ok(c),
    }
}

fn tls(
    tcp: std::net::TcpStream,
    server: &Server,
    timeout: Duration,
    ca: Option<&std::path::Path>,
) -> Result<Stream, Error> {
    transport::tls(tcp, &server.host, ca, timeout).map_err(|(e, permanent)| match permanent {
        true => Error::Perm(e),
        false => Error::Temp(e),
    })
}

/// STARTTLS on a connection that has read its greeting: the certificate verified as for
/// `-s`; never a fallback to clear text.
fn starttls(
    mut c: Conn,
    server: &Server,
    timeout: Duration,
    ca: Option<&std::path::Path>,
) -> Result<Conn, Error> {
    let where_ = format!("{}:{}", server.host, server.port);
    let step = Step::Other(&where_);
    let caps = c.capabilities().map_err(|f| to_error(step, f))?;
    if !caps.iter().any(|c| c == "STARTTLS") {
        return Err(Error::Temp(format!(
            "{where_}: the server does not offer STARTTLS"
        )));
    }
    c.run(b"STARTTLS", &mut drop)
        .map_err(|f| to_error(Step::Other(&format!("{where_}: STARTTLS")), f))?;
    let Stream::Plain(timed) = c.into_stream().map_err(|f| to_error(step, f))? else {
        unreachable!("STARTTLS starts on a plain stream");
    };
    Ok(Client::new(
        tls(timed.into_tcp(), server, timeout, ca)?,
        timeout,
    ))
}

/// A clear-text connection where the server refuses logins in clear (LOGINDISABLED): upgraded
/// with STARTTLS if it offers that, else a configuration error, never a failed login (a user
/// with the right password must not be counted, and banned, for the server's policy).
fn ready_for_login(
    mut c: Conn,
    server: &Server,
    timeout: Duration,
    ca: Option<&std::path::Path>,
) -> Result<Conn, Error> {
    let where_ = format!("{}:{}", server.host, server.port);
    let caps = c
        .capabilities()
        .map_err(|f| to_error(Step::Other(&where_), f))?;
    if !caps.iter().any(|c| c == "LOGINDISABLED") {
        return Ok(c);
    }
    if caps.iter().any(|c| c == "STARTTLS") {
        log::debug(&format!(
            "{where_} refuses logins in clear (LOGINDISABLED): upgrading with STARTTLS \
             (--imap-starttls says so up front)"
        ));
        return starttls(c, server, timeout, ca);
    }
    Err(Error::Perm(format!(
        "{where_} refuses logins in clear (LOGINDISABLED) and offers no STARTTLS: use -s \
         (IMAPS, usually port 993) or --imap-starttls, or allow clear-text logins on the \
         server (Dovecot disable_plaintext_auth = no, Cyrus allowplaintext: yes, Courier \
         IMAP_TLS_REQUIRED=0)"
    )))
}

/// A mailbox name as the user writes it, as the server knows it, checked to exist: `INBOX`;
/// an RFC 6154 special use (`\Archive`, `\Trash`, ...) for the folder the server marks so;
/// else a path with `/` between levels, put in the server's personal namespace (its prefix and
/// delimiter: `Archive/2026` is `INBOX.Archive.2026` on Cyrus and Courier) and in modified
/// UTF-7, or failing that the name exactly as written. A name that isn't there is a
/// configuration error at login, not a failure at QUIT after the client took the mail.
fn resolve(c: &mut Conn, name: &str) -> Result<String, Error> {
    if name.eq_ignore_ascii_case("INBOX") {
        return Ok("INBOX".into());
    }
    let step = Step::Other("finding the mailboxes");
    let usable = |m: &MailboxEntry| {
        !m.attributes.iter().any(|a| {
            a.eq_ignore_ascii_case("\\Noselect") || a.eq_ignore_ascii_case("\\NonExistent")
        })
    };
    if name.starts_with('\\') {
        let marked = |all: Vec<MailboxEntry>| {
            all.into_iter()
                .filter(usable)
                .find(|m| m.attributes.iter().any(|a| a.eq_ignore_ascii_case(name)))
                .map(|m| m.name)
        };
        let mut found = marked(
            c.list_mailboxes("*", false)
                .map_err(|f| to_error(step, f))?,
        );
        // Some servers give the attributes only when asked (RFC 6154 with LIST-EXTENDED).
        let extended = c.capabilities().is_ok_and(|caps| {
            caps.iter().any(|c| c == "LIST-EXTENDED") && caps.iter().any(|c| c == "SPECIAL-USE")
        });
        if found.is_none() && extended {
            let all = c.list_mailboxes("*", true).map_err(|f| to_error(step, f))?;
            found = marked(all);
        }
        return found.ok_or_else(|| {
            Error::Perm(format!(
                "no mailbox on the IMAP server is marked {name} (RFC 6154 SPECIAL-USE)"
            ))
        });
    }
    let (prefix, delimiter) = c
        .namespace()
        .map_err(|f| to_error(step, f))?
        .unwrap_or_default();
    // INBOX is case-insensitive, and its sub-folders are named after it as the server writes it.
    let name = match name.get(..6) {
        Some(first) if first.eq_ignore_ascii_case("INBOX/") => format!("INBOX/{}", &name[6..]),
        _ => name.to_string(),
    };
    let name = name.as_str();
    let path = match delimiter.as_deref() {
        Some(d) if d != "/" => name.replace('/', d),
        _ => name.to_string(),
    };
    let path = proto::mutf7(&path);
    let mut candidates = Vec::new();
    let prefixed = path
        .get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(&prefix));
    if !prefix.is_empty() && !prefixed {
        candidates.push(format!("{prefix}{path}"));
    }
    candidates.push(path);
    let as_written = proto::mutf7(name);
    if !candidates.contains(&as_written) {
        candidates.push(as_written);
    }
    for candidate in &candidates {
        let found = c
            .list_mailboxes(candidate, false)
            .map_err(|f| to_error(step, f))?;
        if found.iter().any(|m| &m.name == candidate && usable(m)) {
            return Ok(candidate.clone());
        }
    }
    Err(Error::Perm(format!(
        "mailbox {name:?} doesn't exist on the IMAP server (looked for {})",
        candidates.join(", ")
    )))
}

impl ImapBackend {
    /// A user with an `"oauth2"` section: the POP3 password opens the token store (a wrong one
    /// asks the provider nothing), the access token logs in with XOAUTH2 or OAUTHBEARER, and a
    /// token IMAP refuses is refreshed once and tried again.
    fn oauth_login(
        &self,
        user: &str,
        account: &Account,
        provider: &Provider,
        password: &Secret,
    ) -> Result<Conn, Error> {
        let s = &self.settings;
        let state_dir = s.state_dir.as_deref().ok_or_else(|| {
            Error::Perm("an \"oauth2\" user needs --state-dir for its token store".into())
        })?;
        let source = token::Source {
            provider,
            store: Store::new(state_dir, user),
            ca: s.ca.as_deref(),
            timeout: s.timeout,
        };
        let mut opened = source.open(password).map_err(token_error)?;
        let mut client = self.conn(&account.server)?;
        let mech = provider.mechanism.as_str();
        let caps = client
            .capabilities()
            .map_err(|f| to_error(Step::Other("CAPABILITY"), f))?;
        if !caps
            .iter()
            .any(|c| c.eq_ignore_ascii_case(&format!("AUTH={mech}")))
        {
            return Err(Error::Perm(format!(
                "the IMAP server at {}:{} doesn't advertise AUTH={mech}, which the user's \
                 \"oauth2\" section asks for",
                account.server.host, account.server.port
            )));
        }
        // A refused token comes with an error challenge (RFC 7628 3.2.2), answered with an
        // empty response (XOAUTH2) or ^A (OAUTHBEARER); then the NO.
        let ack: &[u8] = if mech == "OAUTHBEARER" { b"\x01" } else { b"" };
        for retry in [false, true] {
            let initial = token::initial_response(
                mech,
                &account.username,
                &opened.access_token,
                &account.server.host,
                account.server.port,
            );
            let refused =
                match client.authenticate(mech, Some(initial), &mut |_| Some(ack.to_vec())) {
                    Ok(_) => return Ok(client),
                    Err(f) => match dropped(Step::Login, f) {
                        Error::Auth(detail) => detail,
                        e => return Err(e),
                    },
                };
            if retry {
                // Not the user's password: the grant or the configuration.
                return Err(Error::Perm(format!(
                    "the IMAP server refused a token just refreshed ({refused}): check the \
                     scope and \"username\" in the user's file"
                )));
            }
            log::info(&format!(
                "the IMAP server refused the access token ({refused}); refreshing it"
            ));
            opened.refresh_after_rejection().map_err(token_error)?;
        }
        unreachable!("the loop returns on its second pass")
    }
}

fn token_error(f: token::Failure) -> Error {
    match f {
        token::Failure::Password => {
            Error::Auth("the password doesn't open the OAuth token store".into())
        }
        token::Failure::Perm(why) => Error::Perm(why),
        token::Failure::Temp(why) => Error::Temp(why),
    }
}

/// RFC 2971 ID, when the server offers it: some refuse SELECT until a client has said who it
/// is (163.com: `Unsafe Login`). Sent ahead of the next command, so it costs no round trip.
fn identify(client: &mut Conn) {
    let offered = client
        .capabilities()
        .is_ok_and(|caps| caps.iter().any(|c| c == "ID"));
    if offered {
        let id = format!(
            "ID (\"name\" \"aiopopd\" \"version\" \"{}\")",
            env!("CARGO_PKG_VERSION")
        );
        let _ = client.send_ahead(id.as_bytes());
    }
}

impl Backend for ImapBackend {
    type Maildrop = ImapMaildrop;

    fn login(&mut self, user: &str, password: &Secret) -> Result<ImapMaildrop, Error> {
        let account = self.settings.accounts.lookup(user)?;
        let pw = password.expose();
        if account
            .username
            .bytes()
            .chain(pw.iter().copied())
            .any(|b| b == b'\r' || b == b'\n' || b == 0)
        {
            // The session refuses these first; this is the second lock on the door.
            return Err(Error::Auth("credentials contain CR, LF or NUL".into()));
        }
        let client = match &account.oauth2 {
            Some(provider) => self.oauth_login(user, &account, provider, password)?,
            None => {
                let mut client = self.conn(&account.server)?;
                client
                    .login(&account.username, password)
                    .map_err(|f| dropped(Step::Login, f))?;
                client
            }
        };
        let key = format!(
            "{}\0{}:{}\0{}",
            account.username, account.server.host, account.server.port, account.mailbox
        );
        self.open_maildrop(client, account.mailbox, Some(key))
    }

    /// Only with a fixed server (config refuses relayed mechanisms with --user-dir: the server
    /// depends on a user name that a relayed exchange doesn't tell beforehand).
    fn authenticate(
        &mut self,
        mechanism: &str,
        initial: Option<Vec<u8>>,
        client: &mut dyn SaslClient,
    ) -> Result<ImapMaildrop, Error> {
        let Source::Fixed(server) = &self.settings.accounts.source else {
            return Err(Error::Perm(
                "SASL relay needs a fixed IMAP server (-H)".into(),
            ));
        };
        let server = server.clone();
        let mut conn = self.conn(&server)?;
        let caps = conn
            .capabilities()
            .map_err(|f| to_error(Step::Other("CAPABILITY"), f))?;
        if !caps.iter().any(|c| c == &format!("AUTH={mechanism}")) {
            conn.logout();
            return Err(Error::Unsupported(format!(
                "--sasl offers {mechanism}, but the IMAP server at {}:{} doesn't advertise \
                 AUTH={mechanism}",
                server.host, server.port
            )));
        }
        conn.authenticate(mechanism, initial, &mut |challenge| {
            client.challenge(challenge)
        })
        .map_err(|f| dropped(Step::Login, f))?;
        let mailbox = self.settings.accounts.mailbox.clone();
        // The user isn't known here (the exchange was relayed): no %m cache to name.
        self.open_maildrop(conn, mailbox, None)
    }
}

/// The snapshot taken at login.
#[derive(Debug)]
struct Snapshot {
    uidvalidity: u32,
    messages: Vec<Message>,
    /// The server's identifier of each message (as `messages`), when `%g` needs them.
    ids: Vec<Box<str>>,
    /// The FETCH item they came in.
    id_item: Option<&'static str>,
}

fn open(
    client: &mut Conn,
    mailbox: &str,
    on_dele: &OnDele,
    max: Option<usize>,
    ids: super::Ids,
) -> Result<Snapshot, Error> {
    let step = Step::Select(mailbox);
    // SELECT, not EXAMINE: Courier gives a Maildir no client has SELECTed a UIDVALIDITY from
    // the clock at each EXAMINE and records one only at a SELECT, so listing under EXAMINE
    // changed every UIDL in every session there. SELECT changes nothing but `\Recent` (gone
    // in IMAP4rev2); RETR and TOP still FETCH with BODY.PEEK, and nothing is stored before
    // QUIT. It also answers PERMANENTFLAGS, which keyword mode checks here.
    let sel = client
        .select(false, mailbox)
        .map_err(|f| to_error(step, f))?;
    if let OnDele::Keyword(k) = on_dele {
        let flags = sel.permanent_flags.clone().unwrap_or_default();
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
    let uidvalidity = sel
        .uidvalidity
        .ok_or_else(|| Error::Temp(format!("no UIDVALIDITY for {mailbox}")))?;
    if sel.exists == 0 {
        return Ok(Snapshot {
            uidvalidity,
            messages: Vec::new(),
            ids: Vec::new(),
            id_item: None,
        });
    }
    let id_item = match ids {
        super::Ids::Server => Some(id_item(client)?),
        _ => None,
    };
    // The flag that takes a message out of the listing, if any. `\Deleted` mail is gone as
    // far as expunge and move are concerned (left so where an exact EXPUNGE was impossible):
    // listing it again would serve it twice, or copy it twice.
    let (interest, hide): (Vec<&str>, bool) = match on_dele {
        OnDele::Seen => (vec!["\\Seen"], true),
        OnDele::Keyword(k) => (vec![k.as_str()], true),
        OnDele::Expunge | OnDele::Move(_) => (vec!["\\Deleted"], true),
        OnDele::Keep => (vec![], false),
    };
    let listed = |e: &Entry| !(hide && e.marks & 1 != 0);
    let mut listing = client
        .list(
            sel.exists,
            &interest,
            id_item,
            match ids {
                // An identifier and a UIDL string per message: fewer fit in the memory bound.
                super::Ids::None => max.unwrap_or(usize::MAX),
                _ => max.unwrap_or(usize::MAX).min(MAX_LISTED_WITH_IDS),
            },
            &listed,
        )
        .map_err(|f| to_error(Step::Other("listing"), f))?;
    for why in &listing.left_out {
        log::warning(&format!("{mailbox}: left out of the listing: {why}"));
    }
    if listing.left_out_count > listing.left_out.len() {
        log::warning(&format!(
            "{mailbox}: {} more messages left out of the listing",
            listing.left_out_count - listing.left_out.len()
        ));
    }
    if listing.cut && (max.is_none() || ids != super::Ids::None) {
        log::warning(&format!(
            "{mailbox}: listing cut at {} messages (the most one session lists)",
            listing.entries.len()
        ));
    }
    let mut ids = std::mem::take(&mut listing.ids).into_iter();
    let mut listed: Vec<(Message, Option<Box<str>>)> = listing
        .entries
        .iter()
        .map(|e| {
            let m = Message {
                uid: e.uid,
                size: e.size,
            };
            (m, ids.next())
        })
        .collect();
    // A server repeating a UID: listed once.
    listed.sort_by_key(|(m, _)| m.uid);
    let before = listed.len();
    listed.dedup_by_key(|(m, _)| m.uid);
    if listed.len() < before {
        log::warning(&format!(
            "{mailbox}: the server listed {} UIDs twice; each listed once",
            before - listed.len()
        ));
    }
    let (messages, ids): (Vec<Message>, Vec<Option<Box<str>>>) = listed.into_iter().unzip();
    Ok(Snapshot {
        uidvalidity,
        messages,
        ids: ids.into_iter().flatten().collect(),
        id_item,
    })
}

/// `%m`: every listed message's header digest as its identifier; one gone meanwhile is left out.
fn add_digests(
    client: &mut Conn,
    snapshot: &mut Snapshot,
    cache: &mut digest::Cache,
    mailbox: &str,
) -> Result<(), Error> {
    let uids: Vec<u32> = snapshot.messages.iter().map(|m| m.uid).collect();
    let digests = digest::digests(client, cache, &uids)
        .map_err(|f| to_error(Step::Other("reading headers for %m"), f))?;
    let mut kept = Vec::with_capacity(uids.len());
    let mut ids = Vec::with_capacity(uids.len());
    for (m, d) in snapshot.messages.iter().zip(digests) {
        match d {
            Some(d) => {
                kept.push(*m);
                ids.push(d.into_boxed_str());
            }
            None => log::warning(&format!(
                "{mailbox}: UID {} left out of the listing: gone before its header was read",
                m.uid
            )),
        }
    }
    snapshot.messages = kept;
    snapshot.ids = ids;
    snapshot.id_item = Some(DIGEST);
    Ok(())
}

/// `id_item` of a snapshot whose identifiers are `%m` digests rather than a FETCH item.
const DIGEST: &str = "%m";

/// The FETCH item that carries the server's own stable identifier of a message, for
/// `--uidl-format %g`: RFC 8474's EMAILID (OBJECTID: Cyrus, Fastmail, Stalwart), Gmail's
/// X-GM-MSGID, or Dovecot's X-GUID (which Dovecot doesn't advertise: asked once to see).
fn id_item(client: &mut Conn) -> Result<&'static str, Error> {
    let caps = client
        .capabilities()
        .map_err(|f| to_error(Step::Other("CAPABILITY"), f))?;
    let has = |c: &str| caps.iter().any(|x| x == c);
    if has("OBJECTID") {
        return Ok("EMAILID");
    }
    if has("X-GM-EXT-1") {
        return Ok("X-GM-MSGID");
    }
    let guid = client
        .fetches_id("X-GUID")
        .map_err(|f| to_error(Step::Other("FETCH X-GUID"), f))?;
    if guid {
        return Ok("X-GUID");
    }
    Err(Error::Perm(
        "--uidl-format uses %g, but the IMAP server offers no stable message identifier \
         (OBJECTID, Gmail's X-GM-EXT-1 or Dovecot's X-GUID): use the default %08Xu%08Xv"
            .into(),
    ))
}

pub struct ImapMaildrop {
    client: Conn,
    /// As the server writes it (modified UTF-7, its prefix and delimiter).
    mailbox: String,
    /// `move:FOLDER`'s folder, likewise.
    move_to: Option<String>,
    on_dele: OnDele,
    snapshot: Snapshot,
}

/// Two messages share a DELE'd message's identifier (a copy keeps its EMAILID or X-GUID, or two
/// have the same header): after a UIDVALIDITY change nothing tells which was DELE'd, so nothing
/// is applied (the next session, under the new UIDVALIDITY, can).
fn ambiguous_after(mailbox: &str) -> Error {
    Error::Temp(format!(
        "UIDVALIDITY of {mailbox} changed during the session, and a DELE'd message shares its \
         identifier with another: nothing applied"
    ))
}

/// Without UIDPLUS only a plain EXPUNGE removes mail, and it removes every `\Deleted` message:
/// exact only if, right after the DELE'd messages were marked, the marked mail is exactly
/// those (one round trip before the EXPUNGE). An answer that isn't a clean `* SEARCH` means no.
fn exact_without_uidplus(c: &mut Conn, deleted: &[u32], mailbox: &str) -> Result<bool, Error> {
    let marked = c
        .uid_search("DELETED")
        .map_err(|f| to_error(Step::Other("UID SEARCH DELETED"), f))?;
    let dele: std::collections::HashSet<u32> = deleted.iter().copied().collect();
    let Some(marked) = marked else {
        log::info(&format!(
            "{mailbox}: no UIDPLUS, and no usable answer to UID SEARCH DELETED: the DELE'd \
             messages are only marked \\Deleted (never listed again)"
        ));
        return Ok(false);
    };
    let others: Vec<u32> = marked.into_iter().filter(|u| !dele.contains(u)).collect();
    if !others.is_empty() {
        log::info(&format!(
            "{mailbox}: no UIDPLUS, and UIDs {} are marked \\Deleted by another client: the \
             DELE'd messages are only marked \\Deleted (never listed again)",
            proto::uid_set(&others)
        ));
    }
    Ok(others.is_empty())
}

impl ImapMaildrop {
    /// The mailbox got a new UIDVALIDITY since the listing (a rebuilt mailbox; GNU Mailutils
    /// imap4d gives a new one at each SELECT): the DELE'd messages found again by
    /// the server's identifiers, where the session has them (`%g`); else nothing is applied.
    fn reidentify(&mut self, deleted: &[u32], exists: u32) -> Result<Vec<u32>, Error> {
        let changed = || {
            Error::Temp(format!(
                "UIDVALIDITY of {} changed during the session (with --uidl-format %g or %m \
                 the messages would be found again by their identifiers)",
                self.mailbox
            ))
        };
        let Some(item) = self.snapshot.id_item else {
            return Err(changed());
        };
        // Only an identifier that names one message, in the listing and in the mailbox now,
        // finds it: two copies of a message share one, and touching both would touch one the
        // client never DELE'd.
        let dele: std::collections::HashSet<u32> = deleted.iter().copied().collect();
        let mut count: HashMap<&str, usize> = HashMap::new();
        for id in &self.snapshot.ids {
            *count.entry(id).or_default() += 1;
        }
        let dele_ids: Vec<&str> = self
            .snapshot
            .messages
            .iter()
            .zip(&self.snapshot.ids)
            .filter(|(m, _)| dele.contains(&m.uid))
            .map(|(_, id)| &**id)
            .collect();
        let ambiguous = |n: usize| n != 1;
        if dele_ids.iter().any(|id| ambiguous(count[id])) {
            return Err(ambiguous_after(&self.mailbox));
        }
        let wanted: std::collections::HashSet<&str> = dele_ids.into_iter().collect();
        let fetch_item = Some(item).filter(|i| *i != DIGEST);
        let mut now = self
            .client
            .list(exists, &[], fetch_item, usize::MAX, &|_| true)
            .map_err(|f| to_error(Step::Other("listing again"), f))?;
        if fetch_item.is_none() {
            // Digests: every header read again (the cache was for the old UIDVALIDITY).
            let uids: Vec<u32> = now.entries.iter().map(|e| e.uid).collect();
            let mut none = digest::Cache::open(None, "", 0);
            let digests = digest::digests(&mut self.client, &mut none, &uids)
                .map_err(|f| to_error(Step::Other("reading headers for %m"), f))?;
            let (entries, ids): (Vec<_>, Vec<_>) = now
                .entries
                .iter()
                .zip(digests)
                .filter_map(|(e, d)| Some((*e, d?.into_boxed_str())))
                .unzip();
            (now.entries, now.ids) = (entries, ids);
        }
        let mut again: HashMap<&str, usize> = HashMap::new();
        for id in &now.ids {
            *again.entry(id).or_default() += 1;
        }
        if wanted
            .iter()
            .any(|id| again.get(id).is_some_and(|&n| ambiguous(n)))
        {
            return Err(ambiguous_after(&self.mailbox));
        }
        let found: Vec<u32> = now
            .entries
            .iter()
            .zip(&now.ids)
            .filter(|(_, id)| wanted.contains(&***id))
            .map(|(e, _)| e.uid)
            .collect();
        log::warning(&format!(
            "UIDVALIDITY of {} changed during the session: the {} DELE'd messages found again \
             by {item} as UIDs {}{}",
            self.mailbox,
            deleted.len(),
            proto::uid_set(&found),
            if found.len() < wanted.len() {
                " (the others are gone)"
            } else {
                ""
            }
        ));
        Ok(found)
    }

    /// The UPDATE state's IMAP commands for `--on-dele`, each recorded in `applied` once the
    /// server has said OK to it.
    fn apply(
        &mut self,
        deleted: &[u32],
        applied: &mut Vec<String>,
    ) -> Result<Option<&'static str>, Error> {
        let move_to = self.move_to.clone().unwrap_or_default();
        let sel = self
            .client
            .select(false, &self.mailbox)
            .map_err(|f| to_error(Step::Select(&self.mailbox), f))?;
        let renumbered;
        let deleted = if sel.uidvalidity == Some(self.snapshot.uidvalidity) {
            deleted
        } else {
            renumbered = self.reidentify(deleted, sel.exists)?;
            &renumbered[..]
        };
        if deleted.is_empty() {
            return Ok(None);
        }
        let set = &proto::uid_set(deleted);
        let c = &mut self.client;
        let (uidplus, has_move) = match &self.on_dele {
            OnDele::Expunge | OnDele::Move(_) => {
                let caps = c
                    .capabilities()
                    .map_err(|f| to_error(Step::Other("CAPABILITY"), f))?;
                let has = |x: &str| caps.iter().any(|c| c == x);
                (has("UIDPLUS"), has("MOVE"))
            }
            _ => (false, false),
        };
        let mut step = |verb: &str, args: String| -> Result<(), Error> {
            let shown = format!("UID {verb} {set} {args}");
            c.uid_command(verb, set, &args)
                .map_err(|f| to_error(Step::Other(&shown), f))?;
            applied.push(shown);
            Ok(())
        };
        let mut remark = None;
        match &self.on_dele {
            OnDele::Keep => {}
            OnDele::Seen => step("STORE", "+FLAGS.SILENT (\\Seen)".into())?,
            OnDele::Keyword(k) => step("STORE", format!("+FLAGS.SILENT ({k})"))?,
            OnDele::Move(_) if has_move => step("MOVE", proto::wire_mailbox(&move_to))?,
            OnDele::Expunge | OnDele::Move(_) => {
                // Without MOVE, a move is a copy and a deletion.
                if let OnDele::Move(_) = &self.on_dele {
                    step("COPY", proto::wire_mailbox(&move_to))?;
                }
                step("STORE", "+FLAGS.SILENT (\\Deleted)".into())?;
                if uidplus {
                    step("EXPUNGE", String::new())?;
                } else if exact_without_uidplus(c, deleted, &self.mailbox)? {
                    c.run(b"EXPUNGE", &mut drop)
                        .map_err(|f| to_error(Step::Other("EXPUNGE"), f))?;
                    applied.push("EXPUNGE".into());
                } else {
                    // A plain EXPUNGE would also remove other clients' \Deleted mail.
                    remark = Some(
                        "marked \\Deleted but not expunged: the IMAP server lacks UIDPLUS \
                         and other mail is marked \\Deleted",
                    );
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

    fn stable_id(&self, index: usize) -> Option<&str> {
        self.snapshot.ids.get(index).map(|id| &**id)
    }

    fn fetch(&mut self, uid: u32, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), Error> {
        match self.client.fetch_body(uid, offset, len, out) {
            Ok(true) => Ok(()),
            // NIL, or no FETCH for the UID: the server has no such message (any more).
            Ok(false) => Err(Error::Gone),
            Err(f) => Err(to_error(Step::Fetch(uid), f)),
        }
    }

    fn prefetch(&mut self, len: u64, next: &mut dyn Iterator<Item = Message>) {
        let next = &mut next.map(|m| (m.uid, m.size));
        self.client
            .prefetch(len, PREFETCH_BUDGET, PREFETCH_MOST, next);
    }

    fn commit(&mut self, deleted: &[u32]) -> Result<Option<&'static str>, Error> {
        if self.on_dele == OnDele::Keep {
            return Ok(None);
        }
        let set = proto::uid_set(deleted);
        let mut applied: Vec<String> = Vec::new();
        match self.apply(deleted, &mut applied) {
            Ok(remark) => {
                log::info(&format!(
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
        self.client.logout();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::proto::Code;

    fn no(code: &str) -> Failure {
        Failure::No {
            code: (!code.is_empty()).then(|| Code {
                name: code.into(),
                args: String::new(),
            }),
            text: "x".into(),
        }
    }

    #[test]
    fn failures_are_classified_by_step_and_code() {
        assert!(matches!(
            to_error(Step::Login, no("AUTHENTICATIONFAILED")),
            Error::Auth(_)
        ));
        assert!(matches!(to_error(Step::Login, no("")), Error::Auth(_)));
        assert!(matches!(
            to_error(Step::Login, no("UNAVAILABLE")),
            Error::Temp(_)
        ));
        assert!(matches!(
            to_error(Step::Login, no("INUSE")),
            Error::InUse(_)
        ));
        assert!(matches!(
            to_error(Step::Login, Failure::Broken("x".into())),
            Error::Temp(_)
        ));
        assert!(matches!(
            to_error(Step::Select("INBOX"), no("NONEXISTENT")),
            Error::Perm(_)
        ));
        assert!(matches!(
            to_error(Step::Fetch(3), no("EXPUNGEISSUED")),
            Error::Gone
        ));
        assert!(matches!(to_error(Step::Fetch(3), no("")), Error::Temp(_)));
    }
}
