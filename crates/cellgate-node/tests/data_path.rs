//! The node's data path over real sockets and real TLS, as an outside observer sees it: what the
//! agent got, what the upstream received, what the audit log says.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_https_request_reaches_upstream_and_is_audited() {
    let f = Fixture::start().await;
    let r = f
        .https_get("api.test", "api.test", "/v1/models?limit=2", "GET")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = f.https.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/v1/models?limit=2");
    assert_eq!(
        seen[0].host(),
        Some(format!("api.test:{}", f.https.addr.port()).as_str())
    );
    let rid = r
        .headers
        .get("x-cellgate-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let rec = f.wait_audit(|r| r["request_id"] == rid.as_str()).await;
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["capability"], "api");
    assert_eq!(rec["cell"], "demo");
    assert_eq!(rec["namespace"], "agents");
    assert_eq!(rec["protocol"], "https");
    assert_eq!(rec["path"], "/v1/models");
    assert_eq!(rec["front_door"], "intake");
    assert!(rec["token_id"].as_str().unwrap().len() > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_https_request_gets_json_403_and_never_reaches_upstream() {
    let f = Fixture::start().await;
    let r = f
        .https_get("api.test", "api.test", "/admin/users", "DELETE")
        .await;
    assert_eq!(r.status, 403);
    let j = r.json();
    assert_eq!(j["error"], "cellgate_denied");
    assert_eq!(j["cell"], "agents/demo");
    assert!(j["reason"].as_str().unwrap().len() > 3, "{j}");
    assert!(j["hint"].as_str().unwrap().len() > 10, "{j}");
    assert!(j["request_id"].is_string());
    assert!(f.https.requests().is_empty(), "upstream must see nothing");
    // The denial is durable before the 403 is sent: it is on disk now, without a flush.
    let on_disk = std::fs::read_to_string(&f.audit).unwrap();
    assert!(
        on_disk.contains(j["request_id"].as_str().unwrap()),
        "deny record not durable before the 403"
    );
    // Unknown host: no capability.
    let r = f.https_get("evil.test", "evil.test", "/", "GET").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "no_capability");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_allowed_and_denied() {
    let f = Fixture::start().await;
    let ok = f.http_get("plain.test", "/public/readme").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let no = f.http_get("plain.test", "/private/x").await;
    assert_eq!(no.status, 403);
    assert_eq!(no.json()["error"], "cellgate_denied");
    let seen = f.http.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/public/readme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_end_to_end() {
    let f = Fixture::start().await;
    let tls = f.tls("api.test", &f.token("demo"), &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = http::Request::builder()
            .uri(format!(
                "https://api.test:{}/v1/h2/{i}",
                f.https.addr.port()
            ))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["version"], "HTTP/2.0", "upstream negotiated h2 too");
    }
    let denied = sender
        .send_request(
            http::Request::builder()
                .uri(format!("https://api.test:{}/nope", f.https.addr.port()))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    assert_eq!(f.https.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_incrementally() {
    let f = Fixture::start().await;
    let tls = f.tls("api.test", &f.token("demo"), &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/sse")
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let start = Instant::now();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            arrivals.push((start.elapsed(), String::from_utf8_lossy(&data).into_owned()));
        }
    }
    let text: String = arrivals.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(text, "data: event 0\n\ndata: event 1\n\ndata: event 2\n\n");
    // The upstream waits 300 ms between events: the first must arrive long before the last.
    let first = arrivals.first().unwrap().0;
    let last = arrivals.last().unwrap().0;
    assert!(arrivals.len() >= 3, "events were coalesced: {arrivals:?}");
    assert!(
        last - first >= Duration::from_millis(450),
        "events were buffered: {arrivals:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_relays_both_ways() {
    let f = Fixture::start().await;
    let mut tls = f.tls("api.test", &f.token("demo"), &[b"http/1.1"]).await;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: api.test:{}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        f.https.addr.port()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in [&b"hello"[..], b"\x81\x05world", &[0u8; 3000]] {
        tls.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_that_disagrees_with_host_is_denied() {
    let f = Fixture::start().await;
    let r = f.https_get("api.test", "evil.test", "/v1/x", "GET").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "sni_host_mismatch");
    // And the other way round: an allowed Host behind a denied SNI.
    let r = f.https_get("other.test", "api.test", "/v1/x", "GET").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "sni_host_mismatch");
    assert!(f.https.requests().is_empty());
    f.wait_audit(|r| r["reason"] == "sni_host_mismatch" && r["decision"] == "deny")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_through_an_allowed_host_is_denied() {
    let f = Fixture::start().await;
    let tls = f.tls("api.test", &f.token("demo"), &[b"http/1.1"]).await;
    let req = http::Request::builder()
        .method("CONNECT")
        .uri("evil.test:443")
        .header("host", "evil.test:443")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = send_h1(tls, req).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "connect_not_allowed");
    assert!(f.https.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_records_but_does_not_deny() {
    let f = Fixture::start().await;
    let r = f
        .https_get("shadow.test", "shadow.test", "/not-ok", "GET")
        .await;
    assert_eq!(r.status, 200, "shadow mode must not deny: {}", r.body);
    let rid = r
        .headers
        .get("x-cellgate-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let rec = f.wait_audit(|r| r["request_id"] == rid.as_str()).await;
    assert_eq!(rec["decision"], "shadow_deny");
    assert_eq!(rec["capability"], "shadowcap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_upstream_certificate_is_a_502_never_a_downgrade() {
    let f = Fixture::start().await;
    // A second upstream on another port whose certificate nobody trusts.
    let bad = cellgate_testing::Upstream::start(Some(
        cellgate_testing::TestPki::untrusted_server_config(&["api.test"]),
    ))
    .await;
    let cell = demo_cell("badcert", bad.addr.port(), 1);
    std::fs::write(f.cells_dir.join("badcert.yaml"), cell).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let tcp = common::tagged_connect_port(&f, bad.addr.port(), "badcert").await;
    let cfg = cellgate_testing::client_config(&f.node_ca_pem, &[b"http/1.1"]);
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls_pki_types::ServerName::try_from("api.test").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let req = http::Request::builder()
        .uri("/v1/x")
        .header("host", format!("api.test:{}", bad.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = send_h1(tls, req).await;
    assert_eq!(r.status, 502, "{}", r.body);
    let j = r.json();
    assert_eq!(j["error"], "cellgate_upstream_error");
    assert!(
        j["reason"].as_str().unwrap().starts_with("upstream_cert"),
        "{j}"
    );
    assert!(
        bad.requests().is_empty(),
        "nothing may be sent over an unverified connection"
    );
    f.wait_audit(|r| {
        r["decision"] == "error"
            && r["reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("upstream_cert")
    })
    .await;
}
