//! A private service in a module: client and server are private too, and nothing warns about the
//! side that goes unused.

mod inner {
    #[clouds::service("private")]
    trait Counter {
        async fn add(&self, n: u64) -> u64;
    }

    struct Fixed;

    impl Counter for Fixed {
        async fn add(&self, n: u64) -> u64 {
            n + 1
        }
    }

    pub(super) fn routes() -> usize {
        clouds::Service::routes(CounterServer::new(Fixed)).len()
    }
}

fn main() {
    assert_eq!(inner::routes(), 1);
}
