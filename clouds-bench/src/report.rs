//! The table: rows, ratios, the memory lines, what Redis did, and the targets.

use std::fmt::Write as _;
use std::time::Duration;

use crate::rss;
use crate::stats::{Figures, median};
use crate::wire::{Wire, WireCost};

/// Where the rows' providers run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Setup {
    /// One provider (raw server) in this process, as a separate node.
    InProcess,
    /// Three provider (raw server) processes.
    Processes,
    /// Three provider (raw server) processes on a Redis Cluster (`--cluster`).
    Cluster,
}

/// One line of the table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) payload: usize,
    pub(crate) calls: usize,
    pub(crate) in_flight: usize,
    pub(crate) setup: Setup,
    pub(crate) raw: Figures,
    pub(crate) clouds: Figures,
    /// clouds ÷ raw, the median over runs of the ratio within each back-to-back pair.
    pub(crate) ratios: Ratios,
    /// clouds could not run here (the reason is in the notes): only raw was measured.
    pub(crate) clouds_skipped: bool,
}

/// clouds ÷ raw for one row's figures.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ratios {
    pub(crate) calls_per_sec: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
}

impl Ratios {
    /// The ratios of one pair of runs.
    pub(crate) fn of(clouds: &Figures, raw: &Figures) -> Ratios {
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        Ratios {
            calls_per_sec: div(clouds.calls_per_sec, raw.calls_per_sec),
            p50: div(clouds.p50.as_secs_f64(), raw.p50.as_secs_f64()),
            p99: div(clouds.p99.as_secs_f64(), raw.p99.as_secs_f64()),
        }
    }

    /// Each ratio's median over `pairs`.
    pub(crate) fn median(pairs: &[Ratios]) -> Ratios {
        let of = |f: fn(&Ratios) -> f64| median(&pairs.iter().map(f).collect::<Vec<_>>());
        Ratios {
            calls_per_sec: of(|r| r.calls_per_sec),
            p50: of(|r| r.p50),
            p99: of(|r| r.p99),
        }
    }
}

/// The memory lines of the table: the median run of each kind (by bytes per call).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    pub(crate) in_flight: usize,
    pub(crate) burst: [rss::Sample; 2],
    pub(crate) ramped: [rss::Sample; 2],
}

/// A duration for the table.
pub(crate) fn fmt_d(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1_000.0)
    }
}

pub(crate) fn fmt_size(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

pub(crate) fn ratio(clouds: f64, raw: f64) -> String {
    if raw > 0.0 {
        format!("{:.2}", clouds / raw)
    } else {
        "-".into()
    }
}

pub(crate) fn table(rows: &[Row], memory: &Result<Memory, String>) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\n| payload | calls | in flight | providers | calls/s raw | calls/s clouds | ÷ | p50 raw | p50 clouds | ÷ | p99 raw | p99 clouds | ÷ | errors raw/clouds |"
    );
    let _ = writeln!(
        t,
        "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for r in rows {
        let providers = match r.setup {
            Setup::InProcess => "1, in-process",
            Setup::Processes => "3 processes",
            Setup::Cluster => "3 processes, cluster",
        };
        let flight = if r.in_flight == 1 {
            "1 (sequential)".to_string()
        } else {
            format!("{}", r.in_flight)
        };
        if r.clouds_skipped {
            let _ = writeln!(
                t,
                "| {} | {} | {flight} | {providers} | {:.0} | skipped | - | {} | skipped | - | {} | skipped | - | {}/- |",
                fmt_size(r.payload),
                r.calls,
                r.raw.calls_per_sec,
                fmt_d(r.raw.p50),
                fmt_d(r.raw.p99),
                r.raw.errors,
            );
            continue;
        }
        let _ = writeln!(
            t,
            "| {} | {} | {flight} | {providers} | {:.0} | {:.0} | {:.2} | {} | {} | {:.2} | {} | {} | {:.2} | {}/{} |",
            fmt_size(r.payload),
            r.calls,
            r.raw.calls_per_sec,
            r.clouds.calls_per_sec,
            r.ratios.calls_per_sec,
            fmt_d(r.raw.p50),
            fmt_d(r.clouds.p50),
            r.ratios.p50,
            fmt_d(r.raw.p99),
            fmt_d(r.clouds.p99),
            r.ratios.p99,
            r.raw.errors,
            r.clouds.errors,
        );
    }
    match memory {
        Ok(m) => t.push_str(&memory_table(m)),
        Err(e) => {
            let _ = writeln!(t, "\nClient RSS per call in flight: not measured: {e}");
        }
    }
    let _ = writeln!(
        t,
        "\nPayload: N application bytes each way. raw sends them after a 9-byte header (call id + op) and \
         the server republishes the frame unchanged; clouds sends `Payload(#[serde(with = \"serde_bytes\")] Vec<u8>)`, \
         the same N bytes as one MessagePack bin, inside its call/reply envelope (bytes per call below). \
         ÷ is clouds ÷ raw: above 1 is better for calls/s, below 1 is better for latencies. \
         Each run of clouds is paired with a run of raw right before or after it (the order alternates), \
         and ÷ is the median over the pairs of the ratio within each pair: the machine's speed drifts \
         between runs, and a pair sees the same machine. The figures are the medians of each side's runs. \
         Errors count failed calls plus calls not started within a run's time limit, summed over the runs."
    );
    t
}

pub(crate) fn wire_notes(wire: &Wire) -> String {
    let mut t = String::from(
        "\nRedis commands and bytes per call (sequential 100 B calls, 1 provider in-process, from INFO commandstats/stats):\n\n",
    );
    t.push_str(&per_call_lines(&wire.per_call));
    t.push_str("  at 64 in flight:\n");
    t.push_str(&per_call_lines(&wire.at_64));
    t.push_str(
        "  (commands that are not PUBLISH come from timers, not calls: heartbeats and provider refreshes every 2 s)\n",
    );
    let (calls, errors, commands) = &wire.herd;
    let commands: Vec<String> = commands
        .iter()
        .map(|(c, k)| format!("{} {k}", c.to_uppercase()))
        .collect();
    let _ = writeln!(
        t,
        "- clouds, {calls} calls started at once of a method this client had not called yet ({errors} errors): {}",
        commands.join(", ")
    );
    t
}

/// One line per side: commands and bytes per call.
fn per_call_lines(per_call: &[(&str, WireCost)]) -> String {
    let mut t = String::new();
    for (name, w) in per_call {
        let n = w.calls as f64;
        let commands: Vec<String> = w
            .commands
            .iter()
            .map(|(c, k)| format!("{} {:.3}/call ({k})", c.to_uppercase(), *k as f64 / n))
            .collect();
        let _ = writeln!(
            t,
            "- {name}: {} calls in {:.1?}: {}; into Redis {:.0} B/call, out of Redis {:.0} B/call",
            w.calls,
            w.elapsed,
            commands.join(", "),
            w.bytes_in as f64 / n,
            w.bytes_out as f64 / n
        );
    }
    t
}

/// What the cluster rows ran on, what Redis did per call there, and why clouds did not run
/// if it did not.
pub(crate) fn cluster_notes(
    shape: &str,
    channels: &[String],
    per_call: &[(&str, WireCost)],
    clouds_skipped: Option<&str>,
) -> String {
    let mut t = format!(
        "\nCluster rows (`--cluster`): a Redis Cluster of {shape} on loopback, started by the bench. \
         raw uses sharded pub/sub (SSUBSCRIBE/SPUBLISH) through fred's cluster client; \
         clouds is given the cluster's seed URL (`redis-cluster://...`). \
         raw's channels, each on its own slot: {}.\n\n\
         Redis commands and bytes per call on the cluster (sequential 100 B calls, 3 processes, \
         summed over the primaries):\n\n",
        channels.join(", ")
    );
    t.push_str(&per_call_lines(per_call));
    if let Some(reason) = clouds_skipped {
        let _ = writeln!(t, "- clouds: not measured on the cluster: {reason}");
    }
    t
}

/// The memory table.
pub(crate) fn memory_table(m: &Memory) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\n| client process, {} calls in flight (100 B, 3 provider processes) | raw | clouds | ÷ |",
        m.in_flight
    );
    let _ = writeln!(t, "|---|--:|--:|--:|");
    let kib = |s: &rss::Sample| s.bytes_per_call() / 1024.0;
    let mib = |kb: u64| kb as f64 / 1024.0;
    for (what, [raw, clouds]) in [
        ("all started at once (burst)", m.burst),
        (
            &*format!(
                "started {} at a time, {} ms apart (ramped)",
                rss::RAMP_BATCH,
                rss::RAMP_GAP.as_millis()
            ),
            m.ramped,
        ),
    ] {
        let _ = writeln!(
            t,
            "| RSS per call in flight, {what} | {:.2} KiB | {:.2} KiB | {} |",
            kib(&raw),
            kib(&clouds),
            ratio(kib(&clouds), kib(&raw))
        );
        let _ = writeln!(
            t,
            "| … VmRSS before → with all in flight → VmHWM | {:.1} → {:.1} → {:.1} MiB | {:.1} → {:.1} → {:.1} MiB | |",
            mib(raw.base_kb),
            mib(raw.full_kb),
            mib(raw.hwm_kb),
            mib(clouds.base_kb),
            mib(clouds.full_kb),
            mib(clouds.hwm_kb)
        );
        let _ = writeln!(
            t,
            "| … calls in flight reached / errors | {} / {} | {} / {} | |",
            raw.reached, raw.errors, clouds.reached, clouds.errors
        );
    }
    let (raw, clouds) = (m.burst[0].future_bytes, m.burst[1].future_bytes);
    let _ = writeln!(
        t,
        "| size of one call's future (`size_of_val`) | {raw} B | {clouds} B | {} |",
        ratio(clouds as f64, raw as f64)
    );
    let _ = writeln!(
        t,
        "\nRSS per call in flight = (max(VmHWM, VmRSS with all in flight) − VmRSS before) ÷ calls, \
         in a fresh child process per figure; the bench spawns one task per call for both."
    );
    t
}

/// 1 in flight, raw and clouds interleaved call by call (`load::interleaved`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Interleaved {
    pub(crate) calls: usize,
    pub(crate) raw_p50: std::time::Duration,
    pub(crate) clouds_p50: std::time::Duration,
    /// Median over the runs of clouds p50 ÷ raw p50.
    pub(crate) ratio: f64,
    pub(crate) errors: usize,
}

/// The latency target's line: clouds' p50 against raw's at 1 in flight, interleaved.
fn alone_line(alone: &Interleaved) -> String {
    format!(
        "- 1 in flight, p50 ≤ 1.03 × raw, interleaved call by call ({} calls each, median of runs): \
         raw {} clouds {}, {:.3}, {} errors — {}\n",
        alone.calls,
        fmt_d(alone.raw_p50),
        fmt_d(alone.clouds_p50),
        alone.ratio,
        alone.errors,
        mark(alone.ratio <= 1.03)
    )
}

/// How a target's line ends.
fn mark(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// `--alone`'s report: the latency target alone.
pub(crate) fn alone_notes(alone: &Interleaved) -> String {
    format!(
        "\nTarget (100 B, 1 provider in-process):\n\n{}",
        alone_line(alone)
    )
}

/// The targets, checked against this run.
pub(crate) fn targets(
    rows: &[Row],
    memory: &Result<Memory, String>,
    scaling: f64,
    wire: &Wire,
    alone: &Interleaved,
) -> String {
    let find = |payload: usize, in_flight: usize| {
        rows.iter().find(|r| {
            r.payload == payload && r.in_flight == in_flight && r.setup == Setup::InProcess
        })
    };
    // Three decimals: at two, 0.899 would print as "0.90 — NOT met".
    let mut t = String::from("\nTargets (100 B, 1 provider in-process unless said):\n\n");
    if let Some(r) = find(100, 64) {
        let x = r.ratios.calls_per_sec;
        let _ = writeln!(
            t,
            "- 64 in flight, clouds ≥ 2 × raw calls/s: {x:.3} — {}",
            mark(x >= 2.0)
        );
    }
    if let Some(r) = find(100, 1_000) {
        let x = r.ratios.calls_per_sec;
        let _ = writeln!(
            t,
            "- 1,000 in flight, clouds ≥ 4 × raw calls/s: {x:.3} — {}",
            mark(x >= 4.0)
        );
    }
    t.push_str(&alone_line(alone));
    if let Some((_, w)) = wire.at_64.iter().find(|(name, _)| *name == "clouds") {
        let x = w.publishes_per_call();
        let _ = writeln!(
            t,
            "- ≤ 0.15 PUBLISH per call at 64 in flight (calls and replies, INFO commandstats): {x:.3} — {}",
            mark(x <= 0.15)
        );
    }
    if let (Some(a), Some(b)) = (find(100, 64), find(100, 1_000)) {
        let rows_ratio = b.clouds.calls_per_sec / a.clouds.calls_per_sec.max(1e-9);
        let ok = scaling >= 0.8 && b.clouds.errors == 0;
        let _ = writeln!(
            t,
            "- 1,000 in flight ≥ 0.8 × 64 in flight (clouds), no errors: {scaling:.3} \
             (median of back-to-back pairs; the two rows' medians give {rows_ratio:.2}), {} errors — {}",
            b.clouds.errors,
            mark(ok)
        );
    }
    match memory {
        Ok(m) => {
            let burst = m.burst[1].bytes_per_call() / 1024.0;
            let ramped = m.ramped[1].bytes_per_call() / 1024.0;
            let _ = writeln!(
                t,
                "- ≤ 1.9 KiB client RSS per call in flight (as before batching; {} in flight): {burst:.2} KiB started at once, \
             {ramped:.2} KiB ramped — {} / {}",
                m.in_flight,
                mark(burst <= 1.9),
                mark(ramped <= 1.9)
            );
        }
        Err(e) => {
            let _ = writeln!(
                t,
                "- ≤ 1.9 KiB client RSS per call in flight: not measured ({e}) — {}",
                mark(false)
            );
        }
    }
    t
}
