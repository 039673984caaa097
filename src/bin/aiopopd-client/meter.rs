//! What a run retrieved and how fast: the one-line summary printed on stderr at the end, and,
//! when stderr is a terminal, a progress line redrawn in place during a long RETR. Neither
//! touches stdout, whose transcript is the client's output contract.
//!
//! The clock is passed in, so that when the line is drawn is tested without waiting.

use std::io::Write;
use std::time::{Duration, Instant};

/// A RETR shows progress only once it has run this long, and the line is redrawn at most this
/// often: a short RETR draws nothing, a long one at most four times a second.
pub const REDRAW: Duration = Duration::from_millis(250);

/// The RETR under way.
struct Retr {
    msg: u32,
    listed: u64,
    octets: u64,
    started: Instant,
    drawn: Option<Instant>,
}

pub struct Meter {
    /// Where the progress line goes: stderr when it is a terminal, else nowhere.
    tty: Option<Box<dyn Write>>,
    messages: u64,
    octets: u64,
    /// Time spent in completed RETRs, from the command to the terminating line.
    retr_time: Duration,
    current: Option<Retr>,
}

impl Meter {
    /// `tty`: where to draw progress (None: never).
    pub fn new(tty: Option<Box<dyn Write>>) -> Meter {
        Meter {
            tty,
            messages: 0,
            octets: 0,
            retr_time: Duration::ZERO,
            current: None,
        }
    }

    /// For this process: progress on stderr if stderr is a terminal.
    pub fn for_stderr() -> Meter {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        Meter::new(tty.then(|| Box::new(std::io::stderr()) as Box<dyn Write>))
    }

    /// RETR `msg`, listed as `listed` octets, was sent at `now`.
    pub fn retr_started(&mut self, msg: u32, listed: u64, now: Instant) {
        self.current = Some(Retr {
            msg,
            listed,
            octets: 0,
            started: now,
            drawn: None,
        });
    }

    /// `n` more octets of the message arrived at `now`.
    pub fn retr_octets(&mut self, n: usize, now: Instant) {
        let Some(r) = &mut self.current else { return };
        r.octets += n as u64;
        let due = match r.drawn {
            None => now.duration_since(r.started) >= REDRAW,
            Some(at) => now.duration_since(at) >= REDRAW,
        };
        if due {
            if let Some(tty) = &mut self.tty {
                r.drawn = Some(now);
                let line = progress_line(r, now);
                // Progress is a courtesy: a terminal that fails to take it changes nothing.
                let _ = write!(tty, "\r{line}\x1b[K").and_then(|()| tty.flush());
            }
        }
    }

    /// The RETR under way ended at `now` (whole, or not: `complete`). Erases the progress line.
    pub fn retr_ended(&mut self, complete: bool, now: Instant) {
        let Some(r) = self.current.take() else { return };
        if r.drawn.is_some() {
            if let Some(tty) = &mut self.tty {
                let _ = write!(tty, "\r\x1b[K").and_then(|()| tty.flush());
            }
        }
        if complete {
            self.messages += 1;
            self.octets += r.octets;
            self.retr_time += now.duration_since(r.started);
        }
    }

    /// The one-line summary of a run that lasted `session`.
    pub fn summary(&self, session: Duration) -> String {
        let s = if self.messages == 1 { "" } else { "s" };
        let mut line = format!(
            "aiopopd-client: {} message{s} retrieved, {} octets",
            self.messages, self.octets
        );
        if self.messages > 0 {
            line.push_str(&format!(
                " in {:.3}s ({})",
                self.retr_time.as_secs_f64(),
                rate(self.octets, self.retr_time)
            ));
        }
        line.push_str(&format!("; session {:.3}s", session.as_secs_f64()));
        line
    }
}

fn progress_line(r: &Retr, now: Instant) -> String {
    let pct = match r.listed {
        0 => 100,
        l => (r.octets.saturating_mul(100) / l).min(100),
    };
    format!(
        "RETR {}: {} of {} ({pct}%), {}",
        r.msg,
        size(r.octets),
        size(r.listed),
        rate(r.octets, now.duration_since(r.started))
    )
}

/// Octets in binary units, for people.
fn size(octets: u64) -> String {
    let units = ["KiB", "MiB", "GiB", "TiB"];
    if octets < 1024 {
        return format!("{octets} B");
    }
    let mut v = octets as f64 / 1024.0;
    let mut unit = units[0];
    for u in &units[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

fn rate(octets: u64, took: Duration) -> String {
    let secs = took.as_secs_f64();
    if secs <= 0.0 {
        return "- /s".to_string();
    }
    format!("{}/s", size((octets as f64 / secs) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A terminal that records what was drawn.
    #[derive(Clone, Default)]
    struct Screen(Arc<Mutex<Vec<u8>>>);

    impl Write for Screen {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Screen {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_long_retr_redraws_at_most_four_times_a_second_and_erases_the_line() {
        let screen = Screen::default();
        let mut m = Meter::new(Some(Box::new(screen.clone())));
        let t0 = Instant::now();
        m.retr_started(2, 4 << 20, t0);
        // A chunk every 10 ms for 2 s: 200 chunks of 20 KiB (4000 KiB of 4096).
        for i in 1..=200 {
            m.retr_octets(20 << 10, t0 + ms(10 * i));
        }
        let drawn = screen.text();
        let draws = drawn.matches("\rRETR 2: ").count();
        assert!((7..=8).contains(&draws), "{draws} draws: {drawn:?}");
        assert!(drawn.ends_with("\rRETR 2: 3.9 MiB of 4.0 MiB (97%), 2.0 MiB/s\x1b[K"));
        m.retr_ended(true, t0 + ms(2000));
        assert!(screen.text().ends_with("\r\x1b[K"), "erased");
        assert_eq!(
            m.summary(ms(2500)),
            "aiopopd-client: 1 message retrieved, 4096000 octets in 2.000s (2.0 MiB/s); \
             session 2.500s"
        );
    }

    #[test]
    fn a_short_retr_or_no_terminal_draws_nothing() {
        let screen = Screen::default();
        let mut m = Meter::new(Some(Box::new(screen.clone())));
        let t0 = Instant::now();
        m.retr_started(1, 100, t0);
        m.retr_octets(100, t0 + ms(249));
        m.retr_ended(true, t0 + ms(249));
        assert_eq!(screen.text(), "");
        let mut m = Meter::new(None);
        m.retr_started(1, 100, t0);
        m.retr_octets(100, t0 + ms(5000));
        m.retr_ended(true, t0 + ms(5000));
        assert_eq!(m.messages, 1);
    }

    #[test]
    fn the_summary_counts_only_whole_messages() {
        let mut m = Meter::new(None);
        let t0 = Instant::now();
        assert_eq!(
            m.summary(ms(12)),
            "aiopopd-client: 0 messages retrieved, 0 octets; session 0.012s"
        );
        m.retr_started(1, 10, t0);
        m.retr_octets(10, t0);
        m.retr_ended(true, t0 + ms(100));
        m.retr_started(2, 5000, t0 + ms(100));
        m.retr_octets(1000, t0 + ms(150));
        m.retr_ended(false, t0 + ms(200));
        assert_eq!(
            m.summary(ms(300)),
            "aiopopd-client: 1 message retrieved, 10 octets in 0.100s (100 B/s); session 0.300s"
        );
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(5 << 30), "5.0 GiB");
    }
}
