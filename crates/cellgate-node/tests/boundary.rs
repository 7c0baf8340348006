//! The boundary's holes, tried as an attacker inside the cell would, through the tagged intake
//! and through ext_authz: each test makes the attempt and asserts what the upstream received.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use cellgate_testing::{read_to_end_timeout, tagged_connect, Upstream};
use common::*;
use tokio::io::AsyncWriteExt;

const SECRET: &str = "sk-internal-0123456789";

/// The address of the internal service of [`address_cell`]: in 127/8, so it is on this machine.
const INTERNAL: &str = "127.0.9.6";

/// A cell whose one capability names an address (`INTERNAL`/32 on `port`) and injects a
/// credential.
fn address_cell(port: u16) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: addr, namespace: agents}}\nspec:\n  capabilities:\n    - name: internal\n      destinations: [{{cidr: {INTERNAL}/32, ports: [{port}]}}]\n      credential:\n        file: {{name: internal}}\n        inject: {{header: Authorization, value: \"Bearer {{{{secret}}}}\"}}\n"
    )
}

struct AddrEnv {
    f: Fixture,
    internal: Upstream,
    _secrets: tempfile::TempDir,
}

/// A node with the address cell; the internal service listens on `INTERNAL` at the same port
/// as the fixture's plain upstream (127.0.0.1, where `evil.test` resolves), so a request that
/// follows its Host instead of the dialled address lands on a recording server.
async fn address_env(tweak: impl FnOnce(&mut cellgate_node::NodeConfig)) -> AddrEnv {
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("internal"), format!("{SECRET}\n")).unwrap();
    let dir = secrets.path().to_path_buf();
    let f = Fixture::start_with(move |c| {
        c.secrets_dir = Some(dir);
        tweak(c);
    })
    .await;
    let port = f.http.addr.port();
    let internal = Upstream::start_on(format!("{INTERNAL}:{port}").parse().unwrap(), None).await;
    install_cell(&f, "addr", &address_cell(port)).await;
    AddrEnv {
        f,
        internal,
        _secrets: secrets,
    }
}

impl AddrEnv {
    fn dialled(&self) -> SocketAddr {
        format!("{INTERNAL}:{}", self.internal.addr.port())
            .parse()
            .unwrap()
    }

    /// Sends `request` (raw HTTP/1.1) on a tagged connection dialled to the internal address.
    async fn raw(&self, request: &str) -> String {
        let mut s = tagged_connect(
            self.f.node().intake_addr,
            AGENT.parse().unwrap(),
            self.dialled(),
            &self.f.token("addr"),
        )
        .await;
        s.write_all(request.as_bytes()).await.unwrap();
        let out = read_to_end_timeout(&mut s, Duration::from_secs(5)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_capability_sends_only_to_the_dialled_address() {
    let env = address_env(|_| {}).await;
    let port = env.internal.addr.port();
    // The legitimate use: the request names the address it dials.
    let ok = env
        .raw(&format!(
            "GET /ok HTTP/1.1\r\nHost: {INTERNAL}:{port}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(status_of(&ok), 200, "{ok}");
    let seen = env.internal.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );

    // The attack: dial the allowed address, name another host (with and without a port, and a
    // name that resolves to the same machine). Nothing may leave, least of all the credential.
    for host in [
        format!("evil.test:{port}"),
        "evil.test".to_string(),
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
    ] {
        let r = env
            .raw(&format!(
                "GET /steal HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            ))
            .await;
        assert_eq!(status_of(&r), 403, "Host {host}: {r}");
        assert!(
            r.contains("no_capability") || r.contains("authority_port_mismatch"),
            "{r}"
        );
    }
    assert!(
        env.f.http.requests().is_empty(),
        "a request followed its Host away from the dialled address: {:?}",
        env.f.http.requests()
    );
    assert_eq!(
        env.internal.requests().len(),
        1,
        "only the legitimate request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_capability_refuses_a_tls_name_for_the_dialled_address() {
    let env = address_env(|_| {}).await;
    // TLS with SNI evil.test to the allowed address: intercepted (the cell has no passthrough),
    // then the request names evil.test, which the address capability does not allow.
    let tcp = tagged_connect(
        env.f.node().intake_addr,
        AGENT.parse().unwrap(),
        env.dialled(),
        &env.f.token("addr"),
    )
    .await;
    let cfg = cellgate_testing::client_config(&env.f.node_ca_pem, &[b"http/1.1"]);
    let name = rustls_pki_types::ServerName::try_from("evil.test".to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    let req = http::Request::builder()
        .uri("/steal")
        .header("host", format!("evil.test:{}", env.internal.addr.port()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let r = send_h1(tls, req).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["reason"], "no_capability");
    assert!(env.f.https.requests().is_empty());
    assert!(env.f.http.requests().is_empty());
    assert!(env.internal.requests().is_empty());
}

/// A cell with an HTTP capability for the internal address (no `protocol: tcp`).
fn http_address_cell(port: u16) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: web, namespace: agents}}\nspec:\n  capabilities:\n    - name: web\n      destinations: [{{cidr: {INTERNAL}/32, ports: [{port}]}}]\n      http: {{methods: [GET], paths: [\"/public/**\"]}}\n"
    )
}

async fn web_env(tweak: impl FnOnce(&mut cellgate_node::NodeConfig)) -> AddrEnv {
    let env = address_env(tweak).await;
    install_cell(&env.f, "web", &http_address_cell(env.internal.addr.port())).await;
    env
}

impl AddrEnv {
    async fn web_conn(&self) -> tokio::net::TcpStream {
        tagged_connect(
            self.f.node().intake_addr,
            AGENT.parse().unwrap(),
            self.dialled(),
            &self.f.token("web"),
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_http_never_become_a_raw_relay() {
    let env = web_env(|_| {}).await;
    // The control: a real HTTP request the rule allows.
    let mut s = env.web_conn().await;
    s.write_all(
        format!("GET /public/x HTTP/1.1\r\nHost: {INTERNAL}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let ok = String::from_utf8_lossy(&read_to_end_timeout(&mut s, Duration::from_secs(5)).await)
        .into_owned();
    assert_eq!(status_of(&ok), 200, "{ok}");
    let connections = env
        .internal
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(connections, 1);

    // What an upstream parser may still take for `DELETE /secret`, but the node's HTTP parser
    // does not: each must be refused, not relayed raw.
    for attack in [
        "\r\nDELETE /secret HTTP/1.1\r\nHost: x\r\n\r\n",
        "delete /secret HTTP/1.1\r\nHost: x\r\n\r\n",
        "PURGE /secret HTTP/1.1\r\nHost: x\r\n\r\n",
        " DELETE /secret HTTP/1.1\r\nHost: x\r\n\r\n",
        "\x00\x01binary",
    ] {
        let mut s = env.web_conn().await;
        s.write_all(attack.as_bytes()).await.unwrap();
        let got = read_to_end_timeout(&mut s, Duration::from_secs(5)).await;
        assert!(
            got.is_empty(),
            "{attack:?} got an answer: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert_eq!(
        env.internal
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a raw relay was opened to the HTTP capability's address"
    );
    let rec = env
        .f
        .wait_audit(|r| r["cell"] == "web" && r["protocol"] == "tcp" && r["decision"] == "deny")
        .await;
    assert_eq!(rec["reason"], "tcp_capability_required", "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_split_first_bytes_are_waited_for_or_refused() {
    let env = web_env(|c| c.first_bytes_timeout = Duration::from_millis(600)).await;
    // A request line split across writes 150 ms apart is still HTTP, decided as such.
    let mut s = env.web_conn().await;
    s.write_all(b"GE").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    s.write_all(
        format!("T /secret HTTP/1.1\r\nHost: {INTERNAL}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let r = String::from_utf8_lossy(&read_to_end_timeout(&mut s, Duration::from_secs(5)).await)
        .into_owned();
    assert_eq!(status_of(&r), 403, "{r}");
    assert!(r.contains("http_rule_mismatch"), "{r}");

    // A prefix that stops arriving is refused when the time limit ends.
    let mut s = env.web_conn().await;
    s.write_all(b"\x16").await.unwrap();
    let got = read_to_end_timeout(&mut s, Duration::from_secs(5)).await;
    assert!(got.is_empty());
    env.f
        .wait_audit(|r| r["cell"] == "web" && r["reason"] == "first_bytes_incomplete")
        .await;

    // Silence past the limit, then a request: by then it is other TCP, refused.
    let mut s = env.web_conn().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _ = s
        .write_all(b"DELETE /secret HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let got = read_to_end_timeout(&mut s, Duration::from_secs(5)).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(
        env.internal
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the internal service"
    );
}

/// A writer that sends its first byte alone, then the rest 200 ms later: a ClientHello split
/// across two TCP segments.
struct SplitFirstWrite<S> {
    inner: S,
    sent_first: bool,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SplitFirstWrite<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SplitFirstWrite<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        if !self.sent_first {
            let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, &data[..1]);
            if let Poll::Ready(Ok(_)) = r {
                self.sent_first = true;
                self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(200))));
            }
            return r;
        }
        if let Some(p) = self.pause.as_mut() {
            if std::future::Future::poll(p.as_mut(), cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_split_across_writes_is_intercepted_and_decided() {
    let f = Fixture::start().await;
    let tcp = f.connect(f.https.addr.port(), &f.token("demo")).await;
    let split = SplitFirstWrite {
        inner: tcp,
        sent_first: false,
        pause: None,
    };
    let cfg = cellgate_testing::client_config(&f.node_ca_pem, &[b"http/1.1"]);
    let name = rustls_pki_types::ServerName::try_from("api.test".to_string()).unwrap();
    // The handshake completes against the node's CA: the node intercepted it.
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, split)
        .await
        .expect("the split ClientHello was intercepted");
    let req = http::Request::builder()
        .method("DELETE")
        .uri("/admin")
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let r = send_h1(tls, req).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(f.https.requests().is_empty());
}
