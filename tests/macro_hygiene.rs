#![no_implicit_prelude]
//! The code `#[clouds::service]` generates names everything through absolute paths: it compiles
//! without the prelude and next to user items that shadow prelude names.

/// Every prelude name the generated code could trip over, shadowed.
#[allow(dead_code, non_camel_case_types)]
mod shadowed {
    pub(crate) struct Result;
    pub(crate) struct Ok;
    pub(crate) struct Err;
    pub(crate) struct Option;
    pub(crate) struct Some;
    pub(crate) struct None;
    pub(crate) struct Box;
    pub(crate) struct Vec;
    pub(crate) struct String;
    pub(crate) struct Arc;
    pub(crate) struct str;
    pub(crate) struct u32;
    pub(crate) trait Future {}
    pub(crate) trait Send {}
    pub(crate) trait Sync {}
    pub(crate) trait Clone {}
    pub(crate) trait AsRef {}

    #[::clouds::service("hyg")]
    pub(crate) trait Hyg {
        /// Text arguments become `impl AsRef<str>` in the client.
        async fn text(&self, s: ::std::string::String) -> ::std::string::String;
        async fn div(&self, a: i64, b: i64) -> ::core::result::Result<i64, ::std::string::String>;
        async fn ping(&self);
        /// An argument named like the server's internal handle.
        async fn one(&self, inner: u8) -> ::std::vec::Vec<u8>;
        async fn default_body(&self, n: ::core::primitive::u32) -> ::core::primitive::u32 {
            n + 1
        }
        /// Streams, of plain and of `Result` items.
        async fn items(&self, n: u8) -> ::clouds::Streaming<u8>;
        async fn checked(
            &self,
        ) -> ::clouds::Streaming<::core::result::Result<u8, ::std::string::String>>;
    }

    pub(crate) struct Impl;

    impl Hyg for Impl {
        async fn text(&self, s: ::std::string::String) -> ::std::string::String {
            s
        }

        async fn div(&self, a: i64, b: i64) -> ::core::result::Result<i64, ::std::string::String> {
            if b == 0 {
                ::core::result::Result::Err(::std::borrow::ToOwned::to_owned("division by zero"))
            } else {
                ::core::result::Result::Ok(a / b)
            }
        }

        async fn ping(&self) {}

        async fn one(&self, inner: u8) -> ::std::vec::Vec<u8> {
            ::std::vec![inner]
        }

        async fn items(&self, n: u8) -> ::clouds::Streaming<u8> {
            ::clouds::Streaming::iter(0..n)
        }

        async fn checked(
            &self,
        ) -> ::clouds::Streaming<::core::result::Result<u8, ::std::string::String>> {
            ::clouds::Streaming::iter(::std::vec::Vec::new())
        }
    }

    /// Type-checks the client's methods (never run: it needs a provider).
    pub(crate) async fn call(client: &::clouds::Client) {
        let hyg = HygClient::new(client)
            .with_retries(1)
            .with_timeout(::core::time::Duration::from_secs(1));
        let _: ::core::result::Result<::std::string::String, ::clouds::Error> = hyg.text("x").await;
        let _: ::core::result::Result<
            ::core::result::Result<i64, ::std::string::String>,
            ::clouds::Error,
        > = hyg.div(1, 2).await;
        let _: ::core::result::Result<(), ::clouds::Error> = hyg.ping().await;
        let _: ::core::result::Result<::std::vec::Vec<u8>, ::clouds::Error> = hyg.one(1).await;
        let _: ::core::result::Result<::core::primitive::u32, ::clouds::Error> =
            hyg.default_body(1).await;
        let _: ::core::result::Result<::clouds::ItemStream<u8>, ::clouds::Error> =
            hyg.items(3).await;
        let _: ::core::result::Result<
            ::clouds::ItemStream<::core::result::Result<u8, ::std::string::String>>,
            ::clouds::Error,
        > = hyg.checked().await;
    }
}

#[test]
fn server_has_one_route_per_method() {
    let server = shadowed::HygServer::new(shadowed::Impl);
    let routes = ::clouds::Service::routes(::core::clone::Clone::clone(&server));
    ::std::assert_eq!(routes.len(), 7);
    let _ = shadowed::call;
}
