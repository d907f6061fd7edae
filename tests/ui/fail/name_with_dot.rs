#[clouds::service("my.svc")]
pub trait Svc {
    async fn ping(&self);
}

fn main() {}
