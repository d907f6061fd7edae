//! Argument and return shapes: `String` paths, `mut` bindings, aliases of `Result`, paths ending
//! in `Result`, supertraits, raw identifiers, an argument named `inner`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Item {
    pub id: u32,
}

type Alias<T> = std::result::Result<T, String>;

#[clouds::service("shapes")]
pub trait Shapes: Send + Sync + 'static {
    async fn full_paths(&self, a: std::string::String, b: ::std::string::String) -> usize;
    async fn by_value(&self, items: Vec<Item>, map: HashMap<String, u8>) -> Option<Item>;
    async fn alias(&self, inner: u8) -> Alias<u8>;
    async fn pathed(&self) -> std::result::Result<(), String>;
    async fn r#type(&self, r#in: (u8, String)) -> [u8; 4];
    async fn cow(&self, text: std::borrow::Cow<'static, str>) -> String;
    /// A `mut` binding is only allowed with a body; the client takes the value all the same.
    async fn last(&self, mut items: Vec<u8>) -> Option<u8> {
        items.pop()
    }
}

struct Impl;

impl Shapes for Impl {
    async fn full_paths(&self, a: String, b: String) -> usize {
        a.len() + b.len()
    }

    async fn by_value(&self, mut items: Vec<Item>, _map: HashMap<String, u8>) -> Option<Item> {
        items.pop()
    }

    async fn alias(&self, inner: u8) -> Alias<u8> {
        Ok(inner)
    }

    // An implementor may also write the desugared form.
    fn pathed(&self) -> impl std::future::Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }

    async fn r#type(&self, r#in: (u8, String)) -> [u8; 4] {
        [r#in.0; 4]
    }

    async fn cow(&self, text: std::borrow::Cow<'static, str>) -> String {
        text.into_owned()
    }
}

async fn call(client: &clouds::Client) {
    let shapes = ShapesClient::new(client);
    // `String` arguments take anything that is `AsRef<str>`.
    let _: Result<usize, clouds::Error> = shapes.full_paths("a", &String::new()).await;
    // Other arguments are taken by value with their declared type.
    let _: Result<Option<Item>, clouds::Error> =
        shapes.by_value(vec![Item { id: 1 }], HashMap::new()).await;
    // A one-argument alias is a plain value: its error is not split out.
    let _: Result<Alias<u8>, clouds::Error> = shapes.alias(1).await;
    let _: Result<Result<(), String>, clouds::Error> = shapes.pathed().await;
    let _: Result<[u8; 4], clouds::Error> = shapes.r#type((1, String::new())).await;
    let _: Result<String, clouds::Error> = shapes.cow("x".into()).await;
    let _: Result<Option<u8>, clouds::Error> = shapes.last(vec![1]).await;
}

fn main() {
    assert_eq!(clouds::Service::routes(ShapesServer::new(Impl)).len(), 7);
    let _ = call;
}
