//! `clouds`: the operator's command for a clouds deployment.
//!
//! ```text
//! clouds ls                                  who serves what
//! clouds info <method|node>                  one method's providers, or one server
//! clouds stats [--watch]                     calls/s, errors/s, p50/p99, in flight, refusals
//! clouds call <method> '<json args>'         a call by name, JSON in and out
//! clouds call --stream <method> '<json>'     a stream by name: its items as JSON lines
//! clouds ping [method|node]                  round trip to each server
//! clouds watch                               joins, leaves, expiries, as they happen
//! clouds bench <method> '<json>' -n N -c C   calls/s and latency under load
//! clouds send <node> '<json>'                a message to a node
//! ```
//!
//! Every command takes `--url` (or `REDIS_URL`), `--namespace` (or `CLOUDS_NAMESPACE`) and
//! `--json`. Output is a table on a terminal (coloured unless `NO_COLOR` is set) and plain
//! tab-separated text when piped. Exit codes: see `EXIT_CODES` below (also in `--help`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use clouds_core::{
    Client, Config, Error, MethodStats, Monitor, NodeId, RegistryEvent, RegistryEvents,
    RegistrySnapshot, ServerInfo,
};
use serde_json::{Value as Json, json};

/// `print!` that ends the process quietly when stdout is gone (`clouds ls | head`) instead
/// of panicking.
macro_rules! out {
    ($($arg:tt)*) => { emit(&format!($($arg)*)) };
}

/// `println!`, likewise.
macro_rules! outln {
    () => { emit("\n") };
    ($($arg:tt)*) => { emit(&format!("{}\n", format_args!($($arg)*))) };
}

fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(text.as_bytes()).is_err() || stdout.flush().is_err() {
        // The reader went away (a closed pipe): nothing more to say to it.
        std::process::exit(0);
    }
}

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  an error of clouds or Redis (printed with its kind)
  2  bad usage or arguments that are not JSON
  3  the remote handler returned an application error (printed as JSON on stderr)
  4  a call or ping timed out
  5  not found: no provider, no such method or node, node unreachable";

/// Lists, inspects, calls and benchmarks the services of a clouds deployment.
#[derive(Parser, Debug)]
#[command(name = "clouds", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// The Redis URL (`redis://`, `rediss://`, `redis-cluster://`, `redis-sentinel://`); a
    /// password in it is never printed.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true,
        global = true
    )]
    url: String,
    /// The deployment's namespace.
    #[arg(
        long,
        env = "CLOUDS_NAMESPACE",
        default_value = "clouds",
        global = true
    )]
    namespace: String,
    /// Print JSON (one document, or one line per event or refresh).
    #[arg(long, global = true)]
    json: bool,
    /// How long a call or ping waits for its answer (per attempt): `500ms`, `2s`, `1m`.
    #[arg(long, default_value = "2s", value_parser = parse_duration, global = true)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Services, methods and the servers providing them, with host, pid, uptime, heartbeat
    /// age, calls in flight and draining.
    Ls,
    /// One method (its providers and figures) or one server (its details and methods).
    Info {
        /// A method name or a server's node id.
        target: String,
    },
    /// Per method and per server: calls/s, errors/s, p50/p99, in flight, refusals.
    Stats {
        /// Redraw at every interval until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// How often `--watch` redraws (the servers' heartbeat period is a good value).
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        interval: Duration,
    },
    /// Calls a method by name: JSON arguments in (an array, or one value for a single
    /// argument), the result out as JSON.
    Call {
        /// The method, `service.name`.
        method: String,
        /// The arguments as JSON: `[1, 2]`, `"x"`; none for a method without arguments.
        args: Option<String>,
        /// Attempts after the first on timeouts and lost providers.
        #[arg(long, default_value_t = 0)]
        retries: u32,
        /// The method is a streaming method: print its items as they come, one JSON value
        /// per line.
        #[arg(long)]
        stream: bool,
    },
    /// Round trip to each server (all, a method's providers, or one node).
    Ping {
        /// A method name or a node id; all servers if omitted.
        target: Option<String>,
    },
    /// Joins, leaves, expiries and draining servers as they happen, with timestamps.
    Watch {
        /// How often the registry is read.
        #[arg(long, default_value = "250ms", value_parser = parse_duration)]
        poll: Duration,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Calls a method `-n` times, `-c` at once: calls/s and latency percentiles.
    Bench {
        /// The method, `service.name`.
        method: String,
        /// The arguments as JSON, as for `call`.
        args: Option<String>,
        /// How many calls in all.
        #[arg(short = 'n', default_value_t = 1000)]
        calls: u64,
        /// How many in flight at once.
        #[arg(short = 'c', default_value_t = 16)]
        concurrency: u64,
    },
    /// Sends a message (JSON, sent as MessagePack) to a node.
    Send {
        /// The node id.
        node: String,
        /// The message as JSON.
        message: String,
    },
}

/// What made the command fail, and its exit code.
#[derive(Debug)]
enum Failure {
    Clouds(Error),
    Usage(String),
    NotFound(String),
    /// An application error from the handler, as JSON.
    Remote(Json),
    /// Something went wrong, already printed.
    Reported(u8),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Clouds(e)
    }
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Clouds(e) => error_code(e),
            Failure::Usage(_) => 2,
            Failure::Remote(_) => 3,
            Failure::NotFound(_) => 5,
            Failure::Reported(code) => *code,
        }
    }
}

fn error_code(e: &Error) -> u8 {
    match e {
        Error::Remote(_) => 3,
        Error::Timeout { .. } => 4,
        Error::NoProvider { .. } | Error::UnknownMethod { .. } | Error::Unreachable { .. } => 5,
        _ => 1,
    }
}

/// The variant's name: `Timeout`, `NoProvider`, `Redis`, ...
fn error_kind(e: &Error) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .next()
        .unwrap_or("Error")
        .to_string()
}

/// How to print: JSON or text, terminal or pipe, colour or not.
#[derive(Debug, Clone)]
struct Out {
    json: bool,
    tty: bool,
    color: bool,
    /// The URL's password, scrubbed from anything printed.
    secret: Option<String>,
}

impl Out {
    fn new(json: bool, url: &str) -> Out {
        let tty = std::io::stdout().is_terminal();
        Out {
            json,
            tty,
            color: tty && std::env::var_os("NO_COLOR").is_none(),
            secret: password_of(url),
        }
    }

    fn scrub(&self, text: &str) -> String {
        match &self.secret {
            Some(secret) if !secret.is_empty() => text.replace(secret.as_str(), "***"),
            _ => text.to_string(),
        }
    }

    fn bold(&self, text: &str) -> String {
        if self.color {
            format!("\x1b[1m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn json(&self, value: &Json) {
        let text = if self.tty {
            serde_json::to_string_pretty(value)
        } else {
            serde_json::to_string(value)
        }
        .unwrap_or_default();
        outln!("{}", self.scrub(&text));
    }

    /// A table: aligned columns under a bold header on a terminal, tab-separated when piped.
    fn table(&self, headers: &[&str], rows: &[Vec<String>]) {
        let mut out = String::new();
        if !self.tty {
            out.push_str(&headers.join("\t"));
            out.push('\n');
            for row in rows {
                out.push_str(&row.join("\t"));
                out.push('\n');
            }
        } else {
            let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
            for row in rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let line = |cells: Vec<String>| {
                let mut line = String::new();
                for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                    if i > 0 {
                        line.push_str("  ");
                    }
                    line.push_str(cell);
                    if i + 1 < cells.len() {
                        let pad = w.saturating_sub(cell.chars().count());
                        line.push_str(&" ".repeat(pad));
                    }
                }
                line.trim_end().to_string()
            };
            let header = line(headers.iter().map(|h| h.to_string()).collect());
            out.push_str(&self.bold(&header));
            out.push('\n');
            for row in rows {
                out.push_str(&line(row.clone()));
                out.push('\n');
            }
        }
        out!("{}", self.scrub(&out));
    }

    fn fail(&self, failure: &Failure) {
        let (kind, message, extra) = match failure {
            Failure::Clouds(e) => (error_kind(e), e.to_string(), None),
            Failure::Usage(m) => ("Usage".to_string(), m.clone(), None),
            Failure::NotFound(m) => ("NotFound".to_string(), m.clone(), None),
            Failure::Remote(value) => ("Remote".to_string(), String::new(), Some(value.clone())),
            Failure::Reported(_) => return,
        };
        let text = match extra {
            // An application error: JSON on stderr in both modes.
            Some(value) => serde_json::to_string(&value).unwrap_or_default(),
            None if self.json => serde_json::to_string(&json!({"error": kind, "message": message}))
                .unwrap_or_default(),
            None if std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none() => {
                format!("\x1b[31merror\x1b[0m ({kind}): {message}")
            }
            None => format!("error ({kind}): {message}"),
        };
        eprintln!("{}", self.scrub(&text));
    }
}

/// The password in a URL's user info, if any.
fn password_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let password = userinfo.split_once(':').map_or(userinfo, |(_, p)| p);
    (!password.is_empty()).then(|| password.to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 500ms, 2s, 1m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: the unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

/// `850µs`, `1.25ms`, `2.0s`, `3m12s`, `1h02m`.
fn fmt_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 10_000 {
        format!("{:.2}ms", us as f64 / 1000.0)
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else if d.as_secs() < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if d.as_secs() < 3600 {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{}h{:02}m", d.as_secs() / 3600, (d.as_secs() % 3600) / 60)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `2026-12-01T03:04:05.678Z`.
fn timestamp(t: SystemTime) -> String {
    let ms = millis_since_epoch(t);
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

fn uptime(info: &ServerInfo) -> Duration {
    SystemTime::now()
        .duration_since(info.started_at)
        .unwrap_or_default()
}

fn opt_duration(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_string(), fmt_duration)
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// JSON arguments: an array is the argument list, anything else the only argument.
fn parse_args(text: Option<&str>) -> Result<Json, Failure> {
    let Some(text) = text else {
        return Ok(Json::Array(Vec::new()));
    };
    let value: Json = serde_json::from_str(text)
        .map_err(|e| Failure::Usage(format!("the arguments are not JSON: {e}")))?;
    Ok(match value {
        Json::Array(_) => value,
        other => Json::Array(vec![other]),
    })
}

/// A MessagePack value as JSON: binary as an array of bytes, non-string map keys as their
/// JSON text, extension types as `{"ext": type, "data": [bytes]}`.
fn to_json(value: rmpv::Value) -> Json {
    use rmpv::Value as V;
    match value {
        V::Nil => Json::Null,
        V::Boolean(b) => Json::Bool(b),
        V::Integer(i) => i
            .as_u64()
            .map(Json::from)
            .or_else(|| i.as_i64().map(Json::from))
            .unwrap_or(Json::Null),
        V::F32(f) => serde_json::Number::from_f64(f64::from(f)).map_or(Json::Null, Json::Number),
        V::F64(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
        V::String(s) => match s.into_str() {
            Some(s) => Json::String(s),
            None => Json::Null,
        },
        V::Binary(bytes) => Json::Array(bytes.into_iter().map(Json::from).collect()),
        V::Array(items) => Json::Array(items.into_iter().map(to_json).collect()),
        V::Map(pairs) => Json::Object(
            pairs
                .into_iter()
                .map(|(k, v)| {
                    let key = match to_json(k) {
                        Json::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        V::Ext(kind, data) => json!({"ext": kind, "data": data}),
    }
}

struct Ctx {
    cli: Cli,
    out: Out,
}

impl Ctx {
    fn config(&self) -> Result<Config, Failure> {
        Ok(Config::from_url(&self.cli.url)?
            .namespace(&self.cli.namespace)
            .timeout(self.cli.timeout))
    }

    async fn monitor(&self) -> Result<Monitor, Failure> {
        Ok(Monitor::connect(self.config()?).await?)
    }

    async fn client(&self, retries: u32) -> Result<Client, Failure> {
        Ok(Client::connect(self.config()?.retries(retries))
            .await?
            .with_timeout(self.cli.timeout)
            .with_retries(retries))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Out::new(cli.json, &cli.url);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let ctx = Ctx { cli, out };
    match runtime.block_on(run(&ctx)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            ctx.out.fail(&failure);
            ExitCode::from(failure.code())
        }
    }
}

async fn run(ctx: &Ctx) -> Result<(), Failure> {
    match &ctx.cli.command {
        Command::Ls => ls(ctx).await,
        Command::Info { target } => info(ctx, target).await,
        Command::Stats { watch, interval } => stats(ctx, *watch, *interval).await,
        Command::Call {
            method,
            args,
            retries,
            stream,
        } => call(ctx, method, args.as_deref(), *retries, *stream).await,
        Command::Ping { target } => ping(ctx, target.as_deref()).await,
        Command::Watch { poll, count } => watch(ctx, *poll, *count).await,
        Command::Bench {
            method,
            args,
            calls,
            concurrency,
        } => bench(ctx, method, args.as_deref(), *calls, *concurrency).await,
        Command::Send { node, message } => send(ctx, node, message).await,
    }
}

async fn snapshot(ctx: &Ctx) -> Result<RegistrySnapshot, Failure> {
    let monitor = ctx.monitor().await?;
    let snapshot = monitor.snapshot().await;
    monitor.close().await;
    Ok(snapshot?)
}

fn server_json(info: &ServerInfo) -> Json {
    json!({
        "id": info.id.as_str(),
        "host": info.host,
        "pid": info.pid,
        "started_at_ms": millis_since_epoch(info.started_at),
        "uptime_ms": uptime(info).as_millis() as u64,
        "heartbeat_age_ms": info.heartbeat_age.map(|d| d.as_millis() as u64),
        "in_flight": info.in_flight,
        "draining": info.draining,
        "methods": info.methods,
    })
}

fn method_json(m: &MethodStats, window: Option<Duration>) -> Json {
    let window = window.unwrap_or_default();
    json!({
        "calls": m.calls,
        "errors": {
            "application": m.errors.application,
            "bad_arguments": m.errors.bad_arguments,
            "panics": m.errors.panics,
            "server": m.errors.server,
            "total": m.errors.total(),
        },
        "expired": m.expired,
        "abandoned": m.abandoned,
        "cancelled": m.cancelled,
        "overloaded": m.overloaded,
        "in_flight": m.in_flight,
        "window_ms": window.as_millis() as u64,
        "window_calls": m.window_calls,
        "window_errors": m.window_errors,
        "calls_per_second": m.calls_per_second(window),
        "errors_per_second": m.errors_per_second(window),
        "latency_us": m.latency.map(|l| json!({
            "p50": micros(l.p50), "p90": micros(l.p90), "p99": micros(l.p99), "max": micros(l.max),
        })),
    })
}

async fn ls(ctx: &Ctx) -> Result<(), Failure> {
    let snapshot = snapshot(ctx).await?;
    if ctx.out.json {
        let methods: BTreeMap<&String, Vec<&str>> = snapshot
            .methods
            .iter()
            .map(|(m, ids)| (m, ids.iter().map(NodeId::as_str).collect()))
            .collect();
        let servers: Vec<Json> = snapshot.servers.values().map(server_json).collect();
        ctx.out
            .json(&json!({"methods": methods, "servers": servers}));
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    for info in snapshot.servers.values() {
        let row = |method: &str| {
            let service = method.split_once('.').map_or(method, |(s, _)| s);
            vec![
                service.to_string(),
                method.to_string(),
                info.id.to_string(),
                info.host.clone(),
                info.pid.to_string(),
                fmt_duration(uptime(info)),
                opt_duration(info.heartbeat_age),
                info.in_flight.to_string(),
                yes_no(info.draining),
            ]
        };
        if info.methods.is_empty() {
            rows.push(row("-"));
        }
        for method in &info.methods {
            rows.push(row(method));
        }
    }
    rows.sort();
    ctx.out.table(
        &[
            "SERVICE",
            "METHOD",
            "SERVER",
            "HOST",
            "PID",
            "UPTIME",
            "BEAT",
            "IN_FLIGHT",
            "DRAINING",
        ],
        &rows,
    );
    Ok(())
}

fn stats_row(method: &str, server: &str, m: &MethodStats, window: Duration) -> Vec<String> {
    vec![
        method.to_string(),
        server.to_string(),
        format!("{:.1}", m.calls_per_second(window)),
        format!("{:.1}", m.errors_per_second(window)),
        opt_duration(m.latency.map(|l| l.p50)),
        opt_duration(m.latency.map(|l| l.p99)),
        m.in_flight.to_string(),
        m.overloaded.to_string(),
        m.calls.to_string(),
        m.errors.total().to_string(),
    ]
}

const STATS_HEADERS: [&str; 10] = [
    "METHOD",
    "SERVER",
    "CALLS/S",
    "ERRORS/S",
    "P50",
    "P99",
    "IN_FLIGHT",
    "REFUSED",
    "CALLS",
    "ERRORS",
];

async fn info(ctx: &Ctx, target: &str) -> Result<(), Failure> {
    let snapshot = snapshot(ctx).await?;
    if let Some(info) = snapshot.servers.get(&NodeId::from(target)) {
        let stats = info.stats.as_ref();
        if ctx.out.json {
            let mut doc = server_json(info);
            doc["stats"] = stats.map_or(Json::Null, |s| {
                json!({
                    "window_ms": s.window.as_millis() as u64,
                    "truncated": s.truncated,
                    "methods": s.methods.iter()
                        .map(|(m, st)| (m.clone(), method_json(st, Some(s.window))))
                        .collect::<serde_json::Map<_, _>>(),
                    "total": method_json(&s.total(), Some(s.window)),
                })
            });
            ctx.out.json(&doc);
            return Ok(());
        }
        let fields = [
            ("server", info.id.to_string()),
            ("host", info.host.clone()),
            ("pid", info.pid.to_string()),
            ("started", timestamp(info.started_at)),
            ("uptime", fmt_duration(uptime(info))),
            ("heartbeat age", opt_duration(info.heartbeat_age)),
            ("in flight", info.in_flight.to_string()),
            ("draining", yes_no(info.draining)),
            ("methods", info.methods.join(", ")),
        ];
        for (name, value) in fields {
            let label = format!("{name}:");
            outln!(
                "{}{}",
                ctx.out.bold(&format!("{label:<16}")),
                ctx.out.scrub(&value)
            );
        }
        if let Some(stats) = stats {
            outln!();
            let rows: Vec<Vec<String>> = stats
                .methods
                .iter()
                .map(|(m, st)| stats_row(m, info.id.as_str(), st, stats.window))
                .collect();
            ctx.out.table(&STATS_HEADERS, &rows);
        }
        return Ok(());
    }
    let providers: Vec<&ServerInfo> = snapshot
        .servers
        .values()
        .filter(|info| info.methods.iter().any(|m| m == target))
        .collect();
    if providers.is_empty() {
        return Err(Failure::NotFound(format!(
            "no server serves a method or has the node id {target:?}"
        )));
    }
    let of = |info: &ServerInfo| {
        info.stats
            .as_ref()
            .and_then(|s| s.methods.get(target).map(|m| (*m, s.window)))
    };
    let total = snapshot
        .method_totals()
        .get(target)
        .copied()
        .unwrap_or_default();
    let window = providers
        .iter()
        .filter_map(|i| i.stats.as_ref().map(|s| s.window))
        .max();
    if ctx.out.json {
        let servers: Vec<Json> = providers
            .iter()
            .map(|info| {
                let mut doc = server_json(info);
                doc["stats"] = of(info).map_or(Json::Null, |(m, w)| method_json(&m, Some(w)));
                doc
            })
            .collect();
        ctx.out.json(&json!({
            "method": target,
            "providers": servers,
            "total": method_json(&total, window),
        }));
        return Ok(());
    }
    outln!("{}{target}", ctx.out.bold(&format!("{:<10}", "method:")));
    outln!(
        "{}{} ({} draining)",
        ctx.out.bold(&format!("{:<10}", "servers:")),
        providers.len(),
        providers.iter().filter(|i| i.draining).count()
    );
    outln!();
    let mut rows: Vec<Vec<String>> = providers
        .iter()
        .map(|info| match of(info) {
            Some((m, w)) => stats_row(target, info.id.as_str(), &m, w),
            None => {
                let mut row = vec![target.to_string(), info.id.to_string()];
                row.extend(std::iter::repeat_n("-".to_string(), 8));
                row
            }
        })
        .collect();
    rows.push(stats_row(
        target,
        "(all)",
        &total,
        window.unwrap_or_default(),
    ));
    ctx.out.table(&STATS_HEADERS, &rows);
    Ok(())
}

fn stats_json(snapshot: &RegistrySnapshot) -> Json {
    let mut methods = serde_json::Map::new();
    let totals = snapshot.method_totals();
    for (method, total) in &totals {
        let mut servers = serde_json::Map::new();
        let mut window = None;
        for info in snapshot.servers.values() {
            if let Some(stats) = &info.stats
                && let Some(m) = stats.methods.get(method)
            {
                window = window.max(Some(stats.window));
                servers.insert(info.id.to_string(), method_json(m, Some(stats.window)));
            }
        }
        methods.insert(
            method.clone(),
            json!({"servers": servers, "total": method_json(total, window)}),
        );
    }
    json!({"at": timestamp(SystemTime::now()), "methods": methods})
}

fn stats_rows(snapshot: &RegistrySnapshot) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for (method, total) in snapshot.method_totals() {
        let mut n = 0;
        let mut window = Duration::ZERO;
        for info in snapshot.servers.values() {
            if let Some(stats) = &info.stats
                && let Some(m) = stats.methods.get(&method)
            {
                n += 1;
                window = window.max(stats.window);
                rows.push(stats_row(&method, info.id.as_str(), m, stats.window));
            }
        }
        if n > 1 {
            rows.push(stats_row(&method, "(all)", &total, window));
        }
    }
    rows
}

async fn stats(ctx: &Ctx, watch: bool, interval: Duration) -> Result<(), Failure> {
    let monitor = ctx.monitor().await?;
    let result = async {
        loop {
            let snapshot = monitor.snapshot().await?;
            if ctx.out.json {
                // One line per refresh.
                outln!("{}", ctx.out.scrub(&stats_json(&snapshot).to_string()));
            } else {
                if watch && ctx.out.tty {
                    out!("\x1b[2J\x1b[H");
                }
                if watch {
                    outln!("{}", timestamp(SystemTime::now()));
                }
                ctx.out.table(&STATS_HEADERS, &stats_rows(&snapshot));
            }
            let _ = std::io::stdout().flush();
            if !watch {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }
    .await;
    monitor.close().await;
    result
}

async fn call(
    ctx: &Ctx,
    method: &str,
    args: Option<&str>,
    retries: u32,
    stream: bool,
) -> Result<(), Failure> {
    let args = parse_args(args)?;
    let client = ctx.client(retries).await?;
    let result = if stream {
        stream_items(&client, method, args).await
    } else {
        client
            .call::<Json, rmpv::Value>(method, args)
            .await
            .map(|value| ctx.out.json(&to_json(value)))
    };
    client.close().await;
    match result {
        Ok(()) => Ok(()),
        Err(Error::Remote(remote)) => {
            let value = remote.decode::<rmpv::Value>().map_or(Json::Null, to_json);
            Err(Failure::Remote(json!({
                "error": "Remote",
                "method": remote.method(),
                "node": remote.node().as_str(),
                "message": remote.message(),
                "value": value,
            })))
        }
        Err(Error::Protocol(reason)) if !stream && reason.contains("streaming method") => Err(
            Failure::Usage(format!("{method} is a streaming method: add --stream")),
        ),
        Err(e) => Err(e.into()),
    }
}

/// Prints a stream's items as they come, one compact JSON value per line; an error ends it.
async fn stream_items(client: &Client, method: &str, args: Json) -> Result<(), Error> {
    let mut items = client
        .open_stream::<Json, rmpv::Value>(method, args)
        .await?;
    while let Some(item) = items.next().await {
        let text = serde_json::to_string(&to_json(item?)).unwrap_or_default();
        outln!("{text}");
    }
    Ok(())
}

async fn ping(ctx: &Ctx, target: Option<&str>) -> Result<(), Failure> {
    let snapshot = snapshot(ctx).await?;
    let targets: Vec<&ServerInfo> = match target {
        None => snapshot.servers.values().collect(),
        Some(target) => {
            if let Some(info) = snapshot.servers.get(&NodeId::from(target)) {
                vec![info]
            } else {
                let providers: Vec<&ServerInfo> = snapshot
                    .servers
                    .values()
                    .filter(|i| i.methods.iter().any(|m| m == target))
                    .collect();
                if providers.is_empty() {
                    return Err(Failure::NotFound(format!(
                        "no server serves a method or has the node id {target:?}"
                    )));
                }
                providers
            }
        }
    };
    let client = ctx.client(0).await?;
    let mut results = Vec::new();
    for info in targets {
        results.push((info, client.ping(&info.id).await));
    }
    client.close().await;
    let worst = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().map(error_code))
        .max();
    if ctx.out.json {
        let docs: Vec<Json> = results
            .iter()
            .map(|(info, r)| match r {
                Ok(rtt) => json!({"server": info.id.as_str(), "host": info.host, "rtt_us": micros(*rtt)}),
                Err(e) => json!({"server": info.id.as_str(), "host": info.host, "error": error_kind(e), "message": e.to_string()}),
            })
            .collect();
        ctx.out.json(&Json::Array(docs));
    } else {
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|(info, r)| {
                vec![
                    info.id.to_string(),
                    info.host.clone(),
                    match r {
                        Ok(rtt) => fmt_duration(*rtt),
                        Err(e) => format!("{} ({e})", error_kind(e)),
                    },
                ]
            })
            .collect();
        ctx.out.table(&["SERVER", "HOST", "RTT"], &rows);
    }
    match worst {
        Some(code) => Err(Failure::Reported(code)),
        None => Ok(()),
    }
}

/// What `watch` knows of a server.
#[derive(Debug, Clone)]
struct Known {
    host: Option<String>,
    pid: Option<u32>,
    methods: Vec<String>,
    draining: bool,
}

impl From<&ServerInfo> for Known {
    fn from(info: &ServerInfo) -> Known {
        Known {
            host: Some(info.host.clone()),
            pid: Some(info.pid),
            methods: info.methods.clone(),
            draining: info.draining,
        }
    }
}

/// A change `watch` reports.
fn event(ctx: &Ctx, kind: &str, id: &NodeId, known: &Known) {
    let at = timestamp(SystemTime::now());
    if ctx.out.json {
        outln!(
            "{}",
            json!({
                "at": at,
                "event": kind,
                "server": id.as_str(),
                "host": known.host,
                "pid": known.pid,
                "methods": known.methods,
            })
        );
    } else {
        let label = format!("{kind:<8}");
        let label = if ctx.out.color {
            let colour = match kind {
                "join" => "32",
                "leave" => "33",
                "expired" => "31",
                _ => "36",
            };
            format!("\x1b[{colour}m{label}\x1b[0m")
        } else {
            label
        };
        outln!(
            "{at}  {label} {id}  {} pid {}  [{}]",
            known.host.as_deref().unwrap_or("-"),
            known.pid.map_or_else(|| "-".to_string(), |p| p.to_string()),
            known.methods.join(" ")
        );
    }
    let _ = std::io::stdout().flush();
}

async fn watch(ctx: &Ctx, poll: Duration, count: Option<u64>) -> Result<(), Failure> {
    let monitor = ctx.monitor().await?;
    // Listening before the first read: nothing between the two is missed.
    let mut events = monitor.events();
    let result = watching(ctx, &monitor, &mut events, poll, count).await;
    monitor.close().await;
    result
}

/// Servers come from the registry (host, pid, methods) and from the joins and leaves
/// announced on the events channel, which are reported as they arrive; a server that vanishes
/// from the registry without having announced its leave has expired (it stopped beating: a
/// crash, a lost network).
async fn watching(
    ctx: &Ctx,
    monitor: &Monitor,
    events: &mut RegistryEvents,
    poll: Duration,
    count: Option<u64>,
) -> Result<(), Failure> {
    let mut seen: BTreeMap<NodeId, Known> = BTreeMap::new();
    // Joined by announcement, not yet read from the registry.
    let mut announced: BTreeMap<NodeId, Known> = BTreeMap::new();
    let mut left: BTreeSet<NodeId> = BTreeSet::new();
    let mut reported = 0u64;
    let mut report = |kind: &str, id: &NodeId, known: &Known| {
        event(ctx, kind, id, known);
        reported += 1;
        count.is_some_and(|c| reported >= c)
    };
    let mut first = true;
    loop {
        let snapshot = monitor.snapshot().await?;
        for (id, info) in &snapshot.servers {
            let known = Known::from(info);
            let done = match seen.get(id) {
                None if first => false,
                None => {
                    announced.remove(id);
                    report("join", id, &known)
                }
                Some(old) if info.draining && !old.draining => report("draining", id, &known),
                Some(_) => false,
            };
            if done {
                return Ok(());
            }
        }
        // Announced and gone before the registry was read: reported from the announcement.
        for (id, known) in std::mem::take(&mut announced) {
            if report("join", &id, &known) {
                return Ok(());
            }
            if left.remove(&id) {
                if report("leave", &id, &known) {
                    return Ok(());
                }
            } else {
                seen.insert(id, known);
            }
        }
        let gone: Vec<NodeId> = seen
            .keys()
            .filter(|id| !snapshot.servers.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            let Some(known) = seen.remove(&id) else {
                continue;
            };
            if !left.contains(&id) {
                // Its leave may be on its way still: the registry changes and announces in
                // one step, but this reads the registry and the channel apart.
                let heard = tokio::time::timeout(Duration::from_millis(250), async {
                    while let Some(event) = events.next().await {
                        if let RegistryEvent::Left { node } = event {
                            let this = node == id;
                            left.insert(node);
                            if this {
                                return true;
                            }
                        }
                    }
                    false
                })
                .await
                .unwrap_or(false);
                let kind = if heard { "leave" } else { "expired" };
                if report(kind, &id, &known) {
                    return Ok(());
                }
            }
            // Kept in `left`: a server that drained announces its leave a second time.
        }
        for (id, info) in &snapshot.servers {
            seen.insert(id.clone(), Known::from(info));
        }
        if first {
            // On stderr: what runs it can tell that changes from now on are reported.
            eprintln!("watching {} servers; Ctrl-C to stop", seen.len());
            first = false;
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            event = events.next() => match event {
                Some(RegistryEvent::Joined { node, methods }) => {
                    // New: the registry is read at once, for its host and pid.
                    if !seen.contains_key(&node) {
                        left.remove(&node);
                        let known = Known { host: None, pid: None, methods, draining: false };
                        announced.insert(node, known);
                    }
                }
                Some(RegistryEvent::Left { node }) => {
                    if announced.contains_key(&node) {
                        // Reported with its join, at the next read.
                        left.insert(node);
                    } else if left.insert(node.clone()) {
                        // One never read from the registry (it came and went between two
                        // reads, serving nothing) is reported with what is known: its id.
                        let known = seen.get(&node).cloned().unwrap_or(Known {
                            host: None,
                            pid: None,
                            methods: Vec::new(),
                            draining: false,
                        });
                        if report("leave", &node, &known) {
                            return Ok(());
                        }
                    }
                }
                Some(_) => {}
                None => return Ok(()),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn bench(
    ctx: &Ctx,
    method: &str,
    args: Option<&str>,
    calls: u64,
    concurrency: u64,
) -> Result<(), Failure> {
    let args = parse_args(args)?;
    if calls == 0 || concurrency == 0 {
        return Err(Failure::Usage("-n and -c must be at least 1".into()));
    }
    let client = ctx.client(0).await?;
    // One call first: a method nobody serves fails here, not n times.
    client.call::<&Json, rmpv::Value>(method, &args).await?;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let progress = (!ctx.out.json && std::io::stderr().is_terminal()).then(|| {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                let n = done.load(Ordering::Relaxed);
                let width = 30;
                let filled = (n * width / calls) as usize;
                eprint!(
                    "\r[{}{}] {n}/{calls}",
                    "#".repeat(filled),
                    " ".repeat(width as usize - filled)
                );
                if n >= calls {
                    eprintln!();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.min(calls))
        .map(|_| {
            let client = client.clone();
            let args = args.clone();
            let method = method.to_string();
            let next = next.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < calls {
                    let t = Instant::now();
                    match client.call::<&Json, rmpv::Value>(&method, &args).await {
                        Ok(_) => latencies.push(t.elapsed()),
                        Err(e) => errors.push(e),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    for worker in workers {
        if let Ok((l, e)) = worker.await {
            latencies.extend(l);
            errors.extend(e);
        }
    }
    let elapsed = started.elapsed();
    if let Some(progress) = progress {
        let _ = progress.await;
    }
    client.close().await;
    latencies.sort();
    let pct = |p: f64| -> Option<Duration> {
        if latencies.is_empty() {
            return None;
        }
        let rank = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len());
        Some(latencies[rank - 1])
    };
    let rate = latencies.len() as f64 / elapsed.as_secs_f64();
    if ctx.out.json {
        ctx.out.json(&json!({
            "method": method,
            "calls": calls,
            "concurrency": concurrency,
            "ok": latencies.len(),
            "errors": errors.len(),
            "elapsed_ms": elapsed.as_millis() as u64,
            "calls_per_second": rate,
            "latency_us": {
                "p50": pct(0.5).map(micros),
                "p90": pct(0.9).map(micros),
                "p99": pct(0.99).map(micros),
                "max": latencies.last().copied().map(micros),
            },
        }));
    } else {
        ctx.out.table(
            &[
                "METHOD",
                "CALLS",
                "CONCURRENCY",
                "ERRORS",
                "ELAPSED",
                "CALLS/S",
                "P50",
                "P90",
                "P99",
                "MAX",
            ],
            &[vec![
                method.to_string(),
                calls.to_string(),
                concurrency.to_string(),
                errors.len().to_string(),
                fmt_duration(elapsed),
                format!("{rate:.0}"),
                opt_duration(pct(0.5)),
                opt_duration(pct(0.9)),
                opt_duration(pct(0.99)),
                opt_duration(latencies.last().copied()),
            ]],
        );
    }
    match errors.into_iter().next() {
        Some(first) => Err(first.into()),
        None => Ok(()),
    }
}

async fn send(ctx: &Ctx, node: &str, message: &str) -> Result<(), Failure> {
    let message: Json = serde_json::from_str(message)
        .map_err(|e| Failure::Usage(format!("the message is not JSON: {e}")))?;
    let client = ctx.client(0).await?;
    let sent = client.send(node, &message).await;
    client.close().await;
    sent?;
    if ctx.out.json {
        ctx.out.json(&json!({"sent": true, "to": node}));
    } else {
        outln!("sent to {node}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3h").is_err());
        assert_eq!(fmt_duration(Duration::from_micros(850)), "850µs");
        assert_eq!(fmt_duration(Duration::from_micros(1250)), "1.25ms");
        assert_eq!(fmt_duration(Duration::from_secs(192)), "3m12s");
    }

    #[test]
    fn passwords_are_found_in_urls() {
        assert_eq!(
            password_of("redis://:s3cret@host:6379/1").as_deref(),
            Some("s3cret")
        );
        assert_eq!(password_of("rediss://user:pw@host").as_deref(), Some("pw"));
        assert_eq!(password_of("redis://host:6379"), None);
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        let t = UNIX_EPOCH + Duration::from_millis(1_764_558_245_678);
        assert_eq!(timestamp(t), "2025-12-01T03:04:05.678Z");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn messagepack_values_become_json() {
        let value = rmpv::Value::Map(vec![
            (rmpv::Value::from("a"), rmpv::Value::from(1)),
            (rmpv::Value::from(2), rmpv::Value::Binary(vec![1, 2])),
            (rmpv::Value::from("f"), rmpv::Value::F64(f64::NAN)),
        ]);
        assert_eq!(to_json(value), json!({"a": 1, "2": [1, 2], "f": null}));
        assert_eq!(parse_args(Some("3")).ok(), Some(json!([3])));
        assert_eq!(parse_args(Some("[1, 2]")).ok(), Some(json!([1, 2])));
        assert_eq!(parse_args(None).ok(), Some(json!([])));
        assert!(matches!(parse_args(Some("{")), Err(Failure::Usage(_))));
    }
}
