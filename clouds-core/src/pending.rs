//! Calls waiting for their reply, and open streams, by call id.

use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::envelope::{Reply, Status};
use crate::stream::Inlet;
use crate::transport::{Channel, TransportError};

/// The table of a node's calls in flight.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiting>>,
}

/// One slot: who waits, and where the call went.
#[derive(Debug)]
struct Waiting {
    waiter: Waiter,
    /// The provider's call channel, once the call reached it: a node closing with calls in
    /// flight tells their providers it gave up (`Pending::take_sent`).
    sent_to: Option<Channel>,
}

/// What a waiting call hears.
#[derive(Debug)]
pub(crate) enum Answer {
    /// Its reply.
    Reply(Reply),
    /// The `PUBLISH` that carried it (in a batch, `outbox::send_call`) reached nobody: it
    /// certainly did not run.
    NotDelivered,
    /// The `PUBLISH` that carried it failed.
    Failed(TransportError),
}

/// Who waits for frames with one id.
#[derive(Debug)]
enum Waiter {
    /// A call, for its reply.
    Call(oneshot::Sender<Answer>),
    /// A stream being opened, for its first reply: a `Stream` reply turns the slot into
    /// [`Waiter::Stream`], anything else ends it as for a call.
    Opening(oneshot::Sender<Answer>, Arc<Inlet>),
    /// An open stream, for its items, keep-alives and final reply.
    Stream(Arc<Inlet>),
}

impl Pending {
    /// Opens a slot for one attempt's reply. The slot is removed when the guard drops, so a
    /// cancelled or timed-out call leaves nothing behind.
    pub(crate) fn open(&self) -> (PendingGuard<'_>, oneshot::Receiver<Answer>) {
        self.open_slot(None, None, None)
    }

    /// Opens a slot for one attempt to open a stream: once its `Stream` reply has arrived
    /// (and the guard is disarmed with `answered`), the slot stays for the stream's frames
    /// until [`Pending::forget`].
    pub(crate) fn open_with(
        &self,
        inlet: Option<&Arc<Inlet>>,
    ) -> (PendingGuard<'_>, oneshot::Receiver<Answer>) {
        self.open_slot(None, inlet, None)
    }

    /// [`Pending::open`] for a call to the provider whose call channel is `sent_to`: if the
    /// node closes while it waits, the provider is told (`Pending::take_sent`).
    pub(crate) fn open_to(
        &self,
        sent_to: Option<Channel>,
    ) -> (PendingGuard<'_>, oneshot::Receiver<Answer>) {
        self.open_slot(None, None, sent_to)
    }

    /// [`Pending::open_to`] under the id `id` if given (the id of an earlier attempt of the
    /// same call, which keeps its id: an exactly-once call), else a fresh one.
    pub(crate) fn open_as(
        &self,
        id: Option<u64>,
        sent_to: Option<Channel>,
    ) -> (PendingGuard<'_>, oneshot::Receiver<Answer>) {
        self.open_slot(id, None, sent_to)
    }

    fn open_slot(
        &self,
        id: Option<u64>,
        inlet: Option<&Arc<Inlet>>,
        sent_to: Option<Channel>,
    ) -> (PendingGuard<'_>, oneshot::Receiver<Answer>) {
        let id = id.unwrap_or_else(|| self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        let waiter = match inlet {
            None => Waiter::Call(tx),
            Some(inlet) => Waiter::Opening(tx, inlet.clone()),
        };
        self.lock().insert(id, Waiting { waiter, sent_to });
        (
            PendingGuard {
                table: self,
                id,
                armed: true,
            },
            rx,
        )
    }

    /// Hands a reply to its waiting call (or stream); false if nobody waits for it (late or
    /// foreign).
    pub(crate) fn complete(&self, reply: Reply) -> bool {
        let mut table = self.lock();
        let Some(Waiting { waiter, sent_to }) = table.remove(&reply.id) else {
            return false;
        };
        match waiter {
            Waiter::Call(tx) => {
                drop(table);
                tx.send(Answer::Reply(reply)).is_ok()
            }
            Waiter::Opening(tx, inlet) => {
                let id = reply.id;
                if reply.status == Status::Stream {
                    // Its items may follow in this same pass of the receive loop.
                    let waiter = Waiter::Stream(inlet);
                    table.insert(id, Waiting { waiter, sent_to });
                }
                drop(table);
                let delivered = tx.send(Answer::Reply(reply)).is_ok();
                if !delivered {
                    self.forget(id);
                }
                delivered
            }
            Waiter::Stream(inlet) => {
                drop(table);
                inlet.end(&reply);
                true
            }
        }
    }

    /// Tells the call with this id that the `PUBLISH` carrying it failed (`Err`) or reached
    /// nobody (`Ok(0)`); nothing if it was answered or given up already.
    pub(crate) fn unsent(&self, id: u64, outcome: Result<u64, TransportError>) {
        let mut table = self.lock();
        let tx = match table.remove(&id) {
            Some(Waiting {
                waiter: Waiter::Call(tx),
                ..
            }) => tx,
            // Only calls are queued with their id (`outbox::send_call`): left as it was.
            Some(other) => {
                table.insert(id, other);
                return;
            }
            None => return,
        };
        drop(table);
        let _ = tx.send(match outcome {
            Ok(_) => Answer::NotDelivered,
            Err(e) => Answer::Failed(e),
        });
    }

    /// The open stream with this id, if any.
    fn stream(&self, id: u64) -> Option<Arc<Inlet>> {
        match self.lock().get(&id) {
            Some(Waiting {
                waiter: Waiter::Stream(inlet),
                ..
            }) => Some(inlet.clone()),
            _ => None,
        }
    }

    /// Hands a stream its item; false if no such stream is open.
    pub(crate) fn item(&self, id: u64, seq: u64, body: bytes::Bytes) -> bool {
        self.stream(id).map(|inlet| inlet.item(seq, body)).is_some()
    }

    /// Tells a stream its provider is alive; false if no such stream is open.
    pub(crate) fn keep_alive(&self, id: u64) -> bool {
        self.stream(id).map(|inlet| inlet.keep_alive()).is_some()
    }

    /// Removes the slot with this id (a stream read to its end, or dropped).
    pub(crate) fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Removes every slot: waiting calls fail (their receivers see the sender dropped), open
    /// streams end after the items they hold. Returns the ids and provider channels of the
    /// calls that reached a provider: used at shutdown, to cancel them.
    pub(crate) fn take_sent(&self) -> Vec<(u64, Channel)> {
        let waiting = std::mem::take(&mut *self.lock());
        let mut sent = Vec::new();
        for (id, Waiting { waiter, sent_to }) in waiting {
            match waiter {
                Waiter::Stream(inlet) => inlet.close(),
                Waiter::Call(_) | Waiter::Opening(..) => sent.extend(sent_to.map(|c| (id, c))),
            }
        }
        sent
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
        match rx.await.expect("an answer") {
            Answer::Reply(reply) => assert_eq!(reply.id, guard.id),
            other => panic!("expected the reply, got {other:?}"),
        }
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

    #[tokio::test]
    async fn a_call_told_its_publish_went_nowhere_hears_why_and_frees_its_slot() {
        let pending = Pending::default();
        let (nobody, rx_nobody) = pending.open();
        let (failed, rx_failed) = pending.open();
        pending.unsent(nobody.id, Ok(0));
        let error = TransportError::Command {
            command: "PUBLISH",
            reason: "injected".into(),
        };
        pending.unsent(failed.id, Err(error.clone()));
        assert_eq!(pending.len(), 0);
        assert!(matches!(rx_nobody.await, Ok(Answer::NotDelivered)));
        assert!(matches!(rx_failed.await, Ok(Answer::Failed(e)) if e == error));
        // Too late for a call answered meanwhile: nothing happens.
        pending.unsent(nobody.id, Ok(0));
        assert!(!pending.complete(reply(nobody.id)));
    }
}
