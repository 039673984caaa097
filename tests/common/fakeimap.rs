//! A scripted fake IMAP server speaking real IMAP over a loopback socket, for the faults a real
//! Dovecot can't be made to show on cue: a connection dropped in the middle of a FETCH literal, a
//! server that stalls without a byte, NO/BAD/BYE at any step, an untagged `* NO [ALERT]` inside
//! SELECT/EXAMINE, no UIDPLUS or MOVE, a UIDVALIDITY that changes, a message another client
//! expunged. It records every line it receives and every change it carries out, so a test can
//! say "nothing changed" as "no STORE/EXPUNGE/COPY/MOVE was received" ([`FakeImap::mutations`])
//! or, where the fake itself refused or dropped one, "none was carried out"
//! ([`FakeImap::changes`]); and "no injection" as "no command it didn't expect".
//!
//! Without a rule it behaves as a small, correct server over one in-memory mailbox (INBOX plus
//! any folders given), shared by all connections, so a second session sees what the first one
//! did. Rules ([`Act`]) fire at the nth occurrence of a command verb (`"UID FETCH"`, `"EXAMINE"`,
//! `"LOGIN"`, ... or [`GREETING`]), counted over all connections, or at every command a
//! predicate picks ([`Builder::when`]: a body fetch by UID and offset, the listing). A rule may
//! also answer with any bytes at all ([`Act::Raw`]), for a server that is broken or hostile
//! rather than merely failing: endless lines, deep nesting, drip-fed answers.
//!
//! What the providers that can't run here do differently is scripted too, as [`Profile`]s (Gmail,
//! Outlook/Exchange, 163.com/126.com, a server that sends quoted bodies), each built from
//! switches a test may also use on their own: the UID after the body
//! ([`Builder::uid_after_body`]), SELECT refused until `ID` ([`Builder::require_id`]),
//! PERMANENTFLAGS without keywords ([`Builder::permanent_flags`]), bodies as quoted strings
//! ([`Builder::quoted_bodies`]). `ID` and `NAMESPACE` are answered when advertised.
//!
//! Also here, because both fault and hostile-input tests need it: [`Aiopopd`], the built binary
//! on pipes with every wait bounded (a hang is a test failure, never a stuck test run), and
//! [`run_on_socket`], the binary with fds 0, 1 and 2 all one socket, as inetd may run it.
#![allow(dead_code)]

use super::pop3::BIN;
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The pseudo-verb of the greeting, for rules.
pub const GREETING: &str = "GREETING";
/// The user and password the fake accepts unless told otherwise.
pub const USER: &str = "alice";
pub const PASSWORD: &str = "alice-pw";
/// Verbs that change the mailbox: none of them may appear unless the client QUIT after DELE.
pub const MUTATING: &[&str] = &[
    "STORE",
    "UID STORE",
    "EXPUNGE",
    "UID EXPUNGE",
    "COPY",
    "UID COPY",
    "MOVE",
    "UID MOVE",
    "APPEND",
    "CREATE",
    "DELETE",
    "RENAME",
];

/// What the fake does when a rule fires. The first six, and `Raw`, answer instead of the
/// command, which is then not carried out; the others go with the normal answer.
#[derive(Debug, Clone)]
pub enum Act {
    /// A tagged `NO` with this text (e.g. `"[UNAVAILABLE] try later"`).
    No(String),
    /// A tagged `BAD` with this text.
    Bad(String),
    /// An untagged `* BYE` with this text, then the connection is closed.
    Bye(String),
    /// The connection is closed without a word.
    Close,
    /// Nothing is sent, ever; the connection stays open (input is still read and recorded).
    Stall,
    /// This text instead of the answer; `{tag}` is replaced by the command's tag.
    Reply(String),
    /// The command is carried out, its answer cut off in the middle (in a body FETCH: in the
    /// middle of the literal), then the connection is closed.
    CutMidResponse,
    /// This untagged line (without `* `) first, then the normal answer.
    Untagged(String),
    /// Another client expunges this UID just before the normal answer (no EXPUNGE is announced:
    /// the fake behaves like a server that waits for a command that allows it).
    ExpungeElsewhere(u32),
    /// The mailbox is recreated with this UIDVALIDITY just before the normal answer.
    SetUidvalidity(u32),
    /// The script writes whatever it likes instead of the answer (see [`Raw`]); then the fake
    /// goes on reading commands if it returned `Ok`, or closes the connection if not.
    Raw(Script),
}

impl Act {
    /// An [`Act::Raw`] running `f`.
    pub fn raw(f: impl Fn(&mut Raw<'_>) -> io::Result<()> + Send + Sync + 'static) -> Act {
        Act::Raw(Script(Arc::new(f)))
    }
}

/// The code of an [`Act::Raw`].
#[derive(Clone)]
pub struct Script(Arc<ScriptFn>);

type ScriptFn = dyn Fn(&mut Raw<'_>) -> io::Result<()> + Send + Sync;

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Script(..)")
    }
}

/// What an [`Act::Raw`] script answers and writes to. Writes never block for good: once the
/// fake is stopped (the test is over) they fail, so a script may stream until a write fails.
pub struct Raw<'a> {
    /// The command's tag; empty for the greeting.
    pub tag: &'a str,
    /// The command line as received, literals included; empty for the greeting.
    pub line: &'a [u8],
    conn: &'a mut Conn,
}

impl Raw<'_> {
    /// The next line from the client (e.g. an AUTHENTICATE answer), recorded as a
    /// continuation; `None` at EOF.
    pub fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        let line = self.conn.read_line()?;
        if let Some(l) = &line {
            self.conn.record(l.clone(), false);
        }
        Ok(line)
    }

    /// Sleeps, failing early if the fake is stopped meanwhile.
    pub fn pause(&self, d: Duration) -> io::Result<()> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.conn.stop.load(Ordering::SeqCst) {
                return Err(stopped());
            }
            thread::sleep(Duration::from_millis(10).min(until - Instant::now()));
        }
        Ok(())
    }

    /// Writes `head`, then `total` octets of `fill`, then `tail`: one endless-looking line
    /// when none of them holds a line end. Fails as soon as the client stops taking them.
    pub fn stream(&mut self, head: &[u8], fill: u8, total: usize, tail: &[u8]) -> io::Result<()> {
        self.write_all(head)?;
        let chunk = vec![fill; 1 << 20];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            self.write_all(&chunk[..n])?;
            left -= n;
        }
        self.write_all(tail)?;
        self.flush()
    }
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the fake IMAP server is stopped")
}

impl Write for Raw<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The socket has a short write timeout while a script runs: a client that stopped
        // reading but keeps the connection open must not hold the fake (and its Drop) forever.
        loop {
            if self.conn.stop.load(Ordering::SeqCst) {
                return Err(stopped());
            }
            match self.conn.stream.write(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.stream.flush()
    }
}

/// A provider that can't run here, as the fake plays it ([`Builder::profile`]): what it
/// advertises, its folders, and the habits of its answers that a client written against Dovecot
/// could trip on. A profile replaces the capabilities; messages, credentials and rules are set
/// as usual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Gmail (imap.gmail.com): `X-GM-EXT-1`, `ID`, `NAMESPACE`, `UIDPLUS`, `MOVE`,
    /// `SPECIAL-USE` and the rest of its list; folders under `[Gmail]/` (`All Mail` `\All`,
    /// `Trash` `\Trash`, `Spam` `\Junk`, ...), `/` as delimiter, `[Gmail]` itself `\Noselect`;
    /// `X-GM-MSGID` answered when asked; and the UID last in every FETCH response, after the body
    /// literal and after FLAGS and RFC822.SIZE ([`Builder::uid_after_body`]). A client that routes
    /// a body by a UID it expects before the literal, as Dovecot sends it, can't place Gmail's.
    Gmail,
    /// Outlook.com / Exchange Online (outlook.office365.com): its capability list, `Deleted
    /// Items` (`\Trash`) and the other folders, and PERMANENTFLAGS without keywords or `\*`
    /// ([`Builder::permanent_flags`]), so `--on-dele keyword:` can't work there. Exchange
    /// converts each message to MIME when it is fetched, so RFC822.SIZE differs from the octets
    /// served, both ways: give such messages with [`Builder::message_listed_as`].
    Exchange,
    /// 163.com / 126.com / yeah.net (NetEase): advertises `ID` and refuses SELECT and EXAMINE
    /// (`NO SELECT Unsafe Login. Please contact kefu@188.com for help`) until the client has
    /// sent `ID (...)` on that connection ([`Builder::require_id`]); folder names in modified
    /// UTF-7 (`已删除`, `\Trash`). Without ID no session can open the mailbox at all.
    NetEase,
    /// A server that sends a body as a quoted string wherever it can (a chunk without CR, LF or
    /// NUL, e.g. the middle of a long line, or `""` past the end) and as a literal elsewhere
    /// ([`Builder::quoted_bodies`]); RFC 3501 allows either, so a client must read both.
    QuotedBodies,
}

#[derive(Clone)]
struct Rule {
    when: When,
    act: Act,
}

/// Which commands a rule fires at.
#[derive(Clone)]
enum When {
    /// The nth (1-based) occurrence of a verb, counted over all connections.
    Nth(String, usize),
    /// Every command (without its tag) for which this holds.
    Every(Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

#[derive(Debug, Clone)]
pub struct Message {
    pub uid: u32,
    pub flags: Vec<String>,
    pub body: Vec<u8>,
    /// The RFC822.SIZE the listing gives, if not the body's real length (a server that lies).
    pub listed_size: Option<u64>,
}

/// One line the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    /// 1 for the first connection.
    pub conn: usize,
    /// The raw line without its CRLF, literals included; for an AUTHENTICATE continuation, the
    /// client's base64 answer.
    pub line: Vec<u8>,
    /// False for AUTHENTICATE continuation lines.
    pub is_command: bool,
}

impl Received {
    /// The command without its tag, e.g. `UID STORE 1 +FLAGS.SILENT (\Seen)`.
    pub fn command(&self) -> String {
        let s = String::from_utf8_lossy(&self.line);
        match s.split_once(' ') {
            Some((_, rest)) if self.is_command => rest.to_string(),
            _ => s.into_owned(),
        }
    }

    /// The verb, upper-cased; two words for UID commands (`UID FETCH`).
    pub fn verb(&self) -> String {
        verb_of(&self.command())
    }
}

fn verb_of(command: &str) -> String {
    let mut words = command.split(' ');
    let first = words.next().unwrap_or("").to_ascii_uppercase();
    if first == "UID" {
        format!("UID {}", words.next().unwrap_or("").to_ascii_uppercase())
    } else {
        first
    }
}

struct State {
    user: String,
    password: Vec<u8>,
    capabilities: Vec<String>,
    uidvalidity: u32,
    next_uid: u32,
    inbox: Vec<Message>,
    folders: BTreeMap<String, Vec<Message>>,
    /// RFC 6154 attributes of folders (`\Archive`), shown by LIST.
    special_use: BTreeMap<String, String>,
    /// FETCH answers give the UID last (Gmail).
    uid_after_body: bool,
    /// SELECT and EXAMINE are refused until the connection has sent ID (NetEase).
    require_id: bool,
    /// What SELECT says in PERMANENTFLAGS, if not the default with `\*`.
    permanent_flags: Option<String>,
    /// Bodies go as quoted strings where they can.
    quoted_bodies: bool,
    rules: Vec<Rule>,
    seen: BTreeMap<String, usize>,
    received: Vec<Received>,
    applied: Vec<String>,
    connections: usize,
}

/// Sets up a [`FakeImap`]: the mailbox, the capabilities, the rules.
pub struct Builder {
    state: State,
}

impl Builder {
    /// Capabilities advertised (after IMAP4rev1); UIDPLUS and MOVE unless removed.
    pub fn without(mut self, capability: &str) -> Builder {
        self.state
            .capabilities
            .retain(|c| !c.eq_ignore_ascii_case(capability));
        self
    }

    pub fn credentials(mut self, user: &str, password: &[u8]) -> Builder {
        self.state.user = user.to_string();
        self.state.password = password.to_vec();
        self
    }

    pub fn uidvalidity(mut self, v: u32) -> Builder {
        self.state.uidvalidity = v;
        self
    }

    /// The UID the next message appended gets (1 at first): UIDs that differ from message
    /// numbers show which of the two a log line names.
    pub fn next_uid(mut self, uid: u32) -> Builder {
        self.state.next_uid = uid;
        self
    }

    /// Appends a message to INBOX with the next UID.
    pub fn message(self, body: &[u8]) -> Builder {
        self.message_with_flags(body, &[])
    }

    pub fn message_with_flags(mut self, body: &[u8], flags: &[&str]) -> Builder {
        let uid = self.state.next_uid;
        self.state.next_uid += 1;
        self.state.inbox.push(Message {
            uid,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            body: body.to_vec(),
            listed_size: None,
        });
        self
    }

    /// Appends a message whose listing says RFC822.SIZE `size`, whatever its body's length.
    pub fn message_listed_as(mut self, body: &[u8], size: u64) -> Builder {
        self = self.message(body);
        self.state.inbox.last_mut().unwrap().listed_size = Some(size);
        self
    }

    /// One more capability advertised (e.g. `AUTH=CRAM-MD5`, for a relayed mechanism; the
    /// fake itself runs only PLAIN, so a rule must answer such an AUTHENTICATE).
    pub fn capability(mut self, capability: &str) -> Builder {
        self.state.capabilities.push(capability.to_string());
        self
    }

    /// An empty folder besides INBOX (a `move:` target).
    pub fn folder(mut self, name: &str) -> Builder {
        self.state.folders.insert(name.to_string(), Vec::new());
        self
    }

    /// A folder the server marks with an RFC 6154 special use (`\Archive`) in LIST.
    pub fn special_folder(mut self, name: &str, special_use: &str) -> Builder {
        self.state.folders.insert(name.to_string(), Vec::new());
        let attr = special_use.to_string();
        self.state.special_use.insert(name.to_string(), attr);
        self
    }

    /// The capabilities advertised, all of them (IMAP4rev1 included, if wanted), instead of the
    /// default list.
    pub fn capabilities(mut self, capabilities: &[&str]) -> Builder {
        self.state.capabilities = capabilities.iter().map(|c| c.to_string()).collect();
        self
    }

    /// Gmail's order: in every FETCH response the UID comes last, after FLAGS and RFC822.SIZE
    /// in a listing and after the body literal in a body fetch
    /// (`* 3 FETCH (BODY[]<0> {n}\r\n...octets... UID 7)`). A body can then be routed to its
    /// message only once the literal has been read.
    pub fn uid_after_body(mut self) -> Builder {
        self.state.uid_after_body = true;
        self
    }

    /// NetEase's (163.com, 126.com) rule: SELECT and EXAMINE get `NO SELECT Unsafe Login.
    /// Please contact kefu@188.com for help` until the client has sent `ID (...)` on that
    /// connection. Advertise `ID` too (the [`Profile::NetEase`] does), or nothing can open it.
    pub fn require_id(mut self) -> Builder {
        self.state.require_id = true;
        self
    }

    /// What SELECT puts in PERMANENTFLAGS (without the parentheses), e.g. Exchange's
    /// `\Seen \Answered \Flagged \Deleted \Draft $MDNSent`: without `\*` or the keyword,
    /// the mailbox can't store `--on-dele keyword:NAME`. (The fake stores any flag anyway, as
    /// servers that drop such a flag silently answer OK too.)
    pub fn permanent_flags(mut self, flags: &str) -> Builder {
        self.state.permanent_flags = Some(flags.to_string());
        self
    }

    /// Bodies as quoted strings (`BODY[]<262144> "..."`, with `\\` and `\"` escaped) wherever
    /// the octets have no CR, LF or NUL: the middle of a long line, or `""` past the end; as
    /// literals elsewhere. RFC 3501 allows either form for any string.
    pub fn quoted_bodies(mut self) -> Builder {
        self.state.quoted_bodies = true;
        self
    }

    /// Plays `profile` (see [`Profile`]): its capabilities (replacing the default list), its
    /// folders and the switches its habits need.
    pub fn profile(self, profile: Profile) -> Builder {
        match profile {
            Profile::Gmail => self
                .capabilities(&[
                    "IMAP4rev1",
                    "UNSELECT",
                    "IDLE",
                    "NAMESPACE",
                    "QUOTA",
                    "ID",
                    "XLIST",
                    "CHILDREN",
                    "X-GM-EXT-1",
                    "UIDPLUS",
                    "COMPRESS=DEFLATE",
                    "ENABLE",
                    "MOVE",
                    "CONDSTORE",
                    "ESEARCH",
                    "UTF8=ACCEPT",
                    "LIST-EXTENDED",
                    "LIST-STATUS",
                    "LITERAL-",
                    "SPECIAL-USE",
                    "APPENDLIMIT=35651584",
                    "AUTH=PLAIN",
                ])
                .uid_after_body()
                .special_folder("[Gmail]", "\\HasChildren \\Noselect")
                .special_folder("[Gmail]/All Mail", "\\All \\HasNoChildren")
                .special_folder("[Gmail]/Drafts", "\\Drafts \\HasNoChildren")
                .special_folder("[Gmail]/Important", "\\HasNoChildren \\Important")
                .special_folder("[Gmail]/Sent Mail", "\\HasNoChildren \\Sent")
                .special_folder("[Gmail]/Spam", "\\HasNoChildren \\Junk")
                .special_folder("[Gmail]/Starred", "\\Flagged \\HasNoChildren")
                .special_folder("[Gmail]/Trash", "\\HasNoChildren \\Trash"),
            Profile::Exchange => self
                .capabilities(&[
                    "IMAP4",
                    "IMAP4rev1",
                    "AUTH=PLAIN",
                    "AUTH=XOAUTH2",
                    "SASL-IR",
                    "UIDPLUS",
                    "MOVE",
                    "ID",
                    "UNSELECT",
                    "CHILDREN",
                    "IDLE",
                    "NAMESPACE",
                    "LITERAL+",
                ])
                .permanent_flags("\\Seen \\Answered \\Flagged \\Deleted \\Draft $MDNSent")
                .special_folder("Archive", "\\Archive \\HasNoChildren")
                .special_folder("Deleted Items", "\\HasNoChildren \\Trash")
                .special_folder("Drafts", "\\Drafts \\HasNoChildren")
                .special_folder("Junk Email", "\\HasNoChildren \\Junk")
                .special_folder("Sent Items", "\\HasNoChildren \\Sent"),
            // NetEase also offers STARTTLS, which the fake can't do; aiopopd uses it only when
            // told to (or when the server says LOGINDISABLED), so it is left out.
            Profile::NetEase => self
                .capabilities(&[
                    "IMAP4rev1",
                    "XLIST",
                    "SPECIAL-USE",
                    "ID",
                    "LITERAL+",
                    "XAPPLEPUSHSERVICE",
                    "UIDPLUS",
                    "X-CM-EXT-1",
                    "SASL-IR",
                    "AUTH=XOAUTH2",
                ])
                .require_id()
                // 已删除, 垃圾邮件, 已发送
                .special_folder("&XfJSIJZk-", "\\Trash")
                .special_folder("&V4NXPpCuTvY-", "\\Junk")
                .special_folder("&XfJT0ZAB-", "\\Sent"),
            Profile::QuotedBodies => self.quoted_bodies(),
        }
    }

    /// `act` at the first occurrence of `verb`.
    pub fn on(self, verb: &str, act: Act) -> Builder {
        self.on_nth(verb, 1, act)
    }

    /// `act` at the nth (1-based) occurrence of `verb`, counted over all connections.
    pub fn on_nth(mut self, verb: &str, nth: usize, act: Act) -> Builder {
        self.state.rules.push(Rule {
            when: When::Nth(verb.to_ascii_uppercase(), nth),
            act,
        });
        self
    }

    /// `act` at every command (without its tag, e.g. `UID FETCH 7 (UID BODY.PEEK[]<0.262144>)`)
    /// for which `matches` holds.
    pub fn when(
        mut self,
        matches: impl Fn(&str) -> bool + Send + Sync + 'static,
        act: Act,
    ) -> Builder {
        self.state.rules.push(Rule {
            when: When::Every(Arc::new(matches)),
            act,
        });
        self
    }

    /// `act` at every fetch of message `uid`'s body from `offset` (whatever the length asked),
    /// however many fetches came before it or are sent ahead.
    pub fn on_body(self, uid: u32, offset: u64, act: Act) -> Builder {
        self.when(move |c| body_fetch(c) == Some((uid, offset)), act)
    }

    /// `act` at every listing: a FETCH (or UID FETCH) that asks for RFC822.SIZE.
    pub fn on_listing(self, act: Act) -> Builder {
        self.when(is_listing, act)
    }

    pub fn start(self) -> FakeImap {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake IMAP server");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(self.state));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        let accept = thread::spawn(move || accept_loop(listener, s, st));
        FakeImap {
            port,
            state,
            stop,
            accept: Some(accept),
        }
    }
}

/// The running fake; stops (and closes every connection) when dropped.
pub struct FakeImap {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FakeImap {
    /// Alice, password `alice-pw`, an empty INBOX with UIDVALIDITY 1234, UIDPLUS and MOVE.
    pub fn builder() -> Builder {
        Builder {
            state: State {
                user: USER.into(),
                password: PASSWORD.into(),
                capabilities: ["IMAP4rev1", "LITERAL+", "UIDPLUS", "MOVE", "AUTH=PLAIN"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                uidvalidity: 1234,
                next_uid: 1,
                inbox: Vec::new(),
                folders: BTreeMap::new(),
                special_use: BTreeMap::new(),
                uid_after_body: false,
                require_id: false,
                permanent_flags: None,
                quoted_bodies: false,
                rules: Vec::new(),
                seen: BTreeMap::new(),
                received: Vec::new(),
                applied: Vec::new(),
                connections: 0,
            },
        }
    }

    /// aiopopd's arguments towards this server (plain IMAP on loopback, USER/PASS allowed,
    /// logging to stderr).
    pub fn args(&self) -> Vec<String> {
        [
            "-H",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "--allow-plaintext-auth",
            "-l",
            "-d",
            "pop.test",
            "--auth-failure-delay",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every line received, in order.
    pub fn received(&self) -> Vec<Received> {
        self.state().received.clone()
    }

    /// Every command received, without tags (continuation lines left out).
    pub fn commands(&self) -> Vec<String> {
        self.received()
            .iter()
            .filter(|r| r.is_command)
            .map(Received::command)
            .collect()
    }

    /// The commands that would change a mailbox.
    pub fn mutations(&self) -> Vec<String> {
        self.received()
            .iter()
            .filter(|r| r.is_command && MUTATING.contains(&r.verb().as_str()))
            .map(Received::command)
            .collect()
    }

    /// The commands that changed a mailbox: carried out by the fake (answered OK, or
    /// carried out and the answer cut off), unlike those refused, stalled or dropped.
    pub fn changes(&self) -> Vec<String> {
        self.state().applied.clone()
    }

    /// How many times the client tried to log in (LOGIN or AUTHENTICATE).
    pub fn logins(&self) -> usize {
        self.received()
            .iter()
            .filter(|r| r.is_command && matches!(r.verb().as_str(), "LOGIN" | "AUTHENTICATE"))
            .count()
    }

    pub fn connections(&self) -> usize {
        self.state().connections
    }

    /// INBOX now: (UID, flags) in UID order.
    pub fn inbox(&self) -> Vec<(u32, Vec<String>)> {
        self.state()
            .inbox
            .iter()
            .map(|m| (m.uid, m.flags.clone()))
            .collect()
    }

    /// The UIDs in a folder other than INBOX.
    pub fn folder(&self, name: &str) -> Vec<u32> {
        self.state()
            .folders
            .get(name)
            .map(|f| f.iter().map(|m| m.uid).collect())
            .unwrap_or_default()
    }

    /// As another client would: the mailbox is recreated with a new UIDVALIDITY.
    pub fn set_uidvalidity(&self, v: u32) {
        self.state().uidvalidity = v;
    }

    /// As another client would: removes a message from INBOX.
    pub fn expunge(&self, uid: u32) {
        self.state().inbox.retain(|m| m.uid != uid);
    }
}

impl Drop for FakeImap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let n = {
                    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                    s.connections += 1;
                    s.connections
                };
                let (state, stop) = (state.clone(), stop.clone());
                conns.push(thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
                    let _ = stream.set_nodelay(true);
                    let mut c = Conn {
                        n,
                        reader: BufReader::new(stream.try_clone().expect("clone")),
                        stream,
                        state,
                        stop,
                        selected: None,
                        logged_in: false,
                        identified: false,
                    };
                    let _ = c.serve();
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(_) => break,
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

/// Why a connection ends.
enum End {
    /// Closed by rule or by LOGOUT.
    Closed,
    /// A rule said stall: read and record until the peer leaves.
    Stall,
}

struct Conn {
    n: usize,
    reader: BufReader<TcpStream>,
    stream: TcpStream,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    /// The selected mailbox and whether it is read-only (EXAMINE).
    selected: Option<(String, bool)>,
    logged_in: bool,
    /// The client sent ID on this connection.
    identified: bool,
}

/// What the normal answer to a command is: bytes, and where a literal starts (for cuts).
#[derive(Default)]
struct Answer {
    bytes: Vec<u8>,
    literal: Option<(usize, usize)>,
    close: bool,
}

impl Answer {
    fn line(&mut self, s: &str) {
        self.bytes.extend_from_slice(s.as_bytes());
        self.bytes.extend_from_slice(b"\r\n");
    }
}

impl Conn {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rules that fire now for `command` (counting this occurrence of its verb).
    fn fire(&self, verb: &str, command: &str) -> Vec<Act> {
        let mut s = self.state();
        let count = {
            let c = s.seen.entry(verb.to_string()).or_insert(0);
            *c += 1;
            *c
        };
        s.rules
            .iter()
            .filter(|r| match &r.when {
                When::Nth(v, nth) => v == verb && *nth == count,
                When::Every(matches) => matches(command),
            })
            .map(|r| r.act.clone())
            .collect()
    }

    fn serve(&mut self) -> io::Result<()> {
        let end = self.session()?;
        if let End::Stall = end {
            // Keep the socket open and silent; record whatever still arrives.
            while let Some(line) = self.read_line()? {
                self.record(line, true);
            }
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        Ok(())
    }

    fn session(&mut self) -> io::Result<End> {
        let caps = self.state().capabilities.join(" ");
        let mut greeting = Answer::default();
        greeting.line(&format!("* OK [CAPABILITY {caps}] Fake IMAP ready."));
        let acts = self.fire(GREETING, "");
        if let Some(end) = self.respond("", b"", acts, greeting)? {
            return Ok(end);
        }
        loop {
            let Some(line) = self.read_command()? else {
                return Ok(End::Closed);
            };
            self.record(line.clone(), true);
            let text = String::from_utf8_lossy(&line).into_owned();
            let (tag, command) = text.split_once(' ').unwrap_or((&text, ""));
            let tag = tag.to_string();
            let verb = verb_of(command);
            let acts = self.fire(&verb, command);
            // Another client's changes happen before the command is carried out; a rule that
            // answers instead means the command is not carried out at all.
            let mut replaced = false;
            for act in &acts {
                match act {
                    Act::ExpungeElsewhere(uid) => self.state().inbox.retain(|m| m.uid != *uid),
                    Act::SetUidvalidity(v) => self.state().uidvalidity = *v,
                    Act::No(_)
                    | Act::Bad(_)
                    | Act::Bye(_)
                    | Act::Close
                    | Act::Stall
                    | Act::Reply(_)
                    | Act::Raw(_) => replaced = true,
                    Act::CutMidResponse | Act::Untagged(_) => {}
                }
            }
            let answer = if replaced {
                Answer::default()
            } else {
                self.answer(&tag, &verb, command, &line)?
            };
            let ok = format!("{tag} OK ");
            if MUTATING.contains(&verb.as_str()) && find(&answer.bytes, ok.as_bytes()).is_some() {
                self.state().applied.push(command.to_string());
            }
            if let Some(end) = self.respond(&tag, &line, acts, answer)? {
                return Ok(end);
            }
        }
    }

    /// Applies the rules for this step to `answer` and sends the result.
    fn respond(
        &mut self,
        tag: &str,
        line: &[u8],
        acts: Vec<Act>,
        mut answer: Answer,
    ) -> io::Result<Option<End>> {
        for act in acts {
            match act {
                Act::No(text) => answer = tagged(tag, "NO", &text),
                Act::Bad(text) => answer = tagged(tag, "BAD", &text),
                Act::Bye(text) => {
                    answer = Answer::default();
                    answer.line(&format!("* BYE {text}"));
                    answer.close = true;
                }
                Act::Close => return Ok(Some(End::Closed)),
                Act::Stall => return Ok(Some(End::Stall)),
                Act::CutMidResponse => {
                    let cut = match answer.literal {
                        Some((start, len)) => start + len / 2,
                        None => answer.bytes.len() / 2,
                    };
                    self.stream.write_all(&answer.bytes[..cut])?;
                    return Ok(Some(End::Closed));
                }
                Act::Untagged(text) => {
                    let mut a = Answer::default();
                    a.line(&format!("* {text}"));
                    let offset = a.bytes.len();
                    a.bytes.extend_from_slice(&answer.bytes);
                    a.literal = answer.literal.map(|(s, l)| (s + offset, l));
                    a.close = answer.close;
                    answer = a;
                }
                Act::ExpungeElsewhere(_) | Act::SetUidvalidity(_) => {}
                Act::Reply(text) => {
                    answer = Answer::default();
                    answer.bytes = text.replace("{tag}", tag).into_bytes();
                }
                Act::Raw(Script(script)) => {
                    answer = Answer::default();
                    self.stream
                        .set_write_timeout(Some(Duration::from_millis(100)))?;
                    let done = script(&mut Raw {
                        tag,
                        line,
                        conn: self,
                    });
                    self.stream.set_write_timeout(None)?;
                    if done.is_err() {
                        return Ok(Some(End::Closed));
                    }
                }
            }
        }
        self.stream.write_all(&answer.bytes)?;
        self.stream.flush()?;
        Ok(answer.close.then_some(End::Closed))
    }

    fn record(&self, line: Vec<u8>, is_command: bool) {
        let conn = self.n;
        self.state().received.push(Received {
            conn,
            line,
            is_command,
        });
    }

    /// One line without CRLF, or None at EOF (or when the fake is stopped).
    fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => return Ok(None),
                Ok(_) if line.ends_with(b"\n") => {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    return Ok(Some(line));
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Ok(None),
            }
        }
    }

    fn read_exact(&mut self, n: usize) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0; n];
        let mut got = 0;
        while got < n {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            match self.reader.read(&mut buf[got..]) {
                Ok(0) => return Ok(None),
                Ok(k) => got += k,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Ok(None),
            }
        }
        Ok(Some(buf))
    }

    /// A command line with any literals (`{n}` / `{n+}`) read into it.
    fn read_command(&mut self) -> io::Result<Option<Vec<u8>>> {
        let Some(mut line) = self.read_line()? else {
            return Ok(None);
        };
        while let Some((n, plus)) = literal_at_end(&line) {
            if n > 1 << 20 {
                return Ok(Some(line));
            }
            if !plus {
                self.stream.write_all(b"+ Ready for literal data\r\n")?;
            }
            line.extend_from_slice(b"\r\n");
            let Some(data) = self.read_exact(n)? else {
                return Ok(None);
            };
            line.extend_from_slice(&data);
            let Some(rest) = self.read_line()? else {
                return Ok(None);
            };
            line.extend_from_slice(&rest);
        }
        Ok(Some(line))
    }

    fn answer(&mut self, tag: &str, verb: &str, command: &str, raw: &[u8]) -> io::Result<Answer> {
        let args = command.split_once(' ').map_or("", |(_, a)| a);
        let args = if verb.starts_with("UID ") {
            args.split_once(' ').map_or("", |(_, a)| a)
        } else {
            args
        };
        let ok = |text: &str| tagged(tag, "OK", text);
        Ok(match verb {
            "CAPABILITY" => {
                let mut a = Answer::default();
                a.line(&format!(
                    "* CAPABILITY {}",
                    self.state().capabilities.join(" ")
                ));
                a.bytes.extend(ok("Capability completed.").bytes);
                a
            }
            "NOOP" => ok("NOOP completed."),
            "LOGOUT" => {
                let mut a = Answer::default();
                a.line("* BYE Logging out");
                a.bytes.extend(ok("Logout completed.").bytes);
                a.close = true;
                a
            }
            "LOGIN" => {
                // Parse the raw bytes (tag, verb, then the arguments): quoted strings may carry
                // any octet but CR, LF and NUL.
                let words = astrings(raw);
                let words = &words[2.min(words.len())..];
                self.check_login(tag, words.first(), words.get(1).map(Vec::as_slice))
            }
            "AUTHENTICATE" => {
                if !args.eq_ignore_ascii_case("PLAIN") {
                    return Ok(tagged(tag, "NO", "Unsupported authentication mechanism."));
                }
                self.stream.write_all(b"+ \r\n")?;
                let Some(response) = self.read_line()? else {
                    return Ok(Answer {
                        close: true,
                        ..Answer::default()
                    });
                };
                self.record(response.clone(), false);
                if response == b"*" {
                    return Ok(tagged(tag, "BAD", "Authentication aborted by client."));
                }
                let Some(blob) = base64_decode(&response) else {
                    return Ok(tagged(tag, "BAD", "Invalid base64 data."));
                };
                let parts: Vec<&[u8]> = blob.split(|&b| b == 0).collect();
                if parts.len() != 3 {
                    return Ok(tagged(tag, "NO", "[AUTHENTICATIONFAILED] Invalid PLAIN."));
                }
                let user = parts[1].to_vec();
                self.check_login(tag, Some(&user), Some(parts[2]))
            }
            // RFC 2971: in any state, from a client that says who it is.
            "ID" if self.advertises("ID") => {
                self.identified = true;
                let mut a = Answer::default();
                a.line("* ID (\"name\" \"fakeimap\")");
                a.bytes.extend(ok("ID completed.").bytes);
                a
            }
            _ if !self.logged_in => tagged(tag, "BAD", "Log in first."),
            "NAMESPACE" if self.advertises("NAMESPACE") => {
                let mut a = Answer::default();
                a.line("* NAMESPACE ((\"\" \"/\")) NIL NIL");
                a.bytes.extend(ok("Namespace completed.").bytes);
                a
            }
            "EXAMINE" | "SELECT" => self.select(tag, verb == "EXAMINE", args),
            "FETCH" | "UID FETCH" => self.fetch(tag, verb == "UID FETCH", args),
            "UID STORE" | "STORE" => self.store(tag, verb == "UID STORE", args),
            "UID EXPUNGE" | "EXPUNGE" => self.expunge(tag, verb == "UID EXPUNGE", args),
            "UID MOVE" | "UID COPY" => self.copy(tag, verb == "UID MOVE", args),
            "UID SEARCH" => self.search(tag, args),
            "LIST" => self.list(tag, args),
            "CLOSE" | "UNSELECT" => {
                self.selected = None;
                ok("Closed.")
            }
            _ => tagged(tag, "BAD", "Unknown command."),
        })
    }

    fn advertises(&self, capability: &str) -> bool {
        self.state()
            .capabilities
            .iter()
            .any(|c| c.eq_ignore_ascii_case(capability))
    }

    fn check_login(
        &mut self,
        tag: &str,
        user: Option<&Vec<u8>>,
        password: Option<&[u8]>,
    ) -> Answer {
        let s = self.state();
        let good = user.is_some_and(|u| u.eq_ignore_ascii_case(s.user.as_bytes()))
            && password == Some(s.password.as_slice());
        drop(s);
        if good {
            self.logged_in = true;
            tagged(tag, "OK", "Logged in")
        } else {
            tagged(tag, "NO", "[AUTHENTICATIONFAILED] Authentication failed.")
        }
    }

    fn select(&mut self, tag: &str, read_only: bool, args: &str) -> Answer {
        let name = unquote(args);
        let s = self.state();
        if s.require_id && !self.identified {
            return tagged(
                tag,
                "NO",
                "SELECT Unsafe Login. Please contact kefu@188.com for help",
            );
        }
        let exists = if name.eq_ignore_ascii_case("INBOX") {
            s.inbox.len()
        } else if let Some(f) = s.folders.get(&name) {
            f.len()
        } else {
            return tagged(tag, "NO", "[NONEXISTENT] Mailbox doesn't exist.");
        };
        let mut a = Answer::default();
        a.line("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)");
        if read_only {
            a.line("* OK [PERMANENTFLAGS ()] Read-only mailbox.");
        } else if let Some(flags) = &s.permanent_flags {
            a.line(&format!("* OK [PERMANENTFLAGS ({flags})] Permanent flags"));
        } else {
            a.line("* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.");
        }
        a.line(&format!("* {exists} EXISTS"));
        a.line("* 0 RECENT");
        a.line(&format!("* OK [UIDVALIDITY {}] UIDs valid", s.uidvalidity));
        a.line(&format!("* OK [UIDNEXT {}] Predicted next UID", s.next_uid));
        drop(s);
        let mode = if read_only { "READ-ONLY" } else { "READ-WRITE" };
        a.bytes
            .extend(tagged(tag, "OK", &format!("[{mode}] Select completed.")).bytes);
        self.selected = Some((name, read_only));
        a
    }

    fn fetch(&mut self, tag: &str, by_uid: bool, args: &str) -> Answer {
        if self.selected.is_none() {
            return tagged(tag, "BAD", "No mailbox selected.");
        }
        let (set, items) = args.split_once(' ').unwrap_or((args, ""));
        let items = items.to_ascii_uppercase();
        let partial = parse_partial(&items);
        // Stable message ids: answered where the server has them, refused (BAD, as servers
        // answer an item they don't know) where it doesn't.
        let gm_msgid = items.contains("X-GM-MSGID");
        let emailid = items.contains("EMAILID");
        if (gm_msgid && !self.advertises("X-GM-EXT-1"))
            || (emailid && !self.advertises("OBJECTID"))
            || items.contains("X-GUID")
        {
            return tagged(tag, "BAD", "Invalid FETCH attribute.");
        }
        let s = self.state();
        let mut a = Answer::default();
        let max = if by_uid {
            s.inbox.last().map_or(0, |m| m.uid)
        } else {
            s.inbox.len() as u32
        };
        for (i, m) in s.inbox.iter().enumerate() {
            let seq = i as u32 + 1;
            if !in_set(set, if by_uid { m.uid } else { seq }, max) {
                continue;
            }
            let uid = format!("UID {}", m.uid);
            let mut attrs = Vec::new();
            if !s.uid_after_body {
                attrs.push(uid.clone());
            }
            if items.contains("RFC822.SIZE") {
                let size = m.listed_size.unwrap_or(m.body.len() as u64);
                attrs.push(format!("RFC822.SIZE {size}"));
            }
            if items.contains("FLAGS") {
                attrs.push(format!("FLAGS ({})", m.flags.join(" ")));
            }
            if s.uid_after_body {
                // Gmail: FLAGS before RFC822.SIZE.
                attrs.reverse();
            }
            if gm_msgid {
                attrs.push(format!(
                    "X-GM-MSGID {}",
                    1_600_000_000_000_000_000u64 + u64::from(m.uid)
                ));
            }
            if emailid {
                attrs.push(format!("EMAILID (M{:08x})", m.uid));
            }
            a.bytes
                .extend_from_slice(format!("* {seq} FETCH ({}", attrs.join(" ")).as_bytes());
            if let Some((offset, len)) = partial {
                let start = (offset as usize).min(m.body.len());
                let end = (start + len as usize).min(m.body.len());
                let data = &m.body[start..end];
                let space = if attrs.is_empty() { "" } else { " " };
                a.bytes
                    .extend_from_slice(format!("{space}BODY[]<{offset}> ").as_bytes());
                if s.quoted_bodies && !data.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                    a.bytes.push(b'"');
                    a.literal.get_or_insert((a.bytes.len(), data.len()));
                    for &b in data {
                        if b == b'"' || b == b'\\' {
                            a.bytes.push(b'\\');
                        }
                        a.bytes.push(b);
                    }
                    a.bytes.push(b'"');
                } else {
                    a.bytes
                        .extend_from_slice(format!("{{{}}}\r\n", data.len()).as_bytes());
                    a.literal.get_or_insert((a.bytes.len(), data.len()));
                    a.bytes.extend_from_slice(data);
                }
            }
            if s.uid_after_body {
                let space = if attrs.is_empty() && partial.is_none() {
                    ""
                } else {
                    " "
                };
                a.bytes
                    .extend_from_slice(format!("{space}{uid}").as_bytes());
            }
            a.bytes.extend_from_slice(b")\r\n");
        }
        drop(s);
        a.bytes.extend(tagged(tag, "OK", "Fetch completed.").bytes);
        a
    }

    fn store(&mut self, tag: &str, by_uid: bool, args: &str) -> Answer {
        match &self.selected {
            None => return tagged(tag, "BAD", "No mailbox selected."),
            Some((_, true)) => return tagged(tag, "NO", "Mailbox is read-only."),
            Some(_) => {}
        }
        let mut words = args.splitn(3, ' ');
        let (set, op, flags) = (
            words.next().unwrap_or(""),
            words.next().unwrap_or("").to_ascii_uppercase(),
            words.next().unwrap_or(""),
        );
        let flags: Vec<String> = flags
            .trim_matches(|c| c == '(' || c == ')')
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let mut s = self.state();
        let max = if by_uid {
            s.inbox.last().map_or(0, |m| m.uid)
        } else {
            s.inbox.len() as u32
        };
        let mut a = Answer::default();
        for (i, m) in s.inbox.iter_mut().enumerate() {
            let seq = i as u32 + 1;
            if !in_set(set, if by_uid { m.uid } else { seq }, max) {
                continue;
            }
            if op.starts_with('+') {
                for f in &flags {
                    if !m.flags.iter().any(|g| g.eq_ignore_ascii_case(f)) {
                        m.flags.push(f.clone());
                    }
                }
            } else if op.starts_with('-') {
                m.flags
                    .retain(|g| !flags.iter().any(|f| f.eq_ignore_ascii_case(g)));
            } else {
                m.flags = flags.clone();
            }
            if !op.ends_with(".SILENT") {
                a.line(&format!(
                    "* {seq} FETCH (UID {} FLAGS ({}))",
                    m.uid,
                    m.flags.join(" ")
                ));
            }
        }
        drop(s);
        a.bytes.extend(tagged(tag, "OK", "Store completed.").bytes);
        a
    }

    fn expunge(&mut self, tag: &str, by_uid: bool, args: &str) -> Answer {
        match &self.selected {
            None => return tagged(tag, "BAD", "No mailbox selected."),
            Some((_, true)) => return tagged(tag, "NO", "Mailbox is read-only."),
            Some(_) => {}
        }
        let mut s = self.state();
        if by_uid && !s.capabilities.iter().any(|c| c == "UIDPLUS") {
            return tagged(tag, "BAD", "Unknown command UID EXPUNGE.");
        }
        let max = s.inbox.last().map_or(0, |m| m.uid);
        let mut a = Answer::default();
        let mut seq = 1;
        s.inbox.retain(|m| {
            let gone =
                m.flags.iter().any(|f| f == "\\Deleted") && (!by_uid || in_set(args, m.uid, max));
            if gone {
                a.line(&format!("* {seq} EXPUNGE"));
            } else {
                seq += 1;
            }
            !gone
        });
        drop(s);
        a.bytes
            .extend(tagged(tag, "OK", "Expunge completed.").bytes);
        a
    }

    /// `LIST "" pattern`: `*` (every mailbox) or one name exactly; `/` is the delimiter.
    fn list(&mut self, tag: &str, args: &str) -> Answer {
        let Some(pattern) = args.strip_prefix("\"\" ") else {
            return tagged(tag, "BAD", "Unsupported LIST.");
        };
        let pattern = unquote(pattern);
        let s = self.state();
        let mut a = Answer::default();
        let names = std::iter::once("INBOX".to_string()).chain(s.folders.keys().cloned());
        for name in names.filter(|n| pattern == "*" || *n == pattern) {
            let attr = s.special_use.get(&name).cloned().unwrap_or_default();
            a.line(&format!("* LIST ({attr}) \"/\" \"{name}\""));
        }
        drop(s);
        a.bytes.extend(tagged(tag, "OK", "List completed.").bytes);
        a
    }

    /// `UID SEARCH DELETED` (the one search aiopopd makes) or `ALL`.
    fn search(&mut self, tag: &str, args: &str) -> Answer {
        if self.selected.is_none() {
            return tagged(tag, "BAD", "No mailbox selected.");
        }
        let want_deleted = match args.to_ascii_uppercase().as_str() {
            "DELETED" => true,
            "ALL" => false,
            _ => return tagged(tag, "BAD", "Unsupported search."),
        };
        let s = self.state();
        let uids: Vec<String> = s
            .inbox
            .iter()
            .filter(|m| !want_deleted || m.flags.iter().any(|f| f == "\\Deleted"))
            .map(|m| m.uid.to_string())
            .collect();
        drop(s);
        let mut a = Answer::default();
        a.line(format!("* SEARCH {}", uids.join(" ")).trim_end());
        a.bytes.extend(tagged(tag, "OK", "Search completed.").bytes);
        a
    }

    fn copy(&mut self, tag: &str, is_move: bool, args: &str) -> Answer {
        if self.selected.is_none() {
            return tagged(tag, "BAD", "No mailbox selected.");
        }
        let (set, folder) = args.split_once(' ').unwrap_or((args, ""));
        let folder = unquote(folder);
        let mut s = self.state();
        if is_move && !s.capabilities.iter().any(|c| c == "MOVE") {
            return tagged(tag, "BAD", "Unknown command UID MOVE.");
        }
        if !s.folders.contains_key(&folder) {
            return tagged(tag, "NO", "[TRYCREATE] Mailbox doesn't exist.");
        }
        let max = s.inbox.last().map_or(0, |m| m.uid);
        let picked: Vec<Message> = s
            .inbox
            .iter()
            .filter(|m| in_set(set, m.uid, max))
            .cloned()
            .collect();
        let mut a = Answer::default();
        if is_move {
            let mut seq = 1;
            s.inbox.retain(|m| {
                let gone = in_set(set, m.uid, max);
                if gone {
                    a.line(&format!("* {seq} EXPUNGE"));
                } else {
                    seq += 1;
                }
                !gone
            });
        }
        s.folders.get_mut(&folder).unwrap().extend(picked);
        drop(s);
        a.bytes.extend(tagged(tag, "OK", "Done.").bytes);
        a
    }
}

fn tagged(tag: &str, status: &str, text: &str) -> Answer {
    let mut a = Answer::default();
    a.line(&format!("{tag} {status} {text}"));
    a
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `{n}` or `{n+}` at the end of a line: the length of the literal that follows.
fn literal_at_end(line: &[u8]) -> Option<(usize, bool)> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let inner = &body[open + 1..];
    let (digits, plus) = match inner.strip_suffix(b"+") {
        Some(d) => (d, true),
        None => (inner, false),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, plus))
}

/// IMAP astrings (atoms, quoted strings with `\` escapes, literals) from raw argument bytes.
fn astrings(mut s: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        while s.first() == Some(&b' ') {
            s = &s[1..];
        }
        if s.is_empty() {
            return out;
        }
        if s[0] == b'"' {
            let mut w = Vec::new();
            let mut i = 1;
            while i < s.len() && s[i] != b'"' {
                if s[i] == b'\\' && i + 1 < s.len() {
                    i += 1;
                }
                w.push(s[i]);
                i += 1;
            }
            out.push(w);
            s = &s[(i + 1).min(s.len())..];
        } else if s[0] == b'{' {
            let close = s.iter().position(|&b| b == b'}').unwrap_or(s.len() - 1);
            let n: usize = std::str::from_utf8(&s[1..close])
                .ok()
                .and_then(|d| d.trim_end_matches('+').parse().ok())
                .unwrap_or(0);
            let start = (close + 3).min(s.len());
            let end = (start + n).min(s.len());
            out.push(s[start..end].to_vec());
            s = &s[end..];
        } else {
            let end = s.iter().position(|&b| b == b' ').unwrap_or(s.len());
            out.push(s[..end].to_vec());
            s = &s[end..];
        }
    }
}

fn unquote(s: &str) -> String {
    let w = astrings(s.as_bytes());
    String::from_utf8_lossy(w.first().map_or(&[][..], Vec::as_slice)).into_owned()
}

/// `BODY.PEEK[]<offset.length>` (or `BODY[]<...>`) among the FETCH items.
fn parse_partial(items: &str) -> Option<(u64, u64)> {
    let i = items.find("BODY")?;
    let rest = &items[i..];
    let open = rest.find("[]")?;
    let rest = &rest[open + 2..];
    match rest.strip_prefix('<') {
        Some(r) => {
            let r = r.split('>').next()?;
            let (o, l) = r.split_once('.')?;
            Some((o.parse().ok()?, l.parse().ok()?))
        }
        None => Some((0, u64::MAX >> 1)),
    }
}

/// `(uid, offset)` of a command that fetches one message's body by UID from an offset.
pub fn body_fetch(command: &str) -> Option<(u32, u64)> {
    let rest = command
        .get(..10)
        .filter(|p| p.eq_ignore_ascii_case("UID FETCH "))
        .map(|_| &command[10..])?;
    let (set, items) = rest.split_once(' ')?;
    let (offset, _) = parse_partial(&items.to_ascii_uppercase())?;
    Some((set.parse().ok()?, offset))
}

/// Whether a command is a listing: FETCH or UID FETCH of RFC822.SIZE.
pub fn is_listing(command: &str) -> bool {
    let verb = verb_of(command);
    (verb == "FETCH" || verb == "UID FETCH") && command.to_ascii_uppercase().contains("RFC822.SIZE")
}

/// Whether `n` is in the IMAP sequence set `set` (`*` = `max`).
pub fn in_set(set: &str, n: u32, max: u32) -> bool {
    let num = |s: &str| {
        if s == "*" {
            Some(max)
        } else {
            s.parse::<u32>().ok()
        }
    };
    set.split(',').any(|part| match part.split_once(':') {
        Some((a, b)) => match (num(a), num(b)) {
            (Some(a), Some(b)) => (a.min(b)..=a.max(b)).contains(&n),
            _ => false,
        },
        None => num(part) == Some(n),
    })
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let s: Vec<u8> = s.iter().copied().filter(|&b| b != b'=').collect();
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in &s {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The forms a secret can take in a log: raw, and base64 at each of the three alignments it can
/// have inside a longer base64 text (e.g. SASL PLAIN's `\0user\0password`). Each form is the part
/// of the encoding that depends on the secret alone.
pub fn secret_forms(secret: &[u8]) -> Vec<String> {
    let mut forms = vec![String::from_utf8_lossy(secret).into_owned()];
    for pad in 0..3 {
        let mut data = vec![0u8; pad];
        data.extend_from_slice(secret);
        let enc = base64_encode(&data);
        // Characters that depend on padding bytes (the first ones) or on what follows (the last
        // group, possibly partial) are dropped.
        let start = (pad * 8).div_ceil(6);
        let full = ((pad + secret.len()) / 3) * 4;
        if full > start + 4 {
            forms.push(enc[start..full].to_string());
        }
    }
    forms
}

/// What an aiopopd run left behind.
#[derive(Debug)]
pub struct Finished {
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub status: ExitStatus,
    pub elapsed: Duration,
}

impl Finished {
    /// The status lines (`+OK ...`/`-ERR ...`) of the output, without their CRLF; multi-line
    /// bodies are skipped only in that their lines don't start with a status.
    pub fn status_lines(&self) -> Vec<String> {
        status_lines(&self.stdout)
    }

    /// No panic reached the log, and the process exited normally.
    pub fn assert_clean(&self) {
        assert!(
            !self.stderr.contains("internal error") && !self.stderr.contains("panicked"),
            "aiopopd panicked:\n{}",
            self.stderr
        );
        assert!(
            self.status.code().is_some(),
            "aiopopd was killed by a signal: {:?}\n{}",
            self.status,
            self.stderr
        );
    }
}

pub fn status_lines(out: &[u8]) -> Vec<String> {
    out.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| l.starts_with(b"+OK") || l.starts_with(b"-ERR"))
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect()
}

/// The built aiopopd on pipes (as inetd runs it), with stderr (the log, with `-l`) captured.
/// Input goes through a writer thread so that sending never blocks the test; every wait has a
/// deadline and kills the process when it passes.
pub struct Aiopopd {
    child: Child,
    input: Option<mpsc::Sender<Vec<u8>>>,
    writer: Option<JoinHandle<()>>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

fn drain(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]),
            }
        }
    })
}

fn feed(mut stdin: ChildStdin, rx: mpsc::Receiver<Vec<u8>>) -> JoinHandle<()> {
    thread::spawn(move || {
        for chunk in rx.iter() {
            if stdin.write_all(&chunk).is_err() {
                // The process stopped reading (it closed the session): drop the rest.
                for _ in rx.iter() {}
                return;
            }
        }
    })
}

impl Aiopopd {
    pub fn spawn(args: &[String]) -> Aiopopd {
        Aiopopd::spawn_with(Command::new(BIN).args(args))
    }

    /// Runs `cmd` (which must be aiopopd, perhaps under a wrapper) on pipes.
    pub fn spawn_with(cmd: &mut Command) -> Aiopopd {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start aiopopd");
        let (tx, rx) = mpsc::channel();
        let writer = feed(child.stdin.take().unwrap(), rx);
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            drain(child.stdout.take().unwrap(), stdout.clone()),
            drain(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Aiopopd {
            child,
            input: Some(tx),
            writer: Some(writer),
            stdout,
            stderr,
            readers,
            started: Instant::now(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn send(&self, bytes: &[u8]) {
        if let Some(tx) = &self.input {
            let _ = tx.send(bytes.to_vec());
        }
    }

    /// Closes stdin once everything sent so far has been written (the client half-closes).
    pub fn close_input(&mut self) {
        self.input = None;
    }

    pub fn stdout(&self) -> Vec<u8> {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits until the output holds `n` status lines; false at the deadline.
    pub fn wait_for_replies(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if status_lines(&self.stdout()).len() >= n {
                return true;
            }
            thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGKILL, as an OOM killer or an operator would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
    }

    /// Closes stdin and waits for the process to exit; panics (after killing it) if it takes
    /// longer than `within`: a hang.
    pub fn finish(mut self, within: Duration) -> Finished {
        self.close_input();
        let deadline = Instant::now() + within;
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "aiopopd did not exit within {within:?}\nstdout: {:?}\nstderr: {}",
                    String::from_utf8_lossy(&self.stdout()),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        let elapsed = self.started.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        Finished {
            stdout: self.stdout(),
            stderr: self.stderr(),
            status,
            elapsed,
        }
    }
}

impl Drop for Aiopopd {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs aiopopd with `args` on `script` (stdin closed after it) and waits at most `within`.
pub fn run_within(args: &[String], script: &[u8], within: Duration) -> Finished {
    let a = Aiopopd::spawn(args);
    a.send(script);
    a.finish(within)
}

/// Runs `cmd` (aiopopd) as inetd may: fds 0, 1 and 2 all one end of a Unix socket pair, so
/// whatever the process writes to stderr, the runtime's own messages included, reaches the
/// client. Sends `script`, half-closes, and reads until the process is gone; `stdout` is all the
/// client received, `stderr` is empty. Panics (after killing it) past `within`: a hang.
pub fn run_on_socket(cmd: &mut Command, script: &[u8], within: Duration) -> Finished {
    let (mut client, server) = UnixStream::pair().expect("socketpair");
    let fd = |s: &UnixStream| -> OwnedFd { s.try_clone().expect("clone the socket").into() };
    let mut child = cmd
        .stdin(Stdio::from(fd(&server)))
        .stdout(Stdio::from(fd(&server)))
        .stderr(Stdio::from(fd(&server)))
        .spawn()
        .expect("start aiopopd");
    // Only the child may hold the server end, or EOF would never come. The Command keeps the
    // copies it was given until it is dropped: overwrite them.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    drop(server);
    let started = Instant::now();
    let mut writer = client.try_clone().expect("clone the socket");
    let script = script.to_vec();
    let w = thread::spawn(move || {
        let _ = writer.write_all(&script);
        let _ = writer.shutdown(Shutdown::Write);
    });
    client
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let deadline = started + within;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "aiopopd did not exit within {within:?}\nreceived: {:?}",
                String::from_utf8_lossy(&received)
            );
        }
    }
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("aiopopd closed the socket but did not exit within {within:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let _ = w.join();
    Finished {
        stdout: received,
        stderr: String::new(),
        status,
        elapsed: started.elapsed(),
    }
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
