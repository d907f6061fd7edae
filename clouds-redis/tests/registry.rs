//! The registry scripts against a real redis-server.

use std::time::Duration;

use clouds_redis::{Endpoint, Registry, Transport, TransportOptions};

async fn connect(redis: &clouds_testkit::RedisServer) -> Transport {
    let endpoint = Endpoint::parse(&redis.url_db(3)).expect("url");
    Transport::connect(&endpoint, &TransportOptions::default())
        .await
        .expect("connect")
}

fn methods(list: &[&str]) -> Vec<String> {
    list.iter().map(|m| m.to_string()).collect()
}

fn field<'a>(fields: &'a [(bytes::Bytes, bytes::Bytes)], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| &k[..] == name.as_bytes())
        .map(|(_, v)| &v[..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_beat_older_than_the_entry_is_ignored() {
    let redis = clouds_testkit::RedisServer::start().expect("redis-server");
    let transport = connect(&redis).await;
    let registry = Registry::new("app:3");
    let ttl = Duration::from_secs(60);
    let newer = methods(&["m.one", "m.two"]);
    let older = methods(&["m.one"]);
    let beat = |list: &[String], generation: u64| {
        let fields = vec![
            ("methods", list.join("\n")),
            ("generation", generation.to_string()),
        ];
        (list.to_vec(), fields)
    };
    let (list, fields) = beat(&newer, 2);
    registry
        .heartbeat(&transport, "s1", ttl, &list, &fields)
        .await
        .expect("newer beat");
    // The older list arrives late (it went on another connection): ignored.
    let (list, fields) = beat(&older, 1);
    registry
        .heartbeat(&transport, "s1", ttl, &list, &fields)
        .await
        .expect("older beat");
    let servers = registry.servers(&transport).await.expect("servers");
    assert_eq!(servers.len(), 1);
    assert_eq!(field(&servers[0].1, "methods"), Some(&b"m.one\nm.two"[..]));
    assert_eq!(field(&servers[0].1, "generation"), Some(&b"2"[..]));
    // The same generation again (a periodic beat) is written as usual.
    let (list, fields) = beat(&newer, 2);
    registry
        .heartbeat(&transport, "s1", ttl, &list, &fields)
        .await
        .expect("same generation");
    // A beat without a generation (a server written from an older spec) always writes.
    registry
        .heartbeat(
            &transport,
            "s1",
            ttl,
            &older,
            &[("methods", "m.one".into())],
        )
        .await
        .expect("beat without generation");
    let servers = registry.servers(&transport).await.expect("servers");
    assert_eq!(field(&servers[0].1, "methods"), Some(&b"m.one"[..]));
    assert_eq!(
        registry
            .providers(&transport, &methods(&["m.one", "m.two"]))
            .await
            .expect("providers"),
        vec![vec!["s1".to_string()], vec!["s1".to_string()]]
    );
    registry
        .deregister(&transport, "s1", &newer)
        .await
        .expect("deregister");
    assert!(
        registry
            .servers(&transport)
            .await
            .expect("servers")
            .is_empty()
    );
    transport.close().await;
}
