//! The behaviour suite on a real Redis Cluster (3 primaries, 3 replicas), started once for
//! the whole suite (six processes, about 3 s) and stopped when it ends, also on panic. Each
//! case runs in a namespace of its own, so none sees another's servers.

mod behaviour;

use std::sync::Arc;
use std::time::Duration;

use clouds_testkit::RedisCluster;

/// One case's deployment on the shared cluster.
struct Cluster {
    cluster: Arc<RedisCluster>,
    namespace: String,
}

impl behaviour::Backend for Cluster {
    fn config(&self) -> clouds::Config {
        clouds::Config::from_url(&self.cluster.seed_url())
            .expect("valid url")
            .namespace(&self.namespace)
            .heartbeat(Duration::from_millis(300))
            .timeout(Duration::from_secs(1))
    }

    fn stale_entry(&self, method: &str, node: &clouds::NodeId) {
        // As in behaviour_redis.rs, on the primary of the registry's slot (docs/protocol.md §5).
        let lua = "local t = redis.call('TIME') \
                   local expiry = tonumber(t[1]) * 1000 + 60000 \
                   return redis.call('ZADD', KEYS[1], expiry, ARGV[1])";
        let key = format!("{{{}:0}}:method:{method}", self.namespace);
        let port = self
            .cluster
            .primary_for_slot(RedisCluster::slot_of(&key))
            .expect("the registry slot's primary");
        let reply = self
            .cluster
            .command_on(port, &["EVAL", lua, "1", &key, node.as_str()])
            .expect("EVAL");
        assert!(!reply.is_error(), "{reply:?}");
    }

    fn claim_keys(&self) -> Vec<String> {
        self.keys("claim")
    }

    fn once_records(&self) -> Vec<String> {
        self.keys("once")
    }

    fn once_commands(&self) -> u64 {
        // Every case shares the cluster: GETs of all of them (only the exactly-once scripts
        // run GET), which the cases only compare before and after their own calls.
        self.primaries()
            .into_iter()
            .map(|port| {
                let info = self
                    .cluster
                    .command_on(port, &["INFO", "commandstats"])
                    .expect("INFO");
                calls_of(&info.as_text().unwrap_or_default(), "get")
            })
            .sum()
    }

    fn primaries_that_served_claims(&self) -> Option<usize> {
        let served = self
            .primaries()
            .into_iter()
            .filter(|&port| {
                let info = self
                    .cluster
                    .command_on(port, &["INFO", "commandstats"])
                    .expect("INFO");
                info.as_text()
                    .unwrap_or_default()
                    .contains("cmdstat_getdel:")
            })
            .count();
        Some(served)
    }
}

impl Cluster {
    /// The keys of this namespace's `kind` (`claim`, `once`) on every primary.
    fn keys(&self, kind: &str) -> Vec<String> {
        let pattern = format!("{}:0:{kind}:*", self.namespace);
        let mut keys = Vec::new();
        for port in self.primaries() {
            let reply = self
                .cluster
                .command_on(port, &["KEYS", &pattern])
                .expect("KEYS");
            keys.extend(reply.as_str_vec().unwrap_or_default());
        }
        keys
    }

    /// The ports of the cluster's primaries now.
    fn primaries(&self) -> Vec<u16> {
        self.cluster
            .nodes()
            .expect("CLUSTER NODES")
            .into_iter()
            .filter(|node| node.role == clouds_testkit::NodeRole::Primary)
            .map(|node| node.port)
            .collect()
    }
}

/// The `calls=` of `command` in an `INFO commandstats` text (0 if it never ran).
fn calls_of(info: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn cluster() -> Arc<RedisCluster> {
    Arc::new(RedisCluster::start().expect("start a Redis Cluster (apt-get install redis-server)"))
}

behaviour_suite!(
    one_test the_behaviour_suite_on_a_redis_cluster,
    {
        let cluster = cluster();
        move |case: &str| Cluster {
            cluster: cluster.clone(),
            namespace: case.replace('_', "-"),
        }
    },
    flavor = "multi_thread",
    worker_threads = 2
);
