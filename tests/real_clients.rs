//! aiopopd as users run it: spawned per connection by `systemd-socket-activate` (the stdin
//! form xinetd also uses, and the fd-3 form of systemd's `Accept=yes`), with real POP3 clients
//! (Python's poplib, curl) retrieving every message intact.

mod common;

use common::activate::Activator;
use common::dovecot::Dovecot;
use common::pop3::{args, expected_retr, replies};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

fn corpus(d: &Dovecot) {
    d.deliver(
        "alice",
        "INBOX",
        b"Subject: one\r\n\r\n.dot\r\n.\r\nend\r\n",
    );
    d.deliver("alice", "INBOX", b"Subject: two\n\nbare\nlf\n");
    d.deliver(
        "alice",
        "INBOX",
        b"Subject: three\r\n\r\n\xe9\xff no final newline",
    );
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for i in 0..40_000 {
        big.extend_from_slice(
            format!("{}line {i}\r\n", if i % 3 == 0 { "." } else { "" }).as_bytes(),
        );
    }
    big.extend_from_slice(&[b'q'; 5000]);
    big.extend_from_slice(b"\r\n");
    d.deliver("alice", "INBOX", &big);
}

const POPLIB: &str = r#"
import poplib, sys, os
poplib._MAXLINE = 1 << 20   # the default (2048) refuses long lines that RFC 5322 allows
p = poplib.POP3("127.0.0.1", int(sys.argv[1]), timeout=30)
p.user("alice")
p.pass_("alice-pw")
count, size = p.stat()
for i in range(1, count + 1):
    resp, lines, octets = p.retr(i)
    with open(os.path.join(sys.argv[2], str(i)), "wb") as f:
        f.write(b"".join(l + b"\r\n" for l in lines))
print(count, size, p.uidl()[1])
p.quit()
"#;

#[test]
fn poplib_retrieves_every_message_intact_through_systemd_socket_activate() {
    let d = Dovecot::start();
    corpus(&d);
    let a = Activator::start(true, &args(&d));
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            POPLIB,
            &a.port.to_string(),
            out_dir.path().to_str().unwrap(),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "poplib: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bodies = d.imap_bodies("alice", "alice-pw", "INBOX");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{} ", bodies.len())));
    for (i, (_, body)) in bodies.iter().enumerate() {
        let got = std::fs::read(out_dir.path().join((i + 1).to_string())).unwrap();
        assert_eq!(got, expected_retr(body), "message {}", i + 1);
    }
}

#[test]
fn curl_retrieves_a_message() {
    let d = Dovecot::start();
    corpus(&d);
    let a = Activator::start(true, &args(&d));
    let bodies = d.imap_bodies("alice", "alice-pw", "INBOX");
    for i in [1usize, 4] {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "-u", "alice:alice-pw"])
            .arg(format!("pop3://127.0.0.1:{}/{i}", a.port))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, expected_retr(&bodies[i - 1].1), "message {i}");
    }
}

#[test]
fn the_fd3_form_of_accept_yes_serves_a_pipelined_session() {
    let d = Dovecot::start();
    corpus(&d);
    let a = Activator::start(false, &args(&d));
    let script = "USER alice\r\nPASS alice-pw\r\nSTAT\r\nRETR 1\r\nRETR 4\r\nQUIT\r\n";
    let mut s = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(script.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let r = replies(&out, script);
    assert_eq!(
        r.len(),
        7,
        "{}",
        String::from_utf8_lossy(&out[..out.len().min(500)])
    );
    let bodies = d.imap_bodies("alice", "alice-pw", "INBOX");
    assert_eq!(r[4].body.as_deref(), Some(&expected_retr(&bodies[0].1)[..]));
    assert_eq!(r[5].body.as_deref(), Some(&expected_retr(&bodies[3].1)[..]));
    assert!(r[6].ok());
}

#[test]
fn an_idle_client_is_logged_out() {
    let d = Dovecot::start();
    let mut a = args(&d);
    a.extend(["--timeout".to_string(), "1".to_string()]);
    let act = Activator::start(true, &a);
    let mut s = TcpStream::connect(("127.0.0.1", act.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("+OK pop.test ")
            && text.ends_with("-ERR Autologout; idle for too long.\r\n"),
        "{text}"
    );
}

#[test]
fn fetchmail_delivers_every_message_and_keeps_them_with_keep() {
    let d = Dovecot::start();
    corpus(&d);
    // fetchmail 6.4 insists on TLS (STLS) by default, as it should: serve it that way, with
    // the test Dovecot's certificate (made for localhost).
    let mut aargs = args(&d);
    aargs.retain(|s| s != "--allow-plaintext-auth");
    aargs.extend([
        "--stls".to_string(),
        "--ssl-cert".to_string(),
        d.ca_cert_path().to_str().unwrap().to_string(),
        "--ssl-key".to_string(),
        d.dir().join("key.pem").to_str().unwrap().to_string(),
    ]);
    let a = Activator::start(true, &aargs);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let rc = dir.path().join("fetchmailrc");
    // "keep": leave the mail on the server; --invisible: no Received: line of fetchmail's own.
    std::fs::write(
        &rc,
        format!(
            "poll localhost protocol POP3 port {} auth password user \"alice\" password \"alice-pw\" \
             keep sslcertck sslcertfile \"{}\" mda \"/bin/sh -c 'cat > {}/$$'\"\n",
            a.port,
            d.ca_cert_path().display(),
            out.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = Command::new("fetchmail")
        .args([
            "-f",
            rc.to_str().unwrap(),
            "--nosyslog",
            "--invisible",
            "--nodetach",
        ])
        .arg("--idfile")
        .arg(dir.path().join("ids"))
        .env("FETCHMAILHOME", dir.path())
        .output()
        .expect("fetchmail (Debian package fetchmail)");
    // 0: mail was fetched.
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let mut got: Vec<Vec<u8>> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    // fetchmail hands an MDA LF line ends; compare like with like.
    let lf = |b: &[u8]| String::from_utf8_lossy(b).replace("\r\n", "\n");
    let mut want: Vec<String> = d
        .imap_bodies("alice", "alice-pw", "INBOX")
        .iter()
        .map(|(_, b)| lf(&expected_retr(b)))
        .collect();
    let mut got_s: Vec<String> = got.drain(..).map(|b| lf(&b)).collect();
    got_s.sort();
    want.sort();
    assert_eq!(got_s.len(), want.len());
    assert!(
        got_s == want,
        "fetchmail's copies differ from what IMAP serves"
    );
    // keep: nothing changed on the server.
    assert!(d.flags("alice", "INBOX").iter().all(|(_, f)| f.is_empty()));
}
