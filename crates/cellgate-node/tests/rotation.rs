//! The node follows a rotation of its interception CA and of the token signing keys without a
//! restart: real sockets, real TLS handshakes through the node, files changed the way kubelet
//! changes a mounted Secret (a whole new directory swapped in with one rename).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cellgate_identity::SigningKey;
use cellgate_node::kubernetes::contract::ApiServer;
use cellgate_node::NodeConfig;
use cellgate_testing::read_to_end_timeout;
use cellgate_tls::ca::Ca;
use common::{send_h1, Fixture};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::AsyncWriteExt;

/// The CA directory as kubelet keeps a Secret volume: `live` is a symlink to a versioned
/// directory, replaced in one rename.
struct CaVolume {
    root: std::path::PathBuf,
    version: u32,
}

impl CaVolume {
    fn new(root: &std::path::Path, files: &[(&str, String)]) -> Self {
        let mut v = Self {
            root: root.to_path_buf(),
            version: 0,
        };
        v.swap(files);
        v
    }

    fn live(&self) -> std::path::PathBuf {
        self.root.join("live")
    }

    fn swap(&mut self, files: &[(&str, String)]) {
        self.version += 1;
        let dir = self.root.join(format!("v{}", self.version));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let tmp = self.root.join("live.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&dir, &tmp).unwrap();
        std::fs::rename(&tmp, self.live()).unwrap();
    }
}

fn pair(ca: &Ca) -> [(&'static str, String); 2] {
    [
        ("ca.crt", ca.cert_pem().to_string()),
        ("ca.key", ca.key_pem()),
    ]
}

/// Waits (bounded) until `pred` holds.
async fn until(what: &str, pred: impl Fn() -> bool) {
    for _ in 0..200 {
        if pred() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting until {what}");
}

/// TLS through the node to api.test, trusting only `trusted`: the handshake's outcome and, when
/// it succeeds, the stream and the leaf chain the node presented.
async fn handshake(
    f: &Fixture,
    trusted: &Ca,
) -> Result<
    (
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        Vec<CertificateDer<'static>>,
    ),
    std::io::Error,
> {
    let tcp = f.connect(f.https.addr.port(), &f.token("demo")).await;
    let cfg = cellgate_testing::client_config(trusted.cert_pem(), &[b"http/1.1"]);
    let name = ServerName::try_from("api.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    Ok((tls, chain))
}

fn get(f: &Fixture) -> http::Request<Empty<Bytes>> {
    http::Request::builder()
        .uri("/v1/models")
        .header("host", format!("api.test:{}", f.https.addr.port()))
        .body(Empty::new())
        .unwrap()
}

/// Whether `chain` verifies for api.test against `ca` alone, as a client trusting only it would.
fn verifies(ca: &Ca, chain: &[CertificateDer<'static>]) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        cellgate_tls::crypto_provider(),
    )
    .build()
    .unwrap();
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from("api.test").unwrap(),
            &[],
            UnixTime::now(),
        )
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_loads_a_new_ca_then_signs_with_it_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old = Ca::generate("Old CA").unwrap();
    let new = Ca::generate("New CA").unwrap();
    let mut volume = CaVolume::new(dir.path(), &pair(&old));
    let live = volume.live();
    let f = Fixture::start_with(|c: &mut NodeConfig| c.ca_dir = Some(live)).await;
    let shared = f.node().shared.clone();
    assert_eq!(
        cellgate_node::ca_reload::loaded(&shared),
        vec![old.fingerprint().to_string()]
    );

    // Before: a client trusting only the old CA is served; one trusting only the new is not.
    let (tls, before) = handshake(&f, &old).await.expect("old CA trusted");
    assert!(verifies(&old, &before) && !verifies(&new, &before));
    // An agent's connection opened now, kept alive across the whole rotation.
    let (mut kept, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(kept.send_request(get(&f)).await.unwrap().status(), 200);
    assert!(handshake(&f, &new).await.is_err());

    // Introduced: the new CA appears as next.crt/next.key; it is loaded, the old one still signs.
    let [c, k] = pair(&old);
    volume.swap(&[
        c,
        k,
        ("next.crt", new.cert_pem().to_string()),
        ("next.key", new.key_pem()),
    ]);
    until("the node loads the new CA", || {
        cellgate_node::ca_reload::loaded(&shared).len() == 2
    })
    .await;
    let report = cellgate_node::ca_reload::current_report(&shared);
    assert_eq!(
        report.loaded,
        vec![old.fingerprint().to_string(), new.fingerprint().to_string()]
    );
    assert_eq!(report.signing, old.fingerprint());
    let (_, introduced) = handshake(&f, &old).await.expect("still the old CA");
    assert!(verifies(&old, &introduced));
    assert!(handshake(&f, &new).await.is_err());

    // Active: the new CA becomes ca.crt/ca.key. New handshakes get a leaf of the new CA at once
    // (the cached leaf of the old CA is not served again).
    volume.swap(&pair(&new));
    until("the node signs with the new CA", || {
        shared.minter.ca().fingerprint() == new.fingerprint()
    })
    .await;
    assert_eq!(
        cellgate_node::ca_reload::loaded(&shared),
        vec![new.fingerprint().to_string()]
    );
    let (tls, after) = handshake(&f, &new).await.expect("new CA trusted");
    assert!(verifies(&new, &after) && !verifies(&old, &after));
    assert_eq!(
        send_h1(tls, get(&f)).await.status,
        200,
        "a request over a leaf of the new CA"
    );
    // A client trusting only the old CA no longer accepts what the node presents.
    let err = handshake(&f, &old)
        .await
        .expect_err("old CA no longer signs");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // The leaf minted before the switch is still good for a client trusting only the old CA, and
    // the connection opened before the switch still carries requests: no agent restart.
    assert!(verifies(&old, &before));
    assert_eq!(kept.send_request(get(&f)).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_files_that_do_not_load_leave_the_ca_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let old = Ca::generate("Old CA").unwrap();
    let other = Ca::generate("Other CA").unwrap();
    let mut volume = CaVolume::new(dir.path(), &pair(&old));
    let live = volume.live();
    let f = Fixture::start_with(|c: &mut NodeConfig| c.ca_dir = Some(live)).await;
    let shared = f.node().shared.clone();
    // A certificate with another CA's key, then a next.crt without its key: both refused.
    volume.swap(&[
        ("ca.crt", other.cert_pem().to_string()),
        ("ca.key", old.key_pem()),
    ]);
    let refused = || {
        shared
            .metrics
            .encode()
            .lines()
            .any(|l| l.starts_with("cellgate_reload_failures_total{outcome=\"ca\"}"))
    };
    until("the reload is refused", refused).await;
    let [c, k] = pair(&old);
    volume.swap(&[c, k, ("next.crt", other.cert_pem().to_string())]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(shared.minter.ca().fingerprint(), old.fingerprint());
    assert_eq!(
        cellgate_node::ca_reload::loaded(&shared),
        vec![old.fingerprint().to_string()]
    );
    let (_, chain) = handshake(&f, &old).await.expect("old CA still signs");
    assert!(verifies(&old, &chain));
}

/// A request through the node with `token`: `Ok(status)`, or `Err(())` when the node closed the
/// connection without an answer (how it refuses a token).
async fn request_with(f: &Fixture, token: &str) -> Result<u16, ()> {
    let mut s = f.connect(f.http.addr.port(), token).await;
    let _ = s
        .write_all(
            format!(
                "GET /public/x HTTP/1.1\r\nHost: plain.test:{}\r\nConnection: close\r\n\r\n",
                f.http.addr.port()
            )
            .as_bytes(),
        )
        .await;
    let got = read_to_end_timeout(&mut s, Duration::from_secs(7)).await;
    let text = String::from_utf8_lossy(&got);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok());
    status.ok_or(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_keys_rotate_by_key_id_without_a_restart() {
    let f = Fixture::start().await;
    let shared = f.node().shared.clone();
    let trust = f.dir.path().join("keys/signing.pub");
    let old_token = f.token("demo");
    let new_key = SigningKey::generate().unwrap();
    let new_token = cellgate_identity::token::issue(&new_key, &f.claims("demo")).unwrap();
    assert_eq!(request_with(&f, &old_token).await, Ok(200));
    assert_eq!(request_with(&f, &new_token).await, Err(()));
    f.wait_audit(|r| r["reason"] == "token_unknown_key").await;

    // Step 1: the trust set holds both keys (a JWK set, as `cellgate keys jwks` writes it).
    let set = format!(
        "{{\"keys\":[{},{}]}}\n",
        f.key.public_key().to_jwk_json(),
        new_key.public_key().to_jwk_json()
    );
    std::fs::write(&trust, set).unwrap();
    until("the node trusts both keys", || {
        shared.verifier.key_ids().len() == 2
    })
    .await;
    assert!(cellgate_node::ca_reload::current_report(&shared)
        .token_keys
        .contains(&new_key.kid().to_string()));
    // Step 2 (the operator signs with the new key): tokens of either key verify meanwhile.
    assert_eq!(request_with(&f, &new_token).await, Ok(200));
    assert_eq!(request_with(&f, &old_token).await, Ok(200));

    // A trust file that does not parse changes nothing.
    std::fs::write(&trust, "{\"keys\": [").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(shared.verifier.key_ids().len(), 2);
    assert_eq!(request_with(&f, &old_token).await, Ok(200));

    // Step 3: the old key is removed; its tokens are refused from then on, the new ones verify.
    std::fs::write(&trust, new_key.public_key().to_jwk_json()).unwrap();
    until("the node trusts the new key alone", || {
        shared.verifier.key_ids() == vec![new_key.kid().to_string()]
    })
    .await;
    assert_eq!(request_with(&f, &old_token).await, Err(()));
    assert_eq!(request_with(&f, &new_token).await, Ok(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_kubernetes_mode_the_node_reports_what_it_loaded_in_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let old = Ca::generate("Old CA").unwrap();
    let new = Ca::generate("New CA").unwrap();
    let mut volume = CaVolume::new(dir.path(), &pair(&old));
    let key = SigningKey::generate().unwrap();
    key.write_pair(&dir.path().join("keys")).unwrap();
    let (client, api) = ApiServer::start();
    let mut config = NodeConfig::defaults();
    config.kubernetes = true;
    config.node_name = "node-a".into();
    config.pod_name = Some("cellgate-node-x1".into());
    config.control_namespace = "cellgate-system".into();
    config.trust = vec![dir.path().join("keys/signing.pub")];
    config.audit = dir.path().join("audit.jsonl");
    config.ca_dir = Some(volume.live());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.admin = "127.0.0.1:0".parse().unwrap();
    let node = cellgate_node::run_with(config, Some(client)).await.unwrap();

    const LEASE: &str =
        "/apis/coordination.k8s.io/v1/namespaces/cellgate-system/leases/cellgate-node-node-a";
    let report_with = |n: usize| {
        let api = &api;
        async move {
            api.wait_call(Duration::from_secs(10), |c| {
                c.method == http::Method::PATCH
                    && c.path() == LEASE
                    && serde_json::from_slice::<serde_json::Value>(&c.body).unwrap()["metadata"]
                        ["annotations"]["cellgate.dev/ca-loaded"]
                        .as_str()
                        .unwrap()
                        .split(',')
                        .count()
                        == n
            })
            .await
        }
    };
    let first = report_with(1).await;
    assert_eq!(
        first.query().get("fieldManager").map(String::as_str),
        Some("cellgate-node")
    );
    assert_eq!(first.query().get("force").map(String::as_str), Some("true"));
    assert_eq!(
        first.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    let body: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(body["spec"]["holderIdentity"], "node-a");
    assert_eq!(body["metadata"]["labels"]["cellgate.dev/node-report"], "ca");
    let a = &body["metadata"]["annotations"];
    assert_eq!(a["cellgate.dev/pod"], "cellgate-node-x1");
    assert_eq!(a["cellgate.dev/ca-signing"], old.fingerprint());
    assert_eq!(a["cellgate.dev/token-keys"], key.kid());

    let [c, k] = pair(&old);
    volume.swap(&[
        c,
        k,
        ("next.crt", new.cert_pem().to_string()),
        ("next.key", new.key_pem()),
    ]);
    let second = report_with(2).await;
    let body: serde_json::Value = serde_json::from_slice(&second.body).unwrap();
    let a = &body["metadata"]["annotations"];
    assert_eq!(
        a["cellgate.dev/ca-loaded"],
        format!("{},{}", old.fingerprint(), new.fingerprint())
    );
    assert_eq!(a["cellgate.dev/ca-signing"], old.fingerprint());
    node.shutdown().await;
}
