//! The heartbeat registry as Redis keeps it.
//!
//! Per method, a sorted set of provider ids scored by expiry; per server, a hash of its info
//! with a TTL; one sorted set of all live servers. Expiry is computed from Redis's own clock
//! (`TIME` inside the scripts), so clock skew between hosts cannot evict a live node. Any node
//! may purge expired members; there is no master. No `KEYS` or `SCAN` anywhere. Every key
//! carries one hash tag, `{scope}`, so each script touches a single Redis Cluster slot.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;

use crate::error::TransportError;
use crate::script::{Script, ScriptValue};
use crate::transport::Transport;

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
/// A beat whose `generation` field is older than the entry's is ignored: it was overtaken by
/// a beat with a newer method list, which has renewed everything already.
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(leak(format!(
        "{PRELUDE}{}",
        r#"
local id, ttl = ARGV[1], tonumber(ARGV[2])
local gen
for i = 3, #ARGV - 1, 2 do
  if ARGV[i] == 'generation' then gen = tonumber(ARGV[i + 1]) end
end
local seen = tonumber(redis.call('HGET', KEYS[2], 'generation'))
if gen and seen and gen < seen then return now end
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

/// The registry of one deployment (`scope`, such as `namespace:db`) in Redis.
///
/// ```no_run
/// # async fn demo(transport: clouds_redis::Transport) -> Result<(), clouds_redis::TransportError> {
/// use std::time::Duration;
/// let registry = clouds_redis::Registry::new("app:3");
/// let methods = vec!["math.add".to_string()];
/// registry
///     .heartbeat(&transport, "server-1", Duration::from_secs(6), &methods, &[("host", "web1".into())])
///     .await?;
/// assert_eq!(registry.providers(&transport, &methods).await?, vec![vec!["server-1".to_string()]]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Registry {
    scope: String,
}

impl Registry {
    /// The registry whose keys all start with the hash tag `{scope}`.
    ///
    /// ```
    /// let registry = clouds_redis::Registry::new("app:3");
    /// assert_eq!(registry.method_key("math.add"), "{app:3}:method:math.add");
    /// ```
    pub fn new(scope: &str) -> Self {
        Registry {
            scope: scope.to_string(),
        }
    }

    /// Sorted set of live server ids scored by expiry (ms, Redis clock).
    ///
    /// ```
    /// assert_eq!(clouds_redis::Registry::new("app:3").nodes_key(), "{app:3}:nodes");
    /// ```
    pub fn nodes_key(&self) -> String {
        format!("{{{}}}:nodes", self.scope)
    }

    /// Hash of one server's info; expires with its TTL.
    ///
    /// ```
    /// assert_eq!(clouds_redis::Registry::new("app:3").node_key("s1"), "{app:3}:node:s1");
    /// ```
    pub fn node_key(&self, node: &str) -> String {
        format!("{{{}}}:node:{node}", self.scope)
    }

    /// Sorted set of a method's provider ids scored by expiry.
    ///
    /// ```
    /// let registry = clouds_redis::Registry::new("app:3");
    /// assert_eq!(registry.method_key("m.x"), "{app:3}:method:m.x");
    /// ```
    pub fn method_key(&self, method: &str) -> String {
        format!("{{{}}}:method:{method}", self.scope)
    }

    fn entry_keys(&self, id: &str, methods: &[String]) -> Vec<String> {
        let mut keys = Vec::with_capacity(2 + methods.len());
        keys.push(self.nodes_key());
        keys.push(self.node_key(id));
        keys.extend(methods.iter().map(|m| self.method_key(m)));
        keys
    }

    /// Writes or renews server `id`'s entry for `ttl`: listed as a live server with `fields`
    /// as its info, and as a provider of each of `methods`.
    ///
    /// ```no_run
    /// # async fn demo(t: clouds_redis::Transport, r: clouds_redis::Registry) -> Result<(), clouds_redis::TransportError> {
    /// r.heartbeat(&t, "s1", std::time::Duration::from_secs(6), &[], &[("pid", "42".into())]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn heartbeat(
        &self,
        transport: &Transport,
        id: &str,
        ttl: Duration,
        methods: &[String],
        fields: &[(&str, String)],
    ) -> Result<(), TransportError> {
        let keys = self.entry_keys(id, methods);
        let mut args = Vec::with_capacity(2 + 2 * fields.len());
        args.push(id.to_string());
        args.push(ttl.as_millis().to_string());
        for (name, value) in fields {
            args.push((*name).to_string());
            args.push(value.clone());
        }
        transport.eval(&HEARTBEAT, keys, args).await?;
        Ok(())
    }

    /// Removes server `id`'s entry at once, from the server list and from `methods`.
    ///
    /// ```no_run
    /// # async fn demo(t: clouds_redis::Transport, r: clouds_redis::Registry) -> Result<(), clouds_redis::TransportError> {
    /// r.deregister(&t, "s1", &["math.add".to_string()]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn deregister(
        &self,
        transport: &Transport,
        id: &str,
        methods: &[String],
    ) -> Result<(), TransportError> {
        let keys = self.entry_keys(id, methods);
        transport
            .eval(&DEREGISTER, keys, vec![id.to_string()])
            .await?;
        Ok(())
    }

    /// The live providers of each of `methods`, in the order asked, each list by expiry then
    /// id; expired ones are purged on the way.
    ///
    /// ```no_run
    /// # async fn demo(t: clouds_redis::Transport, r: clouds_redis::Registry) -> Result<(), clouds_redis::TransportError> {
    /// let lists = r.providers(&t, &["math.add".to_string()]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn providers(
        &self,
        transport: &Transport,
        methods: &[String],
    ) -> Result<Vec<Vec<String>>, TransportError> {
        if methods.is_empty() {
            return Ok(Vec::new());
        }
        let keys = methods.iter().map(|m| self.method_key(m)).collect();
        let reply = transport.eval(&PROVIDERS, keys, Vec::new()).await?;
        let lists = reply
            .as_array()
            .filter(|lists| lists.len() == methods.len())
            .ok_or_else(|| TransportError::Reply {
                command: "EVALSHA",
                reason: format!("the registry lookup returned {reply:?}"),
            })?;
        Ok(lists.iter().map(ids).collect())
    }

    /// Every live server with the info fields of its last heartbeat; expired ones are purged
    /// on the way.
    ///
    /// ```no_run
    /// # async fn demo(t: clouds_redis::Transport, r: clouds_redis::Registry) -> Result<(), clouds_redis::TransportError> {
    /// for (id, fields) in r.servers(&t).await? {
    ///     println!("{id}: {} fields", fields.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn servers(
        &self,
        transport: &Transport,
    ) -> Result<Vec<(String, Vec<(Bytes, Bytes)>)>, TransportError> {
        let reply = transport
            .eval(&LIVE_NODES, vec![self.nodes_key()], Vec::new())
            .await?;
        let mut servers = Vec::new();
        for id in ids(&reply) {
            let fields = transport.hgetall(&self.node_key(&id)).await?;
            if !fields.is_empty() {
                // (empty: expired between the two reads)
                servers.push((id, fields));
            }
        }
        Ok(servers)
    }
}

/// The strings of a script's array reply; anything else is dropped.
fn ids(value: &ScriptValue) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str())
        .map(str::to_string)
        .collect()
}
