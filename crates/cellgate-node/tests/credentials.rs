//! Credentials injected at the boundary from the file backend: the upstream sees the injected
//! header, the agent's own is gone, a missing secret is a 503, and the secret appears nowhere else.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Empty;

const SECRET: &str = "sk-live-0123456789abcdef";

fn cred_cell(port: u16, file: &str) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: creds, namespace: agents}}\nspec:\n  capabilities:\n    - name: llm\n      destinations: [{{host: api.test, ports: [{port}]}}]\n      http: {{methods: [POST, GET], paths: [\"/v1/**\"]}}\n      credential:\n        file: {{name: {file}}}\n        inject: {{header: Authorization, value: \"Bearer {{{{secret}}}}\"}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_the_credential_the_agent_never_had() {
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("openai"), format!("{SECRET}\n")).unwrap();
    let dir = secrets.path().to_path_buf();
    let f = Fixture::start_with(move |c| c.secrets_dir = Some(dir)).await;
    std::fs::write(
        f.cells_dir.join("creds.yaml"),
        cred_cell(f.https.addr.port(), "openai"),
    )
    .unwrap();
    std::fs::write(
        f.cells_dir.join("nocreds.yaml"),
        cred_cell(f.https.addr.port(), "missing").replace("name: creds", "name: nocreds"),
    )
    .unwrap();
    for _ in 0..50 {
        if f.node().shared.cells.get("local:agents:nocreds").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let tls = f.tls("api.test", &f.token("creds"), &[b"http/1.1"]).await;
    let req = http::Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .header("authorization", "Bearer agent-made-this-up")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = send_h1(tls, req).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = f.https.requests();
    assert_eq!(seen.len(), 1);
    let auths: Vec<&str> = seen[0]
        .headers
        .iter()
        .filter(|(k, _)| k == "authorization")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        auths,
        vec![format!("Bearer {SECRET}").as_str()],
        "exactly the injected credential"
    );
    assert!(
        !r.body.contains(SECRET),
        "the agent must not see the secret in the response"
    );

    // The secret file is missing for another cell: 503, never forwarded without the credential.
    let tls = f.tls("api.test", &f.token("nocreds"), &[b"http/1.1"]).await;
    let req = http::Request::builder()
        .uri("/v1/models")
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = send_h1(tls, req).await;
    assert_eq!(r.status, 503);
    let j = r.json();
    assert_eq!(j["error"], "cellgate_credential_unavailable");
    assert_eq!(j["capability"], "llm");
    assert_eq!(j["reason"], "credential_unavailable");
    assert!(
        !r.body.contains("could not provide") && !r.body.contains("not found"),
        "{j}"
    );
    assert_eq!(
        f.https.requests().len(),
        1,
        "nothing forwarded without its credential"
    );
    let rec = f
        .wait_audit(|r| r["reason"] == "credential_unavailable" && r["cell"] == "nocreds")
        .await;
    // One request, one record: the failure, never an allow before it.
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["request_id"], j["request_id"]);
    assert!(
        rec["reasons"].to_string().contains("could not provide"),
        "the audit record says why: {rec}"
    );
    let _ = f.node().shared.audit.flush().await;
    let rid = j["request_id"].as_str().unwrap();
    let records = std::fs::read_to_string(&f.audit).unwrap();
    assert_eq!(records.matches(rid).count(), 1, "{records}");

    // The secret appears in no audit record and no metric.
    let _ = f.node().shared.audit.flush().await;
    let audit = std::fs::read_to_string(&f.audit).unwrap();
    assert!(!audit.contains(SECRET));
    assert!(!f.admin_get("/metrics").await.body.contains(SECRET));
}
