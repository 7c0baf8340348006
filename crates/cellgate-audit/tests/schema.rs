//! Record schema versions: a schema 1 record (written before schema 2 existed) still verifies
//! and keeps its exact canonical form and hash; a schema 2 record round-trips; the clamp bounds
//! the new fields.

use cellgate_audit::chain::{canonical_json, record_hash};
use cellgate_audit::{
    verify_reader, AuditLog, AuditOptions, Decision, Record, CLAMPED_REASON, MAX_LINE_LEN,
    SCHEMA_VERSION,
};

/// A schema 1 record as an earlier writer sealed it (hash computed with the documented Python
/// verifier's canonical form).
const SCHEMA_1_LINE: &str = r#"{"cell":"researcher","decision":"deny","destination":"140.82.112.3:443","front_door":"intake","hash":"c21f669a41885e878b6862ae402fed17c11e4262d0ca053e3c36390552c33302","host":"api.github.com","latency_us":31,"method":"GET","namespace":"agents","node":"node-a","path":"/repos/x","policy_version":"a1b2c3d4e5f6","prev":"0000000000000000000000000000000000000000000000000000000000000000","protocol":"https","reason":"no_capability","reasons":["no capability names api.github.com"],"request_id":"r1","seq":1,"source":"10.0.0.7:41000","time":"2025-01-02T03:04:05.000000006Z","token_id":"jti-1"}"#;

#[test]
fn a_schema_1_record_still_verifies_and_reserializes_identically() {
    let report = verify_reader(format!("{SCHEMA_1_LINE}\n").as_bytes()).unwrap();
    assert_eq!(report.records, 1);

    let rec: Record = serde_json::from_str(SCHEMA_1_LINE).unwrap();
    assert_eq!(rec.schema, None);
    assert!(rec.headers.is_empty() && rec.withheld.is_empty() && rec.policy_packs.is_none());
    // Read with this version's type and written back: the same bytes, so the same hash.
    let value = serde_json::to_value(&rec).unwrap();
    assert_eq!(canonical_json(&value), SCHEMA_1_LINE.as_bytes());
    let mut body = value.as_object().unwrap().clone();
    body.remove("hash");
    let body = canonical_json(&serde_json::Value::Object(body));
    assert_eq!(record_hash(&rec.prev, &body), rec.hash);
}

fn schema_2() -> Record {
    let mut r = Record::new("node-a", "ext_authz", "https", Decision::Allow, "allowed");
    r.cell = Some("researcher".into());
    r.namespace = Some("agents".into());
    r.host = Some("api.github.com".into());
    r.method = Some("GET".into());
    r.path = Some("/repos/x".into());
    r.schema = Some(SCHEMA_VERSION);
    r.port = Some(443);
    r.sni = Some("api.github.com".into());
    r.headers
        .insert("content-type".into(), "application/json".into());
    r.withheld = vec!["query".into(), "header:user-agent".into()];
    r.cell_uid = Some("local:agents:researcher".into());
    r.role = Some("reader".into());
    r.cell_generation = Some(3);
    r.policy_packs = Some([("base".to_string(), "0123456789ab".to_string())].into());
    r
}

#[tokio::test]
async fn a_schema_2_record_round_trips_through_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, writer) = AuditLog::open(&path, AuditOptions::default())
        .await
        .unwrap();
    log.submit_durable(schema_2()).await.unwrap();
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(cellgate_audit::verify_path(&path).unwrap().records, 1);
    assert!(text.contains(r#""schema":2"#), "{text}");
    let back: Record = serde_json::from_str(text.trim_end()).unwrap();
    let mut want = schema_2();
    want.time.clone_from(&back.time);
    want.seq = 1;
    want.prev.clone_from(&back.prev);
    want.hash.clone_from(&back.hash);
    assert_eq!(back, want);
}

#[test]
fn clamp_bounds_the_schema_2_fields() {
    let mut r = schema_2();
    r.sni = Some("s".repeat(10_000));
    r.cell_uid = Some("u".repeat(10_000));
    r.role = Some("r".repeat(10_000));
    r.headers = (0..100)
        .map(|i| {
            (
                format!("{i:03}{}", "h".repeat(1000)),
                "\u{1}".repeat(10_000),
            )
        })
        .collect();
    r.withheld = (0..100)
        .map(|i| format!("{i}{}", "w".repeat(1000)))
        .collect();
    r.policy_packs = Some(
        (0..100)
            .map(|i| {
                (
                    format!("{i:03}{}", "p".repeat(1000)),
                    "\u{2}".repeat(10_000),
                )
            })
            .collect(),
    );
    // Every other free-form field at its worst too.
    for f in [
        &mut r.node,
        &mut r.front_door,
        &mut r.protocol,
        &mut r.reason,
    ] {
        *f = "\u{3}".repeat(10_000);
    }
    r.path = Some("\u{4}".repeat(10_000));
    r.reasons = vec!["\u{5}".repeat(10_000); 100];
    r.clamp();
    assert_eq!(r.reasons.last().map(String::as_str), Some(CLAMPED_REASON));
    assert_eq!(r.headers.len(), 8);
    assert!(r
        .headers
        .iter()
        .all(|(k, v)| k.len() <= 64 && v.len() <= 64));
    assert_eq!(r.withheld.len(), 8);
    let packs = r.policy_packs.as_ref().unwrap();
    assert!(packs.len() == 8 && packs.values().all(|v| v.len() <= 64));
    assert!(r.sni.as_ref().unwrap().len() <= 256 && r.role.as_ref().unwrap().len() <= 256);
    // The clamped record fits in a line even with every byte escaped.
    let line = canonical_json(&serde_json::to_value(&r).unwrap());
    assert!(line.len() <= MAX_LINE_LEN, "{} bytes", line.len());
}
