//! Commands that talk to a running node's admin API (local mode): `cellgate lockdown`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};

/// The node's admin address `cellgate run` and `cellgate-node` use by default.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15021";

/// `cellgate lockdown on|off`.
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
    #[command(flatten)]
    pub admin: AdminArgs,
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

/// Sets or lifts a lockdown on the node and prints what is in force.
///
/// # Errors
/// When the node cannot be reached or refuses.
pub async fn lockdown(args: LockdownArgs) -> anyhow::Result<ExitCode> {
    let body = serde_json::json!({
        "state": args.state, "namespace": args.namespace, "reason": args.reason,
    });
    let (status, text) = call(
        args.admin.admin,
        args.admin.admin_token_file.as_ref(),
        http::Method::POST,
        "/lockdown",
        Some(body),
    )
    .await?;
    if !status.is_success() {
        bail!("the node refused: {status}: {}", text.trim());
    }
    let scope = args
        .namespace
        .as_deref()
        .map_or("every cell on the node".to_string(), |n| {
            format!("namespace {n}")
        });
    println!(
        "lockdown {} for {scope}; in force now: {}",
        args.state,
        text.trim()
    );
    Ok(ExitCode::SUCCESS)
}

/// Where the node's admin API is.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The node's admin address.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// The node's admin token file (when the node runs with --admin-token-file).
    #[arg(long, env = "CELLGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
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

/// Lists what waits for approval on the node.
///
/// # Errors
/// When the node cannot be reached or refuses.
pub async fn approvals(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let (status, text) = call(
        args.admin,
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
    if list.is_empty() {
        println!("no request waits for approval");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<24} {:<16} {:<6} {:<7} {:<40} EXPIRES",
        "ID", "CELL", "CAPABILITY", "MODE", "METHOD", "HOST/PATH"
    );
    for a in list {
        let f = |k: &str| a[k].as_str().unwrap_or_default().to_string();
        println!(
            "{:<16} {:<24} {:<16} {:<6} {:<7} {:<40} {}",
            f("id"),
            f("cell"),
            f("capability"),
            f("mode"),
            f("method"),
            format!("{}{}", f("host"), f("path")),
            f("expires_at")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Approves or denies one pending approval.
///
/// # Errors
/// When the node cannot be reached, or has no such approval pending.
pub async fn decide(
    id: &str,
    admin: &AdminArgs,
    body: serde_json::Value,
) -> anyhow::Result<ExitCode> {
    let (status, text) = call(
        admin.admin,
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
