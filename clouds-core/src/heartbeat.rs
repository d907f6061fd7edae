//! A server's heartbeat: renews its registry entry every period and right after a reconnect
//! (which also restores the entry after a Redis restart).
//!
//! Over Redis it runs on its own thread, with its own single-threaded runtime and its own
//! connection: handlers that block every worker thread of the application's runtime cannot
//! starve it, so a busy server is never declared dead. On an in-memory broker it runs as a task
//! of the node, so a test that pauses tokio's clock pauses the heartbeat too.
//!
//! The registration that adds methods and the heartbeat loop both write the entry, on different
//! connections, so an older method list could land after a newer one and shrink the node
//! hash's `methods` (what the monitor reads) below the method sets (what callers read). Each
//! beat therefore carries the generation of its method list, and the registry ignores a beat
//! older than the entry it would overwrite. (A lock between the writers would tie the
//! heartbeat thread to the application's runtime, which it exists to be free of.)

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::node::Node;
use crate::registry::Announcement;
use crate::transport::{Reconnects, Transport, Wire};

/// What the heartbeat announces; shared with `Server` which adds methods.
#[derive(Debug)]
pub(crate) struct Advert {
    /// The methods, and their generation: how many times methods were added. A beat carries
    /// the generation it read, and the registry ignores a beat older than the entry's.
    methods: Mutex<(u64, Vec<String>)>,
    /// When the server started, by its own clock (ms since the Unix epoch).
    started_at_ms: u64,
    /// Set once shutdown has begun.
    draining: std::sync::atomic::AtomicBool,
}

impl Advert {
    /// What a server that starts now announces: no methods yet.
    pub(crate) fn new() -> Self {
        let started_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Advert {
            methods: Mutex::default(),
            started_at_ms,
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Adds methods to what the next beat announces.
    pub(crate) fn add(&self, methods: &[String]) {
        let mut current = crate::locks::lock(&self.methods);
        current.0 += 1;
        current.1.extend(methods.iter().cloned());
    }

    /// The methods and their generation, read together.
    fn snapshot(&self) -> (u64, Vec<String>) {
        crate::locks::lock(&self.methods).clone()
    }

    /// From now on beats say the server is draining, and list it as a provider of nothing.
    pub(crate) fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn methods(&self) -> Vec<String> {
        crate::locks::lock(&self.methods).1.clone()
    }
}

/// Writes the entry once, through `wire`. Beats may overtake each other on the way (they go
/// on two connections); the registry keeps the one with the newest method list. The registry
/// publishes a join (all methods) with a beat that adds a method, and with every beat that
/// `announce`s.
pub(crate) async fn beat(
    node: &Node,
    wire: &Wire,
    advert: &Advert,
    announce: bool,
) -> Result<(), Error> {
    let (generation, methods) = advert.snapshot();
    let in_flight = node.in_flight();
    node.registry()
        .heartbeat(
            wire,
            &Announcement {
                id: node.id(),
                methods: &methods,
                generation,
                started_at_ms: advert.started_at_ms,
                in_flight,
                stats: node.stats_summary(),
                draining: advert.draining.load(std::sync::atomic::Ordering::Acquire),
                announce,
            },
        )
        .await
}

/// The heartbeat thread; stopping it waits for the thread to close its connection.
pub(crate) struct Heartbeat {
    stop: CancellationToken,
    /// Turns true once the thread has closed its connection, right before it ends (and is
    /// closed if the thread ends otherwise): what every `stop` waits for.
    finished: tokio::sync::watch::Receiver<bool>,
}

impl Heartbeat {
    /// Starts beating every heartbeat period until stopped (or until `node` is cancelled).
    ///
    /// The thread holds the node weakly: it must not be what keeps a dropped server's node
    /// (and its connections) alive.
    pub(crate) fn start(node: &Arc<Node>, advert: Arc<Advert>) -> Result<Heartbeat, Error> {
        let stop = node.life().child_token();
        let token = stop.clone();
        let node_reconnects = node.wire().reconnects();
        let weak = Arc::downgrade(node);
        let (finished_tx, finished) = tokio::sync::watch::channel(false);
        let beating = async move {
            run(weak, node_reconnects, advert, token).await;
            let _ = finished_tx.send(true);
        };
        if !node.wire().beats_on_own_thread() {
            node.life().spawn(beating);
            return Ok(Heartbeat { stop, finished });
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Io {
                action: "build the heartbeat runtime".into(),
                reason: e.to_string(),
            })?;
        std::thread::Builder::new()
            .name(format!("clouds-heartbeat-{}", node.id()))
            .spawn(move || runtime.block_on(beating))
            .map_err(|e| Error::Io {
                action: "start the heartbeat thread".into(),
                reason: e.to_string(),
            })?;
        Ok(Heartbeat { stop, finished })
    }

    /// Stops beating; once this returns, no more heartbeats are written. Cancel-safe: a stop
    /// cut short (its future dropped) leaves the next one something to wait for.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let mut finished = self.finished.clone();
        // An error means the thread is gone without saying so (it panicked): stopped too.
        let _ = finished.wait_for(|done| *done).await;
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        // Dropped without `stop()` (the server was dropped): the thread sees the token, closes
        // its own connection and ends.
        self.stop.cancel();
    }
}

async fn run(
    node: Weak<Node>,
    mut node_reconnects: Reconnects,
    advert: Arc<Advert>,
    stop: CancellationToken,
) {
    let Some((config, id, names)) = node
        .upgrade()
        .map(|n| (n.config().clone(), n.id().clone(), n.names().clone()))
    else {
        return;
    };
    let period = config.heartbeat;
    let retry = (period / 4).max(Duration::from_millis(10));
    // Its own connection, driven by this thread's runtime. It subscribes to nothing, so its
    // subscriber needs no room for bursts.
    let mut options = config.transport.clone();
    options.inbound_capacity = 16;
    let wire = loop {
        match Wire::connect(&config, &options, &names, &id).await {
            Ok(wire) => break wire,
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "heartbeat cannot connect; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
    };
    // A reconnect of either this connection or the node's main ones: callers may have dropped
    // this server while it was away, so beat and announce at once.
    let mut own_reconnects = wire.reconnects();
    // Beat at once: the entry written at start-up is already ageing.
    let mut wait = Duration::ZERO;
    let mut announce = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            Some(()) = own_reconnects.recv() => announce = true,
            Some(()) = node_reconnects.recv() => announce = true,
        }
        let Some(node) = node.upgrade() else { break };
        if keep_calls_subscribed(&node, &wire).await {
            announce = true;
        }
        let result = beat(&node, &wire, &advert, announce).await;
        // Cleared only once sent (with the beat): a failed one is retried with the next beat.
        announce &= result.is_err();
        drop(node);
        wait = match result {
            Ok(()) => period,
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "heartbeat failed; retrying");
                retry
            }
        };
    }
    wire.close().await;
}

/// Checks that the server still receives its call channel where the broker may end a
/// subscription silently (a Redis Cluster slot that moved, see `Node::keep_subscribed`), and
/// subscribes again if not. True when it had been lost: callers that found nobody there have
/// dropped this server, so it must announce itself again. Counted on the heartbeat's own
/// connection, so a starved application runtime cannot delay the check.
async fn keep_calls_subscribed(node: &Node, wire: &Wire) -> bool {
    if !wire.may_lose_subscriptions() {
        return false;
    }
    let calls = node.calls_channel();
    match wire.subscribers(calls).await {
        Ok(0) => {}
        Ok(_) => return false,
        Err(e) => {
            tracing::debug!(node = %node.id(), error = %e, "could not count the call channel's subscribers");
            return false;
        }
    }
    tracing::warn!(node = %node.id(), channel = %calls, "the call channel subscription was lost (its slot moved?); subscribing again");
    match node.wire().resubscribe(calls).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(node = %node.id(), error = %e, "could not subscribe to the call channel again; retrying next heartbeat");
            false
        }
    }
}
