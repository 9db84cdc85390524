//! Who and where, for the module events a person acts on (VM guests only, where nf_conntrack is a module; on this
//! host they are ignored and `cargo xtask test --step matrix` runs them with `--include-ignored`):
//! - a module event names the chain of processes behind it up to the service that started it: an init script
//!   (`/etc/init.d/ip6tables stop`, in the cgroup of a systemd-like unit) runs `modprobe -r nf_conntrack`;
//! - a reload's `sysctl_reset` of a per-netns key names the netns by its `ip netns` name.
//!
//! Truth: the pids and cgroup the test itself set up, and the per-netns value it wrote.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use ctrace_tests::{Ctrace, TestNetns, require_root};
use serde_json::Value;

const TIMEOUT_KEY: &str = "net.netfilter.nf_conntrack_tcp_timeout_established";
const NETNS_TIMEOUT: &str = "7200";
const UNIT: &str = "ip6tables.service";

fn require_module() {
    require_root();
    assert!(
        Path::new("/sys/module/nf_conntrack/refcnt").exists(),
        "nf_conntrack is not a loaded module here"
    );
}

fn cgroup2_root() -> PathBuf {
    ctrace::sysctl_watch::cgroup2_root().expect("no cgroup v2 hierarchy is mounted")
}

/// A directory removed on drop (a cgroup directory is removed with rmdir once empty).
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = fs::remove_file(p).or_else(|_| fs::remove_dir(p));
        }
    }
}

/// `ctrace run` in text mode, for the alert line a person reads (started before the JSON one: both attach at
/// once).
struct TextCtrace {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TextCtrace {
    fn spawn() -> TextCtrace {
        use std::io::BufRead as _;
        let mut child = Command::new(ctrace_tests::ctrace_bin())
            .args(["run", "--rate-limit", "0"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        TextCtrace { child, lines }
    }

    /// Waits for the mode line (ctrace attached); the lines before it are dropped.
    fn attached(&self) -> bool {
        (0..600).any(|_| {
            self.lines
                .recv_timeout(Duration::from_millis(200))
                .is_ok_and(|l| l.starts_with("ctrace: ") && l.contains(" mode: "))
        })
    }

    fn stop(mut self) -> Vec<String> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGINT,
        );
        let _ = self.child.wait();
        self.lines.try_iter().collect()
    }
}

#[test]
#[ignore = "needs nf_conntrack as a module: runs in the VM guests"]
fn a_module_event_names_the_chain_up_to_the_service() {
    require_module();
    let tag = std::process::id();
    let dir = std::env::temp_dir().join(format!("ctrace-prov-{tag}"));
    let script = dir.join("etc/init.d/ip6tables");
    let slice = cgroup2_root().join("system.slice");
    let unit = slice.join(UNIT);
    let _cleanup = Cleanup(vec![
        dir.clone(),
        dir.join("etc"),
        dir.join("etc/init.d"),
        script.clone(),
        slice.clone(),
        unit.clone(),
    ]);
    fs::create_dir_all(script.parent().unwrap()).unwrap();
    fs::create_dir_all(&unit).unwrap();
    // Like an init script's stop: into its unit's cgroup, then unload conntrack (held by xt_conntrack: refused,
    // nothing changes). It lingers a moment, as scripts do, so that its command line can still be read.
    fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$1\" in\nstop)\n    echo $$ > {}/cgroup.procs\n    /sbin/modprobe -r nf_conntrack\n    \
             echo \"rc=$?\"\n    sleep 2\n    ;;\nesac\n",
            unit.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();

    let text = TextCtrace::spawn();
    let ctrace = Ctrace::start(&["--rate-limit", "0"]).unwrap();
    assert!(text.attached(), "ctrace (text) did not attach");
    let out = Command::new(&script)
        .arg("stop")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    std::thread::sleep(Duration::from_millis(500));
    let (events, _) = ctrace.stop().unwrap();
    let lines = text.stop();
    let alert = lines
        .iter()
        .find(|l| l.contains(">>> MODULE nf_conntrack"))
        .cloned()
        .unwrap_or_default();
    println!("case provenance text: {alert}");
    let module: Vec<&Value> = events
        .iter()
        .filter(|v| v["event"] == "module" && v["name"] == "nf_conntrack")
        .collect();
    println!(
        "case provenance: script {} stop (modprobe {printed}); ctrace module events {}",
        script.display(),
        serde_json::to_string(&module).unwrap()
    );
    assert!(out.status.success(), "the script failed");
    assert!(
        printed.starts_with("rc=") && printed != "rc=0",
        "modprobe -r was refused: {printed}"
    );
    assert_eq!(module.len(), 1, "one refused unload: {module:?}");
    let e = module[0];
    assert_eq!(e["action"], "unload_failed");
    assert_eq!(e["comm"], "modprobe");
    let chain = e["chain"].as_array().expect("a chain");
    let pids: Vec<u64> = chain.iter().filter_map(|l| l["pid"].as_u64()).collect();
    // modprobe <- ip6tables (the script) <- this test <- ... <- init (pid 1).
    assert_eq!(chain[0]["comm"], "ip6tables", "{chain:?}");
    assert!(
        chain[0]["cmdline"]
            .as_str()
            .is_some_and(|c| c.ends_with(&format!("{} stop", script.display()))),
        "the script's command line: {chain:?}"
    );
    assert_eq!(e["ppid"], chain[0]["pid"]);
    assert_eq!(
        pids.get(1).copied(),
        Some(u64::from(std::process::id())),
        "then this test: {chain:?}"
    );
    // A process is named by its thread-group leader (this test forked the script from a thread of its own).
    let me = std::fs::read("/proc/self/cmdline").unwrap();
    assert_eq!(
        chain[1]["cmdline"].as_str(),
        Some(ctrace::modules::cmdline_string(&me).as_str()),
        "{chain:?}"
    );
    assert_eq!(pids.last().copied(), Some(1), "up to init: {chain:?}");
    assert_eq!(e["chain_truncated"], false);
    assert_eq!(e["cgroup"], format!("/system.slice/{UNIT}"));
    assert_eq!(e["unit"], UNIT);
    assert!(
        alert.contains("<- ip6tables[") && alert.ends_with(&format!("; unit {UNIT}")),
        "the text alert names the chain and the unit: {alert}"
    );
}

/// The modules that hold `name`, each after the ones that hold it (the order rmmod needs).
fn holders_first(name: &str, out: &mut Vec<String>) {
    let Ok(dir) = fs::read_dir(Path::new("/sys/module").join(name).join("holders")) else {
        return;
    };
    let mut names: Vec<String> = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for h in names {
        holders_first(&h, out);
        if !out.contains(&h) {
            out.push(h);
        }
    }
}

fn run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// nf_conntrack and everything that holds it, unloaded; loaded again on drop (panics included), so the tests
/// after this one find the guest as it was.
struct Unloaded(Vec<String>);

impl Unloaded {
    fn conntrack() -> Unloaded {
        let mut holders = vec![];
        holders_first("nf_conntrack", &mut holders);
        let mut guard = Unloaded(vec![]);
        for m in holders.iter().chain(std::iter::once(&"nf_conntrack".to_owned())) {
            // A netns of an earlier test may still be going away and hold a module for a moment.
            let gone = (0..50).any(|_| {
                run("rmmod", &[m]) || {
                    std::thread::sleep(Duration::from_millis(100));
                    false
                }
            });
            assert!(gone, "rmmod {m} failed (holders {holders:?})");
            guard.0.push(m.clone());
        }
        guard
    }
}

impl Drop for Unloaded {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            if !run("/sbin/modprobe", &[m]) {
                eprintln!("FAILED TO LOAD {m} again");
            }
        }
    }
}

#[test]
#[ignore = "needs nf_conntrack as a module: runs in the VM guests"]
fn a_reset_in_a_named_netns_names_it() {
    require_module();
    let ns = TestNetns::bare("reset").unwrap();
    ns.exec(&["sysctl", "-w", &format!("{TIMEOUT_KEY}={NETNS_TIMEOUT}")])
        .unwrap();
    let mut ctrace = Ctrace::start(&["--rate-limit", "0"]).unwrap();
    let reloaded = {
        let _unloaded = Unloaded::conntrack();
        assert!(run("/sbin/modprobe", &["nf_conntrack"]), "modprobe nf_conntrack failed");
        ctrace
            .wait_for(Duration::from_secs(60), |v| v["event"] == "reattached")
            .unwrap()
            .is_some()
        // The holders load again here.
    };
    let after = ns.exec(&["sysctl", "-n", TIMEOUT_KEY]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (events, _) = ctrace.stop().unwrap();
    let resets: Vec<&Value> = events.iter().filter(|v| v["event"] == "sysctl_reset").collect();
    let unload = events
        .iter()
        .find(|v| v["event"] == "module" && v["action"] == "unload" && v["name"] == "nf_conntrack");
    println!(
        "case reset-netns: {TIMEOUT_KEY} {NETNS_TIMEOUT} in netns {} ({}), {} after the reload; ctrace resets {}; \
         unload by {}",
        ns.name,
        ns.inode(),
        after.trim(),
        serde_json::to_string(&resets).unwrap(),
        unload.map_or("nothing".to_owned(), |u| format!(
            "{} chain {}",
            u["cmdline"], u["chain"]
        ))
    );
    assert!(reloaded, "ctrace saw nf_conntrack come back");
    let mine: Vec<&&Value> = resets.iter().filter(|r| r["netns"] == ns.inode()).collect();
    assert_eq!(mine.len(), 1, "one reset in the test netns: {resets:?}");
    let r = mine[0];
    assert_eq!(r["key"], TIMEOUT_KEY);
    assert_eq!(r["before"], NETNS_TIMEOUT);
    assert_eq!(r["after"], after.trim());
    assert_eq!(r["netns_name"], ns.name.as_str(), "the reset names the netns");
    // The reload's own events name this test as the service behind them.
    let unload = unload.expect("the unload was reported");
    assert_eq!(unload["chain"][0]["pid"], u64::from(std::process::id()));
}
