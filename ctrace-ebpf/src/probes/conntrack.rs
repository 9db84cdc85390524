//! kprobe mode: failure-only probes on nf_conntrack that name the exact reason of a drop before
//! the packet reaches the kfree_skb sink. None of them runs for traffic that is not dropped or
//! judged invalid. kprobes do not pin the nf_conntrack module (fentry would).
//!
//! Hooked prototypes (6.1; userspace picks argument indexes per kernel):
//! - `static noinline int early_drop(struct net *net, unsigned int hash)`: returns 0 when nothing
//!   could be evicted, and the caller then drops the packet: table full.
//! - `static __cold noinline int nf_ct_resolve_clash(struct sk_buff *skb, struct nf_conntrack_tuple_hash *h,
//!   u32 repl_idx)` (5.10+): NF_DROP = unresolved clash, insert_failed.
//! - `bool nf_ct_delete(struct nf_conn *ct, u32 portid, int report)`: runs for every deleted
//!   entry, so the loader attaches it only while a table is nearly full; inside early_drop it
//!   names the evicted entry, reported at its return when it returned true (two CPUs that evict the same
//!   entry at once both call it; only the one that marked it dying evicted it, and the kernel counts only that).
//! - `void nf_l4proto_log_invalid(const struct sk_buff *skb, const struct nf_hook_state *state,
//!   u8 protonum, const char *fmt, ...)` and `void nf_ct_l4proto_log_invalid(const struct sk_buff *skb,
//!   const struct nf_conn *ct, const struct nf_hook_state *state, const char *fmt, ...)`: the kernel's
//!   reason text for an invalid packet (called whether or not `nf_conntrack_log_invalid` is set).

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::{kprobe, kretprobe, map},
    maps::{LruHashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
};
use ctrace_common::{CpuMark, DETAIL_LEN, PendingVerdict, Reason, flags};

use crate::{
    filter,
    globals::{ct_l4proto_log_invalid_fmt, l4proto_log_invalid_fmt, layout},
    maps::RECORD,
    packet, stream,
};

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: no preconditions; the helper only reads the clock.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn this_cpu() -> u32 {
    // SAFETY: no preconditions.
    unsafe { bpf_get_smp_processor_id() }
}

/// Verdicts for a packet, keyed by skb address; consumed by the kfree_skb program, which checks
/// the CPU, the age and the packet's fingerprint (skb addresses are reused at once).
#[map]
pub static PENDING_SKB: LruHashMap<u64, PendingVerdict> = LruHashMap::with_max_entries(4096, 0);

/// "early_drop found nothing to evict" on this CPU (index 0), with the task context it happened in.
/// Softirq work on idle CPUs all runs with pid_tgid 0, so marks are per CPU, not per task.
#[map]
pub static TABLE_FULL_MARK: PerCpuArray<CpuMark> = PerCpuArray::with_max_entries(1, 0);

/// An early_drop call in progress on this CPU: an nf_ct_delete inside it is an eviction.
#[map]
static IN_EARLY_DROP: PerCpuArray<CpuMark> = PerCpuArray::with_max_entries(1, 0);

/// The entry of an nf_ct_delete call inside early_drop in progress on this CPU (in `skb`), until it returns.
#[map]
static EVICTING: PerCpuArray<CpuMark> = PerCpuArray::with_max_entries(1, 0);

/// The skb of an nf_ct_resolve_clash call in progress on this CPU (kretprobes see no arguments).
#[map]
static CLASH_SKB: PerCpuArray<CpuMark> = PerCpuArray::with_max_entries(1, 0);

/// A verdict older than this is not about the packet being freed. The verdict and the free are
/// microseconds apart on hardware; an emulated CPU stretches that by two orders of magnitude.
pub const FRESH_NS: u64 = 10_000_000;

const NF_DROP: i32 = 0;

#[inline(always)]
fn set_mark(map: &PerCpuArray<CpuMark>, skb: u64) {
    if let Some(m) = map.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe {
            *m = CpuMark {
                ts_ns: now_ns(),
                task: bpf_get_current_pid_tgid(),
                skb,
            }
        };
    }
}

/// Takes this CPU's mark if it was left in the current task context within FRESH_NS.
#[inline(always)]
fn take_mark(map: &PerCpuArray<CpuMark>) -> Option<CpuMark> {
    let m = map.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot.
    unsafe {
        let mark = *m;
        (*m).ts_ns = 0;
        (mark.ts_ns != 0 && mark.task == bpf_get_current_pid_tgid() && now_ns().wrapping_sub(mark.ts_ns) < FRESH_NS)
            .then_some(mark)
    }
}

#[kprobe]
pub fn conntrack_early_drop(_ctx: ProbeContext) -> u32 {
    set_mark(&IN_EARLY_DROP, 0);
    0
}

#[kretprobe]
pub fn conntrack_early_drop_ret(ctx: RetProbeContext) -> u32 {
    let _ = take_mark(&IN_EARLY_DROP);
    let evicted: i32 = ctx.ret();
    if evicted == 0 {
        set_mark(&TABLE_FULL_MARK, 0);
    }
    0
}

#[kprobe]
pub fn conntrack_resolve_clash(ctx: ProbeContext) -> u32 {
    if let Some(skb) = ctx.arg::<u64>(0) {
        set_mark(&CLASH_SKB, skb);
    }
    0
}

#[kretprobe]
pub fn conntrack_resolve_clash_ret(ctx: RetProbeContext) -> u32 {
    let Some(mark) = take_mark(&CLASH_SKB) else {
        return 0;
    };
    let verdict: i32 = ctx.ret();
    if verdict == NF_DROP {
        let mut v = PendingVerdict {
            ts_ns: now_ns(),
            // The drop follows at once in nf_hook_slow, before the skb can be reused.
            fingerprint: 0,
            cpu: this_cpu(),
            reason: Reason::InsertFailed as u8,
            _pad: [0; 3],
            detail: [0; DETAIL_LEN],
        };
        let text = b"unresolved clash";
        v.detail[..text.len()].copy_from_slice(text);
        let _ = PENDING_SKB.insert(mark.skb, v, 0);
    }
    0
}

#[kprobe]
pub fn conntrack_l4proto_log_invalid(ctx: ProbeContext) -> u32 {
    record_invalid(&ctx, l4proto_log_invalid_fmt());
    0
}

#[kprobe]
pub fn conntrack_ct_l4proto_log_invalid(ctx: ProbeContext) -> u32 {
    record_invalid(&ctx, ct_l4proto_log_invalid_fmt());
    0
}

/// (fmt, first variadic argument) for `fmt` at argument `fmt_idx`. Every candidate register is
/// read with a constant offset first: the verifier rejects context loads at computed offsets.
#[inline(always)]
fn fmt_and_first_vararg(ctx: &ProbeContext, fmt_idx: u32) -> (u64, u64) {
    let a2: u64 = core::hint::black_box(ctx.arg(2).unwrap_or(0));
    let a3: u64 = core::hint::black_box(ctx.arg(3).unwrap_or(0));
    let a4: u64 = core::hint::black_box(ctx.arg(4).unwrap_or(0));
    let a5: u64 = core::hint::black_box(ctx.arg(5).unwrap_or(0));
    match fmt_idx {
        2 => (a2, a3),
        3 => (a3, a4),
        4 => (a4, a5),
        _ => (0, 0),
    }
}

#[inline(always)]
fn record_invalid(ctx: &ProbeContext, fmt_idx: u32) {
    let Some(skb) = ctx.arg::<u64>(0) else { return };
    let mut v = PendingVerdict {
        ts_ns: now_ns(),
        // Most invalid packets are accepted and freed later: the next packet in this skb must not inherit it.
        fingerprint: packet::fingerprint(skb),
        cpu: this_cpu(),
        reason: Reason::Invalid as u8,
        _pad: [0; 3],
        detail: [0; DETAIL_LEN],
    };
    let (fmt, first_vararg) = fmt_and_first_vararg(ctx, fmt_idx);
    // SAFETY: the helper bounds the read and faults are handled by the kernel.
    unsafe {
        if bpf_probe_read_kernel_str_bytes(fmt as *const u8, &mut v.detail).is_ok()
            && v.detail[0] == b'%'
            && v.detail[1] == b's'
            && v.detail[2] == 0
        {
            // The usual shape is ("%s", msg): the text is the first variadic argument.
            v.detail = [0; DETAIL_LEN];
            let _ = bpf_probe_read_kernel_str_bytes(first_vararg as *const u8, &mut v.detail);
        }
    }
    let _ = PENDING_SKB.insert(skb, v, 0);
}

/// Whether this task is inside early_drop on this CPU (its mark is set and not yet taken at its return).
#[inline(always)]
fn in_early_drop() -> bool {
    let Some(m) = IN_EARLY_DROP.get_ptr(0) else {
        return false;
    };
    // SAFETY: this CPU's slot, read only.
    let mark = unsafe { *m };
    mark.ts_ns != 0 && mark.task == bpf_get_current_pid_tgid()
}

#[kprobe]
pub fn conntrack_ct_delete(ctx: ProbeContext) -> u32 {
    if !in_early_drop() {
        return 0;
    }
    if let Some(ct) = ctx.arg::<u64>(0)
        && !expired(ct)
    {
        set_mark(&EVICTING, ct);
    }
    0
}

/// Whether the entry had expired (`nf_ct_is_expired`): early_drop deletes expired entries it passes over as
/// garbage, and those are no evictions. Unknown offset: not expired.
#[inline(always)]
fn expired(ct: u64) -> bool {
    let off = layout!(ct_timeout);
    if off == 0 {
        return false;
    }
    // SAFETY: bpf_probe_read_kernel checks the read; bpf_jiffies64 has no preconditions.
    unsafe {
        let Ok(timeout) = bpf_probe_read_kernel((ct + off as u64) as *const u32) else {
            return false;
        };
        // nfct_time_stamp is jiffies truncated to 32 bits.
        (timeout.wrapping_sub(bpf_jiffies64() as u32) as i32) <= 0
    }
}

#[kretprobe]
pub fn conntrack_ct_delete_ret(ctx: RetProbeContext) -> u32 {
    // Still inside the same early_drop: a mark left by a return that was missed is not taken for another call.
    let Some(mark) = take_mark(&EVICTING).filter(|_| in_early_drop()) else {
        return 0;
    };
    // bool in the return register's low byte: false when another CPU had marked the entry dying first.
    let deleted: u64 = ctx.ret();
    if deleted & 0xff != 0 {
        // SAFETY: reads go through bpf_probe_read_kernel.
        unsafe { report_eviction(mark.skb) };
    }
    0
}

/// Sends the evicted entry's original-direction tuple as an early_drop event, within the stream limit (the
/// evictions beyond it are reported from the kernel's early_drop counter, as in tracepoint mode).
#[inline(always)]
unsafe fn report_eviction(ct: u64) {
    let tuple_off = layout!(ct_tuple);
    if tuple_off == 0 {
        return;
    }
    unsafe {
        let Some(rec) = RECORD.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: this CPU's slot; kprobes do not nest with the kfree_skb program on one CPU (the kernel skips a
        // program that would recurse) and each fills the slot from scratch.
        let rec = &mut *rec;
        stream::clear(&mut rec.event);
        rec.detail[0] = 0;
        let ev = &mut rec.event;
        ev.ts_ns = now_ns();
        ev.flags = flags::EVICTED | flags::FROM_KPROBE;
        ev.cpu = bpf_get_smp_processor_id() as u16;
        ev.reason = Reason::EarlyDrop as u8;
        ev.attribution = ctrace_common::Attribution::Probe as u8;
        ev.possible = 1 << Reason::EarlyDrop as u8;
        let net: u64 = bpf_probe_read_kernel((ct + layout!(ct_net) as u64) as *const u64).unwrap_or(0);
        if net != 0 {
            ev.netns = bpf_probe_read_kernel((net + layout!(net_inum) as u64) as *const u32).unwrap_or(0);
        }
        if !filter::wants_netns(ev.netns) || !filter::wants_reason(Reason::EarlyDrop) {
            return;
        }
        // struct nf_conntrack_tuple: src.u3@0 src.u.all@16 src.l3num@18 dst.u3@20 dst.u.all@36
        // dst.protonum@38 (stable since 4.18).
        let Ok(t) = bpf_probe_read_kernel((ct + tuple_off as u64) as *const [u8; 40]) else {
            return;
        };
        let l3num = u16::from_ne_bytes([t[18], t[19]]);
        ev.ip_version = match l3num {
            2 => 4,
            10 => 6,
            _ => return,
        };
        ev.saddr.copy_from_slice(&t[0..16]);
        ev.daddr.copy_from_slice(&t[20..36]);
        ev.l4proto = t[38];
        // Ports; for ICMP the id (src.u) and type << 8 | code (dst.u), as in packet events.
        ev.sport = u16::from_be_bytes([t[16], t[17]]);
        ev.dport = u16::from_be_bytes([t[36], t[37]]);
        ev.flags |= flags::HEADERS_OK;
        if !filter::wants_flow(ev) {
            return;
        }
        if let Some(rb_flags) = stream::route() {
            stream::submit(rec, rb_flags);
        }
    }
}
