//! HAProxy (Debian package `haproxy`) run in the foreground from a generated configuration in a
//! temp dir: TCP mode, one frontend on a free loopback port, round robin over aiopopd backends
//! that it sends a PROXY header (v1 or v2), connecting from 127.0.0.2, with health checks.
//! Killed on drop. Also: connecting from a chosen loopback address (clients from 127.0.0.3).
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = "/usr/sbin/haproxy";
/// The address HAProxy connects to the backends from (what aiopopd trusts).
pub const BALANCER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The address clients connect to HAProxy from.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Whether to run: HAProxy installed, or (under CI) a loud failure; else the test is skipped.
pub fn available() -> bool {
    if Path::new(BIN).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{BIN} is missing: install the Debian package haproxy (scripts/packages)"
    );
    eprintln!("skipped: {BIN} is missing (Debian package haproxy)");
    false
}

/// How HAProxy speaks to one backend.
#[derive(Clone, Copy, Debug)]
pub enum Proxy {
    V1,
    V2,
}

impl Proxy {
    fn keyword(self) -> &'static str {
        match self {
            Proxy::V1 => "send-proxy",
            Proxy::V2 => "send-proxy-v2",
        }
    }
}

pub struct Haproxy {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

pub fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Haproxy {
    /// In front of `backends` (ports on 127.0.0.1), with health checks every `check_ms`.
    pub fn start(backends: &[(u16, Proxy)], check_ms: u64) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port(Ipv4Addr::LOCALHOST);
        let mut servers = String::new();
        for (i, (p, proxy)) in backends.iter().enumerate() {
            // check-send-proxy: the checks carry a header too (LOCAL in v2), as aiopopd
            // requires of every connection from a trusted balancer.
            servers.push_str(&format!(
                "    server pop{i} 127.0.0.1:{p} {} source {BALANCER} check check-send-proxy inter {check_ms}ms\n",
                proxy.keyword()
            ));
        }
        let conf = format!(
            "global\n    maxconn 4000\n    pidfile {pid}\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
             frontend pop3\n    bind 127.0.0.1:{port}\n    maxconn 4000\n    default_backend aiopopd\n\
             backend aiopopd\n    balance roundrobin\n{servers}",
            pid = dir.path().join("pid").display()
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, conf).unwrap();
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = Command::new(BIN)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let h = Haproxy { child, port, dir };
        // Listening: a probe from 127.0.0.3, closed at once (a backend logs it as a session
        // whose client left before a command).
        let deadline = Instant::now() + Duration::from_secs(10);
        while connect_from(CLIENT, port).is_err() {
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen:\n{}",
                h.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// HAProxy's own output (alerts and warnings).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection to 127.0.0.1:`port` from `src`.
pub fn connect_from(src: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from((src, 0)).into())?;
    s.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    let s: TcpStream = s.into();
    s.set_nodelay(true)?;
    Ok(s)
}
