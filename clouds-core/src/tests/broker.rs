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
