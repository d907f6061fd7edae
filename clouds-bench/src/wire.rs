//! What Redis did for the calls, from `INFO commandstats` and `INFO stats`: commands and
//! bytes per call, and the cost of a burst of first calls.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clouds_testkit::RedisServer;

use crate::clouds_rows::{self, CloudsCaller};
use crate::load::{self, Caller, payload};

/// What Redis did per call, from INFO before and after a run of sequential calls.
#[derive(Debug, Clone)]
pub(crate) struct WireCost {
    pub(crate) calls: usize,
    pub(crate) elapsed: Duration,
    pub(crate) commands: Vec<(String, u64)>,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

/// What Redis did for calls.
#[derive(Debug, Clone)]
pub(crate) struct Wire {
    /// Steady sequential calls, raw and clouds.
    pub(crate) per_call: Vec<(&'static str, WireCost)>,
    /// Concurrent first calls of a method nobody called before: (calls, errors, commands).
    pub(crate) herd: (usize, usize, Vec<(String, u64)>),
}

/// Makes `calls` calls at once of a method this client has not called yet (`bench.hold`,
/// released at once) and counts the Redis commands they cost.
pub(crate) async fn first_calls(
    redis: &RedisServer,
    clouds: &CloudsCaller,
    calls: usize,
) -> (usize, usize, Vec<(String, u64)>) {
    let (before, _, _) = counters(redis);
    let mut set = tokio::task::JoinSet::new();
    // All calls start together, as a burst of requests arriving at a fresh node would.
    let gate = Arc::new(tokio::sync::Barrier::new(calls));
    for _ in 0..calls {
        let (stub, gate) = (clouds.stub.clone(), gate.clone());
        set.spawn(async move {
            gate.wait().await;
            stub.hold(0, clouds_rows::Payload(vec![0; 100])).await
        });
    }
    let mut errors = 0;
    while let Some(done) = set.join_next().await {
        if !matches!(done, Ok(Ok(_))) {
            errors += 1;
        }
    }
    let (after, _, _) = counters(redis);
    (calls, errors, command_deltas(&before, after))
}

/// Commands whose call counts grew from `before` to `after`, but INFO.
pub(crate) fn command_deltas(
    before: &HashMap<String, u64>,
    after: HashMap<String, u64>,
) -> Vec<(String, u64)> {
    let mut commands: Vec<(String, u64)> = after
        .into_iter()
        .filter(|(name, _)| name != "info")
        .map(|(name, n)| {
            let delta = n - before.get(&name).copied().unwrap_or(0).min(n);
            (name, delta)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    commands.sort();
    commands
}

/// INFO of one section as key/value pairs.
pub(crate) fn info(redis: &RedisServer, section: &str) -> HashMap<String, String> {
    let text = redis
        .command(&["INFO", section])
        .ok()
        .and_then(|v| v.as_text())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Commands by name with their call counts, and the network byte counters.
pub(crate) fn counters(redis: &RedisServer) -> (HashMap<String, u64>, u64, u64) {
    let commands = info(redis, "commandstats")
        .into_iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("cmdstat_")?.to_string();
            let calls = v.strip_prefix("calls=")?.split(',').next()?.parse().ok()?;
            Some((name, calls))
        })
        .collect();
    let stats = info(redis, "stats");
    let get = |k: &str| stats.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    (
        commands,
        get("total_net_input_bytes"),
        get("total_net_output_bytes"),
    )
}

/// Runs `calls` sequential 100-byte calls and counts what Redis did meanwhile.
pub(crate) async fn wire_cost(
    redis: &RedisServer,
    caller: &impl Caller,
    calls: usize,
) -> Result<WireCost, String> {
    let payload = payload(100);
    let _ = load::run(caller, &payload, 100, 1, Duration::from_secs(30)).await;
    let (before, in0, out0) = counters(redis);
    let run = load::run(caller, &payload, calls, 1, Duration::from_secs(60)).await;
    let (after, in1, out1) = counters(redis);
    if run.errors > 0 {
        return Err(format!("wire cost run failed: {:?}", run.first_error));
    }
    Ok(WireCost {
        calls,
        elapsed: run.elapsed,
        commands: command_deltas(&before, after),
        bytes_in: in1.saturating_sub(in0),
        bytes_out: out1.saturating_sub(out0),
    })
}
