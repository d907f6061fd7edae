//! The runtime of [clouds](https://docs.rs/clouds): typed remote services over Redis.
//!
//! Use it through the `clouds` crate, which adds the `#[clouds::service]` macro.
//!
//! # Layout
//!
//! The public face:
//! - [`config`]: [`Config`], one for every node of a deployment; [`Balance`].
//! - [`server`]: [`Server`]: registers methods, heartbeats, shuts down gracefully.
//! - [`client`]: [`Client`]: calls with retries and failover, node-to-node messages.
//! - [`monitor`]: [`Monitor`] and [`RegistrySnapshot`]: who serves what.
//! - [`service`]: [`Service`] and [`Route`]: what a server runs.
//! - [`message`]: [`Message`] and [`Messages`].
//! - [`error`]: [`Error`] and [`RemoteError`].
//!
//! Underneath, one concept per module:
//! - `node`: a node's identity, connections and receive loop, which routes every frame.
//! - `envelope` (the frames) and `codec` (frames and values to bytes and back).
//! - `namespace`: key and channel names (and the peers' channel names, built once each);
//!   `registry`: the heartbeat registry's Lua scripts.
//! - `balance`: the provider cache and the choice of provider; `pending`: calls awaiting replies.
//! - `stats`: counters of bad input and load; `locks`: poison-tolerant locking.
//! - `dispatch`: the server side of a call (handlers start on the receive loop and move to a
//!   task of their own only if they wait); `heartbeat`: keeping the registry entry alive.
//! - [`codegen`]: what the macro's expansion calls.
//!
//! The wire protocol and Redis layout are specified in `docs/protocol.md`.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod balance;
pub mod client;
mod codec;
pub mod codegen;
pub mod config;
mod dispatch;
mod envelope;
pub mod error;
mod heartbeat;
mod locks;
pub mod message;
pub mod monitor;
mod namespace;
mod node;
mod node_id;
mod pending;
mod registry;
pub mod server;
pub mod service;
#[cfg(test)]
mod spec_tests;
mod stats;
#[cfg(any(test, feature = "testing"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
#[cfg(test)]
mod tests;
mod transport;

pub use client::Client;
pub use config::{Balance, Config};
pub use error::{Error, RemoteError};
pub use message::{Message, Messages};
pub use monitor::{Monitor, RegistrySnapshot};
pub use node_id::NodeId;
pub use registry::ServerInfo;
pub use server::Server;
pub use service::{Route, Service};
pub use stats::Stats;
pub use transport::TransportError;

/// The protocol version this build speaks (the first byte of every frame).
pub const PROTOCOL_VERSION: u8 = codec::VERSION;
