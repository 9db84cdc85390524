//! Every file `ctrace check` reads goes through [`FsRoot`]: with `--root DIR`, `/proc`, `/sys` and `/etc` are
//! read under DIR (a mounted image or a fixture tree), and symbolic links inside DIR are followed inside DIR, so
//! an absolute link such as `/etc/sysctl.d/x.conf -> /usr/lib/x.conf` never escapes to the host.

use std::{
    fs,
    io::{self, Read as _},
    path::{Path, PathBuf},
};

/// Files larger than this are read only up to this size (config files are small; this bounds a hostile image).
const MAX_READ: u64 = 16 << 20;
/// Symbolic links followed while resolving one path (the kernel's limit).
const MAX_LINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum FsRootError {
    #[error("--root {0}: not a directory")]
    NotADirectory(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadErrorKind {
    NotFound,
    Denied,
    Other(String),
}

/// A file that could not be read, named by its path inside the audited root.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot read {path}: {}", describe(.kind))]
pub struct ReadError {
    pub path: String,
    pub kind: ReadErrorKind,
}

fn describe(kind: &ReadErrorKind) -> String {
    match kind {
        ReadErrorKind::NotFound => "no such file".to_owned(),
        ReadErrorKind::Denied => "permission denied (run as root to read it)".to_owned(),
        ReadErrorKind::Other(e) => e.clone(),
    }
}

impl ReadError {
    fn from_io(path: &str, e: &io::Error) -> ReadError {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => ReadErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ReadErrorKind::Denied,
            _ => ReadErrorKind::Other(crate::sanitize::kernel_str(e.to_string().as_bytes())),
        };
        ReadError {
            path: path.to_owned(),
            kind,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == ReadErrorKind::NotFound
    }

    /// The reason alone, for the `unreadable` list.
    pub fn reason(&self) -> String {
        describe(&self.kind)
    }
}

/// The audited file system: `/` (the running host) or a directory standing for it.
#[derive(Debug, Clone)]
pub struct FsRoot {
    root: PathBuf,
    host: bool,
}

impl FsRoot {
    pub fn new(root: impl AsRef<Path>) -> Result<FsRoot, FsRootError> {
        let root = root.as_ref();
        if !root.is_dir() {
            return Err(FsRootError::NotADirectory(crate::sanitize::kernel_str(
                root.as_os_str().as_encoded_bytes(),
            )));
        }
        let canonical = fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
        let host = canonical == Path::new("/");
        Ok(FsRoot { root: canonical, host })
    }

    /// True when the audited root is the running system's `/` (live-only sources such as other network
    /// namespaces and the `conntrack` command are used only then).
    pub fn is_host(&self) -> bool {
        self.host
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The logical path (as seen inside the root) that `abs` resolves to, following symbolic links inside the
    /// root. Components that do not exist are kept as they are.
    pub fn resolve(&self, abs: &str) -> String {
        let mut pending: Vec<String> = abs.split('/').rev().map(str::to_owned).collect();
        let mut cur: Vec<String> = Vec::new();
        let mut links = 0usize;
        while let Some(c) = pending.pop() {
            match c.as_str() {
                "" | "." => continue,
                ".." => {
                    cur.pop();
                    continue;
                }
                _ => {}
            }
            cur.push(c);
            if links >= MAX_LINKS {
                continue;
            }
            let real = self.root.join(cur.join("/"));
            if let Ok(target) = fs::read_link(&real) {
                links += 1;
                cur.pop();
                let t = target.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    cur.clear();
                }
                pending.extend(t.split('/').rev().map(str::to_owned));
            }
        }
        format!("/{}", cur.join("/"))
    }

    /// Where the file that `abs` names lives on this machine.
    pub fn map(&self, abs: &str) -> PathBuf {
        let logical = self.resolve(abs);
        self.root.join(logical.trim_start_matches('/'))
    }

    pub fn exists(&self, abs: &str) -> bool {
        fs::symlink_metadata(self.map(abs)).is_ok()
    }

    pub fn is_dir(&self, abs: &str) -> bool {
        self.map(abs).is_dir()
    }

    /// Permission bits of `abs`, when it exists.
    pub fn mode(&self, abs: &str) -> Option<u32> {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(self.map(abs)).ok().map(|m| m.permissions().mode())
    }

    /// The file's text (invalid UTF-8 replaced), at most 16 MiB. A link to `/dev/null` reads as empty.
    pub fn read(&self, abs: &str) -> Result<String, ReadError> {
        let logical = self.resolve(abs);
        if logical == "/dev/null" {
            return Ok(String::new());
        }
        let path = self.root.join(logical.trim_start_matches('/'));
        let f = fs::File::open(&path).map_err(|e| ReadError::from_io(abs, &e))?;
        let mut buf = Vec::new();
        f.take(MAX_READ)
            .read_to_end(&mut buf)
            .map_err(|e| ReadError::from_io(abs, &e))?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Opens `abs` for streaming (large files such as `/proc/net/nf_conntrack`).
    pub fn open(&self, abs: &str) -> Result<fs::File, ReadError> {
        fs::File::open(self.map(abs)).map_err(|e| ReadError::from_io(abs, &e))
    }

    /// Names in directory `abs`, sorted.
    pub fn read_dir(&self, abs: &str) -> Result<Vec<String>, ReadError> {
        let dir = fs::read_dir(self.map(abs)).map_err(|e| ReadError::from_io(abs, &e))?;
        let mut names: Vec<String> = dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::tests::TempTree;

    #[test]
    fn maps_paths_under_the_root_and_keeps_links_inside() {
        let t = TempTree::new();
        t.write("/usr/lib/sysctl.d/50-x.conf", "a = 1\n");
        t.symlink("/usr/lib/sysctl.d/50-x.conf", "/etc/sysctl.d/50-x.conf");
        t.symlink("../sysctl.conf", "/etc/sysctl.d/99-sysctl.conf");
        t.write("/etc/sysctl.conf", "b = 2\n");
        t.symlink("/dev/null", "/etc/sysctl.d/60-masked.conf");
        t.symlink("../../../../../../../../etc/passwd", "/etc/escape");
        let fs = FsRoot::new(t.path()).unwrap();
        assert!(!fs.is_host());
        assert_eq!(fs.read("/etc/sysctl.d/50-x.conf").unwrap(), "a = 1\n");
        assert_eq!(fs.resolve("/etc/sysctl.d/99-sysctl.conf"), "/etc/sysctl.conf");
        assert_eq!(fs.read("/etc/sysctl.d/99-sysctl.conf").unwrap(), "b = 2\n");
        assert_eq!(fs.read("/etc/sysctl.d/60-masked.conf").unwrap(), "");
        // `..` cannot climb above the root: the link resolves to DIR/etc/passwd, which does not exist.
        assert_eq!(fs.resolve("/etc/escape"), "/etc/passwd");
        assert!(fs.read("/etc/escape").unwrap_err().is_not_found());
        assert!(fs.map("/proc/meminfo").starts_with(t.path()));
        assert_eq!(
            fs.read_dir("/etc/sysctl.d").unwrap(),
            ["50-x.conf", "60-masked.conf", "99-sysctl.conf"]
        );
    }

    #[test]
    fn rejects_a_missing_root_and_recognises_the_host() {
        assert!(FsRoot::new("/no/such/dir/for/ctrace").is_err());
        assert!(FsRoot::new("/").unwrap().is_host());
    }
}
