//! Server and client in one process: the whole API in one page.
//!
//! ```text
//! cargo run --example hello
//! ```
//!
//! Uses `$REDIS_URL` (default `redis://127.0.0.1:6379/3`; a Redis Cluster works the same:
//! `REDIS_URL=redis-cluster://127.0.0.1:7000`). If nothing answers there, it starts a throwaway
//! `redis-server` on a free port for the run and says so.

mod common;

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use clouds::{Client, Monitor, Server};
use common::{DivError, Hello, HelloClient, HelloServer};

struct Greeter;

impl Hello for Greeter {
    async fn hello(&self, name: String, msg: String) -> String {
        format!("Hello {name}, {msg}")
    }

    async fn div(&self, a: i64, b: i64) -> Result<i64, DivError> {
        if b == 0 { Err(DivError) } else { Ok(a / b) }
    }
}

#[tokio::main]
async fn main() -> Result<(), clouds::Error> {
    let url = common::redis_url();
    // Keep the throwaway server (if any) alive until the end of main.
    let (config, _throwaway) = match Monitor::connect(common::config(&url)).await {
        Ok(probe) => {
            probe.close().await;
            (common::config(&url), None)
        }
        Err(clouds::Error::Redis(e)) => {
            println!("nothing answers at {url} ({e})");
            let redis = match clouds_testkit::RedisServer::start() {
                Ok(redis) => redis,
                Err(e) => common::fail(&format!(
                    "could not start a throwaway redis-server: {e}\n\
                     install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) \
                     or point REDIS_URL at a running Redis"
                )),
            };
            let url = redis.url_db(3);
            println!("started a throwaway redis-server at {url} for this run");
            (common::config(&url), Some(redis))
        }
        Err(e) => return Err(e),
    };

    // A provider: serves the trait's methods, plus one registered by name.
    let server = Server::start(config.clone()).await?;
    server.serve(HelloServer::new(Greeter)).await?;
    server
        .register("test.echo", |(s,): (String,)| async move {
            Ok::<_, Infallible>(s)
        })
        .await?;
    println!(
        "server {} serves test.hello, test.div, test.echo",
        server.id()
    );

    // A caller, through the generated typed stub.
    let client = Client::connect(config.clone()).await?;
    let hello = HelloClient::new(&client).with_retries(5);
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s: String = hello.hello("Glen", format!("timestamp is {ts}")).await?;
    println!("test.hello -> {s}");
    let q: Result<i64, DivError> = hello.div(7, 2).await?;
    println!("test.div(7, 2) -> {q:?}");
    let q: Result<i64, DivError> = hello.div(7, 0).await?;
    println!("test.div(7, 0) -> {q:?}");

    // A call by name, arguments as a tuple.
    let e: String = client.call("test.echo", ("hi",)).await?;
    println!("test.echo -> {e}");

    // Node-to-node messages.
    client.send(server.id(), &"ping").await?;
    if let Some(msg) = server.messages().next().await {
        println!(
            "server got {:?} from {}",
            msg.decode::<String>()?,
            msg.from()
        );
    }

    // Who serves what.
    let status = Monitor::connect(config).await?.snapshot().await?;
    for (method, servers) in &status.methods {
        println!("monitor: {method} <- {servers:?}");
    }
    for (id, info) in &status.servers {
        println!(
            "monitor: {id} on {} pid {} ({} in flight) serves {:?}",
            info.host, info.pid, info.in_flight, info.methods
        );
    }

    server.shutdown().await?;
    println!("server shut down");
    Ok(())
}
