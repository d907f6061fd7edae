//! Exactly-once calls: the server side of a method marked once (`Route::once`,
//! `#[clouds(once)]`; `docs/protocol.md` §6.5).
//!
//! Every attempt of such a call carries the same call id, so the pair (caller, id) names the
//! call. Before running it, a server records it in Redis under
//! `namespace:db:once:<caller>:<id>`, with `ONCE_BEGIN` (set unless set):
//! - it set the record (a *running* record naming this server, with a lease): it runs the
//!   handler, renewing the lease every third of it with `ONCE_SWAP` (only while the record is
//!   still its own), then replaces the record by the *done* record, the reply's status and
//!   body, kept for `once_window`, and answers;
//! - the record is *done*: it answers with the stored outcome, without running anything;
//! - the record is *running* elsewhere: it waits, reading the record again every poll,
//!   until it is done (answer with it), gone (its owner died and the lease lapsed: this server
//!   takes it over and runs it), or this attempt's deadline comes (no answer; the caller
//!   retries, and the next attempt waits again).
//!
//! A server that cannot renew its lease (the record was taken over, or Redis failed for a
//! whole lease) drops the handler: another server may be running the call by then.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::time::Instant;

use crate::codec::ReplyBody;
use crate::dispatch::{Ran, Running, Watch};
use crate::envelope::Status;
use crate::node::Node;
use crate::stats::Count;
use crate::transport::Transport;

/// First byte of a running record: `R<node id> <run number>`.
const RUNNING: u8 = b'R';
/// First byte of a done record: `D<status code><reply body>`.
const DONE: u8 = b'D';

/// Numbers this process's runs, so two runs of one call by one server (a duplicated frame)
/// have different running records.
static RUNS: AtomicU64 = AtomicU64::new(0);

/// What a record says.
#[derive(Debug, PartialEq)]
enum Record {
    /// Some server is running the call (or was, until its lease lapses).
    Running,
    /// The call ran; its reply.
    Done(Status, Bytes),
}

impl Record {
    /// Reads a record's value; anything unreadable counts as running (it lapses or is
    /// replaced; a reader never runs a call over a record it cannot read).
    fn parse(value: &Bytes) -> Record {
        match value.first() {
            Some(&DONE) if value.len() > 2 => match Status::from_code(u64::from(value[1])) {
                Some(status) => Record::Done(status, value.slice(2..)),
                None => Record::Running,
            },
            _ => Record::Running,
        }
    }
}

/// The running record of one run by `node`.
fn running_record(node: &str) -> Bytes {
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    Bytes::from(format!("{}{node} {run}", RUNNING as char))
}

/// The done record of a reply.
fn done_record(status: Status, body: &[u8]) -> Bytes {
    let mut value = BytesMut::with_capacity(2 + body.len());
    value.put_u8(DONE);
    value.put_u8(status as u8);
    value.put_slice(body);
    value.freeze()
}

/// How often a waiting attempt reads the record again: an eighth of the lease, at most
/// 50 ms, at least 5 ms.
fn poll_interval(lease: Duration) -> Duration {
    (lease / 8).clamp(Duration::from_millis(5), Duration::from_millis(50))
}

impl Node {
    /// Runs a call of a method marked once (see the module docs); `watch` ends it early on
    /// the caller's cancel.
    pub(crate) async fn run_once(self: &Arc<Self>, running: Running, watch: &Watch) {
        let (caller, id) = running.key();
        let key = self.names().once(caller.as_str(), id);
        let mine = running_record(self.id().as_str());
        let lease = self.config().once_lease;
        let deadline = running.deadline();
        // Record the call, or wait for the attempt that did.
        loop {
            let begun = tokio::select! {
                biased;
                () = watch.cancelled() => {
                    self.counters().bump(Count::Cancelled);
                    return running.skip();
                }
                begun = self.wire().set_if_absent(&key, mine.clone(), lease) => begun,
            };
            match begun {
                Ok(None) => break,
                Ok(Some(value)) => {
                    if let Record::Done(status, body) = Record::parse(&value) {
                        tracing::debug!(node = %self.id(), method = running.method(), %key, "a retry of a call that ran: answered with its result");
                        let reply = running.answer(status, ReplyBody::from_encoded(&body));
                        return self.send_reply(reply).await;
                    }
                    let poll = poll_interval(lease);
                    if Instant::now() + poll >= deadline {
                        // Still running elsewhere at this attempt's deadline: the caller
                        // retries, and its next attempt waits again.
                        self.counters().bump(Count::ExpiredCalls);
                        return running.skip();
                    }
                    tokio::select! {
                        biased;
                        () = watch.cancelled() => {
                            self.counters().bump(Count::Cancelled);
                            return running.skip();
                        }
                        () = tokio::time::sleep(poll) => {}
                    }
                }
                Err(e) => {
                    // Not recorded, so not run: running it unrecorded could run it twice.
                    let reason = format!("could not record the call for exactly-once: {e}");
                    tracing::warn!(node = %self.id(), method = running.method(), %reason, "exactly-once call refused");
                    let reply = running.answer(Status::ServerError, ReplyBody::text(&reason));
                    return self.send_reply(reply).await;
                }
            }
        }
        // Ours: run it, renewing the lease while it runs.
        let renew = async {
            let mut renewed = Instant::now();
            loop {
                tokio::time::sleep(lease / 3).await;
                match self
                    .wire()
                    .swap_if(&key, mine.clone(), Some(mine.clone()), lease)
                    .await
                {
                    Ok(true) => renewed = Instant::now(),
                    Ok(false) => return "another server took the call over",
                    Err(e) if renewed.elapsed() >= lease => {
                        tracing::warn!(node = %self.id(), error = %e, "could not renew an exactly-once lease");
                        return "the lease lapsed while Redis failed";
                    }
                    Err(_) => {}
                }
            }
        };
        let ran = tokio::select! {
            ran = running.run(watch.cancelled()) => ran,
            why = renew => {
                tracing::warn!(node = %self.id(), %key, why, "exactly-once handler dropped: its record is no longer this server's");
                return;
            }
        };
        match ran {
            Ran::Replied(reply) if reply.stream.is_some() => {
                // A streaming route marked once by name (the macro refuses the mark on one):
                // a record cannot replay items, so it is freed and the stream served as any.
                if let Err(e) = self.wire().swap_if(&key, mine, None, lease).await {
                    tracing::debug!(node = %self.id(), %key, error = %e, "could not free an exactly-once record; it lapses with its lease");
                }
                self.send_reply(reply).await;
            }
            Ran::Replied(reply) => {
                let done = done_record(reply.status, reply.body.as_bytes());
                let window = self.config().once_window;
                match self.wire().swap_if(&key, mine, Some(done), window).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(node = %self.id(), %key, "an exactly-once result was not stored: the record was no longer this server's")
                    }
                    Err(e) => {
                        tracing::warn!(node = %self.id(), %key, error = %e, "an exactly-once result was not stored; a retry would run the call again")
                    }
                }
                self.send_reply(reply).await;
            }
            Ran::Expired | Ran::Cancelled => {
                if matches!(ran, Ran::Cancelled) {
                    self.counters().bump(Count::Cancelled);
                } else {
                    self.counters().bump(Count::ExpiredCalls);
                }
                // Not run to its end: free the record, so a retry may run it.
                if let Err(e) = self.wire().swap_if(&key, mine, None, lease).await {
                    tracing::debug!(node = %self.id(), %key, error = %e, "could not free an exactly-once record; it lapses with its lease");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_garbage_counts_as_running() {
        let done = done_record(Status::AppError, &[0xa2, b'n', b'o']);
        assert_eq!(&done[..2], &[b'D', 1]);
        assert_eq!(
            Record::parse(&done),
            Record::Done(Status::AppError, Bytes::from_static(&[0xa2, b'n', b'o']))
        );
        let running = running_record("server-a");
        assert!(running.starts_with(b"Rserver-a "));
        assert_ne!(running, running_record("server-a"), "each run its own");
        for value in [
            &running[..],
            b"",
            b"D",
            b"D\x00",
            b"D\xff\xc0",
            b"X\x00\xc0",
        ] {
            assert_eq!(
                Record::parse(&Bytes::copy_from_slice(value)),
                Record::Running,
                "{value:?}"
            );
        }
    }

    #[test]
    fn waiting_attempts_poll_within_bounds() {
        assert_eq!(
            poll_interval(Duration::from_secs(1)),
            Duration::from_millis(50)
        );
        assert_eq!(
            poll_interval(Duration::from_millis(80)),
            Duration::from_millis(10)
        );
        assert_eq!(
            poll_interval(Duration::from_millis(30)),
            Duration::from_millis(5)
        );
    }
}
