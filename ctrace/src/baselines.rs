//! Pruning the kernel's per-netns counter baselines once their netns is gone. The map is a bounded LRU, so
//! dead netns would age out anyway; pruning keeps room for the living ones on hosts that churn through netns.
//! A netns counts as gone when two registry scans in a row (5 s apart) did not find it. One that is alive but
//! invisible (no process inside, no bind mount) and drops again just starts a new baseline, which the kernel
//! counts as `no_baseline`.

use std::collections::HashSet;

use crate::{netns::Registry, probes::loader::Tracer};

#[derive(Debug, Default)]
pub struct Pruner {
    /// Baseline keys the previous scan did not find.
    absent_before: HashSet<u32>,
    /// Baselines deleted so far.
    pub pruned: u64,
    /// The baseline keys at the previous scan, after pruning.
    keys_before: HashSet<u32>,
    /// Baselines the kernel's LRU evicted to make room (keys gone between two scans that ctrace did not delete;
    /// one inserted and evicted between two scans is not seen, so this is a lower bound).
    pub evicted: u64,
}

impl Pruner {
    /// Deletes the baselines of netns the last two scans of `registry` did not find. Best effort: a map that
    /// cannot be read now is read again at the next scan.
    /// The conntrack hook's links hold a reference on their netns: they go with it.
    pub fn prune(&mut self, registry: &Registry, tracer: &mut Tracer) {
        let Ok(baselines) = tracer.baseline_netns() else { return };
        self.count_evictions(&baselines);
        let mut keys = baselines;
        keys.extend(tracer.hooked_netns());
        keys.sort_unstable();
        keys.dedup();
        let gone = self.gone(&keys, |n| registry.known.contains_key(&n));
        if !gone.is_empty() {
            let _ = tracer.forget_baselines(&gone);
            for n in &gone {
                tracer.disarm_conntrack_hook(*n);
                self.keys_before.remove(n);
            }
        }
    }

    /// Counts the keys of the previous scan that are missing now (ctrace deleted none since: `prune` takes its
    /// own deletions out of `keys_before`).
    pub fn count_evictions(&mut self, keys: &[u32]) {
        let now: HashSet<u32> = keys.iter().copied().collect();
        self.evicted += self.keys_before.difference(&now).count() as u64;
        self.keys_before = now;
    }

    /// Given the netns that have a baseline and whether a scan found each, returns those to delete now.
    pub fn gone(&mut self, keys: &[u32], found: impl Fn(u32) -> bool) -> Vec<u32> {
        let absent: HashSet<u32> = keys.iter().copied().filter(|&n| !found(n)).collect();
        let gone: Vec<u32> = absent.intersection(&self.absent_before).copied().collect();
        self.absent_before = absent.into_iter().filter(|n| !gone.contains(n)).collect();
        self.pruned += gone.len() as u64;
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_netns_is_gone_after_two_scans_without_it() {
        let mut p = Pruner::default();
        let live = |n: u32| n == 1;
        assert!(p.gone(&[1, 2], live).is_empty(), "one miss is not enough");
        assert_eq!(p.gone(&[1, 2], live), [2]);
        assert!(p.gone(&[1], live).is_empty());
        assert_eq!(p.pruned, 1);
    }

    #[test]
    fn keys_that_vanish_without_pruning_were_evicted() {
        let mut p = Pruner::default();
        p.count_evictions(&[1, 2, 3]);
        p.count_evictions(&[2, 3, 4]);
        assert_eq!(p.evicted, 1);
        p.keys_before.remove(&4); // pruned by ctrace itself
        p.count_evictions(&[2, 3]);
        assert_eq!(p.evicted, 1);
    }

    #[test]
    fn a_netns_seen_again_is_kept() {
        let mut p = Pruner::default();
        assert!(p.gone(&[3], |_| false).is_empty());
        assert!(p.gone(&[3], |_| true).is_empty(), "found again");
        assert!(p.gone(&[3], |_| false).is_empty(), "the count starts over");
        assert_eq!(p.gone(&[3], |_| false), [3]);
    }
}
