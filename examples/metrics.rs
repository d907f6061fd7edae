//! Serves clouds' metrics in the Prometheus text format on `/metrics` (feature `metrics`):
//!
//! ```text
//! redis-server --port 6379 &
//! cargo run --example metrics --features metrics      # then: curl 127.0.0.1:9464/metrics
//! ```
//!
//! It installs `metrics-exporter-prometheus` as the recorder, starts a server of `demo.add`
//! and a client that calls it (one call in ten with bad arguments), and answers every HTTP
//! request with the rendered metrics: `rpc_client_call_duration` and
//! `rpc_server_call_duration` (by `rpc_method` and `outcome`), `rpc_server_refusals`,
//! `rpc_client_retries`, ... `METRICS_ADDR` sets the address (default `127.0.0.1:9464`);
//! `--once` prints the metrics after 20 calls and exits.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), clouds::Error> {
    let prometheus = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()
    {
        Ok(handle) => handle,
        Err(e) => common::fail(&format!("cannot install the Prometheus recorder: {e}")),
    };
    let url = common::redis_url();
    let config = common::config(&url).namespace("metrics-example");
    let server = clouds::Server::start(config.clone()).await?;
    server
        .register("demo.add", |(a, b): (i64, i64)| async move {
            Ok::<_, Infallible>(a + b)
        })
        .await?;
    let client = clouds::Client::connect(config).await?;
    let calls = async {
        for n in 0u64.. {
            let _ = if n % 10 == 9 {
                client.call::<_, i64>("demo.add", ("not a number", 1)).await
            } else {
                client.call::<_, i64>("demo.add", (n as i64, 1)).await
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if std::env::args().any(|a| a == "--once") {
        for n in 0..20i64 {
            let _ = client.call::<_, i64>("demo.add", (n, 1)).await;
        }
        let _ = client.call::<_, i64>("demo.add", ("bad",)).await;
        print!("{}", prometheus.render());
        server.shutdown().await?;
        return Ok(());
    }
    let addr = std::env::var("METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:9464".into());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(listener) => listener,
        Err(e) => common::fail(&format!("cannot listen on {addr}: {e}")),
    };
    println!("metrics on http://{addr}/metrics; Ctrl-C to stop");
    let serve = async {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let body = prometheus.render();
            tokio::spawn(async move {
                // The request itself does not matter: every path gets the metrics.
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            });
        }
    };
    tokio::select! {
        _ = calls => {}
        _ = serve => {}
        _ = common::stop_signal() => {}
    }
    server.shutdown().await
}
