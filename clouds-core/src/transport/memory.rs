//! An in-process broker with the observable behaviour of Redis, and faults to inject.
//!
//! What it models, because the runtime depends on it:
//! - `PUBLISH` answers how many connections subscribed to the channel got the frame (0 when
//!   nobody listens), and each connection receives its frames in the order published;
//! - a connection's buffer is bounded like fred's: a reader that falls behind loses frames and
//!   is told how many (`Lagged`);
//! - registry entries expire after their TTL on tokio's clock (so `tokio::time::pause()` makes
//!   a test of expiry instant), providers are listed by expiry then id like `ZRANGE`, and
//!   expired members are purged by whoever reads, as the Lua scripts do;
//! - each method's providers have a generation that every change moves on (a provider added,
//!   removed or expired), and a lookup holding the current one is answered "unchanged";
//! - a heartbeat that adds a provider publishes its join frame, a deregistration its leave
//!   frame, under the same lock as the change (so nobody sees one without the other), to the
//!   events channel's subscribers exactly as a publish would reach them;
//! - pub/sub ignores the registry's scope (namespace and db), as Redis's does;
//! - plain keys (claims of large bodies) are set with an expiry on tokio's clock, taken with
//!   `GETDEL` semantics (read and deleted in one step, `None` once expired) and deleted.
//!
//! Faults are addressed by node id and apply to every connection of that node.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{
    Channel, Delivery, Entry, Fields, Inbound, Lookup, Reconnects, Transport, TransportError,
};
use crate::locks::lock;
use crate::namespace::Names;
use crate::node_id::NodeId;

/// An in-memory stand-in for a Redis server, shared by every node connected to it.
///
/// Nodes whose [`Config`](crate::Config) names a broker ([`Broker::config`] or
/// [`Config::broker`](crate::Config::broker)) talk through it instead of Redis: servers,
/// clients and monitors behave as they do over Redis, in one process and without a network,
/// and under `tokio::time::pause()` heartbeats, TTLs, timeouts and retries take no real time.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), clouds_core::Error> {
/// use std::convert::Infallible;
/// let broker = clouds_core::testing::Broker::new();
/// let server = clouds_core::Server::start(broker.config()).await?;
/// server.register("math.add", |(a, b): (i64, i64)| async move { Ok::<_, Infallible>(a + b) }).await?;
///
/// let client = clouds_core::Client::connect(broker.config()).await?;
/// assert_eq!(client.call::<_, i64>("math.add", (2, 3)).await?, 5);
///
/// // Faults: the provider stops reading, so the call times out.
/// broker.freeze(server.id());
/// let quick = client.clone().with_timeout(std::time::Duration::from_millis(50));
/// assert!(matches!(quick.call::<_, i64>("math.add", (1, 1)).await, Err(clouds_core::Error::Timeout { .. })));
/// broker.thaw(server.id());
/// server.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Broker {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("Broker")
            .field("connections", &state.conns.len())
            .field("channels", &state.channels.len())
            .finish()
    }
}

/// What to do to one frame on its way to a node (see [`Broker::fault_next_frame`]).
///
/// ```
/// use clouds_core::testing::FrameFault;
/// let fault = FrameFault::Delay(std::time::Duration::from_millis(100));
/// assert_ne!(fault, FrameFault::Drop);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameFault {
    /// Lose it in transit (the publisher still counts the node as a receiver).
    Drop,
    /// Deliver it twice.
    Duplicate,
    /// Deliver it this much later (frames published meanwhile overtake it).
    Delay(Duration),
}

/// Where an entry whose TTL would overflow the clock expires instead.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[derive(Default)]
struct State {
    next_conn: u64,
    conns: BTreeMap<u64, Conn>,
    /// Channel name → subscribed connections.
    channels: HashMap<String, BTreeSet<u64>>,
    /// Registry scope (`namespace:db`) → its entries.
    registries: HashMap<String, Registry>,
    /// Node id → commands left to fail.
    failing: HashMap<String, u32>,
    /// Node id → faults for its next frames, in order.
    frame_faults: HashMap<String, VecDeque<FrameFault>>,
    /// Node ids whose connections are cut (see [`Broker::disconnect`]).
    disconnected: BTreeSet<String>,
    /// Node ids whose deliveries are held (see [`Broker::freeze`]).
    frozen: BTreeSet<String>,
    /// Node id → delays of its next registry commands, in order.
    slow: HashMap<String, VecDeque<Duration>>,
    /// Commands sent, by name (see [`Broker::commands`]).
    commands: HashMap<&'static str, u64>,
    /// Plain keys (the claims of large bodies) → value and expiry. Key names carry the
    /// scope, as over Redis, so one map serves every deployment.
    keys: HashMap<String, (Bytes, Instant)>,
}

struct Conn {
    node: String,
    /// Like fred's: a bounded broadcast channel, so a reader that falls behind loses the
    /// oldest frames and is told how many at its next read.
    tx: broadcast::Sender<Delivery>,
    /// The channels it wants; the broker's `channels` says which it has now (they differ
    /// after `drop_subscriptions`, until a reconnect restores them).
    subscriptions: BTreeSet<String>,
    /// Frames held while the node is frozen, in order.
    held: VecDeque<Delivery>,
    reconnected: broadcast::Sender<()>,
}

#[derive(Default)]
struct Registry {
    /// Server id → (expiry, info fields).
    nodes: HashMap<String, (Instant, Fields)>,
    /// Method → provider id → expiry.
    methods: HashMap<String, HashMap<String, Instant>>,
    /// Method → its generation: moved on by every change of its providers, never reset.
    generations: HashMap<String, u64>,
}

impl Registry {
    /// Removes expired entries; a method that lost providers gets a new generation.
    fn purge(&mut self, now: Instant) {
        self.nodes.retain(|_, (expiry, _)| *expiry > now);
        for (method, providers) in &mut self.methods {
            let before = providers.len();
            providers.retain(|_, expiry| *expiry > now);
            if providers.len() != before {
                *self.generations.entry(method.clone()).or_default() += 1;
            }
        }
        self.methods.retain(|_, providers| !providers.is_empty());
    }

    /// Lists (or renews) `id` as a provider of `method` until `expiry`; true if it was not
    /// one (the method's generation then moves on).
    fn provide(&mut self, method: &str, id: &str, expiry: Instant) -> bool {
        let providers = self.methods.entry(method.to_string()).or_default();
        let added = providers.insert(id.to_string(), expiry).is_none();
        if added {
            *self.generations.entry(method.to_string()).or_default() += 1;
        }
        added
    }

    /// Takes `id` off `method`'s providers (the generation moves on if it was one).
    fn withdraw(&mut self, method: &str, id: &str) {
        if let Some(providers) = self.methods.get_mut(method)
            && providers.remove(id).is_some()
        {
            *self.generations.entry(method.to_string()).or_default() += 1;
        }
    }

    /// What a lookup holding generation `known` of `method` gets, as the Redis script answers:
    /// generation 0 for a method nobody provides.
    fn look_up(&self, method: &str, known: Option<u64>) -> Lookup {
        let (generation, providers) = match self.methods.get(method) {
            Some(providers) if !providers.is_empty() => (
                self.generations.get(method).copied().unwrap_or_default(),
                Some(providers),
            ),
            _ => (0, None),
        };
        if known == Some(generation) {
            return Lookup::Unchanged;
        }
        Lookup::Changed {
            generation,
            providers: providers.map_or_else(Vec::new, |p| by_expiry(p.iter())),
        }
    }
}

/// Ids sorted as `ZRANGE` sorts members: by score (expiry), then by id.
fn by_expiry<'a>(members: impl Iterator<Item = (&'a String, &'a Instant)>) -> Vec<NodeId> {
    let mut members: Vec<_> = members.collect();
    members.sort_by(|a, b| a.1.cmp(b.1).then_with(|| a.0.cmp(b.0)));
    members
        .into_iter()
        .map(|(id, _)| NodeId::from(id.as_str()))
        .collect()
}

impl State {
    /// Hands `delivery` to connection `id`: held if its node is frozen, else into its buffer
    /// (which, like fred's, loses the oldest frames when full; with no reader yet, the frame
    /// is dropped, as Redis would drop it).
    fn deliver(&mut self, id: u64, delivery: Delivery) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if self.frozen.contains(&conn.node) {
            conn.held.push_back(delivery);
        } else {
            let _ = conn.tx.send(delivery);
        }
    }

    fn conns_of<'a>(&'a self, node: &'a str) -> impl Iterator<Item = u64> + 'a {
        self.conns
            .iter()
            .filter(move |(_, c)| c.node == node)
            .map(|(id, _)| *id)
    }

    /// Lets a command of `node` on connection `conn` through, or fails it: the connection
    /// was closed (as a client's would after QUIT), the node is disconnected, or an injected
    /// failure is left for it.
    fn admit(
        &mut self,
        conn: u64,
        node: &str,
        command: &'static str,
    ) -> Result<(), TransportError> {
        *self.commands.entry(command).or_default() += 1;
        let fail = |reason: &str| {
            Err(TransportError::Command {
                command,
                reason: reason.into(),
            })
        };
        if !self.conns.contains_key(&conn) {
            return fail("the connection is closed");
        }
        if self.disconnected.contains(node) {
            return fail("connection lost (in-memory broker: disconnected)");
        }
        if let Some(left) = self.failing.get_mut(node) {
            *left -= 1;
            if *left == 0 {
                self.failing.remove(node);
            }
            return fail("injected failure (in-memory broker)");
        }
        Ok(())
    }
}

impl Broker {
    /// A new, empty broker.
    ///
    /// ```
    /// let broker = clouds_core::testing::Broker::new();
    /// let config = broker.config();
    /// ```
    pub fn new() -> Broker {
        Broker::default()
    }

    /// A default [`Config`](crate::Config) whose nodes connect to this broker; customise it like
    /// any other.
    ///
    /// ```
    /// let broker = clouds_core::testing::Broker::new();
    /// let config = broker.config().retries(2).namespace("orders");
    /// ```
    pub fn config(&self) -> crate::Config {
        crate::Config::default().broker(self)
    }

    /// Stops delivering to `node`: frames published to it are counted as received and held,
    /// as if the node had stopped reading, until [`Broker::thaw`].
    ///
    /// ```
    /// # fn demo(broker: clouds_core::testing::Broker, server: clouds_core::Server) {
    /// broker.freeze(server.id());
    /// // ... calls to it now time out ...
    /// broker.thaw(server.id());
    /// # }
    /// ```
    pub fn freeze(&self, node: impl AsRef<str>) {
        lock(&self.state).frozen.insert(node.as_ref().to_string());
    }

    /// Delivers what was held for `node`, in order, and resumes delivering.
    ///
    /// ```
    /// # fn demo(broker: clouds_core::testing::Broker, server: clouds_core::Server) {
    /// broker.thaw(server.id());
    /// # }
    /// ```
    pub fn thaw(&self, node: impl AsRef<str>) {
        let node = node.as_ref();
        let mut state = lock(&self.state);
        state.frozen.remove(node);
        let ids: Vec<u64> = state.conns_of(node).collect();
        for id in ids {
            if let Some(conn) = state.conns.get_mut(&id) {
                while let Some(delivery) = conn.held.pop_front() {
                    let _ = conn.tx.send(delivery);
                }
            }
        }
    }

    /// [`Broker::freeze`] for `node`, then [`Broker::thaw`] after `duration` (on tokio's clock:
    /// call it inside a runtime).
    ///
    /// ```
    /// # async fn demo(broker: clouds_core::testing::Broker, server: clouds_core::Server) {
    /// broker.stall(server.id(), std::time::Duration::from_millis(300));
    /// # }
    /// ```
    pub fn stall(&self, node: impl AsRef<str>, duration: Duration) {
        let node = node.as_ref().to_string();
        self.freeze(&node);
        let broker = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            broker.thaw(&node);
        });
    }

    /// Makes `node`'s connections lose every subscription at once, silently: publishers see
    /// nobody listening there (as after a subscriber connection that never resubscribed).
    ///
    /// ```
    /// # async fn demo(broker: clouds_core::testing::Broker, server: clouds_core::Server) {
    /// broker.drop_subscriptions(server.id());
    /// // calls to it now find nobody and are re-routed at once
    /// # }
    /// ```
    pub fn drop_subscriptions(&self, node: impl AsRef<str>) {
        let mut state = lock(&self.state);
        let ids: Vec<u64> = state.conns_of(node.as_ref()).collect();
        for id in ids {
            let channels = match state.conns.get(&id) {
                Some(conn) => conn.subscriptions.clone(),
                None => continue,
            };
            for channel in channels {
                unsubscribe(&mut state, &channel, id);
            }
        }
    }

    /// Cuts `node`'s connections: it receives nothing and its commands fail at once until
    /// [`Broker::reconnect`] (over Redis they would wait for the reconnect and time out: a
    /// caller sees `Error::Redis` here where Redis gives `Error::Timeout`). Its subscriptions
    /// are kept for the reconnect, as the Redis transport restores them.
    ///
    /// ```
    /// # fn demo(broker: clouds_core::testing::Broker, server: clouds_core::Server) {
    /// broker.disconnect(server.id());
    /// broker.reconnect(server.id());
    /// # }
    /// ```
    pub fn disconnect(&self, node: impl AsRef<str>) {
        lock(&self.state)
            .disconnected
            .insert(node.as_ref().to_string());
    }

    /// Restores `node`'s connections and subscriptions, and tells the node it reconnected
    /// (it then renews its registry entry and re-reads its providers, as over Redis).
    ///
    /// ```
    /// # fn demo(broker: clouds_core::testing::Broker, server: clouds_core::Server) {
    /// broker.reconnect(server.id());
    /// # }
    /// ```
    pub fn reconnect(&self, node: impl AsRef<str>) {
        let node = node.as_ref();
        let mut state = lock(&self.state);
        state.disconnected.remove(node);
        let ids: Vec<u64> = state.conns_of(node).collect();
        for id in ids {
            // Subscriptions come back with the connection, as the Redis transport restores
            // them after every reconnect.
            let wanted = state
                .conns
                .get(&id)
                .map(|c| c.subscriptions.clone())
                .unwrap_or_default();
            for channel in wanted {
                state.channels.entry(channel).or_default().insert(id);
            }
            if let Some(conn) = state.conns.get(&id) {
                let _ = conn.reconnected.send(());
            }
        }
    }

    /// Makes `node`'s next `count` commands (publish, subscribe, registry reads and writes,
    /// on any of its connections: a heartbeat can take one) fail with
    /// [`TransportError::Command`].
    ///
    /// ```
    /// # fn demo(broker: clouds_core::testing::Broker, client: clouds_core::Client) {
    /// broker.fail_commands(client.id(), 1);
    /// # }
    /// ```
    pub fn fail_commands(&self, node: impl AsRef<str>, count: u32) {
        if count > 0 {
            *lock(&self.state)
                .failing
                .entry(node.as_ref().to_string())
                .or_default() += count;
        }
    }

    /// Applies `fault` to the next frame delivered to `node`, on any of its channels (its
    /// inbox, its call channel or the events channel: a join announcement can take a fault
    /// meant for a call). Faults queue up in order. A delayed frame is overtaken by frames
    /// published after it, which Redis never does on one connection: use it to test code
    /// that must survive reordering.
    ///
    /// ```
    /// # fn demo(broker: clouds_core::testing::Broker, server: clouds_core::Server) {
    /// use clouds_core::testing::FrameFault;
    /// broker.fault_next_frame(server.id(), FrameFault::Duplicate);
    /// # }
    /// ```
    pub fn fault_next_frame(&self, node: impl AsRef<str>, fault: FrameFault) {
        lock(&self.state)
            .frame_faults
            .entry(node.as_ref().to_string())
            .or_default()
            .push_back(fault);
    }

    /// Makes `node`'s next registry command (a heartbeat, a lookup, a deregistration) take
    /// `delay` before it is applied, as a slow round trip to Redis would (delays queue up in
    /// order). Commands sent meanwhile by other nodes, or on its other connections, overtake it.
    ///
    /// ```
    /// # fn demo(broker: clouds_core::testing::Broker, server: clouds_core::Server) {
    /// broker.delay_next_command(server.id(), std::time::Duration::from_millis(100));
    /// # }
    /// ```
    pub fn delay_next_command(&self, node: impl AsRef<str>, delay: Duration) {
        lock(&self.state)
            .slow
            .entry(node.as_ref().to_string())
            .or_default()
            .push_back(delay);
    }

    /// Lists `node` as a provider of `method` in the registry of `config`'s deployment for
    /// `ttl`, as a stale entry would (a server restarted without that method, a deployment
    /// that went wrong): callers then send it calls whether it serves `method` or not, and
    /// its answer is `UnknownMethod`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), clouds_core::Error> {
    /// let broker = clouds_core::testing::Broker::new();
    /// let server = clouds_core::Server::start(broker.config()).await?;
    /// broker.stale_entry(&broker.config(), "math.gone", server.id(), std::time::Duration::from_secs(60));
    /// let client = clouds_core::Client::connect(broker.config()).await?;
    /// let answer = client.call::<_, i64>("math.gone", (1,)).await;
    /// assert!(matches!(answer, Err(clouds_core::Error::UnknownMethod { .. })));
    /// # Ok(()) }
    /// ```
    pub fn stale_entry(
        &self,
        config: &crate::Config,
        method: &str,
        node: impl AsRef<str>,
        ttl: Duration,
    ) {
        let scope = Names::new(config).scope().to_string();
        let mut state = lock(&self.state);
        let registry = state.registries.entry(scope).or_default();
        let expiry = Instant::now()
            .checked_add(ttl)
            .unwrap_or(Instant::now() + FAR_FUTURE);
        registry.provide(method, node.as_ref(), expiry);
    }

    /// The keys holding claims (large bodies waiting for their receiver) now, expired ones
    /// left out: a test that all its calls ended can check that none is left behind.
    ///
    /// ```
    /// let broker = clouds_core::testing::Broker::new();
    /// assert!(broker.claims().is_empty());
    /// ```
    pub fn claims(&self) -> Vec<String> {
        self.live_keys(":claim:")
    }

    /// The keys alive now whose names contain `part`, sorted (expired ones are dropped).
    fn live_keys(&self, part: &str) -> Vec<String> {
        let now = Instant::now();
        let mut state = lock(&self.state);
        state.keys.retain(|_, (_, expiry)| *expiry > now);
        let mut keys: Vec<String> = state
            .keys
            .keys()
            .filter(|key| key.contains(part))
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// How many commands named `command` (`"PUBLISH"`, `"SET"`, `"GETDEL"`, `"EVALSHA"` for the
    /// registry's scripts, `"ONCE_BEGIN"` and `"ONCE_SWAP"` for the exactly-once scripts, ...)
    /// nodes have sent to this broker so far, failed ones included: a test can check that
    /// something costs no extra command.
    ///
    /// ```
    /// let broker = clouds_core::testing::Broker::new();
    /// assert_eq!(broker.commands("PUBLISH"), 0);
    /// ```
    pub fn commands(&self, command: &str) -> u64 {
        lock(&self.state)
            .commands
            .get(command)
            .copied()
            .unwrap_or(0)
    }

    /// The keys holding exactly-once records (`Route::once`) now, expired ones left out:
    /// each lives for its server's `once_window` after its call ran.
    ///
    /// ```
    /// let broker = clouds_core::testing::Broker::new();
    /// assert!(broker.once_records().is_empty());
    /// ```
    pub fn once_records(&self) -> Vec<String> {
        self.live_keys(":once:")
    }

    /// Deletes every claim now, as if each had expired before its receiver fetched it.
    ///
    /// ```
    /// # fn demo(broker: clouds_core::testing::Broker, server: clouds_core::Server) {
    /// broker.freeze(server.id());
    /// // ... a large call is sent: its body waits in a claim ...
    /// broker.lose_claims();
    /// broker.thaw(server.id()); // the call fails with `Error::ClaimLost`
    /// # }
    /// ```
    pub fn lose_claims(&self) {
        lock(&self.state)
            .keys
            .retain(|key, _| !key.contains(":claim:"));
    }

    /// How many connections are subscribed to `channel` right now.
    ///
    /// ```
    /// let broker = clouds_core::testing::Broker::new();
    /// assert_eq!(broker.subscribers("clouds:0:events"), 0);
    /// ```
    pub fn subscribers(&self, channel: &str) -> usize {
        lock(&self.state)
            .channels
            .get(channel)
            .map_or(0, |s| s.len())
    }

    /// A connection for node `id`.
    pub(crate) fn connect(
        &self,
        names: &Names,
        id: &NodeId,
        options: &clouds_redis::TransportOptions,
    ) -> Result<MemoryWire, TransportError> {
        // Sized as fred sizes the subscriber's channel (tokio rounds it up to a power of two).
        let (tx, _) = broadcast::channel(options.inbound_capacity.max(16));
        let (reconnected, _) = broadcast::channel(16);
        let mut state = lock(&self.state);
        let conn = state.next_conn;
        state.next_conn += 1;
        state.conns.insert(
            conn,
            Conn {
                node: id.to_string(),
                tx,
                subscriptions: BTreeSet::new(),
                held: VecDeque::new(),
                reconnected,
            },
        );
        Ok(MemoryWire {
            broker: self.clone(),
            conn,
            node: id.to_string(),
            scope: names.scope().to_string(),
            events: names.events(),
            command_timeout: options.command_timeout,
        })
    }

    /// Removes connection `conn` and its subscriptions (closing it twice does nothing).
    fn disconnect_conn(&self, conn: u64) {
        let mut state = lock(&self.state);
        if let Some(removed) = state.conns.remove(&conn) {
            for channel in removed.subscriptions {
                unsubscribe(&mut state, &channel, conn);
            }
        }
    }

    /// Publishes on connection `conn` of `node`: how many connections received the frame.
    fn publish(
        &self,
        conn: u64,
        node: &str,
        channel: &str,
        frame: Bytes,
    ) -> Result<u64, TransportError> {
        let mut state = lock(&self.state);
        state.admit(conn, node, "PUBLISH")?;
        Ok(self.fan_out(&mut state, channel, frame))
    }

    /// Hands `frame` to every connection subscribed to `channel` (faults applied): how many
    /// received it. Under the caller's lock, so a registry change can publish with it.
    fn fan_out(&self, state: &mut State, channel: &str, frame: Bytes) -> u64 {
        let receivers: Vec<u64> = match state.channels.get(channel) {
            Some(subscribers) => subscribers
                .iter()
                .copied()
                .filter(|id| {
                    state
                        .conns
                        .get(id)
                        .is_some_and(|c| !state.disconnected.contains(&c.node))
                })
                .collect(),
            None => return 0,
        };
        let channel = Channel::from(channel);
        for &id in &receivers {
            let delivery = Delivery::Frame {
                channel: channel.clone(),
                payload: frame.clone(),
            };
            let target = state.conns.get(&id).map(|c| c.node.clone());
            let fault = target
                .as_ref()
                .and_then(|node| state.frame_faults.get_mut(node))
                .and_then(VecDeque::pop_front);
            match fault {
                None => state.deliver(id, delivery),
                Some(FrameFault::Drop) => {}
                Some(FrameFault::Duplicate) => {
                    state.deliver(id, delivery.clone());
                    state.deliver(id, delivery);
                }
                Some(FrameFault::Delay(after)) => {
                    let broker = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        lock(&broker.state).deliver(id, delivery);
                    });
                }
            }
        }
        receivers.len() as u64
    }
}

fn unsubscribe(state: &mut State, channel: &str, conn: u64) {
    if let Some(subscribers) = state.channels.get_mut(channel) {
        subscribers.remove(&conn);
        if subscribers.is_empty() {
            state.channels.remove(channel);
        }
    }
}

/// One node's connection to a [`Broker`].
pub(crate) struct MemoryWire {
    broker: Broker,
    conn: u64,
    node: String,
    /// The registry scope (`namespace:db`) this node reads and writes.
    scope: String,
    /// Where its registry changes announce themselves (join and leave frames).
    events: Channel,
    /// `Config::command_timeout`: what a slow registry command turns into a timeout after.
    command_timeout: Duration,
}

impl std::fmt::Debug for MemoryWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryWire")
            .field("node", &self.node)
            .field("conn", &self.conn)
            .finish()
    }
}

impl MemoryWire {
    /// Runs `f` on the registry of this node's scope, after the injected delay and failure,
    /// if any.
    async fn registry<T>(
        &self,
        command: &'static str,
        f: impl FnOnce(&mut Registry, Instant) -> T,
    ) -> Result<T, TransportError> {
        self.registry_announcing(command, |registry, now| (f(registry, now), None))
            .await
    }

    /// [`MemoryWire::registry`] for a change that may announce itself: the frame `f` returns
    /// is published on the events channel under the same lock, as the Lua scripts publish
    /// inside the script.
    async fn registry_announcing<T>(
        &self,
        command: &'static str,
        f: impl FnOnce(&mut Registry, Instant) -> (T, Option<Bytes>),
    ) -> Result<T, TransportError> {
        let delay = lock(&self.broker.state)
            .slow
            .get_mut(&self.node)
            .and_then(VecDeque::pop_front);
        if let Some(delay) = delay {
            // A reply slower than the command timeout is a timeout, as over Redis.
            if delay >= self.command_timeout {
                tokio::time::sleep(self.command_timeout).await;
                return Err(TransportError::Timeout {
                    command,
                    after: self.command_timeout,
                });
            }
            tokio::time::sleep(delay).await;
        }
        let mut state = lock(&self.broker.state);
        state.admit(self.conn, &self.node, command)?;
        let registry = state.registries.entry(self.scope.clone()).or_default();
        let (out, announcement) = f(registry, Instant::now());
        if let Some(frame) = announcement {
            self.broker.fan_out(&mut state, self.events.as_str(), frame);
        }
        Ok(out)
    }

    /// Subscribes or unsubscribes this connection.
    fn change(&self, channel: &Channel, subscribe: bool) -> Result<(), TransportError> {
        let mut state = lock(&self.broker.state);
        let command = if subscribe {
            "SUBSCRIBE"
        } else {
            "UNSUBSCRIBE"
        };
        state.admit(self.conn, &self.node, command)?;
        let Some(conn) = state.conns.get_mut(&self.conn) else {
            return Ok(()); // admitted: it is open
        };
        let name = channel.as_str().to_string();
        if subscribe {
            conn.subscriptions.insert(name.clone());
            state.channels.entry(name).or_default().insert(self.conn);
        } else {
            conn.subscriptions.remove(&name);
            unsubscribe(&mut state, &name, self.conn);
        }
        Ok(())
    }
}

impl Transport for MemoryWire {
    fn publish(
        &self,
        channel: Channel,
        frame: Bytes,
    ) -> impl Future<Output = Result<u64, TransportError>> + Send {
        // Nothing to wait for in memory: delivered (or not) before the future is polled.
        std::future::ready(
            self.broker
                .publish(self.conn, &self.node, channel.as_str(), frame),
        )
    }

    fn publish_untimed(
        &self,
        channel: Channel,
        frame: Bytes,
    ) -> impl Future<Output = Result<u64, TransportError>> + Send {
        self.publish(channel, frame)
    }

    async fn subscribe(&self, channel: &Channel) -> Result<(), TransportError> {
        self.change(channel, true)
    }

    async fn unsubscribe(&self, channel: &Channel) -> Result<(), TransportError> {
        self.change(channel, false)
    }

    async fn subscribers(&self, channel: &Channel) -> Result<u64, TransportError> {
        let mut state = lock(&self.broker.state);
        state.admit(self.conn, &self.node, "PUBSUB NUMSUB")?;
        Ok(state.channels.get(channel.as_str()).map_or(0, |s| s.len()) as u64)
    }

    async fn resubscribe(&self, channel: &Channel) -> Result<(), TransportError> {
        self.change(channel, true)
    }

    fn may_lose_subscriptions(&self) -> bool {
        true // `Broker::drop_subscriptions`
    }

    fn inbound(&self) -> Inbound {
        let rx = lock(&self.broker.state)
            .conns
            .get(&self.conn)
            .map(|c| c.tx.subscribe());
        Inbound::Memory(MemoryInbound { rx })
    }

    fn reconnects(&self) -> Reconnects {
        // The sender lives with the connection: once it is closed, this ends (`None`).
        let rx = match lock(&self.broker.state).conns.get(&self.conn) {
            Some(conn) => conn.reconnected.subscribe(),
            None => broadcast::channel(1).1,
        };
        Reconnects::Memory(rx)
    }

    async fn heartbeat(&self, entry: &Entry<'_>) -> Result<(), TransportError> {
        self.registry_announcing("EVALSHA", |registry, now| {
            registry.purge(now);
            let forced = entry.force_join.then(|| entry.join.clone());
            // As the Redis script does: a beat older than the entry's method list is ignored.
            let generation = |fields: &[(&str, String)]| -> Option<u64> {
                let (_, value) = fields.iter().find(|(k, _)| *k == "generation")?;
                value.parse().ok()
            };
            let seen = registry
                .nodes
                .get(entry.id.as_str())
                .and_then(|(_, fields)| {
                    let (_, value) = fields.iter().find(|(k, _)| &k[..] == b"generation")?;
                    std::str::from_utf8(value).ok()?.parse::<u64>().ok()
                });
            if let (Some(incoming), Some(seen)) = (generation(&entry.fields), seen)
                && incoming < seen
            {
                return ((), forced);
            }
            let expiry = now.checked_add(entry.ttl).unwrap_or(now + FAR_FUTURE);
            let fields = entry
                .fields
                .iter()
                .map(|(k, v)| (Bytes::from_static(k.as_bytes()), Bytes::from(v.clone())))
                .collect();
            registry
                .nodes
                .insert(entry.id.to_string(), (expiry, fields));
            let mut joined = false;
            for method in entry.methods {
                joined |= registry.provide(method, entry.id.as_str(), expiry);
            }
            ((), forced.or_else(|| joined.then(|| entry.join.clone())))
        })
        .await
    }

    async fn deregister(
        &self,
        id: &NodeId,
        methods: &[String],
        leave: Bytes,
    ) -> Result<(), TransportError> {
        self.registry_announcing("EVALSHA", |registry, _| {
            registry.nodes.remove(id.as_str());
            for method in methods {
                registry.withdraw(method, id.as_str());
            }
            ((), Some(leave))
        })
        .await
    }

    async fn providers(
        &self,
        methods: &[String],
        known: &[Option<u64>],
    ) -> Result<Vec<Lookup>, TransportError> {
        self.registry("EVALSHA", |registry, now| {
            registry.purge(now);
            methods
                .iter()
                .zip(known)
                .map(|(method, known)| registry.look_up(method, *known))
                .collect()
        })
        .await
    }

    async fn servers(&self) -> Result<Vec<(NodeId, Fields)>, TransportError> {
        self.registry("EVALSHA", |registry, now| {
            registry.purge(now);
            let ids = by_expiry(registry.nodes.iter().map(|(id, (e, _))| (id, e)));
            ids.into_iter()
                .filter_map(|id| {
                    let fields = registry.nodes.get(id.as_str())?.1.clone();
                    Some((id, fields))
                })
                .collect()
        })
        .await
    }

    async fn put(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), TransportError> {
        let mut state = lock(&self.broker.state);
        state.admit(self.conn, &self.node, "SET")?;
        let now = Instant::now();
        // Expired keys go on every write, so keys nobody takes cannot pile up.
        state.keys.retain(|_, (_, expiry)| *expiry > now);
        let expiry = now.checked_add(ttl).unwrap_or(now + FAR_FUTURE);
        state.keys.insert(key.to_string(), (value, expiry));
        Ok(())
    }

    async fn take(&self, key: &str) -> Result<Option<Bytes>, TransportError> {
        let mut state = lock(&self.broker.state);
        state.admit(self.conn, &self.node, "GETDEL")?;
        Ok(match state.keys.remove(key) {
            Some((value, expiry)) if expiry > Instant::now() => Some(value),
            _ => None,
        })
    }

    async fn delete(&self, key: &str) -> Result<(), TransportError> {
        let mut state = lock(&self.broker.state);
        state.admit(self.conn, &self.node, "DEL")?;
        state.keys.remove(key);
        Ok(())
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<Option<Bytes>, TransportError> {
        let mut state = lock(&self.broker.state);
        state.admit(self.conn, &self.node, "ONCE_BEGIN")?;
        let now = Instant::now();
        if let Some((value, expiry)) = state.keys.get(key)
            && *expiry > now
        {
            return Ok(Some(value.clone()));
        }
        let expiry = now.checked_add(ttl).unwrap_or(now + FAR_FUTURE);
        state.keys.insert(key.to_string(), (value, expiry));
        Ok(None)
    }

    async fn swap_if(
        &self,
        key: &str,
        expected: Bytes,
        new: Option<Bytes>,
        ttl: Duration,
    ) -> Result<bool, TransportError> {
        let mut state = lock(&self.broker.state);
        state.admit(self.conn, &self.node, "ONCE_SWAP")?;
        let now = Instant::now();
        let current = state
            .keys
            .get(key)
            .filter(|(_, expiry)| *expiry > now)
            .map(|(value, _)| value);
        if current != Some(&expected) {
            return Ok(false);
        }
        match new {
            Some(value) => {
                let expiry = now.checked_add(ttl).unwrap_or(now + FAR_FUTURE);
                state.keys.insert(key.to_string(), (value, expiry));
            }
            None => {
                state.keys.remove(key);
            }
        }
        Ok(true)
    }

    async fn close(&self) {
        self.broker.disconnect_conn(self.conn);
    }
}

impl Drop for MemoryWire {
    fn drop(&mut self) {
        self.broker.disconnect_conn(self.conn);
    }
}

/// The receive side of a [`MemoryWire`]; ends once the connection is closed.
pub(crate) struct MemoryInbound {
    rx: Option<broadcast::Receiver<Delivery>>,
}

impl MemoryInbound {
    pub(crate) async fn recv(&mut self) -> Option<Delivery> {
        use broadcast::error::RecvError;
        match self.rx.as_mut()?.recv().await {
            Ok(delivery) => Some(delivery),
            Err(RecvError::Lagged(n)) => Some(Delivery::Lagged(n)),
            Err(RecvError::Closed) => None,
        }
    }

    pub(crate) fn try_recv(&mut self) -> Option<Delivery> {
        use broadcast::error::TryRecvError;
        match self.rx.as_mut()?.try_recv() {
            Ok(delivery) => Some(delivery),
            Err(TryRecvError::Lagged(n)) => Some(Delivery::Lagged(n)),
            Err(TryRecvError::Empty | TryRecvError::Closed) => None,
        }
    }
}
