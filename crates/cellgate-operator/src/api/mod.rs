//! The control API: HTTPS and JSON under `/api/v1`, served by axum (see `docs/control-api.md`).
//!
//! Every call goes through [`guard`]: the operator's audit log must be writable (else 503), the
//! bearer token is checked with a TokenReview (else 401), the handler asks a
//! SubjectAccessReview for what it is about to do ([`Authed::authorize`], else 403), and the
//! call's record (who, verb, resource, namespace, status) is written durably before the answer
//! leaves; a call whose record cannot be written is answered 503 instead.
//!
//! Start reading at [`ROUTES`] (what is served), then [`guard`] and the handlers; the audit
//! fan-out is [`audit`], authentication and authorization [`auth`], the OpenAPI document
//! [`openapi`], the certificate [`tls`].

pub mod audit;
pub mod auth;
pub mod openapi;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Extension, Json, Router};
use cellgate_api::crd::{
    AgentApprovalResource, AgentCellResource, LOCKDOWN_CONFIGMAP, LOCKDOWN_KEY_CLUSTER,
    LOCKDOWN_KEY_NAMESPACE, REVOCATIONS_CONFIGMAP,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::oplog::{Event, OperatorAudit};
use auth::{Attributes, AuthnError, Caller};

/// The Service in front of the control API (its DNS names go into a self-signed certificate).
pub const SERVICE_NAME: &str = "cellgate-operator-api";

/// Largest request body, bytes: every body is a small JSON object.
pub const MAX_BODY: usize = 16 * 1024;
/// Longest reason accepted in a body, bytes.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest `for` of an approval, seconds (the node's own cap).
pub const MAX_APPROVAL_VALIDITY_SECS: u64 = 24 * 3600;
/// Most uses of an approval (the node's own cap).
pub const MAX_APPROVAL_USES: u32 = 1000;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The operator's client (its service account).
    pub client: Client,
    /// Namespace of the control plane (revocations, lockdown, node pods, admin token).
    pub control_namespace: String,
    /// The operator's audit log.
    pub audit: OperatorAudit,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("control_namespace", &self.control_namespace)
            .finish_non_exhaustive()
    }
}

type Shared = Arc<ApiState>;

/// The peer of a connection, put on each request by the server.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// What the call turned out to be about, filled by [`Authed::authorize`] for the audit record.
#[derive(Debug, Clone, Default)]
struct CallInfo {
    attrs: Option<Attributes>,
}

/// An authenticated call, as handlers see it.
#[derive(Debug, Clone)]
pub struct Authed {
    /// Who.
    pub caller: Arc<Caller>,
    info: Arc<Mutex<CallInfo>>,
}

impl Authed {
    /// Asks a SubjectAccessReview for `attrs`; remembers them for the call's audit record.
    ///
    /// # Errors
    /// [`ApiError::Forbidden`] when denied, [`ApiError::AuthzUnavailable`] without an answer.
    pub async fn authorize(&self, state: &ApiState, attrs: Attributes) -> Result<(), ApiError> {
        if let Ok(mut i) = self.info.lock() {
            i.attrs = Some(attrs.clone());
        }
        match auth::authorize(&state.client, &self.caller, &attrs).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(ApiError::Forbidden(format!(
                "{} may not {} {}.{}{}",
                self.caller.user,
                attrs.verb,
                attrs.resource,
                auth::GROUP,
                match &attrs.namespace {
                    Some(ns) => format!(" in namespace {ns}"),
                    None => " cluster-wide".into(),
                }
            ))),
            Err(e) => Err(ApiError::AuthzUnavailable(e)),
        }
    }
}

/// A refused or failed call: one status and JSON body per variant, and the label written in
/// the audit record.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401.
    #[error(transparent)]
    Unauthenticated(AuthnError),
    /// 403.
    #[error("{0}")]
    Forbidden(String),
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 502: the API server refused or failed.
    #[error("{0}")]
    Kube(String),
    /// 502: a node did not answer.
    #[error("{0}")]
    Node(String),
    /// 503: TokenReview could not be made.
    #[error("{0}")]
    AuthnUnavailable(String),
    /// 503: SubjectAccessReview could not be made.
    #[error("cannot check permissions with the API server: {0}")]
    AuthzUnavailable(String),
    /// 503: the audit log cannot be written.
    #[error("the operator's audit log cannot be written ({0}); calls are refused until it can")]
    AuditUnavailable(String),
}

impl ApiError {
    /// The short label (JSON `error`, audit `reason`).
    pub fn label(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Kube(_) => "kube_error",
            ApiError::Node(_) => "node_error",
            ApiError::AuthnUnavailable(_) => "authn_unavailable",
            ApiError::AuthzUnavailable(_) => "authz_unavailable",
            ApiError::AuditUnavailable(_) => "audit_unavailable",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Kube(_) | ApiError::Node(_) => StatusCode::BAD_GATEWAY,
            ApiError::AuthnUnavailable(_)
            | ApiError::AuthzUnavailable(_)
            | ApiError::AuditUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The audit label a response carries to [`guard`].
#[derive(Debug, Clone, Copy)]
struct Label(&'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let label = self.label();
        let mut r = (
            self.status(),
            Json(json!({"error": label, "message": self.to_string()})),
        )
            .into_response();
        if matches!(self, ApiError::Unauthenticated(_)) {
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        r.extensions_mut().insert(Label(label));
        r
    }
}

fn kube_error(what: &str, e: kube::Error) -> ApiError {
    match &e {
        kube::Error::Api(s) if s.code == 404 => ApiError::NotFound(format!("{what}: not found")),
        kube::Error::Api(s) if s.code == 409 => {
            ApiError::Conflict(format!("{what}: {}", s.message))
        }
        _ => ApiError::Kube(format!("{what}: {e}")),
    }
}

/// Every route served, with its method: the router is built from this table, and a test holds
/// it equal to the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/cells"),
    ("GET", "/api/v1/namespaces/{namespace}/cells/{name}"),
    ("GET", "/api/v1/revocations"),
    ("POST", "/api/v1/revocations"),
    ("GET", "/api/v1/approvals"),
    (
        "POST",
        "/api/v1/namespaces/{namespace}/approvals/{name}/approve",
    ),
    (
        "POST",
        "/api/v1/namespaces/{namespace}/approvals/{name}/deny",
    ),
    ("GET", "/api/v1/lockdown"),
    ("POST", "/api/v1/lockdown"),
    ("GET", "/api/v1/audit"),
];

fn handler(method: &str, path: &str) -> MethodRouter<Shared> {
    match (method, path) {
        ("GET", "/api/v1/openapi.json") => get(openapi_json),
        ("GET", "/api/v1/cells") => get(list_cells),
        ("GET", "/api/v1/namespaces/{namespace}/cells/{name}") => get(get_cell),
        ("GET", "/api/v1/revocations") => get(list_revocations),
        ("POST", "/api/v1/revocations") => post(add_revocation),
        ("GET", "/api/v1/approvals") => get(list_approvals),
        ("POST", "/api/v1/namespaces/{namespace}/approvals/{name}/approve") => post(approve),
        ("POST", "/api/v1/namespaces/{namespace}/approvals/{name}/deny") => post(deny),
        ("GET", "/api/v1/lockdown") => get(get_lockdown),
        ("POST", "/api/v1/lockdown") => post(set_lockdown),
        ("GET", "/api/v1/audit") => get(query_audit),
        // A route added to ROUTES without a handler answers 404, which the integration test
        // (every documented route is served) catches.
        _ => get(|| async { StatusCode::NOT_FOUND }),
    }
}

/// The control API's router (without the server's per-connection [`Peer`]).
pub fn router(state: Shared) -> Router {
    let mut r: Router<Shared> = Router::new();
    for (method, path) in ROUTES {
        r = r.route(path, handler(method, path));
    }
    r.fallback(|| async { ApiError::NotFound("no such route: see /api/v1/openapi.json".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Audit-log health, authentication, and the call's durable record (see the module docs).
async fn guard(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    if let Err(e) = state.audit.healthy() {
        tracing::error!(error = %e, "control API call refused: the audit log cannot be written");
        return ApiError::AuditUnavailable(e).into_response();
    }
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    let info = Arc::new(Mutex::new(CallInfo::default()));
    let (response, user) = match auth::authenticate(&state.client, req.headers()).await {
        Ok(caller) => {
            let user = caller.user.clone();
            req.extensions_mut().insert(Authed {
                caller: Arc::new(caller),
                info: info.clone(),
            });
            (next.run(req).await, Some(user))
        }
        Err(AuthnError::Unavailable(e)) => {
            tracing::warn!(error = %e, "TokenReview failed");
            (
                ApiError::AuthnUnavailable(format!("cannot check the token: {e}")).into_response(),
                None,
            )
        }
        Err(e) => (ApiError::Unauthenticated(e).into_response(), None),
    };
    let status = response.status();
    let label = response
        .extensions()
        .get::<Label>()
        .map_or(if status.is_success() { "ok" } else { "error" }, |l| l.0);
    let attrs = info.lock().ok().and_then(|i| i.attrs.clone());
    let mut rec = OperatorAudit::api_record(label);
    rec.method = Some(method.clone());
    rec.path = Some(path.clone());
    rec.source = peer.map(|p| p.to_string());
    rec.latency_us = u64::try_from(started.elapsed().as_micros()).ok();
    rec.request_id = Some(uuid::Uuid::new_v4().to_string());
    rec.reasons = vec![format!("user={}", user.as_deref().unwrap_or("-"))];
    if let Some(a) = &attrs {
        rec.namespace = a.namespace.clone();
        if a.resource == "agentcells" {
            rec.cell = a.name.clone();
        }
        rec.reasons.push(format!("verb={}", a.verb));
        rec.reasons
            .push(format!("resource={}.{}", a.resource, auth::GROUP));
        if let Some(n) = &a.name {
            rec.reasons.push(format!("name={n}"));
        }
    }
    rec.reasons.push(format!("status={}", status.as_u16()));
    if let Err(e) = state.audit.api_call(rec).await {
        tracing::error!(error = %e, %method, %path, "control API call not recorded: answered 503");
        return ApiError::AuditUnavailable(e.to_string()).into_response();
    }
    tracing::info!(user = user.as_deref().unwrap_or("-"), %method, %path, status = status.as_u16(), reason = label, "control API call");
    response
}

fn attrs(
    verb: &'static str,
    resource: &'static str,
    namespace: Option<String>,
    name: Option<String>,
) -> Attributes {
    Attributes {
        verb,
        resource,
        namespace,
        name,
    }
}

/// `namespace=` of list calls.
#[derive(Debug, Deserialize)]
struct NsQuery {
    namespace: Option<String>,
}

fn ns_filter(q: &NsQuery) -> Result<Option<String>, ApiError> {
    match q.namespace.as_deref().map(str::trim) {
        None => Ok(None),
        Some(ns) if is_dns_label(ns) => Ok(Some(ns.to_string())),
        Some(ns) => Err(ApiError::BadRequest(format!(
            "namespace={ns:?}: not a namespace name"
        ))),
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn check_names(ns: &str, name: &str) -> Result<(), ApiError> {
    if !is_dns_label(ns) || !is_object_name(name) {
        return Err(ApiError::BadRequest(format!(
            "{ns}/{name}: not a namespace and object name"
        )));
    }
    Ok(())
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("bad JSON body: {e}")))
}

async fn openapi_json() -> Json<Value> {
    Json(openapi::document())
}

fn cell_view(c: &AgentCellResource) -> Value {
    json!({
        "namespace": c.metadata.namespace,
        "name": c.metadata.name,
        "uid": c.metadata.uid,
        "generation": c.metadata.generation,
        "role": c.spec.role,
        "suspended": c.spec.suspended,
        "capabilities": c.spec.capabilities.iter().map(|cap| cap.name.clone()).collect::<Vec<_>>(),
        "status": c.status,
    })
}

async fn list_cells(
    State(state): State<Shared>,
    Extension(authed): Extension<Authed>,
    Query(q): Query<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    list_of::<AgentCellResource>(&state, &authed, &q, "agentcells", "AgentCells", cell_view).await
}

/// `{"items": [...]}` of one kind, in the query's namespace or all, once `list` on `resource`
/// is authorized.
async fn list_of<K>(
    state: &Shared,
    authed: &Authed,
    q: &NsQuery,
    resource: &'static str,
    kind: &str,
    view: fn(&K) -> Value,
) -> Result<Json<Value>, ApiError>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let ns = ns_filter(q)?;
    authed
        .authorize(state, attrs("list", resource, ns.clone(), None))
        .await?;
    let api: Api<K> = match &ns {
        Some(ns) => Api::namespaced(state.client.clone(), ns),
        None => Api::all(state.client.clone()),
    };
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| kube_error(&format!("listing {kind}"), e))?;
    Ok(Json(
        json!({"items": list.items.iter().map(view).collect::<Vec<_>>()}),
    ))
}

async fn get_cell(
    State(state): State<Shared>,
    Extension(authed): Extension<Authed>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    check_names(&ns, &name)?;
    authed
        .authorize(
            &state,
            attrs("get", "agentcells", Some(ns.clone()), Some(name.clone())),
        )
        .await?;
    let api: Api<AgentCellResource> = Api::namespaced(state.client.clone(), &ns);
    let cell = api
        .get(&name)
        .await
        .map_err(|e| kube_error(&format!("AgentCell {ns}/{name}"), e))?;
    Ok(Json(cell_view(&cell)))
}

async fn read_configmap(state: &ApiState, name: &str) -> Result<Option<ConfigMap>, ApiError> {
    let api: Api<ConfigMap> = Api::namespaced(state.client.clone(), &state.control_namespace);
    api.get_opt(name)
        .await
        .map_err(|e| kube_error(&format!("{}/{name}", state.control_namespace), e))
}

async fn list_revocations(
    State(state): State<Shared>,
    Extension(authed): Extension<Authed>,
) -> Result<Json<Value>, ApiError> {
    authed
        .authorize(&state, attrs("list", "revocations", None, None))
        .await?;
    let cm = read_configmap(&state, REVOCATIONS_CONFIGMAP).await?;
    let items: Vec<Value> = cm
        .and_then(|c| c.data)
        .unwrap_or_default()
        .into_iter()
        .map(|(id, expiry)| json!({"tokenId": id, "expiry": expiry}))
        .collect();
    Ok(Json(json!({ "items": items })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RevokeBody {
    token_id: String,
    expiry: String,
}

async fn add_revocation(
    State(state): State<Shared>,
    Extension(authed): Extension<Authed>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    authed
        .authorize(&state, attrs("create", "revocations", None, None))
        .await?;
    let ask: RevokeBody = parse_body(&body)?;
    let id = ask.token_id.trim().to_string();
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(ApiError::BadRequest(format!(
            "tokenId {id:?}: a token id (jti) of letters, digits, '-', '_' and '.'"
        )));
    }
    let Some(exp) = crate::token::parse_rfc3339(ask.expiry.trim()) else {
        return Err(ApiError::BadRequest(format!(
            "expiry {:?}: an RFC 3339 time, the token's expiry",
            ask.expiry
        )));
    };
    let expiry = crate::token::rfc3339(exp).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let cm = read_configmap(&state, REVOCATIONS_CONFIGMAP).await?;
    let existing = cm.as_ref().and_then(|c| c.data.clone()).unwrap_or_default();
    let now = jiff::Timestamp::now().as_second();
    let changes = crate::revocations::changes(&existing, &[(id.clone(), expiry.clone())], now);
    let added = changes.get(&id).is_some_and(Option::is_some);
    if !changes.is_empty() {
        let api: Api<ConfigMap> = Api::namespaced(state.client.clone(), &state.control_namespace);
        let what = format!("{}/{REVOCATIONS_CONFIGMAP}", state.control_namespace);
        if cm.is_some() {
            api.patch(
                REVOCATIONS_CONFIGMAP,
                &PatchParams::default(),
                &Patch::Merge(crate::revocations::merge_patch(&changes)),
            )
            .await
            .map_err(|e| kube_error(&what, e))?;
        } else {
            api.create(
                &PostParams::default(),
                &crate::revocations::new_configmap(&state.control_namespace, &changes),
            )
            .await
            .map_err(|e| kube_error(&what, e))?;
        }
    }
    if added {
        state.audit.event(
            "token_revoked",
            Event {
                token_id: Some(id.clone()),
                reasons: vec![
                    format!("revoked by {} through the control API", authed.caller.user),
                    format!("expires {expiry}"),
                ],
                ..Event::default()
            },
        );
    }
    let already = existing.get(&id) == Some(&expiry);
    Ok(Json(json!({
        "tokenId": id,
        "expiry": expiry,
        "revoked": added || already,
        "message": if added { "revoked: every node refuses it within a second" }
                   else if already { "already revoked" }
                   else { "already expired: nodes refuse it anyway" },
    })))
}

fn approval_view(a: &AgentApprovalResource) -> Value {
    json!({
        "namespace": a.metadata.namespace,
        "name": a.metadata.name,
        "spec": a.spec,
        "status": a.status,
    })
}

async fn list_approvals(
    State(state): State<Shared>,
    Extension(authed): Extension<Authed>,
    Query(q): Query<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    list_of::<AgentApprovalResource>(
        &state,
        &authed,
        &q,
        "agentapprovals",
        "AgentApprovals",
        approval_view,
    )
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    #[serde(default, rename = "for")]
    valid_for: Option<String>,
    #[serde(default)]
    uses: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyBody {
    reason: String,
}

/// Checks the approval's names and that the caller may `update` it.
async fn may_decide(state: &Shared, authed: &Authed, ns: &str, name: &str) -> Result<(), ApiError> {
    check_names(ns, name)?;
    authed
        .authorize(
            state,
            attrs(
                "update",
                "agentapprovals",
                Some(ns.to_owned()),
                Some(name.to_owned()),
            ),
        )
        .await
}

async fn approve(
    State(state): State<Shared>,
    Extension(authed): Extension<Authed>,
    Path((ns, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    may_decide(&state, &authed, &ns, &name).await?;
    let ask: ApproveBody = if body.is_empty() {
        ApproveBody::default()
    } else {
        parse_body(&body)?
    };
    let valid_for = ask.valid_for.unwrap_or_else(|| "10m".into());
    match cellgate_api::manifest::parse_duration(&valid_for) {
        Some(s) if s > 0 && s <= MAX_APPROVAL_VALIDITY_SECS => {}
        _ => {
            return Err(ApiError::BadRequest(format!(
                "for {valid_for:?}: a duration of at most 24h, like 10m"
            )))
        }
    }
    let uses = ask.uses.unwrap_or(1);
    if uses == 0 || uses > MAX_APPROVAL_USES {
        return Err(ApiError::BadRequest(format!(
            "uses {uses}: 1 to {MAX_APPROVAL_USES}"
        )));
    }
    decide(
        &state,
        &authed,
        &ns,
        &name,
        true,
        None,
        Some(valid_for),
        Some(uses),
    )
    .await
}

async fn deny(
    State(state): State<Shared>,
    Extension(authed): Extension<Authed>,
    Path((ns, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    may_decide(&state, &authed, &ns, &name).await?;
    let ask: DenyBody = parse_body(&body)?;
    let reason = ask.reason.trim().to_string();
    if reason.is_empty() || reason.len() > MAX_REASON_LEN {
        return Err(ApiError::BadRequest(format!(
            "reason: required to deny, at most {MAX_REASON_LEN} bytes"
        )));
    }
    decide(&state, &authed, &ns, &name, false, Some(reason), None, None).await
}

/// Writes the decision into the AgentApproval's status (a merge patch of the status
/// subresource, as `kubectl cellgate approve` does), with the caller as approver.
#[allow(clippy::too_many_arguments)]
async fn decide(
    state: &ApiState,
    authed: &Authed,
    ns: &str,
    name: &str,
    approved: bool,
    reason: Option<String>,
    valid_for: Option<String>,
    uses: Option<u32>,
) -> Result<Json<Value>, ApiError> {
    let api: Api<AgentApprovalResource> = Api::namespaced(state.client.clone(), ns);
    let what = format!("AgentApproval {ns}/{name}");
    let current = api.get(name).await.map_err(|e| kube_error(&what, e))?;
    if let Some(d) = current.status.as_ref().and_then(|s| s.decision.as_ref()) {
        return Err(ApiError::Conflict(format!(
            "{what} was already {} by {}",
            if d.approved { "approved" } else { "denied" },
            d.by
        )));
    }
    let by = authed.caller.user.clone();
    let at = cellgate_audit::format_rfc3339(std::time::SystemTime::now());
    let (type_, why) = if approved {
        ("Approved", "ApprovedByUser")
    } else {
        ("Denied", "DeniedByUser")
    };
    let message = format!(
        "{} by {by}{}",
        type_.to_lowercase(),
        reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    let patch = json!({"status": {
        "decision": {"approved": approved, "by": by, "at": at, "reason": reason,
                     "validFor": valid_for, "uses": uses},
        "conditions": [{"type": type_, "status": "True", "reason": why,
                        "message": message, "lastTransitionTime": at}],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| kube_error(&what, e))?;
    Ok(Json(json!({
        "namespace": ns, "name": name, "approved": approved, "by": by,
        "method": current.spec.method, "host": current.spec.host, "path": current.spec.path,
    })))
}

fn lockdown_view(cm: Option<&ConfigMap>) -> Value {
    let mut cluster = Value::Null;
    let mut namespaces = serde_json::Map::new();
    for (key, value) in cm.and_then(|c| c.data.as_ref()).into_iter().flatten() {
        let v: Value = serde_json::from_str(value).unwrap_or(Value::Null);
        if key == LOCKDOWN_KEY_CLUSTER {
            cluster = v;
        } else if let Some(ns) = key.strip_prefix(LOCKDOWN_KEY_NAMESPACE) {
            namespaces.insert(ns.to_string(), v);
        }
    }
    json!({"cluster": cluster, "namespaces": namespaces})
}

async fn get_lockdown(
    State(state): State<Shared>,
    Extension(authed): Extension<Authed>,
) -> Result<Json<Value>, ApiError> {
    authed
        .authorize(&state, attrs("get", "lockdowns", None, None))
        .await?;
    let cm = read_configmap(&state, LOCKDOWN_CONFIGMAP).await?;
    Ok(Json(lockdown_view(cm.as_ref())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockdownBody {
    state: String,
    #[serde(default)]
    namespace: Option<String>,
    reason: String,
}

async fn set_lockdown(
    State(state): State<Shared>,
    Extension(authed): Extension<Authed>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    // Authorization needs the namespace, so the body is read first (it is small and bounded).
    let ask: Result<LockdownBody, ApiError> = parse_body(&body);
    let namespace = ask
        .as_ref()
        .ok()
        .and_then(|a| a.namespace.clone())
        .map(|n| n.trim().to_string());
    authed
        .authorize(
            &state,
            attrs("update", "lockdowns", namespace.clone(), None),
        )
        .await?;
    let ask = ask?;
    if let Some(ns) = &namespace {
        if !is_dns_label(ns) {
            return Err(ApiError::BadRequest(format!(
                "namespace {ns:?}: not a namespace name"
            )));
        }
    }
    let on = match ask.state.as_str() {
        "on" => true,
        "off" => false,
        other => return Err(ApiError::BadRequest(format!("state {other:?}: on or off"))),
    };
    let reason = ask.reason.trim().to_string();
    if reason.is_empty() || reason.len() > MAX_REASON_LEN {
        return Err(ApiError::BadRequest(format!(
            "reason: required, at most {MAX_REASON_LEN} bytes"
        )));
    }
    let by = authed.caller.user.clone();
    let key = namespace
        .as_ref()
        .map_or(LOCKDOWN_KEY_CLUSTER.to_string(), |n| {
            format!("{LOCKDOWN_KEY_NAMESPACE}{n}")
        });
    let value = json!({
        "reason": reason,
        "since": cellgate_audit::format_rfc3339(std::time::SystemTime::now()),
        "by": by,
    })
    .to_string();
    let cns = state.control_namespace.clone();
    let what = format!("{cns}/{LOCKDOWN_CONFIGMAP}");
    let api: Api<ConfigMap> = Api::namespaced(state.client.clone(), &cns);
    let current = read_configmap(&state, LOCKDOWN_CONFIGMAP).await?;
    let changed = match (&current, on) {
        (None, false) => false,
        (None, true) => {
            let cm: ConfigMap = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": LOCKDOWN_CONFIGMAP, "namespace": cns,
                             "labels": {"app.kubernetes.io/part-of": "cellgate"}},
                "data": {key.clone(): value},
            }))
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            api.create(&PostParams::default(), &cm)
                .await
                .map_err(|e| kube_error(&what, e))?;
            true
        }
        (Some(cm), _) => {
            let present = cm.data.as_ref().is_some_and(|d| d.contains_key(&key));
            if !on && !present {
                false
            } else {
                let patch = json!({"data": {key.clone(): if on { Value::from(value) } else { Value::Null }}});
                api.patch(
                    LOCKDOWN_CONFIGMAP,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(|e| kube_error(&what, e))?;
                true
            }
        }
    };
    let scope = namespace
        .as_ref()
        .map_or("every cell in the cluster".to_string(), |n| {
            format!("namespace {n}")
        });
    if changed {
        state.audit.event(
            if on {
                "lockdown_set"
            } else {
                "lockdown_lifted"
            },
            Event {
                namespace: namespace.clone(),
                reasons: vec![
                    format!("lockdown {} for {scope}", if on { "on" } else { "off" }),
                    reason.clone(),
                    format!("by {by} through the control API"),
                ],
                ..Event::default()
            },
        );
    }
    let now = read_configmap(&state, LOCKDOWN_CONFIGMAP).await?;
    Ok(Json(json!({
        "changed": changed,
        "scope": scope,
        "lockdown": lockdown_view(now.as_ref()),
    })))
}

async fn query_audit(
    State(state): State<Shared>,
    Extension(authed): Extension<Authed>,
    Query(params): Query<audit::AuditParams>,
) -> Result<Response, ApiError> {
    let query = audit::AuditQuery::parse(&params, jiff::Timestamp::now())
        .map_err(|e| ApiError::BadRequest(e.to_string()));
    let namespace = query.as_ref().ok().and_then(|q| q.namespace.clone());
    authed
        .authorize(&state, attrs("list", "audit", namespace, None))
        .await?;
    let query = query?;
    let answers = audit::fan_out(&state.client, &state.control_namespace, &query)
        .await
        .map_err(|e| match e {
            audit::FanOutError::Node { .. } => ApiError::Node(e.to_string()),
            other => ApiError::Kube(other.to_string()),
        })?;
    let nodes = answers.len();
    let (lines, cursor) = audit::merge(answers, &query);
    let cursor = audit::encode_cursor(&cursor);
    let stream = futures_util::stream::iter(lines.into_iter().map(|mut l| {
        l.push('\n');
        Ok::<_, std::convert::Infallible>(l)
    }));
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    if let Ok(v) = HeaderValue::from_str(&cursor) {
        h.insert("x-cellgate-cursor", v);
    }
    h.insert("x-cellgate-nodes", HeaderValue::from(nodes));
    Ok(r)
}

/// Why the control API did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot bind the control API on {addr}: {source}; choose another --api-listen")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running control API server.
#[derive(Debug)]
pub struct ApiServer {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Stops accepting connections; open ones finish their calls.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Binds `addr` now and serves the control API over TLS on the current runtime.
///
/// # Errors
/// [`ServeError::Bind`] when the address cannot be bound.
pub async fn start(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<ApiState>,
) -> Result<ApiServer, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = router(state);
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = rx.changed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "control API accept failed");
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let app = app.clone().layer(Extension(Peer(peer)));
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(src.addr = %peer, error = %e, "control API TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(src.addr = %peer, "control API TLS handshake timed out");
                        return;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let served = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
                if let Err(e) = served {
                    tracing::debug!(src.addr = %peer, error = %e, "control API connection ended");
                }
            });
        }
    });
    Ok(ApiServer {
        addr: bound,
        shutdown: tx,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        served.sort();
        assert_eq!(served, openapi::documented_routes());
    }

    #[test]
    fn errors_map_to_status_and_label() {
        let cases = [
            (
                ApiError::Unauthenticated(AuthnError::Missing),
                401,
                "unauthenticated",
            ),
            (ApiError::Forbidden("x".into()), 403, "forbidden"),
            (ApiError::BadRequest("x".into()), 400, "bad_request"),
            (ApiError::Node("x".into()), 502, "node_error"),
            (
                ApiError::AuditUnavailable("x".into()),
                503,
                "audit_unavailable",
            ),
        ];
        for (e, status, label) in cases {
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.label(), label);
        }
        let r = ApiError::Unauthenticated(AuthnError::Missing).into_response();
        assert_eq!(
            r.headers()
                .get(http::header::WWW_AUTHENTICATE)
                .map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
    }
}
