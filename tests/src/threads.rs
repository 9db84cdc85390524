//! Traffic from several CPUs at once: sender threads pinned one per CPU, each inside a netns, and
//! throwaway netns made by a thread for itself (`unshare`), which die when the thread ends.

use std::{
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Barrier},
};

use anyhow::{Context as _, bail, ensure};
use nix::sched::{CloneFlags, CpuSet, sched_setaffinity, setns, unshare};

/// The CPUs this process may run on.
pub fn cpus() -> anyhow::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).with_context(|| format!("cannot pin a thread to CPU {cpu}"))
}

/// Runs `f(index, barrier)` on one thread per CPU (the first `n` usable CPUs), each pinned to its CPU and
/// inside the netns at `/run/netns/<netns>`; the barrier lets the threads start each step together.
/// Returns the results in CPU order. Fails when fewer than `n` CPUs are usable: the point is concurrency.
pub fn on_cpus<T: Send + 'static>(
    n: usize,
    netns: &str,
    f: impl Fn(usize, &Barrier) -> anyhow::Result<T> + Send + Sync + 'static,
) -> anyhow::Result<Vec<T>> {
    let cpus = cpus()?;
    ensure!(
        cpus.len() >= n,
        "this test needs {n} CPUs, the process may use {}",
        cpus.len()
    );
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(n));
    let path = format!("/run/netns/{netns}");
    let handles: Vec<_> = cpus[..n]
        .iter()
        .enumerate()
        .map(|(i, &cpu)| {
            let (f, barrier, path) = (f.clone(), barrier.clone(), path.clone());
            std::thread::spawn(move || -> anyhow::Result<T> {
                pin_to(cpu)?;
                let file = fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
                setns(file, CloneFlags::CLONE_NEWNET)?;
                f(i, &barrier)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        match h.join() {
            Ok(r) => out.push(r?),
            Err(_) => bail!("a sender thread panicked"),
        }
    }
    Ok(out)
}

/// Moves the calling thread into a new, empty netns of its own with loopback up, and returns its inode.
/// The netns goes away when the thread ends (unless something else holds it).
pub fn enter_new_netns() -> anyhow::Result<u64> {
    unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET) failed")?;
    loopback_up()?;
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// A netns of its own, held by a parked thread, for tests that need another netns where `ip netns` is not at
/// hand (VM guests). It goes away when this is dropped.
pub struct HeldNetns {
    pub inode: u64,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HeldNetns {
    /// Enters a new netns on a new thread, runs `setup` there (e.g. writes one of its per-netns sysctls) and
    /// keeps the thread parked in it.
    pub fn new(setup: impl FnOnce() -> anyhow::Result<()> + Send + 'static) -> anyhow::Result<HeldNetns> {
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (stop, parked) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let inode = enter_new_netns().and_then(|inode| setup().map(|()| inode));
            let ok = inode.is_ok();
            let _ = ready_tx.send(inode);
            if ok {
                // Until the sender is dropped.
                let _ = parked.recv();
            }
        });
        let inode = ready.recv().context("the netns thread ended early")??;
        Ok(HeldNetns {
            inode,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for HeldNetns {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `ip link set lo up` in the calling thread's netns, by ioctl (no process to start).
pub fn loopback_up() -> anyhow::Result<()> {
    // SAFETY: socket() has no memory preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just opened and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: the request and its buffer are valid for these ioctls.
    unsafe {
        ensure!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) == 0,
            "SIOCGIFFLAGS lo: {}",
            std::io::Error::last_os_error()
        );
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        ensure!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) == 0,
            "SIOCSIFFLAGS lo: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
