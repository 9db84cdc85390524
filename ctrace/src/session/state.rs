//! What a run knows and how it reacts to each input: a drop record, a module or sysctl record, a reload finishing,
//! the one-second tick. The loop that feeds it is `session::run`.

use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use ctrace_common::Reason;
use time::OffsetDateTime;

use crate::{
    aggregate::{self, Admit, RateLimiter},
    bounds::{Bound, BoundsSummary},
    event,
    evictions::Evictions,
    kernel_counters::KernelCounters,
    modules,
    netns::{self, Registry},
    probes::loader::Tracer,
    reload::{Finish, Lifecycle, LiveHost, ReloadWatch},
    report::{
        AggregatedDrops, CountedDrops, DropContext, DropRecord, Event, ModuleRecord, PacketDrop, ReattachedRecord,
        SysctlWriteRecord,
    },
    sinks::Sinks,
    summary::Tally,
    sysctl_watch,
};

/// Converts `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) to wall-clock time.
pub(super) struct Clock {
    mono_ns: i128,
    wall: OffsetDateTime,
}

impl Clock {
    pub(super) fn now() -> Clock {
        Clock {
            mono_ns: crate::probes::monotonic_ns() as i128,
            wall: OffsetDateTime::now_utc(),
        }
    }

    pub(super) fn wall(&self, mono_ns: u64) -> OffsetDateTime {
        let delta = mono_ns as i128 - self.mono_ns;
        self.wall + time::Duration::nanoseconds(delta as i64)
    }
}

/// Most aggregate lines printed per second; the rest fold into one line per (reason, netns).
const MAX_AGGREGATE_LINES: usize = 10;

pub(super) struct Session {
    pub(super) sinks: Sinks,
    pub(super) registry: Registry,
    pub(super) netns_filter: Option<u32>,
    pub(super) early_drop_wanted: bool,
    pub(super) counters: KernelCounters,
    pub(super) evictions: Evictions,
    pub(super) limiter: RateLimiter,
    pub(super) tally: Tally,
    pub(super) clock: Clock,
    pub(super) max: Option<u64>,
    pub(super) max_read: Instant,
    pub(super) modules: modules::Correlator,
    pub(super) reload: ReloadWatch,
    /// ctrace's own netns (its per-netns keys are the reload watch's own snapshot).
    pub(super) own_netns: u32,
    /// Where to arm the conntrack hook.
    pub(super) hook: crate::hook_steer::Steering,
    /// Deletes the baselines of gone netns.
    pub(super) pruner: crate::baselines::Pruner,
    /// The probe mode's name, once chosen.
    pub(super) mode: &'static str,
    /// The bounds on per-netns state and what they cost.
    pub(super) bounds: BoundsSummary,
}

impl Session {
    pub(super) fn new(
        sinks: Sinks,
        registry: Registry,
        netns_filter: Option<u32>,
        early_drop_wanted: bool,
        rate_limit: u64,
        reload: ReloadWatch,
    ) -> Session {
        Session {
            sinks,
            registry,
            netns_filter,
            early_drop_wanted,
            counters: KernelCounters::default(),
            evictions: Evictions::default(),
            limiter: RateLimiter::new(rate_limit),
            tally: Tally::default(),
            clock: Clock::now(),
            max: netns::conntrack_max(),
            max_read: Instant::now(),
            modules: modules::Correlator::default(),
            reload,
            own_netns: netns::current_inode().unwrap_or(0),
            hook: Default::default(),
            pruner: Default::default(),
            mode: "",
            bounds: BoundsSummary::default(),
        }
    }

    pub(super) fn wanted(&self, n: u32) -> bool {
        self.netns_filter.is_none_or(|f| f == n)
    }

    /// The watched netns, as ids (the registry's view).
    pub(super) fn watched_ids(&self) -> Vec<u32> {
        self.registry
            .known
            .keys()
            .copied()
            .filter(|&n| self.wanted(n))
            .collect()
    }

    pub(super) fn ctx(&self, n: u32) -> DropContext {
        DropContext {
            netns_name: self.registry.name(n),
            table: self.counters.entries(n).zip(self.max),
        }
    }

    pub(super) fn handle_record(&mut self, bytes: &[u8]) {
        let Ok(raw) = event::parse_record(bytes) else { return };
        let Some(d) = event::decode(&raw) else { return };
        self.registry.learn(d.netns);
        if d.evicted {
            self.evictions.listed(d.netns);
        } else {
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
            let record = PacketDrop::new(self.clock.wall(d.ts_ns), &d, &ctx);
            self.sinks.emit(Event::Drop(DropRecord::Packet(record)));
        }
    }

    /// Drops the kernel counted in its aggregates (above the rate limit): into the tallies and this second's
    /// aggregate lines, like folded records.
    pub(super) fn handle_counted(&mut self, d: &event::Drop, count: u64) {
        self.registry.learn(d.netns);
        self.tally.add(d, count);
        if d.uncertain() {
            self.hook.uncertain_drop(d.netns);
        }
        self.limiter.fold(d, count);
    }

    pub(super) fn collect_counted(&mut self, tracer: &mut Tracer) {
        match tracer.collect_aggregates() {
            Ok(counted) => {
                for (d, count) in counted {
                    self.handle_counted(&d, count);
                }
            }
            Err(e) => self.sinks.emit(Event::notice(format!(
                "cannot read the kernel's aggregates: {}",
                crate::brief(&e)
            ))),
        }
    }

    pub(super) fn drain(&mut self, rb: &mut RingBuf<MapData>) {
        while let Some(item) = rb.next() {
            // The limit can change under us (that is the bug class ctrace exists for): read it at
            // most every 100 ms while drops are being printed.
            if self.max_read.elapsed() > Duration::from_millis(100) {
                self.max = netns::conntrack_max();
                self.max_read = Instant::now();
            }
            self.handle_record(&item);
        }
        self.sinks.flush();
    }

    /// Returns whether nf_conntrack went away (its kprobes went with it).
    pub(super) fn handle_module_record(&mut self, bytes: &[u8]) -> bool {
        let mut gone = false;
        let Some(raw) = modules::parse_record(bytes) else {
            return gone;
        };
        for change in self.modules.feed(&raw, modules::holders, modules::is_loaded) {
            self.sinks
                .emit(Event::Module(ModuleRecord::new(self.clock.wall(change.ts_ns), &change)));
            if self.reload.module_changed(&change) == Some(Lifecycle::Gone) {
                // The module's counters are gone: what was counted so far is kept.
                self.counters.carry_over();
                gone = true;
            }
        }
        gone
    }

    pub(super) fn handle_sysctl_record(&mut self, bytes: &[u8]) {
        let Some(w) = sysctl_watch::parse_record(bytes) else {
            return;
        };
        if let Some(n) = w.netns {
            self.registry.learn(n);
        }
        let name = w.netns.and_then(|n| self.registry.name(n));
        self.sinks.emit(Event::SysctlWrite(SysctlWriteRecord::new(
            self.clock.wall(w.ts_ns),
            &w,
            name,
        )));
        self.reload.sysctl_written();
    }

    /// Once the reloaded nf_conntrack is live: resets reported, probes and attribution start over.
    pub(super) fn finish_reload(&mut self, tracer: &mut Tracer) {
        match self.reload.try_finish(&LiveHost(&self.registry)) {
            Finish::NotYet => {}
            Finish::GaveUp(notice) => self.sinks.emit(Event::notice(notice)),
            Finish::Live(resets) => {
                self.evictions.probe_armed = false;
                self.counters.carry_over();
                for r in resets {
                    self.sinks.emit(r);
                }
                let known: Vec<u32> = self.registry.known.keys().copied().collect();
                let event = match tracer.reattach_conntrack(&known) {
                    Ok(probes) => Event::Reattached(ReattachedRecord {
                        ts: OffsetDateTime::now_utc(),
                        module: "nf_conntrack".into(),
                        probes,
                    }),
                    Err(e) => Event::notice(format!(
                        "could not re-attach to the reloaded nf_conntrack: {}",
                        crate::brief(&e)
                    )),
                };
                self.sinks.emit(event);
            }
        }
    }

    pub(super) fn refresh_sysctls(&mut self) {
        self.reload.refresh(&LiveHost(&self.registry));
    }

    pub(super) fn refresh_netns_sysctls(&mut self) {
        let own = self.own_netns;
        let ids = self.watched_ids().into_iter().filter(|&n| n != own);
        let (ids, left_out) = crate::bounds::take_bounded(ids, crate::bounds::NETNS_SYSCTLS);
        self.observe_bound(Bound::NetnsSysctls, left_out);
        self.reload.refresh_netns(&LiveHost(&self.registry), ids.into_iter());
    }

    /// Reads the watched netns's counters: all of them, or this tick's turn when there are more than a tick's
    /// reads.
    pub(super) fn poll_counters(&mut self, all: bool) {
        for n in self.counters.due(self.watched_ids(), all) {
            if let Ok(now) = self.registry.read_stats(n) {
                self.counters.update(n, now);
            }
        }
    }

    /// Reports early_drop evictions that were not listed one by one (after `poll_counters` and a drain).
    pub(super) fn report_counted_evictions(&mut self) {
        if !self.early_drop_wanted {
            return;
        }
        let now = OffsetDateTime::now_utc();
        for (n, count) in self.evictions.unreported(&self.counters) {
            let record = CountedDrops::new(now, Reason::EarlyDrop, n, &self.ctx(n), count);
            self.sinks.emit(Event::Drop(DropRecord::Counted(record)));
        }
    }

    pub(super) fn flush_aggregates(&mut self) {
        let flush = self.limiter.tick();
        match flush.switched {
            Some(true) => self.sinks.emit(Event::notice(format!(
                "more than {} drops per second: printing per-second aggregates per (reason, netns, destination); \
--rate-limit 0 prints every drop",
                self.limiter.limit()
            ))),
            Some(false) => self.sinks.emit(Event::notice(
                "drop rate is back under the limit: printing every drop again",
            )),
            None => {}
        }
        let now = OffsetDateTime::now_utc();
        for (k, v) in &aggregate::fold(flush.aggregates, MAX_AGGREGATE_LINES) {
            let record = AggregatedDrops::new(now, k, v, &self.ctx(k.netns));
            self.sinks.emit(Event::Drop(DropRecord::Aggregated(record)));
        }
    }

    /// Arms or disarms the eviction probe from the fullest watched table.
    pub(super) fn steer_eviction_probe(&mut self, tracer: &mut Tracer) {
        if !tracer.can_watch_evictions() || !self.early_drop_wanted {
            return;
        }
        let Some(max) = self.max.filter(|&m| m > 0) else { return };
        let (fullest, entries) = self.counters.fullest().unwrap_or((0, 0));
        let Some(arm) = self.evictions.steer(entries as f64 / max as f64) else {
            return;
        };
        let notice = match tracer.watch_evictions(arm) {
            Ok(()) => {
                self.evictions.probe_armed = arm;
                let label = match self.registry.name(fullest) {
                    Some(name) => format!("{fullest} ({name})"),
                    None => fullest.to_string(),
                };
                Evictions::notice(arm, &label, entries, max)
            }
            Err(e) => format!("cannot watch evictions: {}", crate::brief(&e)),
        };
        self.sinks.emit(Event::notice(notice));
    }

    /// Once a second.
    pub(super) fn tick(&mut self, ticks: u64, events: &mut RingBuf<MapData>, tracer: &mut Tracer) {
        // Nobody reads the output any more (`| head`): the loop ends as a finished run.
        self.sinks.check_readers();
        self.max = netns::conntrack_max();
        self.refresh_sysctls();
        self.poll_counters(false);
        self.drain(events);
        self.report_counted_evictions();
        self.collect_counted(tracer);
        self.flush_aggregates();
        self.steer_eviction_probe(tracer);
        if ticks.is_multiple_of(5) {
            self.registry.rescan();
            self.refresh_netns_sysctls();
            self.pruner.prune(&self.registry, tracer);
            let registry = &self.registry;
            let forgotten = self.counters.retire_gone(|n| registry.known.contains_key(&n));
            self.evictions.forget(&forgotten);
        }
        self.observe_bounds(tracer);
        self.publish_status(tracer);
        self.sinks.flush();
    }
}
