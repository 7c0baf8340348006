//! Signed anchors of the chain head: evidence that outlives the log's own directory.
//!
//! Whoever can rewrite the log can rewrite its `<log>.head` too. An [`Anchor`] is the durable
//! head (`seq` and `hash` of the last synced record) signed with a node key the log's directory
//! does not hold the means to forge once the anchor has left the node. The [`Anchorer`] takes
//! one at a fixed interval (only when the head moved) and at shutdown after the final flush,
//! appends it to `<log>.anchors` ([`anchors_path`]) and publishes it
//! ([`Anchorer::subscribe`]) for exporters. [`verify_anchored`] checks a log against anchors
//! kept elsewhere and names the first record they contradict.
//!
//! An anchor is canonical JSON (as records are, see the crate docs), one per line:
//!
//! ```text
//! {"hash":"<64 hex>","key_id":"<16 hex>","node":"node-a","seq":1234,"sig":"<128 hex>","time":"2025-01-02T03:04:05.123456789Z"}
//! sig    = lowercase_hex(Ed25519-sign(key, canonical_json(anchor without its "sig" key)))
//! key_id = first 16 hex digits of SHA-256(raw 32-byte public key)
//! ```
//!
//! The key id is the one `cellgate keys init` prints and writes in `signing.pub`.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read as _, Write as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use tokio::sync::{watch, Mutex};

use crate::chain::{self, head_path, Head};
use crate::error::{Fault, VerifyError};
use crate::log::{cut_torn_tail, AuditLog};
use crate::record::format_rfc3339;
use crate::verify::{next_line, read_head, verify_inner, Line, VerifyReport};

/// Longest anchor line accepted, in bytes. An anchor is about 330 bytes with a short node name;
/// node names are Kubernetes node names (at most 253 bytes).
pub const MAX_ANCHOR_LINE: usize = 1024;

/// Most anchors [`verify_anchored`] holds in memory (about 100 bytes each): 243 days at the
/// default interval. Split a longer anchors file by time and verify the log against each part.
pub const MAX_ANCHORS: usize = 1 << 21;

/// The node's default interval between anchors.
pub const DEFAULT_ANCHOR_INTERVAL: Duration = Duration::from_secs(10);

/// Largest key file read: a PEM key is a few hundred bytes.
const MAX_KEY_FILE: u64 = 16 * 1024;

/// Length of a signature in hex (64 bytes).
const SIG_HEX_LEN: usize = 128;

/// Length of a key id in hex.
const KEY_ID_HEX_LEN: usize = 16;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Where the anchors of the log at `log` are kept: `<log>.anchors`.
#[must_use]
pub fn anchors_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".anchors");
    PathBuf::from(name)
}

/// The key id of a raw Ed25519 public key: the first 16 hex digits of its SHA-256.
#[must_use]
pub fn key_id(raw: &[u8]) -> String {
    hex::encode(Sha256::digest(raw))
        .chars()
        .take(KEY_ID_HEX_LEN)
        .collect()
}

/// Why an anchor could not be made, read or trusted, or where a log and its anchors disagree.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// The signing or verification key is unusable.
    #[error("anchor key {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("cannot read or write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A line of the anchors file is not an anchor.
    #[error("anchors line {line}: malformed: {detail}")]
    Malformed {
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        detail: String,
    },
    /// More anchors than [`MAX_ANCHORS`].
    #[error("more than {MAX_ANCHORS} anchors: split the anchors file by time and verify against each part")]
    TooMany,
    /// An anchor names another key than the one given.
    #[error("anchor at line {line} (record {seq}): signed by key {key_id}, not by the key given ({expected})")]
    WrongKey {
        /// 1-based line number.
        line: u64,
        /// The anchor's `seq`.
        seq: u64,
        /// The anchor's `key_id`.
        key_id: String,
        /// The given key's id.
        expected: String,
    },
    /// An anchor's signature does not verify: forged, or altered after signing.
    #[error("anchor at line {line} (record {seq}): bad signature: key {key_id} did not sign this content (forged or altered)")]
    BadSignature {
        /// 1-based line number.
        line: u64,
        /// The anchor's `seq`.
        seq: u64,
        /// The anchor's `key_id`.
        key_id: String,
    },
    /// Two signed anchors give one record two hashes: they anchor two different logs.
    #[error("anchors at lines {first} and {line} give record {seq} two different hashes: the anchors file mixes two logs")]
    Conflict {
        /// The record.
        seq: u64,
        /// Line of the first anchor.
        first: u64,
        /// Line of the second.
        line: u64,
    },
    /// The log is damaged on its own terms (its chain or its local head): the first bad record.
    #[error(transparent)]
    Log(VerifyError),
    /// A record's hash differs from the anchor at its `seq`: the log was rewritten (and the
    /// chain recomputed) at or before that record, after the last record the anchors confirm.
    #[error("{}", rewritten_message(*seq, *log_line, *anchor_line, *agreed))]
    Rewritten {
        /// The record the anchor contradicts.
        seq: u64,
        /// Its line in the log.
        log_line: u64,
        /// The contradicting anchor's line.
        anchor_line: u64,
        /// The last anchored record that agrees (0: none): records up to it are as anchored.
        agreed: u64,
    },
    /// The log ends before a record an anchor names.
    #[error("cut: anchor says {anchored} records, the log has {records} (anchor at line {line}; {})", missing_records(*records, *anchored))]
    Cut {
        /// The largest anchored `seq`.
        anchored: u64,
        /// Records in the log.
        records: u64,
        /// That anchor's line.
        line: u64,
    },
    /// At start, the anchors file contradicts the log the node opened.
    #[error("anchors file {path}: {detail}; the log was cut or replaced since it was anchored: move the log, its .head and its .anchors aside to keep them as evidence, then start a new log")]
    Stale {
        /// The anchors file.
        path: PathBuf,
        /// The contradiction.
        detail: String,
    },
    /// An option is out of range.
    #[error("invalid anchor option {name}: {hint}")]
    InvalidOptions {
        /// Option name.
        name: &'static str,
        /// What is allowed.
        hint: &'static str,
    },
}

impl AnchorError {
    /// Stable snake_case label: `rewritten`, `cut`, `bad_signature`, `wrong_key`, `conflict`,
    /// `malformed`, `too_many`, `stale`, `key`, `io`, `invalid_options`, or the log's own
    /// [`VerifyError::label`].
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            AnchorError::Key { .. } => "key",
            AnchorError::Io { .. } => "io",
            AnchorError::Malformed { .. } => "malformed",
            AnchorError::TooMany => "too_many",
            AnchorError::WrongKey { .. } => "wrong_key",
            AnchorError::BadSignature { .. } => "bad_signature",
            AnchorError::Conflict { .. } => "conflict",
            AnchorError::Log(e) => e.label(),
            AnchorError::Rewritten { .. } => "rewritten",
            AnchorError::Cut { .. } => "cut",
            AnchorError::Stale { .. } => "stale",
            AnchorError::InvalidOptions { .. } => "invalid_options",
        }
    }
}

fn rewritten_message(seq: u64, log_line: u64, anchor_line: u64, agreed: u64) -> String {
    let first = agreed.saturating_add(1);
    if first >= seq {
        format!(
            "record {seq} (line {log_line}) is the first record the anchors contradict: its hash differs from the anchor at line {anchor_line} and every record before it agrees: record {seq} was rewritten"
        )
    } else {
        let agree = if agreed == 0 {
            "no earlier record is anchored".to_owned()
        } else {
            format!("records up to {agreed} agree with the anchors")
        };
        format!(
            "record {seq} (line {log_line}) is the first record the anchors contradict: its hash differs from the anchor at line {anchor_line}; {agree}, so the log was rewritten at a record from {first} to {seq}"
        )
    }
}

fn missing_records(records: u64, anchored: u64) -> String {
    let first = records.saturating_add(1);
    if first == anchored {
        format!("record {anchored} is missing")
    } else {
        format!("records {first} to {anchored} are missing")
    }
}

/// A signed chain head. See the module docs for the format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// The node that wrote the log.
    pub node: String,
    /// `seq` of the last durable record.
    pub seq: u64,
    /// `hash` of that record.
    pub hash: String,
    /// When the anchor was taken (RFC 3339, UTC).
    pub time: String,
    /// Id of the signing key ([`key_id`]).
    pub key_id: String,
    /// Ed25519 signature over [`Anchor::signed_bytes`], lowercase hex.
    pub sig: String,
}

impl Anchor {
    fn map(&self, with_sig: bool) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("hash".to_owned(), Value::String(self.hash.clone()));
        map.insert("key_id".to_owned(), Value::String(self.key_id.clone()));
        map.insert("node".to_owned(), Value::String(self.node.clone()));
        map.insert("seq".to_owned(), Value::from(self.seq));
        map.insert("time".to_owned(), Value::String(self.time.clone()));
        if with_sig {
            map.insert("sig".to_owned(), Value::String(self.sig.clone()));
        }
        map
    }

    /// What the signature covers: the canonical JSON of the anchor without `sig`.
    #[must_use]
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        chain::write_object(&self.map(false), &mut out);
        out
    }

    /// The anchor's line in the anchors file: canonical JSON with `sig`, then `\n`.
    #[must_use]
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = Vec::new();
        chain::write_object(&self.map(true), &mut out);
        out.push(b'\n');
        out
    }

    /// The head this anchor vouches for.
    #[must_use]
    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }

    /// Whether `key` made this anchor's signature over its content (the key id must match too).
    #[must_use]
    pub fn verify(&self, key: &AnchorPublicKey) -> bool {
        if self.key_id != key.key_id {
            return false;
        }
        let Ok(sig) = hex::decode(&self.sig) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, &key.raw)
            .verify(&self.signed_bytes(), &sig)
            .is_ok()
    }

    /// Parses one line (without its `\n`) and checks its shape (not its signature).
    fn parse(line: &[u8]) -> Result<Anchor, String> {
        if line.len() > MAX_ANCHOR_LINE {
            return Err(format!("longer than {MAX_ANCHOR_LINE} bytes"));
        }
        let a: Anchor = serde_json::from_slice(line)
            .map_err(|e| format!("not an anchor {{hash, key_id, node, seq, sig, time}}: {e}"))?;
        if a.seq == 0 {
            return Err("seq 0 (anchors name records, from 1)".to_owned());
        }
        if !chain::is_hash(&a.hash) {
            return Err(format!("record {}: hash is not 64 lowercase hex", a.seq));
        }
        let lower_hex = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !lower_hex(&a.key_id, KEY_ID_HEX_LEN) || !lower_hex(&a.sig, SIG_HEX_LEN) {
            return Err(format!(
                "record {}: key_id (16 hex) or sig (128 hex) malformed",
                a.seq
            ));
        }
        Ok(a)
    }
}

/// The node's anchor signing key: Ed25519. `Debug` prints the key id only.
pub struct AnchorKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for AnchorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnchorKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Reads a small text file (a key), bounded.
fn read_key_file(path: &Path) -> Result<String, AnchorError> {
    let key_err = |reason: String| AnchorError::Key {
        path: path.to_owned(),
        reason,
    };
    let file = File::open(path).map_err(|e| key_err(e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_KEY_FILE.saturating_add(1))
        .read_to_string(&mut text)
        .map_err(|e| key_err(format!("not a text file: {e}")))?;
    if u64::try_from(text.len()).map_or(true, |n| n > MAX_KEY_FILE) {
        return Err(key_err(format!("longer than {MAX_KEY_FILE} bytes")));
    }
    Ok(text)
}

/// The base64 body of the PEM block `label` in `text`, decoded.
fn pem_block(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let body: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != begin)
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err(format!("no PEM {label} block"));
    }
    STANDARD
        .decode(body)
        .map_err(|e| format!("bad base64 in the PEM {label} block: {e}"))
}

impl AnchorKey {
    /// Reads a PEM `PRIVATE KEY` file holding an Ed25519 PKCS#8 key, as written by
    /// `cellgate keys init` (`signing.key`) or `openssl genpkey -algorithm ed25519`.
    ///
    /// # Errors
    ///
    /// [`AnchorError::Key`] naming the file when it cannot be read or holds no Ed25519 key.
    pub fn load(path: &Path) -> Result<AnchorKey, AnchorError> {
        let text = read_key_file(path)?;
        pem_block(&text, "PRIVATE KEY")
            .and_then(|der| AnchorKey::from_pkcs8(&der))
            .map_err(|reason| AnchorError::Key {
                path: path.to_owned(),
                reason,
            })
    }

    /// A key from PKCS#8 DER (v1 or v2).
    ///
    /// # Errors
    ///
    /// When `der` is not an Ed25519 PKCS#8 key.
    pub fn from_pkcs8(der: &[u8]) -> Result<AnchorKey, String> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| format!("not an Ed25519 PKCS#8 private key: {e}"))?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(AnchorKey { pair, key_id })
    }

    /// A fresh random key, as PKCS#8 DER (tests, and tools that write it out).
    ///
    /// # Errors
    ///
    /// When the system random generator fails.
    pub fn generate_pkcs8() -> Result<Vec<u8>, String> {
        Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|e| format!("could not generate a key: {e}"))
    }

    /// The key id.
    #[must_use]
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public half, for verifiers.
    #[must_use]
    pub fn public_key(&self) -> AnchorPublicKey {
        let mut raw = [0u8; 32];
        for (d, s) in raw.iter_mut().zip(self.pair.public_key().as_ref()) {
            *d = *s;
        }
        AnchorPublicKey::from_raw(raw)
    }

    /// Signs `head` as written by `node` at `time`.
    #[must_use]
    pub fn sign(&self, node: &str, head: &Head, time: SystemTime) -> Anchor {
        let mut anchor = Anchor {
            node: node.to_owned(),
            seq: head.seq,
            hash: head.hash.clone(),
            time: format_rfc3339(time),
            key_id: self.key_id.clone(),
            sig: String::new(),
        };
        anchor.sig = hex::encode(self.pair.sign(&anchor.signed_bytes()));
        anchor
    }
}

/// An Ed25519 public key that verifies anchors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorPublicKey {
    raw: [u8; 32],
    key_id: String,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    crv: String,
    x: String,
    #[serde(default)]
    kid: Option<String>,
}

impl AnchorPublicKey {
    /// From the raw 32 bytes.
    #[must_use]
    pub fn from_raw(raw: [u8; 32]) -> AnchorPublicKey {
        AnchorPublicKey {
            key_id: key_id(&raw),
            raw,
        }
    }

    /// Parses a public key in either of the forms the two ways of making an anchor key write:
    /// the JWK `signing.pub` of `cellgate keys init` (`{"kty":"OKP","crv":"Ed25519","x":...}`),
    /// or a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) from `openssl pkey -pubout`.
    ///
    /// # Errors
    ///
    /// When the text is neither, names another key type, or its `kid` does not match the key.
    pub fn parse(text: &str) -> Result<AnchorPublicKey, String> {
        let raw: Vec<u8> = if text.contains("-----BEGIN PUBLIC KEY-----") {
            let der = pem_block(text, "PUBLIC KEY")?;
            der.strip_prefix(&ED25519_SPKI_PREFIX[..])
                .ok_or("the PEM PUBLIC KEY is not an Ed25519 key")?
                .to_vec()
        } else {
            let jwk: Jwk = serde_json::from_str(text)
                .map_err(|e| format!("neither a PEM PUBLIC KEY nor a JWK (signing.pub): {e}"))?;
            if jwk.kty != "OKP" || jwk.crv != "Ed25519" {
                return Err(format!(
                    "unsupported key type {}/{}: expected OKP/Ed25519",
                    jwk.kty, jwk.crv
                ));
            }
            URL_SAFE_NO_PAD
                .decode(jwk.x.trim_end_matches('='))
                .map_err(|e| format!("bad x: {e}"))?
        };
        let raw: [u8; 32] = raw
            .try_into()
            .map_err(|_| "the public key is not 32 bytes".to_owned())?;
        let key = AnchorPublicKey::from_raw(raw);
        if let Some(kid) = serde_json::from_str::<Jwk>(text).ok().and_then(|j| j.kid) {
            if kid != key.key_id {
                return Err(format!(
                    "kid {kid:?} does not match the key (its id is {})",
                    key.key_id
                ));
            }
        }
        Ok(key)
    }

    /// Reads a public key file ([`AnchorPublicKey::parse`]).
    ///
    /// # Errors
    ///
    /// [`AnchorError::Key`] naming the file.
    pub fn load(path: &Path) -> Result<AnchorPublicKey, AnchorError> {
        AnchorPublicKey::parse(&read_key_file(path)?).map_err(|reason| AnchorError::Key {
            path: path.to_owned(),
            reason,
        })
    }

    /// The key id.
    #[must_use]
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The raw 32 bytes.
    #[must_use]
    pub fn raw(&self) -> &[u8; 32] {
        &self.raw
    }
}

/// What a log checked against its anchors holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchoredReport {
    /// The log on its own terms.
    pub log: VerifyReport,
    /// Anchors read (all signed by the key and agreeing with the log).
    pub anchors: u64,
    /// The largest anchored `seq` (0: no anchor).
    pub last_anchored: u64,
}

/// Anchored `seq` → (hash, line of the first anchor naming it).
type AnchorMap = BTreeMap<u64, (String, u64)>;

/// Reads an anchors file: every anchor must be well formed and signed by `key`.
fn read_anchors(path: &Path, key: &AnchorPublicKey) -> Result<(AnchorMap, u64), AnchorError> {
    let io_err = |source| AnchorError::Io {
        path: path.to_owned(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
    let mut map = AnchorMap::new();
    let mut buf = Vec::new();
    let mut line: u64 = 0;
    loop {
        let read = next_line(&mut reader, &mut buf).map_err(io_err)?;
        line = line.saturating_add(1);
        let malformed = |detail: &str| AnchorError::Malformed {
            line,
            detail: detail.to_owned(),
        };
        match read {
            Line::Eof => break,
            Line::Complete => {}
            Line::TooLong => return Err(malformed("the line is too long")),
            Line::Unterminated => {
                return Err(malformed(
                    "the last line is incomplete (no newline at the end of the file)",
                ))
            }
        }
        let anchor = Anchor::parse(&buf).map_err(|d| malformed(&d))?;
        if anchor.key_id != key.key_id {
            return Err(AnchorError::WrongKey {
                line,
                seq: anchor.seq,
                key_id: anchor.key_id,
                expected: key.key_id.clone(),
            });
        }
        if !anchor.verify(key) {
            return Err(AnchorError::BadSignature {
                line,
                seq: anchor.seq,
                key_id: anchor.key_id,
            });
        }
        if map.len() >= MAX_ANCHORS && !map.contains_key(&anchor.seq) {
            return Err(AnchorError::TooMany);
        }
        match map.entry(anchor.seq) {
            Entry::Occupied(e) => {
                if e.get().0 != anchor.hash {
                    return Err(AnchorError::Conflict {
                        seq: anchor.seq,
                        first: e.get().1,
                        line,
                    });
                }
            }
            Entry::Vacant(e) => {
                e.insert((anchor.hash, line));
            }
        }
    }
    Ok((map, line.saturating_sub(1)))
}

/// Checks the log at `log` against the anchors in `anchors`, signed by `key`.
///
/// In order: every anchor must be well formed and carry a good signature by `key`
/// ([`AnchorError::BadSignature`], [`AnchorError::WrongKey`], [`AnchorError::Malformed`]); then
/// the log is walked: the first record that breaks the chain ([`AnchorError::Log`]) or whose
/// hash differs from an anchor at its `seq` ([`AnchorError::Rewritten`]) ends the walk, so the
/// error names the earliest damage. A rewrite of record N with the chain recomputed after it
/// changes the hash of N and of every later record, so the first contradicted anchored record
/// is at or after N, and the records up to the last agreeing anchor are exactly as anchored:
/// the error says the rewrite lies between the two (it names N exactly when the record before
/// it is anchored). A log that ends before an anchored record is [`AnchorError::Cut`]. Last,
/// the local `<log>.head` is checked as [`crate::verify_path`] does.
///
/// # Errors
///
/// The first of those found.
pub fn verify_anchored(
    log: &Path,
    anchors: &Path,
    key: &AnchorPublicKey,
) -> Result<AnchoredReport, AnchorError> {
    let (map, count) = read_anchors(anchors, key)?;
    let head = read_head(&head_path(log)).map_err(AnchorError::Log)?;
    let file = File::open(log).map_err(|source| AnchorError::Io {
        path: log.to_owned(),
        source,
    })?;
    let mut agreed: u64 = 0;
    let mut found: Option<AnchorError> = None;
    let walked = verify_inner(BufReader::new(file), None, log, &mut |seq, line, hash| {
        let stop = |found: &mut Option<AnchorError>, e: AnchorError| {
            *found = Some(e);
            Err(VerifyError::Record {
                seq,
                line,
                kind: Fault::Modified,
                detail: "contradicted".to_owned(),
            })
        };
        if let Some((anchored, anchor_line)) = map.get(&seq) {
            if anchored != hash {
                let e = AnchorError::Rewritten {
                    seq,
                    log_line: line,
                    anchor_line: *anchor_line,
                    agreed,
                };
                return stop(&mut found, e);
            }
            agreed = seq;
        }
        if let Some(h) = &head {
            if h.seq == seq && h.hash != hash {
                let e = AnchorError::Log(VerifyError::Record {
                    seq,
                    line,
                    kind: Fault::Modified,
                    detail: "hash differs from the head anchor: the log was rewritten up to here"
                        .to_owned(),
                });
                return stop(&mut found, e);
            }
        }
        Ok(())
    });
    if let Some(e) = found {
        return Err(e);
    }
    let report = walked.map_err(AnchorError::Log)?;
    if let Some((&anchored, (_, line))) = map.last_key_value() {
        if anchored > report.records {
            return Err(AnchorError::Cut {
                anchored,
                records: report.records,
                line: *line,
            });
        }
    }
    if let Some(h) = &head {
        if h.seq > report.records {
            return Err(AnchorError::Log(VerifyError::Record {
                seq: report.records.saturating_add(1),
                line: report.records.saturating_add(1),
                kind: Fault::Truncated,
                detail: format!(
                    "the head anchor says the log reaches record {}, the file ends at record {}",
                    h.seq, report.records
                ),
            }));
        }
    }
    Ok(AnchoredReport {
        last_anchored: map.last_key_value().map_or(0, |(s, _)| *s),
        anchors: count,
        log: VerifyReport { head, ..report },
    })
}

/// How the [`Anchorer`] works.
#[derive(Debug, Clone)]
pub struct AnchorOptions {
    /// Node name written in each anchor.
    pub node: String,
    /// The anchors file ([`anchors_path`] of the log).
    pub path: PathBuf,
    /// Time between anchors (an anchor is written only when the durable head moved).
    pub interval: Duration,
}

/// State behind the anchoring lock.
#[derive(Debug, Default)]
struct Last {
    /// The head of the last anchor written (or found in the file at start).
    head: Option<Head>,
}

#[derive(Debug)]
struct Inner {
    log: AuditLog,
    key: AnchorKey,
    node: String,
    path: PathBuf,
    file: Arc<File>,
    latest: watch::Sender<Option<Anchor>>,
    last: Mutex<Last>,
    failures: AtomicU64,
}

/// Takes signed anchors of an [`AuditLog`]'s durable head at an interval and on
/// [`Anchorer::finish`], appends them to the anchors file (each synced) and publishes them.
///
/// For an exporter (OTLP or other):
///
/// ```no_run
/// # async fn export(anchorer: &cellgate_audit::Anchorer) {
/// let mut anchors = anchorer.subscribe();
/// while anchors.changed().await.is_ok() {
///     let latest = anchors.borrow_and_update().clone();
///     if let Some(anchor) = latest {
///         // send `anchor` (or its canonical line, `anchor.to_line()`) elsewhere
///         # let _ = anchor;
///     }
/// }
/// # }
/// ```
///
/// The channel holds the latest anchor only: a slow exporter skips intermediate anchors, which
/// is harmless (each anchor vouches for everything before it); the complete series stays in the
/// anchors file. Dropping the anchorer stops its timer.
#[derive(Debug)]
pub struct Anchorer {
    inner: Arc<Inner>,
    ticker: tokio::task::AbortHandle,
}

impl Drop for Anchorer {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

impl Anchorer {
    /// Opens (or creates) the anchors file, anchors the log's durable head at once if it is not
    /// anchored yet, and starts the timer.
    ///
    /// # Errors
    ///
    /// [`AnchorError::Stale`] when the anchors file's last anchor names a record beyond the
    /// log's end or another hash for the log's last record (the log was cut or replaced:
    /// appending would mix two logs), [`AnchorError::Malformed`] when that anchor cannot be
    /// read, [`AnchorError::Io`], [`AnchorError::InvalidOptions`] for a zero interval.
    ///
    /// # Caveats
    ///
    /// Must be called inside a tokio runtime. An incomplete last line (a crash during an
    /// append, so never synced or published) is moved to `<anchors>.torn` and cut.
    pub async fn start(
        log: AuditLog,
        key: AnchorKey,
        options: AnchorOptions,
    ) -> Result<Anchorer, AnchorError> {
        if options.interval.is_zero() {
            return Err(AnchorError::InvalidOptions {
                name: "interval",
                hint: "must be above zero",
            });
        }
        let durable = log.durable_head();
        let opened = {
            let path = options.path.clone();
            tokio::task::spawn_blocking(move || open_anchors(&path, &durable)).await
        };
        let (file, last) = opened.map_err(|e| AnchorError::Io {
            path: options.path.clone(),
            source: io::Error::other(e),
        })??;
        let (latest, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            log,
            key,
            node: options.node,
            path: options.path,
            file: Arc::new(file),
            latest,
            last: Mutex::new(Last { head: last }),
            failures: AtomicU64::new(0),
        });
        // The head found at start, if not anchored yet: at once, and a failure stops the start.
        inner.anchor(&mut *inner.last.lock().await).await?;
        let ticker = {
            let inner = Arc::clone(&inner);
            let mut tick = tokio::time::interval(options.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio::spawn(async move {
                // The first tick is immediate: the head at start is anchored already.
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let mut last = inner.last.lock().await;
                    if let Err(e) = inner.anchor(&mut last).await {
                        inner.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, "audit anchor not written; retrying at the next interval");
                    }
                }
            })
            .abort_handle()
        };
        Ok(Anchorer { inner, ticker })
    }

    /// The latest anchor, as it is written (`None` until the first). See the type docs.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Option<Anchor>> {
        self.inner.latest.subscribe()
    }

    /// The latest anchor written since start, if any.
    #[must_use]
    pub fn latest(&self) -> Option<Anchor> {
        self.inner.latest.borrow().clone()
    }

    /// The signing key's id.
    #[must_use]
    pub fn key_id(&self) -> &str {
        self.inner.key.key_id()
    }

    /// The anchors file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Anchors the timer failed to write (each is logged; the next tick tries again).
    #[must_use]
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Anchors the durable head now if it moved since the last anchor; returns the new anchor.
    ///
    /// # Errors
    ///
    /// [`AnchorError::Io`] if the anchors file cannot be written.
    pub async fn anchor_now(&self) -> Result<Option<Anchor>, AnchorError> {
        let mut last = self.inner.last.lock().await;
        self.inner.anchor(&mut last).await
    }

    /// For shutdown: stops the timer, flushes the log (everything accepted becomes durable)
    /// and anchors the final durable head. A log that is already closed is anchored as it is.
    ///
    /// # Errors
    ///
    /// As [`Anchorer::anchor_now`].
    pub async fn finish(&self) -> Result<Option<Anchor>, AnchorError> {
        // Taken first: the timer is then asleep or waiting for the lock, never mid-write.
        let mut last = self.inner.last.lock().await;
        self.ticker.abort();
        if let Err(e) = self.inner.log.flush().await {
            tracing::warn!(error = %e, "final audit flush before the last anchor failed; anchoring what is durable");
        }
        self.inner.anchor(&mut last).await
    }
}

impl Inner {
    async fn anchor(&self, last: &mut Last) -> Result<Option<Anchor>, AnchorError> {
        let head = self.log.durable_head();
        let moved = match &last.head {
            None => head.seq > 0,
            Some(l) => head.seq > l.seq,
        };
        if !moved {
            return Ok(None);
        }
        let anchor = self.key.sign(&self.node, &head, SystemTime::now());
        let line = anchor.to_line();
        let file = Arc::clone(&self.file);
        let written = tokio::task::spawn_blocking(move || {
            let mut f: &File = &file;
            f.write_all(&line)?;
            f.sync_data()
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        written.map_err(|source| AnchorError::Io {
            path: self.path.clone(),
            source,
        })?;
        last.head = Some(head);
        self.latest.send_replace(Some(anchor.clone()));
        tracing::debug!(seq = anchor.seq, "audit head anchored");
        Ok(Some(anchor))
    }
}

/// Opens the anchors file for appending, cuts a torn last line, and checks its last anchor
/// against the log's durable head.
fn open_anchors(path: &Path, durable: &Head) -> Result<(File, Option<Head>), AnchorError> {
    let io_err = |source| AnchorError::Io {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(io_err)?;
    if cut_torn_tail(&file, path).map_err(io_err)?.is_some() {
        tracing::warn!(path = %path.display(), "the anchors file ended in an incomplete anchor (a crash during a write): moved to <anchors>.torn and cut");
    }
    let stale = |detail: String| AnchorError::Stale {
        path: path.to_owned(),
        detail,
    };
    // The appending handle cannot read.
    let reader = File::open(path).map_err(io_err)?;
    let Some(last) = last_anchor(&reader).map_err(io_err)? else {
        return Ok((file, None));
    };
    let last = last.map_err(|e| stale(format!("its last line is not an anchor ({e})")))?;
    if last.seq > durable.seq {
        return Err(stale(format!(
            "its last anchor says the log reached record {}, the log has {}",
            last.seq, durable.seq
        )));
    }
    if last.seq == durable.seq && last.hash != durable.hash {
        return Err(stale(format!(
            "its last anchor gives record {} another hash than the log's",
            last.seq
        )));
    }
    Ok((file, Some(last.head())))
}

/// The last line of the anchors file (complete lines only, as after [`cut_torn_tail`]), parsed;
/// `None` for an empty file.
fn last_anchor(file: &File) -> io::Result<Option<Result<Anchor, String>>> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    // The last line and its newline, plus one byte to find the newline before it.
    let window = u64::try_from(MAX_ANCHOR_LINE.saturating_add(2)).unwrap_or(u64::MAX);
    let start = len.saturating_sub(window);
    let mut tail = vec![0u8; usize::try_from(len.saturating_sub(start)).unwrap_or(0)];
    file.read_exact_at(&mut tail, start)?;
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let line = match body.iter().rposition(|b| *b == b'\n') {
        Some(i) => body.get(i.saturating_add(1)..).unwrap_or_default(),
        None if start == 0 => body,
        None => {
            return Ok(Some(Err(format!(
                "the last line is longer than {MAX_ANCHOR_LINE} bytes"
            ))))
        }
    };
    Ok(Some(Anchor::parse(line)))
}
