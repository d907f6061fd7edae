//! Serving methods: registration, heartbeats and graceful shutdown.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::Client;
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::error::Error;
use crate::heartbeat::{self, Advert, Heartbeat};
use crate::message::Messages;
use crate::node::Node;
use crate::node_id::NodeId;
use crate::service::{Route, Service};
use crate::stats::Stats;
use crate::transport::Transport;

/// A provider: serves methods to every client of the same Redis deployment.
///
/// It keeps its own registry entry alive with heartbeats (no manager host); if the process
/// dies, callers stop choosing it within the TTL, and at once for calls whose `PUBLISH`
/// finds its inbox gone.
///
/// ```no_run
/// # async fn demo() -> Result<(), clouds_core::Error> {
/// use std::convert::Infallible;
/// let config = clouds_core::Config::from_url("redis://127.0.0.1:6379/3")?;
/// let server = clouds_core::Server::start(config).await?;
/// server.register("test.echo", |(s,): (String,)| async move { Ok::<_, Infallible>(s) }).await?;
/// // ... serve until it is time to stop, then:
/// server.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Server {
    /// The server owns its node: dropping the server closes it (see `Drop`).
    node: Arc<Node>,
    dispatcher: Arc<Dispatcher>,
    advert: Arc<Advert>,
    /// Shared, so that a shutdown cut short while stopping it leaves it for the next one.
    heartbeat: std::sync::Mutex<Option<Arc<Heartbeat>>>,
    /// Serialises registration and shutdown, and records how far shutdown got.
    state: tokio::sync::Mutex<Shutdown>,
}

/// How far [`Server::shutdown`] got: a shutdown cancelled half-way (its future dropped) is
/// run again from where it stopped.
#[derive(Debug, Default)]
struct Shutdown {
    /// The registry entry is gone and leaving was announced.
    left: bool,
    /// Everything is done: further shutdowns return at once.
    done: bool,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("id", self.id())
            .field("methods", &self.advert.methods())
            .finish()
    }
}

impl Server {
    /// Connects, starts taking calls on its call channel and starts its heartbeat. It appears
    /// in the registry (with no methods) before this returns.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), clouds_core::Error> {
    /// let config = clouds_core::Config::from_url("redis://127.0.0.1:6379/3")?;
    /// let server = clouds_core::Server::start(config).await?;
    /// println!("serving as {}", server.id());
    /// # Ok(()) }
    /// ```
    pub async fn start(config: Config) -> Result<Server, Error> {
        let node = Node::start(config, "server").await?;
        let dispatcher = Arc::new(
            Dispatcher::new(node.config().max_in_flight, node.config().spawn_handlers)
                .serving_as(node.id().clone()),
        );
        // Fresh node, set once: cannot already be set.
        let _ = node.serve_with(dispatcher.clone());
        let advert = Arc::new(Advert::new());
        let started = async {
            node.wire().subscribe(node.calls_channel()).await?;
            heartbeat::beat(&node, node.wire(), &advert, false).await?;
            Heartbeat::start(&node, advert.clone())
        };
        let heartbeat = match started.await {
            Ok(heartbeat) => heartbeat,
            Err(e) => {
                // Nothing owns the node yet: close it here, or its loops would run on.
                node.close().await;
                return Err(e);
            }
        };
        tracing::info!(node = %node.id(), "server started");
        Ok(Server {
            node,
            dispatcher,
            advert,
            heartbeat: std::sync::Mutex::new(Some(Arc::new(heartbeat))),
            state: tokio::sync::Mutex::new(Shutdown::default()),
        })
    }

    fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// This server's node id: what the monitor lists and messages are addressed to.
    ///
    /// ```
    /// # async fn demo(server: clouds_core::Server, client: clouds_core::Client) -> Result<(), clouds_core::Error> {
    /// client.send(server.id(), &"hello, server").await?;
    /// # Ok(()) }
    /// ```
    pub fn id(&self) -> &NodeId {
        self.node().id()
    }

    /// Serves every method of `service` (a generated `{Trait}Server`). Once this returns the
    /// methods are in the registry and callers have been told.
    ///
    /// ```
    /// # struct Math;
    /// # impl clouds_core::Service for Math { fn routes(self) -> Vec<clouds_core::Route> { Vec::new() } }
    /// # async fn demo(server: clouds_core::Server) -> Result<(), clouds_core::Error> {
    /// // With #[clouds::service], pass the generated `{Trait}Server::new(implementation)`.
    /// server.serve(Math).await?;
    /// # Ok(()) }
    /// ```
    pub async fn serve<S: Service>(&self, service: S) -> Result<(), Error> {
        self.add_routes(service.routes()).await
    }

    /// Serves one method given as a function of its arguments tuple, returning `Result<T, E>`;
    /// an `Err` reaches callers as [`Error::Remote`] with the error's text.
    ///
    /// ```
    /// # async fn demo(server: clouds_core::Server) -> Result<(), clouds_core::Error> {
    /// server
    ///     .register("math.div", |(a, b): (i64, i64)| async move {
    ///         if b == 0 { Err("division by zero") } else { Ok(a / b) }
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn register<A, F, Fut, T, E>(&self, method: &str, handler: F) -> Result<(), Error>
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Serialize + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        self.add_routes(vec![Route::new(method, handler)]).await
    }

    /// Serves one streaming method given as a function of its arguments tuple, returning a
    /// [`Streaming`](crate::Streaming) of items; callers read it with
    /// [`Client::open_stream`] (or `clouds call --stream`).
    ///
    /// ```
    /// # async fn demo(server: clouds_core::Server) -> Result<(), clouds_core::Error> {
    /// server
    ///     .register_stream("count.up", |(n,): (u64,)| async move {
    ///         clouds_core::Streaming::iter(0..n)
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn register_stream<A, F, Fut, T>(&self, method: &str, handler: F) -> Result<(), Error>
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = crate::Streaming<T>> + Send + 'static,
        T: Serialize + Send + 'static,
    {
        self.add_routes(vec![Route::stream(method, handler)]).await
    }

    async fn add_routes(&self, routes: Vec<Route>) -> Result<(), Error> {
        let state = self.state.lock().await;
        if state.done || self.node().is_closed() {
            return Err(Error::Shutdown);
        }
        let added = self.dispatcher.add(routes)?;
        self.advert.add(&added);
        let node = self.node();
        // Announced with the beat, even if the registry listed it already for these methods
        // (a stale entry): callers that dropped it take it back.
        heartbeat::beat(node, node.wire(), &self.advert, true).await?;
        tracing::info!(node = %node.id(), methods = ?added, "serving");
        Ok(())
    }

    /// A client that shares this server's connections (for handlers that call other services).
    ///
    /// It does not keep the server alive: once the server is shut down or dropped, its calls
    /// fail with [`Error::Shutdown`].
    ///
    /// ```
    /// # async fn demo(server: clouds_core::Server) -> Result<(), clouds_core::Error> {
    /// let client = server.client();
    /// server
    ///     .register("front.total", move |(a, b): (i64, i64)| {
    ///         let client = client.clone();
    ///         async move { client.call::<_, i64>("math.add", (a, b)).await }
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn client(&self) -> Client {
        Client::borrowing(self.node.clone())
    }

    /// Messages other nodes sent to this server.
    ///
    /// ```
    /// # async fn demo(server: clouds_core::Server) -> Result<(), clouds_core::Error> {
    /// if let Some(msg) = server.messages().next().await {
    ///     println!("{} says {}", msg.from(), msg.decode::<String>()?);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn messages(&self) -> Messages {
        self.node().messages().reader()
    }

    /// Counters of this node, including handlers running now.
    ///
    /// ```
    /// # fn demo(server: clouds_core::Server) {
    /// println!("{} handlers running", server.stats().in_flight);
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        self.node().stats()
    }

    /// Leaves gracefully, losing no call:
    ///
    /// 1. stops heartbeats, removes its registry entry and announces that it leaves, so
    ///    callers stop choosing it;
    /// 2. keeps serving calls that were already on their way, then unsubscribes from its call
    ///    channel: from then on a caller's `PUBLISH` reaches nobody and is re-routed at once;
    /// 3. waits (up to `Config::shutdown_timeout`) for running handlers to reply;
    /// 4. closes its connections.
    ///
    /// Calling it again after it has finished does nothing; a shutdown that was cancelled
    /// (its future dropped, say by a timeout) finishes the job when called again.
    ///
    /// ```
    /// # async fn demo(server: clouds_core::Server) -> Result<(), clouds_core::Error> {
    /// // ... when it is time to stop (Ctrl-C, SIGTERM, a deploy):
    /// server.shutdown().await?;
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self) -> Result<(), Error> {
        let mut state = self.state.lock().await;
        if state.done {
            return Ok(());
        }
        // Every step below may be repeated, so a shutdown cancelled half-way can be run again;
        // `state` records the steps that must not be.
        let node = self.node().clone();
        // Taken out only once stopped: a beat still running could write the entry back after
        // the `leave` below.
        let heartbeat = crate::locks::lock(&self.heartbeat).clone();
        if let Some(heartbeat) = heartbeat {
            heartbeat.stop().await;
            crate::locks::lock(&self.heartbeat).take();
        }
        let mut result = Ok(());
        if !state.left {
            let methods = self.advert.methods();
            result = node
                .registry()
                .leave(node.wire(), node.id(), &methods)
                .await;
            match &result {
                Ok(()) => state.left = true,
                Err(e) => {
                    tracing::warn!(node = %node.id(), error = %e, "could not deregister or announce leaving; the entry expires with its TTL")
                }
            }
        }
        // Closing stops the receive loop: once it has started (a shutdown cancelled while
        // closing), there is nothing left to drain.
        if !node.is_closed() {
            if let Err(e) = node.wire().unsubscribe(node.calls_channel()).await {
                tracing::warn!(node = %node.id(), error = %e, "could not unsubscribe the call channel");
            }
            // Calls delivered before the unsubscribe are queued ahead of this marker.
            if let Err(e) = node.flush_inbound().await {
                tracing::warn!(node = %node.id(), error = %e, "could not confirm the inbox was drained");
            }
            // Handlers still running: the entry comes back, as draining and providing nothing,
            // so a monitor sees what is left (it expires with its TTL if this stops short),
            // and goes once they are done.
            let draining = state.left && self.dispatcher.tasks() > 0;
            if draining {
                self.advert.drain();
                if let Err(e) = heartbeat::beat(&node, node.wire(), &self.advert, false).await {
                    tracing::debug!(node = %node.id(), error = %e, "could not list the server as draining");
                }
            }
            if !self.dispatcher.drain(node.config().shutdown_timeout).await {
                tracing::warn!(node = %node.id(), in_flight = self.dispatcher.in_flight(), "shutdown timeout: closing with handlers still running");
            }
            if draining {
                let methods = self.advert.methods();
                if let Err(e) = node
                    .registry()
                    .leave(node.wire(), node.id(), &methods)
                    .await
                {
                    tracing::warn!(node = %node.id(), error = %e, "could not remove the draining entry; it expires with its TTL");
                }
            }
        }
        node.close().await;
        state.done = true;
        tracing::info!(node = %node.id(), "server stopped");
        result
    }
}

impl Server {
    /// Stops at once as a crashed process would: no more heartbeats, reads or replies, the
    /// connections closed, but the registry entry left to expire with its TTL.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) async fn crash(self) {
        self.dispatcher.silence();
        let mut state = self.state.lock().await;
        let heartbeat = crate::locks::lock(&self.heartbeat).take();
        if let Some(heartbeat) = heartbeat {
            heartbeat.stop().await;
        }
        self.node.close().await;
        state.done = true;
    }
}

impl Drop for Server {
    /// Dropped without [`Server::shutdown`]: stop the heartbeat, and on the server's runtime
    /// remove the registry entry, announce leaving and close. Calls in flight are abandoned;
    /// call `shutdown()` to let them finish.
    fn drop(&mut self) {
        let state = self.state.get_mut();
        if state.done || self.node.is_finished() {
            return;
        }
        let left = state.left;
        self.node.life().stop();
        let node = self.node.clone();
        let methods = self.advert.methods();
        let heartbeat = crate::locks::lock(&self.heartbeat).take();
        self.node.life().spawn_detached(async move {
            // The heartbeat must have stopped, or a beat in progress could re-create the
            // entry right after it is removed.
            if let Some(heartbeat) = heartbeat {
                heartbeat.stop().await;
            }
            if !left {
                let _ = node
                    .registry()
                    .leave(node.wire(), node.id(), &methods)
                    .await;
            }
            node.close().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use super::*;
    use crate::monitor::Monitor;
    use crate::testing::Broker;

    /// A beat that read the method list before a registration must not land after the
    /// registration's own beat: the node hash (what the monitor reads) would lose the method
    /// while the method's set (what callers read) still lists the server.
    #[tokio::test(start_paused = true)]
    async fn a_beat_never_overwrites_a_newer_method_list() {
        let broker = Broker::new();
        let server = Server::start(broker.config()).await.expect("server");
        broker.delay_next_command(server.id(), Duration::from_millis(100));
        let older = heartbeat::beat(&server.node, server.node.wire(), &server.advert, false);
        let register = server.register("late.method", |(): ()| async { Ok::<_, Infallible>(()) });
        let (older, register) = tokio::join!(older, register);
        older.expect("beat");
        register.expect("register");
        let snapshot = Monitor::connect(broker.config())
            .await
            .expect("monitor")
            .snapshot()
            .await
            .expect("snapshot");
        let info = snapshot.servers.get(server.id()).expect("listed");
        assert_eq!(info.methods, vec!["late.method".to_string()]);
        assert_eq!(
            snapshot.methods.get("late.method"),
            Some(&vec![server.id().clone()])
        );
        server.shutdown().await.expect("shutdown");
    }

    async fn listed(monitor: &Monitor, id: &NodeId) -> bool {
        let snapshot = monitor.snapshot().await.expect("snapshot");
        snapshot.servers.contains_key(id)
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashed_server_stays_listed_until_its_ttl_then_expires() {
        let broker = Broker::new();
        let config = broker.config().heartbeat(Duration::from_secs(1));
        let server = Server::start(config.clone()).await.expect("server");
        let id = server.id().clone();
        let monitor = Monitor::connect(config).await.expect("monitor");
        server.crash().await;
        assert!(listed(&monitor, &id).await);
        tokio::time::sleep(Duration::from_millis(2_900)).await;
        assert!(listed(&monitor, &id).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!listed(&monitor, &id).await);
    }
}
