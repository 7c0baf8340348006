//! Credential brokering: the secret a capability names is fetched just in time and injected into
//! the request at the boundary; the agent never holds it.
//!
//! Backends: files in a secrets directory (local mode, `--secrets DIR`), HashiCorp Vault
//! ([`vault`]: KV v2 and dynamic secrets with leases) and Kubernetes Secrets ([`k8s`]). One cache
//! per (cell, capability) with single-flight refresh, so a burst of requests makes one backend
//! call, and a burst that arrives while that call fails gets its error instead of calling again.
//! Every backend call is bounded by a timeout ([`BackendConfig::timeout`], 2 s by default). Any
//! failure is closed: the request is answered 503 `cellgate_credential_unavailable` and never
//! forwarded without its credential; the next request tries again, so recovery is automatic.
//!
//! Leases of dynamic secrets are renewed when a request finds them past half their life, replaced
//! shortly before they end or the Vault token that created them ends, and revoked when the cell
//! or the capability goes away
//! ([`Broker::watch_cells`]) or the capability's credential changes.
//!
//! Secrets are held in [`Secret`], whose `Debug` prints nothing; they never reach audit records,
//! logs, metrics or error bodies.

pub mod k8s;
pub mod vault;
#[cfg(any(test, feature = "testing"))]
pub mod vault_contract;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cellgate_api::manifest::CredentialSpec;
use cellgate_api::model::{Capability, Cell, Injection};
use http::{HeaderName, HeaderValue};

pub use k8s::KubeSecrets;
pub use vault::{VaultAuth, VaultBackend, VaultConfig};

/// How long a fetched secret without a lease is reused before the backend is asked again (files,
/// Kubernetes Secrets, and Vault reads unless `--vault-kv-ttl` says otherwise).
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// Default bound on one backend call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest secret accepted from a backend: credentials are tokens and passwords, not documents.
pub const MAX_SECRET_BYTES: usize = 16 * 1024;

/// A secret value. `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Wraps a value.
    pub fn new(v: impl Into<Arc<str>>) -> Self {
        Self(v.into())
    }

    /// The value, for injection only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Why a credential is unavailable. The message never contains the secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    /// The capability names a backend this node has not configured.
    #[error("no {0} credential backend is configured on this node")]
    NoBackend(&'static str),
    /// The backend could not produce the secret.
    #[error("{backend} could not provide the credential: {reason}")]
    Unavailable {
        /// Backend name.
        backend: &'static str,
        /// Why (no secret material).
        reason: String,
    },
    /// The secret cannot be put into a header.
    #[error("the credential cannot be injected: {0}")]
    Invalid(String),
}

/// The header a capability's credential sets, built from the secret.
#[derive(Debug, Clone)]
pub struct Injected {
    /// Header name (removed from the agent's request first).
    pub name: HeaderName,
    /// Value, marked sensitive so hyper never logs it.
    pub value: HeaderValue,
    /// The forms of the secret the agent must never read back (the secret, the header value,
    /// the encoded user and secret of basic auth): masked in the response ([`crate::scrub`]).
    pub scrub: Vec<Vec<u8>>,
}

/// Which backends a node uses (besides the secrets directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Vault, when `--vault-addr` is set.
    pub vault: Option<VaultConfig>,
    /// Read `credential.secret` from the Kubernetes API (`--k8s-secrets`).
    pub k8s_secrets: bool,
    /// Bound on one backend call.
    pub timeout: Duration,
    /// How long a Vault secret without a lease (KV v2, KV v1) is reused before Vault is read
    /// again (`--vault-kv-ttl`): a secret rotated in Vault is injected at most this long after.
    pub vault_kv_ttl: Duration,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            vault: None,
            k8s_secrets: false,
            timeout: DEFAULT_TIMEOUT,
            vault_kv_ttl: CACHE_TTL,
        }
    }
}

struct Cached {
    secret: Secret,
    /// Until then the secret is served without asking the backend.
    fresh_until: Instant,
    lease: Option<vault::Lease>,
}

#[derive(Default)]
struct SlotState {
    source: Option<CredentialSpec>,
    cached: Option<Cached>,
    /// The last fetch's failure and when it ended: requests that waited for it share it.
    failed: Option<(CredentialError, Instant)>,
    /// The capability is gone; its lease was revoked.
    closed: bool,
}

type Slot = Arc<tokio::sync::Mutex<SlotState>>;

/// Fetches and caches secrets per (cell, capability).
pub struct Broker {
    secrets_dir: Option<PathBuf>,
    vault: Option<Arc<VaultBackend>>,
    kube: Option<KubeSecrets>,
    timeout: Duration,
    vault_kv_ttl: Duration,
    slots: Mutex<HashMap<(String, String), Slot>>,
    /// The secrets last injected, by cell uid then capability: what a cell's requests must
    /// never carry elsewhere (`credential_exfiltration`).
    known: Mutex<HashMap<String, HashMap<String, Secret>>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("secrets_dir", &self.secrets_dir)
            .field("vault", &self.vault)
            .field("kube", &self.kube.is_some())
            .field("timeout", &self.timeout)
            .field("vault_kv_ttl", &self.vault_kv_ttl)
            .finish_non_exhaustive()
    }
}

impl Default for Broker {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Broker {
    /// A broker reading file credentials from `secrets_dir`.
    pub fn new(secrets_dir: Option<PathBuf>) -> Self {
        Self {
            secrets_dir,
            vault: None,
            kube: None,
            timeout: DEFAULT_TIMEOUT,
            vault_kv_ttl: CACHE_TTL,
            slots: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The secrets injected for `uid`'s capabilities, by capability name.
    pub fn known(&self, uid: &str) -> Vec<(String, Secret)> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(uid)
            .map(|m| m.iter().map(|(c, s)| (c.clone(), s.clone())).collect())
            .unwrap_or_default()
    }

    fn remember(&self, uid: &str, cap: &str, secret: &Secret) {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let caps = known.entry(uid.to_string()).or_default();
        if caps.get(cap).is_none_or(|s| s.expose() != secret.expose()) {
            caps.insert(cap.to_string(), secret.clone());
        }
    }

    /// The broker a node's configuration asks for.
    ///
    /// # Errors
    /// A bad Vault address, or `--k8s-secrets` without a usable Kubernetes configuration.
    pub async fn from_config(
        secrets_dir: Option<PathBuf>,
        config: &BackendConfig,
    ) -> anyhow::Result<Self> {
        let mut b = Self::new(secrets_dir)
            .with_timeout(config.timeout)
            .with_vault_kv_ttl(config.vault_kv_ttl);
        if let Some(v) = &config.vault {
            b = b.with_vault(v.clone())?;
        }
        if config.k8s_secrets {
            b =
                b.with_kube(KubeSecrets::infer().await.map_err(|e| {
                    anyhow::anyhow!("--k8s-secrets: no Kubernetes configuration: {e}")
                })?);
        }
        Ok(b)
    }

    /// Bounds every backend call by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Reuses a Vault secret without a lease for `ttl` before reading it again.
    pub fn with_vault_kv_ttl(mut self, ttl: Duration) -> Self {
        self.vault_kv_ttl = ttl;
        self
    }

    /// Adds the Vault backend.
    ///
    /// # Errors
    /// The address is not an `http(s)://` URL.
    pub fn with_vault(mut self, config: VaultConfig) -> Result<Self, CredentialError> {
        self.vault = Some(Arc::new(VaultBackend::new(config, self.timeout)?));
        Ok(self)
    }

    /// Adds the Kubernetes Secrets backend.
    pub fn with_kube(mut self, kube: KubeSecrets) -> Self {
        self.kube = Some(kube);
        self
    }

    /// The header to inject for `cap` of `cell`, or `None` when the capability has no credential.
    ///
    /// # Errors
    /// [`CredentialError`] when the secret cannot be had: the request must not be forwarded.
    pub async fn injection(
        &self,
        cell: &Cell,
        cap: &Capability,
    ) -> Result<Option<Injected>, CredentialError> {
        let Some(cred) = &cap.credential else {
            return Ok(None);
        };
        let secret = self.secret(cell, &cap.name, &cred.source).await?;
        self.remember(&cell.uid, &cap.name, &secret);
        let mut scrub = vec![secret.expose().as_bytes().to_vec()];
        let (name, value) = match &cred.injection {
            Injection::Header { name, template } => (
                name.clone(),
                template.replace("{{secret}}", secret.expose()),
            ),
            Injection::BasicAuth { username } => {
                let encoded = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{}", secret.expose()));
                scrub.push(encoded.as_bytes().to_vec());
                ("authorization".to_string(), format!("Basic {encoded}"))
            }
        };
        scrub.push(value.as_bytes().to_vec());
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| CredentialError::Invalid(format!("bad header name {name:?}")))?;
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            CredentialError::Invalid("the secret has characters a header cannot carry".into())
        })?;
        value.set_sensitive(true);
        Ok(Some(Injected { name, value, scrub }))
    }

    fn slot(&self, uid: &str, cap: &str) -> Slot {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slots
            .entry((uid.to_string(), cap.to_string()))
            .or_default()
            .clone()
    }

    async fn secret(
        &self,
        cell: &Cell,
        cap: &str,
        source: &CredentialSpec,
    ) -> Result<Secret, CredentialError> {
        let arrived = Instant::now();
        let slot = self.slot(&cell.uid, cap);
        // Single flight: one backend call per slot at a time; waiters reuse its result.
        let mut st = slot.lock().await;
        if st.closed {
            return Err(CredentialError::Unavailable {
                backend: "broker",
                reason: "the capability was removed while the request waited".into(),
            });
        }
        if st.source.as_ref() != Some(source) {
            // New slot, or the capability's credential changed: drop what the old one held.
            if let Some(old) = st.cached.take() {
                self.revoke_later(old.lease);
            }
            st.failed = None;
            st.source = Some(source.clone());
        }
        let now = Instant::now();
        if let Some(c) = st.cached.as_mut() {
            if now < c.fresh_until {
                return Ok(c.secret.clone());
            }
            if let (Some(l), Some(v)) = (c.lease.as_mut(), self.vault.as_ref()) {
                if l.renewal_helps() && now + l.margin() < l.usable_until() {
                    match v.renew(l).await {
                        Ok(d) if d > Duration::ZERO => {
                            let now = Instant::now();
                            l.expires = now + d;
                            l.duration = d;
                            c.fresh_until = l.fresh_until(now);
                            tracing::debug!(path = %l.path, granted = ?d, "vault lease renewed");
                            return Ok(c.secret.clone());
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(path = %l.path, error = %e, "vault lease renewal failed");
                        }
                    }
                }
                // Past this, the lease or the token that created it is about to end (Vault
                // revokes a token's leases with it): replace it rather than serve it.
                let last = l.usable_until().checked_sub(l.margin());
                if let Some(last) = last.filter(|last| Instant::now() < *last) {
                    // Still valid: keep serving it, try renewing again in a few seconds.
                    c.fresh_until = (Instant::now() + Duration::from_secs(5)).min(last);
                    return Ok(c.secret.clone());
                }
            }
        }
        if let Some((e, at)) = &st.failed {
            if *at >= arrived {
                return Err(e.clone());
            }
        }
        match tokio::time::timeout(self.timeout, self.fetch(cell, source)).await {
            Ok(Ok(f)) => {
                let now = Instant::now();
                let fresh_until = match &f.lease {
                    None if source.vault.is_some() => now + self.vault_kv_ttl,
                    None => now + CACHE_TTL,
                    Some(l) => l.fresh_until(now),
                };
                let secret = f.secret.clone();
                let old = st.cached.replace(Cached {
                    secret: f.secret,
                    fresh_until,
                    lease: f.lease,
                });
                st.failed = None;
                if let Some(old) = old {
                    self.revoke_later(old.lease);
                }
                Ok(secret)
            }
            Ok(Err(e)) => {
                st.failed = Some((e.clone(), Instant::now()));
                Err(e)
            }
            Err(_) => {
                let e = CredentialError::Unavailable {
                    backend: backend_name(source),
                    reason: format!("no answer within {:?}", self.timeout),
                };
                st.failed = Some((e.clone(), Instant::now()));
                Err(e)
            }
        }
    }

    fn revoke_later(&self, lease: Option<vault::Lease>) {
        let (Some(lease), Some(v)) = (lease, self.vault.clone()) else {
            return;
        };
        tokio::spawn(async move {
            match v.revoke(&lease).await {
                Ok(()) => tracing::debug!(path = %lease.path, "vault lease revoked"),
                Err(e) => {
                    tracing::warn!(path = %lease.path, error = %e, "vault lease revocation failed")
                }
            }
        });
    }

    /// Forgets every (cell, capability) for which `live(uid, capability, source)` is false and
    /// revokes the Vault leases they held. Returns how many were dropped.
    pub async fn retain(&self, live: impl Fn(&str, &str, &CredentialSpec) -> bool) -> usize {
        let slots: Vec<((String, String), Slot)> = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut dropped = 0;
        for ((uid, cap), slot) in slots {
            let mut st = slot.lock().await;
            let keep = st.source.as_ref().is_some_and(|s| live(&uid, &cap, s));
            if keep {
                continue;
            }
            st.closed = true;
            if let Some(c) = st.cached.take() {
                self.revoke_later(c.lease);
            }
            drop(st);
            self.slots
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&(uid, cap));
            dropped += 1;
        }
        dropped
    }

    /// At shutdown: forgets every cached secret and revokes every Vault lease still held, all
    /// at once, giving up after `within`. Returns (revoked, not revoked).
    pub async fn revoke_all(&self, within: Duration) -> (usize, usize) {
        let slots: Vec<Slot> = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .map(|(_, v)| v)
            .collect();
        let Some(v) = self.vault.clone() else {
            return (0, 0);
        };
        let mut leases = Vec::new();
        for slot in slots {
            let mut st = slot.lock().await;
            st.closed = true;
            if let Some(lease) = st.cached.take().and_then(|c| c.lease) {
                leases.push(lease);
            }
        }
        let total = leases.len();
        let revocations = leases.into_iter().map(|lease| {
            let v = v.clone();
            async move {
                match v.revoke(&lease).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(path = %lease.path, error = %e, "vault lease revocation at shutdown failed");
                        false
                    }
                }
            }
        });
        let revoked =
            match tokio::time::timeout(within, futures_util::future::join_all(revocations)).await {
                Ok(done) => done.into_iter().filter(|ok| *ok).count(),
                Err(_) => {
                    tracing::warn!(
                        leases = total,
                        "vault lease revocation at shutdown timed out"
                    );
                    0
                }
            };
        (revoked, total.saturating_sub(revoked))
    }

    /// Keeps the broker in step with the node's cells: whenever cells change, what a removed
    /// cell or capability held is dropped and its leases revoked.
    pub fn watch_cells(shared: &Arc<crate::Shared>) {
        let mut rx = shared.generation.subscribe();
        let weak = Arc::downgrade(shared);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(shared) = weak.upgrade() else { break };
                let snap = shared.cells.snapshot();
                shared
                    .credentials
                    .retain(|uid, cap, src| {
                        snap.get(uid)
                            .and_then(|e| e.cell.capability(cap))
                            .and_then(|c| c.credential.as_ref())
                            .is_some_and(|c| &c.source == src)
                    })
                    .await;
            }
        });
    }

    async fn fetch(
        &self,
        cell: &Cell,
        source: &CredentialSpec,
    ) -> Result<vault::Fetched, CredentialError> {
        if let Some(f) = &source.file {
            return Ok(vault::Fetched {
                secret: self.read_file(&f.name).await?,
                lease: None,
            });
        }
        if let Some(v) = &source.vault {
            let backend = self
                .vault
                .as_ref()
                .ok_or(CredentialError::NoBackend("vault"))?;
            return backend.read(&v.path, &v.field).await;
        }
        if let Some(s) = &source.secret {
            let backend = self
                .kube
                .as_ref()
                .ok_or(CredentialError::NoBackend("kubernetes secret"))?;
            return Ok(vault::Fetched {
                secret: backend.read(&cell.namespace, &s.name, &s.key).await?,
                lease: None,
            });
        }
        Err(CredentialError::Invalid(
            "the credential names no source".into(),
        ))
    }

    async fn read_file(&self, name: &str) -> Result<Secret, CredentialError> {
        let dir = self
            .secrets_dir
            .as_ref()
            .ok_or(CredentialError::NoBackend("file"))?;
        let path = dir.join(name);
        let unavailable = |reason: String| CredentialError::Unavailable {
            backend: "file",
            reason,
        };
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|e| unavailable(format!("{}: {}", path.display(), e.kind())))?;
        if meta.len() as usize > MAX_SECRET_BYTES {
            return Err(unavailable(format!(
                "{} is larger than {MAX_SECRET_BYTES} bytes",
                path.display()
            )));
        }
        let text = tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| unavailable(format!("{}: {}", path.display(), e.kind())))?;
        let v = text.trim_end_matches(['\r', '\n']);
        if v.is_empty() {
            return Err(unavailable(format!("{} is empty", path.display())));
        }
        Ok(Secret::new(v))
    }
}

fn backend_name(source: &CredentialSpec) -> &'static str {
    if source.file.is_some() {
        "file"
    } else if source.vault.is_some() {
        "vault"
    } else {
        "kubernetes secret"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellgate_api::manifest::parse_agent_cell;

    fn cell(inject: &str) -> Cell {
        let y = format!(
            "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: c}}\nspec:\n  capabilities:\n    - name: api\n      destinations: [{{host: api.test}}]\n      credential:\n        file: {{name: token}}\n        inject: {inject}\n"
        );
        parse_agent_cell(&y).unwrap().to_model().unwrap()
    }

    #[tokio::test]
    async fn header_and_basic_injection_from_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cr3t\n").unwrap();
        let b = Broker::new(Some(dir.path().into()));
        let c = cell("{header: Authorization, value: \"Bearer {{secret}}\"}");
        let i = b.injection(&c, &c.capabilities[0]).await.unwrap().unwrap();
        assert_eq!(i.name, "authorization");
        assert_eq!(i.value, "Bearer s3cr3t");
        assert!(i.value.is_sensitive());
        let c = cell("{basicAuth: {username: bot}}");
        let i = b.injection(&c, &c.capabilities[0]).await.unwrap().unwrap();
        assert_eq!(
            i.value,
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("bot:s3cr3t")
            )
        );
        assert_eq!(format!("{:?}", Secret::new("s3cr3t")), "Secret(..)");
    }

    #[tokio::test]
    async fn failures_are_closed_and_never_show_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let c = cell("{header: X-Api-Key, value: \"{{secret}}\"}");
        let e = Broker::new(None)
            .injection(&c, &c.capabilities[0])
            .await
            .unwrap_err();
        assert!(matches!(e, CredentialError::NoBackend("file")));
        let b = Broker::new(Some(dir.path().into()));
        let e = b.injection(&c, &c.capabilities[0]).await.unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        std::fs::write(dir.path().join("token"), "bad\u{7f}value").unwrap();
        let b = Broker::new(Some(dir.path().into()));
        let e = b.injection(&c, &c.capabilities[0]).await.unwrap_err();
        assert!(!e.to_string().contains("bad"), "{e}");
    }
}
