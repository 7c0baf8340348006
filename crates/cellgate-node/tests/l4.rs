//! Non-HTTP traffic: L4 decisions on address and port (other TCP) and on SNI and port (TLS
//! passthrough), relays re-checked and closed when revoked, and the node's resource bounds.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn l4_cell(echo_port: u16, https_port: u16) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: l4, namespace: agents}}\nspec:\n  capabilities:\n    - name: db\n      protocol: tcp\n      destinations: [{{cidr: 127.0.0.1/32, ports: [{echo_port}]}}]\n    - name: tls-pass\n      tls: passthrough\n      destinations: [{{host: api.test, ports: [{https_port}]}}]\n"
    )
}

async fn until(mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!("condition not met");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_to_an_allowed_address_is_relayed_and_closed_when_revoked() {
    let f = Fixture::start().await;
    let echo = echo_server().await;
    std::fs::write(
        f.cells_dir.join("l4.yaml"),
        l4_cell(echo.port(), f.https.addr.port()),
    )
    .unwrap();
    until(|| f.node().shared.cells.get("local:agents:l4").is_some()).await;
    let mut s = f.connect(echo.port(), &f.token("l4")).await;
    // A protocol where the client speaks first with non-HTTP bytes.
    s.write_all(b"\x00\x01binary-hello").await.unwrap();
    let mut back = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"\x00\x01binary-hello");
    f.wait_audit(|r| r["protocol"] == "tcp" && r["decision"] == "allow" && r["capability"] == "db")
        .await;

    // Revoke the capability: the open relay is closed within a second, audited as revoked.
    std::fs::write(f.cells_dir.join("l4.yaml"), l4_cell(1, f.https.addr.port())).unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the relay was not closed after revocation");
    f.wait_audit(|r| r["reason"] == "revoked" && r["protocol"] == "tcp")
        .await;

    // A TCP port no capability names: closed with nothing relayed.
    let mut s = f.connect(echo.port(), &f.token("l4")).await;
    s.write_all(b"\x00\x01again").await.unwrap();
    let got = cellgate_testing::read_to_end_timeout(&mut s, Duration::from_secs(3)).await;
    assert!(got.is_empty());
    f.wait_audit(|r| r["protocol"] == "tcp" && r["decision"] == "deny")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_is_decided_on_sni_and_never_decrypted() {
    let f = Fixture::start().await;
    std::fs::write(f.cells_dir.join("l4.yaml"), l4_cell(1, f.https.addr.port())).unwrap();
    until(|| f.node().shared.cells.get("local:agents:l4").is_some()).await;
    // The client trusts only the UPSTREAM's CA: if the node intercepted, the handshake would fail.
    let tcp = f.connect(f.https.addr.port(), &f.token("l4")).await;
    let cfg = cellgate_testing::client_config(&f.pki.ca_pem(), &[b"http/1.1"]);
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls_pki_types::ServerName::try_from("api.test").unwrap(),
            tcp,
        )
        .await
        .expect("end-to-end TLS with the upstream's own certificate");
    let req = http::Request::builder()
        .uri("/anything")
        .header("host", "api.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let r = send_h1(tls, req).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        f.node().shared.minter.mints(),
        0,
        "passthrough must not mint a leaf"
    );
    f.wait_audit(|r| {
        r["protocol"] == "tls" && r["decision"] == "allow" && r["capability"] == "tls-pass"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_are_refused() {
    let f = Fixture::start().await;
    let mut s = f.connect(f.http.addr.port(), &f.token("demo")).await;
    let big = "x".repeat(128 * 1024);
    let req = format!(
        "GET /public/a HTTP/1.1\r\nHost: plain.test:{}\r\nX-Big: {big}\r\n\r\n",
        f.http.addr.port()
    );
    let _ = s.write_all(req.as_bytes()).await;
    let got = cellgate_testing::read_to_end_timeout(&mut s, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );
    assert!(f.http.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_shapes_are_refused() {
    let f = Fixture::start().await;
    // Content-Length and Transfer-Encoding together, with a smuggled second request in the body.
    let port = f.http.addr.port();
    let mut s = f.connect(port, &f.token("demo")).await;
    let req = format!(
        "GET /public/a HTTP/1.1\r\nHost: plain.test:{port}\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /private/x HTTP/1.1\r\nHost: plain.test\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let _ = cellgate_testing::read_to_end_timeout(&mut s, Duration::from_secs(3)).await;
    assert!(
        f.http.requests().iter().all(|r| r.uri != "/private/x"),
        "a smuggled request reached the upstream: {:?}",
        f.http.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_is_enforced() {
    let f = Fixture::start_with(|c| c.max_connections = 2).await;
    let _a = f.connect(f.http.addr.port(), &f.token("demo")).await;
    let _b = f.connect(f.http.addr.port(), &f.token("demo")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = f.connect(f.http.addr.port(), &f.token("demo")).await;
    let _ = c
        .write_all(b"GET /public/a HTTP/1.1\r\nHost: plain.test\r\n\r\n")
        .await;
    let got = cellgate_testing::read_to_end_timeout(&mut c, Duration::from_secs(3)).await;
    assert!(
        got.is_empty(),
        "over the limit, the connection must be closed"
    );
    let m = f.admin_get("/metrics").await.body;
    assert!(
        m.contains("cellgate_connections_total{outcome=\"over_limit\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_relays_are_closed() {
    let f = Fixture::start_with(|c| c.tunnel_idle_timeout = Duration::from_millis(400)).await;
    let echo = echo_server().await;
    std::fs::write(
        f.cells_dir.join("l4.yaml"),
        l4_cell(echo.port(), f.https.addr.port()),
    )
    .unwrap();
    until(|| f.node().shared.cells.get("local:agents:l4").is_some()).await;
    let mut s = f.connect(echo.port(), &f.token("l4")).await;
    s.write_all(b"\x00ping").await.unwrap();
    let mut back = [0u8; 5];
    s.read_exact(&mut back).await.unwrap();
    // Busy relays stay open past the limit...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(b"\x00ping").await.unwrap();
        s.read_exact(&mut back).await.unwrap();
    }
    // ...an idle one is closed.
    let start = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut back))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "closed too early: {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_relay_is_closed_when_its_token_expires() {
    let f = Fixture::start().await;
    let echo = echo_server().await;
    std::fs::write(
        f.cells_dir.join("l4.yaml"),
        l4_cell(echo.port(), f.https.addr.port()),
    )
    .unwrap();
    until(|| f.node().shared.cells.get("local:agents:l4").is_some()).await;
    let mut claims = f.claims("l4");
    claims.exp = cellgate_node::decide::now_secs() + 1;
    let started = std::time::Instant::now();
    let mut s = f.connect(echo.port(), &f.sign(&claims)).await;
    let mut back = [0u8; 5];
    // Traffic keeps flowing (no idle timeout applies) until the token's expiry plus leeway.
    let closed_after = loop {
        if s.write_all(b"\x00ping").await.is_err() {
            break started.elapsed();
        }
        match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back)).await {
            Ok(Ok(_)) => {}
            _ => break started.elapsed(),
        }
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "the relay outlived its token"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        closed_after >= Duration::from_secs(5),
        "closed early: {closed_after:?}"
    );
    let rec = f
        .wait_audit(|r| r["reason"] == "token_expired" && r["protocol"] == "tcp")
        .await;
    assert_eq!(rec["decision"], "deny");
    assert!(
        rec["reasons"][0]
            .as_str()
            .unwrap()
            .contains("tcp connection"),
        "{rec}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_to_a_name_resolving_to_loopback_is_refused() {
    let f = Fixture::start().await;
    // `localhost` is resolved by the system (not pinned): loopback, so refused without
    // `allowInternalAddresses`; the agent's connection is closed with nothing relayed.
    let port = f.https.addr.port();
    let cell = format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: pt, namespace: agents}}\nspec:\n  capabilities:\n    - name: pass\n      tls: passthrough\n      destinations: [{{host: localhost, ports: [{port}]}}]\n"
    );
    std::fs::write(f.cells_dir.join("pt.yaml"), cell).unwrap();
    until(|| f.node().shared.cells.get("local:agents:pt").is_some()).await;
    let tcp = f.connect(port, &f.token("pt")).await;
    let cfg = cellgate_testing::client_config(&f.pki.ca_pem(), &[b"http/1.1"]);
    let r = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await;
    assert!(r.is_err(), "the handshake reached the loopback upstream");
    assert_eq!(
        f.https
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let rec = f
        .wait_audit(|r| r["cell"] == "pt" && r["reason"] == "destination_forbidden")
        .await;
    assert_eq!(rec["decision"], "deny");
}
