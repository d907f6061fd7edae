#[clouds::service("svc")]
pub trait Svc<T> {
    async fn ping(&self);
}

fn main() {}
