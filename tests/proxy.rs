//! `--proxy-protocol-from`: aiopopd behind a load balancer that sends a PROXY header (HAProxy's
//! `send-proxy` / `send-proxy-v2`). Runs the binary under `systemd-socket-activate` on loopback
//! (so the peer has a real address: 127.0.0.1), in both launch forms, against a private Dovecot:
//! the header's source is the `rip=` of every log line and the session works; a trusted peer
//! without a valid header is closed unserved with one log line; from any other peer a `PROXY`
//! line is just a bad command, and nothing in it is believed.

mod common;

use common::activate::Activator;
use common::dovecot::Dovecot;
use common::pop3::{args, replies, run};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

const SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// aiopopd under `systemd-socket-activate` (stdin form if `inetd`, else fd 3), trusting `from`.
fn start(d: &Dovecot, inetd: bool, from: &str, extra: &[String]) -> Activator {
    let mut a = args(d);
    a.extend(["--proxy-protocol-from".to_string(), from.to_string()]);
    a.extend(extra.iter().cloned());
    Activator::start(inetd, &a)
}

/// Connects from 127.0.0.1, sends `first` and `script` in one write (pipelined behind the
/// header: nothing of it may be swallowed with the header), reads until the server closes.
fn exchange(port: u16, first: &[u8], script: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&[first, script.as_bytes()].concat()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

/// The sessions' log once it contains `needle`.
fn wait_log(a: &Activator, needle: &str) -> String {
    a.wait_log(needle, 1)
}

/// Only aiopopd's own lines (`<N>` prefixes), not systemd-socket-activate's chatter, which names
/// every connection's real peer.
fn ours(log: &str) -> String {
    log.lines()
        .filter(|l| l.starts_with('<'))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn v2(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    h.extend_from_slice(&[ver_cmd, family]);
    h.extend_from_slice(&(block.len() as u16).to_be_bytes());
    h.extend_from_slice(block);
    h
}

/// A v2 PROXY header for a TCP connection from `src` to 127.0.0.1 (mapped, if `src` is IPv6).
fn v2_tcp(src: std::net::IpAddr, sport: u16, tlvs: &[u8]) -> Vec<u8> {
    let mut block = Vec::new();
    let family = match src {
        std::net::IpAddr::V4(ip) => {
            block.extend_from_slice(&ip.octets());
            block.extend_from_slice(&[127, 0, 0, 1]);
            0x11
        }
        std::net::IpAddr::V6(ip) => {
            block.extend_from_slice(&ip.octets());
            block.extend_from_slice(&std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets());
            0x21
        }
    };
    block.extend_from_slice(&sport.to_be_bytes());
    block.extend_from_slice(&110u16.to_be_bytes());
    block.extend_from_slice(tlvs);
    v2(0x21, family, &block)
}

const LOGIN: &str = "USER alice\r\nPASS wrong\r\nUSER alice\r\nPASS alice-pw\r\nSTAT\r\nQUIT\r\n";

/// The replies to [`LOGIN`]: a refused login, then a good one and the maildrop's one message.
fn check_login(out: &[u8]) {
    let r = replies(out, LOGIN);
    let text = String::from_utf8_lossy(out);
    assert_eq!(r.len(), 7, "{text}");
    assert!(r[0].status.starts_with("+OK pop.test "), "{text}");
    assert!(r[2].status.starts_with("-ERR [AUTH]"), "{text}");
    assert!(r[4].ok() && r[6].ok(), "{text}");
    assert!(r[5].status.starts_with("+OK 1 "), "{text}");
}

fn dovecot() -> Dovecot {
    let d = Dovecot::start();
    d.deliver("alice", "INBOX", b"Subject: one\r\n\r\nbody\r\n");
    d
}

#[test]
fn v1_header_from_a_trusted_peer_is_the_client_address() {
    let d = dovecot();
    for inetd in [true, false] {
        let a = start(&d, inetd, "127.0.0.1/32", &[]);
        let out = exchange(
            a.port,
            b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 110\r\n",
            LOGIN,
        );
        check_login(&out);
        let log = wait_log(&a, "session end: rip=203.0.113.7 user=alice ");
        assert!(
            log.contains("login failed: user=alice rip=203.0.113.7 reason="),
            "{log}"
        );
        // Nothing named the balancer as the client (the activator's probe, which sent nothing,
        // is only a debug line).
        assert!(!ours(&log).contains("127.0.0.1"), "inetd={inetd}:\n{log}");
    }
}

#[test]
fn v2_header_with_tlvs_and_ipv6_or_mapped_sources() {
    let d = dovecot();
    for inetd in [false, true] {
        let a = start(&d, inetd, "10.0.0.0/8,127.0.0.0/8", &[]);
        // PP2_TYPE_AUTHORITY and a NOOP padding, as HAProxy may send.
        let mut tlvs = vec![0x02, 0, 8];
        tlvs.extend_from_slice(b"pop.test");
        tlvs.extend_from_slice(&[0x04, 0, 2, 0, 0]);
        let header = v2_tcp("2001:db8::7".parse().unwrap(), 50000, &tlvs);
        check_login(&exchange(a.port, &header, LOGIN));
        let log = wait_log(&a, "session end: rip=2001:db8::7 user=alice ");
        assert!(log.contains("login failed: user=alice rip=2001:db8::7 "));
        // An IPv4 client in IPv6 form (a dual-stack balancer) is logged as IPv4.
        let header = v2_tcp("::ffff:198.51.100.4".parse().unwrap(), 1, b"");
        check_login(&exchange(a.port, &header, LOGIN));
        wait_log(&a, "session end: rip=198.51.100.4 user=alice ");
        let out = exchange(
            a.port,
            b"PROXY TCP6 ::ffff:198.51.100.5 ::1 2 110\r\n",
            "QUIT\r\n",
        );
        assert!(out.starts_with(b"+OK pop.test "));
        let log = wait_log(&a, "session end: rip=198.51.100.5 ");
        assert!(!ours(&log).contains("127.0.0.1"), "{log}");
    }
}

#[test]
fn the_header_comes_before_tls_on_pop3s() {
    let d = dovecot();
    let tls = [
        "--ssl-cert".to_string(),
        d.ca_cert_path().to_str().unwrap().into(),
        "--ssl-key".into(),
        d.dir().join("key.pem").to_str().unwrap().into(),
    ];
    let a = start(&d, true, "127.0.0.1", &tls);
    let header = v2_tcp("192.0.2.44".parse().unwrap(), 4321, b"");
    let script = r#"
import socket, ssl, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
s.sendall(bytes.fromhex(sys.argv[3]))
ctx = ssl.create_default_context(cafile=sys.argv[2])
f = ctx.wrap_socket(s, server_hostname="127.0.0.1").makefile("rwb")
print(f.readline().decode().strip())
f.write(b"USER alice\r\nPASS alice-pw\r\nSTAT\r\nQUIT\r\n")
f.flush()
for _ in range(4):
    print(f.readline().decode().strip())
"#;
    let hex: String = header.iter().map(|b| format!("{b:02x}")).collect();
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args([
            &a.port.to_string(),
            d.ca_cert_path().to_str().unwrap(),
            &hex,
        ])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("+OK pop.test "), "{text}");
    assert!(lines[3].starts_with("+OK 1 "), "{text}");
    wait_log(&a, "session end: rip=192.0.2.44 user=alice ");
}

#[test]
fn local_and_unknown_health_checks_are_served_as_the_balancer_and_logged_at_debug() {
    let d = dovecot();
    let a = start(&d, false, "127.0.0.1/32", &["-v".to_string()]);
    // HAProxy's check with send-proxy-v2: LOCAL, read the greeting, close.
    let out = exchange(a.port, &v2(0x20, 0x00, b""), "QUIT\r\n");
    assert!(out.starts_with(b"+OK pop.test "), "{out:?}");
    // Addresses after LOCAL are ignored, as are v1 UNKNOWN's.
    let out = exchange(a.port, &v2(0x20, 0x11, &[1; 12]), "QUIT\r\n");
    assert!(out.starts_with(b"+OK pop.test "), "{out:?}");
    let out = exchange(a.port, b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", "QUIT\r\n");
    assert!(out.starts_with(b"+OK pop.test "), "{out:?}");
    // HAProxy's check with send-proxy (v1) names the check connection itself as the client.
    let mut s = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let own = s.local_addr().unwrap().port();
    s.write_all(
        format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {own} {}\r\nQUIT\r\n",
            a.port
        )
        .as_bytes(),
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(out.starts_with(b"+OK pop.test "), "{out:?}");
    // A line every few seconds per balancer would flood the log: these are debug lines.
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.log().matches("<7>session end: rip=127.0.0.1 ").count() < 4 {
        assert!(Instant::now() < deadline, "{}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = a.log();
    assert!(!ours(&log).contains("1.2.3.4"));
    assert!(!log.contains("<6>session end"), "{log}");
}

#[test]
fn a_trusted_peer_without_a_valid_header_is_closed_unserved() {
    let d = dovecot();
    for inetd in [true, false] {
        let a = start(&d, inetd, "127.0.0.1/32", &[]);
        // Nothing at all: closed after the header wait (5 s), without a greeting.
        let started = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let waited = started.elapsed();
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        assert!(
            waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
            "{waited:?}"
        );
        wait_log(
            &a,
            "PROXY header refused: rip=127.0.0.1 reason=no complete PROXY header within 5 s",
        );
        // POP3 without a header, a malformed v1 line, a truncated v2 header: closed at once.
        for (first, reason) in [
            (&b"USER alice\r\n"[..], "not a PROXY protocol header"),
            (
                b"PROXY TCP4 203.0.113.7 127.0.0.1 99999 110\r\nUSER alice\r\n",
                "v1 header: bad source port",
            ),
            (
                &v2_tcp("203.0.113.8".parse().unwrap(), 1, b"")[..20],
                "closed after 20 octets",
            ),
            (&v2(0x22, 0x11, &[0; 12]), "v2 header: unknown command"),
        ] {
            let started = Instant::now();
            let mut s = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.write_all(first).unwrap();
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            assert!(
                out.is_empty(),
                "{reason}: {}",
                String::from_utf8_lossy(&out)
            );
            assert!(started.elapsed() < Duration::from_secs(4), "{reason}");
            wait_log(
                &a,
                &format!("PROXY header refused: rip=127.0.0.1 reason={reason}"),
            );
        }
        let log = a.log();
        assert!(
            !ours(&log).contains("session end"),
            "something was served:\n{log}"
        );
        assert!(!ours(&log).contains("203.0.113"), "{log}");
        assert_eq!(
            ours(&log).matches("PROXY header refused").count(),
            5,
            "{log}"
        );
    }
}

#[test]
fn a_proxy_line_from_an_untrusted_peer_is_a_bad_command_and_believed_by_nobody() {
    let d = dovecot();
    for inetd in [true, false] {
        let a = start(&d, inetd, "127.0.0.2/32,10.0.0.0/8", &[]);
        let script =
            "PROXY TCP4 203.0.113.7 127.0.0.1 40000 110\r\nUSER alice\r\nPASS wrong\r\nQUIT\r\n";
        let out = exchange(a.port, b"", script);
        let r = replies(&out, script);
        let text = String::from_utf8_lossy(&out);
        assert_eq!(r.len(), 5, "{text}");
        assert!(r[0].ok() && r[1].status.starts_with("-ERR"), "{text}");
        assert!(r[3].status.starts_with("-ERR [AUTH]"), "{text}");
        let log = wait_log(&a, "login failed: user=alice rip=127.0.0.1 ");
        assert!(
            !ours(&log).contains("203.0.113.7") && !ours(&log).contains("PROXY header"),
            "{log}"
        );
        // A v2 header is no different: the greeting is not held back, its bytes are a bad line.
        let out = exchange(a.port, &v2_tcp("203.0.113.9".parse().unwrap(), 1, b""), "");
        assert!(out.starts_with(b"+OK pop.test "), "{out:?}");
        assert!(!ours(&a.log()).contains("203.0.113.9"));
    }
}

#[test]
fn the_option_refuses_what_is_not_a_network() {
    for (bad, hint) in [
        ("10.0.0.1/8", "10.0.0.0/8"),
        ("10.0.0.0/33", "0 to 32"),
        ("pop.example.com", "not an IP address"),
        ("10.0.0.0/8,", "empty"),
    ] {
        let r = run(
            &[
                "-H".to_string(),
                "127.0.0.1".into(),
                "--proxy-protocol-from".into(),
                bad.into(),
            ],
            b"",
        );
        assert!(!r.ok, "{bad}");
        assert!(
            r.stderr.contains("--proxy-protocol-from") && r.stderr.contains(hint),
            "{bad}: {}",
            r.stderr
        );
        assert!(r.stdout.starts_with(b"-ERR [SYS/PERM]"));
    }
    let help = Command::new(common::pop3::BIN)
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--proxy-protocol-from CIDR,..."));
    // On a pipe there is no peer address: nothing is trusted, nothing is read specially.
    let d = dovecot();
    let mut a = args(&d);
    a.extend(["--proxy-protocol-from".into(), "0.0.0.0/0,::/0".into()]);
    let r = run(&a, b"PROXY UNKNOWN\r\nQUIT\r\n");
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.starts_with("+OK pop.test "), "{out}");
    assert!(out.contains("\r\n-ERR"), "{out}");
}
