//! The hub's configuration: every limit and timeout is a named field with a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Hub configuration (TOML file, `[hub]`-less: fields at the top level).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Where to listen for consumers, agents and admins.
    pub listen: SocketAddr,
    /// Holds `hub.db` and `admin.key`.
    pub data_dir: PathBuf,
    /// Largest consumer request body, in bytes (413 above).
    pub max_request_bytes: usize,
    /// Largest non-streamed provider response, in bytes (502 above).
    pub max_response_bytes: usize,
    /// Longest SSE line accepted from a provider, in bytes.
    pub max_sse_line_bytes: usize,
    /// How long a provider may take to send response headers (504 after).
    #[serde(with = "secs")]
    pub provider_header_timeout: Duration,
    /// How long a non-streamed body may take once headers arrived.
    #[serde(with = "secs")]
    pub provider_body_timeout: Duration,
    /// Longest silence between two streamed chunks before the stream is ended.
    #[serde(with = "secs")]
    pub stream_idle_timeout: Duration,
    /// `Retry-After` seconds when no provider can take a request.
    pub retry_after_secs: u64,
    /// Grace period for in-flight requests at shutdown.
    #[serde(with = "secs")]
    pub shutdown_grace: Duration,
    /// Capacity of the usage-record queue between requests and the database writer.
    pub usage_queue: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir: PathBuf::from("potluck-data"),
            max_request_bytes: 8 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            max_sse_line_bytes: 1024 * 1024,
            provider_header_timeout: Duration::from_secs(600),
            provider_body_timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(120),
            retry_after_secs: 5,
            shutdown_grace: Duration::from_secs(10),
            usage_queue: 65_536,
        }
    }
}

/// Durations as (fractional) seconds in TOML.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = f64::deserialize(d)?;
        if !(s.is_finite() && (0.0..1e9).contains(&s)) {
            return Err(serde::de::Error::custom(
                "expected a number of seconds between 0 and 1e9",
            ));
        }
        Ok(Duration::from_secs_f64(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_fields_and_errors() {
        let c: HubConfig =
            toml::from_str("listen = \"0.0.0.0:9000\"\nstream_idle_timeout = 2.5").unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.stream_idle_timeout, Duration::from_millis(2500));
        let e = toml::from_str::<HubConfig>("max_request_bytes = \"big\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_request_bytes"), "{e}");
        let e = toml::from_str::<HubConfig>("nope = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
