//! POP3 sessions through aiopopd against GNU Mailutils imap4d 3.15 serving an mbox that a
//! delivery agent writes (tests/common/imap4d.rs): every reply compared with what imap4d
//! serves over IMAP, read through the reference client (imapref.rs), never with aiopopd's own
//! output; what each `--on-dele` action does there; and the UIDVALIDITY imap4d changes after
//! every delivery (the issue this server was reported with), as the default UIDLs and `%m` see
//! it.
//!
//! imap4d is unpacked from Debian's packages at test time (tests/common/debroot.rs). Without
//! it these tests fail, unless a developer sets AIOPOPD_SKIP_IMAP4D=1 (CI never does).

mod common;

use common::imap4d::Imap4d;
use common::pop3::{self, expected_retr, expected_top, replies, Reply};
use std::time::Duration;

const LOGIN: &str = "USER alice\r\nPASS alice-pw\r\n";
/// imap4d's UIDVALIDITY for a mailbox it hasn't recorded comes from the clock, in seconds: a
/// session this much later than the last one is sure to see another.
const NEXT_SECOND: Duration = Duration::from_millis(1100);

fn args(s: &Imap4d) -> Vec<String> {
    [
        "-H",
        "127.0.0.1",
        "-p",
        &s.imap_port.to_string(),
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
fn run(s: &Imap4d, extra: &[&str], script: &str) -> (Vec<Reply>, String) {
    let mut a = args(s);
    a.extend(extra.iter().map(|x| x.to_string()));
    let r = pop3::run(&a, script.as_bytes());
    (replies(&r.stdout, script), r.stderr)
}

/// Messages of the shapes that bite POP3 servers (as in tests/servers.rs), plus a body line
/// starting with "From ", stored as ">From " in the mbox: dot lines, no final line end,
/// 8-bit octets in the body and in the header, a 5,000-octet line, an empty body, a lone CR,
/// 1 MB.
fn corpus() -> Vec<Vec<u8>> {
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0;
    while big.len() < 1024 * 1024 + 12345 {
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
        b"Subject: from\r\n\r\nFrom the start of a line\r\n".to_vec(),
        big,
    ]
}

fn small(n: usize) -> Vec<Vec<u8>> {
    (1..=n)
        .map(|i| {
            format!("Subject: m{i}\r\nMessage-ID: <m{i}@test>\r\n\r\nbody {i}\r\n").into_bytes()
        })
        .collect()
}

fn flag_strings(flags: &[(u32, Vec<String>)]) -> Vec<String> {
    flags.iter().map(|(_, f)| f.join(" ")).collect()
}

/// The UIDL listing of one session (with `extra` arguments), one UIDL per message.
fn uidls(s: &Imap4d, extra: &[&str]) -> Vec<String> {
    let (r, log) = run(s, extra, &format!("{LOGIN}UIDL\r\nQUIT\r\n"));
    assert!(r.len() == 5 && r.iter().all(Reply::ok), "{r:?}\n{log}");
    r[3].body_str()
        .lines()
        .map(|l| l.split_once(' ').expect("n uidl").1.to_string())
        .collect()
}

/// Login, STAT, LIST, UIDL, and per message RETR, TOP n 0, TOP n 2, LIST n, UIDL n: every
/// octet as imap4d serves it over IMAP (its `X-IMAPbase`, `X-UID` and `Status` headers
/// included), sizes its RFC822.SIZE, UIDLs `%08Xu%08Xv` of its UIDs and UIDVALIDITY.
#[test]
fn retr_top_list_uidl_are_exact() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    s.deliver("INBOX", &corpus());
    let account = s.account();
    let bodies = account.bodies("INBOX");
    let sizes = account.sizes("INBOX");
    let uidvalidity = account.uidvalidity("INBOX");
    let n = bodies.len();
    assert_eq!(n, corpus().len());
    // imap4d's RFC822.SIZE is the size of what it serves.
    for ((_, body), (_, size)) in bodies.iter().zip(&sizes) {
        assert_eq!(body.len(), *size as usize);
    }
    let mut script = format!("{LOGIN}STAT\r\nLIST\r\nUIDL\r\n");
    for i in 1..=n {
        script.push_str(&format!(
            "RETR {i}\r\nTOP {i} 0\r\nTOP {i} 2\r\nLIST {i}\r\nUIDL {i}\r\n"
        ));
    }
    script.push_str("QUIT\r\n");
    let (r, log) = run(&s, &[], &script);
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
    // imap4d undoes the delivery agent's ">From " quoting.
    assert_eq!(
        bodies[6].1,
        b"Subject: from\r\nX-UID: 7\r\nStatus: O\r\n\r\nFrom the start of a line\r\n"
    );
    // RETR and TOP read with BODY.PEEK: nothing was marked.
    assert!(account.flags("INBOX").iter().all(|(_, f)| f.is_empty()));
}

/// USER/PASS with a wrong password, then AUTH PLAIN (decoded by aiopopd, a LOGIN to imap4d).
#[test]
fn logins() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    s.deliver("INBOX", &small(1));
    let script = "USER alice\r\nPASS wrong\r\nAUTH PLAIN AGFsaWNlAGFsaWNlLXB3\r\nSTAT\r\nQUIT\r\n";
    let (r, log) = run(&s, &[], script);
    assert_eq!(r.len(), 6, "{r:?}\n{log}");
    assert_eq!(r[2].status, "-ERR [AUTH] Authentication failed.", "{log}");
    assert!(r[3].ok(), "{r:?}\n{log}");
    assert!(r[4].status.starts_with("+OK 1 "), "{r:?}");
}

/// imap4d advertises CRAM-MD5, DIGEST-MD5 and SCRAM (GNU SASL is linked in) although it has
/// no secrets to complete them (no `gsasl { cram-passwd }`); aiopopd's CAPA offers only what
/// it completes itself, PLAIN and LOGIN, unless `--sasl` names more, and never asks the
/// server.
#[test]
fn capa_offers_no_mechanism_imap4d_advertises_but_cannot_complete() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    let mut session = s.account().login();
    let caps = session.capabilities().expect("CAPABILITY");
    for mech in ["CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"] {
        assert!(
            caps.has_str(format!("AUTH={mech}")),
            "imap4d advertises {mech}"
        );
    }
    let _ = session.logout();
    let (r, log) = run(&s, &[], "CAPA\r\nQUIT\r\n");
    assert!(r.len() == 3 && r[1].ok(), "{r:?}\n{log}");
    let capa = r[1].body_str();
    assert!(capa.contains("\r\nSASL PLAIN LOGIN\r\n"), "{capa}");
    for mech in ["CRAM", "SCRAM", "DIGEST"] {
        assert!(!capa.contains(mech), "{capa}");
    }
}

/// The default `--on-dele seen`: exactly the DELE'd message gets `\Seen` (imap4d stores it as
/// `Status: RO` in the mbox), and is no longer listed.
#[test]
fn on_dele_seen_marks_exactly_the_deleted() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    s.deliver("INBOX", &small(3));
    let (r, log) = run(&s, &[], &format!("{LOGIN}STAT\r\nDELE 2\r\nQUIT\r\n"));
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(
        flag_strings(&s.account().flags("INBOX")),
        ["", "\\Seen", ""]
    );
    let (r, _) = run(&s, &[], &format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r[3].status.starts_with("+OK 2 "), "{r:?}");
}

/// imap4d's PERMANENTFLAGS has no `\*`: an mbox can't keep keywords, so `keyword:NAME` is
/// refused at login, as a configuration error, and nothing is touched.
#[test]
fn on_dele_keyword_is_refused_at_login() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    s.deliver("INBOX", &small(2));
    let (r, log) = run(
        &s,
        &["--on-dele", "keyword:$Popped"],
        &format!("{LOGIN}STAT\r\nQUIT\r\n"),
    );
    assert_eq!(r.len(), 5, "{r:?}\n{log}");
    assert_eq!(
        r[2].status, "-ERR [SYS/PERM] The mailbox can't be served; tell the administrator.",
        "{log}"
    );
    assert!(log.contains("can't store the keyword $Popped"), "{log}");
    assert_eq!(flag_strings(&s.account().flags("INBOX")), ["", ""]);
}

/// `--on-dele expunge` without UIDPLUS: `\Deleted` and a plain EXPUNGE, since no other message
/// is marked `\Deleted`; exactly the DELE'd messages are gone.
#[test]
fn on_dele_expunge_removes_exactly_the_deleted() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    s.deliver("INBOX", &small(4));
    let uids: Vec<u32> = s.account().flags("INBOX").iter().map(|f| f.0).collect();
    let (r, log) = run(
        &s,
        &["--on-dele", "expunge"],
        &format!("{LOGIN}STAT\r\nDELE 1\r\nDELE 3\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert_eq!(
        s.account().flags("INBOX"),
        vec![(uids[1], vec![]), (uids[3], vec![])],
        "{log}"
    );
    let bodies = s.account().bodies("INBOX");
    assert!(bodies[0].1.starts_with(b"Subject: m2\r\n"), "{bodies:?}");
    assert!(bodies[1].1.starts_with(b"Subject: m4\r\n"), "{bodies:?}");
}

/// `--on-dele expunge` where another client left a message `\Deleted`: without UIDPLUS a plain
/// EXPUNGE would remove that one too, so the DELE'd messages are only marked `\Deleted` (never
/// listed again) and QUIT says so.
#[test]
fn on_dele_expunge_beside_another_deleted_only_marks() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    s.deliver("INBOX", &small(4));
    let account = s.account();
    account.add_flags("INBOX", account.flags("INBOX")[3].0, &["\\Deleted"]);
    let (r, log) = run(
        &s,
        &["--on-dele", "expunge"],
        &format!("{LOGIN}STAT\r\nDELE 1\r\nQUIT\r\n"),
    );
    assert_eq!(r.len(), 6, "{r:?}\n{log}");
    assert!(r[3].status.starts_with("+OK 3 "), "{r:?}");
    assert!(r[..5].iter().all(Reply::ok), "{r:?}\n{log}");
    assert!(
        log.contains("no UIDPLUS"),
        "the log says why nothing was expunged: {log}"
    );
    assert_eq!(
        r[5].status,
        "+OK pop.test POP3 proxy signing off (marked \\Deleted but not expunged: the IMAP \
         server lacks UIDPLUS and other mail is marked \\Deleted)."
    );
    assert_eq!(
        flag_strings(&account.flags("INBOX")),
        ["\\Deleted", "", "", "\\Deleted"]
    );
    let (r, _) = run(
        &s,
        &["--on-dele", "expunge"],
        &format!("{LOGIN}STAT\r\nQUIT\r\n"),
    );
    assert!(r[3].status.starts_with("+OK 2 "), "{r:?}");
}

/// `--on-dele move:Archive` without MOVE or UIDPLUS: COPY, `\Deleted`, EXPUNGE. The copy in
/// Archive is the message as imap4d served it (its `X-UID` and `Status` headers included,
/// rewritten for the new mailbox).
#[test]
fn on_dele_move_copies_then_expunges() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    s.deliver("INBOX", &small(3));
    s.create_mailbox("Archive");
    let account = s.account();
    let uids: Vec<u32> = account.flags("INBOX").iter().map(|f| f.0).collect();
    let (r, log) = run(
        &s,
        &["--on-dele", "move:Archive"],
        &format!("{LOGIN}DELE 2\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    let inbox = account.flags("INBOX");
    assert_eq!(
        inbox.iter().map(|f| f.0).collect::<Vec<_>>(),
        [uids[0], uids[2]],
        "{log}"
    );
    assert!(inbox.iter().all(|(_, f)| f.is_empty()), "{inbox:?}");
    let archived = account.bodies("Archive");
    assert_eq!(archived.len(), 1, "{log}");
    let body = String::from_utf8_lossy(&archived[0].1);
    assert!(body.starts_with("Subject: m2\r\n"), "{body}");
    assert!(body.ends_with("\r\n\r\nbody 2\r\n"), "{body}");
}

/// The issue imap4d was reported with, with the default UIDLs: a message the delivery agent
/// appended makes imap4d take a new UIDVALIDITY (from the clock) at the next session, so every
/// UIDL (`%08Xu%08Xv`) changes, although the UIDs stay. A client that leaves mail on the server
/// downloads everything again after each delivery: what the README tells imap4d users.
#[test]
fn default_uidls_change_after_each_delivery() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    s.deliver("INBOX", &small(2));
    let first = uidls(&s, &[]);
    // No delivery: the same UIDLs.
    std::thread::sleep(NEXT_SECOND);
    assert_eq!(uidls(&s, &[]), first);
    // A delivery: the two old messages keep their UIDs (the first 8 hex digits), under a new
    // UIDVALIDITY (the last 8).
    std::thread::sleep(NEXT_SECOND);
    s.deliver_unrecorded("INBOX", &small(3)[2..]);
    let second = uidls(&s, &[]);
    assert_eq!(second.len(), 3);
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a[..8], b[..8]);
        assert_ne!(a[8..], b[8..], "a new UIDVALIDITY");
    }
}

/// `--uidl-format %m` with a state directory: the same UIDLs in two sessions, and in a third
/// after a delivery (new UIDVALIDITY, so every header is read again), for every message but
/// the first: imap4d keeps its `X-IMAPbase: UIDVALIDITY UIDNEXT` header in the first message,
/// rewrites it after each delivery, and serves it as part of that message's header.
#[test]
fn uidl_m_is_stable_across_sessions_except_imap4d_s_first_message() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let m = [
        "--uidl-format",
        "%m",
        "--state-dir",
        state.path().to_str().unwrap(),
    ];
    s.deliver("INBOX", &small(3));
    let first = uidls(&s, &m);
    assert_eq!(first.len(), 3);
    std::thread::sleep(NEXT_SECOND);
    assert_eq!(uidls(&s, &m), first, "two sessions, no delivery");
    // A delivery, a session that records it (imap4d rewrites the mbox, X-IMAPbase included),
    // another delivery: the next session sees a new UIDVALIDITY and reads every header again.
    for n in 4..=5 {
        std::thread::sleep(NEXT_SECOND);
        s.deliver_unrecorded("INBOX", &small(n)[n - 1..]);
        uidls(&s, &m);
    }
    std::thread::sleep(NEXT_SECOND);
    let later = uidls(&s, &m);
    assert_eq!(later.len(), 5);
    assert_eq!(later[1..3], first[1..3], "messages 2 and 3");
    assert_ne!(later[0], first[0], "message 1 carries X-IMAPbase");
}

/// `%m` over mail the delivery agent wrote and no IMAP session has yet recorded: the first
/// session digests the header as delivered; imap4d then adds `X-UID` and `Status` to every
/// message when it writes the mbox back, and after the next delivery (new UIDVALIDITY, so the
/// digests are read again) every UIDL the first session gave has changed.
#[test]
fn uidl_m_changes_once_when_imap4d_first_records_delivered_mail() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let m = [
        "--uidl-format",
        "%m",
        "--state-dir",
        state.path().to_str().unwrap(),
    ];
    s.deliver_unrecorded("INBOX", &small(2));
    let first = uidls(&s, &m);
    std::thread::sleep(NEXT_SECOND);
    assert_eq!(uidls(&s, &m), first, "two sessions, no delivery");
    std::thread::sleep(NEXT_SECOND);
    s.deliver_unrecorded("INBOX", &small(3)[2..]);
    let later = uidls(&s, &m);
    assert_eq!(later.len(), 3);
    assert_ne!(later[0], first[0]);
    assert_ne!(later[1], first[1]);
}

/// The other half of the issue: after a delivery, an EXAMINE and a SELECT a second apart in
/// one IMAP session see different UIDVALIDITYs. aiopopd lists under its one SELECT and stays
/// selected, so a DELE a second after the listing is still applied at QUIT.
#[test]
fn dele_on_just_delivered_mail_is_applied() {
    let Some(s) = Imap4d::start() else {
        return;
    };
    s.deliver("INBOX", &small(2));
    std::thread::sleep(NEXT_SECOND);
    s.deliver_unrecorded("INBOX", &small(3)[2..]);
    let examined = s.account().uidvalidity("INBOX");
    std::thread::sleep(NEXT_SECOND);
    assert_ne!(
        s.account().uidvalidity("INBOX"),
        examined,
        "EXAMINE records nothing"
    );
    std::thread::sleep(NEXT_SECOND);
    let mut child = std::process::Command::new(pop3::BIN)
        .args(args(&s))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start aiopopd");
    let mut stdin = child.stdin.take().expect("stdin");
    let first = format!("{LOGIN}STAT\r\nDELE 3\r\n");
    std::io::Write::write_all(&mut stdin, first.as_bytes()).expect("write");
    std::thread::sleep(NEXT_SECOND);
    std::io::Write::write_all(&mut stdin, b"QUIT\r\n").expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("aiopopd");
    let log = String::from_utf8_lossy(&out.stderr);
    let r = replies(&out.stdout, &format!("{first}QUIT\r\n"));
    assert_eq!(r.len(), 6, "{r:?}\n{log}");
    assert!(r.iter().all(Reply::ok), "{r:?}\n{log}");
    assert!(r[3].status.starts_with("+OK 3 "), "{r:?}");
    assert_eq!(
        flag_strings(&s.account().flags("INBOX")),
        ["", "", "\\Seen"]
    );
}
