//! Lookups in /proc/kallsyms (text symbols only; data symbols need CONFIG_KALLSYMS_ALL).

use std::io::{BufRead as _, BufReader};

use anyhow::Context as _;

/// The [start, end) address range of function `name`, end being the next symbol's address.
/// `None` when the symbol is absent or its address is hidden (kptr_restrict).
pub fn symbol_range(name: &str) -> anyhow::Result<Option<(u64, u64)>> {
    let f = std::fs::File::open("/proc/kallsyms").context("cannot open /proc/kallsyms")?;
    find_range(BufReader::new(f).lines().map_while(Result::ok), name)
}

fn find_range(lines: impl Iterator<Item = String>, name: &str) -> anyhow::Result<Option<(u64, u64)>> {
    let mut start = None;
    for line in lines {
        let mut it = line.split_whitespace();
        let (Some(addr), Some(_kind), Some(sym)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        if let Some(s) = start {
            if addr > s {
                return Ok(Some((s, addr)));
            }
        } else if sym == name && it.next().is_none() && addr != 0 {
            start = Some(addr);
        }
    }
    Ok(None)
}

/// Whether /proc/kallsyms shows this process real addresses (kptr_restrict shows zeros to callers without
/// CAP_SYSLOG unless perf_event_paranoid is at most 1).
pub fn addresses_visible() -> bool {
    let Ok(f) = std::fs::File::open("/proc/kallsyms") else {
        return false;
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .take(16)
        .any(|l| l.split_whitespace().next().is_some_and(|a| a.chars().any(|c| c != '0')))
}

/// The address of each text symbol in `names` (exact names, in vmlinux or a loaded module); None when
/// absent or hidden (kptr_restrict shows 0).
pub fn addresses(names: &[&str]) -> anyhow::Result<Vec<Option<u64>>> {
    let f = std::fs::File::open("/proc/kallsyms").context("cannot open /proc/kallsyms")?;
    Ok(addresses_in(BufReader::new(f).lines().map_while(Result::ok), names))
}

fn addresses_in(lines: impl Iterator<Item = String>, names: &[&str]) -> Vec<Option<u64>> {
    let mut found = vec![None; names.len()];
    for line in lines {
        let mut it = line.split_whitespace();
        let (Some(addr), Some("t" | "T"), Some(sym)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if let Some(i) = names.iter().position(|n| *n == sym)
            && let Ok(addr) = u64::from_str_radix(addr, 16)
            && addr != 0
        {
            found[i] = Some(addr);
        }
    }
    found
}

/// The exact text symbol of each function in `names`: the name itself or a compiler clone of it
/// (`name.isra.0`, `name.constprop.0`), in vmlinux or a loaded module; None when absent. One pass
/// over /proc/kallsyms (it is large, and slow to read on small machines).
pub fn find_functions(names: &[&str]) -> anyhow::Result<Vec<Option<String>>> {
    let f = std::fs::File::open("/proc/kallsyms").context("cannot open /proc/kallsyms")?;
    Ok(find_functions_in(
        BufReader::new(f).lines().map_while(Result::ok),
        names,
    ))
}

fn find_functions_in(lines: impl Iterator<Item = String>, names: &[&str]) -> Vec<Option<String>> {
    let mut exact: Vec<Option<String>> = vec![None; names.len()];
    let mut clone: Vec<Option<String>> = vec![None; names.len()];
    for line in lines {
        let mut it = line.split_whitespace();
        let (Some(_), Some(kind), Some(sym)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if !matches!(kind, "t" | "T") {
            continue;
        }
        let base = sym.split('.').next().unwrap_or(sym);
        for (i, name) in names.iter().enumerate() {
            if base != *name {
                continue;
            }
            if sym == *name {
                exact[i] = Some(sym.to_owned());
            } else if clone[i].is_none() && !sym.ends_with(".cold") {
                // Cold parts (`name.cold`) are not entry points.
                clone[i] = Some(sym.to_owned());
            }
        }
    }
    exact.into_iter().zip(clone).map(|(e, c)| e.or(c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_ends_at_next_higher_symbol() {
        let lines = [
            "ffffffff81000000 T a",
            "ffffffff81000100 T nf_hook_slow",
            "ffffffff81000100 t alias",
            "ffffffff81000180 T next",
        ]
        .map(String::from);
        assert_eq!(
            find_range(lines.into_iter(), "nf_hook_slow").unwrap(),
            Some((0xffffffff81000100, 0xffffffff81000180))
        );
    }

    #[test]
    fn finds_exact_names_then_clones_never_cold_parts() {
        let lines = || {
            [
                "ffffffff81000000 t init_conntrack.cold",
                "ffffffff81000100 t init_conntrack.isra.0\t[nf_conntrack]",
                "ffffffff81000200 t early_drop\t[nf_conntrack]",
                "ffffffff81000300 d early_drop_data",
            ]
            .map(String::from)
            .into_iter()
        };
        let found = find_functions_in(lines(), &["early_drop", "init_conntrack", "nf_ct_resolve_clash"]);
        assert_eq!(
            found,
            vec![
                Some("early_drop".to_owned()),
                Some("init_conntrack.isra.0".to_owned()),
                None
            ]
        );
    }

    #[test]
    fn hidden_addresses_are_absent() {
        let lines = ["0000000000000000 T nf_hook_slow", "0000000000000000 T next"].map(String::from);
        assert_eq!(find_range(lines.into_iter(), "nf_hook_slow").unwrap(), None);
    }

    #[test]
    fn finds_addresses_in_modules_too() {
        let lines = [
            "ffffffff81000000 T _stext",
            "ffffffffc0a01230 t ipv4_conntrack_local\t[nf_conntrack]",
            "0000000000000000 t ipv6_conntrack_local\t[nf_conntrack]",
        ]
        .map(String::from);
        assert_eq!(
            addresses_in(lines.into_iter(), &["ipv4_conntrack_local", "ipv6_conntrack_local"]),
            [Some(0xffffffffc0a01230), None]
        );
    }
}
