//! The clouds side: a typed service, its provider, and the caller the load generator drives.

use std::time::Duration;

use clouds::{Client, Config, Server};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::load::Caller;

/// Bytes on the wire as a MessagePack `bin` (with serde's default a `Vec<u8>` would travel as
/// an array of integers, up to twice as large and much slower to encode).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Payload(#[serde(with = "serde_bytes")] pub(crate) Vec<u8>);

/// What the bench calls.
#[clouds::service("bench")]
pub(crate) trait Bench {
    /// Returns its argument.
    async fn echo(&self, payload: Payload) -> Payload;
    /// Returns its argument once this provider has been sent `round` (or a later round) as a
    /// message, or after 60 s: keeps calls in flight for the RSS measurement.
    async fn hold(&self, round: u32, payload: Payload) -> Payload;
}

/// Longest a provider holds a call, whatever happens.
const MAX_HOLD: Duration = Duration::from_secs(60);

/// The provider.
pub(crate) struct Provider {
    released: watch::Receiver<u32>,
}

impl Bench for Provider {
    async fn echo(&self, payload: Payload) -> Payload {
        payload
    }

    async fn hold(&self, round: u32, payload: Payload) -> Payload {
        let mut released = self.released.clone();
        let _ = tokio::time::timeout(MAX_HOLD, released.wait_for(|r| *r >= round)).await;
        payload
    }
}

/// The configuration every node of the bench uses: calls wait up to `timeout`, providers take
/// up to 20,000 calls at once (the RSS row holds 10,000 of them).
///
/// `CLOUDS_BENCH_BATCHING=off` in the environment (inherited by the provider and RSS child
/// processes) turns batching off, to measure clouds without it.
pub(crate) fn config(url: &str, namespace: &str, timeout: Duration) -> Result<Config, String> {
    let config = Config::from_url(url).map_err(|e| e.to_string())?;
    Ok(tune(config, namespace, timeout))
}

/// Sets up `config` as [`config`] sets up a URL's (used for the in-memory broker's, in `cold`).
pub(crate) fn tune(config: Config, namespace: &str, timeout: Duration) -> Config {
    config
        .namespace(namespace)
        .timeout(timeout)
        .max_in_flight(20_000)
        .batching(batching())
}

/// Whether clouds batches in this run (see [`config`]).
pub(crate) fn batching() -> bool {
    std::env::var("CLOUDS_BENCH_BATCHING").map_or(true, |v| v != "off")
}

/// Starts a provider of [`Bench`]; round numbers it receives as messages release held calls.
pub(crate) async fn start_provider(config: Config) -> Result<Server, String> {
    let server = Server::start(config).await.map_err(|e| e.to_string())?;
    let (release, released) = watch::channel(0u32);
    server
        .serve(BenchServer::new(Provider { released }))
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = server.messages();
    // Ends when the server closes its message queue at shutdown.
    tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            if let Ok(round) = message.decode::<u32>() {
                release.send_if_modified(|r| {
                    let newer = round > *r;
                    *r = (*r).max(round);
                    newer
                });
            }
        }
    });
    Ok(server)
}

/// Runs a provider until stdin closes (the `--provider` child role); prints `ready NODE_ID`.
pub(crate) async fn serve_until_parent_gone(url: &str, namespace: &str) -> Result<(), String> {
    let server = start_provider(config(url, namespace, Duration::from_secs(10))?).await?;
    println!("ready {}", server.id());
    crate::procs::parent_gone().await;
    server.shutdown().await.map_err(|e| e.to_string())
}

/// Calls `bench.echo` through the generated typed stub.
#[derive(Clone)]
pub(crate) struct CloudsCaller {
    pub(crate) stub: BenchClient,
}

impl CloudsCaller {
    /// A caller on `client`.
    pub(crate) fn new(client: &Client) -> CloudsCaller {
        CloudsCaller {
            stub: BenchClient::new(client),
        }
    }
}

impl Caller for CloudsCaller {
    async fn call(&self, payload: &[u8]) -> Result<(), String> {
        let Payload(back) = self
            .stub
            .echo(Payload(payload.to_vec()))
            .await
            .map_err(|e| e.to_string())?;
        if back.len() != payload.len() {
            return Err(format!(
                "echo of {} bytes came back with {}",
                payload.len(),
                back.len()
            ));
        }
        Ok(())
    }
}

/// A provider and a client as separate nodes of this process.
pub(crate) struct InProcess {
    pub(crate) server: Server,
    pub(crate) client: Client,
}

impl InProcess {
    /// Starts both in `namespace`.
    pub(crate) async fn start(
        url: &str,
        namespace: &str,
        timeout: Duration,
    ) -> Result<InProcess, String> {
        InProcess::with_config(config(url, namespace, timeout)?).await
    }

    /// Starts both with `config` (the in-memory broker's, in `cold`); a provider started for
    /// a client that then cannot connect is shut down again.
    pub(crate) async fn with_config(config: Config) -> Result<InProcess, String> {
        let server = start_provider(config.clone()).await?;
        match Client::connect(config).await {
            Ok(client) => Ok(InProcess { server, client }),
            Err(e) => {
                if let Err(stop) = server.shutdown().await {
                    eprintln!("provider shutdown: {stop}");
                }
                Err(e.to_string())
            }
        }
    }

    /// Closes the client and shuts the provider down.
    pub(crate) async fn stop(self) {
        self.client.close().await;
        if let Err(e) = self.server.shutdown().await {
            eprintln!("provider shutdown: {e}");
        }
    }
}
