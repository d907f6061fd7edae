//! Natural batching: frames for one destination channel coalesced while a `PUBLISH` to it is
//! outstanding, with no timers.
//!
//! Each destination (a provider's call channel, a caller's inbox) has a *turn*. A frame sent
//! while nobody holds the turn takes it and goes out at once, alone, as itself. Frames sent
//! while the turn is held wait in the destination's queue; when the outstanding `PUBLISH` is
//! answered, the turn passes to a *flusher* task that publishes everything waiting as one
//! batch frame (`codec::encode_batch`, at most `codec::BATCH_MAX` bytes; a frame too large to
//! share goes alone), tells each frame's sender what its `PUBLISH` returned, and goes on until
//! the queue is empty. Two senders gather before they publish:
//!
//! - A call (`send_call`) that finds the turn free takes it. If no other call of the node
//!   waits for an answer, it publishes its frame at once, alone, and learns the outcome
//!   itself. Otherwise it queues its frame and yields, so calls woken together (a burst of
//!   callers answered by one batch of replies) join it; if none did, it publishes its frame
//!   alone; if some did, a flusher publishes them all. A call whose frame went in a batch
//!   is told only if that `PUBLISH` failed or reached nobody, through its pending slot
//!   ([`Sink::unsent`]): it waits once, for its answer, with no outcome channel of its own.
//! - The receive loop, which makes several replies to one caller in one pass, hands them over
//!   together (`send_all`): one run in the queue behind one waiter; if the turn was free it
//!   yields once, so frames made meanwhile join, and flushes them itself.
//!
//! So a batch's outcome is exactly each of its frames' outcome: a `PUBLISH` that reached
//! nobody reached none of them, one that failed failed for each of them. Frames keep their
//! order per destination. A call alone whose future is dropped before it ran never sends its
//! frame (it kept it). A sender dropped while its frame waits takes the frame out of the
//! next batch (of a run from `send_all`, only the last frame: replies whose sending was given
//! up may still go, and a caller ignores a late reply; a call from `send_call` still goes, its
//! caller's Cancel after it); one dropped while holding the turn hands it on from its `Drop`
//! (a flusher picks up what waits), so no destination's turn is ever stranded. Batches are
//! published by spawned flushers or by the receive loop's reply futures (dropped only when
//! given up after a command timeout, or at shutdown), never by a call's future, so a batch in
//! flight cannot be cancelled by a caller giving up.
//!
//! What publishing means (sealing, the transport) is the [`Sink`]'s: the node in production,
//! a recording fake in the tests below.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use foldhash::HashMap;
use tokio::sync::oneshot;

use crate::codec;
use crate::locks::lock;
use crate::transport::{Channel, TransportError};
use crate::yielding::yield_once;

/// Where an outbox's frames go.
pub(crate) trait Sink: Send + Sync + Sized + 'static {
    /// The outbox of this sink.
    fn outbox(&self) -> &Outbox;

    /// Publishes `frame` (one frame, or a batch) on `channel` as it goes on the wire (signed
    /// here, when frames are signed): how many subscribers received it. `timed`: bounded by
    /// the command timeout (else the caller bounds the wait).
    fn publish(
        &self,
        channel: Channel,
        frame: Bytes,
        timed: bool,
    ) -> impl Future<Output = Result<u64, TransportError>> + Send;

    /// Runs a flusher in the background (on the node's runtime; also called from `Drop`).
    fn spawn(&self, work: impl Future<Output = ()> + Send + 'static);

    /// How many calls of this node wait for their answer now (this one included): a call
    /// alone does not wait for others to join it (`send_call`).
    fn calls_waiting(&self) -> usize;

    /// Tells the call with pending id `id`, queued with [`send_call`], that the `PUBLISH`
    /// which carried it failed or reached nobody (`outcome`: the error, or `Ok(0)`).
    fn unsent(&self, id: u64, outcome: Result<u64, TransportError>);
}

/// The turns and queues of one node's destinations.
#[derive(Debug)]
pub(crate) struct Outbox {
    /// Off: every frame is published alone, as before batching.
    enabled: bool,
    /// Largest batch frame built, in bytes.
    cap: usize,
    /// Destinations whose turn is held (present) with the frames waiting for it. A
    /// destination leaves the map when its turn is given back with nothing waiting.
    turns: Mutex<HashMap<Channel, VecDeque<Waiting>>>,
}

/// A frame waiting for its destination's turn, and who to tell what became of it.
#[derive(Debug)]
struct Waiting {
    frame: Bytes,
    tell: Tell,
}

/// Who hears what became of a waiting frame's `PUBLISH`.
#[derive(Debug)]
enum Tell {
    /// Nobody: all but the last of frames sent together (`send_all`), whose sender waits
    /// for the last one only.
    Nobody,
    /// A sender waiting for the outcome, whatever it is.
    Sender(oneshot::Sender<Result<u64, TransportError>>),
    /// A call waiting for its reply in the pending table under this id (`send_call`): told
    /// only if the `PUBLISH` failed or reached nobody.
    Call(u64),
}

impl Tell {
    /// Whether nobody can hear any more (a sender that gave up).
    fn gave_up(&self) -> bool {
        matches!(self, Tell::Sender(done) if done.is_closed())
    }
}

impl Outbox {
    pub(crate) fn new(enabled: bool) -> Self {
        Outbox::with_cap(enabled, codec::BATCH_MAX)
    }

    pub(crate) fn with_cap(enabled: bool, cap: usize) -> Self {
        Outbox {
            enabled,
            cap,
            turns: Mutex::new(HashMap::default()),
        }
    }

    /// Destinations whose turn is held now.
    #[cfg(test)]
    fn busy(&self) -> usize {
        lock(&self.turns).len()
    }

    /// The next frames to publish for a held turn, at most `cap` bytes as a batch (a frame
    /// over that goes alone), skipping those whose sender gave up; empty (and the turn given
    /// back) if nothing waits.
    fn next(&self, channel: &Channel) -> Vec<Waiting> {
        let mut turns = lock(&self.turns);
        let Some(queue) = turns.get_mut(channel) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        let mut size = codec::BATCH_HEADER;
        while let Some(front) = queue.front() {
            if front.tell.gave_up() {
                queue.pop_front();
                continue;
            }
            let len = codec::batch_entry_len(front.frame.len());
            if !taken.is_empty() && size + len > self.cap {
                break;
            }
            size += len;
            taken.extend(queue.pop_front());
            if size > self.cap {
                break;
            }
        }
        if taken.is_empty() {
            turns.remove(channel);
        }
        taken
    }

    /// Gives the turn back, or to a flusher if frames wait for it.
    fn release<S: Sink>(sink: &Arc<S>, channel: &Channel) {
        let waiting = {
            let mut turns = lock(&sink.outbox().turns);
            // Removed first: nothing waits in the usual case, and this looks the channel up
            // once. Put back (still held, for the flusher) if frames wait.
            match turns.remove(channel) {
                Some(queue) if !queue.is_empty() => {
                    turns.insert(channel.clone(), queue);
                    true
                }
                _ => false,
            }
        };
        if waiting {
            sink.spawn(flush(sink.clone(), channel.clone()));
        }
    }
}

/// Publishes `frame` on `channel` through the outbox (see the module docs): resolves to how
/// many subscribers received the `PUBLISH` that carried it.
pub(crate) async fn send<S: Sink>(
    sink: &Arc<S>,
    channel: &Channel,
    frame: Bytes,
    timed: bool,
) -> Result<u64, TransportError> {
    let outbox = sink.outbox();
    if !outbox.enabled {
        return sink.publish(channel.clone(), frame, timed).await;
    }
    let waiting = {
        let mut turns = lock(&outbox.turns);
        match turns.get_mut(channel) {
            Some(queue) => {
                let (done, waiting) = oneshot::channel();
                queue.push_back(Waiting {
                    frame,
                    tell: Tell::Sender(done),
                });
                Err(waiting)
            }
            None => {
                turns.insert(channel.clone(), VecDeque::new());
                Ok(frame)
            }
        }
    };
    let frame = match waiting {
        Ok(frame) => frame,
        Err(waiting) => return outcome(waiting).await,
    };
    // This sender holds the turn; the guard hands it on however this future ends.
    let turn = Turn::new(sink, channel);
    let sent = sink.publish(channel.clone(), frame, timed).await;
    drop(turn);
    sent
}

/// What a call that sends through the outbox holds (`send_call`), when it has a future to run.
/// A held turn is a guard, made before the future: it hands the turn on (to a flusher, when
/// frames wait) however the future ends, polled or not.
enum Held<T> {
    /// Batching off: its frame, to publish alone.
    Off(Bytes),
    /// The turn, and its frame, to publish at once: the call was alone.
    Alone(Bytes, T),
    /// The turn, its frame queued behind it: others may join before it publishes.
    Gathering(T),
}

/// Most times a call holding a free turn yields for others to join (`send_call`).
const GATHER_ROUNDS: usize = 4;

/// Publishes a call's `frame` on `channel` through the outbox, for a call waiting in the
/// pending table under `id`. If the turn was held, the frame joins `channel`'s queue and that
/// is all (`None`, no future to run). If it was free, this sender takes it and gets a future
/// to run at once. A call alone (no other call of the node waits for an answer) keeps its
/// frame, and the future publishes it and resolves to what that `PUBLISH` returned; dropped
/// before it ran, the frame is never sent. Otherwise the frame joins the queue and the future
/// yields, so that calls made meanwhile (a burst of callers woken together) join: if none
/// did, it publishes the frame alone and resolves to what that `PUBLISH` returned; if some
/// did, a flusher publishes them all as one batch and it resolves to `None` (dropped before
/// it ran, its frame still goes, with the batch). A call whose frame went in a batch hears of
/// its `PUBLISH` only if that failed or reached nobody ([`Sink::unsent`], which answers its
/// pending slot): so a call at load waits once, for its answer, with no outcome channel nor
/// future of its own here. A batch is never published from a call's future, so a caller
/// giving up cannot cancel other calls' frames.
///
/// Unlike [`send`], a queued call is sent even if its caller gives up meanwhile (nothing
/// here knows): a caller that gave up after queueing tells the provider with a Cancel,
/// which follows the call on the same channel.
pub(crate) fn send_call<'a, S: Sink>(
    sink: &'a Arc<S>,
    channel: &'a Channel,
    frame: Bytes,
    id: u64,
) -> Option<impl Future<Output = Option<Result<u64, TransportError>>> + Send + 'a> {
    let outbox = sink.outbox();
    // A call that finds the turn free takes it. Alone (no other call of this node waits for
    // an answer), it keeps its frame and publishes it at once: nothing queued, no yield
    // (which can wake an idle worker to take this task over: that costs a lone call more
    // than it could gain). Otherwise its frame is queued and it gathers (`Held::Gathering`).
    let held = if outbox.enabled {
        let mut turns = lock(&outbox.turns);
        if let Some(queue) = turns.get_mut(channel) {
            // The usual case at load: no future to run, nothing more to wait for here.
            queue.push_back(Waiting {
                frame,
                tell: Tell::Call(id),
            });
            return None;
        }
        // Asked only of a call that takes the turn (the pending table's lock is never held
        // while the outbox's is taken, so this order cannot deadlock).
        if sink.calls_waiting() <= 1 {
            turns.insert(channel.clone(), VecDeque::new());
            Held::Alone(frame, Turn::new(sink, channel))
        } else {
            let waiting = Waiting {
                frame,
                tell: Tell::Call(id),
            };
            turns.insert(channel.clone(), VecDeque::from([waiting]));
            Held::Gathering(Turn::new(sink, channel))
        }
    } else {
        Held::Off(frame)
    };
    Some(async move {
        let (frame, turn) = match held {
            Held::Off(frame) => (frame, None),
            Held::Alone(frame, turn) => (frame, Some(turn)),
            Held::Gathering(turn) => {
                // Let the calls runnable now join; again while they keep coming (a burst
                // woken together spreads over the workers), at most a few times.
                let mut queued = 1;
                for _ in 0..GATHER_ROUNDS {
                    yield_once().await;
                    let now = lock(&outbox.turns).get(channel).map_or(0, VecDeque::len);
                    if now == queued {
                        break;
                    }
                    queued = now;
                }
                let alone = {
                    let mut turns = lock(&outbox.turns);
                    match turns.get_mut(channel) {
                        // Only this call's frame waits (nobody else takes from a held
                        // turn's queue).
                        Some(queue) if queue.len() == 1 => queue.pop_front(),
                        _ => None,
                    }
                };
                // Others joined: the guard hands the turn to a flusher for the batch.
                (alone?.frame, Some(turn))
            }
        };
        let sent = sink.publish(channel.clone(), frame, false).await;
        drop(turn);
        Some(sent)
    })
}

/// Publishes `frames` (not empty), made together for `channel`, through the outbox: the
/// receive loop's replies of one pass to one caller. They join the queue as one run, in
/// order, behind one waiter; if the turn was free, this sender holds it and yields once (so
/// frames made meanwhile for the channel join too), then publishes the queue itself, batch
/// after batch, until it is empty. Resolves to the outcome of the `PUBLISH` that carried the
/// last of `frames` (the receive loop only logs it).
///
/// One future, one waiter and one queue lock per caller and pass instead of one per frame.
pub(crate) async fn send_all<S: Sink>(
    sink: &Arc<S>,
    channel: &Channel,
    frames: Vec<Bytes>,
) -> Result<u64, TransportError> {
    let outbox = sink.outbox();
    if !outbox.enabled {
        let sends = frames
            .into_iter()
            .map(|frame| sink.publish(channel.clone(), frame, false));
        let all = futures_util::future::join_all(sends).await;
        return all.into_iter().last().unwrap_or(Ok(0));
    }
    let (done, waiting) = oneshot::channel();
    let free = {
        let mut turns = lock(&outbox.turns);
        let free = !turns.contains_key(channel);
        let queue = turns.entry(channel.clone()).or_default();
        let last = frames.len().saturating_sub(1);
        let mut done = Some(done);
        for (n, frame) in frames.into_iter().enumerate() {
            let tell = match done.take_if(|_| n == last) {
                Some(done) => Tell::Sender(done),
                None => Tell::Nobody,
            };
            queue.push_back(Waiting { frame, tell });
        }
        free
    };
    if free {
        // The guard hands the turn on if this future is dropped while flushing.
        let turn = Turn::new(sink, channel);
        yield_once().await;
        flush_held(sink, channel).await;
        // `flush_held` gave the turn back with the queue empty: someone else may hold it by
        // now, so the guard must not release it again.
        turn.disarm();
    }
    outcome(waiting).await
}

/// What became of a frame that waited for its turn.
async fn outcome(
    waiting: oneshot::Receiver<Result<u64, TransportError>>,
) -> Result<u64, TransportError> {
    waiting.await.unwrap_or_else(|_| {
        Err(TransportError::Command {
            command: "PUBLISH",
            reason: "the node stopped before the frame was sent".into(),
        })
    })
}

/// A held turn: given back (or to a flusher) when dropped, unless disarmed.
struct Turn<'a, S: Sink> {
    sink: &'a Arc<S>,
    channel: &'a Channel,
    armed: bool,
}

impl<'a, S: Sink> Turn<'a, S> {
    fn new(sink: &'a Arc<S>, channel: &'a Channel) -> Self {
        Turn {
            sink,
            channel,
            armed: true,
        }
    }

    /// The turn was given back already.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl<S: Sink> Drop for Turn<'_, S> {
    fn drop(&mut self) {
        if self.armed {
            Outbox::release(self.sink, self.channel);
        }
    }
}

/// Holds `channel`'s turn until nothing waits for it: publishes what waits, batch after batch,
/// and tells each frame's sender how its `PUBLISH` went.
async fn flush<S: Sink>(sink: Arc<S>, channel: Channel) {
    flush_held(&sink, &channel).await;
}

/// The work of [`flush`], for a holder of `channel`'s turn; returns once the turn is given
/// back (the queue was empty).
async fn flush_held<S: Sink>(sink: &Arc<S>, channel: &Channel) {
    loop {
        let taken = sink.outbox().next(channel);
        let frame = match taken.as_slice() {
            [] => return,
            [one] => one.frame.clone(),
            many => codec::encode_batch(many.iter().map(|w| &w.frame[..])),
        };
        let sent = sink.publish(channel.clone(), frame, true).await;
        let delivered = matches!(sent, Ok(n) if n > 0);
        for waiting in taken {
            match waiting.tell {
                Tell::Nobody => {}
                Tell::Sender(done) => {
                    let _ = done.send(sent.clone());
                }
                Tell::Call(_) if delivered => {}
                Tell::Call(id) => sink.unsent(id, sent.clone()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Records what was published; publishes wait until `gate` opens, and fail while `fail`.
    struct Fake {
        outbox: Outbox,
        published: Mutex<Vec<(Channel, Bytes)>>,
        gate: tokio::sync::Semaphore,
        fail: AtomicBool,
        receivers: u64,
        /// The calls told their `PUBLISH` failed or reached nobody (`Sink::unsent`).
        unsent: Mutex<Vec<(u64, Result<u64, TransportError>)>>,
        /// What `Sink::calls_waiting` says.
        calls_waiting: std::sync::atomic::AtomicUsize,
    }

    impl Fake {
        fn new(cap: usize, receivers: u64) -> Arc<Fake> {
            Arc::new(Fake {
                outbox: Outbox::with_cap(true, cap),
                published: Mutex::new(Vec::new()),
                gate: tokio::sync::Semaphore::new(0),
                fail: AtomicBool::new(false),
                receivers,
                unsent: Mutex::new(Vec::new()),
                calls_waiting: std::sync::atomic::AtomicUsize::new(64),
            })
        }

        /// The frames of each publish, a batch split into its entries.
        fn publishes(&self) -> Vec<Vec<Bytes>> {
            lock(&self.published)
                .iter()
                .map(|(_, frame)| match codec::split_batch(frame) {
                    Some(entries) => entries.expect("a well-formed batch"),
                    None => vec![frame.clone()],
                })
                .collect()
        }
    }

    impl Sink for Fake {
        fn outbox(&self) -> &Outbox {
            &self.outbox
        }

        async fn publish(
            &self,
            channel: Channel,
            frame: Bytes,
            _timed: bool,
        ) -> Result<u64, TransportError> {
            self.gate.acquire().await.expect("open").forget();
            lock(&self.published).push((channel, frame));
            if self.fail.load(Ordering::SeqCst) {
                return Err(TransportError::Command {
                    command: "PUBLISH",
                    reason: "injected".into(),
                });
            }
            Ok(self.receivers)
        }

        fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
            tokio::spawn(work);
        }

        fn unsent(&self, id: u64, outcome: Result<u64, TransportError>) {
            lock(&self.unsent).push((id, outcome));
        }

        fn calls_waiting(&self) -> usize {
            self.calls_waiting.load(Ordering::SeqCst)
        }
    }

    fn frame(n: u8, len: usize) -> Bytes {
        Bytes::from(vec![n; len])
    }

    /// Sends `frame` on `ch` from a task of its own.
    fn spawn_send(
        fake: &Arc<Fake>,
        ch: &Channel,
        frame: Bytes,
    ) -> tokio::task::JoinHandle<Result<u64, TransportError>> {
        let (fake, ch) = (fake.clone(), ch.clone());
        tokio::spawn(async move { send(&fake, &ch, frame, false).await })
    }

    /// A sink whose node has one call waiting for an answer (the one about to send), and
    /// the channel it sends on: a call that takes the turn is alone.
    fn alone() -> (Arc<Fake>, Channel) {
        let fake = Fake::new(1024, 1);
        fake.calls_waiting.store(1, Ordering::SeqCst);
        (fake, Channel::from("a"))
    }

    /// Lets spawned tasks and queued senders run until nothing moves.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_frame_alone_goes_as_itself() {
        let fake = Fake::new(1024, 1);
        fake.gate.add_permits(1);
        let ch = Channel::from("a");
        assert_eq!(send(&fake, &ch, frame(1, 10), false).await, Ok(1));
        assert_eq!(fake.publishes(), vec![vec![frame(1, 10)]]);
        assert_eq!(fake.outbox.busy(), 0, "the turn is given back");
    }

    #[tokio::test]
    async fn frames_waiting_go_as_one_batch_in_order() {
        let fake = Fake::new(1024, 3);
        let ch = Channel::from("a");
        let mut tasks = tokio::task::JoinSet::new();
        // The first takes the turn and waits at the gate with its frame alone...
        {
            let fake = fake.clone();
            let ch = ch.clone();
            tasks.spawn(async move { send(&fake, &ch, frame(0, 10), false).await });
        }
        settle().await;
        // ...so the next ones wait for it, in order.
        for n in 1..=5u8 {
            let fake = fake.clone();
            let ch = ch.clone();
            tasks.spawn(async move { send(&fake, &ch, frame(n, 10), false).await });
            settle().await;
        }
        fake.gate.add_permits(10);
        while let Some(sent) = tasks.join_next().await {
            assert_eq!(
                sent.expect("no panic"),
                Ok(3),
                "each learns the batch's receivers"
            );
        }
        let expected: Vec<Bytes> = (1..=5).map(|n| frame(n, 10)).collect();
        assert_eq!(fake.publishes(), vec![vec![frame(0, 10)], expected]);
        assert_eq!(fake.outbox.busy(), 0);
    }

    #[tokio::test]
    async fn destinations_do_not_wait_for_each_other() {
        let fake = Fake::new(1024, 1);
        let (a, b) = (Channel::from("a"), Channel::from("b"));
        let first = {
            let (fake, a) = (fake.clone(), a.clone());
            tokio::spawn(async move { send(&fake, &a, frame(1, 4), false).await })
        };
        settle().await;
        let other = {
            let (fake, b) = (fake.clone(), b.clone());
            tokio::spawn(async move { send(&fake, &b, frame(2, 4), false).await })
        };
        settle().await;
        assert_eq!(fake.outbox.busy(), 2, "each destination holds its own turn");
        fake.gate.add_permits(2);
        assert_eq!(first.await.expect("ran"), Ok(1));
        assert_eq!(other.await.expect("ran"), Ok(1));
        assert_eq!(fake.publishes().len(), 2);
    }

    #[tokio::test]
    async fn the_cap_is_respected_and_a_large_frame_goes_alone() {
        let cap = 100;
        let fake = Fake::new(cap, 1);
        let ch = Channel::from("a");
        let mut tasks = tokio::task::JoinSet::new();
        let lens = [10usize, 30, 30, 30, 30, 500, 30, 30];
        for (n, len) in lens.iter().enumerate() {
            let (fake, ch) = (fake.clone(), ch.clone());
            let f = frame(n as u8, *len);
            tasks.spawn(async move { send(&fake, &ch, f, false).await });
            settle().await;
        }
        fake.gate.add_permits(100);
        while let Some(sent) = tasks.join_next().await {
            assert_eq!(sent.expect("no panic"), Ok(1));
        }
        let published = lock(&fake.published).clone();
        let mut seen = Vec::new();
        for (_, frame) in &published {
            assert!(
                frame.len() <= cap || codec::split_batch(frame).is_none(),
                "a batch over the cap: {} bytes",
                frame.len()
            );
            match codec::split_batch(frame) {
                Some(entries) => seen.extend(entries.expect("well-formed")),
                None => seen.push(frame.clone()),
            }
        }
        let expected: Vec<Bytes> = lens
            .iter()
            .enumerate()
            .map(|(n, len)| frame(n as u8, *len))
            .collect();
        assert_eq!(seen, expected, "every frame once, in order");
        assert!(
            published.iter().any(|(_, f)| f.len() == 500),
            "the large frame went alone, as itself"
        );
    }

    #[tokio::test]
    async fn a_failed_publish_fails_exactly_the_frames_it_carried() {
        let fake = Fake::new(1024, 1);
        let ch = Channel::from("a");
        let first = spawn_send(&fake, &ch, frame(0, 8));
        settle().await;
        let mut batch = Vec::new();
        for n in 1..=3u8 {
            batch.push(spawn_send(&fake, &ch, frame(n, 8)));
            settle().await;
        }
        // The first PUBLISH succeeds; the batch behind it fails.
        fake.gate.add_permits(1);
        assert_eq!(first.await.expect("ran"), Ok(1));
        fake.fail.store(true, Ordering::SeqCst);
        fake.gate.add_permits(1);
        for sent in batch {
            assert!(sent.await.expect("ran").is_err());
        }
        // The next frame starts a turn of its own and goes out.
        fake.fail.store(false, Ordering::SeqCst);
        fake.gate.add_permits(1);
        assert_eq!(send(&fake, &ch, frame(9, 8), false).await, Ok(1));
        assert_eq!(fake.publishes().len(), 3);
    }

    #[tokio::test]
    async fn a_dropped_turn_holder_hands_the_turn_on() {
        let fake = Fake::new(1024, 1);
        let ch = Channel::from("a");
        // The holder waits at the gate with its own PUBLISH; then it is dropped (cancelled).
        let holder = spawn_send(&fake, &ch, frame(0, 8));
        settle().await;
        let waiter = spawn_send(&fake, &ch, frame(1, 8));
        settle().await;
        holder.abort();
        assert!(holder.await.is_err(), "cancelled");
        fake.gate.add_permits(1);
        assert_eq!(waiter.await.expect("ran"), Ok(1), "not stranded");
        assert_eq!(fake.publishes(), vec![vec![frame(1, 8)]]);
        assert_eq!(fake.outbox.busy(), 0);
    }

    #[tokio::test]
    async fn a_dropped_waiter_is_left_out_and_the_rest_go() {
        let fake = Fake::new(1024, 1);
        let ch = Channel::from("a");
        let holder = spawn_send(&fake, &ch, frame(0, 8));
        settle().await;
        let mut waiters = Vec::new();
        for n in 1..=3u8 {
            waiters.push(spawn_send(&fake, &ch, frame(n, 8)));
            settle().await;
        }
        let gone = waiters.remove(1);
        gone.abort();
        let _ = gone.await;
        fake.gate.add_permits(2);
        assert_eq!(holder.await.expect("ran"), Ok(1));
        for waiter in waiters {
            assert_eq!(waiter.await.expect("ran"), Ok(1));
        }
        assert_eq!(
            fake.publishes(),
            vec![vec![frame(0, 8)], vec![frame(1, 8), frame(3, 8)]]
        );
        assert_eq!(fake.outbox.busy(), 0);
    }

    #[tokio::test]
    async fn every_waiter_dropped_gives_the_turn_back() {
        let fake = Fake::new(1024, 1);
        let ch = Channel::from("a");
        let holder = spawn_send(&fake, &ch, frame(0, 8));
        settle().await;
        let waiter = spawn_send(&fake, &ch, frame(1, 8));
        settle().await;
        waiter.abort();
        let _ = waiter.await;
        holder.abort();
        let _ = holder.await;
        settle().await;
        assert_eq!(fake.outbox.busy(), 0, "nothing holds the turn");
        fake.gate.add_permits(1);
        assert_eq!(send(&fake, &ch, frame(2, 8), false).await, Ok(1));
    }

    #[tokio::test]
    async fn frames_made_together_share_the_first_publish() {
        // Senders polled in one go (like the receive loop's replies): the first yields once
        // before publishing, so the others join it.
        let fake = Fake::new(1024, 1);
        fake.gate.add_permits(10);
        let ch = Channel::from("a");
        let sends = (0..4u8).map(|n| send_all(&fake, &ch, vec![frame(n, 8)]));
        let all = futures_util::future::join_all(sends).await;
        assert!(all.iter().all(|s| *s == Ok(1)));
        assert_eq!(
            fake.publishes(),
            vec![(0..4u8).map(|n| frame(n, 8)).collect::<Vec<_>>()]
        );
    }

    #[tokio::test]
    async fn a_run_of_frames_waits_behind_the_turn_and_goes_as_one_batch() {
        let fake = Fake::new(1024, 2);
        let ch = Channel::from("a");
        let first = spawn_send(&fake, &ch, frame(0, 8));
        settle().await;
        let run = {
            let (fake, ch) = (fake.clone(), ch.clone());
            let frames = (1..=4u8).map(|n| frame(n, 8)).collect();
            tokio::spawn(async move { send_all(&fake, &ch, frames).await })
        };
        settle().await;
        fake.gate.add_permits(10);
        assert_eq!(first.await.expect("ran"), Ok(2));
        assert_eq!(
            run.await.expect("ran"),
            Ok(2),
            "the run learns its batch's outcome"
        );
        let rest: Vec<Bytes> = (1..=4u8).map(|n| frame(n, 8)).collect();
        assert_eq!(fake.publishes(), vec![vec![frame(0, 8)], rest]);
        assert_eq!(fake.outbox.busy(), 0);
    }

    #[tokio::test]
    async fn a_run_that_finds_the_turn_free_flushes_itself_and_gives_it_back() {
        let fake = Fake::new(1024, 1);
        fake.gate.add_permits(10);
        let ch = Channel::from("a");
        let frames = (0..3u8).map(|n| frame(n, 8)).collect();
        assert_eq!(send_all(&fake, &ch, frames).await, Ok(1));
        assert_eq!(fake.outbox.busy(), 0, "the turn is given back");
        assert_eq!(send(&fake, &ch, frame(9, 8), false).await, Ok(1));
        let run: Vec<Bytes> = (0..3u8).map(|n| frame(n, 8)).collect();
        assert_eq!(fake.publishes(), vec![run, vec![frame(9, 8)]]);
    }

    #[tokio::test]
    async fn a_run_dropped_while_flushing_hands_the_turn_on() {
        let fake = Fake::new(1024, 1);
        let ch = Channel::from("a");
        let run = {
            let (fake, ch) = (fake.clone(), ch.clone());
            let frames = (0..2u8).map(|n| frame(n, 8)).collect();
            tokio::spawn(async move { send_all(&fake, &ch, frames).await })
        };
        settle().await;
        let later = spawn_send(&fake, &ch, frame(7, 8));
        settle().await;
        // The run holds the turn, its batch stuck at the gate; dropping it must not strand the
        // frame waiting behind it.
        run.abort();
        assert!(run.await.is_err(), "aborted");
        fake.gate.add_permits(10);
        assert_eq!(later.await.expect("ran"), Ok(1));
        assert_eq!(fake.publishes(), vec![vec![frame(7, 8)]]);
        assert_eq!(fake.outbox.busy(), 0);
    }

    #[tokio::test]
    async fn off_publishes_each_frame_alone() {
        let fake = Arc::new(Fake {
            outbox: Outbox::new(false),
            ..Arc::into_inner(Fake::new(1024, 1)).expect("one handle")
        });
        fake.gate.add_permits(10);
        let ch = Channel::from("a");
        let sends = (0..4u8).map(|n| send(&fake, &ch, frame(n, 8), false));
        futures_util::future::join_all(sends).await;
        assert_eq!(fake.publishes().len(), 4);
    }

    /// `send_call` and its future, run: what the client does.
    async fn call(
        fake: &Arc<Fake>,
        ch: &Channel,
        frame: Bytes,
        id: u64,
    ) -> Option<Result<u64, TransportError>> {
        match send_call(fake, ch, frame, id) {
            Some(publishing) => publishing.await,
            None => None,
        }
    }

    /// Sends call `id`'s frame with `send_call` from a task of its own.
    fn spawn_call(
        fake: &Arc<Fake>,
        ch: &Channel,
        frame: Bytes,
        id: u64,
    ) -> tokio::task::JoinHandle<Option<Result<u64, TransportError>>> {
        let (fake, ch) = (fake.clone(), ch.clone());
        tokio::spawn(async move { call(&fake, &ch, frame, id).await })
    }

    #[tokio::test]
    async fn a_call_alone_publishes_itself_and_hears_its_outcome() {
        let fake = Fake::new(1024, 2);
        fake.gate.add_permits(1);
        let ch = Channel::from("a");
        assert_eq!(call(&fake, &ch, frame(1, 10), 7).await, Some(Ok(2)));
        assert_eq!(fake.publishes(), vec![vec![frame(1, 10)]]);
        assert_eq!(fake.outbox.busy(), 0, "the turn is given back");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_made_together_go_as_one_batch_and_hear_nothing_when_delivered() {
        let fake = Fake::new(1024, 2);
        let ch = Channel::from("a");
        // Spawned before any runs: the first takes the turn and yields, the others join.
        let calls: Vec<_> = (0..4u8)
            .map(|n| spawn_call(&fake, &ch, frame(n, 10), u64::from(n)))
            .collect();
        fake.gate.add_permits(10);
        for call in calls {
            assert_eq!(call.await.expect("ran"), None, "each went in the batch");
        }
        settle().await;
        let batch: Vec<Bytes> = (0..4).map(|n| frame(n, 10)).collect();
        assert_eq!(fake.publishes(), vec![batch]);
        assert!(
            lock(&fake.unsent).is_empty(),
            "a delivered batch tells nobody"
        );
        assert_eq!(fake.outbox.busy(), 0);
    }

    #[tokio::test]
    async fn calls_queued_behind_the_turn_hear_of_a_batch_that_reached_nobody_or_failed() {
        for (receivers, fail, expected) in [
            (0, false, Ok(0)),
            (
                1,
                true,
                Err(TransportError::Command {
                    command: "PUBLISH",
                    reason: "injected".into(),
                }),
            ),
        ] {
            let fake = Fake::new(1024, receivers);
            let ch = Channel::from("a");
            // A plain frame holds the turn at the gate...
            let holder = spawn_send(&fake, &ch, frame(9, 10));
            settle().await;
            // ...so these calls queue behind it.
            let calls = [spawn_call(&fake, &ch, frame(1, 10), 1), {
                let call = spawn_call(&fake, &ch, frame(2, 10), 2);
                settle().await;
                call
            }];
            fake.fail.store(fail, Ordering::SeqCst);
            fake.gate.add_permits(10);
            assert_eq!(holder.await.expect("ran"), expected);
            for call in calls {
                assert_eq!(call.await.expect("ran"), None);
            }
            settle().await;
            let told = lock(&fake.unsent).clone();
            assert_eq!(
                told,
                vec![(1, expected.clone()), (2, expected.clone())],
                "exactly the calls the batch carried"
            );
            assert_eq!(fake.outbox.busy(), 0);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_dropped_while_holding_the_turn_hands_it_on_with_its_frame() {
        let fake = Fake::new(1024, 1);
        let ch = Channel::from("a");
        let (fake2, ch2) = (fake.clone(), ch.clone());
        let mut call = Box::pin(async move { call(&fake2, &ch2, frame(0, 10), 1).await });
        // Polled once: it takes the turn and yields; then it is dropped.
        assert!(futures_util::poll!(call.as_mut()).is_pending());
        assert_eq!(fake.outbox.busy(), 1);
        drop(call);
        fake.gate.add_permits(10);
        settle().await;
        assert_eq!(
            fake.publishes(),
            vec![vec![frame(0, 10)]],
            "a flusher sends the frame"
        );
        assert_eq!(fake.outbox.busy(), 0);
    }

    #[tokio::test]
    async fn off_a_call_publishes_its_frame_alone() {
        let fake = Arc::new(Fake {
            outbox: Outbox::with_cap(false, 1024),
            ..Arc::into_inner(Fake::new(1024, 1)).expect("one owner")
        });
        let ch = Channel::from("a");
        fake.gate.add_permits(1);
        assert_eq!(call(&fake, &ch, frame(3, 4), 1).await, Some(Ok(1)));
        assert_eq!(fake.publishes(), vec![vec![frame(3, 4)]]);
        assert_eq!(fake.outbox.busy(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_alone_publishes_without_yielding() {
        let (fake, ch) = alone();
        let (fake2, ch2) = (fake.clone(), ch.clone());
        let mut call = Box::pin(async move { call(&fake2, &ch2, frame(0, 10), 1).await });
        // First poll: it reaches the PUBLISH (waiting at the gate) without yielding first.
        assert!(futures_util::poll!(call.as_mut()).is_pending());
        assert_eq!(fake.gate.available_permits(), 0);
        assert!(
            lock(&fake.outbox.turns)
                .get(&ch)
                .is_some_and(VecDeque::is_empty),
            "its frame went to its own PUBLISH, never through the queue"
        );
        fake.gate.add_permits(1);
        assert_eq!(call.await, Some(Ok(1)));
    }

    #[tokio::test]
    async fn a_lone_call_dropped_before_it_ran_sends_nothing_and_frees_the_turn() {
        // A call alone keeps its frame in its future: given up before that future ran, the
        // call was never sent (and so needs no Cancel), and the turn is free again.
        let (fake, ch) = alone();
        let publishing = send_call(&fake, &ch, frame(0, 10), 1).expect("the turn was free");
        assert_eq!(fake.outbox.busy(), 1, "held until the future ends");
        drop(publishing);
        assert_eq!(fake.outbox.busy(), 0);
        fake.gate.add_permits(10);
        let later = send_call(&fake, &ch, frame(1, 10), 2).expect("the turn is free again");
        assert_eq!(later.await, Some(Ok(1)));
        assert_eq!(fake.publishes(), vec![vec![frame(1, 10)]]);
    }

    #[tokio::test]
    async fn a_lone_call_holding_the_turn_hands_it_on_to_those_queued_behind() {
        let (fake, ch) = alone();
        let (fake2, ch2) = (fake.clone(), ch.clone());
        let mut first = Box::pin(async move { call(&fake2, &ch2, frame(0, 10), 1).await });
        assert!(
            futures_util::poll!(first.as_mut()).is_pending(),
            "at the gate"
        );
        // Two more, queued behind the held turn (no future of their own).
        assert_eq!(send_call(&fake, &ch, frame(1, 10), 2).map(|_| ()), None);
        assert_eq!(send_call(&fake, &ch, frame(2, 10), 3).map(|_| ()), None);
        fake.gate.add_permits(10);
        assert_eq!(first.await, Some(Ok(1)));
        settle().await;
        assert_eq!(
            fake.publishes(),
            vec![vec![frame(0, 10)], vec![frame(1, 10), frame(2, 10)]],
            "the lone call's frame alone, then the queue as one batch, in order"
        );
        assert_eq!(fake.outbox.busy(), 0);
    }

    #[tokio::test]
    async fn a_lone_call_dropped_before_it_ran_hands_the_turn_to_those_queued_behind() {
        let (fake, ch) = alone();
        let lone = send_call(&fake, &ch, frame(0, 10), 1).expect("the turn was free");
        assert_eq!(send_call(&fake, &ch, frame(1, 10), 2).map(|_| ()), None);
        drop(lone);
        fake.gate.add_permits(10);
        settle().await;
        assert_eq!(fake.publishes(), vec![vec![frame(1, 10)]]);
        assert_eq!(fake.outbox.busy(), 0);
    }

    #[tokio::test]
    async fn a_call_future_never_polled_hands_the_turn_on_with_its_frame() {
        let fake = Fake::new(1024, 1);
        let ch = Channel::from("a");
        let publishing = send_call(&fake, &ch, frame(0, 10), 1).expect("the turn was free");
        assert_eq!(send_call(&fake, &ch, frame(1, 10), 2).map(|_| ()), None);
        drop(publishing);
        fake.gate.add_permits(10);
        settle().await;
        assert_eq!(fake.publishes(), vec![vec![frame(0, 10), frame(1, 10)]]);
        assert_eq!(fake.outbox.busy(), 0);
    }
}
