//! Streaming methods: plain and `Result` items, a full path to `Streaming`, arguments; the
//! client returns an `ItemStream` of `Result<T, clouds::Error>`.

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct LogLine {
    pub n: u64,
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum TailError {
    Gone,
}

#[clouds::service("logs")]
pub trait Logs {
    async fn tail(&self, from: u64) -> clouds::Streaming<LogLine>;
    async fn checked(&self, name: String) -> ::clouds::Streaming<Result<u64, TailError>>;
    async fn none(&self) -> clouds::Streaming<()>;
    async fn plain(&self) -> u8;
}

struct Impl;

impl Logs for Impl {
    async fn tail(&self, from: u64) -> clouds::Streaming<LogLine> {
        clouds::Streaming::new(futures_util::stream::iter(from..).map(|n| LogLine {
            n,
            text: format!("line {n}"),
        }))
    }

    async fn checked(&self, name: String) -> clouds::Streaming<Result<u64, TailError>> {
        let len = name.len() as u64;
        clouds::Streaming::iter([Ok(len), Err(TailError::Gone)])
    }

    async fn none(&self) -> clouds::Streaming<()> {
        clouds::Streaming::iter(std::iter::empty())
    }

    async fn plain(&self) -> u8 {
        1
    }
}

#[allow(dead_code)]
async fn use_it(client: &clouds::Client) -> Result<(), clouds::Error> {
    let logs = LogsClient::new(client);
    let mut tail: clouds::ItemStream<LogLine> = logs.tail(10).await?;
    while let Some(line) = tail.next().await {
        let line: LogLine = line?;
        println!("{} {}", line.n, line.text);
    }
    let mut checked = logs.checked("x").await?;
    if let Some(item) = checked.next().await {
        let _typed: Result<u64, TailError> = item?;
    }
    let _: u8 = logs.plain().await?;
    let _routes = <LogsServer<Impl> as clouds::Service>::routes(LogsServer::new(Impl));
    Ok(())
}

fn main() {}
