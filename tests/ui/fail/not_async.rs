#[clouds::service("svc")]
pub trait Svc {
    fn ping(&self) -> u32;
}

fn main() {}
