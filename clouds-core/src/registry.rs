//! The heartbeat registry: who provides what, kept alive by the providers themselves.
//!
//! This module decides what an entry says (the info fields, the TTL) and what join and leave
//! announcements carry; how entries are stored and expired is the transport's business
//! (`transport::redis` keeps them in sorted sets and hashes on Redis's clock).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::transport::{Entry, Transport, Wire};

use crate::error::Error;
use crate::namespace::Names;
use crate::node_id::NodeId;

/// What a server publishes about itself.
#[derive(Debug, Clone)]
pub(crate) struct Announcement<'a> {
    pub(crate) id: &'a NodeId,
    pub(crate) methods: &'a [String],
    /// How many times methods were added: orders beats (see `heartbeat`).
    pub(crate) generation: u64,
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

    /// Writes or renews a server's entry.
    pub(crate) async fn heartbeat(&self, wire: &Wire, me: &Announcement<'_>) -> Result<(), Error> {
        let entry = Entry {
            id: me.id,
            ttl: self.ttl,
            methods: me.methods,
            fields: vec![
                ("id", me.id.to_string()),
                ("host", self.host.clone()),
                ("pid", std::process::id().to_string()),
                ("started_at_ms", me.started_at_ms.to_string()),
                ("in_flight", me.in_flight.to_string()),
                ("protocol", crate::codec::VERSION.to_string()),
                ("methods", me.methods.join("\n")),
                ("generation", me.generation.to_string()),
            ],
        };
        wire.heartbeat(&entry).await?;
        Ok(())
    }

    /// Tells callers at once that `id` provides `methods` (a join event). Callers that miss it
    /// find out at their next refresh.
    pub(crate) async fn announce(
        &self,
        wire: &Wire,
        id: &NodeId,
        methods: &[String],
    ) -> Result<(), Error> {
        let join = crate::codec::encode_join(id.as_str(), methods);
        wire.publish(self.names.events(), join.into()).await?;
        Ok(())
    }

    /// Removes a server's entry and tells callers it is leaving. Both steps are attempted;
    /// the first failure is returned (the entry then expires with its TTL).
    pub(crate) async fn leave(
        &self,
        wire: &Wire,
        id: &NodeId,
        methods: &[String],
    ) -> Result<(), Error> {
        let removed = wire.deregister(id, methods).await;
        let leave = crate::codec::encode_leave(id.as_str());
        let announced = wire.publish(self.names.events(), leave.into()).await;
        removed?;
        announced?;
        Ok(())
    }

    /// Live providers of each method, in the order asked.
    pub(crate) async fn providers(
        &self,
        wire: &Wire,
        methods: &[String],
    ) -> Result<Vec<Vec<NodeId>>, Error> {
        if methods.is_empty() {
            return Ok(Vec::new());
        }
        Ok(wire.providers(methods).await?)
    }

    /// Every live server and its info. Entries that cannot be read are logged and skipped.
    pub(crate) async fn servers(&self, wire: &Wire) -> Result<BTreeMap<NodeId, ServerInfo>, Error> {
        let mut servers = BTreeMap::new();
        for (id, fields) in wire.servers().await? {
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

/// What the registry knows about one live server.
///
/// ```
/// # async fn demo(monitor: clouds_core::Monitor) -> Result<(), clouds_core::Error> {
/// for (id, info) in monitor.snapshot().await?.servers {
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
