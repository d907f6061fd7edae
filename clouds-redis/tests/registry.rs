//! The registry scripts against a real redis-server.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clouds_redis::{
    Beat, Delivery, Endpoint, Inbound, Lookup, Registry, Transport, TransportOptions,
};

async fn connect(url: &str) -> Transport {
    let endpoint = Endpoint::parse(url).expect("url");
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

/// A beat of `id` serving `methods` for `ttl`, announcing itself with `join`.
fn beat<'a>(
    id: &'a str,
    ttl: Duration,
    methods: &'a [String],
    fields: &'a [(&'a str, String)],
    join: &[u8],
) -> Beat<'a> {
    Beat {
        id,
        ttl,
        methods,
        fields,
        join: Bytes::copy_from_slice(join),
        force_join: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_beat_older_than_the_entry_is_ignored() {
    let redis = clouds_testkit::RedisServer::start().expect("redis-server");
    let transport = connect(&redis.url_db(3)).await;
    let registry = Registry::new("app:3");
    let ttl = Duration::from_secs(60);
    let newer = methods(&["m.one", "m.two"]);
    let older = methods(&["m.one"]);
    let fields = |list: &[String], generation: u64| {
        vec![
            ("methods", list.join("\n")),
            ("generation", generation.to_string()),
        ]
    };
    let newer_fields = fields(&newer, 2);
    registry
        .heartbeat(&transport, &beat("s1", ttl, &newer, &newer_fields, b"j"))
        .await
        .expect("newer beat");
    // The older list arrives late (it went on another connection): ignored.
    let older_fields = fields(&older, 1);
    registry
        .heartbeat(&transport, &beat("s1", ttl, &older, &older_fields, b"j"))
        .await
        .expect("older beat");
    let servers = registry.servers(&transport).await.expect("servers");
    assert_eq!(servers.len(), 1);
    assert_eq!(field(&servers[0].1, "methods"), Some(&b"m.one\nm.two"[..]));
    assert_eq!(field(&servers[0].1, "generation"), Some(&b"2"[..]));
    // The same generation again (a periodic beat) is written as usual.
    registry
        .heartbeat(&transport, &beat("s1", ttl, &newer, &newer_fields, b"j"))
        .await
        .expect("same generation");
    // A beat without a generation (a server written from an older spec) always writes.
    let bare = [("methods", "m.one".to_string())];
    registry
        .heartbeat(&transport, &beat("s1", ttl, &older, &bare, b"j"))
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
        .deregister(&transport, "s1", &newer, Bytes::from_static(b"l"))
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

/// The next frame on `inbound`, within 10 s.
async fn next_frame(inbound: &mut Inbound) -> Bytes {
    match tokio::time::timeout(Duration::from_secs(10), inbound.recv()).await {
        Ok(Some(Delivery::Frame { payload, .. })) => payload,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// Asserts nothing was published on `channel` since the last frame read: a marker published
/// now is the next frame (Redis delivers one connection's frames in order).
async fn nothing_published(transport: &Transport, inbound: &mut Inbound, channel: &str) {
    let marker = Bytes::from_static(b"(marker)");
    transport
        .publish(channel.into(), marker.clone())
        .await
        .expect("publish the marker");
    assert_eq!(
        next_frame(inbound).await,
        marker,
        "something else was published first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_are_published_by_the_scripts_with_the_change() {
    let redis = clouds_testkit::RedisServer::start().expect("redis-server");
    let transport = connect(&redis.url_db(3)).await;
    let registry = Registry::new("app:3");
    let channel = registry.events_channel();
    assert_eq!(channel, "app:3:events");
    let mut inbound = transport.inbound();
    transport.subscribe(&channel).await.expect("subscribe");
    let ttl = Duration::from_secs(60);
    // Binary-safe: the frames are published byte for byte.
    let join: &[u8] = &[0x01, 0x93, 0x03, 0x00, 0xff, b'\r', b'\n', 0x80];
    let leave: &[u8] = &[0x01, 0x92, 0x04, 0x00, b'\r', b'\n'];
    let one = methods(&["m.a"]);
    let two = methods(&["m.a", "m.b"]);

    // A new server that serves nothing yet: no join.
    registry
        .heartbeat(&transport, &beat("s1", ttl, &[], &[], join))
        .await
        .expect("beat");
    nothing_published(&transport, &mut inbound, &channel).await;
    // It now provides m.a: joined.
    registry
        .heartbeat(&transport, &beat("s1", ttl, &one, &[], join))
        .await
        .expect("beat");
    assert_eq!(&next_frame(&mut inbound).await[..], join);
    // A renewal adds nothing: no join.
    registry
        .heartbeat(&transport, &beat("s1", ttl, &one, &[], join))
        .await
        .expect("beat");
    nothing_published(&transport, &mut inbound, &channel).await;
    // One more method: joined again.
    registry
        .heartbeat(&transport, &beat("s1", ttl, &two, &[], join))
        .await
        .expect("beat");
    assert_eq!(&next_frame(&mut inbound).await[..], join);
    // Forced (after a reconnect): joined although nothing was added.
    let mut forced = beat("s1", ttl, &two, &[], join);
    forced.force_join = true;
    registry.heartbeat(&transport, &forced).await.expect("beat");
    assert_eq!(&next_frame(&mut inbound).await[..], join);
    // Forced but overtaken by a newer method list: ignored, and still announced.
    let newer = [("generation", "5".to_string())];
    registry
        .heartbeat(&transport, &beat("s1", ttl, &two, &newer, join))
        .await
        .expect("beat");
    nothing_published(&transport, &mut inbound, &channel).await;
    let older = [("generation", "4".to_string())];
    let mut late = beat("s1", ttl, &one, &older, b"older join");
    late.force_join = true;
    registry.heartbeat(&transport, &late).await.expect("beat");
    assert_eq!(&next_frame(&mut inbound).await[..], b"older join");

    // Leaving is announced, also when there was nothing left to remove.
    for _ in 0..2 {
        registry
            .deregister(&transport, "s1", &two, Bytes::copy_from_slice(leave))
            .await
            .expect("deregister");
        assert_eq!(&next_frame(&mut inbound).await[..], leave);
    }
    nothing_published(&transport, &mut inbound, &channel).await;
    transport.close().await;
}

/// The one lookup of `method` by a caller holding `known`.
async fn since(
    registry: &Registry,
    transport: &Transport,
    method: &str,
    known: Option<u64>,
) -> Lookup {
    let mut found = registry
        .providers_since(transport, &[(method, known)])
        .await
        .expect("providers_since");
    assert_eq!(found.len(), 1);
    found.remove(0)
}

/// The generation and the sorted providers of a changed lookup.
fn changed(found: Lookup) -> (u64, Vec<String>) {
    match found {
        Lookup::Changed {
            generation,
            mut providers,
        } => {
            providers.sort();
            (generation, providers)
        }
        Lookup::Unchanged => panic!("expected a changed list"),
    }
}

/// How many times Redis ran ZRANGE so far (scripts included).
fn zranges(redis: &clouds_testkit::RedisServer) -> u64 {
    let info = redis
        .command(&["INFO", "commandstats"])
        .expect("INFO")
        .as_text()
        .expect("text");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_zrange:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_holding_the_current_generation_is_told_nothing_changed() {
    let redis = clouds_testkit::RedisServer::start().expect("redis-server");
    // db 0, so that the test's own commands (DEL below) see the same keys.
    let transport = connect(&redis.url()).await;
    let registry = Registry::new("app:0");
    let ttl = Duration::from_secs(60);
    let m = methods(&["m.a"]);
    let s = |ids: &[&str]| ids.iter().map(|i| i.to_string()).collect::<Vec<_>>();

    // Nobody provides it: generation 0, and then unchanged.
    assert_eq!(
        since(&registry, &transport, "m.a", None).await,
        Lookup::Changed {
            generation: 0,
            providers: vec![]
        }
    );
    assert_eq!(
        since(&registry, &transport, "m.a", Some(0)).await,
        Lookup::Unchanged
    );

    // A join: a new list with a new generation.
    registry
        .heartbeat(&transport, &beat("s1", ttl, &m, &[], b"j"))
        .await
        .expect("beat");
    let (g1, list) = changed(since(&registry, &transport, "m.a", Some(0)).await);
    assert_eq!(list, s(&["s1"]));
    assert_ne!(g1, 0);
    // Unchanged, also after a renewal (which moves no provider in or out), without a ZRANGE.
    registry
        .heartbeat(&transport, &beat("s1", ttl, &m, &[], b"j"))
        .await
        .expect("renewal");
    let before = zranges(&redis);
    for _ in 0..3 {
        assert_eq!(
            since(&registry, &transport, "m.a", Some(g1)).await,
            Lookup::Unchanged
        );
    }
    assert_eq!(zranges(&redis), before, "an unchanged lookup reads no list");
    // A caller holding no generation (or another one) gets the list.
    assert_eq!(
        changed(since(&registry, &transport, "m.a", None).await),
        (g1, s(&["s1"]))
    );
    assert_eq!(zranges(&redis), before + 1, "a changed one reads it once");
    assert_eq!(
        changed(since(&registry, &transport, "m.a", Some(g1 + 1)).await),
        (g1, s(&["s1"]))
    );

    // Another join, then a leave: each a new generation.
    registry
        .heartbeat(&transport, &beat("s2", ttl, &m, &[], b"j"))
        .await
        .expect("beat");
    let (g2, list) = changed(since(&registry, &transport, "m.a", Some(g1)).await);
    assert_eq!(list, s(&["s1", "s2"]));
    registry
        .deregister(&transport, "s2", &m, Bytes::from_static(b"l"))
        .await
        .expect("deregister");
    let (g3, list) = changed(since(&registry, &transport, "m.a", Some(g2)).await);
    assert_eq!(list, s(&["s1"]));
    assert!(g1 < g2 && g2 < g3, "{g1} {g2} {g3}");

    // Expiry, seen by callers that only ask for changes: the lookup purges and moves the
    // generation on, for every caller holding the old one.
    registry
        .heartbeat(
            &transport,
            &beat("s3", Duration::from_millis(300), &m, &[], b"j"),
        )
        .await
        .expect("beat");
    let (g4, list) = changed(since(&registry, &transport, "m.a", Some(g3)).await);
    assert_eq!(list, s(&["s1", "s3"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let (g5, list) = loop {
        match since(&registry, &transport, "m.a", Some(g4)).await {
            Lookup::Unchanged => {
                assert!(Instant::now() < deadline, "s3 never expired");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            found => break changed(found),
        }
    };
    assert_eq!(list, s(&["s1"]));
    assert!(g5 > g4);
    assert_eq!(
        changed(since(&registry, &transport, "m.a", Some(g4)).await),
        (g5, s(&["s1"])),
        "a second caller sees the expiry too"
    );

    // The method's set vanishes without a script (as when its key expires): nobody provides
    // it, whatever the generations hash still says.
    redis
        .command(&["DEL", &registry.method_key("m.a")])
        .expect("DEL");
    assert_eq!(
        since(&registry, &transport, "m.a", Some(g5)).await,
        Lookup::Changed {
            generation: 0,
            providers: vec![]
        }
    );
    registry
        .heartbeat(&transport, &beat("s1", ttl, &m, &[], b"j"))
        .await
        .expect("beat");
    let (g6, list) = changed(since(&registry, &transport, "m.a", Some(0)).await);
    assert_eq!(list, s(&["s1"]));
    assert!(g6 > g5, "a generation is never used twice: {g6} after {g5}");

    // The generations are lost (a flush, an expired hash): they start again above any
    // value they had, from Redis's clock.
    redis
        .command(&["DEL", &registry.generations_key()])
        .expect("DEL");
    let (g7, list) = changed(since(&registry, &transport, "m.a", Some(g6)).await);
    assert_eq!(list, s(&["s1"]));
    assert!(g7 > g6, "{g7} after {g6}");
    assert_eq!(
        since(&registry, &transport, "m.a", Some(g7)).await,
        Lookup::Unchanged
    );

    // The full lookup purges too, and moves the generation on when it does.
    registry
        .heartbeat(
            &transport,
            &beat("s4", Duration::from_millis(100), &m, &[], b"j"),
        )
        .await
        .expect("beat");
    let (g8, _) = changed(since(&registry, &transport, "m.a", Some(g7)).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    while registry.providers(&transport, &m).await.expect("providers") != [s(&["s1"])] {
        assert!(Instant::now() < deadline, "s4 never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        changed(since(&registry, &transport, "m.a", Some(g8)).await).1,
        s(&["s1"])
    );

    // Once nobody provides anything, no generation is left behind.
    registry
        .deregister(&transport, "s1", &m, Bytes::from_static(b"l"))
        .await
        .expect("deregister");
    assert_eq!(
        redis
            .command(&["EXISTS", &registry.generations_key()])
            .expect("EXISTS")
            .as_int(),
        Some(0)
    );
    assert_eq!(
        changed(since(&registry, &transport, "m.a", Some(g8)).await),
        (0, vec![])
    );
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_answers_each_method_in_the_order_asked() {
    let redis = clouds_testkit::RedisServer::start().expect("redis-server");
    let transport = connect(&redis.url_db(3)).await;
    let registry = Registry::new("app:3");
    let ttl = Duration::from_secs(60);
    let both = methods(&["m.a", "m.b"]);
    registry
        .heartbeat(&transport, &beat("s1", ttl, &both, &[], b"j"))
        .await
        .expect("beat");
    let found = registry
        .providers_since(
            &transport,
            &[("m.a", None), ("m.b", None), ("m.none", None)],
        )
        .await
        .expect("lookup");
    let [a, b, none] = &found[..] else {
        panic!("three answers expected: {found:?}")
    };
    let (ga, _) = changed(a.clone());
    let (gb, _) = changed(b.clone());
    assert_eq!(changed(none.clone()), (0, vec![]));
    // Only m.b changes.
    registry
        .heartbeat(&transport, &beat("s2", ttl, &methods(&["m.b"]), &[], b"j"))
        .await
        .expect("beat");
    let found = registry
        .providers_since(
            &transport,
            &[("m.a", Some(ga)), ("m.b", Some(gb)), ("m.none", Some(0))],
        )
        .await
        .expect("lookup");
    assert_eq!(found[0], Lookup::Unchanged);
    assert_eq!(changed(found[1].clone()).1, ["s1", "s2"]);
    assert_eq!(found[2], Lookup::Unchanged);
    assert!(
        registry
            .providers_since(&transport, &[])
            .await
            .expect("nothing asked")
            .is_empty()
    );
    transport.close().await;
}

/// The restricted user of `docs/protocol.md` §2.1 can run every registry script (and their
/// announcements): Redis applies the ACL to the commands a script runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_user_can_run_every_script() {
    let spec = include_str!("../../docs/protocol.md");
    let setuser = spec
        .lines()
        .find(|l| l.starts_with("ACL SETUSER clouds "))
        .expect("protocol.md §2.1 has the ACL SETUSER line");
    let redis = clouds_testkit::RedisServer::start().expect("redis-server");
    let args: Vec<&str> = setuser.split_whitespace().collect();
    let reply = redis.command(&args).expect("ACL SETUSER");
    assert!(!reply.is_error(), "{reply:?}");
    let url = format!("redis://clouds:secret@127.0.0.1:{}/3", redis.port());
    let transport = connect(&url).await;
    let registry = Registry::new("clouds:3");
    let mut inbound = transport.inbound();
    transport
        .subscribe(&registry.events_channel())
        .await
        .expect("subscribe");
    let m = methods(&["m.a"]);
    let fields = [
        ("methods", "m.a".to_string()),
        ("generation", "1".to_string()),
    ];
    let ttl = Duration::from_secs(60);
    registry
        .heartbeat(&transport, &beat("s1", ttl, &m, &fields, b"join"))
        .await
        .expect("beat");
    assert_eq!(&next_frame(&mut inbound).await[..], b"join");
    // Loaded again after a flush (SCRIPT LOAD is allowed too).
    assert!(
        !redis
            .command(&["SCRIPT", "FLUSH"])
            .expect("flush")
            .is_error()
    );
    let mut forced = beat("s1", ttl, &m, &fields, b"again");
    forced.force_join = true;
    registry.heartbeat(&transport, &forced).await.expect("beat");
    assert_eq!(&next_frame(&mut inbound).await[..], b"again");
    let (g, _) = changed(since(&registry, &transport, "m.a", None).await);
    assert_eq!(
        since(&registry, &transport, "m.a", Some(g)).await,
        Lookup::Unchanged
    );
    assert_eq!(
        registry.providers(&transport, &m).await.expect("providers"),
        [["s1".to_string()]]
    );
    assert_eq!(
        registry.servers(&transport).await.expect("servers").len(),
        1
    );
    registry
        .deregister(&transport, "s1", &m, Bytes::from_static(b"leave"))
        .await
        .expect("deregister");
    assert_eq!(&next_frame(&mut inbound).await[..], b"leave");
    let log = redis.command(&["ACL", "LOG"]).expect("ACL LOG");
    assert_eq!(log.as_str_vec(), Some(vec![]), "denied: {log:?}");
    transport.close().await;
}
