//! Who serves what, read from the registry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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
    /// Each method and the servers providing it, sorted (draining servers are not).
    pub methods: BTreeMap<String, Vec<NodeId>>,
    /// Each live server (draining ones too) and what it reported at its last heartbeat.
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
        // A draining server takes no new calls: it is listed, but provides nothing.
        for (id, info) in servers.iter().filter(|(_, info)| !info.draining) {
            for method in &info.methods {
                methods.entry(method.clone()).or_default().push(id.clone());
            }
        }
        Ok(RegistrySnapshot { methods, servers })
    }

    /// The joins and leaves announced from now on, as they arrive (the "prompt offline
    /// notification"). A server that stops without leaving (a crash, a lost network) sends
    /// nothing: it vanishes from [`Monitor::snapshot`] when its entry expires, one TTL after
    /// its last heartbeat. Joins are announced again after a server reconnects or registers
    /// more methods, so a join may name a server already known.
    ///
    /// ```
    /// # async fn demo(monitor: clouds_core::Monitor) {
    /// use clouds_core::RegistryEvent;
    /// let mut events = monitor.events();
    /// while let Some(event) = events.next().await {
    ///     match event {
    ///         RegistryEvent::Joined { node, methods } => println!("{node} serves {methods:?}"),
    ///         RegistryEvent::Left { node } => println!("{node} left"),
    ///         _ => {}
    ///     }
    /// }
    /// # }
    /// ```
    pub fn events(&self) -> RegistryEvents {
        RegistryEvents {
            receiver: self.owner.node.announcements(),
            stopped: self.owner.node.life().child_token(),
        }
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

/// A server's per-method figures at its last heartbeat (in [`ServerInfo::stats`]).
///
/// Counters run since the server started; latencies and the `window_*` counts cover the
/// window that ended at that heartbeat (about one heartbeat period).
///
/// ```
/// # async fn demo(monitor: clouds_core::Monitor) -> Result<(), clouds_core::Error> {
/// for (id, info) in monitor.snapshot().await?.servers {
///     let Some(stats) = &info.stats else { continue };
///     for (method, m) in &stats.methods {
///         println!("{id} {method}: {} calls, {} errors, p99 {:?}",
///                  m.calls, m.errors.total(), m.latency.map(|l| l.p99));
///     }
///     println!("{id}: {:.1} calls/s", stats.total().calls_per_second(stats.window));
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// How long the window of the latencies and `window_*` counts was.
    pub window: Duration,
    /// Some methods were left out: a summary lists at most 256, the busiest.
    pub truncated: bool,
    /// Each method's figures.
    pub methods: BTreeMap<String, MethodStats>,
}

impl ServerStats {
    pub(crate) fn parse(text: &[u8]) -> Option<ServerStats> {
        let summary = crate::meter::parse(text)?;
        Some(ServerStats {
            window: summary.window,
            truncated: summary.truncated,
            methods: summary
                .methods
                .into_iter()
                .map(|(name, line)| (name, MethodStats::from_line(&line)))
                .collect(),
        })
    }

    /// Every method's figures added up (latencies: the largest of the methods', an upper
    /// bound).
    ///
    /// ```
    /// let stats = clouds_core::ServerStats::default();
    /// assert_eq!(stats.total().calls, 0);
    /// ```
    pub fn total(&self) -> MethodStats {
        self.methods
            .values()
            .fold(MethodStats::default(), |sum, m| sum.merged(m))
    }
}

/// One method's figures on one server (or summed, see [`RegistrySnapshot::method_totals`]).
///
/// ```
/// let m = clouds_core::MethodStats::default();
/// assert_eq!((m.calls, m.errors.total(), m.overloaded, m.in_flight), (0, 0, 0, 0));
/// assert_eq!(m.latency, None);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MethodStats {
    /// Calls answered since the server started (successes and errors).
    pub calls: u64,
    /// Of those, the errors, by kind.
    pub errors: ErrorCounts,
    /// Calls not run because their deadline had passed before a worker got to them.
    pub expired: u64,
    /// Calls dropped unfinished (the server closed while they ran).
    pub abandoned: u64,
    /// Calls dropped unfinished because their caller cancelled them (it stopped waiting).
    pub cancelled: u64,
    /// Calls refused at the in-flight limit (callers re-route them), since the start.
    pub overloaded: u64,
    /// Calls running at the heartbeat.
    pub in_flight: u64,
    /// Calls answered in the window.
    pub window_calls: u64,
    /// Of those, the errors.
    pub window_errors: u64,
    /// Handler latency over the window (from the call's arrival at dispatch to its
    /// outcome, without the reply's trip); `None` if no call finished in it.
    pub latency: Option<Latency>,
}

/// Errors by kind (in [`MethodStats::errors`]).
///
/// ```
/// let e = clouds_core::ErrorCounts::default();
/// assert_eq!(e.total(), 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ErrorCounts {
    /// The handler returned its error value.
    pub application: u64,
    /// The arguments did not decode.
    pub bad_arguments: u64,
    /// The handler panicked.
    pub panics: u64,
    /// The server could not make a reply.
    pub server: u64,
}

impl ErrorCounts {
    /// All of them.
    ///
    /// ```
    /// assert_eq!(clouds_core::ErrorCounts::default().total(), 0);
    /// ```
    pub fn total(&self) -> u64 {
        self.application + self.bad_arguments + self.panics + self.server
    }
}

/// Latency percentiles over a window, each within about 6 % (a log-linear histogram with 16
/// buckets per power of two).
///
/// ```
/// # fn demo(m: clouds_core::MethodStats) {
/// if let Some(l) = m.latency {
///     assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.max);
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Latency {
    /// The median.
    pub p50: Duration,
    /// The 90th percentile.
    pub p90: Duration,
    /// The 99th percentile.
    pub p99: Duration,
    /// The slowest.
    pub max: Duration,
}

impl MethodStats {
    fn from_line(line: &crate::meter::Line) -> MethodStats {
        MethodStats {
            calls: line.calls,
            errors: ErrorCounts {
                application: line.app_error,
                bad_arguments: line.bad_arguments,
                panics: line.panic,
                server: line.server_error,
            },
            expired: line.expired,
            abandoned: line.abandoned,
            cancelled: line.cancelled,
            overloaded: line.overloaded,
            in_flight: line.in_flight,
            window_calls: line.w_calls,
            window_errors: line.w_errors,
            latency: (line.w_calls > 0).then(|| Latency {
                p50: Duration::from_nanos(line.p50_ns),
                p90: Duration::from_nanos(line.p90_ns),
                p99: Duration::from_nanos(line.p99_ns),
                max: Duration::from_nanos(line.max_ns),
            }),
        }
    }

    /// These figures and `other`'s added up; each latency is the larger of the two (an upper
    /// bound: percentiles do not add).
    ///
    /// ```
    /// let m = clouds_core::MethodStats::default();
    /// assert_eq!(m.merged(&m), m);
    /// ```
    pub fn merged(&self, other: &MethodStats) -> MethodStats {
        let latency = match (self.latency, other.latency) {
            (Some(a), Some(b)) => Some(Latency {
                p50: a.p50.max(b.p50),
                p90: a.p90.max(b.p90),
                p99: a.p99.max(b.p99),
                max: a.max.max(b.max),
            }),
            (a, b) => a.or(b),
        };
        MethodStats {
            calls: self.calls + other.calls,
            errors: ErrorCounts {
                application: self.errors.application + other.errors.application,
                bad_arguments: self.errors.bad_arguments + other.errors.bad_arguments,
                panics: self.errors.panics + other.errors.panics,
                server: self.errors.server + other.errors.server,
            },
            expired: self.expired + other.expired,
            abandoned: self.abandoned + other.abandoned,
            cancelled: self.cancelled + other.cancelled,
            overloaded: self.overloaded + other.overloaded,
            in_flight: self.in_flight + other.in_flight,
            window_calls: self.window_calls + other.window_calls,
            window_errors: self.window_errors + other.window_errors,
            latency,
        }
    }

    /// Calls per second over a window of length `window` (0 for an empty window).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let m = clouds_core::MethodStats::default();
    /// assert_eq!(m.calls_per_second(Duration::from_secs(2)), 0.0);
    /// ```
    pub fn calls_per_second(&self, window: Duration) -> f64 {
        per_second(self.window_calls, window)
    }

    /// Errors per second over a window of length `window` (0 for an empty window).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let m = clouds_core::MethodStats::default();
    /// assert_eq!(m.errors_per_second(Duration::from_secs(2)), 0.0);
    /// ```
    pub fn errors_per_second(&self, window: Duration) -> f64 {
        per_second(self.window_errors, window)
    }
}

fn per_second(n: u64, window: Duration) -> f64 {
    if window.is_zero() {
        0.0
    } else {
        n as f64 / window.as_secs_f64()
    }
}

impl RegistrySnapshot {
    /// Each method's figures summed over the servers that published them.
    ///
    /// ```
    /// let snapshot = clouds_core::RegistrySnapshot::default();
    /// assert!(snapshot.method_totals().is_empty());
    /// ```
    pub fn method_totals(&self) -> BTreeMap<String, MethodStats> {
        let mut totals: BTreeMap<String, MethodStats> = BTreeMap::new();
        for stats in self.servers.values().filter_map(|s| s.stats.as_ref()) {
            for (method, m) in &stats.methods {
                let sum = totals.entry(method.clone()).or_default();
                *sum = sum.merged(m);
            }
        }
        totals
    }

    /// Every server's figures summed.
    ///
    /// ```
    /// let snapshot = clouds_core::RegistrySnapshot::default();
    /// assert_eq!(snapshot.total().calls, 0);
    /// ```
    pub fn total(&self) -> MethodStats {
        self.method_totals()
            .values()
            .fold(MethodStats::default(), |sum, m| sum.merged(m))
    }
}

/// A join or leave announced on the deployment's events channel (see [`Monitor::events`]).
///
/// ```
/// let event = clouds_core::RegistryEvent::Left { node: clouds_core::NodeId::from("server-a") };
/// assert!(matches!(event, clouds_core::RegistryEvent::Left { .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryEvent {
    /// A server started providing methods (or announced itself again).
    Joined {
        /// The server.
        node: NodeId,
        /// All the methods it provides.
        methods: Vec<String>,
    },
    /// A server is leaving: it takes no new calls (it may still be draining).
    Left {
        /// The server.
        node: NodeId,
    },
}

/// The joins and leaves a monitor receives (from [`Monitor::events`]).
///
/// ```
/// # async fn demo(monitor: clouds_core::Monitor) {
/// let mut events = monitor.events();
/// if let Some(event) = events.try_next() {
///     println!("{event:?}");
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct RegistryEvents {
    receiver: tokio::sync::broadcast::Receiver<RegistryEvent>,
    /// Cancelled when the monitor's node stops.
    stopped: tokio_util::sync::CancellationToken,
}

impl RegistryEvents {
    /// The next event; `None` once the monitor is closed. Events a slow reader had no room
    /// for (over 1,024 behind) are skipped.
    ///
    /// ```
    /// # async fn demo(mut events: clouds_core::RegistryEvents) {
    /// while let Some(event) = events.next().await {
    ///     println!("{event:?}");
    /// }
    /// # }
    /// ```
    pub async fn next(&mut self) -> Option<RegistryEvent> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let received = tokio::select! {
                received = self.receiver.recv() => received,
                () = self.stopped.cancelled() => return None,
            };
            match received {
                Ok(event) => return Some(event),
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// An event already received, if any, without waiting.
    ///
    /// ```
    /// # fn demo(mut events: clouds_core::RegistryEvents) {
    /// while let Some(event) = events.try_next() {
    ///     println!("{event:?}");
    /// }
    /// # }
    /// ```
    pub fn try_next(&mut self) -> Option<RegistryEvent> {
        use tokio::sync::broadcast::error::TryRecvError;
        loop {
            match self.receiver.try_recv() {
                Ok(event) => return Some(event),
                Err(TryRecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}
