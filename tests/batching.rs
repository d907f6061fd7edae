//! Natural batching against a real Redis: calls made together go out in far fewer `PUBLISH`es
//! than calls (and their replies too), mixed with claims and signed frames; with batching off
//! every frame is a `PUBLISH` of its own; a malformed batch is counted and dropped.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use clouds::{Client, Server};
use common::{RedisServer, claim_keys, config, redis};

const KEY: [u8; 32] = *b"batch key, thirty-two bytes long";

/// How many times Redis ran `PUBLISH` (from `INFO commandstats`).
fn publishes(redis: &RedisServer) -> u64 {
    let info = redis
        .command(&["INFO", "commandstats"])
        .expect("INFO")
        .as_text()
        .expect("text");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_publish:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn echo_server(cfg: clouds::Config) -> Server {
    let server = Server::start(cfg).await.expect("server");
    server
        .register(
            "b.echo",
            |(s,): (String,)| async move { Ok::<_, Infallible>(s) },
        )
        .await
        .expect("register");
    server
}

/// Makes `n` calls at once (every `large`-th with a body over the claim threshold) and checks
/// each reply; the PUBLISHes Redis ran meanwhile.
async fn calls_at_once(redis: &RedisServer, client: &Client, n: usize, large: usize) -> u64 {
    // Warm: the provider is known, so the burst below makes no registry reads.
    let _: String = client.call("b.echo", ("warm",)).await.expect("warm call");
    let before = publishes(redis);
    let bodies: Vec<String> = (0..n)
        .map(|i| {
            if large > 0 && i % large == 0 {
                format!("{i}:{}", "L".repeat(8 * 1024))
            } else {
                format!("{i}")
            }
        })
        .collect();
    let calls = bodies
        .iter()
        .map(|body| client.call::<_, String>("b.echo", (body.as_str(),)));
    let replies = futures_util::future::join_all(calls).await;
    for (body, reply) in bodies.iter().zip(replies) {
        assert_eq!(&reply.expect("call"), body);
    }
    publishes(redis) - before
}

/// 300 calls started together, signed, 1 in 10 of them with a body that travels as a claim:
/// every call gets its own reply, in far fewer PUBLISHes than the 600 frames (300 calls, 300
/// replies) that went, and no claim is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_made_together_share_publishes_with_claims_and_signatures() {
    let redis = redis();
    let cfg = config(&redis)
        .timeout(Duration::from_secs(30))
        .signing_key(1, KEY)
        .claim_threshold(4 * 1024);
    let server = echo_server(cfg.clone()).await;
    let client = Client::connect(cfg).await.expect("client");
    let n = 300;
    let published = calls_at_once(&redis, &client, n, 10).await;
    eprintln!("FIGURES batching: {n} calls (30 claimed, signed) in {published} PUBLISHes");
    assert!(
        published <= n as u64 / 2,
        "{published} PUBLISHes for {n} calls and their replies"
    );
    let stats = client.stats();
    assert_eq!(
        (stats.malformed_frames, stats.unauthenticated_frames),
        (0, 0)
    );
    let s = server.stats();
    assert_eq!((s.malformed_frames, s.unauthenticated_frames), (0, 0));
    common::eventually("claims taken", Duration::from_secs(10), || {
        let left = claim_keys(&redis, 3);
        async move { left.is_empty() }
    })
    .await;
    client.close().await;
    server.shutdown().await.expect("shutdown");
}

/// With batching off, each call and each reply is a PUBLISH of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_batching_off_every_frame_is_a_publish() {
    let redis = redis();
    let cfg = config(&redis)
        .timeout(Duration::from_secs(30))
        .batching(false);
    let server = echo_server(cfg.clone()).await;
    let client = Client::connect(cfg).await.expect("client");
    let n = 100;
    let published = calls_at_once(&redis, &client, n, 0).await;
    assert_eq!(published, 2 * n as u64);
    client.close().await;
    server.shutdown().await.expect("shutdown");
}

/// A node with batching off still understands the batches of one with it on (and the other
/// way round).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_and_without_batching_understand_each_other() {
    let redis = redis();
    let cfg = config(&redis).timeout(Duration::from_secs(30));
    let server = echo_server(cfg.clone().batching(false)).await;
    let client = Client::connect(cfg.clone()).await.expect("client");
    let published = calls_at_once(&redis, &client, 200, 0).await;
    assert!(published < 200 + 200, "the calls were batched: {published}");
    client.close().await;
    server.shutdown().await.expect("shutdown");

    let server = echo_server(cfg.clone()).await;
    let client = Client::connect(cfg.batching(false)).await.expect("client");
    let published = calls_at_once(&redis, &client, 200, 0).await;
    assert!(
        published < 200 + 200,
        "the replies were batched: {published}"
    );
    client.close().await;
    server.shutdown().await.expect("shutdown");
}

/// Malformed batches sent with a raw PUBLISH to a server's call channel are counted as
/// malformed and dropped; the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_batches_are_counted_and_dropped() {
    let redis = redis();
    let cfg = config(&redis);
    let server = echo_server(cfg.clone()).await;
    let channel = format!("clouds:3:calls:{}", server.id());
    // [version 1, [8]]: no entries; [8, bin 5 "abc"]: truncated; [8, 7]: not a bin;
    // [8, bin [8]]: a batch inside a batch; [8, bin ""] + trailing byte.
    let bad: Vec<Vec<u8>> = vec![
        vec![1, 0x91, 8],
        vec![1, 0x92, 8, 0xc4, 5, b'a', b'b', b'c'],
        vec![1, 0x92, 8, 7],
        vec![1, 0x92, 8, 0xc4, 3, 1, 0x91, 8],
        vec![1, 0x92, 8, 0xc4, 0, 0],
    ];
    for frame in &bad {
        let args: Vec<&[u8]> = vec![b"PUBLISH", channel.as_bytes(), frame];
        let receivers = redis.command_bytes(&args).expect("PUBLISH");
        assert_eq!(receivers.as_int(), Some(1), "{receivers:?}");
    }
    let sent = bad.len() as u64;
    common::eventually("all counted", Duration::from_secs(10), || {
        let seen = server.stats().malformed_frames;
        async move { seen == sent }
    })
    .await;
    let client = Client::connect(cfg).await.expect("client");
    let echoed: String = client.call("b.echo", ("still here",)).await.expect("call");
    assert_eq!(echoed, "still here");
    client.close().await;
    server.shutdown().await.expect("shutdown");
}
