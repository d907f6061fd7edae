//! Metrics through the `metrics` facade (feature `metrics`): the application installs the
//! recorder (a Prometheus exporter, say) and picks where they go. Names follow the
//! OpenTelemetry semantic conventions for RPC: durations in seconds, labelled with
//! `rpc.system.name` = `clouds`, `rpc.method` and the `outcome` (`ok`, or the error's kind).
//! Without the feature every function here is empty and compiles to nothing.

use crate::stats::Count;

/// Histogram: a call's duration as the caller saw it (all its attempts), in seconds.
#[cfg(feature = "metrics")]
pub(crate) const CLIENT_CALL_DURATION: &str = "rpc.client.call.duration";
/// Histogram: a handler's duration on the server, from dispatch to its outcome, in seconds.
#[cfg(feature = "metrics")]
pub(crate) const SERVER_CALL_DURATION: &str = "rpc.server.call.duration";
/// Counter: attempts after the first, by method.
#[cfg(feature = "metrics")]
pub(crate) const CLIENT_RETRIES: &str = "rpc.client.retries";
/// Counter: attempts re-routed at no cost (the provider's inbox was gone, or it was stopping).
#[cfg(feature = "metrics")]
pub(crate) const CLIENT_REROUTES: &str = "rpc.client.reroutes";
/// Counter: overloaded answers received as a caller.
#[cfg(feature = "metrics")]
pub(crate) const CLIENT_OVERLOADED: &str = "rpc.client.overloaded";
/// Counter: calls a server refused at its in-flight limit, by method.
#[cfg(feature = "metrics")]
pub(crate) const SERVER_REFUSALS: &str = "rpc.server.refusals";
/// Counter: frames a node could not use, by `kind` (`malformed`, `misrouted`, `oversized`,
/// `unauthenticated`, `replayed`).
#[cfg(feature = "metrics")]
pub(crate) const BAD_FRAMES: &str = "rpc.bad_frames";

/// A handler finished on this server.
#[inline]
pub(crate) fn server_call(method: &str, outcome: &'static str, seconds: f64) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(SERVER_CALL_DURATION, "rpc.system.name" => "clouds", "rpc.method" => method.to_string(), "outcome" => outcome)
        .record(seconds);
    #[cfg(not(feature = "metrics"))]
    let _ = (method, outcome, seconds);
}

/// A call finished on the caller's side.
#[cfg(feature = "metrics")]
#[inline]
pub(crate) fn client_call(method: &str, outcome: &'static str, seconds: f64) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(CLIENT_CALL_DURATION, "rpc.system.name" => "clouds", "rpc.method" => method.to_string(), "outcome" => outcome)
        .record(seconds);
    #[cfg(not(feature = "metrics"))]
    let _ = (method, outcome, seconds);
}

/// An attempt after the first.
#[inline]
pub(crate) fn retry(method: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(CLIENT_RETRIES, "rpc.system.name" => "clouds", "rpc.method" => method.to_string())
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = method;
}

/// A call refused at the in-flight limit.
#[inline]
pub(crate) fn refused(method: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(SERVER_REFUSALS, "rpc.system.name" => "clouds", "rpc.method" => method.to_string())
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = method;
}

/// `n` more of a node's counter `count`, for those that have a metric.
#[inline]
pub(crate) fn counted(count: Count, n: u64) {
    #[cfg(feature = "metrics")]
    {
        let bad = |kind: &'static str| {
            metrics::counter!(BAD_FRAMES, "rpc.system.name" => "clouds", "kind" => kind)
                .increment(n);
        };
        match count {
            Count::Malformed => bad("malformed"),
            Count::Misrouted => bad("misrouted"),
            Count::Oversized => bad("oversized"),
            Count::Unauthenticated => bad("unauthenticated"),
            Count::Replayed => bad("replayed"),
            Count::Rerouted => {
                metrics::counter!(CLIENT_REROUTES, "rpc.system.name" => "clouds").increment(n)
            }
            Count::Overloaded => {
                metrics::counter!(CLIENT_OVERLOADED, "rpc.system.name" => "clouds").increment(n)
            }
            _ => {}
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (count, n);
}

/// The outcome label of a call that failed.
#[cfg(feature = "metrics")]
pub(crate) fn outcome_of(error: &crate::Error) -> &'static str {
    use crate::Error;
    match error {
        Error::Timeout { .. } => "timeout",
        Error::NoProvider { .. } => "no_provider",
        Error::Overloaded { .. } => "overloaded",
        Error::Remote(_) => "application_error",
        Error::Panicked { .. } => "panic",
        Error::UnknownMethod { .. } => "unknown_method",
        Error::BadArguments { .. } => "bad_arguments",
        Error::Server { .. } => "server_error",
        Error::ClaimLost { .. } => "claim_lost",
        Error::Shutdown => "shutdown",
        _ => "error",
    }
}
