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

/// A cell allowing only `GET /allowed/**` on plain.test (the fixture's plain upstream).
fn allowed_only_cell(port: u16) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: paths, namespace: agents}}\nspec:\n  capabilities:\n    - name: allowed\n      destinations: [{{host: plain.test, ports: [{port}]}}]\n      http: {{methods: [GET], paths: [\"/allowed/**\"]}}\n"
    )
}

/// Sends one raw HTTP/1.1 request line + headers on a tagged plain connection of `cell`.
async fn raw_plain(f: &Fixture, cell: &str, request: &str) -> String {
    let mut s = f.connect(f.http.addr.port(), &f.token(cell)).await;
    s.write_all(request.as_bytes()).await.unwrap();
    String::from_utf8_lossy(&read_to_end_timeout(&mut s, Duration::from_secs(5)).await).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_decided_and_forwarded_in_canonical_form() {
    let f = Fixture::start().await;
    let port = f.http.addr.port();
    install_cell(&f, "paths", &allowed_only_cell(port)).await;
    let get = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: plain.test:{port}\r\nConnection: close\r\n\r\n")
    };
    // Each names /secret to an upstream that normalizes: refused, never forwarded.
    for (path, reason) in [
        ("/allowed/../secret", "http_rule_mismatch"),
        ("/allowed/%2e%2e/secret", "http_rule_mismatch"),
        ("/allowed/.%2E/secret", "http_rule_mismatch"),
        ("/allowed/./../secret", "http_rule_mismatch"),
        ("/allowed/..;/secret", "path_dot_segment_parameters"),
        ("/allowed/%2e%2e;/secret", "path_dot_segment_parameters"),
        ("/allowed/..%5csecret", "path_backslash"),
        ("/allowed/%2fsecret", "path_encoded_slash"),
        ("/allowed/%00/x", "path_control_character"),
        ("/allowed/%zz", "path_malformed_escape"),
    ] {
        let r = raw_plain(&f, "paths", &get(path)).await;
        assert_eq!(status_of(&r), 403, "{path}: {r}");
        assert!(r.contains(reason), "{path}: expected {reason}: {r}");
    }
    // A raw backslash, which Windows and lenient upstreams read as `/`.
    let r = raw_plain(&f, "paths", &get("/allowed\\..\\secret")).await;
    assert_eq!(status_of(&r), 403, "{r}");
    assert!(r.contains("path_backslash"), "{r}");
    assert!(f.http.requests().is_empty(), "{:?}", f.http.requests());

    // Allowed requests go upstream in canonical form, the decision's path, query untouched.
    for (path, forwarded) in [
        ("/allowed//x", "/allowed/x"),
        ("/allowed/a/../b?q=%2e%2e", "/allowed/b?q=%2e%2e"),
        ("/allowed/%41%7e", "/allowed/A~"),
        ("/x/../allowed/y", "/allowed/y"),
    ] {
        let r = raw_plain(&f, "paths", &get(path)).await;
        assert_eq!(status_of(&r), 200, "{path}: {r}");
        let seen = f.http.requests();
        assert_eq!(seen.last().unwrap().uri, forwarded, "{path}");
    }
    let rec = f
        .wait_audit(|r| r["cell"] == "paths" && r["reason"] == "path_encoded_slash")
        .await;
    assert_eq!(rec["decision"], "deny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_websocket_upgrades_are_forwarded() {
    let f = Fixture::start().await;
    let port = f.http.addr.port();
    for (upgrade, extra) in [
        ("h2c", "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"),
        ("x-invented", ""),
        ("TLS/1.0", ""),
        ("websocket, h2c", ""),
    ] {
        let r = raw_plain(
            &f,
            "demo",
            &format!("GET /public/x HTTP/1.1\r\nHost: plain.test:{port}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\n{extra}\r\n"),
        )
        .await;
        assert_eq!(status_of(&r), 403, "Upgrade {upgrade}: {r}");
        assert!(r.contains("upgrade_not_allowed"), "{r}");
    }
    assert!(f.http.requests().is_empty());
    // Without Upgrade the same request goes through, with no HTTP2-Settings left on it.
    let r = raw_plain(
        &f,
        "demo",
        &format!("GET /public/x HTTP/1.1\r\nHost: plain.test:{port}\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status_of(&r), 200, "{r}");
    let seen = f.http.requests();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].header("http2-settings").is_none(),
        "{:?}",
        seen[0].headers
    );
}

/// An upstream that answers every request with 101 to a protocol nobody asked for, then
/// records what arrives after.
async fn switching_upstream() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let g = g.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 4096];
                let mut first = true;
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    if first {
                        first = false;
                        let _ = s
                            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x-tunnel\r\n\r\n")
                            .await;
                    } else {
                        g.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                }
            });
        }
    });
    (addr, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_the_agent_did_not_ask_for_is_not_a_tunnel() {
    let (up, after) = switching_upstream().await;
    let f = Fixture::start_with(|c| {
        c.resolve
            .push(cellgate_node::config::parse_resolve("switch.test:*:127.0.0.1").unwrap());
    })
    .await;
    install_cell(
        &f,
        "sw",
        &format!(
            "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: sw, namespace: agents}}\nspec:\n  capabilities:\n    - name: sw\n      destinations: [{{host: switch.test, ports: [{}]}}]\n      http: {{methods: [GET], paths: [\"/ok/**\"]}}\n",
            up.port()
        ),
    )
    .await;
    let mut s = f.connect(up.port(), &f.token("sw")).await;
    s.write_all(
        format!(
            "GET /ok/x HTTP/1.1\r\nHost: switch.test:{}\r\n\r\n",
            up.port()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Whatever the agent sends next must not reach the upstream as raw bytes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = s
        .write_all(b"DELETE /secret HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let r = String::from_utf8_lossy(&read_to_end_timeout(&mut s, Duration::from_secs(3)).await)
        .into_owned();
    assert_eq!(status_of(&r), 502, "{r}");
    assert!(r.contains("upstream_upgrade_refused"), "{r}");
    assert!(
        !String::from_utf8_lossy(&after.lock().unwrap()).contains("DELETE"),
        "bytes after the 101 were relayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolving_into_the_nodes_reach_are_refused() {
    let f = Fixture::start().await;
    let port = f.http.addr.port();
    // `localhost` is resolved by the system resolver (not pinned with --resolve) to loopback.
    let cell = |name: &str, allow: bool| {
        format!(
            "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: {name}, namespace: agents}}\nspec:\n  capabilities:\n    - name: local\n      destinations: [{{host: localhost, ports: [{port}]}}]\n{}",
            if allow { "      allowInternalAddresses: true\n" } else { "" }
        )
    };
    install_cell(&f, "ssrf", &cell("ssrf", false)).await;
    install_cell(&f, "internal", &cell("internal", true)).await;
    let get = format!("GET /x HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n");
    let r = raw_plain(&f, "ssrf", &get).await;
    assert_eq!(status_of(&r), 403, "{r}");
    assert!(r.contains("destination_forbidden"), "{r}");
    assert!(
        f.http.requests().is_empty(),
        "the loopback service was reached"
    );
    let rec = f
        .wait_audit(|r| r["cell"] == "ssrf" && r["reason"] == "destination_forbidden")
        .await;
    assert_eq!(rec["decision"], "deny");
    // The capability that asks for it reaches the same service.
    let r = raw_plain(&f, "internal", &get).await;
    assert_eq!(status_of(&r), 200, "{r}");
    assert_eq!(f.http.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_token_opened_is_closed_when_it_expires() {
    use tokio::io::AsyncReadExt;
    let f = Fixture::start().await;
    // A token valid for one more second (plus the verifier's 5 s leeway).
    let mut claims = f.claims("demo");
    claims.exp = cellgate_node::decide::now_secs() + 1;
    let short = f.sign(&claims);
    let started = std::time::Instant::now();

    // (1) A streamed response (SSE, 3 events 300 ms apart, then the stream would go on if the
    // upstream were slower): opened now on an HTTP/2 connection.
    let tls = {
        let tcp = f.connect(f.https.addr.port(), &short).await;
        let cfg = cellgate_testing::client_config(&f.node_ca_pem, &[b"h2"]);
        let name = rustls_pki_types::ServerName::try_from("api.test".to_string()).unwrap();
        tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap()
    };
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let first = h2
        .send_request(
            http::Request::builder()
                .uri(format!("https://api.test:{}/v1/x", f.https.addr.port()))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(first.status(), 200);

    // (2) A plaintext keep-alive connection, idle.
    let mut idle = f.connect(f.http.addr.port(), &short).await;
    idle.write_all(
        format!(
            "GET /public/a HTTP/1.1\r\nHost: plain.test:{}\r\n\r\n",
            f.http.addr.port()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // Both are closed by the node within a second or two of the expiry (1 s + 5 s leeway).
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection outlived its token");
    let h2_done = tokio::time::timeout(Duration::from_secs(3), conn).await;
    assert!(h2_done.is_ok(), "the HTTP/2 connection outlived its token");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(5),
        "closed before the expiry: {elapsed:?}"
    );
    let rec = f
        .wait_audit(|r| r["reason"] == "token_expired" && r["protocol"] == "http")
        .await;
    assert!(
        rec["reasons"][0]
            .as_str()
            .unwrap()
            .contains("HTTP connection"),
        "{rec}"
    );
    f.wait_audit(|r| r["reason"] == "token_expired" && r["protocol"] == "https")
        .await;
}

fn limited_cell(name: &str, port: u16, limits: &str) -> String {
    format!(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: {name}, namespace: agents}}\nspec:\n  limits: {limits}\n  capabilities:\n    - name: plain\n      destinations: [{{host: plain.test, ports: [{port}]}}]\n      http: {{methods: [GET], paths: [\"/public/**\"]}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cell_cannot_take_every_connection() {
    let f = Fixture::start_with(|c| c.cell_max_connections = 3).await;
    let port = f.http.addr.port();
    install_cell(&f, "two", &limited_cell("two", port, "{connections: 2}")).await;
    let get = format!("GET /public/x HTTP/1.1\r\nHost: plain.test:{port}\r\n\r\n");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = f.connect(port, &f.token("two")).await;
        s.write_all(get.as_bytes()).await.unwrap();
        let mut buf = [0u8; 12];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf)
            .await
            .unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    // The manifest's ceiling (2): the third is closed with nothing forwarded.
    let mut third = f.connect(port, &f.token("two")).await;
    let _ = third.write_all(get.as_bytes()).await;
    assert!(read_to_end_timeout(&mut third, Duration::from_secs(3))
        .await
        .is_empty());
    let rec = f
        .wait_audit(|r| r["cell"] == "two" && r["reason"] == "cell_connection_limit")
        .await;
    assert_eq!(rec["decision"], "deny");
    // Another cell still gets its own slots, up to the node default (3).
    let mut other = Vec::new();
    for _ in 0..3 {
        let mut s = f.connect(port, &f.token("demo")).await;
        s.write_all(get.as_bytes()).await.unwrap();
        let mut buf = [0u8; 12];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf)
            .await
            .unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        other.push(s);
    }
    let mut fourth = f.connect(port, &f.token("demo")).await;
    let _ = fourth.write_all(get.as_bytes()).await;
    assert!(read_to_end_timeout(&mut fourth, Duration::from_secs(3))
        .await
        .is_empty());
    // A slot is given back when its connection closes.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = f.connect(port, &f.token("two")).await;
    again.write_all(get.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut again, &mut buf)
        .await
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cells_request_rate_is_capped_with_429() {
    let f = Fixture::start().await;
    let port = f.http.addr.port();
    install_cell(
        &f,
        "slow",
        &limited_cell("slow", port, "{requestsPerSecond: 5}"),
    )
    .await;
    // 40 requests at once on 40 connections: one second's worth (5) passes, plus what the
    // bucket refills (5 a second) while the burst is served.
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let tcp = f.connect(port, &f.token("slow")).await;
        let req = http::Request::builder()
            .uri("/public/x")
            .header("host", format!("plain.test:{port}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        tasks.push(tokio::spawn(send_h1(tcp, req)));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert_eq!(r.json()["reason"], "cell_rate_limited");
                let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=1).contains(&after), "{after}");
            }
            s => panic!("status {s}: {}", r.body),
        }
    }
    let refilled = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        ok >= 5 && ok <= 5 + refilled,
        "{ok} passed in {:?}",
        started.elapsed()
    );
    assert!(limited >= 40 - 5 - refilled);
    assert_eq!(ok + limited, 40);
    assert_eq!(f.http.requests().len(), ok);
    f.wait_audit(|r| r["cell"] == "slow" && r["reason"] == "cell_rate_limited")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed() {
    let f = Fixture::start_with(|c| c.http_idle_timeout = Duration::from_millis(600)).await;
    let tls = f.tls("api.test", &f.token("demo"), &[b"h2"]).await;
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let r = h2
        .send_request(
            http::Request::builder()
                .uri(format!("https://api.test:{}/v1/x", f.https.addr.port()))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the idle HTTP/2 connection was not closed")
        .unwrap()
        .ok();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_for_names_no_capability_names_live_in_a_small_cache_of_their_own() {
    let f = Fixture::start().await;
    for i in 0..20 {
        let sni = format!("spray-{i}.evil.test");
        let tcp = f.connect(f.https.addr.port(), &f.token("demo")).await;
        let cfg = cellgate_testing::client_config(&f.node_ca_pem, &[b"http/1.1"]);
        let name = rustls_pki_types::ServerName::try_from(sni.clone()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        let req = http::Request::builder()
            .uri("/")
            .header("host", format!("{sni}:{}", f.https.addr.port()))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        // Still a readable refusal over TLS.
        assert_eq!(send_h1(tls, req).await.status, 403);
    }
    let shared = &f.node().shared;
    assert_eq!(
        shared.minter.mints(),
        0,
        "the main cache minted for sprayed names"
    );
    assert_eq!(shared.minter_unnamed.mints(), 20);
    // An allowed name comes from the main cache.
    let r = f.https_get("api.test", "api.test", "/v1/x", "GET").await;
    assert_eq!(r.status, 200);
    assert_eq!(shared.minter.mints(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_is_cut_when_its_token_expires() {
    use http_body_util::BodyExt as _;
    let f = Fixture::start().await;
    let mut claims = f.claims("demo");
    claims.exp = cellgate_node::decide::now_secs() + 1;
    let short = f.sign(&claims);
    let tcp = f.connect(f.https.addr.port(), &short).await;
    let cfg = cellgate_testing::client_config(&f.node_ca_pem, &[b"http/1.1"]);
    let name = rustls_pki_types::ServerName::try_from("api.test".to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            http::Request::builder()
                .uri("/v1/sse-long")
                .header("host", format!("api.test:{}", f.https.addr.port()))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let started = std::time::Instant::now();
    let mut body = resp.into_body();
    let mut events = 0;
    // 60 events 300 ms apart would take 18 s; the token (1 s + 5 s leeway) ends it near 6 s.
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(20), body.frame()).await {
            Ok(Some(Ok(_))) => events += 1,
            Ok(Some(Err(_))) => break "cut",
            Ok(None) => break "complete",
            Err(_) => break "stalled",
        }
    };
    assert_eq!(ended, "cut", "after {events} events");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(4) && elapsed < Duration::from_secs(12),
        "cut after {elapsed:?}"
    );
    assert!(events > 5 && events < 60, "{events} events");
    // Cut by the stream's own timer or by its connection's, whichever fires first: both at the
    // same deadline, each audited as token_expired for this token.
    let jti = claims.jti.clone();
    let rec = f
        .wait_audit(|r| r["reason"] == "token_expired" && r["token_id"] == jti.as_str())
        .await;
    let why = rec["reasons"][0].as_str().unwrap();
    assert!(
        why.contains("response stream") || why.contains("HTTP connection"),
        "{rec}"
    );
}
