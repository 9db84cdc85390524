//! Maps shared by the programs. Names are UPPER_SNAKE and are looked up by the loader.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use ctrace_common::{
    AggKey, AggRun, Baseline, DropDetail, MAX_BASELINE_NETNS, MAX_HOOKED_NETNS, MAX_NETNS_REASONS, NetnsReasonKey,
    Reason, StreamState, UNCERTAIN_BIT, losses, totals_index,
};

/// Bytes of the `EVENTS` ring buffer.
pub const EVENTS_BYTES: u32 = 1 << 22;

/// Per-event records for userspace. When it is full the event is counted in `LOSSES`, never silently dropped.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Where the kfree_skb program builds this CPU's record, in place: no stack copy, and no zero-fill of byte arrays
/// (which the BPF backend turns into calls to a byte-by-byte memset).
#[map]
pub static RECORD: PerCpuArray<DropDetail> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's stream limit window and last wakeup (index 0).
#[map]
pub static STREAM: PerCpuArray<StreamState> = PerCpuArray::with_max_entries(1, 0);

/// Drops above the stream limit, counted per `AggKey` (destination kept), in the map of the epoch's parity:
/// userspace takes the other one out whole (one batch syscall) once a second.
#[map]
pub static AGG_0: PerCpuHashMap<AggKey, u64> = PerCpuHashMap::with_max_entries(AGG_ENTRIES, 0);
#[map]
pub static AGG_1: PerCpuHashMap<AggKey, u64> = PerCpuHashMap::with_max_entries(AGG_ENTRIES, 0);

/// Where `AGG_*` is full: the same counts without the destination.
#[map]
pub static AGG_COARSE_0: PerCpuHashMap<AggKey, u64> = PerCpuHashMap::with_max_entries(AGG_COARSE_ENTRIES, 0);
#[map]
pub static AGG_COARSE_1: PerCpuHashMap<AggKey, u64> = PerCpuHashMap::with_max_entries(AGG_COARSE_ENTRIES, 0);

/// This CPU's current run of drops with one key, per epoch parity (see `AggRun`).
#[map]
pub static AGG_RUN_0: PerCpuArray<AggRun> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static AGG_RUN_1: PerCpuArray<AggRun> = PerCpuArray::with_max_entries(1, 0);

/// Destinations aggregated per second (beyond them, the aggregate lines fold destinations anyway).
const AGG_ENTRIES: u32 = 8192;
const AGG_COARSE_ENTRIES: u32 = 1024;

/// Index 0: the current aggregation epoch; userspace advances it once a second before collecting the last one.
#[map]
pub static AGG_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// Exact totals per reason, split by exactness (index = `totals_index(reason, uncertain)`), kept whether or
/// not the event reached userspace.
#[map]
pub static REASON_TOTALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * Reason::COUNT as u32, 0);

/// Exact totals per (netns, reason | UNCERTAIN_BIT when uncertain).
#[map]
pub static NETNS_TOTALS: PerCpuHashMap<NetnsReasonKey, u64> = PerCpuHashMap::with_max_entries(MAX_NETNS_REASONS, 0);

/// What could not be recorded or decided, by `ctrace_common::losses` index.
#[map]
pub static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(losses::COUNT, 0);

/// Last-seen conntrack counters of each netns (by inode), one slot per CPU. Bounded: least recently used
/// netns (typically ones that are gone) make room; a lookup that then misses is counted as NO_BASELINE.
/// Inode numbers are reused, so each slot also holds the netns's generation (cookie or `struct net`).
#[map]
pub static BASELINE: LruPerCpuHashMap<u32, Baseline> = LruPerCpuHashMap::with_max_entries(MAX_BASELINE_NETNS, 0);

/// Netns where userspace armed the conntrack hook (netfilter programs right before and right after
/// conntrack's hook, 6.4+), by inode, with the bpf_ktime from which its evidence counts.
#[map]
pub static HOOKED: HashMap<u32, u64> = HashMap::with_max_entries(MAX_HOOKED_NETNS, 0);

/// Index 0: how many netns `HOOKED` holds (0: the kfree_skb program skips the hash lookup).
#[map]
pub static HOOKED_COUNT: Array<u32> = Array::with_max_entries(1, 0);

/// The addresses of `ipv4_conntrack_local` and `ipv6_conntrack_local` (conntrack's LOCAL_OUT hook
/// functions), set by userspace from kallsyms (again after nf_conntrack reloads); 0 when unknown.
#[map]
pub static CT_HOOK_FNS: Array<u64> = Array::with_max_entries(2, 0);

/// Per-CPU scratch space for one read of a `struct nf_hook_entries` (count and the first HOOK_ENTRIES).
#[map]
pub static HOOK_SCRATCH: PerCpuArray<[u64; 1 + 2 * HOOK_ENTRIES]> = PerCpuArray::with_max_entries(1, 0);

/// Hook functions looked at per hook (netns rarely register more than a dozen at LOCAL_OUT).
pub const HOOK_ENTRIES: usize = 24;

/// Packets (skb address -> bpf_ktime) that left conntrack's hook without an entry in their current pass
/// through the hooks; written by the hook programs userspace assembles (probes/conntrack_hook.rs), which
/// also delete a packet's mark when it enters the hooks again.
#[map]
pub static CT_PASSED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(8192, 0);

/// Per-CPU scratch space for one read of a netns's conntrack counters (struct ip_conntrack_stat).
#[map]
pub static STAT_SCRATCH: PerCpuArray<[u32; 12]> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it (programs do not migrate while running).
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn bump_loss(index: u32) {
    bump(&LOSSES, index);
}

#[inline(always)]
pub fn add_loss(index: u32, n: u64) {
    if let Some(p) = LOSSES.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *p += n };
    }
}

#[inline(always)]
pub fn bump_totals(netns: u32, reason: Reason, uncertain: bool) {
    bump(&REASON_TOTALS, totals_index(reason, uncertain));
    let key = NetnsReasonKey {
        netns,
        reason: reason as u32 | if uncertain { UNCERTAIN_BIT } else { 0 },
    };
    match NETNS_TOTALS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU hash.
        Some(p) => unsafe { *p += 1 },
        None => {
            if NETNS_TOTALS.insert(key, 1u64, 0).is_err() {
                bump_loss(losses::NETNS_SPLIT);
            }
        }
    }
}
