//! Module loads and unloads, and who asked for them (kernels with CONFIG_MODULES).
//!
//! - tp_btf `module_load(struct module *mod)`: before the module's init runs.
//! - tp_btf `module_free(struct module *mod)`: the module is going away.
//! - tracepoints `syscalls:sys_{enter,exit}_delete_module`: the request (`name_user`) and its
//!   answer (0, or -EBUSY when another module or a user still holds it).
//!
//! All of these fire only when modules change: they cost nothing on the packet path.

use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf, bpf_probe_read_user_buf, bpf_probe_read_user_str_bytes,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::RingBuf,
    programs::{BtfTracePointContext, TracePointContext},
};
use ctrace_common::{CMDLINE_LEN, ModuleEvent, module_kind};

use crate::globals::module_layout;

/// Module events for userspace (rare: a few per modprobe).
#[map]
pub static MODULE_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 16, 0);

#[inline(always)]
unsafe fn read_ptr(addr: u64) -> u64 {
    unsafe { bpf_probe_read_kernel(addr as *const u64).unwrap_or(0) }
}

/// Fills the process fields from the current task: tgid, uid, comm, parent, argv.
#[inline(always)]
unsafe fn fill_process(ev: &mut ModuleEvent) {
    unsafe {
        let task = bpf_get_current_task();
        ev.uid = bpf_get_current_uid_gid() as u32;
        ev.pid = bpf_probe_read_kernel((task + module_layout!(task_tgid) as u64) as *const u32).unwrap_or(0);
        let _ = bpf_probe_read_kernel_buf((task + module_layout!(task_comm) as u64) as *const u8, &mut ev.comm);
        let parent = read_ptr(task + module_layout!(task_real_parent) as u64);
        if parent != 0 {
            ev.ppid = bpf_probe_read_kernel((parent + module_layout!(task_tgid) as u64) as *const u32).unwrap_or(0);
            let _ = bpf_probe_read_kernel_buf(
                (parent + module_layout!(task_comm) as u64) as *const u8,
                &mut ev.parent_comm,
            );
        }
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
