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
    /// The node's admin address.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// The node's admin token file (when the node runs with --admin-token-file).
    #[arg(long, env = "CELLGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
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
        args.admin,
        args.admin_token_file.as_ref(),
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
