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

/// How a drop's reason was decided (`DropEvent::attribution`). Everything but `Uncertain` is exact
/// (within the limits the README's "How exact" table lists).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attribution {
    /// A conntrack kprobe saw the cause for this very skb (kprobe mode), and the counters agree.
    Probe = 0,
    /// `skb->_nfct` is IP_CT_UNTRACKED (NOTRACK): conntrack never judged the packet, the ruleset dropped it.
    Notrack = 1,
    /// The skb carries a conntrack entry and no conntrack counter moved for it: conntrack accepted it, a rule
    /// dropped it.
    CtAttached = 2,
    /// This CPU's conntrack counters of the netns, and only the ones every increment of which is a dropped
    /// packet (`drop`, `insert_failed`), or none moved at all.
    Counters = 3,
    /// The evidence leaves more than one reason possible (`DropEvent::possible`).
    Uncertain = 4,
}

impl Attribution {
    pub const ALL: [Attribution; 5] = [
        Attribution::Probe,
        Attribution::Notrack,
        Attribution::CtAttached,
        Attribution::Counters,
        Attribution::Uncertain,
    ];

    pub fn from_u8(v: u8) -> Option<Attribution> {
        Attribution::ALL.get(v as usize).copied()
    }

    pub const fn name(self) -> &'static str {
        match self {
            Attribution::Probe => "probe",
            Attribution::Notrack => "notrack",
            Attribution::CtAttached => "ct_attached",
            Attribution::Counters => "counters",
            Attribution::Uncertain => "uncertain",
        }
    }
}

/// What the kfree_skb program knows about one netfilter drop when it decides the reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    /// `skb->_nfct` has a conntrack entry pointer.
    pub has_ct: bool,
    /// `skb->_nfct == IP_CT_UNTRACKED` (NOTRACK / `CT --notrack` / nft `notrack`).
    pub untracked: bool,
    /// Counter increases on this CPU in this netns since the previous drop there.
    pub delta: CtStat,
    /// False when the baseline the delta was taken against is not known to be right (first drop of an
    /// older netns on this CPU that the loader could not seed, or an evicted baseline): `delta` is then
    /// the absolute counters.
    pub baseline_known: bool,
    /// The kernel counts resolved clashes as `insert_failed` without dropping (before 5.10, RHEL 8).
    pub insert_failed_noisy: bool,
    /// The reason a kprobe left for this very skb (kprobe mode), if any.
    pub probe: Option<Reason>,
}

/// The decision: a reason, how it was decided, and (when uncertain) every reason still possible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    pub attribution: Attribution,
    /// Bit `1 << reason` for each possible reason; only the decided one unless uncertain.
    pub possible: u8,
    /// A probe verdict that the counters contradict (counted; the counters' answer is used).
    pub disagreement: bool,
}

const fn bit(r: Reason) -> u8 {
    1 << r as u8
}

impl Verdict {
    const fn exact(reason: Reason, attribution: Attribution) -> Verdict {
        Verdict {
            reason,
            attribution,
            possible: bit(reason),
            disagreement: false,
        }
    }

    const fn uncertain(reason: Reason, other: Reason) -> Verdict {
        Verdict {
            reason,
            attribution: Attribution::Uncertain,
            possible: bit(reason) | bit(other),
            disagreement: false,
        }
    }
}

/// Who dropped the packet. Kernel facts it rests on (nf_conntrack_core.c, 5.10-6.18):
/// - every `drop` and `insert_failed` increment is a packet conntrack drops, freed by `nf_hook_slow` right
///   after, so the previous drop in this netns on this CPU consumed its own increments: these counters carry
///   no noise (before 5.10 a resolved clash bumps `insert_failed` without a drop: `insert_failed_noisy`);
/// - `invalid` and `error` also count packets that conntrack then lets through, so a delta there may belong
///   to any packet since the previous drop: it cannot tell a conntrack verdict from a ruleset drop;
/// - conntrack clears `_nfct` of a packet it judged invalid, a NOTRACKed packet carries IP_CT_UNTRACKED, and
///   a packet conntrack accepted carries its entry.
#[inline(always)]
pub fn classify(e: &Evidence) -> Verdict {
    if e.untracked {
        return Verdict::exact(Reason::NetfilterRule, Attribution::Notrack);
    }
    // A probe verdict is for this skb; the counters must agree with it.
    if let Some(p) = e.probe {
        let d = &e.delta;
        let agrees = match p {
            Reason::TableFull => !e.has_ct && (d.drop != 0 || !e.baseline_known),
            Reason::InsertFailed => e.has_ct && (d.insert_failed != 0 || !e.baseline_known),
            Reason::Invalid => !e.has_ct && (d.invalid != 0 || d.error != 0 || !e.baseline_known),
            _ => false,
        };
        if agrees {
            return Verdict::exact(p, Attribution::Probe);
        }
        let mut v = classify_by_counters(e);
        v.disagreement = true;
        return v;
    }
    classify_by_counters(e)
}

#[inline(always)]
fn classify_by_counters(e: &Evidence) -> Verdict {
    use Reason::*;
    let d = &e.delta;
    let v = if e.has_ct {
        if d.insert_failed != 0 {
            if e.insert_failed_noisy {
                Verdict::uncertain(InsertFailed, NetfilterRule)
            } else {
                Verdict::exact(InsertFailed, Attribution::Counters)
            }
        } else if d.drop != 0 {
            // Conntrack dropped a packet with an entry attached without an insert failure (an extension
            // that went away during confirm, a helper's sequence adjustment): rare, and not a rule.
            Verdict::uncertain(InsertFailed, NetfilterRule)
        } else {
            Verdict::exact(NetfilterRule, Attribution::CtAttached)
        }
    } else if d.drop != 0 {
        // No entry could be allocated. (The only ct-less drops that also count `invalid` are a TCP
        // reopen race and a truncated DCCP header; `invalid` noise does not change this.)
        Verdict::exact(TableFull, Attribution::Counters)
    } else if d.invalid != 0 || d.error != 0 {
        Verdict::uncertain(Invalid, NetfilterRule)
    } else if d.insert_failed != 0 && !e.insert_failed_noisy {
        // An insert failure whose skb lost its entry: conntrack's, not the ruleset's.
        Verdict::uncertain(InsertFailed, NetfilterRule)
    } else {
        return Verdict::exact(NetfilterRule, Attribution::Counters);
    };
    if !e.baseline_known && v.attribution != Attribution::Uncertain && v.attribution != Attribution::CtAttached {
        // The delta is the counters' absolute value: it may be older than this packet.
        return Verdict::uncertain(v.reason, NetfilterRule);
    }
    v
}

/// Set in `DropEvent::flags`.
pub mod flags {
    /// The packet came from a local socket in process context (no input device yet):
    /// `pid`/`comm` name the sender.
    pub const LOCAL_SENDER: u32 = 1 << 0;
    /// The skb carried a conntrack entry (`skb->_nfct != 0`) when it was freed.
    pub const HAS_CT: u32 = 1 << 1;
    /// The network and transport headers could be read and decoded.
    pub const HEADERS_OK: u32 = 1 << 2;
    /// No per-CPU baseline existed for this netns yet: attribution assumed the counters started at 0.
    pub const NEW_BASELINE: u32 = 1 << 3;
    /// Attributed by a kprobe on the conntrack path (exact), not by counter deltas.
    pub const FROM_KPROBE: u32 = 1 << 4;
    /// Not a packet: a conntrack entry that early_drop evicted (the flow is the entry's original
    /// direction). Counted by the kernel's `early_drop` counter, not by `REASON_TOTALS`.
    pub const EVICTED: u32 = 1 << 5;
    /// A kprobe verdict for this skb that the counters contradicted (the counters' answer was used).
    pub const DISAGREEMENT: u32 = 1 << 6;
    /// The netns's baseline on this CPU belonged to another netns with the same inode number, or the
    /// counters went backwards (a reload): attribution restarted from zero.
    pub const BASELINE_RESET: u32 = 1 << 7;
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
    pub const COUNT: u32 = 5;
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
    /// The netns's cookie (or its `struct net` address where there is no cookie): inode numbers are
    /// reused by the kernel, the cookie is not.
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

/// One dropped packet, as sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Where the skb was freed (kernel text address).
    pub location: u64,
    pub netns: u32,
    pub cpu: u32,
    pub pid: u32,
    pub flags: u32,
    /// Counter increases on this CPU since the previous drop seen in this netns.
    pub delta: CtStat,
    pub comm: [u8; TASK_COMM_LEN],
    pub reason: u8,
    /// 4 or 6, 0 when the headers could not be read.
    pub ip_version: u8,
    /// IP protocol number (6 tcp, 17 udp, 1 icmp, 58 icmpv6, ...).
    pub l4proto: u8,
    /// ctinfo bits of skb->_nfct (IP_CT_NEW etc.) when HAS_CT.
    pub ctinfo: u8,
    /// Ports in host byte order; for ICMP, `sport` is the id and `dport` is type << 8 | code.
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// NUL-terminated kernel text about the drop (kprobe mode), empty otherwise.
    pub detail: [u8; DETAIL_LEN],
    /// `Attribution as u8`.
    pub attribution: u8,
    /// Bit `1 << reason` for every reason still possible (more than one only when uncertain).
    pub possible: u8,
    pub _pad: [u8; 6],
}

/// `ModuleEvent::kind`.
pub mod module_kind {
    /// module:module_load: the module is in memory, its init is about to run.
    pub const LOAD: u32 = 1;
    /// module:module_free: the module is being unloaded.
    pub const FREE: u32 = 2;
    /// syscalls:sys_enter_delete_module: someone asks to unload `name`.
    pub const DELETE_ENTER: u32 = 3;
    /// syscalls:sys_exit_delete_module: the answer (`ret`, 0 or -errno).
    pub const DELETE_EXIT: u32 = 4;
    /// sched_process_exec of `modprobe` or `rmmod` (`cmdline` holds its argv).
    pub const TOOL_EXEC: u32 = 5;
    /// That tool's exit (`ret` = exit status): kmod refuses to unload a module in use by itself,
    /// without calling delete_module, so its exit status is the only trace.
    pub const TOOL_EXIT: u32 = 6;
}

pub const MODULE_NAME_LEN: usize = 56;
pub const CMDLINE_LEN: usize = 128;

/// A module load/unload step and the process behind it, from the module ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleEvent {
    pub ts_ns: u64,
    /// Return value of delete_module (DELETE_EXIT), else 0.
    pub ret: i64,
    pub kind: u32,
    /// tgid and parent tgid.
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub comm: [u8; TASK_COMM_LEN],
    pub parent_comm: [u8; TASK_COMM_LEN],
    pub name: [u8; MODULE_NAME_LEN],
    /// The process's argv, NUL-separated, truncated.
    pub cmdline: [u8; CMDLINE_LEN],
}

pub const SYSCTL_NAME_LEN: usize = 64;
pub const SYSCTL_VALUE_LEN: usize = 32;

/// A write to a conntrack sysctl (cgroup/sysctl program), before the kernel parses it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SysctlEvent {
    pub ts_ns: u64,
    pub pid: u32,
    pub uid: u32,
    /// 0 when this kernel gives sysctl programs no task helpers (before 6.1): pid/uid/comm unknown.
    pub has_task: u32,
    pub _pad: u32,
    pub comm: [u8; TASK_COMM_LEN],
    /// `net/netfilter/nf_conntrack_max`.
    pub name: [u8; SYSCTL_NAME_LEN],
    pub old: [u8; SYSCTL_VALUE_LEN],
    pub new: [u8; SYSCTL_VALUE_LEN],
}

/// Offsets for module events: `struct module`, `struct task_struct`, `struct mm_struct`, and the
/// syscall tracepoint records (read from tracefs `format` files).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModuleLayout {
    pub module_name: u32,
    pub task_real_parent: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    pub task_mm: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    /// sys_enter_delete_module: offset of `name_user`; sys_exit_delete_module: offset of `ret`.
    pub delete_enter_name: u32,
    pub delete_exit_ret: u32,
    pub task_exit_code: u32,
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

    fn ev(has_ct: bool, delta: CtStat) -> Evidence {
        Evidence {
            has_ct,
            delta,
            baseline_known: true,
            ..Evidence::default()
        }
    }

    const INVALID: CtStat = CtStat {
        invalid: 1,
        drop: 0,
        insert_failed: 0,
        early_drop: 0,
        error: 0,
        _pad: 0,
    };

    fn possible(v: &Verdict) -> [bool; Reason::COUNT] {
        Reason::ALL.map(|r| v.possible & (1 << r as u8) != 0)
    }

    #[test]
    fn notrack_is_a_rule_drop_whatever_the_counters_say() {
        let mut e = ev(false, INVALID);
        e.untracked = true;
        e.delta.drop = 3;
        let v = classify(&e);
        assert_eq!((v.reason, v.attribution), (Reason::NetfilterRule, Attribution::Notrack));
    }

    #[test]
    fn invalid_noise_never_makes_a_confident_invalid() {
        // A ct-less drop after accepted invalid packets: conntrack's verdict or a raw-table rule.
        let v = classify(&ev(false, CtStat { invalid: 7, ..INVALID }));
        assert_eq!(v.attribution, Attribution::Uncertain);
        assert_eq!(
            possible(&v),
            [false, false, false, true, true],
            "invalid or netfilter_rule"
        );
        // With an entry attached conntrack accepted the packet: the noise is someone else's.
        let v = classify(&ev(true, CtStat { invalid: 7, ..INVALID }));
        assert_eq!(
            (v.reason, v.attribution),
            (Reason::NetfilterRule, Attribution::CtAttached)
        );
    }

    #[test]
    fn noise_free_counters_are_exact() {
        let v = classify(&ev(
            false,
            CtStat {
                drop: 1,
                invalid: 5,
                ..INVALID
            },
        ));
        assert_eq!((v.reason, v.attribution), (Reason::TableFull, Attribution::Counters));
        let v = classify(&ev(
            true,
            CtStat {
                insert_failed: 1,
                drop: 1,
                invalid: 0,
                ..INVALID
            },
        ));
        assert_eq!((v.reason, v.attribution), (Reason::InsertFailed, Attribution::Counters));
        let v = classify(&ev(false, CtStat::default()));
        assert_eq!(
            (v.reason, v.attribution),
            (Reason::NetfilterRule, Attribution::Counters)
        );
    }

    #[test]
    fn resolved_clashes_counted_as_insert_failed_leave_it_uncertain() {
        let mut e = ev(
            true,
            CtStat {
                insert_failed: 1,
                invalid: 0,
                ..INVALID
            },
        );
        e.insert_failed_noisy = true;
        let v = classify(&e);
        assert_eq!(v.attribution, Attribution::Uncertain);
        assert_eq!(possible(&v), [false, false, true, false, true]);
    }

    #[test]
    fn unknown_baselines_make_counter_evidence_uncertain() {
        let mut e = ev(
            false,
            CtStat {
                drop: 40,
                invalid: 0,
                ..INVALID
            },
        );
        e.baseline_known = false;
        assert_eq!(classify(&e).attribution, Attribution::Uncertain);
        // Nothing ever moved: nothing to doubt.
        let mut e = ev(false, CtStat::default());
        e.baseline_known = false;
        assert_eq!(classify(&e).attribution, Attribution::Counters);
    }

    #[test]
    fn probes_win_when_the_counters_agree_and_are_counted_when_not() {
        let mut e = ev(false, INVALID);
        e.probe = Some(Reason::Invalid);
        let v = classify(&e);
        assert_eq!(
            (v.reason, v.attribution, v.disagreement),
            (Reason::Invalid, Attribution::Probe, false)
        );
        // A table-full mark with no `drop` increment belongs to another packet (nested softirq).
        let mut e = ev(false, CtStat::default());
        e.probe = Some(Reason::TableFull);
        let v = classify(&e);
        assert_eq!(
            (v.reason, v.attribution, v.disagreement),
            (Reason::NetfilterRule, Attribution::Counters, true)
        );
    }

    #[test]
    fn abi_sizes_are_stable() {
        // The ring buffer record and the globals are an ABI between the two sides.
        assert_eq!(core::mem::size_of::<DropEvent>(), 184);
        assert_eq!(core::mem::size_of::<KernelLayout>(), 112);
        assert_eq!(core::mem::size_of::<Baseline>(), 40);
        assert_eq!(core::mem::size_of::<PendingVerdict>(), 88);
        assert_eq!(core::mem::size_of::<ModuleEvent>(), 248);
        assert_eq!(core::mem::size_of::<ModuleLayout>(), 40);
        assert_eq!(core::mem::size_of::<SysctlEvent>(), 168);
    }
}
