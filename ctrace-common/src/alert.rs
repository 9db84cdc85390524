//! Records of what changes conntrack's behaviour, not a packet: module load and unload steps with the process
//! chain behind them (module ring buffer), writes to conntrack sysctls (sysctl ring buffer), and the offsets the
//! module programs read.

use crate::TASK_COMM_LEN;

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
/// Ancestors of the caller recorded with a module event (parent first, up to pid 1): enough to reach the service
/// behind it (systemd → a unit's shell → an init script → modprobe; or sshd → sshd → bash → sudo → script).
pub const MAX_ANCESTORS: usize = 8;

/// One process in the chain behind a module event, read from its task_struct at event time (parents can be gone
/// by the time userspace reads /proc).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Ancestor {
    /// tgid; 0 = no such ancestor (the chain ended before).
    pub pid: u32,
    pub _pad: u32,
    /// task_struct.start_boottime (ns): with the pid, tells this process from a later one with the same pid.
    pub start_ns: u64,
    pub comm: [u8; TASK_COMM_LEN],
}

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
    /// 1 when the caller could load and unload modules: CAP_SYS_MODULE effective in the init user
    /// namespace. Requests and tools of anyone else cannot change a module and raise no alert.
    pub privileged: u32,
    pub _pad: u32,
    /// The caller's cgroup v2 id (`bpf_get_current_cgroup_id`: the inode of its cgroup directory), which names its
    /// systemd unit.
    pub cgroup_id: u64,
    /// The caller's parent, grandparent, ... up to pid 1 or MAX_ANCESTORS.
    pub ancestors: [Ancestor; MAX_ANCESTORS],
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
    /// The writer's netns (inode; 0 when unknown): per-netns keys change only that netns.
    pub netns: u32,
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
    /// task_struct.cred, cred.cap_effective (kernel_cap_t: a u64, or u32[2] before 6.3, the same bits),
    /// cred.user_ns, user_namespace.level (0 = the init user namespace).
    pub task_cred: u32,
    pub cred_cap_effective: u32,
    pub cred_user_ns: u32,
    pub user_ns_level: u32,
    /// task_struct.start_boottime (what /proc/PID/stat's starttime shows, in clock ticks).
    pub task_start_boottime: u32,
    /// task_struct.group_leader: a process's name and start time are its leader's (the forking thread may be
    /// another one, with a name of its own).
    pub task_group_leader: u32,
}
