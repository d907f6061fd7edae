//! The `clouds` command as a process, against a real `redis-server` (testkit) and a real
//! server (started here, in this process, on its own runtime).

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::process::{Command as Std, Stdio};
use std::time::Duration;

use assert_cmd::Command;
use clouds_core::{Config, Server};
use clouds_testkit::RedisServer;
use serde_json::Value as Json;

/// A Redis, a namespace of its own and a server of `demo.add`, `demo.fail` and `demo.echo`.
struct Deployment {
    redis: RedisServer,
    namespace: String,
    runtime: tokio::runtime::Runtime,
    server: Option<Server>,
}

fn config(url: &str, namespace: &str) -> Config {
    Config::from_url(url)
        .expect("url")
        .namespace(namespace)
        .heartbeat(Duration::from_millis(200))
        .timeout(Duration::from_secs(5))
}

impl Deployment {
    fn start(namespace: &str) -> Deployment {
        let redis = RedisServer::start().expect("redis-server");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime.block_on(async {
            let server = Server::start(config(&redis.url(), namespace))
                .await
                .expect("server");
            server
                .register("demo.add", |(a, b): (i64, i64)| async move {
                    Ok::<_, Infallible>(a + b)
                })
                .await
                .expect("register");
            server
                .register("demo.fail", |(why,): (String,)| async move {
                    Err::<(), _>(serde_json::json!({"reason": why, "code": 42}).to_string())
                })
                .await
                .expect("register");
            server
                .register("demo.echo", |(v,): (Json,)| async move {
                    Ok::<_, Infallible>(v)
                })
                .await
                .expect("register");
            server
        });
        Deployment {
            redis,
            namespace: namespace.to_string(),
            runtime,
            server: Some(server),
        }
    }

    fn server_id(&self) -> String {
        self.server.as_ref().expect("server").id().to_string()
    }

    /// `clouds` with this deployment's URL (from `REDIS_URL`) and namespace.
    fn clouds(&self) -> Command {
        let mut cmd = Command::cargo_bin("clouds").expect("the clouds binary");
        cmd.env("REDIS_URL", self.redis.url())
            .env_remove("CLOUDS_NAMESPACE")
            .args(["--namespace", &self.namespace]);
        cmd
    }

    fn json(&self, args: &[&str]) -> Json {
        let out = self.clouds().args(args).arg("--json").assert().success();
        serde_json::from_slice(&out.get_output().stdout).expect("JSON on stdout")
    }

    fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown()).expect("shutdown");
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stdout(cmd: &mut Command) -> String {
    let out = cmd.assert().success();
    String::from_utf8(out.get_output().stdout.clone()).expect("UTF-8")
}

#[test]
fn ls_and_info_list_who_serves_what() {
    let d = Deployment::start("cli-ls");
    let id = d.server_id();
    let text = stdout(d.clouds().arg("ls"));
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("SERVICE\tMETHOD\tSERVER\tHOST\tPID\tUPTIME\tBEAT\tIN_FLIGHT\tDRAINING"),
        "piped: tab-separated, no colour"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0][..3], ["demo", "demo.add", id.as_str()]);
    assert_eq!(rows[0][4], std::process::id().to_string());
    assert_eq!(rows[0][8], "no");
    assert!(!text.contains('\x1b'));

    let doc = d.json(&["ls"]);
    assert_eq!(doc["methods"]["demo.fail"][0], id.as_str());
    assert_eq!(doc["servers"][0]["pid"], std::process::id());
    assert_eq!(doc["servers"][0]["draining"], false);

    let server = d.json(&["info", &id]);
    assert_eq!(server["id"], id.as_str());
    assert_eq!(server["methods"].as_array().map(Vec::len), Some(3));
    let method = d.json(&["info", "demo.add"]);
    assert_eq!(method["providers"][0]["id"], id.as_str());

    let missing = d.clouds().args(["info", "no.such"]).assert().code(5);
    let err = String::from_utf8_lossy(&missing.get_output().stderr).to_string();
    assert!(err.contains("NotFound"), "{err}");
}

#[test]
fn call_turns_json_into_messagepack_and_back_and_errors_have_their_exit_codes() {
    let d = Deployment::start("cli-call");
    assert_eq!(
        stdout(d.clouds().args(["call", "demo.add", "[2, 3]"])).trim(),
        "5"
    );
    let echoed = d.json(&["call", "demo.echo", r#"{"a": [1, "x", null], "b": 1.5}"#]);
    assert_eq!(echoed, serde_json::json!({"a": [1, "x", null], "b": 1.5}));

    // An application error: JSON on stderr, exit code 3.
    let failed = d
        .clouds()
        .args(["call", "demo.fail", r#""because""#])
        .assert()
        .code(3);
    let err: Json = serde_json::from_slice(&failed.get_output().stderr).expect("JSON on stderr");
    assert_eq!(err["error"], "Remote");
    assert_eq!(err["method"], "demo.fail");
    assert!(err["value"].as_str().is_some_and(|v| v.contains("because")));

    // Bad arguments (a typed error of clouds): exit 1, with its kind.
    let bad = d
        .clouds()
        .args(["call", "demo.add", r#"["two", 3]"#, "--json"])
        .assert()
        .code(1);
    let err: Json = serde_json::from_slice(&bad.get_output().stderr).expect("JSON error");
    assert_eq!(err["error"], "BadArguments");
    // Nobody serves it: exit 5. Not JSON: exit 2.
    d.clouds().args(["call", "no.body", "[]"]).assert().code(5);
    d.clouds()
        .args(["call", "demo.add", "[2,"])
        .assert()
        .code(2);
}

#[test]
fn stats_show_real_figures_after_real_calls() {
    let d = Deployment::start("cli-stats");
    for _ in 0..5 {
        d.clouds()
            .args(["call", "demo.add", "[1, 1]"])
            .assert()
            .success();
    }
    d.clouds()
        .args(["call", "demo.fail", r#""x""#])
        .assert()
        .code(3);
    // The next heartbeats publish them.
    let mut doc = Json::Null;
    for _ in 0..200 {
        doc = d.json(&["stats"]);
        if doc["methods"]["demo.fail"]["total"]["calls"] == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let add = &doc["methods"]["demo.add"]["total"];
    assert_eq!(add["calls"], 5, "{doc}");
    assert_eq!(add["errors"]["total"], 0);
    let fail = &doc["methods"]["demo.fail"]["total"];
    assert_eq!(fail["errors"]["application"], 1);
    let text = stdout(d.clouds().arg("stats"));
    assert!(
        text.starts_with("METHOD\tSERVER\tCALLS/S\tERRORS/S\tP50\tP99"),
        "{text}"
    );
    assert!(text.contains("demo.add\t"));
}

#[test]
fn ping_bench_and_send_reach_the_server() {
    let d = Deployment::start("cli-ping");
    let id = d.server_id();
    let pings = d.json(&["ping"]);
    assert_eq!(pings[0]["server"], id.as_str());
    assert!(pings[0]["rtt_us"].as_u64().is_some(), "{pings}");
    let by_method = d.json(&["ping", "demo.add"]);
    assert_eq!(by_method[0]["server"], id.as_str());
    d.clouds().args(["ping", "nobody.here"]).assert().code(5);

    let bench = d.json(&["bench", "demo.add", "[1, 2]", "-n", "200", "-c", "8"]);
    assert_eq!(bench["calls"], 200);
    assert_eq!(bench["errors"], 0);
    assert!(bench["calls_per_second"].as_f64().is_some_and(|r| r > 0.0));
    assert!(bench["latency_us"]["p99"].as_u64() >= bench["latency_us"]["p50"].as_u64());

    let mut inbox = d.server.as_ref().expect("server").messages();
    let sent = d.json(&["send", &id, r#"{"hello": "there"}"#]);
    assert_eq!(sent["sent"], true);
    let message = d.runtime.block_on(inbox.next()).expect("a message");
    assert_eq!(
        message.decode::<Json>().expect("decodes"),
        serde_json::json!({"hello": "there"})
    );
    d.clouds()
        .args(["send", "server-gone-1-1-000000", "1"])
        .assert()
        .code(5);
}

#[test]
fn watch_reports_joins_and_leaves_with_timestamps() {
    let mut d = Deployment::start("cli-watch");
    let bin = assert_cmd::cargo::cargo_bin("clouds");
    let mut child = Std::new(bin)
        .env("REDIS_URL", d.redis.url())
        .args([
            "--namespace",
            &d.namespace,
            "watch",
            "--json",
            "--count",
            "2",
            "--poll",
            "50ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("clouds watch");
    // It has read the registry once when it says so on stderr.
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("read");
    assert!(line.starts_with("watching 1 servers"), "{line}");
    let joining = d.runtime.block_on(async {
        let server = Server::start(config(&d.redis.url(), &d.namespace))
            .await
            .expect("second server");
        server
            .register("demo.more", |(): ()| async { Ok::<_, Infallible>(()) })
            .await
            .expect("register");
        server
    });
    let joined = joining.id().to_string();
    d.runtime.block_on(joining.shutdown()).expect("shutdown");
    let out = child.wait_with_output().expect("watch ends after 2 events");
    assert!(out.status.success());
    let events: Vec<Json> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["event"], "join");
    assert_eq!(events[1]["event"], "leave");
    assert_eq!(events[0]["methods"], serde_json::json!(["demo.more"]));
    for event in &events {
        assert_eq!(event["server"], joined.as_str());
        assert!(event["at"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
    d.stop();
}

#[test]
fn no_secret_is_printed_and_failures_exit_non_zero() {
    // Nothing listens there: a connection error, without the password.
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = free.local_addr().expect("addr").port();
    drop(free);
    let url = format!("redis://:hunter2-secret@127.0.0.1:{port}/0");
    let out = Command::cargo_bin("clouds")
        .expect("bin")
        .env("REDIS_URL", &url)
        .args(["ls", "--timeout", "1s"])
        .assert()
        .failure();
    let output = out.get_output();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!all.contains("hunter2"), "{all}");
    assert!(all.contains("error"), "{all}");
    // Nor in the help, which shows the variable's name only.
    let help = Command::cargo_bin("clouds")
        .expect("bin")
        .env("REDIS_URL", &url)
        .arg("--help")
        .assert()
        .success();
    assert!(!String::from_utf8_lossy(&help.get_output().stdout).contains("hunter2"));
}

#[test]
fn a_draining_server_is_listed_as_draining_until_its_handlers_finish() {
    let d = Deployment::start("cli-drain");
    let url = d.redis.url();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (server, call) = d.runtime.block_on(async {
        let server = std::sync::Arc::new(
            Server::start(config(&url, &d.namespace))
                .await
                .expect("server"),
        );
        let gate = release.clone();
        let started = std::sync::Mutex::new(started_tx);
        server
            .register("drain.hold", move |(): ()| {
                let gate = gate.clone();
                let _ = started.lock().map(|tx| tx.send(()));
                async move {
                    gate.notified().await;
                    Ok::<_, Infallible>(7u8)
                }
            })
            .await
            .expect("register");
        // Only the holding server serves it.
        let client = clouds_core::Client::connect(config(&url, &d.namespace))
            .await
            .expect("client");
        let call = tokio::spawn(async move { client.call::<_, u8>("drain.hold", ()).await });
        (server, call)
    });
    started_rx.recv().expect("the handler runs");
    let id = server.id().to_string();
    let stopping = d.runtime.spawn({
        let server = server.clone();
        async move { server.shutdown().await }
    });
    let mut listed = Json::Null;
    for _ in 0..400 {
        listed = d.json(&["ls"]);
        let draining = listed["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["id"] == id.as_str() && s["draining"] == true);
        if draining {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let entry = listed["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["id"] == id.as_str())
        .cloned()
        .unwrap_or(Json::Null);
    assert_eq!(entry["draining"], true, "{listed}");
    assert_eq!(entry["methods"], serde_json::json!(["drain.hold"]));
    assert!(
        listed["methods"].get("drain.hold").is_none(),
        "provides nothing: {listed}"
    );
    release.notify_one();
    assert_eq!(
        d.runtime
            .block_on(call)
            .expect("join")
            .expect("the call finishes"),
        7
    );
    d.runtime
        .block_on(stopping)
        .expect("join")
        .expect("shutdown");
    let after = d.json(&["ls"]);
    assert!(
        !after["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["id"] == id.as_str()),
        "gone once drained: {after}"
    );
}

#[test]
fn call_stream_prints_items_as_json_lines_as_they_come() {
    let d = Deployment::start("cli-stream");
    let server = d.server.as_ref().expect("server");
    d.runtime.block_on(async {
        server
            .register_stream("demo.count", |(n,): (u64,)| async move {
                clouds_core::Streaming::iter((0..n).map(|i| serde_json::json!({ "n": i })))
            })
            .await
            .expect("register");
        server
            .register_stream("demo.slow", |(every_ms,): (u64,)| async move {
                clouds_core::Streaming::new(futures_util::stream::unfold(
                    0u64,
                    move |i| async move {
                        tokio::time::sleep(Duration::from_millis(every_ms)).await;
                        Some((i, i + 1))
                    },
                ))
            })
            .await
            .expect("register");
    });
    let text = stdout(d.clouds().args(["call", "--stream", "demo.count", "[3]"]));
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#],
        "one compact JSON value per line"
    );
    assert_eq!(
        stdout(d.clouds().args(["call", "--stream", "demo.count", "[0]"])),
        ""
    );
    // Without --stream: a usage error that says what to add.
    let plain = d
        .clouds()
        .args(["call", "demo.count", "[3]"])
        .assert()
        .code(2);
    let err = String::from_utf8_lossy(&plain.get_output().stderr).to_string();
    assert!(err.contains("--stream"), "{err}");

    // As they come: an endless stream's first lines arrive while it runs.
    let mut child = Std::new(assert_cmd::cargo::cargo_bin("clouds"))
        .env("REDIS_URL", d.redis.url())
        .args([
            "--namespace",
            &d.namespace,
            "call",
            "--stream",
            "demo.slow",
            "[50]",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn clouds");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    for expected in 0..3 {
        let line = lines.next().expect("a line").expect("read");
        assert_eq!(line, expected.to_string());
    }
    child.kill().expect("kill");
    let _ = child.wait();
}
