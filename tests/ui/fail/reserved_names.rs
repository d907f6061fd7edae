#[clouds::service("svc")]
pub trait Svc {
    async fn new(&self) -> u32;
    async fn with_retries(&self, retries: u32);
}

fn main() {}
