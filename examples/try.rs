//! The try-out behind `scripts/try`: a throwaway private Dovecot with a few sample messages, and
//! aiopopd serving it over POP3 through `systemd-socket-activate`, exactly as in production;
//! with TLS from a certificate it generates itself; then `aiopopd-client` runs a real session
//! against it and prints it. Everything is removed at the end.
//!
//! Usage: try AIOPOPD-BINARY

#[path = "../tests/common/dovecot.rs"]
mod dovecot;

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
    let tls_dir = tempfile::tempdir().unwrap();
    let cert = tls_dir.path().join("cert.pem");
    let key = tls_dir.path().join("key.pem");
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let args = [
        "-H",
        "127.0.0.1",
        "-p",
        &imap_port,
        "-d",
        "localhost",
        "--ssl-cert",
        cert_s,
        "--ssl-key",
        key_s,
        "--ssl-generate",
    ];
    println!(
        "Serving POP3 over TLS on 127.0.0.1:{port}:\n  systemd-socket-activate -l 127.0.0.1:{port} --accept --inetd {bin} {}",
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
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // That probe connection made aiopopd generate its self-signed certificate.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cert.exists() {
        assert!(Instant::now() < deadline, "no certificate was generated");
        std::thread::sleep(Duration::from_millis(20));
    }
    let client = std::path::Path::new(&bin).with_file_name("aiopopd-client");
    let port_s = port.to_string();
    let client_args = [
        "-H",
        "localhost",
        "-n",
        &port_s,
        "-s",
        "--ca",
        cert_s,
        "-u",
        "alice",
        "-p",
        "plain:alice-pw",
    ];
    println!(
        "Checking it with the POP3 check client:\n  aiopopd-client {}\n",
        client_args.join(" ")
    );
    let status = Command::new(&client)
        .args(client_args)
        .status()
        .expect("aiopopd-client");
    let _ = activator.kill();
    let _ = activator.wait();
    if !status.success() {
        eprintln!("aiopopd-client reported a failure");
        std::process::exit(1);
    }
    println!("Done: the POP3 session above was served from the IMAP mailbox.");
}
