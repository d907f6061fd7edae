//! Fault injection with real processes and a real redis-server: providers killed, restarted
//! in turn, Redis restarted. Every call must end (Ok or a typed error) within its bound; the
//! figures each scenario prints are recorded in RELIABILITY.md.
//!
//! Provider processes are this test binary run again with `CLOUDS_FAULT_PROVIDER` set: the
//! `provider_process` "test" then serves until SIGTERM (graceful) or SIGKILL.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clouds::{Client, Config, Error, Monitor, Server};
use common::{RedisServer, eventually, redis, status};

/// The service the provider processes serve.
#[clouds::service("fault")]
pub trait Fault {
    /// The serving node's id.
    async fn whoami(&self) -> String;
    /// Sleeps `ms`, then answers.
    async fn nap(&self, ms: u64) -> u64;
}

struct Provider(String);

impl Fault for Provider {
    async fn whoami(&self) -> String {
        self.0.clone()
    }
    async fn nap(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
}

const HEARTBEAT: Duration = Duration::from_millis(300);
const TIMEOUT: Duration = Duration::from_millis(800);
const RETRIES: u32 = 3;

fn fault_config(url: &str) -> Config {
    Config::from_url(url)
        .expect("url")
        .heartbeat(HEARTBEAT)
        .timeout(TIMEOUT)
        .command_timeout(Duration::from_secs(1))
}

/// Not a test: the body of a provider process (see the module docs).
#[test]
fn provider_process() {
    let Ok(url) = std::env::var("CLOUDS_FAULT_PROVIDER") else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let server = Server::start(fault_config(&url)).await.expect("server");
        let id = server.id().to_string();
        server
            .serve(FaultServer::new(Provider(id.clone())))
            .await
            .expect("serve");
        println!("READY {id}");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("sigterm");
        term.recv().await;
        server.shutdown().await.expect("shutdown");
        println!("STOPPED {id}");
    });
}

/// A provider process, killed and reaped on drop.
struct ProviderProcess {
    child: Child,
    id: String,
}

impl ProviderProcess {
    fn start(url: &str) -> ProviderProcess {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let log = std::env::temp_dir().join(format!(
            "clouds-fault-provider-{}-{}.log",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "provider_process",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("CLOUDS_FAULT_PROVIDER", url)
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn provider");
        let mut process = ProviderProcess {
            child,
            id: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // libtest may print "test provider_process ... " on the same line first.
            if let Some(at) = text.find("READY ") {
                let rest = &text[at + "READY ".len()..];
                process.id = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = std::fs::remove_file(&log);
                return process;
            }
            assert!(Instant::now() < deadline, "provider did not start: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&mut self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// SIGTERM: graceful shutdown; waits for the process to exit.
    fn stop(mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "provider did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: the process dies without a word.
    fn kill(mut self) {
        self.signal("-9");
        let _ = self.child.wait();
    }
}

impl Drop for ProviderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a load loop saw.
#[derive(Default)]
struct Load {
    ok: u64,
    failed: Vec<String>,
    slowest: Duration,
}

/// Runs `workers` loops of `call` until `stop`; each call's duration is checked against the
/// bound `TIMEOUT × attempts` (plus scheduling slack).
fn drive(
    client: &Client,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Load>> {
    (0..workers)
        .map(|_| {
            let stub = FaultClient::new(client).with_retries(RETRIES);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut load = Load::default();
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    match stub.nap(2).await {
                        Ok(_) => load.ok += 1,
                        Err(e) => load.failed.push(e.to_string()),
                    }
                    load.slowest = load.slowest.max(started.elapsed());
                }
                load
            })
        })
        .collect()
}

async fn collect(loads: Vec<tokio::task::JoinHandle<Load>>) -> Load {
    let mut total = Load::default();
    for load in loads {
        let load = load.await.expect("load task");
        total.ok += load.ok;
        total.failed.extend(load.failed);
        total.slowest = total.slowest.max(load.slowest);
    }
    total
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
    let stop = Arc::new(AtomicBool::new(false));
    let loads = drive(&client, 8, stop.clone());

    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut providers = providers.into_iter();
    let victim = providers.next().expect("provider");
    let victim_id = victim.id.clone();
    let rerouted_before = client.stats().rerouted_calls;
    let killed_at = Instant::now();
    victim.kill();
    // Sample the client's re-routes to see when traffic stopped going to the dead provider.
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
    stop.store(true, Ordering::SeqCst);
    let load = collect(loads).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_provider_processes() {
    let redis = redis();
    let url = redis.url_db(3);
    let mut providers: Vec<_> = (0..3).map(|_| ProviderProcess::start(&url)).collect();
    let client = Client::connect(fault_config(&url)).await.expect("client");
    let stop = Arc::new(AtomicBool::new(false));
    let loads = drive(&client, 8, stop.clone());
    let started = Instant::now();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let load = collect(loads).await;
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
    let stop = Arc::new(AtomicBool::new(false));
    let loads = drive(&client, 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

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
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let load = collect(loads).await;
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
    // The slow handlers finish after their callers gave up; their replies arrive late.
    eventually(
        "handlers done, late replies counted",
        Duration::from_secs(5),
        || async { server.stats().in_flight == 0 && client.stats().late_replies == 5 },
    )
    .await;
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
