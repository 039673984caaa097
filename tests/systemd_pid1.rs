//! The shipped units under a real systemd (issue 15): a systemd booted as PID 1 of its own
//! namespaces (tests/common/realsystemd.rs) gets the binary, the certificate and the four units
//! installed the way README's "Deploying aiopopd" says, with only what an operator edits
//! changed by drop-ins (the IMAP server and greeting name on `ExecStart=`; here also the
//! listening ports, as 995 and 110 are the host's). Then, against a private Dovecot on the
//! host's loopback: a POP3S and an STLS session byte-exact, a failed login as
//! `journalctl -t aiopopd` shows it, 32 sessions at once (each checked for its sandbox while
//! running: dynamic user, no capabilities, seccomp, read-only system, memory and task limits),
//! `MaxConnectionsPerSource`, finished sessions collected, and the system-call filter enforced.
//!
//! Runs as root only; as a normal user it says loudly why it skips, and in CI (`CI` set) a
//! missing prerequisite fails it. The first run builds the Debian root (~1 min, once per
//! target directory); later runs take ~20 s.

mod common;

use common::dovecot::Dovecot;
use common::pop3::{expected_retr, replies, Reply, BIN};
use common::realsystemd::{self, System};
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Where the units expect the binary.
const INSTALLED_BIN: &str = "/usr/local/bin/aiopopd";
/// How long any one wait may take before it is a failure.
const DEADLINE: Duration = Duration::from_secs(30);
/// Users with mail; sessions are spread over them (Dovecot allows 10 per user and IP).
const USERS: usize = 10;
/// Concurrent sessions per source address and socket in the load step (below the units'
/// MaxConnectionsPerSource, so that none is refused), and the sources used for each socket.
const PER_SOURCE: usize = 8;
const LOAD_SOURCES: [(Mode, [u8; 2]); 2] = [(Mode::Tls, [11, 12]), (Mode::Stls, [13, 14])];
/// The range systemd allocates DynamicUser= uids from.
const DYNAMIC_UIDS: std::ops::RangeInclusive<u32> = 61184..=65519;

fn shipped(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// 127.0.0.`n`: every step connects from its own loopback addresses, so that its lines in the
/// journal and its count against MaxConnectionsPerSource are its own.
fn source(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// The root to boot, or `None` after saying loudly why this test can't run here. In CI a
/// missing prerequisite fails the test: no test may be skipped silently there.
fn root_or_skip() -> Option<PathBuf> {
    match realsystemd::prerequisites() {
        Ok(root) => Some(root),
        Err(why) if realsystemd::in_ci() => {
            panic!("CI is set, so this test must run, but it can't: {why}")
        }
        Err(why) => {
            // Past libtest's output capture, so that the skip shows without --nocapture.
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED systemd_pid1 (the units under a real systemd): {why}\n\
                 *** Run it as root (CI does: there a missing prerequisite fails it).\n"
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mail

/// `USERS` users, each with its own three messages: one full of lines to dot-stuff, one with
/// bare LF line ends, one without a final line end.
fn mail() -> (Dovecot, Vec<(String, String)>) {
    let users: Vec<(String, String)> = (0..USERS)
        .map(|i| (format!("user{i}"), format!("pw-{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = users
        .iter()
        .map(|(u, p)| (u.as_str(), p.as_str()))
        .collect();
    let d = Dovecot::start_with_users(&refs);
    for (user, _) in &users {
        let mut big = format!("Subject: big for {user}\r\n\r\n").into_bytes();
        for i in 0..2000 {
            big.extend_from_slice(format!("{}{user} {i}\r\n", [".", "", ".."][i % 3]).as_bytes());
        }
        d.deliver(user, "INBOX", &big);
        d.deliver(
            user,
            "INBOX",
            format!("Subject: lf\n\n{user}\n.\n").as_bytes(),
        );
        let last = format!("Subject: end\r\n\r\n{user} no final newline");
        d.deliver(user, "INBOX", last.as_bytes());
    }
    (d, users)
}

/// What RETR must send for each message of each user, from what Dovecot's IMAP serves.
fn expected(d: &Dovecot, users: &[(String, String)]) -> HashMap<String, Vec<Vec<u8>>> {
    users
        .iter()
        .map(|(u, p)| {
            let bodies = d.imap_bodies(u, p, "INBOX");
            (
                u.clone(),
                bodies.iter().map(|(_, b)| expected_retr(b)).collect(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Installing, as README's "Deploying aiopopd" says

/// What the installed system serves on: the sockets' ports, and the certificate (PEM) that
/// clients must trust.
struct Installed {
    pop3s: u16,
    stls: u16,
    /// The private Dovecot's IMAP port, on the units' `ExecStart=`.
    imap: u16,
    ca: Vec<u8>,
}

/// The shipped `ExecStart=` line, split at whitespace (the units use no quoting).
fn shipped_exec_start(unit: &str) -> Vec<String> {
    let text = shipped(&format!("systemd/{unit}"));
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ExecStart="))
        .collect();
    let [line] = lines[..] else {
        panic!("{unit}: want one ExecStart= line, found {lines:?}");
    };
    line.split_whitespace().map(str::to_string).collect()
}

/// The shipped command line with what README says an operator edits: the IMAP server (here
/// the private Dovecot's clear-text port on loopback: `-p`, no `-s`) and the greeting name.
/// Everything else is kept as shipped.
fn edited(argv: &[String], imap_port: u16) -> String {
    let mut out = Vec::new();
    let (mut host, mut name) = (false, false);
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-H" | "--imap-hostname" => {
                it.next();
                host = true;
                out.extend(["-H".into(), "127.0.0.1".into(), "-p".into()]);
                out.push(imap_port.to_string());
            }
            "-p" | "--imap-port" => {
                it.next();
            }
            "-s" | "--imap-ssl" => {}
            "-d" | "--hostname" => {
                it.next();
                name = true;
                out.extend(["-d".into(), "pop.test".into()]);
            }
            _ => out.push(a.clone()),
        }
    }
    assert!(host && name, "ExecStart= without -H or -d: {argv:?}");
    assert_eq!(out[0], INSTALLED_BIN, "the units run {INSTALLED_BIN}");
    out.join(" ")
}

/// A free port on every address (the sockets listen on all of them, as shipped).
fn free_port() -> u16 {
    std::net::TcpListener::bind("[::]:0")
        .or_else(|_| std::net::TcpListener::bind("0.0.0.0:0"))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Whether something listens on `port` (from /proc, so no probe starts a session).
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        fs::read_to_string(f).unwrap_or_default().lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.get(1).is_some_and(|a| a.ends_with(&want)) && w.get(3) == Some(&"0A")
        })
    })
}

fn install(sys: &System, d: &Dovecot) -> Installed {
    // 1. The binary.
    let bin = fs::read(BIN).expect("read the built aiopopd");
    sys.install(INSTALLED_BIN, &bin, 0o755);
    // 2. The certificate: the chain world-readable, the key root:root 0600.
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen");
    let ca = pair.cert.pem().into_bytes();
    sys.install("/etc/aiopopd/fullchain.pem", &ca, 0o644);
    let key = pair.signing_key.serialize_pem();
    sys.install("/etc/aiopopd/privkey.pem", key.as_bytes(), 0o600);
    // 3. The units as shipped, then what `systemctl edit` would write, then enable.
    let pop3s = free_port();
    let stls = std::iter::repeat_with(free_port)
        .find(|&p| p != pop3s)
        .expect("a second port");
    for (socket, service, port) in [
        ("aiopopd.socket", "aiopopd@.service", pop3s),
        ("aiopopd-stls.socket", "aiopopd-stls@.service", stls),
    ] {
        for unit in [socket, service] {
            let text = shipped(&format!("systemd/{unit}"));
            sys.install(
                &format!("/etc/systemd/system/{unit}"),
                text.as_bytes(),
                0o644,
            );
        }
        let exec = edited(&shipped_exec_start(service), d.imap_port);
        sys.install(
            &format!("/etc/systemd/system/{service}.d/override.conf"),
            format!("[Service]\nExecStart=\nExecStart={exec}\n").as_bytes(),
            0o644,
        );
        sys.install(
            &format!("/etc/systemd/system/{socket}.d/override.conf"),
            format!("[Socket]\nListenStream=\nListenStream={port}\n").as_bytes(),
            0o644,
        );
    }
    sys.ok(&["systemctl", "daemon-reload"]);
    sys.ok(&["systemctl", "enable", "--now", "aiopopd.socket"]);
    sys.ok(&["systemctl", "enable", "--now", "aiopopd-stls.socket"]);
    let active = sys.ok(&[
        "systemctl",
        "is-active",
        "aiopopd.socket",
        "aiopopd-stls.socket",
    ]);
    assert_eq!(active, "active\nactive\n", "the sockets");
    for port in [pop3s, stls] {
        assert!(listening(port), "nothing listens on {port}");
    }
    // `systemctl cat` shows the drop-ins in effect, as an operator would check.
    let cat = sys.ok(&["systemctl", "cat", "aiopopd@.service"]);
    assert!(cat.contains("aiopopd@.service.d/override.conf"), "{cat}");
    Installed {
        pop3s,
        stls,
        imap: d.imap_port,
        ca,
    }
}

// ---------------------------------------------------------------------------------------------
// A POP3 client from a chosen source address

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The POP3S socket: TLS from the first byte.
    Tls,
    /// The STLS socket: clear text, then STLS.
    Stls,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<native_tls::TlsStream<TcpStream>>),
    Gone,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Gone => Ok(0),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Gone => Ok(()),
        }
    }
}

type Res<T> = Result<T, String>;

/// A TCP connection to 127.0.0.1:`port` from `from` (a loopback address).
fn tcp_from(from: Ipv4Addr, port: u16) -> Res<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| format!("socket: {e}"))?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(from, 0)).into())
        .map_err(|e| format!("bind {from}: {e}"))?;
    let to = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    s.connect_timeout(&to.into(), DEADLINE)
        .map_err(|e| format!("connect from {from} to {port}: {e}"))?;
    let tcp: TcpStream = s.into();
    tcp.set_read_timeout(Some(DEADLINE))
        .and_then(|_| tcp.set_write_timeout(Some(DEADLINE)))
        .map_err(|e| format!("timeouts: {e}"))?;
    Ok(tcp)
}

/// One session, recorded: what was sent (`script`) and received (`transcript`), so that
/// `common::pop3::replies` can split it strictly.
struct Client {
    stream: Stream,
    pending: Vec<u8>,
    transcript: Vec<u8>,
    script: String,
}

impl Client {
    /// Connects from `from`, handshakes (POP3S) and reads the greeting; with STLS, also sends
    /// STLS and handshakes.
    fn connect(from: Ipv4Addr, port: u16, mode: Mode, ca: &[u8]) -> Res<Client> {
        let mut c = Client::plain(from, port)?;
        if mode == Mode::Tls {
            c.start_tls(ca)?;
        }
        let greeting = c.line()?;
        if !greeting.starts_with("+OK pop.test ") {
            return Err(format!("greeting: {greeting:?}"));
        }
        if mode == Mode::Stls {
            c.stls(ca)?;
        }
        Ok(c)
    }

    /// Connects without reading anything.
    fn plain(from: Ipv4Addr, port: u16) -> Res<Client> {
        Ok(Client {
            stream: Stream::Plain(tcp_from(from, port)?),
            pending: Vec::new(),
            transcript: Vec::new(),
            script: String::new(),
        })
    }

    fn stls(&mut self, ca: &[u8]) -> Res<()> {
        let ok = self.command("STLS")?;
        if !ok.starts_with("+OK") || !self.pending.is_empty() {
            return Err(format!("STLS: {ok:?}"));
        }
        self.start_tls(ca)
    }

    fn start_tls(&mut self, ca: &[u8]) -> Res<()> {
        let cert = native_tls::Certificate::from_pem(ca).map_err(|e| format!("CA: {e}"))?;
        let connector = native_tls::TlsConnector::builder()
            .add_root_certificate(cert)
            .build()
            .map_err(|e| format!("TLS connector: {e}"))?;
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err("TLS twice".into());
        };
        let tls = connector
            .connect("localhost", tcp)
            .map_err(|e| format!("TLS handshake: {e}"))?;
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// One CRLF-terminated line (kept in the transcript).
    fn line(&mut self) -> Res<String> {
        loop {
            if let Some(i) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.pending.drain(..i + 2).collect();
                self.transcript.extend_from_slice(&line);
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(format!(
                        "closed; got {:?}",
                        String::from_utf8_lossy(&self.transcript)
                    ))
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    fn send(&mut self, cmds: &str) -> Res<()> {
        let data = format!("{cmds}\r\n");
        self.script.push_str(&data);
        self.stream
            .write_all(data.as_bytes())
            .and_then(|_| self.stream.flush())
            .map_err(|e| format!("write: {e}"))
    }

    /// CAPA: the status line must be +OK; returns the capability lines, one per line.
    fn capa(&mut self) -> Res<String> {
        let status = self.command("CAPA")?;
        if !status.starts_with("+OK") {
            return Err(format!("CAPA: {status}"));
        }
        let mut body = String::new();
        loop {
            let l = self.line()?;
            if l == "." {
                return Ok(body);
            }
            body.push_str(&l);
            body.push('\n');
        }
    }

    /// Sends a command with a one-line answer and returns that answer.
    fn command(&mut self, cmd: &str) -> Res<String> {
        self.send(cmd)?;
        self.line()
    }

    fn login(&mut self, user: &str, password: &str) -> Res<()> {
        for cmd in [format!("USER {user}"), format!("PASS {password}")] {
            let reply = self.command(&cmd)?;
            if !reply.starts_with("+OK") {
                return Err(format!("{cmd}: {reply}"));
            }
        }
        Ok(())
    }

    /// Sends the rest of the session at once (ending with QUIT) and reads until the server
    /// closes. Returns every reply of the session, greeting first.
    fn finish(mut self, cmds: &[String]) -> Res<Vec<Reply>> {
        self.send(&cmds.join("\r\n"))?;
        let mut rest = std::mem::take(&mut self.pending);
        // A TLS peer that closes without close_notify shows as an error: the end, too. A
        // truncated session shows in the replies.
        let _ = self.stream.read_to_end(&mut rest);
        self.transcript.extend_from_slice(&rest);
        Ok(replies(&self.transcript, &self.script))
    }
}

/// A logged-in session's remaining commands: STAT, RETR of every message, QUIT.
fn retrieve_all(n: usize) -> Vec<String> {
    let mut cmds = vec!["STAT".to_string()];
    cmds.extend((1..=n).map(|i| format!("RETR {i}")));
    cmds.push("QUIT".into());
    cmds
}

/// Checks a session's replies: `lead` replies after the greeting (STLS), the login, STAT, every
/// RETR byte-exact, QUIT.
fn check_session(r: &[Reply], lead: usize, want: &[Vec<u8>]) -> Res<()> {
    let n = want.len();
    let expect_len = 1 + lead + 2 + 1 + n + 1;
    if r.len() != expect_len {
        return Err(format!("{} replies, want {expect_len}: {r:?}", r.len()));
    }
    if let Some(bad) = r.iter().find(|x| !x.ok()) {
        return Err(format!("failed: {}", bad.status));
    }
    let stat = &r[1 + lead + 2];
    if !stat.status.starts_with(&format!("+OK {n} ")) {
        return Err(format!("STAT: {}, want {n} messages", stat.status));
    }
    for (i, body) in want.iter().enumerate() {
        if r[1 + lead + 3 + i].body.as_deref() != Some(&body[..]) {
            return Err(format!("RETR {} differs", i + 1));
        }
    }
    Ok(())
}

/// Whether a log line names `ip` as `rip=`. The shipped `ListenStream=PORT` is a dual-stack
/// socket, which sees IPv4 clients as `::ffff:a.b.c.d`; aiopopd logs them as IPv4 (what
/// fail2ban bans).
fn rip_is(line: &str, ip: Ipv4Addr) -> bool {
    line.contains(&format!(" rip={ip} "))
}

// ---------------------------------------------------------------------------------------------
// The steps

/// One full session on each socket, byte-exact; each ends with a `session end:` line.
fn one_session_each(sys: &System, at: &Installed, want: &HashMap<String, Vec<Vec<u8>>>) {
    let w = &want["user0"];
    let mut c = Client::connect(source(2), at.pop3s, Mode::Tls, &at.ca).expect("POP3S");
    let capa = c.capa().expect("CAPA");
    assert!(
        capa.contains("USER\n") && !capa.contains("STLS"),
        "CAPA over TLS: {capa}"
    );
    c.login("user0", "pw-0").expect("POP3S login");
    let mut r = c.finish(&retrieve_all(w.len())).expect("POP3S session");
    r.remove(1); // CAPA
    check_session(&r, 0, w).unwrap_or_else(|e| panic!("POP3S session: {e}"));

    // STLS: no password before TLS, then the same session.
    let mut c = Client::plain(source(3), at.stls).expect("connect to the STLS socket");
    let greeting = c.line().expect("greeting");
    assert!(greeting.starts_with("+OK pop.test "), "{greeting}");
    let capa = c.capa().expect("CAPA");
    assert!(
        capa.contains("STLS\n") && !capa.contains("USER\n"),
        "CAPA before STLS: {capa}"
    );
    let refused = c.command("USER user0").expect("USER before STLS");
    assert!(
        refused.starts_with("-ERR [AUTH]"),
        "USER before STLS: {refused}"
    );
    c.stls(&at.ca).expect("STLS");
    c.login("user0", "pw-0").expect("login after STLS");
    let r = c.finish(&retrieve_all(w.len())).expect("STLS session");
    // Greeting, CAPA, USER (refused), STLS: check from the STLS reply on.
    check_session(&r[3..], 0, w).unwrap_or_else(|e| panic!("STLS session: {e}"));

    let log = sys.wait_journal(&["-t", "aiopopd", "-o", "cat"], DEADLINE, |t| {
        t.lines()
            .filter(|l| l.starts_with("session end:") && l.contains(" outcome=quit"))
            .count()
            >= 2
    });
    for ip in [source(2), source(3)] {
        assert!(
            log.lines().any(|l| l.starts_with("session end:")
                && rip_is(l, ip)
                && l.contains(" user=user0 listed=3 retrieved=3 deleted=0 ")
                && l.ends_with(" outcome=quit")),
            "no session end line for {ip}:\n{log}"
        );
    }
}

/// A wrong password: `-ERR [AUTH]` for the client, a `login failed:` line in the journal at
/// warning priority, facility mail, tagged aiopopd, with the client's address, and no password.
fn failed_login(sys: &System, at: &Installed) {
    let from = source(4);
    let mut c = Client::connect(from, at.pop3s, Mode::Tls, &at.ca).expect("POP3S");
    assert!(c.command("USER user1").unwrap().starts_with("+OK"));
    let reply = c.command("PASS wrong-secret-42").expect("PASS");
    assert_eq!(reply, "-ERR [AUTH] Authentication failed.");
    assert!(c.command("QUIT").unwrap().starts_with("+OK"));

    let wanted = |t: &str| {
        t.lines()
            .any(|l| l.starts_with("login failed: user=user1 ") && rip_is(l, from))
    };
    // As README's step 5 reads the failures: `journalctl -t aiopopd -p warning`.
    let args = ["-t", "aiopopd", "-p", "warning", "-o", "cat"];
    let warnings = sys.wait_journal(&args, DEADLINE, wanted);
    assert!(
        wanted(&warnings),
        "no login failed line from {from}:\n{warnings}"
    );
    let everything = sys.journal(&[]);
    assert!(
        !everything.contains("wrong-secret-42"),
        "a password in the journal"
    );
    assert!(
        !warnings.contains("session end:"),
        "info lines at warning priority (the <N> prefixes not read):\n{warnings}"
    );
    // SyslogFacility=mail: the fail2ban jail and rsyslog's mail.log rely on it.
    let mail = sys.journal(&[
        "-t",
        "aiopopd",
        "-p",
        "warning",
        "SYSLOG_FACILITY=2",
        "-o",
        "cat",
    ]);
    assert!(wanted(&mail), "the line is not facility mail:\n{mail}");
}

/// The pids of the aiopopd processes running in this system's services (found through their
/// cgroups, so that other aiopopd processes on the host don't count).
fn session_pids(sys: &System) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let cgroup = fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if comm.trim() == "aiopopd"
            && cgroup.lines().any(|l| {
                l.contains(sys.cgroup_name())
                    && (l.contains("/aiopopd@") || l.contains("/aiopopd-stls@"))
            })
        {
            pids.push(pid);
        }
    }
    pids
}

/// A running session process is sandboxed as the unit says: a dynamic user, no new
/// privileges, seccomp, no capabilities, a read-only system and private /tmp, MemoryMax=128M
/// and TasksMax=8 applied to its cgroup.
fn check_sandbox(pid: u32) -> Res<()> {
    let read = |f: &str| {
        fs::read_to_string(format!("/proc/{pid}/{f}")).map_err(|e| format!("/proc/{pid}/{f}: {e}"))
    };
    let status = read("status")?;
    let field = |name: &str| -> Res<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
    };
    for id in ["Uid", "Gid"] {
        let v = field(id)?;
        let ids: Vec<u32> = v
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if ids.len() != 4 || !ids.iter().all(|i| DYNAMIC_UIDS.contains(i) && *i == ids[0]) {
            return Err(format!("{id}: {v}: not a dynamic user"));
        }
    }
    for (name, want) in [
        ("NoNewPrivs", "1"),
        ("Seccomp", "2"),
        ("CapInh", "0000000000000000"),
        ("CapPrm", "0000000000000000"),
        ("CapEff", "0000000000000000"),
        ("CapBnd", "0000000000000000"),
        ("CapAmb", "0000000000000000"),
    ] {
        let got = field(name)?;
        if got != want {
            return Err(format!("{name}: {got}, want {want}"));
        }
    }
    let mounts = read("mountinfo")?;
    let mount_opts = |point: &str| {
        mounts.lines().rev().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.get(4) == Some(&point)).then(|| w.get(5).map_or(String::new(), |o| o.to_string()))
        })
    };
    match mount_opts("/") {
        Some(o) if o.split(',').any(|x| x == "ro") => {}
        other => return Err(format!("/ is not read-only: {other:?}")),
    }
    if mount_opts("/tmp").is_none() {
        return Err("no private /tmp".into());
    }
    let cgroups = read("cgroup")?;
    let path_in = |controller: &str| {
        cgroups.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, c, p) = (f.next()?, f.next()?, f.next()?);
            c.split(',').any(|x| x == controller).then(|| p.to_string())
        })
    };
    for (controller, file, want) in [
        ("memory", "memory.limit_in_bytes", "134217728"),
        ("pids", "pids.max", "8"),
    ] {
        let p = path_in(controller).ok_or_else(|| format!("no {controller} cgroup"))?;
        let f = format!("/sys/fs/cgroup/{controller}{p}/{file}");
        let got = fs::read_to_string(&f).map_err(|e| format!("{f}: {e}"))?;
        if got.trim() != want {
            return Err(format!("{f}: {}, want {want}", got.trim()));
        }
    }
    Ok(())
}

/// `PER_SOURCE` sessions from each of `LOAD_SOURCES` on both sockets, all logged in at the
/// same time; while they are, every session's process is checked for its sandbox and
/// `systemctl list-units` shows them; then each retrieves every message byte-exact.
fn concurrent_sessions(
    sys: &System,
    at: &Installed,
    users: &[(String, String)],
    want: &HashMap<String, Vec<Vec<u8>>>,
) -> usize {
    let total: usize = LOAD_SOURCES.iter().map(|(_, s)| s.len() * PER_SOURCE).sum();
    let all_in = Arc::new(Barrier::new(total + 1));
    let go = Arc::new(Barrier::new(total + 1));
    let mut handles = Vec::new();
    for (mode, sources) in LOAD_SOURCES {
        let port = if mode == Mode::Tls { at.pop3s } else { at.stls };
        for s in sources {
            for _ in 0..PER_SOURCE {
                let (user, password) = users[handles.len() % users.len()].clone();
                let want = want[&user].clone();
                let (ca, all_in, go) = (at.ca.clone(), all_in.clone(), go.clone());
                handles.push(thread::spawn(move || -> Res<()> {
                    let logged_in =
                        Client::connect(source(s), port, mode, &ca).and_then(|mut c| {
                            c.login(&user, &password)?;
                            Ok(c)
                        });
                    all_in.wait();
                    go.wait();
                    let r = logged_in?.finish(&retrieve_all(want.len()))?;
                    let lead = usize::from(mode == Mode::Stls);
                    check_session(&r, lead, &want).map_err(|e| format!("{user}: {e}"))
                }));
            }
        }
    }
    all_in.wait();
    // Every session is logged in (or has failed) now: look at them while they run.
    let looked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Res<()> {
        let units = sys.ok(&[
            "systemctl",
            "list-units",
            "--no-legend",
            "--plain",
            "--state=running",
            "aiopopd@*",
            "aiopopd-stls@*",
        ]);
        let running = units.lines().count();
        if running < total {
            return Err(format!(
                "{running} session units running, want {total}:\n{units}"
            ));
        }
        let pids = session_pids(sys);
        if pids.len() < total {
            return Err(format!("{} session processes, want {total}", pids.len()));
        }
        for pid in pids {
            check_sandbox(pid).map_err(|e| format!("session process {pid}: {e}"))?;
        }
        Ok(())
    }));
    go.wait();
    let failures: Vec<String> = handles
        .into_iter()
        .enumerate()
        .filter_map(|(i, h)| match h.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("session {i}: {e}")),
            Err(_) => Some(format!("session {i}: panicked")),
        })
        .collect();
    match looked {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("while {total} sessions ran: {e}"),
        Err(p) => std::panic::resume_unwind(p),
    }
    assert!(
        failures.is_empty(),
        "{} of {total} concurrent sessions failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    total
}

/// `MaxConnectionsPerSource` as shipped: that many sessions from one address are served, the
/// next is closed at once (and systemd logs why), another address is still served, and once
/// the sessions end the first address is served again.
fn max_connections_per_source(sys: &System, at: &Installed) {
    let text = shipped("systemd/aiopopd.socket");
    let limit: usize = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("MaxConnectionsPerSource="))
        .and_then(|v| v.trim().parse().ok())
        .expect("aiopopd.socket: MaxConnectionsPerSource=N");
    let (busy, other) = (source(21), source(22));
    let held: Vec<Client> = (0..limit)
        .map(|i| {
            Client::connect(busy, at.pop3s, Mode::Tls, &at.ca)
                .unwrap_or_else(|e| panic!("connection {} of {limit} from {busy}: {e}", i + 1))
        })
        .collect();
    // One more from the same address: accepted by systemd and closed at once, no greeting.
    let mut extra = tcp_from(busy, at.pop3s).expect("connect");
    let mut got = Vec::new();
    let started = Instant::now();
    let _ = extra.read_to_end(&mut got);
    assert!(
        got.is_empty() && started.elapsed() < DEADLINE,
        "connection {} from {busy} was served: {:?}",
        limit + 1,
        String::from_utf8_lossy(&got)
    );
    let mut c = Client::connect(other, at.pop3s, Mode::Tls, &at.ca)
        .unwrap_or_else(|e| panic!("another address while {busy} is at its limit: {e}"));
    assert!(c.command("QUIT").unwrap().starts_with("+OK"));
    // systemd counts the refused connection in: one over the limit.
    let needle = format!(
        "Too many incoming connections ({}) from source {busy}, dropping connection.",
        limit + 1
    );
    let log = sys.wait_journal(&["-u", "aiopopd.socket", "-o", "cat"], DEADLINE, |t| {
        t.contains(&needle)
    });
    assert!(
        log.contains(&needle),
        "systemd didn't log the refusal:\n{log}"
    );

    for mut c in held {
        assert!(c.command("QUIT").unwrap().starts_with("+OK"));
    }
    // The instances need a moment to stop; until then they still count.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match Client::connect(busy, at.pop3s, Mode::Tls, &at.ca) {
            Ok(mut c) => {
                assert!(c.command("QUIT").unwrap().starts_with("+OK"));
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "{busy} not served again after its sessions ended: {e}"
            ),
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// No session unit is left over, failed or not (CollectMode=inactive-or-failed), nothing
/// failed, and both sockets are still up.
fn all_collected(sys: &System) {
    let list = [
        "systemctl",
        "list-units",
        "--all",
        "--no-legend",
        "--plain",
        "aiopopd@*",
        "aiopopd-stls@*",
    ];
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = sys.ok(&list);
        if left.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "session units left over:\n{left}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let failed = sys.ok(&[
        "systemctl",
        "list-units",
        "--failed",
        "--no-legend",
        "--plain",
    ]);
    assert!(failed.trim().is_empty(), "failed units:\n{failed}");
    let active = sys.ok(&[
        "systemctl",
        "is-active",
        "aiopopd.socket",
        "aiopopd-stls.socket",
    ]);
    assert_eq!(active, "active\nactive\n", "the sockets at the end");
}

/// The system-call filter is enforced, not just accepted: with `connect` denied by one more
/// drop-in, the login can't reach IMAP (`-ERR [SYS/TEMP]`, EPERM in the journal).
fn syscall_filter_is_enforced(sys: &System, at: &Installed) {
    let dropin = "/etc/systemd/system/aiopopd-stls@.service.d/zz-deny-connect.conf";
    sys.install(dropin, b"[Service]\nSystemCallFilter=~connect\n", 0o644);
    sys.ok(&["systemctl", "daemon-reload"]);
    let from = source(31);
    let mut c = Client::connect(from, at.stls, Mode::Stls, &at.ca).expect("STLS");
    assert!(c.command("USER user2").unwrap().starts_with("+OK"));
    let reply = c.command("PASS pw-2").expect("PASS");
    assert!(
        reply.starts_with("-ERR [SYS/TEMP]"),
        "login without connect(2): {reply}"
    );
    let _ = c.command("QUIT");
    let denied = |t: &str| {
        t.lines().any(|l| {
            l.contains(&format!("connecting to 127.0.0.1:{}", at.imap))
                && l.contains("Operation not permitted")
        })
    };
    let log = sys.wait_journal(&["-t", "aiopopd", "-o", "cat"], DEADLINE, denied);
    assert!(denied(&log), "no EPERM from connect(2) in the log:\n{log}");
    fs::remove_file(sys.path(dropin)).expect("remove the drop-in");
    sys.ok(&["systemctl", "daemon-reload"]);
}

#[test]
fn the_shipped_units_serve_pop3_under_a_real_systemd_as_pid1() {
    let Some(root) = root_or_skip() else {
        return;
    };
    let started = Instant::now();
    let mut steps = Vec::new();
    let mut step = |name: &str, since: &mut Instant| {
        steps.push(format!("{name} {:.1?}", since.elapsed()));
        *since = Instant::now();
    };
    let mut t = Instant::now();
    let (d, users) = mail();
    let want = expected(&d, &users);
    step("mail", &mut t);
    let sys = System::boot(&root);
    step("boot", &mut t);
    let at = install(&sys, &d);
    step("install", &mut t);
    one_session_each(&sys, &at, &want);
    step("POP3S+STLS", &mut t);
    failed_login(&sys, &at);
    step("failed login", &mut t);
    let n = concurrent_sessions(&sys, &at, &users, &want);
    step(&format!("{n} concurrent"), &mut t);
    max_connections_per_source(&sys, &at);
    step("per source", &mut t);
    syscall_filter_is_enforced(&sys, &at);
    step("seccomp", &mut t);
    all_collected(&sys);
    step("collected", &mut t);
    drop(sys);
    step("poweroff and cleanup", &mut t);
    println!("{} in {:.1?}", steps.join(", "), started.elapsed());
}
