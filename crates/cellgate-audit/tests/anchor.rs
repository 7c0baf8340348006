//! Signed anchors: the anchorer writes them, and the log is verified against them.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cellgate_audit::chain::{canonical_json, record_hash};
use cellgate_audit::{
    anchors_path, head_path, verify_anchored, AnchorError, AnchorKey, AnchorOptions,
    AnchorPublicKey, Anchorer, AuditLog, Decision, Head, Record,
};
use serde_json::Value;

fn rec(i: u64) -> Record {
    let mut r = Record::new("n1", "intake", "http", Decision::Allow, "ok");
    r.path = Some(format!("/v1/item/{i}"));
    r.request_id = Some(format!("r{i}"));
    r
}

fn key() -> AnchorKey {
    AnchorKey::from_pkcs8(&AnchorKey::generate_pkcs8().unwrap()).unwrap()
}

/// One key for the whole test binary, so a test can sign again with the key of a log it made.
static KEY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

fn fixed_key() -> AnchorKey {
    AnchorKey::from_pkcs8(KEY.get_or_init(|| AnchorKey::generate_pkcs8().unwrap())).unwrap()
}

fn options(log: &Path, interval: Duration) -> AnchorOptions {
    AnchorOptions {
        node: "n1".into(),
        path: anchors_path(log),
        interval,
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, ls: &[String]) {
    std::fs::write(path, ls.join("\n") + "\n").unwrap();
}

/// Writes `n` records, anchoring after each record whose seq is in `anchor_at`; returns the
/// log's path and the public key (the signing key is [`KEY`]).
async fn anchored_log(dir: &Path, n: u64, anchor_at: &[u64]) -> (PathBuf, AnchorPublicKey) {
    let path = dir.join("audit.jsonl");
    let (log, writer) = AuditLog::open(&path, Default::default()).await.unwrap();
    let key = fixed_key();
    let public = key.public_key();
    // A long interval: only the explicit anchors below (and the one at start, of nothing).
    let anchorer = Anchorer::start(log.clone(), key, options(&path, Duration::from_secs(3600)))
        .await
        .unwrap();
    for i in 1..=n {
        log.submit_durable(rec(i)).await.unwrap();
        if anchor_at.contains(&i) {
            let a = anchorer.anchor_now().await.unwrap().unwrap();
            assert_eq!(a.seq, i);
        }
    }
    drop(anchorer);
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    (path, public)
}

/// Rewrites record `at`'s path and recomputes the chain after it, as a careful forger would,
/// head file included.
fn rewrite_and_rechain(path: &Path, at: usize) {
    let mut out = Vec::new();
    let mut prev = cellgate_audit::ZERO_HASH.to_owned();
    for (i, line) in lines(path).iter().enumerate() {
        let Value::Object(mut map) = serde_json::from_str::<Value>(line).unwrap() else {
            panic!("not an object")
        };
        if i + 1 == at {
            map.insert("path".into(), Value::String("/v1/innocent".into()));
        }
        map.remove("hash");
        map.insert("prev".into(), Value::String(prev.clone()));
        let hash = record_hash(&prev, &canonical_json(&Value::Object(map.clone())));
        map.insert("hash".into(), Value::String(hash.clone()));
        out.push(String::from_utf8(canonical_json(&Value::Object(map))).unwrap());
        prev = hash;
    }
    write_lines(path, &out);
    let head = Head {
        seq: out.len() as u64,
        hash: prev,
    };
    std::fs::write(head_path(path), head.to_json()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anchors_are_written_at_the_interval_only_when_the_head_moved_and_at_finish() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, writer) = AuditLog::open(&path, Default::default()).await.unwrap();
    let key = key();
    let public = key.public_key();
    let anchorer = Anchorer::start(log.clone(), key, options(&path, Duration::from_millis(50)))
        .await
        .unwrap();
    let mut rx = anchorer.subscribe();
    // An empty log is not anchored.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(lines(&anchors_path(&path)).is_empty());
    assert!(anchorer.latest().is_none());

    for i in 1..=5 {
        log.submit_durable(rec(i)).await.unwrap();
    }
    // The timer anchors the durable head, and the subscriber sees it.
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            rx.changed().await.unwrap();
            if let Some(a) = rx.borrow_and_update().clone() {
                if a.seq == 5 {
                    return a;
                }
            }
        }
    })
    .await
    .expect("an anchor of record 5 within 5 s");
    assert_eq!(seen.hash, log.durable_head().hash);
    assert_eq!(seen.node, "n1");
    assert_eq!(seen.key_id, public.key_id());
    assert!(seen.verify(&public));
    // The head does not move: no new anchor however many intervals pass.
    let written = lines(&anchors_path(&path)).len();
    assert!(written >= 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lines(&anchors_path(&path)).len(), written);

    // Plain records, not yet synced; finish flushes them and anchors the final head.
    for i in 6..=9 {
        log.submit(rec(i)).unwrap();
    }
    let last = anchorer.finish().await.unwrap().expect("a final anchor");
    assert_eq!(last.seq, 9);
    assert_eq!(log.durable_head(), last.head());
    // The timer is stopped: more records, no more anchors.
    let after_finish = lines(&anchors_path(&path));
    log.submit_durable(rec(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(lines(&anchors_path(&path)), after_finish);
    let last_line: Value = serde_json::from_str(after_finish.last().unwrap()).unwrap();
    assert_eq!(last_line["seq"], 9);
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();

    let report = verify_anchored(&path, &anchors_path(&path), &public).unwrap();
    assert_eq!(report.log.records, 10);
    assert_eq!(report.last_anchored, 9);
    assert_eq!(report.anchors, after_finish.len() as u64);
}

#[test]
fn the_signature_covers_every_field_and_only_the_key_verifies_it() {
    let k = key();
    let head = Head {
        seq: 7,
        hash: "ab".repeat(32),
    };
    let a = k.sign("node-a", &head, SystemTime::UNIX_EPOCH);
    assert!(a.verify(&k.public_key()));
    assert_eq!(a.time, "1970-01-01T00:00:00.000000000Z");
    // The line is canonical JSON with the six fields.
    let line = String::from_utf8(a.to_line()).unwrap();
    assert!(
        line.starts_with(&format!(
            r#"{{"hash":"{}","key_id":"{}","node":"node-a","seq":7,"sig":""#,
            "ab".repeat(32),
            k.key_id()
        )),
        "{line}"
    );
    assert!(
        line.ends_with("\"time\":\"1970-01-01T00:00:00.000000000Z\"}\n"),
        "{line}"
    );
    // Any change breaks it.
    for tampered in [
        cellgate_audit::Anchor {
            seq: 8,
            ..a.clone()
        },
        cellgate_audit::Anchor {
            hash: "cd".repeat(32),
            ..a.clone()
        },
        cellgate_audit::Anchor {
            node: "node-b".into(),
            ..a.clone()
        },
        cellgate_audit::Anchor {
            time: "1970-01-01T00:00:01Z".into(),
            ..a.clone()
        },
    ] {
        assert!(!tampered.verify(&k.public_key()), "{tampered:?}");
    }
    // Another key does not verify it.
    assert!(!a.verify(&key().public_key()));
}

#[test]
fn keys_load_from_pem_files_and_public_keys_from_jwk_or_pem() {
    let dir = tempfile::tempdir().unwrap();
    let der = AnchorKey::generate_pkcs8().unwrap();
    let k = AnchorKey::from_pkcs8(&der).unwrap();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n");
    std::fs::write(dir.path().join("anchor.key"), pem).unwrap();
    let loaded = AnchorKey::load(&dir.path().join("anchor.key")).unwrap();
    assert_eq!(loaded.key_id(), k.key_id());

    // Public: JWK (what `cellgate keys init` writes) and PEM SPKI (what openssl writes).
    let raw = *k.public_key().raw();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let jwk = format!(
        r#"{{"kty":"OKP","crv":"Ed25519","alg":"EdDSA","kid":"{}","x":"{x}"}}"#,
        k.key_id()
    );
    assert_eq!(AnchorPublicKey::parse(&jwk).unwrap(), k.public_key());
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(&raw);
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    assert_eq!(AnchorPublicKey::parse(&pem).unwrap(), k.public_key());
    // A kid that is not the key's, garbage and a missing file are refused.
    let wrong_kid = jwk.replace(k.key_id(), "0000000000000000");
    assert!(AnchorPublicKey::parse(&wrong_kid)
        .unwrap_err()
        .contains("does not match"));
    assert!(AnchorPublicKey::parse("hello").is_err());
    std::fs::write(dir.path().join("bad.key"), "not a key").unwrap();
    assert!(matches!(
        AnchorKey::load(&dir.path().join("bad.key")),
        Err(AnchorError::Key { .. })
    ));
    let err = AnchorKey::load(&dir.path().join("missing.key")).unwrap_err();
    assert!(err.to_string().contains("missing.key"), "{err}");
}

#[tokio::test]
async fn an_intact_log_agrees_with_its_anchors() {
    let dir = tempfile::tempdir().unwrap();
    let (path, public) = anchored_log(dir.path(), 10, &[3, 6, 8]).await;
    let report = verify_anchored(&path, &anchors_path(&path), &public).unwrap();
    assert_eq!(
        (report.log.records, report.anchors, report.last_anchored),
        (10, 3, 8)
    );
    // Another key: every anchor is refused, naming the first.
    let err = verify_anchored(&path, &anchors_path(&path), &key().public_key()).unwrap_err();
    assert!(
        matches!(
            err,
            AnchorError::WrongKey {
                line: 1,
                seq: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_log_cut_after_export_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, public) = anchored_log(dir.path(), 10, &[4, 8]).await;
    // Cut to 6 records, head file rewritten to match: the log alone looks intact.
    let ls = lines(&path);
    write_lines(&path, &ls[..6]);
    let last: Value = serde_json::from_str(&ls[5]).unwrap();
    let head = Head {
        seq: 6,
        hash: last["hash"].as_str().unwrap().to_owned(),
    };
    std::fs::write(head_path(&path), head.to_json()).unwrap();
    assert_eq!(cellgate_audit::verify_path(&path).unwrap().records, 6);

    let err = verify_anchored(&path, &anchors_path(&path), &public).unwrap_err();
    assert!(
        matches!(
            err,
            AnchorError::Cut {
                anchored: 8,
                records: 6,
                line: 2
            }
        ),
        "{err}"
    );
    assert_eq!(err.label(), "cut");
    assert_eq!(
        err.to_string(),
        "cut: anchor says 8 records, the log has 6 (anchor at line 2; records 7 to 8 are missing)"
    );
}

#[tokio::test]
async fn a_rewritten_record_with_the_chain_recomputed_is_named() {
    // Every record anchored: the rewritten record itself is named.
    let dir = tempfile::tempdir().unwrap();
    let every: Vec<u64> = (1..=10).collect();
    let (path, public) = anchored_log(dir.path(), 10, &every).await;
    rewrite_and_rechain(&path, 5);
    assert_eq!(cellgate_audit::verify_path(&path).unwrap().records, 10);
    let err = verify_anchored(&path, &anchors_path(&path), &public).unwrap_err();
    assert!(
        matches!(
            err,
            AnchorError::Rewritten {
                seq: 5,
                log_line: 5,
                anchor_line: 5,
                agreed: 4
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("record 5 was rewritten"), "{err}");

    // Sparse anchors: the first contradicted anchored record, and the range it proves.
    let dir = tempfile::tempdir().unwrap();
    let (path, public) = anchored_log(dir.path(), 10, &[3, 8]).await;
    rewrite_and_rechain(&path, 5);
    let err = verify_anchored(&path, &anchors_path(&path), &public).unwrap_err();
    assert!(
        matches!(
            err,
            AnchorError::Rewritten {
                seq: 8,
                anchor_line: 2,
                agreed: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("records up to 3 agree with the anchors, so the log was rewritten at a record from 4 to 8"),
        "{err}"
    );
}

#[tokio::test]
async fn a_forged_anchor_is_refused_by_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let (path, public) = anchored_log(dir.path(), 10, &[3, 6, 9]).await;
    // Someone rewrites the log and then the anchor of record 6 to match, keeping the signature.
    rewrite_and_rechain(&path, 5);
    let forged: Value = serde_json::from_str(&lines(&path)[5]).unwrap();
    let mut anchors = lines(&anchors_path(&path));
    let mut a: Value = serde_json::from_str(&anchors[1]).unwrap();
    a["hash"] = forged["hash"].clone();
    anchors[1] = String::from_utf8(canonical_json(&a)).unwrap();
    write_lines(&anchors_path(&path), &anchors);
    let err = verify_anchored(&path, &anchors_path(&path), &public).unwrap_err();
    assert!(
        matches!(
            err,
            AnchorError::BadSignature {
                line: 2,
                seq: 6,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("anchor at line 2 (record 6): bad signature"),
        "{err}"
    );
    // A line that is not an anchor is named too.
    anchors[1] = "{\"seq\":6}".into();
    write_lines(&anchors_path(&path), &anchors);
    let err = verify_anchored(&path, &anchors_path(&path), &public).unwrap_err();
    assert!(
        matches!(err, AnchorError::Malformed { line: 2, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn the_anchorer_refuses_to_extend_anchors_of_a_longer_log() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = anchored_log(dir.path(), 6, &[6]).await;
    // The log is moved aside without its anchors; a new, empty log starts.
    std::fs::rename(&path, dir.path().join("old.jsonl")).unwrap();
    std::fs::remove_file(head_path(&path)).unwrap();
    let (log, _writer) = AuditLog::open(&path, Default::default()).await.unwrap();
    let err = Anchorer::start(log, key(), options(&path, Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert!(matches!(err, AnchorError::Stale { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("its last anchor says the log reached record 6, the log has 0"),
        "{err}"
    );
}

#[tokio::test]
async fn a_torn_last_anchor_is_cut_at_start_and_anchoring_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, public) = anchored_log(dir.path(), 4, &[2, 4]).await;
    let anchors = anchors_path(&path);
    let mut text = std::fs::read_to_string(&anchors).unwrap();
    text.push_str("{\"hash\":\"00");
    std::fs::write(&anchors, text).unwrap();
    // The torn line makes the file unverifiable until the anchorer repairs it.
    assert!(matches!(
        verify_anchored(&path, &anchors, &public),
        Err(AnchorError::Malformed { line: 3, .. })
    ));
    let (log, writer) = AuditLog::open(&path, Default::default()).await.unwrap();
    let anchorer = Anchorer::start(
        log.clone(),
        fixed_key(),
        options(&path, Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let torn = std::fs::read_to_string(dir.path().join("audit.jsonl.anchors.torn")).unwrap();
    assert!(torn.starts_with("{\"hash\":\"00"), "{torn}");
    // Record 4 was anchored already: nothing new until the head moves.
    assert!(anchorer.anchor_now().await.unwrap().is_none());
    log.submit_durable(rec(5)).await.unwrap();
    assert_eq!(anchorer.anchor_now().await.unwrap().unwrap().seq, 5);
    drop(anchorer);
    log.close().await.unwrap();
    writer.await.unwrap().unwrap();
    let report = verify_anchored(&path, &anchors, &public).unwrap();
    assert_eq!((report.anchors, report.last_anchored), (3, 5));
}
