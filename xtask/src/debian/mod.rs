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
use std::process::Command;
use std::str::FromStr;

mod apt;
use apt::{Apt, run};

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
}
