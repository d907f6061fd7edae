//! Per-method figures of a server: counters since start and a latency histogram of the recent
//! window, recorded on the call path without a lock, summed up by each heartbeat into the
//! bounded text summary its registry entry carries (`docs/protocol.md` §5.1, field `stats`),
//! and read back by the monitor.
//!
//! The histogram is a fixed log-linear one of atomics (16 sub-buckets per power of two of
//! nanoseconds, so any value is known within 1/16 ≈ 6 %): recording is one bucket index
//! (a `leading_zeros`) and one relaxed `fetch_add`, from any thread, where a histogram that
//! takes `&mut` (such as `hdrhistogram`) needs a lock per method on the call path. Two windows
//! alternate: the heartbeat flips them and empties the one it reads.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::envelope::Status;

/// Values below this many nanoseconds have a bucket each.
const EXACT: u64 = 32;
/// log2 of `EXACT`.
const EXACT_BITS: u32 = 5;
/// Sub-buckets per power of two above `EXACT`.
const SUB_BITS: u32 = 4;
/// The largest power of two with buckets of its own (2^42 ns ≈ 73 minutes); longer calls
/// count in the last bucket.
const MAX_EXP: u32 = 42;
/// Buckets per histogram.
const BUCKETS: usize = EXACT as usize + ((MAX_EXP - EXACT_BITS + 1) << SUB_BITS) as usize;

/// The most methods one summary lists (the busiest first beyond that): keeps an entry bounded.
pub(crate) const MAX_METHODS: usize = 256;

/// The bucket of a latency of `ns` nanoseconds.
fn bucket(ns: u64) -> usize {
    if ns < EXACT {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros();
    if exp > MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = (ns >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    EXACT as usize + (((exp - EXACT_BITS) << SUB_BITS) as usize) + sub as usize
}

/// The middle of bucket `index`, in nanoseconds.
fn value_of(index: usize) -> u64 {
    if index < EXACT as usize {
        return index as u64;
    }
    let above = (index - EXACT as usize) as u64;
    let exp = (above >> SUB_BITS) as u32 + EXACT_BITS;
    let sub = above & ((1 << SUB_BITS) - 1);
    let width = 1u64 << (exp - SUB_BITS);
    (1u64 << exp) + sub * width + width / 2
}

/// One window: a histogram of the calls that finished in it, and how many of them failed.
struct Window {
    buckets: Box<[AtomicU32]>,
    errors: AtomicU64,
}

impl Window {
    fn new() -> Self {
        Window {
            buckets: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            errors: AtomicU64::new(0),
        }
    }
}

/// What became of a call, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
enum Kind {
    Ok,
    AppError,
    BadArguments,
    Panic,
    /// Any other error status a handler's outcome carries (a reply that could not be made).
    ServerError,
    /// Skipped: its deadline passed before a worker got to it.
    Expired,
    /// Dropped unfinished (the server closed while it ran).
    Abandoned,
    /// Dropped unfinished because its caller sent a cancel.
    Cancelled,
}

const KINDS: usize = Kind::Cancelled as usize + 1;

/// One method's figures.
pub(crate) struct Meter {
    /// The method's name (a label of its metrics, with the `metrics` feature).
    name: Box<str>,
    started: AtomicU64,
    finished: [AtomicU64; KINDS],
    overloaded: AtomicU64,
    /// Which of `windows` calls are recorded in now (0 or 1).
    active: AtomicU8,
    windows: [Window; 2],
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter")
            .field("started", &self.started.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Meter {
    /// The figures of the method `name`, all zero.
    pub(crate) fn new(name: &str) -> Self {
        Meter {
            name: name.into(),
            started: AtomicU64::new(0),
            finished: Default::default(),
            overloaded: AtomicU64::new(0),
            active: AtomicU8::new(0),
            windows: [Window::new(), Window::new()],
        }
    }
}

/// A call being timed; counted as abandoned if dropped unfinished.
pub(crate) struct Timing {
    meter: std::sync::Arc<Meter>,
    start: Instant,
    done: bool,
}

impl Timing {
    /// When the call started.
    pub(crate) fn started(&self) -> Instant {
        self.start
    }

    /// Records the call as finished with `status`, now.
    pub(crate) fn finish(mut self, status: Status) {
        self.done = true;
        let kind = match status {
            Status::Ok => Kind::Ok,
            Status::AppError => Kind::AppError,
            Status::BadArguments => Kind::BadArguments,
            Status::Panic => Kind::Panic,
            _ => Kind::ServerError,
        };
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let meter = &self.meter;
        let window = &meter.windows[usize::from(meter.active.load(Ordering::Relaxed) & 1)];
        window.buckets[bucket(ns)].fetch_add(1, Ordering::Relaxed);
        if kind != Kind::Ok {
            window.errors.fetch_add(1, Ordering::Relaxed);
        }
        meter.finished[kind as usize].fetch_add(1, Ordering::Relaxed);
        crate::telemetry::server_call(
            &meter.name,
            match kind {
                Kind::Ok => "ok",
                Kind::AppError => "application_error",
                Kind::BadArguments => "bad_arguments",
                Kind::Panic => "panic",
                _ => "server_error",
            },
            ns as f64 / 1e9,
        );
    }

    /// Records the call as dropped unfinished on its caller's cancel.
    pub(crate) fn cancelled(mut self) {
        self.done = true;
        self.meter.finished[Kind::Cancelled as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Records the call as skipped: its deadline had passed before it could run.
    pub(crate) fn expired(mut self) {
        self.done = true;
        self.meter.finished[Kind::Expired as usize].fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Timing {
    fn drop(&mut self) {
        if !self.done {
            self.meter.finished[Kind::Abandoned as usize].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Meter {
    /// Starts timing one call of this method.
    pub(crate) fn start(self: &std::sync::Arc<Self>) -> Timing {
        self.started.fetch_add(1, Ordering::Relaxed);
        Timing {
            meter: self.clone(),
            start: Instant::now(),
            done: false,
        }
    }

    /// Counts a call refused at the in-flight limit.
    pub(crate) fn overloaded(&self) {
        self.overloaded.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::refused(&self.name);
    }

    /// The figures now, the window ending now: the window recorded into flips.
    fn take(&self) -> Line {
        let old = self.active.fetch_xor(1, Ordering::AcqRel) & 1;
        let window = &self.windows[usize::from(old)];
        let mut counts = [0u64; BUCKETS];
        let mut total = 0u64;
        for (count, bucket) in counts.iter_mut().zip(window.buckets.iter()) {
            *count = u64::from(bucket.swap(0, Ordering::Relaxed));
            total += *count;
        }
        let w_errors = window.errors.swap(0, Ordering::Relaxed);
        let finished: Vec<u64> = self
            .finished
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        let done: u64 = finished.iter().sum();
        let started = self.started.load(Ordering::Relaxed);
        let percentile = |p: f64| -> u64 {
            if total == 0 {
                return 0;
            }
            let rank = ((total as f64) * p).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (index, count) in counts.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return value_of(index);
                }
            }
            0
        };
        let max = counts.iter().rposition(|c| *c > 0).map_or(0, value_of);
        Line {
            calls: finished[Kind::Ok as usize]
                + finished[Kind::AppError as usize]
                + finished[Kind::BadArguments as usize]
                + finished[Kind::Panic as usize]
                + finished[Kind::ServerError as usize],
            ok: finished[Kind::Ok as usize],
            app_error: finished[Kind::AppError as usize],
            bad_arguments: finished[Kind::BadArguments as usize],
            panic: finished[Kind::Panic as usize],
            server_error: finished[Kind::ServerError as usize],
            expired: finished[Kind::Expired as usize],
            abandoned: finished[Kind::Abandoned as usize],
            cancelled: finished[Kind::Cancelled as usize],
            overloaded: self.overloaded.load(Ordering::Relaxed),
            in_flight: started.saturating_sub(done),
            w_calls: total,
            w_errors,
            p50_ns: percentile(0.50),
            p90_ns: percentile(0.90),
            p99_ns: percentile(0.99),
            max_ns: max,
        }
    }
}

/// One method's line of a summary: every figure as it goes on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Line {
    pub(crate) calls: u64,
    pub(crate) ok: u64,
    pub(crate) app_error: u64,
    pub(crate) bad_arguments: u64,
    pub(crate) panic: u64,
    pub(crate) server_error: u64,
    pub(crate) expired: u64,
    pub(crate) abandoned: u64,
    pub(crate) cancelled: u64,
    pub(crate) overloaded: u64,
    pub(crate) in_flight: u64,
    pub(crate) w_calls: u64,
    pub(crate) w_errors: u64,
    pub(crate) p50_ns: u64,
    pub(crate) p90_ns: u64,
    pub(crate) p99_ns: u64,
    pub(crate) max_ns: u64,
}

impl Line {
    /// The line's fields, name and value, in wire order.
    fn fields(&self) -> [(&'static str, u64); 17] {
        [
            ("calls", self.calls),
            ("ok", self.ok),
            ("app_error", self.app_error),
            ("bad_arguments", self.bad_arguments),
            ("panic", self.panic),
            ("server_error", self.server_error),
            ("expired", self.expired),
            ("abandoned", self.abandoned),
            ("cancelled", self.cancelled),
            ("overloaded", self.overloaded),
            ("in_flight", self.in_flight),
            ("w_calls", self.w_calls),
            ("w_errors", self.w_errors),
            ("p50_ns", self.p50_ns),
            ("p90_ns", self.p90_ns),
            ("p99_ns", self.p99_ns),
            ("max_ns", self.max_ns),
        ]
    }

    fn set(&mut self, name: &str, value: u64) {
        let field = match name {
            "calls" => &mut self.calls,
            "ok" => &mut self.ok,
            "app_error" => &mut self.app_error,
            "bad_arguments" => &mut self.bad_arguments,
            "panic" => &mut self.panic,
            "server_error" => &mut self.server_error,
            "expired" => &mut self.expired,
            "abandoned" => &mut self.abandoned,
            "cancelled" => &mut self.cancelled,
            "overloaded" => &mut self.overloaded,
            "in_flight" => &mut self.in_flight,
            "w_calls" => &mut self.w_calls,
            "w_errors" => &mut self.w_errors,
            "p50_ns" => &mut self.p50_ns,
            "p90_ns" => &mut self.p90_ns,
            "p99_ns" => &mut self.p99_ns,
            "max_ns" => &mut self.max_ns,
            // A field of a newer version: ignored.
            _ => return,
        };
        *field = value;
    }
}

/// The first word of a summary, and the version this build writes and reads.
const MAGIC: &str = "clouds-stats";
const FORMAT: &str = "1";

/// The summary of every method's figures, the window ending now (the windows flip), as the
/// `stats` field of a registry entry: a header line, then one line per method.
pub(crate) fn summary<'a>(
    meters: impl Iterator<Item = (&'a str, &'a Meter)>,
    window: Duration,
) -> String {
    let mut lines: Vec<(&str, Line)> = meters.map(|(name, m)| (name, m.take())).collect();
    let truncated = lines.len() > MAX_METHODS;
    if truncated {
        lines.sort_by(|a, b| b.1.calls.cmp(&a.1.calls).then(a.0.cmp(b.0)));
        lines.truncate(MAX_METHODS);
    }
    lines.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = format!(
        "{MAGIC} {FORMAT} window_ms={} truncated={}\n",
        window.as_millis(),
        u8::from(truncated)
    );
    for (name, line) in lines {
        out.push_str(name);
        for (field, value) in line.fields() {
            let _ = write!(out, " {field}={value}");
        }
        out.push('\n');
    }
    out
}

/// A summary read back: the window, whether methods were left out, each method's line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    pub(crate) window: Duration,
    pub(crate) truncated: bool,
    pub(crate) methods: BTreeMap<String, Line>,
}

/// Reads a `stats` field; `None` if it is not a summary of a version this build reads. Lines
/// that do not read are skipped, fields this build does not know are ignored, missing ones are
/// zero; never panics, whatever the input.
pub(crate) fn parse(text: &[u8]) -> Option<Summary> {
    let text = std::str::from_utf8(text).ok()?;
    let mut lines = text.lines();
    let mut header = lines.next()?.split(' ');
    if header.next() != Some(MAGIC) || header.next() != Some(FORMAT) {
        return None;
    }
    let mut summary = Summary::default();
    for word in header {
        match word.split_once('=') {
            Some(("window_ms", v)) => {
                summary.window = Duration::from_millis(v.parse().ok()?);
            }
            Some(("truncated", v)) => summary.truncated = v == "1",
            _ => {}
        }
    }
    for line in lines.take(MAX_METHODS * 4) {
        let mut words = line.split(' ');
        let Some(name) = words.next().filter(|n| !n.is_empty() && n.len() <= 256) else {
            continue;
        };
        let mut parsed = Line::default();
        let mut readable = true;
        for word in words {
            match word.split_once('=').map(|(k, v)| (k, v.parse::<u64>())) {
                Some((k, Ok(v))) => parsed.set(k, v),
                _ => readable = false,
            }
        }
        if readable {
            summary.methods.insert(name.to_string(), parsed);
        }
    }
    Some(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn buckets_are_ordered_and_within_a_sixteenth() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 30, 3 << 35, u64::MAX]) {
            let b = bucket(ns);
            assert!(b >= last, "monotonic at {ns}");
            assert!(b < BUCKETS);
            last = b;
            if (EXACT..1 << MAX_EXP).contains(&ns) {
                let v = value_of(b);
                assert!(v.abs_diff(ns) * 16 <= ns, "{ns} read back as {v}");
            } else if ns < EXACT {
                assert_eq!(value_of(b), ns);
            }
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn a_summary_reads_back_what_was_recorded() {
        let add = Arc::new(Meter::new("math.add"));
        for _ in 0..98 {
            add.start().finish(Status::Ok);
        }
        add.start().finish(Status::AppError);
        add.start().finish(Status::Panic);
        add.overloaded();
        let running = add.start();
        add.start().expired();
        drop(add.start());
        let text = summary([("math.add", &*add)].into_iter(), Duration::from_secs(2));
        let read = parse(text.as_bytes()).expect("reads");
        assert_eq!(read.window, Duration::from_secs(2));
        assert!(!read.truncated);
        let line = read.methods["math.add"];
        assert_eq!(
            (line.calls, line.ok, line.app_error, line.panic),
            (100, 98, 1, 1)
        );
        assert_eq!((line.expired, line.abandoned, line.overloaded), (1, 1, 1));
        assert_eq!(line.in_flight, 1);
        assert_eq!((line.w_calls, line.w_errors), (100, 2));
        assert!(line.p50_ns <= line.p90_ns && line.p90_ns <= line.p99_ns);
        assert!(line.p99_ns <= line.max_ns);
        // The next window starts empty; the counters since start stay.
        running.finish(Status::Ok);
        let again =
            parse(summary([("math.add", &*add)].into_iter(), Duration::from_secs(2)).as_bytes())
                .expect("reads");
        let line = again.methods["math.add"];
        assert_eq!((line.calls, line.w_calls, line.in_flight), (101, 1, 0));
    }

    #[test]
    fn a_summary_is_bounded() {
        let meters: Vec<(String, Meter)> = (0..MAX_METHODS + 10)
            .map(|i| (format!("m.{i:04}"), Meter::new("m")))
            .collect();
        let text = summary(
            meters.iter().map(|(n, m)| (n.as_str(), m)),
            Duration::from_secs(1),
        );
        let read = parse(text.as_bytes()).expect("reads");
        assert!(read.truncated);
        assert_eq!(read.methods.len(), MAX_METHODS);
    }

    #[test]
    fn unreadable_summaries_and_lines_are_skipped() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b"\xff\xfe"), None);
        assert_eq!(parse(b"clouds-stats 2 window_ms=1\nm calls=1\n"), None);
        assert_eq!(parse(b"clouds-stats 1 window_ms=x\n"), None);
        let read = parse(
            b"clouds-stats 1 window_ms=5 future=3\na.b calls=2 new_field=9\nbad calls=-1\n\nc.d calls\n",
        )
        .expect("reads");
        assert_eq!(read.methods.len(), 1);
        assert_eq!(read.methods["a.b"].calls, 2);
    }
}
