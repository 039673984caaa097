//! The benchmark's mail: deterministic plain-text messages of a chosen size, written straight
//! into a user's `Maildir/cur` before Dovecot first opens it (100,000 `doveadm save` calls would
//! take many minutes; files take seconds). Names carry `S=` (size on disk) and `W=` (the
//! CRLF size IMAP and POP3 report), so Dovecot never has to read a file to size it.

use crate::dovecot::Dovecot;
use std::fs;
use std::os::unix::fs::{chown, MetadataExt};
use std::path::Path;

/// A small xorshift generator: the same mail on every run, without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

const WORDS: &[&str] = &[
    "the",
    "mail",
    "server",
    "proxy",
    "message",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "POP3",
    "IMAP",
    "Dovecot",
    "maildrop",
    "octets",
    "line",
    "retrieve",
    "session",
    "client",
    "benchmark",
    "latency",
    "with",
    "for",
    "on",
    "as",
    "by",
    "this",
    "from",
    "at",
    "be",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "lorem",
    "ipsum",
    "dolor",
];

/// Message `n` of `size` octets as stored on disk (LF line ends, as Dovecot stores them).
/// About one body line in 40 starts with a dot, so dot-stuffing is exercised.
pub fn message(n: u64, size: usize) -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (n + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut m = format!(
        "Return-Path: <sender{n}@example.org>\n\
         From: Sender {n} <sender{n}@example.org>\n\
         To: Bench <bench@example.net>\n\
         Subject: Benchmark message {n}\n\
         Date: Mon, 2 Nov 2026 10:00:00 +0000\n\
         Message-ID: <{n}.bench@example.org>\n\
         MIME-Version: 1.0\n\
         Content-Type: text/plain; charset=us-ascii\n\
         \n"
    )
    .into_bytes();
    let mut line = Vec::with_capacity(80);
    while m.len() < size {
        line.clear();
        if rng.next().is_multiple_of(40) {
            line.push(b'.');
        }
        while line.len() < 60 {
            let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
            line.extend_from_slice(w.as_bytes());
            line.push(b' ');
        }
        line.pop();
        line.push(b'\n');
        let room = size - m.len();
        if line.len() > room {
            // Pad the last line to the exact size, keeping a final line end.
            line.truncate(room);
            if let Some(last) = line.last_mut() {
                *last = b'\n';
            }
        }
        m.extend_from_slice(&line);
    }
    m.truncate(size);
    m
}

/// The size IMAP's RFC822.SIZE and POP3 report: every LF counts as CRLF.
pub fn virtual_size(msg: &[u8]) -> u64 {
    msg.len() as u64 + msg.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Writes `messages` into each user's INBOX (Maildir/cur, unseen), then makes Dovecot index the
/// mailbox once (`doveadm mailbox status`) and checks the count. Must run before anything opens
/// these mailboxes. Returns the total virtual size of one copy.
pub fn fill(d: &Dovecot, users: &[&str], count: usize, make: impl Fn(u64) -> Vec<u8>) -> u64 {
    let dirs: Vec<_> = users.iter().map(|u| maildir(d, u)).collect();
    let mut total = 0;
    for i in 0..count as u64 {
        let msg = make(i);
        let vsize = virtual_size(&msg);
        total += vsize;
        // Dovecot orders new files by the time in their name, then by name.
        let name = format!(
            "{}.M{i:07}P1.bench,S={},W={vsize}:2,",
            1_700_000_000 + i,
            msg.len()
        );
        for (dir, owner) in &dirs {
            let path = dir.join("cur").join(&name);
            fs::write(&path, &msg).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            chown(&path, Some(owner.0), Some(owner.1)).expect("chown message");
        }
    }
    for user in users {
        let n: usize = d
            .mailbox_status(user, "INBOX", "messages")
            .parse()
            .expect("a message count");
        assert_eq!(n, count, "messages Dovecot sees in {user}'s INBOX");
    }
    total
}

/// Creates `Maildir/{cur,new,tmp}` owned like the home directory; returns it and that owner.
fn maildir(d: &Dovecot, user: &str) -> (std::path::PathBuf, (u32, u32)) {
    let home = d.home(user);
    let meta = fs::metadata(&home).expect("the user's home exists");
    let owner = (meta.uid(), meta.gid());
    let dir = d.maildir(user);
    assert!(
        !dir.join("cur").exists(),
        "{user}'s Maildir was created before the benchmark filled it"
    );
    for sub in ["", "cur", "new", "tmp"] {
        let p = dir.join(sub);
        fs::create_dir_all(&p).expect("mkdir Maildir");
        chown_dir(&p, owner);
    }
    (dir, owner)
}

fn chown_dir(p: &Path, owner: (u32, u32)) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(0o700)).expect("chmod Maildir");
    chown(p, Some(owner.0), Some(owner.1)).expect("chown Maildir");
}
