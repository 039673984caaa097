//! `--uidl-format %m`: a digest of each message's header section, the same on any server that
//! serves the message's octets unchanged, so UIDLs survive a new UIDVALIDITY and a move to
//! another server. MD5 of the header section as the server serves it (through the first empty
//! line), in hex: 32 characters, fitting POP3's 70; MD5 because nothing here needs collision
//! resistance (a sender crafting two headers with one digest only makes two of its own
//! messages share a UIDL, which the session disambiguates anyway) and it is fast.
//!
//! Computing it needs each message's header once: a cache per user and mailbox under
//! `--state-dir` (the UIDVALIDITY, and UID → digest), written atomically, means a session
//! fetches headers only for messages it hasn't seen. A missing, stale or unreadable cache is
//! only slower, never wrong.

use super::client::{Client, Transport};
use crate::log;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Header octets fetched at first; a header longer than this is fetched on in chunks.
const HEADER_CHUNK: u64 = 16 << 10;
/// A header section longer than this is digested up to here (no message has one).
const MAX_HEADER: u64 = 1 << 20;
/// Fetches sent ahead while headers are read: the same kind of pipelining as for RETR.
const AHEAD_BUDGET: u64 = 512 << 10;
const AHEAD_MOST: usize = 64;

/// The digest of a message's header section (`msg` may hold more than the header).
pub fn of_header(msg: &[u8]) -> String {
    use md5::{Digest, Md5};
    let end = header_end(msg).unwrap_or(msg.len());
    Md5::digest(&msg[..end])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where the header section ends (after its empty line), if it does within `msg`.
fn header_end(msg: &[u8]) -> Option<usize> {
    if msg.starts_with(b"\r\n") {
        return Some(2);
    }
    if msg.starts_with(b"\n") {
        return Some(1);
    }
    let crlf = memchr::memmem::find(msg, b"\r\n\r\n").map(|i| i + 4);
    let lf = memchr::memmem::find(msg, b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    uidvalidity: u32,
    digests: HashMap<u32, String>,
}

/// The digests known for one user's mailbox.
pub struct Cache {
    path: Option<PathBuf>,
    uidvalidity: u32,
    digests: HashMap<u32, String>,
    changed: bool,
}

impl Cache {
    /// The cache of `key` (user, server and mailbox) under `dir`, if it is there and for this
    /// UIDVALIDITY; else an empty one.
    pub fn open(dir: Option<&Path>, key: &str, uidvalidity: u32) -> Cache {
        use md5::{Digest, Md5};
        let name: String = Md5::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let path = dir.map(|d| d.join("uidl-digests").join(name));
        let file: Option<CacheFile> = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|text| serde_json::from_slice(&text).ok());
        let digests = match file {
            Some(f) if f.uidvalidity == uidvalidity => f.digests,
            _ => HashMap::new(),
        };
        Cache {
            path,
            uidvalidity,
            digests,
            changed: false,
        }
    }

    /// Writes the cache back if it changed, keeping only the UIDs in `keep`: atomically
    /// (temporary file, fsync, rename), so a crash leaves the old cache or the new one.
    pub fn save(mut self, keep: &[u32]) {
        let Some(path) = self.path.take() else { return };
        let before = self.digests.len();
        let keep: std::collections::HashSet<u32> = keep.iter().copied().collect();
        self.digests.retain(|uid, _| keep.contains(uid));
        if !self.changed && self.digests.len() == before {
            return;
        }
        let file = CacheFile {
            uidvalidity: self.uidvalidity,
            digests: self.digests,
        };
        if let Err(e) = write_atomically(&path, &file) {
            log::warning(&format!(
                "--state-dir: can't keep the %m cache {}: {e} (sessions fetch every header)",
                path.display()
            ));
        }
    }
}

fn write_atomically(path: &Path, file: &CacheFile) -> std::io::Result<()> {
    let text = serde_json::to_vec(file).map_err(std::io::Error::other)?;
    crate::statefile::write_atomically(path, &text, 0o600)
}

/// The digest of each message (`uids`, in order): from the cache, else from its header,
/// fetched with the fetches sent ahead as RETR does. A message gone meanwhile gets none.
pub fn digests<S: Transport>(
    client: &mut Client<S>,
    cache: &mut Cache,
    uids: &[u32],
) -> Result<Vec<Option<String>>, super::client::Failure> {
    let missing: Vec<u32> = uids
        .iter()
        .copied()
        .filter(|u| !cache.digests.contains_key(u))
        .collect();
    for (i, &uid) in missing.iter().enumerate() {
        // This one and the next: answers already read for this one stay in the window.
        let mut ahead = missing[i..].iter().map(|&u| (u, HEADER_CHUNK));
        client.prefetch(HEADER_CHUNK, AHEAD_BUDGET, AHEAD_MOST, &mut ahead);
        let mut header = Vec::new();
        let mut gone = false;
        loop {
            let offset = header.len() as u64;
            let mut chunk = Vec::new();
            if !client.fetch_body(uid, offset, HEADER_CHUNK, &mut chunk)? {
                gone = offset == 0;
                break;
            }
            let short = (chunk.len() as u64) < HEADER_CHUNK;
            header.extend_from_slice(&chunk);
            if short || header_end(&header).is_some() || header.len() as u64 >= MAX_HEADER {
                break;
            }
        }
        if !gone {
            cache.digests.insert(uid, of_header(&header));
            cache.changed = true;
        }
    }
    Ok(uids.iter().map(|u| cache.digests.get(u).cloned()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_section_only() {
        let a = of_header(b"Subject: x\r\n\r\nbody one");
        assert_eq!(a, of_header(b"Subject: x\r\n\r\nbody two, longer"));
        assert_ne!(a, of_header(b"Subject: y\r\n\r\nbody one"));
        assert_eq!(a.len(), 32);
        // MD5("Subject: x\r\n\r\n")
        assert_eq!(of_header(b"Subject: x\r\n\r\n"), a);
        assert_eq!(header_end(b"A: 1\nB: 2\n\nx"), Some(11));
        assert_eq!(header_end(b"no blank line"), None);
    }

    #[test]
    fn a_cache_for_another_uidvalidity_is_ignored_and_saved_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(Some(dir.path()), "alice\0imap\0INBOX", 7);
        c.digests.insert(3, "d3".into());
        c.digests.insert(4, "d4".into());
        c.changed = true;
        c.save(&[3]);
        let c = Cache::open(Some(dir.path()), "alice\0imap\0INBOX", 7);
        assert_eq!(c.digests.len(), 1, "only the UIDs still listed");
        assert!(Cache::open(Some(dir.path()), "alice\0imap\0INBOX", 8)
            .digests
            .is_empty());
        assert!(Cache::open(Some(dir.path()), "bob\0imap\0INBOX", 7)
            .digests
            .is_empty());
        Cache::open(None, "x", 1).save(&[]);
    }
}
