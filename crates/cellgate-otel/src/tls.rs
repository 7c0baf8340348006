//! Trust for `https` collector endpoints.

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// The CA certificates of `ca_file` (PEM), or the system roots when none is given.
///
/// # Errors
/// The file cannot be read or holds no certificate; no system root could be loaded.
pub fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no certificate", path.display()));
            }
            for c in certs {
                store
                    .add(c)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = store.add(c);
            }
            if store.is_empty() {
                return Err("no system root certificate could be loaded".into());
            }
        }
    }
    Ok(store)
}

/// The PEM text of `ca_file`, for tonic's TLS configuration.
///
/// # Errors
/// The file cannot be read.
pub fn pem(ca_file: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))
}
