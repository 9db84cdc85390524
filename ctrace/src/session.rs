//! `ctrace run`: load, stream events to the output, poll the kernel counters each second, stop on
//! Ctrl-C / SIGTERM / --duration / the caller's signal, detach, print the summary.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use ctrace_common::Reason;
use time::OffsetDateTime;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    aggregate::{self, Admit, RateLimiter},
    cli::RunArgs,
    ctstat::{CounterDelta, CtStats},
    event, modules,
    netns::{self, Registry},
    output::{DropContext, Output},
    probes::{
        self, Choice,
        loader::{KernelFilters, Tracer},
    },
    summary::{NetnsSummary, Summary, Tally},
    sysctl_state, sysctl_watch,
};

/// Converts `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) to wall-clock time.
struct Clock {
    mono_ns: i128,
    wall: OffsetDateTime,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            mono_ns: crate::probes::monotonic_ns() as i128,
            wall: OffsetDateTime::now_utc(),
        }
    }

    fn wall(&self, mono_ns: u64) -> OffsetDateTime {
        let delta = mono_ns as i128 - self.mono_ns;
        self.wall + time::Duration::nanoseconds(delta as i64)
    }
}

/// Lets an embedding caller (the demo) know when probes are attached and stop the session.
#[derive(Default)]
pub struct Hooks {
    pub stop: Option<watch::Receiver<bool>>,
    pub ready: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Most aggregate lines printed per second; the rest fold into one line per (reason, netns).
const MAX_AGGREGATE_LINES: usize = 10;
/// The eviction probe (a kprobe on nf_ct_delete, which runs for every deleted entry) is armed
/// while some watched table is at least this full, and disarmed below `DISARM_FILL`.
const ARM_FILL: f64 = 0.90;
const DISARM_FILL: f64 = 0.80;

/// Kernel counters of one watched netns, and how its early_drop evictions were reported.
#[derive(Default)]
struct Watched {
    /// Counters at start (empty = zero for a netns that appeared later).
    first: CtStats,
    last: CtStats,
    /// Evictions reported one by one (kprobe mode, probe armed).
    listed_evictions: u64,
    /// Evictions reported as counter-only remainders.
    counted_evictions: u64,
    /// What earlier module instances counted: a reload starts the kernel's counters at zero.
    carried: CounterDelta,
}

impl Watched {
    /// The kernel's counter increases since ctrace started, across module reloads.
    fn delta(&self) -> CounterDelta {
        let now = CounterDelta::between(&self.first, &self.last);
        CounterDelta {
            drop: self.carried.drop + now.drop,
            early_drop: self.carried.early_drop + now.early_drop,
            insert_failed: self.carried.insert_failed + now.insert_failed,
            invalid: self.carried.invalid + now.invalid,
        }
    }

    /// The module went away (or came back): keep what was counted, restart from zero.
    fn carry_over(&mut self) {
        self.carried = self.delta();
        self.first = CtStats::default();
        self.last = CtStats::default();
    }
}

struct Session {
    out: Output,
    registry: Registry,
    netns_filter: Option<u32>,
    early_drop_wanted: bool,
    watched: HashMap<u32, Watched>,
    limiter: RateLimiter,
    tally: Tally,
    clock: Clock,
    max: Option<u64>,
    max_read: Instant,
    eviction_watch: bool,
    modules: modules::Correlator,
    /// nf_conntrack was loaded and its init may still be running: when it is live, re-attach.
    reload_pending: Option<Instant>,
    /// The conntrack sysctls while nf_conntrack was last live (kernels with modules only).
    sysctls: Option<sysctl_state::Snapshot>,
    /// Per-netns keys of the other network namespaces, by inode (refreshed every few seconds).
    netns_sysctls: BTreeMap<u32, sysctl_state::Snapshot>,
    /// ctrace's own netns (its keys are in `sysctls`).
    own_netns: u32,
    /// nf_conntrack is gone: keep `sysctls` as the "before" of the next load.
    sysctls_frozen: bool,
    /// A sysctl write was seen: refresh the snapshot soon.
    sysctl_dirty: bool,
    /// Where to arm the conntrack hook.
    hook: crate::hook_steer::Steering,
}

impl Session {
    fn wanted(&self, n: u32) -> bool {
        self.netns_filter.is_none_or(|f| f == n)
    }

    fn ctx(&self, n: u32) -> DropContext {
        DropContext {
            netns_name: self.registry.name(n),
            table: self.watched.get(&n).map(|w| w.last.entries()).zip(self.max),
        }
    }

    fn handle_record(&mut self, bytes: &[u8]) {
        let Ok(raw) = event::parse_record(bytes) else { return };
        let Some(d) = event::decode(&raw) else { return };
        self.registry.learn(d.netns);
        if d.evicted
            && let Some(w) = self.watched.get_mut(&d.netns)
        {
            w.listed_evictions += 1;
        }
        if !d.evicted {
            self.tally.add(&d, 1);
        }
        if d.uncertain() {
            self.hook.uncertain_drop(d.netns);
        }
        if let Admit::Print = self.limiter.admit(&d, 1) {
            let mut ctx = self.ctx(d.netns);
            // A table-full drop means the table was at its limit at that instant; the polled
            // count can be up to a second old.
            if d.reason == Reason::TableFull
                && let Some(max) = self.max
            {
                ctx.table = Some((max, max));
            }
            self.out.drop(self.clock.wall(d.ts_ns), &d, &ctx);
        }
    }

    /// Drops the kernel counted in aggregates (above the rate limit): into the tallies and this second's
    /// aggregate lines, like folded records.
    fn handle_counted(&mut self, d: &event::Drop, count: u64) {
        self.registry.learn(d.netns);
        self.tally.add(d, count);
        if d.uncertain() {
            self.hook.uncertain_drop(d.netns);
        }
        self.limiter.fold(d, count);
    }

    fn collect_counted(&mut self, tracer: &mut Tracer) {
        match tracer.collect_aggregates() {
            Ok(counted) => {
                for (d, count) in counted {
                    self.handle_counted(&d, count);
                }
            }
            Err(e) => self
                .out
                .notice(&format!("cannot read the kernel's aggregates: {}", crate::brief(&e))),
        }
    }

    fn drain(&mut self, rb: &mut RingBuf<MapData>) {
        while let Some(item) = rb.next() {
            // The limit can change under us (that is the bug class ctrace exists for): read it at
            // most every 100 ms while drops are being printed.
            if self.max_read.elapsed() > Duration::from_millis(100) {
                self.max = netns::conntrack_max();
                self.max_read = Instant::now();
            }
            let bytes = item.to_vec();
            drop(item);
            self.handle_record(&bytes);
        }
    }

    fn handle_module_record(&mut self, bytes: &[u8]) {
        let Some(raw) = modules::parse_record(bytes) else {
            return;
        };
        for change in self.modules.feed(&raw, modules::holders, modules::is_loaded) {
            self.handle_module_change(change);
        }
    }

    fn handle_module_change(&mut self, change: modules::ModuleChange) {
        self.out.module(self.clock.wall(change.ts_ns), &change);
        if change.name == "nf_conntrack" {
            match change.action {
                modules::Action::Load => self.reload_pending = Some(Instant::now()),
                // The module's counters are gone: what was counted so far is kept (see `carry`).
                modules::Action::Unload => {
                    self.sysctls_frozen = true;
                    for w in self.watched.values_mut() {
                        w.carry_over();
                    }
                }
                modules::Action::UnloadFailed => {}
            }
        }
    }

    fn handle_sysctl_record(&mut self, bytes: &[u8]) {
        let Some(w) = sysctl_watch::parse_record(bytes) else {
            return;
        };
        if let Some(n) = w.netns {
            self.registry.learn(n);
        }
        let name = w.netns.and_then(|n| self.registry.name(n));
        self.out.sysctl_write(self.clock.wall(w.ts_ns), &w, name.as_deref());
        // The kernel applies the value right after this program ran: refresh the snapshot on the
        // next tick (a reload right after a write must still see the written value as "before").
        self.sysctl_dirty = true;
    }

    /// Once the reloaded nf_conntrack is live: probes and baselines start over.
    fn finish_reload(&mut self, tracer: &mut Tracer) {
        let Some(since) = self.reload_pending else { return };
        if !modules::is_live("nf_conntrack") {
            if since.elapsed() > Duration::from_secs(30) {
                self.out
                    .notice("nf_conntrack was loaded but did not finish initialising within 30 s");
                self.reload_pending = None;
            }
            return;
        }
        self.reload_pending = None;
        self.eviction_watch = false;
        for w in self.watched.values_mut() {
            w.carry_over();
        }
        if let Some(before) = self.sysctls.as_mut() {
            let after = sysctl_state::Snapshot::read();
            let now = OffsetDateTime::now_utc();
            if !before.is_empty() {
                for r in sysctl_state::resets(before, &after) {
                    self.out.sysctl_reset(now, &r);
                }
            }
            *before = after;
            self.sysctls_frozen = false;
            let others = std::mem::take(&mut self.netns_sysctls);
            for (netns, before) in others {
                let Some(path) = self.registry.ns_path(netns) else {
                    continue;
                };
                let Ok(after) = netns::in_netns(&path, sysctl_state::Snapshot::read) else {
                    continue;
                };
                let label = self.registry.name(netns).unwrap_or_else(|| netns.to_string());
                for r in sysctl_state::netns_resets(netns, &label, &before, &after) {
                    self.out.sysctl_reset(now, &r);
                }
                self.netns_sysctls.insert(netns, after.per_netns_only());
            }
        }
        match tracer.reattach_conntrack() {
            Ok(probes) => self.out.reattached(OffsetDateTime::now_utc(), "nf_conntrack", &probes),
            Err(e) => self.out.notice(&format!(
                "could not re-attach to the reloaded nf_conntrack: {}",
                crate::brief(&e)
            )),
        }
    }

    /// Keeps the sysctl snapshot current while nf_conntrack is live and no reload is under way.
    /// An unload removes the sysctls before the module is gone: a snapshot is only kept when the
    /// module was live before and after it was read and the table size is in it, so a half-torn
    /// state never replaces the values the next reload is compared with.
    fn refresh_sysctls(&mut self) {
        self.sysctl_dirty = false;
        if self.sysctls_frozen || self.reload_pending.is_some() || self.sysctls.is_none() {
            return;
        }
        let live = || modules::is_live("nf_conntrack");
        if !live() {
            return;
        }
        let now = sysctl_state::Snapshot::read();
        if now.is_complete() && live() {
            self.sysctls = Some(now);
        }
    }

    /// The same for the other network namespaces (a thread enters each; bounded per call).
    fn refresh_netns_sysctls(&mut self) {
        const MAX_NETNS: usize = 256;
        if self.sysctls_frozen || self.reload_pending.is_some() || self.sysctls.is_none() {
            return;
        }
        let live = || modules::is_live("nf_conntrack");
        let ids: Vec<u32> = self
            .registry
            .known
            .keys()
            .copied()
            .filter(|&n| n != self.own_netns && self.wanted(n))
            .take(MAX_NETNS)
            .collect();
        self.netns_sysctls.retain(|n, _| ids.contains(n));
        for n in ids {
            if !live() {
                return;
            }
            let Some(path) = self.registry.ns_path(n) else { continue };
            if let Ok(snap) = netns::in_netns(&path, sysctl_state::Snapshot::read)
                && snap.is_complete()
                && live()
            {
                self.netns_sysctls.insert(n, snap.per_netns_only());
            }
        }
    }

    /// Reads every watched netns's counters (starting to watch new netns from zero: a new netns's
    /// counters start at zero).
    fn poll_counters(&mut self) {
        let ids: Vec<u32> = self
            .registry
            .known
            .keys()
            .copied()
            .filter(|&n| self.wanted(n))
            .collect();
        for n in ids {
            let Ok(now) = self.registry.read_stats(n) else { continue };
            self.watched.entry(n).or_default().last = now;
        }
    }

    /// Reports early_drop evictions that were not listed one by one. Call after `poll_counters`
    /// and a drain: an eviction's event is sent before the kernel counts it, so everything the
    /// counters show has been listed by then, and the remainder never over-counts.
    fn report_counted_evictions(&mut self, now: OffsetDateTime) {
        if !self.early_drop_wanted {
            return;
        }
        let mut lines = vec![];
        for (n, w) in &mut self.watched {
            let kernel = w.delta().early_drop;
            let remainder = kernel.saturating_sub(w.listed_evictions + w.counted_evictions);
            if remainder > 0 {
                w.counted_evictions += remainder;
                lines.push((*n, remainder));
            }
        }
        lines.sort();
        for (n, count) in lines {
            let ctx = self.ctx(n);
            self.out.counted_drops(now, Reason::EarlyDrop, n, &ctx, count);
        }
    }

    fn flush_aggregates(&mut self) {
        let flush = self.limiter.tick();
        match flush.switched {
            Some(true) => self.out.notice(&format!(
                "more than {} drops per second: printing per-second aggregates per (reason, netns, destination); \
--rate-limit 0 prints every drop",
                self.limiter.limit()
            )),
            Some(false) => self
                .out
                .notice("drop rate is back under the limit: printing every drop again"),
            None => {}
        }
        let aggs = aggregate::fold(flush.aggregates, MAX_AGGREGATE_LINES);
        let now = OffsetDateTime::now_utc();
        for (k, v) in &aggs {
            let ctx = self.ctx(k.netns);
            self.out.aggregate(now, k, v, &ctx);
        }
    }

    /// Arms or disarms the eviction probe from the fullest watched table.
    fn steer_eviction_watch(&mut self, tracer: &mut Tracer) {
        if !tracer.can_watch_evictions() || !self.early_drop_wanted {
            return;
        }
        let Some(max) = self.max.filter(|&m| m > 0) else { return };
        let (fullest, entries) = self
            .watched
            .iter()
            .map(|(n, w)| (*n, w.last.entries()))
            .max_by_key(|(_, e)| *e)
            .unwrap_or((0, 0));
        let fill = entries as f64 / max as f64;
        let arm = if self.eviction_watch {
            fill >= DISARM_FILL
        } else {
            fill >= ARM_FILL
        };
        if arm == self.eviction_watch {
            return;
        }
        match tracer.watch_evictions(arm) {
            Ok(()) => {
                self.eviction_watch = arm;
                let name = self
                    .registry
                    .name(fullest)
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default();
                self.out.notice(&if arm {
                    format!(
                        "conntrack table of netns {fullest}{name} is {:.0}% full ({entries}/{max}): listing each \
early_drop eviction (kprobe on nf_ct_delete, armed while a table is over {:.0}% full)",
                        fill * 100.0,
                        ARM_FILL * 100.0
                    )
                } else {
                    format!(
                        "conntrack tables are below {:.0}% full: no longer listing evictions",
                        DISARM_FILL * 100.0
                    )
                });
            }
            Err(e) => {
                self.out
                    .notice(&format!("cannot watch evictions: {}", crate::brief(&e)));
            }
        }
    }
}

pub async fn run(args: RunArgs, out: Output, hooks: Hooks) -> anyhow::Result<Summary> {
    let Hooks { mut stop, ready } = hooks;
    let registry = Registry::scan();
    let netns_filter = match &args.netns {
        Some(spec) => Some(registry.resolve(spec).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let flow_filtered = args.proto.is_some() || args.port.is_some() || args.host.is_some();
    let mut s = Session {
        out,
        registry,
        netns_filter,
        early_drop_wanted: !flow_filtered && (args.reason.is_empty() || args.reason.contains(&Reason::EarlyDrop)),
        watched: HashMap::new(),
        limiter: RateLimiter::new(args.rate_limit),
        tally: Tally::default(),
        clock: Clock::now(),
        max: netns::conntrack_max(),
        max_read: Instant::now(),
        eviction_watch: false,
        modules: modules::Correlator::default(),
        reload_pending: None,
        sysctls: modules::kernel_has_modules().then(sysctl_state::Snapshot::read),
        netns_sysctls: BTreeMap::new(),
        own_netns: netns::current_inode().unwrap_or(0),
        sysctls_frozen: false,
        sysctl_dirty: false,
        hook: Default::default(),
    };

    // Counters before attaching: they seed the per-CPU baselines and the summary's deltas.
    let ids: Vec<u32> = s.registry.known.keys().copied().filter(|&n| s.wanted(n)).collect();
    for n in ids {
        if let Ok(stats) = s.registry.read_stats(n) {
            s.watched.insert(
                n,
                Watched {
                    first: stats.clone(),
                    last: stats,
                    ..Default::default()
                },
            );
        }
    }
    s.refresh_netns_sysctls();
    let baselines: HashMap<u32, CtStats> = s.watched.iter().map(|(n, w)| (*n, w.first.clone())).collect();

    let choice: Choice = probes::choose(args.mode)?;
    let filters = KernelFilters {
        netns: netns_filter.unwrap_or(0),
        l4proto: args.proto.unwrap_or(0),
        port: args.port.unwrap_or(0),
        host: args.host,
        reasons: args.reason.clone(),
        rate_limit: args.rate_limit,
    };
    let mut tracer = Tracer::start(&choice.plan, &filters, &baselines)?;
    s.clock = Clock::now();
    let started = Instant::now();
    s.out.mode(choice.name(), &choice.why, choice.exactness());
    if let Some(tx) = ready {
        let _ = tx.send(());
    }
    if let Some(why) = &tracer.modules_unwatched {
        s.out.notice(why);
    }
    if let Some(why) = &tracer.sysctls_unwatched {
        s.out.notice(why);
    }
    if flow_filtered {
        s.out.notice(
            "early_drop evictions are not counted while --proto, --port or --host is set (the kernel counters \
carry no flow)",
        );
    }

    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the AsyncFd drops it.
    let mut events = unsafe { AsyncFd::register_with_interest(tracer.take_events()?, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll the ring buffer: {e}"))?;
    // SAFETY: as above.
    let mut module_events = match tracer.take_module_events()? {
        Some(rb) => Some(
            unsafe { AsyncFd::register_with_interest(rb, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("cannot poll the module ring buffer: {e}"))?,
        ),
        None => None,
    };
    // SAFETY: as above.
    let mut sysctl_events = match tracer.take_sysctl_events()? {
        Some(rb) => Some(
            unsafe { AsyncFd::register_with_interest(rb, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("cannot poll the sysctl ring buffer: {e}"))?,
        ),
        None => None,
    };
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Records are submitted without a wakeup each (a lone drop still wakes us): read what waits every 50 ms.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(50));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruner = crate::baselines::Pruner::default();
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticks = 0u64;

    loop {
        let stop_changed = async {
            match stop.as_mut() {
                Some(rx) => {
                    let _ = rx.changed().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let module_ready = ready_records(module_events.as_mut());
        let sysctl_ready = ready_records(sysctl_events.as_mut());
        let sysctl_settle = async {
            if s.sysctl_dirty {
                tokio::time::sleep(Duration::from_millis(50)).await
            } else {
                std::future::pending::<()>().await
            }
        };
        let reload_poll = async {
            if s.reload_pending.is_some() {
                tokio::time::sleep(Duration::from_millis(20)).await
            } else {
                std::future::pending::<()>().await
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
                s.drain(guard.get_inner_mut());
                guard.clear_ready();
                s.hook.steer(&s.registry, &mut tracer, &mut s.out);
            }
            records = module_ready => {
                for r in records.context("module ring buffer poll failed")? {
                    s.handle_module_record(&r);
                }
                s.finish_reload(&mut tracer);
            }
            _ = reload_poll => s.finish_reload(&mut tracer),
            records = sysctl_ready => {
                for r in records.context("sysctl ring buffer poll failed")? {
                    s.handle_sysctl_record(&r);
                }
            }
            _ = sysctl_settle => s.refresh_sysctls(),
            _ = drain_tick.tick() => s.drain(events.get_mut()),
            _ = tick.tick() => {
                if crate::output::stdout_closed() {
                    // Nobody reads the output any more (`| head`): detach and end as a finished run.
                    break;
                }
                ticks += 1;
                s.max = netns::conntrack_max();
                s.refresh_sysctls();
                s.poll_counters();
                s.drain(events.get_mut());
                s.report_counted_evictions(OffsetDateTime::now_utc());
                s.collect_counted(&mut tracer);
                s.flush_aggregates();
                s.steer_eviction_watch(&mut tracer);
                if ticks.is_multiple_of(5) {
                    s.registry.rescan();
                    s.refresh_netns_sysctls();
                    pruner.prune(&s.registry, &mut tracer);
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = until_deadline => break,
            _ = stop_changed => break,
        }
    }

    // Detach first (nothing new arrives), then read everything that is left.
    tracer.stop_programs();
    let totals = tracer.reason_totals()?;
    let per_netns = tracer.netns_totals()?;
    let lost = tracer.lost_events()?;
    let lost_split = tracer.lost_netns_split()?;
    let mut attribution = tracer.attribution_stats()?;
    attribution.baselines_pruned = pruner.pruned;
    attribution.hooked_netns = s.hook.armed;
    let mut events = events.into_inner();
    let mut module_events = module_events.map(AsyncFd::into_inner);
    let mut sysctl_events = sysctl_events.map(AsyncFd::into_inner);
    s.collect_counted(&mut tracer);
    drop(tracer);
    for r in module_events.as_mut().map(records).unwrap_or_default() {
        s.handle_module_record(&r);
    }
    for r in sysctl_events.as_mut().map(records).unwrap_or_default() {
        s.handle_sysctl_record(&r);
    }
    s.poll_counters();
    s.drain(&mut events);
    s.report_counted_evictions(OffsetDateTime::now_utc());
    s.flush_aggregates();

    let mut summary = Summary {
        mode: choice.name().to_owned(),
        duration_s: started.elapsed().as_secs_f64(),
        lost,
        top_flows: s.tally.top_flows(),
        top_dports: s.tally.top_dports(),
        untracked: s.tally.untracked,
        module_requests_unprivileged: s.modules.unprivileged,
        attribution,
        ..Default::default()
    };
    for (r, c) in &totals {
        summary.drops.insert(*r, c.total());
        summary.uncertain.insert(*r, c.uncertain);
    }
    let mut by_netns: BTreeMap<u32, NetnsSummary> = BTreeMap::new();
    for ((n, r), c) in per_netns {
        let ns = by_netns.entry(n).or_default();
        ns.drops.insert(r, c.total());
        ns.uncertain.insert(r, c.uncertain);
    }
    let mut early_total = 0;
    for (n, w) in &s.watched {
        let delta = w.delta();
        if delta.is_zero() && !by_netns.contains_key(n) {
            continue;
        }
        if s.early_drop_wanted && delta.early_drop > 0 {
            early_total += delta.early_drop;
            by_netns
                .entry(*n)
                .or_default()
                .drops
                .insert(Reason::EarlyDrop, delta.early_drop);
        }
        by_netns.entry(*n).or_default().kernel = Some(delta);
    }
    if s.early_drop_wanted {
        summary.drops.insert(Reason::EarlyDrop, early_total);
    }
    for (n, mut ns) in by_netns {
        ns.netns = n;
        ns.name = s.registry.name(n);
        summary.netns.push(ns);
    }
    if lost_split > 0 {
        s.out.notice(&format!(
            "{lost_split} drops are in the totals but not in the per-netns split (more netns than ctrace tracks)"
        ));
    }
    s.out.summary(&summary);
    Ok(summary)
}

/// Copies out every record waiting in a ring buffer.
fn records(rb: &mut RingBuf<MapData>) -> Vec<Vec<u8>> {
    let mut out = vec![];
    while let Some(item) = rb.next() {
        out.push(item.to_vec());
    }
    out
}

/// Waits until the ring buffer has records and copies them out; never resolves without one (the
/// kernel offers no such events).
async fn ready_records(fd: Option<&mut AsyncFd<RingBuf<MapData>>>) -> std::io::Result<Vec<Vec<u8>>> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    let mut guard = fd.readable_mut().await?;
    let out = records(guard.get_inner_mut());
    guard.clear_ready();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(early: u64) -> CtStats {
        CtStats::parse(&format!("entries early_drop\n00000001 {early:08x}\n")).unwrap()
    }

    fn session() -> Session {
        Session {
            out: Output::json(Box::new(std::io::sink())),
            registry: Registry::default(),
            netns_filter: None,
            early_drop_wanted: true,
            watched: HashMap::new(),
            limiter: RateLimiter::new(0),
            tally: Tally::default(),
            clock: Clock::now(),
            max: Some(100),
            max_read: Instant::now(),
            eviction_watch: false,
            modules: modules::Correlator::default(),
            reload_pending: None,
            sysctls: None,
            netns_sysctls: BTreeMap::new(),
            own_netns: 0,
            sysctls_frozen: false,
            sysctl_dirty: false,
            hook: Default::default(),
        }
    }

    #[test]
    fn listed_and_counted_evictions_add_up_to_the_kernel_counter() {
        let mut s = session();
        s.watched.insert(
            7,
            Watched {
                first: stats(10),
                last: stats(15),
                listed_evictions: 3,
                ..Default::default()
            },
        );
        s.report_counted_evictions(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(s.watched[&7].counted_evictions, 2);
        // More listed than the counters showed at the last poll: nothing negative, nothing twice.
        s.watched.get_mut(&7).unwrap().listed_evictions = 6;
        s.watched.get_mut(&7).unwrap().last = stats(20);
        s.report_counted_evictions(OffsetDateTime::UNIX_EPOCH);
        let w = &s.watched[&7];
        assert_eq!(w.listed_evictions + w.counted_evictions, 10);
    }

    #[test]
    fn counts_survive_a_module_reload() {
        let mut w = Watched {
            first: stats(10),
            last: stats(15),
            ..Default::default()
        };
        w.carry_over();
        // The reloaded module counts from zero.
        w.last = stats(4);
        assert_eq!(w.delta().early_drop, 9);
    }
}
