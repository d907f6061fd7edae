//! What a server runs: named handlers that take MessagePack arguments and produce a reply.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, ReplyBody};
use crate::envelope::Status;

/// A set of methods a [`Server`](crate::Server) can serve.
///
/// `#[clouds::service]` implements it for the generated `{Trait}Server`; there is no need to
/// implement it by hand. For single functions, use
/// [`Server::register`](crate::Server::register).
///
/// ```
/// # struct MyService;
/// impl clouds_core::Service for MyService {
///     fn routes(self) -> Vec<clouds_core::Route> {
///         vec![clouds_core::Route::new("demo.add", |(a, b): (i64, i64)| async move {
///             Ok::<_, std::convert::Infallible>(a + b)
///         })]
///     }
/// }
/// ```
pub trait Service: Send + 'static {
    /// The methods, each a full wire name and its handler.
    fn routes(self) -> Vec<Route>;
}

/// Routes built by hand, served as they are (for example a [`Route::once`]).
///
/// ```
/// # async fn demo(server: clouds_core::Server) -> Result<(), clouds_core::Error> {
/// let charge = clouds_core::Route::new("pay.charge", |(cents,): (u64,)| async move {
///     Ok::<_, std::convert::Infallible>(cents)
/// });
/// server.serve(vec![charge.once()]).await?;
/// # Ok(()) }
/// ```
impl Service for Vec<Route> {
    fn routes(self) -> Vec<Route> {
        self
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a handler produced, ready for the wire.
pub(crate) struct Outcome {
    pub(crate) status: Status,
    pub(crate) body: ReplyBody,
    /// A streaming method's items (status `Stream`): the node serves them (`stream.rs`).
    pub(crate) stream: Option<crate::stream::Events>,
}

impl Outcome {
    fn text(status: Status, text: &str) -> Outcome {
        Outcome {
            status,
            body: ReplyBody::text(text),
            stream: None,
        }
    }

    /// An outcome with a nil body.
    pub(crate) fn empty(status: Status) -> Outcome {
        Outcome {
            status,
            body: ReplyBody::from_encoded(codec::NIL),
            stream: None,
        }
    }

    /// A stream of items, served after a `Stream` reply.
    pub(crate) fn stream(events: crate::stream::Events) -> Outcome {
        Outcome {
            stream: Some(events),
            ..Outcome::empty(Status::Stream)
        }
    }

    pub(crate) fn encoded<T: Serialize + ?Sized>(status: Status, value: &T) -> Outcome {
        match ReplyBody::encode(value) {
            Ok(body) => Outcome {
                status,
                body,
                stream: None,
            },
            Err(reason) => Outcome::text(
                Status::ServerError,
                &format!("could not encode the result: {reason}"),
            ),
        }
    }
}

pub(crate) type Handler = Arc<dyn Fn(Bytes) -> BoxFuture<Outcome> + Send + Sync>;

/// One method: its full wire name and its handler.
///
/// ```
/// let route = clouds_core::Route::new("demo.echo", |(s,): (String,)| async move {
///     Ok::<_, std::convert::Infallible>(s)
/// });
/// assert_eq!(route.name(), "demo.echo");
/// ```
#[derive(Clone)]
pub struct Route {
    pub(crate) name: String,
    pub(crate) handler: Handler,
    /// Runs at most once per call across retries ([`Route::once`]).
    pub(crate) once: bool,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("once", &self.once)
            .finish()
    }
}

impl Route {
    /// A method from a function taking its arguments as a tuple and returning
    /// `Result<T, E>`. An `Err` reaches callers as [`Error::Remote`](crate::Error::Remote)
    /// carrying the error's `Display` text.
    pub fn new<A, F, Fut, T, E>(name: impl Into<String>, f: F) -> Route
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Serialize + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        Route::build(name.into(), f, |result: Result<T, E>| match result {
            Ok(value) => Outcome::encoded(Status::Ok, &value),
            Err(error) => Outcome::encoded(Status::AppError, &error.to_string()),
        })
    }

    /// A streaming method from a function taking its arguments as a tuple and returning a
    /// [`Streaming`](crate::Streaming) of items (see [`Server::register_stream`](crate::Server::register_stream)).
    ///
    /// ```
    /// let route = clouds_core::Route::stream("count.up", |(n,): (u64,)| async move {
    ///     clouds_core::Streaming::iter(0..n)
    /// });
    /// assert_eq!(route.name(), "count.up");
    /// ```
    pub fn stream<A, F, Fut, T>(name: impl Into<String>, f: F) -> Route
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = crate::Streaming<T>> + Send + 'static,
        T: Serialize + Send + 'static,
    {
        Route::build(name.into(), f, crate::codegen::stream_outcome::<T>)
    }

    /// This route, run **at most once per call**, however often the caller retries: the
    /// server records each call in Redis before running it, and a retry of a call that ran
    /// (or still runs) gets the first run's result instead of running it again
    /// (`docs/protocol.md` §6.5). Callers ask for it with
    /// [`Client::call_once`](crate::Client::call_once); the `#[clouds(once)]` mark on a trait
    /// method does both sides. A streaming route ([`Route::stream`]) gains nothing from it: a
    /// record cannot replay items, so its record is freed as soon as the stream opens (the
    /// macro refuses the mark on a streaming method).
    ///
    /// ```
    /// let route = clouds_core::Route::new("pay.charge", |(cents,): (u64,)| async move {
    ///     Ok::<_, std::convert::Infallible>(cents)
    /// })
    /// .once();
    /// assert!(route.is_once());
    /// ```
    pub fn once(mut self) -> Route {
        self.once = true;
        self
    }

    /// Whether this route runs at most once per call ([`Route::once`]).
    ///
    /// ```
    /// let route = clouds_core::Route::new("t.id", |(x,): (u8,)| async move { Ok::<_, String>(x) });
    /// assert!(!route.is_once());
    /// ```
    pub fn is_once(&self) -> bool {
        self.once
    }

    /// The full wire name, `service.method`.
    ///
    /// ```
    /// let route = clouds_core::Route::new("t.id", |(x,): (u8,)| async move { Ok::<_, String>(x) });
    /// assert_eq!(route.name(), "t.id");
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Decodes the arguments, runs `f`, turns its output into a reply with `finish`. A panic
    /// anywhere in the handler becomes a panic reply instead of unwinding into the server.
    pub(crate) fn build<A, F, Fut, R>(name: String, f: F, finish: fn(R) -> Outcome) -> Route
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: Send + 'static,
    {
        let handler: Handler = Arc::new(move |args: Bytes| -> BoxFuture<Outcome> {
            let args: A = match codec::decode_args(&args) {
                Ok(args) => args,
                Err(reason) => {
                    return Box::pin(std::future::ready(Outcome::text(
                        Status::BadArguments,
                        &reason,
                    )));
                }
            };
            // Calling `f` may itself panic (before the future exists), so both steps run
            // under catch_unwind.
            let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| f(args))) {
                Ok(fut) => fut,
                Err(panic) => {
                    return Box::pin(std::future::ready(Outcome::text(
                        Status::Panic,
                        &panic_message(&*panic),
                    )));
                }
            };
            Box::pin(AssertUnwindSafe(fut).catch_unwind().map(move |r| match r {
                Ok(output) => finish(output),
                Err(panic) => Outcome::text(Status::Panic, &panic_message(&*panic)),
            }))
        });
        Route {
            name,
            handler,
            once: false,
        }
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::{result_route, value_route};

    async fn run(route: &Route, args: Vec<u8>) -> Outcome {
        (route.handler)(Bytes::from(args)).await
    }

    #[tokio::test]
    async fn decodes_runs_and_encodes() {
        let route = value_route("t.add", |(a, b): (i64, i64)| async move { a + b });
        let out = run(&route, codec::encode_args(&(2, 3)).expect("args")).await;
        assert_eq!(out.status, Status::Ok);
        assert_eq!(codec::decode_value::<i64>(out.body.as_bytes()), Ok(5));
    }

    #[tokio::test]
    async fn bad_arguments_are_reported() {
        let route = value_route("t.add", |(a, b): (i64, i64)| async move { a + b });
        let out = run(&route, codec::encode_args(&("x",)).expect("args")).await;
        assert_eq!(out.status, Status::BadArguments);
        assert!(codec::decode_value::<String>(out.body.as_bytes()).is_ok());
    }

    #[tokio::test]
    async fn panics_become_replies() {
        let route = value_route("t.boom", |(): ()| async move {
            if true {
                panic!("boom");
            }
        });
        let out = run(&route, codec::encode_args(&()).expect("args")).await;
        assert_eq!(out.status, Status::Panic);
        assert_eq!(
            codec::decode_value::<String>(out.body.as_bytes()).as_deref(),
            Ok("boom")
        );
    }

    #[tokio::test]
    async fn typed_errors_travel_as_values() {
        let route = result_route("t.div", |(a, b): (i64, i64)| async move {
            if b == 0 { Err(("div", 0u8)) } else { Ok(a / b) }
        });
        let out = run(&route, codec::encode_args(&(1, 0)).expect("args")).await;
        assert_eq!(out.status, Status::AppError);
        assert_eq!(
            codec::decode_value::<(String, u8)>(out.body.as_bytes()),
            Ok(("div".into(), 0))
        );
    }
}
