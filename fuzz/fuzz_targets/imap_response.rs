//! aiopopd's IMAP client (`src/imap/`): its decoder and its driver, from whatever a broken or
//! hostile server (or someone on a clear-text link) sends.
//!
//! The first byte picks the command and how the server's bytes arrive (piece size); the rest is
//! the server's side. Whatever it is, the client must not panic, must keep to its bounds (what it
//! holds for a response, entries listed, a SASL challenge relayed), must not invent octets (a
//! body is never longer than what the server sent or what was asked), and must leave the body
//! buffer untouched when it says the message is gone. Fetches sent ahead and taken out of order
//! are part of it.
#![no_main]

use aiopopd::imap::client::{Client, Transport};
use aiopopd::imap::proto::{Decoder, MAX_CHALLENGE, MAX_LINE, MAX_LITERAL};
use aiopopd::secret::Secret;
use libfuzzer_sys::fuzz_target;
use std::io::{self, Read, Write};
use std::time::Duration;

/// The server side in memory: its bytes handed out `piece` at a time; our commands discarded.
/// Its end reads as a timeout, as a silent server's would.
struct Server<'a> {
    input: &'a [u8],
    piece: usize,
}

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.piece.min(buf.len()).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Server<'_> {
    fn set_read_timeout(&mut self, _: Duration) -> io::Result<()> {
        Ok(())
    }
}

/// The most the client may hold at any time: its read buffer, one response's text and
/// non-body literals (Vec growth may double them), the bodies asked for.
fn bound(asked: u64) -> usize {
    (64 << 10) + 2 * MAX_LINE + 2 * MAX_LITERAL as usize + 2 * asked as usize
}

fuzz_target!(|data: &[u8]| {
    let [how, server @ ..] = data else { return };
    let piece = usize::from(how >> 3) * 37 + 1;
    let mut c = Client::new(
        Server {
            input: server,
            piece,
        },
        Duration::from_secs(1),
    );
    match how & 7 {
        0 | 1 => {
            // Two fetches in a row on one stream, as a RETR of two chunks does; with 1, three
            // fetches sent ahead first (after a RETR), taken out of order, then another command.
            if how & 7 == 1 {
                c.prefetch(16, 64, 16, &mut [(8, 16), (7, 16), (9, 16)].into_iter());
            }
            for (uid, offset) in [(7u32, 0u64), (7, 16), (8, 0)] {
                let mut out = b"kept".to_vec();
                match c.fetch_body(uid, offset, 16, &mut out) {
                    Ok(true) => {
                        assert!(out.len() - 4 <= server.len(), "octets out of nowhere");
                        assert!(out.len() - 4 <= 16, "more than asked");
                    }
                    Ok(false) => assert_eq!(out, b"kept", "a gone message left octets"),
                    Err(_) => break,
                }
                assert!(out.starts_with(b"kept"), "earlier octets overwritten");
                assert!(c.held() <= bound(3 * 16 + 64));
            }
            let _ = c.capabilities();
        }
        2 => {
            if let Ok(caps) = c.capabilities() {
                assert!(caps.iter().all(|c| !c.contains(' ')));
            }
        }
        3 => {
            if let Ok(l) = c.list(1000, &["\\Seen"], Some("X-GUID"), 10, &|_| true) {
                assert!(l.entries.len() <= 10, "more entries than asked");
                assert_eq!(l.ids.len(), l.entries.len(), "an id for every entry");
                assert!(l.left_out.len() <= 20);
                assert!(l.entries.iter().all(|e| e.uid > 0));
            }
            assert!(c.held() <= bound(0));
        }
        4 => {
            let _ = c.login("alice", &Secret::new(b"s3cret-pw".to_vec()));
        }
        5 => {
            // The decoder alone, with a body asked at origin 0.
            let mut d = Decoder::new();
            let room = |o: u64| (o == 0).then_some(100);
            for chunk in server.chunks(piece) {
                let mut rest = chunk;
                while !rest.is_empty() {
                    match d.feed(rest, &room) {
                        Ok((n, _)) => rest = &rest[n..],
                        Err(_) => return,
                    }
                    assert!(d.held() <= bound(100), "held {}", d.held());
                }
            }
        }
        6 => {
            if let Ok(s) = c.select(true, "INBOX") {
                let _ = s.permanent_flags;
            }
        }
        _ => {
            let mut asked = 0;
            let _ = c.authenticate("CRAM-MD5", None, &mut |challenge| {
                assert!(
                    challenge.len() <= MAX_CHALLENGE,
                    "a challenge past the bound relayed"
                );
                asked += 1;
                (asked < 3).then(|| b"answer".to_vec())
            });
        }
    }
});
