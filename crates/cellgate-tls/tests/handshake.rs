//! End to end over real sockets: a rustls client talks to an intercepting acceptor fed through
//! `read_client_hello` + `Rewind`, and the upstream client config verifies (or refuses) servers.

use std::sync::Arc;

use cellgate_tls::{
    classify_error, client_config, read_client_hello, Ca, LeafMinter, MinterConfig, Rewind,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn client_trusting(ca: &Ca, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(cellgate_tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Accepts one connection the way the node does: peek the hello, mint for its SNI, replay.
async fn intercept_once(
    listener: TcpListener,
    minter: Arc<LeafMinter>,
) -> (String, Option<Vec<u8>>) {
    let (mut sock, _) = listener.accept().await.unwrap();
    let peek = read_client_hello(&mut sock).await.unwrap();
    let sni = peek.sni.clone().unwrap();
    let config = minter.server_config(&sni).await.unwrap();
    let mut tls = TlsAcceptor::from(config)
        .accept(Rewind::new(peek.bytes, sock))
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    assert_eq!(conn.server_name(), Some(sni.as_str()));
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    tls.write_all(b"pong").await.unwrap();
    tls.shutdown().await.unwrap();
    (sni, alpn)
}

#[tokio::test]
async fn intercepted_handshake_presents_a_leaf_for_the_sni() {
    let ca = Arc::new(Ca::generate("Cellgate handshake test CA").unwrap());
    let minter = Arc::new(LeafMinter::new(Arc::clone(&ca), MinterConfig::default()));
    for (alpn, expected) in [
        (&[&b"h2"[..], b"http/1.1"][..], Some(b"h2".to_vec())),
        (&[&b"http/1.1"[..]][..], Some(b"http/1.1".to_vec())),
        (&[][..], None),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(intercept_once(listener, Arc::clone(&minter)));

        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("api.example.com").unwrap();
        let mut tls = TlsConnector::from(client_trusting(&ca, alpn))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(
            tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec),
            expected
        );
        tls.write_all(b"ping").await.unwrap();
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"pong");

        let (sni, server_alpn) = server.await.unwrap();
        assert_eq!(sni, "api.example.com");
        assert_eq!(server_alpn, expected);
    }
    assert_eq!(minter.mints(), 1, "one leaf served all three connections");
    assert_eq!(minter.hits(), 2);
}

#[tokio::test]
async fn client_refuses_a_leaf_from_an_untrusted_ca() {
    let ca = Arc::new(Ca::generate("trusted").unwrap());
    let rogue = Arc::new(Ca::generate("rogue").unwrap());
    let minter = Arc::new(LeafMinter::new(rogue, MinterConfig::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let peek = read_client_hello(&mut sock).await.unwrap();
        let config = minter
            .server_config(peek.sni.as_deref().unwrap())
            .await
            .unwrap();
        TlsAcceptor::from(config)
            .accept(Rewind::new(peek.bytes, sock))
            .await
            .is_err()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = TlsConnector::from(client_trusting(&ca, &[b"h2"]))
        .connect(ServerName::try_from("api.example.com").unwrap(), tcp)
        .await
        .unwrap_err();
    assert_eq!(classify_error(&err), Some("upstream_cert_unknown_issuer"));
    assert!(server.await.unwrap(), "server sees the client's alert");
}

/// A TLS server on localhost presenting `config`, answering one connection.
async fn serve(config: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        if let Ok(mut tls) = TlsAcceptor::from(config).accept(sock).await {
            let _ = tls.write_all(b"ok").await;
            let _ = tls.shutdown().await;
        }
    });
    addr
}

#[tokio::test]
async fn upstream_config_trusts_extra_ca_and_labels_unknown_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let upstream_ca = Arc::new(Ca::generate("upstream private CA").unwrap());
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, upstream_ca.cert_pem()).unwrap();
    let client = client_config(&[ca_file], true).unwrap();

    // signed by the extra CA: verified, h2 negotiated
    let upstream = LeafMinter::new(Arc::clone(&upstream_ca), MinterConfig::default());
    let addr = serve(upstream.server_config("upstream.test").await.unwrap()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = TlsConnector::from(Arc::clone(&client))
        .connect(ServerName::try_from("upstream.test").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut body = Vec::new();
    tls.read_to_end(&mut body).await.unwrap();
    assert_eq!(body, b"ok");

    // the same server under another name: name mismatch
    let addr = serve(upstream.server_config("upstream.test").await.unwrap()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = TlsConnector::from(Arc::clone(&client))
        .connect(ServerName::try_from("other.test").unwrap(), tcp)
        .await
        .unwrap_err();
    assert_eq!(classify_error(&err), Some("upstream_cert_name_mismatch"));

    // a self-signed certificate nobody trusts: unknown issuer
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["upstream.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let self_signed = rustls::ServerConfig::builder_with_provider(cellgate_tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let addr = serve(Arc::new(self_signed)).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = TlsConnector::from(client)
        .connect(ServerName::try_from("upstream.test").unwrap(), tcp)
        .await
        .unwrap_err();
    assert_eq!(
        classify_error(&err),
        Some("upstream_cert_unknown_issuer"),
        "{err}"
    );
}
