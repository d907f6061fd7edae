//! Exactly-once calls (`#[clouds(once)]`, `Route::once`) against ordinary ones: the same
//! 100 B echo, served by one provider as two routes, one marked once, called by name
//! (`Client::call` and `Client::call_once`) side by side in back-to-back pairs, one call at a
//! time (the cost per call: two scripts more on the server's path) and 64 in flight.

use std::convert::Infallible;
use std::fmt::Write as _;

use clouds::{Client, Route};
use clouds_testkit::RedisServer;

use crate::Plan;
use crate::clouds_rows::{self, InProcess, Payload, start_provider};
use crate::load::{self, Caller, payload};
use crate::report::{Ratios, fmt_d};
use crate::stats::{Figures, median_figures};
use crate::wire::info;

/// Payload bytes of the row.
const PAYLOAD: usize = 100;
/// The unmarked route and the marked one.
const PLAIN: &str = "bench.echo_plain";
const ONCE: &str = "bench.echo_once";

/// Calls one of the two routes by name.
#[derive(Clone)]
struct ByName {
    client: Client,
    once: bool,
}

impl Caller for ByName {
    async fn call(&self, payload: &[u8]) -> Result<(), String> {
        let args = (Payload(payload.to_vec()),);
        let Payload(back) = if self.once {
            self.client.call_once(ONCE, args).await
        } else {
            self.client.call(PLAIN, args).await
        }
        .map_err(|e| e.to_string())?;
        if back.len() != payload.len() {
            return Err(format!(
                "echo of {} bytes came back with {}",
                payload.len(),
                back.len()
            ));
        }
        Ok(())
    }
}

/// One in-flight level's figures: unmarked, marked, and marked ÷ unmarked (median pair).
#[derive(Debug, Clone)]
pub(crate) struct Level {
    in_flight: usize,
    calls: usize,
    plain: Figures,
    once: Figures,
    ratios: Ratios,
    /// Redis commands per call (from `INFO commandstats`), unmarked and marked.
    commands: [f64; 2],
}

/// The row: one call at a time and 64 in flight.
#[derive(Debug, Clone)]
pub(crate) struct OnceCost {
    levels: Vec<Level>,
}

/// Every command Redis has run so far (the sum of `INFO commandstats` calls).
fn commands(redis: &RedisServer) -> f64 {
    info(redis, "commandstats")
        .values()
        .filter_map(|v| v.strip_prefix("calls="))
        .filter_map(|v| v.split(',').next())
        .filter_map(|n| n.parse::<f64>().ok())
        .sum()
}

/// Measures the echo unmarked and marked once, at 1 and 64 in flight.
pub(crate) async fn measure(plan: &Plan, redis: &RedisServer) -> Result<OnceCost, String> {
    let url = &redis.url();
    let config = clouds_rows::config(url, "bench-once", crate::CALL_TIMEOUT)?;
    let server = start_provider(config.clone()).await?;
    let echo = |name: &str| {
        Route::new(
            name,
            |(p,): (Payload,)| async move { Ok::<_, Infallible>(p) },
        )
    };
    server
        .serve(vec![echo(PLAIN), echo(ONCE).once()])
        .await
        .map_err(|e| e.to_string())?;
    let client = Client::connect(config).await.map_err(|e| e.to_string())?;
    let deployment = InProcess { server, client };
    let callers = [
        ByName {
            client: deployment.client.clone(),
            once: false,
        },
        ByName {
            client: deployment.client.clone(),
            once: true,
        },
    ];
    let payload = payload(PAYLOAD);
    let mut levels = Vec::new();
    for (in_flight, calls) in [(1, plan.seq_calls), (64, plan.flight_calls / 4)] {
        let warm = (calls / 10).clamp(50, 2_000);
        for caller in &callers {
            let _ = load::run(caller, &payload, warm, in_flight, plan.run_limit).await;
        }
        let mut runs: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
        let mut spent: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut pairs = Vec::new();
        for rep in 0..plan.reps {
            let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
            for side in order {
                let before = commands(redis);
                let run =
                    load::run(&callers[side], &payload, calls, in_flight, plan.run_limit).await;
                let done = run.latencies.len().max(1) as f64;
                spent[side].push((commands(redis) - before) / done);
                if let Some(e) = &run.first_error {
                    eprintln!(
                        "  once {}: {} errors, first: {e}",
                        ["off", "on"][side],
                        run.errors
                    );
                }
                let f = run.figures();
                eprintln!(
                    "once {} at {in_flight} in flight, run {}: {:.0} calls/s p50 {} p99 {}",
                    ["off", "on"][side],
                    rep + 1,
                    f.calls_per_sec,
                    fmt_d(f.p50),
                    fmt_d(f.p99),
                );
                runs[side].push(f);
            }
            if let (Some(off), Some(on)) = (runs[0].last(), runs[1].last()) {
                pairs.push(Ratios::of(on, off));
            }
        }
        levels.push(Level {
            in_flight,
            calls,
            plain: median_figures(&runs[0]),
            once: median_figures(&runs[1]),
            ratios: Ratios::median(&pairs),
            commands: [
                crate::stats::median(&spent[0]),
                crate::stats::median(&spent[1]),
            ],
        });
    }
    deployment.stop().await;
    Ok(OnceCost { levels })
}

/// The row's table.
pub(crate) fn notes(cost: &OnceCost) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nExactly-once calls (`#[clouds(once)]`), {PAYLOAD} B echo by name, 1 provider \
         in-process, one route unmarked and one marked; side by side in back-to-back pairs:\n"
    );
    let _ = writeln!(
        t,
        "| in flight | calls | unmarked calls/s | once calls/s | once ÷ unmarked | unmarked p50 | once p50 | p50 ratio | Redis commands per call, unmarked / once |"
    );
    let _ = writeln!(t, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for l in &cost.levels {
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} | {:.0} | {:.3} | {} | {} | {:.3} | {:.2} / {:.2} |",
            l.in_flight,
            l.calls,
            l.plain.calls_per_sec,
            l.once.calls_per_sec,
            l.ratios.calls_per_sec,
            fmt_d(l.plain.p50),
            fmt_d(l.once.p50),
            l.ratios.p50,
            l.commands[0],
            l.commands[1],
        );
    }
    let errors: usize = cost
        .levels
        .iter()
        .map(|l| l.plain.errors + l.once.errors)
        .sum();
    let _ = writeln!(t, "\n{errors} errors.");
    t
}
