//! The transport for Redis, standalone or Cluster: [`Transport`] over `clouds-redis`, which
//! holds the connections (classic or sharded pub/sub, reconnects) and the registry's keys and
//! Lua scripts
//! (`clouds_redis::Registry`). This adapter only turns ids into [`NodeId`]s and errors into
//! clouds-core's own.

use std::future::Future;

use bytes::Bytes;

use super::{Channel, Entry, Fields, Inbound, Lookup, Reconnects, Transport, TransportError};
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
        let redis = clouds_redis::Transport::connect(endpoint, options)
            .await
            .map_err(TransportError::from_redis)?;
        // In a cluster the scripts publish joins and leaves by SPUBLISH, on a channel in the
        // registry's own slot.
        let registry = if redis.is_sharded() {
            clouds_redis::Registry::sharded(names.scope())
        } else {
            clouds_redis::Registry::new(names.scope())
        };
        Ok(RedisWire { redis, registry })
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
        let beat = clouds_redis::Beat {
            id: entry.id.as_str(),
            ttl: entry.ttl,
            methods: entry.methods,
            fields: &entry.fields,
            join: entry.join.clone(),
            force_join: entry.force_join,
        };
        self.registry
            .heartbeat(&self.redis, &beat)
            .await
            .map_err(TransportError::from_redis)
    }

    async fn deregister(
        &self,
        id: &NodeId,
        methods: &[String],
        leave: Bytes,
    ) -> Result<(), TransportError> {
        self.registry
            .deregister(&self.redis, id.as_str(), methods, leave)
            .await
            .map_err(TransportError::from_redis)
    }

    async fn providers(
        &self,
        methods: &[String],
        known: &[Option<u64>],
    ) -> Result<Vec<Lookup>, TransportError> {
        let known: Vec<(&str, Option<u64>)> = methods
            .iter()
            .map(String::as_str)
            .zip(known.iter().copied())
            .collect();
        let found = self
            .registry
            .providers_since(&self.redis, &known)
            .await
            .map_err(TransportError::from_redis)?;
        Ok(found
            .into_iter()
            .map(|lookup| match lookup {
                clouds_redis::Lookup::Unchanged => Lookup::Unchanged,
                clouds_redis::Lookup::Changed {
                    generation,
                    providers,
                } => Lookup::Changed {
                    generation,
                    providers: ids(providers),
                },
            })
            .collect())
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

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        ttl: std::time::Duration,
    ) -> Result<(), TransportError> {
        self.redis
            .set_px(key, value, ttl)
            .await
            .map_err(TransportError::from_redis)
    }

    async fn take(&self, key: &str) -> Result<Option<Bytes>, TransportError> {
        self.redis
            .getdel(key)
            .await
            .map_err(TransportError::from_redis)
    }

    async fn delete(&self, key: &str) -> Result<(), TransportError> {
        self.redis
            .del(key)
            .await
            .map_err(TransportError::from_redis)
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: Bytes,
        ttl: std::time::Duration,
    ) -> Result<Option<Bytes>, TransportError> {
        self.redis
            .set_if_absent(key, value, ttl)
            .await
            .map_err(TransportError::from_redis)
    }

    async fn swap_if(
        &self,
        key: &str,
        expected: Bytes,
        new: Option<Bytes>,
        ttl: std::time::Duration,
    ) -> Result<bool, TransportError> {
        self.redis
            .swap_if(key, expected, new, ttl)
            .await
            .map_err(TransportError::from_redis)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The registry scripts publish join and leave frames on the channel every node
    /// subscribes to. On Redis Cluster the registry publishes on `{scope}:events` (its own
    /// slot): `Names::events()` must give that name there too.
    #[test]
    fn the_registry_announces_on_the_events_channel_nodes_subscribe() {
        let names = Names::new(&crate::Config::default().namespace("app").db(3));
        let standalone = clouds_redis::Registry::new(names.scope());
        assert_eq!(standalone.events_channel(), names.events().as_str());
        assert_eq!(standalone.events_channel(), "app:3:events");
        let cluster = crate::Config::from_url("redis-cluster://127.0.0.1:7000")
            .expect("url")
            .namespace("app");
        let names = Names::new(&cluster);
        let sharded = clouds_redis::Registry::sharded(names.scope());
        assert_eq!(sharded.events_channel(), names.events().as_str());
        assert_eq!(sharded.events_channel(), "{app:0}:events");
    }
}
