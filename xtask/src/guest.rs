//! What VM guests get and how their console is read: the static ctrace, host tools copied in with their shared
//! libraries (legacy iptables, nftables, iproute2, kmod), `MARK key value` lines and `MARK begin/end name` blocks.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

/// Where the guest finds ctrace (the static build).
pub(crate) const GUEST_CTRACE: &str = "/usr/local/bin/ctrace";
/// The host's legacy iptables (Debian package `iptables`): one multi-call binary, its libraries and extensions.
/// The guest script links the `iptables`, `ip6tables`, ... names to it.
const XTABLES_MULTI: &str = "/usr/sbin/xtables-legacy-multi";
const XTABLES_EXTENSIONS: &str = "/usr/lib/x86_64-linux-gnu/xtables";
/// kmod (Debian package kmod) is one multi-call binary: the guest gets it as modprobe and lsmod here, ahead of
/// busybox's applets in PATH. A script must still call them by path: busybox sh prefers its own applets.
pub(crate) const GUEST_KMOD_DIR: &str = "/usr/local/sbin";
pub(crate) const GUEST_KMOD_MODPROBE: &str = "/usr/local/sbin/modprobe";

/// A host tool a guest needs, copied in with every shared library it loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tool {
    /// iptables and ip6tables (legacy, with every extension).
    LegacyIptables,
    /// nft, in /usr/local/sbin.
    Nftables,
    /// ip, in /usr/local/sbin.
    Iproute2,
    /// kmod's modprobe and lsmod, in [`GUEST_KMOD_DIR`]: unlike busybox's modprobe, it refuses to unload a module
    /// in use without asking the kernel, and `modprobe -r` leaves dependencies that are still in use alone.
    Kmod,
    /// conntrack (conntrack-tools), in /usr/local/sbin: flushes the table between benchmark rounds.
    Conntrack,
    /// bpftool, in /usr/local/sbin: the kernel's list of BPF programs and links, the truth about what ctrace left
    /// attached.
    Bpftool,
}

impl Tool {
    /// The Debian package that provides it on the host.
    pub(crate) fn package(self) -> &'static str {
        match self {
            Tool::LegacyIptables => "iptables",
            Tool::Nftables => "nftables",
            Tool::Iproute2 => "iproute2",
            Tool::Kmod => "kmod",
            Tool::Conntrack => "conntrack",
            Tool::Bpftool => "bpftool",
        }
    }

    /// `(host path, guest path)` of its programs (before their libraries).
    fn programs(self) -> Result<Vec<(PathBuf, String)>> {
        let at = |host: &str, guest: &str| (PathBuf::from(host), guest.to_string());
        Ok(match self {
            Tool::LegacyIptables => {
                let mut files = vec![at(XTABLES_MULTI, XTABLES_MULTI)];
                let extensions = dir_files(Path::new(XTABLES_EXTENSIONS), XTABLES_EXTENSIONS)?;
                ensure!(
                    !extensions.is_empty(),
                    "{XTABLES_EXTENSIONS} holds no iptables extensions"
                );
                files.extend(extensions);
                files
            }
            Tool::Nftables => vec![at("/usr/sbin/nft", "/usr/local/sbin/nft")],
            Tool::Iproute2 => vec![at("/usr/sbin/ip", "/usr/local/sbin/ip")],
            Tool::Conntrack => vec![at("/usr/sbin/conntrack", "/usr/local/sbin/conntrack")],
            Tool::Bpftool => vec![at("/usr/sbin/bpftool", "/usr/local/sbin/bpftool")],
            Tool::Kmod => ["modprobe", "lsmod"]
                .map(|name| at("/usr/bin/kmod", &format!("{GUEST_KMOD_DIR}/{name}")))
                .to_vec(),
        })
    }
}

/// The files of `tools` for the guest, `(host path, guest path)`: their programs, then every shared library they
/// load (at the same paths, the ELF loader included), each guest path once.
pub(crate) fn tool_files(tools: &[Tool]) -> Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    let mut libraries = BTreeSet::new();
    for &tool in tools {
        for (host, guest) in tool.programs()? {
            ensure!(
                host.is_file(),
                "{} does not exist: install the Debian package {}",
                host.display(),
                tool.package()
            );
            let out = crate::setup::capture(Command::new("ldd").arg(&host))
                .with_context(|| format!("could not list the libraries of {}", host.display()))?;
            libraries.extend(parse_ldd(&out).with_context(|| format!("ldd {}: a library is missing", host.display()))?);
            if !files.iter().any(|(_, g)| *g == guest) {
                files.push((host, guest));
            }
        }
    }
    files.extend(libraries.into_iter().map(|lib| (PathBuf::from(&lib), lib)));
    Ok(files)
}

/// The regular files in `host_dir` (symbolic links to files included, as copies), sorted, as
/// `(host path, guest_dir/name)` pairs; subdirectories are skipped.
fn dir_files(host_dir: &Path, guest_dir: &str) -> Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(host_dir).with_context(|| format!("could not read {}", host_dir.display()))? {
        let path = entry
            .with_context(|| format!("could not read {}", host_dir.display()))?
            .path();
        // `is_file` follows symbolic links.
        if path.is_file()
            && let Some(name) = path.file_name().and_then(|n| n.to_str())
        {
            files.push((path.clone(), format!("{}/{name}", guest_dir.trim_end_matches('/'))));
        }
    }
    files.sort();
    Ok(files)
}

/// The absolute library paths in `ldd` output (the loader's line included, the vDSO skipped); an error names a
/// library that was not found.
fn parse_ldd(out: &str) -> Result<Vec<String>> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                ensure!(!rest.starts_with("not found"), "{} not found", name.trim());
                rest
            }
            None => line,
        };
        if let Some(path) = target.split_whitespace().next().filter(|p| p.starts_with('/')) {
            libs.push(path.to_string());
        }
    }
    Ok(libs)
}

/// Shell lines that set the guest script's variables: `NAME='value'` (exported when `export`), quoted for sh.
pub(crate) fn shell_vars(vars: &[(&str, &str)], export: bool) -> String {
    let mut out = String::new();
    for (name, value) in vars {
        let quoted = value.replace('\'', r"'\''");
        let export = if export { "export " } else { "" };
        out += &format!("{export}{name}='{quoted}'\n");
    }
    out
}

/// The `MARK key value` lines of the script's output (`begin`/`end` block delimiters excluded); a repeated key keeps
/// its first value.
pub(crate) fn marker_values(output: &str, mark: &str) -> BTreeMap<String, String> {
    let mut values = BTreeMap::new();
    for line in output.lines() {
        let Some(rest) = line.trim_end().strip_prefix(mark).and_then(|r| r.strip_prefix(' ')) else {
            continue;
        };
        let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
        if key != "begin" && key != "end" {
            values
                .entry(key.to_string())
                .or_insert_with(|| value.trim().to_string());
        }
    }
    values
}

/// The lines between `MARK begin name` and `MARK end name`; `None` when either marker is missing.
pub(crate) fn marker_block<'a>(output: &'a str, mark: &str, name: &str) -> Option<Vec<&'a str>> {
    let begin = format!("{mark} begin {name}");
    let end = format!("{mark} end {name}");
    let mut lines = output.lines().map(|l| l.trim_end_matches('\r'));
    lines.by_ref().find(|l| l.trim_end() == begin)?;
    let mut block = Vec::new();
    for line in lines {
        if line.trim_end() == end {
            return Some(block);
        }
        block.push(line);
    }
    None
}

/// A kernel message on the console (`[   12.345678] ...`), which can land between the script's lines.
pub(crate) fn is_kernel_message(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .is_some_and(|(stamp, _)| {
            !stamp.trim().is_empty() && stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARK: &str = "@@ctrace-test";

    fn mark(line: &str) -> String {
        format!("{MARK} {line}\n")
    }

    #[test]
    fn markers_and_blocks_are_extracted() {
        let output = [
            "init: noise before\n".to_string(),
            mark("kernel 6.1.0-56-amd64"),
            mark("list.reload a b\r"),
            "@@ctrace-testkernel not-a-marker\n".to_string(),
            mark("kernel second-value-ignored"),
            mark("begin test.reload::a"),
            "case a: truth 1\n".to_string(),
            "[   12.345678] nf_conntrack: table full, dropping packet\n".to_string(),
            mark("end test.reload::a"),
            mark("begin unterminated"),
            "x\n".to_string(),
        ]
        .concat();
        let values = marker_values(&output, MARK);
        assert_eq!(values["kernel"], "6.1.0-56-amd64");
        assert_eq!(values["list.reload"], "a b");
        assert!(!values.contains_key("begin") && !values.contains_key("end"));
        assert_eq!(values.len(), 2);
        let block = marker_block(&output, MARK, "test.reload::a").unwrap();
        assert_eq!(block.len(), 2);
        assert!(is_kernel_message(block[1]));
        assert_eq!(marker_block(&output, MARK, "unterminated"), None);
        assert_eq!(marker_block(&output, MARK, "missing"), None);
    }

    #[test]
    fn kernel_messages_are_recognised() {
        assert!(is_kernel_message("[    7.123456] random: crng init done"));
        assert!(!is_kernel_message("[1,2,3]"));
        assert!(!is_kernel_message("[] x"));
        assert!(!is_kernel_message("{\"event\":\"drop\"}"));
    }

    #[test]
    fn ldd_output_lists_libraries_and_the_loader() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibxtables.so.12 => /lib/x86_64-linux-gnu/libxtables.so.12 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libxtables.so.12",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err().to_string();
        assert!(err.contains("libfoo.so.1 not found"), "{err}");
    }

    #[test]
    fn shell_vars_are_quoted() {
        assert_eq!(
            shell_vars(&[("A", "x y"), ("B", "it's")], true),
            "export A='x y'\nexport B='it'\\''s'\n"
        );
        assert_eq!(shell_vars(&[("MARK", "@@m")], false), "MARK='@@m'\n");
    }
}
