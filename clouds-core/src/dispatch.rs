//! The server side of a call: route lookup, in-flight limit, deadline, running the handler
//! (on the receive loop while it does not wait, in its own task once it does).

use foldhash::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio_util::task::TaskTracker;

use crate::codec::{self, ReplyBody};
use crate::envelope::{Call, Status, WireStr};
use crate::error::Error;
use crate::locks::{read, write};
use crate::node::Node;
use crate::service::Route;
use crate::stats::bump;

/// Routes calls to handlers and runs them, at most `max_in_flight` at once.
pub(crate) struct Dispatcher {
    routes: RwLock<HashMap<String, Route>>,
    /// Calls running or sending their reply now.
    running: Arc<AtomicUsize>,
    max_in_flight: usize,
    /// `Config::spawn_handlers`: a task per call from the start.
    spawn_all: bool,
    /// Every handler running in a task of its own, so shutdown can wait for them. (Replies
    /// the receive loop sends are finished by the loop before it stops, or given up after a
    /// command timeout.)
    pub(crate) tasks: TaskTracker,
}

/// A reply for the receive loop to send: a handler's outcome, or an error reply.
pub(crate) struct ReadyReply {
    pub(crate) caller: WireStr,
    pub(crate) id: u64,
    pub(crate) status: Status,
    pub(crate) body: ReplyBody,
    /// The call's place among those in flight, given back once the reply is sent.
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
            routes: RwLock::default(),
            running: Arc::default(),
            max_in_flight,
            tasks: TaskTracker::new(),
        }
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
            table.insert(route.name.clone(), route);
        }
        Ok(names)
    }

    /// Forgets every route (at close).
    pub(crate) fn clear(&self) {
        write(&self.routes).clear();
    }

    /// Calls running or sending their reply now.
    pub(crate) fn in_flight(&self) -> usize {
        self.running.load(Ordering::Acquire).min(self.max_in_flight)
    }

    /// Starts handling one call.
    ///
    /// The handler is polled once right here, on the receive loop. If it finishes (most do),
    /// its reply is returned for the receive loop to send alongside the next deliveries, as
    /// raw pub/sub code would: no task per call. A handler that has to wait moves on to a task
    /// of its own, so it never holds up the loop while waiting. Error replies (unknown method,
    /// overloaded) are also returned for the loop to send. `Config::spawn_handlers` gives
    /// every handler its own task from the start instead.
    pub(crate) fn dispatch(&self, node: &Arc<Node>, call: Call) -> Option<ReadyReply> {
        if call.deadline_ms == 0 {
            // The caller has already given up on this attempt.
            bump(&node.counters.expired_calls);
            return None;
        }
        let route = {
            let table = read(&self.routes);
            table.get(call.method.as_str()).map(|r| r.handler.clone())
        };
        let Some(handler) = route else {
            return Some(ReadyReply {
                body: ReplyBody::text(call.method.as_str()),
                caller: call.reply_to,
                id: call.id,
                status: Status::UnknownMethod,
                slot: None,
            });
        };
        let Some(slot) = self.enter() else {
            return Some(ReadyReply {
                caller: call.reply_to,
                id: call.id,
                status: Status::Overloaded,
                body: ReplyBody::from_encoded(codec::NIL),
                slot: None,
            });
        };
        let Call {
            id,
            method,
            reply_to,
            deadline_ms,
            args,
        } = call;
        let node = node.clone();
        if self.spawn_all {
            let deadline = Instant::now() + Duration::from_millis(deadline_ms);
            self.tasks.spawn(async move {
                if Instant::now() > deadline {
                    // Waited for a worker thread past the caller's deadline: the caller has
                    // moved on (and may have retried elsewhere), so running it now would only
                    // duplicate.
                    bump(&node.counters.expired_calls);
                    return;
                }
                let outcome = handler(args).await;
                if Instant::now() > deadline {
                    tracing::debug!(node = %node.id, %method, "handler finished after the caller's deadline");
                }
                node.reply(reply_to.as_str(), id, outcome.status, outcome.body).await;
                drop(slot);
            });
            return None;
        }
        let mut running = handler(args);
        // A no-op waker: if the handler is not done, the task it moves to polls it again at
        // once, with that task's waker, before anything could have been missed.
        let mut cx = Context::from_waker(Waker::noop());
        match running.as_mut().poll(&mut cx) {
            Poll::Ready(outcome) => Some(ReadyReply {
                caller: reply_to,
                id,
                status: outcome.status,
                body: outcome.body,
                slot: Some(slot),
            }),
            Poll::Pending => {
                let deadline = Instant::now() + Duration::from_millis(deadline_ms);
                self.tasks.spawn(async move {
                    let outcome = running.await;
                    if Instant::now() > deadline {
                        tracing::debug!(node = %node.id, %method, "handler finished after the caller's deadline");
                    }
                    node.reply(reply_to.as_str(), id, outcome.status, outcome.body).await;
                    drop(slot);
                });
                None
            }
        }
    }
}
