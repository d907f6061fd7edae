//! Unit tests of the runtime through its public API, on the in-memory broker under paused
//! time: no Redis, no real waiting.
//!
//! They use what applications use (`Server`, `Client`, `Monitor`, `Config`, `Error`, `Stats`,
//! `crate::testing`), so they keep holding while the internals change. The one exception is
//! [`RawPeer`]: a bare connection to the broker that crafts frames with `crate::codec`, for
//! what no well-behaved node ever sends (garbage, frames on the wrong channel, a provider that
//! answers `ShuttingDown`, a call with an expired deadline).

mod broker;
mod cancel;
mod claims;
mod client;
mod config;
mod heartbeat;
mod messages;
mod node;
mod once;
mod registry;
mod server;
mod signing;
mod stats;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::envelope::{Call, Frame, Status};
use crate::namespace::Names;
use crate::testing::Broker;
use crate::transport::memory::MemoryWire;
use crate::transport::{Channel, Delivery, Entry, Inbound, Lookup, Transport};
use crate::{Client, Config, NodeId, Server};

/// `n` milliseconds.
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The heartbeat of [`config`]; its TTL is three of them.
const HEARTBEAT: Duration = Duration::from_millis(100);
/// The TTL of [`config`].
const TTL: Duration = Duration::from_millis(300);
/// The per-attempt timeout of [`config`].
const TIMEOUT: Duration = Duration::from_millis(500);

/// A config on `broker`: heartbeat 100 ms (TTL 300 ms), timeout 500 ms, no retries.
fn config(broker: &Broker) -> Config {
    broker.config().heartbeat(HEARTBEAT).timeout(TIMEOUT)
}

/// A started server.
async fn server(config: Config) -> Server {
    Server::start(config).await.expect("server starts")
}

/// A connected client.
async fn client(config: Config) -> Client {
    Client::connect(config).await.expect("client connects")
}

/// Counts the calls a handler ran.
#[derive(Clone, Default)]
struct Counter(Arc<AtomicUsize>);

impl Counter {
    fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Registers `method` on `server`: it answers `name` at once, counting its calls.
async fn answer_name(server: &Server, method: &str, name: &'static str) -> Counter {
    let calls = Counter::default();
    let counter = calls.clone();
    server
        .register(method, move |(): ()| {
            counter.bump();
            async move { Ok::<_, Infallible>(name.to_string()) }
        })
        .await
        .expect("register");
    calls
}

/// Registers `method` on `server`: it sleeps its argument (ms, tokio's clock), then answers
/// `name`, counting its calls.
async fn nap(server: &Server, method: &str, name: &'static str) -> Counter {
    let calls = Counter::default();
    let counter = calls.clone();
    server
        .register(method, move |(millis,): (u64,)| {
            counter.bump();
            async move {
                tokio::time::sleep(ms(millis)).await;
                Ok::<_, Infallible>(name.to_string())
            }
        })
        .await
        .expect("register");
    calls
}

/// Polls `check` on tokio's clock until it holds, for at most `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(ms(5)).await;
    }
}

/// Asserts that `elapsed` (tokio's clock) is `expected`, give or take the timer's resolution.
#[track_caller]
fn about(elapsed: Duration, expected: Duration) {
    assert!(
        elapsed >= expected && elapsed < expected + ms(5),
        "took {elapsed:?}, expected {expected:?}"
    );
}

/// Lets every node's loops handle what has been delivered so far (1 ms of paused time).
async fn settle() {
    tokio::time::sleep(ms(1)).await;
}

/// A bare connection to a broker, outside any node: publishes crafted frames, reads what
/// arrives on the channels it subscribes, and can pose as a provider in the registry.
struct RawPeer {
    id: NodeId,
    names: Names,
    wire: MemoryWire,
    inbound: Inbound,
}

impl RawPeer {
    /// A raw connection to `broker` in the deployment of `config`, buffering at most
    /// `capacity` undelivered frames.
    fn connect(broker: &Broker, config: &Config, capacity: usize) -> RawPeer {
        static SEQ: AtomicU64 = AtomicU64::new(1);
        let id = NodeId::from(format!("raw-{}", SEQ.fetch_add(1, Ordering::Relaxed)));
        let names = Names::new(config);
        let mut options = clouds_redis::TransportOptions::default();
        options.inbound_capacity = capacity;
        let wire = broker.connect(&names, &id, &options).expect("raw connect");
        let inbound = wire.inbound();
        RawPeer {
            id,
            names,
            wire,
            inbound,
        }
    }

    /// `node`'s inbox channel in this deployment.
    fn inbox(&self, node: &str) -> Channel {
        self.names.inbox(node)
    }

    /// `node`'s call channel in this deployment.
    fn calls(&self, node: &str) -> Channel {
        self.names.calls(node)
    }

    async fn subscribe(&self, channel: &Channel) {
        self.wire.subscribe(channel).await.expect("raw subscribe");
    }

    /// Publishes `frame` on `channel`: how many connections received it.
    async fn publish(&self, channel: Channel, frame: impl Into<Bytes>) -> u64 {
        self.wire
            .publish(channel, frame.into())
            .await
            .expect("raw publish")
    }

    async fn unsubscribe(&self, channel: &Channel) {
        self.wire
            .unsubscribe(channel)
            .await
            .expect("raw unsubscribe");
    }

    /// Closes the connection: it receives nothing more.
    async fn close(&self) {
        self.wire.close().await;
    }

    /// The events channel of this deployment (join and leave announcements).
    fn events(&self) -> Channel {
        self.names.events()
    }

    /// Poses as a provider of `methods` (as node `id`) in the registry for `ttl`, with every
    /// info field a real server writes.
    async fn register_as(&self, id: &NodeId, methods: &[&str], ttl: Duration) {
        let joined = methods.join("\n");
        let fields = vec![
            ("id", id.to_string()),
            ("host", "raw-host".to_string()),
            ("pid", "1".to_string()),
            ("started_at_ms", "0".to_string()),
            ("in_flight", "0".to_string()),
            ("protocol", "1".to_string()),
            ("methods", joined),
        ];
        self.register_with_fields(id, methods, ttl, fields).await;
    }

    /// Writes a registry entry for `id` with exactly these info `fields`.
    async fn register_with_fields(
        &self,
        id: &NodeId,
        methods: &[&str],
        ttl: Duration,
        fields: Vec<(&'static str, String)>,
    ) {
        let methods: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
        let entry = Entry {
            id,
            ttl,
            methods: &methods,
            fields,
            join: crate::codec::encode_join(id.as_str(), &methods).into(),
            force_join: false,
        };
        self.wire.heartbeat(&entry).await.expect("raw heartbeat");
    }

    /// Removes `id`'s registry entry for `methods`.
    async fn deregister(&self, id: &NodeId, methods: &[&str]) {
        let methods: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
        let leave = crate::codec::encode_leave(id.as_str());
        self.wire
            .deregister(id, &methods, leave.into())
            .await
            .expect("raw deregister");
    }

    /// The live providers of each of `methods`, as the registry lists them.
    async fn providers(&self, methods: &[&str]) -> Vec<Vec<NodeId>> {
        let known = vec![None; methods.len()];
        self.providers_since(methods, &known)
            .await
            .into_iter()
            .map(|found| match found {
                Lookup::Changed { providers, .. } => providers,
                Lookup::Unchanged => panic!("a lookup of no generation was unchanged"),
            })
            .collect()
    }

    /// What a caller holding generation `known[i]` of `methods[i]` learns from the registry.
    async fn providers_since(&self, methods: &[&str], known: &[Option<u64>]) -> Vec<Lookup> {
        let methods: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
        self.wire
            .providers(&methods, known)
            .await
            .expect("raw providers")
    }

    /// The live servers' ids, as the registry lists them.
    async fn servers(&self) -> Vec<NodeId> {
        let servers = self.wire.servers().await.expect("raw servers");
        servers.into_iter().map(|(id, _)| id).collect()
    }

    /// Takes calls on its own call channel and lists itself as a provider of `methods`.
    async fn provide(&self, methods: &[&str]) {
        self.subscribe(&self.calls(self.id.as_str())).await;
        self.register_as(&self.id.clone(), methods, Duration::from_secs(3600))
            .await;
    }

    /// The next delivery, waiting at most 10 s of tokio's clock.
    async fn recv(&mut self) -> Delivery {
        tokio::time::timeout(Duration::from_secs(10), self.inbound.recv())
            .await
            .expect("a delivery within 10 s")
            .expect("the raw connection is open")
    }

    /// A delivery that has already arrived.
    fn try_recv(&mut self) -> Option<Delivery> {
        self.inbound.try_recv()
    }

    /// The next frame, decoded.
    async fn next_frame(&mut self) -> Frame {
        match self.recv().await {
            Delivery::Frame { payload, .. } => {
                crate::codec::decode(&payload).expect("a valid frame")
            }
            Delivery::Lagged(n) => panic!("unexpected lag of {n} frames"),
        }
    }

    /// The next call delivered.
    async fn next_call(&mut self) -> Call {
        match self.next_frame().await {
            Frame::Call(call) => call,
            other => panic!("expected a call, got {other:?}"),
        }
    }

    /// Answers `call` with `status` and the encoded `body`.
    async fn answer(&self, call: &Call, status: Status, body: &[u8]) -> u64 {
        let frame = crate::codec::encode_reply(call.id, status, body);
        self.publish(self.inbox(call.reply_to.as_str()), frame)
            .await
    }
}

/// The MessagePack encoding of `value`.
fn encoded<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    crate::codec::encode_value(value).expect("encode")
}

/// A call frame for `method` from `from`, with `deadline_ms` and `args`.
fn call_frame<A: serde::Serialize>(
    id: u64,
    method: &str,
    from: &str,
    deadline_ms: u64,
    args: &A,
) -> Vec<u8> {
    crate::codec::encode_call(id, method, from, deadline_ms, args).expect("encode a call")
}
