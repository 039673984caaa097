//! The token store: one file per user under `--state-dir` (`oauth2/USER`), holding the refresh
//! token and the cached access token sealed with a key derived from the user's POP3 password.
//! Without the password the file reveals no token: the KDF's parameters and salt, a nonce and
//! the sealed bytes are all it holds in clear.
//!
//! Key: Argon2id (RFC 9106) over the password and a random salt, with the parameters written
//! in the file (so they can be raised later without breaking existing stores). Seal:
//! ChaCha20-Poly1305 with a random 96-bit nonce per write (a store is written once per refresh:
//! collisions are out of reach), the user name as associated data (a store copied to another
//! user's name doesn't open).

use crate::secret::Secret;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

const VERSION: u32 = 1;
const SALT_LEN: usize = 16;

/// Argon2id's cost. The default (16 MiB, 2 passes, 1 lane) costs about 30-50 ms per login on
/// a small VM and bounds the process's peak memory (issue 14: ≤ 50 ms, ≤ 32 MB RSS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            memory_kib: 16 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// What the store keeps. `Debug` shows no token.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tokens {
    pub refresh_token: Option<String>,
    pub access_token: Option<String>,
    /// Unix seconds at which the access token expires.
    pub expires_at: Option<u64>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "…"))
            .field("access_token", &self.access_token.as_ref().map(|_| "…"))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl Drop for Tokens {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.refresh_token.zeroize();
        self.access_token.zeroize();
    }
}

/// The file as written: nothing secret in clear.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    kdf: Kdf,
    cipher: String,
    nonce: String,
    sealed: String,
}

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Kdf {
    algorithm: String,
    #[serde(flatten)]
    params: KdfParams,
    salt: String,
}

#[derive(Debug)]
pub enum StoreError {
    /// No store for this user: not enrolled.
    Missing,
    /// The password doesn't open it (or the file was altered).
    WrongPassword,
    /// Unreadable, malformed or of an unknown version: the administrator's to fix.
    Broken(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Missing => write!(f, "no token store (not enrolled)"),
            StoreError::WrongPassword => write!(f, "the password doesn't open the token store"),
            StoreError::Broken(why) => write!(f, "{why}"),
        }
    }
}

/// The key derived from a password for one store's salt and parameters.
pub struct Key {
    key: Zeroizing<[u8; 32]>,
    kdf: Kdf,
}

/// One user's store.
pub struct Store {
    pub path: PathBuf,
    lock_path: PathBuf,
    user: String,
}

impl Store {
    /// The store of `user` under `state_dir`. The name is used as a file name as `--user-dir`
    /// does (no `/`, no leading `.`), so the caller has checked it.
    pub fn new(state_dir: &Path, user: &str) -> Store {
        let dir = state_dir.join("oauth2");
        Store {
            path: dir.join(user),
            lock_path: dir.join(format!(".{user}.lock")),
            user: user.to_string(),
        }
    }

    /// A new store for `tokens`, with a new salt (enrolment): replaces any earlier one.
    pub fn create(&self, password: &Secret, params: KdfParams, tokens: &Tokens) -> io::Result<Key> {
        let mut salt = [0u8; SALT_LEN];
        random(&mut salt)?;
        let kdf = Kdf {
            algorithm: "argon2id".into(),
            params,
            salt: B64.encode(salt),
        };
        let key = derive(password, &kdf).map_err(io::Error::other)?;
        self.save(&key, tokens)?;
        Ok(key)
    }

    /// Opens the store with the password: its key (kept to write the store back) and tokens.
    pub fn open(&self, password: &Secret) -> Result<(Key, Tokens), StoreError> {
        let file = self.read()?;
        let key = derive(password, &file.kdf).map_err(StoreError::Broken)?;
        let tokens = self.unseal(&key, &file)?;
        Ok((key, tokens))
    }

    /// Reads the store again with a key already derived (after waiting for the lock: another
    /// session may have refreshed meanwhile). `None` if the store was re-created with another
    /// salt or parameters since: derive the key again.
    pub fn reread(&self, key: &Key) -> Result<Option<Tokens>, StoreError> {
        let file = self.read()?;
        if file.kdf != key.kdf {
            return Ok(None);
        }
        self.unseal(key, &file).map(Some)
    }

    /// Seals `tokens` with `key` and writes the store atomically, mode 0600.
    pub fn save(&self, key: &Key, tokens: &Tokens) -> io::Result<()> {
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let mut data = Zeroizing::new(serde_json::to_vec(tokens).map_err(io::Error::other)?);
        aead(key)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.user.as_bytes()),
                &mut *data,
            )
            .map_err(|_| io::Error::other("sealing failed"))?;
        let file = File {
            version: VERSION,
            kdf: key.kdf.clone(),
            cipher: "chacha20-poly1305".into(),
            nonce: B64.encode(nonce),
            sealed: B64.encode(&*data),
        };
        let text = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        crate::statefile::write_atomically(&self.path, &text, 0o600)
    }

    /// Serializes refreshes of this user's tokens across sessions (flock, released on drop).
    /// Waits at most until `deadline` (then a `TimedOut` error): sessions queued behind a
    /// refresh that hangs at the provider give up after one timeout each.
    pub fn lock_until(&self, deadline: std::time::Instant) -> io::Result<std::fs::File> {
        crate::statefile::lock_until(&self.lock_path, deadline)
    }

    fn read(&self) -> Result<File, StoreError> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing),
            Err(e) => return Err(StoreError::Broken(format!("{}: {e}", self.path.display()))),
        };
        let bad = |why: String| StoreError::Broken(format!("{}: {why}", self.path.display()));
        let file: File = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if file.version != VERSION
            || file.cipher != "chacha20-poly1305"
            || file.kdf.algorithm != "argon2id"
        {
            return Err(bad(format!(
                "unknown store format (version {}, {}, {})",
                file.version, file.kdf.algorithm, file.cipher
            )));
        }
        Ok(file)
    }

    fn unseal(&self, key: &Key, file: &File) -> Result<Tokens, StoreError> {
        let bad = |why: &str| StoreError::Broken(format!("{}: {why}", self.path.display()));
        let nonce: [u8; NONCE_LEN] = B64
            .decode(&file.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| bad("bad nonce"))?;
        let mut data = Zeroizing::new(B64.decode(&file.sealed).map_err(|_| bad("bad data"))?);
        let plain = aead(key)
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.user.as_bytes()),
                &mut data,
            )
            .map_err(|_| StoreError::WrongPassword)?;
        serde_json::from_slice(plain).map_err(|_| bad("sealed data not understood"))
    }
}

fn derive(password: &Secret, kdf: &Kdf) -> Result<Key, String> {
    let salt = B64
        .decode(&kdf.salt)
        .map_err(|_| "bad salt in the token store".to_string())?;
    let p = kdf.params;
    // Bounds on what a (tampered) file may ask of a login: at most 256 MiB and 16 passes.
    if p.memory_kib > 256 * 1024 || p.iterations > 16 || p.parallelism > 8 {
        return Err("the token store asks for too costly a KDF".into());
    }
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| format!("token store KDF parameters: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(password.expose(), &salt, &mut *key)
        .map_err(|e| format!("token store KDF: {e}"))?;
    Ok(Key {
        key,
        kdf: kdf.clone(),
    })
}

fn aead(key: &Key) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &*key.key).expect("a 32-byte key"))
}

fn random(buf: &mut [u8]) -> io::Result<()> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| io::Error::other("no system random source"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Cheap parameters: the tests are about the format, not the cost.
    use crate::oauth::testing::CHEAP;

    fn tokens() -> Tokens {
        Tokens {
            refresh_token: Some("R-secret-refresh".into()),
            access_token: Some("A-secret-access".into()),
            expires_at: Some(1_900_000_000),
        }
    }

    #[test]
    fn the_right_password_opens_it_and_nothing_shows_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(dir.path(), "alice");
        let pw = Secret::new(b"pop3-pw".to_vec());
        s.create(&pw, CHEAP, &tokens()).unwrap();
        let text = std::fs::read_to_string(&s.path).unwrap();
        for secret in ["R-secret-refresh", "A-secret-access"] {
            assert!(!text.contains(secret));
            assert!(!text.contains(&B64.encode(secret)));
        }
        let mode = std::fs::metadata(&s.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (_, t) = s.open(&pw).unwrap();
        assert_eq!(t, tokens());
        assert!(matches!(
            s.open(&Secret::new(b"wrong".to_vec())),
            Err(StoreError::WrongPassword)
        ));
    }

    #[test]
    fn another_users_name_or_an_altered_byte_doesnt_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(dir.path(), "alice");
        let pw = Secret::new(b"pw".to_vec());
        s.create(&pw, CHEAP, &tokens()).unwrap();
        let bob = Store::new(dir.path(), "bob");
        std::fs::copy(&s.path, &bob.path).unwrap();
        assert!(matches!(bob.open(&pw), Err(StoreError::WrongPassword)));
        let mut f: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&s.path).unwrap()).unwrap();
        let mut sealed = B64.decode(f["sealed"].as_str().unwrap()).unwrap();
        sealed[0] ^= 1;
        f["sealed"] = B64.encode(sealed).into();
        std::fs::write(&s.path, serde_json::to_vec(&f).unwrap()).unwrap();
        assert!(matches!(s.open(&pw), Err(StoreError::WrongPassword)));
    }

    #[test]
    fn written_back_with_the_same_key_and_reread_after_a_lock() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(dir.path(), "alice");
        let pw = Secret::new(b"pw".to_vec());
        let key = s.create(&pw, CHEAP, &tokens()).unwrap();
        let _lock = s
            .lock_until(std::time::Instant::now() + std::time::Duration::from_secs(5))
            .unwrap();
        let mut t = tokens();
        t.access_token = Some("A2".into());
        s.save(&key, &t).unwrap();
        assert_eq!(s.reread(&key).unwrap(), Some(t.clone()));
        assert_eq!(s.open(&pw).unwrap().1, t);
        // Re-enrolled meanwhile (a new salt): the old key can't tell, and says so.
        s.create(&pw, CHEAP, &tokens()).unwrap();
        assert_eq!(s.reread(&key).unwrap(), None);
    }

    #[test]
    fn missing_malformed_and_too_costly_stores_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(dir.path(), "alice");
        let pw = Secret::new(b"pw".to_vec());
        assert!(matches!(s.open(&pw), Err(StoreError::Missing)));
        std::fs::create_dir_all(s.path.parent().unwrap()).unwrap();
        std::fs::write(&s.path, b"{").unwrap();
        assert!(matches!(s.open(&pw), Err(StoreError::Broken(_))));
        let costly = KdfParams {
            memory_kib: 1 << 30,
            ..CHEAP
        };
        let kdf = Kdf {
            algorithm: "argon2id".into(),
            params: costly,
            salt: B64.encode([0u8; 16]),
        };
        assert!(derive(&pw, &kdf).is_err());
    }

    #[test]
    fn tokens_debug_shows_no_token() {
        let shown = format!("{:?}", tokens());
        assert!(!shown.contains("secret"), "{shown}");
    }
}
