//! The registry as the monitor reads it: who is listed, with which methods, in which
//! deployment.

use std::time::{SystemTime, UNIX_EPOCH};

use super::*;
use crate::testing::Broker;
use crate::{Error, Monitor, RegistrySnapshot};

async fn snapshot(monitor: &Monitor) -> RegistrySnapshot {
    monitor.snapshot().await.expect("snapshot")
}

#[tokio::test(start_paused = true)]
async fn a_started_server_is_listed_serving_nothing_with_its_details() {
    let broker = Broker::new();
    let before = SystemTime::now();
    let provider = server(config(&broker)).await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let snapshot = snapshot(&monitor).await;
    assert!(snapshot.methods.is_empty());
    assert_eq!(snapshot.servers.len(), 1);
    let info = &snapshot.servers[provider.id()];
    assert_eq!(&info.id, provider.id());
    assert!(info.methods.is_empty());
    assert_eq!(info.pid, std::process::id());
    assert_eq!(info.in_flight, 0);
    assert!(!info.host.is_empty());
    // Its own (real) clock, to the millisecond.
    let floor = UNIX_EPOCH
        + Duration::from_millis(
            before
                .duration_since(UNIX_EPOCH)
                .expect("after 1970")
                .as_millis() as u64,
        );
    assert!(info.started_at >= floor && info.started_at <= SystemTime::now());
    // Monitors and clients are not servers: not listed.
    let _caller = client(config(&broker)).await;
    assert_eq!(self::snapshot(&monitor).await.servers.len(), 1);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn the_snapshot_follows_each_registration_at_once_and_heartbeats_keep_it() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let id = provider.id().clone();
    answer_name(&provider, "reg.b", "p").await;
    let first = snapshot(&monitor).await;
    assert_eq!(first.methods.keys().collect::<Vec<_>>(), ["reg.b"]);
    assert_eq!(first.servers[&id].methods, ["reg.b"]);
    answer_name(&provider, "reg.a", "p").await;
    let second = snapshot(&monitor).await;
    assert_eq!(
        second.methods.keys().collect::<Vec<_>>(),
        ["reg.a", "reg.b"]
    );
    assert_eq!(second.methods["reg.a"], std::slice::from_ref(&id));
    assert_eq!(second.servers[&id].methods, ["reg.a", "reg.b"], "sorted");
    // Heartbeats rewrite the entry with every method, never an older list.
    tokio::time::sleep(HEARTBEAT * 3).await;
    let third = snapshot(&monitor).await;
    assert_eq!(third.methods, second.methods);
    assert_eq!(third.servers[&id].methods, second.servers[&id].methods);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn providers_of_a_method_are_listed_sorted_and_each_server_with_its_own() {
    let broker = Broker::new();
    let mut servers = Vec::new();
    for _ in 0..3 {
        let provider = server(config(&broker)).await;
        answer_name(&provider, "shared.m", "s").await;
        servers.push(provider);
    }
    answer_name(&servers[1], "only.one", "s").await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let snapshot = snapshot(&monitor).await;
    let mut ids: Vec<NodeId> = servers.iter().map(|s| s.id().clone()).collect();
    ids.sort();
    assert_eq!(snapshot.methods["shared.m"], ids);
    assert_eq!(snapshot.methods["only.one"], [servers[1].id().clone()]);
    assert_eq!(snapshot.servers.keys().cloned().collect::<Vec<_>>(), ids);
    assert_eq!(
        snapshot.servers[servers[1].id()].methods,
        ["only.one", "shared.m"]
    );
    assert_eq!(snapshot.servers[servers[0].id()].methods, ["shared.m"]);
    // One leaves: it is gone from the method's list at once, the others stay.
    let leaving = servers.remove(0);
    let left = leaving.id().clone();
    leaving.shutdown().await.expect("shutdown");
    let after = self::snapshot(&monitor).await;
    assert_eq!(after.methods["shared.m"].len(), 2);
    assert!(!after.methods["shared.m"].contains(&left));
    assert!(!after.servers.contains_key(&left));
    for provider in servers {
        provider.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(start_paused = true)]
async fn namespaces_and_dbs_keep_deployments_apart() {
    let broker = Broker::new();
    let alpha = config(&broker).namespace("alpha");
    let provider = server(alpha.clone()).await;
    answer_name(&provider, "ns.who", "alpha").await;
    for other in [
        config(&broker).namespace("beta"),
        config(&broker),
        alpha.clone().db(1),
    ] {
        let monitor = Monitor::connect(other.clone()).await.expect("monitor");
        assert_eq!(snapshot(&monitor).await, RegistrySnapshot::default());
        let caller = client(other).await.with_retries(0);
        assert!(matches!(
            caller.call::<_, String>("ns.who", ()).await,
            Err(Error::NoProvider { .. })
        ));
    }
    let monitor = Monitor::connect(alpha.clone()).await.expect("monitor");
    assert_eq!(snapshot(&monitor).await.servers.len(), 1);
    let caller = client(alpha).await;
    assert_eq!(
        caller.call::<_, String>("ns.who", ()).await.expect("call"),
        "alpha"
    );
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_entry_is_skipped_and_the_rest_still_listed() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    // An entry without the fields a server writes (another version, or a hand-made one).
    let broken = NodeId::from("server-broken-1-1-000000");
    raw.register_with_fields(
        &broken,
        &["broken.m"],
        TTL,
        vec![("id", broken.to_string())],
    )
    .await;
    // And one with every field.
    let fine = NodeId::from("server-fine-1-1-000000");
    raw.register_as(&fine, &["fine.m"], TTL).await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let snapshot = snapshot(&monitor).await;
    assert!(!snapshot.servers.contains_key(&broken));
    assert!(!snapshot.methods.contains_key("broken.m"));
    assert!(snapshot.servers.contains_key(provider.id()));
    assert_eq!(snapshot.servers[&fine].host, "raw-host");
    assert_eq!(snapshot.methods["fine.m"], [fine]);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn an_entry_no_one_renews_is_purged_after_its_ttl() {
    let broker = Broker::new();
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    let id = NodeId::from("server-once-1-1-000000");
    raw.register_as(&id, &["once.m"], ms(100)).await;
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    tokio::time::sleep(ms(99)).await;
    assert_eq!(snapshot(&monitor).await.methods["once.m"], [id]);
    tokio::time::sleep(ms(1)).await;
    assert_eq!(snapshot(&monitor).await, RegistrySnapshot::default());
}

#[tokio::test(start_paused = true)]
async fn a_closed_monitor_refuses_snapshots() {
    let broker = Broker::new();
    let monitor = Monitor::connect(config(&broker)).await.expect("monitor");
    let clone = monitor.clone();
    assert!(monitor.snapshot().await.is_ok());
    monitor.close().await;
    assert!(matches!(clone.snapshot().await, Err(Error::Shutdown)));
    assert_eq!(
        broker.subscribers("clouds:0:events"),
        0,
        "its connection is closed"
    );
}
