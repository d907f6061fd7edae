//! Calling providers: pick one, publish the call, wait for the reply, retry on failure.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::attempt::{Attempts, Next, Outcome, Verdict, backoff};
use crate::balance::Choice;
use crate::codec;
use crate::config::Config;
use crate::envelope::{Reply, Status};
use crate::error::{Error, RemoteError};
use crate::message::Messages;
use crate::node::{Node, Owner};
use crate::node_id::NodeId;
use crate::outbox;
use crate::pending::Answer;
use crate::stats::{Count, Stats};
use futures_util::FutureExt as _;
use tracing::Instrument;

/// A connection to the services of one Redis deployment: calls methods, sends messages.
///
/// Cheap to clone; clones share the connections. Typed stubs (`HelloClient::new(&client)`)
/// are built on it. A [`Server`](crate::Server) hands out a client sharing its connections
/// with [`Server::client`](crate::Server::client).
///
/// ```no_run
/// # async fn demo() -> Result<(), clouds_core::Error> {
/// let config = clouds_core::Config::from_url("redis://127.0.0.1:6379/3")?;
/// let client = clouds_core::Client::connect(config).await?.with_retries(2);
/// let echoed: String = client.call("test.echo", ("hi",)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    node: Arc<Node>,
    /// Set when this handle (with its clones) owns the node; unset for `Server::client`.
    owner: Option<Arc<Owner>>,
    retries: u32,
    timeout: Duration,
    /// Credit window of the streams this handle opens.
    stream_window: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", self.id())
            .field("retries", &self.retries)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// How one attempt ended.
enum Attempt {
    Replied(Reply),
    /// PUBLISH reached nobody: the provider's inbox is gone and the call certainly did not run.
    NotDelivered,
    /// The node shut down while waiting.
    Closed,
    /// The reply's body travelled as a claim that could not be fetched (the reason).
    ResultLost(String),
}

/// The method a ping calls: braces are not allowed in method names, so no server serves it.
const PING: &str = "{ping}";

impl Client {
    /// Connects a new client node.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), clouds_core::Error> {
    /// let config = clouds_core::Config::from_url("redis://127.0.0.1:6379/3")?;
    /// let client = clouds_core::Client::connect(config).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(config: Config) -> Result<Client, Error> {
        let node = Node::start(config, "client").await?;
        let owner = Arc::new(Owner { node: node.clone() });
        let mut client = Client::borrowing(node);
        client.owner = Some(owner);
        Ok(client)
    }

    /// A handle on a node owned by someone else (a server).
    pub(crate) fn borrowing(node: Arc<Node>) -> Client {
        Client {
            retries: node.config().retries,
            timeout: node.config().timeout,
            stream_window: node.config().stream_window,
            owner: None,
            node,
        }
    }

    pub(crate) fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// This node's id.
    ///
    /// ```
    /// # fn demo(client: clouds_core::Client) {
    /// println!("calling as {}", client.id());
    /// # }
    /// ```
    pub fn id(&self) -> &NodeId {
        self.node().id()
    }

    /// This handle, retrying calls up to `retries` more times on timeout, overload, no
    /// provider or a Redis error.
    ///
    /// ```
    /// # fn demo(client: clouds_core::Client) {
    /// let patient = client.with_retries(5); // up to 6 attempts per call
    /// # }
    /// ```
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// This handle, waiting `timeout` (at least 1 ms) for each attempt's reply.
    ///
    /// ```
    /// # fn demo(client: clouds_core::Client) {
    /// let quick = client.with_timeout(std::time::Duration::from_millis(200));
    /// # }
    /// ```
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// This handle, opening streams with a credit window of `items` (at least 1) instead of
    /// the config's [`Config::stream_window`](crate::Config::stream_window).
    ///
    /// ```
    /// # fn demo(client: clouds_core::Client) {
    /// let bulk = client.with_stream_window(1024); // for a fast consumer of small items
    /// # }
    /// ```
    pub fn with_stream_window(mut self, items: u32) -> Self {
        self.stream_window = items.max(1);
        self
    }

    /// Calls `method` by name with `args` as a tuple (`(a, b)`, `(a,)` or `()`).
    ///
    /// An application error from the handler arrives as [`Error::Remote`].
    ///
    /// ```
    /// # async fn demo(client: clouds_core::Client) -> Result<(), clouds_core::Error> {
    /// let sum: i64 = client.call("math.add", (2, 3)).await?;
    /// let none: () = client.call("test.ping", ()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn call<A, R>(&self, method: &str, args: A) -> Result<R, Error>
    where
        A: Serialize + Sync,
        R: DeserializeOwned,
    {
        self.call_ref(method, &args).await
    }

    /// [`Client::call`] with borrowed arguments (what typed stubs use).
    pub(crate) fn call_ref<A, R>(
        &self,
        method: &str,
        args: &A,
    ) -> impl Future<Output = Result<R, Error>>
    where
        A: Serialize + Sync + ?Sized,
        R: DeserializeOwned,
    {
        // Not an `async fn`: no layer of state of its own in every call's future.
        self.call_as(method, args, false)
    }

    /// Calls `method` by name **exactly once**, however often it is retried: every attempt
    /// carries the same call id, and a server whose route is marked once
    /// ([`Route::once`](crate::Route::once), `#[clouds(once)]`) runs the call only if no
    /// attempt of it ran or runs, and answers retries with the first run's result
    /// (`docs/protocol.md` §6.5). Typed stubs of methods marked `#[clouds(once)]` call this
    /// themselves. Against a route that is not marked, it is an ordinary call (each attempt
    /// may run: at least once).
    ///
    /// A call made so is not cancelled when an attempt times out (its retry waits for the
    /// same run instead), nor when its future is dropped: once started, it runs to its end.
    ///
    /// ```
    /// # async fn demo(client: clouds_core::Client) -> Result<(), clouds_core::Error> {
    /// let receipt: String = client.with_retries(3).call_once("pay.charge", (1999u64,)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn call_once<A, R>(&self, method: &str, args: A) -> Result<R, Error>
    where
        A: Serialize + Sync,
        R: DeserializeOwned,
    {
        self.call_as(method, &args, true).await
    }

    /// [`Client::call`] or [`Client::call_once`] with borrowed arguments.
    pub(crate) async fn call_as<A, R>(&self, method: &str, args: &A, once: bool) -> Result<R, Error>
    where
        A: Serialize + Sync + ?Sized,
        R: DeserializeOwned,
    {
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let result = match self.invoke(method, &args, once).await {
            Ok((node, reply)) => decode_reply(method, node, reply),
            Err(e) => Err(e),
        };
        #[cfg(feature = "metrics")]
        crate::telemetry::client_call(
            method,
            match &result {
                Ok(_) => "ok",
                Err(e) => crate::telemetry::outcome_of(e),
            },
            started.elapsed().as_secs_f64(),
        );
        result
    }

    /// Sends `message` to the node `to`. Fails with [`Error::Unreachable`] when no such node
    /// listens.
    ///
    /// ```
    /// # async fn demo(client: clouds_core::Client, server: clouds_core::NodeId) -> Result<(), clouds_core::Error> {
    /// client.send(&server, &"ping").await?;
    /// client.send(&server, &(1, "structured", vec![2, 3])).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        to: impl AsRef<str>,
        message: &T,
    ) -> Result<(), Error> {
        let to = to.as_ref();
        let node = self.node();
        if node.is_closed() {
            return Err(Error::Shutdown);
        }
        let body = codec::encode_value(message).map_err(|reason| Error::Codec {
            action: format!("encode a message to {to}"),
            reason,
        })?;
        let frame = codec::encode_message(node.id().as_str(), &body);
        let frame = node.sized(frame, || format!("message to {to}"))?;
        let (frame, claim) = node.claim_if_large(frame, self.timeout).await?;
        let inbox = node.names().inbox(to);
        let receivers = node.send_frame(&inbox, frame, true).await;
        if let (Some(key), Ok(0) | Err(_)) = (claim, &receivers) {
            node.discard_claim(key);
        }
        if receivers? == 0 {
            return Err(Error::Unreachable { node: to.into() });
        }
        Ok(())
    }

    /// Measures the round trip to the server `node`, through its receive loop: sends it a
    /// call of a method no server can serve (`{ping}`, see `docs/protocol.md` §6.4) and waits
    /// up to this client's timeout for the "unknown method" answer. Runs no handler and
    /// does not touch the server's figures; any server version answers it.
    ///
    /// Fails with [`Error::Unreachable`] if nobody takes calls on that node's call channel,
    /// and [`Error::Timeout`] if no answer comes in time.
    ///
    /// ```
    /// # async fn demo(client: clouds_core::Client, server: clouds_core::NodeId) -> Result<(), clouds_core::Error> {
    /// let rtt = client.ping(&server).await?;
    /// println!("{server}: {rtt:?}");
    /// # Ok(()) }
    /// ```
    pub async fn ping(&self, node: &NodeId) -> Result<Duration, Error> {
        let caller = self.node();
        if caller.is_closed() {
            return Err(Error::Shutdown);
        }
        let deadline_ms = u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let (slot, reply) = caller.caller().pending().open();
        let frame =
            codec::encode_call_framed(slot.id, PING, caller.id().as_str(), deadline_ms, None, &())
                .map_err(|reason| Error::Codec {
                    action: "encode a ping".into(),
                    reason,
                })?;
        let calls = caller.names().calls(node.as_str());
        let started = tokio::time::Instant::now();
        let round_trip = async {
            // Through the outbox like a call (signed there when frames are signed); untimed:
            // the timeout below bounds it.
            if caller.send_frame(&calls, frame, false).await? == 0 {
                return Err(Error::Unreachable { node: node.clone() });
            }
            reply.await.map_err(|_| Error::Shutdown)
        };
        match tokio::time::timeout(self.timeout, round_trip).await {
            Ok(Ok(_)) => {
                slot.answered();
                Ok(started.elapsed())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Timeout {
                method: PING.to_string(),
                after: started.elapsed(),
                attempts: 1,
            }),
        }
    }

    /// The messages other nodes sent to this one.
    ///
    /// ```
    /// # async fn demo(client: clouds_core::Client) -> Result<(), clouds_core::Error> {
    /// while let Some(msg) = client.messages().next().await {
    ///     println!("{} sent {:?}", msg.from(), msg.decode::<String>()?);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn messages(&self) -> Messages {
        self.node().messages().reader()
    }

    /// Counters of this node (bad frames received, calls pending, ...).
    ///
    /// ```
    /// # fn demo(client: clouds_core::Client) {
    /// let stats = client.stats();
    /// println!("{} calls waiting, {} bad frames seen", stats.pending_calls, stats.malformed_frames);
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        self.node().stats()
    }

    /// Closes this node's connections now, instead of when the last handle drops. Calls still
    /// waiting fail with [`Error::Shutdown`].
    ///
    /// A client from [`Server::client`](crate::Server::client) does not own its node: closing
    /// it does nothing (shut the server down instead).
    ///
    /// ```
    /// # async fn demo(client: clouds_core::Client) {
    /// client.close().await;
    /// assert!(matches!(client.call::<_, ()>("a.b", ()).await, Err(clouds_core::Error::Shutdown)));
    /// # }
    /// ```
    pub async fn close(&self) {
        if self.owner.is_some() {
            self.node().close().await;
        }
    }

    /// Runs a call with retries; returns the provider that answered and its reply.
    ///
    /// What follows each attempt is decided by [`Attempts`] (see `attempt.rs`); this drives
    /// it: looks providers up, publishes, waits, and tells the balancer what it learnt.
    ///
    /// The arguments are encoded into each attempt's frame, straight from the caller's values:
    /// a call waiting for its reply holds no encoded copy of them.
    ///
    /// `once`: every attempt keeps the first one's call id, and none is cancelled (see
    /// [`Client::call_once`]).
    pub(crate) fn invoke(
        &self,
        method: &str,
        args: &(dyn codec::Args + Sync),
        once: bool,
    ) -> impl Future<Output = Result<(NodeId, Reply), Error>> {
        // Not an `async fn`: no layer of state of its own in every call's future.
        self.invoke_with(method, args, once, None)
    }

    /// Opens the stream `method` by name with `args` as a tuple, and reads its items as `T`.
    ///
    /// The stream is opened as a call is (with this handle's retries and per-attempt
    /// timeout, re-routed as a call is while no item has been delivered); once open, it is
    /// read as an [`ItemStream`](crate::ItemStream), with this handle's credit window
    /// ([`Client::with_stream_window`], by default `Config::stream_window`) and the
    /// config's `stream_idle_timeout`. Typed stubs of methods
    /// returning [`Streaming`](crate::Streaming) call this.
    ///
    /// ```
    /// # async fn demo(client: clouds_core::Client) -> Result<(), clouds_core::Error> {
    /// use futures_util::StreamExt;
    /// let mut numbers = client.open_stream::<_, u64>("count.up", (10u64,)).await?;
    /// while let Some(n) = numbers.next().await {
    ///     println!("{}", n?);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn open_stream<A, T>(
        &self,
        method: &str,
        args: A,
    ) -> Result<crate::ItemStream<T>, Error>
    where
        A: Serialize + Sync,
        T: DeserializeOwned,
    {
        self.open_stream_as(method, &args, crate::stream::plain::<T>())
            .await
    }

    /// Opens a stream whose items `decode` reads (plain, or `Result` items).
    pub(crate) async fn open_stream_as<T>(
        &self,
        method: &str,
        args: &(dyn codec::Args + Sync),
        decode: crate::stream::Decode<T>,
    ) -> Result<crate::ItemStream<T>, Error> {
        let window = self.stream_window;
        let inlet = Arc::new(crate::stream::Inlet::new(window));
        let (provider, reply) = self.invoke_with(method, args, false, Some(&inlet)).await?;
        if reply.status != Status::Stream {
            return Err(crate::stream::not_opened(method, provider, reply));
        }
        Ok(crate::ItemStream::opened(
            self.clone(),
            inlet,
            method,
            provider,
            reply.id,
            decode,
        ))
    }

    /// [`Client::invoke`]; with `inlet`, each attempt opens a stream read into it (a stream
    /// is not cancelled with a Cancel frame: dropping it stops it with a credit of 0).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would keep its arguments twice in every call's future"
    )]
    fn invoke_with(
        &self,
        method: &str,
        args: &(dyn codec::Args + Sync),
        once: bool,
        inlet: Option<&Arc<crate::stream::Inlet>>,
    ) -> impl Future<Output = Result<(NodeId, Reply), Error>> {
        // An `async move` block rather than an `async fn`: an async fn keeps its arguments
        // twice in its future (as arguments and as locals), and every call in flight holds
        // this future.
        async move {
            let mut once_id = None;
            let node = self.node();
            let mut refresh = false;
            let mut looked_up = false;
            // Pause before the next attempt (a backoff, or waiting for a provider to join).
            let mut wait = false;
            let started = tokio::time::Instant::now();
            let mut attempts = Attempts::new(method, self.retries);
            let deadline_ms = u64::try_from(self.timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            loop {
                // The one pause, at the top, where nothing else of an attempt is alive: held
                // across it, an error, a choice or a verdict would weigh on every call's
                // future, waiting or not (memory per call in flight).
                if std::mem::take(&mut wait) {
                    pause(attempts.used(), node).await;
                }
                if node.is_closed() {
                    return Err(Error::Shutdown);
                }
                // The cold paths (registry reads, backoff sleeps) are boxed: inlined, they would
                // make every call's future as large as the largest of them, for its whole life.
                if refresh {
                    if let Err(e) = Box::pin(node.look_up(method, attempts.is_first())).await {
                        if let Next::Fail(e) = attempts.lookup_failed(e) {
                            return Err(e);
                        }
                        wait = true;
                        continue;
                    }
                    refresh = false;
                }
                let provider = match node.caller().balancer().choose(method, attempts.tried()) {
                    Choice::Provider(provider) => provider,
                    Choice::Unknown if !looked_up => {
                        // Only names never looked up need checking: a cached one passed this.
                        crate::namespace::validate_method(method).map_err(|reason| {
                            Error::InvalidMethod {
                                method: method.to_string(),
                                reason,
                            }
                        })?;
                        looked_up = true;
                        refresh = true;
                        continue;
                    }
                    Choice::Unknown | Choice::Nobody => {
                        if let Next::Fail(e) = attempts.no_provider() {
                            return Err(e);
                        }
                        // Wait for a provider to join (the join event fills the cache), then
                        // look again.
                        wait = true;
                        refresh = true;
                        continue;
                    }
                };
                if attempts.used() > 0 {
                    crate::telemetry::retry(method);
                }
                attempts.start();
                let number = attempts.used();
                let outcome = {
                    let calls = node.peers().calls(provider.as_str());
                    let (slot, reply) = if inlet.is_some() {
                        node.caller().pending().open_with(inlet)
                    } else if once {
                        let opened = node.caller().pending().open_as(once_id, None);
                        once_id = Some(opened.0.id);
                        opened
                    } else {
                        node.caller().pending().open_to(Some(calls.clone()))
                    };
                    let _load = node.caller().balancer().start_call(&provider);
                    // The frame, the attempt's time, room for the frame and the attempt's span.
                    // In a block of its own, so that the call's future does not keep the trace
                    // context and the encoder across the attempt's wait (memory per call in
                    // flight); nor the span twice: a local once borrowed keeps its room to the
                    // end of its scope, even after it moved into the attempt's future.
                    let (frame, timeout, _room, span, recorded) = {
                        // This attempt's span, and the trace context it sends (none without
                        // tracing).
                        let span = crate::spans::attempt(method, provider.as_str(), number);
                        let trace = node
                            .config()
                            .send_trace_context
                            .then(|| crate::spans::outgoing(&span))
                            .flatten();
                        let encode = |deadline_ms: u64| {
                            let frame = codec::encode_call_framed(
                                slot.id,
                                method,
                                node.id().as_str(),
                                deadline_ms,
                                trace.as_ref().map(|t| t.element(number)),
                                args,
                            )
                            .map_err(|reason| Error::Codec {
                                action: format!("encode the arguments of {method}"),
                                reason,
                            })?;
                            node.sized(frame, || format!("the call to {method}"))
                        };
                        let mut frame = encode(deadline_ms)?;
                        let mut timeout = self.timeout;
                        // Room for the frame among this node's calls in flight; held until the
                        // attempt ends. Waiting for room counts towards the attempt's timeout,
                        // and is not the provider's fault: a wait that times out is not held
                        // against it.
                        let caller = node.caller();
                        let need = caller.room_needed(frame.len());
                        let room = match caller.try_room(need) {
                            Some(room) => room,
                            None => {
                                let waiting = tokio::time::Instant::now();
                                let room = match tokio::time::timeout(
                                    timeout,
                                    Box::pin(caller.room(need)),
                                )
                                .await
                                {
                                    Ok(Ok(room)) => room,
                                    Ok(Err(_)) => return Err(Error::Shutdown),
                                    Err(_) => {
                                        return Err(Error::Timeout {
                                            method: method.to_string(),
                                            after: started.elapsed(),
                                            attempts: attempts.used(),
                                        });
                                    }
                                };
                                // What is left of the attempt's time, also for the provider.
                                timeout = timeout
                                    .saturating_sub(waiting.elapsed())
                                    .max(Duration::from_millis(1));
                                let left_ms =
                                    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                                frame = encode(left_ms.max(1))?;
                                room
                            }
                        };
                        let recorded = !span.is_disabled();
                        (frame, timeout, room, span, recorded)
                    };
                    // A large call's arguments go to Redis first, the claim frame after them.
                    let mut claim = None;
                    let attempt = async {
                        let frame = if node.claims().claims(frame.len()) {
                            let (frame, key) =
                                Box::pin(node.claim_if_large(frame, timeout)).await?;
                            claim = key;
                            frame
                        } else {
                            frame
                        };
                        // Untimed: the attempt's timeout below bounds the PUBLISH too. Sealed
                        // after claiming (when published), so a signature covers a claimed
                        // body's digest. The frame may go in a batch with other calls to this
                        // provider: its PUBLISH's outcome is this call's (`outbox.rs`). A call
                        // alone learns it here (`Some`); one in a batch only if it failed or
                        // reached nobody, as its answer below: one wait per call, not two.
                        // Boxed: the outbox's state and the PUBLISH would otherwise weigh on
                        // every call's future for its whole life (memory per call in flight).
                        let sent = if inlet.is_some() {
                            // A stream being opened always waits for its PUBLISH.
                            Some(Box::pin(node.send_frame(&calls, frame, false)).await)
                        } else {
                            // Boxed before any await, so that the call's future holds a pointer
                            // and not the publishing future (a match on the returned `Option`
                            // would keep it in the call's state across the await).
                            match outbox::send_call(node, &calls, frame, slot.id).map(Box::pin) {
                                Some(publishing) => publishing.await,
                                None => None,
                            }
                        };
                        if sent.transpose()? == Some(0) {
                            return Ok::<_, Error>(Attempt::NotDelivered);
                        }
                        // The call reached its provider, or waits to: from here until its
                        // answer, giving up (this future dropped: the caller's, or the attempt's
                        // timeout) tells the provider, so it drops the handler (a queued call
                        // still goes, the Cancel after it on the same channel).
                        // (A call made once is never cancelled: its retries wait for its run.)
                        let given_up = GiveUp::new(node, &calls, slot.id, !once);
                        let answer = match reply.await {
                            Ok(answer) => answer,
                            Err(_) => return Ok(Attempt::Closed),
                        };
                        given_up.answered();
                        let reply = match answer {
                            Answer::Reply(reply) => reply,
                            Answer::NotDelivered => return Ok(Attempt::NotDelivered),
                            Answer::Failed(e) => return Err(e.into()),
                        };
                        // A large result waits in Redis: fetched now, within the attempt's time.
                        let Some(result) = reply.claim else {
                            return Ok(Attempt::Replied(reply));
                        };
                        Ok(
                            match Box::pin(node.fetch_claim(crate::claim::Budget::Results, &result))
                                .await
                            {
                                Ok((body, _room)) => Attempt::Replied(crate::envelope::Reply {
                                    body,
                                    claim: None,
                                    ..reply
                                }),
                                Err(unfetched) => Attempt::ResultLost(unfetched.to_string()),
                            },
                        )
                    };
                    // The span moves into the attempt's future, which records the outcome in
                    // it: the call's future holds one span, not a second one beside it.
                    // (A combinator, not an async block: that would hold the attempt twice.)
                    let outcome = tokio::time::timeout(timeout, attempt)
                        .map(move |outcome| {
                            if recorded {
                                // Inside the span: the current span is this attempt's.
                                record_attempt(&tracing::Span::current(), &outcome);
                            }
                            outcome
                        })
                        .instrument(span)
                        .await;
                    if let Ok(Ok(Attempt::Replied(_) | Attempt::ResultLost(_))) = outcome {
                        slot.answered();
                    } else if let Some(key) = claim {
                        // Not answered: the provider may never take the arguments.
                        node.discard_claim(key);
                    }
                    // Matched here, so that the attempt's result ends with the block.
                    match outcome {
                        Ok(Ok(Attempt::Replied(reply))) => match reply.status {
                            Status::Overloaded => {
                                node.counters().bump(Count::Overloaded);
                                Outcome::Overloaded
                            }
                            Status::ShuttingDown => Outcome::ShuttingDown,
                            _ => {
                                node.caller().balancer().clear_suspect(&provider);
                                return Ok((provider, reply));
                            }
                        },
                        Ok(Ok(Attempt::ResultLost(reason))) => {
                            return Err(Error::ClaimLost {
                                method: method.to_string(),
                                node: provider,
                                what: "result",
                                reason,
                            });
                        }
                        Ok(Ok(Attempt::NotDelivered)) => Outcome::NotDelivered,
                        Ok(Ok(Attempt::Closed)) => return Err(Error::Shutdown),
                        Ok(Err(e)) => Outcome::Failed(e),
                        Err(_elapsed) => Outcome::TimedOut,
                    }
                };
                wait = {
                    let has_untried =
                        |tried: &[NodeId]| node.caller().balancer().has_untried(method, tried);
                    let (verdict, next) =
                        attempts.after(&provider, outcome, has_untried, started.elapsed());
                    match verdict {
                        Verdict::Unchanged => {}
                        Verdict::Suspect => node.caller().balancer().suspect(&provider),
                        Verdict::Gone => {
                            node.caller().balancer().mark_gone(&provider);
                            node.counters().bump(Count::Rerouted);
                        }
                        Verdict::Leaving => {
                            node.caller().balancer().remove(&provider);
                            node.counters().bump(Count::Rerouted);
                        }
                    }
                    match next {
                        Next::Reroute => false,
                        Next::Retry {
                            pause: wait,
                            refresh: again,
                        } => {
                            refresh |= again;
                            wait
                        }
                        Next::Fail(e) => return Err(e),
                    }
                };
            }
        }
    }
}

/// Tells a provider its call was given up, if dropped before [`GiveUp::answered`]: the drop
/// guard of an attempt whose call reached its provider. Sending never blocks the drop: the
/// cancel goes out from a task of its own (`Node::cancel`).
struct GiveUp<'a> {
    node: &'a Arc<Node>,
    calls: &'a crate::transport::Channel,
    id: u64,
    armed: bool,
}

impl<'a> GiveUp<'a> {
    fn new(
        node: &'a Arc<Node>,
        calls: &'a crate::transport::Channel,
        id: u64,
        armed: bool,
    ) -> Self {
        GiveUp {
            node,
            calls,
            id,
            armed,
        }
    }

    /// The reply came: nothing to cancel.
    fn answered(mut self) {
        self.armed = false;
    }
}

impl Drop for GiveUp<'_> {
    fn drop(&mut self) {
        // A closing node cancels its calls in flight itself (`Node::close`).
        if self.armed && !self.node.is_closed() {
            self.node.cancel(self.calls.clone(), self.id);
        }
    }
}

/// Sleeps for `backoff`, boxed (see `Client::invoke`).
async fn pause(attempts: u32, node: &Node) {
    Box::pin(tokio::time::sleep(backoff(
        attempts,
        node.config().heartbeat,
    )))
    .await;
}

fn text(body: &[u8]) -> String {
    codec::decode_value::<String>(body).unwrap_or_else(|_| "(no description)".to_string())
}

/// Turns a reply into the value, or into the error it reports.
pub(crate) fn decode_reply<T: DeserializeOwned>(
    method: &str,
    node: NodeId,
    reply: Reply,
) -> Result<T, Error> {
    let method_s = || method.to_string();
    match reply.status {
        Status::Ok => codec::decode_value(&reply.body).map_err(|reason| Error::Codec {
            action: format!("decode the reply of {method} from {node}"),
            reason,
        }),
        Status::AppError => Err(Error::Remote(RemoteError {
            method: method_s(),
            node,
            payload: reply.body,
        })),
        Status::Panic => Err(Error::Panicked {
            method: method_s(),
            node,
            message: text(&reply.body),
        }),
        Status::UnknownMethod => Err(Error::UnknownMethod {
            method: method_s(),
            node,
        }),
        Status::BadArguments => Err(Error::BadArguments {
            method: method_s(),
            node,
            reason: text(&reply.body),
        }),
        Status::ServerError => Err(Error::Server {
            method: method_s(),
            node,
            reason: text(&reply.body),
        }),
        Status::ClaimLost => Err(Error::ClaimLost {
            method: method_s(),
            node,
            what: "arguments",
            reason: text(&reply.body),
        }),
        Status::Unrecognized => Err(Error::Protocol(format!(
            "{node} answered {method} with an unknown {} (a newer protocol?)",
            text(&reply.body)
        ))),
        Status::Stream => Err(Error::Protocol(format!(
            "{method} on {node} is a streaming method: open it with Client::open_stream"
        ))),
        Status::Overloaded | Status::ShuttingDown => Err(Error::Protocol(format!(
            "unexpected status {:?} from {node}",
            reply.status
        ))),
    }
}

/// An attempt's outcome on its span.
fn record_attempt(
    span: &tracing::Span,
    outcome: &Result<Result<Attempt, Error>, tokio::time::error::Elapsed>,
) {
    let failed = |kind| crate::spans::failed(span, kind);
    match outcome {
        Ok(Ok(Attempt::Replied(reply))) => crate::spans::replied(span, reply.status),
        Ok(Ok(Attempt::ResultLost(_))) => failed("claim_lost"),
        Ok(Ok(Attempt::NotDelivered)) => failed("not_delivered"),
        Ok(Ok(Attempt::Closed)) => failed("shutdown"),
        Ok(Err(_)) => failed("error"),
        Err(_) => failed("timeout"),
    }
}
