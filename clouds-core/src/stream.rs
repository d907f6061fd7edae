//! Streaming methods: a call answered by many items over time (`docs/protocol.md` §3.14).
//!
//! A stream opens as a call: the provider answers the Call with a Reply of status `Stream`,
//! then sends Item frames (kind 10) numbered 0, 1, 2, ... to the caller's inbox, and ends it
//! with a final Reply (status Ok with the number of items sent, or an error). The caller
//! grants credit with Credit frames (kind 11) to the provider's inbox: the provider sends only
//! the items numbered below the credit, so a slow consumer slows the producer. A provider
//! whose stream is idle sends Keep-alive frames (kind 12), which the caller answers by granting
//! its credit again; either side that hears nothing from the other for its idle timeout ends
//! the stream.
//!
//! The parts:
//! - [`Inflow`] and [`Outflow`]: the caller's and the provider's sequence and credit logic,
//!   plain state machines without I/O or clocks;
//! - [`Inlet`] (caller) and [`Outlets`] (provider): those states shared with the receive loop;
//! - [`serve`]: the provider's driver of one stream; [`ItemStream`]: the caller's end, a
//!   [`Stream`](futures_util::Stream) of typed items;
//! - [`Streaming`]: what a streaming method's implementation returns.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use foldhash::HashMap;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::client::Client;
use crate::codec::{self, ReplyBody};
use crate::envelope::{Reply, Status, WireStr};
use crate::error::{Error, StreamBreak};
use crate::locks::lock;
use crate::node::Node;
use crate::node_id::NodeId;
use crate::service::Outcome;

/// Items a provider may send before the caller's first Credit frame (fixed by the protocol).
pub(crate) const INITIAL_CREDIT: u64 = 1;

// ---------------------------------------------------------------------------------------
// The caller's state machine.

/// How a stream ended, as the caller sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ending {
    /// All items arrived and the provider ended the stream.
    Done,
    /// The provider ended it with an error reply (application error, panic, ...).
    Failed {
        /// The reply's status.
        status: Status,
        /// Its body.
        body: Bytes,
    },
    /// It broke off.
    Broken(StreamBreak),
    /// The caller's own node shut down.
    Closed,
}

/// What the consumer takes next.
#[derive(Debug, PartialEq)]
pub(crate) enum Taken {
    /// An item, in order.
    Item(Bytes),
    /// The end, once every item before it was taken.
    End(Ending),
}

/// The caller's side of one stream: the next sequence number due, the credit granted, the
/// items received and not yet taken.
///
/// Items are accepted only in sequence and within the credit, so at most `window` (or the
/// initial credit, if larger) wait here at any time.
#[derive(Debug)]
pub(crate) struct Inflow {
    next: u64,
    granted: u64,
    taken: u64,
    window: u64,
    buffer: VecDeque<Bytes>,
    end: Option<Ending>,
    /// The end has been handed to the consumer.
    over: bool,
}

impl Inflow {
    /// A stream that may receive `window` items ahead of the consumer (at least 1).
    pub(crate) fn new(window: u32) -> Self {
        Inflow {
            next: 0,
            granted: INITIAL_CREDIT,
            taken: 0,
            window: u64::from(window.max(1)),
            buffer: VecDeque::new(),
            end: None,
            over: false,
        }
    }

    /// An item arrived: kept if it is the one due and within the credit; anything else
    /// breaks the stream (the items before it are still delivered, this one never).
    pub(crate) fn item(&mut self, seq: u64, body: Bytes) {
        if self.end.is_some() {
            return;
        }
        if seq != self.next {
            self.end = Some(Ending::Broken(StreamBreak::Gap {
                expected: self.next,
                got: seq,
            }));
        } else if seq >= self.granted {
            self.end = Some(Ending::Broken(StreamBreak::OverCredit {
                seq,
                granted: self.granted,
            }));
        } else {
            self.buffer.push_back(body);
            self.next += 1;
        }
    }

    /// The final reply arrived: an Ok reply says how many items were sent.
    pub(crate) fn reply(&mut self, status: Status, body: &[u8]) {
        if self.end.is_some() {
            return;
        }
        self.end = Some(match status {
            Status::Ok => match codec::decode_value::<u64>(body) {
                Ok(sent) if sent == self.next => Ending::Done,
                Ok(sent) => Ending::Broken(StreamBreak::Missing {
                    sent,
                    received: self.next,
                }),
                Err(_) => Ending::Failed {
                    status: Status::Unrecognized,
                    body: Bytes::from(
                        codec::encode_value("a stream's end did not carry its item count")
                            .unwrap_or_default(),
                    ),
                },
            },
            Status::ShuttingDown => Ending::Broken(StreamBreak::ShuttingDown),
            status => Ending::Failed {
                status,
                body: Bytes::copy_from_slice(body),
            },
        });
    }

    /// Ends the stream from the caller's side (idle timeout), unless it has ended already.
    pub(crate) fn break_off(&mut self, why: StreamBreak) {
        if self.end.is_none() {
            self.end = Some(Ending::Broken(why));
        }
    }

    /// The caller's node shut down: the stream ends after the items already received.
    pub(crate) fn close(&mut self) {
        if self.end.is_none() {
            self.end = Some(Ending::Closed);
        }
    }

    /// The next item, or the end once the items before it are taken; `None` if nothing is
    /// there yet (or the end was taken already).
    pub(crate) fn take(&mut self) -> Option<Taken> {
        if let Some(body) = self.buffer.pop_front() {
            self.taken += 1;
            return Some(Taken::Item(body));
        }
        if self.over {
            return None;
        }
        let end = self.end.clone()?;
        self.over = true;
        Some(Taken::End(end))
    }

    /// New credit to grant, if half the window or more has been taken since the last grant:
    /// the provider may then send up to `window` items beyond those taken.
    pub(crate) fn credit_due(&mut self) -> Option<u64> {
        if self.end.is_some() {
            return None;
        }
        let outstanding = self.granted - self.taken;
        if outstanding > self.window / 2 {
            return None;
        }
        self.granted = self.taken + self.window;
        Some(self.granted)
    }

    /// The credit granted so far.
    pub(crate) fn granted(&self) -> u64 {
        self.granted
    }

    /// Items received and not yet taken.
    pub(crate) fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Whether the stream has ended (its end may not be taken yet).
    pub(crate) fn ended(&self) -> bool {
        self.end.is_some()
    }
}

// ---------------------------------------------------------------------------------------
// The provider's state machine.

/// The provider's side of one stream: the next sequence number and the credit received.
#[derive(Debug)]
pub(crate) struct Outflow {
    next: u64,
    allow: u64,
    stopped: bool,
}

impl Default for Outflow {
    fn default() -> Self {
        Outflow {
            next: 0,
            allow: INITIAL_CREDIT,
            stopped: false,
        }
    }
}

impl Outflow {
    /// A Credit frame arrived: `allow` 0 stops the stream; a grant lower than one already
    /// received (a late or repeated frame) changes nothing.
    pub(crate) fn credit(&mut self, allow: u64) {
        if allow == 0 {
            self.stopped = true;
        } else {
            self.allow = self.allow.max(allow);
        }
    }

    /// Whether the next item may be sent now.
    pub(crate) fn may_send(&self) -> bool {
        !self.stopped && self.next < self.allow
    }

    /// Takes the next sequence number, for an item about to be sent.
    pub(crate) fn send(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        seq
    }

    /// Items sent so far (the next sequence number).
    pub(crate) fn sent(&self) -> u64 {
        self.next
    }

    /// Whether the caller stopped the stream.
    pub(crate) fn stopped(&self) -> bool {
        self.stopped
    }
}

// ---------------------------------------------------------------------------------------
// Shared with the receive loop.

/// The caller's state of one stream, fed by the receive loop.
#[derive(Debug)]
pub(crate) struct Inlet {
    state: Mutex<InletState>,
    /// A keep-alive arrived: the credit is granted again (it may have been lost).
    resend: Notify,
}

#[derive(Debug)]
struct InletState {
    flow: Inflow,
    /// When anything last arrived from the provider.
    heard: Instant,
    waker: Option<Waker>,
}

impl Inlet {
    pub(crate) fn new(window: u32) -> Self {
        Inlet {
            state: Mutex::new(InletState {
                flow: Inflow::new(window),
                heard: Instant::now(),
                waker: None,
            }),
            resend: Notify::new(),
        }
    }

    fn update(&self, change: impl FnOnce(&mut Inflow)) {
        let waker = {
            let mut state = lock(&self.state);
            change(&mut state.flow);
            state.heard = Instant::now();
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// An Item frame arrived.
    pub(crate) fn item(&self, seq: u64, body: Bytes) {
        self.update(|flow| flow.item(seq, body));
    }

    /// A Keep-alive frame arrived.
    pub(crate) fn keep_alive(&self) {
        self.update(|_| {});
        self.resend.notify_one();
    }

    /// The stream's final Reply arrived.
    pub(crate) fn end(&self, reply: &Reply) {
        if reply.claim.is_some() {
            // Streams carry no claims (§3.14): a provider that sends one breaks the protocol.
            let text =
                codec::encode_value("a stream ended with a claimed reply").unwrap_or_default();
            return self.update(|flow| flow.reply(Status::Unrecognized, &text));
        }
        self.update(|flow| flow.reply(reply.status, &reply.body));
    }

    /// The caller's node shut down.
    pub(crate) fn close(&self) {
        self.update(Inflow::close);
    }

    fn ended(&self) -> bool {
        lock(&self.state).flow.ended()
    }
}

/// A provider's stream as the receive loop sees it: its credit, and when the caller was
/// last heard from.
#[derive(Debug)]
pub(crate) struct Outlet {
    state: Mutex<(Outflow, Instant)>,
    changed: Notify,
}

/// The streams a provider is serving, by caller and id (ids are unique per caller only).
#[derive(Debug, Default)]
pub(crate) struct Outlets {
    open: Mutex<HashMap<(String, u64), Arc<Outlet>>>,
}

impl Outlets {
    /// Registers a stream; it is removed when the returned guard drops.
    fn open<'a>(&'a self, caller: &str, id: u64) -> (Arc<Outlet>, OutletGuard<'a>) {
        let outlet = Arc::new(Outlet {
            state: Mutex::new((Outflow::default(), Instant::now())),
            changed: Notify::new(),
        });
        let key = (caller.to_string(), id);
        lock(&self.open).insert(key.clone(), outlet.clone());
        (outlet, OutletGuard { outlets: self, key })
    }

    /// A Credit frame arrived; false if no such stream runs here (it ended already).
    pub(crate) fn credit(&self, caller: &str, id: u64, allow: u64) -> bool {
        let outlet = lock(&self.open).get(&(caller.to_string(), id)).cloned();
        let Some(outlet) = outlet else {
            return false;
        };
        {
            let mut state = lock(&outlet.state);
            state.0.credit(allow);
            state.1 = Instant::now();
        }
        outlet.changed.notify_one();
        true
    }

    /// Streams running now.
    pub(crate) fn len(&self) -> usize {
        lock(&self.open).len()
    }
}

struct OutletGuard<'a> {
    outlets: &'a Outlets,
    key: (String, u64),
}

impl Drop for OutletGuard<'_> {
    fn drop(&mut self) {
        lock(&self.outlets.open).remove(&self.key);
    }
}

// ---------------------------------------------------------------------------------------
// The provider's end.

/// What a stream handler yields, ready for the wire.
pub(crate) enum Event {
    /// An item, encoded.
    Item(Vec<u8>),
    /// The end, with an error reply (an application error, an item that did not encode).
    Fail(Outcome),
}

impl Event {
    /// An item, or a server error if it does not encode.
    pub(crate) fn item<T: Serialize + ?Sized>(item: &T) -> Event {
        match codec::encode_value(item) {
            Ok(body) => Event::Item(body),
            Err(reason) => Event::Fail(Outcome::encoded(
                Status::ServerError,
                &format!("could not encode an item: {reason}"),
            )),
        }
    }
}

/// The items of a running stream handler.
pub(crate) type Events = Pin<Box<dyn Stream<Item = Event> + Send + 'static>>;

/// What a streaming method returns: any stream of items, sent to the caller as the caller
/// consumes them.
///
/// In a `#[clouds::service]` trait, declare the method as returning `clouds::Streaming<T>`;
/// the implementation builds one from any `Stream<Item = T> + Send + 'static` (with
/// [`Streaming::new`]) or from an iterator ([`Streaming::iter`]). When `T` is a
/// `Result<V, E>`, an `Err` item ends the stream: the caller gets it, typed, as the last item.
///
/// ```
/// let numbers = clouds_core::Streaming::iter(0..3u32);
/// let ticks = clouds_core::Streaming::new(futures_util::stream::repeat("tick").take(5));
/// # use futures_util::StreamExt;
/// ```
pub struct Streaming<T> {
    pub(crate) items: Pin<Box<dyn Stream<Item = T> + Send + 'static>>,
}

impl<T> Streaming<T> {
    /// A stream of the items `items` yields (boxed once).
    ///
    /// ```
    /// use futures_util::StreamExt;
    /// let squares = clouds_core::Streaming::new(futures_util::stream::iter(1..=3).map(|x: u64| x * x));
    /// ```
    pub fn new(items: impl Stream<Item = T> + Send + 'static) -> Self {
        Streaming {
            items: Box::pin(items),
        }
    }

    /// A stream of the items of an iterator.
    ///
    /// ```
    /// let lines = clouds_core::Streaming::iter(vec!["a".to_string(), "b".to_string()]);
    /// ```
    pub fn iter<I>(items: I) -> Self
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
    {
        Streaming::new(futures_util::stream::iter(items))
    }
}

impl<T> std::fmt::Debug for Streaming<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming").finish_non_exhaustive()
    }
}

/// A `Streaming` is itself a stream, so an implementation can be tested locally.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use futures_util::StreamExt;
/// let items: Vec<u8> = clouds_core::Streaming::iter([1, 2]).collect().await;
/// assert_eq!(items, [1, 2]);
/// # }
/// ```
impl<T> Stream for Streaming<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.items.as_mut().poll_next(cx)
    }
}

/// Most time a provider waits for the sends of a stream's last items before its end.
const FINISH_SENDS: Duration = Duration::from_secs(5);

/// Serves one stream: sends its items within the caller's credit, keeps it alive while idle,
/// and ends it (normal end, error, the caller stopping it or going silent, `closing`; no
/// word at all once `silenced`, as from a dead process).
///
/// The handler's stream is dropped as soon as the stream ends, before the last sends
/// complete, so its drop guards run at once.
pub(crate) async fn serve(
    node: Arc<Node>,
    caller: WireStr,
    id: u64,
    mut items: Events,
    closing: tokio_util::sync::CancellationToken,
    silenced: tokio_util::sync::CancellationToken,
) {
    let inbox = node.peers().inbox(caller.as_str());
    let (outlet, _registered) = node.outlets().open(caller.as_str(), id);
    let start = ReplyBody::from_encoded(codec::NIL).into_frame(id, Status::Stream);
    match node.send_frame(&inbox, start, true).await {
        Ok(0) => return,
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(node = %node.id(), %caller, error = %e, "could not open a stream");
            return;
        }
    }
    let idle = node.config().stream_idle_timeout;
    let keep_alive = idle / 4;
    let inline = node
        .config()
        .max_frame_size
        .min(node.config().claim_threshold);
    let mut sends = FuturesUnordered::new();
    let mut last_sent = Instant::now();
    // When the first keep-alive the caller has not answered yet went out.
    let mut asked: Option<Instant> = None;
    // The reply that ends the stream, if the caller is still there to get one.
    let end: Option<Outcome> = loop {
        let (may_send, stopped, heard) = {
            let state = lock(&outlet.state);
            (state.0.may_send(), state.0.stopped(), state.1)
        };
        if stopped {
            break None;
        }
        let changed = outlet.changed.notified();
        tokio::select! {
            biased;
            _ = silenced.cancelled() => break None,
            _ = closing.cancelled() => break Some(Outcome::empty(Status::ShuttingDown)),
            _ = changed => {}
            Some(sent) = sends.next(), if !sends.is_empty() => match sent {
                Ok(0) => break None,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node = %node.id(), %caller, error = %e, "could not send a stream item; the stream ends");
                    break None;
                }
            },
            next = AssertUnwindSafe(items.next()).catch_unwind(), if may_send => match next {
                Ok(Some(Event::Item(body))) => {
                    let seq = lock(&outlet.state).0.send();
                    let frame = codec::encode_item(id, seq, &body);
                    if frame.len() > inline {
                        break Some(Outcome::encoded(
                            Status::ServerError,
                            &format!(
                                "item {seq} is {} bytes, over the inline frame limit of {inline} bytes; streams carry no claims (send smaller items)",
                                frame.len()
                            ),
                        ));
                    }
                    let mut send = Box::pin(node.send_frame(&inbox, Bytes::from(frame), true));
                    // Polled once now, so the frame takes its place in the outbox's queue in
                    // sequence (later polls come from `sends`, in any order).
                    let mut cx = Context::from_waker(Waker::noop());
                    match send.as_mut().poll(&mut cx) {
                        Poll::Ready(Ok(0)) => break None,
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(e)) => {
                            tracing::warn!(node = %node.id(), %caller, error = %e, "could not send a stream item; the stream ends");
                            break None;
                        }
                        Poll::Pending => sends.push(send),
                    }
                    last_sent = Instant::now();
                }
                Ok(Some(Event::Fail(outcome))) => break Some(outcome),
                Ok(None) => {
                    let sent = lock(&outlet.state).0.sent();
                    break Some(Outcome::encoded(Status::Ok, &sent));
                }
                Err(panic) => {
                    break Some(Outcome::encoded(
                        Status::Panic,
                        &crate::service::panic_message(&*panic),
                    ));
                }
            },
            _ = tokio::time::sleep_until(last_sent + keep_alive) => {
                // Silent: a keep-alive went unanswered (no credit since) for the idle timeout.
                if let Some(at) = asked
                    && heard < at
                    && at.elapsed() >= idle
                {
                    tracing::debug!(node = %node.id(), %caller, id, "stream caller silent for the idle timeout; stream dropped");
                    break None;
                }
                let frame = codec::encode_keepalive(id, lock(&outlet.state).0.sent());
                sends.push(Box::pin(node.send_frame(&inbox, Bytes::from(frame), true)));
                last_sent = Instant::now();
                if asked.is_none_or(|at| heard >= at) {
                    asked = Some(last_sent);
                }
            }
        }
    };
    // The handler's stream goes first: its drop guards run now, not after the sends.
    drop(items);
    let Some(end) = end else {
        return;
    };
    let finished = async { while sends.next().await.is_some() {} };
    if tokio::time::timeout(FINISH_SENDS, finished).await.is_err() {
        return;
    }
    node.reply(caller.as_str(), id, end.status, end.body).await;
}

// ---------------------------------------------------------------------------------------
// The caller's end.

/// Turns what a stream delivers into the consumer's items.
pub(crate) type Decode<T> = fn(&str, &NodeId, Taken) -> Option<Result<T, Error>>;

/// Items of any type: an error end is an [`Error`].
pub(crate) fn decode_plain<T: DeserializeOwned>(
    method: &str,
    node: &NodeId,
    taken: Taken,
) -> Option<Result<T, Error>> {
    match taken {
        Taken::Item(body) => Some(decode_item(method, node, &body)),
        Taken::End(end) => ending(method, node, end).map(Err),
    }
}

/// Items of a `Result<T, E>` stream: an application error end is the last item, `Err(e)`.
pub(crate) fn decode_result<T: DeserializeOwned, E: DeserializeOwned>(
    method: &str,
    node: &NodeId,
    taken: Taken,
) -> Option<Result<Result<T, E>, Error>> {
    match taken {
        Taken::Item(body) => Some(decode_item(method, node, &body).map(Ok)),
        Taken::End(Ending::Failed {
            status: Status::AppError,
            body,
        }) => Some(
            codec::decode_value(&body)
                .map(Err)
                .map_err(|reason| Error::Codec {
                    action: format!("decode the error of {method} from {node}"),
                    reason,
                }),
        ),
        Taken::End(end) => ending(method, node, end).map(Err),
    }
}

fn decode_item<T: DeserializeOwned>(method: &str, node: &NodeId, body: &[u8]) -> Result<T, Error> {
    codec::decode_value(body).map_err(|reason| Error::Codec {
        action: format!("decode an item of {method} from {node}"),
        reason,
    })
}

/// The error an end is, if it is one.
fn ending(method: &str, node: &NodeId, end: Ending) -> Option<Error> {
    match end {
        Ending::Done => None,
        Ending::Closed => Some(Error::Shutdown),
        Ending::Broken(reason) => Some(Error::StreamBroken {
            method: method.to_string(),
            node: node.clone(),
            reason,
        }),
        Ending::Failed { status, body } => {
            let reply = Reply {
                id: 0,
                status,
                body,
                claim: None,
            };
            match crate::client::decode_reply::<serde::de::IgnoredAny>(method, node.clone(), reply)
            {
                Err(e) => Some(e),
                Ok(_) => Some(Error::Protocol(format!(
                    "{node} ended the stream of {method} with an unexpected reply"
                ))),
            }
        }
    }
}

/// The caller's end of a stream: a [`Stream`](futures_util::Stream) of
/// `Result<T, clouds::Error>`, in order, as the provider sends them.
///
/// Opened by a typed stub's streaming method or by [`Client::open_stream`]. It holds at most
/// the window of items ([`Config::stream_window`](crate::Config::stream_window)) that the
/// provider was allowed to send ahead; taking items grants more. After the last item it ends
/// (`None`); an error (a broken stream, a failed provider, an application error when `T` is
/// not a `Result`) is the last item. Dropping it stops the stream at the provider, whose
/// stream is dropped.
///
/// ```
/// # async fn demo(client: clouds_core::Client) -> Result<(), clouds_core::Error> {
/// use futures_util::StreamExt;
/// let mut lines = client.open_stream::<_, String>("logs.tail", (0u64,)).await?;
/// while let Some(line) = lines.next().await {
///     println!("{}", line?);
/// }
/// # Ok(()) }
/// ```
pub struct ItemStream<T> {
    inlet: Arc<Inlet>,
    /// Keeps the client's node alive while the stream is read.
    client: Client,
    method: String,
    provider: NodeId,
    id: u64,
    /// The credit granted, watched by the task that sends it.
    credit: tokio::sync::watch::Sender<u64>,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    decode: Decode<T>,
    finished: bool,
    _items: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for ItemStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemStream")
            .field("method", &self.method)
            .field("provider", &self.provider)
            .field("held_items", &self.held_items())
            .finish()
    }
}

impl<T> ItemStream<T> {
    /// Starts reading a stream that the provider has opened (its `Stream` reply arrived).
    pub(crate) fn opened(
        client: Client,
        inlet: Arc<Inlet>,
        method: &str,
        provider: NodeId,
        id: u64,
        decode: Decode<T>,
    ) -> Self {
        let node = client.node().clone();
        let first = lock(&inlet.state)
            .flow
            .credit_due()
            .unwrap_or(INITIAL_CREDIT);
        let (credit, watched) = tokio::sync::watch::channel(first);
        node.life().spawn(grant(
            node.clone(),
            provider.clone(),
            id,
            watched,
            inlet.clone(),
        ));
        let idle = node.config().stream_idle_timeout;
        ItemStream {
            inlet,
            client,
            method: method.to_string(),
            provider,
            id,
            credit,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            decode,
            finished: false,
            _items: PhantomData,
        }
    }

    /// Items received and not yet taken: never more than the window.
    ///
    /// ```
    /// # fn demo(items: clouds_core::ItemStream<u64>) {
    /// assert!(items.held_items() <= 64);
    /// # }
    /// ```
    pub fn held_items(&self) -> usize {
        lock(&self.inlet.state).flow.buffered()
    }

    /// The next item, `None` after the last one (the same as `StreamExt::next`, without
    /// importing it).
    ///
    /// ```
    /// # async fn demo(mut items: clouds_core::ItemStream<u64>) -> Result<(), clouds_core::Error> {
    /// while let Some(item) = items.next().await {
    ///     println!("{}", item?);
    /// }
    /// # Ok(()) }
    /// ```
    #[allow(clippy::should_implement_trait)]
    pub async fn next(&mut self) -> Option<Result<T, Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// The provider serving this stream.
    ///
    /// ```
    /// # fn demo(items: clouds_core::ItemStream<u64>) {
    /// println!("streaming from {}", items.provider());
    /// # }
    /// ```
    pub fn provider(&self) -> &NodeId {
        &self.provider
    }
}

impl<T> Stream for ItemStream<T> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            let (taken, credit, heard) = {
                let mut state = lock(&this.inlet.state);
                let taken = state.flow.take();
                if taken.is_none() {
                    state.waker = Some(cx.waker().clone());
                }
                (taken, state.flow.credit_due(), state.heard)
            };
            if let Some(allow) = credit {
                this.credit.send_replace(allow);
            }
            match taken {
                Some(taken) => {
                    if matches!(taken, Taken::End(_)) {
                        this.finished = true;
                    }
                    match (this.decode)(&this.method, &this.provider, taken) {
                        Some(item) => return Poll::Ready(Some(item)),
                        None => continue,
                    }
                }
                None => {
                    let deadline = heard + this.idle;
                    if Instant::now() >= deadline {
                        let after = this.idle;
                        lock(&this.inlet.state)
                            .flow
                            .break_off(StreamBreak::Idle { after });
                        continue;
                    }
                    this.timer.as_mut().reset(deadline);
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

impl<T> Drop for ItemStream<T> {
    fn drop(&mut self) {
        // The granting task sees the credit's sender go and stops the stream at the
        // provider, unless it ended already.
        self.client.node().caller().pending().forget(self.id);
    }
}

/// Sends a stream's credit to its provider whenever it grows, again after each keep-alive,
/// and a stop (`allow` 0) when the consumer drops the stream before its end.
async fn grant(
    node: Arc<Node>,
    provider: NodeId,
    id: u64,
    mut credit: tokio::sync::watch::Receiver<u64>,
    inlet: Arc<Inlet>,
) {
    let inbox = node.peers().inbox(provider.as_str());
    let send = |allow: u64| {
        let frame = Bytes::from(codec::encode_credit(id, node.id().as_str(), allow));
        let node = node.clone();
        let inbox = inbox.clone();
        async move {
            if let Err(e) = node.send_frame(&inbox, frame, true).await {
                tracing::debug!(node = %node.id(), error = %e, "could not send a stream's credit");
            }
        }
    };
    // The first grant.
    let first = *credit.borrow_and_update();
    if first > INITIAL_CREDIT {
        send(first).await;
    }
    loop {
        tokio::select! {
            _ = node.life().stopped() => return,
            changed = credit.changed() => match changed {
                Ok(()) => {
                    let allow = *credit.borrow_and_update();
                    send(allow).await;
                }
                Err(_) => {
                    if !inlet.ended() {
                        send(0).await;
                    }
                    return;
                }
            },
            _ = inlet.resend.notified() => {
                if !inlet.ended() {
                    let allow = lock(&inlet.state).flow.granted();
                    send(allow).await;
                }
            }
        }
    }
}

/// The decoder of plain items, for [`ItemStream::opened`].
pub(crate) fn plain<T: DeserializeOwned>() -> Decode<T> {
    decode_plain::<T>
}

/// The decoder of `Result` items.
pub(crate) fn results<T: DeserializeOwned, E: DeserializeOwned>() -> Decode<Result<T, E>> {
    decode_result::<T, E>
}

/// A reply that is not `Stream` when a stream was opened: the error it reports.
pub(crate) fn not_opened(method: &str, node: NodeId, reply: Reply) -> Error {
    match reply.status {
        Status::Ok => Error::Protocol(format!(
            "{method} on {node} is not a streaming method (it answered with a value); call it with Client::call"
        )),
        _ => {
            match crate::client::decode_reply::<serde::de::IgnoredAny>(method, node.clone(), reply)
            {
                Err(e) => e,
                Ok(_) => Error::Protocol(format!("{node} did not open the stream of {method}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    fn count(n: u64) -> Vec<u8> {
        codec::encode_value(&n).expect("encode")
    }

    #[test]
    fn items_in_sequence_and_within_credit_are_delivered_then_the_end() {
        let mut flow = Inflow::new(4);
        assert_eq!(
            flow.credit_due(),
            Some(4),
            "the window replaces the initial credit"
        );
        for seq in 0..4 {
            flow.item(seq, body(seq as u8));
        }
        assert_eq!(flow.buffered(), 4);
        assert_eq!(flow.credit_due(), None, "nothing taken yet");
        assert_eq!(flow.take(), Some(Taken::Item(body(0))));
        assert_eq!(flow.credit_due(), None, "3 outstanding > half the window");
        assert_eq!(flow.take(), Some(Taken::Item(body(1))));
        assert_eq!(flow.credit_due(), Some(6), "2 taken + a window of 4");
        flow.item(4, body(4));
        flow.reply(Status::Ok, &count(5));
        let rest: Vec<_> = std::iter::from_fn(|| flow.take()).collect();
        assert_eq!(
            rest,
            [
                Taken::Item(body(2)),
                Taken::Item(body(3)),
                Taken::Item(body(4)),
                Taken::End(Ending::Done)
            ]
        );
        assert_eq!(flow.take(), None, "the end is taken once");
        assert_eq!(flow.credit_due(), None, "no credit after the end");
    }

    #[test]
    fn a_gap_is_detected_and_never_passed_on() {
        let mut flow = Inflow::new(8);
        flow.credit_due();
        flow.item(0, body(0));
        flow.item(2, body(2));
        flow.item(3, body(3));
        assert_eq!(flow.take(), Some(Taken::Item(body(0))));
        assert_eq!(
            flow.take(),
            Some(Taken::End(Ending::Broken(StreamBreak::Gap {
                expected: 1,
                got: 2
            })))
        );
        assert_eq!(flow.take(), None, "nothing after the break");
    }

    #[test]
    fn a_duplicate_is_detected_and_never_passed_on() {
        let mut flow = Inflow::new(8);
        flow.credit_due();
        flow.item(0, body(0));
        flow.item(1, body(1));
        flow.item(1, body(1));
        flow.item(2, body(2));
        let taken: Vec<_> = std::iter::from_fn(|| flow.take()).collect();
        assert_eq!(
            taken,
            [
                Taken::Item(body(0)),
                Taken::Item(body(1)),
                Taken::End(Ending::Broken(StreamBreak::Gap {
                    expected: 2,
                    got: 1
                }))
            ]
        );
    }

    #[test]
    fn a_lost_last_item_is_detected_at_the_end() {
        let mut flow = Inflow::new(8);
        flow.credit_due();
        flow.item(0, body(0));
        flow.reply(Status::Ok, &count(2));
        assert_eq!(flow.take(), Some(Taken::Item(body(0))));
        assert_eq!(
            flow.take(),
            Some(Taken::End(Ending::Broken(StreamBreak::Missing {
                sent: 2,
                received: 1
            })))
        );
    }

    #[test]
    fn items_beyond_the_credit_break_the_stream() {
        let mut flow = Inflow::new(2);
        flow.item(0, body(0));
        flow.item(1, body(1));
        assert_eq!(flow.take(), Some(Taken::Item(body(0))));
        assert_eq!(
            flow.take(),
            Some(Taken::End(Ending::Broken(StreamBreak::OverCredit {
                seq: 1,
                granted: 1
            })))
        );
    }

    #[test]
    fn the_buffer_never_exceeds_the_window() {
        let mut flow = Inflow::new(16);
        let mut sent = 0;
        let mut most = 0;
        for round in 0..1000u64 {
            if let Some(allow) = flow.credit_due() {
                // A provider sends everything it may.
                while sent < allow {
                    flow.item(sent, body(0));
                    sent += 1;
                }
            }
            most = most.max(flow.buffered());
            // A consumer slower than the provider: takes one item every other round.
            if round % 2 == 0 {
                assert!(matches!(flow.take(), Some(Taken::Item(_))));
            }
        }
        assert!(!flow.ended());
        assert!(most <= 16, "held {most} items");
        assert!(sent >= 500);
    }

    #[test]
    fn an_error_end_and_a_shutdown_are_ends_after_the_items() {
        let mut flow = Inflow::new(4);
        flow.item(0, body(0));
        flow.reply(Status::AppError, b"\xa3bad");
        assert_eq!(flow.take(), Some(Taken::Item(body(0))));
        assert_eq!(
            flow.take(),
            Some(Taken::End(Ending::Failed {
                status: Status::AppError,
                body: Bytes::from_static(b"\xa3bad")
            }))
        );
        let mut flow = Inflow::new(4);
        flow.reply(Status::ShuttingDown, codec::NIL);
        assert_eq!(
            flow.take(),
            Some(Taken::End(Ending::Broken(StreamBreak::ShuttingDown)))
        );
        let mut flow = Inflow::new(4);
        flow.break_off(StreamBreak::Idle {
            after: Duration::from_secs(1),
        });
        flow.item(0, body(0));
        assert!(matches!(
            flow.take(),
            Some(Taken::End(Ending::Broken(StreamBreak::Idle { .. })))
        ));
    }

    #[test]
    fn the_provider_sends_within_the_credit_and_stops_when_told() {
        let mut flow = Outflow::default();
        assert!(flow.may_send(), "the initial credit");
        assert_eq!(flow.send(), 0);
        assert!(!flow.may_send());
        flow.credit(3);
        assert!(flow.may_send());
        assert_eq!((flow.send(), flow.send()), (1, 2));
        assert!(!flow.may_send());
        flow.credit(2);
        assert!(
            !flow.may_send(),
            "a stale grant takes nothing back nor adds"
        );
        flow.credit(10);
        assert!(flow.may_send());
        assert_eq!(flow.sent(), 3);
        flow.credit(0);
        assert!(flow.stopped() && !flow.may_send());
    }
}
