#[clouds::service("svc")]
pub struct Svc;

fn main() {}
