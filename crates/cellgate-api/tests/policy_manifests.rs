//! The base policy (`policies/base`) and the starter packs (`policies/packs/*`) as the
//! `CellgateClusterPolicy` resources the install applies: `deploy/policies/` (kustomize: the base
//! policy in the base, the packs under `packs/`, added by the component
//! `deploy/components/policy-packs`) and
//! `charts/cellgate/files/policies/` (Helm: `policies.base`, `policies.packs`; the chart cannot read
//! outside itself, so it carries a copy). Each is generated from the directory here and compared;
//! regenerate with `CELLGATE_UPDATE_GOLDEN=1 cargo test -p cellgate-api --test policy_manifests`.
//! Local mode reads the same files with `--policies DIR`.

use std::path::{Path, PathBuf};

use cellgate_api::policy_pack::{check_spec, CellgateClusterPolicyResource, PackMode, PackSpec};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The sources: (resource name, directory under `policies/`).
fn sources() -> Vec<(String, String)> {
    let mut out = vec![("base".to_string(), "base".to_string())];
    let mut packs: Vec<String> = std::fs::read_dir(workspace().join("policies/packs"))
        .expect("policies/packs")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    packs.sort();
    out.extend(packs.into_iter().map(|p| (p.clone(), format!("packs/{p}"))));
    out
}

/// A YAML block literal of `text` at `indent` spaces (the caller checks it parses back).
fn block(text: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let chomp = if text.ends_with("\n\n") {
        "+"
    } else if text.ends_with('\n') {
        ""
    } else {
        "-"
    };
    let first_indented = text.starts_with([' ', '\t', '\n']);
    let mut out = format!("|{}{chomp}\n", if first_indented { "2" } else { "" });
    for line in text.strip_suffix('\n').unwrap_or(text).split('\n') {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str(&pad);
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The spec a policy directory makes: `*_test.rego` are tests, other `*.rego` modules, and
/// `pack.yaml`'s `mode`.
fn spec_of(dir: &Path) -> PackSpec {
    let mut spec = PackSpec::default();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        if name == "pack.yaml" {
            let v: serde_yaml::Value =
                serde_yaml::from_str(&std::fs::read_to_string(&p).expect("pack.yaml"))
                    .expect("pack.yaml parses");
            spec.mode = match v.get("mode").and_then(|m| m.as_str()) {
                Some("shadow") => Some(PackMode::Shadow),
                Some("enforce") | None => None,
                Some(other) => panic!("{}: mode {other:?}", p.display()),
            };
            continue;
        }
        if !name.ends_with(".rego") {
            continue;
        }
        let text = std::fs::read_to_string(&p).expect("rego");
        if name.ends_with("_test.rego") {
            spec.tests.insert(name, text);
        } else {
            spec.modules.insert(name, text);
        }
    }
    spec
}

/// The manifest of one policy.
fn manifest(name: &str, dir: &str, spec: &PackSpec) -> String {
    let mut out = format!(
        "# Generated from policies/{dir} by crates/cellgate-api/tests/policy_manifests.rs; do not edit.\n\
         # Regenerate: CELLGATE_UPDATE_GOLDEN=1 cargo test -p cellgate-api --test policy_manifests\n\
         apiVersion: cellgate.dev/v1alpha1\n\
         kind: CellgateClusterPolicy\n\
         metadata:\n  name: {name}\n  labels:\n    app.kubernetes.io/part-of: cellgate\n\
         spec:\n"
    );
    for (section, files) in [("modules", &spec.modules), ("tests", &spec.tests)] {
        if files.is_empty() {
            continue;
        }
        out.push_str(&format!("  {section}:\n"));
        for (file, text) in files {
            out.push_str(&format!("    {file}: {}", block(text, 6)));
        }
    }
    if let Some(mode) = spec.mode {
        out.push_str(&format!("  mode: {}\n", mode.as_str()));
    }
    out
}

fn check(path: &Path, want: &str, drift: &mut Vec<String>) {
    if std::env::var_os("CELLGATE_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(path, want).expect("write");
    }
    match std::fs::read_to_string(path) {
        Ok(got) if got == want => {}
        Ok(_) => drift.push(format!("{} differs", path.display())),
        Err(e) => drift.push(format!("{}: {e}", path.display())),
    }
}

#[test]
fn installed_policies_are_generated_from_the_policy_directory() {
    let mut drift = Vec::new();
    let mut names = Vec::new();
    for (name, dir) in sources() {
        let spec = spec_of(&workspace().join("policies").join(&dir));
        check_spec(&spec).unwrap_or_else(|e| panic!("policies/{dir}: {e}"));
        let text = manifest(&name, &dir, &spec);
        // What the API server would read: the same spec, byte for byte.
        let parsed: CellgateClusterPolicyResource =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
        assert_eq!(
            PackSpec::from(parsed.spec),
            spec,
            "{name} does not parse back"
        );
        assert_eq!(parsed.metadata.name.as_deref(), Some(name.as_str()));
        let kustomize = if name == "base" {
            "deploy/policies"
        } else {
            "deploy/policies/packs"
        };
        for out in [kustomize, "charts/cellgate/files/policies"] {
            check(
                &workspace().join(out).join(format!("{name}.yaml")),
                &text,
                &mut drift,
            );
        }
        names.push(name);
    }
    assert!(
        drift.is_empty(),
        "{}\nregenerate: CELLGATE_UPDATE_GOLDEN=1 cargo test -p cellgate-api --test policy_manifests",
        drift.join("\n")
    );
    // Nothing stale: every generated file has a source.
    for out in [
        "deploy/policies",
        "deploy/policies/packs",
        "charts/cellgate/files/policies",
    ] {
        for e in std::fs::read_dir(workspace().join(out)).expect("dir") {
            let e = e.expect("entry");
            let f = e.file_name().to_string_lossy().into_owned();
            if f == "kustomization.yaml" || e.path().is_dir() {
                continue;
            }
            let stem = f.strip_suffix(".yaml").unwrap_or(&f);
            assert!(
                names.iter().any(|n| n == stem),
                "{out}/{f} has no source under policies/"
            );
        }
    }
}

#[test]
fn chart_and_kustomize_list_every_pack() {
    let packs: Vec<String> = sources()
        .into_iter()
        .filter(|(n, _)| n != "base")
        .map(|(n, _)| n)
        .collect();
    // The chart's schema accepts exactly the packs it carries.
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace().join("charts/cellgate/values.schema.json"))
            .expect("schema"),
    )
    .expect("schema json");
    let enum_: Vec<String> = schema["properties"]["policies"]["properties"]["packs"]["items"]
        ["enum"]
        .as_array()
        .expect("policies.packs.items.enum")
        .iter()
        .map(|v| v.as_str().expect("string").to_owned())
        .collect();
    assert_eq!(enum_, packs, "values.schema.json policies.packs enum");
    // kustomize: the base policy in the base, every pack in the component.
    let base: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(workspace().join("deploy/kustomization.yaml")).expect("base"),
    )
    .expect("yaml");
    let resources: Vec<&str> = base["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(resources.contains(&"policies/base.yaml"), "{resources:?}");
    let resources_of = |path: &str| -> Vec<String> {
        let v: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(workspace().join(path)).expect(path))
                .expect("yaml");
        v["resources"]
            .as_sequence()
            .expect("resources")
            .iter()
            .filter_map(|v| v.as_str())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        resources_of("deploy/components/policy-packs/kustomization.yaml"),
        ["../../policies/packs"]
    );
    let want: Vec<String> = packs.iter().map(|p| format!("{p}.yaml")).collect();
    assert_eq!(
        resources_of("deploy/policies/packs/kustomization.yaml"),
        want,
        "deploy/policies/packs/kustomization.yaml resources"
    );
}
