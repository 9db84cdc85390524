//! ctrace: shows which packets netfilter connection tracking dropped, and why.
//!
//! Layout: `cli` (flags) → `session` (the run loop) → `probes` (kernel hooks per mode) → `event`
//! (decoding kernel records) → `report` (the typed records ctrace reports) → `sinks` (text, JSON).
//! The session's stateful parts: `kernel_counters`, `evictions`, `reload`, `hook_steer`,
//! `aggregate`, `summary`. `btf`/`layout`/`kallsyms` resolve kernel offsets and symbols at start-up;
//! `netns`/`ctstat` read the kernel's own counters; `demo` makes conntrack drop packets in a
//! throwaway netns. The binary (`main.rs`) only parses flags and dispatches; the tests use this
//! library's parsers instead of copies of them.

pub mod aggregate;
pub mod baselines;
pub mod bounds;
pub mod btf;
pub mod capabilities;
pub mod check;
pub mod cli;
pub mod ctstat;
pub mod demo;
pub mod event;
pub mod evictions;
pub mod hook_steer;
pub mod kallsyms;
pub mod kernel_counters;
pub mod layout;
pub mod modules;
pub mod netns;
pub mod probes;
pub mod provenance;
pub mod reload;
pub mod report;
pub mod sanitize;
pub mod session;
pub mod sinks;
pub mod summary;
pub mod sysctl_state;
pub mod sysctl_watch;

/// An error as one readable line: the context chain, with a BPF verifier log cut to its verdict
/// (the full log is thousands of lines; `RUST_LOG=debug` prints it).
pub fn brief(e: &anyhow::Error) -> String {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    let text = chain.join(": ");
    let Some(at) = text.find("Verifier output:") else {
        return text;
    };
    log::debug!("{text}");
    let verdict: Vec<&str> = text[at..]
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with(':') && !l.starts_with("verification time") && !l.starts_with("processed")
        })
        .take(2)
        .collect();
    let verdict: Vec<&str> = verdict.into_iter().rev().collect();
    format!(
        "{} (verifier: {})",
        text[..at].trim_end().trim_end_matches('.'),
        verdict.join(" / ")
    )
}
