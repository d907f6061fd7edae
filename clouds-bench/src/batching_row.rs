//! `clouds-bench batching`: what batching costs a call alone. The p50 at 1 call in flight of
//! two otherwise identical deployments, one with batching off (`Config::batching(false)`) and
//! one with it on, interleaved call by call, beside raw's p50 interleaved the same way with
//! the batching deployment (the full table's latency row). Each round makes both pairings,
//! the first of them alternating from round to round.
//!
//! Why: batching is meant to leave a call made alone as fast as without it. The full table's
//! latency row compares clouds with raw fred, and so measures all of clouds' work on a call's
//! path, most of which predates batching. Interleaving clouds with itself, batching off
//! against on, measures batching's part alone; separate runs drift by more than the
//! difference looked for.

use std::fmt::Write as _;
use std::time::Duration;

use clouds_testkit::RedisServer;

use crate::clouds_rows::{CloudsCaller, InProcess, config};
use crate::load::{self, payload};
use crate::raw::{Channels, RawClient, RawServer};
use crate::report::fmt_d;
use crate::stats::{median, ratio};

/// Payload bytes, as the full table's latency row.
const PAYLOAD: usize = 100;

/// The `batching` subcommand: `[--quick] [--reps N]`.
pub(crate) fn main(args: &[String]) -> std::process::ExitCode {
    crate::subcommand("batching", args, 5, measure)
}

/// One round's p50s.
#[derive(Debug, Clone, Copy)]
struct Round {
    off: Duration,
    on: Duration,
    /// Raw's, interleaved with `on_beside_raw`.
    raw: Duration,
    on_beside_raw: Duration,
}

async fn measure(quick: bool, reps: usize) -> Result<String, String> {
    let calls = if quick { 500 } else { 5_000 };
    let redis = RedisServer::start().map_err(|e| format!("redis-server: {e}"))?;
    let mut sides = Sides::default();
    let measured = sides.start_and_measure(&redis.url(), calls, reps).await;
    // Stopped whether or not all of them started.
    sides.stop().await;
    measured
}

/// The three deployments the row compares, each there once started.
#[derive(Default)]
struct Sides {
    off: Option<InProcess>,
    on: Option<InProcess>,
    raw_server: Option<RawServer>,
    raw: Option<RawClient>,
}

impl Sides {
    async fn start_and_measure(
        &mut self,
        url: &str,
        calls: usize,
        reps: usize,
    ) -> Result<String, String> {
        let off = &*self
            .off
            .insert(deployment(url, "bench-batching-off", false).await?);
        let on = &*self
            .on
            .insert(deployment(url, "bench-batching-on", true).await?);
        let channels = Channels::new("batching-raw", 1);
        self.raw_server =
            Some(RawServer::start(url, &channels.requests[0], &channels.reply).await?);
        let raw = &*self
            .raw
            .insert(RawClient::connect(url, &channels, crate::CALL_TIMEOUT).await?);

        let (off, on) = (
            CloudsCaller::new(&off.client),
            CloudsCaller::new(&on.client),
        );
        let payload = payload(PAYLOAD);
        // Warm-up: connections, provider caches, the allocator.
        let _ = load::interleaved(&off, &on, &payload, 200, load::Marks::OFF).await;
        let _ = load::interleaved(raw, &on, &payload, 200, load::Marks::OFF).await;
        let mut rounds = Vec::new();
        let mut errors = 0;
        for rep in 0..reps {
            // Which pairing goes first alternates, so neither always follows the other.
            let ((off_p50, on_p50, e1), (raw_p50, beside, e2)) = if rep % 2 == 0 {
                let off_on = load::interleaved(&off, &on, &payload, calls, load::Marks::OFF).await;
                (
                    off_on,
                    load::interleaved(raw, &on, &payload, calls, load::Marks::OFF).await,
                )
            } else {
                let raw_on = load::interleaved(raw, &on, &payload, calls, load::Marks::OFF).await;
                (
                    load::interleaved(&off, &on, &payload, calls, load::Marks::OFF).await,
                    raw_on,
                )
            };
            errors += e1 + e2;
            eprintln!(
                "batching run {}: off {} on {} ({:.3}); raw {} on {} ({:.3})",
                rep + 1,
                fmt_d(off_p50),
                fmt_d(on_p50),
                ratio(on_p50, off_p50),
                fmt_d(raw_p50),
                fmt_d(beside),
                ratio(beside, raw_p50),
            );
            rounds.push(Round {
                off: off_p50,
                on: on_p50,
                raw: raw_p50,
                on_beside_raw: beside,
            });
        }
        Ok(table(&rounds, calls, errors))
    }

    /// Stops what started.
    async fn stop(&mut self) {
        if let Some(raw) = self.raw.take() {
            raw.close().await;
        }
        if let Some(server) = self.raw_server.take() {
            server.stop().await;
        }
        for side in [self.on.take(), self.off.take()].into_iter().flatten() {
            side.stop().await;
        }
    }
}

/// A provider and a client in `namespace`, batching as `batching` says (this row ignores
/// `CLOUDS_BENCH_BATCHING`).
async fn deployment(url: &str, namespace: &str, batching: bool) -> Result<InProcess, String> {
    InProcess::with_config(config(url, namespace, crate::CALL_TIMEOUT)?.batching(batching)).await
}

/// The table: per round and the medians.
fn table(rounds: &[Round], calls: usize, errors: usize) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "## Batching alone: p50 at 1 in flight, {PAYLOAD} B, interleaved call by call \
         ({calls} calls each per round)\n"
    );
    let _ = writeln!(
        t,
        "| round | batching off | batching on | on ÷ off | raw | on (beside raw) | on ÷ raw |"
    );
    let _ = writeln!(t, "|--:|--:|--:|--:|--:|--:|--:|");
    for (i, r) in rounds.iter().enumerate() {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.3} | {} | {} | {:.3} |",
            i + 1,
            fmt_d(r.off),
            fmt_d(r.on),
            ratio(r.on, r.off),
            fmt_d(r.raw),
            fmt_d(r.on_beside_raw),
            ratio(r.on_beside_raw, r.raw),
        );
    }
    let on_off = median(
        &rounds
            .iter()
            .map(|r| ratio(r.on, r.off))
            .collect::<Vec<_>>(),
    );
    let on_raw = median(
        &rounds
            .iter()
            .map(|r| ratio(r.on_beside_raw, r.raw))
            .collect::<Vec<_>>(),
    );
    let _ = writeln!(
        t,
        "\nMedian of the rounds' ratios: batching on ÷ off **{on_off:.3}**; on ÷ raw \
         **{on_raw:.3}**. Errors: {errors}."
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn the_table_shows_each_round_and_the_median_ratios() {
        let rounds = [
            Round {
                off: us(300),
                on: us(303),
                raw: us(250),
                on_beside_raw: us(275),
            },
            Round {
                off: us(200),
                on: us(190),
                raw: us(200),
                on_beside_raw: us(200),
            },
            Round {
                off: us(400),
                on: us(400),
                raw: us(300),
                on_beside_raw: us(330),
            },
        ];
        let table = table(&rounds, 5_000, 2);
        assert!(table.contains("| 1 | 300 µs | 303 µs | 1.010 |"), "{table}");
        assert!(table.contains("| 2 | 200 µs | 190 µs | 0.950 |"), "{table}");
        // on ÷ off: 1.010, 0.950, 1.000 -> 1.000; on ÷ raw: 1.100, 1.000, 1.100 -> 1.100.
        assert!(
            table.contains("batching on ÷ off **1.000**; on ÷ raw **1.100**. Errors: 2."),
            "{table}"
        );
    }
}
