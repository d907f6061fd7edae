//! Large payloads travel as claims on a real Redis with its default configuration: many
//! clients' large calls never knock the provider's subscriber off Redis, 64 MiB arguments and
//! results work, a body over the limit fails at the sender, and nothing is left behind.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use clouds::{Client, Error, Server};
use common::{RedisServer, claim_keys, config, redis};

/// Registers `big.len` (the length of its argument) and `big.make` (a string of `n` bytes).
async fn big_server(cfg: clouds::Config) -> Server {
    let server = Server::start(cfg).await.expect("server");
    server
        .register("big.len", |(data,): (String,)| async move {
            Ok::<_, Infallible>(data.len())
        })
        .await
        .expect("register");
    server
        .register("big.make", |(n,): (usize,)| async move {
            Ok::<_, Infallible>("r".repeat(n))
        })
        .await
        .expect("register");
    server
}

/// `CLIENT LIST`'s line for each connection subscribed to `subscriptions` channels, as
/// `(id, line)`.
fn subscribers(redis: &RedisServer, subscriptions: usize) -> Vec<(String, String)> {
    let list = redis
        .command(&["CLIENT", "LIST"])
        .expect("CLIENT LIST")
        .as_text()
        .expect("text");
    list.lines()
        .filter(|line| line.contains(&format!(" sub={subscriptions} ")))
        .map(|line| {
            let id = line
                .split(' ')
                .find_map(|field| field.strip_prefix("id="))
                .expect("an id")
                .to_string();
            (id, line.to_string())
        })
        .collect()
}

/// How many times Redis ran `command` (from `INFO commandstats`).
fn calls_of(redis: &RedisServer, command: &str) -> u64 {
    let info = redis
        .command(&["INFO", "commandstats"])
        .expect("INFO")
        .as_text()
        .expect("text");
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

const CLIENTS: usize = 8;
const CALLS_EACH: usize = 32;
const PAYLOAD: usize = 3 << 20;

/// 8 clients each send 32 calls of 3 MiB at once to one provider (768 MiB in all, far over
/// the 32 MB pub/sub output limit of a default Redis): every call succeeds, and Redis never
/// drops the provider's subscriber connection. (Before claims, about one call in ten failed
/// here; the bodies now wait in Redis keys and the subscriber only carries small frames.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_sending_large_calls_never_knock_the_provider_off_redis() {
    let redis = redis();
    let cfg = config(&redis).timeout(Duration::from_secs(60));
    let server = big_server(cfg.clone()).await;
    // The provider's subscriber is the one connection with 3 channels (inbox, events, calls).
    let before = subscribers(&redis, 3);
    assert_eq!(before.len(), 1, "{before:?}");

    let data = Arc::new("x".repeat(PAYLOAD));
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Client::connect(cfg.clone()).await.expect("client"));
    }
    let mut calls = Vec::new();
    for client in &clients {
        for _ in 0..CALLS_EACH {
            let client = client.clone();
            let data = data.clone();
            calls.push(tokio::spawn(async move {
                client.call::<_, usize>("big.len", (data.as_str(),)).await
            }));
        }
    }
    let mut failed: Vec<Error> = Vec::new();
    for call in calls {
        match call.await.expect("task") {
            Ok(len) => assert_eq!(len, PAYLOAD),
            Err(e) => failed.push(e),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} calls failed, first: {:?}",
        failed.len(),
        CLIENTS * CALLS_EACH,
        failed.first()
    );
    eprintln!(
        "FIGURES claims: {} calls of {} MiB from {CLIENTS} clients to one provider in {:?}, 0 failed",
        CLIENTS * CALLS_EACH,
        PAYLOAD >> 20,
        started.elapsed()
    );
    let after = subscribers(&redis, 3);
    assert_eq!(
        after.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        before.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        "the provider's subscriber was replaced: before {before:?}, after {after:?}"
    );
    let log = redis.log();
    assert!(
        !log.contains("overcoming of output buffer limits"),
        "Redis closed a client over its output buffer:\n{log}"
    );
    assert_eq!(
        calls_of(&redis, "getdel"),
        (CLIENTS * CALLS_EACH) as u64,
        "every body went through a claim"
    );
    assert_eq!(claim_keys(&redis, 3), Vec::<String>::new());
    for client in clients {
        client.close().await;
    }
    server.shutdown().await.expect("shutdown");
}

/// A 64 MiB argument and a 64 MiB result: neither fits a frame (4 MiB), both travel as
/// claims, and both claims are taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_argument_and_a_64_mib_result_work() {
    let redis = redis();
    let cfg = config(&redis).timeout(Duration::from_secs(60));
    let server = big_server(cfg.clone()).await;
    let client = Client::connect(cfg).await.expect("client");
    let big = "a".repeat(64 << 20);
    assert_eq!(
        client
            .call::<_, usize>("big.len", (big.as_str(),))
            .await
            .expect("a 64 MiB argument"),
        64 << 20
    );
    drop(big);
    let result: String = client
        .call("big.make", (64usize << 20,))
        .await
        .expect("a 64 MiB result");
    assert_eq!(result.len(), 64 << 20);
    assert!(result.bytes().all(|b| b == b'r'));
    // One claim for the argument, one for the result (the reply too large to go inline).
    assert_eq!(calls_of(&redis, "set"), 2);
    assert_eq!(calls_of(&redis, "getdel"), 2);
    assert_eq!(claim_keys(&redis, 3), Vec::<String>::new());
    client.close().await;
    server.shutdown().await.expect("shutdown");
}

/// A reply too large for a frame is sent through a claim; small replies and calls still go
/// inline, with no key written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_too_large_to_go_inline_arrives_through_a_claim() {
    let redis = redis();
    let cfg = config(&redis).timeout(Duration::from_secs(10));
    let server = big_server(cfg.clone()).await;
    let client = Client::connect(cfg).await.expect("client");
    let small: String = client.call("big.make", (100usize,)).await.expect("small");
    assert_eq!(small.len(), 100);
    assert_eq!(calls_of(&redis, "set"), 0, "small frames go inline");
    let large: String = client
        .call("big.make", (6usize << 20,))
        .await
        .expect("a reply over max_frame_size");
    assert_eq!(large.len(), 6 << 20);
    assert_eq!(
        (calls_of(&redis, "set"), calls_of(&redis, "getdel")),
        (1, 1),
        "the reply's body went through one claim"
    );
    assert_eq!(claim_keys(&redis, 3), Vec::<String>::new());
    client.close().await;
    server.shutdown().await.expect("shutdown");
}

/// An argument over `max_body_size` fails at the sender with `TooLarge`, before anything is
/// written to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_argument_over_the_body_limit_fails_fast_with_too_large() {
    let redis = redis();
    let cfg = config(&redis).max_body_size(8 << 20);
    let server = big_server(cfg.clone()).await;
    let client = Client::connect(cfg).await.expect("client");
    // Looked up once, so that a refused call has nothing left to ask Redis.
    assert_eq!(
        client
            .call::<_, usize>("big.len", ("s",))
            .await
            .expect("ok"),
        1
    );
    let (sets, publishes) = (calls_of(&redis, "set"), calls_of(&redis, "publish"));
    let started = std::time::Instant::now();
    match client
        .call::<_, usize>("big.len", ("o".repeat(9 << 20),))
        .await
    {
        Err(Error::TooLarge { size, max, .. }) => {
            assert!(size > 9 << 20);
            assert_eq!(max, 8 << 20);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let took = started.elapsed();
    assert_eq!(
        (calls_of(&redis, "set"), calls_of(&redis, "publish")),
        (sets, publishes),
        "nothing was written (in {took:?})"
    );
    assert_eq!(claim_keys(&redis, 3), Vec::<String>::new());
    client.close().await;
    server.shutdown().await.expect("shutdown");
}
