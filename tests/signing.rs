//! Signed frames against a real Redis: frames forged with a raw `PUBLISH` (unsigned, signed
//! with a wrong key, signed for another channel, a captured call replayed) are refused and
//! counted, never dispatched, while signed traffic works; key rotation.
//!
//! The forged frames are built here from `docs/protocol.md` §3.1 alone (with the `hmac` and
//! `sha2` crates), so these tests also pin the documented layout of the signed envelope.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clouds::{Client, Config, Error, Server};
use clouds_testkit::{RedisCluster, RedisSentinel};
use common::{RedisServer, Sniffer, config, eventually, redis};
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

/// `command` (`PUBLISH` or `SPUBLISH`) of `frame` on `channel`, on a plain connection to the
/// Redis listening on `port`: the number of receivers.
fn publish_on(port: u16, command: &str, channel: &str, frame: &[u8]) -> i64 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    for arg in [command.as_bytes(), channel.as_bytes(), frame] {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    stream.write_all(b"*3\r\n").expect("publish");
    stream.write_all(&out).expect("publish");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("a reply");
    line.trim_end()
        .strip_prefix(':')
        .unwrap_or_else(|| panic!("not a count: {line:?}"))
        .parse()
        .expect("a count")
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

/// A MessagePack unsigned integer.
fn put_uint(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=0x7f => out.push(v as u8),
        0x80..=0xff => out.extend_from_slice(&[0xcc, v as u8]),
        0x100..=0xffff => {
            out.push(0xcd);
            out.extend_from_slice(&(v as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0xce);
            out.extend_from_slice(&(v as u32).to_be_bytes());
        }
        _ => {
            out.push(0xcf);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

/// A MessagePack unsigned integer at the start of `bytes`.
fn read_uint(bytes: &[u8]) -> u64 {
    let be = |n: usize| {
        bytes[1..1 + n]
            .iter()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b))
    };
    match bytes[0] {
        b @ 0..=0x7f => u64::from(b),
        0xcc => be(1),
        0xcd => be(2),
        0xce => be(4),
        0xcf => be(8),
        other => panic!("not an unsigned integer: marker {other:#x}"),
    }
}

/// A MessagePack string of up to 255 bytes.
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&[0xd9, s.len() as u8]);
    out.extend_from_slice(s.as_bytes());
}

/// A version-1 reply frame (`docs/protocol.md` §3): `[1, id, status 0 (Ok), body]`.
fn reply_frame(id: u64, result: i64) -> Vec<u8> {
    let mut out = vec![1u8, 0x94, 1];
    put_uint(&mut out, id);
    out.push(0);
    out.push(0xd3); // int 64
    out.extend_from_slice(&result.to_be_bytes());
    out
}

/// A version-1 message frame: `[2, from, body]`, the body a string.
fn message_frame(from: &str, text: &str) -> Vec<u8> {
    let mut out = vec![1u8, 0x93, 2];
    put_str(&mut out, from);
    put_str(&mut out, text);
    out
}

/// The test: while several callers make many signed calls, a call, a reply to a call
/// that is pending (held by a slow handler; its id taken from the signed frame as Redis
/// delivered it) and a message are forged with raw `PUBLISH`es, unsigned and wrongly signed.
/// Every forged frame is refused and counted, no legitimate call fails, and the held call
/// gets its real result. Controls signed right show the forged frames were well-formed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_calls_replies_and_messages_are_refused_while_signed_calls_flow() {
    const CALLERS: usize = 4;
    const MIN_CALLS: usize = 100; // per caller, at least, besides the forging

    let redis = redis();
    // A long timeout and no retries: the held call keeps its id while the test forges.
    let cfg = config(&redis)
        .signing_key(1, KEY_1)
        .timeout(Duration::from_secs(30))
        .retries(0);
    let adds = Server::start(cfg.clone()).await.expect("adds server");
    let runs = adder(&adds).await;
    let holder = Server::start(cfg.clone()).await.expect("holding server");
    let release = Arc::new(tokio::sync::Notify::new());
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
    {
        let release = release.clone();
        holder
            .register("sig.hold", move |(a, b): (i64, i64)| {
                let (release, entered) = (release.clone(), entered_tx.clone());
                async move {
                    let _ = entered.send(());
                    release.notified().await;
                    Ok::<_, std::convert::Infallible>(a * b)
                }
            })
            .await
            .expect("register sig.hold");
    }
    let client = Client::connect(cfg.clone()).await.expect("client");
    let adds_calls = format!("clouds:3:calls:{}", adds.id());
    let adds_inbox = format!("clouds:3:inbox:{}", adds.id());
    let holder_calls = format!("clouds:3:calls:{}", holder.id());
    let client_inbox = format!("clouds:3:inbox:{}", client.id());

    // Signed traffic: CALLERS loops of calls until told to stop (and MIN_CALLS each at least).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for caller in 0..CALLERS as i64 {
        let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
        callers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            let mut i = 0i64;
            while ok + failed.len() < MIN_CALLS || !stop.load(Ordering::Relaxed) {
                match client
                    .call::<_, i64>("sig.add", (caller * 1_000_000, i))
                    .await
                {
                    Ok(sum) if sum == caller * 1_000_000 + i => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            (ok, failed)
        }));
    }
    eventually("signed calls flowing", Duration::from_secs(10), || async {
        done.load(Ordering::Relaxed) >= 2 * CALLERS
    })
    .await;

    // The held call, and its id from the signed call frame as the holder's channel carried it.
    let mut sniffer = Sniffer::subscribe(&redis, &holder_calls);
    let held = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, i64>("sig.hold", (6, 7)).await })
    };
    let captured = tokio::task::spawn_blocking(move || sniffer.next())
        .await
        .expect("sniffer");
    assert_eq!(captured[0], 2, "the call went out signed");
    let frame = &captured[61..];
    assert_eq!(&frame[..3], &[1, 0x96, 0], "a call frame");
    let held_id = read_uint(&frame[3..]);
    entered
        .recv()
        .await
        .expect("the held call reached its handler");

    // Forged replies to the held call, on the caller's inbox.
    let reply = reply_frame(held_id, 666);
    let forged_replies = [
        ("unsigned", reply.clone()),
        ("wrong key", sign(1, &KEY_2, &client_inbox, 1, &reply)),
        (
            "signed for another channel",
            sign(1, &KEY_1, &adds_inbox, 2, &reply),
        ),
        ("unknown key id", sign(9, &KEY_1, &client_inbox, 3, &reply)),
    ];
    // Forged calls, on the adding server's call channel.
    let call = call_frame(5, "sig.add", client.id().as_str(), 100, 1);
    let forged_calls = [
        ("unsigned", call.clone()),
        ("wrong key", sign(1, &KEY_2, &adds_calls, 4, &call)),
        (
            "signed for another channel",
            sign(1, &KEY_1, &holder_calls, 5, &call),
        ),
    ];
    // Forged messages, on the adding server's inbox.
    let forged_messages = [
        ("unsigned", message_frame(client.id().as_str(), "forged")),
        (
            "wrong key",
            sign(
                1,
                &KEY_2,
                &adds_inbox,
                6,
                &message_frame(client.id().as_str(), "forged"),
            ),
        ),
    ];
    for (what, bytes) in &forged_replies {
        assert_eq!(publish(&redis, &client_inbox, bytes), 1, "reply: {what}");
    }
    for (what, bytes) in &forged_calls {
        assert_eq!(publish(&redis, &adds_calls, bytes), 1, "call: {what}");
    }
    for (what, bytes) in &forged_messages {
        assert_eq!(publish(&redis, &adds_inbox, bytes), 1, "message: {what}");
    }
    // The message control, signed right: the first (and only) message the server reads.
    let control = message_frame(client.id().as_str(), "control, signed right");
    assert_eq!(
        publish(
            &redis,
            &adds_inbox,
            &sign(1, &KEY_1, &adds_inbox, 7, &control)
        ),
        1
    );
    let first = adds.messages().next().await.expect("a message");
    assert_eq!(
        first.decode::<String>().expect("a string"),
        "control, signed right",
        "a forged message was delivered"
    );

    eventually(
        "every forged frame counted",
        Duration::from_secs(10),
        || async {
            client.stats().unauthenticated_frames == forged_replies.len() as u64
                && adds.stats().unauthenticated_frames
                    == (forged_calls.len() + forged_messages.len()) as u64
        },
    )
    .await;
    // The held call is still waiting: no forged reply completed it.
    assert!(
        !held.is_finished(),
        "a forged reply completed the held call"
    );
    release.notify_one();
    let result = held.await.expect("join").expect("the held call");
    assert_eq!(result, 42, "the held call gets its real result");

    let during = done.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut legit = 0;
    for caller in callers {
        let (ok, failed) = caller.await.expect("caller");
        assert!(failed.is_empty(), "legitimate calls failed: {failed:?}");
        legit += ok;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        legit,
        "every legitimate call ran once and no forged one ran"
    );

    // The reply control: the same reply signed right is authentic and decodes; its call has
    // its answer already, so it is counted as late.
    let late = client.stats().late_replies;
    assert_eq!(
        publish(
            &redis,
            &client_inbox,
            &sign(1, &KEY_1, &client_inbox, 8, &reply)
        ),
        1
    );
    eventually(
        "the well-signed reply counted as late",
        Duration::from_secs(10),
        || async { client.stats().late_replies == late + 1 },
    )
    .await;
    for stats in [client.stats(), adds.stats(), holder.stats()] {
        assert_eq!(stats.malformed_frames, 0, "{stats:?}");
        assert_eq!(stats.replayed_frames, 0, "{stats:?}");
    }
    assert_eq!(client.stats().unauthenticated_frames, 4);
    assert_eq!(adds.stats().unauthenticated_frames, 5);
    assert_eq!(holder.stats().unauthenticated_frames, 0);
    eprintln!(
        "FIGURES signing forged: {legit} legitimate calls ok ({during} ended before the held call \
         did); client {:?}; adds {:?}",
        client.stats(),
        adds.stats()
    );
    for server in [adds, holder] {
        server.shutdown().await.expect("shutdown");
    }
}

/// Runs `calls` signed `sig.add` calls from `tasks` concurrent tasks; every one must succeed
/// with the right sum. Returns how many ran.
async fn signed_calls(client: &Client, tasks: i64, calls: i64) -> usize {
    let mut loops = Vec::new();
    for task in 0..tasks {
        let client = client.clone();
        loops.push(tokio::spawn(async move {
            for i in 0..calls {
                let sum: i64 = client
                    .call("sig.add", (task * 1000, i))
                    .await
                    .unwrap_or_else(|e| panic!("signed call {task}/{i}: {e}"));
                assert_eq!(sum, task * 1000 + i);
            }
        }));
    }
    for l in loops {
        l.await.expect("calls");
    }
    (tasks * calls) as usize
}

/// Signed frames on a Redis Cluster (sharded pub/sub): calls work and go out signed on the
/// shard of the server's call channel, where forged (unsigned, wrongly signed) and replayed
/// frames `SPUBLISH`ed on that shard are refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_frames_on_a_redis_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("join")
        .expect("start a Redis Cluster (redis-server 7.0+)");
    let cfg = Config::from_url(&cluster.seed_url())
        .expect("a cluster URL")
        .namespace("sigcl")
        .heartbeat(Duration::from_millis(300))
        .timeout(Duration::from_secs(2))
        .signing_key(1, KEY_1);
    let server = Server::start(cfg.clone()).await.expect("server");
    let runs = adder(&server).await;
    let client = Client::connect(cfg).await.expect("client");
    let calls = format!("sigcl:0:calls:{}", server.id());
    let port = cluster
        .primary_for_slot(RedisCluster::slot_of(&calls))
        .expect("the call channel's shard");

    let mut sniffer = Sniffer::subscribe_on(port, "SSUBSCRIBE", &calls);
    let sum: i64 = client.call("sig.add", (40, 2)).await.expect("signed call");
    assert_eq!(sum, 42);
    let captured = tokio::task::spawn_blocking(move || sniffer.next())
        .await
        .expect("sniffer");
    assert_eq!(captured[0], 2, "the call went out signed on the shard");
    let mut legit = 1 + signed_calls(&client, 4, 50).await;

    let frame = call_frame(9, "sig.add", client.id().as_str(), 1, 2);
    for forged in [frame.clone(), sign(1, &KEY_2, &calls, 1, &frame)] {
        assert!(publish_on(port, "SPUBLISH", &calls, &forged) >= 1);
    }
    assert!(publish_on(port, "SPUBLISH", &calls, &captured) >= 1);
    eventually(
        "the forged and replayed frames counted",
        Duration::from_secs(10),
        || async {
            let s = server.stats();
            s.unauthenticated_frames == 2 && s.replayed_frames == 1
        },
    )
    .await;
    legit += signed_calls(&client, 4, 50).await;
    assert_eq!(runs.load(Ordering::SeqCst), legit, "no forged call ran");
    assert_eq!(client.stats().unauthenticated_frames, 0);
    assert_eq!(server.stats().malformed_frames, 0);
    server.shutdown().await.expect("shutdown");
    client.close().await;
}

/// Signed frames through Sentinel: signed calls before the primary is killed, and after the
/// sentinels promote the replica; a call captured before the failover and published again on
/// the new primary is refused as a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_calls_before_and_after_a_sentinel_failover() {
    let mut deployment = tokio::task::spawn_blocking(RedisSentinel::start)
        .await
        .expect("join")
        .expect("start a Sentinel deployment (redis-server 7.0+)");
    let cfg = Config::from_url(&deployment.url_with_db(3))
        .expect("a redis-sentinel:// URL")
        .namespace("sigsent")
        .heartbeat(Duration::from_millis(300))
        .timeout(Duration::from_secs(1))
        .command_timeout(Duration::from_secs(1))
        .signing_key(1, KEY_1);
    let server = Server::start(cfg.clone()).await.expect("server");
    let runs = adder(&server).await;
    let client = Client::connect(cfg.clone())
        .await
        .expect("client")
        .with_retries(2);
    let calls = format!("sigsent:3:calls:{}", server.id());
    let primary = deployment.primary_port().expect("the primary");

    let mut sniffer = Sniffer::subscribe_on(primary, "SUBSCRIBE", &calls);
    let sum: i64 = client.call("sig.add", (40, 2)).await.expect("signed call");
    assert_eq!(sum, 42);
    let captured = tokio::task::spawn_blocking(move || sniffer.next())
        .await
        .expect("sniffer");
    assert_eq!(captured[0], 2, "the call went out signed");
    signed_calls(&client, 4, 25).await;

    let old = deployment.kill_primary().expect("kill -9 the primary");
    let (deployment, new) = tokio::task::spawn_blocking(move || {
        let new = deployment.wait_failover(old, Duration::from_secs(30));
        (deployment, new)
    })
    .await
    .expect("join");
    let new = new.expect("the sentinels promote the replica");
    // Calls come back once the server has subscribed and registered again on the new primary
    // (the registry may not have replicated; calls during the failover may fail: that is
    // tests/sentinel.rs's subject, not this one's).
    let status = cfg.clone();
    eventually(
        "the server is listed on the new primary",
        Duration::from_secs(30),
        || {
            let status = status.clone();
            async move { common::status(status).await.servers.len() == 1 }
        },
    )
    .await;
    eventually(
        "a signed call succeeds after the failover",
        Duration::from_secs(30),
        || async { matches!(client.call::<_, i64>("sig.add", (1, 1)).await, Ok(2)) },
    )
    .await;
    signed_calls(&client, 4, 25).await;

    // The call captured before the failover, published again on the new primary.
    assert!(publish_on(new, "PUBLISH", &calls, &captured) >= 1);
    eventually(
        "the replayed call counted",
        Duration::from_secs(10),
        || async { server.stats().replayed_frames == 1 },
    )
    .await;
    let ran = runs.load(Ordering::SeqCst);
    assert_eq!(
        client
            .call::<_, i64>("sig.add", (2, 2))
            .await
            .expect("call"),
        4
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        ran + 1,
        "the replayed call did not run"
    );
    for stats in [server.stats(), client.stats()] {
        assert_eq!(stats.unauthenticated_frames, 0, "{stats:?}");
        assert_eq!(stats.malformed_frames, 0, "{stats:?}");
    }
    assert_eq!(deployment.role_of(new).expect("role"), "master");
    server.shutdown().await.expect("shutdown");
    client.close().await;
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
