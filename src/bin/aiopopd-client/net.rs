//! Where the bytes go: a TCP connection with timeouts, and TLS over it (implicit, or started by
//! STLS) with native-tls. No POP3 here: `check` decides when TLS starts.

use crate::args::{Config, Security, Trust};
use crate::check::Transport;
use crate::Failure;
use native_tls::{Certificate, HandshakeError, TlsConnector, TlsStream};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};

/// The connection to the server; starts out plain.
pub struct Connection {
    stream: Stream,
    /// None when the command line asked for no TLS.
    tls: Option<Tls>,
}

struct Tls {
    connector: TlsConnector,
    /// The name the certificate must carry: the host as given with -H.
    domain: String,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// After a failed handshake, which consumes the TCP stream.
    Lost,
}

/// Connects with TCP; TLS settings (the --ca file) are loaded first, so that a bad file is
/// reported before any traffic.
pub fn connect(config: &Config) -> Result<Connection, Failure> {
    let tls = match config.security {
        Security::Plain => None,
        Security::Implicit | Security::Stls => Some(Tls {
            connector: connector(&config.trust)?,
            domain: config.host.clone(),
        }),
    };
    let addrs = (config.host.as_str(), config.port)
        .to_socket_addrs()
        .map_err(|e| Failure(format!("cannot resolve {}: {e}", config.host)))?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, config.timeout) {
            Ok(tcp) => {
                let set = tcp
                    .set_read_timeout(Some(config.timeout))
                    .and_then(|()| tcp.set_write_timeout(Some(config.timeout)))
                    // Lock-step POP3 stalls ~40 ms a reply on Nagle's algorithm.
                    .and_then(|()| tcp.set_nodelay(true));
                set.map_err(|e| Failure(format!("cannot set up the connection: {e}")))?;
                return Ok(Connection {
                    stream: Stream::Plain(tcp),
                    tls,
                });
            }
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    Err(Failure(format!(
        "cannot connect to {} port {}: {}",
        config.host,
        config.port,
        last.unwrap_or_else(|| "no address".into())
    )))
}

fn connector(trust: &Trust) -> Result<TlsConnector, Failure> {
    let mut builder = TlsConnector::builder();
    match trust {
        Trust::System => {}
        Trust::Ca(path) => {
            let shown = path.display();
            let pem = std::fs::read(path)
                .map_err(|e| Failure(format!("--ca {shown}: cannot read it: {e}")))?;
            let certs = Certificate::stack_from_pem(&pem)
                .map_err(|e| Failure(format!("--ca {shown}: not a PEM certificate: {e}")))?;
            if certs.is_empty() {
                return Err(Failure(format!("--ca {shown}: no certificate in it")));
            }
            for cert in certs {
                builder.add_root_certificate(cert);
            }
        }
        Trust::Insecure => {
            builder
                .danger_accept_invalid_certs(true)
                .danger_accept_invalid_hostnames(true);
        }
    }
    builder
        .build()
        .map_err(|e| Failure(format!("cannot set up TLS: {e}")))
}

impl Transport for Connection {
    fn start_tls(&mut self) -> Result<(), Failure> {
        let Some(tls) = &self.tls else {
            return Err(Failure("TLS was not asked for".into()));
        };
        let tcp = match std::mem::replace(&mut self.stream, Stream::Lost) {
            Stream::Plain(tcp) => tcp,
            other => {
                self.stream = other;
                return Err(Failure("TLS is already on".into()));
            }
        };
        match tls.connector.connect(&tls.domain, tcp) {
            Ok(stream) => {
                self.stream = Stream::Tls(Box::new(stream));
                Ok(())
            }
            Err(HandshakeError::Failure(e)) => {
                let hint = if e.to_string().contains("certificate verify failed") {
                    "; to trust a self-signed certificate, give it with --ca FILE"
                } else {
                    ""
                };
                Err(Failure(format!(
                    "TLS handshake with {} failed: {e}{hint}",
                    tls.domain
                )))
            }
            // A blocking socket only "would block" when its read timeout expired.
            Err(HandshakeError::WouldBlock(_)) => Err(Failure(format!(
                "TLS handshake with {} timed out (see --timeout)",
                tls.domain
            ))),
        }
    }
}

fn lost() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection was lost in TLS set-up",
    )
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Lost => Err(lost()),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Lost => Err(lost()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Lost => Err(lost()),
        }
    }
}
