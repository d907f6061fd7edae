//! Free-form messages between nodes.

use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, mpsc};

use crate::error::Error;
use crate::node_id::NodeId;

/// A message another node sent to this one with [`Client::send`](crate::Client::send).
///
/// ```
/// # async fn demo(server: clouds_core::Server) -> Result<(), clouds_core::Error> {
/// if let Some(msg) = server.messages().next().await {
///     let text: String = msg.decode()?;
///     println!("{} says {text}", msg.from());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) from: NodeId,
    pub(crate) body: Bytes,
}

impl Message {
    /// The sender's node id.
    ///
    /// ```
    /// # fn demo(msg: clouds_core::Message) {
    /// println!("from {}", msg.from());
    /// # }
    /// ```
    pub fn from(&self) -> &NodeId {
        &self.from
    }

    /// Decodes the body into `T`.
    ///
    /// ```
    /// # fn demo(msg: clouds_core::Message) -> Result<(), clouds_core::Error> {
    /// let (kind, value): (String, u32) = msg.decode()?;
    /// # Ok(()) }
    /// ```
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        crate::codec::decode_value(&self.body).map_err(|reason| Error::Codec {
            action: format!("decode a message from {}", self.from),
            reason,
        })
    }

    /// The raw MessagePack body.
    ///
    /// ```
    /// # fn demo(msg: clouds_core::Message) {
    /// println!("{} bytes of MessagePack", msg.bytes().len());
    /// # }
    /// ```
    pub fn bytes(&self) -> &[u8] {
        &self.body
    }
}

/// The queue of messages received by a node, read with [`Messages::next`].
///
/// Every handle of a node reads the same queue: each message is handed to one reader.
/// Messages arriving while the queue is full are dropped and logged.
///
/// ```
/// # async fn demo(client: clouds_core::Client) {
/// let mut inbox = client.messages();
/// while let Some(msg) = inbox.next().await {
///     println!("from {}", msg.from());
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Messages {
    rx: Arc<Mutex<mpsc::Receiver<Message>>>,
}

impl Messages {
    /// Waits for the next message; `None` once the node has shut down.
    ///
    /// ```
    /// # async fn demo(mut inbox: clouds_core::Messages) {
    /// while let Some(msg) = inbox.next().await { /* ... */ }
    /// # }
    /// ```
    pub async fn next(&mut self) -> Option<Message> {
        self.rx.lock().await.recv().await
    }

    /// A message that has already arrived, without waiting. `None` also while another handle
    /// of the same node is waiting in [`Messages::next`].
    ///
    /// ```
    /// # fn demo(mut inbox: clouds_core::Messages) {
    /// while let Some(msg) = inbox.try_next() { /* drain what has arrived */ }
    /// # }
    /// ```
    pub fn try_next(&mut self) -> Option<Message> {
        self.rx.try_lock().ok()?.try_recv().ok()
    }
}

/// The sending half, owned by the node's receive loop.
#[derive(Debug)]
pub(crate) struct MessageQueue {
    /// `None` once closed: dropping the sender is what ends readers' `next()`, without
    /// touching the receiver a reader may be holding while it waits.
    tx: std::sync::Mutex<Option<mpsc::Sender<Message>>>,
    readers: Messages,
}

impl MessageQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        MessageQueue {
            tx: std::sync::Mutex::new(Some(tx)),
            readers: Messages {
                rx: Arc::new(Mutex::new(rx)),
            },
        }
    }

    /// Queues a message without waiting; false if the queue is full or closed.
    pub(crate) fn push(&self, message: Message) -> bool {
        match &*crate::locks::lock(&self.tx) {
            Some(tx) => tx.try_send(message).is_ok(),
            None => false,
        }
    }

    pub(crate) fn reader(&self) -> Messages {
        self.readers.clone()
    }

    /// Ends the queue: readers get what is already queued, then `None`.
    pub(crate) fn close(&self) {
        crate::locks::lock(&self.tx).take();
    }
}
