//! Node-to-node messages: order, the bounded queue, readers, limits.

use super::*;
use crate::Error;
use crate::testing::Broker;

#[tokio::test(start_paused = true)]
async fn messages_arrive_in_the_order_sent() {
    let broker = Broker::new();
    let sender = client(config(&broker)).await;
    let receiver = client(config(&broker)).await;
    for i in 0..200u32 {
        sender.send(receiver.id(), &i).await.expect("send");
    }
    let mut inbox = receiver.messages();
    for i in 0..200u32 {
        let message = inbox.next().await.expect("a message");
        assert_eq!(message.from(), sender.id());
        assert_eq!(message.decode::<u32>().expect("decode"), i);
    }
    assert!(inbox.try_next().is_none());
}

#[tokio::test(start_paused = true)]
async fn try_next_takes_only_what_has_arrived() {
    let broker = Broker::new();
    let sender = client(config(&broker)).await;
    let receiver = client(config(&broker)).await;
    let mut inbox = receiver.messages();
    assert!(inbox.try_next().is_none());
    sender.send(receiver.id(), &"one").await.expect("send");
    sender.send(receiver.id(), &"two").await.expect("send");
    settle().await;
    let texts: Vec<String> = std::iter::from_fn(|| inbox.try_next())
        .map(|m| m.decode().expect("decode"))
        .collect();
    assert_eq!(texts, ["one", "two"]);
    assert!(inbox.try_next().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_drops_the_newest_messages_and_counts_them() {
    let broker = Broker::new();
    let sender = client(config(&broker)).await;
    let receiver = client(config(&broker).message_buffer(4)).await;
    for i in 0..10u32 {
        // Delivered to the node: the sender cannot tell they are dropped there.
        sender.send(receiver.id(), &i).await.expect("send");
    }
    settle().await;
    assert_eq!(receiver.stats().dropped_messages, 6);
    let mut inbox = receiver.messages();
    let kept: Vec<u32> = std::iter::from_fn(|| inbox.try_next())
        .map(|m| m.decode().expect("decode"))
        .collect();
    assert_eq!(kept, [0, 1, 2, 3], "the oldest are kept");
    // Read, so there is room again.
    sender.send(receiver.id(), &10u32).await.expect("send");
    let next = inbox.next().await.expect("a message");
    assert_eq!(next.decode::<u32>().expect("decode"), 10);
    assert_eq!(receiver.stats().dropped_messages, 6);
}

#[tokio::test(start_paused = true)]
async fn handles_of_one_node_share_its_queue() {
    let broker = Broker::new();
    let sender = client(config(&broker)).await;
    let receiver = server(config(&broker)).await;
    let mut first = receiver.messages();
    let mut second = receiver.messages();
    for i in 0..4u32 {
        sender.send(receiver.id(), &i).await.expect("send");
    }
    let seen = [
        first
            .next()
            .await
            .expect("message")
            .decode::<u32>()
            .expect("decode"),
        second
            .next()
            .await
            .expect("message")
            .decode::<u32>()
            .expect("decode"),
        first
            .next()
            .await
            .expect("message")
            .decode::<u32>()
            .expect("decode"),
        second
            .next()
            .await
            .expect("message")
            .decode::<u32>()
            .expect("decode"),
    ];
    assert_eq!(seen, [0, 1, 2, 3], "each handed to one reader, in order");
    assert!(first.try_next().is_none() && second.try_next().is_none());
    receiver.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn after_close_readers_get_what_was_queued_then_none() {
    let broker = Broker::new();
    let sender = client(config(&broker)).await;
    let receiver = client(config(&broker)).await;
    for text in ["a", "b", "c"] {
        sender.send(receiver.id(), &text).await.expect("send");
    }
    settle().await;
    let mut inbox = receiver.messages();
    receiver.close().await;
    let mut got = Vec::new();
    while let Some(message) = inbox.next().await {
        got.push(message.decode::<String>().expect("decode"));
    }
    assert_eq!(got, ["a", "b", "c"]);
    assert!(matches!(
        sender.send(receiver.id(), &"late").await,
        Err(Error::Unreachable { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_waiting_reader_is_woken_by_a_message_and_by_close() {
    let broker = Broker::new();
    let sender = client(config(&broker)).await;
    let receiver = client(config(&broker)).await;
    let waiting = tokio::spawn({
        let mut inbox = receiver.messages();
        async move {
            let first = inbox
                .next()
                .await
                .map(|m| m.decode::<String>().expect("decode"));
            let second = inbox
                .next()
                .await
                .map(|m| m.decode::<String>().expect("decode"));
            (first, second)
        }
    });
    tokio::time::sleep(ms(50)).await;
    assert!(!waiting.is_finished());
    sender.send(receiver.id(), &"wake").await.expect("send");
    settle().await;
    assert!(!waiting.is_finished(), "waiting for the second message");
    receiver.close().await;
    let (first, second) = waiting.await.expect("join");
    assert_eq!(first.as_deref(), Some("wake"));
    assert_eq!(second, None);
}

#[tokio::test(start_paused = true)]
async fn a_node_can_message_itself_and_structured_bodies_round_trip() {
    let broker = Broker::new();
    let node = client(config(&broker)).await;
    let value = (String::from("order"), 42u64, vec![1.5f64, -2.0], Some(true));
    node.send(node.id(), &value).await.expect("send");
    let message = node.messages().next().await.expect("a message");
    assert_eq!(message.from(), node.id());
    assert_eq!(message.bytes(), encoded(&value).as_slice());
    assert_eq!(
        message
            .decode::<(String, u64, Vec<f64>, Option<bool>)>()
            .expect("decode"),
        value
    );
    match message.decode::<Vec<String>>() {
        Err(Error::Codec { action, .. }) => assert!(action.contains(node.id().as_str())),
        other => panic!("expected Codec, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_message_over_the_limit_fails_at_the_sender_or_is_dropped_by_the_receiver() {
    let broker = Broker::new();
    let small = client(config(&broker).max_body_size(1024)).await;
    let large = client(config(&broker)).await;
    let big = "q".repeat(2_000);
    match small.send(large.id(), &big).await {
        Err(Error::TooLarge { max, .. }) => assert_eq!(max, 1024),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // The other way round it goes out, and the smaller receiver drops it.
    large.send(small.id(), &big).await.expect("sent");
    large.send(small.id(), &"small").await.expect("sent");
    let message = small.messages().next().await.expect("the small one");
    assert_eq!(message.decode::<String>().expect("decode"), "small");
    assert_eq!(small.stats().oversized_frames, 1);
    assert!(small.messages().try_next().is_none());
}
