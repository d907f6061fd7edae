#[clouds::service("svc")]
pub trait Svc {
    type Output;
    async fn ping(&self);
}

fn main() {}
