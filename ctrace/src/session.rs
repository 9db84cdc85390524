//! `ctrace run`: load, stream events to the output, poll the kernel counters each second, stop on
//! Ctrl-C / SIGTERM / --duration / the caller's signal, detach, print the summary.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ctrace_common::Reason;
use time::OffsetDateTime;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    aggregate::{Admit, AggKey, AggValue, RateLimiter},
    cli::RunArgs,
    ctstat::{CounterDelta, CtStats},
    event,
    netns::{self, Registry},
    output::{DropContext, Output},
    probes::{
        self,
        tracepoint::{KernelFilters, Tracer},
    },
    summary::{NetnsSummary, Summary, Tally},
};

/// Converts `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) to wall-clock time.
struct Clock {
    mono_ns: i128,
    wall: OffsetDateTime,
}

impl Clock {
    fn now() -> Clock {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Clock {
            mono_ns: ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128,
            wall: OffsetDateTime::now_utc(),
        }
    }

    fn wall(&self, mono_ns: u64) -> OffsetDateTime {
        let delta = mono_ns as i128 - self.mono_ns;
        self.wall + time::Duration::nanoseconds(delta as i64)
    }
}

/// Counter state of the netns ctrace watches.
struct Watched {
    /// Counters at start (or zero for a netns that appeared later).
    first: HashMap<u32, CtStats>,
    last: HashMap<u32, CtStats>,
}

/// Lets an embedding caller (the demo) know when probes are attached and stop the session.
#[derive(Default)]
pub struct Hooks {
    pub stop: Option<watch::Receiver<bool>>,
    pub ready: Option<tokio::sync::oneshot::Sender<()>>,
}

pub async fn run(args: RunArgs, mut out: Output, hooks: Hooks) -> anyhow::Result<Summary> {
    let Hooks { mut stop, ready } = hooks;
    let mut registry = Registry::scan();
    let netns_filter = match &args.netns {
        Some(spec) => Some(registry.resolve(spec).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let wanted = |n: u32| netns_filter.is_none_or(|f| f == n);
    let flow_filtered = args.proto.is_some() || args.port.is_some() || args.host.is_some();
    let early_drop_wanted = !flow_filtered && (args.reason.is_empty() || args.reason.contains(&Reason::EarlyDrop));

    // Counters before attaching: they seed the per-CPU baselines and the summary's deltas.
    let mut watched = Watched {
        first: HashMap::new(),
        last: HashMap::new(),
    };
    for &n in registry.known.keys() {
        if wanted(n)
            && let Ok(s) = registry.read_stats(n)
        {
            watched.first.insert(n, s.clone());
            watched.last.insert(n, s);
        }
    }

    let choice = probes::choose(args.mode)?;
    let filters = KernelFilters {
        netns: netns_filter.unwrap_or(0),
        l4proto: args.proto.unwrap_or(0),
        port: args.port.unwrap_or(0),
        host: args.host,
        reasons: args.reason.clone(),
    };
    let mut tracer = Tracer::start(&choice.plan, &filters, &watched.first)?;
    let clock = Clock::now();
    let started = Instant::now();
    out.mode(choice.name(), &choice.why, choice.exactness());
    if let Some(tx) = ready {
        let _ = tx.send(());
    }
    if flow_filtered {
        out.notice("early_drop evictions are not counted while --proto, --port or --host is set (the kernel counters carry no flow)");
    }

    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the AsyncFd drops it.
    let mut events = unsafe { AsyncFd::register_with_interest(tracer.take_events()?, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll the ring buffer: {e}"))?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut limiter = RateLimiter::new(args.rate_limit);
    let mut tally = Tally::default();
    let mut fill: HashMap<u32, u64> = HashMap::new();
    let mut max = netns::conntrack_max();
    let mut max_read = Instant::now();
    let mut ticks = 0u64;

    let ctx_for = |registry: &Registry, fill: &HashMap<u32, u64>, max: Option<u64>, n: u32| DropContext {
        netns_name: registry.name(n),
        table: fill.get(&n).copied().zip(max),
    };

    loop {
        let stop_changed = async {
            match stop.as_mut() {
                Some(rx) => {
                    let _ = rx.changed().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let until_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("ring buffer poll failed")?;
                // The limit can change under us (that is the bug class ctrace exists for): read it
                // at most every 100 ms while drops are being printed.
                if max_read.elapsed() > Duration::from_millis(100) {
                    max = netns::conntrack_max();
                    max_read = Instant::now();
                }
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    let Ok(raw) = event::parse_record(&item) else { continue };
                    let Some(d) = event::decode(&raw) else { continue };
                    if !registry.known.contains_key(&d.netns) && d.netns != 0 {
                        registry.rescan();
                    }
                    tally.add(&d, 1);
                    if let Admit::Print = limiter.admit(&d, 1) {
                        let ctx = ctx_for(&registry, &fill, max, d.netns);
                        out.drop(clock.wall(d.ts_ns), &d, &ctx);
                    }
                }
                guard.clear_ready();
            }
            _ = tick.tick() => {
                ticks += 1;
                let flush = limiter.tick();
                let now = OffsetDateTime::now_utc();
                match flush.switched {
                    Some(true) => out.notice(&format!(
                        "more than {} drops per second: printing per-second aggregates per (reason, netns, destination); --rate-limit 0 prints every drop",
                        limiter.limit()
                    )),
                    Some(false) => out.notice("drop rate is back under the limit: printing every drop again"),
                    None => {}
                }
                max = netns::conntrack_max();
                print_aggregates(&mut out, now, flush.aggregates, |n| ctx_for(&registry, &fill, max, n));
                if ticks.is_multiple_of(5) {
                    registry.rescan();
                }
                for (netns, delta) in poll_counters(&registry, &mut watched, &mut fill, &wanted) {
                    if early_drop_wanted && delta.early_drop > 0 {
                        let ctx = ctx_for(&registry, &fill, max, netns);
                        out.counted_drops(now, Reason::EarlyDrop, netns, &ctx, delta.early_drop);
                    }
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = until_deadline => break,
            _ = stop_changed => break,
        }
    }

    // Drain what is already in the ring buffer, then detach by dropping the programs.
    {
        let rb = events.get_mut();
        while let Some(item) = rb.next() {
            if let Ok(raw) = event::parse_record(&item)
                && let Some(d) = event::decode(&raw)
            {
                tally.add(&d, 1);
                if let Admit::Print = limiter.admit(&d, 1) {
                    let ctx = ctx_for(&registry, &fill, max, d.netns);
                    out.drop(clock.wall(d.ts_ns), &d, &ctx);
                }
            }
        }
        let flush = limiter.tick();
        print_aggregates(&mut out, OffsetDateTime::now_utc(), flush.aggregates, |n| {
            ctx_for(&registry, &fill, max, n)
        });
    }
    let totals = tracer.reason_totals()?;
    let per_netns = tracer.netns_totals()?;
    let lost = tracer.lost_events()?;
    let lost_split = tracer.lost_netns_split()?;
    drop(events);
    drop(tracer);

    // Final counter read, for exact early_drop totals and the per-netns kernel deltas.
    let now = OffsetDateTime::now_utc();
    for (netns, delta) in poll_counters(&registry, &mut watched, &mut fill, &wanted) {
        if early_drop_wanted && delta.early_drop > 0 {
            let ctx = ctx_for(&registry, &fill, max, netns);
            out.counted_drops(now, Reason::EarlyDrop, netns, &ctx, delta.early_drop);
        }
    }

    let mut summary = Summary {
        mode: choice.name().to_owned(),
        duration_s: started.elapsed().as_secs_f64(),
        lost,
        top_flows: tally.top_flows(),
        top_dports: tally.top_dports(),
        untracked: tally.untracked,
        ..Default::default()
    };
    for (r, c) in &totals {
        summary.drops.insert(*r, *c);
    }
    let mut by_netns: BTreeMap<u32, NetnsSummary> = BTreeMap::new();
    for ((n, r), c) in per_netns {
        by_netns.entry(n).or_default().drops.insert(r, c);
    }
    let mut early_total = 0;
    for (n, first) in &watched.first {
        let Some(last) = watched.last.get(n) else { continue };
        let delta = CounterDelta::between(first, last);
        if delta.is_zero() && !by_netns.contains_key(n) {
            continue;
        }
        if early_drop_wanted && delta.early_drop > 0 {
            early_total += delta.early_drop;
            by_netns
                .entry(*n)
                .or_default()
                .drops
                .insert(Reason::EarlyDrop, delta.early_drop);
        }
        by_netns.entry(*n).or_default().kernel = Some(delta);
    }
    if early_drop_wanted {
        summary.drops.insert(Reason::EarlyDrop, early_total);
    }
    for (n, mut s) in by_netns {
        s.netns = n;
        s.name = registry.name(n);
        summary.netns.push(s);
    }
    if lost_split > 0 {
        out.notice(&format!(
            "{lost_split} drops are in the totals but not in the per-netns split (more netns than ctrace tracks)"
        ));
    }
    out.summary(&summary);
    Ok(summary)
}

/// Most aggregate lines printed per second; the rest fold into one line per (reason, netns).
const MAX_AGGREGATE_LINES: usize = 10;

fn print_aggregates(
    out: &mut Output,
    now: OffsetDateTime,
    mut aggs: Vec<(AggKey, AggValue)>,
    ctx: impl Fn(u32) -> DropContext,
) {
    aggs.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(&b.0)));
    let rest = if aggs.len() > MAX_AGGREGATE_LINES {
        aggs.split_off(MAX_AGGREGATE_LINES)
    } else {
        vec![]
    };
    let mut folded: BTreeMap<AggKey, AggValue> = BTreeMap::new();
    for (k, v) in rest {
        let key = AggKey {
            proto: None,
            dst: None,
            ..k
        };
        let e = folded.entry(key).or_default();
        e.count += v.count;
        e.others += 1 + v.others;
    }
    for (k, v) in aggs.iter().map(|(k, v)| (k, v)).chain(folded.iter()) {
        out.aggregate(now, k, v, &ctx(k.netns));
    }
}

/// Reads each watched netns's counters, returns the non-zero deltas since the last poll,
/// records the table fill, and starts watching netns that appeared since (from zero: a new netns's
/// counters start at zero).
fn poll_counters(
    registry: &Registry,
    watched: &mut Watched,
    fill: &mut HashMap<u32, u64>,
    wanted: &impl Fn(u32) -> bool,
) -> Vec<(u32, CounterDelta)> {
    let mut deltas = vec![];
    for &n in registry.known.keys() {
        if !wanted(n) {
            continue;
        }
        let Ok(now) = registry.read_stats(n) else { continue };
        fill.insert(n, now.entries());
        let prev = watched.last.get(&n).cloned().unwrap_or_else(|| {
            let zero = CtStats::default();
            watched.first.insert(n, zero.clone());
            zero
        });
        let delta = CounterDelta::between(&prev, &now);
        watched.last.insert(n, now);
        if !delta.is_zero() {
            deltas.push((n, delta));
        }
    }
    deltas
}
