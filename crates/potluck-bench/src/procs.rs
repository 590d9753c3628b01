//! Child processes of the suite (hub, agents, floor, LiteLLM, llama.cpp) and what `/proc`
//! says about them: CPU time (the scheduler's own count per thread, [`CpuSnapshot`], or
//! utime + stime) and resident memory (VmRSS).
//!
//! Each child runs in its own process group with stdout and stderr sent to files in the
//! run directory; it is stopped with SIGTERM, then SIGKILL after a grace period, and killed
//! on drop if still running.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use rustix::process::{Pid, Signal};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long a stopped child may take to exit after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often a log file is re-read while waiting for a line.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Lines of a failed child's stderr quoted in the error.
pub const ERROR_TAIL_LINES: usize = 15;

/// A spawned child process.
#[derive(Debug)]
pub struct Proc {
    /// A short name for reports ("hub", "agent", ...).
    pub name: String,
    child: Child,
    pid: u32,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// A command line for the report, with every secret replaced by a placeholder.
pub fn display_command(
    program: &str,
    args: &[String],
    env: &[(&str, &str)],
    secrets: &[(&str, &str)],
) -> String {
    let mut parts: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.push(program.to_owned());
    parts.extend(args.iter().map(|a| {
        if a.contains(' ') {
            format!("'{a}'")
        } else {
            a.clone()
        }
    }));
    let mut s = parts.join(" ");
    for (secret, placeholder) in secrets {
        if !secret.is_empty() {
            s = s.replace(secret, placeholder);
        }
    }
    s
}

impl Proc {
    /// Spawn `program args` with `env` added, output to `log_dir/NAME.{out,err}`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let stdout = log_dir.join(format!("{name}.out"));
        let stderr = log_dir.join(format!("{name}.err"));
        let out = std::fs::File::create(&stdout)
            .with_context(|| format!("cannot create {}", stdout.display()))?;
        let err = std::fs::File::create(&stderr)
            .with_context(|| format!("cannot create {}", stderr.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        let pid = child.id().context("child has no pid")?;
        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
            stdout,
            stderr,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Fail unless it is still running.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            Ok(())
        } else {
            bail!(
                "{} exited; its stderr ends with:\n{}",
                self.name,
                self.stderr_tail()
            )
        }
    }

    /// The last lines of its stderr.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(ERROR_TAIL_LINES)..].join("\n")
    }

    /// Wait until a line of its stdout (or stderr) contains `needle`; return that line.
    pub async fn wait_for_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            for path in [&self.stdout, &self.stderr] {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                    return Ok(line.to_owned());
                }
            }
            self.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print '{needle}' within {timeout:?}; stderr ends with:\n{}",
                    self.name,
                    self.stderr_tail()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// SIGTERM the process group, wait up to [`STOP_GRACE`], then SIGKILL it.
    pub async fn stop(mut self) {
        if let Some(pid) = Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process_group(pid, Signal::TERM);
            if tokio::time::timeout(STOP_GRACE, self.child.wait())
                .await
                .is_err()
            {
                let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                let _ = self.child.wait().await;
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Some(pid) = Pid::from_raw(self.pid as i32) {
                let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            }
        }
    }
}

/// Clock ticks per second, the unit of `/proc/PID/stat` times.
pub fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// Fields of `/proc/PID/stat` after the command name, which may contain spaces.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of one process (all its threads, dead or alive), in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    // After the name: state(3) ppid(4) ... utime(14) stime(15); index = field - 3.
    stat_fields(pid)
        .map(|f| {
            f.get(11).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// `root` and all its descendants, found by scanning `/proc`.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) =
                stat_fields(pid).and_then(|f| f.get(1).and_then(|s| s.parse::<u32>().ok()))
            {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// CPU ticks of the processes, counting each one's descendants when `tree` is set.
pub fn cpu_ticks_of(pids: &[u32], tree: bool) -> u64 {
    if tree {
        pids.iter()
            .flat_map(|&p| process_tree(p))
            .map(cpu_ticks)
            .sum()
    } else {
        pids.iter().map(|&p| cpu_ticks(p)).sum()
    }
}

/// On-CPU time of processes, thread by thread, in nanoseconds: the scheduler's own count
/// (`/proc/PID/task/TID/schedstat`). `/proc/PID/stat`'s utime and stime come in whole
/// clock ticks (10 ms here), so each reading drops up to a tick: a stream cell of a
/// quick run, about 60 ms of the floor's CPU in three slices, read in steps of a sixth,
/// which made the floor's CPU per streamed chunk swing by a quarter from one quick run to
/// the next. Where a process's threads cannot be read, its ticks stand in.
#[derive(Debug, Default, Clone)]
pub struct CpuSnapshot(HashMap<(u32, u32), u64>);

/// Stands for "the whole process, from its ticks" in a [`CpuSnapshot`].
const WHOLE_PROCESS: u32 = u32::MAX;

impl CpuSnapshot {
    /// The processes' threads now (and their descendants' when `tree` is set).
    pub fn take(pids: &[u32], tree: bool) -> Self {
        let all: Vec<u32> = if tree {
            pids.iter().flat_map(|&p| process_tree(p)).collect()
        } else {
            pids.to_vec()
        };
        let mut threads = HashMap::new();
        for pid in all {
            let before = threads.len();
            if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                for e in dir.flatten() {
                    let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    if let Some(ns) = thread_cpu_ns(pid, tid) {
                        threads.insert((pid, tid), ns);
                    }
                }
            }
            if threads.len() == before {
                let ns = cpu_ticks(pid).saturating_mul(1_000_000_000) / ticks_per_second();
                threads.insert((pid, WHOLE_PROCESS), ns);
            }
        }
        Self(threads)
    }

    /// Nanoseconds on a CPU since `before`: what each thread ran since, all of what a
    /// thread born since ran. A thread that ended in between takes its share with it.
    pub fn ns_since(&self, before: &Self) -> u64 {
        self.0
            .iter()
            .map(|(k, now)| now.saturating_sub(before.0.get(k).copied().unwrap_or(0)))
            .sum()
    }
}

/// The first field of a thread's `schedstat`: nanoseconds it ran.
fn thread_cpu_ns(pid: u32, tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Resident memory of one process, in KiB (0 if gone).
pub fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(rss_kib(me) > 0);
        let spin: u64 = (0..20_000_000u64).fold(0, |a, x| a.wrapping_add(x * x));
        assert!(spin > 0);
        assert!(cpu_ticks(me) > 0 || ticks_per_second() > 1000);
        assert!(process_tree(me).contains(&me));
    }

    /// A spinning thread's count grows by less than a clock tick at a time: it is seen
    /// between 3 and 9 ms, where counts in ticks jump from 0 to 10 ms.
    #[test]
    fn a_snapshot_sees_less_than_a_tick() {
        let ran = std::thread::spawn(|| {
            let link = std::fs::read_link("/proc/thread-self").unwrap();
            let tid: u32 = link.file_name().unwrap().to_str().unwrap().parse().unwrap();
            let me = std::process::id();
            let own = |s: &CpuSnapshot| s.0.get(&(me, tid)).copied().unwrap_or(0);
            let start = own(&CpuSnapshot::take(&[me], false));
            let wall = std::time::Instant::now();
            let mut x = 0u64;
            loop {
                let ran = own(&CpuSnapshot::take(&[me], false)).saturating_sub(start);
                if ran >= 3_000_000 || wall.elapsed() > Duration::from_secs(10) {
                    return ran;
                }
                for _ in 0..10_000 {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
        });
        let ns = ran.join().unwrap();
        assert!((3_000_000..9_000_000).contains(&ns), "{ns} ns");
    }

    #[test]
    fn secrets_are_hidden() {
        let s = display_command(
            "potluck",
            &["--token".into(), "pt-secret".into()],
            &[("RUST_LOG", "warn")],
            &[("pt-secret", "$TOKEN")],
        );
        assert_eq!(s, "RUST_LOG=warn potluck --token $TOKEN");
    }
}
