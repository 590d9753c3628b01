//! The agent-to-hub carrier.
//!
//! The agent dials out (TCP, plus TLS through rustls for `https` hubs), sends an
//! authenticated HTTP/1.1 `Upgrade:` request, and once the hub answers `101` the bytes
//! carry HTTP/2 with the roles reversed: the hub is the client, the agent the server.
//! This crate owns dialing, the upgrade handshake and the HTTP/2 settings of both ends.
//! It knows nothing of accounts, credits or models.

pub mod client;
pub mod coalesce;
pub mod dial;
pub mod settings;
pub mod upgrade;

pub use client::{SendError, TunnelBody, TunnelClient, TunnelConnection};
pub use dial::{dial, BoxIo, DialError, HubUrl};
pub use upgrade::{upgrade, Carrier, TunnelError, UpgradeCarrier};
