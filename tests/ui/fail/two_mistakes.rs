// Two mistakes, two errors: nothing else is reported, not even for code that uses the trait.

#[clouds::service("svc")]
pub trait Svc {
    fn ping(&self);
    async fn len(&self, text: &str) -> usize;
    async fn fine(&self, n: u32) -> u32;
}

struct Impl;

impl Svc for Impl {
    fn ping(&self) {}
    async fn len(&self, text: &str) -> usize {
        text.len()
    }
    async fn fine(&self, n: u32) -> u32 {
        n
    }
}

fn main() {}
