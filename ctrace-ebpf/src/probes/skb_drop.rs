//! Every packet netfilter drops is freed by `nf_hook_slow` with reason
//! SKB_DROP_REASON_NETFILTER_DROP (5.18+, 5.15.100+); older kernels are matched on the free
//! location instead. The `skb:kfree_skb` BTF tracepoint is the sink where the packet is seen.
//!
//! Who dropped it: conntrack bumps this CPU's `net->ct.stat` counters (`drop`, `insert_failed`,
//! `invalid`) right before it returns NF_DROP, and `nf_hook_slow` frees the skb right after, on
//! the same CPU. Comparing this CPU's counters with the values seen at the previous drop in the
//! same netns tells a conntrack drop from a ruleset drop, and which kind.
//!
//! Hooked prototype: `trace_kfree_skb(struct sk_buff *skb, void *location,
//! enum skb_drop_reason reason [, struct sock *rx_sk (6.12+)])`; `reason` is absent before 5.17.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use ctrace_common::{CtStat, DropEvent, Reason, TASK_COMM_LEN, flags};

use crate::{
    filter,
    globals::{self, layout},
    maps, packet, percpu,
    probes::conntrack::{FRESH_NS, PENDING_SKB, TABLE_FULL_MARK},
};

#[inline(always)]
unsafe fn read_u64(addr: u64) -> Option<u64> {
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(addr as *const u64).ok() }
}

#[inline(always)]
unsafe fn read_u32(addr: u64) -> Option<u32> {
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(addr as *const u32).ok() }
}

/// Loads a pointer field from a BTF-typed kernel pointer. A direct load (not a probe read) keeps
/// the verifier's type information, which `bpf_this_cpu_ptr` needs for the per-CPU stats.
#[inline(always)]
unsafe fn field_ptr(base: *const u8, off: u32) -> *const u8 {
    unsafe { *(base.add(off as usize) as *const *const u8) }
}

#[inline(always)]
unsafe fn field_u32(base: *const u8, off: u32) -> u32 {
    unsafe { *(base.add(off as usize) as *const u32) }
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn skb_drop_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    unsafe { try_kfree_skb(&ctx) };
    0
}

#[inline(always)]
unsafe fn is_netfilter_drop(ctx: &BtfTracePointContext) -> bool {
    let nf_drop = layout!(reason_netfilter_drop);
    if nf_drop != u32::MAX {
        let reason: u64 = ctx.arg(2);
        return reason as u32 == nf_drop;
    }
    let location: u64 = ctx.arg(1);
    location >= layout!(nf_hook_slow_start) && location < layout!(nf_hook_slow_end)
}

#[inline(always)]
unsafe fn try_kfree_skb(ctx: &BtfTracePointContext) {
    unsafe {
        if !is_netfilter_drop(ctx) {
            return;
        }
        let skb: *const u8 = ctx.arg(0);
        let dev = field_ptr(skb, layout!(skb_dev));
        let sk = field_ptr(skb, layout!(skb_sk));
        // Received and forwarded packets have an input device; locally sent ones (LOCAL_OUT)
        // have none yet but belong to a socket. Both lead to the packet's netns.
        let net = if !dev.is_null() {
            field_ptr(dev, layout!(dev_nd_net))
        } else if !sk.is_null() {
            field_ptr(sk, layout!(sk_net))
        } else {
            core::ptr::null()
        };
        let netns = if net.is_null() {
            0
        } else {
            field_u32(net, layout!(net_inum))
        };
        if !filter::wants_netns(netns) {
            return;
        }

        let mut ev: DropEvent = core::mem::zeroed();
        ev.ts_ns = bpf_ktime_get_ns();
        ev.location = ctx.arg(1);
        ev.netns = netns;
        ev.cpu = bpf_get_smp_processor_id();
        let nfct: u64 = *(skb.add(layout!(skb_nfct) as usize) as *const u64);
        if nfct & !7 != 0 {
            ev.flags |= flags::HAS_CT;
            ev.ctinfo = (nfct & 7) as u8;
        }
        if dev.is_null() && !sk.is_null() {
            ev.flags |= flags::LOCAL_SENDER;
            ev.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
            ev.comm = bpf_get_current_comm().unwrap_or([0u8; TASK_COMM_LEN]);
        }

        // Counters are read in every mode: they keep the per-CPU baselines current.
        let by_counters = if net.is_null() {
            Reason::NetfilterRule
        } else {
            attribute(net, netns, &mut ev)
        };
        let reason = if globals::kprobe_mode() {
            match kprobe_verdict(skb as u64, &mut ev) {
                Some(r) => {
                    ev.flags |= flags::FROM_KPROBE;
                    r
                }
                None => by_counters,
            }
        } else {
            by_counters
        };
        if !filter::wants_reason(reason) {
            return;
        }
        packet::decode(skb as u64, &mut ev);
        if !filter::wants_flow(&ev) {
            return;
        }
        ev.reason = reason as u8;
        maps::bump(&maps::REASON_TOTALS, reason as u32);
        maps::bump_netns(netns, reason);
        if maps::EVENTS.output::<DropEvent>(&ev, 0).is_err() {
            maps::bump(&maps::LOSSES, maps::LOST_EVENTS);
        }
    }
}

/// The verdict a conntrack kprobe left for this packet (by skb) or for this task (table full),
/// if it is fresh. Consumed either way.
#[inline(always)]
unsafe fn kprobe_verdict(skb: u64, ev: &mut DropEvent) -> Option<Reason> {
    unsafe {
        let id = bpf_get_current_pid_tgid();
        if let Some(p) = PENDING_SKB.get(skb) {
            let (ts, task, reason, detail) = (p.ts_ns, p.task, p.reason, p.detail);
            let _ = PENDING_SKB.remove(skb);
            if task == id && ev.ts_ns.wrapping_sub(ts) < FRESH_NS {
                ev.detail = detail;
                return Reason::from_u8(reason);
            }
        }
        if let Some(ts) = TABLE_FULL_MARK.get(id).copied() {
            let _ = TABLE_FULL_MARK.remove(id);
            if ev.ts_ns.wrapping_sub(ts) < FRESH_NS {
                return Some(Reason::TableFull);
            }
        }
        None
    }
}

/// Reads this CPU's conntrack counters of `net`, compares them with the baseline and decides who
/// dropped the packet. Updates the baseline.
#[inline(always)]
unsafe fn attribute(net: *const u8, netns: u32, ev: &mut DropEvent) -> Reason {
    unsafe {
        // `net->ct.stat` is a per-CPU pointer; this CPU's copy lives at pointer + this CPU's
        // per-CPU offset. (bpf_this_cpu_ptr would need __percpu type tags, which kernels built
        // with gcc do not have in their BTF.)
        let Some(pcpu) = read_u64(net as u64 + layout!(net_ct_stat) as u64) else {
            return Reason::NetfilterRule;
        };
        let Some(cpu_off) = percpu::this_cpu_offset() else {
            return Reason::NetfilterRule;
        };
        if pcpu == 0 {
            return Reason::NetfilterRule;
        }
        let stat = pcpu.wrapping_add(cpu_off);
        let now = CtStat {
            drop: read_u32(stat + layout!(stat_drop) as u64).unwrap_or(0),
            invalid: read_u32(stat + layout!(stat_invalid) as u64).unwrap_or(0),
            insert_failed: read_u32(stat + layout!(stat_insert_failed) as u64).unwrap_or(0),
            early_drop: read_u32(stat + layout!(stat_early_drop) as u64).unwrap_or(0),
        };
        let before = match maps::BASELINE.get_ptr_mut(netns) {
            Some(p) => {
                let before = *p;
                *p = now;
                before
            }
            None => {
                ev.flags |= flags::NEW_BASELINE;
                if maps::BASELINE.insert(netns, now, 0).is_err() {
                    maps::bump(&maps::LOSSES, maps::LOST_BASELINE);
                }
                CtStat::default()
            }
        };
        ev.delta = CtStat {
            drop: now.drop.wrapping_sub(before.drop),
            invalid: now.invalid.wrapping_sub(before.invalid),
            insert_failed: now.insert_failed.wrapping_sub(before.insert_failed),
            early_drop: now.early_drop.wrapping_sub(before.early_drop),
        };
        classify(&ev.delta, ev.flags & flags::HAS_CT != 0)
    }
}

/// The decision table. `drop` moves for table-full (allocation failure), for an unresolved
/// clash (with `insert_failed`) and for NF_DROP from a protocol tracker (with `invalid`);
/// a failed insert of a dying entry or a too-long chain moves only `insert_failed`. A packet
/// that conntrack marked invalid (no entry attached) and a rule then dropped moves only
/// `invalid`. Nothing moved: the ruleset dropped it.
#[inline(always)]
fn classify(d: &CtStat, has_ct: bool) -> Reason {
    if d.insert_failed != 0 {
        Reason::InsertFailed
    } else if d.drop != 0 {
        if d.invalid != 0 {
            Reason::Invalid
        } else {
            Reason::TableFull
        }
    } else if d.invalid != 0 && !has_ct {
        Reason::Invalid
    } else {
        Reason::NetfilterRule
    }
}
