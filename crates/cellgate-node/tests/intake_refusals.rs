//! Connections the intake refuses: each closes with nothing forwarded, and one audit record names
//! its reason.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cellgate_testing::read_to_end_timeout;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Sends an HTTP request after whatever `open` wrote and asserts the connection is closed with
/// no response, the upstream got no connection, and an audit record has `reason`.
async fn assert_refused(f: &Fixture, mut s: TcpStream, reason: &str) {
    let before = f.http.connections.load(Ordering::SeqCst);
    let _ = s
        .write_all(
            format!(
                "GET /public/x HTTP/1.1\r\nHost: plain.test:{}\r\n\r\n",
                f.http.addr.port()
            )
            .as_bytes(),
        )
        .await;
    let got = read_to_end_timeout(&mut s, Duration::from_secs(7)).await;
    assert!(
        got.is_empty(),
        "{reason}: the agent received {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        f.http.connections.load(Ordering::SeqCst),
        before,
        "{reason}: something reached the upstream"
    );
    let rec = f.wait_audit(|r| r["reason"] == reason).await;
    assert_eq!(rec["decision"], "deny", "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_token_is_refused_with_its_reason() {
    let f = Fixture::start().await;
    let port = f.http.addr.port();
    let now = cellgate_node::decide::now_secs();

    // Bad signature: flip a signature character.
    let good = f.token("demo");
    let (head, sig) = good.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') {
        sig.replacen('A', "B", 1)
    } else {
        format!("A{}", &sig[1..])
    };
    assert_refused(
        &f,
        f.connect(port, &format!("{head}.{flipped}")).await,
        "token_bad_signature",
    )
    .await;

    // Unknown key id: signed by a key the node does not trust.
    let stranger = cellgate_identity::SigningKey::generate().unwrap();
    let t = cellgate_identity::token::issue(&stranger, &f.claims("demo")).unwrap();
    assert_refused(&f, f.connect(port, &t).await, "token_unknown_key").await;

    let mut c = f.claims("demo");
    c.aud = "someone-else".into();
    assert_refused(
        &f,
        f.connect(port, &f.sign(&c)).await,
        "token_wrong_audience",
    )
    .await;

    let mut c = f.claims("demo");
    c.iat = now - 3600;
    c.nbf = now - 3600;
    c.exp = now - 600;
    assert_refused(&f, f.connect(port, &f.sign(&c)).await, "token_expired").await;

    let mut c = f.claims("demo");
    c.nbf = now + 3600;
    assert_refused(
        &f,
        f.connect(port, &f.sign(&c)).await,
        "token_not_yet_valid",
    )
    .await;

    let mut c = f.claims("demo");
    c.cell_uid = "local:agents:ghost".into();
    assert_refused(&f, f.connect(port, &f.sign(&c)).await, "cell_unknown").await;

    // A valid token of this cell presented from another address.
    let mut c = f.claims("demo");
    c.pod_addr = Some("10.9.9.9".into());
    assert_refused(&f, f.connect(port, &f.sign(&c)).await, "source_not_bound").await;

    // Revoked jti.
    let c = f.claims("demo");
    f.node().shared.verifier.revoke(&c.jti);
    assert_refused(&f, f.connect(port, &f.sign(&c)).await, "token_revoked").await;

    let _ = SocketAddr::from(([127, 0, 0, 1], 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_proxy_protocol_is_refused() {
    let f = Fixture::start().await;
    let intake = f.node().intake_addr;
    // No header at all: plain HTTP straight to the intake.
    let s = TcpStream::connect(intake).await.unwrap();
    assert_refused(&f, s, "ppv2_missing").await;
    // A v1 text header.
    let mut s = TcpStream::connect(intake).await.unwrap();
    s.write_all(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 80\r\n")
        .await
        .unwrap();
    assert_refused(&f, s, "ppv2_v1_unsupported").await;
    // A v2 header without the token TLV.
    let mut s = TcpStream::connect(intake).await.unwrap();
    let mut h = cellgate_proxy_protocol::encode(AGENT.parse().unwrap(), f.http.addr, "x").unwrap();
    // Cut the TLV off and fix the length field.
    let addr_len = 12; // IPv4 addresses and ports
    h.truncate(16 + addr_len);
    h[14] = 0;
    h[15] = addr_len as u8;
    s.write_all(&h).await.unwrap();
    assert_refused(&f, s, "ppv2_no_token").await;
    // A truncated header: the connection ends mid-header.
    let mut s = TcpStream::connect(intake).await.unwrap();
    let h = cellgate_proxy_protocol::encode(AGENT.parse().unwrap(), f.http.addr, &f.token("demo"))
        .unwrap();
    s.write_all(&h[..20]).await.unwrap();
    s.shutdown().await.unwrap();
    let got = read_to_end_timeout(&mut s, Duration::from_secs(5)).await;
    assert!(got.is_empty());
    f.wait_audit(|r| r["reason"] == "ppv2_truncated").await;
    // A malformed one: bad version nibble.
    let mut s = TcpStream::connect(intake).await.unwrap();
    let mut h =
        cellgate_proxy_protocol::encode(AGENT.parse().unwrap(), f.http.addr, &f.token("demo"))
            .unwrap();
    h[12] = 0x31;
    s.write_all(&h).await.unwrap();
    assert_refused(&f, s, "ppv2_malformed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_of_another_cell_cannot_use_this_cells_address() {
    let f = Fixture::start().await;
    // The other cell's token is bound to the other pod's address.
    let mut c = f.claims("other");
    c.pod_addr = Some("127.0.0.77".into());
    assert_refused(
        &f,
        f.connect(f.http.addr.port(), &f.sign(&c)).await,
        "source_not_bound",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_claiming_another_source_than_the_peer_is_refused() {
    let f = Fixture::start().await;
    // The real token of the cell, bound to 127.0.0.1, replayed with a header that claims the
    // bound address while the connection comes from 127.0.0.2.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = sock.connect(f.node().intake_addr).await.unwrap();
    let h = cellgate_proxy_protocol::encode(AGENT.parse().unwrap(), f.http.addr, &f.token("demo"))
        .unwrap();
    s.write_all(&h).await.unwrap();
    assert_refused(&f, s, "source_mismatch").await;
}
