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
}

fn redis() -> Redis {
    Redis(common::redis())
}

behaviour_suite!(redis(), flavor = "multi_thread", worker_threads = 2);
