//! A private GNU Mailutils imap4d 3.15 instance per test: Debian's mailutils-imap4d,
//! libmailutils9 and mailutils-common unpacked under `target/imap-servers/imap4d` (see
//! debroot.rs; the libraries they link, libgsasl18 and libmariadb3 among them, are installed by
//! `.ci/run`), run from a configuration file generated in a temporary directory
//! (`--config-file`, which also keeps the site-wide /etc/mailutils.conf out).
//!
//! imap4d runs as inetd would run it (`--inetd`, one connection on stdin/stdout) behind
//! `systemd-socket-activate --inetd --accept` on a free loopback port. Not in daemon mode: the
//! user is found by the `virtdomain` module, which for a name without a domain looks the
//! domain up from the local address of file descriptor 0, and only in inetd mode is that the
//! connection. Its passwd-format files (`localhost` and `127.0.0.1`, for what 127.0.0.1
//! resolves to and for the address itself) in the temporary directory hold alice's crypt
//! password (checked by the `generic` module) and home; /etc/passwd and PAM are never used.
//! virtdomain users never change uid: the sessions run as whoever runs the tests.
//!
//! The INBOX is an mbox, `HOME/INBOX`; folders are mboxes beside it (personal namespace `""`,
//! delimiter `/`). Mail is delivered as a delivery agent does it: appended to the mbox file
//! under a dotlock, with a From_ line, LF line ends and `>From ` quoting.
//!
//! Things worth knowing (imap4d 3.15 with this config): capabilities `IMAP4rev1 NAMESPACE ID
//! IDLE LITERAL+ UNSELECT` and a long list of `AUTH=` (CRAM-MD5, SCRAM, DIGEST-MD5, ...) it
//! can't complete without a GSASL password file; no UIDPLUS, no MOVE; PERMANENTFLAGS has no
//! `\*` (no keywords). imap4d keeps its state in the mbox: when it writes the mailbox back (at
//! the end of a SELECT session that changed anything, `\Recent` included) it adds
//! `X-IMAPbase: UIDVALIDITY UIDNEXT` to the first message's header and `X-UID:` and `Status:`
//! to every message's, and from then on serves them as part of the message. A message a
//! delivery agent appended (no `X-UID:` yet) makes it start a new UIDVALIDITY, taken from the
//! clock, at every open until it writes the mailbox back; see [`Imap4d::deliver`].
#![allow(dead_code)]

use super::debroot;
use super::imapref::Account;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SKIP_VAR: &str = "AIOPOPD_SKIP_IMAP4D";
const PACKAGES: &[&str] = &["mailutils-imap4d", "libmailutils9", "mailutils-common"];
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a delivery waits for imap4d's dotlock on the mbox.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// The From_ line's date (ctime format); imap4d doesn't serve it.
const FROM_LINE: &[u8] = b"From sender@example.org Sat Jan  3 12:00:00 2026\n";

pub struct Imap4d {
    pub imap_port: u16,
    home: PathBuf,
    output: PathBuf,
    child: Option<Child>,
    // Last: removed after Drop has stopped the server.
    dir: tempfile::TempDir,
}

impl Imap4d {
    /// Starts an instance with alice / alice-pw and an empty INBOX; None if the developer set
    /// AIOPOPD_SKIP_IMAP4D=1.
    pub fn start() -> Option<Imap4d> {
        if debroot::skipped(SKIP_VAR) {
            return None;
        }
        let root = debroot::unpacked("imap4d", PACKAGES, SKIP_VAR);
        let mut last = String::new();
        // A port chosen free may be taken by the time systemd-socket-activate binds it: retry.
        for _ in 0..3 {
            match Imap4d::try_start(&root) {
                Ok(s) => return Some(s),
                Err(e) => last = e,
            }
        }
        panic!(
            "imap4d did not start (it runs behind systemd-socket-activate, Debian package \
             systemd, with the libraries .ci/run installs):\n{last}"
        );
    }

    fn try_start(root: &Path) -> Result<Imap4d, String> {
        let dir = tempfile::Builder::new()
            .prefix("imap4d-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let p = dir.path();
        let home = p.join("home/alice");
        fs::create_dir_all(&home).expect("mkdir home/alice");
        fs::create_dir_all(p.join("virtdomain")).expect("mkdir virtdomain");
        let hash = Command::new("openssl")
            .args(["passwd", "-6", "alice-pw"])
            .output()
            .expect("openssl passwd");
        let hash = String::from_utf8(hash.stdout).expect("utf-8 hash");
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let entry = format!(
            "alice:{}:{uid}:{gid}:alice:{}:/bin/false\n",
            hash.trim(),
            home.display()
        );
        for domain in ["localhost", "127.0.0.1"] {
            fs::write(p.join("virtdomain").join(domain), &entry).expect("write virtdomain");
        }
        let conf = p.join("imap4d.conf");
        fs::write(
            &conf,
            format!(
                "# Generated by tests/common/imap4d.rs\n\
                 logging {{ syslog no; }};\n\
                 auth {{ authorization virtdomain; authentication generic; }};\n\
                 virtdomain {{ passwd-dir \"{}\"; }};\n\
                 mailbox {{ mailbox-type mbox; }};\n\
                 tcp-wrappers {{ enable no; }};\n",
                p.join("virtdomain").display()
            ),
        )
        .expect("write imap4d.conf");
        // An empty INBOX, as a new account's.
        fs::write(home.join("INBOX"), b"").expect("create INBOX");

        let imap_port = debroot::free_port();
        let output = p.join("imap4d.out");
        let out_file = fs::File::create(&output).expect("create imap4d.out");
        let lib = root.join("usr/lib/x86_64-linux-gnu");
        let child = Command::new("systemd-socket-activate")
            .args(["--inetd", "--accept", "-l"])
            .arg(format!("127.0.0.1:{imap_port}"))
            .arg(format!("--setenv=LD_LIBRARY_PATH={}", lib.display()))
            .arg(root.join("usr/sbin/imap4d"))
            .arg("--inetd")
            .arg(format!("--config-file={}", conf.display()))
            .current_dir(p)
            .stdin(Stdio::null())
            .stdout(out_file.try_clone().expect("dup"))
            .stderr(out_file)
            // Every imap4d it spawns stays in this group: Drop kills them all.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run systemd-socket-activate (Debian package systemd): {e}")
            });
        let mut s = Imap4d {
            imap_port,
            home,
            output,
            child: Some(child),
            dir,
        };
        match s.wait_ready() {
            Ok(()) => Ok(s),
            Err(why) => Err(format!("{why}\n{}", s.output())),
        }
    }

    /// The port greets, and alice can log in (imap4d and its libraries load, the config is
    /// read, virtdomain finds her).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!("systemd-socket-activate exited with {st}"));
            }
            if greets(self.imap_port) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "port {} did not greet within {START_TIMEOUT:?}",
                    self.imap_port
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if logs_in(self.imap_port) {
            Ok(())
        } else {
            Err("alice's LOGIN was refused".into())
        }
    }

    /// What systemd-socket-activate and the imap4d processes wrote (their log, as syslog is
    /// off).
    pub fn output(&self) -> String {
        format!(
            "--- imap4d output ---\n{}",
            String::from_utf8_lossy(&fs::read(&self.output).unwrap_or_default())
        )
    }

    pub fn account(&self) -> Account {
        Account {
            port: self.imap_port,
            user: "alice".into(),
            password: "alice-pw".into(),
        }
    }

    /// The mbox file of a mailbox: `HOME/INBOX`, or `HOME/NAME` for a folder.
    pub fn mbox_path(&self, mailbox: &str) -> PathBuf {
        if mailbox.eq_ignore_ascii_case("INBOX") {
            self.home.join("INBOX")
        } else {
            self.home.join(mailbox)
        }
    }

    /// Appends the messages to the mailbox's mbox as a delivery agent would (see
    /// [`Imap4d::deliver_unrecorded`]), then SELECTs it once, as a mail client's first look
    /// would: imap4d then writes its UIDVALIDITY and the UIDs into the mbox, and serves the
    /// same octets and UIDVALIDITY to every session after (until the next delivery). Without
    /// that SELECT each session would see a UIDVALIDITY of its own, and the headers imap4d
    /// adds would appear between the harness's reading and aiopopd's.
    pub fn deliver(&self, mailbox: &str, messages: &[Vec<u8>]) {
        self.deliver_unrecorded(mailbox, messages);
        self.account().select(mailbox);
    }

    /// Appends each message to the mailbox's mbox file (created over IMAP first if it is a
    /// folder that doesn't exist), as a delivery agent does: under imap4d's dotlock
    /// (`MBOX.lock`), a From_ line, CRLF stored as LF, lines starting with "From " quoted as
    /// ">From ", a final line end added where missing, and an empty line after each message.
    /// Not over IMAP APPEND: the mbox an MDA writes (messages without imap4d's `X-UID:`) is
    /// what makes imap4d change UIDVALIDITY, and that is what aiopopd has to live with.
    pub fn deliver_unrecorded(&self, mailbox: &str, messages: &[Vec<u8>]) {
        let path = self.mbox_path(mailbox);
        if !path.exists() {
            self.create_mailbox(mailbox);
        }
        let mut data = Vec::new();
        for m in messages {
            data.extend_from_slice(FROM_LINE);
            data.extend_from_slice(&mbox_body(m));
            data.push(b'\n');
        }
        let _lock = DotLock::take(&path);
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {} for appending: {e}", path.display()));
        f.write_all(&data).expect("append to the mbox");
        f.sync_all().expect("fsync the mbox");
    }

    /// Creates a folder (an mbox beside INBOX), over IMAP.
    pub fn create_mailbox(&self, mailbox: &str) {
        self.account().create(mailbox);
    }
}

impl Drop for Imap4d {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first: an imap4d in a session then closes its mailbox.
            debroot::kill_group(&mut child, Duration::from_secs(2));
        }
    }
}

/// A message as it goes into an mbox: CRLF → LF, "From " lines quoted, a final LF.
fn mbox_body(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() + 16);
    let mut at_line_start = true;
    let mut i = 0;
    while i < m.len() {
        if at_line_start && m[i..].starts_with(b"From ") {
            out.push(b'>');
        }
        if m[i] == b'\r' && m.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(m[i]);
        at_line_start = m[i] == b'\n';
        i += 1;
    }
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out
}

#[test]
fn mbox_body_examples() {
    assert_eq!(
        mbox_body(b"Subject: x\r\n\r\nFrom here\r\nlast"),
        b"Subject: x\n\n>From here\nlast\n"
    );
    assert_eq!(mbox_body(b"a\rb\r\n"), b"a\rb\n");
}

/// A dotlock on an mbox (`MBOX.lock`, created exclusively), as mail delivery agents and
/// imap4d's default locker take it; removed on drop.
struct DotLock(PathBuf);

impl DotLock {
    fn take(mbox: &Path) -> DotLock {
        let mut name = mbox.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => return DotLock(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    assert!(
                        Instant::now() < deadline,
                        "{} held for {LOCK_TIMEOUT:?}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("create {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for DotLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn greets(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(tcp) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let ok = BufReader::new(&tcp).read_line(&mut line).is_ok() && line.starts_with("* OK");
    let _ = (&tcp).write_all(b"a LOGOUT\r\n");
    ok
}

/// One LOGIN as alice, answered OK.
fn logs_in(port: u16) -> bool {
    let Ok(tcp) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&tcp);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return false;
    }
    if (&tcp).write_all(b"a LOGIN alice alice-pw\r\n").is_err() {
        return false;
    }
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(n) if n > 0 && line.starts_with("a ") => {
                let _ = (&tcp).write_all(b"b LOGOUT\r\n");
                return line.starts_with("a OK");
            }
            Ok(n) if n > 0 => {}
            _ => return false,
        }
    }
}
