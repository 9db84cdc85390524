//! Debian kernel packages for the test VMs, fetched with apt and cached under
//! `target/vm-kernels/<name>/`.
//!
//! The kernels come from Debian's archive (the only package source this project's machines reach), so every
//! machine can build the same VM from scratch. Once extracted, a kernel is reused without touching the network.

#![allow(
    dead_code,
    reason = "a library for the VM commands and tests: not every command uses all of it"
)]

use anyhow::{Context, Result, bail, ensure};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

/// The Debian kernels the VM tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelSpec {
    /// bullseye `linux-image-cloud-amd64` (5.10).
    Debian510,
    /// bookworm `linux-image-amd64` (6.1).
    Debian61,
    /// bookworm-security `linux-image-6.12-amd64` (6.12).
    Debian612,
}

impl KernelSpec {
    pub const ALL: [KernelSpec; 3] = [KernelSpec::Debian510, KernelSpec::Debian61, KernelSpec::Debian612];

    /// The name used on the command line: "5.10", "6.1" or "6.12".
    pub fn short_name(self) -> &'static str {
        match self {
            KernelSpec::Debian510 => "5.10",
            KernelSpec::Debian61 => "6.1",
            KernelSpec::Debian612 => "6.12",
        }
    }

    /// The cache directory name under `target/vm-kernels/`.
    pub fn dir_name(self) -> String {
        format!("debian-{}", self.short_name())
    }

    /// The metapackage whose dependency names the real, versioned image package.
    pub fn meta_package(self) -> &'static str {
        match self {
            KernelSpec::Debian510 => "linux-image-cloud-amd64",
            KernelSpec::Debian61 => "linux-image-amd64",
            KernelSpec::Debian612 => "linux-image-6.12-amd64",
        }
    }

    /// bullseye is not in the host's apt sources: it gets an apt state of its own.
    fn own_apt_suite(self) -> Option<&'static str> {
        match self {
            KernelSpec::Debian510 => Some("bullseye"),
            KernelSpec::Debian61 | KernelSpec::Debian612 => None,
        }
    }
}

impl fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Debian {} ({})", self.short_name(), self.meta_package())
    }
}

impl FromStr for KernelSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim();
        let name = name.strip_prefix("debian-").unwrap_or(name);
        KernelSpec::ALL
            .into_iter()
            .find(|k| k.short_name() == name)
            .with_context(|| {
                let known: Vec<_> = KernelSpec::ALL.iter().map(|k| k.short_name()).collect();
                format!("unknown kernel {s:?}: expected one of {}", known.join(", "))
            })
    }
}

/// An extracted kernel, ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The release string (`uname -r`), e.g. `6.1.0-56-amd64`.
    pub version: String,
    /// The versioned Debian package it came from.
    pub package: String,
    pub vmlinuz: PathBuf,
    /// `.../lib/modules/<version>`, holding `modules.dep` (made by depmod at extraction).
    pub modules_root: PathBuf,
}

/// Where kernels are cached by default: `<target>/vm-kernels`.
pub fn default_cache_root() -> PathBuf {
    crate::build::target_dir(&crate::workspace_root()).join("vm-kernels")
}

const READY_MARKER: &str = "extracted";

/// Returns the kernel for `spec`, downloading and extracting it into `cache_root/<name>/` on first use.
pub fn fetch(spec: KernelSpec, cache_root: &Path) -> Result<Kernel> {
    let dir = cache_root.join(spec.dir_name());
    if let Some(kernel) = cached(&dir)? {
        return Ok(kernel);
    }
    crate::setup::ensure_debian_packages(&["kmod"])?;
    fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    let apt = Apt::for_spec(spec, cache_root)?;

    // A stale package list names a package the mirror no longer has: refresh once and retry.
    let mut updated = apt.ensure_lists()?;
    let deb = loop {
        let attempt = apt
            .resolve(spec.meta_package())
            .and_then(|pkg| apt.download(&pkg, &dir).map(|deb| (pkg, deb)));
        match attempt {
            Ok(found) => break found,
            Err(err) if !updated => {
                eprintln!("xtask: {err:#}; running apt-get update and trying again");
                apt.update()?;
                updated = true;
            }
            Err(err) => return Err(err.context(format!("could not download the {spec} kernel"))),
        }
    };
    let (package, deb_path) = deb;
    extract(&package, &deb_path, &dir)?;
    fs::remove_file(&deb_path).ok();
    cached(&dir)?.with_context(|| {
        format!(
            "the {spec} kernel was extracted into {} but is incomplete",
            dir.display()
        )
    })
}

/// Reads a finished extraction; `None` when there is none yet.
fn cached(dir: &Path) -> Result<Option<Kernel>> {
    let Ok(marker) = fs::read_to_string(dir.join(READY_MARKER)) else {
        return Ok(None);
    };
    let mut lines = marker.lines();
    let (Some(package), Some(version)) = (lines.next(), lines.next()) else {
        return Ok(None);
    };
    let root = dir.join("root");
    let kernel = Kernel {
        version: version.to_string(),
        package: package.to_string(),
        vmlinuz: root.join("boot").join(format!("vmlinuz-{version}")),
        modules_root: root.join("lib/modules").join(version),
    };
    let complete = kernel.vmlinuz.is_file() && kernel.modules_root.join("modules.dep").is_file();
    Ok(complete.then_some(kernel))
}

/// Unpacks the image package and builds its module index. Works in `root.tmp` and renames at the end so that an
/// interrupted run never leaves a tree that looks complete.
fn extract(package: &str, deb: &Path, dir: &Path) -> Result<()> {
    let tmp = dir.join("root.tmp");
    let root = dir.join("root");
    for stale in [&tmp, &root] {
        if stale.exists() {
            fs::remove_dir_all(stale).with_context(|| format!("could not remove {}", stale.display()))?;
        }
    }
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;

    // Newer packages put modules under usr/lib; depmod -b looks under lib/.
    let usr_modules = tmp.join("usr/lib/modules");
    if !tmp.join("lib/modules").exists() && usr_modules.is_dir() {
        fs::create_dir_all(tmp.join("lib"))?;
        std::os::unix::fs::symlink("../usr/lib/modules", tmp.join("lib/modules"))?;
    }
    let version = single_kernel_version(&tmp.join("lib/modules"))?;
    let vmlinuz = tmp.join("boot").join(format!("vmlinuz-{version}"));
    ensure!(vmlinuz.is_file(), "{} has no {}", deb.display(), vmlinuz.display());
    run(Command::new("depmod").arg("-b").arg(&tmp).arg(&version))?;

    fs::rename(&tmp, &root).with_context(|| format!("could not rename {} to {}", tmp.display(), root.display()))?;
    fs::write(dir.join(READY_MARKER), format!("{package}\n{version}\n"))?;
    Ok(())
}

fn single_kernel_version(modules: &Path) -> Result<String> {
    let mut versions = Vec::new();
    for entry in fs::read_dir(modules).with_context(|| format!("the package has no {}", modules.display()))? {
        let entry = entry?;
        if entry.path().is_dir() {
            versions.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    match versions.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected exactly one kernel under {}, found {versions:?}",
            modules.display()
        ),
    }
}

/// How apt is invoked: the host's own state, or (for bullseye) a private sources list and lists directory so that
/// the host's apt is left untouched.
struct Apt {
    options: Vec<String>,
    lists: Option<PathBuf>,
}

impl Apt {
    fn for_spec(spec: KernelSpec, cache_root: &Path) -> Result<Apt> {
        let Some(suite) = spec.own_apt_suite() else {
            return Ok(Apt {
                options: Vec::new(),
                lists: None,
            });
        };
        let state = cache_root.join(format!(".apt-{suite}"));
        let lists = state.join("lists");
        fs::create_dir_all(lists.join("partial")).with_context(|| format!("could not create {}", lists.display()))?;
        let sources = state.join("sources.list");
        let (archive, security) = host_mirrors();
        let signed_by = if Path::new(DEBIAN_KEYRING).is_file() {
            format!("[signed-by={DEBIAN_KEYRING}] ")
        } else {
            String::new()
        };
        fs::write(
            &sources,
            format!("deb {signed_by}{archive} {suite} main\ndeb {signed_by}{security} {suite}-security main\n"),
        )?;
        let options = [
            format!("Dir::Etc::sourcelist={}", sources.display()),
            "Dir::Etc::sourceparts=-".to_string(),
            format!("Dir::State::Lists={}", lists.display()),
            // The binary caches would be built from bullseye's lists and then clash with the host's.
            "Dir::Cache::pkgcache=".to_string(),
            "Dir::Cache::srcpkgcache=".to_string(),
            "Acquire::Languages=none".to_string(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        Ok(Apt {
            options,
            lists: Some(lists),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        // The download directory is not readable by apt's `_apt` sandbox user.
        cmd.args(["-o", "APT::Sandbox::User=root"]).args(&self.options);
        cmd
    }

    /// Runs `apt-get update` when the private lists are empty. Returns whether it ran.
    fn ensure_lists(&self) -> Result<bool> {
        let Some(lists) = &self.lists else {
            return Ok(false);
        };
        let has_packages = fs::read_dir(lists)?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("_Packages"));
        if has_packages {
            return Ok(false);
        }
        self.update()?;
        Ok(true)
    }

    fn update(&self) -> Result<()> {
        run(self.command("apt-get").args(["-q", "update"]))
    }

    /// Resolves a metapackage to the versioned image package its candidate depends on.
    fn resolve(&self, meta: &str) -> Result<String> {
        let out = output(self.command("apt-cache").args(["depends", meta]))
            .with_context(|| format!("apt knows no package {meta}"))?;
        image_dependency(&out).with_context(|| format!("{meta} depends on no linux-image package:\n{out}"))
    }

    fn download(&self, package: &str, dir: &Path) -> Result<PathBuf> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "deb") {
                fs::remove_file(&path)?;
            }
        }
        run(self
            .command("apt-get")
            .args(["-q", "download", package])
            .current_dir(dir))?;
        let prefix = format!("{package}_");
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".deb") {
                return Ok(path);
            }
        }
        bail!("apt-get download {package} left no {prefix}*.deb in {}", dir.display())
    }
}

const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Picks the versioned image package out of `apt-cache depends` output.
fn image_dependency(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|line| {
        let dep = line.trim().trim_start_matches('|').strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches('<').trim_end_matches('>');
        dep.starts_with("linux-image-").then(|| dep.to_string())
    })
}

/// The host's Debian archive and security mirrors, so that bullseye comes from the same (reachable) hosts.
fn host_mirrors() -> (String, String) {
    let mut sources = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<_> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        parts.sort();
        files.extend(parts);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => sources.extend(parse_deb822(&text)),
            Some("list") => sources.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    pick_mirrors(&sources, &host_codename())
}

#[derive(Debug, PartialEq)]
struct AptSource {
    uri: String,
    suites: Vec<String>,
}

fn parse_one_line(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ").or_else(|| line.strip_prefix("deb\t")) else {
            continue;
        };
        let rest = rest.trim_start();
        // Options: `[arch=amd64 signed-by=...]`.
        let rest = match rest.strip_prefix('[') {
            Some(opts) => opts.split_once(']').map_or("", |(_, r)| r),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(AptSource {
                uri: uri.to_string(),
                suites: vec![suite.to_string()],
            });
        }
    }
    out
}

fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    for stanza in lines.split(|l| l.trim().is_empty()) {
        let field = |name: &str| {
            stanza.iter().find_map(|l| {
                let (key, value) = l.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
            })
        };
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let enabled = field("Enabled").is_none_or(|e| !e.eq_ignore_ascii_case("no"));
        let uri = field("URIs").and_then(|u| u.split_whitespace().next().map(str::to_string));
        if let (true, true, Some(uri)) = (is_deb, enabled, uri) {
            let suites = field("Suites")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect();
            out.push(AptSource { uri, suites });
        }
    }
    out
}

/// The sources that carry the host's own release (`bookworm`, `bookworm-security`) are Debian's mirrors; others
/// (e.g. vendor repositories) are not.
fn pick_mirrors(sources: &[AptSource], codename: &str) -> (String, String) {
    let find = |suite: &str| {
        sources
            .iter()
            .find(|s| s.suites.iter().any(|x| x == suite))
            .map(|s| s.uri.trim_end_matches('/').to_string())
    };
    (
        find(codename).unwrap_or_else(|| "http://deb.debian.org/debian".to_string()),
        find(&format!("{codename}-security")).unwrap_or_else(|| "http://deb.debian.org/debian-security".to_string()),
    )
}

fn host_codename() -> String {
    let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "bookworm".to_string())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs a command with inherited output (apt's progress is worth seeing), failing with the command line.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    ensure!(status.success(), "`{}` failed ({status})", describe(cmd));
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    ensure!(
        out.status.success(),
        "`{}` failed ({}): {}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_names() {
        assert_eq!("6.1".parse::<KernelSpec>().unwrap(), KernelSpec::Debian61);
        assert_eq!(" 6.12 ".parse::<KernelSpec>().unwrap(), KernelSpec::Debian612);
        assert_eq!("debian-5.10".parse::<KernelSpec>().unwrap(), KernelSpec::Debian510);
        let err = "6.2".parse::<KernelSpec>().unwrap_err().to_string();
        assert!(err.contains("5.10, 6.1, 6.12"), "{err}");
        for spec in KernelSpec::ALL {
            assert_eq!(spec.short_name().parse::<KernelSpec>().unwrap(), spec);
        }
    }

    #[test]
    fn finds_versioned_image_package() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(image_dependency(out).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        let out = "linux-image-cloud-amd64\n |Depends: <linux-image-5.10.0-35-cloud-amd64>\n  Depends: foo\n";
        assert_eq!(
            image_dependency(out).as_deref(),
            Some("linux-image-5.10.0-35-cloud-amd64")
        );
        assert_eq!(image_dependency("linux-image-amd64\n  Recommends: firmware\n"), None);
    }

    #[test]
    fn picks_host_mirrors_from_both_source_formats() {
        let deb822 = "Types: deb\n# comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n\nTypes: deb\nEnabled: no\nURIs: http://x\nSuites: y\n";
        let sources = parse_deb822(deb822);
        assert_eq!(sources.len(), 2);
        assert_eq!(
            pick_mirrors(&sources, "bookworm"),
            (
                "http://mirror.example/debian".to_string(),
                "http://mirror.example/debian-security".to_string()
            )
        );

        let list = "# deb http://old bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main\n\
                    deb-src http://m/debian bookworm main\ndeb http://s/debian-security bookworm-security main\n\
                    deb http://vendor/apt cloud-sdk-bookworm main\n";
        let sources = parse_one_line(list);
        assert_eq!(
            sources[0],
            AptSource {
                uri: "http://m/debian".into(),
                suites: vec!["bookworm".into()]
            }
        );
        assert_eq!(
            pick_mirrors(&sources, "bookworm"),
            ("http://m/debian".to_string(), "http://s/debian-security".to_string())
        );

        assert_eq!(pick_mirrors(&[], "bookworm").0, "http://deb.debian.org/debian");
    }
}
