//! Read-only globals, written by the loader before load (the `.rodata` map is then frozen, so
//! the verifier treats the values as constants: offsets from here can address BTF pointers).

use core::ptr::read_volatile;

use ctrace_common::KernelLayout;

#[unsafe(no_mangle)]
pub(crate) static LAYOUT: KernelLayout = KernelLayout {
    skb_dev: 0,
    skb_sk: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_transport_header: 0,
    skb_protocol: 0,
    skb_nfct: 0,
    skb_refdst: 0,
    dev_nd_net: 0,
    sk_net: 0,
    dst_dev: 0,
    net_inum: 0,
    net_ct_stat: 0,
    stat_invalid: 0,
    stat_insert_failed: 0,
    stat_drop: 0,
    stat_early_drop: 0,
    stat_error: 0,
    net_cookie: 0,
    reason_netfilter_drop: u32::MAX,
    bpf_array_pptrs: 0,
    ct_tuple: 0,
    ct_net: 0,
    net_hooks_ipv4: 0,
    net_hooks_ipv6: 0,
    entries_hooks: 0,
    task_nsproxy: 0,
    nsproxy_net_ns: 0,
    ct_timeout: 0,
    nf_hook_slow_start: 0,
    nf_hook_slow_end: 0,
};

/// Reads one field of `LAYOUT`. Volatile so that the compiler cannot fold the build-time zeros.
macro_rules! layout {
    ($field:ident) => {
        $crate::globals::read_const(&raw const $crate::globals::LAYOUT.$field)
    };
}
pub(crate) use layout;

/// Volatile read of a global, so that the compiler cannot fold the build-time default.
#[inline(always)]
pub fn read_const<T: Copy>(p: *const T) -> T {
    // SAFETY: only called with pointers to this module's statics.
    unsafe { read_volatile(p) }
}

// Filters (0 = any). Applied in the kernel so that the exact totals respect them too.
#[unsafe(no_mangle)]
static FILTER_NETNS: u32 = 0;
#[unsafe(no_mangle)]
static FILTER_L4PROTO: u32 = 0;
#[unsafe(no_mangle)]
static FILTER_PORT: u32 = 0;
/// Bit `1 << reason` set = report that reason. 0 = all.
#[unsafe(no_mangle)]
static FILTER_REASONS: u32 = 0;
/// 0 = no host filter, 4 or 6 = match FILTER_HOST (16 bytes, IPv4 in the first 4).
#[unsafe(no_mangle)]
static FILTER_HOST_VERSION: u32 = 0;
#[unsafe(no_mangle)]
static FILTER_HOST: [u8; 16] = [0; 16];

#[inline(always)]
pub fn filter_netns() -> u32 {
    unsafe { read_volatile(&raw const FILTER_NETNS) }
}
#[inline(always)]
pub fn filter_l4proto() -> u32 {
    unsafe { read_volatile(&raw const FILTER_L4PROTO) }
}
#[inline(always)]
pub fn filter_port() -> u32 {
    unsafe { read_volatile(&raw const FILTER_PORT) }
}
#[inline(always)]
pub fn filter_reasons() -> u32 {
    unsafe { read_volatile(&raw const FILTER_REASONS) }
}
#[inline(always)]
pub fn filter_host_version() -> u32 {
    unsafe { read_volatile(&raw const FILTER_HOST_VERSION) }
}
#[inline(always)]
pub fn filter_host() -> [u8; 16] {
    unsafe { read_volatile(&raw const FILTER_HOST) }
}

/// Records each CPU streams per second before it aggregates drops in the kernel instead (`--rate-limit`;
/// 0 = stream every drop).
#[unsafe(no_mangle)]
static STREAM_LIMIT: u32 = 0;

#[inline(always)]
pub fn stream_limit() -> u32 {
    read_const(&raw const STREAM_LIMIT)
}

/// Always 0, but writable (`.bss`), so the verifier cannot know its value: XOR-ing a value with it makes the
/// verifier forget what it knew about that value, for one load (a probe read of a stack slot, the other way to
/// do it, is a helper call).
#[unsafe(no_mangle)]
static mut OPAQUE_ZERO: u64 = 0;

/// `v`, with its value hidden from the verifier's value tracking.
#[inline(always)]
pub fn opaque_u64(v: u64) -> u64 {
    // SAFETY: a read of this module's static.
    v ^ unsafe { read_volatile(&raw const OPAQUE_ZERO) }
}

/// Non-zero in kprobe mode: the kfree_skb program then prefers the verdicts the conntrack
/// kprobes left for the packet over counter deltas.
#[unsafe(no_mangle)]
static KPROBE_MODE: u32 = 0;
/// Argument index of `fmt` in nf_l4proto_log_invalid / nf_ct_l4proto_log_invalid (they moved
/// in 5.15 when `state` was added); the first variadic argument follows it.
#[unsafe(no_mangle)]
static L4PROTO_LOG_INVALID_FMT: u32 = 3;
#[unsafe(no_mangle)]
static CT_L4PROTO_LOG_INVALID_FMT: u32 = 3;

/// Non-zero on kernels that count resolved clashes as insert_failed without dropping (before 5.10).
#[unsafe(no_mangle)]
static INSERT_FAILED_NOISY: u32 = 0;

#[inline(always)]
pub fn insert_failed_noisy() -> bool {
    read_const(&raw const INSERT_FAILED_NOISY) != 0
}

#[inline(always)]
pub fn kprobe_mode() -> bool {
    read_const(&raw const KPROBE_MODE) != 0
}
#[inline(always)]
pub fn l4proto_log_invalid_fmt() -> u32 {
    read_const(&raw const L4PROTO_LOG_INVALID_FMT)
}
#[inline(always)]
pub fn ct_l4proto_log_invalid_fmt() -> u32 {
    read_const(&raw const CT_L4PROTO_LOG_INVALID_FMT)
}

#[unsafe(no_mangle)]
pub(crate) static MODULE_LAYOUT: ctrace_common::ModuleLayout = ctrace_common::ModuleLayout {
    module_name: 0,
    task_real_parent: 0,
    task_tgid: 0,
    task_comm: 0,
    task_mm: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    delete_enter_name: 16,
    delete_exit_ret: 16,
    task_exit_code: 0,
    task_cred: 0,
    cred_cap_effective: 0,
    cred_user_ns: 0,
    user_ns_level: 0,
    task_start_boottime: 0,
    task_group_leader: 0,
};

/// Reads one field of `MODULE_LAYOUT`.
macro_rules! module_layout {
    ($field:ident) => {
        $crate::globals::read_const(&raw const $crate::globals::MODULE_LAYOUT.$field)
    };
}
pub(crate) use module_layout;

/// Non-zero when cgroup/sysctl programs may call the task helpers (6.1+).
#[unsafe(no_mangle)]
static SYSCTL_TASK_HELPERS: u32 = 0;

#[inline(always)]
pub fn sysctl_task_helpers() -> bool {
    read_const(&raw const SYSCTL_TASK_HELPERS) != 0
}
