//! The call a handler is serving: [`CallContext`], read with [`CallContext::current`] from
//! anywhere inside the handler, without a parameter for it.
//!
//! The server sets it as a tokio task-local around the handler's future: on the receive loop
//! for the handler's first poll, and in the task the handler moves to if it waits. Code the
//! handler runs in other tasks it spawns does not see it (task-locals do not cross
//! `tokio::spawn`): read it first and move what you need.

use std::time::{Duration, Instant};

use crate::envelope::{Trace, WireStr};

tokio::task_local! {
    static CURRENT: CallContext;
}

/// What a handler can know about the call it is serving: its method, the caller, the
/// caller's deadline, the attempt and the caller's trace context.
///
/// Read it with [`CallContext::current`] inside a handler; outside one there is none.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), clouds_core::Error> {
/// use std::convert::Infallible;
/// use clouds_core::{CallContext, Client, Server};
///
/// let broker = clouds_core::testing::Broker::new();
/// let server = Server::start(broker.config()).await?;
/// server
///     .register("who.asks", |(): ()| async {
///         let context = CallContext::current().expect("inside a handler");
///         Ok::<_, Infallible>(format!("{} asks {}", context.caller(), context.method()))
///     })
///     .await?;
/// let client = Client::connect(broker.config()).await?;
/// let answer: String = client.call("who.asks", ()).await?;
/// assert_eq!(answer, format!("{} asks who.asks", client.id()));
/// assert!(CallContext::current().is_none(), "none outside a handler");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CallContext {
    method: WireStr,
    caller: WireStr,
    /// When the call was dispatched (the clock read that times it anyway).
    arrived: Instant,
    deadline_ms: u64,
    trace: Option<TraceContext>,
    attempt: Option<u32>,
}

impl CallContext {
    pub(crate) fn new(
        method: &WireStr,
        caller: &WireStr,
        arrived: Instant,
        deadline_ms: u64,
        trace: Option<&Trace>,
    ) -> CallContext {
        CallContext {
            method: method.clone(),
            caller: caller.clone(),
            arrived,
            deadline_ms,
            attempt: trace.map(|t| t.attempt),
            trace: trace.map(|t| TraceContext {
                traceparent: t.traceparent.clone(),
                tracestate: t.tracestate.clone(),
            }),
        }
    }

    /// The context of the call the current handler serves, or `None` outside a handler (or
    /// in a task the handler spawned).
    ///
    /// ```
    /// assert!(clouds_core::CallContext::current().is_none());
    /// ```
    pub fn current() -> Option<CallContext> {
        CURRENT.try_with(CallContext::clone).ok()
    }

    /// Runs `f` with the current handler's context (or `None`) without cloning it.
    ///
    /// ```
    /// let method = clouds_core::CallContext::with_current(|c| c.map(|c| c.method().to_owned()));
    /// assert_eq!(method, None);
    /// ```
    pub fn with_current<R>(f: impl FnOnce(Option<&CallContext>) -> R) -> R {
        let mut f = Some(f);
        match CURRENT.try_with(|c| f.take().map(|f| f(Some(c)))) {
            Ok(Some(r)) => r,
            _ => match f.take() {
                Some(f) => f(None),
                None => unreachable!("f ran inside try_with"),
            },
        }
    }

    /// The method called, `service.method`.
    ///
    /// ```
    /// # fn demo(context: &clouds_core::CallContext) {
    /// println!("serving {}", context.method());
    /// # }
    /// ```
    pub fn method(&self) -> &str {
        self.method.as_str()
    }

    /// The calling node's id (its replies go to its inbox).
    ///
    /// ```
    /// # fn demo(context: &clouds_core::CallContext) {
    /// println!("called by {}", context.caller());
    /// # }
    /// ```
    pub fn caller(&self) -> &str {
        self.caller.as_str()
    }

    /// When the caller stops waiting for this attempt: when the call was dispatched plus the
    /// `deadline_ms` it carried (what was left of it, for a claimed call whose arguments
    /// were fetched first). Work past it is wasted (the caller may have retried
    /// elsewhere).
    ///
    /// ```
    /// # fn demo(context: &clouds_core::CallContext) {
    /// if context.deadline() <= std::time::Instant::now() {
    ///     println!("too late: the caller has given up");
    /// }
    /// # }
    /// ```
    pub fn deadline(&self) -> Instant {
        self.arrived
            .checked_add(Duration::from_millis(self.deadline_ms))
            .unwrap_or(self.arrived + Duration::from_secs(86_400 * 365))
    }

    /// Time left until [`deadline`](Self::deadline) (zero once it passed).
    ///
    /// ```
    /// # fn demo(context: &clouds_core::CallContext) {
    /// println!("{:?} left", context.remaining());
    /// # }
    /// ```
    pub fn remaining(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// The caller's attempt number, from 1 (2 and more: a retry). Known when the call
    /// carried a trace context, which is what carries it on the wire (`docs/protocol.md`
    /// §3.1); `None` otherwise.
    ///
    /// ```
    /// # fn demo(context: &clouds_core::CallContext) {
    /// if context.attempt() > Some(1) {
    ///     println!("a retry");
    /// }
    /// # }
    /// ```
    pub fn attempt(&self) -> Option<u32> {
        self.attempt
    }

    /// The caller's W3C trace context, if the call carried one. It is what arrived, passed
    /// through unchanged: with the `opentelemetry` feature the server's span is already its
    /// child; without it, an application with its own propagation reads it here.
    ///
    /// ```
    /// # fn demo(context: &clouds_core::CallContext) {
    /// if let Some(trace) = context.trace() {
    ///     println!("traceparent: {}", trace.traceparent());
    /// }
    /// # }
    /// ```
    pub fn trace(&self) -> Option<&TraceContext> {
        self.trace.as_ref()
    }

    /// Runs the synchronous `f` (a handler's first poll) with `self` as the current context.
    pub(crate) fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }

    /// `future` with `self` as the current context while it runs.
    pub(crate) fn scope<F: std::future::Future>(
        self,
        future: F,
    ) -> impl std::future::Future<Output = F::Output> {
        CURRENT.scope(self, future)
    }
}

impl std::fmt::Debug for CallContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallContext")
            .field("method", &self.method)
            .field("caller", &self.caller)
            .field("remaining", &self.remaining())
            .field("attempt", &self.attempt)
            .field("trace", &self.trace)
            .finish()
    }
}

/// A W3C trace context as a call carried it: the `traceparent` and `tracestate` values
/// (<https://www.w3.org/TR/trace-context/>), passed through as received.
///
/// ```
/// # fn demo(context: &clouds_core::CallContext) {
/// if let Some(trace) = context.trace() {
///     // e.g. "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
///     let _ = (trace.traceparent(), trace.tracestate());
/// }
/// # }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: WireStr,
    tracestate: WireStr,
}

impl TraceContext {
    /// The `traceparent` value: `version-trace_id-parent_id-flags` in lowercase hex.
    ///
    /// ```
    /// # fn demo(trace: &clouds_core::TraceContext) {
    /// let trace_id = trace.traceparent().split('-').nth(1);
    /// # }
    /// ```
    pub fn traceparent(&self) -> &str {
        self.traceparent.as_str()
    }

    /// The `tracestate` value (vendor entries); empty when the caller sent none.
    ///
    /// ```
    /// # fn demo(trace: &clouds_core::TraceContext) {
    /// if !trace.tracestate().is_empty() {
    ///     println!("tracestate: {}", trace.tracestate());
    /// }
    /// # }
    /// ```
    pub fn tracestate(&self) -> &str {
        self.tracestate.as_str()
    }
}

impl std::fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceContext")
            .field("traceparent", &self.traceparent)
            .field("tracestate", &self.tracestate)
            .finish()
    }
}
