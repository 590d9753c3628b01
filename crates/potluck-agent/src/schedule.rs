//! When the volunteer shares: weekly windows in an IANA time zone, and the wall clock
//! they are read against (injectable, so tests can move it).
//!
//! A window is `DAYS [HH:MM-HH:MM]`: `"mon-fri 22:00-07:00"`, `"sat-sun"` (all day),
//! `"wed 12:00-13:30"`, `"mon,wed,fri 09:00-17:00"`. A window whose end is not after its
//! start runs over midnight and ends on the next day (the day list names the day it
//! starts). Times are civil times in the schedule's zone, so a window keeps its local
//! hours across daylight-saving changes; at a spring-forward gap the skipped local
//! minutes simply never occur.

use parking_lot::Mutex;

use jiff::tz::TimeZone;
use jiff::Timestamp;

/// Minutes in a day.
const DAY_MINUTES: u16 = 24 * 60;
/// Most windows one schedule may hold.
pub const MAX_WINDOWS: usize = 64;
/// How far ahead [`Schedule::next_change`] looks (a week and a day covers every weekly
/// pattern).
const LOOKAHEAD_MINUTES: i64 = 8 * 24 * 60;

/// The wall clock (UTC instants). Production uses [`SystemClock`]; tests move a
/// [`ManualClock`].
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that tests set.
#[derive(Debug)]
pub struct ManualClock(Mutex<Timestamp>);

impl ManualClock {
    /// Start at `t`.
    pub fn new(t: Timestamp) -> Self {
        Self(Mutex::new(t))
    }

    /// Jump to `t`.
    pub fn set(&self, t: Timestamp) {
        *self.0.lock() = t;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.0.lock()
    }
}

/// A clock that follows tokio's (possibly paused) time from a fixed start instant.
#[derive(Debug)]
pub struct TokioClock {
    base: Timestamp,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// Wall time `base` at tokio's now.
    pub fn new(base: Timestamp) -> Self {
        Self {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let d = jiff::SignedDuration::try_from(self.start.elapsed()).unwrap_or_default();
        self.base.checked_add(d).unwrap_or(self.base)
    }
}

/// One weekly window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Days it starts on, Monday first.
    days: [bool; 7],
    /// Start, minutes after local midnight.
    start: u16,
    /// End, minutes after local midnight; `<= start` means the next day.
    end: u16,
}

/// A weekly schedule in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    tz: TimeZone,
    tz_name: String,
    windows: Vec<Window>,
}

impl PartialEq for Schedule {
    fn eq(&self, o: &Self) -> bool {
        self.tz_name == o.tz_name && self.windows == o.windows
    }
}

/// A schedule that cannot be read; says which part and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(String);

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const FULL_DAY_NAMES: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

fn day(s: &str) -> Result<usize, ScheduleError> {
    let s = s.to_ascii_lowercase();
    (0..7)
        .find(|&i| s == DAY_NAMES[i] || s == FULL_DAY_NAMES[i])
        .ok_or_else(|| ScheduleError(format!("{s:?} is not a day (mon, tue, ... sun)")))
}

fn days(s: &str) -> Result<[bool; 7], ScheduleError> {
    let mut out = [false; 7];
    for part in s.split(',') {
        let part = part.trim();
        if part.eq_ignore_ascii_case("daily") || part == "*" {
            out = [true; 7];
            continue;
        }
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut i = a;
                loop {
                    out[i] = true;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => out[day(part)?] = true,
        }
    }
    Ok(out)
}

fn hhmm(s: &str) -> Result<u16, ScheduleError> {
    let bad = || ScheduleError(format!("{s:?} is not a time (HH:MM, 00:00 to 24:00)"));
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl Window {
    /// Parse `DAYS [HH:MM-HH:MM]`.
    pub fn parse(s: &str) -> Result<Self, ScheduleError> {
        let mut it = s.split_whitespace();
        let d = it
            .next()
            .ok_or_else(|| ScheduleError("an empty window".into()))?;
        let days = days(d)?;
        let (start, end) = match it.next() {
            None => (0, DAY_MINUTES),
            Some(t) => {
                let (a, b) = t
                    .split_once('-')
                    .ok_or_else(|| ScheduleError(format!("{t:?}: expected HH:MM-HH:MM")))?;
                (hhmm(a)?, hhmm(b)?)
            }
        };
        if it.next().is_some() {
            return Err(ScheduleError(format!(
                "{s:?}: expected `DAYS` or `DAYS HH:MM-HH:MM`"
            )));
        }
        if start == DAY_MINUTES {
            return Err(ScheduleError(format!(
                "{s:?}: a window cannot start at 24:00"
            )));
        }
        if start == end {
            return Err(ScheduleError(format!(
                "{s:?}: start equals end; for a whole day leave the times out"
            )));
        }
        Ok(Self { days, start, end })
    }

    /// Open at local weekday `d` (Monday = 0), minute `m`?
    fn open_at(&self, d: usize, m: u16) -> bool {
        if self.start < self.end {
            self.days[d] && m >= self.start && m < self.end
        } else {
            (self.days[d] && m >= self.start) || (self.days[(d + 6) % 7] && m < self.end)
        }
    }
}

impl Schedule {
    /// A schedule from a zone name (IANA, e.g. `Europe/Berlin`, or `UTC`) and windows.
    pub fn parse(tz: &str, windows: &[String]) -> Result<Self, ScheduleError> {
        let zone = TimeZone::get(tz)
            .map_err(|e| ScheduleError(format!("unknown time zone {tz:?}: {e}")))?;
        if windows.is_empty() {
            return Err(ScheduleError(
                "no windows; remove [schedule] to share at all times".into(),
            ));
        }
        if windows.len() > MAX_WINDOWS {
            return Err(ScheduleError(format!("more than {MAX_WINDOWS} windows")));
        }
        Ok(Self {
            tz: zone,
            tz_name: tz.to_owned(),
            windows: windows
                .iter()
                .map(|w| Window::parse(w))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether `t` falls in a window.
    pub fn is_open(&self, t: Timestamp) -> bool {
        let z = t.to_zoned_datetime(self.tz.clone());
        let d = z.weekday().to_monday_zero_offset() as usize;
        let m = (z.hour() as u16) * 60 + z.minute() as u16;
        self.windows.iter().any(|w| w.open_at(d % 7, m))
    }

    /// The first whole minute after `t` at which [`Schedule::is_open`] differs from now,
    /// or `None` if it never changes (within a week and a day).
    pub fn next_change(&self, t: Timestamp) -> Option<Timestamp> {
        let now = self.is_open(t);
        let base = t.as_second().div_euclid(60) * 60;
        (1..=LOOKAHEAD_MINUTES)
            .filter_map(|i| Timestamp::from_second(base + i * 60).ok())
            .find(|c| self.is_open(*c) != now)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn sched(tz: &str, w: &[&str]) -> Schedule {
        Schedule::parse(tz, &w.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn parse_windows() {
        let w = Window::parse("mon-fri 22:00-07:00").unwrap();
        assert_eq!(w.days, [true, true, true, true, true, false, false]);
        assert_eq!((w.start, w.end), (22 * 60, 7 * 60));
        let w = Window::parse("sat-sun").unwrap();
        assert_eq!(w.days, [false, false, false, false, false, true, true]);
        assert_eq!((w.start, w.end), (0, 24 * 60));
        let w = Window::parse("fri-mon 09:30-24:00").unwrap();
        assert_eq!(w.days, [true, false, false, false, true, true, true]);
        let w = Window::parse("Mon,WED,friday 01:00-02:00").unwrap();
        assert_eq!(w.days, [true, false, true, false, true, false, false]);
        assert!(Window::parse("daily 00:00-12:00")
            .unwrap()
            .days
            .iter()
            .all(|d| *d));
        for bad in [
            "",
            "funday",
            "mon 25:00-26:00",
            "mon 10:00",
            "mon 10:60-11:00",
            "mon 10:00-10:00",
            "mon 24:00-01:00",
            "mon 1:2-3:4",
            "mon 10:00-11:00 extra",
            "mon-",
            "monkey",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Schedule::parse("Mars/Olympus", &["mon".into()]).is_err());
        assert!(Schedule::parse("UTC", &[]).is_err());
    }

    #[test]
    fn over_midnight() {
        // 2024-01-01 is a Monday.
        let s = sched("UTC", &["mon-fri 22:00-07:00"]);
        assert!(!s.is_open(at("2024-01-01T21:59:59Z")));
        assert!(s.is_open(at("2024-01-01T22:00:00Z")));
        assert!(s.is_open(at("2024-01-02T06:59:59Z"))); // Tuesday morning, from Monday
        assert!(!s.is_open(at("2024-01-02T07:00:00Z")));
        assert!(s.is_open(at("2024-01-06T06:00:00Z"))); // Saturday morning, from Friday
        assert!(!s.is_open(at("2024-01-06T22:30:00Z"))); // Saturday night: not listed
        assert!(!s.is_open(at("2024-01-01T06:00:00Z"))); // Monday morning: Sunday not listed
        assert_eq!(
            s.next_change(at("2024-01-01T12:34:56Z")),
            Some(at("2024-01-01T22:00:00Z"))
        );
        assert_eq!(
            s.next_change(at("2024-01-01T22:00:00Z")),
            Some(at("2024-01-02T07:00:00Z"))
        );
        let weekend = sched("UTC", &["sat-sun"]);
        assert!(weekend.is_open(at("2024-01-06T00:00:00Z")));
        assert!(weekend.is_open(at("2024-01-07T23:59:59Z")));
        assert!(!weekend.is_open(at("2024-01-08T00:00:00Z")));
        let always = sched("UTC", &["daily"]);
        assert_eq!(always.next_change(at("2024-01-06T00:00:00Z")), None);
    }

    #[test]
    fn local_hours_survive_dst() {
        // Europe/Berlin: CET (+01) in winter, CEST (+02) from 2024-03-31 02:00 local.
        let s = sched("Europe/Berlin", &["daily 22:00-07:00"]);
        // Winter: 22:00 local is 21:00 UTC.
        assert!(!s.is_open(at("2024-03-28T20:59:00Z")));
        assert!(s.is_open(at("2024-03-28T21:00:00Z")));
        // Summer: 22:00 local is 20:00 UTC; 07:00 local is 05:00 UTC.
        assert!(s.is_open(at("2024-04-02T20:00:00Z")));
        assert!(!s.is_open(at("2024-04-02T19:59:00Z")));
        assert!(!s.is_open(at("2024-04-03T05:00:00Z")));
        // The night of the change: opens 22:00 CET (21:00Z), closes 07:00 CEST (05:00Z):
        // eight real hours, not nine.
        let open = at("2024-03-30T21:00:00Z");
        assert!(s.is_open(open));
        assert_eq!(s.next_change(open), Some(at("2024-03-31T05:00:00Z")));
        // A window inside the skipped hour never opens that night, and does not panic.
        let gap = sched("Europe/Berlin", &["sun 02:15-02:45"]);
        assert_eq!(
            gap.next_change(at("2024-03-30T12:00:00Z")),
            Some(at("2024-04-07T00:15:00Z"))
        );
    }
}
