//! [`TestkitError`]: what can go wrong starting, stopping or talking to a test Redis server.

use std::fmt;
use std::io;
use std::process::ExitStatus;
use std::time::Duration;

use crate::process::ChildError;

/// Errors from starting, stopping or talking to a test Redis server.
///
/// ```
/// use clouds_testkit::{RedisServer, TestkitError};
///
/// match RedisServer::start_with(&["--no-such-option", "1"]) {
///     Err(TestkitError::Exited { log, .. }) => assert!(log.contains("no-such-option")),
///     other => panic!("expected an early exit, got {other:?}"),
/// }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum TestkitError {
    /// No usable `redis-server` binary was found; the message says how to install one.
    NotInstalled(String),
    /// An I/O error (creating the directory, a socket error, ...).
    Io(io::Error),
    /// `redis-server` exited before it answered PING (bad arguments, port taken, ...).
    Exited {
        /// The port the server was asked to listen on.
        port: u16,
        /// How the process ended.
        status: ExitStatus,
        /// The tail of the server's output and log file.
        log: String,
    },
    /// `redis-server` kept running but did not answer PING before the deadline.
    NotReady {
        /// The port the server was asked to listen on.
        port: u16,
        /// How long we waited.
        waited: Duration,
        /// The tail of the server's output and log file.
        log: String,
    },
    /// Every attempt to start on a fresh free port lost the port to another process.
    NoFreePort {
        /// How many ports were tried.
        attempts: u32,
        /// The tail of the last attempt's output and log file.
        log: String,
    },
    /// The server sent something that is not valid RESP2.
    Protocol(String),
    /// The server rejected the password given with `--requirepass`.
    Auth(String),
    /// The PEM files of a TLS server ([`TlsFiles`](crate::TlsFiles)) could not be read or
    /// used for the testkit's own TLS connections; the message names the file, never a key.
    Tls(String),
    /// Starting or watching a child process failed (for `redis-server`: it could not be
    /// spawned); see [`ChildError`].
    Child(ChildError),
    /// A [`RedisCluster`](crate::RedisCluster) operation failed or its cluster did not settle
    /// before the deadline (or the operation was asked something impossible, like a cluster
    /// of two primaries).
    Cluster {
        /// What was being done, and why it failed.
        what: String,
        /// What the cluster looked like: the last state seen, `redis-cli` output, the tail
        /// of each node's log. Empty when there is nothing to add.
        details: String,
    },
    /// A [`RedisSentinel`](crate::RedisSentinel) operation failed, or the deployment did not
    /// settle (or fail over) before the deadline.
    Sentinel {
        /// What was being done, and why it failed.
        what: String,
        /// The last state seen and the tail of each process's log; empty when there is
        /// nothing to add.
        details: String,
    },
}

impl fmt::Display for TestkitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestkitError::NotInstalled(msg) => f.write_str(msg),
            TestkitError::Io(e) => write!(f, "I/O error: {e}"),
            TestkitError::Exited { port, status, log } => write!(
                f,
                "redis-server on 127.0.0.1:{port} exited before answering PING ({status});\n{log}"
            ),
            TestkitError::NotReady { port, waited, log } => write!(
                f,
                "redis-server on 127.0.0.1:{port} did not answer PING within {waited:?};\n{log}"
            ),
            TestkitError::NoFreePort { attempts, log } => write!(
                f,
                "redis-server could not bind a free loopback port in {attempts} attempts;\n{log}"
            ),
            TestkitError::Protocol(msg) => write!(f, "RESP protocol error: {msg}"),
            TestkitError::Auth(msg) => write!(f, "Redis rejected AUTH: {msg}"),
            TestkitError::Tls(msg) => write!(f, "TLS setup for redis-server failed: {msg}"),
            TestkitError::Child(e) => fmt::Display::fmt(e, f),
            TestkitError::Cluster { what, details } if details.is_empty() => {
                write!(f, "Redis Cluster: {what}")
            }
            TestkitError::Cluster { what, details } => {
                write!(f, "Redis Cluster: {what};\n{}", details.trim_end())
            }
            TestkitError::Sentinel { what, details } if details.is_empty() => {
                write!(f, "Redis Sentinel: {what}")
            }
            TestkitError::Sentinel { what, details } => {
                write!(f, "Redis Sentinel: {what};\n{}", details.trim_end())
            }
        }
    }
}

impl std::error::Error for TestkitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TestkitError::Io(e) => Some(e),
            TestkitError::Child(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for TestkitError {
    fn from(e: io::Error) -> Self {
        TestkitError::Io(e)
    }
}

impl From<ChildError> for TestkitError {
    fn from(e: ChildError) -> Self {
        TestkitError::Child(e)
    }
}
