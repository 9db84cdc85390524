//! Probe modes: which kernel hooks ctrace uses on this kernel, and why.
//!
//! | mode        | hooks                                                    | needs                      |
//! |-------------|----------------------------------------------------------|----------------------------|
//! | tracepoint  | tp_btf `kfree_skb` + conntrack's per-CPU `ct.stat`       | BTF, tp_btf (5.5+)         |
//!
//! The kprobe mode (failure-only kprobes on nf_conntrack's insert and drop paths) and the fentry
//! mode are planned on top of the same drop sink; `choose` says which one runs and why.

pub mod tracepoint;

use std::path::Path;

use crate::cli::Mode;

/// The mode that will run, with the sentences the user sees.
#[derive(Clone, Debug)]
pub struct Choice {
    pub name: &'static str,
    pub why: String,
    pub exactness: &'static str,
}

pub const TRACEPOINT_EXACTNESS: &str = "how exact: every packet that netfilter drops is seen at skb:kfree_skb; \
conntrack's per-CPU counters tell conntrack drops (table_full, insert_failed, invalid) from ruleset drops \
(netfilter_rule), exact per packet unless a sender migrates CPU inside the netfilter hook; early_drop \
evictions are counted from the kernel counters each second, without the evicted flow.";

/// Kprobes are usable when the kernel exposes the kprobe PMU (CONFIG_KPROBE_EVENTS).
pub fn kernel_has_kprobes() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
}

pub fn choose(requested: Mode) -> Choice {
    let why = match requested {
        Mode::Tracepoint => "requested with --mode tracepoint".to_owned(),
        Mode::Auto if !kernel_has_kprobes() => {
            "this kernel has no kprobes (CONFIG_KPROBES is off), so drops are seen at the skb:kfree_skb tracepoint"
                .to_owned()
        }
        Mode::Auto => "kprobes exist on this kernel, but this build of ctrace implements only the tracepoint \
mode; drops are seen at the skb:kfree_skb tracepoint"
            .to_owned(),
    };
    Choice {
        name: "tracepoint",
        why,
        exactness: TRACEPOINT_EXACTNESS,
    }
}
