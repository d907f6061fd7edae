//! Tracing: the handler's `CallContext`, the trace context a call carries on the wire (passed
//! through to the handler and on to the calls it makes), and, with the `opentelemetry`
//! feature, one trace across caller and server (spans exported to memory). Each on the
//! in-memory broker and against a real redis-server.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use clouds::{CallContext, Client, Config, Server};
use common::Sniffer;

/// tracing caches each callsite's interest process-wide, decided by the first thread to hit
/// it; while at most one dispatcher is registered it asks only that thread's default
/// (tracing-core's `Rebuilder::JustOne`). A test here with no subscriber of its own that hits
/// clouds' span callsites first, while another test is installing one with `set_default`,
/// can cache "never" and leave that test without its spans (seen once in CI). A bare registry
/// as the global default, installed once, keeps every callsite interested; each test's own
/// subscriber still receives its spans. Every test calls this first.
fn interested_everywhere() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
}

/// What a handler saw of its call, as it returns it.
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Seen {
    method: String,
    caller: String,
    remaining_ms: u64,
    attempt: Option<u32>,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

fn seen() -> Seen {
    let context = CallContext::current().expect("a handler has a call context");
    Seen {
        method: context.method().to_string(),
        caller: context.caller().to_string(),
        remaining_ms: context.remaining().as_millis() as u64,
        attempt: context.attempt(),
        traceparent: context.trace().map(|t| t.traceparent().to_string()),
        tracestate: context.trace().map(|t| t.tracestate().to_string()),
    }
}

/// Registers `t.now` (answers at its first poll, on the receive loop), `t.later` (waits, so
/// it answers from a task of its own) and `t.outer` (calls `t.later` and returns what both
/// saw).
async fn serve(server: &Server) {
    server
        .register("t.now", |(): ()| async { Ok::<_, Infallible>(seen()) })
        .await
        .expect("t.now");
    server
        .register("t.later", |(): ()| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(seen())
        })
        .await
        .expect("t.later");
    let client = server.client();
    server
        .register("t.outer", move |(): ()| {
            let client = client.clone();
            async move {
                let outer = seen();
                let inner: Seen = client
                    .call("t.later", ())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((outer, inner))
            }
        })
        .await
        .expect("t.outer");
}

async fn handlers_read_their_call_context(config: Config) {
    interested_everywhere();
    for spawn_handlers in [false, true] {
        let server = Server::start(config.clone().spawn_handlers(spawn_handlers))
            .await
            .expect("server");
        serve(&server).await;
        let client = Client::connect(config.clone())
            .await
            .expect("client")
            .with_timeout(Duration::from_secs(5));
        for method in ["t.now", "t.later"] {
            let seen: Seen = client.call(method, ()).await.expect(method);
            assert_eq!(seen.method, method);
            assert_eq!(seen.caller, client.id().as_str());
            assert!(
                seen.remaining_ms > 0 && seen.remaining_ms <= 5000,
                "{method}: {} ms left of 5 s",
                seen.remaining_ms
            );
            // An untraced caller sends no trace element, so neither is known.
            assert_eq!((seen.attempt, seen.traceparent), (None, None), "{method}");
        }
        assert!(CallContext::current().is_none(), "none outside handlers");
        client.close().await;
        server.shutdown().await.expect("shutdown");
    }
}

#[tokio::test]
async fn handlers_read_their_call_context_on_the_memory_broker() {
    let broker = clouds::testing::Broker::new();
    handlers_read_their_call_context(broker.config()).await;
}

#[tokio::test]
async fn handlers_read_their_call_context_on_redis() {
    let redis = common::redis();
    handlers_read_their_call_context(common::config(&redis)).await;
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "congo=t61rcWkgMzE";

/// A Call frame as `docs/protocol.md` §3.1 lays it out, with the trace element: to
/// `t.outer`, no arguments, attempt 3, replies to `inbox`.
fn traced_call(id: u8, inbox: &str) -> Vec<u8> {
    let mut frame = vec![0x01, 0x97, 0x00, id];
    let str = |frame: &mut Vec<u8>, s: &str| {
        assert!(s.len() < 256);
        frame.extend_from_slice(&[0xd9, s.len() as u8]);
        frame.extend_from_slice(s.as_bytes());
    };
    str(&mut frame, "t.outer");
    str(&mut frame, inbox);
    frame.extend_from_slice(&[0xcd, 0x13, 0x88]); // deadline_ms 5000
    frame.push(0x93);
    str(&mut frame, TRACEPARENT);
    str(&mut frame, TRACESTATE);
    frame.push(3); // attempt
    frame.push(0x90); // no arguments
    frame
}

/// A trace context that arrives on the wire reaches the handler as it was sent, and goes on
/// with the calls the handler makes (without OpenTelemetry spans of our own to replace it);
/// untraced calls are the 6 elements of every version-1 peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_received_trace_context_reaches_the_handler_and_goes_on_over_redis() {
    interested_everywhere();
    let redis = common::redis();
    let config = common::config(&redis).timeout(Duration::from_secs(5));
    let server = Server::start(config.clone()).await.expect("server");
    serve(&server).await;
    let calls = format!("clouds:3:calls:{}", server.id());
    let inbox_id = "tracing-test-inbox";
    let mut calls_sniffer = Sniffer::subscribe(&redis, &calls);
    let mut inbox = Sniffer::subscribe(&redis, &format!("clouds:3:inbox:{inbox_id}"));

    let frame = traced_call(9, inbox_id);
    let receivers = redis
        .command_bytes(&[b"PUBLISH", calls.as_bytes(), &frame])
        .expect("publish")
        .as_int()
        .expect("count");
    assert_eq!(receivers, 2, "the server and the sniffer");
    assert_eq!(calls_sniffer.next(), frame);
    let reply = tokio::task::spawn_blocking(move || inbox.next())
        .await
        .expect("reply");
    // [version, fixarray 4, kind 1, id, status 0 (Ok), body]
    assert_eq!(&reply[..5], &[0x01, 0x94, 0x01, 9, 0x00], "{reply:?}");
    let (outer, inner): (Seen, Seen) =
        rmp_decode(&reply[5..]).expect("the handler's answer decodes");
    assert_eq!(outer.method, "t.outer");
    assert_eq!(outer.caller, inbox_id);
    assert_eq!(outer.attempt, Some(3));
    assert_eq!(outer.traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(outer.tracestate.as_deref(), Some(TRACESTATE));
    // The nested call carried the same context on (its own attempt number).
    assert_eq!(inner.method, "t.later");
    assert_eq!(inner.caller, server.id().as_str());
    assert_eq!(inner.traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(inner.tracestate.as_deref(), Some(TRACESTATE));
    assert_eq!(inner.attempt, Some(1));

    // An untraced call from a client adds nothing to the frame.
    let client = Client::connect(config).await.expect("client");
    let seen: Seen = client.call("t.now", ()).await.expect("t.now");
    assert_eq!(seen.traceparent, None);
    let untraced = tokio::task::spawn_blocking(move || {
        // The nested call's frame went to the same server: skip it.
        loop {
            let frame = calls_sniffer.next();
            if frame.windows(5).any(|w| w == b"t.now") {
                return frame;
            }
        }
    })
    .await
    .expect("sniffed");
    assert_eq!(&untraced[..3], &[0x01, 0x96, 0x00], "six elements");
    client.close().await;
    server.shutdown().await.expect("shutdown");
}

/// Decodes a MessagePack value (structs as maps, as the server encodes them).
fn rmp_decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use super::*;

    use opentelemetry::trace::{SpanKind, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing_subscriber::layer::SubscriberExt;

    /// A subscriber for this thread that exports every span to memory.
    fn install() -> (InMemorySpanExporter, tracing::subscriber::DefaultGuard) {
        super::interested_everywhere();
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("clouds-test"));
        let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        // Heals a callsite another thread cached before this subscriber existed.
        tracing::callsite::rebuild_interest_cache();
        (exporter, guard)
    }

    fn attribute(span: &SpanData, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    async fn one_trace_across_caller_and_server(config: Config) {
        let (exporter, _guard) = install();
        let server = Server::start(config.clone()).await.expect("server");
        serve(&server).await;
        let client = Client::connect(config).await.expect("client");
        let root = tracing::info_span!("request");
        let (seen, root_id): (Seen, _) = {
            let call = client.call("t.later", ());
            let root_id = {
                use opentelemetry::trace::TraceContextExt;
                use tracing_opentelemetry::OpenTelemetrySpanExt;
                root.context().span().span_context().span_id()
            };
            (
                tracing::Instrument::instrument(call, root.clone())
                    .await
                    .expect("t.later"),
                root_id,
            )
        };
        drop(root);
        let find = |kind: SpanKind| {
            exporter
                .get_finished_spans()
                .expect("spans")
                .into_iter()
                .find(|s| s.name == "t.later" && s.span_kind == kind)
        };
        common::eventually("both spans exported", Duration::from_secs(5), || {
            let done = find(SpanKind::Client).is_some() && find(SpanKind::Server).is_some();
            async move { done }
        })
        .await;
        let client_span = find(SpanKind::Client).expect("client span");
        let server_span = find(SpanKind::Server).expect("server span");
        let trace_id = client_span.span_context.trace_id();
        assert_eq!(
            server_span.span_context.trace_id(),
            trace_id,
            "one trace on both sides"
        );
        assert_eq!(
            server_span.parent_span_id,
            client_span.span_context.span_id(),
            "the server's span is the child of the caller's attempt span"
        );
        assert_eq!(
            client_span.parent_span_id, root_id,
            "the attempt is in the request"
        );
        assert!(server_span.parent_span_is_remote);
        // The handler saw the context its span descends from.
        let traceparent = seen.traceparent.expect("sent");
        assert!(
            traceparent.starts_with(&format!(
                "00-{trace_id}-{}-",
                client_span.span_context.span_id()
            )),
            "{traceparent}"
        );
        assert_eq!(seen.attempt, Some(1));
        for span in [&client_span, &server_span] {
            assert_eq!(
                attribute(span, "rpc.system.name").as_deref(),
                Some("clouds")
            );
            assert_eq!(attribute(span, "rpc.method").as_deref(), Some("t.later"));
            assert_eq!(
                attribute(span, "clouds.server.id").as_deref(),
                Some(server.id().as_str())
            );
            assert_eq!(attribute(span, "clouds.attempt").as_deref(), Some("1"));
            assert_eq!(
                attribute(span, "rpc.response.status_code").as_deref(),
                Some("OK")
            );
        }
        client.close().await;
        server.shutdown().await.expect("shutdown");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_trace_across_caller_and_server_on_the_memory_broker() {
        let broker = clouds::testing::Broker::new();
        one_trace_across_caller_and_server(broker.config()).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_trace_across_caller_and_server_over_redis() {
        let redis = common::redis();
        one_trace_across_caller_and_server(common::config(&redis).timeout(Duration::from_secs(5)))
            .await;
    }

    /// Signed frames (§3.11), claimed calls (kind 5) and batches (kind 8) carry the trace
    /// context too: calls made together (batched), a third of them with arguments large
    /// enough to be claimed, all signed, each server span the child of its attempt's span.
    #[tokio::test(flavor = "current_thread")]
    async fn signed_claimed_and_batched_calls_carry_the_trace_over_redis() {
        const KEY: [u8; 32] = *b"trace key, thirty-two bytes long";
        let (exporter, _guard) = install();
        let redis = common::redis();
        let config = common::config(&redis)
            .timeout(Duration::from_secs(10))
            .signing_key(1, KEY)
            .claim_threshold(1024);
        let server = Server::start(config.clone()).await.expect("server");
        server
            .register("t.echo", |(s,): (String,)| async move {
                let traced = CallContext::current()
                    .and_then(|c| c.trace().cloned())
                    .is_some();
                Ok::<_, Infallible>((s.len(), traced))
            })
            .await
            .expect("register");
        let client = Client::connect(config).await.expect("client");
        let publishes = || {
            let info = redis
                .command(&["INFO", "commandstats"])
                .expect("INFO")
                .as_text()
                .expect("text");
            info.lines()
                .find_map(|line| line.strip_prefix("cmdstat_publish:calls="))
                .and_then(|rest| rest.split(',').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let before = publishes();
        const N: usize = 30;
        let calls = (0..N).map(|i| {
            let arg = if i % 3 == 0 {
                "x".repeat(4096)
            } else {
                "y".repeat(10)
            };
            let client = &client;
            tracing::Instrument::instrument(
                async move { client.call::<_, (usize, bool)>("t.echo", (arg,)).await },
                tracing::info_span!("request", i),
            )
        });
        for result in futures_util::future::join_all(calls).await {
            let (_, traced) = result.expect("t.echo");
            assert!(traced, "the handler saw a trace context");
        }
        let published = publishes() - before;
        assert!(
            published < 2 * N as u64,
            "calls and replies were batched: {published} PUBLISHes for {N} calls"
        );
        let mut spans = Vec::new();
        common::eventually("every span exported", Duration::from_secs(5), || {
            spans = exporter.get_finished_spans().expect("spans");
            let servers = spans
                .iter()
                .filter(|s| s.name == "t.echo" && s.span_kind == SpanKind::Server)
                .count();
            async move { servers == N }
        })
        .await;
        for server_span in spans
            .iter()
            .filter(|s| s.name == "t.echo" && s.span_kind == SpanKind::Server)
        {
            let parent = spans
                .iter()
                .find(|s| {
                    s.span_kind == SpanKind::Client
                        && s.span_context.span_id() == server_span.parent_span_id
                })
                .expect("the server span's parent is an attempt span");
            assert_eq!(
                parent.span_context.trace_id(),
                server_span.span_context.trace_id()
            );
        }
        client.close().await;
        server.shutdown().await.expect("shutdown");
    }

    /// `Config::send_trace_context(false)` (for rolling upgrades from builds without it):
    /// the call goes without its trace context, and the server's span starts a trace of its
    /// own.
    #[tokio::test(flavor = "current_thread")]
    async fn trace_context_can_be_left_off_the_wire() {
        let (exporter, _guard) = install();
        let broker = clouds::testing::Broker::new();
        let server = Server::start(broker.config()).await.expect("server");
        serve(&server).await;
        let client = Client::connect(broker.config().send_trace_context(false))
            .await
            .expect("client");
        let seen: Seen = tracing::Instrument::instrument(
            client.call("t.now", ()),
            tracing::info_span!("request"),
        )
        .await
        .expect("t.now");
        assert_eq!((seen.traceparent, seen.attempt), (None, None));
        let spans = exporter.get_finished_spans().expect("spans");
        let span = |kind: SpanKind| {
            spans
                .iter()
                .find(|s| s.name == "t.now" && s.span_kind == kind)
                .expect("span")
        };
        assert_ne!(
            span(SpanKind::Server).span_context.trace_id(),
            span(SpanKind::Client).span_context.trace_id()
        );
        assert!(!span(SpanKind::Server).parent_span_is_remote);
        client.close().await;
        server.shutdown().await.expect("shutdown");
    }

    /// A failed handler's span says so.
    #[tokio::test(flavor = "current_thread")]
    async fn errors_are_the_spans_outcome() {
        let (exporter, _guard) = install();
        let broker = clouds::testing::Broker::new();
        let server = Server::start(broker.config()).await.expect("server");
        server
            .register("t.fail", |(): ()| async { Err::<(), _>("no") })
            .await
            .expect("register");
        let client = Client::connect(broker.config()).await.expect("client");
        let result: Result<(), _> = client.call("t.fail", ()).await;
        assert!(result.is_err());
        let spans = exporter.get_finished_spans().expect("spans");
        let server_span = spans
            .iter()
            .find(|s| s.name == "t.fail" && s.span_kind == SpanKind::Server)
            .expect("server span");
        assert_eq!(
            attribute(server_span, "rpc.response.status_code").as_deref(),
            Some("APP_ERROR")
        );
        assert_eq!(
            attribute(server_span, "error.type").as_deref(),
            Some("APP_ERROR")
        );
        assert!(matches!(
            server_span.status,
            opentelemetry::trace::Status::Error { .. }
        ));
        client.close().await;
        server.shutdown().await.expect("shutdown");
    }
}
