//! `clouds-bench streams`: a streaming method's items per second at several credit windows,
//! side by side with the raw pub/sub round trip (fred alone) and clouds' own sequential calls,
//! in one run against a `redis-server` of its own (BENCHMARKS.md, "Streams").
//!
//! Each round measures, in turn: raw round trips one at a time, clouds calls one at a time,
//! then one stream of `items` items of 100 bytes at each window. Rounds repeat (`--reps`) and
//! the table shows medians, so the rows share the machine's state.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clouds::{Client, Server, Streaming};
use clouds_testkit::RedisServer;

use crate::clouds_rows::{Payload, config};
use crate::load::Caller;
use crate::raw::{Channels, RawClient, RawServer};
use crate::stats::median;

const WINDOWS: &[u32] = &[1, 16, 64, 256];
const ITEM_BYTES: usize = 100;

/// The `streams` subcommand: `[--quick] [--reps N]`.
pub(crate) fn main(args: &[String]) -> ExitCode {
    crate::subcommand("streams", args, 5, measure)
}

async fn measure(quick: bool, reps: usize) -> Result<String, String> {
    let (round_trips, items) = if quick {
        (2_000, 20_000u64)
    } else {
        (10_000, 200_000u64)
    };
    let redis = RedisServer::start().map_err(|e| format!("redis-server: {e}"))?;
    let url = redis.url();
    let channels = Channels::new("streams-raw", 1);
    let raw_server = RawServer::start(&url, &channels.requests[0], &channels.reply).await?;
    let raw = RawClient::connect(&url, &channels, Duration::from_secs(10)).await?;

    let base = config(&url, "streams", Duration::from_secs(30))?;
    let server = Server::start(base.clone())
        .await
        .map_err(|e| e.to_string())?;
    server
        .register("bench.echo", |(p,): (Payload,)| async move {
            Ok::<_, std::convert::Infallible>(p)
        })
        .await
        .map_err(|e| e.to_string())?;
    server
        .register_stream("bench.items", |(n,): (u64,)| async move {
            Streaming::iter((0..n).map(|_| Payload(vec![7u8; ITEM_BYTES])))
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut clients = Vec::new();
    for &window in WINDOWS {
        let client = Client::connect(base.clone().stream_window(window))
            .await
            .map_err(|e| e.to_string())?;
        clients.push((window, client));
    }
    let plain = &clients[0].1;

    let payload = vec![7u8; ITEM_BYTES];
    let mut raw_rates = Vec::new();
    let mut call_rates = Vec::new();
    let mut stream_rates: Vec<Vec<f64>> = vec![Vec::new(); WINDOWS.len()];
    for _ in 0..reps {
        let started = Instant::now();
        for _ in 0..round_trips {
            raw.call(&payload).await?;
        }
        raw_rates.push(round_trips as f64 / started.elapsed().as_secs_f64());

        let arg = Payload(payload.clone());
        let started = Instant::now();
        for _ in 0..round_trips {
            plain
                .call::<_, Payload>("bench.echo", (&arg,))
                .await
                .map_err(|e| e.to_string())?;
        }
        call_rates.push(round_trips as f64 / started.elapsed().as_secs_f64());

        for (i, (window, client)) in clients.iter().enumerate() {
            // Fewer items at small windows, which run at about one round trip per item.
            let n = if *window < 16 { items / 20 } else { items };
            let started = Instant::now();
            let mut stream = client
                .open_stream::<_, Payload>("bench.items", (n,))
                .await
                .map_err(|e| e.to_string())?;
            let mut got = 0u64;
            while let Some(item) = stream.next().await {
                item.map_err(|e| e.to_string())?;
                got += 1;
            }
            if got != n {
                return Err(format!("window {window}: {got} of {n} items"));
            }
            stream_rates[i].push(n as f64 / started.elapsed().as_secs_f64());
        }
    }
    for (_, client) in clients {
        client.close().await;
    }
    let _ = server.shutdown().await;
    raw.close().await;
    raw_server.stop().await;

    let raw = median(&raw_rates);
    let mut table = String::new();
    let _ = writeln!(
        table,
        "streams: {ITEM_BYTES}-byte items, one provider and one caller in this process, median of {reps} round(s)"
    );
    let _ = writeln!(table, "{:<34} {:>12} {:>10}", "row", "per second", "vs raw");
    let mut row = |name: String, rate: f64| {
        let _ = writeln!(table, "{name:<34} {rate:>12.0} {:>9.2}x", rate / raw);
    };
    row("raw round trip (fred, sequential)".into(), raw);
    row("clouds call (sequential)".into(), median(&call_rates));
    for (window, rates) in WINDOWS.iter().zip(stream_rates) {
        row(format!("stream items, window {window}"), median(&rates));
    }
    Ok(table)
}
