//! One node's connections to Redis.
//!
//! Each node holds two connections: commands (PUBLISH, scripts, reads — fred pipelines
//! concurrent commands on it by itself) and a subscriber connection. Both reconnect forever with
//! exponential backoff (fred's default is not to reconnect at all, which leaves a killed
//! subscriber dead), and the subscriber re-subscribes to its channels after each reconnect.
//!
//! The `publish`/`subscribe`/`unsubscribe` methods are the one place that chooses between
//! classic pub/sub (one server) and sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`, Redis Cluster).
//!
//! In a cluster, a channel lives on the primary that owns its slot, and fred sends both
//! `SSUBSCRIBE` and `SPUBLISH` there, so `SPUBLISH`'s receiver count covers every subscriber
//! (classic `PUBLISH` would be broadcast to every node and count only one node's). Two fred
//! behaviours need care there:
//! - each `MOVED`/`ASK` resend counts against `max_command_attempts`, so a cluster client
//!   allows `1 + REDIRECTIONS` attempts (with one, the first command after a topology change
//!   would fail);
//! - fred drops the `sunsubscribe` Redis sends when a slot migrates or its primary is demoted,
//!   and does not subscribe again: [`Transport::subscribers`] and [`Transport::resubscribe`]
//!   let the runtime notice the loss and heal it. Both first bring fred's slot map up to date,
//!   since fred may not have noticed the change at all (a demoted primary goes on serving
//!   sharded pub/sub for its old slots as a replica, see `Transport::follow_slot_map`);
//! - fred reconnects a cluster client to every primary at once and sends no command until all
//!   of them answer: while a killed primary's replica has not taken over yet, every command of
//!   the client waits, whichever slot it is for. The reconnect pause is therefore capped at
//!   250 ms in a cluster, so a client is back within that long after the failover rather than
//!   up to `reconnect_max_delay` (2 s) later.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use fred::interfaces::{
    ClientLike, ClusterInterface, EventInterface, HashesInterface, KeysInterface, PubsubInterface,
};
use fred::types::cluster::ClusterRouting;
use fred::types::config::ReconnectPolicy;
use fred::types::{Builder, Expiration, Value};
use futures_util::future::Either;
use tokio::sync::{Semaphore, broadcast};

use crate::channel::Channel;
use crate::endpoint::{Endpoint, TransportOptions};
use crate::error::TransportError;
use crate::inbound::Inbound;
use crate::script::{Script, ScriptValue};

/// fred's `PUBLISH` (or `SPUBLISH`) future, in the box it was made in.
type SendPublish<'a> = Pin<Box<dyn Future<Output = Result<i64, fred::error::Error>> + Send + 'a>>;

/// A node's command and subscriber connections to one Redis.
///
/// ```no_run
/// # async fn demo() -> Result<(), clouds_redis::TransportError> {
/// use clouds_redis::{Delivery, Endpoint, Transport, TransportOptions};
/// let endpoint = Endpoint::parse("redis://127.0.0.1:6379/3")?;
/// let transport = Transport::connect(&endpoint, &TransportOptions::default()).await?;
/// let mut inbound = transport.inbound();
/// transport.subscribe("demo").await?;
/// assert_eq!(transport.publish("demo".into(), "hi".into()).await?, 1);
/// if let Some(Delivery::Frame { payload, .. }) = inbound.recv().await {
///     assert_eq!(&payload[..], b"hi");
/// }
/// transport.close().await;
/// # Ok(()) }
/// ```
pub struct Transport {
    commands: fred::clients::Client,
    subscriber: fred::clients::SubscriberClient,
    resubscriber: tokio::task::JoinHandle<()>,
    /// Fires each time the subscriber's channels have been restored after a reconnect.
    resubscribed: broadcast::Sender<()>,
    /// Slots for `PUBLISH`es awaiting their answer (`max_pending_publishes`).
    publish_slots: Semaphore,
    /// The runtime the connections run on, where `Drop` sends QUIT from whatever thread the
    /// last handle is dropped on.
    runtime: tokio::runtime::Handle,
    options: TransportOptions,
    addr: String,
    /// Sharded pub/sub (Redis Cluster) rather than classic.
    sharded: bool,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Transport {
    /// Opens both connections; fails at once if Redis cannot be reached now.
    pub async fn connect(
        endpoint: &Endpoint,
        options: &TransportOptions,
    ) -> Result<Self, TransportError> {
        endpoint.check()?;
        let sharded = endpoint.is_cluster();
        let addr = endpoint.addr();
        #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
        let mut config = endpoint.config.clone();
        // Never plaintext for a TLS URL: without the `tls` feature `Endpoint::parse` refused it.
        #[cfg(feature = "tls")]
        if let Some(tls) = &endpoint.tls {
            let hosts = endpoint.config.server.hosts();
            let seed_name = match sharded {
                true => crate::tls::cluster_seed_name(hosts.iter().map(|h| &*h.host)),
                false => None,
            };
            config.tls = Some(crate::tls::fred_config(tls, seed_name).map_err(|reason| {
                TransportError::Tls {
                    addr: addr.clone(),
                    reason,
                }
            })?);
        }
        let mut builder = Builder::from_config(config);
        builder.with_connection_config(|c| {
            c.connection_timeout = options.connect_timeout;
            c.internal_command_timeout = options.command_timeout;
            // A command in flight when the connection drops fails instead of being written
            // again after the reconnect: a PUBLISH sent twice could run a call twice. In a
            // cluster, fred counts each MOVED/ASK resend as an attempt too, so the first
            // command after a slot moved would fail with a single attempt: there a command
            // may be written `1 + REDIRECTIONS` times (see docs/protocol.md on what that
            // means for a call whose connection drops).
            if sharded {
                c.max_command_attempts = 1 + REDIRECTIONS;
                c.max_redirections = REDIRECTIONS;
            } else {
                c.max_command_attempts = 1;
            }
            c.tcp.nodelay = Some(true);
        });
        // fred sizes every broadcast channel of a client (messages, reconnects, errors, ...)
        // by one capacity, allocated up front. Only the subscriber needs room for bursts of
        // frames; the command connection gets the minimum.
        // Commands are timed here rather than by fred, so that a PUBLISH whose caller already
        // bounds the wait (a call attempt) does not pay for a second timer.
        builder.with_performance_config(|p| {
            p.default_command_timeout = Duration::ZERO;
            p.broadcast_channel_capacity = COMMAND_EVENTS_CAPACITY;
        });
        builder.set_policy(ReconnectPolicy::new_exponential(
            0, // never give up
            millis(options.reconnect_min_delay).max(1),
            millis(reconnect_max_delay(
                options,
                sharded || endpoint.is_sentinel(),
            ))
            .max(1),
            2,
        ));
        let tls = endpoint.is_tls();
        let connect_error = |e: fred::error::Error| connect_error(&addr, tls, &e);
        let commands = builder.build().map_err(connect_error)?;
        builder.with_performance_config(|p| {
            p.default_command_timeout = options.command_timeout;
            p.broadcast_channel_capacity = options.inbound_capacity.max(COMMAND_EVENTS_CAPACITY);
        });
        let subscriber = builder.build_subscriber_client().map_err(connect_error)?;
        let connect = async {
            commands.init().await.map_err(connect_error)?;
            subscriber.init().await.map_err(connect_error)?;
            Ok::<_, TransportError>(())
        };
        match tokio::time::timeout(options.connect_timeout * 2, connect).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = commands.quit().await;
                let _ = subscriber.quit().await;
                return Err(e);
            }
            Err(_) => {
                let _ = commands.quit().await;
                let _ = subscriber.quit().await;
                return Err(TransportError::Connect {
                    addr,
                    reason: format!("no answer within {:?}", options.connect_timeout * 2),
                });
            }
        }
        let (resubscribed, _) = broadcast::channel(16);
        let resubscriber = tokio::spawn(resubscribe(
            subscriber.clone(),
            options.clone(),
            resubscribed.clone(),
        ));
        Ok(Transport {
            commands,
            subscriber,
            resubscriber,
            resubscribed,
            publish_slots: Semaphore::new(options.max_pending_publishes.max(1)),
            runtime: tokio::runtime::Handle::current(),
            options: options.clone(),
            addr,
            sharded,
        })
    }

    /// Whether this transport uses sharded pub/sub (it is connected to a Redis Cluster).
    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// `host:port` of the Redis server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The options the transport was opened with.
    pub fn options(&self) -> &TransportOptions {
        &self.options
    }

    /// Publishes `frame` on `channel`; resolves to how many subscribers received it (0:
    /// nobody is listening there, so the frame was certainly not delivered). Fails with
    /// [`TransportError::Timeout`] after the command timeout.
    ///
    /// At most `max_pending_publishes` are outstanding at once; beyond that this waits for
    /// a slot (the wait counts towards the timeout).
    pub fn publish(
        &self,
        channel: Channel,
        frame: Bytes,
    ) -> Pin<Box<impl Future<Output = Result<u64, TransportError>> + Send + '_>> {
        // Boxed (a few hundred bytes; fred's future has a box of its own): the futures that
        // await this one, a reply's among them, stay small.
        Box::pin(async move {
            let publish = async {
                // Never closed, so acquiring only fails if that changes: then publish unbounded.
                let _slot = self.publish_slots.acquire().await.ok();
                self.receivers(self.send_publish(channel, frame).await)
            };
            match tokio::time::timeout(self.options.command_timeout, publish).await {
                Ok(receivers) => receivers,
                Err(_) => Err(self.timed_out("PUBLISH")),
            }
        })
    }

    /// [`Transport::publish`] without the command timeout, for a caller that bounds the wait
    /// itself (a call attempt has its own timeout): one timer less per message. It still
    /// fails at once if the connection drops while the command is outstanding.
    ///
    /// ```no_run
    /// # async fn demo(transport: clouds_redis::Transport) -> Result<(), clouds_redis::TransportError> {
    /// use std::time::Duration;
    /// let publish = transport.publish_untimed("calls".into(), "frame".into());
    /// if let Ok(sent) = tokio::time::timeout(Duration::from_millis(200), publish).await {
    ///     println!("{} subscriber(s) got it", sent?);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn publish_untimed(
        &self,
        channel: Channel,
        frame: Bytes,
    ) -> impl Future<Output = Result<u64, TransportError>> + Send + '_ {
        // Boxed, so that the futures awaiting this one (a call's, a reply's on the receive
        // loop) stay small: a reply's must stay under glibc's per-thread cache limit
        // (BENCHMARKS.md, "Hot and cold"). A free slot (the usual case) is taken at once and
        // fred's command made in its own box. Otherwise the box waits for a slot and only then
        // makes the command, so calls waiting for a slot hold little.
        match self.publish_slots.try_acquire() {
            Ok(slot) => {
                let publish = self.send_publish(channel, frame);
                Either::Left(Box::pin(async move {
                    let _slot = slot;
                    self.receivers(publish.await)
                }))
            }
            Err(_) => Either::Right(Box::pin(async move {
                // Never closed, so acquiring only fails if that changes: then publish anyway.
                let _slot = self.publish_slots.acquire().await.ok();
                self.receivers(self.send_publish(channel, frame).await)
            })),
        }
    }

    /// The PUBLISH itself, once a slot is held: fred's command future, boxed as it is made.
    ///
    /// fred's future is 5-7 KB (5,048 B in this crate's build, 6,792 B in the bench's), and
    /// every move of a future holding it copies all of it. Boxed at once (one copy), it is
    /// never moved again; awaited inside an `async fn` whose future was then boxed, it was
    /// copied twice more per PUBLISH, on the path of every call (BENCHMARKS.md, session 12).
    /// The futures that await it are boxed in turn, small.
    fn send_publish(&self, channel: Channel, frame: Bytes) -> SendPublish<'_> {
        if self.sharded {
            Box::pin(self.commands.spublish(channel.0, Value::Bytes(frame)))
        } else {
            Box::pin(self.commands.publish(channel.0, Value::Bytes(frame)))
        }
    }

    /// What a PUBLISH returned, as the number of subscribers that received the frame.
    fn receivers(&self, published: Result<i64, fred::error::Error>) -> Result<u64, TransportError> {
        let command = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
        match published {
            Ok(receivers) => Ok(receivers.max(0) as u64),
            Err(e) => Err(self.error(command, e)),
        }
    }

    /// Subscribes to `channel`; the subscription is restored after every reconnect.
    pub async fn subscribe(&self, channel: &str) -> Result<(), TransportError> {
        if self.sharded {
            Box::pin(self.subscriber.ssubscribe(channel))
                .await
                .map_err(|e| self.error("SSUBSCRIBE", e))
        } else {
            Box::pin(self.subscriber.subscribe(channel))
                .await
                .map_err(|e| self.error("SUBSCRIBE", e))
        }
    }

    /// Unsubscribes from `channel`. Once this returns, Redis delivers nothing more from it, and
    /// everything it delivered before is already waiting in [`Inbound`].
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), TransportError> {
        if self.sharded {
            Box::pin(self.subscriber.sunsubscribe(channel))
                .await
                .map_err(|e| self.error("SUNSUBSCRIBE", e))
        } else {
            Box::pin(self.subscriber.unsubscribe(channel))
                .await
                .map_err(|e| self.error("UNSUBSCRIBE", e))
        }
    }

    /// How many connections, this one's included, are subscribed to `channel` now, as the
    /// Redis that owns it counts them (`PUBSUB SHARDNUMSUB` on its slot's primary, or
    /// `PUBSUB NUMSUB`). For a channel only this node subscribes to, 0 means its subscription
    /// was lost. In a cluster, both connections first catch up with the cluster's slot map
    /// (see `Transport::follow_slot_map`), so the count comes from the slot's primary.
    ///
    /// ```no_run
    /// # async fn demo(transport: clouds_redis::Transport) -> Result<(), clouds_redis::TransportError> {
    /// transport.subscribe("inbox:me").await?;
    /// if transport.subscribers("inbox:me").await? == 0 {
    ///     transport.resubscribe("inbox:me").await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribers(&self, channel: &str) -> Result<u64, TransportError> {
        let command = if self.sharded {
            self.follow_slot_map().await?;
            "PUBSUB SHARDNUMSUB"
        } else {
            "PUBSUB NUMSUB"
        };
        let count = async {
            if self.sharded {
                Box::pin(self.commands.pubsub_shardnumsub::<Value, _>(channel)).await
            } else {
                Box::pin(self.commands.pubsub_numsub::<Value, _>(channel)).await
            }
        };
        let value = tokio::time::timeout(self.options.command_timeout, count)
            .await
            .map_err(|_| self.timed_out(command))?
            .map_err(|e| self.error(command, e))?;
        // `[channel, count]`, as an array or (RESP3) a map.
        let count = match value {
            Value::Array(items) => items.into_iter().nth(1).and_then(|v| v.as_i64()),
            Value::Map(map) => map.inner().into_iter().next().and_then(|(_, v)| v.as_i64()),
            _ => None,
        };
        count
            .map(|n| n.max(0) as u64)
            .ok_or_else(|| TransportError::Reply {
                command,
                reason: "expected [channel, count]".into(),
            })
    }

    /// Sends the subscription for `channel` again, to wherever it lives now: heals a sharded
    /// subscription that Redis ended when its slot moved (fred does not notice that). Harmless
    /// when the subscription is still there. In a cluster, both connections first catch up
    /// with the cluster's slot map (see `Transport::follow_slot_map`), so the subscription
    /// goes to the slot's primary.
    pub async fn resubscribe(&self, channel: &str) -> Result<(), TransportError> {
        if self.sharded {
            self.follow_slot_map().await?;
        }
        self.subscribe(channel).await
    }

    /// In a cluster, reads which primary owns which slots (`CLUSTER SLOTS`) and has each of
    /// the two connections whose routing differs refresh it (fred's `sync_cluster`: the new
    /// map, connections to new primaries, none to nodes that are no longer primaries).
    ///
    /// fred learns a new slot map only from a `MOVED`/`ASK` reply or a reconnect. After a
    /// manual failover neither comes: the demoted primary, now a replica, goes on serving
    /// `SSUBSCRIBE`, `SPUBLISH` and `PUBSUB SHARDNUMSUB` for its old slots itself (Redis lets
    /// a replica of the slot's primary serve sharded pub/sub without redirecting). A
    /// subscription healed through the old map would land on that replica, where frames
    /// still reach it (the shard passes them on) while `SPUBLISH` on the primary counts 0
    /// receivers: a caller with the new map would then take a listening provider for gone,
    /// re-route a call it already received, or fail it with `NoProvider`.
    async fn follow_slot_map(&self) -> Result<(), TransportError> {
        const COMMAND: &str = "CLUSTER SLOTS";
        let timeout = self.options.command_timeout;
        let slots: Value = tokio::time::timeout(timeout, Box::pin(self.commands.cluster_slots()))
            .await
            .map_err(|_| self.timed_out(COMMAND))?
            .map_err(|e| self.error(COMMAND, e))?;
        let now = ClusterRouting::from_cluster_slots(slots, "")
            .map(|routing| slot_owners(&routing))
            .map_err(|e| self.error(COMMAND, e))?;
        let stale = |routing: Option<ClusterRouting>| {
            routing.is_none_or(|routing| slot_owners(&routing) != now)
        };
        if stale(self.commands.cached_cluster_state()) {
            tracing::debug!(addr = %self.addr, "the cluster's slot map changed; following it");
            tokio::time::timeout(timeout, Box::pin(self.commands.sync_cluster()))
                .await
                .map_err(|_| self.timed_out(COMMAND))?
                .map_err(|e| self.error(COMMAND, e))?;
        }
        // Refreshing the subscriber drops its connections to demoted primaries (and the
        // subscriptions there) and reports the new connections as reconnects, after which
        // `resubscribe` (the task) restores every channel where it belongs.
        if stale(self.subscriber.cached_cluster_state()) {
            tokio::time::timeout(timeout, Box::pin(self.subscriber.sync_cluster()))
                .await
                .map_err(|_| self.timed_out(COMMAND))?
                .map_err(|e| self.error(COMMAND, e))?;
        }
        Ok(())
    }

    /// A receiver for everything the subscriber connection delivers from now on.
    pub fn inbound(&self) -> Inbound {
        Inbound {
            rx: self.subscriber.message_rx(),
        }
    }

    /// Notifications of recovery: the command connection reconnected, or the subscriber
    /// connection reconnected *and* its channels are subscribed again (so a node announcing
    /// itself on this signal can really be reached).
    pub fn reconnects(&self) -> Reconnects {
        Reconnects {
            commands: self.commands.reconnect_rx(),
            subscriber: self.resubscribed.subscribe(),
        }
    }

    /// Runs `script` with EVALSHA (loading it first if Redis does not know it). The
    /// arguments are binary-safe (a frame to publish can be one).
    pub async fn eval(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Bytes>,
    ) -> Result<ScriptValue, TransportError> {
        let eval = Box::pin(script.inner.evalsha_with_reload(&self.commands, keys, args));
        let value: Value = tokio::time::timeout(self.options.command_timeout, eval)
            .await
            .map_err(|_| self.timed_out("EVALSHA"))?
            .map_err(|e| self.error("EVALSHA", e))?;
        Ok(ScriptValue::from_fred(value))
    }

    /// Reads a whole hash as field/value pairs (empty if the key does not exist).
    pub async fn hgetall(&self, key: &str) -> Result<Vec<(Bytes, Bytes)>, TransportError> {
        let value: Value = tokio::time::timeout(
            self.options.command_timeout,
            Box::pin(self.commands.hgetall(key)),
        )
        .await
        .map_err(|_| self.timed_out("HGETALL"))?
        .map_err(|e| self.error("HGETALL", e))?;
        let pairs = match value {
            Value::Map(map) => map
                .inner()
                .into_iter()
                .map(|(k, v)| (k.into_bytes(), v.into_bytes().unwrap_or_default()))
                .collect(),
            Value::Array(items) => {
                let mut items = items.into_iter();
                let mut pairs = Vec::new();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    pairs.push((
                        k.into_bytes().unwrap_or_default(),
                        v.into_bytes().unwrap_or_default(),
                    ));
                }
                pairs
            }
            Value::Null => Vec::new(),
            other => {
                return Err(TransportError::Reply {
                    command: "HGETALL",
                    reason: format!("expected a map, got {:?}", other.kind()),
                });
            }
        };
        Ok(pairs)
    }

    /// Stores `value` at `key` for `ttl` (`SET key value PX ttl`), replacing what was there.
    /// Untimed: the caller bounds the wait (a large value takes a while to write). In a
    /// cluster the command goes to whichever primary owns the key's slot.
    ///
    /// ```no_run
    /// # async fn demo(transport: clouds_redis::Transport) -> Result<(), clouds_redis::TransportError> {
    /// use std::time::Duration;
    /// transport.set_px("app:0:claim:ab12", "body".into(), Duration::from_secs(5)).await?;
    /// assert_eq!(transport.getdel("app:0:claim:ab12").await?.as_deref(), Some(&b"body"[..]));
    /// # Ok(()) }
    /// ```
    pub async fn set_px(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), TransportError> {
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let set = self.commands.set::<Value, _, _>(
            key,
            Value::Bytes(value),
            Some(Expiration::PX(ttl)),
            None,
            false,
        );
        Box::pin(set).await.map_err(|e| self.error("SET", e))?;
        Ok(())
    }

    /// Reads and deletes `key` in one step (`GETDEL`, Redis 6.2+): its value, or `None` if
    /// there was none. Untimed, like [`Transport::set_px`].
    pub async fn getdel(&self, key: &str) -> Result<Option<Bytes>, TransportError> {
        let value: Value = Box::pin(self.commands.getdel::<Value, _>(key))
            .await
            .map_err(|e| self.error("GETDEL", e))?;
        match value {
            Value::Null => Ok(None),
            value @ (Value::Bytes(_) | Value::String(_)) => Ok(value.into_bytes()),
            other => Err(TransportError::Reply {
                command: "GETDEL",
                reason: format!("expected a string or nil, got {:?}", other.kind()),
            }),
        }
    }

    /// Deletes `key` (`DEL`), bounded by the command timeout; no error if it was not there.
    pub async fn del(&self, key: &str) -> Result<(), TransportError> {
        let del = Box::pin(self.commands.del::<Value, _>(key));
        tokio::time::timeout(self.options.command_timeout, del)
            .await
            .map_err(|_| self.timed_out("DEL"))?
            .map_err(|e| self.error("DEL", e))?;
        Ok(())
    }

    /// Whether both connections are up right now.
    pub fn is_connected(&self) -> bool {
        self.commands.is_connected() && self.subscriber.is_connected()
    }

    /// Closes both connections: pending commands finish first, then [`Inbound`] ends.
    pub async fn close(&self) {
        self.resubscriber.abort();
        let wait = self.options.command_timeout;
        let _ = tokio::time::timeout(wait, self.subscriber.quit()).await;
        let _ = tokio::time::timeout(wait, self.commands.quit()).await;
    }

    fn error(&self, command: &'static str, e: fred::error::Error) -> TransportError {
        TransportError::from_fred(command, self.options.command_timeout, e)
    }

    fn timed_out(&self, command: &'static str) -> TransportError {
        TransportError::Timeout {
            command,
            after: self.options.command_timeout,
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        // fred's connection tasks hold their own handles and would outlive this value, so a
        // transport dropped without `close()` still sends QUIT on both connections.
        // If that runtime is gone, so are the connection tasks, and there is nothing to close.
        self.resubscriber.abort();
        let commands = self.commands.clone();
        let subscriber = self.subscriber.clone();
        self.runtime.spawn(async move {
            let _ = subscriber.quit().await;
            let _ = commands.quit().await;
        });
    }
}

/// Tells when a [`Transport`] has recovered from a lost connection.
pub struct Reconnects {
    commands: broadcast::Receiver<fred::types::config::Server>,
    subscriber: broadcast::Receiver<()>,
}

impl Reconnects {
    /// Waits for the next recovery; `None` once the transport is closed.
    pub async fn recv(&mut self) -> Option<()> {
        use broadcast::error::RecvError;
        let result = tokio::select! {
            r = self.commands.recv() => r.map(|_| ()),
            r = self.subscriber.recv() => r,
        };
        match result {
            Ok(()) | Err(RecvError::Lagged(_)) => Some(()),
            Err(RecvError::Closed) => None,
        }
    }
}

/// Restores the subscriber's channels after every reconnect, retrying until it works.
///
/// fred's own `manage_subscriptions` gives up after one failed attempt (and stops for good on
/// a lagged notification), which would leave a node connected but deaf.
async fn resubscribe(
    subscriber: fred::clients::SubscriberClient,
    options: TransportOptions,
    done: broadcast::Sender<()>,
) {
    use broadcast::error::RecvError;
    let mut reconnects = subscriber.reconnect_rx();
    loop {
        match reconnects.recv().await {
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
        let mut delay = options.reconnect_min_delay.max(Duration::from_millis(1));
        while let Err(e) = subscriber.resubscribe_all().await {
            tracing::warn!(error = %e, "could not restore subscriptions after a reconnect; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(options.reconnect_max_delay.max(delay));
        }
        let _ = done.send(());
    }
}

/// Cluster redirections (`MOVED`, `ASK`) one command may follow; also what raises its write
/// attempts above 1 in a cluster (see `connect`).
const REDIRECTIONS: u32 = 3;

/// The error of a failed first connection: a TLS handshake failure told as such (what was
/// refused and what to check), anything else as a connect error.
fn connect_error(addr: &str, tls: bool, e: &fred::error::Error) -> TransportError {
    let text = e.to_string();
    let tls_error = |reason: String| TransportError::Tls {
        addr: addr.to_string(),
        reason,
    };
    // fred passes rustls' errors on as text: `InvalidCertificate(UnknownIssuer)`,
    // `AlertReceived(CertificateRequired)`, ...
    if text.contains("InvalidCertificate(NotValidForName") {
        return tls_error(format!(
            "the server's certificate does not name the address connected to ({text}); on a \
             Redis Cluster that is the address a node announces (CLUSTER SLOTS), usually an \
             IP address: name the seed nodes by the DNS name the certificates were made for \
             (a node's certificate may then name that instead of the node's IP address), or \
             put the addresses in the certificates"
        ));
    }
    if let Some(what) = between(&text, "InvalidCertificate(", ")") {
        return tls_error(format!(
            "the server's certificate was refused ({what}); check the CA \
             (Config::tls_ca_pem / tls_ca_file, or the system trust store and SSL_CERT_FILE) \
             and that the certificate names this host"
        ));
    }
    if let Some(alert) = between(&text, "AlertReceived(", ")") {
        return tls_error(format!(
            "the server ended the handshake with the alert {alert}; does it require a \
             client certificate (Config::tls_client_cert_pem) or one from another CA?"
        ));
    }
    if tls && text.contains("Failed to connect to all sentinel nodes") {
        // fred drops the reason of each sentinel's failure, a refused handshake included.
        return tls_error(format!(
            "no sentinel could be reached over TLS ({text}); fred does not say why: a refused \
             certificate looks like this too, so check the CA (Config::tls_ca_pem / \
             tls_ca_file), that the sentinels' certificates name the addresses in the URL, \
             and that the sentinels are up and serve TLS there"
        ));
    }
    if tls && matches!(e.kind(), fred::error::ErrorKind::Timeout) {
        // A plaintext Redis takes a TLS hello for the start of a command and waits.
        return tls_error(format!(
            "no TLS handshake within the connect timeout ({text}); is this a plaintext \
             port? use redis:// there"
        ));
    }
    if tls && (text.contains("InvalidContentType") || text.contains("CorruptMessage")) {
        return tls_error(format!(
            "the server did not answer in TLS ({text}); is it a plaintext port? use redis://"
        ));
    }
    TransportError::Connect {
        addr: addr.to_string(),
        reason: text,
    }
}

/// The text between `start` and the next `end` in `text`.
fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(&text[from..from + len])
}

/// Each slot range of a cluster's map, with the node id of the primary that owns it.
fn slot_owners(routing: &ClusterRouting) -> Vec<(u16, u16, String)> {
    routing
        .slots()
        .iter()
        .map(|range| (range.start, range.end, range.id.to_string()))
        .collect()
}

/// Longest pause between two reconnect attempts of a cluster client, whatever
/// `reconnect_max_delay` says: while one primary is down, fred's cluster client sends no
/// command at all (see the module doc), so a long pause would keep the whole client down that
/// much longer after the cluster has failed over. Each attempt costs a `CLUSTER SLOTS` on a
/// live node and a connection attempt to the missing one. The same holds for a primary
/// found through Sentinel: until the sentinels promote the replica, each attempt finds the
/// dead one.
const CLUSTER_RECONNECT_MAX_DELAY: Duration = Duration::from_millis(250);

/// The longest reconnect pause: `reconnect_max_delay`, capped where Redis fails over by
/// itself (a cluster, Sentinel) at [`CLUSTER_RECONNECT_MAX_DELAY`] (but never below
/// `reconnect_min_delay`).
fn reconnect_max_delay(options: &TransportOptions, fails_over: bool) -> Duration {
    if fails_over {
        options
            .reconnect_max_delay
            .min(CLUSTER_RECONNECT_MAX_DELAY)
            .max(options.reconnect_min_delay)
    } else {
        options.reconnect_max_delay
    }
}

/// Broadcast capacity of the command connection, which only reports reconnects and errors.
const COMMAND_EVENTS_CAPACITY: usize = 16;

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_client_reconnects_at_least_every_250_ms() {
        let mut options = TransportOptions::default();
        assert_eq!(reconnect_max_delay(&options, false), Duration::from_secs(2));
        assert_eq!(
            reconnect_max_delay(&options, true),
            Duration::from_millis(250)
        );
        options.reconnect_max_delay = Duration::from_millis(100);
        assert_eq!(
            reconnect_max_delay(&options, true),
            Duration::from_millis(100)
        );
        // Never below the first pause.
        options.reconnect_min_delay = Duration::from_millis(400);
        options.reconnect_max_delay = Duration::from_secs(1);
        assert_eq!(
            reconnect_max_delay(&options, true),
            Duration::from_millis(400)
        );
    }
}
