//! Just enough HTTP/1.1 for OAuth's token, device and introspection endpoints: one POST of a
//! form per connection, a bounded response read whole. TLS and its verification are the IMAP
//! side's (`imap::transport`: the system's roots plus `--imap-ca`); every request is bounded
//! by one timeout from connect to the last byte.

use crate::account::{is_loopback, Security, Server};
use crate::imap::transport::{self, Stream, Timed};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// The most of a response read: token responses are a few KB.
const MAX_RESPONSE: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
}

impl Url {
    /// `https://host[:port]/path?query`, or `http://` to a loopback host only (the same rule as
    /// clear IMAP: tokens never cross a network in clear).
    pub fn parse(s: &str) -> Result<Url, String> {
        let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{s}: not an https:// URL"));
        };
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') || authority.is_empty() {
            return Err(format!("{s}: no host, or user information in the URL"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port = p.parse().map_err(|_| format!("{s}: bad port"))?;
                (h, port)
            }
            _ => (authority, if https { 443 } else { 80 }),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if target.contains(|c: char| c.is_ascii_control() || c == ' ') {
            return Err(format!("{s}: control characters or spaces in the URL"));
        }
        if !https && !is_loopback(&host, port) {
            return Err(format!(
                "{s}: http:// only to a loopback address (tokens would cross the network in \
                 clear): use https://"
            ));
        }
        Ok(Url {
            https,
            host,
            port,
            target,
        })
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// POSTs `form` (application/x-www-form-urlencoded) to `url`; the response whatever its status.
/// `Err` only when no response came (unreachable, TLS, timeout, malformed).
pub fn post_form(
    url: &Url,
    form: &[(&str, &str)],
    ca: Option<&Path>,
    timeout: Duration,
) -> Result<Response, String> {
    let body = encode_form(form);
    let host_header = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: aiopopd/{}\r\n\
         Accept: application/json\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        url.target,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    let server = Server {
        host: url.host.clone(),
        port: url.port,
        security: if url.https {
            Security::Tls
        } else {
            Security::Plain
        },
    };
    let tcp = transport::connect(&server, timeout)?;
    let mut stream = if url.https {
        transport::tls(tcp, &url.host, ca, timeout).map_err(|(e, _)| e)?
    } else {
        Stream::Plain(Timed::new(tcp, timeout))
    };
    let at = format!("{}:{}", url.host, url.port);
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| format!("{at}: {e}"))?;
    let raw = read_response(&mut stream).map_err(|e| format!("{at}: {e}"))?;
    parse_response(&raw).map_err(|e| format!("{at}: {e}"))
}

/// Reads until the server closes (we asked for `Connection: close`) or the announced length
/// is there, at most `MAX_RESPONSE`. A TLS peer that closes without close_notify after a
/// complete response is accepted.
fn read_response(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(len) = complete_length(&buf) {
            buf.truncate(len);
            return Ok(buf);
        }
        match r.read(&mut chunk) {
            Ok(0) => return Ok(buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if !buf.is_empty() && e.kind() != std::io::ErrorKind::TimedOut => {
                return Ok(buf)
            }
            Err(e) => return Err(e),
        }
        if buf.len() > MAX_RESPONSE {
            return Err(std::io::Error::other("response too long"));
        }
    }
}

/// The whole response's length once headers with a Content-Length and that many body bytes
/// are in.
fn complete_length(buf: &[u8]) -> Option<usize> {
    let end = find(buf, b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let len: usize = header(head, "content-length")?.parse().ok()?;
    (buf.len() >= end + len).then_some(end + len)
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = find(raw, b"\r\n\r\n").ok_or("no complete HTTP response")? + 4;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "HTTP header not UTF-8")?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next());
    let status = code
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP response: {:.60}", status_line))?;
    let mut body = raw[end..].to_vec();
    if header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body).ok_or("malformed chunked body")?;
    } else if let Some(len) = header(head, "content-length").and_then(|v| v.parse().ok()) {
        if body.len() < len {
            return Err("response cut short".into());
        }
        body.truncate(len);
    }
    Ok(Response { status, body })
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `application/x-www-form-urlencoded`: unreserved characters as they are, the rest `%XX`.
pub fn encode_form(form: &[(&str, &str)]) -> String {
    form.iter()
        .map(|(k, v)| format!("{}={}", percent(k), percent(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes all but RFC 3986's unreserved characters.
pub fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` and `+` (a query string or form value); `None` if malformed or not UTF-8.
pub fn unpercent(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn urls_https_anywhere_http_only_to_loopback() {
        let u = Url::parse("https://login.example.com/common/oauth2/v2.0/token").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.target.as_str()),
            (true, "login.example.com", 443, "/common/oauth2/v2.0/token")
        );
        let u = Url::parse("http://127.0.0.1:8080?x=1").unwrap();
        assert_eq!((u.port, u.target.as_str()), (8080, "/?x=1"));
        let u = Url::parse("http://[::1]:9/t").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert!(Url::parse("http://192.0.2.1/token").is_err());
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("https://user@x/").is_err());
        assert!(Url::parse("https://x/a b").is_err());
    }

    #[test]
    fn forms_are_percent_encoded_and_decoded() {
        let f = encode_form(&[
            ("scope", "https://mail.google.com/ offline"),
            ("a", "b&c=d"),
        ]);
        assert_eq!(
            f,
            "scope=https%3A%2F%2Fmail.google.com%2F%20offline&a=b%26c%3Dd"
        );
        assert_eq!(unpercent("a%20b+c%2F").as_deref(), Some("a b c/"));
        assert_eq!(unpercent("%zz"), None);
        assert_eq!(unpercent("%4"), None);
    }

    #[test]
    fn responses_with_length_chunked_or_until_close() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}junk").unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"{}"[..]));
        let r = parse_response(
            b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n1\r\nd\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, &r.body[..]), (400, &b"abcd"[..]));
        let r = parse_response(b"HTTP/1.0 503 Down\r\n\r\nbye").unwrap();
        assert_eq!((r.status, &r.body[..]), (503, &b"bye"[..]));
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
    }

    #[test]
    fn a_post_to_a_loopback_server() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&req).contains("grant_type=x") {
                let n = s.read(&mut buf).unwrap();
                req.extend_from_slice(&buf[..n]);
            }
            // Keeps the connection open: the client stops at Content-Length.
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"ok\":true}")
                .unwrap();
            std::thread::sleep(Duration::from_millis(500));
            String::from_utf8(req).unwrap()
        });
        let url = Url::parse(&format!("http://127.0.0.1:{port}/token")).unwrap();
        let r = post_form(&url, &[("grant_type", "x")], None, Duration::from_secs(5)).unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"{\"ok\":true}"[..]));
        let req = server.join().unwrap();
        assert!(
            req.starts_with("POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
            "{req}"
        );
        assert!(req.ends_with("\r\n\r\ngrant_type=x"), "{req}");
    }

    #[test]
    fn a_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!(
            "http://127.0.0.1:{}/t",
            l.local_addr().unwrap().port()
        ))
        .unwrap();
        let started = std::time::Instant::now();
        let r = post_form(&url, &[], None, Duration::from_millis(300));
        assert!(r.is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(l);
    }
}
