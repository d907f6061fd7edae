//! The server side of a call: route lookup, in-flight limit, deadline, running the handler.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::codec;
use crate::envelope::{Call, Status};
use crate::error::Error;
use crate::locks::{read, write};
use crate::node::Node;
use crate::service::Route;
use crate::stats::bump;

/// Routes calls to handlers and runs them, at most `max_in_flight` at once.
pub(crate) struct Dispatcher {
    routes: RwLock<HashMap<String, Route>>,
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    /// Every running handler (and error reply), so shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
}

impl Dispatcher {
    pub(crate) fn new(max_in_flight: usize) -> Self {
        Dispatcher {
            routes: RwLock::default(),
            slots: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            tasks: TaskTracker::new(),
        }
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

    /// Handlers running now.
    pub(crate) fn in_flight(&self) -> usize {
        self.max_in_flight - self.slots.available_permits()
    }

    /// Starts handling one call; returns at once (the handler runs in its own task).
    pub(crate) fn dispatch(&self, node: &Arc<Node>, call: Call) {
        if call.deadline_ms == 0 {
            // The caller has already given up on this attempt.
            bump(&node.counters.expired_calls);
            return;
        }
        let deadline = Instant::now() + Duration::from_millis(call.deadline_ms);
        let route = {
            let table = read(&self.routes);
            table.get(&call.method).map(|r| r.handler.clone())
        };
        let node = node.clone();
        let Some(handler) = route else {
            self.tasks.spawn(async move {
                let body = codec::encode_value(&call.method).unwrap_or_default();
                node.reply(&call.reply_to, call.id, Status::UnknownMethod, &body)
                    .await;
            });
            return;
        };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.tasks.spawn(async move {
                node.reply(&call.reply_to, call.id, Status::Overloaded, codec::NIL)
                    .await;
            });
            return;
        };
        self.tasks.spawn(async move {
            if Instant::now() > deadline {
                // Waited for a worker thread past the caller's deadline: the caller has moved
                // on (and may have retried elsewhere), so running it now would only duplicate.
                bump(&node.counters.expired_calls);
                return;
            }
            let outcome = handler(call.args).await;
            if Instant::now() > deadline {
                tracing::debug!(node = %node.id, method = %call.method, "handler finished after the caller's deadline");
            }
            node.reply(&call.reply_to, call.id, outcome.status, &outcome.body).await;
            drop(permit);
        });
    }
}
