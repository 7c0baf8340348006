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

/// Opens an agent connection and proves it reaches the node: one byte goes out and comes back
/// echoed. `None` when the tagger closed it instead.
async fn open_and_echo(tagger: SocketAddr) -> Option<TcpStream> {
    let mut agent = TcpStream::connect(tagger).await.unwrap();
    // A write may still succeed on a connection the tagger already closed; the read tells.
    let _ = agent.write_all(b"x").await;
    let mut one = [0u8; 1];
    match tokio::time::timeout(TIMEOUT, agent.read(&mut one)).await {
        Ok(Ok(1)) => {
            assert_eq!(&one, b"x");
            Some(agent)
        }
        Ok(Ok(_)) | Ok(Err(_)) => None,
        Err(_) => panic!("the connection was neither echoed nor closed in time"),
    }
}

#[tokio::test]
async fn max_connections_closes_the_one_over_the_ceiling_before_the_node_and_frees_slots() {
    const MAX: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let mut node = FakeNode::start("127.0.0.1:0", Behaviour::Echo).await;
    let mut config = config("127.0.0.1:0", node.addr, &token_file(dir.path(), TOKEN_A));
    config.max_connections = Some(MAX);
    let tagger = Running::start(config).await;

    // MAX connections pass, each announced to the node with the cell's token, and stay open.
    let mut open = Vec::new();
    for _ in 0..MAX {
        let agent = open_and_echo(tagger.addr)
            .await
            .expect("a connection under the ceiling passes");
        let header = node.next_header().await;
        assert_eq!(header.source, agent.local_addr().unwrap());
        assert_eq!(header.token, TOKEN_A);
        open.push(agent);
    }

    // One more is closed without a byte back, and the node never hears of it.
    for _ in 0..2 {
        assert!(
            open_and_echo(tagger.addr).await.is_none(),
            "a connection over the ceiling was forwarded"
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), node.headers.recv())
            .await
            .is_err(),
        "the node must not be contacted over the ceiling"
    );
    // The open ones are unaffected.
    for agent in &mut open {
        agent.write_all(b"y").await.unwrap();
        let mut one = [0u8; 1];
        agent.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"y");
    }

    // Ending one frees its slot: the next connection passes (retried briefly, since the agent
    // sees the close a moment before the tagger's task for it has finished).
    let mut done = open.pop().unwrap();
    done.shutdown().await.unwrap();
    assert!(read_all(&mut done).await.is_empty());
    drop(done);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let again = loop {
        if let Some(agent) = open_and_echo(tagger.addr).await {
            break agent;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed slot never became usable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let header = node.next_header().await;
    assert_eq!(header.source, again.local_addr().unwrap());
    assert_eq!(header.destination, DESTINATION.parse().unwrap());
    // ...and the ceiling still holds with it.
    assert!(open_and_echo(tagger.addr).await.is_none());
    drop((open, again));
    tagger.stop().await;
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
    fn max_connections_zero_or_garbage_exits_2() {
        for (flag, env) in [(Some("0"), None), (Some("many"), None), (None, Some("0"))] {
            let mut cmd = tagger();
            cmd.args([
                "--listen",
                "127.0.0.1:0",
                "--node",
                "127.0.0.1:1",
                "--token-file",
                "/t",
            ]);
            if let Some(v) = flag {
                cmd.args(["--max-connections", v]);
            }
            if let Some(v) = env {
                cmd.env("CELLGATE_TAGGER_MAX_CONNECTIONS", v);
            }
            let out = cmd.output().unwrap();
            assert_eq!(out.status.code(), Some(2), "{flag:?} {env:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("is not a whole number from 1"), "{stderr}");
        }
    }

    /// The binary's log at the ceiling: a warning naming it, at most one per second however
    /// many connections are closed, the next one counting those not logged.
    #[test]
    fn closing_at_the_ceiling_logs_a_rate_limited_warning_naming_it() {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::time::{Duration, Instant};

        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, super::TOKEN_A).unwrap();
        let node = TcpListener::bind("127.0.0.1:0").unwrap();
        let node_addr = node.local_addr().unwrap();
        // The node: accepts and holds every connection.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in node.incoming() {
                held.push(stream);
            }
        });
        // A free port for the tagger (bind, then free it).
        let listen = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut child = tagger()
            .args(["--listen", &listen.to_string()])
            .args(["--node", &node_addr.to_string()])
            .args(["--token-file", token.to_str().unwrap()])
            .args(["--destination", super::DESTINATION])
            .env("CELLGATE_TAGGER_MAX_CONNECTIONS", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let held = loop {
            match TcpStream::connect(listen) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("the tagger did not start: {e}"),
            }
        };
        // The tagger accepts in order: `held` has the one slot, every later connection is over.
        let closed = |n: usize| {
            for _ in 0..n {
                let mut agent = TcpStream::connect(listen).unwrap();
                agent
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let _ = agent.write_all(b"x");
                let mut buf = [0u8; 1];
                // Closed (EOF or reset), never an answer.
                assert!(matches!(agent.read(&mut buf), Ok(0) | Err(_)));
            }
        };
        let started = Instant::now();
        closed(20);
        let flood = started.elapsed();
        std::thread::sleep(Duration::from_millis(1100));
        closed(1);
        drop(held);
        child.kill().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let _ = child.wait();
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("(--max-connections 1)"))
            .collect();
        assert!(stderr.contains("connection ceiling 1"), "{stderr}");
        assert!(
            warnings[0].starts_with("cellgate-tagger warn: closing connection from 127.0.0.1:"),
            "{stderr}"
        );
        assert!(
            warnings[0]
                .contains("without contacting the node: 1 connection(s) already open, the ceiling"),
            "{stderr}"
        );
        // 21 closed connections; 20 of them within `flood`, so at most one line per second
        // started, plus the last one.
        let most = usize::try_from(flood.as_secs()).unwrap() + 2;
        assert!(
            (2..=most).contains(&warnings.len()),
            "{} warnings for 21 closed connections in {flood:?}:\n{stderr}",
            warnings.len()
        );
        let counted: u64 = warnings
            .iter()
            .filter_map(|l| l.split("; ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(
            counted + warnings.len() as u64,
            21,
            "every closed connection is logged or counted:\n{stderr}"
        );
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
