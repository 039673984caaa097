//! aiopopd's own reader of IMAP responses (`imapwire`): message bodies, capabilities and the
//! listing, from whatever a broken or hostile server (or someone on a clear-text link) sends.
//!
//! The first byte picks the command and how the server's bytes arrive (piece size); the rest is
//! the server's side. Whatever it is, the reader must not panic, must not invent octets (a body
//! is never longer than what the server sent), and must leave the body buffer untouched when it
//! says the message is gone. Fetches sent ahead and taken out of order are part of it.
#![no_main]

use aiopopd::imapwire::Shared;
use libfuzzer_sys::fuzz_target;
use std::io::{self, Read, Write};

/// The server side in memory: its bytes handed out `piece` at a time; our commands discarded.
struct Server<'a> {
    input: &'a [u8],
    piece: usize,
}

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
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

fuzz_target!(|data: &[u8]| {
    let [how, server @ ..] = data else { return };
    let piece = usize::from(how >> 2) * 37 + 1;
    let wire = Shared::new(Server {
        input: server,
        piece,
    });
    match how & 3 {
        0 | 1 => {
            // Two fetches in a row on one stream, as a RETR of two chunks does; with 1, three
            // fetches sent ahead first (after a RETR), taken out of order, then another command.
            if how & 3 == 1 {
                wire.prefetch(16, 64, 16, &mut [(8, 16), (7, 16), (9, 16)].into_iter());
            }
            for (uid, offset) in [(7u32, 0u64), (7, 16), (8, 0)] {
                let mut out = b"kept".to_vec();
                match wire.fetch_body(uid, offset, 16, &mut out) {
                    Ok(true) => assert!(out.len() - 4 <= server.len(), "octets out of nowhere"),
                    Ok(false) => assert_eq!(out, b"kept", "a gone message left octets"),
                    Err(_) => break,
                }
                assert!(out.starts_with(b"kept"), "earlier octets overwritten");
            }
            let _ = wire.capabilities();
        }
        2 => {
            if let Ok(caps) = wire.capabilities() {
                assert!(caps.iter().all(|c| !c.contains(' ')));
            }
        }
        _ => {
            let mut n = 0usize;
            let _ = wire.list(1000, &mut |_uid, _size, flags| {
                n += 1;
                assert!(!flags.contains(&b')'));
            });
            assert!(n <= server.len());
        }
    }
});
