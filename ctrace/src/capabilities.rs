//! What ctrace can do with the capabilities it has, feature by feature. Measured with reduced capability sets
//! (as root with a reduced bounding set, and as uid 65534 with ambient capabilities) on Linux 6.18 and in Debian
//! 6.1 and 6.12 guests (tests/tests/capabilities.rs):
//!
//! | feature | needs |
//! |---|---|
//! | maps, ring buffers, tp_btf programs and their attachment (drops, module loads and unloads) | CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) |
//! | perf events, through which kprobes and the delete_module tracepoints attach | CAP_PERFMON; CAP_SYS_ADMIN where kernel.perf_event_paranoid > 2 (Debian's and Ubuntu's patch; Debian's default is 3) |
//! | the cgroup/sysctl program (sysctl writes), the BPF netfilter programs (the conntrack hook) | CAP_NET_ADMIN (or CAP_SYS_ADMIN) |
//! | entering another netns (setns): counters of `ip netns` netns, their sysctls, linking the hook there | CAP_SYS_ADMIN |
//! | `/proc/PID/task/*/ns/net` of other users' processes, or of processes with capabilities ctrace lacks | CAP_SYS_PTRACE |
//! | kernel addresses in /proc/kallsyms (where conntrack's hook functions are) | CAP_SYSLOG (unless kptr_restrict and perf_event_paranoid allow everyone) |
//! | tracefs (the delete_module tracepoints' formats), nf_conntrack's `hashsize` parameter | uid 0 or CAP_DAC_READ_SEARCH |
//!
//! Without the first row ctrace cannot run at all; without any other it runs and says once, at start, what will
//! not work.

use std::path::Path;

pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYSLOG: u32 = 34;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// A set of capabilities (bit N = capability N), e.g. the effective set of this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    /// This process's effective capabilities (empty when they cannot be read).
    pub fn effective() -> CapSet {
        Self::read_effective().unwrap_or_default()
    }

    /// This process's effective capabilities, or None when `/proc/self/status` cannot be read or has no CapEff.
    pub fn read_effective() -> Option<CapSet> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        parse_cap_eff(&status).map(CapSet)
    }

    pub fn has(self, cap: u32) -> bool {
        self.0 & (1u64 << cap) != 0
    }

    /// The kernel takes CAP_SYS_ADMIN for CAP_BPF, CAP_PERFMON and (for BPF program types) CAP_NET_ADMIN.
    fn has_or_admin(self, cap: u32) -> bool {
        self.has(cap) || self.has(CAP_SYS_ADMIN)
    }
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// What the process is, besides its capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub caps: CapSet,
    pub uid: u32,
    /// /proc/kallsyms shows addresses to this process.
    pub kallsyms_addresses: bool,
    /// The kernel has loadable modules (module events and hashsize resets exist).
    pub modules: bool,
    /// The process is in the initial user namespace (capabilities elsewhere do not count for BPF).
    pub init_userns: bool,
    /// kernel.perf_event_paranoid: above 2 (a Debian/Ubuntu patch) perf events need CAP_SYS_ADMIN.
    pub perf_event_paranoid: i64,
    /// The kernel has the kprobe PMU.
    pub kprobes: bool,
}

impl Context {
    pub fn current() -> Context {
        Context {
            caps: CapSet::effective(),
            uid: nix::unistd::geteuid().as_raw(),
            kallsyms_addresses: crate::kallsyms::addresses_visible(),
            modules: crate::modules::kernel_has_modules(),
            init_userns: in_init_userns(),
            perf_event_paranoid: std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(2),
            kprobes: crate::probes::kernel_has_kprobes(),
        }
    }
}

/// The identity map `0 0 4294967295` is the initial user namespace's.
fn in_init_userns() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .map(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
        .unwrap_or(true)
}

/// The features that depend on more than the core capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// The cgroup/sysctl program on the cgroup root.
    pub sysctl_watch: bool,
    /// BPF netfilter programs linked in netns ctrace enters, at conntrack's hook functions found in kallsyms.
    pub conntrack_hook: bool,
    /// perf events: kprobes (kprobe mode) and the delete_module tracepoints.
    pub perf_events: bool,
}

impl Default for Allowed {
    fn default() -> Allowed {
        Allowed {
            sysctl_watch: true,
            conntrack_hook: true,
            perf_events: true,
        }
    }
}

/// What ctrace can do here, and one sentence per missing capability saying what will not work.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assessment {
    pub allowed: Allowed,
    pub sentences: Vec<String>,
}

/// Why `ctrace run` cannot run at all here, as one sentence that says what to do; None when it can.
pub fn cannot_run(cx: &Context) -> Option<String> {
    if !cx.init_userns {
        return Some(
            "ctrace runs in a user namespace (a container without host privileges): BPF needs its capabilities in \
             the initial user namespace; run it on the host"
                .to_owned(),
        );
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(c, _)| !cx.caps.has_or_admin(*c))
        .map(|(_, name)| name)
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "ctrace needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) to load its tracing programs (missing {}): run \
             it as root, or grant them (e.g. AmbientCapabilities=CAP_BPF CAP_PERFMON in its systemd unit)",
            missing.join(", ")
        )
    })
}

/// `ctrace demo` makes its own netns, rules and (with --lower-global-max) changes a global sysctl: it needs root.
pub fn cannot_demo(cx: &Context) -> Option<String> {
    if let Some(why) = cannot_run(cx) {
        return Some(why);
    }
    let missing: Vec<&str> = [(CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")]
        .into_iter()
        .filter(|(c, _)| !cx.caps.has(*c))
        .map(|(_, name)| name)
        .collect();
    (!missing.is_empty() || cx.uid != 0).then(|| {
        format!(
            "ctrace demo makes its own network namespace and firewall rules and needs root (missing {}): run it with \
             sudo",
            if missing.is_empty() {
                "uid 0".to_owned()
            } else {
                missing.join(", ")
            }
        )
    })
}

/// Which features the capabilities allow, and a sentence for each missing one.
pub fn assess(cx: &Context) -> Assessment {
    let caps = cx.caps;
    let mut a = Assessment::default();
    a.allowed.perf_events = caps.has(CAP_SYS_ADMIN) || (caps.has(CAP_PERFMON) && cx.perf_event_paranoid <= 2);
    if !caps.has_or_admin(CAP_NET_ADMIN) {
        a.allowed.sysctl_watch = false;
        a.allowed.conntrack_hook = false;
        a.sentences.push(
            "without CAP_NET_ADMIN: sysctl writes are not watched (the cgroup/sysctl program needs it) and the \
             conntrack hook is not armed (BPF netfilter programs need it), so ct-less drops amid invalid packets stay \
             uncertain"
                .to_owned(),
        );
    }
    if !caps.has(CAP_SYS_ADMIN) {
        a.allowed.conntrack_hook = false;
        let mut sentence = "without CAP_SYS_ADMIN: ctrace cannot enter other network namespaces, so it reads no \
                            conntrack counters of a netns only a bind mount keeps (ip netns add; early_drop evictions \
                            there are not counted), sees no sysctl resets in other netns and arms no conntrack hook"
            .to_owned();
        if !a.allowed.perf_events && (cx.kprobes || cx.modules) {
            sentence.push_str(&format!(
                "; and kernel.perf_event_paranoid={} reserves perf events to it, so no kprobes (tracepoint mode: no \
                 kernel reason text, no listed evictions) and no delete_module tracepoints (unloads are seen as the \
                 module is freed, refusals by modprobe and rmmod from their exit status)",
                cx.perf_event_paranoid
            ));
        }
        a.sentences.push(sentence);
    }
    if !caps.has(CAP_SYS_PTRACE) {
        a.sentences.push(
            "without CAP_SYS_PTRACE: ctrace cannot see which netns the processes of other users, or with \
             capabilities it lacks, are in (/proc/PID/task/*/ns/net), so drops in those netns carry no name and \
             their conntrack counters (early_drop evictions) are not read"
                .to_owned(),
        );
    }
    if !cx.kallsyms_addresses {
        a.allowed.conntrack_hook = false;
        a.sentences.push(
            "without CAP_SYSLOG: /proc/kallsyms hides kernel addresses, so the conntrack hook cannot check where \
             conntrack runs and is not armed"
                .to_owned(),
        );
    }
    let reads_root_files = cx.uid == 0 || caps.has(CAP_DAC_READ_SEARCH) || caps.has(CAP_DAC_OVERRIDE);
    if cx.modules && !reads_root_files && !Path::new(crate::modules::TRACEFS).join("events").exists() {
        a.sentences.push(format!(
            "without CAP_DAC_READ_SEARCH (or uid 0): tracefs ({}) and nf_conntrack's hashsize parameter are root's \
             only, so the delete_module tracepoints are not attached (unloads are seen as the module is freed, \
             refusals by modprobe and rmmod from their exit status) and hashsize resets are not reported",
            crate::modules::TRACEFS
        ));
    }
    a
}

/// Old kernels charge BPF maps to RLIMIT_MEMLOCK; lift it (harmless where memcg accounting is used).
pub fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(caps: &[u32]) -> Context {
        Context {
            caps: CapSet(caps.iter().fold(0, |m, c| m | 1 << c)),
            uid: 0,
            kallsyms_addresses: true,
            modules: false,
            init_userns: true,
            perf_event_paranoid: 2,
            kprobes: false,
        }
    }

    fn starts(a: &Assessment) -> Vec<&str> {
        a.sentences.iter().map(|s| s.split(':').next().unwrap()).collect()
    }

    #[test]
    fn reads_the_effective_set() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn the_core_needs_bpf_and_perfmon_or_sys_admin() {
        assert!(cannot_run(&cx(&[CAP_BPF, CAP_PERFMON])).is_none());
        assert!(cannot_run(&cx(&[CAP_SYS_ADMIN])).is_none());
        let why = cannot_run(&cx(&[CAP_BPF])).unwrap();
        assert!(
            why.contains("missing CAP_PERFMON") && why.contains("AmbientCapabilities"),
            "{why}"
        );
        let contained = Context {
            init_userns: false,
            ..cx(&[CAP_SYS_ADMIN])
        };
        assert!(cannot_run(&contained).unwrap().contains("user namespace"));
    }

    #[test]
    fn one_sentence_per_missing_capability() {
        let a = assess(&cx(&[CAP_BPF, CAP_PERFMON]));
        assert_eq!(
            starts(&a),
            [
                "without CAP_NET_ADMIN",
                "without CAP_SYS_ADMIN",
                "without CAP_SYS_PTRACE"
            ]
        );
        assert!(!a.allowed.sysctl_watch && !a.allowed.conntrack_hook);
        let a = assess(&cx(&[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN]));
        assert_eq!(starts(&a), ["without CAP_SYS_ADMIN", "without CAP_SYS_PTRACE"]);
        assert!(a.allowed.sysctl_watch && !a.allowed.conntrack_hook);
        // CAP_SYS_ADMIN alone stands in for CAP_NET_ADMIN (and CAP_BPF, CAP_PERFMON).
        let a = assess(&cx(&[CAP_SYS_ADMIN]));
        assert_eq!(starts(&a), ["without CAP_SYS_PTRACE"]);
        assert_eq!(a.allowed, Allowed::default());
        let all = assess(&cx(&[CAP_SYS_ADMIN, CAP_SYS_PTRACE]));
        assert!(all.sentences.is_empty());
        let hidden = Context {
            kallsyms_addresses: false,
            ..cx(&[CAP_SYS_ADMIN, CAP_SYS_PTRACE])
        };
        let a = assess(&hidden);
        assert_eq!(starts(&a), ["without CAP_SYSLOG"]);
        assert!(a.allowed.sysctl_watch && !a.allowed.conntrack_hook);
    }

    #[test]
    fn where_perf_events_need_sys_admin_the_sentence_says_what_goes() {
        let debian = |caps: &[u32]| Context {
            perf_event_paranoid: 3,
            kprobes: true,
            modules: true,
            ..cx(caps)
        };
        let a = assess(&debian(&[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_PTRACE]));
        assert!(!a.allowed.perf_events);
        assert_eq!(starts(&a), ["without CAP_SYS_ADMIN"]);
        assert!(a.sentences[0].contains("perf_event_paranoid=3") && a.sentences[0].contains("tracepoint mode"));
        assert!(assess(&debian(&[CAP_SYS_ADMIN])).allowed.perf_events);
        let upstream = Context {
            perf_event_paranoid: 2,
            ..debian(&[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_PTRACE])
        };
        let a = assess(&upstream);
        assert!(a.allowed.perf_events && !a.sentences[0].contains("perf_event_paranoid"));
    }

    #[test]
    fn the_demo_needs_root() {
        assert!(cannot_demo(&cx(&[CAP_SYS_ADMIN, CAP_NET_ADMIN])).is_none());
        assert!(
            cannot_demo(&cx(&[CAP_BPF, CAP_PERFMON]))
                .unwrap()
                .contains("missing CAP_SYS_ADMIN, CAP_NET_ADMIN")
        );
    }
}
