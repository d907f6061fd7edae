//! The `fault` service and its configuration, shared by the `fault_provider` example (which
//! serves it) and `tests/faults.rs` (which calls it, through `#[path]`).
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

/// The service the provider processes serve.
#[clouds::service("fault")]
pub trait Fault {
    /// The serving node's id.
    async fn whoami(&self) -> String;
    /// Sleeps `ms`, then answers.
    async fn nap(&self, ms: u64) -> u64;
    /// An endless stream: 0, 1, 2, ... one every `every_ms`.
    async fn ticks(&self, every_ms: u64) -> clouds::Streaming<u64>;
    /// Sleeps `ms`, then says which node ran it: at most once per call, however often it is
    /// retried (unless the node running it dies first).
    #[clouds(once)]
    async fn charge(&self, ms: u64) -> String;
}

/// How long a stream's caller waits without hearing from its provider, in the fault tests
/// (providers send keep-alives after a quarter of it).
pub const STREAM_IDLE: Duration = Duration::from_secs(2);

/// Heartbeat of every node in the fault tests: a dead provider expires after 3 of them.
pub const HEARTBEAT: Duration = Duration::from_millis(300);
/// Call timeout of every node in the fault tests.
pub const TIMEOUT: Duration = Duration::from_millis(800);

/// The configuration of providers and callers alike, for the Redis at `url`.
pub fn fault_config(url: &str) -> clouds::Config {
    clouds::Config::from_url(url)
        .unwrap_or_else(|e| panic!("bad Redis URL {url:?}: {e}"))
        .heartbeat(HEARTBEAT)
        .timeout(TIMEOUT)
        .command_timeout(Duration::from_secs(1))
        .stream_idle_timeout(STREAM_IDLE)
        // A dead provider's exactly-once call is taken over within 300 ms; results are kept
        // for 4 s, longer than a call's 4 attempts of 800 ms, and short enough that the db is
        // empty soon after a test.
        .once_lease(Duration::from_millis(300))
        .once_window(Duration::from_secs(4))
}
