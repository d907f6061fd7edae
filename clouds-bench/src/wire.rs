//! What Redis did for the calls, from `INFO commandstats` and `INFO stats`: commands and
//! bytes per call, and the cost of a burst of first calls.
//!
//! On a Redis Cluster the counters are summed over the primaries (the nodes that execute the
//! commands), so a call's `SPUBLISH`es count wherever their channels' slots live.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clouds_testkit::{NodeRole, RedisCluster, RedisServer};

use crate::clouds_rows::{self, CloudsCaller};
use crate::load::{self, Caller, payload};

/// A Redis whose `INFO` the bench reads: one server, or a cluster's primaries.
pub(crate) trait InfoSource {
    /// The text of `INFO section` from every node that executes commands.
    fn info_texts(&self, section: &str) -> Vec<String>;
}

impl InfoSource for RedisServer {
    fn info_texts(&self, section: &str) -> Vec<String> {
        let text = self
            .command(&["INFO", section])
            .ok()
            .and_then(|v| v.as_text())
            .unwrap_or_default();
        vec![text]
    }
}

impl InfoSource for RedisCluster {
    /// Every running primary's, in the order the cluster lists them.
    fn info_texts(&self, section: &str) -> Vec<String> {
        let nodes = match self.nodes() {
            Ok(nodes) => nodes,
            Err(e) => {
                eprintln!("cannot list the cluster's nodes for INFO {section}: {e}");
                return Vec::new();
            }
        };
        nodes
            .iter()
            .filter(|n| n.role == NodeRole::Primary && n.pid.is_some())
            .map(|n| {
                self.command_on(n.port, &["INFO", section])
                    .ok()
                    .and_then(|v| v.as_text())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// What Redis did per call, from INFO before and after a run of sequential calls.
#[derive(Debug, Clone)]
pub(crate) struct WireCost {
    pub(crate) calls: usize,
    pub(crate) elapsed: Duration,
    pub(crate) commands: Vec<(String, u64)>,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

impl WireCost {
    /// PUBLISH and SPUBLISH commands per call.
    pub(crate) fn publishes_per_call(&self) -> f64 {
        let n: u64 = self
            .commands
            .iter()
            .filter(|(c, _)| c == "publish" || c == "spublish")
            .map(|(_, n)| n)
            .sum();
        n as f64 / self.calls.max(1) as f64
    }
}

/// What Redis did for calls.
#[derive(Debug, Clone)]
pub(crate) struct Wire {
    /// Steady sequential calls, raw and clouds.
    pub(crate) per_call: Vec<(&'static str, WireCost)>,
    /// The same at 64 in flight (where batching shows).
    pub(crate) at_64: Vec<(&'static str, WireCost)>,
    /// Concurrent first calls of a method nobody called before: (calls, errors, commands).
    pub(crate) herd: (usize, usize, Vec<(String, u64)>),
}

/// Makes `calls` calls at once of a method this client has not called yet (`bench.hold`,
/// released at once) and counts the Redis commands they cost.
pub(crate) async fn first_calls(
    redis: &impl InfoSource,
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

/// Commands whose call counts grew from `before` to `after`, but the bench's own reads (INFO,
/// and on a cluster the CLUSTER NODES that finds the primaries) and, on a cluster, the
/// replicas' REPLCONF ACK to their primary (once a second, whatever the calls do).
pub(crate) fn command_deltas(
    before: &HashMap<String, u64>,
    after: HashMap<String, u64>,
) -> Vec<(String, u64)> {
    let mut commands: Vec<(String, u64)> = after
        .into_iter()
        .filter(|(name, _)| !["info", "cluster|nodes", "replconf"].contains(&name.as_str()))
        .map(|(name, n)| {
            let delta = n - before.get(&name).copied().unwrap_or(0).min(n);
            (name, delta)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    commands.sort();
    commands
}

/// INFO of one section of one server as key/value pairs.
pub(crate) fn info(redis: &RedisServer, section: &str) -> HashMap<String, String> {
    redis
        .info_texts(section)
        .first()
        .map(|text| parse_info(text))
        .unwrap_or_default()
}

/// The `key:value` lines of an INFO reply.
fn parse_info(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Commands by name with their call counts, and the network byte counters, summed over the
/// nodes.
pub(crate) fn counters(redis: &impl InfoSource) -> (HashMap<String, u64>, u64, u64) {
    let mut commands = HashMap::new();
    for text in redis.info_texts("commandstats") {
        for (k, v) in parse_info(&text) {
            let Some(name) = k.strip_prefix("cmdstat_") else {
                continue;
            };
            let calls = v
                .strip_prefix("calls=")
                .and_then(|v| v.split(',').next()?.parse::<u64>().ok());
            if let Some(calls) = calls {
                *commands.entry(name.to_string()).or_default() += calls;
            }
        }
    }
    let (mut bytes_in, mut bytes_out) = (0, 0);
    for text in redis.info_texts("stats") {
        let stats = parse_info(&text);
        let get = |k: &str| {
            stats
                .get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        bytes_in += get("total_net_input_bytes");
        bytes_out += get("total_net_output_bytes");
    }
    (commands, bytes_in, bytes_out)
}

/// Runs `calls` sequential 100-byte calls and counts what Redis did meanwhile.
pub(crate) async fn wire_cost(
    redis: &impl InfoSource,
    caller: &impl Caller,
    calls: usize,
) -> Result<WireCost, String> {
    wire_cost_at(redis, caller, calls, 1).await
}

/// [`wire_cost`] with `in_flight` calls at a time.
pub(crate) async fn wire_cost_at(
    redis: &impl InfoSource,
    caller: &impl Caller,
    calls: usize,
    in_flight: usize,
) -> Result<WireCost, String> {
    let payload = payload(100);
    let _ = load::run(caller, &payload, 100, in_flight, Duration::from_secs(30)).await;
    let (before, in0, out0) = counters(redis);
    let run = load::run(caller, &payload, calls, in_flight, Duration::from_secs(60)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster of two primaries, as INFO texts.
    struct TwoPrimaries;

    impl InfoSource for TwoPrimaries {
        fn info_texts(&self, section: &str) -> Vec<String> {
            match section {
                "commandstats" => vec![
                    "# Commandstats\r\ncmdstat_spublish:calls=3,usec=9,usec_per_call=3.00,rejected_calls=0,failed_calls=0\r\ncmdstat_info:calls=7,usec=1\r\n".into(),
                    "# Commandstats\r\ncmdstat_spublish:calls=5,usec=9\r\ncmdstat_cluster|nodes:calls=2,usec=1\r\ncmdstat_replconf:calls=4,usec=1\r\n".into(),
                ],
                _ => vec![
                    "total_net_input_bytes:100\r\ntotal_net_output_bytes:10\r\n".into(),
                    "total_net_input_bytes:200\r\ntotal_net_output_bytes:20\r\n".into(),
                ],
            }
        }
    }

    #[test]
    fn counters_are_summed_over_the_nodes() {
        let (commands, bytes_in, bytes_out) = counters(&TwoPrimaries);
        assert_eq!(commands.get("spublish"), Some(&8));
        assert_eq!((bytes_in, bytes_out), (300, 30));
        let deltas = command_deltas(&HashMap::new(), commands);
        assert_eq!(
            deltas,
            [("spublish".to_string(), 8)],
            "the bench's own reads are left out"
        );
    }
}
