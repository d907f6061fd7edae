//! The rows on a Redis Cluster (`--cluster`): the same echo at 64 and 1,000 in flight with 3
//! raw server processes and 3 provider processes, against a cluster of 3 primaries and 3
//! replicas the bench starts (and stops on drop).
//!
//! raw uses sharded pub/sub (`raw.rs`, chosen by the `redis-cluster://` seed URL). clouds gets
//! the same seed URL. Should clouds not run there (a transport without `redis-cluster://`
//! fails to parse it; a provider may fail to start), the rows report clouds as skipped, with
//! the error, and raw is measured all the same.

use clouds_testkit::{NodeRole, RedisCluster};

use crate::clouds_rows::{self, CloudsCaller};
use crate::procs::{self, Proc};
use crate::raw::{Channels, RawClient};
use crate::report::{Ratios, Row, Setup};
use crate::stats::Figures;
use crate::wire::{WireCost, wire_cost};
use crate::{CALL_TIMEOUT, NS_PROCESSES, PROCESSES, Plan, measure_row};

/// The prefix of raw's channels on the cluster (no hash tag: each name is its own slot).
const RAW_PREFIX: &str = "rawbench:cluster";
/// Most names tried for one request channel before giving up on a primary of its own.
const NAME_TRIES: usize = 10_000;

/// What the cluster rows measured.
pub(crate) struct ClusterRun {
    /// The rows, [`Setup::Cluster`].
    pub(crate) rows: Vec<Row>,
    /// Commands and bytes per call, summed over the primaries: raw, and clouds if it ran.
    pub(crate) wire: Vec<(&'static str, WireCost)>,
    /// raw's channels with their slots and the port of the primary that owns each.
    pub(crate) channels: Vec<String>,
    /// Why clouds did not run on the cluster, if it did not.
    pub(crate) clouds_skipped: Option<String>,
}

/// Starts the raw servers and the providers on `cluster`, measures, and stops them.
pub(crate) async fn measure(plan: &Plan, cluster: &RedisCluster) -> Result<ClusterRun, String> {
    let mut procs = Vec::new();
    let result = measure_with(plan, cluster, &mut procs).await;
    procs::stop_all(procs).await;
    result
}

async fn measure_with(
    plan: &Plan,
    cluster: &RedisCluster,
    procs: &mut Vec<Proc>,
) -> Result<ClusterRun, String> {
    let url = cluster.seed_url();
    let (channels, placed) = spread_channels(cluster)?;
    eprintln!("cluster channels: {}", placed.join(", "));
    for request in &channels.requests {
        let mut server = Proc::spawn(&[
            "--raw-server".into(),
            url.clone(),
            request.clone(),
            channels.reply.clone(),
        ])?;
        server.expect("ready ").await?;
        procs.push(server);
    }
    eprintln!("{PROCESSES} raw server processes ready on the cluster");
    let raw = RawClient::connect(&url, &channels, CALL_TIMEOUT).await?;
    let (client, clouds_skipped) = match start_clouds(&url, procs).await {
        Ok(client) => {
            eprintln!("{PROCESSES} provider processes ready on the cluster");
            (Some(client), None)
        }
        Err(e) => {
            eprintln!("clouds on the cluster: skipped: {e}");
            (None, Some(e))
        }
    };
    let clouds = client.as_ref().map(CloudsCaller::new);
    let result = async {
        let mut wire = vec![("raw", wire_cost(cluster, &raw, 2_000).await?)];
        if let Some(clouds) = &clouds {
            wire.push(("clouds", wire_cost(cluster, clouds, 2_000).await?));
        }
        let mut rows = Vec::new();
        for in_flight in [64, 1_000] {
            let row = Row {
                payload: 100,
                calls: plan.flight_calls,
                in_flight,
                setup: Setup::Cluster,
                raw: Figures::default(),
                clouds: Figures::default(),
                ratios: Ratios::default(),
                clouds_skipped: clouds.is_none(),
            };
            rows.push(measure_row(plan, row, &raw, clouds.as_ref()).await);
        }
        Ok::<_, String>((wire, rows))
    }
    .await;
    raw.close().await;
    if let Some(client) = client {
        client.close().await;
    }
    let (wire, rows) = result?;
    Ok(ClusterRun {
        rows,
        wire,
        channels: placed,
        clouds_skipped,
    })
}

/// Starts the provider processes on the cluster and connects a client, or says why it cannot.
/// The providers it starts go into `procs`, to be stopped with the rest.
async fn start_clouds(url: &str, procs: &mut Vec<Proc>) -> Result<clouds::Client, String> {
    // Checked here first, so that a URL clouds does not accept yet costs no child process.
    let config = clouds_rows::config(url, NS_PROCESSES, CALL_TIMEOUT)?;
    for _ in 0..PROCESSES {
        let mut provider = Proc::spawn(&["--provider".into(), url.into(), NS_PROCESSES.into()])?;
        let ready = provider.expect("ready ").await;
        procs.push(provider);
        ready.map_err(|e| format!("a provider process did not start: {e}"))?;
    }
    clouds::Client::connect(config)
        .await
        .map_err(|e| e.to_string())
}

/// raw's channels on the cluster, and `channel (slot S, primary :PORT)` for each (see
/// [`spread`]).
fn spread_channels(cluster: &RedisCluster) -> Result<(Channels, Vec<String>), String> {
    let nodes = cluster
        .nodes()
        .map_err(|e| format!("cannot list the cluster's nodes: {e}"))?;
    let primaries = nodes.iter().filter(|n| n.role == NodeRole::Primary).count();
    let owner = |slot: u16| nodes.iter().find(|n| n.owns(slot)).map(|n| n.port);
    spread(RAW_PREFIX, PROCESSES, primaries, owner)
}

/// `servers` request channels and a reply channel under `prefix`, with `owner` the port of
/// the primary that owns a slot: every request channel on a primary of its own while there
/// are primaries to spare, the reply channel wherever its name falls, no two on one slot,
/// no hash tags. Also `channel (slot S, primary :PORT)` for each.
///
/// raw is the floor, so its servers' channels get the best spread; clouds' inboxes are named
/// after random node ids and fall where they fall.
fn spread(
    prefix: &str,
    servers: usize,
    primaries: usize,
    owner: impl Fn(u16) -> Option<u16>,
) -> Result<(Channels, Vec<String>), String> {
    let owner = |slot: u16| owner(slot).ok_or_else(|| format!("no primary owns slot {slot}"));
    let mut taken: Vec<(u16, u16)> = Vec::new(); // (slot, primary)
    let mut placed = Vec::new();
    let mut requests = Vec::new();
    for i in 0..servers {
        let spare = taken.len() < primaries;
        let mut chosen = None;
        for k in 0..NAME_TRIES {
            let name = match k {
                0 => format!("{prefix}:req:{i}"),
                k => format!("{prefix}:req:{i}.{k}"),
            };
            let slot = RedisCluster::slot_of(&name);
            let primary = owner(slot)?;
            let free_slot = taken.iter().all(|(s, _)| *s != slot);
            let own_primary = !spare || taken.iter().all(|(_, p)| *p != primary);
            if free_slot && own_primary {
                chosen = Some((name, slot, primary));
                break;
            }
        }
        let (name, slot, primary) = chosen
            .ok_or_else(|| format!("no name for request channel {i} found a free primary"))?;
        taken.push((slot, primary));
        placed.push(format!("{name} (slot {slot}, primary :{primary})"));
        requests.push(name);
    }
    let reply = format!("{prefix}:reply");
    let slot = RedisCluster::slot_of(&reply);
    if taken.iter().any(|(s, _)| *s == slot) {
        return Err(format!(
            "raw's reply channel shares slot {slot} with a request channel"
        ));
    }
    placed.push(format!("{reply} (slot {slot}, primary :{})", owner(slot)?));
    Ok((Channels { requests, reply }, placed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slots of 3 primaries as `redis-cli --cluster create` assigns them.
    fn three(slot: u16) -> Option<u16> {
        Some(match slot {
            0..=5460 => 7000,
            5461..=10922 => 7001,
            _ => 7002,
        })
    }

    fn primary_of(name: &str) -> u16 {
        three(RedisCluster::slot_of(name)).unwrap_or_default()
    }

    #[test]
    fn each_request_channel_gets_a_primary_of_its_own() {
        let (channels, placed) = spread(RAW_PREFIX, 3, 3, three).expect("spread");
        let mut primaries: Vec<u16> = channels.requests.iter().map(|c| primary_of(c)).collect();
        primaries.sort_unstable();
        assert_eq!(primaries, [7000, 7001, 7002]);
        assert_eq!(channels.requests[0], "rawbench:cluster:req:0");
        assert_eq!(channels.reply, "rawbench:cluster:reply");
        assert_eq!(placed.len(), 4);
        let mut slots: Vec<u16> = channels
            .requests
            .iter()
            .chain([&channels.reply])
            .map(RedisCluster::slot_of)
            .collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), 4, "no two channels on one slot");
        assert!(placed.iter().all(|p| !p.contains('{')), "no hash tags");
    }

    #[test]
    fn more_servers_than_primaries_share_them() {
        let (channels, _) = spread(RAW_PREFIX, 5, 3, three).expect("spread");
        let mut first: Vec<u16> = channels.requests[..3]
            .iter()
            .map(|c| primary_of(c))
            .collect();
        first.sort_unstable();
        assert_eq!(first, [7000, 7001, 7002]);
        assert_eq!(channels.requests.len(), 5);
        let (one, _) = spread(RAW_PREFIX, 3, 1, |_| Some(7000)).expect("one primary");
        assert_eq!(one.requests[2], "rawbench:cluster:req:2");
    }

    #[test]
    fn a_slot_without_a_primary_is_an_error() {
        assert!(spread(RAW_PREFIX, 3, 3, |_| None).is_err());
    }
}
