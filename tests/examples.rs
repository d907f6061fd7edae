//! Smoke tests of the examples as separate processes, including a provider killed mid-run.
//!
//! Every process runs as a [`ChildProcess`] (killed and reaped if a test panics) or through
//! [`output_of`] (killed if it does not finish in time); their output is quoted on failure.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use clouds_testkit::{ChildProcess, output_of};
use common::{example, redis};

/// How long a `hello_server` may take to say it is serving, or to stop after SIGTERM.
const SERVER_LIMIT: Duration = Duration::from_secs(10);
/// How long a run of `hello`, `hello_client` or `monitor` may take.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Starts a `hello_server` and waits until it says it is serving; returns it and its node id.
fn start_server(url: &str) -> (ChildProcess, String) {
    let mut server = ChildProcess::spawn(example("hello_server").env("REDIS_URL", url))
        .expect("spawn hello_server");
    let line = server
        .wait_for_line("serving test.hello", SERVER_LIMIT)
        .expect("hello_server starts serving");
    let id = line
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    (server, id)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn hello_runs_against_a_given_redis() {
    let redis = redis();
    let out = output_of(
        example("hello").env("REDIS_URL", redis.url_db(3)),
        RUN_LIMIT,
    )
    .expect("hello finishes");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("test.hello -> Hello Glen, timestamp is"),
        "{stdout}"
    );
    assert!(
        stdout.contains("test.div(7, 0) -> Err(DivError)"),
        "{stdout}"
    );
    assert!(stdout.contains("server got \"ping\""), "{stdout}");
    assert!(
        !stdout.contains("throwaway"),
        "used the given Redis: {stdout}"
    );
}

#[test]
fn hello_starts_a_throwaway_redis_when_none_answers() {
    // A free port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let out = output_of(
        example("hello").env("REDIS_URL", format!("redis://127.0.0.1:{port}/3")),
        RUN_LIMIT,
    )
    .expect("hello finishes");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("started a throwaway redis-server"),
        "{stdout}"
    );
    assert!(stdout.contains("test.echo -> hi"), "{stdout}");
}

#[test]
fn calls_survive_a_provider_killed_mid_run() {
    let redis = redis();
    let url = redis.url_db(3);
    let (mut a, a_id) = start_server(&url);
    let (mut b, _) = start_server(&url);
    let (mut c, _) = start_server(&url);

    // 60 calls, 25 ms apart, with retries; kill -9 one provider a little way in: as soon as
    // it has answered a call (round-robin over the three, so within the first three).
    let mut client = ChildProcess::spawn(
        example("hello_client")
            .args(["60", "25"])
            .env("REDIS_URL", &url),
    )
    .expect("spawn hello_client");
    client
        .wait_for_line(&format!("(from {a_id})"), RUN_LIMIT)
        .expect("the victim answers a call");
    a.kill().expect("kill -9 the victim");
    let answered_before = client.stdout().lines().count();
    let out = client.finish(RUN_LIMIT).expect("hello_client finishes");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        answered_before < 60,
        "the kill came mid-run, after {answered_before} calls:\n{stdout}"
    );
    assert!(
        stdout.contains("60 ok, 0 failed"),
        "every call succeeded:\n{stdout}"
    );
    let servers = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("server-"))
        .count();
    assert_eq!(
        servers, 3,
        "all three providers answered before the kill:\n{stdout}"
    );

    // The monitor no longer lists the killed provider once its TTL (6 s) has passed; the
    // graceful ones leave at once.
    for server in [&mut b, &mut c] {
        let status = server
            .terminate(SERVER_LIMIT)
            .expect("hello_server stops on SIGTERM");
        assert!(
            status.success(),
            "a graceful stop: {status}\n{}",
            server.stdout()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = output_of(example("monitor").env("REDIS_URL", &url), RUN_LIMIT)
            .expect("monitor finishes");
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        if stdout.contains("servers (0)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed provider never expired:\n{stdout}"
        );
        // Polling: each look is a whole process run; no need to spin.
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Sums `INFO commandstats`' `calls=` of `command` over every node of `cluster`.
fn calls_on_cluster(cluster: &clouds_testkit::RedisCluster, command: &str) -> u64 {
    let field = format!("cmdstat_{command}:calls=");
    cluster
        .ports()
        .into_iter()
        .map(|port| {
            let info = cluster
                .command_on(port, &["INFO", "commandstats"])
                .expect("INFO");
            let text = info.as_text().unwrap_or_default();
            text.lines()
                .find_map(|line| line.strip_prefix(&field))
                .and_then(|rest| rest.split(',').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn the_examples_run_on_a_redis_cluster() {
    let cluster = clouds_testkit::RedisCluster::start().expect("start a Redis Cluster");
    let url = cluster.seed_url();
    let out =
        output_of(example("hello").env("REDIS_URL", &url), RUN_LIMIT).expect("hello finishes");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("test.hello -> Hello Glen, timestamp is"),
        "{stdout}"
    );
    assert!(stdout.contains("server got \"ping\""), "{stdout}");
    assert!(!stdout.contains("throwaway"), "used the cluster: {stdout}");

    let (mut server, server_id) = start_server(&url);
    let out = output_of(
        example("hello_client")
            .args(["20", "10"])
            .env("REDIS_URL", &url),
        RUN_LIMIT,
    )
    .expect("hello_client finishes");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("20 ok, 0 failed"), "{stdout}\n{stderr}");
    let out =
        output_of(example("monitor").env("REDIS_URL", &url), RUN_LIMIT).expect("monitor finishes");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(&server_id), "{stdout}");
    let status = server
        .terminate(SERVER_LIMIT)
        .expect("hello_server stops on SIGTERM");
    assert!(status.success(), "{status}\n{}", server.stdout());

    // Sharded pub/sub only: a classic PUBLISH in a cluster is broadcast to every node and
    // its receiver count covers only one of them (docs/protocol.md §2).
    assert_eq!(
        calls_on_cluster(&cluster, "publish"),
        0,
        "no classic PUBLISH"
    );
    assert!(
        calls_on_cluster(&cluster, "spublish") >= 40,
        "calls went by SPUBLISH"
    );
}

/// `examples/tracing.rs`: one trace across two services, printed as a tree of five spans.
#[cfg(feature = "opentelemetry")]
#[test]
fn tracing_example_prints_one_trace_across_two_services() {
    let out = output_of(&mut example("tracing"), RUN_LIMIT).expect("tracing example");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("answer: ordered; 3 left"), "{stdout}");
    let trace = stdout
        .lines()
        .find_map(|l| l.strip_prefix("5 spans, trace "))
        .and_then(|rest| rest.strip_suffix(':'))
        .unwrap_or_else(|| panic!("five spans: {stdout}"))
        .to_string();
    let tree: Vec<&str> = stdout.lines().filter(|l| l.contains(" span ")).collect();
    let expected = [
        "  checkout (Internal)",
        "    front.order (Client OK)",
        "      front.order (Server OK)",
        "        stock.reserve (Client OK)",
        "          stock.reserve (Server OK)",
    ];
    assert_eq!(tree.len(), expected.len(), "{stdout}");
    for (line, start) in tree.iter().zip(expected) {
        assert!(
            line.starts_with(start),
            "{line:?} should start {start:?}\n{stdout}"
        );
        assert!(
            line.ends_with(&format!("trace {trace}")),
            "one trace: {stdout}"
        );
    }
}
