//! No leak anywhere: a run that injects Vault secrets (KV v2 and a leased dynamic secret, with
//! Kubernetes auth) and fails once, with every log at TRACE level captured; then the logs, the
//! audit file, /metrics, the agent's responses and the node's debug output are searched for the
//! secrets, the service-account JWT and the Vault token. None may appear.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cellgate_node::credentials::vault_contract::{Fault, VaultContract};
use cellgate_node::credentials::{VaultAuth, VaultConfig};
use common::*;
use http_body_util::Empty;

const KV_SECRET: &str = "kvsecret-7f3a9c1e55d04b2a";
const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.jwt-7c0ffee0c0ffee.sig";

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn cell(name: &str, port: u16, path: &str, field: &str, inject: &str) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: {name}, namespace: agents}}\nspec:\n  capabilities:\n    - name: gh\n      destinations: [{{host: api.test, ports: [{port}]}}]\n      http: {{methods: [GET, POST], paths: [\"/v1/**\"]}}\n      credential:\n        vault: {{path: {path}, field: {field}}}\n        inject: {inject}\n"
    )
}

async fn call(f: &Fixture, cell: &str, out: &mut String) -> u16 {
    let tls = f.tls("api.test", &f.token(cell), &[b"http/1.1"]).await;
    let req = http::Request::builder()
        .method("POST")
        .uri("/v1/echo")
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .header("authorization", "Bearer agent-made-this-up")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = send_h1(tls, req).await;
    out.push_str(&format!("{:?}\n{}\n", r.headers, r.body));
    r.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_audit_metrics_responses_or_debug_output() {
    let logs = Buf::default();
    let w = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_ansi(false)
        .with_writer(move || w.clone())
        .init();

    let vault = VaultContract::start().await;
    vault.put_kv("secret", "github", serde_json::json!({"token": KV_SECRET}));
    vault.add_dynamic("database/creds/app", "password", "dynpw-9d8e7f", 2, true);
    vault.allow_login("cellgate-node", JWT);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwt"), JWT).unwrap();
    let jwt_file = dir.path().join("jwt");
    let url = vault.url();
    let f = Fixture::start_with(move |c| {
        c.credentials.vault = Some(VaultConfig {
            addr: url,
            auth: VaultAuth::Kubernetes {
                role: "cellgate-node".into(),
                jwt_file,
                mount: "kubernetes".into(),
            },
        });
        c.credentials.timeout = Duration::from_millis(300);
    })
    .await;
    let port = f.https.addr.port();
    for (name, yaml) in [
        (
            "kv",
            cell(
                "kv",
                port,
                "secret/data/github",
                "token",
                "{header: Authorization, value: \"Bearer {{secret}}\"}",
            ),
        ),
        (
            "db",
            cell(
                "db",
                port,
                "database/creds/app",
                "password",
                "{basicAuth: {username: app}}",
            ),
        ),
    ] {
        std::fs::write(f.cells_dir.join(format!("{name}.yaml")), yaml).unwrap();
    }
    for _ in 0..100 {
        if f.node().shared.cells.get("local:agents:db").is_some()
            && f.node().shared.cells.get("local:agents:kv").is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let mut agent_saw = String::new();
    assert_eq!(call(&f, "kv", &mut agent_saw).await, 200);
    assert_eq!(call(&f, "db", &mut agent_saw).await, 200);
    // Renewal path.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(call(&f, "db", &mut agent_saw).await, 200);
    // Failure path, then recovery.
    vault.set_fault(Fault::Slow(Duration::from_secs(1)));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let _ = call(&f, "db", &mut agent_saw).await;
    vault.set_fault(Fault::Refusing);
    std::fs::write(
        f.cells_dir.join("kv2.yaml"),
        cell(
            "kv2",
            port,
            "secret/data/github",
            "token",
            "{header: X-Api-Key, value: \"{{secret}}\"}",
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(call(&f, "kv2", &mut agent_saw).await, 503);
    vault.set_fault(Fault::None);
    assert_eq!(call(&f, "kv2", &mut agent_saw).await, 200);

    // What the upstream got proves the secrets were real and injected.
    let upstream: String = f
        .https
        .requests()
        .iter()
        .map(|r| format!("{:?}", r.headers))
        .collect();
    assert!(upstream.contains(KV_SECRET), "the KV secret was injected");
    assert!(
        vault
            .calls()
            .iter()
            .any(|c| c.path == "/v1/sys/leases/renew"),
        "the renewal path ran"
    );
    let tokens: Vec<String> = vault
        .calls()
        .iter()
        .filter_map(|c| c.token.clone())
        .collect();
    assert!(!tokens.is_empty());

    // Everything the run produced.
    let _ = f.node().shared.audit.flush().await;
    let audit = std::fs::read_to_string(&f.audit).unwrap();
    let metrics = f.admin_get("/metrics").await.body;
    let debug = format!("{:?}", f.node().shared);
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("vault lease renewed"),
        "trace logs were captured"
    );
    assert!(logs.contains("TRACE"), "trace logs were captured");
    let mut needles = vec![
        KV_SECRET.to_string(),
        "dynpw-9d8e7f".to_string(),
        JWT.to_string(),
    ];
    needles.extend(tokens.into_iter().filter(|t| t != &vault.root_token));
    for needle in &needles {
        for (what, text) in [
            ("logs", &logs),
            ("audit", &audit),
            ("metrics", &metrics),
            ("agent responses", &agent_saw),
            ("debug output", &debug),
        ] {
            assert!(
                !text.contains(needle.as_str()),
                "{what} contain a secret ({} chars)",
                needle.len()
            );
        }
    }
}
