//! What the tests that run inside VM guests change there, each undone on drop: kernel modules (nf_conntrack
//! unloaded and loaded again, the modules that hold it), iptables rules in the guest's initial netns, files under
//! /etc. Only a guest may run these: the host's nf_conntrack is built in and its rules are the machine's.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};
use ctrace::check::{KernelVersion, proc_path};

use crate::run;

/// busybox's modprobe, by path: busybox sh would run its applet in a forked shell without exec, and a real exec is
/// what a module event's process and command line are checked against (kmod's modprobe is always one).
pub const BUSYBOX_MODPROBE: &str = "/sbin/modprobe";
/// The variable that names kmod's modprobe in the guest (the VM runner sets it where it copies kmod in).
pub const KMOD_MODPROBE_ENV: &str = "CTRACE_TEST_KMOD_MODPROBE";
/// What a firewall stop unloads in these tests: the match that holds nf_conntrack and the filter table.
pub const FIREWALL_MODULES: [&str; 2] = ["xt_conntrack", "iptable_filter"];

/// The global conntrack limit every reload test raises, lowers or watches being reset.
pub const MAX_KEY: &str = "net.netfilter.nf_conntrack_max";

/// The running kernel's version, parsed by ctrace's own parser.
pub fn kernel_version() -> anyhow::Result<KernelVersion> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").context("cannot read the kernel release")?;
    KernelVersion::parse(&release).with_context(|| format!("unreadable kernel release {release:?}"))
}

/// The value of a dotted sysctl key (`net.netfilter.nf_conntrack_max`), trimmed.
pub fn sysctl(key: &str) -> anyhow::Result<String> {
    let path = proc_path(key);
    Ok(fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}"))?
        .trim()
        .to_owned())
}

/// Sets a dotted sysctl key and puts the old value back on drop.
pub fn set_sysctl(key: &str, value: &str) -> anyhow::Result<crate::SysctlGuard> {
    crate::SysctlGuard::set(&proc_path(key), value)
}

/// Whether `name` is a loaded module (built-in ones have no initstate).
pub fn module_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(name).join("initstate").exists()
}

/// The modules that hold nf_conntrack (`/sys/module/nf_conntrack/holders`), sorted.
pub fn conntrack_holders() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir("/sys/module/nf_conntrack/holders")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Runs busybox's `modprobe ARGS` and returns its exit code (the test decides what a failure means).
pub fn modprobe(args: &[&str]) -> anyhow::Result<i32> {
    exit_code(BUSYBOX_MODPROBE, args)
}

/// Runs kmod's `modprobe ARGS` (which refuses to unload a module in use without asking the kernel) and returns its
/// exit code.
pub fn kmod_modprobe(args: &[&str]) -> anyhow::Result<i32> {
    let path = std::env::var(KMOD_MODPROBE_ENV)
        .with_context(|| format!("{KMOD_MODPROBE_ENV} is not set: this guest has no kmod"))?;
    exit_code(&path, args)
}

fn exit_code(program: &str, args: &[&str]) -> anyhow::Result<i32> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    Ok(status.code().unwrap_or(-1))
}

/// `modprobe -r nf_conntrack` then `modprobe nf_conntrack` (nothing may hold it): its settings go back to their
/// defaults, as in the incident.
pub fn reload_conntrack() -> anyhow::Result<()> {
    let rc = modprobe(&["-r", "nf_conntrack"])?;
    ensure!(rc == 0, "modprobe -r nf_conntrack failed (exit {rc})");
    let rc = modprobe(&["nf_conntrack"])?;
    ensure!(rc == 0, "modprobe nf_conntrack failed (exit {rc})");
    Ok(())
}

/// An empty conntrack table and zeroed counters in every netns, as after boot: nf_conntrack reloaded, with the
/// firewall modules that hold it unloaded around the reload and loaded again.
pub fn empty_conntrack_table() -> anyhow::Result<()> {
    let _off = Unloaded::modules(&FIREWALL_MODULES)?;
    reload_conntrack()
}

/// Modules unloaded for a while (a firewall stop); they are loaded again, in reverse order, on drop.
pub struct Unloaded {
    modules: Vec<String>,
}

impl Unloaded {
    /// Unloads those of `names` that are loaded, in this order.
    pub fn modules(names: &[&str]) -> anyhow::Result<Unloaded> {
        let mut unloaded = Unloaded { modules: Vec::new() };
        for &name in names.iter().filter(|n| module_loaded(n)) {
            run(&["rmmod", name])?;
            unloaded.modules.push(name.to_owned());
        }
        Ok(unloaded)
    }
}

impl Drop for Unloaded {
    fn drop(&mut self) {
        for name in self.modules.iter().rev() {
            if let Err(err) = modprobe(&[name]).and_then(|rc| {
                ensure!(rc == 0, "exit {rc}");
                Ok(())
            }) {
                eprintln!("FAILED TO LOAD {name} again: {err:#}");
            }
        }
    }
}

/// The rule that makes conntrack track the guest's outgoing traffic (its match module, xt_conntrack, holds
/// nf_conntrack); deleted on drop.
pub fn track_output() -> anyhow::Result<IptablesRule> {
    IptablesRule::add("iptables", &ctrace::demo::TRACK_OUTPUT_RULE)
}

/// An iptables rule, deleted on drop: `IptablesRule::add("iptables", &["-I", "OUTPUT", ...])` (`-A` or `-I`, then
/// the chain, then the rule).
pub struct IptablesRule {
    tool: String,
    chain: String,
    rule: Vec<String>,
}

impl IptablesRule {
    pub fn add(tool: &str, spec: &[&str]) -> anyhow::Result<IptablesRule> {
        let [op @ ("-A" | "-I"), chain, rule @ ..] = spec else {
            anyhow::bail!("{spec:?} does not start with -A or -I and a chain");
        };
        let mut args = vec![tool, "-w", op, chain];
        args.extend_from_slice(rule);
        run(&args)?;
        Ok(IptablesRule {
            tool: tool.to_owned(),
            chain: (*chain).to_owned(),
            rule: rule.iter().map(|w| (*w).to_owned()).collect(),
        })
    }
}

impl Drop for IptablesRule {
    fn drop(&mut self) {
        let mut args = vec![self.tool.as_str(), "-w", "-D", &self.chain];
        args.extend(self.rule.iter().map(String::as_str));
        if let Err(err) = run(&args) {
            eprintln!("FAILED TO DELETE the rule {}: {err:#}", args.join(" "));
        }
    }
}

/// A file written for a test (its directory created if needed); on drop the old content is put back, or the file
/// removed when there was none.
pub struct FileGuard {
    path: PathBuf,
    old: Option<Vec<u8>>,
}

impl FileGuard {
    pub fn write(path: &str, content: &str) -> anyhow::Result<FileGuard> {
        let path = PathBuf::from(path);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let old = fs::read(&path).ok();
        fs::write(&path, content).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(FileGuard { path, old })
    }
}

impl Drop for FileGuard {
    fn drop(&mut self) {
        let result = match &self.old {
            Some(old) => fs::write(&self.path, old),
            None => fs::remove_file(&self.path),
        };
        if let Err(err) = result {
            eprintln!("FAILED TO RESTORE {}: {err}", self.path.display());
        }
    }
}

/// `options nf_conntrack ...` in /etc/modprobe.d, applied by a reload (nothing may hold nf_conntrack). On drop the
/// file goes and nf_conntrack is reloaded with its defaults.
pub struct ConntrackOptions {
    file: Option<FileGuard>,
}

impl ConntrackOptions {
    pub fn apply(options: &str) -> anyhow::Result<ConntrackOptions> {
        let file = FileGuard::write(
            "/etc/modprobe.d/nf_conntrack.conf",
            &format!("options nf_conntrack {options}\n"),
        )?;
        let applied = ConntrackOptions { file: Some(file) };
        reload_conntrack()?;
        Ok(applied)
    }
}

impl Drop for ConntrackOptions {
    fn drop(&mut self) {
        drop(self.file.take());
        if let Err(err) = reload_conntrack() {
            eprintln!("FAILED TO RELOAD nf_conntrack with its default options: {err:#}");
        }
    }
}
