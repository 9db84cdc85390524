//! What a guest run came to: why the guest stopped ([`ExitReason`], one sentence each for an error) and its console,
//! with the script's own part of it. Callers judge a run from this alone; how QEMU was driven stays in `mod.rs`.

use super::console::{Marker, parse_marker};
use anyhow::{Result, ensure};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Why the guest stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The script exited 0 and the guest powered off.
    Success,
    /// The script exited non-zero.
    ScriptFailed { code: i32 },
    /// `/init` gave up before the script ran (e.g. a module did not load).
    InitFailed { reason: String },
    /// The console showed a panic, an oops, a lockup or an RCU stall; the guest was stopped.
    KernelTrouble { line: String },
    /// No result within the time limit; the guest was killed.
    Timeout { limit: Duration },
    /// The kernel never reached `/init` (every boot attempt hung under emulation).
    BootHang { limit: Duration, attempts: u32 },
    /// QEMU ended without the guest reporting a result.
    QemuExited { status: String, stderr: String },
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Success => write!(f, "the guest script passed"),
            ExitReason::ScriptFailed { code } => write!(f, "the guest script failed (exit {code})"),
            ExitReason::InitFailed { reason } => write!(f, "the guest's /init failed before the script ran: {reason}"),
            ExitReason::KernelTrouble { line } => {
                write!(f, "the guest kernel reported trouble: {line}")
            }
            ExitReason::Timeout { limit } => {
                write!(f, "the guest did not finish within {}s", limit.as_secs())
            }
            ExitReason::BootHang { limit, attempts } => write!(
                f,
                "the guest kernel did not reach /init within {}s, {attempts} boots in a row",
                limit.as_secs()
            ),
            ExitReason::QemuExited { status, stderr } => {
                write!(f, "QEMU exited ({status}) before the guest reported a result")?;
                if !stderr.trim().is_empty() {
                    write!(f, "; QEMU said: {}", stderr.trim())?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct VmOutcome {
    pub passed: bool,
    /// Everything the guest printed on its serial console.
    pub console: String,
    /// From starting QEMU to its end.
    pub duration: Duration,
    /// From starting QEMU to `/init` running (kernel boot under emulation).
    pub boot_time: Option<Duration>,
    pub exit_reason: ExitReason,
    pub log_path: PathBuf,
    pub(super) token: String,
}

impl VmOutcome {
    /// The last `n` console lines.
    /// `name (why it ended): last N console lines: ... (full console log: path)`, for a failed guest's error.
    pub fn console_tail(&self, name: &str, lines: usize) -> String {
        format!(
            "{name} ({}): last {lines} console lines:\n{}\n(full console log: {})",
            self.exit_reason,
            self.tail(lines),
            self.log_path.display()
        )
    }

    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The console between the start and the end of the script (kernel messages printed meanwhile included).
    pub fn script_output(&self) -> String {
        let mut out = String::new();
        let mut inside = false;
        for line in self.console.lines() {
            match parse_marker(line, &self.token) {
                Some(Marker::Script) => inside = true,
                Some(Marker::Finished(_)) => break,
                _ if inside => {
                    out.push_str(line);
                    out.push('\n');
                }
                _ => {}
            }
        }
        out
    }

    /// Fails with a sentence saying why, the console's last 40 lines and where the full log is.
    pub fn ensure_passed(&self) -> Result<()> {
        ensure!(
            self.passed,
            "{}; last 40 console lines:\n{}\n(full console log: {})",
            self.exit_reason,
            self.tail(40),
            self.log_path.display()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_extracts_script_output() {
        let t = "ctrace-vm-1";
        let outcome = VmOutcome {
            passed: true,
            console: format!("boot\n{t} init: started\n{t} init: running script\n7680\nok\n{t} init: success\n"),
            duration: Duration::ZERO,
            boot_time: None,
            exit_reason: ExitReason::Success,
            log_path: PathBuf::new(),
            token: t.to_string(),
        };
        assert_eq!(outcome.script_output(), "7680\nok\n");
        assert_eq!(outcome.tail(2), format!("ok\n{t} init: success"));
        assert!(outcome.ensure_passed().is_ok());
        let failed = VmOutcome {
            passed: false,
            exit_reason: ExitReason::Timeout {
                limit: Duration::from_secs(300),
            },
            ..outcome
        };
        let err = failed.ensure_passed().unwrap_err().to_string();
        assert!(
            err.starts_with("the guest did not finish within 300s; last 40 console lines:\nboot\n"),
            "{err}"
        );
    }
}
