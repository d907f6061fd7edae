#[clouds::service("svc")]
pub trait Svc {
    async fn make(seed: u32) -> u32;
}

fn main() {}
