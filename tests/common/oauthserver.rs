//! A small OAuth 2.0 authorization server for tests (issue 14), on a thread on a free
//! 127.0.0.1 port, plain HTTP/1.1, one request per connection (`Connection: close`), and the
//! private Dovecot that trusts it: Dovecot's own `oauth2` passdb checks every XOAUTH2 or
//! OAUTHBEARER token against this server's RFC 7662 introspection endpoint, so the user `alice`
//! gets in only with a token that this server issued and still considers active.
//!
//! Endpoints (all answers JSON, `Cache-Control: no-store`):
//! - `GET /authorize`: auto-approves as [`OAuthServer::set_user`] (default `alice`); requires
//!   `response_type=code`, the client [`CLIENT_ID`], a loopback `redirect_uri` (RFC 8252) and
//!   PKCE `S256`; answers `302` to `redirect_uri?code=..&state=..`. A bad client or redirect URI
//!   gets `400` (never a redirect), other errors are redirected (`error=..&state=..`).
//! - `POST /token`: `authorization_code` (PKCE verified; a code used twice revokes the grant),
//!   `refresh_token` (rotates the refresh token unless [`OAuthServer::set_rotate`]`(false)`;
//!   presenting a refresh token that was already rotated revokes the whole grant: reuse
//!   detection), and `urn:ietf:params:oauth:grant-type:device_code` (RFC 8628). Errors are
//!   `400 {"error":"invalid_grant"}` and friends; a bad client secret is `401 invalid_client`.
//!   The client may authenticate with `client_secret` in the form or HTTP Basic; it must if
//!   [`OAuthServer::set_require_client_secret`] is on, and a secret that is sent must be right.
//! - `POST /device` (RFC 8628 device authorization): pending until the test calls
//!   [`OAuthServer::approve_device`] or [`OAuthServer::deny_device`]. Polling sooner than
//!   `interval` after the previous poll answers `slow_down`.
//! - `POST /introspect` (RFC 7662), what Dovecot 2.3 calls with `introspection_mode = post`: a
//!   form `token=..&client_id=..&client_secret=..`; answers `{"active":true,"username":..}` only
//!   for a current, unexpired, unrevoked access token, else `{"active":false}`. The caller must
//!   be the resource server [`RESOURCE_ID`] / [`RESOURCE_SECRET`] (else `401`).
//!
//! Things worth knowing about Dovecot 2.3.19 with this config (read in src/auth/db-oauth2.c,
//! mech-oauth2.c and lib-oauth2/oauth2-request.c of 2.3.19.1, and checked by
//! tests/oauth_harness.rs):
//! - Every XOAUTH2/OAUTHBEARER attempt costs one introspection request: the auth cache is off
//!   (`auth_cache_size = 0`, also Dovecot's default). With a cache, the oauth2 passdb's cache
//!   key is user + token, so an expired or revoked token would keep working for
//!   `auth_cache_ttl` (default 1 hour).
//! - A refused token (inactive, or a token for another user) is answered with a SASL
//!   challenge, XOAUTH2: `+ ` base64 of `{"status":"401","schemes":"bearer","scope":"mail"}`,
//!   OAUTHBEARER: `{"status":"invalid_token"}`; the client must answer it (an empty line, or
//!   `\x01` for OAUTHBEARER) and then gets `NO [AUTHENTICATIONFAILED] Authentication failed.`
//!   after `auth_failure_delay` (0 here; Dovecot's default is 2 s).
//! - If the introspection endpoint can't be reached or answers 5xx, there is no challenge:
//!   `NO [UNAVAILABLE] Temporary authentication failure. [...]` at once.
//! - Dovecot's auth penalty: after a failed authentication from an IP address, every
//!   authentication from that address (any user, even with a good token) waits 4 s before it
//!   starts, 8 s after two failures, at most 15 s; it fades after 15 s without failures and a
//!   success resets it. Keyed by the remote IP only (no setting, and no trusted-network
//!   exemption in 2.3.19), so a proxy that presents expired tokens slows every user behind it.
//!   The IMAP helpers here connect from a fresh 127.1.x.y address each time so that tests
//!   aren't slowed ([`imap_authenticate_from`] picks the address).
//! - A 4xx introspection answer is not a failure for Dovecot: it parses the JSON and, finding
//!   no user name, reports an internal failure (the same `[UNAVAILABLE]` answer).
//! - The token reaches the passdbs like a password: the passwd-file passdb that
//!   tests/common/dovecot.rs always configures sees it first, so [`OAuthServer::start_dovecot`]
//!   gives `alice` an unguessable password there (she needs the entry for the static userdb
//!   and doveadm) and adds `bob` / `bob-pw` as a password-only user.
#![allow(dead_code)]

use super::dovecot::Dovecot;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The OAuth client aiopopd is registered as.
pub const CLIENT_ID: &str = "aiopopd-test";
/// Its secret (optional unless [`OAuthServer::set_require_client_secret`]).
pub const CLIENT_SECRET: &str = "aiopopd-test-secret";
/// The resource server (Dovecot) that calls `/introspect`.
pub const RESOURCE_ID: &str = "dovecot";
pub const RESOURCE_SECRET: &str = "dovecot-secret";
/// The user who gets in only with a token.
pub const TOKEN_USER: &str = "alice";
/// A user who gets in only with a password, next to her.
pub const PASSWORD_USER: (&str, &str) = ("bob", "bob-pw");
/// The grant type of RFC 8628.
pub const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// The longest request head and body the server reads.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;
/// How long the server waits for a request's bytes, and a test client for an answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an authorization code and a device code stay valid.
const CODE_LIFETIME: Duration = Duration::from_secs(600);

/// How the server fails, for "provider unreachable" tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// Serving normally.
    Up,
    /// Every request is answered `503 {"error":"temporarily_unavailable"}`.
    Unavailable,
    /// Every request is answered `429 {"error":"temporarily_unavailable"}` with
    /// `Retry-After: 1` (a provider throttling the client).
    RateLimited,
    /// Connections are accepted and closed without an answer.
    Hangup,
    /// The listening socket is closed: connections are refused. Back `Up`, the server listens
    /// on the same port again.
    Refused,
}

/// How many requests each endpoint (and grant type) got, and what the server detected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Every request read, whatever the endpoint or outage.
    pub requests: u64,
    pub authorize: u64,
    pub token_authorization_code: u64,
    pub token_refresh_token: u64,
    pub token_device_code: u64,
    /// `/token` requests with a missing or unknown `grant_type`.
    pub token_other: u64,
    /// `/token` requests answered with an error (of any grant type).
    pub token_errors: u64,
    pub device: u64,
    pub introspect: u64,
    /// Introspections answered `"active":true`.
    pub introspect_active: u64,
    /// Rotated refresh tokens presented again (each revoked its grant).
    pub refresh_reuse: u64,
    /// Authorization codes presented again (each revoked its grant).
    pub code_reuse: u64,
    /// Device polls answered `slow_down`.
    pub slow_down: u64,
    /// Requests answered 503 or hung up on during an outage.
    pub while_down: u64,
}

/// A successful `/token` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    pub access_token: String,
    /// Absent when the server doesn't rotate refresh tokens (keep the old one).
    pub refresh_token: Option<String>,
    pub expires_in: u64,
    pub scope: String,
}

/// An HTTP answer, as the test client saw it.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics if it isn't).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error` member of a JSON error answer.
    pub fn error(&self) -> Option<String> {
        serde_json::from_slice::<Value>(&self.body)
            .ok()?
            .get("error")?
            .as_str()
            .map(str::to_string)
    }
}

/// What `/device` answered.
#[derive(Clone, Debug)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    pub interval: u64,
    pub expires_in: u64,
}

struct Grant {
    user: String,
    client_id: String,
    scope: String,
    revoked: bool,
}

struct AccessToken {
    grant: usize,
    expires_at: Instant,
    /// Unix time, for `exp` in introspection answers.
    exp: u64,
    iat: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RefreshState {
    Current,
    Rotated,
}

struct RefreshToken {
    grant: usize,
    state: RefreshState,
}

struct Code {
    user: String,
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: String,
    expires_at: Instant,
    /// The grant it was exchanged for, once it has been.
    grant: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DeviceState {
    Pending,
    Approved,
    Denied,
    /// Tokens were issued; the device code is spent.
    Done,
}

struct Device {
    user_code: String,
    client_id: String,
    scope: String,
    state: DeviceState,
    user: String,
    expires_at: Instant,
    last_poll: Option<Instant>,
}

struct State {
    user: String,
    access_lifetime: Duration,
    rotate: bool,
    require_client_secret: bool,
    device_interval: u64,
    outage: Outage,
    delay: Duration,
    counters: Counters,
    grants: Vec<Grant>,
    access: HashMap<String, AccessToken>,
    refresh: HashMap<String, RefreshToken>,
    codes: HashMap<String, Code>,
    devices: HashMap<String, Device>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    rng: SystemRandom,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking handler thread must not take the whole harness down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh random token: `prefix` and 32 random bytes in base64url (RFC 6750's b64token).
    fn token(&self, prefix: &str) -> String {
        let mut bytes = [0u8; 32];
        self.rng.fill(&mut bytes).expect("system random source");
        format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// RFC 8628 user code: 8 letters without vowels, `XXXX-XXXX`.
    fn user_code(&self) -> String {
        const LETTERS: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
        let mut bytes = [0u8; 8];
        self.rng.fill(&mut bytes).expect("system random source");
        let mut code = String::new();
        for (i, b) in bytes.iter().enumerate() {
            if i == 4 {
                code.push('-');
            }
            code.push(LETTERS[*b as usize % LETTERS.len()] as char);
        }
        code
    }
}

/// The authorization server. Stops (and closes its port) when dropped.
pub struct OAuthServer {
    shared: Arc<Shared>,
    port: u16,
    thread: Option<JoinHandle<()>>,
    /// Holds `dovecot-oauth2.conf.ext`.
    dir: tempfile::TempDir,
}

impl OAuthServer {
    /// Starts a server that approves everything as `alice`, with one-hour access tokens and
    /// refresh-token rotation on.
    pub fn start() -> OAuthServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                user: TOKEN_USER.to_string(),
                access_lifetime: Duration::from_secs(3600),
                rotate: true,
                require_client_secret: false,
                device_interval: 1,
                outage: Outage::Up,
                delay: Duration::ZERO,
                counters: Counters::default(),
                grants: Vec::new(),
                access: HashMap::new(),
                refresh: HashMap::new(),
                codes: HashMap::new(),
                devices: HashMap::new(),
            }),
            stop: AtomicBool::new(false),
            rng: SystemRandom::new(),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(format!("oauthserver-{port}"))
            .spawn(move || accept_loop(listener, port, thread_shared))
            .expect("spawn the OAuth server thread");
        // As root, Dovecot's auth process (another user) reads the passdb file from here.
        let dir = tempfile::Builder::new()
            .prefix("oauthserver-")
            .tempdir_in("/tmp")
            .expect("create temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
        OAuthServer {
            shared,
            port,
            thread: Some(thread),
            dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, without a final slash.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.base_url())
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.base_url())
    }

    pub fn device_url(&self) -> String {
        format!("{}/device", self.base_url())
    }

    pub fn introspect_url(&self) -> String {
        format!("{}/introspect", self.base_url())
    }

    /// The user that `/authorize` and [`OAuthServer::approve_device`] approve as from now on.
    pub fn set_user(&self, user: &str) {
        self.shared.lock().user = user.to_string();
    }

    /// The lifetime (`expires_in`) of access tokens issued from now on.
    pub fn set_access_lifetime(&self, lifetime: Duration) {
        self.shared.lock().access_lifetime = lifetime;
    }

    /// Whether a refresh gives a new refresh token (and retires the old one). Without rotation
    /// the answer has no `refresh_token` and the old one stays valid.
    pub fn set_rotate(&self, rotate: bool) {
        self.shared.lock().rotate = rotate;
    }

    /// Whether `/token` insists on [`CLIENT_SECRET`] (confidential client).
    pub fn set_require_client_secret(&self, require: bool) {
        self.shared.lock().require_client_secret = require;
    }

    /// The `interval` `/device` announces (seconds, default 1); polls sooner get `slow_down`.
    pub fn set_device_interval(&self, secs: u64) {
        self.shared.lock().device_interval = secs;
    }

    /// Fails every request from now on in the way given, until `set_down(Outage::Up)`.
    pub fn set_down(&self, outage: Outage) {
        self.shared.lock().outage = outage;
    }

    /// Waits this long before answering each request (a slow provider).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
    }

    /// Every access token issued so far expires now (refresh tokens stay valid).
    pub fn expire_all(&self) {
        let now = Instant::now();
        for token in self.shared.lock().access.values_mut() {
            token.expires_at = token.expires_at.min(now);
        }
    }

    /// Revokes every grant: all access and refresh tokens issued so far stop working.
    pub fn revoke_all(&self) {
        for grant in self.shared.lock().grants.iter_mut() {
            grant.revoked = true;
        }
    }

    /// Revokes the grant this access or refresh token belongs to; false if it is unknown.
    pub fn revoke_grant_of(&self, token: &str) -> bool {
        let mut state = self.shared.lock();
        let grant = match (state.access.get(token), state.refresh.get(token)) {
            (Some(a), _) => a.grant,
            (None, Some(r)) => r.grant,
            (None, None) => return false,
        };
        state.grants[grant].revoked = true;
        true
    }

    /// Whether introspection would call this access token active now.
    pub fn is_active(&self, access_token: &str) -> bool {
        let state = self.shared.lock();
        active_grant(&state, access_token, Instant::now()).is_some()
    }

    /// The user approves the device flow that shows `user_code`; false if there is no such
    /// pending flow.
    pub fn approve_device(&self, user_code: &str) -> bool {
        self.decide_device(user_code, DeviceState::Approved)
    }

    /// The user refuses it (the next poll gets `access_denied`).
    pub fn deny_device(&self, user_code: &str) -> bool {
        self.decide_device(user_code, DeviceState::Denied)
    }

    fn decide_device(&self, user_code: &str, decision: DeviceState) -> bool {
        let mut state = self.shared.lock();
        let user = state.user.clone();
        match state
            .devices
            .values_mut()
            .find(|d| d.user_code == user_code && d.state == DeviceState::Pending)
        {
            Some(device) => {
                device.state = decision;
                device.user = user;
                true
            }
            None => false,
        }
    }

    /// Every device code expires now (polls get `expired_token`).
    pub fn expire_device_codes(&self) {
        let now = Instant::now();
        for device in self.shared.lock().devices.values_mut() {
            device.expires_at = device.expires_at.min(now);
        }
    }

    pub fn counters(&self) -> Counters {
        self.shared.lock().counters.clone()
    }

    /// Every access token issued so far (by any grant, expired or revoked too), to check
    /// that a client's files and logs hold none of them.
    pub fn issued_access_tokens(&self) -> Vec<String> {
        self.shared.lock().access.keys().cloned().collect()
    }

    /// Every refresh token issued so far, rotated ones included.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.shared.lock().refresh.keys().cloned().collect()
    }

    /// Issues a grant directly (no HTTP): what a client holds after the authorization-code
    /// flow, for tests that are not about the flow itself.
    pub fn issue(&self, scope: &str) -> Tokens {
        let mut state = self.shared.lock();
        let user = state.user.clone();
        issue_tokens(&self.shared, &mut state, &user, CLIENT_ID, scope)
    }

    /// This server as a provider in the shape of aiopopd's `oauth::flow::Provider` (JSON),
    /// with a loopback `redirect_uri` on `redirect_port`.
    pub fn provider_json(&self, scope: &str, redirect_port: u16) -> Value {
        json!({
            "authorize_url": self.authorize_url(),
            "token_url": self.token_url(),
            "client_id": CLIENT_ID,
            "scope": scope,
            "redirect_uri": format!("http://127.0.0.1:{redirect_port}/callback"),
            "device_authorization_url": self.device_url(),
        })
    }

    /// The `dovecot-oauth2.conf.ext` this server's Dovecot uses (written by
    /// [`OAuthServer::dovecot_config`]).
    pub fn dovecot_oauth2_conf_path(&self) -> PathBuf {
        self.dir.path().join("dovecot-oauth2.conf.ext")
    }

    /// Dovecot settings (for [`Dovecot::start_with_config`]) under which logins with XOAUTH2
    /// and OAUTHBEARER are checked against this server's introspection endpoint. Writes the
    /// oauth2 passdb's own file. PLAIN and LOGIN stay for password users; the auth cache is
    /// off so that expiry and revocation count at once.
    pub fn dovecot_config(&self) -> String {
        let conf = self.dovecot_oauth2_conf_path();
        let text = format!(
            "# Generated by tests/common/oauthserver.rs\n\
             introspection_url = {}\n\
             introspection_mode = post\n\
             client_id = {RESOURCE_ID}\n\
             client_secret = {RESOURCE_SECRET}\n\
             username_attribute = username\n\
             active_attribute = active\n\
             active_value = true\n\
             timeout_msecs = 5000\n\
             max_idle_time_msecs = 1000\n",
            self.introspect_url()
        );
        fs::write(&conf, text).expect("write dovecot-oauth2.conf.ext");
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).expect("chmod conf");
        format!(
            "# tests/common/oauthserver.rs\n\
             auth_mechanisms = plain login xoauth2 oauthbearer\n\
             auth_cache_size = 0\n\
             passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}\n}}\n",
            conf.display()
        )
    }

    /// Starts a private Dovecot where [`TOKEN_USER`] logs in only with a token from this
    /// server, and [`PASSWORD_USER`] only with a password.
    pub fn start_dovecot(&self) -> Dovecot {
        self.start_dovecot_with("")
    }

    /// Like [`OAuthServer::start_dovecot`], with more Dovecot settings (later ones win).
    pub fn start_dovecot_with(&self, extra: &str) -> Dovecot {
        let config = format!("{}{extra}\n", self.dovecot_config());
        let dovecot = Dovecot::start_with_config(&config);
        token_only(&dovecot);
        dovecot
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Rewrites the passwd-file of a Dovecot from tests/common/dovecot.rs so that no password
/// opens [`TOKEN_USER`]'s account (an unguessable one replaces `alice-pw`), and adds
/// [`PASSWORD_USER`] with a home like hers. Dovecot re-reads the file when it changes.
pub fn token_only(dovecot: &Dovecot) {
    let passwd = dovecot.dir().join("passwd");
    let old = fs::read_to_string(&passwd).expect("read Dovecot's passwd-file");
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("system random source");
    let unguessable = URL_SAFE_NO_PAD.encode(bytes);
    let mut text = String::new();
    for line in old.lines() {
        if line.starts_with(&format!("{TOKEN_USER}:")) {
            writeln!(text, "{TOKEN_USER}:{{PLAIN}}{unguessable}::::::").expect("string");
        } else if !line.starts_with(&format!("{}:", PASSWORD_USER.0)) {
            writeln!(text, "{line}").expect("string");
        }
    }
    writeln!(
        text,
        "{}:{{PLAIN}}{}::::::",
        PASSWORD_USER.0, PASSWORD_USER.1
    )
    .expect("string");
    // Write aside and rename: Dovecot must never read a half-written file.
    let tmp = dovecot.dir().join("passwd.new");
    fs::write(&tmp, text).expect("write passwd-file");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).expect("chmod passwd");
    fs::rename(&tmp, &passwd).expect("replace passwd-file");

    let alice_home = dovecot.home(TOKEN_USER);
    let meta = fs::metadata(&alice_home).expect("alice's home");
    let bob_home = dovecot.home(PASSWORD_USER.0);
    if !bob_home.exists() {
        fs::create_dir(&bob_home).expect("mkdir bob's home");
        fs::set_permissions(&bob_home, fs::Permissions::from_mode(0o700)).expect("chmod home");
        std::os::unix::fs::chown(&bob_home, Some(meta.uid()), Some(meta.gid()))
            .expect("chown bob's home");
    }
}

// ---------------------------------------------------------------------------------------
// The server side.

fn accept_loop(listener: TcpListener, port: u16, shared: Arc<Shared>) {
    let mut listener = Some(listener);
    while !shared.stop.load(Ordering::SeqCst) {
        let outage = shared.lock().outage;
        if outage == Outage::Refused {
            listener = None;
            thread::sleep(Duration::from_millis(5));
            continue;
        }
        if listener.is_none() {
            // Back up: listen on the same port again (retry while the kernel holds it).
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => {
                    l.set_nonblocking(true).expect("nonblocking listener");
                    listener = Some(l);
                }
                Err(_) => {
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let Some(l) = listener.as_ref() else {
            continue;
        };
        match l.accept() {
            Ok((stream, _)) => {
                let shared = Arc::clone(&shared);
                let _ = thread::Builder::new()
                    .name("oauthserver-conn".to_string())
                    .spawn(move || serve_connection(stream, &shared));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// A parsed request.
struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    form: HashMap<String, String>,
    /// `Authorization: Basic` credentials, decoded.
    basic: Option<(String, String)>,
}

/// An answer: status, extra headers, JSON body (or none).
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Option<Value>,
}

impl Answer {
    fn json(status: u16, body: Value) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: Some(body),
        }
    }

    fn error(status: u16, error: &str, description: &str) -> Answer {
        Answer::json(
            status,
            json!({"error": error, "error_description": description}),
        )
    }

    fn redirect(location: String) -> Answer {
        Answer {
            status: 302,
            headers: vec![("Location".to_string(), location)],
            body: None,
        }
    }
}

fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let request = read_request(&mut stream);
    let (outage, delay) = {
        let mut state = shared.lock();
        state.counters.requests += 1;
        if state.outage != Outage::Up {
            state.counters.while_down += 1;
        }
        (state.outage, state.delay)
    };
    if !delay.is_zero() {
        thread::sleep(delay);
    }
    let answer = match (outage, request) {
        (Outage::Hangup, _) | (Outage::Refused, _) => {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        (Outage::Unavailable, _) => Answer::error(
            503,
            "temporarily_unavailable",
            "the authorization server is down (test harness)",
        ),
        (Outage::RateLimited, _) => {
            let mut answer = Answer::error(
                429,
                "temporarily_unavailable",
                "too many requests (test harness)",
            );
            answer
                .headers
                .push(("Retry-After".to_string(), "1".to_string()));
            answer
        }
        (Outage::Up, Err(why)) => Answer::error(400, "invalid_request", &why),
        (Outage::Up, Ok(request)) => route(shared, &request),
    };
    let _ = write_answer(&mut stream, &answer);
    let _ = stream.shutdown(Shutdown::Write);
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn write_answer(stream: &mut TcpStream, answer: &Answer) -> std::io::Result<()> {
    let body = answer
        .body
        .as_ref()
        .map(|v| v.to_string().into_bytes())
        .unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nPragma: no-cache\r\nConnection: close\r\n",
        answer.status,
        reason(answer.status),
        body.len()
    );
    if answer.body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if answer.status == 401 {
        head.push_str("WWW-Authenticate: Basic realm=\"oauthserver\"\r\n");
    }
    for (name, value) in &answer.headers {
        write!(head, "{name}: {value}\r\n").expect("string");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(&body)?;
    stream.flush()
}

fn read_request(stream: &mut TcpStream) -> Result<Request, String> {
    let mut reader = BufReader::new(stream);
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take((MAX_HEAD + 1 - head.len()) as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("connection closed before the end of the request head".into());
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err("request head too long".into());
        }
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let head = String::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
        return Err(format!("bad request line {request_line:?}"));
    }
    let mut content_length = 0usize;
    let mut basic = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("Transfer-Encoding is not supported; send Content-Length".into());
        } else if name.eq_ignore_ascii_case("authorization") {
            if let Some(b64) = value
                .strip_prefix("Basic ")
                .or_else(|| value.strip_prefix("basic "))
            {
                let decoded = STANDARD
                    .decode(b64.trim())
                    .map_err(|_| "bad Basic credentials".to_string())?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| "Basic credentials are not UTF-8".to_string())?;
                let (id, secret) = decoded
                    .split_once(':')
                    .ok_or("Basic credentials without ':'")?;
                // RFC 6749 2.3.1: both are form-encoded before Basic encoding.
                basic = Some((form_decode(id)?, form_decode(secret)?));
            }
        }
    }
    if content_length > MAX_BODY {
        return Err("request body too long".into());
    }
    let mut body = vec![0u8; content_length];
    reader
        .read_exact(&mut body)
        .map_err(|e| format!("reading the request body: {e}"))?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_form(q)?),
        None => (target.clone(), HashMap::new()),
    };
    let form = if body.is_empty() {
        HashMap::new()
    } else {
        parse_form(std::str::from_utf8(&body).map_err(|_| "body is not UTF-8".to_string())?)?
    };
    Ok(Request {
        method,
        path,
        query,
        form,
        basic,
    })
}

fn route(shared: &Shared, request: &Request) -> Answer {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/authorize") => authorize(shared, &request.query),
        ("POST", "/token") => token(shared, request),
        ("POST", "/device") => device(shared, request),
        ("POST", "/introspect") => introspect(shared, request),
        (_, "/authorize" | "/token" | "/device" | "/introspect") => {
            Answer::error(405, "invalid_request", "wrong method")
        }
        _ => Answer::error(404, "not_found", "no such endpoint"),
    }
}

/// RFC 8252 7.3 and 8.3: a loopback redirect (any port) is all a native client needs.
fn loopback_redirect(uri: &str) -> bool {
    ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|base| {
            uri.strip_prefix(base)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/', '?']))
        })
}

fn authorize(shared: &Shared, q: &HashMap<String, String>) -> Answer {
    let mut state = shared.lock();
    state.counters.authorize += 1;
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
    if get("client_id") != CLIENT_ID {
        return Answer::error(400, "invalid_client", "unknown client_id");
    }
    let redirect_uri = get("redirect_uri");
    if !loopback_redirect(redirect_uri) {
        return Answer::error(400, "invalid_request", "redirect_uri must be loopback");
    }
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    let back = |params: &[(&str, &str)]| {
        let mut location = format!("{redirect_uri}{sep}");
        let mut all: Vec<(&str, &str)> = params.to_vec();
        if let Some(s) = q.get("state") {
            all.push(("state", s));
        }
        location.push_str(&form_encode(&all));
        Answer::redirect(location)
    };
    if get("response_type") != "code" {
        return back(&[("error", "unsupported_response_type")]);
    }
    if get("code_challenge_method") != "S256" {
        return back(&[
            ("error", "invalid_request"),
            ("error_description", "PKCE with S256 is required"),
        ]);
    }
    let challenge = get("code_challenge");
    if challenge.len() != 43 || URL_SAFE_NO_PAD.decode(challenge).is_err() {
        return back(&[
            ("error", "invalid_request"),
            (
                "error_description",
                "code_challenge must be base64url(SHA-256)",
            ),
        ]);
    }
    let code = shared.token("code-");
    let user = state.user.clone();
    state.codes.insert(
        code.clone(),
        Code {
            user,
            client_id: CLIENT_ID.to_string(),
            redirect_uri: redirect_uri.to_string(),
            challenge: challenge.to_string(),
            scope: default_scope(get("scope")),
            expires_at: Instant::now() + CODE_LIFETIME,
            grant: None,
        },
    );
    back(&[("code", &code)])
}

fn default_scope(scope: &str) -> String {
    if scope.is_empty() {
        "mail".to_string()
    } else {
        scope.to_string()
    }
}

/// The client's id and secret, from the form or HTTP Basic (not both).
fn client_credentials(request: &Request) -> Result<(String, Option<String>), Answer> {
    let form_id = request.form.get("client_id");
    let form_secret = request.form.get("client_secret");
    match (&request.basic, form_id, form_secret) {
        (Some(_), _, Some(_)) => Err(Answer::error(
            400,
            "invalid_request",
            "client authenticated twice",
        )),
        (Some((id, secret)), _, None) => Ok((id.clone(), Some(secret.clone()))),
        (None, Some(id), secret) => Ok((id.clone(), secret.cloned())),
        (None, None, _) => Err(Answer::error(401, "invalid_client", "no client_id")),
    }
}

fn check_client(state: &State, request: &Request) -> Result<String, Answer> {
    let (id, secret) = client_credentials(request)?;
    if id != CLIENT_ID {
        return Err(Answer::error(401, "invalid_client", "unknown client"));
    }
    match secret {
        Some(s) if s != CLIENT_SECRET => {
            Err(Answer::error(401, "invalid_client", "wrong client secret"))
        }
        None if state.require_client_secret => Err(Answer::error(
            401,
            "invalid_client",
            "client secret required",
        )),
        _ => Ok(id),
    }
}

fn token(shared: &Shared, request: &Request) -> Answer {
    let mut state = shared.lock();
    let grant_type = request
        .form
        .get("grant_type")
        .map(String::as_str)
        .unwrap_or_default();
    match grant_type {
        "authorization_code" => state.counters.token_authorization_code += 1,
        "refresh_token" => state.counters.token_refresh_token += 1,
        DEVICE_GRANT => state.counters.token_device_code += 1,
        _ => state.counters.token_other += 1,
    }
    let answer = match check_client(&state, request) {
        Err(answer) => answer,
        Ok(client_id) => match grant_type {
            "authorization_code" => code_grant(shared, &mut state, request, &client_id),
            "refresh_token" => refresh_grant(shared, &mut state, request, &client_id),
            DEVICE_GRANT => device_grant(shared, &mut state, request, &client_id),
            "" => Answer::error(400, "invalid_request", "no grant_type"),
            _ => Answer::error(400, "unsupported_grant_type", "unknown grant_type"),
        },
    };
    if answer.status != 200 {
        state.counters.token_errors += 1;
    }
    answer
}

fn tokens_answer(tokens: &Tokens) -> Answer {
    let mut body = json!({
        "access_token": tokens.access_token,
        "token_type": "Bearer",
        "expires_in": tokens.expires_in,
        "scope": tokens.scope,
    });
    if let Some(refresh) = &tokens.refresh_token {
        body["refresh_token"] = json!(refresh);
    }
    Answer::json(200, body)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn new_access(shared: &Shared, state: &mut State, grant: usize) -> (String, u64) {
    let lifetime = state.access_lifetime;
    let token = shared.token("at-");
    let iat = unix_now();
    state.access.insert(
        token.clone(),
        AccessToken {
            grant,
            expires_at: Instant::now() + lifetime,
            exp: iat + lifetime.as_secs(),
            iat,
        },
    );
    (token, lifetime.as_secs())
}

fn issue_tokens(
    shared: &Shared,
    state: &mut State,
    user: &str,
    client_id: &str,
    scope: &str,
) -> Tokens {
    state.grants.push(Grant {
        user: user.to_string(),
        client_id: client_id.to_string(),
        scope: scope.to_string(),
        revoked: false,
    });
    let grant = state.grants.len() - 1;
    let (access_token, expires_in) = new_access(shared, state, grant);
    let refresh_token = shared.token("rt-");
    state.refresh.insert(
        refresh_token.clone(),
        RefreshToken {
            grant,
            state: RefreshState::Current,
        },
    );
    Tokens {
        access_token,
        refresh_token: Some(refresh_token),
        expires_in,
        scope: scope.to_string(),
    }
}

fn invalid_grant(why: &str) -> Answer {
    Answer::error(400, "invalid_grant", why)
}

fn code_grant(shared: &Shared, state: &mut State, request: &Request, client_id: &str) -> Answer {
    let get = |k: &str| request.form.get(k).map(String::as_str).unwrap_or_default();
    let now = Instant::now();
    let Some(code) = state.codes.get_mut(get("code")) else {
        return invalid_grant("unknown authorization code");
    };
    if let Some(grant) = code.grant {
        // RFC 6749 4.1.2: a code used twice revokes what it gave.
        state.grants[grant].revoked = true;
        state.counters.code_reuse += 1;
        return invalid_grant("authorization code already used; grant revoked");
    }
    if code.expires_at <= now {
        return invalid_grant("authorization code expired");
    }
    if code.client_id != client_id {
        return invalid_grant("code was issued to another client");
    }
    if code.redirect_uri != get("redirect_uri") {
        return invalid_grant("redirect_uri differs from the one authorized");
    }
    let verifier = get("code_verifier");
    if !(43..=128).contains(&verifier.len()) {
        return invalid_grant("code_verifier must be 43 to 128 characters");
    }
    if pkce_challenge(verifier) != code.challenge {
        return invalid_grant("PKCE verification failed");
    }
    let (user, scope) = (code.user.clone(), code.scope.clone());
    let tokens = issue_tokens(shared, state, &user, client_id, &scope);
    let grant = state.grants.len() - 1;
    if let Some(code) = state.codes.get_mut(get("code")) {
        code.grant = Some(grant);
    }
    tokens_answer(&tokens)
}

fn refresh_grant(shared: &Shared, state: &mut State, request: &Request, client_id: &str) -> Answer {
    let presented = request
        .form
        .get("refresh_token")
        .cloned()
        .unwrap_or_default();
    let Some(refresh) = state.refresh.get(&presented) else {
        return invalid_grant("unknown refresh token");
    };
    let (grant, refresh_state) = (refresh.grant, refresh.state);
    if state.grants[grant].revoked {
        return invalid_grant("grant revoked");
    }
    if state.grants[grant].client_id != client_id {
        return invalid_grant("refresh token was issued to another client");
    }
    if refresh_state == RefreshState::Rotated {
        // Reuse detection (OAuth 2.0 Security BCP 4.14.2): someone holds a copy.
        state.grants[grant].revoked = true;
        state.counters.refresh_reuse += 1;
        return invalid_grant("refresh token already used; grant revoked");
    }
    let (access_token, expires_in) = new_access(shared, state, grant);
    let refresh_token = if state.rotate {
        let new = shared.token("rt-");
        if let Some(old) = state.refresh.get_mut(&presented) {
            old.state = RefreshState::Rotated;
        }
        state.refresh.insert(
            new.clone(),
            RefreshToken {
                grant,
                state: RefreshState::Current,
            },
        );
        Some(new)
    } else {
        None
    };
    tokens_answer(&Tokens {
        access_token,
        refresh_token,
        expires_in,
        scope: state.grants[grant].scope.clone(),
    })
}

fn device(shared: &Shared, request: &Request) -> Answer {
    let mut state = shared.lock();
    state.counters.device += 1;
    if let Err(answer) = check_client(&state, request) {
        return answer;
    }
    let device_code = shared.token("dc-");
    let user_code = shared.user_code();
    let scope = default_scope(
        request
            .form
            .get("scope")
            .map(String::as_str)
            .unwrap_or_default(),
    );
    state.devices.insert(
        device_code.clone(),
        Device {
            user_code: user_code.clone(),
            client_id: CLIENT_ID.to_string(),
            scope,
            state: DeviceState::Pending,
            user: String::new(),
            expires_at: Instant::now() + CODE_LIFETIME,
            last_poll: None,
        },
    );
    Answer::json(
        200,
        json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": "https://oauth.example/device",
            "verification_uri_complete":
                format!("https://oauth.example/device?user_code={user_code}"),
            "expires_in": CODE_LIFETIME.as_secs(),
            "interval": state.device_interval,
        }),
    )
}

fn device_grant(shared: &Shared, state: &mut State, request: &Request, client_id: &str) -> Answer {
    let now = Instant::now();
    let interval = Duration::from_secs(state.device_interval);
    let code = request.form.get("device_code").cloned().unwrap_or_default();
    let Some(device) = state.devices.get_mut(&code) else {
        return invalid_grant("unknown device code");
    };
    if device.client_id != client_id {
        return invalid_grant("device code was issued to another client");
    }
    let too_soon = device
        .last_poll
        .is_some_and(|last| now.duration_since(last) < interval);
    device.last_poll = Some(now);
    if device.state == DeviceState::Done {
        return invalid_grant("device code already used");
    }
    if device.expires_at <= now {
        return Answer::error(400, "expired_token", "device code expired");
    }
    match device.state {
        DeviceState::Pending if too_soon => {
            state.counters.slow_down += 1;
            Answer::error(400, "slow_down", "polled sooner than interval")
        }
        DeviceState::Pending => {
            Answer::error(400, "authorization_pending", "the user has not decided yet")
        }
        DeviceState::Denied => Answer::error(400, "access_denied", "the user said no"),
        DeviceState::Approved | DeviceState::Done => {
            device.state = DeviceState::Done;
            let (user, scope) = (device.user.clone(), device.scope.clone());
            let tokens = issue_tokens(shared, state, &user, client_id, &scope);
            tokens_answer(&tokens)
        }
    }
}

/// The grant of an access token that is current, unexpired and unrevoked.
fn active_grant<'a>(
    state: &'a State,
    token: &str,
    now: Instant,
) -> Option<(&'a AccessToken, &'a Grant)> {
    let access = state.access.get(token)?;
    let grant = &state.grants[access.grant];
    (access.expires_at > now && !grant.revoked).then_some((access, grant))
}

fn introspect(shared: &Shared, request: &Request) -> Answer {
    let mut state = shared.lock();
    state.counters.introspect += 1;
    let (id, secret) = match client_credentials(request) {
        Ok(c) => c,
        Err(answer) => return answer,
    };
    if id != RESOURCE_ID || secret.as_deref() != Some(RESOURCE_SECRET) {
        return Answer::error(
            401,
            "invalid_client",
            "introspection needs the resource server's credentials",
        );
    }
    let token = request.form.get("token").cloned().unwrap_or_default();
    let body = match active_grant(&state, &token, Instant::now()) {
        Some((access, grant)) => json!({
            "active": true,
            "username": grant.user,
            "sub": grant.user,
            "scope": grant.scope,
            "client_id": grant.client_id,
            "token_type": "Bearer",
            "exp": access.exp,
            "iat": access.iat,
        }),
        None => json!({"active": false}),
    };
    if body["active"] == json!(true) {
        state.counters.introspect_active += 1;
    }
    Answer::json(200, body)
}

// ---------------------------------------------------------------------------------------
// Encoding helpers, shared by the server and the test client.

/// `application/x-www-form-urlencoded` (also query strings): unreserved characters as they
/// are, everything else `%XX`.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        percent_encode_into(&mut out, name);
        out.push('=');
        percent_encode_into(&mut out, value);
    }
    out
}

fn percent_encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            write!(out, "%{b:02X}").expect("string");
        }
    }
}

/// Decodes one form or query component: `+` is a space, `%XX` a byte; the result must be
/// UTF-8.
pub fn form_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// Parses `a=1&b=2` (a name given twice is refused, as RFC 6749 3.1 asks).
pub fn parse_form(s: &str) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = form_decode(name)?;
        if map.insert(name.clone(), form_decode(value)?).is_some() {
            return Err(format!("parameter {name:?} given twice"));
        }
    }
    Ok(map)
}

/// PKCE S256: base64url(SHA-256(verifier)) without padding.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// A fresh PKCE pair: (verifier, S256 challenge).
pub fn pkce_pair() -> (String, String) {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("system random source");
    let verifier = URL_SAFE_NO_PAD.encode(bytes);
    let challenge = pkce_challenge(&verifier);
    (verifier, challenge)
}

// ---------------------------------------------------------------------------------------
// A test client: what a native OAuth client (aiopopd, later) does, by hand.

/// Sends one HTTP/1.1 request to `url` (`http://127.0.0.1:PORT/path?query` only) with an
/// optional form body and returns the answer. Panics on I/O errors; see [`try_http`].
pub fn http(method: &str, url: &str, form: Option<&[(&str, &str)]>) -> HttpResponse {
    try_http(method, url, form).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// Like [`http`], but an I/O error (refused, hung up) is returned.
pub fn try_http(
    method: &str,
    url: &str,
    form: Option<&[(&str, &str)]>,
) -> std::io::Result<HttpResponse> {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("{url}: http:// only"));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .unwrap_or_else(|_| panic!("{url}: the host must be IP:PORT"));
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let body = form.map(form_encode).unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if form.is_some() {
        write!(
            request,
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        )
        .expect("string");
    }
    request.push_str("\r\n");
    request.push_str(&body);
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("no HTTP answer head in {:?}", String::from_utf8_lossy(&raw)),
            )
        })?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// What a browser does with the authorization URL a client shows: GET it (the server approves
/// at once) and follow the redirect to the client's loopback listener. Returns the redirect
/// URL and the listener's answer (`None` if the redirect doesn't go to `http://IP:PORT`, e.g.
/// `localhost`: then hand the URL over as a user would paste it). Panics unless the server
/// redirects.
pub fn browse(url: &str) -> (String, Option<HttpResponse>) {
    let response = http("GET", url, None);
    assert_eq!(response.status, 302, "GET {url}: {response:?}");
    let location = response
        .header("location")
        .expect("a redirect has a Location")
        .to_string();
    let followed = location
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .filter(|authority| authority.parse::<SocketAddr>().is_ok())
        .map(|_| http("GET", &location, None));
    (location, followed)
}

/// Parses a successful `/token` answer; `Err(error code)` for an error answer.
pub fn parse_tokens(response: &HttpResponse) -> Result<Tokens, String> {
    if response.status != 200 {
        return Err(response
            .error()
            .unwrap_or_else(|| format!("HTTP {}", response.status)));
    }
    let v = response.json();
    assert_eq!(v["token_type"], "Bearer", "token_type in {v}");
    Ok(Tokens {
        access_token: v["access_token"]
            .as_str()
            .expect("access_token")
            .to_string(),
        refresh_token: v["refresh_token"].as_str().map(str::to_string),
        expires_in: v["expires_in"].as_u64().expect("expires_in"),
        scope: v["scope"].as_str().unwrap_or_default().to_string(),
    })
}

impl OAuthServer {
    /// The whole authorization-code flow as a native client runs it: PKCE pair, `/authorize`
    /// (checks the redirect carries `state`), `/token`. Panics if any step fails.
    pub fn enrol(&self, scope: &str) -> Tokens {
        let redirect_uri = "http://127.0.0.1:9/callback";
        let (verifier, challenge) = pkce_pair();
        let code = self.authorize(redirect_uri, scope, &challenge, "xyz-state");
        self.exchange_code(&code, redirect_uri, &verifier)
            .unwrap_or_else(|e| panic!("code exchange failed: {e}"))
    }

    /// `GET /authorize` with PKCE S256; returns the code from the redirect (checking
    /// `state`). Panics on anything but a redirect with a code.
    pub fn authorize(
        &self,
        redirect_uri: &str,
        scope: &str,
        challenge: &str,
        state: &str,
    ) -> String {
        let query = form_encode(&[
            ("response_type", "code"),
            ("client_id", CLIENT_ID),
            ("redirect_uri", redirect_uri),
            ("scope", scope),
            ("state", state),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ]);
        let response = http("GET", &format!("{}?{query}", self.authorize_url()), None);
        assert_eq!(response.status, 302, "authorize: {response:?}");
        let location = response.header("location").expect("Location").to_string();
        let (base, query) = location.split_once('?').expect("query in Location");
        assert_eq!(base, redirect_uri, "redirected to the redirect_uri");
        let params = parse_form(query).expect("query of Location");
        assert_eq!(params.get("state").map(String::as_str), Some(state));
        params
            .get("code")
            .unwrap_or_else(|| panic!("no code in {location}"))
            .clone()
    }

    /// `POST /token` with `grant_type=authorization_code`.
    pub fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
    ) -> Result<Tokens, String> {
        parse_tokens(&http(
            "POST",
            &self.token_url(),
            Some(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("client_id", CLIENT_ID),
                ("code_verifier", verifier),
            ]),
        ))
    }

    /// `POST /token` with `grant_type=refresh_token`.
    pub fn refresh(&self, refresh_token: &str) -> Result<Tokens, String> {
        parse_tokens(&http(
            "POST",
            &self.token_url(),
            Some(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("client_id", CLIENT_ID),
            ]),
        ))
    }

    /// `POST /device`.
    pub fn device_authorization(&self, scope: &str) -> DeviceAuthorization {
        let response = http(
            "POST",
            &self.device_url(),
            Some(&[("client_id", CLIENT_ID), ("scope", scope)]),
        );
        assert_eq!(response.status, 200, "device: {response:?}");
        let v = response.json();
        DeviceAuthorization {
            device_code: v["device_code"].as_str().expect("device_code").to_string(),
            user_code: v["user_code"].as_str().expect("user_code").to_string(),
            verification_uri: v["verification_uri"]
                .as_str()
                .expect("verification_uri")
                .to_string(),
            interval: v["interval"].as_u64().expect("interval"),
            expires_in: v["expires_in"].as_u64().expect("expires_in"),
        }
    }

    /// One device-flow poll of `/token`.
    pub fn poll_device(&self, device_code: &str) -> Result<Tokens, String> {
        parse_tokens(&http(
            "POST",
            &self.token_url(),
            Some(&[
                ("grant_type", DEVICE_GRANT),
                ("device_code", device_code),
                ("client_id", CLIENT_ID),
            ]),
        ))
    }
}

// ---------------------------------------------------------------------------------------
// IMAP AUTHENTICATE over a raw socket, to see exactly what Dovecot answers.

/// How an IMAP AUTHENTICATE ended.
#[derive(Debug)]
pub struct ImapAuth {
    /// The tagged reply line (without CRLF), e.g. `a OK [CAPABILITY ...] Logged in`.
    pub tagged: String,
    /// The decoded SASL error challenge, if Dovecot sent one before failing.
    pub challenge: Option<String>,
    /// From sending AUTHENTICATE to the tagged reply.
    pub elapsed: Duration,
    /// The session, still open (after OK: authenticated).
    pub stream: BufReader<TcpStream>,
}

impl ImapAuth {
    pub fn ok(&self) -> bool {
        self.tagged.starts_with("a OK")
    }

    /// Sends `b COMMAND` and returns every line up to the tagged reply.
    pub fn command(&mut self, command: &str) -> Vec<String> {
        self.stream
            .get_mut()
            .write_all(format!("b {command}\r\n").as_bytes())
            .expect("send IMAP command");
        let mut lines = Vec::new();
        loop {
            let line = read_line(&mut self.stream);
            let done = line.starts_with("b ");
            lines.push(line);
            if done {
                return lines;
            }
        }
    }
}

/// A loopback source address (127.1.x.y) that no other connection of this test binary used.
///
/// Dovecot 2.3 delays every authentication from an IP address that recently failed one (its
/// auth penalty, kept by anvil per remote IP and not configurable: 4 s after one failure, then
/// 8 s, 15 s at most). A test that provokes failures on purpose would otherwise wait that long
/// for each later login.
pub fn fresh_source() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(n < 250 * 250, "out of loopback source addresses");
    Ipv4Addr::new(127, 1, (n / 250) as u8, (n % 250 + 1) as u8)
}

/// Connects from `source` to 127.0.0.1:`port` and reads up to Dovecot's real greeting.
pub fn imap_connect(source: Ipv4Addr, port: u16) -> BufReader<TcpStream> {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from((source, 0)).into())
        .unwrap_or_else(|e| panic!("bind to {source}: {e}"));
    socket
        .connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)).into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect from {source} to IMAP port {port}: {e}"));
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut stream = BufReader::new(tcp);
    loop {
        let line = read_line(&mut stream);
        if line.starts_with("* OK") && !line.contains("Waiting for auth") {
            return stream;
        }
    }
}

fn read_line(stream: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    let n = stream.read_line(&mut line).expect("read IMAP line");
    assert!(n > 0, "IMAP server closed the connection");
    line.trim_end_matches(['\r', '\n']).to_string()
}

/// XOAUTH2's initial response: `user=USER^Aauth=Bearer TOKEN^A^A`.
pub fn xoauth2_initial(user: &str, token: &str) -> Vec<u8> {
    format!("user={user}\x01auth=Bearer {token}\x01\x01").into_bytes()
}

/// OAUTHBEARER's (RFC 7628): `n,a=USER,^Ahost=127.0.0.1^Aport=PORT^Aauth=Bearer TOKEN^A^A`.
pub fn oauthbearer_initial(user: &str, token: &str, port: u16) -> Vec<u8> {
    let user = user.replace('=', "=3D").replace(',', "=2C");
    format!("n,a={user},\x01host=127.0.0.1\x01port={port}\x01auth=Bearer {token}\x01\x01")
        .into_bytes()
}

/// Connects to `port` (plain IMAP) from a [`fresh_source`], waits for the real greeting and runs
/// `a AUTHENTICATE MECH <initial response>` (SASL-IR). An error challenge is answered as the
/// mechanism asks (XOAUTH2: empty line; OAUTHBEARER: `^A`), then the tagged reply is read.
pub fn imap_authenticate(port: u16, mechanism: &str, initial: &[u8]) -> ImapAuth {
    imap_authenticate_from(fresh_source(), port, mechanism, initial)
}

/// Like [`imap_authenticate`], from the loopback address `source`: several failures from one
/// address meet Dovecot's auth penalty.
pub fn imap_authenticate_from(
    source: Ipv4Addr,
    port: u16,
    mechanism: &str,
    initial: &[u8],
) -> ImapAuth {
    let mut stream = imap_connect(source, port);
    let started = Instant::now();
    let command = format!(
        "a AUTHENTICATE {mechanism} {}\r\n",
        STANDARD.encode(initial)
    );
    stream
        .get_mut()
        .write_all(command.as_bytes())
        .expect("send AUTHENTICATE");
    let mut challenge = None;
    loop {
        let line = read_line(&mut stream);
        if let Some(data) = line.strip_prefix("+") {
            let decoded = STANDARD
                .decode(data.trim())
                .unwrap_or_else(|e| panic!("challenge {line:?} is not base64: {e}"));
            challenge = Some(String::from_utf8_lossy(&decoded).into_owned());
            let answer: &[u8] = if mechanism.eq_ignore_ascii_case("OAUTHBEARER") {
                b"AQ==\r\n"
            } else {
                b"\r\n"
            };
            stream
                .get_mut()
                .write_all(answer)
                .expect("answer challenge");
        } else if line.starts_with("a ") {
            return ImapAuth {
                tagged: line,
                challenge,
                elapsed: started.elapsed(),
                stream,
            };
        }
    }
}

/// `AUTHENTICATE XOAUTH2` as `user` with `token`.
pub fn imap_xoauth2(port: u16, user: &str, token: &str) -> ImapAuth {
    imap_authenticate(port, "XOAUTH2", &xoauth2_initial(user, token))
}

/// `AUTHENTICATE OAUTHBEARER` as `user` with `token`.
pub fn imap_oauthbearer(port: u16, user: &str, token: &str) -> ImapAuth {
    imap_authenticate(port, "OAUTHBEARER", &oauthbearer_initial(user, token, port))
}

/// `a LOGIN user password`; returns the tagged reply.
pub fn imap_login(port: u16, user: &str, password: &str) -> String {
    let mut stream = imap_connect(fresh_source(), port);
    stream
        .get_mut()
        .write_all(format!("a LOGIN \"{user}\" \"{password}\"\r\n").as_bytes())
        .expect("send LOGIN");
    loop {
        let line = read_line(&mut stream);
        if line.starts_with("a ") {
            return line;
        }
    }
}
