//! Wire types shared by the hub, the agent and the clients: OpenAI error bodies, the
//! request rules the hub and the agent share, the tunnel's handshake constants and control
//! messages, and the admin API's bodies. No IO, no async runtime.

pub mod admin;
pub mod caps;
pub mod endpoint;
pub mod openai;
pub mod pool;
pub mod receipt;
pub mod request;
pub mod text;
pub mod tunnel;
pub mod usage;

pub use caps::{Capability, ModelCapabilities};
pub use endpoint::InferenceEndpoint;
pub use openai::{ErrorBody, ErrorObject, ModelName};
pub use request::{EmbeddingEncoding, InferenceRequest, ModelLimits, RequestError, RequestLimits};
