//! Installs what building and testing ctrace needs, idempotently: the nightly toolchain's `rust-src`, a
//! project-local bpf-linker linked against the nightly's own libLLVM, and Debian packages.
//!
//! Each `ensure_*` function is quiet and fast (a few subprocesses) when its part is already in place.

use anyhow::{Context, Result, bail, ensure};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The toolchain that builds the eBPF object (ctrace/build.rs uses aya-build with `Toolchain::Custom("nightly")`).
pub const NIGHTLY: &str = "nightly";
/// The bpf-linker release built into `.tools/bpf-linker`.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Packages `cargo xtask run` needs: `ctrace demo` brings up loopback with `ip` and enables
/// conntrack in its netns with an iptables conntrack match.
pub const RUN_PACKAGES: &[&str] = &["iproute2", "iptables"];

/// `cargo xtask setup`: everything that any other task installs on demand, all at once.
pub fn setup(ws: &Path) -> Result<()> {
    let start = Instant::now();
    ensure_toolchain()?;
    let bin_dir = ensure_bpf_linker(ws)?;
    let mut packages: Vec<&str> = Vec::new();
    for pkg in RUN_PACKAGES
        .iter()
        .chain(crate::test::HOST_PACKAGES)
        .chain(crate::test::VM_PACKAGES)
        .chain(crate::deploy_checks::PACKAGES.iter().chain(crate::package::PACKAGES))
    {
        if !packages.contains(pkg) {
            packages.push(pkg);
        }
    }
    ensure_debian_packages(&packages)?;
    eprintln!(
        "xtask: setup complete in {:.1} s: {NIGHTLY} with rust-src, {}, Debian packages {}",
        start.elapsed().as_secs_f64(),
        bin_dir.join("bpf-linker").display(),
        packages.join(" ")
    );
    Ok(())
}

/// Makes sure the `nightly` toolchain is installed with `rust-src` (needed for `-Z build-std=core`).
pub fn ensure_toolchain() -> Result<()> {
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--toolchain", NIGHTLY, "--installed"]);
    let installed = match capture(&mut list) {
        Ok(installed) => installed,
        Err(_) => {
            eprintln!("xtask: installing the {NIGHTLY} Rust toolchain with rust-src");
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
            .with_context(|| format!("could not install the {NIGHTLY} Rust toolchain"))?;
            capture(&mut list)?
        }
    };
    if installed.lines().any(|line| line.trim() == "rust-src") {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the {NIGHTLY} toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
        .with_context(|| format!("could not add rust-src to the {NIGHTLY} toolchain"))
}

/// The nightly toolchain's LLVM, which bpf-linker must be built against.
struct NightlyLlvm {
    /// `$SYSROOT/lib`, holding the shared libLLVM.
    lib_dir: PathBuf,
    /// The library's file name, e.g. `libLLVM-22-rust-1.97.0-nightly.so`.
    file_name: String,
    /// The LLVM major version, e.g. 22 (selects bpf-linker's `llvm-22` feature).
    major: u32,
}

impl NightlyLlvm {
    fn detect() -> Result<Self> {
        let version = capture(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"]))?;
        let llvm = version
            .lines()
            .find_map(|line| line.strip_prefix("LLVM version:"))
            .with_context(|| format!("`rustc +{NIGHTLY} -vV` printed no \"LLVM version\" line"))?
            .trim();
        let major: u32 = llvm
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .with_context(|| format!("could not read the LLVM major version from {llvm:?}"))?;

        let sysroot = capture(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))?;
        let lib_dir = Path::new(sysroot.trim()).join("lib");
        let prefix = format!("libLLVM-{major}-rust-");
        let mut candidates: Vec<String> = fs::read_dir(&lib_dir)
            .with_context(|| format!("could not list {}", lib_dir.display()))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with(&prefix) && name.ends_with(".so"))
            .collect();
        candidates.sort();
        let file_name = match candidates.as_slice() {
            [one] => one.clone(),
            [] => bail!("the {NIGHTLY} toolchain has no {prefix}*.so in {}", lib_dir.display()),
            many => bail!(
                "the {NIGHTLY} toolchain has several LLVM libraries in {}: {many:?}",
                lib_dir.display()
            ),
        };
        Ok(Self {
            lib_dir,
            file_name,
            major,
        })
    }

    /// The name for `-l dylib=`: the file name without `lib` and `.so`.
    fn link_name(&self) -> &str {
        let name = self.file_name.strip_prefix("lib").unwrap_or(&self.file_name);
        name.strip_suffix(".so").unwrap_or(name)
    }
}

/// Makes sure `<ws>/.tools/bpf-linker/bin/bpf-linker` exists, works and was built for the current nightly's
/// libLLVM; builds it (about 45 s) when not. Returns the directory to put on `PATH`.
pub fn ensure_bpf_linker(ws: &Path) -> Result<PathBuf> {
    let root = ws.join(".tools").join("bpf-linker");
    let bin_dir = root.join("bin");
    let exe = bin_dir.join("bpf-linker");
    let stamp = root.join("built-for");
    let llvm = NightlyLlvm::detect()?;
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION} {}\n", llvm.file_name);
    let current = || fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) && linker_version(&exe).is_ok();
    if current() {
        return Ok(bin_dir);
    }

    fs::create_dir_all(&root).with_context(|| format!("could not create {}", root.display()))?;
    let lock_path = root.join(".lock");
    let lock = File::create(&lock_path).with_context(|| format!("could not create {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("could not lock {}", lock_path.display()))?;
    // Another xtask may have built it while this one waited for the lock.
    if current() {
        return Ok(bin_dir);
    }

    let start = Instant::now();
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the {NIGHTLY} toolchain's {} into {} (about a minute)",
        llvm.file_name,
        root.display()
    );
    fs::remove_file(&stamp).ok();
    // CARGO_ENCODED_RUSTFLAGS (0x1f-separated) rather than RUSTFLAGS: a sysroot path may contain spaces.
    let lib_dir = llvm.lib_dir.to_str().context("the nightly sysroot path is not UTF-8")?;
    let rustflags = [
        "-L".to_string(),
        format!("native={lib_dir}"),
        "-l".to_string(),
        format!("dylib={}", llvm.link_name()),
        "-C".to_string(),
        format!("link-arg=-Wl,-rpath,{lib_dir}"),
    ]
    .join("\x1f");
    let features = format!("llvm-{},no-llvm-linking", llvm.major);
    let install = |locked: bool| {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "stable", "cargo", "install"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args(locked.then_some("--locked"))
            .args(["--force", "--root"])
            .arg(&root)
            .args(["--no-default-features", "--features", &features])
            .env("CARGO_ENCODED_RUSTFLAGS", &rustflags)
            .env_remove("RUSTFLAGS")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO_BUILD_TARGET");
        output(&mut cmd)
    };
    if let Err(err) = install(true) {
        eprintln!("xtask: `cargo install --locked bpf-linker` failed ({err:#}); retrying without --locked");
        install(false).context("could not build bpf-linker")?;
    }
    let version = linker_version(&exe).context("the freshly built bpf-linker does not run")?;
    fs::write(&stamp, &wanted).with_context(|| format!("could not write {}", stamp.display()))?;
    eprintln!(
        "xtask: built {} in {:.0} s",
        version.trim(),
        start.elapsed().as_secs_f64()
    );
    Ok(bin_dir)
}

fn linker_version(exe: &Path) -> Result<String> {
    let version = capture(Command::new(exe).arg("--version"))?;
    ensure!(
        version.starts_with("bpf-linker"),
        "{} --version printed {version:?}",
        exe.display()
    );
    Ok(version)
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Installs the Debian packages among `pkgs` that are not installed yet (`apt-get update` once, only when needed).
pub fn ensure_debian_packages(pkgs: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for &pkg in pkgs {
        if !deb_installed(pkg)? {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    ensure!(
        is_root(),
        "installing Debian packages needs root: run as root or install {list}"
    );
    eprintln!("xtask: installing Debian packages: {list}");
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        run(Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get update failed")?;
    }
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("could not install the Debian packages {list}"))?;
    for pkg in missing {
        ensure!(
            deb_installed(pkg)?,
            "apt-get install finished but the Debian package {pkg} is still not installed"
        );
    }
    Ok(())
}

fn deb_installed(pkg: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .context("could not run dpkg-query: cargo xtask installs system packages with dpkg and apt (Debian)")?;
    let status = String::from_utf8_lossy(&out.stdout);
    Ok(out.status.success() && status.split_whitespace().last() == Some("installed"))
}

static EBPF_ENV: Mutex<Option<Vec<(OsString, OsString)>>> = Mutex::new(None);

/// The environment for every cargo command that builds ctrace (its build.rs builds the eBPF object with nightly and
/// bpf-linker): `PATH` with the project's bpf-linker first. Ensures the toolchain and bpf-linker on first use.
pub fn ebpf_env(ws: &Path) -> Result<Vec<(OsString, OsString)>> {
    let mut cached = EBPF_ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(env) = cached.as_ref() {
        return Ok(env.clone());
    }
    ensure_toolchain()?;
    let bin_dir = ensure_bpf_linker(ws)?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(bin_dir.clone()).chain(std::env::split_paths(&path)))
        .with_context(|| format!("could not put {} on PATH", bin_dir.display()))?;
    let env = vec![(OsString::from("PATH"), path)];
    *cached = Some(env.clone());
    Ok(env)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The command line as a shell would show it, for messages.
pub fn describe(cmd: &Command) -> String {
    let quote = |s: &OsStr| {
        let s = s.to_string_lossy();
        if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_=+./:@,".contains(c)) {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with the terminal as its stdin/stdout/stderr; an error when it cannot start or fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    ensure!(status.success(), "`{}` failed ({status})", describe(cmd));
    Ok(())
}

/// Runs `cmd` and returns its stdout; on failure the error carries the end of its stderr.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8 output", describe(cmd)))
}

/// Runs `cmd` with stdout and stderr captured; on failure the error carries the end of its stderr.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        bail!("`{}` failed ({}):\n{tail}", describe(cmd), out.status);
    }
    Ok(out)
}
