//! How ctrace ends and fails: nothing stays attached after SIGKILL, SIGTERM still gives the summary, two runs at
//! once both count every drop, a taken metrics port or a bad address is one line and the documented exit code.
//! The truth about what is attached is bpftool's listing of the kernel's BPF programs and links.

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ctrace_tests::{Ctrace, TestNetns, bpf_objects, ctrace_bin, require_root};

fn bpf_ids(kind: &str) -> BTreeSet<u64> {
    bpf_objects::ids(kind).unwrap()
}

fn gone_within(kind: &str, ids: &BTreeSet<u64>, timeout: Duration) -> BTreeSet<u64> {
    bpf_objects::gone_within(kind, ids, timeout).unwrap()
}

#[test]
fn sigkill_leaves_nothing_attached() {
    require_root();
    let before = (bpf_ids("prog"), bpf_ids("link"), bpf_ids("map"));
    let ctrace = Ctrace::start(&[]).unwrap();
    let progs: BTreeSet<u64> = bpf_ids("prog").difference(&before.0).copied().collect();
    let links: BTreeSet<u64> = bpf_ids("link").difference(&before.1).copied().collect();
    let maps: BTreeSet<u64> = bpf_ids("map").difference(&before.2).copied().collect();
    println!(
        "while ctrace runs: {} programs, {} links, {} maps of its own",
        progs.len(),
        links.len(),
        maps.len()
    );
    assert!(
        !progs.is_empty() && !links.is_empty(),
        "bpftool saw nothing of ctrace's"
    );
    ctrace.kill();
    let left = (
        gone_within("prog", &progs, Duration::from_secs(10)),
        gone_within("link", &links, Duration::from_secs(10)),
        gone_within("map", &maps, Duration::from_secs(10)),
    );
    assert_eq!(
        left,
        Default::default(),
        "left in the kernel after SIGKILL (programs, links, maps)"
    );
}

#[test]
fn sigterm_detaches_and_prints_the_summary() {
    require_root();
    let before = bpf_ids("prog");
    let ctrace = Ctrace::start(&[]).unwrap();
    let ours: BTreeSet<u64> = bpf_ids("prog").difference(&before).copied().collect();
    let (events, summary) = ctrace.stop_with(nix::sys::signal::SIGTERM).unwrap();
    assert_eq!(summary["event"], "summary", "{events:?}");
    assert_eq!(gone_within("prog", &ours, Duration::from_secs(10)), BTreeSet::new());
}

/// Two runs at once (two SREs on one host): each attaches its own programs and counts every drop.
#[test]
fn two_runs_at_once_both_count_every_drop() {
    require_root();
    let ns = TestNetns::new("twice").unwrap();
    ns.drop_udp_to(7, "truth").unwrap();
    let first = Ctrace::start(&["--netns", &ns.name, "--rate-limit", "0"]).unwrap();
    let second = Ctrace::start(&["--netns", &ns.name, "--rate-limit", "0"]).unwrap();
    let (_, refused) = ns.udp_flows(0, 30, 7).unwrap();
    let rule = ns.rule_packets("iptables", "filter", "OUTPUT", "truth").unwrap();
    let (_, a) = first.stop().unwrap();
    let (_, b) = second.stop().unwrap();
    println!(
        "rule counter {rule} ({refused} sends refused); first run netfilter_rule {}, second {}",
        a["drops"]["netfilter_rule"], b["drops"]["netfilter_rule"]
    );
    assert_eq!(rule, 30);
    assert_eq!(a["drops"]["netfilter_rule"], rule);
    assert_eq!(b["drops"]["netfilter_rule"], rule);
}

/// Runs ctrace to its end (bounded) and returns (exit code, stdout, stderr).
fn run_to_end(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(ctrace_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ctrace {args:?} still runs after 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn a_taken_metrics_port_is_one_line_before_anything_attaches() {
    require_root();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stdout, stderr) = run_to_end(&["run", "--json", "--metrics", &addr, "--duration", "5s"]);
    println!("exit {code:?}: {stderr}");
    assert_eq!(code, Some(1));
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(&format!("cannot serve metrics on {addr}")), "{stderr}");
    assert!(stderr.contains("--metrics"), "says what to do: {stderr}");
    // The mode record is the first thing ctrace prints once its probes are attached.
    assert!(stdout.is_empty(), "it attached before failing: {stdout}");
}

#[test]
fn a_bad_metrics_address_is_a_usage_error() {
    let (code, _, stderr) = run_to_end(&["run", "--metrics", "nowhere:x"]);
    assert_eq!(code, Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not an address to serve metrics on"), "{stderr}");
}
