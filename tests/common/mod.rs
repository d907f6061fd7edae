//! Shared by the integration tests: a throwaway redis-server per test, polling helpers, and
//! the example binaries to run as child processes.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub use clouds_testkit::RedisServer;

/// A command running the example `name`: `target/<profile>/examples/<name>`, next to this
/// test binary's `deps/` directory. `cargo test` builds the examples before the tests.
pub fn example(name: &str) -> Command {
    let mut dir: PathBuf = std::env::current_exe().expect("test binary path");
    dir.pop(); // the test binary
    dir.pop(); // deps/
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo test` (which builds the examples) or `cargo build --example {name}`",
        path.display()
    );
    Command::new(path)
}

/// Starts a redis-server on a free loopback port for one test.
pub fn redis() -> RedisServer {
    RedisServer::start().expect("start redis-server (apt-get install redis-server)")
}

/// A config for `redis` in db 3 with short heartbeats and timeouts so tests run fast
/// (heartbeat 300 ms, TTL 900 ms: still safe when the test machine is loaded).
pub fn config(redis: &RedisServer) -> clouds::Config {
    clouds::Config::from_url(&redis.url_db(3))
        .expect("valid url")
        .heartbeat(Duration::from_millis(300))
        .timeout(Duration::from_secs(1))
}

/// What the registry says right now, read by a monitor of its own.
pub async fn status(config: clouds::Config) -> clouds::RegistrySnapshot {
    clouds::Monitor::connect(config)
        .await
        .expect("monitor")
        .snapshot()
        .await
        .expect("status")
}

/// Polls `check` until it returns true or `within` passes; panics with `what` on timeout.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The exactly-once records of namespace `clouds` in `db` of `redis` now.
pub fn once_records(redis: &RedisServer, db: u8) -> Vec<String> {
    keys(redis, db, "once")
}

/// The keys of namespace `clouds`'s `kind` (`claim`, `once`) in `db`.
fn keys(redis: &RedisServer, db: u8, kind: &str) -> Vec<String> {
    let db = db.to_string();
    let pattern = format!("clouds:{db}:{kind}:*");
    let script = "redis.call('SELECT', ARGV[1]) return redis.call('KEYS', ARGV[2])";
    let reply = redis
        .command(&["EVAL", script, "0", &db, &pattern])
        .expect("KEYS");
    reply.as_str_vec().unwrap_or_else(|| panic!("{reply:?}"))
}

/// The `calls=` of `command` in an `INFO commandstats` text (0 if it never ran).
pub fn calls_of(info: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The claim keys (large bodies waiting for their receiver) of namespace `clouds` in `db` of
/// `redis` now: empty once every call, reply and message has been taken or cleaned up.
pub fn claim_keys(redis: &RedisServer, db: u8) -> Vec<String> {
    keys(redis, db, "claim")
}

/// A connection subscribed to one channel, outside any node: sees frames as Redis delivers
/// them (RESP2 over a plain socket).
pub struct Sniffer(BufReader<TcpStream>);

impl Sniffer {
    pub fn subscribe(redis: &RedisServer, channel: &str) -> Sniffer {
        Sniffer::subscribe_on(redis.port(), "SUBSCRIBE", channel)
    }

    /// `command` (`SUBSCRIBE`, or `SSUBSCRIBE` on a cluster's shard) to `channel` on the
    /// Redis listening on `port`.
    pub fn subscribe_on(port: u16, command: &str, channel: &str) -> Sniffer {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let command = format!(
            "*2\r\n${}\r\n{command}\r\n${}\r\n{channel}\r\n",
            command.len(),
            channel.len()
        );
        stream.write_all(command.as_bytes()).expect("subscribe");
        let mut sniffer = Sniffer(BufReader::new(stream));
        let confirm = sniffer.array();
        assert!(
            confirm[0] == b"subscribe" || confirm[0] == b"ssubscribe",
            "{confirm:?}"
        );
        sniffer
    }

    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.0.read_line(&mut line).expect("a RESP line");
        line.trim_end().to_string()
    }

    /// One array of bulk strings and integers (integers as their text).
    pub fn array(&mut self) -> Vec<Vec<u8>> {
        let header = self.line();
        let n: usize = header[1..].parse().expect("array length");
        (0..n)
            .map(|_| {
                let head = self.line();
                match head.as_bytes()[0] {
                    b'$' => {
                        let len: usize = head[1..].parse().expect("bulk length");
                        let mut bytes = vec![0u8; len + 2];
                        self.0.read_exact(&mut bytes).expect("bulk");
                        bytes.truncate(len);
                        bytes
                    }
                    _ => head.as_bytes()[1..].to_vec(),
                }
            })
            .collect()
    }

    /// The payload of the next message.
    pub fn next(&mut self) -> Vec<u8> {
        let message = self.array();
        assert!(
            message[0] == b"message" || message[0] == b"smessage",
            "{message:?}"
        );
        message[2].clone()
    }
}
