//! SO_ORIGINAL_DST for real: each test makes a network namespace named after itself, installs
//! the same kind of iptables/ip6tables REDIRECT rule `cellgate-init` installs, runs the built
//! `cellgate-tagger` binary and a small Python helper (fake node + agent) inside it, and checks
//! that the header the node received names the address the agent dialled, not the tagger's.
//!
//! These tests need root. Without it they fail; they never skip.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Output, Stdio};

/// Fixed ports are safe: each namespace is fresh and private to one test.
const TAGGER_PORT: u16 = 15001;
const NODE_PORT: u16 = 15002;
const TOKEN: &str = "eyJhbGciOiJFZERTQSJ9.eyJqdGkiOiJuZXRucyJ9.c2ln";

/// Plays the node (accept one connection, read to EOF, answer "pong") and the agent (dial the
/// target, send "ping", half-close, read the answer). Prints: hex of what the node received,
/// the answer, the agent's own address and port.
const HELPER: &str = r#"
import binascii, socket, sys, time
node_host, node_port, target_host, target_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
fam = lambda h: socket.AF_INET6 if ":" in h else socket.AF_INET
srv = socket.socket(fam(node_host), socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((node_host, node_port)); srv.listen(8); srv.settimeout(10)
deadline = time.time() + 10
while True:  # the tagger may still be starting
    agent = socket.socket(fam(target_host), socket.SOCK_STREAM); agent.settimeout(10)
    try:
        agent.connect((target_host, target_port)); break
    except OSError:
        agent.close()
        if time.time() > deadline: raise
        time.sleep(0.05)
agent.sendall(b"ping"); agent.shutdown(socket.SHUT_WR)
def drain(s):
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk: return out
        out += chunk
conn, _ = srv.accept(); conn.settimeout(10)
received = drain(conn)
conn.sendall(b"pong"); conn.close()
answer = drain(agent)
name = agent.getsockname()
print(binascii.hexlify(received).decode()); print(answer.decode()); print(name[0]); print(name[1])
"#;

fn require_root() {
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, iptables)"
    );
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(test: &str) -> Self {
        let name = format!("{test}-{}", std::process::id());
        // A leftover from a crashed run of this very test would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let netns = Self { name };
        run(Command::new("ip").args(["-n", &netns.name, "link", "set", "lo", "up"]));
        netns
    }

    fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A child process killed on drop (its stderr is kept for failure messages).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One scenario: redirect `target` to the tagger on `listen`, dial `target` from inside.
struct Case<'a> {
    test: &'a str,
    iptables: &'a str,
    listen: &'a str,
    node_host: &'a str,
    target_host: &'a str,
    /// Extra address to put on `lo` so the target has a local route (IPv6 has no 127/8).
    lo_address: Option<&'a str>,
}

fn check(case: &Case<'_>) {
    require_root();
    let netns = Netns::new(case.test);
    if let Some(addr) = case.lo_address {
        run(Command::new("ip").args([
            "-n",
            &netns.name,
            "addr",
            "add",
            addr,
            "dev",
            "lo",
            "nodad",
        ]));
    }
    run(netns.exec(case.iptables).args([
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        case.target_host,
        "--dport",
        "9999",
        "-j",
        "REDIRECT",
        "--to-ports",
        &TAGGER_PORT.to_string(),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();

    let node = if case.node_host.contains(':') {
        format!("[{}]:{NODE_PORT}", case.node_host)
    } else {
        format!("{}:{NODE_PORT}", case.node_host)
    };
    // No --destination: without a working SO_ORIGINAL_DST the tagger closes the connection.
    let tagger = netns
        .exec(env!("CARGO_BIN_EXE_cellgate-tagger"))
        .args(["--listen", case.listen, "--node", &node, "--token-file"])
        .arg(&token_file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut tagger = Killed(tagger);

    let helper = netns
        .exec("python3")
        .args([
            "-c",
            HELPER,
            case.node_host,
            &NODE_PORT.to_string(),
            case.target_host,
            "9999",
        ])
        .output()
        .unwrap();
    let _ = tagger.0.kill();
    let tagger_log = tagger.0.wait_with_output_lossy();
    assert!(
        helper.status.success(),
        "helper failed: {}\ntagger log:\n{tagger_log}",
        String::from_utf8_lossy(&helper.stderr)
    );
    let stdout = String::from_utf8(helper.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    let [hex, answer, agent_ip, agent_port] = lines[..] else {
        panic!("unexpected helper output {stdout:?}\ntagger log:\n{tagger_log}");
    };
    let received: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let (header, used) = cellgate_proxy_protocol::parse(&received).unwrap_or_else(|e| {
        panic!("node received no valid header: {e}\ntagger log:\n{tagger_log}")
    });
    let target: SocketAddr = SocketAddr::new(case.target_host.parse().unwrap(), 9999);
    assert_eq!(header.destination, target, "tagger log:\n{tagger_log}");
    let agent = SocketAddr::new(agent_ip.parse().unwrap(), agent_port.parse().unwrap());
    assert_eq!(header.source, agent);
    assert_eq!(header.token, TOKEN);
    assert_eq!(&received[used..], b"ping");
    assert_eq!(answer, "pong");
}

trait LossyLog {
    fn wait_with_output_lossy(&mut self) -> String;
}

impl LossyLog for Child {
    fn wait_with_output_lossy(&mut self) -> String {
        use std::io::Read;
        let _ = self.wait();
        let mut log = String::new();
        if let Some(mut stderr) = self.stderr.take() {
            let _ = stderr.read_to_string(&mut log);
        }
        log
    }
}

#[test]
fn original_destination_ipv4() {
    check(&Case {
        test: "cg-tagger-odst-v4",
        iptables: "iptables",
        listen: "127.0.0.1:15001",
        node_host: "127.0.0.1",
        target_host: "127.0.0.2",
        lo_address: None,
    });
}

#[test]
fn original_destination_ipv6() {
    check(&Case {
        test: "cg-tagger-odst-v6",
        iptables: "ip6tables",
        listen: "[::1]:15001",
        node_host: "::1",
        target_host: "fd00::2",
        lo_address: Some("fd00::2/128"),
    });
}

/// A tagger listening on `[::]` gets IPv4 connections as IPv4-mapped; SO_ORIGINAL_DST must
/// still be asked at the IPv4 level.
#[test]
fn original_destination_ipv4_on_a_dual_stack_listener() {
    check(&Case {
        test: "cg-tagger-odst-dual",
        iptables: "iptables",
        listen: "[::]:15001",
        node_host: "127.0.0.1",
        target_host: "127.0.0.2",
        lo_address: None,
    });
}
