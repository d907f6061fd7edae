//! Calls the `test` service over and over and shows which server answered each call.
//!
//! ```text
//! cargo run --example hello_client -- [CALLS] [INTERVAL_MS]     # default: 10 calls, 200 ms apart
//! ```

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use clouds::Client;
use common::HelloClient;

#[tokio::main]
async fn main() -> Result<(), clouds::Error> {
    let mut args = std::env::args().skip(1);
    let calls: u32 = args.next().map_or(10, |a| {
        a.parse()
            .unwrap_or_else(|_| common::fail("CALLS must be a number"))
    });
    let interval: u64 = args.next().map_or(200, |a| {
        a.parse()
            .unwrap_or_else(|_| common::fail("INTERVAL_MS must be a number"))
    });
    let url = common::redis_url();
    let client = match Client::connect(common::config(&url)).await {
        Ok(client) => client,
        Err(clouds::Error::Redis(e)) => {
            common::fail(&format!("{e}\nstart redis-server and a hello_server first"))
        }
        Err(e) => return Err(e),
    };
    // Up to 5 retries on timeout, overload or no provider.
    let hello = HelloClient::new(&client).with_retries(5);
    let mut by_server: BTreeMap<String, u32> = BTreeMap::new();
    let mut failed = 0;
    for i in 0..calls {
        match hello.hello("Glen", format!("call {i}")).await {
            Ok(reply) => {
                println!("{reply}");
                let server = reply
                    .rsplit("(from ")
                    .next()
                    .unwrap_or("?")
                    .trim_end_matches(')');
                *by_server.entry(server.to_string()).or_default() += 1;
            }
            Err(e) => {
                println!("call {i} failed: {e}");
                failed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(interval)).await;
    }
    println!("{} ok, {failed} failed", calls - failed);
    for (server, n) in &by_server {
        println!("  {server}: {n} calls");
    }
    Ok(())
}
