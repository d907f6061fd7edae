//! Where handlers run: on the receive loop until they wait, or in a task each
//! (`Config::spawn_handlers`).

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use clouds::{Client, Server};
use common::{config, redis};

/// Two calls that can only finish together: each handler waits for the other to arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_that_wait_run_side_by_side() {
    let redis = redis();
    let server = Server::start(config(&redis)).await.expect("server");
    let meeting = Arc::new(tokio::sync::Barrier::new(2));
    server
        .register("meet.async", move |(who,): (u32,)| {
            let meeting = meeting.clone();
            async move {
                meeting.wait().await;
                Ok::<_, Infallible>(who)
            }
        })
        .await
        .expect("register");
    let client = Client::connect(config(&redis).timeout(Duration::from_secs(5)))
        .await
        .expect("client");
    let (a, b) = tokio::join!(
        client.call::<_, u32>("meet.async", (1,)),
        client.call::<_, u32>("meet.async", (2,)),
    );
    assert_eq!((a.expect("first"), b.expect("second")), (1, 2));
    server.shutdown().await.expect("shutdown");
}

/// Handlers that block their thread until the other one arrives: they can only meet if each
/// runs on its own worker thread, which `spawn_handlers(true)` gives them. (On the receive
/// loop, the first would hold up the delivery of the second until its wait gave up.)
///
/// The server has a runtime of its own, as a service with blocking handlers should: tokio
/// does not steal a task from the LIFO slot of a worker that a blocking handler holds, so on
/// a runtime shared with the clients, a client's task woken on that worker (the one that
/// publishes the second call, or reads its reply) could wait there until the first handler
/// gave up (this failed about once in 20 runs on a loaded 2-core machine).
#[test]
fn spawned_handlers_spread_over_worker_threads() {
    let redis = redis();
    let runtime = |workers| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let (servers, clients) = (runtime(4), runtime(2));
    let server = servers.block_on(async {
        let server = Server::start(config(&redis).spawn_handlers(true))
            .await
            .expect("server");
        let arrived = Arc::new((Mutex::new(0u32), Condvar::new()));
        server
            .register("meet.blocking", move |(): ()| {
                let arrived = arrived.clone();
                async move {
                    // Deliberately blocking: computing for a while, as far as the runtime can
                    // tell.
                    let (count, cond) = &*arrived;
                    let mut count = count.lock().expect("lock");
                    *count += 1;
                    cond.notify_all();
                    let (count, _) = cond
                        .wait_timeout_while(count, Duration::from_secs(5), |n| *n < 2)
                        .expect("wait");
                    Ok::<_, Infallible>(*count >= 2)
                }
            })
            .await
            .expect("register");
        server
    });
    // Two clients, so the two calls are published at once: from one client the second call
    // would wait for the first one's PUBLISH to be answered (batching, `docs/protocol.md`
    // §3.12).
    let (a, b) = clients.block_on(async {
        let cfg = config(&redis).timeout(Duration::from_secs(10));
        let client = Client::connect(cfg.clone()).await.expect("client");
        let other = Client::connect(cfg).await.expect("client");
        tokio::join!(
            client.call::<_, bool>("meet.blocking", ()),
            other.call::<_, bool>("meet.blocking", ()),
        )
    });
    assert!(
        a.expect("first") && b.expect("second"),
        "the two handlers did not run at the same time"
    );
    servers.block_on(server.shutdown()).expect("shutdown");
}
