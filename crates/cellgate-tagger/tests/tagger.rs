//! The tagger over real loopback sockets: a fake node proxy reads the PPv2 header with
//! `cellgate_proxy_protocol::read_header` and then plays a server. No redirect happens here
//! (see `netns.rs` for SO_ORIGINAL_DST), so connections use the configured `--destination`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cellgate_proxy_protocol::{read_header, ProxyHeader};
use cellgate_tagger::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const TOKEN_A: &str = "eyJhbGciOiJFZERTQSJ9.eyJqdGkiOiJhIn0.c2lnLWE";
const TOKEN_B: &str = "eyJhbGciOiJFZERTQSJ9.eyJqdGkiOiJiIn0.c2lnLWI";
const DESTINATION: &str = "192.0.2.10:443";
const TIMEOUT: Duration = Duration::from_secs(10);

/// What the fake node does after reading the header.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Echo bytes back as they arrive; shut down its write side at EOF.
    Echo,
    /// Read to EOF, then answer with a summary of what arrived, then close.
    ReplyAfterEof,
}

struct FakeNode {
    addr: SocketAddr,
    headers: mpsc::UnboundedReceiver<ProxyHeader>,
}

impl FakeNode {
    async fn start(bind: &str, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, headers) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let header = read_header(&mut stream).await.unwrap();
                    tx.send(header).unwrap();
                    match behaviour {
                        Behaviour::Echo => {
                            let (mut r, mut w) = stream.split();
                            tokio::io::copy(&mut r, &mut w).await.unwrap();
                            w.shutdown().await.unwrap();
                        }
                        Behaviour::ReplyAfterEof => {
                            let mut request = Vec::new();
                            stream.read_to_end(&mut request).await.unwrap();
                            let reply = format!(
                                "got {} bytes: {}",
                                request.len(),
                                String::from_utf8_lossy(&request)
                            );
                            stream.write_all(reply.as_bytes()).await.unwrap();
                            stream.shutdown().await.unwrap();
                        }
                    }
                });
            }
        });
        Self { addr, headers }
    }

    async fn next_header(&mut self) -> ProxyHeader {
        tokio::time::timeout(TIMEOUT, self.headers.recv())
            .await
            .expect("the node saw no connection in time")
            .unwrap()
    }
}

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start(config: Config) -> Self {
        let tagger = cellgate_tagger::bind(config).await.unwrap();
        let addr = tagger.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tagger.serve(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(TIMEOUT, &mut self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn token_file(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

fn config(listen: &str, node: SocketAddr, token_file: &Path) -> Config {
    let mut config = Config::new(listen.parse().unwrap(), node, token_file);
    config.destination = Some(DESTINATION.parse().unwrap());
    config
}

async fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut out))
        .await
        .expect("the connection was not closed in time")
        .unwrap();
    out
}

#[tokio::test]
async fn header_carries_source_fallback_destination_and_token_then_echoes() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = FakeNode::start("127.0.0.1:0", Behaviour::Echo).await;
    let tagger = Running::start(config(
        "127.0.0.1:0",
        node.addr,
        &token_file(dir.path(), TOKEN_A),
    ))
    .await;

    let mut agent = TcpStream::connect(tagger.addr).await.unwrap();
    agent.write_all(b"hello through the tagger").await.unwrap();
    let header = node.next_header().await;
    assert_eq!(header.source, agent.local_addr().unwrap());
    assert_eq!(header.destination, DESTINATION.parse().unwrap());
    assert_eq!(header.token, TOKEN_A);

    let mut echoed = [0u8; 24];
    agent.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"hello through the tagger");
    agent.shutdown().await.unwrap();
    assert!(read_all(&mut agent).await.is_empty());
    tagger.stop().await;
}

#[tokio::test]
async fn echoes_a_large_payload_intact() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::start("127.0.0.1:0", Behaviour::Echo).await;
    let tagger = Running::start(config(
        "127.0.0.1:0",
        node.addr,
        &token_file(dir.path(), TOKEN_A),
    ))
    .await;

    let payload: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let agent = TcpStream::connect(tagger.addr).await.unwrap();
    let (mut r, mut w) = agent.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(TIMEOUT, r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");
    tagger.stop().await;
}

#[tokio::test]
async fn half_closed_agent_still_gets_the_whole_response() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = FakeNode::start("127.0.0.1:0", Behaviour::ReplyAfterEof).await;
    let tagger = Running::start(config(
        "127.0.0.1:0",
        node.addr,
        &token_file(dir.path(), TOKEN_A),
    ))
    .await;

    let mut agent = TcpStream::connect(tagger.addr).await.unwrap();
    agent.write_all(b"request body").await.unwrap();
    // The node only answers once it sees EOF, which the tagger must pass on as a half-close.
    agent.shutdown().await.unwrap();
    let reply = read_all(&mut agent).await;
    assert_eq!(reply, b"got 12 bytes: request body");
    assert_eq!(node.next_header().await.token, TOKEN_A);
    tagger.stop().await;
}

#[tokio::test]
async fn a_rotated_token_is_used_by_the_next_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = token_file(dir.path(), TOKEN_A);
    let mut node = FakeNode::start("127.0.0.1:0", Behaviour::ReplyAfterEof).await;
    let tagger = Running::start(config("127.0.0.1:0", node.addr, &path)).await;

    let roundtrip = |addr| async move {
        let mut agent = TcpStream::connect(addr).await.unwrap();
        agent.shutdown().await.unwrap();
        read_all(&mut agent).await
    };
    roundtrip(tagger.addr).await;
    assert_eq!(node.next_header().await.token, TOKEN_A);

    // Rotate the way a Kubernetes Secret volume does: write elsewhere, then rename over.
    let staged = dir.path().join("token.new");
    std::fs::write(&staged, TOKEN_B).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    roundtrip(tagger.addr).await;
    assert_eq!(node.next_header().await.token, TOKEN_B);

    // Caught mid-rotation with an empty file: the last good token is kept.
    std::fs::write(&path, "").unwrap();
    roundtrip(tagger.addr).await;
    assert_eq!(node.next_header().await.token, TOKEN_B);

    // Rewritten in place.
    std::fs::write(&path, TOKEN_A).unwrap();
    roundtrip(tagger.addr).await;
    assert_eq!(node.next_header().await.token, TOKEN_A);
    tagger.stop().await;
}

#[tokio::test]
async fn ipv6_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = FakeNode::start("[::1]:0", Behaviour::ReplyAfterEof).await;
    let mut config = config("[::1]:0", node.addr, &token_file(dir.path(), TOKEN_A));
    config.destination = Some("[2001:db8::443]:8443".parse().unwrap());
    let tagger = Running::start(config).await;
    assert!(tagger.addr.is_ipv6());

    let mut agent = TcpStream::connect(tagger.addr).await.unwrap();
    agent.write_all(b"v6").await.unwrap();
    agent.shutdown().await.unwrap();
    assert_eq!(read_all(&mut agent).await, b"got 2 bytes: v6");
    let header = node.next_header().await;
    assert_eq!(header.source, agent.local_addr().unwrap());
    assert_eq!(header.destination, "[2001:db8::443]:8443".parse().unwrap());
    assert_eq!(header.token, TOKEN_A);
    tagger.stop().await;
}

/// An address nothing listens on: bind a port, then free it.
async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn node_unreachable_closes_the_agent_connection_with_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let tagger = Running::start(config(
        "127.0.0.1:0",
        dead_address().await,
        &token_file(dir.path(), TOKEN_A),
    ))
    .await;

    let mut agent = TcpStream::connect(tagger.addr).await.unwrap();
    let _ = agent.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
    let mut buf = Vec::new();
    let result = tokio::time::timeout(TIMEOUT, agent.read_to_end(&mut buf))
        .await
        .expect("the tagger did not close the connection");
    // A clean close or a reset (the request was left unread): either way, nothing came back.
    if let Err(e) = result {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    assert!(buf.is_empty());
    tagger.stop().await;
}

#[tokio::test]
async fn without_redirect_or_destination_the_connection_is_closed_and_the_node_never_called() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = FakeNode::start("127.0.0.1:0", Behaviour::Echo).await;
    let mut config = config("127.0.0.1:0", node.addr, &token_file(dir.path(), TOKEN_A));
    config.destination = None;
    let tagger = Running::start(config).await;

    let mut agent = TcpStream::connect(tagger.addr).await.unwrap();
    assert!(read_all(&mut agent).await.is_empty());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), node.headers.recv())
            .await
            .is_err(),
        "the node must not be contacted"
    );
    tagger.stop().await;
}

#[tokio::test]
async fn an_unusable_token_file_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let node: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let missing = dir.path().join("absent");
    let err = cellgate_tagger::bind(config("127.0.0.1:0", node, &missing))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(err.to_string().contains("absent"), "{err}");

    let empty = token_file(dir.path(), "");
    let err = cellgate_tagger::bind(config("127.0.0.1:0", node, &empty))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("empty"), "{err}");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_open_connections_finish() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::start("127.0.0.1:0", Behaviour::Echo).await;
    let tagger = Running::start(config(
        "127.0.0.1:0",
        node.addr,
        &token_file(dir.path(), TOKEN_A),
    ))
    .await;
    let addr = tagger.addr;

    let mut open = TcpStream::connect(addr).await.unwrap();
    open.write_all(b"1").await.unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.unwrap();

    let Running { stop, task, .. } = tagger;
    stop.unwrap().send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );

    // The open connection still works during the grace period...
    open.write_all(b"2").await.unwrap();
    open.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"2");
    // ...and serve returns once it is done.
    open.shutdown().await.unwrap();
    assert!(read_all(&mut open).await.is_empty());
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn connections_still_open_after_the_grace_period_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::start("127.0.0.1:0", Behaviour::Echo).await;
    let mut config = config("127.0.0.1:0", node.addr, &token_file(dir.path(), TOKEN_A));
    config.drain_grace = Duration::from_millis(200);
    let tagger = Running::start(config).await;

    let mut open = TcpStream::connect(tagger.addr).await.unwrap();
    open.write_all(b"1").await.unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.unwrap();
    tagger.stop().await;
    assert!(read_all(&mut open).await.is_empty());
}

mod cli {
    use std::process::Command;

    fn tagger() -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellgate-tagger"));
        cmd.env_clear();
        cmd
    }

    #[test]
    fn help_and_version() {
        let out = tagger().arg("--help").output().unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("--token-file FILE"));
        let out = tagger().arg("--version").output().unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("cellgate-tagger 0."));
    }

    #[test]
    fn bad_usage_exits_2_with_a_message() {
        for args in [
            &["--bogus"][..],
            &[],
            &[
                "--listen",
                "nowhere",
                "--node",
                "127.0.0.1:1",
                "--token-file",
                "/t",
            ],
        ] {
            let out = tagger().args(args).output().unwrap();
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("usage: cellgate-tagger"), "{stderr}");
        }
    }

    #[test]
    fn a_missing_token_file_exits_1_naming_the_file() {
        let out = tagger()
            .args(["--listen", "127.0.0.1:0", "--node", "127.0.0.1:1"])
            .env("CELLGATE_TAGGER_TOKEN_FILE", "/nonexistent/cellgate-token")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("/nonexistent/cellgate-token"), "{stderr}");
    }
}
