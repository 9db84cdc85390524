//! `ctrace run`: attach, then loop: read the ring buffers, hand each record to the session's state (which turns
//! it into report events for the sinks), tick once a second; stop on Ctrl-C, SIGTERM, --duration, the caller's
//! signal or a closed output; detach and report the summary. The parts with state of their own live in their own
//! modules: `state` (the session's reactions), `kernel_counters`, `evictions`, `reload`, `hook_steer`,
//! `aggregate`, `summary`.

mod state;
mod status;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

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
    cli::RunArgs,
    modules,
    netns::Registry,
    probes::{
        self, Choice,
        loader::{KernelFilters, Tracer},
    },
    reload::{LiveHost, ReloadWatch},
    report::{Event, ModeRecord, SummaryRecord},
    sinks::Sinks,
    summary::{self, Summary},
};
use state::{Clock, Session};

/// Lets an embedding caller (the demo) know when probes are attached and stop the session.
#[derive(Default)]
pub struct Hooks {
    pub stop: Option<watch::Receiver<bool>>,
    pub ready: Option<tokio::sync::oneshot::Sender<()>>,
}

pub async fn run(args: RunArgs, sinks: Sinks, hooks: Hooks) -> anyhow::Result<Summary> {
    let Hooks { mut stop, ready } = hooks;
    let registry = Registry::scan();
    let netns_filter = match &args.netns {
        Some(spec) => Some(registry.resolve(spec).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let flow_filtered = args.proto.is_some() || args.port.is_some() || args.host.is_some();
    let reload = ReloadWatch::new(&LiveHost(&registry), modules::kernel_has_modules());
    let early_drop_wanted = !flow_filtered && (args.reason.is_empty() || args.reason.contains(&Reason::EarlyDrop));
    let mut s = Session::new(
        sinks,
        registry,
        netns_filter,
        early_drop_wanted,
        args.rate_limit,
        reload,
    );

    // Counters before attaching: they seed the per-CPU baselines and the summary's deltas.
    for n in s.watched_ids() {
        if let Ok(stats) = s.registry.read_stats(n) {
            s.counters.seed(n, stats);
        }
    }
    s.refresh_netns_sysctls();

    let capabilities = crate::capabilities::assess(&crate::capabilities::Context::current());
    let choice: Choice = probes::choose(args.mode, capabilities.allowed.perf_events)?;
    let filters = KernelFilters {
        netns: netns_filter.unwrap_or(0),
        l4proto: args.proto.unwrap_or(0),
        port: args.port.unwrap_or(0),
        host: args.host,
        reasons: args.reason.clone(),
        rate_limit: args.rate_limit,
    };
    let mut tracer = Tracer::start(
        &choice.plan,
        &filters,
        &s.counters.take_initial(),
        &capabilities.allowed,
    )?;
    s.mode = choice.name();
    s.clock = Clock::now();
    let started = Instant::now();
    s.sinks.emit(Event::Mode(ModeRecord {
        ts: OffsetDateTime::now_utc(),
        mode: choice.name(),
        why: choice.why.clone(),
        exactness: choice.exactness(),
    }));
    // What will not work for want of a capability: once, right after the mode.
    for sentence in &capabilities.sentences {
        s.sinks.emit(Event::notice(sentence.clone()));
    }
    s.modules.unloads_from_free = !tracer.delete_module_watched;
    s.publish_status(&tracer);
    if let Some(tx) = ready {
        let _ = tx.send(());
    }
    for why in [&tracer.modules_unwatched, &tracer.sysctls_unwatched]
        .into_iter()
        .flatten()
    {
        s.sinks.emit(Event::notice(why.clone()));
    }
    if flow_filtered {
        s.sinks.emit(Event::notice(
            "early_drop evictions are not counted while --proto, --port or --host is set (the kernel counters \
carry no flow)",
        ));
    }
    s.sinks.flush();

    let mut events = poll_fd(tracer.take_events()?, "the ring buffer")?;
    let mut module_events = tracer
        .take_module_events()?
        .map(|rb| poll_fd(rb, "the module ring buffer"))
        .transpose()?;
    let mut sysctl_events = tracer
        .take_sysctl_events()?
        .map(|rb| poll_fd(rb, "the sysctl ring buffer"))
        .transpose()?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Records are submitted without a wakeup each (a lone drop still wakes us): read what waits every 50 ms.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(50));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticks = 0u64;

    while s.sinks.ended().is_none() {
        let stop_changed = async {
            match stop.as_mut() {
                Some(rx) => {
                    let _ = rx.changed().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let sysctl_settle = sleep_if(s.reload.dirty(), Duration::from_millis(50));
        let reload_poll = sleep_if(s.reload.pending(), Duration::from_millis(20));
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
                let notices = s.hook.steer(&s.registry, &mut tracer);
                for n in notices {
                    s.sinks.emit(n);
                }
            }
            records = ready_records(module_events.as_mut()) => {
                for r in records.context("module ring buffer poll failed")? {
                    if s.handle_module_record(&r) {
                        tracer.conntrack_unloaded();
                    }
                }
                s.finish_reload(&mut tracer);
                s.sinks.flush();
            }
            _ = reload_poll => {
                s.finish_reload(&mut tracer);
                s.sinks.flush();
            }
            records = ready_records(sysctl_events.as_mut()) => {
                for r in records.context("sysctl ring buffer poll failed")? {
                    s.handle_sysctl_record(&r);
                }
                s.sinks.flush();
            }
            _ = sysctl_settle => s.refresh_sysctls(),
            _ = drain_tick.tick() => s.drain(events.get_mut()),
            _ = tick.tick() => {
                ticks += 1;
                s.tick(ticks, events.get_mut(), &mut tracer);
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
    let attribution = s.attribution_stats(&tracer)?;
    s.observe_bounds(&tracer);
    // The last state, for a scrape before the exit.
    s.publish_status(&tracer);
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
    s.poll_counters(true);
    s.drain(&mut events);
    s.report_counted_evictions();
    s.flush_aggregates();

    let summary = summary::assemble(
        summary::Inputs {
            mode: choice.name(),
            duration_s: started.elapsed().as_secs_f64(),
            totals: &totals,
            per_netns: &per_netns,
            kernel: &s.counters,
            early_drop_wanted: s.early_drop_wanted,
            tally: &s.tally,
            lost,
            attribution,
            module_requests_unprivileged: s.modules.unprivileged,
            bounds: s.bounds,
        },
        |n| s.registry.name(n),
    );
    s.sinks.emit(Event::Summary(Box::new(SummaryRecord::new(
        OffsetDateTime::now_utc(),
        &summary,
    ))));
    s.sinks.flush();
    if let Some(e) = s.sinks.take_failure() {
        return Err(anyhow::Error::new(e).context("cannot write the output"));
    }
    Ok(summary)
}

/// A ring buffer the runtime can wait on.
fn poll_fd(rb: RingBuf<MapData>, what: &str) -> anyhow::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the AsyncFd drops it.
    unsafe { AsyncFd::register_with_interest(rb, tokio::io::Interest::READABLE) }
        .with_context(|| format!("cannot poll {what}"))
}

/// Sleeps when `cond`, else never resolves.
async fn sleep_if(cond: bool, d: Duration) {
    if cond {
        tokio::time::sleep(d).await
    } else {
        std::future::pending::<()>().await
    }
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
