//! Cellgate's tamper-evident audit log: one record per decision, hash-chained.
//!
//! Every front door of the node (tagged intake, ext_authz, DNS) turns each decision (allow,
//! deny, error, shadow-deny, approval) into a [`Record`] and hands it to an [`AuditLog`]. A single
//! writer task owns the file, chains the records in the order it receives them and appends them
//! one per line. [`verify_path`] proves a log untouched or names the first bad record.
//!
//! Start reading at [`AuditLog::open`] (writing) and [`verify_path`] (checking); the format is
//! in [`chain`]. Signed anchors of the chain head, which catch a log cut or rewritten together
//! with its `.head`, are in [`anchor`] ([`Anchorer`] writes them, [`verify_anchored`] checks).
//!
//! # What a record holds
//!
//! Metadata only: who (cell, namespace, token id), where (source, destination, host, path),
//! what was decided and why, under which policy version, budget state and latency.
//! **Never secrets and never bodies**: no credential, token, header value outside the schema 2
//! allowlist, query string, request or response body. Callers must pass the path
//! without its query string if the query may carry secrets.
//!
//! # Record schema versions
//!
//! - **Schema 1** (no `schema` key): time, node, front_door, cell, namespace, token_id, source,
//!   destination, protocol, method, host, path, capability, decision, reason, reasons,
//!   policy_version, budget, latency_us, request_id and the chain fields.
//! - **Schema 2** (`"schema":2`, [`SCHEMA_VERSION`]) adds what re-deciding a request with another
//!   policy needs (`cellgate policy replay`): `port` (the request's port), `sni`, `headers` (only
//!   headers on the node's value allowlist: `content-type`, `accept`, `content-length`,
//!   `upgrade`, each only when its value has the shape those headers have), `withheld` (what the
//!   policy saw that the record leaves out: `query`, `header:<name>`, `body`, `path`),
//!   `cell_uid`, `role` (the token's), `cell_generation` and `policy_packs` (pack name → version).
//!   Never the `Authorization`, `Cookie` or identity token headers, and never query values.
//!
//! Every new field is optional and omitted when absent, so a schema 1 record reads back into
//! [`Record`] unchanged and its canonical JSON and hash are the same bytes as when it was
//! written: old and new records verify alike, and may sit in one chain.
//!
//! # File format (for third-party verifiers)
//!
//! The log is UTF-8 text, one record per line, each line terminated by `\n`. A line is the
//! *canonical JSON* of the record: an object whose keys are sorted lexicographically (by Unicode
//! code point, which is byte order in UTF-8) at every level, with no whitespace, strings escaped
//! as `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, other control characters as `\u00xx` (lowercase
//! hex), everything else written as raw UTF-8. Numbers are integers (the writer turns any
//! non-integer number a caller put in `budget` into a string before sealing, so that every
//! language formats them identically). Absent optional fields are omitted, not `null`.
//!
//! Every record carries three chain fields: `seq` (1, 2, 3, ... with no gap), `prev` (the `hash`
//! of the previous record; 64 `0` for the first) and `hash`:
//!
//! ```text
//! hash = lowercase_hex(SHA-256(prev || "\n" || canonical_json(record without its "hash" key)))
//! ```
//!
//! where `prev` is the 64 ASCII hex characters themselves. Next to the log, `<log>.head` holds
//! `{"hash":"...","seq":N}` for the last record known durable; it is replaced atomically after
//! every sync and lets a verifier notice trailing records that were cut off (a missing or empty
//! head checks nothing). A local head can
//! be rewritten by whoever can rewrite the log, so for full tamper-resistance the head must also
//! be kept elsewhere: the [`Anchorer`] signs it at an interval and at shutdown (see below), and
//! [`verify_anchored`] checks a log against those anchors.
//!
//! Python's standard library reproduces the canonical form exactly, so a complete verifier is:
//!
//! ```python
//! import hashlib, json, os, sys
//! prev, seq = "0" * 64, 0
//! with open(sys.argv[1], encoding="utf-8", newline="\n") as f:
//!     for n, line in enumerate(f, 1):
//!         if not line.endswith("\n"):
//!             sys.exit(f"line {n}: truncated")
//!         rec = json.loads(line)
//!         claimed = rec.pop("hash")
//!         body = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
//!         if hashlib.sha256((rec["prev"] + "\n" + body).encode()).hexdigest() != claimed:
//!             sys.exit(f"record {rec['seq']} (line {n}): modified")
//!         if rec["seq"] != seq + 1 or rec["prev"] != prev:
//!             sys.exit(f"record {rec['seq']} (line {n}): chain broken after record {seq}")
//!         prev, seq = claimed, rec["seq"]
//! if os.path.exists(sys.argv[1] + ".head"):
//!     head = json.load(open(sys.argv[1] + ".head"))
//!     if head["seq"] > seq:
//!         sys.exit(f"truncated: the head says {head['seq']} records, the file has {seq}")
//! print(f"{seq} records intact")
//! ```
//!
//! (The crate's tests run exactly this script against logs the writer produced.)
//!
//! # Anchors file (`<log>.anchors`)
//!
//! UTF-8 text, one anchor per line, each line the canonical JSON (as above) of
//!
//! ```text
//! {"hash":H,"key_id":K,"node":N,"seq":S,"sig":G,"time":T}
//! ```
//!
//! - `seq`, `hash`: the last record known synced when the anchor was taken (`hash` as the
//!   record's own, 64 lowercase hex);
//! - `node`: the node's name; `time`: RFC 3339 UTC with nanoseconds, as in records;
//! - `key_id`: the first 16 lowercase hex digits of SHA-256 over the raw 32-byte Ed25519 public
//!   key (the key id `cellgate keys init` prints);
//! - `sig`: lowercase hex of the 64-byte Ed25519 signature (RFC 8032) over the canonical JSON of
//!   the anchor without its `sig` key, for example
//!   `{"hash":"…","key_id":"…","node":"node-a","seq":42,"time":"…"}`.
//!
//! An anchor is written only when the head moved since the previous one, so `seq` increases
//! down the file. To check a log against it: verify every signature, then, walking the log as
//! the script above does, compare each record whose `seq` an anchor names with that anchor's
//! `hash`; a log whose last `seq` is below the largest anchored one was cut. Checking Ed25519
//! needs a library outside Python's standard one (`cryptography`'s
//! `Ed25519PublicKey.from_public_bytes(raw).verify(bytes.fromhex(sig), body)`), so no complete
//! script is given here; `cellgate audit verify FILE --anchors ANCHORS --anchor-key PUB` does
//! all of it.
//!
//! # Lint tier
//!
//! This crate decides whether a log is trustworthy and reads files an attacker may have edited,
//! so it is in the strict tier: no `unwrap`, `expect`, panicking indexing or unchecked
//! arithmetic outside tests, and every size limit is a named constant.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::panic
    )
)]

pub mod anchor;
pub mod chain;
mod error;
mod log;
mod record;
mod verify;

pub use anchor::{
    anchors_path, verify_anchored, Anchor, AnchorError, AnchorKey, AnchorOptions, AnchorPublicKey,
    AnchoredReport, Anchorer, DEFAULT_ANCHOR_INTERVAL,
};
pub use chain::{head_path, Head, ZERO_HASH};
pub use error::{AuditError, Fault, VerifyError};
pub use log::{AuditLog, AuditOptions, AuditStats, WriterGone, WriterHandle, MAX_BATCH_RECORDS};
pub use record::{
    format_rfc3339, parse_rfc3339_ns, Decision, Record, CLAMPED_REASON, SCHEMA_VERSION,
};
pub use verify::{read_head, verify_path, verify_reader, verify_reader_with_head, VerifyReport};

/// Longest line (one record, without its `\n`) the verifier accepts, in bytes.
///
/// A normal record is well under 2 KiB; 64 KiB leaves room for long paths and many reasons
/// while bounding what the verifier buffers for a hostile file. The writer never produces a
/// longer line: it clamps the free-form fields of an oversized record first (see
/// [`Record::clamp`]).
pub const MAX_LINE_LEN: usize = 64 * 1024;
