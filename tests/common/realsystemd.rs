//! A real systemd, booted as PID 1 of its own PID namespace in a throwaway Debian root, for
//! tests that run the shipped units the way a server runs them (recipe:
//! ../shared/REAL-SYSTEMD.md, checked on these machines).
//!
//! The root is built once per target directory by `scripts/realsystemd-root` (mmdebstrap) under
//! `<target>/realsystemd/root` and never written to afterwards: every [`System`] boots on its
//! own overlay (upper and work directories in a temporary directory under `<target>/tmp`), in
//! new PID, mount, UTS, IPC and cgroup namespaces, sharing the host's network namespace so that
//! servers and clients on the host's loopback reach the units' sockets. Its cgroups are a
//! sub-tree of the test's own in every cgroup v1 hierarchy (and the unified one). Dropping the
//! [`System`] powers it off, kills it if it lingers (its namespaces and mounts go with it) and
//! removes that sub-tree and the overlay, whether or not the test passed.
//!
//! Needs root, cgroup v1 hierarchies as on these machines (systemd's hybrid layout), util-linux
//! (`unshare`, `nsenter`, `pivot_root`) and, for the first build, mmdebstrap and Debian's
//! mirrors. [`prerequisites`] says what is missing; a test then skips loudly, or fails in CI.
//! This file owns nothing outside the temporary and target directories it names.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long booting (to `systemctl is-system-running` = running) may take; it takes under a
/// second on these machines.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one command run inside may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `systemctl poweroff` may take before the PID 1 is killed (it takes ~2 s).
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(15);
/// The `container=` value systemd is started with (it then knows it is in a container).
const CONTAINER: &str = "aiopopd-test";
/// The sub-cgroups and the overlay directories are named by a prefix, the test process's pid,
/// a dash and something unique, so that those of a test process that was killed can be found
/// and removed by the next one.
const CGROUP_PREFIX: &str = "aiopopd-realsystemd-";
const RUN_PREFIX: &str = "realsystemd-";

/// Whether this runs in CI (`CI` set), where a missing prerequisite is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// The root's path for this target directory: `<target>/realsystemd/root`.
pub fn root_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("realsystemd").join("root")
}

/// The root, built by `scripts/realsystemd-root` if it isn't complete yet (`Ok`), or why these
/// tests can't run here (`Err`).
pub fn prerequisites() -> Result<PathBuf, String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (namespaces, mounts, cgroups); CI runs as root".into());
    }
    for tool in ["unshare", "nsenter", "pivot_root", "mount", "flock"] {
        if which(tool).is_none() {
            return Err(format!("{tool} is missing (Debian package util-linux)"));
        }
    }
    if let Err(e) = Hierarchies::of_this_process() {
        return Err(format!("no cgroup v1 layout to boot systemd in: {e}"));
    }
    let root = root_dir();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/realsystemd-root");
    let started = Instant::now();
    let out = Command::new(&script)
        .arg(&root)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({}):\n{}{}",
            script.display(),
            root.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if started.elapsed() > Duration::from_secs(5) {
        // Shown with --nocapture only: how long the one-off build took.
        println!(
            "built the root {} in {:.1?}",
            root.display(),
            started.elapsed()
        );
    }
    Ok(root)
}

/// `tool`'s path, looked up in PATH and the sbin directories a normal user's PATH may lack.
fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.exists())
}

// ---------------------------------------------------------------------------------------------
// Cgroups

/// One cgroup hierarchy this process is in: where it is mounted on the host, the process's
/// cgroup in it, and how the booted system mounts it (`None`: the unified cgroup2 one).
#[derive(Debug, Clone)]
struct Hierarchy {
    /// The directory under the booted system's /sys/fs/cgroup.
    name: String,
    /// `-o` options for `mount -t cgroup`; `None` for cgroup2.
    options: Option<String>,
    /// This process's cgroup, as a host path.
    cgroup: PathBuf,
}

struct Hierarchies(Vec<Hierarchy>);

impl Hierarchies {
    /// Every hierarchy in /proc/self/cgroup, matched with its mount in /proc/self/mounts.
    /// Fails unless it is systemd's hybrid layout (v1 controllers, `name=systemd`, cgroup2).
    fn of_this_process() -> Result<Hierarchies, String> {
        let cgroups = fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let mounts = fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
        let mut found = Vec::new();
        for line in cgroups.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
                return Err(format!("can't read /proc/self/cgroup line {line:?}"));
            };
            let mount = mounts.lines().find_map(|m| {
                let w: Vec<&str> = m.split_whitespace().collect();
                let (dir, kind, opts) = (*w.get(1)?, *w.get(2)?, *w.get(3)?);
                let matches = if controllers.is_empty() {
                    kind == "cgroup2"
                } else {
                    kind == "cgroup"
                        && controllers
                            .split(',')
                            .all(|c| opts.split(',').any(|o| o == c))
                };
                matches.then(|| (dir.to_string(), opts.to_string()))
            });
            let Some((dir, opts)) = mount else {
                return Err(format!("hierarchy {controllers:?} is not mounted"));
            };
            let name = Path::new(&dir)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let options = (!controllers.is_empty()).then(|| {
                let own: Vec<&str> = opts
                    .split(',')
                    .filter(|o| controllers.split(',').any(|c| c == *o))
                    .collect();
                if controllers.starts_with("name=") {
                    format!("none,{}", own.join(","))
                } else {
                    own.join(",")
                }
            });
            let cgroup = Path::new(&dir).join(path.trim_start_matches('/'));
            found.push(Hierarchy {
                name,
                options,
                cgroup,
            });
        }
        let has = |want: &dyn Fn(&Hierarchy) -> bool| found.iter().any(want);
        if !has(&|h| h.options.is_none()) || !has(&|h| h.name == "systemd") {
            return Err(format!(
                "want cgroup v1 with name=systemd and cgroup2 (hybrid), found {:?}",
                found.iter().map(|h| &h.name).collect::<Vec<_>>()
            ));
        }
        for h in &found {
            if !h.cgroup.is_dir() {
                return Err(format!("{} is not a directory", h.cgroup.display()));
            }
        }
        Ok(Hierarchies(found))
    }
}

/// Creates `name` under this process's cgroup in every hierarchy (cpuset's CPUs and memory
/// nodes copied from the parent, as a new cpuset is empty). Returns the directories made, in
/// order, so that a failure half-way still leaves the list to remove.
fn make_cgroups(h: &Hierarchies, name: &str, made: &mut Vec<PathBuf>) -> Result<(), String> {
    for hier in &h.0 {
        let dir = hier.cgroup.join(name);
        fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        made.push(dir.clone());
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = hier.cgroup.join(file);
            if parent.exists() {
                let v = fs::read(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
                fs::write(dir.join(file), v)
                    .map_err(|e| format!("{}/{file}: {e}", dir.display()))?;
            }
        }
    }
    Ok(())
}

/// Removes a cgroup directory and everything systemd created below it, deepest first, waiting
/// (up to `deadline`) for the processes in it to be gone.
fn remove_cgroup(dir: &Path, deadline: Instant) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path(), deadline)?;
            }
        }
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                return Err(format!(
                    "rmdir {}: {e} (processes: {})",
                    dir.display(),
                    procs.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running commands with a deadline

/// Runs `cmd` (stdin from /dev/null) to completion, killing it after `timeout`. Panics if it
/// can't be started or doesn't finish.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let read = |r: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{shown} did not finish within {timeout:?}");
            }
        }
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------------
// The booted system

/// A systemd running as PID 1 of its own namespaces on an overlay of the root. Dropping it
/// powers it off and cleans up.
pub struct System {
    /// `unshare`, whose child (PID 1 inside) is systemd.
    unshare: Option<Child>,
    /// systemd's pid as the host sees it.
    pid: u32,
    /// The sub-cgroups made for it, one per hierarchy.
    cgroups: Vec<PathBuf>,
    /// The cgroup's name (the same in every hierarchy).
    cgroup_name: String,
    /// What systemd and the start-up script printed.
    console: PathBuf,
    // Last: removed once the system is gone. Holds the overlay's upper and work directories.
    dir: tempfile::TempDir,
}

/// Quotes a path for sh (paths with a single quote are refused: ours never have one).
fn sh_quote(p: &Path) -> String {
    let s = p.to_str().expect("UTF-8 path");
    assert!(!s.contains('\''), "path with a quote: {s}");
    format!("'{s}'")
}

impl System {
    /// Boots systemd on a fresh overlay of `root` and waits until it is running (every unit
    /// started, none failed). Panics (with the console and the failed units) otherwise.
    pub fn boot(root: &Path) -> System {
        let hierarchies = Hierarchies::of_this_process().expect("cgroup layout");
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(base).expect("mkdir CARGO_TARGET_TMPDIR");
        sweep_stale(&hierarchies, base);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{RUN_PREFIX}{}-", std::process::id()))
            .tempdir_in(base)
            .expect("temp dir for the overlay");
        let (upper, work, merged) = (
            dir.path().join("upper"),
            dir.path().join("work"),
            dir.path().join("merged"),
        );
        for d in [&upper, &work, &merged] {
            fs::create_dir(d).expect("mkdir overlay dir");
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        prepare_upper(&upper);

        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let cgroup_name = format!("{CGROUP_PREFIX}{}-{nanos}", std::process::id());
        let console = dir.path().join("console.log");
        let mut sys = System {
            unshare: None,
            pid: 0,
            cgroups: Vec::new(),
            cgroup_name: cgroup_name.clone(),
            console: console.clone(),
            dir,
        };
        let mut made = Vec::new();
        let made_ok = make_cgroups(&hierarchies, &cgroup_name, &mut made);
        sys.cgroups = made;
        made_ok.unwrap_or_else(|e| panic!("cgroups: {e}"));

        let stage1 = sys.dir.path().join("stage1.sh");
        fs::write(
            &stage1,
            stage1_script(root, &upper, &work, &merged, &hierarchies),
        )
        .expect("write stage1.sh");
        // The launcher moves itself into the new cgroups (so the cgroup namespace is rooted
        // there), then becomes unshare; this test process stays where it is.
        let mut launcher = String::from("set -eu\n");
        for cg in &sys.cgroups {
            launcher.push_str(&format!(
                "echo $$ > {}\n",
                sh_quote(&cg.join("cgroup.procs"))
            ));
        }
        launcher.push_str(&format!(
            "exec unshare --pid --fork --kill-child --mount --uts --ipc --cgroup \
             --propagation private /bin/sh {}\n",
            sh_quote(&stage1)
        ));
        let log = fs::File::create(&console).expect("create console.log");
        let mut launch = Command::new("/bin/sh");
        // SAFETY: prctl(2) only, which is async-signal-safe. If this test process dies without
        // running Drop (SIGKILL, a timeout), unshare gets SIGKILL, and with --kill-child takes
        // systemd and its whole PID namespace with it.
        unsafe {
            launch.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = launch
            .arg("-c")
            .arg(&launcher)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup console.log"))
            .stderr(log)
            .spawn()
            .expect("start unshare");
        let unshare_pid = child.id();
        sys.unshare = Some(child);

        let deadline = Instant::now() + BOOT_TIMEOUT;
        // systemd is unshare's only child; its socket appears once it has pivoted into the root.
        loop {
            if let Some(status) = sys
                .unshare
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "the namespaces or systemd exited with {status} before booting:\n{}",
                    sys.console()
                );
            }
            let children = format!("/proc/{unshare_pid}/task/{unshare_pid}/children");
            if let Some(pid) = fs::read_to_string(children)
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
            {
                sys.pid = pid;
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" && sys.path("/run/systemd/private").exists() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not start within {BOOT_TIMEOUT:?}:\n{}",
                sys.console()
            );
            thread::sleep(Duration::from_millis(20));
        }
        let out = sys.run_timeout(
            &["systemctl", "is-system-running", "--wait"],
            deadline.saturating_duration_since(Instant::now()),
        );
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if state != "running" {
            let failed = sys.run(&["systemctl", "--failed", "--no-legend", "--no-pager"]);
            panic!(
                "systemd is {state:?}, not running; failed units:\n{}\n{}",
                String::from_utf8_lossy(&failed.stdout),
                sys.console()
            );
        }
        sys
    }

    /// A path inside the booted system, as the host reaches it (through /proc/PID/root, so
    /// writes go through the overlay).
    pub fn path(&self, inside: &str) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.pid)).join(inside.trim_start_matches('/'))
    }

    /// Writes a file inside (parent directories made 0755), owned by root, with `mode`.
    pub fn install(&self, inside: &str, contents: &[u8], mode: u32) {
        let path = self.path(inside);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir -p {inside}/..: {e}"));
        }
        // Mode first, on an empty file: the key is never readable by others, even briefly.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("create {inside}: {e}"));
        f.set_permissions(fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {inside}: {e}"));
        f.write_all(contents)
            .unwrap_or_else(|e| panic!("write {inside}: {e}"));
        std::os::unix::fs::chown(&path, Some(0), Some(0))
            .unwrap_or_else(|e| panic!("chown {inside}: {e}"));
    }

    /// Runs a command inside (every namespace of PID 1 but the network one, which is shared).
    pub fn run(&self, argv: &[&str]) -> Output {
        self.run_timeout(argv, COMMAND_TIMEOUT)
    }

    fn run_timeout(&self, argv: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.pid.to_string(),
            "-m",
            "-u",
            "-i",
            "-p",
            "-C",
            "--",
        ])
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8")
        .env("SYSTEMD_PAGER", "")
        .env("SYSTEMD_COLORS", "0");
        run_with_timeout(cmd, timeout)
    }

    /// Runs a command inside; panics with its output unless it exits with 0. Returns stdout.
    pub fn ok(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        assert!(
            out.status.success(),
            "{argv:?} inside: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `journalctl --no-pager ARGS` inside (after a flush), its stdout.
    pub fn journal(&self, args: &[&str]) -> String {
        let mut argv = vec!["journalctl", "--no-pager", "-q"];
        argv.extend_from_slice(args);
        String::from_utf8_lossy(&self.run(&argv).stdout).into_owned()
    }

    /// Polls `journalctl ARGS` until its output satisfies `cond` (or `timeout` passes);
    /// returns the last output.
    pub fn wait_journal(
        &self,
        args: &[&str],
        timeout: Duration,
        cond: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.journal(args);
            if cond(&text) || Instant::now() > deadline {
                return text;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The name of the sub-cgroup the system runs in (in every hierarchy).
    pub fn cgroup_name(&self) -> &str {
        &self.cgroup_name
    }

    /// What systemd and the start-up script printed so far.
    pub fn console(&self) -> String {
        let text =
            String::from_utf8_lossy(&fs::read(&self.console).unwrap_or_default()).into_owned();
        format!("--- console of the booted systemd ---\n{text}")
    }

    /// Powers off (`systemctl poweroff`); kills PID 1 if it lingers. Idempotent.
    fn stop(&mut self) {
        let Some(mut unshare) = self.unshare.take() else {
            return;
        };
        let gone = |u: &mut Child| !matches!(u.try_wait(), Ok(None));
        if self.pid != 0 && !gone(&mut unshare) {
            let mut cmd = Command::new("nsenter");
            cmd.args([
                "-t",
                &self.pid.to_string(),
                "-m",
                "-u",
                "-i",
                "-p",
                "-C",
                "--",
            ])
            .args(["systemctl", "poweroff", "--no-block"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            if let Ok(mut c) = cmd.spawn() {
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(10));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            let deadline = Instant::now() + POWEROFF_TIMEOUT;
            while !gone(&mut unshare) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        if !gone(&mut unshare) {
            // PID 1 killed: the kernel kills the rest of its PID namespace.
            if self.pid != 0 {
                // SAFETY: kill(2) on systemd's pid; it is unshare's child, which unshare (alive,
                // not yet reaped by us) reaps, so the pid can't have been reused by then.
                unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            }
            let _ = unshare.kill();
        }
        let _ = unshare.wait();
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.stop();
        // Processes of the PID namespace die asynchronously: rmdir waits for them.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut problems = Vec::new();
        for cg in self.cgroups.iter().rev() {
            if let Err(e) = remove_cgroup(cg, deadline) {
                problems.push(e);
            }
        }
        if !problems.is_empty() {
            // Not a panic (this may run during one): said loudly, past the output capture.
            let _ = writeln!(
                std::io::stderr(),
                "realsystemd: cleanup left cgroups behind:\n{}",
                problems.join("\n")
            );
        }
    }
}

/// Removes what a killed test process left behind (its Drop never ran): sub-cgroups and
/// overlay directories named after a pid that no longer exists. Their systemd died with that
/// process (see the PDEATHSIG in [`System::boot`]), and its mounts with its namespace.
fn sweep_stale(h: &Hierarchies, runs: &Path) {
    let dead = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    for hier in &h.0 {
        for e in fs::read_dir(&hier.cgroup).into_iter().flatten().flatten() {
            if dead(&e.file_name().to_string_lossy(), CGROUP_PREFIX) {
                let _ = remove_cgroup(&e.path(), deadline);
            }
        }
    }
    for e in fs::read_dir(runs).into_iter().flatten().flatten() {
        if dead(&e.file_name().to_string_lossy(), RUN_PREFIX) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// The overlay's upper layer before boot: a host name, a new machine id, and no getty on a
/// console there isn't.
fn prepare_upper(upper: &Path) {
    let etc = upper.join("etc");
    fs::create_dir_all(etc.join("systemd/system")).expect("mkdir upper/etc");
    fs::write(etc.join("hostname"), "aiopopd-test\n").expect("hostname");
    fs::write(
        etc.join("hosts"),
        "127.0.0.1 localhost\n127.0.1.1 aiopopd-test\n::1 localhost ip6-localhost\n",
    )
    .expect("hosts");
    let id = fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("a random uuid")
        .trim()
        .replace('-', "");
    fs::write(etc.join("machine-id"), format!("{id}\n")).expect("machine-id");
    std::os::unix::fs::symlink(
        "/dev/null",
        etc.join("systemd/system/console-getty.service"),
    )
    .expect("mask console-getty.service");
    fs::create_dir(upper.join(".oldroot")).expect("mkdir upper/.oldroot");
}

/// The script run as PID 1 of the new namespaces, before it becomes systemd: the overlay,
/// /proc, a read-only /sys with systemd's hybrid cgroup layout, a minimal /dev, pivot_root,
/// and a shared root (without which LoadCredential= fails).
fn stage1_script(root: &Path, upper: &Path, work: &Path, merged: &Path, h: &Hierarchies) -> String {
    let mut s = format!(
        "set -eu\n\
         r={merged}\n\
         mount -t overlay overlay -o lowerdir={root},upperdir={upper},workdir={work} \"$r\"\n\
         mount -t proc -o nosuid,nodev,noexec proc \"$r/proc\"\n\
         mount -t sysfs -o ro,nosuid,nodev,noexec sysfs \"$r/sys\"\n\
         mount -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs \"$r/sys/fs/cgroup\"\n",
        merged = sh_quote(merged),
        root = root.to_str().expect("UTF-8 path"),
        upper = upper.to_str().expect("UTF-8 path"),
        work = work.to_str().expect("UTF-8 path"),
    );
    for hier in &h.0 {
        s.push_str(&format!("mkdir \"$r/sys/fs/cgroup/{}\"\n", hier.name));
        match &hier.options {
            Some(opts) => s.push_str(&format!(
                "mount -t cgroup -o nosuid,nodev,noexec,{opts} cgroup \"$r/sys/fs/cgroup/{}\"\n",
                hier.name
            )),
            None => s.push_str(&format!(
                "mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 \"$r/sys/fs/cgroup/{}\"\n",
                hier.name
            )),
        }
    }
    s.push_str(
        "mount -o remount,ro,nosuid,nodev,noexec,mode=755 tmpfs \"$r/sys/fs/cgroup\"\n\
         mount -t tmpfs -o mode=755,nosuid tmpfs \"$r/dev\"\n\
         for d in null zero full random urandom tty; do\n\
         \x20 touch \"$r/dev/$d\"\n\
         \x20 mount --bind \"/dev/$d\" \"$r/dev/$d\"\n\
         done\n\
         mkdir \"$r/dev/pts\" \"$r/dev/shm\"\n\
         mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts \"$r/dev/pts\"\n\
         ln -s pts/ptmx \"$r/dev/ptmx\"\n\
         mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs \"$r/dev/shm\"\n\
         ln -s /proc/self/fd \"$r/dev/fd\"\n\
         ln -s /proc/self/fd/0 \"$r/dev/stdin\"\n\
         ln -s /proc/self/fd/1 \"$r/dev/stdout\"\n\
         ln -s /proc/self/fd/2 \"$r/dev/stderr\"\n\
         cd \"$r\"\n\
         pivot_root . .oldroot\n\
         cd /\n\
         umount -l /.oldroot\n\
         rmdir /.oldroot\n\
         mount --make-rshared /\n",
    );
    s.push_str(&format!(
        "exec env -i container={CONTAINER} /lib/systemd/systemd\n"
    ));
    s
}
