//! Signed frames on the in-memory broker: signed traffic works (calls, replies, messages,
//! join and leave), and forged, unsigned, misdirected and replayed frames are dropped and
//! counted, never dispatched.

use super::*;
use crate::Error;

const KEY_1: [u8; 32] = *b"key one: thirty-two bytes long!!";
const KEY_2: [u8; 32] = *b"key two: thirty-two bytes long!!";

fn signed(broker: &Broker) -> Config {
    config(broker).signing_key(1, KEY_1)
}

/// The next frame `raw` receives, as it arrived (not decoded).
async fn next_payload(raw: &mut RawPeer) -> Bytes {
    match raw.recv().await {
        Delivery::Frame { payload, .. } => payload,
        Delivery::Lagged(n) => panic!("unexpected lag of {n} frames"),
    }
}

#[tokio::test(start_paused = true)]
async fn signed_nodes_call_message_and_announce() {
    let broker = Broker::new();
    let provider = server(signed(&broker)).await;
    let calls = answer_name(&provider, "s.who", "s").await;
    let caller = client(signed(&broker)).await;
    assert_eq!(
        caller.call::<_, String>("s.who", ()).await.expect("call"),
        "s"
    );
    caller.send(provider.id(), &"hi").await.expect("send");
    let message = provider.messages().next().await.expect("a message");
    assert_eq!(message.decode::<String>().expect("decode"), "hi");
    assert_eq!(calls.get(), 1);
    // The provider's leave (a signed frame on the events channel) reaches the caller, which
    // then has nobody to call.
    provider.shutdown().await.expect("shutdown");
    settle().await;
    match caller.call::<_, String>("s.who", ()).await {
        Err(Error::NoProvider { .. }) => {}
        other => panic!("expected no provider, got {other:?}"),
    }
    let stats = caller.stats();
    assert_eq!(
        (stats.unauthenticated_frames, stats.replayed_frames),
        (0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn unsigned_and_wrongly_signed_frames_are_refused_and_counted() {
    let broker = Broker::new();
    let provider = server(signed(&broker)).await;
    let calls = answer_name(&provider, "f.who", "f").await;
    let caller = client(signed(&broker)).await;
    let mut raw = RawPeer::connect(&broker, &config(&broker), 16);
    let to = raw.calls(provider.id().as_str());
    let call = call_frame(1, "f.who", raw.id.as_str(), 1000, &());
    raw.subscribe(&raw.inbox(raw.id.as_str())).await;

    // Unsigned.
    assert_eq!(raw.publish(to.clone(), call.clone()).await, 1);
    // Signed with another secret under the same key id, and with a key id nobody accepts.
    let wrong =
        crate::signing::Sealer::new(&config(&broker).signing_key(1, KEY_2).signing).expect("signs");
    raw.publish(to.clone(), wrong.seal(to.as_str(), &call))
        .await;
    let stranger =
        crate::signing::Sealer::new(&config(&broker).signing_key(9, KEY_1).signing).expect("signs");
    raw.publish(to.clone(), stranger.seal(to.as_str(), &call))
        .await;
    // Signed with the right key, for another channel (the caller's inbox).
    let right = crate::signing::Sealer::new(&signed(&broker).signing).expect("signs");
    let inbox = raw.inbox(caller.id().as_str());
    raw.publish(to.clone(), right.seal(inbox.as_str(), &call))
        .await;
    // An unsigned leave on the events channel does not make the caller forget the provider.
    raw.publish(
        raw.events(),
        crate::codec::encode_leave(provider.id().as_str()),
    )
    .await;
    settle().await;
    assert_eq!(
        provider.stats().unauthenticated_frames,
        5,
        "4 calls + the leave"
    );
    assert_eq!(caller.stats().unauthenticated_frames, 1, "the leave");
    assert_eq!(calls.get(), 0, "no forged call ran");
    assert!(raw.try_recv().is_none(), "nothing was answered");
    assert_eq!(
        caller.call::<_, String>("f.who", ()).await.expect("call"),
        "f"
    );

    // The control: the same call, signed right for the right channel, runs and is answered.
    raw.publish(to.clone(), right.seal(to.as_str(), &call))
        .await;
    let reply = next_payload(&mut raw).await;
    assert_eq!(
        reply[0],
        crate::signing::SIGNED_VERSION,
        "the reply is signed"
    );
    assert_eq!(calls.get(), 2);
    assert_eq!(provider.stats().unauthenticated_frames, 5);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_captured_call_replayed_is_refused() {
    let broker = Broker::new();
    let provider = server(signed(&broker)).await;
    let calls = answer_name(&provider, "r.who", "r").await;
    let caller = client(signed(&broker)).await;
    let mut raw = RawPeer::connect(&broker, &config(&broker), 16);
    let to = raw.calls(provider.id().as_str());
    raw.subscribe(&to).await;
    assert_eq!(
        caller.call::<_, String>("r.who", ()).await.expect("call"),
        "r"
    );
    let captured = next_payload(&mut raw).await;
    assert_eq!(calls.get(), 1);
    raw.unsubscribe(&to).await;
    for _ in 0..3 {
        assert_eq!(raw.publish(to.clone(), captured.clone()).await, 1);
    }
    settle().await;
    assert_eq!(provider.stats().replayed_frames, 3);
    assert_eq!(provider.stats().unauthenticated_frames, 0);
    assert_eq!(calls.get(), 1, "the replays did not run");

    // A frame signed with the right key but stamped outside the replay window (30 s) is
    // refused too, before or after this node's clock; inside it, it runs.
    let sealer = crate::signing::Sealer::new(&signed(&broker).signing).expect("signs");
    let call = call_frame(5, "r.who", raw.id.as_str(), 1000, &());
    let now = crate::signing::wall_clock_ms();
    for (seq, sent) in [(1, now - 60_000), (2, now + 60_000)] {
        let frame = sealer.seal_as(to.as_str(), &call, 77, seq, sent);
        raw.publish(to.clone(), frame).await;
    }
    settle().await;
    assert_eq!(provider.stats().replayed_frames, 5);
    assert_eq!(calls.get(), 1);
    let fresh = sealer.seal_as(to.as_str(), &call, 77, 3, now);
    raw.publish(to.clone(), fresh).await;
    settle().await;
    assert_eq!(calls.get(), 2);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_captured_announcement_only_counts_on_the_events_channel() {
    let broker = Broker::new();
    let caller = client(signed(&broker)).await;
    let mut raw = RawPeer::connect(&broker, &config(&broker), 16);
    raw.subscribe(&raw.events()).await;
    let provider = server(signed(&broker)).await;
    answer_name(&provider, "a.who", "a").await;
    let join = next_payload(&mut raw).await;
    // The join, signed for the events channel, replayed to the caller's inbox.
    raw.publish(raw.inbox(caller.id().as_str()), join).await;
    settle().await;
    assert_eq!(caller.stats().unauthenticated_frames, 1);
    assert_eq!(
        caller.stats().misrouted_frames,
        0,
        "refused before it was read"
    );
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn signed_and_unsigned_nodes_do_not_talk() {
    let broker = Broker::new();
    let plain = server(config(&broker)).await;
    let plain_calls = answer_name(&plain, "m.plain", "p").await;
    let sealed = server(signed(&broker)).await;
    let sealed_calls = answer_name(&sealed, "m.sealed", "s").await;
    let signed_caller = client(signed(&broker).retries(0)).await;
    let plain_caller = client(config(&broker).retries(0)).await;
    // Each call reaches the other kind of server, which refuses it: it times out.
    assert!(matches!(
        signed_caller.call::<_, String>("m.plain", ()).await,
        Err(Error::Timeout { .. })
    ));
    assert!(matches!(
        plain_caller.call::<_, String>("m.sealed", ()).await,
        Err(Error::Timeout { .. })
    ));
    assert_eq!((plain_calls.get(), sealed_calls.get()), (0, 0));
    assert!(plain.stats().unauthenticated_frames >= 1);
    assert!(sealed.stats().unauthenticated_frames >= 1);
    plain.shutdown().await.expect("shutdown");
    sealed.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_key_rotation_keeps_every_pair_talking() {
    let broker = Broker::new();
    // Mid-rotation: A sends with key 2 and still accepts 1; B still sends with 1 and already
    // accepts 2. C has finished: key 2 only.
    let a_config = config(&broker).signing_key(2, KEY_2).accept_key(1, KEY_1);
    let b_config = config(&broker).signing_key(1, KEY_1).accept_key(2, KEY_2);
    let c_config = config(&broker).signing_key(2, KEY_2);
    let a = server(a_config.clone()).await;
    answer_name(&a, "k.a", "a").await;
    let b = server(b_config.clone()).await;
    answer_name(&b, "k.b", "b").await;
    let a_client = client(a_config).await;
    let b_client = client(b_config.clone()).await;
    assert_eq!(
        b_client.call::<_, String>("k.a", ()).await.expect("b→a"),
        "a"
    );
    assert_eq!(
        a_client.call::<_, String>("k.b", ()).await.expect("a→b"),
        "b"
    );
    let c = server(c_config).await;
    let c_calls = answer_name(&c, "k.c", "c").await;
    assert!(matches!(
        b_client.call::<_, String>("k.c", ()).await,
        Err(Error::Timeout { .. })
    ));
    assert_eq!(c_calls.get(), 0);
    assert!(c.stats().unauthenticated_frames >= 1);
    for s in [a, b, c] {
        s.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(start_paused = true)]
async fn keys_are_validated_and_never_shown() {
    let broker = Broker::new();
    match Server::start(config(&broker).signing_key(1, b"sixteen bytes!!!")).await {
        Err(Error::Config(reason)) => assert!(reason.contains("at least 32"), "{reason}"),
        other => panic!("a short key was accepted: {:?}", other.map(|_| ())),
    }
    let config = signed(&broker).accept_key(2, KEY_2);
    let shown = format!("{config:?}");
    assert!(shown.contains("signs_with: Some(1)"), "{shown}");
    for key in [KEY_1, KEY_2] {
        assert!(!shown.contains(&*String::from_utf8_lossy(&key)), "{shown}");
        assert!(!shown.contains(&format!("{:?}", &key[..4])), "{shown}");
    }
    let node = client(config).await;
    assert!(!format!("{node:?}").contains("thirty-two"));
}
