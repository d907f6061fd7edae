//! Pub/sub channel names, shared instead of copied.
//!
//! A node publishes to the same few channels over and over, and every delivery names its
//! channel. Keeping the name in one reference-counted buffer (the one fred itself uses) means
//! neither a `PUBLISH` nor a delivery allocates a copy of it.

use fred::bytes_utils::Str;

/// A pub/sub channel name. Clones share one buffer.
///
/// ```
/// use clouds_redis::Channel;
/// let inbox = Channel::from(format!("app:0:inbox:{}", "n1"));
/// let same = inbox.clone();
/// assert_eq!(same.as_str(), "app:0:inbox:n1");
/// assert_eq!(inbox, Channel::from("app:0:inbox:n1"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(pub(crate) Str);

impl Channel {
    /// The name.
    ///
    /// ```
    /// assert_eq!(clouds_redis::Channel::from("events").as_str(), "events");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for Channel {
    /// Takes the string's buffer as it is, without copying.
    fn from(name: String) -> Self {
        Channel(Str::from(name))
    }
}

impl From<&str> for Channel {
    fn from(name: &str) -> Self {
        Channel(Str::from(name))
    }
}

impl std::ops::Deref for Channel {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Channel {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}
