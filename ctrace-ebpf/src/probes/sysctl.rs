//! Writes to conntrack sysctls: a cgroup/sysctl program on the cgroup v2 root sees every write
//! (name, current and new value) before the kernel parses it, so a value that is then refused
//! still shows who tried. It never blocks: it always allows the write.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_uid_gid,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_sysctl_get_current_value, bpf_sysctl_get_name, bpf_sysctl_get_new_value},
    },
    macros::{cgroup_sysctl, map},
    maps::RingBuf,
    programs::SysctlContext,
};
use ctrace_common::{SYSCTL_NAME_LEN, SYSCTL_VALUE_LEN, SysctlEvent};

use crate::globals::{layout, sysctl_task_helpers};

#[map]
pub static SYSCTL_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 16, 0);

const ALLOW: i32 = 1;

/// `net/netfilter/nf_conntrack_*` and the old alias `net/nf_conntrack_max`. Compared eight bytes
/// at a time with early exits: byte-wise loops multiply the verifier's states.
#[inline(always)]
fn is_conntrack(name: &[u8; SYSCTL_NAME_LEN]) -> bool {
    let word = |i: usize| {
        u64::from_le_bytes([
            name[i],
            name[i + 1],
            name[i + 2],
            name[i + 3],
            name[i + 4],
            name[i + 5],
            name[i + 6],
            name[i + 7],
        ])
    };
    const fn w(s: &[u8; 8]) -> u64 {
        u64::from_le_bytes(*s)
    }
    if word(0) == w(b"net/netf") {
        word(8) == w(b"ilter/nf")
            && word(16) == w(b"_conntra")
            && name[24] == b'c'
            && name[25] == b'k'
            && name[26] == b'_'
    } else {
        word(0) == w(b"net/nf_c") && word(8) == w(b"onntrack") && word(12) == w(b"rack_max")
    }
}

/// The netns inode of the current task (current->nsproxy->net_ns->ns.inum), 0 if unreadable.
#[inline(always)]
unsafe fn writer_netns() -> u32 {
    unsafe {
        let read = |addr: u64| bpf_probe_read_kernel(addr as *const u64).unwrap_or(0);
        let task = bpf_get_current_task();
        let nsproxy = read(task + layout!(task_nsproxy) as u64);
        if nsproxy == 0 {
            return 0;
        }
        let net = read(nsproxy + layout!(nsproxy_net_ns) as u64);
        if net == 0 {
            return 0;
        }
        bpf_probe_read_kernel((net + layout!(net_inum) as u64) as *const u32).unwrap_or(0)
    }
}

#[cgroup_sysctl]
pub fn sysctl_watch(ctx: SysctlContext) -> i32 {
    // SAFETY: the context pointer is the kernel's struct bpf_sysctl.
    if unsafe { (*ctx.sysctl).write } == 0 {
        return ALLOW;
    }
    let mut name = [0u8; SYSCTL_NAME_LEN];
    // SAFETY: buffers are ours and sized as passed.
    unsafe { bpf_sysctl_get_name(ctx.sysctl, name.as_mut_ptr() as *mut _, SYSCTL_NAME_LEN as u64, 0) };
    if !is_conntrack(&name) {
        return ALLOW;
    }
    let Some(mut slot) = SYSCTL_EVENTS.reserve::<SysctlEvent>(0) else {
        return ALLOW;
    };
    // SAFETY: the slot is ours until submitted; it is fully written below.
    let ev = unsafe {
        let p = slot.as_mut_ptr();
        core::ptr::write_bytes(p, 0, 1);
        &mut *p
    };
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.name = name;
    unsafe {
        bpf_sysctl_get_current_value(ctx.sysctl, ev.old.as_mut_ptr() as *mut _, SYSCTL_VALUE_LEN as u64);
        bpf_sysctl_get_new_value(ctx.sysctl, ev.new.as_mut_ptr() as *mut _, SYSCTL_VALUE_LEN as u64);
    }
    if sysctl_task_helpers() {
        ev.has_task = 1;
        ev.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        ev.uid = bpf_get_current_uid_gid() as u32;
        ev.comm = bpf_get_current_comm().unwrap_or_default();
        // SAFETY: every read goes through bpf_probe_read_kernel (the same helpers come with 6.1).
        ev.netns = unsafe { writer_netns() };
    }
    slot.submit(0);
    ALLOW
}
