//! Who is calling, and may they: Kubernetes `TokenReview` (authentication.k8s.io/v1) for the
//! bearer token, `SubjectAccessReview` (authorization.k8s.io/v1) against the `cellgate.dev`
//! group for each call. Nothing is cached: every call asks the API server again, so a revoked
//! token or a removed RoleBinding takes effect on the next call.

use std::collections::BTreeMap;

use http::HeaderMap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

/// The API group every control API authorization names.
pub const GROUP: &str = cellgate_api::crd::GROUP;

/// Longest bearer token accepted, bytes (service account tokens are about 1 KiB; OIDC tokens
/// a few); anything longer is refused without asking the API server.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The authenticated caller, as the API server's TokenReview names them.
#[derive(Clone, PartialEq, Eq)]
pub struct Caller {
    /// User name (`system:serviceaccount:NS:NAME` for a service account).
    pub user: String,
    /// User uid.
    pub uid: Option<String>,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra attributes (passed on to SubjectAccessReview as they came).
    pub extra: BTreeMap<String, Vec<String>>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("user", &self.user)
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

/// Why a caller is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// No `Authorization: Bearer` header.
    #[error("no bearer token: send Authorization: Bearer <token>")]
    Missing,
    /// The API server did not accept the token.
    #[error("the token was not accepted by the API server{0}")]
    Rejected(String),
    /// The TokenReview could not be made.
    #[error("cannot check the token with the API server: {0}")]
    Unavailable(String),
}

/// What a call needs permission for: verb, resource (of `cellgate.dev`), namespace, name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// `get`, `list`, `create` or `update`.
    pub verb: &'static str,
    /// `agentcells`, `agentapprovals`, `audit`, `lockdowns`, `revocations`.
    pub resource: &'static str,
    /// The namespace, or `None` for the whole cluster.
    pub namespace: Option<String>,
    /// The object's name, when the call is about one.
    pub name: Option<String>,
}

/// The bearer token of `Authorization: Bearer <token>`.
///
/// # Errors
/// [`AuthnError::Missing`] when absent or malformed; [`AuthnError::Rejected`] when too long.
pub fn bearer(headers: &HeaderMap) -> Result<String, AuthnError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthnError::Missing)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthnError::Missing)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthnError::Missing);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthnError::Rejected(": too long".into()));
    }
    Ok(token.to_string())
}

/// Authenticates the caller with a TokenReview.
///
/// # Errors
/// [`AuthnError`]: no token, a token the API server rejects, or no answer.
pub async fn authenticate(client: &Client, headers: &HeaderMap) -> Result<Caller, AuthnError> {
    let token = bearer(headers)?;
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            audiences: None,
        },
        ..TokenReview::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let answer = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| AuthnError::Unavailable(e.to_string()))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let why = status
            .error
            .filter(|e| !e.is_empty())
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(AuthnError::Rejected(why));
    }
    let user = status.user.unwrap_or_default();
    let name = user.username.unwrap_or_default();
    if name.is_empty() {
        return Err(AuthnError::Rejected(": no user name".into()));
    }
    Ok(Caller {
        user: name,
        uid: user.uid,
        groups: user.groups.unwrap_or_default(),
        extra: user.extra.unwrap_or_default(),
    })
}

/// Asks the API server whether `caller` may do `attrs` (SubjectAccessReview). `Ok(false)` is a
/// denial; `Err` means no answer (the call is refused too).
///
/// # Errors
/// The SubjectAccessReview could not be made.
pub async fn authorize(
    client: &Client,
    caller: &Caller,
    attrs: &Attributes,
) -> Result<bool, String> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(caller.user.clone()),
            uid: caller.uid.clone(),
            groups: Some(caller.groups.clone()),
            extra: (!caller.extra.is_empty()).then(|| caller.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(attrs.resource.into()),
                verb: Some(attrs.verb.into()),
                namespace: attrs.namespace.clone(),
                name: attrs.name.clone(),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let answer = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_taken_only_from_a_bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Err(AuthnError::Missing));
        h.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), Err(AuthnError::Missing));
        h.insert(http::header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), Err(AuthnError::Missing));
        h.insert(http::header::AUTHORIZATION, "bearer tok-1".parse().unwrap());
        assert_eq!(bearer(&h), Ok("tok-1".into()));
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        h.insert(http::header::AUTHORIZATION, long.parse().unwrap());
        assert!(matches!(bearer(&h), Err(AuthnError::Rejected(_))));
    }
}
