//! A provider of the `test` service in its own process. Run several to see calls balanced:
//!
//! ```text
//! redis-server --port 6379 &            # any shared Redis
//! cargo run --example hello_server &    # as many as you like
//! cargo run --example hello_server &
//! cargo run --example hello_client
//! ```
//!
//! Stops gracefully on Ctrl-C or SIGTERM: deregisters, finishes calls in flight, exits.

mod common;

use clouds::{NodeId, Server};
use common::{DivError, Hello, HelloServer};

struct Greeter {
    id: NodeId,
}

impl Hello for Greeter {
    async fn hello(&self, name: String, msg: String) -> String {
        format!("Hello {name}, {msg} (from {})", self.id)
    }

    async fn div(&self, a: i64, b: i64) -> Result<i64, DivError> {
        if b == 0 { Err(DivError) } else { Ok(a / b) }
    }
}

#[tokio::main]
async fn main() -> Result<(), clouds::Error> {
    let url = common::redis_url();
    let server = match Server::start(common::config(&url)).await {
        Ok(server) => server,
        Err(clouds::Error::Redis(e)) => common::fail(&format!(
            "{e}\nstart one with `redis-server` (or set REDIS_URL); servers and clients must share it"
        )),
        Err(e) => return Err(e),
    };
    let id = server.id().clone();
    server
        .serve(HelloServer::new(Greeter { id: id.clone() }))
        .await?;
    // The URL may carry a password: print where, never how.
    let at = url.rsplit('@').next().unwrap_or(&url);
    println!("{id} serving test.hello and test.div at {at}; Ctrl-C to stop");
    common::stop_signal().await;
    println!("{id} shutting down");
    server.shutdown().await?;
    println!("{id} stopped");
    Ok(())
}
