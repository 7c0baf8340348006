//! A Vault contract server for tests: the Vault HTTP API paths Cellgate uses, with Vault's
//! documented request and response shapes, over a real socket.
//!
//! | path | Vault doc |
//! |---|---|
//! | `POST /v1/auth/<mount>/login {role, jwt}` | Kubernetes auth: `{"auth": {client_token, accessor, policies, token_policies, metadata, lease_duration, renewable, entity_id, token_type, orphan}}` |
//! | `POST /v1/auth/<mount>/login {role_id, secret_id}` | AppRole auth: the same `auth` object, `metadata: {role_name}`; 400 `invalid role or secret ID` when the pair is unknown |
//! | `GET /v1/<mount>/data/<path>` | KV v2 read: `{"data": {"data": {..}, "metadata": {created_time, custom_metadata, deletion_time, destroyed, version}}}`; 404 `{"errors":[]}` when absent |
//! | `POST/PUT /v1/<mount>/data/<path> {"data": {..}}` | KV v2 write (seeding) |
//! | `GET /v1/<path>` (registered dynamic path) | `{"lease_id", "lease_duration", "renewable", "data": {..}}`, fresh values each read |
//! | `PUT/POST /v1/sys/leases/renew {lease_id, increment}` | `{"lease_id", "renewable", "lease_duration"}`; 400 `lease not found` |
//! | `PUT/POST /v1/sys/leases/revoke {lease_id}` | 204 |
//!
//! Every non-login request needs a valid `X-Vault-Token` (403 `{"errors":["permission denied"]}`
//! otherwise). A token a login issued ends after its lease duration ([`VaultContract::set_token_ttl`]),
//! and, as in Vault, the leases a token created are revoked when it ends or is revoked. Faults: [`VaultContract::set_fault`] makes it slow, sealed (503) or refusing (403).
//!
//! [`api`] is a bare client of the same HTTP API (through vaultrs's transport, so `https://` and
//! `VAULT_CACERT` work) for tests that set up a real Vault or OpenBao: mounts, policies, roles,
//! seal and unseal, lease lookups.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// One request the server saw (the body is kept: tests assert on shapes, and the contract
/// server is test-only).
#[derive(Debug, Clone)]
pub struct Call {
    /// Method.
    pub method: Method,
    /// Path, e.g. `/v1/secret/data/github`.
    pub path: String,
    /// The `X-Vault-Token` header, if any.
    pub token: Option<String>,
    /// JSON body (Null when empty).
    pub body: serde_json::Value,
}

/// An injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Behave.
    None,
    /// Answer every request after this long.
    Slow(Duration),
    /// 503 `{"errors":["Vault is sealed"]}`.
    Sealed,
    /// 403 `{"errors":["permission denied"]}` on everything.
    Refusing,
}

/// A dynamic secrets path.
#[derive(Debug, Clone)]
struct Dynamic {
    field: String,
    prefix: String,
    lease: u64,
    renewable: bool,
}

/// A lease the server issued.
#[derive(Debug, Clone, Default)]
pub struct LeaseState {
    /// Times renewed.
    pub renewals: u32,
    /// Revoked.
    pub revoked: bool,
}

#[derive(Debug)]
struct State {
    /// Valid tokens and when they end (`None`: the root token, which does not).
    tokens: HashMap<String, Option<std::time::Instant>>,
    /// The token that created each lease.
    lease_tokens: HashMap<String, String>,
    logins: HashMap<(String, String), String>,
    approles: HashMap<(String, String), String>,
    token_ttl: u64,
    kv: HashMap<(String, String), (serde_json::Value, u64)>,
    dynamic: HashMap<String, Dynamic>,
    leases: HashMap<String, LeaseState>,
    issued: u64,
    calls: Vec<Call>,
    fault: Fault,
}

/// The server. Dropping it stops it.
#[derive(Debug)]
pub struct VaultContract {
    /// Where it listens.
    pub addr: SocketAddr,
    /// A token with every permission (like a dev server's root token).
    pub root_token: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for VaultContract {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("static"));
    r
}

fn errors(status: StatusCode, msgs: &[&str]) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "errors": msgs }))
}

fn envelope(data: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "request_id": uuid::Uuid::new_v4().to_string(),
        "lease_id": "", "renewable": false, "lease_duration": 0,
        "data": data, "wrap_info": null, "warnings": null, "auth": null,
    })
}

impl VaultContract {
    /// Starts a server on a loopback port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the vault contract server");
        let addr = listener.local_addr().expect("local addr");
        let root_token = format!("hvs.root{}", uuid::Uuid::new_v4().simple());
        let state = Arc::new(Mutex::new(State {
            tokens: HashMap::from([(root_token.clone(), None)]),
            lease_tokens: HashMap::new(),
            logins: HashMap::new(),
            approles: HashMap::new(),
            token_ttl: 3600,
            kv: HashMap::new(),
            dynamic: HashMap::new(),
            leases: HashMap::new(),
            issued: 0,
            calls: Vec::new(),
            fault: Fault::None,
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            root_token,
            state,
            task,
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kubernetes auth accepts `jwt` for `role` (on any auth mount).
    pub fn allow_login(&self, role: &str, jwt: &str) {
        self.st()
            .logins
            .insert((role.to_string(), jwt.to_string()), role.to_string());
    }

    /// AppRole auth accepts `role_id` with `secret_id` as the role `role_name` (on any auth mount).
    pub fn allow_approle(&self, role_name: &str, role_id: &str, secret_id: &str) {
        self.st().approles.insert(
            (role_id.to_string(), secret_id.to_string()),
            role_name.to_string(),
        );
    }

    /// AppRole auth forgets every secret id (as when they are destroyed or used up).
    pub fn forget_approles(&self) {
        self.st().approles.clear();
    }

    /// Lease duration of tokens issued by login.
    pub fn set_token_ttl(&self, secs: u64) {
        self.st().token_ttl = secs;
    }

    /// Revokes every token but the root token, and the leases they created.
    pub fn revoke_tokens(&self) {
        let root = self.root_token.clone();
        let mut st = self.st();
        st.tokens.retain(|t, _| *t == root);
        st.sweep();
    }

    /// Seeds a KV v2 secret at `mount`/`path`.
    pub fn put_kv(&self, mount: &str, path: &str, data: serde_json::Value) {
        let mut st = self.st();
        let e = st
            .kv
            .entry((mount.to_string(), path.to_string()))
            .or_insert((serde_json::Value::Null, 0));
        e.0 = data;
        e.1 += 1;
    }

    /// Registers a dynamic secrets path: each read returns `{field: "<prefix>-<n>"}` under a
    /// new lease of `lease` seconds.
    pub fn add_dynamic(&self, path: &str, field: &str, prefix: &str, lease: u64, renewable: bool) {
        self.st().dynamic.insert(
            path.trim_matches('/').to_string(),
            Dynamic {
                field: field.into(),
                prefix: prefix.into(),
                lease,
                renewable,
            },
        );
    }

    /// Injects a fault.
    pub fn set_fault(&self, f: Fault) {
        self.st().fault = f;
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<Call> {
        self.st().calls.clone()
    }

    /// Requests to `path` with `method`.
    pub fn count(&self, method: &Method, path: &str) -> usize {
        self.st()
            .calls
            .iter()
            .filter(|c| c.method == *method && c.path == path)
            .count()
    }

    /// Leases issued so far, by id.
    pub fn leases(&self) -> HashMap<String, LeaseState> {
        let mut st = self.st();
        st.sweep();
        st.leases.clone()
    }
}

impl State {
    /// Forgets the tokens that have ended, and revokes the leases of every token no longer valid.
    fn sweep(&mut self) {
        let now = std::time::Instant::now();
        self.tokens.retain(|_, ends| ends.is_none_or(|e| now < e));
        for (lease, token) in &self.lease_tokens {
            if !self.tokens.contains_key(token) {
                if let Some(l) = self.leases.get_mut(lease) {
                    l.revoked = true;
                }
            }
        }
    }

    /// A new token for a login, valid for the token lease duration.
    fn issue_token(&mut self, prefix: &str) -> String {
        self.issued += 1;
        let token = format!("{prefix}{}{}", self.issued, uuid::Uuid::new_v4().simple());
        let ends = std::time::Instant::now() + Duration::from_secs(self.token_ttl);
        self.tokens.insert(token.clone(), Some(ends));
        token
    }
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let token = req
        .headers()
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: serde_json::Value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return errors(StatusCode::BAD_REQUEST, &["failed to parse JSON input"]),
        }
    };
    let fault = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        st.calls.push(Call {
            method: method.clone(),
            path: path.clone(),
            token: token.clone(),
            body: body.clone(),
        });
        st.fault
    };
    match fault {
        Fault::None => {}
        Fault::Slow(d) => tokio::time::sleep(d).await,
        Fault::Sealed => return errors(StatusCode::SERVICE_UNAVAILABLE, &["Vault is sealed"]),
        Fault::Refusing => return errors(StatusCode::FORBIDDEN, &["permission denied"]),
    }
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    st.sweep();
    let Some(rest) = path.strip_prefix("/v1/") else {
        return errors(StatusCode::NOT_FOUND, &[]);
    };
    let rest = rest.trim_end_matches('/').to_string();

    // Logins: no token needed.
    if let Some(mount) = rest
        .strip_prefix("auth/")
        .and_then(|r| r.strip_suffix("/login"))
    {
        if method != Method::POST && method != Method::PUT {
            return errors(StatusCode::METHOD_NOT_ALLOWED, &[]);
        }
        if let Some(role_id) = body["role_id"].as_str() {
            // AppRole.
            let Some(secret_id) = body["secret_id"].as_str() else {
                return errors(StatusCode::BAD_REQUEST, &["missing secret_id"]);
            };
            let Some(role) = st
                .approles
                .get(&(role_id.to_string(), secret_id.to_string()))
                .cloned()
            else {
                return errors(StatusCode::BAD_REQUEST, &["invalid role or secret ID"]);
            };
            let client_token = st.issue_token("hvs.approle");
            let mut r = envelope(serde_json::Value::Null);
            r["auth"] = serde_json::json!({
                "client_token": client_token,
                "accessor": uuid::Uuid::new_v4().to_string(),
                "policies": ["default", role],
                "token_policies": ["default", role],
                "metadata": {"role_name": role},
                "lease_duration": st.token_ttl,
                "renewable": true,
                "entity_id": uuid::Uuid::new_v4().to_string(),
                "token_type": "service",
                "orphan": true,
            });
            return json(StatusCode::OK, &r);
        }
        // Kubernetes.
        let (Some(role), Some(jwt)) = (body["role"].as_str(), body["jwt"].as_str()) else {
            return errors(StatusCode::BAD_REQUEST, &["missing role or jwt"]);
        };
        if !st.logins.keys().any(|(r, _)| r == role) {
            return errors(
                StatusCode::BAD_REQUEST,
                &[&format!("invalid role name \"{role}\"")],
            );
        }
        if !st.logins.contains_key(&(role.to_string(), jwt.to_string())) {
            return errors(StatusCode::FORBIDDEN, &["permission denied"]);
        }
        let client_token = st.issue_token("hvs.k8s");
        let mut r = envelope(serde_json::Value::Null);
        r["auth"] = serde_json::json!({
            "client_token": client_token,
            "accessor": uuid::Uuid::new_v4().to_string(),
            "policies": ["default", role],
            "token_policies": ["default", role],
            "metadata": {"role": role, "service_account_name": "cellgate-node", "service_account_namespace": "cellgate-system", "mount": mount},
            "lease_duration": st.token_ttl,
            "renewable": true,
            "entity_id": uuid::Uuid::new_v4().to_string(),
            "token_type": "service",
            "orphan": true,
        });
        return json(StatusCode::OK, &r);
    }

    if !token.as_ref().is_some_and(|t| st.tokens.contains_key(t)) {
        return errors(StatusCode::FORBIDDEN, &["permission denied"]);
    }

    if rest == "sys/leases/renew" || rest == "sys/leases/revoke" {
        if method != Method::PUT && method != Method::POST {
            return errors(StatusCode::METHOD_NOT_ALLOWED, &[]);
        }
        let Some(id) = body["lease_id"].as_str().map(str::to_string) else {
            return errors(StatusCode::BAD_REQUEST, &["lease_id must be specified"]);
        };
        let dynamic_path = id.rsplit_once('/').map(|(p, _)| p.to_string());
        let Some(lease) = st.leases.get_mut(&id) else {
            return errors(
                StatusCode::BAD_REQUEST,
                &["lease not found or lease is not renewable"],
            );
        };
        if rest.ends_with("revoke") {
            lease.revoked = true;
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            return r;
        }
        if lease.revoked {
            return errors(
                StatusCode::BAD_REQUEST,
                &["lease not found or lease is not renewable"],
            );
        }
        lease.renewals += 1;
        let d = dynamic_path.and_then(|p| st.dynamic.get(&p).cloned());
        let granted = body["increment"]
            .as_u64()
            .or(d.as_ref().map(|d| d.lease))
            .unwrap_or(60);
        let mut r = envelope(serde_json::Value::Null);
        r["lease_id"] = id.into();
        r["renewable"] = true.into();
        r["lease_duration"] = granted.into();
        return json(StatusCode::OK, &r);
    }

    if let Some(d) = st.dynamic.get(&rest).cloned() {
        if method != Method::GET {
            return errors(StatusCode::METHOD_NOT_ALLOWED, &[]);
        }
        st.issued += 1;
        let id = format!("{rest}/{}", uuid::Uuid::new_v4().simple());
        st.leases.insert(id.clone(), LeaseState::default());
        st.lease_tokens
            .insert(id.clone(), token.clone().unwrap_or_default());
        let mut r = envelope(serde_json::json!({
            d.field.clone(): format!("{}-{}", d.prefix, st.issued),
            "username": format!("v-cellgate-{}", st.issued),
        }));
        r["lease_id"] = id.into();
        r["renewable"] = d.renewable.into();
        r["lease_duration"] = d.lease.into();
        return json(StatusCode::OK, &r);
    }

    if let Some(i) = rest.find("/data/") {
        let (mount, p) = (rest[..i].to_string(), rest[i + 6..].to_string());
        let metadata = |version: u64| {
            serde_json::json!({
                "created_time": "2024-01-01T00:00:00.000000Z", "custom_metadata": null,
                "deletion_time": "", "destroyed": false, "version": version,
            })
        };
        if method == Method::GET {
            return match st.kv.get(&(mount, p)) {
                Some((data, version)) => json(
                    StatusCode::OK,
                    &envelope(serde_json::json!({"data": data, "metadata": metadata(*version)})),
                ),
                None => errors(StatusCode::NOT_FOUND, &[]),
            };
        }
        if method == Method::POST || method == Method::PUT {
            let e = st
                .kv
                .entry((mount, p))
                .or_insert((serde_json::Value::Null, 0));
            e.0 = body["data"].clone();
            e.1 += 1;
            let v = e.1;
            return json(
                StatusCode::OK,
                &envelope(serde_json::json!({
                    "created_time": "2024-01-01T00:00:00.000000Z", "custom_metadata": null,
                    "deletion_time": "", "destroyed": false, "version": v,
                })),
            );
        }
    }
    errors(StatusCode::NOT_FOUND, &[])
}

/// One call to Vault's HTTP API at `addr` (`http(s)://host:port`) with `token` (none when empty):
/// `method` (`GET`, `LIST`, `PUT`, `POST`, `DELETE`) on `/v1/<path>` with a JSON body. Returns the
/// status and the JSON answer (`Null` when empty); a status that is not 2xx is returned too, not
/// an error. For tests.
///
/// # Panics
/// The server cannot be reached or answers something that is not JSON.
pub async fn api(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    use rustify::endpoint::Endpoint;
    use vaultrs::client::Client as _;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = vaultrs::client::VaultClientSettingsBuilder::default()
        .address(addr)
        .token(token)
        .timeout(Some(Duration::from_secs(30)))
        .build()
        .expect("vault client settings");
    let client = vaultrs::client::VaultClient::new(settings).expect("vault client");
    let method = match method {
        "GET" => rustify::enums::RequestMethod::GET,
        "LIST" => rustify::enums::RequestMethod::LIST,
        "PUT" => rustify::enums::RequestMethod::PUT,
        "POST" => rustify::enums::RequestMethod::POST,
        "DELETE" => rustify::enums::RequestMethod::DELETE,
        other => panic!("no such method in Vault's API: {other}"),
    };
    let ep = ApiCall {
        method,
        path: path.trim_start_matches('/').to_string(),
        body,
    };
    let parse = |bytes: &[u8]| -> serde_json::Value {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(bytes).unwrap_or_else(|e| {
                panic!("{path}: not JSON ({e}): {}", String::from_utf8_lossy(bytes))
            })
        }
    };
    match ep
        .with_middleware(client.middle())
        .exec(client.http())
        .await
    {
        Ok(r) => (r.response.status().as_u16(), parse(r.response.body())),
        Err(rustify::errors::ClientError::ServerResponseError { code, content }) => {
            (code, parse(content.unwrap_or_default().as_bytes()))
        }
        Err(e) => panic!("{path}: cannot reach vault at {addr}: {e}"),
    }
}

#[derive(Debug)]
struct ApiCall {
    method: rustify::enums::RequestMethod,
    path: String,
    body: Option<serde_json::Value>,
}

impl rustify::endpoint::Endpoint for ApiCall {
    type Response = serde_json::Value;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;

    fn path(&self) -> String {
        self.path.clone()
    }

    fn method(&self) -> rustify::enums::RequestMethod {
        self.method.clone()
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        Ok(self.body.as_ref().map(|b| b.to_string().into_bytes()))
    }
}
