//! Large bodies travel as claims: stored in the broker, fetched by the receiver, never left
//! behind, and a claim gone when fetched is a clear error, never a hang.

use std::convert::Infallible;

use super::*;
use crate::Error;

/// A config whose frames over 1 KiB travel as claims.
fn claiming(broker: &Broker) -> Config {
    config(broker).claim_threshold(1024)
}

/// Registers `echo.len` (the length of its argument) and `echo.make` (a string of `n` bytes).
async fn echo(server: &Server) -> Counter {
    let calls = Counter::default();
    let counter = calls.clone();
    server
        .register("echo.len", move |(s,): (String,)| {
            counter.bump();
            async move { Ok::<_, Infallible>(s.len()) }
        })
        .await
        .expect("register");
    server
        .register("echo.make", |(n,): (usize,)| async move {
            Ok::<_, Infallible>("m".repeat(n))
        })
        .await
        .expect("register");
    calls
}

#[tokio::test(start_paused = true)]
async fn large_arguments_and_results_travel_as_claims_and_leave_nothing_behind() {
    let broker = Broker::new();
    let provider = server(claiming(&broker)).await;
    let calls = echo(&provider).await;
    let caller = client(claiming(&broker)).await;
    let big = "a".repeat(200_000);
    assert_eq!(
        caller
            .call::<_, usize>("echo.len", (big.as_str(),))
            .await
            .expect("a claimed call"),
        200_000
    );
    let made: String = caller
        .call("echo.make", (300_000usize,))
        .await
        .expect("a claimed result");
    assert_eq!(made.len(), 300_000);
    // Small ones still go inline.
    assert_eq!(
        caller
            .call::<_, usize>("echo.len", ("s",))
            .await
            .expect("inline"),
        1
    );
    assert_eq!(calls.get(), 2);
    assert!(broker.claims().is_empty(), "{:?}", broker.claims());
    assert_eq!(caller.stats().malformed_frames, 0);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn frames_over_max_frame_size_are_claimed_whatever_the_threshold() {
    let broker = Broker::new();
    let cfg = config(&broker)
        .claim_threshold(usize::MAX)
        .max_frame_size(2048);
    let provider = server(cfg.clone()).await;
    echo(&provider).await;
    let caller = client(cfg).await;
    let big = "b".repeat(5_000);
    assert_eq!(
        caller
            .call::<_, usize>("echo.len", (big,))
            .await
            .expect("claimed"),
        5_000
    );
    let made: String = caller
        .call("echo.make", (5_000usize,))
        .await
        .expect("claimed");
    assert_eq!(made.len(), 5_000);
    assert_eq!(provider.stats().oversized_frames, 0);
    assert!(broker.claims().is_empty());
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn arguments_gone_before_the_server_fetched_them_fail_the_call_with_claim_lost() {
    let broker = Broker::new();
    let provider = server(claiming(&broker)).await;
    let calls = echo(&provider).await;
    let caller = client(claiming(&broker).retries(3)).await;
    broker.freeze(provider.id());
    let call = {
        let caller = caller.clone();
        tokio::spawn(async move {
            caller
                .call::<_, usize>("echo.len", ("c".repeat(10_000),))
                .await
        })
    };
    eventually("the arguments wait in a claim", TIMEOUT, || async {
        broker.claims().len() == 1
    })
    .await;
    broker.lose_claims();
    broker.thaw(provider.id());
    match call.await.expect("task") {
        Err(Error::ClaimLost {
            what, method, node, ..
        }) => {
            assert_eq!((what, method.as_str()), ("arguments", "echo.len"));
            assert_eq!(&node, provider.id());
        }
        other => panic!("expected ClaimLost, got {other:?}"),
    }
    assert_eq!(calls.get(), 0, "the handler never ran");
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_result_gone_before_the_caller_fetched_it_fails_the_call_with_claim_lost() {
    let broker = Broker::new();
    let provider = server(claiming(&broker)).await;
    echo(&provider).await;
    let caller = client(claiming(&broker)).await;
    // Look the method up first, so the frozen caller still finds its provider.
    caller
        .call::<_, String>("echo.make", (1usize,))
        .await
        .expect("warm");
    broker.freeze(caller.id());
    let call = {
        let caller = caller.clone();
        tokio::spawn(async move { caller.call::<_, String>("echo.make", (50_000usize,)).await })
    };
    eventually("the result waits in a claim", TIMEOUT, || async {
        broker.claims().len() == 1 && provider.stats().in_flight == 0
    })
    .await;
    broker.lose_claims();
    broker.thaw(caller.id());
    match call.await.expect("task") {
        Err(Error::ClaimLost { what, reason, .. }) => {
            assert_eq!(what, "result");
            assert!(reason.contains("gone"), "{reason}");
        }
        other => panic!("expected ClaimLost, got {other:?}"),
    }
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_call_that_times_out_takes_its_claim_back() {
    let broker = Broker::new();
    let provider = server(claiming(&broker)).await;
    let calls = echo(&provider).await;
    let caller = client(claiming(&broker)).await;
    broker.freeze(provider.id());
    match caller
        .call::<_, usize>("echo.len", ("d".repeat(10_000),))
        .await
    {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    eventually("the caller deletes its claim", TIMEOUT, || async {
        broker.claims().is_empty()
    })
    .await;
    // The provider wakes up to a claim that is gone, and to a caller that is not waiting.
    broker.thaw(provider.id());
    tokio::time::sleep(TIMEOUT).await;
    assert_eq!(calls.get(), 0);
    assert!(broker.claims().is_empty());
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_claim_nobody_takes_expires_with_its_deadline() {
    let broker = Broker::new();
    // A receiver that vanished: the claim frame reaches nobody, and even the caller's own
    // clean-up fails (its commands fail), so only the expiry is left.
    let provider = server(claiming(&broker)).await;
    echo(&provider).await;
    let caller = client(claiming(&broker)).await;
    broker.freeze(provider.id());
    let call = {
        let caller = caller.clone();
        tokio::spawn(async move {
            caller
                .call::<_, usize>("echo.len", ("e".repeat(10_000),))
                .await
        })
    };
    eventually("the arguments wait in a claim", TIMEOUT, || async {
        broker.claims().len() == 1
    })
    .await;
    broker.disconnect(caller.id());
    assert!(call.await.expect("task").is_err());
    tokio::time::sleep(ms(10)).await;
    assert_eq!(broker.claims().len(), 1, "the caller could not delete it");
    // Kept for the deadline plus a grace of one command timeout (5 s), no longer.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(broker.claims().is_empty());
    broker.thaw(provider.id());
    broker.reconnect(caller.id());
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_server_holds_at_most_its_fetch_budget_and_the_rest_wait_in_the_broker() {
    let broker = Broker::new();
    // Room for one 60 KB body at a time.
    let provider = server(claiming(&broker).claim_fetch_bytes(100_000)).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let running = Counter::default();
    {
        let gate = gate.clone();
        let running = running.clone();
        provider
            .register("hold.len", move |(s,): (String,)| {
                let gate = gate.clone();
                running.bump();
                async move {
                    let _pass = gate.acquire().await;
                    Ok::<_, Infallible>(s.len())
                }
            })
            .await
            .expect("register");
    }
    let caller = client(claiming(&broker).timeout(Duration::from_secs(10))).await;
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let caller = caller.clone();
            tokio::spawn(async move {
                caller
                    .call::<_, usize>("hold.len", ("h".repeat(60_000),))
                    .await
            })
        })
        .collect();
    eventually("one call runs", TIMEOUT, || async { running.get() == 1 }).await;
    tokio::time::sleep(ms(100)).await;
    assert_eq!(running.get(), 1, "the budget holds one body");
    assert_eq!(broker.claims().len(), 3, "the others wait in the broker");
    gate.add_permits(4);
    for call in calls {
        assert_eq!(call.await.expect("task").expect("answered"), 60_000);
    }
    assert_eq!(running.get(), 4);
    assert!(broker.claims().is_empty());
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn large_messages_travel_as_claims() {
    let broker = Broker::new();
    let a = client(claiming(&broker)).await;
    let b = client(claiming(&broker)).await;
    let big = "m".repeat(100_000);
    a.send(b.id(), &big).await.expect("sent");
    let message = b.messages().next().await.expect("a message");
    assert_eq!(message.from(), a.id());
    assert_eq!(message.decode::<String>().expect("decode"), big);
    // To nobody: unreachable, and the claim is taken back.
    match a.send("nobody-here", &big).await {
        Err(Error::Unreachable { .. }) => {}
        other => panic!("expected Unreachable, got {other:?}"),
    }
    eventually("the claim is taken back", TIMEOUT, || async {
        broker.claims().is_empty()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_body_over_max_body_size_fails_at_the_sender_before_anything_is_stored() {
    let broker = Broker::new();
    let provider = server(claiming(&broker)).await;
    let calls = echo(&provider).await;
    let caller = client(claiming(&broker).max_body_size(50_000)).await;
    match caller
        .call::<_, usize>("echo.len", ("f".repeat(60_000),))
        .await
    {
        Err(Error::TooLarge { size, max, .. }) => {
            assert!(size > 60_000);
            assert_eq!(max, 50_000);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(broker.claims().is_empty());
    assert_eq!(calls.get(), 0);
    // A server with a smaller limit refuses a larger claimed call without fetching it.
    let generous = client(claiming(&broker).max_body_size(1 << 20)).await;
    let small = server(claiming(&broker).max_body_size(50_000)).await;
    provider.shutdown().await.expect("shutdown");
    echo(&small).await;
    match generous
        .call::<_, usize>("echo.len", ("g".repeat(60_000),))
        .await
    {
        Err(Error::Server { reason, .. }) => assert!(reason.contains("max_body_size"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(small.stats().oversized_frames, 1);
    assert!(broker.claims().is_empty());
    small.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_handler_holding_the_call_budget_can_fetch_a_large_result_of_its_own() {
    let broker = Broker::new();
    let inner = server(claiming(&broker)).await;
    echo(&inner).await;
    // The outer call's 60 KB of arguments take all of this server's call budget until it
    // answers, and its handler waits for a 60 KB result meanwhile.
    let outer = server(claiming(&broker).claim_fetch_bytes(50_000)).await;
    let own = outer.client();
    outer
        .register("outer.relay", move |(s,): (String,)| {
            let own = own.clone();
            async move {
                let made = own.call::<_, String>("echo.make", (s.len(),)).await?;
                Ok::<_, Error>(made.len())
            }
        })
        .await
        .expect("register");
    let caller = client(claiming(&broker)).await;
    assert_eq!(
        caller
            .call::<_, usize>("outer.relay", ("o".repeat(60_000),))
            .await
            .expect("relayed"),
        60_000
    );
    assert!(broker.claims().is_empty());
    outer.shutdown().await.expect("shutdown");
    inner.shutdown().await.expect("shutdown");
}
