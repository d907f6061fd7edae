//! How a node connects and behaves.

use std::time::Duration;

use clouds_redis::{Endpoint, TransportOptions};

use crate::error::Error;

/// Frames longer than this travel as claims by default (see [`Config::claim_threshold`]).
const DEFAULT_CLAIM_THRESHOLD: usize = 64 << 10;

/// Redis's largest string (`proto-max-bulk-len`'s default, 512 MB): the most
/// [`Config::max_body_size`] may be.
pub(crate) const MAX_BODY_SIZE_LIMIT: usize = 512 << 20;

/// How calls are spread over the live providers of a method.
///
/// ```
/// let config = clouds_core::Config::default().balance(clouds_core::Balance::LeastInFlight);
/// assert_eq!(config.get_balance(), clouds_core::Balance::LeastInFlight);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Balance {
    /// Each provider in turn.
    #[default]
    RoundRobin,
    /// The provider with the fewest calls from this node still waiting for a reply.
    LeastInFlight,
}

/// Connection and behaviour settings shared by servers, clients and monitors.
///
/// Every node that should see the same services uses the same Redis, db and namespace.
///
/// ```
/// use std::time::Duration;
/// let config = clouds_core::Config::from_url("redis://127.0.0.1:6379/3")?
///     .heartbeat(Duration::from_secs(2))
///     .timeout(Duration::from_secs(2));
/// assert_eq!(config.get_db(), 3);
/// assert_eq!(config.effective_ttl(), Duration::from_secs(6));
/// # Ok::<(), clouds_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) endpoint: Endpoint,
    pub(crate) namespace: String,
    pub(crate) heartbeat: Duration,
    pub(crate) ttl: Option<Duration>,
    pub(crate) timeout: Duration,
    pub(crate) retries: u32,
    pub(crate) max_in_flight: usize,
    pub(crate) spawn_handlers: bool,
    pub(crate) max_frame_size: usize,
    pub(crate) balance: Balance,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) message_buffer: usize,
    pub(crate) max_bytes_in_flight: usize,
    pub(crate) claim_threshold: usize,
    pub(crate) max_body_size: usize,
    pub(crate) claim_fetch_bytes: usize,
    pub(crate) batching: bool,
    pub(crate) send_trace_context: bool,
    pub(crate) stream_window: u32,
    pub(crate) stream_idle_timeout: Duration,
    /// Exactly-once calls: the running record's lease, and how long a result is kept.
    pub(crate) once_lease: Duration,
    pub(crate) once_window: Duration,
    pub(crate) transport: TransportOptions,
    /// Signed frames: the keys and the replay window (`signing.rs`). Its `Debug` shows key
    /// ids, never secrets.
    pub(crate) signing: crate::signing::Keys,
    /// Set when the nodes talk through an in-memory broker instead of Redis.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) broker: Option<crate::transport::memory::Broker>,
}

impl Default for Config {
    /// `redis://127.0.0.1:6379`, db 0, namespace `clouds`, heartbeat 2 s, timeout 2 s.
    fn default() -> Self {
        let endpoint = Endpoint::parse("redis://127.0.0.1:6379").expect("the default URL is valid");
        Config {
            endpoint,
            namespace: "clouds".to_string(),
            heartbeat: Duration::from_secs(2),
            ttl: None,
            timeout: Duration::from_secs(2),
            retries: 0,
            max_in_flight: 1024,
            spawn_handlers: false,
            max_frame_size: 4 << 20,
            balance: Balance::RoundRobin,
            shutdown_timeout: Duration::from_secs(30),
            message_buffer: 1024,
            max_bytes_in_flight: 16 << 20,
            claim_threshold: DEFAULT_CLAIM_THRESHOLD,
            max_body_size: 128 << 20,
            claim_fetch_bytes: 32 << 20,
            batching: true,
            send_trace_context: true,
            stream_window: 64,
            stream_idle_timeout: Duration::from_secs(10),
            once_lease: Duration::from_secs(1),
            once_window: Duration::from_secs(60),
            transport: TransportOptions::default(),
            signing: crate::signing::Keys::default(),
            #[cfg(any(test, feature = "testing"))]
            broker: None,
        }
    }
}

impl Config {
    /// Settings for the Redis at `redis://[user:password@]host[:port][/db]`, or for the Redis
    /// Cluster at `redis-cluster://[user:password@]host:port[?node=host:port&node=...]`
    /// (any reachable seed node will do; a cluster has no databases, so a db other than 0 is
    /// refused: use [`Config::namespace`] to keep deployments apart). Defaults for the rest.
    ///
    /// `rediss://`, `rediss-cluster://` and `rediss-sentinel://` are the same over TLS (the
    /// `tls` feature, on by default in `clouds`; a build without it refuses them here rather
    /// than connect in plaintext). See [`Config::tls_ca_pem`] and [`Config::tls_client_cert_pem`].
    ///
    /// ```
    /// let config = clouds_core::Config::from_url("redis://user:secret@10.0.0.5:6380/3")?;
    /// assert_eq!(config.get_db(), 3);
    /// let cluster = clouds_core::Config::from_url(
    ///     "redis-cluster://10.0.0.5:7000?node=10.0.0.6:7000&node=10.0.0.7:7000",
    /// )?;
    /// assert!(cluster.is_cluster());
    /// assert!(clouds_core::Config::from_url("redis-cluster://10.0.0.5:7000/3").is_err());
    /// # Ok::<(), clouds_core::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let endpoint = Endpoint::parse(url).map_err(|e| Error::Config(e.to_string()))?;
        Ok(Config {
            endpoint,
            ..Config::default()
        })
    }

    /// Settings for the Redis Cluster found from any of `nodes` (each `host:port`): the same as
    /// a `redis-cluster://` URL, for seed nodes held in a list. Add credentials with
    /// [`Config::password`].
    ///
    /// ```
    /// let config = clouds_core::Config::cluster(["10.0.0.5:7000", "10.0.0.6:7000"])?
    ///     .namespace("orders");
    /// assert!(config.is_cluster());
    /// assert!(clouds_core::Config::cluster(["10.0.0.5"]).is_err()); // no port
    /// # Ok::<(), clouds_core::Error>(())
    /// ```
    pub fn cluster<S: AsRef<str>>(nodes: impl IntoIterator<Item = S>) -> Result<Self, Error> {
        let endpoint = Endpoint::cluster(nodes).map_err(|e| Error::Config(e.to_string()))?;
        Ok(Config {
            endpoint,
            ..Config::default()
        })
    }

    /// Settings for the primary of Sentinel service `service`, found through any of the
    /// sentinels in `sentinels` (each `host:port`): the same as a `redis-sentinel://` URL.
    /// Add the data nodes' credentials with [`Config::password`], the sentinels' (where they
    /// differ) with [`Config::sentinel_password`].
    ///
    /// ```
    /// let config = clouds_core::Config::sentinel("orders", ["10.0.0.5:26379", "10.0.0.6:26379"])?
    ///     .password(Some("app"), "secret")
    ///     .sentinel_password(None, "sentinel-secret")
    ///     .db(3);
    /// assert!(config.validate().is_ok());
    /// # Ok::<(), clouds_core::Error>(())
    /// ```
    pub fn sentinel<S: AsRef<str>>(
        service: &str,
        sentinels: impl IntoIterator<Item = S>,
    ) -> Result<Self, Error> {
        let endpoint =
            Endpoint::sentinel(service, sentinels).map_err(|e| Error::Config(e.to_string()))?;
        Ok(Config {
            endpoint,
            ..Config::default()
        })
    }

    /// Authenticates with the sentinels with `password` (and an ACL `username`), where they
    /// want other credentials than the data nodes ([`Config::password`]). Only for Sentinel
    /// settings; ignored otherwise.
    ///
    /// ```
    /// let config = clouds_core::Config::sentinel("orders", ["10.0.0.5:26379"])?
    ///     .sentinel_password(Some("watcher"), "sentinel-secret");
    /// assert!(!format!("{config:?}").contains("sentinel-secret"));
    /// # Ok::<(), clouds_core::Error>(())
    /// ```
    pub fn sentinel_password(mut self, username: Option<&str>, password: &str) -> Self {
        self.endpoint
            .set_sentinel_credentials(username.map(str::to_string), password.to_string());
        self
    }

    /// Whether these settings point at a Redis Cluster.
    ///
    /// ```
    /// assert!(!clouds_core::Config::default().is_cluster());
    /// ```
    pub fn is_cluster(&self) -> bool {
        self.endpoint.is_cluster()
    }

    /// Whether these settings find the primary through Redis Sentinel.
    ///
    /// ```
    /// let config = clouds_core::Config::sentinel("orders", ["127.0.0.1:26379"])?;
    /// assert!(config.is_sentinel());
    /// # Ok::<(), clouds_core::Error>(())
    /// ```
    pub fn is_sentinel(&self) -> bool {
        self.endpoint.is_sentinel()
    }

    /// Uses Redis database `db` (overriding the URL's). A Redis Cluster has only db 0: any
    /// other is refused when a node starts (see [`Config::validate`]). Nodes in different dbs never see
    /// each other.
    ///
    /// ```
    /// let config = clouds_core::Config::default().db(3);
    /// assert_eq!(config.get_db(), 3);
    /// ```
    pub fn db(mut self, db: u8) -> Self {
        self.endpoint.set_db(db);
        self
    }

    /// Authenticates with `password` (and an ACL `username`, if given).
    ///
    /// ```
    /// let config = clouds_core::Config::default().password(Some("app"), "secret");
    /// ```
    pub fn password(mut self, username: Option<&str>, password: &str) -> Self {
        self.endpoint
            .set_credentials(username.map(str::to_string), password.to_string());
        self
    }

    /// Trusts the CA certificates in `pem` (PEM `CERTIFICATE` blocks) for a `rediss://` or
    /// `rediss-cluster://` URL, instead of the system trust store (which is used when no CA
    /// is set, honouring `SSL_CERT_FILE` and `SSL_CERT_DIR`). TLS settings on a plaintext
    /// URL are refused when the node starts.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), clouds_core::Error> {
    /// let ca = std::fs::read("/etc/redis/ca.pem").expect("the CA file");
    /// let config = clouds_core::Config::from_url("rediss://redis.internal:6380")?.tls_ca_pem(ca);
    /// # Ok(()) }
    /// ```
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.endpoint.set_tls_ca_pem(pem.into());
        self
    }

    /// Like [`Config::tls_ca_pem`], with the PEM read from the file at `path` when connecting
    /// (a missing or invalid file is an error then).
    ///
    /// ```
    /// # #[cfg(feature = "tls")] {
    /// let config = clouds_core::Config::from_url("rediss://127.0.0.1:6380")
    ///     .unwrap()
    ///     .tls_ca_file("/etc/redis/ca.pem");
    /// assert!(format!("{config:?}").contains("/etc/redis/ca.pem"));
    /// # }
    /// ```
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.endpoint.set_tls_ca_file(path.into());
        self
    }

    /// Shows the server the client certificate chain `cert_pem` and its private key
    /// `key_pem` (PEM: PKCS#8, PKCS#1 or SEC1), for mutual TLS (`tls-auth-clients yes`).
    /// The key never appears in `Debug` output or errors.
    ///
    /// ```
    /// # #[cfg(feature = "tls")] {
    /// let config = clouds_core::Config::from_url("rediss://127.0.0.1:6380")
    ///     .unwrap()
    ///     .tls_client_cert_pem("-----BEGIN CERTIFICATE-----...", "-----BEGIN PRIVATE KEY-----...");
    /// assert!(!format!("{config:?}").contains("PRIVATE KEY"));
    /// # }
    /// ```
    pub fn tls_client_cert_pem(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.endpoint
            .set_tls_client_pem(cert_pem.into(), key_pem.into());
        self
    }

    /// Like [`Config::tls_client_cert_pem`], with both read from files when connecting.
    ///
    /// ```
    /// # #[cfg(feature = "tls")] {
    /// let config = clouds_core::Config::from_url("rediss://127.0.0.1:6380")
    ///     .unwrap()
    ///     .tls_client_cert_files("/etc/redis/client.pem", "/etc/redis/client.key");
    /// # }
    /// ```
    pub fn tls_client_cert_files(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.endpoint.set_tls_client_files(cert.into(), key.into());
        self
    }

    /// Prefix of every key and channel (default `clouds`); deployments sharing a Redis and db
    /// stay apart with different namespaces.
    ///
    /// ```
    /// let staging = clouds_core::Config::default().namespace("staging");
    /// ```
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_string();
        self
    }

    /// How often a server renews its registry entry (default 2 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = clouds_core::Config::default().heartbeat(Duration::from_millis(500));
    /// assert_eq!(config.effective_ttl(), Duration::from_millis(1500));
    /// ```
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// How long a registry entry lives without a heartbeat (default 3 × heartbeat): a server
    /// that dies stops receiving calls after at most this long.
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = clouds_core::Config::default().ttl(Duration::from_secs(10));
    /// assert_eq!(config.effective_ttl(), Duration::from_secs(10));
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long one attempt of a call waits for its reply (default 2 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = clouds_core::Config::default().timeout(Duration::from_secs(5));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many more attempts a call makes after a timeout, an overloaded provider, no
    /// provider or a Redis error (default 0). Stubs and clients can override it per handle.
    ///
    /// ```
    /// let config = clouds_core::Config::default().retries(3);
    /// ```
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// How many calls a server runs at once (default 1024); past it, calls are refused at once
    /// as overloaded and the caller retries elsewhere.
    ///
    /// ```
    /// let config = clouds_core::Config::default().max_in_flight(64);
    /// ```
    pub fn max_in_flight(mut self, limit: usize) -> Self {
        self.max_in_flight = limit;
        self
    }

    /// Whether a server runs every handler in a task of its own from the start (default:
    /// `false`).
    ///
    /// By default a handler starts on the server's receive loop: most handlers finish without
    /// waiting on anything, and their reply is sent from there, which saves a task spawn and a
    /// hop between threads per call. A handler that does wait (on I/O, a timer, another call)
    /// moves to its own task at its first `.await` that is not ready, so slow handlers still run
    /// side by side. What a handler computes *before* that first wait holds up the server's
    /// other deliveries meanwhile; for handlers that compute for long (or block), set this so
    /// each call gets its own task and calls spread over the runtime's worker threads. Such a
    /// task yields once before it runs its handler, so that an idle worker keeps the runtime's
    /// I/O going should the handler hold its thread.
    ///
    /// ```
    /// let config = clouds_core::Config::default().spawn_handlers(true);
    /// ```
    pub fn spawn_handlers(mut self, spawn: bool) -> Self {
        self.spawn_handlers = spawn;
        self
    }

    /// Whether calls, replies and messages for one destination are coalesced (default on):
    /// a frame sent while no `PUBLISH` to its channel is outstanding goes out at once; frames
    /// sent while one is wait, and go out together as one batch frame (at most 64 KiB) when
    /// it is answered. No timers: a call alone is not delayed. Each frame's outcome is still
    /// its own (a batch that reached nobody re-routes every call in it).
    ///
    /// Nodes of a release without batching drop batch frames (counted as malformed): turn
    /// this off on every node until all of a deployment understand them
    /// (`docs/protocol.md` §3.12). Every node accepts batches whatever this says.
    ///
    /// ```
    /// let config = clouds_core::Config::default().batching(false);
    /// ```
    pub fn batching(mut self, on: bool) -> Self {
        self.batching = on;
        self
    }

    /// Whether calls carry a trace context when there is one (default on): the W3C
    /// `traceparent` and `tracestate` of the attempt's OpenTelemetry span (feature
    /// `opentelemetry`), or else of the call the current handler serves, in an optional
    /// element of the Call frame (`docs/protocol.md` §3.1). A call without a trace context
    /// is the same frame either way.
    ///
    /// Nodes of a release without trace context drop a call that carries one (counted as
    /// malformed; the caller times out and retries elsewhere): turn this off on the callers
    /// until every server understands it (`docs/protocol.md` §11). Every node accepts it
    /// whatever this says.
    ///
    /// ```
    /// let config = clouds_core::Config::default().send_trace_context(false);
    /// ```
    pub fn send_trace_context(mut self, on: bool) -> Self {
        self.send_trace_context = on;
        self
    }

    /// Largest frame sent or accepted inline on pub/sub, in bytes (default 4 MiB, at least
    /// 1024). Calls, replies and messages longer than this, or than
    /// [`Config::claim_threshold`], travel as claims instead (their body waits in a Redis
    /// key). A receiver drops an inline frame over its limit (a call is refused with an
    /// error reply). Give every node of a deployment the same limit.
    ///
    /// ```
    /// let config = clouds_core::Config::default().max_frame_size(16 << 20);
    /// ```
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// How calls are spread over providers (default round-robin).
    ///
    /// ```
    /// let config = clouds_core::Config::default().balance(clouds_core::Balance::LeastInFlight);
    /// ```
    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = balance;
        self
    }

    /// Signs every frame this node sends with the shared secret `secret` under the key id
    /// `id`, and accepts only frames signed with a key it knows (this one and those of
    /// [`Config::accept_key`]). Off by default.
    ///
    /// Each frame then carries an HMAC-SHA256 tag bound to the channel it was published on;
    /// a frame without a valid tag, or a replay of one (see [`Config::replay_window`]), is
    /// dropped and counted in [`Stats`](crate::Stats), never dispatched. Give every node of a
    /// deployment the same key: a node with keys refuses unsigned frames, and a node without
    /// them refuses signed ones. The secret must be at least 32 bytes (random bytes, not a
    /// password); a shorter one fails [`Config::validate`] with [`Error::Config`]. It never
    /// appears in `Debug` output or logs; only the id does.
    ///
    /// ```
    /// let secret = [7u8; 32]; // in practice: 32 random bytes from your secret store
    /// let config = clouds_core::Config::default().signing_key(1, secret);
    /// assert!(config.validate().is_ok());
    /// assert!(!format!("{config:?}").contains("7, 7, 7"));
    /// let short = clouds_core::Config::default().signing_key(1, b"too short");
    /// assert!(matches!(short.validate(), Err(clouds_core::Error::Config(_))));
    /// ```
    pub fn signing_key(mut self, id: u32, secret: impl AsRef<[u8]>) -> Self {
        self.signing.set_signing(id, secret.as_ref());
        self
    }

    /// Also accepts frames signed with key `id` (for a key rotation), besides the
    /// [`Config::signing_key`], which is needed too. Rotating from key 1 to key 2 without
    /// downtime: first every node signs with 1 and accepts 2; then every node signs with 2 and
    /// accepts 1; then the `accept_key(1)` goes. The same id with another secret is refused.
    ///
    /// ```
    /// let (old, new) = ([1u8; 32], [2u8; 32]);
    /// // The middle step: send with the new key, still accept the old one.
    /// let config = clouds_core::Config::default().signing_key(2, new).accept_key(1, old);
    /// assert!(config.validate().is_ok());
    /// // Accepting keys without signing is refused: nobody could read what this node sends.
    /// let lopsided = clouds_core::Config::default().accept_key(1, old);
    /// assert!(lopsided.validate().is_err());
    /// ```
    pub fn accept_key(mut self, id: u32, secret: impl AsRef<[u8]>) -> Self {
        self.signing.add_accepted(id, secret.as_ref());
        self
    }

    /// How far a signed frame's send time may be from the receiver's clock (default 30 s,
    /// between 1 s and a day). A signed frame stamped further before or after is refused as a
    /// replay, and so is one received before; the window must cover the clock skew between
    /// nodes plus the time a frame spends in Redis. Only used with a [`Config::signing_key`].
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = clouds_core::Config::default()
    ///     .signing_key(1, [9u8; 32])
    ///     .replay_window(Duration::from_secs(10));
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn replay_window(mut self, window: Duration) -> Self {
        self.signing.window = window;
        self
    }

    /// How long `Server::shutdown` waits for calls in flight before closing anyway (default 30 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = clouds_core::Config::default().shutdown_timeout(Duration::from_secs(5));
    /// ```
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Longest wait for any single Redis command (default 5 s). A call's `PUBLISH` is bounded
    /// by the call's own `timeout` instead, and the reply to a call whose handler finished at
    /// once is given up after one to two command timeouts (its server checks them in bulk).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = clouds_core::Config::default().command_timeout(Duration::from_secs(1));
    /// ```
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.transport.command_timeout = timeout;
        self
    }

    /// How long to wait before reconnecting after a lost connection: `min` first, doubling
    /// up to `max` (defaults 50 ms and 2 s). Reconnecting never gives up. On a Redis Cluster
    /// `max` is at most 250 ms: fred's cluster client sends nothing while it reconnects, so a
    /// long pause would keep it down long after a failed primary has been replaced.
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = clouds_core::Config::default()
    ///     .reconnect_delay(Duration::from_millis(50), Duration::from_secs(2));
    /// ```
    pub fn reconnect_delay(mut self, min: Duration, max: Duration) -> Self {
        self.transport.reconnect_min_delay = min;
        self.transport.reconnect_max_delay = max;
        self
    }

    /// How many received frames may wait for a node's receive loop before the oldest are
    /// dropped and counted in [`Stats::lagged_frames`](crate::Stats::lagged_frames): room for
    /// a burst of replies to that many calls in flight. Over Redis this memory is allocated
    /// up front per node.
    ///
    /// ```
    /// let config = clouds_core::Config::default().inbound_buffer(4096);
    /// ```
    pub fn inbound_buffer(mut self, frames: usize) -> Self {
        self.transport.inbound_capacity = frames;
        self
    }

    /// How many items of a stream a caller lets its provider send ahead of what it has
    /// consumed (default 64, at least 1): the credit window. A caller holds at most this
    /// many items of a stream, and a provider waits once it has sent them, so a slow
    /// consumer slows the producer down.
    ///
    /// ```
    /// let config = clouds_core::Config::default().stream_window(256);
    /// ```
    pub fn stream_window(mut self, items: u32) -> Self {
        self.stream_window = items.max(1);
        self
    }

    /// How long either end of a stream waits without hearing from the other (default 10 s).
    ///
    /// A provider whose stream sends nothing for a quarter of its idle timeout sends a
    /// keep-alive; a caller that hears nothing (no item, no keep-alive) for its idle timeout
    /// ends the stream with [`StreamBreak::Idle`](crate::StreamBreak::Idle) (the provider
    /// died), and a provider that hears nothing from its caller for as long drops the
    /// stream. Give callers an idle timeout at least as long as their providers'.
    ///
    /// ```
    /// let config = clouds_core::Config::default()
    ///     .stream_idle_timeout(std::time::Duration::from_secs(3));
    /// ```
    pub fn stream_idle_timeout(mut self, timeout: Duration) -> Self {
        self.stream_idle_timeout = timeout;
        self
    }

    /// How many received node messages are kept until read (default 1024); more are dropped
    /// and logged.
    ///
    /// ```
    /// let config = clouds_core::Config::default().message_buffer(10_000);
    /// ```
    pub fn message_buffer(mut self, messages: usize) -> Self {
        self.message_buffer = messages;
        self
    }

    /// Most bytes of calls a client keeps in flight (default 16 MiB): sent (inline, or stored
    /// as claims) and not answered yet. Past it, new calls wait for room, within their
    /// timeout. A call larger than the whole budget still goes, alone.
    ///
    /// This bounds what one client's bursts put into Redis at once: inline frames queued for
    /// a provider's subscriber connection (Redis drops one whose unread pub/sub output passes
    /// `client-output-buffer-limit pubsub`, 32 MB by default), and claimed bodies waiting in
    /// Redis's memory. Frames over [`Config::claim_threshold`] travel as claims, so the
    /// subscribers themselves only carry small frames whatever the sum over all clients.
    ///
    /// ```
    /// let config = clouds_core::Config::default().max_bytes_in_flight(4 << 20);
    /// ```
    pub fn max_bytes_in_flight(mut self, bytes: usize) -> Self {
        self.max_bytes_in_flight = bytes;
        self
    }

    /// Calls, replies and messages whose frame is longer than this many bytes (default
    /// 64 KiB) travel as a *claim*: the body is stored in a Redis key that expires with the
    /// call's deadline, and the pub/sub frame carries only a reference to it, which the
    /// receiver fetches (and deletes) when it is about to use the body. A subscriber
    /// connection then only ever carries small frames, however large the payloads, so Redis
    /// never drops it for its output buffer (`client-output-buffer-limit pubsub`).
    ///
    /// Below the threshold a frame goes inline, as one `PUBLISH`: a claim costs a `SET`
    /// and a `GETDEL` more, which only pays off for large bodies (see BENCHMARKS.md,
    /// "Claims"). Inline frames are also limited by [`Config::max_frame_size`]; the smaller
    /// of the two applies. `usize::MAX` sends everything up to `max_frame_size` inline.
    ///
    /// ```
    /// let config = clouds_core::Config::default().claim_threshold(256 << 10);
    /// ```
    pub fn claim_threshold(mut self, bytes: usize) -> Self {
        self.claim_threshold = bytes;
        self
    }

    /// How long a server's claim on an exactly-once call lasts unless renewed (default 1 s;
    /// 30 ms to 1 hour): while the handler of a method marked once
    /// ([`Route::once`](crate::Route::once)) runs, its server renews the claim every third of
    /// this. If the server dies (or loses Redis for longer than this), the claim lapses and a
    /// retry of the call may run it elsewhere; a server whose renewal fails drops the handler.
    /// Shorter: a dead provider's call is taken over sooner, for more renewals
    /// (`docs/protocol.md` §6.5).
    ///
    /// ```
    /// let config = clouds_core::Config::default().once_lease(std::time::Duration::from_millis(500));
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn once_lease(mut self, lease: Duration) -> Self {
        self.once_lease = lease;
        self
    }

    /// How long a server keeps the result of an exactly-once call for retries of it (default
    /// 60 s; 1 ms to 1 day): a retry arriving later runs the handler again. Keep it longer than
    /// the longest a caller may go on retrying one call (attempts x timeout, plus backoffs).
    ///
    /// ```
    /// let config = clouds_core::Config::default().once_window(std::time::Duration::from_secs(300));
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn once_window(mut self, window: Duration) -> Self {
        self.once_window = window;
        self
    }

    /// Largest call, reply or message body, in bytes, inline or claimed (default 128 MiB; at
    /// most 512 MiB, Redis's largest string). A call or message over it fails at the sender
    /// with [`Error::TooLarge`] before anything is written to Redis; a reply over it becomes
    /// an [`Error::Server`] for the caller. A receiver with a smaller limit refuses a larger
    /// claimed call with an error reply, without fetching it.
    ///
    /// ```
    /// let config = clouds_core::Config::default().max_body_size(512 << 20);
    /// assert!(config.validate().is_ok());
    /// assert!(clouds_core::Config::default().max_body_size(1 << 30).validate().is_err());
    /// ```
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        self.max_body_size = bytes;
        self
    }

    /// Most bytes of claimed call arguments a server fetches and holds at once (default
    /// 32 MiB): a server working through many large calls takes their bodies from Redis at
    /// this pace, and the rest wait in Redis (within their deadline), not in the server's
    /// memory. The budget is held from the fetch until the call's reply is sent. Large
    /// results and messages a node fetches have a budget of the same size of their own, held
    /// while each is fetched (so a handler holding call budget can still fetch the large
    /// result of a call it makes). A body larger than a whole budget is still fetched, alone.
    ///
    /// ```
    /// let config = clouds_core::Config::default().claim_fetch_bytes(64 << 20);
    /// ```
    pub fn claim_fetch_bytes(mut self, bytes: usize) -> Self {
        self.claim_fetch_bytes = bytes;
        self
    }

    /// Connects the nodes of this config to an in-memory [`Broker`](crate::testing::Broker)
    /// instead of Redis (the URL, db and credentials are then unused, the namespace and db
    /// still keep deployments apart). Requires the `testing` feature.
    ///
    /// ```
    /// let broker = clouds_core::testing::Broker::new();
    /// let config = clouds_core::Config::from_url("redis://127.0.0.1:6379/3")?.broker(&broker);
    /// # Ok::<(), clouds_core::Error>(())
    /// ```
    #[cfg(any(test, feature = "testing"))]
    pub fn broker(mut self, broker: &crate::testing::Broker) -> Self {
        self.broker = Some(broker.clone());
        self
    }

    /// The Redis database in use (set with [`Config::db`] or the URL). Getters of this
    /// builder are named `get_` + the setter, as `std::process::Command`'s are.
    ///
    /// ```
    /// assert_eq!(clouds_core::Config::default().get_db(), 0);
    /// assert_eq!(clouds_core::Config::default().db(3).get_db(), 3);
    /// ```
    pub fn get_db(&self) -> u8 {
        self.endpoint.db()
    }

    /// The registry TTL in effect: as set, or 3 × heartbeat.
    ///
    /// ```
    /// use std::time::Duration;
    /// assert_eq!(clouds_core::Config::default().effective_ttl(), Duration::from_secs(6));
    /// ```
    pub fn effective_ttl(&self) -> Duration {
        self.ttl.unwrap_or(self.heartbeat * 3)
    }

    /// The balancing strategy in use (set with [`Config::balance`]).
    ///
    /// ```
    /// assert_eq!(clouds_core::Config::default().get_balance(), clouds_core::Balance::RoundRobin);
    /// ```
    pub fn get_balance(&self) -> Balance {
        self.balance
    }

    /// The `ACL SETUSER` command (for `redis-cli`, or after `user` in an ACL file) that
    /// creates `user` with `password`, confined to this deployment: keys under the
    /// registry's hash tag `{namespace:db}`, the claims `namespace:db:claim:*` (large
    /// bodies, see [`Config::claim_threshold`]) and the exactly-once records
    /// `namespace:db:once:*` ([`Route::once`](crate::Route::once)), channels under `namespace:db:` (and, on a
    /// Redis Cluster, `{namespace:db}:events`), and only the commands clouds sends
    /// (`docs/protocol.md` §2.1, §2.2 for a cluster). Nodes then connect with
    /// `redis://user:password@host/db`, percent-encoding the user and password if needed.
    ///
    /// Channel rules need Redis 6.2 or newer; `+select|<db>` and `+info|server` are
    /// first-argument rules, which Redis 7 deprecates but still applies.
    ///
    /// Fails if the configuration does not [validate](Config::validate), or if the user
    /// or password is empty or holds whitespace or quotes (the rule could not be pasted).
    ///
    /// ```
    /// let config = clouds_core::Config::from_url("redis://127.0.0.1:6379/3")?.namespace("shop");
    /// let rule = config.acl_rule("shop", "s3cret")?;
    /// assert!(rule.starts_with("ACL SETUSER shop on >s3cret resetkeys ~{shop:3}:* \
    ///                           ~shop:3:claim:* ~shop:3:once:* resetchannels &shop:3:* nocommands "));
    /// assert!(!rule.contains("+keys") && !rule.contains("+config"));
    /// # Ok::<(), clouds_core::Error>(())
    /// ```
    pub fn acl_rule(&self, user: &str, password: &str) -> Result<String, Error> {
        crate::acl::rule(self, user, password)
    }

    /// Checks that the settings fit together, with an error that says which one is off.
    /// Servers, clients and monitors check this before they connect; call it yourself to
    /// refuse a bad configuration where it is built (at start-up, from a file).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = clouds_core::Config::default().heartbeat(Duration::from_secs(2));
    /// assert!(config.validate().is_ok());
    /// let bad = config.ttl(Duration::from_secs(1)); // shorter than the heartbeat
    /// assert!(matches!(bad.validate(), Err(clouds_core::Error::Config(_))));
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        let fail = |m: String| Err(Error::Config(m));
        if let Err(e) = self.endpoint.check() {
            return fail(e.to_string());
        }
        if self.namespace.is_empty()
            || self.namespace.len() > 64
            || self
                .namespace
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}' | ':'))
        {
            return fail(format!(
                "namespace {:?} must be 1-64 bytes without whitespace, ':', '{{' or '}}'",
                self.namespace
            ));
        }
        // ACL key and channel patterns are globs built from the namespace (see
        // `Config::acl_rule`): a glob character would let one tenant's rule match another's.
        if let Some(c) = self
            .namespace
            .chars()
            .find(|c| matches!(c, '*' | '?' | '[' | ']' | '\\'))
        {
            return fail(format!(
                "namespace {:?} contains {c:?}: glob characters (* ? [ ] \\) are refused, \
                 since Redis ACL patterns built from the namespace would match other namespaces",
                self.namespace
            ));
        }
        if self.heartbeat < Duration::from_millis(10) {
            return fail(format!("heartbeat {:?} is below 10 ms", self.heartbeat));
        }
        if self.effective_ttl() <= self.heartbeat {
            return fail(format!(
                "ttl {:?} must be longer than the heartbeat {:?} (3x is the default)",
                self.effective_ttl(),
                self.heartbeat
            ));
        }
        if self.once_lease < Duration::from_millis(30)
            || self.once_lease > Duration::from_secs(3600)
        {
            return fail(format!(
                "once_lease {:?} must be between 30 ms and 1 hour",
                self.once_lease
            ));
        }
        const DAY: Duration = Duration::from_secs(24 * 3600);
        for (name, value) in [
            ("heartbeat", self.heartbeat),
            ("ttl", self.effective_ttl()),
            ("timeout", self.timeout),
            ("command_timeout", self.transport.command_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("stream_idle_timeout", self.stream_idle_timeout),
            ("once_window", self.once_window),
            ("reconnect_delay", self.transport.reconnect_max_delay),
        ] {
            if value > DAY {
                return fail(format!("{name} {value:?} is over a day"));
            }
        }
        if self.transport.command_timeout.is_zero() {
            return fail("command_timeout must be above zero".into());
        }
        if self.stream_idle_timeout < Duration::from_millis(4) {
            return fail("stream_idle_timeout must be at least 4 ms".into());
        }
        if self.timeout.is_zero() {
            return fail("timeout must be above zero".into());
        }
        if self.once_window.is_zero() {
            return fail("once_window must be above zero".into());
        }
        if self.max_in_flight == 0 {
            return fail("max_in_flight must be at least 1".into());
        }
        if self.max_frame_size < 1024 {
            return fail(format!(
                "max_frame_size {} is below 1024 bytes",
                self.max_frame_size
            ));
        }
        if self.message_buffer == 0 {
            return fail("message_buffer must be at least 1".into());
        }
        if self.transport.inbound_capacity == 0 {
            return fail("inbound_buffer must be at least 1".into());
        }
        if self.transport.reconnect_min_delay.is_zero()
            || self.transport.reconnect_max_delay < self.transport.reconnect_min_delay
        {
            return fail(format!(
                "reconnect delays must be above zero with min <= max (got {:?} and {:?})",
                self.transport.reconnect_min_delay, self.transport.reconnect_max_delay
            ));
        }
        if self.max_bytes_in_flight == 0 {
            return fail("max_bytes_in_flight must be at least 1".into());
        }
        if self.max_body_size == 0 || self.max_body_size > MAX_BODY_SIZE_LIMIT {
            return fail(format!(
                "max_body_size {} must be 1 to {MAX_BODY_SIZE_LIMIT} bytes (Redis's largest string)",
                self.max_body_size
            ));
        }
        if self.claim_fetch_bytes == 0 {
            return fail("claim_fetch_bytes must be at least 1".into());
        }
        self.signing.check().map_err(Error::Config)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates() {
        assert!(Config::default().validate().is_ok());
        assert!(Config::default().namespace("a:b").validate().is_err());
        assert!(Config::default().namespace("").validate().is_err());
        for glob in ["a*", "a?", "[ab]", "a]", "a\\b"] {
            match Config::default().namespace(glob).validate() {
                Err(Error::Config(m)) => assert!(m.contains("glob"), "{m}"),
                other => panic!("{glob:?} accepted: {other:?}"),
            }
        }
        assert!(Config::default().namespace("a-b_c.d").validate().is_ok());
        assert!(
            Config::default()
                .ttl(Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(Config::default().max_in_flight(0).validate().is_err());
        assert!(
            Config::default()
                .command_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(Config::from_url("nope://x").is_err());
        assert!(Config::default().inbound_buffer(0).validate().is_err());
        assert!(Config::default().max_body_size(0).validate().is_err());
        assert!(
            Config::default()
                .max_body_size(MAX_BODY_SIZE_LIMIT)
                .validate()
                .is_ok()
        );
        assert!(
            Config::default()
                .max_body_size(MAX_BODY_SIZE_LIMIT + 1)
                .validate()
                .is_err()
        );
        assert!(Config::default().claim_fetch_bytes(0).validate().is_err());
        let (short, long) = (Duration::from_millis(10), Duration::from_secs(1));
        assert!(
            Config::default()
                .reconnect_delay(short, long)
                .validate()
                .is_ok()
        );
        assert!(
            Config::default()
                .reconnect_delay(long, short)
                .validate()
                .is_err()
        );
        assert!(
            Config::default()
                .reconnect_delay(Duration::ZERO, long)
                .validate()
                .is_err()
        );
    }
}
