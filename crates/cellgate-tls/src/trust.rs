//! Trust bundles for the clients inside a cell: what an agent's HTTPS clients are pointed at so
//! that they accept both the certificates the node mints (signed by the cell CA) and real servers
//! reached through a `tls: passthrough` capability (signed by ordinary public roots).
//!
//! One [`TrustBundle`] is built from the cell CA certificate(s) and the system roots, and gives
//! every form clients read: a PEM bundle ([`TrustBundle::pem`], for `SSL_CERT_FILE` and the other
//! [`BUNDLE_ENV_VARS`]) and a PKCS#12 trust store for Java ([`TrustBundle::pkcs12`], with
//! [`java_tool_options`]). Both `cellgate run` (files in the run's state directory) and the
//! operator (keys of each cell's CA ConfigMap) build it here, so local mode and a cluster hand
//! agents the same trust.
//!
//! The cell-CA input may hold several certificates (during a CA rotation, the old and the new
//! one): all of them go into the bundle and the store. Output is deterministic: the same inputs
//! give byte-identical PEM and PKCS#12.

mod pkcs12;

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub use pkcs12::MAC_ITERATIONS;

/// Where Debian and Ubuntu (and the distroless images built on Debian) keep the system roots.
pub const DEFAULT_SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Files tried, in order, for the system roots when no path is given (local mode): Debian family,
/// then Fedora/RHEL family.
pub const SYSTEM_ROOTS_CANDIDATES: [&str; 2] =
    [DEFAULT_SYSTEM_ROOTS, "/etc/pki/tls/certs/ca-bundle.crt"];
/// Password of the PKCS#12 trust store. A trust store holds public certificates only; the password
/// protects nothing and is the JDK's customary one, so tools that assume it work.
pub const TRUSTSTORE_PASSWORD: &str = "changeit";
/// Type of the trust store, as `javax.net.ssl.trustStoreType` names it.
pub const TRUSTSTORE_TYPE: &str = "PKCS12";
/// The JVM variable that carries the trust-store options ([`java_tool_options`]).
pub const JAVA_TOOL_OPTIONS: &str = "JAVA_TOOL_OPTIONS";
/// Variables that common clients read for a PEM file of trusted CAs; each is pointed at the
/// bundle. Who reads which: `docs/kubernetes.md`, "The trust bundle".
pub const BUNDLE_ENV_VARS: [&str; 9] = [
    // OpenSSL's default verify paths (Python's ssl, Ruby, openssl s_client, curl's tool), Go's
    // crypto/x509, rustls-native-certs.
    "SSL_CERT_FILE",
    // Python requests (and pip's vendored copy).
    "REQUESTS_CA_BUNDLE",
    // The curl tool; requests falls back to it.
    "CURL_CA_BUNDLE",
    // Node.js: added to its built-in roots, read once at start-up.
    "NODE_EXTRA_CA_CERTS",
    // git over HTTPS (libcurl does not read SSL_CERT_FILE).
    "GIT_SSL_CAINFO",
    // AWS CLI, boto3/botocore and the AWS SDKs.
    "AWS_CA_BUNDLE",
    // pip's --cert.
    "PIP_CERT",
    // httplib2 (Google's Python API clients).
    "HTTPLIB2_CA_CERTS",
    // gRPC C-core (grpcio for Python, Ruby, C++).
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
];

/// The JVM options that make Java clients trust the store at `truststore_path`:
/// `-Djavax.net.ssl.trustStore=PATH -Djavax.net.ssl.trustStorePassword=changeit
/// -Djavax.net.ssl.trustStoreType=PKCS12`.
///
/// # Caveats
/// The store replaces the JDK's own `cacerts` for the default SSL context, which is why it holds
/// the system roots too. Options on the `java` command line come after `JAVA_TOOL_OPTIONS` and
/// win over it.
pub fn java_tool_options(truststore_path: &str) -> String {
    format!(
        "-Djavax.net.ssl.trustStore={truststore_path} -Djavax.net.ssl.trustStorePassword={TRUSTSTORE_PASSWORD} -Djavax.net.ssl.trustStoreType={TRUSTSTORE_TYPE}"
    )
}

/// Why PEM text did not give a list of certificates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificatesError {
    /// Not one `CERTIFICATE` block.
    #[error("no PEM CERTIFICATE block")]
    Empty,
    /// A block is not valid PEM (base64, markers).
    #[error("PEM CERTIFICATE block {index}: {reason}")]
    Pem {
        /// 1-based position among the certificate blocks.
        index: usize,
        /// The decoder's message.
        reason: String,
    },
    /// A block decodes but is not an X.509 certificate.
    #[error("PEM CERTIFICATE block {index} is not an X.509 certificate: {reason}")]
    X509 {
        /// 1-based position among the certificate blocks.
        index: usize,
        /// The parser's message.
        reason: String,
    },
}

/// One certificate of a bundle: its DER and its subject (for logs and aliases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    der: CertificateDer<'static>,
    subject: String,
}

impl Certificate {
    /// The DER encoding.
    pub fn der(&self) -> &[u8] {
        self.der.as_ref()
    }

    /// The subject as OpenSSL-style text (`CN=...`).
    pub fn subject(&self) -> &str {
        &self.subject
    }
}

/// Every `CERTIFICATE` block of `pem`, in order; text around the blocks and blocks of other types
/// (keys, `TRUSTED CERTIFICATE`) are skipped.
///
/// # Errors
/// [`CertificatesError`]: no certificate, a block that is not valid PEM, or one that is not an
/// X.509 certificate.
pub fn parse_certificates(pem: &str) -> Result<Vec<Certificate>, CertificatesError> {
    let mut out = Vec::new();
    for (i, item) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
        let index = i + 1;
        let der = item.map_err(|e| CertificatesError::Pem {
            index,
            reason: e.to_string(),
        })?;
        let subject = match x509_parser::parse_x509_certificate(der.as_ref()) {
            Ok(([], cert)) => cert.subject().to_string(),
            Ok(_) => {
                return Err(CertificatesError::X509 {
                    index,
                    reason: "bytes after the certificate".into(),
                })
            }
            Err(e) => {
                return Err(CertificatesError::X509 {
                    index,
                    reason: e.to_string(),
                })
            }
        };
        out.push(Certificate { der, subject });
    }
    if out.is_empty() {
        return Err(CertificatesError::Empty);
    }
    Ok(out)
}

/// Why a trust bundle could not be built; says which input is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// The cell CA text.
    #[error("the cell CA certificate: {0}")]
    CellCa(CertificatesError),
    /// The system roots text.
    #[error("the system roots: {0}")]
    SystemRoots(CertificatesError),
}

/// The certificates an agent's clients trust: the system roots plus the cell CA(s), as a PEM
/// bundle and a PKCS#12 trust store, both computed once at construction.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustBundle {
    cell_ca_pem: String,
    cell_cas: Vec<Certificate>,
    system_roots: Vec<Certificate>,
    pem: String,
    pkcs12: Vec<u8>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field(
                "cell_cas",
                &self
                    .cell_cas
                    .iter()
                    .map(Certificate::subject)
                    .collect::<Vec<_>>(),
            )
            .field("system_roots", &self.system_roots.len())
            .field("pem_bytes", &self.pem.len())
            .field("pkcs12_bytes", &self.pkcs12.len())
            .finish()
    }
}

impl TrustBundle {
    /// A bundle of `system_roots` (PEM; `None`: the cell CA only) and every certificate of
    /// `cell_ca_pem`. A system root that is also a cell CA, or appears twice, is kept once.
    ///
    /// # Errors
    /// [`TrustError`] naming the input that holds no certificate or a malformed one.
    pub fn new(cell_ca_pem: &str, system_roots: Option<&str>) -> Result<Self, TrustError> {
        let cell_cas = dedup(
            parse_certificates(cell_ca_pem).map_err(TrustError::CellCa)?,
            &[],
        );
        let system_roots = match system_roots {
            Some(pem) => dedup(
                parse_certificates(pem).map_err(TrustError::SystemRoots)?,
                &cell_cas,
            ),
            None => Vec::new(),
        };
        let mut pem = String::new();
        for c in system_roots.iter().chain(&cell_cas) {
            push_pem(&mut pem, c.der());
        }
        let aliases: Vec<String> = (1..=cell_cas.len())
            .map(|i| format!("cellgate-ca-{i}"))
            .chain((1..=system_roots.len()).map(|i| format!("system-{i}")))
            .collect();
        let pkcs12 = pkcs12::truststore(
            aliases
                .iter()
                .map(String::as_str)
                .zip(cell_cas.iter().chain(&system_roots).map(Certificate::der)),
            TRUSTSTORE_PASSWORD,
        );
        Ok(Self {
            cell_ca_pem: cell_ca_pem.to_string(),
            cell_cas,
            system_roots,
            pem,
            pkcs12,
        })
    }

    /// The cell-CA text as given (nodes and the CA ConfigMap's `ca.crt` use it unchanged).
    pub fn cell_ca_pem(&self) -> &str {
        &self.cell_ca_pem
    }

    /// The cell CA certificates, in input order.
    pub fn cell_cas(&self) -> &[Certificate] {
        &self.cell_cas
    }

    /// The system roots kept (duplicates and cell CAs removed), in input order.
    pub fn system_roots(&self) -> &[Certificate] {
        &self.system_roots
    }

    /// The PEM bundle: the system roots, then the cell CAs, one `CERTIFICATE` block each, nothing
    /// else.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The PKCS#12 trust store: every certificate of [`TrustBundle::pem`] as a trusted entry
    /// (aliases `cellgate-ca-N`, then `system-N`), password [`TRUSTSTORE_PASSWORD`].
    pub fn pkcs12(&self) -> &[u8] {
        &self.pkcs12
    }
}

fn dedup(certs: Vec<Certificate>, already: &[Certificate]) -> Vec<Certificate> {
    let mut out: Vec<Certificate> = Vec::with_capacity(certs.len());
    for c in certs {
        if !already.iter().chain(&out).any(|o| o.der == c.der) {
            out.push(c);
        }
    }
    out
}

fn push_pem(out: &mut String, der: &[u8]) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(name: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::ca::init(dir.path(), name, false).expect("ca init");
        std::fs::read_to_string(dir.path().join(crate::ca::CERT_FILE)).expect("read ca")
    }

    #[test]
    fn the_bundle_is_the_system_roots_then_every_cell_ca() {
        let (old, new, root1, root2) = (
            ca("cell old"),
            ca("cell new"),
            ca("Root One"),
            ca("Root Two"),
        );
        // A rotation: two cell CAs in one text; the system file has comments around its blocks.
        let cell = format!("{old}{new}");
        let system = format!("# Root One\n{root1}\n# Root Two\n{root2}");
        let b = TrustBundle::new(&cell, Some(&system)).expect("bundle");
        let subjects: Vec<_> = parse_certificates(b.pem())
            .expect("pem")
            .iter()
            .map(|c| c.subject().to_string())
            .collect();
        let cn: Vec<_> = subjects
            .iter()
            .map(|s| s.split(",").next().unwrap_or_default())
            .collect();
        assert_eq!(
            cn,
            ["CN=Root One", "CN=Root Two", "CN=cell old", "CN=cell new"]
        );
        assert_eq!(b.cell_ca_pem(), cell, "ca.crt keeps the text as given");
        assert!(!b.pem().contains('#'), "only certificate blocks");
        // Deterministic: the same input, the same bytes.
        let again = TrustBundle::new(&cell, Some(&system)).expect("bundle");
        assert_eq!(again.pem(), b.pem());
        assert_eq!(again.pkcs12(), b.pkcs12());
        // A different set of certificates, a different store.
        let fewer = TrustBundle::new(&new, Some(&system)).expect("bundle");
        assert_ne!(fewer.pkcs12(), b.pkcs12());
    }

    #[test]
    fn duplicates_are_kept_once_and_cell_ca_only_has_no_roots() {
        let (cell, root) = (ca("cell"), ca("Root"));
        let b = TrustBundle::new(&cell, Some(&format!("{root}{cell}{root}"))).expect("bundle");
        assert_eq!(b.system_roots().len(), 1);
        assert_eq!(b.cell_cas().len(), 1);
        assert_eq!(parse_certificates(b.pem()).expect("pem").len(), 2);
        let only = TrustBundle::new(&cell, None).expect("bundle");
        assert_eq!(parse_certificates(only.pem()).expect("pem").len(), 1);
        assert_eq!(
            parse_certificates(only.pem()).expect("pem")[0].der(),
            parse_certificates(&cell).expect("pem")[0].der()
        );
    }

    #[test]
    fn bad_inputs_are_refused_naming_which_and_why() {
        let cell = ca("cell");
        assert_eq!(
            TrustBundle::new("nothing here", None).expect_err("no cert"),
            TrustError::CellCa(CertificatesError::Empty)
        );
        let err = TrustBundle::new(&cell, Some("")).expect_err("empty roots");
        assert_eq!(
            err.to_string(),
            "the system roots: no PEM CERTIFICATE block"
        );
        let garbage = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let err = TrustBundle::new(&format!("{cell}{garbage}"), None).expect_err("garbage");
        assert!(
            matches!(
                err,
                TrustError::CellCa(CertificatesError::X509 { index: 2, .. })
            ),
            "{err}"
        );
        let err = TrustBundle::new(
            &cell,
            Some("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"),
        )
        .expect_err("bad base64");
        assert!(
            err.to_string()
                .starts_with("the system roots: PEM CERTIFICATE block 1"),
            "{err}"
        );
        // Keys and other blocks around the certificates are skipped, not refused.
        let with_key =
            format!("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{cell}");
        assert_eq!(
            TrustBundle::new(&with_key, None)
                .expect("bundle")
                .cell_cas()
                .len(),
            1
        );
    }

    #[test]
    fn java_options_name_the_store_its_type_and_password() {
        assert_eq!(
            java_tool_options("/etc/cellgate/ca/truststore.p12"),
            "-Djavax.net.ssl.trustStore=/etc/cellgate/ca/truststore.p12 -Djavax.net.ssl.trustStorePassword=changeit -Djavax.net.ssl.trustStoreType=PKCS12"
        );
    }

    /// Reads the store back with a minimal DER reader: every bag is a certBag whose certificate is
    /// one of the bundle's, aliased, marked trusted for any purpose; the MAC is SHA-256.
    #[test]
    fn the_pkcs12_holds_every_certificate_as_a_trusted_entry() {
        let (old, new, root) = (ca("cell old"), ca("cell new"), ca("Root"));
        let b = TrustBundle::new(&format!("{old}{new}"), Some(&root)).expect("bundle");
        let want: Vec<(String, Vec<u8>)> = vec![
            ("cellgate-ca-1".into(), b.cell_cas()[0].der().to_vec()),
            ("cellgate-ca-2".into(), b.cell_cas()[1].der().to_vec()),
            ("system-1".into(), b.system_roots()[0].der().to_vec()),
        ];
        assert_eq!(read_pkcs12(b.pkcs12()), want);
    }

    /// (tag, content) of each element in `b`.
    fn tlvs(mut b: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let (len, header) = if b[1] < 0x80 {
                (b[1] as usize, 2)
            } else {
                let n = (b[1] & 0x7f) as usize;
                (
                    b[2..2 + n].iter().fold(0usize, |a, x| a << 8 | *x as usize),
                    2 + n,
                )
            };
            out.push((b[0], &b[header..header + len]));
            b = &b[header + len..];
        }
        out
    }

    /// The content of the single element in `b`, which must have `tag`.
    fn one(b: &[u8], tag: u8) -> &[u8] {
        let v = tlvs(b);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].0, tag, "tag");
        v[0].1
    }

    fn oid_of((tag, content): (u8, &[u8])) -> String {
        assert_eq!(tag, 0x06, "an OID");
        x509_parser::der_parser::oid::Oid::new(std::borrow::Cow::Borrowed(content)).to_id_string()
    }

    fn read_pkcs12(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let pfx = tlvs(one(bytes, 0x30));
        assert_eq!(pfx.len(), 3, "version, authSafe, macData");
        assert_eq!(pfx[0], (0x02, &[3u8][..]), "version 3");
        let auth_safe_info = tlvs(pfx[1].1);
        assert_eq!(oid_of(auth_safe_info[0]), "1.2.840.113549.1.7.1");
        let auth_safe = one(one(auth_safe_info[1].1, 0x04), 0x30);
        let mac = tlvs(pfx[2].1);
        let digest_info = tlvs(mac[0].1);
        assert_eq!(oid_of(tlvs(digest_info[0].1)[0]), "2.16.840.1.101.3.4.2.1");
        assert_eq!(digest_info[1].1.len(), 32, "an HMAC-SHA-256");
        assert_eq!(mac[2].1, &MAC_ITERATIONS.to_be_bytes()[2..]);
        let content_infos = tlvs(auth_safe);
        assert_eq!(content_infos.len(), 1);
        let data = tlvs(content_infos[0].1);
        assert_eq!(oid_of(data[0]), "1.2.840.113549.1.7.1", "unencrypted data");
        let safe_contents = one(one(data[1].1, 0x04), 0x30);
        let mut out = Vec::new();
        for (tag, bag) in tlvs(safe_contents) {
            assert_eq!(tag, 0x30);
            let bag = tlvs(bag);
            assert_eq!(oid_of(bag[0]), "1.2.840.113549.1.12.10.1.3", "a certBag");
            let cert_bag = tlvs(one(bag[1].1, 0x30));
            assert_eq!(
                oid_of(cert_bag[0]),
                "1.2.840.113549.1.9.22.1",
                "an X.509 certificate"
            );
            let der = one(cert_bag[1].1, 0x04).to_vec();
            assert_eq!(bag[2].0, 0x31, "attributes");
            let (mut alias, mut trusted) = (None, None);
            for (_, attr) in tlvs(bag[2].1) {
                let attr = tlvs(attr);
                let value = one(
                    attr[1].1,
                    match oid_of(attr[0]).as_str() {
                        "1.2.840.113549.1.9.20" => 0x1E,
                        _ => 0x06,
                    },
                );
                match oid_of(attr[0]).as_str() {
                    "1.2.840.113549.1.9.20" => {
                        let units: Vec<u16> = value
                            .chunks(2)
                            .map(|c| u16::from_be_bytes([c[0], c[1]]))
                            .collect();
                        alias = Some(String::from_utf16(&units).expect("utf-16"));
                    }
                    "2.16.840.1.113894.746875.1.1" => trusted = Some(oid_of((0x06, value))),
                    other => panic!("unexpected attribute {other}"),
                }
            }
            assert_eq!(
                trusted.as_deref(),
                Some("2.5.29.37.0"),
                "trusted for any purpose"
            );
            out.push((alias.expect("friendlyName"), der));
        }
        out
    }
}
