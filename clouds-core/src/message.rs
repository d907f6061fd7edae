//! Free-form messages between nodes.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::ReusableBoxFuture;

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

/// The queue of messages received by a node, read with [`Messages::next`] or as a
/// [`Stream`](futures_util::Stream).
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
pub struct Messages {
    queue: Arc<Shared>,
    /// The wait that `Stream::poll_next` is driving, kept between polls (in one box, reused).
    /// It holds no lock while it waits, so a stream polled once and then left idle keeps no
    /// other reader from the queue.
    polling: Option<ReusableBoxFuture<'static, Option<Message>>>,
}

/// The queue itself, shared by the node and every reader.
#[derive(Debug)]
struct Shared {
    state: std::sync::Mutex<Queue>,
    /// Wakes every waiting reader when a message arrives or the queue closes; each then
    /// tries to take one, so a reader that stopped polling cannot swallow a wake-up.
    changed: Notify,
}

#[derive(Debug)]
struct Queue {
    messages: VecDeque<Message>,
    capacity: usize,
    closed: bool,
}

impl Shared {
    /// A message if one is queued; `Err(())` once closed and empty.
    fn take(&self) -> Result<Option<Message>, ()> {
        let mut queue = crate::locks::lock(&self.state);
        match queue.messages.pop_front() {
            Some(message) => Ok(Some(message)),
            None if queue.closed => Err(()),
            None => Ok(None),
        }
    }
}

impl Clone for Messages {
    /// Another reader of the same queue.
    fn clone(&self) -> Self {
        Messages {
            queue: self.queue.clone(),
            polling: None,
        }
    }
}

impl std::fmt::Debug for Messages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messages").finish_non_exhaustive()
    }
}

/// Waits for the next message of `queue`; `None` once it is closed and empty.
async fn next_of(queue: Arc<Shared>) -> Option<Message> {
    loop {
        // Registered before looking, so a message pushed in between still wakes this wait.
        let changed = queue.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match queue.take() {
            Ok(Some(message)) => return Some(message),
            Err(()) => return None,
            Ok(None) => changed.await,
        }
    }
}

/// The messages as a stream, for `StreamExt` combinators; it ends when the node shuts down.
///
/// ```
/// # async fn demo(client: clouds_core::Client) {
/// use futures_util::StreamExt;
/// let first_three: Vec<_> = client.messages().take(3).collect().await;
/// # }
/// ```
impl futures_util::Stream for Messages {
    type Item = Message;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let this = self.get_mut();
        let queue = &this.queue;
        let waiting = this
            .polling
            .get_or_insert_with(|| ReusableBoxFuture::new(next_of(queue.clone())));
        let next = std::task::ready!(waiting.poll(cx));
        // The next wait starts on the next poll, reusing the box.
        waiting.set(next_of(queue.clone()));
        Poll::Ready(next)
    }
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
        next_of(self.queue.clone()).await
    }

    /// A message that has already arrived, without waiting.
    ///
    /// ```
    /// # fn demo(mut inbox: clouds_core::Messages) {
    /// while let Some(msg) = inbox.try_next() { /* drain what has arrived */ }
    /// # }
    /// ```
    pub fn try_next(&mut self) -> Option<Message> {
        self.queue.take().ok().flatten()
    }
}

/// The node's side of its message queue, fed by the receive loop.
#[derive(Debug)]
pub(crate) struct MessageQueue {
    readers: Messages,
}

impl MessageQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        let shared = Shared {
            state: std::sync::Mutex::new(Queue {
                messages: VecDeque::new(),
                capacity,
                closed: false,
            }),
            changed: Notify::new(),
        };
        MessageQueue {
            readers: Messages {
                queue: Arc::new(shared),
                polling: None,
            },
        }
    }

    /// Queues a message without waiting; false if the queue is full or closed.
    pub(crate) fn push(&self, message: Message) -> bool {
        let shared = &self.readers.queue;
        {
            let mut queue = crate::locks::lock(&shared.state);
            if queue.closed || queue.messages.len() >= queue.capacity {
                return false;
            }
            queue.messages.push_back(message);
        }
        shared.changed.notify_waiters();
        true
    }

    pub(crate) fn reader(&self) -> Messages {
        self.readers.clone()
    }

    /// Ends the queue: readers get what is already queued, then `None`.
    pub(crate) fn close(&self) {
        let shared = &self.readers.queue;
        crate::locks::lock(&shared.state).closed = true;
        shared.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn message(n: u8) -> Message {
        Message {
            from: NodeId::from("client-a"),
            body: Bytes::from(crate::codec::encode_value(&n).expect("encode")),
        }
    }

    #[tokio::test]
    async fn messages_stream_in_order_and_end_when_closed() {
        let queue = MessageQueue::new(8);
        for n in 0..3 {
            assert!(queue.push(message(n)));
        }
        queue.close();
        let got: Vec<u8> = queue
            .reader()
            .map(|m| m.decode::<u8>().expect("decode"))
            .collect()
            .await;
        assert_eq!(got, vec![0, 1, 2]);
        assert!(!queue.push(message(9)), "a closed queue takes nothing");
    }

    #[tokio::test]
    async fn a_stream_polled_once_and_left_idle_blocks_no_other_reader() {
        let queue = MessageQueue::new(8);
        let mut idle = queue.reader();
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            StreamExt::next(&mut idle),
        )
        .await;
        assert!(waited.is_err(), "nothing to read yet");
        assert!(queue.push(message(7)));
        let mut other = queue.reader();
        let got = tokio::time::timeout(std::time::Duration::from_secs(1), other.next())
            .await
            .expect("the idle stream holds nothing")
            .expect("a message");
        assert_eq!(got.decode::<u8>().ok(), Some(7));
        queue.close();
        assert!(other.next().await.is_none());
        assert!(
            StreamExt::next(&mut idle).await.is_none(),
            "the idle one ends too"
        );
    }

    #[tokio::test]
    async fn each_message_goes_to_one_reader_and_a_full_queue_refuses() {
        let queue = MessageQueue::new(2);
        assert!(queue.push(message(1)));
        assert!(queue.push(message(2)));
        assert!(!queue.push(message(3)), "full");
        let mut a = queue.reader();
        let mut b = queue.reader();
        let first = a.next().await.expect("one");
        let second = StreamExt::next(&mut b).await.expect("two");
        assert_eq!(first.decode::<u8>().ok(), Some(1));
        assert_eq!(second.decode::<u8>().ok(), Some(2));
        assert!(a.try_next().is_none(), "nothing left for anyone");
    }
}
