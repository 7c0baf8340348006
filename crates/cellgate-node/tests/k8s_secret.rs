//! Kubernetes Secrets as a credential backend, against kube-rs's mocked API service: each call's
//! method and URI is asserted, and the API answers with Kubernetes' own shapes.

use cellgate_api::manifest::parse_agent_cell;
use cellgate_node::credentials::{Broker, CredentialError, KubeSecrets};
use http::{Request, Response};
use kube::client::Body;

const SECRET: &str = "sk-k8s-0123456789abcdef";

fn cell() -> cellgate_api::model::Cell {
    let y = "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {name: c, namespace: agents}\nspec:\n  capabilities:\n    - name: llm\n      destinations: [{host: api.test}]\n      credential:\n        secret: {name: openai, key: api-key}\n        inject: {header: Authorization, value: \"Bearer {{secret}}\"}\n";
    parse_agent_cell(y).unwrap().to_model().unwrap()
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Serves the scripted answers in order, asserting each request.
fn scenario(
    mut handle: Handle,
    steps: Vec<(&'static str, u16, serde_json::Value)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for (uri, status, body) in steps {
            let (req, send) = handle.next_request().await.expect("a request");
            assert_eq!(req.method(), http::Method::GET);
            assert_eq!(req.uri().to_string(), uri);
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    })
}

fn secret_json(data: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "openai", "namespace": "agents", "uid": "0b0e7c2a-1", "resourceVersion": "42"},
        "type": "Opaque",
        "data": data,
    })
}

fn not_found() -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "secrets \"openai\" not found", "reason": "NotFound",
        "details": {"name": "openai", "kind": "secrets"}, "code": 404,
    })
}

#[tokio::test]
async fn a_secret_of_the_cells_namespace_is_read_injected_and_cached() {
    use base64::Engine as _;
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{SECRET}\n"));
    let server = scenario(
        handle,
        vec![(
            "/api/v1/namespaces/agents/secrets/openai",
            200,
            secret_json(serde_json::json!({"api-key": b64})),
        )],
    );
    let broker = Broker::new(None).with_kube(KubeSecrets::new(client));
    let c = cell();
    for _ in 0..3 {
        let i = broker
            .injection(&c, &c.capabilities[0])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(i.name, "authorization");
        assert_eq!(i.value, format!("Bearer {SECRET}").as_str());
        assert!(i.value.is_sensitive());
    }
    // One API call for three requests (cached); the scenario ends after exactly one.
    server.await.unwrap();
}

#[tokio::test]
async fn missing_secret_or_key_is_closed_and_clear() {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let server = scenario(
        handle,
        vec![
            ("/api/v1/namespaces/agents/secrets/openai", 404, not_found()),
            (
                "/api/v1/namespaces/agents/secrets/openai",
                200,
                secret_json(serde_json::json!({"other": "eA=="})),
            ),
        ],
    );
    let broker = Broker::new(None).with_kube(KubeSecrets::new(client));
    let c = cell();
    let e = broker.injection(&c, &c.capabilities[0]).await.unwrap_err();
    assert!(
        e.to_string().contains("secret agents/openai not found"),
        "{e}"
    );
    let e = broker.injection(&c, &c.capabilities[0]).await.unwrap_err();
    assert!(e.to_string().contains("no key \"api-key\""), "{e}");
    server.await.unwrap();

    // No Kubernetes backend configured: refused, not forwarded.
    let e = Broker::new(None)
        .injection(&c, &c.capabilities[0])
        .await
        .unwrap_err();
    assert!(matches!(e, CredentialError::NoBackend("kubernetes secret")));
}
