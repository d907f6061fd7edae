#[clouds::service("svc")]
pub trait Svc {
    async fn two(&self) -> clouds::Streaming<u8, u8>;
    async fn none(&self) -> clouds::Streaming;
}

fn main() {}
