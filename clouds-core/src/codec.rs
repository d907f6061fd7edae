//! Frames to bytes and back (protocol version 1), and values to MessagePack and back.
//!
//! A frame is one version byte followed by one MessagePack array whose first element is the
//! frame kind and whose last element is the body (arguments, result, message). The body is
//! written once, by serde, and copied in as it is; decoding hands it out as a slice of the
//! received buffer, so a frame is never serialized twice.
//!
//! Nothing here panics on input: every malformed frame becomes a [`DecodeError`].

use bytes::{Buf, Bytes};
use rmp::Marker;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::{Call, ClaimRef, Frame, Reply, Status, Trace, TraceRef, WireStr};
use crate::node_id::{MAX_NODE_ID_LEN, NodeId};

/// The protocol version this build speaks; the first byte of every frame.
pub(crate) const VERSION: u8 = 1;

const KIND_CALL: u8 = 0;
const KIND_REPLY: u8 = 1;
const KIND_MESSAGE: u8 = 2;
const KIND_JOIN: u8 = 3;
const KIND_LEAVE: u8 = 4;
const KIND_ITEM: u8 = 10;
const KIND_CREDIT: u8 = 11;
const KIND_KEEPALIVE: u8 = 12;
/// Kinds 5, 6 and 7: a Call, Reply or Message whose body is a claim reference (`claim.rs`).
const CLAIMED: u8 = 5;

/// Longest method name accepted from the wire.
const MAX_METHOD_LEN: usize = 256;
/// Longest `traceparent` a call carries (W3C version 00 takes 55 bytes; later versions may
/// append fields).
pub(crate) const MAX_TRACEPARENT_LEN: usize = 256;
/// Longest `tracestate` a call carries; a longer one is not sent (W3C lets a hop drop it).
pub(crate) const MAX_TRACESTATE_LEN: usize = 1024;
/// Most methods one join announcement may list.
const MAX_JOIN_METHODS: u32 = 65_536;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("empty frame")]
    Empty,
    #[error("protocol version {0} is not supported (this node speaks {VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u64),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn malformed(what: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed(what.to_string())
}

// Writes into a Vec cannot fail; rmp's signatures still return Result.
fn put_array_len(buf: &mut Vec<u8>, len: u32) {
    let _ = rmp::encode::write_array_len(buf, len);
}
fn put_uint(buf: &mut Vec<u8>, v: u64) {
    let _ = rmp::encode::write_uint(buf, v);
}
fn put_str(buf: &mut Vec<u8>, s: &str) {
    let _ = rmp::encode::write_str(buf, s);
}

/// Call arguments: anything serde can write as a MessagePack array. A trait object, so the
/// retry loop that encodes each attempt's frame is compiled once, not per argument type.
pub(crate) trait Args {
    /// Appends the arguments to `buf` (see [`write_args`]).
    fn write_to(&self, buf: &mut Vec<u8>) -> Result<(), String>;
}

impl<A: Serialize + ?Sized> Args for A {
    fn write_to(&self, buf: &mut Vec<u8>) -> Result<(), String> {
        write_args(buf, self)
    }
}

/// Encodes a call, serialising the arguments straight into the frame (no separate encoded
/// copy of them; small frames are written in a per-thread buffer and copied out once, see
/// [`exact_frame`]). Fails only if the arguments cannot be encoded as a MessagePack array.
#[cfg(test)]
pub(crate) fn encode_call(
    id: u64,
    method: &str,
    reply_to: &str,
    deadline_ms: u64,
    args: &dyn Args,
) -> Result<Vec<u8>, String> {
    exact_frame(|buf| write_call(buf, id, method, reply_to, deadline_ms, None, args))
}

/// [`encode_call`], ready to send: the frame is preceded in its buffer by [`SEAL_ROOM`] bytes,
/// where a signed frame's envelope is written without copying the frame
/// ([`Sealer::seal_owned`](crate::signing::Sealer::seal_owned)); unsigned, they are skipped.
pub(crate) fn encode_call_framed(
    id: u64,
    method: &str,
    reply_to: &str,
    deadline_ms: u64,
    trace: Option<TraceRef<'_>>,
    args: &dyn Args,
) -> Result<Bytes, String> {
    let buf = exact_frame(|buf| {
        buf.resize(SEAL_ROOM, 0);
        write_call(buf, id, method, reply_to, deadline_ms, trace, args)
    })?;
    // `advance`, not `slice`: slicing clones, and a clone costs `Bytes` an allocation.
    let mut frame = Bytes::from(buf);
    frame.advance(SEAL_ROOM);
    Ok(frame)
}

fn write_call(
    buf: &mut Vec<u8>,
    id: u64,
    method: &str,
    reply_to: &str,
    deadline_ms: u64,
    trace: Option<TraceRef<'_>>,
    args: &dyn Args,
) -> Result<(), String> {
    buf.push(VERSION);
    // The trace element, when there is one, goes before the arguments, which stay last (a
    // body is always the rest of the frame). None: the 6 elements of every version-1 peer.
    let trace =
        trace.filter(|t| !t.traceparent.is_empty() && t.traceparent.len() <= MAX_TRACEPARENT_LEN);
    put_array_len(buf, if trace.is_some() { 7 } else { 6 });
    put_uint(buf, KIND_CALL.into());
    put_uint(buf, id);
    put_str(buf, method);
    put_str(buf, reply_to);
    put_uint(buf, deadline_ms);
    if let Some(trace) = trace {
        put_array_len(buf, 3);
        put_str(buf, trace.traceparent);
        let state = if trace.tracestate.len() <= MAX_TRACESTATE_LEN {
            trace.tracestate
        } else {
            ""
        };
        put_str(buf, state);
        put_uint(buf, trace.attempt.into());
    }
    args.write_to(buf)
}

/// Bytes kept free in front of call and reply frames, for the envelope of a signed frame
/// (`signing.rs`): 61 bytes more per frame in memory, and no second buffer and copy of each
/// frame when frames are signed.
pub(crate) const SEAL_ROOM: usize = crate::signing::OVERHEAD;

/// Frames up to this size are written in a per-thread scratch buffer and copied out at their
/// exact length; larger ones keep the buffer they were written in.
const SCRATCH_KEEP: usize = 8 * 1024;

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `write` on an empty buffer and returns what it wrote, in an allocation of exactly its
/// length when it is small.
///
/// Why exact: `Bytes::from(Vec)` allocates a second, shared header when the `Vec` has spare
/// capacity, and fred frees both on whichever thread writes the frame to Redis. Frees from
/// other threads are where glibc's arena locks contend under load (BENCHMARKS.md), so a frame
/// costs one allocation, not two. A frame over [`SCRATCH_KEEP`] is handed out in the buffer
/// it was written in: one more small allocation does not matter beside its size.
fn exact_frame<E>(write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Result<Vec<u8>, E> {
    // Out of the cell while in use: a `Serialize` impl that encodes a frame itself finds the
    // cell empty and works in a buffer of its own.
    let mut buf = SCRATCH.try_with(|cell| cell.take()).unwrap_or_default();
    buf.clear();
    let frame = write(&mut buf).map(|()| {
        if buf.len() <= SCRATCH_KEEP {
            buf.as_slice().to_vec()
        } else {
            std::mem::take(&mut buf)
        }
    });
    if buf.capacity() <= SCRATCH_KEEP {
        let _ = SCRATCH.try_with(|cell| cell.set(buf));
    }
    frame
}

/// Encodes a reply; `body` is an already-encoded MessagePack value.
pub(crate) fn encode_reply(id: u64, status: Status, body: &[u8]) -> Bytes {
    ReplyBody::from_encoded(body).into_frame(id, status)
}

/// Most bytes a reply's header takes: version, array length, kind, id (up to 9) and status.
const REPLY_HEADER: usize = 13;
/// Bytes in front of a reply body: its header's, and [`SEAL_ROOM`] before that.
const REPLY_HEADER_ROOM: usize = SEAL_ROOM + REPLY_HEADER;

/// A reply body, encoded after room for the frame header, so that the reply frame is made
/// around it without copying it.
#[derive(Debug)]
pub(crate) struct ReplyBody(Vec<u8>);

impl ReplyBody {
    /// Encodes `value` as [`encode_value`] does.
    pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<ReplyBody, String> {
        exact_frame(|buf| {
            buf.resize(REPLY_HEADER_ROOM, 0);
            rmp_serde::encode::write_named(buf, value).map_err(|e| e.to_string())
        })
        .map(ReplyBody)
    }

    /// A text (an error's reason, a method name).
    pub(crate) fn text(text: &str) -> ReplyBody {
        ReplyBody::encode(text).unwrap_or_else(|_| ReplyBody::from_encoded(NIL))
    }

    /// A body that is already MessagePack.
    pub(crate) fn from_encoded(body: &[u8]) -> ReplyBody {
        let mut buf = Vec::with_capacity(REPLY_HEADER_ROOM + body.len());
        buf.resize(REPLY_HEADER_ROOM, 0);
        buf.extend_from_slice(body);
        ReplyBody(buf)
    }

    /// The encoded body.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0[REPLY_HEADER_ROOM..]
    }

    /// The length of the frame [`ReplyBody::into_frame`] makes, at most.
    pub(crate) fn frame_len(&self) -> usize {
        self.0.len() - SEAL_ROOM
    }

    /// The reply frame: the header is written into the room in front of the body (and
    /// [`SEAL_ROOM`] bytes at least stay free in front of the header).
    pub(crate) fn into_frame(self, id: u64, status: Status) -> Bytes {
        let mut header = [0u8; REPLY_HEADER];
        let mut room = &mut header[1..];
        // The room fits the longest header, so these writes cannot fail.
        let _ = rmp::encode::write_array_len(&mut room, 4);
        let _ = rmp::encode::write_uint(&mut room, KIND_REPLY.into());
        let _ = rmp::encode::write_uint(&mut room, id);
        let _ = rmp::encode::write_uint(&mut room, status as u64);
        let len = REPLY_HEADER - room.len();
        header[0] = VERSION;
        let start = REPLY_HEADER_ROOM - len;
        let mut buf = self.0;
        buf[start..REPLY_HEADER_ROOM].copy_from_slice(&header[..len]);
        // `advance`, not `slice`: slicing clones, and a clone costs `Bytes` an allocation.
        let mut frame = Bytes::from(buf);
        frame.advance(start);
        frame
    }
}

/// A frame's buffer with room for `capacity` bytes, begun with its header: the version, an
/// array of `elements` (the kind included) and the kind.
fn start_frame(kind: u8, elements: u32, capacity: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(capacity);
    buf.push(VERSION);
    put_array_len(&mut buf, elements);
    put_uint(&mut buf, kind.into());
    buf
}

/// Encodes a node message; `body` is an already-encoded MessagePack value.
pub(crate) fn encode_message(from: &str, body: &[u8]) -> Vec<u8> {
    let mut buf = start_frame(KIND_MESSAGE, 3, 8 + from.len() + body.len());
    put_str(&mut buf, from);
    buf.extend_from_slice(body);
    buf
}

/// Encodes a join announcement.
pub(crate) fn encode_join(node: &str, methods: &[String]) -> Vec<u8> {
    let mut buf = start_frame(
        KIND_JOIN,
        3,
        16 + node.len() + methods.iter().map(|m| m.len() + 2).sum::<usize>(),
    );
    put_str(&mut buf, node);
    put_array_len(&mut buf, methods.len() as u32);
    for method in methods {
        put_str(&mut buf, method);
    }
    buf
}

/// Encodes a leave announcement.
pub(crate) fn encode_leave(node: &str) -> Vec<u8> {
    let mut buf = start_frame(KIND_LEAVE, 2, 8 + node.len());
    put_str(&mut buf, node);
    buf
}

/// Encodes one item of a stream; `body` is an already-encoded MessagePack value.
pub(crate) fn encode_item(id: u64, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut buf = start_frame(KIND_ITEM, 4, 20 + body.len());
    put_uint(&mut buf, id);
    put_uint(&mut buf, seq);
    buf.extend_from_slice(body);
    buf
}

/// Encodes a stream's credit (`allow` 0: stop the stream).
pub(crate) fn encode_credit(id: u64, caller: &str, allow: u64) -> Vec<u8> {
    let mut buf = start_frame(KIND_CREDIT, 4, 24 + caller.len());
    put_uint(&mut buf, id);
    put_str(&mut buf, caller);
    put_uint(&mut buf, allow);
    buf
}

/// Encodes a stream's keep-alive.
pub(crate) fn encode_keepalive(id: u64, next: u64) -> Vec<u8> {
    let mut buf = start_frame(KIND_KEEPALIVE, 3, 20);
    put_uint(&mut buf, id);
    put_uint(&mut buf, next);
    buf
}

/// The kind of a cancel frame: a caller gave up on a call (`docs/protocol.md` §3.13).
const KIND_CANCEL: u8 = 9;

/// Encodes a cancel: the caller `caller` no longer waits for its call `id`.
pub(crate) fn encode_cancel(id: u64, caller: &str) -> Vec<u8> {
    let mut buf = start_frame(KIND_CANCEL, 3, 16 + caller.len());
    put_uint(&mut buf, id);
    put_str(&mut buf, caller);
    buf
}

/// The kind of a batch frame: several frames for one channel in one (`docs/protocol.md` §3.12).
const KIND_BATCH: u8 = 8;

/// Longest batch frame a node builds or accepts, in bytes (before signing): 64 KiB. A frame
/// that does not fit beside others goes alone, as itself.
pub(crate) const BATCH_MAX: usize = 64 * 1024;

/// Most bytes a batch frame's header takes: version, array length (up to 5), kind.
pub(crate) const BATCH_HEADER: usize = 7;

/// The bytes `frame` takes as an entry of a batch: its length prefix (a MessagePack bin
/// header) and itself.
pub(crate) fn batch_entry_len(frame: usize) -> usize {
    frame
        + match frame {
            0..=0xff => 2,
            0x100..=0xffff => 3,
            _ => 5,
        }
}

/// Encodes a batch frame of `frames` (each one complete frame of today's kinds, for the same
/// channel): `[version, [8, bin frame, bin frame, ...]]`.
pub(crate) fn encode_batch<'a>(frames: impl ExactSizeIterator<Item = &'a [u8]> + Clone) -> Bytes {
    let len = BATCH_HEADER
        + frames
            .clone()
            .map(|f| batch_entry_len(f.len()))
            .sum::<usize>();
    let mut buf = Vec::with_capacity(len);
    buf.push(VERSION);
    put_array_len(
        &mut buf,
        u32::try_from(frames.len() + 1).unwrap_or(u32::MAX),
    );
    put_uint(&mut buf, KIND_BATCH.into());
    for frame in frames {
        let _ = rmp::encode::write_bin(&mut buf, frame);
    }
    Bytes::from(buf)
}

/// The entries of a batch frame, each a slice of `frame`: `None` if `frame` is not a batch
/// (decode it with [`decode`]), an error if it is a malformed one. Entries are not checked
/// here: each is decoded as a frame of its own (so a batch inside a batch is refused there).
pub(crate) fn split_batch(frame: &Bytes) -> Option<Result<Vec<Bytes>, DecodeError>> {
    let (&version, mut rest) = frame.split_first()?;
    if version != VERSION {
        return None;
    }
    let len = rmp::decode::read_array_len(&mut rest).ok()?;
    // The kind is a positive fixint in every frame this build writes; anything else is not
    // a batch (and `decode` says what is wrong with it).
    if rest.first() != Some(&KIND_BATCH) {
        return None;
    }
    rest = &rest[1..];
    Some((|| {
        if len < 2 {
            return Err(malformed("batch has no entries"));
        }
        // At most one entry per two bytes of the frame, whatever the header claims.
        let mut entries = Vec::with_capacity((len as usize - 1).min(rest.len() / 2));
        for _ in 1..len {
            let n = rmp::decode::read_bin_len(&mut rest)
                .map_err(|e| malformed(format!("batch entry: {e}")))? as usize;
            if rest.len() < n {
                return Err(malformed("batch entry is truncated"));
            }
            let start = frame.len() - rest.len();
            entries.push(frame.slice(start..start + n));
            rest = &rest[n..];
        }
        trailing(rest)?;
        Ok(entries)
    })())
}

/// Most elements a Call may have: its 6, the trace element and up to 8 later extension
/// elements that this version skips (§3.1, §11).
const CALL_MAX_ELEMENTS: u32 = 15;

/// A cursor over a frame that remembers the whole buffer, so the body can be handed out as a
/// zero-copy slice.
struct Reader<'a> {
    frame: &'a Bytes,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn uint(&mut self, what: &str) -> Result<u64, DecodeError> {
        rmp::decode::read_int(&mut self.rest).map_err(|e| malformed(format!("{what}: {e}")))
    }

    fn str(&mut self, what: &str, max: usize) -> Result<&'a str, DecodeError> {
        let len = rmp::decode::read_str_len(&mut self.rest)
            .map_err(|e| malformed(format!("{what}: {e}")))? as usize;
        if len > max {
            return Err(malformed(format!("{what} is {len} bytes, over {max}")));
        }
        let bytes = self
            .rest
            .get(..len)
            .ok_or_else(|| malformed(format!("{what} is truncated")))?;
        self.rest = &self.rest[len..];
        std::str::from_utf8(bytes).map_err(|_| malformed(format!("{what} is not UTF-8")))
    }

    /// A string as a slice of the frame, not a copy.
    fn wire_str(&mut self, what: &str, max: usize) -> Result<WireStr, DecodeError> {
        let len = rmp::decode::read_str_len(&mut self.rest)
            .map_err(|e| malformed(format!("{what}: {e}")))? as usize;
        if len > max {
            return Err(malformed(format!("{what} is {len} bytes, over {max}")));
        }
        if self.rest.len() < len {
            return Err(malformed(format!("{what} is truncated")));
        }
        let start = self.frame.len() - self.rest.len();
        self.rest = &self.rest[len..];
        WireStr::new(self.frame.slice(start..start + len))
            .ok_or_else(|| malformed(format!("{what} is not UTF-8")))
    }

    fn node(&mut self, what: &str) -> Result<NodeId, DecodeError> {
        let s = self.str(what, MAX_NODE_ID_LEN)?;
        if s.is_empty() {
            return Err(malformed(format!("{what} is empty")));
        }
        Ok(NodeId::from(s))
    }

    /// The rest of the frame: the body, which must be present.
    fn body(self, what: &str) -> Result<Bytes, DecodeError> {
        if self.rest.is_empty() {
            return Err(malformed(format!("{what} is missing")));
        }
        let start = self.frame.len() - self.rest.len();
        Ok(self.frame.slice(start..))
    }

    /// Steps over one MessagePack value of any type (an extension element this version does
    /// not know).
    fn skip(&mut self, what: &str) -> Result<(), DecodeError> {
        let len = value_len(self.rest).map_err(|e| malformed(format!("{what}: {e}")))?;
        self.rest = &self.rest[len..];
        Ok(())
    }

    /// A call's trace element, `[traceparent: str, tracestate: str, attempt: uint]`, or nil
    /// for none (a call that carries later extension elements but no trace).
    fn optional_trace(&mut self) -> Result<Option<Trace>, DecodeError> {
        if self.rest.first() == Some(&0xc0) {
            self.rest = &self.rest[1..];
            return Ok(None);
        }
        self.trace().map(Some)
    }

    /// A call's trace element: `[traceparent: str, tracestate: str, attempt: uint]`.
    fn trace(&mut self) -> Result<Trace, DecodeError> {
        let count = rmp::decode::read_array_len(&mut self.rest)
            .map_err(|e| malformed(format!("trace: {e}")))?;
        if count != 3 {
            return Err(malformed(format!("trace has {count} elements, expected 3")));
        }
        let traceparent = self.wire_str("traceparent", MAX_TRACEPARENT_LEN)?;
        if traceparent.as_str().is_empty() {
            return Err(malformed("traceparent is empty"));
        }
        let tracestate = self.wire_str("tracestate", MAX_TRACESTATE_LEN)?;
        let attempt =
            u32::try_from(self.uint("attempt")?).map_err(|_| malformed("attempt is over u32"))?;
        Ok(Trace {
            traceparent,
            tracestate,
            attempt,
        })
    }

    fn expect_len(len: u32, want: u32, kind: &str) -> Result<(), DecodeError> {
        if len == want {
            Ok(())
        } else {
            Err(malformed(format!(
                "{kind} frame has {len} elements, expected {want}"
            )))
        }
    }
}

/// Decodes one frame. The body of the returned frame shares `frame`'s buffer.
pub(crate) fn decode(frame: &Bytes) -> Result<Frame, DecodeError> {
    let (&version, rest) = frame.split_first().ok_or(DecodeError::Empty)?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let mut r = Reader { frame, rest };
    let len =
        rmp::decode::read_array_len(&mut r.rest).map_err(|e| malformed(format!("frame: {e}")))?;
    let kind = r.uint("frame kind")?;
    // A claimed frame has its plain kind's elements, with a claim reference for the body.
    let claimed = (u64::from(CLAIMED)..u64::from(CLAIMED + 3)).contains(&kind);
    let kind = if claimed {
        kind - u64::from(CLAIMED)
    } else {
        kind
    };
    let mut claim = None;
    let mut body = |r: Reader<'_>, what: &str| -> Result<Bytes, DecodeError> {
        if claimed {
            let mut rest = r.rest;
            claim = Some(read_claim(&mut rest)?);
            trailing(rest)?;
            Ok(Bytes::new())
        } else {
            r.body(what)
        }
    };
    let frame = match kind {
        k if k == u64::from(KIND_CALL) => {
            // 6 elements, or more with extension elements before the arguments: the first
            // is the trace element (or nil), any later ones are skipped (§3.1).
            if !(6..=CALL_MAX_ELEMENTS).contains(&len) {
                return Err(malformed(format!(
                    "call has {len} elements, expected 6 to {CALL_MAX_ELEMENTS}"
                )));
            }
            let id = r.uint("call id")?;
            let method = r.wire_str("method", MAX_METHOD_LEN)?;
            let reply_to = r.wire_str("reply_to", MAX_NODE_ID_LEN)?;
            if reply_to.as_str().is_empty() {
                return Err(malformed("reply_to is empty"));
            }
            let deadline_ms = r.uint("deadline")?;
            let trace = if len >= 7 {
                r.optional_trace()?.map(Box::new)
            } else {
                None
            };
            for _ in 7..len {
                r.skip("call extension")?;
            }
            let args = body(r, "arguments")?;
            if !claimed && !is_array_marker(args[0]) {
                return Err(malformed("arguments are not a MessagePack array"));
            }
            Ok(Frame::Call(Call {
                id,
                method,
                reply_to,
                deadline_ms,
                args,
                trace,
            }))
        }
        k if k == u64::from(KIND_REPLY) => {
            Reader::expect_len(len, 4, "reply")?;
            let id = r.uint("reply id")?;
            let code = r.uint("status")?;
            let body = body(r, "reply body")?;
            Ok(Frame::Reply(match Status::from_code(code) {
                Some(status) => Reply {
                    id,
                    status,
                    body,
                    claim: None,
                },
                None => Reply {
                    id,
                    claim: None,
                    status: Status::Unrecognized,
                    body: Bytes::from(
                        encode_value(&format!("status code {code}")).unwrap_or_default(),
                    ),
                },
            }))
        }
        k if k == u64::from(KIND_MESSAGE) => {
            Reader::expect_len(len, 3, "message")?;
            let from = r.node("sender")?;
            let body = body(r, "message body")?;
            Ok(Frame::Message { from, body })
        }
        k if k == u64::from(KIND_JOIN) => {
            Reader::expect_len(len, 3, "join")?;
            let node = r.node("node")?;
            let count = rmp::decode::read_array_len(&mut r.rest)
                .map_err(|e| malformed(format!("methods: {e}")))?;
            if count > MAX_JOIN_METHODS {
                return Err(malformed(format!("join lists {count} methods")));
            }
            let mut methods = Vec::with_capacity(count.min(64) as usize);
            for _ in 0..count {
                methods.push(r.str("method", MAX_METHOD_LEN)?.to_string());
            }
            trailing(r.rest)?;
            Ok(Frame::Join { node, methods })
        }
        k if k == u64::from(KIND_LEAVE) => {
            Reader::expect_len(len, 2, "leave")?;
            let node = r.node("node")?;
            trailing(r.rest)?;
            Ok(Frame::Leave { node })
        }
        k if k == u64::from(KIND_ITEM) => {
            Reader::expect_len(len, 4, "item")?;
            let id = r.uint("stream id")?;
            let seq = r.uint("item sequence number")?;
            let body = r.body("item body")?;
            Ok(Frame::Item { id, seq, body })
        }
        k if k == u64::from(KIND_CREDIT) => {
            Reader::expect_len(len, 4, "credit")?;
            let id = r.uint("stream id")?;
            let caller = r.wire_str("caller", MAX_NODE_ID_LEN)?;
            if caller.as_str().is_empty() {
                return Err(malformed("caller is empty"));
            }
            let allow = r.uint("credit")?;
            trailing(r.rest)?;
            Ok(Frame::Credit { id, caller, allow })
        }
        k if k == u64::from(KIND_KEEPALIVE) => {
            Reader::expect_len(len, 3, "keep-alive")?;
            let id = r.uint("stream id")?;
            let next = r.uint("next sequence number")?;
            trailing(r.rest)?;
            Ok(Frame::KeepAlive { id, next })
        }
        k if k == u64::from(KIND_CANCEL) => {
            Reader::expect_len(len, 3, "cancel")?;
            let id = r.uint("cancel id")?;
            let caller = r.wire_str("caller", MAX_NODE_ID_LEN)?;
            if caller.as_str().is_empty() {
                return Err(malformed("caller is empty"));
            }
            trailing(r.rest)?;
            Ok(Frame::Cancel { id, caller })
        }
        other => Err(DecodeError::Kind(other)),
    }?;
    Ok(match claim {
        Some(claim) => Frame::Claim {
            frame: Box::new(frame),
            claim,
        },
        None => frame,
    })
}

/// Reads a claim reference: `[token: bin 16, len: uint, digest: bin 32]`.
fn read_claim(rest: &mut &[u8]) -> Result<ClaimRef, DecodeError> {
    let count = rmp::decode::read_array_len(rest).map_err(|e| malformed(format!("claim: {e}")))?;
    if count != 3 {
        return Err(malformed(format!("claim has {count} elements, expected 3")));
    }
    fn bin<const N: usize>(rest: &mut &[u8], what: &str) -> Result<[u8; N], DecodeError> {
        let len = rmp::decode::read_bin_len(rest).map_err(|e| malformed(format!("{what}: {e}")))?;
        if len as usize != N {
            return Err(malformed(format!("{what} is {len} bytes, expected {N}")));
        }
        let bytes = rest
            .get(..N)
            .ok_or_else(|| malformed(format!("{what} is truncated")))?;
        *rest = &rest[N..];
        Ok(bytes.try_into().unwrap_or([0; N]))
    }
    let token = bin::<16>(rest, "claim token")?;
    let len = rmp::decode::read_int(rest).map_err(|e| malformed(format!("claim length: {e}")))?;
    let digest = bin::<32>(rest, "claim digest")?;
    Ok(ClaimRef { token, len, digest })
}

/// Where the body of an encoded Call, Reply or Message frame starts (`None` for other
/// frames, or bytes that are not a frame).
pub(crate) fn body_start(frame: &Bytes) -> Option<usize> {
    let body_len = match decode(frame).ok()? {
        Frame::Call(call) => call.args.len(),
        Frame::Reply(reply) => reply.body.len(),
        Frame::Message { body, .. } => body.len(),
        _ => return None,
    };
    Some(frame.len() - body_len)
}

/// The claim frame of an encoded Call, Reply or Message whose body starts at `body_start`:
/// the same header under the claimed kind, and the claim reference in place of the body.
pub(crate) fn encode_claimed(frame: &[u8], body_start: usize, claim: &ClaimRef) -> Vec<u8> {
    let mut buf = Vec::with_capacity(body_start + 64);
    buf.extend_from_slice(&frame[..body_start]);
    debug_assert!(matches!(Marker::from_u8(buf[1]), Marker::FixArray(_)) && buf[2] < CLAIMED);
    // [version, fixarray, kind as a positive fixint, ...]: the kind is byte 2.
    buf[2] += CLAIMED;
    put_array_len(&mut buf, 3);
    let _ = rmp::encode::write_bin(&mut buf, &claim.token);
    put_uint(&mut buf, claim.len);
    let _ = rmp::encode::write_bin(&mut buf, &claim.digest);
    buf
}

fn trailing(rest: &[u8]) -> Result<(), DecodeError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(malformed(format!("{} trailing bytes", rest.len())))
    }
}

fn is_array_marker(byte: u8) -> bool {
    matches!(
        Marker::from_u8(byte),
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32
    )
}

/// The MessagePack `nil`.
pub(crate) const NIL: &[u8] = &[0xc0];
const EMPTY_ARRAY: &[u8] = &[0x90];

/// Encodes a value; structs become maps keyed by field name, so peers in other languages and
/// later versions with added fields can read them.
pub(crate) fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(value).map_err(|e| e.to_string())
}

/// Encodes call arguments on their own (tests; calls write them into the frame).
#[cfg(test)]
pub(crate) fn encode_args<A: Serialize + ?Sized>(args: &A) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    write_args(&mut buf, args)?;
    Ok(buf)
}

/// Appends call arguments to `buf`. They must form a MessagePack array: a tuple, `()` (sent
/// as the empty array) or a sequence. On error `buf` is left as it was.
pub(crate) fn write_args<A: Serialize + ?Sized>(buf: &mut Vec<u8>, args: &A) -> Result<(), String> {
    let start = buf.len();
    if let Err(e) = rmp_serde::encode::write_named(buf, args) {
        buf.truncate(start);
        return Err(e.to_string());
    }
    match &buf[start..] {
        // `()` encodes as nil; on the wire it is the empty argument list.
        written if written == NIL => {
            buf.truncate(start);
            buf.extend_from_slice(EMPTY_ARRAY);
            Ok(())
        }
        [first, ..] if is_array_marker(*first) => Ok(()),
        _ => {
            buf.truncate(start);
            Err("arguments must be a tuple, e.g. (a, b) or (a,) or ()".to_string())
        }
    }
}

/// Decodes exactly one value from `bytes`; trailing bytes are an error.
///
/// Strings and byte strings are read straight from `bytes` (a reader-based deserializer would
/// first copy each into a buffer of its own); [`value_len`] finds where the value ends.
pub(crate) fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let used = value_len(bytes)?;
    if used != bytes.len() {
        return Err(format!(
            "{} bytes left over after the value",
            bytes.len() - used
        ));
    }
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

/// The length of the one MessagePack value at the start of `bytes`, found by skipping over
/// it without decoding anything. (rmp's own `MessageLen` would do, but it panics on extension
/// types, and this runs on bytes from the wire.)
fn value_len(bytes: &[u8]) -> Result<usize, String> {
    let truncated = || "the value is truncated".to_string();
    let mut rest = bytes;
    // Values still to skip: 1, plus the items of every array and map opened so far.
    let mut pending: u64 = 1;
    while pending > 0 {
        pending -= 1;
        let (&byte, tail) = rest.split_first().ok_or_else(truncated)?;
        rest = tail;
        let mut length = |width: usize| -> Result<u64, String> {
            let field = rest.get(..width).ok_or_else(truncated)?;
            rest = &rest[width..];
            Ok(field.iter().fold(0u64, |n, &b| n << 8 | u64::from(b)))
        };
        // (bytes of data to skip, items to skip)
        let (data, items) = match Marker::from_u8(byte) {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                (0, 0)
            }
            Marker::U8 | Marker::I8 => (1, 0),
            Marker::U16 | Marker::I16 => (2, 0),
            Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
            Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
            Marker::FixStr(n) => (u64::from(n), 0),
            Marker::Str8 | Marker::Bin8 => (length(1)?, 0),
            Marker::Str16 | Marker::Bin16 => (length(2)?, 0),
            Marker::Str32 | Marker::Bin32 => (length(4)?, 0),
            Marker::FixArray(n) => (0, u64::from(n)),
            Marker::Array16 => (0, length(2)?),
            Marker::Array32 => (0, length(4)?),
            Marker::FixMap(n) => (0, 2 * u64::from(n)),
            Marker::Map16 => (0, 2 * length(2)?),
            Marker::Map32 => (0, 2 * length(4)?),
            // Extension types: a type byte, then the data.
            Marker::FixExt1 => (2, 0),
            Marker::FixExt2 => (3, 0),
            Marker::FixExt4 => (5, 0),
            Marker::FixExt8 => (9, 0),
            Marker::FixExt16 => (17, 0),
            Marker::Ext8 => (length(1)? + 1, 0),
            Marker::Ext16 => (length(2)? + 1, 0),
            Marker::Ext32 => (length(4)? + 1, 0),
            Marker::Reserved => return Err("not a MessagePack value (marker 0xc1)".to_string()),
        };
        let data = usize::try_from(data).map_err(|_| truncated())?;
        rest = rest.get(data..).ok_or_else(truncated)?;
        // Every item takes at least one byte: more items than bytes left cannot be there.
        pending += items;
        if pending > rest.len() as u64 {
            return Err(truncated());
        }
    }
    Ok(bytes.len() - rest.len())
}

/// Decodes call arguments into the handler's tuple type; the empty array also fits `()`.
pub(crate) fn decode_args<A: DeserializeOwned>(bytes: &[u8]) -> Result<A, String> {
    if bytes == EMPTY_ARRAY
        && let Ok(unit) = decode_value::<A>(NIL)
    {
        return Ok(unit);
    }
    decode_value(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_laid_out_as_documented() {
        // docs/protocol.md §3.12: two Replies for one inbox.
        let hi = encode_reply(1, Status::Ok, &encode_value("hi").expect("str"));
        let yo = encode_reply(2, Status::Ok, &encode_value("yo").expect("str"));
        let batch = encode_batch([&hi[..], &yo[..]].into_iter());
        let expected: &[u8] = &[
            0x01, 0x93, 0x08, 0xc4, 0x08, 0x01, 0x94, 0x01, 0x01, 0x00, 0xa2, b'h', b'i', 0xc4,
            0x08, 0x01, 0x94, 0x01, 0x02, 0x00, 0xa2, b'y', b'o',
        ];
        assert_eq!(&batch[..], expected);
        let entries = split_batch(&batch).expect("a batch").expect("well-formed");
        assert_eq!(entries, vec![hi.clone(), yo]);
        assert!(split_batch(&hi).is_none(), "a reply is not a batch");
        assert!(
            matches!(decode(&batch), Err(DecodeError::Kind(8))),
            "a batch is not a frame of its own: an entry that is one is malformed"
        );
    }

    #[test]
    fn batch_entry_lengths_match_the_encoding() {
        for len in [0usize, 1, 255, 256, 65_535, 65_536, 70_000] {
            let frame = vec![7u8; len];
            let batch = encode_batch([&frame[..]].into_iter());
            // Version, a one-byte array header and the kind, then the entry.
            assert_eq!(batch.len(), 3 + batch_entry_len(len));
            assert!(batch.len() <= BATCH_HEADER + batch_entry_len(len));
        }
    }

    #[test]
    fn malformed_batches_are_errors_never_panics() {
        let bad: &[&[u8]] = &[
            &[0x01, 0x91, 0x08],
            &[0x01, 0x92, 0x08, 0xc4, 5, 1, 2],
            &[0x01, 0x92, 0x08, 0x07],
            &[0x01, 0x92, 0x08, 0xc4, 0, 0],
            &[0x01, 0xdd, 0xff, 0xff, 0xff, 0xff, 0x08],
            &[0x01, 0x93, 0x08, 0xc4, 0],
        ];
        for frame in bad {
            let frame = Bytes::copy_from_slice(frame);
            assert!(
                matches!(split_batch(&frame), Some(Err(_))),
                "{frame:?} is a malformed batch"
            );
        }
        // Every prefix and every one-byte change of a good batch: an answer, never a panic.
        let one = encode_reply(1, Status::Ok, NIL);
        let good = encode_batch([&one[..], &one[..]].into_iter());
        for cut in 0..good.len() {
            let _ = split_batch(&good.slice(..cut));
        }
        for i in 0..good.len() {
            for v in [0u8, 0x7f, 0xc4, 0xc5, 0xc6, 0xff] {
                let mut changed = good.to_vec();
                changed[i] = v;
                if let Some(Ok(entries)) = split_batch(&Bytes::from(changed)) {
                    for entry in entries {
                        let _ = decode(&entry);
                    }
                }
            }
        }
    }

    fn call_frame() -> Bytes {
        Bytes::from(
            encode_call(7, "test.hello", "client-a", 2000, &("Glen", 42u32)).expect("encodable"),
        )
    }

    #[test]
    fn call_round_trips() {
        let Frame::Call(call) = decode(&call_frame()).expect("valid") else {
            panic!("not a call")
        };
        assert_eq!(call.id, 7);
        assert_eq!(call.method, "test.hello");
        assert_eq!(call.reply_to, "client-a");
        assert_eq!(call.deadline_ms, 2000);
        let (name, n): (String, u32) = decode_args(&call.args).expect("args");
        assert_eq!((name.as_str(), n), ("Glen", 42));
    }

    #[test]
    fn other_frames_round_trip() {
        let body = encode_value("hi").expect("encodable");
        let reply = encode_reply(9, Status::AppError, &body);
        assert_eq!(
            decode(&reply),
            Ok(Frame::Reply(Reply {
                id: 9,
                status: Status::AppError,
                body: Bytes::from(body.clone()),
                claim: None,
            }))
        );
        let msg = Bytes::from(encode_message("n1", &body));
        assert!(matches!(decode(&msg), Ok(Frame::Message { from, .. }) if from == "n1"));
        let join = Bytes::from(encode_join("n1", &["a.b".into(), "a.c".into()]));
        assert_eq!(
            decode(&join),
            Ok(Frame::Join {
                node: "n1".into(),
                methods: vec!["a.b".into(), "a.c".into()]
            })
        );
        let leave = Bytes::from(encode_leave("n1"));
        assert_eq!(decode(&leave), Ok(Frame::Leave { node: "n1".into() }));
    }

    #[test]
    fn stream_frames_round_trip_and_are_laid_out_as_documented() {
        // docs/protocol.md §3.14.
        let item = Bytes::from(encode_item(7, 300, &encode_value("hi").expect("str")));
        assert_eq!(
            &item[..],
            &[0x01, 0x94, 0x0a, 0x07, 0xcd, 0x01, 0x2c, 0xa2, b'h', b'i']
        );
        assert_eq!(
            decode(&item),
            Ok(Frame::Item {
                id: 7,
                seq: 300,
                body: Bytes::from_static(&[0xa2, b'h', b'i'])
            })
        );
        let credit = Bytes::from(encode_credit(7, "client-a", 64));
        let Ok(Frame::Credit { id, caller, allow }) = decode(&credit) else {
            panic!("not a credit");
        };
        assert_eq!((id, caller.as_str(), allow), (7, "client-a", 64));
        let alive = Bytes::from(encode_keepalive(7, 12));
        assert_eq!(&alive[..], &[0x01, 0x93, 0x0c, 0x07, 0x0c]);
        assert_eq!(decode(&alive), Ok(Frame::KeepAlive { id: 7, next: 12 }));
        // Malformed ones are errors, never panics.
        let bad: &[&[u8]] = &[
            &[0x01, 0x93, 0x0a, 0x07, 0x00],             // item without a body
            &[0x01, 0x94, 0x0a, 0x07, 0xa1, b'x', 0xc0], // sequence not a uint
            &[0x01, 0x94, 0x0b, 0x07, 0xa0, 0x01],       // credit from an empty caller
            &[0x01, 0x94, 0x0b, 0x07, 0xa1, b'a', 0x01, 0x00], // trailing byte
            &[0x01, 0x92, 0x0c, 0x07],                   // keep-alive too short
            &[0x01, 0x93, 0x0c, 0x07, 0x01, 0x02],       // trailing byte
            &[0x01, 0x93, 0x0f, 0x07, 0x01],             // kind 15 (claimed item?) is unknown
        ];
        for frame in bad {
            assert!(decode(&Bytes::from_static(frame)).is_err(), "{frame:02x?}");
        }
    }

    #[test]
    fn cancels_round_trip_and_bad_ones_are_errors() {
        let frame = Bytes::from(encode_cancel(u64::MAX, "client-a"));
        assert_eq!(
            &frame[..4],
            &[1, 0x93, 9, 0xcf],
            "[9, id, caller] as documented"
        );
        match decode(&frame) {
            Ok(Frame::Cancel { id, caller }) => {
                assert_eq!((id, caller.as_str()), (u64::MAX, "client-a"));
            }
            other => panic!("{other:?}"),
        }
        let small = Bytes::from(encode_cancel(7, "n"));
        assert_eq!(&small[..], &[1, 0x93, 9, 7, 0xa1, b'n']);
        // Every truncation is an error, never a panic.
        for cut in 0..frame.len() {
            assert!(decode(&frame.slice(..cut)).is_err(), "cut at {cut}");
        }
        let bad: &[&[u8]] = &[
            &[1, 0x92, 9, 7],                   // too few elements
            &[1, 0x94, 9, 7, 0xa1, b'n', 0xc0], // too many
            &[1, 0x93, 9, 7, 0xa0],             // empty caller
            &[1, 0x93, 9, 7, 0xa1, b'n', 0xc0], // trailing bytes
            &[1, 0x93, 9, 0xa1, b'n', 7],       // id not a uint
            &[1, 0x93, 9, 7, 0xc4, 1, b'n'],    // caller as bin
            &[1, 0x93, 9, 7, 0xa2, 0xff, 0xfe], // caller not UTF-8
            &[1, 0x93, 9, 0xff, 0xa1, b'n'],    // negative id
        ];
        for bytes in bad {
            assert!(
                decode(&Bytes::from_static(bytes)).is_err(),
                "{bytes:02x?} must not decode"
            );
        }
        let long = "x".repeat(MAX_NODE_ID_LEN + 1);
        assert!(decode(&Bytes::from(encode_cancel(1, &long))).is_err());
    }

    #[test]
    fn unknown_statuses_still_reach_the_caller() {
        let frame = encode_reply(3, Status::Ok, NIL);
        let mut bytes = frame.to_vec();
        bytes[4] = 99; // the status byte: [version, array, kind, id, status, body]
        match decode(&Bytes::from(bytes)) {
            Ok(Frame::Reply(reply)) => {
                assert_eq!((reply.id, reply.status), (3, Status::Unrecognized));
                assert_eq!(
                    decode_value::<String>(&reply.body).as_deref(),
                    Ok("status code 99")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unit_args_are_an_empty_array() {
        assert_eq!(encode_args(&()).expect("unit"), EMPTY_ARRAY);
        let () = decode_args::<()>(EMPTY_ARRAY).expect("unit from empty array");
        assert!(encode_args(&5u8).is_err());
    }

    #[test]
    fn rejects_bad_frames_without_panicking() {
        assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            decode(&Bytes::from_static(&[2, 0x90])),
            Err(DecodeError::Version(2))
        );
        let frame = call_frame();
        // Every truncation of a valid frame is an error, never a panic: in the header when
        // the frame is decoded, in the body when the arguments are.
        for cut in 0..frame.len() {
            match decode(&frame.slice(..cut)) {
                Err(_) => {}
                Ok(Frame::Call(call)) => {
                    assert!(
                        decode_args::<(String, u32)>(&call.args).is_err(),
                        "cut at {cut}"
                    )
                }
                Ok(other) => panic!("cut at {cut} decoded as {other:?}"),
            }
        }
        assert!(matches!(
            decode(&Bytes::from_static(&[1, 0x92, 99, 0])),
            Err(DecodeError::Kind(99))
        ));
    }

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn traced_call(tracestate: &str, attempt: u32) -> Bytes {
        let trace = TraceRef {
            traceparent: TRACEPARENT,
            tracestate,
            attempt,
        };
        encode_call_framed(5, "svc.m", "node-1", 250, Some(trace), &("a", 2)).expect("encode")
    }

    #[test]
    fn a_traced_call_has_seven_elements_and_round_trips() {
        let frame = traced_call("congo=t61rcWkgMzE", 2);
        // [version, fixarray of 7, kind 0, ...]: the trace element before the arguments.
        assert_eq!(&frame[..3], &[VERSION, 0x97, KIND_CALL]);
        let Ok(Frame::Call(call)) = decode(&frame) else {
            panic!("a traced call decodes")
        };
        let trace = call.trace.expect("trace element");
        assert_eq!(trace.traceparent, TRACEPARENT);
        assert_eq!(trace.tracestate, "congo=t61rcWkgMzE");
        assert_eq!(trace.attempt, 2);
        assert_eq!((call.id, call.deadline_ms), (5, 250));
        assert_eq!(
            decode_args::<(String, u32)>(&call.args),
            Ok(("a".into(), 2))
        );
        // The arguments stay the rest of the frame, so a claim replaces them as before and
        // keeps the trace element in the header.
        let start = body_start(&frame).expect("a call");
        let claim = ClaimRef {
            token: [1; 16],
            len: 3,
            digest: [2; 32],
        };
        let claimed = Bytes::from(encode_claimed(&frame, start, &claim));
        let Ok(Frame::Claim { frame, .. }) = decode(&claimed) else {
            panic!("a claimed traced call decodes")
        };
        let Frame::Call(call) = *frame else {
            panic!("a call")
        };
        assert_eq!(call.trace.expect("kept").traceparent, TRACEPARENT);
    }

    /// The example of `docs/protocol.md` §3.1, byte for byte.
    #[test]
    fn a_traced_call_is_laid_out_as_documented() {
        let trace = TraceRef {
            traceparent: TRACEPARENT,
            tracestate: "",
            attempt: 1,
        };
        let frame = encode_call_framed(
            7,
            "test.hello",
            "client-a",
            2000,
            Some(trace),
            &("Glen", "hi"),
        )
        .expect("encode");
        let mut expected = vec![0x01, 0x97, 0x00, 0x07, 0xaa];
        expected.extend_from_slice(b"test.hello");
        expected.push(0xa8);
        expected.extend_from_slice(b"client-a");
        expected.extend_from_slice(&[0xcd, 0x07, 0xd0, 0x93, 0xd9, 0x37]);
        expected.extend_from_slice(TRACEPARENT.as_bytes());
        expected.extend_from_slice(&[0xa0, 0x01, 0x92, 0xa4]);
        expected.extend_from_slice(b"Glen");
        expected.push(0xa2);
        expected.extend_from_slice(b"hi");
        assert_eq!(&frame[..], &expected[..]);
    }

    #[test]
    fn untraced_calls_are_unchanged_and_oversized_trace_parts_are_not_sent() {
        let plain = encode_call_framed(5, "svc.m", "node-1", 250, None, &("a", 2)).expect("plain");
        assert_eq!(
            plain[1], 0x96,
            "six elements, as before trace context existed"
        );
        assert!(matches!(
            decode(&plain),
            Ok(Frame::Call(Call { trace: None, .. }))
        ));
        // A tracestate over the limit is dropped (W3C allows it); the traceparent still goes.
        let frame = traced_call(&"k=v,".repeat(400), 1);
        let Ok(Frame::Call(call)) = decode(&frame) else {
            panic!("decodes")
        };
        assert_eq!(call.trace.expect("sent").tracestate, "");
        // An empty or oversized traceparent: no trace element at all.
        for traceparent in [String::new(), "0".repeat(MAX_TRACEPARENT_LEN + 1)] {
            let trace = TraceRef {
                traceparent: &traceparent,
                tracestate: "",
                attempt: 1,
            };
            let frame = encode_call_framed(1, "s.m", "n", 1, Some(trace), &()).expect("encode");
            assert_eq!(frame[1], 0x96);
        }
    }

    #[test]
    fn bad_trace_elements_are_malformed_never_panics() {
        let frame = traced_call("a=b", 1);
        for cut in 0..frame.len() {
            match decode(&frame.slice(..cut)) {
                Err(_) => {}
                Ok(Frame::Call(call)) => assert!(decode_args::<(String, u32)>(&call.args).is_err()),
                Ok(other) => panic!("cut at {cut} decoded as {other:?}"),
            }
        }
        // Each byte of the trace element changed: an answer, never a panic.
        let start = 3 + 1 + 6 + 7 + 2; // version, array, kind; id; method; reply_to; deadline
        for i in start..body_start(&frame).expect("call") {
            for b in [0x00, 0x7f, 0x90, 0x93, 0xa0, 0xc0, 0xd9, 0xff] {
                let mut bytes = frame.to_vec();
                bytes[i] = b;
                let _ = decode(&Bytes::from(bytes));
            }
        }
        // The trace element must be an array of 3 with a non-empty traceparent.
        let mut wrong = vec![VERSION, 0x97, KIND_CALL, 1, 0xa1, b'm', 0xa1, b'n', 1];
        wrong.extend_from_slice(&[0x92, 0xa1, b'x', 0xa0]);
        wrong.push(0x90);
        assert!(decode(&Bytes::from(wrong)).is_err());
        let mut empty = vec![VERSION, 0x97, KIND_CALL, 1, 0xa1, b'm', 0xa1, b'n', 1];
        empty.extend_from_slice(&[0x93, 0xa0, 0xa0, 1]);
        empty.push(0x90);
        assert!(decode(&Bytes::from(empty)).is_err());
        let mut good = vec![VERSION, 0x97, KIND_CALL, 1, 0xa1, b'm', 0xa1, b'n', 1];
        good.extend_from_slice(&[0x93, 0xa1, b'x', 0xa0, 1]);
        good.push(0x90);
        assert!(decode(&Bytes::from(good)).is_ok());
        // Five elements are malformed; so are more than 15 (an array16 header here).
        let mut five = frame.to_vec();
        five[1] = 0x95;
        assert!(decode(&Bytes::from(five)).is_err());
        let mut sixteen = vec![
            VERSION, 0xdc, 0x00, 0x10, KIND_CALL, 1, 0xa1, b'm', 0xa1, b'n', 1,
        ];
        sixteen.extend_from_slice(&[0xc0; 10]);
        sixteen.push(0x90);
        let refused = decode(&Bytes::from(sixteen));
        assert!(
            matches!(&refused, Err(e) if e.to_string().contains("16 elements")),
            "{refused:?}"
        );
    }

    #[test]
    fn extension_elements_after_the_trace_are_skipped() {
        let head = [VERSION, 0x99, KIND_CALL, 1, 0xa1, b'm', 0xa1, b'n', 1];
        let args = [0x91, 0x05];
        // Untraced (nil), then two extensions this version does not know: a map and an ext.
        let mut untraced = head.to_vec();
        untraced.push(0xc0);
        untraced.extend_from_slice(&[0x81, 0xa1, b'k', 0x92, 1, 2]);
        untraced.extend_from_slice(&[0xd4, 7, 9]);
        untraced.extend_from_slice(&args);
        let Ok(Frame::Call(call)) = decode(&Bytes::from(untraced.clone())) else {
            panic!("a call with extensions decodes")
        };
        assert!(call.trace.is_none());
        assert_eq!(&call.args[..], &args, "the arguments are still the rest");
        // Traced, then the same extensions.
        let mut traced = head.to_vec();
        traced.extend_from_slice(&[0x93, 0xa1, b'x', 0xa0, 3]);
        traced.extend_from_slice(&untraced[head.len() + 1..]);
        let Ok(Frame::Call(call)) = decode(&Bytes::from(traced)) else {
            panic!("a traced call with extensions decodes")
        };
        assert_eq!(call.trace.expect("trace").attempt, 3);
        assert_eq!(&call.args[..], &args);
        // A truncated extension is malformed, never read past.
        let mut cut = head.to_vec();
        cut.extend_from_slice(&[0xc0, 0xc4, 200, 1]);
        assert!(decode(&Bytes::from(cut)).is_err());
        // An extension count that runs into the arguments leaves none: malformed.
        let mut short = head.to_vec();
        short.extend_from_slice(&[0xc0, 1]);
        short.extend_from_slice(&args);
        assert!(decode(&Bytes::from(short)).is_err());
    }

    #[test]
    fn value_len_skips_every_kind_of_value() {
        let value = (
            (
                1u8,
                -1i8,
                300u16,
                -300i16,
                70_000u32,
                -70_000i32,
                u64::MAX,
                i64::MIN,
            ),
            (
                1.5f32,
                2.5f64,
                true,
                (),
                "s",
                "x".repeat(40),
                "y".repeat(300),
            ),
            vec![7u32; 20],
            std::collections::BTreeMap::from([("k", vec![1, 2]), ("l", vec![])]),
        );
        // [value, bin of 70,000 bytes]
        let mut bytes = Vec::new();
        put_array_len(&mut bytes, 2);
        bytes.extend(encode_value(&value).expect("encodable"));
        let _ = rmp::encode::write_bin(&mut bytes, &[1u8; 70_000]);
        assert_eq!(value_len(&bytes), Ok(bytes.len()));
        for cut in 0..bytes.len().min(300) {
            assert!(value_len(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // Extension types (which rmp's MessageLen cannot skip): fixext 1, ext 8.
        assert_eq!(value_len(&[0xd4, 1, 2]), Ok(3));
        assert_eq!(value_len(&[0xc7, 2, 5, 1, 2, 0xc0]), Ok(5));
        assert!(value_len(&[0xc1]).is_err());
        assert!(value_len(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn reply_headers_of_every_width_fit_in_front_of_the_body() {
        for id in [0, 127, 128, 65_535, 1 << 32, u64::MAX] {
            let body = ReplyBody::encode(&("x", id)).expect("encodable");
            let expected = encode_value(&("x", id)).expect("encodable");
            assert_eq!(body.as_bytes(), &expected[..]);
            let frame = body.into_frame(id, Status::ServerError);
            match decode(&frame) {
                Ok(Frame::Reply(reply)) => {
                    assert_eq!((reply.id, reply.status), (id, Status::ServerError));
                    assert_eq!(&reply.body[..], &expected[..]);
                }
                other => panic!("id {id}: {other:?}"),
            }
        }
    }

    #[test]
    fn small_frames_are_exactly_their_length_and_large_ones_are_whole() {
        let small = encode_call(1, "t.m", "c", 5, &("x",)).expect("encodable");
        assert_eq!(small.capacity(), small.len());
        let body = ReplyBody::encode("ok").expect("encodable");
        assert_eq!(body.0.capacity(), body.0.len());

        let big = "y".repeat(SCRATCH_KEEP * 3);
        let frame = Bytes::from(encode_call(2, "t.m", "c", 5, &(&big,)).expect("encodable"));
        let Ok(Frame::Call(call)) = decode(&frame) else {
            panic!("not a call")
        };
        let (back,): (String,) = decode_args(&call.args).expect("args");
        assert_eq!(back, big);
        // The scratch buffer is not kept at that size, and small frames still come out right.
        assert!(SCRATCH.with(|cell| cell.take().capacity()) <= SCRATCH_KEEP);
        let again = Bytes::from(encode_call(3, "t.m", "c", 5, &("z",)).expect("encodable"));
        assert!(matches!(decode(&again), Ok(Frame::Call(c)) if c.id == 3));
    }

    /// Arguments whose `Serialize` encodes a frame of its own while the outer one is written.
    struct Nested;
    impl Serialize for Nested {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let inner = encode_call(9, "t.inner", "c", 1, &("inner",)).expect("encodable");
            s.collect_seq(inner)
        }
    }

    #[test]
    fn a_frame_encoded_inside_another_leaves_both_whole() {
        let frame = Bytes::from(encode_call(8, "t.outer", "c", 1, &(Nested,)).expect("ok"));
        let Ok(Frame::Call(call)) = decode(&frame) else {
            panic!("not a call")
        };
        assert_eq!((call.id, call.method.as_str()), (8, "t.outer"));
        let (inner,): (Vec<u8>,) = decode_args(&call.args).expect("args");
        let inner = Bytes::from(inner);
        assert!(matches!(decode(&inner), Ok(Frame::Call(c)) if c.id == 9));
    }

    #[test]
    fn a_failed_encoding_leaves_the_scratch_buffer_usable() {
        assert!(encode_call(4, "t.m", "c", 5, &"not a tuple").is_err());
        let frame = Bytes::from(encode_call(5, "t.m", "c", 5, &(1u8,)).expect("encodable"));
        assert!(matches!(decode(&frame), Ok(Frame::Call(c)) if c.id == 5));
    }

    #[test]
    fn wrong_argument_types_and_counts_are_errors() {
        let args = encode_args(&("a", "b")).expect("encodable");
        assert!(decode_args::<(String, u32)>(&args).is_err());
        assert!(decode_args::<(String,)>(&args).is_err());
        assert!(decode_args::<(String, String, String)>(&args).is_err());
        assert!(
            decode_value::<u32>(&[0x01, 0x02]).is_err(),
            "trailing bytes"
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small deterministic generator: the property matters, not the distribution.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2000usize {
            let mut buf = Vec::with_capacity(len % 64 + 1);
            buf.push(VERSION);
            for _ in 0..(len % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let frame = Bytes::from(buf);
            if let Ok(Frame::Call(call)) = decode(&frame) {
                let _ = decode_args::<(String, u64)>(&call.args);
            }
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_status() -> impl Strategy<Value = Status> {
            (0u64..9).prop_map(|c| Status::from_code(c).expect("0..9 are codes"))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                if let Ok(Frame::Call(call)) = decode(&Bytes::from(bytes)) {
                    let _ = decode_args::<(String, u64, Vec<u8>)>(&call.args);
                }
            }

            #[test]
            fn mutated_frames_never_panic(
                id in any::<u64>(),
                method in "[a-z.]{1,40}",
                name in ".{0,40}",
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
                cut in any::<usize>(),
            ) {
                let mut bytes = encode_call(id, &method, "client-x", 1000, &(name, id)).expect("encodable");
                for (at, value) in flips {
                    let at = at % bytes.len();
                    bytes[at] = value;
                }
                bytes.truncate(cut % (bytes.len() + 1));
                if let Ok(Frame::Call(call)) = decode(&Bytes::from(bytes)) {
                    let _ = decode_args::<(String, u64)>(&call.args);
                }
            }

            #[test]
            fn calls_round_trip(
                id in any::<u64>(),
                method in "[a-zA-Z0-9._-]{1,256}",
                caller in "[a-zA-Z0-9._-]{1,256}",
                deadline in any::<u64>(),
                name in ".*",
                n in any::<i64>(),
            ) {
                let frame = Bytes::from(encode_call(id, &method, &caller, deadline, &(name.as_str(), n)).expect("encodable"));
                let Ok(Frame::Call(call)) = decode(&frame) else { panic!("valid call did not decode") };
                prop_assert_eq!(call.id, id);
                prop_assert_eq!(call.method.as_str(), method.as_str());
                prop_assert_eq!(call.reply_to.as_str(), caller.as_str());
                prop_assert_eq!(call.deadline_ms, deadline);
                prop_assert_eq!(decode_args::<(String, i64)>(&call.args), Ok((name, n)));
            }

            #[test]
            fn replies_round_trip(id in any::<u64>(), status in any_status(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
                let value = encode_value(&body).expect("encodable");
                let frame = encode_reply(id, status, &value);
                let Ok(Frame::Reply(reply)) = decode(&frame) else { panic!("valid reply did not decode") };
                prop_assert_eq!((reply.id, reply.status), (id, status));
                prop_assert_eq!(decode_value::<Vec<u8>>(&reply.body), Ok(body));
            }
        }
    }
}
