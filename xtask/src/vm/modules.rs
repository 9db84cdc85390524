//! Which kernel modules a guest loads and in what order: the closure of the requested names over the kernel's
//! `modules.dep`, `modules.softdep`, `modules.alias` and `modules.builtin` (hard dependencies first, soft ones best
//! effort), and their staging, decompressed and indexed by depmod, because busybox modprobe reads plain `.ko` only.

use crate::debian::Kernel;
use anyhow::{Context, Result, ensure};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

/// Copies the needed modules (decompressed: busybox modprobe reads plain `.ko` only) into
/// `staging/lib/modules/<version>/` and indexes them with depmod, so that the guest's modprobe sees just them.
pub(super) fn stage_modules(kernel: &Kernel, loads: &[ModuleLoad], staging: &Path) -> Result<()> {
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
pub(super) struct ModuleLoad {
    /// The module name (`nf_conntrack`).
    pub(super) name: String,
    /// Its path relative to `/lib/modules/<version>/`, as in `modules.dep`.
    pub(super) path: String,
    /// Requested or a hard dependency of a requested module; soft dependencies are loaded on a best-effort basis.
    pub(super) required: bool,
}

/// The parts of a kernel's module index that decide what to load.
#[derive(Debug, Default)]
pub(super) struct ModuleIndex {
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
    pub(super) fn load(dir: &Path) -> Result<ModuleIndex> {
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
    pub(super) fn closure(&self, requested: &[String]) -> Result<Vec<ModuleLoad>> {
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
}
