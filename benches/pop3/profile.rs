//! `scripts/bench --profile`: where workload 1's time goes, before anyone optimises. One full
//! session (login, STAT, UIDL, RETR all, QUIT) on 1000 × 20 KB (100 with `--quick`) per tool,
//! aiopopd started the inetd way with the tool in front of it:
//! - `strace -c`: every syscall, counted;
//! - `strace` of the I/O syscalls, summed per role of the fd (client, IMAP, log);
//! - `perf stat` (software counters: this VM has no hardware ones) and `perf record` with
//!   DWARF call graphs (scripts/bench builds aiopopd with debug info for this);
//! - `valgrind --tool=callgrind`: instructions per function;
//!
//! and, for comparison, `strace -c` attached to Dovecot's own processes: the `imap` process
//! behind aiopopd and the `pop3` process of Dovecot's own POP3 for the same workload.
//! Everything is written to target/bench/profile/; the summary is printed.

use crate::client::{self, Pop3};
use crate::dovecot::Dovecot;
use crate::{mail, procs, Opts, MSG_SIZE, PASSWORD};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub fn run(opts: &Opts) {
    let n = if opts.quick { 100 } else { 1000 };
    let dir = opts.out.join("profile");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("mkdir target/bench/profile");
    let d = Dovecot::start_with_users(&[
        ("profa", PASSWORD),
        ("profd", PASSWORD),
        ("profl", PASSWORD),
    ]);
    mail::fill(&d, &["profa", "profd"], n, |i| mail::message(i, MSG_SIZE));
    let listed = if opts.quick { 1000 } else { 10_000 };
    mail::fill(&d, &["profl"], listed, |i| mail::message(i, 600));
    let master = procs::dovecot_master(&d);
    let bin = opts.aiopopd.clone();
    let args: Vec<String> = [
        "-H",
        "127.0.0.1",
        "-p",
        &d.imap_port.to_string(),
        "--allow-plaintext-auth",
        "-d",
        "bench.test",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let p = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_string();
    let with = |prefix: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        v.push(bin.clone());
        v.extend(args.iter().cloned());
        v
    };
    // One session with `prefix` in front of aiopopd; its stderr goes to NAME.stderr.
    let under = |name: &str, prefix: &[&str]| {
        session_under(
            with(prefix),
            &dir.join(format!("{name}.stderr")),
            "profa",
            n,
        )
    };
    println!("profiling workload 1 ({n} × 20 KB) with {bin}\n");

    // Warm Dovecot's caches, then one plain session for the reference time.
    under("plain", &[]);
    let plain = under("plain", &[]);
    println!("plain session: {:.3} s\n", plain);

    let strace_c = p("strace-c.txt");
    let t = under("strace-c", &["strace", "-f", "-c", "-o", &strace_c]);
    println!("== strace -c (session {t:.2} s under strace)");
    let summary = fs::read_to_string(&strace_c).unwrap_or_default();
    print!("{}", per_retr_summary(&summary, n));

    let trace = p("strace-io.txt");
    under(
        "strace-io",
        &[
            "strace",
            "-s",
            "0",
            "-e",
            "trace=read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg,poll,ppoll,\
             dup,dup2,dup3,fcntl,socket,connect,close",
            "-o",
            &trace,
        ],
    );
    println!("\n== I/O syscalls by fd role (strace)");
    print!(
        "{}",
        per_fd(&fs::read_to_string(&trace).unwrap_or_default(), n)
    );

    let perf_stat = p("perf-stat.txt");
    under(
        "perf-stat",
        &[
            "perf",
            "stat",
            "-e",
            "task-clock,context-switches,cpu-migrations,page-faults",
            "-o",
            &perf_stat,
            "--",
        ],
    );
    println!("\n== perf stat");
    let stat = fs::read_to_string(&perf_stat).unwrap_or_default();
    for l in stat
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        println!("{l}");
    }

    let perf_data = p("perf.data");
    under(
        "perf-record",
        &[
            "perf",
            "record",
            "-q",
            "-F",
            "4999",
            "--call-graph",
            "dwarf,16384",
            "-o",
            &perf_data,
            "--",
        ],
    );
    for (name, sort, children) in [
        ("perf-report-dso.txt", "dso", false),
        ("perf-report-self.txt", "dso,symbol", false),
        ("perf-report-children.txt", "symbol", true),
    ] {
        let out = Command::new("perf")
            .args(["report", "-i", &perf_data, "--stdio", "--sort", sort])
            .arg(if children {
                "--children"
            } else {
                "--no-children"
            })
            .args(["--percent-limit", "1", "-g", "none"])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = out {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            fs::write(dir.join(name), &text).expect("write perf report");
            println!(
                "\n== perf report --sort {sort} ({})",
                if children { "with children" } else { "self" }
            );
            for l in text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .take(25)
            {
                println!("{l}");
            }
        }
    }

    let cg = p("callgrind.out");
    let t = under(
        "callgrind",
        &[
            "valgrind",
            "-q",
            "--tool=callgrind",
            &format!("--callgrind-out-file={cg}"),
        ],
    );
    println!("\n== callgrind (session {t:.1} s under valgrind): instructions by function, self");
    if let Ok(out) = Command::new("callgrind_annotate").arg(&cg).output() {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        fs::write(dir.join("callgrind.txt"), &text).expect("write callgrind.txt");
        for l in text
            .lines()
            .skip_while(|l| !l.contains("file:function"))
            .take(25)
        {
            println!("{l}");
        }
    }
    if let Ok(out) = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", &cg])
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        fs::write(dir.join("callgrind-inclusive.txt"), &text).expect("write");
    }

    // Dovecot's side: strace -c attached to its imap process (behind aiopopd) and to its own
    // pop3 process, each for one session after login.
    let imap_c = p("strace-c-dovecot-imap.txt");
    let pop3_c = p("strace-c-dovecot-pop3.txt");
    // Dovecot's POP3 marks the messages \Seen (renames in the Maildir) in its first session:
    // profile a later one.
    if let Err(e) = session(d.pop3_port, "profd", n, || {}) {
        eprintln!("Dovecot POP3 warm-up session: {e}");
    }
    let (port, h) = crate::servers::inetd_once(with(&[]), &dir.join("attached.stderr"));
    attached_session(port, "profa", n, &imap_c, || {
        procs::newest_child(master, "imap").map(|p| p.pid)
    });
    let _ = h.join();
    attached_session(d.pop3_port, "profd", n, &pop3_c, || {
        procs::newest_child(master, "pop3").map(|p| p.pid)
    });
    for (name, path) in [
        ("Dovecot imap behind aiopopd", &imap_c),
        ("Dovecot's own pop3", &pop3_c),
    ] {
        println!("\n== strace -c of {name}, after login");
        print!(
            "{}",
            per_retr_summary(&fs::read_to_string(path).unwrap_or_default(), n)
        );
    }
    greeting(&with, &dir);
    listing_heap(&with, &dir, listed);
    println!("\nfiles: {}", dir.display());
}

/// What aiopopd does between exec and its greeting: `strace -r` of one connection that only
/// reads the greeting and QUITs.
fn greeting(with: &dyn Fn(&[&str]) -> Vec<String>, dir: &Path) {
    let out = dir.join("strace-greeting.txt");
    let out_s = out.to_str().expect("utf-8 path");
    let (port, h) = crate::servers::inetd_once(
        with(&["strace", "-r", "-s", "0", "-o", out_s]),
        &dir.join("strace-greeting.stderr"),
    );
    let r = (|| -> client::Result<()> {
        let mut c = Pop3::new(client::connect(port)?);
        c.greeting()?;
        c.quit()
    })();
    let _ = h.join();
    if let Err(e) = r {
        eprintln!("greeting under strace: {e}");
        return;
    }
    let trace = fs::read_to_string(&out).unwrap_or_default();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0;
    let mut elapsed = 0.0;
    for l in trace.lines() {
        let mut it = l.trim_start().splitn(2, ' ');
        let (Some(dt), Some(call)) = (it.next(), it.next()) else {
            continue;
        };
        elapsed += dt.parse::<f64>().unwrap_or(0.0);
        let name = call
            .trim_start()
            .split('(')
            .next()
            .unwrap_or("?")
            .to_string();
        total += 1;
        *counts.entry(name.clone()).or_default() += 1;
        // The greeting is the first write that isn't to stderr (the log).
        if name == "write" && !call.starts_with("write(2,") {
            break;
        }
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    println!(
        "\n== exec to greeting (strace -r; times inflated by strace): {total} syscalls, {:.1} ms",
        elapsed * 1e3
    );
    println!(
        "{}",
        v.iter()
            .map(|(n, c)| format!("{n} ×{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// Where the listing's memory goes (workload 4): `valgrind --tool=massif` over USER, PASS,
/// STAT, UIDL, QUIT on `listed` small messages; prints the peak and its biggest allocation sites.
fn listing_heap(with: &dyn Fn(&[&str]) -> Vec<String>, dir: &Path, listed: usize) {
    let out = dir.join("massif.out");
    let out_s = out.to_str().expect("utf-8 path").to_string();
    let (port, h) = crate::servers::inetd_once(
        with(&[
            "valgrind",
            "-q",
            "--tool=massif",
            "--depth=12",
            &format!("--massif-out-file={out_s}"),
        ]),
        &dir.join("massif.stderr"),
    );
    let r = (|| -> client::Result<()> {
        let mut c = Pop3::new(client::connect(port)?);
        c.greeting()?;
        c.login("profl", PASSWORD)?;
        c.stat()?;
        c.multi("UIDL")?;
        c.quit()
    })();
    let _ = h.join();
    if let Err(e) = r {
        eprintln!("listing under massif: {e}");
        return;
    }
    let Ok(text) = Command::new("ms_print").arg(&out).output() else {
        return;
    };
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    fs::write(dir.join("massif.txt"), &text).expect("write massif.txt");
    // The peak is the detailed snapshot marked "(peak)"; print its allocation tree's top.
    let peak = text
        .lines()
        .find(|l| l.trim_start().starts_with("Detailed snapshots:"))
        .and_then(|l| {
            l.split(", ")
                .find(|s| s.contains("(peak)"))
                .map(str::to_string)
        })
        .and_then(|s| {
            s.trim_start()
                .trim_start_matches("Detailed snapshots: [")
                .split_whitespace()
                .next()
                .map(str::to_string)
        });
    println!(
        "\n== heap of the listing, {listed} messages (valgrind massif; full tree in massif.txt)"
    );
    let Some(peak) = peak else { return };
    let mut lines = text
        .lines()
        .skip_while(|l| l.split_whitespace().next() != Some(peak.as_str()) || !l.contains(','));
    if let Some(row) = lines.next() {
        let f: Vec<&str> = row.split_whitespace().collect();
        println!(
            "peak: {} B heap ({} B useful), {:.0} B per listed message",
            f.get(2).unwrap_or(&"?"),
            f.get(3).unwrap_or(&"?"),
            f.get(3)
                .and_then(|b| b.replace(',', "").parse::<f64>().ok())
                .map_or(f64::NAN, |b| b / listed as f64)
        );
    }
    // For each top-level branch of the peak's tree, the first frame in the crates that matter.
    let mut branch: Option<String> = None;
    for l in lines.take_while(|l| !l.starts_with("---")) {
        if l.starts_with("->") {
            branch = l
                .split(')')
                .next()
                .map(|p| format!("{})", p.trim_start_matches("->")));
        }
        let named = ["imap_proto::", "imap::", "aiopopd::"]
            .iter()
            .any(|c| l.contains(c));
        if let (Some(b), true) = (&branch, named) {
            let frame = l.split(": ").nth(1).unwrap_or(l).trim();
            println!("{b:>22}  {}", frame.chars().take(110).collect::<String>());
            branch = None;
        }
    }
}

/// One workload-1 session against aiopopd run as `command` (the inetd way); seconds. The
/// command's stderr goes to `stderr`.
fn session_under(command: Vec<String>, stderr: &Path, user: &str, n: usize) -> f64 {
    let (port, handle) = crate::servers::inetd_once(command, stderr);
    let t = Instant::now();
    let r = session(port, user, n, || {});
    let dt = t.elapsed().as_secs_f64();
    let status = handle.join().expect("inetd thread");
    let log = fs::read_to_string(stderr).unwrap_or_default();
    if let Err(e) = r {
        panic!("profiled session failed: {e}\n{}:\n{log}", stderr.display());
    }
    assert!(
        status.success(),
        "the profiled command exited with {status}\n{}:\n{log}",
        stderr.display()
    );
    dt
}

/// Login, STAT, UIDL, RETR all, QUIT; `after_login` runs right after PASS.
fn session(port: u16, user: &str, n: usize, after_login: impl FnOnce()) -> client::Result<()> {
    let mut c = Pop3::new(client::connect(port)?);
    c.greeting()?;
    c.login(user, PASSWORD)?;
    after_login();
    let (count, _) = c.stat()?;
    if count != n {
        return Err(format!("STAT: {count}, expected {n}"));
    }
    c.multi("UIDL")?;
    for i in 1..=count {
        c.multi(&format!("RETR {i}"))?;
    }
    c.quit()
}

/// A session during which `strace -c -p PID` watches the process `find` names (found after
/// login); strace writes its summary when that process exits.
fn attached_session(
    port: u16,
    user: &str,
    n: usize,
    out: &str,
    find: impl FnOnce() -> Option<u32>,
) {
    let mut tracer = None;
    let r = session(port, user, n, || {
        if let Some(pid) = find() {
            tracer = Command::new("strace")
                .args(["-c", "-o", out, "-p", &pid.to_string()])
                .stderr(Stdio::null())
                .spawn()
                .ok();
            // strace needs a moment to attach.
            thread::sleep(Duration::from_millis(300));
        }
    });
    if let Err(e) = r {
        eprintln!("attached session: {e}");
    }
    if let Some(mut t) = tracer {
        let deadline = Instant::now() + Duration::from_secs(20);
        while t.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = t.kill();
        let _ = t.wait();
    }
}

/// The `strace -c` table with a calls-per-RETR column, biggest first.
fn per_retr_summary(text: &str, n: usize) -> String {
    let mut rows: Vec<(u64, String, f64)> = Vec::new();
    let mut total = 0;
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors], syscall
        if f.len() >= 5 && f[0].parse::<f64>().is_ok() {
            let calls: u64 = f[3].parse().unwrap_or(0);
            let name = f[f.len() - 1].to_string();
            if name == "total" {
                total = calls;
                continue;
            }
            rows.push((calls, name, f[1].parse().unwrap_or(0.0)));
        }
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut s = format!(
        "{:<18} {:>9} {:>10} {:>12}\n",
        "syscall", "calls", "per RETR", "sys seconds"
    );
    for (calls, name, secs) in rows.iter().take(15) {
        s.push_str(&format!(
            "{name:<18} {calls:>9} {:>10.2} {secs:>12.6}\n",
            *calls as f64 / n as f64
        ));
    }
    s.push_str(&format!(
        "{:<18} {total:>9} {:>10.2}\n",
        "total",
        total as f64 / n as f64
    ));
    s
}

/// Sums an `strace -s 0` trace of I/O syscalls per (syscall, role of the fd): `client` for
/// fds 0/1 and their dups, `imap` for the AF_INET socket aiopopd opens, `log` for AF_UNIX.
fn per_fd(trace: &str, n: usize) -> String {
    let mut role: BTreeMap<i64, &'static str> = BTreeMap::from([(0, "client"), (1, "client")]);
    let mut stats: BTreeMap<(String, &'static str), (u64, u64)> = BTreeMap::new();
    for l in trace.lines() {
        let Some(open) = l.find('(') else { continue };
        let name = &l[..open];
        if name.contains(' ') {
            continue;
        }
        let args = &l[open + 1..];
        let ret: Option<i64> = l
            .rsplit(" = ")
            .next()
            .and_then(|r| r.split_whitespace().next()?.parse().ok());
        let first: Option<i64> = args
            .split([',', ')'])
            .next()
            .and_then(|a| a.trim().parse().ok());
        match name {
            "fcntl" if !args.contains("F_DUPFD") => continue,
            "dup" | "dup2" | "dup3" | "fcntl" => {
                if let (Some(from), Some(to)) = (first, ret) {
                    let r = role.get(&from).copied().unwrap_or("other");
                    role.insert(to, r);
                }
                continue;
            }
            "socket" => {
                if let Some(fd) = ret {
                    role.insert(
                        fd,
                        if args.starts_with("AF_UNIX") {
                            "log"
                        } else {
                            "imap"
                        },
                    );
                }
                continue;
            }
            "close" => {
                if let Some(fd) = first {
                    role.remove(&fd);
                }
                continue;
            }
            "connect" => continue,
            _ => {}
        }
        let r = if name.contains("poll") {
            "-"
        } else {
            first
                .and_then(|fd| role.get(&fd).copied())
                .unwrap_or("other")
        };
        let e = stats.entry((name.to_string(), r)).or_default();
        e.0 += 1;
        if !name.contains("poll") {
            e.1 += ret.filter(|&x| x > 0).unwrap_or(0) as u64;
        }
    }
    let mut s = format!(
        "{:<10} {:<7} {:>8} {:>9} {:>14} {:>12}\n",
        "syscall", "fd", "calls", "per RETR", "bytes", "bytes/call"
    );
    for ((name, r), (calls, bytes)) in &stats {
        s.push_str(&format!(
            "{name:<10} {r:<7} {calls:>8} {:>9.2} {bytes:>14} {:>12.0}\n",
            *calls as f64 / n as f64,
            if *calls > 0 {
                *bytes as f64 / *calls as f64
            } else {
                0.0
            }
        ));
    }
    s
}
