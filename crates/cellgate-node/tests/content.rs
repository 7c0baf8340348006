//! Request bodies in policy (`inspect`), through a real node over TLS: a policy layer deciding on
//! `input.request.json`, bodies over the bound refused or decided without it, bodies forwarded
//! whole either way; and MCP rules with a request that could be read but not applied.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;

/// A layer that decides on the body: only two models, and no more than 4096 output tokens.
const LLM_LAYER: &str = r#"package cellgate.layers.llm_limits

import rego.v1

deny contains {"reason": "model_not_allowed", "message": sprintf("model %v is not allowed", [input.request.json.model])} if {
	input.request.json
	not input.request.json.model in {"small-model", "medium-model"}
}

deny contains {"reason": "max_tokens_too_high", "message": "max_tokens is capped at 4096"} if {
	input.request.json.max_tokens > 4096
}
"#;

fn cell(port: u16) -> String {
    format!(
        r#"apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {{name: inspector, namespace: agents}}
spec:
  capabilities:
    - name: llm
      destinations: [{{host: api.test, ports: [{port}]}}]
      http: {{methods: [POST], paths: ["/v1/llm/**"]}}
      inspect: {{json: true, maxBytes: 1024}}
    - name: uploads
      destinations: [{{host: api.test, ports: [{port}]}}]
      http: {{methods: [POST], paths: ["/v1/upload/**"]}}
      inspect: {{json: true, maxBytes: 1024, onOversize: skip}}
    - name: tools
      destinations: [{{host: api.test, ports: [{port}]}}]
      http: {{methods: [POST], paths: ["/mcp"]}}
      mcp:
        tools: {{allow: ["search_*"]}}
"#
    )
}

async fn post(f: &Fixture, path: &str, body: String) -> Resp {
    let tls = f
        .tls("api.test", &f.token("inspector"), &[b"http/1.1"])
        .await;
    let req = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body)))
        .unwrap();
    send_h1(tls, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_decides_on_the_body_and_bodies_arrive_whole() {
    let f = Fixture::start().await;
    let version = || {
        f.node()
            .shared
            .policy
            .current()
            .map(|p| p.version().to_string())
    };
    let before = version();
    std::fs::write(f.policies_dir.join("llm_limits.rego"), LLM_LAYER).unwrap();
    install_cell(&f, "inspector", &cell(f.https.addr.port())).await;
    // Requests wait until the layer is in force: one in flight while the policy changes could
    // be cut by the change (what is open is re-decided), which is not what this test is about.
    for _ in 0..200 {
        if version() != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_ne!(version(), before, "the layer was never loaded");
    let bad = serde_json::json!({"model": "huge-model", "max_tokens": 10}).to_string();
    let r = post(&f, "/v1/llm/chat", bad.clone()).await;
    let ready = f.admin_get("/readyz").await;
    assert_eq!(r.status, 403, "{} / readyz: {}", r.body, ready.body);
    assert_eq!(r.json()["reason"], "model_not_allowed", "{}", r.body);
    assert!(r.json()["message"].as_str().unwrap().contains("huge-model"));

    let good = serde_json::json!({"model": "small-model", "max_tokens": 100, "messages": []});
    let r = post(&f, "/v1/llm/chat", good.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = f.https.requests();
    assert_eq!(
        seen.last().unwrap().body,
        good.to_string().as_bytes(),
        "the body arrives as sent"
    );

    let greedy = serde_json::json!({"model": "medium-model", "max_tokens": 100000}).to_string();
    let r = post(&f, "/v1/llm/chat", greedy).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "max_tokens_too_high", "{}", r.body);

    // Over the bound: refused (the default), or decided without the body and sent whole.
    let big = serde_json::json!({"model": "small-model", "pad": "x".repeat(4000)}).to_string();
    let before = f.https.requests().len();
    let r = post(&f, "/v1/llm/chat", big.clone()).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["reason"], "body_too_large");
    assert_eq!(
        f.https.requests().len(),
        before,
        "an oversize body was sent"
    );
    let big_bad = serde_json::json!({"model": "huge-model", "pad": "x".repeat(4000)}).to_string();
    let r = post(&f, "/v1/upload/file", big_bad.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        f.https.requests().last().unwrap().body,
        big_bad.as_bytes(),
        "the skipped body arrives whole: what was read, then the rest"
    );
    // Not JSON: decided without it (the layer's rules need the JSON to refuse).
    let r = post(&f, "/v1/upload/file", "not json".into()).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // MCP: a call the rules refuse is a JSON-RPC error, never sent; a body that is not JSON-RPC
    // is refused outright.
    let before = f.https.requests().len();
    let call = serde_json::json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"delete_all"}});
    let r = post(&f, "/mcp", call.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["id"], 3);
    assert_eq!(r.json()["error"]["data"]["reason"], "mcp_tool_denied");
    let r = post(&f, "/mcp", "[1, 2".into()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["reason"], "mcp_malformed");
    assert_eq!(
        f.https.requests().len(),
        before,
        "a refused MCP call was sent"
    );
    let ok = serde_json::json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"search_code"}});
    let r = post(&f, "/mcp", ok.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(f.https.requests().len(), before + 1);
    let rec = f.wait_audit(|x| x["reason"] == "mcp_tool_denied").await;
    assert!(rec["reasons"].to_string().contains("delete_all"), "{rec}");
}

fn detecting_cell(port: u16) -> String {
    format!(
        r#"apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {{name: inspector, namespace: agents}}
spec:
  capabilities:
    - name: strict
      destinations: [{{host: api.test, ports: [{port}]}}]
      http: {{paths: ["/v1/strict/**"]}}
      inspect: {{json: true}}
      detect:
        secrets: deny
        pii: deny
        patterns: [{{name: employee_id, regex: "EMP-[0-9]{{6}}"}}]
    - name: scrubbed
      destinations: [{{host: api.test, ports: [{port}]}}]
      http: {{paths: ["/v1/scrubbed/**"]}}
      inspect: {{json: true}}
      detect: {{secrets: redact, pii: redact}}
"#
    )
}

const AWS_KEY: &str = "AKIAIOSFODNN7EXAMPLE";
const EMAIL: &str = "ana.lopez@example.org";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_personal_data_are_refused_or_redacted_and_never_recorded() {
    let f = Fixture::start().await;
    install_cell(&f, "inspector", &detecting_cell(f.https.addr.port())).await;
    let before = f.https.requests().len();

    // deny: in the query, in a header, in the body.
    let r = post(&f, &format!("/v1/strict/x?key={AWS_KEY}"), "{}".into()).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["reason"], "secret_detected");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("aws_access_key"),
        "{}",
        r.body
    );
    let body = serde_json::json!({"note": format!("mail {EMAIL}")}).to_string();
    let r = post(&f, "/v1/strict/x", body).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["reason"], "pii_detected");
    assert!(!r.body.contains(EMAIL));
    assert_eq!(
        f.https.requests().len(),
        before,
        "a refused request was sent"
    );
    // A detector of one's own, in a header.
    let tls = f
        .tls("api.test", &f.token("inspector"), &[b"http/1.1"])
        .await;
    let req = http::Request::builder()
        .method("POST")
        .uri("/v1/strict/x")
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .header("x-ticket", "for EMP-004211")
        .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let r = send_h1(tls, req).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["reason"], "pii_detected");
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("detector employee_id found something in header x-ticket"),
        "{message}"
    );
    // Clean: sent.
    let r = post(&f, "/v1/strict/x", r#"{"note":"nothing to see"}"#.into()).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // redact: the upstream receives the request with what was found replaced.
    let body = serde_json::json!({"to": EMAIL, "key": AWS_KEY, "n": 3}).to_string();
    let r = post(&f, &format!("/v1/scrubbed/x?who={EMAIL}"), body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = f.https.requests();
    let last = seen.last().unwrap();
    let sent = String::from_utf8(last.body.clone()).unwrap();
    assert_eq!(
        sent,
        r#"{"key":"[REDACTED:aws_access_key]","n":3,"to":"[REDACTED:email]"}"#
    );
    assert!(!last.uri.contains(EMAIL), "{}", last.uri);
    assert!(
        last.uri.contains("[REDACTED:email]") || last.uri.contains("%5BREDACTED"),
        "{}",
        last.uri
    );
    // In the path, nothing can be redacted: refused.
    let r = post(&f, &format!("/v1/scrubbed/{EMAIL}"), "{}".into()).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["reason"], "pii_detected");

    // The audit log names detectors, never what they found.
    let _ = f.node().shared.audit.flush().await;
    let audit = std::fs::read_to_string(&f.audit).unwrap();
    assert!(
        !audit.contains(AWS_KEY) && !audit.contains(EMAIL),
        "{audit}"
    );
    assert!(audit.contains("redacted email in the body"), "{audit}");
}
