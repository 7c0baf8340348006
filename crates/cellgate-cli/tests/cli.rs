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
