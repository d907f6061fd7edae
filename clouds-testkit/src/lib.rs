//! Throwaway `redis-server` processes, and the child-process harness, for clouds' tests,
//! examples and benchmarks.
//!
//! [`RedisServer::start`] launches a private `redis-server` on a free loopback
//! port with persistence disabled and a fresh temporary working directory. The
//! process is killed and reaped when the [`RedisServer`] is dropped, including
//! when a test panics (drop runs during unwinding).
//!
//! The server binary is located by [`redis_server_path`]: the `REDIS_SERVER`
//! environment variable if set, otherwise `redis-server` on `PATH`.
//!
//! ```
//! use clouds_testkit::RedisServer;
//!
//! let server = RedisServer::start()?;
//! server.command(&["SET", "greeting", "hello"])?;
//! let reply = server.command(&["GET", "greeting"])?;
//! assert_eq!(reply.as_text().as_deref(), Some("hello"));
//! println!("connect your client to {}", server.url());
//! # Ok::<(), clouds_testkit::TestkitError>(())
//! ```
//!
//! Any other process a test or benchmark starts (an example binary, a provider, the bench
//! re-executing itself) runs as a [`ChildProcess`]: its output is captured, waits for a
//! line of it have a deadline and errors quote it, and it is killed and reaped on drop.
//!
//! ```
//! use clouds_testkit::ChildProcess;
//! use std::process::Command;
//! use std::time::Duration;
//!
//! let mut child = ChildProcess::spawn(
//!     Command::new("sh").args(["-c", "echo serving; exec sleep 60"]),
//! )?;
//! child.wait_for_line("serving", Duration::from_secs(10))?;
//! child.terminate(Duration::from_secs(10))?;
//! # Ok::<(), clouds_testkit::ChildError>(())
//! ```
//!
//! Only std is used; the raw RESP2 client behind [`RedisServer::command`] is
//! deliberately minimal and meant for poking Redis from tests, not for
//! production traffic.
//!
//! # Layout
//!
//! - `server.rs`: [`RedisServer`] (launching on a free port, readiness, stop, restart,
//!   clean-up) and [`redis_server_path`].
//! - `process.rs`: [`ChildProcess`], the one harness for child processes (spawn, wait for a
//!   line, signal, stop, kill on drop), [`output_of`], and its [`ChildError`].
//! - `resp.rs`: the raw RESP2 client: [`RespValue`], the connection behind
//!   [`RedisServer::command`], and [`ping`].
//! - `error.rs`: [`TestkitError`].

mod error;
mod process;
mod resp;
mod server;

pub use error::TestkitError;
pub use process::{ChildError, ChildErrorKind, ChildProcess, Signal, SpawnOptions, output_of};
pub use resp::{RespValue, ping};
pub use server::{RedisServer, redis_server_path};
