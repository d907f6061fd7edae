//! Calls by name, without the macro: registration, errors, messages, monitor.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use clouds::{Client, Error, Monitor, Server};
use common::{config, eventually, redis};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_register_and_call() {
    let redis = redis();
    let server = Server::start(config(&redis)).await.expect("server");
    server
        .register("test.echo", |(s,): (String,)| async move {
            Ok::<_, Infallible>(s)
        })
        .await
        .expect("register");
    server
        .register("test.fail", |(): ()| async move { Err::<(), _>("no luck") })
        .await
        .expect("register");
    let client = Client::connect(config(&redis)).await.expect("client");

    let echoed: String = client.call("test.echo", ("hi",)).await.expect("echo");
    assert_eq!(echoed, "hi");

    match client.call::<_, ()>("test.fail", ()).await {
        Err(Error::Remote(e)) => {
            assert_eq!(e.message(), Some("no luck"));
            assert_eq!(e.node(), server.id());
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    match client.call::<_, String>("test.echo", (1, 2)).await {
        Err(Error::BadArguments { method, .. }) => assert_eq!(method, "test.echo"),
        other => panic!("expected bad arguments, got {other:?}"),
    }
    match client.call::<_, String>("test.nobody", ()).await {
        Err(Error::NoProvider { attempts: 1, .. }) => {}
        other => panic!("expected no provider, got {other:?}"),
    }
    match client.call::<_, u32>("test.echo", ("not a number",)).await {
        Err(Error::Codec { .. }) => {}
        other => panic!("expected a codec error for the wrong return type, got {other:?}"),
    }
    assert_eq!(client.stats().pending_calls, 0);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_between_nodes() {
    let redis = redis();
    let server = Server::start(config(&redis)).await.expect("server");
    let client = Client::connect(config(&redis)).await.expect("client");
    client.send(server.id(), &"ping").await.expect("send");
    let msg = server.messages().next().await.expect("a message");
    assert_eq!(msg.from(), client.id());
    assert_eq!(msg.decode::<String>().expect("text"), "ping");
    // And back, from the server's own client handle.
    server
        .client()
        .send(client.id(), &(1u8, "pong"))
        .await
        .expect("reply");
    let back = client.messages().next().await.expect("a message");
    assert_eq!(
        back.decode::<(u8, String)>().expect("tuple"),
        (1, "pong".to_string())
    );
    match client.send("nobody-here", &1).await {
        Err(Error::Unreachable { node }) => assert_eq!(node, "nobody-here"),
        other => panic!("expected unreachable, got {other:?}"),
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_lists_methods_and_servers() {
    let redis = redis();
    let a = Server::start(config(&redis)).await.expect("server a");
    let b = Server::start(config(&redis)).await.expect("server b");
    a.register("m.one", |(): ()| async { Ok::<_, Infallible>(1) })
        .await
        .expect("register");
    b.register("m.one", |(): ()| async { Ok::<_, Infallible>(1) })
        .await
        .expect("register");
    b.register("m.two", |(): ()| async { Ok::<_, Infallible>(2) })
        .await
        .expect("register");
    let monitor = Monitor::connect(config(&redis)).await.expect("monitor");
    let status = monitor.snapshot().await.expect("status");
    let mut both = vec![a.id().clone(), b.id().clone()];
    both.sort();
    assert_eq!(status.methods["m.one"], both);
    assert_eq!(status.methods["m.two"], vec![b.id().clone()]);
    let info = &status.servers[b.id()];
    assert_eq!(info.methods, vec!["m.one".to_string(), "m.two".to_string()]);
    assert_eq!(info.pid, std::process::id());
    assert_eq!(info.in_flight, 0);
    a.shutdown().await.expect("shutdown");
    let status = monitor.snapshot().await.expect("status");
    assert_eq!(status.methods["m.one"], vec![b.id().clone()]);
    assert!(!status.servers.contains_key(a.id()));
    // A server that dies without shutdown drops out after the TTL.
    drop(b);
    eventually(
        "b expires from the registry",
        Duration::from_secs(5),
        || async { monitor.snapshot().await.expect("status").servers.is_empty() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_registry_entry_gets_unknown_method() {
    let redis = redis();
    // db 0: the testkit's raw commands run there.
    let cfg = clouds::Config::from_url(&redis.url()).expect("url");
    let server = Server::start(cfg.clone()).await.expect("server");
    // The registry claims the server provides a method it does not serve.
    let key = "{clouds:0}:method:test.ghost";
    let reply = redis
        .command(&["ZADD", key, "99999999999999", server.id().as_str()])
        .expect("zadd");
    assert_eq!(reply.as_int(), Some(1));
    let client = Client::connect(cfg).await.expect("client");
    match client.call::<_, ()>("test.ghost", ()).await {
        Err(Error::UnknownMethod { method, node }) => {
            assert_eq!(method, "test.ghost");
            assert_eq!(&node, server.id());
        }
        other => panic!("expected unknown method, got {other:?}"),
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_in_flight_avoids_a_busy_provider() {
    let redis = redis();
    let cfg = config(&redis)
        .balance(clouds::Balance::LeastInFlight)
        .timeout(Duration::from_secs(5));
    let mut servers = Vec::new();
    for name in ["slow", "fast"] {
        let server = Server::start(cfg.clone()).await.expect("server");
        server
            .register("lb.work", move |(ms,): (u64,)| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, Infallible>(name)
            })
            .await
            .expect("register");
        servers.push(server);
    }
    let client = Client::connect(cfg).await.expect("client");
    // Occupy one provider with a long call; every later call goes to the other one.
    let long = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, String>("lb.work", (1_500u64,)).await })
    };
    eventually(
        "the long call is running",
        Duration::from_secs(2),
        || async { servers.iter().any(|s| s.stats().in_flight == 1) },
    )
    .await;
    let busy = if servers[0].stats().in_flight == 1 {
        "slow"
    } else {
        "fast"
    };
    for _ in 0..10 {
        let who: String = client.call("lb.work", (0u64,)).await.expect("call");
        assert_ne!(
            who,
            busy,
            "a call went to the provider that is busy: {:?} {:?}",
            servers[0].stats(),
            servers[1].stats()
        );
    }
    assert_eq!(long.await.expect("task").expect("long call"), busy);
    for server in servers {
        server.shutdown().await.expect("shutdown");
    }
}

/// `EVALSHA` calls Redis has served so far.
fn evalsha_calls(redis: &common::RedisServer) -> u64 {
    let info = redis.command(&["INFO", "commandstats"]).expect("info");
    let text = info.as_text().expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_calls_share_one_registry_lookup() {
    let redis = redis();
    let server = Server::start(config(&redis)).await.expect("server");
    server
        .register("burst.echo", |(n,): (u32,)| async move {
            Ok::<_, Infallible>(n)
        })
        .await
        .expect("register");
    let client = Client::connect(config(&redis)).await.expect("client");
    let before = evalsha_calls(&redis);
    let calls: Vec<_> = (0..200u32)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { client.call::<_, u32>("burst.echo", (n,)).await })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.expect("task").expect("call"), n as u32);
    }
    let lookups = evalsha_calls(&redis) - before;
    // One lookup for the burst; the server's heartbeat may add a beat or two meanwhile.
    assert!(
        lookups <= 4,
        "{lookups} EVALSHA for 200 concurrent first calls"
    );
    server.shutdown().await.expect("shutdown");
}
