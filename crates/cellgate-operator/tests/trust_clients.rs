//! The cell's trust bundle as real clients read it: the operator's CA ConfigMap is written into a
//! directory the way kubelet mounts it (`data` and `binaryData` keys as files), the agent
//! container's environment is taken from the operator's pod (paths moved to that directory), and
//! real clients (curl, Python's ssl, Node's fetch, Java's HttpClient) connect with no TLS options
//! of their own to two HTTPS servers on the loopback:
//! - "passthrough": a certificate from a root that is only in the system roots (what a real
//!   server reached through `tls: passthrough` presents);
//! - "cell": a leaf minted by the cell CA (what the node presents when it intercepts).
//!
//! With the system roots in the bundle, every client verifies both; with `--system-roots none`
//! (cell CA only) the passthrough server fails, which shows the test tells the two apart. A
//! missing client is a failure, not a skip: CI installs them all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cellgate_api::crd::AgentCellResource;
use cellgate_operator::desired::{self, Settings, CA_MOUNT_PATH};
use cellgate_tls::{Ca, LeafMinter, MinterConfig, TrustBundle};
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The PATH of the client runs: the system's tools only (no developer tool directories).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An HTTPS server on 127.0.0.1 presenting a `localhost` leaf of `ca`; answers every request
/// with `200` and `name` as the body.
async fn server(ca: &Arc<Ca>, name: &'static str) -> u16 {
    let minter = LeafMinter::new(ca.clone(), MinterConfig::default());
    let mut config = (*minter.server_config("localhost").await.expect("leaf")).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

/// A cell whose agent sets its own `JAVA_TOOL_OPTIONS`, naming a trust store that does not exist:
/// Cellgate's options come after it and win.
fn cell() -> AgentCellResource {
    serde_json::from_value(json!({
        "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
        "metadata": {"name": "triage", "namespace": "agents", "uid": "0b1c2d3e-0000-4000-8000-000000000001"},
        "spec": {"capabilities": [], "template": {"spec": {"containers": [{
            "name": "agent", "image": "agent:1",
            "env": [{"name": "JAVA_TOOL_OPTIONS",
                     "value": "-Xmx128m -Djavax.net.ssl.trustStore=/nonexistent/cacerts"}]
        }]}}}
    }))
    .expect("cell")
}

fn settings() -> Settings {
    Settings {
        init_image: "init:test".into(),
        tagger_image: "tagger:test".into(),
        node_cidrs: vec!["10.0.0.0/16".into()],
        cell_max_connections: 1024,
    }
}

/// Writes the cell's CA ConfigMap (after a JSON round trip, as it comes from the API server) into
/// `dir` like kubelet's ConfigMap volume, and returns the agent container's environment with
/// [`CA_MOUNT_PATH`] replaced by `dir`.
fn mount(trust: &TrustBundle, dir: &Path) -> BTreeMap<String, String> {
    let cm = desired::ca_bundle(&cell(), trust).expect("configmap");
    let cm: ConfigMap =
        serde_json::from_slice(&serde_json::to_vec(&cm).expect("json")).expect("round trip");
    std::fs::create_dir_all(dir).expect("mkdir");
    for (k, v) in cm.data.iter().flatten() {
        std::fs::write(dir.join(k), v).expect("write");
    }
    for (k, v) in cm.binary_data.iter().flatten() {
        std::fs::write(dir.join(k), &v.0).expect("write");
    }
    let pod = desired::pod(&cell(), &settings()).expect("pod");
    let spec = pod.spec.expect("spec");
    let agent = spec
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("agent");
    let to = dir.display().to_string();
    agent
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?.replace(CA_MOUNT_PATH, &to))))
        .collect()
}

struct Outcome {
    ok: bool,
    out: String,
}

async fn client(
    program: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    cwd: &Path,
) -> Outcome {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", cwd)
        .envs(env)
        .current_dir(cwd)
        .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish in 120 s"))
        .unwrap_or_else(|e| panic!("{program} is needed for this test: {e}"));
    Outcome {
        ok: out.status.success(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The clients, each against `port` with `env`; returns (label, outcome).
async fn run_clients(
    port: u16,
    env: &BTreeMap<String, String>,
    bundle: &Path,
    cwd: &Path,
) -> Vec<(&'static str, Outcome)> {
    let url = format!("https://localhost:{port}/v1/check");
    let curl = |extra: &[&str]| {
        let mut a: Vec<String> = ["-sS", "--max-time", "20"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(url.clone());
        a
    };
    let mut only_ssl_cert_file = env.clone();
    only_ssl_cert_file.retain(|k, _| k == "SSL_CERT_FILE");
    let python = format!(
        "import urllib.request; print(urllib.request.urlopen({url:?}, timeout=20).read().decode())"
    );
    let node = format!(
        "fetch({url:?}, {{signal: AbortSignal.timeout(20000)}}).then(r => r.text()).then(t => console.log(t)).catch(e => {{ console.error(e); process.exit(1); }})"
    );
    let java_client = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../e2e/compat/Client.java");
    let java_client: PathBuf = std::fs::canonicalize(java_client).expect("e2e/compat/Client.java");
    vec![
        (
            "curl (CURL_CA_BUNDLE)",
            client("curl", &curl(&[]), env, cwd).await,
        ),
        (
            "curl (SSL_CERT_FILE only)",
            client("curl", &curl(&[]), &only_ssl_cert_file, cwd).await,
        ),
        (
            "curl --cacert bundle.pem",
            client(
                "curl",
                &curl(&["--cacert", &bundle.display().to_string()]),
                &BTreeMap::new(),
                cwd,
            )
            .await,
        ),
        (
            "python3 urllib (SSL_CERT_FILE)",
            client("python3", &["-c".into(), python], env, cwd).await,
        ),
        (
            "node fetch (NODE_EXTRA_CA_CERTS)",
            client("node", &["-e".into(), node], env, cwd).await,
        ),
        (
            "java HttpClient (JAVA_TOOL_OPTIONS)",
            client(
                "java",
                &[java_client.display().to_string(), url.clone()],
                env,
                cwd,
            )
            .await,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reading_the_bundle_trust_the_cell_ca_and_the_system_roots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cell_ca = Arc::new(Ca::generate("Cellgate test cell CA").expect("cell ca"));
    let public_root = Arc::new(Ca::generate("Test public root").expect("root"));
    let cell_port = server(&cell_ca, "cell").await;
    let passthrough_port = server(&public_root, "passthrough").await;
    // The system roots the operator's image has, plus the test root (as if it were public).
    let mut roots =
        std::fs::read_to_string(cellgate_tls::trust::DEFAULT_SYSTEM_ROOTS).unwrap_or_default();
    roots.push_str(public_root.cert_pem());
    let trust = TrustBundle::new(cell_ca.cert_pem(), Some(&roots)).expect("bundle");
    let mounted = dir.path().join("ca");
    let env = mount(&trust, &mounted);
    assert!(env["JAVA_TOOL_OPTIONS"].starts_with(
        "-Xmx128m -Djavax.net.ssl.trustStore=/nonexistent/cacerts -Djavax.net.ssl.trustStore="
    ));
    let bundle = mounted.join(desired::BUNDLE_KEY);

    let mut failures = Vec::new();
    for (what, port) in [("cell", cell_port), ("passthrough", passthrough_port)] {
        for (label, o) in run_clients(port, &env, &bundle, dir.path()).await {
            eprintln!("{what}: {label}: ok={}\n{}", o.ok, o.out.trim());
            let read_env =
                !label.starts_with("java") || o.out.contains("Picked up JAVA_TOOL_OPTIONS");
            if !o.ok || !o.out.contains(what) || !read_env {
                failures.push(format!("{label} against the {what} server:\n{}", o.out));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cell_ca_only_a_passthrough_server_is_not_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cell_ca = Arc::new(Ca::generate("Cellgate test cell CA").expect("cell ca"));
    let public_root = Arc::new(Ca::generate("Test public root").expect("root"));
    let cell_port = server(&cell_ca, "cell").await;
    let passthrough_port = server(&public_root, "passthrough").await;
    let trust = TrustBundle::new(cell_ca.cert_pem(), None).expect("bundle");
    let mounted = dir.path().join("ca");
    let env = mount(&trust, &mounted);
    let bundle = mounted.join(desired::BUNDLE_KEY);
    let cell = run_clients(cell_port, &env, &bundle, dir.path()).await;
    for (label, o) in &cell {
        assert!(
            o.ok && o.out.contains("cell"),
            "{label} against the cell server:\n{}",
            o.out
        );
    }
    let passthrough = run_clients(passthrough_port, &env, &bundle, dir.path()).await;
    for (label, o) in &passthrough {
        assert!(
            !o.ok,
            "{label} trusted a server whose root is not in the bundle:\n{}",
            o.out
        );
    }
}
