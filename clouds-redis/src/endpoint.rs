//! Where Redis is and how the transport talks to it.

use std::time::Duration;

use crate::error::TransportError;

/// A parsed Redis address: one server or a cluster's seed nodes, database and credentials.
///
/// ```
/// let e = clouds_redis::Endpoint::parse("redis://user:secret@127.0.0.1:6380/3").unwrap();
/// assert_eq!(e.db(), 3);
/// assert_eq!(e.addr(), "127.0.0.1:6380");
/// assert!(!e.is_cluster());
/// assert!(!format!("{e:?}").contains("secret"));
///
/// let c = clouds_redis::Endpoint::parse("redis-cluster://10.0.0.1:7000?node=10.0.0.2:7000").unwrap();
/// assert!(c.is_cluster());
/// ```
#[derive(Clone)]
pub struct Endpoint {
    pub(crate) config: fred::types::config::Config,
    url_redacted: String,
}

/// The URL forms this version understands, for error messages.
const FORMS: &str = "redis://[user:password@]host[:port][/db], \
    redis-cluster://[user:password@]host:port[?node=host:port&node=...] or \
    redis-sentinel://[user:password@]host:port[/db]?sentinelServiceName=NAME[&node=host:port...]";

impl Endpoint {
    /// Parses `redis://[user:password@]host[:port][/db]` (one server; the port defaults to
    /// 6379, the db to 0) or `redis-cluster://[user:password@]host:port[?node=host:port...]`
    /// (a Redis Cluster, found from any of the seed nodes; it has no databases, so a db other
    /// than 0 is refused) or
    /// `redis-sentinel://[user:password@]host:port[/db]?sentinelServiceName=NAME[&node=host:port...]`
    /// (the primary of service `NAME`, found through any of the sentinels at `host:port` and
    /// the `node`s; `sentinelUsername` and `sentinelPassword` in the query, when the sentinels
    /// want other credentials than the data nodes).
    ///
    /// ```
    /// let e = clouds_redis::Endpoint::parse(
    ///     "redis-sentinel://127.0.0.1:26379/3?sentinelServiceName=orders&node=127.0.0.1:26380",
    /// ).unwrap();
    /// assert!(e.is_sentinel());
    /// assert_eq!(e.db(), 3);
    /// ```
    ///
    /// ```
    /// use clouds_redis::Endpoint;
    /// assert!(Endpoint::parse("redis-cluster://127.0.0.1:7000/2").is_err());
    /// assert!(Endpoint::parse("rediss://127.0.0.1").is_err());
    /// ```
    pub fn parse(url: &str) -> Result<Self, TransportError> {
        let invalid = |reason: String| TransportError::InvalidUrl {
            url: redact(url),
            reason,
        };
        let (cluster, sentinel) = if url.starts_with("redis://") {
            (false, false)
        } else if url.starts_with("redis-cluster://") {
            (true, false)
        } else if url.starts_with("redis-sentinel://") {
            if !url.contains("sentinelServiceName=") {
                return Err(invalid(
                    "a redis-sentinel:// URL needs ?sentinelServiceName=NAME, the service the \
                     sentinels monitor"
                        .into(),
                ));
            }
            (false, true)
        } else {
            return Err(invalid(format!(
                "unsupported scheme (TLS, Sentinel and unix sockets are not supported yet); use {FORMS}"
            )));
        };
        let mut config = fred::types::config::Config::from_url(url)
            .map_err(|e| invalid(format!("{}; use {FORMS}", e.details())))?;
        if cluster {
            // fred ignores a cluster URL's path; a db there would be silently dropped.
            if config.database.unwrap_or(0) != 0 || !matches!(url_path(url), "" | "/" | "/0") {
                return Err(invalid(CLUSTER_DB.to_string()));
            }
            config.database = None;
            if let fred::types::config::ServerConfig::Clustered { policy, .. } = &mut config.server
            {
                // Seed nodes can die: rediscover the cluster from the last slot map too.
                *policy = fred::types::config::ClusterDiscoveryPolicy::UseCache;
            }
        } else if sentinel != config.server.is_sentinel() || config.server.is_clustered() {
            // (fred also reads `redis://...?sentinelServiceName=` as Sentinel: ask for the
            // scheme that says so.)
            return Err(invalid(format!("use {FORMS}")));
        }
        Ok(Endpoint {
            config,
            url_redacted: redact(url),
        })
    }

    /// A Redis Cluster found from `nodes` (each `host:port`), without credentials: what
    /// `redis-cluster://` parses to, for a list of seed nodes held in code or a file.
    ///
    /// ```
    /// let e = clouds_redis::Endpoint::cluster(["127.0.0.1:7000", "127.0.0.1:7001"]).unwrap();
    /// assert!(e.is_cluster());
    /// assert_eq!(e.addr(), "127.0.0.1:7000,127.0.0.1:7001");
    /// assert!(clouds_redis::Endpoint::cluster(["no-port"]).is_err());
    /// ```
    pub fn cluster<S: AsRef<str>>(
        nodes: impl IntoIterator<Item = S>,
    ) -> Result<Self, TransportError> {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_string()).collect();
        let hosts = parse_hosts(&nodes)?;
        let config = fred::types::config::Config {
            server: fred::types::config::ServerConfig::Clustered {
                hosts,
                policy: fred::types::config::ClusterDiscoveryPolicy::UseCache,
            },
            ..Default::default()
        };
        Ok(Endpoint {
            config,
            url_redacted: format!("redis-cluster://{}", nodes.join(",")),
        })
    }

    /// The primary of `service`, found through any of the sentinels in `nodes` (each
    /// `host:port`), without credentials: what `redis-sentinel://` parses to.
    ///
    /// ```
    /// let e = clouds_redis::Endpoint::sentinel("orders", ["127.0.0.1:26379", "127.0.0.1:26380"])
    ///     .unwrap();
    /// assert!(e.is_sentinel());
    /// assert!(clouds_redis::Endpoint::sentinel("", ["127.0.0.1:26379"]).is_err());
    /// ```
    pub fn sentinel<S: AsRef<str>>(
        service: &str,
        nodes: impl IntoIterator<Item = S>,
    ) -> Result<Self, TransportError> {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_string()).collect();
        let hosts = parse_hosts(&nodes)?;
        if service.is_empty() {
            return Err(TransportError::InvalidUrl {
                url: nodes.join(","),
                reason: "a Sentinel service name must not be empty".into(),
            });
        }
        let config = fred::types::config::Config {
            server: fred::types::config::ServerConfig::Sentinel {
                hosts,
                service_name: service.to_string(),
                username: None,
                password: None,
            },
            ..Default::default()
        };
        Ok(Endpoint {
            config,
            url_redacted: format!(
                "redis-sentinel://{}?sentinelServiceName={service}",
                nodes.join(",")
            ),
        })
    }

    /// Sets the password (and optionally the ACL user name) for the sentinels, where they
    /// differ from the data nodes'. Does nothing unless this is a Sentinel endpoint.
    pub fn set_sentinel_credentials(&mut self, username: Option<String>, password: String) {
        if let fred::types::config::ServerConfig::Sentinel {
            username: u,
            password: p,
            ..
        } = &mut self.config.server
        {
            *u = username;
            *p = Some(password);
        }
    }

    /// Whether the primary is found through Redis Sentinel.
    pub fn is_sentinel(&self) -> bool {
        self.config.server.is_sentinel()
    }

    /// Whether this is a Redis Cluster (sharded pub/sub, no databases).
    pub fn is_cluster(&self) -> bool {
        self.config.server.is_clustered()
    }

    /// The database number (0 when the URL names none; always 0 on a cluster).
    pub fn db(&self) -> u8 {
        self.config.database.unwrap_or(0)
    }

    /// Sets the database number. A cluster has only database 0: setting another one here is
    /// refused when the node starts (see [`Endpoint::check`]).
    pub fn set_db(&mut self, db: u8) {
        self.config.database = Some(db);
    }

    /// Whether the settings can work: a cluster with a db other than 0 cannot.
    ///
    /// ```
    /// let mut e = clouds_redis::Endpoint::parse("redis-cluster://127.0.0.1:7000").unwrap();
    /// assert!(e.check().is_ok());
    /// e.set_db(2);
    /// assert!(e.check().unwrap_err().to_string().contains("namespace"));
    /// ```
    pub fn check(&self) -> Result<(), TransportError> {
        if self.is_cluster() && self.db() != 0 {
            return Err(TransportError::InvalidUrl {
                url: self.url_redacted.clone(),
                reason: CLUSTER_DB.to_string(),
            });
        }
        Ok(())
    }

    /// Sets the password (and optionally the ACL user name).
    pub fn set_credentials(&mut self, username: Option<String>, password: String) {
        self.config.username = username;
        self.config.password = Some(password);
    }

    /// `host:port` of the server, or of a cluster's seed nodes separated by commas.
    pub fn addr(&self) -> String {
        let hosts = self.config.server.hosts();
        if hosts.is_empty() {
            return "<none>".to_string();
        }
        let addrs: Vec<String> = hosts
            .iter()
            .map(|server| format!("{}:{}", server.host, server.port))
            .collect();
        addrs.join(",")
    }
}

/// `host:port` strings as fred's servers; at least one.
fn parse_hosts(nodes: &[String]) -> Result<Vec<fred::types::config::Server>, TransportError> {
    let invalid = |reason: String| TransportError::InvalidUrl {
        url: nodes.join(","),
        reason,
    };
    let mut hosts = Vec::with_capacity(nodes.len());
    for node in nodes {
        let (host, port) = node
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| invalid(format!("node {node:?} is not host:port")))?;
        hosts.push(fred::types::config::Server::new(host, port));
    }
    if hosts.is_empty() {
        return Err(invalid("at least one node is needed".into()));
    }
    Ok(hosts)
}

/// Why a cluster refuses a database number.
const CLUSTER_DB: &str = "Redis Cluster has only database 0; keep deployments apart with \
    `namespace` instead of a db number";

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url_redacted)
            .field("db", &self.db())
            .field("cluster", &self.is_cluster())
            .field("sentinel", &self.is_sentinel())
            .finish()
    }
}

/// The path of a URL (`/3` in `redis-cluster://h:1/3?node=h:2`), empty if it has none.
fn url_path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    // After the credentials, which may hold a '/'.
    let authority_start = rest.rfind('@').map_or(0, |at| at + 1);
    match rest[authority_start..].find('/') {
        Some(slash) => &rest[authority_start + slash..],
        None => "",
    }
}

/// Hides the passwords of a URL (the user's, and a `sentinelPassword` in the query) so it
/// can go into errors and logs.
fn redact(url: &str) -> String {
    let url = redact_userinfo(url);
    match url.find("sentinelPassword=") {
        Some(start) => {
            let value = start + "sentinelPassword=".len();
            let end = url[value..].find('&').map_or(url.len(), |i| value + i);
            format!("{}***{}", &url[..value], &url[end..])
        }
        None => url,
    }
}

/// Hides the password between `://` and `@`.
fn redact_userinfo(url: &str) -> String {
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
    /// Longest delay between reconnect attempts. Reconnecting never gives up. On a Redis
    /// Cluster it is at most 250 ms (see the `transport` module: a cluster client is down as
    /// a whole while it reconnects).
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
        assert_eq!(
            redact("redis-sentinel://u:p@h:1?sentinelServiceName=s&sentinelPassword=q&node=h:2"),
            "redis-sentinel://u:***@h:1?sentinelServiceName=s&sentinelPassword=***&node=h:2"
        );
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

    #[test]
    fn parses_cluster_urls() {
        let e = Endpoint::parse("redis-cluster://u:pw@127.0.0.1:7000?node=127.0.0.1:7001")
            .expect("valid url");
        assert!(e.is_cluster());
        assert_eq!(e.db(), 0);
        assert!(e.addr().contains("127.0.0.1:7000") && e.addr().contains("127.0.0.1:7001"));
        assert!(!format!("{e:?}").contains("pw"));
        let refused =
            Endpoint::parse("redis-cluster://127.0.0.1:7000/3").expect_err("db 3 is refused");
        assert!(refused.to_string().contains("namespace"), "{refused}");
        let mut e = Endpoint::parse("redis-cluster://127.0.0.1:7000/0").expect("db 0 is fine");
        assert!(e.check().is_ok());
        e.set_db(1);
        assert!(e.check().is_err());
        assert!(Endpoint::cluster(Vec::<String>::new()).is_err());
        assert!(Endpoint::cluster([":7000"]).is_err());
    }
}
