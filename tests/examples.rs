//! Smoke tests of the examples as separate processes, including a provider killed mid-run.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::redis;

/// `target/<profile>/examples/<name>`; `cargo test` builds the examples before the tests.
fn example(name: &str) -> Command {
    let mut dir: PathBuf = std::env::current_exe().expect("test binary path");
    dir.pop(); // the test binary
    dir.pop(); // deps/
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo test`, which builds the examples",
        path.display()
    );
    Command::new(path)
}

fn output_of(command: &mut Command, within: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + within;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("example did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// A child process that is killed and reaped when dropped, so a failing test leaks nothing.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a `hello_server` (its output goes to a file, so no pipe can break) and waits until
/// it says it is serving.
fn start_server(url: &str) -> Proc {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let log = std::env::temp_dir().join(format!(
        "clouds-hello-server-{}-{}.log",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let file = std::fs::File::create(&log).expect("log file");
    let child = Proc(
        example("hello_server")
            .env("REDIS_URL", url)
            .stdout(file)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hello_server"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("serving test.hello") {
            let _ = std::fs::remove_file(&log);
            return child;
        }
        assert!(
            Instant::now() < deadline,
            "hello_server did not start: {text:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: &mut Proc, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let _ = child.0.wait();
}

#[test]
fn hello_runs_against_a_given_redis() {
    let redis = redis();
    let out = output_of(
        example("hello").env("REDIS_URL", redis.url_db(3)),
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let mut a = start_server(&url);
    let mut b = start_server(&url);
    let mut c = start_server(&url);

    // 60 calls, 25 ms apart, with retries; kill -9 one provider a little way in.
    let client = example("hello_client")
        .args(["60", "25"])
        .env("REDIS_URL", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hello_client");
    std::thread::sleep(Duration::from_millis(500));
    stop(&mut a, "-9");
    let out = client.wait_with_output().expect("client output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
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
    stop(&mut b, "-TERM");
    stop(&mut c, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = output_of(
            example("monitor").env("REDIS_URL", &url),
            Duration::from_secs(10),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        if stdout.contains("servers (0)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed provider never expired:\n{stdout}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
