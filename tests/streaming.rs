//! Streaming methods end to end, on the in-memory broker and on a real Redis: items in order
//! then the end, a typed error as the last item, flow control with a consumer slower than its
//! producer (bounded items in the system, RSS reported), the caller dropping the stream, the
//! provider crashing or shutting down, opening by name, and composition with signing.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clouds::{Client, Config, Error, Server, StreamBreak, Streaming};
use futures_util::StreamExt;

/// The application error of `Logs::checked`.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LogError {
    /// The log is damaged at `at`.
    Corrupt {
        /// Where.
        at: u64,
    },
}

/// The streaming service under test.
#[clouds::service("logs")]
pub trait Logs {
    /// 0, 1, ... n - 1, as fast as the caller takes them.
    async fn count(&self, n: u64) -> Streaming<u64>;
    /// 0, 1, ... up to `fail_at`, which fails.
    async fn checked(&self, n: u64, fail_at: u64) -> Streaming<Result<u64, LogError>>;
    /// An endless stream holding a drop guard.
    async fn endless(&self) -> Streaming<u64>;
    /// A plain call, to check calls and streams side by side.
    async fn hello(&self) -> String;
}

/// What the provider saw: items produced, and when its last stream was dropped.
#[derive(Default)]
struct Seen {
    produced: AtomicU64,
    dropped: Mutex<Option<Instant>>,
    dropped_tx: Mutex<Option<tokio::sync::oneshot::Sender<Instant>>>,
}

/// Records when the stream holding it is dropped.
struct DropGuard(Arc<Seen>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        *self.0.dropped.lock().expect("lock") = Some(now);
        if let Some(tx) = self.0.dropped_tx.lock().expect("lock").take() {
            let _ = tx.send(now);
        }
    }
}

struct Impl(Arc<Seen>);

impl Logs for Impl {
    async fn count(&self, n: u64) -> Streaming<u64> {
        let seen = self.0.clone();
        Streaming::new(futures_util::stream::iter(0..n).map(move |i| {
            seen.produced.fetch_add(1, Ordering::SeqCst);
            i
        }))
    }

    async fn checked(&self, n: u64, fail_at: u64) -> Streaming<Result<u64, LogError>> {
        Streaming::iter((0..n).map(move |i| {
            if i == fail_at {
                Err(LogError::Corrupt { at: i })
            } else {
                Ok(i)
            }
        }))
    }

    async fn endless(&self) -> Streaming<u64> {
        let guard = DropGuard(self.0.clone());
        let seen = self.0.clone();
        Streaming::new(futures_util::stream::unfold(0u64, move |n| {
            let _hold = &guard;
            let seen = seen.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                seen.produced.fetch_add(1, Ordering::SeqCst);
                Some((n, n + 1))
            }
        }))
    }

    async fn hello(&self) -> String {
        "hi".into()
    }
}

struct Setup {
    server: Server,
    client: Client,
    seen: Arc<Seen>,
    // Kept alive for the test's length (Redis: also inspected).
    redis: Option<common::RedisServer>,
    _cluster: Option<clouds_testkit::RedisCluster>,
}

impl Setup {
    async fn new(backend: Backend, tune: impl Fn(Config) -> Config) -> Setup {
        let (config, redis, cluster) = match backend {
            Backend::Memory => (clouds::testing::Broker::new().config(), None, None),
            Backend::Redis => {
                let redis = common::redis();
                (common::config(&redis), Some(redis), None)
            }
            Backend::Cluster => {
                let cluster = clouds_testkit::RedisCluster::start().expect("a Redis Cluster");
                let config = Config::from_url(&cluster.seed_url())
                    .expect("url")
                    .heartbeat(Duration::from_millis(300));
                (config, None, Some(cluster))
            }
        };
        let config = tune(config.timeout(Duration::from_secs(2)));
        let server = Server::start(config.clone()).await.expect("server");
        let seen = Arc::new(Seen::default());
        server
            .serve(LogsServer::new(Impl(seen.clone())))
            .await
            .expect("serve");
        let client = Client::connect(config).await.expect("client");
        Setup {
            server,
            client,
            seen,
            redis,
            _cluster: cluster,
        }
    }

    fn logs(&self) -> LogsClient {
        LogsClient::new(&self.client)
    }
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Redis,
    /// 3 primaries and 3 replicas: items go to the caller's inbox and credit to the
    /// provider's inbox, sharded channels on slots of their own.
    Cluster,
}

/// Items arrive in order, then the stream ends; the server's place in flight is given back.
async fn items_in_order_then_the_end(backend: Backend) {
    let setup = Setup::new(backend, |c| c).await;
    let items: Vec<u64> = setup
        .logs()
        .count(1000)
        .await
        .expect("open")
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(items, (0..1000).collect::<Vec<_>>());
    let empty: Vec<_> = setup.logs().count(0).await.expect("open").collect().await;
    assert!(empty.is_empty(), "an empty stream just ends");
    // Calls and streams side by side on one client and server.
    assert_eq!(setup.logs().hello().await.expect("call"), "hi");
    common::eventually("the server is idle", Duration::from_secs(2), || async {
        let stats = setup.server.stats();
        stats.in_flight == 0 && stats.open_streams == 0
    })
    .await;
    assert_eq!(setup.client.stats().pending_calls, 0);
    setup.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_items_in_order_then_the_end() {
    items_in_order_then_the_end(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_items_in_order_then_the_end() {
    items_in_order_then_the_end(Backend::Redis).await;
}

/// An `Err` item ends the stream: the caller gets it typed, last.
async fn an_application_error_is_the_last_item(backend: Backend) {
    let setup = Setup::new(backend, |c| c).await;
    let items: Vec<_> = setup
        .logs()
        .checked(10, 3)
        .await
        .expect("open")
        .map(|item| item.expect("no transport error"))
        .collect()
        .await;
    assert_eq!(
        items,
        vec![Ok(0), Ok(1), Ok(2), Err(LogError::Corrupt { at: 3 })]
    );
    setup.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_an_application_error_is_the_last_item() {
    an_application_error_is_the_last_item(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_application_error_is_the_last_item() {
    an_application_error_is_the_last_item(Backend::Redis).await;
}

/// Resident memory of this process, in KiB (Linux), for the figures printed.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

const WINDOW: u32 = 64;

/// The largest pub/sub output buffer (`omem` in `CLIENT LIST`) of any subscriber connection.
fn pubsub_output_bytes(redis: &common::RedisServer) -> u64 {
    let list = redis.command(&["CLIENT", "LIST"]).expect("CLIENT LIST");
    let text = list.as_text().expect("text").to_string();
    text.lines()
        .filter(|line| !line.contains(" sub=0 "))
        .filter_map(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("omem="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .max()
        .unwrap_or(0)
}

/// 100,000 items through a consumer slower than the producer: the producer is held back by
/// the credit, so the items produced and not yet consumed (in the provider, Redis, and the
/// caller) never exceed the window, and the caller never holds more than the window.
async fn a_slow_consumer_slows_the_producer(backend: Backend) {
    let setup = Setup::new(backend, |c| c.stream_window(WINDOW)).await;
    const ITEMS: u64 = 100_000;
    let rss_before = rss_kib();
    let started = Instant::now();
    let mut items = setup.logs().count(ITEMS).await.expect("open");
    let mut next = 0;
    let mut most_ahead = 0;
    let mut most_buffered = 0;
    let mut most_omem = 0;
    while let Some(item) = items.next().await {
        assert_eq!(item.expect("item"), next);
        next += 1;
        let produced = setup.seen.produced.load(Ordering::SeqCst);
        // Produced and not yet consumed: at most the window, plus the item in hand.
        let ahead = produced - next;
        most_ahead = most_ahead.max(ahead);
        most_buffered = most_buffered.max(items.held_items());
        assert!(
            ahead <= u64::from(WINDOW) + 1,
            "the producer ran {ahead} items ahead of the consumer (window {WINDOW})"
        );
        assert!(items.held_items() <= WINDOW as usize);
        // Slower than the producer: a pause every 1000 items.
        if next % 1000 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            // On Redis, what waits in the subscribers' pub/sub output buffers right now.
            if let Some(redis) = &setup.redis {
                most_omem = most_omem.max(pubsub_output_bytes(redis));
            }
        }
    }
    assert_eq!(next, ITEMS);
    eprintln!(
        "FIGURES slow_consumer {backend:?}: items={ITEMS} window={WINDOW} most_ahead={most_ahead} most_buffered={most_buffered} most_pubsub_omem_bytes={most_omem} rss_before_kib={} rss_after_kib={} elapsed_ms={}",
        rss_before,
        rss_kib(),
        started.elapsed().as_millis()
    );
    // 64 small items are a few KiB: nothing piles up in Redis for the slow consumer.
    assert!(most_omem < 1 << 20, "{most_omem} bytes queued in Redis");
    setup.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_slow_consumer_slows_the_producer() {
    a_slow_consumer_slows_the_producer(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_slow_consumer_slows_the_producer() {
    a_slow_consumer_slows_the_producer(Backend::Redis).await;
}

/// The caller drops the stream after 10 items: the provider's stream (and its drop guard)
/// is dropped within 100 ms, and the call's place in flight is given back.
async fn dropping_the_stream_drops_it_at_the_provider(backend: Backend) {
    let setup = Setup::new(backend, |c| c).await;
    let (tx, dropped) = tokio::sync::oneshot::channel();
    *setup.seen.dropped_tx.lock().expect("lock") = Some(tx);
    let mut items = setup.logs().endless().await.expect("open");
    for expected in 0..10 {
        assert_eq!(items.next().await.expect("an item").expect("ok"), expected);
    }
    assert_eq!(
        setup.server.stats().in_flight,
        1,
        "a stream is one call in flight"
    );
    assert_eq!(setup.server.stats().open_streams, 1);
    let dropped_at = Instant::now();
    drop(items);
    let guard_dropped = tokio::time::timeout(Duration::from_secs(2), dropped)
        .await
        .expect("the provider's stream is dropped")
        .expect("sent");
    let after = guard_dropped.saturating_duration_since(dropped_at);
    eprintln!("FIGURES caller_drop {backend:?}: provider stream dropped after {after:?}");
    assert!(
        after <= Duration::from_millis(100),
        "dropped after {after:?}"
    );
    common::eventually("the server is idle", Duration::from_secs(2), || async {
        let stats = setup.server.stats();
        stats.in_flight == 0 && stats.open_streams == 0
    })
    .await;
    setup.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_dropping_the_stream_drops_it_at_the_provider() {
    dropping_the_stream_drops_it_at_the_provider(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dropping_the_stream_drops_it_at_the_provider() {
    dropping_the_stream_drops_it_at_the_provider(Backend::Redis).await;
}

const IDLE: Duration = Duration::from_millis(800);

/// The provider crashes mid-stream: the caller gets a typed error within the idle timeout,
/// after the items that did arrive.
async fn a_crashed_provider_breaks_the_stream(backend: Backend) {
    let setup = Setup::new(backend, |c| c.stream_idle_timeout(IDLE)).await;
    let mut items = setup.logs().endless().await.expect("open");
    for expected in 0..5 {
        assert_eq!(items.next().await.expect("an item").expect("ok"), expected);
    }
    let crashed_at = Instant::now();
    clouds::testing::crash(setup.server).await;
    let error = tokio::time::timeout(IDLE * 3, async {
        loop {
            match items.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return e,
                None => panic!("the stream ended without an error"),
            }
        }
    })
    .await
    .expect("no hang");
    let after = crashed_at.elapsed();
    eprintln!("FIGURES provider_crash {backend:?}: stream broke after {after:?}");
    assert!(
        matches!(
            error,
            Error::StreamBroken {
                reason: StreamBreak::Idle { .. },
                ..
            }
        ),
        "{error:?}"
    );
    assert!(after <= IDLE + Duration::from_millis(500), "{after:?}");
    assert!(items.next().await.is_none(), "nothing after the error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_crashed_provider_breaks_the_stream() {
    a_crashed_provider_breaks_the_stream(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_crashed_provider_breaks_the_stream() {
    a_crashed_provider_breaks_the_stream(Backend::Redis).await;
}

/// A stream that is alive but idle (a consumer that stops reading, so the provider waits
/// for credit) is kept alive by keep-alives: it outlives several idle timeouts.
async fn an_idle_stream_stays_alive(backend: Backend) {
    let setup = Setup::new(backend, |c| {
        c.stream_idle_timeout(Duration::from_millis(300))
    })
    .await;
    let mut items = setup.logs().endless().await.expect("open");
    assert_eq!(items.next().await.expect("item").expect("ok"), 0);
    // The consumer does not read for five idle timeouts; the provider stops at the window.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for expected in 1..200 {
        assert_eq!(items.next().await.expect("item").expect("ok"), expected);
    }
    assert_eq!(setup.server.stats().open_streams, 1);
    drop(items);
    setup.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_an_idle_stream_stays_alive() {
    an_idle_stream_stays_alive(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_idle_stream_stays_alive() {
    an_idle_stream_stays_alive(Backend::Redis).await;
}

/// A graceful shutdown ends running streams at once, with a typed error after the items
/// already sent, instead of waiting for an endless stream or leaving its caller hanging.
async fn a_shutdown_ends_streams_cleanly(backend: Backend) {
    let setup = Setup::new(backend, |c| c).await;
    let mut items = setup.logs().endless().await.expect("open");
    assert_eq!(items.next().await.expect("item").expect("ok"), 0);
    let started = Instant::now();
    setup.server.shutdown().await.expect("shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    let mut next = 1;
    let error = loop {
        match tokio::time::timeout(Duration::from_secs(5), items.next())
            .await
            .expect("no hang")
        {
            Some(Ok(item)) => {
                assert_eq!(item, next);
                next += 1;
            }
            Some(Err(e)) => break e,
            None => panic!("ended without saying why"),
        }
    };
    assert!(
        matches!(
            error,
            Error::StreamBroken {
                reason: StreamBreak::ShuttingDown,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        setup.seen.dropped.lock().expect("lock").is_some(),
        "the provider's stream was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_shutdown_ends_streams_cleanly() {
    a_shutdown_ends_streams_cleanly(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_shutdown_ends_streams_cleanly() {
    a_shutdown_ends_streams_cleanly(Backend::Redis).await;
}

/// By name, like `clouds call`; wrong uses fail clearly.
async fn by_name_and_misuse(backend: Backend) {
    let setup = Setup::new(backend, |c| c).await;
    let items: Vec<u64> = setup
        .client
        .clone()
        .with_stream_window(2)
        .open_stream::<_, u64>("logs.count", (3u64,))
        .await
        .expect("open")
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(items, [0, 1, 2]);
    let unary = setup
        .client
        .open_stream::<_, u64>("logs.hello", ())
        .await
        .expect_err("not a stream");
    assert!(matches!(unary, Error::Protocol(_)), "{unary:?}");
    let streamed = setup
        .client
        .call::<_, u64>("logs.count", (3u64,))
        .await
        .expect_err("a stream is not a call");
    assert!(matches!(streamed, Error::Protocol(_)), "{streamed:?}");
    let unknown = setup
        .client
        .open_stream::<_, u64>("logs.nothing", ())
        .await
        .expect_err("unknown");
    assert!(matches!(unknown, Error::NoProvider { .. }), "{unknown:?}");
    let bad = setup
        .client
        .open_stream::<_, u64>("logs.count", ("x",))
        .await
        .expect_err("bad arguments");
    assert!(matches!(bad, Error::BadArguments { .. }), "{bad:?}");
    // A wrong item type fails on the item, not the stream's opening.
    let mut wrong = setup
        .client
        .open_stream::<_, String>("logs.count", (1u64,))
        .await
        .expect("open");
    assert!(matches!(wrong.next().await, Some(Err(Error::Codec { .. }))));
    drop(wrong);
    setup.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_by_name_and_misuse() {
    by_name_and_misuse(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_by_name_and_misuse() {
    by_name_and_misuse(Backend::Redis).await;
}

/// Streams compose with signed frames and with batching turned off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_with_signing_and_without_batching() {
    for tune in [
        (|c: Config| c.signing_key(1, [7u8; 32])) as fn(Config) -> Config,
        |c: Config| c.batching(false),
    ] {
        let setup = Setup::new(Backend::Redis, tune).await;
        let items: Vec<u64> = setup
            .logs()
            .count(5000)
            .await
            .expect("open")
            .map(|item| item.expect("item"))
            .collect()
            .await;
        assert_eq!(items, (0..5000).collect::<Vec<_>>());
        let stats = setup.client.stats();
        assert_eq!(stats.unauthenticated_frames + stats.malformed_frames, 0);
        setup.server.shutdown().await.expect("shutdown");
    }
}

/// Items over the inline frame limit are refused clearly: the stream ends with a server
/// error after the items before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_an_item_too_large_ends_the_stream_with_a_server_error() {
    let broker = clouds::testing::Broker::new();
    let config = broker.config().claim_threshold(1024);
    let server = Server::start(config.clone()).await.expect("server");
    server.serve(BigServer::new(BigImpl)).await.expect("serve");
    let client = Client::connect(config).await.expect("client");
    let mut items = BigClient::new(&client).sizes().await.expect("open");
    assert_eq!(items.next().await.expect("item").expect("ok").len(), 10);
    match items.next().await {
        Some(Err(Error::Server { reason, .. })) => {
            assert!(reason.contains("streams carry no claims"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(items.next().await.is_none());
    server.shutdown().await.expect("shutdown");
}

/// A stream whose second item is too large to travel inline.
#[clouds::service("big")]
pub trait Big {
    /// A small item, then a large one.
    async fn sizes(&self) -> Streaming<String>;
}

struct BigImpl;

impl Big for BigImpl {
    async fn sizes(&self) -> Streaming<String> {
        Streaming::iter(["x".repeat(10), "y".repeat(4000)])
    }
}

/// A lost or repeated item frame (injected by the in-memory broker) breaks the stream with a
/// typed error after the items before it: it is never passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_lost_or_repeated_item_breaks_the_stream() {
    use clouds::testing::FrameFault;
    for fault in [FrameFault::Drop, FrameFault::Duplicate] {
        let broker = clouds::testing::Broker::new();
        let server = Server::start(broker.config()).await.expect("server");
        let seen = Arc::new(Seen::default());
        server
            .serve(LogsServer::new(Impl(seen)))
            .await
            .expect("serve");
        let client = Client::connect(broker.config()).await.expect("client");
        let mut items = LogsClient::new(&client).endless().await.expect("open");
        for expected in 0..3 {
            assert_eq!(items.next().await.expect("item").expect("ok"), expected);
        }
        broker.fault_next_frame(client.id(), fault);
        let mut next = 3;
        let error = loop {
            match tokio::time::timeout(Duration::from_secs(5), items.next())
                .await
                .expect("no hang")
            {
                Some(Ok(item)) => {
                    assert_eq!(item, next, "only in order");
                    next += 1;
                }
                Some(Err(e)) => break e,
                None => panic!("ended without an error"),
            }
        };
        match (fault, &error) {
            (
                FrameFault::Drop,
                Error::StreamBroken {
                    reason: StreamBreak::Gap { expected, got },
                    ..
                },
            ) => assert!(got > expected && *expected == next, "{error:?}"),
            (
                FrameFault::Duplicate,
                Error::StreamBroken {
                    reason: StreamBreak::Gap { expected, got },
                    ..
                },
            ) => assert!(got < expected && *expected == next, "{error:?}"),
            _ => panic!("{fault:?}: {error:?}"),
        }
        assert!(items.next().await.is_none());
        drop(items);
        server.shutdown().await.expect("shutdown");
    }
}

/// On a Redis Cluster: order, flow control with a slow consumer (20,000 items), and the caller
/// dropping the stream, with items and credit on sharded channels of different slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_streams_keep_order_credit_and_stop() {
    let setup = Setup::new(Backend::Cluster, |c| c.stream_window(WINDOW)).await;
    let mut items = setup.logs().count(20_000).await.expect("open");
    let mut next = 0;
    while let Some(item) = items.next().await {
        assert_eq!(item.expect("item"), next);
        next += 1;
        let ahead = setup.seen.produced.load(Ordering::SeqCst) - next;
        assert!(ahead <= u64::from(WINDOW) + 1, "{ahead} ahead");
        if next % 1000 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert_eq!(next, 20_000);
    let (tx, dropped) = tokio::sync::oneshot::channel();
    *setup.seen.dropped_tx.lock().expect("lock") = Some(tx);
    let mut endless = setup.logs().endless().await.expect("open");
    for expected in 0..10 {
        assert_eq!(endless.next().await.expect("item").expect("ok"), expected);
    }
    let dropped_at = Instant::now();
    drop(endless);
    let at = tokio::time::timeout(Duration::from_secs(2), dropped)
        .await
        .expect("dropped")
        .expect("sent");
    let after = at.saturating_duration_since(dropped_at);
    eprintln!("FIGURES caller_drop Cluster: provider stream dropped after {after:?}");
    assert!(after <= Duration::from_millis(100), "{after:?}");
    setup.server.shutdown().await.expect("shutdown");
}

/// The caller's own client closing ends its open streams at once with `Error::Shutdown`, and
/// the provider drops its side.
async fn closing_the_client_ends_its_streams(backend: Backend) {
    let setup = Setup::new(backend, |c| c).await;
    let mut items = setup.logs().endless().await.expect("open");
    assert_eq!(items.next().await.expect("item").expect("ok"), 0);
    setup.client.close().await;
    let error = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match items.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return e,
                None => panic!("ended without an error"),
            }
        }
    })
    .await
    .expect("at once, not after the idle timeout");
    assert!(matches!(error, Error::Shutdown), "{error:?}");
    // The provider finds the caller's inbox gone (its next item reaches nobody) and drops
    // its stream without waiting for the idle timeout.
    common::eventually(
        "the provider drops the stream of a caller that is gone",
        Duration::from_secs(2),
        || async {
            setup.server.stats().open_streams == 0
                && setup.seen.dropped.lock().expect("lock").is_some()
        },
    )
    .await;
    assert_eq!(setup.server.stats().in_flight, 0);
    setup.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_closing_the_client_ends_its_streams() {
    closing_the_client_ends_its_streams(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_closing_the_client_ends_its_streams() {
    closing_the_client_ends_its_streams(Backend::Redis).await;
}
