//! The example from the documentation: text, `Result`, zero-argument and default methods.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("division by zero")]
pub struct DivError;

/// Says hello.
#[clouds::service("test")]
pub trait Hello {
    /// Greets someone.
    async fn hello(&self, name: String, msg: String) -> String;
    /// Divides, failing on zero.
    async fn div(&self, a: i64, b: i64) -> Result<i64, DivError>;
    /// Zero arguments, unit return.
    async fn ping(&self);
    /// One argument, default body calling another method.
    async fn twice(&self, n: u32) -> u32 {
        self.ping().await;
        n * 2
    }
}

struct Greeter;

impl Hello for Greeter {
    async fn hello(&self, name: String, msg: String) -> String {
        format!("Hello {name}, {msg}")
    }

    async fn div(&self, a: i64, b: i64) -> Result<i64, DivError> {
        if b == 0 { Err(DivError) } else { Ok(a / b) }
    }

    async fn ping(&self) {}
}

fn assert_service<S: clouds::Service>(server: S) -> usize {
    clouds::Service::routes(server).len()
}

fn assert_send<F: Send>(future: F) -> F {
    future
}

/// The client's methods have the documented signatures, and their futures are `Send`.
async fn call(client: &clouds::Client) {
    let hello = HelloClient::new(client)
        .with_retries(2)
        .with_timeout(Duration::from_secs(1));
    let _: Result<String, clouds::Error> =
        assert_send(hello.hello("Ada", String::from("hi"))).await;
    let _: Result<Result<i64, DivError>, clouds::Error> = assert_send(hello.div(6, 3)).await;
    let _: Result<(), clouds::Error> = assert_send(hello.ping()).await;
    let _: Result<u32, clouds::Error> = assert_send(hello.twice(2)).await;
    let _copy = hello.clone();
    let _ = format!("{hello:?}");
}

#[tokio::main]
async fn main() {
    let server = HelloServer::new(Greeter);
    let _shared = server.clone();
    assert_eq!(assert_service(server), 4);
    assert_eq!(
        assert_service(HelloServer::from_arc(std::sync::Arc::new(Greeter))),
        4
    );

    // The rewritten trait still works locally, default method included.
    assert_eq!(Greeter.hello("a".into(), "b".into()).await, "Hello a, b");
    assert_eq!(Greeter.twice(21).await, 42);
    assert!(Greeter.div(1, 0).await.is_err());

    let _ = call;
}
