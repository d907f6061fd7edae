//! The in-memory broker's model of Redis, and its faults, as nodes and raw connections see
//! them.

use tokio::time::Instant;

use super::*;
use crate::Error;
use crate::testing::{Broker, FrameFault};

/// The payload of a frame delivery.
fn payload(delivery: Delivery) -> Bytes {
    match delivery {
        Delivery::Frame { payload, .. } => payload,
        Delivery::Lagged(n) => panic!("unexpected lag of {n}"),
    }
}

#[tokio::test(start_paused = true)]
async fn publish_counts_the_connections_subscribed() {
    let broker = Broker::new();
    let config = config(&broker);
    let mut first = RawPeer::connect(&broker, &config, 16);
    let mut second = RawPeer::connect(&broker, &config, 16);
    let channel = Channel::from("clouds:0:test");
    assert_eq!(first.publish(channel.clone(), "nobody").await, 0);
    assert_eq!(broker.subscribers(channel.as_str()), 0);
    first.subscribe(&channel).await;
    assert_eq!(second.publish(channel.clone(), "one").await, 1);
    second.subscribe(&channel).await;
    assert_eq!(broker.subscribers(channel.as_str()), 2);
    assert_eq!(first.publish(channel.clone(), "two").await, 2);
    assert_eq!(&payload(first.recv().await)[..], b"one");
    assert_eq!(&payload(first.recv().await)[..], b"two");
    assert_eq!(&payload(second.recv().await)[..], b"two");
    assert!(first.try_recv().is_none() && second.try_recv().is_none());
    second.unsubscribe(&channel).await;
    assert_eq!(first.publish(channel.clone(), "three").await, 1);
    // A closed connection receives nothing and counts for nobody.
    first.close().await;
    assert_eq!(second.publish(channel.clone(), "four").await, 0);
    assert_eq!(broker.subscribers(channel.as_str()), 0);
}

#[tokio::test(start_paused = true)]
async fn nodes_subscribe_their_inbox_events_and_call_channels() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let caller = client(config(&broker)).await;
    let scope = "clouds:0";
    assert_eq!(broker.subscribers(&format!("{scope}:events")), 2);
    assert_eq!(
        broker.subscribers(&format!("{scope}:inbox:{}", provider.id())),
        1
    );
    assert_eq!(
        broker.subscribers(&format!("{scope}:inbox:{}", caller.id())),
        1
    );
    assert_eq!(
        broker.subscribers(&format!("{scope}:calls:{}", provider.id())),
        1
    );
    assert_eq!(
        broker.subscribers(&format!("{scope}:calls:{}", caller.id())),
        0
    );
    // Another namespace and db are other channels.
    let other = client(config(&broker).namespace("other").db(2)).await;
    assert_eq!(broker.subscribers("other:2:events"), 1);
    assert_eq!(
        broker.subscribers(&format!("other:2:inbox:{}", other.id())),
        1
    );
    provider.shutdown().await.expect("shutdown");
    assert_eq!(
        broker.subscribers(&format!("{scope}:calls:{}", provider.id())),
        0
    );
    assert_eq!(broker.subscribers(&format!("{scope}:events")), 1);
    caller.close().await;
    assert_eq!(broker.subscribers(&format!("{scope}:events")), 0);
}

#[tokio::test(start_paused = true)]
async fn a_frozen_node_gets_what_was_held_in_order_once_thawed() {
    let broker = Broker::new();
    let sender = client(config(&broker)).await;
    let receiver = client(config(&broker)).await;
    broker.freeze(receiver.id());
    for i in 0..5u32 {
        // Counted as received, as Redis counts a subscriber that does not read.
        sender.send(receiver.id(), &i).await.expect("send");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut inbox = receiver.messages();
    assert!(inbox.try_next().is_none(), "held while frozen");
    broker.thaw(receiver.id());
    sender.send(receiver.id(), &5u32).await.expect("send");
    for i in 0..6u32 {
        let message = inbox.next().await.expect("a message");
        assert_eq!(message.decode::<u32>().expect("decode"), i);
    }
}

#[tokio::test(start_paused = true)]
async fn a_stall_thaws_after_its_duration() {
    let broker = Broker::new();
    let sender = client(config(&broker)).await;
    let receiver = client(config(&broker)).await;
    let started = Instant::now();
    broker.stall(receiver.id(), ms(300));
    sender.send(receiver.id(), &"held").await.expect("send");
    let message = receiver.messages().next().await.expect("a message");
    about(started.elapsed(), ms(300));
    assert_eq!(message.decode::<String>().expect("decode"), "held");
}

#[tokio::test(start_paused = true)]
async fn lost_subscriptions_make_a_node_unreachable_until_its_next_heartbeat() {
    let broker = Broker::new();
    let sender = client(config(&broker)).await;
    let receiver = client(config(&broker)).await;
    sender.send(receiver.id(), &1).await.expect("send");
    settle().await;
    broker.drop_subscriptions(receiver.id());
    assert!(matches!(
        sender.send(receiver.id(), &2).await,
        Err(Error::Unreachable { node }) if &node == receiver.id()
    ));
    assert_eq!(
        broker.subscribers(&format!("clouds:0:inbox:{}", receiver.id())),
        0
    );
    // It can still send: only its subscriptions are gone.
    receiver.send(sender.id(), &3).await.expect("send");
    // Its next heartbeat finds its inbox with no subscriber and subscribes again.
    tokio::time::sleep(HEARTBEAT).await;
    sender.send(receiver.id(), &4).await.expect("healed");
    let mut messages = receiver.messages();
    assert_eq!(
        messages.next().await.expect("1").decode::<i32>().ok(),
        Some(1)
    );
    assert_eq!(
        messages.next().await.expect("4").decode::<i32>().ok(),
        Some(4)
    );
}

#[tokio::test(start_paused = true)]
async fn a_disconnected_node_can_neither_send_nor_receive_until_it_reconnects() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "c.who", "c").await;
    let caller = client(config(&broker)).await.with_retries(0);
    let peer = client(config(&broker)).await;
    caller.call::<_, String>("c.who", ()).await.expect("call");
    broker.disconnect(caller.id());
    assert!(matches!(
        caller.send(peer.id(), &"out").await,
        Err(Error::Redis(_))
    ));
    assert!(matches!(
        caller.call::<_, String>("c.who", ()).await,
        Err(Error::Redis(_))
    ));
    assert!(matches!(
        peer.send(caller.id(), &"in").await,
        Err(Error::Unreachable { .. })
    ));
    broker.reconnect(caller.id());
    assert_eq!(
        caller.call::<_, String>("c.who", ()).await.expect("call"),
        "c"
    );
    peer.send(caller.id(), &"in").await.expect("send");
    let message = caller.messages().next().await.expect("a message");
    assert_eq!(message.decode::<String>().expect("decode"), "in");
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn injected_failures_are_used_up_one_command_at_a_time() {
    let broker = Broker::new();
    let sender = client(config(&broker)).await;
    let receiver = client(config(&broker)).await;
    broker.fail_commands(sender.id(), 2);
    broker.fail_commands(sender.id(), 0);
    for _ in 0..2 {
        match sender.send(receiver.id(), &"x").await {
            Err(Error::Redis(crate::TransportError::Command { command, reason })) => {
                assert_eq!(command, "PUBLISH");
                assert!(reason.contains("injected"), "{reason}");
            }
            other => panic!("expected an injected failure, got {other:?}"),
        }
    }
    sender
        .send(receiver.id(), &"x")
        .await
        .expect("the failures are used up");
    // Only that node's commands fail.
    broker.fail_commands(sender.id(), 1);
    receiver
        .send(sender.id(), &"y")
        .await
        .expect("another node is unaffected");
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_falls_behind_is_told_how_many_frames_it_lost() {
    let broker = Broker::new();
    let config = config(&broker);
    let publisher = RawPeer::connect(&broker, &config, 16);
    // Asked for 4, given 16: the smallest buffer fred gives a subscriber.
    let mut reader = RawPeer::connect(&broker, &config, 4);
    let channel = Channel::from("clouds:0:burst");
    reader.subscribe(&channel).await;
    for i in 0..20u8 {
        // A subscriber that does not keep up still counts as a receiver.
        assert_eq!(publisher.publish(channel.clone(), vec![i]).await, 1);
    }
    // As with fred's broadcast channel: the oldest are lost, and the reader is told at once.
    assert!(matches!(reader.recv().await, Delivery::Lagged(4)));
    for i in 4..20u8 {
        assert_eq!(&payload(reader.recv().await)[..], [i]);
    }
    assert!(reader.try_recv().is_none());
    publisher.publish(channel, vec![20]).await;
    assert_eq!(
        &payload(reader.recv().await)[..],
        [20],
        "the loss is told once"
    );
}

#[tokio::test(start_paused = true)]
async fn frame_faults_apply_in_order_to_the_next_frames() {
    let broker = Broker::new();
    let config = config(&broker);
    let publisher = RawPeer::connect(&broker, &config, 16);
    let mut reader = RawPeer::connect(&broker, &config, 16);
    let channel = Channel::from("clouds:0:faults");
    reader.subscribe(&channel).await;
    broker.fault_next_frame(&reader.id, FrameFault::Drop);
    broker.fault_next_frame(&reader.id, FrameFault::Duplicate);
    broker.fault_next_frame(&reader.id, FrameFault::Delay(ms(100)));
    let started = Instant::now();
    for i in 0..4u8 {
        assert_eq!(publisher.publish(channel.clone(), vec![i]).await, 1);
    }
    // 0 lost, 1 twice, 2 delayed and overtaken by 3.
    assert_eq!(&payload(reader.recv().await)[..], [1]);
    assert_eq!(&payload(reader.recv().await)[..], [1]);
    assert_eq!(&payload(reader.recv().await)[..], [3]);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(&payload(reader.recv().await)[..], [2]);
    about(started.elapsed(), ms(100));
    assert!(reader.try_recv().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_frozen_reader_keeps_faults_and_order() {
    let broker = Broker::new();
    let config = config(&broker);
    let publisher = RawPeer::connect(&broker, &config, 16);
    let mut reader = RawPeer::connect(&broker, &config, 16);
    let channel = Channel::from("clouds:0:frozen");
    reader.subscribe(&channel).await;
    broker.freeze(&reader.id);
    broker.fault_next_frame(&reader.id, FrameFault::Duplicate);
    for i in 0..3u8 {
        publisher.publish(channel.clone(), vec![i]).await;
    }
    tokio::time::sleep(ms(100)).await;
    assert!(reader.try_recv().is_none());
    broker.thaw(&reader.id);
    let got: Vec<u8> = std::iter::from_fn(|| reader.try_recv())
        .map(|d| payload(d)[0])
        .collect();
    assert_eq!(got, [0, 0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn the_registry_lists_providers_by_expiry_then_id_and_purges_the_expired() {
    let broker = Broker::new();
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    let (a, b, c) = (NodeId::from("a"), NodeId::from("b"), NodeId::from("c"));
    raw.register_as(&b, &["r.m"], ms(200)).await;
    raw.register_as(&a, &["r.m"], ms(200)).await;
    raw.register_as(&c, &["r.m", "r.other"], ms(100)).await;
    let methods = ["r.m", "r.other", "r.none"];
    assert_eq!(
        raw.providers(&methods).await,
        [
            vec![c.clone(), a.clone(), b.clone()],
            vec![c.clone()],
            vec![]
        ]
    );
    tokio::time::sleep(ms(100)).await;
    assert_eq!(
        raw.providers(&methods).await,
        [vec![a.clone(), b.clone()], vec![], vec![]]
    );
    // A renewal moves a provider to the back.
    raw.register_as(&a, &["r.m"], ms(200)).await;
    assert_eq!(raw.providers(&["r.m"]).await, [vec![b.clone(), a.clone()]]);
    raw.deregister(&b, &methods).await;
    assert_eq!(raw.providers(&["r.m"]).await, [vec![a.clone()]]);
    let servers = raw.servers().await;
    assert_eq!(servers, [a]);
}

/// A beat of `id` for `methods` lasting an hour, announcing itself if `force_join`.
async fn beat(raw: &RawPeer, id: &NodeId, methods: &[&str], force_join: bool) {
    let methods: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
    let entry = Entry {
        id,
        ttl: Duration::from_secs(3600),
        methods: &methods,
        fields: vec![("methods", methods.join("\n"))],
        join: crate::codec::encode_join(id.as_str(), &methods).into(),
        force_join,
    };
    raw.wire.heartbeat(&entry).await.expect("raw heartbeat");
}

/// The frames that have arrived on `raw`'s connection, decoded.
fn arrived(raw: &mut RawPeer) -> Vec<Frame> {
    std::iter::from_fn(|| raw.try_recv())
        .map(|d| crate::codec::decode(&payload(d)).expect("a valid frame"))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_registry_announces_joins_and_leaves_with_the_change() {
    let broker = Broker::new();
    let config = config(&broker);
    let mut listener = RawPeer::connect(&broker, &config, 64);
    listener.subscribe(&listener.events()).await;
    let writer = RawPeer::connect(&broker, &config, 16);
    let s = NodeId::from("s");
    let join = |methods: &[&str]| Frame::Join {
        node: s.clone(),
        methods: methods.iter().map(|m| m.to_string()).collect(),
    };

    beat(&writer, &s, &[], false).await;
    assert_eq!(arrived(&mut listener), [], "serving nothing: no join");
    beat(&writer, &s, &["j.a"], false).await;
    assert_eq!(arrived(&mut listener), [join(&["j.a"])]);
    beat(&writer, &s, &["j.a"], false).await;
    assert_eq!(arrived(&mut listener), [], "a renewal adds nothing");
    beat(&writer, &s, &["j.a", "j.b"], false).await;
    assert_eq!(arrived(&mut listener), [join(&["j.a", "j.b"])]);
    beat(&writer, &s, &["j.a", "j.b"], true).await;
    assert_eq!(arrived(&mut listener), [join(&["j.a", "j.b"])], "forced");
    // Whoever hears the join finds the entry already there.
    assert_eq!(writer.providers(&["j.b"]).await, [vec![s.clone()]]);

    writer.deregister(&s, &["j.a", "j.b"]).await;
    assert_eq!(arrived(&mut listener), [Frame::Leave { node: s.clone() }]);
    writer.deregister(&s, &["j.a", "j.b"]).await;
    assert_eq!(
        arrived(&mut listener),
        [Frame::Leave { node: s.clone() }],
        "announced also with nothing left to remove"
    );
    // A failed registry command announces nothing.
    broker.fail_commands(&writer.id, 1);
    let methods = vec!["j.a".to_string()];
    let entry = Entry {
        id: &s,
        ttl: Duration::from_secs(60),
        methods: &methods,
        fields: Vec::new(),
        join: crate::codec::encode_join(s.as_str(), &methods).into(),
        force_join: true,
    };
    assert!(writer.wire.heartbeat(&entry).await.is_err());
    assert_eq!(arrived(&mut listener), []);
}

#[tokio::test(start_paused = true)]
async fn announcements_reach_subscribers_as_a_publish_would() {
    let broker = Broker::new();
    let config = config(&broker);
    let mut frozen = RawPeer::connect(&broker, &config, 64);
    frozen.subscribe(&frozen.events()).await;
    let mut faulty = RawPeer::connect(&broker, &config, 64);
    faulty.subscribe(&faulty.events()).await;
    let writer = RawPeer::connect(&broker, &config, 16);
    let s = NodeId::from("s");
    broker.freeze(&frozen.id);
    broker.fault_next_frame(&faulty.id, FrameFault::Duplicate);
    beat(&writer, &s, &["f.a"], false).await;
    assert_eq!(arrived(&mut frozen), [], "held while frozen");
    assert_eq!(arrived(&mut faulty).len(), 2, "duplicated");
    broker.thaw(&frozen.id);
    assert_eq!(arrived(&mut frozen).len(), 1);
    // Another deployment hears nothing.
    let mut other = RawPeer::connect(&broker, &config.clone().namespace("other"), 16);
    other.subscribe(&other.events()).await;
    writer.deregister(&s, &["f.a"]).await;
    assert_eq!(arrived(&mut other), []);
    assert_eq!(arrived(&mut faulty), [Frame::Leave { node: s }]);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_holding_the_current_generation_is_told_nothing_changed() {
    let broker = Broker::new();
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    let (a, b) = (NodeId::from("a"), NodeId::from("b"));
    let changed = |found: Lookup| match found {
        Lookup::Changed {
            generation,
            providers,
        } => (generation, providers),
        Lookup::Unchanged => panic!("expected a changed list"),
    };
    let one = |found: Vec<Lookup>| -> Lookup {
        let [found] = <[Lookup; 1]>::try_from(found).expect("one answer");
        found
    };

    // Nobody provides it: generation 0.
    let (g0, list) = changed(one(raw.providers_since(&["g.m"], &[None]).await));
    assert_eq!((g0, list), (0, vec![]));
    assert_eq!(
        raw.providers_since(&["g.m"], &[Some(0)]).await,
        [Lookup::Unchanged]
    );

    // A join.
    raw.register_as(&a, &["g.m"], ms(1000)).await;
    let (g1, list) = changed(one(raw.providers_since(&["g.m"], &[Some(0)]).await));
    assert_eq!(list, vec![a.clone()]);
    assert_ne!(g1, 0);
    // A renewal is no change.
    raw.register_as(&a, &["g.m"], ms(1000)).await;
    assert_eq!(
        raw.providers_since(&["g.m"], &[Some(g1)]).await,
        [Lookup::Unchanged]
    );
    // Another join, then a leave.
    raw.register_as(&b, &["g.m"], ms(300)).await;
    let (g2, list) = changed(one(raw.providers_since(&["g.m"], &[Some(g1)]).await));
    assert_eq!(list, [b.clone(), a.clone()], "by expiry");
    raw.deregister(&a, &["g.m"]).await;
    let (g3, list) = changed(one(raw.providers_since(&["g.m"], &[Some(g2)]).await));
    assert_eq!(list, vec![b.clone()]);
    assert!(g1 < g2 && g2 < g3);
    // Expiry, seen by a caller that only asks for changes: of one provider of two...
    let c = NodeId::from("c");
    raw.register_as(&c, &["g.m"], ms(400)).await;
    let (g3, list) = changed(one(raw.providers_since(&["g.m"], &[Some(g3)]).await));
    assert_eq!(list, [b.clone(), c.clone()]);
    tokio::time::sleep(ms(300)).await;
    let (g3, list) = changed(one(raw.providers_since(&["g.m"], &[Some(g3)]).await));
    assert_eq!(list, vec![c.clone()]);
    assert_eq!(
        raw.providers_since(&["g.m"], &[Some(g3)]).await,
        [Lookup::Unchanged]
    );
    // ...and of the last one.
    tokio::time::sleep(ms(100)).await;
    assert_eq!(
        changed(one(raw.providers_since(&["g.m"], &[Some(g3)]).await)),
        (0, vec![])
    );
    // Back again: a generation never handed out before.
    raw.register_as(&a, &["g.m"], ms(1000)).await;
    let (g4, list) = changed(one(raw.providers_since(&["g.m"], &[Some(0)]).await));
    assert_eq!(list, vec![a.clone()]);
    assert!(g4 > g3);
    // Several methods at once, in the order asked.
    raw.register_as(&b, &["g.other"], ms(1000)).await;
    let found = raw
        .providers_since(&["g.m", "g.other", "g.none"], &[Some(g4), None, Some(0)])
        .await;
    assert_eq!(found[0], Lookup::Unchanged);
    assert_eq!(changed(found[1].clone()).1, vec![b.clone()]);
    assert_eq!(found[2], Lookup::Unchanged);
    // A stale entry written by the test is a change too.
    broker.stale_entry(&config(&broker), "g.m", "stale", ms(1000));
    assert_eq!(
        changed(one(raw.providers_since(&["g.m"], &[Some(g4)]).await)).1,
        [a, NodeId::from("stale")]
    );
}
