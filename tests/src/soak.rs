//! The soak's workload (`tests/tests/soak.rs`, in a guest whose nf_conntrack is a module): minute after minute, two
//! floods at once on CPUs of their own, netns churn, then a firewall restart that unloads and reloads
//! nf_conntrack. Each minute returns its truth, which ctrace did not compute: the DROP rules' packet counters and
//! the kernel's conntrack counter deltas of that module instance (a reload zeroes them, so each instance is read
//! before it goes).

use std::{
    fs,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use ctrace::check::proc_path;

use crate::{
    Counters, Ctrace, TestNetns,
    guest::{self, IptablesRule, MAX_KEY, Unloaded},
    rule_packets, run, threads, traffic,
};

/// The limit an admin raised before each firewall restart; the reload puts the default back (the trap: one
/// `sysctl_reset` per minute).
const RAISED_MAX: &str = "262144";
/// The limit while the floods run: the table is full at once, new flows evict or are dropped.
const FLOOD_MAX: &str = "256";
const RULE_PORT: u16 = 7;
const FULL_PORT: u16 = 9;
const RULE_COMMENT: &str = "soak-rule";
const CHURN_COMMENT: &str = "soak-churn";
/// Datagrams sent in each churned netns (its rule drops them).
const CHURN_SENDS: u32 = 2;
/// Flows sent between two looks at the clock. `traffic::MAX_FLOWS` and the rule flood's 65536 destinations are
/// multiples of it.
const CHUNK: u32 = 512;
const RULE_DESTINATIONS: u32 = 1 << 16;
/// ctrace snapshots the sysctls and reads the counters about once a second.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(2);
/// From `modprobe nf_conntrack` to ctrace's `reattached` (BTF parse and verification: slow under emulation).
const REATTACH_TIMEOUT: Duration = Duration::from_secs(90);

/// A minute's work.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// How long the floods last, and what each sends in that time (in chunks of `CHUNK`, evenly spread).
    pub floods: Duration,
    pub rule_datagrams: u32,
    pub new_flows: u32,
    /// How long netns are made and deleted.
    pub churn: Duration,
}

/// What the workload did, by its own truth.
#[derive(Clone, Copy, Debug, Default)]
pub struct Truth {
    /// The kernel's conntrack counter deltas in the guest's initial netns, summed over module instances.
    pub kernel: Counters,
    /// Packets the soak's DROP rule dropped (its packet counter).
    pub rule: u64,
    /// Datagrams sent at the rule, and how many the kernel refused (the rule's, and table_full's while the table
    /// was full: conntrack runs first).
    pub rule_sends: u64,
    pub rule_refused: u64,
    /// New flows sent into the full table, and how many the kernel refused.
    pub flows: u64,
    pub flows_refused: u64,
    /// Netns made and deleted, their rules' packets, their refused sends.
    pub churn_netns: u64,
    pub churn_rule: u64,
    pub churn_refused: u64,
}

impl Truth {
    pub fn add(&mut self, o: &Truth) {
        self.kernel = self.kernel.plus(&o.kernel);
        self.rule += o.rule;
        self.rule_sends += o.rule_sends;
        self.rule_refused += o.rule_refused;
        self.flows += o.flows;
        self.flows_refused += o.flows_refused;
        self.churn_netns += o.churn_netns;
        self.churn_rule += o.churn_rule;
        self.churn_refused += o.churn_refused;
    }

    /// Every packet a rule dropped: the soak rule's and the churned netns's.
    pub fn netfilter_rule(&self) -> u64 {
        self.rule + self.churn_rule
    }
}

/// The soak's workload; it remembers which flows it used (new flows need new destinations).
#[derive(Default)]
pub struct Workload {
    next_flow: u32,
    minutes: u32,
}

impl Workload {
    /// One minute's work: the firewall up with a DROP rule, the floods, the churn, nf_conntrack_max raised, then
    /// the firewall restart. Returns its truth once ctrace has reattached to the new module.
    pub fn minute(&mut self, plan: Plan, ctrace: &mut Ctrace) -> anyhow::Result<Truth> {
        let track = guest::track_output()?;
        let rule = IptablesRule::add(
            "iptables",
            &[
                "-I",
                "OUTPUT",
                "-p",
                "udp",
                "--dport",
                &RULE_PORT.to_string(),
                "-m",
                "comment",
                "--comment",
                RULE_COMMENT,
                "-j",
                "DROP",
            ],
        )?;
        let before = Counters::read()?;
        let mut truth = self.floods(&plan)?;
        let (netns, churn_rule, churn_refused) = churn(self.minutes, plan.churn)?;
        (truth.churn_netns, truth.churn_rule, truth.churn_refused) = (netns, churn_rule, churn_refused);
        let raised = RaisedMax::set()?;
        std::thread::sleep(SNAPSHOT_WAIT);
        truth.kernel = Counters::read()?.since(&before);
        let listing = run(&["iptables", "-w", "-vnxL", "OUTPUT"])?;
        truth.rule = rule_packets(&listing, RULE_COMMENT).with_context(|| format!("no soak rule in:\n{listing}"))?;
        drop(rule);
        drop(track);
        restart_firewall(ctrace)?;
        drop(raised);
        self.minutes += 1;
        Ok(truth)
    }

    /// Two floods at once, each on a CPU of its own: datagrams the soak rule drops, and new flows while
    /// nf_conntrack_max is lowered (the rule flood's packets meet the full table too).
    fn floods(&mut self, plan: &Plan) -> anyhow::Result<Truth> {
        let cpus = threads::cpus()?;
        ensure!(cpus.len() >= 2, "the soak needs 2 CPUs, it may use {}", cpus.len());
        let first = self.next_flow;
        let _max = crate::SysctlGuard::set(&proc_path(MAX_KEY), FLOOD_MAX)?;
        let (time, datagrams, flows) = (plan.floods, plan.rule_datagrams, plan.new_flows);
        let rule = pinned(cpus[0], move || flood(time, datagrams, 0, RULE_DESTINATIONS, RULE_PORT));
        let full = pinned(cpus[1], move || {
            flood(time, flows, first, traffic::MAX_FLOWS, FULL_PORT)
        });
        let joined =
            |h: JoinHandle<anyhow::Result<Flood>>| h.join().map_err(|_| anyhow::anyhow!("a flood panicked"))?;
        let (rule, full) = (joined(rule)?, joined(full)?);
        self.next_flow = (first + full.flows) % traffic::MAX_FLOWS;
        Ok(Truth {
            rule_sends: rule.sent,
            rule_refused: rule.refused,
            flows: full.sent,
            flows_refused: full.refused,
            ..Truth::default()
        })
    }
}

#[derive(Default)]
struct Flood {
    flows: u32,
    sent: u64,
    refused: u64,
}

/// `count` datagrams (rounded up to whole chunks) to `flow_destination(i, port)`, i from `first` on (wrapping at
/// `wrap`), in chunks of `CHUNK` spread evenly over `time`. Paced, not as fast as the CPU goes: two emulated
/// vCPUs sending flat out starved the guest's RCU kthreads (a soft lockup report, seen once on 6.1 under TCG).
fn flood(time: Duration, count: u32, first: u32, wrap: u32, port: u16) -> anyhow::Result<Flood> {
    let start = Instant::now();
    let chunks = count.div_ceil(CHUNK).max(1);
    let mut f = Flood::default();
    for chunk in 0..chunks {
        if let Some(wait) = (start + time * chunk / chunks).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let sends = traffic::udp_flows((first + f.flows) % wrap, CHUNK, port)?;
        f.flows += CHUNK;
        f.sent += u64::from(CHUNK);
        f.refused += u64::from(sends.failed);
    }
    Ok(f)
}

fn pinned<T: Send + 'static>(
    cpu: usize,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> JoinHandle<anyhow::Result<T>> {
    std::thread::spawn(move || {
        threads::pin_to(cpu)?;
        f()
    })
}

/// Netns made and deleted one after another until `time` has passed, each with a DROP rule for the datagrams
/// sent in it: (netns, the rules' packets, sends refused).
fn churn(minute: u32, time: Duration) -> anyhow::Result<(u64, u64, u64)> {
    let deadline = Instant::now() + time;
    let (mut netns, mut packets, mut refused) = (0, 0, 0);
    while Instant::now() < deadline {
        let ns = TestNetns::bare(&format!("churn-{minute}-{netns}"))?;
        ns.drop_udp_to(RULE_PORT, CHURN_COMMENT)?;
        let (_, failed) = ns.udp_flows(0, CHURN_SENDS, RULE_PORT)?;
        packets += ns.rule_packets("iptables", "filter", "OUTPUT", CHURN_COMMENT)?;
        refused += u64::from(failed);
        netns += 1;
    }
    Ok((netns, packets, refused))
}

/// The firewall stopped (xt_conntrack, which holds nf_conntrack, unloaded), nf_conntrack unloaded and loaded
/// again, the firewall's module back: what `service iptables restart` does to a host. Returns once ctrace has
/// attached its probes to the new module.
fn restart_firewall(ctrace: &mut Ctrace) -> anyhow::Result<()> {
    {
        let _stopped = Unloaded::modules(&["xt_conntrack"])?;
        guest::reload_conntrack()?;
    }
    let reattached = ctrace.wait_for(REATTACH_TIMEOUT, |e| e["event"] == "reattached")?;
    ensure!(
        reattached.is_some(),
        "ctrace did not reattach within {REATTACH_TIMEOUT:?} of the reload"
    );
    Ok(())
}

/// nf_conntrack_max raised, as an admin does; the reload that follows puts the default back (the trap under
/// test). On drop, a limit still raised (no reload happened) is put back.
struct RaisedMax {
    old: String,
}

impl RaisedMax {
    fn set() -> anyhow::Result<RaisedMax> {
        let old = guest::sysctl(MAX_KEY)?;
        fs::write(proc_path(MAX_KEY), RAISED_MAX).with_context(|| format!("cannot raise {MAX_KEY}"))?;
        Ok(RaisedMax { old })
    }
}

impl Drop for RaisedMax {
    fn drop(&mut self) {
        if guest::sysctl(MAX_KEY).is_ok_and(|v| v == RAISED_MAX)
            && let Err(err) = fs::write(proc_path(MAX_KEY), &self.old)
        {
            eprintln!("FAILED TO RESTORE {MAX_KEY} to {}: {err}", self.old);
        }
    }
}
