#[clouds::service("svc")]
pub trait Svc {
    async fn len(&self, text: &str) -> usize;
}

fn main() {}
