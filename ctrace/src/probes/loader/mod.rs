//! Loads the programs: the `skb_drop_kfree_skb` sink (tp_btf, every mode) with offsets from the
//! running kernel's BTF, plus the conntrack kprobes in kprobe mode; seeds the per-CPU baselines; attaches
//! again after a reload; arms the conntrack hook. What they counted is read in `kernel_totals`.

use std::collections::HashMap;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuHashMap, PerCpuValues, RingBuf},
    programs::{BtfTracePoint, Program, kprobe::KProbeLinkId},
};
use ctrace_common::{Baseline, Reason, baseline_state};

use crate::{btf::Btf, ctstat::CtStats, layout};

mod hook;

/// The eBPF object, built by build.rs and embedded so the binary runs anywhere.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ctrace"));

/// Filters compiled into the programs (0 = any).
#[derive(Clone, Debug, Default)]
pub struct KernelFilters {
    pub netns: u32,
    pub l4proto: u8,
    pub port: u16,
    pub host: Option<std::net::IpAddr>,
    pub reasons: Vec<Reason>,
    /// `--rate-limit`: records each CPU streams per second; above it the kernel counts drops in aggregates
    /// (`collect_aggregates`). 0 streams every drop.
    pub rate_limit: u64,
}

pub struct Tracer {
    pub(super) ebpf: Ebpf,
    /// Conntrack kprobes in kprobe mode, re-attached after nf_conntrack reloads.
    kprobe_links: Vec<(&'static str, KProbeLinkId)>,
    /// Why module events are not watched (None = they are).
    pub modules_unwatched: Option<String>,
    /// The delete_module tracepoints are attached (else unloads are seen as modules are freed).
    pub delete_module_watched: bool,
    /// Why sysctl writes are not watched when they could have been (None = they are, or the capabilities did
    /// not allow it and that was said at start).
    pub sysctls_unwatched: Option<String>,
    sysctls_watched: bool,
    /// nf_ct_delete, when evictions can be listed (kprobe mode, offsets of struct nf_conn known).
    eviction_target: Option<String>,
    /// The eviction probe's links (nf_ct_delete's kprobe and kretprobe) while it is armed.
    eviction_links: Vec<(&'static str, KProbeLinkId)>,
    /// The conntrack hook (6.4+), or why this kernel cannot have it.
    conntrack_hook: Result<super::conntrack_hook::ConntrackHook, String>,
    /// The nf_conntrack functions the kprobes are on (kprobe mode).
    kprobe_symbols: Option<super::kprobe::Symbols>,
    /// nf_conntrack was unloaded and its kprobes went with it (until `reattach_conntrack`).
    conntrack_gone: bool,
    /// Kprobe mode: the conntrack kprobes are attached whenever nf_conntrack is there.
    kprobe_mode: bool,
    /// struct nf_conn's offsets are known, so evictions can be listed (kprobe mode).
    evictions_listable: bool,
    /// The epoch the programs count their aggregates in.
    aggregate_epoch: super::aggregates::Epoch,
    /// `stop_programs` ran: nothing counts any more.
    stopped: bool,
    /// `CT_HOOK_FNS` holds the hook functions' addresses (looked up in /proc/kallsyms when the hook is first
    /// armed: a read of it takes tens of ms at start-up, and the kfree_skb program needs them only where armed).
    hook_functions_set: bool,
}

impl Tracer {
    /// Loads and attaches what the capabilities allow. `baselines` are the current counters of every netns that
    /// exists now.
    pub fn start(
        plan: &super::Plan,
        filters: &KernelFilters,
        baselines: &HashMap<u32, CtStats>,
        allowed: &crate::capabilities::Allowed,
    ) -> anyhow::Result<Tracer> {
        let btf = Btf::vmlinux().map_err(|e| {
            anyhow!("this kernel has no usable BTF ({e}): ctrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")
        })?;
        let (kernel_layout, _matcher) = layout::resolve(&btf)?;

        let host_version: u32;
        let mut host = [0u8; 16];
        match filters.host {
            Some(std::net::IpAddr::V4(a)) => {
                host_version = 4;
                host[..4].copy_from_slice(&a.octets());
            }
            Some(std::net::IpAddr::V6(a)) => {
                host_version = 6;
                host = a.octets();
            }
            None => host_version = 0,
        }
        let reasons: u32 = filters.reasons.iter().fold(0, |m, r| m | (1 << *r as u32));
        let l4proto = filters.l4proto as u32;
        let port = filters.port as u32;
        let kprobe_mode: u32 = matches!(plan, super::Plan::Kprobe(_)).into();
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let (l4_fmt, ct_l4_fmt) = super::kprobe::log_invalid_fmt_args(&release);

        let module_layout = if crate::modules::kernel_has_modules() {
            crate::modules::layout(&btf, std::path::Path::new(crate::modules::TRACEFS))
                .map_err(|e| format!("module events are not watched: {}", crate::brief(&e)))
        } else {
            Err(
                "this kernel has no loadable modules (CONFIG_MODULES is off): nf_conntrack is built in, so no \
reload can reset its sysctls"
                    .to_owned(),
            )
        };
        let module_globals = module_layout.as_ref().map(|(l, _)| *l).unwrap_or_default();
        let sysctl_task_helpers: u32 = crate::sysctl_watch::task_helpers(&release).into();
        let insert_failed_noisy: u32 = insert_failed_counts_resolved_clashes(&release).into();
        let stream_limit = u32::try_from(filters.rate_limit).unwrap_or(u32::MAX);
        // Parsed once, for the loader's relocations and the BTF tracepoints' targets (each parse takes tens of ms).
        let aya_btf = aya::Btf::from_sys_fs().context("cannot read /sys/kernel/btf/vmlinux")?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&aya_btf))
            .override_global("LAYOUT", &kernel_layout, true)
            .override_global("FILTER_NETNS", &filters.netns, true)
            .override_global("FILTER_L4PROTO", &l4proto, true)
            .override_global("FILTER_PORT", &port, true)
            .override_global("FILTER_REASONS", &reasons, true)
            .override_global("FILTER_HOST_VERSION", &host_version, true)
            .override_global("FILTER_HOST", &host, true)
            .override_global("KPROBE_MODE", &kprobe_mode, true)
            .override_global("L4PROTO_LOG_INVALID_FMT", &l4_fmt, true)
            .override_global("CT_L4PROTO_LOG_INVALID_FMT", &ct_l4_fmt, true)
            .override_global("MODULE_LAYOUT", &module_globals, true)
            .override_global("SYSCTL_TASK_HELPERS", &sysctl_task_helpers, true)
            .override_global("INSERT_FAILED_NOISY", &insert_failed_noisy, true)
            .override_global("STREAM_LIMIT", &stream_limit, true)
            .load(EBPF_OBJECT)
            .context("the kernel refused ctrace's BPF programs")?;

        super::kernel_totals::seed_baselines(&mut ebpf, baselines)?;

        let prog: &mut BtfTracePoint = ebpf
            .program_mut("skb_drop_kfree_skb")
            .context("program skb_drop_kfree_skb missing from the eBPF object")?
            .try_into()?;
        prog.load("kfree_skb", &aya_btf)
            .context("cannot load the kfree_skb BTF tracepoint program (needs BTF tracepoints, Linux 5.5+)")?;
        prog.attach().context("cannot attach to the skb:kfree_skb tracepoint")?;
        let mut eviction_target = None;
        let mut kprobe_links = vec![];
        let mut kprobe_symbols = None;
        let evictions_listable = kernel_layout.ct_tuple != 0;
        if let super::Plan::Kprobe(symbols) = plan {
            // Loaded now even when nf_conntrack is not there yet: attaching is all that is left when it loads.
            super::kprobe::load_all(&mut ebpf)?;
            if let Some(symbols) = symbols {
                kprobe_symbols = Some(symbols.clone());
                kprobe_links = super::kprobe::attach_all(&mut ebpf, symbols)?;
                if evictions_listable {
                    eviction_target = symbols.ct_delete.clone();
                }
            }
        }
        let (modules_unwatched, delete_module_watched) = match &module_layout {
            Ok((_, tracefs)) => match crate::modules::attach(&mut ebpf, &aya_btf, *tracefs && allowed.perf_events) {
                Ok(syscalls) => (None, syscalls),
                Err(e) => (Some(crate::brief(&e)), false),
            },
            Err(why) => (Some(why.clone()), false),
        };
        let sysctls_unwatched = if allowed.sysctl_watch {
            crate::sysctl_watch::attach(&mut ebpf)
                .err()
                .map(|e| format!("sysctl writes are not watched: {}", crate::brief(&e)))
        } else {
            None
        };
        let sysctls_watched = allowed.sysctl_watch && sysctls_unwatched.is_none();
        let conntrack_hook = if allowed.conntrack_hook {
            super::conntrack_hook::ConntrackHook::load(&ebpf, &btf, kernel_layout.skb_nfct)
                .map_err(|e| crate::brief(&e))
        } else {
            Err("ctrace lacks the capabilities it needs (said at start)".to_owned())
        };
        Ok(Tracer {
            ebpf,
            kprobe_links,
            modules_unwatched,
            delete_module_watched,
            sysctls_unwatched,
            sysctls_watched,
            eviction_target,
            eviction_links: vec![],
            conntrack_hook,
            kprobe_symbols,
            conntrack_gone: false,
            kprobe_mode: kprobe_mode != 0,
            evictions_listable,
            aggregate_epoch: Default::default(),
            stopped: false,
            hook_functions_set: false,
        })
    }

    /// Every probe ctrace attaches on this kernel, and whether it is attached now.
    pub fn probes(&self) -> Vec<crate::report::ProbeState> {
        use crate::report::ProbeState;
        let state = |probe: &str, kind, attached| ProbeState {
            probe: probe.to_owned(),
            kind,
            attached,
        };
        let mut v = vec![state("kfree_skb", "tp_btf", true)];
        if let Some(s) = &self.kprobe_symbols {
            let live = !self.conntrack_gone;
            v.push(state(&s.early_drop, "kprobe", live));
            for f in [&s.resolve_clash, &s.l4proto_log_invalid, &s.ct_l4proto_log_invalid]
                .into_iter()
                .flatten()
            {
                v.push(state(f, "kprobe", live));
            }
        }
        if let Some(target) = &self.eviction_target {
            v.push(state(target, "kprobe", !self.eviction_links.is_empty()));
        }
        // Without loadable modules there is nothing to watch: not a blind spot, so not listed.
        if crate::modules::kernel_has_modules() {
            let modules = self.modules_unwatched.is_none();
            for tp in ["module_load", "module_free", "sched_process_exec", "sched_process_exit"] {
                v.push(state(tp, "tp_btf", modules));
            }
            for tp in ["sys_enter_delete_module", "sys_exit_delete_module"] {
                v.push(state(tp, "tracepoint", modules && self.delete_module_watched));
            }
        }
        v.push(state(
            "cgroup/sysctl",
            "cgroup_sysctl",
            self.sysctls_unwatched.is_none(),
        ));
        v
    }

    /// nf_conntrack was unloaded: its kprobes are gone until it is back and `reattach_conntrack` ran.
    pub fn conntrack_unloaded(&mut self) {
        self.conntrack_gone = true;
    }

    /// The drops the kernel counted in aggregates since the last call (above the rate limit), each as the drop
    /// its packets share and their count. After `stop_programs`: everything that is left.
    pub fn collect_aggregates(&mut self) -> anyhow::Result<Vec<(crate::event::Drop, u64)>> {
        super::aggregates::collect(&mut self.ebpf, &mut self.aggregate_epoch, self.stopped)
    }

    /// Detaches and unloads every program, keeping the maps: totals, aggregates and records read afterwards
    /// are final and agree with each other.
    pub fn stop_programs(&mut self) {
        self.eviction_links.clear();
        self.kprobe_links.clear();
        if let Ok(hook) = self.conntrack_hook.as_mut() {
            for netns in hook.armed().collect::<Vec<_>>() {
                hook.disarm(netns);
            }
        }
        for (name, program) in self.ebpf.programs_mut() {
            let unloaded = match program {
                Program::BtfTracePoint(p) => p.unload(),
                Program::KProbe(p) => p.unload(),
                Program::TracePoint(p) => p.unload(),
                Program::CgroupSysctl(p) => p.unload(),
                _ => Ok(()),
            };
            if let Err(e) = unloaded {
                log::debug!("unloading {name}: {e}");
            }
        }
        self.stopped = true;
    }

    /// Whether early_drop evictions can be listed one by one on this kernel.
    pub fn can_watch_evictions(&self) -> bool {
        self.eviction_target.is_some()
    }

    /// Attaches (or detaches) the probes on nf_ct_delete that name evicted entries. They run for every deleted
    /// entry, so they are only attached while a table is nearly full.
    pub fn watch_evictions(&mut self, on: bool) -> anyhow::Result<()> {
        let Some(target) = self.eviction_target.clone() else {
            return Ok(());
        };
        let armed = !self.eviction_links.is_empty();
        if on == armed {
            return Ok(());
        }
        if on {
            // The return probe first: every call the entry probe sees then has its return seen too.
            for prog in ["conntrack_ct_delete_ret", "conntrack_ct_delete"] {
                let link = super::kprobe::program(&mut self.ebpf, prog)?
                    .attach(&target, 0)
                    .with_context(|| format!("cannot attach to {target}"));
                match link {
                    Ok(link) => self.eviction_links.push((prog, link)),
                    Err(e) => {
                        super::kprobe::detach_all(&mut self.ebpf, std::mem::take(&mut self.eviction_links));
                        return Err(e);
                    }
                }
            }
        } else {
            let mut links = std::mem::take(&mut self.eviction_links);
            links.reverse();
            super::kprobe::detach_all(&mut self.ebpf, links);
        }
        Ok(())
    }

    /// After nf_conntrack came (back): the old kprobes died with the old module; attach anew to the new
    /// module's functions and start attribution baselines from zero, for the netns that had one and for
    /// `known_netns` (a load starts the kernel's counters at zero). Returns the functions probed.
    pub fn reattach_conntrack(&mut self, known_netns: &[u32]) -> anyhow::Result<Vec<String>> {
        // The old module's probes are gone with it.
        self.eviction_links.clear();
        let ncpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        let mut baseline: PerCpuHashMap<_, u32, Baseline> =
            PerCpuHashMap::try_from(self.ebpf.map_mut("BASELINE").context("BASELINE map missing")?)?;
        let mut keys: Vec<u32> = baseline.keys().filter_map(Result::ok).collect();
        keys.extend(known_netns);
        keys.sort_unstable();
        keys.dedup();
        // The load zeroed every counter: zero is each known netns's new starting point.
        let zero = Baseline {
            state: baseline_state::SEEDED,
            ..Baseline::default()
        };
        for k in keys {
            let _ = baseline.insert(k, PerCpuValues::try_from(vec![zero; ncpus])?, 0);
        }
        // The new module's hook functions are elsewhere.
        if self.hook_functions_set {
            hook::set_conntrack_hook_functions(&mut self.ebpf)?;
        }
        if !self.kprobe_mode {
            return Ok(vec![]);
        }
        let old = std::mem::take(&mut self.kprobe_links);
        super::kprobe::detach_all(&mut self.ebpf, old);
        let symbols =
            super::kprobe::Symbols::find()?.context("nf_conntrack is back but early_drop is not in /proc/kallsyms")?;
        self.kprobe_links = super::kprobe::attach_all(&mut self.ebpf, &symbols)?;
        if self.evictions_listable {
            self.eviction_target = symbols.ct_delete.clone();
        }
        self.conntrack_gone = false;
        self.kprobe_symbols = Some(symbols.clone());
        Ok(symbols.describe().split(", ").map(String::from).collect())
    }

    pub fn take_module_events(&mut self) -> anyhow::Result<Option<RingBuf<MapData>>> {
        if self.modules_unwatched.is_some() {
            return Ok(None);
        }
        self.take_ring("MODULE_EVENTS").map(Some)
    }

    pub fn take_sysctl_events(&mut self) -> anyhow::Result<Option<RingBuf<MapData>>> {
        if !self.sysctls_watched {
            return Ok(None);
        }
        self.take_ring("SYSCTL_EVENTS").map(Some)
    }

    pub fn take_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        self.take_ring("EVENTS")
    }

    /// The ring buffer `name`, taken out of the object for the session to read.
    fn take_ring(&mut self, name: &str) -> anyhow::Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(name)
            .with_context(|| format!("{name} map missing"))?;
        Ok(RingBuf::try_from(map)?)
    }
}

/// Before 5.10 (and in RHEL 8's 4.18) a clash that conntrack resolves still counts as insert_failed,
/// with the packet accepted: the counter then carries noise.
fn insert_failed_counts_resolved_clashes(release: &str) -> bool {
    crate::check::facts::KernelVersion::parse(release).is_some_and(|k| !k.at_least(5, 10))
}
