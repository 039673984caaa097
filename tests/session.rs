//! The aiopopd binary on a scripted stdin (as xinetd runs it) against a private Dovecot: every
//! command, every --on-dele action, and the failures a user meets. Replies are compared with
//! what Dovecot serves over IMAP, never with aiopopd's own output.

mod common;

use common::dovecot::Dovecot;
use common::pop3::{expected_retr, expected_top, replies, session, Reply};

const LOGIN: &str = "USER alice\r\nPASS alice-pw\r\n";

/// Messages with every shape that has bitten POP3 servers.
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
        b"Subject: dots\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n".to_vec(),
        b"Subject: bare LF\n\nline one\nline two\n".to_vec(),
        b"Subject: no final newline\r\n\r\nlast line".to_vec(),
        b"Subject: 8bit\r\nContent-Type: text/plain; charset=latin1\r\n\r\ncaf\xe9 \xff\xfe\x80\r\n".to_vec(),
        [&b"Subject: long line\r\n\r\n"[..], &[b'a'; 5000], b"\r\nshort\r\n"].concat(),
        b"Subject: empty body\r\n\r\n".to_vec(),
        big,
    ]
}

fn dovecot_with(messages: &[Vec<u8>]) -> Dovecot {
    let d = Dovecot::start();
    for m in messages {
        d.deliver("alice", "INBOX", m);
    }
    d
}

fn run(d: &Dovecot, extra: &[&str], script: &str) -> Vec<Reply> {
    let r = session(d, extra, script);
    replies(&r.stdout, script)
}

#[test]
fn retr_top_list_uidl_match_what_dovecot_serves() {
    let d = dovecot_with(&corpus());
    let bodies = d.imap_bodies("alice", "alice-pw", "INBOX");
    let sizes = d.imap_sizes("alice", "alice-pw", "INBOX");
    let n = bodies.len();
    let mut script = format!("{LOGIN}STAT\r\nLIST\r\nUIDL\r\n");
    for i in 1..=n {
        script.push_str(&format!(
            "RETR {i}\r\nTOP {i} 0\r\nTOP {i} 2\r\nLIST {i}\r\nUIDL {i}\r\n"
        ));
    }
    script.push_str("QUIT\r\n");
    let r = run(&d, &[], &script);
    assert_eq!(r.len(), 1 + 2 + 3 + 5 * n + 1, "{r:?}");
    let total: u32 = sizes.iter().map(|s| s.1).sum();
    assert_eq!(r[3].status, format!("+OK {n} {total}"));

    let list: String = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{} {}\r\n", i + 1, s.1))
        .collect();
    assert_eq!(r[4].body_str(), list);

    // UIDLs are Dovecot's own POP3 UIDLs, so a mailbox can move between the two.
    let dovecot_uidl = replies(
        &d.pop3_transcript(format!("{LOGIN}UIDL\r\nQUIT\r\n").as_bytes()),
        &format!("{LOGIN}UIDL\r\nQUIT\r\n"),
    );
    assert_eq!(r[5].body, dovecot_uidl[3].body);

    for (i, (_, body)) in bodies.iter().enumerate() {
        let at = 6 + 5 * i;
        let no = i + 1;
        assert!(r[at].ok(), "RETR {no}: {}", r[at].status);
        assert_eq!(
            r[at].body.as_deref(),
            Some(&expected_retr(body)[..]),
            "RETR {no}"
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
        let uidl = r[5].body_str().lines().nth(i).unwrap().to_string();
        assert_eq!(r[at + 4].status, format!("+OK {uidl}"));
    }
    assert!(r.last().unwrap().ok());
}

#[test]
fn retr_and_top_never_change_flags() {
    let d = dovecot_with(&corpus()[..3]);
    let before = d.flags("alice", "INBOX");
    let r = run(
        &d,
        &[],
        &format!("{LOGIN}RETR 1\r\nTOP 2 1\r\nRETR 3\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}");
    assert_eq!(d.flags("alice", "INBOX"), before);
    assert!(before.iter().all(|(_, f)| f.is_empty()));
}

/// After a RETR the next messages are fetched ahead; a client that skips around, deletes, uses
/// TOP or reads a message bigger than a chunk in between must still get exactly the right
/// octets, and what was fetched ahead but never retrieved stays untouched.
#[test]
fn messages_fetched_ahead_are_served_in_any_order_and_change_nothing() {
    let d = dovecot_with(&corpus());
    let bodies = d.imap_bodies("alice", "alice-pw", "INBOX");
    let script = format!(
        "{LOGIN}RETR 1\r\nDELE 2\r\nRETR 5\r\nRETR 3\r\nTOP 4 2\r\nRETR 7\r\n\
         RETR 2\r\nRETR 6\r\nRETR 4\r\nQUIT\r\n"
    );
    let r = run(&d, &["--on-dele", "expunge"], &script);
    assert_eq!(r.len(), 3 + 9 + 1, "{r:?}");
    let retr = |at: usize, no: usize| {
        assert!(r[at].ok(), "RETR {no}: {}", r[at].status);
        assert_eq!(
            r[at].body.as_deref(),
            Some(&expected_retr(&bodies[no - 1].1)[..]),
            "RETR {no}"
        );
    };
    retr(3, 1);
    retr(5, 5);
    retr(6, 3);
    assert_eq!(
        r[7].body.as_deref(),
        Some(&expected_top(&bodies[3].1, 2)[..])
    );
    retr(8, 7);
    assert_eq!(r[9].status, "-ERR That message is marked deleted.");
    retr(10, 6);
    retr(11, 4);
    assert!(r[12].ok(), "{}", r[12].status);
    let flags = d.flags("alice", "INBOX");
    let uids: Vec<u32> = flags.iter().map(|f| f.0).collect();
    assert_eq!(uids, [1, 3, 4, 5, 6, 7], "exactly message 2 expunged");
    assert!(flags.iter().all(|(_, f)| f.is_empty()), "{flags:?}");
}

/// A client that scans the headers first (TOP n 0 for all, with the next tops fetched ahead),
/// then retrieves everything: each answer whole and exact.
#[test]
fn a_header_scan_then_retrieval_is_exact() {
    let d = dovecot_with(&corpus());
    let bodies = d.imap_bodies("alice", "alice-pw", "INBOX");
    let n = bodies.len();
    let mut script = LOGIN.to_string();
    for i in 1..=n {
        script.push_str(&format!("TOP {i} 0\r\n"));
    }
    for i in 1..=n {
        script.push_str(&format!("RETR {i}\r\n"));
    }
    script.push_str("QUIT\r\n");
    let r = run(&d, &[], &script);
    assert_eq!(r.len(), 3 + 2 * n + 1, "{r:?}");
    for (i, (_, body)) in bodies.iter().enumerate() {
        assert_eq!(
            r[3 + i].body.as_deref(),
            Some(&expected_top(body, 0)[..]),
            "TOP {}",
            i + 1
        );
        assert_eq!(
            r[3 + n + i].body.as_deref(),
            Some(&expected_retr(body)[..]),
            "RETR {}",
            i + 1
        );
    }
    assert!(r.last().unwrap().ok());
}

fn three(d: &Dovecot) {
    for i in 1..=3 {
        d.deliver(
            "alice",
            "INBOX",
            format!("Subject: m{i}\r\n\r\nbody {i}\r\n").as_bytes(),
        );
    }
}

#[test]
fn on_dele_seen_is_the_default_and_lists_only_unseen_mail() {
    let d = Dovecot::start();
    three(&d);
    d.deliver_with_flags("alice", "INBOX", b"Subject: read\r\n\r\nx\r\n", &["\\Seen"]);
    let r = run(&d, &[], &format!("{LOGIN}STAT\r\nDELE 2\r\nQUIT\r\n"));
    assert_eq!(
        r[3].status.split(' ').nth(1),
        Some("3"),
        "the \\Seen message is not listed"
    );
    assert!(r[5].ok());
    let flags = d.flags("alice", "INBOX");
    assert_eq!(
        flags.iter().map(|(_, f)| f.join(" ")).collect::<Vec<_>>(),
        ["", "\\Seen", "", "\\Seen"]
    );
    // The next session no longer lists it.
    let r = run(&d, &[], &format!("{LOGIN}STAT\r\nQUIT\r\n"));
    assert!(r[3].status.starts_with("+OK 2 "));
}

#[test]
fn on_dele_keyword_adds_only_the_keyword() {
    let d = Dovecot::start();
    three(&d);
    let r = run(
        &d,
        &["--on-dele", "keyword:$Popped"],
        &format!("{LOGIN}DELE 1\r\nDELE 3\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}");
    let flags = d.flags("alice", "INBOX");
    assert_eq!(
        flags.iter().map(|(_, f)| f.join(" ")).collect::<Vec<_>>(),
        ["$Popped", "", "$Popped"]
    );
    let r = run(
        &d,
        &["--on-dele", "keyword:$Popped"],
        &format!("{LOGIN}STAT\r\nQUIT\r\n"),
    );
    assert!(r[3].status.starts_with("+OK 1 "));
    // Keyword mode doesn't look at \Seen.
    d.deliver_with_flags("alice", "INBOX", b"Subject: read\r\n\r\nx\r\n", &["\\Seen"]);
    let r = run(
        &d,
        &["--on-dele", "keyword:$Popped"],
        &format!("{LOGIN}STAT\r\nQUIT\r\n"),
    );
    assert!(r[3].status.starts_with("+OK 2 "));
}

#[test]
fn on_dele_expunge_removes_exactly_the_deleted_uids() {
    let d = Dovecot::start();
    three(&d);
    // Another client's \Deleted message, not yet expunged: it must survive.
    d.deliver_with_flags(
        "alice",
        "INBOX",
        b"Subject: theirs\r\n\r\nx\r\n",
        &["\\Deleted"],
    );
    let r = run(
        &d,
        &["--on-dele", "expunge"],
        &format!("{LOGIN}STAT\r\nDELE 1\r\nDELE 2\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}");
    assert!(
        r[3].status.starts_with("+OK 3 "),
        "expunge mode lists everything but \\Deleted mail: {r:?}"
    );
    let flags = d.flags("alice", "INBOX");
    assert_eq!(flags, vec![(3, vec![]), (4, vec!["\\Deleted".to_string()])]);
}

#[test]
fn on_dele_move_moves_to_the_folder() {
    let d = Dovecot::start();
    three(&d);
    d.create_mailbox("alice", "Archive");
    let r = run(
        &d,
        &["--on-dele", "move:Archive"],
        &format!("{LOGIN}DELE 2\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}");
    assert_eq!(
        d.flags("alice", "INBOX")
            .iter()
            .map(|f| f.0)
            .collect::<Vec<_>>(),
        [1, 3]
    );
    let archived = d.imap_bodies("alice", "alice-pw", "Archive");
    assert_eq!(archived.len(), 1);
    assert_eq!(archived[0].1, b"Subject: m2\r\n\r\nbody 2\r\n");
}

/// Names beyond ASCII (and with `&`) go to the server in modified UTF-7.
#[test]
fn mailboxes_with_non_ascii_names_are_served_and_moved_to() {
    let d = Dovecot::start();
    d.create_mailbox("alice", "Entwürfe & Co");
    d.create_mailbox("alice", "Gelöscht");
    for i in 1..=2 {
        d.deliver(
            "alice",
            "Entwürfe & Co",
            format!("Subject: m{i}\r\n\r\nbody {i}\r\n").as_bytes(),
        );
    }
    let r = run(
        &d,
        &["--mailbox", "Entwürfe & Co", "--on-dele", "move:Gelöscht"],
        &format!("{LOGIN}STAT\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}");
    assert!(r[3].status.starts_with("+OK 2 "), "{r:?}");
    assert_eq!(r[4].body_str(), "Subject: m1\r\n\r\nbody 1\r\n");
    assert_eq!(d.flags("alice", "Entwürfe & Co").len(), 1);
    assert_eq!(d.flags("alice", "Gelöscht").len(), 1);
}

#[test]
fn on_dele_keep_changes_nothing_and_lists_everything() {
    let d = Dovecot::start();
    three(&d);
    d.deliver_with_flags("alice", "INBOX", b"Subject: read\r\n\r\nx\r\n", &["\\Seen"]);
    let before = d.flags("alice", "INBOX");
    let r = run(
        &d,
        &["--on-dele", "keep"],
        &format!("{LOGIN}STAT\r\nDELE 1\r\nQUIT\r\n"),
    );
    assert!(r.iter().all(Reply::ok), "{r:?}");
    assert!(r[3].status.starts_with("+OK 4 "));
    assert_eq!(d.flags("alice", "INBOX"), before);
}

#[test]
fn a_session_that_ends_without_quit_changes_nothing() {
    let d = Dovecot::start();
    three(&d);
    d.create_mailbox("alice", "Archive");
    for mode in ["seen", "expunge", "move:Archive"] {
        let r = run(
            &d,
            &["--on-dele", mode],
            &format!("{LOGIN}DELE 1\r\nDELE 2\r\nRETR 3\r\n"),
        );
        assert_eq!(r.len(), 6, "{mode}: {r:?}");
        assert_eq!(
            d.flags("alice", "INBOX"),
            vec![(1, vec![]), (2, vec![]), (3, vec![])],
            "{mode}"
        );
    }
}

#[test]
fn wrong_password_is_an_auth_error_and_the_password_is_never_logged() {
    let d = Dovecot::start();
    let script = "USER alice\r\nPASS Zebra-Quartz-91\r\nUSER alice\r\nPASS alice-pw\r\nQUIT\r\n";
    let out = session(&d, &["-v"], script);
    let r = replies(&out.stdout, script);
    assert_eq!(r[2].status, "-ERR [AUTH] Authentication failed.");
    assert!(
        r[4].ok(),
        "a second try on the same connection works: {r:?}"
    );
    assert!(
        out.stderr
            .contains("login failed: user=alice rip=pipe reason="),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("Zebra-Quartz-91") && !out.stderr.contains("alice-pw"));
}

#[test]
fn imap_down_is_a_temporary_error() {
    let d = Dovecot::start();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = format!("{LOGIN}QUIT\r\n");
    let out = common::pop3::run(
        &[
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--allow-plaintext-auth",
            "-l",
            "--auth-failure-delay",
            "0",
        ]
        .map(String::from),
        script.as_bytes(),
    );
    let r = replies(&out.stdout, &script);
    assert_eq!(
        r[2].status,
        "-ERR [SYS/TEMP] Account is temporarily unavailable; try again later."
    );
    assert!(r[3].ok());
    drop(d);
}

#[test]
fn a_missing_mailbox_is_a_permanent_error() {
    let d = Dovecot::start();
    let r = run(&d, &["--mailbox", "Nope"], &format!("{LOGIN}QUIT\r\n"));
    assert!(r[2].status.starts_with("-ERR [SYS/PERM] "), "{r:?}");
}

#[test]
fn plaintext_login_is_refused_unless_allowed() {
    let d = Dovecot::start();
    three(&d);
    let script = format!("CAPA\r\n{LOGIN}STAT\r\n");
    let out = common::pop3::run(
        &["-H", "127.0.0.1", "-p", &d.imap_port.to_string(), "-l"].map(String::from),
        script.as_bytes(),
    );
    let r = replies(&out.stdout, &script);
    assert!(!r[1].body_str().contains("USER\r\n"));
    assert!(r[2].status.starts_with("-ERR [AUTH] "));
    assert!(r[3].status.starts_with("-ERR"));
    assert!(
        !d.log_contents().contains("imap-login: Login"),
        "IMAP was never contacted"
    );
}

#[test]
fn max_messages_lists_the_oldest_and_uidl_format_is_honoured() {
    let d = Dovecot::start();
    three(&d);
    let v = d.uidvalidity("alice", "INBOX");
    let r = run(
        &d,
        &["--max-messages", "2", "--uidl-format", "%v-%u"],
        &format!("{LOGIN}UIDL\r\nRETR 3\r\nQUIT\r\n"),
    );
    assert_eq!(r[3].body_str(), format!("1 {v}-1\r\n2 {v}-2\r\n"));
    assert_eq!(r[4].status, "-ERR No such message.");
}

#[test]
fn user_dir_files_pick_the_server_and_unknown_users_look_like_bad_passwords() {
    let d = Dovecot::start();
    three(&d);
    let (_dir, args) = common::pop3::user_dir(&d, "gmail-import", Some("alice"));
    let script = "USER gmail-import\r\nPASS alice-pw\r\nSTAT\r\nQUIT\r\n";
    let r = replies(&common::pop3::run(&args, script.as_bytes()).stdout, script);
    assert!(r[3].status.starts_with("+OK 3 "), "{r:?}");

    let script = "USER nobody-here\r\nPASS x\r\nUSER gmail-import\r\nPASS wrong\r\nUSER ../etc\r\nPASS x\r\nQUIT\r\n";
    let r = replies(&common::pop3::run(&args, script.as_bytes()).stdout, script);
    assert_eq!(r[2].status, r[4].status);
    assert_eq!(r[2].status, "-ERR [AUTH] Authentication failed.");
    assert_eq!(r[6].status, "-ERR [AUTH] Authentication failed.");
}

#[test]
fn long_lines_bad_commands_and_pipelining() {
    let d = Dovecot::start();
    three(&d);
    let long = "x".repeat(300);
    let mut script = format!("{LOGIN}NOOP {long}\r\nBOGUS\r\nRETR 0\r\nDELE 99\r\n");
    script.push_str(&"NOOP\r\n".repeat(2000));
    script.push_str("STAT\r\nQUIT\r\n");
    let r = run(&d, &[], &script);
    assert_eq!(r[3].status, "-ERR Line too long.");
    assert_eq!(r[4].status, "-ERR Unknown command.");
    assert_eq!(r[5].status, "-ERR Message numbers start at 1.");
    assert_eq!(r[6].status, "-ERR No such message.");
    assert_eq!(r.len(), 7 + 2000 + 2);
    assert!(r.last().unwrap().ok());
}

#[test]
fn three_bad_commands_before_login_close_the_session() {
    let d = Dovecot::start();
    let script = "HELO x\r\nGET / HTTP/1.1\r\nSTAT\r\nUSER alice\r\n";
    let r = run(&d, &[], script);
    assert_eq!(r.len(), 5);
    assert_eq!(r[4].status, "-ERR Too many bad commands; closing.");
}

#[test]
fn a_bad_command_line_answers_the_client_with_sys_perm() {
    let out = common::pop3::run(
        &["--on-dele".to_string(), "shred".to_string()],
        b"USER a\r\n",
    );
    assert!(!out.ok);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "-ERR [SYS/PERM] aiopopd is misconfigured; see the server log.\r\n"
    );
    assert!(out.stderr.contains("--on-dele \"shred\""));
}

/// Names as the user writes them, on a server that keeps personal folders under `INBOX.` with
/// `.` between levels (Cyrus and Courier do; here Dovecot set up the same way): `--mailbox
/// Archive/2026` and `move:Archive` find `INBOX.Archive.2026` and `INBOX.Archive`; `move:\Junk`
/// finds the folder the server marks `\Junk`; a target that doesn't exist is refused at login
/// (`-ERR [SYS/PERM]`), not at QUIT after the client took the mail.
#[test]
fn folder_names_follow_the_servers_namespace_and_special_use() {
    let d = Dovecot::start_with_config(
        "namespace inbox {\n  inbox = yes\n  prefix = INBOX.\n  separator = .\n  \
         mailbox Spam {\n    special_use = \\Junk\n  }\n}\n",
    );
    for m in ["INBOX.Archive", "INBOX.Archive.2026", "INBOX.Spam"] {
        d.create_mailbox("alice", m);
    }
    d.deliver("alice", "INBOX.Archive.2026", b"Subject: old\r\n\r\nx\r\n");
    three(&d);
    let r = run(
        &d,
        &["--mailbox", "Archive/2026"],
        &format!("{LOGIN}STAT\r\nQUIT\r\n"),
    );
    assert!(r[3].status.starts_with("+OK 1 "), "{r:?}");
    for (target, folder) in [
        ("move:Archive", "INBOX.Archive"),
        ("move:\\Junk", "INBOX.Spam"),
    ] {
        let r = run(
            &d,
            &["--on-dele", target],
            &format!("{LOGIN}DELE 1\r\nQUIT\r\n"),
        );
        assert!(r.iter().all(Reply::ok), "{target}: {r:?}");
        assert_eq!(d.flags("alice", folder).len(), 1, "{target}");
    }
    let before = d.flags("alice", "INBOX");
    for target in ["move:Attic", "move:\\Archive"] {
        let r = run(&d, &["--on-dele", target], &format!("{LOGIN}QUIT\r\n"));
        assert_eq!(
            r[2].status, "-ERR [SYS/PERM] The mailbox can't be served; tell the administrator.",
            "{target}"
        );
    }
    assert_eq!(d.flags("alice", "INBOX"), before);
}

/// `--uidl-format %g`: Dovecot's X-GUID, the same before and after the mailbox gets a new
/// UIDVALIDITY (as a rebuilt or restored mailbox does), where the default format's UIDLs all
/// change and a client leaving mail on the server would download everything again.
#[test]
fn server_ids_as_uidls_survive_a_uidvalidity_change() {
    let d = Dovecot::start();
    three(&d);
    let uidl = |format: &str| {
        let r = run(
            &d,
            &["--uidl-format", format],
            &format!("{LOGIN}UIDL\r\nUIDL 2\r\nQUIT\r\n"),
        );
        assert!(r[3].ok() && r[4].ok(), "{r:?}");
        (r[3].body_str().to_string(), r[4].status.clone())
    };
    let (by_guid, second) = uidl("%g");
    let guids = d.doveadm(&["fetch", "-u", "alice", "guid", "mailbox", "INBOX"]);
    let guids: Vec<&str> = guids
        .lines()
        .filter_map(|l| l.strip_prefix("guid: "))
        .collect();
    let expected: String = guids
        .iter()
        .enumerate()
        .map(|(i, g)| format!("{} {g}\r\n", i + 1))
        .collect();
    assert_eq!(by_guid, expected);
    assert_eq!(second, format!("+OK 2 {}", guids[1]));
    let (by_uid, _) = uidl("%08Xu%08Xv");
    d.doveadm(&[
        "mailbox",
        "update",
        "-u",
        "alice",
        "--uid-validity",
        "12345",
        "INBOX",
    ]);
    assert_eq!(
        uidl("%g").0,
        by_guid,
        "the same after the UIDVALIDITY change"
    );
    assert_ne!(
        uidl("%08Xu%08Xv").0,
        by_uid,
        "while the default format's all change"
    );
}

/// `--uidl-format %m`: the MD5 of each message's header section, the same after a new
/// UIDVALIDITY and on a second server the mail was moved to by re-delivery (new UIDs, new
/// UIDVALIDITY); two messages with the same header still get distinct UIDLs.
#[test]
fn header_digests_as_uidls_survive_a_rebuild_and_a_move() {
    use md5::{Digest, Md5};
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let d = Dovecot::start();
    three(&d);
    let twin = b"Subject: twin\r\n\r\nsame header, same body\r\n";
    d.deliver("alice", "INBOX", twin);
    d.deliver("alice", "INBOX", twin);
    let uidls = |d: &Dovecot| {
        let r = run(
            d,
            &["--uidl-format", "%m", "--state-dir", state_dir],
            &format!("{LOGIN}UIDL\r\nQUIT\r\n"),
        );
        assert!(r[3].ok(), "{r:?}");
        r[3].body_str().to_string()
    };
    let before = uidls(&d);
    let bodies = d.imap_bodies("alice", "alice-pw", "INBOX");
    let hex = |b: &[u8]| -> String {
        let end = b
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(b.len(), |i| i + 4);
        Md5::digest(&b[..end])
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    };
    let lines: Vec<&str> = before.lines().collect();
    assert_eq!(lines.len(), 5);
    for (i, (_, body)) in bodies.iter().enumerate().take(4) {
        assert_eq!(lines[i], format!("{} {}", i + 1, hex(body)), "{before}");
    }
    assert!(
        lines[4] == format!("5 {}.2", hex(twin)),
        "the second twin gets .2: {before}"
    );
    // Warm cache, then a new UIDVALIDITY (the cache is stale: every header read again).
    assert_eq!(uidls(&d), before);
    d.doveadm(&[
        "mailbox",
        "update",
        "-u",
        "alice",
        "--uid-validity",
        "777",
        "INBOX",
    ]);
    assert_eq!(uidls(&d), before, "the same after the UIDVALIDITY change");
    // Moved to another server by re-delivering every message: new UIDs and UIDVALIDITY.
    let moved = Dovecot::start();
    moved.deliver(
        "alice",
        "INBOX",
        b"Subject: spacer\r\n\r\nso the UIDs differ\r\n",
    );
    moved.doveadm(&["expunge", "-u", "alice", "mailbox", "INBOX", "all"]);
    for (_, body) in &bodies {
        moved.deliver("alice", "INBOX", body);
    }
    assert_eq!(uidls(&moved), before, "the same on the other server");
}
