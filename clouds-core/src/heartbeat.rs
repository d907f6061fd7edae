//! A server's heartbeat: renews its registry entry every period and right after a reconnect
//! (which also restores the entry after a Redis restart).
//!
//! It runs on its own thread, with its own single-threaded runtime and its own Redis
//! connection: handlers that block every worker thread of the application's runtime cannot
//! starve it, so a busy server is never declared dead.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use clouds_redis::{Reconnects, Transport};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::node::Node;
use crate::registry::Announcement;

/// What the heartbeat announces; shared with `Server` which adds methods.
#[derive(Debug, Default)]
pub(crate) struct Advert {
    pub(crate) methods: Mutex<Vec<String>>,
    pub(crate) started_at_ms: u64,
}

impl Advert {
    pub(crate) fn methods(&self) -> Vec<String> {
        crate::locks::lock(&self.methods).clone()
    }
}

/// Writes the entry once, through `redis`.
pub(crate) async fn beat(node: &Node, redis: &Transport, advert: &Advert) -> Result<(), Error> {
    let methods = advert.methods();
    let in_flight = node.dispatcher.get().map_or(0, |d| d.in_flight());
    node.registry
        .heartbeat(
            redis,
            &Announcement {
                id: &node.id,
                methods: &methods,
                started_at_ms: advert.started_at_ms,
                in_flight,
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
        let stop = node.cancel.child_token();
        let token = stop.clone();
        let name = format!("clouds-heartbeat-{}", node.id);
        let node_reconnects = node.redis.reconnects();
        let weak = Arc::downgrade(node);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Io {
                action: "build the heartbeat runtime".into(),
                reason: e.to_string(),
            })?;
        let (finished_tx, finished) = tokio::sync::watch::channel(false);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                runtime.block_on(run(weak, node_reconnects, advert, token));
                let _ = finished_tx.send(true);
            })
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
    let Some((config, id)) = node.upgrade().map(|n| (n.config.clone(), n.id.clone())) else {
        return;
    };
    let period = config.heartbeat;
    let retry = (period / 4).max(Duration::from_millis(10));
    // Its own connection, driven by this thread's runtime. It subscribes to nothing, so its
    // subscriber needs no room for bursts.
    let mut options = config.transport.clone();
    options.inbound_capacity = 16;
    let redis = loop {
        match Transport::connect(&config.endpoint, &options).await {
            Ok(redis) => break redis,
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
    let mut own_reconnects = redis.reconnects();
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
        let mut result = beat(&node, &redis, &advert).await;
        if result.is_ok() && announce {
            result = node.registry.announce(&redis, &id, &advert.methods()).await;
            // Cleared only once sent: a failed announcement is retried with the next beat.
            announce = result.is_err();
        }
        drop(node);
        wait = match result {
            Ok(()) => period,
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "heartbeat failed; retrying");
                retry
            }
        };
    }
    redis.close().await;
}
