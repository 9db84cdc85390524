//! Boots a Debian kernel under QEMU with a busybox initramfs, runs a shell script as root inside and reports
//! whether it passed.
//!
//! The host kernel has nf_conntrack built in and cannot load modules, so behaviour that depends on the module
//! (unload, reload, its kprobes) can only be tested in a guest. Nested KVM does not work on the project's machines,
//! so guests run under TCG (software emulation) and never get a network device.

#![allow(
    dead_code,
    reason = "a library for the VM commands and tests: not every command uses all of it"
)]

mod console;
mod cpio;
mod initramfs;
mod modules;
mod outcome;

pub use outcome::{ExitReason, VmOutcome};

use crate::debian::Kernel;
use anyhow::{Context, Result, ensure};
use console::{Watch, read_console};
use initramfs::build_initramfs;
use std::fs::{self, File};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What to boot and what to run in the guest.
#[derive(Clone, Debug)]
pub struct VmRun {
    pub kernel: Kernel,
    /// Host files copied into the guest (mode 0755) as `(host path, absolute guest path)`.
    pub files: Vec<(PathBuf, String)>,
    /// Modules to load at boot, in this order, with their dependencies (hard ones and soft ones) before them.
    /// Names may use `-` or `_`, or be an alias from `modules.alias`; built-in modules are skipped.
    pub modules: Vec<String>,
    /// Run by busybox `sh` as root after the modules are loaded; exit status 0 means pass.
    pub script: String,
    pub timeout: Duration,
    pub memory_mb: u32,
    pub cpus: u32,
    /// Where the console is streamed; by default `target/vm-logs/<kernel>-<time>-<pid>.log`.
    pub log_path: Option<PathBuf>,
    /// Also copy the console to stderr as it arrives (useful in CI logs).
    pub echo_console: bool,
}

impl VmRun {
    pub fn new(kernel: Kernel, script: impl Into<String>) -> VmRun {
        VmRun {
            kernel,
            files: Vec::new(),
            modules: Vec::new(),
            script: script.into(),
            timeout: Duration::from_secs(300),
            memory_mb: 1024,
            cpus: 2,
            log_path: None,
            echo_console: false,
        }
    }
}

/// Time given to `poweroff -f` after the result marker before QEMU is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(20);
/// Time to let the console finish printing a backtrace after trouble is seen (a stalled guest prints slowly: 5 s
/// lost the 5.10 soft lockup's stack).
const TROUBLE_GRACE: Duration = Duration::from_secs(30);

/// A kernel that has not reached `/init` by then is stuck in emulation (boots take 3–12 s under TCG).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Boots tried when the kernel gets stuck before `/init` (seen rarely under TCG: nothing after the BIOS).
const BOOT_ATTEMPTS: u32 = 3;
/// Runs tried again after the guest kernel hit a breakpoint that text patching had already removed (see [`Hiccup`]).
const TEXT_PATCHING_RERUNS: u32 = 1;

/// A guest run that says nothing about what the guest was asked to do: emulation failed it, and it is run again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hiccup {
    /// The kernel never reached `/init`: it hung, or oopsed in its own start-up (seen once under TCG: an int3 in
    /// sched_clock_cpu while text was being patched). Nothing of the test had run yet.
    Boot,
    /// An oops on an int3 instruction. The kernel patches its text (static keys, tracepoints, kprobes: every netns
    /// that adds a netfilter hook, every program ctrace attaches) by writing an int3 first, then the new bytes,
    /// then removing the int3, with a serialising IPI to every CPU after each step; an int3 that no patch owns any
    /// more is an oops. On hardware that cannot happen. Multi-threaded TCG sometimes runs a vCPU's stale
    /// translation that still holds the int3 (seen in the 6.12 matrix: `Oops: int3` in
    /// syscall_exit_to_user_mode_prepare, at a jump label's NOP). The guest is run again once; a second one fails
    /// the run.
    TextPatching,
}

/// Boots the guest and waits for its result. Errors are problems on the host (QEMU missing, bad inputs); anything
/// the guest does, including hanging or panicking, is an `Ok` outcome with `passed == false`, apart from the
/// emulation [`Hiccup`]s, after which the guest is run again (up to `BOOT_ATTEMPTS` boots that hang before
/// `/init`, `TEXT_PATCHING_RERUNS` runs stopped by a stale int3), each said on stderr.
pub fn run(spec: &VmRun) -> Result<VmOutcome> {
    let (mut boots, mut reruns) = (1, 0);
    loop {
        let outcome = run_once(spec)?;
        match hiccup(&outcome) {
            None => return Ok(outcome),
            Some(Hiccup::Boot) if boots < BOOT_ATTEMPTS => {
                eprintln!(
                    "vm: the guest kernel did not reach /init ({}; boot {boots} of {BOOT_ATTEMPTS}); booting again \
                     (console: {})",
                    outcome.exit_reason,
                    outcome.log_path.display()
                );
                boots += 1;
            }
            Some(Hiccup::Boot) => {
                return Ok(match outcome.exit_reason {
                    ExitReason::BootHang { .. } => VmOutcome {
                        exit_reason: ExitReason::BootHang {
                            limit: BOOT_TIMEOUT,
                            attempts: boots,
                        },
                        ..outcome
                    },
                    _ => outcome,
                });
            }
            Some(Hiccup::TextPatching) if reruns < TEXT_PATCHING_RERUNS => {
                eprintln!(
                    "vm: the guest kernel hit an int3 that text patching had removed, which multi-threaded TCG \
                     sometimes leaves behind ({}); running the guest again from the start (console: {})",
                    outcome.exit_reason,
                    outcome.log_path.display()
                );
                reruns += 1;
            }
            Some(Hiccup::TextPatching) => return Ok(outcome),
        }
    }
}

/// The guest kernel's command line. The kernel's hang detectors assume native speed: a soft lockup after 20 s on
/// one CPU, an RCU stall after 21 s. Under TCG the guest runs tens of times slower and a busy softirq or a netns
/// teardown can cross those lines with nothing wrong, which stops the guest ("kernel trouble"). The thresholds are
/// stretched as syzkaller stretches them for its emulated machines (checked in 5.10 and 6.12 guests: 60 and 120
/// in /proc/sys/kernel/watchdog_thresh and rcupdate's rcu_cpu_stall_timeout); a real hang is still reported, later,
/// and every suite has its own time limit.
fn kernel_command_line() -> String {
    [
        "console=ttyS0",
        "panic=-1",
        "quiet",
        "rdinit=/init",
        // Soft lockup after 2 × 60 s.
        "watchdog_thresh=60",
        "rcupdate.rcu_cpu_stall_timeout=120",
    ]
    .join(" ")
}

/// Whether a run failed by emulation rather than by what the guest ran.
fn hiccup(outcome: &VmOutcome) -> Option<Hiccup> {
    match &outcome.exit_reason {
        ExitReason::BootHang { .. } => Some(Hiccup::Boot),
        ExitReason::KernelTrouble { .. } if outcome.boot_time.is_none() => Some(Hiccup::Boot),
        ExitReason::KernelTrouble { line } if console::int3_oops(line) => Some(Hiccup::TextPatching),
        _ => None,
    }
}

fn run_once(spec: &VmRun) -> Result<VmOutcome> {
    crate::setup::ensure_debian_packages(&["qemu-system-x86", "busybox-static", "kmod", "cpio"])?;
    let qemu = which::which("qemu-system-x86_64")
        .map_err(|_| anyhow::anyhow!("qemu-system-x86_64 not found: run `cargo xtask setup`"))?;
    ensure!(
        spec.cpus >= 1 && spec.memory_mb >= 128,
        "a VM needs at least 1 CPU and 128 MiB of memory"
    );

    let work = tempfile::Builder::new()
        .prefix("ctrace-vm-")
        .tempdir()
        .context("could not create a temporary directory")?;
    let token = format!("ctrace-vm-{:016x}", RandomState::new().hash_one(SystemTime::now()));
    let initrd = work.path().join("initrd.gz");
    build_initramfs(spec, &token, work.path(), &initrd)?;

    let log_path = match &spec.log_path {
        Some(path) => path.clone(),
        None => default_log_path(&spec.kernel.version),
    };
    if let Some(dir) = log_path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    }
    let log = File::create(&log_path).with_context(|| format!("could not create {}", log_path.display()))?;

    let mut cmd = qemu_command(&qemu, spec, &initrd);
    let started = Instant::now();
    let mut qemu = Qemu(cmd.spawn().context("could not start qemu-system-x86_64")?);
    let stdout = qemu.0.stdout.take().context("QEMU's stdout was not captured")?;
    let mut stderr = qemu.0.stderr.take().context("QEMU's stderr was not captured")?;
    let stderr_reader = thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).ok();
        text
    });
    let (lines_tx, lines) = mpsc::channel();
    let echo = spec.echo_console;
    let console_reader = thread::spawn(move || read_console(stdout, log, echo, lines_tx));

    let deadline = started + spec.timeout;
    let mut watch = Watch::new(&token);
    let mut timed_out = false;
    let mut boot_hung = false;
    let status = loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => watch.line(&line, started),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The console closed: QEMU is exiting.
            Err(mpsc::RecvTimeoutError::Disconnected) => thread::sleep(Duration::from_millis(20)),
        }
        if let Some(status) = qemu.0.try_wait().context("could not wait for QEMU")? {
            break Some(status);
        }
        let now = Instant::now();
        let finished_long_ago = watch.finished_at.is_some_and(|t| now > t + POWEROFF_GRACE);
        let trouble_long_ago = watch.trouble_at.is_some_and(|t| now > t + TROUBLE_GRACE);
        if finished_long_ago || trouble_long_ago {
            break None;
        }
        if now > deadline {
            timed_out = true;
            break None;
        }
        if watch.init_started.is_none() && now > started + BOOT_TIMEOUT.min(spec.timeout) {
            boot_hung = true;
            break None;
        }
    };
    qemu.kill();
    let duration = started.elapsed();
    // QEMU is gone, so the pipe is closed and the readers finish.
    for line in lines.iter() {
        watch.line(&line, started);
    }
    let console = console_reader.join().unwrap_or_default();
    let qemu_stderr = stderr_reader.join().unwrap_or_default();

    let exit_reason = if let Some(line) = watch.trouble {
        ExitReason::KernelTrouble { line }
    } else if let Some(result) = watch.result {
        result
    } else if timed_out {
        ExitReason::Timeout { limit: spec.timeout }
    } else if boot_hung && watch.init_started.is_none() {
        ExitReason::BootHang {
            limit: BOOT_TIMEOUT,
            attempts: 1,
        }
    } else {
        let status = status.map_or_else(|| "killed".to_string(), |s: ExitStatus| s.to_string());
        ExitReason::QemuExited {
            status,
            stderr: qemu_stderr,
        }
    };
    Ok(VmOutcome {
        passed: exit_reason == ExitReason::Success,
        console,
        duration,
        boot_time: watch.init_started,
        exit_reason,
        log_path,
        token,
    })
}

/// The QEMU command line: software emulation, serial console on stdout, no network, nothing on stdin.
fn qemu_command(qemu: &Path, spec: &VmRun, initrd: &Path) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-cpu", "max"])
        .args(["-m", &spec.memory_mb.to_string(), "-smp", &spec.cpus.to_string()])
        // The serial console on stdout and no monitor: nothing reads from or waits on a terminal.
        .args([
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(&spec.kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &kernel_command_line()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; it makes the kernel kill QEMU if this process dies without cleaning up.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }

    cmd
}

/// Kills and reaps QEMU when dropped, so that no error path leaves a guest running.
struct Qemu(Child);

impl Qemu {
    fn kill(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.0.kill().ok();
        }
        self.0.wait().ok();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

fn default_log_path(kernel_version: &str) -> PathBuf {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    crate::build::target_dir(&crate::workspace_root())
        .join("vm-logs")
        .join(format!("{kernel_version}-{secs}-{}.log", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_emulation_failures_are_run_again() {
        let outcome = |exit_reason, boot_time| VmOutcome {
            passed: false,
            console: String::new(),
            duration: Duration::ZERO,
            boot_time,
            exit_reason,
            log_path: PathBuf::new(),
            token: String::new(),
        };
        let trouble = |line: &str| ExitReason::KernelTrouble { line: line.into() };
        let int3 = "[  137.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI";
        let gpf = "[  137.1] Oops: general protection fault: 0000 [#1] PREEMPT SMP NOPTI";
        let running = Some(Duration::from_secs(5));
        assert_eq!(
            hiccup(&outcome(trouble(gpf), None)),
            Some(Hiccup::Boot),
            "an oops before /init"
        );
        assert_eq!(
            hiccup(&outcome(trouble(gpf), running)),
            None,
            "an oops during the test is a result"
        );
        assert_eq!(
            hiccup(&outcome(trouble(int3), running)),
            Some(Hiccup::TextPatching),
            "a stale int3 is emulation's"
        );
        assert_eq!(hiccup(&outcome(trouble("watchdog: BUG: soft lockup"), running)), None);
        let hang = ExitReason::BootHang {
            limit: BOOT_TIMEOUT,
            attempts: 1,
        };
        assert_eq!(hiccup(&outcome(hang, None)), Some(Hiccup::Boot));
        assert_eq!(hiccup(&outcome(ExitReason::ScriptFailed { code: 1 }, None)), None);
    }
}
