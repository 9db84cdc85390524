//! Running a program with a reduced capability set, as `setpriv` does, also inside VM guests (which have no
//! setpriv): as root, the bounding and inheritable sets are cut to `keep` (root's exec then grants exactly
//! those); as another uid, `keep` survives the uid change (keepcaps) and becomes the ambient set.

use std::{os::unix::process::CommandExt as _, process::Command};

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// The highest capability number this kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn check(ret: libc::c_long) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// capset(2) for this process, with all three sets as `mask` (`inheritable` only when `only_inheritable`).
unsafe fn capset(mask: u64, only_inheritable: bool) -> std::io::Result<()> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: the kernel fills the two elements of version-3 data.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) })?;
    for (i, d) in data.iter_mut().enumerate() {
        let part = (mask >> (32 * i)) as u32;
        d.inheritable = part;
        if !only_inheritable {
            d.permitted = part;
            d.effective = part;
        }
    }
    // SAFETY: as above.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) })
}

/// Makes `cmd` run with exactly the capabilities in `keep` (by number), as `uid` (and gid `uid`).
pub fn restrict(cmd: &mut Command, keep: &[u32], uid: u32) {
    let mask = keep.iter().fold(0u64, |m, c| m | 1 << c);
    let last = last_cap();
    // SAFETY: the closure runs between fork and exec and only makes syscalls (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            // First, while CAP_SETPCAP is still effective: the bounding set.
            for c in 0..=last {
                if mask & (1 << c) == 0 {
                    check(libc::prctl(libc::PR_CAPBSET_DROP, c, 0, 0, 0) as libc::c_long)?;
                }
            }
            if uid != 0 {
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) as libc::c_long)?;
                check(libc::setgroups(0, std::ptr::null()) as libc::c_long)?;
                check(libc::setresgid(uid, uid, uid) as libc::c_long)?;
                check(libc::setresuid(uid, uid, uid) as libc::c_long)?;
                // Permitted survived (keepcaps); effective is empty now. Keep only `keep`, in every set.
                capset(mask, false)?;
                for c in 0..=last {
                    if mask & (1 << c) != 0 {
                        check(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, c, 0, 0) as libc::c_long)?;
                    }
                }
            } else {
                capset(mask, true)?;
            }
            Ok(())
        });
    }
}
