//! The servers under test and the plumbing around them: aiopopd under
//! `systemd-socket-activate --accept --inetd` (as in production), a bare byte relay to
//! Dovecot's POP3 (the floor any proxy pays for its extra hop), a counting TCP proxy in front of
//! Dovecot's IMAP (IMAP commands per session), aiopopd on pipes for its peak RSS (VmHWM), and
//! a one-shot inetd-style spawner for running aiopopd under strace/perf/valgrind.

use crate::client::{self, Pop3};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// `systemd-socket-activate -l 127.0.0.1:PORT --accept --inetd BIN ARGS...`; killed on drop.
pub struct Activator {
    child: Child,
    pub port: u16,
}

impl Activator {
    pub fn start(bin: &str, args: &[String]) -> Activator {
        let port = free_port();
        let child = Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--accept", "--inetd"])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-socket-activate (Debian package systemd) is needed");
        let deadline = Instant::now() + Duration::from_secs(10);
        // The probe connection starts one aiopopd that sees EOF at once and exits.
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "systemd-socket-activate did not listen"
            );
            thread::sleep(Duration::from_millis(10));
        }
        Activator { child, port }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Activator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Per-connection counts of a [`Proxy`].
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// Lines the client sent: IMAP commands (the benchmark's logins use no literals).
    pub client_lines: u64,
    pub client_bytes: u64,
    pub server_bytes: u64,
    /// The verb of each command line (`LOGIN`, `UID FETCH`, ...); never its arguments.
    pub verbs: Vec<String>,
}

/// A TCP relay on a loopback port to `target`, one pair of threads per connection. With
/// `counting`, client lines and bytes are counted and the finished connections' counts kept.
pub struct Proxy {
    pub port: u16,
    done: Arc<Mutex<Vec<Counts>>>,
}

impl Proxy {
    pub fn start(target: u16, counting: bool) -> Proxy {
        Proxy::start_with(target, counting, Duration::ZERO)
    }

    /// A relay that holds every byte for `delay` in each direction, like a link with a round
    /// trip of twice that (and no bandwidth limit).
    pub fn delayed(target: u16, delay: Duration) -> Proxy {
        Proxy::start_with(target, false, delay)
    }

    fn start_with(target: u16, counting: bool, delay: Duration) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let done = Arc::new(Mutex::new(Vec::new()));
        let finished = done.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let finished = finished.clone();
                thread::spawn(move || {
                    if let Ok(counts) = relay(client, target, counting, delay) {
                        finished.lock().expect("counts").push(counts);
                    }
                });
            }
        });
        Proxy { port, done }
    }

    /// Counts of the connections that have ended so far, oldest first; cleared.
    pub fn take(&self) -> Vec<Counts> {
        std::mem::take(&mut *self.done.lock().expect("counts"))
    }
}

fn relay(
    client: TcpStream,
    target: u16,
    counting: bool,
    delay: Duration,
) -> std::io::Result<Counts> {
    let server = TcpStream::connect(("127.0.0.1", target))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (c2, s2) = (client.try_clone()?, server.try_clone()?);
    if !delay.is_zero() {
        let down = thread::spawn(move || copy_delayed(s2, c2, delay));
        let up = copy_delayed(client, server, delay);
        let down = down.join().unwrap_or(0);
        return Ok(Counts {
            client_bytes: up,
            server_bytes: down,
            ..Counts::default()
        });
    }
    let down = thread::spawn(move || copy(s2, c2, false).0);
    let (client_bytes, up) = copy(client, server, counting);
    let server_bytes = down.join().unwrap_or(0);
    let mut counts = up.unwrap_or_default();
    counts.client_bytes = client_bytes;
    counts.server_bytes = server_bytes;
    Ok(counts)
}

/// Copies until EOF or an error, then half-closes the other side. With `count`, also counts
/// lines and collects each line's verb.
fn copy(mut from: TcpStream, mut to: TcpStream, count: bool) -> (u64, Option<Counts>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    let mut counts = Counts::default();
    let mut line_start: Vec<u8> = Vec::new();
    let mut at_line_start = true;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if count {
            for &b in &buf[..n] {
                if at_line_start && line_start.len() < 64 {
                    line_start.push(b);
                }
                if b == b'\n' {
                    counts.client_lines += 1;
                    counts.verbs.push(imap_verb(&line_start));
                    line_start.clear();
                    at_line_start = true;
                } else if line_start.len() >= 64 {
                    at_line_start = false;
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n as u64;
    }
    let _ = to.shutdown(Shutdown::Write);
    (total, count.then_some(counts))
}

/// Copies until EOF or an error, each read written `delay` after it arrived, then half-closes
/// the other side.
fn copy_delayed(mut from: TcpStream, mut to: TcpStream, delay: Duration) -> u64 {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = thread::spawn(move || {
        for (due, data) in rx {
            thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n as u64;
        if tx
            .send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
    total
}

/// `a1 UID FETCH 5 ...` → `UID FETCH`; `a1 LOGIN user pass` → `LOGIN`.
fn imap_verb(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut words = text.split_whitespace().skip(1);
    let first = words.next().unwrap_or("?").to_ascii_uppercase();
    if first == "UID" {
        let second = words.next().unwrap_or("?").to_ascii_uppercase();
        format!("UID {second}")
    } else {
        first
    }
}

/// aiopopd's stdin and stdout as one stream, for the POP3 client.
pub struct Pipes {
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl Read for Pipes {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stdout.read(buf)
    }
}

impl Write for Pipes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stdin.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stdin.flush()
    }
}

/// aiopopd's peak RSS, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Peak {
    pub hwm_kb: u64,
}

/// Runs `bin ARGS` on pipes (as inetd would with a pipe), lets `session` drive it with the POP3
/// client, then reads the process's VmHWM (peak RSS of its own address space since exec)
/// while it is still alive, then QUIT. (`ru_maxrss` from `wait4` would not do: for a
/// child started with vfork/posix_spawn, Linux counts the parent's peak RSS at exec too.)
pub fn pipe_session(
    bin: &str,
    args: &[String],
    session: impl FnOnce(&mut Pop3<Pipes>) -> client::Result<()>,
) -> client::Result<Peak> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("run {bin}: {e}"))?;
    let pid = child.id();
    let pipes = Pipes {
        stdin: child.stdin.take().expect("stdin"),
        stdout: child.stdout.take().expect("stdout"),
    };
    let mut c = Pop3::new(pipes);
    let result = (|| -> client::Result<Peak> {
        c.greeting()?;
        session(&mut c)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
        };
        let peak = Peak {
            hwm_kb: field("VmHWM:")?,
        };
        c.quit()?;
        Ok(peak)
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let peak = result?;
    if !status.success() {
        return Err(format!("aiopopd exited with {status}"));
    }
    Ok(peak)
}

/// One connection served the inetd way (the socket on fds 0 and 1) by `command` — e.g.
/// `strace -c -o FILE aiopopd ...` — without `systemd-socket-activate`'s probe connection,
/// which would start the profiler a second time. The command's stderr goes to `stderr`.
/// Returns the port; the command's exit code comes from the returned handle.
pub fn inetd_once(
    command: Vec<String>,
    stderr: &std::path::Path,
) -> (u16, thread::JoinHandle<std::process::ExitStatus>) {
    let stderr = std::fs::File::create(stderr).expect("create the stderr file");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let handle = thread::spawn(move || {
        let (conn, _) = listener.accept().expect("accept");
        let dup = |c: &TcpStream| {
            // SAFETY: dup of a socket we own; a valid new fd is owned by nobody else.
            let fd = unsafe { libc::dup(c.as_raw_fd()) };
            assert!(fd >= 0, "dup: {}", std::io::Error::last_os_error());
            unsafe { OwnedFd::from_raw_fd(fd) }
        };
        let (stdin, stdout) = (dup(&conn), dup(&conn));
        drop(conn);
        Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(stderr)
            .status()
            .unwrap_or_else(|e| panic!("run {}: {e}", command[0]))
    });
    (port, handle)
}
