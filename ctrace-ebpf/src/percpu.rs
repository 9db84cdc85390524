//! This CPU's per-CPU offset, without `__per_cpu_offset` (absent from kallsyms without
//! CONFIG_KALLSYMS_ALL) and without `bpf_this_cpu_ptr` (needs __percpu BTF type tags).
//!
//! A per-CPU array map's element on this CPU lives at `array->pptrs[0] + this CPU's offset`,
//! and `bpf_map_lookup_elem` returns exactly that address. Reading `pptrs[0]` from the map's
//! kernel object gives the offset. It is constant per CPU, so it is cached in the element itself.
//! Needs root (CAP_BPF + CAP_PERFMON): the program handles kernel addresses as numbers.

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::map, maps::PerCpuArray};

use crate::globals::layout;

#[map]
static CPU_OFFSET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Turns a pointer the verifier tracks into a plain number by copying it through memory.
#[inline(always)]
pub unsafe fn address_of<T>(p: *const T) -> u64 {
    let slot = p as u64;
    unsafe { bpf_probe_read_kernel(&slot as *const u64).unwrap_or(0) }
}

#[inline(always)]
pub unsafe fn this_cpu_offset() -> Option<u64> {
    unsafe {
        let elem = CPU_OFFSET.get_ptr_mut(0)?;
        let cached = *elem;
        if cached != 0 {
            return Some(cached);
        }
        let elem_addr = address_of(elem);
        let map_addr = address_of(&raw const CPU_OFFSET);
        let pptr: u64 = bpf_probe_read_kernel((map_addr + layout!(bpf_array_pptrs) as u64) as *const u64).ok()?;
        if elem_addr == 0 || pptr == 0 {
            return None;
        }
        let off = elem_addr.wrapping_sub(pptr);
        *elem = off;
        Some(off)
    }
}
