//! Fault injection with real processes and a real redis-server: providers killed, restarted
//! in turn, Redis restarted. Every call must end (Ok or a typed error) within its bound; the
//! figures each scenario prints are recorded in RELIABILITY.md.
//!
//! Provider processes are the `fault_provider` example (`examples/fault_provider/`, built by
//! `cargo test`), run by the testkit's child-process harness: each says `READY <id>` once it
//! serves, stops gracefully on SIGTERM, dies on SIGKILL, and is killed and reaped if a test
//! panics. The service definition is shared with the example.

mod common;
#[path = "../examples/fault_provider/service.rs"]
mod service;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clouds::{Client, Error, Monitor, Server};
use clouds_testkit::{ChildProcess, SpawnOptions};
use common::{RedisServer, eventually, example, redis, status};
use service::{FaultClient, HEARTBEAT, TIMEOUT, fault_config};

const RETRIES: u32 = 3;
/// How long a provider process may take to start serving, or to stop after SIGTERM.
const PROVIDER_LIMIT: Duration = Duration::from_secs(20);

/// A provider process (the `fault_provider` example), killed and reaped on drop.
struct ProviderProcess {
    child: ChildProcess,
    id: String,
}

impl ProviderProcess {
    /// Starts a provider and waits until it serves.
    fn start(url: &str) -> ProviderProcess {
        // Its stdin is a pipe it watches: should this test process die without unwinding,
        // the pipe closes and the provider stops by itself.
        let options = SpawnOptions {
            stdin_pipe: true,
            ..SpawnOptions::default()
        };
        let mut child = ChildProcess::spawn_with(
            example("fault_provider")
                .arg("--until-stdin-closes")
                .env("REDIS_URL", url),
            options,
        )
        .expect("spawn fault_provider");
        let ready = child
            .wait_for_line("READY ", PROVIDER_LIMIT)
            .expect("the provider starts serving");
        let id = ready
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("no node id in {ready:?}"))
            .to_string();
        ProviderProcess { child, id }
    }

    /// SIGTERM: graceful shutdown; waits for the process to exit, and checks it did cleanly.
    fn stop(mut self) {
        let status = self
            .child
            .terminate(PROVIDER_LIMIT)
            .expect("the provider stops on SIGTERM");
        assert!(
            status.success(),
            "provider {} ended with {status}:\n{}",
            self.id,
            self.child.stdout()
        );
        self.child
            .wait_for_line("STOPPED ", PROVIDER_LIMIT)
            .expect("the provider shut down gracefully");
    }

    /// SIGKILL: the process dies without a word.
    fn kill(mut self) {
        self.child.kill().expect("kill -9 the provider");
    }
}

/// A provider whose parent goes away stops by itself: the end of its stdin starts the same
/// graceful shutdown as SIGTERM, so even a test killed without unwinding leaves none behind.
#[test]
fn a_provider_stops_when_its_stdin_closes() {
    let redis = redis();
    let mut provider = ProviderProcess::start(&redis.url_db(3));
    provider.child.close_stdin();
    let status = provider
        .child
        .wait(PROVIDER_LIMIT)
        .expect("the provider exits once its stdin closes");
    assert!(status.success(), "{status}\n{}", provider.child.stdout());
    provider
        .child
        .wait_for_line(&format!("STOPPED {}", provider.id), PROVIDER_LIMIT)
        .expect("a graceful shutdown");
    assert_eq!(registry_keys(&redis), 0, "it deregistered");
}

/// What a load loop saw.
#[derive(Default)]
struct Load {
    ok: u64,
    failed: Vec<String>,
    slowest: Duration,
}

/// Loops of calls driven against the providers until [`Driver::finish`].
struct Driver {
    stop: Arc<AtomicBool>,
    /// Calls that succeeded so far, all loops together.
    ok: Arc<AtomicU64>,
    loads: Vec<tokio::task::JoinHandle<Load>>,
}

impl Driver {
    /// Starts `workers` loops of `nap(2)` with retries; each call's duration is kept, to be
    /// checked against the bound `TIMEOUT × attempts` (plus scheduling slack).
    fn start(client: &Client, workers: usize) -> Driver {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let loads = (0..workers)
            .map(|_| {
                let stub = FaultClient::new(client).with_retries(RETRIES);
                let (stop, ok) = (stop.clone(), ok.clone());
                tokio::spawn(async move {
                    let mut load = Load::default();
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        match stub.nap(2).await {
                            Ok(_) => {
                                load.ok += 1;
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => load.failed.push(e.to_string()),
                        }
                        load.slowest = load.slowest.max(started.elapsed());
                    }
                    load
                })
            })
            .collect();
        Driver { stop, ok, loads }
    }

    /// Waits until `calls` more calls have succeeded: the load runs, and gets through.
    async fn progress(&self, calls: u64, what: &str) {
        let target = self.ok.load(Ordering::SeqCst) + calls;
        eventually(what, Duration::from_secs(20), || async {
            self.ok.load(Ordering::SeqCst) >= target
        })
        .await;
    }

    /// Stops the loops and adds up what they saw.
    async fn finish(self) -> Load {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = Load::default();
        for load in self.loads {
            let load = load.await.expect("load task");
            total.ok += load.ok;
            total.failed.extend(load.failed);
            total.slowest = total.slowest.max(load.slowest);
        }
        total
    }
}

/// The longest any call may take: every attempt timing out, plus slack for a loaded machine.
fn call_bound() -> Duration {
    TIMEOUT * (RETRIES + 1) + Duration::from_secs(1)
}

/// Keys left in db 3 (the registry), read with SELECT inside a script.
fn registry_keys(redis: &RedisServer) -> i64 {
    let reply = redis
        .command(&[
            "EVAL",
            "redis.call('SELECT', '3') return redis.call('DBSIZE')",
            "0",
        ])
        .expect("dbsize");
    reply.as_int().expect("integer")
}

/// After a scenario: the client holds no pending call and only its two loops, and once every
/// node is gone and the TTL has passed, Redis holds no registry key.
async fn assert_clean(client: Client, redis: &RedisServer) {
    eventually(
        "no pending calls and idle tasks",
        Duration::from_secs(5),
        || async {
            let stats = client.stats();
            stats.pending_calls == 0 && stats.tasks == 2
        },
    )
    .await;
    drop(client);
    eventually(
        "no stale registry entries after the TTL",
        HEARTBEAT * 3 + Duration::from_secs(5),
        || async { registry_keys(redis) == 0 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_killed_mid_load() {
    let redis = redis();
    let url = redis.url_db(3);
    let providers: Vec<_> = (0..3).map(|_| ProviderProcess::start(&url)).collect();
    let client = Client::connect(fault_config(&url)).await.expect("client");
    let driver = Driver::start(&client, 8);
    driver
        .progress(200, "calls go through before the kill")
        .await;
    let mut providers = providers.into_iter();
    let victim = providers.next().expect("provider");
    let victim_id = victim.id.clone();
    let rerouted_before = client.stats().rerouted_calls;
    let killed_at = Instant::now();
    victim.kill();
    // Sample the client's re-routes for 1.5 s (a measurement window, not a wait for
    // something) to see when traffic stopped going to the dead provider.
    let mut last_reroute = None;
    let mut reroutes = 0;
    while killed_at.elapsed() < Duration::from_millis(1_500) {
        let now = client.stats().rerouted_calls - rerouted_before;
        if now > reroutes {
            reroutes = now;
            last_reroute = Some(killed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let load = driver.finish().await;
    eprintln!(
        "FIGURES provider_killed_mid_load: calls_ok={} calls_failed={} slowest_call_ms={} reroutes_after_kill={} last_reroute_after_kill_ms={:?}",
        load.ok,
        load.failed.len(),
        load.slowest.as_millis(),
        reroutes,
        last_reroute.map(|d| d.as_millis())
    );
    assert!(load.failed.is_empty(), "calls failed: {:?}", load.failed);
    assert!(
        load.slowest < call_bound(),
        "a call took {:?}",
        load.slowest
    );
    assert!(load.ok > 100, "load ran: {}", load.ok);
    let status = status(fault_config(&url)).await;
    eprintln!(
        "FIGURES provider_killed_mid_load: dead provider still in registry right after: {}",
        status.servers.keys().any(|k| k.as_str() == victim_id)
    );
    for provider in providers {
        provider.stop();
    }
    assert_clean(client, &redis).await;
}

/// The exactly-once record of the one call in flight in db 3 and its value, once there is
/// one: `(key, value)`.
fn once_record(redis: &RedisServer) -> Option<(String, Vec<u8>)> {
    let script = "redis.call('SELECT', '3') \
                  local keys = redis.call('KEYS', 'clouds:3:once:*') \
                  if #keys == 0 then return false end \
                  return {keys[1], redis.call('GET', keys[1])}";
    let reply = redis.command(&["EVAL", script, "0"]).expect("EVAL");
    if reply.is_nil() {
        return None;
    }
    match reply {
        clouds_testkit::RespValue::Array(Some(items)) if items.len() == 2 => Some((
            items[0].as_text().expect("a key"),
            items[1].as_bytes().unwrap_or_default().to_vec(),
        )),
        other => panic!("{other:?}"),
    }
}

/// `kill -9` of the provider running an exactly-once call, mid-handler: its record says it
/// never finished, so once its lease lapses the retry runs the call on the other provider, and
/// the caller gets one result, the survivor's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_once_call_whose_provider_is_killed_runs_once_on_the_retry() {
    let redis = redis();
    let url = redis.url_db(3);
    let mut providers: Vec<_> = (0..2).map(|_| ProviderProcess::start(&url)).collect();
    let client = Client::connect(fault_config(&url)).await.expect("client");
    let fault = FaultClient::new(&client).with_retries(RETRIES);
    let started = Instant::now();
    let call = tokio::spawn(async move { fault.charge(400).await });
    // The provider that took the call says so in its record: `R<its node id> <run>`.
    let mut running = None;
    eventually(
        "the call is recorded as running",
        Duration::from_secs(5),
        || {
            let found = once_record(&redis);
            let found = found.filter(|(_, value)| value.first() == Some(&b'R'));
            let ok = found.is_some();
            running = running.take().or(found);
            async move { ok }
        },
    )
    .await;
    let (key, value) = running.expect("a running record");
    let owner = String::from_utf8_lossy(&value[1..])
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let victim = providers
        .iter()
        .position(|p| p.id == owner)
        .unwrap_or_else(|| panic!("the record names {owner}, not one of the providers"));
    let victim = providers.remove(victim);
    let killed_at = Instant::now();
    victim.kill();
    let answer = call
        .await
        .expect("join")
        .expect("the retry runs it and answers");
    let survivor = providers.pop().expect("the other provider");
    assert_eq!(answer, survivor.id, "run by the survivor, once");
    let (done_key, done) = once_record(&redis).expect("the record is kept");
    assert_eq!(done_key, key, "one call, one record");
    assert_eq!(done.first(), Some(&b'D'), "done, with its result");
    eprintln!(
        "FIGURES once_call_provider_killed: answered {} ms after the kill, {} ms after the call",
        killed_at.elapsed().as_millis(),
        started.elapsed().as_millis()
    );
    assert!(started.elapsed() < call_bound());
    survivor.stop();
    assert_clean(client, &redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_provider_processes() {
    let redis = redis();
    let url = redis.url_db(3);
    let mut providers: Vec<_> = (0..3).map(|_| ProviderProcess::start(&url)).collect();
    let client = Client::connect(fault_config(&url)).await.expect("client");
    let driver = Driver::start(&client, 8);
    let started = Instant::now();
    for _ in 0..3 {
        driver
            .progress(100, "calls go through before the next restart")
            .await;
        let old = providers.remove(0);
        tokio::task::spawn_blocking(move || old.stop())
            .await
            .expect("stop");
        let url = url.clone();
        providers.push(
            tokio::task::spawn_blocking(move || ProviderProcess::start(&url))
                .await
                .expect("start"),
        );
    }
    driver
        .progress(100, "calls go through after the last restart")
        .await;
    let load = driver.finish().await;
    eprintln!(
        "FIGURES rolling_restart: restarts=3 duration_ms={} calls_ok={} calls_failed={} slowest_call_ms={} rerouted={}",
        started.elapsed().as_millis(),
        load.ok,
        load.failed.len(),
        load.slowest.as_millis(),
        client.stats().rerouted_calls
    );
    assert!(
        load.failed.is_empty(),
        "calls failed during the rolling restart: {:?}",
        load.failed
    );
    assert!(load.ok > 100);
    for provider in providers {
        provider.stop();
    }
    assert_clean(client, &redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_under_load() {
    let mut redis = redis();
    let url = redis.url_db(3);
    let providers: Vec<_> = (0..2).map(|_| ProviderProcess::start(&url)).collect();
    let client = Client::connect(fault_config(&url)).await.expect("client");
    let monitor = Monitor::connect(fault_config(&url)).await.expect("monitor");
    let driver = Driver::start(&client, 4);
    driver
        .progress(50, "calls go through before the restart")
        .await;

    let down_at = Instant::now();
    tokio::task::block_in_place(|| redis.restart()).expect("restart redis");
    let up_after = down_at.elapsed();

    let ids: Vec<String> = providers.iter().map(|p| p.id.clone()).collect();
    eventually("providers are back in the registry", Duration::from_secs(10), || async {
        matches!(monitor.snapshot().await, Ok(s) if ids.iter().all(|id| s.servers.keys().any(|k| k.as_str() == id)))
    })
    .await;
    let registered_after = down_at.elapsed();
    let stub = FaultClient::new(&client);
    eventually("calls succeed again", Duration::from_secs(10), || async {
        stub.nap(0).await.is_ok()
    })
    .await;
    let serving_after = down_at.elapsed();
    driver.progress(50, "the load gets through again").await;
    let load = driver.finish().await;
    let kinds: std::collections::BTreeSet<String> = load
        .failed
        .iter()
        .map(|e| e.split(':').next().unwrap_or("").to_string())
        .collect();
    eprintln!(
        "FIGURES redis_restart: redis_down_ms={} registry_back_ms={} calls_back_ms={} calls_ok={} calls_failed={} failure_kinds={:?} slowest_call_ms={}",
        up_after.as_millis(),
        registered_after.as_millis(),
        serving_after.as_millis(),
        load.ok,
        load.failed.len(),
        kinds,
        load.slowest.as_millis()
    );
    assert!(
        load.slowest < call_bound() + Duration::from_secs(1),
        "a call hung: {:?}",
        load.slowest
    );
    for provider in providers {
        provider.stop();
    }
    assert_clean(client, &redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handlers_past_the_deadline_and_panics_leave_nothing_behind() {
    let redis = redis();
    let url = redis.url_db(3);
    let server = Server::start(fault_config(&url)).await.expect("server");
    server
        .register("slow.sleep", |(ms,): (u64,)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, std::convert::Infallible>(ms)
        })
        .await
        .expect("register");
    server
        .register("slow.panic", |(): ()| async move {
            if true {
                panic!("handler bug");
            }
            Ok::<_, std::convert::Infallible>(())
        })
        .await
        .expect("register");
    let client = Client::connect(fault_config(&url)).await.expect("client");
    let slow = client.clone().with_timeout(Duration::from_millis(200));
    for _ in 0..5 {
        match slow.call::<_, u64>("slow.sleep", (600u64,)).await {
            Err(Error::Timeout { attempts: 1, .. }) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
        match client.call::<_, ()>("slow.panic", ()).await {
            Err(Error::Panicked { message, .. }) => assert_eq!(message, "handler bug"),
            other => panic!("expected a panic error, got {other:?}"),
        }
    }
    // The slow handlers outlast their callers' timeouts: each caller says it gave up, and the
    // server drops the handler instead of finishing it (no late reply).
    eventually(
        "handlers cancelled, nothing left running",
        Duration::from_secs(5),
        || async { server.stats().in_flight == 0 && server.stats().cancelled_calls == 5 },
    )
    .await;
    assert_eq!(client.stats().cancels_sent, 5);
    assert_eq!(client.stats().late_replies, 0);
    assert_eq!(
        client
            .call::<_, u64>("slow.sleep", (1u64,))
            .await
            .expect("still serving"),
        1
    );
    eprintln!(
        "FIGURES slow_and_panics: server={:?} client={:?}",
        server.stats(),
        client.stats()
    );
    server.shutdown().await.expect("shutdown");
    assert_clean(client, &redis).await;
}

/// A reply whose PUBLISH Redis holds (here: `CLIENT PAUSE ... WRITE`, which blocks PUBLISH) is
/// given up within two command timeouts, so its place among the calls in flight comes back
/// while Redis is still paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_stuck_in_redis_is_given_up() {
    let redis = redis();
    let command_timeout = Duration::from_millis(300);
    let server = Server::start(
        common::config(&redis)
            .command_timeout(command_timeout)
            .max_in_flight(1),
    )
    .await
    .expect("server");
    let started = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let (started_flag, paused_flag) = (started.clone(), paused.clone());
    server
        .register("stuck.reply", move |(): ()| {
            let (started, paused) = (started_flag.clone(), paused_flag.clone());
            async move {
                // Ready at its first poll (its reply goes out from the receive loop), once
                // Redis is paused: it blocks until then (at most 5 s), never awaiting.
                started.store(true, Ordering::SeqCst);
                let waiting = Instant::now();
                while !paused.load(Ordering::SeqCst) && waiting.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok::<_, std::convert::Infallible>(1u8)
            }
        })
        .await
        .expect("register");
    let client = Client::connect(common::config(&redis).timeout(Duration::from_secs(5)))
        .await
        .expect("client");
    let call = tokio::spawn(async move { client.call::<_, u8>("stuck.reply", ()).await });
    eventually("the handler runs", Duration::from_secs(5), || async {
        started.load(Ordering::SeqCst)
    })
    .await;
    let pause = Duration::from_millis(2_500);
    let paused_at = Instant::now();
    redis
        .command(&["CLIENT", "PAUSE", &pause.as_millis().to_string(), "WRITE"])
        .expect("pause");
    paused.store(true, Ordering::SeqCst);
    eventually("the reply is sending", Duration::from_secs(1), || async {
        server.stats().in_flight == 1
    })
    .await;
    eventually(
        "the stuck reply is given up",
        command_timeout * 2 + Duration::from_millis(500),
        || async { server.stats().in_flight == 0 },
    )
    .await;
    assert!(
        paused_at.elapsed() < pause,
        "given up only after Redis resumed ({:?})",
        paused_at.elapsed()
    );
    // Giving up cannot take back a PUBLISH already written: once Redis resumes, the caller
    // may still get its reply, or time out.
    let _ = call.await;
}

/// kill -9 of a provider mid-stream: the caller gets the items that arrived, in order, then a
/// typed error ([`clouds::StreamBreak::Idle`]) within the stream idle timeout, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_killed_mid_stream() {
    let redis = redis();
    let url = redis.url_db(3);
    let provider = ProviderProcess::start(&url);
    let client = Client::connect(fault_config(&url)).await.expect("client");
    let mut ticks = FaultClient::new(&client).ticks(5).await.expect("open");
    for expected in 0..20 {
        assert_eq!(ticks.next().await.expect("a tick").expect("ok"), expected);
    }
    let killed_at = Instant::now();
    provider.kill();
    let mut next = 20;
    let error = tokio::time::timeout(service::STREAM_IDLE * 3, async {
        loop {
            match ticks.next().await {
                Some(Ok(tick)) => {
                    assert_eq!(tick, next, "in order up to the kill");
                    next += 1;
                }
                Some(Err(e)) => return e,
                None => panic!("the stream ended without an error"),
            }
        }
    })
    .await
    .expect("the stream breaks instead of hanging");
    let after = killed_at.elapsed();
    println!(
        "FIGURES provider_killed_mid_stream: items={next} broke_after_ms={} idle_timeout_ms={}",
        after.as_millis(),
        service::STREAM_IDLE.as_millis()
    );
    assert!(
        matches!(
            error,
            Error::StreamBroken {
                reason: clouds::StreamBreak::Idle { .. },
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        after <= service::STREAM_IDLE + Duration::from_millis(500),
        "broke after {after:?}"
    );
    assert!(ticks.next().await.is_none(), "nothing after the error");
}
