//! The kernel's BPF objects as bpftool lists them: the truth about what ctrace leaves attached (`prog`, `link`,
//! `map` ids before, during and after a run).

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::Value;

/// The ids of the BPF objects of one kind (`prog`, `link`, `map`) the kernel has now, from `bpftool KIND show`.
pub fn ids(kind: &str) -> anyhow::Result<BTreeSet<u64>> {
    let out = Command::new("bpftool")
        .args([kind, "show", "--json"])
        .output()
        .context("cannot run bpftool: `cargo xtask test` installs Debian's bpftool package (guests get a copy)")?;
    ensure!(
        out.status.success(),
        "bpftool {kind} show failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // bpftool prints nothing at all (not `[]`) on some versions when there is no object.
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|o| o["id"].as_u64()).collect())
        .unwrap_or_default())
}

/// The ids of `kind` the kernel has now that are not in `before`.
pub fn new_since(kind: &str, before: &BTreeSet<u64>) -> anyhow::Result<BTreeSet<u64>> {
    Ok(ids(kind)?.difference(before).copied().collect())
}

/// Waits until none of `ids` is left among the kernel's objects of `kind` (their release can lag the owner's exit)
/// and returns those still there after `timeout`.
pub fn gone_within(kind: &str, of: &BTreeSet<u64>, timeout: Duration) -> anyhow::Result<BTreeSet<u64>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: BTreeSet<u64> = ids(kind)?.intersection(of).copied().collect();
        if left.is_empty() || Instant::now() > deadline {
            return Ok(left);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
