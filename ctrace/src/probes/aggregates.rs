//! The drops the kernel counted in aggregates instead of streaming them (above `--rate-limit` per CPU and second;
//! `ctrace-ebpf/src/stream.rs`): `AGG_<parity>` per destination, `AGG_COARSE_<parity>` without it where the first
//! was full, and each CPU's current run of one key in `AGG_RUN_<parity>`. The programs count into the maps of the
//! current epoch's parity; once a second userspace moves them to the next epoch and takes the previous epoch's
//! counts out whole.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{Array, Map, MapData, PerCpuArray, PerCpuHashMap},
};
use ctrace_common::{AggKey, AggRun};

use crate::event::{self, Drop};

/// How long a program that read the old epoch may still be counting in its maps. The programs run with
/// preemption disabled for microseconds; this is three orders of magnitude more.
const GRACE: Duration = Duration::from_millis(2);

/// The epoch the programs count in now.
#[derive(Debug, Default)]
pub struct Epoch(u32);

/// Moves the programs on to the next epoch and takes every count of the previous one out of its maps (with
/// `all`, after the programs were detached: of both). Returns each aggregate as the drop its packets share
/// (destination only, no source) and how many there were.
pub fn collect(ebpf: &mut Ebpf, epoch: &mut Epoch, all: bool) -> anyhow::Result<Vec<(Drop, u64)>> {
    // The epoch whose counts are taken now (with `all`: the current one; the one before was taken already).
    let done = epoch.0;
    if !all {
        epoch.0 = epoch.0.wrapping_add(1);
        let mut current: Array<_, u32> = Array::try_from(ebpf.map_mut("AGG_EPOCH").context("AGG_EPOCH map missing")?)?;
        current.set(0, epoch.0, 0)?;
        std::thread::sleep(GRACE);
    }
    let ncpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
    let mut out = Vec::new();
    let mut add = |key: &AggKey, count: u64, coarse: bool| {
        if count > 0
            && let Some(d) = event::decode_aggregate(key, coarse)
        {
            out.push((d, count));
        }
    };
    let parities = if all { vec![0, 1] } else { vec![done & 1] };
    for parity in parities {
        for (prefix, coarse) in [("AGG_", false), ("AGG_COARSE_", true)] {
            let name = format!("{prefix}{parity}");
            let map = ebpf.map_mut(&name).with_context(|| format!("{name} map missing"))?;
            for (key, count) in take_all(map, ncpus).with_context(|| format!("cannot read {name}"))? {
                add(&key, count, coarse);
            }
        }
        // Each CPU's run of one key that had not reached the maps yet. Runs of earlier epochs were taken then.
        let name = format!("AGG_RUN_{parity}");
        let runs: PerCpuArray<_, AggRun> =
            PerCpuArray::try_from(ebpf.map(&name).with_context(|| format!("{name} map missing"))?)?;
        for run in runs.get(&0, 0)?.iter() {
            if run.epoch_tag == done.wrapping_add(1) {
                add(&run.key, run.count, false);
            }
        }
    }
    Ok(out)
}

/// Every (key, sum over CPUs) of a per-CPU hash of `AggKey -> u64`, deleted from it: by batches (Linux 5.6+), or
/// key by key where the kernel has no batch operations.
fn take_all(map: &mut Map, ncpus: usize) -> anyhow::Result<Vec<(AggKey, u64)>> {
    let Map::PerCpuHashMap(data) = map else {
        return Err(anyhow!("not a per-CPU hash map"));
    };
    match take_batches(data.fd().as_fd(), ncpus) {
        Ok(all) => return Ok(all),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => {}
        Err(e) => return Err(e.into()),
    }
    // ENOTSUPP (524) and EINVAL: batch operations are missing.
    log::debug!("no batch map operations: reading the aggregates key by key");
    let mut map: PerCpuHashMap<&mut MapData, AggKey, u64> = PerCpuHashMap::try_from(map)?;
    let keys: Vec<AggKey> = map.keys().filter_map(Result::ok).collect();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        out.push((key, map.get(&key, 0)?.iter().sum()));
        map.remove(&key)?;
    }
    Ok(out)
}

/// Entries per BPF_MAP_LOOKUP_AND_DELETE_BATCH call (at least the longest hash bucket, or the kernel says ENOSPC).
const BATCH: usize = 1024;
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn take_batches(fd: BorrowedFd<'_>, ncpus: usize) -> io::Result<Vec<(AggKey, u64)>> {
    let mut out = Vec::new();
    let mut keys = vec![AggKey::default(); BATCH];
    let mut values = vec![0u64; BATCH * ncpus];
    // A hash map's batch position is a bucket number.
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw mut token_in as u64 },
            out_batch: &raw mut token_out as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the buffers hold BATCH keys and BATCH per-CPU values of 8 bytes each; the kernel writes at most
        // `count` of them and the positions.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let n = attr.count as usize;
        for (i, key) in keys.iter().take(n).enumerate() {
            out.push((*key, values[i * ncpus..(i + 1) * ncpus].iter().sum()));
        }
        match err {
            None => {}
            // The end of the map.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}
