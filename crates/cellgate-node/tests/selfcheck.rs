//! The enforcement self-check for real. Each test builds a cell: a network namespace named after
//! the test, a veth pair to this process's namespace (where the node runs, as on a node with
//! hostNetwork), the rules `cellgate-init` applies (its library, with the iptables tools run in
//! the cell's namespace), and the tagger (this test binary started again inside the namespace
//! as the tagger's user, running `cellgate_tagger::run`). Beyond the pod, the must-deny
//! destination (TEST-NET-1) is routed to a second namespace, "outside", which owns 192.0.2.1 and
//! silently drops, and counts, every packet sent to it: the count tells whether anything left
//! the pod toward it.
//!
//! Then: the node proves the cell `Governed=True`; flushing the cell's iptables rules turns it
//! `False` (`RulesMissing`) within one interval; restoring them, `True`; killing the tagger,
//! `False` (`TaggerNotListening`); restarting it, `True`. In Kubernetes mode every change is a
//! server-side apply to kube's mocked API service, asserted call by call; the audit log and
//! `/metrics` are checked too, and an agent's own connection to the reserved destination (with a
//! forged probe line) is refused and audited. A second test runs the probe through the
//! `self-check-prober` socket, as the chart deploys it.
//!
//! These tests need root (network namespaces, iptables, setns). Without it they fail; they never
//! skip. Namespaces are deleted on drop, even when a test fails.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cellgate_identity::{Claims, SigningKey};
use cellgate_node::config::ProberAddr;
use cellgate_node::kubernetes::contract::{agent_cell, cell_pod, ApiServer, Call, Watched};
use cellgate_node::selfcheck::{reason, Status};
use cellgate_node::{NodeConfig, NodeHandle};

const NS: &str = "agents";
const CELL: &str = "probe";
const UID: &str = "5c1f-selfcheck";
const NODE: &str = "node-a";
const TAGGER_UID: u32 = 1337;
const TAGGER_PORT: u16 = 15006;
const INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a change may take to show: the next probe (one interval), its confirmation and
/// two probe timeouts, and a margin for a loaded machine.
const WITHIN: Duration = Duration::from_secs(6);
/// The node's intake port, on this process's end of each cell's veth pair (an address of the
/// test's own): known before the node starts, so the cell is whole before the first probe.
const INTAKE_PORT: u16 = 15001;
/// What a loaded machine may add to a bound on how long a change takes to show.
const SLACK: Duration = Duration::from_millis(1500);
/// The must-deny destination, owned by the outside namespace.
const TARGET_IP: &str = "192.0.2.1";

// ------------------------------------------------------------------------------------------
// The tagger, as its own process inside the cell
// ------------------------------------------------------------------------------------------

/// Not a test of its own: when this binary is started again by [`Cell::start_tagger`] (with
/// `CG_SELFCHECK_TAGGER` set), the cell's tagger. Otherwise it returns at once.
#[test]
fn tagger_process() {
    let Ok(spec) = std::env::var("CG_SELFCHECK_TAGGER") else {
        return;
    };
    let mut parts = spec.split(',');
    let (Some(listen), Some(node), Some(token)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("CG_SELFCHECK_TAGGER={spec:?} is not LISTEN,NODE,TOKEN_FILE");
    };
    let config = cellgate_tagger::Config::new(
        listen.parse().unwrap(),
        node.parse().unwrap(),
        PathBuf::from(token),
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(cellgate_tagger::run(config, std::future::pending()))
        .unwrap();
}

// ------------------------------------------------------------------------------------------
// The cell
// ------------------------------------------------------------------------------------------

fn require_root() {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2)?.parse::<u32>().ok())
        })
        .unwrap_or(u32::MAX);
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, iptables, setns)"
    );
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process killed and reaped on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The cell's network namespace (`cgsc-<test>-<pid>`), its veth pair to this process's
/// namespace, and the outside namespace (`…-o`) beyond it; deleted on drop (the veth pairs go
/// with them).
struct Cell {
    name: String,
    outside: String,
    host_ip: Ipv4Addr,
    cell_ip: Ipv4Addr,
    dir: tempfile::TempDir,
    tagger: Option<Killed>,
}

impl Cell {
    /// `short`: at most 3 characters, unique per test; `index`: unique per test (addresses).
    fn new(short: &str, index: u32) -> Self {
        require_root();
        assert!(short.len() <= 3);
        let pid = std::process::id();
        let name = format!("cgsc-{short}-{pid}");
        let outside = format!("{name}-o");
        // A /30 per test and process, in 10.205.0.0/16.
        let n = ((pid % 4000) * 4 + index) % 16_384;
        let (hi, lo) = ((n >> 6) as u8, ((n & 0x3f) << 2) as u8);
        let host_ip = Ipv4Addr::new(10, 205, hi, lo + 1);
        let cell_ip = Ipv4Addr::new(10, 205, hi, lo + 2);
        let (hv, cv) = (
            format!("sc{short}{}h", pid % 100_000),
            format!("sc{short}{}c", pid % 100_000),
        );
        // Leftovers of a crashed run of this very test would make `add` fail.
        for ns in [&name, &outside] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &hv]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        run(Command::new("ip").args(["netns", "add", &outside]));
        let dir = tempfile::tempdir().unwrap();
        // The tagger runs as its own user: it reads its token and this binary from here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cell = Self {
            name,
            outside,
            host_ip,
            cell_ip,
            dir,
            tagger: None,
        };
        let (n, o) = (cell.name.as_str(), cell.outside.as_str());
        for args in [
            vec!["-n", n, "link", "set", "lo", "up"],
            vec![
                "link", "add", &hv, "type", "veth", "peer", "name", &cv, "netns", n,
            ],
            vec!["addr", "add", &format!("{host_ip}/30"), "dev", &hv],
            vec!["link", "set", &hv, "up"],
            vec!["-n", n, "addr", "add", &format!("{cell_ip}/30"), "dev", &cv],
            vec!["-n", n, "link", "set", &cv, "up"],
            // Beyond the pod: TEST-NET-1 is routed to the outside namespace.
            vec![
                "-n", n, "link", "add", "out0", "type", "veth", "peer", "name", "in0", "netns", o,
            ],
            vec!["-n", n, "link", "set", "out0", "up"],
            vec!["-n", n, "route", "add", "192.0.2.0/24", "dev", "out0"],
            vec!["-n", o, "link", "set", "lo", "up"],
            vec![
                "-n",
                o,
                "addr",
                "add",
                &format!("{TARGET_IP}/24"),
                "dev",
                "in0",
            ],
            vec!["-n", o, "link", "set", "in0", "up"],
        ] {
            run(Command::new("ip").args(&args));
        }
        // The outside drops (without a reset) and counts all that reaches the destination.
        run(Command::new("ip").args([
            "netns", "exec", o, "iptables", "-A", "INPUT", "-d", TARGET_IP, "-j", "DROP",
        ]));
        cell
    }

    fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `cellgate-init`'s rules, applied by its library with the iptables tools run inside the
    /// cell (what the init container does there); idempotent like it.
    fn apply_rules(&self, node: SocketAddr) {
        let bin = self.dir.path().join("tools");
        std::fs::create_dir_all(&bin).unwrap();
        let mut tools = cellgate_init::Tools::default();
        for (field, tool) in [
            (&mut tools.iptables_save, "iptables-save"),
            (&mut tools.iptables_restore, "iptables-restore"),
            (&mut tools.ip6tables_save, "ip6tables-save"),
            (&mut tools.ip6tables_restore, "ip6tables-restore"),
        ] {
            let path = bin.join(tool);
            std::fs::write(
                &path,
                format!(
                    "#!/bin/sh\nexec ip netns exec {} {tool} \"$@\"\n",
                    self.name
                ),
            )
            .unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            *field = path.display().to_string();
        }
        let mut config = cellgate_init::InitConfig::new(
            TAGGER_UID,
            node,
            SocketAddr::new(IpAddr::V4(self.host_ip), 53),
        );
        config.tagger_port = TAGGER_PORT;
        config.ipv6 = cellgate_init::Ipv6Mode::Drop;
        cellgate_init::apply_with(&config, &tools).unwrap();
    }

    /// Flushes every iptables rule of the cell (both tables, our chains and the jumps to them).
    fn flush_rules(&self) {
        run(self.exec("iptables").args(["-t", "nat", "-F"]));
        run(self.exec("iptables").args(["-t", "filter", "-F"]));
    }

    /// Starts the tagger inside the cell as its user, holding `token`, sending to `node`.
    fn start_tagger(&mut self, node: SocketAddr, token: &str) {
        let token_file = self.dir.path().join("token");
        std::fs::write(&token_file, token).unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let uid = TAGGER_UID.to_string();
        let child = self
            .exec("setpriv")
            .args([
                "--reuid",
                &uid,
                "--regid",
                &uid,
                "--clear-groups",
                "--no-new-privs",
                "--",
            ])
            .arg(std::env::current_exe().unwrap())
            .args([
                "tagger_process",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                "CG_SELFCHECK_TAGGER",
                format!("127.0.0.1:{TAGGER_PORT},{node},{}", token_file.display()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.tagger = Some(Killed(child));
    }

    /// Waits (bounded) until the tagger listens.
    fn wait_tagger(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = run(self
                .exec("ss")
                .args(["-Hltn", &format!("sport = :{TAGGER_PORT}")]));
            if !out.stdout.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the tagger did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where the node's intake listens: this process's end of the veth pair.
    fn intake(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.host_ip), INTAKE_PORT)
    }

    fn kill_tagger(&mut self) {
        self.tagger = None;
    }

    /// Packets that left the pod and reached the must-deny destination.
    fn left_the_pod(&self) -> u64 {
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.outside,
            "iptables",
            "-nvxL",
            "INPUT",
        ]));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.contains("DROP") && l.contains(TARGET_IP))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no counting rule in the outside namespace:\n{text}"))
    }

    /// An agent's own connection (as nobody) to the must-deny destination, sending `line`:
    /// what it read back, or `err ...`.
    fn agent_dials_target(&self, line: &str) -> String {
        const CLIENT: &str = r#"
import socket, sys
try:
    s = socket.create_connection(("192.0.2.1", 9), timeout=3)
    s.sendall(sys.argv[1].encode()); s.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        c = s.recv(4096)
        if not c: break
        out += c
    print("ok", out.decode(errors="replace").strip())
except OSError as e:
    print("err", e)
"#;
        let out = run(self.exec("setpriv").args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            CLIENT,
            line,
        ]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        self.tagger = None;
        for ns in [&self.name, &self.outside] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

// ------------------------------------------------------------------------------------------
// Kubernetes mode, over kube's mocked API service
// ------------------------------------------------------------------------------------------

fn token(key: &SigningKey, bound: Option<IpAddr>, uid: &str) -> String {
    let claims = Claims::for_cell(
        "cellgate-operator",
        uid,
        NS,
        CELL,
        None,
        cellgate_node::decide::now_secs(),
        600,
        bound,
    );
    cellgate_identity::token::issue(key, &claims).unwrap()
}

/// The `Governed` condition of a status apply, if `c` is one.
fn governed_apply(c: &Call) -> Option<serde_json::Value> {
    if c.method != http::Method::PATCH
        || c.path()
            != format!("/apis/cellgate.dev/v1alpha1/namespaces/{NS}/agentcells/{CELL}/status")
    {
        return None;
    }
    if c.query().get("fieldManager").map(String::as_str) != Some("cellgate-node-selfcheck") {
        return None;
    }
    let body: serde_json::Value = serde_json::from_slice(&c.body).ok()?;
    Some(body["status"]["conditions"][0].clone())
}

/// Waits for the first `Governed` apply after call `after` with `status`; returns it and the
/// index of its call. Any apply on the way must not be another status (no flapping).
async fn next_governed(api: &ApiServer, after: usize, status: &str) -> (serde_json::Value, usize) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let calls = api.calls();
        for (i, c) in calls.iter().enumerate().skip(after) {
            if let Some(cond) = governed_apply(c) {
                if cond["status"] == status {
                    check_apply(c);
                    return (cond, i + 1);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no Governed={status} apply within {WITHIN:?}; applies since: {:#?}",
            calls
                .iter()
                .skip(after)
                .filter_map(governed_apply)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An apply of the condition is exactly that: forced, by its own manager, one list entry.
fn check_apply(c: &Call) {
    let q = c.query();
    assert_eq!(q.get("force").map(String::as_str), Some("true"), "{c:?}");
    assert_eq!(
        c.content_type.as_deref(),
        Some("application/apply-patch+yaml"),
        "{c:?}"
    );
    let body: serde_json::Value = serde_json::from_slice(&c.body).unwrap();
    assert_eq!(body["apiVersion"], "cellgate.dev/v1alpha1");
    assert_eq!(body["kind"], "AgentCell");
    assert!(
        body.get("spec").is_none() && body.get("metadata").is_none(),
        "{body}"
    );
    let status = body["status"].as_object().unwrap();
    assert_eq!(
        status.keys().collect::<Vec<_>>(),
        vec!["conditions"],
        "{body}"
    );
    let conditions = status["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 1, "{body}");
    let cond = &conditions[0];
    assert_eq!(cond["type"], "Governed");
    assert_eq!(cond["observedGeneration"], 1);
    assert!(
        cond["lastTransitionTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{cond}"
    );
}

struct KubeNode {
    _dir: tempfile::TempDir,
    key: SigningKey,
    api: ApiServer,
    node: NodeHandle,
    audit: PathBuf,
}

async fn kube_node(cell: &Cell, key: SigningKey) -> KubeNode {
    let dir = tempfile::tempdir().unwrap();
    key.write_pair(&dir.path().join("keys")).unwrap();
    let (client, api) = ApiServer::start();
    let spec = serde_json::json!({"capabilities": [{
        // Even a capability naming it does not open the must-deny destination.
        "name": "testnet", "protocol": "tcp",
        "destinations": [{"cidr": "192.0.2.0/24", "ports": [9]}],
    }]});
    api.set_list(
        Watched::AgentCells,
        vec![agent_cell(NS, CELL, UID, 1, spec)],
    );
    api.set_list(
        Watched::Pods,
        vec![cell_pod(
            NS,
            CELL,
            UID,
            NODE,
            &cell.cell_ip.to_string(),
            "Running",
        )],
    );
    let audit = dir.path().join("audit.jsonl");
    let mut config = NodeConfig::defaults();
    config.kubernetes = true;
    config.node_name = NODE.into();
    config.listen = cell.intake();
    config.trust = vec![dir.path().join("keys/signing.pub")];
    config.audit = audit.clone();
    config.drain = Duration::from_secs(1);
    config.self_check.interval = Some(INTERVAL);
    config.self_check.timeout = PROBE_TIMEOUT;
    config.validate().unwrap();
    let node = cellgate_node::run_with(config, Some(client)).await.unwrap();
    for w in [Watched::AgentCells, Watched::Pods] {
        api.watch_opened(w).await;
    }
    KubeNode {
        _dir: dir,
        key,
        api,
        node,
        audit,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cell_is_governed_until_its_rules_or_its_tagger_go() {
    let mut cell = Cell::new("gov", 0);
    let key = SigningKey::generate().unwrap();
    let intake = cell.intake();
    cell.apply_rules(intake);
    cell.start_tagger(intake, &token(&key, None, UID));
    cell.wait_tagger();
    let k = kube_node(&cell, key).await;
    assert_eq!(k.node.intake_addr, intake);

    // Governed: the probe crossed the tagger and was refused at the node; nothing left the pod.
    let (cond, mut seen) = next_governed(&k.api, 0, "True").await;
    assert_eq!(cond["reason"], reason::PROBE_REFUSED_AT_NODE, "{cond}");
    assert!(
        cond["message"].as_str().unwrap().contains("192.0.2.1:9"),
        "{cond}"
    );
    let since_governed = cond["lastTransitionTime"].clone();
    tokio::time::sleep(INTERVAL * 2).await;
    assert_eq!(cell.left_the_pod(), 0, "a probe left the pod");
    // A result that does not change is not written again.
    assert!(
        k.api
            .calls()
            .iter()
            .skip(seen)
            .filter_map(governed_apply)
            .next()
            .is_none(),
        "the unchanged condition was applied again"
    );
    let metrics = common::admin_get(&k.node, "/metrics", None).await.body;
    assert!(
        metrics.contains(&format!(
            "cellgate_cell_governed{{namespace=\"{NS}\",cell=\"{CELL}\"}} 1"
        )),
        "{metrics}"
    );
    assert_eq!(
        common::admin_get(&k.node, "/readyz", None).await.status,
        200
    );

    // An agent's own connection to the reserved destination, with a forged probe line: refused
    // and audited as the cell's denial, whatever its capability says; nothing leaves the pod.
    let forged = format!("CELLGATE-SELFCHECK {}\n", "0".repeat(32));
    let said = cell.agent_dials_target(&forged);
    assert!(
        !said.contains("CELLGATE-SELFCHECK refused"),
        "the agent got the node's probe answer: {said}"
    );
    let denied = common::wait_audit(&k.node, &k.audit, |r| {
        r["reason"] == "self_check_reserved" && r["cell"] == CELL
    })
    .await;
    assert_eq!(denied["decision"], "deny", "{denied}");
    assert_eq!(
        cell.left_the_pod(),
        0,
        "the agent's connection left the pod"
    );

    // The rules are flushed: False, naming it, within one interval (and the confirmation).
    let flushed = Instant::now();
    cell.flush_rules();
    let (cond, next) = next_governed(&k.api, seen, "False").await;
    let took = flushed.elapsed();
    seen = next;
    assert_eq!(cond["reason"], reason::RULES_MISSING, "{cond}");
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("rules are missing"),
        "{cond}"
    );
    eprintln!("rules flushed: Governed=False after {took:?}");
    // The next probe (within one interval) waits out its timeout; then the apply.
    assert!(took < INTERVAL + PROBE_TIMEOUT + SLACK, "{took:?}");
    assert!(
        cell.left_the_pod() > 0,
        "without the rules the probe must have left the pod"
    );
    assert_eq!(
        k.node.shared.self_check.verdict(UID).map(|v| v.status),
        Some(Status::False)
    );
    let metrics = common::admin_get(&k.node, "/metrics", None).await.body;
    assert!(
        metrics.contains(&format!(
            "cellgate_cell_governed{{namespace=\"{NS}\",cell=\"{CELL}\"}} 0"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("cellgate_self_check_failures_total{reason=\"RulesMissing\"}"),
        "{metrics}"
    );
    assert_eq!(
        common::admin_get(&k.node, "/readyz", None).await.status,
        200
    );

    // Restored: True again.
    cell.apply_rules(intake);
    let (cond, next) = next_governed(&k.api, seen, "True").await;
    seen = next;
    assert_eq!(cond["reason"], reason::PROBE_REFUSED_AT_NODE, "{cond}");
    assert_ne!(cond["lastTransitionTime"], since_governed);

    // The tagger goes: False, naming it.
    let killed = Instant::now();
    cell.kill_tagger();
    let (cond, next) = next_governed(&k.api, seen, "False").await;
    let took = killed.elapsed();
    eprintln!("tagger killed: Governed=False after {took:?}");
    // The next probe (within one interval) and its confirmation.
    assert!(
        took < INTERVAL + cellgate_node::selfcheck::CONFIRM_AFTER.min(INTERVAL / 4) + SLACK,
        "{took:?}"
    );
    seen = next;
    assert_eq!(cond["reason"], reason::TAGGER_NOT_LISTENING, "{cond}");
    assert!(
        cond["message"].as_str().unwrap().contains("tagger"),
        "{cond}"
    );

    // It comes back: True.
    cell.start_tagger(intake, &token(&k.key, None, UID));
    cell.wait_tagger();
    let (cond, _) = next_governed(&k.api, seen, "True").await;
    assert_eq!(cond["reason"], reason::PROBE_REFUSED_AT_NODE, "{cond}");

    // Audited: each change of status, with its reason; probes themselves are not requests (no
    // denial of the cell but the agent's own attempt).
    let _ = k.node.shared.audit.flush().await;
    let records = common::audit_records(&k.audit);
    let changes: Vec<(String, String)> = records
        .iter()
        .filter(|r| r["front_door"] == "self_check")
        .map(|r| {
            assert_eq!(r["decision"], "control", "{r}");
            assert_eq!(r["cell"], CELL);
            (
                r["reason"].as_str().unwrap().to_string(),
                r["reasons"][0].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("self_check_governed", reason::PROBE_REFUSED_AT_NODE),
        ("self_check_not_governed", reason::RULES_MISSING),
        ("self_check_governed", reason::PROBE_REFUSED_AT_NODE),
        ("self_check_not_governed", reason::TAGGER_NOT_LISTENING),
        ("self_check_governed", reason::PROBE_REFUSED_AT_NODE),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()));
    assert_eq!(changes, expected);
    let denials: Vec<_> = records.iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(denials.len(), 1, "{denials:#?}");
    let metrics = common::admin_get(&k.node, "/metrics", None).await.body;
    assert!(
        metrics.contains("cellgate_self_check_failures_total{reason=\"TaggerNotListening\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("cellgate_budget_used{"), "{metrics}");
    drop(cell);
    k.node.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// The probe through the self-check-prober's socket (local mode)
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_prober_beside_the_node_probes_for_it() {
    let mut cell = Cell::new("prb", 1);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("prober.sock");
    let prober = tokio::spawn(cellgate_node::selfcheck::prober::serve(
        cellgate_node::config::ProberConfig {
            socket: socket.clone(),
            target: cellgate_node::config::SELF_CHECK_TARGET,
            netns_dir: PathBuf::from("/var/run/netns"),
            log_json: false,
        },
        std::future::pending(),
    ));
    let key = SigningKey::generate().unwrap();
    key.write_pair(&dir.path().join("keys")).unwrap();
    let cells = dir.path().join("cells");
    std::fs::create_dir_all(&cells).unwrap();
    std::fs::write(
        cells.join("probe.yaml"),
        format!("apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata:\n  name: {CELL}\n  namespace: {NS}\nspec:\n  capabilities: []\n"),
    )
    .unwrap();
    let mut config = NodeConfig::defaults();
    config.listen = cell.intake();
    config.cells_dir = Some(cells);
    config.pods = vec![(IpAddr::V4(cell.cell_ip), NS.into(), CELL.into())];
    config.trust = vec![dir.path().join("keys/signing.pub")];
    config.audit = dir.path().join("audit.jsonl");
    config.drain = Duration::from_secs(1);
    config.self_check.interval = Some(INTERVAL);
    config.self_check.timeout = PROBE_TIMEOUT;
    config.self_check.prober = ProberAddr::Unix(socket.clone());
    // Where the prober looks is its own setting: the node's is unused with a socket.
    config.self_check.netns_dir = PathBuf::from("/nonexistent");
    let uid = cellgate_api::manifest::local_uid(NS, CELL);
    cell.apply_rules(cell.intake());
    cell.start_tagger(
        cell.intake(),
        &token(&key, Some(IpAddr::V4(cell.cell_ip)), &uid),
    );
    cell.wait_tagger();
    let node = cellgate_node::run(config).await.unwrap();

    let verdict = |want: Status| {
        let (node, uid) = (&node, &uid);
        async move {
            let deadline = Instant::now() + WITHIN;
            loop {
                if let Some(v) = node.shared.self_check.verdict(uid) {
                    if v.status == want {
                        return v;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "no {want:?} within {WITHIN:?}; last: {:?}",
                    node.shared.self_check.verdict(uid)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let v = verdict(Status::True).await;
    assert_eq!(v.reason, reason::PROBE_REFUSED_AT_NODE, "{v:?}");
    cell.kill_tagger();
    let v = verdict(Status::False).await;
    assert_eq!(v.reason, reason::TAGGER_NOT_LISTENING, "{v:?}");
    // The prober gone: the probe cannot run, which proves nothing either way.
    prober.abort();
    let _ = prober.await;
    let _ = std::fs::remove_file(&socket);
    let v = verdict(Status::Unknown).await;
    assert_eq!(v.reason, reason::PROBE_UNAVAILABLE, "{v:?}");
    assert!(v.message.contains("cannot be reached"), "{v:?}");
    assert_eq!(cell.left_the_pod(), 0);
    node.shutdown().await;
}

/// The must-deny destination stays closed without a cell namespace too: an agent's tagged
/// connection to it is refused and audited even when a capability names it, and never reaches
/// a listener there.
#[tokio::test]
async fn no_capability_opens_the_reserved_destination() {
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let f = common::Fixture::start_with(|c| {
        // Loopback is refused by validation for a real node; here it lets a listener stand
        // where a forwarded connection would land.
        c.self_check.target = target_addr;
    })
    .await;
    std::fs::write(
        f.cells_dir.join("tcp.yaml"),
        format!("apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata:\n  name: tcpcell\n  namespace: agents\nspec:\n  capabilities:\n    - name: raw\n      protocol: tcp\n      destinations:\n        - cidr: 127.0.0.1/32\n          ports: [{}]\n", target_addr.port()),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut s = f.connect(target_addr.port(), &f.token("tcpcell")).await;
    use tokio::io::AsyncWriteExt as _;
    s.write_all(format!("CELLGATE-SELFCHECK {}\n", "a".repeat(32)).as_bytes())
        .await
        .unwrap();
    let got = cellgate_testing::read_to_end_timeout(&mut s, Duration::from_secs(5)).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    let r = f
        .wait_audit(|r| r["reason"] == "self_check_reserved" && r["cell"] == "tcpcell")
        .await;
    assert_eq!(r["decision"], "deny");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), target.accept())
            .await
            .is_err(),
        "a connection to the reserved destination was forwarded"
    );
}
