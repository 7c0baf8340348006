//! docs/troubleshooting.md cites commands, reason labels, metrics and condition reasons for an
//! operator to act on: each must exist. Every `cellgate ...` / `kubectl cellgate ...` command
//! line parses with the real command line definition; every reason in a table's `reason` column
//! is a label the node gives; every `cellgate_*` name is an error code of the node's answers or a
//! metric the node or operator registers; every condition type and reason is one the operator
//! writes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cellgate_audit::Decision;
use cellgate_node::reason::Reason;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn doc() -> String {
    std::fs::read_to_string(root().join("docs/troubleshooting.md"))
        .expect("docs/troubleshooting.md")
}

fn source(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The text of every `code span` outside fenced blocks.
fn code_spans(text: &str) -> Vec<String> {
    let mut spans = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(span), Some(_)) = (parts.next(), parts.next()) {
            spans.push(span.to_string());
        }
    }
    spans
}

/// Every line of the fenced `sh` blocks, without comments, redirections and pipes.
fn shell_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(lang) = t.strip_prefix("```") {
            in_sh = !in_sh && lang == "sh";
            continue;
        }
        if in_sh {
            let mut l = line;
            for cut in ["  #", " > ", " | ", " &"] {
                if let Some((head, _)) = l.split_once(cut) {
                    l = head;
                }
            }
            lines.push(l.trim().to_string());
        }
    }
    lines
}

/// Splits a command line like a shell: whitespace, single and double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[test]
fn every_cellgate_command_line_parses() {
    let text = doc();
    let mut candidates: Vec<String> = shell_lines(&text);
    candidates.extend(code_spans(&text));
    let mut checked = 0;
    let mut bad = Vec::new();
    for line in candidates {
        let w = words(&line);
        let args: Vec<String> = match w.first().map(String::as_str) {
            Some("cellgate") => w.clone(),
            Some("kubectl") if w.get(1).map(String::as_str) == Some("cellgate") => w[1..].to_vec(),
            _ => continue,
        };
        if args.len() == 1 {
            continue; // the name alone
        }
        checked += 1;
        if let Err(e) = cellgate_cli::command().try_get_matches_from(&args) {
            use clap::error::ErrorKind::*;
            // A command named in the text without its arguments (`cellgate explain`): it must
            // exist, its arguments are shown elsewhere.
            let named_only = args.len() <= 3 && !args.iter().any(|a| a.starts_with('-'));
            let missing = matches!(
                e.kind(),
                MissingRequiredArgument
                    | MissingSubcommand
                    | DisplayHelpOnMissingArgumentOrSubcommand
            );
            if !(named_only && missing) {
                bad.push(format!("{line}\n  {}", e.render()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "command lines that do not parse:\n{}",
        bad.join("\n")
    );
    assert!(
        checked >= 20,
        "only {checked} command lines found: is the page there?"
    );
}

#[test]
fn every_reason_in_a_reason_table_is_a_node_label() {
    let text = doc();
    let mut in_table = false;
    let mut seen = 0;
    for line in text.lines() {
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let first = line.split('|').nth(1).unwrap_or_default().trim();
        if first == "reason" {
            in_table = true;
            continue;
        }
        if !in_table || first.starts_with("---") {
            continue;
        }
        for label in first.split('`').skip(1).step_by(2) {
            seen += 1;
            let ok = match label.strip_suffix('*') {
                Some(prefix) => Reason::LABELS.iter().any(|l| l.starts_with(prefix)),
                None => Reason::LABELS.contains(&label),
            };
            assert!(ok, "reason {label:?} is not a label the node gives");
        }
    }
    assert!(seen >= 20, "only {seen} reasons checked");
}

#[test]
fn every_cellgate_name_is_an_error_code_or_a_metric() {
    let mut codes = BTreeSet::new();
    for l in Reason::LABELS {
        for d in [Decision::Deny, Decision::Error] {
            codes.insert(Reason::from_label(l).error_code(d));
        }
    }
    // Where the node and the operator register their metrics (names without the `_total` a
    // counter gets on the wire; the operator's under the prefix `cellgate_operator`).
    let node = source("crates/cellgate-node/src/metrics.rs")
        + &source("crates/cellgate-node/src/lib.rs")
        + &source("crates/cellgate-node/src/selfcheck.rs");
    let operator = source("crates/cellgate-operator/src/metrics.rs");
    assert!(operator.contains("Registry::with_prefix(\"cellgate_operator\")"));
    let text = doc();
    let mut seen = 0;
    for (i, _) in text.match_indices("cellgate_") {
        if text[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        seen += 1;
        if codes.contains(name.as_str()) {
            continue;
        }
        let bare = name.strip_suffix("_total").unwrap_or(&name);
        let registered = match bare.strip_prefix("cellgate_operator_") {
            Some(rest) => operator.contains(&format!("\"{rest}\"")),
            None => node.contains(&format!("\"{bare}\"")),
        };
        assert!(
            registered,
            "{name} is neither an answer's error code nor a registered metric"
        );
    }
    assert!(seen >= 15, "only {seen} names checked");
}

#[test]
fn every_condition_type_and_reason_is_written_by_the_operator() {
    let sources = [
        "crates/cellgate-operator/src/status.rs",
        "crates/cellgate-operator/src/policy.rs",
        // The node writes `Governed` (its enforcement self-check).
        "crates/cellgate-node/src/selfcheck.rs",
        "crates/cellgate-api/src/crd.rs",
        // The CA rotation's phases (`kubectl cellgate ca status`).
        "crates/cellgate-api/src/ca_rotation.rs",
    ]
    .map(source)
    .join("\n");
    // Kubernetes' own words the page uses.
    let kubernetes = ["FailedScheduling", "True", "False", "Unknown"];
    let mut seen = 0;
    // Single-word spans only: `/readyz` messages and commands quoted on the page are prose.
    for span in code_spans(&doc()).iter().filter(|s| !s.contains(' ')) {
        for word in span.split(['=', ',']) {
            let camel = word.len() > 2
                && word.starts_with(|c: char| c.is_ascii_uppercase())
                && word.chars().all(|c| c.is_ascii_alphabetic())
                && word.chars().any(|c| c.is_ascii_lowercase());
            if !camel || kubernetes.contains(&word) {
                continue;
            }
            // Kinds and a print column named on the page.
            if [
                "AgentCell",
                "CellgateClusterPolicy",
                "CellgatePolicy",
                "AgentApproval",
                "Usage",
            ]
            .contains(&word)
            {
                continue;
            }
            seen += 1;
            assert!(
                sources.contains(&format!("\"{word}\"")),
                "{word} is not a condition type, reason or phase the operator writes"
            );
        }
    }
    assert!(seen >= 15, "only {seen} condition words checked");
}
