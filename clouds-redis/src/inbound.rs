//! The receive side of a node's subscriber connection.
//!
//! fred hands pub/sub messages out through a tokio broadcast channel. Its own `on_message`
//! helper stops for good at the first `Lagged`; this receiver reports the lag (how many frames
//! were lost) and carries on, so a burst never silently kills a node's inbox.

use bytes::Bytes;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use crate::channel::Channel;

/// One item from the subscriber connection.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A frame published on `channel`.
    Frame {
        /// The channel it arrived on.
        channel: Channel,
        /// The raw bytes as published.
        payload: Bytes,
    },
    /// The receive loop fell behind and this many frames were dropped before it read them.
    Lagged(u64),
}

/// Receives what the subscriber connection delivers, in order.
///
/// Obtained from [`Transport::inbound`](crate::Transport::inbound); see there for an example.
pub struct Inbound {
    pub(crate) rx: broadcast::Receiver<fred::types::Message>,
}

impl Inbound {
    /// Waits for the next delivery; `None` once the transport has been closed.
    pub async fn recv(&mut self) -> Option<Delivery> {
        match self.rx.recv().await {
            Ok(message) => Some(to_delivery(message)),
            Err(RecvError::Lagged(n)) => Some(Delivery::Lagged(n)),
            Err(RecvError::Closed) => None,
        }
    }

    /// Returns a delivery that has already arrived, without waiting; `None` when there is none.
    /// Used to drain what is buffered before a node stops reading.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        match self.rx.try_recv() {
            Ok(message) => Some(to_delivery(message)),
            Err(TryRecvError::Lagged(n)) => Some(Delivery::Lagged(n)),
            Err(TryRecvError::Empty | TryRecvError::Closed) => None,
        }
    }
}

fn to_delivery(message: fred::types::Message) -> Delivery {
    Delivery::Frame {
        channel: Channel(message.channel),
        // Bulk strings arrive as `String` or `Bytes` depending on UTF-8 validity; both are a
        // cheap reference-counted view of the same buffer. Anything else is not a frame of
        // ours, and an empty payload fails decoding upstream where it is counted.
        payload: message.value.into_bytes().unwrap_or_default(),
    }
}
