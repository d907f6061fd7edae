//! `clouds-bench cold`: what one call costs clouds itself, with no Redis and no sockets, when
//! its code and data are in the caches (hot) and when they are not (cold).
//!
//! Why: at 1 call in flight over Redis, clouds' p50 sits ~7 % above the raw round trip
//! (BENCHMARKS.md), more than clouds' own work per call explains when measured back to back.
//! Between two calls the threads sleep for the whole Redis round trip, and the next call finds
//! its code and data evicted. This row measures that effect on clouds alone.
//!
//! A provider and a client talk through the in-memory broker (`clouds::testing::Broker`) on
//! one thread (a current-thread runtime): a call never waits for I/O, so its wall time is the
//! CPU time of the whole round trip, both nodes and the broker included. Calls are made in a
//! rotation, each timed alone:
//!
//! - **hot**: right after the previous call;
//! - **after a pause**: after the thread slept 100 µs (as the threads of a process making one
//!   call at a time over Redis do between events; what a sleep evicts depends on the machine:
//!   on a virtual machine a sleeping CPU is given to others);
//! - **after a flush**: after reading a buffer twice the size of the last-level cache (the
//!   worst case: nothing of the call's is cached).
//!
//! The table shows, per kind, the median over the rounds of each round's p50.

use std::fmt::Write as _;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::clouds_rows::{CloudsCaller, InProcess, tune};
use crate::load::{Caller, payload};
use crate::report::fmt_d;
use crate::stats::{median, percentile};

/// How long the thread sleeps before an "after a pause" call: about what each thread of a
/// process making one call at a time over Redis sleeps between two events (its round trip
/// is ~60-300 µs on the machine of BENCHMARKS.md). 50 µs and 1 ms gave about the same.
const PAUSE: Duration = Duration::from_micros(100);
/// Last-level cache size assumed when sysfs does not tell.
const DEFAULT_LLC: usize = 32 * 1024 * 1024;

/// The `cold` subcommand: `[--quick] [--reps N]`.
pub(crate) fn main(args: &[String]) -> ExitCode {
    crate::subcommand("cold", args, 5, measure)
}

async fn measure(quick: bool, reps: usize) -> Result<String, String> {
    let rotations = if quick { 100 } else { 1_000 };
    // The measurement needs everything on one thread: its own, with a runtime of its own.
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a current-thread runtime: {e}"))?;
        runtime.block_on(rounds(rotations, reps))
    })
    .await
    .map_err(|e| format!("the measuring thread failed: {e}"))?
}

/// The p50 of one call of each kind, per round.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    hot: Duration,
    paused: Duration,
    flushed: Duration,
}

async fn rounds(rotations: usize, reps: usize) -> Result<String, String> {
    let llc = last_level_cache();
    let mut flush = vec![1u8; 2 * llc];
    let payload = payload(100);
    let mut runs = Vec::new();
    for rep in 0..reps {
        // A broker and two nodes per round, as the Redis rows start theirs.
        let broker = clouds::testing::Broker::new();
        let config = tune(broker.config(), "bench-cold", Duration::from_secs(10));
        let nodes = InProcess::with_config(config).await?;
        let caller = CloudsCaller::new(&nodes.client);
        for _ in 0..1_000 {
            caller.call(&payload).await?;
        }
        let (mut hot, mut paused, mut flushed) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rotations {
            // The thread itself sleeps, as a worker parks between two events (tokio's timer
            // would round the pause up to a millisecond).
            std::thread::sleep(PAUSE);
            paused.push(timed(&caller, &payload).await?);
            hot.push(timed(&caller, &payload).await?);
            touch(&mut flush);
            flushed.push(timed(&caller, &payload).await?);
            hot.push(timed(&caller, &payload).await?);
        }
        nodes.stop().await;
        let p50 = |mut v: Vec<Duration>| {
            v.sort_unstable();
            percentile(&v, 50.0)
        };
        let round = Round {
            hot: p50(hot),
            paused: p50(paused),
            flushed: p50(flushed),
        };
        eprintln!(
            "cold round {}: hot {:?}, after a pause {:?}, after a flush {:?}",
            rep + 1,
            round.hot,
            round.paused,
            round.flushed
        );
        runs.push(round);
    }
    let pick = |f: fn(&Round) -> Duration| median(&runs.iter().map(f).collect::<Vec<_>>());
    let (hot, paused, flushed) = (pick(|r| r.hot), pick(|r| r.paused), pick(|r| r.flushed));
    let ratio = |d: Duration| d.as_secs_f64() / hot.as_secs_f64().max(1e-9);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## One call through the in-memory broker, on one thread (100 B, {rotations} rotations, {reps} round(s), the median of their p50s)\n"
    );
    let _ = writeln!(out, "| call | p50 | ÷ hot |");
    let _ = writeln!(out, "|---|--:|--:|");
    let _ = writeln!(
        out,
        "| hot (right after another) | {} | 1.00 |",
        fmt_us(hot)
    );
    let _ = writeln!(
        out,
        "| after a {} µs pause | {} | {:.2} |",
        PAUSE.as_micros(),
        fmt_us(paused),
        ratio(paused)
    );
    let _ = writeln!(
        out,
        "| after a flush ({} MiB read) | {} | {:.2} |",
        2 * llc / (1024 * 1024),
        fmt_us(flushed),
        ratio(flushed)
    );
    let _ = writeln!(
        out,
        "\nBoth nodes and the broker are in each figure; no Redis, no sockets. Batching {}.",
        if crate::clouds_rows::batching() {
            "on"
        } else {
            "off"
        }
    );
    Ok(out)
}

/// One call's wall time (its CPU time here: nothing in it waits for I/O).
async fn timed(caller: &CloudsCaller, payload: &[u8]) -> Result<Duration, String> {
    let started = Instant::now();
    caller.call(payload).await?;
    Ok(started.elapsed())
}

/// Reads and writes one byte per cache line of `buffer`, evicting what the caches held.
fn touch(buffer: &mut [u8]) {
    for line in buffer.chunks_mut(64) {
        line[0] = line[0].wrapping_add(1);
    }
    black_box(buffer);
}

/// Bytes of the last-level cache, from sysfs (`index3`, else the highest level listed).
fn last_level_cache() -> usize {
    (0..=3)
        .rev()
        .find_map(|i| {
            let path = format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size");
            let text = std::fs::read_to_string(path).ok()?;
            let text = text.trim();
            let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
            let n: usize = digits.parse().ok()?;
            match unit {
                "K" => Some(n * 1024),
                "M" => Some(n * 1024 * 1024),
                _ => None,
            }
        })
        .unwrap_or(DEFAULT_LLC)
}

/// Microseconds with one decimal: the hot figure is a few µs.
fn fmt_us(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        fmt_d(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_size_is_read_or_assumed() {
        let llc = last_level_cache();
        assert!(llc >= 64 * 1024, "{llc}");
    }

    #[test]
    fn short_durations_keep_a_decimal() {
        assert_eq!(fmt_us(Duration::from_nanos(6_300)), "6.3 µs");
        assert_eq!(fmt_us(Duration::from_millis(2)), "2.00 ms");
    }
}
