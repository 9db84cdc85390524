//! The test step for deploy/: each file checked by the tool its users run. promtool checks the alert rules and runs
//! their unit tests; `systemd-analyze security` scores the unit (the README quotes the score, and this step fails
//! when they differ); kubernetes-validate checks the DaemonSet against a current Kubernetes schema. (The unit is
//! verified as installed, by the Debian package step; the dashboard's and the rules' metric names against a running
//! ctrace, by the host tests.)

use crate::setup;
use anyhow::{Context, Result, ensure};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian packages the step uses: systemd-analyze, promtool, Python's venv for kubernetes-validate.
pub const PACKAGES: &[&str] = &["systemd", "prometheus", "python3-venv"];
/// kubernetes-validate bundles the schemas of every Kubernetes release up to its own version.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const KUBERNETES_VERSION: &str = "1.37.0";

pub fn run(ws: &Path) -> Result<()> {
    let deploy = ws.join("deploy");
    let prometheus = deploy.join("prometheus");
    let out = setup::capture(
        Command::new("promtool")
            .args(["check", "rules", "ctrace.rules.yml"])
            .current_dir(&prometheus),
    )?;
    eprintln!("xtask: promtool check rules: {}", out.trim().replace('\n', "; "));
    let out = setup::capture(
        Command::new("promtool")
            .args(["test", "rules", "ctrace.rules.test.yml"])
            .current_dir(&prometheus),
    )
    .context("the alert rules' unit tests failed")?;
    eprintln!("xtask: promtool test rules: {}", out.trim().replace('\n', "; "));

    let unit = deploy.join("systemd/ctrace.service");
    let report = setup::capture(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(&unit),
    )?;
    let score = report
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ctrace.service: ")
                .map(|(_, s)| s)
        })
        .context("systemd-analyze security printed no overall exposure level")?;
    // "3.1 OK 🙂": the number and the word.
    let score: String = score.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let quoted = format!("exposure level {score}");
    let readme = fs::read_to_string(ws.join("README.md")).context("could not read README.md")?;
    ensure!(
        readme.contains(&quoted),
        "systemd-analyze security scores the unit {score}, but the README does not say \"{quoted}\""
    );
    eprintln!("xtask: systemd-analyze security --offline=yes: {score} (as the README says)");

    let validate = ensure_kubernetes_validate(ws)?;
    let daemonset = deploy.join("kubernetes/ctrace-daemonset.yaml");
    let out = setup::capture(
        Command::new(validate)
            .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
            .arg(&daemonset),
    )
    .context("kubernetes-validate rejects the DaemonSet")?;
    eprintln!(
        "xtask: kubernetes-validate --strict: {}",
        out.trim().replace('\n', "; ")
    );

    let dashboard: serde_json::Value = serde_json::from_str(&fs::read_to_string(deploy.join("grafana/ctrace.json"))?)
        .context("the dashboard is not JSON")?;
    let mut ids: Vec<u64> = dashboard["panels"]
        .as_array()
        .context("the dashboard has no panels")?
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let panels = ids.len();
    ids.sort_unstable();
    ids.dedup();
    ensure!(ids.len() == panels, "two dashboard panels share an id");
    Ok(())
}

/// A venv in `.tools/kubernetes-validate` with kubernetes-validate from PyPI (Debian's python3; about 15 s once).
/// Returns the program's path.
fn ensure_kubernetes_validate(ws: &Path) -> Result<PathBuf> {
    let venv = ws.join(".tools").join("kubernetes-validate");
    let exe = venv.join("bin/kubernetes-validate");
    let stamp = venv.join("installed");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == KUBERNETES_VALIDATE) && exe.is_file() {
        return Ok(exe);
    }
    eprintln!("xtask: installing {KUBERNETES_VALIDATE} into {}", venv.display());
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("could not remove {}", venv.display()))?;
    }
    setup::output(Command::new("/usr/bin/python3").args(["-m", "venv"]).arg(&venv))
        .context("could not create a Python venv (Debian's python3-venv)")?;
    setup::output(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        KUBERNETES_VALIDATE,
    ]))
    .with_context(|| format!("could not install {KUBERNETES_VALIDATE} from PyPI"))?;
    fs::write(&stamp, KUBERNETES_VALIDATE)?;
    Ok(exe)
}
