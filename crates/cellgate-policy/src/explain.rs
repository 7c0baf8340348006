//! [`PolicySet::explain`]: why a request gets its decision, rule by rule. For people and the
//! CLI (`cellgate explain`), never on the node's request path: it builds an interpreter engine
//! from the set's sources on every call.
//!
//! Each `deny` and `shadow_deny` rule of a layer package is located by its head (a line that
//! starts, at column 0, with the rule's name: the layout `opa fmt` writes) and copied, renamed,
//! into a module of its own package, so that it can be evaluated alone. The layer of a rule is
//! read from the conditions it writes (docs/policy.md, *Writing a pack*): one on
//! `input.cell.name` (or `input.identity.name`) is a cell rule, else one on the role a role rule,
//! else one on the namespace a namespace rule, else a cluster rule.

use std::path::PathBuf;

use cellgate_api::policy::{DecisionDoc, InputDoc};
use regorus::{Engine, Value};
use serde::Serialize;

use crate::error::EvalError;
use crate::pack::{PackEffect, PackMode};
use crate::set::{PolicySet, GENERATED_LAYERS_PATH, SHADOW_DENY_RULE};

/// The four layers of the brief, narrowest last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// No condition on the cell.
    Cluster,
    /// A condition on the namespace.
    Namespace,
    /// A condition on the role.
    Role,
    /// A condition on the cell's name.
    Cell,
}

impl Layer {
    /// Every layer, widest first.
    pub const ALL: [Layer; 4] = [Layer::Cluster, Layer::Namespace, Layer::Role, Layer::Cell];

    /// `cluster`, `namespace`, `role` or `cell`.
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Cluster => "cluster",
            Layer::Namespace => "namespace",
            Layer::Role => "role",
            Layer::Cell => "cell",
        }
    }

    fn of_rule(text: &str) -> Layer {
        // `input.cell.name`, not `input.cell.namespace`.
        let mentions = |reference: &str| {
            text.match_indices(reference).any(|(at, _)| {
                !text
                    .get(at.saturating_add(reference.len())..)
                    .and_then(|rest| rest.chars().next())
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        };
        let on = |field: &str| {
            mentions(&format!("input.cell.{field}")) || mentions(&format!("input.identity.{field}"))
        };
        if on("name") || on("uid") || on("cell_uid") {
            Layer::Cell
        } else if on("role") {
            Layer::Role
        } else if on("namespace") {
            Layer::Namespace
        } else {
            Layer::Cluster
        }
    }
}

/// A `deny` or `shadow_deny` rule that fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleHit {
    /// The pack holding it.
    pub pack: String,
    /// Its package, e.g. `cellgate.layers.deny_destructive`.
    pub package: String,
    /// `deny` or `shadow_deny`.
    pub rule: String,
    /// The file, as read.
    pub file: PathBuf,
    /// Line of the rule head; 0 when the rule could not be located (then every rule of that
    /// name in the package is reported as one).
    pub line: usize,
    /// The layer its conditions place it in.
    pub layer: Layer,
    /// Whether it denies, or only would (a `shadow_deny` rule, or a pack in shadow mode).
    pub effect: PackEffect,
    /// The entries it produced (a string, or the message of a `{reason, message}` object).
    pub messages: Vec<String>,
}

/// One layer's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerVerdict {
    /// The layer.
    pub layer: Layer,
    /// `deny` when an enforced rule of it fired, `shadow_deny` when only shadow rules did,
    /// `pass` otherwise.
    pub verdict: &'static str,
    /// Indices into [`Explanation::rules`] of the rules of this layer that fired.
    pub rules: Vec<usize>,
}

/// Why a request gets its decision.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The decision, as the node would make it (the compiled set).
    pub decision: DecisionDoc,
    /// The set's version.
    pub policy_version: String,
    /// Per layer, widest first.
    pub layers: Vec<LayerVerdict>,
    /// Every `deny`/`shadow_deny` rule that fired.
    pub rules: Vec<RuleHit>,
}

/// Prefix of the renamed copies of the rules.
const COPY_PREFIX: &str = "__cellgate_explain_";

struct Located {
    pack: String,
    mode: PackMode,
    package: String,
    rule: &'static str,
    file: PathBuf,
    line: usize,
    layer: Layer,
    /// The rule to evaluate: the copy, or the whole rule when it could not be copied.
    query: String,
}

impl PolicySet {
    /// Explains the decision of `input`: the decision itself, and every layer rule that fired,
    /// with its file, line and layer.
    ///
    /// # Errors
    ///
    /// [`EvalError`] when the decision fails, or the set's sources can no longer be evaluated
    /// by the interpreter.
    pub fn explain(&self, input: &InputDoc) -> Result<Explanation, EvalError> {
        let decision = self.evaluate(input)?;
        let engine_err = |e: &dyn std::fmt::Display| EvalError::Engine(e.to_string());
        let mut engine = Engine::new();
        engine.set_rego_v0(false);
        let mut located = Vec::new();
        for f in self.sources.iter().filter(|f| !f.is_manifest()) {
            let path = f.path.display().to_string();
            engine
                .add_policy(path.clone(), f.source.clone())
                .map_err(|e| engine_err(&e))?;
        }
        if let Some(m) = &self.layers_module {
            engine
                .add_policy(GENERATED_LAYERS_PATH.into(), m.clone())
                .map_err(|e| engine_err(&e))?;
        }
        let packages = engine
            .get_policy_package_components()
            .map_err(|e| engine_err(&e))?;
        let mut copies = 0usize;
        for (f, pkg) in self
            .sources
            .iter()
            .filter(|f| !f.is_manifest())
            .zip(&packages)
        {
            let c = &pkg.components;
            if c.len() < 3 || c.first().map(String::as_str) != Some("cellgate") {
                continue;
            }
            if c.get(1).map(String::as_str) != Some("layers") {
                continue;
            }
            let package = c.join(".");
            let Some(pack) = self.packs().iter().find(|p| p.files.contains(&f.path)) else {
                continue;
            };
            let mut module = format!("package {package}\n");
            for line in f.source.lines().filter(|l| l.starts_with("import ")) {
                module.push_str(line);
                module.push('\n');
            }
            let mut here = Vec::new();
            for (line, rule, text) in rule_extents(&f.source) {
                let name = format!("{COPY_PREFIX}{copies}");
                copies = copies.saturating_add(1);
                let renamed = format!("{name}{}", text.get(rule.len()..).unwrap_or_default());
                module.push_str(&renamed);
                module.push('\n');
                here.push(Located {
                    pack: pack.name.clone(),
                    mode: pack.mode,
                    package: package.clone(),
                    rule,
                    file: f.path.clone(),
                    line,
                    layer: Layer::of_rule(&text),
                    query: format!("data.{package}.{name}"),
                });
            }
            if here.is_empty() {
                continue;
            }
            let copy_path = format!("<explain>/{}#{copies}", f.path.display());
            let mut trial = engine.clone();
            if trial.add_policy(copy_path, module).is_ok() {
                engine = trial;
                located.extend(here);
            } else {
                // Unusual layout: report each rule name of the package as a whole.
                for rule in ["deny", SHADOW_DENY_RULE] {
                    if here.iter().any(|l| l.rule == rule) {
                        located.push(Located {
                            line: 0,
                            layer: Layer::Cluster,
                            query: format!("data.{package}.{rule}"),
                            rule,
                            ..here.swap_remove(0)
                        });
                    }
                }
            }
        }
        let json = serde_json::to_string(input).map_err(|e| engine_err(&e))?;
        engine.set_input(Value::from_json_str(&json).map_err(|e| engine_err(&e))?);
        let mut rules = Vec::new();
        for l in located {
            let v = engine
                .eval_rule(l.query.clone())
                .map_err(|e| engine_err(&e))?;
            let Value::Set(entries) = v else { continue };
            if entries.is_empty() {
                continue;
            }
            let messages = entries
                .iter()
                .map(|e| match e {
                    Value::String(s) => s.to_string(),
                    Value::Object(o) => o
                        .get(&Value::from("message"))
                        .and_then(|m| m.as_string().ok().map(|s| s.to_string()))
                        .unwrap_or_else(|| e.to_string()),
                    other => other.to_string(),
                })
                .collect();
            let effect = if l.rule == SHADOW_DENY_RULE || l.mode == PackMode::Shadow {
                PackEffect::ShadowDeny
            } else {
                PackEffect::Deny
            };
            rules.push(RuleHit {
                pack: l.pack,
                package: l.package,
                rule: l.rule.to_owned(),
                file: l.file,
                line: l.line,
                layer: l.layer,
                effect,
                messages,
            });
        }
        let layers = Layer::ALL
            .iter()
            .map(|&layer| {
                let idx: Vec<usize> = rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.layer == layer)
                    .map(|(i, _)| i)
                    .collect();
                let verdict = if idx
                    .iter()
                    .any(|&i| rules.get(i).is_some_and(|r| r.effect == PackEffect::Deny))
                {
                    "deny"
                } else if idx.is_empty() {
                    "pass"
                } else {
                    "shadow_deny"
                };
                LayerVerdict {
                    layer,
                    verdict,
                    rules: idx,
                }
            })
            .collect();
        Ok(Explanation {
            decision,
            policy_version: self.version().to_owned(),
            layers,
            rules,
        })
    }
}

/// `(line, rule name, text)` of every `deny` or `shadow_deny` rule of `source`: from a line
/// starting at column 0 with the name (followed by a space, `contains`, `[`, `:=`, `if` or
/// `{`) to the line before the next one that starts at column 0 with anything but a closing
/// bracket.
fn rule_extents(source: &str) -> Vec<(usize, &'static str, String)> {
    let lines: Vec<&str> = source.lines().collect();
    let head = |l: &str| -> Option<&'static str> {
        for name in [SHADOW_DENY_RULE, "deny"] {
            if let Some(rest) = l.strip_prefix(name) {
                if rest.starts_with([' ', '[', ':', '{', '\t']) {
                    return Some(name);
                }
            }
        }
        None
    };
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(l) = lines.get(i) {
        let Some(name) = head(l) else {
            i += 1;
            continue;
        };
        let mut end = i + 1;
        while let Some(next) = lines.get(end) {
            let starts_new = next
                .chars()
                .next()
                .is_some_and(|c| !c.is_whitespace() && !matches!(c, '}' | ']' | ')'));
            if starts_new {
                break;
            }
            end += 1;
        }
        let text = lines.get(i..end).unwrap_or_default().join("\n");
        out.push((i + 1, name, text.trim_end().to_owned()));
        i = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rule_extents() {
        let src = "package x\nimport rego.v1\n\n# c\ndeny contains \"a\" if {\n\tinput.cell.role == \"r\"\n}\n\nshadow_deny contains \"b\" if input.cell.namespace == \"p\"\ndenyx := 1\ndeny_not := 2\n";
        let got = rule_extents(src);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0, got[0].1), (5, "deny"));
        assert!(got[0].2.ends_with('}'), "{:?}", got[0].2);
        assert_eq!(Layer::of_rule(&got[0].2), Layer::Role);
        assert_eq!((got[1].0, got[1].1), (9, "shadow_deny"));
        assert_eq!(Layer::of_rule(&got[1].2), Layer::Namespace);
        assert_eq!(Layer::of_rule("deny contains 1 if true"), Layer::Cluster);
        assert_eq!(
            Layer::of_rule("deny contains 1 if input.cell.name == \"a\""),
            Layer::Cell
        );
    }
}
