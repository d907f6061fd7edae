//! Node identities.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The unique, readable id of a node (server, client or monitor): `kind-host-pid-n-random`.
///
/// Messages are addressed by it and the monitor lists servers by it.
///
/// ```
/// let id = clouds_core::NodeId::from("server-web1-4242-1-0a1b2c");
/// assert_eq!(id.as_str(), "server-web1-4242-1-0a1b2c");
/// assert_eq!(id.to_string(), "server-web1-4242-1-0a1b2c");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

/// Longest node id accepted from the wire.
pub(crate) const MAX_NODE_ID_LEN: usize = 256;

impl NodeId {
    /// A fresh id for a node of `kind` in this process.
    pub(crate) fn generate(kind: &str) -> NodeId {
        static SEQ: AtomicU64 = AtomicU64::new(1);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        // RandomState is seeded from the OS per process: enough to tell apart two processes
        // that got the same pid on the same host.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(seq);
        let random = hasher.finish() & 0xff_ffff;
        let host: String = gethostname::gethostname()
            .to_string_lossy()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        let host = if host.is_empty() {
            "host".to_string()
        } else {
            host
        };
        NodeId(format!("{kind}-{host}-{}-{seq}-{random:06x}", std::process::id()).into())
    }

    /// The id as text.
    ///
    /// ```
    /// let id = clouds_core::NodeId::from("server-a-1-1-000000");
    /// assert!(id.as_str().starts_with("server-"));
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        NodeId(s.into())
    }
}

impl From<String> for NodeId {
    fn from(s: String) -> Self {
        NodeId(s.into())
    }
}

impl From<&NodeId> for NodeId {
    fn from(id: &NodeId) -> Self {
        id.clone()
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for NodeId {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_unique_and_readable() {
        let a = NodeId::generate("server");
        let b = NodeId::generate("server");
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("server-"));
        assert!(a.as_str().contains(&std::process::id().to_string()));
        assert!(!a.as_str().contains(char::is_whitespace));
    }
}
