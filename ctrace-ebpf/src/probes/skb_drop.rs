//! Every packet netfilter drops is freed by `nf_hook_slow` with reason
//! SKB_DROP_REASON_NETFILTER_DROP (5.18+, 5.15.100+); older kernels are matched on the free
//! location instead. The `skb:kfree_skb` BTF tracepoint is the sink where the packet is seen.
//!
//! Who dropped it (`ctrace_common::classify`): `skb->_nfct` says whether conntrack exempted the packet
//! (NOTRACK) or accepted it (an entry attached). Conntrack bumps this CPU's `net->ct.stat` counters right
//! before it returns NF_DROP and `nf_hook_slow` frees the skb right after, on the same CPU: comparing them
//! with the values seen at the previous drop in the same netns tells which conntrack drop it was. `invalid`
//! also counts packets that are then accepted, so alone it leaves a drop uncertain; kprobe verdicts left for
//! this very skb settle it where kprobes exist.
//!
//! Hooked prototype: `trace_kfree_skb(struct sk_buff *skb, void *location,
//! enum skb_drop_reason reason [, struct sock *rx_sk (6.12+)])`; `reason` is absent before 5.17.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use ctrace_common::{
    Attribution, Baseline, CtStat, DETAIL_LEN, Evidence, Reason, Verdict, baseline_state, classify, flags, losses,
};

use crate::{
    filter,
    globals::{self, layout, opaque_u64},
    maps, packet, percpu,
    probes::conntrack::{FRESH_NS, PENDING_SKB, TABLE_FULL_MARK},
    stream,
};

#[inline(always)]
unsafe fn read_u64(addr: u64) -> Option<u64> {
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(addr as *const u64).ok() }
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

#[inline(always)]
unsafe fn field_u64(base: *const u8, off: u32) -> u64 {
    unsafe { *(base.add(off as usize) as *const u64) }
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

        let Some(rec) = maps::RECORD.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: this CPU's slot; programs do not migrate while they run.
        let rec = &mut *rec;
        stream::clear(&mut rec.event);
        // The kernel's words about the drop (kprobe mode); tracepoint mode never has any.
        rec.detail[0] = 0;
        let ev = &mut rec.event;
        ev.netns = netns;
        let nfct: u64 = *(skb.add(layout!(skb_nfct) as usize) as *const u64);
        let mut evidence = Evidence {
            has_ct: nfct & !7 != 0,
            untracked: nfct == IP_CT_UNTRACKED,
            insert_failed_noisy: globals::insert_failed_noisy(),
            ..Evidence::default()
        };
        if evidence.has_ct {
            ev.flags |= flags::HAS_CT;
        } else if !evidence.untracked {
            evidence.passed_conntrack = conntrack_hook_evidence(skb as u64, net as u64, netns);
        }
        if dev.is_null() && !sk.is_null() {
            ev.flags |= flags::LOCAL_SENDER;
        }

        // Counters are read in every mode: they keep the per-CPU baselines current, and they check the probes.
        if !net.is_null() {
            ev.flags |= counter_delta(net, netns, &mut evidence);
        }
        if globals::kprobe_mode() {
            evidence.probe = kprobe_verdict(
                skb as u64,
                evidence.has_ct,
                bpf_ktime_get_ns(),
                bpf_get_smp_processor_id(),
                &mut rec.detail,
            );
        }
        let ev = &mut rec.event;
        let verdict = opaque_verdict(classify(&evidence));
        if verdict.attribution == Attribution::Probe {
            ev.flags |= flags::FROM_KPROBE;
        } else {
            // A verdict the counters overruled leaves no kernel text behind.
            rec.detail[0] = 0;
        }
        let ev = &mut rec.event;
        if verdict.disagreement {
            ev.flags |= flags::DISAGREEMENT;
            maps::bump_loss(losses::DISAGREEMENTS);
        }
        if !filter::wants_any_reason(verdict.possible as u32) {
            return;
        }
        packet::decode(skb, ev);
        if !filter::wants_flow(ev) {
            return;
        }
        ev.reason = verdict.reason as u8;
        ev.attribution = verdict.attribution as u8;
        ev.possible = verdict.possible;
        maps::bump_totals(netns, verdict.reason, verdict.attribution == Attribution::Uncertain);
        match stream::route() {
            Some(rb_flags) => {
                // Only a record needs the time, the CPU and the sender.
                ev.ts_ns = bpf_ktime_get_ns();
                ev.cpu = bpf_get_smp_processor_id() as u16;
                if ev.flags & flags::LOCAL_SENDER != 0 {
                    ev.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
                    stream::current_comm(&mut ev.comm);
                }
                stream::submit(rec, rb_flags);
            }
            None => stream::aggregate(&rec.event),
        }
    }
}

/// The verdict, with its values hidden from the verifier's value tracking. Without this, each of
/// `classify`'s outcomes reaches the packet decoder with its own constants, the verifier walks every
/// combination separately and gives up (a million instructions).
#[inline(always)]
fn opaque_verdict(v: Verdict) -> Verdict {
    let packed: u64 =
        v.reason as u64 | (v.attribution as u64) << 8 | (v.possible as u64) << 16 | (v.disagreement as u64) << 24;
    let p = opaque_u64(packed);
    Verdict {
        reason: Reason::from_u8(p as u8).unwrap_or(Reason::NetfilterRule),
        attribution: Attribution::from_u8((p >> 8) as u8).unwrap_or(Attribution::Uncertain),
        possible: (p >> 16) as u8,
        disagreement: (p >> 24) & 1 != 0,
    }
}

/// Where the conntrack hook is armed and conntrack runs for the packet's family: whether this packet left
/// conntrack's hook without an entry in its current pass (its mark is consumed). A stale mark is another
/// packet's at the same address, left by a pass this packet did not make (it never entered the IPv4/IPv6
/// hooks): no evidence either way.
#[inline(always)]
unsafe fn conntrack_hook_evidence(skb: u64, net: u64, netns: u32) -> Option<bool> {
    unsafe {
        if maps::HOOKED_COUNT.get(0).copied().unwrap_or(0) == 0 {
            return None;
        }
        let since = *maps::HOOKED.get(netns)?;
        let now = bpf_ktime_get_ns();
        if now < since {
            return None;
        }
        let family = match packet::network_header(skb)?.1 >> 4 {
            4 => 0,
            6 => 1,
            _ => return None,
        };
        if !conntrack_runs(net, family) {
            return None;
        }
        let Some(&marked) = maps::CT_PASSED.get(skb) else {
            return Some(false);
        };
        let _ = maps::CT_PASSED.remove(skb);
        (now.wrapping_sub(marked) < FRESH_NS).then_some(true)
    }
}

/// Whether conntrack's LOCAL_OUT hook function is registered for `family` (0 IPv4, 1 IPv6) in `net`.
/// Conntrack registers its hooks per netns and family only while some rule needs it; without them every
/// packet of the family is ct-less, and a mark would mean nothing. (PRE_ROUTING comes with LOCAL_OUT.)
#[inline(always)]
unsafe fn conntrack_runs(net: u64, family: u32) -> bool {
    const NF_INET_LOCAL_OUT: u64 = 3;
    unsafe {
        let Some(&function) = maps::CT_HOOK_FNS.get(family) else {
            return false;
        };
        let hooks = if family == 0 {
            layout!(net_hooks_ipv4)
        } else {
            layout!(net_hooks_ipv6)
        };
        if function == 0 || hooks == 0 {
            return false;
        }
        let entries = read_u64(net + hooks as u64 + 8 * NF_INET_LOCAL_OUT).unwrap_or(0);
        let Some(scratch) = maps::HOOK_SCRATCH.get_ptr_mut(0) else {
            return false;
        };
        let buf = &mut *(scratch as *mut [u8; 8 * (1 + 2 * maps::HOOK_ENTRIES)]);
        if entries == 0 || aya_ebpf::helpers::bpf_probe_read_kernel_buf(entries as *const u8, buf).is_err() {
            return false;
        }
        let scratch = &*scratch;
        // u16 num_hook_entries first; `hooks` (usually at 8) holds {hook, priv} pairs.
        let count = (scratch[0] & 0xffff) as usize;
        let first = layout!(entries_hooks) as usize / 8;
        let mut i = 0;
        while i < maps::HOOK_ENTRIES {
            if i < count && scratch.get(first + 2 * i).copied() == Some(function) {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Words of struct ip_conntrack_stat read at once.
const STAT_WORDS: usize = 12;

/// `enum ip_conntrack_info` IP_CT_UNTRACKED: `_nfct` of a packet NOTRACK exempted from conntrack.
const IP_CT_UNTRACKED: u64 = 7;

/// The verdict a conntrack kprobe left for this very packet, if fresh, left on this CPU and (for
/// per-skb verdicts) for a packet with the same headers, with its text in `detail`. Consumed either way.
#[inline(always)]
unsafe fn kprobe_verdict(skb: u64, has_ct: bool, now: u64, cpu: u32, detail: &mut [u8; DETAIL_LEN]) -> Option<Reason> {
    unsafe {
        if let Some(p) = PENDING_SKB.get(skb) {
            let p = *p;
            let _ = PENDING_SKB.remove(skb);
            if p.cpu == cpu
                && now.wrapping_sub(p.ts_ns) < FRESH_NS
                && (p.fingerprint == 0 || p.fingerprint == packet::fingerprint(skb))
            {
                *detail = p.detail;
                return Reason::from_u8(p.reason);
            }
        }
        // "early_drop found nothing to evict" on this CPU, in this context: the packet being freed
        // now is the one whose entry could not be allocated (the counters cross-check it).
        if !has_ct && let Some(m) = TABLE_FULL_MARK.get_ptr_mut(0) {
            let mark = *m;
            if mark.ts_ns != 0 {
                (*m).ts_ns = 0;
                if mark.task == bpf_get_current_pid_tgid() && now.wrapping_sub(mark.ts_ns) < FRESH_NS {
                    return Some(Reason::TableFull);
                }
            }
        }
        None
    }
}

/// Reads this CPU's conntrack counters of `net` and their increase since the previous drop in this
/// netns on this CPU, and makes them the new baseline. Returns the record's baseline flags.
#[inline(always)]
unsafe fn counter_delta(net: *const u8, netns: u32, evidence: &mut Evidence) -> u16 {
    unsafe {
        // `net->ct.stat` is a per-CPU pointer; this CPU's copy lives at pointer + this CPU's
        // per-CPU offset. (bpf_this_cpu_ptr would need __percpu type tags, which kernels built
        // with gcc do not have in their BTF.)
        let Some(pcpu) = read_u64(net as u64 + layout!(net_ct_stat) as u64) else {
            return 0;
        };
        let Some(cpu_off) = percpu::this_cpu_offset() else {
            return 0;
        };
        if pcpu == 0 {
            return 0;
        }
        let stat = pcpu.wrapping_add(cpu_off);
        // One read of the first 12 counters of struct ip_conntrack_stat (those used are within them since
        // 4.18), into a per-CPU scratch slot: a read per counter would give the verifier a path per
        // combination of failed reads, and 48 bytes on the stack would not fit beside the event.
        let Some(all) = maps::STAT_SCRATCH.get_ptr_mut(0) else {
            return 0;
        };
        if aya_ebpf::helpers::bpf_probe_read_kernel_buf(stat as *const u8, &mut *(all as *mut [u8; 4 * STAT_WORDS]))
            .is_err()
        {
            return 0;
        }
        let all = &*all;
        let word = |off: u32| all[(off as usize / 4) % STAT_WORDS];
        let now = CtStat {
            drop: word(layout!(stat_drop)),
            invalid: word(layout!(stat_invalid)),
            insert_failed: word(layout!(stat_insert_failed)),
            early_drop: word(layout!(stat_early_drop)),
            error: word(layout!(stat_error)),
            _pad: 0,
        };
        // Which netns this is, beyond its (reusable) inode number.
        let cookie = match layout!(net_cookie) {
            0 => 0,
            off => field_u64(net, off),
        };
        // With the address of the netns's own conntrack counters (allocated with it, already read as a number):
        // neither is unique alone (6.18 reuses namespace ids, and memory is reused), together they practically
        // are.
        let generation = pcpu ^ cookie.rotate_left(32);

        let slot = maps::BASELINE.get_ptr_mut(netns);
        let found = match slot {
            Some(p) => {
                let b = ((*p).state, (*p).generation, (*p).stat);
                (*p).stat = now;
                (*p).generation = generation;
                (*p).state = baseline_state::LIVE;
                Some(b)
            }
            None => {
                let fresh = Baseline {
                    stat: now,
                    generation,
                    state: baseline_state::LIVE,
                    _pad: 0,
                };
                let _ = maps::BASELINE.insert(netns, fresh, 0);
                None
            }
        };
        let (mut before, mut known, mut reset) = match found {
            Some((state, gen_seen, stat)) => {
                // Its own live slot, or the loader's seed from before the first drop.
                if (state == baseline_state::LIVE && gen_seen == generation) || state == baseline_state::SEEDED {
                    (stat, true, false)
                } else if state == baseline_state::LIVE || state == baseline_state::SEEDED {
                    // Another netns had this inode number: this one is newer, its counters started at 0.
                    (CtStat::default(), true, true)
                } else {
                    (CtStat::default(), false, false)
                }
            }
            None => (CtStat::default(), false, false),
        };
        if now.drop < before.drop
            || now.invalid < before.invalid
            || now.insert_failed < before.insert_failed
            || now.early_drop < before.early_drop
            || now.error < before.error
        {
            // Counters went backwards: nf_conntrack was reloaded since, they restarted from 0.
            before = CtStat::default();
            known = true;
            reset = true;
        }
        // Hidden from the verifier: the ways through the choice above merge into one state here.
        let hide = |v: u32| opaque_u64(v as u64) as u32;
        let before = CtStat {
            drop: hide(before.drop),
            invalid: hide(before.invalid),
            insert_failed: hide(before.insert_failed),
            early_drop: hide(before.early_drop),
            error: hide(before.error),
            _pad: 0,
        };
        let (known, reset) = (hide(known as u32) != 0, hide(reset as u32) != 0);
        let mut record_flags = 0;
        if reset {
            record_flags |= flags::BASELINE_RESET;
            maps::bump_loss(losses::BASELINE_RESETS);
        }
        if !known {
            record_flags |= flags::NEW_BASELINE;
            maps::bump_loss(losses::NO_BASELINE);
        }
        evidence.delta = CtStat {
            drop: now.drop.wrapping_sub(before.drop),
            invalid: now.invalid.wrapping_sub(before.invalid),
            insert_failed: now.insert_failed.wrapping_sub(before.insert_failed),
            early_drop: now.early_drop.wrapping_sub(before.early_drop),
            error: now.error.wrapping_sub(before.error),
            _pad: 0,
        };
        evidence.baseline_known = known;
        record_flags
    }
}
