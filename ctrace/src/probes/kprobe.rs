//! kprobe mode: attaches the failure-only conntrack probes (ctrace-ebpf/src/probes/conntrack.rs).

use anyhow::Context as _;
use aya::{Ebpf, programs::KProbe};

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
        let Some(early_drop) = kallsyms::find_function("early_drop")? else {
            return Ok(None);
        };
        Ok(Some(Symbols {
            early_drop,
            resolve_clash: kallsyms::find_function("nf_ct_resolve_clash")?,
            l4proto_log_invalid: kallsyms::find_function("nf_l4proto_log_invalid")?,
            ct_l4proto_log_invalid: kallsyms::find_function("nf_ct_l4proto_log_invalid")?,
            ct_delete: kallsyms::find_function("nf_ct_delete")?,
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

fn attach(ebpf: &mut Ebpf, prog: &str, function: &str) -> anyhow::Result<()> {
    let p: &mut KProbe = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the eBPF object"))?
        .try_into()?;
    p.load()
        .with_context(|| format!("the kernel refused the kprobe program {prog}"))?;
    p.attach(function, 0)
        .with_context(|| format!("cannot attach a kprobe to {function}"))?;
    Ok(())
}

pub fn attach_all(ebpf: &mut Ebpf, s: &Symbols) -> anyhow::Result<()> {
    attach(ebpf, "conntrack_early_drop", &s.early_drop)?;
    attach(ebpf, "conntrack_early_drop_ret", &s.early_drop)?;
    if let Some(f) = &s.resolve_clash {
        attach(ebpf, "conntrack_resolve_clash", f)?;
        attach(ebpf, "conntrack_resolve_clash_ret", f)?;
    }
    if let Some(f) = &s.l4proto_log_invalid {
        attach(ebpf, "conntrack_l4proto_log_invalid", f)?;
    }
    if let Some(f) = &s.ct_l4proto_log_invalid {
        attach(ebpf, "conntrack_ct_l4proto_log_invalid", f)?;
    }
    Ok(())
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
