//! The committed CRD (`deploy/crds/`) is what the Rust types generate. Regenerate with
//! `cellgate crd > deploy/crds/agentcells.cellgate.dev.yaml` or `CELLGATE_UPDATE_GOLDEN=1 cargo test`.

use std::path::PathBuf;

#[test]
fn committed_crd_matches_the_types() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/crds/agentcells.cellgate.dev.yaml");
    let generated = cellgate_api::crd::crds_yaml().expect("crd yaml");
    if std::env::var_os("CELLGATE_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &generated).expect("write crd");
    }
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (generate it with `cellgate crd`)", path.display()));
    assert!(
        committed == generated,
        "{} drifted from the Rust types: run `cellgate crd > deploy/crds/agentcells.cellgate.dev.yaml`",
        path.display()
    );
}

#[test]
fn crd_schema_is_structural_where_kubernetes_requires_it() {
    // The API server refuses a CRD whose schema has a property without a type (unless it preserves
    // unknown fields): walk the generated schema and check every node.
    for crd in cellgate_api::crd::crds() {
        check_structural(&crd);
    }
}

fn check_structural(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) {
    let schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema"),
    )
    .expect("json");
    fn walk(path: &str, v: &serde_json::Value, problems: &mut Vec<String>) {
        let preserve =
            v.get("x-kubernetes-preserve-unknown-fields") == Some(&serde_json::json!(true));
        if v.get("type").is_none() && !preserve {
            problems.push(format!("{path}: no type"));
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if v.get(key).is_some() && v.get("type").is_none() {
                problems.push(format!("{path}: {key} without a type"));
            }
        }
        if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
            for (k, p) in props {
                walk(&format!("{path}.{k}"), p, problems);
            }
        }
        if let Some(items) = v.get("items") {
            walk(&format!("{path}[]"), items, problems);
        }
    }
    let mut problems = Vec::new();
    walk("", &schema, &mut problems);
    // The root has `type: object` too.
    assert!(problems.is_empty(), "{problems:#?}");
    if crd.spec.names.kind != "AgentCell" {
        return;
    }
    // Capability names are list-map keys, so they must be required.
    let caps = &schema["properties"]["spec"]["properties"]["capabilities"];
    assert_eq!(
        caps["x-kubernetes-list-map-keys"],
        serde_json::json!(["name"])
    );
    assert!(caps["items"]["required"]
        .as_array()
        .is_some_and(|r| r.contains(&serde_json::json!("name"))));
}
