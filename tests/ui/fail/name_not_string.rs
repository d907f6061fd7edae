#[clouds::service(svc)]
pub trait Svc {
    async fn ping(&self);
}

fn main() {}
