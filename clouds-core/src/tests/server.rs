//! The server side: dispatch, limits, registration and the lifecycle.

use std::convert::Infallible;

use tokio::time::Instant;

use super::*;
use crate::testing::Broker;
use crate::{Error, Monitor, Route, Service};

/// Registers `method`: it panics before its future exists (`sync`) or after a wait.
async fn panicking(server: &Server, method: &str, sync: bool) {
    server
        .register(method, move |(): ()| {
            if sync {
                panic!("panicked at once");
            }
            async move {
                tokio::time::sleep(ms(10)).await;
                if true {
                    panic!("panicked after a wait");
                }
                Ok::<(), Infallible>(())
            }
        })
        .await
        .expect("register");
}

#[tokio::test(start_paused = true)]
async fn panics_before_and_after_a_wait_are_reported_and_the_server_lives() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    panicking(&provider, "p.now", true).await;
    panicking(&provider, "p.later", false).await;
    answer_name(&provider, "p.who", "alive").await;
    let idle = provider.stats().tasks;
    let caller = client(config(&broker)).await;
    for (method, message) in [
        ("p.now", "panicked at once"),
        ("p.later", "panicked after a wait"),
    ] {
        match caller.call::<_, ()>(method, ()).await {
            Err(Error::Panicked {
                method: m,
                node,
                message: got,
            }) => {
                assert_eq!(m, method);
                assert_eq!(&node, provider.id());
                assert_eq!(got, message);
            }
            other => panic!("{method}: expected Panicked, got {other:?}"),
        }
    }
    assert_eq!(
        caller.call::<_, String>("p.who", ()).await.expect("alive"),
        "alive"
    );
    let stats = provider.stats();
    assert_eq!(stats.in_flight, 0, "panicked calls gave their slot back");
    assert_eq!(
        stats.tasks, idle,
        "the task of the handler that waited is gone"
    );
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_waits_moves_to_a_task_of_its_own_and_the_count_returns_to_idle() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = nap(&provider, "n.nap", "n").await;
    answer_name(&provider, "n.who", "n").await;
    let caller = client(config(&broker)).await;
    let idle = provider.stats().tasks;
    // A handler that finishes at once needs no task.
    caller.call::<_, String>("n.who", ()).await.expect("call");
    assert_eq!(provider.stats().tasks, idle);
    let running: Vec<_> = (0..3)
        .map(|_| {
            let caller = caller.clone();
            tokio::spawn(async move { caller.call::<_, String>("n.nap", (200u64,)).await })
        })
        .collect();
    eventually("three handlers wait", ms(100), || async {
        calls.get() == 3
    })
    .await;
    let stats = provider.stats();
    assert_eq!(stats.tasks, idle + 3, "one task per waiting handler");
    assert_eq!(stats.in_flight, 3);
    // The receive loop is free meanwhile: a quick call is answered at once.
    let started = Instant::now();
    caller.call::<_, String>("n.who", ()).await.expect("call");
    assert_eq!(started.elapsed(), Duration::ZERO);
    for call in running {
        assert_eq!(call.await.expect("join").expect("nap"), "n");
    }
    settle().await;
    let stats = provider.stats();
    assert_eq!(stats.tasks, idle);
    assert_eq!(stats.in_flight, 0);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn spawn_handlers_runs_every_call_in_a_task_with_the_same_outcomes() {
    let broker = Broker::new();
    let provider = server(config(&broker).spawn_handlers(true)).await;
    provider
        .register("s.add", |(a, b): (i64, i64)| async move {
            Ok::<_, Infallible>(a + b)
        })
        .await
        .expect("register");
    panicking(&provider, "s.boom", true).await;
    let calls = nap(&provider, "s.nap", "s").await;
    let caller = client(config(&broker)).await;
    let idle = provider.stats().tasks;
    assert_eq!(
        caller.call::<_, i64>("s.add", (2, 3)).await.expect("add"),
        5
    );
    assert!(matches!(
        caller.call::<_, i64>("s.add", ("two", 3)).await,
        Err(Error::BadArguments { .. })
    ));
    assert!(matches!(
        caller.call::<_, ()>("s.boom", ()).await,
        Err(Error::Panicked { .. })
    ));
    let running = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, String>("s.nap", (100u64,)).await }
    });
    eventually("the handler runs", ms(50), || async { calls.get() == 1 }).await;
    assert_eq!(provider.stats().tasks, idle + 1);
    assert_eq!(provider.stats().in_flight, 1);
    assert_eq!(running.await.expect("join").expect("nap"), "s");
    settle().await;
    assert_eq!(provider.stats().tasks, idle);
    assert_eq!(provider.stats().in_flight, 0);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn max_in_flight_refuses_the_call_past_the_limit_and_frees_its_slots() {
    let broker = Broker::new();
    let provider = server(config(&broker).max_in_flight(2).spawn_handlers(true)).await;
    let calls = nap(&provider, "l.nap", "l").await;
    let caller = client(config(&broker)).await.with_retries(0);
    let running: Vec<_> = (0..2)
        .map(|_| {
            let caller = caller.clone();
            tokio::spawn(async move { caller.call::<_, String>("l.nap", (300u64,)).await })
        })
        .collect();
    eventually("two handlers run", ms(100), || async {
        provider.stats().in_flight == 2
    })
    .await;
    match caller.call::<_, String>("l.nap", (0u64,)).await {
        Err(Error::Overloaded { attempts, .. }) => assert_eq!(attempts, 1),
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert_eq!(calls.get(), 2, "the refused call never ran");
    for call in running {
        call.await.expect("join").expect("nap");
    }
    settle().await;
    assert_eq!(provider.stats().in_flight, 0);
    assert_eq!(
        caller
            .call::<_, String>("l.nap", (0u64,))
            .await
            .expect("room again"),
        "l"
    );
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_spawned_call_past_its_deadline_is_skipped_without_a_reply() {
    let broker = Broker::new();
    let provider = server(config(&broker).spawn_handlers(true)).await;
    provider
        .register("d.block", |(): ()| async move {
            // Holds the (single) runtime thread while 20 ms pass: the next task starts late.
            tokio::time::advance(ms(20)).await;
            Ok::<_, Infallible>(())
        })
        .await
        .expect("register");
    let quick = answer_name(&provider, "d.quick", "quick").await;
    let caller = client(config(&broker)).await;
    // Both calls reach the server in one go, the blocking one first.
    broker.freeze(provider.id());
    let blocking = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, ()>("d.block", ()).await }
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let hurried = tokio::spawn({
        let caller = caller.clone().with_timeout(ms(1));
        async move { caller.call::<_, String>("d.quick", ()).await }
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(caller.stats().pending_calls, 2);
    broker.thaw(provider.id());
    blocking.await.expect("join").expect("the blocking call");
    assert!(matches!(
        hurried.await.expect("join"),
        Err(Error::Timeout { .. })
    ));
    settle().await;
    assert_eq!(provider.stats().expired_calls, 1);
    assert_eq!(quick.get(), 0, "the expired call did not run");
    assert_eq!(caller.stats().late_replies, 0, "and got no reply");
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_call_with_a_zero_deadline_is_dropped_silently_and_counted() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "z.who", "z").await;
    let mut raw = RawPeer::connect(&broker, &config(&broker), 64);
    raw.subscribe(&raw.inbox(raw.id.as_str())).await;
    let to = raw.calls(provider.id().as_str());
    let frame = call_frame(7, "z.who", raw.id.as_str(), 0, &());
    assert_eq!(raw.publish(to.clone(), frame).await, 1);
    settle().await;
    assert_eq!(provider.stats().expired_calls, 1);
    assert_eq!(calls.get(), 0);
    assert!(raw.try_recv().is_none(), "no reply to an expired call");
    // The same call with time left is answered.
    let frame = call_frame(8, "z.who", raw.id.as_str(), 100, &());
    raw.publish(to, frame).await;
    match raw.next_frame().await {
        Frame::Reply(reply) => {
            assert_eq!(reply.id, 8);
            assert_eq!(reply.status, Status::Ok);
            assert_eq!(
                crate::codec::decode_value::<String>(&reply.body),
                Ok("z".into())
            );
        }
        other => panic!("expected a reply, got {other:?}"),
    }
    assert_eq!(calls.get(), 1);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_call_for_a_method_not_served_is_answered_unknown_method() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "u.who", "u").await;
    let mut raw = RawPeer::connect(&broker, &config(&broker), 64);
    raw.subscribe(&raw.inbox(raw.id.as_str())).await;
    let frame = call_frame(3, "u.other", raw.id.as_str(), 100, &());
    raw.publish(raw.calls(provider.id().as_str()), frame).await;
    match raw.next_frame().await {
        Frame::Reply(reply) => {
            assert_eq!(reply.id, 3);
            assert_eq!(reply.status, Status::UnknownMethod);
            assert_eq!(
                crate::codec::decode_value::<String>(&reply.body),
                Ok("u.other".into())
            );
        }
        other => panic!("expected a reply, got {other:?}"),
    }
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_idempotent_and_everything_after_it_is_refused() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "i.who", "i").await;
    let own = provider.client();
    assert_eq!(own.call::<_, String>("i.who", ()).await.expect("call"), "i");
    provider.shutdown().await.expect("first shutdown");
    let started = Instant::now();
    provider.shutdown().await.expect("second shutdown");
    provider.shutdown().await.expect("third shutdown");
    assert_eq!(started.elapsed(), Duration::ZERO, "nothing left to do");
    assert!(matches!(
        provider
            .register("i.new", |(): ()| async { Ok::<_, Infallible>(()) })
            .await,
        Err(Error::Shutdown)
    ));
    assert!(matches!(
        own.call::<_, String>("i.who", ()).await,
        Err(Error::Shutdown)
    ));
    assert!(provider.messages().next().await.is_none());
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    assert!(
        monitor
            .snapshot()
            .await
            .expect("snapshot")
            .servers
            .is_empty()
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_shutdown_runs_again_to_completion_and_loses_no_call() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = nap(&provider, "c.nap", "c").await;
    let caller = client(config(&broker)).await.with_timeout(ms(5_000));
    let running = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, String>("c.nap", (1_000u64,)).await }
    });
    eventually("the call runs", ms(100), || async { calls.get() == 1 }).await;
    // Cut short at several points: before its first step finishes, and while it waits for
    // the handler.
    for cut in [Duration::ZERO, ms(1), ms(50)] {
        assert!(
            tokio::time::timeout(cut, provider.shutdown())
                .await
                .is_err(),
            "a shutdown cut after {cut:?} cannot have finished: a handler is running"
        );
    }
    // It left the method sets and stopped taking calls already; it is listed only as
    // draining, while its handler runs.
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let snapshot = monitor.snapshot().await.expect("snapshot");
    assert!(snapshot.methods.is_empty());
    assert!(snapshot.servers.values().all(|info| info.draining));
    match caller
        .clone()
        .with_retries(0)
        .call::<_, String>("c.nap", (0u64,))
        .await
    {
        Err(Error::NoProvider { .. }) => {}
        other => panic!("expected NoProvider, got {other:?}"),
    }
    let started = Instant::now();
    provider.shutdown().await.expect("the shutdown completes");
    assert!(started.elapsed() < ms(1_000), "{:?}", started.elapsed());
    assert_eq!(running.await.expect("join").expect("not lost"), "c");
    assert_eq!(calls.get(), 1);
    assert!(
        monitor
            .snapshot()
            .await
            .expect("snapshot")
            .servers
            .is_empty()
    );
    provider.shutdown().await.expect("and is done");
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_handlers_up_to_the_shutdown_timeout() {
    let broker = Broker::new();
    let provider = server(config(&broker).shutdown_timeout(ms(200))).await;
    let calls = nap(&provider, "w.nap", "w").await;
    let caller = client(config(&broker)).await.with_timeout(ms(1_000));
    let stuck = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, String>("w.nap", (10_000u64,)).await }
    });
    eventually("the call runs", ms(100), || async { calls.get() == 1 }).await;
    let started = Instant::now();
    provider.shutdown().await.expect("shutdown");
    let took = started.elapsed();
    assert!(took >= ms(200) && took < ms(250), "{took:?}");
    assert!(matches!(
        stuck.await.expect("join"),
        Err(Error::Timeout { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_a_running_handler_reply() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = nap(&provider, "g.nap", "g").await;
    let caller = client(config(&broker)).await.with_timeout(ms(2_000));
    let running = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, String>("g.nap", (400u64,)).await }
    });
    eventually("the call runs", ms(100), || async { calls.get() == 1 }).await;
    let started = Instant::now();
    provider.shutdown().await.expect("shutdown");
    // It waited for the handler (started at most 5 ms before).
    assert!(started.elapsed() >= ms(395), "{:?}", started.elapsed());
    assert_eq!(running.await.expect("join").expect("answered"), "g");
    assert_eq!(caller.stats().late_replies, 0);
}

struct Routes(Vec<&'static str>);

impl Service for Routes {
    fn routes(self) -> Vec<Route> {
        self.0
            .into_iter()
            .map(|name| Route::new(name, |(): ()| async { Ok::<_, Infallible>(()) }))
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_taken_or_repeated_name_fails_and_adds_nothing() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    provider
        .serve(Routes(vec!["r.a", "r.b"]))
        .await
        .expect("serve");
    for routes in [vec!["r.a"], vec!["r.c", "r.c"], vec!["r.d", "r.b"]] {
        match provider.serve(Routes(routes.clone())).await {
            Err(Error::InvalidMethod { reason, .. }) => {
                assert!(
                    reason.contains("already registered"),
                    "{routes:?}: {reason}"
                )
            }
            other => panic!("{routes:?}: expected InvalidMethod, got {other:?}"),
        }
    }
    match provider
        .register("r.a", |(): ()| async { Ok::<_, Infallible>(()) })
        .await
    {
        Err(Error::InvalidMethod { method, .. }) => assert_eq!(method, "r.a"),
        other => panic!("expected InvalidMethod, got {other:?}"),
    }
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let snapshot = monitor.snapshot().await.expect("snapshot");
    assert_eq!(
        snapshot.methods.keys().collect::<Vec<_>>(),
        ["r.a", "r.b"],
        "none of the failed registrations added anything"
    );
    // The names of failed registrations are still free.
    provider
        .serve(Routes(vec!["r.c", "r.d"]))
        .await
        .expect("serve");
    let snapshot = monitor.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.methods.len(), 4);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn invalid_method_names_are_refused_at_registration() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let longest = "m".repeat(256);
    let too_long = "m".repeat(257);
    for name in [
        "",
        "a b",
        "{a}.b",
        "a}",
        "a\tb",
        "a\u{7}b",
        too_long.as_str(),
    ] {
        match provider
            .register(name, |(): ()| async { Ok::<_, Infallible>(()) })
            .await
        {
            Err(Error::InvalidMethod { method, .. }) => assert_eq!(method, name),
            other => panic!("{name:?}: expected InvalidMethod, got {other:?}"),
        }
    }
    // At the limits, and with characters the wire allows.
    for name in [longest.as_str(), "x", "ünïcödé.方法", "a:b/c-d_e"] {
        provider
            .register(name, |(): ()| async { Ok::<_, Infallible>(()) })
            .await
            .unwrap_or_else(|e| panic!("{name:?}: {e}"));
    }
    let caller = client(config(&broker)).await;
    caller
        .call::<_, ()>("ünïcödé.方法", ())
        .await
        .expect("call");
    caller.call::<_, ()>(&longest, ()).await.expect("call");
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_server_dropped_without_shutdown_leaves_the_registry_before_its_ttl() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "x.who", "x").await;
    let id = provider.id().clone();
    let calls_channel = format!("clouds:0:calls:{id}");
    assert_eq!(broker.subscribers(&calls_channel), 1);
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let started = Instant::now();
    drop(provider);
    eventually("the entry is removed", TTL, || async {
        !monitor
            .snapshot()
            .await
            .expect("snapshot")
            .servers
            .contains_key(&id)
    })
    .await;
    assert!(started.elapsed() < TTL / 2, "{:?}", started.elapsed());
    eventually("its channels are closed", TTL, || async {
        broker.subscribers(&calls_channel) == 0
    })
    .await;
    let caller = client(config(&broker)).await.with_retries(0);
    assert!(matches!(
        caller.call::<_, String>("x.who", ()).await,
        Err(Error::NoProvider { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_call_over_the_servers_max_frame_size_is_answered_with_a_server_error() {
    let broker = Broker::new();
    let provider = server(config(&broker).max_frame_size(1024)).await;
    let calls = Counter::default();
    let counter = calls.clone();
    provider
        .register("o.len", move |(s,): (String,)| {
            counter.bump();
            async move { Ok::<_, Infallible>(s.len()) }
        })
        .await
        .expect("register");
    let caller = client(config(&broker)).await.with_retries(2);
    match caller.call::<_, usize>("o.len", ("y".repeat(2_000),)).await {
        Err(Error::Server { node, reason, .. }) => {
            assert_eq!(&node, provider.id());
            assert!(reason.contains("max_frame_size"), "{reason}");
        }
        other => panic!("expected Server, got {other:?}"),
    }
    assert_eq!(calls.get(), 0);
    assert_eq!(provider.stats().oversized_frames, 1, "refused, not retried");
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_reply_over_the_servers_max_body_size_becomes_a_server_error() {
    let broker = Broker::new();
    let provider = server(config(&broker).max_body_size(1024)).await;
    provider
        .register("o.make", |(n,): (usize,)| async move {
            Ok::<_, Infallible>("z".repeat(n))
        })
        .await
        .expect("register");
    let caller = client(config(&broker)).await;
    assert_eq!(
        caller
            .call::<_, String>("o.make", (900usize,))
            .await
            .expect("fits")
            .len(),
        900
    );
    match caller.call::<_, String>("o.make", (2_000usize,)).await {
        Err(Error::Server { reason, .. }) => assert!(reason.contains("max_body_size"), "{reason}"),
        other => panic!("expected Server, got {other:?}"),
    }
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn the_servers_own_client_calls_others_and_cannot_be_closed_from_outside() {
    let broker = Broker::new();
    let back = server(config(&broker)).await;
    back.register("b.add", |(a, b): (i64, i64)| async move {
        Ok::<_, Infallible>(a + b)
    })
    .await
    .expect("register");
    let front = server(config(&broker)).await;
    let own = front.client();
    assert_eq!(own.id(), front.id(), "it shares the server's node");
    front
        .register("f.total", move |(a, b): (i64, i64)| {
            let own = own.clone();
            async move { own.call::<_, i64>("b.add", (a, b)).await.map(|s| s * 10) }
        })
        .await
        .expect("register");
    front.client().close().await;
    let caller = client(config(&broker)).await;
    assert_eq!(
        caller
            .call::<_, i64>("f.total", (2, 3))
            .await
            .expect("total"),
        50
    );
    front.shutdown().await.expect("shutdown");
    back.shutdown().await.expect("shutdown");
}
