//! Workload 6 (`haproxy`): aiopopd behind the real HAProxy (Debian package `haproxy`; the harness
//! is `tests/common/haproxy.rs`). The same short sessions (USER, PASS, STAT, RETR 1, QUIT on a
//! 1 KB message) straight to one aiopopd "host" and through HAProxy in TCP mode over two hosts
//! (PROXY v1 to one, v2 to the other, health checks on): sessions per second with a few clients
//! at once, p50/p99 session time, and the ratio. Then the pre-login limits: silent connections
//! to POP3S, and clients that send NOOP every second without logging in, all cut at the
//! configured limits, measured from connect to the server's close.

use super::haproxy::{self, Haproxy, Proxy};
use super::{client, fmt_time, median, percentile, Bench, Table, PASSWORD};
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// One run of `n` sessions by `clients` threads: (wall time, each session's time, failures).
fn run_sessions(port: u16, n: usize, clients: usize) -> (f64, Vec<f64>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let next = next.clone();
            thread::spawn(move || {
                let mut times = Vec::new();
                let mut failed = 0;
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let s = Instant::now();
                    match one_session(port) {
                        Ok(()) => times.push(s.elapsed().as_secs_f64()),
                        Err(e) => {
                            eprintln!("  haproxy workload session: {e}");
                            failed += 1;
                        }
                    }
                }
                (times, failed)
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut failed = 0;
    for h in handles {
        let (t, f) = h.join().unwrap_or_default();
        times.extend(t);
        failed += f;
    }
    (t.elapsed().as_secs_f64(), times, failed)
}

fn one_session(port: u16) -> client::Result<()> {
    let mut c = client::Pop3::new(client::connect(port)?);
    c.greeting()?;
    c.login("tinya", PASSWORD)?;
    let (n, octets) = c.stat()?;
    if n != 1 {
        return Err(format!("STAT: {n} messages, expected 1"));
    }
    let body = c.multi("RETR 1")?;
    if body.octets != octets {
        return Err(format!("RETR: {} octets, STAT said {octets}", body.octets));
    }
    c.quit()
}

/// `n` connections at once; each `act`s until the server closes. Returns each one's time from
/// connect to close, and how many ended some other way than `expect` says.
fn cut_times(
    port: u16,
    n: usize,
    act: fn(std::net::TcpStream) -> Result<(), String>,
) -> (Vec<f64>, usize) {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            thread::spawn(move || {
                let t = Instant::now();
                let s = client::connect(port)?;
                s.set_read_timeout(Some(Duration::from_secs(120)))
                    .map_err(|e| e.to_string())?;
                act(s)?;
                Ok::<f64, String>(t.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut bad = 0;
    for h in handles {
        match h.join() {
            Ok(Ok(t)) => times.push(t),
            Ok(Err(e)) => {
                eprintln!("  pre-login connection: {e}");
                bad += 1
            }
            Err(_) => bad += 1,
        }
    }
    (times, bad)
}

/// Sends nothing; the server must close without a byte (a TLS handshake never started).
fn silent(mut s: std::net::TcpStream) -> Result<(), String> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    if out.is_empty() {
        Ok(())
    } else {
        Err(format!("{} octets before the close", out.len()))
    }
}

/// NOOP every second, never logging in; the last line must be the login timeout's. Between
/// NOOPs it waits for a line rather than sleeping, so the cut is timed when it happens.
fn noops(s: std::net::TcpStream) -> Result<(), String> {
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let mut ask = true;
    loop {
        if ask {
            // The server may already have closed: then the read says so.
            let _ = w.write_all(b"NOOP\r\n");
        }
        r.get_ref()
            .set_read_timeout(Some(if ask {
                Duration::from_secs(120)
            } else {
                Duration::from_secs(1)
            }))
            .map_err(|e| e.to_string())?;
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Err("closed without the timeout's -ERR".into()),
            Ok(_) if line == "+OK\r\n" => ask = false,
            Ok(_) if line.starts_with("-ERR Timeout: log in within ") => return Ok(()),
            Ok(_) => return Err(format!("unexpected {line:?}")),
            // A second without a word from the server: the next NOOP.
            Err(e)
                if !ask
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                ask = true
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// CPU time of all of a process's threads so far, in seconds (utime + stime).
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // Linux's USER_HZ is 100 on every common build.
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn summary(times: &[f64]) -> String {
    format!(
        "min {}, median {}, max {}",
        fmt_time(percentile(times, 0.0)),
        fmt_time(median(times)),
        fmt_time(percentile(times, 100.0))
    )
}

impl Bench {
    /// Workload 6.
    pub(super) fn haproxy(&mut self) {
        if !std::path::Path::new(haproxy::BIN).exists() {
            let msg = format!("{} is missing (Debian package haproxy)", haproxy::BIN);
            if std::env::var_os("CI").is_some() {
                self.failures.add(msg);
            } else {
                println!("\n== 6. haproxy: skipped: {msg}");
            }
            return;
        }
        let (n, clients) = (self.plan.haproxy_sessions, self.plan.haproxy_clients);
        println!("\n== 6. haproxy: {n} sessions (USER, PASS, STAT, RETR 1 of 1 KB, QUIT), {clients} clients at once");
        let trust = format!("{}/32", haproxy::BALANCER);
        let direct = self.activator(&[]);
        let hosts = [
            self.activator(&["--proxy-protocol-from", &trust]),
            self.activator(&["--proxy-protocol-from", &trust]),
        ];
        let h = Haproxy::start(
            &[(hosts[0].port, Proxy::V1), (hosts[1].port, Proxy::V2)],
            2000,
        );
        let targets = [
            ("direct, one host", direct.port),
            ("HAProxy, two hosts", h.port),
        ];
        // Interleaved, one warm-up round; each round is all n sessions.
        let mut rate: [Vec<f64>; 2] = Default::default();
        let mut times: [Vec<f64>; 2] = Default::default();
        let (mut hcpu, mut hsessions) = (0.0, 0usize);
        for round in 0..self.opts.warmup + self.opts.reps.min(5) {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let cpu0 = process_cpu(h.pid());
                let (wall, t, failed) = run_sessions(targets[i].1, n, clients);
                if i == 1 && round >= self.opts.warmup {
                    hcpu += process_cpu(h.pid()) - cpu0;
                    hsessions += t.len();
                }
                if failed > 0 {
                    self.failures
                        .add(format!("{}: {failed} of {n} sessions failed", targets[i].0));
                }
                if round >= self.opts.warmup {
                    rate[i].push(t.len() as f64 / wall);
                    times[i].extend(t);
                }
            }
        }
        let mut table = Table::new(&["path", "sessions/s (median)", "p50 session", "p99 session"]);
        for i in 0..2 {
            table.row(vec![
                targets[i].0.to_string(),
                format!("{:.0}", median(&rate[i])),
                fmt_time(median(&times[i])),
                fmt_time(percentile(&times[i], 99.0)),
            ]);
        }
        let (d, p) = (median(&rate[0]), median(&rate[1]));
        let cost = (1.0 - p / d) * 100.0;
        let line = format!(
            "Through HAProxy: {:.2}× the direct throughput ({cost:+.1}% cost; target ≤ 10%). \
             HAProxy's own CPU: {} per session (on the same CPUs as everything else here; \
             on a balancer of its own it would take none from the hosts).",
            p / d,
            fmt_time(hcpu / hsessions.max(1) as f64)
        );
        let hlog = h.log();
        if hlog.contains("is DOWN") {
            self.failures
                .add(format!("HAProxy marked a backend down:\n{hlog}"));
        }
        drop(h);
        drop(hosts);
        drop(direct);

        // Pre-login limits.
        let (k, hs, login) = (
            self.plan.silent,
            self.plan.silent_handshake,
            self.plan.silent_login,
        );
        let key = self.d.dir().join("key.pem");
        let (hs_s, login_s) = (hs.to_string(), login.to_string());
        let tls = self.activator(&[
            "--ssl-cert",
            self.d.ca_cert_path().to_str().unwrap_or_default(),
            "--ssl-key",
            key.to_str().unwrap_or_default(),
            "--handshake-timeout",
            &hs_s,
            "--login-timeout",
            &login_s,
        ]);
        let plain = self.activator(&["--login-timeout", &login_s]);
        println!(
            "  pre-login: {k} silent POP3S connections (--handshake-timeout {hs}), \
             {k} NOOP-every-second clients (--login-timeout {login}), all at once"
        );
        let (silent_t, silent_bad) = cut_times(tls.port, k, silent);
        let (noop_t, noop_bad) = cut_times(plain.port, k, noops);
        let mut cuts = Table::new(&["clients", "limit", "cut", "cut after"]);
        for (what, limit, t, bad) in [
            ("silent, POP3S", hs, &silent_t, silent_bad),
            ("NOOP every 1 s, never log in", login, &noop_t, noop_bad),
        ] {
            let late = t.iter().filter(|&&x| x > limit as f64 + 1.5).count();
            let early = t.iter().filter(|&&x| x < limit as f64 - 0.05).count();
            if bad + late + early > 0 {
                self.failures.add(format!(
                    "{what}: {bad} ended otherwise, {early} cut early, {late} cut late (limit {limit} s)"
                ));
            }
            cuts.row(vec![
                what.to_string(),
                format!("{limit} s"),
                format!("{}/{k}", t.len() - late - early),
                summary(t),
            ]);
        }
        drop(tls);
        drop(plain);

        let t = table.markdown();
        let c = cuts.markdown();
        println!("\n{t}\n{line}\n\n{c}");
        self.md.push(format!(
            "### 6. Behind HAProxy\n\n\
             {n} sessions (USER, PASS, STAT, RETR 1 of a 1 KB message, QUIT), {clients} clients \
             at once, straight to one aiopopd under systemd-socket-activate, and through HAProxy \
             {} (TCP mode, round robin) over two such hosts, one sent PROXY v1, the other v2, \
             health checks every 2 s; medians over the rounds, percentiles over all sessions \
             (the client, HAProxy, both hosts and Dovecot share the machine's CPUs).\n\n{t}\n{line}\n\n\
             Pre-login limits: {k} connections at once of each kind, time from connect to the \
             server's close.\n\n{c}\n",
            haproxy_version()
        ));
    }
}

fn haproxy_version() -> String {
    std::process::Command::new(haproxy::BIN)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .map(str::to_string)
        })
        .unwrap_or_default()
}
