//! A node with real sockets, real TLS and real upstream servers, for integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cellgate_identity::{Claims, SigningKey};
use cellgate_node::{NodeConfig, NodeHandle};
use cellgate_testing::{tagged_connect, TestPki, Upstream};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub const AGENT: &str = "127.0.0.1:40000";

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub key: SigningKey,
    pub node: Option<NodeHandle>,
    pub pki: TestPki,
    pub https: Upstream,
    pub http: Upstream,
    pub cells_dir: PathBuf,
    pub policies_dir: PathBuf,
    pub audit: PathBuf,
    pub node_ca_pem: String,
}

/// A cell allowing GET/POST on /v1/** of api.test (HTTPS) and GET on /public/** of plain.test
/// (HTTP), both on the upstreams' ports; `shadowcap` watches shadow.test in shadow mode.
pub fn demo_cell(name: &str, https_port: u16, http_port: u16) -> String {
    format!(
        r#"apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata:
  name: {name}
  namespace: agents
spec:
  role: researcher
  capabilities:
    - name: api
      destinations:
        - host: api.test
          ports: [{https_port}]
      http:
        methods: [GET, POST]
        paths: ["/v1/**", "/sse", "/ws"]
    - name: plain
      destinations:
        - host: plain.test
          ports: [{http_port}]
      http:
        methods: [GET]
        paths: ["/public/**"]
    - name: shadowcap
      mode: shadow
      destinations:
        - host: shadow.test
          ports: [{https_port}]
      http:
        methods: [GET]
        paths: ["/ok/**"]
"#
    )
}

impl Fixture {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut NodeConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        key.write_pair(&dir.path().join("keys")).unwrap();
        cellgate_tls::ca::init(&dir.path().join("ca"), "Test node CA", false).unwrap();
        let node_ca_pem = std::fs::read_to_string(dir.path().join("ca/ca.crt")).unwrap();
        let pki = TestPki::new();
        let names = ["api.test", "shadow.test", "other.test", "localhost"];
        let https = Upstream::start(Some(pki.server_config(&names, &[b"h2", b"http/1.1"]))).await;
        let http = Upstream::start(None).await;
        let cells_dir = dir.path().join("cells");
        let policies_dir = dir.path().join("policies");
        std::fs::create_dir_all(&cells_dir).unwrap();
        std::fs::create_dir_all(&policies_dir).unwrap();
        std::fs::write(
            cells_dir.join("demo.yaml"),
            demo_cell("demo", https.addr.port(), http.addr.port()),
        )
        .unwrap();
        std::fs::write(
            cells_dir.join("other.yaml"),
            demo_cell("other", https.addr.port(), http.addr.port()),
        )
        .unwrap();
        let audit = dir.path().join("audit.jsonl");
        let mut config = NodeConfig::defaults();
        config.cells_dir = Some(cells_dir.clone());
        config.policies_dir = Some(policies_dir.clone());
        config.ca_dir = Some(dir.path().join("ca"));
        config.trust = vec![dir.path().join("keys/signing.pub")];
        config.audit = audit.clone();
        config.upstream_ca = vec![pki.write_ca(dir.path())];
        config.node_name = "test-node".into();
        config.drain = Duration::from_secs(1);
        for host in [
            "api.test",
            "plain.test",
            "shadow.test",
            "other.test",
            "evil.test",
        ] {
            config.resolve.push(
                cellgate_node::config::parse_resolve(&format!("{host}:*:127.0.0.1")).unwrap(),
            );
        }
        tweak(&mut config);
        let node = cellgate_node::run(config).await.unwrap();
        Self {
            dir,
            key,
            node: Some(node),
            pki,
            https,
            http,
            cells_dir,
            policies_dir,
            audit,
            node_ca_pem,
        }
    }

    pub fn node(&self) -> &NodeHandle {
        self.node.as_ref().unwrap()
    }

    pub fn claims(&self, cell: &str) -> Claims {
        let now = cellgate_node::decide::now_secs();
        Claims::for_cell(
            "test",
            &format!("local:agents:{cell}"),
            "agents",
            cell,
            Some("researcher"),
            now,
            600,
            Some("127.0.0.1".parse().unwrap()),
        )
    }

    pub fn token(&self, cell: &str) -> String {
        cellgate_identity::token::issue(&self.key, &self.claims(cell)).unwrap()
    }

    pub fn sign(&self, claims: &Claims) -> String {
        cellgate_identity::token::issue(&self.key, claims).unwrap()
    }

    pub async fn connect(&self, dst_port: u16, token: &str) -> TcpStream {
        tagged_connect(
            self.node().intake_addr,
            AGENT.parse().unwrap(),
            SocketAddr::new(IpAddr::from([127, 0, 0, 1]), dst_port),
            token,
        )
        .await
    }

    /// TLS to the node as `sni`, trusting the node's CA.
    pub async fn tls(
        &self,
        sni: &str,
        token: &str,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = self.connect(self.https.addr.port(), token).await;
        let cfg = cellgate_testing::client_config(&self.node_ca_pem, alpn);
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
        tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// One HTTPS request over HTTP/1.1 through the node; returns status, headers and body.
    pub async fn https_get(&self, sni: &str, host: &str, path: &str, method: &str) -> Resp {
        let tls = self.tls(sni, &self.token("demo"), &[b"http/1.1"]).await;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{host}:{}", self.https.addr.port()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        send_h1(tls, req).await
    }

    /// One plaintext request through the node.
    pub async fn http_get(&self, host: &str, path: &str) -> Resp {
        let tcp = self
            .connect(self.http.addr.port(), &self.token("demo"))
            .await;
        let req = http::Request::builder()
            .uri(path)
            .header("host", format!("{host}:{}", self.http.addr.port()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        send_h1(tcp, req).await
    }

    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        audit_records(&self.audit)
    }

    /// Waits (bounded) until an audit record matching `pred` is on disk.
    pub async fn wait_audit(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_audit(self.node(), &self.audit, pred).await
    }

    pub async fn admin_get(&self, path: &str) -> Resp {
        admin_get(self.node(), path, None).await
    }
}

/// The records of the audit log at `path`, parsed.
pub fn audit_records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits (bounded) until a record matching `pred` is in `node`'s audit log at `path`.
pub async fn wait_audit(
    node: &NodeHandle,
    path: &std::path::Path,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..100 {
        let _ = node.shared.audit.flush().await;
        if let Some(r) = audit_records(path).into_iter().find(|r| pred(r)) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no matching audit record; have: {:#?}", audit_records(path));
}

/// GET `path` on `node`'s admin port, with the admin token header when `token` is given.
pub async fn admin_get(node: &NodeHandle, path: &str, token: Option<&str>) -> Resp {
    let tcp = TcpStream::connect(node.admin_addr).await.unwrap();
    let mut req = http::Request::builder().uri(path).header("host", "admin");
    if let Some(t) = token {
        req = req.header("x-cellgate-admin-token", t);
    }
    send_h1(tcp, req.body(Empty::<Bytes>::new()).unwrap()).await
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request over `io` (any body: `Empty`, `Full`, ...); the answer read whole.
pub async fn send_h1<S, B>(io: S, req: http::Request<B>) -> Resp
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("cellgate=debug,warn")
        .with_test_writer()
        .try_init();
}

pub fn _unused(_: Arc<()>) {}

pub async fn tagged_connect_port(f: &Fixture, port: u16, cell: &str) -> TcpStream {
    f.connect(port, &f.token(cell)).await
}

/// A cell whose capabilities ask for governance the node refuses to leave unenforced:
/// `approved` (approval required, /v1/approve/**), `budgeted` (a budget, /v1/budget/**),
/// `shadowed` (shadow mode with approval, /v1/shadow/**) and `free` (neither, /v1/free/**), all
/// on api.test at `port`; with `cell_budget`, the cell itself has a budget.
pub fn governed_cell(name: &str, port: u16, cell_budget: bool) -> String {
    let budget = if cell_budget {
        "  budget: {requests: 3}\n"
    } else {
        ""
    };
    format!(
        r#"apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {{name: {name}, namespace: agents}}
spec:
{budget}  capabilities:
    - name: approved
      destinations: [{{host: api.test, ports: [{port}]}}]
      http: {{methods: [GET], paths: ["/v1/approve/**"]}}
      approval: {{required: true}}
    - name: budgeted
      destinations: [{{host: api.test, ports: [{port}]}}]
      http: {{methods: [GET], paths: ["/v1/budget/**"]}}
      budget: {{requestsPerWindow: 2, window: 1m}}
    - name: retried
      destinations: [{{host: api.test, ports: [{port}]}}]
      http: {{methods: [POST], paths: ["/v1/retry/**"]}}
      approval: {{required: true, mode: retry}}
    - name: metered
      destinations: [{{host: api.test, ports: [{port}]}}]
      http: {{methods: [GET], paths: ["/llm/**"]}}
      budget: {{tokens: {{max: 1000}}}}
    - name: shadowed
      mode: shadow
      destinations: [{{host: api.test, ports: [{port}]}}]
      http: {{methods: [GET], paths: ["/v1/shadow/**"]}}
      approval: {{required: true}}
    - name: free
      destinations: [{{host: api.test, ports: [{port}]}}]
      http: {{methods: [GET], paths: ["/v1/free/**"]}}
"#
    )
}

/// Writes `yaml` as `cells/<name>.yaml` and waits (bounded) until the node knows the cell.
pub async fn install_cell(f: &Fixture, name: &str, yaml: &str) {
    std::fs::write(f.cells_dir.join(format!("{name}.yaml")), yaml).unwrap();
    let uid = format!("local:agents:{name}");
    for _ in 0..200 {
        if f.node().shared.cells.get(&uid).is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("cell {name} was not loaded");
}
