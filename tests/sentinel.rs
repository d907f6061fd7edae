//! Redis Sentinel: clouds finds the primary through the sentinels, and when the primary is
//! killed under load, every call ends (Ok or a typed error within its attempts, none hangs),
//! the servers register again on the promoted replica (the registry may not have replicated)
//! and calls succeed again. The figures it prints (`FIGURES sentinel ...`) are in
//! RELIABILITY.md, section "Redis Sentinel".
//!
//! The deployment (a primary, its replica and three sentinels, `clouds_testkit::RedisSentinel`)
//! is stopped, every process by PID, when the test ends, also on panic.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clouds::{Config, Server};
use clouds_testkit::RedisSentinel;
use common::eventually;

/// Per-attempt timeout of every call, and command timeout of every node.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Retries per call: 3 attempts in all.
const RETRIES: u32 = 2;
/// A call not ended within this is hung: its attempts, their backoffs and slack.
const HUNG: Duration = Duration::from_millis(3 * 1000 + 1650);

fn config(deployment: &RedisSentinel) -> Config {
    Config::from_url(&deployment.url_with_db(3))
        .expect("a redis-sentinel:// URL")
        .namespace("sentinel")
        .heartbeat(Duration::from_millis(300))
        .timeout(TIMEOUT)
        .command_timeout(TIMEOUT)
}

/// One call's end, when it ended and how long it took.
#[derive(Debug, Clone)]
struct Record {
    ended: Instant,
    took: Duration,
    outcome: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_the_primary_killed_under_load() {
    let mut deployment = tokio::task::spawn_blocking(RedisSentinel::start)
        .await
        .expect("join")
        .expect("start a Sentinel deployment (redis-server 7.0+)");
    let config = config(&deployment);
    let mut servers = Vec::new();
    for name in ["a", "b"] {
        let server = Server::start(config.clone()).await.expect("server");
        server
            .register("probe.whoami", move |(): ()| async move {
                Ok::<_, std::convert::Infallible>(name.to_string())
            })
            .await
            .expect("register");
        servers.push(server);
    }
    let client = clouds::Client::connect(config.clone())
        .await
        .expect("client")
        .with_retries(RETRIES);
    let who: String = client.call("probe.whoami", ()).await.expect("a first call");
    assert!(who == "a" || who == "b");

    // Four loops of calls through the fault, every call counted.
    let stop = Arc::new(AtomicBool::new(false));
    let records = Arc::new(Mutex::new(Vec::<Record>::new()));
    let mut loops = Vec::new();
    for _ in 0..4 {
        let (client, stop, records) = (client.clone(), stop.clone(), records.clone());
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let call = client.call::<_, String>("probe.whoami", ());
                let outcome = match tokio::time::timeout(HUNG, call).await {
                    Ok(Ok(_)) => "ok".to_string(),
                    Ok(Err(e)) => error_kind(&e),
                    Err(_) => "hung".to_string(),
                };
                let record = Record {
                    ended: Instant::now(),
                    took: started.elapsed(),
                    outcome,
                };
                records.lock().expect("records").push(record);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let fault = Instant::now();
    let old = deployment.kill_primary().expect("kill -9 the primary");
    let new = tokio::task::spawn_blocking(move || {
        let new = deployment.wait_failover(old, Duration::from_secs(30));
        (deployment, new)
    })
    .await
    .expect("join");
    let (deployment, new) = (new.0, new.1.expect("the sentinels promote the replica"));
    let promoted = fault.elapsed();

    // Both servers register again on the promoted replica.
    eventually(
        "both servers are listed on the new primary",
        Duration::from_secs(15),
        || {
            let config = config.clone();
            async move {
                let snapshot = common::status(config).await;
                snapshot.servers.len() == 2
            }
        },
    )
    .await;
    let listed = fault.elapsed();
    // And calls go through again, steadily.
    let back = loop {
        let ok_since_promotion = {
            let records = records.lock().expect("records");
            records
                .iter()
                .filter(|r| r.ended >= fault + promoted && r.outcome == "ok")
                .count()
        };
        if ok_since_promotion >= 20 {
            break fault.elapsed();
        }
        assert!(
            fault.elapsed() < Duration::from_secs(40),
            "calls did not come back after the failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("loop");
    }

    let records = records.lock().expect("records").clone();
    let mut counts = BTreeMap::<String, usize>::new();
    for r in &records {
        *counts.entry(r.outcome.clone()).or_default() += 1;
    }
    let slowest = records.iter().map(|r| r.took).max().unwrap_or_default();
    let first_ok_after = records
        .iter()
        .filter(|r| r.ended > fault && r.outcome == "ok")
        .map(|r| r.ended - fault)
        .min();
    eprintln!(
        "FIGURES sentinel: calls {counts:?}, slowest {slowest:?}; primary :{old} killed, \
         :{new} promoted after {promoted:?}, both servers listed after {listed:?}, \
         first success after the kill {first_ok_after:?}, 20 successes after the promotion at {back:?}"
    );
    assert_eq!(counts.get("hung"), None, "no call hangs: {counts:?}");
    assert!(
        counts.get("ok").copied().unwrap_or(0) > 20,
        "calls succeed: {counts:?}"
    );
    for outcome in counts.keys() {
        assert!(
            matches!(outcome.as_str(), "ok" | "Timeout" | "NoProvider" | "Redis"),
            "only typed errors a failover explains: {counts:?}"
        );
    }
    assert_eq!(
        deployment.role_of(new).expect("role"),
        "master",
        "the replica is the primary now"
    );
    for server in servers {
        server.shutdown().await.expect("shutdown");
    }
    client.close().await;
}

/// The name of an error's kind, for counting.
fn error_kind(e: &clouds::Error) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("?")
        .to_string()
}

#[test]
fn a_sentinel_url_without_a_service_name_is_refused() {
    let e = Config::from_url("redis-sentinel://127.0.0.1:26379").expect_err("no service name");
    assert!(e.to_string().contains("sentinelServiceName"), "{e}");
}

#[test]
fn sentinel_passwords_never_reach_debug_output() {
    let config = Config::from_url(
        "redis-sentinel://app:data-secret@127.0.0.1:26379/3?sentinelServiceName=clouds\
         &sentinelUsername=watch&sentinelPassword=sentinel-secret&node=127.0.0.1:26380",
    )
    .expect("url");
    let debug = format!("{config:?}");
    assert!(!debug.contains("data-secret"), "{debug}");
    assert!(!debug.contains("sentinel-secret"), "{debug}");
}
