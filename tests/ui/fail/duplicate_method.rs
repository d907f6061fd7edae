#[clouds::service("svc")]
pub trait Svc {
    async fn ping(&self);
    async fn ping(&self, n: u32);
}

fn main() {}
