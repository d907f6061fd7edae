//! Lists which servers provide which methods, and what each server reports.
//!
//! ```text
//! cargo run --example monitor
//! ```

mod common;

use std::time::SystemTime;

use clouds::Monitor;

#[tokio::main]
async fn main() -> Result<(), clouds::Error> {
    let url = common::redis_url();
    let monitor = match Monitor::connect(common::config(&url)).await {
        Ok(monitor) => monitor,
        Err(clouds::Error::Redis(e)) => common::fail(&format!("{e}\nstart redis-server first")),
        Err(e) => return Err(e),
    };
    let status = monitor.snapshot().await?;
    println!("methods ({}):", status.methods.len());
    for (method, servers) in &status.methods {
        let ids: Vec<&str> = servers.iter().map(|s| s.as_str()).collect();
        println!("  {method}: {}", ids.join(", "));
    }
    println!("servers ({}):", status.servers.len());
    for (id, info) in &status.servers {
        let up = SystemTime::now()
            .duration_since(info.started_at)
            .unwrap_or_default();
        println!(
            "  {id}: host {} pid {}, up {}s, {} in flight, methods {}",
            info.host,
            info.pid,
            up.as_secs(),
            info.in_flight,
            info.methods.join(", ")
        );
    }
    Ok(())
}
