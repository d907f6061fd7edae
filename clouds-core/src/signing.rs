//! Signed frames (opt-in, [`Config::signing_key`](crate::Config::signing_key)): an HMAC-SHA256
//! tag bound to the channel, key ids for rotation, and the replay guard.
//!
//! A signed frame wraps a complete version-1 frame without touching it (see `docs/protocol.md`
//! §3.1):
//!
//! ```text
//! offset size
//!  0      1   0x02 (SIGNED_VERSION)
//!  1      4   key id, u32 big-endian
//!  5      8   sender: a random number the sending node picked when it started
//! 13      8   sequence: counts the frames that sender signed, from 1, u64 big-endian
//! 21      8   sent_ms: the sender's wall clock, ms since the Unix epoch, u64 big-endian
//! 29     32   tag: HMAC-SHA256(key, u32 BE len(channel) ‖ channel ‖ bytes 0..29 ‖ frame)
//! 61      …   frame: the version-1 frame (0x01, then its MessagePack array)
//! ```
//!
//! [`Sealer`] makes such frames; [`Opener`] checks them: the key id, the tag (in constant
//! time), then the replay rule ([`ReplayGuard`]): a frame sent more than the replay window
//! before or after the receiver's clock is stale, and a sender's sequence number is accepted
//! once per channel. Everything here is plain code without I/O or clock of its own: times are
//! passed in, so the rules are tested without waiting.
//!
//! Nothing here panics on input from the wire, and no secret is ever printed: `Debug` shows key
//! ids only.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use hmac::{Hmac, Mac, digest::KeyInit};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::locks;

/// The first byte of a signed frame.
pub(crate) const SIGNED_VERSION: u8 = 2;
/// Bytes before the tag: version, key id, sender, sequence, sent_ms.
const SIGNED_PART: usize = 1 + 4 + 8 + 8 + 8;
/// Bytes of the tag (HMAC-SHA256, not truncated).
const TAG_LEN: usize = 32;
/// Bytes a signed frame adds in front of the frame it wraps.
pub(crate) const OVERHEAD: usize = SIGNED_PART + TAG_LEN;
/// Shortest secret accepted: the length of the hash, as RFC 2104 advises.
pub(crate) const MIN_SECRET_LEN: usize = 32;
/// Longest replay window accepted.
const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Sequence numbers remembered below the newest one per sender and channel: a frame overtaken
/// by more of its sender's frames than this is refused as too old.
const SEQ_WINDOW: u64 = 4096;
/// Most (sender, channel) pairs remembered at once; beyond that, frames from new senders are
/// refused until old ones expire (they cannot be told from replays otherwise).
const MAX_SENDERS: usize = 16_384;

/// A secret, never printed.
#[derive(Clone, PartialEq, Eq)]
struct Secret(Arc<[u8]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// The signing settings of a [`Config`](crate::Config): the key to sign with, the keys
/// accepted, the replay window. `Debug` shows the key ids, never the secrets.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Keys {
    sign: Option<(u32, Secret)>,
    /// Keys accepted besides the signing key.
    accept: Vec<(u32, Secret)>,
    pub(crate) window: Duration,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            sign: None,
            accept: Vec::new(),
            window: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signing")
            .field("signs_with", &self.sign.as_ref().map(|(id, _)| *id))
            .field(
                "accepts",
                &self.accept.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            )
            .field("replay_window", &self.window)
            .finish()
    }
}

impl Keys {
    pub(crate) fn set_signing(&mut self, id: u32, secret: &[u8]) {
        self.sign = Some((id, Secret(secret.into())));
    }

    pub(crate) fn add_accepted(&mut self, id: u32, secret: &[u8]) {
        self.accept.retain(|(known, _)| *known != id);
        self.accept.push((id, Secret(secret.into())));
    }

    /// The key ids this configuration accepts, the signing key's first.
    #[cfg(test)]
    pub(crate) fn accepted_ids(&self) -> Vec<u32> {
        self.sign
            .iter()
            .chain(&self.accept)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Why these settings cannot work, if they cannot.
    pub(crate) fn check(&self) -> Result<(), String> {
        for (id, secret) in self.sign.iter().chain(&self.accept) {
            if secret.0.len() < MIN_SECRET_LEN {
                return Err(format!(
                    "signing key {id} is {} bytes; use at least {MIN_SECRET_LEN} random bytes",
                    secret.0.len()
                ));
            }
        }
        if self.sign.is_none() && !self.accept.is_empty() {
            return Err(
                "accept_key needs a signing_key too: a node that checks signatures \
                 must also sign what it sends"
                    .into(),
            );
        }
        if let Some((id, secret)) = &self.sign
            && let Some((_, other)) = self.accept.iter().find(|(known, _)| known == id)
            && other != secret
        {
            return Err(format!(
                "key id {id} is given two different secrets (signing_key and accept_key)"
            ));
        }
        if self.window < Duration::from_secs(1) || self.window > MAX_WINDOW {
            return Err(format!(
                "replay_window {:?} must be between 1 s and a day",
                self.window
            ));
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch by this machine's clock (0 if it is set before 1970).
pub(crate) fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A number no other node is likely to pick: the OS-seeded `RandomState` of this process,
/// mixed with a process-wide counter and the clock.
fn random_sender() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// SHA-256's block, in bytes.
const BLOCK: usize = 64;

type HmacSha256 = Hmac<Sha256>;

/// An HMAC state part way through a tag's input (after the key, or the key and a channel
/// part): cloned for every frame, so the key's pad blocks and the channel are hashed once.
type Prefix = HmacSha256;

/// Whether two tags are equal, in constant time: how much of a forged tag is right must not
/// show in the timing. subtle's comparison, by 64-bit words (4 of them) rather than by bytes:
/// a byte-wise `ct_eq` of 32 bytes was ~350 instructions per received frame.
fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    let word = |tag: &[u8; TAG_LEN], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&tag[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(w)
    };
    let equal = word(a, 0).ct_eq(&word(b, 0))
        & word(a, 1).ct_eq(&word(b, 1))
        & word(a, 2).ct_eq(&word(b, 2))
        & word(a, 3).ct_eq(&word(b, 3));
    bool::from(equal)
}

/// An HMAC-SHA256 key, keyed once (the `hmac` crate keeps the hash states after the inner and
/// outer pad blocks, so a clone starts a tag without hashing the key again).
#[derive(Clone)]
struct MacKey(HmacSha256);

impl MacKey {
    fn new(secret: &Secret) -> MacKey {
        // HMAC accepts keys of any length (RFC 2104: a long one is hashed first).
        MacKey(
            <HmacSha256 as KeyInit>::new_from_slice(&secret.0)
                .expect("HMAC takes keys of any length"),
        )
    }

    /// The MAC after the channel part of its input: `len(channel)` (u32), the channel, and
    /// zero bytes up to a multiple of 64 bytes (SHA-256's block). Whole blocks, so a node
    /// keeps this state per channel and saves hashing the channel for every frame.
    fn prefix(&self, channel: &str) -> Prefix {
        const ZEROS: [u8; BLOCK] = [0; BLOCK];
        let mut mac = self.0.clone();
        let len = u32::try_from(channel.len()).unwrap_or(u32::MAX);
        mac.update(&len.to_be_bytes());
        mac.update(channel.as_bytes());
        mac.update(&ZEROS[..(BLOCK - (4 + channel.len()) % BLOCK) % BLOCK]);
        mac
    }

    /// The tag of a frame from the channel part (`prefix` of this key): the signed header,
    /// then the frame.
    fn tag(&self, prefix: &Prefix, header: &[u8], frame: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = prefix.clone();
        mac.update(header);
        mac.update(frame);
        mac.finalize().into_bytes().into()
    }
}

/// The sending side's channel parts ([`MacKey::prefix`]), per thread, so no lock is shared by
/// the tasks that send: by sealer, then by channel. Bounded: a sealer's map is emptied when
/// it reaches [`SEND_CACHE_CHANNELS`], and the oldest sealer's is dropped beyond
/// [`SEND_CACHE_SEALERS`] (sealers are never reused: each has an id of its own).
struct SendCache {
    sealers: Vec<(u64, ChannelParts)>,
}

/// One sealer's channel parts, by channel.
type ChannelParts = HashMap<Box<str>, Prefix, foldhash::fast::RandomState>;

const SEND_CACHE_CHANNELS: usize = 512;
const SEND_CACHE_SEALERS: usize = 8;

thread_local! {
    static SEND_CACHE: std::cell::RefCell<SendCache> =
        const { std::cell::RefCell::new(SendCache { sealers: Vec::new() }) };
}

/// Signs the frames a node sends.
pub(crate) struct Sealer {
    id: u32,
    key: MacKey,
    sender: u64,
    seq: AtomicU64,
    /// This sealer's entry in the per-thread [`SendCache`].
    cache_id: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("key_id", &self.id).finish()
    }
}

impl Sealer {
    /// The sealer of `keys`, if they sign.
    pub(crate) fn new(keys: &Keys) -> Option<Sealer> {
        let (id, secret) = keys.sign.as_ref()?;
        static CACHE_IDS: AtomicU64 = AtomicU64::new(0);
        Some(Sealer {
            id: *id,
            key: MacKey::new(secret),
            sender: random_sender(),
            seq: AtomicU64::new(1),
            cache_id: CACHE_IDS.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// `frame`, signed for `channel`, sent now.
    pub(crate) fn seal(&self, channel: &str, frame: &[u8]) -> Bytes {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.seal_as(channel, frame, self.sender, seq, wall_clock_ms())
    }

    /// [`Sealer::seal`], in `frame`'s own buffer when it has room for the envelope in front
    /// (the codec leaves [`SEAL_ROOM`](crate::codec::SEAL_ROOM) bytes there): no second
    /// buffer, one move of the frame. Otherwise, or when the buffer is shared, as `seal`.
    pub(crate) fn seal_owned(&self, channel: &str, frame: Bytes) -> Bytes {
        /// Spare bytes beyond the envelope's that a buffer may have and still be used: a
        /// large buffer with much spare capacity is not worth keeping whole.
        const MAX_SPARE: usize = 256;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (header, tag) = self.envelope(channel, &frame, self.sender, seq, wall_clock_ms());
        let len = frame.len();
        // A buffer this frame alone holds comes back whole, the frame moved to its start (no
        // allocation); a shared one is copied.
        let mut buf = Vec::from(frame);
        let room = buf.capacity() - len;
        if !(OVERHEAD..=OVERHEAD + MAX_SPARE).contains(&room) {
            return assemble(&header, &tag, &buf);
        }
        // The frame back to the end of the buffer, the envelope right in front of it.
        buf.resize(len + room, 0);
        buf.copy_within(..len, room);
        let start = room - OVERHEAD;
        buf[start..start + SIGNED_PART].copy_from_slice(&header);
        buf[start + SIGNED_PART..room].copy_from_slice(&tag);
        // Length equal to capacity, so `Bytes` takes the buffer over without an allocation.
        let mut sealed = Bytes::from(buf);
        sealed.advance(start);
        sealed
    }

    /// [`Sealer::seal`] with every field given (tests make stale and replayed frames with it).
    pub(crate) fn seal_as(
        &self,
        channel: &str,
        frame: &[u8],
        sender: u64,
        seq: u64,
        sent_ms: u64,
    ) -> Bytes {
        let (header, tag) = self.envelope(channel, frame, sender, seq, sent_ms);
        assemble(&header, &tag, frame)
    }

    /// The signed part of the envelope of `frame`, and its tag.
    fn envelope(
        &self,
        channel: &str,
        frame: &[u8],
        sender: u64,
        seq: u64,
        sent_ms: u64,
    ) -> ([u8; SIGNED_PART], [u8; TAG_LEN]) {
        let mut header = [0u8; SIGNED_PART];
        header[0] = SIGNED_VERSION;
        header[1..5].copy_from_slice(&self.id.to_be_bytes());
        header[5..13].copy_from_slice(&sender.to_be_bytes());
        header[13..21].copy_from_slice(&seq.to_be_bytes());
        header[21..29].copy_from_slice(&sent_ms.to_be_bytes());
        let prefix = self.prefix(channel);
        let tag = self.key.tag(&prefix, &header, frame);
        (header, tag)
    }

    /// The channel part of the MAC for `channel`, from this thread's [`SendCache`].
    fn prefix(&self, channel: &str) -> Prefix {
        let cached = SEND_CACHE.try_with(|cache| {
            let mut cache = cache.borrow_mut();
            let at = match cache
                .sealers
                .iter()
                .position(|(id, _)| *id == self.cache_id)
            {
                Some(at) => at,
                None => {
                    if cache.sealers.len() >= SEND_CACHE_SEALERS {
                        cache.sealers.remove(0);
                    }
                    cache.sealers.push((self.cache_id, HashMap::default()));
                    cache.sealers.len() - 1
                }
            };
            let channels = &mut cache.sealers[at].1;
            if let Some(prefix) = channels.get(channel) {
                return prefix.clone();
            }
            if channels.len() >= SEND_CACHE_CHANNELS {
                channels.clear();
            }
            let prefix = self.key.prefix(channel);
            channels.insert(channel.into(), prefix.clone());
            prefix
        });
        // (No cache while the thread is being torn down.)
        cached.unwrap_or_else(|_| self.key.prefix(channel))
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        // Other threads' entries go when they are evicted.
        let _ = SEND_CACHE.try_with(|cache| {
            if let Ok(mut cache) = cache.try_borrow_mut() {
                cache.sealers.retain(|(id, _)| *id != self.cache_id);
            }
        });
    }
}

/// A signed frame in a new buffer: the envelope, then `frame`.
fn assemble(header: &[u8; SIGNED_PART], tag: &[u8; TAG_LEN], frame: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(OVERHEAD + frame.len());
    out.extend_from_slice(header);
    out.extend_from_slice(tag);
    out.extend_from_slice(frame);
    Bytes::from(out)
}

/// Why a received frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("the frame is not signed, and this node accepts signed frames only")]
    Unsigned,
    #[error(
        "the frame is signed, and this node has no signing keys (give every node of the \
         deployment the same Config::signing_key)"
    )]
    NoKeys,
    #[error("the signed frame is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("the frame is signed with key id {0}, which this node does not accept")]
    UnknownKey(u32),
    #[error(
        "the tag does not verify (a wrong key, signed for another channel, or altered) \
         for key id {0}"
    )]
    BadTag(u32),
    #[error("the frame was sent {0} ms away from this node's clock, beyond the replay window")]
    Stale(i128),
    #[error("the frame was received before (sender {sender:016x}, sequence {seq})")]
    Duplicate { sender: u64, seq: u64 },
    #[error("too many senders to remember; refused until older ones expire")]
    TooManySenders,
}

impl Refused {
    /// Whether the frame is counted as a replay (authentic, but refused by the replay rule),
    /// rather than as a frame whose signature is missing or wrong.
    pub(crate) fn is_replay(&self) -> bool {
        matches!(
            self,
            Refused::Stale(_) | Refused::Duplicate { .. } | Refused::TooManySenders
        )
    }
}

/// An authentic signed frame, before the replay rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Opened {
    pub(crate) sender: u64,
    pub(crate) seq: u64,
    pub(crate) sent_ms: u64,
    /// The wrapped version-1 frame, sharing the received buffer.
    pub(crate) frame: Bytes,
}

/// Checks the frames a node receives: tags, then the replay rule.
pub(crate) struct Opener {
    /// Keys accepted, by id (a handful: a linear search).
    keys: Vec<Accepted>,
    window_ms: u64,
    guard: std::sync::Mutex<ReplayGuard>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field(
                "accepts",
                &self.keys.iter().map(|k| k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A key a node accepts, with the channel part of the MAC for each of its own channels.
struct Accepted {
    id: u32,
    key: MacKey,
    /// By the node's channel number (`slot` of [`Opener::open`]).
    own: Vec<(Box<str>, Prefix)>,
}

impl Accepted {
    /// The channel part of the MAC for `channel`, numbered `slot` among the node's own.
    fn prefix(&self, channel: &str, slot: u8) -> Prefix {
        match self.own.get(usize::from(slot)) {
            Some((name, prefix)) if **name == *channel => prefix.clone(),
            _ => self.key.prefix(channel),
        }
    }
}

impl Opener {
    /// The opener of `keys`, if they sign (a node without keys refuses signed frames), for a
    /// node that receives mostly on the channels `own`.
    pub(crate) fn new(keys: &Keys, own: &[&str]) -> Option<Opener> {
        keys.sign.as_ref()?;
        let mut ids: Vec<Accepted> = Vec::new();
        for (id, secret) in keys.sign.iter().chain(&keys.accept) {
            if !ids.iter().any(|known| known.id == *id) {
                let key = MacKey::new(secret);
                let own = own
                    .iter()
                    .map(|channel| ((*channel).into(), key.prefix(channel)))
                    .collect();
                ids.push(Accepted { id: *id, key, own });
            }
        }
        Some(Opener {
            keys: ids,
            window_ms: u64::try_from(keys.window.as_millis()).unwrap_or(u64::MAX),
            guard: std::sync::Mutex::new(ReplayGuard::default()),
        })
    }

    /// Checks the tag of `payload`, received on `channel`.
    #[cfg(test)]
    pub(crate) fn verify(&self, channel: &str, payload: &Bytes) -> Result<Opened, Refused> {
        self.verify_on(channel, u8::MAX, payload)
    }

    /// [`Opener::verify`] for the node's channel numbered `slot` (its precomputed channel
    /// part is used when `channel` is that one).
    fn verify_on(&self, channel: &str, slot: u8, payload: &Bytes) -> Result<Opened, Refused> {
        match payload.first() {
            Some(&SIGNED_VERSION) => {}
            _ => return Err(Refused::Unsigned),
        }
        if payload.len() < OVERHEAD {
            return Err(Refused::Truncated(payload.len()));
        }
        let field = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&payload[at..at + 8]);
            u64::from_be_bytes(bytes)
        };
        let mut id = [0u8; 4];
        id.copy_from_slice(&payload[1..5]);
        let id = u32::from_be_bytes(id);
        let key = self
            .keys
            .iter()
            .find(|known| known.id == id)
            .ok_or(Refused::UnknownKey(id))?;
        let header = &payload[..SIGNED_PART];
        let frame = &payload[OVERHEAD..];
        let expected = key.key.tag(&key.prefix(channel, slot), header, frame);
        let mut received = [0u8; TAG_LEN];
        received.copy_from_slice(&payload[SIGNED_PART..OVERHEAD]);
        if !tags_equal(&expected, &received) {
            return Err(Refused::BadTag(id));
        }
        Ok(Opened {
            sender: field(5),
            seq: field(13),
            sent_ms: field(21),
            frame: payload.slice(OVERHEAD..),
        })
    }

    /// Applies the replay rule to an authentic frame received on the channel numbered
    /// `channel` (the node's inbox, call or events channel), at `now_ms`.
    pub(crate) fn admit(&self, channel: u8, opened: &Opened, now_ms: u64) -> Result<(), Refused> {
        locks::lock(&self.guard).admit(
            (opened.sender, channel),
            opened.seq,
            opened.sent_ms,
            now_ms,
            self.window_ms,
        )
    }

    /// [`Opener::verify`], then [`Opener::admit`] by this machine's clock: the wrapped frame.
    pub(crate) fn open(&self, channel: &str, slot: u8, payload: &Bytes) -> Result<Bytes, Refused> {
        let opened = self.verify_on(channel, slot, payload)?;
        self.admit(slot, &opened, wall_clock_ms())?;
        Ok(opened.frame)
    }
}

/// What one (sender, channel) pair has sent: the highest sequence number accepted and which
/// of the [`SEQ_WINDOW`] up to it were.
#[derive(Debug, Clone)]
struct Seen {
    top: u64,
    /// A ring: bit `seq % SEQ_WINDOW` is set if `seq`, one of the [`SEQ_WINDOW`] sequence
    /// numbers up to `top`, was accepted. Moving `top` on clears only the bits it passes
    /// (one, usually), not the whole window.
    bits: [u64; (SEQ_WINDOW / 64) as usize],
    /// The newest `sent_ms` accepted: once the window has passed since then, every frame of
    /// this pair is stale and the pair may be forgotten.
    newest_ms: u64,
}

impl Seen {
    fn new(seq: u64, sent_ms: u64) -> Seen {
        let mut seen = Seen {
            top: seq,
            bits: [0; (SEQ_WINDOW / 64) as usize],
            newest_ms: sent_ms,
        };
        seen.set(seq);
        seen
    }

    fn word(seq: u64) -> usize {
        ((seq % SEQ_WINDOW) / 64) as usize
    }

    fn bit(&self, seq: u64) -> bool {
        self.bits[Seen::word(seq)] & (1 << (seq % 64)) != 0
    }

    fn set(&mut self, seq: u64) {
        self.bits[Seen::word(seq)] |= 1 << (seq % 64);
    }

    /// Clears the bits of `from..=to` (fewer than [`SEQ_WINDOW`] of them), a word at a time.
    fn clear(&mut self, from: u64, to: u64) {
        let mut seq = from;
        while seq <= to {
            let offset = seq % 64;
            let n = (64 - offset).min(to - seq + 1);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << offset
            };
            self.bits[Seen::word(seq)] &= !mask;
            seq += n;
        }
    }

    /// Accepts `seq` once; false if it was accepted before or is too far below the top.
    fn accept(&mut self, seq: u64) -> bool {
        if seq > self.top {
            if seq - self.top >= SEQ_WINDOW {
                self.bits = [0; (SEQ_WINDOW / 64) as usize];
            } else {
                // The numbers coming into the window take the places of those leaving it.
                self.clear(self.top + 1, seq);
            }
            self.top = seq;
            self.set(seq);
            return true;
        }
        if self.top - seq >= SEQ_WINDOW || self.bit(seq) {
            return false;
        }
        self.set(seq);
        true
    }
}

/// The replay rule's memory: per (sender, channel), which sequence numbers were accepted.
#[derive(Debug, Default)]
pub(crate) struct ReplayGuard {
    seen: HashMap<(u64, u8), Seen, foldhash::fast::RandomState>,
}

impl ReplayGuard {
    /// Admits a frame once: refused if `sent_ms` is more than `window_ms` away from `now_ms`
    /// either way, or if `seq` was accepted from `key` before (or is too old to tell).
    pub(crate) fn admit(
        &mut self,
        key: (u64, u8),
        seq: u64,
        sent_ms: u64,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<(), Refused> {
        let off = i128::from(sent_ms) - i128::from(now_ms);
        if off.unsigned_abs() > u128::from(window_ms) {
            return Err(Refused::Stale(off));
        }
        let duplicate = Refused::Duplicate { sender: key.0, seq };
        if let Some(seen) = self.seen.get_mut(&key) {
            if !seen.accept(seq) {
                return Err(duplicate);
            }
            seen.newest_ms = seen.newest_ms.max(sent_ms);
            return Ok(());
        }
        if self.seen.len() >= MAX_SENDERS {
            // Forget the pairs whose every frame is stale by now.
            self.seen
                .retain(|_, seen| seen.newest_ms.saturating_add(window_ms) >= now_ms);
            if self.seen.len() >= MAX_SENDERS {
                return Err(Refused::TooManySenders);
            }
        }
        self.seen.insert(key, Seen::new(seq, sent_ms));
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET_1: &[u8] = b"the first secret, 32 bytes long!";
    const SECRET_2: &[u8] = b"the second secret, 32 bytes long";

    fn keys(sign: (u32, &[u8]), accept: &[(u32, &[u8])]) -> Keys {
        let mut keys = Keys::default();
        keys.set_signing(sign.0, sign.1);
        for (id, secret) in accept {
            keys.add_accepted(*id, secret);
        }
        keys
    }

    fn pair(sign: (u32, &[u8]), accept: &[(u32, &[u8])]) -> (Sealer, Opener) {
        let keys = keys(sign, accept);
        (
            Sealer::new(&keys).expect("signs"),
            Opener::new(&keys, &["own:inbox", "c"]).expect("checks"),
        )
    }

    const FRAME: &[u8] = &[1, 0x92, 4, 0xa2, b'n', b'1'];

    #[test]
    fn a_sealed_frame_opens_on_its_channel_only() {
        let (sealer, opener) = pair((1, SECRET_1), &[]);
        let sealed = sealer.seal("ns:inbox:a", FRAME);
        assert_eq!(sealed.len(), OVERHEAD + FRAME.len());
        assert_eq!(sealed[0], SIGNED_VERSION);
        let opened = opener.verify("ns:inbox:a", &sealed).expect("authentic");
        assert_eq!(&opened.frame[..], FRAME);
        assert_eq!(opened.sender, sealer.sender);
        assert_eq!(opened.seq, 1);
        assert_eq!(
            opener.verify("ns:inbox:b", &sealed),
            Err(Refused::BadTag(1))
        );
        // Channels of every length around SHA-256's block (the channel part is padded to
        // it), through the opener's own channels and others alike.
        for len in [0, 59, 60, 61, 124, 200] {
            let channel = "x".repeat(len);
            let own = Opener::new(&keys((1, SECRET_1), &[]), &[channel.as_str()]).expect("checks");
            let sealed = sealer.seal(&channel, FRAME);
            assert!(
                own.verify(&channel, &sealed).is_ok(),
                "own channel of {len}"
            );
            assert!(opener.verify(&channel, &sealed).is_ok(), "channel of {len}");
            assert!(opener.verify(&format!("{channel}y"), &sealed).is_err());
        }
        // The next frame has the next sequence number.
        let next = opener
            .verify("c", &sealer.seal("c", FRAME))
            .expect("authentic");
        assert_eq!(next.seq, 8);
    }

    fn reference(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret).expect("any length");
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    #[test]
    fn the_tag_is_hmac_sha256_of_the_channel_part_header_and_frame() {
        // Against a one-shot HMAC of the documented input: keys of 32, 64 and 65 bytes,
        // channel lengths around the block's edge, frames of several lengths.
        let data: Vec<u8> = (0..400u32).map(|i| (i * 7 + 3) as u8).collect();
        for secret in [SECRET_1.to_vec(), vec![7u8; 64], vec![9u8; 65]] {
            let key = MacKey::new(&Secret(secret.as_slice().into()));
            for channel_len in [0, 1, 59, 60, 61, 64, 124, 200] {
                let channel = "c".repeat(channel_len);
                let prefix = key.prefix(&channel);
                let pad = vec![0u8; (64 - (4 + channel_len) % 64) % 64];
                for len in [0, 34, 35, 36, 99, 100, 150, 300] {
                    let frame = &data[..len];
                    let header = &data[300..329];
                    assert_eq!(
                        key.tag(&prefix, header, frame),
                        reference(
                            &secret,
                            &[
                                &(channel_len as u32).to_be_bytes(),
                                channel.as_bytes(),
                                &pad,
                                header,
                                frame
                            ]
                        ),
                        "channel {channel_len}, frame {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn frames_with_room_are_sealed_where_they_lie() {
        let (sealer, opener) = pair((1, SECRET_1), &[]);
        let call = crate::codec::encode_call_framed(7, "t.m", "caller-1", 1500, None, &("x", 3))
            .expect("call");
        let reply = crate::codec::ReplyBody::encode(&("ok", 5))
            .expect("reply")
            .into_frame(u64::MAX, crate::envelope::Status::Ok);
        let big = crate::codec::encode_call_framed(8, "t.m", "c", 1, None, &("y".repeat(20_000),))
            .expect("big call");
        let other = crate::codec::ReplyBody::encode("other")
            .expect("reply")
            .into_frame(3, crate::envelope::Status::Ok);
        // Held twice: sealed in a buffer of its own, the other holder's bytes untouched.
        let shared = other.clone();
        for (what, frame) in [
            ("call", call),
            ("reply", reply),
            ("large call", big),
            ("shared", shared),
            ("static", Bytes::from_static(FRAME)),
            ("exact", Bytes::from(FRAME.to_vec())),
        ] {
            let expected = frame.to_vec();
            let at = frame.as_ptr() as usize;
            let sealed = sealer.seal_owned("c", frame);
            let opened = opener.verify("c", &sealed).expect(what);
            assert_eq!(&opened.frame[..], &expected[..], "{what}");
            assert_eq!(sealed.len(), OVERHEAD + expected.len(), "{what}");
            if what == "call" || what == "reply" {
                // The envelope went into the room in front: the frame did not move.
                assert_eq!(sealed.as_ptr() as usize + OVERHEAD, at, "{what}");
            }
        }
        assert_eq!(
            &other[..],
            &crate::codec::encode_reply(
                3,
                crate::envelope::Status::Ok,
                &crate::codec::encode_value("other").expect("v")
            )[..]
        );
    }

    #[test]
    fn tags_are_equal_only_when_every_byte_is() {
        let tag: [u8; TAG_LEN] = std::array::from_fn(|i| i as u8 * 7);
        assert!(tags_equal(&tag, &tag));
        for at in 0..TAG_LEN {
            for bit in 0..8 {
                let mut other = tag;
                other[at] ^= 1 << bit;
                assert!(!tags_equal(&tag, &other), "byte {at} bit {bit}");
            }
        }
    }

    #[test]
    fn the_send_cache_keeps_sealers_and_channels_apart() {
        // Two sealers with different secrets on one thread, many channels (past the cache's
        // bound): each frame verifies with its own key only, on its own channel only.
        let (a, a_open) = pair((1, SECRET_1), &[]);
        let (b, b_open) = pair((1, SECRET_2), &[]);
        for round in 0..2 {
            for i in 0..(SEND_CACHE_CHANNELS + 10) {
                let channel = format!("ns:inbox:{i}");
                let sealed = a.seal(&channel, FRAME);
                assert!(a_open.verify(&channel, &sealed).is_ok(), "{round} {i}");
                assert!(b_open.verify(&channel, &sealed).is_err(), "{round} {i}");
                assert!(a_open.verify("other", &sealed).is_err());
                let sealed = b.seal(&channel, FRAME);
                assert!(b_open.verify(&channel, &sealed).is_ok());
                assert!(a_open.verify(&channel, &sealed).is_err());
            }
        }
        // More sealers than the cache keeps: the oldest are evicted and still sign right.
        let many: Vec<(Sealer, Opener)> = (0..SEND_CACHE_SEALERS + 3)
            .map(|i| pair((i as u32 + 1, SECRET_1), &[]))
            .collect();
        for _ in 0..2 {
            for (sealer, opener) in &many {
                assert!(opener.verify("c", &sealer.seal("c", FRAME)).is_ok());
            }
        }
        // The node's own channels by number: a wrong number falls back to the channel's name.
        let sealed = a.seal("own:inbox", FRAME);
        for slot in [0, 1, 2, 3, u8::MAX] {
            assert!(
                a_open.verify_on("own:inbox", slot, &sealed).is_ok(),
                "{slot}"
            );
            assert!(a_open.verify_on("c", slot, &sealed).is_err(), "{slot}");
        }
    }

    #[test]
    fn unsigned_wrong_key_and_unknown_key_are_refused() {
        let (_, opener) = pair((1, SECRET_1), &[]);
        let (other, _) = pair((1, SECRET_2), &[]);
        let (stranger, _) = pair((7, SECRET_1), &[]);
        let frame = Bytes::from_static(FRAME);
        assert_eq!(opener.verify("c", &frame), Err(Refused::Unsigned));
        assert_eq!(opener.verify("c", &Bytes::new()), Err(Refused::Unsigned));
        assert_eq!(
            opener.verify("c", &other.seal("c", FRAME)),
            Err(Refused::BadTag(1))
        );
        assert_eq!(
            opener.verify("c", &stranger.seal("c", FRAME)),
            Err(Refused::UnknownKey(7))
        );
    }

    #[test]
    fn every_alteration_of_a_signed_frame_is_refused() {
        let (sealer, opener) = pair((1, SECRET_1), &[]);
        let sealed = sealer.seal("c", FRAME);
        for at in 0..sealed.len() {
            let mut bytes = sealed.to_vec();
            bytes[at] ^= 0x01;
            assert!(
                opener.verify("c", &Bytes::from(bytes)).is_err(),
                "flip at {at}"
            );
        }
        for cut in 0..sealed.len() {
            assert!(
                opener.verify("c", &sealed.slice(..cut)).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = sealed.to_vec();
        longer.push(0);
        assert!(opener.verify("c", &Bytes::from(longer)).is_err());
    }

    #[test]
    fn malformed_tags_and_random_bytes_never_panic() {
        let (_, opener) = pair((1, SECRET_1), &[]);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for len in 0..3000usize {
            let mut buf = vec![SIGNED_VERSION];
            // Key id 1 half the time, so the tag check itself runs on garbage.
            if len % 2 == 0 {
                buf.extend_from_slice(&1u32.to_be_bytes());
            }
            for _ in 0..(len % 128) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let bytes = Bytes::from(buf);
            assert!(opener.verify("c", &bytes).is_err());
            let _ = opener.open("c", 0, &bytes);
        }
    }

    #[test]
    fn rotation_accepts_the_old_and_the_new_key() {
        // A signs with 2 and accepts 1; B still signs with 1 and accepts 2; C accepts 2 only.
        let (a_seal, a_open) = pair((2, SECRET_2), &[(1, SECRET_1)]);
        let (b_seal, b_open) = pair((1, SECRET_1), &[(2, SECRET_2)]);
        let (_, c_open) = pair((2, SECRET_2), &[]);
        assert!(a_open.verify("c", &b_seal.seal("c", FRAME)).is_ok());
        assert!(b_open.verify("c", &a_seal.seal("c", FRAME)).is_ok());
        assert!(c_open.verify("c", &a_seal.seal("c", FRAME)).is_ok());
        assert_eq!(
            c_open.verify("c", &b_seal.seal("c", FRAME)),
            Err(Refused::UnknownKey(1))
        );
    }

    #[test]
    fn a_frame_is_admitted_once_and_only_while_fresh() {
        let (sealer, opener) = pair((1, SECRET_1), &[]);
        let now = 1_000_000_000;
        let sealed = sealer.seal_as("c", FRAME, 9, 5, now);
        let opened = opener.verify("c", &sealed).expect("authentic");
        assert_eq!(opener.admit(0, &opened, now + 10), Ok(()));
        assert_eq!(
            opener.admit(0, &opened, now + 20),
            Err(Refused::Duplicate { sender: 9, seq: 5 })
        );
        // The same sequence number on another of the node's channels is another stream.
        assert_eq!(opener.admit(1, &opened, now + 20), Ok(()));
        // Stale: sent more than the window (30 s) before or after this node's clock.
        let old = opener
            .verify("c", &sealer.seal_as("c", FRAME, 9, 6, now - 30_001))
            .expect("authentic");
        assert_eq!(opener.admit(0, &old, now), Err(Refused::Stale(-30_001)));
        let ahead = opener
            .verify("c", &sealer.seal_as("c", FRAME, 9, 7, now + 30_001))
            .expect("authentic");
        assert_eq!(opener.admit(0, &ahead, now), Err(Refused::Stale(30_001)));
        let edge = opener
            .verify("c", &sealer.seal_as("c", FRAME, 9, 8, now - 30_000))
            .expect("authentic");
        assert_eq!(opener.admit(0, &edge, now), Ok(()));
        assert!(Refused::Stale(1).is_replay() && !Refused::BadTag(1).is_replay());
    }

    #[test]
    fn sequence_numbers_out_of_order_are_accepted_once() {
        let mut guard = ReplayGuard::default();
        let admit = |guard: &mut ReplayGuard, seq| guard.admit((1, 0), seq, 100, 100, 1000);
        for seq in [10, 12, 11, 5000, 4999, 905] {
            assert_eq!(admit(&mut guard, seq), Ok(()), "seq {seq}");
        }
        for seq in [10, 12, 11, 5000, 4999, 905] {
            assert!(admit(&mut guard, seq).is_err(), "again {seq}");
        }
        // More than SEQ_WINDOW below the newest: too old to tell, refused.
        assert!(admit(&mut guard, 200).is_err());
        assert!(admit(&mut guard, 5000 - SEQ_WINDOW).is_err());
        assert_eq!(admit(&mut guard, 5000 - SEQ_WINDOW + 2), Ok(())); // (+1 is 905, seen)
        // A jump past the whole window clears it; the old top is then too old.
        assert_eq!(admit(&mut guard, 1_000_000), Ok(()));
        assert!(admit(&mut guard, 5000).is_err());
        assert_eq!(admit(&mut guard, 999_999), Ok(()));
        // Each shift width keeps the bits right.
        let mut seen = Seen::new(1000, 0);
        for step in [1u64, 63, 64, 65, 127, 128, 1000, 4095] {
            let top = seen.top;
            assert!(seen.accept(top + step));
            assert!(!seen.accept(top), "step {step}: the old top is remembered");
            assert!(!seen.accept(top + step));
        }
    }

    #[test]
    fn the_sequence_window_matches_a_plain_model() {
        // The ring against the rule it implements: accepted once, and only if above the top
        // or fewer than SEQ_WINDOW below it. Jumps of every size, repeats and reorderings.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut seen = Seen::new(1000, 0);
        let mut model = std::collections::HashSet::from([1000u64]);
        let mut top = 1000u64;
        for _ in 0..50_000 {
            let r = next();
            let seq = match r % 4 {
                0 => top + 1 + r % 3,
                1 => top + (r >> 8) % (2 * SEQ_WINDOW),
                _ => top.saturating_sub((r >> 8) % (SEQ_WINDOW + 64)),
            };
            let expected = if seq > top {
                true
            } else {
                top - seq < SEQ_WINDOW && !model.contains(&seq)
            };
            assert_eq!(seen.accept(seq), expected, "seq {seq}, top {top}");
            if expected {
                model.insert(seq);
                top = top.max(seq);
            }
        }
    }

    #[test]
    fn forgotten_senders_are_the_stale_ones() {
        let mut guard = ReplayGuard::default();
        for sender in 0..MAX_SENDERS as u64 {
            assert_eq!(guard.admit((sender, 0), 1, 1_000, 1_000, 1_000), Ok(()));
        }
        // Full, and nobody's frames are stale yet: a new sender waits.
        assert_eq!(
            guard.admit((u64::MAX, 0), 1, 1_500, 1_500, 1_000),
            Err(Refused::TooManySenders)
        );
        // Past the window, the old pairs can only send stale frames: they are forgotten.
        assert_eq!(guard.admit((u64::MAX, 0), 1, 2_500, 2_500, 1_000), Ok(()));
        assert_eq!(guard.len(), 1);
        assert!(guard.admit((0, 0), 1, 1_000, 2_500, 1_000).is_err());
    }

    #[test]
    fn settings_are_checked_and_never_printed() {
        assert_eq!(Keys::default().check(), Ok(()));
        assert!(
            Sealer::new(&Keys::default()).is_none() && Opener::new(&Keys::default(), &[]).is_none()
        );
        let good = keys((2, SECRET_2), &[(1, SECRET_1)]);
        assert_eq!(good.check(), Ok(()));
        assert_eq!(good.accepted_ids(), vec![2, 1]);
        let short = keys((1, b"short"), &[]);
        assert!(short.check().expect_err("short").contains("at least 32"));
        let short_accepted = keys((1, SECRET_1), &[(2, b"short")]);
        assert!(short_accepted.check().is_err());
        let mut accept_only = Keys::default();
        accept_only.add_accepted(1, SECRET_1);
        assert!(accept_only.check().is_err());
        let clash = keys((1, SECRET_1), &[(1, SECRET_2)]);
        assert!(clash.check().is_err());
        let printed = format!(
            "{good:?} {:?} {:?}",
            Sealer::new(&good),
            Opener::new(&good, &["c"])
        );
        assert!(printed.contains("signs_with: Some(2)"), "{printed}");
        for secret in [SECRET_1, SECRET_2] {
            let text = String::from_utf8_lossy(secret);
            assert!(!printed.contains(&*text), "{printed}");
            assert!(
                !printed.contains(&format!("{:?}", &secret[..8])),
                "{printed}"
            );
        }
    }
}
