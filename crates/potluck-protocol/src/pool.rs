//! What consumers read about the pool: `GET /v1/models` (OpenAI's model objects, with the
//! pool's facts added) and `GET /v1/pool` (capacity per model and per provider). Typed
//! once here, written by the hub and read by tests and tools.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::tunnel::{DeviceClass, Moderation};

/// OpenAI's list envelope: `{"object": "list", "data": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct List<T> {
    /// Always `list`.
    pub object: String,
    /// The items.
    pub data: Vec<T>,
}

impl<T> List<T> {
    /// A list of `data`.
    pub fn new(data: Vec<T>) -> Self {
        Self {
            object: "list".to_owned(),
            data,
        }
    }
}

/// One model as `GET /v1/models` shows it: OpenAI's fields, then the pool's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelObject {
    /// The model's name.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Always 0 (the pool has no creation date).
    pub created: u64,
    /// Always `potluck`.
    pub owned_by: String,
    /// Distinct providers serving it now.
    pub providers: usize,
    /// The model files serving it (SHA-256), as announced.
    pub sha256: BTreeSet<String>,
    /// The largest `max_tokens` a provider accepts (`None`: no cap announced).
    pub max_tokens: Option<u32>,
    /// What providers online announced it can do (`tools`, `vision`, `embeddings`);
    /// plain chat is always possible.
    pub capabilities: BTreeSet<String>,
    /// The largest context window announced, in tokens.
    pub context_length: Option<u32>,
}

/// One model as `GET /v1/pool` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolEntry {
    /// The model's name.
    pub model: String,
    /// Distinct providers serving it.
    pub providers: usize,
    /// Slots over all its tunnels.
    pub capacity: u32,
    /// Requests in flight on those tunnels.
    pub in_flight: u32,
    /// Requests waiting for it.
    pub queued: usize,
    /// Typical duration of a request for it, in ms (`None` before the first).
    pub avg_duration_ms: Option<u64>,
    /// The model files serving it (SHA-256).
    pub sha256: BTreeSet<String>,
    /// Each provider of it.
    pub by_provider: Vec<ProviderView>,
}

/// One provider of one model, for `GET /v1/pool`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderView {
    /// The provider's name.
    pub provider: String,
    /// Device class.
    pub device: DeviceClass,
    /// Declared or measured busy power.
    pub watts: Option<f64>,
    /// Measured energy per 1,000 tokens (since the hub started).
    pub wh_per_1k_tokens: Option<f64>,
    /// Taking new requests (not draining).
    pub accepting: bool,
    /// The model file's hash.
    pub sha256: Option<String>,
    /// Restricted to these hub groups (empty: everyone).
    pub groups: Vec<String>,
    /// Moderation the provider requires.
    pub moderation: Moderation,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_list_has_openais_shape() {
        let list = List::new(vec![ModelObject {
            id: "m".into(),
            object: "model".into(),
            created: 0,
            owned_by: "potluck".into(),
            providers: 1,
            sha256: BTreeSet::new(),
            max_tokens: None,
            capabilities: ["tools".to_owned()].into(),
            context_length: Some(4096),
        }]);
        let v = serde_json::to_value(&list).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["object"], "model");
        assert_eq!(v["data"][0]["capabilities"][0], "tools");
        let back: List<ModelObject> = serde_json::from_value(v).unwrap();
        assert_eq!(back, list);
    }
}
