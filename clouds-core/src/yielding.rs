//! The one way clouds yields to the runtime: `yield_once`.

use std::future::Future;

/// Lets the tasks already runnable on this worker run before this one goes on: it asks to be
/// polled again at once, which puts it at the back of the worker's queue, and tokio then wakes
/// an idle worker (if one is parked) to share the queue. Not `tokio::task::yield_now`, which
/// waits for the runtime to poll its I/O driver first: that made a call alone ~14 % slower
/// (BENCHMARKS.md, "One wait per call").
pub(crate) fn yield_once() -> impl Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
}
