//! A private Dovecot instance (IMAP + POP3) per test, started from a config generated from
//! scratch in a temporary directory. The system's /etc/dovecot is never read.
//!
//! Works as root (mail processes run as an unprivileged system user such as `mail`) and as a
//! normal user (everything runs as the current uid/gid). Every instance has its own ports,
//! directory and process group, so tests in one binary can run in parallel.
//!
//! Things worth knowing about Dovecot 2.3 (checked against 2.3.19 with this config):
//! - `doveadm save` (like LDA/LMTP) stores CRLF line ends as LF on disk (`mail_save_crlf = no`);
//!   IMAP and POP3 serve every line end as CRLF, so a message with bare-LF line ends is served
//!   exactly like the same message with CRLF. A lone CR is kept as is.
//! - A message without a final line end is served without one by IMAP (`BODY[]`), while
//!   Dovecot's own POP3 RETR appends CRLF before the terminating dot.
//! - IMAP serves a NUL byte as 0x80; Dovecot's POP3 passes NUL through unchanged.
//! - `BODY.PEEK[HEADER]` includes the blank line that ends the header.
//! - User names are lowercased before lookup (`auth_username_format = %Lu`), so the users given
//!   to [`Dovecot::start_with_users`] must be lowercase; logging in as `ALICE` works.
//! - `doveadm fetch` reports `\Recent` on new messages; [`Dovecot::flags`] leaves it out.
//! - Logins from 127.0.0.1 count as secured; Dovecot's POP3 RETR/DELE set `\Seen` (default
//!   `pop3_no_flag_updates = no`), TOP doesn't.
//! - imap-login forks a new process per connection. A client that sends a command before the
//!   greeting, while that process is still connecting to the auth process, first gets
//!   `* OK Waiting for authentication process to respond..` and then the real greeting.
//! - `mail_max_userip_connections` is left at its default (10 per user and IP, per protocol).
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long to wait for Dovecot to accept connections and greet.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `doveadm` command, IMAP reference fetch or POP3 transcript may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times `start` retries when a chosen port was taken in the meantime.
const START_ATTEMPTS: usize = 5;

pub struct Dovecot {
    pub imap_port: u16,
    pub imaps_port: u16,
    pub pop3_port: u16,
    pub pop3s_port: u16,
    users: Vec<(String, String)>,
    conf: PathBuf,
    log: PathBuf,
    stderr: PathBuf,
    cert: PathBuf,
    child: Option<Child>,
    // Last field: dropped (directory removed) after `Drop::drop` has stopped Dovecot.
    dir: tempfile::TempDir,
}

/// Which system accounts the instance runs as.
struct Accounts {
    mail_uid: u32,
    mail_gid: u32,
    login_user: String,
    internal_user: String,
    internal_group: String,
}

/// Why an attempt to start failed.
struct StartError {
    message: String,
    port_clash: bool,
}

impl Dovecot {
    /// Starts an instance with the single user `alice` / `alice-pw`.
    pub fn start() -> Dovecot {
        Dovecot::start_with_users(&[("alice", "alice-pw")])
    }

    /// Starts an instance with these users and `{PLAIN}` passwords.
    /// Panics (with Dovecot's log) if Dovecot cannot be started.
    pub fn start_with_users(users: &[(&str, &str)]) -> Dovecot {
        Dovecot::start_configured(users, "")
    }

    /// Starts an instance with `alice` and these lines added to the configuration (later
    /// settings win): e.g. `imap_capability = IMAP4rev1` for a server without UIDPLUS and
    /// MOVE, or `listen = 127.0.0.1, 127.0.0.2` with `disable_plaintext_auth = yes` for one
    /// that refuses logins in clear (connections to 127.0.0.2 don't count as local).
    pub fn start_with_config(extra: &str) -> Dovecot {
        Dovecot::start_configured(&[("alice", "alice-pw")], extra)
    }

    fn start_configured(users: &[(&str, &str)], extra: &str) -> Dovecot {
        for (user, password) in users {
            assert!(
                !user.is_empty()
                    && user.bytes().all(|b| b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b"._-+@".contains(&b)),
                "user name {user:?}: use lowercase letters, digits and ._-+@ only \
                 (Dovecot lowercases the login name before the lookup)"
            );
            assert!(
                !password.is_empty() && !password.contains(|c: char| c == ':' || c.is_control()),
                "password {password:?} of {user}: no ':' or control characters (passwd-file)"
            );
        }
        let users: Vec<(String, String)> = users
            .iter()
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect();
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            match Dovecot::try_start(&users, extra) {
                Ok(dovecot) => return dovecot,
                Err(e) if e.port_clash => last = e.message,
                Err(e) => panic!("{}", e.message),
            }
        }
        panic!("Dovecot did not start after {START_ATTEMPTS} attempts (port clashes):\n{last}");
    }

    fn try_start(users: &[(String, String)], extra: &str) -> Result<Dovecot, StartError> {
        let accounts = accounts();
        let dir = tempfile::Builder::new()
            .prefix("dovecot-")
            .tempdir_in(short_temp_base())
            .expect("create temp dir");
        let root = dir.path().to_path_buf();
        // The mail, auth and login processes run as other users when we are root.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");

        let (cert_pem, key_pem) = self_signed_cert();
        let cert = root.join("cert.pem");
        let key = root.join("key.pem");
        fs::write(&cert, cert_pem).expect("write cert");
        fs::write(&key, key_pem).expect("write key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod key");

        let passwd = root.join("passwd");
        let mut passwd_text = String::new();
        for (user, password) in users {
            passwd_text.push_str(&format!("{user}:{{PLAIN}}{password}::::::\n"));
        }
        fs::write(&passwd, passwd_text).expect("write passwd-file");
        fs::set_permissions(&passwd, fs::Permissions::from_mode(0o644)).expect("chmod passwd");

        let homes = root.join("home");
        fs::create_dir(&homes).expect("mkdir home");
        for (user, _) in users {
            let home = homes.join(user);
            fs::create_dir(&home).expect("mkdir home/USER");
            fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).expect("chmod home");
            std::os::unix::fs::chown(&home, Some(accounts.mail_uid), Some(accounts.mail_gid))
                .expect("chown home/USER");
        }

        let [imap_port, imaps_port, pop3_port, pop3s_port] = free_ports();
        let log = root.join("dovecot.log");
        let stderr = root.join("dovecot.stderr");
        let conf = root.join("dovecot.conf");
        let r = root.display();
        let config = format!(
            r#"# Generated by tests/common/dovecot.rs
base_dir = {r}/run
state_dir = {r}/state
log_path = {r}/dovecot.log
info_log_path = {r}/dovecot.log
debug_log_path = {r}/dovecot.log
auth_verbose = yes
listen = 127.0.0.1
protocols = imap pop3
ssl = yes
ssl_cert = <{r}/cert.pem
ssl_key = <{r}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login cram-md5 scram-sha-1 scram-sha-256
auth_failure_delay = 0
first_valid_uid = {mail_uid}
first_valid_gid = {mail_gid}
default_login_user = {login_user}
default_internal_user = {internal_user}
default_internal_group = {internal_group}
mail_location = maildir:~/Maildir
mail_plugins =
pop3_uidl_format = %08Xu%08Xv

passdb {{
  driver = passwd-file
  args = {r}/passwd
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={r}/home/%u
}}

# No chroots: they need root, and are pointless for a test instance.
service imap-login {{
  chroot =
  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = {imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = {pop3s_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
{extra}
"#,
            mail_uid = accounts.mail_uid,
            mail_gid = accounts.mail_gid,
            login_user = accounts.login_user,
            internal_user = accounts.internal_user,
            internal_group = accounts.internal_group,
        );
        fs::write(&conf, config).expect("write dovecot.conf");

        let err_file = fs::File::create(&stderr).expect("create dovecot.stderr");
        let child = Command::new(binary("dovecot", "/usr/sbin/dovecot"))
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(err_file.try_clone().expect("dup stderr file"))
            .stderr(err_file)
            // Its own process group, so that Drop can kill every Dovecot process.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run dovecot: {e}"));

        let mut dovecot = Dovecot {
            imap_port,
            imaps_port,
            pop3_port,
            pop3s_port,
            users: users.to_vec(),
            conf,
            log,
            stderr,
            cert,
            child: Some(child),
            dir,
        };
        match dovecot.wait_ready() {
            Ok(()) => Ok(dovecot),
            Err(why) => {
                dovecot.stop();
                let logs = dovecot.all_logs();
                Err(StartError {
                    port_clash: logs.contains("Address already in use"),
                    message: format!("Dovecot did not start: {why}\n{logs}"),
                })
            }
        }
    }

    /// Waits until the plain ports greet (which means the auth process is up) and the TLS
    /// ports accept connections.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pending: Vec<(u16, &str)> = vec![
            (self.imap_port, "* OK "),
            (self.pop3_port, "+OK"),
            (self.imaps_port, ""),
            (self.pop3s_port, ""),
        ];
        while !pending.is_empty() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("dovecot exited with {status}"));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ports {:?} not ready after {START_TIMEOUT:?}",
                    pending.iter().map(|p| p.0).collect::<Vec<_>>()
                ));
            }
            pending.retain(|&(port, greeting)| !greets(port, greeting, deadline));
            if !pending.is_empty() {
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Stops Dovecot: SIGTERM to the master, then SIGKILL to its whole process group.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: plain syscalls on our own child, whose pid stays reserved until it is reaped.
        unsafe {
            libc::kill(-pid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                // Check for exit without reaping, so the pid (= process group id) can't be
                // reused before the group is killed below.
                let mut info: libc::siginfo_t = std::mem::zeroed();
                let r = libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                );
                if r != 0 || info.si_pid() != 0 || Instant::now() > deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = child.wait();
    }

    /// The generated dovecot.conf (pass it to `doveadm -c`).
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// The self-signed certificate (PEM) that IMAPS, POP3S and STARTTLS/STLS present; trust it as
    /// a CA. Its names are `localhost`, `127.0.0.1` and `127.0.0.2`.
    pub fn ca_cert_path(&self) -> &Path {
        &self.cert
    }

    /// The instance's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Dovecot's log (all levels).
    pub fn log_contents(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The log plus anything Dovecot wrote to stdout/stderr (start-up errors go there).
    fn all_logs(&self) -> String {
        let stderr = fs::read(&self.stderr).unwrap_or_default();
        format!(
            "--- {} ---\n{}\n--- dovecot stdout/stderr ---\n{}",
            self.log.display(),
            self.log_contents(),
            String::from_utf8_lossy(&stderr)
        )
    }

    /// The users and passwords this instance was started with.
    pub fn users(&self) -> &[(String, String)] {
        &self.users
    }

    pub fn home(&self, user: &str) -> PathBuf {
        self.dir.path().join("home").join(user)
    }

    /// The INBOX Maildir (other mailboxes are `.NAME` directories below it).
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.home(user).join("Maildir")
    }

    /// Runs `doveadm -c CONF ARGS...`; panics (with the log) unless it exits with 0.
    /// Returns its stdout.
    pub fn doveadm(&self, args: &[&str]) -> String {
        let out = self.doveadm_output(args, None);
        if !out.status.success() {
            panic!(
                "doveadm {args:?} failed ({}): {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.all_logs()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `doveadm -c CONF ARGS...` with `stdin`, with a timeout; never panics on the exit
    /// status.
    fn doveadm_output(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(binary("doveadm", "/usr/bin/doveadm"));
        cmd.arg("-c")
            .arg(&self.conf)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run doveadm: {e}"));
        let pid = child.id() as libc::pid_t;
        let writer = stdin.map(|input| {
            let mut pipe = child.stdin.take().expect("doveadm stdin");
            let input = input.to_vec();
            thread::spawn(move || {
                let _ = pipe.write_all(&input);
            })
        });
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(COMMAND_TIMEOUT) {
            Ok(out) => out,
            Err(_) => {
                // SAFETY: the child is not reaped yet (the waiting thread still waits for it).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = rx.recv();
                panic!(
                    "doveadm {args:?} took longer than {COMMAND_TIMEOUT:?}\n{}",
                    self.all_logs()
                );
            }
        };
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        out.unwrap_or_else(|e| panic!("doveadm {args:?}: {e}"))
    }

    /// Runs `doveadm -f tab ARGS...` and returns the rows as maps from column name to value.
    fn doveadm_table(&self, args: &[&str]) -> Vec<Vec<(String, String)>> {
        let mut full = vec!["-f", "tab"];
        full.extend_from_slice(args);
        let text = self.doveadm(&full);
        let mut lines = text.lines();
        let Some(header) = lines.next() else {
            return Vec::new();
        };
        let names: Vec<&str> = header.split('\t').collect();
        lines
            .filter(|l| !l.is_empty())
            .map(|line| {
                names
                    .iter()
                    .zip(line.split('\t'))
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }

    /// Creates `mailbox` unless it is INBOX or already exists.
    pub fn create_mailbox(&self, user: &str, mailbox: &str) {
        if mailbox.eq_ignore_ascii_case("INBOX") {
            return;
        }
        let out = self.doveadm_output(&["mailbox", "create", "-u", user, mailbox], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("already exists") {
            panic!(
                "doveadm mailbox create {mailbox:?} for {user} failed ({}): {stderr}\n{}",
                out.status,
                self.all_logs()
            );
        }
    }

    /// Saves `msg` into `mailbox` (created if needed) with `doveadm save`, which assigns the
    /// next UID at once. The bytes are passed unchanged; see the module docs for how Dovecot
    /// stores and serves them.
    pub fn deliver(&self, user: &str, mailbox: &str, msg: &[u8]) {
        self.create_mailbox(user, mailbox);
        let out = self.doveadm_output(&["save", "-u", user, "-m", mailbox], Some(msg));
        if !out.status.success() {
            panic!(
                "doveadm save to {mailbox:?} for {user} failed ({}): {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.all_logs()
            );
        }
    }

    /// Like [`Dovecot::deliver`], then sets `flags` (system flags such as `\Seen`, `\Deleted`,
    /// or keywords such as `$Label1`) on the new message with `doveadm flags add`.
    pub fn deliver_with_flags(&self, user: &str, mailbox: &str, msg: &[u8], flags: &[&str]) {
        self.deliver(user, mailbox, msg);
        if flags.is_empty() {
            return;
        }
        let uid = self
            .flags(user, mailbox)
            .last()
            .map(|(uid, _)| *uid)
            .expect("the message just saved is in the mailbox");
        let uid_s = uid.to_string();
        let joined = flags.join(" ");
        self.doveadm(&[
            "flags", "add", "-u", user, &joined, "mailbox", mailbox, "uid", &uid_s,
        ]);
        let now = self.flags(user, mailbox);
        let got = &now
            .iter()
            .find(|(u, _)| *u == uid)
            .expect("uid still there")
            .1;
        for flag in flags {
            assert!(
                got.iter().any(|g| g.eq_ignore_ascii_case(flag)),
                "flag {flag} not set on uid {uid} in {mailbox}: {got:?}"
            );
        }
    }

    /// Every message's UID and flags (without the session flag `\Recent`), sorted by UID.
    /// A mailbox that doesn't exist gives an empty list.
    pub fn flags(&self, user: &str, mailbox: &str) -> Vec<(u32, Vec<String>)> {
        let rows = self.doveadm_table(&["fetch", "-u", user, "uid flags", "mailbox", mailbox]);
        let mut result: Vec<(u32, Vec<String>)> = rows
            .iter()
            .map(|row| {
                let uid = column(row, "uid").parse().expect("uid is a number");
                let flags = column(row, "flags")
                    .split(' ')
                    .filter(|f| !f.is_empty() && !f.eq_ignore_ascii_case("\\Recent"))
                    .map(str::to_string)
                    .collect();
                (uid, flags)
            })
            .collect();
        result.sort_by_key(|(uid, _)| *uid);
        result
    }

    /// One field of `doveadm mailbox status` (`messages`, `uidnext`, `uidvalidity`, ...).
    pub fn mailbox_status(&self, user: &str, mailbox: &str, field: &str) -> String {
        let rows = self.doveadm_table(&["mailbox", "status", "-u", user, field, mailbox]);
        let row = rows.first().unwrap_or_else(|| {
            panic!("doveadm mailbox status {field} {mailbox:?} for {user}: no output")
        });
        column(row, field).to_string()
    }

    pub fn uidvalidity(&self, user: &str, mailbox: &str) -> u32 {
        self.mailbox_status(user, mailbox, "uidvalidity")
            .parse()
            .expect("uidvalidity is a number")
    }

    /// Logs in on the plain IMAP port with the imap crate and EXAMINEs `mailbox`; returns the
    /// session and the mailbox's UIDs in ascending order.
    fn imap_examine(
        &self,
        user: &str,
        password: &str,
        mailbox: &str,
    ) -> (imap::Session<TcpStream>, Vec<u32>) {
        let tcp = TcpStream::connect(("127.0.0.1", self.imap_port)).expect("connect to IMAP");
        tcp.set_read_timeout(Some(COMMAND_TIMEOUT))
            .expect("timeout");
        tcp.set_write_timeout(Some(COMMAND_TIMEOUT))
            .expect("timeout");
        let mut client = imap::Client::new(tcp);
        client.read_greeting().expect("IMAP greeting");
        let mut session = client
            .login(user, password)
            .map_err(|(e, _)| e)
            .unwrap_or_else(|e| panic!("IMAP LOGIN {user}: {e}\n{}", self.all_logs()));
        // EXAMINE by hand: the crate panics on an untagged NO/BAD inside a SELECT response.
        let quoted = mailbox.replace('\\', "\\\\").replace('"', "\\\"");
        session
            .run_command_and_read_response(format!("EXAMINE \"{quoted}\""))
            .unwrap_or_else(|e| panic!("IMAP EXAMINE {mailbox:?}: {e}"));
        let mut uids: Vec<u32> = session
            .uid_search("ALL")
            .expect("IMAP UID SEARCH ALL")
            .into_iter()
            .collect();
        uids.sort_unstable();
        (session, uids)
    }

    /// What Dovecot's IMAP serves as `BODY[]` for each message, fetched one message at a time
    /// (`UID FETCH n (UID BODY.PEEK[])`) over the plain IMAP port; sorted by UID. This is the
    /// reference for RETR output.
    pub fn imap_bodies(&self, user: &str, password: &str, mailbox: &str) -> Vec<(u32, Vec<u8>)> {
        let (mut session, uids) = self.imap_examine(user, password, mailbox);
        let mut result = Vec::with_capacity(uids.len());
        for uid in uids {
            let fetches = session
                .uid_fetch(uid.to_string(), "(UID BODY.PEEK[])")
                .unwrap_or_else(|e| panic!("IMAP UID FETCH {uid}: {e}"));
            let body = fetches
                .iter()
                .find(|f| f.uid == Some(uid))
                .and_then(|f| f.body())
                .unwrap_or_else(|| panic!("IMAP served no BODY[] for uid {uid}"))
                .to_vec();
            result.push((uid, body));
        }
        let _ = session.logout();
        result
    }

    /// Each message's `RFC822.SIZE` as Dovecot's IMAP reports it, sorted by UID.
    pub fn imap_sizes(&self, user: &str, password: &str, mailbox: &str) -> Vec<(u32, u32)> {
        let (mut session, uids) = self.imap_examine(user, password, mailbox);
        let mut result = Vec::with_capacity(uids.len());
        if !uids.is_empty() {
            let fetches = session
                .uid_fetch("1:*", "(UID RFC822.SIZE)")
                .expect("IMAP UID FETCH RFC822.SIZE");
            for fetch in fetches.iter() {
                if let (Some(uid), Some(size)) = (fetch.uid, fetch.size) {
                    result.push((uid, size));
                }
            }
        }
        let _ = session.logout();
        result.sort_unstable();
        assert_eq!(
            result.iter().map(|r| r.0).collect::<Vec<_>>(),
            uids,
            "RFC822.SIZE for every UID"
        );
        result
    }

    /// Sends `script` at once (pipelined) to Dovecot's own plain POP3 port and returns
    /// everything the server sent, greeting included, up to the moment it closed the
    /// connection. The script must make the server close (end it with QUIT); panics with the
    /// partial transcript after a timeout.
    pub fn pop3_transcript(&self, script: &[u8]) -> Vec<u8> {
        let mut tcp = TcpStream::connect(("127.0.0.1", self.pop3_port)).expect("connect to POP3");
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        tcp.set_write_timeout(Some(COMMAND_TIMEOUT))
            .expect("timeout");
        let mut reader = tcp.try_clone().expect("clone socket");
        let script = script.to_vec();
        // Write from another thread: a long script and long replies must not deadlock.
        let writer = thread::spawn(move || {
            let _ = tcp.write_all(&script);
            tcp
        });
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if Instant::now() > deadline {
                        let _ = reader.shutdown(Shutdown::Both);
                        panic!(
                            "POP3 server did not close within {COMMAND_TIMEOUT:?}; got:\n{}",
                            String::from_utf8_lossy(&out)
                        );
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A reset after the server's last words: keep what we have.
                Err(_) => break,
            }
        }
        let _ = writer.join();
        out
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

fn column<'a>(row: &'a [(String, String)], name: &str) -> &'a str {
    row.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("doveadm output has no column {name}: {row:?}"))
}

/// Connects to `port`; with a non-empty `greeting`, also reads lines until one starts with it
/// and isn't Dovecot's "Waiting for authentication process" notice.
fn greets(port: u16, greeting: &str, deadline: Instant) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(tcp) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    if greeting.is_empty() {
        return true;
    }
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reader = BufReader::new(&tcp);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return false,
            Ok(_) if line.starts_with(greeting) && !line.contains("Waiting for auth") => {
                let bye: &[u8] = if greeting.starts_with('+') {
                    b"QUIT\r\n"
                } else {
                    b"a LOGOUT\r\n"
                };
                let _ = (&tcp).write_all(bye);
                return true;
            }
            Ok(_) => {}
            Err(_) if Instant::now() < deadline => {}
            Err(_) => return false,
        }
    }
}

/// Four distinct free loopback ports (bound at the same time, then released).
fn free_ports() -> [u16; 4] {
    let listeners: Vec<TcpListener> = (0..4)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    let port = |i: usize| listeners[i].local_addr().expect("local addr").port();
    [port(0), port(1), port(2), port(3)]
}

/// Unix socket paths must stay under ~108 bytes: use /tmp if $TMPDIR is long. As root, always
/// /tmp: the mail user must be able to traverse every parent directory.
fn short_temp_base() -> PathBuf {
    let tmp = std::env::temp_dir();
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if tmp.as_os_str().len() <= 40 && !root {
        tmp
    } else {
        PathBuf::from("/tmp")
    }
}

/// The absolute path if it exists (a normal user's PATH may lack /usr/sbin), else the name.
fn binary(name: &str, usual: &str) -> PathBuf {
    if Path::new(usual).exists() {
        PathBuf::from(usual)
    } else {
        PathBuf::from(name)
    }
}

/// One certificate and key per test binary (RSA key generation is slow), generated with
/// `openssl req`.
fn self_signed_cert() -> (&'static [u8], &'static [u8]) {
    static CERT: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    let (cert, key) = CERT.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("dovecot-cert-")
            .tempdir()
            .expect("temp dir for the certificate");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            ])
            .args(["-subj", "/CN=localhost"])
            .args([
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:127.0.0.2",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl: {e}"));
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            fs::read(&cert).expect("read cert"),
            fs::read(&key).expect("read key"),
        )
    });
    (cert, key)
}

/// `getent passwd KEY` → (name, uid, gid).
fn passwd_entry(key: &str) -> Option<(String, u32, u32)> {
    let out = Command::new("getent").args(["passwd", key]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.lines().next()?.split(':').collect();
    Some((
        fields.first()?.to_string(),
        fields.get(2)?.parse().ok()?,
        fields.get(3)?.parse().ok()?,
    ))
}

/// `getent group GID` → name.
fn group_name(gid: u32) -> Option<String> {
    let out = Command::new("getent")
        .args(["group", &gid.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next()?.split(':').next()?.to_string())
}

fn accounts() -> Accounts {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid != 0 {
        // Nothing can change users: run everything as ourselves.
        let (name, _, _) = passwd_entry(&uid.to_string())
            .unwrap_or_else(|| panic!("uid {uid} has no passwd entry (getent passwd {uid})"));
        let group = group_name(gid)
            .unwrap_or_else(|| panic!("gid {gid} has no group entry (getent group {gid})"));
        return Accounts {
            mail_uid: uid,
            mail_gid: gid,
            login_user: name.clone(),
            internal_user: name,
            internal_group: group,
        };
    }
    // Root: mail processes can't run as uid 0. Debian's dovecot-core creates dovecot/dovenull.
    let first = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| passwd_entry(n))
            .unwrap_or_else(|| panic!("none of the users {names:?} exists"))
    };
    let (_, mail_uid, mail_gid) = first(&["mail", "nobody"]);
    let (login_user, _, _) = first(&["dovenull", "nobody"]);
    let (internal_user, _, internal_gid) = first(&["dovecot", "nobody"]);
    let internal_group = group_name(internal_gid)
        .unwrap_or_else(|| panic!("gid {internal_gid} of {internal_user} has no group entry"));
    assert!(mail_uid != 0, "the mail user must not be root");
    Accounts {
        mail_uid,
        mail_gid,
        login_user,
        internal_user,
        internal_group,
    }
}
