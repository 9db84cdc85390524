//! What the programs counted in the kernel, read from their maps: exact totals per reason and per netns,
//! losses, attribution fallbacks, and the per-netns counter baselines attribution starts from.

use std::collections::HashMap;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{PerCpuArray, PerCpuHashMap, PerCpuValues},
};
use ctrace_common::{Baseline, CtStat, NetnsReasonKey, Reason, UNCERTAIN_BIT, baseline_state, losses, totals_index};

use super::loader::Tracer;
use crate::{ctstat::CtStats, summary::Split};

impl Tracer {
    pub(super) fn percpu_sum(&self, map: &str, index: u32) -> anyhow::Result<u64> {
        let m: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map(map).context("map missing")?)?;
        Ok(m.get(&index, 0)?.iter().sum())
    }

    /// Exact totals per reason, counted in the kernel whether or not events reached us, split by
    /// whether the reason was certain.
    pub fn reason_totals(&self) -> anyhow::Result<HashMap<Reason, Split>> {
        let mut out = HashMap::new();
        for r in Reason::ALL {
            let split = Split {
                exact: self.percpu_sum("REASON_TOTALS", totals_index(r, false))?,
                uncertain: self.percpu_sum("REASON_TOTALS", totals_index(r, true))?,
            };
            out.insert(r, split);
        }
        Ok(out)
    }

    /// Exact totals per (netns, reason).
    pub fn netns_totals(&self) -> anyhow::Result<HashMap<(u32, Reason), Split>> {
        let m: PerCpuHashMap<_, NetnsReasonKey, u64> =
            PerCpuHashMap::try_from(self.ebpf.map("NETNS_TOTALS").context("NETNS_TOTALS missing")?)?;
        let mut out: HashMap<(u32, Reason), Split> = HashMap::new();
        for item in m.iter() {
            let (k, v) = item?;
            let Some(r) = Reason::from_u8((k.reason & !UNCERTAIN_BIT) as u8) else {
                continue;
            };
            let split = out.entry((k.netns, r)).or_default();
            let n: u64 = v.iter().sum();
            if k.reason & UNCERTAIN_BIT != 0 {
                split.uncertain += n;
            } else {
                split.exact += n;
            }
        }
        Ok(out)
    }

    /// Drops in the totals that are in no record and no aggregate: the ring buffer was full, or (above the rate
    /// limit) the aggregation maps were.
    pub fn lost_events(&self) -> anyhow::Result<u64> {
        Ok(self.percpu_sum("LOSSES", losses::EVENTS)? + self.percpu_sum("LOSSES", losses::AGGREGATES)?)
    }

    /// Drops whose per-netns split was not recorded (more netns than the map holds).
    pub fn lost_netns_split(&self) -> anyhow::Result<u64> {
        self.percpu_sum("LOSSES", losses::NETNS_SPLIT)
    }

    /// The netns that have a counter baseline in the kernel.
    pub fn baseline_netns(&self) -> anyhow::Result<Vec<u32>> {
        let map: PerCpuHashMap<_, u32, Baseline> =
            PerCpuHashMap::try_from(self.ebpf.map("BASELINE").context("BASELINE map missing")?)?;
        Ok(map.keys().filter_map(Result::ok).collect())
    }

    /// Deletes the baselines of netns that are gone.
    pub fn forget_baselines(&mut self, netns: &[u32]) -> anyhow::Result<()> {
        let mut map: PerCpuHashMap<_, u32, Baseline> =
            PerCpuHashMap::try_from(self.ebpf.map_mut("BASELINE").context("BASELINE map missing")?)?;
        for n in netns {
            // Already gone is fine: the kernel's LRU may have evicted it meanwhile.
            let _ = map.remove(n);
        }
        Ok(())
    }

    /// How often attribution had to fall back, and why.
    pub fn attribution_stats(&self) -> anyhow::Result<crate::summary::AttributionStats> {
        Ok(crate::summary::AttributionStats {
            no_baseline: self.percpu_sum("LOSSES", losses::NO_BASELINE)?,
            probe_disagreements: self.percpu_sum("LOSSES", losses::DISAGREEMENTS)?,
            baseline_resets: self.percpu_sum("LOSSES", losses::BASELINE_RESETS)?,
            baselines_pruned: 0,
            hooked_netns: 0,
        })
    }
}

/// Writes each netns's current per-CPU counters as the starting point of attribution.
pub(super) fn seed_baselines(ebpf: &mut Ebpf, baselines: &HashMap<u32, CtStats>) -> anyhow::Result<()> {
    let ncpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
    let mut map: PerCpuHashMap<_, u32, Baseline> =
        PerCpuHashMap::try_from(ebpf.map_mut("BASELINE").context("BASELINE map missing")?)?;
    for (netns, stats) in baselines {
        if stats.per_cpu.len() != ncpus {
            // Cannot line rows up with CPUs: let the program start this netns from its first drop.
            continue;
        }
        let values: Vec<Baseline> = (0..ncpus)
            .map(|cpu| Baseline {
                stat: CtStat {
                    drop: stats.cpu(cpu, "drop") as u32,
                    invalid: stats.cpu(cpu, "invalid") as u32,
                    insert_failed: stats.cpu(cpu, "insert_failed") as u32,
                    early_drop: stats.cpu(cpu, "early_drop") as u32,
                    error: stats.cpu(cpu, "error") as u32,
                    _pad: 0,
                },
                generation: 0,
                state: baseline_state::SEEDED,
                _pad: 0,
            })
            .collect();
        map.insert(*netns, PerCpuValues::try_from(values)?, 0)?;
    }
    Ok(())
}
