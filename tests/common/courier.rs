//! A private Courier-IMAP 5.0 instance per test: Debian's courier-imap, courier-base and
//! courier-authlib unpacked under `target/imap-servers/courier` (see debroot.rs). Courier's
//! paths are compiled in (the authdaemon socket /run/courier/authdaemon/socket,
//! /etc/courier/authdaemonrc, the userdb, the binaries under /usr/lib/courier), so it runs in a
//! private mount and PID namespace (`unshare -m -p`): read-only overlays put the unpacked /usr
//! and this instance's /etc (courier/, and passwd and group with the `courier` user Debian's
//! postinst would add) over the system's, and /run is a fresh tmpfs. Nothing outside the
//! namespace changes; killing its first process kills every process in it (couriertcpd leaves
//! the process group, so a process group alone wouldn't do).
//!
//! One authdaemond (module authuserdb, users from a generated userdb) and two `couriertcpd`
//! listeners on free loopback ports, both running imaplogin → imapd: `imap_port`, configured by
//! [`Options`], and `ref_port`, always allowing plaintext, through which the harness reads
//! flags and bodies back (imapref.rs). Mail is delivered by writing Maildir files, as an MDA
//! would (LF line ends).
//!
//! Needs root (mounts). Things worth knowing (Courier-IMAP 5.0.13 with this config): folders
//! are `INBOX.NAME` with '.' as delimiter, stored on disk as `.NAME` in UTF-8; no MOVE
//! capability; keywords are kept (`IMAP_KEYWORDS=1`); after LOGIN imaplogin execs imapd, and
//! commands pipelined behind LOGIN are never answered; CREATE of an existing folder answers
//! only "Cannot create this folder."; `-maxperip=20` connections per address on `imap_port`,
//! the 21st closed before the greeting; `IMAP_TLS_REQUIRED=1` gives LOGINDISABLED only with
//! STARTTLS on (without, logins in clear just work); imaplogin runs couriertls as the user
//! `courier`, which must be able to read the key; in a Maildir never SELECTed, EXAMINE
//! numbers the mail without recording it, under a UIDVALIDITY from the clock (see
//! [`Courier::deliver`]).
#![allow(dead_code)]

use super::debroot;
use super::imapref::Account;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const SKIP_VAR: &str = "AIOPOPD_SKIP_COURIER";
const PACKAGES: &[&str] = &[
    "courier-imap",
    "courier-base",
    "courier-authlib",
    "courier-authlib-userdb",
];
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections per address Courier allows on `imap_port` (couriertcpd -maxperip).
pub const MAXPERIP: usize = 20;

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// LOGIN in clear on `imap_port` (else `IMAP_TLS_REQUIRED=1`, effective only with `tls`).
    pub plaintext: bool,
    /// STARTTLS with a certificate (else `IMAP_STARTTLS=NO`).
    pub tls: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            plaintext: true,
            tls: true,
        }
    }
}

pub struct Courier {
    pub imap_port: u16,
    pub ref_port: u16,
    cert: PathBuf,
    output: PathBuf,
    maildir: PathBuf,
    child: Option<Child>,
    // Last: removed after Drop has stopped the server.
    dir: tempfile::TempDir,
}

const CAPABILITY: &str =
    "IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT THREAD=REFERENCES SORT QUOTA IDLE";

impl Courier {
    /// Starts an instance with alice / alice-pw, plaintext logins and STARTTLS; None if the
    /// developer set AIOPOPD_SKIP_COURIER=1.
    pub fn start() -> Option<Courier> {
        Courier::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Option<Courier> {
        if debroot::skipped(SKIP_VAR) {
            return None;
        }
        assert!(
            debroot::is_root(),
            "the Courier tests need root (Courier's paths are compiled in; it runs in a \
             private mount namespace); set {SKIP_VAR}=1 to skip them"
        );
        let root = debroot::unpacked("courier", PACKAGES, SKIP_VAR);
        let mut last = String::new();
        for _ in 0..3 {
            match Courier::try_start(&root, opts) {
                Ok(c) => return Some(c),
                Err(e) => last = e,
            }
        }
        panic!(
            "Courier did not start (it runs in a private mount and PID namespace with overlay \
             mounts: `unshare -m -p` must be allowed, as for root outside an unprivileged \
             container):\n{last}"
        );
    }

    fn try_start(root: &Path, opts: Options) -> Result<Courier, String> {
        let (_, uid, gid) = debroot::mail_account();
        let dir = tempfile::Builder::new()
            .prefix("courier-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let p = dir.path();
        let d = p.display().to_string();
        let r = root.display().to_string();
        fs::create_dir_all(p.join("etc/courier")).expect("mkdir etc/courier");
        let maildir = p.join("home/alice/Maildir");
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(maildir.join(sub)).expect("mkdir Maildir");
        }
        let (cert, key) = debroot::self_signed(p);
        // couriertls wants the key and the certificate in one file.
        let pem = p.join("etc/courier/imapd.pem");
        fs::write(
            &pem,
            [fs::read(&key).expect("key"), fs::read(&cert).expect("cert")].concat(),
        )
        .expect("write imapd.pem");
        fs::write(
            p.join("etc/courier/authdaemonrc"),
            "authmodulelist=\"authuserdb\"\ndaemons=1\n\
             authdaemonvar=/run/courier/authdaemon\nDEBUG_LOGIN=0\nDEFAULTOPTIONS=\"\"\n",
        )
        .expect("write authdaemonrc");
        let hash = Command::new("openssl")
            .args(["passwd", "-6", "alice-pw"])
            .output()
            .expect("openssl passwd");
        let hash = String::from_utf8(hash.stdout).expect("utf-8 hash");
        // imaplogin runs couriertls as the user `courier`, which Debian's postinst would
        // create: add it (as the mail account) to the namespace's own /etc/passwd and group,
        // and let it read the key.
        let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        fs::write(
            p.join("etc/passwd"),
            format!("{passwd}courier:x:{uid}:{gid}:courier:/nonexistent:/usr/sbin/nologin\n"),
        )
        .expect("write etc/passwd");
        let group = fs::read_to_string("/etc/group").expect("read /etc/group");
        fs::write(p.join("etc/group"), format!("{group}courier:x:{gid}:\n"))
            .expect("write etc/group");
        fs::set_permissions(&pem, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod imapd.pem");
        debroot::chown_mail(&pem);
        let userdb = p.join("etc/courier/userdb");
        fs::write(
            &userdb,
            format!(
                "alice\tuid={uid}|gid={gid}|home={d}/home/alice|mail={d}/home/alice/Maildir|\
                 systempw={}\n",
                hash.trim()
            ),
        )
        .expect("write userdb");
        // makeuserdb refuses a userdb readable by others.
        fs::set_permissions(&userdb, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod userdb");
        debroot::chown_mail(&p.join("home"));
        fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod dir");

        let (imap_port, ref_port) = (debroot::free_port(), debroot::free_port());
        let env = |tls_required: bool, starttls: bool| {
            format!(
                "env -i PATH=/usr/bin:/bin IMAP_CAPABILITY='{CAPABILITY}' \
                 IMAP_CAPABILITY_TLS='{CAPABILITY} AUTH=PLAIN' IMAP_STARTTLS={} \
                 IMAP_TLS_REQUIRED={} IMAP_KEYWORDS=1 IMAP_ACL=1 IMAP_USELOCKS=1 \
                 IMAP_UMASK=022 COURIERTLS=/usr/bin/couriertls TLS_CERTFILE={d}/etc/courier/imapd.pem \
                 TLS_VERIFYPEER=NONE TLS_PROTOCOL=TLS1_2+",
                if starttls { "YES" } else { "NO" },
                u8::from(tls_required)
            )
        };
        let tcpd = |port: u16, max_per_ip: usize| {
            format!(
                "/usr/sbin/couriertcpd -address=127.0.0.1 -maxprocs=100 -maxperip={max_per_ip} \
                 -nodnslookup -noidentlookup {port} /usr/lib/courier/courier/imaplogin \
                 /usr/bin/imapd Maildir"
            )
        };
        let script = format!(
            "# Generated by tests/common/courier.rs; runs in its own mount namespace.\n\
             set -e\n\
             mount -t overlay overlay -o lowerdir={r}/usr:/usr /usr\n\
             /usr/sbin/makeuserdb -f {d}/etc/courier/userdb\n\
             mount -t overlay overlay -o lowerdir={d}/etc:{r}/etc:/etc /etc\n\
             mount -t tmpfs tmpfs /run\n\
             mkdir -p /run/courier/authdaemon\n\
             /usr/lib/courier/courier-authlib/authdaemond &\n\
             cd {d}/home\n\
             {} {} &\n\
             exec {} {}\n",
            env(false, true),
            tcpd(ref_port, 1000),
            env(!opts.plaintext, opts.tls),
            tcpd(imap_port, MAXPERIP),
        );
        fs::write(p.join("run.sh"), script).expect("write run.sh");

        let output = p.join("courier.out");
        let out_file = fs::File::create(&output).expect("create courier.out");
        let child = Command::new("unshare")
            // A PID namespace too: couriertcpd leaves the process group, but everything in
            // the namespace is killed when its first process (this sh, then the exec'd
            // couriertcpd) dies; --kill-child ties that to unshare itself.
            .args([
                "-m",
                "-p",
                "-f",
                "--kill-child",
                "--propagation",
                "private",
                "sh",
            ])
            .arg(p.join("run.sh"))
            .current_dir(p)
            .stdin(Stdio::null())
            .stdout(out_file.try_clone().expect("dup"))
            .stderr(out_file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run unshare (util-linux): {e}"));
        let mut courier = Courier {
            imap_port,
            ref_port,
            cert,
            output,
            maildir,
            child: Some(child),
            dir,
        };
        match courier.wait_ready() {
            Ok(()) => Ok(courier),
            Err(why) => Err(format!("{why}\n{}", courier.output())),
        }
    }

    /// Both ports greet, and authdaemond answers (a login on the reference port works).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        for port in [self.imap_port, self.ref_port] {
            loop {
                if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                    return Err(format!("Courier exited with {st}"));
                }
                if greets(port) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "port {port} did not greet within {START_TIMEOUT:?}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        while !logs_in(self.ref_port) {
            if Instant::now() > deadline {
                return Err("authdaemond did not answer".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn output(&self) -> String {
        format!(
            "--- Courier output ---\n{}",
            String::from_utf8_lossy(&fs::read(&self.output).unwrap_or_default())
        )
    }

    /// The self-signed certificate STARTTLS presents (names localhost and 127.0.0.1).
    pub fn ca_cert_path(&self) -> &Path {
        &self.cert
    }

    pub fn account(&self) -> Account {
        Account {
            port: self.ref_port,
            user: "alice".into(),
            password: "alice-pw".into(),
        }
    }

    /// The Maildir directory of a mailbox: INBOX, or `INBOX.NAME` → `.NAME` (Courier 5 names
    /// them in UTF-8 on disk, not in modified UTF-7).
    fn folder(&self, mailbox: &str) -> PathBuf {
        if mailbox.eq_ignore_ascii_case("INBOX") {
            return self.maildir.clone();
        }
        let name = mailbox
            .strip_prefix("INBOX.")
            .unwrap_or_else(|| panic!("Courier folders are INBOX.NAME, not {mailbox:?}"));
        self.maildir.join(format!(".{name}"))
    }

    /// Writes each message into the mailbox's Maildir `new/` (via `tmp/`, as an MDA does), in
    /// order, with CRLF stored as LF (Maildir's convention; Courier serves LF as CRLF). File
    /// names sort in delivery order, which is the order Courier assigns UIDs in. Then a SELECT
    /// makes Courier record them: in a Maildir never SELECTed (no courierimapuiddb yet), an
    /// EXAMINE numbers the mail without saving anything, under a UIDVALIDITY taken from the
    /// clock, so two EXAMINEs a second apart see different UIDVALIDITYs.
    pub fn deliver(&self, mailbox: &str, messages: &[Vec<u8>]) {
        self.deliver_unrecorded(mailbox, messages);
        self.account().select(mailbox);
    }

    /// Like [`Courier::deliver`] without the SELECT: mail a POP3-only user's new Maildir holds
    /// before any IMAP client has looked.
    pub fn deliver_unrecorded(&self, mailbox: &str, messages: &[Vec<u8>]) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let folder = self.folder(mailbox);
        // Courier answers a CREATE of an existing folder with a bare "Cannot create this folder.".
        if !folder.exists() {
            self.create_mailbox(mailbox);
        }
        for m in messages {
            let mut lf = Vec::with_capacity(m.len());
            let mut i = 0;
            while i < m.len() {
                if m[i] == b'\r' && m.get(i + 1) == Some(&b'\n') {
                    i += 1;
                    continue;
                }
                lf.push(m[i]);
                i += 1;
            }
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            let name = format!("1700000000.M{seq:09}P{}.aiopopd-test", std::process::id());
            let tmp = folder.join("tmp").join(&name);
            fs::write(&tmp, &lf).expect("write Maildir tmp file");
            debroot::chown_mail(&tmp);
            fs::rename(&tmp, folder.join("new").join(&name)).expect("Maildir tmp → new");
        }
    }

    /// The INBOX Maildir (folders are `.NAME` directories in it).
    pub fn maildir_path(&self) -> &Path {
        &self.maildir
    }

    /// Creates a folder by its full name (`INBOX.Archive`), over IMAP.
    pub fn create_mailbox(&self, mailbox: &str) {
        self.account().create(mailbox);
    }
}

impl Drop for Courier {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // At once: the namespace's init ignores SIGTERM, and a Maildir needs no shutdown.
            debroot::kill_group(&mut child, Duration::ZERO);
        }
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
