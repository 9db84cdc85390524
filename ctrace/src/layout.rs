//! Resolves `KernelLayout` (field offsets, enum values, text addresses) for the running kernel.

use anyhow::Context as _;
use ctrace_common::KernelLayout;

use crate::btf::{Btf, BtfError};

/// How the kfree_skb program recognises a netfilter drop on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropMatch {
    /// `reason == SKB_DROP_REASON_NETFILTER_DROP` (value from BTF).
    Reason(u32),
    /// No drop reasons (before 5.17): the free happened inside `nf_hook_slow`.
    Location { start: u64, end: u64 },
}

/// Offsets of `struct nf_conn`, from vmlinux when nf_conntrack is built in or from the module's split BTF
/// while it is loaded. None when this kernel has no BTF for it (e.g. Debian's 5.10 cloud kernel has no module BTF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnOffsets {
    /// The tuple of the original direction.
    pub tuple: u32,
    /// The netns.
    pub net: u32,
    /// The expiry time in jiffies.
    pub timeout: u32,
}

pub fn conntrack_offsets(vmlinux: &Btf) -> Option<ConnOffsets> {
    let resolve = |btf: &Btf| -> Result<ConnOffsets, BtfError> {
        let tuple =
            btf.member_offset("nf_conn", "tuplehash")? + btf.member_offset("nf_conntrack_tuple_hash", "tuple")?;
        Ok(ConnOffsets {
            tuple,
            net: btf.member_offset("nf_conn", "ct_net.net")?,
            timeout: btf.member_offset("nf_conn", "timeout")?,
        })
    };
    if let Ok(o) = resolve(vmlinux) {
        return Some(o);
    }
    let split = vmlinux.with_split_file("/sys/kernel/btf/nf_conntrack").ok()?;
    resolve(&split).ok()
}

pub fn resolve(btf: &Btf) -> anyhow::Result<(KernelLayout, DropMatch)> {
    let off = |s: &str, p: &str| -> Result<u32, BtfError> { btf.member_offset(s, p) };
    let mut l = KernelLayout {
        skb_dev: off("sk_buff", "dev")?,
        skb_sk: off("sk_buff", "sk")?,
        skb_head: off("sk_buff", "head")?,
        skb_network_header: off("sk_buff", "network_header")?,
        skb_transport_header: off("sk_buff", "transport_header")?,
        skb_protocol: off("sk_buff", "protocol")?,
        skb_nfct: off("sk_buff", "_nfct")
            .context("this kernel has no skb->_nfct: it was built without netfilter connection tracking")?,
        skb_refdst: off("sk_buff", "_skb_refdst")?,
        dev_nd_net: off("net_device", "nd_net.net")?,
        sk_net: off("sock", "__sk_common.skc_net.net")?,
        dst_dev: off("dst_entry", "dev")?,
        net_inum: off("net", "ns.inum")?,
        net_ct_stat: off("net", "ct.stat")
            .context("this kernel's struct net has no conntrack state (CONFIG_NF_CONNTRACK is off)")?,
        stat_invalid: off("ip_conntrack_stat", "invalid")?,
        stat_insert_failed: off("ip_conntrack_stat", "insert_failed")?,
        stat_drop: off("ip_conntrack_stat", "drop")?,
        stat_early_drop: off("ip_conntrack_stat", "early_drop")?,
        stat_error: off("ip_conntrack_stat", "error")?,
        // 5.14+ assign it when the netns is created; older kernels only on demand (then 0 when read).
        // 6.18 keeps it as the namespace id in `ns_common` (the value SO_NETNS_COOKIE returns).
        net_cookie: off("net", "net_cookie")
            .or_else(|_| off("net", "ns.ns_id"))
            .unwrap_or(0),
        reason_netfilter_drop: u32::MAX,
        bpf_array_pptrs: off("bpf_array", "pptrs")?,
        ct_tuple: 0,
        ct_net: 0,
        // The conntrack hook's "does conntrack run for this family here" check; 0 = unknown (no hook evidence).
        net_hooks_ipv4: off("net", "nf.hooks_ipv4").unwrap_or(0),
        net_hooks_ipv6: off("net", "nf.hooks_ipv6").unwrap_or(0),
        entries_hooks: off("nf_hook_entries", "hooks").unwrap_or(0),
        task_nsproxy: off("task_struct", "nsproxy")?,
        nsproxy_net_ns: off("nsproxy", "net_ns")?,
        ct_timeout: 0,
        nf_hook_slow_start: 0,
        nf_hook_slow_end: 0,
    };
    if let Some(o) = conntrack_offsets(btf) {
        l.ct_tuple = o.tuple;
        l.ct_net = o.net;
        l.ct_timeout = o.timeout;
    }
    let matcher = match btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP") {
        Ok(v) => {
            l.reason_netfilter_drop = v as u32;
            DropMatch::Reason(v as u32)
        }
        Err(_) => {
            let (start, end) = crate::kallsyms::symbol_range("nf_hook_slow")?.context(
                "this kernel has no drop reasons and /proc/kallsyms shows no address of nf_hook_slow (addresses \
                     need CAP_SYSLOG): run ctrace as root",
            )?;
            l.nf_hook_slow_start = start;
            l.nf_hook_slow_end = end;
            DropMatch::Location { start, end }
        }
    };
    Ok((l, matcher))
}
