//! aiopopd: one POP3 session per process, proxied to one IMAP session.
//!
//! `main` is the one place that reports fatal errors and picks the exit code. It wires the
//! parts together: configuration, logging, the client connection, the IMAP backend, the session.
#![deny(unsafe_code)]

use aiopopd::config::{self, Action, Config};
use aiopopd::{check, conn, fd, imap, log, session, tls};
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
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let checking = args.iter().any(|a| a == "--check");
    match config::parse(args) {
        Ok(Action::Help) => {
            print!("{}", config::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Action::Version) => {
            println!("aiopopd {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Action::Serve(config)) => run(*config),
        Ok(Action::Authorize { config, user }) => {
            // A person runs the enrolment: stderr is theirs.
            drop(std::panic::take_hook());
            aiopopd::oauth::enrol::command(&config, &user)
        }
        Ok(Action::Check { config, user }) => {
            // A person (or a script) runs --check: no client, and stderr is theirs.
            drop(std::panic::take_hook());
            check::run(&config, user.as_deref())
        }
        Err(msg) if checking => {
            eprintln!("aiopopd --check: configuration error: {msg}\n(see aiopopd --help)");
            ExitCode::FAILURE
        }
        Err(msg) => refuse(&msg),
    }
}

/// A bad command line: say so in the log; in full, with the fix, on stderr wherever stderr is
/// not the client connection (a terminal, a pipe, a file, the journal); and to the client (if
/// there is one) as one POP3 error line rather than silence.
fn refuse(msg: &str) -> ExitCode {
    let conn = conn::RawConn::from_environment(Duration::from_secs(10));
    // Someone trying the command by hand: stdin, stdout and stderr are all their terminal,
    // and there is no client to protect.
    let at_terminal = conn.as_ref().is_ok_and(|c| c.is_terminal());
    let stderr_safe = at_terminal
        || conn
            .as_ref()
            .map_or(true, |c| fd::stderr_is_safe(c.client_fd()));
    // A terminal is no client, and the connection made it O_NONBLOCK for stderr too: let it go
    // (its flags restored) before writing there, or a write to a stopped terminal (Ctrl-S)
    // fails with EAGAIN and the explanation is lost.
    let client = conn.ok().filter(|c| !c.is_terminal());
    if stderr_safe && stderr_is_journal() {
        // systemd's StandardError=journal: the log is stderr, one entry per line.
        log::init(log::Target::Stderr, true, false);
        log::error("configuration error (the fix follows):");
        // Blank lines would be empty entries.
        for line in msg.lines().filter(|l| !l.trim().is_empty()) {
            log::error(line);
        }
    } else {
        log::init(log::Target::Syslog, false, false);
        let one_line: Vec<&str> = msg.lines().map(str::trim).collect();
        log::error(&format!("configuration error: {}", one_line.join(" ")));
        if stderr_safe {
            eprintln!("aiopopd: {msg}\n(see aiopopd --help)");
        }
    }
    if let Some(mut c) = client {
        let _ = c.write_all(b"-ERR [SYS/PERM] aiopopd is misconfigured; see the server log.\r\n");
    }
    ExitCode::from(2)
}

/// Whether fd 2 is the journal's stream (`$JOURNAL_STREAM` names its device and inode).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(named) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = fd::dup(std::io::stderr().as_fd()).and_then(|f| f.metadata()) else {
        return false;
    };
    named.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
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
    // --proxy-protocol-from: a balancer's connection starts with the client's address (before
    // TLS); a trusted peer that doesn't send it is closed unserved.
    let Some(mut raw) = raw.accept_proxy_header(&config.proxy_protocol_from) else {
        return ExitCode::SUCCESS;
    };
    // Pre-login limits, counted from connect: a client that never finishes the TLS handshake,
    // or never logs in however busy it keeps us, does not hold this process for long.
    raw.set_prelogin_limits(config.handshake_timeout, started + config.login_timeout);
    log::set_peer(raw.peer_name());
    log::debug(&format!("connection from {}", log::peer()));
    // A balancer's health check (PROXY LOCAL or UNKNOWN) that logs no one in: not worth a
    // line every few seconds.
    let health_check = raw.is_health_check();

    let backend = imap::ImapBackend::new(config.imap.clone());
    let settings = session::Settings {
        hostname: config.hostname.clone(),
        allow_plaintext_auth: config.allow_plaintext_auth,
        uidl_format: config.uidl_format.clone(),
        sasl: config.sasl.clone(),
        auth_failure_delay: config.auth_failure_delay,
        login_timeout: config.login_timeout,
    };
    let stream = match &config.tls {
        None => conn::Stream::plain(raw, None),
        // Read at the first STLS (per process, so a renewed certificate is used from the next
        // connection on); one that can't be loaded gets the client a clear -ERR then.
        Some(t) if t.stls => conn::Stream::plain(raw, Some(tls::Deferred::Files(t.files.clone()))),
        Some(t) => {
            // Read per process: a renewed certificate is used from the next connection on.
            let server_config = match tls::server_config(&t.files) {
                Ok(c) => c,
                Err(e) => {
                    log::error(&format!("TLS: {e}"));
                    return ExitCode::FAILURE;
                }
            };
            match conn::Stream::implicit_tls(raw, server_config) {
                Ok(s) => s,
                Err(e) => {
                    session::log_handshake_failure(&e);
                    return ExitCode::SUCCESS;
                }
            }
        }
    };
    let mut peer = conn::Conn::new(stream);
    let summary = session::Session::new(backend, settings).run(&mut peer);
    if !peer.is_dead() {
        peer.stream_mut().close();
    }
    let log_end = if health_check && summary.user.is_none() {
        log::debug
    } else {
        log::info
    };
    log_end(&format!(
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
