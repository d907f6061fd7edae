//! Faults of a Redis Cluster under load: the primary that owns a server's call channel and a
//! caller's inbox killed (`kill -9`), the same kind of shard failed over by hand
//! (`CLUSTER FAILOVER`, which ends its sharded subscriptions without a word to fred), a call
//! channel's and an inbox's slot migrated to another primary, and the registry's shard failed
//! over, then killed.
//!
//! Each test starts its own 3+3 cluster (`clouds_testkit::RedisCluster`, every process
//! stopped on drop), runs its providers and callers in-process, and drives 4 loops of calls
//! (2 callers × 2 loops, each call with 2 retries and a 1 s timeout; heartbeat 300 ms, so the
//! registry's TTL is 900 ms) through the fault. Every call is counted: ok, each kind of error,
//! and hung (not ended within timeout × attempts plus slack; there must be none). Where a
//! subscription must heal, the test also asks the new owner of its slot how many subscribers
//! the channel has (`PUBSUB SHARDNUMSUB`) until it is back. The figures each test prints
//! (`FIGURES ...`, and `TIMELINE ...`: successes per caller in each 250 ms after the fault)
//! are in RELIABILITY.md, section "Redis Cluster".
//!
//! What lives on which shard is chosen, not left to chance: the namespace is picked for where
//! its registry slot lands, and servers and callers are started until their call channel or
//! inbox lands where the scenario needs it (a node id is random, so each start is a draw).
//!
//! The tests run one at a time (`ONE_AT_A_TIME`): a failover's timing depends on the cluster
//! bus, and four clusters failing over at once on a small machine would measure the machine.

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clouds::{Client, Config, Error, Monitor, Server};
use clouds_testkit::{NodeRole, RedisCluster, RespValue};
use common::eventually;

/// The service every provider serves.
#[clouds::service("probe")]
pub trait Probe {
    /// The name of the provider that answered.
    async fn whoami(&self) -> String;
}

/// A provider that says its name.
struct Named(String);

impl Probe for Named {
    async fn whoami(&self) -> String {
        self.0.clone()
    }
}

/// Heartbeat of every node.
const HEARTBEAT: Duration = Duration::from_millis(300);
/// The registry's TTL (3 heartbeats).
const TTL: Duration = Duration::from_millis(900);
/// Per-attempt timeout of every call, and command timeout of every node.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Retries per call: 3 attempts in all.
const RETRIES: u32 = 2;
/// The cluster's `--cluster-node-timeout` (clouds-testkit): how long before a silent primary
/// is declared failed.
const NODE_TIMEOUT: Duration = Duration::from_secs(2);
/// Slack for a loaded machine in every bound on recovery.
const SLACK: Duration = Duration::from_secs(6);
/// The callers of every scenario, X and Y.
const CALLERS: usize = 2;
/// Loops of calls per caller.
const LOOPS_PER_CALLER: usize = 2;
/// Pause between two calls of a loop, so the load leaves the cluster bus some CPU.
const PAUSE: Duration = Duration::from_millis(5);
/// How many nodes are started, at most, to get one whose channel lands on the wanted shard.
const PLACEMENT_DRAWS: usize = 60;
/// A stretch without a success longer than this (20 times a loop's pause) is an
/// interruption.
const INTERRUPTION: Duration = Duration::from_millis(100);
/// How long a step of a scenario (calls getting through, a subscription healing) may take.
const STEP_LIMIT: Duration = Duration::from_secs(20);

/// One scenario at a time (see the module doc).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The longest a call may take: every attempt timing out, the backoff pauses between them
/// (50 + 100 ms), and 1.5 s of slack. A call still running then is hung.
fn call_bound() -> Duration {
    TIMEOUT * (RETRIES + 1) + Duration::from_millis(150) + Duration::from_millis(1_500)
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// One scenario's cluster and namespace.
struct Deployment {
    cluster: RedisCluster,
    namespace: String,
    /// Each primary's port and slots when the scenario began (before any fault).
    layout: Vec<(u16, Vec<RangeInclusive<u16>>)>,
}

impl Deployment {
    /// Starts a cluster; the namespace is `{prefix}-0`.
    async fn start(prefix: &str) -> Deployment {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .expect("join")
            .expect("start a Redis Cluster (apt-get install redis-server)");
        eprintln!("{prefix}: cluster started in {}", cluster.startup());
        let layout = cluster
            .nodes()
            .expect("nodes")
            .into_iter()
            .filter(|n| n.role == NodeRole::Primary)
            .map(|n| (n.port, n.slots))
            .collect();
        Deployment {
            cluster,
            namespace: format!("{prefix}-0"),
            layout,
        }
    }

    /// The primary that owned `name`'s slot when the scenario began.
    fn shard_of(&self, name: &str) -> u16 {
        let slot = RedisCluster::slot_of(name);
        self.layout
            .iter()
            .find(|(_, slots)| slots.iter().any(|r| r.contains(&slot)))
            .map(|(port, _)| *port)
            .expect("every slot has an owner")
    }

    /// A running primary other than the one that owns `slot` now.
    fn other_primary(&self, slot: u16) -> u16 {
        let owner = self.cluster.primary_for_slot(slot).expect("owner");
        self.cluster
            .nodes()
            .expect("nodes")
            .into_iter()
            .find(|n| n.role == NodeRole::Primary && n.pid.is_some() && n.port != owner)
            .expect("another primary")
            .port
    }

    /// The replica of the primary on `port`, as the cluster says now.
    fn replica_of(&self, port: u16) -> u16 {
        self.cluster
            .nodes()
            .expect("nodes")
            .into_iter()
            .find(|n| n.role == NodeRole::Replica && n.primary_port == Some(port))
            .expect("a replica")
            .port
    }

    fn config(&self) -> Config {
        Config::from_url(&self.cluster.seed_url())
            .expect("valid url")
            .namespace(&self.namespace)
            .heartbeat(HEARTBEAT)
            .timeout(TIMEOUT)
            .command_timeout(TIMEOUT)
    }

    /// `{namespace:0}:nodes`, in the registry's slot: every registry key and the events
    /// channel share its hash tag.
    fn registry_key(&self) -> String {
        format!("{{{}:0}}:nodes", self.namespace)
    }

    fn events_channel(&self) -> String {
        format!("{{{}:0}}:events", self.namespace)
    }

    fn calls_channel(&self, server: &Server) -> String {
        format!("{}:0:calls:{}", self.namespace, server.id())
    }

    fn inbox(&self, client: &Client) -> String {
        format!("{}:0:inbox:{}", self.namespace, client.id())
    }

    /// A provider named `name` whose call channel lives on a primary that satisfies `want`.
    async fn provider(&self, name: &str, want: impl Fn(u16) -> bool) -> Provider {
        for _ in 0..PLACEMENT_DRAWS {
            let server = Server::start(self.config()).await.expect("server starts");
            let shard = self.shard_of(&self.calls_channel(&server));
            if want(shard) {
                server
                    .serve(ProbeServer::new(Named(name.to_string())))
                    .await
                    .expect("serve");
                return Provider { server, shard };
            }
            server.shutdown().await.expect("shutdown");
        }
        panic!("no provider's call channel landed on a wanted shard in {PLACEMENT_DRAWS} draws");
    }

    /// A caller whose inbox lives on a primary that satisfies `want`.
    async fn caller(&self, want: impl Fn(u16) -> bool) -> Client {
        for _ in 0..PLACEMENT_DRAWS {
            let client = Client::connect(self.config())
                .await
                .expect("client connects");
            if want(self.shard_of(&self.inbox(&client))) {
                return client;
            }
            client.close().await;
        }
        panic!("no caller's inbox landed on a wanted shard in {PLACEMENT_DRAWS} draws");
    }

    /// Runs a blocking cluster operation without holding up the runtime's other tasks.
    fn blocking<T>(&mut self, op: impl FnOnce(&mut RedisCluster) -> T) -> T {
        tokio::task::block_in_place(|| op(&mut self.cluster))
    }

    /// `PUBSUB SHARDNUMSUB channel` on the node on `port` (0 if it does not answer).
    fn subscribers(&self, port: u16, channel: &str) -> i64 {
        let reply = tokio::task::block_in_place(|| {
            self.cluster
                .command_on(port, &["PUBSUB", "SHARDNUMSUB", channel])
        });
        match reply {
            Ok(RespValue::Array(Some(items))) => {
                items.get(1).and_then(RespValue::as_int).unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// Waits until `channel` has at least `n` subscribers on the node on `port`; returns the
    /// time since `since`.
    async fn resubscribed(
        &self,
        port: u16,
        channel: &str,
        n: i64,
        since: Instant,
        what: &str,
    ) -> Duration {
        eventually(what, STEP_LIMIT, || async {
            self.subscribers(port, channel) >= n
        })
        .await;
        since.elapsed()
    }

    /// Waits until the node on `port` says it is a primary (`ROLE`); returns the time since
    /// `since`.
    async fn promoted(&self, port: u16, since: Instant) -> Duration {
        eventually(
            "the replica takes over",
            Duration::from_secs(30),
            || async {
                let role = tokio::task::block_in_place(|| self.cluster.command_on(port, &["ROLE"]));
                matches!(role, Ok(RespValue::Array(Some(items)))
                if items.first().and_then(RespValue::as_text).as_deref() == Some("master"))
            },
        )
        .await;
        since.elapsed()
    }
}

struct Provider {
    server: Server,
    /// The primary that owned its call channel's slot when it started.
    shard: u16,
}

/// How one call ended.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Answered, by the provider named.
    Ok(String),
    Timeout,
    NoProvider,
    Overloaded,
    Unreachable,
    Redis(String),
    Other(String),
    /// Not ended within [`call_bound`].
    Hung,
}

impl Outcome {
    fn of(result: Result<Result<String, Error>, tokio::time::error::Elapsed>) -> Outcome {
        match result {
            Ok(Ok(name)) => Outcome::Ok(name),
            Ok(Err(Error::Timeout { .. })) => Outcome::Timeout,
            Ok(Err(Error::NoProvider { .. })) => Outcome::NoProvider,
            Ok(Err(Error::Overloaded { .. })) => Outcome::Overloaded,
            Ok(Err(Error::Unreachable { .. })) => Outcome::Unreachable,
            Ok(Err(Error::Redis(e))) => Outcome::Redis(e.to_string()),
            Ok(Err(e)) => Outcome::Other(e.to_string()),
            Err(_) => Outcome::Hung,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Outcome::Ok(_) => "ok",
            Outcome::Timeout => "timeout",
            Outcome::NoProvider => "no_provider",
            Outcome::Overloaded => "overloaded",
            Outcome::Unreachable => "unreachable",
            Outcome::Redis(_) => "redis",
            Outcome::Other(_) => "other",
            Outcome::Hung => "hung",
        }
    }

    fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }

    fn answered_by(&self, provider: &str) -> bool {
        matches!(self, Outcome::Ok(name) if name == provider)
    }
}

/// One call: which caller made it, when, and how it ended.
#[derive(Debug, Clone)]
struct Record {
    caller: usize,
    started: Instant,
    ended: Instant,
    outcome: Outcome,
}

/// Loops of calls, `LOOPS_PER_CALLER` per caller, recording every call, until
/// [`Load::finish`].
struct Load {
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(callers: [&Client; CALLERS]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let mut loops = Vec::new();
        for (caller, client) in callers.into_iter().enumerate() {
            for _ in 0..LOOPS_PER_CALLER {
                let stub = ProbeClient::new(client).with_retries(RETRIES);
                let (stop, records) = (stop.clone(), records.clone());
                loops.push(tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        let result = tokio::time::timeout(call_bound(), stub.whoami()).await;
                        let record = Record {
                            caller,
                            started,
                            ended: Instant::now(),
                            outcome: Outcome::of(result),
                        };
                        records.lock().expect("records").push(record);
                        tokio::time::sleep(PAUSE).await;
                    }
                }));
            }
        }
        Load {
            stop,
            records,
            loops,
        }
    }

    /// Waits until every caller has had `n` successes that started after `since`, and every
    /// provider named in `answered` has answered one of them.
    async fn progress(&self, n: usize, since: Instant, answered: &[&str], what: &str) {
        eventually(what, STEP_LIMIT, || {
            let records = self.records.lock().expect("records");
            let after = || records.iter().filter(|r| r.started > since);
            let holds = (0..CALLERS).all(|c| {
                after()
                    .filter(|r| r.caller == c && r.outcome.is_ok())
                    .count()
                    >= n
            }) && answered
                .iter()
                .all(|p| after().any(|r| r.outcome.answered_by(p)));
            async move { holds }
        })
        .await;
    }

    /// Stops the loops and returns every call they made.
    async fn finish(self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        for handle in self.loops {
            handle.await.expect("load loop");
        }
        self.records.lock().expect("records").clone()
    }
}

/// The calls that ended after `from` and, if given, by `to`.
fn window(records: &[Record], from: Instant, to: Option<Instant>) -> Vec<Record> {
    records
        .iter()
        .filter(|r| r.ended > from && to.is_none_or(|to| r.ended <= to))
        .cloned()
        .collect()
}

/// What a scenario's calls came to, measured from a fault at `fault`.
#[derive(Debug)]
struct Figures {
    /// Calls by outcome (`ok`, `timeout`, `no_provider`, `redis`, ..., `hung`).
    counts: BTreeMap<&'static str, usize>,
    slowest: Duration,
    /// Per caller: the longest stretch without a success, from the fault on.
    outage: Vec<Duration>,
    /// Per caller: from the fault to the success that ended that stretch, if it was longer
    /// than [`INTERRUPTION`] (0 otherwise: the caller was never held up).
    back: Vec<Duration>,
    /// Per caller: from the fault to the end of its last failed call (`None`: none failed).
    last_failure: Vec<Option<Duration>>,
    /// Per caller: how long it found no provider, from the start of its first call that
    /// failed with `NoProvider` to the end of its last (`None`: it never lacked one).
    no_provider: Vec<Option<Duration>>,
    /// Distinct messages of unexpected errors (a few).
    errors: Vec<String>,
}

impl Figures {
    fn of(records: &[Record], fault: Instant) -> Figures {
        let mut counts = BTreeMap::new();
        let mut errors = Vec::new();
        let mut slowest = Duration::ZERO;
        for r in records {
            *counts.entry(r.outcome.kind()).or_insert(0) += 1;
            if let Outcome::Redis(e) | Outcome::Other(e) = &r.outcome
                && errors.len() < 5
                && !errors.contains(e)
            {
                errors.push(e.clone());
            }
            slowest = slowest.max(r.ended - r.started);
        }
        let mut figures = Figures {
            counts,
            slowest,
            outage: Vec::new(),
            back: Vec::new(),
            last_failure: Vec::new(),
            no_provider: Vec::new(),
            errors,
        };
        for c in 0..CALLERS {
            let mine = || {
                records
                    .iter()
                    .filter(move |r| r.caller == c && r.ended > fault)
            };
            let mut oks: Vec<Instant> = mine()
                .filter(|r| r.outcome.is_ok())
                .map(|r| r.ended)
                .collect();
            oks.sort();
            let (mut outage, mut back, mut previous) = (Duration::ZERO, Duration::ZERO, fault);
            for ok in oks {
                if ok - previous > outage {
                    outage = ok - previous;
                    back = ok - fault;
                }
                previous = ok;
            }
            figures.outage.push(outage);
            figures.back.push(if outage > INTERRUPTION {
                back
            } else {
                Duration::ZERO
            });
            figures.last_failure.push(
                mine()
                    .filter(|r| !r.outcome.is_ok())
                    .map(|r| r.ended - fault)
                    .max(),
            );
            let lacking = || mine().filter(|r| r.outcome == Outcome::NoProvider);
            let first = lacking().map(|r| r.started).min();
            let last = lacking().map(|r| r.ended).max();
            figures
                .no_provider
                .push(first.zip(last).map(|(first, last)| last - first));
        }
        figures
    }

    fn count(&self, kind: &str) -> usize {
        self.counts.get(kind).copied().unwrap_or(0)
    }

    fn failed(&self) -> usize {
        self.counts.values().sum::<usize>() - self.count("ok")
    }

    /// From the fault until every caller got through again.
    fn all_back(&self) -> Duration {
        self.back.iter().max().copied().unwrap_or_default()
    }

    /// The checks every scenario makes: no call hung, and no error outside the typed ones
    /// a fault may cause.
    fn assert_bounded(&self, scenario: &str) {
        assert_eq!(self.count("hung"), 0, "{scenario}: calls hung: {self}");
        assert!(
            self.slowest < call_bound(),
            "{scenario}: a call took {:?}: {self}",
            self.slowest
        );
        assert_eq!(
            self.count("other"),
            0,
            "{scenario}: unexpected errors: {self}"
        );
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |ds: &[Duration]| ds.iter().map(|d| ms(*d)).collect::<Vec<_>>();
        let opts = |ds: &[Option<Duration>]| ds.iter().map(|d| d.map(ms)).collect::<Vec<_>>();
        write!(
            f,
            "calls={} ok={} failed={} hung={} by_kind={:?} slowest_ms={} outage_ms={:?} \
             back_ms={:?} last_failure_ms={:?} no_provider_span_ms={:?} errors={:?}",
            self.counts.values().sum::<usize>(),
            self.count("ok"),
            self.failed(),
            self.count("hung"),
            self.counts,
            ms(self.slowest),
            list(&self.outage),
            list(&self.back),
            opts(&self.last_failure),
            opts(&self.no_provider),
            self.errors
        )
    }
}

/// Successes per caller in each 250 ms from `fault` on: where the load stalled, and when it
/// came back.
fn timeline(records: &[Record], fault: Instant) -> String {
    const BUCKET_MS: u128 = 250;
    let end = records.iter().map(|r| r.ended).max().unwrap_or(fault);
    let buckets = (end.saturating_duration_since(fault).as_millis() / BUCKET_MS) as usize + 1;
    (0..CALLERS)
        .map(|c| {
            let mut counts = vec![0usize; buckets];
            for r in records
                .iter()
                .filter(|r| r.caller == c && r.ended > fault && r.outcome.is_ok())
            {
                counts[((r.ended - fault).as_millis() / BUCKET_MS) as usize] += 1;
            }
            let counts: Vec<String> = counts.iter().map(usize::to_string).collect();
            format!("caller {c}: {}", counts.join(" "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// From `since` to the end of the first call `provider` answered that started after it.
fn first_answer(records: &[Record], provider: &str, since: Instant) -> Option<Duration> {
    records
        .iter()
        .filter(|r| r.started > since && r.outcome.answered_by(provider))
        .map(|r| r.ended - since)
        .min()
}

/// Scenario 1: `kill -9` of the primary that owns provider A's call channel and caller X's
/// inbox, while provider B's channel and caller Y's inbox live elsewhere. Calls end within
/// their bound, A's and X's subscriptions come back on the promoted replica, and both callers
/// get through again, A included, soon after the cluster has failed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_of_the_primary_of_a_call_channel_and_an_inbox() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let scenario = "cluster_kill_call_channel_primary";
    let mut d = Deployment::start("kill").await;
    let registry = d.shard_of(&d.registry_key());
    let a = d.provider("a", |shard| shard != registry).await;
    let victim = a.shard;
    let b = d.provider("b", |shard| shard != victim).await;
    let x = d.caller(|shard| shard == victim).await;
    let y = d.caller(|shard| shard != victim).await;
    let replica = d.replica_of(victim);
    let load = Load::start([&x, &y]);
    load.progress(
        50,
        Instant::now(),
        &["a", "b"],
        "calls go through before the kill",
    )
    .await;

    let fault = Instant::now();
    d.blocking(|c| c.kill_node(victim)).expect("kill -9");
    let promoted = d.promoted(replica, fault).await;
    let a_channel = d.calls_channel(&a.server);
    let a_resubscribed = d
        .resubscribed(
            replica,
            &a_channel,
            1,
            fault,
            "A subscribes on the promoted replica",
        )
        .await;
    let x_resubscribed = d
        .resubscribed(
            replica,
            &d.inbox(&x),
            1,
            fault,
            "X subscribes on the promoted replica",
        )
        .await;
    load.progress(
        20,
        fault + promoted,
        &["a", "b"],
        "both callers get through, and A answers again, after the failover",
    )
    .await;
    let records = load.finish().await;
    let figures = Figures::of(&records, fault);
    let a_back = first_answer(&records, "a", fault);
    eprintln!(
        "FIGURES {scenario}: promoted_ms={} a_resubscribed_ms={} x_resubscribed_ms={} \
         a_answers_again_ms={:?} all_back_ms={} {figures}",
        ms(promoted),
        ms(a_resubscribed),
        ms(x_resubscribed),
        a_back.map(ms),
        ms(figures.all_back()),
    );
    eprintln!("TIMELINE {scenario}: {}", timeline(&records, fault));
    figures.assert_bounded(scenario);
    assert!(
        figures.all_back() < NODE_TIMEOUT + Duration::from_secs(2) + SLACK,
        "{scenario}: a caller got through again only {:?} after the kill: {figures}",
        figures.all_back()
    );
    for provider in [a, b] {
        provider.server.shutdown().await.expect("shutdown");
    }
}

/// Scenario 2: `CLUSTER FAILOVER` on the replica of the shard that owns the call channel of
/// the only provider, A, and caller X's inbox. The demoted primary ends their sharded
/// subscriptions with a `sunsubscribe` that fred drops: A and X only hear again once their
/// heartbeat has found 0 subscribers on the new primary and subscribed there. With A the only
/// provider, calls that succeed afterwards prove the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failover_of_the_shard_of_the_only_provider() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let scenario = "cluster_manual_failover_call_channel_shard";
    let mut d = Deployment::start("failover").await;
    let registry = d.shard_of(&d.registry_key());
    let a = d.provider("a", |shard| shard != registry).await;
    let shard = a.shard;
    let x = d.caller(|s| s == shard).await;
    let y = d.caller(|s| s != shard).await;
    let replica = d.replica_of(shard);
    let load = Load::start([&x, &y]);
    load.progress(
        50,
        Instant::now(),
        &["a"],
        "calls go through before the failover",
    )
    .await;

    let fault = Instant::now();
    d.blocking(|c| c.failover(replica))
        .expect("manual failover");
    let done = fault.elapsed();
    let a_channel = d.calls_channel(&a.server);
    let a_resubscribed = d
        .resubscribed(
            replica,
            &a_channel,
            1,
            fault,
            "A subscribes on the new primary",
        )
        .await;
    let x_resubscribed = d
        .resubscribed(
            replica,
            &d.inbox(&x),
            1,
            fault,
            "X subscribes on the new primary",
        )
        .await;
    load.progress(
        20,
        fault + done,
        &["a"],
        "both callers reach A again after the failover",
    )
    .await;
    // A caller that starts now knows only the new slot map: it reaches A too (A's
    // subscription is on the new primary, not left on the demoted one).
    let z = d.caller(|_| true).await;
    let fresh = ProbeClient::new(&z).with_retries(RETRIES);
    let mut fresh_calls = BTreeMap::new();
    for _ in 0..20 {
        let outcome = Outcome::of(tokio::time::timeout(call_bound(), fresh.whoami()).await);
        *fresh_calls.entry(outcome.kind()).or_insert(0) += 1;
    }
    let records = load.finish().await;
    let figures = Figures::of(&records, fault);
    let a_back = first_answer(&records, "a", fault + done);
    eprintln!(
        "FIGURES {scenario}: failover_took_ms={} a_resubscribed_ms={} x_resubscribed_ms={} \
         a_answers_after_failover_ms={:?} all_back_ms={} new_caller={fresh_calls:?} {figures}",
        ms(done),
        ms(a_resubscribed),
        ms(x_resubscribed),
        a_back.map(ms),
        ms(figures.all_back()),
    );
    eprintln!("TIMELINE {scenario}: {}", timeline(&records, fault));
    figures.assert_bounded(scenario);
    // Healed within a heartbeat or two of the failover (plus slack).
    let healed = done + HEARTBEAT * 2 + SLACK / 2;
    assert!(
        a_resubscribed < healed && x_resubscribed < healed,
        "{scenario}: subscriptions back only after {a_resubscribed:?} (A), \
         {x_resubscribed:?} (X); the failover took {done:?}"
    );
    assert!(
        figures.all_back() < healed,
        "{scenario}: a caller got through again only {:?} after the failover began \
         (it took {done:?}): {figures}",
        figures.all_back()
    );
    assert_eq!(
        fresh_calls.get("ok"),
        Some(&20),
        "{scenario}: a caller started after the failover: {fresh_calls:?}"
    );
    a.server.shutdown().await.expect("shutdown");
}

/// Scenario 3: the slot of provider A's call channel is migrated to another primary, then the
/// slot of caller X's inbox. The old owner ends the subscriptions there (a `sunsubscribe`
/// fred drops); A, then X, must notice and subscribe again on the new owner. Provider B
/// carries the calls while A is away, and X's retries cover its lost replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_of_a_call_channel_slot_then_an_inbox_slot() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let scenario = "cluster_migrate_slots";
    let d = Deployment::start("migrate").await;
    let a = d.provider("a", |_| true).await;
    let b = d.provider("b", |shard| shard != a.shard).await;
    let x = d.caller(|_| true).await;
    let y = d.caller(|_| true).await;
    let load = Load::start([&x, &y]);
    load.progress(
        50,
        Instant::now(),
        &["a", "b"],
        "calls go through before the migrations",
    )
    .await;

    // A's call channel.
    let a_channel = d.calls_channel(&a.server);
    let slot = RedisCluster::slot_of(&a_channel);
    let to = d.other_primary(slot);
    let fault_a = Instant::now();
    tokio::task::block_in_place(|| d.cluster.migrate_slot(slot, to)).expect("migrate");
    let migrated_a = fault_a.elapsed();
    let a_resubscribed = d
        .resubscribed(
            to,
            &a_channel,
            1,
            fault_a,
            "A subscribes on the slot's new owner",
        )
        .await;
    load.progress(
        20,
        fault_a + migrated_a,
        &["a", "b"],
        "A answers again after its call channel's slot moved",
    )
    .await;

    // X's inbox.
    let x_inbox = d.inbox(&x);
    let slot = RedisCluster::slot_of(&x_inbox);
    let to = d.other_primary(slot);
    let fault_x = Instant::now();
    tokio::task::block_in_place(|| d.cluster.migrate_slot(slot, to)).expect("migrate");
    let migrated_x = fault_x.elapsed();
    let x_resubscribed = d
        .resubscribed(
            to,
            &x_inbox,
            1,
            fault_x,
            "X subscribes on the slot's new owner",
        )
        .await;
    load.progress(
        20,
        fault_x + migrated_x,
        &["a", "b"],
        "X gets replies again after its inbox's slot moved",
    )
    .await;
    let records = load.finish().await;

    let channel_moved = window(&records, fault_a, Some(fault_x));
    let calls = Figures::of(&channel_moved, fault_a);
    let a_back = first_answer(&records, "a", fault_a + migrated_a);
    eprintln!(
        "FIGURES {scenario} call_channel: migration_took_ms={} a_resubscribed_ms={} \
         a_answers_after_migration_ms={:?} {calls}",
        ms(migrated_a),
        ms(a_resubscribed),
        a_back.map(ms),
    );
    let inbox = Figures::of(&window(&records, fault_x, None), fault_x);
    eprintln!(
        "FIGURES {scenario} inbox: migration_took_ms={} x_resubscribed_ms={} {inbox}",
        ms(migrated_x),
        ms(x_resubscribed),
    );
    eprintln!(
        "TIMELINE {scenario} call_channel: {}",
        timeline(&channel_moved, fault_a)
    );
    eprintln!("TIMELINE {scenario} inbox: {}", timeline(&records, fault_x));
    Figures::of(&records, fault_a).assert_bounded(scenario);
    // B carried the calls while A's channel moved (a call that finds nobody on A's channel
    // is re-routed at no cost), so none failed there.
    assert_eq!(
        calls.failed(),
        0,
        "{scenario}: calls failed while A's channel moved: {calls}"
    );
    let healed = HEARTBEAT * 2 + SLACK / 2;
    assert!(
        a_resubscribed < migrated_a + healed && x_resubscribed < migrated_x + healed,
        "{scenario}: subscriptions back only after {a_resubscribed:?} (A), \
         {x_resubscribed:?} (X)"
    );
    // X's replies are lost until its heartbeat heals its inbox; its retries cover that.
    assert_eq!(
        inbox.failed(),
        0,
        "{scenario}: calls failed while X's inbox moved: {inbox}"
    );
    for provider in [a, b] {
        provider.server.shutdown().await.expect("shutdown");
    }
}

/// Scenario 4: the registry's shard (the slot of `{namespace:0}`, which also holds the events
/// channel) fails over by hand, then its new primary is killed and the old one takes over
/// again. Providers, their call channels and the callers' inboxes all live elsewhere.
/// Heartbeats fail while the shard is down; callers keep their cached providers meanwhile, the
/// providers register again once it is back (their entries have expired by then), and no
/// caller goes without providers for longer than a TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_then_kill_of_the_registry_shard() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let scenario = "cluster_registry_shard";
    let mut d = Deployment::start("registry").await;
    let registry = d.shard_of(&d.registry_key());
    let a = d.provider("a", |shard| shard != registry).await;
    let b = d.provider("b", |shard| shard != registry).await;
    let x = d.caller(|shard| shard != registry).await;
    let y = d.caller(|shard| shard != registry).await;
    let monitor = Monitor::connect(d.config()).await.expect("monitor");
    // Every node subscribes to the events channel: A, B, X, Y and the monitor.
    let nodes = 5;
    let events = d.events_channel();
    let ids = [a.server.id().clone(), b.server.id().clone()];
    let both_listed = || async {
        matches!(monitor.snapshot().await,
            Ok(s) if ids.iter().all(|id| s.servers.contains_key(id)))
    };
    let load = Load::start([&x, &y]);
    load.progress(
        50,
        Instant::now(),
        &["a", "b"],
        "calls go through before the failover",
    )
    .await;

    // Manual failover: the registry's data moves intact, while the events channel's
    // subscriptions end silently.
    let replica = d.replica_of(registry);
    let fault_failover = Instant::now();
    d.blocking(|c| c.failover(replica))
        .expect("manual failover");
    let failover_took = fault_failover.elapsed();
    eventually(
        "both providers listed after the failover",
        STEP_LIMIT,
        both_listed,
    )
    .await;
    let listed_failover = fault_failover.elapsed();
    let events_back_failover = d
        .resubscribed(
            replica,
            &events,
            nodes,
            fault_failover,
            "every node hears events again",
        )
        .await;
    load.progress(
        20,
        fault_failover + failover_took,
        &["a", "b"],
        "calls go through after the failover",
    )
    .await;

    // Kill the new primary: the old one, now its replica, takes over after the node timeout.
    let fault_kill = Instant::now();
    d.blocking(|c| c.kill_node(replica)).expect("kill -9");
    let promoted = d.promoted(registry, fault_kill).await;
    eventually(
        "both providers listed after the kill",
        STEP_LIMIT,
        both_listed,
    )
    .await;
    let listed_kill = fault_kill.elapsed();
    let events_back_kill = d
        .resubscribed(
            registry,
            &events,
            nodes,
            fault_kill,
            "every node hears events again",
        )
        .await;
    load.progress(
        20,
        fault_kill + listed_kill,
        &["a", "b"],
        "calls go through after the kill",
    )
    .await;
    let records = load.finish().await;

    let across_failover = window(&records, fault_failover, Some(fault_kill));
    let failover = Figures::of(&across_failover, fault_failover);
    eprintln!(
        "FIGURES {scenario} failover: failover_took_ms={} providers_listed_ms={} \
         events_resubscribed_ms={} {failover}",
        ms(failover_took),
        ms(listed_failover),
        ms(events_back_failover),
    );
    let kill = Figures::of(&window(&records, fault_kill, None), fault_kill);
    eprintln!(
        "FIGURES {scenario} kill: promoted_ms={} providers_listed_ms={} \
         events_resubscribed_ms={} all_back_ms={} {kill}",
        ms(promoted),
        ms(listed_kill),
        ms(events_back_kill),
        ms(kill.all_back()),
    );
    eprintln!(
        "TIMELINE {scenario} failover: {}",
        timeline(&across_failover, fault_failover)
    );
    eprintln!(
        "TIMELINE {scenario} kill: {}",
        timeline(&records, fault_kill)
    );
    Figures::of(&records, fault_failover).assert_bounded(scenario);
    assert_eq!(
        failover.failed(),
        0,
        "{scenario}: calls failed across a manual failover of the registry: {failover}"
    );
    for (caller, span) in kill.no_provider.iter().enumerate() {
        assert!(
            span.is_none_or(|span| span < TTL + SLACK / 2),
            "{scenario}: caller {caller} found no provider for {span:?}: {kill}"
        );
    }
    assert!(
        kill.all_back() < NODE_TIMEOUT + Duration::from_secs(2) + SLACK,
        "{scenario}: a caller got through again only {:?} after the kill: {kill}",
        kill.all_back()
    );
    for provider in [a, b] {
        provider.server.shutdown().await.expect("shutdown");
    }
}
