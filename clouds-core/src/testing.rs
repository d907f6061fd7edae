//! Testing services and callers in-process, without Redis (the `testing` feature).
//!
//! A [`Broker`] is an in-memory stand-in for the Redis that a deployment shares: nodes whose
//! config names it ([`Broker::config`]) register, heartbeat, expire, call, re-route, retry and
//! shut down exactly as they do over Redis; the same behaviour suite runs against both. Faults a
//! test can inject: a node that stops reading ([`Broker::freeze`], [`Broker::stall`]), lost
//! subscriptions ([`Broker::drop_subscriptions`]), a cut connection ([`Broker::disconnect`],
//! [`Broker::reconnect`]), failing or slow commands ([`Broker::fail_commands`],
//! [`Broker::delay_next_command`]), one frame dropped, duplicated or delayed
//! ([`Broker::fault_next_frame`]), and stale registry entries ([`Broker::stale_entry`]).
//!
//! Under `tokio::time::pause()` heartbeats, TTLs, timeouts and retries take no real time:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), clouds_core::Error> {
//! use std::time::Duration;
//! let broker = clouds_core::testing::Broker::new();
//! let config = broker.config().heartbeat(Duration::from_secs(2)); // entries live 6 s
//! let server = clouds_core::Server::start(config.clone()).await?;
//! server.register("test.ping", |(): ()| async { Ok::<_, std::convert::Infallible>("pong") }).await?;
//! let monitor = clouds_core::Monitor::connect(config).await?;
//! assert_eq!(monitor.snapshot().await?.servers.len(), 1);
//!
//! // The provider's host drops off the network: its heartbeats fail and its entry expires.
//! broker.disconnect(server.id());
//! tokio::time::sleep(Duration::from_secs(7)).await; // no real time: the clock is paused
//! assert!(monitor.snapshot().await?.servers.is_empty());
//! # Ok(()) }
//! ```

pub use crate::transport::memory::{Broker, FrameFault};

/// Ends `server` as if its process had died, over Redis or a [`Broker`] alike: it stops
/// heartbeating, reading and replying, and its connections close, but it does not leave the
/// registry. Callers then find its channels gone and re-route at once, and its entry expires
/// after the TTL: what a test of failover wants.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), clouds_core::Error> {
/// let broker = clouds_core::testing::Broker::new();
/// let server = clouds_core::Server::start(broker.config()).await?;
/// let id = server.id().clone();
/// clouds_core::testing::crash(server).await;
/// let monitor = clouds_core::Monitor::connect(broker.config()).await?;
/// assert!(monitor.snapshot().await?.servers.contains_key(&id)); // until its TTL passes
/// # Ok(()) }
/// ```
pub async fn crash(server: crate::Server) {
    server.crash().await;
}
