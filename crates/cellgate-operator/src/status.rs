//! The status the operator writes, as a pure function of what a reconcile observed.
//!
//! The operator never writes `status.enforcement` (the node owns it). A condition keeps its
//! `lastTransitionTime` while its `status` does not change, and [`status_patch`] is only sent
//! when the result differs from what the object already has, so a reconcile that changes nothing
//! writes nothing and triggers no further reconcile.

use cellgate_api::crd::{AgentCellResource, AgentCellStatus, Condition};
use cellgate_api::manifest::{API_VERSION, KIND};
use k8s_openapi::api::core::v1::Pod;

/// Condition type: the cell's token is in its Secret.
pub const TOKEN_ISSUED: &str = "TokenIssued";
/// Condition type: the cell's pod is ready.
pub const POD_READY: &str = "PodReady";
/// Condition type: a node enforces the current generation.
pub const ENFORCED: &str = "Enforced";

/// Phases.
pub mod phase {
    /// Children are being created or the pod is not ready yet.
    pub const PENDING: &str = "Pending";
    /// The pod is ready.
    pub const RUNNING: &str = "Running";
    /// `spec.suspended`: every request is denied; the pod keeps running.
    pub const SUSPENDED: &str = "Suspended";
    /// The spec or template was refused; nothing was changed.
    pub const INVALID: &str = "Invalid";
    /// The pod failed.
    pub const FAILED: &str = "Failed";
    /// Deleted; waiting for the token's revocation.
    pub const TERMINATING: &str = "Terminating";
}

/// What became of the cell's pod in this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Not observed (the spec was refused before the pod was looked at).
    Unknown,
    /// Being deleted to be recreated from a changed template.
    Recreating,
    /// Created or scheduled, not running yet.
    Pending,
    /// Running; `ready` from the pod's `Ready` condition.
    Running {
        /// Whether the pod is ready.
        ready: bool,
    },
    /// All containers exited successfully.
    Succeeded,
    /// The pod failed.
    Failed,
}

/// The pod facts the status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodObservation {
    /// Its state.
    pub state: PodState,
    /// The node it runs on.
    pub node: Option<String>,
    /// Its address.
    pub ip: Option<String>,
    /// The kubelet's message, if any.
    pub message: Option<String>,
}

impl PodObservation {
    /// Nothing observed.
    pub fn unknown() -> Self {
        Self {
            state: PodState::Unknown,
            node: None,
            ip: None,
            message: None,
        }
    }

    /// A pod being deleted so that it can be recreated.
    pub fn recreating() -> Self {
        Self {
            state: PodState::Recreating,
            ..Self::unknown()
        }
    }

    /// Reads a pod's status.
    pub fn of(pod: &Pod) -> Self {
        let st = pod.status.as_ref();
        let ready = st
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let state = match st.and_then(|s| s.phase.as_deref()) {
            Some("Running") => PodState::Running { ready },
            Some("Succeeded") => PodState::Succeeded,
            Some("Failed") => PodState::Failed,
            _ => PodState::Pending,
        };
        Self {
            state,
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            ip: st.and_then(|s| s.pod_ip.clone()),
            message: st.and_then(|s| s.message.clone()),
        }
    }
}

/// What a reconcile found, for [`compute`].
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    /// The cell as read.
    pub cell: &'a AgentCellResource,
    /// `Err(message)` when the spec or template was refused.
    pub validity: Result<(), String>,
    /// The token now in the Secret: `(jti, expiry)`.
    pub token: Option<(String, String)>,
    /// The pod.
    pub pod: PodObservation,
    /// Now, RFC 3339 (for transition times).
    pub now: String,
}

fn cond(type_: &str, status: &str, reason: &str, message: String, generation: i64) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: None,
        observed_generation: Some(generation),
    }
}

/// The `Enforced` condition: `True` when the node reports the current generation.
pub fn enforced_condition(cell: &AgentCellResource, generation: i64) -> Condition {
    let enforcement = cell.status.as_ref().and_then(|s| s.enforcement.as_ref());
    match enforcement {
        Some(e) if e.observed_generation == generation => cond(
            ENFORCED,
            "True",
            "GenerationEnforced",
            format!("node {} enforces generation {generation}", e.node),
            generation,
        ),
        Some(e) => cond(
            ENFORCED,
            "False",
            "GenerationBehind",
            format!(
                "node {} enforces generation {}, the cell is at {generation}",
                e.node, e.observed_generation
            ),
            generation,
        ),
        None => cond(
            ENFORCED,
            "Unknown",
            "NotReported",
            "no node has reported enforcing this cell yet".into(),
            generation,
        ),
    }
}

/// Keeps each condition's `lastTransitionTime` from `old` when its status did not change, and
/// stamps `now` otherwise.
pub fn carry_transition_times(old: &[Condition], new: &mut [Condition], now: &str) {
    for c in new.iter_mut() {
        let previous = old.iter().find(|o| o.type_ == c.type_);
        c.last_transition_time = match previous {
            Some(o) if o.status == c.status && o.last_transition_time.is_some() => {
                o.last_transition_time.clone()
            }
            _ => Some(now.to_string()),
        };
    }
}

/// The status the operator wants, without `enforcement`.
pub fn compute(obs: &Observation<'_>) -> AgentCellStatus {
    let cell = obs.cell;
    let generation = cell.metadata.generation.unwrap_or(0);
    let old = cell.status.clone().unwrap_or_default();
    let capabilities = i64::try_from(cell.spec.capabilities.len()).unwrap_or(i64::MAX);
    let mut conditions;
    let (phase, message, token, node, ip);
    match &obs.validity {
        Err(reason) => {
            conditions = vec![
                cond(
                    TOKEN_ISSUED,
                    "False",
                    "SpecInvalid",
                    "no token is issued for an invalid spec".into(),
                    generation,
                ),
                cond(
                    POD_READY,
                    "False",
                    "SpecInvalid",
                    "the pod is not changed while the spec is invalid".into(),
                    generation,
                ),
            ];
            phase = phase::INVALID;
            message = Some(reason.clone());
            // Nothing was looked at: what was reported before still holds.
            token = old.token_id.clone().zip(old.token_expiry.clone());
            node = old.node.clone();
            ip = old.pod_ip.clone();
        }
        Ok(()) => {
            conditions = vec![match &obs.token {
                Some((id, expiry)) => cond(
                    TOKEN_ISSUED,
                    "True",
                    "TokenValid",
                    format!("token {id} expires at {expiry}"),
                    generation,
                ),
                None => cond(
                    TOKEN_ISSUED,
                    "False",
                    "TokenMissing",
                    "no token has been issued yet".into(),
                    generation,
                ),
            }];
            let (status, reason, msg) = match &obs.pod.state {
                PodState::Running { ready: true } => ("True", "PodReady", "the pod is ready"),
                PodState::Running { ready: false } => (
                    "False",
                    "ContainersNotReady",
                    "the pod runs but is not ready",
                ),
                PodState::Pending => ("False", "PodPending", "the pod is not running yet"),
                PodState::Recreating => (
                    "False",
                    "PodRecreating",
                    "the template changed; the pod is being recreated",
                ),
                PodState::Succeeded => ("False", "PodSucceeded", "the pod's containers exited"),
                PodState::Failed => ("False", "PodFailed", "the pod failed"),
                PodState::Unknown => ("Unknown", "PodUnknown", "the pod was not observed"),
            };
            let msg = match &obs.pod.message {
                Some(m) if !m.is_empty() => format!("{msg}: {m}"),
                _ => msg.to_string(),
            };
            conditions.push(cond(POD_READY, status, reason, msg, generation));
            phase = if cell.spec.suspended {
                phase::SUSPENDED
            } else {
                match obs.pod.state {
                    PodState::Failed => phase::FAILED,
                    PodState::Running { ready: true } => phase::RUNNING,
                    _ => phase::PENDING,
                }
            };
            message = if cell.spec.suspended {
                Some("suspended: every request of the cell is denied; the pod keeps running".into())
            } else if obs.pod.state == PodState::Recreating {
                Some("the template changed; the pod is being recreated".into())
            } else {
                None
            };
            token = obs.token.clone();
            node = obs.pod.node.clone();
            ip = obs.pod.ip.clone();
        }
    }
    conditions.push(enforced_condition(cell, generation));
    carry_transition_times(&old.conditions, &mut conditions, &obs.now);
    let (token_id, token_expiry) = match token {
        Some((id, exp)) => (Some(id), Some(exp)),
        None => (None, None),
    };
    AgentCellStatus {
        phase: Some(phase.into()),
        conditions,
        observed_generation: Some(generation),
        capabilities: Some(capabilities),
        token_id,
        token_expiry,
        node,
        pod_ip: ip,
        message,
        // Written by the node (its own field managers), never by the operator.
        enforcement: None,
        usage: None,
    }
}

/// `st` without what the node writes under its own field managers: `enforcement`, `usage` and
/// the `Governed` condition. Applying one of them as the operator would make it a co-owner
/// (and a forced apply would overwrite the node's newer value).
fn operator_part(mut st: AgentCellStatus) -> AgentCellStatus {
    st.enforcement = None;
    st.usage = None;
    st.conditions
        .retain(|c| c.type_ != cellgate_api::crd::CONDITION_GOVERNED);
    st
}

/// The status of a deleted cell waiting for revocation: the previous status, phase `Terminating`.
pub fn terminating(cell: &AgentCellResource) -> AgentCellStatus {
    let mut st = operator_part(cell.status.clone().unwrap_or_default());
    st.phase = Some(phase::TERMINATING.into());
    st.message = Some("deleted: revoking the cell's token".into());
    st
}

/// Whether `desired` differs from what the object has (ignoring what the node writes).
pub fn needs_write(cell: &AgentCellResource, desired: &AgentCellStatus) -> bool {
    operator_part(cell.status.clone().unwrap_or_default()) != *desired
}

/// The server-side-apply body for the status subresource. What the node writes is never
/// included.
pub fn status_patch(desired: &AgentCellStatus) -> serde_json::Value {
    let st = operator_part(desired.clone());
    serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "status": st,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cell(status: serde_json::Value, suspended: bool) -> AgentCellResource {
        serde_json::from_value(json!({
            "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
            "metadata": {"name": "triage", "namespace": "agents", "uid": "u-1", "generation": 4},
            "spec": {"suspended": suspended, "capabilities": [{"name": "a"}, {"name": "b"}]},
            "status": status,
        }))
        .expect("cell")
    }

    fn running() -> PodObservation {
        PodObservation {
            state: PodState::Running { ready: true },
            node: Some("node-1".into()),
            ip: Some("10.1.0.5".into()),
            message: None,
        }
    }

    #[test]
    fn running_cell_with_enforcement_current() {
        let c = cell(
            json!({"enforcement": {"node": "node-1", "observedGeneration": 4, "time": "t"}}),
            false,
        );
        let st = compute(&Observation {
            cell: &c,
            validity: Ok(()),
            token: Some(("j1".into(), "2030-01-01T00:00:00Z".into())),
            pod: running(),
            now: "2029-01-01T00:00:00Z".into(),
        });
        assert_eq!(st.phase.as_deref(), Some("Running"));
        assert_eq!(st.capabilities, Some(2));
        assert_eq!(st.observed_generation, Some(4));
        assert_eq!(st.node.as_deref(), Some("node-1"));
        assert_eq!(st.pod_ip.as_deref(), Some("10.1.0.5"));
        let types: Vec<_> = st.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["TokenIssued", "PodReady", "Enforced"]);
        assert!(st.conditions.iter().all(|c| c.status == "True"));
        assert!(st.enforcement.is_none());
        let patch = status_patch(&st);
        assert!(patch["status"].get("enforcement").is_none());
    }

    #[test]
    fn transition_time_is_kept_while_status_holds() {
        let old = json!({"conditions": [
            {"type": "TokenIssued", "status": "True", "reason": "TokenValid", "message": "x", "lastTransitionTime": "2020-01-01T00:00:00Z"},
            {"type": "PodReady", "status": "False", "reason": "PodPending", "message": "x", "lastTransitionTime": "2020-01-01T00:00:00Z"},
            {"type": "Enforced", "status": "True", "reason": "GenerationEnforced", "message": "x", "lastTransitionTime": "2020-01-01T00:00:00Z"}
        ], "enforcement": {"node": "n", "observedGeneration": 3, "time": "t"}});
        let c = cell(old, false);
        let st = compute(&Observation {
            cell: &c,
            validity: Ok(()),
            token: Some(("j2".into(), "e".into())),
            pod: running(),
            now: "2029-01-01T00:00:00Z".into(),
        });
        let t = |ty: &str| {
            st.condition(ty)
                .and_then(|c| c.last_transition_time.clone())
                .expect("time")
        };
        assert_eq!(t("TokenIssued"), "2020-01-01T00:00:00Z");
        assert_eq!(t("PodReady"), "2029-01-01T00:00:00Z");
        assert_eq!(t("Enforced"), "2029-01-01T00:00:00Z");
        assert_eq!(
            st.condition("Enforced").map(|c| c.reason.as_str()),
            Some("GenerationBehind")
        );
        // Written back, the same observation computes the same status: no write, no loop.
        let mut again = c.clone();
        let mut written = st.clone();
        written.enforcement = c.status.as_ref().and_then(|s| s.enforcement.clone());
        again.status = Some(written);
        let st2 = compute(&Observation {
            cell: &again,
            validity: Ok(()),
            token: Some(("j2".into(), "e".into())),
            pod: running(),
            now: "2029-06-01T00:00:00Z".into(),
        });
        assert_eq!(st2, st);
        assert!(!needs_write(&again, &st2));
        // What the node writes (usage, the Governed condition) is not the operator's to write
        // back: no write for it, and never in a patch.
        let mut noded = again.clone();
        if let Some(s) = noded.status.as_mut() {
            s.usage = Some(cellgate_api::crd::UsageStatus {
                node: "n1".into(),
                time: "t".into(),
                ..Default::default()
            });
            s.conditions.push(Condition {
                type_: "Governed".into(),
                status: "True".into(),
                reason: "ProbeRefusedAtNode".into(),
                ..Default::default()
            });
        }
        assert!(!needs_write(&noded, &st2));
        let term = terminating(&noded);
        assert!(term.condition("Governed").is_none() && term.usage.is_none());
        assert!(term.condition("Enforced").is_some());
        let patch = status_patch(noded.status.as_ref().unwrap());
        assert!(
            patch["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["type"] != "Governed"),
            "{patch}"
        );
        assert!(patch["status"].get("usage").is_none(), "{patch}");
    }

    #[test]
    fn suspended_and_invalid_phases() {
        let c = cell(
            json!({"tokenId": "old", "tokenExpiry": "e", "node": "n1", "podIP": "10.0.0.1"}),
            true,
        );
        let st = compute(&Observation {
            cell: &c,
            validity: Ok(()),
            token: Some(("j".into(), "e".into())),
            pod: running(),
            now: "now".into(),
        });
        assert_eq!(st.phase.as_deref(), Some("Suspended"));
        let st = compute(&Observation {
            cell: &c,
            validity: Err("spec.capabilities[0].name: bad".into()),
            token: None,
            pod: PodObservation::unknown(),
            now: "now".into(),
        });
        assert_eq!(st.phase.as_deref(), Some("Invalid"));
        assert_eq!(
            st.message.as_deref(),
            Some("spec.capabilities[0].name: bad")
        );
        assert_eq!(st.token_id.as_deref(), Some("old"));
        assert_eq!(st.pod_ip.as_deref(), Some("10.0.0.1"));
        let failed = PodObservation {
            state: PodState::Failed,
            ..running()
        };
        let c = cell(json!({}), false);
        let st = compute(&Observation {
            cell: &c,
            validity: Ok(()),
            token: None,
            pod: failed,
            now: "now".into(),
        });
        assert_eq!(st.phase.as_deref(), Some("Failed"));
    }
}
