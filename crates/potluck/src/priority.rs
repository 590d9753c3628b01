//! `--nice`: the process's CPU priority, lowered before its threads start.
//!
//! On a provider's machine the agent competes for the CPU with the model server it
//! relays for. Linux's scheduler lets a thread that wakes up preempt a busy one of the
//! same priority, so at every chunk the agent (and a hub on the same machine) took the
//! model's core for a moment: on the 2-core bench VM the model's tokens per second
//! through Potluck were 0.77 to 0.84 of direct at the same priority, and 0.95 to 1.03
//! with hub and agent at nice 19 (BENCHMARKS.md, "Issue 16, 4 December 2026, seventh
//! session"). A lower priority changes nothing while a core is free.

/// The largest nice value (the lowest priority).
pub(crate) const MAX_NICE: u8 = 19;

/// Run this thread, and every thread started from it afterwards, at nice `nice` at
/// least. Never raises the priority (a process started nicer stays so; raising needs
/// privileges). A failure is logged, not fatal: the role works at any priority.
#[cfg(unix)]
pub(crate) fn yield_cpu(nice: u8) {
    let want = i32::from(nice.min(MAX_NICE));
    let now = match rustix::process::getpriority_process(None) {
        Ok(now) => now,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the CPU priority; leaving it");
            return;
        }
    };
    if now >= want {
        return;
    }
    if let Err(e) = rustix::process::setpriority_process(None, want) {
        tracing::warn!(error = %e, nice = want, "cannot lower the CPU priority; leaving it");
    }
}

/// Elsewhere the priority is left as it is.
#[cfg(not(unix))]
pub(crate) fn yield_cpu(_nice: u8) {}
