//! Throwaway `redis-server` processes and Redis Clusters, and the child-process harness, for
//! clouds' tests, examples and benchmarks.
//!
//! [`RedisServer::start`] launches a private `redis-server` on a free loopback
//! port with persistence disabled and a fresh temporary working directory. The
//! process is killed and reaped when the [`RedisServer`] is dropped, including
//! when a test panics (drop runs during unwinding).
//!
//! The server binary is located by [`redis_server_path`]: the `REDIS_SERVER`
//! environment variable if set, otherwise `redis-server` on `PATH`.
//!
//! ```
//! use clouds_testkit::RedisServer;
//!
//! let server = RedisServer::start()?;
//! server.command(&["SET", "greeting", "hello"])?;
//! let reply = server.command(&["GET", "greeting"])?;
//! assert_eq!(reply.as_text().as_deref(), Some("hello"));
//! println!("connect your client to {}", server.url());
//! # Ok::<(), clouds_testkit::TestkitError>(())
//! ```
//!
//! Any other process a test or benchmark starts (an example binary, a provider, the bench
//! re-executing itself) runs as a [`ChildProcess`]: its output is captured, waits for a
//! line of it have a deadline and errors quote it, and it is killed and reaped on drop.
//!
//! ```
//! use clouds_testkit::ChildProcess;
//! use std::process::Command;
//! use std::time::Duration;
//!
//! let mut child = ChildProcess::spawn(
//!     Command::new("sh").args(["-c", "echo serving; exec sleep 60"]),
//! )?;
//! child.wait_for_line("serving", Duration::from_secs(10))?;
//! child.terminate(Duration::from_secs(10))?;
//! # Ok::<(), clouds_testkit::ChildError>(())
//! ```
//!
//! A throwaway Redis Cluster (3 primaries and 3 replicas by default) is a [`RedisCluster`]:
//! its nodes are `RedisServer`s created into a cluster by `redis-cli --cluster create`, with
//! the fault operations cluster tests need (kill and restart a node, manual failover, slot
//! migration) and [`RedisCluster::slot_of`], the key-to-slot function.
//!
//! ```no_run
//! use clouds_testkit::RedisCluster;
//! use std::time::Duration;
//!
//! let mut cluster = RedisCluster::start()?;
//! let slot = RedisCluster::slot_of("{svc}:requests");
//! let primary = cluster.primary_for_slot(slot)?;
//! cluster.kill_node(primary)?;
//! cluster.wait_ok(Duration::from_secs(15))?; // a replica has taken over the slot
//! assert_ne!(cluster.primary_for_slot(slot)?, primary);
//! # Ok::<(), clouds_testkit::TestkitError>(())
//! ```
//!
//! A throwaway Sentinel deployment (a primary, its replica and three sentinels) is a
//! [`RedisSentinel`], with the primary's kill and the wait for the failover.
//!
//! Each has a TLS-only form, with the certificate, key and CA of a [`TlsFiles`]:
//! [`RedisServer::start_tls`], [`RedisCluster::start_tls`] (the cluster bus and replication
//! over TLS too) and [`RedisSentinel::start_tls`] (sentinels and replication over TLS too).
//! Their helpers ([`RedisServer::command`] and the like) then speak TLS (rustls).
//!
//! Only std is used, and rustls for the TLS forms; the raw RESP2 client behind
//! [`RedisServer::command`] is deliberately minimal and meant for poking Redis from tests, not
//! for production traffic.
//!
//! # Layout
//!
//! - `server.rs`: [`RedisServer`] (launching on a free port, readiness, stop, restart,
//!   clean-up), [`TlsFiles`] and [`redis_server_path`].
//! - `sentinel.rs`: [`RedisSentinel`] (primary, replica and three sentinels; kill the
//!   primary, wait for the failover).
//! - `cluster.rs`: [`RedisCluster`] (nodes on free ports with free bus ports, creation
//!   with `redis-cli`, waiting for the cluster to settle, kill, restart, failover, slot
//!   migration), [`ClusterNode`], [`NodeRole`], [`StartupTimings`], and the slot function.
//! - `process.rs`: [`ChildProcess`], the one harness for child processes (spawn, wait for a
//!   line, signal, stop, kill on drop), [`output_of`], and its [`ChildError`].
//! - `resp.rs`: the raw RESP2 client: [`RespValue`], the connection (plaintext or TLS)
//!   behind [`RedisServer::command`], and [`ping`].
//! - `error.rs`: [`TestkitError`].

mod cluster;
mod error;
mod process;
mod resp;
mod sentinel;
mod server;

pub use cluster::{ClusterNode, NodeRole, RedisCluster, StartupTimings};
pub use error::TestkitError;
pub use process::{ChildError, ChildErrorKind, ChildProcess, Signal, SpawnOptions, output_of};
pub use resp::{RespValue, ping};
pub use sentinel::RedisSentinel;
pub use server::{RedisServer, TlsFiles, redis_server_path};
