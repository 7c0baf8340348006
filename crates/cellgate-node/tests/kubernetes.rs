//! Kubernetes mode over kube-rs's mocked API service: a real node (real sockets, real upstreams)
//! whose cells, pod addresses and revocations come only from watch events the test sends.
//! Each scenario asserts the API calls the node makes (list and watch URIs with their
//! selectors, the status server-side apply) and what the data path does after each event.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellgate_identity::{Claims, SigningKey};
use cellgate_node::kubernetes::contract::{agent_cell, cell_pod, revocations, ApiServer, Watched};
use cellgate_node::{NodeConfig, NodeHandle};
use common::{send_h1, Resp};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NODE: &str = "node-a";
const NS: &str = "agents";
const UID: &str = "8d0e2c9a-demo";
const CONTROL_NS: &str = "cellgate-system";

/// Plain HTTP upstream: `/stream` sends a chunk every 50 ms until the client goes away;
/// anything else answers 200.
async fn http_upstream() -> SocketAddr {
    use hyper::service::service_fn;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let body = if req.uri().path() == "/stream" {
                        let chunks = futures_util::stream::unfold(0u64, |i| async move {
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Some((
                                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                    Bytes::from(format!("data: {i}\n\n")),
                                )),
                                i + 1,
                            ))
                        });
                        http_body_util::StreamBody::new(chunks).boxed()
                    } else {
                        http_body_util::Full::new(Bytes::from_static(b"ok\n"))
                            .map_err(|never| match never {})
                            .boxed()
                    };
                    Ok::<_, std::convert::Infallible>(http::Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn echo_server() -> SocketAddr {
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

struct Kube {
    _dir: tempfile::TempDir,
    key: SigningKey,
    node: NodeHandle,
    api: ApiServer,
    audit: std::path::PathBuf,
    http: SocketAddr,
    echo: SocketAddr,
}

/// The cell's spec: `plain` (GET /public/** and /stream on plain.test) and `db` (TCP to the
/// echo server), minus the capabilities named in `without`.
fn spec(http_port: u16, echo_port: u16, without: &[&str], suspended: bool) -> serde_json::Value {
    let caps: Vec<serde_json::Value> = [
        serde_json::json!({"name": "plain", "destinations": [{"host": "plain.test", "ports": [http_port]}],
                           "http": {"methods": ["GET"], "paths": ["/public/**", "/stream"]}}),
        serde_json::json!({"name": "db", "protocol": "tcp", "destinations": [{"cidr": "127.0.0.1/32", "ports": [echo_port]}]}),
    ]
    .into_iter()
    .filter(|c| !without.contains(&c["name"].as_str().unwrap()))
    .collect();
    serde_json::json!({"role": "researcher", "suspended": suspended, "capabilities": caps})
}

impl Kube {
    /// A node in Kubernetes mode over the scripted API; the cell `demo` and its pod (at
    /// 127.0.0.1) are in the first lists when `listed`.
    async fn start(listed: bool) -> Self {
        Self::start_with(listed, true).await
    }

    /// `admin_token`: whether the node gets `--admin-token-file`.
    async fn start_with(listed: bool, admin_token: bool) -> Self {
        Self::start_setup(listed, admin_token, |_| {}).await
    }

    /// As [`Kube::start_with`], with `setup` filling the API server before the node starts.
    async fn start_setup(listed: bool, admin_token: bool, setup: impl FnOnce(&ApiServer)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        key.write_pair(&dir.path().join("keys")).unwrap();
        let http = http_upstream().await;
        let echo = echo_server().await;
        let (client, api) = ApiServer::start();
        if listed {
            api.set_list(
                Watched::AgentCells,
                vec![agent_cell(
                    NS,
                    "demo",
                    UID,
                    1,
                    spec(http.port(), echo.port(), &[], false),
                )],
            );
            api.set_list(
                Watched::Pods,
                vec![cell_pod(NS, "demo", UID, NODE, "127.0.0.1", "Running")],
            );
        }
        setup(&api);
        let audit = dir.path().join("audit.jsonl");
        let mut config = NodeConfig::defaults();
        config.kubernetes = true;
        config.node_name = NODE.into();
        config.control_namespace = CONTROL_NS.into();
        config.trust = vec![dir.path().join("keys/signing.pub")];
        config.audit = audit.clone();
        config.drain = Duration::from_secs(1);
        if admin_token {
            std::fs::write(dir.path().join("admin-token"), format!("{ADMIN_TOKEN}\n")).unwrap();
            config.admin_token_file = Some(dir.path().join("admin-token"));
        }
        config
            .resolve
            .push(cellgate_node::config::parse_resolve("plain.test:*:127.0.0.1").unwrap());
        let node = cellgate_node::run_with(config, Some(client)).await.unwrap();
        for w in [Watched::AgentCells, Watched::Pods, Watched::ConfigMaps] {
            api.watch_opened(w).await;
        }
        Self {
            _dir: dir,
            key,
            node,
            api,
            audit,
            http,
            echo,
        }
    }

    fn claims(&self) -> Claims {
        // As the operator mints them: not bound to an address.
        Claims::for_cell(
            "cellgate-operator",
            UID,
            NS,
            "demo",
            Some("researcher"),
            cellgate_node::decide::now_secs(),
            600,
            None,
        )
    }

    fn token(&self) -> String {
        cellgate_identity::token::issue(&self.key, &self.claims()).unwrap()
    }

    fn sign(&self, c: &Claims) -> String {
        cellgate_identity::token::issue(&self.key, c).unwrap()
    }

    fn send_cell(&self, type_: &str, generation: i64, without: &[&str], suspended: bool) {
        let obj = agent_cell(
            NS,
            "demo",
            UID,
            generation,
            spec(self.http.port(), self.echo.port(), without, suspended),
        );
        assert!(
            self.api.send(Watched::AgentCells, type_, obj),
            "no open agentcell watch"
        );
    }

    async fn connect_from(&self, source: IpAddr, dst_port: u16, token: &str) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(source, 0)).unwrap();
        let mut s = sock.connect(self.node.intake_addr).await.unwrap();
        let src = SocketAddr::new(source, 40000);
        let dst = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), dst_port);
        s.write_all(&cellgate_proxy_protocol::encode(src, dst, token).unwrap())
            .await
            .unwrap();
        s
    }

    async fn get_with(&self, token: &str, path: &str) -> Resp {
        let tcp = self
            .connect_from(IpAddr::from([127, 0, 0, 1]), self.http.port(), token)
            .await;
        send_h1(tcp, self.req(path)).await
    }

    async fn get(&self, path: &str) -> Resp {
        self.get_with(&self.token(), path).await
    }

    /// The status of one request, or `None` when the node closed the connection without an
    /// answer: what a request in flight while the policy changes may get, since the node
    /// re-decides what is open and cuts what the new policy denies. For polling until a policy
    /// is in force; assertions use [`Self::get`].
    async fn status_while_policy_changes(&self, path: &str) -> Option<u16> {
        let tcp = self
            .connect_from(
                IpAddr::from([127, 0, 0, 1]),
                self.http.port(),
                &self.token(),
            )
            .await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .ok()?;
        tokio::spawn(conn);
        let resp = sender.send_request(self.req(path)).await.ok()?;
        Some(resp.status().as_u16())
    }

    fn req(&self, path: &str) -> http::Request<Empty<Bytes>> {
        http::Request::builder()
            .uri(path)
            .header("host", format!("plain.test:{}", self.http.port()))
            .body(Empty::<Bytes>::new())
            .unwrap()
    }

    async fn wait_audit(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        common::wait_audit(&self.node, &self.audit, pred).await
    }

    async fn admin_get(&self, path: &str) -> Resp {
        self.admin_get_with(path, Some(ADMIN_TOKEN)).await
    }

    async fn admin_get_with(&self, path: &str, token: Option<&str>) -> Resp {
        common::admin_get(&self.node, path, token).await
    }
}

/// The admin token the test node is given (`--admin-token-file`).
const ADMIN_TOKEN: &str = "4dm1n-t0ken-for-tests";

/// Polls `check` (bounded) until it holds; returns how long it took.
async fn until(within: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < within {
        if check().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not met within {within:?}");
}

async fn reason_of(k: &Kube, path: &str) -> (u16, String) {
    let r = k.get(path).await;
    let reason = if r.status == 200 {
        String::new()
    } else {
        r.json()["reason"].as_str().unwrap_or_default().to_string()
    };
    (r.status, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_drive_every_decision_and_revocations_close_what_is_open() {
    let k = Kube::start(false).await;

    // The watches: AgentCells in all namespaces; cell pods on this node only; the revocations
    // and lockdown ConfigMaps by name in the control namespace; this node's AgentApprovals.
    // Each listed, then watched.
    // Waited for, not read once: a watch opens only after its list is applied.
    let find = async |path: String, watch: bool, selector: Option<(&str, String)>| {
        k.api
            .wait_call(Duration::from_secs(5), |c| {
                c.method == http::Method::GET
                    && c.path() == path
                    && (c.query().get("watch").map(String::as_str) == Some("true")) == watch
                    && selector
                        .as_ref()
                        .is_none_or(|(key, v)| c.query().get(*key) == Some(v))
            })
            .await
    };
    for watch in [false, true] {
        let c = find("/apis/cellgate.dev/v1alpha1/agentcells".into(), watch, None).await;
        assert!(
            !c.query().contains_key("labelSelector") && !c.query().contains_key("fieldSelector")
        );
        let p = find("/api/v1/pods".into(), watch, None).await;
        assert_eq!(p.query()["labelSelector"], "cellgate.dev/cell");
        assert_eq!(p.query()["fieldSelector"], format!("spec.nodeName={NODE}"));
        // Two ConfigMaps there, each by name: the revocations and the lockdown.
        for name in ["cellgate-revocations", "cellgate-lockdown"] {
            find(
                format!("/api/v1/namespaces/{CONTROL_NS}/configmaps"),
                watch,
                Some(("fieldSelector", format!("metadata.name={name}"))),
            )
            .await;
        }
        let a = find(
            "/apis/cellgate.dev/v1alpha1/agentapprovals".into(),
            watch,
            None,
        )
        .await;
        assert_eq!(
            a.query()["labelSelector"],
            format!("cellgate.dev/node={NODE}")
        );
    }
    assert_eq!(k.admin_get("/readyz").await.status, 200);

    // Nothing is known yet: the connection is refused at the intake.
    let mut s = k
        .connect_from(IpAddr::from([127, 0, 0, 1]), k.http.port(), &k.token())
        .await;
    assert!(
        cellgate_testing::read_to_end_timeout(&mut s, Duration::from_secs(3))
            .await
            .is_empty()
    );
    k.wait_audit(|r| r["reason"] == "cell_unknown").await;

    // (a) The pod, then the cell, arrive by watch: allowed.
    assert!(k.api.send(
        Watched::Pods,
        "ADDED",
        cell_pod(NS, "demo", UID, NODE, "127.0.0.1", "Running")
    ));
    k.send_cell("ADDED", 1, &[], false);
    until(Duration::from_secs(3), async || {
        k.get("/public/a").await.status == 200
    })
    .await;

    // (g) The node reports what it enforces: SSA on the status subresource, forced, as
    // cellgate-node, with the generation it applied.
    let patch = k
        .api
        .wait_call(Duration::from_secs(3), |c| {
            // (The node's CA report, a Lease, is written besides: not asserted here.)
            c.method == http::Method::PATCH && c.path().ends_with("/status")
        })
        .await;
    assert_eq!(
        patch.path(),
        format!("/apis/cellgate.dev/v1alpha1/namespaces/{NS}/agentcells/demo/status")
    );
    let q = patch.query();
    assert_eq!(q["fieldManager"], "cellgate-node");
    assert_eq!(q["force"], "true");
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    let body: serde_json::Value = serde_json::from_slice(&patch.body).unwrap();
    assert_eq!(body["apiVersion"], "cellgate.dev/v1alpha1");
    assert_eq!(body["kind"], "AgentCell");
    let enf = &body["status"]["enforcement"];
    assert_eq!(enf["node"], NODE);
    assert_eq!(enf["observedGeneration"], 1);
    assert!(enf["time"].as_str().unwrap().ends_with('Z'), "{enf}");
    assert!(
        body.get("spec").is_none(),
        "the node writes nothing but the status: {body}"
    );

    // Open what (b) will revoke: a keep-alive HTTP connection, a streamed response on the
    // `plain` capability, and a TCP relay on `db`.
    let tcp = k
        .connect_from(IpAddr::from([127, 0, 0, 1]), k.http.port(), &k.token())
        .await;
    let (mut keepalive, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = keepalive
        .send_request(k.req("/public/first"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.into_body().collect().await.unwrap();

    let tcp = k
        .connect_from(IpAddr::from([127, 0, 0, 1]), k.http.port(), &k.token())
        .await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let stream = sender.send_request(k.req("/stream")).await.unwrap();
    assert_eq!(stream.status(), 200);
    let mut stream = stream.into_body();
    let first = tokio::time::timeout(Duration::from_secs(3), stream.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.data_ref().is_some());

    let mut relay = k
        .connect_from(IpAddr::from([127, 0, 0, 1]), k.echo.port(), &k.token())
        .await;
    relay.write_all(b"\x00\x01ping").await.unwrap();
    let mut back = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(3), relay.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"\x00\x01ping");

    // (b) MODIFIED without `plain` and `db`: the next request on the keep-alive connection is
    // denied, the open stream is cut and the relay closed, both audited `revoked`.
    k.send_cell("MODIFIED", 2, &["plain", "db"], false);
    until(Duration::from_secs(2), async || {
        // A request allowed just before the event whose response is still in flight is cut
        // with its connection: then go on with a new keep-alive connection.
        match keepalive.send_request(k.req("/public/second")).await {
            Ok(r) => {
                let status = r.status();
                let _ = r.into_body().collect().await;
                status == 403
            }
            Err(_) => {
                keepalive = keepalive_conn(&k).await;
                false
            }
        }
    })
    .await;
    let cut = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match stream.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
    assert!(
        cut.is_ok(),
        "the response stream was not cut after revocation"
    );
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match relay.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the relay was not closed after revocation");
    let rec = k
        .wait_audit(|r| {
            r["reason"] == "revoked" && r["protocol"] == "http" && r["path"] == "/stream"
        })
        .await;
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["cell"], "demo");
    k.wait_audit(|r| r["reason"] == "revoked" && r["protocol"] == "tcp")
        .await;
    assert_eq!(
        reason_of(&k, "/public/a").await,
        (403, "no_capability".into())
    );
    let patch2 = k
        .api
        .wait_call(Duration::from_secs(3), |c| {
            c.method == http::Method::PATCH
                && serde_json::from_slice::<serde_json::Value>(&c.body).unwrap()["status"]
                    ["enforcement"]["observedGeneration"]
                    == 2
        })
        .await;
    assert_eq!(patch2.query()["fieldManager"], "cellgate-node");

    // The capability comes back; then (c) suspended: everything denied with its own reason.
    k.send_cell("MODIFIED", 3, &[], false);
    until(Duration::from_secs(2), async || {
        k.get("/public/a").await.status == 200
    })
    .await;
    k.send_cell("MODIFIED", 4, &[], true);
    until(Duration::from_secs(2), async || {
        k.get("/public/a").await.status == 403
    })
    .await;
    assert_eq!(
        reason_of(&k, "/public/a").await,
        (403, "cell_suspended".into())
    );

    // (d) DELETED: the cell is unknown; a new connection is refused at the intake.
    k.send_cell("MODIFIED", 5, &[], false);
    until(Duration::from_secs(2), async || {
        k.get("/public/a").await.status == 200
    })
    .await;
    k.send_cell("DELETED", 5, &[], false);
    until(Duration::from_secs(2), async || {
        k.node.shared.cells.get(UID).is_none()
    })
    .await;
    let mut s = k
        .connect_from(IpAddr::from([127, 0, 0, 1]), k.http.port(), &k.token())
        .await;
    let got = cellgate_testing::read_to_end_timeout(&mut s, Duration::from_secs(3)).await;
    assert!(got.is_empty());
    // The second `cell_unknown` refusal (the first was before the cell existed).
    until(Duration::from_secs(2), async || {
        let _ = k.node.shared.audit.flush().await;
        common::audit_records(&k.audit)
            .iter()
            .filter(|r| r["reason"] == "cell_unknown" && r["front_door"] == "intake")
            .count()
            == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_listed_in_the_revocations_configmap_is_refused_and_its_relays_closed() {
    let k = Kube::start(true).await;
    let claims = k.claims();
    let token = k.sign(&claims);
    until(Duration::from_secs(3), async || {
        k.get_with(&token, "/public/a").await.status == 200
    })
    .await;
    let mut relay = k
        .connect_from(IpAddr::from([127, 0, 0, 1]), k.echo.port(), &token)
        .await;
    relay.write_all(b"\x00\x01ping").await.unwrap();
    let mut back = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(3), relay.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();

    // (e) The control plane lists the token's jti: new connections are refused at the intake
    // with the token reason, the open relay is closed as revoked; another token still works.
    assert!(k.api.send(
        Watched::ConfigMaps,
        "ADDED",
        revocations(CONTROL_NS, &["some-other-jti", &claims.jti])
    ));
    until(Duration::from_secs(2), async || {
        k.node.shared.verifier.is_revoked(&claims.jti)
    })
    .await;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match relay.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the relay was not closed after the token was revoked"
    );
    k.wait_audit(|r| r["reason"] == "revoked" && r["token_id"] == claims.jti.as_str())
        .await;
    let mut s = k
        .connect_from(IpAddr::from([127, 0, 0, 1]), k.http.port(), &token)
        .await;
    let got = cellgate_testing::read_to_end_timeout(&mut s, Duration::from_secs(3)).await;
    assert!(
        got.is_empty(),
        "a revoked token's connection must be closed unanswered"
    );
    let rec = k
        .wait_audit(|r| r["reason"] == "token_revoked" && r["front_door"] == "intake")
        .await;
    assert_eq!(rec["decision"], "deny");
    assert_eq!(
        k.get("/public/a").await.status,
        200,
        "a fresh token is unaffected"
    );

    // The node forgets an id once its token has expired (as the operator prunes the list), passes
    // over one listed after its token expired (not counted or logged as revoked, on this event or
    // the next), and keeps for good an id whose expiry it cannot read.
    let held = k.node.shared.verifier.revoked_count();
    let mut cm = revocations(CONTROL_NS, &["expired-jti", "unreadable-jti"]);
    cm["data"]["expired-jti"] = "2001-01-01T00:00:00Z".into();
    cm["data"]["unreadable-jti"] = "next tuesday".into();
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(cm).unwrap();
    assert_eq!(
        cellgate_node::kubernetes::apply_revocations(&k.node.shared, &cm),
        1
    );
    assert_eq!(
        cellgate_node::kubernetes::apply_revocations(&k.node.shared, &cm),
        0,
        "the same list again revokes nothing new"
    );
    let v = &k.node.shared.verifier;
    assert!(!v.is_revoked("expired-jti") && v.is_revoked("unreadable-jti"));
    assert!(v.is_revoked(&claims.jti), "a live revocation is kept");
    assert_eq!(v.revoked_count(), held + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_running_pod_of_the_cell_on_this_node_may_use_its_token() {
    let k = Kube::start(true).await;
    until(Duration::from_secs(3), async || {
        k.get("/public/a").await.status == 200
    })
    .await;

    // (f) Same valid token, from an address that is not the cell's pod.
    let mut s = k
        .connect_from(IpAddr::from([127, 0, 0, 2]), k.http.port(), &k.token())
        .await;
    let got = cellgate_testing::read_to_end_timeout(&mut s, Duration::from_secs(3)).await;
    assert!(got.is_empty());
    let rec = k
        .wait_audit(|r| r["reason"] == "source_not_bound" && r["source"] == "127.0.0.2:40000")
        .await;
    assert_eq!(rec["cell"], "demo");

    // A second cell's pod address does not carry the first cell's token either.
    let other = "11111111-other";
    k.api.send(
        Watched::AgentCells,
        "ADDED",
        agent_cell(
            NS,
            "other",
            other,
            1,
            spec(k.http.port(), k.echo.port(), &[], false),
        ),
    );
    k.api.send(
        Watched::Pods,
        "ADDED",
        cell_pod(NS, "other", other, NODE, "127.0.0.3", "Running"),
    );
    until(Duration::from_secs(2), async || {
        k.node.shared.pods.read().unwrap().len() == 2
    })
    .await;
    let mut s = k
        .connect_from(IpAddr::from([127, 0, 0, 3]), k.http.port(), &k.token())
        .await;
    let got = cellgate_testing::read_to_end_timeout(&mut s, Duration::from_secs(3)).await;
    assert!(got.is_empty());
    k.wait_audit(|r| r["reason"] == "source_not_bound" && r["source"] == "127.0.0.3:40000")
        .await;

    // An open relay from the pod is closed when the pod stops running.
    let mut relay = k
        .connect_from(IpAddr::from([127, 0, 0, 1]), k.echo.port(), &k.token())
        .await;
    relay.write_all(b"\x00\x01ping").await.unwrap();
    let mut back = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(3), relay.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    k.api.send(
        Watched::Pods,
        "MODIFIED",
        cell_pod(NS, "demo", UID, NODE, "127.0.0.1", "Succeeded"),
    );
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match relay.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the relay outlived its pod");
    k.wait_audit(|r| r["reason"] == "revoked" && r["protocol"] == "tcp")
        .await;
    let mut s = k
        .connect_from(IpAddr::from([127, 0, 0, 1]), k.http.port(), &k.token())
        .await;
    assert!(
        cellgate_testing::read_to_end_timeout(&mut s, Duration::from_secs(3))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_cell_is_denied_and_the_watch_goes_on() {
    let k = Kube::start(true).await;
    until(Duration::from_secs(3), async || {
        k.get("/public/a").await.status == 200
    })
    .await;
    // An empty host breaks the file path's rules: the cell is dropped (denied), not kept.
    let mut bad = spec(k.http.port(), k.echo.port(), &[], false);
    bad["capabilities"][0]["destinations"][0]["host"] = "".into();
    assert!(k.api.send(
        Watched::AgentCells,
        "MODIFIED",
        agent_cell(NS, "demo", UID, 2, bad)
    ));
    until(Duration::from_secs(2), async || {
        k.node.shared.cells.get(UID).is_none()
    })
    .await;
    let m = k.admin_get("/metrics").await.body;
    assert!(
        m.contains("cellgate_reload_failures_total{outcome=\"cells\"} 1"),
        "{m}"
    );
    // The watch is alive: a fixed spec is applied.
    k.send_cell("MODIFIED", 3, &[], false);
    until(Duration::from_secs(2), async || {
        k.get("/public/a").await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_audit_returns_the_cells_recent_records() {
    let k = Kube::start(true).await;
    until(Duration::from_secs(3), async || {
        k.get("/public/a").await.status == 200
    })
    .await;
    for i in 0..5 {
        assert_eq!(k.get(&format!("/public/{i}")).await.status, 200);
    }
    assert_eq!(k.get("/private").await.status, 403);
    let r = k.admin_get("/audit?cell=agents%2Fdemo&limit=3").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.headers["content-type"], "application/x-ndjson",
        "JSON lines"
    );
    let recs: Vec<serde_json::Value> = r
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 3, "{}", r.body);
    assert!(recs
        .iter()
        .all(|r| r["cell"] == "demo" && r["namespace"] == NS));
    // Newest last, in chain order.
    assert_eq!(recs[2]["path"], "/private");
    assert_eq!(recs[1]["path"], "/public/4");
    assert!(recs[0]["seq"].as_u64() < recs[2]["seq"].as_u64());
    // Default limit; another cell has nothing; a bad query is a 400.
    let all = k.admin_get("/audit?cell=agents/demo").await;
    assert!(all.body.lines().count() >= 7, "{}", all.body);
    assert_eq!(k.admin_get("/audit?cell=agents/nobody").await.body, "");
    assert_eq!(k.admin_get("/audit?cell=demo").await.status, 400);
    assert_eq!(k.admin_get("/audit?cell=a/b&limit=0").await.status, 400);
    // Without the admin token, or with another, nothing is read; the probes need none.
    for token in [None, Some("guess"), Some("")] {
        let r = k.admin_get_with("/audit?cell=agents/demo", token).await;
        assert_eq!(r.status, 401, "{token:?}: {}", r.body);
        assert!(!r.body.contains("demo"), "{}", r.body);
    }
    assert_eq!(k.admin_get_with("/healthz", None).await.status, 200);
    // The token file is read at each request: rotating it takes effect at once.
    std::fs::write(k._dir.path().join("admin-token"), "rotated").unwrap();
    assert_eq!(k.admin_get("/audit?cell=agents/demo").await.status, 401);
    let r = k
        .admin_get_with("/audit?cell=agents/demo", Some("rotated"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// In a cluster the admin port is on the node's address: without a token file `/audit` is closed
/// to everyone, whatever they send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_audit_is_closed_in_kubernetes_mode_without_a_token_file() {
    let k = Kube::start_with(true, false).await;
    until(Duration::from_secs(3), async || {
        k.get("/public/a").await.status == 200
    })
    .await;
    for token in [None, Some(ADMIN_TOKEN), Some("")] {
        let r = k.admin_get_with("/audit?cell=agents/demo", token).await;
        assert_eq!(r.status, 403, "{token:?}: {}", r.body);
        assert!(r.body.contains("--admin-token-file"), "{}", r.body);
        assert!(!r.body.contains("public"), "{}", r.body);
    }
    assert_eq!(k.admin_get_with("/readyz", None).await.status, 200);
}

async fn keepalive_conn(k: &Kube) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let tcp = k
        .connect_from(IpAddr::from([127, 0, 0, 1]), k.http.port(), &k.token())
        .await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// The product promise, checked loosely (timed unit tests are not benchmarks: the figure is
/// measured by `cargo run --release -p cellgate-node --example watch_to_deny`, see
/// docs/benchmarks.md): from the watch event removing a capability to the first request denied
/// on an open keep-alive connection, well within a second, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_event_to_first_denied_request_is_well_within_a_second() {
    let k = Arc::new(Kube::start(true).await);
    until(Duration::from_secs(3), async || {
        k.get("/public/a").await.status == 200
    })
    .await;
    let mut sender = keepalive_conn(&k).await;
    let mut took = Vec::new();
    let mut generation = 1;
    for _ in 0..20 {
        generation += 1;
        k.send_cell("MODIFIED", generation, &[], false);
        until(Duration::from_secs(2), async || {
            k.get("/public/a").await.status == 200
        })
        .await;
        generation += 1;
        let start = Instant::now();
        k.send_cell("MODIFIED", generation, &["plain"], false);
        loop {
            // A response allowed just before the event and still in flight is cut, and its
            // connection with it: then poll on a new one.
            match sender.send_request(k.req("/public/a")).await {
                Ok(r) => {
                    let status = r.status();
                    let _ = r.into_body().collect().await;
                    if status == 403 {
                        break;
                    }
                }
                Err(_) => sender = keepalive_conn(&k).await,
            }
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "not denied within 1 s"
            );
        }
        took.push(start.elapsed());
    }
    took.sort();
    println!(
        "watch to deny over {} runs: p50 {:?}, max {:?}",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
    assert!(took[took.len() - 1] < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_lockdown_reaches_the_node_within_a_second_and_lifting_it_restores_access() {
    let k = Kube::start(true).await;
    // The watch: the lockdown ConfigMap by name in the control namespace, listed then watched.
    for watch in [false, true] {
        k.api
            .wait_call(Duration::from_secs(5), |c| {
                c.path() == format!("/api/v1/namespaces/{CONTROL_NS}/configmaps")
                    && c.query().get("fieldSelector").map(String::as_str)
                        == Some("metadata.name=cellgate-lockdown")
                    && (c.query().get("watch").map(String::as_str) == Some("true")) == watch
            })
            .await;
    }
    k.api.watch_opened(Watched::ConfigMaps).await;
    until(Duration::from_secs(3), async || {
        k.get("/public/a").await.status == 200
    })
    .await;
    let token = k.token();
    let mut stream_conn = k
        .connect_from(IpAddr::from([127, 0, 0, 1]), k.http.port(), &token)
        .await;
    stream_conn
        .write_all(b"GET /stream HTTP/1.1\r\nhost: plain.test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 64];
    let n = stream_conn.read(&mut first).await.unwrap();
    assert!(n > 0);

    // Another namespace's lockdown does not touch this cell.
    assert!(k.api.send(
        Watched::ConfigMaps,
        "ADDED",
        cellgate_node::kubernetes::contract::lockdown(CONTROL_NS, &[("namespace.other", "x")])
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(k.get("/public/a").await.status, 200);

    // The cell's namespace: refused within a second of the event, the open stream closed.
    let sent = std::time::Instant::now();
    assert!(k.api.send(
        Watched::ConfigMaps,
        "MODIFIED",
        cellgate_node::kubernetes::contract::lockdown(
            CONTROL_NS,
            &[
                ("namespace.other", "x"),
                ("namespace.agents", "incident 12")
            ]
        )
    ));
    until(Duration::from_secs(1), async || {
        k.node.shared.lockdown.applies(NS).is_some()
    })
    .await;
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );
    let r = k.get("/public/a").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "lockdown");
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("incident 12"));
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        let mut buf = [0u8; 256];
        loop {
            match stream_conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the open stream outlived the lockdown");
    let rec = k
        .wait_audit(|r| r["reason"] == "lockdown_on" && r["namespace"] == NS)
        .await;
    assert_eq!(rec["decision"], "control");
    assert!(
        rec["reasons"].to_string().contains("alice@example.com"),
        "{rec}"
    );
    let state = k.admin_get("/lockdown").await.json();
    assert_eq!(
        state["cluster"]["namespaces"]["agents"]["reason"], "incident 12",
        "{state}"
    );

    // A garbled entry still locks; deleting the ConfigMap lifts every cluster lockdown.
    let mut garbled =
        cellgate_node::kubernetes::contract::lockdown(CONTROL_NS, &[("cluster", "y")]);
    garbled["data"]["cluster"] = "{oops".into();
    assert!(k.api.send(Watched::ConfigMaps, "MODIFIED", garbled.clone()));
    until(Duration::from_secs(1), async || {
        k.node
            .shared
            .lockdown
            .applies("anything")
            .is_some_and(|l| l.reason.contains("unreadable"))
    })
    .await;
    assert!(k.api.send(Watched::ConfigMaps, "DELETED", garbled));
    until(Duration::from_secs(1), async || {
        k.get("/public/a").await.status == 200
    })
    .await;
    k.wait_audit(|r| r["reason"] == "lockdown_off").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taking_a_cell_over_starts_from_its_reported_usage_and_reports_its_own() {
    let k = Kube::start(false).await;
    k.api.watch_opened(Watched::Pods).await;
    k.api.watch_opened(Watched::AgentCells).await;
    assert!(k.api.send(
        Watched::Pods,
        "ADDED",
        cell_pod(NS, "demo", UID, NODE, "127.0.0.1", "Running")
    ));
    // The cell has a budget of 3 requests, 2 of them counted by the node that hosted it before.
    let mut s = spec(k.http.port(), k.echo.port(), &[], false);
    s["budget"] = serde_json::json!({"requests": 3});
    let mut obj = agent_cell(NS, "demo", UID, 1, s);
    obj["status"] = serde_json::json!({"usage": {"node": "node-old", "time": "2026-12-01T00:00:00Z",
        "summary": "cell requests 2/3",
        "budgets": [{"scope": "cell", "startedMs": 1, "requests": 2}]}});
    assert!(k.api.send(Watched::AgentCells, "ADDED", obj));
    until(Duration::from_secs(3), async || {
        k.node.shared.cells.get(UID).is_some()
    })
    .await;
    let r = k.get("/public/a").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = k.get("/public/a").await;
    assert_eq!(
        r.status, 429,
        "the usage reported by the last node was not taken over: {}",
        r.body
    );
    assert_eq!(r.json()["used"], 3);

    // This node reports its count: its own field manager, the status only. (A report may come
    // between the takeover and the requests, with the count taken over; the one after them
    // carries 3.)
    let patch = k
        .api
        .wait_call(Duration::from_secs(12), |c| {
            c.method == http::Method::PATCH
                && c.query().get("fieldManager").map(String::as_str) == Some("cellgate-node-usage")
                && serde_json::from_slice::<serde_json::Value>(&c.body)
                    .is_ok_and(|b| b["status"]["usage"]["budgets"][0]["requests"] == 3)
        })
        .await;
    assert_eq!(
        patch.path(),
        format!("/apis/cellgate.dev/v1alpha1/namespaces/{NS}/agentcells/demo/status")
    );
    assert_eq!(patch.query()["force"], "true");
    let body: serde_json::Value = serde_json::from_slice(&patch.body).unwrap();
    let usage = &body["status"]["usage"];
    assert_eq!(usage["node"], NODE);
    assert_eq!(usage["budgets"][0]["scope"], "cell");
    assert_eq!(usage["budgets"][0]["requests"], 3, "{usage}");
    assert_eq!(usage["summary"], "cell requests 3/3", "{usage}");
    assert!(body["status"].get("enforcement").is_none(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_is_an_agent_approval_decided_through_the_api_server() {
    let k = std::sync::Arc::new(Kube::start(false).await);
    k.api.watch_opened(Watched::AgentCells).await;
    k.api.watch_opened(Watched::AgentApprovals).await;
    assert!(k.api.send(
        Watched::Pods,
        "ADDED",
        cell_pod(NS, "demo", UID, NODE, "127.0.0.1", "Running")
    ));
    let mut s = spec(k.http.port(), k.echo.port(), &[], false);
    s["capabilities"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
        "name": "gated", "destinations": [{"host": "plain.test", "ports": [k.http.port()]}],
        "http": {"methods": ["GET"], "paths": ["/gated/**"]},
        "approval": {"required": true, "timeout": "30s"}}));
    assert!(k.api.send(
        Watched::AgentCells,
        "ADDED",
        agent_cell(NS, "demo", UID, 1, s)
    ));
    until(Duration::from_secs(3), async || {
        k.get("/public/a").await.status == 200
    })
    .await;

    // No AgentApproval, no approval: refused at once, audited.
    k.api.refuse_approvals(true);
    let r = k.get("/gated/x").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["reason"], "approval_unavailable", "{}", r.body);
    // Why (the API server's answer) is for operators: in the audit record, never in the body.
    assert!(
        !r.body.contains("forbidden"),
        "the API server's error reached the agent: {}",
        r.body
    );
    let rec = k
        .wait_audit(|r| r["reason"] == "approval_unavailable")
        .await;
    assert!(rec["reasons"].to_string().contains("forbidden"), "{rec}");
    assert!(k
        .node
        .shared
        .approvals
        .list(cellgate_node::decide::now_ms())
        .is_empty());
    k.api.refuse_approvals(false);

    for (approved, path) in [(true, "/gated/deploy"), (false, "/gated/drop")] {
        let held = {
            let k = k.clone();
            tokio::spawn(async move { k.get(path).await })
        };
        // The node creates the AgentApproval: what exactly would be approved, labelled with it.
        let created = k
            .api
            .wait_call(Duration::from_secs(5), |c| {
                c.method == http::Method::POST
                    && c.path()
                        == format!("/apis/cellgate.dev/v1alpha1/namespaces/{NS}/agentapprovals")
                    && String::from_utf8_lossy(&c.body).contains(path)
            })
            .await;
        let mut obj: serde_json::Value = serde_json::from_slice(&created.body).unwrap();
        let id = obj["metadata"]["name"].as_str().unwrap().to_string();
        assert_eq!(obj["metadata"]["labels"]["cellgate.dev/node"], NODE);
        let spec = &obj["spec"];
        assert_eq!(
            (
                spec["cell"].as_str(),
                spec["capability"].as_str(),
                spec["method"].as_str()
            ),
            (Some("demo"), Some("gated"), Some("GET"))
        );
        assert_eq!(
            (spec["host"].as_str(), spec["path"].as_str()),
            (Some("plain.test"), Some(path))
        );
        assert_eq!(
            spec["bodyDigest"],
            cellgate_node::approvals::body_digest(b"").as_str()
        );
        assert_eq!(
            (spec["node"].as_str(), spec["mode"].as_str()),
            (Some(NODE), Some("hold"))
        );
        assert!(!held.is_finished(), "answered before a decision");

        // A human decides (kubectl cellgate approve|deny writes status.decision).
        obj["metadata"]["namespace"] = NS.into();
        obj["status"] = serde_json::json!({"decision": {"approved": approved,
            "by": "alice@example.com", "at": "2026-12-02T08:00:00Z",
            "reason": if approved { serde_json::Value::Null } else { "not today".into() }}});
        assert!(k.api.send(Watched::AgentApprovals, "MODIFIED", obj));
        let r = tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .unwrap()
            .unwrap();
        if approved {
            assert_eq!(r.status, 200, "{}", r.body);
        } else {
            assert_eq!(r.status, 403);
            assert_eq!(r.json()["reason"], "approval_denied");
            assert!(r.json()["message"].as_str().unwrap().contains("not today"));
        }
        let rec = k
            .wait_audit(|r| {
                r["reason"]
                    == if approved {
                        "approval_granted"
                    } else {
                        "approval_rejected"
                    }
            })
            .await;
        assert_eq!(rec["front_door"], "kubernetes");
        assert!(
            rec["reasons"]
                .to_string()
                .contains("alice@example.com (Kubernetes)"),
            "{rec}"
        );
        // Decided: the object is cleaned up.
        k.api
            .wait_call(Duration::from_secs(5), |c| {
                c.method == http::Method::DELETE
                    && c.path()
                        == format!(
                            "/apis/cellgate.dev/v1alpha1/namespaces/{NS}/agentapprovals/{id}"
                        )
            })
            .await;
    }
}

/// A `CellgateClusterPolicy` named `name` with `modules` as spec and, when `snapshot` is given,
/// a status naming it as the version in force (`accepted` is the Accepted condition).
fn cluster_policy(
    name: &str,
    modules: &[(&str, &str)],
    snapshot: Option<&str>,
    accepted: bool,
) -> serde_json::Value {
    let modules: serde_json::Map<String, serde_json::Value> = modules
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).into()))
        .collect();
    let mut o = serde_json::json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "CellgateClusterPolicy",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1},
        "spec": {"modules": modules},
        "status": {"conditions": [{"type": "Accepted",
            "status": if accepted { "True" } else { "False" },
            "reason": if accepted { "Accepted" } else { "ParseError" }, "message": ""}]},
    });
    if let Some(snap) = snapshot {
        o["status"]["snapshot"] = snap.into();
    }
    o
}

/// The snapshot ConfigMap (control namespace) holding `modules`.
fn snapshot(name: &str, modules: &[(&str, &str)]) -> serde_json::Value {
    let modules: serde_json::Map<String, serde_json::Value> = modules
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).into()))
        .collect();
    serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": CONTROL_NS},
        "data": {"spec.json": serde_json::json!({"modules": modules}).to_string()},
        "immutable": true,
    })
}

const DENY_ADMIN: &str = "package cellgate.layers.no_admin\nimport rego.v1\ndeny contains \"admin paths are closed\" if input.request.path == \"/public/admin\"\n";
const DENY_ADMIN_AND_B: &str = "package cellgate.layers.no_admin\nimport rego.v1\ndeny contains \"closed\" if input.request.path in {\"/public/admin\", \"/public/b\"}\n";
const DENY_ALL: &str =
    "package cellgate.layers.no_admin\nimport rego.v1\ndeny contains \"everything\" if true\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_loads_accepted_policy_snapshots_only_and_a_cluster_pack_denies() {
    let base_rego = include_str!("../../../policies/base/cellgate.rego");
    let k = Kube::start_setup(true, true, |api| {
        api.set_list(
            Watched::ClusterPolicies,
            vec![
                cluster_policy(
                    "base",
                    &[("cellgate.rego", base_rego)],
                    Some("cellgate-policy-base-b1"),
                    true,
                ),
                // The spec denies everything, but the version in force (its snapshot) only
                // /public/admin: the node reads the snapshot, never the spec.
                cluster_policy(
                    "no-admin",
                    &[("no_admin.rego", DENY_ALL)],
                    Some("cellgate-policy-no-admin-v1"),
                    true,
                ),
            ],
        );
        api.set_list(Watched::Policies, vec![]);
        api.put_configmap(snapshot(
            "cellgate-policy-base-b1",
            &[("cellgate.rego", base_rego)],
        ));
        api.put_configmap(snapshot(
            "cellgate-policy-no-admin-v1",
            &[("no_admin.rego", DENY_ADMIN)],
        ));
    })
    .await;
    k.api.watch_opened(Watched::ClusterPolicies).await;
    k.api.watch_opened(Watched::Policies).await;
    // The cluster pack's deny refuses a request its capability grants.
    until(Duration::from_secs(5), async || {
        k.status_while_policy_changes("/public/admin").await == Some(403)
    })
    .await;
    assert_eq!(k.get("/public/a").await.status, 200);
    let denied = k
        .wait_audit(|r| r["path"] == "/public/admin" && r["decision"] == "deny")
        .await;
    assert!(
        denied.to_string().contains("no-admin"),
        "the record names the pack: {denied}"
    );
    let gets = |calls: &[cellgate_node::kubernetes::contract::Call]| -> Vec<String> {
        calls
            .iter()
            .filter(|c| c.method == http::Method::GET && c.path().contains("/configmaps/"))
            .map(|c| c.path().to_string())
            .collect()
    };
    let read = gets(&k.api.calls());
    assert_eq!(
        read,
        [
            format!("/api/v1/namespaces/{CONTROL_NS}/configmaps/cellgate-policy-base-b1"),
            format!("/api/v1/namespaces/{CONTROL_NS}/configmaps/cellgate-policy-no-admin-v1"),
        ],
        "each snapshot read once"
    );

    // A spec edit the operator refused (status still names v1): nothing changes on the node.
    let mut refused = cluster_policy(
        "no-admin",
        &[("no_admin.rego", DENY_ALL)],
        Some("cellgate-policy-no-admin-v1"),
        false,
    );
    refused["metadata"]["generation"] = 2.into();
    assert!(k.api.send(Watched::ClusterPolicies, "MODIFIED", refused));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(k.get("/public/a").await.status, 200);
    assert_eq!(k.get("/public/b").await.status, 200);
    assert_eq!(k.get("/public/admin").await.status, 403);
    assert_eq!(
        gets(&k.api.calls()),
        read,
        "no snapshot read for a refused edit"
    );

    // The operator accepts version 2: its snapshot is read and enforced.
    k.api.put_configmap(snapshot(
        "cellgate-policy-no-admin-v2",
        &[("no_admin.rego", DENY_ADMIN_AND_B)],
    ));
    let mut accepted = cluster_policy(
        "no-admin",
        &[("no_admin.rego", DENY_ADMIN_AND_B)],
        Some("cellgate-policy-no-admin-v2"),
        true,
    );
    accepted["metadata"]["generation"] = 3.into();
    assert!(k.api.send(Watched::ClusterPolicies, "MODIFIED", accepted));
    until(Duration::from_secs(3), async || {
        k.status_while_policy_changes("/public/b").await == Some(403)
    })
    .await;
    assert_eq!(k.get("/public/a").await.status, 200);
    assert_eq!(
        gets(&k.api.calls()).last().map(String::as_str),
        Some(
            format!("/api/v1/namespaces/{CONTROL_NS}/configmaps/cellgate-policy-no-admin-v2")
                .as_str()
        )
    );
}
