//! The Kubernetes side of `AgentCell`: the custom resource ([`AgentCellResource`], derived from
//! [`AgentCellSpec`] by kube), its status, the well-known names the operator, the nodes and the
//! kubectl plugin agree on, and the CRD YAML that `cellgate crd` prints and `deploy/crds/` holds.
//!
//! Objects read back from the API server are parsed leniently (an unknown field from a newer
//! version never breaks a reconcile); [`AgentCellResource::to_manifest`] then hands them to the
//! same validation and normalization as the file path ([`AgentCell::to_model`]).

use std::collections::BTreeMap;

use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::manifest::{AgentCell, AgentCellSpec, ManifestError, ObjectMeta, API_VERSION, KIND};
use crate::model::Cell;

pub use crate::manifest::AgentCellResource;

/// The API group.
pub const GROUP: &str = "cellgate.dev";
/// Label put on every object the operator creates for a cell, and on the cell's pod: the cell name.
pub const LABEL_CELL: &str = "cellgate.dev/cell";
/// `app.kubernetes.io/managed-by` value of the operator's objects.
pub const MANAGED_BY: &str = "cellgate-operator";
/// Field manager of the operator's server-side applies.
pub const OPERATOR_FIELD_MANAGER: &str = "cellgate-operator";
/// Field manager of the node's status writes (`status.enforcement`).
pub const NODE_FIELD_MANAGER: &str = "cellgate-node";
/// Field manager of the node's enforcement self-check: it owns the `Governed` entry of
/// `status.conditions` (a list-map keyed by `type`) and nothing else, so its applies never remove
/// the operator's conditions, `status.enforcement` or `status.usage`.
pub const SELF_CHECK_FIELD_MANAGER: &str = "cellgate-node-selfcheck";
/// Condition type written by the node hosting the cell's pod: a probe from inside the pod's
/// network namespace to a must-deny destination crossed the tagger and was refused by the node
/// (`True`), showed the cell's traffic is not governed (`False`), or could not run (`Unknown`).
pub const CONDITION_GOVERNED: &str = "Governed";
/// Field manager of the kubectl plugin's edits (`revoke`, `suspend`, `resume`).
pub const KUBECTL_FIELD_MANAGER: &str = "kubectl-cellgate";
/// Finalizer that holds a deleted cell until its token is revoked.
pub const FINALIZER: &str = "cellgate.dev/token-revocation";
/// ConfigMap (in the control plane's namespace) listing revoked token ids: key = `jti`, value = the
/// token's expiry (RFC 3339). Nodes watch it; the operator prunes entries past their expiry.
pub const REVOCATIONS_CONFIGMAP: &str = "cellgate-revocations";
/// The ConfigMap (in the control namespace) holding the cluster's lockdowns: key
/// [`LOCKDOWN_KEY_CLUSTER`] for every cell, `namespace.NS` ([`LOCKDOWN_KEY_NAMESPACE`]) for one
/// namespace's; each value is JSON `{"reason","since","by"}`.
pub const LOCKDOWN_CONFIGMAP: &str = "cellgate-lockdown";
/// The lockdown key of a cluster-wide lockdown.
pub const LOCKDOWN_KEY_CLUSTER: &str = "cluster";
/// The prefix of a namespace's lockdown key.
pub const LOCKDOWN_KEY_NAMESPACE: &str = "namespace.";
/// Key of the token in the cell's token Secret; the tagger reads `/var/run/cellgate/token/token`.
pub const TOKEN_SECRET_KEY: &str = "token";
/// Annotation on the token Secret: the token's id (`jti`).
pub const ANNOTATION_TOKEN_ID: &str = "cellgate.dev/token-id";
/// Annotation on the token Secret: the token's expiry (RFC 3339).
pub const ANNOTATION_TOKEN_EXPIRY: &str = "cellgate.dev/token-expiry";
/// Key of the CA certificate in the cell's trust-bundle ConfigMap.
pub const CA_BUNDLE_KEY: &str = "ca.crt";
/// The header that carries the node's admin token to `/audit` on its admin port (sent by
/// `kubectl cellgate audit`, checked by the node).
pub const ADMIN_TOKEN_HEADER: &str = "x-cellgate-admin-token";

/// Name of the cell's ServiceAccount.
pub fn service_account_name(cell: &str) -> String {
    format!("cellgate-{cell}")
}

/// Name of the Secret holding the cell's token (mounted by the tagger only).
pub fn token_secret_name(cell: &str) -> String {
    format!("cellgate-{cell}-token")
}

/// Name of the ConfigMap holding the CA bundle mounted into the agent's containers.
pub fn ca_bundle_name(cell: &str) -> String {
    format!("cellgate-{cell}-ca")
}

/// Name of the cell's NetworkPolicy.
pub fn network_policy_name(cell: &str) -> String {
    format!("cellgate-{cell}")
}

/// Name of the cell's pod: the cell's own name.
pub fn pod_name(cell: &str) -> String {
    cell.to_string()
}

/// Observed state of an `AgentCell`, written by the operator (and `enforcement`, `usage` and the
/// `Governed` condition by the node).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentCellStatus {
    /// `Pending`, `Running`, `Suspended`, `Invalid`, `Failed` or `Terminating`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `TokenIssued`, `PodReady` and `Enforced` (the operator's), and `Governed` (the node's
    /// enforcement self-check), each with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the operator last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of capabilities in the spec (shown by `kubectl get agentcells`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<i64>,
    /// Id (`jti`) of the token currently in the cell's Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// When the current token expires (RFC 3339); it is rotated before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expiry: Option<String>,
    /// The node the cell's pod runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The cell's pod address.
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// A human-readable explanation of the phase (e.g. why a spec is invalid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Written by the node proxy that hosts the cell's pod once it enforces a generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// Budget usage, written by the node proxy that hosts the cell's pod (at most every few
    /// seconds while it changes); a node that takes the cell over starts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageStatus>,
}

/// `status.usage`: what the cell's budgets have used, as its node's ledger counts it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageStatus {
    /// The node that counted.
    pub node: String,
    /// When (RFC 3339).
    pub time: String,
    /// One line for `kubectl get agentcells`, e.g. `requests 120/10000, tokens 3500/2000000`.
    #[serde(default)]
    pub summary: String,
    /// Each budget: the cell's (`scope: cell`) and each capability's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetUsage>,
}

/// One budget's counters (absent: not limited by this budget).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetUsage {
    /// `cell`, or the capability's name.
    pub scope: String,
    /// When the cell's first request was counted (unix milliseconds).
    #[serde(default)]
    pub started_ms: i64,
    /// Requests over the cell's life.
    #[serde(default)]
    pub requests: u64,
    /// Start of the current request window (unix milliseconds).
    #[serde(default)]
    pub window_start_ms: i64,
    /// Requests in the current window.
    #[serde(default)]
    pub window_requests: u64,
    /// Start of the current token window (unix milliseconds).
    #[serde(default)]
    pub tokens_start_ms: i64,
    /// LLM tokens counted.
    #[serde(default)]
    pub tokens: u64,
    /// Start of the current spend window (unix milliseconds).
    #[serde(default)]
    pub spend_start_ms: i64,
    /// Spend counted, millionths of a US dollar.
    #[serde(default)]
    pub spend_micros: u64,
}

/// What the node proxy reports it enforces for a cell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Enforcement {
    /// The node's name.
    pub node: String,
    /// The `metadata.generation` of the AgentCell the node enforces.
    pub observed_generation: i64,
    /// When the node applied it (RFC 3339, with fractional seconds).
    pub time: String,
}

/// A condition, shaped as Kubernetes' `metav1.Condition`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `TokenIssued`, `PodReady`, `Enforced` or `Governed`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason, e.g. `TokenValid`, `PodPending`, `GenerationBehind`,
    /// `ProbeRefusedAtNode`.
    #[serde(default)]
    pub reason: String,
    /// Details for humans.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl AgentCellStatus {
    /// The condition of a type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

impl AgentCellResource {
    /// The manifest form of an object read from the API server, for [`AgentCell::to_model`].
    pub fn to_manifest(&self) -> AgentCell {
        let m = &self.metadata;
        AgentCell {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            metadata: ObjectMeta {
                name: m.name.clone(),
                namespace: Some(m.namespace.clone().unwrap_or_else(|| "default".into())),
                uid: m.uid.clone(),
                labels: m.labels.clone().unwrap_or_default(),
                annotations: m.annotations.clone().unwrap_or_default(),
                generation: m.generation,
            },
            spec: self.spec.clone(),
        }
    }

    /// Validates the spec with the file path's rules and normalizes it into the node's model.
    ///
    /// # Errors
    /// Every problem, each naming its field path, as for a file.
    pub fn to_model(&self) -> Result<Cell, ManifestError> {
        self.to_manifest().to_model()
    }
}

/// Label on an `AgentApproval`: the node holding the request (its watch selects on it).
pub const LABEL_NODE: &str = "cellgate.dev/node";

/// A request held for a human's approval, created by the node that holds it (in the spirit of
/// `CertificateSigningRequest`): `spec` says what exactly would be approved, `status.decision` is
/// the human's answer (written by `kubectl cellgate approve|deny`). The node deletes the object
/// once it is decided or no longer pending.
#[derive(
    kube::CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "cellgate.dev",
    version = "v1alpha1",
    kind = "AgentApproval",
    root = "AgentApprovalResource",
    namespaced,
    status = "AgentApprovalStatus",
    shortname = "aapr",
    category = "cellgate",
    doc = "A request of an AI agent's cell held for a human's approval.",
    printcolumn = r#"{"name":"Cell","type":"string","jsonPath":".spec.cell"}"#,
    printcolumn = r#"{"name":"Capability","type":"string","jsonPath":".spec.capability"}"#,
    printcolumn = r#"{"name":"Method","type":"string","jsonPath":".spec.method"}"#,
    printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.host"}"#,
    printcolumn = r#"{"name":"Path","type":"string","jsonPath":".spec.path"}"#,
    printcolumn = r#"{"name":"Approved","type":"string","jsonPath":".status.conditions[?(@.type==\"Approved\")].status"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".spec.expiresAt"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentApprovalSpec {
    /// The cell's name (in the object's namespace).
    pub cell: String,
    /// The capability that requires approval.
    pub capability: String,
    /// HTTP method.
    pub method: String,
    /// Host.
    pub host: String,
    /// Canonical path, with its query.
    pub path: String,
    /// SHA-256 of the request body (hex): an approval covers exactly this body.
    pub body_digest: String,
    /// `hold` or `retry`.
    pub mode: String,
    /// When the request asked (RFC 3339).
    pub requested_at: String,
    /// When a held request is refused, or a retry approval request forgotten (RFC 3339).
    pub expires_at: String,
    /// The node holding it.
    pub node: String,
    /// The request id of the request that asked (also in the audit log).
    pub request_id: String,
}

/// `AgentApproval.status`: the human's decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentApprovalStatus {
    /// `Approved` or `Denied` (status `True`), with who and why in the message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The decision the node acts on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<ApprovalDecision>,
}

/// A human's decision on an `AgentApproval`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalDecision {
    /// Approved (true) or denied.
    pub approved: bool,
    /// Who decided, as the API server named them (SelfSubjectReview) to `kubectl cellgate`.
    pub by: String,
    /// When (RFC 3339).
    pub at: String,
    /// Why (required to deny).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long an approval of a retry request stays valid, e.g. `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_for: Option<String>,
    /// How many times the approved request may be sent (retry mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
}

/// The custom resource definitions Cellgate installs.
pub fn crds(
) -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use crate::policy_pack::{CellgateClusterPolicyResource, CellgatePolicyResource};
    vec![
        AgentCellResource::crd(),
        AgentApprovalResource::crd(),
        CellgatePolicyResource::crd(),
        CellgateClusterPolicyResource::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, as committed under `deploy/crds/`.
///
/// # Errors
/// Only if serialization fails, which the types rule out in practice.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::from(
        "# Generated by `cellgate crd`; do not edit. A test fails when this drifts from the Rust types.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// Labels the operator puts on every object of a cell.
pub fn cell_labels(cell: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_CELL.to_string(), cell.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
    ])
}

/// `AgentCellSpec` is what `kubectl explain agentcell.spec` describes.
pub type Spec = AgentCellSpec;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_has_names_status_and_columns() {
        let crd = AgentCellResource::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.kind, "AgentCell");
        assert_eq!(crd.spec.names.plural, "agentcells");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["acell".to_string()]));
        let v = &crd.spec.versions[0];
        assert!(v
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .map(|c| c.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default();
        assert_eq!(
            cols,
            [
                "Phase",
                "Capabilities",
                "Enforced",
                "Governed",
                "Usage",
                "Suspended",
                "Age"
            ]
        );
    }

    #[test]
    fn agent_approval_crd_is_namespaced_with_a_status() {
        let crd = AgentApprovalResource::crd();
        assert_eq!(crd.spec.names.kind, "AgentApproval");
        assert_eq!(crd.spec.names.plural, "agentapprovals");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["aapr".to_string()]));
        assert!(crd.spec.versions[0]
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
        assert_eq!(crds().len(), 4);
    }

    #[test]
    fn read_back_object_normalizes_like_a_file() {
        let json = serde_json::json!({
            "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
            "metadata": {"name": "triage", "namespace": "agents", "uid": "u-1", "generation": 3,
                         "managedFields": [{"manager": "x"}]},
            "spec": {"capabilities": [{"name": "gh", "destinations": [{"host": "api.github.com"}],
                                        "futureField": true}]},
            "status": {"phase": "Running", "somethingNew": 1}
        });
        let obj: AgentCellResource = serde_json::from_value(json).expect("lenient parse");
        let cell = obj.to_model().expect("valid");
        assert_eq!(cell.name, "triage");
        assert_eq!(cell.namespace, "agents");
        assert_eq!(cell.uid, "u-1");
        assert_eq!(cell.capabilities.len(), 1);
    }

    #[test]
    fn invalid_spec_from_the_api_names_the_field() {
        let json = serde_json::json!({
            "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
            "metadata": {"name": "triage", "namespace": "agents"},
            "spec": {"capabilities": [{"name": "gh", "destinations": [{"host": ""}]}]}
        });
        let obj: AgentCellResource = serde_json::from_value(json).expect("lenient parse");
        let err = obj.to_model().expect_err("empty host");
        assert!(
            err.to_string()
                .contains("spec.capabilities[0].destinations[0].host"),
            "{err}"
        );
    }
}
