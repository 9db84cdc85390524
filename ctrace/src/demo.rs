//! `ctrace demo`: makes conntrack drop packets in a throwaway network namespace while ctrace
//! traces it. The netns belongs to one thread of this process, so it disappears with the process
//! however it ends; no global setting changes unless `--lower-global-max` asks for it.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::sync::{oneshot, watch};

use crate::{
    cli::{DemoArgs, Mode, RunArgs},
    netns, session,
};

const MAX_PATH: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// Puts the global nf_conntrack_max back when dropped (every exit path but SIGKILL).
/// The sysctl file is opened in the initial netns: only there is the global value writable,
/// and a sysctl file keeps the netns it was opened in.
struct GlobalMaxGuard<'a> {
    file: &'a std::fs::File,
    old: String,
}

fn write_sysctl(mut f: &std::fs::File, value: &str) -> std::io::Result<()> {
    use std::io::{Seek as _, Write as _};
    f.seek(std::io::SeekFrom::Start(0))?;
    f.write_all(value.as_bytes())
}

impl<'a> GlobalMaxGuard<'a> {
    fn lower(file: &'a std::fs::File, to: u64) -> anyhow::Result<GlobalMaxGuard<'a>> {
        use std::io::{Read as _, Seek as _};
        let mut old = String::new();
        let mut f = file;
        f.seek(std::io::SeekFrom::Start(0))?;
        f.read_to_string(&mut old).context("cannot read nf_conntrack_max")?;
        write_sysctl(file, &to.to_string()).context("cannot lower nf_conntrack_max")?;
        Ok(GlobalMaxGuard {
            file,
            old: old.trim().to_owned(),
        })
    }
}

impl Drop for GlobalMaxGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = write_sysctl(self.file, &self.old) {
            eprintln!(
                "ctrace: could not restore net.netfilter.nf_conntrack_max to {}: {e}; set it by hand",
                self.old
            );
        }
    }
}

/// Runs `args[0]` with the rest as arguments inside the calling thread's netns (a forked child inherits it);
/// returns its stdout, or an error with its stderr when it fails. The tests run their commands with it too.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {} (is it installed?)", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The iptables rule (arguments after `iptables -w`) that makes the kernel track a netns's outgoing traffic: any
/// conntrack match does. The tests use it too.
pub const TRACK_OUTPUT_RULE: [&str; 8] = [
    "-A",
    "OUTPUT",
    "-m",
    "conntrack",
    "--ctstate",
    "NEW,ESTABLISHED,RELATED",
    "-j",
    "ACCEPT",
];

/// The destination of flow `i`: 127.(1+i>>16).(i>>8&255).(i&255). 127/8 is all local, so each flow is a
/// distinct conntrack tuple; the tests send (and recognise) the same flows.
pub fn flow_destination(i: u32, port: u16) -> SocketAddrV4 {
    let [_, b, c, d] = i.to_be_bytes();
    SocketAddrV4::new(Ipv4Addr::new(127, b.wrapping_add(1), c, d), port)
}

/// Sends one datagram to each of `flows` distinct destinations; returns how many sends failed.
fn udp_flows(first: u32, flows: u32, port: u16, cancel: &AtomicBool) -> anyhow::Result<u32> {
    let sock = UdpSocket::bind("127.0.0.1:0").context("cannot open a UDP socket in the demo netns")?;
    let mut failed = 0;
    for i in first..first + flows {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        if sock.send_to(b"x", flow_destination(i, port)).is_err() {
            failed += 1;
        }
    }
    Ok(failed)
}

enum Step {
    Netns(u32),
    Say(String),
    Done(anyhow::Result<()>),
}

/// The traffic: one thread that owns the demo netns.
fn traffic(
    lower_max: Option<u64>,
    go: mpsc::Receiver<()>,
    tell: mpsc::Sender<Step>,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let max_file = match lower_max {
        Some(_) => Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(MAX_PATH)
                .context("cannot open net.netfilter.nf_conntrack_max")?,
        ),
        None => None,
    };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("cannot create a network namespace")?;
    sh(&["ip", "link", "set", "lo", "up"])?;
    sh(&[&["iptables", "-w"], &TRACK_OUTPUT_RULE[..]].concat())
        .context("the demo needs iptables to enable conntrack in its netns")?;
    sh(&[
        "iptables",
        "-w",
        "-I",
        "OUTPUT",
        "-d",
        "127.0.0.9",
        "-p",
        "udp",
        "-j",
        "DROP",
    ])?;
    let _ = tell.send(Step::Netns(netns::current_inode()?));
    if go.recv().is_err() {
        return Ok(());
    }
    let say = |s: String| {
        let _ = tell.send(Step::Say(s));
    };

    say("step 1: 5 datagrams to 127.0.0.9, which a firewall rule drops -> netfilter_rule".into());
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    for _ in 0..5 {
        let _ = sock.send_to(b"x", "127.0.0.9:9");
    }
    std::thread::sleep(Duration::from_millis(1200));

    let mut next = 0u32;
    match (lower_max, &max_file) {
        (Some(n), Some(file)) if !cancel.load(Ordering::Relaxed) => {
            say(format!(
                "step 2: global nf_conntrack_max lowered to {n} for a moment; {} new flows -> table_full",
                n + 300
            ));
            let failed = {
                let _guard = GlobalMaxGuard::lower(file, n)?;
                udp_flows(next, n as u32 + 300, 9, &cancel)?
            };
            next += n as u32 + 300;
            say(format!("step 2: {failed} sends failed; nf_conntrack_max restored"));
            std::thread::sleep(Duration::from_millis(1200));
        }
        _ => say(
            "step 2 skipped: table_full drops need every entry assured or a lower limit; \
run `ctrace demo --lower-global-max 256` to lower the global nf_conntrack_max for a moment (restored on exit)"
                .into(),
        ),
    }

    let max = netns::conntrack_max().unwrap_or(262_144);
    let flows = (max + max / 8).min(4_000_000) as u32;
    if !cancel.load(Ordering::Relaxed) {
        say(format!(
            "step 3: {flows} one-packet UDP flows, more than nf_conntrack_max={max} -> early_drop evicts unassured entries"
        ));
        let failed = udp_flows(next, flows, 9, &cancel)?;
        say(format!("step 3: done ({failed} sends failed)"));
        std::thread::sleep(Duration::from_millis(1500));
    }
    Ok(())
}

pub async fn run(args: DemoArgs, offset: time::UtcOffset) -> anyhow::Result<()> {
    let (tell_tx, tell_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let thread_cancel = cancel.clone();
    let lower = args.lower_global_max;
    let traffic_thread = std::thread::spawn(move || {
        let done = tell_tx.clone();
        let r = traffic(lower, go_rx, tell_tx, thread_cancel);
        let _ = done.send(Step::Done(r));
    });
    let tell_rx = Arc::new(std::sync::Mutex::new(tell_rx));
    let recv = {
        let rx = tell_rx.clone();
        move || {
            rx.lock()
                .map_err(|_| anyhow::anyhow!("demo channel poisoned"))?
                .recv()
                .context("demo thread ended")
        }
    };
    let netns = match tokio::task::spawn_blocking(recv.clone()).await?? {
        Step::Netns(n) => n,
        Step::Done(r) => {
            r?;
            bail!("the demo traffic thread ended early");
        }
        Step::Say(_) => bail!("demo protocol error"),
    };

    let run_args = RunArgs {
        json: args.json,
        duration: None,
        netns: Some(netns.to_string()),
        proto: None,
        port: None,
        host: None,
        reason: vec![],
        mode: Mode::Auto,
        rate_limit: 50,
        metrics: None,
        quiet: false,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = oneshot::channel();
    let sinks = crate::sinks::Sinks::stdout(args.json, offset);
    let session = tokio::spawn(session::run(
        run_args,
        sinks,
        session::Hooks {
            stop: Some(stop_rx),
            ready: Some(ready_tx),
        },
    ));
    if ready_rx.await.is_err() {
        // The session failed before attaching; its error says why.
        cancel.store(true, Ordering::Relaxed);
        drop(go_tx);
        let _ = traffic_thread.join();
        return session.await?.map(|_| ());
    }
    let _ = go_tx.send(());
    let result;
    loop {
        let step = tokio::select! {
            s = tokio::task::spawn_blocking(recv.clone()) => s??,
            _ = tokio::signal::ctrl_c() => { cancel.store(true, Ordering::Relaxed); continue; }
        };
        match step {
            Step::Say(s) => eprintln!("demo: {s}"),
            Step::Done(r) => {
                result = r;
                break;
            }
            Step::Netns(_) => {}
        }
        if session.is_finished() {
            // Ctrl-C stopped the session: stop the traffic too (the guard restores the max).
            cancel.store(true, Ordering::Relaxed);
        }
    }
    let _ = traffic_thread.join();
    let _ = stop_tx.send(true);
    session.await??;
    result
}

#[cfg(test)]
mod tests {
    use super::flow_destination;

    #[test]
    fn flow_destinations_spread_over_127_slash_8() {
        assert_eq!(flow_destination(0, 9).to_string(), "127.1.0.0:9");
        assert_eq!(flow_destination(556, 9).to_string(), "127.1.2.44:9");
        assert_eq!(flow_destination(0x1_02_03, 7).to_string(), "127.2.2.3:7");
        assert_eq!(flow_destination((255 << 16) - 1, 9).to_string(), "127.255.255.255:9");
    }
}
