//! What the benchmark reads about server processes from /proc: which processes a server is
//! running now (children of `systemd-socket-activate` or of Dovecot's master), their CPU time
//! (`schedstat`, in nanoseconds) and their memory (`smaps_rollup`: RSS and PSS).

use std::fs;

#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    /// Start time in clock ticks since boot: the newest process has the largest.
    pub start: u64,
}

/// Every process whose parent is `ppid` and whose command name is `comm`.
pub fn children(ppid: u32, comm: &str) -> Vec<Proc> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .filter(|p| p.ppid == ppid && p.comm == comm)
        .collect()
}

/// The newest child of `ppid` named `comm`.
pub fn newest_child(ppid: u32, comm: &str) -> Option<Proc> {
    children(ppid, comm).into_iter().max_by_key(|p| p.start)
}

fn stat(pid: u32) -> Option<Proc> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let rest: Vec<&str> = text[close + 2..].split(' ').collect();
    Some(Proc {
        pid,
        ppid: rest.get(1)?.parse().ok()?,
        comm,
        // Field 22 of stat; `rest` starts at field 3.
        start: rest.get(19)?.parse().ok()?,
    })
}

/// Nanoseconds the process has run on a CPU so far (0 once it is gone).
pub fn cpu_ns(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resident and proportional set size, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub rss_kb: u64,
    pub pss_kb: u64,
}

pub fn mem(pid: u32) -> Option<Mem> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    };
    Some(Mem {
        rss_kb: field("Rss:")?,
        pss_kb: field("Pss:")?,
    })
}

/// Dovecot's master process, from `base_dir/master.pid`.
pub fn dovecot_master(d: &crate::dovecot::Dovecot) -> u32 {
    let path = d.dir().join("run").join("master.pid");
    fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Dovecot master pid in {}", path.display()))
}
