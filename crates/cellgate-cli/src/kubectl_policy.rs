//! `kubectl cellgate policy history|rollback|promote`: the versions of a `CellgatePolicy` or
//! `CellgateClusterPolicy`, going back to one, and switching a shadow pack to enforce.
//!
//! The operator keeps the history (`status.history`, one snapshot ConfigMap per accepted version
//! in the control namespace); these commands only read it and edit `spec`, so the operator
//! validates a rollback or a promotion like any other edit and records who made it (field
//! manager `kubectl-cellgate`). Nothing here writes `status` or a snapshot.
//!
//! - [`history_text`]: the table of accepted versions, the one in force marked.
//! - [`rollback`]: re-applies the spec kept in a version's snapshot (server-side apply, forced).
//! - [`promote_plan`] then [`set_enforce`]: replays the recent audit with the pack in enforce
//!   mode and the other policies in force ([`crate::replay::replay_lines`]), then sets
//!   `spec.mode: enforce` only if the pack's spec did not change meanwhile.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context as _};
use cellgate_api::crd::{AgentCellResource, KUBECTL_FIELD_MANAGER};
use cellgate_api::policy_pack::{
    content_hash, CellgateClusterPolicyResource, CellgatePolicyResource, CellgatePolicyStatus,
    PackMode, PackSpec, PolicyRef, CONDITION_ACCEPTED, SNAPSHOT_KEY,
};
use cellgate_policy::PolicySet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;

use crate::kubectl::{self, Target};
use crate::replay::{self, Cells, Report};

/// Most audit records asked of each source (the nodes and the control API cap it too).
const MAX_PROMOTE_RECORDS: usize = 1000;

/// Which policy: a `CellgatePolicy` in a namespace, or (`--cluster`) a `CellgateClusterPolicy`.
#[derive(Debug, Clone, clap::Args)]
pub struct Which {
    /// A CellgateClusterPolicy (default: a CellgatePolicy in the namespace).
    #[arg(long, conflicts_with = "namespace")]
    pub cluster: bool,
    /// Namespace the operator and nodes run in (where the snapshots are).
    #[arg(long, default_value = "cellgate-system")]
    pub control_namespace: String,
    #[command(flatten)]
    pub target: Target,
}

/// `policy history NAME`.
#[derive(Debug, Clone, clap::Args)]
pub struct HistoryArgs {
    /// The policy.
    pub name: String,
    #[command(flatten)]
    pub which: Which,
}

/// `policy rollback NAME VERSION`.
#[derive(Debug, Clone, clap::Args)]
pub struct RollbackArgs {
    /// The policy.
    pub name: String,
    /// The version to go back to (a number `policy history` shows).
    pub version: u64,
    #[command(flatten)]
    pub which: Which,
}

/// `policy promote NAME`.
#[derive(Debug, Clone, clap::Args)]
pub struct PromoteArgs {
    /// The policy (a shadow pack).
    pub name: String,
    /// Switch without asking (needed when not on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// How far back the audit replayed goes.
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// Most records read from each node (or from the control API).
    #[arg(long, default_value_t = MAX_PROMOTE_RECORDS)]
    pub limit: usize,
    /// Read the audit through the operator's control API instead of each node's `/audit`.
    #[arg(long, env = "CELLGATE_API_URL")]
    pub api_url: Option<String>,
    /// CA certificate (PEM) of the control API (default: the kubeconfig cluster's CA).
    #[arg(long, env = "CELLGATE_API_CA")]
    pub api_ca: Option<std::path::PathBuf>,
    /// Bearer token for the control API (default: the kubeconfig user's).
    #[arg(long, env = "CELLGATE_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub which: Which,
}

/// A policy as read from the API server.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Which.
    pub pref: PolicyRef,
    /// Its spec as it is now (maybe not accepted).
    pub spec: PackSpec,
    /// What the operator wrote.
    pub status: CellgatePolicyStatus,
    /// `metadata.generation`.
    pub generation: i64,
}

impl Policy {
    fn kind_name(&self) -> String {
        format!("{} {}", self.pref.kind(), self.pref.display())
    }

    /// Whether the operator accepted the current spec (it is the version in force).
    fn spec_in_force(&self) -> bool {
        let accepted = self
            .status
            .condition(CONDITION_ACCEPTED)
            .is_some_and(|c| c.status == "True");
        accepted
            && self.status.observed_generation == Some(self.generation)
            && self.status.hash.as_deref() == Some(content_hash(&self.spec).as_str())
    }
}

async fn resolve(which: &Which, name: &str) -> anyhow::Result<(Client, PolicyRef)> {
    let (client, ns) = kubectl::connect(&which.target).await?;
    let pref = PolicyRef {
        namespace: (!which.cluster).then_some(ns),
        name: name.to_owned(),
    };
    Ok((client, pref))
}

fn api_error(e: kube::Error, pref: &PolicyRef) -> anyhow::Error {
    match e {
        kube::Error::Api(s) if s.code == 404 => {
            let hint = if pref.namespace.is_some() {
                " (a cluster policy? add --cluster)"
            } else {
                ""
            };
            anyhow!("{} {} not found{hint}", pref.kind(), pref.display())
        }
        e => anyhow::Error::new(e).context(format!("{} {}", pref.kind(), pref.display())),
    }
}

/// Reads a policy.
///
/// # Errors
/// Not found (with a hint), or the API server's answer.
pub async fn get_policy(client: Client, pref: &PolicyRef) -> anyhow::Result<Policy> {
    let (spec, status, generation) = match &pref.namespace {
        Some(ns) => {
            let api: Api<CellgatePolicyResource> = Api::namespaced(client, ns);
            let o = api.get(&pref.name).await.map_err(|e| api_error(e, pref))?;
            (o.spec, o.status, o.metadata.generation)
        }
        None => {
            let api: Api<CellgateClusterPolicyResource> = Api::all(client);
            let o = api.get(&pref.name).await.map_err(|e| api_error(e, pref))?;
            (o.spec.into(), o.status, o.metadata.generation)
        }
    };
    Ok(Policy {
        pref: pref.clone(),
        spec,
        status: status.unwrap_or_default(),
        generation: generation.unwrap_or(0),
    })
}

async fn patch_policy(
    client: Client,
    pref: &PolicyRef,
    params: &PatchParams,
    patch: &Patch<serde_json::Value>,
) -> anyhow::Result<(PackSpec, i64)> {
    let (spec, generation) = match &pref.namespace {
        Some(ns) => {
            let api: Api<CellgatePolicyResource> = Api::namespaced(client, ns);
            let o = api
                .patch(&pref.name, params, patch)
                .await
                .map_err(|e| api_error(e, pref))?;
            (o.spec, o.metadata.generation)
        }
        None => {
            let api: Api<CellgateClusterPolicyResource> = Api::all(client);
            let o = api
                .patch(&pref.name, params, patch)
                .await
                .map_err(|e| api_error(e, pref))?;
            (o.spec.into(), o.metadata.generation)
        }
    };
    let generation = generation.ok_or_else(|| {
        anyhow!(
            "the API server returned {} without a generation",
            pref.display()
        )
    })?;
    Ok((spec, generation))
}

/// The accepted versions of a policy, oldest first, the one in force marked `*`, and a line
/// saying when the current spec is not (yet) the version in force.
///
/// # Errors
/// Not found, or the API server's answer.
pub async fn history_text(client: Client, pref: &PolicyRef) -> anyhow::Result<String> {
    let p = get_policy(client, pref).await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} (generation {}, mode {})",
        p.kind_name(),
        p.generation,
        p.status.mode.unwrap_or_default().as_str()
    );
    if p.status.history.is_empty() {
        let _ = writeln!(out, "no accepted version yet");
    } else {
        let mut rows = vec![[
            "VERSION".to_string(),
            "HASH".into(),
            "TIME".into(),
            "FIELD-MANAGER".into(),
            "GENERATION".into(),
            "IN-FORCE".into(),
        ]];
        for e in &p.status.history {
            let in_force = p.status.version == Some(e.version);
            rows.push([
                e.version.to_string(),
                e.hash.clone(),
                e.time.clone(),
                if e.field_manager.is_empty() {
                    "-".into()
                } else {
                    e.field_manager.clone()
                },
                e.generation.to_string(),
                if in_force { "*".into() } else { String::new() },
            ]);
        }
        out.push_str(&kubectl::table(&rows));
    }
    match p.status.condition(CONDITION_ACCEPTED) {
        Some(c) if c.status == "False" => {
            let _ = writeln!(
                out,
                "generation {} is refused ({}): {}",
                c.observed_generation.unwrap_or(p.generation),
                c.reason,
                c.message
            );
        }
        _ if p.status.observed_generation != Some(p.generation) => {
            let _ = writeln!(
                out,
                "generation {} is not validated yet (the operator last saw {})",
                p.generation,
                p.status
                    .observed_generation
                    .map_or_else(|| "none".to_string(), |g| g.to_string())
            );
        }
        _ => {}
    }
    Ok(out)
}

/// The spec kept in a snapshot ConfigMap, checked against the hash its history entry names.
async fn snapshot_spec(
    client: Client,
    control_ns: &str,
    snapshot: &str,
    hash: Option<&str>,
) -> anyhow::Result<PackSpec> {
    let api: Api<ConfigMap> = Api::namespaced(client, control_ns);
    let cm = match api.get_opt(snapshot).await {
        Ok(Some(cm)) => cm,
        Ok(None) => bail!("snapshot ConfigMap {control_ns}/{snapshot} is gone"),
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context(format!("reading snapshot {control_ns}/{snapshot}"))
            )
        }
    };
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(SNAPSHOT_KEY))
        .with_context(|| format!("snapshot {control_ns}/{snapshot} has no key {SNAPSHOT_KEY}"))?;
    let spec: PackSpec = serde_json::from_str(text)
        .with_context(|| format!("snapshot {control_ns}/{snapshot}: {SNAPSHOT_KEY}"))?;
    if let Some(want) = hash {
        let got = content_hash(&spec);
        if got != want {
            bail!("snapshot {control_ns}/{snapshot} holds content {got}, not {want}: refusing to use it");
        }
    }
    Ok(spec)
}

/// The content fields of a spec as an apply body sets them: every field explicit, so a forced
/// apply takes them over from whoever wrote them (`historyLimit` is left to its owner).
fn content_json(spec: &PackSpec) -> serde_json::Value {
    let mut v = serde_json::json!({
        "modules": spec.modules,
        "tests": spec.tests,
        "roles": spec.roles,
        "mode": spec.mode.unwrap_or_default(),
    });
    if let Some(d) = &spec.data {
        v["data"] = d.clone();
    }
    v
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolledBack {
    /// The version gone back to.
    pub version: u64,
    /// Its content hash.
    pub hash: String,
    /// The policy's generation after the edit.
    pub generation: i64,
    /// Whether a second write was needed to remove what another field manager still owned.
    pub replaced: bool,
}

/// Re-applies the spec of `version` (from its snapshot) with server-side apply, field manager
/// `kubectl-cellgate`, forced. Fields another manager owns that the old version does not have
/// survive an apply; when the result's content hash is not the version's, the spec is replaced
/// whole (a JSON patch guarded by the generation just written).
///
/// # Errors
/// A version not in the history (the ones there are named), the version already current, a
/// snapshot gone or not matching its hash, or the API server's answer.
pub async fn rollback(
    client: Client,
    pref: &PolicyRef,
    control_ns: &str,
    version: u64,
) -> anyhow::Result<RolledBack> {
    let p = get_policy(client.clone(), pref).await?;
    let Some(entry) = p.status.entry(version).cloned() else {
        let kept: Vec<String> = p
            .status
            .history
            .iter()
            .map(|e| e.version.to_string())
            .collect();
        bail!(
            "{} has no version {version} in its history (kept: {})",
            p.kind_name(),
            if kept.is_empty() {
                "none".to_string()
            } else {
                kept.join(", ")
            }
        );
    };
    if content_hash(&p.spec) == entry.hash {
        bail!(
            "{} already has the content of version {version} ({}) in spec: nothing to roll back",
            p.kind_name(),
            entry.hash
        );
    }
    let old = snapshot_spec(
        client.clone(),
        control_ns,
        &entry.snapshot,
        Some(&entry.hash),
    )
    .await?;
    let mut metadata = serde_json::json!({"name": pref.name});
    if let Some(ns) = &pref.namespace {
        metadata["namespace"] = ns.clone().into();
    }
    let body = serde_json::json!({
        "apiVersion": "cellgate.dev/v1alpha1",
        "kind": pref.kind(),
        "metadata": metadata,
        "spec": content_json(&old),
    });
    let (spec, mut generation) = patch_policy(
        client.clone(),
        pref,
        &PatchParams::apply(KUBECTL_FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .with_context(|| format!("applying version {version} of {}", pref.display()))?;
    let mut replaced = false;
    if content_hash(&spec) != entry.hash {
        let mut whole = content_json(&old);
        if let Some(limit) = p.spec.history_limit {
            whole["historyLimit"] = limit.into();
        }
        let ops = serde_json::json!([
            {"op": "test", "path": "/metadata/generation", "value": generation},
            {"op": "replace", "path": "/spec", "value": whole},
        ]);
        let params = PatchParams {
            field_manager: Some(KUBECTL_FIELD_MANAGER.into()),
            ..Default::default()
        };
        let (spec, g) = patch_policy(client, pref, &params, &Patch::Json(serde_json::from_value(ops)?))
            .await
            .with_context(|| {
                format!(
                    "replacing the spec of {} with version {version} (another field manager kept fields the apply could not remove)",
                    pref.display()
                )
            })?;
        if content_hash(&spec) != entry.hash {
            bail!(
                "{} still does not hold the content of version {version} after the edit (hash {}): check who writes it",
                pref.display(),
                content_hash(&spec)
            );
        }
        generation = g;
        replaced = true;
    }
    Ok(RolledBack {
        version,
        hash: entry.hash,
        generation,
        replaced,
    })
}

/// Where `promote` reads the recent audit.
#[derive(Clone)]
pub enum AuditSource {
    /// Each node pod's `/audit` in the control namespace, through the API server's pod proxy.
    Nodes,
    /// The operator's control API (a client pointed at it, and the `/api/v1/audit` path).
    ControlApi {
        /// The client.
        client: Client,
        /// Path and query.
        path: String,
    },
}

impl std::fmt::Debug for AuditSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditSource::Nodes => f.write_str("Nodes"),
            AuditSource::ControlApi { path, .. } => f
                .debug_struct("ControlApi")
                .field("path", path)
                .finish_non_exhaustive(),
        }
    }
}

/// What switching a pack to enforce would do.
#[derive(Debug, Clone)]
pub struct PromotePlan {
    /// The pack as read.
    pub policy: Policy,
    /// The replay over the recent audit.
    pub report: Report,
    /// The report for people.
    pub text: String,
}

/// The node admin token, from the Secret RBAC lets the caller read (or not).
async fn admin_token(client: Client, control_ns: &str) -> anyhow::Result<String> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, control_ns);
    let secret = secrets
        .get(kubectl::ADMIN_TOKEN_SECRET)
        .await
        .with_context(|| {
            format!(
                "reading the node admin token (secret {control_ns}/{}, key {})",
                kubectl::ADMIN_TOKEN_SECRET,
                kubectl::ADMIN_TOKEN_KEY
            )
        })?;
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(kubectl::ADMIN_TOKEN_KEY))
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
        .filter(|t| !t.is_empty())
        .with_context(|| {
            format!(
                "secret {control_ns}/{} has no key {}",
                kubectl::ADMIN_TOKEN_SECRET,
                kubectl::ADMIN_TOKEN_KEY
            )
        })
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The audit records (JSON lines) of every node since `since` (RFC 3339), of `namespace` or
/// all; and how many nodes answered.
async fn node_audit(
    client: Client,
    control_ns: &str,
    namespace: Option<&str>,
    since: &str,
    limit: usize,
) -> anyhow::Result<(String, usize)> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), control_ns);
    let list = pods
        .list(&ListParams::default().labels(kubectl::NODE_POD_SELECTOR))
        .await
        .with_context(|| format!("listing the cellgate-node pods in {control_ns}"))?;
    let names: Vec<String> = list
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    if names.is_empty() {
        bail!("no cellgate-node pod in namespace {control_ns}: no audit to replay (give --control-namespace, or --api-url for the control API)");
    }
    let token = admin_token(client.clone(), control_ns).await?;
    let mut q = Vec::new();
    if let Some(ns) = namespace {
        q.push(format!("namespace={}", enc(ns)));
    }
    q.push(format!("since={}", enc(since)));
    q.push(format!("limit={}", limit.clamp(1, MAX_PROMOTE_RECORDS)));
    let mut body = String::new();
    for pod in &names {
        let uri = format!(
            "/api/v1/namespaces/{control_ns}/pods/{pod}:{}/proxy/audit?{}",
            kubectl::NODE_ADMIN_PORT,
            q.join("&")
        );
        let request = http::Request::get(uri)
            .header(cellgate_api::crd::ADMIN_TOKEN_HEADER, token.as_str())
            .body(Vec::new())?;
        let text = client
            .request_text(request)
            .await
            .with_context(|| format!("reading the audit of node pod {control_ns}/{pod}"))?;
        body.push_str(&text);
        if !body.is_empty() && !body.ends_with('\n') {
            body.push('\n');
        }
    }
    Ok((body, names.len()))
}

/// The specs in force of every policy (from their snapshots), with `pref`'s replaced by `own`.
async fn set_with(
    client: Client,
    control_ns: &str,
    pref: &PolicyRef,
    own: PackSpec,
) -> anyhow::Result<Vec<(PolicyRef, PackSpec)>> {
    let mut wanted: Vec<(PolicyRef, String)> = Vec::new();
    let cluster: Api<CellgateClusterPolicyResource> = Api::all(client.clone());
    for p in cluster
        .list(&ListParams::default())
        .await
        .context("listing cellgateclusterpolicies")?
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
    let namespaced: Api<CellgatePolicyResource> = Api::all(client.clone());
    for p in namespaced
        .list(&ListParams::default())
        .await
        .context("listing cellgatepolicies")?
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
    wanted.retain(|(p, _)| p != pref);
    wanted.sort();
    let mut out = Vec::with_capacity(wanted.len() + 1);
    for (p, snap) in wanted {
        let spec = snapshot_spec(client.clone(), control_ns, &snap, None).await?;
        out.push((p, spec));
    }
    out.push((pref.clone(), own));
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Replays the recent audit with `pref` switched to enforce: the specs in force of every policy
/// (their snapshots, as the nodes load them), this pack's version in force with `mode: enforce`,
/// and the cluster's AgentCells.
///
/// # Errors
/// A pack whose current spec is not the version in force (a refused or unvalidated edit), a set
/// that does not load with the pack enforcing, or the API server's (or a node's) answer.
pub async fn promote_plan(
    client: Client,
    pref: &PolicyRef,
    control_ns: &str,
    source: AuditSource,
    since: SystemTime,
    limit: usize,
) -> anyhow::Result<PromotePlan> {
    let p = get_policy(client.clone(), pref).await?;
    if !p.spec_in_force() {
        bail!(
            "{}: its spec (generation {}) is not the version in force (see `kubectl cellgate policy history {}`); promote only an accepted pack",
            p.kind_name(),
            p.generation,
            pref.name
        );
    }
    let Some(snapshot) = p.status.snapshot.clone() else {
        bail!("{} has no version in force", p.kind_name());
    };
    let mut own = snapshot_spec(
        client.clone(),
        control_ns,
        &snapshot,
        p.status.hash.as_deref(),
    )
    .await?;
    own.mode = Some(PackMode::Enforce);
    let specs = set_with(client.clone(), control_ns, pref, own).await?;
    let files = cellgate_node::kubernetes::policy_files_in_force(&specs).map_err(|e| anyhow!(e))?;
    let set = PolicySet::from_files(files).map_err(|e| {
        anyhow!(
            "the policies in force with {} enforcing do not load: {e}",
            pref.display()
        )
    })?;

    let cells_api: Api<AgentCellResource> = match &pref.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut cells = Cells::default();
    let mut bad_cells = Vec::new();
    for c in cells_api
        .list(&ListParams::default())
        .await
        .context("listing agentcells")?
    {
        match c.to_model() {
            Ok(m) => cells.insert(m),
            Err(e) => bad_cells.push(format!(
                "{}/{}: {e}",
                c.metadata.namespace.unwrap_or_default(),
                c.metadata.name.unwrap_or_default()
            )),
        }
    }

    let since_text = humantime::format_rfc3339_seconds(since).to_string();
    let (body, from) = match source {
        AuditSource::Nodes => {
            let (body, n) = node_audit(
                client.clone(),
                control_ns,
                pref.namespace.as_deref(),
                &since_text,
                limit,
            )
            .await?;
            (body, format!("{n} node(s)"))
        }
        AuditSource::ControlApi { client, path } => {
            let body = kubectl::audit_api_text(client, &path, true).await?;
            (body, "the control API".to_string())
        }
    };
    let lines: Vec<&str> = body.lines().filter(|l| !l.trim().is_empty()).collect();
    let report = replay::replay_lines(&set, &cells, &lines);
    let mut text = String::new();
    let _ = writeln!(
        text,
        "replay of {} records since {since_text} from {from}, with {} in enforce mode (policy {}); records read through the API are not chain-verified",
        report.records,
        p.kind_name(),
        report.policy_version
    );
    let full = replay::text(&report, 0);
    // The first line of the file report speaks of files and chains; the line above replaces it.
    text.push_str(full.split_once('\n').map_or("", |(_, rest)| rest));
    for b in &bad_cells {
        let _ = writeln!(text, "cell not usable for replay: {b}");
    }
    Ok(PromotePlan {
        policy: p,
        report,
        text,
    })
}

/// Sets `spec.mode: enforce`, only if the spec is still the generation `plan` replayed (a JSON
/// patch whose first operation tests it), field manager `kubectl-cellgate`; returns the new
/// generation.
///
/// # Errors
/// The spec changed since (the test fails: 422), or the API server's answer.
pub async fn set_enforce(client: Client, plan: &PromotePlan) -> anyhow::Result<i64> {
    let ops = serde_json::json!([
        {"op": "test", "path": "/metadata/generation", "value": plan.policy.generation},
        {"op": "add", "path": "/spec/mode", "value": "enforce"},
    ]);
    let params = PatchParams {
        field_manager: Some(KUBECTL_FIELD_MANAGER.into()),
        ..Default::default()
    };
    let (_, generation) = patch_policy(
        client,
        &plan.policy.pref,
        &params,
        &Patch::Json(serde_json::from_value(ops)?),
    )
    .await
    .with_context(|| {
        format!(
            "setting spec.mode: enforce on {} (did its spec change since generation {}?)",
            plan.policy.pref.display(),
            plan.policy.generation
        )
    })?;
    Ok(generation)
}

/// `policy history NAME`.
pub async fn history(args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let (client, pref) = resolve(&args.which, &args.name).await?;
    print!("{}", history_text(client, &pref).await?);
    Ok(ExitCode::SUCCESS)
}

/// `policy rollback NAME VERSION`.
pub async fn rollback_cmd(args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let (client, pref) = resolve(&args.which, &args.name).await?;
    let r = rollback(client, &pref, &args.which.control_namespace, args.version).await?;
    println!(
        "{} {}: spec set to version {} ({}) as generation {}{}; the operator validates it and records it as a new version (see `kubectl cellgate policy history {}`)",
        pref.kind(),
        pref.display(),
        r.version,
        r.hash,
        r.generation,
        if r.replaced {
            " (replaced whole: another field manager owned fields the old version lacks)"
        } else {
            ""
        },
        pref.name
    );
    Ok(ExitCode::SUCCESS)
}

/// `policy promote NAME [--yes]`.
pub async fn promote(args: PromoteArgs) -> anyhow::Result<ExitCode> {
    let back = humantime::parse_duration(&args.since)
        .with_context(|| format!("--since {:?}: expected a duration like 24h", args.since))?;
    let since = SystemTime::now()
        .checked_sub(back)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let (client, pref) = resolve(&args.which, &args.name).await?;
    let source = match &args.api_url {
        None => AuditSource::Nodes,
        Some(url) => {
            let audit = kubectl::AuditArgs {
                cell: None,
                since: Some(humantime::format_rfc3339_seconds(since).to_string()),
                decision: None,
                host: None,
                reason: None,
                all_namespaces: pref.namespace.is_none(),
                api_url: Some(url.clone()),
                api_ca: args.api_ca.clone(),
                token: args.token.clone(),
                limit: args.limit,
                json: true,
                control_namespace: args.which.control_namespace.clone(),
                target: args.which.target.clone(),
            };
            let (api, ns) = kubectl::api_client(&audit, url).await?;
            let path = audit.api_path(pref.namespace.as_deref().unwrap_or(&ns))?;
            AuditSource::ControlApi { client: api, path }
        }
    };
    let plan = promote_plan(
        client.clone(),
        &pref,
        &args.which.control_namespace,
        source,
        since,
        args.limit,
    )
    .await?;
    print!("{}", plan.text);
    if plan.policy.status.mode == Some(PackMode::Enforce) {
        println!(
            "{} already enforces: nothing to switch",
            plan.policy.kind_name()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !args.yes
        && !confirm(&format!(
            "switch {} to enforce ({} requests it let through would be denied)? [y/N] ",
            plan.policy.kind_name(),
            plan.report.new_denials
        ))?
    {
        println!("not switched");
        return Ok(ExitCode::from(1));
    }
    let generation = set_enforce(client, &plan).await?;
    println!(
        "{} set to mode enforce (generation {generation}); the operator validates it and nodes load it once accepted",
        plan.policy.kind_name()
    );
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal; refuses (an error) when stdin is not one.
fn confirm(question: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if !std::io::stdin().is_terminal() {
        bail!("not switched: stdin is not a terminal to confirm on; pass --yes after reading the report");
    }
    print!("{question}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}
