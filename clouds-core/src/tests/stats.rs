//! Each server's per-method figures, published with its heartbeat and read by the monitor;
//! draining servers.

use super::*;
use crate::testing::Broker;
use crate::{Error, Monitor};

/// Registers `method`: it fails with an application error when its argument is odd.
async fn even_only(server: &Server, method: &str) {
    server
        .register(method, |(n,): (u64,)| async move {
            if n % 2 == 1 {
                Err(format!("{n} is odd"))
            } else {
                Ok(n)
            }
        })
        .await
        .expect("register");
}

#[tokio::test(start_paused = true)]
async fn the_monitor_reads_each_methods_figures_after_real_calls() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    even_only(&provider, "st.even").await;
    nap(&provider, "st.nap", "n").await;
    let caller = client(config(&broker)).await;
    for n in 0..10u64 {
        let _ = caller.call::<_, u64>("st.even", (n,)).await;
    }
    assert!(matches!(
        caller.call::<_, u64>("st.even", ("not a number",)).await,
        Err(Error::BadArguments { .. })
    ));
    caller
        .call::<_, String>("st.nap", (20u64,))
        .await
        .expect("nap");
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    // The next heartbeat publishes them.
    tokio::time::sleep(HEARTBEAT + ms(5)).await;
    let snapshot = monitor.snapshot().await.expect("snapshot");
    let info = &snapshot.servers[provider.id()];
    assert!(!info.draining);
    assert!(info.heartbeat_age.is_some());
    let stats = info.stats.as_ref().expect("stats published");
    assert!(!stats.truncated);
    assert!(stats.window > Duration::ZERO);
    let even = stats.methods["st.even"];
    assert_eq!(even.calls, 11);
    assert_eq!(even.errors.application, 5);
    assert_eq!(even.errors.bad_arguments, 1);
    assert_eq!(even.errors.total(), 6);
    assert_eq!((even.in_flight, even.overloaded), (0, 0));
    let nap = stats.methods["st.nap"];
    assert_eq!((nap.calls, nap.errors.total()), (1, 0));
    // The totals add up over methods and servers.
    let total = snapshot.total();
    assert_eq!(total.calls, 12);
    assert_eq!(snapshot.method_totals()["st.even"], even);
    assert_eq!(stats.total().calls, 12);
    // Latencies cover the window: the calls above fall in one of the windows so far; a later
    // window with no calls has none, and the counters since start stay.
    tokio::time::sleep(HEARTBEAT * 2).await;
    let later = monitor.snapshot().await.expect("snapshot");
    let stats = later.servers[provider.id()].stats.as_ref().expect("stats");
    assert_eq!(stats.methods["st.even"].window_calls, 0);
    assert_eq!(stats.methods["st.even"].latency, None);
    assert_eq!(stats.methods["st.even"].calls, 11);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_window_holds_its_calls_latencies() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let blocking = Counter::default();
    let counter = blocking.clone();
    provider
        .register("st.spin", move |(): ()| {
            counter.bump();
            // Real time (the handler's latency is measured on the real clock).
            std::thread::sleep(std::time::Duration::from_millis(2));
            async { Ok::<_, Infallible>(()) }
        })
        .await
        .expect("register");
    let caller = client(config(&broker)).await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    // Start from a fresh window.
    tokio::time::sleep(HEARTBEAT + ms(1)).await;
    for _ in 0..3 {
        caller.call::<_, ()>("st.spin", ()).await.expect("call");
    }
    tokio::time::sleep(HEARTBEAT).await;
    let snapshot = monitor.snapshot().await.expect("snapshot");
    let m = snapshot.servers[provider.id()]
        .stats
        .as_ref()
        .expect("stats")
        .methods["st.spin"];
    assert_eq!((m.calls, m.window_calls), (3, 3));
    let latency = m.latency.expect("latency of the window");
    assert!(latency.p50 >= ms(2) - ms(2) / 16, "{latency:?}");
    assert!(latency.p50 <= latency.p90 && latency.p90 <= latency.p99 && latency.p99 <= latency.max);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn overloaded_refusals_are_counted_per_method() {
    let broker = Broker::new();
    let provider = server(config(&broker).max_in_flight(1)).await;
    nap(&provider, "st.slow", "s").await;
    let caller = client(config(&broker)).await.with_retries(0);
    let first = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, String>("st.slow", (400u64,)).await }
    });
    settle().await;
    assert!(caller.call::<_, String>("st.slow", (1u64,)).await.is_err());
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    tokio::time::sleep(HEARTBEAT).await;
    let snapshot = monitor.snapshot().await.expect("snapshot");
    let m = snapshot.servers[provider.id()]
        .stats
        .as_ref()
        .expect("stats")
        .methods["st.slow"];
    assert_eq!(m.overloaded, 1);
    assert_eq!(m.in_flight, 1, "the first is still running");
    first.await.expect("join").expect("first call");
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_draining_server_is_listed_as_such_and_provides_nothing_until_done() {
    let broker = Broker::new();
    let provider = Arc::new(server(config(&broker)).await);
    nap(&provider, "st.drain", "d").await;
    let caller = client(config(&broker)).await;
    let running = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call::<_, String>("st.drain", (200u64,)).await }
    });
    settle().await;
    let id = provider.id().clone();
    let stopping = tokio::spawn({
        let provider = provider.clone();
        async move { provider.shutdown().await }
    });
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    eventually("the server is listed as draining", ms(100), || async {
        monitor
            .snapshot()
            .await
            .is_ok_and(|s| s.servers.get(&id).is_some_and(|i| i.draining))
    })
    .await;
    let snapshot = monitor.snapshot().await.expect("snapshot");
    assert!(!snapshot.methods.contains_key("st.drain"), "no new calls");
    assert_eq!(snapshot.servers[&id].methods, ["st.drain"]);
    assert_eq!(running.await.expect("join").expect("call"), "d");
    stopping.await.expect("join").expect("shutdown");
    assert!(
        !monitor
            .snapshot()
            .await
            .expect("snapshot")
            .servers
            .contains_key(&id)
    );
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_summary_is_skipped_and_the_entry_still_listed() {
    let broker = Broker::new();
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    for (n, garbage) in [
        "",
        "clouds-stats 1 window_ms=oops",
        "clouds-stats 99\nm calls=1",
        "\u{0}\u{1}binary",
    ]
    .into_iter()
    .enumerate()
    {
        let id = NodeId::from(format!("server-odd{n}-1-1-000000").as_str());
        raw.register_with_fields(
            &id,
            &["odd.m"],
            TTL,
            vec![
                ("id", id.to_string()),
                ("host", "raw-host".to_string()),
                ("pid", "1".to_string()),
                ("started_at_ms", "0".to_string()),
                ("in_flight", "0".to_string()),
                ("methods", "odd.m".to_string()),
                ("beat_at_ms", "not a time".to_string()),
                ("draining", "maybe".to_string()),
                ("stats", garbage.to_string()),
            ],
        )
        .await;
        let snapshot = monitor.snapshot().await.expect("snapshot");
        let info = &snapshot.servers[&id];
        assert_eq!(info.stats, None);
        assert_eq!(info.heartbeat_age, None);
        assert!(!info.draining);
    }
}

#[tokio::test(start_paused = true)]
async fn a_ping_measures_the_round_trip_to_a_server_and_runs_no_handler() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "st.pinged", "p").await;
    let caller = client(config(&broker)).await;
    caller.ping(provider.id()).await.expect("pong");
    assert_eq!(calls.get(), 0);
    assert!(matches!(
        caller.ping(&NodeId::from("server-gone-1-1-000000")).await,
        Err(Error::Unreachable { .. })
    ));
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    tokio::time::sleep(HEARTBEAT).await;
    let snapshot = monitor.snapshot().await.expect("snapshot");
    let stats = snapshot.servers[provider.id()]
        .stats
        .as_ref()
        .expect("stats");
    assert_eq!(stats.total().calls, 0, "a ping is no call of a method");
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_monitor_hears_joins_and_leaves_as_they_happen() {
    let broker = Broker::new();
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let mut events = monitor.events();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "ev.m", "e").await;
    let id = provider.id().clone();
    loop {
        match events.next().await.expect("an event") {
            crate::RegistryEvent::Joined { node, methods } if methods == ["ev.m"] => {
                assert_eq!(node, id);
                break;
            }
            _ => {}
        }
    }
    provider.shutdown().await.expect("shutdown");
    loop {
        if let crate::RegistryEvent::Left { node } = events.next().await.expect("an event") {
            assert_eq!(node, id);
            break;
        }
    }
    monitor.close().await;
    assert_eq!(events.next().await, None, "ends with the monitor");
}

/// With the `metrics` feature, calls are recorded through the `metrics` facade.
#[cfg(feature = "metrics")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_recorded_through_the_metrics_facade() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    even_only(&provider, "mx.even").await;
    let caller = client(config(&broker)).await;
    caller.call::<_, u64>("mx.even", (2u64,)).await.expect("ok");
    assert!(caller.call::<_, u64>("mx.even", (3u64,)).await.is_err());
    /// A metric's name, labels and how many values or counts it holds.
    type Recorded = (String, Vec<(String, String)>, usize);
    let recorded: Vec<Recorded> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            let n = match value {
                DebugValue::Histogram(values) => values.len(),
                DebugValue::Counter(n) => n as usize,
                DebugValue::Gauge(_) => 0,
            };
            (key.name().to_string(), labels, n)
        })
        .collect();
    let has = |name: &str, outcome: &str| {
        recorded.iter().any(|(n, labels, count)| {
            n == name
                && *count == 1
                && labels.contains(&("rpc.method".into(), "mx.even".into()))
                && labels.contains(&("rpc.system.name".into(), "clouds".into()))
                && labels.contains(&("outcome".into(), outcome.into()))
        })
    };
    assert!(has("rpc.client.call.duration", "ok"), "{recorded:?}");
    assert!(
        has("rpc.client.call.duration", "application_error"),
        "{recorded:?}"
    );
    assert!(has("rpc.server.call.duration", "ok"), "{recorded:?}");
    assert!(
        has("rpc.server.call.duration", "application_error"),
        "{recorded:?}"
    );
    provider.shutdown().await.expect("shutdown");
}
