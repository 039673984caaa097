//! The few operations on raw file descriptors and on the process that std doesn't offer: taking
//! over the socket systemd passed as fd 3, poll(2) with a timeout, the O_NONBLOCK flag, pointing
//! fd 2 away from the client, and no core dumps. This is the only module allowed `unsafe`; each
//! block is a single libc call on an fd we own or borrow, or on the process itself.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::Instant;

/// The connection systemd passed as fd 3 (`Accept=yes` without `StandardInput=socket`), if
/// `LISTEN_FDS=1` and `LISTEN_PID` is us. Consumes the variables so children don't see them.
pub fn take_listen_fd() -> io::Result<Option<OwnedFd>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() != 1 {
        return Ok(None);
    }
    match fds.take_raw_fd(0)? {
        // SAFETY: systemd passed this fd to us and nothing else in the process owns it;
        // listenfd hands each fd out only once.
        Some(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) })),
        None => Ok(None),
    }
}

/// Waits until `fd` is readable (or writable), or fails with `TimedOut` at `deadline`.
pub fn wait(fd: BorrowedFd<'_>, write: bool, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: if write { libc::POLLOUT } else { libc::POLLIN },
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return Ok(());
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Sets O_NONBLOCK on `fd`; returns the previous flags so they can be restored.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on a borrowed, open fd; F_GETFL/F_SETFL don't touch memory.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    set_flags(fd, flags | libc::O_NONBLOCK)?;
    Ok(flags)
}

pub fn set_flags(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An owned duplicate of a borrowed fd, as a `File` for reading and writing.
pub fn dup(fd: BorrowedFd<'_>) -> io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}

pub fn is_socket(fd: BorrowedFd<'_>) -> bool {
    dup(fd)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.file_type().is_socket())
}

/// True if both fds refer to the same file (e.g. fd 2 is the client socket under inetd).
/// A closed or unreadable fd counts as the same, so nothing is written to it.
pub fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let meta = |fd| dup(fd).and_then(|f| f.metadata());
    match (meta(a), meta(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => true,
    }
}

/// Whether stderr is safe to log to: open, and not the same file as the client connection.
pub fn stderr_is_safe(client: BorrowedFd<'_>) -> bool {
    !same_file(std::io::stderr().as_fd(), client)
}

/// Under inetd (and systemd's defaults for `StandardInput=socket`) fd 2 is the client socket:
/// anything the runtime writes there (a stack overflow, an allocation failure) would reach the
/// POP3 client. Called first thing: if fd 2 is the same socket as fd 0, 1 or the fd 3 systemd
/// passed, or is closed, it is pointed at /dev/null. A terminal stays as it is (a person
/// trying aiopopd by hand should read its errors).
pub fn detach_stderr_from_client() {
    let stderr = std::io::stderr();
    let fd2 = stderr.as_fd();
    let open = dup(fd2).is_ok();
    let is_socket = open && is_socket(fd2);
    let mut client = vec![0, 1];
    if std::env::var_os("LISTEN_FDS").is_some() {
        client.push(3);
    }
    let shared = client.into_iter().any(|fd| {
        // SAFETY: borrowed only for the check; an fd that isn't open fails `dup` in `same_file`
        // and counts as the same, which is only checked when fd 2 is a socket.
        let other = unsafe { BorrowedFd::borrow_raw(fd) };
        same_file(fd2, other)
    });
    if open && !(is_socket && shared) {
        return;
    }
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 2 from a file we just opened; fd 2 is replaced atomically.
        unsafe { libc::dup2(null.as_raw_fd(), 2) };
    }
}

/// The process holds the user's password: no core dump may write it to disk, and no other
/// process of the same user may ptrace it or read its memory.
pub fn forbid_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on this process with valid arguments.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}
