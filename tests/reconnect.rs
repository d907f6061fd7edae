//! Redis going away and coming back: nodes reconnect, resubscribe and re-register by themselves.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use clouds::{Client, Error, Monitor, Server};
use common::{config, eventually, redis};

/// A server providing `r.echo`.
async fn echo_server(cfg: &clouds::Config) -> Server {
    let server = Server::start(cfg.clone()).await.expect("server");
    server
        .register(
            "r.echo",
            |(n,): (u32,)| async move { Ok::<_, Infallible>(n) },
        )
        .await
        .expect("register");
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_and_calls_come_back_after_a_redis_restart() {
    let mut redis = redis();
    let cfg = config(&redis).timeout(Duration::from_millis(500));
    let server = echo_server(&cfg).await;
    let client = Client::connect(cfg.clone()).await.expect("client");
    let monitor = Monitor::connect(cfg.clone()).await.expect("monitor");
    assert_eq!(
        client.call::<_, u32>("r.echo", (1,)).await.expect("call"),
        1
    );

    // Redis restarts with no persistence: the registry is empty afterwards.
    redis.restart().expect("restart redis");

    // During and right after the outage calls fail with an error; none hangs.
    let started = std::time::Instant::now();
    let during = client.call::<_, u32>("r.echo", (2,)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded: {:?}",
        started.elapsed()
    );
    if let Err(e) = &during {
        assert!(e.is_retryable(), "a transient error: {e}");
    }

    // The heartbeat re-registers right after reconnecting; the subscriptions are back.
    eventually("the server is registered again", Duration::from_secs(5), || async {
        matches!(monitor.snapshot().await, Ok(s) if s.methods.get("r.echo").is_some_and(|v| v == &vec![server.id().clone()]))
    })
    .await;
    eventually("calls succeed again", Duration::from_secs(5), || async {
        client.call::<_, u32>("r.echo", (3,)).await.ok() == Some(3)
    })
    .await;
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscriber_connection_is_restored() {
    let redis = redis();
    let cfg = config(&redis);
    let server = echo_server(&cfg).await;
    let client = Client::connect(cfg).await.expect("client").with_retries(3);
    assert_eq!(
        client.call::<_, u32>("r.echo", (1,)).await.expect("call"),
        1
    );

    let killed_at = std::time::Instant::now();
    let killed = redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .expect("client kill");
    assert!(
        killed.as_int().unwrap_or(0) >= 2,
        "killed the subscribers: {killed:?}"
    );

    eventually(
        "calls work again after resubscribing",
        Duration::from_secs(5),
        || async { client.call::<_, u32>("r.echo", (2,)).await.ok() == Some(2) },
    )
    .await;
    eprintln!(
        "FIGURES subscriber_killed: killed={} calls_back_after_ms={}",
        killed.as_int().unwrap_or(0),
        killed_at.elapsed().as_millis()
    );
    eventually(
        "messages reach the server again",
        Duration::from_secs(5),
        || async { client.send(server.id(), &"hi").await.is_ok() },
    )
    .await;
    assert_eq!(
        server
            .messages()
            .next()
            .await
            .expect("message")
            .decode::<String>()
            .expect("text"),
        "hi"
    );
    match client.call::<_, u32>("r.missing", (1,)).await {
        Err(Error::NoProvider { .. }) => {}
        other => panic!("expected no provider, got {other:?}"),
    }
    server.shutdown().await.expect("shutdown");
}
