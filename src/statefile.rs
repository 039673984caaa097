//! Files kept under `--state-dir` (the `%m` digests, the OAuth token stores): written
//! atomically, so a crash or a concurrent reader sees the old file or the new one, never half.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often `lock_until` tries again: short against a refresh's few hundred milliseconds.
const LOCK_POLL: Duration = Duration::from_millis(25);

/// Writes `data` to `path` with `mode`: a temporary file beside it (named for this process, with
/// a leading dot: no user name starts with one), fsync, rename over `path`, fsync of the
/// directory so the rename itself survives a crash.
pub fn write_atomically(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// An exclusive lock on `path` (created, mode 0600), held until the file is dropped. A lock
/// file of its own, not the data file: a rename replaces the data file's inode.
pub fn lock(path: &Path) -> io::Result<File> {
    let f = lock_file(path)?;
    f.lock()?;
    Ok(f)
}

/// As `lock`, but waits no later than `deadline`: then an error of kind `TimedOut`. Polled, as
/// flock has no timeout of its own; a holder that hangs must not make every waiter hang too.
pub fn lock_until(path: &Path, deadline: Instant) -> io::Result<File> {
    let f = lock_file(path)?;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(TryLockError::Error(e)) => return Err(e),
            Err(TryLockError::WouldBlock) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{} is locked by another process", path.display()),
                    ));
                }
                std::thread::sleep(left.min(LOCK_POLL));
            }
        }
    }
}

fn lock_file(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_whole_with_the_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("f");
        write_atomically(&path, b"one", 0o600).unwrap();
        write_atomically(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"]);
    }

    #[test]
    fn a_held_lock_times_out_near_the_deadline_and_is_had_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(".alice.lock");
        let held = lock_until(&path, Instant::now()).unwrap();
        let wait = Duration::from_millis(300);
        let start = Instant::now();
        let e = lock_until(&path, start + wait).unwrap_err();
        let waited = start.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(waited >= wait && waited < wait * 3, "{waited:?}");
        drop(held);
        lock_until(&path, Instant::now()).unwrap();
    }

    #[test]
    fn a_lock_released_while_waiting_is_had_before_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".alice.lock");
        let held = lock_until(&path, Instant::now()).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        let start = Instant::now();
        lock_until(&path, start + Duration::from_secs(10)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        release.join().unwrap();
    }
}
