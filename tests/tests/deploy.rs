//! deploy/'s Grafana dashboard and Prometheus alert rules against a running ctrace: every metric their PromQL
//! names is one ctrace really serves (a `# TYPE` line in its scrape), every label they match or group by is one
//! those metrics carry, Prometheus answers every dashboard query, and it loads and evaluates every rule without
//! error. A panel or alert on a metric that does not exist fails here.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use ctrace_tests::{
    Ctrace, TestNetns,
    prometheus::{Prometheus, free_port, http_get, tempdir},
    require_root,
};
use promql_parser::{
    parser::{self, Expr},
    util::{ExprVisitor, walk_expr},
};
use serde_json::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// The metric names and the label names one PromQL expression uses.
#[derive(Debug, Default)]
struct Uses {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

impl ExprVisitor for Uses {
    type Error = std::convert::Infallible;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
        let mut selector = |vs: &parser::VectorSelector| {
            self.metrics.extend(vs.name.clone());
            for m in vs
                .matchers
                .matchers
                .iter()
                .chain(vs.matchers.or_matchers.iter().flatten())
            {
                if m.name == "__name__" {
                    self.metrics.insert(m.value.clone());
                } else {
                    self.labels.insert(m.name.clone());
                }
            }
        };
        match expr {
            Expr::VectorSelector(vs) => selector(vs),
            Expr::MatrixSelector(ms) => selector(&ms.vs),
            Expr::Aggregate(a) => self
                .labels
                .extend(a.modifier.iter().flat_map(|m| m.labels().labels.clone())),
            Expr::Binary(b) => self.labels.extend(
                b.modifier
                    .iter()
                    .flat_map(|m| m.matching.iter().flat_map(|l| l.labels().labels.clone())),
            ),
            _ => {}
        }
        Ok(true)
    }
}

/// Grafana's variables replaced by what Grafana would put there (a range, a regex matching everything).
fn expand_grafana(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".*")
        .replace("$netns", ".*")
}

fn uses(expr: &str) -> Uses {
    assert!(
        !expr.contains('$'),
        "a Grafana variable the test does not know in {expr}"
    );
    let ast = parser::parse(expr).unwrap_or_else(|e| panic!("not PromQL: {expr}: {e}"));
    let mut u = Uses::default();
    walk_expr(&mut u, &ast).unwrap();
    u
}

/// Every PromQL expression in the dashboard: panel targets and query variables (`label_values(SELECTOR, LABEL)`
/// is Grafana's: its selector is PromQL, its label must exist too).
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut exprs = vec![];
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = panels.pop() {
        panels.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("a target without expr").to_owned());
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query is not label_values(...): {q}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        // The label the variable lists must be one the selector's metric has: a grouping says so.
        exprs.push(format!("count by ({}) ({})", label.trim(), selector.trim()));
    }
    exprs
}

/// One metric family in a scrape: how many samples it has and their label names.
#[derive(Debug, Default, PartialEq, Eq)]
struct Family {
    samples: usize,
    labels: BTreeSet<String>,
}

/// The families ctrace's scrape declares (`# TYPE name kind`), with their samples' label names.
fn served(scrape: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families
                .entry(rest.split_whitespace().next().unwrap().to_owned())
                .or_default();
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap();
            let labels = line[name_end..]
                .strip_prefix('{')
                .and_then(|l| l.split_once('}'))
                .map(|(l, _)| l)
                .unwrap_or("");
            let entry = families.entry(line[..name_end].to_owned()).or_default();
            entry.samples += 1;
            // Label values are quoted and escaped; names are what precedes `="` at the start of each pair.
            let mut rest = labels;
            while let Some((name, after)) = rest.split_once("=\"") {
                entry.labels.insert(name.trim_start_matches(',').to_owned());
                let mut chars = after.char_indices();
                let mut end = after.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        _ => {}
                    }
                }
                rest = &after[end..];
            }
        }
    }
    families
}

/// Checks one expression against the scrape; returns a line for the log.
fn check(what: &str, expr: &str, families: &BTreeMap<String, Family>) -> String {
    let u = uses(expr);
    assert!(!u.metrics.is_empty(), "{what}: no metric in {expr}");
    for m in &u.metrics {
        assert!(
            families.contains_key(m),
            "{what}: {m} is not a metric ctrace serves (its scrape declares {:?}); query: {expr}",
            families.keys().collect::<Vec<_>>()
        );
    }
    let known: BTreeSet<&str> = u
        .metrics
        .iter()
        .flat_map(|m| families[m].labels.iter().map(String::as_str))
        .chain(TARGET_LABELS)
        .collect();
    let has_series = u.metrics.iter().any(|m| families[m].samples > 0);
    if has_series {
        for l in &u.labels {
            assert!(
                known.contains(l.as_str()),
                "{what}: label {l} is on none of {:?} (their labels: {known:?}); query: {expr}",
                u.metrics
            );
        }
    }
    format!(
        "{what}: metrics {:?}, labels {:?}{}",
        u.metrics,
        u.labels,
        if has_series {
            ""
        } else {
            " (labels unchecked: no series on this host)"
        }
    )
}

#[test]
fn dashboard_and_alert_rules_use_only_served_metrics() {
    require_root();
    let ns = TestNetns::new("deploy").unwrap();
    ns.exec(&[
        "iptables", "-w", "-I", "OUTPUT", "-p", "udp", "--dport", "7", "-j", "DROP",
    ])
    .unwrap();
    let target = format!("127.0.0.1:{}", free_port());
    let ctrace = Ctrace::start(&["--rate-limit", "0", "--metrics", &target]).unwrap();
    let dir = tempdir("deploy");
    let rules = Path::new(DEPLOY).join("prometheus/ctrace.rules.yml");
    let prometheus = Prometheus::start_with_rules(&dir, &target, Some(&rules));

    // Series for the per-netns families and the sysctl writes (no reload can happen on a kernel without modules,
    // so ctrace_sysctl_resets_total is declared with no series here).
    ns.udp_flows(0, 10, 7).unwrap();
    ns.in_netns(|| {
        Ok(std::fs::write(
            "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close",
            "13",
        )?)
    })
    .unwrap();
    let netns = ns.inode();
    let seen = prometheus.wait_for(
        &format!(r#"sum(ctrace_netns_drops_total{{netns="{netns}"}}) + sum(ctrace_sysctl_writes_total)"#),
        11.0,
    );
    assert_eq!(
        seen,
        Some(11.0),
        "Prometheus never saw the 10 drops and the sysctl write"
    );

    let scrape = http_get(&target, "/metrics").unwrap();
    let families = served(&scrape);
    println!(
        "ctrace serves {} families: {:?}",
        families.len(),
        families.keys().collect::<Vec<_>>()
    );

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(DEPLOY).join("grafana/ctrace.json")).unwrap()).unwrap();
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 10, "the dashboard has {} queries", exprs.len());
    for raw in &exprs {
        let expr = expand_grafana(raw);
        println!("{}", check("dashboard", &expr, &families));
        if let Err(e) = prometheus.try_query(&expr) {
            panic!("Prometheus rejects the dashboard query {raw}: {e}");
        }
    }

    // The rules as Prometheus loaded them, once each has been evaluated.
    let deadline = Instant::now() + Duration::from_secs(30);
    let loaded = loop {
        let groups = prometheus.api("rules").map(|d| d["groups"].clone()).unwrap_or_default();
        let rules: Vec<Value> = groups
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown");
        if evaluated || Instant::now() > deadline {
            break rules;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        loaded.len(),
        5,
        "Prometheus loaded {} rules from {}",
        loaded.len(),
        rules.display()
    );
    for r in &loaded {
        let name = r["name"].as_str().unwrap();
        assert_eq!(r["health"], "ok", "rule {name}: {}", r["lastError"]);
        println!(
            "{}",
            check(&format!("alert {name}"), r["query"].as_str().unwrap(), &families)
        );
    }
    drop(prometheus);
    ctrace.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_query_walk_finds_names_and_labels() {
    let u = uses(r#"sum by (reason) (rate(x_total{a="1",b=~".+"}[5m])) / on (instance) group_left y or z offset 1m"#);
    assert_eq!(u.metrics, BTreeSet::from(["x_total".into(), "y".into(), "z".into()]));
    assert_eq!(
        u.labels,
        BTreeSet::from(["a".into(), "b".into(), "instance".into(), "reason".into()])
    );
    let f = served("# TYPE a_total counter\na_total{k=\"v\\\"x,y=\\\"z\",l=\"\"} 1\n# TYPE b gauge\n");
    assert_eq!(f["a_total"].labels, BTreeSet::from(["k".into(), "l".into()]));
    assert_eq!(f["b"], Family::default());
}
