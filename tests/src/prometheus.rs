//! Debian's real Prometheus scraping a running ctrace, queried with promtool (the Prometheus project's own client)
//! and through its HTTP API.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// How long Prometheus may take to scrape what happened (it scrapes every second).
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A fresh directory for Prometheus's configuration and storage, named after `tag` and this process.
pub fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ctrace-prometheus-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The body of `GET path` from `addr` (plain HTTP/1.0: the tests need no HTTP client crate).
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    http_get_accepting(addr, path, "*/*")
}

/// What Prometheus asks an exporter for: OpenMetrics (whose exposition ends in `# EOF`), else the text format.
pub const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";

/// The body of `GET path` from `addr`, asking for the formats in `accept`.
pub fn http_get_accepting(addr: &str, path: &str, accept: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("no HTTP header in the answer to GET {path}: {response}");
    };
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// Prometheus scraping one target every second (and evaluating `rules`, if any, every second), storing in `dir`;
/// killed when dropped.
pub struct Prometheus {
    child: Child,
    pub url: String,
    pub addr: String,
}

impl Prometheus {
    pub fn start(dir: &Path, target: &str) -> Prometheus {
        Prometheus::start_with_rules(dir, target, None)
    }

    pub fn start_with_rules(dir: &Path, target: &str, rules: Option<&Path>) -> Prometheus {
        let config = dir.join("prometheus.yml");
        let rule_files = rules
            .map(|r| format!("rule_files:\n  - '{}'\n", r.display()))
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n{rule_files}\
                 scrape_configs:\n  - job_name: ctrace\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start prometheus: `cargo xtask test` installs Debian's prometheus package");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            addr: format!("127.0.0.1:{port}"),
        }
    }

    /// An instant query through promtool: label set → value; an error when Prometheus rejects the query.
    pub fn try_query(&self, expr: &str) -> anyhow::Result<Vec<(Value, f64)>> {
        let out = Command::new("promtool")
            .args(["query", "instant", "-o", "json", &self.url, expr])
            .output()
            .context("cannot run promtool")?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        let value = s["value"][1].as_str().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN);
                        (s["metric"].clone(), value)
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// As [`Prometheus::try_query`], empty when the query fails (e.g. before Prometheus listens).
    pub fn query(&self, expr: &str) -> Vec<(Value, f64)> {
        self.try_query(expr).unwrap_or_default()
    }

    /// The single value of `expr`, once it equals `want` (or the last one seen when the time is up).
    pub fn wait_for(&self, expr: &str, want: f64) -> Option<f64> {
        let deadline = Instant::now() + SCRAPE_TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(expr).first().map(|(_, v)| *v);
            if last == Some(want) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        last
    }

    /// `GET /api/v1/PATH`'s `data`.
    pub fn api(&self, path: &str) -> anyhow::Result<Value> {
        let body = http_get(&self.addr, &format!("/api/v1/{path}"))?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("not JSON: {body}"))?;
        if v["status"] != "success" {
            bail!("/api/v1/{path}: {v}");
        }
        Ok(v["data"].clone())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
