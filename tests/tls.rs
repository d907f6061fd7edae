//! `rediss://` end to end: a redis-server serving TLS only, with a CA and certificates made
//! here by rcgen. Calls, the registry (heartbeats run on their own connections) and the
//! monitor over TLS; a wrong CA, plaintext to the TLS port, mutual TLS; no secret in `Debug`
//! output or errors.
//!
//! `rediss-cluster://` on a Redis Cluster whose nodes serve TLS only (client port, cluster bus
//! and replication; `clouds_testkit::RedisCluster::start_tls`): calls and sharded pub/sub, and
//! a wrong CA. `rediss-sentinel://` on a Sentinel deployment serving TLS only
//! (`clouds_testkit::RedisSentinel::start_tls`): a wrong CA, calls, and calls again after a
//! failover. Certificates naming a DNS name only, on a cluster.
//! With no plaintext port anywhere, every connection that works is a TLS one.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clouds::{Client, Config, Monitor, Server};
use clouds_testkit::{RedisCluster, RedisSentinel, RedisServer, TlsFiles};
use common::eventually;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

/// The service under test.
#[clouds::service("tls")]
pub trait Echo {
    /// Answers `text` back.
    async fn echo(&self, text: String) -> String;
}

struct Echoer;

impl Echo for Echoer {
    async fn echo(&self, text: String) -> String {
        text
    }
}

/// A password that must never be printed (for keys, the tests look for the PEM body).
const PASSWORD: &str = "tls-test-password-hunter2";

/// A CA, a server certificate for 127.0.0.1 and localhost (also good for client
/// authentication, as cluster nodes need) and a client certificate, all signed by the CA, as PEM files in a temporary directory (removed on drop).
struct Pki {
    dir: PathBuf,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl Pki {
    fn new() -> Pki {
        Pki::with_names(&["127.0.0.1", "localhost"])
    }

    /// Like [`Pki::new`], the server certificate naming only `names`.
    fn with_names(names: &[&str]) -> Pki {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "clouds-tls-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = ca("clouds test CA");
        let server_key = KeyPair::generate().expect("server key");
        let mut server =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        // Client authentication too: Redis Cluster nodes show their certificate to each other
        // on the cluster bus, which always asks for one.
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server_cert = server.signed_by(&server_key, &ca).expect("server cert");
        let client_key = KeyPair::generate().expect("client key");
        let mut client = CertificateParams::new(Vec::<String>::new()).expect("params");
        client
            .distinguished_name
            .push(DnType::CommonName, "clouds test client");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &ca).expect("client cert");
        let pki = Pki {
            dir,
            ca_pem: ca.pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        };
        pki.write("ca.pem", &pki.ca_pem);
        pki.write("server.pem", &server_cert.pem());
        pki.write("server.key", &server_key.serialize_pem());
        pki.write("client.pem", &pki.client_cert_pem);
        pki.write("client.key", &pki.client_key_pem);
        pki
    }

    fn write(&self, name: &str, pem: &str) {
        std::fs::write(self.path(name), pem).expect("write a PEM file");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The server's files: its certificate (for 127.0.0.1), key and the CA.
    fn files(&self) -> TlsFiles {
        TlsFiles::new(
            self.path("server.pem"),
            self.path("server.key"),
            self.path("ca.pem"),
        )
    }

    /// A TLS-only redis-server with this PKI's server certificate.
    fn redis(&self, require_client_certs: bool) -> RedisServer {
        let files = self.files().require_client_certs(require_client_certs);
        RedisServer::start_tls(&files).expect("start redis-server with TLS")
    }

    /// A TLS-only Redis Cluster (3 primaries and `replicas` replicas each) with this PKI's
    /// server certificate.
    async fn cluster(&self, replicas: usize) -> RedisCluster {
        let files = self.files();
        tokio::task::spawn_blocking(move || RedisCluster::start_tls_with(3, replicas, &files))
            .await
            .expect("join")
            .expect("start a TLS Redis Cluster")
    }

    /// The body of the client key's PEM (what a leak would show).
    fn key_body(&self) -> &str {
        self.client_key_pem
            .lines()
            .nth(1)
            .expect("a PEM key has a body")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed CA.
fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA")
}

/// Settings for `redis` in db 3 trusting `ca` (PEM), with short heartbeats.
fn config(redis: &RedisServer, ca: &str) -> Config {
    Config::from_url(&redis.url_db(3))
        .expect("valid url")
        .tls_ca_pem(ca)
        .heartbeat(Duration::from_millis(300))
        .timeout(Duration::from_secs(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_heartbeats_and_the_monitor_work_over_tls() {
    let pki = Pki::new();
    let redis = pki.redis(false);
    assert!(redis.url().starts_with("rediss://"));
    let server = Server::start(config(&redis, &pki.ca_pem))
        .await
        .expect("server over TLS");
    server.serve(EchoServer::new(Echoer)).await.expect("serve");
    // The CA as a file this time.
    let client_config = Config::from_url(&redis.url_db(3))
        .expect("valid url")
        .tls_ca_file(pki.path("ca.pem"));
    let client = Client::connect(client_config)
        .await
        .expect("client over TLS");
    let echo = EchoClient::new(&client);
    assert_eq!(echo.echo("over TLS").await.expect("call"), "over TLS");
    let monitor = Monitor::connect(config(&redis, &pki.ca_pem))
        .await
        .expect("monitor over TLS");
    let snapshot = monitor.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.methods["tls.echo"], vec![server.id().clone()]);
    // The registry entry lives 3 heartbeats (900 ms): still there after twice that, the
    // heartbeat, which runs on connections of its own, kept it alive over TLS.
    let since = Instant::now();
    eventually("2 s of heartbeats", Duration::from_secs(10), || async {
        since.elapsed() >= Duration::from_secs(2)
    })
    .await;
    let snapshot = monitor.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.methods["tls.echo"], vec![server.id().clone()]);
    assert_eq!(echo.echo("still").await.expect("call"), "still");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_signed_by_another_ca_is_a_certificate_error() {
    let pki = Pki::new();
    let redis = pki.redis(false);
    let other = ca("some other CA");
    let err = Client::connect(config(&redis, &other.pem()))
        .await
        .expect_err("a server the CA did not sign");
    let message = err.to_string();
    assert!(message.contains("TLS"), "{message}");
    assert!(
        message.contains("certificate was refused (UnknownIssuer)"),
        "{message}"
    );
    // Without a CA, the system trust store does not know the test CA either.
    let err = Client::connect(Config::from_url(&redis.url()).expect("valid url"))
        .await
        .expect_err("a private CA is not in the system trust store");
    let message = err.to_string();
    assert!(message.contains("certificate"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_the_tls_port_fails_within_the_connect_timeout() {
    let pki = Pki::new();
    let redis = pki.redis(false);
    let plain = format!("redis://127.0.0.1:{}", redis.port());
    let started = Instant::now();
    let err = Client::connect(Config::from_url(&plain).expect("valid url"))
        .await
        .expect_err("plaintext to a TLS port");
    // The transport waits at most twice the (default, 5 s) connect timeout.
    assert!(started.elapsed() < Duration::from_secs(11), "{err}");
    let message = err.to_string();
    assert!(message.contains("could not connect"), "{message}");

    // And the other way round: TLS to a plaintext port is a TLS error that says so.
    let plain = common::redis();
    let tls_url = plain.url().replace("redis://", "rediss://");
    let started = Instant::now();
    let err = Client::connect(
        Config::from_url(&tls_url)
            .expect("valid url")
            .tls_ca_pem(pki.ca_pem.as_str()),
    )
    .await
    .expect_err("TLS to a plaintext port");
    assert!(started.elapsed() < Duration::from_secs(11), "{err}");
    let message = err.to_string();
    assert!(message.contains("TLS with Redis"), "{message}");
    assert!(message.contains("plaintext"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = Pki::new();
    let redis = pki.redis(true);
    let err = Client::connect(config(&redis, &pki.ca_pem))
        .await
        .expect_err("no client certificate");
    let message = err.to_string();
    assert!(message.contains("CertificateRequired"), "{message}");
    assert!(message.contains("client certificate"), "{message}");

    let with_pem = config(&redis, &pki.ca_pem)
        .tls_client_cert_pem(pki.client_cert_pem.as_str(), pki.client_key_pem.as_str());
    let server = Server::start(with_pem)
        .await
        .expect("server with a client cert");
    server.serve(EchoServer::new(Echoer)).await.expect("serve");
    let with_files = config(&redis, &pki.ca_pem)
        .tls_client_cert_files(pki.path("client.pem"), pki.path("client.key"));
    let client = Client::connect(with_files)
        .await
        .expect("client with a client cert");
    let echo = EchoClient::new(&client);
    assert_eq!(echo.echo("mutual").await.expect("call"), "mutual");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_debug_output_or_errors() {
    let pki = Pki::new();
    let redis = pki.redis(true);
    let url = format!("rediss://app:{PASSWORD}@127.0.0.1:{}/3", redis.port());
    let config = Config::from_url(&url)
        .expect("valid url")
        .tls_ca_pem(pki.ca_pem.as_str())
        .tls_client_cert_pem(pki.client_cert_pem.as_str(), pki.client_key_pem.as_str());
    let debug = format!("{config:?}");
    assert!(!debug.contains(PASSWORD), "{debug}");
    assert!(!debug.contains(pki.key_body()), "{debug}");
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    // The server knows no such user: the error names neither password nor key.
    let err = Client::connect(config.clone())
        .await
        .expect_err("unknown user");
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(PASSWORD), "{text}");
        assert!(!text.contains(pki.key_body()), "{text}");
    }
    // A key that is not PEM: the error says so without quoting it.
    let broken_key = format!("not a key {PASSWORD}");
    let err = Client::connect(config.tls_client_cert_pem(pki.client_cert_pem.as_str(), broken_key))
        .await
        .expect_err("a broken key");
    let message = err.to_string();
    assert!(message.contains("client key"), "{message}");
    assert!(!message.contains(PASSWORD), "{message}");
    // A TLS setting on a plaintext URL is refused, not ignored.
    let err = Client::connect(
        Config::from_url(&format!("redis://127.0.0.1:{}", redis.port()))
            .expect("valid url")
            .tls_ca_pem(pki.ca_pem.as_str()),
    )
    .await
    .expect_err("TLS settings on redis://");
    assert!(err.to_string().contains("rediss://"), "{err}");
}

#[tokio::test]
async fn rediss_urls_parse_and_a_missing_ca_file_is_a_clear_error() {
    assert!(Config::from_url("rediss://127.0.0.1:6380/2").is_ok());
    assert!(Config::from_url("rediss-cluster://127.0.0.1:7000?node=127.0.0.1:7001").is_ok());
    assert!(Config::from_url("rediss-cluster://127.0.0.1:7000/2").is_err());
    // Read when connecting, before any network traffic.
    let missing = Path::new("/nonexistent/ca.pem");
    let config = Config::from_url("rediss://127.0.0.1:1")
        .expect("valid")
        .tls_ca_file(missing);
    let err = Client::connect(config).await.expect_err("no CA file");
    let message = err.to_string();
    assert!(message.contains("/nonexistent/ca.pem"), "{message}");
}

/// Settings for a TLS cluster trusting `ca` (PEM), in `namespace`, with short heartbeats.
fn cluster_config(cluster: &RedisCluster, ca: &str, namespace: &str) -> Config {
    let url = cluster.seed_url();
    assert!(url.starts_with("rediss-cluster://"), "{url}");
    Config::from_url(&url)
        .expect("valid url")
        .tls_ca_pem(ca)
        .namespace(namespace)
        .heartbeat(Duration::from_millis(300))
        .timeout(Duration::from_secs(2))
}

/// The connections on the node on `port`, other than the one asking.
fn clients_on(cluster: &RedisCluster, port: u16) -> usize {
    let list = cluster
        .command_on(port, &["CLIENT", "LIST"])
        .expect("CLIENT LIST");
    let list = list.as_text().expect("text");
    list.lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_sharded_pubsub_over_a_tls_cluster() {
    let pki = Pki::new();
    let cluster = pki.cluster(1).await;
    let config = cluster_config(&cluster, &pki.ca_pem, "tls-cluster");
    let server = Server::start(config.clone())
        .await
        .expect("server over TLS on the cluster");
    server.serve(EchoServer::new(Echoer)).await.expect("serve");
    // The CA as a file this time.
    let client_config = Config::from_url(&cluster.seed_url())
        .expect("valid url")
        .tls_ca_file(pki.path("ca.pem"))
        .namespace("tls-cluster")
        .timeout(Duration::from_secs(2));
    let client = Client::connect(client_config)
        .await
        .expect("client over TLS on the cluster");
    let echo = EchoClient::new(&client);

    // Every call answered, 200 of them at once.
    let calls = (0..200).map(|i| {
        let echo = echo.clone();
        async move { echo.echo(format!("call {i}")).await }
    });
    let replies = futures_join_all(calls).await;
    for (i, reply) in replies.into_iter().enumerate() {
        assert_eq!(reply.expect("call"), format!("call {i}"));
    }

    // Sharded pub/sub carried them: the server's request channel and the client's inbox
    // have one sharded subscriber each, on the primary of their slot, and no node has a
    // classic channel.
    for channel in [
        format!("tls-cluster:0:calls:{}", server.id()),
        format!("tls-cluster:0:inbox:{}", client.id()),
    ] {
        let port = cluster
            .primary_for_slot(RedisCluster::slot_of(&channel))
            .expect("the channel's primary");
        let reply = cluster
            .command_on(port, &["PUBSUB", "SHARDNUMSUB", &channel])
            .expect("PUBSUB SHARDNUMSUB");
        assert_eq!(
            reply.as_str_vec(),
            Some(vec![channel.clone(), "1".to_string()]),
            "{channel} on :{port}"
        );
    }
    let primaries: Vec<u16> = cluster
        .nodes()
        .expect("nodes")
        .into_iter()
        .filter(|n| n.role == clouds_testkit::NodeRole::Primary)
        .map(|n| n.port)
        .collect();
    assert_eq!(primaries.len(), 3);
    for port in cluster.ports() {
        let classic = cluster
            .command_on(port, &["PUBSUB", "CHANNELS"])
            .expect("PUBSUB CHANNELS");
        assert_eq!(
            classic.as_str_vec(),
            Some(vec![]),
            "classic channels on :{port}"
        );
    }
    // The nodes found from the slot map (announced as 127.0.0.1) were reached over TLS too:
    // every primary has connections of ours, and there is no plaintext port to have used.
    for port in primaries {
        assert!(clients_on(&cluster, port) > 0, "no connection to :{port}");
    }
    assert_eq!(echo.echo("last").await.expect("call"), "last");
    client.close().await;
    server.shutdown().await.expect("shutdown");
}

/// `futures::future::join_all` without the dependency: the calls run concurrently as tasks.
async fn futures_join_all<F, T>(futures: impl IntoIterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("join"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_signed_by_another_ca_is_a_certificate_error() {
    let pki = Pki::new();
    let cluster = pki.cluster(0).await;
    let other = ca("some other CA");
    let started = Instant::now();
    let err = Client::connect(cluster_config(&cluster, &other.pem(), "wrong-ca"))
        .await
        .expect_err("a cluster the CA did not sign");
    // Within the transport's bound on a first connection (twice the 5 s connect timeout).
    assert!(started.elapsed() < Duration::from_secs(11), "{err}");
    let message = err.to_string();
    assert!(message.contains("TLS"), "{message}");
    assert!(
        message.contains("certificate was refused (UnknownIssuer)"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_tls_sentinel_and_after_a_failover() {
    let pki = Pki::new();
    let files = pki.files();
    let mut deployment = tokio::task::spawn_blocking(move || RedisSentinel::start_tls(&files))
        .await
        .expect("join")
        .expect("start a TLS Sentinel deployment");
    let url = deployment.url_with_db(3);
    assert!(url.starts_with("rediss-sentinel://"), "{url}");
    let config = Config::from_url(&url)
        .expect("valid url")
        .tls_ca_pem(pki.ca_pem.as_str())
        .namespace("tls-sentinel")
        .heartbeat(Duration::from_millis(300))
        .timeout(Duration::from_secs(1))
        .command_timeout(Duration::from_secs(1));
    let wrong = Config::from_url(&url)
        .expect("valid url")
        .tls_ca_pem(ca("some other CA").pem())
        .namespace("tls-sentinel");
    let started = Instant::now();
    let err = Client::connect(wrong)
        .await
        .expect_err("sentinels the CA did not sign");
    // fred does not pass the handshake's failure on through Sentinel: the error says what to
    // check, at once.
    assert!(started.elapsed() < Duration::from_secs(11), "{err}");
    let message = err.to_string();
    assert!(message.contains("TLS"), "{message}");
    assert!(message.contains("check the CA"), "{message}");
    let server = Server::start(config.clone())
        .await
        .expect("server through TLS sentinels");
    server.serve(EchoServer::new(Echoer)).await.expect("serve");
    let client = Client::connect(config.clone())
        .await
        .expect("client through TLS sentinels");
    let echo = EchoClient::new(&client).with_retries(2);
    for i in 0..20 {
        assert_eq!(
            echo.echo(format!("{i}")).await.expect("call"),
            i.to_string()
        );
    }
    let old = deployment.primary_port().expect("primary");
    assert!(
        has_db3_keys(&deployment, old),
        "the primary the sentinels name holds the registry"
    );

    // The primary dies; the sentinels (over TLS) promote the replica (replicating over TLS)
    // and calls resume through them.
    let killed = deployment.kill_primary().expect("kill the primary");
    assert_eq!(killed, old);
    let new = tokio::task::spawn_blocking(move || {
        let new = deployment.wait_failover(old, Duration::from_secs(30));
        (deployment, new)
    })
    .await
    .expect("join");
    let (deployment, new) = new;
    let new = new.expect("failover");
    assert_ne!(new, old);
    eventually(
        "calls after the failover",
        Duration::from_secs(20),
        || async { matches!(echo.echo("again").await.as_deref(), Ok("again")) },
    )
    .await;
    for i in 0..20 {
        assert_eq!(
            echo.echo(format!("{i}")).await.expect("call"),
            i.to_string()
        );
    }
    assert!(
        has_db3_keys(&deployment, new),
        "the servers registered on the new primary"
    );
    client.close().await;
    server.shutdown().await.expect("shutdown");
}

/// Whether database 3 of the data node on `port` holds keys (`INFO keyspace`).
fn has_db3_keys(deployment: &RedisSentinel, port: u16) -> bool {
    let info = deployment
        .command_on(port, &["INFO", "keyspace"])
        .expect("INFO keyspace");
    info.as_text()
        .expect("text")
        .lines()
        .any(|line| line.starts_with("db3:keys="))
}

/// Certificates made for a DNS name only, as is common: the nodes announce IP addresses,
/// which those certificates do not list. With a seed named by that DNS name, a certificate
/// naming it is good at the nodes' IP addresses too and calls work (without that, the first
/// connection to a node found from the slot map failed with `NotValidForName`); with the
/// seed's IP address, the first handshake says the certificate does not name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_certificates_name_a_dns_name_only() {
    let pki = Pki::with_names(&["localhost"]);
    let files = pki.files().server_name("localhost");
    let cluster = tokio::task::spawn_blocking(move || RedisCluster::start_tls_with(3, 0, &files))
        .await
        .expect("join")
        .expect("start a TLS Redis Cluster");
    let by_name = cluster.seed_url().replace("127.0.0.1", "localhost");
    let config = |url: &str| {
        Config::from_url(url)
            .expect("valid url")
            .tls_ca_pem(pki.ca_pem.as_str())
            .namespace("dns-name")
            .heartbeat(Duration::from_millis(300))
            .timeout(Duration::from_secs(2))
    };
    let server = Server::start(config(&by_name))
        .await
        .expect("server, nodes' certificates naming the seed");
    server.serve(EchoServer::new(Echoer)).await.expect("serve");
    let client = Client::connect(config(&by_name)).await.expect("client");
    let echo = EchoClient::new(&client);
    let calls = (0..50).map(|i| {
        let echo = echo.clone();
        async move { echo.echo(format!("call {i}")).await }
    });
    for (i, reply) in futures_join_all(calls).await.into_iter().enumerate() {
        assert_eq!(reply.expect("call"), format!("call {i}"));
    }
    // Every primary was reached (at 127.0.0.1, as announced), over TLS.
    for node in cluster.nodes().expect("nodes") {
        if node.role == clouds_testkit::NodeRole::Primary {
            assert!(
                clients_on(&cluster, node.port) > 0,
                "no connection to :{}",
                node.port
            );
        }
    }

    let started = Instant::now();
    let err = Client::connect(config(&cluster.seed_url()))
        .await
        .expect_err("the certificates do not name 127.0.0.1");
    assert!(started.elapsed() < Duration::from_secs(11), "{err}");
    let message = err.to_string();
    assert!(message.contains("NotValidForName"), "{message}");
    assert!(message.contains("does not name"), "{message}");
    client.close().await;
    server.shutdown().await.expect("shutdown");
}
