//! Wire types shared by the hub, the agent and the clients: OpenAI error bodies and the
//! few request fields the hub reads, the tunnel's handshake constants and control
//! messages, and the admin API's bodies. No IO, no async runtime.

pub mod admin;
pub mod endpoint;
pub mod openai;
pub mod receipt;
pub mod tunnel;

pub use endpoint::InferenceEndpoint;
pub use openai::{ErrorBody, ErrorObject, ModelName};
