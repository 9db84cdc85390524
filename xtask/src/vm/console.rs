//! The guest's serial console as it arrives: copied to the log, cut into lines without terminal escapes, and
//! watched for `/init`'s markers (behind a random token, so the script's output cannot fake a result) and for signs
//! of kernel trouble (panic, oops, lockup, RCU stall), on which the guest is stopped rather than waited for.

use super::ExitReason;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Copies the console to the log (and stderr), sends complete lines on, and returns all of it at EOF.
pub(super) fn read_console(mut stdout: impl Read, log: File, echo: bool, lines: mpsc::Sender<String>) -> String {
    let mut log = BufWriter::new(log);
    let mut console = Vec::new();
    let mut line_start = 0;
    let mut buf = [0u8; 8192];
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        log.write_all(chunk).ok();
        log.flush().ok();
        if echo {
            io::stderr().write_all(chunk).ok();
        }
        console.extend_from_slice(chunk);
        while let Some(pos) = console[line_start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&console[line_start..line_start + pos]);
            lines.send(strip_escapes(line.trim_end_matches('\r'))).ok();
            line_start += pos + 1;
        }
    }
    if line_start < console.len() {
        lines
            .send(strip_escapes(&String::from_utf8_lossy(&console[line_start..])))
            .ok();
    }
    strip_escapes(&String::from_utf8_lossy(&console).replace("\r\n", "\n"))
}

/// Drops the terminal escape sequences the firmware prints (`ESC c`, `ESC [ ... m`); the log file keeps them.
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        // `ESC [ params final` spans several characters; any other escape is one more character.
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Follows the console: when `/init` started, the result marker, the first sign of kernel trouble.
pub(super) struct Watch<'a> {
    token: &'a str,
    pub(super) init_started: Option<Duration>,
    pub(super) result: Option<ExitReason>,
    pub(super) finished_at: Option<Instant>,
    pub(super) trouble: Option<String>,
    pub(super) trouble_at: Option<Instant>,
}

impl<'a> Watch<'a> {
    pub(super) fn new(token: &'a str) -> Watch<'a> {
        Watch {
            token,
            init_started: None,
            result: None,
            finished_at: None,
            trouble: None,
            trouble_at: None,
        }
    }

    pub(super) fn line(&mut self, line: &str, started: Instant) {
        match parse_marker(line, self.token) {
            Some(Marker::Started) => self.init_started = Some(started.elapsed()),
            Some(Marker::Finished(reason)) if self.result.is_none() => {
                self.result = Some(reason);
                self.finished_at = Some(Instant::now());
            }
            _ => {}
        }
        if self.trouble.is_none() && kernel_trouble(line) {
            self.trouble = Some(line.trim().to_string());
            self.trouble_at = Some(Instant::now());
        }
    }
}

#[derive(Debug, PartialEq)]
pub(super) enum Marker {
    Started,
    Script,
    Finished(ExitReason),
}

/// `/init` prints `<token> init: <what>`; the random token keeps the script's own output from faking a result.
pub(super) fn parse_marker(line: &str, token: &str) -> Option<Marker> {
    let (_, rest) = line.split_once(token)?;
    let what = rest.trim().strip_prefix("init:")?.trim();
    match what {
        "started" => Some(Marker::Started),
        "running script" => Some(Marker::Script),
        "success" => Some(Marker::Finished(ExitReason::Success)),
        _ => {
            let reason = what.strip_prefix("failure (")?.strip_suffix(')')?;
            let finished = match reason.strip_prefix("exit ").and_then(|c| c.parse().ok()) {
                Some(code) => ExitReason::ScriptFailed { code },
                None => ExitReason::InitFailed {
                    reason: reason.to_string(),
                },
            };
            Some(Marker::Finished(finished))
        }
    }
}

/// Console lines that mean the kernel is in trouble, whatever the script does afterwards.
fn kernel_trouble(line: &str) -> bool {
    const SIGNS: [&str; 7] = [
        "Kernel panic",
        // "detected stalls on CPUs/tasks" and "self-detected stall on CPU".
        "detected stall",
        "soft lockup",
        "hard LOCKUP",
        "BUG:",
        "Oops:",
        "general protection fault",
    ];
    SIGNS.iter().any(|sign| line.contains(sign)) || die_line(line).is_some()
}

/// The trap an oops names, from the kernel's `die()` line: `<trap>: <error code> [#<n>]` (`int3: 0000 [#1] SMP`;
/// 6.x kernels put `Oops: ` before it, 5.10 does not).
fn die_line(line: &str) -> Option<&str> {
    let at = line.find(" [#")?;
    let (head, tail) = (&line[..at], &line[at + 3..]);
    let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
    let (trap, code) = head.rsplit_once(": ")?;
    let well_formed =
        digits > 0 && tail[digits..].starts_with(']') && code.len() == 4 && code.bytes().all(|b| b.is_ascii_hexdigit());
    // The trap's name follows the last `: ` ("Oops: int3") or the timestamp ("[  12.3] int3").
    let name = trap.rsplit(": ").next()?.rsplit("] ").next()?;
    well_formed.then_some(name.trim())
}

/// An oops on an int3 instruction (a breakpoint no kprobe or text patch claimed).
pub(super) fn int3_oops(line: &str) -> bool {
    die_line(line) == Some("int3")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers_only_with_the_token() {
        let t = "ctrace-vm-0123456789abcdef";
        assert_eq!(parse_marker(&format!("{t} init: started"), t), Some(Marker::Started));
        assert_eq!(
            parse_marker(&format!("{t} init: running script"), t),
            Some(Marker::Script)
        );
        assert_eq!(
            parse_marker(&format!("{t} init: success"), t),
            Some(Marker::Finished(ExitReason::Success))
        );
        // Kernel messages may share the line.
        assert_eq!(
            parse_marker(
                &format!("[   3.1] random: crng init done{t} init: failure (exit 3)\r"),
                t
            ),
            Some(Marker::Finished(ExitReason::ScriptFailed { code: 3 }))
        );
        assert_eq!(
            parse_marker(&format!("{t} init: failure (modprobe nf_conntrack failed)"), t),
            Some(Marker::Finished(ExitReason::InitFailed {
                reason: "modprobe nf_conntrack failed".into()
            }))
        );
        assert_eq!(parse_marker("init: success", t), None);
        assert_eq!(parse_marker("ctrace-vm-ffffffffffffffff init: success", t), None);
        assert_eq!(parse_marker(&format!("{t} init: successful"), t), None);
    }

    #[test]
    fn strips_terminal_escapes() {
        let seabios = "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)";
        assert_eq!(strip_escapes(seabios), "SeaBIOS (version 1.16.2)");
        assert_eq!(strip_escapes("plain [1] text\x1b"), "plain [1] text");
    }

    #[test]
    fn detects_kernel_trouble() {
        assert!(kernel_trouble(
            "[   12.3] Kernel panic - not syncing: Attempted to kill init!"
        ));
        assert!(kernel_trouble(
            "[   40.0] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:"
        ));
        assert!(kernel_trouble(
            "[   60.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!"
        ));
        assert!(kernel_trouble(
            "BUG: kernel NULL pointer dereference, address: 0000000000000000"
        ));
        assert!(!kernel_trouble(
            "nf_conntrack: default automatic helper assignment has been turned off"
        ));
        assert!(kernel_trouble(
            "[  153.1] rcu: INFO: rcu_sched self-detected stall on CPU"
        ));
        // 5.10 prints die()'s line without "Oops: ".
        assert!(kernel_trouble("[  137.1] int3: 0000 [#1] SMP NOPTI"));
        assert!(!kernel_trouble("case clash: 500 rounds: 0000 [#1 of 2]"));
    }

    #[test]
    fn int3_oopses_are_told_from_other_oopses() {
        // As printed by the 6.12 guest, after a test's own output on the same line.
        assert!(int3_oops(
            "test forwarding::forwarded_drops ... [  137.103335] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
        ));
        assert!(int3_oops("[   12.3] int3: 0000 [#1] SMP NOPTI"));
        assert!(!int3_oops(
            "[   12.3] Oops: general protection fault: 0000 [#1] SMP NOPTI"
        ));
        assert!(!int3_oops(
            "[   12.3] Oops: invalid opcode: 0000 [#2] PREEMPT SMP NOPTI"
        ));
        assert!(!int3_oops(
            "[   12.3] BUG: kernel NULL pointer dereference, address: 0000000000000000"
        ));
        assert!(!int3_oops("echo int3: 0000 [#x]"));
    }
}
