//! A hostile or broken IMAP server (the server's side of what `hostile.rs` does from the
//! client's): whatever it sends, aiopopd answers the POP3 client with its own fixed replies,
//! never serves one message's octets as another's nor a cut message as a whole one, keeps its
//! memory bounded (peak RSS at most [`BOUND_KIB`]) and every IMAP command within
//! `--imap-timeout`, and keeps the server's text (which may echo a password) out of the log and
//! away from the client.
//!
//! Each test is named after the bug it pins and runs against the scripted fake IMAP server
//! (`common::fakeimap`), mostly with [`Act::raw`] answers. Every wait is bounded: a hang fails.
//! Peak RSS is the process's VmHWM, sampled while it runs (it can't be read once it has exited).

mod common;

use common::fakeimap::{
    body_fetch, is_listing, peak_rss_kib, run_on_socket, secret_forms, status_lines, Act, Aiopopd,
    Builder, FakeImap, Finished, Raw, GREETING,
};
use common::pop3::BIN;
use std::io::{self, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const LOGIN: &str = "USER alice\r\nPASS alice-pw\r\n";
/// The most memory aiopopd may use, whatever the server sends.
const BOUND_KIB: u64 = 32 << 10;
/// The longest any wait may take before it counts as a hang.
const LIMIT: Duration = Duration::from_secs(20);
/// How much an endless line streams before the fake gives up on it.
const ENDLESS: usize = 100 << 20;
const TEMP_LOGIN: &str = "-ERR [SYS/TEMP] Account is temporarily unavailable; try again later.";
const AUTH_FAILED: &str = "-ERR [AUTH] Authentication failed.";
const UPDATE_FAILED: &str = "-ERR [SYS/TEMP] Some deleted messages were not removed.";

/// The binary under test: the one cargo built, or `AIOPOPD_BIN` (to show that these tests fail
/// on a build from before the fixes they pin).
fn aiopopd(fake: &FakeImap, extra: &[&str]) -> Command {
    let bin = std::env::var("AIOPOPD_BIN").unwrap_or_else(|_| BIN.to_string());
    let mut cmd = Command::new(bin);
    cmd.args(fake.args()).args(extra);
    cmd
}

fn spawn(fake: &FakeImap, extra: &[&str]) -> Aiopopd {
    Aiopopd::spawn_with(&mut aiopopd(fake, extra))
}

/// Waits until `done(stdout)`, the process exits, or `within` passes, with the peak RSS
/// sampled every 2 ms all along by another thread (VmHWM can't be read once the process has
/// exited, and a run may end within a few milliseconds of the answer). Returns whether `done`
/// came, and the peak in KiB.
fn watch(a: &mut Aiopopd, within: Duration, done: impl Fn(&[u8]) -> bool) -> (bool, u64) {
    let pid = a.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match peak_rss_kib(pid) {
                    Some(k) => peak.fetch_max(k, Ordering::SeqCst),
                    None => return,
                };
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let deadline = Instant::now() + within;
    let came = loop {
        if done(&a.stdout()) {
            break true;
        }
        if a.exited() || Instant::now() >= deadline {
            break false;
        }
        thread::sleep(Duration::from_millis(20));
    };
    // Growth up to the answer counts too.
    if let Some(k) = peak_rss_kib(pid) {
        peak.fetch_max(k, Ordering::SeqCst);
    }
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    (came, peak.load(Ordering::SeqCst))
}

/// At least `n` status lines.
fn replies(n: usize) -> impl Fn(&[u8]) -> bool {
    move |out| status_lines(out).len() >= n
}

/// Finishes a run (panicking on a hang) and notes what is wrong with how it ended: a panic, a
/// signal (a stack overflow is SIGABRT), an error status.
fn finish(a: Aiopopd, problems: &mut Vec<String>, what: &str) -> Finished {
    let r = a.finish(LIMIT);
    if r.stderr.contains("internal error") || r.stderr.contains("panicked") {
        problems.push(format!("{what}: aiopopd panicked"));
    }
    if !r.status.success() {
        problems.push(format!("{what}: aiopopd ended with {:?}", r.status));
    }
    r
}

/// Notes a problem unless the fake received a command for which `matches` holds: a rule that
/// never fired proves nothing.
fn asked(fake: &FakeImap, what: &str, matches: impl Fn(&str) -> bool, problems: &mut Vec<String>) {
    if !fake.commands().iter().any(|c| matches(c)) {
        problems.push(format!(
            "{what}: the fake was never asked that; it got {:?}",
            fake.commands()
        ));
    }
}

fn verb_is(verb: &'static str) -> impl Fn(&str) -> bool {
    move |c| {
        c.get(..verb.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(verb))
            && (c.len() == verb.len() || c[verb.len()..].starts_with(' '))
    }
}

fn check(problems: Vec<String>) {
    assert!(problems.is_empty(), "\n{}", problems.join("\n\n"));
}

fn log_tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// A message of exactly `size` octets in CRLF lines of 80, every fifth starting with a dot.
fn message(size: usize) -> Vec<u8> {
    let mut m = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0;
    while size - m.len() > 160 {
        let lead = if i % 5 == 0 { '.' } else { 'l' };
        m.extend_from_slice(format!("{lead}{i:07} {}\r\n", "z".repeat(70)).as_bytes());
        i += 1;
    }
    let rest = size - m.len();
    m.extend(std::iter::repeat_n(b'e', rest - 2));
    m.extend_from_slice(b"\r\n");
    assert_eq!(m.len(), size);
    m
}

fn small(i: u32) -> Vec<u8> {
    format!(
        "Subject: m{i}\r\nX-Pad: {}\r\n\r\nbody {i}\r\n",
        "p".repeat(i as usize)
    )
    .into_bytes()
}

/// INBOX with `n` small messages, UIDs 1..=n.
fn mailbox(n: u32) -> Builder {
    mailbox_from(1, n)
}

/// INBOX with `n` small messages, UIDs from `first`.
fn mailbox_from(first: u32, n: u32) -> Builder {
    (1..=n).fold(FakeImap::builder().next_uid(first), |b, i| {
        b.message(&small(i))
    })
}

/// What a RETR sent: the status line, and the octets after it up to the end of the output.
fn retr_part(out: &[u8], status_index: usize) -> Option<(String, &[u8])> {
    let mut at = 0;
    let mut seen = 0;
    while at < out.len() {
        let end = find(&out[at..], b"\r\n").map_or(out.len(), |i| at + i + 2);
        let line = &out[at..end];
        if line.starts_with(b"+OK") || line.starts_with(b"-ERR") {
            if seen == status_index {
                let status = String::from_utf8_lossy(line).trim_end().to_string();
                return Some((status, &out[end..]));
            }
            seen += 1;
        }
        at = end;
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Problems with a RETR that can't be served whole: it must be `-ERR [SYS/TEMP]` before any
/// `+OK`, or an `+OK` whose message is cut off without the terminating line; either way
/// nothing follows (the session ends).
fn retr_not_served_whole(out: &[u8], status_index: usize, what: &str) -> Vec<String> {
    let Some((status, after)) = retr_part(out, status_index) else {
        return vec![format!("{what}: no reply to RETR")];
    };
    let mut problems = Vec::new();
    if status.starts_with("-ERR") {
        if !status.starts_with("-ERR [SYS/TEMP]") {
            problems.push(format!("{what}: RETR answered {status:?}"));
        }
        if !after.is_empty() {
            problems.push(format!(
                "{what}: the session went on after the failed RETR: {:?}",
                String::from_utf8_lossy(&after[..after.len().min(200)])
            ));
        }
    } else if let Some(end) = terminator(after) {
        problems.push(format!(
            "{what}: {status:?}, then {end} octets and the terminating \".\": a cut message \
             passed off as whole"
        ));
    } else if !status_lines(after).is_empty() {
        problems.push(format!(
            "{what}: the session went on after the cut message: {:?}",
            status_lines(after)
        ));
    }
    problems
}

/// Where a multi-line body's terminating `.` line starts (the body is dot-stuffed, so a lone
/// `.` line can be nothing else).
fn terminator(body: &[u8]) -> Option<usize> {
    if body.starts_with(b".\r\n") {
        return Some(0);
    }
    find(body, b"\r\n.\r\n").map(|i| i + 2)
}

/// An untagged line, then the tagged OK, as the answer to any command.
fn untagged_then_ok(untagged: String) -> Act {
    Act::raw(move |r: &mut Raw<'_>| {
        let tag = r.tag.to_string();
        r.write_all(untagged.as_bytes())?;
        r.write_all(b"\r\n")?;
        if !tag.is_empty() {
            write!(r, "{tag} OK done\r\n")?;
        }
        r.flush()
    })
}

/// `* 1 FETCH (BODYSTRUCTURE ` and 5,000 `(`: a recursive parser overflows its stack.
fn deep() -> String {
    format!("* 1 FETCH (BODYSTRUCTURE {}", "(".repeat(5000))
}

/// `* OK ` and [`ENDLESS`] octets without a line end (the fake gives up there and ends the line,
/// then says OK to the command): a reader without a line bound holds it all.
fn endless() -> Act {
    Act::raw(|r: &mut Raw<'_>| {
        let tail = if r.tag.is_empty() {
            "\r\n".to_string()
        } else {
            format!("\r\n{} OK done\r\n", r.tag)
        };
        r.stream(b"* OK ", b'x', ENDLESS, tail.as_bytes())
    })
}

/// SELECT's answer (the listing's) with this many messages.
fn examine(exists: u64) -> Act {
    Act::raw(move |r: &mut Raw<'_>| {
        let tag = r.tag.to_string();
        write!(
            r,
            "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n\
             * OK [PERMANENTFLAGS ()] Read-only mailbox.\r\n\
             * {exists} EXISTS\r\n* 0 RECENT\r\n\
             * OK [UIDVALIDITY 1234] UIDs valid\r\n\
             * OK [UIDNEXT {}] Predicted next UID\r\n\
             {tag} OK [READ-ONLY] Examine completed.\r\n",
            exists + 1,
        )?;
        r.flush()
    })
}

/// Writes `count` lines made by `line(n)` for n in 1..=count, in big writes, then the tagged OK.
fn many_lines(r: &mut Raw<'_>, count: u64, line: impl Fn(u64) -> String) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 20);
    for n in 1..=count {
        buf.extend_from_slice(line(n).as_bytes());
        if buf.len() >= 1 << 20 {
            r.write_all(&buf)?;
            buf.clear();
        }
    }
    write!(buf, "{} OK Fetch completed.\r\n", r.tag)?;
    r.write_all(&buf)?;
    r.flush()
}

/// Logs in (wanting `expect` as the answer to PASS), noting problems; returns the peak RSS.
fn login_watched(a: &mut Aiopopd, expect: &[&str], what: &str, problems: &mut Vec<String>) -> u64 {
    a.send(LOGIN.as_bytes());
    let (done, peak) = watch(a, LIMIT, replies(3));
    let got = status_lines(&a.stdout());
    if !done {
        problems.push(format!(
            "{what}: no answer to PASS after {LIMIT:?} (or aiopopd died); got {got:?}"
        ));
    } else if !expect.iter().any(|e| got[2].starts_with(e)) {
        problems.push(format!(
            "{what}: PASS answered {:?}, expected {expect:?}",
            got[2]
        ));
    }
    if peak > BOUND_KIB {
        problems.push(format!(
            "{what}: peak RSS {peak} KiB (bound {BOUND_KIB} KiB)"
        ));
    }
    eprintln!("{what}: peak RSS {peak} KiB, replies {got:?}");
    peak
}

/// A message listed as 100 octets that really has 300,000: past the listed size, a chunk that
/// comes back NIL or missing is a failure, not the end of the message. Served in full, all of
/// it goes out (the listed size is only a hint).
#[test]
fn a_message_larger_than_listed_is_never_cut_at_a_nil_chunk() {
    let body = message(300_000);
    let script = format!("{LOGIN}RETR 1\r\nNOOP\r\nQUIT\r\n");
    let mut problems = Vec::new();
    for (what, act) in [
        (
            "chunk 2 answered NIL",
            Some(Act::Reply(
                "* 1 FETCH (UID 1 BODY[]<262144> NIL)\r\n{tag} OK Fetch completed.\r\n".into(),
            )),
        ),
        (
            "chunk 2 answered by the tagged OK alone",
            Some(Act::Reply("{tag} OK Fetch completed.\r\n".into())),
        ),
        ("all chunks served", None),
    ] {
        let mut b = FakeImap::builder().message_listed_as(&body, 100);
        if let Some(act) = act {
            b = b.on_body(1, 262_144, act);
        }
        let fake = b.start();
        let a = spawn(&fake, &[]);
        a.send(script.as_bytes());
        let r = finish(a, &mut problems, what);
        let got = r.status_lines();
        if got.get(2).map(String::as_str) != Some("+OK Logged in, 1 messages.") {
            problems.push(format!("{what}: {got:?}\n{}", log_tail(&r.stderr)));
            continue;
        }
        if what == "all chunks served" {
            match retr_part(&r.stdout, 3) {
                Some((status, after)) if status.starts_with("+OK") => {
                    let Some(end) = find(after, b"\r\n.\r\n") else {
                        problems.push(format!("{what}: no terminator"));
                        continue;
                    };
                    let sent = unstuff(&after[..end + 2]);
                    if sent != body {
                        problems.push(format!(
                            "{what}: {} octets delivered of {}",
                            sent.len(),
                            body.len()
                        ));
                    }
                }
                other => problems.push(format!("{what}: RETR answered {other:?}")),
            }
        } else {
            let chunk_2 = |c: &str| body_fetch(c) == Some((1, 262_144));
            asked(&fake, what, chunk_2, &mut problems);
            problems.extend(retr_not_served_whole(&r.stdout, 3, what));
            let sent = retr_part(&r.stdout, 3).map_or(0, |(_, a)| a.len());
            eprintln!("{what}: {:?}, {sent} octets after it", got.get(3));
        }
    }
    check(problems);
}

/// Undoes dot-stuffing of a body (CRLF lines, terminator removed).
fn unstuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in body.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

/// 5,000 nested parentheses in a response to LOGIN or SELECT: a bounded parser refuses them
/// (`-ERR [SYS/TEMP]`) and the session goes on; a recursive one overflows its stack (SIGABRT).
#[test]
fn deeply_nested_parentheses_are_an_error_not_a_stack_overflow() {
    let mut problems = Vec::new();
    for verb in ["LOGIN", "SELECT"] {
        let fake = mailbox(1).on(verb, untagged_then_ok(deep())).start();
        let a = spawn(&fake, &[]);
        a.send(format!("{LOGIN}QUIT\r\n").as_bytes());
        let r = finish(a, &mut problems, verb);
        asked(&fake, verb, verb_is(verb), &mut problems);
        let got = r.status_lines();
        let want = ["+OK Send your password.", TEMP_LOGIN, "+OK Bye."];
        if got.len() != 4 || got[1..] != want {
            problems.push(format!(
                "{verb}: replies {got:?}, expected greeting, {want:?}\n{}",
                log_tail(&r.stderr)
            ));
        }
        eprintln!("{verb}: {:?}, {got:?}", r.status);
    }
    check(problems);
}

/// A line without end (100 MB here) in the greeting, or the answer to LOGIN, SELECT, or the
/// UID STORE at QUIT: memory stays bounded, and the client gets the right `-ERR`.
#[test]
fn an_endless_response_line_keeps_memory_bounded() {
    let mut problems = Vec::new();
    for verb in [GREETING, "LOGIN", "SELECT"] {
        let fake = mailbox(1).on(verb, endless()).start();
        let mut a = spawn(&fake, &[]);
        let started = Instant::now();
        login_watched(&mut a, &[TEMP_LOGIN], verb, &mut problems);
        eprintln!("{verb}: {:?}", started.elapsed());
        a.send(b"QUIT\r\n");
        finish(a, &mut problems, verb);
        if verb != GREETING {
            asked(&fake, verb, verb_is(verb), &mut problems);
        }
    }
    // At QUIT (default --on-dele seen: UID STORE).
    let fake = mailbox(1).on("UID STORE", endless()).start();
    let mut a = spawn(&fake, &[]);
    a.send(format!("{LOGIN}DELE 1\r\nQUIT\r\n").as_bytes());
    let (done, peak) = watch(&mut a, LIMIT, replies(5));
    let r = finish(a, &mut problems, "UID STORE");
    asked(&fake, "UID STORE", verb_is("UID STORE"), &mut problems);
    let got = r.status_lines();
    if !done || got.get(4).map(String::as_str) != Some(UPDATE_FAILED) {
        problems.push(format!(
            "UID STORE: replies {got:?}, expected {UPDATE_FAILED:?} last"
        ));
    }
    if peak > BOUND_KIB {
        problems.push(format!(
            "UID STORE: peak RSS {peak} KiB (bound {BOUND_KIB} KiB)"
        ));
    }
    eprintln!("UID STORE: peak RSS {peak} KiB, replies {got:?}");
    check(problems);
}

/// A relayed SASL mechanism whose server sends a 10 MB challenge: the client never gets a line
/// longer than a 16 KiB challenge in base64, it gets an `-ERR`, and memory stays bounded.
#[test]
fn a_huge_sasl_challenge_is_not_relayed() {
    let fake = mailbox(1)
        .capability("AUTH=CRAM-MD5")
        .on(
            "AUTHENTICATE",
            Act::raw(|r: &mut Raw<'_>| {
                r.stream(b"+ ", b'A', 10 << 20, b"\r\n")?;
                let _ = r.read_line()?;
                let tag = r.tag.to_string();
                write!(
                    r,
                    "{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
                )?;
                r.flush()
            }),
        )
        .start();
    let mut a = spawn(&fake, &["--sasl", "CRAM-MD5"]);
    // `*` cancels the exchange if the challenge is relayed; else it is a bad command.
    a.send(b"AUTH CRAM-MD5\r\n*\r\n");
    let (done, peak) = watch(&mut a, LIMIT, replies(2));
    a.send(b"QUIT\r\n");
    let mut problems = Vec::new();
    let r = finish(a, &mut problems, "AUTH CRAM-MD5");
    asked(
        &fake,
        "AUTHENTICATE CRAM-MD5",
        verb_is("AUTHENTICATE CRAM-MD5"),
        &mut problems,
    );
    let got = r.status_lines();
    if !done || !got[1].starts_with("-ERR") {
        problems.push(format!("AUTH answered {got:?}"));
    }
    let longest = r.stdout.split(|&b| b == b'\n').map(<[u8]>::len).max();
    let longest = longest.unwrap_or(0);
    // "+ ", 16 KiB in base64, CRLF.
    if longest > 22 << 10 {
        problems.push(format!("the client got a line of {longest} octets"));
    }
    if peak > BOUND_KIB {
        problems.push(format!("peak RSS {peak} KiB (bound {BOUND_KIB} KiB)"));
    }
    eprintln!("10 MB challenge: longest line {longest}, peak RSS {peak} KiB, {got:?}");
    check(problems);
}

/// `* 4000000000 EXISTS`, then a listing of 150,000 partial FETCH responses, never completed
/// (`UID n` only; then also with 1,000 octets of FLAGS each, still without RFC822.SIZE):
/// memory stays bounded, and the client gets an answer.
#[test]
fn a_huge_exists_and_a_listing_never_completed_keep_memory_bounded() {
    let mut problems = Vec::new();
    // 111 keywords of 8 octets and the spaces between: 998 octets.
    let flags = (0..111)
        .map(|i| format!("$kw{i:05}"))
        .collect::<Vec<_>>()
        .join(" ");
    for (what, items) in [
        ("150,000 partial entries", String::new()),
        (
            "150,000 partial entries with 1,000 octets of flags",
            format!(" FLAGS ({flags})"),
        ),
    ] {
        let fake = mailbox(1)
            .on("SELECT", examine(4_000_000_000))
            .on_listing(Act::raw(move |r: &mut Raw<'_>| {
                many_lines(r, 150_000, |n| format!("* {n} FETCH (UID {n}{items})\r\n"))
            }))
            .start();
        let mut a = spawn(&fake, &[]);
        login_watched(&mut a, &["+OK Logged in", TEMP_LOGIN], what, &mut problems);
        a.send(b"QUIT\r\n");
        finish(a, &mut problems, what);
    }
    check(problems);
}

/// One listing response that goes on over 3,000 lines of 40 KB, each ending in a `{0}`
/// literal (each line within the line bound, 120 MB in all): memory stays bounded.
#[test]
fn a_listing_response_continued_by_empty_literals_keeps_memory_bounded() {
    let fake = mailbox(1)
        .on_listing(Act::raw(|r: &mut Raw<'_>| {
            let pad = "x".repeat(40_000);
            let mut buf = Vec::new();
            write!(buf, "* 1 FETCH (UID 1 RFC822.SIZE 40 FLAGS ()")?;
            for i in 0..3000 {
                write!(buf, " X-PAD-{i} \"{pad}\" X-LIT-{i} {{0}}\r\n")?;
                if buf.len() > 1 << 20 {
                    r.write_all(&buf)?;
                    buf.clear();
                }
            }
            write!(buf, ")\r\n{} OK Fetch completed.\r\n", r.tag)?;
            r.write_all(&buf)?;
            r.flush()
        }))
        .start();
    let mut a = spawn(&fake, &[]);
    let mut problems = Vec::new();
    login_watched(
        &mut a,
        &["+OK Logged in", TEMP_LOGIN],
        "3,000 {0} literals",
        &mut problems,
    );
    a.send(b"QUIT\r\n");
    finish(a, &mut problems, "3,000 {0} literals");
    asked(&fake, "the listing", is_listing, &mut problems);
    check(problems);
}

/// 3,000,000 listing entries with `--max-messages 10`: memory stays bounded and at most 10
/// messages are listed.
#[test]
fn max_messages_bounds_the_listing_in_memory() {
    const N: u64 = 3_000_000;
    let fake = mailbox(1)
        .on("SELECT", examine(N))
        .on_listing(Act::raw(|r: &mut Raw<'_>| {
            many_lines(r, N, |n| {
                format!("* {n} FETCH (UID {n} RFC822.SIZE 100 FLAGS ())\r\n")
            })
        }))
        .start();
    let mut a = spawn(&fake, &["--max-messages", "10"]);
    let mut problems = Vec::new();
    let started = Instant::now();
    let peak = login_watched(
        &mut a,
        &["+OK Logged in", TEMP_LOGIN],
        "3,000,000 entries",
        &mut problems,
    );
    a.send(b"STAT\r\nQUIT\r\n");
    let r = finish(a, &mut problems, "3,000,000 entries");
    let got = r.status_lines();
    if got.get(2).is_some_and(|l| l.starts_with("+OK Logged in")) {
        let n: u64 = got
            .get(3)
            .and_then(|s| s.split(' ').nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX);
        if n > 10 {
            problems.push(format!("STAT answered {:?}", got.get(3)));
        }
    }
    eprintln!(
        "3,000,000 entries: {:?}, peak RSS {peak} KiB, {got:?}",
        started.elapsed()
    );
    check(problems);
}

/// A server that drips: an untagged line every 0.5 s during LOGIN, or a body literal one octet
/// every 0.5 s. With `--imap-timeout 2` the command fails within a few seconds however the
/// bytes trickle in.
#[test]
fn drip_fed_responses_meet_the_imap_timeout() {
    const WITHIN: Duration = Duration::from_secs(6);
    let mut problems = Vec::new();

    let fake = mailbox(1)
        .on(
            "LOGIN",
            Act::raw(|r: &mut Raw<'_>| loop {
                r.write_all(b"* OK still here\r\n")?;
                r.pause(Duration::from_millis(500))?;
            }),
        )
        .start();
    let mut a = spawn(&fake, &["--imap-timeout", "2"]);
    let started = Instant::now();
    a.send(LOGIN.as_bytes());
    let (done, _) = watch(&mut a, WITHIN + Duration::from_secs(2), replies(3));
    let took = started.elapsed();
    let got = status_lines(&a.stdout());
    eprintln!("LOGIN drip-fed: {took:?}, {got:?}");
    if done && took <= WITHIN && got[2] == TEMP_LOGIN {
        a.send(b"QUIT\r\n");
        finish(a, &mut problems, "LOGIN drip-fed");
    } else {
        problems.push(format!(
            "LOGIN drip-fed: after {took:?}, replies {got:?} (wanted {TEMP_LOGIN:?} within \
             {WITHIN:?})"
        ));
        a.kill9();
    }

    let fake = mailbox(1)
        .on_body(
            1,
            0,
            Act::raw(|r: &mut Raw<'_>| {
                r.write_all(b"* 1 FETCH (UID 1 BODY[]<0> {100}\r\n")?;
                loop {
                    r.write_all(b"x")?;
                    r.pause(Duration::from_millis(500))?;
                }
            }),
        )
        .start();
    let mut a = spawn(&fake, &["--imap-timeout", "2"]);
    a.send(LOGIN.as_bytes());
    let (done, _) = watch(&mut a, LIMIT, replies(3));
    if !done {
        problems.push(format!(
            "RETR drip-fed: no login: {:?}",
            status_lines(&a.stdout())
        ));
    }
    let started = Instant::now();
    a.send(b"RETR 1\r\n");
    // The RETR is over when its -ERR came, or when aiopopd ended the session mid-message.
    let (_, _) = watch(&mut a, WITHIN + Duration::from_secs(2), |out| {
        status_lines(out).iter().any(|l| l.starts_with("-ERR"))
    });
    let took = started.elapsed();
    let ended = a.exited() || status_lines(&a.stdout()).len() > 3;
    let out = a.stdout();
    eprintln!("RETR drip-fed: {took:?}, {:?}", status_lines(&out));
    if ended && took <= WITHIN {
        problems.extend(retr_not_served_whole(&out, 3, "RETR drip-fed"));
        a.send(b"QUIT\r\n");
        finish(a, &mut problems, "RETR drip-fed");
    } else {
        problems.push(format!(
            "RETR drip-fed: not over after {took:?} (wanted {WITHIN:?}): {:?}",
            status_lines(&out)
        ));
        a.kill9();
    }
    check(problems);
}

/// A server whose refusal echoes the whole LOGIN command (or AUTHENTICATE answer), password
/// included: its text never reaches the log (-l -v), raw or in base64, nor the client.
#[test]
fn a_server_echoing_the_login_never_puts_the_password_in_the_log() {
    const ASCII: &str = "Zq7-echoed-0417";
    const UNICODE: &str = "pässwörd-échoed-0417";
    fn echo(status: &'static str) -> Act {
        Act::raw(move |r: &mut Raw<'_>| {
            let line = String::from_utf8_lossy(r.line).into_owned();
            let tag = r.tag.to_string();
            write!(r, "* NO you sent: {line}\r\n{tag} {status} {line}\r\n")?;
            r.flush()
        })
    }
    let no = "NO [AUTHENTICATIONFAILED] Authentication failed for";
    let cases: Vec<(&str, &str, Act, &str)> = vec![
        ("LOGIN refused, echoed", ASCII, echo(no), AUTH_FAILED),
        (
            "LOGIN BAD, echoed",
            ASCII,
            echo("BAD Unexpected"),
            "-ERR [SYS/TEMP]",
        ),
        (
            "LOGIN NO without a code, echoed",
            ASCII,
            echo("NO"),
            AUTH_FAILED,
        ),
        (
            "AUTHENTICATE PLAIN refused, echoed",
            UNICODE,
            Act::raw(move |r: &mut Raw<'_>| {
                let command = String::from_utf8_lossy(r.line).into_owned();
                r.write_all(b"+ \r\n")?;
                let answer = r.read_line()?.unwrap_or_default();
                let answer = String::from_utf8_lossy(&answer).into_owned();
                let tag = r.tag.to_string();
                write!(
                    r,
                    "* NO [ALERT] {command} {answer}\r\n{tag} NO [AUTHENTICATIONFAILED] \
                     bad response {answer}\r\n"
                )?;
                r.flush()
            }),
            AUTH_FAILED,
        ),
    ];
    let mut problems = Vec::new();
    for (what, password, act, want) in cases {
        let verb = if password.is_ascii() {
            "LOGIN"
        } else {
            "AUTHENTICATE"
        };
        let fake = mailbox(1)
            .credentials("alice", password.as_bytes())
            .on(verb, act)
            .start();
        let a = spawn(&fake, &["-v"]);
        a.send(format!("USER alice\r\nPASS {password}\r\nQUIT\r\n").as_bytes());
        let r = finish(a, &mut problems, what);
        let got = r.status_lines();
        if !got.get(2).is_some_and(|l| l.starts_with(want)) {
            problems.push(format!("{what}: replies {got:?}, expected {want:?}"));
        }
        for form in secret_forms(password.as_bytes()) {
            if r.stderr.contains(&form) {
                problems.push(format!("{what}: the log holds {form:?}:\n{}", r.stderr));
            }
            if String::from_utf8_lossy(&r.stdout).contains(&form) {
                problems.push(format!("{what}: {form:?} reached the client"));
            }
        }
    }
    check(problems);
}

/// A FETCH response for another message whose quoted string holds `UID 7` (as a body, or as
/// some other item): a parser that finds "UID " inside the string would serve UID 9's octets
/// as message 7's. UID 7's own body follows; it is the only one that may be served.
#[test]
fn uid_inside_a_quoted_string_never_routes_another_messages_body() {
    let real = small(7);
    let evil = b"Subject: not yours\r\n\r\nUID 9's body\r\n";
    let own = format!(
        "* 7 FETCH (UID 7 BODY[]<0> {{{}}}\r\n{})\r\n{{tag}} OK Fetch completed.\r\n",
        real.len(),
        String::from_utf8_lossy(&real)
    );
    let cases = [
        (
            "a quoted body holds \"UID 7\"",
            format!("* 9 FETCH (BODY[]<0> \"x UID 7\" UID 9)\r\n{own}"),
        ),
        (
            "another item's quoted string holds \"UID 7\"",
            format!(
                "* 9 FETCH (X-NOTE \"see UID 7\" UID 9 BODY[]<0> {{{}}}\r\n{})\r\n{own}",
                evil.len(),
                String::from_utf8_lossy(evil)
            ),
        ),
    ];
    let mut problems = Vec::new();
    for (what, reply) in cases {
        let fake = mailbox(9).on_body(7, 0, Act::Reply(reply)).start();
        let a = spawn(&fake, &[]);
        a.send(format!("{LOGIN}RETR 7\r\nQUIT\r\n").as_bytes());
        let r = finish(a, &mut problems, what);
        match retr_part(&r.stdout, 3) {
            Some((status, after)) if status.starts_with("+OK") => {
                let end = find(after, b"\r\n.\r\n").map_or(after.len(), |i| i + 2);
                let served = unstuff(&after[..end]);
                if served != real {
                    problems.push(format!(
                        "{what}: RETR 7 served {:?}",
                        String::from_utf8_lossy(&served)
                    ));
                }
            }
            Some((status, _)) if status.starts_with("-ERR [SYS/TEMP]") => {}
            other => problems.push(format!("{what}: RETR 7 answered {other:?}")),
        }
    }
    check(problems);
}

/// Whether some log line (other than the login and session summaries) names `number` as a
/// word and mentions one of `about` (case-insensitive).
fn log_names(stderr: &str, number: &str, about: &[&str]) -> bool {
    stderr.lines().any(|line| {
        // Not the `<3>` priority: that number names nothing.
        let line = match line.strip_prefix('<').and_then(|l| l.split_once('>')) {
            Some((p, rest)) if p.bytes().all(|b| b.is_ascii_digit()) => rest,
            _ => line,
        };
        let lower = line.to_ascii_lowercase();
        !lower.contains("session end")
            && !lower.contains("logged in")
            && about.iter().any(|a| lower.contains(a))
            && line
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
                .any(|w| w == number)
    })
}

/// A STAT/LIST/UIDL session with `--uidl-format %u`, its replies parsed: (STAT count, STAT
/// total as text, LIST (number, size as text), UIDL UIDs).
struct Listed {
    stat: Option<(u64, String)>,
    list: Vec<(u64, String)>,
    /// None if UIDL wasn't answered.
    uids: Option<Vec<u32>>,
}

fn listed(r: &Finished) -> Listed {
    let text = String::from_utf8_lossy(&r.stdout).into_owned();
    let mut lines = text.split("\r\n");
    let mut l = Listed {
        stat: None,
        list: Vec::new(),
        uids: None,
    };
    while let Some(line) = lines.next() {
        if line.starts_with("+OK Scan list follows") {
            for e in lines.by_ref().take_while(|e| *e != ".") {
                let (n, size) = e.split_once(' ').unwrap_or((e, ""));
                l.list.push((n.parse().unwrap_or(0), size.to_string()));
            }
        } else if line.starts_with("+OK Unique-ID listing follows") {
            let uids = lines.by_ref().take_while(|e| *e != ".").map(|e| {
                let uid = e.split(' ').nth(1).and_then(|u| u.parse().ok());
                uid.unwrap_or(0)
            });
            l.uids = Some(uids.collect());
        } else if l.stat.is_none() {
            // STAT's "+OK n total", the only reply of two numbers.
            let w: Vec<&str> = line.split(' ').collect();
            let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if w.len() == 3 && w[0] == "+OK" && number(w[1]) && number(w[2]) {
                l.stat = Some((w[1].parse().unwrap_or(u64::MAX), w[2].to_string()));
            }
        }
    }
    l
}

/// A listing reply with these (number, item text) entries.
fn listing(entries: Vec<(u32, String)>) -> Act {
    let mut text = String::new();
    for (n, items) in entries {
        text.push_str(&format!("* {n} FETCH ({items})\r\n"));
    }
    text.push_str("{tag} OK Fetch completed.\r\n");
    Act::Reply(text)
}

/// RFC822.SIZE 18446744073709551615 and twice 9223372036854775807 (together past 2^64): STAT's
/// total is the sum of what LIST shows, never wrapped; messages left out are named in the log
/// by UID (here 30 more than the message number, so that the two can't be confused).
#[test]
fn absurd_sizes_never_wrap_the_stat_total() {
    const HUGE: [(u32, &str); 3] = [
        (32, "18446744073709551615"),
        (33, "9223372036854775807"),
        (34, "9223372036854775807"),
    ];
    let mut entries = vec![(1, format!("UID 31 RFC822.SIZE {} FLAGS ()", small(1).len()))];
    entries.extend(
        HUGE.iter()
            .map(|(uid, size)| (uid - 30, format!("UID {uid} RFC822.SIZE {size} FLAGS ()"))),
    );
    entries.push((5, format!("UID 35 RFC822.SIZE {} FLAGS ()", small(5).len())));
    let fake = mailbox_from(31, 5).on_listing(listing(entries)).start();
    let a = spawn(&fake, &["--uidl-format", "%u"]);
    a.send(format!("{LOGIN}STAT\r\nLIST\r\nUIDL\r\nQUIT\r\n").as_bytes());
    let mut problems = Vec::new();
    let r = finish(a, &mut problems, "absurd sizes");
    asked(&fake, "the listing", is_listing, &mut problems);
    let l = listed(&r);
    let sizes: Vec<u128> = l.list.iter().map(|(_, s)| s.parse().unwrap_or(0)).collect();
    let sum: u128 = sizes.iter().sum();
    match &l.stat {
        None => problems.push(format!("no STAT reply: {:?}", r.status_lines())),
        Some((n, total)) => {
            let total: Option<u128> = total.parse().ok();
            if *n != l.list.len() as u64 {
                problems.push(format!("STAT says {n} messages, LIST {}", l.list.len()));
            }
            if total != Some(sum) || sizes.iter().any(|s| Some(*s) > total) {
                problems.push(format!(
                    "STAT total {total:?}, LIST sizes {sizes:?} (sum {sum})"
                ));
            }
        }
    }
    match &l.uids {
        None => problems.push("no UIDL reply".to_string()),
        Some(uids) => {
            for (uid, _) in HUGE {
                if !uids.contains(&uid) && !log_names(&r.stderr, &uid.to_string(), &["uid"]) {
                    problems.push(format!("UID {uid} left out without a log line naming it"));
                }
            }
            if !uids.contains(&31) || !uids.contains(&35) {
                problems.push(format!("the sane messages are not all listed: {uids:?}"));
            }
        }
    }
    eprintln!(
        "absurd sizes: STAT {:?}, LIST {:?}, UIDL {:?}, {:?}",
        l.stat, l.list, l.uids, r.status
    );
    if !problems.is_empty() {
        problems.push(format!("log:\n{}", log_tail(&r.stderr)));
    }
    check(problems);
}

/// Listing entries with `UID abc` or `RFC822.SIZE -1` are left out, and the log names each
/// (by UID where it is known, else by message number) and why. UIDs are 20 more than message
/// numbers, so that the two can't be confused.
#[test]
fn garbage_listing_entries_are_left_out_and_named_in_the_log() {
    let entries = vec![
        (1, format!("UID 21 RFC822.SIZE {} FLAGS ()", small(1).len())),
        (2, "UID abc RFC822.SIZE 10 FLAGS ()".to_string()),
        (3, "UID 23 RFC822.SIZE -1 FLAGS ()".to_string()),
        (4, format!("UID 24 RFC822.SIZE {} FLAGS ()", small(4).len())),
    ];
    let fake = mailbox_from(21, 4).on_listing(listing(entries)).start();
    let a = spawn(&fake, &["--uidl-format", "%u"]);
    a.send(format!("{LOGIN}STAT\r\nLIST\r\nUIDL\r\nQUIT\r\n").as_bytes());
    let mut problems = Vec::new();
    let r = finish(a, &mut problems, "garbage entries");
    asked(&fake, "the listing", is_listing, &mut problems);
    let l = listed(&r);
    if l.uids.as_deref() != Some(&[21, 24][..]) {
        problems.push(format!("UIDL lists UIDs {:?}, expected [21, 24]", l.uids));
    }
    if !log_names(&r.stderr, "2", &["uid", "abc"]) {
        problems.push("no log line names message 2 (UID abc)".to_string());
    }
    if !log_names(&r.stderr, "23", &["size", "-1"]) {
        problems.push("no log line names UID 23 (RFC822.SIZE -1)".to_string());
    }
    if !problems.is_empty() {
        problems.push(format!("log:\n{}", r.stderr));
    }
    check(problems);
}

/// With fds 0, 1 and 2 all the client's socket (inetd without a separate log), a server that
/// would crash a recursive parser: the client reads only well-formed POP3 status lines, never
/// the runtime's `thread 'main' has overflowed its stack`.
#[test]
fn runtime_messages_never_reach_a_client_on_fd_2() {
    let fake = mailbox(1).on("LOGIN", untagged_then_ok(deep())).start();
    let r = run_on_socket(
        &mut aiopopd(&fake, &[]),
        format!("{LOGIN}QUIT\r\n").as_bytes(),
        LIMIT,
    );
    let mut problems = Vec::new();
    let mut rest = &r.stdout[..];
    while !rest.is_empty() {
        let end = find(rest, b"\r\n").map_or(rest.len(), |i| i + 2);
        let line = &rest[..end];
        if !line.ends_with(b"\r\n") || !(line.starts_with(b"+OK") || line.starts_with(b"-ERR")) {
            problems.push(format!(
                "the client got {:?}",
                String::from_utf8_lossy(line)
            ));
        }
        rest = &rest[end..];
    }
    if status_lines(&r.stdout).len() != 4 {
        problems.push(format!("replies {:?}", status_lines(&r.stdout)));
    }
    eprintln!(
        "on one socket: {:?}, {:?}",
        r.status,
        String::from_utf8_lossy(&r.stdout)
    );
    check(problems);
}

/// The process can't dump core (a core would hold passwords and mail): while it runs, its soft
/// core-size limit is 0, even when started with a higher one.
#[test]
fn core_dumps_are_disabled() {
    use std::os::unix::process::CommandExt;
    let fake = mailbox(1).start();
    let mut cmd = aiopopd(&fake, &[]);
    // Start it with the highest core limit allowed, so that 0 can only be aiopopd's doing.
    // SAFETY: getrlimit and setrlimit are async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_CORE, &mut lim) == 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_CORE, &lim);
            }
            Ok(())
        });
    }
    let mut a = Aiopopd::spawn_with(&mut cmd);
    a.send(LOGIN.as_bytes());
    let (done, _) = watch(&mut a, LIMIT, replies(3));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", a.pid())).unwrap_or_default();
    a.send(b"QUIT\r\n");
    let mut problems = Vec::new();
    finish(a, &mut problems, "core limit");
    if !done {
        problems.push("no login".to_string());
    }
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_default()
        .to_string();
    let soft = core.split_whitespace().nth(4).unwrap_or("?");
    eprintln!("{core}");
    if soft != "0" {
        problems.push(format!("while logged in: {core:?}"));
    }
    check(problems);
}

/// Over IMAPS the deadline holds below TLS: a server sending its greeting's TLS record one byte
/// every 0.3 s (each byte well within a socket timeout of its own) still meets `--imap-timeout`.
/// OpenSSL reads one record with many `recv`s; a timeout per `recv` would let this run for a
/// dozen seconds here, and for hours with a longer record.
#[test]
fn a_tls_record_trickled_byte_by_byte_meets_the_imap_timeout() {
    use std::io::Read;
    use std::net::TcpListener;
    const WITHIN: Duration = Duration::from_secs(6);
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pair.cert.pem()).unwrap();
    let cert = pair.cert.der().clone();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(pair.signing_key.serialize_der()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        thread::spawn(move || {
            let Ok((mut tcp, _)) = listener.accept() else {
                return;
            };
            tcp.set_read_timeout(Some(LIMIT)).unwrap();
            let mut tls = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            while tls.is_handshaking() {
                if tls.complete_io(&mut tcp).is_err() {
                    return;
                }
            }
            tls.writer()
                .write_all(b"* OK [CAPABILITY IMAP4rev1] ready, slowly\r\n")
                .unwrap();
            let mut record = Vec::new();
            tls.write_tls(&mut record).unwrap();
            for byte in record {
                if stop.load(Ordering::Relaxed) || tcp.write_all(&[byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(300));
            }
            // Whole: then nothing more (the login would wait for its own deadline).
            let _ = tcp.read(&mut [0; 64]);
        })
    };
    let port = port.to_string();
    let ca = ca.to_str().unwrap();
    let bin = std::env::var("AIOPOPD_BIN").unwrap_or_else(|_| BIN.to_string());
    let mut a = Aiopopd::spawn_with(Command::new(bin).args([
        "-H",
        "localhost",
        "-p",
        &port,
        "-s",
        "--imap-ca",
        ca,
        "--imap-timeout",
        "2",
        "--allow-plaintext-auth",
        "--auth-failure-delay",
        "0",
    ]));
    let started = Instant::now();
    a.send(LOGIN.as_bytes());
    let (done, _) = watch(&mut a, WITHIN + Duration::from_secs(8), replies(3));
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let got = status_lines(&a.stdout());
    a.kill9();
    let _ = server.join();
    assert!(
        done && took <= WITHIN && got[2] == TEMP_LOGIN,
        "after {took:?}: {got:?} (wanted {TEMP_LOGIN:?} within {WITHIN:?})"
    );
}
