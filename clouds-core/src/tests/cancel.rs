//! Cancels (`docs/protocol.md` §3.13) in every way a call can travel and run: signed frames,
//! `spawn_handlers`, claimed arguments, batches of cancels; and cancels a server must ignore.

use super::*;

/// Registers `method` on `server`: it holds for its argument (ms) with a drop guard, and
/// returns how many of its handlers were dropped unfinished so far.
async fn holding(server: &Server, method: &str) -> Counter {
    struct Guard(Counter, bool);
    impl Guard {
        fn disarm(&mut self) {
            self.1 = false;
        }
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            if self.1 {
                self.0.bump();
            }
        }
    }
    let dropped = Counter::default();
    let counter = dropped.clone();
    server
        .register(method, move |(millis, _pad): (u64, Vec<u8>)| {
            let mut guard = Guard(counter.clone(), true);
            async move {
                tokio::time::sleep(ms(millis)).await;
                guard.disarm();
                Ok::<_, Infallible>(())
            }
        })
        .await
        .expect("register");
    dropped
}

/// Calls `method` holding a minute and gives up after `after`, `n` calls at once.
async fn give_up(client: &Client, method: &str, n: usize, pad: usize, after: Duration) {
    let calls = (0..n).map(|_| client.call::<_, ()>(method, (60_000u64, vec![7u8; pad])));
    let all = futures_util::future::join_all(calls);
    assert!(tokio::time::timeout(after, all).await.is_err());
}

/// Every handler dropped, at once (no time passes), and the server back to idle.
async fn all_dropped(server: &Server, dropped: &Counter, n: usize) {
    let given_up = tokio::time::Instant::now();
    eventually("the handlers are dropped", ms(1000), || async {
        dropped.get() == n
    })
    .await;
    assert!(
        given_up.elapsed() < ms(100),
        "took {:?}",
        given_up.elapsed()
    );
    assert_eq!(server.stats().in_flight, 0);
    assert_eq!(server.stats().cancelled_calls, n as u64);
    assert_eq!(server.stats().ignored_cancels, 0);
}

#[tokio::test(start_paused = true)]
async fn cancels_reach_handlers_signed_spawned_claimed_and_batched() {
    /// A name, how the config differs, calls given up at once, padding bytes per call.
    type Variant = (&'static str, fn(Config) -> Config, usize, usize);
    let variants: [Variant; 4] = [
        (
            "signed",
            |c| c.signing_key(1, *b"key one: thirty-two bytes long!!"),
            1,
            0,
        ),
        ("spawn_handlers", |c| c.spawn_handlers(true), 1, 0),
        // Arguments over the claim threshold travel as a claim: the handler runs in a task
        // from the start, after the fetch.
        ("claimed", |c| c.claim_threshold(1024), 1, 4096),
        // Many given up at once: their cancels go out batched.
        ("batched", |c| c, 40, 0),
    ];
    for (what, adjust, n, pad) in variants {
        let broker = Broker::new();
        let config = adjust(config(&broker));
        let provider = server(config.clone()).await;
        let dropped = holding(&provider, "c.hold").await;
        let caller = client(config).await;
        give_up(&caller, "c.hold", n, pad, ms(50)).await;
        all_dropped(&provider, &dropped, n).await;
        assert_eq!(caller.stats().cancels_sent, n as u64, "{what}");
        let stats = provider.stats();
        assert_eq!(
            (stats.unauthenticated_frames, stats.malformed_frames),
            (0, 0),
            "{what}"
        );
        assert!(broker.claims().is_empty(), "{what}: no claim left behind");
    }
}

#[tokio::test(start_paused = true)]
async fn cancels_for_calls_not_running_are_ignored_and_misrouted_ones_dropped() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let dropped = holding(&provider, "c.hold").await;
    let caller = client(config(&broker)).await;
    let running = {
        let caller = caller.clone();
        tokio::spawn(async move {
            caller
                .call::<_, ()>("c.hold", (200u64, Vec::<u8>::new()))
                .await
        })
    };
    eventually("the call runs", ms(100), || async {
        provider.stats().in_flight == 1
    })
    .await;
    let raw = RawPeer::connect(&broker, &config(&broker), 16);
    let calls = raw.calls(provider.id().as_str());
    // Another caller's id, an id never used, and a cancel on the inbox: none stops the call.
    raw.publish(
        calls.clone(),
        crate::codec::encode_cancel(0, raw.id.as_str()),
    )
    .await;
    raw.publish(
        calls.clone(),
        crate::codec::encode_cancel(999, caller.id().as_str()),
    )
    .await;
    raw.publish(
        raw.inbox(provider.id().as_str()),
        crate::codec::encode_cancel(0, caller.id().as_str()),
    )
    .await;
    settle().await;
    running.await.expect("join").expect("the call finishes");
    assert_eq!(dropped.get(), 0);
    let stats = provider.stats();
    assert_eq!(
        (
            stats.ignored_cancels,
            stats.misrouted_frames,
            stats.cancelled_calls
        ),
        (2, 1, 0)
    );
    // Finished: a cancel for it now is ignored too.
    raw.publish(calls, crate::codec::encode_cancel(0, caller.id().as_str()))
        .await;
    settle().await;
    assert_eq!(provider.stats().ignored_cancels, 3);
    assert_eq!(caller.stats().cancels_sent, 0);
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_spawns_its_work_finishes_it_anyway() {
    let broker = Broker::new();
    let provider = server(config(&broker)).await;
    let done = Counter::default();
    let counter = done.clone();
    provider
        .register("c.keep", move |(): ()| {
            let counter = counter.clone();
            async move {
                // The opt-out: the work runs in a task of its own, which a cancel does not
                // reach; the handler only waits for it.
                let work = tokio::spawn(async move {
                    tokio::time::sleep(ms(300)).await;
                    counter.bump();
                });
                let _ = work.await;
                Ok::<_, Infallible>(())
            }
        })
        .await
        .expect("register");
    let caller = client(config(&broker)).await;
    assert!(
        tokio::time::timeout(ms(50), caller.call::<_, ()>("c.keep", ()))
            .await
            .is_err()
    );
    eventually("the handler is cancelled", ms(100), || async {
        provider.stats().cancelled_calls == 1
    })
    .await;
    eventually("the spawned work finishes", ms(1000), || async {
        done.get() == 1
    })
    .await;
}

#[tokio::test]
async fn the_watch_table_holds_only_running_calls() {
    let d = crate::dispatch::Dispatcher::new(4, false);
    let caller = crate::envelope::WireStr::new(Bytes::from_static(b"client-a")).expect("utf-8");
    let first = d.watch(&caller, 1);
    // The same call delivered twice (a fault): two watches under one key.
    let twin = d.watch(&caller, 1);
    let other = d.watch(&caller, 2);
    assert_eq!(d.watched(), 2);
    drop(first);
    assert_eq!(d.watched(), 2, "the first to drop leaves its twin's entry");
    assert!(d.cancel(caller.clone(), 1));
    tokio::time::timeout(ms(100), twin.cancelled())
        .await
        .expect("cancelled");
    assert!(!d.cancel(caller.clone(), 1), "a call is cancelled once");
    drop(twin);
    drop(other);
    assert_eq!(d.watched(), 0);
    assert!(!d.cancel(caller, 2), "a finished call is not found");
}
