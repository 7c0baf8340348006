//! A PKCS#12 trust store (RFC 7292) written in Rust, for Java clients: trusted certificate
//! entries only, no keys.
//!
//! Each certificate is a `certBag` carrying two attributes: `friendlyName` (the alias `keytool
//! -list` shows) and Oracle's trusted-key-usage attribute (`2.16.840.1.113894.746875.1.1` =
//! `anyExtendedKeyUsage`), which is what makes the JDK load a key-less certificate as a
//! `trustedCertEntry` (without it the JDK ignores the bag). The bags are not encrypted: a trust
//! store holds public certificates only. The file has an integrity MAC (HMAC-SHA-256, the
//! PKCS#12 key derivation with SHA-256, [`MAC_ITERATIONS`] rounds), which Java 8u301+/11.0.12+/17+
//! and OpenSSL 1.1+ verify with the password.
//!
//! The output is a function of its inputs only: the MAC salt is taken from a hash of the content
//! (not from a random source), so the same certificates always give the same bytes, and the
//! ConfigMap that carries the store does not change on every reconcile.
//!
//! The DER writer below covers just what this structure needs (definite lengths, SEQUENCE,
//! SET OF sorted as DER requires, OID, OCTET STRING, small INTEGER, BMPString).

use ring::{digest, hmac};

/// Rounds of the PKCS#12 key derivation for the MAC: the JDK's `keytool` default.
pub const MAC_ITERATIONS: u32 = 10_000;
/// Length of the MAC salt (bytes).
const SALT_LEN: usize = 16;
/// SHA-256's output (u) and block (v) sizes, for the PKCS#12 key derivation.
const SHA256_OUT: usize = 32;
const SHA256_BLOCK: usize = 64;
/// The PKCS#12 key derivation's ID byte for MAC keys (RFC 7292 B.3).
const KDF_ID_MAC: u8 = 3;

const OID_DATA: &[u64] = &[1, 2, 840, 113_549, 1, 7, 1];
const OID_CERT_BAG: &[u64] = &[1, 2, 840, 113_549, 1, 12, 10, 1, 3];
const OID_X509_CERTIFICATE: &[u64] = &[1, 2, 840, 113_549, 1, 9, 22, 1];
const OID_FRIENDLY_NAME: &[u64] = &[1, 2, 840, 113_549, 1, 9, 20];
/// Oracle's `ORACLE_TrustedKeyUsage`, as the JDK writes and requires for trusted entries.
const OID_ORACLE_TRUSTED_KEY_USAGE: &[u64] = &[2, 16, 840, 1, 113_894, 746_875, 1, 1];
const OID_ANY_EXTENDED_KEY_USAGE: &[u64] = &[2, 5, 29, 37, 0];
const OID_SHA256: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 1];

/// A PKCS#12 file holding `certs` (alias, DER) as trusted certificate entries, with a MAC under
/// `password`. Aliases should be unique (the JDK keeps one entry per lower-cased alias).
pub fn truststore<'a>(
    certs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    password: &str,
) -> Vec<u8> {
    let bags: Vec<Vec<u8>> = certs
        .into_iter()
        .map(|(alias, der)| cert_bag(alias, der))
        .collect();
    let safe_contents = seq(&bags.concat());
    let auth_safe = seq(&seq(
        &[oid(OID_DATA), explicit0(&octets(&safe_contents))].concat()
    ));
    // Deterministic salt: the same content gives the same file.
    let hash = digest::digest(&digest::SHA256, &auth_safe);
    let salt = hash.as_ref().get(..SALT_LEN).unwrap_or_default();
    let key = kdf_sha256(
        &bmp_password(password),
        salt,
        KDF_ID_MAC,
        MAC_ITERATIONS,
        SHA256_OUT,
    );
    let mac = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &auth_safe);
    let mac_data = seq(&[
        seq(&[
            seq(&[oid(OID_SHA256), vec![0x05, 0x00]].concat()),
            octets(mac.as_ref()),
        ]
        .concat()),
        octets(salt),
        integer(MAC_ITERATIONS),
    ]
    .concat());
    seq(&[
        integer(3),
        seq(&[oid(OID_DATA), explicit0(&octets(&auth_safe))].concat()),
        mac_data,
    ]
    .concat())
}

fn cert_bag(alias: &str, der: &[u8]) -> Vec<u8> {
    let cert = seq(&[oid(OID_X509_CERTIFICATE), explicit0(&octets(der))].concat());
    let friendly_name = seq(&[oid(OID_FRIENDLY_NAME), set_of(vec![bmp_string(alias)])].concat());
    let trusted = seq(&[
        oid(OID_ORACLE_TRUSTED_KEY_USAGE),
        set_of(vec![oid(OID_ANY_EXTENDED_KEY_USAGE)]),
    ]
    .concat());
    seq(&[
        oid(OID_CERT_BAG),
        explicit0(&cert),
        set_of(vec![friendly_name, trusted]),
    ]
    .concat())
}

/// The password as PKCS#12 wants it: UTF-16 big-endian with a two-byte NUL terminator.
fn bmp_password(password: &str) -> Vec<u8> {
    let mut out: Vec<u8> = password.encode_utf16().flat_map(u16::to_be_bytes).collect();
    out.extend_from_slice(&[0, 0]);
    out
}

/// The PKCS#12 key derivation (RFC 7292 appendix B.2) with SHA-256: `n` bytes of key material.
fn kdf_sha256(password: &[u8], salt: &[u8], id: u8, iterations: u32, n: usize) -> Vec<u8> {
    let v = SHA256_BLOCK;
    // S and P: salt and password repeated to a whole number of v-byte blocks.
    let fill = |x: &[u8]| -> Vec<u8> {
        x.iter()
            .copied()
            .cycle()
            .take(v * x.len().div_ceil(v))
            .collect()
    };
    let mut i_buf = [fill(salt), fill(password)].concat();
    let d = vec![id; v];
    let mut out = Vec::with_capacity(n + SHA256_OUT);
    loop {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&d);
        ctx.update(&i_buf);
        let mut a = ctx.finish().as_ref().to_vec();
        for _ in 1..iterations {
            a = digest::digest(&digest::SHA256, &a).as_ref().to_vec();
        }
        out.extend_from_slice(&a);
        if out.len() >= n {
            out.truncate(n);
            return out;
        }
        // I_j = (I_j + B + 1) mod 2^(8v), B being A repeated to v bytes.
        let b: Vec<u8> = a.iter().copied().cycle().take(v).collect();
        for block in i_buf.chunks_mut(v) {
            let mut carry = 1u16;
            for (x, y) in block.iter_mut().rev().zip(b.iter().rev()) {
                let sum = u16::from(*x) + u16::from(*y) + carry;
                *x = sum.to_be_bytes()[1];
                carry = sum >> 8;
            }
        }
    }
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    if content.len() < 0x80 {
        out.extend_from_slice(&[u8::try_from(content.len()).unwrap_or(0)]);
    } else {
        let len = content.len().to_be_bytes();
        let skip = len.iter().take_while(|b| **b == 0).count();
        let n = len.len() - skip;
        out.push(0x80 | u8::try_from(n).unwrap_or(0));
        out.extend_from_slice(len.get(skip..).unwrap_or_default());
    }
    out.extend_from_slice(content);
    out
}

fn seq(content: &[u8]) -> Vec<u8> {
    tlv(0x30, content)
}

/// A SET OF, its elements sorted by their encodings as DER requires.
fn set_of(mut elements: Vec<Vec<u8>>) -> Vec<u8> {
    elements.sort();
    tlv(0x31, &elements.concat())
}

fn explicit0(content: &[u8]) -> Vec<u8> {
    tlv(0xA0, content)
}

fn octets(content: &[u8]) -> Vec<u8> {
    tlv(0x04, content)
}

fn integer(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes
        .iter()
        .take_while(|b| **b == 0)
        .count()
        .min(bytes.len() - 1);
    let mut content = bytes.get(skip..).unwrap_or_default().to_vec();
    // A positive INTEGER whose top bit is set needs a leading zero byte.
    if content.first().is_some_and(|b| b & 0x80 != 0) {
        content.insert(0, 0);
    }
    tlv(0x02, &content)
}

fn oid(arcs: &[u64]) -> Vec<u8> {
    let mut content = Vec::new();
    let (first, second) = (
        arcs.first().copied().unwrap_or(0),
        arcs.get(1).copied().unwrap_or(0),
    );
    for arc in std::iter::once(first * 40 + second).chain(arcs.iter().skip(2).copied()) {
        let mut groups = vec![u8::try_from(arc & 0x7f).unwrap_or(0)];
        let mut rest = arc >> 7;
        while rest > 0 {
            groups.push(0x80 | u8::try_from(rest & 0x7f).unwrap_or(0));
            rest >>= 7;
        }
        content.extend(groups.iter().rev());
    }
    tlv(0x06, &content)
}

fn bmp_string(s: &str) -> Vec<u8> {
    let content: Vec<u8> = s.encode_utf16().flat_map(u16::to_be_bytes).collect();
    tlv(0x1E, &content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_primitives_encode_as_x690_says() {
        assert_eq!(oid(OID_SHA256), hex("0609608648016503040201"));
        assert_eq!(
            oid(OID_ORACLE_TRUSTED_KEY_USAGE),
            hex("060c6086480186f966adca7b0101")
        );
        assert_eq!(oid(OID_DATA), hex("06092a864886f70d010701"));
        assert_eq!(integer(3), hex("020103"));
        assert_eq!(integer(10_000), hex("02022710"));
        assert_eq!(integer(128), hex("02020080"));
        assert_eq!(integer(0), hex("020100"));
        assert_eq!(bmp_string("ab"), hex("1e0400610062"));
        let long = vec![0u8; 300];
        assert_eq!(&octets(&long)[..4], &hex("0482012c")[..]);
        // SET OF sorts its elements.
        assert_eq!(
            set_of(vec![hex("0201ff"), hex("020101")]),
            hex("31060201010201ff")
        );
    }

    #[test]
    fn the_kdf_stretches_past_one_block_and_depends_on_every_input() {
        let p = bmp_password("changeit");
        assert_eq!(p.len(), 18);
        let k = kdf_sha256(&p, b"salt", KDF_ID_MAC, 2, 80);
        // OpenSSL's implementation as the reference (it takes the password already BMP-encoded):
        // `openssl kdf -keylen 80 -kdfopt digest:SHA256 -kdfopt
        // hexpass:006300680061006e00670065006900740000 -kdfopt hexsalt:73616c74 -kdfopt iter:2
        // -kdfopt id:3 PKCS12KDF`.
        assert_eq!(
            k,
            hex("7aa47cac4a8b5888450c6606bdfbe39350a60e76f13c484a6bb8700c0fe1a7df77575ccb206419c4177a2c44838ee0fa448b52cf65b88f6b2bd8cd26b9f68ebb99bc0109b923833fbfc5b4d6a206f6d4")
        );
        assert_eq!(&k[..32], &kdf_sha256(&p, b"salt", KDF_ID_MAC, 2, 32)[..]);
        assert_ne!(k, kdf_sha256(&p, b"salt", 1, 2, 80));
        assert_ne!(k, kdf_sha256(&p, b"salu", KDF_ID_MAC, 2, 80));
        assert_ne!(k, kdf_sha256(&p, b"salt", KDF_ID_MAC, 3, 80));
        assert_ne!(
            k,
            kdf_sha256(&bmp_password("changeiu"), b"salt", KDF_ID_MAC, 2, 80)
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }
}
