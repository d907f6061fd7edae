//! A node: one identity, one pair of Redis connections, one receive loop.
//!
//! Servers, clients and monitors are all nodes. The receive loop reads every frame the
//! subscriber connection delivers and routes it: replies to the pending table, calls to the
//! dispatcher, messages to the message queue, join/leave events to the balancer. A frame that
//! does not decode, or arrives on the wrong channel, is counted and logged, never fatal.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;

use crate::caller::Caller;
use crate::claim::{self, Budget, Claims};
use crate::codec::{self, ReplyBody};
use crate::config::Config;
use crate::dispatch::{Dispatched, Dispatcher, Ran, ReadyReply, Watch};
use crate::envelope::{Call, ClaimRef, Frame, Status};
use crate::error::Error;
use crate::message::{Message, MessageQueue};
use crate::namespace::{Names, PeerChannels};
use crate::node_id::NodeId;
use crate::outbox::{self, Outbox, Sink};
use crate::registry::Registry;
use crate::shutdown::Lifecycle;
use crate::signing::{Opener, Refused, SIGNED_VERSION, Sealer};
use crate::stats::{Count, Counters, Stats};
use crate::transport::{Channel, Delivery, Inbound, Transport, TransportError, Wire};

/// The shared state of one node, in parts each owned by the module that uses them.
pub(crate) struct Node {
    id: NodeId,
    config: Config,
    names: Names,
    /// Peers' channel names, built once each.
    peers: PeerChannels,
    registry: Registry,
    wire: Wire,
    /// The caller side: pending calls, provider cache, byte budget (`caller.rs`).
    caller: Caller,
    /// Large bodies sent and fetched through Redis keys (`claim.rs`).
    claims: Claims,
    messages: MessageQueue,
    /// Set once, when the node starts serving (`dispatch.rs`).
    dispatcher: OnceLock<Arc<Dispatcher>>,
    counters: Counters,
    /// Background tasks and how far closing got (`shutdown.rs`).
    life: Lifecycle,
    inbox: Channel,
    calls: Channel,
    events: Channel,
    /// Signs what this node sends and checks what it receives, when frames are signed
    /// (`signing.rs`); the registry signs the announcements with the same sealer.
    sealer: Option<Arc<Sealer>>,
    opener: Option<Opener>,
    /// Calls, replies and messages waiting for their destination's turn (`outbox.rs`).
    outbox: Outbox,
    /// The streams this node serves (`stream.rs`).
    outlets: crate::stream::Outlets,
    /// Joins and leaves as received, for monitors that listen (`Monitor::events`).
    announcements: tokio::sync::broadcast::Sender<crate::monitor::RegistryEvent>,
}

/// Joins and leaves kept for a monitor that falls behind; beyond, the oldest are dropped.
const ANNOUNCEMENTS: usize = 1024;

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id).finish()
    }
}

impl Node {
    /// Connects, subscribes to the node's inbox and the events channel, and starts the
    /// receive and refresh loops.
    pub(crate) async fn start(config: Config, kind: &str) -> Result<Arc<Node>, Error> {
        config.validate()?;
        let id = NodeId::generate(kind);
        let names = Names::new(&config);
        let wire = Wire::connect(&config, &config.transport, &names, &id).await?;
        // Take the receiver before subscribing so nothing delivered is missed.
        let inbound = wire.inbound();
        let sealer = Sealer::new(&config.signing).map(Arc::new);
        let (inbox, calls, events) = (
            names.inbox(id.as_str()),
            names.calls(id.as_str()),
            names.events(),
        );
        let opener = Opener::new(
            &config.signing,
            &[inbox.as_str(), calls.as_str(), events.as_str()],
        );
        let node = Arc::new(Node {
            inbox,
            calls,
            events,
            registry: Registry::new(config.effective_ttl()).signed(sealer.clone(), names.events()),
            opener,
            sealer,
            outbox: Outbox::new(config.batching),
            peers: PeerChannels::new(names.clone()),
            caller: Caller::new(&config),
            claims: Claims::new(&config),
            messages: MessageQueue::new(config.message_buffer),
            dispatcher: OnceLock::new(),
            counters: Counters::default(),
            life: Lifecycle::new(),
            announcements: tokio::sync::broadcast::Sender::new(ANNOUNCEMENTS),
            outlets: crate::stream::Outlets::default(),
            id,
            names,
            wire,
            config,
        });
        let subscribed = async {
            node.wire.subscribe(&node.inbox).await?;
            node.wire.subscribe(&node.events).await
        };
        if let Err(e) = subscribed.await {
            node.wire.close().await;
            return Err(e.into());
        }
        node.life.spawn(receive_loop(node.clone(), inbound));
        node.life.spawn(refresh_loop(node.clone()));
        tracing::debug!(node = %node.id, "node started");
        Ok(node)
    }

    /// The joins and leaves this node receives from now on.
    pub(crate) fn announcements(
        &self,
    ) -> tokio::sync::broadcast::Receiver<crate::monitor::RegistryEvent> {
        self.announcements.subscribe()
    }

    /// Passes a join or leave on to the monitors listening, if any.
    fn announce(&self, event: impl FnOnce() -> crate::monitor::RegistryEvent) {
        if self.announcements.receiver_count() > 0 {
            let _ = self.announcements.send(event());
        }
    }

    /// This node's id.
    pub(crate) fn id(&self) -> &NodeId {
        &self.id
    }

    /// The settings it was started with.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Its connection to the broker.
    pub(crate) fn wire(&self) -> &Wire {
        &self.wire
    }

    /// The names of its deployment.
    pub(crate) fn names(&self) -> &Names {
        &self.names
    }

    /// Peers' channels, built once each.
    pub(crate) fn peers(&self) -> &PeerChannels {
        &self.peers
    }

    /// The registry of its deployment.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Its caller side.
    pub(crate) fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The messages it received.
    pub(crate) fn messages(&self) -> &MessageQueue {
        &self.messages
    }

    /// Its claim settings and fetch budget.
    pub(crate) fn claims(&self) -> &Claims {
        &self.claims
    }

    /// Its counters of bad input and load.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Its background tasks and closing state.
    pub(crate) fn life(&self) -> &Lifecycle {
        &self.life
    }

    /// The streams it serves.
    pub(crate) fn outlets(&self) -> &crate::stream::Outlets {
        &self.outlets
    }

    /// Serves a streaming method's items in a task of its own, which shutdown waits for; the
    /// call keeps its place in flight until the stream ends.
    fn start_stream(self: &Arc<Self>, reply: ReadyReply, items: crate::stream::Events) {
        let Some(dispatcher) = self.dispatcher.get() else {
            return;
        };
        let node = self.clone();
        let (closing, silenced) = dispatcher.closing();
        dispatcher.track(async move {
            let ReadyReply {
                caller, id, slot, ..
            } = reply;
            crate::stream::serve(node, caller, id, items, closing, silenced).await;
            drop(slot);
        });
    }

    /// Makes this node a server, dispatching calls to `dispatcher`; false if it already is.
    pub(crate) fn serve_with(&self, dispatcher: Arc<Dispatcher>) -> bool {
        self.dispatcher.set(dispatcher).is_ok()
    }

    /// Calls this server is running or sending the reply of now (0 for other nodes).
    /// The server's per-method figures as a registry entry's `stats` field (the window ends
    /// now); `None` if this node serves nothing.
    pub(crate) fn stats_summary(&self) -> Option<String> {
        self.dispatcher.get().map(|d| d.summary())
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.dispatcher.get().map_or(0, |d| d.in_flight())
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.life.is_closed()
    }

    /// Whether a [`Node::close`] has run to its end.
    pub(crate) fn is_finished(&self) -> bool {
        self.life.is_finished()
    }

    /// The channel this server takes calls on.
    pub(crate) fn calls_channel(&self) -> &Channel {
        &self.calls
    }

    /// `frame` as published on `channel`: signed for it when frames are signed (call this
    /// right before publishing, so sequence numbers go out in about the order they were
    /// taken), else as it is.
    pub(crate) fn seal(&self, channel: &Channel, frame: Bytes) -> Bytes {
        match &self.sealer {
            Some(sealer) => sealer.seal_owned(channel.as_str(), frame),
            None => frame,
        }
    }

    /// The frame inside a delivery: checked and unwrapped when frames are signed. A frame
    /// refused for its signature or as a replay is counted, logged (sampled) and dropped.
    fn open(&self, channel: &Channel, payload: Bytes) -> Option<Bytes> {
        let refused = match &self.opener {
            None if payload.first() != Some(&SIGNED_VERSION) => return Some(payload),
            None => Refused::NoKeys,
            Some(opener) => {
                // Each channel is its own stream of sequence numbers (a cluster delivers
                // different channels from different shards, so not in one order).
                let slot = if *channel == self.inbox {
                    0
                } else if *channel == self.calls {
                    1
                } else if *channel == self.events {
                    2
                } else {
                    3
                };
                match opener.open(channel.as_str(), slot, &payload) {
                    Ok(frame) => return Some(frame),
                    Err(refused) => refused,
                }
            }
        };
        let (count, what) = if refused.is_replay() {
            (Count::Replayed, "dropped a replayed signed frame")
        } else {
            (
                Count::Unauthenticated,
                "dropped a frame without a valid signature",
            )
        };
        if let Some(seen) = self.counters.bump_and_sample(count) {
            tracing::warn!(node = %self.id, %channel, len = payload.len(), error = %refused, seen, "{what}");
        }
        None
    }

    /// A frame ready to send (inline or as a claim), if it is within `max_body_size`.
    pub(crate) fn sized(
        &self,
        frame: impl Into<Bytes>,
        what: impl FnOnce() -> String,
    ) -> Result<Bytes, Error> {
        let frame = frame.into();
        if frame.len() > self.claims.max_body() {
            return Err(Error::TooLarge {
                what: what(),
                size: frame.len(),
                max: self.claims.max_body(),
            });
        }
        Ok(frame)
    }

    /// `frame` as it goes on the wire: itself, or if it is large a claim frame whose body has
    /// been stored for `deadline` (plus a grace), with the claim's key.
    pub(crate) async fn claim_if_large(
        &self,
        frame: Bytes,
        deadline: Duration,
    ) -> Result<(Bytes, Option<String>), Error> {
        if !self.claims.claims(frame.len()) {
            return Ok((frame, None));
        }
        let ttl = self.claims.ttl(deadline);
        let stored = claim::store(&self.wire, &self.names, frame, ttl).await?;
        Ok((stored.frame, Some(stored.key)))
    }

    /// Deletes the claim at `key` in the background, if the receiver has not taken it (it
    /// would expire anyway; this frees Redis's memory sooner).
    pub(crate) fn discard_claim(self: &Arc<Self>, key: String) {
        let node = self.clone();
        self.life.spawn(async move {
            if let Err(e) = node.wire.delete(&key).await {
                tracing::debug!(node = %node.id, %key, error = %e, "could not delete a claim; it expires on its own");
            }
        });
    }

    /// Takes a claimed body from Redis within the fetch budget: the body and the budget it
    /// holds, or why it could not be had.
    pub(crate) async fn fetch_claim(
        &self,
        budget: Budget,
        claim: &ClaimRef,
    ) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), Unfetched> {
        if claim.len > self.claims.max_body() as u64 {
            self.counters.bump(Count::Oversized);
            let _ = self.wire.delete(&self.names.claim(&claim.token)).await;
            return Err(Unfetched::TooLarge(format!(
                "the body is {} bytes, over this node's max_body_size of {} bytes",
                claim.len,
                self.claims.max_body()
            )));
        }
        let room = self.claims.room(budget, claim.len).await;
        match claim::fetch(&self.wire, &self.names, claim).await {
            Ok(Ok(body)) => Ok((body, room)),
            Ok(Err(reason)) => Err(Unfetched::Lost(reason)),
            Err(e) => Err(Unfetched::Lost(format!(
                "Redis failed to hand the claim over: {e}"
            ))),
        }
    }

    /// Publishes `frame` on `channel` through the outbox, which may carry it in a batch with
    /// other frames for the same channel (`outbox.rs`); signed at publishing, when frames are
    /// signed. `timed`: bounded by the command timeout (else the caller bounds the wait).
    pub(crate) async fn send_frame(
        self: &Arc<Self>,
        channel: &Channel,
        frame: Bytes,
        timed: bool,
    ) -> Result<u64, TransportError> {
        outbox::send(self, channel, frame, timed).await
    }

    /// Tells the provider whose call channel is `calls` that this node gave up its call `id`
    /// (a Cancel frame, `docs/protocol.md` §3.13), best effort: through the outbox, on the
    /// call's own channel so it cannot overtake the call, from a task of its own so a `Drop`
    /// can call this without blocking.
    pub(crate) fn cancel(self: &Arc<Self>, calls: Channel, id: u64) {
        self.counters.bump(Count::CancelsSent);
        let frame = Bytes::from(codec::encode_cancel(id, self.id.as_str()));
        let node = self.clone();
        self.life.spawn_detached(async move {
            if let Err(e) = node.send_frame(&calls, frame, true).await {
                tracing::debug!(node = %node.id, %calls, id, error = %e, "could not send a cancel; the provider runs the call to its end");
            }
        });
    }

    /// Sends a reply to `caller`'s inbox; failures are logged (the caller will time out).
    pub(crate) async fn reply(
        self: &Arc<Self>,
        caller: &str,
        id: u64,
        status: Status,
        body: ReplyBody,
    ) {
        let frame = self.reply_frame(caller, id, status, body).await;
        let inbox = self.peers.inbox(caller);
        let sent = self.send_frame(&inbox, frame, true).await;
        self.log_reply(caller, sent);
    }

    /// Sends a handler's reply, bounded by the command timeout, then frees its in-flight slot.
    pub(crate) async fn send_reply(self: &Arc<Self>, mut reply: ReadyReply) {
        if let Some(items) = reply.stream.take() {
            return self.start_stream(reply, items);
        }
        self.reply(reply.caller.as_str(), reply.id, reply.status, reply.body)
            .await;
        drop(reply.slot);
    }

    /// Sends replies to one caller (not empty) together, then frees their in-flight slots:
    /// for the receive loop, which bounds the replies it sends all together, with no timer of
    /// their own (see `receive_loop`).
    async fn reply_all(self: &Arc<Self>, replies: CallerReplies) {
        let replies = match replies {
            // The common case at low load: no vectors of replies, frames and slots. Written
            // out rather than a call to `send_reply` with a `timed` flag: that nesting made this
            // future 1,016 B instead of 856 (`-Zprint-type-sizes`), over glibc's per-thread
            // cache limit with its task (BENCHMARKS.md, "Hot and cold").
            CallerReplies::One(mut reply) => {
                if let Some(items) = reply.stream.take() {
                    return self.start_stream(reply, items);
                }
                let caller = reply.caller.as_str();
                let frame = self
                    .reply_frame(caller, reply.id, reply.status, reply.body)
                    .await;
                // A lone reply goes at once if the inbox's turn is free.
                let sent = outbox::send(self, &self.peers.inbox(caller), frame, false).await;
                self.log_reply(caller, sent);
                drop(reply.slot);
                return;
            }
            CallerReplies::Many(replies) => replies,
        };
        let Some(caller) = replies.first().map(|r| r.caller.clone()) else {
            return;
        };
        let mut frames = Vec::with_capacity(replies.len());
        let mut slots = Vec::with_capacity(replies.len());
        for mut reply in replies {
            if let Some(items) = reply.stream.take() {
                // A stream opened: its `Stream` reply and items go from a task of its own.
                self.start_stream(reply, items);
                continue;
            }
            let frame = self
                .reply_frame(caller.as_str(), reply.id, reply.status, reply.body)
                .await;
            frames.push(frame);
            slots.push(reply.slot);
        }
        if frames.is_empty() {
            return;
        }
        let inbox = self.peers.inbox(caller.as_str());
        let sent = outbox::send_all(self, &inbox, frames).await;
        self.log_reply(caller.as_str(), sent);
        drop(slots);
    }

    /// The frame of a reply: inline, or a claim frame once its body is stored (for the
    /// caller's timeout plus a grace, within one command timeout). A body over
    /// `max_body_size`, or one that could not be stored, becomes an error reply instead.
    async fn reply_frame(&self, caller: &str, id: u64, status: Status, body: ReplyBody) -> Bytes {
        let error = |reason: String| {
            tracing::warn!(node = %self.id, %caller, %reason, "could not send a reply");
            ReplyBody::text(&reason).into_frame(id, Status::ServerError)
        };
        if body.frame_len() > self.claims.max_body() {
            return error(format!(
                "the reply is {} bytes, over the server's max_body_size of {} bytes",
                body.frame_len(),
                self.claims.max_body()
            ));
        }
        if !self.claims.claims(body.frame_len()) {
            return body.into_frame(id, status);
        }
        let frame = body.into_frame(id, status);
        let store = self.claim_if_large(frame, self.config.timeout);
        // Boxed: only large replies store a claim, and its state would otherwise make every
        // reply's future (one per caller and pass on the receive loop) ~1.5 KB instead of
        // under 1 KB.
        let store = Box::pin(tokio::time::timeout(
            self.config.transport.command_timeout,
            store,
        ));
        match store.await {
            Ok(Ok((frame, _))) => frame,
            Ok(Err(e)) => error(format!("the reply is large and could not be stored: {e}")),
            Err(_) => error(format!(
                "the reply is large and Redis did not store it within {:?}",
                self.config.transport.command_timeout
            )),
        }
    }

    fn log_reply(&self, caller: &str, sent: Result<u64, TransportError>) {
        match sent {
            Ok(0) => tracing::debug!(node = %self.id, %caller, "the caller is gone; reply dropped"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(node = %self.id, %caller, error = %e, "could not send a reply")
            }
        }
    }

    /// Waits until the receive loop has handled everything the subscriber connection delivered
    /// before now, by sending itself a reply and waiting for it to come back through the loop.
    pub(crate) async fn flush_inbound(&self) -> Result<(), Error> {
        let (slot, rx) = self.caller.pending().open();
        let frame = codec::encode_reply(slot.id, Status::Ok, codec::NIL);
        let frame = self.seal(&self.inbox, frame);
        self.wire.publish(self.inbox.clone(), frame).await?;
        match tokio::time::timeout(self.config.transport.command_timeout, rx).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::Timeout {
                method: "(inbox flush)".into(),
                after: self.config.transport.command_timeout,
                attempts: 1,
            }),
        }
    }

    /// Reads `method`'s providers from the registry for a call. For a first lookup
    /// (`first`), calls that start together share one read: the ones that waited find the
    /// method cached and skip theirs.
    pub(crate) async fn look_up(&self, method: &str, first: bool) -> Result<(), Error> {
        if !first {
            return self.refresh(&[method.to_string()]).await;
        }
        let _one_at_a_time = self.caller.first_lookup().await;
        if self.caller.balancer().knows(method) {
            return Ok(());
        }
        self.refresh(&[method.to_string()]).await
    }

    /// Heals the subscriptions a broker may end without the connection noticing (see
    /// `Transport::may_lose_subscriptions`; in a Redis Cluster, a slot that moved). The inbox
    /// is only this node's, so a count of 0 means its subscription is gone: it is sent again.
    /// The events channel is shared by every node, so a count cannot tell; it is simply
    /// subscribed again (harmless when the subscription is still there). The call channel is
    /// the heartbeat's to check, since a server that lost it must also announce itself again.
    pub(crate) async fn keep_subscribed(&self) -> Result<(), Error> {
        if !self.wire.may_lose_subscriptions() {
            return Ok(());
        }
        if self.wire.subscribers(&self.inbox).await? == 0 {
            tracing::warn!(node = %self.id, channel = %self.inbox, "the inbox subscription was lost (its slot moved?); subscribing again");
            self.wire.resubscribe(&self.inbox).await?;
        }
        self.wire.resubscribe(&self.events).await?;
        Ok(())
    }

    /// Looks up providers of `methods` in the registry and caches them. Only lists that
    /// changed since the generation the cache holds are read and replaced.
    pub(crate) async fn refresh(&self, methods: &[String]) -> Result<(), Error> {
        let balancer = self.caller.balancer();
        let known = balancer.generations(methods);
        let found = self.registry.providers(&self.wire, methods, &known).await?;
        for (method, found) in methods.iter().zip(found) {
            if let crate::transport::Lookup::Changed {
                generation,
                providers,
            } = found
            {
                balancer.set_at(method, generation, providers);
            }
        }
        Ok(())
    }

    pub(crate) fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |count| c.get(count);
        Stats {
            malformed_frames: get(Count::Malformed),
            misrouted_frames: get(Count::Misrouted),
            oversized_frames: get(Count::Oversized),
            lagged_frames: get(Count::Lagged),
            late_replies: get(Count::LateReplies),
            dropped_messages: get(Count::DroppedMessages),
            expired_calls: get(Count::ExpiredCalls),
            rerouted_calls: get(Count::Rerouted),
            overloaded_replies: get(Count::Overloaded),
            unauthenticated_frames: get(Count::Unauthenticated),
            replayed_frames: get(Count::Replayed),
            cancels_sent: get(Count::CancelsSent),
            cancelled_calls: get(Count::Cancelled),
            ignored_cancels: get(Count::IgnoredCancels),
            tasks: self.life.tasks() + self.dispatcher.get().map_or(0, |d| d.tasks()),
            pending_calls: self.caller.pending().len(),
            in_flight: self.in_flight(),
            open_streams: self.outlets.len(),
        }
    }

    /// Closes from a `Drop`: stops the loops at once and finishes closing on the node's runtime.
    pub(crate) fn close_in_background(self: &Arc<Self>) {
        self.life.stop();
        let node = self.clone();
        self.life.spawn_detached(async move { node.close().await });
    }

    /// Stops the loops and closes the connections; waiting calls fail with `Shutdown`.
    ///
    /// Every step may be repeated, so a close cancelled half-way is completed by the next
    /// one; once one has run to its end, further calls return at once.
    pub(crate) async fn close(&self) {
        if !self.life.begin_close() {
            return;
        }
        if let Some(dispatcher) = self.dispatcher.get() {
            // Routes may hold clients of this very node: dropping them breaks that cycle.
            dispatcher.clear();
        }
        if !self.life.stop_and_wait(Duration::from_secs(5)).await {
            tracing::warn!(node = %self.id, "background tasks did not stop within 5 s");
        }
        // Calls still waiting fail with `Shutdown`; their providers are told, best effort and
        // within one command timeout, so they drop the handlers.
        let given_up = self.caller.pending().take_sent();
        self.cancel_all(given_up).await;
        self.messages.close();
        self.wire.close().await;
        self.life.finish();
        tracing::debug!(node = %self.id, "node closed");
    }

    /// Sends a cancel for each of `calls` (call id, provider's call channel) straight to
    /// Redis (the loops have stopped), all at once, for at most one command timeout.
    async fn cancel_all(&self, calls: Vec<(u64, Channel)>) {
        if calls.is_empty() {
            return;
        }
        self.counters.add(Count::CancelsSent, calls.len() as u64);
        let sends = calls.into_iter().map(|(id, channel)| {
            let frame = self.seal(
                &channel,
                Bytes::from(codec::encode_cancel(id, self.id.as_str())),
            );
            self.wire.publish(channel, frame)
        });
        let all = futures_util::future::join_all(sends);
        if tokio::time::timeout(self.config.transport.command_timeout, all)
            .await
            .is_err()
        {
            tracing::debug!(node = %self.id, "cancels of the calls in flight not all sent at close");
        }
    }

    /// Routes one delivery (a frame, or each frame of a batch). Never fails: bad input is
    /// counted and logged. Hands `out` the work left for the receive loop to drive: sending
    /// the replies of calls handled right here.
    fn handle(self: &Arc<Self>, delivery: Delivery, out: &mut dyn FnMut(ReadyReply)) {
        let (channel, payload) = match delivery {
            Delivery::Frame { channel, payload } => (channel, payload),
            Delivery::Lagged(n) => {
                self.counters.add(Count::Lagged, n);
                tracing::warn!(node = %self.id, lost = n, "receive loop fell behind; frames lost (calls will time out and retry)");
                return;
            }
        };
        // A signed batch is opened as one frame: its signature covers every entry.
        let Some(payload) = self.open(&channel, payload) else {
            return;
        };
        let entries = match codec::split_batch(&payload) {
            None => return out_some(self.route(channel, payload), out),
            Some(Ok(entries)) if payload.len() <= codec::BATCH_MAX => entries,
            Some(Ok(_)) => {
                if let Some(seen) = self.counters.bump_and_sample(Count::Oversized) {
                    tracing::warn!(node = %self.id, %channel, len = payload.len(), max = codec::BATCH_MAX, seen, "dropped an oversized batch");
                }
                return;
            }
            Some(Err(e)) => {
                if let Some(seen) = self.counters.bump_and_sample(Count::Malformed) {
                    tracing::warn!(node = %self.id, %channel, len = payload.len(), error = %e, seen, "dropped a malformed batch");
                }
                return;
            }
        };
        for entry in entries {
            // Each entry on its own: a bug that panics on one costs that entry, not the rest.
            let routed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.route(channel.clone(), entry)
            }));
            match routed {
                Ok(reply) => out_some(reply, out),
                Err(_) => {
                    self.counters.bump(Count::Malformed);
                    tracing::error!(node = %self.id, "routing a frame of a batch panicked; frame dropped");
                }
            }
        }
    }

    /// Routes one frame (alone, or an entry of a batch) that arrived on `channel`.
    fn route(self: &Arc<Self>, channel: Channel, payload: Bytes) -> Option<ReadyReply> {
        let frame = match codec::decode(&payload) {
            Ok(frame) => frame,
            Err(e) => {
                if let Some(seen) = self.counters.bump_and_sample(Count::Malformed) {
                    tracing::warn!(node = %self.id, %channel, len = payload.len(), error = %e, seen, "dropped a malformed frame");
                }
                return None;
            }
        };
        // An inline frame may be neither longer than the frames this node accepts inline nor
        // than the bodies it accepts at all.
        let limit = self.config.max_frame_size.min(self.claims.max_body());
        if payload.len() > limit {
            if let Some(seen) = self.counters.bump_and_sample(Count::Oversized) {
                tracing::warn!(node = %self.id, %channel, len = payload.len(), max = limit, seen, "dropped an oversized frame");
            }
            // Only a call on this server's call channel that someone still waits for is
            // answered; anything else oversized is just dropped.
            if let Frame::Call(call) = frame
                && channel == self.calls
                && call.deadline_ms > 0
            {
                let node = self.clone();
                let reason = format!(
                    "the call is {} bytes, over this server's limit of {limit} bytes \
                     (max_frame_size {} inline, max_body_size {})",
                    payload.len(),
                    self.config.max_frame_size,
                    self.claims.max_body(),
                );
                self.life.spawn(async move {
                    let body = ReplyBody::text(&reason);
                    node.reply(call.reply_to.as_str(), call.id, Status::ServerError, body)
                        .await;
                });
            }
            return None;
        }
        match frame {
            Frame::Reply(reply) if channel == self.inbox => {
                if !self.caller.pending().complete(reply) {
                    self.counters.bump(Count::LateReplies);
                }
            }
            Frame::Item { id, seq, body } if channel == self.inbox => {
                if !self.caller.pending().item(id, seq, body) {
                    self.counters.bump(Count::LateReplies);
                }
            }
            Frame::KeepAlive { id, .. } if channel == self.inbox => {
                if !self.caller.pending().keep_alive(id) {
                    self.counters.bump(Count::LateReplies);
                }
            }
            Frame::Credit { id, caller, allow } if channel == self.inbox => {
                // Credit for a stream that has ended is normal (it crossed the end).
                self.outlets.credit(caller.as_str(), id, allow);
            }
            Frame::Message { from, body } if channel == self.inbox => {
                if !self.messages.push(Message { from, body })
                    && let Some(seen) = self.counters.bump_and_sample(Count::DroppedMessages)
                {
                    tracing::warn!(node = %self.id, seen, "message queue full or closed; message dropped");
                }
            }
            Frame::Call(call) if channel == self.calls => match self.dispatcher.get() {
                Some(dispatcher) => match dispatcher.dispatch(call) {
                    Dispatched::Ready(reply) => return Some(reply),
                    Dispatched::Expired => self.counters.bump(Count::ExpiredCalls),
                    Dispatched::Running(running) => {
                        // Reachable by a cancel from now on: a Cancel that follows this call
                        // on the channel finds it.
                        let (caller, id) = running.key();
                        let watch = dispatcher.watch(caller, id);
                        let node = self.clone();
                        dispatcher.track(async move {
                            let ran = running.run(watch.cancelled()).await;
                            node.finished(ran).await;
                        });
                    }
                    Dispatched::Once(running) => {
                        let (caller, id) = running.key();
                        let watch = dispatcher.watch(caller, id);
                        let node = self.clone();
                        dispatcher.track(async move { node.run_once(running, &watch).await });
                    }
                },
                None => self.counters.bump(Count::Misrouted),
            },
            Frame::Cancel { id, caller } if channel == self.calls => {
                let found = self
                    .dispatcher
                    .get()
                    .is_some_and(|d| d.cancel(caller.clone(), id));
                if !found {
                    self.counters.bump(Count::IgnoredCancels);
                    tracing::debug!(node = %self.id, %caller, id, "cancel for a call not running here (finished already, or never seen); ignored");
                }
            }
            Frame::Join { node, methods } if channel == self.events => {
                self.caller.balancer().join(&node, &methods);
                self.announce(|| crate::monitor::RegistryEvent::Joined { node, methods });
            }
            Frame::Leave { node } if channel == self.events => {
                self.caller.balancer().remove(&node);
                self.announce(|| crate::monitor::RegistryEvent::Left { node });
            }
            Frame::Claim { frame, claim } => self.claimed(channel, *frame, claim),
            other => {
                if let Some(seen) = self.counters.bump_and_sample(Count::Misrouted) {
                    tracing::warn!(node = %self.id, %channel, frame = ?kind(&other), seen, "dropped a frame that does not belong on this channel");
                }
            }
        }
        None
    }
}

impl Sink for Node {
    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn publish(
        &self,
        channel: Channel,
        frame: Bytes,
        timed: bool,
    ) -> impl std::future::Future<Output = Result<u64, TransportError>> + Send {
        // Sealed right before publishing, so sequence numbers go out in about the order
        // they were taken; a batch is sealed as one frame.
        let frame = self.seal(&channel, frame);
        // Chosen here, not in an `async` block: no state machine of its own around either
        // (fewer lines of code run per round trip: BENCHMARKS.md, "A lone call's path, cut, and
        // how low it can go").
        if timed {
            Either::Left(self.wire.publish(channel, frame))
        } else {
            Either::Right(self.wire.publish_untimed(channel, frame))
        }
    }

    fn spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.life.spawn_detached(work);
    }

    fn unsent(&self, id: u64, outcome: Result<u64, TransportError>) {
        self.caller.pending().unsent(id, outcome);
    }

    fn calls_waiting(&self) -> usize {
        self.caller.pending().len()
    }
}

/// Why a claimed body was not fetched.
#[derive(Debug)]
pub(crate) enum Unfetched {
    /// It is over this node's `max_body_size` (it was deleted unread).
    TooLarge(String),
    /// It was gone, did not match its reference, or Redis failed.
    Lost(String),
}

impl std::fmt::Display for Unfetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfetched::TooLarge(reason) | Unfetched::Lost(reason) => f.write_str(reason),
        }
    }
}

impl Node {
    /// Sends the reply of a handler that ran in a task, or counts why there is none.
    async fn finished(self: &Arc<Self>, ran: Ran) {
        match ran {
            // Crashed meanwhile (`testing::crash`): a dead process sends nothing, however long
            // its closing takes.
            Ran::Replied(_) if self.dispatcher.get().is_some_and(|d| d.is_silent()) => {}
            Ran::Replied(reply) => self.send_reply(reply).await,
            Ran::Expired => self.counters.bump(Count::ExpiredCalls),
            Ran::Cancelled => self.counters.bump(Count::Cancelled),
        }
    }

    /// Routes a claim frame: a call is fetched and run in a task of its own (bounded by the
    /// fetch budget and its deadline), a reply goes to its waiting call, which fetches the
    /// body itself (`Client::invoke`), a message is fetched and queued. A claim nobody will
    /// take is deleted.
    fn claimed(
        self: &Arc<Self>,
        channel: crate::transport::Channel,
        frame: Frame,
        claim: ClaimRef,
    ) {
        let key = || self.names.claim(&claim.token);
        match frame {
            Frame::Call(call) if channel == self.calls => {
                let Some(dispatcher) = self.dispatcher.get() else {
                    self.counters.bump(Count::Misrouted);
                    return self.discard_claim(key());
                };
                if call.deadline_ms == 0 {
                    self.counters.bump(Count::ExpiredCalls);
                    return self.discard_claim(key());
                }
                let watch = dispatcher.watch(&call.reply_to, call.id);
                let node = self.clone();
                dispatcher.track(async move { node.claimed_call(call, claim, watch).await });
            }
            Frame::Reply(mut reply) if channel == self.inbox => {
                reply.claim = Some(Box::new(claim));
                if !self.caller.pending().complete(reply) {
                    self.counters.bump(Count::LateReplies);
                    self.discard_claim(key());
                }
            }
            Frame::Message { from, .. } if channel == self.inbox => {
                let node = self.clone();
                let within = self.config.timeout + self.config.transport.command_timeout;
                self.life.spawn(async move {
                    let fetched = tokio::time::timeout(within, node.fetch_claim(Budget::Results, &claim)).await;
                    let body = match fetched {
                        Ok(Ok((body, _room))) => body,
                        Ok(Err(Unfetched::TooLarge(reason))) => {
                            tracing::warn!(node = %node.id, %from, %reason, "dropped an oversized message");
                            return;
                        }
                        Ok(Err(Unfetched::Lost(reason))) => {
                            node.counters.bump(Count::DroppedMessages);
                            tracing::warn!(node = %node.id, %from, %reason, "a large message could not be fetched; dropped");
                            return;
                        }
                        Err(_) => {
                            node.counters.bump(Count::DroppedMessages);
                            tracing::warn!(node = %node.id, %from, "a large message was not fetched in time; dropped");
                            return node.discard_claim(node.names.claim(&claim.token));
                        }
                    };
                    if !node.messages.push(Message { from, body }) {
                        node.counters.bump(Count::DroppedMessages);
                    }
                });
            }
            other => {
                if let Some(seen) = self.counters.bump_and_sample(Count::Misrouted) {
                    tracing::warn!(node = %self.id, %channel, frame = ?kind(&other), seen, "dropped a claim that does not belong on this channel");
                }
                self.discard_claim(key());
            }
        }
    }

    /// Fetches a claimed call's arguments, within its deadline and the fetch budget, then
    /// dispatches it as any call. The budget is held until its reply is sent.
    async fn claimed_call(self: Arc<Self>, call: Call, claim: ClaimRef, watch: Watch) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(call.deadline_ms);
        let fetch = tokio::time::timeout_at(deadline, self.fetch_claim(Budget::Calls, &claim));
        let fetched = tokio::select! {
            biased;
            () = watch.cancelled() => {
                // Given up before its arguments were even fetched: they are not needed.
                self.counters.bump(Count::Cancelled);
                let key = self.names.claim(&claim.token);
                let _ = self.wire.delete(&key).await;
                return;
            }
            fetched = fetch => fetched,
        };
        let args = match fetched {
            Ok(Ok(fetched)) => fetched,
            Ok(Err(unfetched)) => {
                let status = match unfetched {
                    Unfetched::TooLarge(_) => Status::ServerError,
                    Unfetched::Lost(_) => Status::ClaimLost,
                };
                let reason = format!("the arguments could not be had: {unfetched}");
                tracing::warn!(node = %self.id, method = %call.method, %reason, "claimed call refused");
                let body = ReplyBody::text(&reason);
                return self
                    .reply(call.reply_to.as_str(), call.id, status, body)
                    .await;
            }
            Err(_) => {
                // The caller has given up: nothing to answer, and its claim may still be there.
                self.counters.bump(Count::ExpiredCalls);
                let key = self.names.claim(&claim.token);
                let _ = self.wire.delete(&key).await;
                return;
            }
        };
        let (args, _room) = args;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let deadline_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
        let Some(dispatcher) = self.dispatcher.get() else {
            return;
        };
        let call = Call {
            args,
            deadline_ms,
            ..call
        };
        match dispatcher.dispatch(call) {
            Dispatched::Ready(reply) => self.send_reply(reply).await,
            Dispatched::Expired => self.counters.bump(Count::ExpiredCalls),
            Dispatched::Running(running) => {
                let ran = running.run(watch.cancelled()).await;
                self.finished(ran).await;
            }
            Dispatched::Once(running) => self.run_once(running, &watch).await,
        }
    }
}

fn out_some(reply: Option<ReadyReply>, out: &mut dyn FnMut(ReadyReply)) {
    if let Some(reply) = reply {
        out(reply);
    }
}

fn kind(frame: &Frame) -> &'static str {
    match frame {
        Frame::Call(_) => "call",
        Frame::Reply(_) => "reply",
        Frame::Message { .. } => "message",
        Frame::Join { .. } => "join",
        Frame::Leave { .. } => "leave",
        Frame::Claim { .. } => "claim",
        Frame::Item { .. } => "item",
        Frame::Credit { .. } => "credit",
        Frame::KeepAlive { .. } => "keep-alive",
        Frame::Cancel { .. } => "cancel",
    }
}

async fn receive_loop(node: Arc<Node>, mut inbound: Inbound) {
    // If this task is dropped without finishing (its runtime shut down), the whole node stops,
    // heartbeat included: a node that cannot receive must not stay registered.
    let _stop_all = node.life.stop_on_drop();
    // Replies of calls handled on this loop, being sent: at most `max_in_flight` of them,
    // plus error replies. One concrete future type, so they need no box of their own.
    //
    // They have no timer each (that cost ~2 % of throughput, BENCHMARKS.md). Instead they are
    // kept in two generations: every command timeout, the replies still in the older one
    // (their PUBLISH has waited between one and two timeouts) are given up, and the younger
    // generation becomes the older.
    let mut sending = FuturesUnordered::new();
    let mut older = FuturesUnordered::new();
    let period = node.config.transport.command_timeout;
    // Re-armed a full period after each rotation, so nothing is given up sooner than that.
    let tick = tokio::time::sleep(period);
    tokio::pin!(tick);
    let send = |replies: CallerReplies| node.reply_all(replies);
    // The replies made in one pass over the deliveries, sent per caller: one future each,
    // carrying that caller's replies together (`outbox::send_all`); one alone goes at once.
    let mut made = Vec::new();
    let cancelled = node.life.stopped();
    tokio::pin!(cancelled);
    loop {
        let delivery = tokio::select! {
            biased;
            _ = &mut cancelled => break,
            Some(()) = sending.next(), if !sending.is_empty() => continue,
            Some(()) = older.next(), if !older.is_empty() => continue,
            _ = &mut tick => {
                let stuck = std::mem::replace(&mut older, std::mem::take(&mut sending));
                give_up(&node, stuck.len(), period);
                tick.as_mut().reset(tokio::time::Instant::now() + period);
                continue;
            }
            delivery = inbound.recv() => delivery,
        };
        match delivery {
            Some(delivery) => handle_guarded(&node, delivery, &mut |r| made.push(r)),
            None => break,
        }
        // Take what else has arrived already without going round the `select!` for each
        // (which polls the cancellation and the replies being sent every time). Bounded, so
        // the replies made meanwhile go out soon and a stream of frames cannot hold the
        // loop here.
        for _ in 1..RECEIVE_BATCH {
            let Some(delivery) = inbound.try_recv() else {
                break;
            };
            handle_guarded(&node, delivery, &mut |r| made.push(r));
        }
        per_caller(&mut made, |group| sending.push(send(group)));
    }
    // Hand over what was already delivered (replies to calls still being waited for).
    while let Some(delivery) = inbound.try_recv() {
        handle_guarded(&node, delivery, &mut |r| made.push(r));
    }
    per_caller(&mut made, |group| sending.push(send(group)));
    // Finish sending the replies already made, for at most one command timeout.
    let mut both = futures_util::stream::select(sending, older);
    let drain = async { while both.next().await.is_some() {} };
    if tokio::time::timeout(period, drain).await.is_err() {
        let (young, old) = both.get_ref();
        give_up(&node, young.len() + old.len(), period);
    }
}

/// The replies of one pass to one caller, in the order they were made: one alone (the usual
/// case at low load) needs no vector.
enum CallerReplies {
    One(ReadyReply),
    Many(Vec<ReadyReply>),
}

/// Hands `each` the replies of one pass grouped by caller, each group in the order the
/// replies were made (a pass makes at most `RECEIVE_BATCH`, from few callers: a linear
/// search is enough).
fn per_caller(made: &mut Vec<ReadyReply>, mut each: impl FnMut(CallerReplies)) {
    if made.len() == 1 {
        if let Some(reply) = made.pop() {
            each(CallerReplies::One(reply));
        }
        return;
    }
    let mut groups: Vec<Vec<ReadyReply>> = Vec::new();
    for reply in made.drain(..) {
        match groups.iter_mut().find(|g| g[0].caller == reply.caller) {
            Some(group) => group.push(reply),
            None => groups.push(vec![reply]),
        }
    }
    for mut group in groups {
        if group.len() > 1 {
            each(CallerReplies::Many(group));
        } else if let Some(reply) = group.pop() {
            each(CallerReplies::One(reply));
        }
    }
}

/// Logs replies whose `PUBLISH` got no answer in time (they are dropped with it): `groups`
/// of them, each one caller's replies of one pass.
fn give_up(node: &Node, groups: usize, period: Duration) {
    if groups > 0 {
        tracing::warn!(node = %node.id, groups, after = ?period, "could not send replies (groups per caller): PUBLISH timed out");
    }
}

/// Most deliveries the receive loop takes in one go (see `receive_loop`).
const RECEIVE_BATCH: usize = 32;

/// Routes one delivery; a bug that panics on some frame costs that frame, not the node.
fn handle_guarded(node: &Arc<Node>, delivery: Delivery, out: &mut dyn FnMut(ReadyReply)) {
    let handled =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| node.handle(delivery, out)));
    if handled.is_err() {
        node.counters.bump(Count::Malformed);
        tracing::error!(node = %node.id, "routing a frame panicked; frame dropped");
    }
}

/// A method not called for this long leaves the provider cache (and the periodic refresh).
const IDLE_METHOD: Duration = Duration::from_secs(600);

/// Re-reads the providers of every method this node calls, every heartbeat and after every
/// reconnect: the fallback for join/leave events missed while a connection was down. Also
/// heals subscriptions the broker may have ended silently (`Node::keep_subscribed`).
async fn refresh_loop(node: Arc<Node>) {
    let mut reconnects = node.wire.reconnects();
    let mut tick = tokio::time::interval(node.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.life.stopped() => break,
            _ = tick.tick() => {}
            r = reconnects.recv() => match r {
                // Join events may have been missed while this node was away: what it
                // believed gone may be back, so trust the registry again.
                Some(()) => node.caller.balancer().forget_gone(),
                None => break,
            },
        }
        if let Err(e) = node.keep_subscribed().await {
            tracing::debug!(node = %node.id, error = %e, "could not check the subscriptions; trying again next heartbeat");
        }
        node.caller.balancer().evict_idle(IDLE_METHOD);
        node.caller.balancer().forget_expired_suspects();
        let methods = node.caller.balancer().methods();
        if methods.is_empty() {
            continue;
        }
        if let Err(e) = node.refresh(&methods).await {
            tracing::debug!(node = %node.id, error = %e, "provider refresh failed; keeping the cached view");
        }
    }
}

/// Owns a client's or monitor's node: when the last handle goes, the node closes.
///
/// (A server owns its node itself, see `Server`'s `Drop`.) Handles that only borrow a node,
/// like `Server::client`, hold the `Arc<Node>` without an `Owner`, so a handler that keeps
/// such a client cannot keep its own server alive.
pub(crate) struct Owner {
    pub(crate) node: Arc<Node>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.node.close_in_background();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(caller: &'static str, id: u64) -> ReadyReply {
        ReadyReply {
            caller: crate::envelope::WireStr::new(Bytes::from_static(caller.as_bytes()))
                .expect("UTF-8"),
            id,
            status: Status::Ok,
            body: ReplyBody::text("ok"),
            stream: None,
            slot: None,
        }
    }

    fn grouped(made: Vec<ReadyReply>) -> Vec<(String, Vec<u64>)> {
        let mut made = made;
        let mut groups = Vec::new();
        per_caller(&mut made, |group| {
            groups.push(match group {
                CallerReplies::One(r) => (format!("one {}", r.caller.as_str()), vec![r.id]),
                CallerReplies::Many(rs) => (
                    format!("many {}", rs[0].caller.as_str()),
                    rs.iter().map(|r| r.id).collect(),
                ),
            })
        });
        assert!(made.is_empty(), "every reply is handed over");
        groups
    }

    #[test]
    fn replies_are_grouped_per_caller_in_order_and_a_lone_one_goes_alone() {
        assert_eq!(grouped(vec![reply("a", 1)]), [("one a".into(), vec![1])]);
        assert_eq!(
            grouped(vec![
                reply("a", 1),
                reply("b", 2),
                reply("a", 3),
                reply("a", 4)
            ]),
            [("many a".into(), vec![1, 3, 4]), ("one b".into(), vec![2])]
        );
        assert!(grouped(Vec::new()).is_empty());
    }
}
