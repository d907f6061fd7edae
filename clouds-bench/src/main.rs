//! # clouds-bench: clouds against the raw Redis pub/sub round trip, in one run
//!
//! ```text
//! cargo run --release -p clouds-bench            # the full table (a few minutes)
//! cargo run --release -p clouds-bench -- --quick # a smoke test of every row (seconds)
//! cargo run --release -p clouds-bench -- --cluster # and rows on a Redis Cluster
//! cargo run --release -p clouds-bench -- registry  # registry CPU at 1,000 servers and callers
//! cargo run --release -p clouds-bench -- claims    # large payloads inline against claims
//! cargo run --release -p clouds-bench -- streams   # stream items/s by window, beside the raw round trip
//! cargo run --release -p clouds-bench -- cold      # one call with no Redis, caches hot and cold
//! cargo run --release -p clouds-bench -- batching  # p50 alone, batching off against on, interleaved
//! ```
//!
//! Starts its own `redis-server` on a free loopback port and measures, against it, an echo
//! round trip made with fred alone (the floor) and through a `#[clouds::service]` stub. With
//! `--cluster` it then starts a Redis Cluster (3 primaries, 3 replicas) and measures the
//! 3-process rows again on it, raw with sharded pub/sub. The table goes to stdout
//! (Markdown), progress to stderr. See `BENCHMARKS.md` at the repository root for the results
//! and the profile.
//!
//! # Layout
//!
//! - `main.rs`: arguments, roles (the binary re-executes itself as provider, raw server and
//!   RSS client processes), the rows and the table.
//! - `raw.rs`: the baseline, fred alone (`SPUBLISH`/`SSUBSCRIBE` on a cluster).
//! - `clouds_rows.rs`: the `Bench` service, its provider and the caller.
//! - `claims.rs`: `claims`, the echo call inline and through claims from 100 B to 4 MiB.
//! - `streams.rs`: `streams`, a streaming method's items/s at windows 1–256 beside the raw
//!   round trip and sequential calls.
//! - `cold.rs`: `cold`, one call through the in-memory broker on one thread, with its code and
//!   data in the caches and evicted (what the p50 at 1 in flight is made of).
//! - `batching_row.rs`: `batching`, the p50 at 1 in flight with batching off against on,
//!   interleaved call by call (what batching costs a call alone).
//! - `cluster.rs`: the rows on a Redis Cluster (`--cluster`).
//! - `registry_sim.rs`: `registry`, the registry's Redis CPU with 1,000 servers beating and
//!   1,000 callers refreshing, full lookups against generation lookups.
//! - `load.rs`: the bounded load generator both are driven by, and the interleaved p50 (with
//!   `--mark-calls`, each call marked for `scripts/segments.py`).
//! - `rss.rs`: client memory per call in flight, in a child process.
//! - `signing_row.rs`: signed frames on against off, at 64 in flight.
//! - `once_row.rs`: exactly-once calls against ordinary ones (`--once` alone).
//! - `wire.rs`: Redis commands and bytes per call, from `INFO`.
//! - `report.rs`: the table, the ratios and the targets.
//! - `procs.rs`: the children's protocol (wait for `ready`, stop by closing stdin) on top of
//!   the testkit's child-process harness, which never leaks one.
//! - `stats.rs`: percentiles and medians.

/// With `--features mimalloc`, every allocation of the bench (raw and clouds alike).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The allocator every figure was measured with, for the table's header.
const ALLOCATOR_NAME: &str = if cfg!(feature = "mimalloc") {
    "mimalloc (--features mimalloc)"
} else {
    "the system's (glibc malloc)"
};

mod batching_row;
mod claims;
mod clouds_rows;
mod cluster;
mod cold;
mod load;
mod once_row;
mod procs;
mod raw;
mod registry_sim;
mod report;
mod rss;
mod signing_row;
mod stats;
mod streams;
mod wire;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clouds_testkit::{RedisCluster, RedisServer};

use crate::clouds_rows::{CloudsCaller, InProcess};
use crate::load::{Caller, payload};
use crate::procs::Proc;
use crate::raw::{Channels, RawClient, RawServer};
use crate::report::Interleaved;
use crate::report::{Memory, Ratios, Row, Setup, cluster_notes, fmt_d, table, targets, wire_notes};
use crate::stats::{Figures, median_figures};
use crate::wire::{Wire, first_calls, info, wire_cost, wire_cost_at};

/// How long one call waits for its reply, raw and clouds alike.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The namespace of the in-process provider and client.
const NS_IN_PROCESS: &str = "bench1";
/// The namespace of the provider processes and their client.
const NS_PROCESSES: &str = "bench3";
/// How many provider processes (and raw server processes) the multi-process rows use.
const PROCESSES: usize = 3;

/// How much of everything to do.
#[derive(Debug, Clone)]
struct Plan {
    name: &'static str,
    reps: usize,
    seq_calls: usize,
    flight_calls: usize,
    big_seq_calls: usize,
    big_flight_calls: usize,
    rss_in_flight: usize,
    /// Longest a single measured run may take before it stops starting calls.
    run_limit: Duration,
    /// Also measure the 3-process rows on a Redis Cluster (`--cluster`).
    cluster: bool,
    /// One row alone rather than the full table (`--signing`, `--once`, `--alone`).
    only: Only,
    /// Mark each interleaved call's start and end with a system call, for
    /// `scripts/segments.py` (`--mark-calls`).
    mark_calls: bool,
}

/// A row measured on its own, without the full table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Only {
    /// The full table.
    Everything,
    /// The signing row (`--signing`).
    Signing,
    /// The exactly-once row (`--once`).
    Once,
    /// The p50 at 1 in flight, interleaved with raw (`--alone`).
    Alone,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            name: "full",
            reps: 5,
            seq_calls: 5_000,
            flight_calls: 100_000,
            big_seq_calls: 1_000,
            big_flight_calls: 10_000,
            rss_in_flight: 10_000,
            run_limit: Duration::from_secs(120),
            cluster: false,
            only: Only::Everything,
            mark_calls: false,
        }
    }

    fn quick() -> Plan {
        Plan {
            name: "quick",
            reps: 1,
            seq_calls: 500,
            flight_calls: 5_000,
            big_seq_calls: 100,
            big_flight_calls: 500,
            rss_in_flight: 2_000,
            run_limit: Duration::from_secs(30),
            cluster: false,
            only: Only::Everything,
            mark_calls: false,
        }
    }
}

/// What this process is.
enum Role {
    /// The benchmark itself.
    Bench(Plan),
    /// One scenario, once, for a profiler.
    Profile {
        clouds: bool,
        /// With signed frames (`--signed`, clouds only).
        signed: bool,
        calls: usize,
        in_flight: usize,
        payload: usize,
        /// A Redis to use instead of starting one (to watch it with `redis-cli monitor`).
        redis: Option<String>,
    },
    /// A clouds provider process.
    Provider { url: String, namespace: String },
    /// A raw server process.
    RawServer {
        url: String,
        request: String,
        reply: String,
    },
    /// An RSS client process for clouds.
    RssClouds {
        start: rss::Start,
        url: String,
        namespace: String,
        round: u32,
        in_flight: usize,
        providers: Vec<String>,
    },
    /// An RSS client process for the raw baseline.
    RssRaw {
        start: rss::Start,
        url: String,
        prefix: String,
        servers: usize,
        round: u32,
        in_flight: usize,
    },
}

const USAGE: &str = "\
usage: clouds-bench [--quick] [--reps N] [--cluster] [--signing] [--once] [--alone]
                    [--mark-calls]
       clouds-bench --profile raw|clouds [--calls N] [--in-flight N] [--payload BYTES]
                    [--redis URL] [--signed]

  (no flags)   the full table: ~100 B and 64 KiB payloads, sequential, 64 and 1,000 in
               flight, 1 provider in-process and 3 provider processes, RSS per call in flight
  --quick      every row with small counts and one run each (a smoke test)
  --reps N     runs per figure (median reported; default 5, --quick 1)
  --cluster    then start a Redis Cluster (3 primaries + 3 replicas) and measure 100 B at
               64 and 1,000 in flight on it with 3 provider processes (raw: SPUBLISH); a
               clouds that cannot run on it is reported as skipped, with the reason
  --once       only the exactly-once row: 100 B by name, unmarked and marked once, at 1
               and 64 in flight
  --alone      only the p50 at 1 in flight, 100 B, raw and clouds interleaved call by
               call (the full table's latency target)
  --mark-calls one getppid system call right before and after each of those interleaved
               calls (with --alone, or in the full table's latency row; no other row), for
               scripts/segments.py: where the time of a call alone goes, by perf record
  --signing    only the signing row: signed frames off and on, 100 B at 64 in flight
               (the full table ends with it too)
  --profile    one in-process scenario once, for callgrind: starts Redis, warms up 200
               calls, then makes --calls calls (default 2000) --in-flight at a time (default 1)
               with --payload bytes (default 100), against --redis URL if given (watch it
               with `redis-cli -p PORT monitor`); --signed: clouds with signed frames

Tables of their own: clouds-bench claims|streams|cold|batching [--quick] [--reps N], and
clouds-bench registry --help (cold: one call through the in-memory broker, with its
caches hot and cold; no Redis; batching: the p50 at 1 in flight with batching off and
on, interleaved call by call)

Internal roles (the bench starts them itself): --provider URL NS, --raw-server URL REQ REPLY,
--rss clouds burst|ramped URL NS ROUND IN_FLIGHT ID...,
--rss raw burst|ramped URL PREFIX SERVERS ROUND IN_FLIGHT";

fn parse_args(args: &[String]) -> Result<Role, String> {
    let num = |s: Option<&String>, what: &str| -> Result<usize, String> {
        s.ok_or_else(|| format!("{what} needs a value"))?
            .parse()
            .map_err(|e| format!("{what}: {e}"))
    };
    let text = |i: usize| -> Result<String, String> {
        args.get(i)
            .cloned()
            .ok_or_else(|| format!("missing argument {i}\n{USAGE}"))
    };
    match args.first().map(String::as_str) {
        Some("--provider") => Ok(Role::Provider {
            url: text(1)?,
            namespace: text(2)?,
        }),
        Some("--raw-server") => Ok(Role::RawServer {
            url: text(1)?,
            request: text(2)?,
            reply: text(3)?,
        }),
        Some("--rss") if args.get(1).is_some_and(|a| a == "clouds") => Ok(Role::RssClouds {
            start: rss::Start::from_arg(&text(2)?)?,
            url: text(3)?,
            namespace: text(4)?,
            round: num(args.get(5), "round")? as u32,
            in_flight: num(args.get(6), "in flight")?,
            providers: args.get(7..).unwrap_or_default().to_vec(),
        }),
        Some("--rss") => Ok(Role::RssRaw {
            start: rss::Start::from_arg(&text(2)?)?,
            url: text(3)?,
            prefix: text(4)?,
            servers: num(args.get(5), "servers")?,
            round: num(args.get(6), "round")? as u32,
            in_flight: num(args.get(7), "in flight")?,
        }),
        Some("--profile") => {
            let clouds = match args.get(1).map(String::as_str) {
                Some("clouds") => true,
                Some("raw") => false,
                _ => return Err(format!("--profile raw|clouds\n{USAGE}")),
            };
            let (mut calls, mut in_flight, mut payload) = (2_000, 1, 100);
            let mut redis = None;
            let mut signed = false;
            let mut i = 2;
            while i < args.len() {
                let value = args.get(i + 1);
                match args[i].as_str() {
                    "--signed" => {
                        signed = true;
                        i += 1;
                        continue;
                    }
                    "--calls" => calls = num(value, "--calls")?,
                    "--in-flight" => in_flight = num(value, "--in-flight")?,
                    "--payload" => payload = num(value, "--payload")?,
                    "--redis" => redis = Some(text(i + 1)?),
                    other => return Err(format!("unknown flag {other}\n{USAGE}")),
                }
                i += 2;
            }
            Ok(Role::Profile {
                clouds,
                signed,
                calls,
                in_flight,
                payload,
                redis,
            })
        }
        _ => {
            let mut plan = Plan::full();
            let mut reps = None;
            let mut cluster = false;
            let mut only = Only::Everything;
            let mut mark_calls = false;
            let mut i = 0;
            while i < args.len() {
                match args[i].as_str() {
                    "--quick" => plan = Plan::quick(),
                    "--cluster" => cluster = true,
                    "--signing" => only = Only::Signing,
                    "--once" => only = Only::Once,
                    "--alone" => only = Only::Alone,
                    "--mark-calls" => mark_calls = true,
                    "--reps" => {
                        reps = Some(num(args.get(i + 1), "--reps")?.max(1));
                        i += 1;
                    }
                    "-h" | "--help" => return Err(USAGE.to_string()),
                    other => return Err(format!("unknown flag {other}\n{USAGE}")),
                }
                i += 1;
            }
            plan.reps = reps.unwrap_or(plan.reps);
            plan.cluster = cluster;
            plan.only = only;
            plan.mark_calls = mark_calls;
            Ok(Role::Bench(plan))
        }
    }
}

/// Runs a subcommand that takes `[--quick] [--reps N]` (`quick`: small counts, one run) and
/// prints the table `measure` makes, on a runtime of its own.
fn subcommand<F, Fut>(name: &str, args: &[String], default_reps: usize, measure: F) -> ExitCode
where
    F: FnOnce(bool, usize) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let mut quick = false;
    let mut reps = default_reps;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--quick" => {
                quick = true;
                reps = 1;
            }
            "--reps" => {
                reps = match args.get(i + 1).and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) => n.max(1),
                    None => {
                        eprintln!("--reps needs a number");
                        return ExitCode::from(2);
                    }
                };
                i += 1;
            }
            other => {
                eprintln!("usage: clouds-bench {name} [--quick] [--reps N] (not {other})");
                return ExitCode::from(2);
            }
        }
        i += 1;
    }
    print_table(name, measure(quick, reps))
}

/// Runs `measure` on a runtime of its own and prints the table it makes (or its error): the
/// end of every subcommand that prints one table.
fn print_table(
    name: &str,
    measure: impl std::future::Future<Output = Result<String, String>>,
) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(measure);
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("clouds-bench {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `registry`: the registry simulation (registry_sim.rs), a program of its own.
    if args.first().is_some_and(|a| a == "registry") {
        return registry_sim::main(&args[1..]);
    }
    // `claims`: large payloads inline and through claims (claims.rs).
    if args.first().is_some_and(|a| a == "claims") {
        return claims::main(&args[1..]);
    }
    // `batching`: the p50 alone with batching off against on (batching_row.rs).
    if args.first().is_some_and(|a| a == "batching") {
        return batching_row::main(&args[1..]);
    }
    if args.first().is_some_and(|a| a == "streams") {
        return streams::main(&args[1..]);
    }
    // `cold`: one call through the in-memory broker, hot and cold (cold.rs).
    if args.first().is_some_and(|a| a == "cold") {
        return cold::main(&args[1..]);
    }
    let role = match parse_args(&args) {
        Ok(role) => role,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match crate::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = match role {
        Role::Bench(plan) => bench(&runtime, &plan),
        Role::Profile {
            clouds,
            signed,
            calls,
            in_flight,
            payload,
            redis,
        } => profile(&runtime, (clouds, signed), calls, in_flight, payload, redis),
        Role::Provider { url, namespace } => {
            runtime.block_on(clouds_rows::serve_until_parent_gone(&url, &namespace))
        }
        Role::RawServer {
            url,
            request,
            reply,
        } => runtime.block_on(raw::serve_until_parent_gone(&url, &request, &reply)),
        Role::RssClouds {
            start,
            url,
            namespace,
            round,
            in_flight,
            providers,
        } => runtime
            .block_on(rss::clouds_child(
                &url, &namespace, round, in_flight, start, &providers,
            ))
            .map(|sample| rss::report(&sample)),
        Role::RssRaw {
            start,
            url,
            prefix,
            servers,
            round,
            in_flight,
        } => runtime
            .block_on(rss::raw_child(
                &url,
                &Channels::new(&prefix, servers),
                round,
                in_flight,
                start,
            ))
            .map(|sample| rss::report(&sample)),
    };
    // Connection tasks that are still closing must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clouds-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `nproc`, the CPU model and the load average, for the reader to judge the noise.
fn machine() -> String {
    let nproc = std::thread::available_parallelism().map_or(0, usize::from);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    format!("nproc {nproc}, CPU {model}, loadavg {}", loadavg())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn bench(runtime: &tokio::runtime::Runtime, plan: &Plan) -> Result<(), String> {
    let started = Instant::now();
    let at_start = machine();
    eprintln!("machine: {at_start}");
    let redis = RedisServer::start().map_err(|e| format!("cannot start redis-server: {e}"))?;
    let version = info(&redis, "server")
        .get("redis_version")
        .cloned()
        .unwrap_or_default();
    eprintln!("redis-server {version} on port {}", redis.port());
    let notes = match plan.only {
        Only::Everything => None,
        Only::Once => Some((
            "--once",
            runtime
                .block_on(once_row::measure(plan, &redis))
                .map(|c| once_row::notes(&c))?,
        )),
        Only::Signing => Some((
            "--signing",
            runtime
                .block_on(signing_row::measure(plan, &redis))
                .map(|c| signing_row::notes(&c))?,
        )),
        Only::Alone => Some((
            "--alone",
            runtime
                .block_on(alone_only(plan, &redis))
                .map(|a| report::alone_notes(&a))?,
        )),
    };
    // Every report's second line: the machine at the start, the allocator, batching on or off.
    let start = format!(
        "start: {at_start}; allocator: {ALLOCATOR_NAME}; clouds batching {}",
        if clouds_rows::batching() {
            "on"
        } else {
            "off (CLOUDS_BENCH_BATCHING=off)"
        }
    );
    if let Some((flag, notes)) = notes {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "clouds-bench {flag}, {} mode, {} runs per figure (median shown); redis-server {version} on loopback",
            plan.name, plan.reps
        );
        let _ = writeln!(out, "{start}");
        out.push_str(&notes);
        let _ = writeln!(
            out,
            "\nend: loadavg {}; took {:.0?}",
            loadavg(),
            started.elapsed()
        );
        print!("{out}");
        return Ok(());
    }
    let (mut rows, wire, memory, scaling, alone) = runtime.block_on(measure_all(plan, &redis))?;
    let signing = runtime.block_on(signing_row::measure(plan, &redis));
    let once = runtime.block_on(once_row::measure(plan, &redis));
    let mut cluster = plan.cluster.then(|| measure_cluster(runtime, plan));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "clouds-bench, {} mode, {} runs per figure (median shown); redis-server {version} on loopback",
        plan.name, plan.reps
    );
    let _ = writeln!(out, "{start}");
    if let Some(Ok(run)) = &mut cluster {
        rows.append(&mut run.rows);
    }
    out.push_str(&table(&rows, &memory));
    out.push_str(&wire_notes(&wire));
    match &cluster {
        Some(Ok(run)) => out.push_str(&cluster_notes(
            CLUSTER_SHAPE,
            &run.channels,
            &run.wire,
            run.clouds_skipped.as_deref(),
        )),
        Some(Err(e)) => {
            let _ = writeln!(out, "\nCluster rows (`--cluster`): not measured: {e}");
        }
        None => {}
    }
    match &signing {
        Ok(cost) => out.push_str(&signing_row::notes(cost)),
        Err(e) => {
            let _ = writeln!(out, "\nSigning row: not measured: {e}");
        }
    }
    match &once {
        Ok(cost) => out.push_str(&once_row::notes(cost)),
        Err(e) => {
            let _ = writeln!(out, "\nExactly-once row: not measured: {e}");
        }
    }
    out.push_str(&targets(&rows, &memory, scaling, &wire, &alone));
    let _ = writeln!(
        out,
        "\nend: loadavg {}; took {:.0?}",
        loadavg(),
        started.elapsed()
    );
    print!("{out}");
    match (cluster, memory) {
        (Some(Err(e)), _) => Err(format!("the cluster rows failed: {e}")),
        (_, Err(e)) => Err(format!("the memory rows failed: {e}")),
        _ => Ok(()),
    }
}

/// The cluster the `--cluster` rows run on, for the notes.
const CLUSTER_SHAPE: &str = "3 primaries + 3 replicas";

/// `--cluster`: starts a Redis Cluster, measures its rows, and stops it. Runs after every
/// standalone row, so those are measured exactly as without the flag.
fn measure_cluster(
    runtime: &tokio::runtime::Runtime,
    plan: &Plan,
) -> Result<cluster::ClusterRun, String> {
    let cluster =
        RedisCluster::start().map_err(|e| format!("cannot start a Redis Cluster: {e}"))?;
    eprintln!(
        "Redis Cluster ({CLUSTER_SHAPE}) on ports {:?}, started in {}",
        cluster.ports(),
        cluster.startup()
    );
    runtime.block_on(cluster::measure(plan, &cluster))
}

async fn measure_all(
    plan: &Plan,
    redis: &RedisServer,
) -> Result<(Vec<Row>, Wire, Result<Memory, String>, f64, Interleaved), String> {
    let url = redis.url();
    let mut rows = Vec::new();

    // One provider in this process.
    let pair = Pair::start(&url, "rawbench:inproc").await?;
    let (raw, clouds) = (pair.raw.clone(), CloudsCaller::new(&pair.clouds.client));
    let result = async {
        let wire = Wire {
            per_call: vec![
                ("raw", wire_cost(redis, &raw, 2_000).await?),
                ("clouds", wire_cost(redis, &clouds, 2_000).await?),
            ],
            at_64: vec![
                ("raw", wire_cost_at(redis, &raw, 20_000, 64).await?),
                ("clouds", wire_cost_at(redis, &clouds, 20_000, 64).await?),
            ],
            herd: first_calls(redis, &clouds, 1_000).await,
        };
        let alone = interleaved_p50(plan, &raw, &clouds).await;
        let small = [
            (100, plan.seq_calls, 1),
            (100, plan.flight_calls, 64),
            (100, plan.flight_calls, 1_000),
            (64 * 1024, plan.big_seq_calls, 1),
            (64 * 1024, plan.big_flight_calls, 64),
        ];
        for (size, calls, in_flight) in small {
            let row = Row {
                payload: size,
                calls,
                in_flight,
                setup: Setup::InProcess,
                raw: Figures::default(),
                clouds: Figures::default(),
                ratios: Ratios::default(),
                clouds_skipped: false,
            };
            rows.push(measure_row(plan, row, &raw, Some(&clouds)).await);
        }
        let scaling = flight_scaling(plan, &clouds).await;
        Ok::<_, String>((wire, scaling, alone))
    }
    .await;
    pair.stop().await;
    let (wire, scaling, alone) = result?;

    // Three provider processes, three raw server processes.
    let mut procs = Vec::new();
    let result = processes_rows(plan, &url, &mut procs, &mut rows).await;
    procs::stop_all(procs).await;
    let memory = result?;
    Ok((rows, wire, memory, scaling, alone))
}

/// 100 B at 1 in flight, raw and clouds interleaved call by call (`load::interleaved`),
/// `plan.reps` times: the medians of the p50s and of their ratios.
async fn interleaved_p50(plan: &Plan, raw: &impl Caller, clouds: &impl Caller) -> Interleaved {
    let payload = payload(100);
    let mark = load::Marks(plan.mark_calls);
    let _ = load::interleaved(raw, clouds, &payload, 200, mark).await;
    let (mut raws, mut cloudss, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut errors = 0;
    for rep in 0..plan.reps {
        let (r, c, e) = load::interleaved(raw, clouds, &payload, plan.seq_calls, mark).await;
        eprintln!(
            "interleaved run {}: raw p50 {} clouds p50 {} ({:.3})",
            rep + 1,
            fmt_d(r),
            fmt_d(c),
            stats::ratio(c, r)
        );
        raws.push(r);
        cloudss.push(c);
        ratios.push(stats::ratio(c, r));
        errors += e;
    }
    Interleaved {
        calls: plan.seq_calls,
        raw_p50: stats::median(&raws),
        clouds_p50: stats::median(&cloudss),
        ratio: stats::median(&ratios),
        errors,
    }
}

/// A raw server and client, and a clouds provider and client, all in this process: the
/// in-process rows' two sides.
struct Pair {
    raw_server: RawServer,
    raw: RawClient,
    clouds: InProcess,
}

impl Pair {
    /// Starts both sides; raw's channels under `prefix`.
    async fn start(url: &str, prefix: &str) -> Result<Pair, String> {
        let channels = Channels::new(prefix, 1);
        let raw_server = RawServer::start(url, &channels.requests[0], &channels.reply).await?;
        let raw = RawClient::connect(url, &channels, CALL_TIMEOUT).await?;
        let clouds = InProcess::start(url, NS_IN_PROCESS, CALL_TIMEOUT).await?;
        Ok(Pair {
            raw_server,
            raw,
            clouds,
        })
    }

    /// Stops both sides.
    async fn stop(self) {
        self.raw.close().await;
        self.raw_server.stop().await;
        self.clouds.stop().await;
    }
}

/// `--alone`: the in-process pair of `measure_all`, for the interleaved p50 only.
async fn alone_only(plan: &Plan, redis: &RedisServer) -> Result<Interleaved, String> {
    let pair = Pair::start(&redis.url(), "rawbench:alone").await?;
    let alone = interleaved_p50(plan, &pair.raw, &CloudsCaller::new(&pair.clouds.client)).await;
    pair.stop().await;
    Ok(alone)
}

/// clouds at 1,000 in flight ÷ clouds at 64 in flight (100 B, in-process), the median over
/// back-to-back pairs of runs: the rows measure the two at different times, and the machine's
/// speed drifts in between.
async fn flight_scaling(plan: &Plan, clouds: &impl Caller) -> f64 {
    let payload = payload(100);
    let mut ratios = Vec::new();
    for rep in 0..plan.reps {
        let order = if rep % 2 == 0 {
            [64, 1_000]
        } else {
            [1_000, 64]
        };
        let mut rate = [0.0; 2];
        for in_flight in order {
            let run = load::run(
                clouds,
                &payload,
                plan.flight_calls,
                in_flight,
                plan.run_limit,
            )
            .await;
            let f = run.figures();
            eprintln!(
                "scaling run {}: {in_flight} in flight {:.0} calls/s",
                rep + 1,
                f.calls_per_sec
            );
            rate[usize::from(in_flight == 1_000)] = f.calls_per_sec;
        }
        if rate[0] > 0.0 {
            ratios.push(rate[1] / rate[0]);
        }
    }
    stats::median(&ratios)
}

/// The rows with provider processes, and the memory rows: their own result, so that a memory
/// child that fails costs those rows only, and the rest of the table still prints.
async fn processes_rows(
    plan: &Plan,
    url: &str,
    procs: &mut Vec<Proc>,
    rows: &mut Vec<Row>,
) -> Result<Result<Memory, String>, String> {
    let raw_prefix = "rawbench:procs";
    let channels = Channels::new(raw_prefix, PROCESSES);
    let mut provider_ids = Vec::new();
    for i in 0..PROCESSES {
        let mut provider = Proc::spawn(&["--provider".into(), url.into(), NS_PROCESSES.into()])?;
        provider_ids.push(provider.expect("ready ").await?);
        procs.push(provider);
        let mut server = Proc::spawn(&[
            "--raw-server".into(),
            url.into(),
            channels.requests[i].clone(),
            channels.reply.clone(),
        ])?;
        server.expect("ready ").await?;
        procs.push(server);
    }
    eprintln!("{PROCESSES} provider processes and {PROCESSES} raw server processes ready");
    let raw = RawClient::connect(url, &channels, CALL_TIMEOUT).await?;
    let config = clouds_rows::config(url, NS_PROCESSES, CALL_TIMEOUT)?;
    let client = clouds::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let clouds = CloudsCaller::new(&client);
    for in_flight in [64, 1_000] {
        let row = Row {
            payload: 100,
            calls: plan.flight_calls,
            in_flight,
            setup: Setup::Processes,
            raw: Figures::default(),
            clouds: Figures::default(),
            ratios: Ratios::default(),
            clouds_skipped: false,
        };
        rows.push(measure_row(plan, row, &raw, Some(&clouds)).await);
    }
    raw.close().await;
    client.close().await;

    Ok(memory(plan, url, raw_prefix, &provider_ids).await)
}

/// Client RSS per call in flight, each figure from fresh child processes (raw and clouds
/// alternately), burst and ramped.
async fn memory(
    plan: &Plan,
    url: &str,
    raw_prefix: &str,
    provider_ids: &[String],
) -> Result<Memory, String> {
    let n = plan.rss_in_flight.to_string();
    let processes = PROCESSES.to_string();
    let mut round = 0u32;
    let mut medians = Vec::new();
    for start in [rss::Start::Burst, rss::Start::Ramped] {
        let mut samples: [Vec<rss::Sample>; 2] = [Vec::new(), Vec::new()];
        for rep in 0..plan.reps {
            round += 1;
            let round = round.to_string();
            let mode = start.as_arg();
            let raw_args = [
                "--rss", "raw", mode, url, raw_prefix, &processes, &round, &n,
            ];
            let mut clouds_args = ["--rss", "clouds", mode, url, NS_PROCESSES, &round, &n]
                .map(String::from)
                .to_vec();
            clouds_args.extend(provider_ids.iter().cloned());
            for (i, args) in [raw_args.map(String::from).to_vec(), clouds_args]
                .iter()
                .enumerate()
            {
                let sample = rss::in_child(args).await?;
                eprintln!(
                    "rss {mode} {} run {}: {:.0} B per call, {sample:?}",
                    ["raw", "clouds"][i],
                    rep + 1,
                    sample.bytes_per_call()
                );
                samples[i].push(sample);
            }
        }
        medians.push(samples.map(|s| median_sample(&s)));
    }
    Ok(Memory {
        in_flight: plan.rss_in_flight,
        burst: medians[0],
        ramped: medians[1],
    })
}

/// The run with the median bytes per call.
fn median_sample(samples: &[rss::Sample]) -> rss::Sample {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.bytes_per_call().total_cmp(&b.bytes_per_call()));
    sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

/// Warms both up, then runs raw and clouds alternately `plan.reps` times each; raw alone if
/// there is no clouds (`row.clouds` then stays empty).
async fn measure_row(
    plan: &Plan,
    mut row: Row,
    raw: &impl Caller,
    clouds: Option<&impl Caller>,
) -> Row {
    let payload = payload(row.payload);
    let warm = (row.calls / 10).clamp(100, 2_000);
    let _ = load::run(raw, &payload, warm, row.in_flight, plan.run_limit).await;
    if let Some(clouds) = clouds {
        let _ = load::run(clouds, &payload, warm, row.in_flight, plan.run_limit).await;
    }
    let (mut raws, mut cloudss, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..plan.reps {
        // Alternate which goes first, so a machine speeding up or slowing down over the row
        // does not favour either side.
        let order = if rep % 2 == 0 {
            ["raw", "clouds"]
        } else {
            ["clouds", "raw"]
        };
        for name in order {
            let run = match (name, clouds) {
                ("raw", _) => {
                    load::run(raw, &payload, row.calls, row.in_flight, plan.run_limit).await
                }
                (_, Some(clouds)) => {
                    load::run(clouds, &payload, row.calls, row.in_flight, plan.run_limit).await
                }
                (_, None) => continue,
            };
            if let Some(e) = &run.first_error {
                eprintln!("  {name}: {} errors, first: {e}", run.errors);
            }
            let f = run.figures();
            eprintln!(
                "{} B x{} in flight {} {:?} run {}: {name} {:.0} calls/s p50 {} p99 {}",
                row.payload,
                row.calls,
                row.in_flight,
                row.setup,
                rep + 1,
                f.calls_per_sec,
                fmt_d(f.p50),
                fmt_d(f.p99)
            );
            if name == "raw" {
                raws.push(f);
            } else {
                cloudss.push(f);
            }
        }
        if let (Some(r), Some(c)) = (raws.last(), cloudss.last()) {
            pairs.push(Ratios::of(c, r));
        }
    }
    row.ratios = Ratios::median(&pairs);
    row.raw = median_figures(&raws);
    row.clouds = median_figures(&cloudss);
    row
}

/// `--profile`: one scenario once, in-process, for callgrind.
fn profile(
    runtime: &tokio::runtime::Runtime,
    (clouds, signed): (bool, bool),
    calls: usize,
    in_flight: usize,
    size: usize,
    redis: Option<String>,
) -> Result<(), String> {
    let (url, _throwaway) = match redis {
        Some(url) => (url, None),
        None => {
            let redis =
                RedisServer::start().map_err(|e| format!("cannot start redis-server: {e}"))?;
            (redis.url(), Some(redis))
        }
    };
    runtime.block_on(async {
        let payload = payload(size);
        let limit = Duration::from_secs(600);
        let run = if clouds {
            let in_process = if signed {
                signing_row::deployment(&url, NS_IN_PROCESS, true).await?
            } else {
                InProcess::start(&url, NS_IN_PROCESS, CALL_TIMEOUT).await?
            };
            let caller = CloudsCaller::new(&in_process.client);
            let _ = load::run(&caller, &payload, 200, in_flight, limit).await;
            let run = load::run(&caller, &payload, calls, in_flight, limit).await;
            in_process.stop().await;
            run
        } else {
            let channels = Channels::new("rawbench:profile", 1);
            let server = RawServer::start(&url, &channels.requests[0], &channels.reply).await?;
            let raw = RawClient::connect(&url, &channels, CALL_TIMEOUT).await?;
            let _ = load::run(&raw, &payload, 200, in_flight, limit).await;
            let run = load::run(&raw, &payload, calls, in_flight, limit).await;
            raw.close().await;
            server.stop().await;
            run
        };
        let (errors, first) = (run.errors, run.first_error.clone());
        let f = run.figures();
        println!(
            "{} calls, {in_flight} in flight, {size} B: {:.0} calls/s, p50 {}, p99 {}, {errors} errors {}",
            calls,
            f.calls_per_sec,
            fmt_d(f.p50),
            fmt_d(f.p99),
            first.unwrap_or_default()
        );
        Ok(())
    })
}

/// The multi-threaded runtime every role runs on; a failure to build it is reported here.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}
