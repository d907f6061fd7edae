//! A server's heartbeat: renews its registry entry every period and right after a reconnect
//! (which also restores the entry after a Redis restart).

use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        self.methods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Writes the entry once.
pub(crate) async fn beat(node: &Node, advert: &Advert) -> Result<(), Error> {
    let methods = advert.methods();
    let in_flight = node.dispatcher.get().map_or(0, |d| d.in_flight());
    node.registry
        .heartbeat(
            &node.redis,
            &Announcement {
                id: &node.id,
                methods: &methods,
                started_at_ms: advert.started_at_ms,
                in_flight,
            },
        )
        .await
}

/// Beats until `stop` is cancelled. A failed beat is retried sooner than the period, so an
/// entry lost in a Redis restart comes back quickly.
pub(crate) async fn run(node: Arc<Node>, advert: Arc<Advert>, stop: CancellationToken) {
    let period = node.config.heartbeat;
    let mut reconnects = node.redis.reconnects();
    let mut wait = period;
    let mut announce = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            r = reconnects.recv() => match r {
                // Callers may have dropped this server while its connection was down.
                Some(()) => announce = true,
                None => break,
            },
        }
        wait = match beat(&node, &advert).await {
            Ok(()) => {
                if std::mem::take(&mut announce) {
                    let join = crate::codec::encode_join(node.id.as_str(), &advert.methods());
                    if let Err(e) = node.redis.publish(&node.names.events(), join.into()).await {
                        tracing::debug!(node = %node.id, error = %e, "could not re-announce after a reconnect");
                    }
                }
                period
            }
            Err(e) => {
                tracing::warn!(node = %node.id, error = %e, "heartbeat failed; retrying");
                (period / 4).max(Duration::from_millis(10))
            }
        };
    }
}
