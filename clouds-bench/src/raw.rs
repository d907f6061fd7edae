//! The floor: the same round trip with fred alone, no clouds.
//!
//! A raw server subscribes to a request channel and republishes every frame, unchanged, to a
//! reply channel. A raw client publishes `[id: u64 LE][op: u8][payload]` and waits for the frame
//! with its id to come back. Connections are set up as clouds sets up its own (TCP_NODELAY, the
//! same broadcast capacity and command timeout), and the client uses two connections
//! (commands and subscriber) as a clouds node does.
//!
//! On a Redis Cluster (a `redis-cluster://` URL) the same round trip uses sharded pub/sub:
//! `SSUBSCRIBE` and `SPUBLISH` through fred's cluster client, which sends each to the primary
//! that owns the channel's slot. Every channel is its own name, with no hash tag, so the
//! channels fall on different slots (`cluster.rs` picks names that give each server's request
//! channel a primary of its own).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::config::ReconnectPolicy;
use fred::types::{Builder, Value};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{broadcast, oneshot};

use crate::load::Caller;

/// Bytes in front of the payload: the call id (u64, little endian) and the operation.
pub(crate) const HEADER: usize = 9;

/// Republish the frame at once.
const OP_ECHO: u8 = 0;
/// Hold the frame until a release of its round (the payload's first 4 bytes, little endian).
const OP_HOLD: u8 = 1;
/// Republish every held frame of this round or earlier, then this one.
const OP_RELEASE: u8 = 2;

/// Longest a raw server holds a frame, whatever happens.
const MAX_HOLD: Duration = Duration::from_secs(60);

/// The channels of one raw client and the servers it talks to.
#[derive(Debug, Clone)]
pub(crate) struct Channels {
    /// One request channel per server; the client spreads calls round-robin over them.
    pub(crate) requests: Vec<String>,
    /// Where every server republishes to.
    pub(crate) reply: String,
}

impl Channels {
    /// `servers` request channels and one reply channel, all under `prefix`.
    pub(crate) fn new(prefix: &str, servers: usize) -> Channels {
        Channels {
            requests: (0..servers).map(|i| format!("{prefix}:req:{i}")).collect(),
            reply: format!("{prefix}:reply"),
        }
    }
}

/// Attempts per command on a cluster: fred counts every `MOVED` or `ASK` resend as an
/// attempt, so one attempt (as on a single server) would fail any command sent while a slot
/// moves.
const CLUSTER_COMMAND_ATTEMPTS: u32 = 4;
/// Redirections a command may follow on a cluster.
const CLUSTER_REDIRECTIONS: u32 = 3;

/// A fred builder configured like clouds' transport; on a cluster, with the settings that
/// survive a change of topology (more attempts, reconnecting forever).
fn builder(url: &str, timeout: Duration) -> Result<Builder, String> {
    let config = fred::types::config::Config::from_url(url).map_err(|e| e.to_string())?;
    let cluster = config.server.is_clustered();
    let mut builder = Builder::from_config(config);
    builder.with_connection_config(|c| {
        c.tcp.nodelay = Some(true);
        if cluster {
            c.max_command_attempts = CLUSTER_COMMAND_ATTEMPTS;
            c.max_redirections = CLUSTER_REDIRECTIONS;
        } else {
            c.max_command_attempts = 1;
        }
    });
    builder.with_performance_config(|p| {
        p.default_command_timeout = timeout;
        p.broadcast_channel_capacity = 16_384; // as a clouds subscriber (TransportOptions::inbound_capacity)
    });
    if cluster {
        // Never give up, 50 ms to 2 s apart, as clouds' transport.
        builder.set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
    }
    Ok(builder)
}

/// A command connection and a subscriber connection, and which pub/sub they use.
struct PubSub {
    commands: Client,
    subscriber: SubscriberClient,
    /// `SSUBSCRIBE`/`SPUBLISH` (a cluster) rather than `SUBSCRIBE`/`PUBLISH`.
    sharded: bool,
    /// On a cluster, re-subscribes after the subscriber reconnects (aborted on close).
    resubscriber: Option<tokio::task::JoinHandle<()>>,
    /// Print each connection's errors (aborted on close): raw has no retries, so a dropped
    /// connection shows only as calls with no reply, which this names.
    error_loggers: [tokio::task::JoinHandle<Result<(), fred::error::Error>>; 2],
}

impl PubSub {
    /// Connects both; sharded if `url` names a cluster.
    async fn connect(url: &str, timeout: Duration) -> Result<PubSub, String> {
        let builder = builder(url, timeout)?;
        let sharded = builder
            .get_config()
            .is_some_and(|c| c.server.is_clustered());
        let commands = builder.build().map_err(|e| e.to_string())?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| e.to_string())?;
        commands.init().await.map_err(|e| e.to_string())?;
        subscriber.init().await.map_err(|e| e.to_string())?;
        let resubscriber = sharded.then(|| subscriber.manage_subscriptions());
        let log = |connection: &'static str| {
            move |(error, server): (fred::error::Error, Option<fred::types::config::Server>)| async move {
                let server = server.map_or_else(String::new, |s| format!(" ({s})"));
                eprintln!(
                    "raw (pid {}): {connection} connection error{server}: {error}",
                    std::process::id()
                );
                Ok(())
            }
        };
        let error_loggers = [
            commands.on_error(log("command")),
            subscriber.on_error(log("subscriber")),
        ];
        Ok(PubSub {
            commands,
            subscriber,
            sharded,
            resubscriber,
            error_loggers,
        })
    }

    /// `SUBSCRIBE channel`, or `SSUBSCRIBE` on a cluster.
    async fn subscribe(&self, channel: &str) -> Result<(), String> {
        let subscribed = if self.sharded {
            self.subscriber.ssubscribe(channel).await
        } else {
            self.subscriber.subscribe(channel).await
        };
        subscribed.map_err(|e| e.to_string())
    }

    /// The name of the publishing command, for errors.
    fn publish_command(&self) -> &'static str {
        if self.sharded { "SPUBLISH" } else { "PUBLISH" }
    }

    /// Closes both connections.
    async fn quit(&self) {
        if let Some(resubscriber) = &self.resubscriber {
            resubscriber.abort();
        }
        // Quitting is not an error to report.
        self.error_loggers.iter().for_each(|l| l.abort());
        let _ = self.subscriber.quit().await;
        let _ = self.commands.quit().await;
    }
}

impl Drop for PubSub {
    fn drop(&mut self) {
        if let Some(resubscriber) = &self.resubscriber {
            resubscriber.abort();
        }
        self.error_loggers.iter().for_each(|l| l.abort());
    }
}

/// A raw server: republishes what arrives on one request channel to the reply channel.
pub(crate) struct RawServer {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawServer {
    /// Subscribes to `request` and starts republishing to `reply`.
    pub(crate) async fn start(url: &str, request: &str, reply: &str) -> Result<RawServer, String> {
        let pubsub = PubSub::connect(url, Duration::from_secs(10)).await?;
        // Take the receiver before subscribing, so nothing is missed.
        let rx = pubsub.subscriber.message_rx();
        pubsub.subscribe(request).await?;
        let (stop, stopped) = oneshot::channel();
        let reply = reply.to_string();
        let task = tokio::spawn(async move {
            serve(&pubsub, rx, &reply, stopped).await;
            pubsub.quit().await;
        });
        Ok(RawServer {
            stop: Some(stop),
            task,
        })
    }

    /// Stops serving and closes the connections.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The server loop: no task per frame; publishes are pipelined on the command connection
/// (fred writes each as soon as it is polled) and awaited together.
async fn serve(
    pubsub: &PubSub,
    mut rx: broadcast::Receiver<fred::types::Message>,
    reply: &str,
    mut stop: oneshot::Receiver<()>,
) {
    // PUBLISH or SPUBLISH written out at each call site rather than behind an async fn of
    // `PubSub`: a wrapper's future would add its own state to every call's future.
    let publish = |frame: Bytes| async move {
        let published: Result<i64, _> = if pubsub.sharded {
            pubsub.commands.spublish(reply, Value::Bytes(frame)).await
        } else {
            pubsub.commands.publish(reply, Value::Bytes(frame)).await
        };
        if let Err(e) = published {
            eprintln!("raw server: {} failed: {e}", pubsub.publish_command());
        }
    };
    let mut sends = FuturesUnordered::new();
    let mut held: Vec<Bytes> = Vec::new();
    let mut released = 0u32;
    let mut hold_until = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(()) = sends.next(), if !sends.is_empty() => {}
            _ = tokio::time::sleep_until(hold_until), if !held.is_empty() => {
                sends.extend(held.drain(..).map(publish));
            }
            message = rx.recv() => match message {
                Ok(message) => {
                    let frame = message.value.into_bytes().unwrap_or_default();
                    match frame.get(HEADER - 1).copied() {
                        Some(OP_HOLD) if round(&frame) > released => {
                            if held.is_empty() {
                                hold_until = tokio::time::Instant::now() + MAX_HOLD;
                            }
                            held.push(frame);
                        }
                        Some(OP_RELEASE) => {
                            released = released.max(round(&frame));
                            sends.extend(held.drain(..).map(publish));
                            sends.push(publish(frame));
                        }
                        Some(_) => sends.push(publish(frame)),
                        None => eprintln!("raw server: dropped a {}-byte frame", frame.len()),
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("raw server: fell behind, {n} frames lost");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    while sends.next().await.is_some() {}
}

/// The round a hold or release frame is about (0 when the payload is too short).
fn round(frame: &[u8]) -> u32 {
    frame
        .get(HEADER..HEADER + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// Runs a raw server until stdin closes (the `--raw-server` child role).
pub(crate) async fn serve_until_parent_gone(
    url: &str,
    request: &str,
    reply: &str,
) -> Result<(), String> {
    let server = RawServer::start(url, request, reply).await?;
    println!("ready {request}");
    crate::procs::parent_gone().await;
    server.stop().await;
    Ok(())
}

type Waiting = Mutex<HashMap<u64, oneshot::Sender<Bytes>>>;

/// A raw client: publishes frames round-robin to the servers' request channels and matches
/// replies by id.
#[derive(Clone)]
pub(crate) struct RawClient {
    inner: Arc<Inner>,
}

struct Inner {
    pubsub: PubSub,
    waiting: Arc<Waiting>,
    next_id: AtomicU64,
    next_server: AtomicUsize,
    requests: Vec<String>,
    timeout: Duration,
    receiver: tokio::task::JoinHandle<()>,
}

impl RawClient {
    /// Connects, subscribes to the reply channel and starts matching replies.
    pub(crate) async fn connect(
        url: &str,
        channels: &Channels,
        timeout: Duration,
    ) -> Result<RawClient, String> {
        let pubsub = PubSub::connect(url, timeout).await?;
        let mut rx = pubsub.subscriber.message_rx();
        pubsub.subscribe(&channels.reply).await?;
        let waiting: Arc<Waiting> = Arc::default();
        let table = waiting.clone();
        let receiver = tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(message) => {
                        let frame = message.value.into_bytes().unwrap_or_default();
                        let Some(id) = frame.get(..8).and_then(|b| b.try_into().ok()) else {
                            continue;
                        };
                        let tx = lock(&table).remove(&u64::from_le_bytes(id));
                        if let Some(tx) = tx {
                            let _ = tx.send(frame);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        eprintln!("raw client: fell behind, {n} replies lost");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Ok(RawClient {
            inner: Arc::new(Inner {
                pubsub,
                waiting,
                next_id: AtomicU64::new(0),
                next_server: AtomicUsize::new(0),
                requests: channels.requests.clone(),
                timeout,
                receiver,
            }),
        })
    }

    /// Calls waiting for their reply right now.
    pub(crate) fn waiting(&self) -> usize {
        lock(&self.inner.waiting).len()
    }

    /// One round trip through the next server; returns the reply frame.
    async fn round_trip(&self, op: u8, payload: &[u8], server: usize) -> Result<Bytes, String> {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = BytesMut::with_capacity(HEADER + payload.len());
        frame.put_u64_le(id);
        frame.put_u8(op);
        frame.put_slice(payload);
        let (tx, rx) = oneshot::channel();
        lock(&inner.waiting).insert(id, tx);
        let _slot = Slot {
            table: &inner.waiting,
            id,
        };
        let channel = &inner.requests[server % inner.requests.len()];
        // Written out rather than behind an async fn of `PubSub`, whose future would add its
        // own state to every call's future (the memory row reports its size).
        let published: Result<i64, _> = if inner.pubsub.sharded {
            (inner.pubsub.commands)
                .spublish(channel.as_str(), Value::Bytes(frame.freeze()))
                .await
        } else {
            (inner.pubsub.commands)
                .publish(channel.as_str(), Value::Bytes(frame.freeze()))
                .await
        };
        let receivers =
            published.map_err(|e| format!("{}: {e}", inner.pubsub.publish_command()))?;
        if receivers == 0 {
            return Err(format!("nobody listens on {channel}"));
        }
        match tokio::time::timeout(inner.timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err("reply channel closed".into()),
            Err(_) => Err(format!("no reply within {:?}", inner.timeout)),
        }
    }

    fn pick(&self) -> usize {
        self.inner.next_server.fetch_add(1, Ordering::Relaxed)
    }

    /// A call the servers hold until [`RawClient::release`] of `round` (the RSS measurement).
    pub(crate) async fn hold(&self, round: u32, payload: &[u8]) -> Result<(), String> {
        let mut payload = payload.to_vec();
        if let Some(head) = payload.get_mut(..4) {
            head.copy_from_slice(&round.to_le_bytes());
        }
        self.round_trip(OP_HOLD, &payload, self.pick()).await?;
        Ok(())
    }

    /// Releases the held calls of `round` on every server.
    pub(crate) async fn release(&self, round: u32) -> Result<(), String> {
        for server in 0..self.inner.requests.len() {
            self.round_trip(OP_RELEASE, &round.to_le_bytes(), server)
                .await?;
        }
        Ok(())
    }

    /// Closes both connections.
    pub(crate) async fn close(&self) {
        self.inner.receiver.abort();
        self.inner.pubsub.quit().await;
    }
}

impl Caller for RawClient {
    async fn call(&self, payload: &[u8]) -> Result<(), String> {
        let reply = self.round_trip(OP_ECHO, payload, self.pick()).await?;
        if reply.len() != HEADER + payload.len() {
            return Err(format!(
                "echo of {} bytes came back with {}",
                payload.len(),
                reply.len().saturating_sub(HEADER)
            ));
        }
        Ok(())
    }
}

/// Removes a call's entry from the waiting table when the call ends, however it ends.
struct Slot<'a> {
    table: &'a Waiting,
    id: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        lock(self.table).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
