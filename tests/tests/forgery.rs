//! Alerts nobody can forge (module events), run in the VM guests where nf_conntrack is a module (the host
//! kernel has no modules: there these tests are ignored; `cargo xtask test --step matrix` runs them with
//! `--include-ignored`). Truth: who really could change a module — here uid 65534 cannot, root can.

use std::{os::unix::process::CommandExt as _, process::Command};

use ctrace_tests::{Ctrace, require_root};
use serde_json::Value;

const NOBODY: u32 = 65534;

/// Runs `program args` as uid/gid 65534 (no capabilities) or as root; returns its pid and exit status.
fn run_as(uid: Option<u32>, program: &str, args: &[&str]) -> (u32, i32) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    (pid, status.code().unwrap_or(-1))
}

#[test]
#[ignore = "needs nf_conntrack as a module: runs in the VM guests"]
fn forged_module_alerts_are_ignored() {
    require_root();
    assert!(
        std::path::Path::new("/sys/module/nf_conntrack/refcnt").exists(),
        "nf_conntrack is not a loaded module here"
    );
    // A binary named rmmod that fails without asking the kernel (what kmod does for a module in use): any
    // ELF that rejects these arguments will do, ctrace itself exits 2 on them. (A script would not: its
    // argv starts with the interpreter.)
    let dir = std::env::temp_dir().join(format!("ctrace-forge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("rmmod");
    std::fs::copy(ctrace_tests::ctrace_bin(), &fake).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = fake.to_string_lossy().into_owned();

    let ctrace = Ctrace::start(&["--rate-limit", "0"]).unwrap();
    // Forged by a user: the fake tool, and a real delete_module that the kernel refuses with EPERM.
    let (forged_tool, tool_status) = run_as(Some(NOBODY), &fake, &["nf_conntrack"]);
    let (forged_call, call_status) = run_as(Some(NOBODY), "rmmod", &["nf_conntrack"]);
    // The same fake tool run by root: ctrace must still report a refused unload.
    let (real, _) = run_as(None, &fake, &["nf_conntrack"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (events, summary) = ctrace.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let modules: Vec<&Value> = events.iter().filter(|v| v["event"] == "module").collect();
    let by = |pid: u32| modules.iter().filter(|v| v["pid"] == pid).count();
    println!(
        "case forgery: uid {NOBODY}: fake rmmod pid {forged_tool} exit {tool_status}, busybox rmmod pid {forged_call} exit \
         {call_status} (EPERM); root: fake rmmod pid {real}; ctrace module events {:?}; module_requests_unprivileged {}",
        modules
            .iter()
            .map(|v| format!("{} {} pid {}", v["action"], v["name"], v["pid"]))
            .collect::<Vec<_>>(),
        summary["module_requests_unprivileged"]
    );
    assert!(tool_status != 0 && call_status != 0, "the forged unloads failed");
    assert!(
        std::path::Path::new("/sys/module/nf_conntrack").exists(),
        "nf_conntrack is still loaded"
    );
    assert_eq!(by(forged_tool), 0, "a forged rmmod raised a module event");
    assert_eq!(by(forged_call), 0, "an EPERM delete_module raised a module event");
    assert!(
        modules
            .iter()
            .any(|v| v["pid"] == real && v["action"] == "unload_failed"),
        "root's refused unload was not reported"
    );
    assert!(
        summary["module_requests_unprivileged"].as_u64().unwrap_or(0) >= 4,
        "{summary}"
    );
}
