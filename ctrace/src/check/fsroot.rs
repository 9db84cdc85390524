//! Every file `ctrace check` reads goes through [`FsRoot`]: with `--root DIR`, `/proc`, `/sys` and `/etc` are
//! read under DIR (a mounted image or a fixture tree), and symbolic links inside DIR are followed inside DIR, so
//! an absolute link such as `/etc/sysctl.d/x.conf -> /usr/lib/x.conf` never escapes to the host.
//!
//! The kernel enforces that: files under DIR are opened with `openat2(RESOLVE_IN_ROOT)` relative to a
//! descriptor of DIR, so `..`, absolute links, link loops and a link swapped while ctrace reads cannot reach
//! anything outside DIR (there is no check-then-open window). [`FsRoot::resolve`] only names the file.

use std::{
    ffi::CString,
    fs,
    io::{self, Read as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

/// Files larger than this are read only up to this size (config files are small; this bounds a hostile image).
const MAX_READ: u64 = 16 << 20;
/// Symbolic links followed while naming one path (the kernel's limit).
const MAX_LINKS: usize = 40;

/// struct open_how (openat2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

#[derive(Debug, thiserror::Error)]
pub enum FsRootError {
    #[error("--root {0}: not a directory")]
    NotADirectory(String),
    #[error("--root {0}: cannot open it ({1})")]
    Open(String, io::Error),
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
    /// An O_PATH descriptor of the root that every open under it starts from (not for the host).
    dir: Option<Arc<OwnedFd>>,
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
        let name = || crate::sanitize::kernel_str(root.as_os_str().as_encoded_bytes());
        let dir = if host {
            None
        } else {
            let path = CString::new(canonical.as_os_str().as_encoded_bytes())
                .map_err(|_| FsRootError::NotADirectory(name()))?;
            // SAFETY: a NUL-terminated path; the result is checked.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(FsRootError::Open(name(), io::Error::last_os_error()));
            }
            // SAFETY: a new descriptor owned by nothing else.
            Some(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
        };
        Ok(FsRoot {
            root: canonical,
            host,
            dir,
        })
    }

    /// Opens `abs` (with extra open `flags`): on the host as it is, under a root with `RESOLVE_IN_ROOT`.
    fn open_fd(&self, abs: &str, flags: libc::c_int) -> io::Result<fs::File> {
        let Some(dir) = &self.dir else {
            let path = CString::new(abs).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: a NUL-terminated path; the result is checked.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC | flags) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a new descriptor owned by nothing else.
            return Ok(unsafe { fs::File::from_raw_fd(fd) });
        };
        let rel = abs.trim_start_matches('/');
        let path = CString::new(if rel.is_empty() { "." } else { rel })
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let how = OpenHow {
            flags: (libc::O_RDONLY | libc::O_CLOEXEC | flags) as u64,
            mode: 0,
            resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: valid path and open_how of the size given; the result is checked.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &raw const how,
                size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOSYS) {
                return Err(io::Error::other("--root needs openat2 (Linux 5.6 or newer)"));
            }
            return Err(e);
        }
        // SAFETY: a new descriptor owned by nothing else.
        Ok(unsafe { fs::File::from_raw_fd(fd as libc::c_int) })
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

    /// Where the file that `abs` names would live on this machine (for messages; opening goes through the
    /// kernel's resolution under the root).
    pub fn map(&self, abs: &str) -> PathBuf {
        let logical = self.resolve(abs);
        self.root.join(logical.trim_start_matches('/'))
    }

    fn metadata(&self, abs: &str) -> io::Result<fs::Metadata> {
        self.open_fd(abs, libc::O_PATH)?.metadata()
    }

    /// Whether `abs` exists (a dangling symbolic link does: the link is there).
    pub fn exists(&self, abs: &str) -> bool {
        self.open_fd(abs, libc::O_PATH | libc::O_NOFOLLOW).is_ok()
    }

    pub fn is_dir(&self, abs: &str) -> bool {
        self.metadata(abs).is_ok_and(|m| m.is_dir())
    }

    /// Permission bits of `abs`, when it exists.
    pub fn mode(&self, abs: &str) -> Option<u32> {
        use std::os::unix::fs::PermissionsExt as _;
        self.metadata(abs).ok().map(|m| m.permissions().mode())
    }

    /// The file's text (invalid UTF-8 replaced), at most 16 MiB. A link to `/dev/null` reads as empty.
    pub fn read(&self, abs: &str) -> Result<String, ReadError> {
        Ok(String::from_utf8_lossy(&self.read_bytes(abs)?).into_owned())
    }

    /// The file's bytes, at most 16 MiB. A link to `/dev/null` (a masked file) reads as empty.
    pub fn read_bytes(&self, abs: &str) -> Result<Vec<u8>, ReadError> {
        if self.resolve(abs) == "/dev/null" {
            return Ok(Vec::new());
        }
        let f = self.open(abs)?;
        let mut buf = Vec::new();
        f.take(MAX_READ)
            .read_to_end(&mut buf)
            .map_err(|e| ReadError::from_io(abs, &e))?;
        Ok(buf)
    }

    /// Opens `abs` for streaming (large files such as `/proc/net/nf_conntrack`).
    pub fn open(&self, abs: &str) -> Result<fs::File, ReadError> {
        self.open_fd(abs, 0).map_err(|e| ReadError::from_io(abs, &e))
    }

    /// Names in directory `abs`, sorted.
    pub fn read_dir(&self, abs: &str) -> Result<Vec<String>, ReadError> {
        let dir = self
            .open_fd(abs, libc::O_DIRECTORY)
            .map_err(|e| ReadError::from_io(abs, &e))?;
        // The descriptor's own /proc entry lists the directory that was opened, with no path to re-resolve.
        let dir =
            fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())).map_err(|e| ReadError::from_io(abs, &e))?;
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

    /// A file outside the root, and the ways a hostile image could point at it.
    fn hostile() -> (TempTree, TempTree, String) {
        let outside = TempTree::new();
        outside.write("/secret", "HOST-SECRET\n");
        let secret = outside.path().join("secret").to_string_lossy().into_owned();
        let t = TempTree::new();
        t.symlink(&secret, "/etc/absolute.conf");
        t.symlink(&format!("../../../../../../../../../..{secret}"), "/etc/relative.conf");
        t.symlink("loop-b", "/etc/loop-a");
        t.symlink("loop-a", "/etc/loop-b");
        (t, outside, secret)
    }

    #[test]
    fn links_out_of_the_root_stay_inside_it() {
        let (t, _outside, _) = hostile();
        let fs = FsRoot::new(t.path()).unwrap();
        for link in ["/etc/absolute.conf", "/etc/relative.conf"] {
            assert!(
                fs.read(link).unwrap_err().is_not_found(),
                "{link} reached outside the root"
            );
            assert!(fs.open(link).is_err());
            assert!(fs.mode(link).is_none());
        }
        // The same files inside the root are what the links mean there.
        t.write(&_outside.path().join("secret").to_string_lossy(), "inside\n");
        assert_eq!(fs.read("/etc/absolute.conf").unwrap(), "inside\n");
        let e = fs.read("/etc/loop-a").unwrap_err();
        assert!(!e.is_not_found(), "a loop is an error of its own: {e}");
    }

    /// A link swapped while ctrace reads (check-then-open races): the kernel resolves every open inside the
    /// root, so no read ever returns the host's file.
    #[test]
    fn a_link_swapped_during_reads_never_escapes() {
        let (t, _outside, secret) = hostile();
        t.write("/etc/sysctl.conf", "inside\n");
        let fs = FsRoot::new(t.path()).unwrap();
        let target = t.path().join("etc/sysctl.conf");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flipper = {
            let (stop, target) = (stop.clone(), target.clone());
            let escape = format!("../../../../../../../../../..{secret}");
            std::thread::spawn(move || {
                let tmp = target.with_extension("swap");
                let mut as_link = false;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = fs::remove_file(&tmp);
                    if as_link {
                        let _ = std::os::unix::fs::symlink(&escape, &tmp);
                    } else {
                        let _ = fs::write(&tmp, "inside\n");
                    }
                    let _ = fs::rename(&tmp, &target);
                    as_link = !as_link;
                }
            })
        };
        let mut seen_inside = 0;
        for _ in 0..3000 {
            if let Ok(text) = fs.read("/etc/sysctl.conf") {
                assert_ne!(text, "HOST-SECRET\n", "a swapped link escaped the root");
                seen_inside += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flipper.join().unwrap();
        assert!(seen_inside > 0);
    }
}
