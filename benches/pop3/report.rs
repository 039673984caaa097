//! Turning samples into the printed table, the Markdown that goes into BENCHMARKS.md and the
//! SVG plot: medians and percentiles, the machine's description, and a hand-written log-log
//! chart (no plotting library).

use std::fmt::Write as _;
use std::process::Command;

/// The median of `xs` (the mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> f64 {
    percentile(xs, 50.0)
}

/// Linear-interpolated percentile `p` (0..=100) of `xs`; NaN for no samples.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = p / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

/// Seconds as `812 ms`, `1.52 s` or `73 µs`.
pub fn fmt_time(s: f64) -> String {
    if s.is_nan() {
        "—".into()
    } else if s >= 10.0 {
        format!("{s:.1} s")
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.01 {
        format!("{:.0} ms", s * 1e3)
    } else if s >= 0.001 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

pub fn fmt_kb(kb: f64) -> String {
    if kb >= 10240.0 {
        format!("{:.1} MB", kb / 1024.0)
    } else {
        format!("{:.2} MB", kb / 1024.0)
    }
}

/// A Markdown table built row by row; printed as it is (it reads well in a terminal too).
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(head: &[&str]) -> Table {
        Table {
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let mut widths: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (c, w) in cells.iter().zip(&widths) {
                let pad = w - c.chars().count();
                let _ = write!(s, " {c}{} |", " ".repeat(pad));
            }
            s.push('\n');
            s
        };
        let mut out = line(&self.head);
        out.push('|');
        for w in &widths {
            let _ = write!(out, "{}|", "-".repeat(w + 2));
        }
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The machine, the software and the time of the run, as Markdown list items.
pub fn machine(rev: Option<&str>) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_string(), |m| m.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0 / 1024.0);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let dovecot = command_line("/usr/sbin/dovecot", &["--version"]).unwrap_or_default();
    let commit = rev.map(str::to_string).unwrap_or_else(|| {
        command_line("git", &["describe", "--always", "--dirty"])
            .unwrap_or_else(|| "(not a git checkout)".to_string())
    });
    format!(
        "- date: {date}\n\
         - machine: {nproc} CPUs (`nproc`), {model}, {mem_gib:.1} GiB RAM, Linux {}\n\
         - load average at start: {}\n\
         - Dovecot {dovecot}; aiopopd at `{commit}`\n",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// One series of the plot.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    /// (mailbox size in messages, median session seconds)
    pub points: Vec<(f64, f64)>,
    /// Text shown above each point (e.g. the ratio to the reference); may be empty.
    pub labels: Vec<String>,
}

/// A log-log SVG chart of session time against mailbox size.
pub fn svg(title: &str, note: &str, series: &[Series]) -> String {
    let (w, h) = (720.0, 440.0);
    let (left, right, top, bottom) = (80.0, 190.0, 50.0, 60.0);
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.clone()).collect();
    let xs = || all.iter().map(|p| p.0);
    let ys = || all.iter().map(|p| p.1).filter(|y| *y > 0.0);
    let decade_lo = |v: f64| 10f64.powf(v.log10().floor());
    // The data's range with a margin, at least a factor of 10 wide.
    let range = |lo: f64, hi: f64, margin: f64| {
        let (lo, hi) = (lo / margin, hi * margin);
        if hi / lo < 10.0 {
            let mid = (lo * hi).sqrt();
            (mid / 10f64.sqrt(), mid * 10f64.sqrt())
        } else {
            (lo, hi)
        }
    };
    let (x0, x1) = range(
        xs().fold(f64::INFINITY, f64::min).max(1.0),
        xs().fold(1.0, f64::max),
        1.3,
    );
    let (y0, y1) = range(
        ys().fold(f64::INFINITY, f64::min).max(1e-6),
        ys().fold(1e-6, f64::max),
        1.5,
    );
    let px =
        |x: f64| left + (x.log10() - x0.log10()) / (x1.log10() - x0.log10()) * (w - left - right);
    let py = |y: f64| {
        h - bottom - (y.log10() - y0.log10()) / (y1.log10() - y0.log10()) * (h - top - bottom)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
        (left + w - right) / 2.0,
        escape(title)
    );
    // Grid: every 1-2-5 step inside each decade, labelled at 1, 2 and 5.
    let mut d = decade_lo(x0);
    while d <= x1 {
        for m in [1.0, 2.0, 3.0, 5.0] {
            let x = d * m;
            if x < x0 || x > x1 {
                continue;
            }
            let gx = px(x);
            let _ = writeln!(
                s,
                r##"<line x1="{gx:.1}" y1="{top}" x2="{gx:.1}" y2="{}" stroke="#ddd"/>"##,
                h - bottom
            );
            let _ = writeln!(
                s,
                r#"<text x="{gx:.1}" y="{}" text-anchor="middle">{}</text>"#,
                h - bottom + 16.0,
                x
            );
        }
        d *= 10.0;
    }
    let mut d = decade_lo(y0);
    while d <= y1 {
        for m in [1.0, 2.0, 5.0] {
            let y = d * m;
            if y < y0 || y > y1 {
                continue;
            }
            let gy = py(y);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{gy:.1}" x2="{}" y2="{gy:.1}" stroke="#ddd"/>"##,
                w - right
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                gy + 4.0,
                fmt_time(y)
            );
        }
        d *= 10.0;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        w - left - right,
        h - top - bottom
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">messages in the mailbox (20 KB each; log scale)</text>"#,
        (left + w - right) / 2.0,
        h - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">session time, median (log scale)</text>"#,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    );
    for (i, ser) in series.iter().enumerate() {
        let pts: Vec<String> = ser
            .points
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
            pts.join(" "),
            ser.color
        );
        for (j, &(x, y)) in ser.points.iter().enumerate() {
            if y <= 0.0 {
                continue;
            }
            let (cx, cy) = (px(x), py(y));
            let _ = writeln!(
                s,
                r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="3.5" fill="{}"/>"#,
                ser.color
            );
            if let Some(label) = ser.labels.get(j).filter(|l| !l.is_empty()) {
                // Above and left of the point, clear of a rising line; centred for the first.
                let (lx, anchor) = if j == 0 {
                    (cx, "middle")
                } else {
                    (cx - 6.0, "end")
                };
                let _ = writeln!(
                    s,
                    r#"<text x="{lx:.1}" y="{:.1}" text-anchor="{anchor}" fill="{}">{}</text>"#,
                    cy - 9.0,
                    ser.color,
                    escape(label)
                );
            }
        }
        let ly = top + 20.0 + i as f64 * 22.0;
        let lx = w - right + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            lx + 22.0,
            ser.color,
            lx + 28.0,
            ly + 4.0,
            escape(&ser.name)
        );
    }
    for (i, line) in note.lines().enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" font-size="11" fill="#555">{}</text>"##,
            w - right + 16.0,
            top + 32.0 + (series.len() + i) as f64 * 22.0,
            escape(line)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
