//! Kubernetes Secrets, through kube: `credential.secret {name, key}` reads
//! `GET /api/v1/namespaces/<cell's namespace>/secrets/<name>` and takes `data[key]`.
//! A cell can only name Secrets of its own namespace.

use k8s_openapi::api::core::v1::Secret as K8sSecret;
use kube::Api;

use super::{CredentialError, Secret, MAX_SECRET_BYTES};

/// The Kubernetes Secrets backend.
#[derive(Clone)]
pub struct KubeSecrets {
    client: kube::Client,
}

impl std::fmt::Debug for KubeSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSecrets").finish_non_exhaustive()
    }
}

fn unavailable(reason: impl Into<String>) -> CredentialError {
    CredentialError::Unavailable {
        backend: "kubernetes secret",
        reason: reason.into(),
    }
}

impl KubeSecrets {
    /// A backend using `client` (tests pass kube's mocked service here).
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    /// A backend using the in-cluster configuration or `KUBECONFIG`.
    ///
    /// # Errors
    /// No usable Kubernetes configuration.
    pub async fn infer() -> Result<Self, kube::Error> {
        Ok(Self::new(kube::Client::try_default().await?))
    }

    /// `data[key]` of Secret `namespace/name`.
    ///
    /// # Errors
    /// The API server is unreachable or refuses, the Secret or key is missing, or the value is
    /// not text.
    pub async fn read(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Secret, CredentialError> {
        let api: Api<K8sSecret> = Api::namespaced(self.client.clone(), namespace);
        let s = match api.get(name).await {
            Ok(s) => s,
            Err(kube::Error::Api(st)) if st.is_not_found() => {
                return Err(unavailable(format!("secret {namespace}/{name} not found")))
            }
            Err(kube::Error::Api(st)) => {
                return Err(unavailable(format!(
                    "the API server refused reading secret {namespace}/{name}: HTTP {} {}",
                    st.code, st.reason
                )))
            }
            Err(_) => {
                return Err(unavailable(format!(
                    "cannot read secret {namespace}/{name} from the API server"
                )))
            }
        };
        let bytes =
            s.data.as_ref().and_then(|d| d.get(key)).ok_or_else(|| {
                unavailable(format!("secret {namespace}/{name} has no key {key:?}"))
            })?;
        if bytes.0.len() > MAX_SECRET_BYTES {
            return Err(unavailable(format!(
                "key {key:?} of secret {namespace}/{name} is larger than {MAX_SECRET_BYTES} bytes"
            )));
        }
        let text = std::str::from_utf8(&bytes.0).map_err(|_| {
            unavailable(format!(
                "key {key:?} of secret {namespace}/{name} is not UTF-8 text"
            ))
        })?;
        let v = text.trim_end_matches(['\r', '\n']);
        if v.is_empty() {
            return Err(unavailable(format!(
                "key {key:?} of secret {namespace}/{name} is empty"
            )));
        }
        Ok(Secret::new(v))
    }
}
