//! The cross-check: the same non-streamed cells measured by an external, pinned load tool
//! (`oha`, installed by `scripts/bench`), so that a fault of the in-process load generator
//! cannot hide. Both figures are printed side by side; when they disagree by more than the
//! noise, the report says so and which one the ratios use.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use crate::loadgen::{Endpoint, RequestSpec, CHAT_PATH};

/// The `oha` version `scripts/bench` installs (`cargo install oha --version ... --locked`).
pub const OHA_VERSION: &str = "1.16.0";
/// How long `oha` may run past its `-z` duration before it is given up on.
pub const OHA_GRACE: Duration = Duration::from_secs(30);
/// Two added latencies agree when they differ by at most this many µs ...
pub const AGREE_ABS_US: f64 = 25.0;
/// ... or by at most this fraction of the larger one.
pub const AGREE_REL: f64 = 0.25;
/// Two throughputs agree when the smaller is at least this fraction of the larger.
pub const AGREE_RPS: f64 = 0.8;

/// One target measured by `oha`.
#[derive(Debug, Clone, Serialize)]
pub struct OhaCell {
    /// Concurrent connections (`-c`).
    pub concurrency: usize,
    /// Target name.
    pub target: String,
    /// Answers with a 2xx status.
    pub ok: u64,
    /// Other answers and transport errors (requests cut by the deadline not counted).
    pub errors: u64,
    /// Requests per second, as `oha` reports them.
    pub rps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// p50 minus direct's p50 as `oha` measured it, µs.
    pub added_p50_us: Option<f64>,
}

/// Figures from `oha --output-format json`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OhaFigures {
    /// 2xx answers.
    pub ok: u64,
    /// Non-2xx answers and errors other than the deadline's.
    pub errors: u64,
    /// Requests per second.
    pub rps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
}

/// Read `oha`'s JSON summary.
pub fn parse_oha_json(text: &str) -> anyhow::Result<OhaFigures> {
    let v: serde_json::Value = serde_json::from_str(text).context("oha's output is not JSON")?;
    let f = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| anyhow!("oha's JSON has no number at {p}"))
    };
    let (mut ok, mut errors) = (0u64, 0u64);
    if let Some(codes) = v.get("statusCodeDistribution").and_then(|c| c.as_object()) {
        for (code, n) in codes {
            let n = n.as_u64().unwrap_or(0);
            if code.starts_with('2') {
                ok = ok.saturating_add(n);
            } else {
                errors = errors.saturating_add(n);
            }
        }
    }
    if let Some(errs) = v.get("errorDistribution").and_then(|c| c.as_object()) {
        for (what, n) in errs {
            // `-z` cuts the requests in flight at the deadline: not a fault of the target.
            if !what.contains("deadline") {
                errors = errors.saturating_add(n.as_u64().unwrap_or(0));
            }
        }
    }
    Ok(OhaFigures {
        ok,
        errors,
        rps: f("/summary/requestsPerSec")?,
        p50_us: f("/latencyPercentiles/p50")? * 1e6,
        p99_us: f("/latencyPercentiles/p99")? * 1e6,
    })
}

/// The `oha` arguments for one run (the key, if any, is in an `Authorization` header).
pub fn oha_args(ep: &Endpoint, spec: &RequestSpec, c: usize, duration: Duration) -> Vec<String> {
    let mut args = vec![
        "--no-tui".to_owned(),
        "--output-format".into(),
        "json".into(),
        "-c".into(),
        c.to_string(),
        "-z".into(),
        format!("{}ms", duration.as_millis()),
        "-m".into(),
        "POST".into(),
        "-T".into(),
        "application/json".into(),
        "-d".into(),
        String::from_utf8_lossy(&spec.body()).into_owned(),
    ];
    if let Some(a) = ep.auth.as_ref().and_then(|a| a.to_str().ok()) {
        args.extend(["-H".to_owned(), format!("Authorization: {a}")]);
    }
    args.push(format!("http://{}{CHAT_PATH}", ep.addr));
    args
}

/// Run `oha` once against `ep`.
pub async fn run_oha(
    oha: &Path,
    ep: &Endpoint,
    spec: &RequestSpec,
    c: usize,
    duration: Duration,
) -> anyhow::Result<OhaFigures> {
    let out = tokio::time::timeout(
        duration + OHA_GRACE,
        tokio::process::Command::new(oha)
            .args(oha_args(ep, spec, c, duration))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("oha did not finish within {:?}", duration + OHA_GRACE))?
    .with_context(|| format!("cannot run {}", oha.display()))?;
    if !out.status.success() {
        bail!(
            "oha failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_oha_json(&String::from_utf8_lossy(&out.stdout))
}

/// Whether two added latencies (µs) agree within the noise.
pub fn latencies_agree(a: f64, b: f64) -> bool {
    let diff = (a - b).abs();
    diff <= AGREE_ABS_US || diff <= AGREE_REL * a.abs().max(b.abs())
}

/// Whether two throughputs agree within the noise.
pub fn rates_agree(a: f64, b: f64) -> bool {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    hi <= 0.0 || lo / hi >= AGREE_RPS
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"summary":{"successRate":1.0,"total":1.0,"slowest":0.002,"fastest":0.0001,
        "average":0.0002,"requestsPerSec":4321.5,"totalData":1,"sizePerRequest":1,"sizePerSec":1.0},
        "latencyPercentiles":{"p10":0.0001,"p50":0.000185,"p99":0.00042},
        "statusCodeDistribution":{"200":4300,"502":3},
        "errorDistribution":{"aborted due to deadline":1,"connection closed":2}}"#;

    #[test]
    fn reads_oha_json() {
        let f = parse_oha_json(SAMPLE).unwrap();
        assert_eq!(f.ok, 4300);
        assert_eq!(
            f.errors, 5,
            "502s and transport errors count, the deadline's cut does not"
        );
        assert!((f.rps - 4321.5).abs() < 1e-9);
        assert!((f.p50_us - 185.0).abs() < 1e-6);
        assert!((f.p99_us - 420.0).abs() < 1e-6);
        assert!(parse_oha_json("{}").is_err());
        assert!(parse_oha_json("not json").is_err());
    }

    #[test]
    fn noise_bands() {
        assert!(latencies_agree(40.0, 60.0), "within 25 µs");
        assert!(latencies_agree(400.0, 320.0), "within 25 %");
        assert!(!latencies_agree(40.0, 120.0));
        assert!(rates_agree(9000.0, 10_000.0));
        assert!(!rates_agree(5000.0, 10_000.0));
    }

    #[test]
    fn key_goes_in_a_header() {
        let ep = Endpoint::with_key("127.0.0.1:9".parse().unwrap(), "pk-x").unwrap();
        let args = oha_args(
            &ep,
            &RequestSpec::chat("bench", 16),
            64,
            Duration::from_secs(2),
        );
        assert!(args
            .windows(2)
            .any(|w| w == ["-H", "Authorization: Bearer pk-x"]));
        assert!(args.windows(2).any(|w| w == ["-z", "2000ms"]));
        assert_eq!(
            args.last().unwrap(),
            "http://127.0.0.1:9/v1/chat/completions"
        );
    }
}
