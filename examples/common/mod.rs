//! Shared by the examples: the `Hello` service and finding a Redis to talk to.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

/// The example service: `test.hello` and `test.div`.
#[clouds::service("test")]
pub trait Hello {
    /// Greets someone.
    async fn hello(&self, name: String, msg: String) -> String;
    /// Divides `a` by `b`; dividing by zero is an application error.
    async fn div(&self, a: i64, b: i64) -> Result<i64, DivError>;
}

/// What `div` returns when asked to divide by zero.
#[derive(Debug, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("division by zero")]
pub struct DivError;

/// The Redis URL to use: `$REDIS_URL` (a `redis://` server or a `redis-cluster://` cluster), or
/// `redis://127.0.0.1:6379/3` (db 3).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/3".to_string())
}

/// The example configuration for `url`.
pub fn config(url: &str) -> clouds::Config {
    match clouds::Config::from_url(url) {
        Ok(config) => config
            .heartbeat(Duration::from_secs(2))
            .timeout(Duration::from_secs(2)),
        Err(e) => fail(&e.to_string()),
    }
}

/// Prints `message` and exits with status 1.
pub fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => fail(&format!("cannot listen for SIGTERM: {e}")),
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
