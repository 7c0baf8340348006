//! The trust bundle read by the real tools: `keytool -list` (the JDK's own PKCS#12 reader, which
//! is what `JAVA_TOOL_OPTIONS` hands the store to) and `openssl pkcs12` / `openssl crl2pkcs7`
//! (OpenSSL's readers, which also check the MAC). A missing tool is a failure, not a skip: CI
//! installs both (openjdk-17-jdk-headless, openssl).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use cellgate_tls::trust::{parse_certificates, TRUSTSTORE_PASSWORD};
use cellgate_tls::TrustBundle;

fn ca(dir: &Path, name: &str) -> String {
    let d = dir.join(name.replace(' ', "-"));
    cellgate_tls::ca::init(&d, name, false).expect("ca init");
    std::fs::read_to_string(d.join("ca.crt")).expect("read")
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed for this test: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A bundle of two cell CAs (a rotation) and a set of roots like the system's: the real Debian
/// bundle when present (about 150 roots), plus a test root.
fn bundle(dir: &Path) -> TrustBundle {
    let cell = format!("{}{}", ca(dir, "cell ca old"), ca(dir, "cell ca new"));
    let mut roots =
        std::fs::read_to_string(cellgate_tls::trust::DEFAULT_SYSTEM_ROOTS).unwrap_or_default();
    roots.push_str(&ca(dir, "test system root"));
    TrustBundle::new(&cell, Some(&roots)).expect("bundle")
}

#[test]
fn keytool_lists_every_certificate_as_a_trusted_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = bundle(dir.path());
    let store = dir.path().join("truststore.p12");
    std::fs::write(&store, b.pkcs12()).expect("write");
    let store = store.display().to_string();
    let out = run(
        "keytool",
        &[
            "-list",
            "-keystore",
            &store,
            "-storetype",
            "PKCS12",
            "-storepass",
            TRUSTSTORE_PASSWORD,
        ],
    );
    let total = b.cell_cas().len() + b.system_roots().len();
    assert!(
        out.contains(&format!("Your keystore contains {total} entries")),
        "{out}"
    );
    // One line per entry: `alias, date, trustedCertEntry,` then its fingerprint on the next.
    let lines: Vec<&str> = out.lines().collect();
    let mut listed = BTreeSet::new();
    for (i, l) in lines.iter().enumerate() {
        if l.contains(", trustedCertEntry,") {
            let alias = l.split(',').next().unwrap_or_default().to_string();
            let fp = lines
                .get(i + 1)
                .and_then(|n| n.strip_prefix("Certificate fingerprint (SHA-256): "))
                .unwrap_or_else(|| panic!("no fingerprint after {l}"))
                .trim()
                .to_string();
            listed.insert((alias, fp));
        }
    }
    assert_eq!(listed.len(), total, "{out}");
    assert!(!out.contains("PrivateKeyEntry"), "{out}");
    let want: BTreeSet<(String, String)> = b
        .cell_cas()
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("cellgate-ca-{}", i + 1), sha256_hex(c.der())))
        .chain(
            b.system_roots()
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("system-{}", i + 1), sha256_hex(c.der()))),
        )
        .collect();
    assert_eq!(listed, want);

    // A wrong password fails the MAC: the JDK really checked it.
    let out = Command::new("keytool")
        .args([
            "-list",
            "-keystore",
            &store,
            "-storetype",
            "PKCS12",
            "-storepass",
            "wrong-password",
        ])
        .output()
        .expect("keytool");
    assert!(!out.status.success(), "keytool accepted a wrong password");
}

#[test]
fn openssl_verifies_the_mac_and_reads_the_same_certificates_as_the_pem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = bundle(dir.path());
    let store = dir.path().join("truststore.p12");
    std::fs::write(&store, b.pkcs12()).expect("write");
    let store = store.display().to_string();
    let info = run(
        "openssl",
        &[
            "pkcs12",
            "-info",
            "-noout",
            "-in",
            &store,
            "-passin",
            &format!("pass:{TRUSTSTORE_PASSWORD}"),
        ],
    );
    assert!(info.contains("MAC: sha256"), "{info}");
    assert!(info.contains("Iteration 10000"), "{info}");
    assert!(
        info.contains("PKCS7 Data"),
        "unencrypted certificate bags: {info}"
    );
    let certs = run(
        "openssl",
        &[
            "pkcs12",
            "-nokeys",
            "-in",
            &store,
            "-passin",
            &format!("pass:{TRUSTSTORE_PASSWORD}"),
        ],
    );
    let from_p12: BTreeSet<Vec<u8>> = parse_certificates(&certs)
        .expect("certificates")
        .iter()
        .map(|c| c.der().to_vec())
        .collect();
    let from_pem: BTreeSet<Vec<u8>> = parse_certificates(b.pem())
        .expect("pem")
        .iter()
        .map(|c| c.der().to_vec())
        .collect();
    assert_eq!(from_p12, from_pem);
    assert_eq!(from_pem.len(), b.cell_cas().len() + b.system_roots().len());
    let wrong = Command::new("openssl")
        .args([
            "pkcs12",
            "-info",
            "-noout",
            "-in",
            &store,
            "-passin",
            "pass:wrong",
        ])
        .output()
        .expect("openssl");
    assert!(!wrong.status.success(), "openssl accepted a wrong password");

    // The PEM bundle: OpenSSL reads every block of it.
    let pem = dir.path().join("bundle.pem");
    std::fs::write(&pem, b.pem()).expect("write");
    let p7 = run(
        "openssl",
        &[
            "crl2pkcs7",
            "-nocrl",
            "-certfile",
            &pem.display().to_string(),
        ],
    );
    let p7_file = dir.path().join("bundle.p7");
    std::fs::write(&p7_file, p7).expect("write");
    let printed = run(
        "openssl",
        &[
            "pkcs7",
            "-print_certs",
            "-noout",
            "-in",
            &p7_file.display().to_string(),
        ],
    );
    assert_eq!(
        printed.matches("subject=").count(),
        from_pem.len(),
        "{printed}"
    );
}
