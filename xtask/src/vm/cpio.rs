//! The initramfs's archive: a minimal writer of the `newc` cpio format, separate because it knows nothing of VMs
//! (paths, modes, device numbers and bytes in; an archive out).

use anyhow::{Context, Result, bail, ensure};
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A minimal writer of the `newc` cpio format the kernel unpacks, so that ownership (root), modes and device nodes
/// are exactly what the guest needs whatever the host's files say.
pub(super) struct Cpio<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: HashSet<String>,
}

impl<W: Write> Cpio<W> {
    pub(super) fn new(out: W) -> Cpio<W> {
        Cpio {
            out,
            written: 0,
            next_ino: 1,
            dirs: HashSet::new(),
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> Result<()> {
        let size = u32::try_from(size).with_context(|| format!("{name} is too large for an initramfs"))?;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.next_ino += 1;
        let mut header = String::from("070701");
        for field in fields {
            header += &format!("{field:08x}");
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..pad as usize])
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        Ok(())
    }

    pub(super) fn dir(&mut self, path: &str) -> Result<()> {
        if self.dirs.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.dirs.insert(path.to_string());
        self.header(path, 0o040755, 0, (0, 0))
    }

    pub(super) fn bytes(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.parents(path)?;
        self.header(path, 0o100000 | mode, data.len() as u64, (0, 0))?;
        self.put(data)?;
        self.pad()
    }

    pub(super) fn file_from_path(&mut self, path: &str, mode: u32, src: &Path) -> Result<()> {
        let mut file = File::open(src).with_context(|| format!("could not open {}", src.display()))?;
        let size = file.metadata()?.len();
        self.parents(path)?;
        self.header(path, 0o100000 | mode, size, (0, 0))?;
        let copied = io::copy(&mut (&mut file).take(size), &mut self.out)?;
        ensure!(copied == size, "{} changed while it was being copied", src.display());
        self.written += copied;
        self.pad()
    }

    pub(super) fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        self.parents(path)?;
        self.header(path, 0o020000 | mode, 0, (major, minor))
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.parents(path)?;
        self.header(path, 0o120777, target.len() as u64, (0, 0))?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// Adds everything under `dir`, named relative to `base`, keeping file modes.
    pub(super) fn tree(&mut self, base: &Path, dir: &Path) -> Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let name = path.strip_prefix(base)?.to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                self.dir(&name)?;
                self.tree(base, &path)?;
            } else if meta.file_type().is_symlink() {
                self.symlink(&name, &fs::read_link(&path)?.to_string_lossy())?;
            } else if meta.is_file() {
                self.file_from_path(&name, meta.permissions().mode() & 0o7777, &path)?;
            } else {
                bail!("{} is neither a file, a directory nor a symlink", path.display());
            }
        }
        Ok(())
    }

    pub(super) fn finish(mut self) -> Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_newc_with_parents_and_padding() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.bytes("a/b", 0o644, b"hello").unwrap();
        let out = cpio.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        // The parent directory comes first, then the file, then the trailer.
        let a = text.find("a\0").unwrap();
        let b = text.find("a/b\0").unwrap();
        assert!(a < b && text[b..].contains("hello") && text.ends_with("TRAILER!!!\0\0\0\0"));
        assert_eq!(&out[..6], b"070701");
        // The file's mode field: regular file 0644.
        let file_header = &text[b - 110..];
        assert_eq!(&file_header[14..22], "000081a4");
    }
}
