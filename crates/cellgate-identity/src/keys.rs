//! Ed25519 signing keys.
//!
//! `signing.key` holds the PKCS#8 private key as PEM (`PRIVATE KEY`), mode 0600. `signing.pub` is
//! a JSON Web Key (`{"kty":"OKP","crv":"Ed25519","alg":"EdDSA","kid":...,"x":...}`) whose key
//! id is the first 16 hex digits of SHA-256 over the raw public key, so a key id is stable and
//! can be recomputed from either half.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Errors reading or writing keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// File system error, with the path.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What happened.
        source: std::io::Error,
    },
    /// Refusing to overwrite.
    #[error("{0} already exists; remove it first or pick another --out directory")]
    Exists(PathBuf),
    /// Not a usable key.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The random generator failed.
    #[error("could not generate a key: {0}")]
    Generate(String),
}

/// An Ed25519 private key (PKCS#8 DER) with its key id. `Debug` prints the key id only.
pub struct SigningKey {
    pkcs8: Vec<u8>,
    public: [u8; 32],
    kid: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The key id of a raw Ed25519 public key.
pub fn key_id(public: &[u8]) -> String {
    let digest = Sha256::digest(public);
    hex::encode(digest).chars().take(16).collect()
}

impl SigningKey {
    /// A fresh random key.
    ///
    /// # Errors
    /// When the system random generator fails.
    pub fn generate() -> Result<Self, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let doc =
            Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| KeyError::Generate(e.to_string()))?;
        Self::from_pkcs8(doc.as_ref().to_vec()).map_err(KeyError::Generate)
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
        let public: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| "unexpected public key length".to_string())?;
        Ok(Self {
            kid: key_id(&public),
            pkcs8,
            public,
        })
    }

    /// Reads a PEM `PRIVATE KEY` file.
    ///
    /// # Errors
    /// When the file cannot be read or holds no Ed25519 key.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.into(),
            source,
        })?;
        let invalid = |reason: String| KeyError::Invalid {
            path: path.into(),
            reason,
        };
        let body: String = text
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN PRIVATE KEY-----"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        if body.is_empty() {
            return Err(invalid("no PEM PRIVATE KEY block".into()));
        }
        let der = STANDARD
            .decode(body.trim())
            .map_err(|e| invalid(format!("bad base64: {e}")))?;
        Self::from_pkcs8(der).map_err(invalid)
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            kid: self.kid.clone(),
            raw: self.public,
        }
    }

    pub(crate) fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// PEM text of the private key.
    pub fn to_pem(&self) -> String {
        let b64 = STANDARD.encode(&self.pkcs8);
        let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END PRIVATE KEY-----\n");
        out
    }

    /// Writes `signing.key` (mode 0600) and `signing.pub` into `dir`, refusing to overwrite.
    ///
    /// # Errors
    /// When a file exists or cannot be written.
    pub fn write_pair(&self, dir: &Path) -> Result<(PathBuf, PathBuf), KeyError> {
        fs::create_dir_all(dir).map_err(|source| KeyError::Io {
            path: dir.into(),
            source,
        })?;
        let key_path = dir.join("signing.key");
        let pub_path = dir.join("signing.pub");
        for p in [&key_path, &pub_path] {
            if p.exists() {
                return Err(KeyError::Exists(p.clone()));
            }
        }
        write_private(&key_path, self.to_pem().as_bytes())?;
        let jwk = self.public_key().to_jwk_json();
        fs::write(&pub_path, jwk + "\n").map_err(|source| KeyError::Io {
            path: pub_path.clone(),
            source,
        })?;
        Ok((key_path, pub_path))
    }
}

/// Creates `path` with mode 0600 and writes `bytes`, so the secret is never world-readable, not
/// even for an instant.
///
/// # Errors
/// When the file exists or cannot be written.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| KeyError::Io {
            path: path.into(),
            source,
        })?;
    f.write_all(bytes).map_err(|source| KeyError::Io {
        path: path.into(),
        source,
    })
}

/// An Ed25519 public key with its key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Key id.
    pub kid: String,
    /// Raw 32-byte key.
    pub raw: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct Jwk {
    kty: String,
    crv: String,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    x: String,
}

impl PublicKey {
    /// The JWK text written to `signing.pub`.
    pub fn to_jwk_json(&self) -> String {
        let jwk = Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            alg: Some("EdDSA".into()),
            kid: Some(self.kid.clone()),
            x: URL_SAFE_NO_PAD.encode(self.raw),
        };
        serde_json::to_string(&jwk).unwrap_or_default()
    }

    /// Parses a JWK (one key) or a JWK set (`{"keys":[...]}`), as written by `cellgate keys init`.
    ///
    /// # Errors
    /// When the text is not an Ed25519 JWK, or its `kid` does not match the key.
    pub fn parse_all(text: &str) -> Result<Vec<Self>, String> {
        #[derive(Deserialize)]
        struct Set {
            keys: Vec<Jwk>,
        }
        let jwks: Vec<Jwk> = if let Ok(set) = serde_json::from_str::<Set>(text) {
            set.keys
        } else {
            vec![serde_json::from_str::<Jwk>(text).map_err(|e| format!("not a JWK: {e}"))?]
        };
        jwks.into_iter()
            .map(|j| {
                if j.kty != "OKP" || j.crv != "Ed25519" {
                    return Err(format!(
                        "unsupported key type {}/{}: expected OKP/Ed25519",
                        j.kty, j.crv
                    ));
                }
                let raw: [u8; 32] = URL_SAFE_NO_PAD
                    .decode(j.x.trim_end_matches('='))
                    .map_err(|e| format!("bad x: {e}"))?
                    .try_into()
                    .map_err(|_| "x is not 32 bytes".to_string())?;
                let kid = key_id(&raw);
                if let Some(k) = j.kid {
                    if k != kid {
                        return Err(format!("kid {k:?} does not match the key (expected {kid})"));
                    }
                }
                Ok(Self { kid, raw })
            })
            .collect()
    }

    /// Reads a `signing.pub` file.
    ///
    /// # Errors
    /// When unreadable or invalid; the message names the file.
    pub fn load_all(path: &Path) -> Result<Vec<Self>, KeyError> {
        let text = fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.into(),
            source,
        })?;
        Self::parse_all(&text).map_err(|reason| KeyError::Invalid {
            path: path.into(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let (k, p) = key.write_pair(dir.path()).unwrap();
        assert_eq!(
            fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = SigningKey::load(&k).unwrap();
        assert_eq!(back.kid(), key.kid());
        let pubs = PublicKey::load_all(&p).unwrap();
        assert_eq!(pubs, vec![key.public_key()]);
        assert!(matches!(
            key.write_pair(dir.path()),
            Err(KeyError::Exists(_))
        ));
        assert!(!format!("{key:?}").contains(&key.to_pem()[30..50]));
    }

    #[test]
    fn rejects_mismatched_kid_and_wrong_type() {
        let key = SigningKey::generate().unwrap();
        let jwk = key
            .public_key()
            .to_jwk_json()
            .replace(key.kid(), "0000000000000000");
        assert!(PublicKey::parse_all(&jwk)
            .unwrap_err()
            .contains("does not match"));
        assert!(PublicKey::parse_all(r#"{"kty":"RSA","crv":"x","x":"AA"}"#).is_err());
        let set = format!("{{\"keys\":[{}]}}", key.public_key().to_jwk_json());
        assert_eq!(PublicKey::parse_all(&set).unwrap().len(), 1);
    }
}
