//! The interception CA: creating it on disk ([`init`]), loading it ([`Ca::load`]) or making a
//! throwaway one in memory ([`Ca::generate`], for tests and local mode).
//!
//! The CA is ECDSA P-256, self-signed, `CA:TRUE, pathlen:0` (it signs leaves, never other CAs),
//! key usage keyCertSign + cRLSign, valid for about a year, with a random serial. The key is
//! written as PEM PKCS#8 with mode 0600 and is never logged: [`Ca`]'s `Debug` leaves it out.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;

/// File name of the CA certificate (PEM) inside a CA directory.
pub const CERT_FILE: &str = "ca.crt";
/// File name of the CA private key (PEM PKCS#8, mode 0600) inside a CA directory.
pub const KEY_FILE: &str = "ca.key";

/// How long a CA made by [`init`] or [`Ca::generate`] (or a rotation's successor,
/// [`crate::rotation::successor`]) is valid. A year: rotating it (`kubectl cellgate ca rotate`,
/// no restart of anything) is a yearly chore, and a leaked key does not stay useful forever.
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How far back `notBefore` is set on everything this crate signs. Agents' clocks may lag the
/// node's; an hour of slack keeps a freshly minted certificate from being "not yet valid" to them.
pub const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// Length of the random serial numbers this crate writes: 16 bytes (128 bits, top bit cleared so
/// the DER INTEGER stays positive), above the 64 bits of entropy CA/B Forum rules ask for.
const SERIAL_LEN: usize = 16;

/// Name used for the probe leaf [`Ca::load`] signs to check the CA can actually issue.
const PROBE_NAME: &str = "probe.cellgate.invalid";

/// Errors creating or loading the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file already exists and `force` was not given.
    #[error("{path} already exists; pass force to overwrite it")]
    Exists {
        /// The file that exists.
        path: PathBuf,
    },
    /// Reading or writing a CA file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("reading", "writing", "creating directory", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The certificate file holds no parsable PEM certificate.
    #[error("{path}: no PEM certificate found: {reason}")]
    BadCert {
        /// The certificate file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The key file holds no private key rcgen can sign with.
    #[error("{path}: not a usable private key (expected PEM PKCS#8): {source}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What rcgen said.
        #[source]
        source: rcgen::Error,
    },
    /// The certificate's public key is not the key file's.
    #[error("{key} does not match {cert}: the certificate's public key is a different key")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The certificate parsed but cannot be used to issue leaves (not a CA, expired, ...).
    #[error("{path} cannot issue leaf certificates: {reason}")]
    Unusable {
        /// The certificate file (or `<memory>`).
        path: PathBuf,
        /// Why, as the verifier put it.
        reason: String,
    },
    /// The common name given to [`init`] or [`Ca::generate`] is empty or not valid in a certificate.
    #[error("invalid CA common name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// Generating or signing with rcgen failed.
    #[error("generating the CA: {0}")]
    Generate(#[source] rcgen::Error),
}

/// Paths written by [`init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// The CA certificate, PEM.
    pub cert: PathBuf,
    /// The CA private key, PEM PKCS#8, mode 0600.
    pub key: PathBuf,
}

/// Creates a new CA in `out_dir` (created if missing) as [`CERT_FILE`] and [`KEY_FILE`].
///
/// # Errors
/// [`CaError::Exists`] if either file exists and `force` is false (nothing is written then);
/// [`CaError::Io`] if a file cannot be written; [`CaError::InvalidName`] for an empty name.
///
/// # Caveats
/// With `force`, the old files are removed before the new ones are created, so the key file is
/// always created fresh with mode 0600 (truncating an existing file would keep its old mode).
pub fn init(out_dir: &Path, common_name: &str, force: bool) -> Result<CaFiles, CaError> {
    let files = CaFiles {
        cert: out_dir.join(CERT_FILE),
        key: out_dir.join(KEY_FILE),
    };
    if !force {
        for path in [&files.cert, &files.key] {
            if path.exists() {
                return Err(CaError::Exists { path: path.clone() });
            }
        }
    }
    let ca = Ca::generate(common_name)?;
    fs::create_dir_all(out_dir).map_err(|source| CaError::Io {
        op: "creating directory",
        path: out_dir.to_owned(),
        source,
    })?;
    // Key first: a crash between the two leaves a key without a certificate, which `load` reports,
    // rather than a certificate nobody holds the key for.
    write_new(&files.key, ca.key_pem().as_bytes(), 0o600, force)?;
    write_new(&files.cert, ca.cert_pem().as_bytes(), 0o644, force)?;
    Ok(files)
}

fn write_new(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<(), CaError> {
    let io_err = |op| {
        let path = path.to_owned();
        move |source| CaError::Io { op, path, source }
    };
    if force {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing")(e)),
        }
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                CaError::Exists {
                    path: path.to_owned(),
                }
            } else {
                io_err("creating")(e)
            }
        })?;
    file.write_all(contents).map_err(io_err("writing"))?;
    file.sync_all().map_err(io_err("syncing"))?;
    Ok(())
}

/// A CA that can sign leaves: its certificate and its key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: OffsetDateTime,
    fingerprint: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint)
            .field("not_after", &self.not_after)
            .field("key", &"[elided]")
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Generates a fresh CA in memory (nothing touches the disk).
    ///
    /// # Errors
    /// [`CaError::InvalidName`] for an empty common name; [`CaError::Generate`] if rcgen fails.
    pub fn generate(common_name: &str) -> Result<Ca, CaError> {
        Self::generate_with_validity(common_name, CA_VALIDITY)
    }

    fn generate_with_validity(common_name: &str, validity: Duration) -> Result<Ca, CaError> {
        Self::generate_profile(&Profile {
            common_name,
            organization: "Cellgate",
            algorithm: &PKCS_ECDSA_P256_SHA256,
            path_len: 0,
            validity,
        })
    }

    /// Generates a self-signed CA as `profile` says: Cellgate's constraints (`CA:TRUE` with the
    /// path length given, keyCertSign + cRLSign), a random serial, backdated by [`BACKDATE`].
    pub(crate) fn generate_profile(profile: &Profile<'_>) -> Result<Ca, CaError> {
        let common_name = profile.common_name;
        if common_name.trim().is_empty() {
            return Err(CaError::InvalidName {
                name: common_name.to_owned(),
                reason: "it is empty".to_owned(),
            });
        }
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, profile.organization);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(profile.path_len));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - BACKDATE;
        params.not_after = now + profile.validity;
        params.serial_number = Some(random_serial().map_err(CaError::Generate)?);
        let key = KeyPair::generate_for(profile.algorithm).map_err(CaError::Generate)?;
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        let not_after = params.not_after;
        Ok(Ca {
            fingerprint: crate::rotation::fingerprint(cert.der()),
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            not_after,
        })
    }

    /// Loads `dir/ca.crt` and `dir/ca.key` and checks that they belong together and can issue.
    ///
    /// The key may be any type rcgen signs with under ring (ECDSA P-256/P-384, Ed25519, RSA); CAs
    /// made by [`init`] are P-256.
    ///
    /// # Errors
    /// [`CaError::Io`] for unreadable files, [`CaError::BadCert`] / [`CaError::BadKey`] for bad
    /// contents, [`CaError::KeyMismatch`] when the key is not the certificate's, and
    /// [`CaError::Unusable`] when a leaf signed with it does not verify against it (not a CA,
    /// expired, ...).
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let cert_pem = read_to_string(&cert_path)?;
        let key_pem = read_to_string(&key_path)?;
        Self::from_pem(cert_pem, &key_pem, cert_path, key_path)
    }

    /// The checks of [`Ca::load`] on a certificate and key already read; the paths only name them
    /// in errors.
    ///
    /// # Errors
    /// As [`Ca::load`], but never [`CaError::Io`].
    pub fn from_pem(
        cert_pem: String,
        key_pem: &str,
        cert_path: PathBuf,
        key_path: PathBuf,
    ) -> Result<Ca, CaError> {
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CaError::BadCert {
                path: cert_path.clone(),
                reason: e.to_string(),
            })?;
        let key = KeyPair::from_pem(key_pem).map_err(|source| CaError::BadKey {
            path: key_path.clone(),
            source,
        })?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| CaError::BadCert {
                path: cert_path.clone(),
                reason: e.to_string(),
            })?;
        if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(CaError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        // webpki does not check a trust anchor's own extensions, so the probe below would pass a
        // plain self-signed leaf: insist on CA:TRUE (and keyCertSign, when key usage is present).
        if !x509.is_ca() {
            return Err(CaError::Unusable {
                path: cert_path,
                reason: "basic constraints do not say CA:TRUE".to_owned(),
            });
        }
        if let Ok(Some(usage)) = x509.key_usage() {
            if !usage.value.key_cert_sign() {
                return Err(CaError::Unusable {
                    path: cert_path,
                    reason: "key usage lacks keyCertSign".to_owned(),
                });
            }
        }
        let not_after = x509.validity().not_after.to_datetime();
        drop(x509);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| CaError::BadCert {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        let ca = Ca {
            issuer,
            fingerprint: crate::rotation::fingerprint(&cert_der),
            cert_der: cert_der.into_owned(),
            cert_pem,
            not_after,
        };
        ca.check_can_issue(&cert_path)?;
        Ok(ca)
    }

    /// Signs a probe leaf and verifies it with webpki against this CA alone: proves the issuer
    /// name we re-encode matches the certificate byte for byte, and that the certificate is a
    /// currently valid CA, before the node serves a single agent with it.
    fn check_can_issue(&self, path: &Path) -> Result<(), CaError> {
        let unusable = |reason: String| CaError::Unusable {
            path: path.to_owned(),
            reason,
        };
        let leaf = crate::mint::sign_leaf(self, PROBE_NAME, Duration::from_secs(300))
            .map_err(|e| unusable(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| unusable(e.to_string()))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::crypto_provider())
                .build()
                .map_err(|e| unusable(e.to_string()))?;
        let name = ServerName::try_from(PROBE_NAME).map_err(|e| unusable(e.to_string()))?;
        let (end_entity, intermediates) = match leaf.chain.split_first() {
            Some((ee, rest)) => (ee, rest),
            None => return Err(unusable("empty chain".to_owned())),
        };
        verifier
            .verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now())
            .map_err(|e| unusable(e.to_string()))?;
        Ok(())
    }

    /// The CA certificate, PEM: what agents must trust.
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER: the last element of every chain the minter serves.
    #[must_use]
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's expiry. Leaves are never minted to outlive it.
    #[must_use]
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// SHA-256 of the certificate (DER), lowercase hex: how reports and status name this CA.
    #[must_use]
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The private key, PEM PKCS#8: for [`init`], and for the operator writing a new CA into the
    /// nodes' Secret. Never log it.
    #[must_use]
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// What [`Ca::generate_profile`] makes.
pub(crate) struct Profile<'a> {
    pub(crate) common_name: &'a str,
    pub(crate) organization: &'a str,
    pub(crate) algorithm: &'static rcgen::SignatureAlgorithm,
    pub(crate) path_len: u8,
    pub(crate) validity: Duration,
}

fn read_to_string(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        op: "reading",
        path: path.to_owned(),
        source,
    })
}

/// A random positive serial number of [`SERIAL_LEN`] bytes from the system RNG.
pub(crate) fn random_serial() -> Result<SerialNumber, rcgen::Error> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; SERIAL_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    // Positive and exactly SERIAL_LEN bytes in DER: clear the sign bit, set the next one so the
    // encoder never strips a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_writes_key_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), "Cellgate test CA", false).unwrap();
        let mode = fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "key mode {mode:o}");
        let key_before = fs::read(&files.key).unwrap();
        assert!(String::from_utf8_lossy(&key_before).contains("BEGIN PRIVATE KEY"));

        let err = init(dir.path(), "again", false).unwrap_err();
        assert!(matches!(err, CaError::Exists { .. }), "{err}");
        assert_eq!(fs::read(&files.key).unwrap(), key_before, "untouched");

        // force replaces both, and a key file with a lax mode comes back 0600
        fs::set_permissions(&files.key, fs::Permissions::from_mode(0o644)).unwrap();
        init(dir.path(), "forced", true).unwrap();
        assert_ne!(fs::read(&files.key).unwrap(), key_before);
        let mode = fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn init_refuses_when_only_cert_exists() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CERT_FILE), "x").unwrap();
        let err = init(dir.path(), "x", false).unwrap_err();
        assert!(matches!(err, CaError::Exists { .. }), "{err}");
        assert!(!dir.path().join(KEY_FILE).exists());
    }

    #[test]
    fn load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "Cellgate round trip", false).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        assert_eq!(
            ca.cert_pem(),
            fs::read_to_string(dir.path().join(CERT_FILE)).unwrap()
        );
        let until = ca.not_after() - OffsetDateTime::now_utc();
        assert!(until > time::Duration::days(360) && until <= time::Duration::days(366));
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn load_rejects_mismatched_key() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init(a.path(), "a", false).unwrap();
        init(b.path(), "b", false).unwrap();
        fs::copy(b.path().join(KEY_FILE), a.path().join(KEY_FILE)).unwrap();
        let err = Ca::load(a.path()).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn load_rejects_missing_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let err = Ca::load(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::Io { .. }), "{err}");
        assert!(err.to_string().contains("ca.crt"), "{err}");
        fs::write(dir.path().join(CERT_FILE), "not pem").unwrap();
        fs::write(dir.path().join(KEY_FILE), "not pem").unwrap();
        let err = Ca::load(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::BadCert { .. }), "{err}");
    }

    #[test]
    fn load_rejects_a_leaf_posing_as_ca() {
        // A self-signed certificate without CA:TRUE cannot issue: the probe leaf fails to verify.
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["not-a-ca.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        fs::write(dir.path().join(CERT_FILE), cert.pem()).unwrap();
        fs::write(dir.path().join(KEY_FILE), key.serialize_pem()).unwrap();
        let err = Ca::load(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::Unusable { .. }), "{err}");
    }

    #[test]
    fn generate_rejects_empty_name() {
        assert!(matches!(
            Ca::generate(" ").unwrap_err(),
            CaError::InvalidName { .. }
        ));
    }
}
