//! `cellgate policy test` and `cellgate explain`, run as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cellgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

const CASES: &str = r#"- name: readonly delete is refused
  input:
    cell: {role: readonly}
    request: {host: a.example.com, method: DELETE, path: /items/1}
  expect: {allow: false, outcome: deny, capability: example, reason: destructive_method}
"#;

const WRONG: &str = r#"- name: a wrong expectation
  input:
    cell: {role: readonly}
    request: {host: a.example.com, method: DELETE, path: /items/1}
  expect: {allow: true, outcome: allow, capability: example, reason: allowed}
"#;

#[test]
fn policy_test_passes_on_the_shipped_policies() {
    let o = cellgate(&["policy", "test", policies().to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains(" 0 failed"), "{t}");
    assert!(t.contains("pass    rego  "), "{t}");
    assert!(t.contains("pass    case  tests/capabilities.yaml: "), "{t}");
    assert!(t.contains("deny-destructive@"), "{t}");
}

#[test]
fn policy_test_of_a_pack_reports_each_failure_with_expected_and_got() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("deny-destructive");
    copy_dir(&policies().join("packs/deny-destructive"), &pack);
    std::fs::create_dir_all(pack.join("tests")).unwrap();
    std::fs::write(pack.join("tests/cases.yaml"), CASES).unwrap();
    // A pack alone is tested with the built-in base policy.
    let o = cellgate(&["policy", "test", pack.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("pass    case  tests/cases.yaml: readonly delete is refused"));

    std::fs::write(pack.join("tests/wrong.yaml"), WRONG).unwrap();
    let o = cellgate(&["policy", "test", pack.to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("FAIL    case  tests/wrong.yaml: a wrong expectation"),
        "{t}"
    );
    assert!(
        t.contains("expected: allow (allowed) capability=example reason=allowed"),
        "{t}"
    );
    assert!(
        t.contains("got:      deny (refused) capability=example reason=destructive_method"),
        "{t}"
    );
    assert!(t.contains("1 failed"), "{t}");

    // A failing Rego test is a failed row too, and --json says the same.
    std::fs::remove_file(pack.join("tests/wrong.yaml")).unwrap();
    let tests = pack.join("deny_destructive_test.rego");
    let src = std::fs::read_to_string(&tests).unwrap();
    std::fs::write(
        &tests,
        src.replace(
            "d.reason == \"destructive_method\"",
            "d.reason == \"something_else\"",
        ),
    )
    .unwrap();
    let o = cellgate(&["policy", "test", "--json", pack.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["failed"], 1, "{j}");
    let failed: Vec<&serde_json::Value> = j["rego"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["failure"].is_null())
        .collect();
    assert_eq!(failed.len(), 1, "{j}");
    assert_eq!(failed[0]["name"], "test_readonly_delete_denied");
}

#[test]
fn policy_test_fails_on_a_pack_that_does_not_parse() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.rego"),
        "package cellgate.layers.bad\nimport rego.v1\ndeny contains x if {\n",
    )
    .unwrap();
    let o = cellgate(&["policy", "test", dir.path().to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("FAIL    load  "), "{t}");
    assert!(t.contains("bad.rego:"), "{t}");
}

const CELL: &str = "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {name: demo, namespace: prod}\nspec:\n  role: readonly\n  capabilities:\n    - name: api\n      destinations: [{host: api.example.com}]\n      http: {methods: [GET, DELETE], paths: [\"/v1/**\"]}\n";

#[test]
fn explain_shows_the_capability_and_each_layer() {
    let dir = tempfile::tempdir().unwrap();
    let cell = dir.path().join("cell.yaml");
    std::fs::write(&cell, CELL).unwrap();
    let packs = policies().join("packs");
    let (cell, packs) = (cell.to_str().unwrap(), packs.to_str().unwrap());
    let o = cellgate(&[
        "explain",
        "-f",
        cell,
        "--policies",
        packs,
        "DELETE",
        "https://api.example.com/v1/items/1",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("decision    deny (destructive_method)"), "{t}");
    assert!(
        t.contains("capability  api (enforce) would grant; a layer refuses"),
        "{t}"
    );
    assert!(t.contains("cluster     pass"), "{t}");
    assert!(t.contains("namespace   pass"), "{t}");
    assert!(
        t.contains("role        deny         deny ") && t.contains("deny_destructive.rego:15"),
        "{t}"
    );

    let o = cellgate(&[
        "explain",
        "--json",
        "-f",
        cell,
        "--policies",
        packs,
        "POST",
        "https://api.example.com/v1/items",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let d = &j["explanation"]["decision"];
    assert_eq!(d["reason"], "http_rule_mismatch", "{j}");
    assert_eq!(d["capability"], "api", "{j}");
    assert_eq!(j["explanation"]["layers"].as_array().unwrap().len(), 4);
    assert!(j["packs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "deny-destructive" && p["mode"] == "enforce"));

    // No capability reaches the host: none named.
    let o = cellgate(&["explain", "-f", cell, "GET", "https://evil.test/"]);
    assert!(text(&o).contains("capability  none reaches this destination"));
    // A URL the node cannot decide on is a usage error.
    let o = cellgate(&["explain", "-f", cell, "GET", "ftp://x/"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
