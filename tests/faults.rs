//! Faults lose nothing (issue 8): the IMAP connection dropped, stalled or answering NO/BAD/BYE at
//! each step, a UIDVALIDITY that changes, mail expunged by another client, aiopopd killed, a
//! client that goes silent or stops reading. Where Dovecot can't show the fault on cue, a scripted
//! fake IMAP server does (`common::fakeimap`); "nothing changed" is then "no STORE, EXPUNGE, COPY
//! or MOVE reached the server". Every wait is bounded: a hang fails the test.

mod common;

use common::activate::Activator;
use common::dovecot::Dovecot;
use common::fakeimap::{run_within, Act, Aiopopd, Builder, FakeImap, Finished, GREETING};
use common::pop3::args as dovecot_args;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

const LOGIN: &str = "USER alice\r\nPASS alice-pw\r\n";
/// The longest any single run may take before it counts as a hang.
const LIMIT: Duration = Duration::from_secs(15);

fn msg(i: usize) -> Vec<u8> {
    format!("Subject: m{i}\r\n\r\nbody {i}\r\n.dot line\r\n").into_bytes()
}

/// A message of about `size` octets, in lines, some starting with a dot.
fn big(size: usize) -> Vec<u8> {
    let mut m = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0;
    while m.len() < size {
        let line = if i % 5 == 0 {
            format!(".{i:08} {}\r\n", "d".repeat(70))
        } else {
            format!("{i:08} {}\r\n", "z".repeat(70))
        };
        m.extend_from_slice(line.as_bytes());
        i += 1;
    }
    m
}

/// INBOX with three small messages (UIDs 1, 2, 3).
fn three() -> Builder {
    FakeImap::builder()
        .message(&msg(1))
        .message(&msg(2))
        .message(&msg(3))
}

fn run(fake: &FakeImap, extra: &[&str], script: &str) -> Finished {
    let mut a = fake.args();
    a.extend(extra.iter().map(|s| s.to_string()));
    let r = run_within(&a, script.as_bytes(), LIMIT);
    r.assert_clean();
    r
}

/// Status lines after the greeting.
fn replies(r: &Finished) -> Vec<String> {
    let s = r.status_lines();
    assert!(
        s.first().is_some_and(|g| g.starts_with("+OK")),
        "no greeting: {s:?}\n{}",
        r.stderr
    );
    s[1..].to_vec()
}

#[test]
fn imap_dropped_mid_retr_never_sends_the_terminator() {
    // The second chunk of a 3 MiB message is cut in the middle of its literal.
    let body = big(3 << 20);
    let fake = FakeImap::builder()
        .message(&msg(1))
        .message(&body)
        .on_nth("UID FETCH", 2, Act::CutMidResponse)
        .start();
    let r = run(
        &fake,
        &[],
        &format!("{LOGIN}DELE 1\r\nRETR 2\r\nNOOP\r\nQUIT\r\n"),
    );
    let rep = replies(&r);
    assert_eq!(
        rep[..4],
        [
            "+OK Send your password.",
            "+OK Logged in, 2 messages.",
            "+OK Marked to be deleted.",
            &format!("+OK {} octets", body.len()),
        ],
        "{}",
        r.stderr
    );
    assert_eq!(rep.len(), 4, "nothing after the partial message: {rep:?}");
    let header = format!("+OK {} octets\r\n", body.len());
    let start = find(&r.stdout, header.as_bytes()).unwrap() + header.len();
    let sent = &r.stdout[start..];
    assert!(
        sent.len() > 1000,
        "the first chunk was sent: {}\n{}",
        sent.len(),
        r.stderr
    );
    assert!(sent.len() < body.len(), "not the whole message");
    assert!(
        !sent.ends_with(b"\r\n.\r\n"),
        "a truncated message must not be terminated"
    );
    assert!(
        r.stderr.contains("left unterminated"),
        "the log says why: {}",
        r.stderr
    );
    assert!(fake.mutations().is_empty(), "{:?}", fake.mutations());
    assert_eq!(fake.inbox(), vec![(1, vec![]), (2, vec![])]);
}

#[test]
fn imap_dropped_before_the_first_octet_is_a_clean_err() {
    let fake = three().on("UID FETCH", Act::CutMidResponse).start();
    let r = run(
        &fake,
        &[],
        &format!("{LOGIN}DELE 2\r\nRETR 1\r\nNOOP\r\nQUIT\r\n"),
    );
    let rep = replies(&r);
    assert_eq!(
        rep[2..],
        [
            "+OK Marked to be deleted.",
            "-ERR [SYS/TEMP] The mail server failed; try again later."
        ],
        "the session ends after the error: {rep:?}"
    );
    assert!(fake.mutations().is_empty());
}

/// Each way the update at QUIT can fail: `-ERR [SYS/TEMP]`, a log line that names the commands
/// applied before the failure and the UIDs concerned, nothing beyond what the log says.
#[test]
fn imap_failing_during_update_is_an_err_and_the_log_says_what_was_applied() {
    struct Case {
        on_dele: &'static str,
        verb: &'static str,
        act: Act,
        /// What the log must say was applied before the failure.
        applied: &'static str,
    }
    let cases = [
        Case {
            on_dele: "seen",
            verb: "SELECT",
            act: Act::Bye("shutting down".into()),
            applied: "",
        },
        Case {
            on_dele: "seen",
            verb: "SELECT",
            act: Act::No("[UNAVAILABLE] later".into()),
            applied: "",
        },
        Case {
            on_dele: "seen",
            verb: "UID STORE",
            act: Act::Close,
            applied: "",
        },
        Case {
            on_dele: "seen",
            verb: "UID STORE",
            act: Act::No("[SERVERBUG] oops".into()),
            applied: "",
        },
        Case {
            on_dele: "expunge",
            verb: "SELECT",
            act: Act::Close,
            applied: "",
        },
        Case {
            on_dele: "expunge",
            verb: "UID EXPUNGE",
            act: Act::Bad("nope".into()),
            applied: "UID STORE 1:2 +FLAGS.SILENT (\\Deleted)",
        },
        Case {
            on_dele: "move:Archive",
            verb: "UID MOVE",
            act: Act::Stall,
            applied: "",
        },
    ];
    thread::scope(|s| {
        for c in &cases {
            s.spawn(move || {
                // The first SELECT is the listing's; the update's is the second.
                let nth = if c.verb == "SELECT" { 2 } else { 1 };
                let fake = three()
                    .folder("Archive")
                    .on_nth(c.verb, nth, c.act.clone())
                    .start();
                let r = run(
                    &fake,
                    &["--on-dele", c.on_dele, "--imap-timeout", "1"],
                    &format!("{LOGIN}DELE 1\r\nDELE 2\r\nQUIT\r\n"),
                );
                let what = format!("{} failing at {} with {:?}", c.on_dele, c.verb, c.act);
                assert_eq!(
                    replies(&r).last().map(String::as_str),
                    Some("-ERR [SYS/TEMP] Some deleted messages were not removed."),
                    "{what}"
                );
                let line = r
                    .stderr
                    .lines()
                    .find(|l| l.contains("update failed"))
                    .unwrap_or_else(|| panic!("{what}: no update failure logged:\n{}", r.stderr));
                assert!(
                    line.contains("1:2") && line.contains(&format!("[{}]", c.applied)),
                    "{what}: the log must name the UIDs and what was applied ([{}]): {line}",
                    c.applied
                );
                let applied: Vec<String> = if c.applied.is_empty() {
                    vec![]
                } else {
                    vec![c.applied.to_string()]
                };
                assert_eq!(fake.changes(), applied, "{what}");
            });
        }
    });
}

/// After an update that failed half-way, running the same session again is safe: it serves
/// nothing twice (in expunge mode the messages left marked \Deleted are not listed again; in
/// seen mode the same messages are listed and marked) and touches nothing else.
#[test]
fn a_failed_update_can_be_rerun_safely() {
    let script = format!("{LOGIN}STAT\r\nDELE 1\r\nDELE 2\r\nQUIT\r\n");
    // Expunge mode: \Deleted stored, UID EXPUNGE refused; the re-run expunges exactly those.
    let fake = three()
        .message_with_flags(&msg(4), &["\\Deleted"])
        .on("UID EXPUNGE", Act::No("[SERVERBUG] try again".into()))
        .start();
    let first = run(&fake, &["--on-dele", "expunge"], &script);
    assert!(replies(&first)
        .last()
        .unwrap()
        .starts_with("-ERR [SYS/TEMP]"));
    // The log names the failed command, the server's reason, and what was applied before it.
    let line = first
        .stderr
        .lines()
        .find(|l| l.contains("update failed"))
        .unwrap_or_else(|| panic!("no update failure logged:\n{}", first.stderr));
    for part in [
        "UID EXPUNGE 1:2",
        "[SERVERBUG] try again",
        "[UID STORE 1:2 +FLAGS.SILENT (\\Deleted)]",
    ] {
        assert!(line.contains(part), "{part:?} not in {line}");
    }
    // The DELE'd messages are marked \Deleted now, like another client's: the re-run lists
    // neither (nothing served twice), and touches nothing.
    let second = run(
        &fake,
        &["--on-dele", "expunge"],
        &format!("{LOGIN}STAT\r\nQUIT\r\n"),
    );
    let rep = replies(&second);
    assert_eq!(rep[2], format!("+OK 1 {}", msg(3).len()));
    assert!(rep.last().unwrap().starts_with("+OK"), "{rep:?}");
    let deleted = || vec!["\\Deleted".to_string()];
    assert_eq!(
        fake.inbox(),
        vec![(1, deleted()), (2, deleted()), (3, vec![]), (4, deleted())],
        "nothing expunged by the re-run; nothing else touched"
    );

    // Seen mode: the connection drops at the STORE; the re-run lists the same messages.
    let fake = three().on("UID STORE", Act::Close).start();
    let first = run(&fake, &[], &script);
    assert!(replies(&first)
        .last()
        .unwrap()
        .starts_with("-ERR [SYS/TEMP]"));
    let second = run(&fake, &[], &script);
    assert_eq!(replies(&second)[2], replies(&first)[2], "same listing");
    assert!(replies(&second).last().unwrap().starts_with("+OK"));
    let seen = vec!["\\Seen".to_string()];
    assert_eq!(
        fake.inbox(),
        vec![(1, seen.clone()), (2, seen), (3, vec![])]
    );
}

#[test]
fn killed_after_dele_before_quit_changes_nothing() {
    let d = Dovecot::start();
    for i in 1..=3 {
        d.deliver("alice", "INBOX", &msg(i));
    }
    let before = d.flags("alice", "INBOX");
    for on_dele in ["seen", "expunge", "move:Archive"] {
        let mut a = dovecot_args(&d);
        a.extend(["--on-dele".to_string(), on_dele.to_string()]);
        let mut p = Aiopopd::spawn(&a);
        p.send(format!("{LOGIN}DELE 1\r\nDELE 3\r\nRETR 2\r\n").as_bytes());
        assert!(
            p.wait_for_replies(6, LIMIT),
            "{on_dele}: {:?}",
            String::from_utf8_lossy(&p.stdout())
        );
        p.kill9();
        let deadline = Instant::now() + LIMIT;
        while !p.exited() {
            assert!(Instant::now() < deadline, "SIGKILL did not end aiopopd");
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(d.flags("alice", "INBOX"), before, "{on_dele}");
        assert!(d.flags("alice", "Archive").is_empty(), "{on_dele}");
    }
}

/// `--imap-timeout 1`: a server that goes silent at any step costs about a second, then
/// `-ERR [SYS/TEMP]`; nothing is changed.
#[test]
fn imap_stalls_end_with_sys_temp_and_no_hang() {
    let big_body = big(2 << 20);
    let cases: [(&str, usize, &str, &str); 8] = [
        (GREETING, 1, "QUIT\r\n", "-ERR [SYS/TEMP]"),
        ("LOGIN", 1, "QUIT\r\n", "-ERR [SYS/TEMP]"),
        ("SELECT", 1, "QUIT\r\n", "-ERR [SYS/TEMP]"),
        ("FETCH", 1, "QUIT\r\n", "-ERR [SYS/TEMP]"),
        ("UID FETCH", 1, "RETR 1\r\nQUIT\r\n", "-ERR [SYS/TEMP]"),
        // The second chunk of the big message: the reply has begun; no terminator follows.
        ("UID FETCH", 2, "RETR 4\r\nQUIT\r\n", "+OK"),
        ("SELECT", 2, "DELE 1\r\nQUIT\r\n", "-ERR [SYS/TEMP]"),
        ("UID STORE", 1, "DELE 1\r\nQUIT\r\n", "-ERR [SYS/TEMP]"),
    ];
    thread::scope(|s| {
        for (verb, nth, rest, expect) in cases {
            let big_body = &big_body;
            s.spawn(move || {
                let fake = three()
                    .message(big_body)
                    .on_nth(verb, nth, Act::Stall)
                    .start();
                let started = Instant::now();
                let r = run(&fake, &["--imap-timeout", "1"], &format!("{LOGIN}{rest}"));
                let elapsed = started.elapsed();
                let rep = replies(&r);
                let what = format!("stall at {verb} #{nth}: {rep:?}\n{}", r.stderr);
                if matches!(
                    (verb, nth),
                    (GREETING | "LOGIN" | "FETCH", _) | ("SELECT", 1)
                ) {
                    // A failed login leaves the session in AUTHORIZATION: QUIT still works.
                    assert_eq!(rep.len(), 3, "{what}");
                    assert!(rep[1].starts_with(expect), "{what}");
                    assert_eq!(rep[2], "+OK Bye.", "{what}");
                } else {
                    // In TRANSACTION the session ends with the failure: the last reply.
                    assert!(rep.last().unwrap().starts_with(expect), "{what}");
                }
                if verb == "UID FETCH" && nth == 2 {
                    assert!(!r.stdout.ends_with(b"\r\n.\r\n"), "{what}");
                }
                if verb == GREETING {
                    // A server that never greets is likely a TLS port: the log says so.
                    assert!(r.stderr.contains("add -s"), "{what}");
                }
                assert!(
                    elapsed < Duration::from_secs(6),
                    "stall at {verb}: took {elapsed:?}"
                );
                assert!(fake.changes().is_empty(), "{verb}: {:?}", fake.changes());
                assert!(fake.inbox().iter().all(|(_, f)| f.is_empty()), "{verb}");
            });
        }
    });
}

#[test]
fn a_silent_client_is_logged_out() {
    let fake = three().start();
    let mut a = fake.args();
    a.extend(["--timeout".to_string(), "1".to_string()]);
    thread::scope(|s| {
        // Before login, and after login with messages marked deleted: the autologout
        // changes nothing on the server.
        for script in [String::new(), format!("{LOGIN}DELE 1\r\n")] {
            let a = &a;
            s.spawn(move || {
                let p = Aiopopd::spawn(a);
                p.send(script.as_bytes());
                let started = Instant::now();
                let deadline = started + Duration::from_secs(6);
                let mut p = p;
                while !p.exited() {
                    assert!(
                        Instant::now() < deadline,
                        "a silent client kept aiopopd alive"
                    );
                    thread::sleep(Duration::from_millis(10));
                }
                let r = p.finish(LIMIT);
                r.assert_clean();
                assert_eq!(
                    r.status_lines().last().map(String::as_str),
                    Some("-ERR Autologout; idle for too long."),
                    "{script:?}"
                );
            });
        }
    });
    assert!(fake.mutations().is_empty());
}

/// Pids of running aiopopd processes whose command line holds `marker`.
fn aiopopd_pids(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        let mut argv = cmdline.split(|&b| b == 0);
        let is_aiopopd = argv.next().is_some_and(|a| a.ends_with(b"/aiopopd"));
        if is_aiopopd && !zombie && argv.any(|arg| arg == marker.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// A client that asks for a big message and never reads it: the write timeout (`--timeout 2`)
/// ends the process; it doesn't sit on a full socket buffer forever.
#[test]
fn a_client_that_stops_reading_mid_retr_does_not_hold_the_process() {
    let body = big(40 << 20);
    let fake = FakeImap::builder().message(&body).start();
    let marker = format!("stops-reading-{}.test", std::process::id());
    let mut a = fake.args();
    // -d is given twice would be refused: replace pop.test with the marker.
    let d = a.iter().position(|x| x == "pop.test").unwrap();
    a[d] = marker.clone();
    a.extend(["--timeout".to_string(), "2".to_string()]);
    let activator = Activator::start(false, &a);
    let mut client = TcpStream::connect(("127.0.0.1", activator.port)).unwrap();
    client.set_read_timeout(Some(LIMIT)).unwrap();
    let mut greeting = [0u8; 64];
    let n = client.read(&mut greeting).unwrap();
    assert!(greeting[..n].starts_with(b"+OK"));
    let pids: Vec<u32> = {
        let deadline = Instant::now() + LIMIT;
        loop {
            // The activator's own readiness probe started a session too; it ends at EOF.
            let p = aiopopd_pids(&marker);
            if p.len() == 1 {
                break p;
            }
            assert!(Instant::now() < deadline, "aiopopd processes: {p:?}");
            thread::sleep(Duration::from_millis(20));
        }
    };
    client
        .write_all(format!("{LOGIN}RETR 1\r\n").as_bytes())
        .unwrap();
    let started = Instant::now();
    // It writes until the socket buffers are full, then the write times out.
    let deadline = started + Duration::from_secs(12);
    while aiopopd_pids(&marker).contains(&pids[0]) {
        assert!(
            Instant::now() < deadline,
            "aiopopd (pid {}) still runs {:?} after the client stopped reading",
            pids[0],
            started.elapsed()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fake.commands().iter().any(|c| c.starts_with("UID FETCH 1")),
        "the RETR reached IMAP: {:?}",
        fake.commands()
    );
    assert!(fake.mutations().is_empty());
    drop(client);
}

/// The NO, BAD and BYE a server can answer at each step, and the reply the client gets.
#[test]
fn imap_no_bad_bye_at_each_step() {
    let no = |s: &str| Act::No(s.to_string());
    let bye = || Act::Bye("server shutting down".to_string());
    // (step, act, commands after login, expected replies after USER's +OK)
    let cases: Vec<(&str, Act, &str, Vec<&str>)> = vec![
        (GREETING, bye(), "QUIT", vec!["-ERR [SYS/TEMP]", "+OK"]),
        (
            "LOGIN",
            no("[UNAVAILABLE] Maintenance"),
            "QUIT",
            vec!["-ERR [SYS/TEMP]", "+OK"],
        ),
        (
            "LOGIN",
            no("Login failed"),
            "QUIT",
            vec!["-ERR [AUTH] Authentication failed.", "+OK"],
        ),
        (
            "LOGIN",
            no("[AUTHENTICATIONFAILED] Authentication failed."),
            "QUIT",
            vec!["-ERR [AUTH] Authentication failed.", "+OK"],
        ),
        (
            "LOGIN",
            no("[INUSE] Mailbox locked"),
            "QUIT",
            vec!["-ERR [IN-USE]", "+OK"],
        ),
        (
            "LOGIN",
            Act::Bad("Syntax error".into()),
            "QUIT",
            vec!["-ERR [SYS/TEMP]", "+OK"],
        ),
        ("LOGIN", bye(), "QUIT", vec!["-ERR [SYS/TEMP]", "+OK"]),
        (
            "SELECT",
            no("[NONEXISTENT] Mailbox doesn't exist"),
            "QUIT",
            vec!["-ERR [SYS/PERM]", "+OK"],
        ),
        (
            "SELECT",
            Act::Bad("what?".into()),
            "QUIT",
            vec!["-ERR [SYS/", "+OK"],
        ),
        ("SELECT", bye(), "QUIT", vec!["-ERR [SYS/TEMP]", "+OK"]),
        (
            "FETCH",
            no("Server error"),
            "QUIT",
            vec!["-ERR [SYS/TEMP]", "+OK"],
        ),
        ("FETCH", bye(), "QUIT", vec!["-ERR [SYS/TEMP]", "+OK"]),
        (
            "UID FETCH",
            no("Internal error"),
            "RETR 1\r\nNOOP",
            vec!["+OK Logged in", "-ERR [SYS/TEMP] The mail server failed"],
        ),
        (
            "UID FETCH",
            no("[EXPUNGEISSUED] Some messages were expunged"),
            "RETR 1\r\nNOOP\r\nRETR 2\r\nQUIT",
            vec![
                "+OK Logged in",
                "-ERR That message was deleted by another client.",
                "+OK",
                "+OK",
                "+OK",
            ],
        ),
        (
            "UID FETCH",
            bye(),
            "TOP 1 0\r\nNOOP",
            vec!["+OK Logged in", "-ERR [SYS/TEMP] The mail server failed"],
        ),
        (
            "LOGOUT",
            no("can't"),
            "DELE 1\r\nQUIT",
            vec![
                "+OK Logged in",
                "+OK",
                "+OK pop.test POP3 proxy signing off.",
            ],
        ),
        (
            "LOGOUT",
            bye(),
            "QUIT",
            vec!["+OK Logged in", "+OK pop.test POP3 proxy signing off."],
        ),
    ];
    thread::scope(|s| {
        for (verb, act, rest, expect) in &cases {
            s.spawn(move || {
                let fake = three().on(verb, act.clone()).start();
                let r = run(
                    &fake,
                    &["--imap-timeout", "2"],
                    &format!("{LOGIN}{rest}\r\n"),
                );
                let rep = replies(&r);
                let what = format!("{act:?} at {verb}");
                assert_eq!(rep.len(), 1 + expect.len(), "{what}: {rep:?}\n{}", r.stderr);
                for (got, want) in rep[1..].iter().zip(expect) {
                    assert!(got.starts_with(want), "{what}: {rep:?}\n{}", r.stderr);
                }
                let applied = if *verb == "LOGOUT" && rest.contains("DELE") {
                    vec!["UID STORE 1 +FLAGS.SILENT (\\Seen)".to_string()]
                } else {
                    vec![]
                };
                assert_eq!(fake.mutations(), applied, "{what}");
                // IMAP text never reaches the client.
                let out = String::from_utf8_lossy(&r.stdout);
                assert!(
                    !out.contains("Maintenance") && !out.contains("shutting down"),
                    "{what}: {out}"
                );
            });
        }
    });
}

/// RFC 3501 7.1.2: an untagged NO is a warning (e.g. a quota alert) and the command still
/// completes. The imap crate panics on one inside SELECT/EXAMINE (rust-imap #282). Here in
/// the listing's SELECT and in the update's.
#[test]
fn untagged_no_quota_warning_during_select_is_harmless() {
    for nth in [1, 2] {
        let verb = format!("SELECT #{nth}");
        let fake = three()
            .on_nth(
                "SELECT",
                nth,
                Act::Untagged("NO [ALERT] Quota exceeded (mailbox 99% full)".into()),
            )
            .start();
        let script = format!("{LOGIN}STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n");
        let r = run(&fake, &[], &script);
        let rep = replies(&r);
        assert_eq!(rep.len(), 8, "{verb}: {rep:?}\n{}", r.stderr);
        assert!(rep.iter().all(|l| l.starts_with("+OK")), "{verb}: {rep:?}");
        assert_eq!(
            fake.mutations(),
            ["UID STORE 1 +FLAGS.SILENT (\\Seen)"],
            "{verb}"
        );
    }
}

/// The same warning may come with any response, FETCH included; it must not cost the session.
#[test]
fn untagged_no_quota_warning_during_fetch_is_harmless() {
    let mut failures = Vec::new();
    for verb in ["FETCH", "UID FETCH", "UID STORE", "CAPABILITY"] {
        let fake = three()
            .on(verb, Act::Untagged("NO [ALERT] Quota exceeded".into()))
            .start();
        let script = format!("{LOGIN}STAT\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n");
        let r = run(&fake, &["--on-dele", "expunge"], &script);
        let rep = replies(&r);
        if rep.len() != 6 || !rep.iter().all(|l| l.starts_with("+OK")) {
            failures.push(format!("{verb}: {rep:?}\n{}", r.stderr));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Without UIDPLUS a plain EXPUNGE is the only way to remove mail, and it removes every
/// `\Deleted` message. So it is sent only when `UID SEARCH DELETED`, just before the update,
/// finds no other message marked; otherwise the DELE'd messages stay marked, the QUIT reply
/// says so, and (in expunge and move modes) they are never listed again: not served twice,
/// never copied twice.
#[test]
fn without_uidplus_expunge_is_exact_or_not_done() {
    for (on_dele, marks) in [
        ("expunge", vec!["UID STORE 1 +FLAGS.SILENT (\\Deleted)"]),
        (
            "move:Archive",
            vec![
                "UID COPY 1 \"Archive\"",
                "UID STORE 1 +FLAGS.SILENT (\\Deleted)",
            ],
        ),
    ] {
        // Another client's \Deleted mail (UID 4): no EXPUNGE, ever.
        let fake = three()
            .message_with_flags(&msg(4), &["\\Deleted"])
            .folder("Archive")
            .without("UIDPLUS")
            .without("MOVE")
            .start();
        let session = format!("{LOGIN}STAT\r\nDELE 1\r\nQUIT\r\n");
        let r = run(&fake, &["--on-dele", on_dele], &session);
        let rep = replies(&r);
        assert!(
            rep[2].starts_with("+OK 3 "),
            "{on_dele}: UID 4 not listed: {rep:?}"
        );
        let quit = rep.last().unwrap().clone();
        assert!(
            quit.starts_with("+OK") && quit.contains("UIDPLUS"),
            "{on_dele}: the QUIT reply says why nothing was expunged: {quit}"
        );
        assert!(
            !fake.commands().iter().any(|c| c.contains("EXPUNGE")),
            "{on_dele}: {:?}",
            fake.commands()
        );
        assert_eq!(fake.mutations(), marks, "{on_dele}");
        assert_eq!(fake.inbox().len(), 4, "{on_dele}: nothing removed");
        // The next session lists neither: nothing served or copied twice.
        let r = run(
            &fake,
            &["--on-dele", on_dele],
            &format!("{LOGIN}STAT\r\nDELE 1\r\nQUIT\r\n"),
        );
        assert!(
            replies(&r)[2].starts_with("+OK 2 "),
            "{on_dele}: {:?}",
            replies(&r)
        );
        if on_dele.starts_with("move") {
            assert_eq!(fake.folder("Archive"), [1, 2], "each copied once");
        }

        // No other \Deleted mail: STORE then a plain EXPUNGE, exact.
        let fake = three()
            .folder("Archive")
            .without("UIDPLUS")
            .without("MOVE")
            .start();
        let r = run(
            &fake,
            &["--on-dele", on_dele],
            &format!("{LOGIN}DELE 1\r\nQUIT\r\n"),
        );
        let quit = replies(&r).last().unwrap().clone();
        assert!(!quit.contains("UIDPLUS"), "{on_dele}: {quit}");
        let mut want = marks.clone();
        want.push("EXPUNGE");
        assert_eq!(fake.mutations(), want, "{on_dele}");
        let left: Vec<u32> = fake.inbox().iter().map(|m| m.0).collect();
        assert_eq!(
            left,
            [2, 3],
            "{on_dele}: exactly the DELE'd message removed"
        );
    }
}

#[test]
fn uidvalidity_changing_before_quit_applies_nothing() {
    for on_dele in ["seen", "expunge"] {
        let fake = three()
            .on_nth("SELECT", 2, Act::SetUidvalidity(98765))
            .start();
        let r = run(
            &fake,
            &["--on-dele", on_dele],
            &format!("{LOGIN}DELE 1\r\nDELE 3\r\nQUIT\r\n"),
        );
        assert_eq!(
            replies(&r).last().map(String::as_str),
            Some("-ERR [SYS/TEMP] Some deleted messages were not removed."),
            "{on_dele}"
        );
        assert!(r.stderr.contains("UIDVALIDITY"), "{}", r.stderr);
        assert!(fake.mutations().is_empty(), "{:?}", fake.mutations());
    }
}

#[test]
fn uidvalidity_changing_between_sessions_changes_every_uidl() {
    let fake = three().uidvalidity(1000).start();
    let uidls = |fake: &FakeImap| {
        let r = run(fake, &[], &format!("{LOGIN}UIDL\r\nQUIT\r\n"));
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        let body = out
            .split("+OK Unique-ID listing follows\r\n")
            .nth(1)
            .unwrap();
        let body = body.split("\r\n.\r\n").next().unwrap().to_string();
        body.lines()
            .map(|l| l.split(' ').nth(1).unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let before = uidls(&fake);
    fake.set_uidvalidity(2000);
    let after = uidls(&fake);
    assert_eq!(before.len(), 3);
    assert_eq!(after.len(), 3);
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b, a, "a UIDL must not survive a UIDVALIDITY change");
    }
}

/// A server answers a FETCH of a message another client expunged in one of three ways (RFC
/// 2180 4.1): no FETCH data at all, `NO [EXPUNGEISSUED]`, or (Dovecot) the UID with a NIL body.
/// Each is `-ERR` for that message, and the session goes on.
#[test]
fn a_message_expunged_by_another_client_gives_err_and_the_session_goes_on() {
    let cases = [
        ("no data", Act::ExpungeElsewhere(1)),
        (
            "NO [EXPUNGEISSUED]",
            Act::No("[EXPUNGEISSUED] Some of the requested messages no longer exist".into()),
        ),
        (
            "NIL body (Dovecot)",
            Act::Reply("* 1 FETCH (UID 1 BODY[]<0> NIL)\r\n{tag} OK Fetch completed.\r\n".into()),
        ),
    ];
    for (what, act) in cases {
        let fake = three().on("UID FETCH", act).start();
        let r = run(
            &fake,
            &[],
            &format!("{LOGIN}RETR 1\r\nNOOP\r\nRETR 2\r\nDELE 2\r\nQUIT\r\n"),
        );
        let rep = replies(&r);
        assert_eq!(
            rep[2..],
            [
                "-ERR That message was deleted by another client.".to_string(),
                "+OK".to_string(),
                format!("+OK {} octets", msg(2).len()),
                "+OK Marked to be deleted.".to_string(),
                "+OK pop.test POP3 proxy signing off.".to_string(),
            ],
            "{what}"
        );
        assert_eq!(
            fake.mutations(),
            ["UID STORE 2 +FLAGS.SILENT (\\Seen)"],
            "{what}"
        );
    }
}

/// The fetch of message 2 is sent ahead, while the client still reads message 1 (the second
/// UID FETCH the server sees): what goes wrong with it is met by RETR 2 as if it had been sent
/// then, before any `+OK`.
#[test]
fn a_fault_in_a_fetch_sent_ahead_is_met_cleanly_by_the_retr_that_wants_it() {
    let ok1 = format!("+OK {} octets", msg(1).len());
    let ok3 = format!("+OK {} octets", msg(3).len());
    let cases = [
        (
            Act::CutMidResponse,
            vec![
                ok1.as_str(),
                "-ERR [SYS/TEMP] The mail server failed; try again later.",
            ],
        ),
        (
            Act::ExpungeElsewhere(2),
            vec![
                ok1.as_str(),
                "-ERR That message was deleted by another client.",
                ok3.as_str(),
                "+OK pop.test POP3 proxy signing off.",
            ],
        ),
    ];
    for (act, want) in cases {
        let what = format!("{act:?}");
        let fake = three().on_nth("UID FETCH", 2, act).start();
        let r = run(
            &fake,
            &[],
            &format!("{LOGIN}RETR 1\r\nRETR 2\r\nRETR 3\r\nQUIT\r\n"),
        );
        assert_eq!(replies(&r)[2..], want, "{what}: {}", r.stderr);
        assert!(
            fake.mutations().is_empty(),
            "{what}: {:?}",
            fake.mutations()
        );
    }
}

#[test]
fn a_message_expunged_in_dovecot_during_the_session_gives_err() {
    let d = Dovecot::start();
    for i in 1..=3 {
        d.deliver("alice", "INBOX", &msg(i));
    }
    let p = Aiopopd::spawn(&dovecot_args(&d));
    p.send(LOGIN.as_bytes());
    assert!(p.wait_for_replies(3, LIMIT));
    d.doveadm(&["expunge", "-u", "alice", "mailbox", "INBOX", "uid", "2"]);
    p.send(b"RETR 2\r\nNOOP\r\nRETR 1\r\nQUIT\r\n");
    let r = p.finish(LIMIT);
    r.assert_clean();
    let rep = replies(&r);
    assert_eq!(rep[2], "-ERR That message was deleted by another client.");
    assert_eq!(rep[3], "+OK");
    assert!(rep[4].starts_with("+OK"), "{rep:?}");
    assert!(rep[5].starts_with("+OK"), "{rep:?}");
    assert_eq!(d.flags("alice", "INBOX").len(), 2);
}

#[test]
fn other_clients_deleted_mail_survives_expunge_mode_in_dovecot() {
    let d = Dovecot::start();
    d.deliver("alice", "INBOX", &msg(1));
    d.deliver_with_flags("alice", "INBOX", &msg(2), &["\\Deleted"]);
    d.deliver("alice", "INBOX", &msg(3));
    d.deliver_with_flags("alice", "INBOX", &msg(4), &["\\Deleted", "\\Seen"]);
    let mut a = dovecot_args(&d);
    a.extend(["--on-dele".to_string(), "expunge".to_string()]);
    let r = run_within(
        &a,
        format!("{LOGIN}STAT\r\nDELE 1\r\nDELE 2\r\nQUIT\r\n").as_bytes(),
        LIMIT,
    );
    r.assert_clean();
    let rep = replies(&r);
    assert!(
        rep[2].starts_with("+OK 2 "),
        "the \\Deleted ones are not listed: {rep:?}"
    );
    assert!(rep.last().unwrap().starts_with("+OK"), "{rep:?}");
    let flags = d.flags("alice", "INBOX");
    let uids: Vec<u32> = flags.iter().map(|(u, _)| *u).collect();
    assert_eq!(
        uids,
        [2, 4],
        "only the DELE'd messages were expunged: {flags:?}"
    );
    assert!(flags
        .iter()
        .all(|(_, f)| f.iter().any(|x| x == "\\Deleted")));
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `--on-dele keyword:NAME` needs a mailbox that can store keywords: refused at login, clearly,
/// rather than failing at QUIT after the client took the mail.
#[test]
fn keyword_mode_is_refused_at_login_if_the_mailbox_cant_store_keywords() {
    let fake = three()
        .on(
            "SELECT",
            Act::Reply(
                "* 3 EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\n\
                 * OK [PERMANENTFLAGS (\\Seen \\Deleted)] Limited\r\n\
                 {tag} OK [READ-WRITE] done\r\n"
                    .into(),
            ),
        )
        .start();
    let r = run(
        &fake,
        &["--on-dele", "keyword:$Popped"],
        &format!("{LOGIN}QUIT\r\n"),
    );
    let rep = replies(&r);
    assert!(rep[1].starts_with("-ERR [SYS/PERM] "), "{rep:?}");
    assert!(
        r.stderr.contains("can't store the keyword $Popped"),
        "{}",
        r.stderr
    );
    assert!(fake.changes().is_empty());
}

/// `--imap-starttls` never falls back to clear text when the server doesn't offer STARTTLS.
#[test]
fn imap_starttls_not_offered_fails_the_login() {
    let fake = three().start();
    let r = run(&fake, &["--imap-starttls"], &format!("{LOGIN}QUIT\r\n"));
    let rep = replies(&r);
    assert_eq!(
        rep[1],
        "-ERR [SYS/TEMP] Account is temporarily unavailable; try again later."
    );
    assert!(r.stderr.contains("does not offer STARTTLS"), "{}", r.stderr);
    assert_eq!(fake.logins(), 0, "no LOGIN in clear");
}

/// Answers that are legal but that Dovecot never gives: a listing with each message's items
/// split over several FETCH responses (the FLAGS of message 2 are someone else's change, sent
/// before its listing), and a body sent as a quoted string.
#[test]
fn a_split_listing_and_a_quoted_body_are_understood() {
    let (m1, m2) = (b"Subject: q".to_vec(), msg(2));
    let listing = format!(
        "* 1 FETCH (UID 1)\r\n* 2 FETCH (FLAGS (\\Seen))\r\n\
         * 1 FETCH (RFC822.SIZE {} FLAGS ())\r\n* 2 FETCH (UID 2 RFC822.SIZE {} FLAGS ())\r\n\
         {{tag}} OK Fetch completed.\r\n",
        m1.len(),
        m2.len()
    );
    let fake = FakeImap::builder()
        .message(&m1)
        .message(&m2)
        .on("FETCH", Act::Reply(listing))
        .on_nth(
            "UID FETCH",
            1,
            Act::Reply("* 1 FETCH (UID 1 BODY[]<0> \"Subject: q\")\r\n{tag} OK\r\n".into()),
        )
        .start();
    let r = run(
        &fake,
        &[],
        &format!("{LOGIN}STAT\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n"),
    );
    let rep = replies(&r);
    assert_eq!(rep[2], format!("+OK 2 {}", m1.len() + m2.len()), "{rep:?}");
    assert!(find(&r.stdout, b"+OK 10 octets\r\nSubject: q\r\n.\r\n").is_some());
    assert_eq!(rep[4], format!("+OK {} octets", m2.len()));
    assert!(rep[5].starts_with("+OK"), "{rep:?}");
}

/// A server that refuses logins in clear (LOGINDISABLED) is upgraded with STARTTLS when it
/// offers it (here Dovecot with `disable_plaintext_auth`, reached on 127.0.0.2 so the
/// connection doesn't count as local), its certificate verified; one that doesn't offer it is a
/// configuration error: `-ERR [SYS/PERM]` and a log line saying what to set, never `[AUTH]`
/// nor a `login failed:` line that fail2ban would count against a user with the right password.
#[test]
fn logindisabled_is_upgraded_with_starttls_or_refused_as_configuration() {
    let d =
        Dovecot::start_with_config("listen = 127.0.0.1, 127.0.0.2\ndisable_plaintext_auth = yes\n");
    d.deliver("alice", "INBOX", &msg(1));
    let mut a: Vec<String> = dovecot_args(&d)
        .into_iter()
        .map(|s| {
            if s == "127.0.0.1" {
                "127.0.0.2".to_string()
            } else {
                s
            }
        })
        .collect();
    // Without the CA the upgrade fails verification: certificates are always checked.
    let script = format!("{LOGIN}STAT\r\nQUIT\r\n");
    let r = run_within(&a, script.as_bytes(), LIMIT);
    assert_eq!(
        replies(&r)[1],
        "-ERR [SYS/TEMP] Account is temporarily unavailable; try again later.",
        "{}",
        r.stderr
    );
    a.extend([
        "--imap-ca".to_string(),
        d.ca_cert_path().to_str().unwrap().to_string(),
    ]);
    let r = run_within(&a, script.as_bytes(), LIMIT);
    let rep = replies(&r);
    assert_eq!(rep[1], "+OK Logged in, 1 messages.", "{}", r.stderr);
    assert!(rep[2].starts_with("+OK 1 "), "{rep:?}");
    assert!(
        d.log_contents().contains("TLS"),
        "the login went over TLS: {}",
        d.log_contents()
    );

    let fake = three().capability("LOGINDISABLED").start();
    let r = run(&fake, &[], &format!("{LOGIN}QUIT\r\n"));
    assert_eq!(
        replies(&r)[1],
        "-ERR [SYS/PERM] The mailbox can't be served; tell the administrator."
    );
    assert!(!r.stderr.contains("login failed"), "{}", r.stderr);
    assert!(
        r.stderr.contains("LOGINDISABLED") && r.stderr.contains("--imap-starttls"),
        "{}",
        r.stderr
    );
    assert_eq!(fake.logins(), 0, "no LOGIN in clear: {:?}", fake.commands());
}

/// Dovecot advertising only `IMAP4rev1 LITERAL+ SASL-IR LOGIN-REFERRALS ID ENABLE IDLE` (as
/// servers without UIDPLUS and MOVE do): expunge is exact when no other mail is `\Deleted` and
/// only marks when some is; move: copies each message once over three sessions; `\Deleted`
/// mail is not listed. And aiopopd says who it is (RFC 2971 ID), as the server offers ID.
#[test]
fn without_uidplus_and_move_in_dovecot_nothing_is_lost_or_doubled() {
    let d = Dovecot::start_with_config(
        "imap_capability = IMAP4rev1 LITERAL+ SASL-IR LOGIN-REFERRALS ID ENABLE IDLE\n\
         imap_id_log = *\n",
    );
    d.create_mailbox("alice", "Archive");
    for i in 1..=3 {
        d.deliver("alice", "INBOX", &msg(i));
    }
    let session = |on_dele: &str, script: &str| {
        let mut a = dovecot_args(&d);
        a.extend(["--on-dele".to_string(), on_dele.to_string()]);
        let r = run_within(&a, format!("{LOGIN}{script}").as_bytes(), LIMIT);
        r.assert_clean();
        replies(&r)
    };
    // No other \Deleted mail: DELE 1 expunges exactly UID 1.
    let rep = session("expunge", "DELE 1\r\nQUIT\r\n");
    assert!(rep.last().unwrap().starts_with("+OK"), "{rep:?}");
    let uids =
        |mailbox: &str| -> Vec<u32> { d.flags("alice", mailbox).iter().map(|(u, _)| *u).collect() };
    assert_eq!(uids("INBOX"), [2, 3]);
    // Another client marks UID 3 \Deleted: DELE 1 (UID 2) only marks, and says so.
    d.doveadm(&[
        "flags",
        "add",
        "-u",
        "alice",
        "\\Deleted",
        "mailbox",
        "INBOX",
        "uid",
        "3",
    ]);
    let rep = session("expunge", "STAT\r\nDELE 1\r\nQUIT\r\n");
    assert!(rep[2].starts_with("+OK 1 "), "UID 3 not listed: {rep:?}");
    assert!(rep.last().unwrap().contains("UIDPLUS"), "{rep:?}");
    assert_eq!(uids("INBOX"), [2, 3], "nothing expunged");
    assert!(d
        .flags("alice", "INBOX")
        .iter()
        .all(|(_, f)| f.iter().any(|x| x == "\\Deleted")));
    let rep = session("expunge", "STAT\r\nQUIT\r\n");
    assert_eq!(rep[2], "+OK 0 0", "neither is listed again");

    // move: three sessions, each message copied once (UID 4 arrives between sessions).
    d.deliver("alice", "INBOX", &msg(4));
    for _ in 0..3 {
        let rep = session("move:Archive", "DELE 1\r\nQUIT\r\n");
        assert!(rep.last().unwrap().starts_with("+OK"), "{rep:?}");
    }
    assert_eq!(
        uids("Archive").len(),
        1,
        "one copy: {:?}",
        d.flags("alice", "Archive")
    );
    assert!(
        d.log_contents().contains("name=aiopopd"),
        "ID was sent: {}",
        d.log_contents()
    );
}

/// A server that hangs up at connect or login (Courier at MAXPERIP says BYE and closes): the
/// client gets `-ERR [SYS/TEMP]`; the log line says it may be a per-address limit and names the
/// settings, since every session's IMAP connection comes from this one host.
#[test]
fn a_server_dropping_the_connection_points_at_per_address_limits() {
    for (verb, act) in [
        (GREETING, Act::Close),
        (
            GREETING,
            Act::Bye("Too many connections from your IP".into()),
        ),
        ("LOGIN", Act::Close),
    ] {
        let fake = three().on(verb, act.clone()).start();
        let r = run(&fake, &[], &format!("{LOGIN}QUIT\r\n"));
        assert_eq!(
            replies(&r)[1],
            "-ERR [SYS/TEMP] Account is temporarily unavailable; try again later.",
            "{verb} {act:?}"
        );
        assert!(
            r.stderr.contains("MAXPERIP") && r.stderr.contains("mail_max_userip_connections"),
            "{verb} {act:?}: {}",
            r.stderr
        );
    }
}

/// `--uidl-format %g` against a server with no identifier to give (no OBJECTID, no
/// X-GM-EXT-1, no X-GUID): the login is refused as a configuration error, and the log says
/// which format would work; nothing is listed with UIDLs that would change later.
#[test]
fn server_ids_asked_of_a_server_without_them_is_a_configuration_error() {
    let fake = three().start();
    let r = run(&fake, &["--uidl-format", "%g"], &format!("{LOGIN}QUIT\r\n"));
    assert_eq!(
        replies(&r)[1],
        "-ERR [SYS/PERM] The mailbox can't be served; tell the administrator."
    );
    assert!(r.stderr.contains("%08Xu%08Xv"), "{}", r.stderr);
    assert!(!r.stderr.contains("login failed"), "{}", r.stderr);
}

/// A UIDVALIDITY that moves between the listing and the update (GNU Mailutils imap4d gives a
/// new one between two SELECTs; here Dovecot is told to mid-session): with `%g` the
/// DELE'd message is found again by its identifier (or header digest, `%m`) and gets its
/// `\Seen`; with the default
/// format nothing is applied and the client is told.
#[test]
fn a_uidvalidity_change_mid_session_is_survived_with_server_ids() {
    let state = tempfile::tempdir().unwrap();
    for (format, applied) in [("%g", true), ("%m", true), ("%08Xu%08Xv", false)] {
        let d = Dovecot::start();
        for i in 1..=3 {
            d.deliver("alice", "INBOX", &msg(i));
        }
        let mut a = dovecot_args(&d);
        a.extend(["--uidl-format", format, "--state-dir"].map(String::from));
        a.push(state.path().to_str().unwrap().to_string());
        let p = Aiopopd::spawn(&a);
        p.send(format!("{LOGIN}STAT\r\n").as_bytes());
        assert!(p.wait_for_replies(4, LIMIT), "{format}");
        d.doveadm(&[
            "mailbox",
            "update",
            "-u",
            "alice",
            "--uid-validity",
            "4242",
            "INBOX",
        ]);
        p.send(b"DELE 2\r\nQUIT\r\n");
        let r = p.finish(LIMIT);
        let quit = r.status_lines().last().cloned().unwrap_or_default();
        let seen = |uid: u32| {
            d.flags("alice", "INBOX")
                .iter()
                .any(|(u, f)| *u == uid && f.iter().any(|x| x == "\\Seen"))
        };
        assert_eq!(quit.starts_with("+OK"), applied, "{format}: {quit}");
        assert_eq!(seen(2), applied, "{format}");
        assert!(!seen(1) && !seen(3), "{format}: nothing else touched");
    }
}

/// `%m` reads each header once: the digests are kept under `--state-dir`, so the next session
/// fetches no header at all (and one that finds the cache gone only fetches them again).
#[test]
fn header_digests_are_cached_between_sessions() {
    let fake = three().start();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap();
    let fetches = || {
        fake.commands()
            .iter()
            .filter(|c| c.starts_with("UID FETCH"))
            .count()
    };
    let args = ["--uidl-format", "%m", "--state-dir", dir];
    let first = run(&fake, &args, &format!("{LOGIN}UIDL\r\nQUIT\r\n"));
    assert_eq!(fetches(), 3, "{:?}", fake.commands());
    let second = run(&fake, &args, &format!("{LOGIN}UIDL\r\nQUIT\r\n"));
    assert_eq!(
        fetches(),
        3,
        "no header fetched again: {:?}",
        fake.commands()
    );
    assert_eq!(replies(&first), replies(&second));
    std::fs::remove_dir_all(state.path().join("uidl-digests")).unwrap();
    let third = run(&fake, &args, &format!("{LOGIN}UIDL\r\nQUIT\r\n"));
    assert_eq!(fetches(), 6);
    assert_eq!(
        replies(&first),
        replies(&third),
        "a lost cache is only slower"
    );
}

/// Two messages with the same server identifier (a copy keeps its EMAILID or X-GUID); the
/// client DELEs one; UIDVALIDITY moves before QUIT: nothing tells which copy was DELE'd, so
/// nothing is applied and the client is told (never the copy it didn't DELE).
#[test]
fn after_a_uidvalidity_change_a_shared_identifier_applies_nothing() {
    let sizes: Vec<usize> = (1..=3).map(|i| msg(i).len()).collect();
    let fake = three()
        .capability("OBJECTID")
        .on_listing(Act::raw(move |r| {
            let t = r.tag.to_string();
            let s = format!(
                "* 1 FETCH (UID 1 RFC822.SIZE {} FLAGS () EMAILID (Mdup))\r\n\
                 * 2 FETCH (UID 2 RFC822.SIZE {} FLAGS () EMAILID (Mother))\r\n\
                 * 3 FETCH (UID 3 RFC822.SIZE {} FLAGS () EMAILID (Mdup))\r\n{t} OK done\r\n",
                sizes[0], sizes[1], sizes[2]
            );
            r.write_all(s.as_bytes())?;
            r.flush()
        }))
        .on_nth("SELECT", 2, Act::SetUidvalidity(98765))
        .start();
    let r = run(
        &fake,
        &["--uidl-format", "%g"],
        &format!("{LOGIN}UIDL\r\nDELE 1\r\nQUIT\r\n"),
    );
    assert_eq!(
        replies(&r).last().map(String::as_str),
        Some("-ERR [SYS/TEMP] Some deleted messages were not removed.")
    );
    assert!(fake.mutations().is_empty(), "{:?}", fake.mutations());
}

/// Without UIDPLUS, an answer to `UID SEARCH DELETED` that isn't a clean `* SEARCH` (IMAP4rev2's
/// ESEARCH, a bare OK, garbage) is "don't know": no plain EXPUNGE, another client's `\Deleted`
/// UID 4 survives.
#[test]
fn without_uidplus_an_unclear_search_answer_expunges_nothing() {
    for answer in [
        "* ESEARCH (TAG \"{tag}\") UID ALL 4\r\n{tag} OK done\r\n",
        "{tag} OK done\r\n",
        "* SEARCH 1 4x\r\n{tag} OK done\r\n",
    ] {
        let fake = three()
            .message_with_flags(&msg(4), &["\\Deleted"])
            .without("UIDPLUS")
            .without("MOVE")
            .on("UID SEARCH", Act::Reply(answer.into()))
            .start();
        let r = run(
            &fake,
            &["--on-dele", "expunge"],
            &format!("{LOGIN}DELE 1\r\nQUIT\r\n"),
        );
        assert!(replies(&r).last().unwrap().contains("UIDPLUS"), "{answer}");
        let left: Vec<u32> = fake.inbox().iter().map(|m| m.0).collect();
        assert_eq!(left, [1, 2, 3, 4], "{answer}: {:?}", fake.mutations());
    }
}
