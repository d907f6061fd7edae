//! The behaviour suite on the in-memory broker, under paused time: no Redis, no real waiting.

mod behaviour;

use std::time::Duration;

/// A fresh broker per case.
struct Memory(clouds::testing::Broker);

impl behaviour::Backend for Memory {
    fn config(&self) -> clouds::Config {
        self.0
            .config()
            .heartbeat(Duration::from_millis(300))
            .timeout(Duration::from_secs(1))
    }

    fn stale_entry(&self, method: &str, node: &clouds::NodeId) {
        self.0
            .stale_entry(&self.config(), method, node, Duration::from_secs(60));
    }

    fn claim_keys(&self) -> Vec<String> {
        self.0.claims()
    }

    fn once_records(&self) -> Vec<String> {
        self.0.once_records()
    }

    fn once_commands(&self) -> u64 {
        self.0.commands("ONCE_BEGIN") + self.0.commands("ONCE_SWAP")
    }
}

fn memory() -> Memory {
    Memory(clouds::testing::Broker::new())
}

behaviour_suite!(memory(), flavor = "current_thread", start_paused = true);
