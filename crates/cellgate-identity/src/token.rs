//! Token claims, issuing and verification.
//!
//! Verification is strict-tier code: the token comes from the network. Each way a token can fail
//! is its own [`TokenError`] variant with a stable [`TokenError::reason`] label that the node puts
//! in audit records and metrics.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::RwLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, SigningKey};

/// The audience every token names: the node proxy.
pub const AUDIENCE: &str = "cellgate-node";
/// Default issuer of locally issued tokens.
pub const LOCAL_ISSUER: &str = "cellgate-local";
/// A token longer than this is refused before any parsing: our tokens are a few hundred bytes, and
/// the bound keeps a hostile peer from making the verifier decode megabytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Clock skew tolerated on `nbf` and `exp`, in seconds.
pub const LEEWAY_SECS: i64 = 5;

/// Whether a token that expires at `exp` (Unix seconds) is refused as expired at `now`, leeway
/// included: the one rule every check of `exp` uses.
pub fn is_past_expiry(exp: i64, now: i64) -> bool {
    now >= exp.saturating_add(LEEWAY_SECS)
}

/// The claims of a cell token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer: the control plane or `cellgate-local`.
    pub iss: String,
    /// Audience: [`AUDIENCE`].
    pub aud: String,
    /// Subject: `namespace/name`.
    pub sub: String,
    /// Unique id of this token.
    pub jti: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Not valid before (Unix seconds).
    pub nbf: i64,
    /// Expiry (Unix seconds).
    pub exp: i64,
    /// The cell's uid.
    pub cell_uid: String,
    /// The cell's namespace.
    pub namespace: String,
    /// The cell's name.
    pub name: String,
    /// The cell's role, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The pod address the token is bound to; a connection from any other source is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_addr: Option<String>,
}

impl Claims {
    /// Claims for a cell, valid from `now` for `ttl_secs`, with a fresh `jti`.
    #[allow(clippy::too_many_arguments)]
    pub fn for_cell(
        issuer: &str,
        cell_uid: &str,
        namespace: &str,
        name: &str,
        role: Option<&str>,
        now: i64,
        ttl_secs: i64,
        pod_addr: Option<IpAddr>,
    ) -> Self {
        Self {
            iss: issuer.into(),
            aud: AUDIENCE.into(),
            sub: format!("{namespace}/{name}"),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl_secs),
            cell_uid: cell_uid.into(),
            namespace: namespace.into(),
            name: name.into(),
            role: role.map(str::to_string),
            pod_addr: pod_addr.map(|a| a.to_string()),
        }
    }
}

/// Why a token or its use was refused. Constructed only by verification code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, too long, wrong algorithm, or claims of the wrong shape.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not verify with the key its `kid` names.
    #[error("bad token signature (key id {0})")]
    BadSignature(String),
    /// No trusted key has this id.
    #[error("unknown key id {0:?}; trusted keys come from --trust files")]
    UnknownKey(String),
    /// `aud` is not [`AUDIENCE`].
    #[error("wrong audience {0:?}, expected {AUDIENCE:?}")]
    WrongAudience(String),
    /// Past `exp`.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// Expiry.
        exp: i64,
        /// Now.
        now: i64,
    },
    /// Before `nbf`.
    #[error("token not valid before {nbf} (now {now})")]
    NotYetValid {
        /// Not before.
        nbf: i64,
        /// Now.
        now: i64,
    },
    /// The `jti` was revoked.
    #[error("token {0} was revoked")]
    Revoked(String),
    /// The cell the token names is not known to this node.
    #[error("unknown cell {0}")]
    UnknownCell(String),
    /// The connection's source is not the address the token is bound to.
    #[error("source address {source_addr} is not the cell's bound address {bound}")]
    SourceNotBound {
        /// The connection's source.
        source_addr: String,
        /// The bound address.
        bound: String,
    },
}

impl TokenError {
    /// Every label [`TokenError::reason`] gives.
    pub const LABELS: &'static [&'static str] = &[
        "token_malformed",
        "token_bad_signature",
        "token_unknown_key",
        "token_wrong_audience",
        "token_expired",
        "token_not_yet_valid",
        "token_revoked",
        "cell_unknown",
        "source_not_bound",
    ];

    /// The stable label for audit records and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "token_malformed",
            TokenError::BadSignature(_) => "token_bad_signature",
            TokenError::UnknownKey(_) => "token_unknown_key",
            TokenError::WrongAudience(_) => "token_wrong_audience",
            TokenError::Expired { .. } => "token_expired",
            TokenError::NotYetValid { .. } => "token_not_yet_valid",
            TokenError::Revoked(_) => "token_revoked",
            TokenError::UnknownCell(_) => "cell_unknown",
            TokenError::SourceNotBound { .. } => "source_not_bound",
        }
    }
}

/// Signs `claims` with `key` (EdDSA, header `kid` set).
///
/// # Errors
/// When the key cannot be used by the JWT library.
pub fn issue(key: &SigningKey, claims: &Claims) -> Result<String, String> {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(key.kid().to_string());
    let enc = EncodingKey::from_ed_der(key.pkcs8());
    jsonwebtoken::encode(&header, claims, &enc).map_err(|e| format!("cannot sign token: {e}"))
}

/// Verifies tokens against a set of trusted public keys and a revocation set.
///
/// The trusted keys can be replaced while tokens are verified ([`Verifier::set_keys`]): that is
/// how a node follows a rotation of the signing key by key id without a restart.
pub struct Verifier {
    keys: RwLock<HashMap<String, DecodingKey>>,
    /// Revoked token ids, with the token's expiry when known (`None`: kept for good).
    revoked: RwLock<HashMap<String, Option<i64>>>,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("kids", &self.key_ids())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier trusting `keys`.
    pub fn new(keys: &[PublicKey]) -> Self {
        let keys = RwLock::new(decoding_keys(keys));
        let mut validation = Validation::new(Algorithm::EdDSA);
        // Time and audience are checked below against an explicit `now`, so each failure gets its
        // own reason and tests (and replay) are deterministic.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        Self {
            keys,
            revoked: RwLock::new(HashMap::new()),
            validation,
        }
    }

    /// The trusted key ids, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// Trusts exactly `keys` from now on: tokens whose `kid` is among them verify, others are
    /// refused as [`TokenError::UnknownKey`]. Returns whether the set of key ids changed.
    pub fn set_keys(&self, keys: &[PublicKey]) -> bool {
        let before = self.key_ids();
        let next = decoding_keys(keys);
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        before != self.key_ids()
    }

    /// Revokes a token id for good: later verifications of it fail with
    /// [`TokenError::Revoked`].
    pub fn revoke(&self, jti: &str) {
        if let Ok(mut set) = self.revoked.write() {
            set.insert(jti.to_string(), None);
        }
    }

    /// Revokes a token id whose token expires at `exp` (Unix seconds): it is refused as revoked
    /// until then, and [`Verifier::prune_revoked`] may forget it once the token would be refused
    /// as expired anyway. An id already revoked for good stays so.
    pub fn revoke_until(&self, jti: &str, exp: i64) {
        if let Ok(mut set) = self.revoked.write() {
            set.entry(jti.to_string())
                .and_modify(|e| {
                    if let Some(old) = e {
                        *old = (*old).max(exp);
                    }
                })
                .or_insert(Some(exp));
        }
    }

    /// Forgets revoked ids whose token has expired, leeway included, at `now`; returns how many.
    /// Their tokens keep failing, as [`TokenError::Expired`].
    pub fn prune_revoked(&self, now: i64) -> usize {
        let Ok(mut set) = self.revoked.write() else {
            return 0;
        };
        let before = set.len();
        set.retain(|_, exp| exp.is_none_or(|exp| !is_past_expiry(exp, now)));
        before.saturating_sub(set.len())
    }

    /// How many token ids are held as revoked.
    pub fn revoked_count(&self) -> usize {
        self.revoked.read().map(|s| s.len()).unwrap_or(0)
    }

    /// Whether `jti` is revoked.
    pub fn is_revoked(&self, jti: &str) -> bool {
        self.revoked
            .read()
            .map(|s| s.contains_key(jti))
            .unwrap_or(true)
    }

    /// Verifies signature, key id, audience and validity window at `now` (Unix seconds).
    ///
    /// # Errors
    /// One [`TokenError`] naming the first check that failed.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed(format!(
                "{} bytes, over the {MAX_TOKEN_LEN} byte limit",
                token.len()
            )));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Malformed(format!(
                "algorithm {:?}, expected EdDSA",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| TokenError::UnknownKey(String::new()))?;
        let key = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&kid)
            .cloned()
            .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature(kid.clone()),
                _ => TokenError::Malformed(e.to_string()),
            }
        })?;
        let c = data.claims;
        if c.aud != AUDIENCE {
            return Err(TokenError::WrongAudience(c.aud));
        }
        if is_past_expiry(c.exp, now) {
            return Err(TokenError::Expired { exp: c.exp, now });
        }
        if now.saturating_add(LEEWAY_SECS) < c.nbf {
            return Err(TokenError::NotYetValid { nbf: c.nbf, now });
        }
        if self.is_revoked(&c.jti) {
            return Err(TokenError::Revoked(c.jti));
        }
        Ok(c)
    }
}

fn decoding_keys(keys: &[PublicKey]) -> HashMap<String, DecodingKey> {
    keys.iter()
        .map(|k| {
            (
                k.kid.clone(),
                DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(k.raw)).unwrap_or_else(
                    |_| {
                        // from_ed_components only fails on bad base64, which we just produced.
                        DecodingKey::from_ed_der(&k.raw)
                    },
                ),
            )
        })
        .collect()
}

/// Checks that a connection from `source` may use `claims`: when the token is bound to a pod
/// address, the source must be that address (an IPv4-mapped IPv6 source counts as IPv4).
///
/// # Errors
/// [`TokenError::SourceNotBound`].
pub fn check_binding(claims: &Claims, source: IpAddr) -> Result<(), TokenError> {
    let Some(bound) = &claims.pod_addr else {
        return Ok(());
    };
    let source = match source {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(source),
        v4 => v4,
    };
    match bound.parse::<IpAddr>() {
        Ok(b) if b == source => Ok(()),
        _ => Err(TokenError::SourceNotBound {
            source_addr: source.to_string(),
            bound: bound.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn setup() -> (SigningKey, Verifier, Claims) {
        let key = SigningKey::generate().unwrap();
        let verifier = Verifier::new(&[key.public_key()]);
        let claims = Claims::for_cell(
            LOCAL_ISSUER,
            "uid-1",
            "ns",
            "demo",
            Some("r"),
            NOW,
            600,
            Some("10.0.0.2".parse().unwrap()),
        );
        (key, verifier, claims)
    }

    #[test]
    fn revoked_ids_are_forgotten_only_once_their_token_is_expired() {
        let (key, v, c) = setup();
        let t = issue(&key, &c).unwrap();
        v.revoke_until(&c.jti, c.exp);
        v.revoke("kept-for-good");
        assert_eq!(v.revoked_count(), 2);
        assert_eq!(v.verify(&t, NOW).unwrap_err().reason(), "token_revoked");
        // Just inside the leeway: still held, still refused as revoked.
        assert_eq!(v.prune_revoked(c.exp + LEEWAY_SECS - 1), 0);
        assert_eq!(
            v.verify(&t, c.exp + LEEWAY_SECS - 1).unwrap_err().reason(),
            "token_revoked"
        );
        // Past it: forgotten, and the token is refused as expired; the id without an expiry stays.
        assert_eq!(v.prune_revoked(c.exp + LEEWAY_SECS), 1);
        assert!(!v.is_revoked(&c.jti) && v.is_revoked("kept-for-good"));
        assert_eq!(
            v.verify(&t, c.exp + LEEWAY_SECS).unwrap_err().reason(),
            "token_expired"
        );
        // Revoked for good is not weakened by a later expiry.
        v.revoke_until("kept-for-good", NOW);
        assert_eq!(v.prune_revoked(NOW + 3600), 0);
        assert!(v.is_revoked("kept-for-good"));
    }

    #[test]
    fn a_second_key_is_trusted_beside_the_first_then_alone() {
        let (old, v, c) = setup();
        let new = SigningKey::generate().unwrap();
        let old_token = issue(&old, &c).unwrap();
        let new_token = issue(&new, &c).unwrap();
        assert_eq!(
            v.verify(&new_token, NOW).unwrap_err().reason(),
            "token_unknown_key"
        );
        assert!(v.set_keys(&[old.public_key(), new.public_key()]));
        assert!(
            !v.set_keys(&[new.public_key(), old.public_key()]),
            "same ids"
        );
        assert_eq!(v.verify(&old_token, NOW).unwrap(), c);
        assert_eq!(v.verify(&new_token, NOW).unwrap(), c);
        let mut ids = vec![old.kid().to_string(), new.kid().to_string()];
        ids.sort();
        assert_eq!(v.key_ids(), ids);
        assert!(v.set_keys(&[new.public_key()]));
        assert_eq!(
            v.verify(&old_token, NOW).unwrap_err().reason(),
            "token_unknown_key"
        );
        assert_eq!(v.verify(&new_token, NOW).unwrap(), c);
    }

    #[test]
    fn round_trip() {
        let (key, v, c) = setup();
        let t = issue(&key, &c).unwrap();
        assert_eq!(v.verify(&t, NOW + 1).unwrap(), c);
        check_binding(&c, "10.0.0.2".parse().unwrap()).unwrap();
        check_binding(&c, "::ffff:10.0.0.2".parse().unwrap()).unwrap();
    }

    #[test]
    fn labels_are_exactly_the_reasons() {
        let s = String::new;
        let all = [
            TokenError::Malformed(s()),
            TokenError::BadSignature(s()),
            TokenError::UnknownKey(s()),
            TokenError::WrongAudience(s()),
            TokenError::Expired { exp: 0, now: 0 },
            TokenError::NotYetValid { nbf: 0, now: 0 },
            TokenError::Revoked(s()),
            TokenError::UnknownCell(s()),
            TokenError::SourceNotBound {
                source_addr: s(),
                bound: s(),
            },
        ];
        let got: Vec<&str> = all.iter().map(TokenError::reason).collect();
        assert_eq!(got, TokenError::LABELS);
    }

    #[test]
    fn each_failure_has_its_reason() {
        let (key, v, c) = setup();
        let t = issue(&key, &c).unwrap();
        // bad signature: flip a byte of the signature
        let (head, sig) = t.rsplit_once('.').unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        sig[0] ^= 1;
        let forged = format!("{head}.{}", URL_SAFE_NO_PAD.encode(sig));
        assert_eq!(
            v.verify(&forged, NOW).unwrap_err().reason(),
            "token_bad_signature"
        );
        // a token signed by another key with the same kid claims
        let other = SigningKey::generate().unwrap();
        let t2 = issue(&other, &c).unwrap();
        assert_eq!(
            v.verify(&t2, NOW).unwrap_err().reason(),
            "token_unknown_key"
        );
        // forged kid pointing at the trusted key, signed by another key
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(key.kid().into());
        let t3 = jsonwebtoken::encode(&h, &c, &EncodingKey::from_ed_der(other.pkcs8())).unwrap();
        assert_eq!(
            v.verify(&t3, NOW).unwrap_err().reason(),
            "token_bad_signature"
        );
        let mut wrong_aud = c.clone();
        wrong_aud.aud = "someone-else".into();
        assert_eq!(
            v.verify(&issue(&key, &wrong_aud).unwrap(), NOW)
                .unwrap_err()
                .reason(),
            "token_wrong_audience"
        );
        assert_eq!(
            v.verify(&t, NOW + 600 + LEEWAY_SECS).unwrap_err().reason(),
            "token_expired"
        );
        assert_eq!(
            v.verify(&t, NOW - 100).unwrap_err().reason(),
            "token_not_yet_valid"
        );
        v.revoke(&c.jti);
        assert_eq!(v.verify(&t, NOW).unwrap_err().reason(), "token_revoked");
        assert_eq!(
            check_binding(&c, "10.0.0.3".parse().unwrap())
                .unwrap_err()
                .reason(),
            "source_not_bound"
        );
        for junk in ["", "a.b.c", "not a token", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            assert_eq!(
                v.verify(junk, NOW).unwrap_err().reason(),
                "token_malformed",
                "{junk:.20}"
            );
        }
        // alg none / HS256 refused
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert_eq!(v.verify(&hs, NOW).unwrap_err().reason(), "token_malformed");
    }
}
