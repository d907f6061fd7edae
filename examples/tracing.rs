//! One OpenTelemetry trace across two services (feature `opentelemetry`).
//!
//! A client calls `front.order` inside a span of its own; that handler calls `stock.reserve`
//! on another server. Each attempt's span context travels in the Call frame as a W3C
//! `traceparent`, so every span below belongs to one trace. The spans go to an in-memory
//! exporter and are printed as a tree; a real application installs an exporter such as
//! OTLP instead.
//!
//! ```sh
//! cargo run --example tracing --features opentelemetry
//! ```
//!
//! Runs on the in-memory broker (no Redis needed): the frames are the same as over Redis.

use std::convert::Infallible;

use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The application's part: a tracer provider with an exporter, and the
    // tracing-opentelemetry layer that turns `tracing` spans into OpenTelemetry spans.
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("example"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))?;

    let broker = clouds::testing::Broker::new();
    let stock = clouds::Server::start(broker.config()).await?;
    stock
        .register("stock.reserve", |(item,): (String,)| async move {
            let call = clouds::CallContext::current().expect("in a handler");
            tracing::info!(caller = call.caller(), "reserving {item}");
            Ok::<_, Infallible>(3u32)
        })
        .await?;
    let front = clouds::Server::start(broker.config()).await?;
    let to_stock = front.client();
    front
        .register("front.order", move |(item,): (String,)| {
            let to_stock = to_stock.clone();
            async move {
                // Called inside this handler's span: part of the same trace.
                let left: u32 = to_stock
                    .call("stock.reserve", (item,))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(format!("ordered; {left} left"))
            }
        })
        .await?;

    let client = clouds::Client::connect(broker.config()).await?;
    let answer: String = client
        .call("front.order", ("teapot",))
        .instrument(tracing::info_span!("checkout"))
        .await?;
    println!("answer: {answer}");

    client.close().await;
    front.shutdown().await?;
    stock.shutdown().await?;
    let spans = exporter.get_finished_spans()?;
    println!(
        "{} spans, trace {}:",
        spans.len(),
        spans[0].span_context.trace_id()
    );
    print_tree(&spans, SpanId::INVALID, 1);
    Ok(())
}

/// The spans whose parent is `parent`, indented by depth, each with its kind and status.
fn print_tree(spans: &[SpanData], parent: SpanId, depth: usize) {
    for span in spans.iter().filter(|s| s.parent_span_id == parent) {
        let status = span
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == "rpc.response.status_code")
            .map(|kv| format!(" {}", kv.value))
            .unwrap_or_default();
        println!(
            "{:indent$}{} ({:?}{status}) span {} trace {}",
            "",
            span.name,
            span.span_kind,
            span.span_context.span_id(),
            span.span_context.trace_id(),
            indent = depth * 2
        );
        print_tree(spans, span.span_context.span_id(), depth + 1);
    }
}
