//! apt for the kernel packages: the host's own state, or a private sources list and lists directory built from
//! the host's mirrors (one-line and deb822 sources); and the commands it runs, with their output in errors.

use anyhow::{Context, Result, bail, ensure};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::KernelSpec;

/// How apt is invoked: the host's own state, or (for bullseye) a private sources list and lists directory so that
/// the host's apt is left untouched.
pub(super) struct Apt {
    options: Vec<String>,
    lists: Option<PathBuf>,
}

impl Apt {
    pub(super) fn for_spec(spec: KernelSpec, cache_root: &Path) -> Result<Apt> {
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
    pub(super) fn ensure_lists(&self) -> Result<bool> {
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

    pub(super) fn update(&self) -> Result<()> {
        run(self.command("apt-get").args(["-q", "update"]))
    }

    /// Resolves a metapackage to the versioned image package its candidate depends on.
    pub(super) fn resolve(&self, meta: &str) -> Result<String> {
        let out = output(self.command("apt-cache").args(["depends", meta]))
            .with_context(|| format!("apt knows no package {meta}"))?;
        image_dependency(&out).with_context(|| format!("{meta} depends on no linux-image package:\n{out}"))
    }

    pub(super) fn download(&self, package: &str, dir: &Path) -> Result<PathBuf> {
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
pub(super) fn run(cmd: &mut Command) -> Result<()> {
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
