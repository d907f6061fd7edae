//! Exactly-once cases of the behaviour suite (`docs/protocol.md` §6.5): a call of a method
//! marked `#[clouds(once)]` runs once in total, however its attempts are retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clouds::{Config, Server};

use super::{Backend, client, eventually};

/// A payment service: `charge` is marked once, `quote` is not.
#[clouds::service("pay")]
pub trait Pay {
    /// Takes `millis` if this provider is named `slow_one`, then charges: runs at most once
    /// per call, however often it is retried.
    #[clouds(once)]
    async fn charge(&self, slow_one: String, millis: u64) -> Result<String, String>;
    /// The same work, unmarked: retries may run it again.
    async fn quote(&self, slow_one: String, millis: u64) -> String;
}

struct Payments {
    name: String,
    charges: Arc<AtomicUsize>,
}

impl Pay for Payments {
    async fn charge(&self, slow_one: String, millis: u64) -> Result<String, String> {
        if slow_one == self.name {
            tokio::time::sleep(Duration::from_millis(millis)).await;
        }
        self.charges.fetch_add(1, Ordering::SeqCst);
        Ok(self.name.clone())
    }

    async fn quote(&self, slow_one: String, millis: u64) -> String {
        if slow_one == self.name {
            tokio::time::sleep(Duration::from_millis(millis)).await;
        }
        self.charges.fetch_add(1, Ordering::SeqCst);
        self.name.clone()
    }
}

/// A server named `name` serving [`Pay`], and how many handlers ran to their end there.
async fn serve_pay(config: Config, name: &str) -> (Server, Arc<AtomicUsize>) {
    let server = Server::start(config).await.expect("server starts");
    let charges = Arc::new(AtomicUsize::new(0));
    server
        .serve(PayServer::new(Payments {
            name: name.to_string(),
            charges: charges.clone(),
        }))
        .await
        .expect("serve");
    (server, charges)
}

pub async fn a_retried_once_call_runs_once_and_returns_its_result(b: impl Backend) {
    let timeout = Duration::from_millis(300);
    let config = b
        .config()
        .timeout(timeout)
        .once_window(Duration::from_secs(2));
    let (slow, slow_runs) = serve_pay(config.clone(), "slow").await;
    let (fast, fast_runs) = serve_pay(config.clone(), "fast").await;
    let client = client(config).await;
    let pay = PayClient::new(&client).with_retries(2);
    // Round-robin sends one of the first two calls to "slow" first, where it outlasts the
    // timeout (450 ms against 300); the retry lands on "fast", which finds the call running
    // and waits for its result instead of charging again.
    let mut retried = 0;
    for _ in 0..2 {
        let (slow_before, fast_before) = (
            slow_runs.load(Ordering::SeqCst),
            fast_runs.load(Ordering::SeqCst),
        );
        let started = tokio::time::Instant::now();
        let answer = pay.charge("slow", 450).await.expect("answered");
        let ran_slow = slow_runs.load(Ordering::SeqCst) - slow_before;
        let ran_fast = fast_runs.load(Ordering::SeqCst) - fast_before;
        assert_eq!(ran_slow + ran_fast, 1, "one run in total");
        if answer == Ok("slow".to_string()) {
            assert!(started.elapsed() >= timeout, "its first attempt timed out");
            retried += 1;
        } else {
            assert_eq!(answer, Ok("fast".to_string()));
        }
    }
    assert_eq!(retried, 1, "one call went to the slow provider first");
    // Unmarked, the same timing runs the work twice: the retry runs it on "fast" while the
    // first attempt is cancelled on "slow" (or, if the cancel came too late, finishes too).
    // (A client of its own: the first one holds "slow" suspect now, and avoids it.)
    let other = super::client(b.config().timeout(timeout)).await;
    let pay = PayClient::new(&other).with_retries(2);
    let mut twice = 0;
    for _ in 0..2 {
        let started = tokio::time::Instant::now();
        let answer = pay.quote("slow", 450).await.expect("answered");
        if started.elapsed() >= timeout {
            assert_eq!(answer, "fast", "the retry ran it again");
            twice += 1;
        }
    }
    assert_eq!(twice, 1);
    // Nothing grows: every record expires after the window.
    assert!(
        !b.once_records().is_empty(),
        "the results are kept for retries"
    );
    eventually("the records expire", Duration::from_secs(5), || async {
        b.once_records().is_empty()
    })
    .await;
    slow.shutdown().await.expect("shutdown");
    fast.shutdown().await.expect("shutdown");
}

pub async fn unmarked_calls_do_no_extra_redis_work(b: impl Backend) {
    let (server, _) = serve_pay(b.config(), "a").await;
    let client = client(b.config()).await;
    let pay = PayClient::new(&client).with_retries(1);
    let before = b.once_commands();
    for _ in 0..20 {
        assert_eq!(pay.quote("", 0).await.expect("answered"), "a");
    }
    assert_eq!(
        b.once_commands(),
        before,
        "unmarked calls send no once command"
    );
    assert!(b.once_records().is_empty());
    for _ in 0..20 {
        assert_eq!(pay.charge("", 0).await.expect("answered"), Ok("a".into()));
    }
    // Each marked call: ONCE_BEGIN, then ONCE_SWAP to store its result.
    let spent = b.once_commands() - before;
    assert!(
        spent >= 40,
        "marked calls record themselves: {spent} commands"
    );
    assert_eq!(b.once_records().len(), 20);
    server.shutdown().await.expect("shutdown");
}

/// A streaming route marked once by name (`Route::stream(..).once()`) serves its stream and
/// keeps no record: a record cannot replay items (the macro refuses the mark on a streaming
/// method).
pub async fn a_streaming_route_marked_once_keeps_no_record(b: impl Backend) {
    use futures_util::StreamExt;
    let config = b.config();
    let server = Server::start(config.clone()).await.expect("server starts");
    let route = clouds::Route::stream("pay.count", |(n,): (u64,)| async move {
        clouds::Streaming::iter(0..n)
    })
    .once();
    server.serve(vec![route]).await.expect("serve");
    let client = client(config).await;
    let items: Vec<u64> = client
        .open_stream::<_, u64>("pay.count", (5u64,))
        .await
        .expect("opened")
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(items, vec![0, 1, 2, 3, 4]);
    eventually("no record is left", Duration::from_secs(2), || async {
        b.once_records().is_empty()
    })
    .await;
    client.close().await;
    server.shutdown().await.expect("shutdown");
}
