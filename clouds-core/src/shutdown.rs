//! A node's life: its background tasks, and closing it once, completely, from anywhere.
//!
//! Closing may be cut short (its future dropped) and run again, and may be started from a
//! `Drop`: [`Lifecycle`] records how far it got and where to run what is left.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// The background tasks of a node and how far closing it got.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    /// Ends the background loops.
    cancel: CancellationToken,
    /// The background loops (receive, refresh, an in-memory heartbeat).
    tasks: TaskTracker,
    /// Set when closing starts: calls are refused from then on.
    closed: AtomicBool,
    /// Set when closing has run to the end. A close that was cancelled half-way (its future
    /// dropped) leaves this unset, and the next one runs every step again.
    finished: AtomicBool,
    /// The runtime the node was started on, where closing work is spawned from `Drop`.
    runtime: tokio::runtime::Handle,
}

impl Lifecycle {
    /// A life on the current runtime.
    pub(crate) fn new() -> Self {
        Lifecycle {
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            closed: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Runs `work` as one of the node's background tasks.
    pub(crate) fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(work);
    }

    /// Runs `work` on the node's runtime, untracked (for `Drop` implementations).
    pub(crate) fn spawn_detached(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(work);
    }

    /// Background tasks alive now.
    pub(crate) fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Tells every background loop to stop.
    pub(crate) fn stop(&self) {
        self.cancel.cancel();
    }

    /// Resolves once the loops are told to stop.
    pub(crate) fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// A token cancelled with the node (and cancellable on its own).
    pub(crate) fn child_token(&self) -> CancellationToken {
        self.cancel.child_token()
    }

    /// Stops the whole node when dropped: held by the loop without which the node is useless.
    pub(crate) fn stop_on_drop(&self) -> DropGuard {
        self.cancel.clone().drop_guard()
    }

    /// Whether closing has started.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether closing has run to its end.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Marks closing as started; false if it had already finished (nothing left to do).
    pub(crate) fn begin_close(&self) -> bool {
        self.closed.store(true, Ordering::Release);
        !self.is_finished()
    }

    /// Stops the loops and waits up to `timeout` for them; false if some still run then.
    pub(crate) async fn stop_and_wait(&self, timeout: Duration) -> bool {
        self.cancel.cancel();
        self.tasks.close();
        tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok()
    }

    /// Marks closing as complete.
    pub(crate) fn finish(&self) {
        self.finished.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn closing_is_recorded_and_loops_are_stopped_and_awaited() {
        let life = Lifecycle::new();
        assert!(!life.is_closed() && !life.is_finished());
        let token = life.child_token();
        life.spawn(async move { token.cancelled().await });
        assert_eq!(life.tasks(), 1);
        assert!(life.begin_close());
        assert!(life.is_closed() && !life.is_finished());
        assert!(life.stop_and_wait(Duration::from_secs(1)).await);
        assert_eq!(life.tasks(), 0);
        life.finish();
        assert!(
            !life.begin_close(),
            "a finished close has nothing left to do"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_ignores_the_stop_is_not_waited_for_forever() {
        let life = Lifecycle::new();
        life.spawn(async { tokio::time::sleep(Duration::from_secs(3600)).await });
        assert!(!life.stop_and_wait(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn dropping_the_guard_stops_the_node() {
        let life = Lifecycle::new();
        drop(life.stop_on_drop());
        tokio::time::timeout(Duration::from_secs(1), life.stopped())
            .await
            .expect("stopped");
    }
}
