//! The frames nodes exchange (protocol version 1, see `docs/protocol.md`).

use bytes::Bytes;

use crate::node_id::NodeId;

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Frame {
    /// A request to run `method`.
    Call(Call),
    /// The answer to a call.
    Reply(Reply),
    /// A free-form message from one node to another.
    Message {
        /// The sender.
        from: NodeId,
        /// The MessagePack body.
        body: Bytes,
    },
    /// A server now provides `methods`.
    Join {
        /// The server.
        node: NodeId,
        /// Methods it provides.
        methods: Vec<String>,
    },
    /// A server is leaving and takes no new calls.
    Leave {
        /// The server.
        node: NodeId,
    },
    /// One item of a stream, to the caller's inbox (`stream.rs`).
    Item {
        /// The id of the Call that opened the stream.
        id: u64,
        /// The item's sequence number: 0, 1, 2, ... in the order sent.
        seq: u64,
        /// The item, MessagePack.
        body: Bytes,
    },
    /// Credit for a stream, to the provider's inbox: it may send the items numbered below
    /// `allow`; `allow` 0 stops the stream.
    Credit {
        /// The id of the Call that opened the stream.
        id: u64,
        /// The caller's node id (stream ids are unique per caller only).
        caller: WireStr,
        /// Items the provider may have sent in all (cumulative), or 0: stop.
        allow: u64,
    },
    /// A stream that is idle but alive, to the caller's inbox.
    KeepAlive {
        /// The id of the Call that opened the stream.
        id: u64,
        /// The sequence number of the next item.
        next: u64,
    },
    /// The caller of call `id` stopped waiting for it (`docs/protocol.md` §3.13): the
    /// provider drops the handler if it still runs, and sends no reply.
    Cancel {
        /// The id of the Call given up.
        id: u64,
        /// The caller's node id, as in the Call's `reply_to`.
        caller: WireStr,
    },
    /// A call, reply or message whose body waits in Redis (`claim.rs`): `frame` has an empty
    /// body until the receiver fetches it.
    Claim {
        /// The frame, with its body left empty.
        frame: Box<Frame>,
        /// Where the body is, and what it is.
        claim: ClaimRef,
    },
}

/// The reference a claim frame carries instead of its body (`docs/protocol.md` §3.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClaimRef {
    /// The random part of the key's name: `<scope>:claim:<token in hex>`.
    pub(crate) token: [u8; 16],
    /// The body's length in bytes.
    pub(crate) len: u64,
    /// SHA-256 of the body.
    pub(crate) digest: [u8; 32],
}

/// A call request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Call {
    /// Chosen by the caller, unique among its calls in flight.
    pub(crate) id: u64,
    /// Full method name, `service.method`.
    pub(crate) method: WireStr,
    /// The caller's node id; the reply goes to its inbox.
    pub(crate) reply_to: WireStr,
    /// Milliseconds the caller still waits for this attempt, counted from publication.
    pub(crate) deadline_ms: u64,
    /// The arguments: one MessagePack array.
    pub(crate) args: Bytes,
    /// The caller's trace context, when it sent one (`docs/protocol.md` §3.1). Boxed: most
    /// calls carry none, and every call's frame holds this field.
    pub(crate) trace: Option<Box<Trace>>,
}

/// The optional trace element of a call: the W3C trace context and the attempt number.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Trace {
    /// The W3C `traceparent` header value, as received (not checked here).
    pub(crate) traceparent: WireStr,
    /// The W3C `tracestate` header value; empty when the caller had none.
    pub(crate) tracestate: WireStr,
    /// The caller's attempt number, from 1.
    pub(crate) attempt: u32,
}

/// A trace element to send with a call (see [`Trace`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TraceRef<'a> {
    pub(crate) traceparent: &'a str,
    pub(crate) tracestate: &'a str,
    pub(crate) attempt: u32,
}

/// Text received in a frame, kept as a slice of the frame's buffer instead of a copy (a call
/// carries two: its method and the caller's id). Checked to be UTF-8 once, when the frame is
/// decoded.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct WireStr(bytes_utils::Str);

impl std::hash::Hash for WireStr {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl WireStr {
    /// `bytes`, if they are UTF-8.
    pub(crate) fn new(bytes: Bytes) -> Option<WireStr> {
        bytes_utils::Str::from_inner(bytes).ok().map(WireStr)
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WireStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for WireStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<&str> for WireStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A call's outcome.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply {
    /// The id of the call answered.
    pub(crate) id: u64,
    /// What happened.
    pub(crate) status: Status,
    /// Status-specific body, MessagePack (empty while `claim` holds it).
    pub(crate) body: Bytes,
    /// Set when the body waits in Redis: the caller fetches it (`claim.rs`). Boxed: every
    /// call's future holds a `Reply`, and claimed ones are rare.
    pub(crate) claim: Option<Box<ClaimRef>>,
}

/// Reply statuses and their wire codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// The handler's return value.
    Ok = 0,
    /// The handler's application error value.
    AppError = 1,
    /// The handler panicked; body: message string.
    Panic = 2,
    /// No such method here; body: method string.
    UnknownMethod = 3,
    /// Arguments did not decode; body: reason string.
    BadArguments = 4,
    /// At the in-flight limit; body: nil. The caller tries another provider.
    Overloaded = 5,
    /// The server is stopping; body: nil. The caller tries another provider.
    ShuttingDown = 6,
    /// The server could not produce a reply; body: reason string.
    ServerError = 7,
    /// The call's arguments travelled as a claim that was gone (expired, or taken) when the
    /// server fetched it, or did not match their digest; body: reason string. The handler
    /// did not run. (A caller whose reply's claim is gone gets the same status locally.)
    ClaimLost = 8,
    /// The method is a stream and its items follow (`stream.rs`); body: nil. A later Reply
    /// with the same id ends the stream.
    Stream = 10,
    /// Not a code of this version (a newer peer); never sent. The decoder replaces the body
    /// with a text naming the code, so the waiting call fails with a clear error instead of
    /// timing out.
    Unrecognized = 255,
}

impl Status {
    pub(crate) fn from_code(code: u64) -> Option<Status> {
        Some(match code {
            0 => Status::Ok,
            1 => Status::AppError,
            2 => Status::Panic,
            3 => Status::UnknownMethod,
            4 => Status::BadArguments,
            5 => Status::Overloaded,
            6 => Status::ShuttingDown,
            7 => Status::ServerError,
            8 => Status::ClaimLost,
            10 => Status::Stream,
            _ => return None,
        })
    }
}
