//! A service without methods is valid and serves no routes.

#[clouds::service("empty")]
pub trait Empty {}

struct Nothing;

impl Empty for Nothing {}

fn main() {
    assert!(clouds::Service::routes(EmptyServer::new(Nothing)).is_empty());
}
