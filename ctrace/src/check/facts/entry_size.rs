//! The memory one conntrack entry takes: sizeof(struct nf_conn) from BTF (vmlinux and nf_conntrack's split BTF),
//! or the nf_conntrack slab's object size from /proc/slabinfo, which rounds entries up to cache lines.

use crate::{
    btf::Btf,
    check::{Ctx, clean},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntrySize {
    /// sizeof(struct nf_conn) from BTF (which files), and the slab's object size when /proc/slabinfo is readable
    /// (the slab rounds entries up to cache lines).
    Btf(u32, String, Option<u32>),
    /// The `nf_conntrack` slab's object size from /proc/slabinfo.
    Slab(u32),
    Unknown,
}

impl EntrySize {
    pub fn bytes(&self) -> Option<u64> {
        match self {
            EntrySize::Btf(n, _, slab) => Some(u64::from((*n).max(slab.unwrap_or(0)))),
            EntrySize::Slab(n) => Some(u64::from(*n)),
            EntrySize::Unknown => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            EntrySize::Btf(n, from, None) => format!("{n} bytes per entry (sizeof(struct nf_conn) from {from})"),
            EntrySize::Btf(n, from, Some(slab)) => format!(
                "{} bytes per entry (sizeof(struct nf_conn) = {n} from {from}; the nf_conntrack slab allocates {slab}-byte objects, /proc/slabinfo)",
                (*n).max(*slab)
            ),
            EntrySize::Slab(n) => format!("{n} bytes per entry (nf_conntrack slab object size, /proc/slabinfo)"),
            EntrySize::Unknown => "entry size unknown (no readable BTF or /proc/slabinfo)".to_owned(),
        }
    }
}

/// The `nf_conntrack` slab's object size (older kernels name the cache `nf_conntrack_<hex>` per netns).
fn slab_objsize(slabinfo: &str) -> Option<u32> {
    for line in slabinfo.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = cols.first() else { continue };
        let per_netns = name
            .strip_prefix("nf_conntrack_")
            .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit()));
        if (*name == "nf_conntrack" || per_netns)
            && let Some(n) = cols.get(3).and_then(|s| s.parse().ok())
        {
            return Some(n);
        }
    }
    None
}

pub(super) fn entry_size(ctx: &mut Ctx) -> EntrySize {
    let vmlinux = "/sys/kernel/btf/vmlinux";
    if ctx.fs.exists(vmlinux) {
        let split = "/sys/kernel/btf/nf_conntrack";
        let read = |abs: &str| {
            ctx.fs.read_bytes(abs).map_err(|e| crate::btf::BtfError::Read {
                path: abs.to_owned(),
                source: std::io::Error::other(e.reason()),
            })
        };
        let btf = read(vmlinux).and_then(|data| Btf::parse(&data, None)).and_then(|b| {
            if ctx.fs.exists(split) {
                read(split)
                    .and_then(|data| Btf::parse(&data, Some(&b)))
                    .map(|s| (s, format!("{vmlinux} + {split}")))
            } else {
                Ok((b, vmlinux.to_owned()))
            }
        });
        match btf.and_then(|(b, from)| b.struct_size("nf_conn").map(|n| (n, from))) {
            Ok((n, from)) if n > 0 => {
                // Read quietly: without root /proc/slabinfo is not readable, and BTF already answered.
                let slab = ctx.fs.read("/proc/slabinfo").ok().as_deref().and_then(slab_objsize);
                return EntrySize::Btf(n, from, slab);
            }
            Ok(_) => {}
            Err(e) => ctx.unreadable(vmlinux, clean(&e.to_string())),
        }
    }
    if let Some(n) = ctx.read("/proc/slabinfo").as_deref().and_then(slab_objsize) {
        return EntrySize::Slab(n);
    }
    EntrySize::Unknown
}
