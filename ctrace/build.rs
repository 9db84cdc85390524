use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the eBPF object (ctrace-ebpf, bpfel target, nightly + bpf-linker) and leaves it in
/// OUT_DIR for `include_bytes!`. `AYA_BUILD_SKIP=1` skips it (clippy, docs).
fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|p| p.name.as_str() == "ctrace-ebpf")
        .ok_or_else(|| anyhow!("ctrace-ebpf package not found"))?;
    let root_dir = ebpf_package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf_package.manifest_path))?
        .as_str();
    aya_build::build_ebpf(
        [Package {
            name: ebpf_package.name.as_str(),
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom("nightly"),
    )
}
