//! TLS towards the real server: the `rustls::ClientConfig` the node connects with, and the
//! mapping from a certificate failure to a stable reason label for the 502 it answers with.
//!
//! Trust = the system roots (via rustls-native-certs) plus every extra CA file configured.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{CertificateError, ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Errors building the upstream client config.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// No system roots could be loaded and no extra CA was given: nothing could be verified.
    #[error("no trusted roots: the system store yielded none ({system_errors} load errors) and no extra ca files were given")]
    NoRoots {
        /// How many errors loading the system store reported.
        system_errors: usize,
    },
    /// An extra CA file could not be read.
    #[error("reading ca file {path}: {source}")]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An extra CA file holds no PEM certificate, or one that does not parse.
    #[error("ca file {path}: {reason}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("building the upstream tls config: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the config the node uses to connect upstream.
///
/// ALPN offers `h2` and `http/1.1` when `alpn_h2` is set, else `http/1.1` only. TLS 1.3 and 1.2,
/// ring provider, no client certificate.
///
/// # Errors
/// [`TlsError::ReadCa`] / [`TlsError::BadCa`] naming an unreadable extra CA file or one without
/// certificates; [`TlsError::NoRoots`] when there is nothing at all to trust.
///
/// # Caveats
/// System certificates that fail to load or parse are logged and skipped, not fatal: one bad
/// file in /etc/ssl/certs must not take the node down.
pub fn client_config(
    extra_ca_files: &[PathBuf],
    alpn_h2: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "could not load some system root certificates");
    }
    let (added, skipped) = roots.add_parsable_certificates(native.certs);
    if skipped > 0 {
        tracing::warn!(skipped, "skipped unparsable system root certificates");
    }
    tracing::debug!(system_roots = added, "loaded system root certificates");
    for path in extra_ca_files {
        for cert in read_ca_file(path)? {
            roots.add(cert).map_err(|e| TlsError::BadCa {
                path: path.clone(),
                reason: format!("certificate rejected as a trust anchor: {e}"),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots {
            system_errors: native.errors.len(),
        });
    }
    let mut config = ClientConfig::builder_with_provider(crate::crypto_provider())
        .with_protocol_versions(crate::PROTOCOL_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = if alpn_h2 {
        crate::ALPN_H2_AND_HTTP1
            .iter()
            .map(|p| p.to_vec())
            .collect()
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::ReadCa {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            reason: format!("bad pem: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadCa {
            path: path.to_owned(),
            reason: "no PEM certificates in the file".to_owned(),
        });
    }
    Ok(certs)
}

/// Maps a failed upstream connection to a stable label when the cause is the server's
/// certificate: `upstream_cert_expired`, `upstream_cert_not_yet_valid`,
/// `upstream_cert_name_mismatch`, `upstream_cert_unknown_issuer`, or `upstream_cert_invalid` for
/// any other certificate problem. `None` when no rustls certificate error is in the chain.
///
/// Walks `source()` and looks inside `io::Error`s too (tokio-rustls reports handshake failures as
/// an `io::Error` wrapping the `rustls::Error`, and `io::Error::source` skips over its payload).
#[must_use]
pub fn classify_error(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut next = Some(err);
    // A cycle in a source chain would be a bug elsewhere; don't spin on it.
    for _ in 0..32 {
        let current = next?;
        if let Some(rustls::Error::InvalidCertificate(cert_err)) =
            current.downcast_ref::<rustls::Error>()
        {
            return Some(cert_label(cert_err));
        }
        next = match current.downcast_ref::<io::Error>() {
            Some(io_err) => match io_err.get_ref() {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => current.source(),
            },
            None => current.source(),
        };
    }
    None
}

/// Every label [`classify_error`] gives.
pub const CERT_LABELS: &[&str] = &[
    "upstream_cert_expired",
    "upstream_cert_not_yet_valid",
    "upstream_cert_name_mismatch",
    "upstream_cert_unknown_issuer",
    "upstream_cert_invalid",
];

fn cert_label(err: &CertificateError) -> &'static str {
    match err {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "upstream_cert_expired"
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "upstream_cert_not_yet_valid"
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "upstream_cert_name_mismatch"
        }
        CertificateError::UnknownIssuer => "upstream_cert_unknown_issuer",
        _ => "upstream_cert_invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_ca_file_without_certs_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "nothing here\n").unwrap();
        let err = client_config(std::slice::from_ref(&path), true).unwrap_err();
        assert!(matches!(err, TlsError::BadCa { .. }), "{err}");
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = client_config(&[missing], true).unwrap_err();
        assert!(matches!(err, TlsError::ReadCa { .. }), "{err}");
    }

    #[test]
    fn alpn_follows_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, crate::Ca::generate("x").unwrap().cert_pem()).unwrap();
        let h2 = client_config(std::slice::from_ref(&path), true).unwrap();
        assert_eq!(
            h2.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let h1 = client_config(&[path], false).unwrap();
        assert_eq!(h1.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn classify_walks_io_and_source_chains() {
        let cert = |e| rustls::Error::InvalidCertificate(e);
        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            cert(CertificateError::UnknownIssuer),
        );
        assert_eq!(classify_error(&io), Some("upstream_cert_unknown_issuer"));
        let expired = cert(CertificateError::Expired);
        assert_eq!(classify_error(&expired), Some("upstream_cert_expired"));
        let name = cert(CertificateError::NotValidForName);
        assert_eq!(classify_error(&name), Some("upstream_cert_name_mismatch"));
        let other = cert(CertificateError::BadSignature);
        assert_eq!(classify_error(&other), Some("upstream_cert_invalid"));

        #[derive(Debug, thiserror::Error)]
        #[error("connect failed")]
        struct Outer(#[source] io::Error);
        let nested = Outer(io::Error::other(cert(CertificateError::NotValidYet)));
        assert_eq!(classify_error(&nested), Some("upstream_cert_not_yet_valid"));

        assert_eq!(classify_error(&rustls::Error::DecryptError), None);
        assert_eq!(classify_error(&io::Error::other("plain")), None);
        for label in [
            classify_error(&io),
            classify_error(&expired),
            classify_error(&name),
            classify_error(&other),
            classify_error(&nested),
        ] {
            assert!(CERT_LABELS.contains(&label.unwrap()));
        }
    }
}
