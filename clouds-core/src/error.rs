//! The one error type of the public API.

use std::time::Duration;

use crate::node_id::NodeId;

/// Everything that can go wrong in clouds.
///
/// Calls return `Result<T, clouds::Error>`; match on the variant to tell a slow provider
/// ([`Error::Timeout`]) from a missing one ([`Error::NoProvider`]), a failed handler
/// ([`Error::Panicked`], [`Error::Remote`]) or Redis itself ([`Error::Redis`]).
///
/// ```
/// use std::time::Duration;
/// let e = clouds_core::Error::Timeout {
///     method: "test.hello".into(),
///     after: Duration::from_secs(6),
///     attempts: 3,
/// };
/// assert!(e.to_string().contains("test.hello"));
/// assert!(e.is_retryable());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No reply arrived within the timeout, on every attempt.
    #[error(
        "call to {method} timed out after {after:?} ({attempts} attempt(s)); the providers may be slow or gone: raise the timeout or the retries"
    )]
    Timeout {
        /// The method called.
        method: String,
        /// Time spent on the call in all.
        after: Duration,
        /// How many times it was sent.
        attempts: u32,
    },
    /// No live provider serves the method.
    #[error(
        "no provider serves {method} ({attempts} attempt(s)); is a server for it running on the same Redis, db and namespace?"
    )]
    NoProvider {
        /// The method called.
        method: String,
        /// How many times a provider was looked for.
        attempts: u32,
    },
    /// Every provider tried was at its in-flight limit.
    #[error(
        "every provider of {method} tried was overloaded ({attempts} attempt(s)); add providers or raise max_in_flight"
    )]
    Overloaded {
        /// The method called.
        method: String,
        /// How many providers were tried.
        attempts: u32,
    },
    /// The handler returned an application error that the caller did not ask for typed
    /// (a dynamic [`Client::call`](crate::Client::call)); typed stubs return it as `Ok(Err(e))`.
    #[error("{0}")]
    Remote(RemoteError),
    /// The handler panicked; the server lives on.
    #[error("the handler of {method} on {node} panicked: {message}")]
    Panicked {
        /// The method called.
        method: String,
        /// The provider it ran on.
        node: NodeId,
        /// The panic message.
        message: String,
    },
    /// The provider does not serve that method (a stale registry entry or a name mismatch).
    #[error("{node} does not serve {method}")]
    UnknownMethod {
        /// The method called.
        method: String,
        /// The provider that answered.
        node: NodeId,
    },
    /// The provider could not decode the arguments into the types its handler takes.
    #[error("{node} could not decode the arguments of {method}: {reason}")]
    BadArguments {
        /// The method called.
        method: String,
        /// The provider that answered.
        node: NodeId,
        /// What did not fit (wrong count or type).
        reason: String,
    },
    /// The provider failed to produce a reply (it could not encode the result, the result or
    /// the call was larger than its `max_body_size`, or a large result could not be stored).
    #[error("{node} failed to reply to {method}: {reason}")]
    Server {
        /// The method called.
        method: String,
        /// The provider that answered.
        node: NodeId,
        /// What went wrong there.
        reason: String,
    },
    /// A large body that travelled as a claim (stored in Redis, see
    /// [`Config::claim_threshold`](crate::Config::claim_threshold)) was gone when its
    /// receiver fetched it (it expired: the receiver took longer than the deadline to get to
    /// it, or Redis lost it), or did not match its digest. For the arguments of a call, the
    /// handler did not run; for its result, it did.
    #[error("the {what} of {method} (via {node}) could not be fetched from Redis: {reason}")]
    ClaimLost {
        /// The method called.
        method: String,
        /// The provider.
        node: NodeId,
        /// "arguments" or "result".
        what: &'static str,
        /// What happened to it.
        reason: String,
    },
    /// Nobody listens on that node's inbox: it is gone, or never existed.
    #[error("node {node} is unreachable: nobody listens on its inbox")]
    Unreachable {
        /// The node addressed.
        node: NodeId,
    },
    /// A value could not be encoded, or a reply could not be decoded into the expected type.
    #[error("could not {action}: {reason}")]
    Codec {
        /// What was being done, e.g. "decode the reply of test.hello".
        action: String,
        /// The serializer's complaint.
        reason: String,
    },
    /// A call or message would exceed the largest body allowed
    /// ([`Config::max_body_size`](crate::Config::max_body_size)); nothing was sent.
    #[error(
        "{what} is {size} bytes, over the max_body_size of {max} bytes; nothing was sent (raise Config::max_body_size, at most 512 MiB, or send less)"
    )]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Talking to Redis failed: it is down, unreachable, or answered with an error.
    #[error(transparent)]
    Redis(#[from] crate::transport::TransportError),
    /// The node has been shut down; it sends and serves nothing more.
    #[error("this node has been shut down")]
    Shutdown,
    /// The configuration is invalid (a bad URL, namespace, or settings that do not fit together).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A method name cannot be used: malformed, or already registered on this server.
    #[error("invalid method {method:?}: {reason}")]
    InvalidMethod {
        /// The name given.
        method: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The operating system refused something the node needs (such as its heartbeat thread).
    #[error("could not {action}: {reason}")]
    Io {
        /// What was being done.
        action: String,
        /// The system's error.
        reason: String,
    },
    /// A peer sent a reply that breaks the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A stream ([`ItemStream`](crate::ItemStream)) broke off before its end: its provider
    /// went silent, shut down, or the items arrived out of order. Items already delivered
    /// were in order and complete up to here; nothing is retried automatically once items
    /// have been delivered (open the stream again, from where it broke off, if that makes
    /// sense for the method).
    #[error("the stream of {method} from {node} broke off: {reason}")]
    StreamBroken {
        /// The streaming method.
        method: String,
        /// Its provider.
        node: NodeId,
        /// What happened.
        reason: StreamBreak,
    },
}

/// Why a stream broke off ([`Error::StreamBroken`]).
///
/// ```
/// let why = clouds_core::StreamBreak::Gap { expected: 4, got: 6 };
/// assert!(why.to_string().contains("expected item 4"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamBreak {
    /// Nothing (no item, no keep-alive) arrived from the provider for the idle timeout
    /// ([`Config::stream_idle_timeout`](crate::Config::stream_idle_timeout)): it died, or
    /// Redis lost the connection.
    #[error(
        "nothing arrived for {after:?} (the provider died, or is unreachable); raise Config::stream_idle_timeout if it is merely slow to send keep-alives"
    )]
    Idle {
        /// The idle timeout that passed.
        after: std::time::Duration,
    },
    /// An item arrived out of sequence: one was lost (`got` > `expected`) or repeated
    /// (`got` < `expected`). It was not passed on.
    #[error("expected item {expected}, got item {got}: an item was lost or repeated")]
    Gap {
        /// The sequence number due.
        expected: u64,
        /// The sequence number that arrived.
        got: u64,
    },
    /// The provider ended the stream after `sent` items, but only `received` arrived.
    #[error("the provider sent {sent} items but {received} arrived")]
    Missing {
        /// Items the provider says it sent.
        sent: u64,
        /// Items that arrived.
        received: u64,
    },
    /// The provider sent an item beyond the credit granted to it (a protocol violation).
    #[error("item {seq} arrived beyond the credit granted ({granted} items)")]
    OverCredit {
        /// The item's sequence number.
        seq: u64,
        /// Items granted so far.
        granted: u64,
    },
    /// The provider is shutting down and ended the stream early.
    #[error("the provider is shutting down")]
    ShuttingDown,
}

impl Error {
    /// Whether trying the call again later might succeed (timeouts, missing or overloaded
    /// providers, Redis trouble), as opposed to errors that would repeat.
    ///
    /// ```
    /// let e = clouds_core::Error::Shutdown;
    /// assert!(!e.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. }
                | Error::NoProvider { .. }
                | Error::Overloaded { .. }
                | Error::Unreachable { .. }
                | Error::Redis(_)
        )
    }
}

/// An application error returned by a remote handler, as its MessagePack bytes.
///
/// ```
/// # fn demo(e: clouds_core::Error) {
/// if let clouds_core::Error::Remote(remote) = e {
///     println!("{} failed: {}", remote.method(), remote.message().unwrap_or("(structured)"));
///     let typed: Result<String, _> = remote.decode::<String>();
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RemoteError {
    pub(crate) method: String,
    pub(crate) node: NodeId,
    pub(crate) payload: bytes::Bytes,
}

impl RemoteError {
    /// The method that failed.
    ///
    /// ```
    /// # fn demo(e: clouds_core::RemoteError) {
    /// println!("{} failed", e.method());
    /// # }
    /// ```
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The provider it failed on.
    ///
    /// ```
    /// # fn demo(e: clouds_core::RemoteError) {
    /// println!("on {}", e.node());
    /// # }
    /// ```
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The error as text, when the handler sent text (dynamic handlers send their error's
    /// `Display`; typed ones send the error value itself).
    ///
    /// ```
    /// # fn demo(e: clouds_core::RemoteError) {
    /// println!("{}", e.message().unwrap_or("(a structured error)"));
    /// # }
    /// ```
    pub fn message(&self) -> Option<&str> {
        let mut bytes = &self.payload[..];
        let len = rmp::decode::read_str_len(&mut bytes).ok()? as usize;
        std::str::from_utf8(bytes.get(..len)?).ok()
    }

    /// Decodes the error value into `E`.
    ///
    /// ```
    /// # #[derive(serde::Deserialize)] struct MyError { code: u32 }
    /// # fn demo(e: clouds_core::RemoteError) -> Result<(), clouds_core::Error> {
    /// let typed: MyError = e.decode()?;
    /// # Ok(()) }
    /// ```
    pub fn decode<E: serde::de::DeserializeOwned>(&self) -> Result<E, Error> {
        crate::codec::decode_value(&self.payload).map_err(|reason| Error::Codec {
            action: format!("decode the error of {}", self.method),
            reason,
        })
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.message() {
            Some(message) => write!(f, "{} failed on {}: {message}", self.method, self.node),
            None => write!(
                f,
                "{} failed on {} with an application error ({} bytes; decode it with RemoteError::decode)",
                self.method,
                self.node,
                self.payload.len()
            ),
        }
    }
}
