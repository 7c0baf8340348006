//! The admin endpoint: `/healthz` (the process is up), `/readyz` (it can decide: a valid policy,
//! a writable audit log, in Kubernetes mode a first list from every watch), `/metrics`
//! (Prometheus text) and `/audit?cell=NAMESPACE/NAME&limit=N` (that cell's most recent audit
//! records as JSON lines, oldest first; `kubectl cellgate audit` reads it through the API
//! server's pod proxy). `/audit` also filters by `namespace`, `since`/`until`, `decision`,
//! `reason` and `host`, and pages forward with `after=SEQ` (see [`AuditQuery`]): the
//! operator's control API fans that query out to every node.
//!
//! It runs on its own thread and single-threaded runtime so that a flood of scrapes never takes
//! time from the data path, and a stalled data path never hides the admin view.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::Shared;

/// Why the node is not ready, or `None` when it is.
pub fn not_ready(shared: &Shared) -> Option<String> {
    if shared.policy.current().is_none() {
        let why = shared
            .policy_source
            .last_error()
            .unwrap_or_else(|| "no policy loaded".into());
        return Some(format!("no valid policy: {why}; every request is denied"));
    }
    if let Some(e) = shared.audit.failure() {
        return Some(format!(
            "audit log unavailable: {e}; every request is denied"
        ));
    }
    if let Some(status) = shared
        .export
        .as_ref()
        .map(cellgate_otel::AuditExporter::status)
    {
        if status.over_bound {
            return Some(format!(
                "the audit export is {} records behind, past its bound: new requests are refused (audit_backlog)",
                status.backlog
            ));
        }
        if status.stalled {
            return Some(format!(
                "the audit export is stalled: {} records waiting, the oldest {:.0}s old; nothing is lost, they stay in the audit log",
                status.backlog, status.lag_seconds
            ));
        }
    }
    if let Some(Err(e)) = shared.dns.get().map(|d| d.health()) {
        return Some(format!("DNS cannot answer: {e}"));
    }
    if let Some(k) = shared.kube.get() {
        let pending = k.pending();
        if !pending.is_empty() {
            return Some(format!(
                "waiting for the first list from the Kubernetes API: {}; every request is denied meanwhile",
                pending.join(", ")
            ));
        }
    }
    if *shared.draining.borrow() {
        return Some("draining".into());
    }
    None
}

/// Records `/audit` returns when no `limit` is given.
pub const AUDIT_DEFAULT_LIMIT: usize = 100;
/// Most records one `/audit` call returns: the answer is built in memory.
pub const AUDIT_MAX_LIMIT: usize = 1000;
/// Most values one `decision=` filter may list (there are six decisions).
const AUDIT_MAX_DECISIONS: usize = 6;

/// Why an `/audit` query is refused (answered 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuditQueryError {
    /// `cell` is not `NAMESPACE/NAME`.
    #[error("cell={0:?}: expected cell=NAMESPACE/NAME")]
    Cell(String),
    /// `limit` is not a positive number.
    #[error("limit={0:?}: expected a number from 1 to {AUDIT_MAX_LIMIT}")]
    Limit(String),
    /// `since` or `until` is not an RFC 3339 time.
    #[error("{0}={1:?}: expected an RFC 3339 time such as 2030-01-01T00:00:00Z")]
    Time(&'static str, String),
    /// `after` is not a sequence number.
    #[error("after={0:?}: expected the seq of the last record already read (a number)")]
    After(String),
    /// `decision` names no known decision.
    #[error("decision={0:?}: expected allow, deny, error, shadow_deny, approval or control (comma-separated)")]
    Decision(String),
    /// A filter given with an empty value.
    #[error("{0}= is empty: leave the parameter out to match everything")]
    Empty(&'static str),
}

/// An `/audit` query: filters, a position and a limit.
///
/// Without `after` and `since` it answers the *last* `limit` matching records (the tail, what
/// `kubectl cellgate audit CELL` shows); with either it pages forward: the *first* `limit`
/// matching records whose `seq` is above `after` and whose time is at or after `since`. Records
/// come oldest first (file order) either way, so the `seq` of the last one is the `after` of the
/// next page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// `cell=NAMESPACE/NAME`.
    pub cell: Option<(String, String)>,
    /// `namespace=NS`.
    pub namespace: Option<String>,
    /// `since=RFC3339`: records at or after.
    pub since: Option<jiff::Timestamp>,
    /// `until=RFC3339`: records before.
    pub until: Option<jiff::Timestamp>,
    /// `decision=deny,error`: any of these.
    pub decisions: Vec<String>,
    /// `reason=LABEL`: the record's `reason` label.
    pub reason: Option<String>,
    /// `host=HOST`: the record's host, ignoring case.
    pub host: Option<String>,
    /// `after=SEQ`: only records with a higher `seq`.
    pub after: Option<u64>,
    /// `limit=N`, at most [`AUDIT_MAX_LIMIT`].
    pub limit: usize,
}

impl AuditQuery {
    /// Pages forward (`after` or `since` given) rather than answering the tail.
    pub fn forward(&self) -> bool {
        self.after.is_some() || self.since.is_some()
    }

    /// Whether one record (a parsed audit line) passes every filter.
    pub fn matches(&self, v: &serde_json::Value) -> bool {
        let field = |k: &str| v.get(k).and_then(|x| x.as_str());
        if let Some((ns, name)) = &self.cell {
            if field("namespace") != Some(ns.as_str()) || field("cell") != Some(name.as_str()) {
                return false;
            }
        }
        if let Some(ns) = &self.namespace {
            if field("namespace") != Some(ns.as_str()) {
                return false;
            }
        }
        if !self.decisions.is_empty()
            && !field("decision").is_some_and(|d| self.decisions.iter().any(|x| x == d))
        {
            return false;
        }
        if let Some(r) = &self.reason {
            if field("reason") != Some(r.as_str()) {
                return false;
            }
        }
        if let Some(h) = &self.host {
            if !field("host").is_some_and(|x| x.eq_ignore_ascii_case(h)) {
                return false;
            }
        }
        if let Some(after) = self.after {
            if v.get("seq").and_then(|s| s.as_u64()).unwrap_or(0) <= after {
                return false;
            }
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(t) = field("time").and_then(|t| t.parse::<jiff::Timestamp>().ok()) else {
                return false;
            };
            if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t >= u) {
                return false;
            }
        }
        true
    }
}

/// Parses an `/audit` query (percent-encoded): `cell=NAMESPACE/NAME`, `namespace=NS`,
/// `since=`/`until=` (RFC 3339), `decision=` (comma-separated), `reason=`, `host=`,
/// `after=SEQ`, `limit=N`. Every filter is optional; the limit defaults to
/// [`AUDIT_DEFAULT_LIMIT`] and is capped at [`AUDIT_MAX_LIMIT`]. Unknown parameters are ignored.
///
/// # Errors
/// A malformed `cell`, time, `after`, `decision` or `limit`, or a filter with an empty value.
pub fn parse_audit_query(query: &str) -> Result<AuditQuery, AuditQueryError> {
    const DECISIONS: [&str; AUDIT_MAX_DECISIONS] = [
        "allow",
        "deny",
        "error",
        "shadow_deny",
        "approval",
        "control",
    ];
    let mut q = AuditQuery {
        limit: AUDIT_DEFAULT_LIMIT,
        ..AuditQuery::default()
    };
    let time = |name: &'static str, v: String| {
        v.trim()
            .parse::<jiff::Timestamp>()
            .map_err(|_| AuditQueryError::Time(name, v))
    };
    let nonempty = |name: &'static str, v: String| {
        if v.trim().is_empty() {
            Err(AuditQueryError::Empty(name))
        } else {
            Ok(v.trim().to_string())
        }
    };
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_decode(v);
        match percent_decode(k).as_str() {
            "cell" => match v.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    q.cell = Some((ns.to_string(), name.to_string()));
                }
                _ => return Err(AuditQueryError::Cell(v)),
            },
            "namespace" => q.namespace = Some(nonempty("namespace", v)?),
            "since" => q.since = Some(time("since", v)?),
            "until" => q.until = Some(time("until", v)?),
            "reason" => q.reason = Some(nonempty("reason", v)?),
            "host" => q.host = Some(nonempty("host", v)?),
            "decision" => {
                for d in v.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                    if !DECISIONS.contains(&d) {
                        return Err(AuditQueryError::Decision(v.clone()));
                    }
                    if !q.decisions.iter().any(|x| x == d) {
                        q.decisions.push(d.to_string());
                    }
                }
                if q.decisions.is_empty() {
                    return Err(AuditQueryError::Empty("decision"));
                }
            }
            "after" => {
                q.after = Some(
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| AuditQueryError::After(v.clone()))?,
                );
            }
            "limit" => {
                q.limit = match v.parse::<usize>() {
                    Ok(n) if n > 0 => n.min(AUDIT_MAX_LIMIT),
                    _ => return Err(AuditQueryError::Limit(v)),
                };
            }
            _ => {}
        }
    }
    Ok(q)
}

/// The records of the audit file that `query` selects, as JSON lines, oldest first: the last
/// `limit` matches, or (paging forward, see [`AuditQuery`]) the first `limit` matches. Reads
/// the file once, keeping at most `limit` lines in memory.
///
/// # Errors
/// The file cannot be read.
pub fn audit_select(path: &std::path::Path, query: &AuditQuery) -> std::io::Result<String> {
    use std::io::BufRead as _;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    // Records are compact JSON; a line without the cell's name as a value cannot match.
    let needle = query
        .cell
        .as_ref()
        .map(|(_, name)| serde_json::Value::String(name.clone()).to_string());
    let limit = query.limit.max(1);
    let forward = query.forward();
    let mut kept: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if needle.as_ref().is_some_and(|n| !line.contains(n.as_str())) {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if !query.matches(&v) {
            continue;
        }
        if kept.len() == limit {
            if forward {
                break;
            }
            kept.pop_front();
        }
        kept.push_back(line);
    }
    let mut out = String::new();
    for l in kept {
        out.push_str(&l);
        out.push('\n');
    }
    Ok(out)
}

/// Decodes `%XX` escapes and `+` (a space) in a query component.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = (c == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (c, hex) {
            (_, Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (c, None) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The header carrying the admin token for `/audit`.
pub use cellgate_api::crd::ADMIN_TOKEN_HEADER;

/// Audit records name cells, hosts and paths of every tenant on the node: `/audit` answers only
/// a request carrying the admin token (`--admin-token-file`). Without a token file it is open in
/// local mode (the admin port is on loopback by default) and closed in Kubernetes mode, where
/// the admin port is on the node's address.
///
/// `/lockdown` answers under the same rule.
async fn audit_allowed(
    shared: &Shared,
    req: &Request<Incoming>,
) -> Result<(), Response<Full<Bytes>>> {
    let refuse = |status: StatusCode, why: &str| reply(status, "text/plain", format!("{why}\n"));
    let Some(path) = shared.config.admin_token_file.clone() else {
        if shared.config.kubernetes {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "/audit is closed: the node runs without --admin-token-file",
            ));
        }
        return Ok(());
    };
    let expected = match tokio::fs::read_to_string(&path).await {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        Ok(_) | Err(_) => {
            tracing::warn!(path = %path.display(), "admin token file unreadable or empty: /audit refused");
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "/audit is unavailable: the node cannot read its admin token",
            ));
        }
    };
    let given = req
        .headers()
        .get(ADMIN_TOKEN_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if constant_time_eq(given, expected.as_bytes()) {
        Ok(())
    } else {
        Err(refuse(
            StatusCode::UNAUTHORIZED,
            "/audit needs the node's admin token in the X-Cellgate-Admin-Token header",
        ))
    }
}

/// A response of the admin port.
fn reply(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    r
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn audit(shared: Arc<Shared>, query: String) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match parse_audit_query(&query) {
        Err(e) => (StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        Ok(q) => {
            // Denials are already durable; flush so the recent allows are there too.
            let _ = shared.audit.flush().await;
            let path = shared.config.audit.clone();
            match tokio::task::spawn_blocking(move || audit_select(&path, &q)).await {
                Ok(Ok(lines)) => (StatusCode::OK, "application/x-ndjson", lines),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the audit log for /audit");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        "the audit log cannot be read; see the node's log\n".into(),
                    )
                }
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "audit read failed\n".into(),
                ),
            }
        }
    };
    reply(status, ctype, body)
}

fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match not_ready(shared) {
            None => {
                let version = shared
                    .policy
                    .current()
                    .map(|p| p.version().to_string())
                    .unwrap_or_default();
                (
                    StatusCode::OK,
                    "text/plain",
                    format!("ready: policy {version}, {} cells\n", shared.cells.len()),
                )
            }
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz, /metrics, /lockdown, /approvals or /audit?cell=NAMESPACE/NAME\n"
                .into(),
        ),
    };
    reply(status, ctype, body)
}

/// Largest `/lockdown` request body, bytes.
const MAX_LOCKDOWN_BODY: usize = 4096;

/// `POST /lockdown` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LockdownRequest {
    /// `on` or `off`.
    state: String,
    /// One namespace; absent: node-wide.
    #[serde(default)]
    namespace: Option<String>,
    /// Why (required).
    reason: String,
}

/// `GET /lockdown`: what is in force. `POST /lockdown` (`{"state":"on"|"off","namespace":
/// null|"NS","reason":"..."}`): sets or lifts one, durably, audited, and effective for every
/// request and everything open as soon as it answers.
async fn lockdown(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    let json = |status, v: serde_json::Value| reply(status, "application/json", format!("{v}\n"));
    match *req.method() {
        http::Method::GET => {
            let mut v = serde_json::json!(shared.lockdown.state());
            if shared.config.kubernetes {
                v["cluster"] = serde_json::json!(shared.lockdown.cluster_state());
            }
            return json(StatusCode::OK, v);
        }
        http::Method::POST => {}
        _ => {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET or POST /lockdown\n".into(),
            )
        }
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_LOCKDOWN_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
    };
    let ask: LockdownRequest = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("bad /lockdown request: {e}\n"),
            )
        }
    };
    let on = match ask.state.as_str() {
        "on" => true,
        "off" => false,
        other => {
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("state {other:?}: on or off\n"),
            )
        }
    };
    let by = format!("admin API from {peer}");
    let state =
        match shared
            .lockdown
            .set(ask.namespace.as_deref(), on, &ask.reason, Some(by.clone()))
        {
            Ok(s) => s,
            Err(e @ crate::lockdown::LockdownError::Reason) => {
                return reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n"))
            }
            Err(e) => {
                tracing::error!(error = %e, "lockdown not changed");
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                );
            }
        };
    // Open connections and streams re-check now.
    shared.bump_generation();
    let scope = ask
        .namespace
        .as_deref()
        .map_or("every cell on the node".to_string(), |ns| {
            format!("namespace {ns}")
        });
    tracing::warn!(on, scope = %scope, reason = %ask.reason.trim(), by = %by, "lockdown changed");
    let mut rec = cellgate_audit::Record::new(
        &shared.config.node_name,
        "admin",
        "control",
        cellgate_audit::Decision::Control,
        if on { "lockdown_on" } else { "lockdown_off" },
    );
    rec.namespace = ask.namespace.clone();
    rec.reasons = vec![
        format!("lockdown {} for {scope}", if on { "on" } else { "off" }),
        ask.reason.trim().to_string(),
        by,
    ];
    if let Err(e) = crate::decide::record(&shared, rec).await {
        // In force already: a lockdown is never undone because its record failed.
        tracing::error!(error = %e, "lockdown record not written");
    }
    json(StatusCode::OK, serde_json::json!(state))
}

/// `POST /approvals/ID` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalDecision {
    /// `approve` or `deny`.
    decision: String,
    /// Why (required to deny).
    #[serde(default)]
    reason: Option<String>,
    /// How long an approval of a retry request stays valid (default 10m).
    #[serde(default, rename = "for")]
    valid_for: Option<String>,
    /// How many times it may be used (default 1).
    #[serde(default)]
    uses: Option<u32>,
}

/// `GET /approvals`: what waits for a human. `POST /approvals/ID`
/// (`{"decision":"approve"|"deny","reason":"…","for":"10m","uses":1}`): decides one, audited
/// with the approver (in local mode, the admin API's caller).
async fn approvals(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    use crate::approvals::Verdict;
    use http_body_util::BodyExt as _;
    let json = |status, v: serde_json::Value| reply(status, "application/json", format!("{v}\n"));
    let text = |status, t: String| reply(status, "text/plain", format!("{t}\n"));
    let now = crate::decide::now_ms();
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.strip_prefix("/approvals/")) {
        (http::Method::GET, None) => json(
            StatusCode::OK,
            serde_json::json!(shared.approvals.list(now)),
        ),
        (http::Method::POST, Some(id)) if !id.is_empty() => {
            let id = id.to_string();
            let body = match http_body_util::Limited::new(req.into_body(), MAX_LOCKDOWN_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
            };
            let ask: ApprovalDecision = match serde_json::from_slice(&body) {
                Ok(a) => a,
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad decision: {e}")),
            };
            let by = format!("admin API from {peer}");
            let reason = ask.reason.clone().unwrap_or_default().trim().to_string();
            let verdict = match ask.decision.as_str() {
                "approve" => Verdict::Approved { by: by.clone() },
                "deny" if !reason.is_empty() => Verdict::Denied {
                    by: by.clone(),
                    reason: reason.clone(),
                },
                "deny" => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "a reason is required to deny".into(),
                    )
                }
                other => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("decision {other:?}: approve or deny"),
                    )
                }
            };
            let valid = match ask
                .valid_for
                .as_deref()
                .map(cellgate_api::manifest::parse_duration)
            {
                None => 600,
                Some(Some(v)) if v <= crate::approvals::MAX_VALIDITY_SECS => v,
                Some(_) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "for: a duration of at most 24h, like 10m".into(),
                    )
                }
            };
            let uses = ask.uses.unwrap_or(1);
            if uses == 0 || uses > crate::approvals::MAX_USES {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("uses: 1 to {}", crate::approvals::MAX_USES),
                );
            }
            let approved = matches!(verdict, Verdict::Approved { .. });
            let view = match shared.approvals.decide(&id, verdict, valid, uses, now) {
                Ok(v) => v,
                Err(e) => return text(StatusCode::NOT_FOUND, e.to_string()),
            };
            let detail = if approved {
                format!("valid for {valid}s, {uses} use(s) (retry mode)")
            } else {
                reason
            };
            crate::approvals::record_decision(&shared, &view, "admin", approved, &by, detail).await;
            json(
                StatusCode::OK,
                serde_json::json!({"id": view.id, "approved": approved}),
            )
        }
        _ => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /approvals, or POST /approvals/ID".into(),
        ),
    }
}

/// Starts the admin server on its own thread.
///
/// # Errors
/// When the thread or its runtime cannot start.
pub fn spawn(shared: Arc<Shared>, listener: std::net::TcpListener) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("cellgate-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                // The admin port closes when a drain starts, like the data path's listeners.
                let mut draining = shared.draining.subscribe();
                loop {
                    let accepted = tokio::select! {
                        a = listener.accept() => a,
                        () = crate::until_draining(&mut draining) => return,
                    };
                    let Ok((stream, peer)) = accepted else {
                        continue;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: Request<Incoming>| {
                            let shared = shared.clone();
                            async move {
                                let path = req.uri().path().to_string();
                                let r = if path == "/approvals" || path.starts_with("/approvals/") {
                                    match audit_allowed(&shared, &req).await {
                                        Ok(()) => approvals(shared, req, peer).await,
                                        Err(refused) => refused,
                                    }
                                } else if path == "/lockdown" {
                                    match audit_allowed(&shared, &req).await {
                                        Ok(()) => lockdown(shared, req, peer).await,
                                        Err(refused) => refused,
                                    }
                                } else if req.uri().path() == "/audit" {
                                    match audit_allowed(&shared, &req).await {
                                        Ok(()) => {
                                            let q =
                                                req.uri().query().unwrap_or_default().to_string();
                                            audit(shared, q).await
                                        }
                                        Err(refused) => refused,
                                    }
                                } else {
                                    respond(&shared, &req)
                                };
                                Ok::<_, Infallible>(r)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell_query(ns: &str, name: &str, limit: usize) -> AuditQuery {
        AuditQuery {
            cell: Some((ns.into(), name.into())),
            limit,
            ..AuditQuery::default()
        }
    }

    #[test]
    fn audit_query() {
        assert_eq!(
            parse_audit_query("cell=agents%2Ftriage&limit=5"),
            Ok(cell_query("agents", "triage", 5))
        );
        assert_eq!(
            parse_audit_query("cell=agents/triage"),
            Ok(cell_query("agents", "triage", AUDIT_DEFAULT_LIMIT))
        );
        assert_eq!(
            parse_audit_query("limit=999999&cell=a/b"),
            Ok(cell_query("a", "b", AUDIT_MAX_LIMIT))
        );
        assert!(matches!(
            parse_audit_query("limit=0&cell=a/b"),
            Err(AuditQueryError::Limit(_))
        ));
        assert!(matches!(
            parse_audit_query("limit=x&cell=a/b"),
            Err(AuditQueryError::Limit(_))
        ));
        for bad in ["cell=", "cell=triage", "cell=/b", "cell=a/", "cell=a/b/c"] {
            assert!(
                matches!(parse_audit_query(bad), Err(AuditQueryError::Cell(_))),
                "{bad}"
            );
        }
        // No filter at all: every record, the tail.
        let all = parse_audit_query("").unwrap();
        assert_eq!(all.limit, AUDIT_DEFAULT_LIMIT);
        assert!(all.cell.is_none() && !all.forward());
        assert_eq!(percent_decode("a%2Fb+c%zz%"), "a/b c%zz%");
    }

    #[test]
    fn audit_query_filters_parse_and_refuse_bad_values() {
        let q = parse_audit_query(
            "namespace=agents&since=2030-01-01T00%3A00%3A00Z&until=2030-01-02T00:00:00Z\
             &decision=deny,error,deny&reason=no_capability&host=API.example.com&after=42&limit=7",
        )
        .unwrap();
        assert_eq!(q.namespace.as_deref(), Some("agents"));
        assert_eq!(q.since, Some("2030-01-01T00:00:00Z".parse().unwrap()));
        assert_eq!(q.until, Some("2030-01-02T00:00:00Z".parse().unwrap()));
        assert_eq!(q.decisions, ["deny", "error"]);
        assert_eq!(q.reason.as_deref(), Some("no_capability"));
        assert_eq!(q.host.as_deref(), Some("API.example.com"));
        assert_eq!(q.after, Some(42));
        assert_eq!(q.limit, 7);
        assert!(q.forward());
        assert!(parse_audit_query("since=2030-01-01T00:00:00Z")
            .unwrap()
            .forward());
        for (bad, want) in [
            (
                "since=yesterday",
                AuditQueryError::Time("since", "yesterday".into()),
            ),
            ("until=1", AuditQueryError::Time("until", "1".into())),
            ("after=-1", AuditQueryError::After("-1".into())),
            ("decision=maybe", AuditQueryError::Decision("maybe".into())),
            ("decision=,", AuditQueryError::Empty("decision")),
            ("namespace=", AuditQueryError::Empty("namespace")),
            ("host=", AuditQueryError::Empty("host")),
            ("reason=", AuditQueryError::Empty("reason")),
        ] {
            assert_eq!(parse_audit_query(bad), Err(want), "{bad}");
        }
    }

    fn seqs(out: &str) -> Vec<u64> {
        out.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn audit_select_keeps_the_last_records_of_one_cell() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut text = String::new();
        for i in 0..10 {
            let (ns, name) = match i % 3 {
                0 => ("agents", "triage"),
                1 => ("other", "triage"),
                _ => ("agents", "coder"),
            };
            text.push_str(
                &serde_json::json!({"seq": i, "cell": name, "namespace": ns}).to_string(),
            );
            text.push('\n');
        }
        text.push_str("not json \"triage\"\n");
        std::fs::write(&path, text).unwrap();
        let out = audit_select(&path, &cell_query("agents", "triage", 3)).unwrap();
        assert_eq!(seqs(&out), [3, 6, 9]);
        assert_eq!(
            audit_select(&path, &cell_query("agents", "nobody", 3)).unwrap(),
            ""
        );
        assert_eq!(
            audit_select(&dir.path().join("none"), &cell_query("a", "b", 3)).unwrap(),
            ""
        );
    }

    #[test]
    fn audit_select_filters_and_pages_forward() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut text = String::new();
        for i in 1..=12_u64 {
            let decision = ["allow", "deny", "error"][(i % 3) as usize];
            let host = if i % 2 == 0 {
                "api.example.com"
            } else {
                "other.example"
            };
            let ns = if i <= 10 { "agents" } else { "batch" };
            text.push_str(
                &serde_json::json!({
                    "seq": i, "time": format!("2030-01-01T00:00:{i:02}.000000000Z"),
                    "cell": "triage", "namespace": ns, "decision": decision,
                    "reason": if decision == "deny" { "no_capability" } else { "ok" },
                    "host": host,
                })
                .to_string(),
            );
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();
        let select = |q: &str| seqs(&audit_select(&path, &parse_audit_query(q).unwrap()).unwrap());
        // Decision and host filters (host ignores case), tail of everything.
        assert_eq!(select("decision=deny"), [1, 4, 7, 10]);
        assert_eq!(
            select("decision=deny,error&host=API.EXAMPLE.COM"),
            [2, 4, 8, 10]
        );
        assert_eq!(select("reason=no_capability&limit=2"), [7, 10]);
        assert_eq!(select("namespace=batch"), [11, 12]);
        assert_eq!(select("cell=batch/triage&decision=allow"), [12]);
        // Time range: since inclusive, until exclusive.
        assert_eq!(
            select("since=2030-01-01T00:00:03Z&until=2030-01-01T00:00:06Z"),
            [3, 4, 5]
        );
        // Forward pages: the first `limit` after the cursor, then the next ones.
        assert_eq!(select("after=0&limit=5"), [1, 2, 3, 4, 5]);
        assert_eq!(select("after=5&limit=5"), [6, 7, 8, 9, 10]);
        assert_eq!(select("after=10&limit=5"), [11, 12]);
        assert_eq!(select("after=12&limit=5"), Vec::<u64>::new());
        assert_eq!(
            select("since=2030-01-01T00:00:02Z&decision=deny&limit=1"),
            [4]
        );
        // Without a cursor or a start, the tail.
        assert_eq!(select("limit=3"), [10, 11, 12]);
    }
}
