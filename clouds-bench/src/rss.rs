//! Client memory per call in flight, measured in a child process of its own so that nothing
//! the other rows allocated pollutes the peak.
//!
//! The child connects a client (raw or clouds), warms it up, reads `VmRSS`, starts N calls that
//! the providers hold, waits until all N are waiting for their reply, reads `VmRSS` again,
//! releases them, waits for every reply and finally reads the high-water mark `VmHWM`.
//!
//! Two ways to start the N calls:
//!
//! - **burst**: all at once. Every call's `PUBLISH` is then in flight on the command connection
//!   at the same time, so the peak includes N of fred's command states (~5 KB each) besides
//!   the calls themselves.
//! - **ramped**: [`RAMP_BATCH`] at a time, [`RAMP_GAP`] apart, so each batch's `PUBLISH`es are
//!   answered (and their memory reused) before the next: the peak is what N calls cost while
//!   they wait for their replies.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clouds::Client;
use tokio::task::JoinSet;

use crate::clouds_rows::{self, CloudsCaller, Payload};
use crate::load::{self, Caller};
use crate::procs::Proc;
use crate::raw::{Channels, RawClient};

/// Longest wait for all calls to be in flight, and for all of them to come back.
const PHASE_LIMIT: Duration = Duration::from_secs(60);
/// How long the parent waits for a child's result: longer than the sum of the child's own
/// bounds (the warm-up, the first held call, reaching N, the release round trips and the
/// replies, each bounded by [`PHASE_LIMIT`]), so that a slow child reports its own errors
/// instead of ending the bench.
const CHILD_LIMIT: Duration = Duration::from_secs(8 * PHASE_LIMIT.as_secs());
/// Calls started together in the ramped mode.
pub(crate) const RAMP_BATCH: usize = 500;
/// Pause between two batches in the ramped mode.
pub(crate) const RAMP_GAP: Duration = Duration::from_millis(10);

/// How the calls are started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Start {
    /// All at once.
    Burst,
    /// [`RAMP_BATCH`] at a time, [`RAMP_GAP`] apart.
    Ramped,
}

impl Start {
    pub(crate) fn as_arg(self) -> &'static str {
        match self {
            Start::Burst => "burst",
            Start::Ramped => "ramped",
        }
    }

    pub(crate) fn from_arg(arg: &str) -> Result<Start, String> {
        match arg {
            "burst" => Ok(Start::Burst),
            "ramped" => Ok(Start::Ramped),
            other => Err(format!("unknown start mode {other:?} (burst or ramped)")),
        }
    }
}

/// What one child measured, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    /// Calls actually in flight when `full_kb` was read.
    pub(crate) reached: usize,
    /// VmRSS after warm-up, before the calls.
    pub(crate) base_kb: u64,
    /// VmRSS with every call in flight.
    pub(crate) full_kb: u64,
    /// VmHWM at the end: the peak, including the burst of replies.
    pub(crate) hwm_kb: u64,
    /// Calls that failed.
    pub(crate) errors: usize,
    /// Size of one call's future as the caller holds it, in bytes.
    pub(crate) future_bytes: usize,
}

impl Sample {
    /// Peak memory above the baseline per call in flight, in bytes.
    pub(crate) fn bytes_per_call(&self) -> f64 {
        let peak = self.hwm_kb.max(self.full_kb);
        (peak.saturating_sub(self.base_kb) * 1024) as f64 / self.reached.max(1) as f64
    }
}

/// Reads a `kB` field (`VmRSS`, `VmHWM`) of /proc/self/status; 0 where there is none.
fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The measurement itself, for either kind of client.
async fn measure<C, H, F, W, R>(
    caller: &C,
    in_flight: usize,
    start: Start,
    (warm_hold, hold): (W, H),
    waiting: impl Fn() -> usize,
    release: R,
) -> Result<Sample, String>
where
    C: Caller,
    H: Fn() -> F,
    F: Future<Output = Result<(), String>> + Send + 'static,
    W: Future<Output = Result<(), String>>,
    R: Future<Output = Result<(), String>>,
{
    let payload = Arc::new(vec![7u8; 100]);
    let warm = load::run(caller, &payload, 2_000, 64, PHASE_LIMIT).await;
    if warm.errors > 0 {
        return Err(format!("warm-up failed: {:?}", warm.first_error));
    }
    // One call of the holding method, released at once, so its providers are cached before
    // the measured calls start.
    warm_hold.await?;
    let base_kb = status_kb("VmRSS");
    let mut calls = JoinSet::new();
    for i in 0..in_flight {
        if start == Start::Ramped && i > 0 && i % RAMP_BATCH == 0 {
            tokio::time::sleep(RAMP_GAP).await;
        }
        calls.spawn(hold());
    }
    let deadline = Instant::now() + PHASE_LIMIT;
    while waiting() < in_flight && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reached = waiting();
    let full_kb = status_kb("VmRSS");
    release.await?;
    let mut errors = 0;
    while let Some(done) = calls.join_next().await {
        if !matches!(done, Ok(Ok(()))) {
            errors += 1;
        }
    }
    Ok(Sample {
        reached,
        base_kb,
        full_kb,
        hwm_kb: status_kb("VmHWM"),
        errors,
        future_bytes: 0,
    })
}

/// The `--rss clouds MODE URL NAMESPACE ROUND IN_FLIGHT PROVIDER_ID...` child role.
pub(crate) async fn clouds_child(
    url: &str,
    namespace: &str,
    round: u32,
    in_flight: usize,
    start: Start,
    providers: &[String],
) -> Result<Sample, String> {
    let config = clouds_rows::config(url, namespace, PHASE_LIMIT)?;
    let client = Client::connect(config).await.map_err(|e| e.to_string())?;
    let caller = CloudsCaller::new(&client);
    let stub = caller.stub.clone();
    let hold_round = |round: u32| {
        let stub = stub.clone();
        async move {
            let payload = Payload(vec![7u8; 100]);
            stub.hold(round, payload)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    };
    let hold = || hold_round(round);
    let release = async {
        for id in providers {
            client.send(id, &round).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    let mut sample = measure(
        &caller,
        in_flight,
        start,
        (hold_round(0), hold),
        || client.stats().pending_calls,
        release,
    )
    .await?;
    sample.future_bytes = std::mem::size_of_val(&stub.hold(round, Payload(Vec::new())));
    client.close().await;
    Ok(sample)
}

/// The `--rss raw MODE URL PREFIX SERVERS ROUND IN_FLIGHT` child role.
pub(crate) async fn raw_child(
    url: &str,
    channels: &Channels,
    round: u32,
    in_flight: usize,
    start: Start,
) -> Result<Sample, String> {
    let client = RawClient::connect(url, channels, PHASE_LIMIT).await?;
    let hold_round = |round: u32| {
        let client = client.clone();
        async move { client.hold(round, &[7u8; 100]).await }
    };
    let hold = || hold_round(round);
    let mut sample = measure(
        &client,
        in_flight,
        start,
        (hold_round(0), hold),
        || client.waiting(),
        client.release(round),
    )
    .await?;
    sample.future_bytes = std::mem::size_of_val(&client.hold(round, &[]));
    client.close().await;
    Ok(sample)
}

/// Prints a sample as the child's result line.
pub(crate) fn report(sample: &Sample) {
    println!(
        "rss reached={} base_kb={} full_kb={} hwm_kb={} errors={} future_bytes={}",
        sample.reached,
        sample.base_kb,
        sample.full_kb,
        sample.hwm_kb,
        sample.errors,
        sample.future_bytes
    );
}

/// Runs a child with `args` and reads its result line.
pub(crate) async fn in_child(args: &[String]) -> Result<Sample, String> {
    let mut child = Proc::spawn(args)?;
    let line = child.expect_within("rss ", CHILD_LIMIT).await;
    child.stop().await;
    let line = line?;
    let mut sample = Sample::default();
    for pair in line.split_whitespace() {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = || value.parse::<u64>().unwrap_or(0);
        match key {
            "reached" => sample.reached = number() as usize,
            "base_kb" => sample.base_kb = number(),
            "full_kb" => sample.full_kb = number(),
            "hwm_kb" => sample.hwm_kb = number(),
            "errors" => sample.errors = number() as usize,
            "future_bytes" => sample.future_bytes = number() as usize,
            _ => {}
        }
    }
    Ok(sample)
}
