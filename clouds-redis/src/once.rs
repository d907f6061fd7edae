//! The two scripts of exactly-once calls (`docs/protocol.md` §6.5): set a key unless it has a
//! value, and replace (or delete) a key's value only if it is the one expected. Each touches
//! one key, so on a Redis Cluster each runs on whichever primary owns that key's slot.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;

use crate::error::TransportError;
use crate::script::{Script, ScriptValue};
use crate::transport::Transport;

/// `ONCE_BEGIN`: `KEYS[1]` = the record, `ARGV[1]` = the value to set, `ARGV[2]` = its expiry
/// in ms. Returns nil if it set the value, else the value the key has.
///
/// ```
/// assert!(clouds_redis::once::ONCE_BEGIN_LUA.contains("redis.call('GET', KEYS[1])"));
/// ```
pub const ONCE_BEGIN_LUA: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"#;

/// `ONCE_SWAP`: `KEYS[1]` = the record, `ARGV[1]` = the value expected, `ARGV[2]` = the new
/// value (empty: delete the key), `ARGV[3]` = its expiry in ms. Returns 1 if the key had the
/// expected value (and was replaced or deleted), else 0.
///
/// ```
/// assert!(clouds_redis::once::ONCE_SWAP_LUA.contains("redis.call('DEL', KEYS[1])"));
/// ```
pub const ONCE_SWAP_LUA: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"#;

static ONCE_BEGIN: LazyLock<Script> = LazyLock::new(|| Script::new(ONCE_BEGIN_LUA));
static ONCE_SWAP: LazyLock<Script> = LazyLock::new(|| Script::new(ONCE_SWAP_LUA));

fn millis(ttl: Duration) -> Bytes {
    Bytes::from(ttl.as_millis().clamp(1, i64::MAX as u128).to_string())
}

impl Transport {
    /// Sets `key` to `value` for `ttl` unless it has a value, in one step (`ONCE_BEGIN`):
    /// `None` if this call set it, else the value it has. Bounded by the command timeout.
    ///
    /// ```no_run
    /// # async fn demo(transport: clouds_redis::Transport) -> Result<(), clouds_redis::TransportError> {
    /// use std::time::Duration;
    /// let ttl = Duration::from_secs(5);
    /// assert_eq!(transport.set_if_absent("app:0:once:k", "a".into(), ttl).await?, None);
    /// assert_eq!(transport.set_if_absent("app:0:once:k", "b".into(), ttl).await?.as_deref(), Some(&b"a"[..]));
    /// # Ok(()) }
    /// ```
    pub async fn set_if_absent(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<Option<Bytes>, TransportError> {
        match self
            .eval(&ONCE_BEGIN, vec![key.to_string()], vec![value, millis(ttl)])
            .await?
        {
            // Lua's `false` is nil; an integer 0 only if a protocol version ever maps it so.
            ScriptValue::Nil | ScriptValue::Int(0) => Ok(None),
            ScriptValue::Bytes(value) => Ok(Some(value)),
            other => Err(TransportError::Reply {
                command: "EVALSHA",
                reason: format!("ONCE_BEGIN returned {other:?}, expected nil or a string"),
            }),
        }
    }

    /// If `key`'s value is `expected`, replaces it with `new` for `ttl` (`None`: deletes the
    /// key), in one step (`ONCE_SWAP`): whether it did. Bounded by the command timeout.
    ///
    /// ```no_run
    /// # async fn demo(transport: clouds_redis::Transport) -> Result<(), clouds_redis::TransportError> {
    /// use std::time::Duration;
    /// let ttl = Duration::from_secs(5);
    /// let swapped = transport.swap_if("app:0:once:k", "a".into(), Some("done".into()), ttl).await?;
    /// # Ok(()) }
    /// ```
    pub async fn swap_if(
        &self,
        key: &str,
        expected: Bytes,
        new: Option<Bytes>,
        ttl: Duration,
    ) -> Result<bool, TransportError> {
        let new = new.unwrap_or_default();
        let reply = self
            .eval(
                &ONCE_SWAP,
                vec![key.to_string()],
                vec![expected, new, millis(ttl)],
            )
            .await?;
        match reply.as_int() {
            Some(n) => Ok(n == 1),
            None => Err(TransportError::Reply {
                command: "EVALSHA",
                reason: format!("ONCE_SWAP returned {reply:?}, expected 0 or 1"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/protocol.md` §6.5 gives both scripts verbatim.
    #[test]
    fn the_protocol_document_has_the_scripts_as_they_are() {
        let spec = include_str!("../../docs/protocol.md");
        for script in [ONCE_BEGIN_LUA, ONCE_SWAP_LUA] {
            let body = script.trim();
            assert!(spec.contains(body), "protocol.md lacks:\n{body}");
        }
    }
}
