//! A session's access token: from the store while it has more than a minute left, else
//! refreshed at the provider under the store's lock, so sessions started together refresh
//! once and never send a rotated refresh token twice (providers that detect reuse revoke the
//! whole grant).

use super::flow::{self, Provider};
use super::store::{Key, Store, StoreError, Tokens};
use crate::secret::Secret;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A token with less than this left is refreshed first: it must outlive the IMAP login.
const MARGIN: u64 = 60;

/// Why no token: each maps to the POP3 answer the issue asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// The password doesn't open the store: a wrong password (`[AUTH]`, `login failed:`).
    Password,
    /// Only the administrator can help (not enrolled, grant revoked, store broken):
    /// `[SYS/PERM]`, and the text for the log.
    Perm(String),
    /// Try again later (provider unreachable with an expired token): `[SYS/TEMP]`.
    Temp(String),
}

/// Where a user's tokens come from.
pub struct Source<'a> {
    pub provider: &'a Provider,
    pub store: Store,
    pub ca: Option<&'a Path>,
    pub timeout: Duration,
}

/// The open store of one session, to refresh again if IMAP rejects the token.
pub struct Opened<'a> {
    source: Source<'a>,
    password: &'a Secret,
    key: Key,
    pub access_token: String,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usable(t: &Tokens) -> Option<&str> {
    let token = t.access_token.as_deref()?;
    (t.expires_at? > now() + MARGIN).then_some(token)
}

impl<'a> Source<'a> {
    /// Opens the store with the POP3 password and returns a usable access token, refreshing it
    /// if needed. A wrong password makes no request to the provider.
    pub fn open(self, password: &'a Secret) -> Result<Opened<'a>, Failure> {
        let (key, tokens) = self
            .store
            .open(password)
            .map_err(|e| store_failure(&self, e))?;
        let mut opened = Opened {
            source: self,
            password,
            key,
            access_token: String::new(),
        };
        match usable(&tokens) {
            Some(t) => opened.access_token = t.to_string(),
            None => opened.refresh(None)?,
        }
        Ok(opened)
    }
}

impl Opened<'_> {
    /// IMAP refused the token: refresh once (unless another session already did) and return
    /// the new one.
    pub fn refresh_after_rejection(&mut self) -> Result<&str, Failure> {
        let rejected = std::mem::take(&mut self.access_token);
        self.refresh(Some(&rejected))?;
        Ok(&self.access_token)
    }

    /// Under the lock: read the store again (another session may have refreshed while we
    /// waited); use its token if it is usable and not `rejected`, else refresh at the provider
    /// and write the result back.
    fn refresh(&mut self, rejected: Option<&str>) -> Result<(), Failure> {
        let s = &self.source;
        let _lock = s
            .store
            .lock_until(Instant::now() + s.timeout)
            .map_err(|e| {
                Failure::Temp(if e.kind() == std::io::ErrorKind::TimedOut {
                    format!(
                        "another session of {} is refreshing the token; gave up waiting after {} s",
                        s.store
                            .path
                            .file_name()
                            .unwrap_or_default()
                            .to_string_lossy(),
                        s.timeout.as_secs()
                    )
                } else {
                    format!("locking the token store {}: {e}", s.store.path.display())
                })
            })?;
        let tokens = match s.store.reread(&self.key).map_err(|e| store_failure(s, e))? {
            Some(t) => t,
            None => {
                // Re-enrolled meanwhile: a new salt, so a new key.
                let (key, t) = s
                    .store
                    .open(self.password)
                    .map_err(|e| store_failure(s, e))?;
                self.key = key;
                t
            }
        };
        if let Some(t) = usable(&tokens).filter(|t| Some(*t) != rejected) {
            self.access_token = t.to_string();
            return Ok(());
        }
        let Some(refresh_token) = tokens.refresh_token.as_deref() else {
            return Err(Failure::Perm(format!(
                "{}: no refresh token; run aiopopd --oauth2-authorize again",
                s.store.path.display()
            )));
        };
        let granted =
            flow::refresh(s.provider, refresh_token, s.ca, s.timeout).map_err(|e| match e {
                flow::Error::Grant(why) => Failure::Perm(format!(
                    "the provider refused the grant ({why}): it was revoked or has expired; \
                     run aiopopd --oauth2-authorize for this user again"
                )),
                flow::Error::Unreachable(why) => {
                    Failure::Temp(format!("token refresh at {}: {why}", s.provider.token_url))
                }
                flow::Error::Provider(why) => {
                    Failure::Perm(format!("token refresh at {}: {why}", s.provider.token_url))
                }
            })?;
        let new = Tokens {
            // A provider that doesn't rotate keeps the old one valid.
            refresh_token: granted
                .refresh_token
                .clone()
                .or_else(|| tokens.refresh_token.clone()),
            access_token: Some(granted.access_token.clone()),
            expires_at: Some(now() + granted.expires_in.unwrap_or(3600)),
        };
        // Written before use: a rotated refresh token lost here would end the grant.
        s.store.save(&self.key, &new).map_err(|e| {
            Failure::Temp(format!(
                "writing {}: {e} (the provider may have rotated the refresh token: if the next \
                 session fails with invalid_grant, enrol again)",
                s.store.path.display()
            ))
        })?;
        self.access_token = granted.access_token.clone();
        Ok(())
    }
}

fn store_failure(s: &Source, e: StoreError) -> Failure {
    match e {
        StoreError::WrongPassword => Failure::Password,
        StoreError::Missing => Failure::Perm(format!(
            "no token store {}: run aiopopd --oauth2-authorize for this user",
            s.store.path.display()
        )),
        StoreError::Broken(why) => Failure::Perm(why),
    }
}

/// The SASL initial response for `mechanism` (XOAUTH2, or RFC 7628's OAUTHBEARER), unencoded.
pub fn initial_response(
    mechanism: &str,
    user: &str,
    token: &str,
    host: &str,
    port: u16,
) -> Vec<u8> {
    if mechanism == "OAUTHBEARER" {
        // RFC 7628 3.1: the authzid in a GS2 header, ',' and '=' escaped.
        let user = user.replace('=', "=3D").replace(',', "=2C");
        format!("n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01")
            .into_bytes()
    } else {
        format!("user={user}\x01auth=Bearer {token}\x01\x01").into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use crate::oauth::testing::CHEAP;

    /// A token endpoint answering each request with the next of `answers` (status, body);
    /// the request bodies it saw.
    fn endpoint(answers: Vec<(u16, String)>) -> (String, Arc<Mutex<Vec<String>>>) {
        let (base, seen) = crate::oauth::testing::endpoint(answers);
        (format!("{base}/token"), seen)
    }

    fn provider(token_url: &str) -> Provider {
        serde_json::from_value(serde_json::json!({
            "authorize_url": "http://127.0.0.1:1/authorize", "token_url": token_url,
            "client_id": "cid", "scope": "mail"
        }))
        .unwrap()
    }

    fn enrolled(dir: &Path, pw: &Secret, expires_at: u64) -> Store {
        let s = Store::new(dir, "alice");
        let t = Tokens {
            refresh_token: Some("R1".into()),
            access_token: Some("A1".into()),
            expires_at: Some(expires_at),
        };
        s.create(pw, CHEAP, &t).unwrap();
        s
    }

    fn source<'a>(p: &'a Provider, dir: &Path) -> Source<'a> {
        Source {
            provider: p,
            store: Store::new(dir, "alice"),
            ca: None,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_fresh_token_is_used_without_asking_and_a_wrong_password_asks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let pw = Secret::new(b"pw".to_vec());
        enrolled(dir.path(), &pw, now() + 3600);
        let (url, seen) = endpoint(vec![]);
        let p = provider(&url);
        let o = source(&p, dir.path()).open(&pw).unwrap();
        assert_eq!(o.access_token, "A1");
        let wrong = Secret::new(b"nope".to_vec());
        assert_eq!(
            source(&p, dir.path()).open(&wrong).err(),
            Some(Failure::Password)
        );
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn an_expiring_token_is_refreshed_and_the_rotated_refresh_token_kept() {
        let dir = tempfile::tempdir().unwrap();
        let pw = Secret::new(b"pw".to_vec());
        let store = enrolled(dir.path(), &pw, now() + 30);
        let (url, seen) = endpoint(vec![(
            200,
            r#"{"access_token":"A2","expires_in":3600,"refresh_token":"R2","token_type":"Bearer"}"#
                .into(),
        )]);
        let p = provider(&url);
        let o = source(&p, dir.path()).open(&pw).unwrap();
        assert_eq!(o.access_token, "A2");
        let (_, t) = store.open(&pw).unwrap();
        assert_eq!(t.refresh_token.as_deref(), Some("R2"));
        assert!(t.expires_at.unwrap() > now() + 3000);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(
            seen[0].contains("grant_type=refresh_token&refresh_token=R1&"),
            "{seen:?}"
        );
    }

    #[test]
    fn rejected_by_imap_refreshes_once() {
        let dir = tempfile::tempdir().unwrap();
        let pw = Secret::new(b"pw".to_vec());
        enrolled(dir.path(), &pw, now() + 3600);
        let (url, seen) = endpoint(vec![(200, r#"{"access_token":"A2"}"#.into())]);
        let p = provider(&url);
        let mut o = source(&p, dir.path()).open(&pw).unwrap();
        assert_eq!(o.access_token, "A1");
        assert_eq!(o.refresh_after_rejection().unwrap(), "A2");
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn provider_answers_become_perm_or_temp() {
        let dir = tempfile::tempdir().unwrap();
        let pw = Secret::new(b"pw".to_vec());
        enrolled(dir.path(), &pw, 0);
        let (url, _) = endpoint(vec![
            (400, r#"{"error":"invalid_grant"}"#.into()),
            (503, "down".into()),
            (503, r#"{"error":"temporarily_unavailable"}"#.into()),
        ]);
        let p = provider(&url);
        let e = source(&p, dir.path()).open(&pw).err().unwrap();
        assert!(
            matches!(&e, Failure::Perm(s) if s.contains("--oauth2-authorize")),
            "{e:?}"
        );
        let e = source(&p, dir.path()).open(&pw).err().unwrap();
        assert!(matches!(e, Failure::Temp(_)), "{e:?}");
        let e = source(&p, dir.path()).open(&pw).err().unwrap();
        assert!(matches!(e, Failure::Temp(_)), "{e:?}");
        // Nobody listening at all.
        let p = provider("http://127.0.0.1:9/token");
        let e = source(&p, dir.path()).open(&pw).err().unwrap();
        assert!(matches!(e, Failure::Temp(_)), "{e:?}");
        // Not enrolled.
        let other = tempfile::tempdir().unwrap();
        let e = source(&p, other.path()).open(&pw).err().unwrap();
        assert!(
            matches!(&e, Failure::Perm(s) if s.contains("--oauth2-authorize")),
            "{e:?}"
        );
    }

    /// Sixteen sessions find the token expired at once: one refresh, and every session gets
    /// its result (the others wait for the lock, then read the store again).
    #[test]
    fn sessions_started_together_refresh_once() {
        let dir = tempfile::tempdir().unwrap();
        let pw = Secret::new(b"pw".to_vec());
        enrolled(dir.path(), &pw, 0);
        let (url, seen) = endpoint(vec![(
            200,
            r#"{"access_token":"A2","expires_in":3600,"refresh_token":"R2"}"#.into(),
        )]);
        let p = provider(&url);
        std::thread::scope(|sc| {
            let all: Vec<_> = (0..16)
                .map(|_| sc.spawn(|| source(&p, dir.path()).open(&pw).map(|o| o.access_token)))
                .collect();
            for t in all {
                assert_eq!(t.join().unwrap().unwrap(), "A2");
            }
        });
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    /// A session that finds another one holding the refresh lock past its timeout answers
    /// [SYS/TEMP] without asking the provider.
    #[test]
    fn waiting_for_another_sessions_refresh_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let pw = Secret::new(b"pw".to_vec());
        let store = enrolled(dir.path(), &pw, 0);
        let (url, seen) = endpoint(vec![]);
        let p = provider(&url);
        let held = store
            .lock_until(std::time::Instant::now() + Duration::from_secs(5))
            .unwrap();
        let mut src = source(&p, dir.path());
        src.timeout = Duration::from_millis(300);
        let start = std::time::Instant::now();
        let e = src.open(&pw).err().unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(&e, Failure::Temp(s) if s.starts_with("another session of alice is \
                refreshing the token; gave up waiting after")),
            "{e:?}"
        );
        assert!(seen.lock().unwrap().is_empty());
        drop(held);
    }

    #[test]
    fn sasl_initial_responses() {
        assert_eq!(
            initial_response("XOAUTH2", "a@b", "T", "h", 993),
            b"user=a@b\x01auth=Bearer T\x01\x01"
        );
        assert_eq!(
            initial_response("OAUTHBEARER", "a,=b", "T", "imap.x", 993),
            b"n,a=a=2C=3Db,\x01host=imap.x\x01port=993\x01auth=Bearer T\x01\x01"
        );
    }
}
