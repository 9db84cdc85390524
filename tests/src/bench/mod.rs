//! The measurements behind `cargo xtask bench`: each workload runs in rounds, and every round measures each
//! condition (nothing attached, the bpftrace reference, ctrace) once, in an order that changes between rounds
//! (off, on, on, off, ...; see `round_order`), so that drift on a shared machine falls on all conditions alike. One JSON line per
//! measurement goes to stdout; `cargo xtask bench` turns them into medians and ratios. Runs on the host and, built
//! static, in VM guests.

pub mod tracer;
pub mod traffic;
pub mod workload;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use serde::Serialize;

use tracer::Running;
use traffic::pause;
use workload::{Counts, CtraceTotals, Stage, Truth, Workload};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Condition {
    /// Nothing attached.
    Off,
    /// A bpftrace one-liner that only counts netfilter drops by netns.
    Bpftrace,
    /// `ctrace run --json`.
    Ctrace,
}

/// Everything one benchmark run needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub ctrace: PathBuf,
    pub workloads: Vec<Workload>,
    pub rounds: u32,
    pub counts: Counts,
    /// The mode ctrace must pick (`tracepoint`, `kprobe`); any when None.
    pub expect_mode: Option<String>,
    /// Read the tracers' BPF program run times (the caller enabled `kernel.bpf_stats_enabled`).
    pub bpf_stats: bool,
    /// Only these conditions (all when empty).
    pub conditions: Vec<Condition>,
}

/// One measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub workload: Workload,
    pub condition: Condition,
    pub round: u32,
    /// Its place in the round (0 first).
    pub position: usize,
    pub threads: usize,
    pub packets: u64,
    pub sent: u64,
    pub failed: u64,
    pub seconds: f64,
    /// Datagrams per second of the timed burst.
    pub rate: f64,
    /// The senders' CPU time, and datagrams per second of it.
    pub cpu_seconds: f64,
    pub cpu_rate: f64,
    pub truth: Truth,
    pub tracer: Option<TracerSample>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TracerSample {
    pub attach_s: f64,
    pub detach_s: f64,
    /// CPU seconds from the timed burst's start until the tracer was idle again.
    pub cpu_s: f64,
    pub peak_rss_kib: u64,
    /// Run time and runs of the tracer's BPF programs during the timed burst (with `--bpf-stats`).
    pub bpf: Option<tracer::BpfStats>,
    /// ctrace: the mode it picked; whether its eviction probe was armed during the burst.
    pub mode: Option<String>,
    pub eviction_probe: Option<bool>,
    /// ctrace's totals for the netns (None for bpftrace).
    pub ctrace: Option<CtraceTotals>,
    /// bpftrace's count for the netns (None for ctrace).
    pub bpftrace: Option<u64>,
    /// None when the tracer's totals equal the truth.
    pub mismatch: Option<String>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether SIGINT, SIGTERM or SIGHUP arrived: bursts and waits end early, and the run unwinds through its guards
/// (netns deleted, nf_conntrack_max restored, tracers stopped).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Turns SIGINT, SIGTERM and SIGHUP into `interrupted()`.
pub fn catch_signals() -> anyhow::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("cannot handle {sig}"))?;
    }
    Ok(())
}

/// The conditions of round `round`, in its order. Two conditions alternate (off, on, on, off, ...); three run in
/// each of their six orders in turn, so that over six rounds every condition is measured twice in each place of a
/// round and after each other one equally often: an effect of the place in the round falls on all alike.
pub fn round_order(conditions: &[Condition], round: u32) -> Vec<Condition> {
    const ORDERS: [[usize; 3]; 6] = [[0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 2, 1], [2, 0, 1], [1, 0, 2]];
    if conditions.len() == 3 {
        return ORDERS[round as usize % 6].iter().map(|&i| conditions[i]).collect();
    }
    let mut order = conditions.to_vec();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// Runs every workload's rounds and hands each sample to `emit` as soon as it is measured. With a `reference`,
/// every round also measures the bpftrace one-liner.
pub fn run(config: &Config, reference: Option<&Reference>, mut emit: impl FnMut(&Sample)) -> anyhow::Result<()> {
    let mut conditions = vec![Condition::Off, Condition::Ctrace];
    if reference.is_some() {
        conditions.push(Condition::Bpftrace);
    }
    conditions.retain(|c| config.conditions.is_empty() || config.conditions.contains(c));
    for &workload in &config.workloads {
        let stage = Stage::new(workload, config.counts)?;
        for round in 0..config.rounds {
            for (position, condition) in round_order(&conditions, round).into_iter().enumerate() {
                if interrupted() {
                    bail!("interrupted");
                }
                let what = || format!("{} with {condition:?}, round {round}", workload.name());
                let sample = match measure(config, &stage, condition, reference, round, position) {
                    // Debian's bpftrace 0.17 sometimes never exits after SIGINT (seen twice in about 200 runs,
                    // under load): the reference gets one more try, and the retry is said.
                    Err(e) if condition == Condition::Bpftrace && !interrupted() => {
                        eprintln!("ctrace-bench: {}: {e:#}; measuring it again", what());
                        measure(config, &stage, condition, reference, round, position).with_context(what)?
                    }
                    other => other.with_context(what)?,
                };
                emit(&sample);
            }
        }
    }
    Ok(())
}

/// Longest wait for a tracer to consume what a burst produced.
const SETTLE_MAX: Duration = Duration::from_secs(10);
/// Longest wait for ctrace to arm its eviction probe once the table is full (it looks once a second).
const ARM_TIMEOUT: Duration = Duration::from_secs(5);

fn measure(
    config: &Config,
    stage: &Stage,
    condition: Condition,
    reference: Option<&Reference>,
    round: u32,
    position: usize,
) -> anyhow::Result<Sample> {
    let mut running = match condition {
        Condition::Off => None,
        Condition::Ctrace => Some(Running::start(
            &config.ctrace,
            &["run", "--json"],
            Signal::SIGTERM,
            |l| l.contains(r#""event":"mode""#),
        )?),
        Condition::Bpftrace => {
            let r = reference.context("no bpftrace")?;
            Some(Running::start(&r.bin, &["-e", &r.program], Signal::SIGINT, |l| {
                l.trim() == "attached"
            })?)
        }
    };
    // The table is emptied once the tracer runs (emptying it drops nothing), and every condition then waits as
    // long before its traffic: what the flush leaves to do falls on all alike.
    stage.reset()?;
    pause(Duration::from_millis(300));
    let before = stage.truth()?;
    let prefill = stage.prefill()?;
    if let Some(p) = &prefill {
        traffic::send(p)?;
    }
    let mode = match (&running, condition) {
        (Some(r), Condition::Ctrace) => ctrace_mode(&r.output),
        _ => None,
    };
    if let (Some(want), Some(got)) = (&config.expect_mode, &mode)
        && want != got
    {
        bail!("ctrace attached in {got} mode, this run expects {want} mode");
    }
    let mut eviction_probe = None;
    if let Some(r) = running.as_mut()
        && condition == Condition::Ctrace
    {
        let armed = |l: &str| l.contains("listing each early_drop eviction");
        eviction_probe = Some(if mode.as_deref() == Some("kprobe") && prefill.is_some() {
            r.wait_for(ARM_TIMEOUT, armed)?
        } else {
            r.output.iter().any(|l| armed(l))
        });
    }
    pause(Duration::from_millis(200));
    let burst = stage.burst_after(prefill.as_ref());
    let cpu_before = running.as_ref().map(|r| tracer::cpu_seconds(r.pid())).transpose()?;
    let bpf_stats = |r: &Running| config.bpf_stats.then(|| tracer::BpfStats::of(r.pid())).transpose();
    let bpf_before = running.as_ref().map(bpf_stats).transpose()?.flatten();
    let sent = traffic::send(&burst)?;
    let mut bpf = None;
    let tracer = match running {
        Some(mut r) => {
            let cpu_s = r.settle(SETTLE_MAX)? - cpu_before.unwrap_or(0.0);
            bpf = bpf_stats(&r)?
                .zip(bpf_before)
                .map(|(after, before)| after.since(&before));
            Some(r.stop(cpu_s)?)
        }
        None => None,
    };
    let truth = stage.truth()?.since(&before);
    let inode = stage.ns.inode();
    let tracer = tracer.map(|t| {
        let (ctrace, bpftrace, mismatch) = match condition {
            Condition::Ctrace => {
                let totals = CtraceTotals::from_output(&t.output, inode)?;
                let mismatch = totals.mismatch(&truth);
                (Some(totals), None, mismatch)
            }
            _ => {
                let n = workload::bpftrace_count(&t.output, inode);
                let want = truth.netfilter_drops();
                (
                    None,
                    Some(n),
                    (n != want).then(|| format!("bpftrace counted {n}, netfilter dropped {want}")),
                )
            }
        };
        anyhow::Ok(TracerSample {
            attach_s: t.attach_s,
            detach_s: t.detach_s,
            cpu_s: t.cpu_s,
            peak_rss_kib: t.peak_rss_kib,
            bpf,
            mode: mode.clone(),
            eviction_probe,
            ctrace,
            bpftrace,
            mismatch,
        })
    });
    Ok(Sample {
        workload: stage.workload,
        condition,
        round,
        position,
        threads: burst.threads,
        packets: sent.packets(),
        sent: sent.sent,
        failed: sent.failed,
        seconds: sent.seconds,
        rate: sent.rate(),
        cpu_seconds: sent.cpu_seconds,
        cpu_rate: sent.cpu_rate(),
        truth,
        tracer: tracer.transpose()?,
    })
}

/// The mode in ctrace's `mode` event.
fn ctrace_mode(lines: &[String]) -> Option<String> {
    lines.iter().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["event"] == "mode").then(|| v["mode"].as_str().map(String::from))?
    })
}

/// The bpftrace reference: Debian's bpftrace with a one-liner that counts the packets netfilter drops, by netns.
pub struct Reference {
    bin: PathBuf,
    pub program: String,
    _tracefs: Option<TracefsMount>,
}

const TRACEFS: &str = "/sys/kernel/tracing";

impl Reference {
    /// Mounts tracefs if it is not (bpftrace reads tracepoint formats there) and builds the program.
    pub fn prepare(bin: &std::path::Path) -> anyhow::Result<Reference> {
        let mount = TracefsMount::ensure()?;
        let format_path = format!("{TRACEFS}/events/skb/kfree_skb/format");
        let format = std::fs::read_to_string(&format_path).with_context(|| format!("cannot read {format_path}"))?;
        let nf_drop = netfilter_drop_value(&format)
            .with_context(|| format!("{format_path} names no NETFILTER_DROP drop reason (kernel before 5.17?)"))?;
        Ok(Reference {
            bin: bin.to_path_buf(),
            program: bpftrace_program(nf_drop),
            _tracefs: mount,
        })
    }
}

/// The one-liner: count netfilter drops by the netns of the packet's device, or of its socket when it has no
/// device yet (locally sent packets at LOCAL_OUT), as ctrace does.
pub fn bpftrace_program(netfilter_drop: u32) -> String {
    format!(
        "BEGIN {{ printf(\"attached\\n\"); }} \
tracepoint:skb:kfree_skb /args->reason == {netfilter_drop}/ {{ \
$skb = (struct sk_buff *)args->skbaddr; \
@drops[$skb->dev != 0 ? $skb->dev->nd_net.net->ns.inum : $skb->sk->__sk_common.skc_net.net->ns.inum] = count(); }}"
    )
}

/// The value of SKB_DROP_REASON_NETFILTER_DROP in the kfree_skb format's `__print_symbolic` list.
pub fn netfilter_drop_value(format: &str) -> Option<u32> {
    let at = format.find("\"NETFILTER_DROP\"")?;
    let open = format[..at].rfind('{')?;
    format[open + 1..at].trim().trim_end_matches(',').trim().parse().ok()
}

/// tracefs, mounted by the benchmark and unmounted when it ends (None when it was mounted already).
struct TracefsMount;

impl TracefsMount {
    fn ensure() -> anyhow::Result<Option<TracefsMount>> {
        if std::path::Path::new(TRACEFS).join("events").is_dir() {
            return Ok(None);
        }
        nix::mount::mount(
            Some("nodev"),
            TRACEFS,
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("cannot mount tracefs on {TRACEFS} (bpftrace needs it)"))?;
        Ok(Some(TracefsMount))
    }
}

impl Drop for TracefsMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount(TRACEFS) {
            eprintln!("could not unmount {TRACEFS}, which the benchmark mounted: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_their_order() {
        let c = [Condition::Off, Condition::Ctrace];
        let order: Vec<Condition> = (0..2).flat_map(|r| round_order(&c, r)).collect();
        assert_eq!(
            order,
            [Condition::Off, Condition::Ctrace, Condition::Ctrace, Condition::Off]
        );
        // Three conditions: each in each place twice over six rounds.
        let c = [Condition::Off, Condition::Ctrace, Condition::Bpftrace];
        for condition in c {
            for place in 0..3 {
                let n = (0..6).filter(|&r| round_order(&c, r)[place] == condition).count();
                assert_eq!(n, 2, "{condition:?} in place {place}");
            }
        }
    }

    #[test]
    fn netfilter_drop_is_read_from_the_format() {
        let format = r#"print fmt: "skbaddr=%p reason: %s", REC->skbaddr, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 11, "NETFILTER_DROP" }, { 12, "OTHER" })"#;
        assert_eq!(netfilter_drop_value(format), Some(11));
        assert_eq!(netfilter_drop_value("print fmt: \"\""), None);
    }
}
