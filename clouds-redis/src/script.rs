//! Lua scripts and the shape of their replies.

use bytes::Bytes;

/// A Lua script run with EVALSHA; after a Redis restart (`NOSCRIPT`) it is loaded again.
///
/// ```
/// let script = clouds_redis::Script::new("return redis.call('TIME')");
/// assert_eq!(script.sha1().len(), 40);
/// ```
#[derive(Debug, Clone)]
pub struct Script {
    pub(crate) inner: fred::types::scripts::Script,
}

impl Script {
    /// Wraps the Lua source; its SHA-1 is computed here, once.
    pub fn new(lua: &'static str) -> Self {
        Script {
            inner: fred::types::scripts::Script::from_lua(lua),
        }
    }

    /// The SHA-1 that EVALSHA uses.
    pub fn sha1(&self) -> &str {
        self.inner.sha1()
    }
}

/// A script's reply: Redis's types as Lua returns them.
///
/// ```
/// use clouds_redis::ScriptValue;
/// let v = ScriptValue::Array(vec![ScriptValue::Int(1), ScriptValue::Bytes("a".into())]);
/// assert_eq!(v.as_array().map(|a| a.len()), Some(2));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum ScriptValue {
    /// `nil` (Lua `false` or no value).
    Nil,
    /// An integer (Lua numbers are truncated to integers by Redis).
    Int(i64),
    /// A bulk or status string.
    Bytes(Bytes),
    /// An array.
    Array(Vec<ScriptValue>),
}

impl ScriptValue {
    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            ScriptValue::Int(i) => Some(*i),
            ScriptValue::Bytes(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[ScriptValue]> {
        match self {
            ScriptValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The text, if this is a UTF-8 string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            ScriptValue::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    pub(crate) fn from_fred(value: fred::types::Value) -> Self {
        use fred::types::Value;
        match value {
            Value::Null => ScriptValue::Nil,
            Value::Boolean(b) => ScriptValue::Int(b as i64),
            Value::Integer(i) => ScriptValue::Int(i),
            Value::Double(d) => ScriptValue::Int(d as i64),
            Value::Array(items) => {
                ScriptValue::Array(items.into_iter().map(ScriptValue::from_fred).collect())
            }
            Value::Map(map) => ScriptValue::Array(
                map.inner()
                    .into_iter()
                    .flat_map(|(k, v)| {
                        [
                            ScriptValue::Bytes(k.into_bytes()),
                            ScriptValue::from_fred(v),
                        ]
                    })
                    .collect(),
            ),
            other => ScriptValue::Bytes(other.into_bytes().unwrap_or_default()),
        }
    }
}
