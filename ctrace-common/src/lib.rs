//! Types shared by the kernel programs (`ctrace-ebpf`) and the loader (`ctrace`).
//!
//! Everything here is `#[repr(C)]` and plain old data: it crosses the kernel/user boundary
//! through maps, globals and the ring buffer, so field order and sizes are an ABI.
#![no_std]

/// Why a packet (or a conntrack entry) was dropped. The numeric values index `REASON_TOTALS`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// No entry could be allocated: the table was full and early_drop found nothing to evict.
    TableFull = 0,
    /// An unassured entry was evicted to make room for a new one.
    EarlyDrop = 1,
    /// Confirming a new entry failed: unresolved clash, chain too long, or a dying entry.
    InsertFailed = 2,
    /// Conntrack judged the packet invalid (dropped by conntrack or by a ctstate INVALID rule).
    Invalid = 3,
    /// A DROP verdict from the ruleset (iptables/nftables), not from conntrack.
    NetfilterRule = 4,
}

impl Reason {
    pub const COUNT: usize = 5;
    pub const ALL: [Reason; Reason::COUNT] = [
        Reason::TableFull,
        Reason::EarlyDrop,
        Reason::InsertFailed,
        Reason::Invalid,
        Reason::NetfilterRule,
    ];

    pub fn from_u8(v: u8) -> Option<Reason> {
        Reason::ALL.get(v as usize).copied()
    }

    /// The stable name used in the CLI, the text output and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::TableFull => "table_full",
            Reason::EarlyDrop => "early_drop",
            Reason::InsertFailed => "insert_failed",
            Reason::Invalid => "invalid",
            Reason::NetfilterRule => "netfilter_rule",
        }
    }
}

mod alert;
mod attribution;
pub use alert::*;
pub use attribution::{Attribution, Evidence, Verdict, classify};

/// Netns the conntrack hook can be armed in at once (each holds 8 netfilter links and a netns reference).
pub const MAX_HOOKED_NETNS: u32 = 64;
/// (netns, reason) pairs the kernel keeps exact per-netns totals for (`NETNS_TOTALS`); drops of further pairs
/// still count in the global totals and are counted as `losses::NETNS_SPLIT`.
pub const MAX_NETNS_REASONS: u32 = 4096;
/// Netns the kernel keeps per-CPU counter baselines for (`BASELINE`, least recently used make room).
pub const MAX_BASELINE_NETNS: u32 = 16384;

/// Set in `DropEvent::flags`.
pub mod flags {
    /// The packet came from a local socket in process context (no input device yet):
    /// `pid`/`comm` name the sender.
    pub const LOCAL_SENDER: u16 = 1 << 0;
    /// The skb carried a conntrack entry (`skb->_nfct != 0`) when it was freed.
    pub const HAS_CT: u16 = 1 << 1;
    /// The network and transport headers could be read and decoded.
    pub const HEADERS_OK: u16 = 1 << 2;
    /// No per-CPU baseline existed for this netns yet: attribution assumed the counters started at 0.
    pub const NEW_BASELINE: u16 = 1 << 3;
    /// Attributed by a kprobe on the conntrack path (exact), not by counter deltas.
    pub const FROM_KPROBE: u16 = 1 << 4;
    /// Not a packet: a conntrack entry that early_drop evicted (the flow is the entry's original
    /// direction). Counted by the kernel's `early_drop` counter, not by `REASON_TOTALS`.
    pub const EVICTED: u16 = 1 << 5;
    /// A kprobe verdict for this skb that the counters contradicted (the counters' answer was used).
    pub const DISAGREEMENT: u16 = 1 << 6;
    /// The netns's baseline on this CPU belonged to another netns with the same inode number, or the
    /// counters went backwards (a reload): attribution restarted from zero.
    pub const BASELINE_RESET: u16 = 1 << 7;
}

/// Indexes of the `LOSSES` map: what could not be recorded or decided, each counted.
pub mod losses {
    /// The ring buffer was full: the event is lost (the totals still count it).
    pub const EVENTS: u32 = 0;
    /// NETNS_TOTALS was full: the per-netns split of this drop is lost (REASON_TOTALS still exact).
    pub const NETNS_SPLIT: u32 = 1;
    /// No trustworthy baseline for this netns on this CPU (older netns not seeded, or its baseline was
    /// evicted from the bounded map): counter evidence for this drop was treated as uncertain.
    pub const NO_BASELINE: u32 = 2;
    /// A kprobe verdict contradicted by the counters.
    pub const DISAGREEMENTS: u32 = 3;
    /// A baseline found stale (inode number reused by a new netns, or counters reset by a reload).
    pub const BASELINE_RESETS: u32 = 4;
    /// Above the stream limit, the aggregation maps were full: the drop is in the totals but in no record and
    /// no aggregate.
    pub const AGGREGATES: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// `REASON_TOTALS` index of a reason decided exactly or with uncertainty.
pub const fn totals_index(reason: Reason, uncertain: bool) -> u32 {
    reason as u32 + if uncertain { Reason::COUNT as u32 } else { 0 }
}

/// `NetnsReasonKey::reason` of an uncertain drop has this bit set.
pub const UNCERTAIN_BIT: u32 = 1 << 8;

/// Kernel field offsets and enum values, resolved from the running kernel's BTF by the loader
/// and written into the programs' read-only globals before load. Nothing is guessed at build time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    // struct sk_buff
    pub skb_dev: u32,
    pub skb_sk: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_protocol: u32,
    pub skb_nfct: u32,
    pub skb_refdst: u32,
    // struct net_device / struct sock / struct dst_entry
    pub dev_nd_net: u32,
    pub sk_net: u32,
    pub dst_dev: u32,
    // struct net
    pub net_inum: u32,
    pub net_ct_stat: u32,
    // struct ip_conntrack_stat
    pub stat_invalid: u32,
    pub stat_insert_failed: u32,
    pub stat_drop: u32,
    pub stat_early_drop: u32,
    pub stat_error: u32,
    /// struct net: `net_cookie` (never reused; 0 when this kernel has none or assigns it lazily).
    pub net_cookie: u32,
    /// `enum skb_drop_reason` value of SKB_DROP_REASON_NETFILTER_DROP, or `u32::MAX` on kernels
    /// without drop reasons (then `nf_hook_slow_{start,end}` filter by free location).
    pub reason_netfilter_drop: u32,
    /// struct bpf_array: offset of `pptrs` (finds this CPU's per-CPU offset, see percpu.rs).
    pub bpf_array_pptrs: u32,
    /// struct nf_conn: `tuplehash[IP_CT_DIR_ORIGINAL].tuple` and `ct_net.net` (from vmlinux or
    /// nf_conntrack's split BTF); 0 when unknown (evicted flows are then not reported).
    pub ct_tuple: u32,
    pub ct_net: u32,
    /// struct net: `nf.hooks_ipv4` and `nf.hooks_ipv6` (arrays of `struct nf_hook_entries *` by hook number);
    /// struct nf_hook_entries: `hooks` (16-byte `{hook, priv}` entries after a u16 count).
    pub net_hooks_ipv4: u32,
    pub net_hooks_ipv6: u32,
    pub entries_hooks: u32,
    /// task_struct.nsproxy and nsproxy.net_ns: the netns of the task writing a sysctl.
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
    /// struct nf_conn: `timeout` (jiffies, 32 bits): an entry already expired when nf_ct_delete runs inside
    /// early_drop is garbage collected there, not evicted (the kernel does not count it as early_drop). 0 =
    /// unknown.
    pub ct_timeout: u32,
    pub nf_hook_slow_start: u64,
    pub nf_hook_slow_end: u64,
}

/// Snapshot of one CPU's `struct ip_conntrack_stat` counters that attribution compares against.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtStat {
    pub drop: u32,
    pub invalid: u32,
    pub insert_failed: u32,
    pub early_drop: u32,
    pub error: u32,
    pub _pad: u32,
}

/// `Baseline::state`.
pub mod baseline_state {
    /// A slot no program wrote yet on this CPU (a per-CPU map zeroes the other CPUs' slots on insert).
    pub const EMPTY: u32 = 0;
    /// Written by the loader from /proc/net/stat/nf_conntrack before attaching: adopted at first sight.
    pub const SEEDED: u32 = 1;
    /// Written by the kfree_skb program at a drop: `generation` says which netns it belongs to.
    pub const LIVE: u32 = 2;
}

/// One CPU's last-seen conntrack counters of one netns (the `BASELINE` map, keyed by netns inode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Baseline {
    pub stat: CtStat,
    /// The address of the netns's per-CPU conntrack counters mixed with its cookie: inode numbers are reused
    /// by the kernel, and so are cookies (6.18) and memory, but hardly both at once.
    pub generation: u64,
    pub state: u32,
    pub _pad: u32,
}

/// Key of the exact per-netns totals map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetnsReasonKey {
    pub netns: u32,
    pub reason: u32,
}

pub const TASK_COMM_LEN: usize = 16;
/// Bytes of kernel text kept per event (e.g. "invalid tcp flag combination").
pub const DETAIL_LEN: usize = 64;

/// What a kprobe on the conntrack path learned about a packet before it was freed (keyed by skb).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PendingVerdict {
    pub ts_ns: u64,
    /// A hash of the packet's headers when it was judged (0 = not checked): skb addresses are reused as soon
    /// as a packet is freed, so a verdict left for an accepted packet must not stick to the next one.
    pub fingerprint: u64,
    /// The CPU that judged it: the drop follows on the same CPU.
    pub cpu: u32,
    pub reason: u8,
    pub _pad: [u8; 3],
    pub detail: [u8; DETAIL_LEN],
}

/// A per-CPU mark left by a kprobe for the next drop on that CPU in the same task context.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuMark {
    pub ts_ns: u64,
    /// `bpf_get_current_pid_tgid()`: a softirq on an idle CPU has 0, so the CPU is part of the key too.
    pub task: u64,
    /// An skb address, where the mark is about one (nf_ct_resolve_clash).
    pub skb: u64,
}

/// One dropped packet (or, with `EVICTED`, one evicted entry), as sent through the ring buffer: 80 bytes, so that
/// it is built with a few stores (no memset call) and a flood moves little memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub netns: u32,
    pub pid: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; TASK_COMM_LEN],
    /// Ports in host byte order; for ICMP, `sport` is the id and `dport` is type << 8 | code.
    pub sport: u16,
    pub dport: u16,
    /// `flags::*`.
    pub flags: u16,
    pub cpu: u16,
    pub reason: u8,
    /// `Attribution as u8`.
    pub attribution: u8,
    /// Bit `1 << reason` for every reason still possible (more than one only when uncertain).
    pub possible: u8,
    /// 4 or 6, 0 when the headers could not be read.
    pub ip_version: u8,
    /// IP protocol number (6 tcp, 17 udp, 1 icmp, 58 icmpv6, ...).
    pub l4proto: u8,
    pub _pad: [u8; 3],
}

/// A `DropEvent` with the kernel's own words about it (kprobe mode), a record of its own size.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DropDetail {
    pub event: DropEvent,
    /// NUL-terminated, e.g. "invalid tcp flag combination".
    pub detail: [u8; DETAIL_LEN],
}

/// Key of the in-kernel aggregates (`AGG_*`, `AGG_COARSE_*`): drops above the stream limit are counted here per
/// (netns, reason, how it was decided, destination) instead of streamed one by one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AggKey {
    pub netns: u32,
    pub reason: u8,
    /// `Attribution as u8`.
    pub attribution: u8,
    /// The `possible` mask of an uncertain drop, 0 when the reason was certain (they aggregate apart).
    pub uncertain: u8,
    /// 4 or 6; 0 when the headers could not be read (and in `AGG_COARSE_*`, which keep no destination).
    pub ip_version: u8,
    pub l4proto: u8,
    pub _pad: u8,
    pub dport: u16,
    pub daddr: [u8; 16],
}

/// This CPU's run of drops with one aggregation key (`AGG_CACHE_<parity>`): a flood to one destination counts
/// here, in an array, and reaches the hash map only when the key changes. Userspace adds the runs of an epoch
/// when it collects it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AggRun {
    pub key: AggKey,
    /// The run's epoch + 1 (0: none).
    pub epoch_tag: u32,
    pub count: u64,
}

/// Per-CPU state of the stream limit and of ring buffer wakeups (`STREAM`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamState {
    /// Start of this CPU's current one-second window, and the records it streamed in it.
    pub window_start_ns: u64,
    pub streamed: u64,
    /// When this CPU last asked for a consumer wakeup.
    pub last_wakeup_ns: u64,
    /// `AGG_EPOCH` + 1 of the epoch in which this CPU found the destination aggregates full (it then counts
    /// straight into the coarse ones until the next epoch).
    pub fine_full_epoch: u64,
    /// The jiffy of the last clock read, and that read: the limit's clock, read once per jiffy, not per drop.
    pub jiffy: u64,
    pub jiffy_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) and made of integers and integer arrays only; padding is
    // explicit, so every bit pattern is valid.
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::CtStat {}
    unsafe impl aya::Pod for super::Baseline {}
    unsafe impl aya::Pod for super::CpuMark {}
    unsafe impl aya::Pod for super::NetnsReasonKey {}
    unsafe impl aya::Pod for super::PendingVerdict {}
    unsafe impl aya::Pod for super::ModuleLayout {}
    unsafe impl aya::Pod for super::AggKey {}
    unsafe impl aya::Pod for super::AggRun {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_round_trips() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_u8(r as u8), Some(r));
        }
        assert_eq!(Reason::from_u8(Reason::COUNT as u8), None);
    }

    #[test]
    fn abi_sizes_are_stable() {
        // The ring buffer record and the globals are an ABI between the two sides.
        assert_eq!(core::mem::size_of::<DropEvent>(), 80);
        assert_eq!(core::mem::size_of::<DropDetail>(), 144);
        assert_eq!(core::mem::size_of::<AggKey>(), 28);
        assert_eq!(core::mem::size_of::<AggRun>(), 40);
        assert_eq!(core::mem::size_of::<KernelLayout>(), 136);
        assert_eq!(core::mem::size_of::<Baseline>(), 40);
        assert_eq!(core::mem::size_of::<PendingVerdict>(), 88);
        assert_eq!(core::mem::size_of::<Ancestor>(), 32);
        assert_eq!(core::mem::size_of::<ModuleEvent>(), 256 + 8 + 32 * MAX_ANCESTORS);
        assert_eq!(core::mem::size_of::<ModuleLayout>(), 64);
        assert_eq!(core::mem::size_of::<SysctlEvent>(), 168);
    }
}
