#[clouds::service]
pub trait Svc {
    async fn ping(&self);
}

fn main() {}
