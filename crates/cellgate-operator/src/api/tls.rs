//! The control API's TLS: a certificate and key from files (`--api-tls-cert`, `--api-tls-key`),
//! or, when none is given, a self-signed certificate generated at start (logged with its
//! SHA-256 fingerprint, so a client can pin it).

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest as _;

/// Why the control API's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or held no usable PEM.
    #[error("cannot use {path}: {reason}; check --api-tls-cert and --api-tls-key")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the certificate and key.
    #[error("the control API certificate and key do not make a TLS configuration: {0}")]
    Config(String),
    /// A self-signed certificate could not be generated.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
}

/// A server configuration and how it came to be.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// For the acceptor.
    pub config: Arc<ServerConfig>,
    /// SHA-256 of the leaf certificate (DER), lowercase hex.
    pub fingerprint: String,
    /// The leaf certificate (PEM); a test or a client pins it.
    pub cert_pem: String,
    /// Whether it was generated at start.
    pub self_signed: bool,
}

/// Loads the certificate chain and key files.
///
/// # Errors
/// [`TlsError`] when a file is unreadable, holds no certificate or key, or they do not match.
pub fn from_files(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| TlsError::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    from_pem(&cert_pem, &key_pem, false).map_err(|e| match e {
        TlsError::File { reason, .. } if reason.contains("certificate") => TlsError::File {
            path: cert.display().to_string(),
            reason,
        },
        TlsError::File { reason, .. } => TlsError::File {
            path: key.display().to_string(),
            reason,
        },
        other => other,
    })
}

/// A self-signed certificate for `names` (DNS names of the Service) and `localhost`.
///
/// # Errors
/// [`TlsError::Generate`] when rcgen fails.
pub fn self_signed(names: &[String]) -> Result<ServerTls, TlsError> {
    let mut sans: Vec<String> = names.to_vec();
    sans.push("localhost".into());
    let cert =
        rcgen::generate_simple_self_signed(sans).map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert_pem = cert.cert.pem();
    let key_pem = cert.signing_key.serialize_pem();
    from_pem(cert_pem.as_bytes(), key_pem.as_bytes(), true)
}

/// A server configuration from PEM text (HTTP/1.1 and h2 offered by ALPN).
///
/// # Errors
/// [`TlsError`] when no certificate or key is found, or rustls refuses them.
pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], self_signed: bool) -> Result<ServerTls, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::File {
            path: String::new(),
            reason: format!("bad certificate PEM: {e}"),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::File {
            path: String::new(),
            reason: "no PEM certificate found".into(),
        });
    };
    let fingerprint = hex::encode(sha2::Sha256::digest(leaf.as_ref()));
    let leaf_pem = pem_of(leaf);
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::File {
        path: String::new(),
        reason: format!("no usable private key: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        fingerprint,
        cert_pem: leaf_pem,
        self_signed,
    })
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_and_files_load_and_bad_files_are_named() {
        let tls = self_signed(&["cellgate-operator-api.cellgate-system.svc".into()])
            .expect("self-signed");
        assert!(tls.self_signed);
        assert_eq!(tls.fingerprint.len(), 64);
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = rcgen::generate_simple_self_signed(vec!["x".to_string()]).expect("cert");
        std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).expect("write");
        std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem())
            .expect("write");
        let loaded =
            from_files(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).expect("files");
        assert!(!loaded.self_signed);
        assert_eq!(loaded.cert_pem.trim(), cert.cert.pem().trim());
        std::fs::write(dir.path().join("empty.key"), "nothing").expect("write");
        let err = from_files(&dir.path().join("tls.crt"), &dir.path().join("empty.key"))
            .expect_err("no key");
        assert!(err.to_string().contains("empty.key"), "{err}");
        let err = from_files(&dir.path().join("none.crt"), &dir.path().join("tls.key"))
            .expect_err("no cert");
        assert!(err.to_string().contains("none.crt"), "{err}");
    }
}
