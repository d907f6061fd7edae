//! `rediss://` end to end: a redis-server serving TLS only, with a CA and certificates made
//! here by rcgen. Calls, the registry (heartbeats run on their own connections) and the
//! monitor over TLS; a wrong CA, plaintext to the TLS port, mutual TLS; no secret in `Debug`
//! output or errors.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clouds::{Client, Config, Monitor, Server};
use clouds_testkit::{RedisServer, TlsFiles};
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

/// A CA, a server certificate for 127.0.0.1 and localhost and a client certificate, all
/// signed by the CA, as PEM files in a temporary directory (removed on drop).
struct Pki {
    dir: PathBuf,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl Pki {
    fn new() -> Pki {
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
            CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).expect("params");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
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

    /// A TLS-only redis-server with this PKI's server certificate.
    fn redis(&self, require_client_certs: bool) -> RedisServer {
        let files = TlsFiles::new(
            self.path("server.pem"),
            self.path("server.key"),
            self.path("ca.pem"),
        )
        .require_client_certs(require_client_certs);
        RedisServer::start_tls(&files).expect("start redis-server with TLS")
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
