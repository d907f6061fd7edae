//! The seam between the runtime and the wire: everything a node needs from a broker.
//!
//! A node needs few things from the wire, and [`Transport`] names exactly those:
//! - pub/sub: publish a frame to a channel and learn how many subscribers received it (0 means
//!   certainly nobody: the call did not run and can be re-routed), subscribe and unsubscribe,
//!   the ordered stream of inbound frames ([`Inbound`]) and the recovery events after a lost
//!   connection ([`Reconnects`]);
//! - the registry: write a server's entry with its TTL ([`Entry`]), remove it, read the live
//!   providers of methods and the live servers with their info, purging the expired on the way.
//!   Each method's providers have a generation that every change moves on, so a caller that
//!   holds the current one is told so ([`Lookup::Unchanged`]) without the list being read;
//! - claims: store a large body under a key with an expiry ([`Transport::put`]), take it in
//!   one step ([`Transport::take`], `GETDEL`), delete one nobody will take.
//!
//! Join and leave announcements are ordinary frames on the events channel, published by the
//! registry operations themselves, in the same step as the change they announce: a beat that
//! adds a server to a method publishes its join frame, a deregistration its leave frame. Two
//! implementations sit behind it:
//! - [`redis`]: Redis, standalone or Cluster, over the `clouds-redis` connections (classic or
//!   sharded pub/sub; Lua scripts on Redis's own clock, every registry key in one hash tag);
//! - [`memory`]: an in-process broker with the same observable behaviour on tokio's clock, with
//!   faults a test can inject (`clouds::testing`).
//!
//! The runtime holds a [`Wire`], an enum of the two: every call is a `match`, not a boxed trait
//! object, so the hot path stays statically dispatched. Redis Cluster is not a variant of its
//! own: the same connections switch to sharded pub/sub (`clouds-redis` chooses the commands),
//! and the runtime only learns that subscriptions may be lost silently
//! ([`Transport::may_lose_subscriptions`]).

#[cfg(any(test, feature = "testing"))]
pub(crate) mod memory;
pub(crate) mod redis;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
pub(crate) use clouds_redis::Channel;

use crate::namespace::Names;
use crate::node_id::NodeId;

/// What the runtime needs from a broker. See the module docs.
pub(crate) trait Transport: Send + Sync + Sized {
    /// Publishes `frame` on `channel`, bounded by the command timeout; resolves to how many
    /// subscribers received it.
    fn publish(
        &self,
        channel: Channel,
        frame: Bytes,
    ) -> impl Future<Output = Result<u64, TransportError>> + Send;

    /// [`Transport::publish`] for a caller that bounds the wait itself (one timer less).
    fn publish_untimed(
        &self,
        channel: Channel,
        frame: Bytes,
    ) -> impl Future<Output = Result<u64, TransportError>> + Send;

    /// Subscribes to `channel`; the subscription survives reconnects.
    fn subscribe(
        &self,
        channel: &Channel,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Unsubscribes; once this returns nothing more arrives from `channel`, and what arrived
    /// before is already in [`Inbound`].
    fn unsubscribe(
        &self,
        channel: &Channel,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// How many connections are subscribed to `channel` now, as the broker counts them.
    fn subscribers(
        &self,
        channel: &Channel,
    ) -> impl Future<Output = Result<u64, TransportError>> + Send;

    /// Sends the subscription to `channel` again, to wherever the channel lives now.
    fn resubscribe(
        &self,
        channel: &Channel,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Whether the broker may end a subscription while the connection stays up, without the
    /// connection noticing: Redis Cluster does when a channel's slot moves (fred drops the
    /// notice), the in-memory broker does on `drop_subscriptions`. Such nodes check their
    /// subscriptions every heartbeat (`node.rs`, `heartbeat.rs`); the others need not.
    fn may_lose_subscriptions(&self) -> bool;

    /// Everything delivered to this connection's subscriptions from now on, in order.
    fn inbound(&self) -> Inbound;

    /// Notifications that a lost connection is back (and its subscriptions restored).
    fn reconnects(&self) -> Reconnects;

    /// Writes or renews a server's registry entry for `entry.ttl`; in the same step publishes
    /// `entry.join` on the events channel if the beat made it a provider of a method it was
    /// not listed for, or if `entry.force_join`.
    fn heartbeat(
        &self,
        entry: &Entry<'_>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Removes a server's entry at once and, in the same step, publishes `leave` on the
    /// events channel.
    fn deregister(
        &self,
        id: &NodeId,
        methods: &[String],
        leave: Bytes,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// For each method, in the order asked: [`Lookup::Unchanged`] if `known` (same order)
    /// holds its current generation, else its live providers and their generation (`None`
    /// always gets the list). Purges expired providers, which changes the generation.
    fn providers(
        &self,
        methods: &[String],
        known: &[Option<u64>],
    ) -> impl Future<Output = Result<Vec<Lookup>, TransportError>> + Send;

    /// Every live server with the info fields of its last heartbeat; purges expired ones.
    fn servers(&self)
    -> impl Future<Output = Result<Vec<(NodeId, Fields)>, TransportError>> + Send;

    /// Stores `value` at `key` for `ttl` (`SET key value PX ttl`). Untimed: the caller
    /// bounds the wait. (Claims, `claim.rs`.)
    fn put(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Reads and deletes `key` in one step (`GETDEL`): its value, `None` if it has none (never
    /// set, expired, or taken already). Untimed, like [`Transport::put`].
    fn take(&self, key: &str)
    -> impl Future<Output = Result<Option<Bytes>, TransportError>> + Send;

    /// Deletes `key` (`DEL`), bounded by the command timeout.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Sets `key` to `value` for `ttl` if it has no value, in one step (the `ONCE_BEGIN`
    /// script, `docs/protocol.md` §6.5): `None` if this set it, else the value it has.
    /// Bounded by the command timeout. (Exactly-once calls, `once.rs`.)
    fn set_if_absent(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Bytes>, TransportError>> + Send;

    /// If `key`'s value is `expected`, replaces it with `new` for `ttl` (`None`: deletes it),
    /// in one step (the `ONCE_SWAP` script): whether it did. Bounded by the command timeout.
    fn swap_if(
        &self,
        key: &str,
        expected: Bytes,
        new: Option<Bytes>,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, TransportError>> + Send;

    /// Closes the connection: pending commands finish first, then [`Inbound`] ends.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// A server's info fields as its last heartbeat wrote them.
pub(crate) type Fields = Vec<(Bytes, Bytes)>;

/// One heartbeat: who, for how long, what it serves and what it reports about itself.
#[derive(Debug)]
pub(crate) struct Entry<'a> {
    pub(crate) id: &'a NodeId,
    pub(crate) ttl: Duration,
    pub(crate) methods: &'a [String],
    /// The node hash's fields, `methods` included (joined by `\n`).
    pub(crate) fields: Vec<(&'static str, String)>,
    /// The join frame, published when the beat adds the server to a method's providers.
    pub(crate) join: Bytes,
    /// Publish `join` even if the beat adds nothing (after a reconnect, or a registration).
    pub(crate) force_join: bool,
}

/// What a registry lookup found for one method (see [`Transport::providers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The generation the caller holds is current: so is its list.
    Unchanged,
    /// The providers changed since then (or the caller held no generation).
    Changed {
        /// The list's generation, for the next lookup (0: nobody provides the method).
        generation: u64,
        /// The live providers, by expiry then id.
        providers: Vec<NodeId>,
    },
}

/// A failure talking to the broker.
///
/// ```
/// let e = clouds_core::TransportError::Timeout {
///     command: "PUBLISH",
///     after: std::time::Duration::from_secs(5),
/// };
/// assert!(e.to_string().contains("PUBLISH"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The first connection to the broker failed.
    #[error("could not connect to Redis at {addr}: {reason}; is redis-server running there?")]
    Connect {
        /// `host:port` that was tried.
        addr: String,
        /// The underlying error.
        reason: String,
    },
    /// The TLS settings could not be used, or the TLS handshake with Redis failed (its
    /// certificate was refused, or it refused ours).
    #[error("TLS with Redis at {addr} failed: {reason}")]
    Tls {
        /// `host:port` that was tried.
        addr: String,
        /// What went wrong, without key material.
        reason: String,
    },
    /// A command got no answer within the command timeout (Redis down, or reconnecting).
    #[error("Redis did not answer {command} within {after:?} (connection down or reconnecting)")]
    Timeout {
        /// The command that timed out.
        command: &'static str,
        /// The configured command timeout.
        after: Duration,
    },
    /// Redis answered a command with an error, or the connection failed while it was in flight.
    #[error("Redis command {command} failed: {reason}")]
    Command {
        /// The command that failed.
        command: &'static str,
        /// The error Redis or the connection gave.
        reason: String,
    },
    /// Redis answered with a reply of an unexpected shape.
    #[error("unexpected reply to {command}: {reason}")]
    Reply {
        /// The command whose reply was unexpected.
        command: &'static str,
        /// What was unexpected.
        reason: String,
    },
}

impl TransportError {
    /// The same failure, told by clouds-redis. (A method, not a `From` impl, so that
    /// clouds-redis stays out of this crate's public API.)
    pub(crate) fn from_redis(e: clouds_redis::TransportError) -> Self {
        use clouds_redis::TransportError as R;
        match e {
            R::Connect { addr, reason } => TransportError::Connect { addr, reason },
            R::Timeout { command, after } => TransportError::Timeout { command, after },
            R::Command { command, reason } => TransportError::Command { command, reason },
            R::Reply { command, reason } => TransportError::Reply { command, reason },
            R::Tls { addr, reason } => TransportError::Tls { addr, reason },
            // Parsed (and refused) when the configuration is built, never at run time.
            R::InvalidUrl { url, reason } => TransportError::Connect { addr: url, reason },
            other => TransportError::Command {
                command: "(connect)",
                reason: other.to_string(),
            },
        }
    }
}

/// One item of a connection's inbound stream.
#[derive(Debug, Clone)]
pub(crate) enum Delivery {
    /// A frame published on `channel`.
    Frame { channel: Channel, payload: Bytes },
    /// The reader fell behind and this many frames were lost before it read them.
    Lagged(u64),
}

impl From<clouds_redis::Delivery> for Delivery {
    fn from(d: clouds_redis::Delivery) -> Self {
        match d {
            clouds_redis::Delivery::Frame { channel, payload } => {
                Delivery::Frame { channel, payload }
            }
            clouds_redis::Delivery::Lagged(n) => Delivery::Lagged(n),
        }
    }
}

/// A node's connection to its broker, statically dispatched.
#[derive(Debug)]
pub(crate) enum Wire {
    Redis(redis::RedisWire),
    #[cfg(any(test, feature = "testing"))]
    Memory(memory::MemoryWire),
}

/// Runs `$body` with `$t` bound to whichever transport `$wire` holds.
macro_rules! each {
    ($wire:expr, $t:ident => $body:expr) => {
        match $wire {
            Wire::Redis($t) => $body,
            #[cfg(any(test, feature = "testing"))]
            Wire::Memory($t) => $body,
        }
    };
}

impl Wire {
    /// Opens a connection for node `id` to where `config` points (its in-memory broker if
    /// it names one, else its Redis), with `options` (a config's own, or adjusted).
    #[cfg_attr(not(any(test, feature = "testing")), allow(unused_variables))]
    pub(crate) async fn connect(
        config: &crate::Config,
        options: &clouds_redis::TransportOptions,
        names: &Names,
        id: &NodeId,
    ) -> Result<Wire, TransportError> {
        #[cfg(any(test, feature = "testing"))]
        if let Some(broker) = &config.broker {
            return Ok(Wire::Memory(broker.connect(names, id, options)?));
        }
        let redis = redis::RedisWire::connect(&config.endpoint, options, names).await?;
        Ok(Wire::Redis(redis))
    }

    /// Whether this connection's node runs its heartbeat on a thread and connection of its
    /// own: Redis nodes do, so a runtime whose workers are all blocked cannot starve the
    /// heartbeat; in-memory nodes beat on the node's own runtime, so tests can pause its clock.
    pub(crate) fn beats_on_own_thread(&self) -> bool {
        matches!(self, Wire::Redis(_))
    }
}

impl Transport for Wire {
    async fn publish(&self, channel: Channel, frame: Bytes) -> Result<u64, TransportError> {
        each!(self, t => t.publish(channel, frame).await)
    }

    async fn publish_untimed(&self, channel: Channel, frame: Bytes) -> Result<u64, TransportError> {
        each!(self, t => t.publish_untimed(channel, frame).await)
    }

    async fn subscribe(&self, channel: &Channel) -> Result<(), TransportError> {
        each!(self, t => t.subscribe(channel).await)
    }

    async fn unsubscribe(&self, channel: &Channel) -> Result<(), TransportError> {
        each!(self, t => t.unsubscribe(channel).await)
    }

    async fn subscribers(&self, channel: &Channel) -> Result<u64, TransportError> {
        each!(self, t => t.subscribers(channel).await)
    }

    async fn resubscribe(&self, channel: &Channel) -> Result<(), TransportError> {
        each!(self, t => t.resubscribe(channel).await)
    }

    fn may_lose_subscriptions(&self) -> bool {
        each!(self, t => t.may_lose_subscriptions())
    }

    fn inbound(&self) -> Inbound {
        each!(self, t => t.inbound())
    }

    fn reconnects(&self) -> Reconnects {
        each!(self, t => t.reconnects())
    }

    async fn heartbeat(&self, entry: &Entry<'_>) -> Result<(), TransportError> {
        each!(self, t => t.heartbeat(entry).await)
    }

    async fn deregister(
        &self,
        id: &NodeId,
        methods: &[String],
        leave: Bytes,
    ) -> Result<(), TransportError> {
        each!(self, t => t.deregister(id, methods, leave).await)
    }

    async fn providers(
        &self,
        methods: &[String],
        known: &[Option<u64>],
    ) -> Result<Vec<Lookup>, TransportError> {
        each!(self, t => t.providers(methods, known).await)
    }

    async fn servers(&self) -> Result<Vec<(NodeId, Fields)>, TransportError> {
        each!(self, t => t.servers().await)
    }

    async fn put(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), TransportError> {
        each!(self, t => t.put(key, value, ttl).await)
    }

    async fn take(&self, key: &str) -> Result<Option<Bytes>, TransportError> {
        each!(self, t => t.take(key).await)
    }

    async fn delete(&self, key: &str) -> Result<(), TransportError> {
        each!(self, t => t.delete(key).await)
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<Option<Bytes>, TransportError> {
        each!(self, t => t.set_if_absent(key, value, ttl).await)
    }

    async fn swap_if(
        &self,
        key: &str,
        expected: Bytes,
        new: Option<Bytes>,
        ttl: Duration,
    ) -> Result<bool, TransportError> {
        each!(self, t => t.swap_if(key, expected, new, ttl).await)
    }

    async fn close(&self) {
        each!(self, t => t.close().await)
    }
}

/// The receive side of a connection.
pub(crate) enum Inbound {
    Redis(clouds_redis::Inbound),
    #[cfg(any(test, feature = "testing"))]
    Memory(memory::MemoryInbound),
}

impl Inbound {
    /// Waits for the next delivery; `None` once the connection is closed.
    pub(crate) async fn recv(&mut self) -> Option<Delivery> {
        match self {
            Inbound::Redis(rx) => rx.recv().await.map(Delivery::from),
            #[cfg(any(test, feature = "testing"))]
            Inbound::Memory(rx) => rx.recv().await,
        }
    }

    /// A delivery that has already arrived, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Delivery> {
        match self {
            Inbound::Redis(rx) => rx.try_recv().map(Delivery::from),
            #[cfg(any(test, feature = "testing"))]
            Inbound::Memory(rx) => rx.try_recv(),
        }
    }
}

/// Tells when a connection has recovered from a loss.
pub(crate) enum Reconnects {
    Redis(clouds_redis::Reconnects),
    #[cfg(any(test, feature = "testing"))]
    Memory(tokio::sync::broadcast::Receiver<()>),
}

impl Reconnects {
    /// Waits for the next recovery; `None` once the connection is closed.
    pub(crate) async fn recv(&mut self) -> Option<()> {
        #[cfg(any(test, feature = "testing"))]
        use tokio::sync::broadcast::error::RecvError;
        match self {
            Reconnects::Redis(rx) => rx.recv().await,
            #[cfg(any(test, feature = "testing"))]
            Reconnects::Memory(rx) => match rx.recv().await {
                Ok(()) | Err(RecvError::Lagged(_)) => Some(()),
                Err(RecvError::Closed) => None,
            },
        }
    }
}
