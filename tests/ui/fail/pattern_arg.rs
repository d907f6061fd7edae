#[clouds::service("svc")]
pub trait Svc {
    async fn add(&self, (a, b): (u32, u32)) -> u32 {
        a + b
    }
    async fn skip(&self, _: u32);
}

fn main() {}
