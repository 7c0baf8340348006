//! Governance the node does not enforce yet fails closed: a request a budget or an approval
//! would govern is refused with `governance_unavailable` (audited, durable before the answer) on
//! both front doors, never forwarded unmetered or unapproved.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Empty;

async fn get(f: &Fixture, cell: &str, path: &str) -> Resp {
    let tls = f.tls("api.test", &f.token(cell), &[b"http/1.1"]).await;
    let req = http::Request::builder()
        .uri(path)
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    send_h1(tls, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_and_budget_fail_closed_on_the_intake() {
    let f = Fixture::start().await;
    let port = f.https.addr.port();
    install_cell(&f, "gov", &governed_cell("gov", port, false)).await;
    install_cell(&f, "govcell", &governed_cell("govcell", port, true)).await;

    // The control: a capability with neither reaches the upstream.
    let ok = get(&f, "gov", "/v1/free/x").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(f.https.requests().len(), 1);

    for (cell, path, cap, why) in [
        ("gov", "/v1/approve/x", "approved", "requires approval"),
        ("gov", "/v1/budget/x", "budgeted", "has a budget"),
        ("gov", "/v1/shadow/x", "shadowed", "requires approval"),
        ("govcell", "/v1/free/x", "free", "spec.budget"),
    ] {
        let r = get(&f, cell, path).await;
        assert_eq!(r.status, 403, "{cell} {path}: {}", r.body);
        let j = r.json();
        assert_eq!(j["reason"], "governance_unavailable", "{j}");
        assert_eq!(j["capability"], cap, "{j}");
        assert!(j["message"].as_str().unwrap().contains(why), "{j}");
        // Durable before the 403: on disk without a flush.
        let rid = j["request_id"].as_str().unwrap().to_string();
        let on_disk = std::fs::read_to_string(&f.audit).unwrap();
        assert!(on_disk.contains(&rid), "denial not durable before the 403");
        let rec = f.wait_audit(|r| r["request_id"] == rid.as_str()).await;
        assert_eq!(rec["decision"], "deny");
        assert_eq!(rec["reason"], "governance_unavailable");
    }
    assert_eq!(
        f.https.requests().len(),
        1,
        "nothing governed reached the upstream"
    );
}
