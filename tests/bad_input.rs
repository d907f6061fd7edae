//! Garbage from the wire and in the registry: counted, logged, never fatal; correct traffic
//! continues.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use clouds::{Client, Error, Server};
use common::{RedisServer, config, eventually, redis, status};

/// Runs a Lua snippet in db 3 (the testkit's raw connection sits in db 0).
fn in_db3(redis: &RedisServer, lua: &str, args: &[&str]) {
    let script = format!("redis.call('SELECT', '3') {lua}");
    let mut command = vec!["EVAL", script.as_str(), "0"];
    command.extend_from_slice(args);
    let reply = redis.command(&command).expect("eval");
    assert!(!reply.is_error(), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_on_every_channel() {
    let redis = redis();
    let cfg = config(&redis).max_frame_size(64 * 1024);
    let server = Server::start(cfg.clone()).await.expect("server");
    server
        .register("bad.add", |(a, b): (i64, i64)| async move {
            Ok::<_, Infallible>(a + b)
        })
        .await
        .expect("register");
    let client = Client::connect(cfg).await.expect("client");
    assert_eq!(
        client
            .call::<_, i64>("bad.add", (1, 2))
            .await
            .expect("call"),
        3
    );

    let calls = format!("clouds:3:calls:{}", server.id());
    let inbox = format!("clouds:3:inbox:{}", client.id());
    let events = "clouds:3:events".to_string();
    let huge = vec![1u8; 200 * 1024]; // version byte 1, then junk: over both nodes' limit
    let frames: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("text", b"hello".to_vec()),
        ("future version", vec![3, 0x92, 4, 0xa1, b'x']),
        ("truncated call", vec![1, 0x96, 0, 1]),
        ("unknown kind", vec![1, 0x92, 9, 0]),
        ("array length lie", vec![1, 0xdd, 0xff, 0xff, 0xff, 0xff]),
        (
            "string length lie",
            vec![1, 0x96, 0, 1, 0xdb, 0xff, 0xff, 0xff, 0xff],
        ),
        ("huge", huge),
    ];
    for channel in [&calls, &inbox, &events] {
        for (what, bytes) in &frames {
            let reply = redis
                .command_bytes(&[b"PUBLISH", channel.as_bytes(), bytes])
                .expect("publish");
            assert!(
                reply.as_int() >= Some(1),
                "{what}: someone listens on {channel}"
            );
        }
    }
    // The server hears calls + events, the client inbox + events: 16 frames each.
    eventually(
        "every hostile frame counted",
        Duration::from_secs(5),
        || async {
            let (s, c) = (server.stats(), client.stats());
            s.malformed_frames + s.oversized_frames == 16
                && c.malformed_frames + c.oversized_frames == 16
        },
    )
    .await;
    // Well-formed frames in the wrong place are counted too: a reply on the events channel.
    let reply_on_events = [1u8, 0x94, 1, 7, 0, 0xc0];
    redis
        .command_bytes(&[b"PUBLISH", events.as_bytes(), &reply_on_events])
        .expect("publish");
    eventually(
        "misrouted frame counted",
        Duration::from_secs(5),
        || async { server.stats().misrouted_frames == 1 && client.stats().misrouted_frames == 1 },
    )
    .await;
    // Wrong argument types and counts get typed errors.
    match client.call::<_, i64>("bad.add", ("one", "two")).await {
        Err(Error::BadArguments { reason, .. }) => assert!(!reason.is_empty()),
        other => panic!("expected bad arguments, got {other:?}"),
    }
    match client.call::<_, i64>("bad.add", (1,)).await {
        Err(Error::BadArguments { .. }) => {}
        other => panic!("expected bad arguments, got {other:?}"),
    }
    // And correct traffic was never disturbed.
    assert_eq!(
        client
            .call::<_, i64>("bad.add", (40, 2))
            .await
            .expect("call"),
        42
    );
    eprintln!("FIGURES hostile_frames: server={:?}", server.stats());
    eprintln!("FIGURES hostile_frames: client={:?}", client.stats());
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_registry_is_skipped() {
    let redis = redis();
    let server = Server::start(config(&redis)).await.expect("server");
    server
        .register("reg.ok", |(): ()| async { Ok::<_, Infallible>(1) })
        .await
        .expect("register");
    // A "server" whose hash is garbage, and one listed with no hash at all.
    in_db3(
        &redis,
        "redis.call('ZADD', '{clouds:3}:nodes', '99999999999999', 'ghost') \
         redis.call('ZADD', '{clouds:3}:nodes', '99999999999999', 'nohash') \
         redis.call('HSET', '{clouds:3}:node:ghost', 'pid', 'not a number', 'host', ARGV[1]) \
         redis.call('ZADD', '{clouds:3}:method:reg.ok', '99999999999999', 'ghost')",
        &["\u{0}\u{ff}binary"],
    );
    let status = status(config(&redis)).await;
    assert_eq!(status.servers.len(), 1, "{status:?}");
    assert!(status.servers.contains_key(server.id()));
    // The caller may try the ghost (its inbox is empty: re-routed for free) but always lands.
    let client = Client::connect(config(&redis)).await.expect("client");
    for _ in 0..10 {
        assert_eq!(client.call::<_, i32>("reg.ok", ()).await.expect("call"), 1);
    }
    server.shutdown().await.expect("shutdown");
}
