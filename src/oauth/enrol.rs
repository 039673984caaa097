//! `aiopopd --oauth2-authorize USER`: the one-time enrolment. The user opens the printed URL,
//! grants access, and the provider redirects the browser to a loopback URL this process
//! listens on (or the user pastes the redirected URL, for a browser on another machine); the
//! code is exchanged for tokens, which go into the user's store sealed with the POP3 password.
//! With a `device_authorization_url`, RFC 8628's device flow runs alongside: whichever the user
//! completes first wins.

use super::flow::{self, Granted, Pkce, Provider};
use super::store::{KdfParams, Store, Tokens};
use crate::secret::Secret;
use std::io::Read as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long the enrolment waits for the user.
const PATIENCE: Duration = Duration::from_secs(600);

pub struct Enrolment<'a> {
    pub provider: &'a Provider,
    pub store: &'a Store,
    pub ca: Option<&'a Path>,
    pub timeout: Duration,
    pub kdf: KdfParams,
}

/// What a way of enrolling came to.
enum Outcome {
    Code(String),
    Granted(Granted),
    Failed(String),
    /// The device flow failed or its code expired: the browser and paste ways go on.
    DeviceEnded(String),
}

impl Enrolment<'_> {
    /// Runs the enrolment; `pasted` yields the lines the user types (a redirected URL), `out`
    /// is where the instructions go (the authorize URL on a line of its own).
    pub fn run(
        &self,
        password: &Secret,
        pasted: mpsc::Receiver<String>,
        out: &mut dyn Write,
    ) -> Result<(), String> {
        let p = self.provider;
        p.check()?;
        let (listener, redirect_uri) = listen(p.redirect_uri.as_deref())?;
        let pkce = Pkce::new().map_err(|e| e.to_string())?;
        let state = flow::random_token(16).map_err(|e| e.to_string())?;
        let url = flow::authorize_url(p, &redirect_uri, &state, &pkce);
        let w = |out: &mut dyn Write, s: String| {
            let _ = writeln!(out, "{s}");
            let _ = out.flush();
        };
        w(out, "Open this URL in a browser and grant access:".into());
        w(out, String::new());
        w(out, url);
        w(out, String::new());
        w(
            out,
            format!(
                "The browser is sent back to {redirect_uri}, where this command is waiting. \
                 If the browser runs on another machine, paste the address it ends up on here."
            ),
        );
        let (tx, rx) = mpsc::channel();
        // The device flow is offered on top of the URL above: its failure only takes it away.
        let device = match &p.device_authorization_url {
            Some(_) => match flow::device_start(p, self.ca, self.timeout) {
                Ok(d) => {
                    w(
                        out,
                        format!(
                            "Or, on any device, open {} and enter the code {}",
                            d.verification_uri, d.user_code
                        ),
                    );
                    Some(d)
                }
                Err(e) => {
                    w(
                        out,
                        format!("The device flow is unavailable: {e}; use the URL above."),
                    );
                    None
                }
            },
            None => None,
        };
        let done = std::sync::atomic::AtomicBool::new(false);
        let done = &done;
        std::thread::scope(|scope| -> Result<(), String> {
            {
                let tx = tx.clone();
                let state = state.clone();
                scope.spawn(move || {
                    if let Some(o) = accept_redirect(&listener, &state, done) {
                        let _ = tx.send(o);
                    }
                });
            }
            if let Some(d) = &device {
                let tx = tx.clone();
                scope.spawn(move || {
                    let _ = tx.send(self.poll_device(d, done));
                });
            }
            {
                let tx = tx.clone();
                let state = state.clone();
                scope.spawn(move || loop {
                    let line = match pasted.recv_timeout(Duration::from_millis(200)) {
                        Ok(line) => line,
                        Err(mpsc::RecvTimeoutError::Timeout) if !done.load(Relaxed) => continue,
                        Err(_) => return,
                    };
                    let line = line.trim();
                    if line.is_empty() {
                        continue;
                    }
                    let o = match flow::code_from_redirect(line, &state) {
                        Ok(code) => Outcome::Code(code),
                        Err(e) => Outcome::Failed(e),
                    };
                    let _ = tx.send(o);
                    return;
                });
            }
            drop(tx);
            // The first outcome that ends the enrolment; a device flow that ended only notes
            // so. When every way has ended (the channel disconnects), the last reason stands.
            let until = Instant::now() + PATIENCE;
            let mut ended = "no way of enrolling remains".to_string();
            let outcome = loop {
                match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(Outcome::DeviceEnded(e)) => {
                        w(
                            out,
                            format!("The device flow ended: {e}; use the URL above."),
                        );
                        ended = format!("device flow: {e}");
                    }
                    Ok(o) => break o,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        break Outcome::Failed("no answer within 10 minutes".into())
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break Outcome::Failed(ended),
                }
            };
            done.store(true, Relaxed);
            let granted = match outcome {
                Outcome::Failed(e) | Outcome::DeviceEnded(e) => return Err(e),
                Outcome::Granted(g) => g,
                Outcome::Code(code) => flow::exchange_code(
                    p,
                    &code,
                    &redirect_uri,
                    &pkce.verifier,
                    self.ca,
                    self.timeout,
                )
                .map_err(|e| format!("exchanging the code at {}: {e}", p.token_url))?,
            };
            if granted.refresh_token.is_none() {
                return Err(format!(
                    "the provider gave no refresh token: add offline access to the scope \
                     (Microsoft: offline_access; Google: it is implied for {})",
                    p.scope
                ));
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let tokens = Tokens {
                refresh_token: granted.refresh_token.clone(),
                access_token: Some(granted.access_token.clone()),
                expires_at: Some(now + granted.expires_in.unwrap_or(3600)),
            };
            self.store
                .create(password, self.kdf, &tokens)
                .map_err(|e| format!("writing {}: {e}", self.store.path.display()))?;
            w(
                out,
                format!("Enrolled: the tokens are in {}.", self.store.path.display()),
            );
            Ok(())
        })
    }

    fn poll_device(&self, d: &flow::Device, done: &std::sync::atomic::AtomicBool) -> Outcome {
        let until = Instant::now() + Duration::from_secs(d.expires_in).min(PATIENCE);
        let mut interval = Duration::from_secs(d.interval.unwrap_or(5).max(1));
        while Instant::now() < until && !done.load(Relaxed) {
            // Sleeps in short steps so that another way finishing ends this one soon.
            let wake = Instant::now() + interval;
            while Instant::now() < wake && !done.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            if done.load(Relaxed) {
                break;
            }
            match flow::device_poll(self.provider, &d.device_code, self.ca, self.timeout) {
                Ok(flow::Poll::Granted(g)) => return Outcome::Granted(g),
                Ok(flow::Poll::Pending) => {}
                Ok(flow::Poll::SlowDown) => interval += Duration::from_secs(5),
                Err(e) => return Outcome::DeviceEnded(e.to_string()),
            }
        }
        Outcome::DeviceEnded("the device code expired".into())
    }
}

/// Binds the loopback redirect URI (or 127.0.0.1 on a free port when none is configured: a
/// loopback redirect with any port is what Google and Microsoft accept for such clients).
fn listen(configured: Option<&str>) -> Result<(TcpListener, String), String> {
    match configured {
        Some(uri) => {
            let u = super::http::Url::parse(uri)?;
            let l = TcpListener::bind((u.host.as_str(), u.port))
                .map_err(|e| format!("listening on {uri} (redirect_uri): {e}"))?;
            Ok((l, uri.to_string()))
        }
        None => {
            let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            let port = l.local_addr().map_err(|e| e.to_string())?.port();
            Ok((l, format!("http://127.0.0.1:{port}/")))
        }
    }
}

/// Serves the browser's redirect: answers each request with a short page, until one carries
/// this enrolment's state (and a code or an error), or `done`.
fn accept_redirect(
    l: &TcpListener,
    state: &str,
    done: &std::sync::atomic::AtomicBool,
) -> Option<Outcome> {
    l.set_nonblocking(true).ok()?;
    while !done.load(Relaxed) {
        let s = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(_) => return None,
        };
        if let Some(o) = one_request(s, state) {
            return Some(o);
        }
    }
    None
}

fn one_request(s: TcpStream, state: &str) -> Option<Outcome> {
    s.set_nonblocking(false).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut line = String::new();
    r.by_ref().take(8192).read_line(&mut line).ok()?;
    let target = line.split(' ').nth(1).unwrap_or_default().to_string();
    let outcome = if target.contains("state=") {
        Some(match flow::code_from_redirect(&target, state) {
            Ok(code) => Outcome::Code(code),
            Err(e) => Outcome::Failed(e),
        })
    } else {
        None // A favicon, a probe: not the redirect.
    };
    let text = match &outcome {
        Some(Outcome::Code(_)) => "aiopopd has the authorization; you can close this window.",
        Some(_) => "aiopopd: the authorization failed; see the terminal.",
        None => "aiopopd is waiting for the authorization redirect.",
    };
    let mut s = s;
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{text}",
        text.len()
    );
    outcome
}

/// `aiopopd --oauth2-authorize USER`: the enrolment as a command; 0 once the store is written.
pub fn command(config: &crate::config::Config, user: &str) -> std::process::ExitCode {
    match enrol_user(config, user) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aiopopd --oauth2-authorize {user}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn enrol_user(config: &crate::config::Config, user: &str) -> Result<(), String> {
    use crate::maildrop::Error;
    use std::io::IsTerminal;
    let account = config.imap.accounts.lookup(user).map_err(|e| match e {
        Error::Auth(_) => format!("no usable user file for {user} in --user-dir"),
        e => e.to_string(),
    })?;
    let provider = account
        .oauth2
        .ok_or("the user's file has no \"oauth2\" section")?;
    let state_dir = config.imap.state_dir.as_deref().ok_or("no --state-dir")?;
    let read = |prompt: &str| -> Result<Secret, String> {
        crate::terminal::read_secret(prompt)
            .map_err(|e| format!("reading the password: {e}"))?
            .ok_or_else(|| "no password (stdin is empty)".to_string())
    };
    let password = read(&format!(
        "POP3 password for {user} (the one its POP3 client will send; it unlocks the tokens): "
    ))?;
    if std::io::stdin().is_terminal() {
        let again = read("The same password again: ")?;
        if again.expose() != password.expose() {
            return Err("the two passwords differ".into());
        }
    }
    if password.expose().is_empty() {
        return Err("an empty password".into());
    }
    // Lines typed (or piped) after the password: a redirected URL pasted by the user.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(l) = line else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let store = Store::new(state_dir, user);
    Enrolment {
        provider: &provider,
        store: &store,
        ca: config.imap.ca.as_deref(),
        timeout: config.imap.timeout,
        kdf: KdfParams::default(),
    }
    .run(&password, rx, &mut std::io::stdout())?;
    give_to_state_dir_owner(state_dir, &store.path)
}

/// The sessions run as the service's user, which must read and rewrite the store: run as root,
/// the enrolment hands the store (and its directory) to whoever owns `--state-dir` (systemd's
/// `StateDirectory=` makes that the service's user; for xinetd, the administrator does).
fn give_to_state_dir_owner(state_dir: &Path, store: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let owner =
        std::fs::metadata(state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    // The store was just created: its owner is who we run as. Only root can give it away.
    let mine = std::fs::metadata(store)
        .map_err(|e| format!("{}: {e}", store.display()))?
        .uid();
    if mine != 0 || owner.uid() == 0 {
        return Ok(());
    }
    for path in [store.parent().unwrap_or(state_dir), store] {
        std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid()))
            .map_err(|e| format!("handing {} to uid {}: {e}", path.display(), owner.uid()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::oauth::testing::CHEAP;

    const GRANT: &str = r#"{"access_token":"A1","expires_in":3600,"refresh_token":"R1"}"#;

    /// A provider answering its requests, whatever the path, with `answers` in turn; its URL.
    fn endpoint(answers: Vec<(u16, &'static str)>) -> String {
        let answers = answers.into_iter().map(|(c, b)| (c, b.to_string()));
        crate::oauth::testing::endpoint(answers.collect()).0
    }

    /// The instructions, a line at a time, as the user reads them.
    struct Lines(Vec<u8>, mpsc::Sender<String>);

    impl Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(b);
            while let Some(i) = self.0.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.0.drain(..=i).collect();
                let _ = self
                    .1
                    .send(String::from_utf8_lossy(&line).trim_end().to_string());
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Enrols with `device_url` as the device endpoint: reads the instructions up to the line
    /// starting with `note`, then pastes a redirect with a code for the provider at
    /// `token_url` to exchange. The refresh token the store then holds.
    fn enrol_past_a_device_failure(
        device_url: &str,
        token_url: &str,
        note: &str,
    ) -> Result<String, String> {
        let dir = tempfile::tempdir().unwrap();
        let provider: Provider = serde_json::from_value(serde_json::json!({
            "authorize_url": "http://127.0.0.1:1/authorize", "token_url": token_url,
            "device_authorization_url": device_url, "client_id": "cid", "scope": "mail"
        }))
        .unwrap();
        let store = Store::new(dir.path(), "alice");
        let pw = Secret::new(b"pw".to_vec());
        let (paste, pasted) = mpsc::channel();
        let (shown, lines) = mpsc::channel();
        std::thread::scope(|sc| {
            let run = sc.spawn(|| {
                Enrolment {
                    provider: &provider,
                    store: &store,
                    ca: None,
                    timeout: Duration::from_secs(5),
                    kdf: CHEAP,
                }
                .run(&pw, pasted, &mut Lines(Vec::new(), shown))
            });
            let mut state = None;
            for line in lines.iter() {
                if let Some((_, rest)) = line.split_once("&state=") {
                    state = rest.split('&').next().map(str::to_string);
                }
                if line.starts_with(note) {
                    break;
                }
            }
            let state = state.expect("the authorize URL");
            // Unsent if the enrolment already ended: its error is the test's answer.
            let _ = paste.send(format!("http://127.0.0.1/?code=C&state={state}"));
            run.join().unwrap()
        })?;
        let (_, t) = store.open(&pw).unwrap();
        Ok(t.refresh_token.clone().unwrap())
    }

    /// The device endpoint unreachable: a note, and the pasted redirect still enrols.
    #[test]
    fn a_device_flow_that_cannot_start_leaves_the_browser_flow() {
        let url = endpoint(vec![(200, GRANT)]);
        let r = enrol_past_a_device_failure(
            "http://127.0.0.1:9/device",
            &format!("{url}/token"),
            "The device flow is unavailable: ",
        );
        assert_eq!(r.unwrap(), "R1");
    }

    /// The user refuses on the device: a note, and the pasted redirect still enrols.
    #[test]
    fn a_refused_device_flow_leaves_the_browser_flow() {
        let url = endpoint(vec![
            (
                200,
                r#"{"device_code":"D","user_code":"U","verification_uri":"http://127.0.0.1/d",
                    "expires_in":600,"interval":1}"#,
            ),
            (400, r#"{"error":"access_denied"}"#),
            (200, GRANT),
        ]);
        let r = enrol_past_a_device_failure(
            &format!("{url}/device"),
            &format!("{url}/token"),
            "The device flow ended: access_denied; use the URL above.",
        );
        assert_eq!(r.unwrap(), "R1");
    }
}
