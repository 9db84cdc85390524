//! The capabilities that deploy/systemd/ctrace.service (and the Kubernetes DaemonSet) grant, measured: `ctrace run`
//! started by `setpriv` with exactly the unit's capability set does everything it does with all of root's, and
//! without any one of them a named feature fails. Truth: the DROP rules' own counters, the sysctl written, the
//! kernel's counters; the README's capability table is this test's table.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, UdpSocket},
    process::{Child, Command},
    time::Duration,
};

use ctrace_tests::{
    Ctrace, TestNetns, ctrace_bin,
    packets::{RawTcp, TCP_FIN, TCP_SYN},
    prometheus::{free_port, http_get},
    require_root,
};
use serde_json::Value;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd/ctrace.service");
const DAEMONSET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/kubernetes/ctrace-daemonset.yaml"
);
/// Rounds of (one invalid segment, one raw-table drop) before and after the conntrack hook can be armed.
const BEFORE_HOOK: u32 = 5;
const AFTER_HOOK: u32 = 20;
const CONTAINER_DROPS: u32 = 5;
const DROP_PORT: u16 = 7;
const NOISE_PORT: u16 = 9;
const SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close";

/// What worked in one run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Feature {
    /// ctrace started and attached (else its one line on stderr says why not).
    #[default]
    Starts,
    /// The metrics endpoint answered with every probe attached.
    Metrics,
    /// The in-kernel totals of both netns equal the DROP rules' counters.
    ExactTotals,
    /// The kernel's conntrack counters of an `ip netns` (entered with setns).
    NamedNetnsCounters,
    /// The kernel's conntrack counters of a netns only a fully privileged process is in (found in /proc).
    ContainerNetnsCounters,
    /// A sysctl write seen by the cgroup/sysctl program.
    SysctlWrites,
    /// The conntrack hook armed and settling ct-less drops amid invalid noise.
    ConntrackHook,
}

const ALL: [Feature; 7] = [
    Feature::Starts,
    Feature::Metrics,
    Feature::ExactTotals,
    Feature::NamedNetnsCounters,
    Feature::ContainerNetnsCounters,
    Feature::SysctlWrites,
    Feature::ConntrackHook,
];

/// A network namespace that only a process with all of root's capabilities is in (as a container's is): no
/// /run/netns entry, so ctrace finds it through /proc/PID/task/TID/ns/net.
struct ContainerNetns {
    holder: Child,
}

impl ContainerNetns {
    fn new() -> ContainerNetns {
        let holder = Command::new("unshare")
            .args(["--net", "--", "sleep", "600"])
            .spawn()
            .expect("cannot run unshare");
        let c = ContainerNetns { holder };
        // unshare has entered the new netns once /proc shows another inode than ours.
        for _ in 0..100 {
            if c.inode() != own_netns() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_ne!(c.inode(), own_netns(), "unshare --net did not enter a new netns");
        c.exec(&["ip", "link", "set", "lo", "up"]);
        c.exec(&[
            "iptables",
            "-w",
            "-A",
            "OUTPUT",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW,ESTABLISHED",
            "-j",
            "ACCEPT",
        ]);
        c.exec(&[
            "iptables",
            "-w",
            "-I",
            "OUTPUT",
            "-p",
            "udp",
            "--dport",
            "7",
            "-m",
            "comment",
            "--comment",
            "truth",
            "-j",
            "DROP",
        ]);
        c
    }

    fn path(&self) -> String {
        format!("/proc/{}/ns/net", self.holder.id())
    }

    fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(self.path()).map(|m| m.ino()).unwrap_or(0)
    }

    fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.path()))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn send(&self, count: u32) {
        let path = self.path();
        std::thread::spawn(move || {
            let f = std::fs::File::open(path).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            for _ in 0..count {
                let _ = udp.send_to(b"x", (Ipv4Addr::LOCALHOST, DROP_PORT));
            }
        })
        .join()
        .unwrap();
    }
}

impl Drop for ContainerNetns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn own_netns() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self/ns/net").unwrap().ino()
}

/// Rounds of (one SYN|FIN segment conntrack counts invalid and lets through, one UDP datagram the raw table drops).
fn noise_and_drops(ns: &TestNetns, rounds: std::ops::Range<u32>) {
    ns.in_netns(move || {
        let raw = RawTcp::open()?;
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        for i in rounds {
            raw.send(Ipv4Addr::LOCALHOST, 40000 + i as u16, NOISE_PORT, i, TCP_SYN | TCP_FIN)?;
            let _ = udp.send_to(b"x", (Ipv4Addr::LOCALHOST, DROP_PORT));
        }
        Ok(())
    })
    .unwrap();
}

/// The capability names (`CAP_BPF`, ...) of the unit's `CapabilityBoundingSet=`.
fn unit_capabilities() -> Vec<String> {
    let text = std::fs::read_to_string(UNIT).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit has no CapabilityBoundingSet= line");
    line.split_whitespace().map(str::to_owned).collect()
}

/// `setpriv` starting ctrace as root with only `caps` (permitted, effective and bounding set).
fn with_caps(caps: &[String]) -> Command {
    let list: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let list: String = list.iter().map(|c| format!(",{c}")).collect();
    let mut cmd = Command::new("setpriv");
    if let Ok(uid) = std::env::var("CTRACE_CAPS_UID") {
        cmd.args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .arg(format!("--inh-caps=-all{list}"))
            .arg(format!("--ambient-caps=-all{list}"));
    } else {
        cmd.arg("--inh-caps=-all");
    }
    cmd.arg(format!("--bounding-set=-all{list}"))
        .arg("--")
        .arg(ctrace_bin());
    cmd
}

/// Runs ctrace under `cmd` through the workload; returns what worked, and ctrace's stderr when it did not start.
fn measure(cmd: Command) -> (BTreeSet<Feature>, String) {
    let ns = TestNetns::new("caps").unwrap();
    ns.exec(&[
        "iptables",
        "-w",
        "-t",
        "raw",
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "--dport",
        "7",
        "-m",
        "comment",
        "--comment",
        "truth",
        "-j",
        "DROP",
    ])
    .unwrap();
    let container = ContainerNetns::new();
    let mut worked = BTreeSet::new();
    let stderr_path = std::env::temp_dir().join(format!("ctrace-caps-{}.err", std::process::id()));
    let mut cmd = cmd;
    cmd.stderr(std::fs::File::create(&stderr_path).unwrap());
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let ctrace = Ctrace::start_command(cmd, &["--rate-limit", "0", "--metrics", &metrics]);
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let Ok(mut ctrace) = ctrace else {
        return (worked, stderr());
    };
    worked.insert(Feature::Starts);

    noise_and_drops(&ns, 0..BEFORE_HOOK);
    let armed = ctrace
        .wait_for(Duration::from_secs(3), |v| {
            v["event"] == "notice" && v["message"].as_str().is_some_and(|m| m.contains("conntrack hook"))
        })
        .unwrap()
        .is_some_and(|n| n["message"].as_str().is_some_and(|m| m.contains("armed")));
    std::thread::sleep(Duration::from_millis(50));
    let first_after = ctrace.events.len();
    noise_and_drops(&ns, BEFORE_HOOK..BEFORE_HOOK + AFTER_HOOK);
    ns.in_netns(|| Ok(std::fs::write(SYSCTL, "13")?)).unwrap();
    container.send(CONTAINER_DROPS);
    // Let the one-second status reach the endpoint.
    std::thread::sleep(Duration::from_millis(1500));
    let body = http_get(&format!("127.0.0.1:{port}"), "/metrics").unwrap_or_default();
    let probes: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("ctrace_probe_attached{"))
        .collect();
    if !probes.is_empty() && probes.iter().all(|l| l.ends_with(" 1")) {
        worked.insert(Feature::Metrics);
    }
    let (events, summary) = ctrace.stop().unwrap();

    let by_netns = |inode: u64| {
        summary["by_netns"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["netns"] == inode).cloned())
            .unwrap_or_default()
    };
    let total = |n: &Value| -> u64 {
        n["drops"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    };
    let (a, b) = (by_netns(ns.inode()), by_netns(container.inode()));
    let rule_a = ns.rule_packets("iptables", "raw", "OUTPUT", "truth").unwrap();
    let rule_b = ctrace_tests::rule_packets(&container.exec(&["iptables", "-w", "-vnxL", "OUTPUT"]), "truth").unwrap();
    assert_eq!(
        (rule_a, rule_b),
        ((BEFORE_HOOK + AFTER_HOOK) as u64, CONTAINER_DROPS as u64),
        "the workload dropped what it meant to"
    );
    if total(&a) == rule_a && total(&b) == rule_b {
        worked.insert(Feature::ExactTotals);
    }
    if a.get("kernel_counters").is_some() {
        worked.insert(Feature::NamedNetnsCounters);
    }
    if b.get("kernel_counters").is_some() {
        worked.insert(Feature::ContainerNetnsCounters);
    }
    if events
        .iter()
        .any(|v| v["event"] == "sysctl_write" && v["netns"] == ns.inode() && v["new"] == "13")
    {
        worked.insert(Feature::SysctlWrites);
    }
    let exact_after = events[first_after..]
        .iter()
        .filter(|v| {
            v["event"] == "drop"
                && v["netns"] == ns.inode()
                && v["reason"] == "netfilter_rule"
                && v["attribution"] == "hook"
        })
        .count() as u32;
    if armed && exact_after == AFTER_HOOK {
        worked.insert(Feature::ConntrackHook);
    }
    println!(
        "  totals A {} (rule {rule_a}) B {} (rule {rule_b}); hook armed {armed}, exact by hook after {exact_after}/{AFTER_HOOK}; probes {probes:?}",
        total(&a),
        total(&b)
    );
    let _ = std::fs::remove_file(&stderr_path);
    (worked, stderr())
}

fn show(label: &str, worked: &BTreeSet<Feature>, stderr: &str) {
    let missing: Vec<&Feature> = ALL.iter().filter(|f| !worked.contains(f)).collect();
    println!(
        "{label}: {}{}",
        if missing.is_empty() {
            "everything works".to_owned()
        } else {
            format!("fails: {missing:?}")
        },
        stderr
            .lines()
            .next()
            .map(|l| format!("; stderr: {l}"))
            .unwrap_or_default()
    );
}

/// What each of the unit's capabilities is for, as measured on this host: the features lost without it.
const LOST_WITHOUT: [(&str, &[Feature]); 3] = [
    // ctrace's own check refuses to start; the kernel needs it for setns (and it stands in for CAP_BPF,
    // CAP_PERFMON and CAP_NET_ADMIN in the BPF checks).
    ("CAP_SYS_ADMIN", &ALL),
    ("CAP_SYS_PTRACE", &[Feature::ContainerNetnsCounters]),
    ("CAP_SYSLOG", &[Feature::ConntrackHook]),
];

/// With exactly the unit's capabilities ctrace does everything; without any one of them it loses what the table
/// says (and the README's capability table is this one).
#[test]
fn the_units_capabilities_are_enough_and_each_is_needed() {
    require_root();
    let caps = unit_capabilities();
    let (worked, stderr) = measure(with_caps(&caps));
    show(&caps.join(" "), &worked, &stderr);
    assert_eq!(
        worked,
        ALL.into_iter().collect(),
        "the unit's capabilities are not enough: {stderr}"
    );
    let mut table: Vec<&str> = LOST_WITHOUT.iter().map(|(c, _)| *c).collect();
    table.sort();
    let mut unit: Vec<&str> = caps.iter().map(String::as_str).collect();
    unit.sort();
    assert_eq!(
        unit, table,
        "the unit's CapabilityBoundingSet= and the measured table differ"
    );
    for (cap, lost) in LOST_WITHOUT {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        let (worked, stderr) = measure(with_caps(&fewer));
        show(&format!("without {cap}"), &worked, &stderr);
        let missing: Vec<Feature> = ALL.into_iter().filter(|f| !worked.contains(f)).collect();
        assert_eq!(missing, lost.to_vec(), "without {cap}: {stderr}");
    }
}

/// The DaemonSet adds the unit's capabilities (and drops the rest).
#[test]
fn the_daemonset_grants_the_units_capabilities() {
    let yaml = std::fs::read_to_string(DAEMONSET).unwrap();
    let add = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .and_then(|l| l.strip_suffix(']'))
        .expect("no `add: [...]` line in the DaemonSet");
    let mut k8s: Vec<String> = add
        .split(',')
        .map(|c| format!("CAP_{}", c.trim().trim_matches('"')))
        .collect();
    k8s.sort();
    let mut unit = unit_capabilities();
    unit.sort();
    assert_eq!(k8s, unit, "the DaemonSet's capabilities differ from the unit's");
    assert!(
        yaml.contains("drop: [\"ALL\"]"),
        "the DaemonSet keeps the runtime's default capabilities"
    );
}

/// Exploration: `CTRACE_CAPS="all;CAP_SYS_ADMIN CAP_SYSLOG" [CTRACE_CAPS_UID=65534] ... -- --ignored measure_sets`
/// prints what works with each set (`all`: ctrace with all of root's capabilities).
#[test]
#[ignore]
fn measure_sets() {
    require_root();
    let sets = std::env::var("CTRACE_CAPS").unwrap_or_default();
    for set in sets.split(';') {
        let caps: Vec<String> = set.split_whitespace().map(str::to_owned).collect();
        let cmd = if set.trim() == "all" {
            Command::new(ctrace_bin())
        } else {
            with_caps(&caps)
        };
        let (worked, stderr) = measure(cmd);
        show(set, &worked, &stderr);
    }
}
