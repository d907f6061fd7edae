//! The server side of a call: route lookup, in-flight limit, deadline, and the first poll of
//! the handler.
//!
//! Dispatch does no I/O and knows nothing of the node: it turns a call into a [`Dispatched`],
//! a reply ready to send or a handler still running, and the node sends the one and spawns the
//! other (`node.rs`).

use foldhash::HashMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::codec::{self, ReplyBody};
use crate::context::CallContext;
use crate::envelope::{Call, Status, WireStr};
use crate::error::Error;
use crate::locks::{read, write};
use crate::meter::{Meter, Timing};
use crate::service::{BoxFuture, Handler, Outcome, Route};

/// Routes calls to handlers and runs them, at most `max_in_flight` at once.
pub(crate) struct Dispatcher {
    /// Each method's handler and its figures (`meter`).
    routes: RwLock<HashMap<String, Served>>,
    /// Calls running or sending their reply now.
    running: Arc<AtomicUsize>,
    max_in_flight: usize,
    /// `Config::spawn_handlers`: a task per call from the start.
    spawn_all: bool,
    /// [`OPEN`], [`CLOSED`] or [`SILENT`]: one load per call tells all three apart.
    mode: AtomicU8,
    /// Every handler running in a task of its own, so shutdown can wait for them. (Replies
    /// the receive loop sends are finished by the loop before it stops, or given up after a
    /// command timeout.)
    tasks: TaskTracker,
    /// When the current window of the methods' figures began (see `summary`).
    window_start: std::sync::Mutex<std::time::Instant>,
    /// The server's node id, for the handlers' spans.
    server: crate::node_id::NodeId,
    /// Cancelled when the server drains or closes: its streams end (`stream.rs`).
    closing: tokio_util::sync::CancellationToken,
    /// Cancelled by `testing::crash`: streams stop without a word, as in a dead process.
    silenced: tokio_util::sync::CancellationToken,
    /// The calls running in tasks of their own, by caller and call id, so a cancel can stop
    /// them. An entry lives as long as its [`Watch`], so nothing outlives its call.
    watched: Arc<Watched>,
}

/// A served method: its handler, its figures, and whether it runs once per call
/// (`Route::once`).
type Served = (Handler, Arc<Meter>, bool);

/// The table of running calls a cancel can reach.
/// Each entry carries the number of the watch that made it: a call delivered twice (a fault)
/// has two watches for one key, and the first to drop must not take the other's entry.
type Watched = std::sync::Mutex<HashMap<(WireStr, u64), (u64, CancellationToken)>>;

/// Numbers the watches (see [`Watched`]).
static WATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A running call's entry in the table of calls a cancel can reach (see [`Dispatcher::watch`]);
/// removed when dropped, so the table holds only calls still running.
pub(crate) struct Watch {
    table: Arc<Watched>,
    key: (WireStr, u64),
    number: u64,
    token: CancellationToken,
}

impl Watch {
    /// Resolves when the call's caller has cancelled it.
    pub(crate) async fn cancelled(&self) {
        self.token.cancelled().await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut table = crate::locks::lock(&self.table);
        // Only this watch's own entry (a cancel may have taken it already).
        if table
            .get(&self.key)
            .is_some_and(|(number, _)| *number == self.number)
        {
            table.remove(&self.key);
        }
    }
}

/// How a handler handed over as [`Running`] ended.
pub(crate) enum Ran {
    /// It finished: its reply, to send.
    Replied(ReadyReply),
    /// It was still fresh at its deadline: it never ran, and nothing is answered.
    Expired,
    /// Its caller cancelled it: it was dropped where it stood, and nothing is answered.
    Cancelled,
}

/// Calls are served.
const OPEN: u8 = 0;
/// The node is closing: calls still arriving are refused as `ShuttingDown`, which callers
/// re-route at no cost (Redis may deliver a few after the unsubscribe returned).
const CLOSED: u8 = 1;
/// Set by `testing::crash`: calls still arriving get no answer at all, as from a dead process.
const SILENT: u8 = 2;

/// What became of one call.
pub(crate) enum Dispatched {
    /// The caller had already given up on it (deadline 0, or past it before a worker took
    /// it): nothing runs and nothing is answered.
    Expired,
    /// A reply to send now: the handler finished at its first poll, or an error reply.
    Ready(ReadyReply),
    /// A handler still running: to be driven in a task of its own, then answered.
    Running(Running),
    /// A call of a method marked once, not started: to be recorded in Redis first, and run
    /// only if no attempt of the same call ran or runs (`once.rs`).
    Once(Running),
}

/// A handler that did not finish at its first poll (or was not polled yet, with
/// `spawn_handlers`), with what its reply needs.
pub(crate) struct Running {
    work: Work,
    caller: WireStr,
    id: u64,
    method: WireStr,
    /// When the caller stops waiting.
    deadline: Instant,
    slot: InFlight,
    /// Times the call for its method's figures.
    timing: Timing,
    /// The handler's span (`spans.rs`).
    span: tracing::Span,
    /// With the fields above, what the handler reads as its `CallContext`.
    deadline_ms: u64,
    trace: Option<Box<crate::envelope::Trace>>,
}

/// A handler's work, started or not.
enum Work {
    /// Polled once on the receive loop, waiting now.
    Started(BoxFuture<Outcome>),
    /// Not called yet (`spawn_handlers`): it is skipped if a worker only gets to it after
    /// the deadline, so the handler's code (argument decoding included) never runs then.
    Fresh(Handler, bytes::Bytes),
}

impl Running {
    /// The caller and id of the call, as a cancel names them.
    pub(crate) fn key(&self) -> (&WireStr, u64) {
        (&self.caller, self.id)
    }

    /// When the caller stops waiting for this attempt.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The method called.
    pub(crate) fn method(&self) -> &str {
        self.method.as_str()
    }

    /// Answers without running the handler, with `status` and `body` (an earlier attempt's
    /// outcome, `once.rs`).
    pub(crate) fn answer(self, status: Status, body: ReplyBody) -> ReadyReply {
        crate::spans::replied(&self.span, status);
        self.timing.finish(status);
        ReadyReply {
            caller: self.caller,
            id: self.id,
            status,
            body,
            stream: None,
            slot: Some(self.slot),
        }
    }

    /// Gives the call up without running it or answering: counted as expired.
    pub(crate) fn skip(self) {
        self.timing.expired();
    }

    /// Drives the handler to its reply, unless `cancelled` resolves first: then the handler's
    /// future is dropped where it stands (its drop guards run, its `select!` arms see it) and
    /// its in-flight place is freed. [`Ran::Expired`] if it was still fresh at the deadline
    /// (the caller has moved on, and may have retried elsewhere: running it would only
    /// duplicate). The handler runs in its span, with its `CallContext` set.
    pub(crate) async fn run(self, cancelled: impl std::future::Future<Output = ()>) -> Ran {
        let context = CallContext::new(
            &self.method,
            &self.caller,
            self.timing.started(),
            self.deadline_ms,
            self.trace.as_deref(),
        );
        let Running {
            work,
            caller,
            id,
            method,
            deadline,
            slot,
            timing,
            span,
            ..
        } = self;
        let handling = span.clone();
        let work = async move {
            match work {
                Work::Started(running) => Some(context.scope(running).instrument(handling).await),
                Work::Fresh(handler, args) => {
                    // A task of its own from the start (`spawn_handlers`), for handlers that
                    // compute for long or block. The yield lets tokio wake an idle worker
                    // before the handler holds this one: else, if this worker was the one that
                    // polled the runtime's I/O, nobody would read the next deliveries (to any
                    // node of the process) until the handler returned, since tokio leaves the
                    // other idle workers asleep while only one task is queued.
                    crate::yielding::yield_once().await;
                    // Skipped if its deadline passed while it waited for a worker.
                    if Instant::now() > deadline {
                        return None;
                    }
                    let running = async move { handler(args).await };
                    Some(context.scope(running).instrument(handling).await)
                }
            }
        };
        let outcome = tokio::select! {
            biased;
            () = cancelled => {
                crate::spans::failed(&span, "cancelled");
                timing.cancelled();
                tracing::debug!(%method, %caller, id, "handler dropped: its caller cancelled the call");
                return Ran::Cancelled;
            }
            outcome = work => outcome,
        };
        let Some(outcome) = outcome else {
            timing.expired();
            return Ran::Expired;
        };
        crate::spans::replied(&span, outcome.status);
        timing.finish(outcome.status);
        if Instant::now() > deadline {
            tracing::debug!(%method, "handler finished after the caller's deadline");
        }
        Ran::Replied(ReadyReply {
            caller,
            id,
            status: outcome.status,
            body: outcome.body,
            stream: outcome.stream,
            slot: Some(slot),
        })
    }
}

/// A reply for the receive loop to send: a handler's outcome, or an error reply.
pub(crate) struct ReadyReply {
    pub(crate) caller: WireStr,
    pub(crate) id: u64,
    pub(crate) status: Status,
    pub(crate) body: ReplyBody,
    /// A streaming method's items, to serve after the reply (which is then `Stream`).
    pub(crate) stream: Option<crate::stream::Events>,
    /// The call's place among those in flight, given back once the reply is sent (for a
    /// stream, once the stream has ended).
    pub(crate) slot: Option<InFlight>,
}

/// One call counted against `max_in_flight` until dropped. A plain counter: calls over the
/// limit are refused at once, never queued, so nothing waits for a slot.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Dispatcher {
    pub(crate) fn new(max_in_flight: usize, spawn_all: bool) -> Self {
        Dispatcher {
            spawn_all,
            mode: AtomicU8::new(OPEN),
            routes: RwLock::default(),
            running: Arc::default(),
            max_in_flight,
            tasks: TaskTracker::new(),
            window_start: std::sync::Mutex::new(std::time::Instant::now()),
            server: crate::node_id::NodeId::from(""),
            closing: tokio_util::sync::CancellationToken::new(),
            silenced: tokio_util::sync::CancellationToken::new(),
            watched: Arc::default(),
        }
    }

    /// Makes the call `id` of `caller` reachable by a cancel until the returned watch drops.
    /// Called on the receive loop right when the call is handed over, so a cancel that
    /// arrives after the call (on the same channel, in order) always finds it.
    pub(crate) fn watch(&self, caller: &WireStr, id: u64) -> Watch {
        let key = (caller.clone(), id);
        let token = CancellationToken::new();
        let number = WATCHES.fetch_add(1, Ordering::Relaxed);
        crate::locks::lock(&self.watched).insert(key.clone(), (number, token.clone()));
        Watch {
            table: self.watched.clone(),
            key,
            number,
            token,
        }
    }

    /// Cancels the call `id` of `caller` if it is running in a task; false if no such call
    /// runs here (it finished, never came, or finished at its first poll).
    pub(crate) fn cancel(&self, caller: WireStr, id: u64) -> bool {
        let token = crate::locks::lock(&self.watched).remove(&(caller, id));
        match token {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Calls a cancel can reach now (running in tasks of their own).
    #[cfg(test)]
    pub(crate) fn watched(&self) -> usize {
        crate::locks::lock(&self.watched).len()
    }

    /// The same, naming `server` in its handlers' spans.
    pub(crate) fn serving_as(self, server: crate::node_id::NodeId) -> Self {
        Dispatcher { server, ..self }
    }

    /// A place among the calls in flight, if one is free.
    fn enter(&self) -> Option<InFlight> {
        if self.running.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.running.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlight(self.running.clone()))
    }

    /// Adds routes; fails without adding any if a name is invalid, taken or repeated.
    pub(crate) fn add(&self, routes: Vec<Route>) -> Result<Vec<String>, Error> {
        let mut table = write(&self.routes);
        let mut names = Vec::with_capacity(routes.len());
        for route in &routes {
            let invalid = |reason: String| Error::InvalidMethod {
                method: route.name.clone(),
                reason,
            };
            crate::namespace::validate_method(&route.name).map_err(invalid)?;
            if table.contains_key(&route.name) || names.contains(&route.name) {
                return Err(invalid("already registered on this server".into()));
            }
            names.push(route.name.clone());
        }
        for route in routes {
            let meter = Arc::new(Meter::new(&route.name));
            table.insert(route.name, (route.handler, meter, route.once));
        }
        Ok(names)
    }

    /// Answers nothing from now on (a simulated crash).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn silence(&self) {
        self.mode.store(SILENT, Ordering::Release);
        self.silenced.cancel();
    }

    /// Whether [`Dispatcher::silence`] was called: replies of handlers still running are then
    /// not sent either.
    pub(crate) fn is_silent(&self) -> bool {
        self.mode.load(Ordering::Acquire) == SILENT
    }

    /// Forgets every route and refuses calls from now on (at close).
    pub(crate) fn clear(&self) {
        // A silent (crashed) server stays silent.
        let _ = self
            .mode
            .compare_exchange(OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire);
        write(&self.routes).clear();
        self.closing.cancel();
    }

    /// Cancelled when the server drains or closes (streams end then, with a reply), and
    /// when it plays dead (`testing::crash`: streams stop without one).
    pub(crate) fn closing(
        &self,
    ) -> (
        tokio_util::sync::CancellationToken,
        tokio_util::sync::CancellationToken,
    ) {
        (self.closing.clone(), self.silenced.clone())
    }

    /// Every method's figures as a registry entry's `stats` field; the window (since the
    /// previous summary) ends now and the next starts.
    pub(crate) fn summary(&self) -> String {
        let window = {
            let mut start = crate::locks::lock(&self.window_start);
            let now = std::time::Instant::now();
            std::mem::replace(&mut *start, now).elapsed()
        };
        let table = read(&self.routes);
        crate::meter::summary(
            table
                .iter()
                .map(|(name, (_, meter, _))| (name.as_str(), &**meter)),
            window,
        )
    }

    /// Calls running or sending their reply now.
    pub(crate) fn in_flight(&self) -> usize {
        self.running.load(Ordering::Acquire).min(self.max_in_flight)
    }

    /// Runs `work` as one of the handlers that shutdown waits for.
    pub(crate) fn track(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(work);
    }

    /// Handlers running in tasks of their own now.
    pub(crate) fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Waits up to `timeout` for every handler running in a task of its own; false if some are
    /// still running then. New ones can no longer be tracked after this starts.
    pub(crate) async fn drain(&self, timeout: Duration) -> bool {
        self.tasks.close();
        // Streams would run on (a log tail never ends): they are ended now, cleanly.
        self.closing.cancel();
        tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok()
    }

    /// Starts handling one call.
    ///
    /// The handler is polled once right here, on the receive loop. If it finishes (most do),
    /// its reply is returned for the receive loop to send alongside the next deliveries, as
    /// raw pub/sub code would: no task per call. A handler that has to wait is returned as
    /// [`Dispatched::Running`], for a task of its own, so it never holds up the loop while
    /// waiting. Error replies (unknown method, overloaded) are ready replies too.
    /// `Config::spawn_handlers` returns every handler unpolled, for a task from the start.
    pub(crate) fn dispatch(&self, call: Call) -> Dispatched {
        let mode = self.mode.load(Ordering::Acquire);
        if call.deadline_ms == 0 || mode == SILENT {
            // The caller has already given up on this attempt (or this server plays dead).
            return Dispatched::Expired;
        }
        if mode == CLOSED {
            return refuse(
                call,
                Status::ShuttingDown,
                ReplyBody::from_encoded(codec::NIL),
            );
        }
        let route = {
            let table = read(&self.routes);
            table
                .get(call.method.as_str())
                .map(|(handler, meter, once)| (handler.clone(), meter.clone(), *once))
        };
        let Some((handler, meter, once)) = route else {
            let body = ReplyBody::text(call.method.as_str());
            return refuse(call, Status::UnknownMethod, body);
        };
        let Some(slot) = self.enter() else {
            meter.overloaded();
            return refuse(
                call,
                Status::Overloaded,
                ReplyBody::from_encoded(codec::NIL),
            );
        };
        let Call {
            id,
            method,
            reply_to,
            deadline_ms,
            args,
            trace,
        } = call;
        let deadline = || Instant::now() + Duration::from_millis(deadline_ms);
        let timing = meter.start();
        let span = crate::spans::handler(
            method.as_str(),
            self.server.as_str(),
            reply_to.as_str(),
            trace.as_deref(),
        );
        if once {
            // Recorded in Redis before it runs (`once.rs`): never polled here.
            return Dispatched::Once(Running {
                work: Work::Fresh(handler, args),
                deadline_ms,
                trace,
                caller: reply_to,
                id,
                method,
                deadline: deadline(),
                slot,
                timing,
                span,
            });
        }
        let context = || {
            let (arrived, trace) = (timing.started(), trace.as_deref());
            CallContext::new(&method, &reply_to, arrived, deadline_ms, trace)
        };
        if self.spawn_all {
            return Dispatched::Running(Running {
                work: Work::Fresh(handler, args),
                deadline_ms,
                trace,
                caller: reply_to,
                id,
                method,
                deadline: deadline(),
                slot,
                timing,
                span,
            });
        }
        // Called and polled once with its span entered and its context set, as it will be in
        // a task of its own if it waits.
        let (handling, poll) = span.in_scope(|| {
            context().sync_scope(|| {
                let mut handling = handler(args);
                // A no-op waker: if the handler is not done, the task it moves to polls it
                // again at once, with that task's waker, before anything could have been
                // missed.
                let mut cx = Context::from_waker(Waker::noop());
                let poll = handling.as_mut().poll(&mut cx);
                (handling, poll)
            })
        });
        match poll {
            Poll::Ready(outcome) => {
                crate::spans::replied(&span, outcome.status);
                timing.finish(outcome.status);
                Dispatched::Ready(ReadyReply {
                    caller: reply_to,
                    id,
                    status: outcome.status,
                    body: outcome.body,
                    stream: outcome.stream,
                    slot: Some(slot),
                })
            }
            // Its deadline is read only here: a handler that finishes at once costs no clock.
            Poll::Pending => Dispatched::Running(Running {
                work: Work::Started(handling),
                deadline_ms,
                trace,
                caller: reply_to,
                id,
                method,
                deadline: deadline(),
                slot,
                timing,
                span,
            }),
        }
    }
}

/// An answer that runs no handler and holds no place in flight.
fn refuse(call: Call, status: Status, body: ReplyBody) -> Dispatched {
    Dispatched::Ready(ReadyReply {
        caller: call.reply_to,
        id: call.id,
        status,
        body,
        stream: None,
        slot: None,
    })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;

    use super::*;
    use crate::envelope::{Frame, Reply};

    fn call(method: &str, deadline_ms: u64, args: impl serde::Serialize) -> Call {
        let wire = |s: &str| WireStr::new(Bytes::copy_from_slice(s.as_bytes())).expect("utf-8");
        Call {
            id: 7,
            method: wire(method),
            reply_to: wire("client-a"),
            deadline_ms,
            args: Bytes::from(codec::encode_value(&args).expect("encode")),
            trace: None,
        }
    }

    /// The reply as the caller would decode it.
    fn decoded(reply: ReadyReply) -> Reply {
        assert_eq!(reply.caller.as_str(), "client-a");
        match codec::decode(&reply.body.into_frame(reply.id, reply.status)) {
            Ok(Frame::Reply(reply)) => reply,
            other => panic!("not a reply: {:?}", other.map(|_| ())),
        }
    }

    fn ready(dispatched: Dispatched) -> ReadyReply {
        match dispatched {
            Dispatched::Ready(reply) => reply,
            Dispatched::Expired => panic!("expired"),
            Dispatched::Running(_) | Dispatched::Once(_) => panic!("still running"),
        }
    }

    fn replied(ran: Ran) -> ReadyReply {
        match ran {
            Ran::Replied(reply) => reply,
            Ran::Expired => panic!("expired"),
            Ran::Cancelled => panic!("cancelled"),
        }
    }

    #[tokio::test]
    async fn a_cancelled_handler_is_dropped_and_frees_its_place() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let d = Dispatcher::new(4, false);
        d.add(vec![gated(gate)]).expect("add");
        let Dispatched::Running(running) = d.dispatch(call("slow.wait", 1000, ())) else {
            panic!("a waiting handler must be handed over");
        };
        let (caller, id) = running.key();
        let watch = d.watch(caller, id);
        assert_eq!(d.in_flight(), 1);
        let caller = caller.clone();
        let run = tokio::spawn(async move { running.run(watch.cancelled()).await });
        assert!(d.cancel(caller, 7));
        assert!(matches!(run.await.expect("join"), Ran::Cancelled));
        assert_eq!(d.in_flight(), 0);
        assert_eq!(d.watched(), 0);
        let summary = d.summary();
        assert!(summary.contains("cancelled=1"), "{summary}");
        assert!(summary.contains("abandoned=0"), "{summary}");
    }

    fn adder() -> Route {
        Route::new("math.add", |(a, b): (i64, i64)| async move {
            Ok::<_, Infallible>(a + b)
        })
    }

    /// A handler that waits for `gate` before answering.
    fn gated(gate: Arc<tokio::sync::Notify>) -> Route {
        Route::new("slow.wait", move |(): ()| {
            let gate = gate.clone();
            async move {
                gate.notified().await;
                Ok::<_, Infallible>(1u8)
            }
        })
    }

    #[test]
    fn a_handler_that_does_not_wait_is_answered_at_once() {
        let d = Dispatcher::new(4, false);
        d.add(vec![adder()]).expect("add");
        let reply = ready(d.dispatch(call("math.add", 1000, (2, 3))));
        assert!(
            reply.slot.is_some(),
            "holds its place until the reply is sent"
        );
        assert_eq!(d.in_flight(), 1);
        let reply = decoded(reply);
        assert_eq!((reply.id, reply.status), (7, Status::Ok));
        assert_eq!(codec::decode_value::<i64>(&reply.body), Ok(5));
        assert_eq!(d.in_flight(), 0, "the slot went with the reply");
    }

    #[test]
    fn unknown_methods_are_answered_with_their_name() {
        let d = Dispatcher::new(4, false);
        d.add(vec![adder()]).expect("add");
        let reply = ready(d.dispatch(call("math.sub", 1000, (2, 3))));
        assert!(reply.slot.is_none());
        let reply = decoded(reply);
        assert_eq!(reply.status, Status::UnknownMethod);
        assert_eq!(
            codec::decode_value::<String>(&reply.body).as_deref(),
            Ok("math.sub")
        );
    }

    #[test]
    fn wrong_arguments_are_a_bad_arguments_reply() {
        let d = Dispatcher::new(4, false);
        d.add(vec![adder()]).expect("add");
        let reply = decoded(ready(d.dispatch(call("math.add", 1000, ("two", 3)))));
        assert_eq!(reply.status, Status::BadArguments);
        let reply = decoded(ready(d.dispatch(call("math.add", 1000, (1,)))));
        assert_eq!(reply.status, Status::BadArguments);
    }

    #[test]
    fn a_call_whose_caller_gave_up_is_not_run() {
        let d = Dispatcher::new(4, false);
        d.add(vec![adder()]).expect("add");
        assert!(matches!(
            d.dispatch(call("math.add", 0, (2, 3))),
            Dispatched::Expired
        ));
        assert_eq!(d.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_waiting_handler_is_handed_over_and_answers_when_driven() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let d = Dispatcher::new(4, false);
        d.add(vec![gated(gate.clone())]).expect("add");
        let Dispatched::Running(running) = d.dispatch(call("slow.wait", 1000, ())) else {
            panic!("a waiting handler must be handed over");
        };
        assert!(
            matches!(running.work, Work::Started(_)),
            "it was polled once already"
        );
        assert_eq!(d.in_flight(), 1);
        gate.notify_one();
        let reply = decoded(replied(running.run(std::future::pending()).await));
        assert_eq!(reply.status, Status::Ok);
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn calls_over_the_limit_are_refused_as_overloaded() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let d = Dispatcher::new(1, false);
        d.add(vec![gated(gate), adder()]).expect("add");
        let first = d.dispatch(call("slow.wait", 1000, ()));
        assert!(matches!(first, Dispatched::Running(_)));
        let refused = ready(d.dispatch(call("math.add", 1000, (1, 1))));
        assert!(refused.slot.is_none());
        assert_eq!(decoded(refused).status, Status::Overloaded);
        drop(first);
        assert_eq!(d.in_flight(), 0, "a dropped handler frees its place");
        let reply = decoded(ready(d.dispatch(call("math.add", 1000, (1, 1)))));
        assert_eq!(reply.status, Status::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn with_spawn_handlers_nothing_runs_on_the_loop_and_stale_calls_are_skipped() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let d = Dispatcher::new(4, true);
        d.add(vec![Route::new("count.up", move |(): ()| {
            let runs = counted.clone();
            async move { Ok::<_, Infallible>(runs.fetch_add(1, Ordering::SeqCst)) }
        })])
        .expect("add");
        let Dispatched::Running(running) = d.dispatch(call("count.up", 50, ())) else {
            panic!("spawn_handlers hands every call over");
        };
        assert!(matches!(running.work, Work::Fresh(..)));
        assert_eq!(runs.load(Ordering::SeqCst), 0, "not polled on the loop");
        // A worker that only gets to it after the caller's deadline skips it.
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(matches!(
            running.run(std::future::pending()).await,
            Ran::Expired
        ));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        let Dispatched::Running(running) = d.dispatch(call("count.up", 1000, ())) else {
            panic!("spawn_handlers hands every call over");
        };
        assert_eq!(
            decoded(replied(running.run(std::future::pending()).await)).status,
            Status::Ok
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn panicking_handlers_answer_panic() {
        let d = Dispatcher::new(4, false);
        d.add(vec![Route::new("boom.now", |(): ()| async move {
            if true {
                panic!("kaboom");
            }
            Ok::<_, Infallible>(())
        })])
        .expect("add");
        let reply = decoded(ready(d.dispatch(call("boom.now", 1000, ()))));
        assert_eq!(reply.status, Status::Panic);
        assert!(
            codec::decode_value::<String>(&reply.body)
                .expect("text")
                .contains("kaboom")
        );
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn routes_are_added_all_or_nothing() {
        let d = Dispatcher::new(4, false);
        d.add(vec![adder()]).expect("add");
        let again = d.add(vec![
            Route::new("math.mul", |(a, b): (i64, i64)| async move {
                Ok::<_, Infallible>(a * b)
            }),
            adder(),
        ]);
        assert!(matches!(again, Err(Error::InvalidMethod { .. })));
        let reply = decoded(ready(d.dispatch(call("math.mul", 1000, (2, 3)))));
        assert_eq!(
            reply.status,
            Status::UnknownMethod,
            "math.mul was not added"
        );
        assert!(matches!(
            d.add(vec![Route::new("no spaces", |(): ()| async {
                Ok::<_, Infallible>(())
            })]),
            Err(Error::InvalidMethod { .. })
        ));
        d.clear();
        let reply = decoded(ready(d.dispatch(call("math.add", 1000, (2, 3)))));
        assert_eq!(
            reply.status,
            Status::ShuttingDown,
            "a closed server refuses, so callers re-route"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tracked_handlers_up_to_its_timeout() {
        let d = Dispatcher::new(4, false);
        d.track(async { tokio::time::sleep(Duration::from_millis(100)).await });
        assert_eq!(d.tasks(), 1);
        assert!(d.drain(Duration::from_secs(1)).await);
        let d = Dispatcher::new(4, false);
        d.track(async { tokio::time::sleep(Duration::from_secs(100)).await });
        assert!(!d.drain(Duration::from_secs(1)).await);
    }
}
