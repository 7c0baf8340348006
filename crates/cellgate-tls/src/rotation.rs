//! What a CA rotation needs from this crate: fingerprints, a description of certificates for
//! people, the successor of a CA (made by the operator when a rotation starts), and the set of
//! CAs a node loads from its CA directory (the one it signs with, and the new one while it is
//! introduced).
//!
//! The node's CA directory (the Secret `cellgate-ca` mounted at `/etc/cellgate/ca`) holds
//! [`CERT_FILE`]/[`KEY_FILE`], the CA new leaves are signed with, and during a rotation's
//! `Introduced` phase also [`NEXT_CERT_FILE`]/[`NEXT_KEY_FILE`], the CA that will sign next. The
//! phases and who writes what are in `cellgate_api::ca_rotation`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::ca::{Ca, CaError, Profile, CA_VALIDITY, CERT_FILE, KEY_FILE};

/// File name of the new CA's certificate while it is introduced.
pub const NEXT_CERT_FILE: &str = "next.crt";
/// File name of the new CA's key while it is introduced.
pub const NEXT_KEY_FILE: &str = "next.key";

/// SHA-256 of a certificate's DER, lowercase hex.
#[must_use]
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Every certificate of a PEM text, in order.
///
/// # Errors
/// The parser's message when a block does not decode.
pub fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// The fingerprints of every certificate of a PEM text that decodes.
#[must_use]
pub fn fingerprints(pem: &str) -> Vec<String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| fingerprint(&c))
        .collect()
}

/// The fingerprint of the first certificate of a PEM text that decodes; empty when none does
/// (a fingerprint then matches nothing).
#[must_use]
pub fn first_fingerprint(pem: &str) -> String {
    fingerprints(pem).into_iter().next().unwrap_or_default()
}

/// One certificate, described for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// [`fingerprint`].
    pub fingerprint: String,
    /// The subject's common name (or the whole subject when it has none).
    pub subject: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// `t` as RFC 3339 in UTC to the second: `2030-01-01T00:00:00Z`.
#[must_use]
pub fn utc_text(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Describes every certificate of a PEM text.
///
/// # Errors
/// A message when a block does not decode or is not a certificate.
pub fn describe(pem: &str) -> Result<Vec<CertInfo>, String> {
    certificates(pem)?
        .iter()
        .map(|der| {
            let (_, x) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
            let subject = x
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map_or_else(|| x.subject().to_string(), str::to_string);
            Ok(CertInfo {
                fingerprint: fingerprint(der),
                subject,
                not_before: x.validity().not_before.to_datetime(),
                not_after: x.validity().not_after.to_datetime(),
            })
        })
        .collect()
}

/// The suffix [`successor`] appends to the common name, so that the old and the new CA never
/// share a subject in a bundle (some clients pick an issuer by subject alone).
const ROTATED: &str = " rotated ";

/// A new CA to replace the one in `current_pem` (its first certificate): the same key type
/// (ECDSA P-256 or P-384, or Ed25519; a key type rcgen cannot generate, such as RSA, becomes
/// P-256), the same organization and path length constraint, Cellgate's key usages, valid for
/// [`CA_VALIDITY`], and the common name with ` rotated <date and time of now_unix>` in place of
/// any such suffix it had.
///
/// # Errors
/// [`CaError::BadCert`] when `current_pem` holds no certificate; [`CaError::Generate`] if rcgen
/// fails.
pub fn successor(current_pem: &str, now_unix: i64) -> Result<Ca, CaError> {
    let bad = |reason: String| CaError::BadCert {
        path: PathBuf::from("<current CA>"),
        reason,
    };
    let der = certificates(current_pem)
        .map_err(bad)?
        .into_iter()
        .next()
        .ok_or_else(|| bad("no certificate".into()))?;
    let (_, x) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad(e.to_string()))?;
    let cn = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("Cellgate CA");
    let base = cn.split(ROTATED).next().unwrap_or(cn).trim();
    let base = if base.is_empty() { "Cellgate CA" } else { base };
    let organization = x
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .unwrap_or("Cellgate")
        .to_string();
    let path_len = match x.basic_constraints() {
        Ok(Some(bc)) => bc
            .value
            .path_len_constraint
            .and_then(|p| u8::try_from(p).ok())
            .unwrap_or(0),
        _ => 0,
    };
    let spki = &x.public_key().algorithm;
    let algorithm: &'static rcgen::SignatureAlgorithm = match spki.algorithm.to_id_string().as_str()
    {
        "1.3.101.112" => &rcgen::PKCS_ED25519,
        "1.2.840.10045.2.1" => match spki
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string())
            .as_deref()
        {
            Some("1.3.132.0.34") => &rcgen::PKCS_ECDSA_P384_SHA384,
            _ => &rcgen::PKCS_ECDSA_P256_SHA256,
        },
        _ => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    let now = OffsetDateTime::from_unix_timestamp(now_unix).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let name = format!("{base}{ROTATED}{}", utc_text(now));
    Ca::generate_profile(&Profile {
        common_name: &name,
        organization: &organization,
        algorithm,
        path_len,
        validity: CA_VALIDITY,
    })
}

/// The raw files of a CA directory, read as they are: what a node compares between polls, and
/// loads ([`CaSet::from_contents`]) when they changed.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct CaDirContents {
    /// [`CERT_FILE`].
    pub cert: String,
    /// [`KEY_FILE`]; `Debug` leaves it out.
    key: String,
    /// [`NEXT_CERT_FILE`], when present.
    pub next_cert: Option<String>,
    next_key: Option<String>,
}

impl std::fmt::Debug for CaDirContents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaDirContents")
            .field("cert_len", &self.cert.len())
            .field("next", &self.next_cert.is_some())
            .finish_non_exhaustive()
    }
}

impl CaDirContents {
    /// Reads `dir`: the two files of the signing CA, and the two of the next CA when either is
    /// there.
    ///
    /// # Errors
    /// [`CaError::Io`] naming the file that cannot be read.
    pub fn read(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| CaError::Io {
                op: "reading",
                path,
                source,
            })
        };
        let optional = |name: &str| match std::fs::read_to_string(dir.join(name)) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CaError::Io {
                op: "reading",
                path: dir.join(name),
                source,
            }),
        };
        Ok(Self {
            cert: read(CERT_FILE)?,
            key: read(KEY_FILE)?,
            next_cert: optional(NEXT_CERT_FILE)?,
            next_key: optional(NEXT_KEY_FILE)?,
        })
    }
}

/// The CAs a node holds: the one it signs with, and the next one while it is introduced.
#[derive(Debug, Clone)]
pub struct CaSet {
    /// Signs new leaves.
    pub signing: Arc<Ca>,
    /// Loaded and checked, not signing yet.
    pub next: Option<Arc<Ca>>,
}

impl CaSet {
    /// Loads `dir` ([`CaDirContents::read`], then [`CaSet::from_contents`]).
    ///
    /// # Errors
    /// As those two.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        Self::from_contents(&CaDirContents::read(dir)?, dir)
    }

    /// Checks and loads what was read from `dir` (each CA as [`Ca::load`] does: the key is the
    /// certificate's, the certificate can issue). A next certificate without its key, or the
    /// other way round, is refused.
    ///
    /// # Errors
    /// The first CA that does not load.
    pub fn from_contents(c: &CaDirContents, dir: &Path) -> Result<Self, CaError> {
        let signing = Ca::from_pem(
            c.cert.clone(),
            &c.key,
            dir.join(CERT_FILE),
            dir.join(KEY_FILE),
        )?;
        let next = match (&c.next_cert, &c.next_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(Arc::new(Ca::from_pem(
                cert.clone(),
                key,
                dir.join(NEXT_CERT_FILE),
                dir.join(NEXT_KEY_FILE),
            )?)),
            (Some(_), None) => {
                return Err(CaError::Io {
                    op: "reading",
                    path: dir.join(NEXT_KEY_FILE),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "next.crt is there but its key is not",
                    ),
                })
            }
            (None, Some(_)) => {
                return Err(CaError::Io {
                    op: "reading",
                    path: dir.join(NEXT_CERT_FILE),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "next.key is there but its certificate is not",
                    ),
                })
            }
        };
        Ok(Self {
            signing: Arc::new(signing),
            next,
        })
    }

    /// Fingerprints of every CA held, the signing one first.
    #[must_use]
    pub fn fingerprints(&self) -> Vec<String> {
        std::iter::once(&self.signing)
            .chain(self.next.as_ref())
            .map(|c| c.fingerprint().to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write");
    }

    #[test]
    fn fingerprints_match_openssls_form() {
        let ca = Ca::generate("fp").expect("ca");
        let fp = fingerprint(ca.cert_der());
        assert_eq!(fp.len(), 64);
        assert!(fp
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(ca.fingerprint(), fp);
        let two = format!(
            "{}{}",
            ca.cert_pem(),
            Ca::generate("b").expect("b").cert_pem()
        );
        let fps = fingerprints(&two);
        assert_eq!(fps.len(), 2);
        assert_eq!(fps[0], fp);
        let info = describe(&two).expect("describe");
        assert_eq!(info[0].subject, "fp");
        assert_eq!(info[1].subject, "b");
        assert_eq!(
            info[0].not_after.unix_timestamp(),
            ca.not_after().unix_timestamp()
        );
    }

    #[test]
    fn a_successor_keeps_the_key_type_and_the_constraints() {
        let now = 1_893_456_000;
        let old = Ca::generate("Cellgate CA").expect("ca");
        let new = successor(old.cert_pem(), now).expect("successor");
        assert_ne!(new.fingerprint(), old.fingerprint());
        let info = &describe(new.cert_pem()).expect("describe")[0];
        assert_eq!(info.subject, "Cellgate CA rotated 2030-01-01T00:00:00Z");
        let der = new.cert_der().clone();
        let (_, x) = x509_parser::parse_x509_certificate(&der).expect("x509");
        assert!(x.is_ca());
        let bc = x.basic_constraints().expect("bc").expect("present");
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = x.key_usage().expect("ku").expect("present");
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        assert_eq!(
            x.public_key().algorithm.algorithm.to_id_string(),
            "1.2.840.10045.2.1"
        );
        let left = new.not_after() - OffsetDateTime::now_utc();
        assert!(left > time::Duration::days(360), "{left}");
        // The suffix is replaced, not stacked; another key type is kept.
        let p384 = Ca::generate_profile(&Profile {
            common_name: "Corp CA rotated 2029-01-01T00:00:00Z",
            organization: "Corp",
            algorithm: &rcgen::PKCS_ECDSA_P384_SHA384,
            path_len: 0,
            validity: CA_VALIDITY,
        })
        .expect("p384");
        let next = successor(p384.cert_pem(), now).expect("successor");
        let der = next.cert_der().clone();
        let (_, x) = x509_parser::parse_x509_certificate(&der).expect("x509");
        assert_eq!(
            x.subject().to_string(),
            "CN=Corp CA rotated 2030-01-01T00:00:00Z, O=Corp"
        );
        let params = x.public_key().algorithm.parameters.as_ref().expect("curve");
        assert_eq!(params.as_oid().expect("oid").to_id_string(), "1.3.132.0.34");
        // The successor can issue: loading it back runs the probe.
        Ca::from_pem(
            next.cert_pem().to_string(),
            &next.key_pem(),
            "n.crt".into(),
            "n.key".into(),
        )
        .expect("loads");
        assert!(matches!(
            successor("nothing", now),
            Err(CaError::BadCert { .. })
        ));
    }

    #[test]
    fn a_directory_loads_with_and_without_the_next_ca() {
        let dir = tempfile::tempdir().expect("dir");
        let a = Ca::generate("a").expect("a");
        let b = Ca::generate("b").expect("b");
        write(dir.path(), CERT_FILE, a.cert_pem());
        write(dir.path(), KEY_FILE, &a.key_pem());
        let set = CaSet::load(dir.path()).expect("one");
        assert!(set.next.is_none());
        assert_eq!(set.fingerprints(), vec![a.fingerprint().to_string()]);

        write(dir.path(), NEXT_CERT_FILE, b.cert_pem());
        let err = CaSet::load(dir.path()).expect_err("key missing");
        assert!(err.to_string().contains("next.key"), "{err}");
        write(dir.path(), NEXT_KEY_FILE, &a.key_pem());
        let err = CaSet::load(dir.path()).expect_err("wrong key");
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
        write(dir.path(), NEXT_KEY_FILE, &b.key_pem());
        let set = CaSet::load(dir.path()).expect("two");
        assert_eq!(
            set.fingerprints(),
            vec![a.fingerprint().to_string(), b.fingerprint().to_string()]
        );
        let contents = CaDirContents::read(dir.path()).expect("read");
        assert!(!format!("{contents:?}").contains("PRIVATE"));
    }
}
