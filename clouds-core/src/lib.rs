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
//! - [`monitor`]: [`Monitor`] and [`RegistrySnapshot`]: who serves what, each server's
//!   per-method figures ([`ServerStats`]), and joins and leaves as announced
//!   ([`RegistryEvents`]).
//! - [`service`]: [`Service`] and [`Route`]: what a server runs.
//! - [`context`]: [`CallContext`]: the call a handler serves (method, caller, deadline,
//!   attempt, [`TraceContext`]), read from inside the handler.
//! - [`message`]: [`Message`] and [`Messages`].
//! - [`error`]: [`Error`], [`RemoteError`] and [`StreamBreak`].
//! - [`Streaming`] and [`ItemStream`]: streaming methods, the provider's and the caller's
//!   end (`stream`).
//!
//! - `testing` (feature `testing`): the in-memory broker and fault injection.
//!
//! Underneath, one concept per module:
//! - `node`: a node's identity and its receive loop, which routes every frame; it owns the
//!   parts below and hands each to the module that uses it.
//! - `transport`: the seam to the broker (`Transport`, statically dispatched through `Wire`),
//!   with `transport::redis` (standalone Redis, the registry's Lua scripts) and
//!   `transport::memory` (the in-memory broker).
//! - `envelope` (the frames) and `codec` (frames and values to bytes and back); `claim`:
//!   large bodies stored in Redis keys while a small claim frame points at them, fetched by
//!   the receiver within its fetch budget.
//! - `namespace`: key and channel names (and the peers' channel names, built once each);
//!   `registry`: what a registry entry says and the join/leave announcements; `acl`: the
//!   Redis ACL rule that confines a user to those names ([`Config::acl_rule`]).
//! - `outbox`: natural batching: frames for one destination coalesced into one `PUBLISH`
//!   while one to it is outstanding (no timers); the receive loop splits batches it gets.
//! - `caller`: the caller side of a node (pending calls, provider cache, byte budget);
//!   `attempt`: one call's retry policy as a plain state machine; `balance`: the provider
//!   cache and the choice of provider; `pending`: calls awaiting replies, and open streams
//!   by call id.
//! - `dispatch`: the server side of a call, without I/O (handlers start on the receive loop
//!   and move to a task of their own only if they wait; a table of those, by caller and call
//!   id, lets a caller's Cancel frame drop them); `heartbeat`: keeping the registry
//!   entry alive; `shutdown`: a node's background tasks and closing it once, completely.
//! - `once`: exactly-once calls (methods marked once): the record in Redis each call gets
//!   before it runs, its lease, and the stored result retries get.
//! - `signing`: signed frames (opt-in, [`Config::signing_key`]): the HMAC-SHA256 tag bound to
//!   the channel, key ids for rotation, and the replay guard; it wraps the frames `codec`
//!   makes and unwraps them before `codec` reads them.
//! - `spans`: the `tracing` spans of attempts and handlers, and the trace context a call
//!   carries (with the `opentelemetry` feature, the caller's span context).
//! - `yielding`: `yield_once`, the one way clouds yields to the runtime (the outbox's
//!   gathering, a spawned handler's start).
//! - `stats`: counters of bad input and load; `meter`: each method's figures (counters and a
//!   latency histogram) and the summary the heartbeat publishes; `telemetry`: the same
//!   figures through the `metrics` facade (feature `metrics`); `locks`: poison-tolerant
//!   locking.
//! - `stream`: streaming methods: the caller's and the provider's credit and sequence logic
//!   as plain state machines (`Inflow`, `Outflow`), the provider's driver of one stream,
//!   and the caller's `ItemStream` (`docs/protocol.md` §3.14).
//! - `codegen`: what the macro's expansion calls (hidden: not a stable API).
//!
//! The wire protocol and Redis layout are specified in `docs/protocol.md`.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod acl;
mod attempt;
mod balance;
mod caller;
mod claim;
pub mod client;
mod codec;
#[doc(hidden)]
pub mod codegen;
pub mod config;
pub mod context;
mod dispatch;
mod envelope;
pub mod error;
mod heartbeat;
mod locks;
pub mod message;
mod meter;
pub mod monitor;
mod namespace;
mod node;
mod node_id;
mod once;
mod outbox;
mod pending;
mod registry;
pub mod server;
pub mod service;
mod shutdown;
mod signing;
mod spans;
#[cfg(test)]
mod spec_tests;
mod stats;
mod stream;
mod telemetry;
#[cfg(any(test, feature = "testing"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
#[cfg(test)]
mod tests;
mod transport;
mod yielding;

pub use client::Client;
pub use config::{Balance, Config};
pub use context::{CallContext, TraceContext};
pub use error::{Error, RemoteError, StreamBreak};
pub use message::{Message, Messages};
pub use monitor::{
    ErrorCounts, Latency, MethodStats, Monitor, RegistryEvent, RegistryEvents, RegistrySnapshot,
    ServerStats,
};
pub use node_id::NodeId;
pub use registry::ServerInfo;
pub use server::Server;
pub use service::{Route, Service};
pub use stats::Stats;
pub use stream::{ItemStream, Streaming};
pub use transport::TransportError;

/// The protocol version this build speaks (the first byte of every frame).
pub const PROTOCOL_VERSION: u8 = codec::VERSION;
