//! The Grafana dashboard (`contrib/grafana/warren.json`) and the README's metrics table agree
//! with what the binaries export: every metric the dashboard queries is in the table, and every
//! control and DERP metric in the table is in a real scrape (the node's are checked by the
//! node crate's own test against its renderer).

use std::collections::BTreeSet;
use std::path::PathBuf;

use warren_control::error::ControlError;
use warren_control::metrics::{Metrics, NodeStates};
use warren_derp::Relay;
use warren_proto::DerpSecretKey;

fn repo_file(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The README table's metric names, with their types.
fn readme_metrics() -> Vec<(String, String)> {
    repo_file("README.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `warren_"))
        .map(|rest| {
            let (name, rest) = rest.split_once('`').expect("closing backtick");
            let kind = rest
                .split('|')
                .nth(1)
                .expect("a type column")
                .trim()
                .to_owned();
            (format!("warren_{name}"), kind)
        })
        .collect()
}

/// Every `warren_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("warren_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The metric names a scrape declares (`# TYPE name kind`), with their kinds.
fn declared(text: &str) -> BTreeSet<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_owned(), k.to_owned()))
        .collect()
}

#[test]
fn every_dashboard_query_uses_a_documented_metric() {
    let table = readme_metrics();
    assert!(table.len() >= 20, "README table: {table:?}");
    let names: BTreeSet<&str> = table.iter().map(|(n, _)| n.as_str()).collect();
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("contrib/grafana/warren.json")).expect("valid JSON");
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 10, "dashboard queries: {all:?}");
    let mut used = BTreeSet::new();
    for expr in &all {
        let found = metric_names(expr);
        assert!(!found.is_empty(), "a query without a warren metric: {expr}");
        for name in found {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| names.contains(b)))
                .unwrap_or(&name)
                .to_owned();
            assert!(
                names.contains(base.as_str()),
                "{expr}: {name} is not in the README"
            );
            used.insert(base);
        }
    }
    // Each binary has panels.
    for prefix in ["warren_control_", "warren_derp_", "warren_node_"] {
        assert!(
            used.iter().any(|n| n.starts_with(prefix)),
            "no {prefix} panel"
        );
    }
}

#[test]
fn control_and_derp_export_every_documented_metric() {
    let metrics = Metrics::new();
    // Series with labels from events appear once an event happened.
    metrics.refused(&ControlError::AuthKeyUsed);
    metrics.store_call("update_node", std::time::Duration::from_micros(70));
    let mut exported = declared(&metrics.render(NodeStates::default()));
    let relay = Relay::new(DerpSecretKey::generate(), Default::default());
    exported.extend(declared(&warren_derp::metrics::render_relay(&relay)));
    for (name, kind) in readme_metrics() {
        if name.starts_with("warren_node_") {
            continue;
        }
        assert!(
            exported.contains(&(name.clone(), kind.clone())),
            "{name} ({kind}) is documented but not exported: {exported:?}"
        );
    }
    // And nothing is exported undocumented.
    let documented: BTreeSet<String> = readme_metrics().into_iter().map(|(n, _)| n).collect();
    for (name, _) in &exported {
        assert!(
            documented.contains(name),
            "{name} is exported but not in the README"
        );
    }
}
