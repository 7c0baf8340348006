//! The `cellgate` binary as a user runs it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use cellgate_audit::{AuditLog, Decision, Record};

fn cellgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const CELL: &str = "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {name: demo, namespace: agents}\nspec:\n  role: researcher\n  capabilities:\n    - name: web\n      destinations: [{host: example.com}]\n";

#[test]
fn keys_then_token_then_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("keys");
    let o = cellgate(&["keys", "init", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let mode = std::fs::metadata(out.join("signing.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let pubs = cellgate_identity::PublicKey::load_all(&out.join("signing.pub")).unwrap();
    assert!(text(&o).contains(&pubs[0].kid));
    // Refuses to overwrite.
    let again = cellgate(&["keys", "init", "--out", out.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again).contains("already exists"));

    std::fs::write(d.join("cell.yaml"), CELL).unwrap();
    let o = cellgate(&[
        "token",
        "issue",
        "--key",
        out.join("signing.key").to_str().unwrap(),
        "--cell",
        d.join("cell.yaml").to_str().unwrap(),
        "--ttl",
        "10m",
        "--bind",
        "10.1.2.3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let token = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let v = cellgate_identity::Verifier::new(&pubs);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let c = v.verify(&token, now).unwrap();
    assert_eq!(c.cell_uid, "local:agents:demo");
    assert_eq!(c.sub, "agents/demo");
    assert_eq!(c.role.as_deref(), Some("researcher"));
    assert_eq!(c.pod_addr.as_deref(), Some("10.1.2.3"));
    assert_eq!(c.aud, "cellgate-node");
    assert!((c.exp - c.iat - 600).abs() <= 1);
    assert!(matches!(
        v.verify(&token, now + 3600),
        Err(cellgate_identity::TokenError::Expired { .. })
    ));

    // An invalid manifest is refused with its field path.
    std::fs::write(d.join("bad.yaml"), CELL.replace("example.com", "\"\"")).unwrap();
    let o = cellgate(&[
        "token",
        "issue",
        "--key",
        out.join("signing.key").to_str().unwrap(),
        "--cell",
        d.join("bad.yaml").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("spec.capabilities[0].destinations[0].host: empty host"),
        "{}",
        text(&o)
    );
}

#[test]
fn ca_init_writes_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ca");
    let o = cellgate(&["ca", "init", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::metadata(out.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(out.join("ca.crt"))
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    cellgate_tls::ca::Ca::load(&out).unwrap();
}

fn write_log(path: &Path, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (log, writer) = AuditLog::open(path, Default::default()).await.unwrap();
        for i in 0..n {
            let mut r = Record::new(
                "node-a",
                "intake",
                "https",
                if i % 3 == 0 {
                    Decision::Deny
                } else {
                    Decision::Allow
                },
                "test",
            );
            r.cell = Some("demo".into());
            r.path = Some(format!("/v1/item/{i}"));
            log.submit_durable(r).await.unwrap();
        }
        log.close().await.unwrap();
        let _ = writer.await;
    });
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn verify(path: &Path) -> (Option<i32>, String) {
    let o = cellgate(&["audit", "verify", path.to_str().unwrap()]);
    (o.status.code(), text(&o))
}

#[test]
fn audit_verify_names_the_first_bad_record_for_each_kind_of_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    write_log(&log, 10);
    let (code, out) = verify(&log);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.trim(), "10 records intact");
    let original = lines(&log);

    let write = |ls: &[String]| std::fs::write(&log, ls.join("\n") + "\n").unwrap();

    // Modified: record 4's path changed.
    let mut ls = original.clone();
    ls[3] = ls[3].replace("/v1/item/3", "/v1/item/X");
    write(&ls);
    let (code, out) = verify(&log);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("record 4") && out.contains("modified"),
        "{out}"
    );

    // Deleted: record 6 removed.
    let mut ls = original.clone();
    ls.remove(5);
    write(&ls);
    let (code, out) = verify(&log);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("deleted") && out.contains("6"), "{out}");

    // Reordered: records 7 and 8 swapped.
    let mut ls = original.clone();
    ls.swap(6, 7);
    write(&ls);
    let (code, out) = verify(&log);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("reordered"), "{out}");

    // Truncated mid-record.
    let mut text_all = original.join("\n") + "\n";
    text_all.truncate(text_all.len() - 40);
    std::fs::write(&log, &text_all).unwrap();
    let (code, out) = verify(&log);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("truncated") && out.contains("record 10"),
        "{out}"
    );

    // Truncated by whole records: the head anchor still names record 10.
    write(&original[..8]);
    let (code, out) = verify(&log);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("truncated"), "{out}");

    // Restored: intact again.
    write(&original);
    assert_eq!(verify(&log).0, Some(0));
}

/// A log of `n` records from a node whose anchor key is `key` (PEM), anchored after each record
/// in `anchor_at`.
fn write_anchored_log(path: &Path, key: &Path, n: u64, anchor_at: &[u64]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (log, writer) = AuditLog::open(path, Default::default()).await.unwrap();
        let anchorer = cellgate_audit::Anchorer::start(
            log.clone(),
            cellgate_audit::AnchorKey::load(key).unwrap(),
            cellgate_audit::AnchorOptions {
                node: "node-a".into(),
                path: cellgate_audit::anchors_path(path),
                interval: std::time::Duration::from_secs(3600),
            },
        )
        .await
        .unwrap();
        for i in 1..=n {
            let mut r = Record::new("node-a", "intake", "https", Decision::Allow, "test");
            r.path = Some(format!("/v1/item/{i}"));
            log.submit_durable(r).await.unwrap();
            if anchor_at.contains(&i) {
                anchorer.anchor_now().await.unwrap().unwrap();
            }
        }
        drop(anchorer);
        log.close().await.unwrap();
        let _ = writer.await;
    });
}

/// Record `at` rewritten and the chain (and the head file) recomputed after it.
fn rewrite_and_rechain(path: &Path, at: usize) {
    use cellgate_audit::chain::{canonical_json, record_hash};
    let mut out = Vec::new();
    let mut prev = cellgate_audit::ZERO_HASH.to_owned();
    for (i, line) in lines(path).iter().enumerate() {
        let serde_json::Value::Object(mut map) = serde_json::from_str(line).unwrap() else {
            panic!("not an object")
        };
        if i + 1 == at {
            map.insert("decision".into(), "deny".into());
        }
        map.remove("hash");
        map.insert("prev".into(), prev.clone().into());
        let hash = record_hash(&prev, &canonical_json(&map.clone().into()));
        map.insert("hash".into(), hash.clone().into());
        out.push(String::from_utf8(canonical_json(&map.into())).unwrap());
        prev = hash;
    }
    std::fs::write(path, out.join("\n") + "\n").unwrap();
    let head = cellgate_audit::Head {
        seq: out.len() as u64,
        hash: prev,
    };
    std::fs::write(cellgate_audit::head_path(path), head.to_json()).unwrap();
}

#[test]
fn audit_verify_with_anchors_names_the_cut_the_rewrite_and_a_forged_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("anchor-keys");
    let o = cellgate(&["keys", "init", "--out", keys.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let log = dir.path().join("audit.jsonl");
    write_anchored_log(&log, &keys.join("signing.key"), 10, &[3, 6, 9]);
    // The anchors as exported, kept away from the node.
    let exported = dir.path().join("exported.anchors");
    std::fs::copy(cellgate_audit::anchors_path(&log), &exported).unwrap();
    let verify = || {
        let o = cellgate(&[
            "audit",
            "verify",
            log.to_str().unwrap(),
            "--anchors",
            exported.to_str().unwrap(),
            "--anchor-key",
            keys.join("signing.pub").to_str().unwrap(),
        ]);
        (o.status.code(), text(&o))
    };
    let (code, out) = verify();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        out.trim(),
        "10 records intact, 3 anchors agree, last anchored record 9"
    );
    let original = lines(&log);
    let original_head = std::fs::read(cellgate_audit::head_path(&log)).unwrap();
    let restore = || {
        std::fs::write(&log, original.join("\n") + "\n").unwrap();
        std::fs::write(cellgate_audit::head_path(&log), &original_head).unwrap();
    };

    // Cut after export, the head file rewritten to match: the log alone looks intact.
    std::fs::write(&log, original[..7].join("\n") + "\n").unwrap();
    let last: serde_json::Value = serde_json::from_str(&original[6]).unwrap();
    let head = cellgate_audit::Head {
        seq: 7,
        hash: last["hash"].as_str().unwrap().into(),
    };
    std::fs::write(cellgate_audit::head_path(&log), head.to_json()).unwrap();
    assert_eq!(verify_plain(&log), (Some(0), "7 records intact".into()));
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("cut: anchor says 9 records, the log has 7"),
        "{out}"
    );
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    restore();

    // Record 5 rewritten and the chain recomputed: the first contradicted anchor is record 6's,
    // and the anchor of record 3 bounds the rewrite from below.
    rewrite_and_rechain(&log, 5);
    assert_eq!(verify_plain(&log).0, Some(0));
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("record 6 (line 6) is the first record the anchors contradict")
            && out.contains("rewritten at a record from 4 to 6"),
        "{out}"
    );
    restore();

    // A forged anchor (another hash under the old signature) is named by its line.
    let mut anchors = lines(&exported);
    let mut a: serde_json::Value = serde_json::from_str(&anchors[1]).unwrap();
    a["hash"] = "0".repeat(64).into();
    anchors[1] = a.to_string();
    std::fs::write(&exported, anchors.join("\n") + "\n").unwrap();
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("anchor at line 2 (record 6): bad signature"),
        "{out}"
    );

    // The key is required with the anchors.
    let o = cellgate(&[
        "audit",
        "verify",
        log.to_str().unwrap(),
        "--anchors",
        exported.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

fn verify_plain(path: &Path) -> (Option<i32>, String) {
    let (code, out) = verify(path);
    (code, out.trim().to_string())
}

#[test]
fn crd_prints_the_committed_definition() {
    let out = cellgate(&["crd"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/crds/agentcells.cellgate.dev.yaml"),
    )
    .expect("deploy/crds");
    assert_eq!(String::from_utf8_lossy(&out.stdout), committed);
}

#[test]
fn kubectl_plugin_is_the_same_cli_and_says_when_there_is_no_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-kubeconfig");
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-cellgate"))
        .args(["status", "-n", "agents"])
        .env("KUBECONFIG", &missing)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .expect("run kubectl-cellgate");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no cluster"), "{}", text(&out));
    let help = Command::new(env!("CARGO_BIN_EXE_kubectl-cellgate"))
        .arg("--help")
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    for cmd in ["status", "revoke", "suspend", "resume", "audit"] {
        assert!(help.contains(cmd), "{cmd} missing from:\n{help}");
    }
}

#[test]
fn audit_takes_a_cell_or_the_verify_subcommand() {
    // `audit CELL` goes to the cluster (none here: a clear error), `audit verify FILE` stays local.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(["audit", "research", "-n", "agents"])
        .env("KUBECONFIG", dir.path().join("none"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no cluster"), "{}", text(&out));
    let out = cellgate(&[
        "audit",
        "verify",
        dir.path().join("missing.jsonl").to_str().expect("utf-8"),
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("no cluster"), "{}", text(&out));
}
