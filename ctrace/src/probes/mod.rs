//! Probe modes: which kernel hooks ctrace uses on this kernel, and why.
//!
//! | mode       | hooks                                                                  | needs               |
//! |------------|------------------------------------------------------------------------|---------------------|
//! | kprobe     | tp_btf `kfree_skb` + failure-only kprobes on nf_conntrack (`early_drop` | CONFIG_KPROBES,     |
//! |            | return, `nf_ct_resolve_clash`, `nf_(ct_)l4proto_log_invalid`)          | nf_conntrack loaded |
//! | tracepoint | tp_btf `kfree_skb` + conntrack's per-CPU `ct.stat` counters            | BTF, tp_btf (5.5+)  |
//!
//! Both modes see every dropped packet at the same sink; kprobe mode adds exact per-packet
//! verdicts and the kernel's reason text. fentry is never used on nf_conntrack's functions: it
//! would pin the module, so `modprobe -r nf_conntrack` would fail while ctrace runs.

pub mod aggregates;
pub mod conntrack_hook;
pub mod kernel_totals;
pub mod kprobe;
pub mod loader;

use std::path::Path;

use anyhow::bail;

use crate::cli::Mode;

/// The mode that will run, with the sentences the user sees.
#[derive(Clone, Debug)]
pub struct Choice {
    pub plan: Plan,
    pub why: String,
}

#[derive(Clone, Debug)]
pub enum Plan {
    Tracepoint,
    /// The nf_conntrack functions to probe; None while nf_conntrack is not loaded yet (a ctrace started before
    /// the firewall): the probes are attached when it loads.
    Kprobe(Option<kprobe::Symbols>),
}

impl Choice {
    pub fn name(&self) -> &'static str {
        match self.plan {
            Plan::Tracepoint => "tracepoint",
            Plan::Kprobe(_) => "kprobe",
        }
    }

    pub fn exactness(&self) -> &'static str {
        match self.plan {
            Plan::Tracepoint => TRACEPOINT_EXACTNESS,
            Plan::Kprobe(_) => KPROBE_EXACTNESS,
        }
    }
}

pub const TRACEPOINT_EXACTNESS: &str = "how exact: every packet that netfilter drops is seen at skb:kfree_skb; \
a NOTRACKed packet or one carrying a conntrack entry is an exact netfilter_rule; conntrack's per-CPU drop and \
insert_failed counters name table_full and insert_failed exactly; a drop without an entry after conntrack counted \
invalid packets that it let through is reported uncertain (invalid or netfilter_rule), never guessed, and on \
6.4+ arms the conntrack hook in that netns, after which such drops are exact; early_drop evictions are counted \
from the kernel counters each second, without the evicted flow.";

pub const KPROBE_EXACTNESS: &str = "how exact: every packet that netfilter drops is seen at skb:kfree_skb; \
kprobes on early_drop, nf_ct_resolve_clash and nf_(ct_)l4proto_log_invalid name table_full, unresolved \
clashes and invalid packets for the very skb (checked against its headers and conntrack's counters), with the \
kernel's reason text; NOTRACK and attached entries prove ruleset drops; what neither settles is reported \
uncertain (and on 6.4+ arms the conntrack hook in that netns, which settles later ones); early_drop evictions are counted exactly from the kernel counters and, while a table is over 90% \
full, listed one by one with the evicted entry's flow.";

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Kprobes are usable when the kernel exposes the kprobe PMU (CONFIG_KPROBE_EVENTS).
pub fn kernel_has_kprobes() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
}

/// The mode for `requested`; `perf_events` says whether this process may open perf events (kprobes are
/// attached through them: see `capabilities`).
pub fn choose(requested: Mode, perf_events: bool) -> anyhow::Result<Choice> {
    let has_kprobes = kernel_has_kprobes();
    let symbols = if has_kprobes { kprobe::Symbols::find()? } else { None };
    let plan_why = match (requested, symbols) {
        (Mode::Tracepoint, _) => (Plan::Tracepoint, "requested with --mode tracepoint".to_owned()),
        (Mode::Kprobe, _) if has_kprobes && !perf_events => bail!(
            "kprobe mode attaches kprobes through perf events, which kernel.perf_event_paranoid reserves to \
CAP_SYS_ADMIN here: run ctrace with CAP_SYS_ADMIN or use --mode tracepoint"
        ),
        (Mode::Auto, _) if has_kprobes && !perf_events => (
            Plan::Tracepoint,
            "this kernel has kprobes, but kernel.perf_event_paranoid reserves perf events (which attach them) to \
CAP_SYS_ADMIN, which ctrace lacks: drops are seen at the skb:kfree_skb tracepoint"
                .to_owned(),
        ),
        (Mode::Kprobe | Mode::Auto, Some(s)) => {
            let why = format!(
                "{}; kprobes on nf_conntrack's failure paths ({}) and drops at the skb:kfree_skb tracepoint",
                if requested == Mode::Kprobe {
                    "requested with --mode kprobe"
                } else {
                    "this kernel has kprobes"
                },
                s.describe()
            );
            (Plan::Kprobe(Some(s)), why)
        }
        (Mode::Kprobe, None) if !has_kprobes => {
            bail!("kprobe mode needs a kernel with CONFIG_KPROBES and this one has none: use --mode tracepoint")
        }
        (Mode::Auto, None) if !has_kprobes => (
            Plan::Tracepoint,
            "this kernel has no kprobes (CONFIG_KPROBES is off), so drops are seen at the skb:kfree_skb tracepoint"
                .to_owned(),
        ),
        (_, None) if crate::modules::kernel_has_modules() => (
            Plan::Kprobe(None),
            "this kernel has kprobes, but nf_conntrack is not loaded yet: its failure paths are probed the moment \
it loads (a `reattached` record says so); until then drops are seen at the skb:kfree_skb tracepoint"
                .to_owned(),
        ),
        (Mode::Kprobe, None) => bail!(
            "kprobe mode needs nf_conntrack's early_drop, which is not in /proc/kallsyms (inlined, or conntrack not \
built in): use --mode tracepoint"
        ),
        (Mode::Auto, None) => (
            Plan::Tracepoint,
            "nf_conntrack's early_drop is not in /proc/kallsyms (inlined, or conntrack not built in), so its \
functions cannot be probed; drops are seen at the skb:kfree_skb tracepoint"
                .to_owned(),
        ),
    };
    Ok(Choice {
        plan: plan_why.0,
        why: plan_why.1,
    })
}
