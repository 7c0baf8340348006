//! Decision records are schema 2: what a replay needs (port, SNI, allowlisted header values,
//! cell uid and generation, policy packs), and never a credential, a cookie, the identity
//! token or a query value.

mod common;

use bytes::Bytes;
use cellgate_audit::Record;
use cellgate_node::recorded::{input_doc, Request};
use common::*;
use http_body_util::Empty;

#[tokio::test]
async fn records_carry_what_replay_needs_and_no_secret() {
    let f = Fixture::start().await;
    let token = f.token("demo");
    let port = f.https.addr.port();
    let send = |path: &'static str| {
        let token = token.clone();
        let f = &f;
        async move {
            let tls = f.tls("api.test", &token, &[b"http/1.1"]).await;
            let req = http::Request::builder()
                .method("GET")
                .uri(path)
                .header("host", format!("api.test:{port}"))
                .header("authorization", "Bearer SECRET-AUTHZ")
                .header("cookie", "session=SECRET-COOKIE")
                .header("user-agent", "agent/1.0 SECRET-UA")
                .header("accept", "application/json")
                .header("content-type", "text/plain; token=SECRET-CT")
                .body(Empty::<Bytes>::new())
                .unwrap();
            send_h1(tls, req).await
        }
    };
    assert_eq!(send("/v1/items?api_key=SECRET-QUERY").await.status, 200);
    assert_eq!(send("/private?sig=SECRET-QUERY2").await.status, 403);
    let allowed = f
        .wait_audit(|r| r["path"] == "/v1/items" && r["decision"] == "allow")
        .await;
    let denied = f
        .wait_audit(|r| r["path"] == "/private" && r["decision"] == "deny")
        .await;

    let text = std::fs::read_to_string(&f.audit).unwrap();
    for secret in [
        "SECRET-AUTHZ",
        "SECRET-COOKIE",
        "SECRET-UA",
        "SECRET-CT",
        "SECRET-QUERY",
        "Bearer",
        "session=",
        token.as_str(),
    ] {
        assert!(!text.contains(secret), "{secret} is in the audit log");
    }
    for r in [&allowed, &denied] {
        assert_eq!(r["schema"], 2, "{r:#}");
        assert_eq!(r["port"], port, "{r:#}");
        assert_eq!(r["sni"], "api.test");
        assert_eq!(r["headers"]["accept"], "application/json", "{r:#}");
        assert!(r["headers"].get("authorization").is_none());
        let withheld: Vec<&str> = r["withheld"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for w in ["query", "header:user-agent", "header:content-type"] {
            assert!(withheld.contains(&w), "{w} not in {withheld:?}");
        }
        assert!(!withheld
            .iter()
            .any(|w| w.contains("authorization") || w.contains("cookie")));
        assert_eq!(r["cell_uid"], "local:agents:demo");
        assert_eq!(r["role"], "researcher");
        assert!(r["cell_generation"].is_i64(), "{r:#}");
        let packs = r["policy_packs"].as_object().unwrap();
        assert!(!packs.is_empty(), "{r:#}");
        assert!(
            packs
                .values()
                .all(|v| v.as_str().is_some_and(|v| v.len() == 12)),
            "{r:#}"
        );
    }
    // The record rebuilds the input the node decided on.
    let rec: Record = serde_json::from_value(denied).unwrap();
    let input = input_doc(Request::from_record(&rec).unwrap());
    assert_eq!(input.request.host.as_deref(), Some("api.test"));
    assert_eq!(input.request.port, port);
    assert_eq!(input.request.path.as_deref(), Some("/private"));
    assert_eq!(input.request.query.as_deref(), Some(""));
    assert_eq!(input.identity.name, "demo");
    assert_eq!(input.source.address, "127.0.0.1");
    assert_eq!(
        cellgate_audit::verify_path(&f.audit).unwrap().records as usize,
        f.audit_records().len()
    );
}
