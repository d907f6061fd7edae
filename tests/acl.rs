//! Tenants confined by `Config::acl_rule`: two deployments share one Redis, each as its own
//! ACL user with a password that needs percent-encoding in the URL. Each runs normally with
//! nothing denied, and neither can read, subscribe to, publish on or change the other's names.
//! The cluster form of the rule on a Redis Cluster, and the Sentinel form (with `+role`) on a
//! Sentinel deployment, through a failover.

mod common;

use std::time::Duration;

use clouds::{Client, Config, Monitor, Server};
use clouds_testkit::{RedisCluster, RedisSentinel, RespValue};
use common::{RedisServer, eventually, redis};

/// What each tenant serves.
#[clouds::service("acl")]
pub trait Echo {
    /// Answers with the tenant's name and `text`.
    async fn echo(&self, text: String) -> String;
    /// The same, run once per call (its record is a key the rule must allow).
    #[clouds(once)]
    async fn echo_once(&self, text: String) -> String;
}

struct Tenant(&'static str);

impl Echo for Tenant {
    async fn echo(&self, text: String) -> String {
        format!("{}: {text}", self.0)
    }

    async fn echo_once(&self, text: String) -> String {
        format!("{}: {text}", self.0)
    }
}

/// Every character that has a meaning in a URL's user info, plus one that does not.
const PASSWORD: &str = "p@ss:w%rd/?#x";

/// Percent-encodes the characters of a URL's user info that would otherwise end it.
fn encode(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '%' | '@' | ':' | '/' | '?' | '#' => format!("%{:02X}", c as u32),
            c => c.to_string(),
        })
        .collect()
}

/// The deployment `namespace` (db 3) as `user`, with the credentials in the URL.
fn tenant_config(redis: &RedisServer, namespace: &str, user: &str) -> Config {
    let url = format!(
        "redis://{}:{}@127.0.0.1:{}/3",
        encode(user),
        encode(PASSWORD),
        redis.port()
    );
    Config::from_url(&url)
        .expect("valid url")
        .namespace(namespace)
        .heartbeat(Duration::from_millis(300))
        .timeout(Duration::from_secs(1))
}

/// Creates `user` with the rule clouds generates for `config`, as the default user.
fn create_user(redis: &RedisServer, config: &Config, user: &str) {
    let rule = config.acl_rule(user, PASSWORD).expect("rule");
    let args: Vec<&str> = rule.split(' ').collect();
    let reply = redis.command(&args).expect("ACL SETUSER");
    assert!(!reply.is_error(), "{rule}: {reply:?}");
}

/// Each `ACL LOG` entry as (object, username, reason).
fn acl_log(redis: &RedisServer) -> Vec<(String, String, String)> {
    log_entries(redis.command(&["ACL", "LOG"]).expect("ACL LOG"))
}

fn log_entries(reply: RespValue) -> Vec<(String, String, String)> {
    let RespValue::Array(Some(entries)) = reply else {
        panic!("ACL LOG is an array: {reply:?}");
    };
    entries
        .iter()
        .map(|entry| {
            let fields = entry.as_str_vec().unwrap_or_default();
            let field = |name: &str| {
                fields
                    .iter()
                    .position(|f| f == name)
                    .and_then(|i| fields.get(i + 1))
                    .cloned()
                    .unwrap_or_default()
            };
            (field("object"), field("username"), field("reason"))
        })
        .collect()
}

/// A server, a client and a monitor of one tenant.
struct Nodes {
    server: Server,
    client: Client,
    monitor: Monitor,
    echo: EchoClient,
}

async fn start(config: Config, name: &'static str) -> Nodes {
    let server = Server::start(config.clone()).await.expect("server");
    server
        .serve(EchoServer::new(Tenant(name)))
        .await
        .expect("serve");
    let client = Client::connect(config.clone()).await.expect("client");
    let monitor = Monitor::connect(config).await.expect("monitor");
    let echo = EchoClient::new(&client).with_retries(3);
    Nodes {
        server,
        client,
        monitor,
        echo,
    }
}

impl Nodes {
    /// A call goes through, an exactly-once one and a large one too (both ways through
    /// claims), and the monitor sees the server.
    async fn check(&self, name: &str) {
        assert_eq!(
            self.echo.echo("hi").await.expect("call"),
            format!("{name}: hi")
        );
        assert_eq!(
            self.echo
                .echo_once("once")
                .await
                .expect("an exactly-once call"),
            format!("{name}: once")
        );
        let large = "L".repeat(200 << 10);
        assert_eq!(
            self.echo.echo(&large).await.expect("a large call"),
            format!("{name}: {large}")
        );
        let snapshot = self.monitor.snapshot().await.expect("snapshot");
        assert_eq!(
            snapshot.methods.get("acl.echo").map(Vec::as_slice),
            Some(std::slice::from_ref(self.server.id())),
            "{name} sees its own server only"
        );
    }

    async fn close(self) {
        self.monitor.close().await;
        self.client.close().await;
        self.server.shutdown().await.expect("server shutdown");
    }
}

fn denied(reply: &RespValue) -> bool {
    matches!(reply, RespValue::Error(e) if e.starts_with("NOPERM"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confined_tenants_run_and_cannot_reach_each_other() {
    let redis = redis();
    let (alpha, beta) = ("a@team:1", "b%team");
    let config_a = tenant_config(&redis, "alpha", alpha);
    let config_b = tenant_config(&redis, "beta", beta);
    create_user(&redis, &config_a, alpha);
    create_user(&redis, &config_b, beta);

    let a = start(config_a, "alpha").await;
    let b = start(config_b, "beta").await;
    a.check("alpha").await;
    b.check("beta").await;
    // Every connection of the nodes (the heartbeats' own included) is one of the tenants.
    let clients = redis.command(&["CLIENT", "LIST"]).expect("client list");
    let clients = clients.as_text().expect("text");
    let users: Vec<&str> = clients
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("user=")))
        .collect();
    let count = |u: &str| users.iter().filter(|&&x| x == u).count();
    assert_eq!(count(alpha) + count(beta), users.len(), "{clients}");
    // server, its heartbeat, client and monitor: two connections each.
    assert_eq!((count(alpha), count(beta)), (8, 8), "{clients}");

    // The scripts are loaded again by the confined users after a flush, and heartbeats go
    // on past the TTL.
    assert!(
        !redis
            .command(&["SCRIPT", "FLUSH"])
            .expect("flush")
            .is_error()
    );
    // Not a synchronisation: time has to pass for the TTL to run out.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    a.check("alpha").await;
    // Every connection of tenant A reconnects (and subscribes again) as A.
    let killed = redis
        .command(&["CLIENT", "KILL", "USER", alpha])
        .expect("client kill");
    assert_eq!(killed.as_int(), Some(8), "{killed:?}");
    eventually("tenant A is back", Duration::from_secs(10), || async {
        matches!(a.echo.echo("back").await.as_deref(), Ok("alpha: back"))
    })
    .await;
    a.check("alpha").await;
    b.check("beta").await;
    assert_eq!(acl_log(&redis), [], "clouds ran into a denial");

    // Tenant A's credentials against tenant B's keys and channels.
    let as_a = |args: &[&str]| redis.command_as(alpha, PASSWORD, args).expect("reply");
    let server_b = b.server.id().to_string();
    let client_b = b.client.id().to_string();
    let node_b = format!("{{beta:3}}:node:{server_b}");
    let calls_b = format!("beta:3:calls:{server_b}");
    let inbox_b = format!("beta:3:inbox:{client_b}");
    let hashed_events_b = "{beta:3}:events";
    assert!(
        !redis
            .command(&["HGETALL", &node_b])
            .expect("hgetall")
            .is_nil()
    );
    for probe in [
        &["HGETALL", &node_b][..],
        &["HGET", &node_b, "methods"],
        &["HSET", &node_b, "methods", "x"],
        &["DEL", &node_b],
        &["PEXPIRE", &node_b, "1"],
        &["SUBSCRIBE", "beta:3:events"],
        &["SUBSCRIBE", &inbox_b],
        &["PUBLISH", &calls_b, "forged"],
        &["PUBLISH", &inbox_b, "forged"],
        &["PUBLISH", "beta:3:events", "forged"],
        &["PUBLISH", hashed_events_b, "forged"],
        &[
            "EVALSHA",
            "0000000000000000000000000000000000000000",
            "1",
            &node_b,
        ],
        // Nor anything clouds does not need, on any name.
        &["EVAL", "return 1", "0"],
        &["KEYS", "*"],
        &["SCAN", "0"],
        &["INFO", "keyspace"],
        &["CONFIG", "GET", "*"],
        &["PSUBSCRIBE", "*"],
        &["CLIENT", "SETNAME", "x"],
        &["CLIENT", "LIST"],
        &["SELECT", "0"],
        &["FLUSHDB"],
        &["GET", "plain"],
        // Nor B's claims or exactly-once records, nor other commands on its own.
        &["SET", "beta:3:claim:00", "forged"],
        &["GETDEL", "beta:3:claim:00"],
        &["GET", "beta:3:once:x:1"],
        &["SET", "beta:3:once:x:1", "forged"],
        &["APPEND", "alpha:3:claim:00", "x"],
        &["INCR", "alpha:3:once:x:1"],
    ] {
        let reply = as_a(probe);
        assert!(denied(&reply), "{probe:?} as {alpha}: {reply:?}");
    }
    // The same user reaches its own deployment's names.
    let node_a = format!("{{alpha:3}}:node:{}", a.server.id());
    assert!(!as_a(&["HGETALL", &node_a]).is_error());
    assert_eq!(as_a(&["PUBLISH", "alpha:3:nobody", "x"]).as_int(), Some(0));
    assert!(as_a(&["GETDEL", "alpha:3:claim:00"]).is_nil());
    assert!(!as_a(&["INFO", "server"]).is_error());

    // B was not disturbed, and clouds itself still runs into no denial, shutdown included.
    assert!(
        !redis
            .command(&["ACL", "LOG", "RESET"])
            .expect("reset")
            .is_error()
    );
    b.check("beta").await;
    a.check("alpha").await;
    a.close().await;
    b.close().await;
    assert_eq!(acl_log(&redis), [], "clouds ran into a denial");
}

/// clouds needs neither `INFO` nor `CLIENT ID`, which fred sends on every connection: with
/// both denied it runs as before, and the only denials are those two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_info_and_client_id_denied() {
    let redis = redis();
    let user = "strict";
    let config = tenant_config(&redis, "strict", user);
    let rule = config.acl_rule(user, PASSWORD).expect("rule") + " -info -client|id";
    let args: Vec<&str> = rule.split(' ').collect();
    assert!(!redis.command(&args).expect("ACL SETUSER").is_error());
    let nodes = start(config, "strict").await;
    nodes.check("strict").await;
    nodes.close().await;
    let log = acl_log(&redis);
    assert!(!log.is_empty(), "fred asked for INFO and CLIENT ID");
    for (object, username, reason) in &log {
        assert_eq!((username.as_str(), reason.as_str()), (user, "command"));
        assert!(
            matches!(object.as_str(), "info" | "client|id"),
            "denied {object}"
        );
    }
}

/// The cluster form of the rule: two tenants on one Redis Cluster (users created on every
/// node), sharded pub/sub, the heartbeat's `PUBSUB SHARDNUMSUB` and `CLUSTER SLOTS` checks
/// and fred's `CLUSTER INFO`, with nothing denied; and no reach into the other tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confined_tenants_on_a_cluster() {
    let cluster = RedisCluster::start().expect("start a Redis Cluster");
    let seed = cluster.seed_url();
    let hosts = seed.strip_prefix("redis-cluster://").expect("cluster url");
    let (alpha, beta) = ("a@team:1", "b%team");
    let tenant = |namespace: &str, user: &str| {
        let url = format!(
            "redis-cluster://{}:{}@{hosts}",
            encode(user),
            encode(PASSWORD)
        );
        Config::from_url(&url)
            .expect("valid url")
            .namespace(namespace)
            .heartbeat(Duration::from_millis(300))
            .timeout(Duration::from_secs(1))
    };
    let (config_a, config_b) = (tenant("alpha", alpha), tenant("beta", beta));
    for (config, user) in [(&config_a, alpha), (&config_b, beta)] {
        let rule = config.acl_rule(user, PASSWORD).expect("rule");
        let args: Vec<&str> = rule.split(' ').collect();
        for port in cluster.ports() {
            let reply = cluster.command_on(port, &args).expect("ACL SETUSER");
            assert!(!reply.is_error(), "{rule}: {reply:?}");
        }
    }
    let log_is_empty = || {
        for port in cluster.ports() {
            let log = log_entries(cluster.command_on(port, &["ACL", "LOG"]).expect("ACL LOG"));
            assert_eq!(log, [], "clouds ran into a denial on node {port}");
        }
    };

    let a = start(config_a, "alpha").await;
    let b = start(config_b, "beta").await;
    a.check("alpha").await;
    b.check("beta").await;
    // Not a synchronisation: time has to pass for heartbeats (and their checks) to run.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    a.check("alpha").await;
    b.check("beta").await;
    log_is_empty();

    let server_b = b.server.id().to_string();
    let node_b = format!("{{beta:0}}:node:{server_b}");
    let calls_b = format!("beta:0:calls:{server_b}");
    let inbox_b = format!("beta:0:inbox:{}", b.client.id());
    let port = cluster.ports()[0];
    for probe in [
        &["HGETALL", &node_b][..],
        &["HSET", &node_b, "methods", "x"],
        &["SSUBSCRIBE", "{beta:0}:events"],
        &["SSUBSCRIBE", &inbox_b],
        &["SPUBLISH", &calls_b, "forged"],
        &["SPUBLISH", "{beta:0}:events", "forged"],
        &["PUBLISH", "alpha:0:x", "classic"],
        &["SUBSCRIBE", "alpha:0:x"],
        &["PUBSUB", "CHANNELS"],
        &["CLUSTER", "NODES"],
        &["KEYS", "*"],
        &["GETDEL", "beta:0:claim:00"],
    ] {
        let reply = cluster
            .command_as_on(port, alpha, PASSWORD, probe)
            .expect("reply");
        assert!(denied(&reply), "{probe:?} as {alpha}: {reply:?}");
    }
    for port in cluster.ports() {
        assert!(
            !cluster
                .command_on(port, &["ACL", "LOG", "RESET"])
                .expect("reset")
                .is_error()
        );
    }
    b.check("beta").await;
    a.close().await;
    b.close().await;
    log_is_empty();
}

/// The Sentinel form of the rule (with `+role`: fred checks that the node the sentinels name
/// is a primary), created on the primary and on the replica (ACL users are not replicated, and
/// the replica is the primary after a failover). A tenant connects through
/// `redis-sentinel://` as the user, runs with nothing denied, is confined, and goes on as the
/// same user on the promoted replica when the primary is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_tenant_through_sentinel_and_a_failover() {
    let mut deployment = tokio::task::spawn_blocking(RedisSentinel::start)
        .await
        .expect("join")
        .expect("start a Sentinel deployment");
    let user = "s@team:1";
    let url = deployment.url_with_db(3).replacen(
        "redis-sentinel://",
        &format!("redis-sentinel://{}:{}@", encode(user), encode(PASSWORD)),
        1,
    );
    let config = Config::from_url(&url)
        .expect("valid url")
        .namespace("alpha")
        .heartbeat(Duration::from_millis(300))
        .timeout(Duration::from_secs(1))
        .command_timeout(Duration::from_secs(1));
    let rule = config.acl_rule(user, PASSWORD).expect("rule");
    assert!(rule.split(' ').any(|word| word == "+role"), "{rule}");
    let args: Vec<&str> = rule.split(' ').collect();
    // On both data nodes: a user created on the primary only is missing after the failover
    // (calls never resume; checked by hand).
    for port in deployment.data_ports() {
        let reply = deployment.command_on(port, &args).expect("ACL SETUSER");
        assert!(!reply.is_error(), "{rule} on :{port}: {reply:?}");
    }
    let log_is_empty = |deployment: &RedisSentinel, port: u16| {
        let log = log_entries(
            deployment
                .command_on(port, &["ACL", "LOG"])
                .expect("ACL LOG"),
        );
        assert_eq!(log, [], "clouds ran into a denial on :{port}");
    };
    let users_on = |deployment: &RedisSentinel, port: u16| {
        let clients = deployment
            .command_on(port, &["CLIENT", "LIST"])
            .expect("client list");
        let clients = clients.as_text().expect("text");
        let ours = clients
            .lines()
            .filter(|l| l.split(' ').any(|f| f == format!("user={user}")))
            .count();
        (ours, clients)
    };
    let old = deployment.primary_port().expect("primary");

    let a = start(config, "alpha").await;
    a.check("alpha").await;
    // Not a synchronisation: time has to pass for heartbeats to run.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    a.check("alpha").await;
    // The nodes' connections to the primary are the tenant's (the replica's and the
    // sentinels' are the default user's).
    let (ours, clients) = users_on(&deployment, old);
    assert!(ours >= 4, "{clients}");
    log_is_empty(&deployment, old);
    for probe in [
        &["KEYS", "*"][..],
        &["GET", "plain"],
        &["SELECT", "0"],
        &["HGETALL", "{beta:3}:node:x"],
        &["PUBLISH", "beta:3:events", "forged"],
    ] {
        let reply = deployment
            .command_as_on(old, user, PASSWORD, probe)
            .expect("reply");
        assert!(denied(&reply), "{probe:?} as {user}: {reply:?}");
    }

    // The primary dies; the replica, which has the user too, takes over.
    assert_eq!(deployment.kill_primary().expect("kill"), old);
    let (deployment, new) = tokio::task::spawn_blocking(move || {
        let new = deployment.wait_failover(old, Duration::from_secs(30));
        (deployment, new)
    })
    .await
    .expect("join");
    let new = new.expect("failover");
    eventually(
        "calls after the failover",
        Duration::from_secs(20),
        || async { matches!(a.echo.echo("back").await.as_deref(), Ok("alpha: back")) },
    )
    .await;
    eventually(
        "the server registered on the new primary",
        Duration::from_secs(10),
        || async {
            a.monitor.snapshot().await.is_ok_and(|snapshot| {
                snapshot.methods.get("acl.echo").map(Vec::as_slice)
                    == Some(std::slice::from_ref(a.server.id()))
            })
        },
    )
    .await;
    a.check("alpha").await;
    let (ours, clients) = users_on(&deployment, new);
    assert!(ours >= 4, "{clients}");
    log_is_empty(&deployment, new);
    let reply = deployment
        .command_as_on(new, user, PASSWORD, &["KEYS", "*"])
        .expect("reply");
    assert!(
        denied(&reply),
        "KEYS as {user} on the new primary: {reply:?}"
    );
    assert!(
        !deployment
            .command_on(new, &["ACL", "LOG", "RESET"])
            .expect("reset")
            .is_error()
    );
    a.check("alpha").await;
    a.close().await;
    log_is_empty(&deployment, new);
}
