//! What a node does with what it receives: faulty deliveries, garbage, frames on the wrong
//! channel, events, and a receive loop that fell behind.

use std::convert::Infallible;

use tokio::time::Instant;

use super::*;
use crate::Error;
use crate::testing::{Broker, FrameFault};

#[tokio::test(start_paused = true)]
async fn a_duplicated_reply_is_taken_once_and_the_copy_counted_late() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "d.who", "d").await;
    let caller = client(config(&broker)).await;
    broker.fault_next_frame(caller.id(), FrameFault::Duplicate);
    assert_eq!(
        caller.call::<_, String>("d.who", ()).await.expect("call"),
        "d"
    );
    settle().await;
    let stats = caller.stats();
    assert_eq!(stats.late_replies, 1);
    assert_eq!(stats.pending_calls, 0);
    assert_eq!(calls.get(), 1);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_duplicated_call_runs_twice_and_its_second_reply_is_late() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "d.who", "d").await;
    let caller = client(config(&broker)).await;
    broker.fault_next_frame(provider.id(), FrameFault::Duplicate);
    assert_eq!(
        caller.call::<_, String>("d.who", ()).await.expect("call"),
        "d"
    );
    settle().await;
    assert_eq!(calls.get(), 2, "the server cannot tell the copy apart");
    assert_eq!(
        caller.stats().late_replies,
        1,
        "but the caller takes one reply"
    );
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_lost_call_times_out_and_the_retry_is_answered() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "l.who", "l").await;
    let caller = client(config(&broker)).await.with_retries(1);
    broker.fault_next_frame(provider.id(), FrameFault::Drop);
    let started = Instant::now();
    assert_eq!(
        caller
            .call::<_, String>("l.who", ())
            .await
            .expect("retried"),
        "l"
    );
    about(started.elapsed(), TIMEOUT);
    assert_eq!(calls.get(), 1, "the lost call never ran");
    // Without retries it is a timeout.
    broker.fault_next_frame(provider.id(), FrameFault::Drop);
    match caller
        .clone()
        .with_retries(0)
        .call::<_, String>("l.who", ())
        .await
    {
        Err(Error::Timeout { attempts, .. }) => assert_eq!(attempts, 1),
        other => panic!("expected Timeout, got {other:?}"),
    }
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_lost_reply_makes_the_retry_run_the_handler_again() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "l.who", "l").await;
    let caller = client(config(&broker)).await.with_retries(1);
    broker.fault_next_frame(caller.id(), FrameFault::Drop);
    assert_eq!(
        caller
            .call::<_, String>("l.who", ())
            .await
            .expect("retried"),
        "l"
    );
    assert_eq!(calls.get(), 2, "at-least-once after a timeout");
    assert_eq!(caller.stats().late_replies, 0);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_reply_delayed_past_the_timeout_is_counted_late() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "late.who", "late").await;
    let caller = client(config(&broker)).await.with_retries(1);
    broker.fault_next_frame(caller.id(), FrameFault::Delay(TIMEOUT + ms(300)));
    let started = Instant::now();
    assert_eq!(
        caller
            .call::<_, String>("late.who", ())
            .await
            .expect("retried"),
        "late"
    );
    about(started.elapsed(), TIMEOUT);
    assert_eq!(caller.stats().late_replies, 0, "not arrived yet");
    tokio::time::sleep(ms(301)).await;
    assert_eq!(caller.stats().late_replies, 1);
    assert_eq!(caller.stats().pending_calls, 0);
    assert_eq!(calls.get(), 2);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_reply_delayed_within_the_timeout_is_simply_slower() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "slow.who", "slow").await;
    let caller = client(config(&broker)).await.with_retries(1);
    broker.fault_next_frame(caller.id(), FrameFault::Delay(ms(200)));
    let started = Instant::now();
    assert_eq!(
        caller
            .call::<_, String>("slow.who", ())
            .await
            .expect("call"),
        "slow"
    );
    about(started.elapsed(), ms(200));
    tokio::time::sleep(TIMEOUT).await;
    assert_eq!(caller.stats().late_replies, 0);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn garbage_is_counted_as_malformed_and_the_node_carries_on() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "g.who", "g").await;
    let caller = client(config(&broker)).await;
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    let mut wrong_version = call_frame(1, "g.who", caller.id().as_str(), 100, &());
    // (Version 2 is the signed envelope: see `tests/signing.rs`.)
    wrong_version[0] = crate::PROTOCOL_VERSION + 2;
    let reply = crate::codec::encode_reply(1, Status::Ok, &encoded("x"));
    let truncated = reply.slice(..reply.len() - 2);
    let frames: Vec<Bytes> = vec![
        Bytes::new(),
        Bytes::from_static(b"\x01\xff\xff\xff"),
        Bytes::from(wrong_version),
        Bytes::from_static(b"hello, world"),
    ];
    let count = frames.len() as u64;
    for frame in frames {
        assert_eq!(raw.publish(raw.inbox(caller.id().as_str()), frame).await, 1);
    }
    // A reply cut short: no body is left.
    raw.publish(raw.inbox(caller.id().as_str()), truncated)
        .await;
    // And the same on a server's call channel.
    raw.publish(
        raw.calls(provider.id().as_str()),
        Bytes::from_static(b"\x00"),
    )
    .await;
    settle().await;
    assert_eq!(caller.stats().malformed_frames, count + 1);
    assert_eq!(provider.stats().malformed_frames, 1);
    assert_eq!(
        caller
            .call::<_, String>("g.who", ())
            .await
            .expect("still works"),
        "g"
    );
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn frames_on_the_wrong_channel_are_counted_as_misrouted_and_ignored() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let calls = answer_name(&provider, "m.who", "m").await;
    let caller = client(config(&broker)).await;
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    let inbox = raw.inbox(caller.id().as_str());
    let provider_calls = raw.calls(provider.id().as_str());
    // A call sent to a client's inbox.
    raw.publish(
        inbox.clone(),
        call_frame(1, "m.who", raw.id.as_str(), 100, &()),
    )
    .await;
    // A join announcement sent to an inbox instead of the events channel.
    raw.publish(
        inbox,
        crate::codec::encode_join(raw.id.as_str(), &["m.who".to_string()]),
    )
    .await;
    // A reply and a message sent to a server's call channel.
    raw.publish(
        provider_calls.clone(),
        crate::codec::encode_reply(0, Status::Ok, crate::codec::NIL),
    )
    .await;
    raw.publish(
        provider_calls,
        crate::codec::encode_message(raw.id.as_str(), &encoded("hi")),
    )
    .await;
    settle().await;
    assert_eq!(caller.stats().misrouted_frames, 2);
    assert_eq!(provider.stats().misrouted_frames, 2);
    assert_eq!(calls.get(), 0, "the stray call did not run");
    assert!(provider.messages().try_next().is_none());
    assert_eq!(caller.stats().pending_calls, 0);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_reply_nobody_waits_for_is_counted_late() {
    let broker = Broker::new();
    let caller = client(config(&broker)).await;
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    for id in [0, 42, u64::MAX] {
        let frame = crate::codec::encode_reply(id, Status::Ok, &encoded(&1u8));
        raw.publish(raw.inbox(caller.id().as_str()), frame).await;
    }
    settle().await;
    let stats = caller.stats();
    assert_eq!(stats.late_replies, 3);
    assert_eq!(stats.malformed_frames + stats.misrouted_frames, 0);
}

#[tokio::test(start_paused = true)]
async fn a_forged_leave_empties_the_cache_until_the_next_refresh() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "e.who", "e").await;
    let caller = client(config(&broker)).await.with_retries(0);
    assert_eq!(
        caller.call::<_, String>("e.who", ()).await.expect("call"),
        "e"
    );
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    let events = raw.events();
    // Every node hears the events channel: the provider, the caller.
    assert_eq!(
        raw.publish(events, crate::codec::encode_leave(provider.id().as_str()))
            .await,
        2
    );
    settle().await;
    assert!(matches!(
        caller.call::<_, String>("e.who", ()).await,
        Err(Error::NoProvider { .. })
    ));
    // The registry still lists it: the periodic refresh repairs the cache.
    tokio::time::sleep(HEARTBEAT).await;
    assert_eq!(
        caller.call::<_, String>("e.who", ()).await.expect("call"),
        "e"
    );
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_join_adds_a_provider_of_a_method_already_called() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "j.who", "server").await;
    let caller = client(config(&broker)).await.with_retries(0);
    assert_eq!(
        caller.call::<_, String>("j.who", ()).await.expect("call"),
        "server"
    );
    // A provider that announces itself without a registry entry.
    let mut joiner = RawPeer::connect(&broker, &config(&broker), 64);
    joiner.subscribe(&joiner.calls(joiner.id.as_str())).await;
    let events = joiner.events();
    let join = crate::codec::encode_join(
        joiner.id.as_str(),
        &["j.who".to_string(), "j.unknown".to_string()],
    );
    joiner.publish(events, join).await;
    settle().await;
    let calls = tokio::spawn({
        let caller = caller.clone();
        async move {
            let mut answers = Vec::new();
            for _ in 0..2 {
                answers.push(caller.call::<_, String>("j.who", ()).await.expect("call"));
            }
            answers
        }
    });
    // Round-robin over the two reaches it within two calls.
    let call = joiner.next_call().await;
    joiner.answer(&call, Status::Ok, &encoded("joiner")).await;
    let mut answers = calls.await.expect("join");
    answers.sort();
    assert_eq!(answers, ["joiner", "server"]);
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_receive_loop_that_fell_behind_counts_the_frames_it_lost() {
    let broker = Broker::new();
    // Keep one message: the count of dropped ones tells how many arrived.
    let receiver = client(config(&broker).message_buffer(1)).await;
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    let inbox = raw.inbox(receiver.id().as_str());
    let frame = Bytes::from(crate::codec::encode_message(
        raw.id.as_str(),
        &encoded(&0u8),
    ));
    // The broker buffers 16,384 frames per connection (the default `inbound_capacity`).
    const CAPACITY: u64 = 16_384;
    const LOST: u64 = 10;
    broker.freeze(receiver.id());
    for _ in 0..CAPACITY + LOST {
        raw.publish(inbox.clone(), frame.clone()).await;
    }
    broker.thaw(receiver.id());
    // The oldest are lost, as from fred's broadcast channel, and counted at the next read.
    settle().await;
    let stats = receiver.stats();
    assert_eq!(stats.lagged_frames, LOST);
    assert_eq!(
        stats.dropped_messages + 1,
        CAPACITY,
        "every frame that fit arrived (one kept, the rest dropped from the full queue)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_never_finishes_does_not_hold_up_other_calls() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    provider
        .register("h.hang", |(): ()| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(())
        })
        .await
        .expect("register");
    answer_name(&provider, "h.who", "h").await;
    let caller = client(config(&broker)).await.with_retries(0);
    let hung = tokio::spawn({
        let caller = caller.clone().with_timeout(ms(100));
        async move { caller.call::<_, ()>("h.hang", ()).await }
    });
    settle().await;
    for _ in 0..5 {
        assert_eq!(
            caller.call::<_, String>("h.who", ()).await.expect("call"),
            "h"
        );
    }
    assert!(matches!(
        hung.await.expect("join"),
        Err(Error::Timeout { .. })
    ));
    // The caller gave up at its timeout and said so: the hung handler is dropped.
    settle().await;
    assert_eq!(provider.stats().in_flight, 0, "cancelled");
    assert_eq!(provider.stats().cancelled_calls, 1);
}

#[tokio::test(start_paused = true)]
async fn an_expired_entry_leaves_the_cache_at_the_next_refresh() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    answer_name(&provider, "x.who", "server").await;
    let mut raw = RawPeer::connect(&broker, &config(&broker), 64);
    raw.subscribe(&raw.calls(raw.id.as_str())).await;
    let id = raw.id.clone();
    raw.register_as(&id, &["x.who"], HEARTBEAT * 3).await;
    let caller = client(config(&broker)).await.with_retries(0);
    let calls = tokio::spawn({
        let caller = caller.clone();
        async move {
            let mut answers = Vec::new();
            for _ in 0..2 {
                answers.push(caller.call::<_, String>("x.who", ()).await.expect("call"));
            }
            answers
        }
    });
    // Round-robin over the two reaches the raw provider within two calls.
    let first = raw.next_call().await;
    raw.answer(&first, Status::Ok, &encoded("raw")).await;
    let mut answers = calls.await.expect("join");
    answers.sort();
    assert_eq!(answers, ["raw", "server"]);
    // Nobody renews the raw entry, and nothing is announced: its call channel still listens,
    // so only the refresh (holding the list's generation) can learn that it expired.
    tokio::time::sleep(HEARTBEAT * 5).await;
    for _ in 0..4 {
        assert_eq!(
            caller.call::<_, String>("x.who", ()).await.expect("call"),
            "server"
        );
    }
    assert!(raw.try_recv().is_none(), "no call was sent to it");
    provider.shutdown().await.expect("shutdown");
}
