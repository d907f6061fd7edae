//! Claims ("claim-check"): how a large call, reply or message travels without passing
//! through anyone's pub/sub buffer.
//!
//! A frame longer than the node's inline limit (`Config::claim_threshold`, or
//! `max_frame_size` if smaller) is not published as it is. The sender stores its body in a
//! Redis key of its own, `<scope>:claim:<128 random bits in hex>`, with `SET … PX` (an expiry
//! of the deadline plus a grace), and publishes a *claim frame*: the same header under the
//! claimed kind, with a claim reference (token, length, SHA-256) in place of the body
//! (`docs/protocol.md` §3.10). The receiver fetches the body with `GETDEL` when it is about
//! to use it, so there is exactly one reader and nothing is left behind, and checks its
//! length and digest.
//!
//! Fetching is a pull: a server holds at most `Config::claim_fetch_bytes` of claimed call
//! arguments at once, from the fetch until the reply is sent ([`Budget::Calls`]); the others
//! wait in Redis, within their deadline, not in the server's memory, and its subscriber
//! connection only ever carries small frames. Results and messages have a budget of the same
//! size of their own ([`Budget::Results`]), held only while they are fetched: a handler that
//! holds call budget and waits for a large result of its own can never wait on itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::codec;
use crate::config::Config;
use crate::envelope::ClaimRef;
use crate::error::Error;
use crate::namespace::Names;
use crate::transport::{Transport, TransportError, Wire};

/// A node's claim settings and its fetch budget.
#[derive(Debug)]
pub(crate) struct Claims {
    /// Frames longer than this go as claims.
    inline_limit: usize,
    /// `Config::max_body_size`.
    max_body: usize,
    /// Room for claimed call arguments fetched and not yet answered, in bytes.
    calls: Arc<Semaphore>,
    /// Room for claimed results and messages being fetched, in bytes.
    results: Arc<Semaphore>,
    /// Its size, in permits.
    budget_size: u32,
    /// Added to a claim's deadline for its expiry: the fetch itself may take a moment.
    grace: Duration,
}

impl Claims {
    pub(crate) fn new(config: &Config) -> Self {
        let budget_size = u32::try_from(config.claim_fetch_bytes).unwrap_or(u32::MAX);
        Claims {
            inline_limit: config.claim_threshold.min(config.max_frame_size),
            max_body: config.max_body_size,
            calls: Arc::new(Semaphore::new(budget_size as usize)),
            results: Arc::new(Semaphore::new(budget_size as usize)),
            budget_size,
            grace: config.transport.command_timeout,
        }
    }

    /// Whether a frame of `len` bytes travels as a claim.
    pub(crate) fn claims(&self, len: usize) -> bool {
        len > self.inline_limit
    }

    /// The largest body sent or accepted (`Config::max_body_size`).
    pub(crate) fn max_body(&self) -> usize {
        self.max_body
    }

    /// How long a claim whose receiver should take it within `deadline` is kept.
    pub(crate) fn ttl(&self, deadline: Duration) -> Duration {
        deadline.saturating_add(self.grace)
    }

    /// Waits for room in `budget` to fetch and hold a body of `len` bytes: at least 1, at most
    /// the whole budget (a body larger than the budget is still fetched, alone). Held until
    /// dropped.
    pub(crate) async fn room(&self, budget: Budget, len: u64) -> OwnedSemaphorePermit {
        let need = u32::try_from(len)
            .unwrap_or(u32::MAX)
            .clamp(1, self.budget_size);
        let budget = match budget {
            Budget::Calls => &self.calls,
            Budget::Results => &self.results,
        };
        match budget.clone().acquire_many_owned(need).await {
            Ok(permit) => permit,
            // The semaphore is never closed.
            Err(_) => unreachable!("the claim budget is never closed"),
        }
    }
}

/// Which of a node's two fetch budgets a body takes room in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Budget {
    /// The arguments of calls this server runs, held until the reply is sent.
    Calls,
    /// Results of this node's calls and messages to it, held while they are fetched.
    Results,
}

/// A body stored in Redis, and the claim frame that points at it.
#[derive(Debug)]
pub(crate) struct Stored {
    /// The key it is stored under.
    pub(crate) key: String,
    /// The claim frame to publish instead of the frame.
    pub(crate) frame: Bytes,
}

/// Stores the body of `frame` (an encoded Call, Reply or Message) for `ttl` and returns the
/// claim frame to publish in its place. Untimed: the caller bounds the wait.
pub(crate) async fn store(
    wire: &Wire,
    names: &Names,
    frame: Bytes,
    ttl: Duration,
) -> Result<Stored, Error> {
    let start = codec::body_start(&frame)
        .ok_or_else(|| Error::Protocol("only calls, replies and messages can be claimed".into()))?;
    let body = frame.slice(start..);
    let mut token = [0u8; 16];
    getrandom::fill(&mut token).map_err(|e| Error::Io {
        action: "draw a random claim key".into(),
        reason: e.to_string(),
    })?;
    let claim = ClaimRef {
        token,
        len: body.len() as u64,
        digest: Sha256::digest(&body).into(),
    };
    let key = names.claim(&token);
    let claimed = codec::encode_claimed(&frame, start, &claim);
    drop(frame);
    wire.put(&key, body, ttl).await?;
    Ok(Stored {
        key,
        frame: Bytes::from(claimed),
    })
}

/// Takes the body of `claim` from Redis (`GETDEL`): `Ok(Err(reason))` if it is gone or is not
/// what the reference says. Untimed: the caller bounds the wait.
pub(crate) async fn fetch(
    wire: &Wire,
    names: &Names,
    claim: &ClaimRef,
) -> Result<Result<Bytes, String>, TransportError> {
    let key = names.claim(&claim.token);
    let Some(body) = wire.take(&key).await? else {
        return Ok(Err(format!(
            "the claim {key} was gone (it expired before it was fetched, or was taken already)"
        )));
    };
    Ok(check(claim, body).map_err(|reason| format!("the claim {key} {reason}")))
}

/// `body` if it has the length and digest `claim` says.
fn check(claim: &ClaimRef, body: Bytes) -> Result<Bytes, String> {
    if body.len() as u64 != claim.len {
        return Err(format!(
            "holds {} bytes where its reference says {}",
            body.len(),
            claim.len
        ));
    }
    if <[u8; 32]>::from(Sha256::digest(&body)) != claim.digest {
        return Err("does not match its SHA-256 digest".into());
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Frame, Status};

    fn claim_of(body: &[u8]) -> ClaimRef {
        ClaimRef {
            token: [7; 16],
            len: body.len() as u64,
            digest: Sha256::digest(body).into(),
        }
    }

    #[test]
    fn a_body_is_accepted_only_with_its_length_and_digest() {
        let body = Bytes::from_static(b"\x92\xa1a\x01");
        assert_eq!(check(&claim_of(&body), body.clone()), Ok(body.clone()));
        let mut other = body.to_vec();
        other[3] = 2;
        assert!(
            check(&claim_of(&body), Bytes::from(other))
                .expect_err("refused")
                .contains("digest")
        );
        assert!(
            check(&claim_of(&body), body.slice(1..))
                .expect_err("refused")
                .contains("3 bytes")
        );
    }

    #[test]
    fn only_frames_over_the_smaller_limit_are_claimed() {
        let claims = Claims::new(&Config::default().claim_threshold(100));
        assert!(!claims.claims(100) && claims.claims(101));
        let claims = Claims::new(
            &Config::default()
                .claim_threshold(usize::MAX)
                .max_frame_size(2048),
        );
        assert!(!claims.claims(2048) && claims.claims(2049));
    }

    #[tokio::test]
    async fn the_budget_bounds_bytes_held_and_a_large_body_takes_it_all() {
        let claims = Claims::new(&Config::default().claim_fetch_bytes(100));
        let held = claims.room(Budget::Calls, 60).await;
        let waiting = claims.room(Budget::Calls, 60);
        tokio::pin!(waiting);
        assert!(
            futures_util::poll!(waiting.as_mut()).is_pending(),
            "only 40 bytes left"
        );
        // The other budget is not taken by this one, and does not free it.
        let result = claims.room(Budget::Results, 100).await;
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        drop(result);
        drop(held);
        let second = waiting.await;
        drop(second);
        let whole = claims.room(Budget::Calls, 1 << 30).await;
        assert_eq!(claims.calls.available_permits(), 0);
        drop(whole);
        assert_eq!(claims.calls.available_permits(), 100);
    }

    #[test]
    fn claim_frames_keep_the_header_and_carry_the_reference() {
        let args = ("x".repeat(300), 5u32);
        let call =
            Bytes::from(codec::encode_call(9, "t.m", "caller-1", 1500, &args).expect("call"));
        let start = codec::body_start(&call).expect("a call");
        let claim = claim_of(&call[start..]);
        let frame = Bytes::from(codec::encode_claimed(&call, start, &claim));
        assert!(frame.len() < 100, "{} bytes", frame.len());
        match codec::decode(&frame) {
            Ok(Frame::Claim {
                frame: inner,
                claim: got,
            }) => {
                assert_eq!(got, claim);
                let Frame::Call(c) = *inner else {
                    panic!("not a call")
                };
                assert_eq!((c.id, c.method.as_str(), c.deadline_ms), (9, "t.m", 1500));
                assert_eq!(c.reply_to, "caller-1");
                assert!(c.args.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let reply = codec::encode_reply(4, Status::AppError, &codec::encode_value("e").expect("e"));
        let start = codec::body_start(&reply).expect("a reply");
        let frame = Bytes::from(codec::encode_claimed(&reply, start, &claim));
        assert!(matches!(
            codec::decode(&frame),
            Ok(Frame::Claim { frame, .. }) if matches!(*frame, Frame::Reply(ref r) if r.id == 4 && r.status == Status::AppError)
        ));
        let message = Bytes::from(codec::encode_message(
            "n1",
            &codec::encode_value(&1u8).expect("1"),
        ));
        let start = codec::body_start(&message).expect("a message");
        let frame = Bytes::from(codec::encode_claimed(&message, start, &claim));
        assert!(matches!(
            codec::decode(&frame),
            Ok(Frame::Claim { frame, .. }) if matches!(*frame, Frame::Message { ref from, .. } if from == "n1")
        ));
        // Every truncation is an error, never a panic; a claim with bytes after it too.
        for cut in 0..frame.len() {
            assert!(codec::decode(&frame.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut longer = frame.to_vec();
        longer.push(0);
        assert!(codec::decode(&Bytes::from(longer)).is_err());
    }
}
