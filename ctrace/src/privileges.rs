//! ctrace loads BPF programs that read kernel memory and enters other network namespaces.

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// The capabilities that are missing, by name.
pub fn missing() -> Vec<&'static str> {
    let caps = effective_caps().unwrap_or(0);
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut missing = vec![];
    for (c, name) in [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ] {
        // CAP_SYS_ADMIN also covers BPF and perfmon on kernels before 5.8.
        let covered = has(c) || (c != CAP_SYS_ADMIN && has(CAP_SYS_ADMIN));
        if !covered {
            missing.push(name);
        }
    }
    missing
}

/// One sentence that says what to do, or None when ctrace has what it needs.
pub fn check() -> Option<String> {
    let missing = missing();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "this needs root (missing {}): run it with sudo",
        missing.join(", ")
    ))
}

/// Old kernels charge BPF maps to RLIMIT_MEMLOCK; lift it (harmless where memcg accounting is used).
pub fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}
