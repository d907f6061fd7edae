//! The caller's attempt loop: retries, re-routes, timeouts and the errors that end a call.

use std::convert::Infallible;

use tokio::time::Instant;

use super::*;
use crate::Error;
use crate::testing::Broker;

#[tokio::test(start_paused = true)]
async fn a_call_with_retries_waits_for_a_provider_that_joins_later() {
    let broker = Broker::new();
    let caller = client(config(&broker)).await.with_retries(6);
    let started = Instant::now();
    let call = tokio::spawn(async move { caller.call::<_, String>("late.who", ()).await });
    // Nobody serves it yet: the call keeps looking.
    tokio::time::sleep(ms(120)).await;
    assert!(
        !call.is_finished(),
        "the call gave up before a provider joined"
    );
    let late = server(config(&broker)).await;
    let calls = answer_name(&late, "late.who", "late").await;
    let answer = call
        .await
        .expect("join")
        .expect("the late provider answers");
    assert_eq!(answer, "late");
    assert_eq!(calls.get(), 1);
    assert!(started.elapsed() >= ms(120));
    late.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn no_provider_counts_every_attempt_and_backs_off_between_them() {
    let broker = Broker::new();
    let caller = client(config(&broker)).await.with_retries(3);
    let started = Instant::now();
    match caller.call::<_, ()>("none.here", ()).await {
        Err(Error::NoProvider { method, attempts }) => {
            assert_eq!(method, "none.here");
            assert_eq!(attempts, 4);
        }
        other => panic!("expected NoProvider, got {other:?}"),
    }
    // 25 ms doubling, capped at the heartbeat: 50 + 100 + 100 ms between the four attempts.
    let waited = started.elapsed();
    assert!(waited >= ms(250), "{waited:?}");
    assert!(waited < ms(400), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn retries_come_from_the_config_unless_the_handle_overrides_them() {
    let broker = Broker::new();
    let caller = client(config(&broker).retries(2)).await;
    match caller.call::<_, ()>("none.here", ()).await {
        Err(Error::NoProvider { attempts, .. }) => assert_eq!(attempts, 3),
        other => panic!("expected NoProvider, got {other:?}"),
    }
    match caller
        .clone()
        .with_retries(0)
        .call::<_, ()>("none.here", ())
        .await
    {
        Err(Error::NoProvider { attempts, .. }) => assert_eq!(attempts, 1),
        other => panic!("expected NoProvider, got {other:?}"),
    }
    // The override is per handle: the original keeps the config's.
    match caller.call::<_, ()>("none.here", ()).await {
        Err(Error::NoProvider { attempts, .. }) => assert_eq!(attempts, 3),
        other => panic!("expected NoProvider, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_timeout_makes_the_provider_suspect_and_later_calls_go_elsewhere() {
    let broker = Broker::new();
    let frozen = server(config(&broker)).await;
    let frozen_calls = answer_name(&frozen, "pair.who", "frozen").await;
    let healthy = server(config(&broker)).await;
    answer_name(&healthy, "pair.who", "healthy").await;
    broker.freeze(frozen.id());
    // Suspicion lasts the caller's TTL, measured on the real clock: 3 s, ample for the test.
    let caller = client(config(&broker).heartbeat(Duration::from_secs(1)))
        .await
        .with_retries(1);
    let mut timed_out = 0;
    for _ in 0..8 {
        let started = Instant::now();
        let who: String = caller.call("pair.who", ()).await.expect("answered");
        assert_eq!(who, "healthy");
        if started.elapsed() >= TIMEOUT {
            timed_out += 1;
        }
    }
    // Only the first call that picked the frozen provider waited for it; it was suspect for
    // every call after.
    assert_eq!(timed_out, 1);
    broker.thaw(frozen.id());
    settle().await;
    // The call that timed out still ran there once it thawed (at-least-once after a timeout).
    assert_eq!(frozen_calls.get(), 1);
    frozen.shutdown().await.expect("shutdown");
    healthy.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn every_attempt_timing_out_reports_the_attempts_without_backoff() {
    let broker = Broker::new();
    let frozen = server(config(&broker)).await;
    answer_name(&frozen, "slow.who", "frozen").await;
    broker.freeze(frozen.id());
    let caller = client(config(&broker))
        .await
        .with_timeout(ms(150))
        .with_retries(2);
    let started = Instant::now();
    match caller.call::<_, String>("slow.who", ()).await {
        Err(Error::Timeout {
            method, attempts, ..
        }) => {
            assert_eq!(method, "slow.who");
            assert_eq!(attempts, 3);
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    // Three attempts of 150 ms, one after the other: no pause after a timeout.
    let waited = started.elapsed();
    assert!(waited >= ms(450), "{waited:?}");
    assert!(waited < ms(460), "{waited:?}");
    assert_eq!(caller.stats().pending_calls, 0, "no attempt left waiting");
    broker.thaw(frozen.id());
    frozen.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn with_timeout_bounds_each_attempt_and_is_at_least_a_millisecond() {
    let broker = Broker::new();
    let frozen = server(config(&broker)).await;
    answer_name(&frozen, "slow.who", "frozen").await;
    broker.freeze(frozen.id());
    let caller = client(config(&broker)).await;
    for (asked, expected) in [(ms(40), ms(40)), (Duration::ZERO, ms(1))] {
        let quick = caller.clone().with_timeout(asked);
        let started = Instant::now();
        match quick.call::<_, String>("slow.who", ()).await {
            Err(Error::Timeout { attempts, .. }) => assert_eq!(attempts, 1),
            other => panic!("expected Timeout, got {other:?}"),
        }
        let waited = started.elapsed();
        assert!(
            waited >= expected && waited < expected + ms(5),
            "{asked:?}: {waited:?}"
        );
    }
    broker.thaw(frozen.id());
    frozen.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn an_overloaded_provider_is_skipped_at_no_attempt_cost() {
    let broker = Broker::new();
    let busy = server(config(&broker).max_in_flight(1)).await;
    answer_name(&busy, "pair.who", "busy").await;
    nap(&busy, "busy.nap", "busy").await;
    let free = server(config(&broker)).await;
    let free_calls = answer_name(&free, "pair.who", "free").await;
    // Another node keeps the busy provider's only slot taken.
    let other = client(config(&broker)).await.with_timeout(ms(5_000));
    let long = tokio::spawn(async move { other.call::<_, String>("busy.nap", (1_000u64,)).await });
    eventually("the long call runs", ms(100), || async {
        busy.stats().in_flight == 1
    })
    .await;
    let caller = client(config(&broker)).await.with_retries(0);
    for _ in 0..4 {
        let who: String = caller.call("pair.who", ()).await.expect("re-routed");
        assert_eq!(who, "free");
    }
    assert_eq!(free_calls.get(), 4);
    let refused = caller.stats().overloaded_replies;
    assert!((1..=4).contains(&refused), "{refused}");
    assert_eq!(long.await.expect("join").expect("long call"), "busy");
    busy.shutdown().await.expect("shutdown");
    free.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn refusals_by_two_overloaded_providers_cost_one_attempt() {
    let broker = Broker::new();
    let mut busy = Vec::new();
    let other = client(config(&broker)).await.with_timeout(ms(5_000));
    let mut long = Vec::new();
    for pin in ["one.nap", "two.nap"] {
        let provider = server(config(&broker).max_in_flight(1)).await;
        answer_name(&provider, "pair.who", "busy").await;
        nap(&provider, pin, "busy").await;
        let other = other.clone();
        long.push(tokio::spawn(async move {
            other.call::<_, String>(pin, (1_000u64,)).await
        }));
        busy.push(provider);
    }
    eventually("both are busy", ms(100), || async {
        busy.iter().all(|p| p.stats().in_flight == 1)
    })
    .await;
    let caller = client(config(&broker)).await.with_retries(0);
    match caller.call::<_, String>("pair.who", ()).await {
        Err(Error::Overloaded { attempts, .. }) => {
            assert_eq!(
                attempts, 1,
                "the refusal re-routed to the untried one for free"
            )
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert_eq!(caller.stats().overloaded_replies, 2);
    for call in long {
        call.await.expect("join").expect("long call");
    }
    for provider in busy {
        provider.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(start_paused = true)]
async fn every_provider_overloaded_fails_with_the_attempts_made() {
    let broker = Broker::new();
    let busy = server(config(&broker).max_in_flight(1)).await;
    nap(&busy, "busy.nap", "busy").await;
    let other = client(config(&broker)).await.with_timeout(ms(5_000));
    let long = tokio::spawn(async move { other.call::<_, String>("busy.nap", (1_000u64,)).await });
    eventually("the long call runs", ms(100), || async {
        busy.stats().in_flight == 1
    })
    .await;
    let caller = client(config(&broker)).await.with_retries(2);
    let started = Instant::now();
    match caller.call::<_, String>("busy.nap", (0u64,)).await {
        Err(Error::Overloaded { method, attempts }) => {
            assert_eq!(method, "busy.nap");
            assert_eq!(attempts, 3);
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert_eq!(caller.stats().overloaded_replies, 3);
    // Backoff after each overloaded attempt but the last: 50 + 100 ms.
    assert!(started.elapsed() >= ms(150), "{:?}", started.elapsed());
    assert_eq!(long.await.expect("join").expect("long call"), "busy");
    busy.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_shutting_down_reply_re_routes_to_another_provider() {
    let broker = Broker::new();
    let mut stopping = RawPeer::connect(&broker, &config(&broker), 64);
    stopping.provide(&["pair.who"]).await;
    let staying = server(config(&broker)).await;
    let staying_calls = answer_name(&staying, "pair.who", "staying").await;
    let caller = client(config(&broker)).await.with_retries(0);
    let answers = tokio::spawn({
        let caller = caller.clone();
        async move {
            let mut answers = Vec::new();
            for _ in 0..4 {
                answers.push(caller.call::<_, String>("pair.who", ()).await);
            }
            answers
        }
    });
    // Whichever call picks the stopping provider is told so, and goes to the other one.
    let call = stopping.next_call().await;
    assert_eq!(call.method, "pair.who");
    assert_eq!(
        stopping
            .answer(&call, Status::ShuttingDown, crate::codec::NIL)
            .await,
        1
    );
    for answer in answers.await.expect("join") {
        assert_eq!(answer.expect("re-routed"), "staying");
    }
    assert_eq!(staying_calls.get(), 4);
    assert!(caller.stats().rerouted_calls >= 1);
    // It was dropped from the cache: no later call went there.
    assert!(stopping.try_recv().is_none());
    staying.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_shutting_down_reply_with_nobody_else_is_no_provider() {
    let broker = Broker::new();
    let mut stopping = RawPeer::connect(&broker, &config(&broker), 64);
    stopping.provide(&["lone.who"]).await;
    let caller = client(config(&broker)).await.with_retries(0);
    let call = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, String>("lone.who", ()).await }
    });
    let received = stopping.next_call().await;
    stopping
        .answer(&received, Status::ShuttingDown, crate::codec::NIL)
        .await;
    match call.await.expect("join") {
        Err(Error::NoProvider { attempts, .. }) => assert_eq!(attempts, 1),
        other => panic!("expected NoProvider, got {other:?}"),
    }
    assert_eq!(caller.stats().rerouted_calls, 1);
}

#[tokio::test(start_paused = true)]
async fn a_publish_that_reaches_nobody_re_routes_once_and_is_counted() {
    let broker = Broker::new();
    let deaf = server(config(&broker)).await;
    let deaf_calls = answer_name(&deaf, "pair.who", "deaf").await;
    let alive = server(config(&broker)).await;
    answer_name(&alive, "pair.who", "alive").await;
    let caller = client(config(&broker)).await.with_retries(0);
    settle().await; // the first heartbeat has run: the next one, which heals, is far off
    broker.drop_subscriptions(deaf.id());
    let started = Instant::now();
    for _ in 0..6 {
        let who: String = caller.call("pair.who", ()).await.expect("re-routed");
        assert_eq!(who, "alive");
    }
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "re-routing waits for nothing"
    );
    // Round-robin over two providers picks the deaf one within two calls; once found gone, it
    // is out of the cache.
    assert_eq!(caller.stats().rerouted_calls, 1);
    assert_eq!(deaf_calls.get(), 0);
    alive.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_publish_that_reaches_nobody_with_no_other_provider_is_no_provider() {
    let broker = Broker::new();
    let deaf = server(config(&broker)).await;
    answer_name(&deaf, "lone.who", "deaf").await;
    let caller = client(config(&broker)).await.with_retries(0);
    settle().await; // the first heartbeat has run: the next one, which heals, is far off
    broker.drop_subscriptions(deaf.id());
    match caller.call::<_, String>("lone.who", ()).await {
        Err(Error::NoProvider { method, attempts }) => {
            assert_eq!(method, "lone.who");
            assert_eq!(attempts, 1, "the re-route itself cost no attempt");
        }
        other => panic!("expected NoProvider, got {other:?}"),
    }
    assert_eq!(caller.stats().rerouted_calls, 1);
}

#[tokio::test(start_paused = true)]
async fn a_closed_client_fails_with_shutdown() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "a.who", "a").await;
    let caller = client(config(&broker)).await;
    let clone = caller.clone();
    assert_eq!(
        caller.call::<_, String>("a.who", ()).await.expect("call"),
        "a"
    );
    caller.close().await;
    assert!(matches!(
        caller.call::<_, String>("a.who", ()).await,
        Err(Error::Shutdown)
    ));
    // Clones share the node: closed too.
    assert!(matches!(
        clone.call::<_, String>("a.who", ()).await,
        Err(Error::Shutdown)
    ));
    assert!(matches!(
        caller.send(provider.id(), &"hi").await,
        Err(Error::Shutdown)
    ));
    // Its messages end.
    assert!(caller.messages().next().await.is_none());
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn closing_a_client_fails_its_waiting_calls_with_shutdown() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    nap(&provider, "a.nap", "a").await;
    let caller = client(config(&broker)).await.with_timeout(ms(10_000));
    let call = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, String>("a.nap", (5_000u64,)).await }
    });
    eventually("the call is waiting", ms(100), || async {
        caller.stats().pending_calls == 1
    })
    .await;
    let started = Instant::now();
    caller.close().await;
    assert!(matches!(call.await.expect("join"), Err(Error::Shutdown)));
    assert!(started.elapsed() < ms(100), "not left to time out");
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_failed_publish_is_a_redis_error_without_retries() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "a.who", "a").await;
    let caller = client(config(&broker)).await.with_retries(0);
    // Warm the provider cache, so the next command is the call's PUBLISH.
    caller.call::<_, String>("a.who", ()).await.expect("call");
    broker.fail_commands(caller.id(), 1);
    match caller.call::<_, String>("a.who", ()).await {
        Err(Error::Redis(crate::TransportError::Command { command, .. })) => {
            assert_eq!(command, "PUBLISH")
        }
        other => panic!("expected a Redis error, got {other:?}"),
    }
    assert_eq!(calls.get(), 1, "the failed call never ran");
    // The failure was used up: the next call goes through.
    assert_eq!(
        caller.call::<_, String>("a.who", ()).await.expect("call"),
        "a"
    );
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_failed_publish_is_retried_after_a_backoff() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "a.who", "a").await;
    let caller = client(config(&broker)).await;
    caller.call::<_, String>("a.who", ()).await.expect("call");
    broker.fail_commands(caller.id(), 1);
    let started = Instant::now();
    let who: String = caller
        .clone()
        .with_retries(1)
        .call("a.who", ())
        .await
        .expect("the retry succeeds");
    assert_eq!(who, "a");
    assert!(started.elapsed() >= ms(50), "backoff(1) = 50 ms");
    assert_eq!(calls.get(), 2);
    // More failures than attempts (and a periodic refresh that may take one meanwhile): the
    // last failure is returned.
    broker.fail_commands(caller.id(), 5);
    match caller
        .clone()
        .with_retries(1)
        .call::<_, String>("a.who", ())
        .await
    {
        Err(Error::Redis(_)) => {}
        other => panic!("expected a Redis error, got {other:?}"),
    }
    assert_eq!(calls.get(), 2);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_failed_registry_lookup_uses_an_attempt() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "a.who", "a").await;
    let caller = client(config(&broker)).await;
    broker.fail_commands(caller.id(), 1);
    match caller
        .clone()
        .with_retries(0)
        .call::<_, String>("a.who", ())
        .await
    {
        Err(Error::Redis(_)) => {}
        other => panic!("expected a Redis error from the lookup, got {other:?}"),
    }
    broker.fail_commands(caller.id(), 1);
    let who: String = caller
        .clone()
        .with_retries(1)
        .call("a.who", ())
        .await
        .expect("the lookup is retried");
    assert_eq!(who, "a");
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn invalid_method_names_fail_before_anything_is_sent() {
    let broker = Broker::new();
    let caller = client(config(&broker)).await.with_retries(3);
    let long = "m".repeat(257);
    for name in [
        "",
        "with space",
        "brace{s}",
        "tab\there",
        "new\nline",
        long.as_str(),
    ] {
        let started = Instant::now();
        match caller.call::<_, ()>(name, ()).await {
            Err(Error::InvalidMethod { method, .. }) => assert_eq!(method, name),
            other => panic!("{name:?}: expected InvalidMethod, got {other:?}"),
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "{name:?}: no retry");
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_over_max_body_size_fails_without_being_sent() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = Counter::default();
    let counter = calls.clone();
    provider
        .register("big.len", move |(s,): (String,)| {
            counter.bump();
            async move { Ok::<_, Infallible>(s.len()) }
        })
        .await
        .expect("register");
    let caller = client(config(&broker).max_body_size(1024))
        .await
        .with_retries(3);
    assert_eq!(
        caller
            .call::<_, usize>("big.len", ("x".repeat(900),))
            .await
            .expect("fits"),
        900
    );
    match caller
        .call::<_, usize>("big.len", ("x".repeat(2000),))
        .await
    {
        Err(Error::TooLarge { size, max, .. }) => {
            assert!(size > 2000);
            assert_eq!(max, 1024);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(calls.get(), 1);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn an_application_error_arrives_as_remote_with_its_text() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    provider
        .register("math.div", |(a, b): (i64, i64)| async move {
            if b == 0 {
                Err(format!("cannot divide {a} by zero"))
            } else {
                Ok(a / b)
            }
        })
        .await
        .expect("register");
    let caller = client(config(&broker)).await.with_retries(3);
    assert_eq!(
        caller
            .call::<_, i64>("math.div", (9, 3))
            .await
            .expect("div"),
        3
    );
    match caller.call::<_, i64>("math.div", (9, 0)).await {
        Err(Error::Remote(remote)) => {
            assert_eq!(remote.method(), "math.div");
            assert_eq!(remote.node(), provider.id());
            assert_eq!(remote.message(), Some("cannot divide 9 by zero"));
            assert_eq!(
                remote.decode::<String>().expect("text"),
                "cannot divide 9 by zero"
            );
        }
        other => panic!("expected Remote, got {other:?}"),
    }
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_reply_of_another_type_is_a_codec_error() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "a.who", "a").await;
    let caller = client(config(&broker)).await;
    match caller.call::<_, u64>("a.who", ()).await {
        Err(Error::Codec { action, .. }) => {
            assert!(action.contains("a.who"), "{action}");
            assert!(action.contains(provider.id().as_str()), "{action}");
        }
        other => panic!("expected Codec, got {other:?}"),
    }
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_provider_listed_for_a_method_it_does_not_serve_answers_unknown_method() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "a.who", "a").await;
    // A stale registry entry claims it serves `ghost.m`.
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    raw.register_as(provider.id(), &["ghost.m"], TTL).await;
    let caller = client(config(&broker)).await.with_retries(2);
    match caller.call::<_, ()>("ghost.m", ()).await {
        Err(Error::UnknownMethod { method, node }) => {
            assert_eq!(method, "ghost.m");
            assert_eq!(&node, provider.id());
        }
        other => panic!("expected UnknownMethod, got {other:?}"),
    }
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_status_from_a_newer_protocol_is_a_protocol_error() {
    let broker = Broker::new();
    let mut newer = RawPeer::connect(&broker, &config(&broker), 64);
    newer.provide(&["new.m"]).await;
    let caller = client(config(&broker)).await.with_retries(2);
    let call = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, ()>("new.m", ()).await }
    });
    let received = newer.next_call().await;
    newer
        .answer(&received, Status::Unrecognized, &encoded("whatever"))
        .await;
    match call.await.expect("join") {
        Err(Error::Protocol(reason)) => assert!(reason.contains(newer.id.as_str()), "{reason}"),
        other => panic!("expected Protocol, got {other:?}"),
    }
    // Final: not retried.
    assert!(newer.try_recv().is_none());
}

#[tokio::test(start_paused = true)]
async fn free_re_routes_are_bounded_per_call() {
    let broker = Broker::new();
    let mut deaf = Vec::new();
    for _ in 0..20 {
        let provider = server(config(&broker)).await;
        answer_name(&provider, "many.who", "deaf").await;
        deaf.push(provider);
    }
    let caller = client(config(&broker)).await.with_retries(0);
    settle().await; // the first heartbeats have run: the next ones, which heal, are far off
    for provider in &deaf {
        broker.drop_subscriptions(provider.id());
    }
    match caller.call::<_, String>("many.who", ()).await {
        Err(Error::NoProvider { attempts, .. }) => assert_eq!(attempts, 1),
        other => panic!("expected NoProvider, got {other:?}"),
    }
    // 16 re-routes for free, and the 17th provider found gone ends the attempt.
    assert_eq!(caller.stats().rerouted_calls, 17);
}

#[tokio::test(start_paused = true)]
async fn a_wait_for_byte_budget_that_outlasts_the_timeout_fails_at_once() {
    let broker = Broker::new();
    let mut provider = RawPeer::connect(&broker, &config(&broker), 64);
    provider.provide(&["budget.m"]).await;
    // A budget of one byte: one call in flight at a time.
    let caller = client(config(&broker).max_bytes_in_flight(1)).await;
    let first = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, String>("budget.m", ()).await }
    });
    let held = provider.next_call().await;
    let started = Instant::now();
    match caller
        .clone()
        .with_timeout(ms(100))
        .with_retries(3)
        .call::<_, String>("budget.m", ())
        .await
    {
        Err(Error::Timeout { attempts, .. }) => assert_eq!(attempts, 1, "not retried"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    about(started.elapsed(), ms(100));
    assert!(provider.try_recv().is_none(), "it was never sent");
    provider.answer(&held, Status::Ok, &encoded("first")).await;
    assert_eq!(first.await.expect("join").expect("first"), "first");
}

#[tokio::test(start_paused = true)]
async fn a_call_that_waited_for_byte_budget_is_sent_with_the_time_left() {
    let broker = Broker::new();
    let mut provider = RawPeer::connect(&broker, &config(&broker), 64);
    provider.provide(&["budget.m"]).await;
    let caller = client(config(&broker).max_bytes_in_flight(1)).await;
    let first = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, String>("budget.m", ()).await }
    });
    let held = provider.next_call().await;
    assert_eq!(held.deadline_ms, TIMEOUT.as_millis() as u64);
    let started = Instant::now();
    let second = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, String>("budget.m", ()).await }
    });
    tokio::time::sleep(ms(300)).await;
    assert!(provider.try_recv().is_none(), "waiting for room");
    provider.answer(&held, Status::Ok, &encoded("first")).await;
    assert_eq!(first.await.expect("join").expect("first"), "first");
    // Sent once there is room, with what is left of its timeout (protocol.md §6.1 step 4).
    let sent = provider.next_call().await;
    assert_eq!(
        sent.deadline_ms, 200,
        "500 ms timeout, 300 ms spent waiting"
    );
    // And the attempt ends when that is up: 500 ms after the call started, not 800.
    match second.await.expect("join") {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
    about(started.elapsed(), TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_suspect_provider_is_chosen_again_once_its_ttl_has_passed() {
    let broker = Broker::new();
    let slow = server(config(&broker)).await;
    let slow_calls = answer_name(&slow, "pair.who", "slow").await;
    let fast = server(config(&broker)).await;
    answer_name(&fast, "pair.who", "fast").await;
    let caller = client(config(&broker)).await.with_retries(1);
    broker.freeze(slow.id());
    // Until one call times out on the frozen provider, which becomes suspect.
    let mut timed_out = false;
    for _ in 0..2 {
        let started = Instant::now();
        caller
            .call::<_, String>("pair.who", ())
            .await
            .expect("call");
        timed_out |= started.elapsed() >= TIMEOUT;
    }
    assert!(timed_out);
    broker.thaw(slow.id());
    settle().await;
    assert_eq!(slow_calls.get(), 1);
    // protocol.md §6.1: suspect for one TTL. Past it, round-robin includes it again.
    tokio::time::sleep(TTL + HEARTBEAT).await;
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(
            caller
                .call::<_, String>("pair.who", ())
                .await
                .expect("call"),
        );
    }
    assert!(answers.contains(&"slow".to_string()), "{answers:?}");
    slow.shutdown().await.expect("shutdown");
    fast.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_timeout_reports_the_time_spent_on_the_call() {
    let broker = Broker::new();
    let frozen = server(config(&broker)).await;
    answer_name(&frozen, "slow.who", "frozen").await;
    broker.freeze(frozen.id());
    let caller = client(config(&broker))
        .await
        .with_timeout(ms(150))
        .with_retries(2);
    match caller.call::<_, String>("slow.who", ()).await {
        // "Time spent on the call in all": three attempts of 150 ms.
        Err(Error::Timeout { after, .. }) => assert!(after >= ms(450), "{after:?}"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    broker.thaw(frozen.id());
    frozen.shutdown().await.expect("shutdown");
}
