//! # clouds: typed remote services over Redis
//!
//! Write a trait once; get a typed client stub and a server dispatcher. Services that already
//! share a Redis call each other through it: no broker to run, no master node, no hand-written
//! client code.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! #[clouds::service("test")]
//! pub trait Hello {
//!     /// Greets someone.
//!     async fn hello(&self, name: String, msg: String) -> String;
//!     /// Divides, refusing zero.
//!     async fn div(&self, a: i64, b: i64) -> Result<i64, DivError>;
//! }
//!
//! /// An enum, so that every language reading the wire can tell its cases apart.
//! #[derive(Debug, serde::Serialize, serde::Deserialize)]
//! pub enum DivError { ByZero }
//!
//! struct Greeter;
//! impl Hello for Greeter {
//!     async fn hello(&self, name: String, msg: String) -> String {
//!         format!("Hello {name}, {msg}")
//!     }
//!     async fn div(&self, a: i64, b: i64) -> Result<i64, DivError> {
//!         if b == 0 { Err(DivError::ByZero) } else { Ok(a / b) }
//!     }
//! }
//!
//! # async fn demo() -> Result<(), clouds::Error> {
//! let config = clouds::Config::from_url("redis://127.0.0.1:6379/3")?
//!     .heartbeat(Duration::from_secs(2))
//!     .timeout(Duration::from_secs(2));
//!
//! let server = clouds::Server::start(config.clone()).await?;
//! server.serve(HelloServer::new(Greeter)).await?;
//!
//! let client = clouds::Client::connect(config).await?;
//! let hello = HelloClient::new(&client).with_retries(5);
//! assert_eq!(hello.hello("Glen", "hi").await?, "Hello Glen, hi");
//! assert!(hello.div(7, 0).await?.is_err());
//!
//! server.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # Streaming methods
//!
//! A method returning [`Streaming<T>`] sends many items over time; its client method returns
//! an [`ItemStream<T>`], a `futures::Stream` of `Result<T, Error>`, with credit-based flow
//! control (README, "Streaming methods"; `docs/protocol.md` §3.14):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), clouds::Error> {
//! #[clouds::service("logs")]
//! pub trait Logs {
//!     /// Lines `from` to `to`.
//!     async fn lines(&self, from: u64, to: u64) -> clouds::Streaming<String>;
//! }
//!
//! struct Memory;
//! impl Logs for Memory {
//!     async fn lines(&self, from: u64, to: u64) -> clouds::Streaming<String> {
//!         clouds::Streaming::iter((from..to).map(|n| format!("line {n}")))
//!     }
//! }
//!
//! let broker = clouds::testing::Broker::new();
//! let server = clouds::Server::start(broker.config()).await?;
//! server.serve(LogsServer::new(Memory)).await?;
//! let client = clouds::Client::connect(broker.config().stream_window(16)).await?;
//!
//! let mut lines = LogsClient::new(&client).lines(1, 4).await?;
//! let mut got = Vec::new();
//! while let Some(line) = lines.next().await {
//!     got.push(line?);
//! }
//! assert_eq!(got, ["line 1", "line 2", "line 3"]);
//! # server.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # What happens underneath
//!
//! - Every node (server, client, monitor) has a unique id and an inbox channel; calls, replies
//!   and messages are MessagePack frames published on Redis pub/sub.
//! - Each server keeps its own registry entry alive with heartbeats; one that dies drops out
//!   after the TTL (3 × heartbeat). Calls are spread over the live providers of a method.
//! - A call that times out is retried (up to the stub's retries) on another provider, then
//!   fails with [`Error::Timeout`]. A call whose provider has vanished is re-routed at once.
//! - [`Client::send`] sends free-form messages by node id; [`Monitor`] lists who serves what.
//!
//! The wire protocol and Redis layout are in `docs/protocol.md` of the repository.
//!
//! # Crates
//!
//! This crate re-exports the runtime (`clouds-core`) and the macro (`clouds-macros`);
//! depend on `clouds` alone.
//!
//! # Features
//!
//! - `tls` (default): `rediss://` and `rediss-cluster://` URLs, over rustls with the ring
//!   provider ([`Config::tls_ca_pem`], [`Config::tls_client_cert_pem`]). Without it such
//!   URLs are refused by [`Config::from_url`], never used in plaintext.
//! - `testing`: the in-memory broker (`clouds::testing`), for tests without Redis.
//! - `metrics`: call durations (`rpc.client.call.duration`, `rpc.server.call.duration`) and
//!   counters (retries, re-routes, refusals, bad frames) through the `metrics` facade; the
//!   application installs the recorder (README, "Metrics").
//! - `opentelemetry`: each call carries its attempt span's OpenTelemetry context as a W3C
//!   `traceparent`, and the server's handler span is its child (through
//!   `tracing-opentelemetry`; README, "Tracing"). Without it, spans are plain `tracing` spans
//!   and a received trace context is still readable in [`CallContext::trace`].
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use clouds_core::{
    Balance, CallContext, Client, Config, Error, ErrorCounts, Latency, Message, Messages,
    MethodStats, Monitor, NodeId, PROTOCOL_VERSION, RegistryEvent, RegistryEvents,
    RegistrySnapshot, RemoteError, Route, Server, ServerInfo, ServerStats, Service, Stats,
    TraceContext, TransportError,
};
pub use clouds_core::{ItemStream, StreamBreak, Streaming};

/// Turns a trait into a remote service: a typed client stub and a server dispatcher.
///
/// `#[clouds::service("name")]` on `trait Hello` generates:
///
/// - the trait itself, with each `async fn` returning a `Send` future, so implementors write
///   plain `async fn`;
/// - `HelloClient`: `HelloClient::new(&client)` with `with_retries(n)` and
///   `with_timeout(d)`, and one `async` method per trait method returning
///   `Result<R, clouds::Error>` (`Result<Result<T, E>, clouds::Error>` when the method
///   returns `Result<T, E>`: application errors arrive typed; `Result<ItemStream<T>,
///   clouds::Error>` when it returns [`Streaming<T>`], a streaming method). `String`
///   arguments accept anything that is `AsRef<str>`;
/// - `HelloServer<T>`: `HelloServer::new(implementation)`, to pass to
///   [`Server::serve`]. Each method is registered as `"name.method"`.
///
/// Methods must be `async fn(&self, ...)` with owned argument types (no references, no
/// `impl Trait`, no generics); arguments and return values must implement serde's
/// `Serialize` and `Deserialize`. Violations are compile errors pointing at the culprit.
///
/// ```
/// #[clouds::service("math")]
/// pub trait Math {
///     /// Adds two numbers.
///     async fn add(&self, a: i64, b: i64) -> i64;
/// }
///
/// struct Adder;
/// impl Math for Adder {
///     async fn add(&self, a: i64, b: i64) -> i64 { a + b }
/// }
///
/// fn wire(client: &clouds::Client) -> (MathClient, MathServer<Adder>) {
///     (MathClient::new(client).with_retries(2), MathServer::new(Adder))
/// }
/// ```
pub use clouds_macros::service;

/// Testing services and callers in-process, without Redis (the `testing` feature): an
/// in-memory broker with the behaviour of Redis and faults to inject.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), clouds::Error> {
/// let broker = clouds::testing::Broker::new();
/// let server = clouds::Server::start(broker.config()).await?;
/// let client = clouds::Client::connect(broker.config()).await?;
/// # server.shutdown().await?;
/// # Ok(()) }
/// ```
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing {
    pub use clouds_core::testing::{Broker, FrameFault, crash};
}

/// serde, re-exported: types that travel over clouds derive `Serialize` and `Deserialize`.
/// With `#[serde(crate = "clouds::serde")]` on them, a crate needs no serde dependency of its
/// own.
///
/// ```
/// #[derive(clouds::serde::Serialize, clouds::serde::Deserialize)]
/// #[serde(crate = "clouds::serde")]
/// pub struct Point { pub x: i32, pub y: i32 }
/// ```
pub use serde;

/// What `#[clouds::service]` expands to calls; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use clouds_core::Route;
    pub use clouds_core::codegen::{
        Stub, result_route, stream_result_route, stream_route, value_route,
    };
}
