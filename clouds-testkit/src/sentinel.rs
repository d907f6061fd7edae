//! A throwaway Redis Sentinel deployment: one primary, one replica and three sentinels, each a
//! [`RedisServer`] on a free loopback port, all stopped (by PID) when it is dropped.
//!
//! The sentinels watch the primary as service [`RedisSentinel::SERVICE`] with a quorum of 2,
//! declare it down after 1 s without an answer and fail over to the replica. Each sentinel
//! runs `redis-server <its sentinel.conf> --sentinel`: Sentinel rewrites that file, so it lives
//! in the sentinel's own temporary directory.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::TestkitError;
use crate::resp::RespValue;
use crate::server::{RedisServer, TlsFiles, free_port, port_taken};

/// How long the primary may be silent before a sentinel thinks it down.
const DOWN_AFTER_MS: u64 = 1000;
/// Sentinel's failover timeout (also the pause before it tries a failed failover again).
const FAILOVER_TIMEOUT_MS: u64 = 5000;
/// How long [`RedisSentinel::start`] waits for the sentinels to know each other and the
/// replica.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two polls of the deployment's state.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How many ports a sentinel tries when its port turns out to be taken.
const PORT_ATTEMPTS: u32 = 5;

/// A primary, a replica and three sentinels on free loopback ports.
///
/// ```no_run
/// use clouds_testkit::RedisSentinel;
/// use std::time::Duration;
///
/// let mut deployment = RedisSentinel::start()?;
/// let url = deployment.url(); // redis-sentinel://127.0.0.1:…?sentinelServiceName=clouds&node=…
/// let old = deployment.kill_primary()?;
/// let new = deployment.wait_failover(old, Duration::from_secs(20))?;
/// assert_ne!(old, new);
/// # Ok::<(), clouds_testkit::TestkitError>(())
/// ```
#[derive(Debug)]
pub struct RedisSentinel {
    /// The primary and the replica (whichever is which now).
    data: Vec<RedisServer>,
    sentinels: Vec<RedisServer>,
    /// Every process serves TLS only ([`RedisSentinel::start_tls`]).
    tls: bool,
}

impl RedisSentinel {
    /// The service name the sentinels monitor.
    pub const SERVICE: &'static str = "clouds";

    /// Starts the primary, its replica and three sentinels, and waits until the replica is
    /// in sync and every sentinel knows the replica and the two other sentinels.
    ///
    /// ```no_run
    /// let deployment = clouds_testkit::RedisSentinel::start()?;
    /// assert_eq!(deployment.sentinel_ports().len(), 3);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn start() -> Result<RedisSentinel, TestkitError> {
        RedisSentinel::launch(None)
    }

    /// Like [`RedisSentinel::start`], every process serving TLS only (`--port 0 --tls-port
    /// P`) with the certificate, key and CA of `files`, and `--tls-replication yes`
    /// everywhere: the replica replicates over TLS and the sentinels speak TLS to the data
    /// nodes and to each other (announcing their TLS ports). [`RedisSentinel::url`] is then
    /// `rediss-sentinel://`: a client speaks TLS to the sentinels and to the primary they
    /// name, and must trust `files.ca` for the address 127.0.0.1 (the server certificate
    /// needs that IP address among its names). The helpers speak TLS too (see
    /// [`RedisServer::start_tls`]).
    ///
    /// ```no_run
    /// use clouds_testkit::{RedisSentinel, TlsFiles};
    ///
    /// let files = TlsFiles::new("server.pem", "server.key", "ca.pem");
    /// let deployment = RedisSentinel::start_tls(&files)?;
    /// assert!(deployment.url().starts_with("rediss-sentinel://127.0.0.1:"));
    /// assert_eq!(deployment.role_of(deployment.primary_port()?)?, "master");
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn start_tls(files: &TlsFiles) -> Result<RedisSentinel, TestkitError> {
        RedisSentinel::launch(Some(files))
    }

    /// Starts the deployment, over TLS with `tls`.
    fn launch(tls: Option<&TlsFiles>) -> Result<RedisSentinel, TestkitError> {
        let data_node = |args: &[&str]| match tls {
            Some(files) => {
                let mut all = vec!["--tls-replication", "yes"];
                all.extend_from_slice(args);
                RedisServer::unstarted_tls(files, &all)?.start_on_free_port()
            }
            None => RedisServer::start_with(args),
        };
        let primary = data_node(&[])?;
        let primary_port = primary.port().to_string();
        let replica = data_node(&["--replicaof", "127.0.0.1", &primary_port])?;
        let mut sentinels = Vec::with_capacity(3);
        for _ in 0..3 {
            sentinels.push(start_sentinel(primary.port(), tls)?);
        }
        let deployment = RedisSentinel {
            data: vec![primary, replica],
            sentinels,
            tls: tls.is_some(),
        };
        deployment.wait_settled(SETTLE_TIMEOUT)?;
        Ok(deployment)
    }

    /// The URL clouds connects with: the three sentinels and the service name
    /// (`rediss-sentinel://` for a [TLS deployment](RedisSentinel::start_tls)).
    ///
    /// ```no_run
    /// let deployment = clouds_testkit::RedisSentinel::start()?;
    /// assert!(deployment.url().starts_with("redis-sentinel://127.0.0.1:"));
    /// assert!(deployment.url().contains("sentinelServiceName=clouds"));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn url(&self) -> String {
        self.url_with_db(0)
    }

    /// [`RedisSentinel::url`] naming database `db`.
    ///
    /// ```no_run
    /// let deployment = clouds_testkit::RedisSentinel::start()?;
    /// assert!(deployment.url_with_db(3).contains("/3?"));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn url_with_db(&self, db: u8) -> String {
        let scheme = if self.tls {
            "rediss-sentinel"
        } else {
            "redis-sentinel"
        };
        let mut url = format!("{scheme}://127.0.0.1:{}", self.sentinels[0].port());
        if db != 0 {
            url.push_str(&format!("/{db}"));
        }
        url.push_str(&format!("?sentinelServiceName={}", Self::SERVICE));
        for sentinel in &self.sentinels[1..] {
            url.push_str(&format!("&node=127.0.0.1:{}", sentinel.port()));
        }
        url
    }

    /// The ports of the three sentinels.
    ///
    /// ```no_run
    /// let deployment = clouds_testkit::RedisSentinel::start()?;
    /// assert_eq!(deployment.sentinel_ports().len(), 3);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(RedisServer::port).collect()
    }

    /// The ports of the two data nodes, the one started as the primary first (roles change
    /// with a failover: see [`RedisSentinel::primary_port`]). For what must be done on every
    /// data node, like creating an ACL user (users are not replicated).
    ///
    /// ```no_run
    /// let deployment = clouds_testkit::RedisSentinel::start()?;
    /// for port in deployment.data_ports() {
    ///     deployment.command_on(port, &["ACL", "SETUSER", "app", "on", ">pw", "+@all", "~*"])?;
    /// }
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn data_ports(&self) -> Vec<u16> {
        self.data.iter().map(RedisServer::port).collect()
    }

    /// The port of the primary as the first sentinel that answers names it.
    ///
    /// ```no_run
    /// let deployment = clouds_testkit::RedisSentinel::start()?;
    /// let port = deployment.primary_port()?;
    /// assert_eq!(deployment.role_of(port)?, "master");
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn primary_port(&self) -> Result<u16, TestkitError> {
        let mut last = String::new();
        for sentinel in &self.sentinels {
            match sentinel.command(&["SENTINEL", "get-master-addr-by-name", Self::SERVICE]) {
                Ok(reply) => match reply.as_str_vec().as_deref() {
                    Some([_, port]) => {
                        if let Ok(port) = port.parse() {
                            return Ok(port);
                        }
                        last = format!("port {port:?}");
                    }
                    _ => last = format!("{reply:?}"),
                },
                Err(e) => last = e.to_string(),
            }
        }
        Err(sentinel_error("no sentinel names the primary".into(), last))
    }

    /// Runs one command on the primary or replica listening on `port`.
    ///
    /// ```no_run
    /// let deployment = clouds_testkit::RedisSentinel::start()?;
    /// let port = deployment.primary_port()?;
    /// deployment.command_on(port, &["SET", "k", "v"])?;
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn command_on(&self, port: u16, args: &[&str]) -> Result<RespValue, TestkitError> {
        self.data(port)?.command(args)
    }

    /// Like [`RedisSentinel::command_on`], as the ACL user `user` (see
    /// [`RedisServer::command_as`]); users are not replicated, so create them on every data
    /// node ([`RedisSentinel::data_ports`]) first.
    ///
    /// ```no_run
    /// let deployment = clouds_testkit::RedisSentinel::start()?;
    /// for port in deployment.data_ports() {
    ///     deployment.command_on(port, &["ACL", "SETUSER", "pinger", "on", ">pw", "+ping"])?;
    /// }
    /// let port = deployment.primary_port()?;
    /// assert!(!deployment.command_as_on(port, "pinger", "pw", &["PING"])?.is_error());
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn command_as_on(
        &self,
        port: u16,
        user: &str,
        password: &str,
        args: &[&str],
    ) -> Result<RespValue, TestkitError> {
        self.data(port)?.command_as(user, password, args)
    }

    /// `master` or `slave`, as the data node on `port` says of itself (`INFO replication`).
    ///
    /// ```no_run
    /// let deployment = clouds_testkit::RedisSentinel::start()?;
    /// assert_eq!(deployment.role_of(deployment.primary_port()?)?, "master");
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn role_of(&self, port: u16) -> Result<String, TestkitError> {
        let info = self.command_on(port, &["INFO", "replication"])?;
        field(&info, "role").ok_or_else(|| {
            sentinel_error(
                format!("no role in INFO replication of :{port}"),
                String::new(),
            )
        })
    }

    /// Kills the primary with SIGKILL (nothing saved, nothing said); returns its port.
    ///
    /// ```no_run
    /// let mut deployment = clouds_testkit::RedisSentinel::start()?;
    /// let old = deployment.kill_primary()?;
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn kill_primary(&mut self) -> Result<u16, TestkitError> {
        let port = self.primary_port()?;
        let node = self
            .data
            .iter_mut()
            .find(|node| node.port() == port)
            .ok_or_else(|| no_such_node(port))?;
        node.kill();
        Ok(port)
    }

    /// Waits until every live sentinel names a primary other than `old`, and that node says
    /// it is a primary; returns its port.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// let mut deployment = clouds_testkit::RedisSentinel::start()?;
    /// let old = deployment.kill_primary()?;
    /// let new = deployment.wait_failover(old, Duration::from_secs(20))?;
    /// assert_eq!(deployment.role_of(new)?, "master");
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn wait_failover(&self, old: u16, within: Duration) -> Result<u16, TestkitError> {
        let started = Instant::now();
        loop {
            let named: Vec<Option<u16>> = self
                .sentinels
                .iter()
                .map(|s| {
                    let reply = s
                        .command(&["SENTINEL", "get-master-addr-by-name", Self::SERVICE])
                        .ok()?;
                    reply.as_str_vec()?.get(1)?.parse().ok()
                })
                .collect();
            if let Some(Some(new)) = named.first()
                && *new != old
                && named.iter().all(|n| *n == Some(*new))
                && self.role_of(*new).is_ok_and(|role| role == "master")
            {
                return Ok(*new);
            }
            if started.elapsed() >= within {
                return Err(sentinel_error(
                    format!("no failover away from :{old} within {within:?}"),
                    format!("the sentinels name {named:?}\n{}", self.logs()),
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn data(&self, port: u16) -> Result<&RedisServer, TestkitError> {
        self.data
            .iter()
            .find(|node| node.port() == port)
            .ok_or_else(|| no_such_node(port))
    }

    /// Until the replica is in sync and each sentinel knows it and the two others.
    fn wait_settled(&self, within: Duration) -> Result<(), TestkitError> {
        let started = Instant::now();
        loop {
            let replica_up = self.data[1]
                .command(&["INFO", "replication"])
                .ok()
                .and_then(|info| field(&info, "master_link_status"))
                .is_some_and(|status| status == "up");
            let states: Vec<(Option<String>, Option<String>)> = self
                .sentinels
                .iter()
                .map(
                    |s| match s.command(&["SENTINEL", "master", Self::SERVICE]) {
                        Ok(reply) => (
                            pair_field(&reply, "num-other-sentinels"),
                            pair_field(&reply, "num-slaves"),
                        ),
                        Err(_) => (None, None),
                    },
                )
                .collect();
            let settled = states.iter().all(|(others, replicas)| {
                others.as_deref() == Some("2") && replicas.as_deref() == Some("1")
            });
            if replica_up && settled {
                return Ok(());
            }
            if started.elapsed() >= within {
                return Err(sentinel_error(
                    format!("the deployment did not settle within {within:?}"),
                    format!(
                        "replica in sync: {replica_up}; per sentinel (other sentinels, replicas): {states:?}\n{}",
                        self.logs()
                    ),
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The tail of every process's log, for errors.
    fn logs(&self) -> String {
        let mut out = String::new();
        for node in self.data.iter().chain(&self.sentinels) {
            out.push_str(&format!(":{}\n{}", node.port(), node.log_tail()));
        }
        out
    }
}

/// Starts one sentinel watching the primary on `primary_port`, over TLS with `tls`.
fn start_sentinel(primary_port: u16, tls: Option<&TlsFiles>) -> Result<RedisServer, TestkitError> {
    let service = RedisSentinel::SERVICE;
    let mut sentinel = match tls {
        Some(files) => {
            RedisServer::unstarted_tls(files, &["--sentinel", "--tls-replication", "yes"])?
        }
        None => RedisServer::unstarted(&["--sentinel"])?,
    };
    let conf = sentinel.dir().join("sentinel.conf");
    fs::write(
        &conf,
        format!(
            "sentinel monitor {service} 127.0.0.1 {primary_port} 2\n\
             sentinel down-after-milliseconds {service} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {service} {FAILOVER_TIMEOUT_MS}\n\
             sentinel parallel-syncs {service} 1\n"
        ),
    )?;
    sentinel.set_config_file(conf);
    let mut last = None;
    for _ in 0..PORT_ATTEMPTS {
        match sentinel.launch_on(free_port()?) {
            Ok(()) => return Ok(sentinel),
            Err(e) if port_taken(&e) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| sentinel_error("no free port".into(), String::new())))
}

/// `name:value` from an `INFO` reply.
fn field(info: &RespValue, name: &str) -> Option<String> {
    let text = info.as_text()?;
    let prefix = format!("{name}:");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

/// The value after `name` in a flat name/value array (`SENTINEL master`).
fn pair_field(reply: &RespValue, name: &str) -> Option<String> {
    let items = reply.as_str_vec()?;
    items
        .chunks(2)
        .find(|pair| pair.first().is_some_and(|k| k == name))
        .and_then(|pair| pair.get(1).cloned())
}

fn sentinel_error(what: String, details: String) -> TestkitError {
    TestkitError::Sentinel { what, details }
}

fn no_such_node(port: u16) -> TestkitError {
    sentinel_error(
        format!("no primary or replica of this deployment has port {port}"),
        String::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_over_to_the_replica_when_the_primary_dies() {
        let mut deployment = RedisSentinel::start().expect("start a Sentinel deployment");
        let old = deployment.primary_port().expect("primary");
        assert_eq!(deployment.role_of(old).expect("role"), "master");
        deployment
            .command_on(old, &["SET", "k", "v"])
            .expect("write");
        let killed = deployment.kill_primary().expect("kill");
        assert_eq!(killed, old);
        let new = deployment
            .wait_failover(old, Duration::from_secs(30))
            .expect("failover");
        assert_ne!(new, old);
        let url = deployment.url_with_db(3);
        assert!(url.contains("/3?sentinelServiceName=clouds&node="), "{url}");
    }
}
