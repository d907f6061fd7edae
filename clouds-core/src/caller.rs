//! The caller side of a node: calls waiting for their replies, the provider cache, and the
//! byte budget of call frames in flight.

use tokio::sync::{AcquireError, Semaphore, SemaphorePermit};

use crate::balance::Balancer;
use crate::config::Config;
use crate::pending::Pending;

/// What a node needs to make calls.
#[derive(Debug)]
pub(crate) struct Caller {
    pending: Pending,
    balancer: Balancer,
    /// Room for call frames in flight, in bytes (`Config::max_bytes_in_flight`).
    room: Semaphore,
    /// Its size, in permits.
    room_size: u32,
    /// Serialises first lookups of methods, so concurrent first calls share one registry read.
    first_lookups: tokio::sync::Mutex<()>,
}

impl Caller {
    pub(crate) fn new(config: &Config) -> Self {
        let room_size = u32::try_from(config.max_bytes_in_flight).unwrap_or(u32::MAX);
        Caller {
            pending: Pending::default(),
            balancer: Balancer::new(config.balance, config.effective_ttl()),
            room: Semaphore::new(room_size as usize),
            room_size,
            first_lookups: tokio::sync::Mutex::new(()),
        }
    }

    /// The calls waiting for replies.
    pub(crate) fn pending(&self) -> &Pending {
        &self.pending
    }

    /// The provider cache and the choice of provider.
    pub(crate) fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// The room a frame of `len` bytes takes: at least 1, at most the whole budget (a frame
    /// larger than the budget still goes, alone).
    pub(crate) fn room_needed(&self, len: usize) -> u32 {
        u32::try_from(len)
            .unwrap_or(u32::MAX)
            .clamp(1, self.room_size)
    }

    /// `need` bytes of room, if free now.
    pub(crate) fn try_room(&self, need: u32) -> Option<SemaphorePermit<'_>> {
        self.room.try_acquire_many(need).ok()
    }

    /// Waits for `need` bytes of room.
    pub(crate) async fn room(&self, need: u32) -> Result<SemaphorePermit<'_>, AcquireError> {
        self.room.acquire_many(need).await
    }

    /// Held while a method is looked up for the first time.
    pub(crate) async fn first_lookup(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.first_lookups.lock().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_is_bounded_and_a_large_frame_takes_it_all() {
        let caller = Caller::new(&Config::default().max_bytes_in_flight(100));
        assert_eq!(caller.room_needed(0), 1);
        assert_eq!(caller.room_needed(40), 40);
        assert_eq!(
            caller.room_needed(1 << 20),
            100,
            "capped at the whole budget"
        );
        let held = caller.try_room(60).expect("free");
        assert!(caller.try_room(60).is_none(), "only 40 left");
        let waiting = caller.room(60);
        drop(held);
        let _again = tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("room is given back")
            .expect("not closed");
    }
}
