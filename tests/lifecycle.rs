//! Nodes end cleanly however they end: shutdown, drop, cancelled shutdown, readers waiting.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use clouds::{Client, Error, Server};
use common::{RedisServer, config, eventually, redis};

/// How many subscribers `channel` has right now.
fn subscribers(redis: &RedisServer, channel: &str) -> i64 {
    let reply = redis
        .command(&["PUBSUB", "NUMSUB", channel])
        .expect("numsub");
    let text = reply.as_str_vec().expect("array");
    text.get(1).and_then(|n| n.parse().ok()).expect("count")
}

/// How many client connections Redis has (the testkit's own command connection included).
fn connections(redis: &RedisServer) -> usize {
    let reply = redis.command(&["CLIENT", "LIST"]).expect("client list");
    reply.as_text().expect("text").lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_waiting_message_reader() {
    let redis = redis();
    let server = Server::start(config(&redis)).await.expect("server");
    let mut messages = server.messages();
    // The reader says when it is waiting: its first poll of `next()` found no message.
    let (waiting_tx, waiting) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut next = std::pin::pin!(messages.next());
        let mut waiting_tx = Some(waiting_tx);
        std::future::poll_fn(|cx| {
            let poll = next.as_mut().poll(cx);
            if poll.is_pending()
                && let Some(tx) = waiting_tx.take()
            {
                let _ = tx.send(());
            }
            poll
        })
        .await
    });
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the reader starts waiting")
        .expect("the reader is alive");
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("shutdown does not hang on a waiting reader")
        .expect("shutdown");
    let next = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("reader ends");
    assert!(next.expect("task").is_none(), "no message, the queue ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_server_leaves_and_closes_its_connections() {
    let redis = redis();
    let baseline = connections(&redis);
    let server = Server::start(config(&redis)).await.expect("server");
    // A handler holding the server's own client must not keep the server alive.
    let own = server.client();
    server
        .register("life.echo", move |(n,): (u32,)| {
            let _keep = own.clone();
            async move { Ok::<_, Infallible>(n) }
        })
        .await
        .expect("register");
    let calls = format!("clouds:3:calls:{}", server.id());
    let client = Client::connect(config(&redis)).await.expect("client");
    assert_eq!(
        client
            .call::<_, u32>("life.echo", (1,))
            .await
            .expect("call"),
        1
    );
    // Server: commands + subscriber, and the heartbeat thread's own pair; client: 2.
    eventually(
        "server (4) and client (2) connected",
        Duration::from_secs(5),
        || async { connections(&redis) == baseline + 6 },
    )
    .await;

    drop(server);
    eventually(
        "the call channel is gone",
        Duration::from_secs(5),
        || async { subscribers(&redis, &calls) == 0 },
    )
    .await;
    // Deregistered and announced: the next call fails fast instead of timing out.
    let started = std::time::Instant::now();
    match client.call::<_, u32>("life.echo", (2,)).await {
        Err(Error::NoProvider { .. }) => {}
        other => panic!("expected no provider, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    eventually(
        "the server's connections are closed",
        Duration::from_secs(5),
        || async { connections(&redis) == baseline + 2 },
    )
    .await;
    drop(client);
    eventually(
        "the client's connections are closed",
        Duration::from_secs(5),
        || async { connections(&redis) == baseline },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_shutdown_can_be_run_again() {
    let redis = redis();
    let server = Server::start(config(&redis)).await.expect("server");
    let calls = format!("clouds:3:calls:{}", server.id());
    let inbox = format!("clouds:3:inbox:{}", server.id());
    let _ = tokio::time::timeout(Duration::from_millis(2), server.shutdown()).await;
    server.shutdown().await.expect("second shutdown");
    assert_eq!(subscribers(&redis, &calls), 0);
    assert_eq!(subscribers(&redis, &inbox), 0);
    assert!(matches!(
        server.client().call::<_, ()>("x.y", ()).await,
        Err(Error::Shutdown)
    ));
    server.shutdown().await.expect("a third call does nothing");
}

/// The same, with the first shutdown dropped at many points of its way: at each, a second
/// shutdown must still deregister, unsubscribe and close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_cancelled_anywhere_can_be_run_again() {
    let redis = redis();
    // The registry lives in db 3; a script can SELECT it.
    let entries = |key: &str| {
        redis
            .command(&[
                "EVAL",
                "redis.call('SELECT', '3') return redis.call('EXISTS', KEYS[1])",
                "1",
                key,
            ])
            .expect("eval")
            .as_int()
    };
    // Where to cut: after some 1 ms sleeps (a whole shutdown takes a few), then some
    // `yield_now`s for the points in between.
    for sleeps in 0..8 {
        for yields in [0, 1, 2, 4, 8, 16, 32, 64] {
            let cut = format!("cut after {sleeps} ms and {yields} yields");
            let server = Server::start(config(&redis)).await.expect("server");
            let calls = format!("clouds:3:calls:{}", server.id());
            let inbox = format!("clouds:3:inbox:{}", server.id());
            let node_key = format!("{{clouds:3}}:node:{}", server.id());
            assert_eq!(entries(&node_key), Some(1), "registered");
            {
                let mut first = std::pin::pin!(server.shutdown());
                let mut poll = async || {
                    std::future::poll_fn(|cx| {
                        std::task::Poll::Ready(first.as_mut().poll(cx).is_ready())
                    })
                    .await
                };
                let mut done = poll().await;
                for _ in 0..sleeps {
                    if done {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    done = poll().await;
                }
                for _ in 0..yields {
                    if done {
                        break;
                    }
                    tokio::task::yield_now().await;
                    done = poll().await;
                }
            }
            server
                .shutdown()
                .await
                .unwrap_or_else(|e| panic!("{cut}: second shutdown: {e:?}"));
            assert_eq!(subscribers(&redis, &calls), 0, "{cut}");
            assert_eq!(subscribers(&redis, &inbox), 0, "{cut}");
            assert_eq!(entries(&node_key), Some(0), "{cut}: entry left");
        }
    }
}
