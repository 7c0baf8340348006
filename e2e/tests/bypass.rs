//! The bypass suite: a real cell made by `cellgate run` (network namespace, veth pair,
//! `cellgate-init` rules, the tagger, the node), an allowed and a denied HTTPS request, and every
//! way around the boundary we know of. Each attempt is checked three ways:
//!
//! - from inside: what the agent's own call returned (`scripts/agent.py`, run as `nobody`);
//! - by an observer outside the cell, in the host's network namespace, that records every
//!   connection, byte and datagram it receives on the addresses and ports the cell aims at
//!   (TCP on `[::]`/`0.0.0.0`, UDP on the same and on 443), and by a wire observer on the host
//!   end of the veth pair (`scripts/sniff.py`) that sees every frame leaving the cell: the only
//!   frames allowed are ARP and IPv4 to the node (intake 15001, DNS 53);
//! - where the attempt reaches the node, by its audit record (`reason`, `source`, `destination`).
//!
//! Needs root and the workspace's binaries (`cargo build --bins`); without either every test
//! fails with a message saying so. Tests share fixed ports (UDP 443), so they take turns.
//! `docs/bypass.md` is the table of what these tests check and what they saw.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::process::{Child, Command};

const AGENT_PY: &str = include_str!("../scripts/agent.py");
const SNIFF_PY: &str = include_str!("../scripts/sniff.py");
/// The node's intake port in local mode.
const INTAKE_PORT: u16 = 15001;
/// The IPv6 prefix the test puts on the link (the cell's own rules drop IPv6 entirely).
const HOST_IP6: &str = "fd42:e2e::1";
const CELL_IP6: &str = "fd42:e2e::2";
/// The system's interpreter: the agent runs as `nobody`, who cannot use root's pyenv shims.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Bound on each test, set-up and teardown included.
const TEST_LIMIT: Duration = Duration::from_secs(150);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ------------------------------------------------------------------------------------------
// Preconditions
// ------------------------------------------------------------------------------------------

use cellgate_e2e::require_root;

fn bin_dir() -> PathBuf {
    let dir = cellgate_e2e::workspace().join("target/debug");
    for b in [
        "cellgate",
        "cellgate-init",
        "cellgate-tagger",
        "cellgate-demo-upstream",
    ] {
        assert!(
            dir.join(b).is_file(),
            "{} is missing: build the binaries first: cargo build --bins",
            dir.join(b).display()
        );
    }
    dir
}

fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

// ------------------------------------------------------------------------------------------
// The observer outside the cell
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Seen {
    what: String,
    peer: SocketAddr,
    bytes: Vec<u8>,
}

/// Listens in the host's namespace on every address (`[::]` and `0.0.0.0`) and records all it
/// receives. It answers TCP with `OBSERVER\n`, so a leak is visible from inside as well.
#[derive(Debug)]
struct Observer {
    tcp: u16,
    http: u16,
    udp: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Observer {
    async fn start() -> Self {
        let mut o = Observer {
            tcp: 0,
            http: 0,
            udp: 0,
            seen: Arc::default(),
            tasks: Vec::new(),
        };
        o.tcp = o.tcp_on("tcp").await;
        o.http = o.tcp_on("http").await;
        o.udp = o.udp_on("udp", 0).await;
        o.udp_on("udp/443 (QUIC)", 443).await;
        o
    }

    async fn tcp_on(&mut self, label: &'static str) -> u16 {
        let mut listeners = Vec::new();
        let port = match TcpListener::bind(("::", 0)).await {
            Ok(l) => {
                let port = l.local_addr().expect("local addr").port();
                listeners.push(l);
                port
            }
            Err(_) => 0,
        };
        // Not dual-stack (or no IPv6): IPv4 on its own socket.
        if let Ok(l) = TcpListener::bind(("0.0.0.0", port)).await {
            let p = l.local_addr().expect("local addr").port();
            listeners.push(l);
            if port == 0 {
                return self.spawn_tcp(label, listeners, p);
            }
        }
        self.spawn_tcp(label, listeners, port)
    }

    fn spawn_tcp(&mut self, label: &'static str, listeners: Vec<TcpListener>, port: u16) -> u16 {
        for l in listeners {
            let seen = self.seen.clone();
            self.tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((mut s, peer)) = l.accept().await else {
                        continue;
                    };
                    push(
                        &seen,
                        format!("{label}: connection accepted"),
                        peer,
                        Vec::new(),
                    );
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let _ = s.write_all(b"OBSERVER\n").await;
                        let mut buf = Vec::new();
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            (&mut s).take(65536).read_to_end(&mut buf),
                        )
                        .await;
                        if !buf.is_empty() {
                            push(&seen, format!("{label}: bytes"), peer, buf);
                        }
                    });
                }
            }));
        }
        port
    }

    async fn udp_on(&mut self, label: &'static str, port: u16) -> u16 {
        let mut sockets = Vec::new();
        let mut port = port;
        if let Ok(s) = UdpSocket::bind(("::", port)).await {
            port = s.local_addr().expect("local addr").port();
            sockets.push(s);
        }
        if let Ok(s) = UdpSocket::bind(("0.0.0.0", port)).await {
            port = s.local_addr().expect("local addr").port();
            sockets.push(s);
        }
        assert!(
            !sockets.is_empty(),
            "the observer cannot listen on UDP port {port} (in use?)"
        );
        for s in sockets {
            let seen = self.seen.clone();
            self.tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    if let Ok((n, peer)) = s.recv_from(&mut buf).await {
                        push(
                            &seen,
                            format!("{label}: datagram"),
                            peer,
                            buf.get(..n).unwrap_or_default().to_vec(),
                        );
                    }
                }
            }));
        }
        port
    }

    fn assert_saw_nothing(&self, context: &str) {
        let seen = self.seen.lock().expect("observer lock").clone();
        assert!(
            seen.is_empty(),
            "BYPASS ({context}): the observer outside the cell received {} event(s): {:#?}",
            seen.len(),
            seen.iter()
                .map(|s| format!(
                    "{} from {}: {:?}",
                    s.what,
                    s.peer,
                    String::from_utf8_lossy(&s.bytes)
                ))
                .collect::<Vec<_>>()
        );
    }
}

fn push(seen: &Mutex<Vec<Seen>>, what: String, peer: SocketAddr, bytes: Vec<u8>) {
    if let Ok(mut s) = seen.lock() {
        s.push(Seen { what, peer, bytes });
    }
}

/// The wire observer on the host end of the cell's veth pair.
#[derive(Debug)]
struct Sniffer {
    child: Child,
    frames: Arc<Mutex<Vec<Value>>>,
}

impl Sniffer {
    async fn start(ifname: &str, host_ip: Ipv4Addr) -> Self {
        let mut child = Command::new(SYSTEM_PYTHON)
            .args(["-c", SNIFF_PY, ifname, &host_ip.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 for the wire observer");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("the wire observer did not start in 10 s")
            .expect("reading the wire observer");
        assert!(
            ready.is_some_and(|l| l.contains("ready")),
            "the wire observer did not start"
        );
        let frames: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = frames.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                if let (Ok(v), Ok(mut f)) = (serde_json::from_str::<Value>(&l), sink.lock()) {
                    f.push(v);
                }
            }
        });
        Sniffer { child, frames }
    }

    /// Stops it and returns the frames the cell sent that were not to the node.
    async fn unexpected(mut self) -> (usize, Vec<Value>) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let frames = self.frames.lock().expect("frames").clone();
        let n = frames.len();
        (
            n,
            frames
                .into_iter()
                .filter(|f| f["expected"] != Value::Bool(true))
                .collect(),
        )
    }
}

// ------------------------------------------------------------------------------------------
// The fixture: a work dir, an HTTPS upstream for api.e2e, the observer, the cell's manifest
// ------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Fixture {
    dir: tempfile::TempDir,
    bin: PathBuf,
    up_port: u16,
    up_ca: PathBuf,
    obs: Observer,
    cell: PathBuf,
    audit: PathBuf,
    _upstream: Child,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

async fn fixture() -> Fixture {
    require_root();
    let bin = bin_dir();
    let serial = SERIAL.lock().await;
    let dir = tempfile::Builder::new()
        .prefix("cellgate-e2e-")
        .tempdir()
        .expect("tempdir");
    // The agent runs as nobody: it reads its script and go.json from here.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let agent = dir.path().join("agent.py");
    std::fs::write(&agent, AGENT_PY).expect("agent.py");
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o644)).expect("chmod");

    let mut upstream = Command::new(bin.join("cellgate-demo-upstream"))
        .args(["--names", "api.e2e", "--ca-out"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("starting cellgate-demo-upstream");
    let mut lines = BufReader::new(upstream.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the upstream did not start in 10 s")
        .expect("reading the upstream")
        .unwrap_or_default();
    let up_port: u16 = line
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected upstream output {line:?}"));

    let obs = Observer::start().await;
    let cell = dir.path().join("cell.yaml");
    std::fs::write(
        &cell,
        format!(
            "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata:
  name: e2e-agent
  namespace: default
spec:
  capabilities:
    - name: e2e-api
      destinations:
        - host: api.e2e
          ports: [{up_port}]
      http:
        methods: [GET]
        paths: [\"/v1/**\"]
"
        ),
    )
    .expect("cell.yaml");
    Fixture {
        up_ca: dir.path().join("upstream-ca.pem"),
        audit: dir.path().join("audit.jsonl"),
        dir,
        bin,
        up_port,
        obs,
        cell,
        _upstream: upstream,
        _serial: serial,
    }
}

// ------------------------------------------------------------------------------------------
// One `cellgate run`
// ------------------------------------------------------------------------------------------

/// Removes what a run left if it did not tear down itself (killed, or the test failed).
#[derive(Debug)]
struct NsCleanup {
    name: String,
    pid: u32,
}

impl Drop for NsCleanup {
    fn drop(&mut self) {
        if !Path::new("/run/netns").join(&self.name).exists() {
            return;
        }
        if let Ok(pids) = sh("ip", &["netns", "pids", &self.name]) {
            for p in pids.split_whitespace() {
                let _ = sh("kill", &["-KILL", p]);
            }
        }
        let _ = sh("ip", &["netns", "del", &self.name]);
        let _ = sh("ip", &["link", "del", &format!("cgh{}", self.pid)]);
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
        let _ = std::fs::remove_dir_all(Path::new("/run/cellgate").join(&self.name));
    }
}

#[derive(Debug)]
struct Run {
    child: Child,
    name: String,
    host_ip: Ipv4Addr,
    cell_ip: Ipv4Addr,
    lines: tokio::sync::mpsc::UnboundedReceiver<Value>,
    stderr: Arc<Mutex<String>>,
    sniffer: Option<Sniffer>,
    _cleanup: NsCleanup,
}

impl Run {
    fn state(&self) -> PathBuf {
        Path::new("/run/cellgate").join(&self.name)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The agent's next JSON line.
    async fn next(&mut self, limit: Duration) -> Value {
        match tokio::time::timeout(limit, self.lines.recv()).await {
            Ok(Some(v)) => v,
            Ok(None) => panic!("the run ended early; stderr:\n{}", self.stderr()),
            Err(_) => panic!(
                "no output from the agent within {limit:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// The agent's lines up to `done`, by attempt (in order).
    async fn attempts(&mut self, limit: Duration) -> BTreeMap<String, Vec<Value>> {
        let end = Instant::now() + limit;
        let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        loop {
            let v = self
                .next(end.saturating_duration_since(Instant::now()))
                .await;
            let name = v["attempt"].as_str().unwrap_or("?").to_string();
            if name == "done" {
                return out;
            }
            assert!(name != "setup", "the agent could not start: {v}");
            out.entry(name).or_default().push(v);
        }
    }

    /// Waits for the run to end (it tears the cell down itself) and stops the wire observer.
    async fn finish(mut self) -> (Option<i32>, String, (usize, Vec<Value>)) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("cellgate run did not end within 30 s of its command")
            .expect("waiting for cellgate run");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let frames = match self.sniffer.take() {
            Some(s) => s.unexpected().await,
            None => (0, Vec::new()),
        };
        (status.code(), self.stderr(), frames)
    }
}

async fn wait_path(path: &Path, child: &mut Child, stderr: &Mutex<String>) {
    let end = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "cellgate run exited ({st}) before {} appeared; stderr:\n{}",
                path.display(),
                stderr.lock().map(|s| s.clone()).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < end,
            "{} did not appear within 30 s",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `cellgate run -- python3 agent.py MODE`, then prepares the link while the agent waits:
/// IPv6 addresses on both ends (so an IPv6 attempt has somewhere real to go), ICMP echo sockets
/// permitted for every group in the cell (so the ICMP attempt is stopped by the rules, not by a
/// sysctl), the wire observer; then writes go.json with the addresses and ports.
async fn start_run(fx: &Fixture, mode: &str) -> Run {
    let mut child = Command::new(fx.bin.join("cellgate"))
        .arg("run")
        .arg("-f")
        .arg(&fx.cell)
        .arg("--upstream-ca")
        .arg(&fx.up_ca)
        .arg("--resolve")
        .arg(format!("api.e2e:{}:127.0.0.1", fx.up_port))
        // If a denied name were ever reached, it would reach the observer.
        .arg("--resolve")
        .arg(format!("denied.e2e:{}:127.0.0.1", fx.obs.tcp))
        .arg("--audit")
        .arg(&fx.audit)
        .args(["--", SYSTEM_PYTHON])
        .arg(fx.dir.path().join("agent.py"))
        .arg(mode)
        .env("E2E_DIR", fx.dir.path())
        // The agent is `nobody`: no user-local interpreter shims on its PATH.
        .env("PATH", SYSTEM_PATH)
        .current_dir(fx.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting cellgate run");
    let pid = child.id().expect("pid");
    let name = format!("cgrun-{pid}");
    let cleanup = NsCleanup {
        name: name.clone(),
        pid,
    };
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    tokio::spawn(async move {
        while let Ok(Some(l)) = out.next_line().await {
            let v = serde_json::from_str::<Value>(&l)
                .unwrap_or_else(|_| serde_json::json!({"attempt": "output", "line": l}));
            if v["attempt"] != "output" && tx.send(v).is_err() {
                return;
            }
        }
    });
    let stderr: Arc<Mutex<String>> = Arc::default();
    let sink = stderr.clone();
    let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
    tokio::spawn(async move {
        while let Ok(Some(l)) = err.next_line().await {
            if let Ok(mut s) = sink.lock() {
                s.push_str(&l);
                s.push('\n');
            }
        }
    });

    let resolv = Path::new("/etc/netns").join(&name).join("resolv.conf");
    wait_path(&resolv, &mut child, &stderr).await;
    let host_ip: Ipv4Addr = std::fs::read_to_string(&resolv)
        .expect("resolv.conf")
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("nameserver in the cell's resolv.conf");
    let cell_ip = Ipv4Addr::from(u32::from(host_ip) + 1);
    let (hv, cv) = (format!("cgh{pid}"), format!("cgc{pid}"));
    sh(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{HOST_IP6}/64"),
            "dev",
            &hv,
            "nodad",
        ],
    )
    .expect("IPv6 address on the host end");
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &name,
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{CELL_IP6}/64"),
            "dev",
            &cv,
            "nodad",
        ],
    )
    .expect("IPv6 address on the cell end");
    let host_ll = sh(
        "ip",
        &["-6", "-o", "addr", "show", "dev", &hv, "scope", "link"],
    )
    .ok()
    .and_then(|o| {
        o.split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .map(|a| a.split('/').next().unwrap_or_default().to_string())
    });
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &name,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ping_group_range=0 2147483647",
        ],
    )
    .expect("ping_group_range in the cell");
    // The wire observer watches from the moment the agent exists: the cell's rules are in place
    // before the agent starts (the kernel's own IPv6 link-up chatter before that is no agent's).
    wait_agent(&name, &mut child, &stderr).await;
    let sniffer = Sniffer::start(&hv, host_ip).await;
    let go = serde_json::json!({
        "host_ip": host_ip.to_string(),
        "cell_ip": cell_ip.to_string(),
        "host_ip6": HOST_IP6,
        "host_ll": host_ll,
        "cell_if": cv,
        "up_port": fx.up_port,
        "obs_tcp": fx.obs.tcp,
        "obs_http": fx.obs.http,
        "obs_udp": fx.obs.udp,
    });
    write_signal(fx, "go.json", &go);
    Run {
        child,
        name,
        host_ip,
        cell_ip,
        lines,
        stderr,
        sniffer: Some(sniffer),
        _cleanup: cleanup,
    }
}

/// Waits until a process of the agent user (nobody) runs in the cell's namespace.
async fn wait_agent(name: &str, child: &mut Child, stderr: &Mutex<String>) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let pids = sh("ip", &["netns", "pids", name]).unwrap_or_default();
        let agent = pids.split_whitespace().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|st| {
                st.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .is_some_and(|l| l.split_whitespace().nth(1) == Some("65534"))
            })
        });
        if agent {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "cellgate run exited ({st}) before the agent started; stderr:\n{}",
                stderr.lock().map(|s| s.clone()).unwrap_or_default()
            );
        }
        assert!(Instant::now() < end, "the agent did not start within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn write_signal(fx: &Fixture, name: &str, v: &Value) {
    let tmp = fx.dir.path().join(format!(".{name}"));
    std::fs::write(&tmp, v.to_string()).expect("signal file");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::rename(&tmp, fx.dir.path().join(name)).expect("signal file");
}

// ------------------------------------------------------------------------------------------
// Audit and judgement helpers
// ------------------------------------------------------------------------------------------

fn audit(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Collects failures so one run reports every attempt that did not hold, not just the first.
#[derive(Debug, Default)]
struct Verdicts {
    failures: Vec<String>,
    table: Vec<String>,
}

impl Verdicts {
    fn check(&mut self, ok: bool, attempt: &str, what: String) {
        if !ok {
            self.failures.push(format!("{attempt}: {what}"));
        }
    }

    fn row(&mut self, attempt: &str, inside: String, audit: String) {
        self.table
            .push(format!("| {attempt} | {inside} | {audit} |"));
    }

    fn assert_all(&self, context: &str) {
        eprintln!("{context}:\n{}", self.table.join("\n"));
        assert!(
            self.failures.is_empty(),
            "{context}: {} check(s) did not hold:\n  {}",
            self.failures.len(),
            self.failures.join("\n  ")
        );
    }
}

/// The audit record of an attempt made from `local` (the agent's own address and port).
fn record_from<'a>(records: &'a [Value], local: &str) -> Option<&'a Value> {
    records.iter().find(|r| s(&r["source"]) == local)
}

fn brief(v: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(st) = v["status"].as_u64() {
        parts.push(format!("HTTP {st}"));
    }
    if let Some(r) = v["json"]["reason"].as_str() {
        parts.push(format!("reason {r}"));
    }
    if let Some(e) = v["error"].as_str() {
        let text: String = e.chars().take(70).collect();
        match v["errno"].as_str() {
            Some(n) if !e.starts_with("SSL") => parts.push(format!("{n} ({text})")),
            _ => parts.push(text),
        }
    }
    if let Some(rc) = v["rc"].as_i64() {
        parts.push(format!(
            "exit {rc}: {}",
            s(&v["stderr"]).trim().lines().next().unwrap_or("")
        ));
    }
    if let Some(rc) = v["rcode"].as_u64() {
        parts.push(format!("rcode {rc}"));
    }
    if v["connected"] == Value::Bool(true) && v["status"].is_null() {
        parts.push(format!(
            "connected, then closed with {} bytes{}",
            s(&v["recv"]).len(),
            if v["reset"] == Value::Bool(true) {
                " (reset)"
            } else {
                ""
            }
        ));
    }
    parts.join(", ")
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {TEST_LIMIT:?}"));
}

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_https_succeeds_and_denied_gets_json_403() {
    bounded(async {
        let fx = fixture().await;
        let mut run = start_run(&fx, "basic").await;
        let a = run.attempts(Duration::from_secs(60)).await;
        let (code, stderr, (frames, unexpected)) = run.finish().await;
        assert_eq!(code, Some(0), "cellgate run failed; stderr:\n{stderr}");

        let ok = &a["allowed_https"][0];
        assert_eq!(ok["status"], 200, "allowed request: {ok}");
        assert_eq!(ok["json"]["uri"], "/v1/hello", "the upstream's echo: {ok}");
        let no = &a["denied_https"][0];
        assert_eq!(no["status"], 403, "denied request: {no}");
        assert_eq!(no["json"]["error"], "cellgate_denied", "JSON body: {no}");
        assert_eq!(
            no["json"]["reason"], "http_rule_mismatch",
            "JSON body: {no}"
        );

        let records = audit(&fx.audit);
        let r =
            record_from(&records, s(&ok["local"])).expect("audit record of the allowed request");
        assert_eq!(r["decision"], "allow", "{r}");
        assert_eq!(r["path"], "/v1/hello", "{r}");
        let r = record_from(&records, s(&no["local"])).expect("audit record of the denied request");
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["reason"], "http_rule_mismatch", "{r}");
        assert_eq!(r["protocol"], "https", "{r}");

        fx.obs.assert_saw_nothing("allowed and denied requests");
        assert!(frames > 0, "the wire observer saw no frame at all");
        assert!(
            unexpected.is_empty(),
            "BYPASS: frames left the cell that were not to the node: {unexpected:#?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_attempts_from_inside_the_cell_fail() {
    bounded(async {
        let fx = fixture().await;
        let mut run = start_run(&fx, "bypass").await;
        let (h, cell_ip) = (run.host_ip, run.cell_ip);
        let a = run.attempts(Duration::from_secs(120)).await;
        let (code, stderr, (frames, unexpected)) = run.finish().await;
        assert_eq!(code, Some(0), "cellgate run failed; stderr:\n{stderr}");
        let records = audit(&fx.audit);
        let mut v = Verdicts::default();
        let get = |name: &str| -> Value {
            a.get(name)
                .and_then(|l| l.first())
                .cloned()
                .unwrap_or_else(|| panic!("the agent made no attempt {name}: {a:#?}"))
        };

        // Sanity: the cell works in this very run.
        let ok = get("allowed_https");
        v.check(ok["status"] == 200, "allowed_https", format!("{ok}"));

        // Attempts that reach the node: the agent's call fails, and the node's audit record
        // (found by the agent's own source address and port) gives the reason.
        let reached: &[(&str, &str, &str, Option<String>)] = &[
            (
                "tcp_direct_ip_other_port",
                "no_capability",
                "tcp",
                Some(format!("{h}:{}", fx.obs.tcp)),
            ),
            (
                "tcp_direct_after_iptables",
                "no_capability",
                "tcp",
                Some(format!("{h}:{}", fx.obs.tcp)),
            ),
            (
                "http_ip_literal",
                "no_capability",
                "http",
                Some(format!("{h}:{}", fx.obs.http)),
            ),
            (
                "intake_from_inside_no_ppv2",
                "no_capability",
                "tcp",
                Some(format!("{h}:{INTAKE_PORT}")),
            ),
            (
                "intake_from_inside_own_ppv2",
                "no_capability",
                "tcp",
                Some(format!("{h}:{INTAKE_PORT}")),
            ),
            (
                "sni_allowed_host_denied",
                "sni_host_mismatch",
                "https",
                None,
            ),
            (
                "connect_through_allowed",
                "connect_not_allowed",
                "https",
                None,
            ),
            ("dns_name_not_allowed", "dns_name_not_allowed", "dns", None),
            ("dns_foreign_resolver", "dns_name_not_allowed", "dns", None),
            ("dns_txt_exfil", "dns_qtype_refused", "dns", None),
        ];
        for (name, reason, protocol, dst) in reached {
            let r = get(name);
            let local = s(&r["local"]).to_string();
            let inside_ok = match *protocol {
                "dns" => {
                    let want = if *reason == "dns_qtype_refused" { 5 } else { 3 };
                    r["rcode"] == want && r["answers"] == 0
                }
                _ if r["status"].is_u64() => r["status"] == 403 && r["json"]["reason"] == *reason,
                _ => r["connected"] == true && s(&r["recv"]).is_empty(),
            };
            v.check(
                inside_ok && !s(&r["recv"]).contains("OBSERVER"),
                name,
                format!("the agent's call did not fail as expected: {r}"),
            );
            v.check(
                local.starts_with(&format!("{cell_ip}:")),
                name,
                format!("the agent's own address is not the cell's: {local}"),
            );
            let rec = record_from(&records, &local);
            let audit_ok = rec.is_some_and(|rec| {
                rec["decision"] == "deny"
                    && rec["reason"] == *reason
                    && rec["protocol"] == *protocol
                    && dst
                        .as_ref()
                        .is_none_or(|d| rec["destination"] == d.as_str())
            });
            v.check(
                audit_ok,
                name,
                format!("expected an audit record deny/{reason}/{protocol} from {local}: {rec:?}"),
            );
            v.row(
                name,
                brief(&r),
                rec.map(|r| {
                    format!(
                        "{} {} ({})",
                        s(&r["decision"]),
                        s(&r["reason"]),
                        s(&r["protocol"])
                    )
                })
                .unwrap_or_else(|| "none".into()),
            );
        }
        let fronted = get("sni_allowed_host_denied");
        let rec = record_from(&records, s(&fronted["local"]));
        v.check(
            rec.is_some_and(|r| r["host"] == "denied.e2e"),
            "sni_allowed_host_denied",
            format!("the audit should name the Host, denied.e2e: {rec:?}"),
        );
        let exfil = get("dns_txt_exfil");
        let rec = record_from(&records, s(&exfil["local"]));
        v.check(
            rec.is_some_and(|r| s(&r["host"]).ends_with("exfil.example") && r["method"] == "TXT"),
            "dns_txt_exfil",
            format!("the audit should name the TXT query: {rec:?}"),
        );

        // Attempts stopped inside the cell: the call itself fails (EPERM from the DROP rule or
        // a missing capability) and nothing reaches the node, so there is no audit record.
        let stopped: &[(&str, &[&str])] = &[
            ("udp_datagram", &["EPERM"]),
            ("quic_udp_443", &["EPERM"]),
            (
                "ipv6_tcp_ula",
                &[
                    "EPERM",
                    "ETIMEDOUT",
                    "EHOSTUNREACH",
                    "ENETUNREACH",
                    "ECONNREFUSED",
                ],
            ),
            (
                "ipv6_tcp_link_local",
                &[
                    "EPERM",
                    "ETIMEDOUT",
                    "EHOSTUNREACH",
                    "ENETUNREACH",
                    "ECONNREFUSED",
                ],
            ),
            ("ipv6_udp_ula", &["EPERM"]),
            ("icmp_echo", &["EPERM"]),
            (
                "icmpv6_echo",
                &["EPERM", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH"],
            ),
            ("raw_socket_icmp", &["EPERM"]),
            ("raw_socket_ip", &["EPERM"]),
            ("packet_socket", &["EPERM"]),
        ];
        for (name, allowed) in stopped {
            let Some(r) = a.get(*name).and_then(|l| l.first()) else {
                // The link-local attempt needs the host end's fe80:: address.
                v.check(
                    *name == "ipv6_tcp_link_local",
                    name,
                    "attempt missing".into(),
                );
                continue;
            };
            let errno = s(&r["errno"]);
            let timed_out = s(&r["error"]).starts_with("TimeoutError");
            v.check(
                (allowed.contains(&errno) || (timed_out && allowed.contains(&"ETIMEDOUT")))
                    && r["connected"].is_null()
                    && r["created"].is_null()
                    && r["reply"].is_null(),
                name,
                format!("expected the call to fail with one of {allowed:?}: {r}"),
            );
            v.row(name, brief(r), "none (never leaves the cell)".into());
        }
        // Commands that must fail as the agent user.
        for name in [
            "icmp_echo_ping",
            "iptables_flush_filter",
            "iptables_flush_nat",
            "iptables_policy_accept",
            "ip6tables_flush",
            "nft_flush_ruleset",
            "iptables_in_user_namespace",
        ] {
            let r = get(name);
            let not_installed = s(&r["error"]).starts_with("not installed");
            v.check(
                not_installed || r["rc"].as_i64().is_some_and(|rc| rc != 0),
                name,
                format!("expected a non-zero exit: {r}"),
            );
            v.row(name, brief(&r), "none".into());
        }
        // Connecting to the tagger itself: no original destination, closed.
        let t = get("tagger_direct");
        v.check(
            s(&t["recv"]).is_empty(),
            "tagger_direct",
            format!("the tagger answered: {t}"),
        );
        v.row("tagger_direct", brief(&t), "none".into());

        v.assert_all("bypass attempts from inside the cell");
        fx.obs
            .assert_saw_nothing("bypass attempts from inside the cell");
        assert!(frames > 0, "the wire observer saw no frame at all");
        assert!(
            unexpected.is_empty(),
            "BYPASS: frames left the cell that were not to the node: {unexpected:#?}"
        );
    })
    .await;
}

/// A token's claims, decoded without verification.
fn claims_of(token: &str) -> cellgate_identity::Claims {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("claims")
}

/// Replaces one part (0 header, 1 payload) of a JWT, keeping the signature.
fn with_part(token: &str, index: usize, json: &Value) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    if let Some(p) = parts.get_mut(index) {
        *p = URL_SAFE_NO_PAD.encode(json.to_string());
    }
    parts.join(".")
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Connects to the node's intake from the host's namespace (where an attacker on the node
/// network would be), optionally writes a PPv2 header claiming `source`, then a request, and
/// returns what came back and the local address of the connection.
async fn at_intake(
    host_ip: Ipv4Addr,
    header: Option<(SocketAddr, SocketAddr, &str)>,
    request: &[u8],
) -> (Vec<u8>, SocketAddr) {
    let mut s = TcpStream::connect((host_ip, INTAKE_PORT))
        .await
        .expect("connecting to the intake from the host");
    let local = s.local_addr().expect("local addr");
    if let Some((src, dst, token)) = header {
        let h = cellgate_proxy_protocol::encode(src, dst, token).expect("PPv2 header");
        s.write_all(&h).await.expect("writing the header");
    }
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(8),
        (&mut s).take(65536).read_to_end(&mut buf),
    )
    .await;
    (buf, local)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_refuses_untagged_and_forged_connections() {
    bounded(async {
        let fx = fixture().await;
        let mut run = start_run(&fx, "wait").await;
        let (h, cell_ip) = (run.host_ip, run.cell_ip);
        let state = run.state();
        let token_path = state.join("tagger/token");
        wait_path(&token_path, &mut run.child, &run.stderr).await;
        let key_path = state.join("keys/signing.key");
        wait_path(&key_path, &mut run.child, &run.stderr).await;
        let real = std::fs::read_to_string(&token_path).expect("the cell's token (as root)");
        let real = real.trim();
        let key = cellgate_identity::SigningKey::load(&key_path).expect("the run's signing key");
        let claims = claims_of(real);
        let attacker = cellgate_identity::SigningKey::generate().expect("a key");
        let issue = |k: &cellgate_identity::SigningKey, c: &cellgate_identity::Claims| {
            cellgate_identity::token::issue(k, c).expect("issue")
        };
        let fresh = |mut c: cellgate_identity::Claims| {
            c.jti = format!("e2e-{}", c.jti);
            c
        };
        // Signed by another key, under its own key id.
        let forged_unknown_key = issue(&attacker, &fresh(claims.clone()));
        // Signed by another key, claiming the run's key id.
        let forged_kid = with_part(
            &forged_unknown_key,
            0,
            &serde_json::json!({"typ": "JWT", "alg": "EdDSA", "kid": key.kid()}),
        );
        // The real token with its claims changed (a longer lifetime), signature kept.
        let mut longer = claims.clone();
        longer.exp += 365 * 24 * 3600;
        let tampered = with_part(real, 1, &serde_json::to_value(&longer).expect("claims"));
        // A valid token of another cell (signed by the run's own key).
        let other_cell = issue(
            &key,
            &cellgate_identity::Claims::for_cell(
                cellgate_identity::token::LOCAL_ISSUER,
                "00000000-0000-0000-0000-0000000e2e02",
                "default",
                "other-agent",
                None,
                now(),
                3600,
                Some("10.203.255.254".parse().expect("addr")),
            ),
        );
        // A valid token of this cell, bound to another pod's address.
        let mut elsewhere = fresh(claims.clone());
        elsewhere.pod_addr = Some("10.203.255.254".into());
        let elsewhere = issue(&key, &elsewhere);
        // A token of this cell that expired an hour ago.
        let mut expired = fresh(claims.clone());
        expired.iat = now() - 7200;
        expired.nbf = now() - 7200;
        expired.exp = now() - 3600;
        let expired = issue(&key, &expired);

        let dst = SocketAddr::from((h, fx.up_port));
        let request = format!(
            "GET /v1/probe HTTP/1.1\r\nHost: api.e2e:{}\r\nConnection: close\r\n\r\n",
            fx.up_port
        );
        let mut v = Verdicts::default();
        let records_before = audit(&fx.audit).len();

        let (bytes, local) = at_intake(h, None, request.as_bytes()).await;
        let mut expectations = vec![("intake_no_ppv2", local.to_string(), "ppv2_missing", bytes)];
        // Each probe comes from the host side of the link and its header names that address as
        // source, so the token checks themselves are what refuse it; the last one claims the
        // cell's address and is refused for that alone.
        let cases: [(&str, u16, &str, &str); 7] = [
            (
                "intake_forged_token_other_key",
                40001,
                &forged_unknown_key,
                "token_unknown_key",
            ),
            (
                "intake_forged_token_spoofed_kid",
                40002,
                &forged_kid,
                "token_bad_signature",
            ),
            (
                "intake_tampered_token",
                40003,
                &tampered,
                "token_bad_signature",
            ),
            (
                "intake_other_cells_token",
                40004,
                &other_cell,
                "cell_unknown",
            ),
            (
                "intake_token_bound_elsewhere",
                40005,
                &elsewhere,
                "source_not_bound",
            ),
            ("intake_expired_token", 40006, &expired, "token_expired"),
            (
                "intake_header_claims_cell_address",
                40007,
                real,
                "source_mismatch",
            ),
        ];
        for (name, port, token, reason) in cases {
            let ip = if reason == "source_mismatch" {
                cell_ip
            } else {
                h
            };
            let src = SocketAddr::from((ip, port));
            let (bytes, _) = at_intake(h, Some((src, dst, token)), request.as_bytes()).await;
            expectations.push((name, src.to_string(), reason, bytes));
        }
        write_signal(&fx, "done.json", &serde_json::json!({}));
        let _ = run.attempts(Duration::from_secs(30)).await;
        let (code, stderr, (_, unexpected)) = run.finish().await;
        assert_eq!(code, Some(0), "cellgate run failed; stderr:\n{stderr}");

        let records = audit(&fx.audit);
        assert!(
            records.len() > records_before || records_before == 0,
            "no audit records"
        );
        for (name, src, reason, bytes) in expectations {
            v.check(
                bytes.is_empty(),
                name,
                format!("the intake answered: {:?}", String::from_utf8_lossy(&bytes)),
            );
            let rec = record_from(&records, &src);
            v.check(
                rec.is_some_and(|r| {
                    r["decision"] == "deny" && r["reason"] == reason && r["front_door"] == "intake"
                }),
                name,
                format!("expected an audit record deny/{reason} with source {src}: {rec:?}"),
            );
            v.row(
                name,
                format!("closed with {} bytes", bytes.len()),
                rec.map(|r| format!("{} {}", s(&r["decision"]), s(&r["reason"])))
                    .unwrap_or_else(|| "none".into()),
            );
        }
        v.assert_all("the node's intake, from the host side");
        fx.obs.assert_saw_nothing("intake refusals");
        assert!(
            unexpected.is_empty(),
            "frames left the cell: {unexpected:#?}"
        );
    })
    .await;
}

/// The cell's own valid token, taken from the tagger and replayed from outside the cell with a
/// PPv2 header that claims the cell's address as source. The token is bound to that address;
/// the question is whether the node checks the binding against the connection's real peer or
/// only against what the header claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stolen_token_replayed_from_outside_the_cell_is_refused() {
    bounded(async {
        let fx = fixture().await;
        let mut run = start_run(&fx, "wait").await;
        let (h, cell_ip) = (run.host_ip, run.cell_ip);
        let token_path = run.state().join("tagger/token");
        wait_path(&token_path, &mut run.child, &run.stderr).await;
        let real = std::fs::read_to_string(&token_path).expect("the cell's token (as root)");
        let src = SocketAddr::from((cell_ip, 40100));
        let dst = SocketAddr::from((h, fx.up_port));
        let request = format!(
            "GET /v1/stolen HTTP/1.1\r\nHost: api.e2e:{}\r\nConnection: close\r\n\r\n",
            fx.up_port
        );
        let (bytes, peer) = at_intake(h, Some((src, dst, real.trim())), request.as_bytes()).await;
        write_signal(&fx, "done.json", &serde_json::json!({}));
        let _ = run.attempts(Duration::from_secs(30)).await;
        let (code, stderr, _) = run.finish().await;
        assert_eq!(code, Some(0), "cellgate run failed; stderr:\n{stderr}");
        let records = audit(&fx.audit);
        let rec = record_from(&records, &src.to_string());
        let answer = String::from_utf8_lossy(&bytes);
        eprintln!(
            "stolen token from {peer} claiming {src}: answer {:?}; audit {rec:?}",
            answer.lines().next().unwrap_or("")
        );
        assert!(
            bytes.is_empty()
                && rec.is_some_and(|r| r["decision"] == "deny"
                    && r["reason"] != "no_capability"
                    && r["path"].is_null()),
            "BYPASS: a connection from {peer} (not the cell) was accepted with the cell's token \
             because its PPv2 header claimed the cell's address {src}; the node compares the \
             token's binding with the header's source, not with the TCP peer. Answer: {:?}; \
             audit record: {rec:?}",
            answer.lines().next().unwrap_or("")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_mid_run_fails_closed() {
    bounded(async {
        let fx = fixture().await;
        let mut run = start_run(&fx, "kill").await;
        let name = run.name.clone();
        // Requests succeed while the node is up.
        let first = run.next(Duration::from_secs(30)).await;
        assert_eq!(first["attempt"], "before_kill", "{first}");
        assert_eq!(first["status"], 200, "a request before the kill: {first}");
        // The node lives in the cellgate process: SIGKILL it, no teardown, no goodbye.
        run.child.start_kill().expect("SIGKILL cellgate");
        let _ = run.child.wait().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        write_signal(&fx, "killed.json", &serde_json::json!({}));
        let a = run.attempts(Duration::from_secs(90)).await;
        let mut v = Verdicts::default();
        for r in a.get("after_kill_https").into_iter().flatten() {
            v.check(
                r["status"].is_null() && s(&r["recv"]).is_empty(),
                "after_kill_https",
                format!("a request got an answer with the node dead: {r}"),
            );
            v.row("after_kill_https", brief(r), "none (node dead)".into());
        }
        v.check(
            a.get("after_kill_https").is_some_and(|l| l.len() == 3),
            "after_kill_https",
            "three requests expected".into(),
        );
        for name in ["after_kill_tcp_direct", "after_kill_http_ip_literal"] {
            let r = a
                .get(name)
                .and_then(|l| l.first())
                .cloned()
                .unwrap_or_default();
            v.check(
                r["status"].is_null() && s(&r["recv"]).is_empty(),
                name,
                format!("{r}"),
            );
            v.row(name, brief(&r), "none (node dead)".into());
        }
        let r = a
            .get("after_kill_udp")
            .and_then(|l| l.first())
            .cloned()
            .unwrap_or_default();
        v.check(r["errno"] == "EPERM", "after_kill_udp", format!("{r}"));
        v.row("after_kill_udp", brief(&r), "none".into());
        let r = a
            .get("after_kill_dns")
            .and_then(|l| l.first())
            .cloned()
            .unwrap_or_default();
        v.check(
            r["rcode"].is_null(),
            "after_kill_dns",
            format!("an answer with the node dead: {r}"),
        );
        v.row("after_kill_dns", brief(&r), "none (node dead)".into());
        let sniffer = run.sniffer.take();
        let (frames, unexpected) = match sniffer {
            Some(s) => s.unexpected().await,
            None => (0, Vec::new()),
        };
        v.assert_all("after the node was killed");
        fx.obs.assert_saw_nothing("after the node was killed");
        assert!(frames > 0, "the wire observer saw no frame at all");
        assert!(
            unexpected.is_empty(),
            "BYPASS: frames left the cell that were not to the node: {unexpected:#?}"
        );

        // The killed run left its cell; the next run removes it.
        assert!(
            Path::new("/run/netns").join(&name).exists(),
            "{name} should be left over"
        );
        let next = tokio::time::timeout(
            Duration::from_secs(60),
            Command::new(fx.bin.join("cellgate"))
                .arg("run")
                .arg("-f")
                .arg(&fx.cell)
                .arg("--audit")
                .arg(fx.dir.path().join("audit-next.jsonl"))
                .args(["--", "true"])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the next run did not finish in 60 s")
        .expect("the next run");
        let err = String::from_utf8_lossy(&next.stderr);
        assert!(next.status.success(), "the next run failed: {err}");
        assert!(
            err.contains(&format!("removing {name}")),
            "the next run did not report removing {name}: {err}"
        );
        assert!(
            !Path::new("/run/netns").join(&name).exists(),
            "{name} is still there after the next run"
        );
        drop(run);
    })
    .await;
}
