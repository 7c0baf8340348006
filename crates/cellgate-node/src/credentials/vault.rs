//! The HashiCorp Vault backend, through vaultrs.
//!
//! Authentication is Kubernetes (`POST /v1/auth/<mount>/login {role, jwt}` with the node's
//! service-account token), AppRole (`POST /v1/auth/<mount>/login {role_id, secret_id}` with the
//! two read from files) or a token read from a file. The Vault token a login returns is cached and
//! renewed by logging in again at two thirds of its lease, and once more when Vault answers 403;
//! the files are read at every login, so they can be rotated in place.
//!
//! A capability's `vault.path` decides how it is read:
//! - a path with a `data` segment (`secret/data/github`, `kv/team/data/app`) is a **KV v2** read:
//!   mount `secret`, secret `github`, `GET /v1/secret/data/github`, field from `data.data`;
//! - any other path (`database/creds/readonly`, `aws/creds/deploy`) is read as is with
//!   `GET /v1/<path>`, field from `data`. A response with a `lease_id` is a **dynamic secret**: the
//!   broker caches it until shortly before its lease ends, renews it with
//!   `PUT /v1/sys/leases/renew` when renewable, and revokes it with `PUT /v1/sys/leases/revoke`
//!   when the cell ends or the capability is removed. Vault revokes a token's leases when the
//!   token ends, and the node logs in again (a new token) before that: so a lease is used only
//!   until shortly before the token that created it ends ([`Lease::usable_until`]), then
//!   replaced by one the new token creates.
//!
//! Nothing here logs a token, a secret, a JWT or a lease id.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustify::endpoint::Endpoint;
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::{CredentialError, Secret, MAX_SECRET_BYTES};

/// How the node authenticates to Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// A Vault token read from this file (re-read when Vault refuses it, and every minute).
    Token {
        /// Token file.
        file: PathBuf,
    },
    /// Kubernetes auth: log in with the service-account JWT in `jwt_file` as `role`.
    Kubernetes {
        /// Vault role.
        role: String,
        /// Service-account token file.
        jwt_file: PathBuf,
        /// Auth mount (`kubernetes` by default).
        mount: String,
    },
    /// AppRole auth: log in with the role id and secret id read from these files.
    AppRole {
        /// File holding the role id.
        role_id_file: PathBuf,
        /// File holding the secret id.
        secret_id_file: PathBuf,
        /// Auth mount (`approle` by default).
        mount: String,
    },
}

/// Where Vault is and how to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultConfig {
    /// `http(s)://host:port`.
    pub addr: String,
    /// Authentication.
    pub auth: VaultAuth,
}

/// The life of a Vault token a login returned. Vault revokes every lease a token created when
/// the token ends.
#[derive(Debug, Clone, Copy)]
pub struct TokenLife {
    /// When it ends (counted from before the login was sent).
    pub(crate) ends: Instant,
    /// Its lease duration.
    pub(crate) ttl: Duration,
}

/// A lease on a dynamic secret.
#[derive(Debug, Clone)]
pub struct Lease {
    pub(crate) id: String,
    pub(crate) path: String,
    pub(crate) renewable: bool,
    pub(crate) duration: Duration,
    pub(crate) expires: Instant,
    /// The token that created it, when its life is known (a token read from a file: not).
    pub(crate) token: Option<TokenLife>,
}

impl Lease {
    /// When the secret stops being usable: its lease's end, or the end of the token that created
    /// it if that comes first.
    pub(crate) fn usable_until(&self) -> Instant {
        match self.token {
            Some(t) => self.expires.min(t.ends),
            None => self.expires,
        }
    }

    /// How long before [`Lease::usable_until`] the broker stops using it: a fifth of the
    /// shorter of the lease's and the token's lifetimes, at most 30 s.
    pub(crate) fn margin(&self) -> Duration {
        let life = self
            .token
            .map_or(self.duration, |t| self.duration.min(t.ttl));
        (life / 5).min(Duration::from_secs(30))
    }

    /// Renewing extends its use: it is renewable and its own end comes before its token's.
    pub(crate) fn renewal_helps(&self) -> bool {
        self.renewable && self.token.is_none_or(|t| self.expires < t.ends)
    }

    /// When the broker looks at it next, `now` being just after it was leased or renewed: at half
    /// its life when renewing helps (it is renewed then), else shortly before it stops being
    /// usable (it is replaced then).
    pub(crate) fn fresh_until(&self, now: Instant) -> Instant {
        let last = self
            .usable_until()
            .checked_sub(self.margin())
            .unwrap_or(now)
            .max(now);
        if self.renewal_helps() {
            (now + self.duration / 2).min(last)
        } else {
            last
        }
    }
}

/// What one read produced.
#[derive(Debug)]
pub struct Fetched {
    /// The field's value.
    pub secret: Secret,
    /// The lease, for dynamic secrets.
    pub lease: Option<Lease>,
}

/// How a capability's `vault.path` is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathKind<'a> {
    /// KV version 2: mount and secret path.
    KvV2 {
        /// Mount, e.g. `secret`.
        mount: &'a str,
        /// Secret path under the mount.
        path: &'a str,
    },
    /// Any other path, read as is (dynamic secrets).
    Raw(&'a str),
}

/// Classifies a `vault.path`: a `data` segment with a mount before it and a path after it is KV v2.
pub fn path_kind(path: &str) -> PathKind<'_> {
    let path = path.trim_matches('/');
    if let Some(i) = path.find("/data/") {
        let (mount, rest) = (&path[..i], &path[i + "/data/".len()..]);
        if !mount.is_empty() && !rest.is_empty() {
            return PathKind::KvV2 { mount, path: rest };
        }
    }
    PathKind::Raw(path)
}

struct Session {
    client: Arc<VaultClient>,
    refresh_at: Option<Instant>,
    life: Option<TokenLife>,
}

/// The Vault backend: a logged-in client, shared by every capability.
pub struct VaultBackend {
    config: VaultConfig,
    timeout: Duration,
    session: tokio::sync::Mutex<Option<Session>>,
}

impl std::fmt::Debug for VaultBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultBackend")
            .field("addr", &self.config.addr)
            .field("auth", &self.config.auth)
            .finish_non_exhaustive()
    }
}

enum VaultErr {
    /// 403: the token may be stale; log in again once.
    Denied(String),
    Other(CredentialError),
}

fn unavailable(reason: impl Into<String>) -> CredentialError {
    CredentialError::Unavailable {
        backend: "vault",
        reason: reason.into(),
    }
}

fn truncate(mut s: String, n: usize) -> String {
    if s.len() > n {
        let mut i = n;
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        s.truncate(i);
        s.push('…');
    }
    s
}

impl VaultBackend {
    /// A backend for `config`; every Vault call is bounded by `timeout`.
    ///
    /// # Errors
    /// The address is not an `http(s)://` URL.
    pub fn new(config: VaultConfig, timeout: Duration) -> Result<Self, CredentialError> {
        let uri: http::Uri = config.addr.parse().map_err(|_| {
            CredentialError::Invalid(format!("bad vault address {:?}", config.addr))
        })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(CredentialError::Invalid(format!(
                "the vault address {:?} must be http(s)://host[:port]",
                config.addr
            )));
        }
        // vaultrs uses reqwest with rustls and no built-in provider: use ring, like the node.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Self {
            config,
            timeout,
            session: tokio::sync::Mutex::new(None),
        })
    }

    fn client(&self, token: &str) -> Result<VaultClient, CredentialError> {
        let settings = VaultClientSettingsBuilder::default()
            .address(&self.config.addr)
            .token(token)
            // The bound that decides is `bounded`'s; the client's own timeout is a backstop set
            // later so the two never race to name the failure.
            .timeout(Some(self.timeout.saturating_mul(2)))
            .build()
            .map_err(|e| unavailable(format!("vault client settings: {e}")))?;
        VaultClient::new(settings).map_err(|e| unavailable(format!("vault client: {e}")))
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, VaultErr> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.map_err(e)),
            Err(_) => Err(VaultErr::Other(unavailable(format!(
                "vault at {} did not answer within {:?}",
                self.config.addr, self.timeout
            )))),
        }
    }

    fn map_err(&self, e: ClientError) -> VaultErr {
        let addr = &self.config.addr;
        match e {
            ClientError::APIError { code: 403, errors } => VaultErr::Denied(truncate(
                format!("vault refused with HTTP 403: {}", errors.join("; ")),
                300,
            )),
            ClientError::APIError { code: 404, .. } => {
                VaultErr::Other(unavailable("vault has no secret at that path (HTTP 404)"))
            }
            ClientError::APIError { code, errors } => VaultErr::Other(unavailable(truncate(
                format!("vault refused with HTTP {code}: {}", errors.join("; ")),
                300,
            ))),
            ClientError::RestClientError { source } => match source {
                rustify::errors::ClientError::ServerResponseError { code, .. } => {
                    VaultErr::Other(unavailable(format!("vault answered HTTP {code}")))
                }
                rustify::errors::ClientError::RequestError { .. } => {
                    VaultErr::Other(unavailable(format!("cannot reach vault at {addr}")))
                }
                _ => VaultErr::Other(unavailable(format!(
                    "vault at {addr} sent a response that is not Vault's"
                ))),
            },
            ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => {
                VaultErr::Other(unavailable("vault returned no data"))
            }
            ClientError::JsonParseError { .. } => {
                VaultErr::Other(unavailable("vault returned data of an unexpected shape"))
            }
            other => VaultErr::Other(unavailable(format!("vault: {other}"))),
        }
    }

    /// A logged-in client and the life of its token; `force` logs in again even if the cached
    /// token is still fresh.
    async fn session(
        &self,
        force: bool,
    ) -> Result<(Arc<VaultClient>, Option<TokenLife>), CredentialError> {
        let mut s = self.session.lock().await;
        if !force {
            if let Some(sess) = s.as_ref() {
                if sess.refresh_at.is_none_or(|t| Instant::now() < t) {
                    return Ok((sess.client.clone(), sess.life));
                }
            }
        }
        let (client, refresh_at, life) = match &self.config.auth {
            VaultAuth::Token { file } => {
                let token = read_small_file(file).await?;
                (
                    self.client(token.expose())?,
                    Some(Instant::now() + Duration::from_secs(60)),
                    None,
                )
            }
            VaultAuth::Kubernetes {
                role,
                jwt_file,
                mount,
            } => {
                let jwt = read_small_file(jwt_file).await?;
                let anon = self.client("")?;
                let login = vaultrs::auth::kubernetes::login(&anon, mount, role, jwt.expose());
                self.logged_in(&format!("kubernetes login as role {role:?}"), login)
                    .await?
            }
            VaultAuth::AppRole {
                role_id_file,
                secret_id_file,
                mount,
            } => {
                let what = format!("approle login at auth/{mount}");
                let file = |e: CredentialError| match e {
                    CredentialError::Unavailable { reason, .. } => {
                        unavailable(format!("{what}: {reason}"))
                    }
                    e => e,
                };
                let role_id = read_small_file(role_id_file).await.map_err(file)?;
                let secret_id = read_small_file(secret_id_file).await.map_err(file)?;
                let anon = self.client("")?;
                let login = vaultrs::auth::approle::login(
                    &anon,
                    mount,
                    role_id.expose(),
                    secret_id.expose(),
                );
                self.logged_in(&what, login).await?
            }
        };
        let client = Arc::new(client);
        *s = Some(Session {
            client: client.clone(),
            refresh_at,
            life,
        });
        Ok((client, life))
    }

    /// A client with the token a login returned, when to log in again (at two thirds of the
    /// token's lease, so the new token never races the old one's end; a token without a lease is
    /// kept until Vault refuses it), and the token's life. `what` names the login in the error.
    async fn logged_in(
        &self,
        what: &str,
        login: impl std::future::Future<Output = Result<vaultrs::api::AuthInfo, ClientError>>,
    ) -> Result<(VaultClient, Option<Instant>, Option<TokenLife>), CredentialError> {
        let sent = Instant::now();
        let auth = self.bounded(login).await.map_err(|e| match e {
            VaultErr::Denied(r) => unavailable(format!("{what}: {r}")),
            VaultErr::Other(CredentialError::Unavailable { reason, .. }) => {
                unavailable(format!("{what}: {reason}"))
            }
            VaultErr::Other(e) => e,
        })?;
        let ttl = Duration::from_secs(auth.lease_duration);
        let life = (auth.lease_duration > 0).then(|| TokenLife {
            ends: sent + ttl,
            ttl,
        });
        let refresh = life.map(|l| sent + l.ttl * 2 / 3);
        Ok((self.client(&auth.client_token)?, refresh, life))
    }

    /// Reads `field` of the secret at `path`.
    ///
    /// # Errors
    /// Vault unreachable, slow, refusing, or the field missing.
    pub async fn read(&self, path: &str, field: &str) -> Result<Fetched, CredentialError> {
        let (client, life) = self.session(false).await?;
        match self.read_with(&client, life, path, field).await {
            Ok(f) => Ok(f),
            Err(VaultErr::Denied(_)) => {
                // The token may have expired or been revoked: log in again, once.
                let (client, life) = self.session(true).await?;
                match self.read_with(&client, life, path, field).await {
                    Ok(f) => Ok(f),
                    Err(VaultErr::Denied(r)) => Err(unavailable(r)),
                    Err(VaultErr::Other(e)) => Err(e),
                }
            }
            Err(VaultErr::Other(e)) => Err(e),
        }
    }

    /// Reads with `client`, whose token has `life`.
    async fn read_with(
        &self,
        client: &VaultClient,
        life: Option<TokenLife>,
        path: &str,
        field: &str,
    ) -> Result<Fetched, VaultErr> {
        match path_kind(path) {
            PathKind::KvV2 { mount, path: p } => {
                let data: serde_json::Value =
                    self.bounded(vaultrs::kv2::read(client, mount, p)).await?;
                Ok(Fetched {
                    secret: field_of(&data, field, path).map_err(VaultErr::Other)?,
                    lease: None,
                })
            }
            PathKind::Raw(p) => {
                let body = self
                    .bounded(vaultrs::api::exec_with_no_result(
                        client,
                        RawRead {
                            path: p.to_string(),
                        },
                    ))
                    .await?;
                let secret = field_of(&body["data"], field, path).map_err(VaultErr::Other)?;
                let lease = match body["lease_id"].as_str() {
                    Some(id) if !id.is_empty() => {
                        let duration =
                            Duration::from_secs(body["lease_duration"].as_u64().unwrap_or(0));
                        Some(Lease {
                            id: id.to_string(),
                            path: p.to_string(),
                            renewable: body["renewable"].as_bool().unwrap_or(false),
                            duration,
                            expires: Instant::now() + duration,
                            token: life,
                        })
                    }
                    _ => None,
                };
                Ok(Fetched { secret, lease })
            }
        }
    }

    /// Renews `lease` for its original duration; returns the duration Vault granted.
    ///
    /// # Errors
    /// Vault refused or is unreachable.
    pub async fn renew(&self, lease: &Lease) -> Result<Duration, CredentialError> {
        let (client, _) = self.session(false).await?;
        let ep = || LeaseOp {
            renew: true,
            lease_id: lease.id.clone(),
            increment: Some(lease.duration.as_secs()),
        };
        let body = match self
            .bounded(vaultrs::api::exec_with_no_result(&*client, ep()))
            .await
        {
            Ok(b) => b,
            Err(VaultErr::Denied(_)) => {
                let (client, _) = self.session(true).await?;
                self.bounded(vaultrs::api::exec_with_no_result(&*client, ep()))
                    .await
                    .map_err(|e| match e {
                        VaultErr::Denied(r) => unavailable(r),
                        VaultErr::Other(e) => e,
                    })?
            }
            Err(VaultErr::Other(e)) => return Err(e),
        };
        Ok(Duration::from_secs(
            body["lease_duration"].as_u64().unwrap_or(0),
        ))
    }

    /// Revokes `lease`.
    ///
    /// # Errors
    /// Vault refused or is unreachable.
    pub async fn revoke(&self, lease: &Lease) -> Result<(), CredentialError> {
        let (client, _) = self.session(false).await?;
        self.bounded(vaultrs::api::exec_with_empty(
            &*client,
            LeaseOp {
                renew: false,
                lease_id: lease.id.clone(),
                increment: None,
            },
        ))
        .await
        .map_err(|e| match e {
            VaultErr::Denied(r) => unavailable(r),
            VaultErr::Other(e) => e,
        })
    }
}

/// The field of a secret's data as a string; never echoes the data.
fn field_of(data: &serde_json::Value, field: &str, path: &str) -> Result<Secret, CredentialError> {
    let v = match data.get(field) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(serde_json::Value::Bool(b)) => b.to_string(),
        Some(_) => {
            return Err(unavailable(format!(
                "field {field:?} of {path} is not a string"
            )))
        }
        None => {
            return Err(unavailable(format!(
                "the secret at {path} has no field {field:?}"
            )))
        }
    };
    if v.is_empty() {
        return Err(unavailable(format!("field {field:?} of {path} is empty")));
    }
    if v.len() > MAX_SECRET_BYTES {
        return Err(unavailable(format!(
            "field {field:?} of {path} is larger than {MAX_SECRET_BYTES} bytes"
        )));
    }
    Ok(Secret::new(v))
}

async fn read_small_file(path: &std::path::Path) -> Result<Secret, CredentialError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| unavailable(format!("{}: {}", path.display(), e.kind())))?;
    let v = text.trim();
    if v.is_empty() || v.len() > MAX_SECRET_BYTES {
        return Err(unavailable(format!(
            "{} is empty or too large",
            path.display()
        )));
    }
    Ok(Secret::new(v))
}

/// `GET /v1/<path>`: the whole response (`lease_id`, `lease_duration`, `renewable`, `data`).
struct RawRead {
    path: String,
}

impl Endpoint for RawRead {
    type Response = serde_json::Value;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        self.path.clone()
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::GET
    }
}

/// `PUT /v1/sys/leases/renew {lease_id, increment}` or `PUT /v1/sys/leases/revoke {lease_id}`.
struct LeaseOp {
    renew: bool,
    lease_id: String,
    increment: Option<u64>,
}

impl Endpoint for LeaseOp {
    type Response = serde_json::Value;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        if self.renew {
            "sys/leases/renew".into()
        } else {
            "sys/leases/revoke".into()
        }
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::PUT
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        let mut b = serde_json::json!({ "lease_id": self.lease_id });
        if let Some(i) = self.increment {
            b["increment"] = i.into();
        }
        Ok(Some(b.to_string().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv2_paths_are_told_from_dynamic_ones() {
        assert_eq!(
            path_kind("secret/data/github"),
            PathKind::KvV2 {
                mount: "secret",
                path: "github"
            }
        );
        assert_eq!(
            path_kind("/kv/team/data/app/key"),
            PathKind::KvV2 {
                mount: "kv/team",
                path: "app/key"
            }
        );
        assert_eq!(
            path_kind("database/creds/readonly"),
            PathKind::Raw("database/creds/readonly")
        );
        assert_eq!(path_kind("secret/data/"), PathKind::Raw("secret/data"));
    }

    #[test]
    fn a_lease_is_used_until_its_end_or_its_tokens_whichever_is_first() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let lease = |duration: Duration, token: Option<TokenLife>| Lease {
            id: "database/creds/app/x".into(),
            path: "database/creds/app".into(),
            renewable: true,
            duration,
            expires: now + duration,
            token,
        };
        // A token of unknown life (read from a file): the lease's own life; renewed at half.
        let l = lease(s(100), None);
        assert_eq!(l.usable_until(), now + s(100));
        assert_eq!(l.margin(), s(20));
        assert!(l.renewal_helps());
        assert_eq!(l.fresh_until(now), now + s(50));
        // A token that outlives the lease: the same.
        let long = TokenLife {
            ends: now + s(3600),
            ttl: s(3600),
        };
        let l = lease(s(100), Some(long));
        assert_eq!(l.usable_until(), now + s(100));
        assert_eq!(l.fresh_until(now), now + s(50));
        // A token that ends first: renewing cannot help, replaced a fifth of the token's life
        // before the token ends.
        let short = TokenLife {
            ends: now + s(60),
            ttl: s(60),
        };
        let l = lease(s(3600), Some(short));
        assert_eq!(l.usable_until(), now + s(60));
        assert_eq!(l.margin(), s(12));
        assert!(!l.renewal_helps());
        assert_eq!(l.fresh_until(now), now + s(48));
        // Already past it: look again at once.
        let ended = TokenLife {
            ends: now + s(1),
            ttl: s(60),
        };
        assert_eq!(lease(s(3600), Some(ended)).fresh_until(now), now);
    }

    #[test]
    fn fields_never_echo_the_data() {
        let d = serde_json::json!({"token": "s3cr3t", "obj": {"x": "s3cr3t"}});
        assert_eq!(field_of(&d, "token", "p").unwrap().expose(), "s3cr3t");
        let e = field_of(&d, "obj", "p").unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        let e = field_of(&d, "nope", "p").unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
    }
}
