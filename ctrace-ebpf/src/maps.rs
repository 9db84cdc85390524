//! Maps shared by the programs. Names are UPPER_SNAKE and are looked up by the loader.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap, RingBuf},
};
use ctrace_common::{CtStat, NetnsReasonKey, Reason};

/// Per-event records for userspace. When it is full the event is counted in `LOST`, never silently dropped.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Exact totals per reason (index = `Reason as u32`), kept whether or not the event reached userspace.
#[map]
pub static REASON_TOTALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT as u32, 0);

/// Exact totals per (netns, reason).
#[map]
pub static NETNS_TOTALS: PerCpuHashMap<NetnsReasonKey, u64> = PerCpuHashMap::with_max_entries(4096, 0);

/// Counters of what could not be recorded: index 0 = ring buffer full (events lost),
/// 1 = NETNS_TOTALS full (per-netns split lost; REASON_TOTALS still exact),
/// 2 = BASELINE full (attribution fell back to "no baseline").
#[map]
pub static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);
pub const LOST_EVENTS: u32 = 0;
pub const LOST_NETNS_SPLIT: u32 = 1;
pub const LOST_BASELINE: u32 = 2;

/// Last-seen conntrack counters of each netns, one value per CPU (a per-CPU hash: lookups
/// return this CPU's slot). Seeded by the loader for netns that existed before start; a netns
/// created later starts at 0, exactly like the kernel's own counters.
#[map]
pub static BASELINE: PerCpuHashMap<u32, CtStat> = PerCpuHashMap::with_max_entries(4096, 0);

#[inline(always)]
pub fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it (programs do not migrate while running).
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn bump_netns(netns: u32, reason: Reason) {
    let key = NetnsReasonKey {
        netns,
        reason: reason as u32,
    };
    match NETNS_TOTALS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU hash.
        Some(p) => unsafe { *p += 1 },
        None => {
            if NETNS_TOTALS.insert(key, 1u64, 0).is_err() {
                bump(&LOSSES, LOST_NETNS_SPLIT);
            }
        }
    }
}
