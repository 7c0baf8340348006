//! Cell tokens on the operator's side: minting with the control plane's key, and deciding from
//! the Secret read back whether the current token is kept or replaced. Pure functions; the clock
//! and the token id come in as arguments.
//!
//! A token is kept while more than a third of its lifetime is left and it still names the cell
//! as it is now (uid, namespace, name, role) under the current signing key; otherwise a fresh one
//! is minted. Rotated-out tokens are not revoked: the tagger picks up the new file only when
//! kubelet refreshes the Secret volume, and the old token expires on its own soon after.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use cellgate_api::crd::{ANNOTATION_TOKEN_EXPIRY, ANNOTATION_TOKEN_ID, TOKEN_SECRET_KEY};
use cellgate_api::model::Cell;
use cellgate_identity::{Claims, SigningKey};
use k8s_openapi::api::core::v1::Secret;

use crate::desired::IssuedToken;

/// The `iss` of every token the operator mints.
pub const ISSUER: &str = "cellgate-operator";

/// Why a token could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenIssueError {
    /// The JWT library refused the key.
    #[error("cannot sign a token for {cell}: {reason}")]
    Sign {
        /// `namespace/name`.
        cell: String,
        /// The library's reason.
        reason: String,
    },
    /// The expiry is not a representable time.
    #[error("token expiry {0} is out of range")]
    Expiry(i64),
}

/// A token with the times the rotation decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentToken {
    /// What goes into the Secret.
    pub issued: IssuedToken,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Expiry (Unix seconds).
    pub exp: i64,
}

impl CurrentToken {
    /// When the token is due for rotation: once less than a third of its lifetime is left.
    pub fn rotation_due(&self) -> i64 {
        let lifetime = self.exp.saturating_sub(self.iat).max(0);
        self.exp.saturating_sub(lifetime / 3)
    }
}

/// Formats Unix seconds as RFC 3339 (UTC, `Z`).
///
/// # Errors
/// When the time is out of the representable range.
pub fn rfc3339(secs: i64) -> Result<String, TokenIssueError> {
    jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .map_err(|_| TokenIssueError::Expiry(secs))
}

/// Parses an RFC 3339 time into Unix seconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    text.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// Mints a token for `cell`, valid from `now` for `ttl`, with id `jti`. Not bound to an address:
/// the pod's address is unknown before the pod exists; the node checks the source against the
/// cell's pods instead.
///
/// # Errors
/// [`TokenIssueError`] when signing fails or the expiry is out of range.
pub fn mint(
    key: &SigningKey,
    cell: &Cell,
    now: i64,
    ttl: Duration,
    jti: String,
) -> Result<CurrentToken, TokenIssueError> {
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let mut claims = Claims::for_cell(
        ISSUER,
        &cell.uid,
        &cell.namespace,
        &cell.name,
        cell.role.as_deref(),
        now,
        ttl_secs,
        None,
    );
    claims.jti = jti;
    let token =
        cellgate_identity::token::issue(key, &claims).map_err(|reason| TokenIssueError::Sign {
            cell: cell.key(),
            reason,
        })?;
    Ok(CurrentToken {
        issued: IssuedToken {
            token,
            id: claims.jti.clone(),
            expiry: rfc3339(claims.exp)?,
        },
        iat: claims.iat,
        exp: claims.exp,
    })
}

/// Reads the token back from the cell's Secret, without verifying its signature (the operator
/// wrote it; what matters here is whether to replace it). `None` when absent or unreadable.
pub fn read_secret(secret: &Secret) -> Option<(CurrentToken, Claims, String)> {
    let annotations = secret.metadata.annotations.as_ref()?;
    let id = annotations.get(ANNOTATION_TOKEN_ID)?;
    let expiry = annotations.get(ANNOTATION_TOKEN_EXPIRY)?;
    let token = secret.data.as_ref()?.get(TOKEN_SECRET_KEY)?;
    let token = String::from_utf8(token.0.clone()).ok()?;
    let mut parts = token.split('.');
    let header = URL_SAFE_NO_PAD.decode(parts.next()?).ok()?;
    let payload = URL_SAFE_NO_PAD.decode(parts.next()?).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    let kid = header.get("kid")?.as_str()?.to_string();
    let claims: Claims = serde_json::from_slice(&payload).ok()?;
    if &claims.jti != id || parse_rfc3339(expiry) != Some(claims.exp) {
        return None;
    }
    Some((
        CurrentToken {
            issued: IssuedToken {
                token,
                id: id.clone(),
                expiry: expiry.clone(),
            },
            iat: claims.iat,
            exp: claims.exp,
        },
        claims,
        kid,
    ))
}

/// What to do with the cell's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenDecision {
    /// Keep the token in the Secret.
    Keep(CurrentToken),
    /// Mint a new one, for this reason (a short label).
    Mint(&'static str),
}

/// Decides whether the token in `secret` (if any) is kept: it must name the cell as it is now,
/// be signed with the current key, and have more than a third of its lifetime left.
pub fn decide(secret: Option<&Secret>, cell: &Cell, kid: &str, now: i64) -> TokenDecision {
    let Some(secret) = secret else {
        return TokenDecision::Mint("missing");
    };
    let Some((current, claims, token_kid)) = read_secret(secret) else {
        return TokenDecision::Mint("unreadable");
    };
    if token_kid != kid {
        return TokenDecision::Mint("signing_key_rotated");
    }
    if claims.iss != ISSUER
        || claims.cell_uid != cell.uid
        || claims.namespace != cell.namespace
        || claims.name != cell.name
        || claims.role != cell.role
    {
        return TokenDecision::Mint("claims_changed");
    }
    if now >= current.rotation_due() {
        return TokenDecision::Mint("near_expiry");
    }
    TokenDecision::Keep(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::token_secret;
    use cellgate_api::crd::AgentCellResource;

    fn cell_obj(role: &str) -> AgentCellResource {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
            "metadata": {"name": "triage", "namespace": "agents", "uid": "u-1", "generation": 1},
            "spec": {"role": role, "capabilities": []}
        }))
        .expect("cell")
    }

    #[test]
    fn keeps_a_fresh_token_and_rotates_in_the_last_third() {
        let key = SigningKey::generate().expect("key");
        let obj = cell_obj("support");
        let cell = obj.to_model().expect("model");
        let t0 = 1_900_000_000;
        let tok = mint(&key, &cell, t0, Duration::from_secs(3600), "jti-1".into()).expect("mint");
        assert_eq!(tok.issued.expiry, "2030-03-17T18:46:40Z");
        assert_eq!(tok.rotation_due(), t0 + 2400);
        let secret = token_secret(&obj, &tok.issued).expect("secret");
        // Verifies with the public key, with the documented claims.
        let verifier = cellgate_identity::Verifier::new(&[key.public_key()]);
        let claims = verifier.verify(&tok.issued.token, t0 + 1).expect("valid");
        assert_eq!(claims.iss, "cellgate-operator");
        assert_eq!(claims.aud, "cellgate-node");
        assert_eq!(claims.pod_addr, None);
        assert_eq!(claims.role.as_deref(), Some("support"));

        assert_eq!(
            decide(Some(&secret), &cell, key.kid(), t0 + 2399),
            TokenDecision::Keep(tok.clone())
        );
        assert_eq!(
            decide(Some(&secret), &cell, key.kid(), t0 + 2400),
            TokenDecision::Mint("near_expiry")
        );
        assert_eq!(
            decide(None, &cell, key.kid(), t0),
            TokenDecision::Mint("missing")
        );
        assert_eq!(
            decide(Some(&secret), &cell, "other-kid", t0),
            TokenDecision::Mint("signing_key_rotated")
        );
        let changed = cell_obj("admin").to_model().expect("model");
        assert_eq!(
            decide(Some(&secret), &changed, key.kid(), t0),
            TokenDecision::Mint("claims_changed")
        );
        let mut tampered = secret.clone();
        if let Some(a) = tampered.metadata.annotations.as_mut() {
            a.insert(ANNOTATION_TOKEN_ID.into(), "other".into());
        }
        assert_eq!(
            decide(Some(&tampered), &cell, key.kid(), t0),
            TokenDecision::Mint("unreadable")
        );
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(rfc3339(0).expect("t"), "1970-01-01T00:00:00Z");
        assert_eq!(parse_rfc3339("2030-01-01T00:00:00Z"), Some(1_893_456_000));
        assert_eq!(parse_rfc3339("soon"), None);
    }
}
