//! The Redis transport of [clouds](https://docs.rs/clouds): everything that touches a Redis
//! connection lives here, so the runtime in `clouds-core` only sees frames, channels and scripts.
//!
//! # Layout
//!
//! - [`endpoint`]: where Redis is (one server or a cluster's seed nodes, db, credentials) and
//!   how to talk to it ([`TransportOptions`]: timeouts, reconnect policy, inbound buffer).
//! - [`transport`]: [`Transport`], one node's pair of connections: a command connection (PUBLISH,
//!   scripts, reads) and a subscriber connection that re-subscribes after every reconnect.
//!   Its `publish`/`subscribe`/`unsubscribe` methods are the single pub/sub seam: on a Redis
//!   Cluster they use sharded pub/sub (SPUBLISH/SSUBSCRIBE), and `subscribers`/`resubscribe`
//!   let the runtime heal the sharded subscriptions a moved slot ends silently.
//! - [`channel`]: [`Channel`], a channel name shared by reference count, so publishing to
//!   and receiving from the same channels allocates no copies of their names.
//! - [`inbound`]: [`Inbound`], the receive side of the subscriber connection, which turns the
//!   broadcast channel's lag into a counted event instead of a silent stop.
//! - [`registry`]: [`Registry`], the heartbeat registry's keys and Lua scripts (sorted sets
//!   and hashes under one hash tag, expiry on Redis's clock, per-method generations so an
//!   unchanged list is not read again); the scripts publish join and leave frames themselves.
//! - [`once`]: the two scripts of exactly-once calls (set unless set, swap if unchanged),
//!   as methods of [`Transport`].
//! - [`script`]: [`Script`] (Lua run with EVALSHA, reloaded after a Redis restart) and
//!   [`ScriptValue`], the reply shape the registry reads.
//! - [`error`]: [`TransportError`], which carries no fred type.
//! - `tls` (with the `tls` feature): the rustls configuration of a `rediss://` endpoint
//!   (ring provider; system trust store or a given CA; optional client certificate).
//!
//! No fred type appears in this crate's public API.

pub mod channel;
pub mod endpoint;
pub mod error;
pub mod inbound;
pub mod once;
pub mod registry;
pub mod script;
#[cfg(feature = "tls")]
mod tls;
pub mod transport;

pub use channel::Channel;
pub use endpoint::{Endpoint, TransportOptions};
pub use error::TransportError;
pub use inbound::{Delivery, Inbound};
pub use registry::{Beat, Lookup, Registry};
pub use script::{Script, ScriptValue};
pub use transport::{Reconnects, Transport};
