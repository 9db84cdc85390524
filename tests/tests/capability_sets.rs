//! ctrace with reduced capability sets (as root with a cut bounding set, and as uid 65534 with ambient
//! capabilities; capabilities.rs measures the deployment unit's set): it runs with what it has, says once at start
//! one sentence per missing capability, and what
//! those sentences promise holds. Truth: a DROP rule's own counter and the refused sends (exact whatever the
//! capabilities), a sysctl write this test makes, the counters of a netns only a bind mount keeps (readable only
//! by entering it), the counters of a netns only a thread of this (fully privileged) test process is in
//! (findable only with CAP_SYS_PTRACE), and in guests with modules a refused `rmmod` by root.
//! Runs on the host and, in kprobe mode, in the VM guests (where it also measures kprobes and module events
//! with CAP_BPF and CAP_PERFMON only).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, UdpSocket},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use ctrace::capabilities::{
    CAP_BPF, CAP_DAC_READ_SEARCH, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYSLOG,
};
use ctrace_tests::{Ctrace, TestNetns, caps, require_root, threads};
use serde_json::Value;

const PORT: u16 = 7;
const DROPS: u32 = 20;
const NOBODY: u32 = 65534;
const TIMEOUT_KEY: &str = "net.netfilter.nf_conntrack_tcp_timeout_established";

fn sysctl(name: &str) -> i64 {
    std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(2)
}

/// Whether /proc/kallsyms shows addresses to a process with (or without) CAP_SYSLOG, by the kernel's rule
/// (kallsyms_show_value): kptr_restrict 0 with perf_event_paranoid <= 1 shows them to everyone, kptr_restrict
/// 0 or 1 to CAP_SYSLOG, 2 to nobody.
fn kallsyms_shown(syslog: bool) -> bool {
    match sysctl("kptr_restrict") {
        0 => sysctl("perf_event_paranoid") <= 1 || syslog,
        1 => syslog,
        _ => false,
    }
}

fn kernel_has_modules() -> bool {
    std::path::Path::new("/proc/modules").exists()
}

/// Whether uid 65534 may read tracefs (only the owner, root, may where its mode is 0700).
fn tracefs_open_to_others() -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata("/sys/kernel/tracing").is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005)
}

struct Case {
    name: &'static str,
    uid: u32,
    caps: &'static [u32],
    /// Also in the VM guests (each run of ctrace costs half a minute there; the others measure nothing
    /// guest-specific).
    guests: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "bpf+perfmon",
        uid: 0,
        caps: &[CAP_BPF, CAP_PERFMON],
        guests: true,
    },
    Case {
        name: "bpf+perfmon+net_admin",
        uid: 0,
        caps: &[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN],
        guests: false,
    },
    Case {
        name: "sys_admin",
        uid: 0,
        caps: &[CAP_SYS_ADMIN],
        guests: true,
    },
    Case {
        name: "uid 65534 with ambient capabilities",
        uid: NOBODY,
        caps: &[
            CAP_BPF,
            CAP_PERFMON,
            CAP_NET_ADMIN,
            CAP_SYS_ADMIN,
            CAP_SYS_PTRACE,
            CAP_SYSLOG,
        ],
        guests: false,
    },
];

impl Case {
    fn has(&self, cap: u32) -> bool {
        self.caps.contains(&cap)
    }

    fn net_admin(&self) -> bool {
        self.has(CAP_NET_ADMIN) || self.has(CAP_SYS_ADMIN)
    }

    /// perf events (kprobes): CAP_PERFMON, but CAP_SYS_ADMIN where kernel.perf_event_paranoid > 2 (Debian's patch).
    fn perf_events(&self) -> bool {
        self.has(CAP_SYS_ADMIN) || (self.has(CAP_PERFMON) && sysctl("perf_event_paranoid") <= 2)
    }

    /// The mode the run expects (the guests expect kprobe mode) for this case: no perf events, no kprobes.
    fn expected_mode(&self) -> Option<String> {
        let want = std::env::var("CTRACE_TEST_EXPECT_MODE").ok()?;
        Some(if want == "kprobe" && !self.perf_events() {
            "tracepoint".to_owned()
        } else {
            want
        })
    }

    /// The delete_module tracepoints' formats are in tracefs: uid 0 owns it; others need CAP_DAC_READ_SEARCH or an
    /// open mode.
    fn reads_tracefs(&self) -> bool {
        self.uid == 0 || self.has(CAP_DAC_READ_SEARCH) || tracefs_open_to_others()
    }

    /// The capabilities ctrace must name, by the table in ctrace/src/capabilities.rs.
    fn expected_sentences(&self) -> BTreeSet<&'static str> {
        let mut s = BTreeSet::new();
        if !self.net_admin() {
            s.insert("CAP_NET_ADMIN");
        }
        if !self.has(CAP_SYS_ADMIN) {
            s.insert("CAP_SYS_ADMIN");
        }
        if !self.has(CAP_SYS_PTRACE) {
            s.insert("CAP_SYS_PTRACE");
        }
        if !kallsyms_shown(self.has(CAP_SYSLOG)) {
            s.insert("CAP_SYSLOG");
        }
        if kernel_has_modules() && !self.reads_tracefs() {
            s.insert("CAP_DAC_READ_SEARCH");
        }
        s
    }
}

/// A thread of this process in a netns of its own (no bind mount) with a DROP rule for PORT; it sends DROPS
/// datagrams when told and then waits to be let go. Returns its netns inode, and the channels.
fn thread_netns() -> (u64, mpsc::Sender<bool>, mpsc::Receiver<u32>) {
    let (go_tx, go_rx) = mpsc::channel::<bool>();
    let (tx, rx) = mpsc::channel::<u32>();
    let (inode_tx, inode_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let inode = threads::enter_new_netns().unwrap();
        // Children of this thread start in its netns.
        let ok = Command::new("iptables")
            .args([
                "-w",
                "-I",
                "OUTPUT",
                "-p",
                "udp",
                "--dport",
                &PORT.to_string(),
                "-j",
                "DROP",
            ])
            .stderr(Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "iptables in the thread's netns failed");
        inode_tx.send(inode).unwrap();
        while let Ok(true) = go_rx.recv() {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let refused = (0..DROPS)
                .filter(|_| sock.send_to(b"x", (Ipv4Addr::LOCALHOST, PORT)).is_err())
                .count();
            tx.send(refused as u32).unwrap();
        }
    });
    (inode_rx.recv().unwrap(), go_tx, rx)
}

fn notices(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|v| v["event"] == "notice")
        .filter_map(|v| v["message"].as_str().map(str::to_owned))
        .collect()
}

/// The capability each "without CAP_X: ..." notice names.
fn named_capabilities(notices: &[String]) -> Vec<String> {
    notices
        .iter()
        .filter_map(|m| m.strip_prefix("without "))
        .filter_map(|m| m.split([' ', ':']).next().map(str::to_owned))
        .collect()
}

fn kernel_counters_of(summary: &Value, netns: u64) -> bool {
    summary["by_netns"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["netns"] == netns && n["kernel_counters"].is_object())
}

#[test]
fn runs_with_the_capabilities_it_has_and_says_what_it_lacks() {
    require_root();
    let named = TestNetns::new("caps").unwrap();
    named.drop_udp_to(7, "truth").unwrap();
    let (thread_inode, go, refused_rx) = thread_netns();
    let mut failures = vec![];
    for case in CASES.iter().filter(|c| c.guests || !kernel_has_modules()) {
        let args = ["--rate-limit", "0", "--proto", "udp", "--port", "7"];
        let mut cmd = Command::new(ctrace_tests::ctrace_bin());
        caps::restrict(&mut cmd, case.caps, case.uid);
        let ctrace = Ctrace::start_expecting(cmd, &args, case.expected_mode())
            .unwrap_or_else(|e| panic!("{}: ctrace did not run: {e:#}", case.name));
        let mode = ctrace
            .events
            .iter()
            .find(|v| v["event"] == "mode")
            .map(|v| v["mode"].to_string())
            .unwrap_or_default();
        let rule_before = named.rule_packets("iptables", "filter", "OUTPUT", "truth").unwrap();
        let (_, refused_named) = named.udp_flows(0, DROPS, PORT).unwrap();
        go.send(true).unwrap();
        let refused_thread = refused_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let rule = named.rule_packets("iptables", "filter", "OUTPUT", "truth").unwrap() - rule_before;
        named.exec(&["sysctl", "-w", &format!("{TIMEOUT_KEY}=7200")]).unwrap();
        let rmmod = kernel_has_modules().then(|| {
            let mut child = Command::new("rmmod")
                .arg("nf_conntrack")
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let pid = child.id();
            let status = child.wait().unwrap();
            assert!(!status.success(), "nf_conntrack is held: rmmod must fail");
            pid
        });
        std::thread::sleep(Duration::from_millis(500));
        let (events, summary) = ctrace.stop().unwrap_or_else(|e| panic!("{}: {e:#}", case.name));

        let said = named_capabilities(&notices(&events));
        let expected: Vec<String> = case.expected_sentences().into_iter().map(String::from).collect();
        let mut said_sorted = said.clone();
        said_sorted.sort();
        let truth = u64::from(refused_named) + u64::from(refused_thread);
        let sysctl_seen = events
            .iter()
            .any(|v| v["event"] == "sysctl_write" && v["key"] == TIMEOUT_KEY && v["netns"] == named.inode());
        let module_seen = rmmod.is_some_and(|pid| {
            events
                .iter()
                .any(|v| v["event"] == "module" && v["pid"] == pid && v["action"] == "unload_failed")
        });
        let named_counters = kernel_counters_of(&summary, named.inode());
        let thread_counters = kernel_counters_of(&summary, thread_inode);
        println!(
            "case caps {} (uid {}): {mode} mode; said without {said:?}; truth {truth} (rule counter {rule}, refused {refused_named} \
             + {refused_thread}); ctrace netfilter_rule {} (uncertain {}); sysctl write seen {sysctl_seen}; counters \
             of the ip netns {named_counters}, of the thread's netns {thread_counters}; module event {}",
            case.name,
            case.uid,
            summary["drops"]["netfilter_rule"],
            summary["drops_uncertain"]["netfilter_rule"],
            rmmod.map_or("n/a (no modules)".to_owned(), |_| module_seen.to_string()),
        );
        let mut check = |ok: bool, what: String| {
            if !ok {
                failures.push(format!("{}: {what}", case.name));
            }
        };
        check(
            said_sorted == expected,
            format!("named {said:?}, expected {expected:?}"),
        );
        check(
            said.len() == said_sorted.iter().collect::<BTreeSet<_>>().len(),
            "a sentence twice".into(),
        );
        check(
            refused_named == DROPS && u64::from(refused_named) == rule,
            format!("rule counter {rule}"),
        );
        check(
            summary["drops"]["netfilter_rule"] == truth,
            format!("total vs truth {truth}"),
        );
        check(
            sysctl_seen == case.net_admin(),
            format!("sysctl write seen: {sysctl_seen}"),
        );
        check(
            named_counters == case.has(CAP_SYS_ADMIN),
            format!("ip netns counters: {named_counters}"),
        );
        check(
            thread_counters == case.has(CAP_SYS_PTRACE),
            format!("thread netns counters: {thread_counters}"),
        );
        if rmmod.is_some() {
            // Seen with any capability set: by the delete_module tracepoints, or by rmmod's exit status.
            check(module_seen, format!("module event: {module_seen}"));
        }
    }
    let _ = go.send(false);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Without CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) nothing can be loaded: one sentence, exit 1.
#[test]
fn refuses_to_run_without_bpf_and_perfmon() {
    require_root();
    for (caps, missing) in [
        (&[][..], "missing CAP_BPF, CAP_PERFMON"),
        (&[CAP_BPF][..], "missing CAP_PERFMON"),
    ] {
        let mut cmd = Command::new(ctrace_tests::ctrace_bin());
        caps::restrict(&mut cmd, caps, 0);
        let out = cmd.args(["run", "--duration", "1s"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        println!(
            "case caps refused {caps:?}: exit {:?}, {}",
            out.status.code(),
            err.trim()
        );
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(missing) && err.contains("ctrace needs CAP_BPF and CAP_PERFMON"),
            "{err}"
        );
    }
}
