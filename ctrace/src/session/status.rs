//! What the sinks that show state see: the run's status, refreshed once a second (the kernel's exact totals,
//! per-netns splits and counters, probes), and the bounds on per-netns state with what each cost so far.

use ctrace_common::Reason;

use super::state::Session;
use crate::{
    bounds::Bound,
    probes::loader::Tracer,
    report::{Event, Status},
    summary::Split,
};

impl Session {
    /// Records what `bound` cost so far; the first time it is reached, says so.
    pub(super) fn observe_bound(&mut self, bound: Bound, count: u64) {
        if let Some(notice) = self.bounds.observe(bound, count) {
            self.sinks.emit(Event::notice(notice));
        }
    }

    /// Every bound on per-netns state: what it cost so far, and a notice the first time it is reached.
    pub(super) fn observe_bounds(&mut self, tracer: &Tracer) {
        let costs = [
            (Bound::NetnsTotals, tracer.lost_netns_split().unwrap_or(0)),
            (Bound::Baselines, self.pruner.evicted),
            (Bound::HookedNetns, self.hook.refused),
            (Bound::CounterReads, self.counters.ticks_over_budget),
            (Bound::RetiredNetns, self.counters.folded),
            (Bound::NetnsLookups, self.registry.deferred),
        ];
        for (bound, cost) in costs {
            self.observe_bound(bound, cost);
        }
    }

    /// How often attribution fell back, counted in the kernel and here.
    pub(super) fn attribution_stats(&self, tracer: &Tracer) -> anyhow::Result<crate::summary::AttributionStats> {
        let mut a = tracer.attribution_stats()?;
        a.baselines_pruned = self.pruner.pruned;
        a.hooked_netns = self.hook.armed;
        Ok(a)
    }

    /// The run's state for the sinks that show it: the kernel's exact totals, per netns where the kernel kept
    /// the split, early_drop and the fill from the kernel's counters.
    pub(super) fn status(&self, tracer: &Tracer) -> anyhow::Result<Status> {
        let mut status = Status {
            mode: self.mode,
            drops: tracer.reason_totals()?.into_iter().collect(),
            netns_split_lost: tracer.lost_netns_split()?,
            conntrack_max: self.max,
            events_lost: tracer.lost_events()?,
            attribution: self.attribution_stats(tracer)?,
            module_requests_unprivileged: self.modules.unprivileged,
            probes: tracer.probes(),
            bounds: self.bounds,
            ..Default::default()
        };
        for ((netns, reason), split) in tracer.netns_totals()? {
            status.netns.entry(netns).or_default().drops.insert(reason, split);
        }
        let mut early_drop = 0;
        for (netns, delta) in self.counters.deltas() {
            let n = status.netns.entry(netns).or_default();
            if self.early_drop_wanted {
                early_drop += delta.early_drop;
                n.drops.insert(
                    Reason::EarlyDrop,
                    Split {
                        exact: delta.early_drop,
                        uncertain: 0,
                    },
                );
            }
            n.kernel = Some(delta);
            n.entries = self.counters.entries(netns);
        }
        if self.early_drop_wanted {
            status.drops.insert(
                Reason::EarlyDrop,
                Split {
                    exact: early_drop,
                    uncertain: 0,
                },
            );
        }
        for (netns, n) in &mut status.netns {
            n.name = self.registry.name(*netns);
        }
        Ok(status)
    }

    /// Hands the sinks that show state a fresh status.
    pub(super) fn publish_status(&mut self, tracer: &Tracer) {
        if !self.sinks.wants_status() {
            return;
        }
        match self.status(tracer) {
            Ok(status) => self.sinks.status(&status),
            Err(e) => log::warn!("cannot read the in-kernel totals: {}", crate::brief(&e)),
        }
    }
}
