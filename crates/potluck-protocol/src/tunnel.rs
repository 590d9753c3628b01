//! The tunnel between an agent and the hub.
//!
//! 1. The agent sends `GET` [`TUNNEL_PATH`] over HTTP/1.1 with
//!    `Authorization: Bearer <provider token>`, `Connection: upgrade`,
//!    `Upgrade:` [`UPGRADE_PROTOCOL`] and [`HEADER_PROTOCOL_VERSION`].
//! 2. The hub answers `101 Switching Protocols` (or an OpenAI-shaped 401/426 error).
//! 3. Over the upgraded bytes the **hub is the HTTP/2 client and the agent the server**.
//!    The hub first opens `GET` [`CONTROL_PATH`]: a long-lived response of
//!    newline-delimited JSON [`AgentEvent`]s (a `hello`, then `models` on each change).
//!    Each consumer request is then one HTTP/2 stream carrying one allow-listed
//!    inference request (see [`crate::InferenceEndpoint`]), with [`HEADER_MODEL`] and
//!    [`HEADER_REQUEST_ID`] (and the consumer's pseudonym, [`HEADER_CONSUMER`]) set by
//!    the hub.
//! 4. The hub sends its own events (signed receipts, refused models) as batches of
//!    newline-delimited JSON [`HubEvent`]s, each batch one `POST` [`EVENTS_PATH`].

use serde::{Deserialize, Serialize};

use crate::caps::ModelCapabilities;
use crate::openai::ModelName;

/// Version of this tunnel protocol. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
/// Path the agent upgrades on.
pub const TUNNEL_PATH: &str = "/v1/tunnel";
/// The `Upgrade:` token.
pub const UPGRADE_PROTOCOL: &str = "potluck-tunnel/1";
/// Request header carrying the agent's [`PROTOCOL_VERSION`].
pub const HEADER_PROTOCOL_VERSION: &str = "x-potluck-protocol";
/// Upgrade request header: the optional parts of the protocol the agent takes, as
/// comma-separated tokens (a hub ignores tokens it does not know; an agent that sends
/// none gets only what version 1 always had).
pub const HEADER_FEATURES: &str = "x-potluck-features";
/// [`HEADER_FEATURES`] token: send receipts as [`HubEvent::ReceiptBatch`], a batch in
/// one line without per-receipt proofs.
pub const FEATURE_RECEIPT_BATCHES: &str = "receipt-batches";
/// Path of the control stream, opened by the hub over HTTP/2.
pub const CONTROL_PATH: &str = "/_potluck/control";
/// Header on tunneled requests: the model the hub routed for.
pub const HEADER_MODEL: &str = "x-potluck-model";
/// Header on tunneled requests: the hub's request id (random; says nothing of the consumer).
pub const HEADER_REQUEST_ID: &str = "x-potluck-request-id";
/// Response header the agent sets on errors it produced itself (not the backend's).
pub const HEADER_AGENT_ERROR: &str = "x-potluck-agent-error";
/// Response header (with a 503 and [`HEADER_AGENT_ERROR`]) the agent sets when all its
/// slots are taken, possibly by another hub it serves: the hub retries elsewhere (or the
/// same agent a moment later) and does not count it as the provider's failure.
pub const HEADER_AGENT_BUSY: &str = "x-potluck-agent-busy";
/// Response header the agent sets on a backend's refusal of a prompt longer than the
/// model's context: `"<prompt tokens> <context tokens>"`, as the backend counted them.
/// The hub answers it in its own words (a provider's text never reaches a consumer).
pub const HEADER_CONTEXT_OVERFLOW: &str = "x-potluck-context-overflow";

/// Longest control line (one JSON event plus newline).
pub const MAX_CONTROL_LINE_BYTES: usize = 256 * 1024;
/// Most models one agent may offer.
pub const MAX_MODELS_PER_AGENT: usize = 512;
/// Largest concurrency an agent may announce (per model or in total).
pub const MAX_ANNOUNCED_CONCURRENCY: u32 = 16_384;

/// Path of hub-to-agent event batches: the hub `POST`s newline-delimited JSON
/// [`HubEvent`]s here over the tunnel; the agent answers `204`.
pub const EVENTS_PATH: &str = "/_potluck/events";
/// Header on tunneled requests: the consumer's pseudonym for this provider (an HMAC of
/// the account id with a per-provider secret; stable for one provider, different across
/// providers, says nothing of who the consumer is). Never forwarded to a backend.
pub const HEADER_CONSUMER: &str = "x-potluck-consumer";
/// Largest body of one [`EVENTS_PATH`] batch.
pub const MAX_EVENTS_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Most hub groups a provider may restrict itself to.
pub const MAX_PROVIDER_GROUPS: usize = 64;
/// Longest group name.
pub const MAX_GROUP_NAME_BYTES: usize = 64;
/// Largest power figure an agent may declare, in watts.
pub const MAX_DECLARED_WATTS: f64 = 100_000.0;
/// Longest free-text field (reasons, request ids) in a control message.
pub const MAX_SHORT_TEXT_BYTES: usize = 512;

/// The SHA-256 of a model file: 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ModelHash(String);

impl ModelHash {
    /// Validate (case-insensitive input, stored lowercase).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err("a model hash is 64 hex digits (SHA-256 of the model file)".into())
        }
    }

    /// From raw digest bytes.
    pub fn from_digest(d: &[u8; 32]) -> Self {
        Self(hex::encode(d))
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ModelHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ModelHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One model an agent offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelOffer {
    /// The public model name consumers ask for.
    pub id: ModelName,
    /// SHA-256 of the model file, when the agent could find and hash it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<ModelHash>,
    /// Most requests at once for this model (the agent's total still applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Largest context (prompt + completion tokens) the provider accepts for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context: Option<u32>,
    /// Largest `max_tokens` the provider accepts per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// What the model can do (tools, vision, embeddings, context length). Absent (an
    /// older agent): nothing known, which still serves plain chat (see [`crate::caps`]).
    #[serde(default, skip_serializing_if = "ModelCapabilities::is_unknown")]
    pub capabilities: ModelCapabilities,
}

impl ModelOffer {
    /// An offer with a name only.
    pub fn named(id: ModelName) -> Self {
        Self {
            id,
            sha256: None,
            max_concurrency: None,
            max_context: None,
            max_tokens: None,
            capabilities: ModelCapabilities::default(),
        }
    }
}

/// What kind of device runs the provider's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceClass {
    /// A GPU (the default).
    #[default]
    Gpu,
    /// A neural processing unit.
    Npu,
    /// The CPU.
    Cpu,
}

impl DeviceClass {
    /// Rank for low-power routing: lower is preferred.
    pub fn low_power_rank(self) -> u8 {
        match self {
            DeviceClass::Npu => 0,
            DeviceClass::Cpu => 1,
            DeviceClass::Gpu => 2,
        }
    }
}

/// Which side of a request a provider requires the hub to moderate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Moderation {
    /// No requirement (the hub's own policy applies).
    #[default]
    None,
    /// Check the consumer's input before dispatch.
    Input,
    /// Check the model's output.
    Output,
    /// Both.
    Both,
}

impl Moderation {
    /// Moderation of the sides `input` and `output`.
    pub fn of(input: bool, output: bool) -> Self {
        match (input, output) {
            (true, true) => Self::Both,
            (true, false) => Self::Input,
            (false, true) => Self::Output,
            (false, false) => Self::None,
        }
    }

    /// Whether the consumer's input is checked.
    pub fn input(self) -> bool {
        matches!(self, Self::Input | Self::Both)
    }

    /// Whether the model's output is checked.
    pub fn output(self) -> bool {
        matches!(self, Self::Output | Self::Both)
    }

    /// Every side either checks.
    pub fn with(self, other: Self) -> Self {
        Self::of(
            self.input() || other.input(),
            self.output() || other.output(),
        )
    }

    /// Whether a request moderated as `self` meets the requirement `required`.
    pub fn covers(self, required: Self) -> bool {
        (self.input() || !required.input()) && (self.output() || !required.output())
    }

    /// How many sides are checked.
    pub fn sides(self) -> u8 {
        u8::from(self.input()) + u8::from(self.output())
    }
}

/// The provider's declared shape and rules, sent with every offer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ProviderProfile {
    /// Device class, for low-power routing.
    #[serde(default)]
    pub device: DeviceClass,
    /// Power draw while busy, in watts (measured with NVML, or configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watts: Option<f64>,
    /// Serve only accounts in one of these hub groups; empty means everyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Moderation the provider requires of the hub.
    #[serde(default)]
    pub moderation: Moderation,
}

impl ProviderProfile {
    fn check(&self) -> Result<(), ControlError> {
        if let Some(w) = self.watts {
            if !(w.is_finite() && w > 0.0 && w <= MAX_DECLARED_WATTS) {
                return Err(ControlError::BadProfile("watts out of range"));
            }
        }
        if self.groups.len() > MAX_PROVIDER_GROUPS {
            return Err(ControlError::BadProfile("too many groups"));
        }
        if self.groups.iter().any(|g| {
            g.is_empty() || g.len() > MAX_GROUP_NAME_BYTES || crate::text::has_unprintable(g)
        }) {
            return Err(ControlError::BadProfile("bad group name"));
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}

/// A message from the agent to the hub on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentEvent {
    /// First message: who the agent is and what it serves.
    Hello {
        /// The agent's [`PROTOCOL_VERSION`].
        protocol: u32,
        /// The agent's software version, for the operator's eyes.
        agent_version: String,
        /// Models served now.
        models: Vec<ModelOffer>,
        /// Most requests the agent accepts at once, over all models.
        max_concurrency: u32,
        /// Device, power, audience and moderation requirement.
        #[serde(default)]
        profile: ProviderProfile,
        /// False while the agent drains (outside its schedule, paused, or the machine is
        /// busy): the hub routes nothing new to it.
        #[serde(default = "yes")]
        accepting: bool,
    },
    /// The offer, the profile or the accepting state changed.
    Models {
        /// Models served now (may be empty: route nothing).
        models: Vec<ModelOffer>,
        /// Most requests the agent accepts at once, over all models.
        max_concurrency: u32,
        /// Device, power, audience and moderation requirement.
        #[serde(default)]
        profile: ProviderProfile,
        /// See [`AgentEvent::Hello`].
        #[serde(default = "yes")]
        accepting: bool,
    },
    /// Energy one finished request used: busy watts × its share of the busy time.
    Energy {
        /// The hub's request id.
        request_id: String,
        /// The public model name.
        model: ModelName,
        /// Millijoules.
        millijoules: u64,
    },
}

/// A message from the hub to the agent, in a batch `POST`ed to [`EVENTS_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubEvent {
    /// A signed receipt for one request this provider served.
    Receipt(crate::receipt::SignedReceipt),
    /// Receipts signed together, for requests this provider served (only to an agent
    /// that announced [`FEATURE_RECEIPT_BATCHES`]).
    ReceiptBatch(crate::receipt::ReceiptBatch),
    /// The hub will not route this model to the agent; the reason is for its log.
    ModelRefused {
        /// The model.
        model: ModelName,
        /// Why (for example: its hash is not on the hub's allow-list).
        reason: String,
    },
}

impl HubEvent {
    /// Encode as one line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Decode one line (without its newline).
    pub fn decode(line: &[u8]) -> Result<Self, ControlError> {
        if line.len() > MAX_CONTROL_LINE_BYTES {
            return Err(ControlError::TooLong);
        }
        if let Some(r) = untagged(line, br#"{"type":"receipt","#) {
            return Ok(HubEvent::Receipt(r));
        }
        if let Some(b) = untagged(line, br#"{"type":"receipt_batch","#) {
            return Ok(HubEvent::ReceiptBatch(b));
        }
        Ok(serde_json::from_slice(line)?)
    }
}

/// A line as [`HubEvent::encode`] writes it (the tag first), read straight into its
/// variant's content: serde's tagged-enum path buffers every field into an intermediate
/// tree first, which was 6 % of the agent's CPU at 64 requests in flight. `None` for any
/// other shape, which then takes the general path.
fn untagged<T: serde::de::DeserializeOwned>(line: &[u8], tag: &[u8]) -> Option<T> {
    let rest = line.strip_prefix(tag)?;
    let mut object = Vec::with_capacity(rest.len() + 1);
    object.push(b'{');
    object.extend_from_slice(rest);
    serde_json::from_slice(&object).ok()
}

impl From<serde_json::Error> for ControlError {
    fn from(e: serde_json::Error) -> Self {
        use serde_json::error::Category;
        Self::Malformed {
            kind: match e.classify() {
                Category::Io => "I/O",
                Category::Syntax => "syntax",
                Category::Data => "data",
                Category::Eof => "end of input",
            },
            line: e.line(),
            column: e.column(),
        }
    }
}

/// Why a control line was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Over [`MAX_CONTROL_LINE_BYTES`].
    #[error("control line longer than {MAX_CONTROL_LINE_BYTES} bytes")]
    TooLong,
    /// Not a valid event. Only where it went wrong is kept: the parser's own message can
    /// quote the peer's text (an unknown tag, with newlines and terminal escapes in it),
    /// and this error is logged.
    #[error("malformed control event ({kind} error at line {line}, column {column})")]
    Malformed {
        /// Syntax, data, end of input, or I/O.
        kind: &'static str,
        /// Where (1-based).
        line: usize,
        /// Where (1-based).
        column: usize,
    },
    /// A text field with a control character (a newline or a terminal escape, which
    /// would forge or hide lines where it is logged or shown).
    #[error("text field with a control character")]
    ControlCharacter,
    /// Over [`MAX_MODELS_PER_AGENT`].
    #[error("more than {MAX_MODELS_PER_AGENT} models offered")]
    TooManyModels,
    /// Zero or over [`MAX_ANNOUNCED_CONCURRENCY`].
    #[error("max_concurrency must be between 1 and {MAX_ANNOUNCED_CONCURRENCY}")]
    BadConcurrency,
    /// A profile field out of its limits.
    #[error("bad provider profile: {0}")]
    BadProfile(&'static str),
    /// A text field over [`MAX_SHORT_TEXT_BYTES`].
    #[error("text field longer than {MAX_SHORT_TEXT_BYTES} bytes")]
    TextTooLong,
    /// A model's capabilities out of their limits (a zero or huge context length).
    #[error(
        "bad model capabilities: context_length must be 1 to {}",
        crate::caps::MAX_ANNOUNCED_CONTEXT
    )]
    BadCapabilities,
}

impl AgentEvent {
    /// Encode as one line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Decode one line (without its newline) and check the limits.
    pub fn decode(line: &[u8]) -> Result<Self, ControlError> {
        if line.len() > MAX_CONTROL_LINE_BYTES {
            return Err(ControlError::TooLong);
        }
        let ev: AgentEvent = serde_json::from_slice(line)?;
        if let AgentEvent::Hello { agent_version, .. } = &ev {
            if agent_version.len() > MAX_SHORT_TEXT_BYTES {
                return Err(ControlError::TextTooLong);
            }
            if crate::text::has_unprintable(agent_version) {
                return Err(ControlError::ControlCharacter);
            }
        }
        let (models, conc, profile) = match &ev {
            AgentEvent::Hello {
                models,
                max_concurrency,
                profile,
                ..
            }
            | AgentEvent::Models {
                models,
                max_concurrency,
                profile,
                ..
            } => (models, *max_concurrency, profile),
            AgentEvent::Energy { request_id, .. } => {
                if request_id.len() > MAX_SHORT_TEXT_BYTES {
                    return Err(ControlError::TextTooLong);
                }
                return Ok(ev);
            }
        };
        if models.len() > MAX_MODELS_PER_AGENT {
            return Err(ControlError::TooManyModels);
        }
        let bad = |c: u32| c == 0 || c > MAX_ANNOUNCED_CONCURRENCY;
        if bad(conc) || models.iter().any(|m| m.max_concurrency.is_some_and(bad)) {
            return Err(ControlError::BadConcurrency);
        }
        if models.iter().any(|m| !m.capabilities.is_valid()) {
            return Err(ControlError::BadCapabilities);
        }
        profile.check()?;
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's text never reaches the error (which is logged): an unknown tag with a
    /// forged log line and a terminal escape in it, or an agent version with a newline.
    #[test]
    fn a_refused_line_quotes_none_of_the_peers_text() {
        let forged = br#"{"type":"x
2026-12-06T00:00:00Z INFO forged line[2K"}"#;
        for e in [
            AgentEvent::decode(forged).unwrap_err(),
            HubEvent::decode(forged).unwrap_err(),
        ] {
            let text = e.to_string();
            assert!(
                !text.contains("forged") && !text.chars().any(char::is_control),
                "{text}"
            );
        }
        let hello = AgentEvent::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: "1.0\n2026 INFO forged".into(),
            models: vec![],
            max_concurrency: 1,
            profile: ProviderProfile::default(),
            accepting: true,
        };
        let line = hello.encode();
        assert!(matches!(
            AgentEvent::decode(&line[..line.len() - 1]),
            Err(ControlError::ControlCharacter)
        ));
    }

    /// A hostile provider names its model, its groups or its version with a bidirectional
    /// override or an invisible character, to spoof what the hub's pages show (a model
    /// that reads as another, a name that reverses the text after it): the hello is
    /// refused whole. Before, only control characters were.
    #[test]
    fn a_hello_whose_names_are_not_shown_as_themselves_is_refused() {
        let hello = |model: &str, group: &str, version: &str| {
            let profile = ProviderProfile {
                groups: vec![group.to_owned()],
                ..ProviderProfile::default()
            };
            let line = serde_json::json!({
                "type": "hello", "protocol": PROTOCOL_VERSION, "agent_version": version,
                "models": [{"id": model}], "max_concurrency": 1,
                "profile": profile, "accepting": true,
            });
            AgentEvent::decode(line.to_string().as_bytes())
        };
        assert!(hello("smollm2", "lab", "1.0").is_ok());
        for bad in [
            "gpt\u{202E}o4-tpg",
            "smol\u{200B}lm2",
            "\u{FEFF}smollm2",
            "a\u{2066}b",
        ] {
            assert!(hello(bad, "lab", "1.0").is_err(), "model {bad:?}");
            assert!(hello("smollm2", bad, "1.0").is_err(), "group {bad:?}");
            assert!(hello("smollm2", "lab", bad).is_err(), "version {bad:?}");
        }
    }

    use proptest::prelude::*;

    fn offer(s: &str) -> ModelOffer {
        ModelOffer::named(ModelName::parse(s).unwrap())
    }

    /// `covers` is "checks at least the sides required", `with` the union, for all 16
    /// pairs.
    #[test]
    fn moderation_covers_and_unions_side_by_side() {
        use Moderation::*;
        let all = [None, Input, Output, Both];
        for a in all {
            assert_eq!(Moderation::of(a.input(), a.output()), a);
            for b in all {
                let covers = (a.input() || !b.input()) && (a.output() || !b.output());
                assert_eq!(a.covers(b), covers, "{a:?} covers {b:?}");
                assert!(a.with(b).covers(a) && a.with(b).covers(b));
                assert_eq!(
                    a.with(b).sides(),
                    u8::from(a.input() || b.input()) + u8::from(a.output() || b.output())
                );
            }
        }
        assert!(None.covers(None) && !None.covers(Input) && Both.covers(Output));
        assert!(!Input.covers(Output) && !Output.covers(Both));
    }

    /// The receipt fast path reads what the general path reads, and nothing it refuses.
    #[test]
    fn receipt_lines_decode_the_same_either_way() {
        use crate::receipt::{Receipt, SignedReceipt};
        let key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let receipts: Vec<Receipt> = (0..3)
            .map(|i| Receipt {
                request_id: format!("req-{i}"),
                time_ms: 1_700_000_000_000 + i,
                consumer: "c-\"quoted\"".into(),
                ..Receipt::example()
            })
            .collect();
        let whole = crate::receipt::ReceiptBatch::sign(receipts.clone(), &key).unwrap();
        let events = SignedReceipt::sign_batch(receipts, &key)
            .into_iter()
            .map(HubEvent::Receipt)
            .chain([HubEvent::ReceiptBatch(whole)]);
        for ev in events {
            let line = ev.encode();
            let line = &line[..line.len() - 1];
            let fast = match ev {
                HubEvent::Receipt(_) => {
                    untagged::<SignedReceipt>(line, br#"{"type":"receipt","#).is_some()
                }
                _ => untagged::<crate::receipt::ReceiptBatch>(line, br#"{"type":"receipt_batch","#)
                    .is_some(),
            };
            assert!(fast, "fast path taken");
            let general: HubEvent = serde_json::from_slice(line).unwrap();
            assert_eq!(HubEvent::decode(line).unwrap(), general);
            assert_eq!(general, ev);
        }
        // Other shapes: the general path, with its answers.
        let refused = HubEvent::ModelRefused {
            model: ModelName::parse("m").unwrap(),
            reason: "not allowed".into(),
        };
        let line = refused.encode();
        assert_eq!(HubEvent::decode(&line[..line.len() - 1]).unwrap(), refused);
        for bad in [
            &br#"{"type":"receipt","#[..],
            br#"{"type":"receipt","receipt":{}}"#,
            br#"{"type":"receipt"}"#,
            br#"{"type":"receipt_batch","receipts":[]}"#,
            br#"{"type":"receipt_batch","signature":"00","receipts":{}}"#,
            br#"{"type":"nonsense"}"#,
        ] {
            assert!(
                HubEvent::decode(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b' '; MAX_CONTROL_LINE_BYTES + 1];
        assert!(matches!(
            HubEvent::decode(&long),
            Err(ControlError::TooLong)
        ));
    }

    #[test]
    fn hello_round_trip() {
        let ev = AgentEvent::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            models: vec![
                offer("a"),
                ModelOffer {
                    capabilities: ModelCapabilities {
                        tools: Some(true),
                        vision: Some(false),
                        embeddings: None,
                        context_length: Some(8192),
                    },
                    ..offer("b")
                },
            ],
            max_concurrency: 4,
            profile: ProviderProfile {
                device: DeviceClass::Npu,
                watts: Some(12.5),
                groups: vec!["friends".into()],
                moderation: Moderation::Both,
            },
            accepting: false,
        };
        let line = ev.encode();
        assert_eq!(*line.last().unwrap(), b'\n');
        let back = AgentEvent::decode(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn limits_enforced() {
        let ev = AgentEvent::Models {
            models: vec![],
            max_concurrency: 0,
            profile: ProviderProfile::default(),
            accepting: true,
        };
        let line = ev.encode();
        assert!(matches!(
            AgentEvent::decode(&line[..line.len() - 1]),
            Err(ControlError::BadConcurrency)
        ));
        let many = AgentEvent::Models {
            models: (0..=MAX_MODELS_PER_AGENT)
                .map(|i| offer(&format!("m{i}")))
                .collect(),
            max_concurrency: 1,
            profile: ProviderProfile::default(),
            accepting: true,
        };
        let line = many.encode();
        assert!(matches!(
            AgentEvent::decode(&line[..line.len() - 1]),
            Err(ControlError::TooManyModels)
        ));
        assert!(matches!(
            AgentEvent::decode(b"{\"type\":\"nope\"}"),
            Err(ControlError::Malformed { .. })
        ));
        assert!(matches!(
            AgentEvent::decode(&vec![b' '; MAX_CONTROL_LINE_BYTES + 1]),
            Err(ControlError::TooLong)
        ));
        let old_agent = br#"{"type":"models","models":[{"id":"m"}],"max_concurrency":1}"#;
        match AgentEvent::decode(old_agent).unwrap() {
            AgentEvent::Models {
                accepting,
                profile,
                models,
                ..
            } => {
                assert!(accepting);
                assert_eq!(profile, ProviderProfile::default());
                assert!(models[0].capabilities.is_unknown());
            }
            other => panic!("{other:?}"),
        }
        let bad_watts =
            br#"{"type":"models","models":[],"max_concurrency":1,"profile":{"watts":-1}}"#;
        assert!(matches!(
            AgentEvent::decode(bad_watts),
            Err(ControlError::BadProfile(_))
        ));
        let bad_hash =
            br#"{"type":"models","models":[{"id":"m","sha256":"abc"}],"max_concurrency":1}"#;
        assert!(matches!(
            AgentEvent::decode(bad_hash),
            Err(ControlError::Malformed { .. })
        ));
        let bad_ctx = br#"{"type":"models","models":[{"id":"m","capabilities":{"context_length":0}}],"max_concurrency":1}"#;
        assert!(matches!(
            AgentEvent::decode(bad_ctx),
            Err(ControlError::BadCapabilities)
        ));
        let bad_cap = br#"{"type":"models","models":[{"id":"m","capabilities":{"tools":"yes"}}],"max_concurrency":1}"#;
        assert!(matches!(
            AgentEvent::decode(bad_cap),
            Err(ControlError::Malformed { .. })
        ));
        let bad_name = br#"{"type":"models","models":[{"id":""}],"max_concurrency":1}"#;
        assert!(matches!(
            AgentEvent::decode(bad_name),
            Err(ControlError::Malformed { .. })
        ));
    }

    proptest! {
        #[test]
        fn models_round_trip(names in proptest::collection::vec("[a-zA-Z0-9._:/-]{1,40}", 0..20), conc in 1u32..=MAX_ANNOUNCED_CONCURRENCY) {
            let ev = AgentEvent::Models { models: names.iter().map(|n| offer(n)).collect(), max_concurrency: conc, profile: ProviderProfile::default(), accepting: true };
            let line = ev.encode();
            prop_assert_eq!(AgentEvent::decode(&line[..line.len() - 1]).unwrap(), ev);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = AgentEvent::decode(&bytes);
        }
    }
}
