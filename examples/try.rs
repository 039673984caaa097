//! The try-out behind `scripts/try`: a throwaway private Dovecot with a few sample messages, and
//! aiopopd serving it over POP3 through `systemd-socket-activate`, exactly as in production;
//! then one real POP3 session, printed. Everything is removed at the end.
//!
//! Usage: try AIOPOPD-BINARY

#[path = "../tests/common/dovecot.rs"]
mod dovecot;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let bin = std::env::args().nth(1).expect("usage: try AIOPOPD-BINARY");
    println!("Starting a private Dovecot (IMAP) with three sample messages...");
    let d = dovecot::Dovecot::start();
    d.deliver("alice", "INBOX", b"From: a@example.org\r\nSubject: Hello from IMAP\r\n\r\nThis message lives on an IMAP server.\r\n");
    d.deliver("alice", "INBOX", b"From: b@example.org\r\nSubject: A line with a dot\r\n\r\n.this line starts with a dot\r\n");
    d.deliver(
        "alice",
        "INBOX",
        b"From: c@example.org\r\nSubject: Third\r\n\r\nbye\r\n",
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let imap_port = d.imap_port.to_string();
    let args = [
        "-H",
        "127.0.0.1",
        "-p",
        &imap_port,
        "--allow-plaintext-auth",
        "-d",
        "pop.example",
    ];
    println!(
        "Serving POP3 on 127.0.0.1:{port}: systemd-socket-activate --accept --inetd {bin} {}",
        args.join(" ")
    );
    let mut activator = Command::new("systemd-socket-activate")
        .args([
            "-l",
            &format!("127.0.0.1:{port}"),
            "--accept",
            "--inetd",
            &bin,
        ])
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        if let Ok(c) = TcpStream::connect(("127.0.0.1", port)) {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    let line = |reader: &mut std::io::BufReader<TcpStream>| {
        let mut l = String::new();
        std::io::BufRead::read_line(reader, &mut l).unwrap();
        l
    };
    print!("<<< {}", line(&mut reader));
    for cmd in [
        "USER alice",
        "PASS alice-pw",
        "STAT",
        "LIST",
        "UIDL",
        "RETR 2",
        "QUIT",
    ] {
        println!(
            ">>> {}",
            if cmd.starts_with("PASS") {
                "PASS ..."
            } else {
                cmd
            }
        );
        conn.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        let first = line(&mut reader);
        print!("<<< {first}");
        let multi =
            first.starts_with("+OK") && (cmd == "LIST" || cmd == "UIDL" || cmd.starts_with("RETR"));
        if multi {
            loop {
                let l = line(&mut reader);
                print!("<<< {l}");
                if l == ".\r\n" {
                    break;
                }
            }
        }
    }
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let _ = activator.kill();
    let _ = activator.wait();
    println!("Done: the POP3 session above was served from the IMAP mailbox.");
}
