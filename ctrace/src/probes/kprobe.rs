//! kprobe mode: attaches the failure-only conntrack probes (ctrace-ebpf/src/probes/conntrack.rs).

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{KProbe, kprobe::KProbeLinkId},
};

use crate::kallsyms;

/// The nf_conntrack functions found on this kernel (exact kallsyms names: static functions can
/// be compiler clones such as `init_conntrack.isra.0`).
#[derive(Clone, Debug)]
pub struct Symbols {
    pub early_drop: String,
    pub resolve_clash: Option<String>,
    pub l4proto_log_invalid: Option<String>,
    pub ct_l4proto_log_invalid: Option<String>,
    /// nf_ct_delete: attached only while a table is nearly full (see `Tracer::watch_evictions`).
    pub ct_delete: Option<String>,
}

impl Symbols {
    /// None when nf_conntrack is not loaded (or early_drop was inlined away).
    pub fn find() -> anyhow::Result<Option<Symbols>> {
        let mut found = kallsyms::find_functions(&[
            "early_drop",
            "nf_ct_resolve_clash",
            "nf_l4proto_log_invalid",
            "nf_ct_l4proto_log_invalid",
            "nf_ct_delete",
        ])?
        .into_iter();
        let mut next = || found.next().flatten();
        let Some(early_drop) = next() else {
            return Ok(None);
        };
        Ok(Some(Symbols {
            early_drop,
            resolve_clash: next(),
            l4proto_log_invalid: next(),
            ct_l4proto_log_invalid: next(),
            ct_delete: next(),
        }))
    }

    pub fn describe(&self) -> String {
        let mut v = vec![self.early_drop.as_str()];
        v.extend(self.resolve_clash.as_deref());
        v.extend(self.l4proto_log_invalid.as_deref());
        v.extend(self.ct_l4proto_log_invalid.as_deref());
        v.join(", ")
    }
}

/// Argument index of `fmt` in (nf_l4proto_log_invalid, nf_ct_l4proto_log_invalid): 5.15 added a
/// `state` argument to both (and removed `net`/`pf` from the first).
pub fn log_invalid_fmt_args(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    if (major, minor) >= (5, 15) { (3, 3) } else { (4, 2) }
}

/// The programs and the functions they attach to (optional functions may be absent).
fn targets(s: &Symbols) -> Vec<(&'static str, Option<&str>)> {
    vec![
        ("conntrack_early_drop", Some(s.early_drop.as_str())),
        ("conntrack_early_drop_ret", Some(s.early_drop.as_str())),
        ("conntrack_resolve_clash", s.resolve_clash.as_deref()),
        ("conntrack_resolve_clash_ret", s.resolve_clash.as_deref()),
        ("conntrack_l4proto_log_invalid", s.l4proto_log_invalid.as_deref()),
        ("conntrack_ct_l4proto_log_invalid", s.ct_l4proto_log_invalid.as_deref()),
    ]
}

pub(super) fn program<'a>(ebpf: &'a mut Ebpf, prog: &str) -> anyhow::Result<&'a mut KProbe> {
    Ok(ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the eBPF object"))?
        .try_into()?)
}

/// Loads every conntrack kprobe program (once; attaching can then be redone after a reload).
pub fn load_all(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for prog in [
        "conntrack_early_drop",
        "conntrack_early_drop_ret",
        "conntrack_resolve_clash",
        "conntrack_resolve_clash_ret",
        "conntrack_l4proto_log_invalid",
        "conntrack_ct_l4proto_log_invalid",
        "conntrack_ct_delete",
        "conntrack_ct_delete_ret",
    ] {
        program(ebpf, prog)?
            .load()
            .with_context(|| format!("the kernel refused the kprobe program {prog}"))?;
    }
    Ok(())
}

/// Attaches the failure-path probes; returns the links, to detach them on a module reload.
pub fn attach_all(ebpf: &mut Ebpf, s: &Symbols) -> anyhow::Result<Vec<(&'static str, KProbeLinkId)>> {
    let mut links = vec![];
    for (prog, function) in targets(s) {
        let Some(function) = function else { continue };
        let link = program(ebpf, prog)?
            .attach(function, 0)
            .with_context(|| format!("cannot attach a kprobe to {function}"))?;
        links.push((prog, link));
    }
    Ok(links)
}

/// Detaches probes whose module went away (the kernel already disabled them).
pub fn detach_all(ebpf: &mut Ebpf, links: Vec<(&'static str, KProbeLinkId)>) {
    for (prog, link) in links {
        if let Ok(p) = program(ebpf, prog) {
            let _ = p.detach(link);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fmt_argument_moved_in_5_15() {
        assert_eq!(log_invalid_fmt_args("6.1.0-56-amd64"), (3, 3));
        assert_eq!(log_invalid_fmt_args("5.15.0"), (3, 3));
        assert_eq!(log_invalid_fmt_args("5.10.0-46-cloud-amd64"), (4, 2));
        assert_eq!(log_invalid_fmt_args("4.18.0-240.el8.x86_64"), (4, 2));
    }
}
