//! Watching the server from the side: a thread that samples something (the server's RSS
//! every 100 ms, its /metrics every second) on a fixed period, and the figures drawn from the
//! RSS timeline (peak, recovery after the attack).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::http::{Metrics, scrape};
use crate::report::Json;
use crate::sys::{tcp_mem_kib, vm_rss_kib};

/// RSS sampling period.
pub const RSS_PERIOD: Duration = Duration::from_millis(100);
/// Metrics sampling period, and the longest one scrape may take.
pub const METRICS_PERIOD: Duration = Duration::from_secs(1);
const METRICS_TIMEOUT: Duration = Duration::from_secs(2);
/// The bound on memory after an attack: 2x the pre-attack RSS plus this.
pub const RECOVERY_SLACK_KIB: u64 = 16 * 1024;

/// A thread calling a function every `period` until stopped; each result is kept with its
/// time in seconds since the run's epoch.
#[derive(Debug)]
pub struct Sampler<T> {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<(f64, T)>>,
}

impl<T: Send + 'static> Sampler<T> {
    /// Starts sampling now.
    pub fn start<F>(name: &str, epoch: Instant, period: Duration, mut f: F) -> Sampler<T>
    where
        F: FnMut() -> T + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut out = Vec::new();
                let mut next = Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    let t = epoch.elapsed().as_secs_f64();
                    out.push((t, f()));
                    // A sample that took longer than the period: the next one starts now,
                    // without catching up on the missed ones.
                    next = (next + period).max(Instant::now());
                    // Sleep in short slices so a stop is seen quickly.
                    loop {
                        let now = Instant::now();
                        if now >= next || flag.load(Ordering::Relaxed) {
                            break;
                        }
                        thread::sleep((next - now).min(Duration::from_millis(20)));
                    }
                }
                out
            })
            .expect("spawn a sampler thread");
        Sampler { stop, handle }
    }

    /// Stops the thread and returns every sample.
    pub fn finish(self) -> Vec<(f64, T)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// One memory sample, KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemSample {
    /// The server's VmRSS.
    pub rss: Option<u64>,
    /// Every TCP socket's buffers on the machine (kernel memory).
    pub tcp: Option<u64>,
}

/// Samples the VmRSS of `pid` (if any) and the kernel's TCP buffer memory every
/// [`RSS_PERIOD`].
pub fn watch_memory(pid: Option<u32>, epoch: Instant) -> Sampler<MemSample> {
    Sampler::start("memory", epoch, RSS_PERIOD, move || MemSample {
        rss: pid.and_then(|p| vm_rss_kib(p).ok()),
        tcp: tcp_mem_kib().ok(),
    })
}

/// One scrape: how long it took (s) and the page, or why it failed.
pub type Scrape = (f64, Result<Metrics, String>);

/// Scrapes /metrics every [`METRICS_PERIOD`] (each within 2 s).
pub fn watch_metrics(addr: SocketAddr, epoch: Instant) -> Sampler<Scrape> {
    Sampler::start("metrics", epoch, METRICS_PERIOD, move || {
        let t = Instant::now();
        let r = scrape(addr, METRICS_TIMEOUT);
        (t.elapsed().as_secs_f64(), r)
    })
}

/// A memory figure (the server's RSS, or the kernel's TCP buffers) over the run, KiB, by time
/// (s since the epoch).
#[derive(Debug, Clone, Default)]
pub struct RssTimeline(pub Vec<(f64, u64)>);

impl RssTimeline {
    /// From the sampler's output, one field of it (failed reads dropped).
    pub fn new(samples: &[(f64, MemSample)], field: fn(&MemSample) -> Option<u64>) -> Self {
        RssTimeline(
            samples
                .iter()
                .filter_map(|(t, s)| field(s).map(|v| (*t, v)))
                .collect(),
        )
    }

    /// The last sample at or before `t`.
    pub fn at(&self, t: f64) -> Option<u64> {
        self.0
            .iter()
            .take_while(|(ts, _)| *ts <= t)
            .last()
            .map(|&(_, v)| v)
    }

    /// The largest sample in `[from, to]`.
    pub fn peak(&self, from: f64, to: f64) -> Option<u64> {
        self.0
            .iter()
            .filter(|(t, _)| (from..=to).contains(t))
            .map(|&(_, v)| v)
            .max()
    }

    /// How long after `from` the RSS was first at or below `limit` (0 if it already was at
    /// the first sample from `from` on).
    pub fn back_below(&self, from: f64, limit: u64) -> Option<f64> {
        self.0
            .iter()
            .find(|&&(t, v)| t >= from && v <= limit)
            .map(|&(t, _)| t - from)
    }

    /// `[[t, kib], ...]`: the largest sample of every `step` seconds, for plots.
    pub fn coarse_json(&self, step: f64) -> String {
        let mut out: Vec<(f64, u64)> = Vec::new();
        for &(t, v) in &self.0 {
            let slot = (t / step).floor() * step;
            match out.last_mut() {
                Some((s, m)) if *s == slot => *m = (*m).max(v),
                _ => out.push((slot, v)),
            }
        }
        let items: Vec<String> = out.iter().map(|(t, v)| format!("[{t:.1},{v}]")).collect();
        format!("[{}]", items.join(","))
    }
}

/// The bound of the issue: 2x `before` + 16 MiB.
pub fn recovery_limit(before: u64) -> u64 {
    2 * before + RECOVERY_SLACK_KIB
}

/// What the RSS did around an attack, from a timeline and direct reads.
#[derive(Debug, Clone, Default)]
pub struct RssFigures {
    /// Before the attack.
    pub before: u64,
    /// The largest sample from the attack's start to the end of the run.
    pub peak: u64,
    /// VmHWM at the end: the peak since the server started (it ran nothing but this attack).
    pub hwm: Option<u64>,
    /// At the end of the run (`after_s` after the attack ended).
    pub after: u64,
    /// How long after the attack ended the RSS watched it.
    pub after_s: f64,
    /// 2x before + 16 MiB.
    pub limit: u64,
    /// Seconds from the end of the attack to the first sample within `limit`.
    pub recovered_s: Option<f64>,
}

impl RssFigures {
    /// Adds the figures (`server_rss_*` keys, KiB) to a JSON object.
    pub fn fill(&self, j: &mut Json, timeline: &RssTimeline) {
        j.int("server_rss_before_kib", self.before)
            .int("server_rss_peak_kib", self.peak);
        match self.hwm {
            Some(h) => j.int("server_vm_hwm_kib", h),
            None => j.raw("server_vm_hwm_kib", "null"),
        };
        j.int("server_rss_after_kib", self.after)
            .num("server_rss_after_s", self.after_s, 1)
            .int("server_rss_limit_kib", self.limit);
        match self.recovered_s {
            Some(s) => j.num("server_rss_recovered_s", s, 1),
            None => j.raw("server_rss_recovered_s", "null"),
        };
        j.raw("server_rss_timeline_kib", &timeline.coarse_json(1.0));
    }

    /// Two lines for humans.
    pub fn human(&self) -> String {
        format!(
            "  server RSS   {} before, peak {} (VmHWM {}), {} at {:.0} s after the attack\n\
             \x20 recovery     limit 2x before + 16 MiB = {}: {}",
            mib(self.before),
            mib(self.peak),
            self.hwm.map_or_else(|| "?".into(), mib),
            mib(self.after),
            self.after_s,
            mib(self.limit),
            match self.recovered_s {
                Some(s) => format!("within it {s:.1} s after the attack"),
                None => "NOT within it by the end".into(),
            }
        )
    }
}

/// KiB as `123.4 MiB`.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_figures() {
        let m = |rss| MemSample { rss, tcp: None };
        let samples = vec![
            (0.0, m(Some(10))),
            (0.1, m(Some(50))),
            (0.2, m(None)),
            (1.05, m(Some(40))),
            (1.5, m(Some(12))),
            (2.0, m(Some(11))),
        ];
        let t = RssTimeline::new(&samples, |s| s.rss);
        assert_eq!(RssTimeline::new(&samples, |s| s.tcp).0, vec![]);
        assert_eq!(t.at(1.2), Some(40));
        assert_eq!(t.at(-1.0), None);
        assert_eq!(t.peak(0.0, 2.0), Some(50));
        assert_eq!(t.peak(1.0, 2.0), Some(40));
        assert_eq!(t.back_below(1.0, 20), Some(0.5));
        assert_eq!(t.back_below(1.0, 5), None);
        assert_eq!(t.coarse_json(1.0), "[[0.0,50],[1.0,40],[2.0,11]]");
        assert_eq!(recovery_limit(1000), 2000 + 16384);
        let s = Sampler::start("t", Instant::now(), Duration::from_millis(5), || 7u8);
        thread::sleep(Duration::from_millis(30));
        let v = s.finish();
        assert!(!v.is_empty() && v.iter().all(|&(_, x)| x == 7), "{v:?}");
    }
}
