//! Packs: names, versions and modes of a set; a pack in shadow mode and the `shadow_deny`
//! convention record what they would deny without denying; a broken manifest refuses the set.

use std::path::{Path, PathBuf};

use cellgate_api::policy::InputDoc;
use cellgate_policy::cases::{default_input, merge};
use cellgate_policy::{PackEffect, PackMode, PackVerdict, PolicyError, PolicySet};
use serde_json::json;

fn policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// A policy directory with the shipped base and the deny-destructive pack, plus `extra` files
/// (path relative to the directory, content).
fn tree(extra: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&policies_dir().join("base"), &dir.path().join("base"));
    copy_dir(
        &policies_dir().join("packs/deny-destructive"),
        &dir.path().join("packs/deny-destructive"),
    );
    for (path, body) in extra {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    dir
}

fn input(over: serde_json::Value) -> InputDoc {
    let mut i = default_input();
    merge(&mut i, &over);
    serde_json::from_value(i).unwrap()
}

fn readonly_delete() -> InputDoc {
    input(json!({"cell": {"role": "readonly"},
                 "request": {"host": "a.example.com", "method": "DELETE", "path": "/items/1"}}))
}

#[test]
fn the_shipped_set_lists_its_packs() {
    let set = PolicySet::load(&policies_dir(), &[]).unwrap();
    let packs: Vec<(&str, PackMode, &[String])> = set
        .packs()
        .iter()
        .map(|p| (p.name.as_str(), p.mode, p.layers.as_slice()))
        .collect();
    assert_eq!(
        packs,
        vec![
            ("base", PackMode::Enforce, &[][..]),
            (
                "deny-destructive",
                PackMode::Enforce,
                &["deny_destructive".to_string()][..]
            ),
            (
                "llm-limits",
                PackMode::Enforce,
                &["llm_limits".to_string()][..]
            ),
        ]
    );
    for p in set.packs() {
        assert_eq!(p.version.len(), 12, "{p:?}");
        assert!(p.version.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    // The same pack read from another place has the same version.
    let copy = tree(&[]);
    let other = PolicySet::load(copy.path(), &[]).unwrap();
    assert_eq!(other.packs()[1].version, set.packs()[1].version);
}

#[test]
fn an_enforced_pack_denies_and_is_named() {
    let dir = tree(&[]);
    let set = PolicySet::load(dir.path(), &[]).unwrap();
    let d = set.decide(&readonly_delete()).unwrap();
    assert_eq!(
        (d.decision.outcome.as_str(), d.decision.reason.as_str()),
        ("deny", "destructive_method")
    );
    assert_eq!(d.decision.capability.as_deref(), Some("example"));
    let pack = &set.packs()[1];
    assert_eq!(
        d.packs,
        vec![PackVerdict {
            name: "deny-destructive".into(),
            version: pack.version.clone(),
            effect: PackEffect::Deny,
        }]
    );
    // The common path names no pack.
    let ok = set.decide(&input(json!({}))).unwrap();
    assert!(ok.decision.allow);
    assert!(ok.packs.is_empty());
}

#[test]
fn a_shadow_pack_records_without_denying() {
    let dir = tree(&[(
        "packs/deny-destructive/pack.yaml",
        "mode: shadow\ndescription: trying it out\n",
    )]);
    // Its own tests (written for enforcement) still pass: tests run as if every pack enforced.
    let set = PolicySet::load(dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(set.tests_run() >= 6);
    assert_eq!(set.packs()[1].mode, PackMode::Shadow);
    let d = set.decide(&readonly_delete()).unwrap();
    assert!(d.decision.allow);
    assert_eq!(d.decision.outcome, "shadow_deny");
    assert_eq!(d.decision.reason, "destructive_method");
    assert_eq!(d.decision.capability.as_deref(), Some("example"));
    assert_eq!(
        d.decision.reasons,
        ["cells with role readonly may not send DELETE requests"]
    );
    assert_eq!(d.packs.len(), 1);
    assert_eq!(
        (d.packs[0].name.as_str(), d.packs[0].effect),
        ("deny-destructive", PackEffect::ShadowDeny)
    );
    // The manifest is part of the pack's version and of the set's.
    let enforced = PolicySet::load(tree(&[]).path(), &[]).unwrap();
    assert_ne!(enforced.packs()[1].version, set.packs()[1].version);
    assert_ne!(enforced.version(), set.version());
}

const SHADOW_RULES: &str = r#"package cellgate.layers.no_put

import rego.v1

shadow_deny contains {"reason": "put_discouraged", "message": "PUT would be refused"} if {
	input.request.method == "PUT"
}

deny contains "PATCH is refused" if input.request.method == "PATCH"
"#;

#[test]
fn shadow_deny_rules_record_and_deny_rules_still_deny() {
    let dir = tree(&[("packs/no-put/no_put.rego", SHADOW_RULES)]);
    let set = PolicySet::load(dir.path(), &[]).unwrap();
    let put = input(json!({"request": {"host": "a.example.com", "method": "PUT"}}));
    let d = set.decide(&put).unwrap();
    assert_eq!(
        (
            d.decision.allow,
            d.decision.outcome.as_str(),
            d.decision.reason.as_str()
        ),
        (true, "shadow_deny", "put_discouraged")
    );
    assert_eq!(d.packs[0].effect, PackEffect::ShadowDeny);
    assert_eq!(d.packs[0].name, "no-put");
    let patch = input(json!({"request": {"host": "a.example.com", "method": "PATCH"}}));
    let d = set.decide(&patch).unwrap();
    assert_eq!(
        (d.decision.outcome.as_str(), d.decision.reason.as_str()),
        ("deny", "policy_denied")
    );
    // Deny wins over a shadow denial; both packs are named.
    let both = input(json!({"cell": {"role": "readonly"},
        "request": {"host": "a.example.com", "method": "PUT"}}));
    let with_delete = tree(&[(
        "packs/no-put/no_put.rego",
        &SHADOW_RULES.replace("== \"PUT\"", "in {\"PUT\", \"DELETE\"}"),
    )]);
    let set = PolicySet::load(with_delete.path(), &[]).unwrap();
    let mut del = both.clone();
    del.request.method = Some("DELETE".into());
    let d = set.decide(&del).unwrap();
    assert_eq!(d.decision.outcome, "deny");
    let effects: Vec<(&str, PackEffect)> = d
        .packs
        .iter()
        .map(|p| (p.name.as_str(), p.effect))
        .collect();
    assert_eq!(
        effects,
        vec![
            ("deny-destructive", PackEffect::Deny),
            ("no-put", PackEffect::ShadowDeny)
        ]
    );
}

#[test]
fn a_broken_manifest_or_mixed_modes_refuse_the_set() {
    let dir = tree(&[("packs/deny-destructive/pack.yaml", "mode: audit\n")]);
    let e = PolicySet::load(dir.path(), &[]).unwrap_err();
    assert!(matches!(e, PolicyError::Manifest { .. }), "{e}");
    assert!(e.to_string().contains("pack.yaml"), "{e}");
    // The same layer package in an enforce pack and a shadow pack cannot be told apart.
    let dir = tree(&[
        ("packs/more/pack.yaml", "mode: shadow\n"),
        (
            "packs/more/more.rego",
            "package cellgate.layers.deny_destructive\nimport rego.v1\ndeny contains \"x\" if input.request.method == \"PUT\"\n",
        ),
    ]);
    let e = PolicySet::load(dir.path(), &[]).unwrap_err();
    assert!(matches!(e, PolicyError::LayerModeConflict { .. }), "{e}");
}

#[test]
fn explain_names_the_rule_and_its_layer() {
    let dir = tree(&[("packs/no-put/no_put.rego", SHADOW_RULES)]);
    let set = PolicySet::load(dir.path(), &[]).unwrap();
    let mut both = readonly_delete();
    both.cell.namespace = "prod".into();
    both.request.path = Some("/admin/x".into());
    let x = set.explain(&both).unwrap();
    assert_eq!(x.decision.outcome, "deny");
    assert_eq!(x.decision.capability.as_deref(), Some("example"));
    let verdicts: Vec<(&str, &str)> = x
        .layers
        .iter()
        .map(|l| (l.layer.as_str(), l.verdict))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            ("cluster", "pass"),
            ("namespace", "deny"),
            ("role", "deny"),
            ("cell", "pass")
        ]
    );
    let role = &x.rules[x.layers[2].rules[0]];
    assert_eq!(role.pack, "deny-destructive");
    assert_eq!(role.rule, "deny");
    assert!(role.file.ends_with("deny_destructive.rego"), "{role:?}");
    let src = std::fs::read_to_string(&role.file).unwrap();
    let head = src.lines().nth(role.line - 1).unwrap();
    assert!(
        head.starts_with("deny contains {\"reason\": \"destructive_method\""),
        "{head}"
    );
    assert_eq!(
        role.messages,
        ["cells with role readonly may not send DELETE requests"]
    );

    // A shadow rule is a shadow verdict of its layer (cluster: no condition on the cell).
    let put = input(json!({"request": {"host": "a.example.com", "method": "PUT"}}));
    let x = set.explain(&put).unwrap();
    assert_eq!(x.decision.outcome, "shadow_deny");
    assert_eq!(x.layers[0].verdict, "shadow_deny");
    assert_eq!(x.rules.len(), 1);
    assert_eq!(x.rules[0].line, 5);
    assert_eq!(x.rules[0].effect, PackEffect::ShadowDeny);
    // Nothing fired: every layer passes.
    let x = set.explain(&input(json!({}))).unwrap();
    assert!(x.rules.is_empty());
    assert!(x.layers.iter().all(|l| l.verdict == "pass"));
}
