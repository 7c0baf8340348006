//! Policy packs in Kubernetes: the `CellgatePolicy` (namespaced: a namespace layer) and
//! `CellgateClusterPolicy` (cluster-scoped: the cluster layer, and the base policy) custom
//! resources, their status, and the pure steps both the operator and the nodes take with them:
//! the content hash of a version, the snapshot ConfigMap that keeps an accepted version, and the
//! Rego files a pack contributes to a node's policy set ([`pack_files`]), scoped to its namespace
//! and roles.
//!
//! The operator validates every new `spec` (parse, compile, the pack's own tests, with the same
//! loader the nodes use), writes `status.conditions[Accepted]`, and keeps each accepted version
//! in a snapshot ConfigMap in the control namespace. Nodes load only the snapshot the status
//! names: an edit that fails validation never reaches a node.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::Condition;

/// The condition the operator writes on every policy.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Label on a snapshot ConfigMap: the policy's name.
pub const LABEL_POLICY: &str = "cellgate.dev/policy";
/// Label on a snapshot ConfigMap: the policy's namespace (absent for a cluster policy).
pub const LABEL_POLICY_NAMESPACE: &str = "cellgate.dev/policy-namespace";
/// Label on a snapshot ConfigMap: `CellgatePolicy` or `CellgateClusterPolicy`.
pub const LABEL_POLICY_KIND: &str = "cellgate.dev/policy-kind";
/// The key of a snapshot ConfigMap holding the accepted spec (JSON).
pub const SNAPSHOT_KEY: &str = "spec.json";
/// Finalizer that holds a deleted policy until its snapshots (in the control namespace, where an
/// owner reference from a namespaced policy cannot reach) are deleted.
pub const POLICY_FINALIZER: &str = "cellgate.dev/policy-snapshots";
/// Versions kept when `spec.historyLimit` is not set.
pub const DEFAULT_HISTORY_LIMIT: u32 = 10;
/// Most versions `spec.historyLimit` may keep (each is a ConfigMap of up to 1 MiB).
pub const MAX_HISTORY_LIMIT: u32 = 100;
/// Largest total size of a pack's modules, tests and data: a snapshot is one ConfigMap, which the
/// API server caps at 1 MiB with its metadata.
pub const MAX_PACK_BYTES: usize = 900 * 1024;
/// The pack manifest file of the policy engine (`mode: shadow`).
pub const PACK_MANIFEST: &str = "pack.yaml";
/// Length of a version hash in hex digits.
const HASH_HEX_LEN: usize = 12;

/// `enforce` (the default) or `shadow`: a shadow pack's denials are recorded, not enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PackMode {
    /// Denials are enforced.
    #[default]
    Enforce,
    /// Denials are recorded as `shadow_deny`, not enforced.
    Shadow,
}

impl PackMode {
    /// `enforce` or `shadow`.
    pub fn as_str(self) -> &'static str {
        match self {
            PackMode::Enforce => "enforce",
            PackMode::Shadow => "shadow",
        }
    }
}

macro_rules! pack_spec {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            /// Rego modules: file name (e.g. `deny_destructive.rego`; `*_test.rego` for Rego
            /// tests) to source. Errors name the file as `<policy>/<file>:line`.
            #[serde(default)]
            pub modules: BTreeMap<String, String>,
            /// A JSON object the modules read: each top-level key (a Rego identifier) becomes a
            /// rule of the generated package `cellgate.data.<c_NAME | n_NAMESPACE__NAME>` (see
            /// docs/policy.md).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(schema_with = "data_schema")]
            pub data: Option<serde_json::Value>,
            /// The pack's own tests: file name to content. `*_test.rego` files are Rego tests
            /// (every `test_*` rule must be true), as in `modules`.
            #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
            pub tests: BTreeMap<String, String>,
            /// The role layer: when set, the pack's `deny` rules apply only to cells with one of
            /// these roles.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub roles: Vec<String>,
            /// `enforce` (default) or `shadow`.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub mode: Option<PackMode>,
            /// Accepted versions kept for `kubectl cellgate policy history|rollback` (default 10,
            /// at most 100).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub history_limit: Option<u32>,
        }
    };
}

pack_spec!(
    /// A policy pack for the cells of one namespace (the namespace layer; `roles` narrows it to
    /// the role layer).
    #[derive(
        kube::CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema,
    )]
    #[kube(
        group = "cellgate.dev",
        version = "v1alpha1",
        kind = "CellgatePolicy",
        root = "CellgatePolicyResource",
        namespaced,
        status = "CellgatePolicyStatus",
        shortname = "cgpol",
        category = "cellgate",
        doc = "A Rego policy pack applying to the cells of its namespace.",
        printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
        printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.version"}"#,
        printcolumn = r#"{"name":"Hash","type":"string","jsonPath":".status.hash"}"#,
        printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".status.mode"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )]
    CellgatePolicySpec
);

pack_spec!(
    /// A policy pack for every cell of the cluster (the cluster layer; `roles` narrows it to the
    /// role layer). The base policy is one too.
    #[derive(
        kube::CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema,
    )]
    #[kube(
        group = "cellgate.dev",
        version = "v1alpha1",
        kind = "CellgateClusterPolicy",
        root = "CellgateClusterPolicyResource",
        status = "CellgatePolicyStatus",
        shortname = "cgcpol",
        category = "cellgate",
        doc = "A Rego policy pack applying to every cell of the cluster.",
        printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
        printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.version"}"#,
        printcolumn = r#"{"name":"Hash","type":"string","jsonPath":".status.hash"}"#,
        printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".status.mode"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )]
    CellgateClusterPolicySpec
);

/// The one shape both kinds share; the logic works on it.
pub type PackSpec = CellgatePolicySpec;

impl From<CellgateClusterPolicySpec> for CellgatePolicySpec {
    fn from(s: CellgateClusterPolicySpec) -> Self {
        CellgatePolicySpec {
            modules: s.modules,
            data: s.data,
            tests: s.tests,
            roles: s.roles,
            mode: s.mode,
            history_limit: s.history_limit,
        }
    }
}

impl From<CellgatePolicySpec> for CellgateClusterPolicySpec {
    fn from(s: CellgatePolicySpec) -> Self {
        CellgateClusterPolicySpec {
            modules: s.modules,
            data: s.data,
            tests: s.tests,
            roles: s.roles,
            mode: s.mode,
            history_limit: s.history_limit,
        }
    }
}

fn data_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "A JSON object the pack's modules read; each top-level key (a Rego identifier) is a rule of the package `cellgate.data.<policy>` (see docs/policy.md).",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Observed state of a policy, written by the operator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CellgatePolicyStatus {
    /// `Accepted`: `True` when the current spec is the version in force, `False` with the
    /// `file:line` that refused it (the previous version stays in force).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the operator last validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The number of the version in force (nodes load it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Content hash of the version in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Mode of the version in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<PackMode>,
    /// The ConfigMap (in the control namespace) holding the version in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Accepted versions, oldest first, at most `spec.historyLimit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<PolicyHistoryEntry>,
}

impl CellgatePolicyStatus {
    /// The condition of a type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// The history entry of a version number.
    pub fn entry(&self, version: u64) -> Option<&PolicyHistoryEntry> {
        self.history.iter().find(|e| e.version == version)
    }
}

/// One accepted version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyHistoryEntry {
    /// Sequence number, from 1.
    pub version: u64,
    /// Content hash ([`content_hash`]).
    pub hash: String,
    /// When it was accepted (RFC 3339).
    pub time: String,
    /// The field manager that last wrote the spec (from `metadata.managedFields`), e.g.
    /// `kubectl-client-side-apply`, `kubectl-cellgate`, `helm`.
    #[serde(default)]
    pub field_manager: String,
    /// The metadata.generation it was accepted at.
    #[serde(default)]
    pub generation: i64,
    /// The snapshot ConfigMap holding its content (control namespace).
    pub snapshot: String,
}

/// Which policy: the kind's scope and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    /// `None` for a `CellgateClusterPolicy`.
    pub namespace: Option<String>,
    /// The object's name.
    pub name: String,
}

impl PolicyRef {
    /// `CellgatePolicy` or `CellgateClusterPolicy`.
    pub fn kind(&self) -> &'static str {
        if self.namespace.is_some() {
            "CellgatePolicy"
        } else {
            "CellgateClusterPolicy"
        }
    }

    /// `ns/name` or `name`: the directory the pack's files are shown under in errors.
    pub fn display(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }

    /// The pack's name in a node's policy set (and the directory its files are shown under in
    /// errors): `<name>` for a cluster policy, `<namespace>.<name>` for a namespaced one.
    pub fn pack_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}.{}", self.name),
            None => self.name.clone(),
        }
    }

    /// The snapshot ConfigMap of a version, in the control namespace:
    /// `cellgate-policy-<name>-<hash>` for a cluster policy, `cellgate-policy.<namespace>.<name>-<hash>`
    /// for a namespaced one (a namespace has no dot, so the two never collide).
    pub fn snapshot_name(&self, hash: &str) -> String {
        match &self.namespace {
            Some(ns) => format!("cellgate-policy.{ns}.{}-{hash}", self.name),
            None => format!("cellgate-policy-{}-{hash}", self.name),
        }
    }

    /// Labels of its snapshots.
    pub fn snapshot_labels(&self) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            (LABEL_POLICY.to_string(), self.name.clone()),
            (LABEL_POLICY_KIND.to_string(), self.kind().to_string()),
            (
                "app.kubernetes.io/managed-by".to_string(),
                crate::crd::MANAGED_BY.to_string(),
            ),
        ]);
        if let Some(ns) = &self.namespace {
            l.insert(LABEL_POLICY_NAMESPACE.to_string(), ns.clone());
        }
        l
    }

    /// The label selector of its snapshots.
    pub fn snapshot_selector(&self) -> String {
        let mut s = format!(
            "{LABEL_POLICY}={},{LABEL_POLICY_KIND}={}",
            self.name,
            self.kind()
        );
        match &self.namespace {
            Some(ns) => {
                let _ = write!(s, ",{LABEL_POLICY_NAMESPACE}={ns}");
            }
            None => {
                let _ = write!(s, ",!{LABEL_POLICY_NAMESPACE}");
            }
        }
        s
    }

    /// A Rego identifier unique to this policy: `c_<name>` or `n_<namespace>_<name>`, with every
    /// character outside `[A-Za-z0-9_]` as `_` and a hash suffix when that mapping lost anything.
    pub fn ident(&self) -> String {
        let raw = match &self.namespace {
            Some(ns) => format!("n_{ns}__{}", self.name),
            None => format!("c_{}", self.name),
        };
        let clean: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if clean != raw {
            // `-` and `.` both became `_`: a short hash of the original keeps names apart.
            let mut h = hash_hex(raw.as_bytes());
            h.truncate(8);
            return format!("{clean}_{h}");
        }
        clean
    }
}

fn hash_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex_lower(&sha2::Sha256::digest(bytes))
}

fn hex_lower(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The content hash of a spec: first 12 hex digits of SHA-256 over its canonical JSON
/// (modules, data, tests, roles, mode; not `historyLimit`, which is not content).
pub fn content_hash(spec: &PackSpec) -> String {
    let canonical = serde_json::json!({
        "modules": spec.modules,
        "data": spec.data,
        "tests": spec.tests,
        "roles": spec.roles,
        "mode": spec.mode.unwrap_or_default(),
    });
    // serde_json's map is ordered (BTreeMap) unless preserve_order is on; sort explicitly anyway.
    let text = canonical_json(&canonical);
    let mut h = hash_hex(text.as_bytes());
    h.truncate(HASH_HEX_LEN);
    h
}

fn canonical_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        serde_json::Value::String(k.clone()),
                        canonical_json(&m[k])
                    )
                })
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        serde_json::Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(canonical_json).collect();
            format!("[{}]", parts.join(","))
        }
        other => other.to_string(),
    }
}

/// Why a pack cannot be turned into policy files (before any Rego is parsed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// A field breaks a rule; the message names it.
    #[error("{field}: {problem}")]
    Field {
        /// The field path, e.g. `spec.modules["a b.rego"]`.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// A module of a namespaced (or role-scoped) pack declares a package it may not.
    #[error("{path}:{line}: package {package} is not allowed here: {why}")]
    Package {
        /// `<policy>/<file>`.
        path: String,
        /// Line of the `package` clause.
        line: usize,
        /// The package.
        package: String,
        /// Why.
        why: String,
    },
}

/// One Rego file a pack contributes: the path shown in errors (`<policy>/<file>`), the path hashed
/// into the node's policy version, and the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackFile {
    /// `<pack>/<file>` ([`PolicyRef::pack_name`]), or `<pack>/<generated ...>` for what this
    /// module writes.
    pub path: String,
    /// `k8s/<kind>/<policy>/<file>`.
    pub relative: String,
    /// Rego source.
    pub source: String,
}

fn is_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

fn is_rego_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The `package` clause of a module: (0-based line index, package path).
fn package_clause(source: &str) -> Option<(usize, String)> {
    source.lines().enumerate().find_map(|(i, l)| {
        let t = l.trim_start();
        let rest = t.strip_prefix("package")?;
        if !rest.starts_with([' ', '\t']) {
            return None;
        }
        let pkg = rest.split('#').next().unwrap_or("").trim();
        Some((i, pkg.to_string()))
    })
}

/// Checks the spec's shape: file names, sizes, data keys, roles, the history limit.
///
/// # Errors
/// The first [`PackError::Field`].
pub fn check_spec(spec: &PackSpec) -> Result<(), PackError> {
    let field = |field: String, problem: &str| PackError::Field {
        field,
        problem: problem.to_string(),
    };
    if spec.modules.is_empty() {
        return Err(field(
            "spec.modules".into(),
            "a pack needs at least one Rego module",
        ));
    }
    let mut total = 0usize;
    for (section, map) in [("modules", &spec.modules), ("tests", &spec.tests)] {
        for (name, source) in map {
            if !is_file_name(name) || !name.ends_with(".rego") {
                return Err(field(
                    format!("spec.{section}[{name:?}]"),
                    "must be a file name ending in .rego (letters, digits, '-', '_', '.')",
                ));
            }
            if section == "tests" && !name.ends_with("_test.rego") {
                return Err(field(
                    format!("spec.tests[{name:?}]"),
                    "test modules end in _test.rego",
                ));
            }
            if section == "tests" && spec.modules.contains_key(name) {
                return Err(field(
                    format!("spec.tests[{name:?}]"),
                    "also in spec.modules",
                ));
            }
            total = total.saturating_add(source.len());
        }
    }
    if let Some(data) = &spec.data {
        let Some(obj) = data.as_object() else {
            return Err(field("spec.data".into(), "must be a JSON object"));
        };
        for k in obj.keys() {
            if !is_rego_ident(k) {
                return Err(field(
                    format!("spec.data.{k}"),
                    "top-level keys must be Rego identifiers ([A-Za-z_][A-Za-z0-9_]*)",
                ));
            }
        }
        total = total.saturating_add(data.to_string().len());
    }
    if total > MAX_PACK_BYTES {
        return Err(PackError::Field {
            field: "spec".into(),
            problem: format!(
                "{total} bytes of modules, tests and data exceed the {MAX_PACK_BYTES}-byte limit of a pack (one snapshot ConfigMap)"
            ),
        });
    }
    for (i, r) in spec.roles.iter().enumerate() {
        if r.is_empty() {
            return Err(field(format!("spec.roles[{i}]"), "must not be empty"));
        }
    }
    if spec
        .history_limit
        .is_some_and(|n| n == 0 || n > MAX_HISTORY_LIMIT)
    {
        return Err(PackError::Field {
            field: "spec.historyLimit".into(),
            problem: format!("must be between 1 and {MAX_HISTORY_LIMIT}"),
        });
    }
    Ok(())
}

/// The Rego files a pack contributes to a node's policy set, in a stable order.
///
/// A cluster pack with no `roles` contributes its modules as written (it may define any package:
/// the base policy is one). A scoped pack (a namespaced `CellgatePolicy`, or any pack with
/// `roles`) may only declare packages under `cellgate.layers.` and, in `*_test.rego` files,
/// `cellgate.tests.`; its layer packages are moved under `cellgate.scoped.<ident>` and one
/// generated layer `cellgate.layers.<ident>__<layer>` re-exports their `deny` only for cells in
/// its namespace (and with one of its roles). Line numbers are kept, so errors point into the
/// pack's own files. `spec.data` becomes the generated package `cellgate.data.<ident>`.
///
/// # Errors
/// [`PackError`] when the spec breaks [`check_spec`] or a scoped pack declares another package.
pub fn pack_files(policy: &PolicyRef, spec: &PackSpec) -> Result<Vec<PackFile>, PackError> {
    check_spec(spec)?;
    let ident = policy.ident();
    let show = policy.pack_name();
    let rel_root = format!(
        "k8s/{}/{}",
        if policy.namespace.is_some() {
            "namespaced"
        } else {
            "cluster"
        },
        show
    );
    let mut out = Vec::new();
    if spec.mode == Some(PackMode::Shadow) {
        // The pack manifest of the policy engine: the pack's `deny` entries are recorded as
        // shadow denials, not enforced.
        out.push(PackFile {
            path: format!("{show}/{PACK_MANIFEST}"),
            relative: format!("{rel_root}/{PACK_MANIFEST}"),
            source: "mode: shadow\n".into(),
        });
    }
    let scoped = policy.namespace.is_some() || !spec.roles.is_empty();
    let mut layers = std::collections::BTreeSet::new();
    for (name, source) in spec.modules.iter().chain(spec.tests.iter()) {
        let path = format!("{show}/{name}");
        let mut source = source.clone();
        if scoped {
            let Some((line, pkg)) = package_clause(&source) else {
                // No package clause: regorus refuses it with a position when the set loads.
                out.push(PackFile {
                    path,
                    relative: format!("{rel_root}/{name}"),
                    source,
                });
                continue;
            };
            let is_test = name.ends_with("_test.rego");
            if let Some(rest) = pkg.strip_prefix("cellgate.layers.") {
                let layer = rest.split('.').next().unwrap_or("").to_string();
                if !is_rego_ident(&layer) {
                    return Err(PackError::Package {
                        path,
                        line: line.saturating_add(1),
                        package: pkg,
                        why: "name the layer with a plain identifier: cellgate.layers.<name>"
                            .into(),
                    });
                }
                let new_pkg = format!("cellgate.scoped.{ident}.{rest}");
                source = replace_line(&source, line, &format!("package {new_pkg}"));
                layers.insert(layer);
            } else if is_test && pkg.starts_with("cellgate.tests.") {
                let rest = pkg.trim_start_matches("cellgate.tests.");
                let new_pkg = format!("cellgate.tests.{ident}.{rest}");
                source = replace_line(&source, line, &format!("package {new_pkg}"));
            } else {
                return Err(PackError::Package {
                    path,
                    line: line.saturating_add(1),
                    package: pkg,
                    why: if policy.namespace.is_some() {
                        "a namespaced CellgatePolicy may declare only cellgate.layers.<name> (and cellgate.tests.<name> in *_test.rego)".into()
                    } else {
                        "a pack with roles may declare only cellgate.layers.<name> (and cellgate.tests.<name> in *_test.rego)".into()
                    },
                });
            }
        }
        out.push(PackFile {
            path,
            relative: format!("{rel_root}/{name}"),
            source,
        });
    }
    for layer in &layers {
        out.push(PackFile {
            path: format!("{show}/<generated scope of layer {layer}>"),
            relative: format!("{rel_root}/<scope {layer}>"),
            source: scope_module(policy, &spec.roles, &ident, layer),
        });
    }
    if let Some(obj) = spec.data.as_ref().and_then(|d| d.as_object()) {
        if !obj.is_empty() {
            let mut m = format!("# Generated from spec.data of {} {show}.\npackage cellgate.data.{ident}\n\nimport rego.v1\n", policy.kind());
            for (k, v) in obj {
                let _ = write!(m, "\n{k} := {v}\n");
            }
            out.push(PackFile {
                path: format!("{show}/<generated from spec.data>"),
                relative: format!("{rel_root}/<data>"),
                source: m,
            });
        }
    }
    Ok(out)
}

fn replace_line(source: &str, index: usize, with: &str) -> String {
    let mut out = String::with_capacity(source.len().saturating_add(64));
    for (i, l) in source.split_inclusive('\n').enumerate() {
        if i == index {
            out.push_str(with);
            if l.ends_with('\n') {
                out.push('\n');
            }
        } else {
            out.push_str(l);
        }
    }
    out
}

fn scope_module(policy: &PolicyRef, roles: &[String], ident: &str, layer: &str) -> String {
    let mut m = format!(
        "# Generated: layer {layer} of {} {} applies only where its scope holds.\npackage cellgate.layers.{ident}__{layer}\n\nimport rego.v1\n\ndeny := data.cellgate.scoped.{ident}.{layer}.deny if {{\n",
        policy.kind(),
        policy.display()
    );
    if let Some(ns) = &policy.namespace {
        let _ = writeln!(
            m,
            "\tinput.cell.namespace == {}",
            serde_json::Value::String(ns.clone())
        );
    }
    if !roles.is_empty() {
        let set: Vec<String> = roles
            .iter()
            .map(|r| serde_json::Value::String(r.clone()).to_string())
            .collect();
        let _ = writeln!(m, "\tinput.cell.role in {{{}}}", set.join(", "));
    }
    let _ = writeln!(m, "}}");
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::CustomResourceExt;

    fn spec(modules: &[(&str, &str)]) -> PackSpec {
        PackSpec {
            modules: modules
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn crds_have_the_scopes() {
        let ns = CellgatePolicyResource::crd();
        assert_eq!(ns.spec.names.kind, "CellgatePolicy");
        assert_eq!(ns.spec.scope, "Namespaced");
        let cl = CellgateClusterPolicyResource::crd();
        assert_eq!(cl.spec.names.kind, "CellgateClusterPolicy");
        assert_eq!(cl.spec.scope, "Cluster");
        assert_eq!(cl.spec.names.plural, "cellgateclusterpolicies");
    }

    #[test]
    fn hash_ignores_history_limit_and_changes_with_content() {
        let a = spec(&[("a.rego", "package x")]);
        let mut b = a.clone();
        b.history_limit = Some(3);
        assert_eq!(content_hash(&a), content_hash(&b));
        b.mode = Some(PackMode::Shadow);
        assert_ne!(content_hash(&a), content_hash(&b));
        assert_eq!(content_hash(&a).len(), 12);
    }

    #[test]
    fn names_and_selectors() {
        let c = PolicyRef {
            namespace: None,
            name: "base".into(),
        };
        assert_eq!(c.snapshot_name("abc"), "cellgate-policy-base-abc");
        assert!(c
            .snapshot_selector()
            .ends_with(",!cellgate.dev/policy-namespace"));
        let n = PolicyRef {
            namespace: Some("agents".into()),
            name: "no-delete".into(),
        };
        assert_eq!(
            n.snapshot_name("abc"),
            "cellgate-policy.agents.no-delete-abc"
        );
        assert!(
            n.ident().starts_with("n_agents__no_delete_"),
            "{}",
            n.ident()
        );
        assert_ne!(
            n.ident(),
            PolicyRef {
                namespace: Some("agents".into()),
                name: "no.delete".into()
            }
            .ident()
        );
    }

    #[test]
    fn namespaced_pack_is_scoped_and_keeps_lines() {
        let p = PolicyRef {
            namespace: Some("agents".into()),
            name: "nodel".into(),
        };
        let s = PackSpec {
            roles: vec!["readonly".into()],
            ..spec(&[(
                "nodel.rego",
                "# c\npackage cellgate.layers.nodel\nimport rego.v1\ndeny contains \"x\" if true\n",
            )])
        };
        let files = pack_files(&p, &s).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].path, "agents.nodel/nodel.rego");
        assert_eq!(
            files[0].source.lines().nth(1),
            Some("package cellgate.scoped.n_agents__nodel.nodel")
        );
        assert!(files[1]
            .source
            .contains("input.cell.namespace == \"agents\""));
        assert!(files[1]
            .source
            .contains("input.cell.role in {\"readonly\"}"));
        assert!(files[1]
            .source
            .contains("package cellgate.layers.n_agents__nodel__nodel"));
    }

    #[test]
    fn namespaced_pack_may_not_touch_the_base() {
        let p = PolicyRef {
            namespace: Some("agents".into()),
            name: "evil".into(),
        };
        let err = pack_files(
            &p,
            &spec(&[("e.rego", "package cellgate.authz\ndecision := {}\n")]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string().split(": package").next(),
            Some("agents.evil/e.rego:1")
        );
    }

    #[test]
    fn cluster_pack_is_as_written_and_data_is_a_package() {
        let p = PolicyRef {
            namespace: None,
            name: "base".into(),
        };
        let s = PackSpec {
            data: Some(serde_json::json!({"hosts": ["a"], "n": 1})),
            ..spec(&[("cellgate.rego", "package cellgate.authz\n")])
        };
        let files = pack_files(&p, &s).unwrap();
        assert_eq!(files[0].source, "package cellgate.authz\n");
        assert!(files[1].source.contains("package cellgate.data.c_base"));
        assert!(files[1].source.contains("hosts := [\"a\"]"));
    }

    #[test]
    fn shape_errors_name_the_field() {
        let p = PolicyRef {
            namespace: None,
            name: "x".into(),
        };
        let err = pack_files(&p, &spec(&[("../a.rego", "package x")])).unwrap_err();
        assert!(
            err.to_string().starts_with("spec.modules[\"../a.rego\"]"),
            "{err}"
        );
        let s = PackSpec {
            data: Some(serde_json::json!({"a-b": 1})),
            ..spec(&[("a.rego", "package x")])
        };
        assert!(pack_files(&p, &s)
            .unwrap_err()
            .to_string()
            .starts_with("spec.data.a-b"));
        let s = PackSpec {
            history_limit: Some(0),
            ..spec(&[("a.rego", "package x")])
        };
        assert!(pack_files(&p, &s).is_err());
    }
}
