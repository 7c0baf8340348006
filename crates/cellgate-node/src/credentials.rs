//! Credential brokering: the secret a capability names is fetched just in time and injected into
//! the request at the boundary; the agent never holds it.
//!
//! Backends: files in a secrets directory (local mode, `--secrets DIR`). A capability's secret is
//! cached briefly with single-flight refresh, so a burst of requests makes one backend read. Any
//! failure is closed: the request is answered 503 `cellgate_credential_unavailable` and never
//! forwarded without its credential.
//!
//! Secrets are held in [`Secret`], whose `Debug` prints nothing; they never reach audit records,
//! logs, metrics or error bodies.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cellgate_api::model::{Capability, Cell, Injection};
use http::{HeaderName, HeaderValue};

/// How long a fetched secret is reused before the backend is asked again.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
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
}

type Slot = Arc<tokio::sync::Mutex<Option<(Secret, Instant)>>>;

/// Fetches and caches secrets per (cell, capability).
#[derive(Debug, Default)]
pub struct Broker {
    secrets_dir: Option<PathBuf>,
    slots: Mutex<HashMap<(String, String), Slot>>,
}

impl Broker {
    /// A broker reading file credentials from `secrets_dir`.
    pub fn new(secrets_dir: Option<PathBuf>) -> Self {
        Self {
            secrets_dir,
            slots: Mutex::new(HashMap::new()),
        }
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
        let slot = {
            let mut slots = self
                .slots
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            slots
                .entry((cell.uid.clone(), cap.name.clone()))
                .or_default()
                .clone()
        };
        // Single flight: one fetch per slot at a time; waiters reuse its result.
        let mut guard = slot.lock().await;
        let secret = match guard.as_ref() {
            Some((s, at)) if at.elapsed() < CACHE_TTL => s.clone(),
            _ => {
                let s = self.fetch(&cred.source).await?;
                *guard = Some((s.clone(), Instant::now()));
                s
            }
        };
        drop(guard);
        let (name, value) = match &cred.injection {
            Injection::Header { name, template } => (
                name.clone(),
                template.replace("{{secret}}", secret.expose()),
            ),
            Injection::BasicAuth { username } => (
                "authorization".to_string(),
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("{username}:{}", secret.expose()))
                ),
            ),
        };
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| CredentialError::Invalid(format!("bad header name {name:?}")))?;
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            CredentialError::Invalid("the secret has characters a header cannot carry".into())
        })?;
        value.set_sensitive(true);
        Ok(Some(Injected { name, value }))
    }

    async fn fetch(
        &self,
        source: &cellgate_api::manifest::CredentialSpec,
    ) -> Result<Secret, CredentialError> {
        if let Some(f) = &source.file {
            let dir = self
                .secrets_dir
                .as_ref()
                .ok_or(CredentialError::NoBackend("file"))?;
            let path = dir.join(&f.name);
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
            return Ok(Secret::new(v));
        }
        if source.vault.is_some() {
            return Err(CredentialError::NoBackend("vault"));
        }
        Err(CredentialError::NoBackend("kubernetes secret"))
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
