//! Exactly-once calls (`Route::once`, `Client::call_once`; `docs/protocol.md` §6.5) on the
//! in-memory broker: a crashed provider's call is taken over once its lease lapses, a retry
//! gets the stored result, a failing Redis refuses rather than runs unrecorded, and a raw
//! cancel frees the record.

use super::*;
use crate::Error;
use crate::service::Route;

/// Serves `method` marked once on `server`: sleeps its argument (ms), then answers `name`,
/// counting the runs that started and those that finished.
async fn once_nap(server: &Server, method: &str, name: &'static str) -> (Counter, Counter) {
    let (started, finished) = (Counter::default(), Counter::default());
    let (s, f) = (started.clone(), finished.clone());
    let route = Route::new(method, move |(millis,): (u64,)| {
        s.bump();
        let f = f.clone();
        async move {
            tokio::time::sleep(ms(millis)).await;
            f.bump();
            Ok::<_, Infallible>(name.to_string())
        }
    })
    .once();
    server.serve(vec![route]).await.expect("serve");
    (started, finished)
}

/// The first record of the broker: its key, and whether it is done.
fn record(broker: &Broker) -> Vec<String> {
    broker.once_records()
}

#[tokio::test(start_paused = true)]
async fn a_crashed_providers_call_is_taken_over_after_its_lease() {
    let broker = Broker::new();
    let config = config(&broker).once_lease(ms(300));
    let a = server(config.clone()).await;
    let (a_started, a_finished) = once_nap(&a, "o.nap", "a").await;
    let caller = client(config.clone()).await.with_retries(3);
    // Only "a" serves at first, so the first attempt goes there.
    let call = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call_once::<_, String>("o.nap", (400u64,)).await }
    });
    eventually("a runs it", ms(200), || async { a_started.get() == 1 }).await;
    let b = server(config.clone()).await;
    let (b_started, b_finished) = once_nap(&b, "o.nap", "b").await;
    let crashed = tokio::time::Instant::now();
    crate::testing::crash(a).await;
    assert_eq!(
        call.await.expect("join").expect("answered by the retry"),
        "b"
    );
    assert!(crashed.elapsed() >= ms(300), "not before the lease lapsed");
    assert_eq!(
        (a_finished.get(), b_started.get(), b_finished.get()),
        (0, 1, 1)
    );
    assert_eq!(record(&broker).len(), 1, "one call, one record");
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_the_run_gets_the_stored_result_without_running_again() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let (started, _) = once_nap(&provider, "o.nap", "p").await;
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    let mut inbox = RawPeer::connect(&broker, &config(&broker), 16);
    inbox.subscribe(&inbox.inbox(raw.id.as_str())).await;
    let calls = raw.calls(provider.id().as_str());
    // The same call (same caller, same id) three times, as retries would send it.
    for _ in 0..3 {
        raw.publish(
            calls.clone(),
            call_frame(42, "o.nap", raw.id.as_str(), 1000, &(5u64,)),
        )
        .await;
        match inbox.next_frame().await {
            Frame::Reply(reply) => {
                assert_eq!((reply.id, reply.status), (42, Status::Ok));
                assert_eq!(
                    crate::codec::decode_value::<String>(&reply.body),
                    Ok("p".into())
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(started.get(), 1, "run once, answered three times");
    // Another id is another call.
    raw.publish(
        calls,
        call_frame(43, "o.nap", raw.id.as_str(), 1000, &(5u64,)),
    )
    .await;
    inbox.next_frame().await;
    assert_eq!(started.get(), 2);
    // The records expire after the window.
    assert_eq!(record(&broker).len(), 2);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(record(&broker).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_call_that_cannot_be_recorded_is_refused_not_run() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let (started, _) = once_nap(&provider, "o.nap", "p").await;
    let caller = client(config(&broker)).await;
    assert_eq!(
        caller
            .call_once::<_, String>("o.nap", (1u64,))
            .await
            .expect("works"),
        "p"
    );
    // The provider's next command (the next call's ONCE_BEGIN) fails.
    broker.fail_commands(provider.id(), 1);
    match caller.call_once::<_, String>("o.nap", (1u64,)).await {
        Err(Error::Server { reason, .. }) => assert!(reason.contains("exactly-once"), "{reason}"),
        other => panic!("expected a server error, got {other:?}"),
    }
    assert_eq!(started.get(), 1, "not run unrecorded");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_once_call_frees_its_record_and_a_once_caller_sends_no_cancel() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let (started, finished) = once_nap(&provider, "o.nap", "p").await;
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    let calls = raw.calls(provider.id().as_str());
    raw.publish(
        calls.clone(),
        call_frame(7, "o.nap", raw.id.as_str(), 1000, &(500u64,)),
    )
    .await;
    eventually("it runs", ms(100), || async { started.get() == 1 }).await;
    raw.publish(calls, crate::codec::encode_cancel(7, raw.id.as_str()))
        .await;
    eventually("dropped, record freed", ms(100), || async {
        provider.stats().cancelled_calls == 1 && broker.once_records().is_empty()
    })
    .await;
    assert_eq!(finished.get(), 0);
    // A caller of a once call whose future is dropped sends no cancel: it runs to its end.
    let caller = client(config(&broker)).await;
    assert!(
        tokio::time::timeout(ms(50), caller.call_once::<_, String>("o.nap", (200u64,)))
            .await
            .is_err()
    );
    eventually("it finishes anyway", ms(500), || async {
        finished.get() == 1
    })
    .await;
    assert_eq!(caller.stats().cancels_sent, 0);
    assert_eq!(broker.once_records().len(), 1, "its result is kept");
}

#[tokio::test]
async fn a_streaming_route_marked_once_by_name_serves_its_stream_and_keeps_no_record() {
    use futures_util::StreamExt;
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let route = Route::stream("o.count", |(n,): (u64,)| async move {
        crate::Streaming::iter(0..n)
    })
    .once();
    provider.serve(vec![route]).await.expect("serve");
    let caller = client(config(&broker)).await;
    let items: Vec<u64> = caller
        .open_stream::<_, u64>("o.count", (5u64,))
        .await
        .expect("opened")
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(items, vec![0, 1, 2, 3, 4]);
    eventually("its record is freed", ms(500), || async {
        broker.once_records().is_empty()
    })
    .await;
}
