//! The chain rule: canonical JSON, the record hash, sealing a record into its line, and the
//! head anchor.
//!
//! ```text
//! hash = lowercase_hex(SHA-256(prev || "\n" || canonical_json(record without its "hash" key)))
//! line = canonical_json(record with its "hash" key) || "\n"
//! ```
//!
//! Canonical JSON sorts object keys explicitly at every level instead of relying on
//! `serde_json::Map`'s iteration order, which becomes insertion order when any crate in the
//! build enables serde_json's `preserve_order` feature. See the crate docs for the full format.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::record::Record;
use crate::MAX_LINE_LEN;

/// `prev` of the first record: 64 ASCII zeros.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Length of a hash in hex characters (SHA-256).
pub const HASH_HEX_LEN: usize = 64;

/// Whether `s` looks like a hash: 64 lowercase hex characters.
#[must_use]
pub fn is_hash(s: &str) -> bool {
    s.len() == HASH_HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The canonical JSON of `value`: keys sorted at every level, no whitespace.
#[must_use]
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_value(value, &mut out);
    out
}

/// Appends the canonical JSON of an object to `out`.
pub(crate) fn write_object(map: &Map<String, Value>, out: &mut Vec<u8>) {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(key, out);
        out.push(b':');
        write_value(value, out);
    }
    out.push(b'}');
}

fn write_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(map, out),
    }
}

/// Escapes as serde_json and Python's `json.dumps(ensure_ascii=False)` both do.
fn write_str(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    // Runs of bytes that need no escaping are copied whole. Every byte to escape is ASCII, and
    // no byte of a multi-byte UTF-8 sequence is below 0x80, so working on bytes is exact.
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(bytes.get(run..i).unwrap_or_default());
        run = i.saturating_add(1);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            for nibble in [b >> 4, b & 0xf] {
                out.push(HEX.get(usize::from(nibble)).copied().unwrap_or(b'0'));
            }
        } else {
            out.extend_from_slice(escape);
        }
    }
    out.extend_from_slice(bytes.get(run..).unwrap_or_default());
    out.push(b'"');
}

/// The hash of a record whose canonical body (without `hash`) is `body`, chained to `prev`.
#[must_use]
pub fn record_hash(prev: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(body);
    hex::encode(h.finalize())
}

/// Hashes a parsed record: removes its `hash` key (returned as found) and returns the hash its
/// content and `prev` field call for. Used by the verifier on lines read back from disk.
pub(crate) fn rehash(map: &mut Map<String, Value>, prev: &str) -> (Option<Value>, String) {
    let claimed = map.remove("hash");
    let mut body = Vec::new();
    write_object(map, &mut body);
    (claimed, record_hash(prev, &body))
}

/// Turns every number that is not an integer into its string form, so that every language
/// formats the record identically (float formatting differs between serde_json and Python).
fn normalize_numbers(value: &mut Value) {
    match value {
        Value::Number(n) if !(n.is_i64() || n.is_u64()) => *value = Value::String(n.to_string()),
        Value::Array(items) => items.iter_mut().for_each(normalize_numbers),
        Value::Object(map) => map.values_mut().for_each(normalize_numbers),
        _ => {}
    }
}

/// Writes the members of one canonical JSON object in the order the caller gives, which must be
/// sorted by key (see [`write_record`]).
struct Members<'a> {
    out: &'a mut Vec<u8>,
    any: bool,
}

impl Members<'_> {
    fn key(&mut self, key: &str) {
        if self.any {
            self.out.push(b',');
        }
        self.any = true;
        write_str(key, self.out);
        self.out.push(b':');
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        write_str(value, self.out);
    }

    fn opt_str(&mut self, key: &str, value: Option<&String>) {
        if let Some(v) = value {
            self.str(key, v);
        }
    }

    fn int(&mut self, key: &str, value: impl std::fmt::Display) {
        use std::io::Write as _;
        self.key(key);
        // Writing to a Vec cannot fail.
        let _ = write!(self.out, "{value}");
    }

    fn opt_int(&mut self, key: &str, value: Option<impl std::fmt::Display>) {
        if let Some(v) = value {
            self.int(key, v);
        }
    }

    fn list(&mut self, key: &str, items: &[String]) {
        if items.is_empty() {
            return;
        }
        self.key(key);
        self.out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            write_str(item, self.out);
        }
        self.out.push(b']');
    }

    fn map(&mut self, key: &str, map: &std::collections::BTreeMap<String, String>) {
        self.key(key);
        self.out.push(b'{');
        // A BTreeMap<String, _> iterates in the byte order canonical JSON sorts by.
        for (i, (k, v)) in map.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            write_str(k, self.out);
            self.out.push(b':');
            write_str(v, self.out);
        }
        self.out.push(b'}');
    }
}

/// Appends the canonical JSON of `rec` without its `hash` key, and returns the offset in `out`
/// where that key's entry goes: right after `front_door`, which every record has, and before
/// `node`, which every record has too (so the entry always takes a leading comma).
///
/// The same bytes as [`write_object`] over `serde_json::to_value(rec)` minus `hash` (a test holds
/// the two together, field by field), without building the intermediate `Value` tree: the
/// members are written in sorted key order, each omitted exactly when serde skips it.
fn write_record(rec: &Record, out: &mut Vec<u8>) -> usize {
    out.push(b'{');
    let mut m = Members { out, any: false };
    if let Some(budget) = &rec.budget {
        m.key("budget");
        write_value(budget, m.out);
    }
    m.opt_str("capability", rec.capability.as_ref());
    m.opt_str("cell", rec.cell.as_ref());
    m.opt_int("cell_generation", rec.cell_generation);
    m.opt_str("cell_uid", rec.cell_uid.as_ref());
    m.str("decision", rec.decision.as_str());
    m.opt_str("destination", rec.destination.as_ref());
    m.str("front_door", &rec.front_door);
    // "hash" sorts here.
    let slot = m.out.len();
    if !rec.headers.is_empty() {
        m.map("headers", &rec.headers);
    }
    m.opt_str("host", rec.host.as_ref());
    m.opt_int("latency_us", rec.latency_us);
    m.opt_str("method", rec.method.as_ref());
    m.opt_str("namespace", rec.namespace.as_ref());
    m.str("node", &rec.node);
    m.opt_str("path", rec.path.as_ref());
    if let Some(packs) = &rec.policy_packs {
        m.map("policy_packs", packs);
    }
    m.opt_str("policy_version", rec.policy_version.as_ref());
    m.opt_int("port", rec.port);
    m.str("prev", &rec.prev);
    m.str("protocol", &rec.protocol);
    m.str("reason", &rec.reason);
    m.list("reasons", &rec.reasons);
    m.opt_str("request_id", rec.request_id.as_ref());
    m.opt_str("role", rec.role.as_ref());
    m.opt_int("schema", rec.schema);
    m.int("seq", rec.seq);
    m.opt_str("sni", rec.sni.as_ref());
    m.opt_str("source", rec.source.as_ref());
    m.str("time", &rec.time);
    m.opt_str("token_id", rec.token_id.as_ref());
    m.list("withheld", &rec.withheld);
    out.push(b'}');
    slot
}

/// Initial capacity of a record's canonical body; a typical record is a few hundred bytes.
const LINE_HINT: usize = 512;

/// The `,"hash":"..."` entry [`write_record`]'s offset takes.
fn hash_entry(hash: &str) -> Vec<u8> {
    let mut entry = Vec::with_capacity(HASH_HEX_LEN.saturating_add(10));
    entry.push(b',');
    write_str("hash", &mut entry);
    entry.push(b':');
    write_str(hash, &mut entry);
    entry
}

/// Fills the chain fields of `rec` for position `seq` after `prev`, and appends its line
/// (with the `\n`) to `out`.
///
/// A record whose line would exceed [`MAX_LINE_LEN`] is [clamped](Record::clamp) first, so
/// the writer never produces a line the verifier refuses.
///
/// # Errors
///
/// Only if the record cannot be serialized as a JSON object, which its types rule out; the
/// writer treats that as a fault and fails closed.
pub(crate) fn seal(rec: &mut Record, seq: u64, prev: &str, out: &mut Vec<u8>) -> io::Result<()> {
    rec.seq = seq;
    rec.prev.clear();
    rec.prev.push_str(prev);
    rec.hash.clear();
    if let Some(budget) = &mut rec.budget {
        normalize_numbers(budget);
    }
    let mut clamped = false;
    loop {
        // One canonical serialization, straight from the record's fields: the body is hashed,
        // then the line is the body with the `hash` entry spliced in where its key sorts (what
        // writing the object again with the key inserted would produce, without doing it twice).
        let mut body = Vec::with_capacity(LINE_HINT);
        let slot = write_record(rec, &mut body);
        let hash = record_hash(prev, &body);
        let entry = hash_entry(&hash);
        let line_len = body.len().saturating_add(entry.len());
        if line_len > MAX_LINE_LEN {
            if clamped {
                return Err(io::Error::other(format!(
                    "audit record {seq} is {line_len} bytes even after clamping, over the limit of {MAX_LINE_LEN}"
                )));
            }
            rec.clamp();
            clamped = true;
            continue;
        }
        let (head, tail) = body.split_at(slot.min(body.len()));
        out.reserve(line_len.saturating_add(1));
        out.extend_from_slice(head);
        out.extend_from_slice(&entry);
        out.extend_from_slice(tail);
        out.push(b'\n');
        rec.hash = hash;
        return Ok(());
    }
}

/// The head anchor: the last record known durable, kept in [`head_path`] next to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    /// `seq` of that record.
    pub seq: u64,
    /// `hash` of that record.
    pub hash: String,
}

impl Head {
    /// Canonical JSON of the head, `{"hash":"...","seq":N}`, without a trailing newline.
    #[must_use]
    pub fn to_json(&self) -> Vec<u8> {
        let mut map = Map::new();
        map.insert("hash".to_owned(), Value::String(self.hash.clone()));
        map.insert("seq".to_owned(), Value::from(self.seq));
        let mut out = Vec::new();
        write_object(&map, &mut out);
        out
    }
}

/// Where the head anchor of the log at `log` lives: `<log>.head`.
#[must_use]
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = OsString::from(log.as_os_str());
    name.push(".head");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_sorts_keys_at_every_level_and_drops_whitespace() {
        let v = json!({"b": 1, "a": {"z": [3, {"y": null, "x": true}], "c": "s"}});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":{"c":"s","z":[3,{"x":true,"y":null}]},"b":1}"#
        );
    }

    /// The canonical JSON serde's representation of `rec` gives, without `hash`.
    fn through_serde(rec: &Record) -> Vec<u8> {
        let Value::Object(mut map) = serde_json::to_value(rec).unwrap() else {
            panic!("not an object")
        };
        map.remove("hash");
        let mut out = Vec::new();
        write_object(&map, &mut out);
        out
    }

    #[test]
    fn a_record_written_directly_is_its_serde_form_written_canonically() {
        let mut full = Record::new(
            "node-a",
            "intake",
            "https",
            crate::Decision::ShadowDeny,
            "r",
        );
        full.cell = Some("c".into());
        full.namespace = Some("ns".into());
        full.token_id = Some("t\"q".into());
        full.source = Some("10.0.0.1:1".into());
        full.destination = Some("1.2.3.4:443".into());
        full.method = Some("GET".into());
        full.host = Some("h\u{e9}".into());
        full.path = Some("/p\n".into());
        full.capability = Some("cap".into());
        full.reasons = vec!["a".into(), "b\\".into()];
        full.policy_version = Some("v".into());
        full.budget = Some(serde_json::json!({"z": 1, "a": {"y": "1.5", "b": [1, null, true]}}));
        full.latency_us = Some(u64::MAX);
        full.request_id = Some("req".into());
        full.schema = Some(2);
        full.port = Some(443);
        full.sni = Some("sni".into());
        full.headers = [
            ("x-b".to_owned(), "2".to_owned()),
            ("x-a".to_owned(), "1".to_owned()),
        ]
        .into_iter()
        .collect();
        full.withheld = vec!["authorization".into()];
        full.cell_uid = Some("uid".into());
        full.role = Some("role".into());
        full.cell_generation = Some(-3);
        full.policy_packs = Some([("p".to_owned(), "1".to_owned())].into_iter().collect());
        full.seq = 7;
        full.prev = ZERO_HASH.into();
        // Every field set: the direct writer covers every key serde writes (a field added to
        // Record and not to write_record fails here).
        let Value::Object(keys) = serde_json::to_value(&full).unwrap() else {
            panic!("not an object")
        };
        let mut body = Vec::new();
        write_record(&full, &mut body);
        let Value::Object(written) = serde_json::from_slice(&body).unwrap() else {
            panic!("not an object")
        };
        let mut want: Vec<&String> = keys.keys().filter(|k| *k != "hash").collect();
        want.sort();
        assert_eq!(written.keys().collect::<Vec<_>>(), want);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            String::from_utf8(through_serde(&full)).unwrap()
        );
        // And with each optional field left out in turn, and all of them.
        let minimal = Record::new("n", "dns", "dns", crate::Decision::Deny, "x");
        let mut variants = vec![minimal];
        for i in 0..20 {
            let mut r = full.clone();
            match i {
                0 => r.budget = None,
                1 => r.capability = None,
                2 => r.cell = None,
                3 => r.cell_generation = None,
                4 => r.cell_uid = None,
                5 => r.destination = None,
                6 => r.headers.clear(),
                7 => r.host = None,
                8 => r.latency_us = None,
                9 => r.method = None,
                10 => r.namespace = None,
                11 => r.policy_packs = Some(Default::default()),
                12 => r.policy_packs = None,
                13 => r.reasons.clear(),
                14 => r.schema = None,
                15 => r.sni = None,
                16 => r.withheld.clear(),
                17 => r.port = None,
                18 => r.token_id = None,
                _ => r.role = None,
            }
            variants.push(r);
        }
        for r in &variants {
            let mut body = Vec::new();
            write_record(r, &mut body);
            assert_eq!(
                String::from_utf8(body).unwrap(),
                String::from_utf8(through_serde(r)).unwrap()
            );
        }
    }

    #[test]
    fn a_sealed_line_is_the_serde_form_with_its_hash_written_canonically() {
        // The fewest fields a record has, and every field set: the hash entry lands where
        // sorting puts it in both.
        let minimal = Record::new("n", "dns", "dns", crate::Decision::Deny, "x");
        let mut full = minimal.clone();
        full.headers = [("x-a".to_owned(), "1".to_owned())].into_iter().collect();
        full.host = Some("h".into());
        full.budget = Some(serde_json::json!({"a": 1}));
        full.withheld = vec!["cookie".into()];
        for mut rec in [minimal, full] {
            let mut line = Vec::new();
            seal(&mut rec, 3, ZERO_HASH, &mut line).unwrap();
            let Value::Object(mut map) = serde_json::to_value(&rec).unwrap() else {
                panic!("not an object")
            };
            map.insert("hash".to_owned(), Value::String(rec.hash.clone()));
            let mut written = Vec::new();
            write_object(&map, &mut written);
            written.push(b'\n');
            assert_eq!(
                String::from_utf8(line).unwrap(),
                String::from_utf8(written).unwrap()
            );
        }
    }

    #[test]
    fn canonical_is_independent_of_insertion_order() {
        let mut one = Map::new();
        let mut two = Map::new();
        let keys = ["time", "seq", "a", "prev", "Z", "é", "_", "a0"];
        for (i, k) in keys.iter().enumerate() {
            one.insert((*k).to_owned(), json!({"n": i, "m": [i]}));
        }
        for (i, k) in keys.iter().enumerate().rev() {
            two.insert((*k).to_owned(), json!({"m": [i], "n": i}));
        }
        assert_eq!(
            canonical_json(&Value::Object(one)),
            canonical_json(&Value::Object(two))
        );
    }

    #[test]
    fn strings_escape_like_serde_json() {
        let s: String = (0_u8..0x80)
            .map(char::from)
            .chain("é\u{2028}😀".chars())
            .collect();
        let ours = canonical_json(&Value::String(s.clone()));
        assert_eq!(ours, serde_json::to_vec(&s).unwrap());
        // Escapes at either end, back to back, between multi-byte characters, and none.
        for s in [
            "",
            "plain",
            "\"",
            "\"quoted\"",
            "a\\b\n\u{1}",
            "\n\r\t\u{7f}",
            "é\"😀\u{1f}é",
            "GET /v1/x?q=\"a\" HTTP/1.1",
        ] {
            let ours = canonical_json(&Value::String(s.to_owned()));
            assert_eq!(ours, serde_json::to_vec(&s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn floats_become_strings_before_sealing() {
        let mut rec = Record::new("n", "intake", "http", crate::Decision::Allow, "ok");
        rec.budget = Some(json!({"left": 3, "ratio": 0.25, "big": 1e16, "neg": -2}));
        let mut line = Vec::new();
        seal(&mut rec, 1, ZERO_HASH, &mut line).unwrap();
        let text = String::from_utf8(line).unwrap();
        assert!(
            text.contains(r#""budget":{"big":"1e+16","left":3,"neg":-2,"ratio":"0.25"}"#),
            "{text}"
        );
    }

    #[test]
    fn seal_fills_chain_fields_and_the_hash_checks_out() {
        let mut rec = Record::new("n", "intake", "http", crate::Decision::Allow, "ok");
        let mut line = Vec::new();
        seal(&mut rec, 1, ZERO_HASH, &mut line).unwrap();
        assert_eq!((rec.seq, rec.prev.as_str()), (1, ZERO_HASH));
        assert!(is_hash(&rec.hash));
        assert_eq!(line.last(), Some(&b'\n'));
        let Value::Object(mut map) = serde_json::from_slice(&line).unwrap() else {
            panic!("not an object")
        };
        let (claimed, recomputed) = rehash(&mut map, ZERO_HASH);
        assert_eq!(claimed, Some(Value::String(recomputed.clone())));
        assert_eq!(recomputed, rec.hash);
        // The line is itself canonical.
        let mut again = canonical_json(&serde_json::from_slice(&line).unwrap());
        again.push(b'\n');
        assert_eq!(again, line);
    }

    /// A fixed vector so that other implementations can check themselves against this one.
    #[test]
    fn golden_hash() {
        let body = br#"{"decision":"deny","front_door":"intake","node":"n1","prev":"0000000000000000000000000000000000000000000000000000000000000000","protocol":"tcp","reason":"ppv2_missing","seq":1,"time":"2024-02-29T12:34:56.123456789Z"}"#;
        let mut rec = Record::new("n1", "intake", "tcp", crate::Decision::Deny, "ppv2_missing");
        rec.time = "2024-02-29T12:34:56.123456789Z".into();
        let mut line = Vec::new();
        seal(&mut rec, 1, ZERO_HASH, &mut line).unwrap();
        assert_eq!(rec.hash, record_hash(ZERO_HASH, body));
        // Computed independently: python3 -c 'import hashlib; print(hashlib.sha256(("0"*64
        // + "\n" + body).encode()).hexdigest())'
        assert_eq!(
            rec.hash,
            "7c1e0aea0899e82c9f918753f342f2856b2bd9f9d15839b6bd33dfd16589ac94"
        );
    }

    #[test]
    fn oversized_records_are_clamped_not_refused() {
        let mut rec = Record::new("n", "intake", "http", crate::Decision::Allow, "ok");
        // Control characters escape to six bytes each: the worst case for the line length.
        rec.path = Some("\u{1}".repeat(MAX_LINE_LEN));
        rec.host = Some("\u{1}".repeat(MAX_LINE_LEN));
        rec.reasons = vec!["\u{1}".repeat(MAX_LINE_LEN); 50];
        let mut line = Vec::new();
        seal(&mut rec, 7, ZERO_HASH, &mut line).unwrap();
        assert!(line.len() <= MAX_LINE_LEN + 1, "{}", line.len());
        assert_eq!(
            rec.reasons.last().map(String::as_str),
            Some(crate::CLAMPED_REASON)
        );
    }

    #[test]
    fn head_json_and_path() {
        let head = Head {
            seq: 3,
            hash: "ab".repeat(32),
        };
        assert_eq!(
            String::from_utf8(head.to_json()).unwrap(),
            format!(r#"{{"hash":"{}","seq":3}}"#, "ab".repeat(32))
        );
        assert_eq!(
            head_path(Path::new("/var/log/audit.jsonl")),
            Path::new("/var/log/audit.jsonl.head")
        );
    }
}
