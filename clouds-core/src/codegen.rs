//! What `#[clouds::service]` expands to calls. Not a stable API: reach it only through the
//! macro (the facade re-exports it as a hidden module).

use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::{Client, decode_reply};
use crate::envelope::Status;
use crate::error::Error;
use crate::service::Outcome;
use crate::service::Route;
use crate::stream::{Event, Streaming};
use futures_util::StreamExt;

/// The inside of a generated `{Trait}Client`: a client handle with its call options.
#[derive(Clone, Debug)]
pub struct Stub {
    client: Client,
}

impl Stub {
    /// A stub calling through `client`, with its retries and timeout.
    pub fn new(client: &Client) -> Stub {
        Stub {
            client: client.clone(),
        }
    }

    /// See `Client::with_retries`.
    pub fn with_retries(self, retries: u32) -> Stub {
        Stub {
            client: self.client.with_retries(retries),
        }
    }

    /// See `Client::with_timeout`.
    pub fn with_timeout(self, timeout: Duration) -> Stub {
        Stub {
            client: self.client.with_timeout(timeout),
        }
    }

    /// The client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Calls a method whose return value is a plain value.
    ///
    /// Not an `async fn`: it returns the client's future itself, so a call does not carry
    /// one more layer of state (memory per call in flight).
    pub fn call_value<A, T>(
        &self,
        method: &'static str,
        args: &A,
    ) -> impl Future<Output = Result<T, Error>>
    where
        A: Serialize + Sync + ?Sized,
        T: DeserializeOwned,
    {
        self.client.call_ref(method, args)
    }

    /// [`Stub::call_value`] for a method marked `#[clouds(once)]` (see `Client::call_once`).
    pub async fn call_value_once<A, T>(&self, method: &'static str, args: &A) -> Result<T, Error>
    where
        A: Serialize + Sync + ?Sized,
        T: DeserializeOwned,
    {
        self.client.call_as(method, args, true).await
    }

    /// Calls a method returning `Result<T, E>`: its `Err` arrives typed, as `Ok(Err(e))`.
    pub async fn call_result<A, T, E>(
        &self,
        method: &'static str,
        args: &A,
    ) -> Result<Result<T, E>, Error>
    where
        A: Serialize + Sync + ?Sized,
        T: DeserializeOwned,
        E: DeserializeOwned,
    {
        self.result_as(method, args, false).await
    }

    /// [`Stub::call_result`] for a method marked `#[clouds(once)]`.
    pub async fn call_result_once<A, T, E>(
        &self,
        method: &'static str,
        args: &A,
    ) -> Result<Result<T, E>, Error>
    where
        A: Serialize + Sync + ?Sized,
        T: DeserializeOwned,
        E: DeserializeOwned,
    {
        self.result_as(method, args, true).await
    }

    async fn result_as<A, T, E>(
        &self,
        method: &'static str,
        args: &A,
        once: bool,
    ) -> Result<Result<T, E>, Error>
    where
        A: Serialize + Sync + ?Sized,
        T: DeserializeOwned,
        E: DeserializeOwned,
    {
        let (node, reply) = self.client.invoke(method, &args, once).await?;
        if reply.status == Status::AppError {
            return crate::codec::decode_value(&reply.body)
                .map(Err)
                .map_err(|reason| Error::Codec {
                    action: format!("decode the error of {method} from {node}"),
                    reason,
                });
        }
        decode_reply(method, node, reply).map(Ok)
    }
}

impl Stub {
    /// Opens a streaming method whose items are plain values.
    pub async fn open_stream<A, T>(
        &self,
        method: &'static str,
        args: &A,
    ) -> Result<crate::ItemStream<T>, Error>
    where
        A: Serialize + Sync + ?Sized,
        T: DeserializeOwned,
    {
        self.client
            .open_stream_as(method, &args, crate::stream::plain::<T>())
            .await
    }

    /// Opens a streaming method whose items are `Result<T, E>`: an `Err` ends the stream and
    /// arrives typed as its last item.
    pub async fn open_stream_result<A, T, E>(
        &self,
        method: &'static str,
        args: &A,
    ) -> Result<crate::ItemStream<Result<T, E>>, Error>
    where
        A: Serialize + Sync + ?Sized,
        T: DeserializeOwned,
        E: DeserializeOwned,
    {
        self.client
            .open_stream_as(method, &args, crate::stream::results::<T, E>())
            .await
    }
}

/// A route for a streaming method whose items are plain values.
pub fn stream_route<A, F, Fut, T>(name: &'static str, f: F) -> Route
where
    A: DeserializeOwned + Send + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Streaming<T>> + Send + 'static,
    T: Serialize + Send + 'static,
{
    Route::build(name.to_string(), f, stream_outcome::<T>)
}

/// The outcome of a streaming handler: its items, each encoded as it comes.
pub(crate) fn stream_outcome<T: Serialize + Send + 'static>(items: Streaming<T>) -> Outcome {
    Outcome::stream(Box::pin(items.items.map(|item| Event::item(&item))))
}

/// A route for a streaming method whose items are `Result<T, E>`: an `Err` ends the stream as
/// a typed application error.
pub fn stream_result_route<A, F, Fut, T, E>(name: &'static str, f: F) -> Route
where
    A: DeserializeOwned + Send + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Streaming<Result<T, E>>> + Send + 'static,
    T: Serialize + Send + 'static,
    E: Serialize + Send + 'static,
{
    Route::build(name.to_string(), f, |items: Streaming<Result<T, E>>| {
        Outcome::stream(Box::pin(items.items.map(|item| match item {
            Ok(value) => Event::item(&value),
            Err(error) => Event::Fail(Outcome::encoded(Status::AppError, &error)),
        })))
    })
}

/// A route for a method returning a plain value.
pub fn value_route<A, F, Fut, T>(name: &'static str, f: F) -> Route
where
    A: DeserializeOwned + Send + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Serialize + Send + 'static,
{
    Route::build(name.to_string(), f, |value: T| {
        Outcome::encoded(Status::Ok, &value)
    })
}

/// A route for a method returning `Result<T, E>`: `Err` travels as a typed application error.
pub fn result_route<A, F, Fut, T, E>(name: &'static str, f: F) -> Route
where
    A: DeserializeOwned + Send + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Serialize + Send + 'static,
    E: Serialize + Send + 'static,
{
    Route::build(name.to_string(), f, |result: Result<T, E>| match result {
        Ok(value) => Outcome::encoded(Status::Ok, &value),
        Err(error) => Outcome::encoded(Status::AppError, &error),
    })
}
