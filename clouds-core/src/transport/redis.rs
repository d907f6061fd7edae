//! The transport for Redis, standalone or Cluster: [`Transport`] over `clouds-redis`, which
//! holds the connections (classic or sharded pub/sub, reconnects) and the registry's keys and
//! Lua scripts
//! (`clouds_redis::Registry`). This adapter only turns ids into [`NodeId`]s and errors into
//! clouds-core's own.

use std::future::Future;

use bytes::Bytes;

use super::{Channel, Entry, Fields, Inbound, Reconnects, Transport, TransportError};
use crate::namespace::Names;
use crate::node_id::NodeId;

/// One node's connections to a Redis (one server or a cluster).
#[derive(Debug)]
pub(crate) struct RedisWire {
    redis: clouds_redis::Transport,
    registry: clouds_redis::Registry,
}

impl RedisWire {
    pub(crate) async fn connect(
        endpoint: &clouds_redis::Endpoint,
        options: &clouds_redis::TransportOptions,
        names: &Names,
    ) -> Result<Self, TransportError> {
        Ok(RedisWire {
            redis: clouds_redis::Transport::connect(endpoint, options)
                .await
                .map_err(TransportError::from_redis)?,
            registry: clouds_redis::Registry::new(names.scope()),
        })
    }
}

impl Transport for RedisWire {
    fn publish(
        &self,
        channel: Channel,
        frame: Bytes,
    ) -> impl Future<Output = Result<u64, TransportError>> + Send {
        let publish = self.redis.publish(channel, frame);
        async move { publish.await.map_err(TransportError::from_redis) }
    }

    fn publish_untimed(
        &self,
        channel: Channel,
        frame: Bytes,
    ) -> impl Future<Output = Result<u64, TransportError>> + Send {
        let publish = self.redis.publish_untimed(channel, frame);
        async move { publish.await.map_err(TransportError::from_redis) }
    }

    async fn subscribe(&self, channel: &Channel) -> Result<(), TransportError> {
        self.redis
            .subscribe(channel)
            .await
            .map_err(TransportError::from_redis)
    }

    async fn unsubscribe(&self, channel: &Channel) -> Result<(), TransportError> {
        self.redis
            .unsubscribe(channel)
            .await
            .map_err(TransportError::from_redis)
    }

    async fn subscribers(&self, channel: &Channel) -> Result<u64, TransportError> {
        self.redis
            .subscribers(channel)
            .await
            .map_err(TransportError::from_redis)
    }

    async fn resubscribe(&self, channel: &Channel) -> Result<(), TransportError> {
        self.redis
            .resubscribe(channel)
            .await
            .map_err(TransportError::from_redis)
    }

    fn may_lose_subscriptions(&self) -> bool {
        // Standalone Redis only ends a subscription with its connection, and fred subscribes
        // again after every reconnect; a cluster ends them when slots move.
        self.redis.is_sharded()
    }

    fn inbound(&self) -> Inbound {
        Inbound::Redis(self.redis.inbound())
    }

    fn reconnects(&self) -> Reconnects {
        Reconnects::Redis(self.redis.reconnects())
    }

    async fn heartbeat(&self, entry: &Entry<'_>) -> Result<(), TransportError> {
        let id = entry.id.as_str();
        let registry = &self.registry;
        registry
            .heartbeat(&self.redis, id, entry.ttl, entry.methods, &entry.fields)
            .await
            .map_err(TransportError::from_redis)
    }

    async fn deregister(&self, id: &NodeId, methods: &[String]) -> Result<(), TransportError> {
        self.registry
            .deregister(&self.redis, id.as_str(), methods)
            .await
            .map_err(TransportError::from_redis)
    }

    async fn providers(&self, methods: &[String]) -> Result<Vec<Vec<NodeId>>, TransportError> {
        let lists = self
            .registry
            .providers(&self.redis, methods)
            .await
            .map_err(TransportError::from_redis)?;
        Ok(lists.into_iter().map(ids).collect())
    }

    async fn servers(&self) -> Result<Vec<(NodeId, Fields)>, TransportError> {
        let servers = self
            .registry
            .servers(&self.redis)
            .await
            .map_err(TransportError::from_redis)?;
        Ok(servers
            .into_iter()
            .filter(|(id, _)| is_node_id(id))
            .map(|(id, fields)| (NodeId::from(id.as_str()), fields))
            .collect())
    }

    async fn close(&self) {
        self.redis.close().await;
    }
}

/// Whether `id` can be a node id (a registry written by a foreign hand may hold anything).
fn is_node_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= crate::node_id::MAX_NODE_ID_LEN
}

/// The node ids of a list read from the registry; anything that is not one is dropped.
fn ids(list: Vec<String>) -> Vec<NodeId> {
    list.into_iter()
        .filter(|id| is_node_id(id))
        .map(|id| NodeId::from(id.as_str()))
        .collect()
}
