//! The byte stream under the IMAP session: TCP to the server, optionally in TLS (native-tls:
//! the system's OpenSSL, so its security updates apply at the next connection). Certificates
//! and host names are always verified; there is deliberately no way to skip that, since the
//! user's password crosses this link.

use super::client::Transport;
use crate::account::Server;
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

pub enum Stream {
    Plain(Timed),
    Tls(Box<native_tls::TlsStream<Timed>>),
}

/// TCP under a deadline that holds for every `recv`, below TLS: OpenSSL may call `recv` many
/// times to complete one record (or skip records with no data for us), and a socket timeout
/// alone would start afresh for each, so a server sending a byte just before each timeout could
/// stretch one command without end.
#[derive(Debug)]
pub struct Timed {
    tcp: TcpStream,
    deadline: Instant,
    /// `--check` only: the first octets the server sent (what answered a TLS hello tells a
    /// plain port).
    first: Option<Rc<RefCell<Vec<u8>>>>,
}

impl Timed {
    pub fn new(tcp: TcpStream, timeout: Duration) -> Timed {
        Timed {
            tcp,
            deadline: Instant::now() + timeout,
            first: None,
        }
    }

    /// As `new`, also keeping the first octets read (up to 512: a greeting's first line, or a
    /// TLS ServerHello), in the cell returned.
    pub fn recording(tcp: TcpStream, timeout: Duration) -> (Timed, Rc<RefCell<Vec<u8>>>) {
        let first = Rc::default();
        let mut t = Timed::new(tcp, timeout);
        t.first = Some(Rc::clone(&first));
        (t, first)
    }

    pub fn into_tcp(self) -> TcpStream {
        self.tcp
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        // Zero would mean "no timeout".
        self.tcp
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let n = self.tcp.read(buf)?;
        if let Some(first) = &self.first {
            let mut first = first.borrow_mut();
            let take = n.min(512usize.saturating_sub(first.len()));
            first.extend_from_slice(&buf[..take]);
        }
        Ok(n)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

impl Transport for Stream {
    fn set_read_timeout(&mut self, left: Duration) -> io::Result<()> {
        let timed = match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_mut(),
        };
        timed.deadline = Instant::now() + left;
        Ok(())
    }
}

/// A TCP connection to `server`, trying each address in turn; every wait bounded by `timeout`.
pub fn connect(server: &Server, timeout: Duration) -> Result<TcpStream, String> {
    let where_ = format!("{}:{}", server.host, server.port);
    let addrs = (server.host.as_str(), server.port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {where_}: {e} ({RESOLVE_HINT})"))?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(tcp) => {
                let set = tcp
                    .set_read_timeout(Some(timeout))
                    .and_then(|()| tcp.set_write_timeout(Some(timeout)))
                    .and_then(|()| tcp.set_nodelay(true));
                return set.map(|()| tcp).map_err(|e| format!("{where_}: {e}"));
            }
            Err(e) => last = Some(e),
        }
    }
    let hint = match last.as_ref().map(io::Error::kind) {
        Some(io::ErrorKind::ConnectionRefused) => format!(" ({REFUSED_HINT})"),
        _ => String::new(),
    };
    Err(format!(
        "connecting to {where_}: {}{hint}",
        last.map_or("no addresses".to_string(), |e| e.to_string())
    ))
}

/// What to do when the IMAP host name doesn't resolve (the log line and `--check` say it).
pub const RESOLVE_HINT: &str =
    "unknown host: check -H, or \"hostname\" in the --user-dir file, and DNS";
/// What to do when nothing listens on the IMAP port.
pub const REFUSED_HINT: &str = "nothing listens on that port: check -p, or \"port\" in the \
    --user-dir file (IMAPS with -s is usually 993, IMAP 143), and that the server runs";

/// What a failed TLS handshake with the IMAP server most likely means, from OpenSSL's text:
/// the fix to put in the log line and in `--check`'s report.
pub fn tls_hint(error: &str) -> Option<&'static str> {
    let e = error.to_ascii_lowercase();
    if e.contains("wrong version number") || e.contains("packet length too long") {
        Some(
            "the server answered in clear text, so this is a plain IMAP port: drop -s (and \
             use --imap-starttls), or use the IMAPS port (usually 993)",
        )
    } else if e.contains("hostname mismatch") || e.contains("ip address mismatch") {
        Some(
            "the server's certificate is for another name: give -H (or \"hostname\") as the \
             name the certificate was issued for",
        )
    } else if e.contains("certificate has expired") {
        Some("the server's certificate has expired: it must be renewed on the IMAP server")
    } else if e.contains("certificate verify failed") {
        Some(
            "the server's certificate isn't trusted: if it is self-signed or from a private \
             CA, give that CA certificate (PEM) with --imap-ca FILE",
        )
    } else {
        None
    }
}

/// The TLS client configuration: TLS 1.2+, the system roots plus the certificates in `ca`.
/// `Err` is (what, permanent).
pub fn connector(ca: Option<&Path>) -> Result<native_tls::TlsConnector, (String, bool)> {
    let mut builder = native_tls::TlsConnector::builder();
    builder.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
    if let Some(ca) = ca {
        let pem =
            std::fs::read(ca).map_err(|e| (format!("--imap-ca {}: {e}", ca.display()), true))?;
        let blocks = pem_blocks(&pem);
        if blocks.is_empty() {
            return Err((
                format!("--imap-ca {}: no PEM CERTIFICATE in it", ca.display()),
                true,
            ));
        }
        for block in blocks {
            let cert = native_tls::Certificate::from_pem(block)
                .map_err(|e| (format!("--imap-ca {}: {e}", ca.display()), true))?;
            builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| (format!("TLS setup: {e}"), false))
}

/// TLS 1.2+ over `tcp`, the certificate and host name verified against the system roots and
/// the certificates in `ca`; the handshake within `timeout`. `Err` is (what, permanent).
pub fn tls(
    tcp: TcpStream,
    host: &str,
    ca: Option<&Path>,
    timeout: Duration,
) -> Result<Stream, (String, bool)> {
    let connector = connector(ca)?;
    let tls = connector
        .connect(host, Timed::new(tcp, timeout))
        .map_err(|e| {
            let e = e.to_string();
            match tls_hint(&e) {
                Some(hint) => (format!("TLS to {host}: {e} ({hint})"), false),
                None => (format!("TLS to {host}: {e}"), false),
            }
        })?;
    Ok(Stream::Tls(Box::new(tls)))
}

/// Each `-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----` block of a PEM file.
fn pem_blocks(pem: &[u8]) -> Vec<&[u8]> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = find(rest, BEGIN) {
        let Some(end) = find(&rest[start..], END) else {
            break;
        };
        blocks.push(&rest[start..start + end + END.len()]);
        rest = &rest[start + end + END.len()..];
    }
    blocks
}
