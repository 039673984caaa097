//! The benchmark behind `scripts/bench` (issue 7): aiopopd, as it runs in production (one process
//! per connection under `systemd-socket-activate --accept --inetd`, IMAP to a private Dovecot on
//! loopback), against Dovecot's own POP3 reading an identical copy of the same Maildir, and
//! against a bare byte relay to Dovecot's POP3 (the floor for any extra hop).
//!
//! Workloads (each interleaved A/B/…, with warm-up, medians over the repetitions):
//! 1. full session — login, STAT, UIDL, RETR every message, QUIT — on 20 KB messages, at several
//!    mailbox sizes (1000 is the target; all sizes make the plot);
//! 2. RETR of one 50 MB message vs one 1 KB message: time, and aiopopd's peak RSS on pipes;
//! 3. connect-to-greeting of a fresh process, plain and implicit TLS, median and p99;
//! 4. scale: STAT+UIDL on 10,000 and 100,000 messages: time, IMAP commands, memory per message;
//! 5. concurrency: 100 sessions at once, all must succeed; per-session RSS/PSS while they run;
//! 6. haproxy: 1,000 short sessions straight to one aiopopd and through HAProxy over two, and
//!    silent or never-logging-in clients cut at the pre-login limits (`balancer.rs`).
//!
//! `--quick` shrinks every size and repeats once (for CI: it checks every session, never a time).
//! `--profile` runs workload 1 once each under strace, perf and callgrind instead.
//! The harness is `tests/common/dovecot.rs`; nothing here touches aiopopd's code.

#[path = "../../tests/common/dovecot.rs"]
mod dovecot;
#[path = "../../tests/common/haproxy.rs"]
mod haproxy;

mod balancer;
mod client;
mod kdf;
mod mail;
mod procs;
mod profile;
mod report;
mod servers;

use client::{Pop3, Result};
use report::{fmt_kb, fmt_time, median, percentile, Table};
use servers::{Activator, Proxy};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "bench-pw";
/// Size of the messages of workloads 1 and 5.
pub const MSG_SIZE: usize = 20 * 1024;

const USAGE: &str = "\
usage: scripts/bench [--quick] [--reps N] [--only LIST] [--aiopopd PATH] [--static PATH]
                     [--no-write]
       scripts/bench --profile

  --quick          small sizes, one repetition; fails if any session fails, asserts no timing
  --reps N         measured repetitions per workload (default 7; warm-up runs come on top)
  --only LIST      comma-separated subset of: session,big,greeting,scale,concurrency,haproxy,oauth
  --aiopopd PATH   the aiopopd binary to measure (default: the one cargo built)
  --rev TEXT       what that binary was built from, for the report (default: git describe)
  --static PATH    also time the greeting of this aiopopd, built with OpenSSL linked statically
  --no-write       don't update BENCHMARKS.md and benches/session-time.svg
  --profile        workload 1 once under strace -c, strace (per fd), perf stat, perf record
                   and callgrind; reports in target/bench/profile/
";

pub struct Opts {
    pub quick: bool,
    pub reps: usize,
    pub warmup: usize,
    pub only: Option<Vec<String>>,
    pub aiopopd: String,
    pub rev: Option<String>,
    pub static_openssl: Option<String>,
    pub write: bool,
    pub profile: bool,
    pub out: PathBuf,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            quick: false,
            reps: 0,
            warmup: 2,
            only: None,
            aiopopd: env!("CARGO_BIN_EXE_aiopopd").to_string(),
            rev: None,
            static_openssl: None,
            write: true,
            profile: false,
            out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench"),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .unwrap_or_else(|| fail(&format!("{name} needs a value")))
            };
            match a.as_str() {
                "--quick" => o.quick = true,
                "--reps" => o.reps = value("--reps").parse().unwrap_or_else(|_| fail("--reps N")),
                "--only" => o.only = Some(value("--only").split(',').map(String::from).collect()),
                "--aiopopd" => o.aiopopd = value("--aiopopd"),
                "--rev" => o.rev = Some(value("--rev")),
                "--static" => o.static_openssl = Some(value("--static")),
                "--no-write" => o.write = false,
                "--profile" => o.profile = true,
                // `cargo bench` passes this to every bench target.
                "--bench" => {}
                "-h" | "--help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                other => fail(&format!("unknown argument {other}\n{USAGE}")),
            }
        }
        if o.reps == 0 {
            o.reps = if o.quick { 1 } else { 7 };
        }
        if o.quick {
            o.warmup = 1;
            o.write = false;
        }
        if let Some(only) = &o.only {
            for w in only {
                if !WORKLOADS.contains(&w.as_str()) {
                    fail(&format!("--only: unknown workload {w}"));
                }
            }
            // A partial run must not overwrite the full table.
            o.write = false;
        }
        o
    }

    fn runs(&self, workload: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|w| w == workload))
    }
}

const WORKLOADS: &[&str] = &[
    "session",
    "big",
    "greeting",
    "scale",
    "concurrency",
    "haproxy",
    "oauth",
];

fn fail(msg: &str) -> ! {
    eprintln!("bench: {msg}");
    std::process::exit(2)
}

/// The sizes of everything, full or `--quick`.
pub struct Plan {
    /// Mailbox sizes (messages of MSG_SIZE) for the full-session workload and the plot.
    pub session_sizes: Vec<usize>,
    /// The size the target is stated for (1000).
    pub headline: usize,
    pub big: usize,
    pub tiny: usize,
    pub greetings: usize,
    pub scale: Vec<usize>,
    pub scale_msg: usize,
    pub sessions: usize,
    pub session_msgs: usize,
    /// Workload 6: sessions per round, clients at once, pre-login connections of each kind,
    /// and the limits they are cut at (seconds).
    pub haproxy_sessions: usize,
    pub haproxy_clients: usize,
    pub silent: usize,
    pub silent_handshake: u64,
    pub silent_login: u64,
    /// Workload 7: measured rounds of the token store's KDF.
    pub kdf_rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                session_sizes: vec![10, 30, 100],
                headline: 100,
                big: 2 << 20,
                tiny: 1024,
                greetings: 20,
                scale: vec![1000, 3000],
                scale_msg: 600,
                sessions: 100,
                session_msgs: 2,
                haproxy_sessions: 20,
                haproxy_clients: 2,
                silent: 3,
                silent_handshake: 1,
                silent_login: 2,
                kdf_rounds: 3,
            }
        } else {
            Plan {
                session_sizes: vec![100, 300, 1000, 3000],
                headline: 1000,
                big: 50 << 20,
                tiny: 1024,
                greetings: 200,
                scale: vec![10_000, 100_000],
                scale_msg: 600,
                sessions: 100,
                session_msgs: 5,
                haproxy_sessions: 1000,
                haproxy_clients: 8,
                silent: 50,
                silent_handshake: 3,
                silent_login: 6,
                kdf_rounds: 15,
            }
        }
    }
}

/// What a workload found wrong; the run fails at the end if there is any.
#[derive(Default)]
struct Failures(Mutex<Vec<String>>);

impl Failures {
    fn add(&self, what: String) {
        eprintln!("FAILED: {what}");
        self.0.lock().expect("failures").push(what);
    }
    fn count(&self) -> usize {
        self.0.lock().expect("failures").len()
    }
}

/// The environment every workload runs in.
struct Bench {
    opts: Opts,
    plan: Plan,
    d: dovecot::Dovecot,
    master: u32,
    failures: Failures,
    /// Markdown sections, in order.
    md: Vec<String>,
}

fn main() {
    // `cargo bench` points LD_LIBRARY_PATH at its build directories; inherited, it would make
    // every aiopopd (and /bin/echo) search ~50 directories for libssl before it greets: not
    // what production does. Nothing else runs yet, so changing the environment is sound.
    std::env::remove_var("LD_LIBRARY_PATH");
    let opts = Opts::parse();
    if !Path::new(&opts.aiopopd).exists() {
        fail(&format!("no aiopopd binary at {}", opts.aiopopd));
    }
    std::fs::create_dir_all(&opts.out).expect("create target/bench");
    if opts.profile {
        profile::run(&opts);
        return;
    }
    let plan = Plan::new(opts.quick);
    let started = Instant::now();
    let machine = report::machine(opts.rev.as_deref());
    println!("aiopopd benchmark ({})\n{machine}", opts.aiopopd);

    let users = user_names(&opts, &plan);
    let pairs: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), PASSWORD)).collect();
    let d = dovecot::Dovecot::start_with_users(&pairs);
    let master = procs::dovecot_master(&d);
    let mut b = Bench {
        opts,
        plan,
        d,
        master,
        failures: Failures::default(),
        md: Vec::new(),
    };
    let t = Instant::now();
    b.fill_mailboxes();
    println!(
        "mailboxes written and indexed in {}\n",
        fmt_time(t.elapsed().as_secs_f64())
    );

    let mut plot = None;
    if b.opts.runs("session") {
        plot = Some(b.sessions());
    }
    if b.opts.runs("big") {
        b.big_message();
    }
    if b.opts.runs("greeting") {
        b.greetings();
    }
    if b.opts.runs("scale") {
        b.scale();
    }
    if b.opts.runs("concurrency") {
        b.concurrency();
    }
    if b.opts.runs("haproxy") {
        b.haproxy();
    }
    if b.opts.runs("oauth") {
        b.oauth();
    }

    let failures = b.failures.count();
    let elapsed = started.elapsed().as_secs_f64();
    b.write_results(&machine, plot, elapsed);
    // Stops Dovecot (process::exit would skip the destructor and leave it running).
    drop(b);
    if failures > 0 {
        eprintln!("bench: {failures} failure(s); see FAILED lines above");
        std::process::exit(1);
    }
    println!("bench: all sessions succeeded ({})", fmt_time(elapsed));
}

fn user_names(opts: &Opts, plan: &Plan) -> Vec<String> {
    let mut u = Vec::new();
    if opts.runs("session") {
        for n in &plan.session_sizes {
            u.push(format!("s{n}a"));
            u.push(format!("s{n}d"));
        }
    }
    // The 1 KB mailbox is also the baseline for memory per message (scale).
    u.extend(["biga", "bigd", "tinya", "tinyd"].map(String::from));
    if opts.runs("scale") {
        for n in &plan.scale {
            u.push(format!("scale{n}"));
        }
    }
    if opts.runs("concurrency") {
        for i in 0..plan.sessions {
            u.push(format!("c{i:03}"));
        }
    }
    u
}

/// Which server a session goes to, and which of Dovecot's users it logs in as: aiopopd's
/// users end in `a`, Dovecot's own POP3 (and the relay to it) use the `d` copy, so Dovecot's
/// POP3 setting `\Seen` never changes what aiopopd lists.
#[derive(Clone, Copy)]
struct Server {
    name: &'static str,
    port: u16,
    suffix: &'static str,
    kind: Kind,
}

impl Server {
    /// aiopopd under this systemd-socket-activate, for users ending in `suffix`.
    fn aiopopd(act: &Activator, suffix: &'static str) -> Server {
        Server {
            name: "aiopopd",
            port: act.port,
            suffix,
            kind: Kind::Aiopopd(act.pid()),
        }
    }

    /// The byte relay to Dovecot's POP3 (its users, the `d` copy).
    fn relay(relay: &Proxy) -> Server {
        Server {
            name: "byte relay",
            port: relay.port,
            suffix: "d",
            kind: Kind::Relay,
        }
    }

    /// Dovecot's own POP3, for users ending in `suffix`.
    fn dovecot(port: u16, suffix: &'static str) -> Server {
        Server {
            name: "Dovecot POP3",
            port,
            suffix,
            kind: Kind::Dovecot,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// The pid of systemd-socket-activate.
    Aiopopd(u32),
    Dovecot,
    Relay,
}

/// The processes serving one session, for their CPU time.
struct Pids {
    proxy: Option<u32>,
    backend: Option<u32>,
}

impl Pids {
    fn cpu(&self) -> (u64, u64) {
        (
            self.proxy.map_or(0, procs::cpu_ns),
            self.backend.map_or(0, procs::cpu_ns),
        )
    }
}

impl Server {
    fn pids(&self, master: u32) -> Pids {
        match self.kind {
            Kind::Aiopopd(activator) => Pids {
                proxy: procs::newest_child(activator, "aiopopd").map(|p| p.pid),
                backend: procs::newest_child(master, "imap").map(|p| p.pid),
            },
            Kind::Dovecot | Kind::Relay => Pids {
                proxy: None,
                backend: procs::newest_child(master, "pop3").map(|p| p.pid),
            },
        }
    }
}

/// One measured full session.
#[derive(Clone, Copy)]
struct Sample {
    wall: f64,
    /// CPU seconds between login and QUIT: aiopopd's process, and the Dovecot process behind
    /// it (imap for aiopopd, pop3 for Dovecot and the relay).
    cpu_proxy: f64,
    cpu_backend: f64,
    /// CPU seconds of the benchmark's client thread over the same span.
    cpu_client: f64,
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; this clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Login, STAT, UIDL, RETR every message, QUIT; checks the count and that the RETRs add up to
/// STAT's octets. The /proc look-ups for the CPU figures are not part of `wall`.
fn full_session(srv: &Server, user: &str, expect: usize, master: u32) -> Result<Sample> {
    let t0 = Instant::now();
    let mut c = Pop3::new(client::connect(srv.port)?);
    c.greeting()?;
    c.login(user, PASSWORD)?;
    let p0 = Instant::now();
    let pids = srv.pids(master);
    let cpu0 = pids.cpu();
    let client0 = thread_cpu();
    let mut probe = p0.elapsed();
    let (n, octets) = c.stat()?;
    if n != expect {
        return Err(format!("STAT: {n} messages, expected {expect}"));
    }
    let uidl = c.multi("UIDL")?;
    if uidl.lines != n as u64 {
        return Err(format!("UIDL: {} lines for {n} messages", uidl.lines));
    }
    let mut got = 0;
    for i in 1..=n {
        got += c.multi(&format!("RETR {i}"))?.octets;
    }
    if got != octets {
        return Err(format!("RETR served {got} octets, STAT said {octets}"));
    }
    let client1 = thread_cpu();
    let p1 = Instant::now();
    let cpu1 = pids.cpu();
    probe += p1.elapsed();
    c.quit()?;
    Ok(Sample {
        wall: (t0.elapsed() - probe).as_secs_f64(),
        cpu_proxy: cpu1.0.saturating_sub(cpu0.0) as f64 / 1e9,
        cpu_backend: cpu1.1.saturating_sub(cpu0.1) as f64 / 1e9,
        cpu_client: client1 - client0,
    })
}

/// Interleaves the servers (order reversed every other round), `warmup` unrecorded rounds
/// first. Returns the samples per server name.
fn interleave<T>(
    servers: &[Server],
    warmup: usize,
    reps: usize,
    failures: &Failures,
    mut run: impl FnMut(&Server) -> Result<T>,
) -> BTreeMap<&'static str, Vec<T>> {
    let mut out: BTreeMap<&'static str, Vec<T>> = BTreeMap::new();
    for round in 0..warmup + reps {
        let mut order: Vec<&Server> = servers.iter().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for srv in order {
            match run(srv) {
                Ok(x) if round >= warmup => out.entry(srv.name).or_default().push(x),
                Ok(_) => {}
                Err(e) => failures.add(format!("{}: {e}", srv.name)),
            }
        }
    }
    out
}

/// The median of `f` over one server's samples (NaN if it has none).
fn median_of<T>(samples: &BTreeMap<&str, Vec<T>>, name: &str, f: fn(&T) -> f64) -> f64 {
    median(
        &samples
            .get(name)
            .map(|v| v.iter().map(f).collect::<Vec<_>>())
            .unwrap_or_default(),
    )
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "—".into()
    } else {
        format!("{:.2}×", a / b)
    }
}

impl Bench {
    fn aiopopd_args(&self, extra: &[&str]) -> Vec<String> {
        self.aiopopd_args_to(self.d.imap_port, extra)
    }

    /// The arguments for an aiopopd whose IMAP server is at this port (a proxy's).
    fn aiopopd_args_to(&self, imap_port: u16, extra: &[&str]) -> Vec<String> {
        let port = imap_port.to_string();
        let mut a: Vec<String> = [
            "-H",
            "127.0.0.1",
            "-p",
            &port,
            "--allow-plaintext-auth",
            "-d",
            "bench.test",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn activator(&self, extra: &[&str]) -> Activator {
        Activator::start(&self.opts.aiopopd, &self.aiopopd_args(extra))
    }

    /// aiopopd's peak RSS on pipes for USER, PASS, STAT, `command` (checked against STAT).
    fn peak_rss(&self, user: &str, command: &str) -> Result<servers::Peak> {
        servers::pipe_session(&self.opts.aiopopd, &self.aiopopd_args(&[]), |c| {
            c.login(user, PASSWORD)?;
            let (n, octets) = c.stat()?;
            let body = c.multi(command)?;
            let ok = if command == "UIDL" {
                body.lines == n as u64
            } else {
                body.octets == octets
            };
            if !ok {
                return Err(format!(
                    "{command} doesn't match STAT {n} {octets}: {body:?}"
                ));
            }
            Ok(())
        })
    }

    fn fill_mailboxes(&self) {
        let p = &self.plan;
        if self.opts.runs("session") {
            for &n in &p.session_sizes {
                let users = [format!("s{n}a"), format!("s{n}d")];
                let users: Vec<&str> = users.iter().map(String::as_str).collect();
                mail::fill(&self.d, &users, n, |i| mail::message(i, MSG_SIZE));
            }
        }
        let big = mail::message(0, p.big);
        mail::fill(&self.d, &["biga", "bigd"], 1, |_| big.clone());
        mail::fill(&self.d, &["tinya", "tinyd"], 1, |i| {
            mail::message(i, p.tiny)
        });
        if self.opts.runs("scale") {
            for &n in &p.scale {
                let t = Instant::now();
                mail::fill(&self.d, &[&format!("scale{n}")], n, |i| {
                    mail::message(i, p.scale_msg)
                });
                println!(
                    "  {n} messages written and indexed in {}",
                    fmt_time(t.elapsed().as_secs_f64())
                );
            }
        }
        if self.opts.runs("concurrency") {
            for i in 0..p.sessions {
                let u = format!("c{i:03}");
                mail::fill(&self.d, &[&u], p.session_msgs, |i| {
                    mail::message(i, MSG_SIZE)
                });
            }
        }
    }

    /// Workload 1 and the plot.
    fn sessions(&mut self) -> Vec<report::Series> {
        let act = self.activator(&[]);
        let relay = Proxy::start(self.d.pop3_port, false);
        let servers = [
            Server::aiopopd(&act, "a"),
            Server::dovecot(self.d.pop3_port, "d"),
            Server::relay(&relay),
        ];
        println!(
            "== 1. full session (login, STAT, UIDL, RETR all, QUIT), {} KB messages, {} warm-up + {} rounds",
            MSG_SIZE / 1024,
            self.opts.warmup,
            self.opts.reps
        );
        let mut table = Table::new(&[
            "messages",
            "aiopopd",
            "Dovecot POP3",
            "byte relay",
            "aiopopd / Dovecot",
            "relay / Dovecot",
            "per message: aiopopd / Dovecot",
        ]);
        let mut cpu = Table::new(&[
            "messages",
            "aiopopd process CPU",
            "Dovecot imap CPU (behind aiopopd)",
            "Dovecot pop3 CPU",
            "client CPU (aiopopd / Dovecot)",
            "wall aiopopd",
            "wall Dovecot",
        ]);
        let mut series: Vec<report::Series> = servers
            .iter()
            .zip(["#d62728", "#1f77b4", "#7f7f7f"])
            .map(|(s, color)| report::Series {
                name: s.name.to_string(),
                color,
                points: Vec::new(),
                labels: Vec::new(),
            })
            .collect();
        let master = self.master;
        for &n in &self.plan.session_sizes.clone() {
            let samples = interleave(
                &servers,
                self.opts.warmup,
                self.opts.reps,
                &self.failures,
                |srv| full_session(srv, &format!("s{n}{}", srv.suffix), n, master),
            );
            let wall = |name: &str| median_of(&samples, name, |s| s.wall);
            let cpu_of = |name: &str, f: fn(&Sample) -> f64| median_of(&samples, name, f);
            let (a, d, r) = (wall("aiopopd"), wall("Dovecot POP3"), wall("byte relay"));
            for (s, v) in series.iter_mut().zip([a, d, r]) {
                if !v.is_nan() {
                    s.points.push((n as f64, v));
                    // aiopopd's ratio to Dovecot's POP3 next to each of its points.
                    s.labels.push(if s.name == "aiopopd" {
                        ratio(v, d)
                    } else {
                        String::new()
                    });
                }
            }
            table.row(vec![
                n.to_string(),
                fmt_time(a),
                fmt_time(d),
                fmt_time(r),
                ratio(a, d),
                ratio(r, d),
                format!("{} / {}", fmt_time(a / n as f64), fmt_time(d / n as f64)),
            ]);
            cpu.row(vec![
                n.to_string(),
                fmt_time(cpu_of("aiopopd", |s| s.cpu_proxy)),
                fmt_time(cpu_of("aiopopd", |s| s.cpu_backend)),
                fmt_time(cpu_of("Dovecot POP3", |s| s.cpu_backend)),
                format!(
                    "{} / {}",
                    fmt_time(cpu_of("aiopopd", |s| s.cpu_client)),
                    fmt_time(cpu_of("Dovecot POP3", |s| s.cpu_client))
                ),
                fmt_time(a),
                fmt_time(d),
            ]);
            println!(
                "  {n:>5} messages: aiopopd {} | Dovecot {} | relay {} | ratio {}",
                fmt_time(a),
                fmt_time(d),
                fmt_time(r),
                ratio(a, d)
            );
        }
        let t = table.markdown();
        let c = cpu.markdown();
        println!("\n{t}\nCPU between login and QUIT (medians):\n{c}");
        self.md.push(format!(
            "### 1. Full session\n\n\
             Login, STAT, UIDL, RETR of every message, QUIT, by a lock-step client; messages of \
             {} KB; median of {} rounds after {} warm-up, servers interleaved. Target: aiopopd \
             ≤ 1.2× Dovecot at {} messages.\n\n{t}\n\
             CPU time of the server processes between login and QUIT (medians; from \
             /proc/PID/schedstat):\n\n{c}",
            MSG_SIZE / 1024,
            self.opts.reps,
            self.opts.warmup,
            self.plan.headline
        ));
        drop(act);
        self.remote_imap();
        series
    }

    /// Workload 1 with the IMAP server far away: a delay line between aiopopd and Dovecot's
    /// IMAP. A proxy that waited for each FETCH would pay a round trip per message on top.
    fn remote_imap(&mut self) {
        let sizes = &self.plan.session_sizes;
        let n = sizes[1.min(sizes.len() - 1)];
        let reps = self.opts.reps.min(3);
        println!(
            "
== 1b. the same, {n} messages, IMAP server behind a delay line"
        );
        let mut table = Table::new(&[
            "IMAP round trip",
            "aiopopd",
            "Dovecot POP3 (local)",
            "aiopopd / Dovecot",
            "a round trip per message",
        ]);
        for one_way in [1u64, 5] {
            let line = Proxy::delayed(self.d.imap_port, Duration::from_millis(one_way));
            let act = Activator::start(&self.opts.aiopopd, &self.aiopopd_args_to(line.port, &[]));
            let servers = [
                Server::aiopopd(&act, "a"),
                Server::dovecot(self.d.pop3_port, "d"),
            ];
            let master = self.master;
            let samples = interleave(&servers, 1, reps, &self.failures, |srv| {
                full_session(srv, &format!("s{n}{}", srv.suffix), n, master)
            });
            let wall = |name: &str| median_of(&samples, name, |s| s.wall);
            let (a, d) = (wall("aiopopd"), wall("Dovecot POP3"));
            let rtt = 2.0 * one_way as f64 / 1000.0;
            println!(
                "  round trip {}: aiopopd {} | Dovecot (local) {} | ratio {}",
                fmt_time(rtt),
                fmt_time(a),
                fmt_time(d),
                ratio(a, d)
            );
            table.row(vec![
                fmt_time(rtt),
                fmt_time(a),
                fmt_time(d),
                ratio(a, d),
                format!("+{}", fmt_time(rtt * n as f64)),
            ]);
        }
        let t = table.markdown();
        println!(
            "
{t}"
        );
        self.md.push(format!(
            "### 1b. The IMAP server far away\n\n\
             Workload 1 on {n} messages, with a delay line (a relay holding every byte for half \
             the round trip in each direction) between aiopopd and Dovecot's IMAP; Dovecot's \
             POP3 stays local, as if it ran next to the mailbox. Median of {reps} rounds after 1 \
             warm-up. The last column is what a proxy that waited for each FETCH would add to \
             the session at the least.\n\n{t}"
        ));
    }

    /// Workload 2.
    fn big_message(&mut self) {
        let act = self.activator(&[]);
        let relay = Proxy::start(self.d.pop3_port, false);
        let servers = [
            Server::aiopopd(&act, "a"),
            Server::dovecot(self.d.pop3_port, "d"),
            Server::relay(&relay),
        ];
        let big_label = format!("{} MB", self.plan.big >> 20);
        println!("\n== 2. RETR of one {big_label} message vs one 1 KB message");
        let mut table = Table::new(&[
            "message",
            "RETR aiopopd",
            "RETR Dovecot",
            "RETR relay",
            "aiopopd / Dovecot",
            "aiopopd peak RSS",
        ]);
        let mut rss = BTreeMap::new();
        for (label, base) in [(big_label.as_str(), "big"), ("1 KB", "tiny")] {
            let samples = interleave(
                &servers,
                self.opts.warmup.min(1),
                self.opts.reps.min(5),
                &self.failures,
                |srv| retr_one(srv, &format!("{base}{}", srv.suffix)),
            );
            let m = |name: &str| median(samples.get(name).map_or(&[][..], |v| &v[..]));
            // Peak RSS: aiopopd on pipes, VmHWM read before QUIT.
            let mut peaks = Vec::new();
            for _ in 0..3 {
                match self.peak_rss(&format!("{base}a"), "RETR 1") {
                    Ok(p) => peaks.push(p.hwm_kb as f64),
                    Err(e) => self.failures.add(format!(
                        "aiopopd on pipes, RETR of the {label} message: {e}"
                    )),
                }
            }
            let peak = median(&peaks);
            rss.insert(label.to_string(), peak);
            let (a, d, r) = (m("aiopopd"), m("Dovecot POP3"), m("byte relay"));
            println!(
                "  {label}: RETR aiopopd {} | Dovecot {} | relay {} | ratio {} | aiopopd peak RSS {}",
                fmt_time(a),
                fmt_time(d),
                fmt_time(r),
                ratio(a, d),
                fmt_kb(peak)
            );
            table.row(vec![
                label.to_string(),
                fmt_time(a),
                fmt_time(d),
                fmt_time(r),
                ratio(a, d),
                fmt_kb(peak),
            ]);
        }
        let extra = rss.get(&big_label).copied().unwrap_or(f64::NAN)
            - rss.get("1 KB").copied().unwrap_or(f64::NAN);
        let t = table.markdown();
        println!(
            "\n{t}\npeak RSS difference {big_label} − 1 KB: {}",
            fmt_kb(extra)
        );
        self.md.push(format!(
            "### 2. One big message\n\n\
             Time of the RETR alone (median of {} rounds); peak RSS of aiopopd serving USER, \
             PASS, STAT, RETR 1 on pipes (VmHWM of /proc/PID/status before QUIT, median of 3). Target: ≤ 2× \
             Dovecot's time; peak RSS ≤ 20 MB and ≤ 2 MB above the 1 KB case.\n\n{t}\n\
             Peak RSS difference, {big_label} − 1 KB: **{}**.\n",
            self.opts.reps.min(5),
            fmt_kb(extra)
        ));
        drop(act);
    }

    /// Workload 3.
    fn greetings(&mut self) {
        use std::fs;
        let tls_dir = self.opts.out.join("tls");
        fs::create_dir_all(&tls_dir).expect("mkdir tls");
        // The RSA-2048 pair Dovecot uses, so both servers do the same handshake work; and an
        // ECDSA P-256 pair as `--ssl-generate` makes (rcgen).
        let rsa_cert = self.d.ca_cert_path().to_path_buf();
        let rsa_key = self.d.dir().join("key.pem");
        let ec = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("rcgen certificate");
        let ec_cert = tls_dir.join("ecdsa-cert.pem");
        let ec_key = tls_dir.join("ecdsa-key.pem");
        fs::write(&ec_cert, ec.cert.pem()).expect("write cert");
        fs::write(&ec_key, ec.signing_key.serialize_pem()).expect("write key");
        let s = |p: &Path| p.to_str().expect("utf-8 path").to_string();
        let plain = self.activator(&[]);
        // The floor: the same spawning of a small C program that writes a greeting and exits.
        let floor = Activator::start("/bin/echo", &["-e".to_string(), "+OK floor\\r".to_string()]);
        let tls_rsa = self.activator(&["--ssl-cert", &s(&rsa_cert), "--ssl-key", &s(&rsa_key)]);
        let tls_ec = self.activator(&["--ssl-cert", &s(&ec_cert), "--ssl-key", &s(&ec_key)]);
        let mut connector = native_tls::TlsConnector::builder();
        for pem in [&rsa_cert, &ec_cert] {
            let cert = native_tls::Certificate::from_pem(&fs::read(pem).expect("read cert"))
                .expect("PEM certificate");
            connector.add_root_certificate(cert);
        }
        let connector = connector.build().expect("TLS connector");
        let mut targets: Vec<(&str, u16, bool)> = vec![
            ("floor: /bin/echo under socket-activate", floor.port, false),
            ("aiopopd plain", plain.port, false),
            ("Dovecot POP3 plain", self.d.pop3_port, false),
            ("aiopopd TLS (RSA 2048)", tls_rsa.port, true),
            ("Dovecot POP3S (RSA 2048)", self.d.pop3s_port, true),
            ("aiopopd TLS (ECDSA P-256)", tls_ec.port, true),
        ];
        // The same aiopopd with OpenSSL (native-tls, the IMAP side) linked statically: what
        // loading Debian's libssl and libcrypto costs (README, "Start-up time").
        let static_plain = self.opts.static_openssl.clone().map(|bin| {
            let args = self.aiopopd_args(&[]);
            Activator::start(&bin, &args)
        });
        if let Some(a) = &static_plain {
            targets.insert(
                2,
                ("aiopopd plain, OpenSSL linked statically", a.port, false),
            );
        }
        let n = self.plan.greetings;
        println!("\n== 3. connect to greeting, fresh process, {n} connections each (interleaved)");
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        for round in 0..n + 10 {
            for (i, &(name, port, tls)) in targets.iter().enumerate() {
                match greet(port, tls.then_some(&connector), port != floor.port) {
                    Ok(t) if round >= 10 => times[i].push(t),
                    Ok(_) => {}
                    Err(e) => self.failures.add(format!("{name} greeting: {e}")),
                }
            }
        }
        let mut table = Table::new(&["server", "median", "p90", "p99", "max"]);
        for ((name, _, _), t) in targets.iter().zip(&times) {
            table.row(vec![
                name.to_string(),
                fmt_time(median(t)),
                fmt_time(percentile(t, 90.0)),
                fmt_time(percentile(t, 99.0)),
                fmt_time(percentile(t, 100.0)),
            ]);
        }
        let t = table.markdown();
        println!("{t}");
        self.md.push(format!(
            "### 3. Connect to greeting\n\n\
             From `connect()` to the whole greeting line read (for TLS, the handshake included; \
             OpenSSL client, TLS 1.3, no resumption), a fresh server process each time (aiopopd \
             via systemd-socket-activate; Dovecot forks a login process per connection), {n} \
             connections per server after 10 warm-up, interleaved. The floor row is \
             systemd-socket-activate starting `/bin/echo -e '+OK floor\\r'` per connection: \
             fork, exec and dynamic loading of a small C program, nothing else. Target: ≤ 2 ms \
             plain.\n\n{t}"
        ));
    }

    /// Workload 4b: `--uidl-format %m` on the smallest scale mailbox, each header read (cold:
    /// no cache under --state-dir) or the digests kept from the session before (warm), against
    /// the default format. Target: warm ≤ 1.2× the default.
    fn header_digests(&mut self) -> String {
        let Some(&n) = self.plan.scale.first() else {
            return String::new();
        };
        let state = tempfile::tempdir().expect("temp dir");
        let dir = state.path().to_str().expect("utf-8 path").to_string();
        let cold_dir = state.path().join("cold");
        let cold_arg = cold_dir.to_str().expect("utf-8 path").to_string();
        let plain = self.activator(&[]);
        let warm = self.activator(&["--uidl-format", "%m", "--state-dir", &dir]);
        let cold = self.activator(&["--uidl-format", "%m", "--state-dir", &cold_arg]);
        let named = |act: &Activator, name: &'static str| Server {
            name,
            ..Server::aiopopd(act, "")
        };
        let servers = [
            named(&plain, "%08Xu%08Xv"),
            named(&warm, "%m, warm cache"),
            named(&cold, "%m, cold cache"),
        ];
        let user = format!("scale{n}");
        let samples = interleave(&servers, 1, self.opts.reps.min(5), &self.failures, |srv| {
            if srv.name.contains("cold") {
                let _ = std::fs::remove_dir_all(&cold_dir);
            }
            stat_uidl(srv, &user, n)
        });
        let m = |name: &str| median(samples.get(name).map_or(&[][..], |v| &v[..]));
        let (d, w, c) = (m("%08Xu%08Xv"), m("%m, warm cache"), m("%m, cold cache"));
        let line = format!(
            "{n} messages, login + STAT + UIDL + QUIT: default format {}, %m warm cache {} \
             ({}), %m cold cache {} ({}); target: warm ≤ 1.2×",
            fmt_time(d),
            fmt_time(w),
            ratio(w, d),
            fmt_time(c),
            ratio(c, d)
        );
        println!("\n== 4b. --uidl-format %m\n  {line}");
        format!(
            "\n\n**4b. `--uidl-format %m`** (header digests, cached under --state-dir): {line}."
        )
    }

    /// Workload 4.
    fn scale(&mut self) {
        let act = self.activator(&[]);
        let servers = [
            Server::aiopopd(&act, ""),
            Server::dovecot(self.d.pop3_port, ""),
        ];
        // IMAP commands per session, through a counting proxy in front of Dovecot's IMAP.
        let counter = Proxy::start(self.d.imap_port, true);
        let counted =
            Activator::start(&self.opts.aiopopd, &self.aiopopd_args_to(counter.port, &[]));
        println!(
            "\n== 4. scale: login, STAT, UIDL, QUIT on {:?} messages",
            self.plan.scale
        );
        let baseline = match self.peak_rss("tinya", "UIDL") {
            Ok(p) => p.hwm_kb as f64,
            Err(e) => {
                self.failures
                    .add(format!("aiopopd on pipes, 1 message: {e}"));
                f64::NAN
            }
        };
        let mut table = Table::new(&[
            "messages",
            "aiopopd",
            "Dovecot POP3",
            "aiopopd / Dovecot",
            "IMAP commands (aiopopd)",
            "IMAP bytes in",
            "aiopopd peak RSS",
            "RSS per message",
        ]);
        let mut prev: Option<(usize, f64, f64)> = None;
        let mut growth = Vec::new();
        for &n in &self.plan.scale.clone() {
            let user = format!("scale{n}");
            let samples = interleave(&servers, 1, self.opts.reps.min(5), &self.failures, |srv| {
                stat_uidl(srv, &user, n)
            });
            let m = |name: &str| median(samples.get(name).map_or(&[][..], |v| &v[..]));
            let (a, d) = (m("aiopopd"), m("Dovecot POP3"));
            counter.take();
            let counts = match stat_uidl(
                &Server {
                    name: "aiopopd (counted)",
                    port: counted.port,
                    suffix: "",
                    kind: Kind::Relay,
                },
                &user,
                n,
            ) {
                Ok(_) => {
                    // The proxy records a connection when both directions have ended.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    loop {
                        let c = counter.take();
                        if let Some(c) = c.into_iter().next_back() {
                            break Some(c);
                        }
                        if Instant::now() > deadline {
                            break None;
                        }
                        thread::sleep(Duration::from_millis(10));
                    }
                }
                Err(e) => {
                    self.failures.add(format!("counted session on {n}: {e}"));
                    None
                }
            };
            let rss = match self.peak_rss(&user, "UIDL") {
                Ok(p) => p.hwm_kb as f64,
                Err(e) => {
                    self.failures
                        .add(format!("aiopopd on pipes, {n} messages: {e}"));
                    f64::NAN
                }
            };
            let per = (rss - baseline) * 1024.0 / n as f64;
            let (cmds, bytes) = counts.as_ref().map_or(("?".into(), "?".into()), |c| {
                (
                    format!("{} ({})", c.client_lines, summarize_verbs(&c.verbs)),
                    fmt_kb(c.server_bytes as f64 / 1024.0),
                )
            });
            if let Some((pn, pa, pd)) = prev {
                growth.push(format!(
                    "{pn} → {n} messages ({:.0}×): aiopopd {:.1}×, Dovecot {:.1}×",
                    n as f64 / pn as f64,
                    a / pa,
                    d / pd
                ));
            }
            prev = Some((n, a, d));
            println!(
                "  {n:>6} messages: aiopopd {} | Dovecot {} | ratio {} | IMAP commands {cmds} | peak RSS {} ({per:.0} B/message)",
                fmt_time(a),
                fmt_time(d),
                ratio(a, d),
                fmt_kb(rss)
            );
            table.row(vec![
                n.to_string(),
                fmt_time(a),
                fmt_time(d),
                ratio(a, d),
                cmds,
                bytes,
                fmt_kb(rss),
                format!("{per:.0} B"),
            ]);
        }
        let t = table.markdown();
        println!("\n{t}\n{}", growth.join("\n"));
        let digests = self.header_digests();
        self.md.push(format!(
            "### 4. Scale\n\n\
             USER, PASS, STAT, UIDL, QUIT on mailboxes of {}-octet messages (one copy, read by \
             both servers; nothing is retrieved, so nothing changes). Median of {} rounds. IMAP \
             commands counted by a TCP proxy in front of Dovecot's IMAP (the LOGOUT included); \
             RSS per message = (peak RSS − peak RSS for a 1-message mailbox, {}) / messages. \
             Target: linear growth, a constant number of IMAP round trips.\n\n{t}\n{}\n",
            self.plan.scale_msg,
            self.opts.reps.min(5),
            fmt_kb(baseline),
            growth
                .iter()
                .map(|g| format!("Growth {g}."))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        self.md.push(digests);
        drop((act, counted));
    }

    /// Workload 5.
    fn concurrency(&mut self) {
        let act = self.activator(&["--on-dele", "keep"]);
        let n = self.plan.sessions;
        let msgs = self.plan.session_msgs;
        let servers = [
            Server::aiopopd(&act, ""),
            Server::dovecot(self.d.pop3_port, ""),
        ];
        println!("\n== 5. concurrency: {n} sessions at once ({msgs} × 20 KB each)");
        let mut table = Table::new(&[
            "server",
            "sessions ok",
            "process",
            "RSS median",
            "RSS max",
            "PSS median",
            "PSS total",
        ]);
        for srv in &servers {
            let (ok, mem) = self.paused_sessions(srv, n, msgs);
            for (comm, m) in mem {
                let rss: Vec<f64> = m.iter().map(|x| x.rss_kb as f64).collect();
                let pss: Vec<f64> = m.iter().map(|x| x.pss_kb as f64).collect();
                println!(
                    "  {}: {ok}/{n} ok; {} × {comm}: RSS median {} max {}, PSS median {} total {}",
                    srv.name,
                    m.len(),
                    fmt_kb(median(&rss)),
                    fmt_kb(percentile(&rss, 100.0)),
                    fmt_kb(median(&pss)),
                    fmt_kb(pss.iter().sum())
                );
                table.row(vec![
                    srv.name.to_string(),
                    format!("{ok}/{n}"),
                    format!("{} × {comm}", m.len()),
                    fmt_kb(median(&rss)),
                    fmt_kb(percentile(&rss, 100.0)),
                    fmt_kb(median(&pss)),
                    fmt_kb(pss.iter().sum()),
                ]);
            }
        }
        // Throughput: all sessions at once, no pause; the time until the last one ends.
        let makespans = interleave(&servers, 1, self.opts.reps.min(3), &self.failures, |srv| {
            let t = Instant::now();
            let ok = run_parallel(srv, n, msgs, None);
            if ok == n {
                Ok(t.elapsed().as_secs_f64())
            } else {
                Err(format!("{} of {n} parallel sessions failed", n - ok))
            }
        });
        let m = |name: &str| median(makespans.get(name).map_or(&[][..], |v| &v[..]));
        let (a, d) = (m("aiopopd"), m("Dovecot POP3"));
        let t = table.markdown();
        let line = format!(
            "All {n} sessions started at once and run to QUIT without pausing: the last ends \
             after {} with aiopopd, {} with Dovecot's POP3 ({}).",
            fmt_time(a),
            fmt_time(d),
            ratio(a, d)
        );
        println!("\n{t}\n{line}");
        self.md.push(format!(
            "### 5. Concurrency\n\n\
             {n} sessions at once on {} CPUs, each USER, PASS, STAT, RETR 1, then a pause while \
             /proc/PID/smaps_rollup of every server process is read, then the other RETRs and \
             QUIT (aiopopd with `--on-dele keep`, under systemd-socket-activate). Behind every \
             aiopopd process there is a Dovecot `imap` process.\n\n{t}\n{line}\n",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ));
        drop(act);
    }

    /// `n` sessions that all pause after RETR 1 until the server processes have been
    /// measured. Returns the sessions that succeeded and the memory of each kind of process.
    fn paused_sessions(
        &self,
        srv: &Server,
        n: usize,
        msgs: usize,
    ) -> (usize, Vec<(&'static str, Vec<procs::Mem>)>) {
        let gate = Arc::new(Gate::default());
        let g = gate.clone();
        let srv2 = *srv;
        let runner = thread::spawn(move || run_parallel(&srv2, n, msgs, Some(g)));
        let arrived = gate.wait_for(n, Duration::from_secs(120));
        let kinds: Vec<(u32, &'static str)> = match srv.kind {
            Kind::Aiopopd(activator) => vec![(activator, "aiopopd"), (self.master, "imap")],
            _ => vec![(self.master, "pop3")],
        };
        let mem = kinds
            .into_iter()
            .map(|(parent, comm)| {
                let m: Vec<procs::Mem> = procs::children(parent, comm)
                    .iter()
                    .filter_map(|p| procs::mem(p.pid))
                    .collect();
                (comm, m)
            })
            .collect();
        if arrived < n {
            self.failures.add(format!(
                "{}: only {arrived} of {n} sessions reached the pause",
                srv.name
            ));
        }
        gate.release();
        let ok = runner.join().unwrap_or(0);
        if ok < n {
            self.failures.add(format!(
                "{}: {} of {n} concurrent sessions failed",
                srv.name,
                n - ok
            ));
        }
        (ok, mem)
    }

    fn write_results(&self, machine: &str, plot: Option<Vec<report::Series>>, elapsed: f64) {
        let svg_name = "benches/session-time.svg";
        let svg_path = if self.opts.write {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(svg_name)
        } else {
            self.opts.out.join("bench-session-time.svg")
        };
        if let Some(series) = &plot {
            let svg = report::svg(
                "POP3 full session (login, STAT, UIDL, RETR all, QUIT) vs mailbox size",
                "labels: aiopopd's time ÷\nDovecot's; medians",
                series,
            );
            if let Some(parent) = svg_path.parent() {
                std::fs::create_dir_all(parent).expect("create the SVG's directory");
            }
            std::fs::write(&svg_path, svg).expect("write the SVG");
            println!("plot: {}", svg_path.display());
        }
        let mut md = format!(
            "Measured with `scripts/bench` ({}; {}):\n\n{machine}\n",
            if self.opts.quick {
                "--quick"
            } else {
                "full run"
            },
            fmt_time(elapsed)
        );
        if plot.is_some() {
            md.push_str(&format!("![session time vs mailbox size]({svg_name})\n\n"));
        }
        for s in &self.md {
            md.push_str(s);
            md.push('\n');
        }
        let results = self.opts.out.join("results.md");
        std::fs::write(&results, &md).expect("write results.md");
        println!("results: {}", results.display());
        if !self.opts.write {
            return;
        }
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        const BEGIN: &str = "<!-- bench:results:begin (generated by scripts/bench) -->\n";
        const END: &str = "<!-- bench:results:end -->\n";
        match (text.find(BEGIN), text.find(END)) {
            (Some(b), Some(e)) if b < e => {
                let new = format!("{}{BEGIN}{md}{}", &text[..b], &text[e..]);
                std::fs::write(&path, new).expect("write BENCHMARKS.md");
                println!("updated {}", path.display());
            }
            _ => eprintln!(
                "bench: {} has no results markers; the results are in {}",
                path.display(),
                results.display()
            ),
        }
    }
}

/// Login, STAT, then the time of RETR 1 alone, then QUIT.
fn retr_one(srv: &Server, user: &str) -> Result<f64> {
    let mut c = Pop3::new(client::connect(srv.port)?);
    c.greeting()?;
    c.login(user, PASSWORD)?;
    let (n, octets) = c.stat()?;
    if n != 1 {
        return Err(format!("STAT: {n} messages, expected 1"));
    }
    let t = Instant::now();
    let body = c.multi("RETR 1")?;
    let dt = t.elapsed().as_secs_f64();
    if body.octets != octets {
        return Err(format!(
            "RETR served {} octets, STAT said {octets}",
            body.octets
        ));
    }
    c.quit()?;
    Ok(dt)
}

/// Connect to greeting, in seconds; then QUIT (not timed) if `quit`.
fn greet(port: u16, tls: Option<&native_tls::TlsConnector>, quit: bool) -> Result<f64> {
    let t = Instant::now();
    let tcp = client::connect(port)?;
    match tls {
        None => {
            let mut c = Pop3::new(tcp);
            c.greeting()?;
            let dt = t.elapsed().as_secs_f64();
            if quit {
                c.quit()?;
            }
            Ok(dt)
        }
        Some(connector) => {
            let stream = connector
                .connect("localhost", tcp)
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let mut c = Pop3::new(stream);
            c.greeting()?;
            let dt = t.elapsed().as_secs_f64();
            c.quit()?;
            Ok(dt)
        }
    }
}

/// USER, PASS, STAT, UIDL, QUIT; checks the counts; whole-session seconds.
fn stat_uidl(srv: &Server, user: &str, expect: usize) -> Result<f64> {
    let t = Instant::now();
    let mut c = Pop3::new(client::connect(srv.port)?);
    c.greeting()?;
    c.login(user, PASSWORD)?;
    let (n, _) = c.stat()?;
    if n != expect {
        return Err(format!("STAT: {n} messages, expected {expect}"));
    }
    let uidl = c.multi("UIDL")?;
    if uidl.lines != n as u64 {
        return Err(format!("UIDL: {} lines for {n} messages", uidl.lines));
    }
    c.quit()?;
    Ok(t.elapsed().as_secs_f64())
}

/// `LOGIN, EXAMINE, FETCH, LOGOUT` with repeats folded: `UID FETCH ×1000`.
fn summarize_verbs(verbs: &[String]) -> String {
    let mut out: Vec<(String, usize)> = Vec::new();
    for v in verbs {
        match out.last_mut() {
            Some((last, n)) if last == v => *n += 1,
            _ => out.push((v.clone(), 1)),
        }
    }
    out.iter()
        .map(|(v, n)| {
            if *n > 1 {
                format!("{v} ×{n}")
            } else {
                v.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where concurrent sessions wait until the main thread has measured the processes.
#[derive(Default)]
struct Gate {
    state: Mutex<(usize, usize, bool)>, // (arrived, failed, released)
    cv: Condvar,
}

impl Gate {
    fn arrive(&self) {
        let mut s = self.state.lock().expect("gate");
        s.0 += 1;
        self.cv.notify_all();
        while !s.2 {
            let (next, timeout) = self
                .cv
                .wait_timeout(s, Duration::from_secs(300))
                .expect("gate");
            s = next;
            if timeout.timed_out() {
                break;
            }
        }
    }
    fn fail(&self) {
        self.state.lock().expect("gate").1 += 1;
        self.cv.notify_all();
    }
    /// Waits until all `n` arrived or failed; returns how many arrived.
    fn wait_for(&self, n: usize, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let mut s = self.state.lock().expect("gate");
        while s.0 + s.1 < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self.cv.wait_timeout(s, left).expect("gate").0;
        }
        s.0
    }
    fn release(&self) {
        self.state.lock().expect("gate").2 = true;
        self.cv.notify_all();
    }
}

/// `n` sessions at once (users c000…), each login, STAT, RETR 1, [pause at `gate`], the other
/// RETRs, QUIT. Returns how many succeeded; failures are printed.
fn run_parallel(srv: &Server, n: usize, msgs: usize, gate: Option<Arc<Gate>>) -> usize {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let srv = *srv;
            let gate = gate.clone();
            thread::spawn(move || {
                let user = format!("c{i:03}");
                let mut paused = false;
                let r = (|| -> Result<()> {
                    let mut c = Pop3::new(client::connect(srv.port)?);
                    c.greeting()?;
                    c.login(&user, PASSWORD)?;
                    let (count, _) = c.stat()?;
                    if count != msgs {
                        return Err(format!("STAT: {count} messages, expected {msgs}"));
                    }
                    c.multi("RETR 1")?;
                    if let Some(g) = &gate {
                        paused = true;
                        g.arrive();
                    }
                    for m in 2..=count {
                        c.multi(&format!("RETR {m}"))?;
                    }
                    c.quit()
                })();
                if let Err(e) = &r {
                    eprintln!("  {} session {user}: {e}", srv.name);
                    if let (Some(g), false) = (&gate, paused) {
                        g.fail();
                    }
                }
                r.is_ok()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or(false))
        .filter(|&ok| ok)
        .count()
}
