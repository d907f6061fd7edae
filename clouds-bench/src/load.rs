//! The load generator: a bounded number of calls, a bounded number in flight, a time limit.
//!
//! The same generator drives the raw baseline and clouds, so whatever it costs is in both.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::stats::Run;

/// One way of making an echo round trip.
pub(crate) trait Caller: Clone + Send + Sync + 'static {
    /// Sends `payload` and waits for it to come back; `Err` says what went wrong.
    fn call(&self, payload: &[u8]) -> impl Future<Output = Result<(), String>> + Send;
}

/// Makes `calls` calls, `in_flight` at a time (each of `in_flight` workers calls in a loop),
/// and stops starting new ones at `limit`. Calls never started count as errors.
pub(crate) async fn run<C: Caller>(
    caller: &C,
    payload: &Arc<Vec<u8>>,
    calls: usize,
    in_flight: usize,
    limit: Duration,
) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + limit;
    let workers = in_flight.clamp(1, calls.max(1));
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let (caller, payload, next) = (caller.clone(), payload.clone(), next.clone());
        set.spawn(async move {
            let mut latencies = Vec::with_capacity(calls / workers + 1);
            let mut errors = 0usize;
            let mut first_error = None;
            while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < calls {
                let t = Instant::now();
                let outcome = caller.call(&payload).await;
                latencies.push(t.elapsed());
                if let Err(e) = outcome {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
            (latencies, errors, first_error)
        });
    }
    let mut run = Run::default();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((latencies, errors, first_error)) => {
                run.latencies.extend(latencies);
                run.errors += errors;
                if run.first_error.is_none() {
                    run.first_error = first_error;
                }
            }
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    run.elapsed = started.elapsed();
    let returned = run.latencies.len();
    if returned < calls {
        // Not started before the time limit (or lost with a failed worker).
        run.errors += calls - returned;
        run.first_error
            .get_or_insert(format!("time limit of {limit:?} reached"));
    }
    run
}

/// Whether [`interleaved`] marks each call's start and end with a `getppid` system call, which
/// nothing else in the bench makes: `scripts/segments.py` finds the calls by these marks in a
/// `perf record` of the system calls, and splits each one at its socket reads and writes.
/// The marks are outside each call's timing; each costs one system call, on both sides alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Marks(pub(crate) bool);

impl Marks {
    /// No marks (the rows other than the latency row).
    pub(crate) const OFF: Marks = Marks(false);

    fn mark(self) {
        if self.0 {
            std::hint::black_box(std::os::unix::process::parent_id());
        }
    }
}

/// p50 at 1 in flight of `a` and of `b`, measured by alternating the two call by call (which
/// goes first alternates too), so both see the machine at the same moments: separate runs
/// drift by more than the difference looked for. Returns the two p50s and the errors.
///
/// The calls go `a b`, `b a`, `a b`, ...: with `marks`, the `k`-th marked call (from 0, over
/// every run of this process) is `a`'s when `k % 4` is 0 or 3 while every run makes an even
/// number of `calls` (as the latency row's do). `segments.py` learns each side's connection
/// from that pattern by a majority, and then labels each call by its connection.
pub(crate) async fn interleaved<A: Caller, B: Caller>(
    a: &A,
    b: &B,
    payload: &[u8],
    calls: usize,
    marks: Marks,
) -> (std::time::Duration, std::time::Duration, usize) {
    let (mut la, mut lb) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    let mut errors = 0;
    for i in 0..calls {
        for first_a in [i % 2 == 0, i % 2 != 0] {
            marks.mark();
            let t = Instant::now();
            let outcome = if first_a {
                a.call(payload).await
            } else {
                b.call(payload).await
            };
            let took = t.elapsed();
            marks.mark();
            errors += usize::from(outcome.is_err());
            if first_a {
                la.push(took)
            } else {
                lb.push(took)
            }
        }
    }
    la.sort_unstable();
    lb.sort_unstable();
    (
        crate::stats::percentile(&la, 50.0),
        crate::stats::percentile(&lb, 50.0),
        errors,
    )
}

/// A payload of `len` bytes.
pub(crate) fn payload(len: usize) -> Arc<Vec<u8>> {
    Arc::new((0..len).map(|i| (i % 251) as u8).collect())
}
