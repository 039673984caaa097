//! A whole POP3 session (`session::Session`) read through the real line reader (`conn::Conn`)
//! against an in-memory maildrop whose failures the input chooses.
//!
//! Input: four bytes of set-up (options, the mailbox, which fetch fails, the read size), one
//! byte per message for its size (up to 10 KB, or 60-360 KB for the top six values), then the
//! client's bytes. Whatever they are, the session must
//! not panic; it must send CRLF line ends only and never echo the password; and the maildrop
//! must be changed at most once, only after a QUIT, and only for UIDs it listed, each once.
#![no_main]

use aiopopd::conn::{Conn, Transport};
use aiopopd::maildrop::{Backend, Error, Maildrop, Message, SaslClient};
use aiopopd::secret::Secret;
use aiopopd::session::{Session, Settings};
use aiopopd::uidl::UidlFormat;
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;

/// The password of every user; the seeds (from tests/hostile/) log in with it.
const PASSWORD: &[u8] = b"alice-pw";

/// Octets the maildrop serves per run; then its fetches fail (as a dropped connection would), so
/// that an input of a thousand RETRs of a big message stays fast.
const BUDGET: usize = 1 << 20;

/// What the maildrop saw, shared with the test after the session.
#[derive(Default)]
struct Record {
    commits: Vec<Vec<u32>>,
    logins: usize,
    served: usize,
}

#[derive(Clone)]
struct Setup {
    messages: Rc<Vec<(u32, Vec<u8>)>>,
    /// The nth fetch (1-based) fails with a temporary error.
    fail_fetch: Option<usize>,
    /// This UID was expunged by another client.
    gone: Option<u32>,
    commit_fails: bool,
    relay: bool,
    record: Rc<RefCell<Record>>,
}

struct Drop {
    setup: Setup,
    listed: Vec<Message>,
    fetches: usize,
}

impl Backend for Setup {
    type Maildrop = Drop;

    fn login(&mut self, user: &str, password: &Secret) -> Result<Drop, Error> {
        self.record.borrow_mut().logins += 1;
        match user {
            "down" => return Err(Error::Temp("connection refused".into())),
            "inuse" => return Err(Error::InUse("locked".into())),
            "perm" => return Err(Error::Perm("no such mailbox".into())),
            _ => {}
        }
        if password.expose() != PASSWORD {
            return Err(Error::Auth("bad password".into()));
        }
        Ok(self.open())
    }

    /// Two rounds at most: "ok" logs in, "no" fails, anything else asks again.
    fn authenticate(
        &mut self,
        _mechanism: &str,
        initial: Option<Vec<u8>>,
        client: &mut dyn SaslClient,
    ) -> Result<Drop, Error> {
        if !self.relay {
            return Err(Error::Unsupported("the server doesn't offer it".into()));
        }
        self.record.borrow_mut().logins += 1;
        let mut answer = initial;
        for _ in 0..2 {
            let a = match answer.take() {
                Some(a) => a,
                None => client
                    .challenge(b"<1896.697170952@pop.test>")
                    .ok_or_else(|| Error::Auth("cancelled".into()))?,
            };
            match &a[..] {
                b"ok" => return Ok(self.open()),
                b"no" => return Err(Error::Auth("refused".into())),
                _ => {}
            }
        }
        Err(Error::Auth("too many rounds".into()))
    }
}

impl Setup {
    fn open(&self) -> Drop {
        Drop {
            setup: self.clone(),
            listed: self
                .messages
                .iter()
                .map(|(uid, body)| Message {
                    uid: *uid,
                    size: body.len() as u64,
                })
                .collect(),
            fetches: 0,
        }
    }
}

impl Maildrop for Drop {
    fn uidvalidity(&self) -> u32 {
        0x5eed
    }

    fn messages(&self) -> &[Message] {
        &self.listed
    }

    fn fetch(&mut self, uid: u32, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), Error> {
        self.fetches += 1;
        if self.setup.fail_fetch == Some(self.fetches) {
            return Err(Error::Temp("connection lost".into()));
        }
        if self.setup.gone == Some(uid) {
            return Err(Error::Gone);
        }
        if self.setup.record.borrow().served > BUDGET {
            return Err(Error::Temp("fuzzing budget spent".into()));
        }
        let body = &self
            .setup
            .messages
            .iter()
            .find(|(u, _)| *u == uid)
            .expect("the session asks only for listed UIDs")
            .1;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(body.len());
        let end = start
            .saturating_add(usize::try_from(len).unwrap_or(usize::MAX))
            .min(body.len());
        out.extend_from_slice(&body[start..end]);
        self.setup.record.borrow_mut().served += end - start;
        Ok(())
    }

    fn commit(&mut self, deleted: &[u32]) -> Result<Option<&'static str>, Error> {
        self.setup
            .record
            .borrow_mut()
            .commits
            .push(deleted.to_vec());
        if self.setup.commit_fails {
            Err(Error::Temp("BYE".into()))
        } else {
            Ok(None)
        }
    }

    fn logout(&mut self) {}
}

/// The client connection in memory: input handed out `piece` octets at a time, output kept.
struct Client<'a> {
    input: &'a [u8],
    piece: usize,
    output: Vec<u8>,
    secure: bool,
    stls: bool,
    /// At the end of the input, time out (a silent client) instead of closing.
    time_out: bool,
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() && self.time_out {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let n = self.piece.min(buf.len()).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Client<'_> {
    fn is_secure(&self) -> bool {
        self.secure
    }
    fn can_start_tls(&self) -> bool {
        self.stls && !self.secure
    }
    fn start_tls(&mut self) -> io::Result<()> {
        self.secure = true;
        Ok(())
    }
}

/// A message of about `size` octets with the shapes that matter: dot-lines, bare LF, lone CR,
/// no final line end.
fn message(i: usize, size: usize) -> Vec<u8> {
    let mut m = format!("Subject: m{i}\r\n\r\n").into_bytes();
    let mut n = 0;
    while m.len() < size {
        let line: &[u8] = match (n + i) % 6 {
            0 => b".dot\r\n",
            1 => b"bare lf\n",
            2 => b"cr\rinside\r\n",
            3 => b".\r\n",
            4 => b"\r\n",
            _ => b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n",
        };
        m.extend_from_slice(line);
        n += 1;
    }
    if i % 2 == 1 {
        m.extend_from_slice(b"no final line end");
    }
    m
}

/// Mostly small messages (fast), a few over `RETR_CHUNK` so that RETR takes several fetches.
fn message_size(byte: u8) -> usize {
    match byte {
        0..=249 => usize::from(byte) * 40,
        _ => usize::from(byte - 249) * 60_000,
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, mailbox, fail, piece, rest @ ..] = data else {
        return;
    };
    let n = usize::from(mailbox & 7).min(rest.len());
    let (sizes, input) = rest.split_at(n);
    let messages: Vec<(u32, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| (3 * i as u32 + 1, message(i, message_size(s))))
        .collect();
    let gone_index = usize::from(mailbox >> 3 & 7);
    let record = Rc::new(RefCell::new(Record::default()));
    let setup = Setup {
        gone: (gone_index > 0)
            .then(|| messages.get(gone_index - 1).map(|m| m.0))
            .flatten(),
        messages: Rc::new(messages),
        fail_fetch: (fail & 15 > 0).then_some(usize::from(fail & 15)),
        commit_fails: flags & 64 != 0,
        relay: flags & 8 != 0,
        record: record.clone(),
    };
    let uids: Vec<u32> = setup.messages.iter().map(|m| m.0).collect();
    let settings = Settings {
        hostname: "pop.test".into(),
        allow_plaintext_auth: flags & 1 != 0,
        uidl_format: UidlFormat::default(),
        // --sasl as an administrator would give it; with `relay` the server offers the
        // relayed mechanisms, else AUTH with one meets a server that doesn't.
        sasl: match (flags & 32 != 0, flags & 8 != 0) {
            (true, _) => Some(vec!["PLAIN".into(), "CRAM-MD5".into()]),
            (false, true) => Some(
                ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"]
                    .map(String::from)
                    .to_vec(),
            ),
            (false, false) => None,
        },
        auth_failure_delay: std::time::Duration::ZERO,
        login_timeout: std::time::Duration::from_secs(180),
    };
    let mut conn = Conn::new(Client {
        input,
        piece: usize::from(*piece) + 1,
        output: Vec::new(),
        secure: flags & 2 != 0,
        stls: flags & 4 != 0,
        time_out: flags & 16 != 0,
    });
    let summary = Session::new(setup, settings).run(&mut conn);
    let _ = conn.flush();
    let out = &conn.stream_mut().output;

    assert!(out.starts_with(b"+OK pop.test POP3 proxy ready.\r\n"));
    // A message cut off by a failing server ends where the data ended; all else is lines.
    if summary.outcome != "imap-failed-mid-message" {
        assert!(out.ends_with(b"\r\n"), "output ends mid-line");
    }
    for (i, &b) in out.iter().enumerate() {
        assert!(
            b != b'\n' || (i > 0 && out[i - 1] == b'\r'),
            "bare LF at {i}"
        );
    }
    assert!(
        !out.windows(PASSWORD.len()).any(|w| w == PASSWORD),
        "the password was echoed"
    );
    let record = record.borrow();
    assert!(record.commits.len() <= 1, "committed twice");
    if let Some(deleted) = record.commits.first() {
        let lower = input.to_ascii_lowercase();
        assert!(
            lower.windows(4).any(|w| w == b"quit"),
            "committed without QUIT"
        );
        let mut sorted = deleted.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), deleted.len(), "a UID deleted twice");
        assert!(deleted.iter().all(|u| uids.contains(u)), "an unlisted UID");
        assert!(!deleted.is_empty(), "an empty commit");
    }
    assert!(summary.deleted <= summary.listed);
});
