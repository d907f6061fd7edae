//! What a node counts: frames it could not use, and its current load.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of what a node received and could not use, plus its current load.
///
/// ```
/// # fn demo(client: &clouds_core::Client) {
/// let stats = client.stats();
/// assert_eq!(stats.malformed_frames, 0);
/// println!("{} calls waiting for replies", stats.pending_calls);
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Frames that did not decode (garbage, truncated, unknown version).
    pub malformed_frames: u64,
    /// Frames that decoded but arrived on a channel where they do not belong.
    pub misrouted_frames: u64,
    /// Frames over this node's `max_frame_size` (inline) or `max_body_size` (inline or
    /// claimed): a call gets an error reply, others are dropped.
    pub oversized_frames: u64,
    /// Frames lost because the receive loop fell behind the subscriber connection.
    pub lagged_frames: u64,
    /// Replies that arrived after their call had given up (timed out or was cancelled).
    pub late_replies: u64,
    /// Messages dropped because nobody read the message queue.
    pub dropped_messages: u64,
    /// Calls skipped because their deadline had passed before a worker could run them.
    pub expired_calls: u64,
    /// Attempts re-routed at no cost because they certainly did not run (the provider's inbox
    /// was gone, or it was stopping).
    pub rerouted_calls: u64,
    /// Overloaded answers this node received as a caller.
    pub overloaded_replies: u64,
    /// Frames refused for their signature (see `Config::signing_key`): unsigned frames at a
    /// node with keys, signed frames at a node without, a key id this node does not accept,
    /// or a tag that does not verify (a wrong key, signed for another channel, altered).
    pub unauthenticated_frames: u64,
    /// Signed frames refused as replays: sent more than `Config::replay_window` away from
    /// this node's clock, or already received.
    pub replayed_frames: u64,
    /// Cancels this node sent as a caller: calls it stopped waiting for after they had reached
    /// a provider (the call future was dropped, an attempt timed out, or the node closed).
    pub cancels_sent: u64,
    /// Handlers this server dropped unfinished because their caller sent a cancel.
    pub cancelled_calls: u64,
    /// Cancels this server received for calls it was not running (finished already, or never
    /// seen): ignored.
    pub ignored_cancels: u64,
    /// Background tasks of this node alive right now (receive and refresh loops, and handlers
    /// that had to wait and so run in a task of their own); returns to its idle value when
    /// nothing is in flight.
    pub tasks: usize,
    /// Calls of this node waiting for a reply right now.
    pub pending_calls: usize,
    /// Calls this server is running or sending the reply of right now (servers only); a
    /// running stream counts as one.
    pub in_flight: usize,
    /// Streams this server is serving right now (servers only).
    pub open_streams: usize,
}

/// What a node counts, one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    Malformed,
    Misrouted,
    Oversized,
    Lagged,
    LateReplies,
    DroppedMessages,
    ExpiredCalls,
    Rerouted,
    Unauthenticated,
    Replayed,
    CancelsSent,
    Cancelled,
    IgnoredCancels,
    Overloaded,
}

impl Count {
    /// How many there are: the last one's index + 1 (keep `Overloaded` last).
    const ALL: usize = Count::Overloaded as usize + 1;
}

/// A node's counters, updated from any thread without a lock.
#[derive(Debug, Default)]
pub(crate) struct Counters([AtomicU64; Count::ALL]);

impl Counters {
    /// Adds one to `count`.
    pub(crate) fn bump(&self, count: Count) {
        self.add(count, 1);
    }

    /// Adds `n` to `count`.
    pub(crate) fn add(&self, count: Count, n: u64) {
        self.0[count as usize].fetch_add(n, Ordering::Relaxed);
        crate::telemetry::counted(count, n);
    }

    /// Counts one bad frame and says whether to log it: the 1st, 2nd, 4th, 8th, ... so
    /// garbage flooding a channel cannot flood the logs, while the count stays exact in
    /// `stats()`.
    pub(crate) fn bump_and_sample(&self, count: Count) -> Option<u64> {
        let n = self.0[count as usize].fetch_add(1, Ordering::Relaxed) + 1;
        crate::telemetry::counted(count, 1);
        n.is_power_of_two().then_some(n)
    }

    /// The current value of `count`.
    pub(crate) fn get(&self, count: Count) -> u64 {
        self.0[count as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_count_apart_and_sample_powers_of_two() {
        let counters = Counters::default();
        counters.bump(Count::Rerouted);
        counters.add(Count::Lagged, 5);
        assert_eq!(counters.get(Count::Rerouted), 1);
        assert_eq!(counters.get(Count::Lagged), 5);
        assert_eq!(counters.get(Count::Overloaded), 0);
        let logged: Vec<u64> = (0..10)
            .filter_map(|_| counters.bump_and_sample(Count::Malformed))
            .collect();
        assert_eq!(logged, vec![1, 2, 4, 8]);
        assert_eq!(counters.get(Count::Malformed), 10);
    }
}
