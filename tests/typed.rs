//! End to end through the generated stubs: the API as a user writes it, against a real Redis.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clouds::{Client, Config, Error, Server};
use common::{config, eventually, redis, status};

/// The service under test.
#[clouds::service("test")]
pub trait Hello {
    /// Greets someone.
    async fn hello(&self, name: String, msg: String) -> String;
    /// Integer division; dividing by zero is an application error.
    async fn div(&self, a: i64, b: i64) -> Result<i64, DivError>;
    /// Which server answered.
    async fn whoami(&self) -> String;
    /// Sleeps, then answers.
    async fn nap(&self, millis: u64) -> u64;
    /// Panics.
    async fn boom(&self);
    /// Returns `len` bytes.
    async fn blob(&self, len: usize) -> Vec<u8>;
}

/// The application error of `div`.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("division by zero")]
pub struct DivError;

struct Greeter {
    name: String,
    calls: Arc<AtomicUsize>,
    /// How long `whoami` takes: a stuck provider answers late.
    lag: Duration,
}

impl Greeter {
    /// A greeter whose `whoami` takes `lag` to answer, and its call counter.
    fn new(name: &str, lag: Duration) -> (Self, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        (
            Greeter {
                name: name.to_string(),
                calls: calls.clone(),
                lag,
            },
            calls,
        )
    }
}

impl Hello for Greeter {
    async fn hello(&self, name: String, msg: String) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        format!("Hello {name}, {msg}")
    }
    async fn div(&self, a: i64, b: i64) -> Result<i64, DivError> {
        if b == 0 { Err(DivError) } else { Ok(a / b) }
    }
    async fn whoami(&self) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.lag).await;
        self.name.clone()
    }
    async fn nap(&self, millis: u64) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(millis)).await;
        millis
    }
    async fn boom(&self) {
        panic!("kaboom");
    }
    async fn blob(&self, len: usize) -> Vec<u8> {
        vec![7; len]
    }
}

async fn serve(config: Config, name: &str) -> (Server, Arc<AtomicUsize>) {
    serve_lagging(config, name, Duration::ZERO).await
}

/// [`serve`], with a provider whose `whoami` takes `lag` to answer.
async fn serve_lagging(config: Config, name: &str, lag: Duration) -> (Server, Arc<AtomicUsize>) {
    let server = Server::start(config).await.expect("server");
    let (greeter, calls) = Greeter::new(name, lag);
    server
        .serve(HelloServer::new(greeter))
        .await
        .expect("serve");
    (server, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_example_works() {
    let redis = redis();
    let (server, _) = serve(config(&redis), "a").await;
    let client = Client::connect(config(&redis)).await.expect("client");
    let hello = HelloClient::new(&client).with_retries(5);
    let ts = 1234;
    let s: String = hello
        .hello("Glen", format!("timestamp is {ts}"))
        .await
        .expect("hello");
    assert_eq!(s, "Hello Glen, timestamp is 1234");
    let q: Result<i64, DivError> = hello.div(7, 0).await.expect("call");
    assert_eq!(q, Err(DivError));
    assert_eq!(hello.div(7, 2).await.expect("call"), Ok(3));
    match hello.boom().await {
        Err(Error::Panicked { message, node, .. }) => {
            assert_eq!(message, "kaboom");
            assert_eq!(&node, server.id());
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
    // The server lives on after the panic.
    assert_eq!(hello.whoami().await.expect("whoami"), "a");
    let status = status(config(&redis)).await;
    assert_eq!(status.methods["test.hello"], vec![server.id().clone()]);
    assert_eq!(status.servers[server.id()].methods.len(), 6);
    assert_eq!(server.stats().in_flight, 0);
    server.shutdown().await.expect("shutdown");
    match hello.whoami().await {
        Err(Error::NoProvider { attempts: 6, .. }) => {}
        other => panic!("expected no provider after shutdown, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_balanced_over_three_providers() {
    let redis = redis();
    let mut counters = Vec::new();
    let mut servers = Vec::new();
    for name in ["a", "b", "c"] {
        let (server, calls) = serve(config(&redis), name).await;
        servers.push(server);
        counters.push(calls);
    }
    let client = Client::connect(config(&redis)).await.expect("client");
    let hello = HelloClient::new(&client);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..90 {
        *seen.entry(hello.whoami().await.expect("call")).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.values().all(|&n| n == 30),
        "round-robin is even: {seen:?}"
    );
    for server in &servers {
        server.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_provider_gets_calls_without_restarting_the_client() {
    let redis = redis();
    let (a, _) = serve(config(&redis), "a").await;
    let client = Client::connect(config(&redis)).await.expect("client");
    let hello = HelloClient::new(&client);
    assert_eq!(hello.whoami().await.expect("call"), "a");
    let (b, b_calls) = serve(config(&redis), "b").await;
    // The join event reaches the client at once; allow a heartbeat for the fallback path.
    eventually("b receives calls", Duration::from_secs(2), || async {
        hello.whoami().await.expect("call");
        b_calls.load(Ordering::SeqCst) > 0
    })
    .await;
    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_provider_is_routed_around() {
    let redis = redis();
    let (a, _) = serve(config(&redis), "a").await;
    let (b, _) = serve(config(&redis), "b").await;
    let client = Client::connect(config(&redis)).await.expect("client");
    let hello = HelloClient::new(&client).with_retries(2);
    assert!(hello.whoami().await.is_ok());
    // Dropped without shutdown: no deregistration, no leave event, just gone.
    drop(a);
    for _ in 0..50 {
        assert_eq!(hello.whoami().await.expect("failover"), "b");
    }
    b.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_reported_after_every_attempt() {
    let redis = redis();
    let cfg = config(&redis).timeout(Duration::from_millis(300));
    let (a, a_calls) = serve(cfg.clone(), "a").await;
    let client = Client::connect(cfg.clone()).await.expect("client");
    // One provider, too slow: every attempt times out.
    let hello = HelloClient::new(&client).with_retries(2);
    let started = std::time::Instant::now();
    match hello.nap(1_000).await {
        Err(Error::Timeout {
            method,
            attempts,
            after,
        }) => {
            assert_eq!(method, "test.nap");
            assert_eq!(attempts, 3);
            assert!(after >= Duration::from_millis(900), "{after:?}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    eventually(
        "all three attempts reached the provider",
        Duration::from_secs(2),
        || async { a_calls.load(Ordering::SeqCst) == 3 },
    )
    .await;
    // A timeout does not evict the provider.
    let status = status(cfg).await;
    assert!(
        status.servers.contains_key(a.id()),
        "a timeout does not evict the provider"
    );
    a.shutdown().await.expect("shutdown");
}

/// A provider that is stuck (its `whoami` answers after 2 s, against a 300 ms timeout) makes
/// the attempt sent to it time out; the retry lands on the other provider, which answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempt_is_retried_on_the_other_provider() {
    let redis = redis();
    let timeout = Duration::from_millis(300);
    let lag = Duration::from_secs(2);
    let cfg = config(&redis).timeout(timeout);
    let (stuck, stuck_calls) = serve_lagging(cfg.clone(), "stuck", lag).await;
    let (fine, fine_calls) = serve(cfg.clone(), "fine").await;
    let client = Client::connect(cfg).await.expect("client");
    let hello = HelloClient::new(&client).with_retries(1);
    // Round-robin over the two, so the first or the second call goes to the stuck one first.
    let mut timed_out = None;
    for call in 0..2 {
        let started = std::time::Instant::now();
        let answer = hello.whoami().await.expect("the retry succeeds");
        let took = started.elapsed();
        assert_eq!(
            answer, "fine",
            "call {call}: the stuck provider never answers in time"
        );
        if stuck_calls.load(Ordering::SeqCst) == 1 {
            timed_out = Some(took);
            break;
        }
        assert!(
            took < timeout,
            "call {call} went to the fine provider first: {took:?}"
        );
    }
    let took = timed_out.expect("an attempt went to the stuck provider");
    // The call waited out one whole timeout on the stuck provider, then got its answer from
    // the other: one timeout, not two (the retry did not go back to the stuck one).
    assert!(
        took >= timeout,
        "the call sat out a timeout first: {took:?}"
    );
    assert!(
        took < timeout * 2,
        "the retry was answered at once: {took:?}"
    );
    assert_eq!(
        stuck_calls.load(Ordering::SeqCst),
        1,
        "one attempt reached the stuck provider"
    );
    assert!(fine_calls.load(Ordering::SeqCst) >= 1);
    // The caller told the stuck provider it gave up: the handler is dropped, no late reply.
    eventually(
        "the stuck provider drops the handler",
        lag + Duration::from_secs(3),
        || async { stuck.stats().cancelled_calls == 1 && stuck.stats().in_flight == 0 },
    )
    .await;
    assert_eq!(client.stats().late_replies, 0);
    assert_eq!(client.stats().pending_calls, 0);
    stuck.shutdown().await.expect("shutdown");
    fine.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbs_and_namespaces_are_isolated() {
    let redis = redis();
    let db3 = config(&redis);
    let db4 = Config::from_url(&redis.url_db(4))
        .expect("url")
        .heartbeat(Duration::from_millis(200));
    let other_ns = config(&redis).namespace("other");
    let (server, _) = serve(db3.clone(), "a").await;
    for cfg in [db4, other_ns] {
        let client = Client::connect(cfg.clone()).await.expect("client");
        match HelloClient::new(&client).whoami().await {
            Err(Error::NoProvider { .. }) => {}
            other => panic!("a different deployment must not see the server: {other:?}"),
        }
        let status = status(cfg).await;
        assert!(status.servers.is_empty());
    }
    let client = Client::connect(db3).await.expect("client");
    assert_eq!(
        HelloClient::new(&client)
            .whoami()
            .await
            .expect("same deployment"),
        "a"
    );
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_loses_no_call() {
    let redis = redis();
    let cfg = config(&redis);
    let mut servers = Vec::new();
    for name in ["a", "b", "c"] {
        servers.push(serve(cfg.clone(), name).await.0);
    }
    let client = Client::connect(cfg.clone()).await.expect("client");
    let hello = HelloClient::new(&client).with_retries(3);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Calls that succeeded so far, all loops together.
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..8 {
        let hello = hello.clone();
        let (stop, done) = (stop.clone(), done.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match hello.nap(5).await {
                    Ok(_) => {
                        ok += 1;
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    // Between restarts, the load gets some calls through.
    let some_calls_go_through = || async {
        let target = done.load(Ordering::SeqCst) + 20;
        eventually("calls go through", Duration::from_secs(10), || async {
            done.load(Ordering::SeqCst) >= target
        })
        .await;
    };
    for i in 0..3 {
        some_calls_go_through().await;
        let old = servers.remove(0);
        old.shutdown().await.expect("graceful shutdown");
        servers.push(serve(cfg.clone(), &format!("new{i}")).await.0);
    }
    some_calls_go_through().await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for task in load {
        let (ok, failed) = task.await.expect("load task");
        assert!(
            failed.is_empty(),
            "calls failed during the rolling restart: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 50, "load ran: {total} calls");
    for server in servers {
        server.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_calls_in_flight() {
    let redis = redis();
    let (server, _) = serve(config(&redis), "a").await;
    let client = Client::connect(config(&redis)).await.expect("client");
    let hello = HelloClient::new(&client);
    let call = tokio::spawn(async move { hello.nap(300).await });
    eventually("the call is running", Duration::from_secs(2), || async {
        server.stats().in_flight == 1
    })
    .await;
    server.shutdown().await.expect("shutdown");
    assert_eq!(
        call.await
            .expect("task")
            .expect("the call in flight completed"),
        300
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_provider_refuses_and_the_caller_moves_on() {
    let redis = redis();
    let cfg = config(&redis).timeout(Duration::from_secs(5));
    let (busy, _) = serve(cfg.clone().max_in_flight(1), "busy").await;
    let client = Client::connect(cfg.clone()).await.expect("client");
    let hello = HelloClient::new(&client);
    let first = {
        let hello = hello.clone();
        tokio::spawn(async move { hello.nap(2_000).await })
    };
    eventually(
        "one call occupies the only slot",
        Duration::from_secs(2),
        || async { busy.stats().in_flight == 1 },
    )
    .await;
    match hello.nap(0).await {
        Err(Error::Overloaded { attempts: 1, .. }) => {}
        other => panic!("expected overloaded, got {other:?}"),
    }
    let (free, _) = serve(cfg, "free").await;
    // With retries, a refused call moves on to the free provider at once.
    let retrying = HelloClient::new(&client).with_retries(1);
    for _ in 0..4 {
        assert_eq!(retrying.whoami().await.expect("served"), "free");
    }
    assert_eq!(first.await.expect("task").expect("first call"), 2_000);
    busy.shutdown().await.expect("shutdown");
    free.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_fail_at_the_sender() {
    let redis = redis();
    let cfg = config(&redis).max_body_size(64 * 1024);
    let (server, calls) = serve(cfg.clone(), "a").await;
    let client = Client::connect(cfg).await.expect("client");
    let hello = HelloClient::new(&client);
    let big = "x".repeat(100 * 1024);
    match hello.hello(&big, "hi").await {
        Err(Error::TooLarge { size, max, .. }) => {
            assert!(size > 100 * 1024);
            assert_eq!(max, 64 * 1024);
        }
        other => panic!("expected too large, got {other:?}"),
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "nothing reached the server"
    );
    // A reply over the server's limit becomes a clear error, not a hang.
    match hello.blob(100 * 1024).await {
        Err(Error::Server { reason, .. }) => assert!(reason.contains("max_body_size"), "{reason}"),
        other => panic!("expected a server error, got {other:?}"),
    }
    assert_eq!(hello.blob(10).await.expect("small blob"), vec![7; 10]);
    // A caller with a larger limit than the server: the server refuses the call with a reason.
    let generous = Client::connect(config(&redis).max_body_size(1 << 20))
        .await
        .expect("client");
    match HelloClient::new(&generous).hello(&big, "hi").await {
        Err(Error::Server { reason, .. }) => assert!(reason.contains("max_body_size"), "{reason}"),
        other => panic!("expected the server to refuse, got {other:?}"),
    }
    assert_eq!(server.stats().oversized_frames, 1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the oversized call never ran"
    );
    // The refused claim was deleted unread: nothing is left behind.
    assert_eq!(common::claim_keys(&redis, 3), Vec::<String>::new());
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_is_counted_and_ignored() {
    let redis = redis();
    let (server, _) = serve(config(&redis), "a").await;
    let client = Client::connect(config(&redis)).await.expect("client");
    let hello = HelloClient::new(&client);
    assert_eq!(hello.whoami().await.expect("call"), "a");
    let calls = format!("clouds:3:calls:{}", server.id());
    let inbox = format!("clouds:3:inbox:{}", client.id());
    let garbage: [&[u8]; 5] = [
        b"",
        b"hello",
        &[1, 0x96, 0, 1],
        &[9, 0x90],
        &[1, 0xdd, 0xff, 0xff, 0xff, 0xff],
    ];
    for channel in [&calls, &inbox, &"clouds:3:events".to_string()] {
        for bytes in garbage {
            let r = redis
                .command_bytes(&[b"PUBLISH", channel.as_bytes(), bytes])
                .expect("publish");
            assert!(r.as_int() >= Some(1), "someone listens on {channel}");
        }
    }
    eventually("garbage counted", Duration::from_secs(2), || async {
        // The server hears its call channel and the events; the client its inbox and the events.
        server.stats().malformed_frames == 10 && client.stats().malformed_frames == 10
    })
    .await;
    assert_eq!(
        hello.hello("still", "working").await.expect("call"),
        "Hello still, working"
    );
    server.shutdown().await.expect("shutdown");
}
