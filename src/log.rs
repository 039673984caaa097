//! Where log lines go, and the fixed wording of the lines operators match on.
//!
//! Syslog (facility mail) by default; stderr with `<N>` priority prefixes (as systemd's journal
//! reads them) with `-l` or when there is no syslog socket. Stderr is used only when fd 2 is not
//! the client connection: under inetd and systemd's defaults it is, and a log line there would be
//! sent to the POP3 client. Nothing here ever receives a password or AUTH data.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

type Syslog = syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>;

enum Sink {
    Syslog(Syslog),
    Stderr,
    Nowhere,
}

struct Logger {
    sink: Mutex<Sink>,
    verbose: bool,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The local syslog socket, falling back to stderr (if safe).
    Syslog,
    /// Stderr with `<N>` prefixes (if safe).
    Stderr,
}

/// Sets up logging once per process. `stderr_safe` says whether fd 2 is something other than the
/// client connection.
pub fn init(target: Target, stderr_safe: bool, verbose: bool) {
    let fallback = if stderr_safe {
        Sink::Stderr
    } else {
        Sink::Nowhere
    };
    let sink = match target {
        Target::Stderr => fallback,
        Target::Syslog => {
            let formatter = syslog::Formatter3164 {
                facility: syslog::Facility::LOG_MAIL,
                hostname: None,
                process: "aiopopd".into(),
                pid: std::process::id(),
            };
            match syslog::unix(formatter) {
                Ok(l) => Sink::Syslog(l),
                Err(_) => fallback,
            }
        }
    };
    let _ = LOGGER.set(Logger {
        sink: Mutex::new(sink),
        verbose,
    });
}

#[derive(Clone, Copy)]
enum Level {
    Err = 3,
    Warning = 4,
    Info = 6,
    Debug = 7,
}

fn log(level: Level, msg: &str) {
    let Some(logger) = LOGGER.get() else { return };
    if matches!(level, Level::Debug) && !logger.verbose {
        return;
    }
    // A poisoned lock only means another thread panicked mid-log; keep logging.
    let mut sink = logger.sink.lock().unwrap_or_else(|e| e.into_inner());
    let _ = match &mut *sink {
        Sink::Syslog(l) => match level {
            Level::Err => l.err(msg),
            Level::Warning => l.warning(msg),
            Level::Info => l.info(msg),
            Level::Debug => l.debug(msg),
        },
        Sink::Stderr => {
            let line = format!("<{}>{msg}\n", level as u8);
            std::io::stderr()
                .write_all(line.as_bytes())
                .map_err(Into::into)
        }
        Sink::Nowhere => Ok(()),
    };
}

pub fn error(msg: &str) {
    log(Level::Err, msg)
}
pub fn warning(msg: &str) {
    log(Level::Warning, msg)
}
pub fn info(msg: &str) {
    log(Level::Info, msg)
}
pub fn debug(msg: &str) {
    log(Level::Debug, msg)
}

/// The one line fail2ban-style filters match; keep its wording stable (see contrib/).
pub fn login_failed(user: &str, reason: &str) {
    let peer = PEER.get().map_or("unknown", String::as_str);
    warning(&format!(
        "login failed: user={} rip={peer} reason={reason}",
        truncated(user.as_bytes())
    ))
}

static PEER: OnceLock<String> = OnceLock::new();

/// Remembers the client's address for the lines that name it.
pub fn set_peer(peer: String) {
    let _ = PEER.set(peer);
}

pub fn peer() -> &'static str {
    PEER.get().map_or("unknown", String::as_str)
}

/// Client-controlled bytes made safe for a log line: printable ASCII, at most 64 characters.
pub fn truncated(bytes: &[u8]) -> String {
    let mut s: String = bytes
        .iter()
        .take(64)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    if bytes.len() > 64 {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncates_and_escapes_client_bytes() {
        assert_eq!(super::truncated(b"ab\r\n\xff"), "ab???");
        assert_eq!(super::truncated(&[b'x'; 100]).len(), 67);
    }
}
