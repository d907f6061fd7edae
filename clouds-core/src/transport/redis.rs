//! The transport for standalone Redis: pub/sub over the `clouds-redis` connections, and the
//! registry as Lua scripts.
//!
//! Per method, a sorted set of provider ids scored by expiry; per server, a hash of its info
//! with a TTL; one sorted set of all live servers. Expiry is computed from Redis's own clock
//! (`TIME` inside the scripts), so clock skew between hosts cannot evict a live node. Any node
//! may purge expired members; there is no master. No `KEYS` or `SCAN` anywhere. Every key
//! carries the hash tag `{namespace:db}` (see `namespace`).

use std::future::Future;
use std::sync::LazyLock;

use bytes::Bytes;
use clouds_redis::{Script, ScriptValue};

use super::{Channel, Entry, Fields, Inbound, Reconnects, Transport, TransportError};
use crate::namespace::Names;
use crate::node_id::NodeId;

/// `now` in ms from Redis's clock, and `keep_alive(key, ttl)`: extend a key's expiry to at least
/// `ttl` so a set lives as long as its longest-lived member.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function keep_alive(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"#;

/// KEYS: nodes set, node hash, method sets... ARGV: id, ttl_ms, info field/value pairs...
/// Renews (or re-creates, after a Redis restart) a server's whole entry; returns Redis's now.
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(leak(format!(
        "{PRELUDE}{}",
        r#"
local id, ttl = ARGV[1], tonumber(ARGV[2])
local expiry = now + ttl
redis.call('ZADD', KEYS[1], expiry, id)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
keep_alive(KEYS[1], ttl)
redis.call('DEL', KEYS[2])
if #ARGV > 2 then redis.call('HSET', KEYS[2], unpack(ARGV, 3)) end
redis.call('HSET', KEYS[2], 'expires_at_ms', expiry)
redis.call('PEXPIRE', KEYS[2], ttl)
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], expiry, id)
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  keep_alive(KEYS[i], ttl)
end
return now
"#
    )))
});

/// KEYS: nodes set, node hash, method sets... ARGV: id. Removes a server's entry at once.
static DEREGISTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
for i = 3, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"#,
    )
});

/// KEYS: method sets... Purges expired members; returns one array of live ids per key.
static PROVIDERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(leak(format!(
        "{PRELUDE}{}",
        r#"
local out = {}
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  out[i] = redis.call('ZRANGE', KEYS[i], 0, -1)
end
return out
"#
    )))
});

/// KEYS: nodes set. Purges expired servers; returns the live ids.
static LIVE_NODES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(leak(format!(
        "{PRELUDE}{}",
        r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#
    )))
});

/// The scripts are built once per process; `Script` wants `'static` source.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// One node's connections to a standalone Redis.
#[derive(Debug)]
pub(crate) struct RedisWire {
    redis: clouds_redis::Transport,
    names: Names,
}

impl RedisWire {
    pub(crate) async fn connect(
        endpoint: &clouds_redis::Endpoint,
        options: &clouds_redis::TransportOptions,
        names: &Names,
    ) -> Result<Self, TransportError> {
        Ok(RedisWire {
            redis: clouds_redis::Transport::connect(endpoint, options).await?,
            names: names.clone(),
        })
    }

    fn entry_keys(&self, id: &NodeId, methods: &[String]) -> Vec<String> {
        let mut keys = Vec::with_capacity(2 + methods.len());
        keys.push(self.names.nodes_key());
        keys.push(self.names.node_key(id.as_str()));
        keys.extend(methods.iter().map(|m| self.names.method_key(m)));
        keys
    }
}

impl Transport for RedisWire {
    fn publish(
        &self,
        channel: Channel,
        frame: Bytes,
    ) -> impl Future<Output = Result<u64, TransportError>> + Send {
        let publish = self.redis.publish(channel, frame);
        async move { Ok(publish.await?) }
    }

    fn publish_untimed(
        &self,
        channel: Channel,
        frame: Bytes,
    ) -> impl Future<Output = Result<u64, TransportError>> + Send {
        let publish = self.redis.publish_untimed(channel, frame);
        async move { Ok(publish.await?) }
    }

    async fn subscribe(&self, channel: &Channel) -> Result<(), TransportError> {
        Ok(self.redis.subscribe(channel).await?)
    }

    async fn unsubscribe(&self, channel: &Channel) -> Result<(), TransportError> {
        Ok(self.redis.unsubscribe(channel).await?)
    }

    fn inbound(&self) -> Inbound {
        Inbound::Redis(self.redis.inbound())
    }

    fn reconnects(&self) -> Reconnects {
        Reconnects::Redis(self.redis.reconnects())
    }

    async fn heartbeat(&self, entry: &Entry<'_>) -> Result<(), TransportError> {
        let keys = self.entry_keys(entry.id, entry.methods);
        let mut args = Vec::with_capacity(2 + 2 * entry.fields.len());
        args.push(entry.id.to_string());
        args.push(entry.ttl.as_millis().to_string());
        for (name, value) in &entry.fields {
            args.push((*name).to_string());
            args.push(value.clone());
        }
        self.redis.eval(&HEARTBEAT, keys, args).await?;
        Ok(())
    }

    async fn deregister(&self, id: &NodeId, methods: &[String]) -> Result<(), TransportError> {
        let keys = self.entry_keys(id, methods);
        self.redis
            .eval(&DEREGISTER, keys, vec![id.to_string()])
            .await?;
        Ok(())
    }

    async fn providers(&self, methods: &[String]) -> Result<Vec<Vec<NodeId>>, TransportError> {
        if methods.is_empty() {
            return Ok(Vec::new());
        }
        let keys = methods.iter().map(|m| self.names.method_key(m)).collect();
        let reply = self.redis.eval(&PROVIDERS, keys, Vec::new()).await?;
        let lists = reply
            .as_array()
            .filter(|lists| lists.len() == methods.len())
            .ok_or_else(|| TransportError::Reply {
                command: "EVALSHA",
                reason: format!("the registry lookup returned {reply:?}"),
            })?;
        Ok(lists.iter().map(ids).collect())
    }

    async fn servers(&self) -> Result<Vec<(NodeId, Fields)>, TransportError> {
        let reply = self
            .redis
            .eval(&LIVE_NODES, vec![self.names.nodes_key()], Vec::new())
            .await?;
        let mut servers = Vec::new();
        for id in ids(&reply) {
            let fields = self
                .redis
                .hgetall(&self.names.node_key(id.as_str()))
                .await?;
            if !fields.is_empty() {
                // (empty: expired between the two reads)
                servers.push((id, fields));
            }
        }
        Ok(servers)
    }

    async fn close(&self) {
        self.redis.close().await;
    }
}

/// Node ids from a script's array reply; anything that is not an id is dropped.
fn ids(value: &ScriptValue) -> Vec<NodeId> {
    value
        .as_array()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str())
        .filter(|s| !s.is_empty() && s.len() <= crate::node_id::MAX_NODE_ID_LEN)
        .map(NodeId::from)
        .collect()
}
