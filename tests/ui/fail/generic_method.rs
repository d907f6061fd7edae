#[clouds::service("svc")]
pub trait Svc {
    async fn echo<T: serde::Serialize>(&self, value: T) -> u32;
}

fn main() {}
