//! Debian packages that can't be installed next to Dovecot (cyrus-imapd, courier-imap: they
//! conflict with dovecot-imapd), fetched with `apt-get download` and unpacked with `dpkg-deb -x`
//! into `target/imap-servers/NAME/root`, once: later tests and later runs reuse that tree. The
//! .debs are never committed; their library dependencies are installed by `.ci/run`.
//!
//! Concurrent tests (and test binaries) serialise on an `flock` of `NAME.lock`; the tree is
//! unpacked into `root.tmp` and renamed into place only when complete, so a half-unpacked tree
//! is never used.
#![allow(dead_code)]

use std::fs;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The unpacked tree of `packages` (Debian package names) under `target/imap-servers/NAME`
/// (see [`reachable`]); downloads and unpacks them the first time. Panics with a clear message (and how to skip,
/// `skip_var`) if they can't be had: a test must never pass without its server.
pub fn unpacked(name: &str, packages: &[&str], skip_var: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("imap-servers");
    fs::create_dir_all(&base).expect("mkdir target/imap-servers");
    let dir = base.join(name);
    let root = dir.join("root");
    let lock = fs::File::create(base.join(format!("{name}.lock"))).expect("create the lock file");
    // SAFETY: flock on a file descriptor we own; released when `lock` is closed.
    let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock {name}.lock");
    if !root.join(".complete").exists() {
        download_and_unpack(&dir, packages, skip_var);
    }
    reachable(name, &root)
}

/// The tree itself, or, as root when the mail user can't reach it (a checkout under /root), a
/// copy in /tmp/aiopopd-imap-servers: Cyrus's services run as that user and exec from the tree.
/// Called with the lock held.
fn reachable(name: &str, root: &Path) -> PathBuf {
    if !is_root() || traversable(root) {
        return root.to_path_buf();
    }
    let base = PathBuf::from("/tmp/aiopopd-imap-servers");
    let copy = base.join(name);
    let stamp = fs::read(root.join(".complete")).expect("read .complete");
    if fs::read(copy.join(".complete")).ok().as_deref() == Some(&stamp[..]) {
        return copy;
    }
    fs::create_dir_all(&base).expect("mkdir /tmp/aiopopd-imap-servers");
    fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod /tmp/aiopopd-imap-servers");
    let tmp = base.join(format!("{name}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    let st = Command::new("cp")
        .arg("-a")
        .arg(root)
        .arg(&tmp)
        .status()
        .expect("run cp");
    assert!(st.success(), "cp -a {} {}", root.display(), tmp.display());
    let _ = fs::remove_dir_all(&copy);
    fs::rename(&tmp, &copy).expect("rename the copy into place");
    copy
}

/// Whether every directory from / down to `path` may be searched by others.
fn traversable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors().all(|p| {
        p.as_os_str().is_empty()
            || fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    })
}

/// Downloads what's missing of `packages` into `dir/debs` and unpacks them all into
/// `dir/root` (via `dir/root.tmp`). Called with the lock held.
fn download_and_unpack(dir: &Path, packages: &[&str], skip_var: &str) {
    let root = dir.join("root");
    let debs = dir.join("debs");
    fs::create_dir_all(&debs).expect("mkdir debs");
    let have = |pkg: &str| {
        fs::read_dir(&debs)
            .expect("read debs")
            .filter_map(Result::ok)
            .any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb")
            })
    };
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !have(p)).collect();
    if !missing.is_empty() {
        let out = Command::new("apt-get")
            .arg("download")
            .args(&missing)
            .current_dir(&debs)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run apt-get download {missing:?}: {e}\n{}",
                    how(skip_var)
                )
            });
        assert!(
            out.status.success(),
            "apt-get download {missing:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            how(skip_var)
        );
    }
    let tmp = dir.join("root.tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).expect("mkdir root.tmp");
    for entry in fs::read_dir(&debs)
        .expect("read debs")
        .filter_map(Result::ok)
    {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "deb") {
            let out = Command::new("dpkg-deb")
                .arg("-x")
                .arg(&path)
                .arg(&tmp)
                .output()
                .expect("run dpkg-deb");
            assert!(
                out.status.success(),
                "dpkg-deb -x {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // Daemons that drop privileges must be able to traverse and read the tree.
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(&tmp)
        .status();
    fs::write(tmp.join(".complete"), packages.join("\n")).expect("mark complete");
    let _ = fs::remove_dir_all(&root);
    fs::rename(&tmp, &root).expect("rename root.tmp to root");
}

fn how(skip_var: &str) -> String {
    format!(
        "These servers are unpacked from Debian's packages at test time: run `apt-get update` \
         (with network access to Debian's mirrors) and install the libraries .ci/run lists. \
         A developer without them may set {skip_var}=1 to skip these tests (CI never does)."
    )
}

/// True if the developer asked to skip this server's tests (never set in CI).
pub fn skipped(skip_var: &str) -> bool {
    let skip = std::env::var_os(skip_var).is_some_and(|v| v == "1");
    if skip {
        eprintln!("{skip_var}=1: skipping");
    }
    skip
}

/// Whether we are root (the mail processes then run as the `mail` user).
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `getent passwd KEY` → (name, uid, gid).
pub fn passwd_entry(key: &str) -> Option<(String, u32, u32)> {
    let out = Command::new("getent").args(["passwd", key]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.lines().next()?.split(':').collect();
    Some((
        fields.first()?.to_string(),
        fields.get(2)?.parse().ok()?,
        fields.get(3)?.parse().ok()?,
    ))
}

/// The account the mail processes run as: `mail` as root, else ourselves.
pub fn mail_account() -> (String, u32, u32) {
    if is_root() {
        passwd_entry("mail").expect("the mail user exists")
    } else {
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        passwd_entry(&uid.to_string()).expect("our uid has a passwd entry")
    }
}

/// `chown -R` to the mail account (as root; a no-op otherwise).
pub fn chown_mail(path: &Path) {
    if !is_root() {
        return;
    }
    let (_, uid, gid) = mail_account();
    fn walk(path: &Path, uid: u32, gid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        if path.is_dir() && !path.is_symlink() {
            for entry in fs::read_dir(path).expect("read_dir").filter_map(Result::ok) {
                walk(&entry.path(), uid, gid);
            }
        }
    }
    walk(path, uid, gid);
}

/// A self-signed certificate and key (PEM) for `localhost` and `127.0.0.1`, written to
/// `dir/cert.pem` and `dir/key.pem`.
pub fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-days", "3650", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// One free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Kills a process group: SIGTERM, up to `grace` to exit, then SIGKILL; reaps the leader.
pub fn kill_group(child: &mut std::process::Child, grace: std::time::Duration) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: signals to our own child's process group; its pid stays reserved until reaped.
    unsafe { libc::kill(-pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: as above; children of the group may outlive the leader.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let _ = child.wait();
}
