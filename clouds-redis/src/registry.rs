//! The heartbeat registry as Redis keeps it.
//!
//! Per method, a sorted set of provider ids scored by expiry; per server, a hash of its info
//! with a TTL; one sorted set of all live servers; one hash of per-method generations, moved on
//! by every change of a method's providers, so that a caller whose list is current learns so
//! without reading it. Expiry is computed from Redis's own clock (`TIME` inside the scripts),
//! so clock skew between hosts cannot evict a live node. Any node may purge expired members;
//! there is no master. No `KEYS` or `SCAN` anywhere. Every key carries one hash tag, `{scope}`,
//! so each script touches a single Redis Cluster slot; the scripts that change who provides
//! what also publish the join or leave announcement, in the same step.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;

use crate::error::TransportError;
use crate::script::{Script, ScriptValue};
use crate::transport::Transport;

/// `now` in ms from Redis's clock; `keep_alive(key, ttl)`: extend a key's expiry to at least
/// `ttl` so a set lives as long as its longest-lived member; `changed(gens, set)`: the
/// providers in method set `set` changed, so its generation (in hash `gens`, field = the
/// method) moves on, or goes if nobody provides the method any more. A generation that starts
/// (a first provider, or the hash was lost) starts from Redis's clock in microseconds: above
/// any value the field held before, as every change is a script run of its own, which takes
/// longer than a microsecond. `generation(gens, set)`: what a lookup reports, `'0'` for a
/// method nobody provides (whether its set was emptied by a script or expired as a key).
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function keep_alive(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
local function method_of(set)
  return string.sub(set, string.find(set, '}:method:', 1, true) + 9)
end
local function changed(gens, set)
  local m = method_of(set)
  if redis.call('EXISTS', set) == 0 then
    redis.call('HDEL', gens, m)
  elseif redis.call('HEXISTS', gens, m) == 1 then
    redis.call('HINCRBY', gens, m, 1)
  else
    redis.call('HSET', gens, m, t[1] .. string.format('%06d', tonumber(t[2])))
  end
end
local function generation(gens, set)
  local m = method_of(set)
  if redis.call('EXISTS', set) == 0 then
    redis.call('HDEL', gens, m)
    return '0'
  end
  local g = redis.call('HGET', gens, m)
  if g then return g end
  changed(gens, set)
  return redis.call('HGET', gens, m)
end
"#;

/// KEYS: nodes set, node hash, generations hash, method sets... ARGV: id, ttl_ms, force_join
/// (`1` or `0`), publish command, events channel, join frame, info field/value pairs...
/// Renews (or re-creates, after a Redis restart) a server's whole entry; publishes the join
/// frame if the beat added the server to a method set it was not in, or if forced; returns
/// Redis's now. A beat whose `generation` field is older than the entry's is ignored (only
/// its join frame is still published if forced): it was overtaken by a beat with a newer
/// method list, which has renewed everything already.
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| script(HEARTBEAT_LUA));

const HEARTBEAT_LUA: &str = r#"
local id, ttl, force = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local gen
for i = 7, #ARGV - 1, 2 do
  if ARGV[i] == 'generation' then gen = tonumber(ARGV[i + 1]) end
end
local seen = tonumber(redis.call('HGET', KEYS[2], 'generation'))
if gen and seen and gen < seen then
  if force then redis.call(ARGV[4], ARGV[5], ARGV[6]) end
  return now
end
local expiry = now + ttl
redis.call('ZADD', KEYS[1], expiry, id)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
keep_alive(KEYS[1], ttl)
redis.call('DEL', KEYS[2])
if #ARGV > 6 then redis.call('HSET', KEYS[2], unpack(ARGV, 7)) end
redis.call('HSET', KEYS[2], 'expires_at_ms', expiry)
redis.call('PEXPIRE', KEYS[2], ttl)
local joined = force
for i = 4, #KEYS do
  local added = redis.call('ZADD', KEYS[i], expiry, id)
  local purged = redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if added > 0 or purged > 0 then changed(KEYS[3], KEYS[i]) end
  if added > 0 then joined = true end
  keep_alive(KEYS[i], ttl)
end
keep_alive(KEYS[3], ttl)
if joined then redis.call(ARGV[4], ARGV[5], ARGV[6]) end
return now
"#;

/// KEYS: nodes set, node hash, generations hash, method sets... ARGV: id, publish command,
/// events channel, leave frame. Removes a server's entry at once and publishes the leave frame
/// (always: callers may hold the server even where the registry no longer does).
static DEREGISTER: LazyLock<Script> = LazyLock::new(|| script(DEREGISTER_LUA));

const DEREGISTER_LUA: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
for i = 4, #KEYS do
  if redis.call('ZREM', KEYS[i], ARGV[1]) > 0 then changed(KEYS[3], KEYS[i]) end
end
redis.call(ARGV[2], ARGV[3], ARGV[4])
return 1
"#;

/// KEYS: generations hash, method sets... Purges expired members; returns one array of live
/// ids per method set.
static PROVIDERS: LazyLock<Script> = LazyLock::new(|| script(PROVIDERS_LUA));

const PROVIDERS_LUA: &str = r#"
local out = {}
for i = 2, #KEYS do
  if redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now) > 0 then changed(KEYS[1], KEYS[i]) end
  out[i - 1] = redis.call('ZRANGE', KEYS[i], 0, -1)
end
return out
"#;

/// KEYS: generations hash, method sets... ARGV: per method set, the generation the caller
/// holds (`''`: none). Purges expired members; returns per method set `false` if the
/// generation is still the one held (without reading the set), else `{generation, ids}`.
static PROVIDERS_SINCE: LazyLock<Script> = LazyLock::new(|| script(PROVIDERS_SINCE_LUA));

const PROVIDERS_SINCE_LUA: &str = r#"
local out = {}
for i = 2, #KEYS do
  if redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now) > 0 then changed(KEYS[1], KEYS[i]) end
  local g = generation(KEYS[1], KEYS[i])
  if g == ARGV[i - 1] then
    out[i - 1] = false
  else
    out[i - 1] = {g, redis.call('ZRANGE', KEYS[i], 0, -1)}
  end
end
return out
"#;

/// KEYS: nodes set. Purges expired servers; returns the live ids.
static LIVE_NODES: LazyLock<Script> = LazyLock::new(|| script(LIVE_NODES_LUA));

const LIVE_NODES_LUA: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#;

/// Every script starts with the [`PRELUDE`].
fn script(body: &str) -> Script {
    Script::new(leak(format!("{PRELUDE}{body}")))
}

/// The scripts are built once per process; `Script` wants `'static` source.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// The registry of one deployment (`scope`, such as `namespace:db`) in Redis.
///
/// ```no_run
/// # async fn demo(transport: clouds_redis::Transport) -> Result<(), clouds_redis::TransportError> {
/// use std::time::Duration;
/// use clouds_redis::{Beat, Lookup, Registry};
/// let registry = Registry::new("app:3");
/// let methods = vec!["math.add".to_string()];
/// let fields = [("host", "web1".to_string())];
/// let beat = Beat {
///     id: "server-1",
///     ttl: Duration::from_secs(6),
///     methods: &methods,
///     fields: &fields,
///     join: "(the join frame)".into(),
///     force_join: false,
/// };
/// registry.heartbeat(&transport, &beat).await?;
/// assert_eq!(registry.providers(&transport, &methods).await?, vec![vec!["server-1".to_string()]]);
/// // A caller that remembers the generation learns next time that nothing changed.
/// let [Lookup::Changed { generation, .. }] = &registry.providers_since(&transport, &[("math.add", None)]).await?[..] else { panic!() };
/// let again = registry.providers_since(&transport, &[("math.add", Some(*generation))]).await?;
/// assert_eq!(again, [Lookup::Unchanged]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Registry {
    scope: String,
    /// Redis Cluster: join and leave frames go out with `SPUBLISH` on a channel in the
    /// registry's own slot; standalone Redis: `PUBLISH` on the plain events channel.
    sharded: bool,
}

/// One heartbeat of a server: what [`Registry::heartbeat`] writes, and the join frame it
/// publishes when the beat makes the server a provider of a method it was not listed for.
///
/// ```
/// let methods = vec!["math.add".to_string()];
/// let beat = clouds_redis::Beat {
///     id: "server-1",
///     ttl: std::time::Duration::from_secs(6),
///     methods: &methods,
///     fields: &[],
///     join: bytes::Bytes::from_static(b"(the join frame)"),
///     force_join: true,
/// };
/// assert!(beat.force_join);
/// ```
#[derive(Debug, Clone)]
pub struct Beat<'a> {
    /// The server's id.
    pub id: &'a str,
    /// How long the entry lives without another beat.
    pub ttl: Duration,
    /// Every method it provides.
    pub methods: &'a [String],
    /// Its info fields (the node hash), written whole.
    pub fields: &'a [(&'a str, String)],
    /// The frame published on the events channel when the beat adds the server to a method
    /// it was not a provider of (binary-safe, published as is).
    pub join: Bytes,
    /// Publish `join` even if the beat adds nothing (after a reconnect, callers may have
    /// dropped the server while it was unreachable).
    pub force_join: bool,
}

/// What [`Registry::providers_since`] found for one method.
///
/// ```
/// use clouds_redis::Lookup;
/// let found = Lookup::Changed { generation: 7, providers: vec!["server-1".into()] };
/// assert_ne!(found, Lookup::Unchanged);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The generation the caller holds is current: its list of providers is too.
    Unchanged,
    /// The providers changed since the generation the caller holds (or it held none).
    Changed {
        /// The generation of this list, to hold for the next lookup (0: nobody provides it).
        generation: u64,
        /// The live providers, by expiry then id.
        providers: Vec<String>,
    },
}

impl Registry {
    /// The registry whose keys all start with the hash tag `{scope}`, on a standalone Redis:
    /// join and leave frames go out with `PUBLISH` on `scope:events`.
    ///
    /// ```
    /// let registry = clouds_redis::Registry::new("app:3");
    /// assert_eq!(registry.method_key("math.add"), "{app:3}:method:math.add");
    /// assert_eq!(registry.events_channel(), "app:3:events");
    /// ```
    pub fn new(scope: &str) -> Self {
        Registry {
            scope: scope.to_string(),
            sharded: false,
        }
    }

    /// [`Registry::new`] for Redis Cluster: join and leave frames go out with `SPUBLISH` on
    /// `{scope}:events`, a shard channel in the registry's own slot (a script may only touch
    /// its own slot).
    ///
    /// ```
    /// let registry = clouds_redis::Registry::sharded("app:3");
    /// assert_eq!(registry.events_channel(), "{app:3}:events");
    /// assert!(registry.is_sharded());
    /// ```
    pub fn sharded(scope: &str) -> Self {
        Registry {
            scope: scope.to_string(),
            sharded: true,
        }
    }

    /// Whether announcements use sharded pub/sub (see [`Registry::sharded`]).
    ///
    /// ```
    /// assert!(!clouds_redis::Registry::new("app:3").is_sharded());
    /// ```
    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// The channel the scripts publish join and leave frames on: `scope:events`, or
    /// `{scope}:events` for a sharded registry.
    ///
    /// ```
    /// assert_eq!(clouds_redis::Registry::new("app:3").events_channel(), "app:3:events");
    /// ```
    pub fn events_channel(&self) -> String {
        if self.sharded {
            format!("{{{}}}:events", self.scope)
        } else {
            format!("{}:events", self.scope)
        }
    }

    /// The command the scripts publish with.
    fn publish_command(&self) -> &'static str {
        if self.sharded { "SPUBLISH" } else { "PUBLISH" }
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

    /// Hash of each method's generation (field: the method), which every change of its
    /// providers moves on.
    ///
    /// ```
    /// assert_eq!(clouds_redis::Registry::new("app:3").generations_key(), "{app:3}:gens");
    /// ```
    pub fn generations_key(&self) -> String {
        format!("{{{}}}:gens", self.scope)
    }

    fn entry_keys(&self, id: &str, methods: &[String]) -> Vec<String> {
        let mut keys = Vec::with_capacity(3 + methods.len());
        keys.push(self.nodes_key());
        keys.push(self.node_key(id));
        keys.push(self.generations_key());
        keys.extend(methods.iter().map(|m| self.method_key(m)));
        keys
    }

    /// The generations hash, then each method's set.
    fn method_keys<'a>(&self, methods: impl ExactSizeIterator<Item = &'a str>) -> Vec<String> {
        let mut keys = Vec::with_capacity(1 + methods.len());
        keys.push(self.generations_key());
        keys.extend(methods.map(|m| self.method_key(m)));
        keys
    }

    /// Writes or renews a server's entry for `beat.ttl`: listed as a live server with
    /// `beat.fields` as its info, and as a provider of each of `beat.methods`. In the same
    /// step, publishes `beat.join` on the [events channel](Registry::events_channel) if the
    /// beat made the server a provider of a method it was not listed for (or if
    /// `beat.force_join`).
    ///
    /// ```no_run
    /// # async fn demo(t: clouds_redis::Transport, r: clouds_redis::Registry) -> Result<(), clouds_redis::TransportError> {
    /// let beat = clouds_redis::Beat {
    ///     id: "s1",
    ///     ttl: std::time::Duration::from_secs(6),
    ///     methods: &[],
    ///     fields: &[("pid", "42".into())],
    ///     join: "(the join frame)".into(),
    ///     force_join: false,
    /// };
    /// r.heartbeat(&t, &beat).await?;
    /// # Ok(()) }
    /// ```
    pub async fn heartbeat(
        &self,
        transport: &Transport,
        beat: &Beat<'_>,
    ) -> Result<(), TransportError> {
        let keys = self.entry_keys(beat.id, beat.methods);
        let mut args: Vec<Bytes> = Vec::with_capacity(6 + 2 * beat.fields.len());
        args.push(Bytes::copy_from_slice(beat.id.as_bytes()));
        args.push(beat.ttl.as_millis().to_string().into());
        args.push(Bytes::from_static(if beat.force_join {
            b"1"
        } else {
            b"0"
        }));
        args.push(Bytes::from_static(self.publish_command().as_bytes()));
        args.push(self.events_channel().into());
        args.push(beat.join.clone());
        for (name, value) in beat.fields {
            args.push(Bytes::copy_from_slice(name.as_bytes()));
            args.push(Bytes::copy_from_slice(value.as_bytes()));
        }
        transport.eval(&HEARTBEAT, keys, args).await?;
        Ok(())
    }

    /// Removes server `id`'s entry at once, from the server list and from `methods`, and in
    /// the same step publishes `leave` on the [events channel](Registry::events_channel).
    ///
    /// ```no_run
    /// # async fn demo(t: clouds_redis::Transport, r: clouds_redis::Registry) -> Result<(), clouds_redis::TransportError> {
    /// r.deregister(&t, "s1", &["math.add".to_string()], "(the leave frame)".into()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn deregister(
        &self,
        transport: &Transport,
        id: &str,
        methods: &[String],
        leave: Bytes,
    ) -> Result<(), TransportError> {
        let keys = self.entry_keys(id, methods);
        let args = vec![
            Bytes::copy_from_slice(id.as_bytes()),
            Bytes::from_static(self.publish_command().as_bytes()),
            self.events_channel().into(),
            leave,
        ];
        transport.eval(&DEREGISTER, keys, args).await?;
        Ok(())
    }

    /// The live providers of each of `methods`, in the order asked, each list by expiry then
    /// id; expired ones are purged on the way. Reads every list whole: a caller that asks
    /// again and again should use [`Registry::providers_since`].
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
        let keys = self.method_keys(methods.iter().map(String::as_str));
        let reply = transport.eval(&PROVIDERS, keys, Vec::new()).await?;
        let lists = reply
            .as_array()
            .filter(|lists| lists.len() == methods.len())
            .ok_or_else(|| lookup_error(&reply))?;
        Ok(lists.iter().map(ids).collect())
    }

    /// For each `(method, generation)`, in the order asked: [`Lookup::Unchanged`] if
    /// `generation` is still the method's (the list is not read at all), else its live
    /// providers and their generation. `None` is a generation no method has, so it always gets
    /// the list. Expired providers are purged on the way (which changes the generation).
    ///
    /// ```no_run
    /// # async fn demo(t: clouds_redis::Transport, r: clouds_redis::Registry) -> Result<(), clouds_redis::TransportError> {
    /// use clouds_redis::Lookup;
    /// let mut held = None;
    /// for _ in 0..3 {
    ///     match &r.providers_since(&t, &[("math.add", held)]).await?[0] {
    ///         Lookup::Unchanged => {}
    ///         Lookup::Changed { generation, providers } => {
    ///             held = Some(*generation);
    ///             println!("now {} providers", providers.len());
    ///         }
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn providers_since(
        &self,
        transport: &Transport,
        known: &[(&str, Option<u64>)],
    ) -> Result<Vec<Lookup>, TransportError> {
        if known.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.method_keys(known.iter().map(|(m, _)| *m));
        let args = known
            .iter()
            .map(|(_, g)| g.map_or_else(Bytes::new, |g| g.to_string().into()))
            .collect();
        let reply = transport.eval(&PROVIDERS_SINCE, keys, args).await?;
        let items = reply
            .as_array()
            .filter(|items| items.len() == known.len())
            .ok_or_else(|| lookup_error(&reply))?;
        items
            .iter()
            .map(|item| match item {
                ScriptValue::Nil => Ok(Lookup::Unchanged),
                ScriptValue::Array(pair) => match &pair[..] {
                    [generation, providers] => Ok(Lookup::Changed {
                        generation: generation
                            .as_str()
                            .and_then(|g| g.parse().ok())
                            .ok_or_else(|| lookup_error(&reply))?,
                        providers: ids(providers),
                    }),
                    _ => Err(lookup_error(&reply)),
                },
                _ => Err(lookup_error(&reply)),
            })
            .collect()
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

fn lookup_error(reply: &ScriptValue) -> TransportError {
    TransportError::Reply {
        command: "EVALSHA",
        reason: format!("the registry lookup returned {reply:?}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/protocol.md` §5.2 quotes every script verbatim.
    #[test]
    fn the_protocol_quotes_the_scripts_as_they_are() {
        let spec = include_str!("../../docs/protocol.md");
        for (name, lua) in [
            ("PRELUDE", PRELUDE),
            ("HEARTBEAT", HEARTBEAT_LUA),
            ("DEREGISTER", DEREGISTER_LUA),
            ("PROVIDERS", PROVIDERS_LUA),
            ("PROVIDERS_SINCE", PROVIDERS_SINCE_LUA),
            ("LIVE_NODES", LIVE_NODES_LUA),
        ] {
            let block = format!("```lua\n{}```", lua.trim_start_matches('\n'));
            assert!(
                spec.contains(&block),
                "docs/protocol.md §5.2 does not quote {name} as it is:\n{block}"
            );
        }
    }

    /// Bytes read from `stream` until `wanted` shows up among them (10 s at most).
    fn read_until(stream: &mut std::net::TcpStream, wanted: &[u8]) -> Vec<u8> {
        use std::io::Read;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.windows(wanted.len()).any(|w| w == wanted) {
            let n = stream.read(&mut buf).expect("read within 10 s");
            assert!(n > 0, "connection closed; read so far: {seen:?}");
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    }

    /// One RESP command, as bytes.
    fn resp(args: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// On Redis Cluster the scripts publish with SPUBLISH on `{scope}:events`, which is in the
    /// registry's slot; the plain channel name is in another slot, and Redis refuses it.
    #[test]
    fn on_a_cluster_the_scripts_announce_in_the_registrys_own_slot() {
        use clouds_testkit::RedisCluster;
        use std::io::Write;
        let cluster = RedisCluster::start_with(3, 0).expect("a cluster");
        let registry = Registry::sharded("app:3");
        let channel = registry.events_channel();
        let slot = RedisCluster::slot_of(registry.nodes_key());
        assert_eq!(RedisCluster::slot_of(&channel), slot);
        let port = cluster.primary_for_slot(slot).expect("the slot's primary");
        let mut subscriber =
            std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect the subscriber");
        subscriber
            .write_all(&resp(&[b"SSUBSCRIBE", channel.as_bytes()]))
            .expect("SSUBSCRIBE");
        read_until(&mut subscriber, b"ssubscribe");

        let methods = vec!["m.a".to_string()];
        let eval = |script: &str, keys: &[String], args: &[&[u8]]| {
            let numkeys = keys.len().to_string();
            let mut command: Vec<&[u8]> = vec![b"EVAL", script.as_bytes(), numkeys.as_bytes()];
            command.extend(keys.iter().map(|k| k.as_bytes()));
            command.extend_from_slice(args);
            cluster.command_bytes_on(port, &command).expect("EVAL")
        };
        let heartbeat = format!("{PRELUDE}{HEARTBEAT_LUA}");
        let keys = registry.entry_keys("s1", &methods);
        let join: &[u8] = &[0x01, 0x93, 0x03, 0xff, 0x00, b'\r', b'\n'];
        let beat = |publish: &str, events: &str| {
            eval(
                &heartbeat,
                &keys,
                &[
                    b"s1",
                    b"60000",
                    b"0",
                    publish.as_bytes(),
                    events.as_bytes(),
                    join,
                ],
            )
        };
        let reply = beat(registry.publish_command(), &channel);
        assert!(!reply.is_error(), "{reply:?}");
        let got = read_until(&mut subscriber, join);
        assert!(got.windows(8).any(|w| w == b"smessage"), "{got:?}");

        // A shard channel of a slot another node owns is refused: a script may touch no key or
        // shard channel off its node (and one of another slot on the same node would be lost
        // to its subscribers once that slot moves).
        let elsewhere = (0..)
            .map(|i| format!("elsewhere-{i}"))
            .find(|c| {
                cluster
                    .primary_for_slot(RedisCluster::slot_of(c))
                    .expect("owner")
                    != port
            })
            .expect("a channel on another node");
        let reply = eval(
            &format!("{PRELUDE}{DEREGISTER_LUA}"),
            &keys,
            &[b"s1", b"SPUBLISH", elsewhere.as_bytes(), b"leave"],
        );
        assert!(reply.is_error(), "{reply:?}");

        let reply = eval(
            &format!("{PRELUDE}{DEREGISTER_LUA}"),
            &keys,
            &[
                b"s1",
                registry.publish_command().as_bytes(),
                channel.as_bytes(),
                b"(leave)",
            ],
        );
        assert!(!reply.is_error(), "{reply:?}");
        read_until(&mut subscriber, b"(leave)");
    }

    #[test]
    fn standalone_and_sharded_registries_announce_on_their_own_channels() {
        let standalone = Registry::new("app:3");
        assert_eq!(standalone.events_channel(), "app:3:events");
        assert_eq!(standalone.publish_command(), "PUBLISH");
        let sharded = Registry::sharded("app:3");
        assert_eq!(sharded.events_channel(), "{app:3}:events");
        assert_eq!(sharded.publish_command(), "SPUBLISH");
        // The same keys either way.
        assert_eq!(sharded.method_key("m"), standalone.method_key("m"));
        assert_eq!(sharded.generations_key(), "{app:3}:gens");
    }
}
