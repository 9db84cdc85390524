//! Module loads and unloads, and who asked for them (kernels with CONFIG_MODULES).
//!
//! - tp_btf `module_load(struct module *mod)`: before the module's init runs.
//! - tp_btf `module_free(struct module *mod)`: the module is going away.
//! - tracepoints `syscalls:sys_{enter,exit}_delete_module`: the request (`name_user`) and its
//!   answer (0, or -EBUSY when another module or a user still holds it).
//!
//! - tp_btf `sched_process_exec` / `sched_process_exit`, for `modprobe` and `rmmod` only: kmod
//!   refuses to unload a module that is in use without calling delete_module, so the tool's
//!   argv and exit status are the only trace of a refused unload.
//!
//! The module and syscall hooks fire only when modules change; the exec/exit hooks fire for every
//! process but only compare its name: nothing of this is on the packet path.

use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf, bpf_probe_read_user_buf, bpf_probe_read_user_str_bytes,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{LruHashMap, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
};
use ctrace_common::{CMDLINE_LEN, MAX_ANCESTORS, ModuleEvent, module_kind};

use crate::globals::module_layout;

/// Module events for userspace (rare: a few per modprobe).
#[map]
pub static MODULE_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 16, 0);

/// tgid of running modprobe/rmmod processes.
#[map]
static TOOLS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(1024, 0);

#[inline(always)]
unsafe fn read_ptr(addr: u64) -> u64 {
    unsafe { bpf_probe_read_kernel(addr as *const u64).unwrap_or(0) }
}

const CAP_SYS_MODULE: u64 = 16;

/// Whether `task` has CAP_SYS_MODULE effective in the init user namespace: only such a caller can load
/// or unload a module, so only its requests and tools are worth an alert (anyone can run a binary named
/// rmmod, or call delete_module and get EPERM).
#[inline(always)]
unsafe fn can_change_modules(task: u64) -> bool {
    unsafe {
        let cred = read_ptr(task + module_layout!(task_cred) as u64);
        if cred == 0 {
            return false;
        }
        let caps = read_ptr(cred + module_layout!(cred_cap_effective) as u64);
        let ns = read_ptr(cred + module_layout!(cred_user_ns) as u64);
        let level = bpf_probe_read_kernel((ns + module_layout!(user_ns_level) as u64) as *const i32).unwrap_or(-1);
        caps >> CAP_SYS_MODULE & 1 == 1 && ns != 0 && level == 0
    }
}

/// The thread-group leader of `task` (the process as /proc shows it), or `task` when unreadable.
#[inline(always)]
unsafe fn leader(task: u64) -> u64 {
    match unsafe { read_ptr(task + module_layout!(task_group_leader) as u64) } {
        0 => task,
        l => l,
    }
}

/// Records the chain of processes behind the caller: parent, grandparent, ... up to pid 1 (or MAX_ANCESTORS), each
/// with its pid, start time and comm (its thread-group leader's), while they still exist (a script that ran
/// modprobe may be gone by the time userspace reads the event).
#[inline(always)]
unsafe fn fill_ancestors(first: u64, ev: &mut ModuleEvent) {
    unsafe {
        let mut task = first;
        for a in ev.ancestors.iter_mut().take(MAX_ANCESTORS) {
            if task == 0 {
                break;
            }
            task = leader(task);
            a.pid = bpf_probe_read_kernel((task + module_layout!(task_tgid) as u64) as *const u32).unwrap_or(0);
            a.start_ns =
                bpf_probe_read_kernel((task + module_layout!(task_start_boottime) as u64) as *const u64).unwrap_or(0);
            let _ = bpf_probe_read_kernel_buf((task + module_layout!(task_comm) as u64) as *const u8, &mut a.comm);
            if a.pid <= 1 {
                break;
            }
            task = read_ptr(task + module_layout!(task_real_parent) as u64);
        }
    }
}

/// Fills the process fields from the current task: tgid, uid, comm, parent and the chain above it, cgroup, argv,
/// privilege.
#[inline(always)]
unsafe fn fill_process(ev: &mut ModuleEvent) {
    unsafe {
        let task = bpf_get_current_task();
        ev.privileged = can_change_modules(task) as u32;
        ev.cgroup_id = aya_ebpf::helpers::generated::bpf_get_current_cgroup_id();
        ev.uid = bpf_get_current_uid_gid() as u32;
        ev.pid = bpf_probe_read_kernel((task + module_layout!(task_tgid) as u64) as *const u32).unwrap_or(0);
        let _ = bpf_probe_read_kernel_buf((task + module_layout!(task_comm) as u64) as *const u8, &mut ev.comm);
        let mut parent = read_ptr(task + module_layout!(task_real_parent) as u64);
        if parent != 0 {
            parent = leader(parent);
            ev.ppid = bpf_probe_read_kernel((parent + module_layout!(task_tgid) as u64) as *const u32).unwrap_or(0);
            let _ = bpf_probe_read_kernel_buf(
                (parent + module_layout!(task_comm) as u64) as *const u8,
                &mut ev.parent_comm,
            );
        }
        fill_ancestors(parent, ev);
        let mm = read_ptr(task + module_layout!(task_mm) as u64);
        if mm != 0 {
            let start = read_ptr(mm + module_layout!(mm_arg_start) as u64);
            let end = read_ptr(mm + module_layout!(mm_arg_end) as u64);
            if start != 0 && end > start {
                // argv is NUL-separated in [arg_start, arg_end): copy it whole, truncated.
                let len = ((end - start) as usize).min(CMDLINE_LEN);
                let _ = bpf_probe_read_user_buf(start as *const u8, &mut ev.cmdline[..len]);
            }
        }
    }
}

#[inline(always)]
fn submit(kind: u32, fill: impl FnOnce(&mut ModuleEvent)) {
    if let Some(mut slot) = MODULE_EVENTS.reserve::<ModuleEvent>(0) {
        // SAFETY: the slot is ours until submitted; zero it so no stale ring memory leaks out.
        let ev = unsafe {
            let p = slot.as_mut_ptr();
            core::ptr::write_bytes(p, 0, 1);
            &mut *p
        };
        ev.kind = kind;
        ev.ts_ns = unsafe { bpf_ktime_get_ns() };
        unsafe { fill_process(ev) };
        fill(ev);
        slot.submit(0);
    }
}

#[inline(always)]
fn module_name(mod_ptr: u64, ev: &mut ModuleEvent) {
    let _ = unsafe {
        bpf_probe_read_kernel_buf(
            (mod_ptr + module_layout!(module_name) as u64) as *const u8,
            &mut ev.name,
        )
    };
}

#[btf_tracepoint(function = "module_load")]
pub fn module_load(ctx: BtfTracePointContext) -> i32 {
    let m: u64 = ctx.arg(0);
    submit(module_kind::LOAD, |ev| module_name(m, ev));
    0
}

#[btf_tracepoint(function = "module_free")]
pub fn module_free(ctx: BtfTracePointContext) -> i32 {
    let m: u64 = ctx.arg(0);
    submit(module_kind::FREE, |ev| module_name(m, ev));
    0
}

#[tracepoint]
pub fn module_delete_enter(ctx: TracePointContext) -> u32 {
    let name_user: u64 = unsafe { ctx.read_at(module_layout!(delete_enter_name) as usize).unwrap_or(0) };
    submit(module_kind::DELETE_ENTER, |ev| {
        let _ = unsafe { bpf_probe_read_user_str_bytes(name_user as *const u8, &mut ev.name) };
    });
    0
}

#[tracepoint]
pub fn module_delete_exit(ctx: TracePointContext) -> u32 {
    let ret: i64 = unsafe { ctx.read_at(module_layout!(delete_exit_ret) as usize).unwrap_or(0) };
    submit(module_kind::DELETE_EXIT, |ev| ev.ret = ret);
    0
}

/// Whether the current task is `modprobe` or `rmmod` (comm is the executable's base name).
#[inline(always)]
fn is_module_tool() -> bool {
    let Ok(comm) = aya_ebpf::helpers::bpf_get_current_comm() else {
        return false;
    };
    let word = u64::from_le_bytes([comm[0], comm[1], comm[2], comm[3], comm[4], comm[5], comm[6], comm[7]]);
    (word == u64::from_le_bytes(*b"modprobe") && comm[8] == 0)
        || (word & 0xffff_ffff_ffff == u64::from_le_bytes(*b"rmmod\0\0\0"))
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn module_tool_exec(_ctx: BtfTracePointContext) -> i32 {
    if is_module_tool() {
        let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
        let _ = TOOLS.insert(tgid, 1, 0);
        submit(module_kind::TOOL_EXEC, |_| {});
    }
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn module_tool_exit(ctx: BtfTracePointContext) -> i32 {
    let id = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    // The process ends with its thread-group leader; tools are single-threaded anyway.
    if tgid != tid || unsafe { TOOLS.get(tgid) }.is_none() {
        return 0;
    }
    let _ = TOOLS.remove(tgid);
    let task: u64 = ctx.arg(0);
    let code: i32 =
        unsafe { bpf_probe_read_kernel((task + module_layout!(task_exit_code) as u64) as *const i32).unwrap_or(0) };
    submit(module_kind::TOOL_EXIT, |ev| ev.ret = ((code >> 8) & 0xff) as i64);
    0
}
