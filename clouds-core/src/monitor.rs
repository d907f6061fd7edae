//! Who serves what, read from the registry.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::Config;
use crate::error::Error;
use crate::node::{Node, Owner};
use crate::node_id::NodeId;
use crate::registry::ServerInfo;

/// Reads the registry: which servers are alive and what they serve.
///
/// ```no_run
/// # async fn demo() -> Result<(), clouds_core::Error> {
/// let config = clouds_core::Config::from_url("redis://127.0.0.1:6379/3")?;
/// let status = clouds_core::Monitor::connect(config).await?.snapshot().await?;
/// for (method, servers) in &status.methods {
///     println!("{method}: {servers:?}");
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Monitor {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("id", &self.owner.node.id())
            .finish()
    }
}

/// What the registry held at one moment: the live servers and the methods each serves
/// (read by [`Monitor::snapshot`]).
///
/// ```
/// let snapshot = clouds_core::RegistrySnapshot::default();
/// assert!(snapshot.methods.is_empty() && snapshot.servers.is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegistrySnapshot {
    /// Each method and the servers providing it, sorted.
    pub methods: BTreeMap<String, Vec<NodeId>>,
    /// Each live server and what it reported at its last heartbeat.
    pub servers: BTreeMap<NodeId, ServerInfo>,
}

impl Monitor {
    /// Connects a monitor node.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), clouds_core::Error> {
    /// let config = clouds_core::Config::from_url("redis://127.0.0.1:6379/3")?;
    /// let monitor = clouds_core::Monitor::connect(config).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(config: Config) -> Result<Monitor, Error> {
        let node = Node::start(config, "monitor").await?;
        Ok(Monitor {
            owner: Arc::new(Owner { node }),
        })
    }

    /// This monitor's node id.
    ///
    /// ```
    /// # fn demo(monitor: clouds_core::Monitor) {
    /// println!("monitor {}", monitor.id());
    /// # }
    /// ```
    pub fn id(&self) -> &NodeId {
        self.owner.node.id()
    }

    /// Reads the live servers and their methods. Expired entries are purged on the way.
    ///
    /// ```
    /// # async fn demo(monitor: clouds_core::Monitor) -> Result<(), clouds_core::Error> {
    /// let snapshot = monitor.snapshot().await?;
    /// for (method, servers) in &snapshot.methods {
    ///     println!("{method}: {} providers", servers.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn snapshot(&self) -> Result<RegistrySnapshot, Error> {
        let node = &self.owner.node;
        if node.is_closed() {
            return Err(Error::Shutdown);
        }
        let servers = node.registry().servers(node.wire()).await?;
        let mut methods: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
        for (id, info) in &servers {
            for method in &info.methods {
                methods.entry(method.clone()).or_default().push(id.clone());
            }
        }
        Ok(RegistrySnapshot { methods, servers })
    }

    /// Closes the monitor's connections.
    ///
    /// ```
    /// # async fn demo(monitor: clouds_core::Monitor) {
    /// monitor.close().await;
    /// # }
    /// ```
    pub async fn close(&self) {
        self.owner.node.close().await;
    }
}
