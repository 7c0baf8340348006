//! Commands that talk to a running node's admin API (local mode): `cellgate lockdown`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};

/// The node's admin address `cellgate run` and `cellgate-node` use by default.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15021";

/// `cellgate lockdown on|off`: one node through its admin API, or (`--cluster`, or as
/// `kubectl cellgate` without `--admin`) every node of a cluster through the API server.
#[derive(Debug, clap::Args)]
pub struct LockdownArgs {
    /// `on` refuses every request of every cell (or of one namespace) at once; `off` lifts it.
    #[arg(value_parser = ["on", "off"])]
    pub state: String,
    /// Only the cells of this namespace (default: every cell on the node).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Why: written to the audit log and shown to operators.
    #[arg(long)]
    pub reason: String,
    /// Every node of the cluster (the `cellgate-lockdown` ConfigMap), not one node's admin API.
    #[arg(long, conflicts_with = "admin")]
    pub cluster: bool,
    /// kubeconfig context (with --cluster).
    #[arg(long)]
    pub context: Option<String>,
    /// Namespace the node DaemonSet runs in (with --cluster).
    #[arg(long, default_value = "cellgate-system")]
    pub control_namespace: String,
    #[command(flatten)]
    pub admin: OptionalAdminArgs,
}

/// The admin address, optional: absent means the default node, or the cluster.
#[derive(Debug, clap::Args)]
pub struct OptionalAdminArgs {
    /// The node's admin address (default 127.0.0.1:15021).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// The node's admin token file (when the node runs with --admin-token-file).
    #[arg(long, env = "CELLGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// Whether this process was started as the kubectl plugin.
fn as_kubectl_plugin() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().starts_with("kubectl-cellgate"))
        })
        .unwrap_or(false)
}

/// Sends one request to the admin API and returns the status and body.
async fn call(
    admin: SocketAddr,
    token_file: Option<&PathBuf>,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(http::StatusCode, String)> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!("connecting to the node's admin API at {admin} (is the node running? --admin)")
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, admin.to_string());
    if let Some(f) = token_file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("reading the admin token {}", f.display()))?;
        req = req.header(cellgate_api::crd::ADMIN_TOKEN_HEADER, t.trim());
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = req
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let text = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

/// Sets or lifts a lockdown, on one node or on the cluster, and prints what is in force.
///
/// # Errors
/// When the node or the API server cannot be reached or refuses.
pub async fn lockdown(args: LockdownArgs) -> anyhow::Result<ExitCode> {
    let scope = args
        .namespace
        .as_deref()
        .map_or("every cell".to_string(), |n| format!("namespace {n}"));
    if args.cluster || (args.admin.admin.is_none() && as_kubectl_plugin()) {
        let target = crate::kubectl::Target {
            namespace: None,
            context: args.context.clone(),
        };
        let (client, _) = crate::kubectl::connect(&target).await?;
        let text = lockdown_cluster(
            client,
            &args.control_namespace,
            args.namespace.as_deref(),
            args.state == "on",
            &args.reason,
        )
        .await?;
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let body = serde_json::json!({
        "state": args.state, "namespace": args.namespace, "reason": args.reason,
    });
    let admin = args
        .admin
        .admin
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 15021)));
    let (status, text) = call(
        admin,
        args.admin.admin_token_file.as_ref(),
        http::Method::POST,
        "/lockdown",
        Some(body),
    )
    .await?;
    if !status.is_success() {
        bail!("the node refused: {status}: {}", text.trim());
    }
    println!(
        "lockdown {} for {scope} on the node at {admin}; in force now: {}",
        args.state,
        text.trim()
    );
    Ok(ExitCode::SUCCESS)
}

/// Who the API server says we are (SelfSubjectReview), for the record of a change.
async fn whoami(client: kube::Client) -> anyhow::Result<String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let api: kube::Api<SelfSubjectReview> = kube::Api::all(client);
    let review = api
        .create(
            &kube::api::PostParams::default(),
            &SelfSubjectReview::default(),
        )
        .await
        .context("asking the API server who we are (SelfSubjectReview)")?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| anyhow::anyhow!("the API server did not name the caller"))
}

/// Sets (`on`) or lifts one lockdown in the cluster's `cellgate-lockdown` ConfigMap, recording
/// the caller the API server names; every node watches it. Returns what to print.
///
/// # Errors
/// When the API server refuses or cannot be reached; nothing is changed then.
pub async fn lockdown_cluster(
    client: kube::Client,
    control_namespace: &str,
    namespace: Option<&str>,
    on: bool,
    reason: &str,
) -> anyhow::Result<String> {
    use cellgate_api::crd::{LOCKDOWN_CONFIGMAP, LOCKDOWN_KEY_CLUSTER, LOCKDOWN_KEY_NAMESPACE};
    use k8s_openapi::api::core::v1::ConfigMap;
    let reason = reason.trim();
    if reason.is_empty() {
        bail!("--reason: a reason is required");
    }
    let by = whoami(client.clone()).await?;
    let key = namespace.map_or(LOCKDOWN_KEY_CLUSTER.to_string(), |n| {
        format!("{LOCKDOWN_KEY_NAMESPACE}{n}")
    });
    let value = serde_json::json!({
        "reason": reason,
        "since": cellgate_audit::format_rfc3339(std::time::SystemTime::now()),
        "by": by,
    })
    .to_string();
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, control_namespace);
    let exists = api
        .get_opt(LOCKDOWN_CONFIGMAP)
        .await
        .with_context(|| format!("reading {control_namespace}/{LOCKDOWN_CONFIGMAP}"))?
        .is_some();
    let scope = namespace.map_or("every cell in the cluster".to_string(), |n| {
        format!("namespace {n}")
    });
    match (exists, on) {
        (false, false) => return Ok(format!("no lockdown for {scope}: nothing to lift")),
        (false, true) => {
            let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": LOCKDOWN_CONFIGMAP, "namespace": control_namespace,
                             "labels": {"app.kubernetes.io/part-of": "cellgate"}},
                "data": {key.clone(): value},
            }))?;
            api.create(&kube::api::PostParams::default(), &cm)
                .await
                .context("creating the lockdown ConfigMap")?;
        }
        (true, _) => {
            let patch = serde_json::json!({"data": {key.clone(): if on { serde_json::Value::from(value) } else { serde_json::Value::Null }}});
            api.patch(
                LOCKDOWN_CONFIGMAP,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .context("changing the lockdown ConfigMap")?;
        }
    }
    Ok(format!(
        "lockdown {} for {scope} (by {by}); every node applies it as its watch sees the change",
        if on { "on" } else { "off" }
    ))
}

/// Where approvals are decided: one node's admin API (local mode), or the cluster's
/// `AgentApproval` objects (`--cluster`, or as `kubectl cellgate` without `--admin`).
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The node's admin address (local mode; default 127.0.0.1:15021).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// The node's admin token file (when the node runs with --admin-token-file).
    #[arg(long, env = "CELLGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The cluster's AgentApprovals, not one node's admin API.
    #[arg(long, conflicts_with = "admin")]
    pub cluster: bool,
    /// Namespace (with --cluster; default: the kubeconfig context's).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// All namespaces (with --cluster, for `approvals`).
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// kubeconfig context (with --cluster).
    #[arg(long)]
    pub context: Option<String>,
}

impl AdminArgs {
    fn cluster_mode(&self) -> bool {
        self.cluster || (self.admin.is_none() && as_kubectl_plugin())
    }

    fn addr(&self) -> SocketAddr {
        self.admin
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 15021)))
    }

    async fn client(&self) -> anyhow::Result<(kube::Client, String)> {
        crate::kubectl::connect(&crate::kubectl::Target {
            namespace: self.namespace.clone(),
            context: self.context.clone(),
        })
        .await
    }
}

/// `cellgate approve ID`.
#[derive(Debug, clap::Args)]
pub struct ApproveArgs {
    /// The approval id (`cellgate approvals` lists them).
    pub id: String,
    /// How long the approval of a retry-mode request stays valid.
    #[arg(long = "for", default_value = "10m")]
    pub valid_for: String,
    /// How many times the approved request may be sent (retry mode).
    #[arg(long, default_value_t = 1)]
    pub uses: u32,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `cellgate deny ID --reason TEXT`.
#[derive(Debug, clap::Args)]
pub struct DenyArgs {
    /// The approval id.
    pub id: String,
    /// Why: written to the audit log and told to the agent.
    #[arg(long)]
    pub reason: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Lists what waits for approval, on the node or in the cluster.
///
/// # Errors
/// When the node or the API server cannot be reached or refuses.
pub async fn approvals(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let rows: Vec<[String; 8]> = if args.cluster_mode() {
        let (client, ns) = args.client().await?;
        let ns = (!args.all_namespaces).then_some(ns);
        list_cluster_approvals(client, ns.as_deref()).await?
    } else {
        let (status, text) = call(
            args.addr(),
            args.admin_token_file.as_ref(),
            http::Method::GET,
            "/approvals",
            None,
        )
        .await?;
        if !status.is_success() {
            bail!("the node refused: {status}: {}", text.trim());
        }
        let list: Vec<serde_json::Value> = serde_json::from_str(&text)?;
        list.iter()
            .map(|a| {
                let f = |k: &str| a[k].as_str().unwrap_or_default().to_string();
                [
                    f("id"),
                    f("cell"),
                    f("capability"),
                    f("mode"),
                    f("method"),
                    format!("{}{}", f("host"), f("path")),
                    f("expires_at"),
                    String::new(),
                ]
            })
            .collect()
    };
    print!("{}", approvals_table(&rows));
    Ok(ExitCode::SUCCESS)
}

/// The table `approvals` prints.
pub fn approvals_table(rows: &[[String; 8]]) -> String {
    if rows.is_empty() {
        return "no request waits for approval\n".into();
    }
    let mut out = format!(
        "{:<16} {:<24} {:<16} {:<6} {:<7} {:<40} {:<32} DECIDED\n",
        "ID", "CELL", "CAPABILITY", "MODE", "METHOD", "HOST/PATH", "EXPIRES"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<16} {:<24} {:<16} {:<6} {:<7} {:<40} {:<32} {}\n",
            r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]
        ));
    }
    out
}

/// The cluster's `AgentApproval`s (one namespace, or all).
///
/// # Errors
/// When the API server refuses.
pub async fn list_cluster_approvals(
    client: kube::Client,
    namespace: Option<&str>,
) -> anyhow::Result<Vec<[String; 8]>> {
    use cellgate_api::crd::AgentApprovalResource;
    let api: kube::Api<AgentApprovalResource> = match namespace {
        Some(ns) => kube::Api::namespaced(client, ns),
        None => kube::Api::all(client),
    };
    let list = api
        .list(&kube::api::ListParams::default())
        .await
        .context("listing AgentApprovals")?;
    Ok(list
        .items
        .iter()
        .map(|a| {
            let ns = a.metadata.namespace.clone().unwrap_or_default();
            let decided = a
                .status
                .as_ref()
                .and_then(|s| s.decision.as_ref())
                .map(|d| {
                    format!(
                        "{} by {}",
                        if d.approved { "approved" } else { "denied" },
                        d.by
                    )
                })
                .unwrap_or_default();
            [
                a.metadata.name.clone().unwrap_or_default(),
                format!("{ns}/{}", a.spec.cell),
                a.spec.capability.clone(),
                a.spec.mode.clone(),
                a.spec.method.clone(),
                format!("{}{}", a.spec.host, a.spec.path),
                a.spec.expires_at.clone(),
                decided,
            ]
        })
        .collect())
}

/// Approves or denies one pending approval, on the node or in the cluster.
///
/// # Errors
/// When the node or the API server cannot be reached, or has no such approval pending.
pub async fn decide(
    id: &str,
    admin: &AdminArgs,
    body: serde_json::Value,
) -> anyhow::Result<ExitCode> {
    if admin.cluster_mode() {
        let (client, ns) = admin.client().await?;
        let approved = body["decision"] == "approve";
        let text = decide_cluster(
            client,
            &ns,
            id,
            approved,
            body["reason"].as_str(),
            body["for"].as_str(),
            body["uses"].as_u64().and_then(|u| u32::try_from(u).ok()),
        )
        .await?;
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let (status, text) = call(
        admin.addr(),
        admin.admin_token_file.as_ref(),
        http::Method::POST,
        &format!("/approvals/{id}"),
        Some(body),
    )
    .await?;
    if !status.is_success() {
        bail!("the node refused: {status}: {}", text.trim());
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    println!(
        "{} {id}",
        if v["approved"] == true {
            "approved"
        } else {
            "denied"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Decides an `AgentApproval`: the approver is who the API server says the caller is
/// (SelfSubjectReview), never a flag; the decision goes to the status subresource, where the
/// node holding the request reads it.
///
/// # Errors
/// When the approval does not exist, is decided already, or the API server refuses.
pub async fn decide_cluster(
    client: kube::Client,
    namespace: &str,
    id: &str,
    approved: bool,
    reason: Option<&str>,
    valid_for: Option<&str>,
    uses: Option<u32>,
) -> anyhow::Result<String> {
    use cellgate_api::crd::AgentApprovalResource;
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    if !approved && reason.is_none() {
        bail!("--reason: a reason is required to deny");
    }
    let by = whoami(client.clone()).await?;
    let api: kube::Api<AgentApprovalResource> = kube::Api::namespaced(client, namespace);
    let current = api
        .get_opt(id)
        .await
        .with_context(|| format!("reading AgentApproval {namespace}/{id}"))?
        .ok_or_else(|| anyhow::anyhow!("no AgentApproval {namespace}/{id} (decided and cleaned up, expired, or never asked)"))?;
    if let Some(d) = current.status.as_ref().and_then(|s| s.decision.as_ref()) {
        bail!(
            "AgentApproval {namespace}/{id} was already {} by {}",
            if d.approved { "approved" } else { "denied" },
            d.by
        );
    }
    let at = cellgate_audit::format_rfc3339(std::time::SystemTime::now());
    let (type_, why) = if approved {
        ("Approved", "ApprovedByUser")
    } else {
        ("Denied", "DeniedByUser")
    };
    let patch = serde_json::json!({"status": {
        "decision": {"approved": approved, "by": by, "at": at, "reason": reason,
                     "validFor": if approved { valid_for } else { None }, "uses": if approved { uses } else { None }},
        "conditions": [{"type": type_, "status": "True", "reason": why,
                        "message": format!("{} by {by}{}", type_.to_lowercase(), reason.map(|r| format!(": {r}")).unwrap_or_default()),
                        "lastTransitionTime": at}],
    }});
    api.patch_status(
        id,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .with_context(|| format!("deciding AgentApproval {namespace}/{id}"))?;
    Ok(format!(
        "{} {namespace}/{id} ({} {}{}) as {by}",
        if approved { "approved" } else { "denied" },
        current.spec.method,
        current.spec.host,
        current.spec.path
    ))
}
