//! Where the password comes from (`-p pass:NAME`, `plain:VALUE`, `env:VAR`, or asked for),
//! and the [`Secret`] that carries it. The password is only ever written to the server; the
//! transcript shows `PASS ...`.

use crate::Failure;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::process::{Command, Stdio};

/// The server's own redacted wrapper: its `Debug` never shows the password, and its memory is
/// cleared when dropped.
pub use aiopopd::secret::Secret;

/// A password as a [`Secret`], refusing what can't go on a PASS line: nothing at all, or a CR,
/// LF or NUL (which would end the line early and let the rest be read as another command).
pub fn secret(bytes: Vec<u8>, from: &str) -> Result<Secret, Failure> {
    if bytes.is_empty() {
        return Err(Failure(format!("the password from {from} is empty")));
    }
    if bytes.iter().any(|b| b"\r\n\0".contains(b)) {
        return Err(Failure(format!(
            "the password from {from} contains a CR, LF or NUL"
        )));
    }
    Ok(Secret::new(bytes))
}

/// `-p` as given.
#[derive(Debug, Clone)]
pub enum PasswordSource {
    /// `pass:NAME`: the first line of what `pass NAME` prints.
    Pass(OsString),
    /// `plain:VALUE`.
    Plain(Secret),
    /// `env:VAR`.
    Env(OsString),
    /// No `-p`: ask on the terminal, or read a line from stdin when it isn't one.
    Ask,
}

impl PasswordSource {
    pub fn parse(s: &OsStr) -> Result<PasswordSource, String> {
        let bytes = s.as_bytes();
        let (scheme, rest) = match bytes.iter().position(|&b| b == b':') {
            Some(i) => (&bytes[..i], &bytes[i + 1..]),
            None => (bytes, &b""[..]),
        };
        let rest = OsStr::from_bytes(rest).to_os_string();
        match scheme {
            b"pass" if !rest.is_empty() => Ok(PasswordSource::Pass(rest)),
            b"env" if !rest.is_empty() => Ok(PasswordSource::Env(rest)),
            b"plain" => secret(rest.into_vec(), "-p plain:")
                .map(PasswordSource::Plain)
                .map_err(|f| f.0),
            // Never echo `s`: it may be a password typed without its `plain:`.
            _ => Err("-p/--password-source: use pass:NAME, plain:VALUE or env:VAR".into()),
        }
    }
}

/// Gets the password; `user` and `host` only go into the prompt.
pub fn obtain(source: &PasswordSource, user: &str, host: &str) -> Result<Secret, Failure> {
    match source {
        PasswordSource::Plain(secret) => Ok(secret.clone()),
        PasswordSource::Env(var) => {
            let from = format!("env:{}", var.to_string_lossy());
            let value = std::env::var_os(var)
                .ok_or_else(|| Failure(format!("{from}: the variable is not set")))?;
            secret(value.into_vec(), &from)
        }
        PasswordSource::Pass(name) => from_pass(name),
        PasswordSource::Ask if std::io::stdin().is_terminal() => {
            ask_terminal(&format!("Password for {user} on {host}: "))
        }
        PasswordSource::Ask => {
            let mut line = Vec::new();
            std::io::stdin()
                .lock()
                .read_until(b'\n', &mut line)
                .map_err(|e| Failure(format!("cannot read the password from stdin: {e}")))?;
            if line.is_empty() {
                return Err(Failure(
                    "no password: stdin is empty (and not a terminal to ask on); see -p".into(),
                ));
            }
            secret(first_line(line), "stdin")
        }
    }
}

/// Runs `pass NAME` with our terminal, so that gpg can ask for its passphrase.
fn from_pass(name: &OsStr) -> Result<Secret, Failure> {
    let shown = format!("`pass {}`", name.to_string_lossy());
    let out = Command::new("pass")
        .arg(name)
        .stdin(Stdio::inherit())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Failure(format!("cannot run {shown}: {e}")))?;
    if !out.status.success() {
        return Err(Failure(format!("{shown} failed ({})", out.status)));
    }
    secret(first_line(out.stdout), &shown)
}

/// The bytes up to the first LF, without a CR before it.
fn first_line(mut bytes: Vec<u8>) -> Vec<u8> {
    if let Some(i) = bytes.iter().position(|&b| b == b'\n') {
        bytes.truncate(i);
    }
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    bytes
}

/// Prompts on /dev/tty with echo turned off by `stty`, and turns it back on whatever happens
/// (short of a signal: after Ctrl-C at the prompt, `stty echo` repairs the terminal).
fn ask_terminal(prompt: &str) -> Result<Secret, Failure> {
    let fail = |e: std::io::Error| Failure(format!("cannot ask for the password on /dev/tty: {e}"));
    let mut tty = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(fail)?;
    let saved = stty(&tty, &["-g"])?;
    stty(&tty, &["-echo"])?;
    let line = (|| {
        tty.write_all(prompt.as_bytes())?;
        tty.flush()?;
        read_line(&mut tty)
    })();
    let restored = stty(&tty, &[saved.trim()]);
    let _ = tty.write_all(b"\n");
    let line = line.map_err(fail)?;
    restored?;
    secret(first_line(line), "the terminal")
}

/// One line, a byte at a time: nothing after the LF is taken from the terminal.
fn read_line(tty: &mut File) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while tty.read(&mut byte)? == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    Ok(line)
}

/// Runs `stty ARGS` on the terminal; returns what it printed.
fn stty(tty: &File, args: &[&str]) -> Result<String, Failure> {
    let fail = |e: String| Failure(format!("cannot turn off echo with stty ({e}); use -p"));
    let out = Command::new("stty")
        .args(args)
        .stdin(tty.try_clone().map_err(|e| fail(e.to_string()))?)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(out.status.to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<PasswordSource, String> {
        PasswordSource::parse(OsStr::new(s))
    }

    #[test]
    fn sources() {
        assert!(
            matches!(parse("pass:mail/alice"), Ok(PasswordSource::Pass(n)) if n == "mail/alice")
        );
        assert!(matches!(parse("env:PW"), Ok(PasswordSource::Env(v)) if v == "PW"));
        match parse("plain:a:b c") {
            Ok(PasswordSource::Plain(s)) => assert_eq!(s.expose(), b"a:b c"),
            other => panic!("{other:?}"),
        }
        for bad in ["", "pass:", "env:", "plain:", "hunter2", "file:/x"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // A password given without its `plain:` is not echoed back.
        assert!(!parse("hunter2").unwrap_err().contains("hunter2"));
        assert!(parse("plain:a\r\nDELE 1").is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        let s = secret(b"hunter2".to_vec(), "test").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        let src = PasswordSource::Plain(s);
        assert!(!format!("{src:?}").contains("hunter2"));
    }

    #[test]
    fn first_line_drops_the_rest() {
        assert_eq!(first_line(b"pw\r\nlogin: x\n".to_vec()), b"pw");
        assert_eq!(first_line(b"pw".to_vec()), b"pw");
        assert_eq!(first_line(b"\nx".to_vec()), b"");
    }
}
