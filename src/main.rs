//! aiopopd: one POP3 session per process, proxied to one IMAP session.
//!
//! `main` is the one place that reports fatal errors and picks the exit code. It wires the
//! parts together: configuration, logging, the client connection, the IMAP backend, the session.
#![deny(unsafe_code)]

use aiopopd::config::{self, Action, Config};
use aiopopd::{conn, fd, imap, log, session, tls};
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    // Before anything could write to fd 2 or hold a password.
    fd::detach_stderr_from_client();
    fd::forbid_core_dumps();
    // Fd 2 is often the client socket: a panic message must go to the log, never there.
    std::panic::set_hook(Box::new(|info| {
        log::error(&format!("internal error (please report): {info}"));
    }));
    match config::parse(std::env::args_os().skip(1).collect()) {
        Ok(Action::Help) => {
            print!("{}", config::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Action::Version) => {
            println!("aiopopd {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Action::Serve(config)) => run(*config),
        Err(msg) => refuse(&msg),
    }
}

/// A bad command line: say so in the log, on stderr if that is safe, and to the client (if
/// there is one) as a POP3 error rather than silence.
fn refuse(msg: &str) -> ExitCode {
    let conn = conn::RawConn::from_environment(Duration::from_secs(10));
    let stderr_safe = conn
        .as_ref()
        .map_or(true, |c| fd::stderr_is_safe(c.client_fd()));
    log::init(log::Target::Syslog, false, false);
    log::error(&format!("configuration error: {msg}"));
    if stderr_safe {
        eprintln!("aiopopd: {msg}\n(see aiopopd --help)");
    }
    if let Ok(mut c) = conn {
        if !c.is_terminal() {
            let _ =
                c.write_all(b"-ERR [SYS/PERM] aiopopd is misconfigured; see the server log.\r\n");
        }
    }
    ExitCode::from(2)
}

fn run(config: Config) -> ExitCode {
    let started = Instant::now();
    let raw = match conn::RawConn::from_environment(config.timeout) {
        Ok(c) => c,
        Err(e) => {
            log::init(config.log_target, false, config.verbose);
            log::error(&format!("can't use the client connection: {e}"));
            return ExitCode::FAILURE;
        }
    };
    log::init(
        config.log_target,
        fd::stderr_is_safe(raw.client_fd()),
        config.verbose,
    );
    log::set_peer(raw.peer_name());
    log::debug(&format!("connection from {}", log::peer()));

    let backend = imap::ImapBackend::new(config.imap.clone());
    let settings = session::Settings {
        hostname: config.hostname.clone(),
        allow_plaintext_auth: config.allow_plaintext_auth,
        uidl_format: config.uidl_format.clone(),
        sasl: config.sasl.clone(),
        auth_failure_delay: config.auth_failure_delay,
    };
    let stream = match &config.tls {
        None => conn::Stream::plain(raw, None),
        Some(t) => {
            // Read per process: a renewed certificate is used from the next connection on.
            let server_config = match tls::server_config(&t.files) {
                Ok(c) => c,
                Err(e) => {
                    log::error(&format!("TLS: {e}"));
                    return ExitCode::FAILURE;
                }
            };
            if t.stls {
                conn::Stream::plain(raw, Some(server_config))
            } else {
                match conn::Stream::implicit_tls(raw, server_config) {
                    Ok(s) => s,
                    Err(e) => {
                        session::log_handshake_failure(&e);
                        return ExitCode::SUCCESS;
                    }
                }
            }
        }
    };
    let mut peer = conn::Conn::new(stream);
    let summary = session::Session::new(backend, settings).run(&mut peer);
    if !peer.is_dead() {
        peer.stream_mut().close();
    }
    log::info(&format!(
        "session end: rip={} user={} listed={} retrieved={} deleted={} bytes={} duration={:.3}s outcome={}",
        log::peer(),
        summary.user.as_deref().unwrap_or("-"),
        summary.listed,
        summary.retrieved,
        summary.deleted,
        summary.bytes,
        started.elapsed().as_secs_f64(),
        summary.outcome,
    ));
    ExitCode::SUCCESS
}
