//! `kubectl cellgate`: look at, revoke, suspend and resume cells in a cluster, and read their audit.
//!
//! Every command edits or reads the `AgentCell` object itself, so GitOps tools see the change and the
//! operator and nodes act on it like on any other edit. `revoke`, `suspend` and `resume` then wait
//! until the node proxy that hosts the cell's pod reports (in `status.enforcement`) that it enforces
//! the new generation, and say how long that took.
//!
//! The functions taking a [`kube::Client`] do the work and return text; the thin wrappers at the
//! top build the client from the kubeconfig (`KUBECONFIG`, `--context`) and print. Start reading at
//! [`revoke_capability`].

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use cellgate_api::crd::{self, AgentCellResource};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;

/// How often `--wait` re-reads the cell's status.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The most audit records one `audit` call asks the node for (the node caps it too).
const MAX_AUDIT_LIMIT: usize = 1000;
/// The Secret (in the control namespace) holding the token the node's `/audit` requires.
pub const ADMIN_TOKEN_SECRET: &str = "cellgate-admin-token";
/// Its key.
pub const ADMIN_TOKEN_KEY: &str = "token";

/// The node's admin port, where `/audit` is served.
pub const NODE_ADMIN_PORT: u16 = 15021;
/// Label the node DaemonSet's pods carry.
pub const NODE_POD_SELECTOR: &str =
    "app.kubernetes.io/name=cellgate,app.kubernetes.io/component=node";

/// Which cluster and namespace.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Target {
    /// Namespace of the cell (default: the kubeconfig context's namespace).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// kubeconfig context to use (default: the current context).
    #[arg(long)]
    pub context: Option<String>,
}

/// `status [CELL]`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// A cell to show in detail; all cells of the namespace when absent.
    pub cell: Option<String>,
    /// All namespaces.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Namespace the node DaemonSet runs in (where the lockdown ConfigMap is).
    #[arg(long, default_value = "cellgate-system")]
    pub control_namespace: String,
    #[command(flatten)]
    pub target: Target,
}

/// How long to wait for enforcement.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// How long to wait for the node to enforce the change.
    #[arg(long, default_value = "30s")]
    pub timeout: String,
    /// Return once the AgentCell is edited, without waiting for enforcement.
    #[arg(long)]
    pub no_wait: bool,
}

/// `revoke CELL CAPABILITY`.
#[derive(Debug, Clone, clap::Args)]
pub struct RevokeArgs {
    /// The cell.
    pub cell: String,
    /// The capability to remove.
    pub capability: String,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub target: Target,
}

/// `suspend CELL` and `resume CELL`.
#[derive(Debug, Clone, clap::Args)]
pub struct CellArgs {
    /// The cell.
    pub cell: String,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub target: Target,
}

/// `audit [CELL]`: one cell's recent decisions from its node, or (with `--since`, `--decision`,
/// `--host`, `--reason`, `-A` or `--api-url`) a query across every node through the operator's
/// control API.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// The cell whose recent decisions to show.
    pub cell: Option<String>,
    /// Records at or after this time: RFC 3339, or a duration back from now (1h) [control API].
    #[arg(long)]
    pub since: Option<String>,
    /// Only these decisions: allow, deny, error, shadow_deny, approval, control (comma-separated)
    /// [control API].
    #[arg(long)]
    pub decision: Option<String>,
    /// Only requests to this host [control API].
    #[arg(long)]
    pub host: Option<String>,
    /// Only records with this reason label, e.g. no_capability [control API].
    #[arg(long)]
    pub reason: Option<String>,
    /// Every namespace, every node [control API].
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// The operator's control API, e.g. https://localhost:8443 after
    /// `kubectl -n cellgate-system port-forward svc/cellgate-operator-api 8443`.
    #[arg(long, env = "CELLGATE_API_URL")]
    pub api_url: Option<String>,
    /// CA certificate (PEM) the control API's certificate is checked against (default: the
    /// kubeconfig cluster's CA).
    #[arg(long, env = "CELLGATE_API_CA")]
    pub api_ca: Option<std::path::PathBuf>,
    /// Bearer token for the control API (default: the kubeconfig user's token or exec plugin).
    #[arg(long, env = "CELLGATE_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How many records, newest last.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Print the records as JSON lines, as the node wrote them.
    #[arg(long)]
    pub json: bool,
    /// Namespace the node DaemonSet runs in.
    #[arg(long, default_value = "cellgate-system")]
    pub control_namespace: String,
    #[command(flatten)]
    pub target: Target,
}

/// Runs a command on a small runtime.
pub fn block_on(
    fut: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(fut)
}

/// A client from the kubeconfig (or the in-cluster config) and the namespace to use.
pub(crate) async fn connect(target: &Target) -> anyhow::Result<(Client, String)> {
    // kube's rustls needs a process-wide crypto provider; ring is the one the workspace builds.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match &target.context {
        Some(context) => {
            let options = kube::config::KubeConfigOptions {
                context: Some(context.clone()),
                ..Default::default()
            };
            kube::Config::from_kubeconfig(&options).await?
        }
        None => kube::Config::infer().await.context(
            "no cluster: set KUBECONFIG or run inside a pod (kubectl cellgate reads the kubeconfig)",
        )?,
    };
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, namespace))
}

fn parse_timeout(s: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(s).with_context(|| format!("--timeout {s:?}: expected e.g. 30s"))
}

/// `status [CELL]`.
pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let (client, namespace) = connect(&args.target).await?;
    let ns = if args.all_namespaces {
        None
    } else {
        Some(namespace.as_str())
    };
    let text = match &args.cell {
        Some(cell) => status_one(client.clone(), &namespace, cell).await?,
        None => status_table(client.clone(), ns).await?,
    };
    print!("{text}");
    print!(
        "{}",
        lockdown_status(client, &args.control_namespace).await?
    );
    Ok(ExitCode::SUCCESS)
}

/// The cluster's lockdowns in force, one line each (empty when none).
///
/// # Errors
/// When the API server refuses (a missing ConfigMap is no lockdown).
pub async fn lockdown_status(client: Client, control_namespace: &str) -> anyhow::Result<String> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client, control_namespace);
    let Some(cm) = api
        .get_opt(crd::LOCKDOWN_CONFIGMAP)
        .await
        .with_context(|| format!("reading {control_namespace}/{}", crd::LOCKDOWN_CONFIGMAP))?
    else {
        return Ok(String::new());
    };
    let mut out = String::new();
    for (key, value) in cm.data.iter().flatten() {
        let scope = if key == crd::LOCKDOWN_KEY_CLUSTER {
            "every cell in the cluster".to_string()
        } else if let Some(ns) = key.strip_prefix(crd::LOCKDOWN_KEY_NAMESPACE) {
            format!("namespace {ns}")
        } else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(value).unwrap_or_default();
        let f = |k: &str| v[k].as_str().unwrap_or("?").to_string();
        let _ = writeln!(
            out,
            "LOCKDOWN {scope}: {} (by {}, since {})",
            f("reason"),
            f("by"),
            f("since")
        );
    }
    Ok(out)
}

/// `revoke CELL CAPABILITY`.
pub async fn revoke(args: RevokeArgs) -> anyhow::Result<ExitCode> {
    let timeout = parse_timeout(&args.wait.timeout)?;
    let (client, ns) = connect(&args.target).await?;
    let generation = revoke_capability(client.clone(), &ns, &args.cell, &args.capability).await?;
    println!(
        "agentcell {ns}/{} edited: capability {:?} removed (generation {generation})",
        args.cell, args.capability
    );
    report_enforcement(client, &ns, &args.cell, generation, &args.wait, timeout).await
}

/// `suspend CELL` (`suspended` true) and `resume CELL` (false).
pub async fn suspend(args: CellArgs, suspended: bool) -> anyhow::Result<ExitCode> {
    let timeout = parse_timeout(&args.wait.timeout)?;
    let (client, ns) = connect(&args.target).await?;
    let generation = set_suspended(client.clone(), &ns, &args.cell, suspended).await?;
    let what = if suspended { "suspended" } else { "resumed" };
    println!(
        "agentcell {ns}/{} {what} (generation {generation})",
        args.cell
    );
    report_enforcement(client, &ns, &args.cell, generation, &args.wait, timeout).await
}

async fn report_enforcement(
    client: Client,
    ns: &str,
    cell: &str,
    generation: i64,
    wait: &WaitArgs,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    if wait.no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    match wait_enforced(client, ns, cell, generation, timeout, POLL_INTERVAL).await? {
        Enforced::Yes { node, after } => {
            println!(
                "enforced by node {node} {} ms after the edit",
                after.as_millis()
            );
            Ok(ExitCode::SUCCESS)
        }
        Enforced::TimedOut { last } => {
            println!(
                "not confirmed within {}: {last}",
                humantime::format_duration(timeout)
            );
            Ok(ExitCode::from(1))
        }
    }
}

impl AuditArgs {
    /// Whether the query goes to the control API rather than to one cell's node.
    pub fn uses_control_api(&self) -> bool {
        self.since.is_some()
            || self.decision.is_some()
            || self.host.is_some()
            || self.reason.is_some()
            || self.all_namespaces
            || self.api_url.is_some()
    }

    /// The control API's `/api/v1/audit` path and query for these arguments.
    ///
    /// # Errors
    /// A cell given as `NS/NAME` outside the namespace asked for.
    pub fn api_path(&self, namespace: &str) -> anyhow::Result<String> {
        let enc = |s: &str| {
            let mut out = String::new();
            for b in s.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    out.push(char::from(b));
                } else {
                    let _ = write!(out, "%{b:02X}");
                }
            }
            out
        };
        let mut q = Vec::new();
        match (&self.cell, self.all_namespaces) {
            (Some(cell), _) => {
                let full = if cell.contains('/') {
                    cell.clone()
                } else {
                    format!("{namespace}/{cell}")
                };
                q.push(format!("cell={}", enc(&full)));
            }
            (None, false) => q.push(format!("namespace={}", enc(namespace))),
            (None, true) => {}
        }
        for (k, v) in [
            ("since", &self.since),
            ("decision", &self.decision),
            ("host", &self.host),
            ("reason", &self.reason),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", enc(v)));
            }
        }
        q.push(format!("limit={}", self.limit.clamp(1, MAX_AUDIT_LIMIT)));
        Ok(format!("/api/v1/audit?{}", q.join("&")))
    }
}

/// A client for the control API at `url`: the kubeconfig's credentials (or `token`) and TLS
/// settings, pointed at the operator's Service instead of the API server.
pub(crate) async fn api_client(args: &AuditArgs, url: &str) -> anyhow::Result<(Client, String)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = match &args.target.context {
        Some(context) => {
            let options = kube::config::KubeConfigOptions {
                context: Some(context.clone()),
                ..Default::default()
            };
            kube::Config::from_kubeconfig(&options).await?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig: set KUBECONFIG (its namespace and credentials are used)")?,
    };
    let namespace = args
        .target
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    config.cluster_url = url
        .parse()
        .with_context(|| format!("--api-url {url:?}: expected e.g. https://localhost:8443"))?;
    config.tls_server_name = None;
    if let Some(ca) = &args.api_ca {
        let pem =
            std::fs::read(ca).with_context(|| format!("reading --api-ca {}", ca.display()))?;
        let ders = pem_certificates(&pem);
        if ders.is_empty() {
            bail!("--api-ca {}: no PEM certificate", ca.display());
        }
        config.root_cert = Some(ders);
        config.root_cert_file = None;
    }
    if let Some(token) = &args.token {
        config.auth_info = kube::config::AuthInfo {
            token: Some(token.clone().into()),
            ..Default::default()
        };
    }
    Ok((Client::try_from(config)?, namespace))
}

/// The DER bodies of the PEM `CERTIFICATE` blocks in `pem`.
fn pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .map(|c| c.as_ref().to_vec())
        .collect()
}

/// The records the control API answers for `path` (NDJSON), as a table or as they came.
///
/// # Errors
/// The control API refuses (401, 403, ...) or cannot be reached.
pub async fn audit_api_text(client: Client, path: &str, json: bool) -> anyhow::Result<String> {
    let request = http::Request::get(path).body(Vec::new())?;
    let body = client
        .request_text(request)
        .await
        .with_context(|| format!("GET {path} on the control API"))?;
    if json {
        return Ok(body);
    }
    Ok(format_audit(&body))
}

/// `audit CELL`, or a cross-node query through the control API.
pub async fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    if args.uses_control_api() {
        let Some(url) = args.api_url.clone() else {
            bail!(
                "--since, --decision, --host, --reason and -A query every node through the operator's control API: \
                 give --api-url (or CELLGATE_API_URL), e.g. https://localhost:8443 after \
                 `kubectl -n {} port-forward svc/cellgate-operator-api 8443`",
                args.control_namespace
            );
        };
        let (client, ns) = api_client(&args, &url).await?;
        let path = args.api_path(&ns)?;
        print!("{}", audit_api_text(client, &path, args.json).await?);
        return Ok(ExitCode::SUCCESS);
    }
    let Some(cell) = args.cell.clone() else {
        bail!("audit: name a cell (`audit CELL`) or a file to verify (`audit verify FILE`)");
    };
    let (client, ns) = connect(&args.target).await?;
    let text = audit_text(
        client,
        &ns,
        &cell,
        &args.control_namespace,
        args.limit,
        args.json,
    )
    .await?;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn cells(client: Client, ns: Option<&str>) -> Api<AgentCellResource> {
    match ns {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

fn condition_status(cell: &AgentCellResource, type_: &str) -> String {
    cell.status
        .as_ref()
        .and_then(|s| s.condition(type_))
        .map(|c| c.status.clone())
        .unwrap_or_else(|| "Unknown".into())
}

/// One line per cell: namespace, name, phase, capabilities, enforced, token expiry, node.
///
/// # Errors
/// The API server's answer when listing fails.
pub async fn status_table(client: Client, ns: Option<&str>) -> anyhow::Result<String> {
    let list = cells(client, ns).list(&ListParams::default()).await?;
    let mut rows = vec![[
        "NAMESPACE".to_string(),
        "NAME".into(),
        "PHASE".into(),
        "CAPABILITIES".into(),
        "SUSPENDED".into(),
        "ENFORCED".into(),
        "TOKEN-EXPIRY".into(),
        "NODE".into(),
    ]];
    for c in &list.items {
        let status = c.status.clone().unwrap_or_default();
        rows.push([
            c.metadata.namespace.clone().unwrap_or_default(),
            c.metadata.name.clone().unwrap_or_default(),
            status.phase.clone().unwrap_or_else(|| "-".into()),
            c.spec.capabilities.len().to_string(),
            c.spec.suspended.to_string(),
            condition_status(c, "Enforced"),
            status.token_expiry.clone().unwrap_or_else(|| "-".into()),
            status.node.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    if list.items.is_empty() {
        return Ok(match ns {
            Some(ns) => format!("no agentcells in namespace {ns}\n"),
            None => "no agentcells\n".into(),
        });
    }
    Ok(table(&rows))
}

pub(crate) fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (w, cell)) in widths.iter().zip(row).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}   ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One cell in detail: phase, conditions with reasons, capabilities, token, enforcement.
///
/// # Errors
/// Not found, or the API server's answer.
pub async fn status_one(client: Client, ns: &str, name: &str) -> anyhow::Result<String> {
    let cell = get_cell(client, ns, name).await?;
    let status = cell.status.clone().unwrap_or_default();
    let generation = cell.metadata.generation.unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(out, "AgentCell {ns}/{name} (generation {generation})");
    let _ = writeln!(
        out,
        "  phase:        {}",
        status.phase.as_deref().unwrap_or("-")
    );
    if let Some(m) = &status.message {
        let _ = writeln!(out, "  message:      {m}");
    }
    let _ = writeln!(out, "  suspended:    {}", cell.spec.suspended);
    let _ = writeln!(
        out,
        "  pod:          {} on {}",
        status.pod_ip.as_deref().unwrap_or("-"),
        status.node.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "  token:        {} (expires {})",
        status.token_id.as_deref().unwrap_or("-"),
        status.token_expiry.as_deref().unwrap_or("-")
    );
    match &status.enforcement {
        Some(e) => {
            let _ = writeln!(
                out,
                "  enforcement:  node {} enforces generation {} (since {})",
                e.node, e.observed_generation, e.time
            );
        }
        None => {
            let _ = writeln!(out, "  enforcement:  no node has reported yet");
        }
    }
    if let Some(u) = &status.usage {
        let _ = writeln!(
            out,
            "  budgets:      counted by node {} at {}",
            u.node, u.time
        );
        for part in u.summary.split("; ").filter(|p| !p.is_empty()) {
            let _ = writeln!(out, "    {part}");
        }
    }
    let _ = writeln!(out, "  conditions:");
    if status.conditions.is_empty() {
        let _ = writeln!(out, "    (none yet)");
    }
    for c in &status.conditions {
        let _ = writeln!(
            out,
            "    {:<12} {:<7} {}{}",
            c.type_,
            c.status,
            c.reason,
            if c.message.is_empty() {
                String::new()
            } else {
                format!(": {}", c.message)
            }
        );
    }
    let _ = writeln!(out, "  capabilities:");
    if cell.spec.capabilities.is_empty() {
        let _ = writeln!(out, "    (none: every request is denied)");
    }
    for cap in &cell.spec.capabilities {
        let dests: Vec<String> = cap
            .destinations
            .iter()
            .map(|d| {
                let what = d
                    .host
                    .clone()
                    .or_else(|| d.cidr.clone())
                    .unwrap_or_default();
                if d.ports.is_empty() {
                    what
                } else {
                    let ports: Vec<String> = d.ports.iter().map(u16::to_string).collect();
                    format!("{what}:{}", ports.join(","))
                }
            })
            .collect();
        let mode = cap.mode.map(|m| m.as_str()).unwrap_or("enforce");
        let _ = writeln!(out, "    {:<16} {:<8} {}", cap.name, mode, dests.join(" "));
    }
    Ok(out)
}

async fn get_cell(client: Client, ns: &str, name: &str) -> anyhow::Result<AgentCellResource> {
    let api: Api<AgentCellResource> = Api::namespaced(client, ns);
    match api.get_opt(name).await? {
        Some(c) => Ok(c),
        None => bail!("agentcell {ns}/{name} not found"),
    }
}

/// Removes capability `capability` from the cell and returns the cell's new generation.
///
/// The edit is a JSON patch that first *tests* the capability's position and name, so a concurrent
/// edit of the list makes it fail instead of removing another capability.
///
/// # Errors
/// No such cell or capability (naming the ones there are), or the API server's answer.
pub async fn revoke_capability(
    client: Client,
    ns: &str,
    name: &str,
    capability: &str,
) -> anyhow::Result<i64> {
    let cell = get_cell(client.clone(), ns, name).await?;
    let Some(index) = cell
        .spec
        .capabilities
        .iter()
        .position(|c| c.name == capability)
    else {
        let names: Vec<&str> = cell
            .spec
            .capabilities
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        bail!(
            "agentcell {ns}/{name} has no capability {capability:?} (it has: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    };
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": format!("/spec/capabilities/{index}/name"), "value": capability},
        {"op": "remove", "path": format!("/spec/capabilities/{index}")},
    ]))?;
    let api: Api<AgentCellResource> = Api::namespaced(client, ns);
    let params = PatchParams {
        field_manager: Some(crd::KUBECTL_FIELD_MANAGER.into()),
        ..Default::default()
    };
    let updated = api
        .patch(name, &params, &Patch::<()>::Json(patch))
        .await
        .with_context(|| format!("removing capability {capability:?} from {ns}/{name}"))?;
    updated
        .metadata
        .generation
        .ok_or_else(|| anyhow!("the API server returned {ns}/{name} without a generation"))
}

/// Sets `spec.suspended` and returns the cell's new generation.
///
/// # Errors
/// No such cell, or the API server's answer.
pub async fn set_suspended(
    client: Client,
    ns: &str,
    name: &str,
    suspended: bool,
) -> anyhow::Result<i64> {
    let api: Api<AgentCellResource> = Api::namespaced(client, ns);
    let params = PatchParams {
        field_manager: Some(crd::KUBECTL_FIELD_MANAGER.into()),
        ..Default::default()
    };
    let patch = serde_json::json!({"spec": {"suspended": suspended}});
    let updated = match api.patch(name, &params, &Patch::Merge(&patch)).await {
        Ok(c) => c,
        Err(kube::Error::Api(e)) if e.code == 404 => bail!("agentcell {ns}/{name} not found"),
        Err(e) => return Err(e.into()),
    };
    updated
        .metadata
        .generation
        .ok_or_else(|| anyhow!("the API server returned {ns}/{name} without a generation"))
}

/// Whether a node reported enforcing a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforced {
    /// `status.enforcement.observedGeneration` reached the generation.
    Yes {
        /// The reporting node.
        node: String,
        /// How long after the call it was seen.
        after: Duration,
    },
    /// Not within the timeout; what the status said last.
    TimedOut {
        /// A human-readable account of the last status seen.
        last: String,
    },
}

/// Re-reads the cell until a node reports enforcing `generation` (or a later one).
///
/// # Errors
/// The cell disappears, or the API server fails.
pub async fn wait_enforced(
    client: Client,
    ns: &str,
    name: &str,
    generation: i64,
    timeout: Duration,
    poll: Duration,
) -> anyhow::Result<Enforced> {
    let start = Instant::now();
    loop {
        let cell = get_cell(client.clone(), ns, name).await?;
        let status = cell.status.unwrap_or_default();
        let last = match &status.enforcement {
            Some(e) if e.observed_generation >= generation => {
                return Ok(Enforced::Yes {
                    node: e.node.clone(),
                    after: start.elapsed(),
                });
            }
            Some(e) => format!(
                "node {} still reports generation {} (want {generation})",
                e.node, e.observed_generation
            ),
            None => match status.node {
                Some(node) => format!("node {node} has not reported yet"),
                None => "the cell's pod is not scheduled on a node yet".into(),
            },
        };
        if start.elapsed() + poll > timeout {
            return Ok(Enforced::TimedOut { last });
        }
        tokio::time::sleep(poll).await;
    }
}

/// The cell's most recent audit records, read from the node proxy that hosts its pod through the
/// API server's pod proxy (`/api/v1/namespaces/NS/pods/POD:15021/proxy/audit`).
///
/// # Errors
/// The cell has no node yet, no node proxy runs there, or the API server or node fails.
pub async fn audit_text(
    client: Client,
    ns: &str,
    name: &str,
    control_ns: &str,
    limit: usize,
    json: bool,
) -> anyhow::Result<String> {
    let cell = get_cell(client.clone(), ns, name).await?;
    let Some(node) = cell.status.and_then(|s| s.node) else {
        bail!("agentcell {ns}/{name} has no pod on a node yet (status.node is empty): no audit to read");
    };
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), control_ns);
    let list = pods
        .list(
            &ListParams::default()
                .labels(NODE_POD_SELECTOR)
                .fields(&format!("spec.nodeName={node}")),
        )
        .await?;
    let Some(pod) = list.items.first().and_then(|p| p.metadata.name.clone()) else {
        bail!("no cellgate-node pod on node {node} in namespace {control_ns}");
    };
    // The node answers /audit only with its admin token; reading the Secret is what RBAC
    // grants or refuses to whoever runs this.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), control_ns);
    let secret = secrets.get(ADMIN_TOKEN_SECRET).await.with_context(|| {
        format!("reading the node admin token (secret {control_ns}/{ADMIN_TOKEN_SECRET}, key {ADMIN_TOKEN_KEY})")
    })?;
    let token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(ADMIN_TOKEN_KEY))
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
        .filter(|t| !t.is_empty())
        .with_context(|| {
            format!("secret {control_ns}/{ADMIN_TOKEN_SECRET} has no key {ADMIN_TOKEN_KEY}")
        })?;
    let limit = limit.clamp(1, MAX_AUDIT_LIMIT);
    let uri = format!(
        "/api/v1/namespaces/{control_ns}/pods/{pod}:{NODE_ADMIN_PORT}/proxy/audit?cell={ns}%2F{name}&limit={limit}"
    );
    let request = http::Request::get(uri)
        .header(cellgate_api::crd::ADMIN_TOKEN_HEADER, token)
        .body(Vec::new())?;
    let body = client
        .request_text(request)
        .await
        .with_context(|| format!("reading the audit of {ns}/{name} from {control_ns}/{pod}"))?;
    if json {
        return Ok(body);
    }
    Ok(format_audit(&body))
}

/// A table of audit JSON lines: time, decision, reason, capability, method, host, path.
fn format_audit(body: &str) -> String {
    let mut rows = vec![[
        "TIME".to_string(),
        "DECISION".into(),
        "REASON".into(),
        "CAPABILITY".into(),
        "METHOD".into(),
        "HOST".into(),
        "PATH".into(),
    ]];
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let field = |k: &str| match v.get(k) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(","),
            Some(serde_json::Value::Null) | None => "-".into(),
            Some(other) => other.to_string(),
        };
        rows.push([
            field("time"),
            field("decision"),
            field("reasons"),
            field("capability"),
            field("method"),
            field("host"),
            field("path"),
        ]);
    }
    if rows.len() == 1 {
        return "no audit records match\n".into();
    }
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        audit: AuditArgs,
    }

    fn parse(args: &[&str]) -> AuditArgs {
        let mut v = vec!["audit"];
        v.extend_from_slice(args);
        Cli::parse_from(v).audit
    }

    #[test]
    fn the_control_api_path_carries_the_filters() {
        let a = parse(&["triage"]);
        assert!(
            !a.uses_control_api(),
            "the single-cell form reads the cell's node"
        );
        let a = parse(&[
            "-A",
            "--since",
            "1h",
            "--decision",
            "deny,error",
            "--host",
            "api.example.com",
            "--limit",
            "20",
        ]);
        assert!(a.uses_control_api());
        assert_eq!(
            a.api_path("agents").unwrap(),
            "/api/v1/audit?since=1h&decision=deny%2Cerror&host=api.example.com&limit=20"
        );
        let a = parse(&["triage", "--reason", "no_capability"]);
        assert!(a.uses_control_api());
        assert_eq!(
            a.api_path("agents").unwrap(),
            "/api/v1/audit?cell=agents%2Ftriage&reason=no_capability&limit=50"
        );
        let a = parse(&["--since", "2030-01-01T00:00:00Z"]);
        assert_eq!(
            a.api_path("agents").unwrap(),
            "/api/v1/audit?namespace=agents&since=2030-01-01T00%3A00%3A00Z&limit=50"
        );
    }

    #[tokio::test]
    async fn control_api_records_are_shown_as_a_table() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("a call");
            assert_eq!(req.method(), http::Method::GET);
            assert_eq!(
                req.uri().to_string(),
                "/api/v1/audit?decision=deny&limit=50"
            );
            let line = serde_json::json!({"time": "2030-01-01T00:00:01Z", "decision": "deny",
                "reasons": ["no_capability"], "host": "api.example.com", "method": "GET", "path": "/x"});
            send.send_response(Response::new(Body::from(format!("{line}\n").into_bytes())));
        });
        let text = audit_api_text(client, "/api/v1/audit?decision=deny&limit=50", false)
            .await
            .expect("answer");
        server.await.expect("server");
        assert!(text.starts_with("TIME"), "{text}");
        assert!(
            text.contains("deny") && text.contains("api.example.com"),
            "{text}"
        );
    }
}
