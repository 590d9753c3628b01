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
//!    [`HEADER_REQUEST_ID`] set by the hub.

use serde::{Deserialize, Serialize};

use crate::openai::ModelName;

/// Version of this tunnel protocol. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
/// Path the agent upgrades on.
pub const TUNNEL_PATH: &str = "/v1/tunnel";
/// The `Upgrade:` token.
pub const UPGRADE_PROTOCOL: &str = "potluck-tunnel/1";
/// Request header carrying the agent's [`PROTOCOL_VERSION`].
pub const HEADER_PROTOCOL_VERSION: &str = "x-potluck-protocol";
/// Path of the control stream, opened by the hub over HTTP/2.
pub const CONTROL_PATH: &str = "/_potluck/control";
/// Header on tunneled requests: the model the hub routed for.
pub const HEADER_MODEL: &str = "x-potluck-model";
/// Header on tunneled requests: the hub's request id (random; says nothing of the consumer).
pub const HEADER_REQUEST_ID: &str = "x-potluck-request-id";
/// Response header the agent sets on errors it produced itself (not the backend's).
pub const HEADER_AGENT_ERROR: &str = "x-potluck-agent-error";

/// Longest control line (one JSON event plus newline).
pub const MAX_CONTROL_LINE_BYTES: usize = 256 * 1024;
/// Most models one agent may offer.
pub const MAX_MODELS_PER_AGENT: usize = 512;
/// Largest concurrency an agent may announce (per model or in total).
pub const MAX_ANNOUNCED_CONCURRENCY: u32 = 16_384;

/// One model an agent offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelOffer {
    /// The public model name consumers ask for.
    pub id: ModelName,
}

/// A message from the agent to the hub on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    },
    /// The set of models or the capacity changed (after discovery, a backend failure, ...).
    Models {
        /// Models served now (may be empty: route nothing).
        models: Vec<ModelOffer>,
        /// Most requests the agent accepts at once, over all models.
        max_concurrency: u32,
    },
}

/// Why a control line was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Over [`MAX_CONTROL_LINE_BYTES`].
    #[error("control line longer than {MAX_CONTROL_LINE_BYTES} bytes")]
    TooLong,
    /// Not a valid event.
    #[error("malformed control event: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Over [`MAX_MODELS_PER_AGENT`].
    #[error("more than {MAX_MODELS_PER_AGENT} models offered")]
    TooManyModels,
    /// Zero or over [`MAX_ANNOUNCED_CONCURRENCY`].
    #[error("max_concurrency must be between 1 and {MAX_ANNOUNCED_CONCURRENCY}")]
    BadConcurrency,
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
        let (models, conc) = match &ev {
            AgentEvent::Hello {
                models,
                max_concurrency,
                ..
            } => (models, *max_concurrency),
            AgentEvent::Models {
                models,
                max_concurrency,
            } => (models, *max_concurrency),
        };
        if models.len() > MAX_MODELS_PER_AGENT {
            return Err(ControlError::TooManyModels);
        }
        if conc == 0 || conc > MAX_ANNOUNCED_CONCURRENCY {
            return Err(ControlError::BadConcurrency);
        }
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn offer(s: &str) -> ModelOffer {
        ModelOffer {
            id: ModelName::parse(s).unwrap(),
        }
    }

    #[test]
    fn hello_round_trip() {
        let ev = AgentEvent::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            models: vec![offer("a"), offer("b")],
            max_concurrency: 4,
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
        };
        let line = many.encode();
        assert!(matches!(
            AgentEvent::decode(&line[..line.len() - 1]),
            Err(ControlError::TooManyModels)
        ));
        assert!(matches!(
            AgentEvent::decode(b"{\"type\":\"nope\"}"),
            Err(ControlError::Malformed(_))
        ));
        assert!(matches!(
            AgentEvent::decode(&vec![b' '; MAX_CONTROL_LINE_BYTES + 1]),
            Err(ControlError::TooLong)
        ));
        let bad_name = br#"{"type":"models","models":[{"id":""}],"max_concurrency":1}"#;
        assert!(matches!(
            AgentEvent::decode(bad_name),
            Err(ControlError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn models_round_trip(names in proptest::collection::vec("[a-zA-Z0-9._:/-]{1,40}", 0..20), conc in 1u32..=MAX_ANNOUNCED_CONCURRENCY) {
            let ev = AgentEvent::Models { models: names.iter().map(|n| offer(n)).collect(), max_concurrency: conc };
            let line = ev.encode();
            prop_assert_eq!(AgentEvent::decode(&line[..line.len() - 1]).unwrap(), ev);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = AgentEvent::decode(&bytes);
        }
    }
}
