#[clouds::service("pay")]
pub trait Pay {
    /// A name that would promise the wrong thing.
    #[clouds(idempotent)]
    async fn charge(&self, cents: u64) -> String;
    #[clouds(exactly_once)]
    async fn refund(&self, cents: u64) -> String;
    #[clouds(once)]
    #[clouds(once)]
    async fn twice(&self);
    #[clouds(once = true)]
    async fn valued(&self);
    #[clouds]
    async fn bare(&self);
    #[clouds(once, retries)]
    async fn two(&self);
    /// A stream's items cannot be replayed from a record.
    #[clouds(once)]
    async fn tail(&self) -> clouds::Streaming<u64>;
}

fn main() {}
