//! aiopopd behind the real HAProxy (Debian package `haproxy`): TCP mode, round robin over two
//! aiopopd "hosts" (socket-activated listeners), one sent PROXY v1 (`send-proxy`), the other v2
//! (`send-proxy-v2`), HAProxy connecting from 127.0.0.2, clients from 127.0.0.3, aiopopd trusting
//! only 127.0.0.2. Sessions are byte-exact against the private Dovecot's IMAP bodies on both
//! backends in clear, POP3S and STLS; the logged `rip=` is the client's; a spoofed PROXY line
//! from an untrusted address is refused; a trusted address without a header gets nothing; the
//! health checks (`check-send-proxy`: LOCAL in v2) log nothing above debug. Without haproxy the tests
//! are skipped, unless `CI` is set: then they fail.

mod common;

use common::activate::Activator;
use common::dovecot::Dovecot;
use common::haproxy::{self, connect_from, Haproxy, Proxy, BALANCER, CLIENT};
use common::pop3::{args, expected_retr, replies};
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Clear,
    Pop3s,
    Stls,
}

fn dovecot() -> Dovecot {
    let d = Dovecot::start();
    d.deliver(
        "alice",
        "INBOX",
        b"Subject: one\r\n\r\nbody\r\n.dot line\r\n..two\r\n",
    );
    d.deliver(
        "alice",
        "INBOX",
        b"Subject: two\n\nbare LF\nno final newline",
    );
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for i in 0..20_000 {
        big.extend_from_slice(format!("line {i} {}\r\n", ".".repeat(i % 70)).as_bytes());
    }
    d.deliver("alice", "INBOX", &big);
    d
}

fn tls_args(d: &Dovecot, mode: Mode) -> Vec<String> {
    let mut a = Vec::new();
    if !matches!(mode, Mode::Clear) {
        a.extend([
            "--ssl-cert".to_string(),
            d.ca_cert_path().to_str().unwrap().into(),
            "--ssl-key".into(),
            d.dir().join("key.pem").to_str().unwrap().into(),
        ]);
    }
    if matches!(mode, Mode::Stls) {
        a.push("--stls".into());
    }
    a
}

/// One aiopopd "host": socket-activated (stdin form), trusting only HAProxy's address.
fn host(d: &Dovecot, mode: Mode) -> Activator {
    let mut a = args(d);
    a.extend([
        "--proxy-protocol-from".to_string(),
        format!("{BALANCER}/32"),
    ]);
    a.extend(tls_args(d, mode));
    Activator::start(true, &a)
}

/// A whole session from 127.0.0.3 through a Python client (TLS as a real client does it):
/// the greeting, then everything after it (after STLS's reply, for STLS) until the server
/// closes.
fn session(mode: Mode, port: u16, ca: &str, script: &str) -> Vec<u8> {
    let py = r#"
import socket, ssl, sys
mode, port, ca, script = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].encode()
s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=("127.0.0.3", 0))
ctx = ssl.create_default_context(cafile=ca)
def line(sock):
    b = b""
    while not b.endswith(b"\r\n"):
        c = sock.recv(1)
        if not c:
            break
        b += c
    return b
out = b""
if mode == "Pop3s":
    s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    out += line(s)
elif mode == "Stls":
    out += line(s)
    s.sendall(b"STLS\r\n")
    r = line(s)
    assert r.startswith(b"+OK"), r
    s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
else:
    out += line(s)
s.sendall(script)
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
sys.stdout.buffer.write(out)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(py)
        .args([&format!("{mode:?}"), &port.to_string(), ca, script])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The sessions' log once it contains `needle` `n` times.
fn wait_log(a: &Activator, needle: &str, n: usize) -> String {
    a.wait_log(needle, n)
}

/// aiopopd's own lines (`<N>` prefixes), not systemd-socket-activate's.
fn ours(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.starts_with('<')).collect()
}

/// Lines at warning priority or worse.
fn warnings(log: &str) -> Vec<&str> {
    ours(log)
        .into_iter()
        .filter(|l| matches!(l.as_bytes().get(1), Some(b'0'..=b'4')))
        .collect()
}

const SCRIPT: &str =
    "USER alice\r\nPASS alice-pw\r\nSTAT\r\nRETR 1\r\nRETR 2\r\nRETR 3\r\nQUIT\r\n";

fn sessions_through_haproxy(mode: Mode) {
    if !haproxy::available() {
        return;
    }
    let d = dovecot();
    let bodies = d.imap_bodies("alice", "alice-pw", "INBOX");
    assert_eq!(bodies.len(), 3);
    let (a, b) = (host(&d, mode), host(&d, mode));
    let h = Haproxy::start(&[(a.port, Proxy::V1), (b.port, Proxy::V2)], 200);
    let ca = d.ca_cert_path().to_str().unwrap().to_string();
    // Round robin: four sessions, two on each backend.
    for i in 0..4 {
        let out = session(mode, h.port, &ca, SCRIPT);
        let r = replies(&out, SCRIPT);
        let text = String::from_utf8_lossy(&out[..out.len().min(300)]).into_owned();
        assert_eq!(r.len(), 8, "{mode:?} session {i}: {text}");
        assert!(r[0].status.starts_with("+OK pop.test "), "{text}");
        assert!(r[3].status.starts_with("+OK 3 "), "{text}");
        for (k, (_, body)) in bodies.iter().enumerate() {
            assert_eq!(
                r[4 + k].body.as_deref(),
                Some(&expected_retr(body)[..]),
                "{mode:?} session {i}, message {}",
                k + 1
            );
        }
        assert!(r[7].ok(), "{text}");
    }
    for (name, host) in [("v1", &a), ("v2", &b)] {
        let log = wait_log(host, "session end: rip=127.0.0.3 user=alice ", 2);
        assert!(log.contains("outcome=quit"), "{mode:?} {name}: {log}");
        // No line took the balancer for the client.
        for l in ours(&log) {
            assert!(
                !(l.contains("user=alice") && l.contains("rip=127.0.0.2")),
                "{l}"
            );
        }
    }
    // Health checks every 200 ms for a while: no warnings on either host, none from HAProxy.
    std::thread::sleep(Duration::from_millis(1500));
    for (name, host) in [("v1", &a), ("v2", &b)] {
        let log = host.log();
        let w = warnings(&log);
        assert!(w.is_empty(), "{mode:?} {name}: warnings:\n{}", w.join("\n"));
        // Nor a line per check: LOCAL and connect-only checks are debug lines.
        let checks: Vec<&str> = ours(&log)
            .into_iter()
            .filter(|l| l.contains("rip=127.0.0.2") || l.contains("rip=pipe"))
            .collect();
        assert!(checks.is_empty(), "{mode:?} {name}:\n{}", checks.join("\n"));
    }
    let hlog = h.log();
    assert!(
        !hlog.contains("is DOWN") && !hlog.contains("ALERT"),
        "{mode:?}: haproxy:\n{hlog}"
    );
}

#[test]
fn byte_exact_sessions_in_clear_over_both_backends() {
    sessions_through_haproxy(Mode::Clear);
}

#[test]
fn byte_exact_sessions_over_pop3s_over_both_backends() {
    sessions_through_haproxy(Mode::Pop3s);
}

#[test]
fn byte_exact_sessions_over_stls_over_both_backends() {
    sessions_through_haproxy(Mode::Stls);
}

#[test]
fn a_spoofed_header_from_an_untrusted_address_is_refused_and_the_real_peer_logged() {
    if !haproxy::available() {
        return;
    }
    let d = dovecot();
    let a = host(&d, Mode::Clear);
    // Straight to the backend from the client's address, claiming to be someone else.
    let mut s = connect_from(CLIENT, a.port).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 1234 110\r\nQUIT\r\n")
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = text.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("+OK pop.test "), "{text}");
    assert!(lines[1].starts_with("-ERR"), "{text}");
    assert_eq!(lines[2], "+OK Bye.");
    let log = wait_log(&a, "session end: rip=127.0.0.3 ", 1);
    assert!(!log.contains("203.0.113.9"), "{log}");
}

#[test]
fn a_trusted_address_without_a_header_gets_nothing() {
    if !haproxy::available() {
        return;
    }
    let d = dovecot();
    for mode in [Mode::Clear, Mode::Pop3s] {
        let a = host(&d, mode);
        // From the balancer's address, but POP3 (or a ClientHello) instead of a header.
        let first: &[u8] = match mode {
            Mode::Pop3s => b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
            _ => b"CAPA\r\nUSER alice\r\n",
        };
        let mut s = connect_from(BALANCER, a.port).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(first).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(
            out.is_empty(),
            "{mode:?}: {:?}",
            String::from_utf8_lossy(&out)
        );
        let log = wait_log(&a, "PROXY header refused: rip=127.0.0.2 ", 1);
        assert!(!log.contains("session end: rip=127.0.0.2"), "{log}");
    }
}
