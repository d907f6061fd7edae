//! The behaviour suite on a real `redis-server`, one private instance per case.

mod behaviour;
mod common;

use std::time::Duration;

/// A fresh redis-server per case, stopped when the case ends (also on panic).
struct Redis(common::RedisServer);

impl behaviour::Backend for Redis {
    fn config(&self) -> clouds::Config {
        clouds::Config::from_url(&self.0.url_db(3))
            .expect("valid url")
            .heartbeat(Duration::from_millis(300))
            .timeout(Duration::from_secs(1))
    }

    fn stale_entry(&self, method: &str, node: &clouds::NodeId) {
        // A member of the method's sorted set in db 3, scored by its expiry a minute from now
        // on Redis's clock (docs/protocol.md §5), with no server hash behind it. (The testkit's
        // raw connection sits in db 0, hence the SELECT inside the script.)
        let lua = "redis.call('SELECT', '3') \
                   local t = redis.call('TIME') \
                   local expiry = tonumber(t[1]) * 1000 + 60000 \
                   return redis.call('ZADD', KEYS[1], expiry, ARGV[1])";
        let key = format!("{{clouds:3}}:method:{method}");
        let reply = self
            .0
            .command(&["EVAL", lua, "1", &key, node.as_str()])
            .expect("EVAL");
        assert!(!reply.is_error(), "{reply:?}");
    }

    fn claim_keys(&self) -> Vec<String> {
        common::claim_keys(&self.0, 3)
    }

    fn once_records(&self) -> Vec<String> {
        common::once_records(&self.0, 3)
    }

    fn once_commands(&self) -> u64 {
        let info = self.0.command(&["INFO", "commandstats"]).expect("INFO");
        common::calls_of(&info.as_text().unwrap_or_default(), "get")
    }
}

fn redis() -> Redis {
    Redis(common::redis())
}

behaviour_suite!(redis(), flavor = "multi_thread", worker_threads = 2);
