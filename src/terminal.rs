//! Reading a password from whoever runs a command (`--check -u`, `--oauth2-authorize`): from
//! the terminal without echo, or as a line of stdin when stdin is not a terminal.

use crate::secret::Secret;
use std::io::{self, BufRead, IsTerminal, Write};
use zeroize::Zeroizing;

/// One password: `prompt` on stderr and echo off when stdin is a terminal, else the next line
/// of stdin. `None` at the end of stdin.
pub fn read_secret(prompt: &str) -> io::Result<Option<Secret>> {
    let stdin = io::stdin();
    let mut line = Zeroizing::new(String::new());
    let n = if stdin.is_terminal() {
        eprint!("{prompt}");
        let _ = io::stderr().flush();
        let saved = echo_off();
        let n = stdin.lock().read_line(&mut line);
        if let Some(saved) = saved {
            restore_echo(&saved);
        }
        n?
    } else {
        stdin.lock().read_line(&mut line)?
    };
    if n == 0 {
        return Ok(None);
    }
    let pw = line.trim_end_matches(['\r', '\n']);
    Ok(Some(Secret::new(pw.as_bytes().to_vec())))
}

/// Switches echo off on the terminal on stdin (newlines still echo); the old settings.
#[allow(unsafe_code)]
fn echo_off() -> Option<libc::termios> {
    let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr writes a whole termios into the pointer it is given on success, and
    // only then is it read.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, t.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: initialised by the successful tcgetattr above.
    let saved = unsafe { t.assume_init() };
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: a valid termios for the terminal on fd 0.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSAFLUSH, &quiet) } != 0 {
        return None;
    }
    Some(saved)
}

#[allow(unsafe_code)]
fn restore_echo(saved: &libc::termios) {
    // SAFETY: the termios tcgetattr returned for the same terminal.
    unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSAFLUSH, saved) };
}
