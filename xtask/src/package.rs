//! What `cargo xtask dist` writes beside the static binary: man pages and shell completions generated from
//! ctrace's clap definitions (`ctrace/examples/docs.rs`), and a Debian package built by dpkg-deb with the binary,
//! the systemd unit, the completions, the man pages and deploy/'s Prometheus and Grafana files. The test step
//! installs that package on this machine, uses it, and removes it again.

use crate::{build, setup};
use anyhow::{Context, Result, bail, ensure};
use flate2::{Compression, write::GzEncoder};
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian packages the package test uses: man-db for `man -w`, the shells whose completions it loads.
pub const PACKAGES: &[&str] = &["man-db", "zsh", "fish", "systemd"];
/// The binary is built for x86_64 (dist::DIST_TARGET).
const DEB_ARCH: &str = "amd64";
const MAINTAINER: &str = "ctrace developers";

/// Where each generated or deploy/ file goes in the package: (source relative to the dist dir or workspace, path
/// in the package, mode).
struct Item {
    from: PathBuf,
    to: String,
    mode: u32,
}

/// Writes `dist/man`, `dist/completions` and `dist/ctrace_VERSION_amd64.deb` for the binary at `binary`;
/// returns the package's path.
pub fn write(ws: &Path, binary: &Path) -> Result<PathBuf> {
    let dist = binary
        .parent()
        .context("the dist binary has no directory")?
        .to_path_buf();
    let mut docs = build::cargo(ws)?;
    docs.args(["run", "--quiet", "--package", "ctrace", "--example", "docs", "--"])
        .arg(&dist);
    setup::run(&mut docs).context("generating the man pages and completions failed")?;

    let meta = Metadata::read(ws)?;
    let version_line = setup::capture(Command::new(binary).arg("--version"))?;
    ensure!(
        version_line.trim() == format!("ctrace {}", meta.version),
        "{} --version says {:?}, Cargo.toml says {}",
        binary.display(),
        version_line.trim(),
        meta.version
    );

    let root = dist.join("deb-root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("could not remove {}", root.display()))?;
    }
    let mut items = vec![
        item(binary, "usr/bin/ctrace", 0o755),
        item(
            ws.join("deploy/systemd/ctrace.service"),
            "usr/lib/systemd/system/ctrace.service",
            0o644,
        ),
        item(
            dist.join("completions/ctrace.bash"),
            "usr/share/bash-completion/completions/ctrace",
            0o644,
        ),
        item(
            dist.join("completions/_ctrace"),
            "usr/share/zsh/vendor-completions/_ctrace",
            0o644,
        ),
        item(
            dist.join("completions/ctrace.fish"),
            "usr/share/fish/vendor_completions.d/ctrace.fish",
            0o644,
        ),
    ];
    for (from, name) in [
        ("deploy/prometheus/ctrace.rules.yml", "ctrace.rules.yml"),
        ("deploy/grafana/ctrace.json", "ctrace-grafana.json"),
        ("deploy/kubernetes/ctrace-daemonset.yaml", "ctrace-daemonset.yaml"),
        ("deploy/kubernetes/Containerfile", "Containerfile"),
    ] {
        items.push(item(
            ws.join(from),
            &format!("usr/share/doc/ctrace/examples/{name}"),
            0o644,
        ));
    }
    for entry in fs::read_dir(dist.join("man")).context("the docs example wrote no man pages")? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("a man page name is not UTF-8")?;
        if name.ends_with(".1") {
            items.push(item(&path, &format!("usr/share/man/man1/{name}.gz"), 0o644));
        }
    }
    let mut installed_bytes = 0u64;
    for it in &items {
        let dest = root.join(&it.to);
        fs::create_dir_all(dest.parent().context("a package path without a directory")?)?;
        let data = fs::read(&it.from).with_context(|| format!("could not read {}", it.from.display()))?;
        let data = if it.to.ends_with(".gz") { gzip(&data)? } else { data };
        installed_bytes += data.len() as u64;
        fs::write(&dest, &data).with_context(|| format!("could not write {}", dest.display()))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(it.mode))?;
    }
    let copyright = root.join("usr/share/doc/ctrace/copyright");
    fs::write(
        &copyright,
        format!(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: ctrace\n\n\
             Files: *\nCopyright: {MAINTAINER}\nLicense: {}\n",
            meta.license
        ),
    )?;
    fs::create_dir_all(root.join("DEBIAN"))?;
    fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: ctrace\nVersion: {}\nArchitecture: {DEB_ARCH}\nMaintainer: {MAINTAINER}\nInstalled-Size: {}\n\
             Section: net\nPriority: optional\nDescription: {}\n ctrace shows which packets netfilter connection \
             tracking dropped, and why: table full,\n early-drop eviction, insert failure, invalid packet, or a \
             firewall rule. It runs as a\n daemon (ctrace.service, not enabled by this package) serving Prometheus \
             metrics.\n",
            meta.version,
            installed_bytes.div_ceil(1024),
            meta.description
        ),
    )?;

    for old in fs::read_dir(&dist)?.flatten() {
        if old.file_name().to_string_lossy().ends_with(".deb") {
            fs::remove_file(old.path())?;
        }
    }
    let deb = dist.join(format!("ctrace_{}_{DEB_ARCH}.deb", meta.version));
    setup::output(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&root)
            .arg(&deb),
    )
    .context("dpkg-deb could not build the package")?;
    eprintln!(
        "xtask: {}: Debian package ({} files), with man pages and bash, zsh and fish completions in {}",
        deb.display(),
        items.len() + 1,
        dist.display()
    );
    Ok(deb)
}

fn item(from: impl AsRef<Path>, to: &str, mode: u32) -> Item {
    Item {
        from: from.as_ref().to_path_buf(),
        to: to.to_owned(),
        mode,
    }
}

/// gzip -9n: no name, no time stamp, so the package's man pages are the same in every build.
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::best());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

/// ctrace's version, description and license, from Cargo.
struct Metadata {
    version: String,
    description: String,
    license: String,
}

impl Metadata {
    fn read(ws: &Path) -> Result<Metadata> {
        let mut cmd = build::cargo(ws)?;
        cmd.args(["metadata", "--no-deps", "--format-version", "1"]);
        let json: serde_json::Value = serde_json::from_str(&setup::capture(&mut cmd)?)?;
        let pkg = json["packages"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "ctrace"))
            .context("cargo metadata lists no ctrace package")?;
        let field = |name: &str| {
            pkg[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("ctrace's Cargo.toml has no {name}"))
        };
        Ok(Metadata {
            version: field("version")?,
            description: field("description")?,
            license: field("license")?,
        })
    }
}

/// The test step: builds the package (`cargo xtask dist`), installs it with dpkg, checks what it installed with
/// the tools a user would use, and purges it, leaving the machine as it was (it refuses to run where a ctrace is
/// already installed).
pub fn test_package(ws: &Path) -> Result<()> {
    ensure!(
        setup::is_root(),
        "installing a Debian package needs root: run `cargo xtask test` as root"
    );
    let installed = |pkg: &str| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"))
    };
    if installed("ctrace") || Path::new("/usr/bin/ctrace").exists() {
        bail!("a ctrace is already installed here (package ctrace or /usr/bin/ctrace): remove it before this step");
    }
    let binary = crate::dist::dist(ws)?;
    let deb = fs::read_dir(binary.parent().context("no dist directory")?)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("cargo xtask dist wrote no .deb")?;
    let contents = setup::capture(Command::new("dpkg-deb").arg("--contents").arg(&deb))?;
    eprintln!("xtask: {} contains:\n{}", deb.display(), contents.trim_end());

    setup::output(Command::new("dpkg").arg("-i").arg(&deb)).context("dpkg -i failed")?;
    let checks = check_installed();
    let removed = setup::output(Command::new("dpkg").args(["--purge", "ctrace"]));
    checks?;
    removed.context("dpkg --purge ctrace failed")?;
    ensure!(!installed("ctrace"), "dpkg --purge left ctrace installed");
    for line in contents.lines() {
        let path = line
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .trim_start_matches('.');
        if !line.starts_with('d') && !path.is_empty() {
            ensure!(!Path::new(path).exists(), "{path} is still there after dpkg --purge");
        }
    }
    eprintln!("xtask: the package installed, worked and was purged; none of its files are left");
    Ok(())
}

/// What a user of the installed package would try.
fn check_installed() -> Result<()> {
    let version = setup::capture(Command::new("ctrace").arg("--version"))?;
    eprintln!("xtask: ctrace --version: {}", version.trim());
    ensure!(version.starts_with("ctrace "), "ctrace --version printed {version:?}");
    for page in ["ctrace", "ctrace-run", "ctrace-demo", "ctrace-check"] {
        let path = setup::capture(Command::new("man").args(["-w", page]))?;
        ensure!(
            path.trim() == format!("/usr/share/man/man1/{page}.1.gz"),
            "man -w {page} found {path:?}"
        );
        // groff's warnings (bad requests, unknown escapes) go to stderr.
        let out = setup::output(Command::new("man").args(["--warnings", page]).env("MANWIDTH", "80"))?;
        ensure!(
            out.stderr.is_empty() && !out.stdout.is_empty(),
            "man {page} warned: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "xtask: man -w ctrace: /usr/share/man/man1/ctrace.1.gz (and ctrace-run, -demo, -check), no groff warnings"
    );
    // bash: the completion function offers the subcommands.
    let words = setup::capture(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/ctrace && COMP_WORDS=(ctrace r) COMP_CWORD=1 && \
         _ctrace ctrace r ctrace && printf '%s\\n' \"${COMPREPLY[@]}\"",
    ]))?;
    ensure!(
        words.lines().any(|w| w == "run"),
        "bash completes `ctrace r` to {words:?}"
    );
    setup::output(Command::new("zsh").args(["-n", "/usr/share/zsh/vendor-completions/_ctrace"]))?;
    let fish = setup::capture(Command::new("fish").args(["-c", "complete -C 'ctrace r'"]))?;
    ensure!(
        fish.lines().any(|l| l.starts_with("run")),
        "fish completes `ctrace r` to {fish:?}"
    );
    eprintln!("xtask: completions: bash and fish complete `ctrace r` to run; zsh -n accepts _ctrace");
    // verify exits 0 on unknown or misspelt settings, but says so on stderr. It also looks up the man pages the
    // unit's Documentation= names, which the package has just installed.
    let verify =
        setup::output(Command::new("systemd-analyze").args(["verify", "/usr/lib/systemd/system/ctrace.service"]))
            .context("systemd-analyze verify rejects the installed unit")?;
    ensure!(
        verify.stderr.is_empty(),
        "systemd-analyze verify complains about the installed unit: {}",
        String::from_utf8_lossy(&verify.stderr).trim()
    );
    eprintln!("xtask: systemd-analyze verify /usr/lib/systemd/system/ctrace.service: no complaint (man pages found)");
    Ok(())
}
