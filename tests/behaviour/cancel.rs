//! Cancellation cases of the behaviour suite (`docs/protocol.md` §3.13): a caller that stops
//! waiting tells the provider, which drops the handler.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clouds::{Config, Error, Server};
use tokio::time::Instant;

use super::{Backend, client, eventually};

/// A service whose handler waits while holding a drop guard.
#[clouds::service("hold")]
pub trait Hold {
    /// Waits `millis` if this provider is named `who` (any provider if `who` is empty), holding
    /// a guard that records when it is dropped unfinished; then says who answered.
    async fn hold(&self, who: String, millis: u64) -> String;
}

/// What one provider's handlers did.
#[derive(Default)]
pub struct Record {
    /// Handlers started.
    pub started: AtomicUsize,
    /// Handlers that ran to their end.
    pub finished: AtomicUsize,
    /// When each handler dropped unfinished was dropped.
    pub dropped: Mutex<Vec<Instant>>,
}

impl Record {
    fn dropped(&self) -> Vec<Instant> {
        self.dropped.lock().expect("not poisoned").clone()
    }
}

/// Records its drop unless disarmed.
struct DropGuard(Arc<Record>, bool);

impl Drop for DropGuard {
    fn drop(&mut self) {
        if self.1 {
            self.0
                .dropped
                .lock()
                .expect("not poisoned")
                .push(Instant::now());
        }
    }
}

struct Holder {
    name: String,
    record: Arc<Record>,
}

impl Hold for Holder {
    async fn hold(&self, who: String, millis: u64) -> String {
        self.record.started.fetch_add(1, Ordering::SeqCst);
        if who.is_empty() || who == self.name {
            let mut guard = DropGuard(self.record.clone(), true);
            tokio::time::sleep(Duration::from_millis(millis)).await;
            guard.1 = false;
        }
        self.record.finished.fetch_add(1, Ordering::SeqCst);
        self.name.clone()
    }
}

/// A server named `name` serving [`Hold`], and what its handlers did.
async fn serve_hold(config: Config, name: &str) -> (Server, Arc<Record>) {
    let server = Server::start(config).await.expect("server starts");
    let record = Arc::new(Record::default());
    server
        .serve(HoldServer::new(Holder {
            name: name.to_string(),
            record: record.clone(),
        }))
        .await
        .expect("serve");
    (server, record)
}

/// How late a handler may be dropped after its caller gave up (the bound).
const PROMPTLY: Duration = Duration::from_millis(100);

pub async fn a_dropped_call_drops_its_handler(b: impl Backend) {
    let (server, record) = serve_hold(b.config(), "a").await;
    let client = client(b.config()).await;
    let hold = HoldClient::new(&client);
    // The caller stops waiting after 200 ms: its call's future is dropped.
    let given_up = tokio::time::timeout(Duration::from_millis(200), hold.hold("", 60_000)).await;
    assert!(given_up.is_err(), "the handler holds for a minute");
    let dropped_call = Instant::now();
    eventually("the handler is dropped", Duration::from_secs(2), || async {
        !record.dropped().is_empty()
    })
    .await;
    let late = record.dropped()[0].saturating_duration_since(dropped_call);
    assert!(
        late <= PROMPTLY,
        "dropped {late:?} after the caller gave up"
    );
    assert_eq!(record.finished.load(Ordering::SeqCst), 0);
    eventually("its slot is free", Duration::from_secs(2), || async {
        server.stats().in_flight == 0
    })
    .await;
    let stats = server.stats();
    assert_eq!((stats.cancelled_calls, stats.ignored_cancels), (1, 0));
    assert_eq!(client.stats().cancels_sent, 1);
    // The figures count it as cancelled.
    let monitor = clouds::Monitor::connect(b.config()).await.expect("monitor");
    eventually("the figures count it", Duration::from_secs(3), || async {
        let snapshot = monitor.snapshot().await.expect("snapshot");
        snapshot
            .servers
            .get(server.id())
            .and_then(|s| s.stats.as_ref())
            .and_then(|s| s.methods.get("hold.hold"))
            .is_some_and(|m| m.cancelled == 1 && m.in_flight == 0)
    })
    .await;
    server.shutdown().await.expect("shutdown");
}

pub async fn a_timed_out_attempt_drops_its_handler_before_the_retry(b: impl Backend) {
    let timeout = Duration::from_millis(300);
    let config = b.config().timeout(timeout);
    let (slow, slow_record) = serve_hold(config.clone(), "slow").await;
    let (fast, _) = serve_hold(config.clone(), "fast").await;
    let client = client(config).await;
    let hold = HoldClient::new(&client).with_retries(1);
    // Round-robin sends one of the first two calls to "slow" first, where it outlasts the
    // timeout; the retry lands on "fast", and "slow" drops the handler.
    let mut retried = 0;
    for _ in 0..2 {
        let before = slow_record.started.load(Ordering::SeqCst);
        let started = Instant::now();
        assert_eq!(hold.hold("slow", 60_000).await.expect("answered"), "fast");
        if slow_record.started.load(Ordering::SeqCst) > before {
            retried += 1;
            eventually(
                "the slow handler is dropped",
                Duration::from_secs(2),
                || async { !slow_record.dropped().is_empty() },
            )
            .await;
            let dropped = slow_record.dropped()[0];
            let after_timeout = dropped.saturating_duration_since(started + timeout);
            assert!(
                dropped >= started + timeout && after_timeout <= PROMPTLY,
                "dropped {after_timeout:?} after the attempt's timeout"
            );
        }
    }
    assert_eq!(retried, 1);
    assert_eq!(slow_record.finished.load(Ordering::SeqCst), 0);
    eventually(
        "the slow server's slot is free",
        Duration::from_secs(2),
        || async { slow.stats().in_flight == 0 },
    )
    .await;
    assert_eq!(slow.stats().cancelled_calls, 1);
    assert_eq!(
        fast.stats().cancelled_calls + fast.stats().ignored_cancels,
        0
    );
    assert_eq!(client.stats().cancels_sent, 1);
    slow.shutdown().await.expect("shutdown");
    fast.shutdown().await.expect("shutdown");
}

pub async fn finished_calls_send_no_cancel(b: impl Backend) {
    let (server, record) = serve_hold(b.config(), "a").await;
    let client = client(b.config()).await;
    let hold = HoldClient::new(&client);
    // Calls that finish at once, calls whose handler waits first (a task of their own), and
    // many at once (batched replies).
    for millis in [0, 5] {
        hold.hold("", millis).await.expect("answered");
    }
    let many: Vec<_> = (0..20)
        .map(|i| {
            let hold = hold.clone();
            tokio::spawn(async move { hold.hold("", i % 3).await })
        })
        .collect();
    for call in many {
        call.await.expect("join").expect("answered");
    }
    assert_eq!(record.finished.load(Ordering::SeqCst), 22);
    // A frame sent behind the last reply has come back: anything the client sent before it
    // has arrived at the server too (one channel, in order).
    hold.hold("", 0).await.expect("answered");
    assert_eq!(client.stats().cancels_sent, 0);
    let stats = server.stats();
    assert_eq!((stats.cancelled_calls, stats.ignored_cancels), (0, 0));
    assert!(record.dropped().is_empty());
    server.shutdown().await.expect("shutdown");
}

pub async fn a_closing_client_cancels_its_calls_in_flight(b: impl Backend) {
    let (server, record) = serve_hold(b.config(), "a").await;
    let client = client(b.config()).await;
    let running = {
        let hold = HoldClient::new(&client);
        tokio::spawn(async move { hold.hold("", 60_000).await })
    };
    eventually("the call runs", Duration::from_secs(2), || async {
        server.stats().in_flight == 1
    })
    .await;
    let closing = Instant::now();
    client.close().await;
    match running.await.expect("join") {
        Err(Error::Shutdown) => {}
        other => panic!("expected Shutdown, got {other:?}"),
    }
    eventually("the handler is dropped", Duration::from_secs(2), || async {
        !record.dropped().is_empty()
    })
    .await;
    let late = record.dropped()[0].saturating_duration_since(closing);
    assert!(late <= PROMPTLY, "dropped {late:?} after the client closed");
    eventually("its slot is free", Duration::from_secs(2), || async {
        server.stats().in_flight == 0
    })
    .await;
    assert_eq!(server.stats().cancelled_calls, 1);
    server.shutdown().await.expect("shutdown");
}
