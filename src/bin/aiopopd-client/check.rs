//! The check session: which commands go out in which order, what each reply must say, and the
//! transcript (`>>> COMMAND`, `<<< reply`, `*** note`). It runs over any [`Transport`], so it
//! is tested with canned bytes; sockets and TLS live in `net`, framing in `wire`.
//!
//! Any failure ends the session on the spot, without QUIT: a POP3 server only commits DELEs
//! when QUIT succeeds, so a failed check never deletes mail.

use crate::args::{Auth, Config, Retr, Security};
use crate::meter::Meter;
use crate::password::Secret;
use crate::wire::{printable, Body, Conn, Reply};
use crate::Failure;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Instant;

/// A CAPA, LIST or UIDL reply longer than this is refused rather than held in memory.
const MAX_LISTING: usize = 64 * 1024 * 1024;
/// How much of a message's header the transcript shows at most.
const MAX_HEADER: usize = 64 * 1024;

/// A byte stream to the server that can switch to TLS in place.
pub trait Transport: Read + Write {
    /// Runs the TLS handshake on the connection (for `-s` before the greeting, for STLS after
    /// the server's +OK).
    fn start_tls(&mut self) -> Result<(), Failure>;
}

/// Runs the whole session; Ok when every step succeeded and every reply was well-formed. The
/// transcript goes to `out`; what was retrieved, and progress during RETR, to `meter`.
pub fn run<T: Transport>(
    transport: &mut T,
    config: &Config,
    password: &Secret,
    out: &mut dyn Write,
    meter: &mut Meter,
) -> Result<(), Failure> {
    let mut session = Session {
        conn: Conn::new(transport),
        out,
        meter,
    };
    session.run(config, password)
}

struct Session<'a, T> {
    conn: Conn<&'a mut T>,
    out: &'a mut dyn Write,
    meter: &'a mut Meter,
}

impl<T: Transport> Session<'_, T> {
    fn run(&mut self, config: &Config, password: &Secret) -> Result<(), Failure> {
        if config.security == Security::Implicit {
            self.start_tls()?;
        }
        let greeting = self.conn.status().map_err(|e| context("greeting", e))?;
        self.print(&format!("<<< {}", printable(&greeting.line)))?;
        if !greeting.ok {
            return Err(Failure(format!(
                "the server refused the session: {}",
                printable(&greeting.line)
            )));
        }
        self.capa()?;
        if config.security == Security::Stls {
            self.ok(b"STLS", "STLS")?;
            // Bytes already here arrived in plaintext after the +OK: reading them as if TLS
            // protected them is the STARTTLS injection bug (CVE-2011-0411 and kin).
            let early = self.conn.buffered();
            if early > 0 {
                return Err(Failure(format!(
                    "STLS: the server sent {early} more octets after its +OK, before TLS began"
                )));
            }
            self.start_tls()?;
            // RFC 2595 §4: what was said before TLS can't be trusted; ask again.
            self.capa()?;
        }
        self.login(config, password)?;
        let (count, total) = self.stat()?;
        let sizes = self.list(count, total)?;
        self.uidl(sizes.len())?;

        let targets: Vec<u32> = match &config.retr {
            Retr::First if sizes.is_empty() => vec![],
            Retr::First => vec![1],
            Retr::All => (1..=sizes.len() as u32).collect(),
            Retr::These(numbers) => numbers.clone(),
        };
        if targets.is_empty() {
            self.print("*** the maildrop is empty: nothing to RETR")?;
        }
        for &msg in &targets {
            let Some(&listed) = sizes.get(msg as usize - 1) else {
                return Err(Failure(format!(
                    "--retr {msg}: the server lists only {} messages",
                    sizes.len()
                )));
            };
            self.retr(msg, listed)?;
        }
        if config.delete {
            for &msg in &targets {
                let command = format!("DELE {msg}");
                self.ok(command.as_bytes(), &command)?;
            }
        }
        self.ok(b"NOOP", "NOOP")?;
        if !config.delete {
            self.ok(b"RSET", "RSET")?;
        }
        self.ok(b"QUIT", "QUIT")?;
        self.print("*** check passed: every step succeeded and every reply was well-formed")
    }

    /// The transcript already says whether this is `-s` or STLS; the failure needs no context.
    fn start_tls(&mut self) -> Result<(), Failure> {
        self.conn.stream_mut().start_tls()?;
        self.print("*** TLS started")
    }

    /// CAPA is optional (RFC 2449), so -ERR is fine; its lines are only shown.
    fn capa(&mut self) -> Result<(), Failure> {
        if self.command(b"CAPA", "CAPA")?.ok {
            self.lines("CAPA")?;
        } else {
            self.print("*** no CAPA: the server predates RFC 2449, which is allowed")?;
        }
        Ok(())
    }

    fn login(&mut self, config: &Config, password: &Secret) -> Result<(), Failure> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let reply = match config.auth {
            Auth::UserPass => {
                let user = format!("USER {}", config.user);
                self.ok(user.as_bytes(), &user)?;
                let mut line = [b"PASS ", password.expose()].concat();
                let reply = self.command(&line, "PASS ...");
                line.fill(0);
                reply?
            }
            Auth::Plain => {
                let mut creds = [b"\0", config.user.as_bytes(), b"\0", password.expose()].concat();
                let mut line = format!("AUTH PLAIN {}", b64.encode(&creds)).into_bytes();
                creds.fill(0);
                let reply = self.command(&line, "AUTH PLAIN ...");
                line.fill(0);
                reply?
            }
            Auth::CramMd5 => {
                self.print(">>> AUTH CRAM-MD5")?;
                self.conn
                    .send(b"AUTH CRAM-MD5")
                    .map_err(|e| context("AUTH CRAM-MD5", e))?;
                let challenge = match self.conn.challenge_or_status()? {
                    Ok(c) => c,
                    Err(reply) => {
                        return Err(Failure(format!(
                            "AUTH CRAM-MD5: the server refused: {}",
                            printable(&reply.line)
                        )))
                    }
                };
                self.print(&format!("<<< + (challenge {})", printable(&challenge)))?;
                let digest = hmac_md5(password.expose(), &challenge);
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                let answer = b64.encode(format!("{} {hex}", config.user));
                self.command(answer.as_bytes(), "(CRAM-MD5 answer: user name and digest)")?
            }
        };
        if !reply.ok {
            return Err(Failure(format!(
                "the server refused the login: {}",
                printable(&reply.line)
            )));
        }
        Ok(())
    }

    /// STAT: `+OK count octets`, where anything after a further space is allowed (RFC 1939 §5).
    fn stat(&mut self) -> Result<(u64, u64), Failure> {
        let reply = self.ok(b"STAT", "STAT")?;
        let f = fields(reply.text());
        match (number(f[0]), f.get(1).and_then(|s| number(s))) {
            (Some(count), Some(octets)) => Ok((count, octets)),
            _ => Err(Failure(format!(
                "STAT: expected \"+OK count octets\", got {}",
                printable(&reply.line)
            ))),
        }
    }

    /// LIST: one `msg octets` line per message, numbered 1, 2, ... (nothing is deleted yet),
    /// agreeing with STAT. Returns the sizes; message n's is at n-1.
    fn list(&mut self, count: u64, total: u64) -> Result<Vec<u64>, Failure> {
        self.ok(b"LIST", "LIST")?;
        let mut sizes = Vec::new();
        for (i, line) in self.lines("LIST")?.iter().enumerate() {
            let f = fields(line);
            let (Some(msg), Some(size)) = (number(f[0]), f.get(1).and_then(|s| number(s))) else {
                return Err(Failure(format!(
                    "LIST: line {} is not \"msg octets\": {}",
                    i + 1,
                    printable(line)
                )));
            };
            if msg != i as u64 + 1 {
                return Err(Failure(format!(
                    "LIST: line {} lists message {msg}, expected {}",
                    i + 1,
                    i + 1
                )));
            }
            sizes.push(size);
        }
        if sizes.len() as u64 != count {
            return Err(Failure(format!(
                "LIST shows {} messages but STAT said {count}",
                sizes.len()
            )));
        }
        let sum: u64 = sizes.iter().sum();
        if sum != total {
            return Err(Failure(format!(
                "LIST's sizes add up to {sum} octets but STAT said {total}"
            )));
        }
        Ok(sizes)
    }

    /// UIDL: one `msg uid` line per listed message; a UID is 1 to 70 printable ASCII
    /// characters and unique in the maildrop (RFC 1939 §7).
    fn uidl(&mut self, count: usize) -> Result<(), Failure> {
        self.ok(b"UIDL", "UIDL")?;
        let lines = self.lines("UIDL")?;
        let mut seen = HashSet::new();
        for (i, line) in lines.iter().enumerate() {
            let bad =
                |why: &str| Failure(format!("UIDL: line {} {why}: {}", i + 1, printable(line)));
            let f = fields(line);
            let [msg, uid] = f[..] else {
                return Err(bad("is not \"msg uid\""));
            };
            if number(msg) != Some(i as u64 + 1) {
                return Err(bad(&format!("should be for message {}", i + 1)));
            }
            if uid.is_empty() || uid.len() > 70 || !uid.iter().all(|b| (0x21..=0x7e).contains(b)) {
                return Err(bad(
                    "has a UID that isn't 1 to 70 printable ASCII characters",
                ));
            }
            if !seen.insert(uid) {
                return Err(bad("repeats a UID"));
            }
        }
        if lines.len() != count {
            return Err(Failure(format!(
                "UIDL shows {} messages but LIST showed {count}",
                lines.len()
            )));
        }
        Ok(())
    }

    /// RETR: shows the header only, and checks the octet count against LIST (and against the
    /// `+OK N octets` that many servers put in the status line).
    fn retr(&mut self, msg: u32, listed: u64) -> Result<(), Failure> {
        let command = format!("RETR {msg}");
        self.meter.retr_started(msg, listed, Instant::now());
        let reply = self.ok(command.as_bytes(), &command).inspect_err(|_| {
            self.meter.retr_ended(false, Instant::now());
        })?;
        let mut header = Header::default();
        let meter = &mut *self.meter;
        let body = self.conn.multiline(&mut |chunk: &[u8]| {
            header.push(chunk);
            meter.retr_octets(chunk.len(), Instant::now());
            Ok(())
        });
        // Counted only if it checks out below; the progress line goes either way.
        let whole = body
            .as_ref()
            .is_ok_and(|b: &Body| b.octets == listed || b.octets == listed + 2);
        self.meter.retr_ended(whole, Instant::now());
        let body = body.map_err(|e| context(&command, e))?;
        for line in header.bytes.split(|&b| b == b'\n') {
            if !line.is_empty() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                self.print(&format!("<<< {}", printable(line)))?;
            }
        }
        if header.truncated {
            self.print(&format!(
                "*** (header longer than {MAX_HEADER} octets: cut short)"
            ))?;
        }
        self.print(&format!(
            "*** (body not shown; {} octets in {} lines in all)",
            body.octets, body.lines
        ))?;
        self.print("<<< .")?;
        // A message without a final line end gets one from POP3's framing (Dovecot and
        // aiopopd both add CRLF), so it arrives 2 octets longer than its listed size.
        if body.octets == listed + 2 {
            self.print("*** (2 octets more than listed: the message lacked a final line end)")?;
        } else if body.octets != listed {
            return Err(Failure(format!(
                "server sent {} octets for message {msg} but LIST said {listed}",
                body.octets
            )));
        }
        let f = fields(reply.text());
        if let (Some(announced), Some(b"octets")) = (number(f[0]), f.get(1).copied()) {
            if announced != body.octets && announced + 2 != body.octets {
                return Err(Failure(format!(
                    "{command}: the status line says {announced} octets but the server sent {}",
                    body.octets
                )));
            }
        }
        Ok(())
    }

    /// Sends a command and reads its status line, showing both; `shown` is what the transcript
    /// says was sent.
    fn command(&mut self, line: &[u8], shown: &str) -> Result<Reply, Failure> {
        self.print(&format!(">>> {shown}"))?;
        self.conn.send(line).map_err(|e| context(shown, e))?;
        let reply = self.conn.status().map_err(|e| context(shown, e))?;
        self.print(&format!("<<< {}", printable(&reply.line)))?;
        Ok(reply)
    }

    /// A command that must succeed.
    fn ok(&mut self, line: &[u8], shown: &str) -> Result<Reply, Failure> {
        let reply = self.command(line, shown)?;
        if !reply.ok {
            return Err(Failure(format!(
                "{shown}: the server answered {}",
                printable(&reply.line)
            )));
        }
        Ok(reply)
    }

    /// Reads and shows the data lines of a multi-line reply (CAPA, LIST, UIDL).
    fn lines(&mut self, shown: &str) -> Result<Vec<Vec<u8>>, Failure> {
        let mut data = Vec::new();
        self.conn
            .multiline(&mut |chunk: &[u8]| {
                if data.len() + chunk.len() > MAX_LISTING {
                    return Err(Failure(format!(
                        "the reply is longer than {MAX_LISTING} octets"
                    )));
                }
                data.extend_from_slice(chunk);
                Ok(())
            })
            .map_err(|e| context(shown, e))?;
        // Every line ends in CRLF: the un-stuffer refuses bare LFs.
        let lines: Vec<Vec<u8>> = data
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
            .collect();
        for line in &lines {
            self.print(&format!("<<< {}", printable(line)))?;
        }
        self.print("<<< .")?;
        Ok(lines)
    }

    fn print(&mut self, line: &str) -> Result<(), Failure> {
        writeln!(self.out, "{line}")
            .map_err(|e| Failure(format!("cannot write the transcript: {e}")))
    }
}

fn context(what: &str, e: Failure) -> Failure {
    Failure(format!("{what}: {e}"))
}

/// Space-separated fields; never empty (an empty text gives one empty field).
fn fields(text: &[u8]) -> Vec<&[u8]> {
    text.split(|&b| b == b' ').collect()
}

/// Digits only: no sign, no spaces.
fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// The header of a message as it streams by: everything before the first empty line.
#[derive(Default)]
struct Header {
    bytes: Vec<u8>,
    done: bool,
    truncated: bool,
}

impl Header {
    fn push(&mut self, chunk: &[u8]) {
        if self.done {
            return;
        }
        let from = self.bytes.len().saturating_sub(3);
        self.bytes.extend_from_slice(chunk);
        let end = if self.bytes.starts_with(b"\r\n") {
            Some(0)
        } else {
            self.bytes[from..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|i| from + i + 2)
        };
        if let Some(end) = end {
            self.bytes.truncate(end);
            self.done = true;
        } else if self.bytes.len() > MAX_HEADER {
            self.bytes.truncate(MAX_HEADER);
            self.done = true;
            self.truncated = true;
        }
    }
}

/// HMAC-MD5 (RFC 2104), the CRAM-MD5 digest.
fn hmac_md5(key: &[u8], message: &[u8]) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..16].copy_from_slice(&Md5::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad = k.map(|b| b ^ 0x36);
    let opad = k.map(|b| b ^ 0x5c);
    let inner = Md5::new()
        .chain_update(ipad)
        .chain_update(message)
        .finalize();
    Md5::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hmac_md5_matches_rfc_2195() {
        let d = super::hmac_md5(
            b"tanstaaftanstaaf",
            b"<1896.697170952@postoffice.reston.mci.net>",
        );
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "b913a602c7eda7a495b4e6e7334d3890");
    }

    use super::*;
    use crate::args::tests::parse_ok;
    use std::collections::VecDeque;

    /// A lock-step server: the greeting, then one canned reply per command line received.
    /// What the client sends is recorded.
    struct Canned {
        replies: VecDeque<Vec<u8>>,
        owed: usize,
        pending: Vec<u8>,
        sent: Vec<u8>,
        tls: bool,
    }

    impl Read for Canned {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.pending.is_empty() && self.owed > 0 {
                self.owed -= 1;
                self.pending = self.replies.pop_front().unwrap_or_default();
            }
            let n = buf.len().min(self.pending.len());
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            Ok(n)
        }
    }

    impl Write for Canned {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.owed += buf.iter().filter(|&&b| b == b'\n').count();
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Transport for Canned {
        fn start_tls(&mut self) -> Result<(), Failure> {
            self.tls = true;
            Ok(())
        }
    }

    struct Outcome {
        result: Result<(), Failure>,
        sent: String,
        transcript: String,
        tls: bool,
    }

    /// Runs the client with `args` (and `-u alice`, password `s3cret`) against the canned
    /// replies.
    fn session<S: AsRef<str>>(args: &[&str], replies: &[S]) -> Outcome {
        let mut all = vec!["-u", "alice"];
        all.extend_from_slice(args);
        let config = parse_ok(&all);
        let password = crate::password::secret(b"s3cret".to_vec(), "test").unwrap();
        let mut canned = Canned {
            replies: replies
                .iter()
                .map(|r| r.as_ref().as_bytes().to_vec())
                .collect(),
            owed: 1,
            pending: Vec::new(),
            sent: Vec::new(),
            tls: false,
        };
        let mut out = Vec::new();
        let result = run(
            &mut canned,
            &config,
            &password,
            &mut out,
            &mut Meter::new(None),
        );
        Outcome {
            result,
            sent: String::from_utf8(canned.sent).unwrap(),
            transcript: String::from_utf8(out).unwrap(),
            tls: canned.tls,
        }
    }

    /// Message 1 as sent (one stuffed line); 51 octets once un-stuffed.
    const MSG1: &str = "Subject: one\r\nFrom: a@example.org\r\n\r\nbody 1\r\n..dot\r\n";

    /// Greeting, CAPA, USER, PASS, STAT, LIST, UIDL for two messages of `size1` and 10 octets.
    fn up_to_retr(size1: usize) -> Vec<String> {
        vec![
            "+OK ready\r\n".into(),
            "+OK\r\nUSER\r\nUIDL\r\n.\r\n".into(),
            "+OK\r\n".into(),
            "+OK logged in\r\n".into(),
            format!("+OK 2 {}\r\n", size1 + 10),
            format!("+OK\r\n1 {size1}\r\n2 10\r\n.\r\n"),
            "+OK\r\n1 uid-1\r\n2 uid-2\r\n.\r\n".into(),
        ]
    }

    fn with(mut replies: Vec<String>, more: &[&str]) -> Vec<String> {
        replies.extend(more.iter().map(|s| s.to_string()));
        replies
    }

    #[test]
    fn default_session() {
        let retr = format!("+OK 51 octets\r\n{MSG1}.\r\n");
        let s = session(
            &[],
            &with(
                up_to_retr(51),
                &[&retr, "+OK\r\n", "+OK\r\n", "+OK bye\r\n"],
            ),
        );
        assert_eq!(s.result, Ok(()), "{}", s.transcript);
        assert!(!s.tls);
        assert_eq!(
            s.sent,
            "CAPA\r\nUSER alice\r\nPASS s3cret\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\n\
             NOOP\r\nRSET\r\nQUIT\r\n"
        );
        let expected = "\
<<< +OK ready
>>> CAPA
<<< +OK
<<< USER
<<< UIDL
<<< .
>>> USER alice
<<< +OK
>>> PASS ...
<<< +OK logged in
>>> STAT
<<< +OK 2 61
>>> LIST
<<< +OK
<<< 1 51
<<< 2 10
<<< .
>>> UIDL
<<< +OK
<<< 1 uid-1
<<< 2 uid-2
<<< .
>>> RETR 1
<<< +OK 51 octets
<<< Subject: one
<<< From: a@example.org
*** (body not shown; 51 octets in 5 lines in all)
<<< .
>>> NOOP
<<< +OK
>>> RSET
<<< +OK
>>> QUIT
<<< +OK bye
*** check passed: every step succeeded and every reply was well-formed
";
        assert_eq!(s.transcript, expected);
    }

    #[test]
    fn delete_all_sends_dele_and_no_rset() {
        let replies = with(
            up_to_retr(3),
            &[
                "+OK\r\na\r\n.\r\n",
                "+OK\r\nbbbbbbbb\r\n.\r\n",
                "+OK\r\n",
                "+OK\r\n",
                "+OK\r\n",
                "+OK\r\n",
            ],
        );
        let s = session(&["-d", "--all"], &replies);
        assert_eq!(s.result, Ok(()), "{}", s.transcript);
        assert!(
            s.sent
                .ends_with("RETR 1\r\nRETR 2\r\nDELE 1\r\nDELE 2\r\nNOOP\r\nQUIT\r\n"),
            "{}",
            s.sent
        );
    }

    #[test]
    fn size_mismatches_are_failures() {
        let s = session(&[], &with(up_to_retr(3), &["+OK\r\nab\r\n.\r\n"]));
        assert_eq!(
            s.result.unwrap_err().0,
            "server sent 4 octets for message 1 but LIST said 3"
        );
        assert!(!s.sent.contains("QUIT"), "a failed check never commits");

        let s = session(&[], &with(up_to_retr(3), &["+OK 5 octets\r\na\r\n.\r\n"]));
        assert_eq!(
            s.result.unwrap_err().0,
            "RETR 1: the status line says 5 octets but the server sent 3"
        );

        let mut replies = up_to_retr(3);
        replies[4] = "+OK 2 14\r\n".into();
        let s = session(&[], &replies);
        assert_eq!(
            s.result.unwrap_err().0,
            "LIST's sizes add up to 13 octets but STAT said 14"
        );
    }

    #[test]
    fn listing_faults() {
        let cases = [
            (4, "+OK two\r\n", "STAT: expected"),
            (
                5,
                "+OK\r\n1 3\r\n3 10\r\n.\r\n",
                "LIST: line 2 lists message 3",
            ),
            (5, "+OK\r\n1 3\r\n2 ten\r\n.\r\n", "LIST: line 2 is not"),
            (6, "+OK\r\n1 uid-1\r\n2 uid-1\r\n.\r\n", "repeats a UID"),
            (
                6,
                "+OK\r\n1 uid-1\r\n2 uid 2\r\n.\r\n",
                "is not \"msg uid\"",
            ),
            (6, "+OK\r\n1 uid-1\r\n.\r\n", "UIDL shows 1 messages"),
            (
                6,
                "-ERR no UIDL\r\n",
                "UIDL: the server answered -ERR no UIDL",
            ),
        ];
        for (i, bad, expected) in cases {
            let mut replies = up_to_retr(3);
            replies[i] = bad.into();
            let e = session(&[], &replies).result.unwrap_err();
            assert!(e.0.contains(expected), "{bad:?}: {e}");
        }
    }

    #[test]
    fn refusals_are_failures() {
        let e = session(&[], &["-ERR go away\r\n"]).result.unwrap_err();
        assert_eq!(e.0, "the server refused the session: -ERR go away");
        let s = session(
            &[],
            &["+OK\r\n", "-ERR\r\n", "+OK\r\n", "-ERR [AUTH] no\r\n"],
        );
        assert_eq!(
            s.result.unwrap_err().0,
            "the server refused the login: -ERR [AUTH] no"
        );
        assert!(s.transcript.contains("*** no CAPA"), "{}", s.transcript);
        assert!(!s.transcript.contains("s3cret"));
        let e = session(&["--retr", "3"], &up_to_retr(3))
            .result
            .unwrap_err();
        assert_eq!(e.0, "--retr 3: the server lists only 2 messages");
        let e = session(&[], &["+OK\r\n", "+OK\r\n"]).result.unwrap_err();
        assert!(e.0.starts_with("CAPA: the server closed"), "{e}");
    }

    #[test]
    fn stls_asks_capa_again_and_refuses_early_bytes() {
        let replies = [
            "+OK\r\n",
            "+OK\r\nSTLS\r\n.\r\n",
            "+OK go\r\n",
            "+OK\r\nUSER\r\n.\r\n",
            "+OK\r\n",
            "+OK\r\n",
            "+OK 0 0\r\n",
            "+OK\r\n.\r\n",
            "+OK\r\n.\r\n",
            "+OK\r\n",
            "+OK\r\n",
            "+OK\r\n",
        ];
        let s = session(&["--stls"], &replies);
        assert_eq!(s.result, Ok(()), "{}", s.transcript);
        assert!(s.tls);
        assert!(
            s.sent.starts_with("CAPA\r\nSTLS\r\nCAPA\r\nUSER alice\r\n"),
            "{}",
            s.sent
        );
        assert!(s.transcript.contains("*** TLS started"));
        assert!(s.transcript.contains("*** the maildrop is empty"));

        let s = session(&["--stls"], &["+OK\r\n", "-ERR\r\n", "+OK go\r\n+OK\r\n"]);
        assert_eq!(
            s.result.unwrap_err().0,
            "STLS: the server sent 5 more octets after its +OK, before TLS began"
        );
        assert!(!s.tls);
    }

    #[test]
    fn implicit_tls_starts_before_the_greeting() {
        let s = session(&["-s"], &["-ERR\r\n"]);
        assert!(s.tls);
        assert!(s.transcript.starts_with("*** TLS started\n<<< -ERR"));
    }

    #[test]
    fn header_stops_at_the_blank_line() {
        let mut h = Header::default();
        for b in b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\n" {
            h.push(&[*b]);
        }
        assert_eq!(h.bytes, b"A: 1\r\nB: 2\r\n");
        let mut h = Header::default();
        h.push(b"\r\nno header\r\n");
        assert!(h.bytes.is_empty());
    }
}
