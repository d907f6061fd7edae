//! One provider of the `fault` service in its own process: the provider role of
//! `tests/faults.rs`, which starts several of these, kills them, and restarts them in turn.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379/3 cargo run --example fault_provider
//! ```
//!
//! Prints `READY <node id>` once it serves and `STOPPED <node id>` after a graceful shutdown,
//! which SIGTERM or Ctrl-C starts. With `--until-stdin-closes` the end of its stdin does too:
//! the tests give it a pipe, so a test process that dies, even by SIGKILL, leaves no
//! provider behind.

#[path = "../common/mod.rs"]
mod common;
mod service;

use std::time::Duration;

use clouds::Server;
use service::{Fault, FaultServer, fault_config};

struct Provider(String);

impl Fault for Provider {
    async fn whoami(&self) -> String {
        self.0.clone()
    }

    async fn nap(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }

    async fn ticks(&self, every_ms: u64) -> clouds::Streaming<u64> {
        let every = Duration::from_millis(every_ms.max(1));
        clouds::Streaming::new(futures_util::stream::unfold(0u64, move |n| async move {
            tokio::time::sleep(every).await;
            Some((n, n + 1))
        }))
    }

    async fn charge(&self, ms: u64) -> String {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.0.clone()
    }
}

/// Resolves when stdin reaches end of file (read on a thread of its own: a blocked read
/// must not hold up the runtime's shutdown).
async fn stdin_closed() {
    let (closed, on_close) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = closed.send(());
    });
    let _ = on_close.await;
}

#[tokio::main]
async fn main() -> Result<(), clouds::Error> {
    let until_stdin_closes = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--until-stdin-closes") => true,
        Some(other) => common::fail(&format!(
            "unknown argument {other:?}; the only one is --until-stdin-closes"
        )),
    };
    let url = common::redis_url();
    let server = match Server::start(fault_config(&url)).await {
        Ok(server) => server,
        Err(clouds::Error::Redis(e)) => common::fail(&format!("{e}\nstart redis-server first")),
        Err(e) => return Err(e),
    };
    let id = server.id().to_string();
    server.serve(FaultServer::new(Provider(id.clone()))).await?;
    println!("READY {id}");
    if until_stdin_closes {
        tokio::select! {
            _ = common::stop_signal() => {}
            _ = stdin_closed() => {}
        }
    } else {
        common::stop_signal().await;
    }
    server.shutdown().await?;
    println!("STOPPED {id}");
    Ok(())
}
