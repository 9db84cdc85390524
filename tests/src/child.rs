//! `ctrace run` as a child process of a test: with `--json` (events as JSON values) or in text mode (lines), started
//! and waited for with bounds generous enough for emulated guests, where start-up (BTF parsing, verification) is
//! slow. Dropping one kills the child.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::ctrace_bin;

const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// ctrace reads the kernel counters once a second: the last traffic must have a chance to be seen before SIGINT.
const LAST_POLL: Duration = Duration::from_millis(1500);

/// A running `ctrace run`, its stdout read line by line on a thread.
struct Lines {
    child: Child,
    rx: mpsc::Receiver<String>,
}

enum Next {
    Line(String),
    Nothing,
    Closed,
}

impl Lines {
    /// `cmd run ARGS`: `cmd` is ctrace itself, or a wrapper such as `setpriv ... -- ctrace`; its stderr goes where
    /// `cmd` sends it (inherited unless set).
    fn start(mut cmd: Command, args: &[&str]) -> anyhow::Result<Lines> {
        let mut child = cmd
            .arg("run")
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start ctrace")?;
        let rx = lines_of(child.stdout.take().context("no stdout")?);
        Ok(Lines { child, rx })
    }

    fn next(&self, timeout: Duration) -> Next {
        match self.rx.recv_timeout(timeout) {
            Ok(line) => Next::Line(line),
            Err(mpsc::RecvTimeoutError::Timeout) => Next::Nothing,
            Err(mpsc::RecvTimeoutError::Disconnected) => Next::Closed,
        }
    }

    /// Reads lines until `hit` says a line is the one (returned) or `timeout` passes (None). Every line read goes
    /// through `keep` first. Fails when ctrace ends or closes stdout before.
    fn until(
        &mut self,
        timeout: Duration,
        mut keep: impl FnMut(&str) -> anyhow::Result<bool>,
    ) -> anyhow::Result<Option<String>> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left.min(Duration::from_millis(200))) {
                Next::Line(line) => {
                    if keep(&line)? {
                        return Ok(Some(line));
                    }
                }
                Next::Nothing => {
                    if let Some(status) = self.child.try_wait()? {
                        bail!("ctrace exited: {status}");
                    }
                }
                Next::Closed => bail!("ctrace closed stdout"),
            }
        }
        Ok(None)
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `signal` after the last counter poll, then every remaining line (through `keep`) and the exit status.
    fn stop(
        &mut self,
        signal: nix::sys::signal::Signal,
        mut keep: impl FnMut(String) -> anyhow::Result<()>,
    ) -> anyhow::Result<ExitStatus> {
        std::thread::sleep(LAST_POLL);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.next(Duration::from_millis(200)) {
                Next::Line(line) => keep(line)?,
                Next::Closed => break,
                Next::Nothing if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    bail!("ctrace did not exit within {STOP_TIMEOUT:?} of {signal}");
                }
                Next::Nothing => {}
            }
        }
        Ok(self.child.wait()?)
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(line: &str) -> anyhow::Result<Value> {
    serde_json::from_str(line).with_context(|| format!("ctrace printed a line that is not JSON: {line}"))
}

/// `ctrace run --json ...`; stdout lines are collected as JSON values.
pub struct Ctrace {
    lines: Lines,
    pub events: Vec<Value>,
}

impl Ctrace {
    /// Starts ctrace and waits until its probes are attached (the `mode` event), which must name the mode in
    /// CTRACE_TEST_EXPECT_MODE when that is set (the VM runner sets it for suites that need one mode).
    pub fn start(args: &[&str]) -> anyhow::Result<Ctrace> {
        Ctrace::start_command(Command::new(ctrace_bin()), args)
    }

    /// As [`Ctrace::start`], with `cmd` as the start of the command line (ctrace itself, or a wrapper such as
    /// `setpriv ... -- ctrace`).
    pub fn start_command(cmd: Command, args: &[&str]) -> anyhow::Result<Ctrace> {
        Ctrace::start_expecting(cmd, args, std::env::var("CTRACE_TEST_EXPECT_MODE").ok())
    }

    /// As [`Ctrace::start_command`], expecting the mode `expect_mode` (None: any).
    pub fn start_expecting(cmd: Command, args: &[&str], expect_mode: Option<String>) -> anyhow::Result<Ctrace> {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let mut c = Ctrace {
            lines: Lines::start(cmd, &full)?,
            events: vec![],
        };
        let events = &mut c.events;
        let mode = c
            .lines
            .until(ATTACH_TIMEOUT, |line| {
                let v = json(line)?;
                let is_mode = v["event"] == "mode";
                events.push(v);
                Ok(is_mode)
            })
            .context("ctrace did not attach")?
            .with_context(|| format!("ctrace did not attach within {ATTACH_TIMEOUT:?}"))?;
        if let Some(want) = expect_mode {
            let v = json(&mode)?;
            if v["mode"] != want.as_str() {
                bail!(
                    "ctrace attached in {} mode, this run expects {want} mode: {v}",
                    v["mode"]
                );
            }
        }
        Ok(c)
    }

    /// Collects output until an event for which `pred` is true arrives (returned) or `timeout` passes (None).
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Option<Value>> {
        let events = &mut self.events;
        let hit = self.lines.until(timeout, |line| {
            let v = json(line)?;
            let hit = pred(&v);
            events.push(v);
            Ok(hit)
        })?;
        Ok(hit.and_then(|_| self.events.last().cloned()))
    }

    /// The ctrace process's id (its `/proc/PID/status` has the memory it uses).
    pub fn pid(&self) -> u32 {
        self.lines.child.id()
    }

    /// Whether ctrace still runs.
    pub fn is_running(&mut self) -> bool {
        self.lines.is_running()
    }

    /// SIGKILL: ctrace gets no chance to clean up; waits until it is gone.
    pub fn kill(self) {
        drop(self.lines);
    }

    /// Sends SIGINT and collects the rest of the output: every event and the exit status, whatever they are.
    pub fn stop_with_status(self) -> anyhow::Result<(Vec<Value>, ExitStatus)> {
        self.signal_and_collect(nix::sys::signal::SIGINT)
    }

    /// Sends `signal` and collects the rest of the output: every event and the exit status.
    fn signal_and_collect(mut self, signal: nix::sys::signal::Signal) -> anyhow::Result<(Vec<Value>, ExitStatus)> {
        let events = &mut self.events;
        let status = self.lines.stop(signal, |line| {
            events.push(json(&line)?);
            Ok(())
        })?;
        Ok((std::mem::take(&mut self.events), status))
    }

    /// Sends SIGINT and collects the rest of the output. Fails unless ctrace exited 0 with exactly one summary,
    /// which it returns.
    pub fn stop(self) -> anyhow::Result<(Vec<Value>, Value)> {
        self.stop_with(nix::sys::signal::SIGINT)
    }

    /// Sends `signal` (SIGINT, SIGTERM) and collects the rest of the output. Fails unless ctrace exited 0 with
    /// exactly one summary, which it returns.
    pub fn stop_with(self, signal: nix::sys::signal::Signal) -> anyhow::Result<(Vec<Value>, Value)> {
        let (events, status) = self.signal_and_collect(signal)?;
        if !status.success() {
            bail!("ctrace exited with {status}");
        }
        let summaries: Vec<&Value> = events.iter().filter(|v| v["event"] == "summary").collect();
        if summaries.len() != 1 {
            bail!("expected exactly one summary, got {}", summaries.len());
        }
        let summary = summaries[0].clone();
        Ok((events, summary))
    }
}

/// `ctrace run ...` in text mode: the lines as a person reads them.
pub struct CtraceText {
    lines: Lines,
    pub text: Vec<String>,
}

impl CtraceText {
    /// Starts ctrace and waits for its `ctrace: <mode> mode: ...` line (printed once its probes are attached).
    pub fn start(args: &[&str]) -> anyhow::Result<CtraceText> {
        let mut c = CtraceText {
            lines: Lines::start(Command::new(ctrace_bin()), args)?,
            text: vec![],
        };
        c.wait_for(ATTACH_TIMEOUT, |l| l.starts_with("ctrace: ") && l.contains(" mode: "))
            .context("ctrace (text) did not attach")?
            .with_context(|| format!("ctrace (text) did not attach within {ATTACH_TIMEOUT:?}"))?;
        Ok(c)
    }

    /// Collects lines until one for which `pred` is true arrives (returned) or `timeout` passes (None).
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> anyhow::Result<Option<String>> {
        let text = &mut self.text;
        self.lines.until(timeout, |line| {
            text.push(line.to_owned());
            Ok(pred(line))
        })
    }

    /// Sends SIGINT; returns every line and the exit status.
    pub fn stop(mut self) -> anyhow::Result<(Vec<String>, ExitStatus)> {
        let text = &mut self.text;
        let status = self.lines.stop(nix::sys::signal::SIGINT, |line| {
            text.push(line);
            Ok(())
        })?;
        Ok((std::mem::take(&mut self.text), status))
    }
}

/// The lines a child writes to `pipe`, read on a thread of their own (so that waiting for one can time out).
pub fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
