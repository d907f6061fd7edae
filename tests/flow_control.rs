//! A burst of large calls must not overflow the provider's Redis pub/sub buffer
//! (`Config::max_bytes_in_flight`).

mod common;

use std::convert::Infallible;
use std::time::Duration;

use clouds::{Client, Error, Server};
use common::{config, eventually, redis};

const CALLS: usize = 150;
const PAYLOAD: usize = 64 << 10;

/// 150 calls of 64 KiB (9.6 MB) at once, to a provider that reads slowly, on a Redis that
/// drops a subscriber with more than 4 MB of unread pub/sub output. With 1 MiB of calls in
/// flight at most, none is lost. (With no cap, Redis drops the provider's subscriber and the
/// calls queued for it time out: checked by raising the cap.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_large_calls_stays_within_the_redis_buffer() {
    let redis = redis();
    redis
        .command(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 4mb 4mb 0",
        ])
        .expect("config set");
    // Inline frames only: what is tested here is the cap on inline frames in flight (with the
    // default claim threshold these 64 KiB calls would travel as claims, tests/claims.rs).
    let cfg = config(&redis)
        .timeout(Duration::from_secs(10))
        .claim_threshold(usize::MAX);

    // The provider runs on one thread of its own, which its handlers block for a moment
    // each: meanwhile nothing reads its subscriber connection, so Redis buffers for it.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_cfg = cfg.clone();
    let provider = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let server = Server::start(server_cfg).await.expect("server");
            server
                .register("big.size", |(data,): (String,)| async move {
                    std::thread::sleep(Duration::from_millis(5));
                    Ok::<_, Infallible>(data.len())
                })
                .await
                .expect("register");
            ready_tx.send(()).expect("ready");
            let _ = stop_rx.await;
            server.shutdown().await.expect("shutdown");
        });
    });
    ready_rx.recv().expect("provider ready");

    let client = Client::connect(cfg.max_bytes_in_flight(1 << 20))
        .await
        .expect("client");
    let data = "x".repeat(PAYLOAD);
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let client = client.clone();
            let data = data.clone();
            tokio::spawn(async move { client.call::<_, usize>("big.size", (data,)).await })
        })
        .collect();
    let mut failed: Vec<Error> = Vec::new();
    for call in calls {
        match call.await.expect("task") {
            Ok(len) => assert_eq!(len, PAYLOAD),
            Err(e) => failed.push(e),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {CALLS} calls failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(client.stats().pending_calls, 0);
    client.close().await;
    let _ = stop_tx.send(());
    provider.join().expect("provider thread");
}

/// A call that has to wait for room spends its attempt's time waiting, not a second timeout
/// on top: with a budget for one call, a call that waited for a slow one still fails after
/// about its one timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_room_counts_towards_the_timeout() {
    let redis = redis();
    let server = Server::start(config(&redis)).await.expect("server");
    server
        .register("slow.sleep", |(ms,): (u64,)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, Infallible>(ms)
        })
        .await
        .expect("register");
    let timeout = Duration::from_secs(1);
    // A budget of 1 byte: every call takes all of it, so calls go one at a time.
    let client = Client::connect(config(&redis).timeout(timeout).max_bytes_in_flight(1))
        .await
        .expect("client");
    // The first call holds the budget for 400 ms (its own timeout), then gives it up.
    let first = {
        let client = client.clone().with_timeout(Duration::from_millis(400));
        tokio::spawn(async move { client.call::<_, u64>("slow.sleep", (3_000u64,)).await })
    };
    eventually("the first call runs", timeout / 2, || async {
        server.stats().in_flight == 1
    })
    .await;
    // The second waits ~400 ms for the budget, then has ~600 ms left of its 1 s, not 1 s more.
    let second = client.call::<_, u64>("slow.sleep", (3_000u64,)).await;
    assert!(matches!(
        first.await.expect("task"),
        Err(Error::Timeout { .. })
    ));
    match second {
        Err(Error::Timeout { after, .. }) => assert!(
            after < timeout + timeout / 5,
            "waited {after:?} for room and reply together, more than its timeout of {timeout:?}"
        ),
        other => panic!("expected a timeout, got {other:?}"),
    }
    client.close().await;
    server.shutdown().await.expect("shutdown");
}
