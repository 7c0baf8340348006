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

/// A cell with two capabilities on two hosts: `llm` injects the secret toward api.test, `other`
/// (no credential) reaches plain.test.
fn two_caps(https_port: u16, http_port: u16) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: creds, namespace: agents}}\nspec:\n  capabilities:\n    - name: llm\n      destinations: [{{host: api.test, ports: [{https_port}]}}]\n      credential:\n        file: {{name: openai}}\n        inject: {{header: Authorization, value: \"Bearer {{{{secret}}}}\"}}\n    - name: other\n      destinations: [{{host: plain.test, ports: [{http_port}]}}]\n"
    )
}

async fn get(f: &Fixture, path: &str, extra: Option<(&str, &str)>) -> Resp {
    let tls = f.tls("api.test", &f.token("creds"), &[b"http/1.1"]).await;
    let mut req = http::Request::builder()
        .uri(path)
        .header("host", format!("api.test:{}", f.https.addr.port()));
    if let Some((k, v)) = extra {
        req = req.header(k, v);
    }
    send_h1(tls, req.body(Empty::<Bytes>::new()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_the_upstream_sends_back_is_masked_and_never_carried_elsewhere() {
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("openai"), format!("{SECRET}\n")).unwrap();
    let dir = secrets.path().to_path_buf();
    let f = Fixture::start_with(move |c| c.secrets_dir = Some(dir)).await;
    install_cell(
        &f,
        "creds",
        &two_caps(f.https.addr.port(), f.http.addr.port()),
    )
    .await;

    // Echoed in a header and the JSON body: masked, same length, nothing else changed.
    let r = get(&f, "/v1/echo", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains(SECRET), "{}", r.body);
    let j = r.json();
    // The whole header value is one of the masked forms.
    let masked = "*".repeat("Bearer ".len() + SECRET.len());
    assert_eq!(j["you_sent"], masked.as_str(), "{j}");
    let echoed = r.headers["x-echo-authorization"].to_str().unwrap();
    assert!(
        !echoed.contains(SECRET) && echoed.len() == masked.len(),
        "{echoed}"
    );
    // Echoed in an SSE stream, three bytes a chunk: masked across the chunks.
    let r = get(&f, "/v1/echo-sse", None).await;
    assert_eq!(r.status, 200);
    assert!(!r.body.contains(SECRET), "{}", r.body);
    assert!(
        r.body.starts_with("data: ") && r.body.ends_with("\n\n"),
        "{:?}",
        r.body
    );
    assert_eq!(r.body.len(), "data: Bearer ".len() + SECRET.len() + 2);
    let rec = f.wait_audit(|x| x["reason"] == "secret_scrubbed").await;
    assert_eq!(rec["decision"], "control");
    assert_eq!(rec["capability"], "llm");
    assert!(!rec.to_string().contains(SECRET));

    // The secret, once injected, is refused toward any other capability's destination.
    let before = f.http.requests().len();
    let tcp = tagged_connect_port(&f, f.http.addr.port(), "creds").await;
    let req = http::Request::builder()
        .uri(format!("/collect?k={SECRET}"))
        .header("host", format!("plain.test:{}", f.http.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = send_h1(tcp, req).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["reason"], "credential_exfiltration");
    assert!(!r.body.contains(SECRET));
    let tcp = tagged_connect_port(&f, f.http.addr.port(), "creds").await;
    let req = http::Request::builder()
        .uri("/collect")
        .header("host", format!("plain.test:{}", f.http.addr.port()))
        .header("x-note", format!("key {SECRET} end"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = send_h1(tcp, req).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["reason"], "credential_exfiltration");
    // Without it, the same destination is fine.
    let tcp = tagged_connect_port(&f, f.http.addr.port(), "creds").await;
    let req = http::Request::builder()
        .uri("/collect?k=nothing")
        .header("host", format!("plain.test:{}", f.http.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(send_h1(tcp, req).await.status, 200);
    assert_eq!(
        f.http.requests().len(),
        before + 1,
        "only the request without the secret arrived"
    );
    let rec = f
        .wait_audit(|x| x["reason"] == "credential_exfiltration")
        .await;
    assert!(!rec.to_string().contains(SECRET), "{rec}");
}
