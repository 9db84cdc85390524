//! Bounded UDP bursts for the benchmark: sender threads pinned one per CPU inside a netns, started together by a
//! barrier, timed from the barrier to the last thread's end. Every datagram goes to loopback.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use crate::{
    SysctlGuard, threads,
    traffic::{MAX_FLOWS, flow_destination},
};

/// Where each datagram of a burst goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flows {
    /// The same destination for every datagram of a thread (one conntrack entry, freed and made again when a rule
    /// drops the packet).
    Same,
    /// A new destination for every datagram: a new conntrack entry each.
    Distinct,
}

/// One burst: `count` datagrams split over `threads` pinned senders.
#[derive(Clone, Debug)]
pub struct Burst {
    pub netns: String,
    pub threads: usize,
    pub count: u32,
    pub port: u16,
    pub flows: Flows,
    /// The first flow index (`Distinct`): bursts that must not reuse entries still in the table start past them.
    pub first: u32,
    /// Lower the global nf_conntrack_max to this for the burst only (restored on every exit path but SIGKILL).
    pub lower_global_max: Option<u32>,
}

/// What a burst did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// Sends that succeeded.
    pub sent: u64,
    /// Sends that returned an error (EPERM: netfilter dropped the datagram on its way out).
    pub failed: u64,
    /// From the barrier to the end of the last thread.
    pub seconds: f64,
    /// CPU time the sender threads used (CLOCK_THREAD_CPUTIME_ID, summed): everything done in their context,
    /// the whole netfilter path and the tracer's program included, and nothing of other processes on a shared
    /// machine.
    pub cpu_seconds: f64,
}

impl Sent {
    pub fn packets(&self) -> u64 {
        self.sent + self.failed
    }

    /// Datagrams per second, successful or not.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.packets() as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Datagrams per second of sender CPU time: the rate a sender with a CPU to itself would reach.
    pub fn cpu_rate(&self) -> f64 {
        if self.cpu_seconds > 0.0 {
            self.packets() as f64 / self.cpu_seconds
        } else {
            0.0
        }
    }
}

/// This thread's CPU time in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

const MAX_NF_CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// Sends the burst and returns what happened. Stops early (and still restores the limit) when the benchmark is
/// interrupted.
pub fn send(burst: &Burst) -> anyhow::Result<Sent> {
    ensure!(burst.threads >= 1, "a burst needs at least one sender thread");
    let per_thread = burst.count / burst.threads as u32;
    ensure!(
        burst.flows == Flows::Same || burst.first.saturating_add(burst.count) <= MAX_FLOWS,
        "flow indexes past {MAX_FLOWS}"
    );
    // In the init netns (nf_conntrack_max is read-only elsewhere); the senders enter the bench netns.
    let _max = match burst.lower_global_max {
        Some(max) => Some(SysctlGuard::set(MAX_NF_CONNTRACK_MAX, &max.to_string())?),
        None => None,
    };
    let (first, port, flows) = (burst.first, burst.port, burst.flows);
    let results = threads::on_cpus(burst.threads, &burst.netns, move |i, barrier| {
        let sock = UdpSocket::bind("127.0.0.1:0").context("could not bind a UDP socket to 127.0.0.1")?;
        let base = first + i as u32 * per_thread;
        let same = flow_destination(base, port);
        barrier.wait();
        let start = Instant::now();
        let cpu_start = thread_cpu_seconds();
        let (mut sent, mut failed) = (0u64, 0u64);
        for k in 0..per_thread {
            let dst = match flows {
                Flows::Same => same,
                Flows::Distinct => flow_destination(base + k, port),
            };
            match sock.send_to(b"x", dst) {
                Ok(_) => sent += 1,
                Err(_) => failed += 1,
            }
            if k % 4096 == 0 && super::interrupted() {
                break;
            }
        }
        Ok((start, Instant::now(), sent, failed, thread_cpu_seconds() - cpu_start))
    })?;
    let start = results.iter().map(|r| r.0).min().context("no sender ran")?;
    let end = results.iter().map(|r| r.1).max().context("no sender ran")?;
    Ok(Sent {
        sent: results.iter().map(|r| r.2).sum(),
        failed: results.iter().map(|r| r.3).sum(),
        seconds: end.duration_since(start).as_secs_f64(),
        cpu_seconds: results.iter().map(|r| r.4).sum(),
    })
}

/// The global nf_conntrack_max now.
pub fn global_max() -> anyhow::Result<u32> {
    let text =
        std::fs::read_to_string(MAX_NF_CONNTRACK_MAX).with_context(|| format!("cannot read {MAX_NF_CONNTRACK_MAX}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("{MAX_NF_CONNTRACK_MAX} holds {text:?}"))
}

/// A pause that ends early when the benchmark is interrupted.
pub fn pause(d: Duration) {
    let end = Instant::now() + d;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        if super::interrupted() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}
