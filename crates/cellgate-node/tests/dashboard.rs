//! The Grafana dashboard shipped in the chart (`charts/cellgate/dashboards/cellgate.json`) asks
//! only for metrics the node and the operator really export: every metric name in every
//! panel's PromQL, and in the template variables' queries, is looked up in the text a running
//! node serves on `/metrics` and in the operator's registry.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::Value;

/// Every name a Prometheus text exposition serves: sample names, and the names each `# TYPE`
/// line implies (a counter `x` is `x_total`; a histogram `x` is `x_bucket`, `x_sum`, `x_count`),
/// so a family with no series yet still counts as exported.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut parts = t.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{s}"));
                    }
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Removes every `open ... close` span (not nested), e.g. label matchers and range selectors.
fn strip_spans(s: &str, open: char, close: char) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in s.chars() {
        match c {
            c if c == open && !inside => inside = true,
            c if c == close && inside => inside = false,
            c if !inside => out.push(c),
            _ => {}
        }
    }
    out
}

/// The metric names a PromQL expression selects: string literals, label matchers, range
/// selectors and `by`/`without` label lists removed, then every identifier that is not a
/// function call, a keyword or a number.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
    ];
    let mut s = strip_spans(expr, '"', '"');
    s = strip_spans(&s, '{', '}');
    s = strip_spans(&s, '[', ']');
    // `by (a, b)` and `without (a)` name labels, not metrics.
    for kw in ["by", "without", "on", "ignoring"] {
        while let Some(i) = s.find(&format!("{kw} (")) {
            let close = s[i..].find(')').map_or(s.len(), |j| i + j + 1);
            s.replace_range(i..close, " ");
        }
    }
    let chars: Vec<char> = s.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j] == ' ' {
                j += 1;
            }
            let is_call = chars.get(j) == Some(&'(');
            if !is_call && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn the_name_extraction_handles_functions_matchers_and_histograms() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(x_seconds_bucket{instance=~"$i", a="b(c)"}[$__rate_interval])))"#
        ),
        ["x_seconds_bucket"]
    );
    assert_eq!(
        metric_names(r#"topk(10, sum by (host) (rate(a_total[5m]))) / on (host) b"#),
        ["a_total", "b"]
    );
    let text = "# HELP c C.\n# TYPE c counter\nc_total{x=\"1\"} 2\n# TYPE h histogram\n# TYPE g gauge\ng 1\n";
    let names = exported(text);
    for n in ["c_total", "h_bucket", "h_sum", "h_count", "g"] {
        assert!(names.contains(n), "{n}");
    }
    assert!(!names.contains("h") && !names.contains("c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_names_an_exported_metric() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../charts/cellgate/dashboards/cellgate.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let f = Fixture::start().await;
    let scrape = f.admin_get("/metrics").await;
    assert_eq!(scrape.status, 200);
    let mut known = exported(&scrape.body);
    known.extend(exported(
        &cellgate_operator::metrics::Metrics::new().encode(),
    ));

    // The data source is a variable of type prometheus, and every panel and query uses it.
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");

    let mut missing = Vec::new();
    let mut checked = 0;
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let q = v["definition"].as_str().unwrap_or_default();
        let metric = q
            .strip_prefix("label_values(")
            .and_then(|r| r.split(',').next())
            .unwrap_or_else(|| panic!("variable {}: {q:?}", v["name"]));
        checked += 1;
        if !known.contains(metric.trim()) {
            missing.push(format!("variable {}: {metric}", v["name"]));
        }
    }
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: BTreeSet<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Decisions by result and reason",
        "Top denied hosts",
        "Budget usage",
        "Approval queue",
        "Audit exporter lag",
        "Decision time p50 / p99",
    ] {
        assert!(titles.contains(wanted), "no panel {wanted:?}");
    }
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title}");
            let expr = t["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel {title}: no metric in {expr}");
            for n in names {
                checked += 1;
                if !known.contains(&n) {
                    missing.push(format!("panel {title:?}: {n}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics the node and the operator do not export:\n  {}",
        missing.join("\n  ")
    );
    assert!(checked > 15, "{checked}");
}
