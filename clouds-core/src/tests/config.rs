//! Settings that do not fit are refused when a node starts, before it connects.

use super::*;
use crate::testing::Broker;
use crate::{Error, Monitor};

/// Starts each kind of node with `config`: every one must fail with `Error::Config`
/// mentioning `expected`, without connecting.
async fn refused(broker: &Broker, config: Config, expected: &str) {
    let results = [
        Server::start(config.clone()).await.err(),
        Client::connect(config.clone()).await.err(),
        Monitor::connect(config).await.err(),
    ];
    for result in results {
        match result {
            Some(Error::Config(reason)) => {
                assert!(reason.contains(expected), "{expected:?} not in {reason:?}")
            }
            other => panic!("{expected}: expected a config error, got {other:?}"),
        }
    }
    assert!(
        format!("{broker:?}").contains("connections: 0"),
        "{expected}: a node connected: {broker:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn bad_namespaces_are_refused() {
    let broker = Broker::new();
    let too_long = "n".repeat(65);
    for namespace in [
        "",
        "a:b",
        "a b",
        "{a}",
        "a}",
        "tab\t",
        "nl\n",
        too_long.as_str(),
    ] {
        refused(&broker, config(&broker).namespace(namespace), "namespace").await;
    }
}

#[tokio::test(start_paused = true)]
async fn bad_timings_are_refused() {
    let broker = Broker::new();
    let cases = [
        (config(&broker).heartbeat(ms(9)), "heartbeat"),
        (config(&broker).heartbeat(Duration::ZERO), "heartbeat"),
        (config(&broker).heartbeat(ms(100)).ttl(ms(100)), "ttl"),
        (config(&broker).heartbeat(ms(100)).ttl(ms(50)), "ttl"),
        (config(&broker).timeout(Duration::ZERO), "timeout"),
        (
            config(&broker).command_timeout(Duration::ZERO),
            "command_timeout",
        ),
    ];
    for (config, expected) in cases {
        refused(&broker, config, expected).await;
    }
}

#[tokio::test(start_paused = true)]
async fn bad_limits_are_refused() {
    let broker = Broker::new();
    let cases = [
        (config(&broker).max_in_flight(0), "max_in_flight"),
        (config(&broker).max_frame_size(1023), "max_frame_size"),
        (config(&broker).max_frame_size(0), "max_frame_size"),
        (config(&broker).message_buffer(0), "message_buffer"),
        (
            config(&broker).max_bytes_in_flight(0),
            "max_bytes_in_flight",
        ),
    ];
    for (config, expected) in cases {
        refused(&broker, config, expected).await;
    }
}

#[tokio::test(start_paused = true)]
async fn settings_at_the_limits_are_accepted_and_work() {
    let broker = Broker::new();
    let namespace = "n".repeat(64);
    let edge = broker
        .config()
        .namespace(&namespace)
        .heartbeat(ms(10))
        .ttl(ms(11))
        .timeout(ms(1))
        .command_timeout(ms(1))
        .max_in_flight(1)
        .max_frame_size(1024)
        .message_buffer(1)
        .max_bytes_in_flight(1);
    let provider = server(edge.clone()).await;
    answer_name(&provider, "edge.who", "edge").await;
    let caller = client(edge.clone().timeout(ms(100))).await;
    assert_eq!(
        caller
            .call::<_, String>("edge.who", ())
            .await
            .expect("call"),
        "edge"
    );
    // A frame larger than the whole byte budget still goes, alone.
    assert_eq!(
        caller
            .call::<_, String>("edge.who", ())
            .await
            .expect("call"),
        "edge"
    );
    let monitor = Monitor::connect(edge).await.expect("monitor");
    // With a TTL just over the heartbeat, the entry is renewed in time.
    tokio::time::sleep(ms(500)).await;
    assert!(
        monitor
            .snapshot()
            .await
            .expect("snapshot")
            .servers
            .contains_key(provider.id())
    );
    provider.shutdown().await.expect("shutdown");
}

#[test]
fn urls_are_checked_when_the_config_is_built() {
    for url in [
        "nope://x",
        "http://127.0.0.1:6379",
        "",
        "redis://h:notaport",
    ] {
        match Config::from_url(url) {
            Err(Error::Config(_)) => {}
            other => panic!("{url:?}: expected a config error, got {other:?}"),
        }
    }
    let config = Config::from_url("redis://user:secret@10.0.0.5:6380/7").expect("valid");
    assert_eq!(config.get_db(), 7);
    assert_eq!(config.db(2).get_db(), 2);
}

#[test]
fn retryable_errors_are_the_transient_ones() {
    let node = NodeId::from("n");
    let transient = [
        Error::Timeout {
            method: "m".into(),
            after: ms(1),
            attempts: 1,
        },
        Error::NoProvider {
            method: "m".into(),
            attempts: 1,
        },
        Error::Overloaded {
            method: "m".into(),
            attempts: 1,
        },
        Error::Unreachable { node: node.clone() },
        Error::Redis(crate::TransportError::Command {
            command: "PUBLISH",
            reason: "down".into(),
        }),
    ];
    let lasting = [
        Error::Shutdown,
        Error::Config("x".into()),
        Error::Protocol("x".into()),
        Error::UnknownMethod {
            method: "m".into(),
            node: node.clone(),
        },
        Error::BadArguments {
            method: "m".into(),
            node: node.clone(),
            reason: "r".into(),
        },
        Error::Panicked {
            method: "m".into(),
            node,
            message: "p".into(),
        },
        Error::TooLarge {
            what: "w".into(),
            size: 2,
            max: 1,
        },
    ];
    for e in &transient {
        assert!(e.is_retryable(), "{e:?}");
    }
    for e in &lasting {
        assert!(!e.is_retryable(), "{e:?}");
    }
}
