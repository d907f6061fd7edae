//! Signed frames against a real Redis: frames forged with a raw `PUBLISH` (unsigned, signed
//! with a wrong key, signed for another channel, a captured call replayed) are refused and
//! counted, never dispatched, while signed traffic works; key rotation.
//!
//! The forged frames are built here from `docs/protocol.md` §3.1 alone (with the `hmac` and
//! `sha2` crates), so these tests also pin the documented layout of the signed envelope.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clouds::{Client, Error, Server};
use common::{RedisServer, config, eventually, redis};
use hmac::{Hmac, Mac};

const KEY_1: [u8; 32] = *b"first key, thirty-two bytes long";
const KEY_2: [u8; 32] = *b"other key, thirty-two bytes long";

/// A signed frame as `docs/protocol.md` §3.1 lays it out.
fn sign(key_id: u32, secret: &[u8], channel: &str, seq: u64, frame: &[u8]) -> Vec<u8> {
    let sent_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let mut out = vec![2u8];
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(&0x5eed_u64.to_be_bytes()); // sender
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&sent_ms.to_be_bytes());
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(&(channel.len() as u32).to_be_bytes());
    mac.update(channel.as_bytes());
    // Zero bytes up to a multiple of 64 (SHA-256's block).
    mac.update(&vec![0u8; (64 - (4 + channel.len()) % 64) % 64]);
    mac.update(&out);
    mac.update(frame);
    out.extend_from_slice(&mac.finalize().into_bytes());
    out.extend_from_slice(frame);
    out
}

/// A version-1 call frame: `[0, id, method, reply_to, deadline_ms, [a, b]]`.
fn call_frame(id: u8, method: &str, reply_to: &str, a: u8, b: u8) -> Vec<u8> {
    let mut out = vec![1u8, 0x96, 0, id & 0x7f];
    for s in [method, reply_to] {
        out.extend_from_slice(&[0xd9, s.len() as u8]);
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(&[0xcd, 0x07, 0xd0]); // 2000 ms
    out.extend_from_slice(&[0x92, a & 0x7f, b & 0x7f]);
    out
}

/// A connection subscribed to one channel, outside any node: sees frames as Redis delivers
/// them (RESP2 over a plain socket).
struct Sniffer(BufReader<TcpStream>);

impl Sniffer {
    fn subscribe(redis: &RedisServer, channel: &str) -> Sniffer {
        let mut stream = TcpStream::connect(("127.0.0.1", redis.port())).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let command = format!(
            "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{channel}\r\n",
            channel.len()
        );
        stream.write_all(command.as_bytes()).expect("subscribe");
        let mut sniffer = Sniffer(BufReader::new(stream));
        let confirm = sniffer.array();
        assert_eq!(confirm[0], b"subscribe");
        sniffer
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.0.read_line(&mut line).expect("a RESP line");
        line.trim_end().to_string()
    }

    /// One array of bulk strings and integers (integers as their text).
    fn array(&mut self) -> Vec<Vec<u8>> {
        let header = self.line();
        let n: usize = header[1..].parse().expect("array length");
        (0..n)
            .map(|_| {
                let head = self.line();
                match head.as_bytes()[0] {
                    b'$' => {
                        let len: usize = head[1..].parse().expect("bulk length");
                        let mut bytes = vec![0u8; len + 2];
                        self.0.read_exact(&mut bytes).expect("bulk");
                        bytes.truncate(len);
                        bytes
                    }
                    _ => head.as_bytes()[1..].to_vec(),
                }
            })
            .collect()
    }

    /// The payload of the next message.
    fn next(&mut self) -> Vec<u8> {
        let message = self.array();
        assert_eq!(message[0], b"message");
        message[2].clone()
    }
}

fn publish(redis: &RedisServer, channel: &str, frame: &[u8]) -> i64 {
    redis
        .command_bytes(&[b"PUBLISH", channel.as_bytes(), frame])
        .expect("publish")
        .as_int()
        .expect("a count")
}

/// Registers `sig.add` on `server`, counting the calls it runs.
async fn adder(server: &Server) -> Arc<AtomicUsize> {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    server
        .register("sig.add", move |(a, b): (i64, i64)| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, std::convert::Infallible>(a + b) }
        })
        .await
        .expect("register");
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_frames_are_refused_while_signed_traffic_works() {
    let redis = redis();
    let cfg = config(&redis).signing_key(1, KEY_1);
    let server = Server::start(cfg.clone()).await.expect("server");
    let runs = adder(&server).await;
    let client = Client::connect(cfg).await.expect("client");
    let calls = format!("clouds:3:calls:{}", server.id());
    let inbox = format!("clouds:3:inbox:{}", client.id());
    let events = "clouds:3:events";

    // Signed traffic works; capture the call as Redis delivered it.
    let mut sniffer = Sniffer::subscribe(&redis, &calls);
    let sum: i64 = client.call("sig.add", (40, 2)).await.expect("signed call");
    assert_eq!(sum, 42);
    let captured = tokio::task::spawn_blocking(move || sniffer.next())
        .await
        .expect("sniffer");
    assert_eq!(captured[0], 2, "the call went out signed");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let frame = call_frame(9, "sig.add", client.id().as_str(), 1, 2);
    let forged: Vec<(&str, Vec<u8>)> = vec![
        ("unsigned", frame.clone()),
        ("wrong key", sign(1, &KEY_2, &calls, 1, &frame)),
        ("unknown key id", sign(7, &KEY_1, &calls, 2, &frame)),
        (
            "signed for another channel",
            sign(1, &KEY_1, &inbox, 3, &frame),
        ),
        ("garbage after the version", vec![2, 0, 0, 0, 1, 9, 9]),
    ];
    for (what, bytes) in &forged {
        assert_eq!(publish(&redis, &calls, bytes), 1, "{what}");
    }
    // The captured, valid call, published again: a replay.
    assert_eq!(publish(&redis, &calls, &captured), 1);
    // An unsigned leave of the server on the events channel.
    let mut leave = vec![1u8, 0x92, 4, 0xd9, server.id().as_str().len() as u8];
    leave.extend_from_slice(server.id().as_str().as_bytes());
    assert!(publish(&redis, events, &leave) >= 2);

    let forged_count = forged.len() as u64 + 1; // + the leave
    eventually(
        "every forged frame counted",
        Duration::from_secs(5),
        || async {
            let s = server.stats();
            s.unauthenticated_frames == forged_count && s.replayed_frames == 1
        },
    )
    .await;
    eventually(
        "the leave counted at the client",
        Duration::from_secs(5),
        || async { client.stats().unauthenticated_frames == 1 },
    )
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "no forged or replayed call ran"
    );
    assert_eq!(
        server.stats().malformed_frames,
        0,
        "refused before decoding"
    );
    // The client did not drop the server for the forged leave.
    let sum: i64 = client.call("sig.add", (1, 1)).await.expect("signed call");
    assert_eq!(sum, 2);

    // The control: the same call signed right, for the right channel, runs. (So the frames
    // above were refused for what was wrong with them, not for how this test builds frames.)
    assert_eq!(
        publish(&redis, &calls, &sign(1, &KEY_1, &calls, 4, &frame)),
        1
    );
    eventually(
        "the well-signed call ran",
        Duration::from_secs(5),
        || async { runs.load(Ordering::SeqCst) == 3 },
    )
    .await;
    assert_eq!(server.stats().unauthenticated_frames, forged_count);
    eprintln!("FIGURES signing: server={:?}", server.stats());
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_works_both_ways_and_a_finished_node_refuses_the_old_key() {
    let redis = redis();
    // Mid-rotation: A sends with key 2 and still accepts 1; B still sends with key 1 and
    // already accepts 2.
    let a_cfg = config(&redis).signing_key(2, KEY_2).accept_key(1, KEY_1);
    let b_cfg = config(&redis).signing_key(1, KEY_1).accept_key(2, KEY_2);
    let a = Server::start(a_cfg.clone().namespace("rot-a"))
        .await
        .expect("a");
    let a_runs = adder(&a).await;
    let b = Server::start(b_cfg.clone().namespace("rot-a"))
        .await
        .expect("b");
    let a_client = Client::connect(a_cfg.namespace("rot-a"))
        .await
        .expect("a client");
    let b_client = Client::connect(b_cfg.clone().namespace("rot-a"))
        .await
        .expect("b client");
    // B → A (key 1 into a node that signs with 2) and A → B (key 2 into a node that signs
    // with 1): calls, replies and messages.
    let sum: i64 = b_client.call("sig.add", (2, 3)).await.expect("b→a");
    assert_eq!(sum, 5);
    a_client.send(b.id(), &"from a").await.expect("a→b");
    let message = b.messages().next().await.expect("a message");
    assert_eq!(message.decode::<String>().expect("decode"), "from a");
    assert_eq!(a_runs.load(Ordering::SeqCst), 1);

    // C has finished the rotation: key 2 only. B's key-1 frames are refused there.
    let c = Server::start(config(&redis).signing_key(2, KEY_2).namespace("rot-c"))
        .await
        .expect("c");
    let c_runs = adder(&c).await;
    let b_to_c = Client::connect(b_cfg.namespace("rot-c").retries(0))
        .await
        .expect("b client for c");
    match b_to_c.call::<_, i64>("sig.add", (1, 1)).await {
        Err(Error::Timeout { .. }) => {}
        other => panic!("a key-1 call ran at a key-2-only node: {other:?}"),
    }
    assert_eq!(c_runs.load(Ordering::SeqCst), 0);
    assert!(c.stats().unauthenticated_frames >= 1);
    // A node that signs with 2 reaches C.
    let a_to_c = Client::connect(config(&redis).signing_key(2, KEY_2).namespace("rot-c"))
        .await
        .expect("client for c");
    let sum: i64 = a_to_c.call("sig.add", (1, 1)).await.expect("key 2 → c");
    assert_eq!(sum, 2);
    for server in [a, b, c] {
        server.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_keys_refuses_signed_frames() {
    let redis = redis();
    let server = Server::start(config(&redis)).await.expect("server");
    let runs = adder(&server).await;
    let client = Client::connect(config(&redis)).await.expect("client");
    let calls = format!("clouds:3:calls:{}", server.id());
    let frame = call_frame(3, "sig.add", client.id().as_str(), 1, 2);
    assert_eq!(
        publish(&redis, &calls, &sign(1, &KEY_1, &calls, 1, &frame)),
        1
    );
    eventually(
        "the signed frame counted",
        Duration::from_secs(5),
        || async { server.stats().unauthenticated_frames == 1 },
    )
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Unsigned traffic goes on.
    let sum: i64 = client.call("sig.add", (1, 2)).await.expect("unsigned call");
    assert_eq!(sum, 3);
    server.shutdown().await.expect("shutdown");
}

/// A claimed call is signed like any other frame, and its reference carries the body's
/// SHA-256: a body replaced in Redis (by anyone who can write the namespace's keys) fails the
/// call with `ClaimLost`, and the handler never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_covers_a_claimed_body() {
    let redis = redis();
    let big = 200_000;
    // Room for one claimed body at a time, so a second waits in Redis while the first runs.
    let cfg = config(&redis)
        .signing_key(1, KEY_1)
        .timeout(Duration::from_secs(10))
        .claim_fetch_bytes(big + big / 2);
    let server = Server::start(cfg.clone()).await.expect("server");
    let release = Arc::new(tokio::sync::Notify::new());
    let (held, seen) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    {
        let (release, held) = (release.clone(), held.clone());
        server
            .register("sig.hold", move |(s,): (String,)| {
                let (release, held) = (release.clone(), held.clone());
                async move {
                    held.fetch_add(1, Ordering::SeqCst);
                    release.notified().await;
                    Ok::<_, std::convert::Infallible>(s.len())
                }
            })
            .await
            .expect("register");
        let seen = seen.clone();
        server
            .register("sig.len", move |(s,): (String,)| {
                seen.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, std::convert::Infallible>(s.len()) }
            })
            .await
            .expect("register");
    }
    let client = Client::connect(cfg).await.expect("client");
    // A signed claimed call works.
    let len: usize = client
        .call("sig.len", ("a".repeat(big),))
        .await
        .expect("a signed claimed call");
    assert_eq!(len, big);
    let first = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call::<_, usize>("sig.hold", ("h".repeat(big),))
                .await
        }
    });
    eventually(
        "the first call holds the budget",
        Duration::from_secs(5),
        || async { held.load(Ordering::SeqCst) == 1 },
    )
    .await;
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.call::<_, usize>("sig.len", ("b".repeat(big),)).await }
    });
    eventually(
        "the second body waits in Redis",
        Duration::from_secs(5),
        || async { common::claim_keys(&redis, 3).len() == 1 },
    )
    .await;
    // Replace the waiting body with another of the same length (every `b` made a `c`).
    let key = common::claim_keys(&redis, 3).remove(0);
    let script = "redis.call('SELECT', 3) local v = redis.call('GET', KEYS[1]) \
                  redis.call('SET', KEYS[1], string.gsub(v, 'b', 'c'), 'KEEPTTL') return #v";
    let stored = redis
        .command(&["EVAL", script, "1", &key])
        .expect("overwrite the claim");
    assert!(stored.as_int() > Some(i64::try_from(big).expect("len")));
    release.notify_one();
    assert_eq!(first.await.expect("task").expect("the first call"), big);
    match second.await.expect("task") {
        Err(Error::ClaimLost { what, reason, .. }) => {
            assert_eq!(what, "arguments");
            assert!(reason.contains("digest"), "{reason}");
        }
        other => panic!("expected ClaimLost, got {other:?}"),
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "the replaced body never ran"
    );
    assert!(common::claim_keys(&redis, 3).is_empty());
    server.shutdown().await.expect("shutdown");
}
