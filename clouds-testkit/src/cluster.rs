//! [`RedisCluster`]: a throwaway Redis Cluster on free loopback ports (3 primaries and 3
//! replicas by default), the fault operations cluster tests need (kill, restart, manual
//! failover, slot migration), and the key-to-slot function ([`RedisCluster::slot_of`]).
//!
//! Each node is a [`RedisServer`] of its own (so a node is killed and reaped when the
//! cluster is dropped, also on panic, and its temporary directory removed) started with
//! `--cluster-enabled yes --cluster-node-timeout 2000 --repl-diskless-sync-delay 0` and
//! its `nodes.conf` in that directory. A node also listens on its cluster bus port, its
//! port + 10000, so ports are chosen with both free. The cluster is then created by
//! `redis-cli --cluster create`, and [`RedisCluster::start`] returns once every node says
//! `cluster_state:ok`, all nodes agree on who owns which slot, and every replica's link to
//! its primary is up.
//!
//! `redis-cli` is `$REDIS_CLI` if set, otherwise the `redis-cli` next to the
//! [`redis-server`](crate::redis_server_path) binary, otherwise `redis-cli` on `PATH`.
//!
//! Every wait polls a condition until a deadline; errors quote the last state seen and the
//! tail of each node's log.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::TestkitError;
use crate::process::output_of;
use crate::resp::RespValue;
use crate::server::{RedisServer, TlsFiles, is_executable, port_taken, redis_server_path};

/// How many hash slots a Redis Cluster has.
const SLOTS: u16 = 16384;
/// A node's cluster bus port is its port plus this.
const BUS_PORT_OFFSET: u16 = 10000;
/// `--cluster-node-timeout`, in milliseconds.
const NODE_TIMEOUT_MS: u64 = 2000;
/// How long `redis-cli --cluster create` may take (it checks for the join once a second).
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `start` waits for the new cluster to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `failover` waits for the roles to swap.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `migrate_slot` may take, keys and all.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys moved by one MIGRATE.
const MIGRATE_BATCH: usize = 100;
/// MIGRATE's own timeout, in milliseconds.
const MIGRATE_IO_TIMEOUT_MS: u32 = 5000;
/// Pause between two polls of the cluster's state.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How many ports a node tries when its port turns out to be taken.
const PORT_ATTEMPTS: u32 = 5;
/// How many ports the OS is asked for to find one whose bus port is free (and valid) too.
const PORT_PICKS: u32 = 200;
/// The cluster configuration file inside a node's directory.
const NODES_FILE: &str = "nodes.conf";
/// Lines of each node's log quoted in errors.
const LOG_LINES_PER_NODE: usize = 15;

const CLI_INSTALL_HINT: &str = "redis-cli comes with Redis (`apt-get install redis-server` or \
     `redis-tools` on Debian/Ubuntu, `brew install redis` on macOS); or set REDIS_CLI to its path";

/// A throwaway Redis Cluster on free loopback ports, every node stopped on drop.
///
/// [`RedisCluster::start`] starts 3 primaries with one replica each;
/// [`RedisCluster::start_with`] chooses the shape. Nodes are named by their port, which
/// never changes (a [restarted](RedisCluster::restart_node) node comes back on it), while
/// their roles do: [`RedisCluster::nodes`] and [`RedisCluster::primary_for_slot`] ask the
/// cluster. Commands go to one node ([`RedisCluster::command_on`]); there is no
/// redirection handling, so send a key's commands to the primary of its slot.
///
/// Starting one takes 2 to 3 seconds (`redis-cli --cluster create` checks for the nodes
/// to join once a second); [`RedisCluster::startup`] says how long each phase took.
///
/// ```
/// use clouds_testkit::RedisCluster;
///
/// let cluster = RedisCluster::start()?;
/// let slot = RedisCluster::slot_of("greeting");
/// let port = cluster.primary_for_slot(slot)?;
/// cluster.command_on(port, &["SET", "greeting", "hello"])?;
/// let reply = cluster.command_on(port, &["GET", "greeting"])?;
/// assert_eq!(reply.as_text().as_deref(), Some("hello"));
/// println!("connect your cluster client to {}", cluster.seed_url());
/// # Ok::<(), clouds_testkit::TestkitError>(())
/// ```
pub struct RedisCluster {
    /// In the order the nodes were created (the first `primaries` started as primaries).
    nodes: Vec<Node>,
    primaries: usize,
    replicas_per_primary: usize,
    startup: StartupTimings,
    /// Every node serves TLS only, with these files ([`RedisCluster::start_tls`]).
    tls: Option<TlsFiles>,
}

/// One node: its server process and its cluster node id (kept across restarts, as its
/// `nodes.conf` is).
#[derive(Debug)]
struct Node {
    id: String,
    server: RedisServer,
}

impl Node {
    fn port(&self) -> u16 {
        self.server.port()
    }

    fn running(&self) -> bool {
        self.server.pid().is_some()
    }
}

/// How long [`RedisCluster::start`] took, phase by phase.
///
/// `Display` shows it on one line, to the millisecond.
///
/// ```
/// use clouds_testkit::StartupTimings;
/// use std::time::Duration;
///
/// let mut timings = StartupTimings::default();
/// timings.launch = Duration::from_micros(45_300);
/// timings.create = Duration::from_millis(1040);
/// timings.settle = Duration::from_millis(1100);
/// assert_eq!(timings.total(), Duration::from_micros(2_185_300));
/// assert_eq!(timings.to_string(), "launch 45ms + create 1.04s + settle 1.1s = 2.185s");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StartupTimings {
    /// Starting the `redis-server` processes, until each answered.
    pub launch: Duration,
    /// Running `redis-cli --cluster create`.
    pub create: Duration,
    /// Waiting until every node said `cluster_state:ok`, all agreed on the slots' owners
    /// and every replica was in sync.
    pub settle: Duration,
}

impl StartupTimings {
    /// The whole start: the sum of the phases.
    ///
    /// ```no_run
    /// let cluster = clouds_testkit::RedisCluster::start()?;
    /// let timings = cluster.startup();
    /// assert_eq!(timings.total(), timings.launch + timings.create + timings.settle);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn total(&self) -> Duration {
        self.launch + self.create + self.settle
    }
}

impl fmt::Display for StartupTimings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms =
            |d: Duration| Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        write!(
            f,
            "launch {:?} + create {:?} + settle {:?} = {:?}",
            ms(self.launch),
            ms(self.create),
            ms(self.settle),
            ms(self.total())
        )
    }
}

/// A node's role in the cluster, as the cluster sees it now.
///
/// ```no_run
/// use clouds_testkit::{NodeRole, RedisCluster};
///
/// let cluster = RedisCluster::start()?;
/// let nodes = cluster.nodes()?;
/// let primaries = nodes.iter().filter(|n| n.role == NodeRole::Primary).count();
/// assert_eq!(primaries, 3);
/// # Ok::<(), clouds_testkit::TestkitError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeRole {
    /// A primary (`master`): it may own slots and serves their keys.
    Primary,
    /// A replica (`slave`) of a primary.
    Replica,
}

/// One node of a [`RedisCluster`], as [`RedisCluster::nodes`] reports it.
///
/// A running node describes itself (its own `CLUSTER NODES` line); a
/// [killed](RedisCluster::kill_node) one is described as a running node sees it (a killed
/// primary whose replica has taken over is a primary without slots).
///
/// ```no_run
/// use clouds_testkit::{NodeRole, RedisCluster};
///
/// let cluster = RedisCluster::start()?;
/// for node in cluster.nodes()? {
///     match node.role {
///         NodeRole::Primary => println!("{} (pid {:?}) owns {:?}", node.port, node.pid, node.slots),
///         NodeRole::Replica => println!("{} replicates {:?}", node.port, node.primary_port),
///     }
/// }
/// # Ok::<(), clouds_testkit::TestkitError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterNode {
    /// The node's port on 127.0.0.1 (its cluster bus port is this + 10000).
    pub port: u16,
    /// Its process id, or `None` while it is [killed](RedisCluster::kill_node).
    pub pid: Option<u32>,
    /// Its cluster node id (40 hex digits).
    pub id: String,
    /// Primary or replica.
    pub role: NodeRole,
    /// For a replica, the port of the primary it replicates.
    pub primary_port: Option<u16>,
    /// For a primary, the slot ranges it owns, in ascending order; empty for a replica.
    pub slots: Vec<RangeInclusive<u16>>,
}

impl ClusterNode {
    /// Whether this node owns `slot` (only primaries own slots).
    ///
    /// ```no_run
    /// use clouds_testkit::RedisCluster;
    ///
    /// let cluster = RedisCluster::start()?;
    /// let slot = RedisCluster::slot_of("some-key");
    /// let owners: Vec<u16> =
    ///     cluster.nodes()?.iter().filter(|n| n.owns(slot)).map(|n| n.port).collect();
    /// assert_eq!(owners, vec![cluster.primary_for_slot(slot)?]);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|range| range.contains(&slot))
    }
}

impl RedisCluster {
    /// How many hash slots a Redis Cluster has: 16384.
    ///
    /// ```
    /// use clouds_testkit::RedisCluster;
    ///
    /// assert!(RedisCluster::slot_of("any key") < RedisCluster::SLOTS);
    /// ```
    pub const SLOTS: u16 = SLOTS;

    /// Starts a cluster of 3 primaries with one replica each on free loopback ports, and
    /// waits until it has settled (see [`RedisCluster::start_with`]).
    ///
    /// ```no_run
    /// let cluster = clouds_testkit::RedisCluster::start()?;
    /// assert_eq!(cluster.ports().len(), 6);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn start() -> Result<RedisCluster, TestkitError> {
        RedisCluster::start_with(3, 1)
    }

    /// Starts a cluster of `primaries` primaries with `replicas_per_primary` replicas each,
    /// and waits (up to 30 s after `redis-cli` is done) until it has settled: every node
    /// says `cluster_state:ok` and knows every other node, `primaries` primaries own all
    /// 16384 slots, all nodes agree on who owns which, and every replica's link to its
    /// primary is up.
    ///
    /// Every node runs on 127.0.0.1 with `--cluster-enabled yes --cluster-node-timeout
    /// 2000 --repl-diskless-sync-delay 0 --save "" --appendonly no`, in a fresh temporary
    /// directory holding its `nodes.conf`. `redis-cli --cluster create` needs at least 3
    /// primaries; fewer is an error, as is a cluster whose node count overflows.
    ///
    /// ```no_run
    /// use clouds_testkit::RedisCluster;
    ///
    /// let cluster = RedisCluster::start_with(3, 0)?;
    /// assert_eq!(cluster.ports().len(), 3);
    /// assert!(RedisCluster::start_with(2, 1).is_err());
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn start_with(
        primaries: usize,
        replicas_per_primary: usize,
    ) -> Result<RedisCluster, TestkitError> {
        RedisCluster::launch(primaries, replicas_per_primary, None)
    }

    /// Starts a cluster of 3 primaries with one replica each serving TLS only, with the
    /// certificate, key and CA of `files` (see [`RedisCluster::start_tls_with`]).
    ///
    /// ```no_run
    /// use clouds_testkit::{RedisCluster, TlsFiles};
    ///
    /// let cluster = RedisCluster::start_tls(&TlsFiles::new("server.pem", "server.key", "ca.pem"))?;
    /// assert!(cluster.seed_url().starts_with("rediss-cluster://127.0.0.1:"));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn start_tls(files: &TlsFiles) -> Result<RedisCluster, TestkitError> {
        RedisCluster::start_tls_with(3, 1, files)
    }

    /// Like [`RedisCluster::start_with`], every node serving TLS only: `--port 0 --tls-port
    /// P --tls-cluster yes --tls-replication yes` with the certificate, key and CA of `files`
    /// (the cluster bus, on P + 10000, and replication speak TLS too). The cluster is created
    /// with `redis-cli --tls --cacert <files.ca>`.
    ///
    /// The server certificate is also each node's client certificate towards the others, and
    /// the cluster bus always asks for one (whatever [`TlsFiles::require_client_certs`] says):
    /// it must allow client authentication too (extended key usage `clientAuth` besides
    /// `serverAuth`, or none), or the nodes never join and this fails after a minute.
    ///
    /// Clients must trust `files.ca` and check the certificate against the address the
    /// nodes announce, 127.0.0.1: the server certificate needs that IP address among its
    /// names. The helpers ([`RedisCluster::command_on`] and the others) speak TLS (see
    /// [`RedisServer::start_tls`](crate::RedisServer::start_tls)); [`RedisCluster::urls`]
    /// are `rediss://` and [`RedisCluster::seed_url`] is `rediss-cluster://`.
    ///
    /// ```no_run
    /// use clouds_testkit::{RedisCluster, TlsFiles};
    ///
    /// let files = TlsFiles::new("server.pem", "server.key", "ca.pem");
    /// let cluster = RedisCluster::start_tls_with(3, 0, &files)?;
    /// let port = cluster.ports()[0];
    /// let info = cluster.command_on(port, &["CLUSTER", "INFO"])?;
    /// assert!(info.as_text().unwrap_or_default().contains("cluster_state:ok"));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn start_tls_with(
        primaries: usize,
        replicas_per_primary: usize,
        files: &TlsFiles,
    ) -> Result<RedisCluster, TestkitError> {
        RedisCluster::launch(primaries, replicas_per_primary, Some(files))
    }

    /// Starts and creates the cluster, over TLS with `tls`.
    fn launch(
        primaries: usize,
        replicas_per_primary: usize,
        tls: Option<&TlsFiles>,
    ) -> Result<RedisCluster, TestkitError> {
        if primaries < 3 {
            return Err(cluster_error(
                format!(
                    "a cluster needs at least 3 primaries (redis-cli --cluster create), \
                     not {primaries}"
                ),
                String::new(),
            ));
        }
        let Some(count) = replicas_per_primary
            .checked_add(1)
            .and_then(|per| per.checked_mul(primaries))
        else {
            return Err(cluster_error(
                format!("{primaries} primaries with {replicas_per_primary} replicas each"),
                String::new(),
            ));
        };
        let cli = redis_cli_path()?;
        let mut cluster = RedisCluster {
            nodes: Vec::with_capacity(count),
            primaries,
            replicas_per_primary,
            startup: StartupTimings::default(),
            tls: tls.cloned(),
        };

        // Launch: all ports (and bus ports) reserved at once, so no two nodes collide; the
        // reservations are released just before the servers bind them.
        let started = Instant::now();
        let ports = {
            let mut held = Vec::with_capacity(2 * count);
            (0..count)
                .map(|_| reserve_port(&mut held))
                .collect::<io::Result<Vec<u16>>>()?
        };
        for port in ports {
            // Pushed at once: from here on, dropping `cluster` stops the node.
            cluster.nodes.push(launch_node(port, tls)?);
        }
        cluster.startup.launch = started.elapsed();

        // Create.
        let started = Instant::now();
        let mut command = Command::new(&cli);
        command.args(["--cluster", "create"]);
        command.args(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port())),
        );
        command.args(["--cluster-replicas", &replicas_per_primary.to_string()]);
        command.arg("--cluster-yes");
        if let Some(files) = tls {
            command.arg("--tls").arg("--cacert").arg(&files.ca);
            if files.require_client_certs {
                command.arg("--cert").arg(&files.cert);
                command.arg("--key").arg(&files.key);
            }
        }
        let output = output_of(&mut command, CREATE_TIMEOUT).map_err(|e| match tls {
            // What keeps a TLS cluster from joining is not in its logs at the default level.
            Some(_) => cluster_error(
                format!(
                    "redis-cli --cluster create failed: {e}\n(over TLS the nodes authenticate \
                     each other on the cluster bus with their certificate, whatever \
                     --tls-auth-clients says: it must allow client authentication too, \
                     extendedKeyUsage clientAuth)"
                ),
                cluster.logs(),
            ),
            None => e.into(),
        })?;
        let transcript = strip_ansi(&format!(
            "--- redis-cli stdout ---\n{}--- redis-cli stderr ---\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
        if !output.status.success() {
            return Err(cluster_error(
                format!("redis-cli --cluster create failed ({})", output.status),
                format!("{transcript}\n{}", cluster.logs()),
            ));
        }
        cluster.startup.create = started.elapsed();

        // Settle.
        let started = Instant::now();
        cluster
            .poll(
                SETTLE_TIMEOUT,
                "waiting for the new cluster to settle",
                || cluster.check(Some((primaries, replicas_per_primary))),
            )
            .map_err(|err| match err {
                TestkitError::Cluster { what, details } => TestkitError::Cluster {
                    what,
                    details: format!("{details}\n{transcript}"),
                },
                other => other,
            })?;
        cluster.startup.settle = started.elapsed();
        Ok(cluster)
    }

    /// How long [`RedisCluster::start`] took, phase by phase. Not printed anywhere unless
    /// you print it (it is also part of the cluster's `Debug` output).
    ///
    /// ```no_run
    /// let cluster = clouds_testkit::RedisCluster::start()?;
    /// eprintln!("cluster started in {}", cluster.startup());
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn startup(&self) -> StartupTimings {
        self.startup
    }

    /// The ports of all nodes, in creation order: the first ones started as the primaries
    /// (roles may have changed since: see [`RedisCluster::nodes`]).
    ///
    /// ```no_run
    /// let cluster = clouds_testkit::RedisCluster::start_with(4, 2)?;
    /// assert_eq!(cluster.ports().len(), 12);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(Node::port).collect()
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` for a [TLS cluster](RedisCluster::start_tls))
    /// for every node, in the order of [`RedisCluster::ports`].
    ///
    /// ```no_run
    /// let cluster = clouds_testkit::RedisCluster::start()?;
    /// let first = cluster.ports()[0];
    /// assert_eq!(cluster.urls()[0], format!("redis://127.0.0.1:{first}"));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("{}://127.0.0.1:{}", self.scheme("redis"), n.port()))
            .collect()
    }

    /// A cluster client's seed URL naming every node:
    /// `redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&node=127.0.0.1:P3...` (the form
    /// fred's `Config::from_url` reads; `rediss-cluster://` for a
    /// [TLS cluster](RedisCluster::start_tls)). Any node can serve as a seed, so a client
    /// still finds the cluster with a node down.
    ///
    /// ```no_run
    /// let cluster = clouds_testkit::RedisCluster::start()?;
    /// let url = cluster.seed_url();
    /// assert!(url.starts_with("redis-cluster://127.0.0.1:"));
    /// assert_eq!(url.matches("node=").count(), 5);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn seed_url(&self) -> String {
        let mut url = format!("{}://", self.scheme("redis-cluster"));
        for (i, node) in self.nodes.iter().enumerate() {
            let separator = match i {
                0 => "",
                1 => "?node=",
                _ => "&node=",
            };
            url.push_str(&format!("{separator}127.0.0.1:{}", node.port()));
        }
        url
    }

    /// `plain`, or its TLS form (`rediss...`) for a TLS cluster.
    fn scheme(&self, plain: &str) -> String {
        match self.tls {
            Some(_) => plain.replacen("redis", "rediss", 1),
            None => plain.to_owned(),
        }
    }

    /// The process id of the node on `port`, or `None` if it is
    /// [killed](RedisCluster::kill_node) or not a node of this cluster.
    ///
    /// ```no_run
    /// let mut cluster = clouds_testkit::RedisCluster::start()?;
    /// let port = cluster.ports()[0];
    /// assert!(cluster.pid(port).is_some());
    /// cluster.kill_node(port)?;
    /// assert_eq!(cluster.pid(port), None);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn pid(&self, port: u16) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .and_then(|n| n.server.pid())
    }

    /// Every node, in the order of [`RedisCluster::ports`], with its role and slots as the
    /// cluster sees them now.
    ///
    /// A running node describes itself; a killed one is described by the first running
    /// node that knows it. Fails if a running node does not answer.
    ///
    /// ```no_run
    /// use clouds_testkit::{NodeRole, RedisCluster};
    ///
    /// let cluster = RedisCluster::start()?;
    /// let nodes = cluster.nodes()?;
    /// let owned: usize = nodes
    ///     .iter()
    ///     .flat_map(|n| n.slots.iter())
    ///     .map(|range| range.len())
    ///     .sum();
    /// assert_eq!(owned, 16384);
    /// assert_eq!(nodes.iter().filter(|n| n.role == NodeRole::Replica).count(), 3);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn nodes(&self) -> Result<Vec<ClusterNode>, TestkitError> {
        let views = self
            .nodes
            .iter()
            .filter(|n| n.running())
            .map(|n| Ok((n.port(), self.view(n.port())?)))
            .collect::<Result<Vec<_>, TestkitError>>()?;
        let mut out = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let line = if node.running() {
                views
                    .iter()
                    .find(|(port, _)| *port == node.port())
                    .and_then(|(_, view)| view.iter().find(|l| l.has_flag("myself")))
            } else {
                views
                    .iter()
                    .find_map(|(_, view)| view.iter().find(|l| l.id == node.id))
            };
            let Some(line) = line else {
                return Err(cluster_error(
                    format!(
                        "no running node describes 127.0.0.1:{} (id {})",
                        node.port(),
                        node.id
                    ),
                    self.logs(),
                ));
            };
            let role = if line.has_flag("slave") {
                NodeRole::Replica
            } else {
                NodeRole::Primary
            };
            out.push(ClusterNode {
                port: node.port(),
                pid: node.server.pid(),
                id: node.id.clone(),
                role,
                primary_port: line.primary_id.as_deref().and_then(|id| self.port_of(id)),
                slots: match role {
                    NodeRole::Primary => line.slots.clone(),
                    NodeRole::Replica => Vec::new(),
                },
            });
        }
        Ok(out)
    }

    /// The port of the running primary that owns `slot` (its own word for it; should two
    /// claim it for a moment, the one with the newer configuration epoch). Fails if `slot`
    /// is not below 16384 or no running primary owns it (its primary is down and not
    /// replaced yet).
    ///
    /// ```no_run
    /// use clouds_testkit::RedisCluster;
    ///
    /// let cluster = RedisCluster::start()?;
    /// let port = cluster.primary_for_slot(RedisCluster::slot_of("user:{42}:name"))?;
    /// cluster.command_on(port, &["SET", "user:{42}:name", "Ada"])?;
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn primary_for_slot(&self, slot: u16) -> Result<u16, TestkitError> {
        check_slot(slot)?;
        let mut best: Option<(u64, u16)> = None;
        for node in self.nodes.iter().filter(|n| n.running()) {
            let me = self.myself(node.port())?;
            if me.has_flag("master")
                && me.owns(slot)
                && best.is_none_or(|(epoch, _)| me.config_epoch > epoch)
            {
                best = Some((me.config_epoch, node.port()));
            }
        }
        best.map(|(_, port)| port).ok_or_else(|| {
            cluster_error(format!("no running primary owns slot {slot}"), self.logs())
        })
    }

    /// The hash slot of a key or a (sharded pub/sub) channel name, as Redis Cluster
    /// computes it: CRC16 (XMODEM) modulo 16384, of the whole name or, if the name has a
    /// hash tag (a `{` followed later by a `}` with at least one byte between the first
    /// such pair), of only what is between the braces.
    ///
    /// ```
    /// use clouds_testkit::RedisCluster;
    ///
    /// assert_eq!(RedisCluster::slot_of("123456789"), 12739);
    /// // Keys sharing a hash tag share a slot...
    /// assert_eq!(RedisCluster::slot_of("{user1000}.following"), RedisCluster::slot_of("user1000"));
    /// // ...while an empty tag is no tag, and only the first tag counts.
    /// assert_eq!(RedisCluster::slot_of("foo{}{bar}"), 8363);
    /// assert_eq!(RedisCluster::slot_of("foo{bar}{zap}"), RedisCluster::slot_of("bar"));
    /// // Any bytes will do.
    /// assert_eq!(RedisCluster::slot_of(b"\xff{user1000}\x00"), 3443);
    /// ```
    pub fn slot_of(key_or_channel: impl AsRef<[u8]>) -> u16 {
        let key = key_or_channel.as_ref();
        let hashed = key
            .iter()
            .position(|&b| b == b'{')
            .and_then(|open| {
                let rest = &key[open + 1..];
                let len = rest.iter().position(|&b| b == b'}')?;
                (len > 0).then(|| &rest[..len])
            })
            .unwrap_or(key);
        crc16_xmodem(hashed) % SLOTS
    }

    /// Runs one command on the node on `port` (a fresh connection, as
    /// [`RedisServer::command`]) and returns its reply; a key in another node's slot gets
    /// a `MOVED` error reply. Fails if `port` is not a node of this cluster or the node
    /// does not answer.
    ///
    /// ```no_run
    /// use clouds_testkit::RedisCluster;
    ///
    /// let cluster = RedisCluster::start()?;
    /// let port = cluster.ports()[0];
    /// let info = cluster.command_on(port, &["CLUSTER", "INFO"])?;
    /// assert!(info.as_text().unwrap_or_default().contains("cluster_state:ok"));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn command_on(&self, port: u16, args: &[&str]) -> Result<RespValue, TestkitError> {
        self.node(port)?.server.command(args)
    }

    /// Like [`RedisCluster::command_on`], as the ACL user `user` (see
    /// [`RedisServer::command_as`](crate::RedisServer::command_as)); users are per node, so
    /// create them on every node first.
    ///
    /// ```no_run
    /// use clouds_testkit::RedisCluster;
    ///
    /// let cluster = RedisCluster::start()?;
    /// for port in cluster.ports() {
    ///     cluster.command_on(port, &["ACL", "SETUSER", "pinger", "on", ">pw", "+ping"])?;
    /// }
    /// let port = cluster.ports()[0];
    /// assert!(!cluster.command_as_on(port, "pinger", "pw", &["PING"])?.is_error());
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn command_as_on(
        &self,
        port: u16,
        user: &str,
        password: &str,
        args: &[&str],
    ) -> Result<RespValue, TestkitError> {
        self.node(port)?.server.command_as(user, password, args)
    }

    /// Runs several commands, in order, on one connection to the node on `port`, and
    /// returns their replies: for what a connection remembers, like `WAIT` after a write
    /// (it counts the replicas that have the connection's writes) or `READONLY` before
    /// reading from a replica. Commands are sent one after the other, not pipelined.
    ///
    /// ```no_run
    /// use clouds_testkit::RedisCluster;
    ///
    /// let cluster = RedisCluster::start()?;
    /// let port = cluster.primary_for_slot(RedisCluster::slot_of("durable"))?;
    /// let replies = cluster.commands_on(
    ///     port,
    ///     &[&["SET", "durable", "1"], &["WAIT", "1", "5000"]],
    /// )?;
    /// assert_eq!(replies[1].as_int(), Some(1), "the replica has the write");
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn commands_on(
        &self,
        port: u16,
        commands: &[&[&str]],
    ) -> Result<Vec<RespValue>, TestkitError> {
        self.node(port)?.server.commands(commands)
    }

    /// Like [`RedisCluster::command_on`], with binary arguments.
    ///
    /// ```no_run
    /// use clouds_testkit::RedisCluster;
    ///
    /// let cluster = RedisCluster::start()?;
    /// let key: &[u8] = b"\x00bin";
    /// let port = cluster.primary_for_slot(RedisCluster::slot_of(key))?;
    /// cluster.command_bytes_on(port, &[b"SET", key, b"\xff"])?;
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn command_bytes_on(&self, port: u16, args: &[&[u8]]) -> Result<RespValue, TestkitError> {
        self.node(port)?.server.command_bytes(args)
    }

    /// Kills the node on `port` at once (SIGKILL: no goodbye to the cluster) and reaps it.
    /// Its directory, `nodes.conf` included, is kept for [`RedisCluster::restart_node`].
    /// Does nothing if it is already killed; fails if `port` is not a node of this cluster.
    ///
    /// The others notice after the node timeout (2 s); a killed primary's replica then
    /// takes over its slots, typically within 4 s.
    ///
    /// ```no_run
    /// use clouds_testkit::{NodeRole, RedisCluster};
    /// use std::time::Duration;
    ///
    /// let mut cluster = RedisCluster::start()?;
    /// let primary = cluster.primary_for_slot(0)?;
    /// cluster.kill_node(primary)?;
    /// cluster.wait_ok(Duration::from_secs(15))?; // its replica has taken over
    /// assert_ne!(cluster.primary_for_slot(0)?, primary);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn kill_node(&mut self, port: u16) -> Result<(), TestkitError> {
        self.node_mut(port)?.server.kill();
        Ok(())
    }

    /// Starts the node on `port` again, on the same port with the same `nodes.conf` (so
    /// the same node id and view of the cluster), and waits until it answers; a running
    /// node is stopped first. Its data is gone (no persistence): a replica resyncs, and an
    /// old primary whose slots were taken over comes back as a replica of its successor.
    /// Wait for the cluster with [`RedisCluster::wait_ok`].
    ///
    /// Fails if `port` (or its bus port) has been taken by another process meanwhile.
    ///
    /// ```no_run
    /// use clouds_testkit::RedisCluster;
    /// use std::time::Duration;
    ///
    /// let mut cluster = RedisCluster::start()?;
    /// let port = cluster.ports()[5];
    /// cluster.kill_node(port)?;
    /// cluster.restart_node(port)?;
    /// cluster.wait_ok(Duration::from_secs(15))?;
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn restart_node(&mut self, port: u16) -> Result<(), TestkitError> {
        self.node_mut(port)?.server.restart()
    }

    /// Makes the replica on `replica_port` take over from its primary (`CLUSTER FAILOVER`,
    /// the coordinated manual failover: no write is lost) and waits (up to 20 s) until it
    /// is a primary and its old primary, if running, a replica.
    ///
    /// Fails if the node is not a running replica, or its primary is down (then wait for
    /// the automatic failover instead, or send `CLUSTER FAILOVER FORCE` with
    /// [`RedisCluster::command_on`]).
    ///
    /// ```no_run
    /// use clouds_testkit::{NodeRole, RedisCluster};
    ///
    /// let cluster = RedisCluster::start()?;
    /// let replica = cluster
    ///     .nodes()?
    ///     .into_iter()
    ///     .find(|n| n.role == NodeRole::Replica)
    ///     .expect("a replica");
    /// cluster.failover(replica.port)?;
    /// let node = cluster.nodes()?.into_iter().find(|n| n.port == replica.port).expect("node");
    /// assert_eq!(node.role, NodeRole::Primary);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn failover(&self, replica_port: u16) -> Result<(), TestkitError> {
        let node = self.node(replica_port)?;
        if !node.running() {
            return Err(cluster_error(
                format!("cannot fail over to 127.0.0.1:{replica_port}: it is killed"),
                String::new(),
            ));
        }
        let me = self.myself(replica_port)?;
        if !me.has_flag("slave") {
            return Err(cluster_error(
                format!("cannot fail over to 127.0.0.1:{replica_port}: it is not a replica"),
                String::new(),
            ));
        }
        let old_primary = me.primary_id.as_deref().and_then(|id| self.port_of(id));
        self.expect_ok(replica_port, &["CLUSTER", "FAILOVER"])?;
        self.poll(
            FAILOVER_TIMEOUT,
            &format!("waiting for 127.0.0.1:{replica_port} to become a primary"),
            || {
                let me = self.myself(replica_port).map_err(|e| e.to_string())?;
                if !me.has_flag("master") {
                    return Err(format!("127.0.0.1:{replica_port} is still a replica"));
                }
                if let Some(old) = old_primary.filter(|&p| self.pid(p).is_some()) {
                    let them = self.myself(old).map_err(|e| e.to_string())?;
                    if !them.has_flag("slave") {
                        return Err(format!(
                            "the old primary 127.0.0.1:{old} has not become a replica"
                        ));
                    }
                }
                Ok(())
            },
        )
    }

    /// Moves `slot`, and its keys, to the primary on `to_primary_port`, the way
    /// `redis-cli --cluster reshard` does: `CLUSTER SETSLOT slot IMPORTING` on the target,
    /// `MIGRATING` on the owner, `MIGRATE` the keys in batches, then `CLUSTER SETSLOT slot
    /// NODE` on the target, the old owner and every other running primary. Returns once
    /// every running node sees the target as the owner. Does nothing if the target owns
    /// the slot already.
    ///
    /// Fails if `slot` is not below 16384, the target is not a running primary, or a step
    /// is refused (the error quotes the reply). A half-done migration is not undone.
    ///
    /// ```no_run
    /// use clouds_testkit::RedisCluster;
    ///
    /// let cluster = RedisCluster::start()?;
    /// let slot = RedisCluster::slot_of("moving");
    /// let owner = cluster.primary_for_slot(slot)?;
    /// cluster.command_on(owner, &["SET", "moving", "along"])?;
    /// let target = *cluster.ports()[..3].iter().find(|&&p| p != owner).expect("another primary");
    /// cluster.migrate_slot(slot, target)?;
    /// assert_eq!(cluster.primary_for_slot(slot)?, target);
    /// assert_eq!(cluster.command_on(target, &["GET", "moving"])?.as_text().as_deref(), Some("along"));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn migrate_slot(&self, slot: u16, to_primary_port: u16) -> Result<(), TestkitError> {
        check_slot(slot)?;
        let to = to_primary_port;
        let target = self.node(to)?;
        if !target.running() || !self.myself(to)?.has_flag("master") {
            return Err(cluster_error(
                format!("cannot migrate slot {slot} to 127.0.0.1:{to}: not a running primary"),
                String::new(),
            ));
        }
        let from = self.primary_for_slot(slot)?;
        if from == to {
            return Ok(());
        }
        let to_id = target.id.clone();
        let from_id = self.node(from)?.id.clone();
        let slot_arg = slot.to_string();
        let started = Instant::now();
        self.expect_ok(
            to,
            &["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id],
        )?;
        self.expect_ok(
            from,
            &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id],
        )?;

        let to_arg = to.to_string();
        let timeout_arg = MIGRATE_IO_TIMEOUT_MS.to_string();
        let batch_arg = MIGRATE_BATCH.to_string();
        loop {
            let reply =
                self.command_on(from, &["CLUSTER", "GETKEYSINSLOT", &slot_arg, &batch_arg])?;
            let keys: Vec<Vec<u8>> = match &reply {
                RespValue::Array(Some(items)) => items
                    .iter()
                    .map(|item| item.as_bytes().map(<[u8]>::to_vec))
                    .collect::<Option<_>>()
                    .ok_or_else(|| unexpected("CLUSTER GETKEYSINSLOT", from, &reply))?,
                _ => return Err(unexpected("CLUSTER GETKEYSINSLOT", from, &reply)),
            };
            if keys.is_empty() {
                break;
            }
            if started.elapsed() >= MIGRATE_TIMEOUT {
                return Err(cluster_error(
                    format!("migrating slot {slot}: keys still left after {MIGRATE_TIMEOUT:?}"),
                    self.logs(),
                ));
            }
            let mut args: Vec<&[u8]> = vec![
                b"MIGRATE",
                b"127.0.0.1",
                to_arg.as_bytes(),
                b"",
                b"0",
                timeout_arg.as_bytes(),
                b"KEYS",
            ];
            args.extend(keys.iter().map(Vec::as_slice));
            match self.command_bytes_on(from, &args)? {
                RespValue::Simple(s) if s == "OK" || s == "NOKEY" => {}
                other => return Err(unexpected("MIGRATE", from, &other)),
            }
        }

        // The target first, so the slot is never without an owner, then everyone else.
        let mut announce = vec![to, from];
        for node in self.nodes.iter().filter(|n| n.running()) {
            let port = node.port();
            if !announce.contains(&port) && self.myself(port)?.has_flag("master") {
                announce.push(port);
            }
        }
        for port in announce {
            self.expect_ok(port, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id])?;
        }
        let remaining = MIGRATE_TIMEOUT.saturating_sub(started.elapsed());
        self.poll(
            remaining,
            &format!("waiting for every node to see slot {slot} on 127.0.0.1:{to}"),
            || {
                for node in self.nodes.iter().filter(|n| n.running()) {
                    let view = self.view(node.port()).map_err(|e| e.to_string())?;
                    let owner = view.iter().find(|l| l.has_flag("master") && l.owns(slot));
                    if owner.is_none_or(|l| l.id != to_id) {
                        return Err(format!(
                            "127.0.0.1:{} sees slot {slot} on {:?}",
                            node.port(),
                            owner.map(|l| l.port)
                        ));
                    }
                }
                Ok(())
            },
        )
    }

    /// Waits up to `within` until the cluster has settled: every running node says
    /// `cluster_state:ok`, none sees another running node as failing or unknown, all agree
    /// on who owns which slot, no slot is owned by a killed node, and every running
    /// replica's link to its primary is up.
    ///
    /// So after killing a primary this waits for a replica to take over its slots (which
    /// never happens if it had none: then this fails at the deadline).
    ///
    /// The error says what was still wrong and quotes the tail of each node's log.
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// let cluster = clouds_testkit::RedisCluster::start()?;
    /// cluster.wait_ok(Duration::from_secs(10))?;
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn wait_ok(&self, within: Duration) -> Result<(), TestkitError> {
        self.poll(
            within,
            "waiting for cluster_state:ok on every running node",
            || self.check(None),
        )
    }

    /// Whether the cluster has settled; `Err` says what is still wrong. With `expect`
    /// (primaries, replicas per primary), also that every node knows exactly that shape.
    fn check(&self, expect: Option<(usize, usize)>) -> Result<(), String> {
        let live: Vec<&Node> = self.nodes.iter().filter(|n| n.running()).collect();
        if live.is_empty() {
            return Err("no node is running".into());
        }
        let live_ids: HashSet<&str> = live.iter().map(|n| n.id.as_str()).collect();
        let mut reference: Option<(u16, Ownership)> = None;
        for node in live {
            let port = node.port();
            let info = self
                .text(port, &["CLUSTER", "INFO"])
                .map_err(|e| e.to_string())?;
            let state = info_field(&info, "cluster_state");
            if state != Some("ok") {
                return Err(format!(
                    "127.0.0.1:{port} says cluster_state:{}",
                    state.unwrap_or("?")
                ));
            }
            let view = self.view(port).map_err(|e| e.to_string())?;
            for line in &view {
                let troubled = ["fail", "fail?", "handshake", "noaddr"]
                    .into_iter()
                    .find(|flag| line.has_flag(flag));
                let running = live_ids.contains(line.id.as_str());
                if let Some(flag) = troubled
                    && running
                {
                    return Err(format!(
                        "127.0.0.1:{port} sees 127.0.0.1:{} as {flag}",
                        line.port
                    ));
                }
                if !running && line.has_flag("master") && !line.slots.is_empty() {
                    return Err(format!(
                        "127.0.0.1:{port} still sees slots on the killed node 127.0.0.1:{}",
                        line.port
                    ));
                }
            }
            if let Some((primaries, replicas)) = expect {
                let owners = view
                    .iter()
                    .filter(|l| l.has_flag("master") && !l.slots.is_empty())
                    .count();
                let followers = view.iter().filter(|l| l.has_flag("slave")).count();
                if view.len() != self.nodes.len()
                    || owners != primaries
                    || followers != primaries * replicas
                {
                    return Err(format!(
                        "127.0.0.1:{port} knows {} nodes: {owners} primaries with slots and \
                         {followers} replicas (expecting {primaries} and {})",
                        view.len(),
                        primaries * replicas
                    ));
                }
            }
            let ownership = ownership(&view);
            match &reference {
                None => reference = Some((port, ownership)),
                Some((first, theirs)) if *theirs != ownership => {
                    return Err(format!(
                        "127.0.0.1:{port} and 127.0.0.1:{first} disagree about the slots' owners"
                    ));
                }
                Some(_) => {}
            }
            let me = view
                .iter()
                .find(|l| l.has_flag("myself"))
                .ok_or_else(|| format!("127.0.0.1:{port} does not list itself"))?;
            if me.has_flag("slave") {
                let replication = self
                    .text(port, &["INFO", "replication"])
                    .map_err(|e| e.to_string())?;
                let link = info_field(&replication, "master_link_status");
                if link != Some("up") {
                    return Err(format!(
                        "replica 127.0.0.1:{port} has master_link_status:{}",
                        link.unwrap_or("?")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Calls `probe` until it returns `Ok`, for up to `within` (at least once).
    fn poll<T>(
        &self,
        within: Duration,
        what: &str,
        mut probe: impl FnMut() -> Result<T, String>,
    ) -> Result<T, TestkitError> {
        let started = Instant::now();
        loop {
            match probe() {
                Ok(value) => return Ok(value),
                Err(last) if started.elapsed() >= within => {
                    return Err(cluster_error(
                        format!("{what}: not done after {:.1?}", started.elapsed()),
                        format!("last seen: {last}\n{}", self.logs()),
                    ));
                }
                Err(_) => thread::sleep(POLL_INTERVAL),
            }
        }
    }

    fn node(&self, port: u16) -> Result<&Node, TestkitError> {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .ok_or_else(|| no_such_node(port))
    }

    fn node_mut(&mut self, port: u16) -> Result<&mut Node, TestkitError> {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .ok_or_else(|| no_such_node(port))
    }

    /// The port of the node with cluster node id `id`.
    fn port_of(&self, id: &str) -> Option<u16> {
        self.nodes.iter().find(|n| n.id == id).map(Node::port)
    }

    /// The node on `port`'s `CLUSTER NODES`, parsed.
    fn view(&self, port: u16) -> Result<Vec<NodeLine>, TestkitError> {
        let text = self.text(port, &["CLUSTER", "NODES"])?;
        parse_nodes(&text).map_err(|e| {
            TestkitError::Protocol(format!("CLUSTER NODES from 127.0.0.1:{port}: {e}"))
        })
    }

    /// The node on `port`'s own line of its `CLUSTER NODES`.
    fn myself(&self, port: u16) -> Result<NodeLine, TestkitError> {
        self.view(port)?
            .into_iter()
            .find(|l| l.has_flag("myself"))
            .ok_or_else(|| {
                TestkitError::Protocol(format!(
                    "CLUSTER NODES from 127.0.0.1:{port} has no `myself` line"
                ))
            })
    }

    /// A command's reply as text; an error reply is an error.
    fn text(&self, port: u16, args: &[&str]) -> Result<String, TestkitError> {
        let reply = self.command_on(port, args)?;
        match reply.as_text() {
            Some(text) => Ok(text),
            None => Err(unexpected(&args.join(" "), port, &reply)),
        }
    }

    /// Runs a command that must answer `+OK`.
    fn expect_ok(&self, port: u16, args: &[&str]) -> Result<(), TestkitError> {
        match self.command_on(port, args)? {
            RespValue::Simple(s) if s == "OK" => Ok(()),
            other => Err(unexpected(&args.join(" "), port, &other)),
        }
    }

    /// The tail of every node's log, for errors.
    fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let state = match node.server.pid() {
                Some(pid) => format!("pid {pid}"),
                None => "killed".to_owned(),
            };
            out.push_str(&format!(
                "=== node 127.0.0.1:{} ({state}, id {}) ===\n",
                node.port(),
                node.id
            ));
            let tail = node.server.log_tail();
            let lines: Vec<&str> = tail.lines().collect();
            for line in &lines[lines.len().saturating_sub(LOG_LINES_PER_NODE)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<(u16, Option<u32>)> = self
            .nodes
            .iter()
            .map(|n| (n.port(), n.server.pid()))
            .collect();
        f.debug_struct("RedisCluster")
            .field("primaries", &self.primaries)
            .field("replicas_per_primary", &self.replicas_per_primary)
            .field("nodes (port, pid)", &nodes)
            .field("startup", &format_args!("{}", self.startup))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

// No Drop of its own: each node's `RedisServer` kills and reaps its process and removes its
// directory when the cluster's fields are dropped (also while a test panics).

/// Launches one cluster node on `port`, or on another free port if that one is taken;
/// serving TLS only (client, cluster bus and replication) with `tls`.
fn launch_node(port: u16, tls: Option<&TlsFiles>) -> Result<Node, TestkitError> {
    let node_timeout = NODE_TIMEOUT_MS.to_string();
    let args = [
        "--cluster-enabled",
        "yes",
        "--cluster-node-timeout",
        &node_timeout,
        "--repl-diskless-sync-delay",
        "0",
    ];
    let mut server = match tls {
        Some(files) => {
            let mut server = RedisServer::unstarted_tls(files, &args)?;
            server.push_args(["--tls-cluster", "yes", "--tls-replication", "yes"]);
            server
        }
        None => RedisServer::unstarted(&args)?,
    };
    let conf = server.dir().join(NODES_FILE);
    // Relative to --dir (Redis changes into it) should the path not be UTF-8.
    let conf = conf.to_str().unwrap_or(NODES_FILE).to_owned();
    server.push_args(["--cluster-config-file".to_owned(), conf]);
    let mut port = port;
    let mut attempt = 1;
    loop {
        match server.launch_on(port) {
            Ok(()) => break,
            Err(err) if port_taken(&err) && attempt < PORT_ATTEMPTS => {
                attempt += 1;
                port = reserve_port(&mut Vec::new())?;
            }
            Err(err) if port_taken(&err) => {
                return Err(TestkitError::NoFreePort {
                    attempts: PORT_ATTEMPTS,
                    log: err.to_string(),
                });
            }
            Err(err) => return Err(err),
        }
    }
    let id = match server.command(&["CLUSTER", "MYID"])? {
        RespValue::Bulk(Some(id)) => String::from_utf8_lossy(&id).into_owned(),
        other => return Err(unexpected("CLUSTER MYID", port, &other)),
    };
    Ok(Node { id, server })
}

/// Asks the OS for a free loopback port whose cluster bus port (+10000) is valid and free
/// too, and keeps both bound in `held` (so later picks differ) until the caller drops them.
fn reserve_port(held: &mut Vec<TcpListener>) -> io::Result<u16> {
    // Ports found unsuitable stay bound until we return, so they are not offered again.
    let mut rejected = Vec::new();
    let mut last_err = None;
    for _ in 0..PORT_PICKS {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let Some(bus) = port.checked_add(BUS_PORT_OFFSET) else {
            rejected.push(listener);
            continue;
        };
        match TcpListener::bind((Ipv4Addr::LOCALHOST, bus)) {
            Ok(bus_listener) => {
                held.push(listener);
                held.push(bus_listener);
                return Ok(port);
            }
            Err(e) => {
                last_err = Some(e);
                rejected.push(listener);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "no free loopback port with a free cluster bus port (+{BUS_PORT_OFFSET}) in \
             {PORT_PICKS} tries (last error: {last_err:?})"
        ),
    ))
}

/// Finds `redis-cli`: `$REDIS_CLI` if set (and non-empty), else next to `redis-server`,
/// else on `PATH`.
fn redis_cli_path() -> Result<PathBuf, TestkitError> {
    if let Some(explicit) = std::env::var_os("REDIS_CLI").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(explicit);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(TestkitError::NotInstalled(format!(
                "REDIS_CLI is set to {}, which is not an executable file; {CLI_INSTALL_HINT}",
                path.display()
            )))
        };
    }
    let beside_server = redis_server_path()
        .ok()
        .and_then(|server| server.parent().map(|dir| dir.join("redis-cli")));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("redis-cli"));
    beside_server
        .into_iter()
        .chain(on_path)
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            TestkitError::NotInstalled(format!("redis-cli was not found; {CLI_INSTALL_HINT}"))
        })
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum of Redis Cluster's key
/// slots.
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// For a replica, the id of its primary.
    primary_id: Option<String>,
    config_epoch: u64,
    /// Owned slots; slots being imported or migrated (`[slot->-id]`) are left out.
    slots: Vec<RangeInclusive<u16>>,
}

impl NodeLine {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|range| range.contains(&slot))
    }
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@cport[,hostname]> <flags> <primary> <ping-sent>
/// <pong-recv> <config-epoch> <link-state> <slot> <slot> ...`.
fn parse_nodes(text: &str) -> Result<Vec<NodeLine>, String> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(parse_node_line)
        .collect()
}

fn parse_node_line(line: &str) -> Result<NodeLine, String> {
    let bad = |what: &str| format!("{what} in {line:?}");
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return Err(bad("fewer than 8 fields"));
    }
    let address = fields[1].split(['@', ',']).next().unwrap_or_default();
    let port = address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .ok_or_else(|| bad("no port"))?;
    let config_epoch = fields[6]
        .parse()
        .map_err(|_| bad("a bad configuration epoch"))?;
    let mut slots = Vec::new();
    for token in &fields[8..] {
        if token.starts_with('[') {
            continue;
        }
        let parse = |s: &str| {
            s.parse::<u16>()
                .ok()
                .filter(|&slot| slot < SLOTS)
                .ok_or_else(|| bad("a bad slot"))
        };
        let range = match token.split_once('-') {
            Some((start, end)) => parse(start)?..=parse(end)?,
            None => parse(token)?..=parse(token)?,
        };
        slots.push(range);
    }
    slots.sort_by_key(|range| *range.start());
    Ok(NodeLine {
        id: fields[0].to_owned(),
        port,
        flags: fields[2].split(',').map(str::to_owned).collect(),
        primary_id: (fields[3] != "-").then(|| fields[3].to_owned()),
        config_epoch,
        slots,
    })
}

/// Who owns what in one view: (first slot, last slot, owner id), sorted.
type Ownership = Vec<(u16, u16, String)>;

/// The [`Ownership`] of one `CLUSTER NODES` view.
fn ownership(view: &[NodeLine]) -> Ownership {
    let mut owned: Ownership = view
        .iter()
        .filter(|l| l.has_flag("master"))
        .flat_map(|l| {
            l.slots
                .iter()
                .map(|range| (*range.start(), *range.end(), l.id.clone()))
        })
        .collect();
    owned.sort();
    owned
}

/// The value of `name:` in an `INFO`-style reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// Removes the colour escapes (`ESC [ ... m`) redis-cli writes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn check_slot(slot: u16) -> Result<(), TestkitError> {
    if slot < SLOTS {
        Ok(())
    } else {
        Err(cluster_error(
            format!("slot {slot} does not exist (slots are 0 to {})", SLOTS - 1),
            String::new(),
        ))
    }
}

fn cluster_error(what: String, details: String) -> TestkitError {
    TestkitError::Cluster { what, details }
}

fn no_such_node(port: u16) -> TestkitError {
    cluster_error(
        format!("no node of this cluster has port {port}"),
        String::new(),
    )
}

fn unexpected(command: &str, port: u16, reply: &RespValue) -> TestkitError {
    cluster_error(
        format!("`{command}` on 127.0.0.1:{port} answered {reply}"),
        String::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ping;
    use std::path::Path;
    use std::sync::mpsc;

    /// Generous deadline for the cluster to settle after a fault.
    const WITHIN: Duration = Duration::from_secs(15);

    /// True once the process is gone (reaped: no /proc entry, not even a zombie).
    fn gone(pid: u32) -> bool {
        !cfg!(target_os = "linux") || !Path::new(&format!("/proc/{pid}")).exists()
    }

    fn node(nodes: &[ClusterNode], port: u16) -> &ClusterNode {
        nodes.iter().find(|n| n.port == port).expect("node listed")
    }

    fn text(cluster: &RedisCluster, port: u16, args: &[&str]) -> Option<String> {
        cluster.command_on(port, args).expect("reply").as_text()
    }

    #[test]
    fn slot_function_known_values() {
        // The CRC16 check value, and examples from the Redis Cluster specification.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(RedisCluster::slot_of("123456789"), 12739);
        assert_eq!(RedisCluster::slot_of("foo"), 12182);
        assert_eq!(RedisCluster::slot_of("bar"), 5061);
        assert_eq!(RedisCluster::slot_of(""), 0);
        let tagged = RedisCluster::slot_of("user1000");
        assert_eq!(RedisCluster::slot_of("{user1000}.following"), tagged);
        assert_eq!(RedisCluster::slot_of("{user1000}.followers"), tagged);
        assert_eq!(RedisCluster::slot_of(b"x{user1000}\xff"), tagged);
        // Only the first `{` counts, up to the first `}` after it.
        assert_eq!(
            RedisCluster::slot_of("foo{bar}{zap}"),
            RedisCluster::slot_of("bar")
        );
        assert_eq!(
            RedisCluster::slot_of("foo{{bar}}zap"),
            RedisCluster::slot_of("{bar")
        );
        // An empty tag, or no closing brace, means the whole name.
        assert_eq!(
            RedisCluster::slot_of("foo{}{bar}"),
            crc16_xmodem(b"foo{}{bar}") % SLOTS
        );
        assert_eq!(
            RedisCluster::slot_of("foo{bar"),
            crc16_xmodem(b"foo{bar") % SLOTS
        );
        assert_eq!(RedisCluster::slot_of("}{x}"), RedisCluster::slot_of("x"));
    }

    #[test]
    fn slot_of_matches_cluster_keyslot() {
        // One cluster-enabled node answers CLUSTER KEYSLOT without being in a cluster.
        let server = RedisServer::start_with(&["--cluster-enabled", "yes"]).expect("start");
        let mut keys: Vec<Vec<u8>> = [
            "",
            "foo",
            "123456789",
            "{user1000}.following",
            "foo{}{bar}",
            "foo{{bar}}zap",
            "foo{bar}{zap}",
            "{}",
            "{",
            "}",
            "}{",
            "{a}",
            // Sharded pub/sub channels and registry keys the way clouds names them.
            "clouds:{calc}:req",
            "clouds:{calc}:reply:4f2a9c",
            "clouds:{calc}:registry",
            "{clouds:calc}:events",
            "clouds:calc:no-tag",
        ]
        .iter()
        .map(|k| k.as_bytes().to_vec())
        .collect();
        keys.push(vec![0, 0xff, b'{', 0x80, b'}', b'\r', b'\n']);
        keys.push((0..=255).collect());
        for i in 0..200 {
            keys.push(format!("key:{i}").into_bytes());
            keys.push(format!("{{tag{i}}}:{i}").into_bytes());
        }
        for key in &keys {
            let reply = server
                .command_bytes(&[b"CLUSTER", b"KEYSLOT", key])
                .expect("CLUSTER KEYSLOT");
            assert_eq!(
                reply.as_int(),
                Some(i64::from(RedisCluster::slot_of(key))),
                "key {:?}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn node_lines_parse() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host-4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922 [5461->-e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca]
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461-<-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 1426238316232 0 5 disconnected 16383 10923-16382
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 :0@0 slave,noaddr 6ec23923021cf3ffec47632106199cb7f496ce01 0 0 6 disconnected
";
        let view = parse_nodes(text).expect("parses");
        assert_eq!(view.len(), 5);
        assert_eq!(view[0].port, 30004);
        assert_eq!(
            view[0].primary_id.as_deref(),
            Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca")
        );
        assert!(view[0].has_flag("slave") && view[0].slots.is_empty());
        assert_eq!(
            view[1].slots,
            vec![5461..=10922],
            "migration marker skipped"
        );
        assert!(view[2].has_flag("myself") && view[2].has_flag("master"));
        assert_eq!(view[2].primary_id, None);
        assert_eq!(view[3].slots, vec![10923..=16382, 16383..=16383]);
        assert_eq!(view[3].config_epoch, 5);
        assert!(view[3].owns(16383) && !view[3].owns(0));
        assert_eq!(view[4].port, 0);
        assert_eq!(ownership(&view).len(), 4);

        assert!(parse_nodes("abc 127.0.0.1:1@2 master").is_err());
        assert!(parse_node_line("a 127.0.0.1:1@2 master - 0 0 1 connected 16384").is_err());
        assert!(parse_node_line("a nowhere master - 0 0 1 connected").is_err());
        assert_eq!(
            info_field("# Cluster\r\ncluster_state:ok\r\n", "cluster_state"),
            Some("ok")
        );
        assert_eq!(info_field("cluster_state_x:1", "cluster_state"), None);
        assert_eq!(
            strip_ansi("\u{1b}[29;1m>>> ok\u{1b}[0m done"),
            ">>> ok done"
        );
    }

    #[test]
    fn shapes_are_checked_before_anything_starts() {
        for (primaries, replicas) in [(0, 0), (2, 1), (usize::MAX / 2, 3)] {
            let err = RedisCluster::start_with(primaries, replicas).expect_err("refused");
            assert!(matches!(err, TestkitError::Cluster { .. }), "{err}");
        }
        let err = RedisCluster::start_with(1, 5).expect_err("refused");
        assert!(err.to_string().contains("at least 3 primaries"), "{err}");
    }

    #[test]
    fn start_covers_all_slots_routes_commands_and_drop_cleans_up() {
        let cluster = RedisCluster::start().expect("start cluster");
        eprintln!("cluster started: {}", cluster.startup());
        assert!(format!("{cluster:?}").contains("settle"), "{cluster:?}");
        let ports = cluster.ports();
        assert_eq!(ports.len(), 6);
        assert_eq!(ports.iter().collect::<HashSet<_>>().len(), 6);

        let nodes = cluster.nodes().expect("nodes");
        assert_eq!(nodes.len(), 6);
        let mut owners = vec![0u8; usize::from(SLOTS)];
        let primaries: Vec<&ClusterNode> = nodes
            .iter()
            .filter(|n| n.role == NodeRole::Primary)
            .collect();
        assert_eq!(primaries.len(), 3, "{nodes:?}");
        for primary in &primaries {
            assert!(!primary.slots.is_empty(), "{primary:?}");
            for slot in primary.slots.iter().flat_map(|r| r.clone()) {
                owners[usize::from(slot)] += 1;
            }
            let replicas: Vec<&ClusterNode> = nodes
                .iter()
                .filter(|n| n.role == NodeRole::Replica && n.primary_port == Some(primary.port))
                .collect();
            assert_eq!(replicas.len(), 1, "replicas of {}: {nodes:?}", primary.port);
        }
        assert!(owners.iter().all(|&n| n == 1), "every slot owned once");
        for node in &nodes {
            assert!(node.pid.is_some());
            assert_eq!(node.id.len(), 40);
            assert!(u32::from(node.port) + u32::from(BUS_PORT_OFFSET) < 65536);
            if node.role == NodeRole::Replica {
                assert!(node.slots.is_empty());
            }
        }

        let p = &ports;
        assert_eq!(cluster.urls()[2], format!("redis://127.0.0.1:{}", p[2]));
        assert_eq!(
            cluster.seed_url(),
            format!(
                "redis-cluster://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}\
                 &node=127.0.0.1:{}&node=127.0.0.1:{}&node=127.0.0.1:{}",
                p[0], p[1], p[2], p[3], p[4], p[5]
            )
        );

        // SET/GET through the owner of each key's slot, until every primary got a key.
        let mut used = HashSet::new();
        for i in 0.. {
            let key = format!("key-{i}");
            let slot = RedisCluster::slot_of(&key);
            let port = cluster.primary_for_slot(slot).expect("owner");
            assert!(node(&nodes, port).owns(slot));
            let value = i.to_string();
            // WAIT on the writing connection: the write has reached the replica.
            let replies = cluster
                .commands_on(port, &[&["SET", &key, &value], &["WAIT", "1", "5000"]])
                .expect("SET, WAIT");
            assert_eq!(replies[0], RespValue::Simple("OK".into()));
            assert_eq!(replies[1].as_int(), Some(1), "replicated: {replies:?}");
            assert_eq!(text(&cluster, port, &["GET", &key]), Some(value.clone()));
            let replica = nodes
                .iter()
                .find(|n| n.primary_port == Some(port))
                .expect("its replica");
            let replies = cluster
                .commands_on(replica.port, &[&["READONLY"], &["GET", &key]])
                .expect("READONLY, GET");
            assert_eq!(replies[1].as_text(), Some(value), "{replies:?}");
            // Another primary redirects.
            let other = primaries.iter().find(|n| n.port != port).expect("other");
            let moved = cluster
                .command_on(other.port, &["GET", &key])
                .expect("reply");
            assert_eq!(
                moved,
                RespValue::Error(format!("MOVED {slot} 127.0.0.1:{port}"))
            );
            used.insert(port);
            if used.len() == 3 {
                break;
            }
        }
        assert!(cluster.primary_for_slot(SLOTS).is_err());
        assert!(cluster.command_on(1, &["PING"]).is_err(), "not a node");

        let pids: Vec<u32> = nodes.iter().filter_map(|n| n.pid).collect();
        let dirs: Vec<PathBuf> = cluster
            .nodes
            .iter()
            .map(|n| n.server.dir().to_path_buf())
            .collect();
        assert!(dirs.iter().all(|d| d.join(NODES_FILE).is_file()));
        drop(cluster);
        for pid in pids {
            assert!(gone(pid), "redis-server pid {pid} left behind");
        }
        for dir in dirs {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
        for port in ports {
            assert!(!ping(
                &format!("127.0.0.1:{port}"),
                Duration::from_millis(200)
            ));
        }
    }

    #[test]
    fn a_killed_primary_is_replaced_by_its_replica_and_comes_back_as_one() {
        let mut cluster = RedisCluster::start().expect("start cluster");
        let slot = RedisCluster::slot_of("survivor");
        let primary = cluster.primary_for_slot(slot).expect("owner");
        let nodes = cluster.nodes().expect("nodes");
        let replica = nodes
            .iter()
            .find(|n| n.primary_port == Some(primary))
            .expect("its replica")
            .port;
        // WAIT counts the replicas that have this connection's writes: the same connection.
        let replies = cluster
            .commands_on(
                primary,
                &[&["SET", "survivor", "yes"], &["WAIT", "1", "5000"]],
            )
            .expect("SET, WAIT");
        assert_eq!(replies[1].as_int(), Some(1), "replicated: {replies:?}");

        let pid = cluster.pid(primary).expect("running");
        cluster.kill_node(primary).expect("kill");
        let killed = Instant::now();
        assert!(gone(pid));
        assert_eq!(cluster.pid(primary), None);
        cluster
            .kill_node(primary)
            .expect("killing again does nothing");
        assert!(cluster.command_on(primary, &["PING"]).is_err());
        // Nobody has noticed yet (node timeout), but the cluster is not settled: the killed
        // node still owns its slots.
        let err = cluster.wait_ok(Duration::ZERO).expect_err("not settled");
        let message = err.to_string();
        assert!(
            message.contains(&format!(
                "still sees slots on the killed node 127.0.0.1:{primary}"
            )),
            "{message}"
        );
        assert!(
            message.contains("killed, id"),
            "the node logs are quoted: {message}"
        );
        let err = cluster.primary_for_slot(slot).expect_err("owner is down");
        assert!(
            err.to_string().contains("no running primary owns slot"),
            "{err}"
        );

        // The replica takes over within the node timeout plus election and a margin.
        let limit = Duration::from_millis(NODE_TIMEOUT_MS) + Duration::from_secs(8);
        loop {
            let me = cluster.myself(replica).expect("replica answers");
            if me.has_flag("master") && me.owns(slot) {
                break;
            }
            assert!(killed.elapsed() < limit, "no promotion after {limit:?}");
            thread::sleep(POLL_INTERVAL);
        }
        eprintln!("replica promoted {:.2?} after the kill", killed.elapsed());
        cluster
            .wait_ok(WITHIN)
            .expect("cluster ok without the killed node");
        eprintln!("cluster_state ok {:.2?} after the kill", killed.elapsed());
        assert_eq!(cluster.primary_for_slot(slot).expect("owner"), replica);
        assert_eq!(
            cluster
                .command_on(replica, &["GET", "survivor"])
                .expect("GET"),
            RespValue::Bulk(Some(b"yes".to_vec())),
            "{:?}",
            cluster.nodes()
        );
        let nodes = cluster.nodes().expect("nodes");
        let dead = node(&nodes, primary);
        assert_eq!(dead.pid, None);
        assert!(dead.slots.is_empty(), "{dead:?}");

        // Back on the same port with the same node id, now a replica of its successor.
        cluster.restart_node(primary).expect("restart");
        assert!(cluster.pid(primary).is_some_and(|p| p != pid));
        cluster
            .wait_ok(WITHIN)
            .expect("cluster ok with the node back");
        let nodes = cluster.nodes().expect("nodes");
        let back = node(&nodes, primary);
        assert_eq!(back.id, dead.id);
        assert_eq!(back.role, NodeRole::Replica, "{nodes:?}");
        assert_eq!(back.primary_port, Some(replica));
        assert_eq!(
            nodes.iter().filter(|n| n.role == NodeRole::Primary).count(),
            3
        );
    }

    #[test]
    fn manual_failover_swaps_roles() {
        let cluster = RedisCluster::start().expect("start cluster");
        let nodes = cluster.nodes().expect("nodes");
        let replica = nodes
            .iter()
            .find(|n| n.role == NodeRole::Replica)
            .expect("a replica");
        let primary = replica.primary_port.expect("its primary");
        let slots = node(&nodes, primary).slots.clone();

        let started = Instant::now();
        cluster.failover(replica.port).expect("failover");
        eprintln!("manual failover took {:.2?}", started.elapsed());
        let nodes = cluster.nodes().expect("nodes");
        let promoted = node(&nodes, replica.port);
        assert_eq!(promoted.role, NodeRole::Primary);
        assert_eq!(promoted.slots, slots);
        let demoted = node(&nodes, primary);
        assert_eq!(demoted.role, NodeRole::Replica);
        assert_eq!(demoted.primary_port, Some(replica.port));
        assert!(demoted.slots.is_empty());
        cluster.wait_ok(WITHIN).expect("cluster ok");
        assert_eq!(
            cluster.primary_for_slot(*slots[0].start()).expect("owner"),
            replica.port
        );

        let err = cluster.failover(replica.port).expect_err("a primary");
        assert!(err.to_string().contains("not a replica"), "{err}");
        assert!(cluster.failover(1).is_err(), "not a node");
    }

    #[test]
    fn migrate_slot_moves_the_keys_and_the_ownership() {
        let cluster = RedisCluster::start().expect("start cluster");
        let slot = RedisCluster::slot_of("{moving}");
        let from = cluster.primary_for_slot(slot).expect("owner");
        let nodes = cluster.nodes().expect("nodes");
        let to = nodes
            .iter()
            .find(|n| n.role == NodeRole::Primary && n.port != from)
            .expect("another primary")
            .port;
        // More keys than one MIGRATE batch.
        let keys = MIGRATE_BATCH + 20;
        for i in 0..keys {
            let key = format!("{{moving}}:{i}");
            cluster
                .command_on(from, &["SET", &key, &i.to_string()])
                .expect("SET");
        }

        let started = Instant::now();
        cluster.migrate_slot(slot, to).expect("migrate");
        eprintln!(
            "migrating slot {slot} ({keys} keys) took {:.2?}",
            started.elapsed()
        );
        assert_eq!(cluster.primary_for_slot(slot).expect("owner"), to);
        let nodes = cluster.nodes().expect("nodes");
        assert!(node(&nodes, to).owns(slot));
        assert!(!node(&nodes, from).owns(slot));
        let slot_arg = slot.to_string();
        let count = |port| {
            cluster
                .command_on(port, &["CLUSTER", "COUNTKEYSINSLOT", &slot_arg])
                .expect("COUNTKEYSINSLOT")
                .as_int()
        };
        assert_eq!(count(to), Some(keys as i64));
        assert_eq!(count(from), Some(0));
        assert_eq!(
            text(&cluster, to, &["GET", "{moving}:7"]).as_deref(),
            Some("7")
        );
        assert_eq!(
            cluster
                .command_on(from, &["GET", "{moving}:7"])
                .expect("reply"),
            RespValue::Error(format!("MOVED {slot} 127.0.0.1:{to}"))
        );
        // CLUSTER SHARDS, asked of a replica, agrees.
        let replica = nodes
            .iter()
            .find(|n| n.role == NodeRole::Replica)
            .expect("a replica")
            .port;
        let shards = cluster
            .command_on(replica, &["CLUSTER", "SHARDS"])
            .expect("CLUSTER SHARDS");
        assert!(shard_of(&shards, slot).contains(&to), "{shards}");
        cluster.wait_ok(WITHIN).expect("cluster ok");

        cluster
            .migrate_slot(slot, to)
            .expect("already there: nothing to do");
        assert!(cluster.migrate_slot(SLOTS, to).is_err());
        let err = cluster
            .migrate_slot(slot, replica)
            .expect_err("not a primary");
        assert!(err.to_string().contains("not a running primary"), "{err}");
    }

    /// The ports of the nodes of the shard owning `slot`, from a `CLUSTER SHARDS` reply.
    fn shard_of(shards: &RespValue, slot: u16) -> Vec<u16> {
        let RespValue::Array(Some(shards)) = shards else {
            return Vec::new();
        };
        for shard in shards {
            let RespValue::Array(Some(fields)) = shard else {
                continue;
            };
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|pair| pair[0].as_text().as_deref() == Some(name))
                    .map(|pair| &pair[1])
            };
            let ranges: Vec<i64> = match field("slots") {
                Some(RespValue::Array(Some(items))) => {
                    items.iter().filter_map(RespValue::as_int).collect()
                }
                _ => continue,
            };
            let owns = ranges
                .chunks(2)
                .any(|r| r.len() == 2 && (r[0]..=r[1]).contains(&i64::from(slot)));
            if !owns {
                continue;
            }
            let Some(RespValue::Array(Some(nodes))) = field("nodes") else {
                continue;
            };
            return nodes
                .iter()
                .filter_map(|node| match node {
                    RespValue::Array(Some(kv)) => kv
                        .chunks(2)
                        .find(|pair| pair[0].as_text().as_deref() == Some("port"))
                        .and_then(|pair| pair[1].as_int())
                        .and_then(|port| u16::try_from(port).ok()),
                    _ => None,
                })
                .collect();
        }
        Vec::new()
    }

    #[test]
    fn a_panicking_test_leaks_no_node() {
        let (tx, rx) = mpsc::channel();
        let result = thread::spawn(move || {
            let cluster = RedisCluster::start_with(3, 0).expect("start cluster");
            let pids: Vec<u32> = cluster
                .ports()
                .iter()
                .filter_map(|&p| cluster.pid(p))
                .collect();
            tx.send((pids, cluster.ports())).expect("send");
            panic!("deliberate panic while the cluster runs");
        })
        .join();
        assert!(result.is_err());
        let (pids, ports) = rx.recv().expect("cluster info");
        assert_eq!(pids.len(), 3);
        for pid in pids {
            assert!(gone(pid), "redis-server pid {pid} left behind");
        }
        for port in ports {
            assert!(!ping(
                &format!("127.0.0.1:{port}"),
                Duration::from_millis(200)
            ));
        }
    }
}
