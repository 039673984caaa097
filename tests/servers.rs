//! The same POP3 sessions against three IMAP servers: Cyrus IMAP 3.6, Courier-IMAP 5.0 and,
//! for comparison, Dovecot 2.3, each a private instance on free loopback ports. Every reply is
//! compared with what that server serves over IMAP (BODY[], RFC822.SIZE, flags, UIDs), read
//! through the reference client, never with aiopopd's own output.
//!
//! Every script is written to aiopopd in one write (pipelined), as `pop3::run` does.
//!
//! Cyrus and Courier can't be installed next to Dovecot: they are unpacked from Debian's
//! packages at test time (tests/common/debroot.rs). Without them these tests fail, unless a
//! developer sets AIOPOPD_SKIP_CYRUS=1 / AIOPOPD_SKIP_COURIER=1 (CI never does).

mod common;

use common::activate::Activator;
use common::courier::{self, Courier};
use common::cyrus::{self, Cyrus};
use common::dovecot::Dovecot;
use common::pop3::{self, expected_retr, expected_top, replies, Reply};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const LOGIN: &str = "USER alice\r\nPASS alice-pw\r\n";
const REFUSED: &str = "-ERR [SYS/PERM] The mailbox can't be served; tell the administrator.";

/// What the tests need of a server: the port aiopopd talks to, and the harness's own view.
trait Server {
    fn imap_port(&self) -> u16;
    /// Delivers the messages to a mailbox (created if needed), in order.
    fn deliver(&self, mailbox: &str, messages: &[Vec<u8>]);
    fn create(&self, mailbox: &str);
    fn bodies(&self, mailbox: &str) -> Vec<(u32, Vec<u8>)>;
    fn sizes(&self, mailbox: &str) -> Vec<(u32, u32)>;
    /// UIDs and flags (no `\Recent`), by UID.
    fn flags(&self, mailbox: &str) -> Vec<(u32, Vec<String>)>;
    fn add_flags(&self, mailbox: &str, uid: u32, flags: &[&str]);
    fn uidvalidity(&self, mailbox: &str) -> u32;
    /// The full name of a personal folder called `name`.
    fn folder(&self, name: &str) -> String;
}

impl Server for Dovecot {
    fn imap_port(&self) -> u16 {
        self.imap_port
    }
    /// By APPEND over one IMAP session: a `doveadm save` per message would take 15 s for the
    /// thousand-message mailbox.
    fn deliver(&self, mailbox: &str, messages: &[Vec<u8>]) {
        if !mailbox.eq_ignore_ascii_case("INBOX") {
            self.create_mailbox("alice", mailbox);
        }
        let account = common::imapref::Account {
            port: self.imap_port,
            user: "alice".into(),
            password: "alice-pw".into(),
        };
        account.append(mailbox, messages);
    }
    fn create(&self, mailbox: &str) {
        self.create_mailbox("alice", mailbox);
    }
    fn bodies(&self, mailbox: &str) -> Vec<(u32, Vec<u8>)> {
        self.imap_bodies("alice", "alice-pw", mailbox)
    }
    fn sizes(&self, mailbox: &str) -> Vec<(u32, u32)> {
        self.imap_sizes("alice", "alice-pw", mailbox)
    }
    fn flags(&self, mailbox: &str) -> Vec<(u32, Vec<String>)> {
        Dovecot::flags(self, "alice", mailbox)
    }
    fn add_flags(&self, mailbox: &str, uid: u32, flags: &[&str]) {
        let uid = uid.to_string();
        self.doveadm(&[
            "flags",
            "add",
            "-u",
            "alice",
            &flags.join(" "),
            "mailbox",
            mailbox,
            "uid",
            &uid,
        ]);
    }
    fn uidvalidity(&self, mailbox: &str) -> u32 {
        Dovecot::uidvalidity(self, "alice", mailbox)
    }
    fn folder(&self, name: &str) -> String {
        name.to_string()
    }
}

/// Cyrus and Courier: delivery their own way, everything else through the reference client.
macro_rules! via_imapref {
    ($t:ty) => {
        impl Server for $t {
            fn imap_port(&self) -> u16 {
                self.imap_port
            }
            fn deliver(&self, mailbox: &str, messages: &[Vec<u8>]) {
                <$t>::deliver(self, mailbox, messages)
            }
            fn create(&self, mailbox: &str) {
                self.create_mailbox(mailbox)
            }
            fn bodies(&self, mailbox: &str) -> Vec<(u32, Vec<u8>)> {
                self.account().bodies(mailbox)
            }
            fn sizes(&self, mailbox: &str) -> Vec<(u32, u32)> {
                self.account().sizes(mailbox)
            }
            fn flags(&self, mailbox: &str) -> Vec<(u32, Vec<String>)> {
                self.account().flags(mailbox)
            }
            fn add_flags(&self, mailbox: &str, uid: u32, flags: &[&str]) {
                self.account().add_flags(mailbox, uid, flags)
            }
            fn uidvalidity(&self, mailbox: &str) -> u32 {
                self.account().uidvalidity(mailbox)
            }
            fn folder(&self, name: &str) -> String {
                // Both keep personal folders under INBOX with '.' as delimiter.
                format!("INBOX.{name}")
            }
        }
    };
}
via_imapref!(Cyrus);
via_imapref!(Courier);

fn args(s: &dyn Server) -> Vec<String> {
    [
        "-H",
        "127.0.0.1",
        "-p",
        &s.imap_port().to_string(),
        "--allow-plaintext-auth",
        "-l",
        "-d",
        "pop.test",
        "--auth-failure-delay",
        "0",
    ]
    .map(String::from)
    .to_vec()
}

/// One session, the whole script in one write (pipelined), with `extra` arguments.
fn run(s: &dyn Server, extra: &[&str], script: &str) -> (Vec<Reply>, String) {
    let mut a = args(s);
    a.extend(extra.iter().map(|x| x.to_string()));
    let r = pop3::run(&a, script.as_bytes());
    (replies(&r.stdout, script), r.stderr)
}

/// Messages of the shapes that bite POP3 servers, all with CRLF line ends (Cyrus refuses bare
/// LF or NUL): dot lines, no final line end, 8-bit octets in the body and in the header, a
/// 5,000-octet line, an empty body, a lone CR, 3 MB.
fn corpus() -> Vec<Vec<u8>> {
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0;
    while big.len() < 3 * 1024 * 1024 + 12345 {
        let line = if i % 7 == 0 {
            format!(".line {i} starts with a dot\r\n")
        } else {
            format!("line {i} {}\r\n", "z".repeat(60))
        };
        big.extend_from_slice(line.as_bytes());
        i += 1;
    }
    vec![
        b"Subject: dots\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n"
            .to_vec(),
        b"Subject: no final newline\r\n\r\nlast line".to_vec(),
        b"Subject: 8bit\r\nContent-Type: text/plain; charset=latin1\r\n\r\ncaf\xe9 \xff\xfe\x80\r\n"
            .to_vec(),
        [&b"Subject: long line\r\n\r\n"[..], &[b'a'; 5000], b"\r\nshort\r\n"].concat(),
        b"Subject: empty body\r\n\r\n".to_vec(),
        b"Subject: caf\xe9 in the header\r\n\r\na lone\rCR\r\n".to_vec(),
        big,
    ]
}

fn small(n: usize) -> Vec<Vec<u8>> {
    (1..=n)
        .map(|i| format!("Subject: m{i}\r\n\r\nbody {i}\r\n").into_bytes())
        .collect()
}

fn flag_strings(flags: &[(u32, Vec<String>)]) -> Vec<String> {
    flags.iter().map(|(_, f)| f.join(" ")).collect()
}

/// Login, STAT, LIST, UIDL, and per message RETR, TOP n 0, TOP n 2, LIST n, UIDL n: every
/// octet as the server serves it, sizes its RFC822.SIZE, UIDLs `%08Xu%08Xv` of its UIDs (Dovecot's X is lower-case hex).
fn retr_top_list_uidl_are_exact(s: &dyn Server) {
    s.deliver("INBOX", &corpus());
    let bodies = s.bodies("INBOX");
    let sizes = s.sizes("INBOX");
    let uidvalidity = s.uidvalidity("INBOX");
    let n = bodies.len();
    assert_eq!(n, corpus().len());
    let mut script = format!("{LOGIN}STAT\r\nLIST\r\nUIDL\r\n");
    for i in 1..=n {
        script.push_str(&format!(
            "RETR {i}\r\nTOP {i} 0\r\nTOP {i} 2\r\nLIST {i}\r\nUIDL {i}\r\n"
        ));
    }
    script.push_str("QUIT\r\n");
    let (r, log) = run(s, &[], &script);
    assert_eq!(r.len(), 1 + 2 + 3 + 5 * n + 1, "{r:?}\n{log}");
    let total: u32 = sizes.iter().map(|s| s.1).sum();
    assert_eq!(r[3].status, format!("+OK {n} {total}"));
    let list: String = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{} {}\r\n", i + 1, s.1))
        .collect();
    assert_eq!(r[4].body_str(), list);
    let uidl: String = bodies
        .iter()
        .enumerate()
        .map(|(i, (uid, _))| format!("{} {uid:08x}{uidvalidity:08x}\r\n", i + 1))
        .collect();
    assert_eq!(r[5].body_str(), uidl);
    for (i, (_, body)) in bodies.iter().enumerate() {
        let at = 6 + 5 * i;
        let no = i + 1;
        assert!(r[at].ok(), "RETR {no}: {}", r[at].status);
        assert!(
            r[at].body.as_deref() == Some(&expected_retr(body)[..]),
            "RETR {no} differs from BODY[] ({} octets)",
            body.len()
        );
        assert_eq!(
            r[at + 1].body.as_deref(),
            Some(&expected_top(body, 0)[..]),
            "TOP {no} 0"
        );
        assert_eq!(
            r[at + 2].body.as_deref(),
            Some(&expected_top(body, 2)[..]),
            "TOP {no} 2"
        );
        assert_eq!(r[at + 3].status, format!("+OK {no} {}", sizes[i].1));
        assert_eq!(
            r[at + 4].status,
            format!("+OK {no} {:08x}{uidvalidity:08x}", bodies[i].0)
        );
    }
    assert!(r.last().unwrap().ok());
    // RETR and TOP read with BODY.PEEK: nothing was marked.
    assert!(s.flags("INBOX").iter().all(|(_, f)| f.is_empty()));
}

fn on_dele_seen_marks_exactly_the_deleted(s: &dyn Server) {
    s.deliver("INBOX", &small(3));
    let (r, log) = run(s, &[], &format!("{LOGIN}STAT\r\nDELE 2\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(flag_strings(&s.flags("INBOX")), ["", "\\Seen", ""]);
    let (r, _) = run(s, &[], &format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r[3].status.starts_with("+OK 2 "), "{r:?}");
}

fn on_dele_keyword_adds_only_the_keyword(s: &dyn Server) {
    s.deliver("INBOX", &small(3));
    let mode = ["--on-dele", "keyword:$Popped"];
    let (r, log) = run(s, &mode, &format!("{LOGIN}DELE 1\r\nDELE 3\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(flag_strings(&s.flags("INBOX")), ["$Popped", "", "$Popped"]);
    let (r, _) = run(s, &mode, &format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r[3].status.starts_with("+OK 1 "), "{r:?}");
}

fn on_dele_expunge_removes_exactly_the_deleted(s: &dyn Server) {
    s.deliver("INBOX", &small(4));
    // Another client's \Deleted message, not yet expunged: it must survive.
    s.add_flags("INBOX", s.flags("INBOX")[3].0, &["\\Deleted"]);
    let uids: Vec<u32> = s.flags("INBOX").iter().map(|f| f.0).collect();
    let (r, log) = run(
        s,
        &["--on-dele", "expunge"],
        &format!("{LOGIN}STAT\r\nDELE 1\r\nDELE 2\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert!(r[3].status.starts_with("+OK 3 "), "{r:?}");
    assert_eq!(
        s.flags("INBOX"),
        vec![(uids[2], vec![]), (uids[3], vec!["\\Deleted".to_string()])]
    );
}

fn on_dele_move_moves_exactly_the_deleted(s: &dyn Server) {
    s.deliver("INBOX", &small(3));
    let archive = s.folder("Archive");
    s.create(&archive);
    let uids: Vec<u32> = s.flags("INBOX").iter().map(|f| f.0).collect();
    let (r, log) = run(
        s,
        &["--on-dele", &format!("move:{archive}")],
        &format!("{LOGIN}DELE 2\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    let inbox = s.flags("INBOX");
    assert_eq!(
        inbox.iter().map(|f| f.0).collect::<Vec<_>>(),
        [uids[0], uids[2]]
    );
    assert!(inbox.iter().all(|(_, f)| f.is_empty()), "{inbox:?}");
    let archived = s.bodies(&archive);
    assert_eq!(archived.len(), 1);
    assert_eq!(archived[0].1, b"Subject: m2\r\n\r\nbody 2\r\n");
}

/// `move:Archive` names the folder as a user would; aiopopd finds it under the personal
/// namespace's prefix (NAMESPACE: `INBOX.` on Cyrus and Courier, none on Dovecot).
fn on_dele_move_finds_the_folder_by_its_short_name(s: &dyn Server) {
    s.deliver("INBOX", &small(2));
    let archive = s.folder("Archive");
    s.create(&archive);
    let (r, log) = run(
        s,
        &["--on-dele", "move:Archive"],
        &format!("{LOGIN}DELE 1\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(s.flags("INBOX").len(), 1, "{log}");
    let archived = s.bodies(&archive);
    assert_eq!(archived.len(), 1, "{log}");
    assert_eq!(archived[0].1, b"Subject: m1\r\n\r\nbody 1\r\n");
}

/// Names beyond ASCII (and with `&`) go to the server in modified UTF-7, served and moved to.
fn non_ascii_mailboxes(s: &dyn Server) {
    let drafts = s.folder("Entwürfe & Co");
    let trash = s.folder("Gelöscht");
    s.create(&drafts);
    s.create(&trash);
    s.deliver(&drafts, &small(2));
    let (r, log) = run(
        s,
        &["--mailbox", &drafts, "--on-dele", &format!("move:{trash}")],
        &format!("{LOGIN}STAT\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert!(r[3].status.starts_with("+OK 2 "), "{r:?}");
    assert_eq!(r[4].body_str(), "Subject: m1\r\n\r\nbody 1\r\n");
    assert_eq!(s.flags(&drafts).len(), 1, "{log}");
    assert_eq!(s.flags(&trash).len(), 1, "{log}");
}

fn a_session_without_quit_changes_nothing(s: &dyn Server) {
    s.deliver("INBOX", &small(3));
    let before = s.flags("INBOX");
    for mode in ["seen", "expunge"] {
        let (r, log) = run(
            s,
            &["--on-dele", mode],
            &format!("{LOGIN}RETR 1\r\nDELE 1\r\nDELE 2\r\n"),
        );
        assert_eq!(r.len(), 6, "{r:?}\n{log}");
        assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
        assert_eq!(s.flags("INBOX"), before, "--on-dele {mode}");
    }
}

fn a_thousand_messages(s: &dyn Server) {
    let messages = small(1000);
    s.deliver("INBOX", &messages);
    let mut script = format!("{LOGIN}STAT\r\nUIDL\r\n");
    for i in 1..=1000 {
        script.push_str(&format!("RETR {i}\r\n"));
    }
    script.push_str("QUIT\r\n");
    let (r, log) = run(s, &[], &script);
    assert_eq!(r.len(), 3 + 2 + 1000 + 1, "{log}");
    let total: usize = messages.iter().map(Vec::len).sum();
    assert_eq!(r[3].status, format!("+OK 1000 {total}"));
    assert_eq!(r[4].body_str().lines().count(), 1000);
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(r[5 + i].body.as_deref(), Some(&m[..]), "RETR {}", i + 1);
    }
    assert!(r.last().unwrap().ok());
}

/// Python's poplib through systemd-socket-activate, as in production.
fn poplib_through_socket_activation(s: &dyn Server) {
    s.deliver("INBOX", &corpus()[..5]);
    let a = Activator::start(true, &args(s));
    let out_dir = tempfile::tempdir().unwrap();
    let script = r#"
import poplib, sys, os
poplib._MAXLINE = 1 << 20
p = poplib.POP3("127.0.0.1", int(sys.argv[1]), timeout=30)
p.user("alice")
p.pass_("alice-pw")
count, size = p.stat()
for i in range(1, count + 1):
    resp, lines, octets = p.retr(i)
    with open(os.path.join(sys.argv[2], str(i)), "wb") as f:
        f.write(b"".join(l + b"\r\n" for l in lines))
print(count)
p.quit()
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            &a.port.to_string(),
            out_dir.path().to_str().unwrap(),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "poplib: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log()
    );
    let bodies = s.bodies("INBOX");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5");
    for (i, (_, body)) in bodies.iter().enumerate() {
        let got = std::fs::read(out_dir.path().join((i + 1).to_string())).unwrap();
        assert_eq!(got, expected_retr(body), "message {}", i + 1);
    }
}

/// curl, through systemd-socket-activate: RETR a message, then DELE another (`-X DELE -I`):
/// exactly that one gets `\Seen`.
fn curl_retr_and_dele(s: &dyn Server) {
    s.deliver("INBOX", &small(3));
    let a = Activator::start(true, &args(s));
    let curl = |extra: &[&str], n: u32| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "-u", "alice:alice-pw"])
            .args(extra)
            .arg(format!("pop3://127.0.0.1:{}/{n}", a.port))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl {extra:?} {n}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            a.log()
        );
        out.stdout
    };
    assert_eq!(curl(&[], 1), expected_retr(&s.bodies("INBOX")[0].1));
    curl(&["-X", "DELE", "-I"], 2);
    assert_eq!(flag_strings(&s.flags("INBOX")), ["", "\\Seen", ""]);
}

/// fetchmail over STLS (it insists on TLS, as it should), fetching everything and deleting it
/// (`fetchall`, no `keep`): every message delivered as the server serves it, and each DELE'd
/// message marked `\Seen` (the default `--on-dele`).
fn fetchmail_fetches_and_deletes_over_stls(s: &dyn Server) {
    s.deliver("INBOX", &corpus()[..5]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let mut a = args(s);
    a.retain(|x| x != "--allow-plaintext-auth");
    a.extend([
        "--stls".into(),
        "--ssl-generate".into(),
        "--ssl-cert".into(),
    ]);
    a.push(cert.to_str().unwrap().into());
    a.push("--ssl-key".into());
    a.push(key.to_str().unwrap().into());
    // One session creates the certificate (for the greeting's name, pop.test) for fetchmail
    // to trust.
    pop3::run(&a, b"QUIT\r\n");
    let act = Activator::start(true, &a);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let rc = dir.path().join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "poll localhost protocol POP3 port {} auth password user \"alice\" password \"alice-pw\" \
             fetchall sslcertck sslcertfile \"{}\" sslcommonname \"pop.test\" \
             mda \"/bin/sh -c 'cat > {}/$$'\"\n",
            act.port,
            cert.display(),
            out.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = Command::new("fetchmail")
        .args(["-f", rc.to_str().unwrap(), "--nosyslog", "--invisible"])
        .arg("--nodetach")
        .arg("--idfile")
        .arg(dir.path().join("ids"))
        .env("FETCHMAILHOME", dir.path())
        .output()
        .expect("fetchmail (Debian package fetchmail)");
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
        act.log()
    );
    // fetchmail hands an MDA LF line ends: compare like with like.
    let lf = |b: &[u8]| String::from_utf8_lossy(b).replace("\r\n", "\n");
    let mut got: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| lf(&std::fs::read(e.unwrap().path()).unwrap()))
        .collect();
    let mut want: Vec<String> = s
        .bodies("INBOX")
        .iter()
        .map(|(_, b)| lf(&expected_retr(b)))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got.len(), 5);
    assert!(
        got == want,
        "fetchmail's copies differ from what IMAP serves"
    );
    assert_eq!(flag_strings(&s.flags("INBOX")), ["\\Seen"; 5]);
}

/// A server that refuses logins in clear but offers STARTTLS: aiopopd upgrades (trusting the
/// server's certificate) and logs in.
fn logindisabled_with_starttls_upgrades(s: &dyn Server, ca: &Path) {
    s.deliver("INBOX", &small(2));
    let ca = ca.to_str().unwrap();
    let (r, log) = run(
        s,
        &["--imap-ca", ca],
        &format!("{LOGIN}STAT\r\nRETR 2\r\nQUIT\r\n"),
    );
    assert_eq!(r.len(), 6, "{r:?}\n{log}");
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(r[4].body_str(), "Subject: m2\r\n\r\nbody 2\r\n");
}

/// A server that refuses logins in clear and offers no STARTTLS: a configuration error, told
/// as such, never as a wrong password.
fn logindisabled_without_starttls_is_refused_as_sys_perm(s: &dyn Server) {
    let (r, log) = run(s, &[], &format!("{LOGIN}QUIT\r\n"));
    assert_eq!(r.len(), 4, "{r:?}\n{log}");
    assert_eq!(r[2].status, REFUSED, "{log}");
    assert!(r[3].ok(), "{r:?}");
}

/// USER/PASS with a wrong password, AUTH PLAIN and AUTH LOGIN (decoded by aiopopd, relayed as
/// an IMAP LOGIN).
fn logins(s: &dyn Server) {
    s.deliver("INBOX", &small(1));
    let script = "USER alice\r\nPASS wrong\r\nAUTH PLAIN AGFsaWNlAGFsaWNlLXB3\r\nSTAT\r\nQUIT\r\n";
    let (r, log) = run(s, &[], script);
    assert_eq!(r.len(), 6, "{r:?}\n{log}");
    assert_eq!(r[2].status, "-ERR [AUTH] Authentication failed.", "{log}");
    assert!(r[3].ok(), "{r:?}\n{log}");
    assert!(r[4].status.starts_with("+OK 1 "), "{r:?}");
    let script = "AUTH LOGIN\r\nYWxpY2U=\r\nYWxpY2UtcHc=\r\nSTAT\r\nQUIT\r\n";
    let (r, log) = run(s, &[], script);
    assert!(r.last().is_some_and(Reply::ok), "{r:?}\n{log}");
    assert!(r[r.len() - 2].status.starts_with("+OK 1 "), "{r:?}\n{log}");
}

macro_rules! against {
    ($name:ident, $start:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn retr_top_list_uidl() {
                if let Some(s) = $start {
                    retr_top_list_uidl_are_exact(&s);
                }
            }
            #[test]
            fn logins() {
                if let Some(s) = $start {
                    super::logins(&s);
                }
            }
            #[test]
            fn on_dele_seen() {
                if let Some(s) = $start {
                    on_dele_seen_marks_exactly_the_deleted(&s);
                }
            }
            #[test]
            fn on_dele_keyword() {
                if let Some(s) = $start {
                    on_dele_keyword_adds_only_the_keyword(&s);
                }
            }
            #[test]
            fn on_dele_expunge() {
                if let Some(s) = $start {
                    on_dele_expunge_removes_exactly_the_deleted(&s);
                }
            }
            #[test]
            fn on_dele_move() {
                if let Some(s) = $start {
                    on_dele_move_moves_exactly_the_deleted(&s);
                }
            }
            #[test]
            fn on_dele_move_short_name() {
                if let Some(s) = $start {
                    on_dele_move_finds_the_folder_by_its_short_name(&s);
                }
            }
            #[test]
            fn non_ascii_mailbox_names() {
                if let Some(s) = $start {
                    non_ascii_mailboxes(&s);
                }
            }
            #[test]
            fn no_quit_changes_nothing() {
                if let Some(s) = $start {
                    a_session_without_quit_changes_nothing(&s);
                }
            }
            #[test]
            fn thousand_messages() {
                if let Some(s) = $start {
                    a_thousand_messages(&s);
                }
            }
            #[test]
            fn poplib() {
                if let Some(s) = $start {
                    poplib_through_socket_activation(&s);
                }
            }
            #[test]
            fn curl() {
                if let Some(s) = $start {
                    curl_retr_and_dele(&s);
                }
            }
            #[test]
            fn fetchmail() {
                if let Some(s) = $start {
                    fetchmail_fetches_and_deletes_over_stls(&s);
                }
            }
        }
    };
}

against!(dovecot, Some(Dovecot::start()));
against!(cyrus_imapd, Cyrus::start());
against!(courier_imap, Courier::start());

mod logindisabled {
    use super::*;

    #[test]
    fn cyrus_with_starttls() {
        let opts = cyrus::Options {
            plaintext: false,
            tls: true,
            ..cyrus::Options::default()
        };
        if let Some(s) = Cyrus::start_with(opts) {
            logindisabled_with_starttls_upgrades(&s, s.ca_cert_path());
        }
    }

    #[test]
    fn cyrus_without_starttls() {
        let opts = cyrus::Options {
            plaintext: false,
            tls: false,
            ..cyrus::Options::default()
        };
        if let Some(s) = Cyrus::start_with(opts) {
            logindisabled_without_starttls_is_refused_as_sys_perm(&s);
        }
    }

    #[test]
    fn courier_with_starttls() {
        let opts = courier::Options {
            plaintext: false,
            tls: true,
        };
        if let Some(s) = Courier::start_with(opts) {
            logindisabled_with_starttls_upgrades(&s, s.ca_cert_path());
        }
    }

    /// Courier ignores IMAP_TLS_REQUIRED=1 when STARTTLS is off: no LOGINDISABLED, and the
    /// login in clear works. So Courier can't show a server without any way in.
    #[test]
    fn courier_tls_required_without_starttls_still_logs_in() {
        let opts = courier::Options {
            plaintext: false,
            tls: false,
        };
        if let Some(s) = Courier::start_with(opts) {
            s.deliver("INBOX", &small(1));
            let (r, log) = run(&s, &[], &format!("{LOGIN}STAT\r\nQUIT\r\n"));
            assert_eq!(r.len(), 5, "{r:?}\n{log}");
            assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
            assert!(r[3].status.starts_with("+OK 1 "), "{r:?}");
        }
    }
}

/// Courier's per-address limit: with 20 connections from 127.0.0.1 open, the 21st is closed
/// before the greeting. That is the server being busy, never a wrong password.
#[test]
fn courier_maxperip_is_a_temporary_failure() {
    let Some(s) = Courier::start() else {
        return;
    };
    s.deliver("INBOX", &small(1));
    let held: Vec<std::net::TcpStream> = (0..courier::MAXPERIP)
        .map(|_| {
            let tcp = std::net::TcpStream::connect(("127.0.0.1", s.imap_port)).unwrap();
            tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&tcp), &mut line).unwrap();
            assert!(line.starts_with("* OK"), "{line}");
            tcp
        })
        .collect();
    let script = format!("{LOGIN}STAT\r\nQUIT\r\n");
    let (r, log) = run(&s, &[], &script);
    assert_eq!(r.len(), 5, "{r:?}\n{log}");
    assert_eq!(
        r[2].status, "-ERR [SYS/TEMP] Account is temporarily unavailable; try again later.",
        "{log}"
    );
    assert!(
        log.contains("Courier MAXPERIP"),
        "the log names the likely cause: {log}"
    );
    // Once the others are gone, the next session is served (Courier's children take a moment
    // to notice the closed connections).
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (r, log) = run(&s, &[], &script);
        if r.len() == 5 && r[3].status.starts_with("+OK 1 ") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{r:?}\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `--uidl-format %g` on Cyrus is RFC 8474's EMAILID: the UIDLs are the ids Cyrus reports,
/// and the same messages in another folder under other UIDs (a rebuilt or moved mailbox) get
/// the same UIDLs. Cyrus derives EMAILID from the content, so a second copy of a message
/// shares its id: it still gets a UIDL of its own (`.2`).
#[test]
fn cyrus_uidl_g_is_emailid_and_survives_new_uids() {
    let Some(s) = Cyrus::start() else {
        return;
    };
    let mut messages = small(3);
    messages.push(messages[0].clone());
    s.deliver("INBOX", &messages);
    // The copy's UIDs are one higher: a message no one else has comes first.
    let copy = s.folder("Copy");
    let filler = b"Subject: filler\r\n\r\nonly here\r\n".to_vec();
    s.deliver(&copy, &[&[filler][..], &messages].concat());
    let ids = s.account().emailids("INBOX");
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(ids[0].1, ids[3].1, "one content, one EMAILID: {ids:?}");
    let mut want: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
    want[3].push_str(".2");
    let uidls = |mailbox: &str| -> Vec<String> {
        let script = format!("{LOGIN}UIDL\r\nQUIT\r\n");
        let (r, log) = run(&s, &["--uidl-format", "%g", "--mailbox", mailbox], &script);
        assert!(r.iter().all(Reply::ok), "{mailbox}: {r:?}\n{log}");
        r[3].body_str()
            .lines()
            .map(|l| l.split_once(' ').expect("n uidl").1.to_string())
            .collect()
    };
    assert_eq!(uidls("INBOX"), want);
    assert_eq!(uidls(&copy)[1..], want[..]);
}

/// Challenge-response mechanisms relayed to Cyrus (whose sasldb keeps what CRAM-MD5 and SCRAM
/// need): curl's CRAM-MD5 through systemd-socket-activate.
#[test]
fn cyrus_relays_cram_md5() {
    let opts = cyrus::Options {
        mechs: "PLAIN LOGIN CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-256",
        ..cyrus::Options::default()
    };
    let Some(s) = Cyrus::start_with(opts) else {
        return;
    };
    s.deliver("INBOX", &small(1));
    let mut a = args(&s);
    a.extend([
        "--sasl".into(),
        "PLAIN,LOGIN,CRAM-MD5,SCRAM-SHA-1,SCRAM-SHA-256".into(),
    ]);
    let act = Activator::start(true, &a);
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-u", "alice:alice-pw"])
        .args(["--login-options", "AUTH=CRAM-MD5"])
        .arg(format!("pop3://127.0.0.1:{}/1", act.port))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        act.log()
    );
    assert_eq!(out.stdout, b"Subject: m1\r\n\r\nbody 1\r\n");
}
/// Why aiopopd must wait for LOGIN's answer before its next command: Courier's imaplogin
/// execs imapd after the login, and what the client had pipelined behind LOGIN is lost (never
/// answered). Every Courier test above passes only because aiopopd doesn't do that.
#[test]
fn courier_drops_commands_pipelined_behind_login() {
    use std::io::{Read, Write};
    let Some(s) = Courier::start() else {
        return;
    };
    let mut t = std::net::TcpStream::connect(("127.0.0.1", s.imap_port)).unwrap();
    t.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    t.write_all(b"a LOGIN alice alice-pw\r\nb NOOP\r\n")
        .unwrap();
    // Read until LOGIN's answer, then give NOOP's a second to come.
    let mut out = Vec::new();
    let mut buf = [0; 4096];
    let start = std::time::Instant::now();
    let mut answered = None;
    while start.elapsed() < std::time::Duration::from_secs(15) {
        if let Ok(n @ 1..) = t.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        if answered.is_none() && String::from_utf8_lossy(&out).contains("\r\na ") {
            answered = Some(std::time::Instant::now());
        }
        if answered.is_some_and(|at| at.elapsed() > std::time::Duration::from_secs(1)) {
            break;
        }
    }
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("\r\na OK LOGIN"), "{out}");
    assert!(!out.contains("\r\nb "), "{out}");
}

/// Runs a session in two writes with a pause between them (a client at human speed).
fn run_paced(s: &dyn Server, first: &str, pause: Duration, second: &str) -> (Vec<Reply>, String) {
    let mut child = Command::new(pop3::BIN)
        .args(args(s))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start aiopopd");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(first.as_bytes()).expect("write");
    std::thread::sleep(pause);
    stdin.write_all(second.as_bytes()).expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("aiopopd output");
    let script = format!("{first}{second}");
    (
        replies(&out.stdout, &script),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A Courier Maildir no IMAP client has SELECTed yet (a POP3-only user's new account): there
/// each EXAMINE gives a new UIDVALIDITY (taken from the clock, recorded nowhere), so when
/// aiopopd listed under EXAMINE the UIDLs changed from one session to the next and a client
/// that leaves mail on the server downloaded everything again each time. It lists under
/// SELECT, which records one.
#[test]
fn courier_unrecorded_maildir_uidls_are_stable() {
    let Some(s) = Courier::start() else {
        return;
    };
    s.deliver_unrecorded("INBOX", &small(3));
    let script = format!("{LOGIN}UIDL\r\nQUIT\r\n");
    let (first, _) = run(&s, &[], &script);
    std::thread::sleep(Duration::from_millis(1100));
    let (second, log) = run(&s, &[], &script);
    assert_eq!(first[3].body_str(), second[3].body_str(), "{log}");
}

/// The same Maildir, a DELE, and a second between the listing and QUIT: when the listing was
/// under EXAMINE, the SELECT at QUIT recorded a new UIDVALIDITY and QUIT answered `-ERR
/// [SYS/TEMP] Some deleted messages were not removed.`, deleting nothing.
#[test]
fn courier_unrecorded_maildir_dele_is_applied() {
    let Some(s) = Courier::start() else {
        return;
    };
    s.deliver_unrecorded("INBOX", &small(3));
    let (r, log) = run_paced(
        &s,
        &format!("{LOGIN}STAT\r\nDELE 1\r\n"),
        Duration::from_millis(1100),
        "QUIT\r\n",
    );
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(flag_strings(&s.flags("INBOX")), ["\\Seen", "", ""]);
}
