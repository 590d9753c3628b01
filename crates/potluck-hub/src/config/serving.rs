//! Settings against bad providers (`[routing]`: the circuit breaker, the first-byte
//! deadline, tunnel and slot caps) and hostile clients (`[server]`: header and body
//! read timeouts, connection and stream limits).

use std::time::Duration;

use serde::Deserialize;

/// Largest `routing.busy_retries` accepted (a request must not bounce for ever).
pub(crate) const MAX_BUSY_RETRIES: u32 = 100;
/// Largest `routing.busy_retry_delay` accepted.
pub(crate) const MAX_BUSY_RETRY_DELAY: Duration = Duration::from_secs(10);

/// Largest `routing.pick_sample`. The power of d choices gains little past a few (the
/// default is 8), a larger sample only walks more tunnels before falling back to the full
/// scan anyway, and each pick reserves room for the whole sample (a huge value aborted the
/// hub on its first sampled pick); 1024 is 8 KiB of pointers.
pub const MAX_PICK_SAMPLE: usize = 1024;
/// Largest `server.max_connections`: far above any host's open-file limit (each
/// connection holds a descriptor; benchmarks use 1,000,000), far below tokio's semaphore
/// limit, past which the hub panicked at start.
pub const MAX_SERVER_CONNECTIONS: usize = 1 << 24;
/// Largest `server.max_key_lookups` and `server.max_member_reads`. They count database
/// reads at once, and bound how many of the pool's connections (8) strangers' lookups and
/// members' reads may hold; a value at or above the pool's size no longer leaves any for
/// the rest. 1024 is far above any pool (PostgreSQL allows 100 connections by default)
/// and far below tokio's semaphore limit, past which the hub panicked at start.
pub const MAX_DATABASE_TURNS: usize = 1024;

/// How the hub judges providers by what they do, not by what they announce.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Consecutive failures (5xx, refusals another provider did not share, answers that
    /// are not valid JSON or SSE, timeouts, dropped streams) after which a provider leaves
    /// routing.
    pub failure_threshold: u32,
    /// A provider whose success rate (moving average, see `success_weight`) falls below
    /// this after a failure leaves routing too, so that failing only most of the time
    /// does not escape the breaker.
    pub min_success_rate: f64,
    /// Weight of the newest outcome in a provider's success rate (0 to 1). Picks among
    /// equally loaded providers are weighted by the square of that rate.
    pub success_weight: f64,
    /// How long a tripped provider stays out before one probe request may reach it
    /// (seconds). Doubles on every trip in a row, up to `max_cooldown`. Above 0 (at 0
    /// the breaker never kept a failing provider out).
    #[serde(with = "super::secs")]
    pub cooldown: Duration,
    /// Longest time out of routing after repeated trips (seconds): at least `cooldown`.
    #[serde(with = "super::secs")]
    pub max_cooldown: Duration,
    /// A streamed request whose provider sent no byte of its answer within this time
    /// (seconds) is retried on another provider, and the silence counts as a failure.
    /// Non-streamed requests keep `provider_header_timeout`. Above 0.
    #[serde(with = "super::secs")]
    pub first_byte_timeout: Duration,
    /// A request whose tunnel closed before answering (the agent died or its link was
    /// cut) leaves that tunnel out of routing at once and waits up to this long (seconds)
    /// for another tunnel of its model, such as the same agent reconnecting, instead of
    /// failing with 502.
    #[serde(with = "super::secs")]
    pub reroute_wait: Duration,
    /// Most tunnels one provider token may hold open at once.
    pub max_tunnels_per_provider: u32,
    /// Most slots the hub believes one tunnel has, whatever its agent announces.
    pub max_slots_per_tunnel: u32,
    /// An agent that serves several hubs shares its slots among them and answers "busy"
    /// (503 with `x-potluck-agent-busy`) when another hub holds them all. Such an answer
    /// is not the provider's failure: the request goes to another provider if one is
    /// free, else asks the same one again after `busy_retry_delay`, at most this many
    /// times in all; then the consumer gets 503 `no_capacity` (nothing billed).
    pub busy_retries: u32,
    /// Wait before asking a busy provider again (seconds).
    #[serde(with = "super::secs")]
    pub busy_retry_delay: Duration,
    /// With more open tunnels than this, a request (not in low-power mode) is routed to
    /// the least loaded of `pick_sample` free, healthy tunnels found from a random place,
    /// instead of scanning every tunnel; it falls back to the full scan when the sample
    /// finds none. 0: always sample.
    pub scan_all_below: usize,
    /// How many free, healthy tunnels a sampled pick compares: 1 to [`MAX_PICK_SAMPLE`]
    /// (1024).
    pub pick_sample: usize,
    /// How long the hub gathers receipts and other events for one agent before sending
    /// them in one batch under one signature (seconds).
    #[serde(with = "super::secs")]
    pub events_linger: Duration,
    /// A tunnel must send its `hello` within this time of opening (seconds), else it is
    /// closed: an open tunnel holds one of its provider's `max_tunnels_per_provider`
    /// places and the hub's memory before it serves anything.
    #[serde(with = "super::secs")]
    pub hello_timeout: Duration,
    /// Most offer changes (`models` events) one tunnel may send in a minute; a tunnel
    /// that sends more is closed (its agent reconnects). An agent sends one when its
    /// backends' models change or its volunteer pauses it, far less often.
    pub max_offer_changes_per_minute: u32,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            min_success_rate: 0.5,
            success_weight: 0.1,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(600),
            first_byte_timeout: Duration::from_secs(60),
            // Agents reconnect within 50 to 500 ms of a cut (RELIABILITY.md).
            reroute_wait: Duration::from_secs(2),
            max_tunnels_per_provider: 4,
            max_slots_per_tunnel: 256,
            busy_retries: 8,
            busy_retry_delay: Duration::from_millis(250),
            scan_all_below: 256,
            pick_sample: 8,
            events_linger: Duration::from_millis(100),
            hello_timeout: Duration::from_secs(30),
            max_offer_changes_per_minute: 60,
        }
    }
}

/// Limits of the hub's HTTP server against slow and greedy clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// An HTTP/1 client must send a request's whole head within this time (seconds),
    /// counted from when the connection is ready for it; else the connection is closed.
    /// An idle keep-alive connection is closed after it too. Above 0.
    #[serde(with = "super::secs")]
    pub header_read_timeout: Duration,
    /// A request's whole body must arrive within this time after its head (seconds);
    /// else the request fails and the connection is closed. Above 0.
    #[serde(with = "super::secs")]
    pub body_read_timeout: Duration,
    /// Most open client connections; more are closed as soon as they are accepted. 1 to
    /// [`MAX_SERVER_CONNECTIONS`] (16,777,216).
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams per connection.
    pub http2_max_streams: u32,
    /// Largest HTTP/1 request head, in bytes.
    pub max_header_bytes: usize,
    /// A client that takes nothing of a streamed answer for this long while data waits
    /// for it (it stopped reading, or opened an HTTP/2 stream with no window) has its
    /// connection closed (seconds): the request ends as if it had gone away, so that it
    /// holds no provider's slot. A stream waiting for its provider is not affected.
    #[serde(with = "super::secs")]
    pub consumer_stall_timeout: Duration,
    /// Most database lookups of credentials not in the hub's caches (consumer keys,
    /// provider tokens) at once: a stranger sending a new well-formed random key with
    /// every request gets this many of the database's connections, not all of them. 1 to
    /// [`MAX_DATABASE_TURNS`] (1024); keep it below the database pool's 8 connections to
    /// leave some for the rest of the hub.
    pub max_key_lookups: usize,
    /// How long a credential lookup, or a member's read, waits for its turn (seconds);
    /// past it, 503.
    #[serde(with = "super::secs")]
    pub key_lookup_wait: Duration,
    /// Most database reads members ask for at once (their balance, credit history and
    /// usage, through the API and the member page): one account, or many, asking for the
    /// largest history again and again gets this many of the database's connections. 1
    /// to [`MAX_DATABASE_TURNS`] (1024); keep it below the database pool's 8 connections
    /// to leave some for the rest of the hub.
    pub max_member_reads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(15),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 4096,
            http2_max_streams: 128,
            max_header_bytes: 64 * 1024,
            consumer_stall_timeout: Duration::from_secs(60),
            max_key_lookups: 4,
            key_lookup_wait: Duration::from_secs(5),
            max_member_reads: 4,
        }
    }
}

impl RoutingConfig {
    /// Cross-field rules.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.failure_threshold == 0
            || self.max_tunnels_per_provider == 0
            || self.max_slots_per_tunnel == 0
        {
            return Err("routing.failure_threshold, routing.max_tunnels_per_provider and routing.max_slots_per_tunnel must be positive".into());
        }
        if self.busy_retries > MAX_BUSY_RETRIES || self.busy_retry_delay > MAX_BUSY_RETRY_DELAY {
            return Err(format!(
                "routing.busy_retries must be at most {MAX_BUSY_RETRIES} and routing.busy_retry_delay at most {}s",
                MAX_BUSY_RETRY_DELAY.as_secs()
            ));
        }
        if !(0.0..=1.0).contains(&self.min_success_rate)
            || self.success_weight.is_nan()
            || self.success_weight <= 0.0
            || self.success_weight > 1.0
        {
            return Err("routing.min_success_rate must be between 0 and 1, routing.success_weight above 0 and at most 1".into());
        }
        if self.cooldown.is_zero() {
            return Err("routing.cooldown must be positive".into());
        }
        if self.max_cooldown < self.cooldown {
            return Err("routing.max_cooldown must be at least routing.cooldown".into());
        }
        super::check_timeout("routing.first_byte_timeout", self.first_byte_timeout)?;
        if !(1..=MAX_PICK_SAMPLE).contains(&self.pick_sample) {
            return Err(format!(
                "routing.pick_sample must be from 1 to {MAX_PICK_SAMPLE}"
            ));
        }
        Ok(())
    }
}

impl ServerConfig {
    /// Cross-field rules.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_SERVER_CONNECTIONS).contains(&self.max_connections) {
            return Err(format!(
                "server.max_connections must be from 1 to {MAX_SERVER_CONNECTIONS}"
            ));
        }
        if self.http2_max_streams == 0 {
            return Err("server.http2_max_streams must be positive".into());
        }
        super::check_timeout("server.header_read_timeout", self.header_read_timeout)?;
        super::check_timeout("server.body_read_timeout", self.body_read_timeout)?;
        if self.max_header_bytes < 8192 {
            return Err("server.max_header_bytes must be at least 8192".into());
        }
        super::check_timeout("server.consumer_stall_timeout", self.consumer_stall_timeout)?;
        for (name, n) in [
            ("max_key_lookups", self.max_key_lookups),
            ("max_member_reads", self.max_member_reads),
        ] {
            if !(1..=MAX_DATABASE_TURNS).contains(&n) {
                return Err(format!(
                    "server.{name} must be from 1 to {MAX_DATABASE_TURNS}"
                ));
            }
        }
        if self.key_lookup_wait.is_zero() {
            return Err("server.key_lookup_wait must be positive".into());
        }
        Ok(())
    }
}
