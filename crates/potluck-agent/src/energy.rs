//! Energy per request: while `k` requests are in flight, each accrues `watts / k`.
//!
//! The meter keeps one running integral `E(t) = ∫ watts / k(t) dt` over the time at
//! least one request is in flight; a request's energy is `E(end) - E(start)`. This is
//! exact for piecewise-constant `k` and costs O(1) per start and end.

use parking_lot::Mutex;

use tokio::time::Instant;

/// The shared integral.
#[derive(Debug)]
pub struct EnergyMeter {
    inner: Mutex<MeterState>,
}

#[derive(Debug)]
struct MeterState {
    /// Joules accrued by one request present the whole time.
    per_request_joules: f64,
    in_flight: usize,
    last: Instant,
}

impl Default for EnergyMeter {
    fn default() -> Self {
        Self {
            inner: Mutex::new(MeterState {
                per_request_joules: 0.0,
                in_flight: 0,
                last: Instant::now(),
            }),
        }
    }
}

/// A request's mark on the meter; [`EnergyMeter::finish`] turns it into joules.
#[derive(Debug, Clone, Copy)]
pub struct EnergyMark(f64);

impl EnergyMeter {
    fn advance(s: &mut MeterState, watts: f64) {
        let now = Instant::now();
        if s.in_flight > 0 && watts.is_finite() && watts > 0.0 {
            s.per_request_joules +=
                watts * now.duration_since(s.last).as_secs_f64() / s.in_flight as f64;
        }
        s.last = now;
    }

    /// A request starts.
    pub fn start(&self, watts: f64) -> EnergyMark {
        let mut s = self.inner.lock();
        Self::advance(&mut s, watts);
        s.in_flight += 1;
        EnergyMark(s.per_request_joules)
    }

    /// A request ends: its energy in millijoules.
    pub fn finish(&self, mark: EnergyMark, watts: f64) -> u64 {
        let mut s = self.inner.lock();
        Self::advance(&mut s, watts);
        s.in_flight = s.in_flight.saturating_sub(1);
        let j = (s.per_request_joules - mark.0).max(0.0);
        (j * 1000.0).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn shared_time_is_split() {
        let m = EnergyMeter::default();
        let w = 100.0;
        let a = m.start(w);
        tokio::time::sleep(Duration::from_secs(2)).await; // a alone: 200 J
        let b = m.start(w);
        tokio::time::sleep(Duration::from_secs(2)).await; // both: 100 J each
        let ea = m.finish(a, w);
        tokio::time::sleep(Duration::from_secs(1)).await; // b alone: 100 J
        let eb = m.finish(b, w);
        assert_eq!(ea, 300_000);
        assert_eq!(eb, 200_000);
        // Idle time accrues nothing.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let c = m.start(w);
        assert_eq!(m.finish(c, w), 0);
    }
}
