//! Heartbeats keep a server registered even while its handlers block every worker thread.

mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use clouds::{Client, Monitor, Server};
use common::{config, redis};

#[test]
fn blocking_handlers_do_not_starve_the_heartbeat() {
    let redis = redis();
    // heartbeat 300 ms, TTL 900 ms; handlers block for 2.5 s, almost 3 TTLs.
    let cfg = config(&redis).timeout(Duration::from_secs(10));

    // The server gets its own two-worker runtime, which the handlers will block completely.
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = server_runtime.block_on(async {
        let server = Server::start(cfg.clone()).await.expect("server");
        server
            .register("busy.block", |(ms,): (u64,)| async move {
                // Deliberately blocking: the worst a handler can do to its runtime.
                std::thread::sleep(Duration::from_millis(ms));
                Ok::<_, Infallible>(ms)
            })
            .await
            .expect("register");
        server
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = Client::connect(cfg.clone()).await.expect("client");
        let monitor = Monitor::connect(cfg).await.expect("monitor");
        let calls: Vec<_> = (0..2)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.call::<_, u64>("busy.block", (2_500u64,)).await })
            })
            .collect();
        // Watch the registry for the whole time the workers are blocked.
        let until = Instant::now() + Duration::from_millis(2_400);
        let mut checks = 0;
        while Instant::now() < until {
            let status = monitor.snapshot().await.expect("status");
            assert!(
                status.servers.contains_key(server.id()),
                "the blocked server dropped out of the registry after {checks} checks"
            );
            checks += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(checks > 10);
        eprintln!("FIGURES busy_handlers: registry_checks_while_blocked={checks} all_present=true");
        for call in calls {
            assert_eq!(call.await.expect("task").expect("call"), 2_500);
        }
    });
    server_runtime
        .block_on(server.shutdown())
        .expect("shutdown");
}
