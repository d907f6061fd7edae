//! Key and channel names.
//!
//! Pub/sub ignores the db number, so every name carries `namespace:db` (the scope). The
//! registry's keys are the transport's business (`clouds_redis::Registry` puts them under one
//! hash tag, `{namespace:db}`). Inboxes and call channels carry no tag, so that in a Redis
//! Cluster they spread over slots, and so over shards; the events channel of a cluster carries
//! the registry's tag, so it lives in the registry's slot, where the registry scripts may
//! publish on it.

use std::sync::Mutex;

use crate::transport::Channel;
use foldhash::HashMap;

use crate::config::Config;
use crate::locks::lock;

/// All names of one deployment (namespace + db).
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// `namespace:db`, the channel prefix.
    scope: String,
    /// Redis Cluster: sharded channels, the events channel in the registry's slot.
    sharded: bool,
}

impl Names {
    pub(crate) fn new(config: &Config) -> Self {
        Names {
            scope: format!("{}:{}", config.namespace, config.get_db()),
            sharded: config.endpoint.is_cluster(),
        }
    }

    /// `namespace:db`: what every name of this deployment starts with.
    pub(crate) fn scope(&self) -> &str {
        &self.scope
    }

    /// A node's inbox: replies and messages addressed to it.
    pub(crate) fn inbox(&self, node: &str) -> Channel {
        self.channel(":inbox:", node)
    }

    /// A server's call channel, apart from its inbox so that shutdown can stop taking calls
    /// while still receiving replies to the calls its handlers make.
    pub(crate) fn calls(&self, node: &str) -> Channel {
        self.channel(":calls:", node)
    }

    /// Join and leave announcements: `namespace:db:events`, or in a cluster
    /// `{namespace:db}:events`, in the registry's slot.
    pub(crate) fn events(&self) -> Channel {
        if self.sharded {
            Channel::from(format!("{{{}}}:events", self.scope))
        } else {
            self.channel(":events", "")
        }
    }

    /// The key of a claim (a large body waiting for its receiver, `claim.rs`):
    /// `namespace:db:claim:<token in hex>`. No hash tag, so in a Redis Cluster claims spread
    /// over the slots, and so over the shards.
    pub(crate) fn claim(&self, token: &[u8]) -> String {
        use std::fmt::Write;
        let mut name = String::with_capacity(self.scope.len() + 7 + 2 * token.len());
        name.push_str(&self.scope);
        name.push_str(":claim:");
        for byte in token {
            let _ = write!(name, "{byte:02x}");
        }
        name
    }

    /// The key of an exactly-once call's record (`once.rs`): `namespace:db:once:<caller>:<id>`.
    /// No hash tag, like claims: the records spread over a cluster's slots.
    pub(crate) fn once(&self, caller: &str, id: u64) -> String {
        format!("{}:once:{caller}:{id}", self.scope)
    }

    /// `scope` + `infix` + `node` in one allocation of the exact size: this runs for every
    /// call and every reply, and fred takes the buffer over as it is.
    fn channel(&self, infix: &str, node: &str) -> Channel {
        let mut name = String::with_capacity(self.scope.len() + infix.len() + node.len());
        name.push_str(&self.scope);
        name.push_str(infix);
        name.push_str(node);
        Channel::from(name)
    }
}

/// The call and inbox channels of the peers a node talks to, each name built once: every
/// call publishes to a provider's call channel and every reply to a caller's inbox, and a
/// cached name costs a map lookup instead of an allocation and a copy.
#[derive(Debug)]
pub(crate) struct PeerChannels {
    names: Names,
    calls: Mutex<HashMap<String, Channel>>,
    inboxes: Mutex<HashMap<String, Channel>>,
}

/// Most peers remembered per kind of channel; past it the cache starts over, so peers that
/// came and went (clients restart with new ids) cannot make it grow without end.
const MAX_PEERS: usize = 4096;

impl PeerChannels {
    pub(crate) fn new(names: Names) -> Self {
        PeerChannels {
            names,
            calls: Mutex::default(),
            inboxes: Mutex::default(),
        }
    }

    /// `node`'s call channel.
    pub(crate) fn calls(&self, node: &str) -> Channel {
        Self::cached(&self.calls, node, |node| self.names.calls(node))
    }

    /// `node`'s inbox.
    pub(crate) fn inbox(&self, node: &str) -> Channel {
        Self::cached(&self.inboxes, node, |node| self.names.inbox(node))
    }

    fn cached(
        cache: &Mutex<HashMap<String, Channel>>,
        node: &str,
        build: impl FnOnce(&str) -> Channel,
    ) -> Channel {
        let mut cache = lock(cache);
        if let Some(channel) = cache.get(node) {
            return channel.clone();
        }
        if cache.len() >= MAX_PEERS {
            cache.clear();
        }
        let channel = build(node);
        cache.insert(node.to_string(), channel.clone());
        channel
    }
}

/// Checks a method name: what goes on the wire and into key names.
pub(crate) fn validate_method(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 256 {
        return Err(format!("method name {name:?} must be 1-256 bytes"));
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}'))
    {
        return Err(format!(
            "method name {name:?} must not contain whitespace, control characters or braces"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_namespace_and_db() {
        let names = Names::new(&Config::default().namespace("app").db(3));
        assert_eq!(names.scope(), "app:3");
        assert_eq!(names.inbox("n1").as_str(), "app:3:inbox:n1");
        assert_eq!(names.calls("n1").as_str(), "app:3:calls:n1");
        assert_eq!(names.events().as_str(), "app:3:events");
        assert_eq!(
            names.claim(&[0, 0xab, 0x10]),
            "app:3:claim:00ab10",
            "no hash tag: claims spread over a cluster's slots"
        );
        assert!(validate_method("test.hello").is_ok());
        let peers = PeerChannels::new(names.clone());
        assert_eq!(peers.calls("n1"), names.calls("n1"));
        assert_eq!(peers.inbox("n1"), names.inbox("n1"));
        assert_eq!(
            peers.inbox("n1").as_str(),
            "app:3:inbox:n1",
            "from the cache"
        );
        for i in 0..MAX_PEERS + 10 {
            assert_eq!(peers.inbox(&i.to_string()), names.inbox(&i.to_string()));
        }
        assert!(
            lock(&peers.inboxes).len() <= MAX_PEERS,
            "the cache is bounded"
        );
        assert!(validate_method("bad name").is_err());
        let cluster = Config::from_url("redis-cluster://127.0.0.1:7000").expect("url");
        let names = Names::new(&cluster.namespace("app"));
        assert_eq!(names.events().as_str(), "{app:0}:events");
        assert_eq!(names.inbox("n1").as_str(), "app:0:inbox:n1");
        assert!(validate_method("").is_err());
    }
}
