//! The behaviour suite: what every broker clouds runs on must do, written once and run against
//! each (`tests/behaviour_memory.rs`: the in-memory broker under paused time;
//! `tests/behaviour_redis.rs`: a real `redis-server`; `tests/behaviour_cluster.rs`: a real
//! 3+3 Redis Cluster). A case that passes on one and fails on another is a bug in the
//! in-memory model or in that transport.
//!
//! Each case takes a [`Backend`]: a config for a fresh, private deployment. Waiting is done on
//! tokio's clock only (timeouts, sleeps that are part of the behaviour under test), so the
//! memory runs take no real time.
#![allow(dead_code, unreachable_pub)]

mod cancel;
mod once;
pub use cancel::*;
pub use once::*;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clouds::{Balance, Client, Config, Error, Monitor, Server};

/// Where a case's nodes meet.
pub trait Backend {
    /// A config for this backend's deployment: heartbeat 300 ms (TTL 900 ms), timeout 1 s.
    fn config(&self) -> Config;

    /// Lists `node` as a provider of `method` in the registry for a minute, as a stale entry
    /// would, whether it serves `method` or not.
    fn stale_entry(&self, method: &str, node: &clouds::NodeId);

    /// The claim keys (large bodies waiting for their receiver) of this deployment now.
    fn claim_keys(&self) -> Vec<String>;

    /// The exactly-once records (`namespace:db:once:*`) of this deployment now.
    fn once_records(&self) -> Vec<String>;

    /// How many commands the exactly-once records have cost so far, on the whole broker (the
    /// in-memory broker's `ONCE_BEGIN` and `ONCE_SWAP`; Redis's `GET`s, which only the
    /// exactly-once scripts run).
    fn once_commands(&self) -> u64;

    /// On a cluster, how many primaries have served a `GETDEL` (claims go wherever the slot
    /// map puts their key); `None` elsewhere.
    fn primaries_that_served_claims(&self) -> Option<usize> {
        None
    }
}

/// The service every case serves.
#[clouds::service("suite")]
pub trait Suite {
    /// Greets someone.
    async fn hello(&self, name: String, msg: String) -> String;
    /// Integer division; by zero is an application error.
    async fn div(&self, a: i64, b: i64) -> Result<i64, DivError>;
    /// Which provider answered.
    async fn whoami(&self) -> String;
    /// Waits `millis` on tokio's clock, then says who answered.
    async fn nap(&self, millis: u64) -> String;
    /// Waits `millis` if this provider is named `who`, then says who answered.
    async fn slow_on(&self, who: String, millis: u64) -> String;
    /// Panics.
    async fn boom(&self);
}

/// The application error of `div`.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum DivError {
    /// The divisor was zero.
    ByZero,
}

/// A provider that counts its calls.
pub struct Provider {
    name: String,
    calls: Arc<AtomicUsize>,
}

impl Suite for Provider {
    async fn hello(&self, name: String, msg: String) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        format!("Hello {name}, {msg}")
    }
    async fn div(&self, a: i64, b: i64) -> Result<i64, DivError> {
        if b == 0 {
            Err(DivError::ByZero)
        } else {
            Ok(a / b)
        }
    }
    async fn whoami(&self) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.name.clone()
    }
    async fn nap(&self, millis: u64) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(millis)).await;
        self.name.clone()
    }
    async fn slow_on(&self, who: String, millis: u64) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if who == self.name {
            tokio::time::sleep(Duration::from_millis(millis)).await;
        }
        self.name.clone()
    }
    async fn boom(&self) {
        panic!("kaboom");
    }
}

/// A server named `name` serving [`Suite`], and its call counter.
pub async fn serve(config: Config, name: &str) -> (Server, Arc<AtomicUsize>) {
    let server = Server::start(config).await.expect("server starts");
    let calls = Arc::new(AtomicUsize::new(0));
    server
        .serve(SuiteServer::new(Provider {
            name: name.to_string(),
            calls: calls.clone(),
        }))
        .await
        .expect("serve");
    (server, calls)
}

pub async fn client(config: Config) -> Client {
    Client::connect(config).await.expect("client connects")
}

/// Polls `check` on tokio's clock until it holds, for at most `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn typed_calls_app_errors_and_panics(b: impl Backend) {
    let (server, _) = serve(b.config(), "a").await;
    let client = client(b.config()).await;
    let suite = SuiteClient::new(&client);
    assert_eq!(
        suite.hello("Glen", "hi").await.expect("hello"),
        "Hello Glen, hi"
    );
    assert_eq!(suite.div(7, 2).await.expect("div"), Ok(3));
    assert_eq!(suite.div(7, 0).await.expect("div"), Err(DivError::ByZero));
    match suite.boom().await {
        Err(Error::Panicked { message, node, .. }) => {
            assert!(message.contains("kaboom"), "{message}");
            assert_eq!(&node, server.id());
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    // The server lives on after a panic.
    assert_eq!(suite.whoami().await.expect("whoami"), "a");
    server.shutdown().await.expect("shutdown");
}

pub async fn bad_arguments_and_unknown_names(b: impl Backend) {
    let (server, _) = serve(b.config(), "a").await;
    let client = client(b.config()).await;
    match client.call::<_, i64>("suite.div", ("seven", 2)).await {
        Err(Error::BadArguments { method, .. }) => assert_eq!(method, "suite.div"),
        other => panic!("expected BadArguments, got {other:?}"),
    }
    match client.call::<_, i64>("suite.div", (1,)).await {
        Err(Error::BadArguments { .. }) => {}
        other => panic!("expected BadArguments for a missing argument, got {other:?}"),
    }
    // A valid name nobody serves: no provider (a provider answers UnknownMethod only when a
    // stale registry entry sends it a call it has no route for: see tests/dynamic.rs).
    match client.call::<_, ()>("suite.nothing", ()).await {
        Err(Error::NoProvider { method, .. }) => assert_eq!(method, "suite.nothing"),
        other => panic!("expected NoProvider, got {other:?}"),
    }
    match client.call::<_, ()>("bad name with spaces", ()).await {
        Err(Error::InvalidMethod { .. }) => {}
        other => panic!("expected InvalidMethod, got {other:?}"),
    }
    server.shutdown().await.expect("shutdown");
}

pub async fn unknown_method_from_a_stale_entry(b: impl Backend) {
    let (server, _) = serve(b.config(), "a").await;
    b.stale_entry("suite.retired", server.id());
    let client = client(b.config()).await.with_retries(2);
    match client.call::<_, String>("suite.retired", ()).await {
        Err(Error::UnknownMethod { method, node }) => {
            assert_eq!(method, "suite.retired");
            assert_eq!(&node, server.id());
        }
        other => panic!("expected UnknownMethod, got {other:?}"),
    }
    // Not retried: the answer would be the same.
    assert_eq!(client.stats().rerouted_calls, 0);
    server.shutdown().await.expect("shutdown");
}

pub async fn no_provider_fails_fast(b: impl Backend) {
    let client = client(b.config()).await.with_retries(0);
    let started = tokio::time::Instant::now();
    match client.call::<_, String>("suite.whoami", ()).await {
        Err(Error::NoProvider { attempts, .. }) => assert_eq!(attempts, 1),
        other => panic!("expected NoProvider, got {other:?}"),
    }
    // No waiting for a timeout: nothing to send to.
    assert!(started.elapsed() < Duration::from_millis(500));
}

pub async fn timeout_then_retry_on_another_provider(b: impl Backend) {
    let timeout = Duration::from_millis(300);
    let config = b.config().timeout(timeout);
    let (slow, slow_calls) = serve(config.clone(), "slow").await;
    let (fast, _) = serve(config.clone(), "fast").await;
    let client = client(config).await;
    let suite = SuiteClient::new(&client).with_retries(1);
    // Round-robin sends one of the first two calls to "slow" first, where it outlasts the
    // timeout; the retry lands on "fast".
    let mut timed_out_then_retried = 0;
    for _ in 0..2 {
        let before = slow_calls.load(Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        assert_eq!(
            suite.slow_on("slow", 2_000).await.expect("answered"),
            "fast"
        );
        if slow_calls.load(Ordering::SeqCst) > before {
            assert!(started.elapsed() >= timeout, "the first attempt timed out");
            timed_out_then_retried += 1;
        }
    }
    assert_eq!(timed_out_then_retried, 1);
    // Slow everywhere: every attempt times out, and the error says how many there were.
    match suite.nap(2_000).await {
        Err(Error::Timeout {
            attempts, method, ..
        }) => {
            assert_eq!(attempts, 2);
            assert_eq!(method, "suite.nap");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    slow.shutdown().await.expect("shutdown");
    fast.shutdown().await.expect("shutdown");
}

pub async fn reroute_when_nobody_received(b: impl Backend) {
    let (gone, _) = serve(b.config(), "gone").await;
    let (alive, alive_calls) = serve(b.config(), "alive").await;
    let client = client(b.config()).await;
    let suite = SuiteClient::new(&client);
    // Both are known to the client.
    for _ in 0..2 {
        suite.whoami().await.expect("whoami");
    }
    clouds::testing::crash(gone).await;
    // The crashed one is still in the registry (until its TTL), but its call channel is gone:
    // every call is re-routed at once, none fails and none waits for a timeout.
    let started = tokio::time::Instant::now();
    for _ in 0..6 {
        assert_eq!(suite.whoami().await.expect("re-routed"), "alive");
    }
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(alive_calls.load(Ordering::SeqCst) >= 6);
    assert!(client.stats().rerouted_calls >= 1);
    alive.shutdown().await.expect("shutdown");
}

/// Calls made together go to a provider in batches (`docs/protocol.md` §3.12): when the
/// provider is gone, a batch that reached nobody re-routes every call in it, and each gets
/// its own answer from the provider that is left.
pub async fn batched_calls_reroute_together_when_nobody_received(b: impl Backend) {
    let (gone, _) = serve(b.config(), "gone").await;
    let (alive, alive_calls) = serve(b.config(), "alive").await;
    let client = client(b.config()).await.with_retries(0);
    let suite = SuiteClient::new(&client);
    for _ in 0..2 {
        suite.whoami().await.expect("whoami");
    }
    clouds::testing::crash(gone).await;
    let before = alive_calls.load(Ordering::SeqCst);
    let calls = (0..40).map(|_| suite.whoami());
    for answer in futures_util::future::join_all(calls).await {
        assert_eq!(answer.expect("re-routed, not failed"), "alive");
    }
    assert_eq!(alive_calls.load(Ordering::SeqCst) - before, 40);
    assert!(client.stats().rerouted_calls >= 1);
    alive.shutdown().await.expect("shutdown");
}

pub async fn overloaded_provider_refuses(b: impl Backend) {
    let (busy, _) = serve(b.config().max_in_flight(1), "busy").await;
    let client = client(b.config()).await;
    let suite = SuiteClient::new(&client).with_retries(0);
    let long = {
        let suite = SuiteClient::new(&client);
        tokio::spawn(async move { suite.nap(400).await })
    };
    // Wait until the long call is running there.
    eventually("the first call runs", Duration::from_secs(2), || async {
        busy.stats().in_flight == 1
    })
    .await;
    match suite.whoami().await {
        Err(Error::Overloaded { .. }) => {}
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert!(client.stats().overloaded_replies >= 1);
    assert_eq!(long.await.expect("join").expect("long call"), "busy");
    // Once free, it serves again.
    assert_eq!(suite.whoami().await.expect("whoami"), "busy");
    busy.shutdown().await.expect("shutdown");
}

pub async fn round_robin_and_least_in_flight(b: impl Backend) {
    let (a, a_calls) = serve(b.config(), "a").await;
    let (c, c_calls) = serve(b.config(), "c").await;
    let client = client(b.config()).await;
    let suite = SuiteClient::new(&client);
    for _ in 0..10 {
        suite.whoami().await.expect("whoami");
    }
    assert_eq!(a_calls.load(Ordering::SeqCst), 5, "round-robin: even share");
    assert_eq!(c_calls.load(Ordering::SeqCst), 5, "round-robin: even share");

    let least = Client::connect(b.config().balance(Balance::LeastInFlight))
        .await
        .expect("client");
    let suite = SuiteClient::new(&least);
    // One long call pins one provider; the next ones go to the other.
    let pinned = {
        let suite = SuiteClient::new(&least);
        tokio::spawn(async move { suite.nap(300).await })
    };
    eventually("the long call runs", Duration::from_secs(2), || async {
        a.stats().in_flight + c.stats().in_flight == 1
    })
    .await;
    let busy = if a.stats().in_flight == 1 { "a" } else { "c" };
    for _ in 0..4 {
        let who = suite.whoami().await.expect("whoami");
        assert_ne!(who, busy, "least-in-flight avoids the busy provider");
    }
    pinned.await.expect("join").expect("long call");
    a.shutdown().await.expect("shutdown");
    c.shutdown().await.expect("shutdown");
}

pub async fn messages_between_nodes(b: impl Backend) {
    let (server, _) = serve(b.config(), "a").await;
    let client = client(b.config()).await;
    client
        .send(server.id(), &("hello", 42))
        .await
        .expect("send");
    let message = server.messages().next().await.expect("a message");
    assert_eq!(message.from(), client.id());
    assert_eq!(
        message.decode::<(String, i32)>().expect("decode"),
        ("hello".to_string(), 42)
    );
    // To nobody: unreachable.
    match client.send("server-nobody-1-1-000000", &"hi").await {
        Err(Error::Unreachable { .. }) => {}
        other => panic!("expected Unreachable, got {other:?}"),
    }
    server.shutdown().await.expect("shutdown");
}

/// Calls, results and messages over the claim threshold (64 KiB by default) travel as claims:
/// they arrive whole, and no claim is left behind.
pub async fn large_payloads_travel_as_claims(b: impl Backend) {
    let (server, calls) = serve(b.config(), "a").await;
    let client = client(b.config()).await;
    let suite = SuiteClient::new(&client);
    let name = "n".repeat(200 << 10);
    let concurrent: Vec<_> = (0..16)
        .map(|i| {
            let suite = suite.clone();
            let name = format!("{i}{name}");
            tokio::spawn(async move { suite.hello(name, "hi").await })
        })
        .collect();
    for (i, call) in concurrent.into_iter().enumerate() {
        let greeting = call.await.expect("join").expect("a claimed call");
        assert_eq!(
            greeting.len(),
            "Hello , hi".len() + (200 << 10) + i.to_string().len()
        );
        assert!(greeting.starts_with(&format!("Hello {i}nnn")));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 16);
    client.send(server.id(), &name).await.expect("send");
    let message = server.messages().next().await.expect("a message");
    assert_eq!(message.decode::<String>().expect("decode"), name);
    eventually("no claim is left", Duration::from_secs(2), || async {
        b.claim_keys().is_empty()
    })
    .await;
    if let Some(primaries) = b.primaries_that_served_claims() {
        assert!(
            primaries > 1,
            "claims spread over the primaries ({primaries})"
        );
    }
    server.shutdown().await.expect("shutdown");
}

pub async fn monitor_lists_who_serves_what(b: impl Backend) {
    let (server, _) = serve(b.config(), "a").await;
    let monitor = Monitor::connect(b.config()).await.expect("monitor");
    let snapshot = monitor.snapshot().await.expect("snapshot");
    let info = snapshot
        .servers
        .get(server.id())
        .expect("the server is listed");
    assert_eq!(info.methods.len(), 6);
    assert!(info.methods.contains(&"suite.hello".to_string()));
    assert_eq!(info.pid, std::process::id());
    assert_eq!(
        snapshot.methods.get("suite.whoami"),
        Some(&vec![server.id().clone()])
    );
    server.shutdown().await.expect("shutdown");
    let snapshot = monitor.snapshot().await.expect("snapshot");
    assert!(snapshot.servers.is_empty() && snapshot.methods.is_empty());
}

pub async fn graceful_shutdown_under_load(b: impl Backend) {
    let (leaving, _) = serve(b.config(), "leaving").await;
    let (staying, _) = serve(b.config(), "staying").await;
    let client = client(b.config()).await;
    let mut calls = Vec::new();
    for _ in 0..20 {
        let suite = SuiteClient::new(&client).with_retries(2);
        calls.push(tokio::spawn(async move { suite.nap(50).await }));
    }
    // Let the calls reach both providers, then shut one down while they run.
    eventually(
        "calls are running on the leaving server",
        Duration::from_secs(2),
        || async { leaving.stats().in_flight > 0 },
    )
    .await;
    leaving.shutdown().await.expect("shutdown");
    for call in calls {
        call.await.expect("join").expect("no call is lost");
    }
    // New calls go to the one that stayed.
    let suite = SuiteClient::new(&client);
    assert_eq!(suite.whoami().await.expect("whoami"), "staying");
    staying.shutdown().await.expect("shutdown");
}

pub async fn a_crashed_server_answers_nothing_more(b: impl Backend) {
    let (server, _) = serve(b.config(), "doomed").await;
    let client = client(b.config().timeout(Duration::from_millis(500))).await;
    let running = {
        let suite = SuiteClient::new(&client).with_retries(0);
        tokio::spawn(async move { suite.nap(100).await })
    };
    eventually("the call runs", Duration::from_secs(2), || async {
        server.stats().in_flight == 1
    })
    .await;
    clouds::testing::crash(server).await;
    // Its handler finishes, but a dead process sends no reply.
    match running.await.expect("join") {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
}

pub async fn a_dead_provider_expires(b: impl Backend) {
    let config = b.config();
    let (server, _) = serve(config.clone(), "dead").await;
    let id = server.id().clone();
    let monitor = Monitor::connect(config.clone()).await.expect("monitor");
    clouds::testing::crash(server).await;
    assert!(
        monitor
            .snapshot()
            .await
            .expect("snapshot")
            .servers
            .contains_key(&id),
        "a crashed server stays listed until its TTL"
    );
    eventually("the entry expires", Duration::from_secs(3), || async {
        !monitor
            .snapshot()
            .await
            .expect("snapshot")
            .servers
            .contains_key(&id)
    })
    .await;
    let client = client(config).await.with_retries(0);
    match client.call::<_, String>("suite.whoami", ()).await {
        Err(Error::NoProvider { .. }) => {}
        other => panic!("expected NoProvider once expired, got {other:?}"),
    }
}

/// One `#[tokio::test]` per case, each with a fresh backend from `$backend`.
#[macro_export]
macro_rules! behaviour_suite {
    // The cases, listed once: appended to `$($head)*`, which is expanded with them.
    (@with_cases [$($head:tt)*]) => {
        $crate::behaviour_suite!($($head)*
            typed_calls_app_errors_and_panics
            bad_arguments_and_unknown_names
            unknown_method_from_a_stale_entry
            no_provider_fails_fast
            timeout_then_retry_on_another_provider
            reroute_when_nobody_received
            batched_calls_reroute_together_when_nobody_received
            overloaded_provider_refuses
            round_robin_and_least_in_flight
            messages_between_nodes
            large_payloads_travel_as_claims
            monitor_lists_who_serves_what
            graceful_shutdown_under_load
            a_crashed_server_answers_nothing_more
            a_dead_provider_expires
            a_dropped_call_drops_its_handler
            a_timed_out_attempt_drops_its_handler_before_the_retry
            finished_calls_send_no_cancel
            a_closing_client_cancels_its_calls_in_flight
            a_retried_once_call_runs_once_and_returns_its_result
            unmarked_calls_do_no_extra_redis_work
            a_streaming_route_marked_once_keeps_no_record
        );
    };
    (@sequence $test:ident [$backend:expr] $attrs:tt $($case:ident)*) => {
        #[tokio::test $attrs]
        async fn $test() {
            let backend = $backend;
            $(
                let started = std::time::Instant::now();
                behaviour::$case(backend(stringify!($case))).await;
                eprintln!("{}: passed in {:?}", stringify!($case), started.elapsed());
            )*
        }
    };
    (@cases [$backend:expr] $attrs:tt $($case:ident)*) => {
        $(
            #[tokio::test $attrs]
            async fn $case() {
                behaviour::$case($backend).await;
            }
        )*
    };
    // Every case in one test, one after the other, each with `$backend(case_name)`: for a
    // backend too costly to start once per case (a Redis Cluster is six processes).
    (one_test $test:ident, $backend:expr, $($attr:tt)*) => {
        $crate::behaviour_suite!(@with_cases [@sequence $test [$backend] ($($attr)*)]);
    };
    // One test per case, each with a fresh `$backend`.
    ($backend:expr, $($attr:tt)*) => {
        $crate::behaviour_suite!(@with_cases [@cases [$backend] ($($attr)*)]);
    };
}
