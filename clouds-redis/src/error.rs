//! Transport errors, with fred's error turned into text so no dependency type leaks.

use std::time::Duration;

/// A failure talking to Redis.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The Redis URL could not be parsed.
    #[error("invalid Redis URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The first connection to Redis failed.
    #[error("could not connect to Redis at {addr}: {reason}; is redis-server running there?")]
    Connect {
        /// `host:port` that was tried.
        addr: String,
        /// The underlying error.
        reason: String,
    },
    /// The TLS settings could not be used, or the TLS handshake with Redis failed (its
    /// certificate was refused, or it refused ours).
    #[error("TLS with Redis at {addr} failed: {reason}")]
    Tls {
        /// `host:port` that was tried.
        addr: String,
        /// What went wrong, without key material.
        reason: String,
    },
    /// A command got no answer within the command timeout (Redis down, or reconnecting).
    #[error("Redis did not answer {command} within {after:?} (connection down or reconnecting)")]
    Timeout {
        /// The command that timed out.
        command: &'static str,
        /// The configured command timeout.
        after: Duration,
    },
    /// Redis answered a command with an error, or the connection failed while it was in flight.
    #[error("Redis command {command} failed: {reason}")]
    Command {
        /// The command that failed.
        command: &'static str,
        /// The error Redis or the connection gave.
        reason: String,
    },
    /// Redis answered with a reply of an unexpected shape.
    #[error("unexpected reply to {command}: {reason}")]
    Reply {
        /// The command whose reply was unexpected.
        command: &'static str,
        /// What was unexpected.
        reason: String,
    },
}

impl TransportError {
    /// Wraps a fred error from `command`, telling timeouts apart.
    pub(crate) fn from_fred(
        command: &'static str,
        after: Duration,
        error: fred::error::Error,
    ) -> Self {
        match error.kind() {
            fred::error::ErrorKind::Timeout => TransportError::Timeout { command, after },
            _ => TransportError::Command {
                command,
                reason: error.to_string(),
            },
        }
    }
}
