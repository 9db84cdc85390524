//! A tracer under measurement (ctrace, or the bpftrace reference) as a child process: the time from launch until it
//! says it is attached, its CPU time and peak memory from /proc, and the time from the stop signal to its exit.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;

/// How long a tracer may take to attach (emulated guests parse BTF and verify programs slowly).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a tracer may take to exit after the stop signal.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Its stderr, kept for error messages (bpftrace warns about RLIMIT_MEMLOCK on kernels that no longer use it).
    stderr: Arc<Mutex<Vec<String>>>,
    /// Every stdout line so far.
    pub output: Vec<String>,
    stop_signal: Signal,
    pub attach_s: f64,
}

/// What a tracer cost, once it has exited.
#[derive(Clone, Debug, Default)]
pub struct Stopped {
    pub attach_s: f64,
    /// From the stop signal to the process's exit.
    pub detach_s: f64,
    /// CPU time (user + system, all threads) from the timed burst's start until the traffic was consumed.
    pub cpu_s: f64,
    /// VmHWM: the most resident memory the process had.
    pub peak_rss_kib: u64,
    pub output: Vec<String>,
}

impl Running {
    /// Starts `program args...` and waits until a stdout line satisfies `attached`.
    pub fn start(
        program: &Path,
        args: &[&str],
        stop_signal: Signal,
        attached: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Running> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; the tracer must not outlive the benchmark (it holds kernel hooks).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let launched = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let rx = crate::child::lines_of(child.stdout.take().context("no stdout")?);
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(pipe) = child.stderr.take() {
            let keep = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut lines) = keep.lock() {
                        lines.push(line);
                    }
                }
            });
        }
        let mut running = Running {
            child,
            lines: rx,
            stderr,
            output: vec![],
            stop_signal,
            attach_s: 0.0,
        };
        if !running.wait_for(ATTACH_TIMEOUT, attached)? {
            bail!("{} did not attach within {ATTACH_TIMEOUT:?}", program.display());
        }
        running.attach_s = launched.elapsed().as_secs_f64();
        Ok(running)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Collects stdout until a line satisfies `pred` (true) or `timeout` passes (false).
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if super::interrupted() {
                bail!("interrupted");
            }
            match self.lines.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => {
                    let hit = pred(&line);
                    self.output.push(line);
                    if hit {
                        return Ok(true);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = self.child.try_wait()? {
                        bail!("the tracer exited early ({status}){}", self.stderr_tail());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!("the tracer closed its output ({status}){}", self.stderr_tail());
                }
            }
        }
        Ok(false)
    }

    /// Waits until the tracer's CPU time has stopped growing (it consumed what the traffic produced), at most
    /// `max`; returns its CPU seconds then (as `cpu_seconds`).
    pub fn settle(&mut self, max: Duration) -> anyhow::Result<f64> {
        let deadline = Instant::now() + max;
        let mut last = cpu_seconds(self.pid())?;
        let mut quiet = 0;
        while quiet < 3 && Instant::now() < deadline && !super::interrupted() {
            std::thread::sleep(Duration::from_millis(100));
            let now = cpu_seconds(self.pid())?;
            if now == last {
                quiet += 1;
            } else {
                quiet = 0;
            }
            last = now;
        }
        // Lines written meanwhile (the tracer's stdout pipe must not fill up).
        while let Ok(line) = self.lines.try_recv() {
            self.output.push(line);
        }
        Ok(last)
    }

    /// Sends the stop signal, waits for the exit and the rest of the output.
    pub fn stop(mut self, cpu_s: f64) -> anyhow::Result<Stopped> {
        let peak_rss_kib = crate::memory_kib(self.pid(), "VmHWM").unwrap_or(0);
        let signalled = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), self.stop_signal)?;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if signalled.elapsed() > STOP_TIMEOUT {
                let stuck = where_stuck(self.pid());
                let _ = self.child.kill();
                bail!(
                    "the tracer did not exit within {STOP_TIMEOUT:?} of {} ({stuck}){}",
                    self.stop_signal,
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let detach_s = signalled.elapsed().as_secs_f64();
        // The reader ends at EOF, which follows the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.output.push(line);
        }
        if !status.success() {
            bail!("the tracer exited with {status}{}", self.stderr_tail());
        }
        Ok(Stopped {
            attach_s: self.attach_s,
            detach_s,
            cpu_s,
            peak_rss_kib,
            output: std::mem::take(&mut self.output),
        })
    }
}

impl Running {
    /// `: ` and the last lines the tracer wrote on stderr, or nothing.
    fn stderr_tail(&self) -> String {
        // Let the reader catch up with a process that just ended.
        std::thread::sleep(Duration::from_millis(50));
        let lines = self.stderr.lock().map(|l| l.clone()).unwrap_or_default();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Each thread's state and kernel wait channel (`tid:state:wchan`), for a tracer that does not exit.
fn where_stuck(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        out.push(format!(
            "{}:{state}:{}",
            task.file_name().to_string_lossy(),
            read("wchan").trim()
        ));
    }
    out.join(" ")
}

/// User + system CPU seconds of process `pid` (all its threads), from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let ticks = parse_cpu_ticks(&text).with_context(|| format!("cannot parse {path}: {text}"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// utime + stime (fields 14 and 15) of a /proc/<pid>/stat line; the command name may hold spaces and parentheses.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state).
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The summed run time and run count of every BPF program process `pid` holds (its fdinfo), when the kernel keeps
/// them (`kernel.bpf_stats_enabled` = 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BpfStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl BpfStats {
    pub fn of(pid: u32) -> anyhow::Result<BpfStats> {
        let mut total = BpfStats::default();
        let dir = format!("/proc/{pid}/fdinfo");
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
            let Ok(text) = std::fs::read_to_string(entry?.path()) else {
                continue;
            };
            if let Some(s) = parse_prog_fdinfo(&text) {
                total.run_time_ns += s.run_time_ns;
                total.run_cnt += s.run_cnt;
            }
        }
        Ok(total)
    }

    pub fn since(&self, before: &BpfStats) -> BpfStats {
        BpfStats {
            run_time_ns: self.run_time_ns.saturating_sub(before.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(before.run_cnt),
        }
    }
}

/// run_time_ns and run_cnt of a BPF program's fdinfo; None for other files.
fn parse_prog_fdinfo(text: &str) -> Option<BpfStats> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    text.lines().any(|l| l.starts_with("prog_type:")).then_some(())?;
    Some(BpfStats {
        run_time_ns: field("run_time_ns:")?,
        run_cnt: field("run_cnt:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_stats_come_from_prog_fdinfo_only() {
        let prog = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_jited:\t1\nrun_time_ns:\t5000\nrun_cnt:\t10\n";
        assert_eq!(
            parse_prog_fdinfo(prog),
            Some(BpfStats {
                run_time_ns: 5000,
                run_cnt: 10
            })
        );
        assert_eq!(parse_prog_fdinfo("pos:\t0\nmap_type:\t27\n"), None);
    }

    #[test]
    fn cpu_ticks_skip_names_with_spaces() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 3 0 1 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(281));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }
}
