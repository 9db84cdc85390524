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

use crate::debian::Kernel;
use anyhow::{Context, Result, bail, ensure};
use flate2::Compression;
use flate2::write::GzEncoder;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
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

/// Why the guest stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The script exited 0 and the guest powered off.
    Success,
    /// The script exited non-zero.
    ScriptFailed { code: i32 },
    /// `/init` gave up before the script ran (e.g. a module did not load).
    InitFailed { reason: String },
    /// The console showed a panic, an oops, a lockup or an RCU stall; the guest was stopped.
    KernelTrouble { line: String },
    /// No result within the time limit; the guest was killed.
    Timeout { limit: Duration },
    /// The kernel never reached `/init` (every boot attempt hung under emulation).
    BootHang { limit: Duration, attempts: u32 },
    /// QEMU ended without the guest reporting a result.
    QemuExited { status: String, stderr: String },
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Success => write!(f, "the guest script passed"),
            ExitReason::ScriptFailed { code } => write!(f, "the guest script failed (exit {code})"),
            ExitReason::InitFailed { reason } => write!(f, "the guest's /init failed before the script ran: {reason}"),
            ExitReason::KernelTrouble { line } => {
                write!(f, "the guest kernel reported trouble: {line}")
            }
            ExitReason::Timeout { limit } => {
                write!(f, "the guest did not finish within {}s", limit.as_secs())
            }
            ExitReason::BootHang { limit, attempts } => write!(
                f,
                "the guest kernel did not reach /init within {}s, {attempts} boots in a row",
                limit.as_secs()
            ),
            ExitReason::QemuExited { status, stderr } => {
                write!(f, "QEMU exited ({status}) before the guest reported a result")?;
                if !stderr.trim().is_empty() {
                    write!(f, "; QEMU said: {}", stderr.trim())?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct VmOutcome {
    pub passed: bool,
    /// Everything the guest printed on its serial console.
    pub console: String,
    /// From starting QEMU to its end.
    pub duration: Duration,
    /// From starting QEMU to `/init` running (kernel boot under emulation).
    pub boot_time: Option<Duration>,
    pub exit_reason: ExitReason,
    pub log_path: PathBuf,
    token: String,
}

impl VmOutcome {
    /// The last `n` console lines.
    /// `name (why it ended): last N console lines: ... (full console log: path)`, for a failed guest's error.
    pub fn console_tail(&self, name: &str, lines: usize) -> String {
        format!(
            "{name} ({}): last {lines} console lines:\n{}\n(full console log: {})",
            self.exit_reason,
            self.tail(lines),
            self.log_path.display()
        )
    }

    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The console between the start and the end of the script (kernel messages printed meanwhile included).
    pub fn script_output(&self) -> String {
        let mut out = String::new();
        let mut inside = false;
        for line in self.console.lines() {
            match parse_marker(line, &self.token) {
                Some(Marker::Script) => inside = true,
                Some(Marker::Finished(_)) => break,
                _ if inside => {
                    out.push_str(line);
                    out.push('\n');
                }
                _ => {}
            }
        }
        out
    }

    /// Fails with a sentence saying why, the console's last 40 lines and where the full log is.
    pub fn ensure_passed(&self) -> Result<()> {
        ensure!(
            self.passed,
            "{}; last 40 console lines:\n{}\n(full console log: {})",
            self.exit_reason,
            self.tail(40),
            self.log_path.display()
        );
        Ok(())
    }
}

/// Time given to `poweroff -f` after the result marker before QEMU is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(20);
/// Time to let the console finish printing a backtrace after trouble is seen.
const TROUBLE_GRACE: Duration = Duration::from_secs(5);
const GUEST_SCRIPT: &str = "/vm/script.sh";

/// A kernel that has not reached `/init` by then is stuck in emulation (boots take 3–12 s under TCG).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Boots tried when the kernel gets stuck before `/init` (seen rarely under TCG: nothing after the BIOS).
const BOOT_ATTEMPTS: u32 = 3;

/// Boots the guest and waits for its result. Errors are problems on the host (QEMU missing, bad inputs); anything
/// the guest does, including hanging or panicking, is an `Ok` outcome with `passed == false`. A boot that never
/// reaches `/init` (it hangs, or the kernel oopses in its own start-up, seen once under TCG: an int3 in
/// sched_clock_cpu while text was being patched) is an emulation hiccup, not a test result: nothing of the test
/// had run yet. It is tried again, up to `BOOT_ATTEMPTS` times.
pub fn run(spec: &VmRun) -> Result<VmOutcome> {
    let mut attempt = 1;
    loop {
        let outcome = run_once(spec)?;
        if !boot_hiccup(&outcome) {
            return Ok(outcome);
        }
        if attempt == BOOT_ATTEMPTS {
            return Ok(match outcome.exit_reason {
                ExitReason::BootHang { .. } => VmOutcome {
                    exit_reason: ExitReason::BootHang {
                        limit: BOOT_TIMEOUT,
                        attempts: attempt,
                    },
                    ..outcome
                },
                _ => outcome,
            });
        }
        eprintln!(
            "vm: the guest kernel did not reach /init ({}; boot {attempt} of {BOOT_ATTEMPTS}); booting again (console: {})",
            outcome.exit_reason,
            outcome.log_path.display()
        );
        attempt += 1;
    }
}

/// A boot that failed before `/init` started: a hang, or kernel trouble during the kernel's own start-up.
fn boot_hiccup(outcome: &VmOutcome) -> bool {
    match outcome.exit_reason {
        ExitReason::BootHang { .. } => true,
        ExitReason::KernelTrouble { .. } => outcome.boot_time.is_none(),
        _ => false,
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
        .args(["-append", "console=ttyS0 panic=-1 quiet rdinit=/init"])
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

/// Copies the console to the log (and stderr), sends complete lines on, and returns all of it at EOF.
fn read_console(mut stdout: impl Read, log: File, echo: bool, lines: mpsc::Sender<String>) -> String {
    let mut log = BufWriter::new(log);
    let mut console = Vec::new();
    let mut line_start = 0;
    let mut buf = [0u8; 8192];
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        log.write_all(chunk).ok();
        log.flush().ok();
        if echo {
            io::stderr().write_all(chunk).ok();
        }
        console.extend_from_slice(chunk);
        while let Some(pos) = console[line_start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&console[line_start..line_start + pos]);
            lines.send(strip_escapes(line.trim_end_matches('\r'))).ok();
            line_start += pos + 1;
        }
    }
    if line_start < console.len() {
        lines
            .send(strip_escapes(&String::from_utf8_lossy(&console[line_start..])))
            .ok();
    }
    strip_escapes(&String::from_utf8_lossy(&console).replace("\r\n", "\n"))
}

/// Drops the terminal escape sequences the firmware prints (`ESC c`, `ESC [ ... m`); the log file keeps them.
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        // `ESC [ params final` spans several characters; any other escape is one more character.
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Follows the console: when `/init` started, the result marker, the first sign of kernel trouble.
struct Watch<'a> {
    token: &'a str,
    init_started: Option<Duration>,
    result: Option<ExitReason>,
    finished_at: Option<Instant>,
    trouble: Option<String>,
    trouble_at: Option<Instant>,
}

impl<'a> Watch<'a> {
    fn new(token: &'a str) -> Watch<'a> {
        Watch {
            token,
            init_started: None,
            result: None,
            finished_at: None,
            trouble: None,
            trouble_at: None,
        }
    }

    fn line(&mut self, line: &str, started: Instant) {
        match parse_marker(line, self.token) {
            Some(Marker::Started) => self.init_started = Some(started.elapsed()),
            Some(Marker::Finished(reason)) if self.result.is_none() => {
                self.result = Some(reason);
                self.finished_at = Some(Instant::now());
            }
            _ => {}
        }
        if self.trouble.is_none() && kernel_trouble(line) {
            self.trouble = Some(line.trim().to_string());
            self.trouble_at = Some(Instant::now());
        }
    }
}

#[derive(Debug, PartialEq)]
enum Marker {
    Started,
    Script,
    Finished(ExitReason),
}

/// `/init` prints `<token> init: <what>`; the random token keeps the script's own output from faking a result.
fn parse_marker(line: &str, token: &str) -> Option<Marker> {
    let (_, rest) = line.split_once(token)?;
    let what = rest.trim().strip_prefix("init:")?.trim();
    match what {
        "started" => Some(Marker::Started),
        "running script" => Some(Marker::Script),
        "success" => Some(Marker::Finished(ExitReason::Success)),
        _ => {
            let reason = what.strip_prefix("failure (")?.strip_suffix(')')?;
            let finished = match reason.strip_prefix("exit ").and_then(|c| c.parse().ok()) {
                Some(code) => ExitReason::ScriptFailed { code },
                None => ExitReason::InitFailed {
                    reason: reason.to_string(),
                },
            };
            Some(Marker::Finished(finished))
        }
    }
}

/// Console lines that mean the kernel is in trouble, whatever the script does afterwards.
fn kernel_trouble(line: &str) -> bool {
    const SIGNS: [&str; 7] = [
        "Kernel panic",
        "detected stalls",
        "soft lockup",
        "hard LOCKUP",
        "BUG:",
        "Oops:",
        "general protection fault",
    ];
    SIGNS.iter().any(|sign| line.contains(sign))
}

fn default_log_path(kernel_version: &str) -> PathBuf {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    crate::build::target_dir(&crate::workspace_root())
        .join("vm-logs")
        .join(format!("{kernel_version}-{secs}-{}.log", std::process::id()))
}

fn init_script(token: &str, modules: &[ModuleLoad]) -> String {
    let mut s = format!(
        r#"#!/bin/busybox sh
# PID 1 of a ctrace test VM, generated by xtask. It must never exit: that would panic the kernel.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run /root
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
finish() {{
    echo "{token} init: $1"
    poweroff -f
    sleep 3600
}}
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for fs in tracefs:/sys/kernel/tracing debugfs:/sys/kernel/debug bpf:/sys/fs/bpf cgroup2:/sys/fs/cgroup; do
    mount -t "${{fs%%:*}}" "${{fs%%:*}}" "${{fs#*:}}" || echo "init: could not mount ${{fs%%:*}} on ${{fs#*:}}"
done
ip link set lo up
hostname ctrace-vm
echo "{token} init: started"
"#
    );
    for m in modules {
        let name = &m.name;
        if m.required {
            s += &format!("modprobe {name} || finish \"failure (modprobe {name} failed)\"\n");
        } else {
            s += &format!("modprobe {name} || echo \"init: optional module {name} did not load\"\n");
        }
    }
    s += &format!(
        r#"echo "{token} init: running script"
cd /
/bin/sh {GUEST_SCRIPT} </dev/null
rc=$?
if [ "$rc" -eq 0 ]; then finish success; else finish "failure (exit $rc)"; fi
"#
    );
    s
}

fn build_initramfs(spec: &VmRun, token: &str, work: &Path, out: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    let head = fs::read(busybox).context("/bin/busybox not found: run `cargo xtask setup`")?;
    ensure!(
        !head.windows(8).take(4096).any(|w| w == b"/lib64/l"),
        "/bin/busybox is dynamically linked and cannot run in the guest: install busybox-static"
    );

    let index = ModuleIndex::load(&spec.kernel.modules_root)?;
    let loads = index
        .closure(&spec.modules)
        .with_context(|| format!("kernel {}", spec.kernel.version))?;
    let staging = work.join("modules");
    if !loads.is_empty() {
        stage_modules(&spec.kernel, &loads, &staging)?;
    }

    let file = File::create(out).with_context(|| format!("could not create {}", out.display()))?;
    let mut cpio = Cpio::new(GzEncoder::new(BufWriter::new(file), Compression::default()));
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "root", "etc", "vm",
    ] {
        cpio.dir(dir)?;
    }
    // Needed before devtmpfs is mounted: the kernel opens /dev/console for /init's output.
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.char_dev("dev/null", 0o666, 1, 3)?;
    cpio.file_from_path("bin/busybox", 0o755, busybox)?;
    cpio.bytes("init", 0o755, init_script(token, &loads).as_bytes())?;
    cpio.bytes(GUEST_SCRIPT.trim_start_matches('/'), 0o755, spec.script.as_bytes())?;
    cpio.bytes("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    cpio.bytes("etc/group", 0o644, b"root:x:0:\n")?;
    for (host, guest) in &spec.files {
        let guest = guest_path(guest)?;
        ensure!(
            host.is_file(),
            "the guest file {} does not exist or is not a regular file",
            host.display()
        );
        cpio.file_from_path(&guest, 0o755, host)?;
    }
    if !loads.is_empty() {
        cpio.tree(&staging, &staging)?;
    }
    let gz = cpio.finish()?;
    gz.finish()?.flush()?;
    Ok(())
}

/// `/usr/local/bin/ctrace` → `usr/local/bin/ctrace`, refusing paths that would escape the image.
fn guest_path(path: &str) -> Result<String> {
    let p = Path::new(path);
    ensure!(p.is_absolute(), "guest path {path:?} must be absolute");
    let parts: Vec<_> = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(Ok(s.to_string_lossy().into_owned())),
            Component::RootDir | Component::CurDir => None,
            _ => Some(Err(anyhow::anyhow!("guest path {path:?} must not contain `..`"))),
        })
        .collect::<Result<_>>()?;
    ensure!(!parts.is_empty(), "guest path {path:?} names no file");
    Ok(parts.join("/"))
}

/// Copies the needed modules (decompressed: busybox modprobe reads plain `.ko` only) into
/// `staging/lib/modules/<version>/` and indexes them with depmod, so that the guest's modprobe sees just them.
fn stage_modules(kernel: &Kernel, loads: &[ModuleLoad], staging: &Path) -> Result<()> {
    let dest_root = staging.join("lib/modules").join(&kernel.version);
    for m in loads {
        let src = kernel.modules_root.join(&m.path);
        let dest = dest_root.join(uncompressed_path(&m.path));
        fs::create_dir_all(dest.parent().context("module path has no parent")?)?;
        decompress_module(&src, &dest).with_context(|| format!("could not copy module {}", src.display()))?;
    }
    for meta in ["modules.order", "modules.builtin", "modules.builtin.modinfo"] {
        let src = kernel.modules_root.join(meta);
        if src.is_file() {
            fs::copy(&src, dest_root.join(meta))?;
        }
    }
    let status = Command::new("depmod")
        .arg("-b")
        .arg(staging)
        .arg(&kernel.version)
        .stdin(Stdio::null())
        .status()
        .context("could not run depmod: run `cargo xtask setup`")?;
    ensure!(
        status.success(),
        "depmod -b {} {} failed ({status})",
        staging.display(),
        kernel.version
    );
    Ok(())
}

fn uncompressed_path(path: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(plain) = path.strip_suffix(ext) {
            return plain.to_string();
        }
    }
    path.to_string()
}

fn decompress_module(src: &Path, dest: &Path) -> Result<()> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some(("xz", "xz-utils"))
    } else if name.ends_with(".zst") {
        Some(("zstd", "zstd"))
    } else {
        None
    };
    if name.ends_with(".gz") {
        let mut input = flate2::read::GzDecoder::new(File::open(src)?);
        io::copy(&mut input, &mut File::create(dest)?)?;
    } else if let Some((program, package)) = tool {
        crate::setup::ensure_debian_packages(&[package])?;
        let out = Command::new(program)
            .arg("-dc")
            .arg(src)
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "{program} -dc failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        fs::write(dest, out.stdout)?;
    } else {
        fs::copy(src, dest)?;
    }
    Ok(())
}

/// One module `/init` loads.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ModuleLoad {
    /// The module name (`nf_conntrack`).
    name: String,
    /// Its path relative to `/lib/modules/<version>/`, as in `modules.dep`.
    path: String,
    /// Requested or a hard dependency of a requested module; soft dependencies are loaded on a best-effort basis.
    required: bool,
}

/// The parts of a kernel's module index that decide what to load.
#[derive(Debug, Default)]
struct ModuleIndex {
    /// name → (path, hard dependencies), from `modules.dep`.
    modules: HashMap<String, (String, Vec<String>)>,
    /// name → names and aliases loaded before it (and after it), from `modules.softdep`.
    softdeps: HashMap<String, (Vec<String>, Vec<String>)>,
    /// (alias pattern, module name), from `modules.alias`.
    aliases: Vec<(String, String)>,
    builtin: HashSet<String>,
}

/// The module name of a path: `kernel/net/netfilter/nf_conntrack.ko.xz` → `nf_conntrack`; `-` and `_` are the same.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split_once(".ko").map_or(file, |(stem, _)| stem);
    stem.replace('-', "_")
}

impl ModuleIndex {
    fn load(dir: &Path) -> Result<ModuleIndex> {
        let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
        let dep = fs::read_to_string(dir.join("modules.dep"))
            .with_context(|| format!("could not read {}/modules.dep", dir.display()))?;
        Ok(ModuleIndex::parse(
            &dep,
            &read("modules.softdep"),
            &read("modules.alias"),
            &read("modules.builtin"),
        ))
    }

    fn parse(dep: &str, softdep: &str, alias: &str, builtin: &str) -> ModuleIndex {
        let mut index = ModuleIndex::default();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(module_name).collect();
            index
                .modules
                .insert(module_name(path.trim()), (path.trim().to_string(), deps));
        }
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            let (Some("softdep"), Some(name)) = (words.next(), words.next()) else {
                continue;
            };
            let entry = index.softdeps.entry(name.replace('-', "_")).or_default();
            let mut post = false;
            for word in words {
                match word {
                    "pre:" => post = false,
                    "post:" => post = true,
                    _ if post => entry.1.push(word.to_string()),
                    _ => entry.0.push(word.to_string()),
                }
            }
        }
        for line in alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(pattern), Some(module)) = (words.next(), words.next(), words.next()) {
                index.aliases.push((pattern.to_string(), module.replace('-', "_")));
            }
        }
        index.builtin = builtin
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(module_name)
            .collect();
        index
    }

    /// Module names for a name or alias; empty for built-in modules.
    fn resolve(&self, name: &str) -> Result<Vec<String>> {
        let normal = name.replace('-', "_");
        if self.modules.contains_key(&normal) {
            return Ok(vec![normal]);
        }
        if self.builtin.contains(&normal) {
            return Ok(Vec::new());
        }
        let found: BTreeSet<String> = self
            .aliases
            .iter()
            .filter(|(pattern, _)| glob_match(pattern, name))
            .map(|(_, module)| module.clone())
            .filter(|m| self.modules.contains_key(m))
            .collect();
        ensure!(
            !found.is_empty(),
            "no module or alias {name:?} in modules.dep, modules.builtin or modules.alias"
        );
        Ok(found.into_iter().collect())
    }

    /// The modules to load, each after everything it needs.
    fn closure(&self, requested: &[String]) -> Result<Vec<ModuleLoad>> {
        let mut out: Vec<ModuleLoad> = Vec::new();
        let mut visiting = HashSet::new();
        for name in requested {
            ensure!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "bad module name {name:?}"
            );
            for module in self.resolve(name)? {
                self.visit(&module, true, &mut out, &mut visiting)?;
            }
        }
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        required: bool,
        out: &mut Vec<ModuleLoad>,
        visiting: &mut HashSet<String>,
    ) -> Result<()> {
        if let Some(done) = out.iter_mut().find(|m| m.name == name) {
            done.required |= required;
            if required {
                // A soft dependency became a hard one: so do its own hard dependencies.
                for dep in self.modules[name].1.clone() {
                    self.visit(&dep, true, out, visiting)?;
                }
            }
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Ok(()); // A softdep cycle; modules.dep itself has none.
        }
        let (path, deps) = self
            .modules
            .get(name)
            .with_context(|| format!("modules.dep names no module {name}"))?;
        let (pre, post) = self.softdeps.get(name).cloned().unwrap_or_default();
        for soft in &pre {
            for module in self.resolve(soft).unwrap_or_default() {
                self.visit(&module, false, out, visiting)?;
            }
        }
        for dep in deps {
            self.visit(dep, required, out, visiting)?;
        }
        out.push(ModuleLoad {
            name: name.to_string(),
            path: path.clone(),
            required,
        });
        for soft in &post {
            for module in self.resolve(soft).unwrap_or_default() {
                self.visit(&module, false, out, visiting)?;
            }
        }
        visiting.remove(name);
        Ok(())
    }
}

/// The `*` and `?` wildcards of modules.alias patterns (`[...]` is matched literally).
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A minimal writer of the `newc` cpio format the kernel unpacks, so that ownership (root), modes and device nodes
/// are exactly what the guest needs whatever the host's files say.
struct Cpio<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: HashSet<String>,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Cpio<W> {
        Cpio {
            out,
            written: 0,
            next_ino: 1,
            dirs: HashSet::new(),
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> Result<()> {
        let size = u32::try_from(size).with_context(|| format!("{name} is too large for an initramfs"))?;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.next_ino += 1;
        let mut header = String::from("070701");
        for field in fields {
            header += &format!("{field:08x}");
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..pad as usize])
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        Ok(())
    }

    fn dir(&mut self, path: &str) -> Result<()> {
        if self.dirs.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.dirs.insert(path.to_string());
        self.header(path, 0o040755, 0, (0, 0))
    }

    fn bytes(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.parents(path)?;
        self.header(path, 0o100000 | mode, data.len() as u64, (0, 0))?;
        self.put(data)?;
        self.pad()
    }

    fn file_from_path(&mut self, path: &str, mode: u32, src: &Path) -> Result<()> {
        let mut file = File::open(src).with_context(|| format!("could not open {}", src.display()))?;
        let size = file.metadata()?.len();
        self.parents(path)?;
        self.header(path, 0o100000 | mode, size, (0, 0))?;
        let copied = io::copy(&mut (&mut file).take(size), &mut self.out)?;
        ensure!(copied == size, "{} changed while it was being copied", src.display());
        self.written += copied;
        self.pad()
    }

    fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        self.parents(path)?;
        self.header(path, 0o020000 | mode, 0, (major, minor))
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.parents(path)?;
        self.header(path, 0o120777, target.len() as u64, (0, 0))?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// Adds everything under `dir`, named relative to `base`, keeping file modes.
    fn tree(&mut self, base: &Path, dir: &Path) -> Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let name = path.strip_prefix(base)?.to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                self.dir(&name)?;
                self.tree(base, &path)?;
            } else if meta.file_type().is_symlink() {
                self.symlink(&name, &fs::read_link(&path)?.to_string_lossy())?;
            } else if meta.is_file() {
                self.file_from_path(&name, meta.permissions().mode() & 0o7777, &path)?;
            } else {
                bail!("{} is neither a file, a directory nor a symlink", path.display());
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/net/netfilter/nf_conntrack.ko: kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko
kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko:
kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko:
kernel/lib/libcrc32c.ko:
kernel/net/netfilter/xt_conntrack.ko: kernel/net/netfilter/nf_conntrack.ko kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko kernel/net/netfilter/x_tables.ko
kernel/net/netfilter/x_tables.ko:
kernel/net/ipv4/netfilter/iptable_filter.ko: kernel/net/ipv4/netfilter/ip_tables.ko kernel/net/netfilter/x_tables.ko
kernel/net/ipv4/netfilter/ip_tables.ko: kernel/net/netfilter/x_tables.ko
kernel/crypto/crc32c_generic.ko.xz:
kernel/arch/x86/crypto/crc32c-intel.ko:
";
    const SOFTDEP: &str = "# Soft dependencies extracted from modules themselves.\nsoftdep libcrc32c pre: crc32c\n";
    const ALIAS: &str = "alias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\nalias crc32c crc32c_intel\n\
                         alias ipt_conntrack xt_conntrack\nalias pci:v00008086d*sv*sd*bc*sc*i* e1000\n";
    const BUILTIN: &str = "kernel/net/netfilter/nfnetlink.ko\n";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(DEP, SOFTDEP, ALIAS, BUILTIN)
    }

    fn names(loads: &[ModuleLoad]) -> Vec<(&str, bool)> {
        loads.iter().map(|m| (m.name.as_str(), m.required)).collect()
    }

    #[test]
    fn parses_modules_dep() {
        let index = index();
        let (path, deps) = &index.modules["nf_conntrack"];
        assert_eq!(path, "kernel/net/netfilter/nf_conntrack.ko");
        assert_eq!(deps, &["nf_defrag_ipv6", "nf_defrag_ipv4", "libcrc32c"]);
        assert_eq!(index.modules["crc32c_generic"].0, "kernel/crypto/crc32c_generic.ko.xz");
        assert!(
            index.modules.contains_key("crc32c_intel"),
            "`-` in file names is `_` in module names"
        );
        assert_eq!(index.softdeps["libcrc32c"], (vec!["crc32c".to_string()], vec![]));
        assert!(index.builtin.contains("nfnetlink"));
    }

    #[test]
    fn closure_puts_dependencies_first_once() {
        let requested = ["xt_conntrack", "iptable-filter", "nf_conntrack"].map(String::from);
        let loads = index().closure(&requested).unwrap();
        assert_eq!(
            names(&loads),
            [
                ("nf_defrag_ipv6", true),
                ("nf_defrag_ipv4", true),
                ("crc32c_generic", false),
                ("crc32c_intel", false),
                ("libcrc32c", true),
                ("nf_conntrack", true),
                ("x_tables", true),
                ("xt_conntrack", true),
                ("ip_tables", true),
                ("iptable_filter", true),
            ]
        );
        for (i, m) in loads.iter().enumerate() {
            for dep in &index().modules[&m.name].1 {
                assert!(
                    loads[..i].iter().any(|d| &d.name == dep),
                    "{dep} must come before {}",
                    m.name
                );
            }
        }
    }

    #[test]
    fn closure_resolves_aliases_and_skips_builtins() {
        let index = index();
        assert!(index.closure(&["nfnetlink".to_string()]).unwrap().is_empty());
        let loads = index.closure(&["ipt_conntrack".to_string()]).unwrap();
        assert_eq!(loads.last().unwrap().name, "xt_conntrack");
        let loads = index
            .closure(&["crc32c_generic".to_string(), "libcrc32c".to_string()])
            .unwrap();
        assert_eq!(
            names(&loads),
            [("crc32c_generic", true), ("crc32c_intel", false), ("libcrc32c", true)]
        );
        let err = index.closure(&["nope".to_string()]).unwrap_err().to_string();
        assert!(err.contains("no module or alias \"nope\""), "{err}");
        assert!(index.closure(&["x; reboot".to_string()]).is_err());
    }

    #[test]
    fn glob_matches_alias_patterns() {
        assert!(glob_match("crc32c", "crc32c"));
        assert!(!glob_match("crc32c", "crc32"));
        assert!(glob_match("pci:v00008086d*sv*", "pci:v00008086d1234sv5"));
        assert!(glob_match("a?c*", "abcdef"));
        assert!(!glob_match("a?c*", "ac"));
    }

    #[test]
    fn parses_markers_only_with_the_token() {
        let t = "ctrace-vm-0123456789abcdef";
        assert_eq!(parse_marker(&format!("{t} init: started"), t), Some(Marker::Started));
        assert_eq!(
            parse_marker(&format!("{t} init: running script"), t),
            Some(Marker::Script)
        );
        assert_eq!(
            parse_marker(&format!("{t} init: success"), t),
            Some(Marker::Finished(ExitReason::Success))
        );
        // Kernel messages may share the line.
        assert_eq!(
            parse_marker(
                &format!("[   3.1] random: crng init done{t} init: failure (exit 3)\r"),
                t
            ),
            Some(Marker::Finished(ExitReason::ScriptFailed { code: 3 }))
        );
        assert_eq!(
            parse_marker(&format!("{t} init: failure (modprobe nf_conntrack failed)"), t),
            Some(Marker::Finished(ExitReason::InitFailed {
                reason: "modprobe nf_conntrack failed".into()
            }))
        );
        assert_eq!(parse_marker("init: success", t), None);
        assert_eq!(parse_marker("ctrace-vm-ffffffffffffffff init: success", t), None);
        assert_eq!(parse_marker(&format!("{t} init: successful"), t), None);
    }

    #[test]
    fn strips_terminal_escapes() {
        let seabios = "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)";
        assert_eq!(strip_escapes(seabios), "SeaBIOS (version 1.16.2)");
        assert_eq!(strip_escapes("plain [1] text\x1b"), "plain [1] text");
    }

    #[test]
    fn detects_kernel_trouble() {
        assert!(kernel_trouble(
            "[   12.3] Kernel panic - not syncing: Attempted to kill init!"
        ));
        assert!(kernel_trouble(
            "[   40.0] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:"
        ));
        assert!(kernel_trouble(
            "[   60.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!"
        ));
        assert!(kernel_trouble(
            "BUG: kernel NULL pointer dereference, address: 0000000000000000"
        ));
        assert!(!kernel_trouble(
            "nf_conntrack: default automatic helper assignment has been turned off"
        ));
    }

    #[test]
    fn only_failures_before_init_are_booted_again() {
        let outcome = |exit_reason, boot_time| VmOutcome {
            passed: false,
            console: String::new(),
            duration: Duration::ZERO,
            boot_time,
            exit_reason,
            log_path: PathBuf::new(),
            token: String::new(),
        };
        let oops = || ExitReason::KernelTrouble {
            line: "Oops: int3".into(),
        };
        assert!(boot_hiccup(&outcome(oops(), None)), "an oops before /init");
        assert!(
            !boot_hiccup(&outcome(oops(), Some(Duration::from_secs(5)))),
            "an oops during the test is a result"
        );
        let hang = ExitReason::BootHang {
            limit: BOOT_TIMEOUT,
            attempts: 1,
        };
        assert!(boot_hiccup(&outcome(hang, None)));
        assert!(!boot_hiccup(&outcome(ExitReason::ScriptFailed { code: 1 }, None)));
    }

    #[test]
    fn outcome_extracts_script_output() {
        let t = "ctrace-vm-1";
        let outcome = VmOutcome {
            passed: true,
            console: format!("boot\n{t} init: started\n{t} init: running script\n7680\nok\n{t} init: success\n"),
            duration: Duration::ZERO,
            boot_time: None,
            exit_reason: ExitReason::Success,
            log_path: PathBuf::new(),
            token: t.to_string(),
        };
        assert_eq!(outcome.script_output(), "7680\nok\n");
        assert_eq!(outcome.tail(2), format!("ok\n{t} init: success"));
        assert!(outcome.ensure_passed().is_ok());
        let failed = VmOutcome {
            passed: false,
            exit_reason: ExitReason::Timeout {
                limit: Duration::from_secs(300),
            },
            ..outcome
        };
        let err = failed.ensure_passed().unwrap_err().to_string();
        assert!(
            err.starts_with("the guest did not finish within 300s; last 40 console lines:\nboot\n"),
            "{err}"
        );
    }

    #[test]
    fn guest_paths_are_absolute_and_contained() {
        assert_eq!(guest_path("/usr/local/bin/ctrace").unwrap(), "usr/local/bin/ctrace");
        assert!(guest_path("bin/x").is_err());
        assert!(guest_path("/../etc/x").is_err());
        assert!(guest_path("/").is_err());
    }

    #[test]
    fn writes_newc_with_parents_and_padding() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.bytes("a/b", 0o644, b"hello").unwrap();
        let out = cpio.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        // The parent directory comes first, then the file, then the trailer.
        let a = text.find("a\0").unwrap();
        let b = text.find("a/b\0").unwrap();
        assert!(a < b && text[b..].contains("hello") && text.ends_with("TRAILER!!!\0\0\0\0"));
        assert_eq!(&out[..6], b"070701");
        // The file's mode field: regular file 0644.
        let file_header = &text[b - 110..];
        assert_eq!(&file_header[14..22], "000081a4");
    }
}
