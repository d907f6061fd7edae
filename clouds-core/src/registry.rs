//! The heartbeat registry: who provides what, kept alive by the providers themselves.
//!
//! Per method, a sorted set of provider ids scored by expiry; per server, a hash of its info
//! with a TTL; one sorted set of all live servers. Expiry is computed from Redis's own clock
//! (`TIME` inside the scripts), so clock skew between hosts cannot evict a live node. Any node
//! may purge expired members; there is no master. No `KEYS` or `SCAN` anywhere.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clouds_redis::{Script, ScriptValue, Transport};

use crate::error::Error;
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

/// What a server publishes about itself.
#[derive(Debug, Clone)]
pub(crate) struct Announcement<'a> {
    pub(crate) id: &'a NodeId,
    pub(crate) methods: &'a [String],
    pub(crate) started_at_ms: u64,
    pub(crate) in_flight: usize,
}

/// Registry operations of one deployment.
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    names: Names,
    ttl: Duration,
    /// This machine's host name, read once: every heartbeat writes it.
    host: String,
}

impl Registry {
    pub(crate) fn new(names: Names, ttl: Duration) -> Self {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        Registry { names, ttl, host }
    }

    fn entry_keys(&self, id: &NodeId, methods: &[String]) -> Vec<String> {
        let mut keys = Vec::with_capacity(2 + methods.len());
        keys.push(self.names.nodes_key());
        keys.push(self.names.node_key(id.as_str()));
        keys.extend(methods.iter().map(|m| self.names.method_key(m)));
        keys
    }

    /// Writes or renews a server's entry.
    pub(crate) async fn heartbeat(
        &self,
        redis: &Transport,
        me: &Announcement<'_>,
    ) -> Result<(), Error> {
        let keys = self.entry_keys(me.id, me.methods);
        let args = vec![
            me.id.to_string(),
            self.ttl.as_millis().to_string(),
            "id".into(),
            me.id.to_string(),
            "host".into(),
            self.host.clone(),
            "pid".into(),
            std::process::id().to_string(),
            "started_at_ms".into(),
            me.started_at_ms.to_string(),
            "in_flight".into(),
            me.in_flight.to_string(),
            "protocol".into(),
            crate::codec::VERSION.to_string(),
            "methods".into(),
            me.methods.join("\n"),
        ];
        redis.eval(&HEARTBEAT, keys, args).await?;
        Ok(())
    }

    /// Removes a server's entry.
    async fn deregister(
        &self,
        redis: &Transport,
        id: &NodeId,
        methods: &[String],
    ) -> Result<(), Error> {
        let keys = self.entry_keys(id, methods);
        redis.eval(&DEREGISTER, keys, vec![id.to_string()]).await?;
        Ok(())
    }

    /// Tells callers at once that `id` provides `methods` (a join event). Callers that miss it
    /// find out at their next refresh.
    pub(crate) async fn announce(
        &self,
        redis: &Transport,
        id: &NodeId,
        methods: &[String],
    ) -> Result<(), Error> {
        let join = crate::codec::encode_join(id.as_str(), methods);
        redis.publish(self.names.events(), join.into()).await?;
        Ok(())
    }

    /// Removes a server's entry and tells callers it is leaving. Both steps are attempted;
    /// the first failure is returned (the entry then expires with its TTL).
    pub(crate) async fn leave(
        &self,
        redis: &Transport,
        id: &NodeId,
        methods: &[String],
    ) -> Result<(), Error> {
        let removed = self.deregister(redis, id, methods).await;
        let leave = crate::codec::encode_leave(id.as_str());
        let announced = redis.publish(self.names.events(), leave.into()).await;
        removed?;
        announced?;
        Ok(())
    }

    /// Live providers of each method, in the order asked.
    pub(crate) async fn providers(
        &self,
        redis: &Transport,
        methods: &[String],
    ) -> Result<Vec<Vec<NodeId>>, Error> {
        if methods.is_empty() {
            return Ok(Vec::new());
        }
        let keys = methods.iter().map(|m| self.names.method_key(m)).collect();
        let reply = redis.eval(&PROVIDERS, keys, Vec::new()).await?;
        let lists = reply
            .as_array()
            .filter(|lists| lists.len() == methods.len())
            .ok_or_else(|| Error::Protocol(format!("registry lookup returned {reply:?}")))?;
        Ok(lists.iter().map(ids).collect())
    }

    /// Every live server and its info. Entries that cannot be read are logged and skipped.
    pub(crate) async fn servers(
        &self,
        redis: &Transport,
    ) -> Result<BTreeMap<NodeId, ServerInfo>, Error> {
        let reply = redis
            .eval(&LIVE_NODES, vec![self.names.nodes_key()], Vec::new())
            .await?;
        let mut servers = BTreeMap::new();
        for id in ids(&reply) {
            let fields = redis.hgetall(&self.names.node_key(id.as_str())).await?;
            if fields.is_empty() {
                continue; // expired between the two reads
            }
            match ServerInfo::parse(&id, &fields) {
                Ok(info) => {
                    servers.insert(id, info);
                }
                Err(reason) => {
                    tracing::warn!(node = %id, %reason, "skipping an unreadable registry entry");
                }
            }
        }
        Ok(servers)
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

/// What the registry knows about one live server.
///
/// ```
/// # async fn demo(monitor: clouds_core::Monitor) -> Result<(), clouds_core::Error> {
/// for (id, info) in monitor.status().await?.servers {
///     println!("{id} on {} (pid {}): {} calls in flight, serves {:?}",
///              info.host, info.pid, info.in_flight, info.methods);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerInfo {
    /// The server's node id.
    pub id: NodeId,
    /// Host name of the machine it runs on.
    pub host: String,
    /// Its process id there.
    pub pid: u32,
    /// When it started (its own clock).
    pub started_at: SystemTime,
    /// Calls it was running at its last heartbeat.
    pub in_flight: u64,
    /// The methods it serves, sorted.
    pub methods: Vec<String>,
}

impl ServerInfo {
    fn parse(id: &NodeId, fields: &[(bytes::Bytes, bytes::Bytes)]) -> Result<ServerInfo, String> {
        let get = |name: &str| -> Result<&str, String> {
            let (_, v) = fields
                .iter()
                .find(|(k, _)| &k[..] == name.as_bytes())
                .ok_or_else(|| format!("field {name} is missing"))?;
            std::str::from_utf8(v).map_err(|_| format!("field {name} is not UTF-8"))
        };
        let number = |name: &str| -> Result<u64, String> {
            get(name)?
                .parse()
                .map_err(|_| format!("field {name} is not a number"))
        };
        let mut methods: Vec<String> = get("methods")?
            .split('\n')
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect();
        methods.sort();
        Ok(ServerInfo {
            id: id.clone(),
            host: get("host")?.to_string(),
            pid: u32::try_from(number("pid")?).map_err(|_| "pid out of range".to_string())?,
            started_at: UNIX_EPOCH + Duration::from_millis(number("started_at_ms")?),
            in_flight: number("in_flight")?,
            methods,
        })
    }
}
