//! A method marked `#[clouds(once)]` beside unmarked ones, with docs and other attributes kept.

#[clouds::service("pay")]
pub trait Pay {
    /// Charges a card; retries never charge twice.
    #[clouds(once)]
    async fn charge(&self, card: String, cents: u64) -> Result<String, String>;
    #[clouds(once)]
    #[deprecated = "use charge"]
    async fn legacy(&self, cents: u64) -> u64;
    /// Not marked: retries may run it again.
    async fn balance(&self) -> u64;
}

struct Impl;

#[allow(deprecated)]
impl Pay for Impl {
    async fn charge(&self, card: String, cents: u64) -> Result<String, String> {
        Ok(format!("{card}:{cents}"))
    }
    async fn legacy(&self, cents: u64) -> u64 {
        cents
    }
    async fn balance(&self) -> u64 {
        0
    }
}

fn main() {
    let routes = clouds::Service::routes(PayServer::new(Impl));
    let once: Vec<(&str, bool)> = routes.iter().map(|r| (r.name(), r.is_once())).collect();
    assert_eq!(
        once,
        [("pay.charge", true), ("pay.legacy", true), ("pay.balance", false)]
    );
    let _ = |client: &clouds::Client| {
        let pay = PayClient::new(client);
        async move { pay.charge("visa", 100).await }
    };
}
