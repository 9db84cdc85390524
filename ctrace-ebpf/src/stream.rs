//! What happens to a drop once it is counted: streamed as a record, or, above the stream limit, counted in the
//! kernel's aggregates that userspace reads once a second. A flood then costs a few map updates per packet
//! instead of a record, a wakeup and userspace work each.
//!
//! Records are submitted without waking the consumer, except when this CPU has not woken it for `WAKEUP_GAP_NS`
//! (a lone drop is delivered at once) or the ring buffer is a quarter full; userspace also drains it on a short
//! timer. A wakeup is an irq_work (a self-IPI, a VM exit in a guest): per record it cost more than the rest of
//! the program.

use core::ptr::write_volatile;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    maps::PerCpuHashMap,
};
use ctrace_common::{AggKey, Attribution, DropDetail, DropEvent, StreamState, TASK_COMM_LEN, flags, losses};

use crate::{
    globals,
    maps::{
        self, AGG_0, AGG_1, AGG_COARSE_0, AGG_COARSE_1, AGG_EPOCH, AGG_RUN_0, AGG_RUN_1, EVENTS, EVENTS_BYTES, STREAM,
    },
};

/// Shortest time between two wakeups this CPU asks for.
const WAKEUP_GAP_NS: u64 = 10_000_000;
const WINDOW_NS: u64 = 1_000_000_000;

/// Whether this drop may be streamed (`Some(ring buffer flags)`) or is to be aggregated (`None`): each CPU streams
/// at most `STREAM_LIMIT` records per second.
#[inline(always)]
pub fn route() -> Option<u64> {
    let Some(st) = STREAM.get_ptr_mut(0) else {
        return Some(0);
    };
    // SAFETY: this CPU's slot; programs do not migrate while they run.
    let st = unsafe { &mut *st };
    let now = coarse_now(st);
    let limit = globals::stream_limit() as u64;
    if limit != 0 {
        if now.wrapping_sub(st.window_start_ns) >= WINDOW_NS {
            st.window_start_ns = now;
            st.streamed = 0;
        }
        if st.streamed >= limit {
            return None;
        }
        st.streamed += 1;
    }
    Some(if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > (EVENTS_BYTES / 4) as u64 {
        st.last_wakeup_ns = now;
        BPF_RB_FORCE_WAKEUP as u64
    } else if now.wrapping_sub(st.last_wakeup_ns) >= WAKEUP_GAP_NS {
        // The kernel's own rule then: wake only a consumer that has read everything before this record.
        st.last_wakeup_ns = now;
        0
    } else {
        BPF_RB_NO_WAKEUP as u64
    })
}

/// CLOCK_MONOTONIC as of this jiffy (1-10 ms old). A clock read costs a third of the program's time per drop
/// (read_tsc in a VM); jiffies are a memory load. (bpf_ktime_get_coarse_ns is refused to tracing programs.)
#[inline(always)]
fn coarse_now(st: &mut StreamState) -> u64 {
    // SAFETY: the helpers have no preconditions.
    unsafe {
        let jiffy = aya_ebpf::helpers::generated::bpf_jiffies64();
        if jiffy != st.jiffy {
            st.jiffy = jiffy;
            st.jiffy_ns = aya_ebpf::helpers::bpf_ktime_get_ns();
        }
    }
    st.jiffy_ns
}

/// Zeroes a record with ten 8-byte stores. (A zero-initialised byte array becomes a call to a BPF memset that
/// writes a byte at a time: it cost as much as the rest of the program.)
#[inline(always)]
pub fn clear(ev: &mut DropEvent) {
    const WORDS: usize = size_of::<DropEvent>() / 8;
    let words = ev as *mut DropEvent as *mut u64;
    let mut i = 0;
    while i < WORDS {
        // SAFETY: DropEvent is 80 bytes, 8-aligned, plain data.
        unsafe { write_volatile(words.add(i), 0) };
        i += 1;
    }
}

/// The current task's comm, written in place (the helper zero-fills it when it fails).
#[inline(always)]
pub fn current_comm(comm: &mut [u8; TASK_COMM_LEN]) {
    // SAFETY: the helper writes at most TASK_COMM_LEN bytes into `comm`.
    unsafe { aya_ebpf::helpers::generated::bpf_get_current_comm(comm.as_mut_ptr().cast(), TASK_COMM_LEN as u32) };
}

/// Sends the record, with the kernel's words when it has any (kprobe mode); a full ring buffer is counted. The
/// helper copies it from the per-CPU slot: no copy in the program.
#[inline(always)]
pub fn submit(rec: &DropDetail, rb_flags: u64) {
    let sent = if rec.detail[0] != 0 {
        EVENTS.output::<DropDetail>(rec, rb_flags)
    } else {
        EVENTS.output::<DropEvent>(&rec.event, rb_flags)
    };
    if sent.is_err() {
        maps::bump_loss(losses::EVENTS);
    }
}

/// Zeroes a 16-byte address with four 4-byte stores (see `clear`).
#[inline(always)]
fn clear_addr(addr: &mut [u8; 16]) {
    let words = addr.as_mut_ptr() as *mut u32;
    let mut i = 0;
    while i < 4 {
        // SAFETY: 16 bytes at offset 12 of a 4-aligned AggKey.
        unsafe { write_volatile(words.add(i), 0) };
        i += 1;
    }
}

/// Counts the drop in this epoch's aggregate of its destination: in this CPU's run while the key repeats (an array
/// slot), else in the hash maps (see `add`).
#[inline(always)]
pub fn aggregate(ev: &DropEvent) {
    let epoch = AGG_EPOCH.get(0).copied().unwrap_or(0);
    let odd = epoch & 1 != 0;
    let headers = ev.flags & flags::HEADERS_OK != 0;
    let mut key = AggKey {
        netns: ev.netns,
        reason: ev.reason,
        attribution: ev.attribution,
        uncertain: if ev.attribution == Attribution::Uncertain as u8 {
            ev.possible
        } else {
            0
        },
        ip_version: if headers { ev.ip_version } else { 0 },
        l4proto: if headers { ev.l4proto } else { 0 },
        _pad: 0,
        dport: if headers { ev.dport } else { 0 },
        daddr: ev.daddr,
    };
    if !headers {
        clear_addr(&mut key.daddr);
    }
    let tag = epoch.wrapping_add(1);
    let run = if odd {
        AGG_RUN_1.get_ptr_mut(0)
    } else {
        AGG_RUN_0.get_ptr_mut(0)
    };
    let Some(run) = run else {
        add(epoch, key, 1);
        return;
    };
    // SAFETY: this CPU's slot; programs do not migrate while they run.
    let run = unsafe { &mut *run };
    if run.epoch_tag == tag {
        if same_key(&run.key, &key) {
            run.count += 1;
            return;
        }
        add(epoch, run.key, run.count);
    }
    // A run of an older epoch was collected by userspace already: it is only overwritten.
    run.key = key;
    run.count = 1;
    run.epoch_tag = tag;
}

/// Whether two keys are equal, compared as seven 4-byte words.
#[inline(always)]
fn same_key(a: &AggKey, b: &AggKey) -> bool {
    const WORDS: usize = size_of::<AggKey>() / 4;
    let (a, b) = (a as *const AggKey as *const u32, b as *const AggKey as *const u32);
    let mut i = 0;
    while i < WORDS {
        // SAFETY: AggKey is 28 bytes, 4-aligned, plain data.
        if unsafe { *a.add(i) != *b.add(i) } {
            return false;
        }
        i += 1;
    }
    true
}

/// Adds `n` drops with `key` to `epoch`'s aggregate of their destination; where those are full, to the one of
/// their (netns, reason, protocol); where that is full too, to the losses.
#[inline(always)]
fn add(epoch: u32, mut key: AggKey, n: u64) {
    let (fine, coarse) = if epoch & 1 == 0 {
        (&AGG_0, &AGG_COARSE_0)
    } else {
        (&AGG_1, &AGG_COARSE_1)
    };
    let full_mark = epoch as u64 + 1;
    let st = STREAM.get_ptr_mut(0);
    // SAFETY: this CPU's slot.
    let fine_full = st.is_some_and(|st| unsafe { (*st).fine_full_epoch } == full_mark);
    if !fine_full {
        if count(fine, &key, n) {
            return;
        }
        if let Some(st) = st {
            // SAFETY: as above.
            unsafe { (*st).fine_full_epoch = full_mark };
        }
    }
    key.ip_version = 0;
    key.dport = 0;
    clear_addr(&mut key.daddr);
    if !count(coarse, &key, n) {
        maps::add_loss(losses::AGGREGATES, n);
    }
}

/// +n on this CPU's value of `key`; false when the map is full.
#[inline(always)]
fn count(map: &PerCpuHashMap<AggKey, u64>, key: &AggKey, n: u64) -> bool {
    if let Some(p) = map.get_ptr_mut(key) {
        // SAFETY: this CPU's value.
        unsafe { *p += n };
        return true;
    }
    // Another CPU may create the key meanwhile: an insert then only sets this CPU's value.
    map.insert(key, n, 0).is_ok()
}
