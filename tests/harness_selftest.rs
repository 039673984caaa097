//! Checks the Dovecot test harness itself (tests/common/dovecot.rs).

mod common;

use common::dovecot::Dovecot;

const LF_ONLY: &[u8] = b"From: a@example.org\nSubject: bare LF\n\nline 1\nline 2\n";
const NO_FINAL_NEWLINE: &[u8] = b"From: a@example.org\r\nSubject: no final newline\r\n\r\nlast";
const EIGHT_BIT: &[u8] =
    b"From: a@example.org\r\nSubject: 8bit \xc3\xa9\r\n\r\nLatin-1 \xe9, UTF-8 \xc3\xa9, \xff\r\n";

#[test]
fn deliver_and_read_back() {
    let dovecot = Dovecot::start();
    for msg in [LF_ONLY, NO_FINAL_NEWLINE, EIGHT_BIT] {
        dovecot.deliver("alice", "INBOX", msg);
    }

    let bodies = dovecot.imap_bodies("alice", "alice-pw", "INBOX");
    assert_eq!(bodies.iter().map(|b| b.0).collect::<Vec<_>>(), [1, 2, 3]);
    // IMAP serves CRLF line ends, keeps a missing final line end and 8-bit bytes.
    assert_eq!(
        bodies[0].1,
        b"From: a@example.org\r\nSubject: bare LF\r\n\r\nline 1\r\nline 2\r\n"
    );
    assert_eq!(bodies[1].1, NO_FINAL_NEWLINE);
    assert_eq!(bodies[2].1, EIGHT_BIT);

    let sizes = dovecot.imap_sizes("alice", "alice-pw", "INBOX");
    let expected: Vec<(u32, u32)> = bodies.iter().map(|(u, b)| (*u, b.len() as u32)).collect();
    assert_eq!(sizes, expected);

    dovecot.deliver_with_flags("alice", "INBOX", b"Subject: seen\r\n\r\nx\r\n", &["\\Seen"]);
    let flags = dovecot.flags("alice", "INBOX");
    assert_eq!(
        flags,
        [
            (1, vec![]),
            (2, vec![]),
            (3, vec![]),
            (4, vec!["\\Seen".to_string()])
        ]
    );
    assert_ne!(dovecot.uidvalidity("alice", "INBOX"), 0);

    let transcript = dovecot.pop3_transcript(b"USER alice\r\nPASS alice-pw\r\nSTAT\r\nQUIT\r\n");
    let text = String::from_utf8_lossy(&transcript);
    assert!(text.contains("\r\n+OK 4 "), "{text}");
    assert!(text.ends_with("+OK Logging out.\r\n"), "{text}");
}

#[test]
fn other_mailbox_keywords_and_several_users() {
    let dovecot = Dovecot::start_with_users(&[("bob", "pw-bob"), ("carol", "pw carol")]);
    dovecot.deliver_with_flags(
        "bob",
        "Archive",
        b"Subject: a\r\n\r\n",
        &["\\Deleted", "$Label1"],
    );
    dovecot.deliver("bob", "Archive", b"Subject: b\r\n\r\n");
    let flags = dovecot.flags("bob", "Archive");
    assert_eq!(flags.len(), 2);
    assert_eq!(flags[0].0, 1);
    assert!(flags[0].1.contains(&"\\Deleted".to_string()), "{flags:?}");
    assert!(flags[0].1.contains(&"$Label1".to_string()), "{flags:?}");
    assert!(flags[1].1.is_empty(), "{flags:?}");
    assert_eq!(dovecot.imap_bodies("bob", "pw-bob", "Archive").len(), 2);
    assert!(dovecot.flags("carol", "INBOX").is_empty());
    assert!(dovecot.maildir("bob").join(".Archive").is_dir());

    let transcript = dovecot.pop3_transcript(b"USER carol\r\nPASS pw carol\r\nSTAT\r\nQUIT\r\n");
    assert!(String::from_utf8_lossy(&transcript).contains("+OK 0 0\r\n"));
    let transcript = dovecot.pop3_transcript(b"USER carol\r\nPASS wrong\r\nQUIT\r\n");
    assert!(String::from_utf8_lossy(&transcript).contains("\r\n-ERR "));
}

#[test]
fn parallel_instances_do_not_clash() {
    let handles: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(|| {
                let dovecot = Dovecot::start();
                dovecot.deliver("alice", "INBOX", b"Subject: x\r\n\r\ny\r\n");
                assert!(std::fs::read_to_string(dovecot.ca_cert_path())
                    .unwrap()
                    .contains("BEGIN CERTIFICATE"));
                let ports = [
                    dovecot.imap_port,
                    dovecot.imaps_port,
                    dovecot.pop3_port,
                    dovecot.pop3s_port,
                ];
                let dir = dovecot.dir().to_path_buf();
                assert_eq!(dovecot.imap_bodies("alice", "alice-pw", "INBOX").len(), 1);
                drop(dovecot);
                assert!(!dir.exists(), "temp dir removed");
                ports
            })
        })
        .collect();
    let mut all: Vec<u16> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n);
}

/// The generated certificate verifies for `localhost` on IMAPS, POP3S and after STLS.
#[test]
fn tls_ports_present_the_ca_cert() {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;

    let dovecot = Dovecot::start();
    let pem = std::fs::read(dovecot.ca_cert_path()).unwrap();
    let connector = native_tls::TlsConnector::builder()
        .add_root_certificate(native_tls::Certificate::from_pem(&pem).unwrap())
        .disable_built_in_roots(true)
        .build()
        .unwrap();
    let first_line = |port: u16| {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let tls = connector.connect("localhost", tcp).unwrap();
        let mut line = String::new();
        BufReader::new(tls).read_line(&mut line).unwrap();
        line
    };
    assert!(first_line(dovecot.imaps_port).starts_with("* OK "));
    assert!(first_line(dovecot.pop3s_port).starts_with("+OK "));

    let mut tcp = TcpStream::connect(("127.0.0.1", dovecot.pop3_port)).unwrap();
    let mut reader = BufReader::new(tcp.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    tcp.write_all(b"STLS\r\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("+OK"), "{line}");
    let mut tls = connector.connect("localhost", tcp).unwrap();
    tls.write_all(b"USER alice\r\nPASS alice-pw\r\nSTAT\r\nQUIT\r\n")
        .unwrap();
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut tls, &mut text);
    assert!(text.contains("+OK 0 0\r\n"), "{text}");
}
