//! Signed frames on against off (`Config::signing_key`): the same in-process echo at 64 in
//! flight through two otherwise identical deployments, one signing every frame, side by side
//! in back-to-back pairs.

use std::fmt::Write as _;

use clouds_testkit::RedisServer;

use crate::Plan;
use crate::clouds_rows::{self, CloudsCaller, InProcess};
use crate::load::{self, payload};
use crate::report::{Ratios, fmt_d};
use crate::stats::{Figures, median, median_figures};
use crate::wire::info;

/// Calls in flight in the signing row.
const IN_FLIGHT: usize = 64;
/// Payload bytes of the signing row.
const PAYLOAD: usize = 100;
/// The target: signing costs under 10 % of the calls per second.
const TARGET: f64 = 0.90;
/// The bench's signing key (any 32 bytes; it protects nothing here).
const KEY: [u8; 32] = *b"clouds-bench signing key 32 byte";

/// The signing row's figures.
#[derive(Debug, Clone)]
pub(crate) struct SigningCost {
    calls: usize,
    off: Figures,
    on: Figures,
    /// on ÷ off, the median over back-to-back pairs.
    ratios: Ratios,
    /// CPU time per call, µs, of this process and of Redis together: off, on, and on ÷ off
    /// (the median over the pairs). Unlike calls/s, it does not depend on how much of the
    /// machine other processes take meanwhile.
    cpu_us: [f64; 2],
    cpu_ratio: f64,
}

/// CPU seconds this process and `redis` have used so far (this process from
/// `/proc/self/stat`, in clock ticks of 10 ms; Redis from `INFO cpu`, in µs).
fn cpu_seconds(redis: &RedisServer) -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which is in parentheses): utime and stime are
    // the 12th and 13th of them.
    let own = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            (ticks(11) + ticks(12)) / 100.0
        })
        .unwrap_or(0.0);
    let cpu = info(redis, "cpu");
    let field = |k: &str| {
        cpu.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    own + field("used_cpu_user") + field("used_cpu_sys")
}

/// Starts a provider and a client in `namespace`, signing with [`KEY`] if `signed`.
pub(crate) async fn deployment(
    url: &str,
    namespace: &str,
    signed: bool,
) -> Result<InProcess, String> {
    let mut config = clouds_rows::config(url, namespace, crate::CALL_TIMEOUT)?;
    if signed {
        config = config.signing_key(1, KEY);
    }
    InProcess::with_config(config).await
}

/// Measures 100 B echo calls at 64 in flight with signing off and on.
pub(crate) async fn measure(plan: &Plan, redis: &RedisServer) -> Result<SigningCost, String> {
    let url = &redis.url();
    let off = deployment(url, "bench-sign-off", false).await?;
    let on = deployment(url, "bench-sign-on", true).await?;
    let callers = [
        CloudsCaller::new(&off.client),
        CloudsCaller::new(&on.client),
    ];
    let payload = payload(PAYLOAD);
    let calls = plan.flight_calls;
    let warm = (calls / 10).clamp(100, 2_000);
    for caller in &callers {
        let _ = load::run(caller, &payload, warm, IN_FLIGHT, plan.run_limit).await;
    }
    let mut runs: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
    let mut pairs = Vec::new();
    let mut cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut cpu_pairs = Vec::new();
    for rep in 0..plan.reps {
        let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let before = cpu_seconds(redis);
            let run = load::run(&callers[side], &payload, calls, IN_FLIGHT, plan.run_limit).await;
            let done = run.latencies.len().max(1) as f64;
            cpu[side].push((cpu_seconds(redis) - before) * 1e6 / done);
            if let Some(e) = &run.first_error {
                eprintln!(
                    "  signing {}: {} errors, first: {e}",
                    ["off", "on"][side],
                    run.errors
                );
            }
            let f = run.figures();
            eprintln!(
                "signing {} run {}: {:.0} calls/s p50 {} p99 {}, {:.1} µs CPU per call",
                ["off", "on"][side],
                rep + 1,
                f.calls_per_sec,
                fmt_d(f.p50),
                fmt_d(f.p99),
                cpu[side].last().copied().unwrap_or(0.0)
            );
            runs[side].push(f);
        }
        if let (Some(off), Some(on)) = (runs[0].last(), runs[1].last()) {
            pairs.push(Ratios::of(on, off));
        }
        if let (Some(off), Some(on)) = (cpu[0].last(), cpu[1].last())
            && *off > 0.0
        {
            cpu_pairs.push(on / off);
        }
    }
    let stats = on.server.stats();
    if stats.unauthenticated_frames + stats.replayed_frames > 0 {
        eprintln!("signing: the signed provider refused frames: {stats:?}");
    }
    off.stop().await;
    on.stop().await;
    Ok(SigningCost {
        calls,
        off: median_figures(&runs[0]),
        on: median_figures(&runs[1]),
        ratios: Ratios::median(&pairs),
        cpu_us: [median(&cpu[0]), median(&cpu[1])],
        cpu_ratio: median(&cpu_pairs),
    })
}

/// The signing table and its target.
pub(crate) fn notes(cost: &SigningCost) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nSigned frames (`Config::signing_key`, HMAC-SHA256 on every frame), {PAYLOAD} B x{} \
         at {IN_FLIGHT} in flight, 1 provider in-process; off and on in back-to-back pairs:\n",
        cost.calls
    );
    let _ = writeln!(t, "| | signing off | signing on | on ÷ off (median pair) |");
    let _ = writeln!(t, "|---|--:|--:|--:|");
    let _ = writeln!(
        t,
        "| calls/s | {:.0} | {:.0} | {:.3} |",
        cost.off.calls_per_sec, cost.on.calls_per_sec, cost.ratios.calls_per_sec
    );
    let _ = writeln!(
        t,
        "| p50 | {} | {} | {:.3} |",
        fmt_d(cost.off.p50),
        fmt_d(cost.on.p50),
        cost.ratios.p50
    );
    let _ = writeln!(
        t,
        "| p99 | {} | {} | {:.3} |",
        fmt_d(cost.off.p99),
        fmt_d(cost.on.p99),
        cost.ratios.p99
    );
    let _ = writeln!(
        t,
        "| CPU per call, this process + Redis | {:.1} µs | {:.1} µs | {:.3} |",
        cost.cpu_us[0], cost.cpu_us[1], cost.cpu_ratio
    );
    let errors = cost.off.errors + cost.on.errors;
    let met = if cost.ratios.calls_per_sec >= TARGET {
        "met"
    } else {
        "NOT met"
    };
    let _ = writeln!(
        t,
        "\nTarget: signing costs under 10 % (on ÷ off calls/s ≥ {TARGET:.2}): {met} ({:.3}); {errors} errors.",
        cost.ratios.calls_per_sec
    );
    t
}
