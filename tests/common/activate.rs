//! `systemd-socket-activate` running the built aiopopd per connection on a free loopback port,
//! as in production (the stdin form of xinetd and `StandardInput=socket`, or the fd-3 form).
#![allow(dead_code)]

use super::pop3::BIN;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `systemd-socket-activate` listening on a free loopback port; killed on drop.
pub struct Activator {
    child: Child,
    pub port: u16,
    /// Where the sessions' stderr goes (their log, with -l).
    log: tempfile::NamedTempFile,
}

impl Activator {
    pub fn start(inetd: bool, aiopopd_args: &[String]) -> Activator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.arg("-l")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--accept");
        if inetd {
            cmd.arg("--inetd");
        }
        cmd.arg(BIN).args(aiopopd_args);
        // -l logs to stderr; in both forms stderr is ours, not the client's: keep it.
        let log = tempfile::NamedTempFile::new().unwrap();
        cmd.stdout(Stdio::null()).stderr(log.reopen().unwrap());
        let child = cmd
            .spawn()
            .expect("systemd-socket-activate (Debian package systemd) is needed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "systemd-socket-activate did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // That probe connection spawned a session that ends at EOF; harmless.
        Activator { child, port, log }
    }

    /// Everything the sessions logged so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.log.path()).unwrap()).into_owned()
    }

    /// The sessions' log once it contains `needle` `n` times (lines are written as a session
    /// ends); fails after 15 s.
    pub fn wait_log(&self, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = self.log();
            if log.matches(needle).count() >= n {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "not {n} of {needle:?} in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Activator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
