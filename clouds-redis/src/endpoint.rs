//! Where Redis is and how the transport talks to it.

use std::time::Duration;

use crate::error::TransportError;

/// A parsed Redis address: host, port, database and credentials.
///
/// ```
/// let e = clouds_redis::Endpoint::parse("redis://user:secret@127.0.0.1:6380/3").unwrap();
/// assert_eq!(e.db(), 3);
/// assert_eq!(e.addr(), "127.0.0.1:6380");
/// assert!(!format!("{e:?}").contains("secret"));
/// ```
#[derive(Clone)]
pub struct Endpoint {
    pub(crate) config: fred::types::config::Config,
    url_redacted: String,
}

impl Endpoint {
    /// Parses `redis://[user:password@]host[:port][/db]`. The port defaults to 6379, the db to 0.
    pub fn parse(url: &str) -> Result<Self, TransportError> {
        if !url.starts_with("redis://") {
            return Err(TransportError::InvalidUrl {
                url: redact(url),
                reason: "the scheme must be redis:// (TLS and unix sockets are not supported yet)"
                    .into(),
            });
        }
        let config =
            fred::types::config::Config::from_url(url).map_err(|e| TransportError::InvalidUrl {
                url: redact(url),
                reason: e.details().to_string(),
            })?;
        if !config.server.is_centralized() {
            return Err(TransportError::InvalidUrl {
                url: redact(url),
                reason: "only a single Redis server (redis://) is supported in this version".into(),
            });
        }
        Ok(Endpoint {
            config,
            url_redacted: redact(url),
        })
    }

    /// The database number (0 when the URL names none).
    pub fn db(&self) -> u8 {
        self.config.database.unwrap_or(0)
    }

    /// Sets the database number.
    pub fn set_db(&mut self, db: u8) {
        self.config.database = Some(db);
    }

    /// Sets the password (and optionally the ACL user name).
    pub fn set_credentials(&mut self, username: Option<String>, password: String) {
        self.config.username = username;
        self.config.password = Some(password);
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> String {
        match self.config.server.hosts().first() {
            Some(server) => format!("{}:{}", server.host, server.port),
            None => "<none>".to_string(),
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url_redacted)
            .field("db", &self.db())
            .finish()
    }
}

/// Hides the password of a URL so it can go into errors and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// How the transport uses its connections.
///
/// ```
/// use std::time::Duration;
/// let mut options = clouds_redis::TransportOptions::default();
/// options.command_timeout = Duration::from_secs(2);
/// assert_eq!(options.command_timeout, Duration::from_secs(2));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransportOptions {
    /// Longest wait for any one Redis command, except `Transport::publish_untimed`, which its
    /// caller bounds (a call attempt, by the call's timeout).
    pub command_timeout: Duration,
    /// Longest wait for a TCP connection (and handshake) to Redis.
    pub connect_timeout: Duration,
    /// First delay before reconnecting after a lost connection; doubles up to `reconnect_max_delay`.
    pub reconnect_min_delay: Duration,
    /// Longest delay between reconnect attempts. Reconnecting never gives up.
    pub reconnect_max_delay: Duration,
    /// How many received pub/sub frames may wait for the receive loop before the oldest are
    /// dropped (and counted as lag): room for a burst of replies to that many calls in flight.
    /// fred sizes every broadcast channel of the subscriber connection by it, up front, so it
    /// is memory spent per node whether used or not (about 10 MB at the default).
    pub inbound_capacity: usize,
    /// Most `PUBLISH`es sent and not yet answered on the command connection; more wait for a
    /// free slot. fred keeps every command it has been handed in memory until Redis answers,
    /// so without a bound a burst of calls holds a command's state for each of them at once.
    /// Redis answers a pipeline this deep in well under a millisecond, so the bound costs no
    /// throughput.
    pub max_pending_publishes: usize,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            command_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            reconnect_min_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_secs(2),
            inbound_capacity: 16_384,
            max_pending_publishes: 256,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://u:p@h:1/2"), "redis://u:***@h:1/2");
        assert_eq!(redact("redis://:p@h"), "redis://:***@h");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn parses_db_and_port() {
        let e = Endpoint::parse("redis://127.0.0.1:6390/5").expect("valid url");
        assert_eq!(e.db(), 5);
        assert_eq!(e.addr(), "127.0.0.1:6390");
        let e = Endpoint::parse("redis://localhost").expect("valid url");
        assert_eq!(e.db(), 0);
        assert_eq!(e.addr(), "localhost:6379");
        assert!(Endpoint::parse("http://nope").is_err());
    }
}
