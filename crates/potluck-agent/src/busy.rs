//! "Pause while busy": when processes other than the backend use more of the machine
//! than the volunteer allows, for long enough, the agent drains; when use stays below
//! for as long, it comes back.
//!
//! CPU method: `/proc/stat`'s first line gives the machine's busy and idle jiffies
//! (busy = user + nice + system + irq + softirq + steal; idle = idle + iowait). The
//! backend's own jiffies are `utime + stime` of `/proc/<pid>/stat` for its pid
//! (`backend_pid`) or every process whose `/proc/<pid>/comm` is `backend_process`.
//! Between two samples: others = (Δbusy − Δbackend) / Δ(busy + idle) × 100.
//! GPU method (build feature `nvml`): NVML's utilisation of each GPU, minus nothing (the
//! backend's share is not separable), so it is only counted while the agent serves no
//! request.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::gate::DrainReason;
use crate::policy::BusyRule;
use crate::state::Shared;

/// Time between samples.
pub const BUSY_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Switches only after the condition has held for `hold`.
#[derive(Debug, Default)]
pub struct Hysteresis {
    busy: bool,
    since: Option<Instant>,
}

impl Hysteresis {
    /// Feed one observation; returns the (possibly new) state.
    pub fn observe(&mut self, over: bool, hold: Duration, now: Instant) -> bool {
        if over == self.busy {
            self.since = None;
        } else {
            let since = *self.since.get_or_insert(now);
            if now.duration_since(since) >= hold {
                self.busy = over;
                self.since = None;
            }
        }
        self.busy
    }
}

/// Machine-wide jiffies: (busy, total).
pub fn machine_jiffies(proc_root: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(proc_root.join("stat")).ok()?;
    let line = text.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    if v.len() < 8 || !line.starts_with("cpu ") {
        return None;
    }
    let idle = v[3] + v[4];
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    Some((busy, busy + idle))
}

/// `utime + stime` of one process.
pub fn process_jiffies(proc_root: &Path, pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses).
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Pids whose `comm` is `name`.
pub fn pids_named(proc_root: &Path, name: &str) -> Vec<u32> {
    std::fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim_end() == name).then_some(pid)
        })
        .collect()
}

fn backend_jiffies(proc_root: &Path, rule: &BusyRule) -> u64 {
    let mut pids: Vec<u32> = rule.backend_pid.into_iter().collect();
    if let Some(name) = &rule.backend_process {
        pids.extend(pids_named(proc_root, name));
    }
    pids.sort_unstable();
    pids.dedup();
    pids.iter()
        .filter_map(|p| process_jiffies(proc_root, *p))
        .sum()
}

/// Percent of the machine's CPU used by others between two samples.
pub fn others_percent(prev: (u64, u64, u64), now: (u64, u64, u64)) -> f64 {
    let (busy0, total0, back0) = prev;
    let (busy1, total1, back1) = now;
    let dt = total1.saturating_sub(total0);
    if dt == 0 {
        return 0.0;
    }
    let others = busy1
        .saturating_sub(busy0)
        .saturating_sub(back1.saturating_sub(back0));
    (others as f64 * 100.0 / dt as f64).clamp(0.0, 100.0)
}

fn cpu_sample(rule: &BusyRule) -> Option<(u64, u64, u64)> {
    let root = Path::new("/proc");
    let (busy, total) = machine_jiffies(root)?;
    Some((busy, total, backend_jiffies(root, rule)))
}

/// The busy task: samples while a `[busy]` rule is set.
pub async fn busy_loop(sh: Arc<Shared>, shutdown: CancellationToken) {
    let mut h = Hysteresis::default();
    let mut prev: Option<(u64, u64, u64)> = None;
    let gpu = crate::gpu::Gpu::open();
    let mut gpu_busy = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(BUSY_SAMPLE_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
        let Some(rule) = sh.policy().busy.clone() else {
            prev = None;
            h = Hysteresis::default();
            if sh.gate.set(DrainReason::Busy, false) {
                sh.republish();
            }
            continue;
        };
        let r = rule.clone();
        let sample = tokio::task::spawn_blocking(move || cpu_sample(&r))
            .await
            .ok()
            .flatten();
        let cpu = match (prev, sample) {
            (Some(p), Some(s)) => others_percent(p, s),
            _ => 0.0,
        };
        prev = sample;
        // Read once: a request ending between two reads would read as "not serving"
        // with no GPU reading taken.
        let in_flight = sh.in_flight();
        let reading = if rule.gpu && in_flight == 0 {
            gpu.as_ref().and_then(|g| g.utilization_percent())
        } else {
            None
        };
        gpu_busy = gpu_over(
            gpu_busy,
            rule.gpu,
            in_flight,
            reading,
            rule.threshold_percent,
        );
        let over = cpu > rule.threshold_percent || gpu_busy;
        let busy = h.observe(over, rule.hold, Instant::now());
        if sh.gate.set(DrainReason::Busy, busy) {
            tracing::info!(busy, cpu_percent = cpu as u32, "machine busy state changed");
            sh.republish();
        }
    }
}

/// Whether the GPU counts as used by others: read while nothing is served here (the
/// backend's own use would read as the volunteer's), and kept as last read while
/// something is. (Before, a request in flight read as "not busy": a hub keeping one
/// request open lifted a drain the volunteer's own use of the GPU had set.)
fn gpu_over(
    last: bool,
    rule_gpu: bool,
    in_flight: usize,
    reading: Option<f64>,
    threshold: f64,
) -> bool {
    if !rule_gpu {
        return false;
    }
    if in_flight > 0 {
        return last;
    }
    reading.is_some_and(|g| g > threshold)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn switches_after_hold() {
        let mut h = Hysteresis::default();
        let hold = Duration::from_secs(10);
        let t0 = Instant::now();
        assert!(!h.observe(true, hold, t0));
        assert!(!h.observe(true, hold, t0 + Duration::from_secs(9)));
        assert!(h.observe(true, hold, t0 + Duration::from_secs(10)));
        // A short dip does not resume.
        assert!(h.observe(false, hold, t0 + Duration::from_secs(11)));
        assert!(h.observe(true, hold, t0 + Duration::from_secs(12)));
        assert!(h.observe(false, hold, t0 + Duration::from_secs(13)));
        assert!(!h.observe(false, hold, t0 + Duration::from_secs(23)));
    }

    /// A hub keeping a request open cannot lift the drain the volunteer's own use of
    /// the GPU set: while something is served, the last reading stands.
    #[test]
    fn a_request_in_flight_keeps_the_last_gpu_reading() {
        assert!(gpu_over(false, true, 0, Some(95.0), 80.0));
        assert!(
            gpu_over(true, true, 1, None, 80.0),
            "cleared by a request in flight"
        );
        assert!(!gpu_over(false, true, 1, None, 80.0));
        assert!(!gpu_over(true, true, 0, Some(10.0), 80.0));
        assert!(!gpu_over(true, false, 0, Some(95.0), 80.0));
        assert!(!gpu_over(true, true, 0, None, 80.0), "no GPU to read");
    }

    #[test]
    fn proc_parsing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("stat"),
            "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n",
        )
        .unwrap();
        assert_eq!(machine_jiffies(dir.path()), Some((150, 1000)));
        std::fs::create_dir(dir.path().join("42")).unwrap();
        std::fs::write(
            dir.path().join("42/stat"),
            "42 (llama server) S 1 42 42 0 -1 4194560 100 0 0 0 70 30 0 0 20 0 8 0 100 0 0",
        )
        .unwrap();
        std::fs::write(dir.path().join("42/comm"), "llama server\n").unwrap();
        assert_eq!(process_jiffies(dir.path(), 42), Some(100));
        assert_eq!(pids_named(dir.path(), "llama server"), vec![42]);
        // 600 busy jiffies of 1000, 400 of them the backend's: others used 20%.
        assert_eq!(others_percent((0, 0, 0), (600, 1000, 400)), 20.0);
        assert_eq!(others_percent((5, 5, 0), (5, 5, 0)), 0.0);
    }
}
