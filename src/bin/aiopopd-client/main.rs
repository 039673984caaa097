//! aiopopd-client: a strict POP3 client that runs one check session against a server and
//! prints it, so that people can check their set-up before pointing Gmail at it (the Rust
//! successor of the Python aiopopd's client.py).
//!
//! `main` is the one place that prints a fatal error and picks the exit code: 0 when every step
//! succeeded, 1 when a step failed or the server broke the protocol, 2 for a bad command line.
//! The parts: [`args`] (command line → config), [`password`] (where the password comes from),
//! [`net`] (TCP and TLS), [`wire`] (strict framing), [`check`] (the session itself) and
//! [`meter`] (the summary and progress on stderr; stdout carries only the transcript).
#![deny(unsafe_code)]

mod args;
mod check;
mod meter;
mod net;
mod password;
mod wire;

use args::{Action, Config, Trust};
use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

/// Why the check failed, worded for the person running it. Everything that goes wrong after
/// the command line was accepted ends up as one of these, printed once by `main`.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure(s)
    }
}

fn main() -> ExitCode {
    match args::parse(std::env::args_os().skip(1).collect()) {
        Ok(Action::Help) => {
            print!("{}", args::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Action::Version) => {
            println!("aiopopd-client {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Action::Check(config)) => match run(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => {
                // The transcript so far first, so the reason comes after the step it is about.
                let _ = std::io::stdout().flush();
                eprintln!("aiopopd-client: FAILED: {failure}");
                ExitCode::FAILURE
            }
        },
        Err(msg) => {
            eprintln!("aiopopd-client: {msg}\n(see aiopopd-client --help)");
            ExitCode::from(2)
        }
    }
}

fn run(config: &Config) -> Result<(), Failure> {
    if matches!(config.trust, Trust::Insecure) {
        eprintln!(
            "aiopopd-client: WARNING: --insecure: the server's TLS certificate is NOT checked.\n\
             aiopopd-client: WARNING: anyone on the way to the server can pose as it and read \
             the password.\n\
             aiopopd-client: WARNING: use --ca FILE to trust a self-signed certificate instead."
        );
    }
    // Before connecting, so that a slow typist doesn't run into the server's idle timeout.
    let password = password::obtain(&config.password, &config.user, &config.host)?;
    let started = Instant::now();
    let mut connection = net::connect(config)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut meter = meter::Meter::for_stderr();
    let result = check::run(&mut connection, config, &password, &mut out, &mut meter);
    // The transcript first; then, whether or not the check passed, what it retrieved.
    let _ = out.flush();
    eprintln!("{}", meter.summary(started.elapsed()));
    result
}
