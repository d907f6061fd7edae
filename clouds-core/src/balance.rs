//! The caller's view of who provides what, and the choice of provider for each attempt.
//!
//! Filled from the registry on first use, corrected at once by join/leave events and by
//! `PUBLISH` returning 0 (the provider's inbox is gone), and refreshed every heartbeat as a
//! fallback for missed events. Reads on the call path take a read lock and touch no Redis.
//!
//! Each method remembers the registry generation its list was read at, so a refresh of an
//! unchanged method costs the registry no read of the list. The generation is kept only while
//! the list is the registry's at that generation (minus providers marked gone): any local
//! correction (an event, a provider found gone) forgets it, and so does a gone mark running
//! out or a reconnect, so the next refresh reads the list whole, as every refresh used to.

use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

// tokio's clock, so that suspicion and "gone" marks expire under a paused test clock too.
use tokio::time::Instant;

use crate::config::Balance;
use crate::node_id::NodeId;

#[derive(Debug, Default)]
struct Entry {
    providers: Vec<NodeId>,
    /// The registry generation `providers` was read at; `None` once it was corrected since
    /// (or never read), so the next refresh reads it whole.
    generation: Option<u64>,
    cursor: AtomicUsize,
    /// When a call last asked for this method, in ms since the balancer was made.
    last_used_ms: AtomicU64,
}

/// What [`Balancer::choose`] found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Choice {
    /// Call this one.
    Provider(NodeId),
    /// The method is cached, with no provider to call.
    Nobody,
    /// The method is not cached: look it up in the registry.
    Unknown,
}

/// Provider cache and balancer of one node.
#[derive(Debug)]
pub(crate) struct Balancer {
    strategy: Balance,
    methods: RwLock<HashMap<String, Entry>>,
    /// Providers that timed out recently, until when: tried last while others exist.
    suspects: Mutex<HashMap<NodeId, Instant>>,
    /// How many entries `suspects` has, written under its lock: calls read this instead of
    /// taking the lock, which they need only while someone is suspect.
    suspected: AtomicUsize,
    /// Providers proven gone (PUBLISH reached nobody), until when: a registry refresh does not
    /// bring them back before their entry could have expired, unless they announce again.
    gone: Mutex<HashMap<NodeId, Instant>>,
    /// Calls from this node waiting on each provider (for least-in-flight).
    outstanding: Mutex<HashMap<NodeId, usize>>,
    suspect_for: Duration,
    born: Instant,
}

use crate::locks::{lock, read, write};

impl Balancer {
    pub(crate) fn new(strategy: Balance, suspect_for: Duration) -> Self {
        Balancer {
            strategy,
            methods: RwLock::default(),
            suspects: Mutex::default(),
            suspected: AtomicUsize::new(0),
            gone: Mutex::default(),
            outstanding: Mutex::default(),
            suspect_for,
            born: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Forgets methods no call has asked for in `idle`, so the cache (and its periodic
    /// refresh) does not grow with every name ever called.
    pub(crate) fn evict_idle(&self, idle: Duration) {
        let cutoff = self.now_ms().saturating_sub(idle.as_millis() as u64);
        write(&self.methods).retain(|_, e| e.last_used_ms.load(Ordering::Relaxed) >= cutoff);
    }

    /// Whether the method has been looked up before (even if nobody provided it then).
    pub(crate) fn knows(&self, method: &str) -> bool {
        read(&self.methods).contains_key(method)
    }

    /// The methods in the cache, for the periodic refresh.
    pub(crate) fn methods(&self) -> Vec<String> {
        read(&self.methods).keys().cloned().collect()
    }

    /// The generation each of `methods` was read at (`None`: unknown, or corrected since),
    /// for a refresh to send to the registry.
    pub(crate) fn generations(&self, methods: &[String]) -> Vec<Option<u64>> {
        if self.forget_expired_gone() {
            forget_generations(&mut write(&self.methods));
        }
        let cache = read(&self.methods);
        methods
            .iter()
            .map(|m| cache.get(m).and_then(|e| e.generation))
            .collect()
    }

    /// Drops gone marks whose time is up; true if there were any. The registry may still list
    /// those providers, so lists read while they were marked are no longer the registry's.
    fn forget_expired_gone(&self) -> bool {
        prune(&mut lock(&self.gone))
    }

    /// Replaces a method's providers with a registry read of unknown generation.
    #[cfg(test)]
    pub(crate) fn set(&self, method: &str, providers: Vec<NodeId>) {
        self.replace(method, None, providers);
    }

    /// Replaces a method's providers with the registry's list at `generation`.
    pub(crate) fn set_at(&self, method: &str, generation: u64, providers: Vec<NodeId>) {
        self.replace(method, Some(generation), providers);
    }

    fn replace(&self, method: &str, generation: Option<u64>, mut providers: Vec<NodeId>) {
        providers.sort();
        providers.dedup();
        let expired = {
            let mut gone = lock(&self.gone);
            let expired = prune(&mut gone);
            if !gone.is_empty() {
                providers.retain(|p| !gone.contains_key(p));
            }
            expired
        };
        let now = self.now_ms();
        let mut methods = write(&self.methods);
        if expired {
            forget_generations(&mut methods);
        }
        let entry = methods.entry(method.to_string()).or_default();
        entry.providers = providers;
        entry.generation = generation;
        // A fresh entry counts as used: it was created for a call.
        if entry.last_used_ms.load(Ordering::Relaxed) == 0 {
            entry.last_used_ms.store(now.max(1), Ordering::Relaxed);
        }
    }

    /// A join event: `node` now provides `methods` (only methods this node calls are tracked).
    pub(crate) fn join(&self, node: &NodeId, methods: &[String]) {
        lock(&self.gone).remove(node);
        let mut cache = write(&self.methods);
        for method in methods {
            if let Some(entry) = cache.get_mut(method)
                && let Err(at) = entry.providers.binary_search(node)
            {
                entry.providers.insert(at, node.clone());
                entry.generation = None;
            }
        }
    }

    /// A leave event, or proof that `node`'s inbox is gone: it provides nothing any more.
    pub(crate) fn remove(&self, node: &NodeId) {
        let mut cache = write(&self.methods);
        for entry in cache.values_mut() {
            let before = entry.providers.len();
            entry.providers.retain(|p| p != node);
            if entry.providers.len() != before {
                entry.generation = None;
            }
        }
        drop(cache);
        self.change_suspects(|suspects| {
            suspects.remove(node);
        });
    }

    /// `node`'s inbox is gone: drop it, and keep it out of registry refreshes until its entry
    /// has had time to expire (it comes back at once if it announces itself again).
    pub(crate) fn mark_gone(&self, node: &NodeId) {
        self.remove(node);
        lock(&self.gone).insert(node.clone(), Instant::now() + self.suspect_for);
    }

    /// Trusts registry refreshes again for every provider marked gone, and reads every list
    /// whole at the next refresh (after a reconnect: events may have been missed).
    pub(crate) fn forget_gone(&self) {
        lock(&self.gone).clear();
        forget_generations(&mut write(&self.methods));
    }

    /// `node` timed out: try others first for a while. Its registry entry stays; it may only
    /// be slow.
    pub(crate) fn suspect(&self, node: &NodeId) {
        let now = Instant::now();
        self.change_suspects(|suspects| {
            suspects.retain(|_, until| *until > now);
            suspects.insert(node.clone(), now + self.suspect_for);
        });
    }

    /// Forgets suspects whose time is up. Run periodically: a suspect that left the provider
    /// lists without answering again would otherwise keep every call on the locked path.
    pub(crate) fn forget_expired_suspects(&self) {
        if self.suspected.load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = Instant::now();
        self.change_suspects(|suspects| suspects.retain(|_, until| *until > now));
    }

    /// `node` answered: it is fine.
    pub(crate) fn clear_suspect(&self, node: &NodeId) {
        if self.suspected.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.change_suspects(|suspects| {
            suspects.remove(node);
        });
    }

    /// Changes the suspects under their lock and keeps `suspected` equal to their number.
    fn change_suspects(&self, change: impl FnOnce(&mut HashMap<NodeId, Instant>)) {
        let mut suspects = lock(&self.suspects);
        change(&mut suspects);
        self.suspected.store(suspects.len(), Ordering::Relaxed);
    }

    /// Picks a provider for `method`, preferring ones not in `tried` and not suspect; `None`
    /// when there is none at all.
    #[cfg(test)]
    pub(crate) fn pick(&self, method: &str, tried: &[NodeId]) -> Option<NodeId> {
        match self.choose(method, tried) {
            Choice::Provider(node) => Some(node),
            Choice::Nobody | Choice::Unknown => None,
        }
    }

    /// Picks a provider for `method`, preferring ones not in `tried` and not suspect. One
    /// lookup of the method per call tells both whether it is cached and whom to call.
    pub(crate) fn choose(&self, method: &str, tried: &[NodeId]) -> Choice {
        let cache = read(&self.methods);
        let Some(entry) = cache.get(method) else {
            return Choice::Unknown;
        };
        // Written only when it changes: every call writing it would pass its cache line
        // back and forth between the cores making calls.
        let now_ms = self.now_ms().max(1);
        if entry.last_used_ms.load(Ordering::Relaxed) != now_ms {
            entry.last_used_ms.store(now_ms, Ordering::Relaxed);
        }
        if entry.providers.is_empty() {
            return Choice::Nobody;
        }
        let start = entry.cursor.fetch_add(1, Ordering::Relaxed);
        let suspects = (self.suspected.load(Ordering::Relaxed) > 0)
            .then(|| (lock(&self.suspects), Instant::now()));
        if suspects.is_none() && tried.is_empty() && self.strategy == Balance::RoundRobin {
            // The usual case: everyone is in the best tier below.
            let chosen = &entry.providers[start % entry.providers.len()];
            return Choice::Provider(chosen.clone());
        }
        let healthy = |p: &NodeId| {
            suspects
                .as_ref()
                .is_none_or(|(suspects, now)| suspects.get(p).is_none_or(|until| until <= now))
        };
        // Best tier first: untried and healthy, then untried, then healthy, then anyone.
        let tiers: [&dyn Fn(&NodeId) -> bool; 4] = [
            &|p| !tried.contains(p) && healthy(p),
            &|p| !tried.contains(p),
            &|p| healthy(p),
            &|_| true,
        ];
        for tier in tiers {
            // Counted, then indexed: no list is built on this per-call path.
            let count = entry.providers.iter().filter(|p| tier(p)).count();
            if count == 0 {
                continue;
            }
            let nth = |i: usize| entry.providers.iter().filter(|p| tier(p)).nth(i % count);
            let chosen = match self.strategy {
                Balance::RoundRobin => nth(start),
                Balance::LeastInFlight => {
                    let outstanding = lock(&self.outstanding);
                    let load = |p: &NodeId| outstanding.get(p).copied().unwrap_or(0);
                    // Rotate the start so ties are spread instead of always hitting the first.
                    (0..count)
                        .filter_map(|i| nth(start + i))
                        .min_by_key(|p| load(p))
                }
            };
            return chosen.cloned().map_or(Choice::Nobody, Choice::Provider);
        }
        Choice::Nobody
    }

    /// Whether `method` has a provider not in `tried`.
    pub(crate) fn has_untried(&self, method: &str, tried: &[NodeId]) -> bool {
        read(&self.methods)
            .get(method)
            .is_some_and(|e| e.providers.iter().any(|p| !tried.contains(p)))
    }

    /// Counts a call to `node` as outstanding until the guard drops.
    pub(crate) fn start_call(&self, node: &NodeId) -> Outstanding<'_> {
        // Round-robin keeps no count, and so no clone of the id (a shared atomic counter).
        let node = (self.strategy == Balance::LeastInFlight).then(|| {
            *lock(&self.outstanding).entry(node.clone()).or_default() += 1;
            node.clone()
        });
        Outstanding {
            balancer: self,
            node,
        }
    }
}

/// Drops the marks whose time is up; true if there were any.
fn prune(marks: &mut HashMap<NodeId, Instant>) -> bool {
    let now = Instant::now();
    let before = marks.len();
    marks.retain(|_, until| *until > now);
    marks.len() != before
}

/// Makes the next refresh read every list whole.
fn forget_generations(methods: &mut HashMap<String, Entry>) {
    for entry in methods.values_mut() {
        entry.generation = None;
    }
}

/// One call waiting on a provider; dropping it ends the count.
pub(crate) struct Outstanding<'a> {
    balancer: &'a Balancer,
    /// The provider, when the strategy counts calls per provider.
    node: Option<NodeId>,
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        if let Some(node) = &self.node {
            let mut outstanding = lock(&self.balancer.outstanding);
            if let Some(n) = outstanding.get_mut(node) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    outstanding.remove(node);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|n| NodeId::from(*n)).collect()
    }

    #[test]
    fn round_robin_visits_every_provider_evenly() {
        let b = Balancer::new(Balance::RoundRobin, Duration::from_secs(6));
        b.set("m", ids(&["a", "b", "c"]));
        let mut counts = HashMap::default();
        for _ in 0..300 {
            *counts
                .entry(b.pick("m", &[]).expect("provider"))
                .or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&n| n == 100), "{counts:?}");
    }

    #[test]
    fn unknown_or_empty_methods_have_no_provider() {
        let b = Balancer::new(Balance::RoundRobin, Duration::from_secs(6));
        assert_eq!(b.pick("m", &[]), None);
        assert!(!b.knows("m"));
        b.set("m", vec![]);
        assert!(b.knows("m"));
        assert_eq!(b.pick("m", &[]), None);
    }

    #[test]
    fn prefers_untried_then_healthy_providers() {
        let b = Balancer::new(Balance::RoundRobin, Duration::from_secs(60));
        b.set("m", ids(&["a", "b"]));
        let a = NodeId::from("a");
        for _ in 0..10 {
            assert_eq!(b.pick("m", std::slice::from_ref(&a)), Some("b".into()));
        }
        b.suspect(&"b".into());
        for _ in 0..10 {
            assert_eq!(b.pick("m", &[]), Some(a.clone()));
        }
        // Everyone tried and suspect: still returns someone rather than nobody.
        b.suspect(&a);
        assert!(b.pick("m", &ids(&["a", "b"])).is_some());
        b.clear_suspect(&a);
        assert_eq!(b.pick("m", &[]), Some(a));
    }

    #[test]
    fn suspects_are_counted_and_expired_ones_forgotten() {
        let b = Balancer::new(Balance::RoundRobin, Duration::from_millis(20));
        b.set("m", ids(&["a", "b"]));
        b.suspect(&"a".into());
        b.suspect(&"b".into());
        assert_eq!(b.suspected.load(Ordering::Relaxed), 2);
        b.clear_suspect(&"a".into());
        assert_eq!(b.suspected.load(Ordering::Relaxed), 1);
        // "b" leaves without answering again: only expiry can take it off the list.
        b.set("m", ids(&["a"]));
        b.forget_expired_suspects();
        assert_eq!(b.suspected.load(Ordering::Relaxed), 1, "not expired yet");
        std::thread::sleep(Duration::from_millis(30));
        b.forget_expired_suspects();
        assert_eq!(b.suspected.load(Ordering::Relaxed), 0);
        assert_eq!(b.pick("m", &[]), Some("a".into()));
    }
    #[test]
    fn events_update_the_cache() {
        let b = Balancer::new(Balance::RoundRobin, Duration::from_secs(6));
        b.set("m", ids(&["a"]));
        b.join(&"b".into(), &["m".into(), "other".into()]);
        assert!(
            !b.knows("other"),
            "joins do not create entries for methods never called"
        );
        b.remove(&"a".into());
        for _ in 0..5 {
            assert_eq!(b.pick("m", &[]), Some("b".into()));
        }
        b.remove(&"b".into());
        assert_eq!(b.pick("m", &[]), None);
    }

    #[test]
    fn gone_providers_stay_out_until_they_announce() {
        let b = Balancer::new(Balance::RoundRobin, Duration::from_secs(60));
        b.set("m", ids(&["a", "b"]));
        b.mark_gone(&"a".into());
        // A refresh still listing `a` (its entry has not expired) does not bring it back.
        b.set("m", ids(&["a", "b"]));
        for _ in 0..5 {
            assert_eq!(b.pick("m", &[]), Some("b".into()));
        }
        b.join(&"a".into(), &["m".into()]);
        let seen: std::collections::HashSet<_> = (0..10).filter_map(|_| b.pick("m", &[])).collect();
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn a_generation_is_kept_only_while_the_list_is_the_registrys() {
        let b = Balancer::new(Balance::RoundRobin, Duration::from_millis(20));
        let both = ["m".to_string(), "n".to_string()];
        assert_eq!(b.generations(&both), [None, None], "never read");
        b.set_at("m", 7, ids(&["a", "b"]));
        b.set_at("n", 9, ids(&["a"]));
        assert_eq!(b.generations(&both), [Some(7), Some(9)]);
        // An event that changes nothing keeps them.
        b.join(&"a".into(), &["m".into()]);
        b.remove(&"z".into());
        assert_eq!(b.generations(&both), [Some(7), Some(9)]);
        // A join adding a provider forgets that method's.
        b.join(&"c".into(), &["m".into()]);
        assert_eq!(b.generations(&both), [None, Some(9)]);
        // A leave forgets the generation of every list it changed.
        b.set_at("m", 8, ids(&["a", "b", "c"]));
        b.remove(&"b".into());
        assert_eq!(b.generations(&both), [None, Some(9)]);
        b.set_at("m", 8, ids(&["a", "b", "c"]));
        // A gone provider too; the lists read meanwhile leave it out...
        b.mark_gone(&"a".into());
        assert_eq!(b.generations(&both), [None, None]);
        b.set_at("m", 8, ids(&["a", "b", "c"]));
        b.set_at("n", 9, ids(&["a"]));
        assert_eq!(b.pick("n", &[]), None);
        assert_eq!(b.generations(&both), [Some(8), Some(9)]);
        // ...so once its mark runs out, every list is read again (the registry may list it).
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.generations(&both), [None, None]);
        b.set_at("n", 9, ids(&["a"]));
        assert_eq!(b.pick("n", &[]), Some("a".into()));
        // After a reconnect, everything is read again.
        b.set_at("m", 8, ids(&["a"]));
        b.forget_gone();
        assert_eq!(b.generations(&both), [None, None]);
    }

    #[test]
    fn idle_methods_are_forgotten() {
        let b = Balancer::new(Balance::RoundRobin, Duration::from_secs(6));
        b.set("old", ids(&["a"]));
        b.set("new", ids(&["a"]));
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.pick("new", &[]).is_some());
        b.evict_idle(Duration::from_millis(20));
        assert!(!b.knows("old"));
        assert!(b.knows("new"));
    }

    #[test]
    fn least_in_flight_avoids_busy_providers() {
        let b = Balancer::new(Balance::LeastInFlight, Duration::from_secs(6));
        b.set("m", ids(&["a", "b", "c"]));
        let busy_a = b.start_call(&"a".into());
        let busy_b = b.start_call(&"b".into());
        for _ in 0..10 {
            assert_eq!(b.pick("m", &[]), Some("c".into()));
        }
        drop(busy_a);
        drop(busy_b);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..30 {
            seen.insert(b.pick("m", &[]).expect("provider"));
        }
        assert_eq!(seen.len(), 3, "ties are spread");
    }
}
