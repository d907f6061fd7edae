//! Heartbeats: a live server stays listed, a cut-off one expires, a reconnected one returns.

use tokio::time::Instant;

use super::*;
use crate::testing::Broker;
use crate::{Error, Monitor};

/// Whether `monitor` lists `id` right now.
async fn listed(monitor: &Monitor, id: &NodeId) -> bool {
    monitor
        .snapshot()
        .await
        .expect("snapshot")
        .servers
        .contains_key(id)
}

#[tokio::test(start_paused = true)]
async fn a_live_server_stays_listed_for_ten_ttls() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "h.who", "h").await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let started = Instant::now();
    while started.elapsed() < TTL * 10 {
        assert!(
            listed(&monitor, provider.id()).await,
            "dropped out after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(ms(20)).await;
    }
    let snapshot = monitor.snapshot().await.expect("snapshot");
    assert_eq!(
        snapshot.methods.get("h.who"),
        Some(&vec![provider.id().clone()]),
        "the method sets are renewed too"
    );
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_disconnected_server_expires_within_its_ttl_but_not_before_a_heartbeat() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "h.who", "h").await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    tokio::time::sleep(ms(130)).await;
    broker.disconnect(provider.id());
    // Its last beat was at most one heartbeat ago: it lives at least TTL - heartbeat more.
    tokio::time::sleep(TTL - HEARTBEAT - ms(10)).await;
    assert!(listed(&monitor, provider.id()).await);
    tokio::time::sleep(HEARTBEAT + ms(11)).await;
    let snapshot = monitor.snapshot().await.expect("snapshot");
    assert!(!snapshot.servers.contains_key(provider.id()));
    assert!(
        !snapshot.methods.contains_key("h.who"),
        "its method entry expired too"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reconnected_server_reappears_and_is_called_again() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "h.who", "h").await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let caller = client(config(&broker)).await.with_retries(0);
    assert_eq!(
        caller.call::<_, String>("h.who", ()).await.expect("call"),
        "h"
    );
    broker.disconnect(provider.id());
    tokio::time::sleep(TTL + ms(10)).await;
    assert!(!listed(&monitor, provider.id()).await);
    assert!(matches!(
        caller.call::<_, String>("h.who", ()).await,
        Err(Error::NoProvider { .. })
    ));
    broker.reconnect(provider.id());
    eventually("it is listed again", HEARTBEAT, || async {
        listed(&monitor, provider.id()).await
    })
    .await;
    // Its join announcement (or the caller's next refresh) brings it back to the caller.
    settle().await;
    assert_eq!(
        caller.call::<_, String>("h.who", ()).await.expect("call"),
        "h"
    );
    assert_eq!(calls.get(), 2);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_disconnect_shorter_than_the_ttl_never_drops_the_entry() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    broker.disconnect(provider.id());
    let started = Instant::now();
    while started.elapsed() < TTL - HEARTBEAT - ms(10) {
        assert!(listed(&monitor, provider.id()).await);
        tokio::time::sleep(ms(10)).await;
    }
    broker.reconnect(provider.id());
    // Renewed at once on reconnect: listed for the next TTLs too.
    while started.elapsed() < TTL * 4 {
        assert!(
            listed(&monitor, provider.id()).await,
            "dropped out after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(ms(10)).await;
    }
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn failed_beats_are_retried_and_only_a_long_outage_expires_the_entry() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    // A few failures are retried every heartbeat / 4 and absorbed by the TTL.
    broker.fail_commands(provider.id(), 4);
    let started = Instant::now();
    while started.elapsed() < TTL * 3 {
        assert!(listed(&monitor, provider.id()).await);
        tokio::time::sleep(ms(10)).await;
    }
    // Failures for 40 × 25 ms = 1 s: the entry expires, then returns with the next beat that
    // succeeds.
    broker.fail_commands(provider.id(), 40);
    eventually("the entry expires", ms(1_000), || async {
        !listed(&monitor, provider.id()).await
    })
    .await;
    eventually("the entry returns", ms(1_500), || async {
        listed(&monitor, provider.id()).await
    })
    .await;
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn heartbeats_report_the_calls_in_flight() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = nap(&provider, "h.nap", "h").await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let in_flight = |monitor: Monitor, id: NodeId| async move {
        monitor.snapshot().await.expect("snapshot").servers[&id].in_flight
    };
    assert_eq!(in_flight(monitor.clone(), provider.id().clone()).await, 0);
    let caller = client(config(&broker)).await.with_timeout(ms(5_000));
    let running: Vec<_> = (0..2)
        .map(|_| {
            let caller = caller.clone();
            tokio::spawn(async move { caller.call::<_, String>("h.nap", (1_000u64,)).await })
        })
        .collect();
    eventually("both run", ms(100), || async { calls.get() == 2 }).await;
    tokio::time::sleep(HEARTBEAT + ms(5)).await;
    assert_eq!(in_flight(monitor.clone(), provider.id().clone()).await, 2);
    for call in running {
        call.await.expect("join").expect("nap");
    }
    tokio::time::sleep(HEARTBEAT + ms(5)).await;
    assert_eq!(in_flight(monitor.clone(), provider.id().clone()).await, 0);
    provider.shutdown().await.expect("shutdown");
}

/// Redis Cluster ends a sharded subscription silently when its slot moves (fred drops the
/// notice): the server's next heartbeat finds its call channel without a subscriber,
/// subscribes again and announces itself, so a caller that found it gone uses it again.
#[tokio::test(start_paused = true)]
async fn a_lost_call_subscription_is_healed_and_announced_at_the_next_heartbeat() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "heal.who", "healed").await;
    let caller = client(config(&broker)).await.with_retries(0);
    let who: String = caller.call("heal.who", ()).await.expect("first call");
    assert_eq!(who, "healed");
    settle().await;
    broker.drop_subscriptions(provider.id());
    assert!(matches!(
        caller.call::<_, String>("heal.who", ()).await,
        Err(Error::NoProvider { .. })
    ));
    let lost_at = Instant::now();
    eventually(
        "the caller reaches the provider again",
        HEARTBEAT * 2,
        || {
            let caller = caller.clone();
            async move { caller.call::<_, String>("heal.who", ()).await.is_ok() }
        },
    )
    .await;
    assert!(
        lost_at.elapsed() <= HEARTBEAT + ms(10),
        "healed after {:?}",
        lost_at.elapsed()
    );
    assert_eq!(calls.get(), 2);
    provider.shutdown().await.expect("shutdown");
}
