//! `clouds-bench claims`: the same echo call with its payload sent inline and as a claim, at
//! sizes around the claim threshold, to choose it (BENCHMARKS.md, "Claims").
//!
//! Inline: `claim_threshold(usize::MAX)` with a `max_frame_size` that fits the largest
//! payload, so every frame is one `PUBLISH`. Claim: `claim_threshold(0)`, so every argument and
//! result is stored with `SET`, referenced by a small frame and taken with `GETDEL`. Each row
//! is measured sequentially (latency) and with 16 calls in flight (throughput), on one
//! provider and one client in this process, against a `redis-server` of its own.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clouds::Client;
use clouds_testkit::RedisServer;

use crate::clouds_rows::{CloudsCaller, config, start_provider};
use crate::load::{payload, run};
use crate::stats::{Figures, median_figures};

const SIZES: &[usize] = &[100, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];
const IN_FLIGHT: usize = 16;

/// How the payload travels.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Inline,
    Claim,
    /// The default configuration: inline up to the default threshold, claims above it.
    Default,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Inline => "inline",
            Mode::Claim => "claim",
            Mode::Default => "default",
        }
    }

    fn config(self, url: &str) -> Result<clouds::Config, String> {
        let base = config(
            url,
            &format!("claims-{}", self.name()),
            Duration::from_secs(30),
        )?;
        Ok(match self {
            Mode::Inline => base.claim_threshold(usize::MAX).max_frame_size(8 << 20),
            Mode::Claim => base.claim_threshold(0),
            Mode::Default => base,
        })
    }
}

/// The `claims` subcommand: `[--quick] [--reps N]`.
pub(crate) fn main(args: &[String]) -> ExitCode {
    crate::subcommand("claims", args, 3, measure)
}

/// How many calls a run of `size`-byte payloads makes: about 64 MiB each way sequentially,
/// 256 MiB with calls in flight, within bounds.
fn calls(size: usize, in_flight: usize, quick: bool) -> usize {
    let bytes: usize = if in_flight > 1 { 256 << 20 } else { 64 << 20 };
    let calls = (bytes / size).clamp(40, if in_flight > 1 { 20_000 } else { 2_000 });
    if quick { (calls / 8).max(16) } else { calls }
}

async fn measure(quick: bool, reps: usize) -> Result<String, String> {
    let redis = RedisServer::start().map_err(|e| format!("cannot start redis-server: {e}"))?;
    let url = redis.url();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "clouds-bench claims, {reps} run(s) per figure (median); {}",
        crate::machine()
    );
    let _ = writeln!(
        out,
        "\n| payload | mode | in flight | calls | p50 | p99 | calls/s | MB/s each way |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for mode in [Mode::Inline, Mode::Claim, Mode::Default] {
        let config = mode.config(&url)?;
        let server = start_provider(config.clone()).await?;
        let client = Client::connect(config).await.map_err(|e| e.to_string())?;
        let caller = CloudsCaller::new(&client);
        for &size in SIZES {
            if mode == Mode::Default && !matches!(size, 100 | 65_536) {
                continue;
            }
            let body = payload(size);
            // Warm up: the provider lookup, the connections, the allocator.
            let _ = run(&caller, &body, 8, 4, Duration::from_secs(60)).await;
            for in_flight in [1, IN_FLIGHT] {
                let n = calls(size, in_flight, quick);
                let mut runs: Vec<Figures> = Vec::new();
                for _ in 0..reps {
                    let r = run(&caller, &body, n, in_flight, Duration::from_secs(120)).await;
                    if let Some(e) = &r.first_error {
                        eprintln!("{size} B {} x{in_flight}: {e}", mode.name());
                    }
                    runs.push(r.figures());
                }
                let f = median_figures(&runs);
                let mb = f.calls_per_sec * size as f64 / 1e6;
                let row = format!(
                    "| {} | {} | {in_flight} | {n} | {} | {} | {:.0} | {mb:.1} |{}",
                    human(size),
                    mode.name(),
                    crate::report::fmt_d(f.p50),
                    crate::report::fmt_d(f.p99),
                    f.calls_per_sec,
                    if f.errors > 0 {
                        format!(" {} errors", f.errors)
                    } else {
                        String::new()
                    }
                );
                eprintln!("{row}");
                let _ = writeln!(out, "{row}");
            }
        }
        client.close().await;
        server.shutdown().await.map_err(|e| e.to_string())?;
    }
    let _ = writeln!(out, "\nend: loadavg {}", crate::loadavg());
    Ok(out)
}

fn human(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}
