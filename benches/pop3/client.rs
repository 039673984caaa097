//! The one POP3 client of the benchmark, the same for every server measured: lock-step (one
//! command, then its whole reply, then the next), one `write` per command, replies read through
//! a 64 KiB buffer. Multi-line replies are un-stuffed only as far as counting goes (octets and
//! lines), so the client costs little next to the servers it measures.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub type Result<T> = std::result::Result<T, String>;

/// How long any one reply may take (valgrind makes aiopopd ~50× slower in `--profile`).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// What a multi-line reply held, after un-stuffing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Body {
    /// Octets of the body with the stuffed dots removed and without the terminating `.` line:
    /// for RETR, the message size POP3 announces.
    pub octets: u64,
    pub lines: u64,
}

pub struct Pop3<S> {
    stream: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// A plain TCP connection to a loopback port, with TCP_NODELAY (a lock-step client would
/// otherwise stall on Nagle + delayed ACK) and generous timeouts.
pub fn connect(port: u16) -> Result<TcpStream> {
    let tcp =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect to {port}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(tcp)
}

impl<S: Read + Write> Pop3<S> {
    pub fn new(stream: S) -> Pop3<S> {
        Pop3 {
            stream,
            buf: vec![0; 64 << 10],
            start: 0,
            end: 0,
        }
    }

    /// Reads more bytes into the buffer, keeping the unread ones.
    fn fill(&mut self) -> Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // A line longer than the buffer: grow it.
            let len = self.buf.len();
            self.buf.resize(len * 2, 0);
        }
        match self.stream.read(&mut self.buf[self.end..]) {
            Ok(0) => Err("the server closed the connection".into()),
            Ok(n) => {
                self.end += n;
                Ok(())
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// The next line including its line end, as a range of `buf`.
    fn next_line(&mut self) -> Result<(usize, usize)> {
        let mut scanned = self.start;
        loop {
            if let Some(i) = self.buf[scanned..self.end].iter().position(|&b| b == b'\n') {
                let line = (self.start, scanned + i + 1);
                self.start = scanned + i + 1;
                return Ok(line);
            }
            let done = self.end - self.start;
            self.fill()?;
            scanned = self.start + done;
        }
    }

    fn status_line(&mut self) -> Result<String> {
        let (a, b) = self.next_line()?;
        Ok(String::from_utf8_lossy(&self.buf[a..b])
            .trim_end()
            .to_string())
    }

    /// The greeting (`+OK ...`).
    pub fn greeting(&mut self) -> Result<String> {
        let line = self.status_line()?;
        if !line.starts_with("+OK") {
            return Err(format!("greeting: {line}"));
        }
        Ok(line)
    }

    fn send(&mut self, command: &str) -> Result<()> {
        let line = format!("{command}\r\n");
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| format!("write {}: {e}", verb(command)))?;
        self.stream.flush().map_err(|e| format!("flush: {e}"))
    }

    /// A command with a one-line reply, which must be `+OK`; returns that line.
    pub fn simple(&mut self, command: &str) -> Result<String> {
        self.send(command)?;
        let line = self.status_line()?;
        if !line.starts_with("+OK") {
            return Err(format!("{} answered {line}", verb(command)));
        }
        Ok(line)
    }

    /// A command whose one-line reply may be `+OK` or `-ERR`; returns that line.
    pub fn reply(&mut self, command: &str) -> Result<String> {
        self.send(command)?;
        self.status_line()
    }

    /// A command with a multi-line reply (RETR, UIDL, LIST, TOP), which must be `+OK`.
    pub fn multi(&mut self, command: &str) -> Result<Body> {
        self.simple(command)?;
        let mut body = Body::default();
        loop {
            let (a, b) = self.next_line()?;
            let line = &self.buf[a..b];
            if line == b".\r\n" {
                return Ok(body);
            }
            body.lines += 1;
            body.octets += (line.len() - usize::from(line[0] == b'.')) as u64;
        }
    }

    /// USER and PASS.
    pub fn login(&mut self, user: &str, password: &str) -> Result<()> {
        self.simple(&format!("USER {user}"))?;
        self.simple(&format!("PASS {password}"))?;
        Ok(())
    }

    /// STAT: (messages, octets).
    pub fn stat(&mut self) -> Result<(usize, u64)> {
        let line = self.simple("STAT")?;
        let mut words = line.split_whitespace().skip(1);
        let n = words.next().and_then(|w| w.parse().ok());
        let size = words.next().and_then(|w| w.parse().ok());
        match (n, size) {
            (Some(n), Some(size)) => Ok((n, size)),
            _ => Err(format!("STAT answered {line}")),
        }
    }

    /// QUIT; the server's `+OK` is read, then the connection dropped.
    pub fn quit(mut self) -> Result<()> {
        self.simple("QUIT").map(drop)
    }
}

/// The command's verb only: PASS arguments are never shown.
fn verb(command: &str) -> &str {
    command.split(' ').next().unwrap_or(command)
}
