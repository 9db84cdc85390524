//! `cargo xtask dist`: one static ctrace binary (the eBPF object is embedded), `target/dist/ctrace`.

use crate::{build, setup};
use anyhow::{Context, Result, bail, ensure};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Dist builds name the target explicitly so that `RUSTFLAGS` reach only ctrace's own artifacts, not build
/// scripts or proc-macros (which cannot be linked statically).
pub const DIST_TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn dist(ws: &Path) -> Result<PathBuf> {
    let built = build_static(ws)?;
    let dir = build::target_dir(ws).join("dist");
    fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    let dest = dir.join("ctrace");
    fs::copy(&built, &dest).with_context(|| format!("could not copy {} to {}", built.display(), dest.display()))?;
    let size = fs::metadata(&dest)
        .with_context(|| format!("could not stat {}", dest.display()))?
        .len();
    eprintln!(
        "xtask: {}: static {DIST_TARGET} executable, {:.1} MiB ({size} bytes)",
        dest.display(),
        size as f64 / (1024.0 * 1024.0)
    );
    crate::package::write(ws, &dest)?;
    Ok(dest)
}

/// Builds a statically linked release ctrace (glibc, `+crt-static`) in `target/dist-build` and returns its path.
pub fn build_static(ws: &Path) -> Result<PathBuf> {
    build_static_bin(ws, "ctrace", "ctrace")
}

/// Builds the binary `bin` of `package` statically linked, as [`build_static`] does, and returns its path.
pub fn build_static_bin(ws: &Path, package: &str, bin: &str) -> Result<PathBuf> {
    let mut cmd = static_cargo(ws, "build")?;
    cmd.args(["--package", package, "--bin", bin, "--release"]);
    setup::run(&mut cmd).with_context(|| format!("building the static {bin} failed"))?;
    let path = static_target_dir(ws).join(DIST_TARGET).join("release").join(bin);
    ensure_static(&path)?;
    Ok(path)
}

/// `cargo <subcommand>` for statically linked artifacts: the dist target, `+crt-static`, and `target/dist-build`.
///
/// The separate target directory keeps these flags from invalidating the normal builds. The nested eBPF build that
/// ctrace/build.rs starts is unaffected: aya-build gives it its own `CARGO_ENCODED_RUSTFLAGS`, which override
/// `RUSTFLAGS`.
pub fn static_cargo(ws: &Path, subcommand: &str) -> Result<Command> {
    let mut cmd = build::cargo(ws)?;
    cmd.args([subcommand, "--target", DIST_TARGET, "--target-dir"])
        .arg(static_target_dir(ws))
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    Ok(cmd)
}

fn static_target_dir(ws: &Path) -> PathBuf {
    build::target_dir(ws).join("dist-build")
}

/// Checks that `bin` is an ELF executable with no program interpreter, i.e. that it needs no shared libraries.
pub fn ensure_static(bin: &Path) -> Result<()> {
    const PT_INTERP: u32 = 3;
    let elf = fs::read(bin).with_context(|| format!("could not read {}", bin.display()))?;
    let u16_at = |off: usize| elf.get(off..off + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |off: usize| {
        elf.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |off: usize| {
        elf.get(off..off + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // Magic, ELFCLASS64, little-endian.
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        bin.display()
    );
    let header = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    let (Some(phoff), Some(phentsize), Some(phnum)) = header else {
        bail!("{} has a truncated ELF header", bin.display());
    };
    let phoff = usize::try_from(phoff).context("ELF program header offset out of range")?;
    for i in 0..usize::from(phnum) {
        let Some(p_type) = u32_at(phoff + i * usize::from(phentsize)) else {
            bail!("{} has a truncated ELF program header table", bin.display());
        };
        if p_type == PT_INTERP {
            bail!(
                "{} is dynamically linked (it names an ELF interpreter), not static",
                bin.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ensure_static;

    #[test]
    fn a_dynamically_linked_executable_is_not_static() {
        let exe = std::env::current_exe().unwrap();
        let err = ensure_static(&exe).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err:#}");
    }

    #[test]
    fn a_non_elf_file_is_rejected() {
        let err = ensure_static(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))).unwrap_err();
        assert!(err.to_string().contains("not a 64-bit"), "{err:#}");
    }
}
