//! Where Redis is and how the transport talks to it.

use std::path::PathBuf;
use std::sync::Arc;
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
///
/// `rediss://` and `rediss-cluster://` are the same over TLS (with the `tls` feature; without
/// it they are refused, never sent in plaintext):
///
/// ```
/// # #[cfg(feature = "tls")] {
/// let e = clouds_redis::Endpoint::parse("rediss://127.0.0.1:6380").unwrap();
/// assert!(e.is_tls());
/// # }
/// ```
#[derive(Clone)]
pub struct Endpoint {
    pub(crate) config: fred::types::config::Config,
    url_redacted: String,
    pub(crate) tls: Option<Tls>,
    /// TLS settings were given for a plaintext URL (refused by `check`).
    tls_on_plaintext: bool,
}

/// TLS settings: whom to trust and what to show the server. Built into a rustls
/// configuration when the transport connects (see `tls.rs`).
#[derive(Clone, Default, Debug)]
pub(crate) struct Tls {
    /// The CA certificates to trust instead of the system trust store.
    pub(crate) ca: Option<Pem>,
    /// A client certificate chain and its private key (mutual TLS).
    pub(crate) client: Option<(Pem, Pem)>,
}

/// PEM text given in memory or as a file read at connect time.
#[derive(Clone)]
pub(crate) enum Pem {
    /// The PEM bytes (never printed: a key is secret).
    Bytes(Arc<[u8]>),
    /// A file holding PEM.
    File(PathBuf),
}

// By hand: a key's bytes must never reach a log.
impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pem::Bytes(bytes) => write!(f, "<{} bytes of PEM>", bytes.len()),
            Pem::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The URL forms this version understands, for error messages.
const FORMS: &str = "redis://[user:password@]host[:port][/db], \
    redis-cluster://[user:password@]host:port[?node=host:port&node=...] or \
    redis-sentinel://[user:password@]host:port[/db]?sentinelServiceName=NAME[&node=host:port...], \
    or rediss://, rediss-cluster:// and rediss-sentinel:// for TLS";

/// Why a TLS URL is refused in a build without TLS.
#[cfg(not(feature = "tls"))]
const NO_TLS: &str = "this build has no TLS support (enable the `tls` feature of clouds, \
    on by default); a TLS URL is never used in plaintext";

impl Endpoint {
    /// Parses `redis://[user:password@]host[:port][/db]` (one server; the port defaults to
    /// 6379, the db to 0) or `redis-cluster://[user:password@]host:port[?node=host:port...]`
    /// (a Redis Cluster, found from any of the seed nodes; it has no databases, so a db other
    /// than 0 is refused) or
    /// `redis-sentinel://[user:password@]host:port[/db]?sentinelServiceName=NAME[&node=host:port...]`
    /// (the primary of service `NAME`, found through any of the sentinels at `host:port` and
    /// the `node`s; `sentinelUsername` and `sentinelPassword` in the query, when the sentinels
    /// want other credentials than the data nodes). `rediss://`, `rediss-cluster://` and
    /// `rediss-sentinel://` are the same over TLS, the server verified against the system trust
    /// store (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured) unless a CA is set with
    /// [`Endpoint::set_tls_ca_pem`] or [`Endpoint::set_tls_ca_file`]. In a build without the
    /// `tls` feature a TLS URL is an error, never a plaintext connection.
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
    /// assert!(Endpoint::parse("redis+unix:///tmp/redis.sock").is_err());
    /// assert_eq!(Endpoint::parse("rediss://127.0.0.1").is_ok(), cfg!(feature = "tls"));
    /// ```
    pub fn parse(url: &str) -> Result<Self, TransportError> {
        let invalid = |reason: String| TransportError::InvalidUrl {
            url: redact(url),
            reason,
        };
        let (scheme, rest) = url.split_once("://").unwrap_or((url, ""));
        let (cluster, sentinel, tls) = match scheme {
            "redis" => (false, false, false),
            "redis-cluster" => (true, false, false),
            "redis-sentinel" => (false, true, false),
            "rediss" => (false, false, true),
            "rediss-cluster" => (true, false, true),
            "rediss-sentinel" => (false, true, true),
            _ => {
                return Err(invalid(format!(
                    "unsupported scheme (unix sockets are not supported yet); use {FORMS}"
                )));
            }
        };
        if sentinel && !url.contains("sentinelServiceName=") {
            return Err(invalid(
                "a redis-sentinel:// URL needs ?sentinelServiceName=NAME, the service the \
                 sentinels monitor"
                    .into(),
            ));
        }
        #[cfg(not(feature = "tls"))]
        if tls {
            return Err(invalid(NO_TLS.to_string()));
        }
        // fred is given the plaintext form: the TLS configuration is built here (fred's own
        // would load the system trust store at parse time and fail on any unreadable file).
        let plain = format!(
            "{}://{rest}",
            match (cluster, sentinel) {
                (true, _) => "redis-cluster",
                (_, true) => "redis-sentinel",
                _ => "redis",
            }
        );
        let mut config = fred::types::config::Config::from_url(&plain)
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
            tls: tls.then(Tls::default),
            tls_on_plaintext: false,
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
            tls: None,
            tls_on_plaintext: false,
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
            tls: None,
            tls_on_plaintext: false,
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

    /// Whether connections use TLS (the URL was `rediss://`, `rediss-cluster://` or
    /// `rediss-sentinel://`).
    ///
    /// ```
    /// assert!(!clouds_redis::Endpoint::parse("redis://127.0.0.1").unwrap().is_tls());
    /// ```
    pub fn is_tls(&self) -> bool {
        self.tls.is_some() && !self.tls_on_plaintext
    }

    /// Trusts the CA certificates in `pem` (one or more PEM `CERTIFICATE` blocks) instead
    /// of the system trust store. Only for a TLS URL: [`Endpoint::check`] refuses TLS
    /// settings on a plaintext one.
    ///
    /// ```
    /// let mut e = clouds_redis::Endpoint::parse("redis://127.0.0.1").unwrap();
    /// e.set_tls_ca_pem(b"-----BEGIN CERTIFICATE-----...".to_vec());
    /// assert!(e.check().unwrap_err().to_string().contains("rediss://"));
    /// ```
    pub fn set_tls_ca_pem(&mut self, pem: Vec<u8>) {
        self.tls_settings().ca = Some(Pem::Bytes(pem.into()));
    }

    /// Like [`Endpoint::set_tls_ca_pem`], with the PEM read from `path` when connecting.
    ///
    /// ```
    /// # #[cfg(feature = "tls")] {
    /// let mut e = clouds_redis::Endpoint::parse("rediss://127.0.0.1").unwrap();
    /// e.set_tls_ca_file("/etc/redis/ca.pem".into());
    /// assert!(format!("{e:?}").contains("/etc/redis/ca.pem"));
    /// # }
    /// ```
    pub fn set_tls_ca_file(&mut self, path: PathBuf) {
        self.tls_settings().ca = Some(Pem::File(path));
    }

    /// Shows the server the certificate chain `cert_pem` with its private key `key_pem`
    /// (PKCS#8, PKCS#1 or SEC1 PEM), for servers that require client certificates
    /// (`tls-auth-clients yes`). The key is never printed.
    ///
    /// ```
    /// # #[cfg(feature = "tls")] {
    /// let mut e = clouds_redis::Endpoint::parse("rediss://127.0.0.1").unwrap();
    /// e.set_tls_client_pem(b"cert".to_vec(), b"very secret key".to_vec());
    /// assert!(!format!("{e:?}").contains("very secret"));
    /// # }
    /// ```
    pub fn set_tls_client_pem(&mut self, cert_pem: Vec<u8>, key_pem: Vec<u8>) {
        self.tls_settings().client =
            Some((Pem::Bytes(cert_pem.into()), Pem::Bytes(key_pem.into())));
    }

    /// Like [`Endpoint::set_tls_client_pem`], with both read from files when connecting.
    ///
    /// ```
    /// # #[cfg(feature = "tls")] {
    /// let mut e = clouds_redis::Endpoint::parse("rediss://127.0.0.1").unwrap();
    /// e.set_tls_client_files("client.pem".into(), "client.key".into());
    /// assert!(e.check().is_ok());
    /// # }
    /// ```
    pub fn set_tls_client_files(&mut self, cert: PathBuf, key: PathBuf) {
        self.tls_settings().client = Some((Pem::File(cert), Pem::File(key)));
    }

    /// The TLS settings, created (on a plaintext URL, for [`Endpoint::check`] to refuse) if
    /// there are none yet.
    fn tls_settings(&mut self) -> &mut Tls {
        if self.tls.is_none() {
            self.tls_on_plaintext = true;
        }
        self.tls.get_or_insert_with(Tls::default)
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
        if self.tls_on_plaintext {
            return Err(TransportError::InvalidUrl {
                url: self.url_redacted.clone(),
                reason: "TLS settings (a CA or a client certificate) were given for a \
                    plaintext URL; use rediss://, rediss-cluster:// or rediss-sentinel://"
                    .to_string(),
            });
        }
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
            .field("tls", &self.tls)
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
    fn tls_urls_need_the_tls_feature_and_tls_settings_need_a_tls_url() {
        for url in [
            "rediss://u:pw@127.0.0.1:6380/2",
            "rediss-cluster://127.0.0.1:7000",
            "rediss-sentinel://u:pw@127.0.0.1:26379?sentinelServiceName=s&sentinelPassword=pw",
        ] {
            let parsed = Endpoint::parse(url);
            assert_eq!(parsed.is_ok(), cfg!(feature = "tls"), "{url}");
            match parsed {
                Ok(e) => {
                    assert!(e.is_tls());
                    assert!(!format!("{e:?}").contains("pw"));
                }
                Err(e) => assert!(e.to_string().contains("never used in plaintext"), "{e}"),
            }
        }
        let mut e = Endpoint::parse("redis://127.0.0.1").expect("valid url");
        assert!(!e.is_tls());
        e.set_tls_client_pem(b"cert".to_vec(), b"KEY BYTES".to_vec());
        assert!(!e.is_tls());
        assert!(!format!("{e:?}").contains("KEY BYTES"));
        assert!(
            e.check()
                .expect_err("plaintext")
                .to_string()
                .contains("rediss://")
        );
        assert!(Endpoint::parse("redis+unix:///tmp/r.sock").is_err());
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
