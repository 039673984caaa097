//! Where the client's bytes come from and go to: stdin/stdout (inetd, systemd
//! `StandardInput=socket`, a pipe) or the socket systemd passed as fd 3; deadlines on every read
//! and write; TLS (implicit, or started by STLS); and the line framing the session reads through
//! ([`Conn`] implements [`Peer`]). With `--proxy-protocol-from`, the PROXY header a trusted
//! balancer sends first is read here (parsed by [`proxy`]), and its source becomes the client's
//! address.

use crate::pop3::MAX_COMMAND_LINE;
use crate::proxy::{self, Progress};
use crate::session::{Line, Peer, MAX_SASL_LINE};
use crate::{fd, log, tls};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zeroize::Zeroize;

/// The raw client connection: a read side and a write side (the same socket, or stdin and
/// stdout), non-blocking underneath so every read and write has a deadline; to its users it
/// behaves as a blocking stream that fails with `TimedOut`.
pub struct RawConn {
    read: File,
    write: File,
    timeout: Duration,
    /// An overall deadline that caps the per-operation one (the TLS handshake).
    deadline_cap: Option<Instant>,
    /// `--handshake-timeout`: the whole TLS handshake, implicit or after STLS.
    handshake_timeout: Duration,
    /// `--login-timeout`: until the session says the client has logged in, no read or write
    /// waits past this, however often the client sends something.
    login_deadline: Option<Instant>,
    /// O_NONBLOCK is shared with whoever else holds the same open file (a terminal, the
    /// inetd socket): restore what we found.
    saved_flags: Vec<(File, libc::c_int)>,
    /// The client's address as a trusted balancer's PROXY header gave it.
    proxied_client: Option<IpAddr>,
    /// A trusted balancer's header named no client (v2 LOCAL, v1 UNKNOWN) or the balancer's own
    /// connection (HAProxy's v1 checks): a health check.
    health_check: bool,
}

impl RawConn {
    /// The connection this process was started for: fd 3 under systemd's `Accept=yes`
    /// (LISTEN_FDS), otherwise stdin and stdout.
    pub fn from_environment(timeout: Duration) -> io::Result<RawConn> {
        match fd::take_listen_fd()? {
            Some(sock) => RawConn::new(fd::dup(sock.as_fd())?, File::from(sock), timeout),
            None => RawConn::new(
                fd::dup(io::stdin().as_fd())?,
                fd::dup(io::stdout().as_fd())?,
                timeout,
            ),
        }
    }

    fn new(read: File, write: File, timeout: Duration) -> io::Result<RawConn> {
        let mut saved_flags = Vec::new();
        for f in [&read, &write] {
            let flags = fd::set_nonblocking(f.as_fd())?;
            saved_flags.push((f.try_clone()?, flags));
        }
        let conn = RawConn {
            read,
            write,
            timeout,
            deadline_cap: None,
            handshake_timeout: timeout,
            login_deadline: None,
            saved_flags,
            proxied_client: None,
            health_check: false,
        };
        if conn.is_socket() {
            // Without it a lock-step client waits ~40 ms for each reply (Nagle + delayed ACK).
            let _ = socket2::SockRef::from(&conn.write).set_nodelay(true);
        }
        Ok(conn)
    }

    /// A person at a terminal (someone trying the command by hand), not a POP3 client.
    pub fn is_terminal(&self) -> bool {
        std::io::IsTerminal::is_terminal(&self.write)
    }

    pub fn is_socket(&self) -> bool {
        fd::is_socket(self.write.as_fd())
    }

    /// The client's address, for the log: from the PROXY header if a trusted balancer sent one.
    pub fn peer_name(&self) -> String {
        if let Some(ip) = self.proxied_client {
            return ip.to_canonical().to_string();
        }
        match socket2::SockRef::from(&self.write).peer_addr() {
            Ok(a) => a
                .as_socket()
                // IPv4 clients of a dual-stack socket show as ::ffff:a.b.c.d; log them as IPv4.
                .map_or_else(
                    || "local".to_string(),
                    |a| a.ip().to_canonical().to_string(),
                ),
            Err(_) => std::env::var("REMOTE_HOST").unwrap_or_else(|_| "pipe".to_string()),
        }
    }

    /// True if a trusted balancer's header named no client, or named its own connection as the
    /// client (HAProxy's v1 checks): its health check.
    pub fn is_health_check(&self) -> bool {
        self.health_check
    }

    /// The address of the other end of the socket we read from (fd 0, or fd 3), if it is an IP one.
    pub fn peer_ip(&self) -> Option<IpAddr> {
        let addr = socket2::SockRef::from(&self.read).peer_addr().ok()?;
        addr.as_socket().map(|a| a.ip())
    }

    /// `--proxy-protocol-from`: a connection from one of `trusted` must begin with a PROXY
    /// header (v1 or v2) within [`proxy::HEADER_WAIT`]; its source then stands for the client's
    /// address everywhere ([`RawConn::peer_name`]). Exactly the header's octets are read, so what
    /// follows (a TLS ClientHello, POP3) is left for the rest. A header without a client address
    /// (v2 LOCAL, v1 UNKNOWN: the balancer's health checks) leaves the peer's own. Any other peer
    /// is left alone: nothing is read. `None`: the connection is to be closed unserved; the log
    /// has said why.
    pub fn accept_proxy_header(mut self, trusted: &[proxy::Cidr]) -> Option<RawConn> {
        if trusted.is_empty() {
            return Some(self);
        }
        if let Err(e) = socket2::SockRef::from(&self.read).peer_addr() {
            if e.raw_os_error() == Some(libc::ENOTCONN) {
                // Gone before we looked (a balancer's connect-only health check, reset at once):
                // nothing to serve, and not worth a line each time.
                log::debug("connection closed before it was served");
                return None;
            }
        }
        let Some(balancer) = self.peer_ip().filter(|ip| proxy::is_trusted(trusted, *ip)) else {
            return Some(self);
        };
        let balancer = balancer.to_canonical();
        let result = self.read_proxy_header();
        match result {
            Ok(Some(source)) => {
                log::debug(&format!(
                    "PROXY header from {balancer}: client {}",
                    source.ip().to_canonical()
                ));
                // HAProxy's v1 health checks name the check connection itself as the client.
                let own = socket2::SockRef::from(&self.read)
                    .peer_addr()
                    .ok()
                    .and_then(|a| a.as_socket());
                self.health_check = own.is_some_and(|own| {
                    own.port() == source.port()
                        && own.ip().to_canonical() == source.ip().to_canonical()
                });
                self.proxied_client = Some(source.ip());
                Some(self)
            }
            Ok(None) => {
                log::debug(&format!(
                    "PROXY header from {balancer} names no client (LOCAL or UNKNOWN: a health check)"
                ));
                self.health_check = true;
                Some(self)
            }
            // A plain TCP health check: connect, close. Not worth a line each time.
            Err(e @ HeaderFailure::Closed { after: 0 }) => {
                log::debug(&format!("PROXY header refused: rip={balancer} reason={e}"));
                None
            }
            Err(e) => {
                log::warning(&format!("PROXY header refused: rip={balancer} reason={e}"));
                None
            }
        }
    }

    /// Reads no more than [`proxy::parse`] asks for, so the header's last octet is the last read;
    /// the whole header within [`proxy::HEADER_WAIT`] (or `--timeout`, if shorter).
    fn read_proxy_header(&mut self) -> Result<Option<SocketAddr>, HeaderFailure> {
        let wait = proxy::HEADER_WAIT.min(self.timeout);
        self.deadline_cap = Some(Instant::now() + wait);
        let result = self.read_proxy_header_bytes();
        self.deadline_cap = None;
        match result {
            Err(HeaderFailure::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
                Err(HeaderFailure::TimedOut(wait))
            }
            r => r,
        }
    }

    fn read_proxy_header_bytes(&mut self) -> Result<Option<SocketAddr>, HeaderFailure> {
        let mut buf = Vec::with_capacity(proxy::V1_MAX);
        loop {
            match proxy::parse(&buf).map_err(HeaderFailure::Bad)? {
                Progress::Done { consumed, source } if consumed == buf.len() => return Ok(source),
                Progress::Done { .. } => return Err(HeaderFailure::OverRead),
                Progress::NeedMore(n) => {
                    let old = buf.len();
                    buf.resize(old + n, 0);
                    let got = self.read(&mut buf[old..]).map_err(HeaderFailure::Io)?;
                    if got == 0 {
                        return Err(HeaderFailure::Closed { after: old });
                    }
                    buf.truncate(old + got);
                }
            }
        }
    }

    /// The pre-login limits: the TLS handshake within `handshake`, and login by
    /// `login_deadline` (counted from connect, so the PROXY header's time is in it).
    pub fn set_prelogin_limits(&mut self, handshake: Duration, login_deadline: Instant) {
        self.handshake_timeout = handshake;
        self.login_deadline = Some(login_deadline);
    }

    /// The client has logged in: from now on only the idle timeout applies.
    fn end_login_deadline(&mut self) {
        self.login_deadline = None;
    }

    /// True once the login deadline has passed (the client is still not logged in).
    fn login_deadline_passed(&self) -> bool {
        self.login_deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The fd the client is on, to tell whether stderr is the same.
    pub fn client_fd(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    fn deadline(&self) -> Instant {
        let d = Instant::now() + self.timeout;
        let d = self.deadline_cap.map_or(d, |cap| cap.min(d));
        self.login_deadline.map_or(d, |login| login.min(d))
    }
}

/// Why a trusted peer's connection is closed before anything is served.
#[derive(Debug)]
enum HeaderFailure {
    TimedOut(Duration),
    Io(io::Error),
    Closed {
        after: usize,
    },
    Bad(proxy::Error),
    /// The parser let us read past the header's end (a bug; the bytes behind it would be lost).
    OverRead,
}

impl fmt::Display for HeaderFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderFailure::TimedOut(wait) => {
                write!(
                    f,
                    "no complete PROXY header within {} s",
                    wait.as_secs_f64()
                )
            }
            HeaderFailure::Io(e) => write!(f, "reading the PROXY header: {e}"),
            HeaderFailure::Closed { after: 0 } => {
                write!(f, "closed without sending a PROXY header")
            }
            HeaderFailure::Closed { after } => {
                write!(f, "closed after {after} octets of a PROXY header")
            }
            HeaderFailure::Bad(e) => write!(f, "{e}"),
            HeaderFailure::OverRead => write!(f, "internal error: read past the PROXY header"),
        }
    }
}

impl Drop for RawConn {
    fn drop(&mut self) {
        // In reverse: when stdin and stdout are one file (a terminal), stdout's saved flags
        // were read after stdin's were changed; stdin's, restored last, are the original ones.
        for (f, flags) in self.saved_flags.iter().rev() {
            let _ = fd::set_flags(f.as_fd(), *flags);
        }
    }
}

impl Read for RawConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = self.deadline();
        loop {
            match self.read.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    fd::wait(self.read.as_fd(), false, deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl Write for RawConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let deadline = self.deadline();
        loop {
            match self.write.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    fd::wait(self.write.as_fd(), true, deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What [`Conn`] needs of the byte stream beyond reading and writing.
pub trait Transport: Read + Write {
    fn is_secure(&self) -> bool;
    /// True if STLS can be offered now.
    fn can_start_tls(&self) -> bool;
    /// Reads the certificate and key STLS will use, if not yet done; `Err` names the file.
    fn prepare_tls(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn start_tls(&mut self) -> io::Result<()>;
    /// The client has logged in: the login deadline no longer applies.
    fn end_login_deadline(&mut self) {}
    /// True if the login deadline has passed.
    fn login_deadline_passed(&self) -> bool {
        false
    }
}

/// The client connection, plain or TLS.
pub struct Stream {
    inner: Inner,
    /// What STLS would use, while the connection is still plain: the certificate and key
    /// files, read at the first STLS.
    stls: Option<tls::Deferred>,
}

enum Inner {
    Plain(RawConn),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, RawConn>>),
    /// Only while switching to TLS, or after a failed switch.
    Closed,
}

impl Stream {
    /// A plain connection; with `stls`, STLS is offered.
    pub fn plain(raw: RawConn, stls: Option<tls::Deferred>) -> Stream {
        Stream {
            inner: Inner::Plain(raw),
            stls,
        }
    }

    /// TLS from the first byte (RFC 8314): the handshake happens here.
    pub fn implicit_tls(raw: RawConn, config: Arc<rustls::ServerConfig>) -> io::Result<Stream> {
        Ok(Stream {
            inner: Inner::Tls(handshake(raw, config)?),
            stls: None,
        })
    }

    /// Ends TLS politely (close_notify); errors don't matter any more.
    pub fn close(&mut self) {
        if let Inner::Tls(tls) = &mut self.inner {
            tls.conn.send_close_notify();
            let _ = tls.conn.complete_io(&mut tls.sock);
        }
    }
}

/// The whole handshake, bounded by one deadline: `--handshake-timeout` (and the login
/// deadline, if that comes first), however the client trickles its bytes in. A timeout is
/// `TimedOut` with words saying which limit it was, for the log; the client gets no reply (it
/// would not be TLS), the connection is just closed.
fn handshake(
    mut raw: RawConn,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<Box<rustls::StreamOwned<rustls::ServerConnection, RawConn>>> {
    let mut conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    raw.deadline_cap = Some(Instant::now() + raw.handshake_timeout);
    while conn.is_handshaking() {
        // complete_io sends the alert itself when the handshake fails.
        if let Err(e) = conn.complete_io(&mut raw) {
            if e.kind() != io::ErrorKind::TimedOut {
                return Err(e);
            }
            let which = if raw.login_deadline_passed() {
                "not logged in within --login-timeout".to_string()
            } else {
                format!(
                    "not finished within {} s (--handshake-timeout)",
                    raw.handshake_timeout.as_secs_f64()
                )
            };
            return Err(io::Error::new(io::ErrorKind::TimedOut, which));
        }
    }
    raw.deadline_cap = None;
    Ok(Box::new(rustls::StreamOwned::new(conn, raw)))
}

impl Stream {
    fn raw(&self) -> Option<&RawConn> {
        match &self.inner {
            Inner::Plain(raw) => Some(raw),
            Inner::Tls(tls) => Some(&tls.sock),
            Inner::Closed => None,
        }
    }
}

impl Transport for Stream {
    fn is_secure(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }

    fn can_start_tls(&self) -> bool {
        self.stls.is_some() && matches!(self.inner, Inner::Plain(_))
    }

    fn prepare_tls(&mut self) -> Result<(), String> {
        match &mut self.stls {
            Some(deferred) => deferred.load().map(drop),
            None => Err("STLS is not configured".into()),
        }
    }

    fn end_login_deadline(&mut self) {
        match &mut self.inner {
            Inner::Plain(raw) => raw.end_login_deadline(),
            Inner::Tls(tls) => tls.sock.end_login_deadline(),
            Inner::Closed => {}
        }
    }

    fn login_deadline_passed(&self) -> bool {
        self.raw().is_some_and(RawConn::login_deadline_passed)
    }

    fn start_tls(&mut self) -> io::Result<()> {
        let mut deferred = self.stls.take().ok_or(io::ErrorKind::Unsupported)?;
        let config = deferred.load().map_err(io::Error::other)?;
        match std::mem::replace(&mut self.inner, Inner::Closed) {
            Inner::Plain(raw) => {
                self.inner = Inner::Tls(handshake(raw, config)?);
                Ok(())
            }
            other => {
                self.inner = other;
                Err(io::ErrorKind::Unsupported.into())
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(raw) => raw.read(buf),
            Inner::Tls(tls) => match tls.read(buf) {
                // A client that closes without close_notify has simply gone away.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
            Inner::Closed => Ok(0),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(raw) => raw.write(buf),
            Inner::Tls(tls) => tls.write(buf),
            Inner::Closed => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Plain(raw) => raw.flush(),
            Inner::Tls(tls) => tls.flush(),
            Inner::Closed => Ok(()),
        }
    }
}

/// Reads lines and buffers replies over a byte stream. Replies are written out when the
/// session is about to wait for the next command, or when much is pending, so a pipelined
/// batch of commands gets its replies in few writes.
pub struct Conn<S> {
    stream: S,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Inside an over-long line: drop bytes through its end.
    discarding: bool,
    out: Vec<u8>,
    /// A write failed (the client stopped reading, or left): nothing more is written, so no
    /// byte is sent twice and no reply lands inside a half-sent message.
    dead: bool,
}

/// Pending output beyond this is written out at once.
const OUT_HIGH_WATER: usize = 64 << 10;
const READ_BUF: usize = MAX_SASL_LINE + (16 << 10);

impl<S: Transport> Conn<S> {
    pub fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buf: vec![0; READ_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            discarding: false,
            out: Vec::new(),
            dead: false,
        }
    }

    /// The next line of at most `max` octets without its line end (CRLF or bare LF).
    pub fn read_line_max(&mut self, max: usize) -> io::Result<Line> {
        debug_assert!(max < READ_BUF);
        loop {
            let pending = &self.buf[self.start..self.end];
            if let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let mut line = &pending[..i];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                let result = if std::mem::take(&mut self.discarding) || line.len() + 2 > max {
                    Line::TooLong
                } else {
                    Line::Command(line.to_vec())
                };
                // The line may be a PASS or a SASL answer: no copy of it stays here.
                self.buf[self.start..self.start + i + 1].zeroize();
                self.start += i + 1;
                return Ok(result);
            }
            if self.discarding || pending.len() > max {
                // No line end within the limit: forget what we have and skip to the line end.
                self.discarding = true;
                self.start = 0;
                self.end = 0;
            }
            self.flush()?;
            if self.start > 0 {
                let old_end = self.end;
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                self.buf[self.end..old_end].zeroize();
            }
            let n = self.stream.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Ok(Line::Eof);
            }
            self.end += n;
        }
    }

    /// The stream underneath, e.g. to close it.
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

impl<S: Transport> Peer for Conn<S> {
    fn read_line(&mut self) -> io::Result<Line> {
        self.read_line_max(MAX_COMMAND_LINE)
    }

    fn read_sasl_line(&mut self) -> io::Result<Line> {
        self.read_line_max(MAX_SASL_LINE)
    }

    fn is_secure(&self) -> bool {
        self.stream.is_secure()
    }

    fn can_start_tls(&self) -> bool {
        self.stream.can_start_tls()
    }

    fn prepare_tls(&mut self) -> Result<(), String> {
        self.stream.prepare_tls()
    }

    fn has_pending_input(&self) -> bool {
        self.start < self.end
    }

    fn end_login_deadline(&mut self) {
        self.stream.end_login_deadline()
    }

    fn login_deadline_passed(&self) -> bool {
        self.stream.login_deadline_passed()
    }

    fn start_tls(&mut self) -> io::Result<()> {
        // Plaintext the client pipelined behind STLS must never be read as if it came over TLS
        // (CVE-2011-0411); the session checks first, this is the second lock.
        if self.has_pending_input() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "plaintext after STLS",
            ));
        }
        self.flush()?;
        self.stream.start_tls()
    }
}

impl<S: Transport> Conn<S> {
    /// True once a write has failed: the connection is only good for closing.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    fn died<T>(&mut self, e: io::Error) -> io::Result<T> {
        self.dead = true;
        self.out.clear();
        Err(e)
    }
}

impl<S: Transport> Write for Conn<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.dead {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if self.out.is_empty() && data.len() >= OUT_HIGH_WATER {
            return match self.stream.write(data) {
                Err(e) => self.died(e),
                ok => ok,
            };
        }
        self.out.extend_from_slice(data);
        if self.out.len() >= OUT_HIGH_WATER {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if !self.out.is_empty() {
            if let Err(e) = self.stream.write_all(&self.out) {
                return self.died(e);
            }
            self.out.clear();
        }
        match self.stream.flush() {
            Err(e) => self.died(e),
            ok => ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory duplex stream fed in fixed-size pieces.
    struct Script {
        input: Vec<u8>,
        pos: usize,
        piece: usize,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.piece.min(buf.len()).min(self.input.len() - self.pos);
            buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Transport for Script {
        fn is_secure(&self) -> bool {
            false
        }
        fn can_start_tls(&self) -> bool {
            false
        }
        fn start_tls(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }
    }

    fn lines(input: &[u8], piece: usize) -> Vec<Option<Vec<u8>>> {
        let mut c = Conn::new(Script {
            input: input.to_vec(),
            pos: 0,
            piece,
            output: vec![],
        });
        let mut v = Vec::new();
        loop {
            match c.read_line().unwrap() {
                Line::Command(l) => v.push(Some(l)),
                Line::TooLong => v.push(None),
                Line::Eof => return v,
            }
        }
    }

    #[test]
    fn splits_lines_the_same_in_any_chunking() {
        let mut input = b"USER a\r\nPASS b c\nSTAT\r\n".to_vec();
        input.extend_from_slice(&[b'x'; 300]);
        input.extend_from_slice(b"\r\nNOOP\r\n");
        input.extend_from_slice(&[b'y'; 40000]);
        input.extend_from_slice(b"\nQUIT\r\npartial");
        let expected = vec![
            Some(b"USER a".to_vec()),
            Some(b"PASS b c".to_vec()),
            Some(b"STAT".to_vec()),
            None,
            Some(b"NOOP".to_vec()),
            None,
            Some(b"QUIT".to_vec()),
        ];
        for piece in 1..=512 {
            assert_eq!(lines(&input, piece), expected, "piece {piece}");
        }
        assert_eq!(lines(&input, 100_000), expected);
    }

    /// The raw connection over one end of a socket pair; the other end is the peer.
    fn socket_pair(timeout: Duration) -> (RawConn, std::os::unix::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let read = File::from(std::os::fd::OwnedFd::from(ours));
        let write = read.try_clone().unwrap();
        (RawConn::new(read, write, timeout).unwrap(), theirs)
    }

    #[test]
    fn the_proxy_header_is_read_to_its_last_octet_and_no_further() {
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0f".to_vec();
        v2.extend_from_slice(&[203, 0, 113, 7, 127, 0, 0, 1, 0x9c, 0x40, 0, 110]);
        v2.extend_from_slice(&[0x04, 0, 0]); // a NOOP TLV
        for (header, client) in [
            (
                &b"PROXY TCP4 198.51.100.1 127.0.0.1 1 110\r\n"[..],
                Some("198.51.100.1:1"),
            ),
            (&v2, Some("203.0.113.7:40000")),
            (b"PROXY UNKNOWN\r\n", None),
        ] {
            let (mut raw, mut peer) = socket_pair(Duration::from_secs(5));
            // The header and what follows arrive together, as from a balancer.
            peer.write_all(&[header, b"\x16\x03\x01CAPA\r\n"].concat())
                .unwrap();
            drop(peer);
            let got = raw.read_proxy_header().unwrap();
            assert_eq!(got, client.map(|c| c.parse().unwrap()));
            let mut rest = Vec::new();
            raw.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, b"\x16\x03\x01CAPA\r\n");
            assert!(raw.deadline_cap.is_none());
        }
    }

    #[test]
    fn a_missing_or_bad_proxy_header_is_refused() {
        let (mut raw, _peer) = socket_pair(Duration::from_millis(300));
        let started = Instant::now();
        let e = raw.read_proxy_header().unwrap_err();
        assert!(matches!(e, HeaderFailure::TimedOut(_)), "{e}");
        assert_eq!(e.to_string(), "no complete PROXY header within 0.3 s");
        assert!(started.elapsed() >= Duration::from_millis(300));
        for (input, reason) in [
            (&b""[..], "closed without sending a PROXY header"),
            (
                b"PROXY TCP4 1.2.3.4",
                "closed after 18 octets of a PROXY header",
            ),
            (b"USER a\r\n", "not a PROXY protocol header"),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
                "v1 header: LF without CR",
            ),
        ] {
            let (mut raw, mut peer) = socket_pair(Duration::from_secs(5));
            peer.write_all(input).unwrap();
            drop(peer);
            assert_eq!(raw.read_proxy_header().unwrap_err().to_string(), reason);
        }
    }

    /// A client that sends a command every 100 ms, from another thread, until we hang up.
    fn chatty(mut peer: std::os::unix::net::UnixStream) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            while peer.write_all(b"NOOP\r\n").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    }

    #[test]
    fn the_login_deadline_holds_across_commands_however_busy_the_client() {
        let (mut raw, peer) = socket_pair(Duration::from_secs(5));
        let started = Instant::now();
        raw.set_prelogin_limits(Duration::from_secs(5), started + Duration::from_millis(500));
        let client = chatty(peer);
        let mut c = Conn::new(Stream::plain(raw, None));
        let mut commands = 0;
        let e = loop {
            match c.read_line() {
                Ok(Line::Command(_)) => commands += 1,
                Ok(_) => panic!("not a command"),
                Err(e) => break e,
            }
        };
        let took = started.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(c.login_deadline_passed());
        assert!(commands >= 3, "{commands}");
        assert!(took >= Duration::from_millis(500), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        drop(c);
        client.join().unwrap();
    }

    #[test]
    fn after_login_only_the_idle_timeout_applies() {
        let (mut raw, peer) = socket_pair(Duration::from_millis(300));
        let started = Instant::now();
        raw.set_prelogin_limits(Duration::from_secs(5), started + Duration::from_millis(200));
        let client = chatty(peer);
        let mut c = Conn::new(Stream::plain(raw, None));
        c.end_login_deadline();
        while started.elapsed() < Duration::from_millis(800) {
            assert!(matches!(c.read_line().unwrap(), Line::Command(_)));
        }
        assert!(!c.login_deadline_passed());
        drop(c);
        client.join().unwrap();
    }

    #[test]
    fn a_silent_tls_client_is_cut_at_the_handshake_limit() {
        let dir = tempfile::tempdir().unwrap();
        let config = tls::server_config(&tls::Files {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            generate_for: Some("localhost".into()),
        })
        .unwrap();
        let (mut raw, _peer) = socket_pair(Duration::from_secs(5));
        let started = Instant::now();
        raw.set_prelogin_limits(Duration::from_millis(300), started + Duration::from_secs(5));
        let e = Stream::implicit_tls(raw, config).err().unwrap();
        let took = started.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            e.to_string(),
            "not finished within 0.3 s (--handshake-timeout)"
        );
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_accepted() {
        let mut input = vec![b'a'; MAX_COMMAND_LINE - 2];
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(&[b'b'; MAX_COMMAND_LINE - 1]);
        input.extend_from_slice(b"\r\n");
        let got = lines(&input, 7);
        assert_eq!(got.len(), 2);
        assert!(got[0].is_some());
        assert!(got[1].is_none());
    }
}
