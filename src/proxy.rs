//! The PROXY protocol header a load balancer sends before anything else (HAProxy's
//! `proxy-protocol.txt`, version 1 text and version 2 binary), and the networks trusted to send
//! it (`--proxy-protocol-from`). Pure: bytes in, a verdict out. Reading the bytes from the
//! connection, with a deadline and never past the header's end, is `conn`'s job; what address
//! the log then names is `main`'s.
//!
//! Everything a peer sends here has a bound: a v1 line ends within [`V1_MAX`] octets, a v2 header
//! within 16 + 65,535; anything that doesn't match the spec exactly is an [`Error`], never a guess.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

/// How long a trusted peer has to send its whole header (the spec asks for at least 3 s, to
/// cover a TCP retransmission).
pub const HEADER_WAIT: Duration = Duration::from_secs(5);
/// The longest v1 line, CRLF included: `PROXY UNKNOWN` with two full IPv6 addresses and ports.
pub const V1_MAX: usize = 107;
/// The shortest v1 line, `PROXY UNKNOWN\r\n`; a v2 header is longer still (16 octets).
const V1_MIN: usize = 15;
const V1_PREFIX: &[u8] = b"PROXY ";
/// The first 12 octets of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family and transport, length.
const V2_FIXED: usize = 16;

/// How far [`parse`] got with the bytes read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A valid beginning. Read at most this many more octets (never past the header's end, so
    /// nothing behind it is taken from the protocol that follows) and call again with all of them.
    NeedMore(usize),
    /// A whole header: the first `consumed` octets of the input; what follows belongs to the
    /// protocol behind it. `source` is the client's address, or `None` where the connection's own
    /// peer address stands: the balancer's own connections (v2 LOCAL, v1 UNKNOWN: health checks)
    /// and clients that have no IP address (v2 UNSPEC and AF_UNIX).
    Done {
        consumed: usize,
        source: Option<SocketAddr>,
    },
}

/// Why a header was refused. Its `Display` is for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Neither `PROXY ` nor the v2 signature.
    NotProxy,
    /// No CRLF within [`V1_MAX`] octets.
    V1TooLong,
    /// A v1 line that doesn't match the grammar; what is wrong.
    V1(&'static str),
    /// A v2 version other than 2.
    V2Version(u8),
    /// A v2 command other than LOCAL (0) and PROXY (1).
    V2Command(u8),
    /// A v2 family/transport byte the spec doesn't define.
    V2Family(u8),
    /// A v2 address block shorter than its family needs.
    V2Length { family: u8, len: u16 },
    /// TLVs after the addresses that overrun the header.
    V2Tlv,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotProxy => write!(f, "not a PROXY protocol header"),
            Error::V1TooLong => write!(f, "v1 header without CRLF within {V1_MAX} octets"),
            Error::V1(what) => write!(f, "v1 header: {what}"),
            Error::V2Version(v) => write!(f, "v2 header: version {v}"),
            Error::V2Command(c) => write!(f, "v2 header: unknown command {c:#x}"),
            Error::V2Family(b) => write!(f, "v2 header: unknown family/transport {b:#04x}"),
            Error::V2Length { family, len } => {
                write!(
                    f,
                    "v2 header: {len} octets of addresses for family {family:#04x}"
                )
            }
            Error::V2Tlv => write!(f, "v2 header: TLVs overrun the header"),
        }
    }
}

impl std::error::Error for Error {}

/// Looks at the octets read so far from a connection that must start with a PROXY header.
pub fn parse(buf: &[u8]) -> Result<Progress, Error> {
    match buf.first() {
        // Both versions are at least this long.
        None => Ok(Progress::NeedMore(V1_MIN)),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(Error::NotProxy),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Progress, Error> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(Error::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    if let Some(lf) = window.iter().position(|&b| b == b'\n') {
        let line = match window[..lf].strip_suffix(b"\r") {
            Some(line) => line,
            None => return Err(Error::V1("LF without CR")),
        };
        return Ok(Progress::Done {
            consumed: lf + 1,
            source: parse_v1_line(line)?,
        });
    }
    if buf.len() >= V1_MAX {
        return Err(Error::V1TooLong);
    }
    // Refuse as soon as the line can't become valid, rather than wait for its end.
    if let Some(cr) = buf.iter().position(|&b| b == b'\r') {
        if cr + 1 != buf.len() {
            return Err(Error::V1("CR without LF"));
        }
    }
    check_v1_start(&buf[n..])?;
    Ok(Progress::NeedMore(V1_MIN.saturating_sub(buf.len()).max(1)))
}

/// The protocol names, with what must follow each.
const V1_PROTOCOLS: [&[u8]; 4] = [b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r"];

/// An incomplete line after `PROXY `: could it still be valid?
fn check_v1_start(rest: &[u8]) -> Result<(), Error> {
    let fits = |p: &&[u8]| {
        let n = rest.len().min(p.len());
        rest[..n] == p[..n]
    };
    let Some(proto) = V1_PROTOCOLS.into_iter().find(fits) else {
        return Err(Error::V1("unknown protocol"));
    };
    if proto.starts_with(b"TCP") && rest.len() > proto.len() {
        let ok = |&b: &u8| b.is_ascii_hexdigit() || b".: \r".contains(&b);
        if !rest[proto.len()..].iter().all(ok) {
            return Err(Error::V1("bad character"));
        }
    }
    Ok(())
}

/// A whole v1 line without its CRLF.
fn parse_v1_line(line: &[u8]) -> Result<Option<SocketAddr>, Error> {
    let rest = &line[V1_PREFIX.len()..];
    if rest.contains(&b'\r') {
        return Err(Error::V1("CR without LF"));
    }
    // "the receiver must ignore anything presented before the CRLF"
    if rest == b"UNKNOWN" || rest.starts_with(b"UNKNOWN ") {
        return Ok(None);
    }
    let (v6, rest) = if let Some(r) = rest.strip_prefix(b"TCP4 ") {
        (false, r)
    } else if let Some(r) = rest.strip_prefix(b"TCP6 ") {
        (true, r)
    } else {
        return Err(Error::V1("unknown protocol"));
    };
    // Exactly one space between fields: two in a row make an empty field, refused below.
    let fields: Vec<&[u8]> = rest.split(|&b| b == b' ').collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(Error::V1("not four fields after the protocol"));
    };
    let src = v1_address(src, v6).ok_or(Error::V1("bad source address"))?;
    v1_address(dst, v6).ok_or(Error::V1("bad destination address"))?;
    let sport = v1_port(sport).ok_or(Error::V1("bad source port"))?;
    v1_port(dport).ok_or(Error::V1("bad destination port"))?;
    Ok(Some(SocketAddr::new(src, sport)))
}

fn v1_address(field: &[u8], v6: bool) -> Option<IpAddr> {
    let text = std::str::from_utf8(field).ok()?;
    // std refuses IPv4 numbers with leading zeroes, as the spec asks.
    if v6 {
        text.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

/// 0 to 65535 in decimal, without leading zeroes.
fn v1_port(field: &[u8]) -> Option<u16> {
    let digits = !field.is_empty() && field.len() <= 5 && field.iter().all(u8::is_ascii_digit);
    if !digits || (field.len() > 1 && field[0] == b'0') {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Result<Progress, Error> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(Error::NotProxy);
    }
    if buf.len() < V2_FIXED {
        return Ok(Progress::NeedMore(V2_FIXED - buf.len()));
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(Error::V2Version(version));
    }
    let local = match command {
        0 => true,
        1 => false,
        c => return Err(Error::V2Command(c)),
    };
    let family = buf[13];
    let len = u16::from_be_bytes([buf[14], buf[15]]);
    // LOCAL: "discard the protocol block including the family which is ignored".
    let addresses = if local {
        None
    } else {
        match family {
            0x00 => None,
            0x11 | 0x12 => Some(12),
            0x21 | 0x22 => Some(36),
            0x31 | 0x32 => Some(216),
            f => return Err(Error::V2Family(f)),
        }
    };
    if addresses.is_some_and(|a| usize::from(len) < a) {
        return Err(Error::V2Length { family, len });
    }
    let total = V2_FIXED + usize::from(len);
    if buf.len() < total {
        return Ok(Progress::NeedMore(total - buf.len()));
    }
    let block = &buf[V2_FIXED..total];
    let source = match addresses {
        // UNSPEC or LOCAL: the block means nothing to us.
        None => {
            return Ok(Progress::Done {
                consumed: total,
                source: None,
            })
        }
        Some(12) => {
            let ip = Ipv4Addr::from(<[u8; 4]>::try_from(&block[..4]).expect("4 octets"));
            Some(SocketAddr::new(ip.into(), be16(&block[8..10])))
        }
        Some(36) => {
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&block[..16]).expect("16 octets"));
            Some(SocketAddr::new(ip.into(), be16(&block[32..34])))
        }
        // AF_UNIX: "falls back to the UNSPEC mode" for a family the receiver doesn't support.
        Some(_) => None,
    };
    check_tlvs(&block[addresses.unwrap_or(0)..])?;
    Ok(Progress::Done {
        consumed: total,
        source,
    })
}

fn be16(two: &[u8]) -> u16 {
    u16::from_be_bytes([two[0], two[1]])
}

/// TLVs (type, 16-bit length, value) are skipped, but must fill the rest of the header exactly.
fn check_tlvs(mut rest: &[u8]) -> Result<(), Error> {
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(Error::V2Tlv);
        }
        let len = usize::from(be16(&rest[1..3]));
        rest = rest.get(3 + len..).ok_or(Error::V2Tlv)?;
    }
    Ok(())
}

/// A network in `--proxy-protocol-from`: an address and a prefix length (all of it if omitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in this network. An IPv4 client of a dual-stack socket shows as
    /// `::ffff:a.b.c.d`: it is matched as the IPv4 address it is (and IPv4 addresses as their
    /// mapped form against an IPv6 network such as `::ffff:0:0/96`).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                same_prefix(net.to_bits().into(), ip.to_bits().into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(net.to_bits(), ip.to_bits(), 128, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V4(ip)) => same_prefix(
                net.to_bits(),
                ip.to_ipv6_mapped().to_bits(),
                128,
                self.prefix,
            ),
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }
}

/// The network part of a `bits`-bit address (32 or 128) for a prefix of `prefix` bits.
fn mask(bits: u32, prefix: u8) -> u128 {
    let all = u128::MAX >> (128 - bits);
    all & !all.checked_shr(prefix.into()).unwrap_or(0)
}

fn same_prefix(a: u128, b: u128, bits: u32, prefix: u8) -> bool {
    let m = mask(bits, prefix);
    a & m == b & m
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: not an IP address or network"))?;
        let bits: u8 = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= bits && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("{s:?}: the prefix length must be 0 to {bits}")),
            },
        };
        let m = mask(bits.into(), prefix);
        let masked = match net {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from_bits((u128::from(a.to_bits()) & m) as u32)),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from_bits(a.to_bits() & m)),
        };
        if masked != net {
            // Most likely a typo; trusting more (or less) than meant is worse than refusing.
            return Err(format!(
                "{s:?}: address bits set beyond the /{prefix} (the network is {masked}/{prefix})"
            ));
        }
        Ok(Cidr { net, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// `CIDR[,CIDR...]` as given to `--proxy-protocol-from`.
pub fn parse_list(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',')
        .map(|c| match c.trim() {
            "" => Err(format!("{s:?}: an empty network")),
            c => c.parse(),
        })
        .collect()
}

/// Whether a connection from `ip` must start with a PROXY header.
pub fn is_trusted(networks: &[Cidr], ip: IpAddr) -> bool {
    networks.iter().any(|n| n.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(consumed: usize, source: Option<&str>) -> Result<Progress, Error> {
        Ok(Progress::Done {
            consumed,
            source: source.map(|s| s.parse().unwrap()),
        })
    }

    /// Feeds `input` the way `conn` reads it: never more than asked for.
    fn feed(input: &[u8]) -> Result<Progress, Error> {
        let mut have = 0;
        loop {
            match parse(&input[..have])? {
                Progress::NeedMore(n) => {
                    assert!(n >= 1);
                    if have == input.len() {
                        return Ok(Progress::NeedMore(n));
                    }
                    have = (have + n).min(input.len());
                }
                done => return Ok(done),
            }
        }
    }

    fn v2(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(family);
        h.extend_from_slice(&(block.len() as u16).to_be_bytes());
        h.extend_from_slice(block);
        h
    }

    fn v2_tcp4(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut block = src.to_vec();
        block.extend_from_slice(&[192, 0, 2, 1]);
        block.extend_from_slice(&sport.to_be_bytes());
        block.extend_from_slice(&995u16.to_be_bytes());
        block.extend_from_slice(tlvs);
        v2(0x21, 0x11, &block)
    }

    #[test]
    fn v1_spec_examples() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        assert_eq!(parse(line), done(line.len(), Some("192.168.0.1:56324")));
        let line = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        assert_eq!(line.len(), 56);
        assert_eq!(parse(line), done(56, Some("255.255.255.255:65535")));
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert_eq!(line.len(), 104);
        assert_eq!(
            parse(line.as_bytes()),
            done(104, Some(&format!("[{full}]:65535")))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), done(15, None));
        let line = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n");
        assert_eq!(line.len(), V1_MAX);
        assert_eq!(parse(line.as_bytes()), done(V1_MAX, None));
    }

    #[test]
    fn v1_leaves_what_follows_the_line() {
        let header = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 110\r\n";
        let input = [&header[..], b"CAPA\r\n"].concat();
        let len = header.len();
        assert_eq!(feed(&input), done(len, Some("[2001:db8::1]:1")));
        // Nothing behind the CRLF was asked for: the TLS ClientHello or POP3 stays unread.
        let mut have = 0;
        while let Ok(Progress::NeedMore(n)) = parse(&input[..have]) {
            have += n;
            assert!(have <= len, "read past the header");
        }
    }

    #[test]
    fn v1_the_same_in_any_chunking() {
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 995\r\n\x16\x03\x01";
        for cut in 0..line.len() - 3 {
            let r = parse(&line[..cut]);
            assert!(matches!(r, Ok(Progress::NeedMore(_))), "{cut}: {r:?}");
        }
        assert_eq!(feed(line), done(line.len() - 3, Some("203.0.113.7:40000")));
    }

    #[test]
    fn v1_malformed() {
        for (bad, why) in [
            (&b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..], "LF without CR"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "CR without LF"),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "not four fields"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "not four fields"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "not four fields"),
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad source address"),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad source address"),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", "bad source address"),
            (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "bad source address"),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n",
                "bad destination address",
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad source port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "bad source port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1a 2\r\n", "bad source port"),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n",
                "bad source port",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n",
                "bad destination port",
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", "bad destination port"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
            (b"PROXY UNKNOWNX\r\n", "unknown protocol"),
            (b"PROXY TCP4\r\n", "unknown protocol"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{:?}: {e}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            parse(b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n"),
            done(32, Some("0.0.0.0:0"))
        );
    }

    #[test]
    fn v1_refused_as_soon_as_it_cannot_become_valid() {
        for (bad, e) in [
            (&b"USER alice\r\n"[..], Error::NotProxy),
            (b"PROXX", Error::NotProxy),
            (b"PROXY  ", Error::V1("unknown protocol")),
            (b"PROXY TCP5", Error::V1("unknown protocol")),
            (b"PROXY TCP4 1.2.3.4 x", Error::V1("bad character")),
            (b"PROXY TCP4 1.2\r3", Error::V1("CR without LF")),
            (b"\x16\x03\x01\x02\x00", Error::NotProxy),
        ] {
            assert_eq!(parse(bad), Err(e), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn v1_over_long_or_truncated() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX, b'x');
        assert_eq!(parse(&long), Err(Error::V1TooLong));
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Err(Error::V1TooLong));
        // One octet shorter with its CRLF is the longest line there is.
        long.truncate(V1_MAX - 2);
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), done(V1_MAX, None));
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r";
        assert!(matches!(feed(line), Ok(Progress::NeedMore(1))));
        assert_eq!(parse(b""), Ok(Progress::NeedMore(15)));
        assert_eq!(parse(b"PROXY"), Ok(Progress::NeedMore(10)));
    }

    #[test]
    fn v2_tcp4_and_tcp6() {
        let h = v2_tcp4([203, 0, 113, 7], 40000, b"");
        assert_eq!(h.len(), 28);
        assert_eq!(parse(&h), done(28, Some("203.0.113.7:40000")));
        let mut block = vec![0x20, 0x01, 0x0d, 0xb8];
        block.resize(15, 0);
        block.push(1); // 2001:db8::1
        block.extend_from_slice(&[0; 16]);
        block.extend_from_slice(&[0x04, 0xd2, 0x03, 0xe3]); // 1234, 995
        let h = v2(0x21, 0x21, &block);
        assert_eq!(parse(&h), done(52, Some("[2001:db8::1]:1234")));
        // UDP is still an address.
        assert_eq!(
            parse(&v2(0x21, 0x22, &block)),
            done(52, Some("[2001:db8::1]:1234"))
        );
    }

    #[test]
    fn v2_reads_exactly_its_length() {
        let mut input = v2_tcp4([10, 0, 0, 1], 1, b"");
        input.extend_from_slice(b"\x16\x03\x01 ClientHello");
        let mut have = 0;
        loop {
            match parse(&input[..have]).unwrap() {
                Progress::NeedMore(n) => have += n,
                Progress::Done { consumed, .. } => {
                    assert_eq!((consumed, have), (28, 28));
                    break;
                }
            }
            assert!(have <= 28, "read past the header");
        }
        for cut in 0..28 {
            assert!(matches!(parse(&input[..cut]), Ok(Progress::NeedMore(_))));
        }
    }

    #[test]
    fn v2_tlvs_are_skipped_but_must_fit() {
        // PP2_TYPE_AUTHORITY "pop.example.com", PP2_TYPE_NOOP with 3 octets, an empty custom one.
        let mut tlvs = vec![0x02, 0, 15];
        tlvs.extend_from_slice(b"pop.example.com");
        tlvs.extend_from_slice(&[0x04, 0, 3, 0, 0, 0, 0xe0, 0, 0]);
        let h = v2_tcp4([198, 51, 100, 9], 5, &tlvs);
        assert_eq!(parse(&h), done(h.len(), Some("198.51.100.9:5")));
        for bad in [&[0x04, 0, 4, 0, 0, 0][..], &[0x04, 0], &[0x04]] {
            let h = v2_tcp4([198, 51, 100, 9], 5, bad);
            assert_eq!(parse(&h), Err(Error::V2Tlv), "{bad:?}");
        }
    }

    #[test]
    fn v2_local_unspec_and_unix_keep_the_peer_address() {
        // LOCAL: a health check; whatever family and block, ignored.
        assert_eq!(parse(&v2(0x20, 0x00, b"")), done(16, None));
        assert_eq!(parse(&v2(0x20, 0x11, &[1, 2, 3])), done(19, None));
        assert_eq!(parse(&v2(0x20, 0xff, &[0; 40])), done(56, None));
        // PROXY with UNSPEC: the addresses mean nothing.
        assert_eq!(parse(&v2(0x21, 0x00, &[9; 7])), done(23, None));
        // AF_UNIX (108 + 108 octets): no IP address to log.
        let mut block = vec![0u8; 216];
        block[..9].copy_from_slice(b"/run/x.sk");
        assert_eq!(parse(&v2(0x21, 0x31, &block)), done(232, None));
        assert_eq!(parse(&v2(0x21, 0x32, &block)), done(232, None));
        assert_eq!(
            parse(&v2(0x21, 0x31, &block[..100])),
            Err(Error::V2Length {
                family: 0x31,
                len: 100
            })
        );
    }

    #[test]
    fn v2_malformed() {
        let good = v2_tcp4([10, 0, 0, 1], 1, b"");
        let mut h = good.clone();
        h[12] = 0x11;
        assert_eq!(parse(&h), Err(Error::V2Version(1)));
        h[12] = 0x22;
        assert_eq!(parse(&h), Err(Error::V2Command(2)));
        h[12] = 0x21;
        for fam in [0x01, 0x10, 0x13, 0x41, 0xff] {
            h[13] = fam;
            assert_eq!(parse(&h), Err(Error::V2Family(fam)));
        }
        // Too short for the family: refused before waiting for the block.
        let h = v2(0x21, 0x11, &[0; 11]);
        assert_eq!(
            parse(&h[..16]),
            Err(Error::V2Length {
                family: 0x11,
                len: 11
            })
        );
        let h = v2(0x21, 0x21, &[0; 12]);
        assert_eq!(
            parse(&h[..16]),
            Err(Error::V2Length {
                family: 0x21,
                len: 12
            })
        );
        // A bad signature, wherever the first wrong octet is.
        for i in 0..12 {
            let mut h = good.clone();
            h[i] ^= 0x40;
            assert_eq!(parse(&h), Err(Error::NotProxy), "octet {i}");
            assert_eq!(parse(&h[..=i]), Err(Error::NotProxy), "octet {i}");
        }
        // Truncated: still waiting, never a guess.
        for cut in 0..good.len() {
            assert!(matches!(parse(&good[..cut]), Ok(Progress::NeedMore(_))));
        }
        assert_eq!(parse(&good[..16]), Ok(Progress::NeedMore(12)));
        assert_eq!(parse(&good[..3]), Ok(Progress::NeedMore(13)));
        // The longest header there is.
        let h = v2(0x21, 0x11, &{
            let mut b = vec![0; 12];
            b.extend_from_slice(&[0xf0, 0xff, 0xf0]);
            b.resize(65535, 0);
            b
        });
        assert_eq!(parse(&h), done(16 + 65535, Some("0.0.0.0:0")));
    }

    #[test]
    fn cidr_parsing() {
        let c = |s: &str| s.parse::<Cidr>();
        assert_eq!(c("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(c("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert_eq!(c("::1").unwrap().to_string(), "::1/128");
        assert_eq!(c("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert_eq!(c("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(c("::/0").unwrap().to_string(), "::/0");
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0/8",
            "host.example/32",
            "",
            "010.0.0.0/8",
        ] {
            assert!(c(bad).is_err(), "{bad}");
        }
        let e = c("192.168.1.10/24").unwrap_err();
        assert!(e.contains("192.168.1.0/24"), "{e}");
        assert!(c("2001:db8::1/32").unwrap_err().contains("2001:db8::/32"));
        assert_eq!(
            parse_list("10.0.0.0/8, 2001:db8::/32").unwrap(),
            vec![c("10.0.0.0/8").unwrap(), c("2001:db8::/32").unwrap()]
        );
        assert!(parse_list("10.0.0.0/8,").is_err());
        assert!(parse_list("").is_err());
    }

    #[test]
    fn cidr_matching() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let nets = parse_list("10.0.0.0/8,192.0.2.128/25,2001:db8::/32,127.0.0.1").unwrap();
        for yes in [
            "10.0.0.0",
            "10.255.255.255",
            "192.0.2.128",
            "192.0.2.255",
            "2001:db8::1",
            "2001:db8:ffff::",
            "127.0.0.1",
            // IPv4 clients of a dual-stack socket.
            "::ffff:10.1.2.3",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_trusted(&nets, ip(yes)), "{yes}");
        }
        for no in [
            "11.0.0.0",
            "9.255.255.255",
            "192.0.2.127",
            "2001:db9::",
            "127.0.0.2",
            "::1",
            // Only IPv4-mapped addresses count as IPv4; not the old compatible form, nor NAT64.
            "::10.1.2.3",
            "64:ff9b::10.1.2.3",
        ] {
            assert!(!is_trusted(&nets, ip(no)), "{no}");
        }
        let any4 = parse_list("0.0.0.0/0").unwrap();
        assert!(is_trusted(&any4, ip("203.0.113.1")));
        assert!(is_trusted(&any4, ip("::ffff:203.0.113.1")));
        assert!(!is_trusted(&any4, ip("2001:db8::1")));
        let mapped = parse_list("::ffff:0:0/96").unwrap();
        assert!(is_trusted(&mapped, ip("203.0.113.1")));
        assert!(!is_trusted(&mapped, ip("2001:db8::1")));
        assert!(is_trusted(&parse_list("::/0").unwrap(), ip("1.2.3.4")));
        assert!(!is_trusted(&[], ip("127.0.0.1")));
    }
}
