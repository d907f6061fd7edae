// The trait demands `Send` futures, so an implementation that holds an `Rc` across an `.await`
// is rejected where it is written.

use std::rc::Rc;

#[clouds::service("svc")]
pub trait Svc {
    async fn count(&self) -> usize;
}

struct Impl;

impl Svc for Impl {
    async fn count(&self) -> usize {
        let shared = Rc::new(1);
        std::future::ready(()).await;
        *shared
    }
}

fn main() {}
