//! Policy packs: the reconciler of `CellgatePolicy` and `CellgateClusterPolicy`. Start at
//! [`reconcile_namespaced`] / [`reconcile_cluster`].
//!
//! A new spec is validated with the nodes' own loader ([`cellgate_policy::PolicySet::from_files`]):
//! the pack's files ([`cellgate_api::policy_pack::pack_files`]) together with the version in force
//! of every other policy, which is the set a node would load. Parse errors, failing `test_*`
//! rules and compile errors refuse it: `status.conditions[Accepted]` is `False` with the
//! `file:line` message, and the version in force (its snapshot, named in `status.snapshot`)
//! stays. An accepted spec is written to a snapshot ConfigMap in the control namespace (one per
//! content hash), gets a history entry (number, hash, time, the field manager that wrote the
//! spec), and becomes the version in force; history is pruned to `spec.historyLimit` and the
//! snapshots no entry names any more are deleted.
//!
//! Calls of a reconcile that validates, in order: list `cellgateclusterpolicies`; list
//! `cellgatepolicies` (all namespaces); get each other policy's snapshot not cached yet; then,
//! when accepted, apply the snapshot ConfigMap and delete each pruned snapshot; apply the status
//! when it changed. A spec whose hash is the one in force is not validated again. Deleting a
//! policy deletes its snapshots (finalizer [`POLICY_FINALIZER`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cellgate_api::crd::{Condition, OPERATOR_FIELD_MANAGER};
use cellgate_api::policy_pack::{
    content_hash, pack_files, CellgateClusterPolicyResource, CellgatePolicyResource,
    CellgatePolicyStatus, PackSpec, PolicyHistoryEntry, PolicyRef, CONDITION_ACCEPTED,
    DEFAULT_HISTORY_LIMIT, POLICY_FINALIZER, SNAPSHOT_KEY,
};
use cellgate_policy::{PolicyError, PolicyFile, PolicySet};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Client, Resource, ResourceExt};

use tracing::Instrument;

use crate::backoff::Backoff;
use crate::reconcile::Clock;

/// How soon a refused policy is validated again: a pack refused because another one (the base)
/// was not in force yet is accepted once it is.
pub const REFUSED_REQUEUE: Duration = Duration::from_secs(30);
/// Annotation on a snapshot: its content hash.
pub const ANNOTATION_HASH: &str = "cellgate.dev/policy-hash";

/// What the policy reconciler needs.
pub struct PolicyContext {
    /// The API client.
    pub client: Client,
    /// Where snapshots live.
    pub control_namespace: String,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Snapshot name → its spec (snapshots never change: the name carries the hash).
    cache: Mutex<HashMap<String, PackSpec>>,
    /// Consecutive failures per policy, for [`error_policy`].
    backoff: Backoff,
}

impl std::fmt::Debug for PolicyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyContext")
            .field("control_namespace", &self.control_namespace)
            .finish_non_exhaustive()
    }
}

impl PolicyContext {
    /// A context.
    pub fn new(client: Client, control_namespace: String, clock: Arc<dyn Clock>) -> Self {
        Self {
            client,
            control_namespace,
            clock,
            cache: Mutex::new(HashMap::new()),
            backoff: Backoff::default(),
        }
    }

    fn snapshots(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.control_namespace)
    }
}

/// Why a policy reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum PolicyReconcileError {
    /// An API call failed.
    #[error("{verb} {what}: {source}")]
    Kube {
        /// What was done.
        verb: &'static str,
        /// To what.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A snapshot ConfigMap does not hold a spec.
    #[error("snapshot {name}: {problem}")]
    Snapshot {
        /// The ConfigMap.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The finalizer helper failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

fn kube_err(
    verb: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(kube::Error) -> PolicyReconcileError {
    let what = what.into();
    move |source| PolicyReconcileError::Kube { verb, what, source }
}

/// Reconciles one `CellgatePolicy`.
///
/// # Errors
/// [`PolicyReconcileError`] on API failures; a refused spec is not an error (it is in the status).
pub async fn reconcile_namespaced(
    obj: Arc<CellgatePolicyResource>,
    ctx: Arc<PolicyContext>,
) -> Result<Action, PolicyReconcileError> {
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let api: Api<CellgatePolicyResource> = Api::namespaced(ctx.client.clone(), &ns);
    let pref = PolicyRef {
        namespace: Some(ns),
        name: obj.name_any(),
    };
    run_finalizer(
        api,
        obj,
        ctx,
        pref,
        |o| o.spec.clone(),
        |o| o.status.clone(),
    )
    .await
}

/// Reconciles one `CellgateClusterPolicy`.
///
/// # Errors
/// As [`reconcile_namespaced`].
pub async fn reconcile_cluster(
    obj: Arc<CellgateClusterPolicyResource>,
    ctx: Arc<PolicyContext>,
) -> Result<Action, PolicyReconcileError> {
    let api: Api<CellgateClusterPolicyResource> = Api::all(ctx.client.clone());
    let pref = PolicyRef {
        namespace: None,
        name: obj.name_any(),
    };
    run_finalizer(
        api,
        obj,
        ctx,
        pref,
        |o| o.spec.clone().into(),
        |o| o.status.clone(),
    )
    .await
}

/// Retry policy of both controllers: exponential backoff per policy (2 s, 4 s, ... up to 5 min:
/// [`crate::backoff`]).
pub fn error_policy<K: Resource>(
    obj: Arc<K>,
    error: &PolicyReconcileError,
    ctx: Arc<PolicyContext>,
) -> Action {
    let key = backoff_key(obj.as_ref());
    let (attempts, delay) = ctx.backoff.failed(&key);
    tracing::warn!(policy = %key, error = %error, attempts, retry_in = ?delay, "policy reconcile failed; retrying");
    Action::requeue(delay)
}

fn backoff_key<K: Resource>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

async fn run_finalizer<K>(
    api: Api<K>,
    obj: Arc<K>,
    ctx: Arc<PolicyContext>,
    pref: PolicyRef,
    spec_of: fn(&K) -> PackSpec,
    status_of: fn(&K) -> Option<CellgatePolicyStatus>,
) -> Result<Action, PolicyReconcileError>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let span = tracing::info_span!("reconcile_policy", policy.kind = pref.kind(), policy.name = %pref.display());
    let status_api = api.clone();
    let key = backoff_key(obj.as_ref());
    let result = finalizer(&api, POLICY_FINALIZER, obj, |event| async {
        match event {
            Event::Apply(o) => {
                apply(
                    &ctx,
                    &pref,
                    &status_api,
                    o.meta(),
                    &spec_of(&o),
                    status_of(&o).unwrap_or_default(),
                )
                .await
            }
            Event::Cleanup(_) => cleanup(&ctx, &pref).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => PolicyReconcileError::Finalizer(other.to_string()),
    });
    if result.is_ok() {
        ctx.backoff.succeeded(&key);
    }
    result
}

async fn cleanup(ctx: &PolicyContext, pref: &PolicyRef) -> Result<Action, PolicyReconcileError> {
    let lp = ListParams::default().labels(&pref.snapshot_selector());
    ctx.snapshots()
        .delete_collection(&DeleteParams::default(), &lp)
        .await
        .map_err(kube_err("delete snapshots of", pref.display()))?;
    tracing::info!(policy = %pref.display(), "policy deleted; its snapshots deleted");
    Ok(Action::await_change())
}

/// The outcome of validating a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted: how many `test_*` rules of the whole set passed.
    Accepted {
        /// Tests run.
        tests: usize,
    },
    /// Refused: a CamelCase reason and the `file:line` message.
    Refused {
        /// `InvalidSpec`, `ParseError`, `TestFailed`, `CompileError`.
        reason: &'static str,
        /// The loader's message.
        message: String,
    },
}

/// Validates `spec` of `pref` together with `others` (the specs in force of every other policy),
/// as a node would load them.
pub fn validate(pref: &PolicyRef, spec: &PackSpec, others: &[(PolicyRef, PackSpec)]) -> Verdict {
    // A cluster policy `<ns>.<name>` and the CellgatePolicy `<name>` of `<ns>` are the same pack
    // on a node, which then refuses the whole set: refuse the newcomer here instead.
    if let Some((other, _)) = others
        .iter()
        .find(|(p, _)| p != pref && p.pack_name() == pref.pack_name())
    {
        return Verdict::Refused {
            reason: "NameCollision",
            message: format!(
                "{} {} and {} {} would both be pack {:?} on the nodes: rename one",
                pref.kind(),
                pref.display(),
                other.kind(),
                other.display(),
                pref.pack_name()
            ),
        };
    }
    let own = match pack_files(pref, spec) {
        Ok(f) => f,
        Err(e) => {
            return Verdict::Refused {
                reason: "InvalidSpec",
                message: e.to_string(),
            }
        }
    };
    let mut files = Vec::new();
    for (p, s) in others {
        // Others were accepted with these same rules; one that no longer passes them is left out
        // here, as the node cannot load it either.
        if let Ok(more) = pack_files(p, s) {
            files.extend(more);
        }
    }
    files.extend(own);
    let defines_base = files.iter().any(|f| {
        f.source
            .lines()
            .any(|l| l.trim() == "package cellgate.authz")
    });
    let files: Vec<PolicyFile> = files
        .into_iter()
        .map(|f| PolicyFile {
            path: f.path.into(),
            relative: f.relative,
            source: f.source,
        })
        .collect();
    match PolicySet::from_files(files) {
        Ok(set) => Verdict::Accepted {
            tests: set.tests_run(),
        },
        Err(e) => {
            let reason = match &e {
                PolicyError::Parse { .. } => "ParseError",
                PolicyError::TestFailed { .. } => "TestFailed",
                PolicyError::Compile { .. } => "CompileError",
                _ => "Invalid",
            };
            let mut message = e.to_string();
            if !defines_base {
                message.push_str(
                    " (no policy in force declares package cellgate.authz: apply the base policy, a CellgateClusterPolicy, first)",
                );
            }
            Verdict::Refused { reason, message }
        }
    }
}

/// The field manager that last wrote `spec`: the newest `metadata.managedFields` entry of the
/// main resource (not `status`) whose fields include `f:spec`.
pub fn spec_field_manager(meta: &ObjectMeta) -> String {
    meta.managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref().unwrap_or("").is_empty())
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.get("f:spec").is_some())
        })
        .max_by_key(|m| m.time.as_ref().map(|t| t.0))
        .and_then(|m| m.manager.clone())
        .unwrap_or_else(|| "unknown".into())
}

fn rfc3339(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn accepted_condition(
    prev: Option<&Condition>,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &str,
) -> Condition {
    let s = if status { "True" } else { "False" };
    let since = match prev {
        Some(p) if p.status == s => p.last_transition_time.clone(),
        _ => Some(now.to_string()),
    };
    Condition {
        type_: CONDITION_ACCEPTED.into(),
        status: s.into(),
        reason: reason.into(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

async fn others_in_force(
    ctx: &PolicyContext,
    me: &PolicyRef,
) -> Result<Vec<(PolicyRef, PackSpec)>, PolicyReconcileError> {
    let cluster: Api<CellgateClusterPolicyResource> = Api::all(ctx.client.clone());
    let namespaced: Api<CellgatePolicyResource> = Api::all(ctx.client.clone());
    let mut wanted: Vec<(PolicyRef, String)> = Vec::new();
    for p in cluster
        .list(&ListParams::default())
        .await
        .map_err(kube_err("list", "cellgateclusterpolicies"))?
    {
        if let Some(snap) = p.status.and_then(|s| s.snapshot) {
            wanted.push((
                PolicyRef {
                    namespace: None,
                    name: p.metadata.name.unwrap_or_default(),
                },
                snap,
            ));
        }
    }
    for p in namespaced
        .list(&ListParams::default())
        .await
        .map_err(kube_err("list", "cellgatepolicies"))?
    {
        if let Some(snap) = p.status.and_then(|s| s.snapshot) {
            wanted.push((
                PolicyRef {
                    namespace: p.metadata.namespace,
                    name: p.metadata.name.unwrap_or_default(),
                },
                snap,
            ));
        }
    }
    wanted.retain(|(p, _)| p != me);
    wanted.sort();
    let mut out = Vec::with_capacity(wanted.len());
    for (p, snap) in wanted {
        out.push((p, snapshot_spec(ctx, &snap).await?));
    }
    Ok(out)
}

/// The spec kept in a snapshot ConfigMap (cached: the name carries the content hash).
async fn snapshot_spec(ctx: &PolicyContext, name: &str) -> Result<PackSpec, PolicyReconcileError> {
    if let Some(s) = ctx
        .cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(name)
    {
        return Ok(s.clone());
    }
    let cm = ctx
        .snapshots()
        .get(name)
        .await
        .map_err(kube_err("get snapshot", name))?;
    let spec = spec_from_snapshot(&cm).map_err(|problem| PolicyReconcileError::Snapshot {
        name: name.into(),
        problem,
    })?;
    ctx.cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(name.into(), spec.clone());
    Ok(spec)
}

/// The spec a snapshot ConfigMap holds.
///
/// # Errors
/// A message when the key is missing or is not a spec.
pub fn spec_from_snapshot(cm: &ConfigMap) -> Result<PackSpec, String> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(SNAPSHOT_KEY))
        .ok_or_else(|| format!("no {SNAPSHOT_KEY} key"))?;
    serde_json::from_str(text).map_err(|e| format!("{SNAPSHOT_KEY}: {e}"))
}

/// The snapshot ConfigMap of an accepted version.
pub fn snapshot_configmap(
    pref: &PolicyRef,
    namespace: &str,
    hash: &str,
    spec: &PackSpec,
) -> ConfigMap {
    let mut kept = spec.clone();
    kept.history_limit = None;
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(pref.snapshot_name(hash)),
            namespace: Some(namespace.into()),
            labels: Some(pref.snapshot_labels()),
            annotations: Some(BTreeMap::from([(ANNOTATION_HASH.into(), hash.into())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            SNAPSHOT_KEY.into(),
            serde_json::to_string(&kept).unwrap_or_default(),
        )])),
        immutable: Some(true),
        ..Default::default()
    }
}

/// History after accepting `entry`: appended, then the oldest dropped beyond `limit`. Returns the
/// history and the snapshots no kept entry names any more.
pub fn push_history(
    mut history: Vec<PolicyHistoryEntry>,
    entry: Option<PolicyHistoryEntry>,
    limit: usize,
) -> (Vec<PolicyHistoryEntry>, Vec<String>) {
    if let Some(e) = entry {
        history.push(e);
    }
    let limit = limit.max(1);
    let cut = history.len().saturating_sub(limit);
    let dropped: Vec<PolicyHistoryEntry> = history.drain(..cut).collect();
    let mut gone: Vec<String> = dropped
        .into_iter()
        .map(|e| e.snapshot)
        .filter(|s| !history.iter().any(|k| &k.snapshot == s))
        .collect();
    gone.sort();
    gone.dedup();
    (history, gone)
}

async fn apply<K>(
    ctx: &PolicyContext,
    pref: &PolicyRef,
    api: &Api<K>,
    meta: &kube::core::ObjectMeta,
    spec: &PackSpec,
    status: CellgatePolicyStatus,
) -> Result<Action, PolicyReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let generation = meta.generation;
    let now = rfc3339(ctx.clock.now());
    let hash = content_hash(spec);
    let limit = spec.history_limit.unwrap_or(DEFAULT_HISTORY_LIMIT) as usize;
    let prev_cond = status.condition(CONDITION_ACCEPTED).cloned();
    let mut next = status.clone();
    next.observed_generation = generation;
    let mut requeue = Action::await_change();
    let mut gone = Vec::new();
    if status.hash.as_deref() == Some(hash.as_str()) {
        // The content in force (a no-op edit, or a rollback to it): nothing to validate; the
        // history limit may have changed.
        let (history, g) = push_history(status.history.clone(), None, limit);
        next.history = history;
        gone = g;
        let message = prev_cond
            .as_ref()
            .filter(|c| c.status == "True")
            .map(|c| c.message.clone())
            .unwrap_or_else(|| {
                format!("version {} ({hash}) in force", status.version.unwrap_or(0))
            });
        next.conditions = vec![accepted_condition(
            prev_cond.as_ref(),
            true,
            "Accepted",
            message,
            generation,
            &now,
        )];
    } else {
        let others = others_in_force(ctx, pref).await?;
        match validate(pref, spec, &others) {
            Verdict::Accepted { tests } => {
                let snapshot = pref.snapshot_name(&hash);
                let cm = snapshot_configmap(pref, &ctx.control_namespace, &hash, spec);
                ctx.snapshots()
                    .patch(
                        &snapshot,
                        &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
                        &Patch::Apply(&cm),
                    )
                    .await
                    .map_err(kube_err("apply snapshot", snapshot.clone()))?;
                let version = status
                    .history
                    .iter()
                    .map(|e| e.version)
                    .max()
                    .unwrap_or(0)
                    .saturating_add(1);
                let entry = PolicyHistoryEntry {
                    version,
                    hash: hash.clone(),
                    time: now.clone(),
                    field_manager: spec_field_manager(meta),
                    generation: generation.unwrap_or(0),
                    snapshot: snapshot.clone(),
                };
                let (history, g) = push_history(status.history.clone(), Some(entry), limit);
                next.history = history;
                gone = g;
                next.version = Some(version);
                next.hash = Some(hash.clone());
                next.mode = Some(spec.mode.unwrap_or_default());
                next.snapshot = Some(snapshot);
                next.conditions = vec![accepted_condition(
                    prev_cond.as_ref(),
                    true,
                    "Accepted",
                    format!("version {version} ({hash}) in force; {tests} tests passed"),
                    generation,
                    &now,
                )];
                tracing::info!(policy = %pref.display(), version, hash = %hash, "policy accepted");
            }
            Verdict::Refused { reason, message } => {
                let kept = match (&status.version, &status.hash) {
                    (Some(v), Some(h)) => format!("; version {v} ({h}) stays in force"),
                    _ => "; no version of this policy is in force".into(),
                };
                tracing::warn!(policy = %pref.display(), reason, error = %message, "policy refused");
                next.conditions = vec![accepted_condition(
                    prev_cond.as_ref(),
                    false,
                    reason,
                    format!("{message}{kept}"),
                    generation,
                    &now,
                )];
                requeue = Action::requeue(REFUSED_REQUEUE);
            }
        }
    }
    for name in gone {
        match ctx
            .snapshots()
            .delete(&name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(kube_err("delete snapshot", name)(e)),
        }
    }
    if next != status {
        let name = pref.name.clone();
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": next,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(kube_err("apply status of", pref.display()))?;
    }
    Ok(requeue)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(v: u64, snap: &str) -> PolicyHistoryEntry {
        PolicyHistoryEntry {
            version: v,
            hash: snap.into(),
            time: String::new(),
            field_manager: String::new(),
            generation: 0,
            snapshot: snap.into(),
        }
    }

    #[test]
    fn a_cluster_policy_named_like_a_namespaced_pack_is_refused() {
        let spec: PackSpec = serde_json::from_value(serde_json::json!({"modules": {
            "a.rego": "package cellgate.layers.a\nimport rego.v1\ndeny contains \"x\" if false\n"}}))
        .expect("spec");
        let namespaced = PolicyRef {
            namespace: Some("agents".into()),
            name: "nodel".into(),
        };
        let cluster = PolicyRef {
            namespace: None,
            name: "agents.nodel".into(),
        };
        match validate(&cluster, &spec, &[(namespaced.clone(), spec.clone())]) {
            Verdict::Refused { reason, message } => {
                assert_eq!(reason, "NameCollision");
                assert!(message.contains("CellgatePolicy agents/nodel"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        match validate(&namespaced, &spec, &[(cluster, spec.clone())]) {
            Verdict::Refused { reason, .. } => assert_eq!(reason, "NameCollision"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn history_prunes_the_oldest_and_keeps_shared_snapshots() {
        let h = vec![entry(1, "a"), entry(2, "b"), entry(3, "a")];
        let (h, gone) = push_history(h, Some(entry(4, "c")), 2);
        assert_eq!(h.iter().map(|e| e.version).collect::<Vec<_>>(), [3, 4]);
        // `a` is still named by version 3.
        assert_eq!(gone, ["b"]);
    }
}
