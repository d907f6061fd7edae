//! The heartbeat registry: who provides what, kept alive by the providers themselves.
//!
//! This module decides what an entry says (the info fields, the TTL) and what join and leave
//! announcements carry; how entries are stored and expired, and how the announcements go out
//! with the change they announce, is the transport's business (`transport::redis` keeps them
//! in sorted sets and hashes on Redis's clock and publishes from inside its scripts).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::signing::Sealer;
use crate::transport::{Channel, Entry, Lookup, Transport, Wire};

use crate::error::Error;
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
    /// The per-method figures (`meter::summary`), if it serves.
    pub(crate) stats: Option<String>,
    /// It is shutting down: listed for the monitor while its handlers finish, but no longer
    /// a provider of anything (the beat adds it to no method set).
    pub(crate) draining: bool,
    /// Announce the server (a join with all its methods) even if the beat adds nothing:
    /// after a reconnect callers may have dropped it, and after a registration they are told
    /// at once.
    pub(crate) announce: bool,
}

/// Registry operations of one deployment.
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    ttl: Duration,
    /// This machine's host name, read once: every heartbeat writes it.
    host: String,
    /// Signs the join and leave frames for the events channel, when frames are signed: the
    /// transport's scripts publish them there as they are.
    sealer: Option<(std::sync::Arc<Sealer>, Channel)>,
}

impl Registry {
    /// The registry of the deployment `_names` names. (The names are no longer needed here —
    /// the transport publishes the announcements — but `node.rs` builds this while it is being
    /// changed for Redis Cluster; the parameter goes once that has landed.)
    pub(crate) fn new(ttl: Duration) -> Self {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        Registry {
            ttl,
            host,
            sealer: None,
        }
    }

    /// Signs the announcements with `sealer`, for `events`, the channel they go out on.
    pub(crate) fn signed(
        mut self,
        sealer: Option<std::sync::Arc<Sealer>>,
        events: Channel,
    ) -> Self {
        self.sealer = sealer.map(|sealer| (sealer, events));
        self
    }

    /// An announcement as published: signed for the events channel when frames are signed.
    fn announcement(&self, frame: Vec<u8>) -> bytes::Bytes {
        match &self.sealer {
            Some((sealer, events)) => sealer.seal(events.as_str(), &frame),
            None => frame.into(),
        }
    }

    /// Writes or renews a server's entry. The transport publishes a join (all its methods)
    /// with it when the beat makes it a provider of a method it was not listed for, or when
    /// `me.announce` says so; callers that miss it find out at their next refresh.
    pub(crate) async fn heartbeat(&self, wire: &Wire, me: &Announcement<'_>) -> Result<(), Error> {
        let beat_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut fields = vec![
            ("id", me.id.to_string()),
            ("host", self.host.clone()),
            ("pid", std::process::id().to_string()),
            ("started_at_ms", me.started_at_ms.to_string()),
            ("in_flight", me.in_flight.to_string()),
            ("protocol", crate::codec::VERSION.to_string()),
            ("methods", me.methods.join("\n")),
            ("generation", me.generation.to_string()),
            ("beat_at_ms", beat_at_ms.to_string()),
            ("draining", u8::from(me.draining).to_string()),
        ];
        if let Some(stats) = &me.stats {
            fields.push(("stats", stats.clone()));
        }
        let entry = Entry {
            id: me.id,
            ttl: self.ttl,
            // A draining server stays listed but provides nothing.
            methods: if me.draining { &[] } else { me.methods },
            fields,
            join: self.announcement(crate::codec::encode_join(me.id.as_str(), me.methods)),
            force_join: me.announce,
        };
        wire.heartbeat(&entry).await?;
        Ok(())
    }

    /// Removes a server's entry; the transport tells callers it is leaving in the same step.
    /// On failure the entry expires with its TTL.
    pub(crate) async fn leave(
        &self,
        wire: &Wire,
        id: &NodeId,
        methods: &[String],
    ) -> Result<(), Error> {
        let leave = self.announcement(crate::codec::encode_leave(id.as_str()));
        wire.deregister(id, methods, leave).await?;
        Ok(())
    }

    /// For each method, in the order asked: unchanged since generation `known` (same order),
    /// or its live providers and their generation.
    pub(crate) async fn providers(
        &self,
        wire: &Wire,
        methods: &[String],
        known: &[Option<u64>],
    ) -> Result<Vec<Lookup>, Error> {
        debug_assert_eq!(methods.len(), known.len(), "one generation per method");
        if methods.is_empty() {
            return Ok(Vec::new());
        }
        Ok(wire.providers(methods, known).await?)
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
    /// How long ago its last heartbeat was written, by this reader's clock against the
    /// server's (so clock skew between the machines shows here); `None` from a server that
    /// does not say when it beat (an older version).
    pub heartbeat_age: Option<Duration>,
    /// It is shutting down: its handlers are finishing and it takes no new calls (it is no
    /// longer listed as a provider of its methods).
    pub draining: bool,
    /// Its per-method figures at its last heartbeat; `None` from a server that does not
    /// publish them (an older version) or whose summary did not read.
    pub stats: Option<crate::monitor::ServerStats>,
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
        let heartbeat_age = number("beat_at_ms").ok().map(|at| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            Duration::from_millis(now.saturating_sub(at))
        });
        let draining = get("draining").is_ok_and(|d| d == "1");
        let stats = fields
            .iter()
            .find(|(k, _)| &k[..] == b"stats")
            .and_then(|(_, v)| {
                let stats = crate::monitor::ServerStats::parse(v);
                if stats.is_none() {
                    tracing::debug!(node = %id, "skipping an unreadable stats summary");
                }
                stats
            });
        Ok(ServerInfo {
            id: id.clone(),
            host: get("host")?.to_string(),
            pid: u32::try_from(number("pid")?).map_err(|_| "pid out of range".to_string())?,
            started_at: UNIX_EPOCH + Duration::from_millis(number("started_at_ms")?),
            in_flight: number("in_flight")?,
            methods,
            heartbeat_age,
            draining,
            stats,
        })
    }
}
