//! Kubernetes mode (`--kubernetes`): the node's state comes from the API server.
//!
//! Five watches, started by [`start`] with a [`kube::Client`] (inferred by [`crate::run`], a
//! mocked one in tests), feed the same internal model local mode builds from files:
//!
//! | watch | selector | feeds |
//! |---|---|---|
//! | `AgentCell`, all namespaces (reflector) | none | [`crate::cells::CellStore`], one entry per event |
//! | `Pod`, all namespaces (reflector) | label `cellgate.dev/cell`, field `spec.nodeName=<node>` | [`crate::Shared::pods`]: Running pod address → cell uid |
//! | `ConfigMap` `cellgate-revocations` in `--control-namespace` | field `metadata.name=cellgate-revocations` | [`cellgate_identity::Verifier::revoke`] (keys are `jti`s) |
//! | `ConfigMap` `cellgate-lockdown` in `--control-namespace` | field `metadata.name=cellgate-lockdown` | [`crate::lockdown::Lockdown::set_cluster`] (`cluster`, `namespace.NS`) |
//! | `AgentApproval`, all namespaces | label `cellgate.dev/node=<node>` | [`crate::approvals::Approvals::decide`] (`status.decision`), then the object is deleted |
//!
//! Policy packs: `CellgateClusterPolicy` and `CellgatePolicy` (all namespaces) are watched too
//! ([`watch_policies`]); the node loads, for each, only the snapshot ConfigMap its status names
//! (`status.snapshot`, in the control namespace, written by the operator once the version passed
//! validation), never `spec`: an edit the operator refused never reaches a node. Once one is in
//! force, the node's set is exactly these ([`crate::policy_source::PolicySource::set_kubernetes`]);
//! if a snapshot cannot be read the set in force stays.
//!
//! Each event is applied on its own: an AgentCell event rebuilds that one cell's entry
//! ([`CellStore::upsert`](crate::cells::CellStore::upsert) / `remove`), never the compiled
//! policy; a cell the file path's rules refuse is logged, counted and removed (its requests are
//! denied `cell_unknown`), and the watch goes on. Every change bumps the node's state generation:
//! open relays ([`crate::tunnel::relay`]) and streamed responses ([`crate::http`]) re-decide on it
//! and close with reason `revoked` what is no longer allowed; an HTTP keep-alive connection's next
//! request is decided anew anyway.
//!
//! Tokens are not bound to an address here (the pod does not exist when its token is minted):
//! a connection is accepted only from a Running pod address of the token's cell on this node
//! ([`source_is_cell_pod`]), else `source_not_bound`; [`crate::decide`] repeats the check, so a
//! relay from a pod that went away is closed too.
//!
//! Besides the watches, the node writes its CA report, the Lease `cellgate-node-<node>` in the
//! control namespace ([`crate::ca_reload::report`]): what a CA rotation waits for.
//!
//! After applying an AgentCell whose pod runs on this node, the node reports the generation it
//! enforces in `status.enforcement` (server-side apply, field manager `cellgate-node`, forced),
//! from a spawned task: the watch never waits on it and a failed write is only logged (and
//! retried on the next event).
//!
//! The enforcement self-check ([`crate::selfcheck`]) writes the `Governed` entry of
//! `status.conditions` with a field manager of its own (`cellgate-node-selfcheck`): conditions
//! are a list-map keyed by `type`, so its apply owns that entry only and leaves the operator's
//! conditions, `status.enforcement` and `status.usage` to their managers.
//!
//! Until each watch has listed once, `/readyz` says which is missing; the node denies meanwhile
//! (no cell is known). When the API server is unreachable the watches retry with backoff and the
//! node keeps enforcing its last state.

#[cfg(any(test, feature = "testing"))]
pub mod contract;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cellgate_api::crd::{
    AgentCellResource, LABEL_CELL, LOCKDOWN_CONFIGMAP, NODE_FIELD_MANAGER, REVOCATIONS_CONFIGMAP,
};
use cellgate_api::manifest::{local_uid, API_VERSION, KIND};
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;

use crate::Shared;

/// The watches' shared view: the reflectors' stores, which watches have listed once, and the
/// generations already reported in `status.enforcement`.
pub struct KubeState {
    client: kube::Client,
    /// Every AgentCell, as the API server last sent it.
    pub cells: Store<AgentCellResource>,
    /// The cell pods on this node.
    pub pods: Store<Pod>,
    synced: [AtomicBool; 5],
    /// Cell uid → the generation whose enforcement was written (or is being written).
    reported: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for KubeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeState")
            .field("cells", &self.cells.state().len())
            .field("pods", &self.pods.state().len())
            .field("pending", &self.pending())
            .finish()
    }
}

const WATCHES: [&str; 5] = ["agentcells", "pods", "revocations", "lockdown", "approvals"];
const CELLS: usize = 0;
const PODS: usize = 1;
const REVOCATIONS: usize = 2;
const LOCKDOWN: usize = 3;
const APPROVALS: usize = 4;

impl KubeState {
    /// The watches that have not completed their first list yet.
    pub fn pending(&self) -> Vec<&'static str> {
        WATCHES
            .iter()
            .zip(&self.synced)
            .filter(|(_, s)| !s.load(Ordering::Acquire))
            .map(|(n, _)| *n)
            .collect()
    }

    fn mark_synced(&self, which: usize) {
        if let Some(s) = self.synced.get(which) {
            if !s.swap(true, Ordering::AcqRel) {
                tracing::info!(
                    watch = WATCHES.get(which).copied().unwrap_or("?"),
                    "first list from the API server applied"
                );
            }
        }
    }

    /// Whether a pod of cell `namespace/name` is scheduled on this node (any phase but a
    /// finished one).
    fn has_pod_here(&self, namespace: &str, name: &str) -> bool {
        self.pods.state().iter().any(|p| {
            p.metadata.namespace.as_deref() == Some(namespace)
                && cell_label(p) == Some(name)
                && !matches!(pod_phase(p), Some("Succeeded" | "Failed"))
        })
    }
}

impl KubeState {
    /// The condition `type_` of AgentCell `namespace/name`, as the watch last saw it.
    pub fn cell_condition(
        &self,
        namespace: &str,
        name: &str,
        type_: &str,
    ) -> Option<cellgate_api::crd::Condition> {
        let key = reflector::ObjectRef::new(name).within(namespace);
        self.cells
            .get(&key)?
            .status
            .as_ref()?
            .condition(type_)
            .cloned()
    }

    /// Applies the self-check's `Governed` condition to AgentCell `namespace/name` (server-side
    /// apply of that one list entry, field manager
    /// [`SELF_CHECK_FIELD_MANAGER`](cellgate_api::crd::SELF_CHECK_FIELD_MANAGER), forced).
    ///
    /// # Errors
    /// When the API server does not take it.
    pub async fn apply_governed(
        &self,
        namespace: &str,
        name: &str,
        condition: &cellgate_api::crd::Condition,
    ) -> Result<(), kube::Error> {
        let api: Api<AgentCellResource> = Api::namespaced(self.client.clone(), namespace);
        let params = PatchParams::apply(cellgate_api::crd::SELF_CHECK_FIELD_MANAGER).force();
        api.patch_status(name, &params, &Patch::Apply(&governed_patch(condition)))
            .await
            .map(|_| ())
    }
}

/// The server-side apply body of the self-check's condition: `status.conditions` with that one
/// entry, nothing else.
pub fn governed_patch(condition: &cellgate_api::crd::Condition) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "status": { "conditions": [condition] },
    })
}

/// Starts the five watches on `tasks` (aborted when the node shuts down).
pub fn start(shared: &Arc<Shared>, client: kube::Client, tasks: &mut tokio::task::JoinSet<()>) {
    let (cells, cells_writer) = reflector::store();
    let (pods, pods_writer) = reflector::store();
    let state = Arc::new(KubeState {
        client,
        cells,
        pods,
        synced: Default::default(),
        reported: Mutex::new(HashMap::new()),
    });
    if shared.kube.set(state.clone()).is_err() {
        tracing::error!("the Kubernetes watches were already started; not starting them twice");
        return;
    }
    tracing::info!(
        node = %shared.config.node_name, control_namespace = %shared.config.control_namespace,
        "Kubernetes mode: watching agentcells, the cell pods on this node, the revocations and the lockdown"
    );
    tasks.spawn(watch_cells(shared.clone(), state.clone(), cells_writer));
    tasks.spawn(watch_pods(shared.clone(), state.clone(), pods_writer));
    tasks.spawn(watch_revocations(shared.clone(), state.clone()));
    tasks.spawn(watch_lockdown(shared.clone(), state.clone()));
    tasks.spawn(report_usage(shared.clone(), state.clone()));
    tasks.spawn(watch_approvals(shared.clone(), state.clone()));
    tasks.spawn(crate::ca_reload::report(
        shared.clone(),
        state.client.clone(),
    ));
    tasks.spawn(watch_policies(shared.clone(), state));
}

/// Publishes a pending approval as an `AgentApproval` in the cell's namespace (named by the
/// approval id, labelled with this node), for `kubectl cellgate approve|deny`.
///
/// # Errors
/// When the API server does not take it: the request is then refused.
pub async fn publish_approval(
    shared: &Shared,
    view: &crate::approvals::PendingView,
) -> Result<(), String> {
    use cellgate_api::crd::{AgentApprovalResource, AgentApprovalSpec, LABEL_NODE};
    let state = shared
        .kube
        .get()
        .ok_or_else(|| "the Kubernetes client is not started".to_string())?;
    let (ns, name) = view.cell.split_once('/').unwrap_or(("default", &view.cell));
    let mut obj = AgentApprovalResource::new(
        &view.id,
        AgentApprovalSpec {
            cell: name.to_string(),
            capability: view.key.capability.clone(),
            method: view.key.method.clone(),
            host: view.key.host.clone(),
            path: view.key.path.clone(),
            body_digest: view.key.body_digest.clone(),
            mode: view.mode.to_string(),
            requested_at: view.requested_at.clone(),
            expires_at: view.expires_at.clone(),
            node: shared.config.node_name.clone(),
            request_id: view.request_id.clone(),
        },
    );
    obj.metadata.namespace = Some(ns.to_string());
    obj.metadata.labels = Some(
        [
            (LABEL_NODE.to_string(), shared.config.node_name.clone()),
            (LABEL_CELL.to_string(), name.to_string()),
        ]
        .into(),
    );
    let api: Api<AgentApprovalResource> = Api::namespaced(state.client.clone(), ns);
    api.create(&kube::api::PostParams::default(), &obj)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// How often decided or no longer pending `AgentApproval`s of this node are looked for and
/// deleted (besides on every watch event).
pub const APPROVAL_CLEANUP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

async fn watch_approvals(shared: Arc<Shared>, state: Arc<KubeState>) {
    use cellgate_api::crd::{AgentApprovalResource, LABEL_NODE};
    let selector = format!("{LABEL_NODE}={}", shared.config.node_name);
    let api: Api<AgentApprovalResource> = Api::all(state.client.clone());
    let events =
        watcher::watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut tick = tokio::time::interval(APPROVAL_CLEANUP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Ok(Event::InitApply(obj) | Event::Apply(obj))) => {
                    settle_approval(&shared, &state, &obj).await;
                }
                Some(Ok(Event::InitDone)) => state.mark_synced(APPROVALS),
                Some(Ok(Event::Init | Event::Delete(_))) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "approval watch failed; retrying with backoff (held requests time out meanwhile)");
                }
            },
            _ = tick.tick() => {
                let api: Api<AgentApprovalResource> = Api::all(state.client.clone());
                match api.list(&kube::api::ListParams::default().labels(&selector)).await {
                    Ok(list) => {
                        for obj in list.items {
                            settle_approval(&shared, &state, &obj).await;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "approval cleanup list failed"),
                }
            }
        }
    }
}

/// Acts on one `AgentApproval` of this node: a decision is applied (and audited) if the approval
/// is still pending here; an object decided, or no longer pending here (expired, withdrawn, from
/// before a restart), is deleted.
async fn settle_approval(
    shared: &Shared,
    state: &KubeState,
    obj: &cellgate_api::crd::AgentApprovalResource,
) {
    use crate::approvals::Verdict;
    use cellgate_api::crd::AgentApprovalResource;
    let (Some(id), Some(ns)) = (obj.metadata.name.clone(), obj.metadata.namespace.clone()) else {
        return;
    };
    let now = crate::decide::now_ms();
    let pending = shared.approvals.view(&id, now);
    let decision = obj.status.as_ref().and_then(|s| s.decision.clone());
    if pending.is_some() && decision.is_none() {
        return; // waits for a human
    }
    if let (Some(view), Some(d)) = (pending, decision) {
        let by = format!("{} (Kubernetes)", d.by);
        let valid = d
            .valid_for
            .as_deref()
            .and_then(cellgate_api::manifest::parse_duration)
            .unwrap_or(600)
            .min(crate::approvals::MAX_VALIDITY_SECS);
        let uses = d.uses.unwrap_or(1).clamp(1, crate::approvals::MAX_USES);
        let reason = d.reason.clone().unwrap_or_default();
        let verdict = if d.approved {
            Verdict::Approved { by: by.clone() }
        } else {
            Verdict::Denied {
                by: by.clone(),
                reason: if reason.is_empty() {
                    "denied".into()
                } else {
                    reason.clone()
                },
            }
        };
        if shared
            .approvals
            .decide(&id, verdict, valid, uses, now)
            .is_ok()
        {
            let detail = if d.approved {
                format!("valid for {valid}s, {uses} use(s) (retry mode)")
            } else {
                reason
            };
            crate::approvals::record_decision(shared, &view, "kubernetes", d.approved, &by, detail)
                .await;
        }
    }
    let api: Api<AgentApprovalResource> = Api::namespaced(state.client.clone(), &ns);
    if let Err(e) = api.delete(&id, &kube::api::DeleteParams::default()).await {
        tracing::debug!(approval = %id, error = %e, "could not delete a settled AgentApproval; retrying later");
    }
}

/// How often the node writes `status.usage` of the cells it hosts, when it changed.
pub const USAGE_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// The field manager of `status.usage` (its own: a server-side apply by `cellgate-node` of
/// `status.enforcement` alone would otherwise remove it).
pub const USAGE_FIELD_MANAGER: &str = "cellgate-node-usage";

/// Writes `status.usage` of every cell with a budget whose pod runs here, when it changed since
/// the last write (rate-limited to one write per cell per [`USAGE_REPORT_EVERY`]). A failed
/// write is logged and retried next time; enforcement never waits on it.
async fn report_usage(shared: Arc<Shared>, state: Arc<KubeState>) {
    let mut last: HashMap<String, Vec<cellgate_api::crd::BudgetUsage>> = HashMap::new();
    let mut tick = tokio::time::interval(USAGE_REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (uid, entry) in shared.cells.snapshot().iter() {
            let cell = &entry.cell;
            let budgeted =
                cell.budget.is_some() || cell.capabilities.iter().any(|c| c.budget.is_some());
            if !budgeted || !state.has_pod_here(&cell.namespace, &cell.name) {
                continue;
            }
            let budgets = shared.ledger.usage_of(uid);
            if budgets.is_empty() || last.get(uid) == Some(&budgets) {
                continue;
            }
            let all: Vec<crate::budget::Scope<'_>> = crate::decide::budget_scopes(cell, None)
                .into_iter()
                .chain(cell.capabilities.iter().filter_map(|c| {
                    Some(crate::budget::Scope {
                        name: &c.name,
                        spec: c.budget.as_ref()?,
                    })
                }))
                .collect();
            let summary = usage_summary(&shared.ledger.state(uid, &all));
            let body = usage_patch(
                &shared.config.node_name,
                &summary,
                &budgets,
                std::time::SystemTime::now(),
            );
            let api: Api<AgentCellResource> =
                Api::namespaced(state.client.clone(), &cell.namespace);
            let params = PatchParams::apply(USAGE_FIELD_MANAGER).force();
            match api
                .patch_status(&cell.name, &params, &Patch::Apply(&body))
                .await
            {
                Ok(_) => {
                    last.insert(uid.clone(), budgets);
                }
                Err(e) => {
                    tracing::warn!(cell = %cell.key(), error = %e, "could not write status.usage; retrying");
                }
            }
        }
    }
}

/// One line of budget usage from the ledger's state documents:
/// `cell requests 120/10000; api requestsPerWindow 3/60, tokens 3500/2000000`.
pub fn usage_summary(state: &serde_json::Value) -> String {
    state
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let scope = b["scope"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches("capability:");
            let parts: Vec<String> = b
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.as_str() != "scope")
                .map(|(k, v)| {
                    let t = |f: &str| v[f].to_string().trim_matches('"').to_string();
                    if v.get("used").is_some() {
                        format!("{k} {}/{}", t("used"), t("max"))
                    } else {
                        format!("{k} until {}", t("ends_at"))
                    }
                })
                .collect();
            format!("{scope} {}", parts.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The server-side apply body of the node's `status.usage` write.
pub fn usage_patch(
    node: &str,
    summary: &str,
    budgets: &[cellgate_api::crd::BudgetUsage],
    at: std::time::SystemTime,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "status": {
            "usage": {
                "node": node,
                "time": cellgate_audit::format_rfc3339(at),
                "summary": summary,
                "budgets": budgets,
            }
        }
    })
}

/// Whether `source` is the address of a Running pod of cell `cell_uid` on this node.
pub fn source_is_cell_pod(shared: &Shared, source: IpAddr, cell_uid: &str) -> bool {
    shared
        .pods
        .read()
        .map(|p| p.get(&source.to_canonical()).map(String::as_str) == Some(cell_uid))
        .unwrap_or(false)
}

fn cell_label(p: &Pod) -> Option<&str> {
    p.metadata
        .labels
        .as_ref()?
        .get(LABEL_CELL)
        .map(String::as_str)
}

fn pod_phase(p: &Pod) -> Option<&str> {
    p.status.as_ref()?.phase.as_deref()
}

/// The uid the model gives an object read from the API server (as `AgentCell::to_model` does).
fn resource_uid(obj: &AgentCellResource) -> String {
    obj.metadata.uid.clone().unwrap_or_else(|| {
        local_uid(
            obj.metadata.namespace.as_deref().unwrap_or("default"),
            obj.metadata.name.as_deref().unwrap_or_default(),
        )
    })
}

async fn watch_cells(
    shared: Arc<Shared>,
    state: Arc<KubeState>,
    writer: reflector::store::Writer<AgentCellResource>,
) {
    let api: Api<AgentCellResource> = Api::all(state.client.clone());
    let events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let mut events = std::pin::pin!(events);
    // Uids listed since the last `Init`: at `InitDone`, cells the list did not name are gone
    // (deleted while the watch was down).
    let mut listed: Option<HashSet<String>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed = Some(HashSet::new()),
            Ok(Event::InitApply(obj)) => {
                if let Some(l) = listed.as_mut() {
                    l.insert(resource_uid(&obj));
                }
                apply_cell(&shared, &state, &obj);
            }
            Ok(Event::InitDone) => {
                if let Some(l) = listed.take() {
                    let gone: Vec<String> = shared
                        .cells
                        .uids()
                        .into_iter()
                        .filter(|u| !l.contains(u))
                        .collect();
                    for uid in gone {
                        shared.cells.remove(&uid);
                        tracing::info!(cell.uid = %uid, "cell no longer listed by the API server; removed");
                    }
                }
                resync_pods(&shared, &state);
                shared.bump_generation();
                state.mark_synced(CELLS);
            }
            Ok(Event::Apply(obj)) => apply_cell(&shared, &state, &obj),
            Ok(Event::Delete(obj)) => {
                let uid = resource_uid(&obj);
                if let Ok(mut r) = state.reported.lock() {
                    r.remove(&uid);
                }
                if shared.cells.remove(&uid).is_some() {
                    tracing::info!(cell.name = %obj.metadata.name.as_deref().unwrap_or_default(),
                        cell.namespace = %obj.metadata.namespace.as_deref().unwrap_or_default(),
                        "cell deleted; its requests are denied from now on");
                    resync_pods(&shared, &state);
                    shared.bump_generation();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "agentcell watch failed; retrying with backoff, enforcing the last state meanwhile");
            }
        }
    }
}

/// Applies one AgentCell: its entry is replaced (or removed when the spec is refused), the
/// generation bumped, and the enforcement reported when its pod runs here.
fn apply_cell(shared: &Arc<Shared>, state: &Arc<KubeState>, obj: &AgentCellResource) {
    let uid = resource_uid(obj);
    match obj.to_model() {
        Ok(cell) => {
            let key = cell.key();
            let (generation, suspended, caps) =
                (cell.generation, cell.suspended, cell.capabilities.len());
            // A cell another node counted for: start from its reported usage (never lower).
            if let Some(usage) = obj.status.as_ref().and_then(|s| s.usage.as_ref()) {
                let grew = shared.ledger.seed(&uid, &usage.budgets);
                if grew > 0 {
                    tracing::info!(cell = %cell.key(), from = %usage.node, grew, "budget usage taken over from status.usage");
                }
            }
            let unchanged = shared.cells.get(&uid).is_some_and(|e| *e.cell == cell);
            if !unchanged {
                shared.cells.upsert(cell);
                tracing::info!(cell = %key, generation, suspended, capabilities = caps, "cell applied");
                resync_pods(shared, state);
                shared.bump_generation();
            }
            report_enforcement(shared, state, obj, generation);
        }
        Err(e) => {
            // Fail closed: a cell the node cannot understand has no access at all.
            tracing::warn!(
                cell.namespace = %obj.metadata.namespace.as_deref().unwrap_or_default(),
                cell.name = %obj.metadata.name.as_deref().unwrap_or_default(),
                error = %e,
                "refused an AgentCell from the API server; its requests are denied until it is fixed"
            );
            shared.metrics.reload_refused("cells");
            if shared.cells.remove(&uid).is_some() {
                resync_pods(shared, state);
                shared.bump_generation();
            }
        }
    }
}

/// Writes `status.enforcement` for `obj` at `generation` if its pod is on this node and this
/// generation was not reported yet. Off the hot path: a spawned task; failure is logged and
/// forgotten, so the next event retries.
fn report_enforcement(
    shared: &Arc<Shared>,
    state: &Arc<KubeState>,
    obj: &AgentCellResource,
    generation: i64,
) {
    let (Some(ns), Some(name)) = (obj.metadata.namespace.clone(), obj.metadata.name.clone()) else {
        return;
    };
    if !state.has_pod_here(&ns, &name) {
        return;
    }
    let uid = resource_uid(obj);
    {
        let Ok(mut reported) = state.reported.lock() else {
            return;
        };
        if reported.get(&uid) == Some(&generation) {
            return;
        }
        reported.insert(uid.clone(), generation);
    }
    let node = shared.config.node_name.clone();
    let state = state.clone();
    tokio::spawn(async move {
        let api: Api<AgentCellResource> = Api::namespaced(state.client.clone(), &ns);
        let body = enforcement_patch(&node, generation, std::time::SystemTime::now());
        let params = PatchParams::apply(NODE_FIELD_MANAGER).force();
        match api.patch_status(&name, &params, &Patch::Apply(&body)).await {
            Ok(_) => {
                tracing::debug!(cell = %format!("{ns}/{name}"), generation, "status.enforcement written")
            }
            Err(e) => {
                tracing::warn!(cell = %format!("{ns}/{name}"), generation, error = %e,
                    "could not write status.enforcement; enforcing anyway, retrying on the next event");
                if let Ok(mut reported) = state.reported.lock() {
                    if reported.get(&uid) == Some(&generation) {
                        reported.remove(&uid);
                    }
                }
            }
        }
    });
}

/// The server-side apply body of the node's status write.
pub fn enforcement_patch(
    node: &str,
    generation: i64,
    at: std::time::SystemTime,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "status": {
            "enforcement": {
                "node": node,
                "observedGeneration": generation,
                "time": cellgate_audit::format_rfc3339(at),
            }
        }
    })
}

async fn watch_pods(
    shared: Arc<Shared>,
    state: Arc<KubeState>,
    writer: reflector::store::Writer<Pod>,
) {
    let api: Api<Pod> = Api::all(state.client.clone());
    let config = watcher::Config::default()
        .labels(LABEL_CELL)
        .fields(&format!("spec.nodeName={}", shared.config.node_name));
    let events = watcher::watcher(api, config)
        .default_backoff()
        .reflect(writer);
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init | Event::InitApply(_)) => {}
            Ok(Event::InitDone) => {
                resync_pods(&shared, &state);
                state.mark_synced(PODS);
                report_all(&shared, &state);
            }
            Ok(Event::Apply(_) | Event::Delete(_)) => {
                if resync_pods(&shared, &state) {
                    shared.bump_generation();
                }
                report_all(&shared, &state);
            }
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; retrying with backoff, enforcing the last state meanwhile");
            }
        }
    }
}

/// Reports the enforcement of every cell with a pod here (a pod may arrive after its cell).
fn report_all(shared: &Arc<Shared>, state: &Arc<KubeState>) {
    for obj in state.cells.state() {
        if shared.cells.get(&resource_uid(&obj)).is_some() {
            let generation = obj.metadata.generation.unwrap_or(0);
            report_enforcement(shared, state, &obj, generation);
        }
    }
}

/// Rebuilds the address → cell uid map from the pod store (the pods of one node: small).
/// Returns whether it changed.
fn resync_pods(shared: &Shared, state: &KubeState) -> bool {
    let mut map: HashMap<IpAddr, String> = HashMap::new();
    for pod in state.pods.state() {
        if pod_phase(&pod) != Some("Running") {
            continue;
        }
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
            != Some(shared.config.node_name.as_str())
        {
            continue;
        }
        let (Some(ns), Some(cell)) = (pod.metadata.namespace.as_deref(), cell_label(&pod)) else {
            continue;
        };
        // The operator owns the pod with the AgentCell; without that reference, the cell of
        // the label in the pod's namespace.
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == KIND && o.api_version.starts_with("cellgate.dev/"))
            .map(|o| o.uid.clone());
        let Some(uid) = owner.or_else(|| shared.cells.find(ns, cell).map(|e| e.cell.uid.clone()))
        else {
            continue;
        };
        let status = pod.status.as_ref();
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|p| p.ip.as_str())
            .chain(status.and_then(|s| s.pod_ip.as_deref()));
        for ip in ips {
            match ip.parse::<IpAddr>() {
                Ok(ip) => {
                    map.insert(ip.to_canonical(), uid.clone());
                }
                Err(_) => {
                    tracing::warn!(pod = ?pod.metadata.name, ip, "pod address is not an IP; ignored")
                }
            }
        }
    }
    let Ok(mut pods) = shared.pods.write() else {
        return false;
    };
    if *pods == map {
        return false;
    }
    tracing::info!(pods = map.len(), "cell pod addresses on this node updated");
    *pods = map;
    true
}

async fn watch_revocations(shared: Arc<Shared>, state: Arc<KubeState>) {
    let api: Api<ConfigMap> =
        Api::namespaced(state.client.clone(), &shared.config.control_namespace);
    let config =
        watcher::Config::default().fields(&format!("metadata.name={REVOCATIONS_CONFIGMAP}"));
    let events = watcher::watcher(api, config).default_backoff();
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::InitApply(cm) | Event::Apply(cm)) => {
                if apply_revocations(&shared, &cm) > 0 {
                    shared.bump_generation();
                }
            }
            Ok(Event::InitDone) => state.mark_synced(REVOCATIONS),
            // Deleting the ConfigMap revokes nothing back: a revoked id stays revoked (it expires).
            Ok(Event::Init | Event::Delete(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "revocations watch failed; retrying with backoff, enforcing the last state meanwhile");
            }
        }
    }
}

async fn watch_lockdown(shared: Arc<Shared>, state: Arc<KubeState>) {
    let api: Api<ConfigMap> =
        Api::namespaced(state.client.clone(), &shared.config.control_namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={LOCKDOWN_CONFIGMAP}"));
    let events = watcher::watcher(api, config).default_backoff();
    let mut events = std::pin::pin!(events);
    // Whether the first list named the ConfigMap: a list without it lifts what was in force.
    let mut listed = false;
    while let Some(event) = events.next().await {
        let next = match event {
            Ok(Event::Init) => {
                listed = false;
                continue;
            }
            Ok(Event::InitApply(cm) | Event::Apply(cm)) => {
                listed = true;
                crate::lockdown::from_configmap_data(cm.data.iter().flatten())
            }
            Ok(Event::InitDone) => {
                state.mark_synced(LOCKDOWN);
                if listed {
                    continue;
                }
                crate::lockdown::LockState::default()
            }
            // Deleting the ConfigMap lifts every cluster lockdown.
            Ok(Event::Delete(_)) => crate::lockdown::LockState::default(),
            Err(e) => {
                tracing::warn!(error = %e, "lockdown watch failed; retrying with backoff, enforcing the last state meanwhile");
                continue;
            }
        };
        apply_cluster_lockdown(&shared, next).await;
    }
}

/// Puts the cluster's lockdowns in force on this node: open connections re-check at once, and
/// the change is audited (when it took effect here, and why).
async fn apply_cluster_lockdown(shared: &Shared, next: crate::lockdown::LockState) {
    let before = shared.lockdown.cluster_state();
    if !shared.lockdown.set_cluster(next.clone()) {
        return;
    }
    shared.bump_generation();
    let mut changes: Vec<(Option<String>, Option<crate::lockdown::Lock>)> = Vec::new();
    if before.all != next.all {
        changes.push((None, next.all.clone()));
    }
    for ns in before.namespaces.keys().chain(next.namespaces.keys()) {
        let (b, n) = (before.namespaces.get(ns), next.namespaces.get(ns));
        if b != n
            && !changes
                .iter()
                .any(|(c, _)| c.as_deref() == Some(ns.as_str()))
        {
            changes.push((Some(ns.clone()), n.cloned()));
        }
    }
    for (ns, lock) in changes {
        let scope = ns
            .as_deref()
            .map_or("every cell in the cluster".to_string(), |n| {
                format!("namespace {n}")
            });
        tracing::warn!(on = lock.is_some(), scope = %scope, "cluster lockdown changed");
        let mut rec = cellgate_audit::Record::new(
            &shared.config.node_name,
            "kubernetes",
            "control",
            cellgate_audit::Decision::Control,
            if lock.is_some() {
                "lockdown_on"
            } else {
                "lockdown_off"
            },
        );
        rec.namespace = ns;
        rec.reasons = match lock {
            Some(l) => vec![
                format!("cluster lockdown on for {scope}"),
                l.reason,
                format!("by {}", l.by.unwrap_or_default()),
            ],
            None => vec![format!("cluster lockdown off for {scope}")],
        };
        if let Err(e) = crate::decide::record(shared, rec).await {
            tracing::error!(error = %e, "lockdown record not written");
        }
    }
}

/// Revokes every `jti` the ConfigMap lists (its keys) until the token's expiry (its value, RFC
/// 3339, as the operator writes it; a value that does not parse revokes for good), then forgets
/// revoked ids whose tokens have expired. An id whose token has already expired is passed over:
/// the token is refused as expired anyway, and the list may hold it until the operator prunes
/// it. Returns how many were new.
pub fn apply_revocations(shared: &Shared, cm: &ConfigMap) -> usize {
    let now = crate::decide::now_secs();
    let data = cm
        .data
        .iter()
        .flat_map(|d| d.iter().map(|(k, v)| (k, Some(v))));
    let binary = cm
        .binary_data
        .iter()
        .flat_map(|d| d.keys().map(|k| (k, None)));
    let mut new = 0;
    for (jti, expiry) in data.chain(binary) {
        let exp = expiry
            .and_then(|v| v.parse::<jiff::Timestamp>().ok())
            .map(|t| t.as_second());
        if exp.is_some_and(|exp| cellgate_identity::token::is_past_expiry(exp, now)) {
            continue;
        }
        if !shared.verifier.is_revoked(jti) {
            new += 1;
            tracing::info!(token.jti = %jti, "token revoked");
        }
        match exp {
            Some(exp) => shared.verifier.revoke_until(jti, exp),
            None => shared.verifier.revoke(jti),
        }
    }
    let forgotten = shared.verifier.prune_revoked(now);
    if forgotten > 0 {
        tracing::debug!(forgotten, "revoked token ids past their expiry forgotten");
    }
    new
}

/// A policy in force: which, and the snapshot its status names.
type InForce = std::collections::BTreeMap<cellgate_api::policy_pack::PolicyRef, String>;

/// The files of the policies in force, from their snapshots' specs, in a stable order.
///
/// # Errors
/// A message naming the policy whose snapshot does not make files (the set in force stays).
pub fn policy_files_in_force(
    in_force: &[(
        cellgate_api::policy_pack::PolicyRef,
        cellgate_api::policy_pack::PackSpec,
    )],
) -> Result<Vec<cellgate_policy::PolicyFile>, String> {
    let mut out = Vec::new();
    for (p, spec) in in_force {
        let files = cellgate_api::policy_pack::pack_files(p, spec)
            .map_err(|e| format!("{} {}: {e}", p.kind(), p.display()))?;
        out.extend(files.into_iter().map(|f| cellgate_policy::PolicyFile {
            path: f.path.into(),
            relative: f.relative,
            source: f.source,
        }));
    }
    Ok(out)
}

/// The spec a snapshot ConfigMap holds.
fn snapshot_spec(cm: &ConfigMap) -> Result<cellgate_api::policy_pack::PackSpec, String> {
    use cellgate_api::policy_pack::SNAPSHOT_KEY;
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(SNAPSHOT_KEY))
        .ok_or_else(|| format!("no {SNAPSHOT_KEY} key"))?;
    serde_json::from_str(text).map_err(|e| format!("{SNAPSHOT_KEY}: {e}"))
}

async fn watch_policies(shared: Arc<Shared>, state: Arc<KubeState>) {
    use cellgate_api::policy_pack::{CellgateClusterPolicyResource, CellgatePolicyResource};
    let (cluster, cluster_writer) = reflector::store::<CellgateClusterPolicyResource>();
    let (namespaced, ns_writer) = reflector::store::<CellgatePolicyResource>();
    // (which watch, whether it is its first complete list); nothing is installed until both
    // kinds have listed once, so a node never serves the cluster packs without the namespaces'.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, bool)>(16);
    let c_events = reflector::reflector(
        cluster_writer,
        watcher::watcher(
            Api::<CellgateClusterPolicyResource>::all(state.client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff();
    let n_events = reflector::reflector(
        ns_writer,
        watcher::watcher(
            Api::<CellgatePolicyResource>::all(state.client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff();
    type Relevant = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<Option<bool>, watcher::Error>> + Send>,
    >;
    let pump = |which: usize,
                mut events: Relevant,
                tx: tokio::sync::mpsc::Sender<(usize, bool)>| async move {
        while let Some(e) = events.next().await {
            match e {
                Ok(Some(init_done)) => {
                    if tx.send((which, init_done)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "policy watch failed; retrying with backoff, enforcing the policy in force meanwhile")
                }
            }
        }
    };
    fn relevant<K>(ev: Event<K>) -> Option<bool> {
        match ev {
            Event::InitDone => Some(true),
            Event::Apply(_) | Event::Delete(_) => Some(false),
            Event::Init | Event::InitApply(_) => None,
        }
    }
    let c = tokio::spawn(pump(
        0,
        Box::pin(c_events.map(|e| e.map(relevant))),
        tx.clone(),
    ));
    let n = tokio::spawn(pump(1, Box::pin(n_events.map(|e| e.map(relevant))), tx));
    let api: Api<ConfigMap> =
        Api::namespaced(state.client.clone(), &shared.config.control_namespace);
    let mut cache: HashMap<String, cellgate_api::policy_pack::PackSpec> = HashMap::new();
    let mut last: Option<InForce> = None;
    let mut listed = [false; 2];
    while let Some((which, init_done)) = rx.recv().await {
        if init_done {
            if let Some(l) = listed.get_mut(which) {
                *l = true;
            }
        }
        if !listed.iter().all(|l| *l) {
            continue;
        }
        let mut in_force = InForce::new();
        for p in cluster.state() {
            if let Some(snap) = p.status.as_ref().and_then(|s| s.snapshot.clone()) {
                in_force.insert(
                    cellgate_api::policy_pack::PolicyRef {
                        namespace: None,
                        name: p.metadata.name.clone().unwrap_or_default(),
                    },
                    snap,
                );
            }
        }
        for p in namespaced.state() {
            if let Some(snap) = p.status.as_ref().and_then(|s| s.snapshot.clone()) {
                in_force.insert(
                    cellgate_api::policy_pack::PolicyRef {
                        namespace: p.metadata.namespace.clone(),
                        name: p.metadata.name.clone().unwrap_or_default(),
                    },
                    snap,
                );
            }
        }
        if last.as_ref() == Some(&in_force) {
            continue;
        }
        let mut specs = Vec::with_capacity(in_force.len());
        let mut failed = None;
        for (p, snap) in &in_force {
            if let Some(s) = cache.get(snap) {
                specs.push((p.clone(), s.clone()));
                continue;
            }
            match api
                .get(snap)
                .await
                .map_err(|e| e.to_string())
                .and_then(|cm| snapshot_spec(&cm))
            {
                Ok(s) => {
                    cache.insert(snap.clone(), s.clone());
                    specs.push((p.clone(), s));
                }
                Err(e) => {
                    failed = Some(format!(
                        "snapshot {snap} of {} {}: {e}",
                        p.kind(),
                        p.display()
                    ));
                    break;
                }
            }
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, "policy snapshot unreadable; the policy in force stays");
            shared.metrics.reload_refused("policy");
            continue;
        }
        cache.retain(|k, _| in_force.values().any(|v| v == k));
        match policy_files_in_force(&specs) {
            Ok(files) => {
                tracing::info!(
                    policies = specs.len(),
                    "policies in force from the API server"
                );
                shared.policy_source.set_kubernetes(Some(files));
            }
            Err(e) => {
                tracing::warn!(error = %e, "policy refused; the policy in force stays");
                shared.metrics.reload_refused("policy");
                continue;
            }
        }
        last = Some(in_force);
        match shared.policy_source.poll(&shared.policy) {
            crate::policy_source::Polled::Installed(_) => shared.bump_generation(),
            crate::policy_source::Polled::Refused(_) => shared.metrics.reload_refused("policy"),
            crate::policy_source::Polled::Unchanged => {}
        }
    }
    c.abort();
    n.abort();
}

#[cfg(test)]
mod tests {
    #[test]
    fn accepted_policies_replace_the_directories_and_a_scoped_pack_loads() {
        use cellgate_api::policy_pack::{PackSpec, PolicyRef};
        let base: PackSpec = serde_json::from_value(serde_json::json!({"modules": {
            "cellgate.rego": include_str!("../../../policies/base/cellgate.rego"),
        }}))
        .expect("base");
        let pack: PackSpec = serde_json::from_value(serde_json::json!({"modules": {
            "nodel.rego": "package cellgate.layers.nodel\nimport rego.v1\ndeny contains \"no\" if input.request.method == \"DELETE\"\n",
        }}))
        .expect("pack");
        let in_force = vec![
            (
                PolicyRef {
                    namespace: None,
                    name: "base".into(),
                },
                base,
            ),
            (
                PolicyRef {
                    namespace: Some("agents".into()),
                    name: "nodel".into(),
                },
                pack,
            ),
        ];
        let files = policy_files_in_force(&in_force).expect("files");
        assert!(files
            .iter()
            .any(|f| f.source.contains("input.cell.namespace == \"agents\"")));
        let source = crate::policy_source::PolicySource::new(None, vec![]);
        let store = cellgate_policy::PolicyStore::new();
        let builtin = match source.poll(&store) {
            crate::policy_source::Polled::Installed(v) => v,
            other => panic!("{other:?}"),
        };
        source.set_kubernetes(Some(files));
        let from_api = match source.poll(&store) {
            crate::policy_source::Polled::Installed(v) => v,
            other => panic!("{other:?}"),
        };
        assert_ne!(builtin, from_api);
        // No policy in force any more: back to the directories (the built-in base).
        source.set_kubernetes(Some(vec![]));
        assert_eq!(
            source.poll(&store),
            crate::policy_source::Polled::Installed(builtin)
        );
    }

    #[test]
    fn a_shadow_policy_resource_reaches_the_engine_as_a_shadow_pack() {
        use cellgate_api::policy_pack::{PackSpec, PolicyRef};
        let base: PackSpec = serde_json::from_value(serde_json::json!({"modules": {
            "cellgate.rego": include_str!("../../../policies/base/cellgate.rego"),
        }}))
        .expect("base");
        let watch: PackSpec = serde_json::from_value(serde_json::json!({
            "mode": "shadow",
            "modules": {
                "nodel.rego": "package cellgate.layers.nodel\nimport rego.v1\ndeny contains \"no\" if input.request.method == \"DELETE\"\n",
            },
        }))
        .expect("pack");
        let enforced: PackSpec = serde_json::from_value(serde_json::json!({
            "modules": {
                "nopatch.rego": "package cellgate.layers.nopatch\nimport rego.v1\ndeny contains \"no\" if input.request.method == \"PATCH\"\n",
            },
        }))
        .expect("pack");
        let name = |n: &str| PolicyRef {
            namespace: None,
            name: n.into(),
        };
        let files = policy_files_in_force(&[
            (name("base"), base),
            (name("nodel"), watch),
            (name("nopatch"), enforced),
        ])
        .expect("files");
        let set = cellgate_policy::PolicySet::from_files(files).expect("the set compiles");
        let mode_of = |layer: &str| {
            set.packs()
                .iter()
                .find(|p| p.layers.iter().any(|l| l == layer))
                .unwrap_or_else(|| panic!("no pack declares {layer}: {:?}", set.packs()))
                .mode
        };
        assert_eq!(mode_of("nodel"), cellgate_policy::PackMode::Shadow);
        assert_eq!(mode_of("nopatch"), cellgate_policy::PackMode::Enforce);
    }

    use super::*;

    #[test]
    fn enforcement_patch_is_an_apply_of_the_status_only() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let v = enforcement_patch("node-a", 7, at);
        assert_eq!(v["apiVersion"], "cellgate.dev/v1alpha1");
        assert_eq!(v["kind"], "AgentCell");
        assert_eq!(v["status"]["enforcement"]["node"], "node-a");
        assert_eq!(v["status"]["enforcement"]["observedGeneration"], 7);
        let t = v["status"]["enforcement"]["time"]
            .as_str()
            .unwrap_or_default();
        assert!(t.starts_with("2023-11-14T22:13:20.123"), "{t}");
        assert!(v.get("spec").is_none() && v.get("metadata").is_none());
    }

    #[test]
    fn governed_patch_applies_one_condition_only() {
        let c = cellgate_api::crd::Condition {
            type_: "Governed".into(),
            status: "False".into(),
            reason: "RulesMissing".into(),
            message: "m".into(),
            last_transition_time: Some("2026-12-02T08:00:00.000Z".into()),
            observed_generation: Some(3),
        };
        let v = governed_patch(&c);
        assert_eq!(v["kind"], "AgentCell");
        assert_eq!(
            v["status"],
            serde_json::json!({"conditions": [{
                "type": "Governed", "status": "False", "reason": "RulesMissing", "message": "m",
                "lastTransitionTime": "2026-12-02T08:00:00.000Z", "observedGeneration": 3,
            }]})
        );
        assert!(v.get("spec").is_none() && v.get("metadata").is_none());
    }
}
