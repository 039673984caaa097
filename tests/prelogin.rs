//! Pre-login limits (`--handshake-timeout`, `--login-timeout`): a client that never finishes the
//! TLS handshake, or never logs in however busy it keeps the session, is cut at the configured
//! time with one `rip=` log line; a client that has logged in is bound only by the idle
//! `--timeout`. Runs the binary under `systemd-socket-activate` on loopback against a private
//! Dovecot, with limits of a second or two.

mod common;

use common::activate::Activator;
use common::dovecot::Dovecot;
use common::pop3::args;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn start(d: &Dovecot, extra: &[&str]) -> Activator {
    let mut a = args(d);
    a.extend(extra.iter().map(|s| s.to_string()));
    Activator::start(true, &a)
}

/// The sessions' log once it contains `needle`.
fn wait_log(a: &Activator, needle: &str) -> String {
    a.wait_log(needle, 1)
}

fn dovecot() -> Dovecot {
    let d = Dovecot::start();
    d.deliver("alice", "INBOX", b"Subject: one\r\n\r\nbody\r\n");
    d
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

#[test]
fn a_silent_connection_to_pop3s_is_cut_at_the_handshake_limit() {
    let d = dovecot();
    let key = d.dir().join("key.pem");
    let a = start(
        &d,
        &[
            "--ssl-cert",
            d.ca_cert_path().to_str().unwrap(),
            "--ssl-key",
            key.to_str().unwrap(),
            "--handshake-timeout",
            "1",
            "--login-timeout",
            "5",
        ],
    );
    let started = Instant::now();
    let mut s = connect(a.port);
    let mut out = Vec::new();
    // Nothing is sent: the connection is just closed (a reply would not be TLS).
    let _ = s.read_to_end(&mut out);
    let took = started.elapsed();
    assert!(out.is_empty(), "{out:?}");
    assert!(took >= Duration::from_millis(950), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    let log = wait_log(&a, "TLS handshake timeout: rip=127.0.0.1 ");
    assert!(log.contains("--handshake-timeout"), "{log}");

    // A client that trickles a ClientHello's first bytes, one every 300 ms, is cut as well.
    let started = Instant::now();
    let mut s = connect(a.port);
    let mut out = Vec::new();
    for b in b"\x16\x03\x01\x02\x00\x01\x00" {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = s.read_to_end(&mut out);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn a_client_sending_noop_every_half_second_is_cut_at_the_login_limit() {
    let d = dovecot();
    let a = start(&d, &["--login-timeout", "2"]);
    let started = Instant::now();
    let s = connect(a.port);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut greeting = String::new();
    r.read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("+OK pop.test "), "{greeting}");
    let mut last = String::new();
    let mut noops = 0;
    loop {
        if w.write_all(b"NOOP\r\n").is_err() {
            break;
        }
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if line != "+OK\r\n" {
            last = line;
            break;
        }
        noops += 1;
        assert!(started.elapsed() < Duration::from_secs(5), "never cut");
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = started.elapsed();
    assert_eq!(last, "-ERR Timeout: log in within 2 s; closing.\r\n");
    assert!(noops >= 3, "{noops}");
    assert!(took >= Duration::from_millis(1950), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    // Then the connection is closed (a reset, if a NOOP crossed the cut unread).
    let mut rest = String::new();
    let _ = r.read_to_string(&mut rest);
    assert_eq!(rest, "");
    let log = wait_log(&a, "session end: rip=127.0.0.1 user=- ");
    assert!(
        log.contains("login timeout: rip=127.0.0.1 not logged in within 2 s"),
        "{log}"
    );
    assert!(log.contains("outcome=login-timeout"), "{log}");
}

#[test]
fn a_client_sending_one_byte_every_few_hundred_ms_is_cut_too() {
    let d = dovecot();
    let a = start(&d, &["--login-timeout", "2"]);
    let started = Instant::now();
    let mut s = connect(a.port);
    // Never a whole line: each byte resets nothing.
    for b in b"USER alice".iter().cycle().take(30) {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.ends_with("-ERR Timeout: log in within 2 s; closing.\r\n"),
        "{text}"
    );
    wait_log(&a, "login timeout: rip=127.0.0.1 ");
}

#[test]
fn after_login_only_the_idle_timeout_applies() {
    let d = dovecot();
    let a = start(&d, &["--login-timeout", "2", "--timeout", "1"]);
    let s = connect(a.port);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    w.write_all(b"USER alice\r\nPASS alice-pw\r\n").unwrap();
    for _ in 0..2 {
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("+OK"), "{line}");
    }
    // Logged in: past the login limit, a NOOP every 0.5 s keeps the session.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        w.write_all(b"NOOP\r\n").unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "+OK\r\n");
        std::thread::sleep(Duration::from_millis(500));
    }
    w.write_all(b"STAT\r\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("+OK 1 "), "{line}");
    // Then silence: the idle --timeout (1 s) ends it.
    let idle = Instant::now();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "-ERR Autologout; idle for too long.\r\n");
    assert!(idle.elapsed() >= Duration::from_millis(950));
    let log = wait_log(&a, "session end: rip=127.0.0.1 user=alice ");
    assert!(log.contains("outcome=timeout"), "{log}");
    assert!(!log.contains("login timeout"), "{log}");
}
