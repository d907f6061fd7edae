//! Calls waiting for their reply, by call id.

use foldhash::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;

use crate::envelope::Reply;
use crate::transport::Channel;

/// The table of a node's calls in flight.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiting>>,
}

/// One call waiting for its reply.
#[derive(Debug)]
struct Waiting {
    tx: oneshot::Sender<Reply>,
    /// The provider's call channel, once the call reached it: a node closing with calls in
    /// flight tells their providers it gave up (`Pending::take_sent`).
    sent_to: Option<Channel>,
}

impl Pending {
    /// Opens a slot for one attempt's reply. The slot is removed when the guard drops, so a
    /// cancelled or timed-out call leaves nothing behind.
    pub(crate) fn open(&self) -> (PendingGuard<'_>, oneshot::Receiver<Reply>) {
        self.open_to(None)
    }

    /// [`Pending::open`] for a call to the provider whose call channel is `sent_to`: if the
    /// node closes while it waits, the provider is told (`Pending::take_sent`).
    pub(crate) fn open_to(
        &self,
        sent_to: Option<Channel>,
    ) -> (PendingGuard<'_>, oneshot::Receiver<Reply>) {
        self.open_as(None, sent_to)
    }

    /// [`Pending::open_to`] under the id `id` if given (the id of an earlier attempt of the
    /// same call, which keeps its id: an exactly-once call), else a fresh one.
    pub(crate) fn open_as(
        &self,
        id: Option<u64>,
        sent_to: Option<Channel>,
    ) -> (PendingGuard<'_>, oneshot::Receiver<Reply>) {
        let id = id.unwrap_or_else(|| self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, Waiting { tx, sent_to });
        (
            PendingGuard {
                table: self,
                id,
                armed: true,
            },
            rx,
        )
    }

    /// Hands a reply to its waiting call; false if nobody waits for it (late or foreign).
    pub(crate) fn complete(&self, reply: Reply) -> bool {
        let waiting = self.lock().remove(&reply.id);
        match waiting {
            Some(waiting) => waiting.tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// Removes every waiting call (their receivers see the sender dropped) and returns the
    /// ids and provider channels of the calls to providers: used at shutdown, to cancel them.
    pub(crate) fn take_sent(&self) -> Vec<(u64, Channel)> {
        self.lock()
            .drain()
            .filter_map(|(id, waiting)| waiting.sent_to.map(|channel| (id, channel)))
            .collect()
    }

    /// Calls waiting right now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiting>> {
        crate::locks::lock(&self.waiting)
    }
}

/// Owns one slot of the pending table.
pub(crate) struct PendingGuard<'a> {
    table: &'a Pending,
    pub(crate) id: u64,
    /// Whether the slot may still be in the table.
    armed: bool,
}

impl PendingGuard<'_> {
    /// The reply arrived: `complete` has removed the slot already, so dropping the guard
    /// need not look for it again.
    pub(crate) fn answered(mut self) {
        self.armed = false;
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.table.lock().remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Status;

    fn reply(id: u64) -> Reply {
        Reply {
            id,
            status: Status::Ok,
            body: bytes::Bytes::from_static(&[0xc0]),
            claim: None,
        }
    }

    #[tokio::test]
    async fn replies_reach_their_caller_and_slots_are_freed() {
        let pending = Pending::default();
        let (guard, rx) = pending.open();
        assert_eq!(pending.len(), 1);
        assert!(pending.complete(reply(guard.id)));
        assert_eq!(rx.await.expect("reply").id, guard.id);
        drop(guard);
        assert_eq!(pending.len(), 0);
        assert!(!pending.complete(reply(12345)), "unknown ids are refused");
    }

    #[tokio::test]
    async fn an_answered_slot_is_gone_without_a_second_removal() {
        let pending = Pending::default();
        let (guard, rx) = pending.open();
        assert!(pending.complete(reply(guard.id)));
        assert_eq!(pending.len(), 0, "complete removes the slot");
        rx.await.expect("reply");
        guard.answered();
        assert_eq!(pending.len(), 0);
    }

    #[test]
    fn dropped_calls_leave_nothing_behind() {
        let pending = Pending::default();
        let (guard, _rx) = pending.open();
        let id = guard.id;
        drop(guard);
        assert_eq!(pending.len(), 0);
        assert!(!pending.complete(reply(id)), "a late reply finds no slot");
    }
}
