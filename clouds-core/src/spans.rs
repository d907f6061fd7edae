//! `tracing` spans of calls: one per attempt on the caller (`clouds.call`), one around the
//! handler on the server (`clouds.handle`), with the OpenTelemetry RPC attribute names; and
//! the trace context a call carries (`docs/protocol.md` §3.1).
//!
//! With no subscriber interested (or one that filters these out), a span is `Span::none()`:
//! its fields are not evaluated and recording on it does nothing. With the `opentelemetry`
//! feature, the attempt's span context travels as the call's `traceparent`, and the
//! handler's span is made the child of the one that arrived.

use tracing::Span;
use tracing::field::Empty;

use crate::context::{CallContext, TraceContext};
use crate::envelope::{Status, Trace, TraceRef};

/// The span of one attempt of a call, to `server`.
#[inline]
pub(crate) fn attempt(method: &str, server: &str, attempt: u32) -> Span {
    tracing::info_span!(
        target: "clouds::call",
        "clouds.call",
        otel.name = method,
        otel.kind = "client",
        rpc.system.name = "clouds",
        rpc.method = method,
        clouds.server.id = server,
        clouds.attempt = attempt,
        rpc.response.status_code = Empty,
        error.type = Empty,
        otel.status_code = Empty,
    )
}

/// The span around a handler on `server`.
#[inline]
pub(crate) fn handler(method: &str, server: &str, caller: &str, trace: Option<&Trace>) -> Span {
    let span = tracing::info_span!(
        target: "clouds::handle",
        "clouds.handle",
        otel.name = method,
        otel.kind = "server",
        rpc.system.name = "clouds",
        rpc.method = method,
        clouds.server.id = server,
        clouds.caller.id = caller,
        clouds.attempt = Empty,
        rpc.response.status_code = Empty,
        error.type = Empty,
        otel.status_code = Empty,
    );
    if let Some(trace) = trace
        && !span.is_disabled()
    {
        span.record("clouds.attempt", trace.attempt);
        #[cfg(feature = "opentelemetry")]
        otel::set_parent(&span, trace.traceparent.as_str(), trace.tracestate.as_str());
    }
    span
}

/// Records a reply's status on a span as its outcome.
#[inline]
pub(crate) fn replied(span: &Span, status: Status) {
    if span.is_disabled() {
        return;
    }
    let name = status_name(status);
    span.record("rpc.response.status_code", name);
    // `Stream`: a stream opened, its items follow (§3.14).
    if !matches!(status, Status::Ok | Status::Stream) {
        failed(span, name);
    }
}

/// Records an outcome without a reply (`timeout`, `not_delivered`, …) or an error status.
pub(crate) fn failed(span: &Span, kind: &'static str) {
    span.record("error.type", kind);
    span.record("otel.status_code", "ERROR");
}

/// A reply status as the `rpc.response.status_code` attribute.
fn status_name(status: Status) -> &'static str {
    match status {
        Status::Ok => "OK",
        Status::AppError => "APP_ERROR",
        Status::Panic => "PANIC",
        Status::UnknownMethod => "UNKNOWN_METHOD",
        Status::BadArguments => "BAD_ARGUMENTS",
        Status::Overloaded => "OVERLOADED",
        Status::ShuttingDown => "SHUTTING_DOWN",
        Status::ServerError => "SERVER_ERROR",
        Status::ClaimLost => "CLAIM_LOST",
        Status::Stream => "STREAM",
        Status::Unrecognized => "UNRECOGNIZED",
    }
}

/// The trace context an attempt sends.
pub(crate) enum Outgoing {
    /// The one the current handler's call carried, passed on unchanged (no OpenTelemetry
    /// context of our own to send).
    Passed(TraceContext),
    /// The attempt span's OpenTelemetry context.
    #[cfg(feature = "opentelemetry")]
    Own {
        traceparent: String,
        tracestate: String,
    },
}

impl Outgoing {
    /// The trace element for attempt number `attempt`.
    pub(crate) fn element(&self, attempt: u32) -> TraceRef<'_> {
        match self {
            Outgoing::Passed(trace) => TraceRef {
                traceparent: trace.traceparent(),
                tracestate: trace.tracestate(),
                attempt,
            },
            #[cfg(feature = "opentelemetry")]
            Outgoing::Own {
                traceparent,
                tracestate,
            } => TraceRef {
                traceparent,
                tracestate,
                attempt,
            },
        }
    }
}

/// What an attempt whose span is `span` sends as its trace context: with the
/// `opentelemetry` feature, the span's own context (or the current span's, if this one is
/// filtered out) when it is valid; otherwise the context of the call the current handler
/// serves, if any. `None` (the usual case without tracing): nothing is added to the frame.
#[inline]
pub(crate) fn outgoing(span: &Span) -> Option<Outgoing> {
    #[cfg(feature = "opentelemetry")]
    if let Some(own) = otel::inject(span) {
        return Some(own);
    }
    let _ = span;
    CallContext::with_current(|current| current?.trace().cloned().map(Outgoing::Passed))
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::Outgoing;

    /// The span's OpenTelemetry context as a `traceparent` and `tracestate`, if valid.
    pub(super) fn inject(span: &Span) -> Option<Outgoing> {
        let cx = if span.is_disabled() {
            Span::current().context()
        } else {
            span.context()
        };
        let otel_span = cx.span();
        let sc = otel_span.span_context();
        if !sc.is_valid() {
            return None;
        }
        Some(Outgoing::Own {
            traceparent: format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            ),
            tracestate: sc.trace_state().header(),
        })
    }

    /// Makes `span` the child of the remote span a valid `traceparent` names; an invalid one
    /// is ignored (W3C: the receiver then starts a new trace).
    pub(super) fn set_parent(span: &Span, traceparent: &str, tracestate: &str) {
        if let Some(sc) = parse(traceparent, tracestate) {
            // Fails only if no `tracing_opentelemetry` layer is installed: nothing to parent.
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
        }
    }

    /// A `traceparent` (W3C Trace Context, version 00, or a later version's first four
    /// fields) and `tracestate` as a remote span context.
    pub(super) fn parse(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
        let mut fields = traceparent.split('-');
        let version = fields.next()?;
        let trace_id = fields.next()?;
        let span_id = fields.next()?;
        let flags = fields.next()?;
        let lower_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !lower_hex(version, 2)
            || version == "ff"
            || (version == "00" && fields.next().is_some())
            || !lower_hex(trace_id, 32)
            || !lower_hex(span_id, 16)
            || !lower_hex(flags, 2)
        {
            return None;
        }
        let trace_id = TraceId::from_hex(trace_id).ok()?;
        let span_id = SpanId::from_hex(span_id).ok()?;
        let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?) & TraceFlags::SAMPLED;
        let state = tracestate.parse::<TraceState>().unwrap_or_default();
        let sc = SpanContext::new(trace_id, span_id, flags, true, state);
        sc.is_valid().then_some(sc)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn traceparents_parse_as_the_w3c_spec_says() {
            let sc = parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "congo=t61rcWkgMzE",
            )
            .expect("valid");
            assert_eq!(
                sc.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
            assert!(sc.is_sampled() && sc.is_remote());
            assert_eq!(sc.trace_state().header(), "congo=t61rcWkgMzE");
            for bad in [
                "",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            ] {
                assert!(
                    parse(bad, "").is_none(),
                    "{bad:?} is not a valid traceparent"
                );
            }
            // A later version may append fields.
            assert!(
                parse(
                    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra",
                    ""
                )
                .is_some()
            );
        }
    }
}
