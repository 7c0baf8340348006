//! `cellgate-init` for real: each test makes a pair of network namespaces named after itself,
//! `cg-init-<short>` (the cell, 10.77.0.2/24 and fd77::2/64) and `cg-init-<short>-o` (the
//! outside world and the node, 10.77.0.1/24 and fd77::1/64) joined by a veth pair, runs the built
//! binary inside with `ip netns exec`, and checks the rules with real traffic: Python listeners
//! outside and a fake tagger inside report what reached them, clients run as the agent
//! (uid 65534) or the tagger (uid 1337) through `setpriv`.
//!
//! These tests need root. Without it they fail; they never skip. Every wait is bounded, and the
//! namespaces are deleted on drop, even when a test fails.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const INIT: &str = env!("CARGO_BIN_EXE_cellgate-init");
const PYTHON: &str = "/usr/bin/python3";
const TAGGER_UID: &str = "1337";
const AGENT_UID: &str = "65534";
const TAGGER_PORT: &str = "15006";

/// Listens on each `proto:host:port` argument, prints `ready`, then one line per TCP
/// connection (`tcp PORT PAYLOAD`, after reading to EOF, before answering `ok`) or datagram
/// (`udp PORT PAYLOAD`). Exits on its own after a minute.
const LISTEN: &str = r#"
import socket, sys, threading, time
def log(*a): print(*a, flush=True)
def family(host): return socket.AF_INET6 if ":" in host else socket.AF_INET
def handle(c, port):
    c.settimeout(5); data = b""
    try:
        while True:
            chunk = c.recv(4096)
            if not chunk: break
            data += chunk
    except OSError: pass
    log("tcp", port, data.decode(errors="replace"))
    try: c.sendall(b"ok"); c.close()
    except OSError: pass
def tcp(host, port):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if host == "::": s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, port)); s.listen(16)
    def serve():
        while True:
            c, _ = s.accept()
            threading.Thread(target=handle, args=(c, port), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
def udp(host, port):
    s = socket.socket(family(host), socket.SOCK_DGRAM); s.bind((host, port))
    def serve():
        while True:
            data, _ = s.recvfrom(4096); log("udp", port, data.decode(errors="replace"))
    threading.Thread(target=serve, daemon=True).start()
for spec in sys.argv[1:]:
    proto, rest = spec.split(":", 1); host, port = rest.rsplit(":", 1)
    (tcp if proto == "tcp" else udp)(host.strip("[]"), int(port))
log("ready")
time.sleep(60)
"#;

/// `tcp HOST PORT PAYLOAD`: connect, send, half-close, print `ok ANSWER`. `udp ...`: send one
/// datagram, print `sent`. `icmp HOST`: one echo request, print `reply` if answered within 1 s.
/// Any failure prints `err REASON`. Every step has a timeout.
const CLIENT: &str = r#"
import socket, struct, sys, time
mode, host = sys.argv[1], sys.argv[2]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
def checksum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
try:
    if mode == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(2)
        s.connect((host, int(sys.argv[3]))); s.sendall(sys.argv[4].encode()); s.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            chunk = s.recv(4096)
            if not chunk: break
            answer += chunk
        print("ok", answer.decode())
    elif mode == "udp":
        s = socket.socket(fam, socket.SOCK_DGRAM); s.sendto(sys.argv[4].encode(), (host, int(sys.argv[3])))
        print("sent")
    elif mode == "icmp":
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(1)
        body = struct.pack("!HH", 0x4347, 1) + b"cellgate"
        s.sendto(struct.pack("!BBH", 8, 0, checksum(struct.pack("!BBH", 8, 0, 0) + body)) + body, (host, 0))
        deadline = time.time() + 1
        while True:
            s.settimeout(max(deadline - time.time(), 0.01))
            data, peer = s.recvfrom(4096)
            if peer[0] == host and data[(data[0] & 0xf) * 4] == 0: print("reply"); break
except OSError as e:
    print("err", e)
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
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A cell namespace and an outside namespace joined by a veth pair; both deleted on drop.
struct Cell {
    inside: String,
    outside: String,
}

impl Cell {
    fn new(short: &str) -> Self {
        require_root();
        assert!(short.len() <= 8, "veth names are limited to 15 bytes");
        let cell = Self {
            inside: format!("cg-init-{short}"),
            outside: format!("cg-init-{short}-o"),
        };
        for name in [&cell.inside, &cell.outside] {
            // A leftover from a crashed run of this very test would make `add` fail.
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            run(Command::new("ip").args(["netns", "add", name]));
            run(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]));
        }
        let (vin, vout) = (format!("ci-{short}"), format!("co-{short}"));
        run(Command::new("ip").args([
            "-n",
            &cell.inside,
            "link",
            "add",
            &vin,
            "type",
            "veth",
            "peer",
            "name",
            &vout,
            "netns",
            &cell.outside,
        ]));
        for (ns, dev, v4, v6) in [
            (&cell.inside, &vin, "10.77.0.2/24", "fd77::2/64"),
            (&cell.outside, &vout, "10.77.0.1/24", "fd77::1/64"),
        ] {
            run(Command::new("ip").args(["-n", ns, "addr", "add", v4, "dev", dev]));
            run(Command::new("ip").args(["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]));
            run(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
        }
        // Default routes so that "any address" is reachable from the cell before the rules.
        run(Command::new("ip").args([
            "-n",
            &cell.inside,
            "route",
            "add",
            "default",
            "via",
            "10.77.0.1",
        ]));
        run(Command::new("ip").args([
            "-n",
            &cell.inside,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd77::1",
        ]));
        cell
    }

    fn exec(ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        // `timeout` bounds every helper, whatever the rules do to it.
        cmd.args(["netns", "exec", ns, "timeout", "20", program]);
        cmd
    }

    fn inside(&self, program: &str) -> Command {
        Self::exec(&self.inside, program)
    }

    /// Runs `cellgate-init` inside as root; returns (exit code, stdout, stderr).
    fn init(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.inside(INIT).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout),
            text(&out.stderr),
        )
    }

    /// `iptables-save` and `ip6tables-save` inside, without the timestamp comments.
    fn saved(&self) -> (String, String) {
        let save = |tool: &str| {
            text(&run(&mut self.inside(tool)).stdout)
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        };
        (save("iptables-save"), save("ip6tables-save"))
    }

    /// Runs the client inside as `uid`; returns its one-line report.
    fn client(&self, uid: &str, args: &[&str]) -> String {
        let mut cmd = self.inside("setpriv");
        cmd.args([
            "--reuid",
            uid,
            "--regid",
            uid,
            "--clear-groups",
            PYTHON,
            "-c",
            CLIENT,
        ]);
        let out = run(cmd.args(args));
        text(&out.stdout).trim().to_owned()
    }

    /// Runs the client in the outside namespace as root.
    fn outside_client(&self, args: &[&str]) -> String {
        let out = run(Self::exec(&self.outside, PYTHON)
            .args(["-c", CLIENT])
            .args(args));
        text(&out.stdout).trim().to_owned()
    }

    fn listen(&self, inside: bool, specs: &[&str]) -> Listener {
        let ns = if inside { &self.inside } else { &self.outside };
        Listener::start(Self::exec(ns, PYTHON).args(["-c", LISTEN]).args(specs))
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        for name in [&self.inside, &self.outside] {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// A listener process whose report lines arrive on a channel; killed on drop.
struct Listener {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Listener {
    fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut listener = Self {
            child,
            lines,
            seen: Vec::new(),
        };
        listener.expect("ready");
        listener
    }

    /// Waits (at most 5 s) until `line` has been reported.
    fn expect(&mut self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.seen.iter().any(|l| l == line) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("never reported {line:?}; reported {:?}", self.seen),
            }
        }
    }

    /// Everything reported so far, after a short settling time.
    fn reported(&mut self) -> &[String] {
        std::thread::sleep(Duration::from_millis(500));
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }

    /// Asserts nothing reported so far mentions `payload`.
    fn never(&mut self, payload: &str) {
        let hits: Vec<&String> = self
            .reported()
            .iter()
            .filter(|l| l.ends_with(&format!(" {payload}")))
            .collect();
        assert!(hits.is_empty(), "{payload:?} got through: {hits:?}");
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn init_args<'a>(node: &'a str, dns: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--tagger-uid",
        TAGGER_UID,
        "--tagger-port",
        TAGGER_PORT,
        "--node",
        node,
        "--dns",
        dns,
    ];
    args.extend_from_slice(extra);
    args
}

fn assert_applied(cell: &Cell, args: &[&str]) -> String {
    let (code, stdout, stderr) = cell.init(args);
    assert_eq!(code, 0, "cellgate-init failed:\n{stdout}{stderr}");
    stdout
}

#[test]
fn running_twice_gives_the_same_rules() {
    let cell = Cell::new("idem");
    let args = init_args(
        "10.77.0.1:15001",
        "10.77.0.1:5353",
        &["--allow-inbound", "8080"],
    );
    let first = assert_applied(&cell, &args);
    assert!(
        first.contains("jumps added: nat: -A OUTPUT -j CELLGATE_OUTPUT"),
        "{first}"
    );
    let after_first = cell.saved();
    let second = assert_applied(&cell, &args);
    assert!(
        second.contains("ipv4: egress rules applied (jumps already installed by an earlier run)"),
        "{second}"
    );
    let after_second = cell.saved();
    assert_eq!(after_first.0, after_second.0, "iptables-save changed");
    assert_eq!(after_first.1, after_second.1, "ip6tables-save changed");
    for saved in [&after_second.0, &after_second.1] {
        for hook in ["-A OUTPUT -j CELLGATE_OUTPUT", "-A INPUT -j CELLGATE_INPUT"] {
            let count = saved.lines().filter(|l| *l == hook).count();
            let expected = if hook.starts_with("-A OUTPUT") { 2 } else { 1 };
            assert_eq!(count, expected, "{hook} in\n{saved}");
        }
    }
    // What the kernel holds is what `render` promised, rule for rule.
    for rule in first.lines().filter(|l| l.starts_with("-A CELLGATE_")) {
        assert!(
            after_second.0.contains(rule) || after_second.1.contains(rule),
            "{rule} not installed"
        );
    }
}

#[test]
fn ipv4_agent_traffic_goes_through_the_tagger_or_nowhere() {
    let cell = Cell::new("v4");
    let mut outside = cell.listen(
        false,
        &[
            "tcp:10.77.0.1:8080",
            "tcp:10.77.0.1:15001",
            "udp:10.77.0.1:9999",
            "udp:10.77.0.1:5353",
            "tcp:10.77.0.1:5353",
        ],
    );
    let mut tagger = cell.listen(
        true,
        &[
            &format!("tcp:[::]:{TAGGER_PORT}"),
            "tcp:127.0.0.1:7000",
            "tcp:0.0.0.0:8080",
            "tcp:0.0.0.0:9090",
        ],
    );

    // Before the rules everything gets out: the checks below are not vacuous.
    assert_eq!(
        cell.client(AGENT_UID, &["tcp", "10.77.0.1", "8080", "before-tcp"]),
        "ok ok"
    );
    outside.expect("tcp 8080 before-tcp");
    assert_eq!(
        cell.client(AGENT_UID, &["udp", "10.77.0.1", "9999", "before-udp"]),
        "sent"
    );
    outside.expect("udp 9999 before-udp");
    assert_eq!(cell.client("0", &["icmp", "10.77.0.1"]), "reply");
    assert_eq!(
        cell.outside_client(&["tcp", "10.77.0.2", "9090", "before-in"]),
        "ok ok"
    );

    assert_applied(
        &cell,
        &init_args(
            "10.77.0.1:15001",
            "10.77.0.1:5353",
            &["--allow-inbound", "8080"],
        ),
    );

    // Agent TCP, to the node's address or anywhere else, reaches the tagger instead.
    assert_eq!(
        cell.client(AGENT_UID, &["tcp", "10.77.0.1", "8080", "agent-tcp"]),
        "ok ok"
    );
    tagger.expect(&format!("tcp {TAGGER_PORT} agent-tcp"));
    assert_eq!(
        cell.client(AGENT_UID, &["tcp", "192.0.2.1", "443", "agent-far"]),
        "ok ok"
    );
    tagger.expect(&format!("tcp {TAGGER_PORT} agent-far"));
    assert_eq!(
        cell.client("0", &["tcp", "10.77.0.1", "15001", "root-node"]),
        "ok ok"
    );
    tagger.expect(&format!("tcp {TAGGER_PORT} root-node"));
    // The tagger reaches the node, and nothing else.
    assert_eq!(
        cell.client(TAGGER_UID, &["tcp", "10.77.0.1", "15001", "tagger-node"]),
        "ok ok"
    );
    outside.expect("tcp 15001 tagger-node");
    assert!(cell
        .client(TAGGER_UID, &["tcp", "10.77.0.1", "8080", "tagger-other"])
        .starts_with("err"));
    // Loopback stays loopback.
    assert_eq!(
        cell.client(AGENT_UID, &["tcp", "127.0.0.1", "7000", "agent-loop"]),
        "ok ok"
    );
    tagger.expect("tcp 7000 agent-loop");
    // DNS, to any address, over UDP and TCP, goes to the resolver (not the tagger).
    cell.client(AGENT_UID, &["udp", "10.77.0.1", "53", "dns-udp"]);
    outside.expect("udp 5353 dns-udp");
    cell.client(AGENT_UID, &["udp", "192.0.2.53", "53", "dns-far"]);
    outside.expect("udp 5353 dns-far");
    assert_eq!(
        cell.client(AGENT_UID, &["tcp", "10.77.0.1", "53", "dns-tcp"]),
        "ok ok"
    );
    outside.expect("tcp 5353 dns-tcp");
    // Other UDP and ICMP do not leave.
    cell.client(AGENT_UID, &["udp", "10.77.0.1", "9999", "agent-udp"]);
    cell.client(TAGGER_UID, &["udp", "10.77.0.1", "9999", "tagger-udp"]);
    assert!(cell.client("0", &["icmp", "10.77.0.1"]).starts_with("err"));
    // Inbound: declared pod ports only.
    assert_eq!(
        cell.outside_client(&["tcp", "10.77.0.2", "8080", "in-allowed"]),
        "ok ok"
    );
    tagger.expect("tcp 8080 in-allowed");
    assert!(cell
        .outside_client(&["tcp", "10.77.0.2", "9090", "in-denied"])
        .starts_with("err"));

    for payload in [
        "agent-tcp",
        "agent-far",
        "root-node",
        "tagger-other",
        "agent-udp",
        "tagger-udp",
    ] {
        outside.never(payload);
    }
    for payload in ["dns-tcp", "dns-udp", "tagger-node", "in-denied"] {
        tagger.never(payload);
    }
}

#[test]
fn ipv6_agent_traffic_goes_through_the_tagger_or_nowhere() {
    let cell = Cell::new("v6");
    let mut outside = cell.listen(
        false,
        &[
            "tcp:fd77::1:8080",
            "tcp:fd77::1:15001",
            "udp:fd77::1:9999",
            "udp:fd77::1:5353",
        ],
    );
    let mut tagger = cell.listen(true, &[&format!("tcp:[::]:{TAGGER_PORT}")]);
    assert_eq!(
        cell.client(AGENT_UID, &["tcp", "fd77::1", "8080", "before-tcp6"]),
        "ok ok"
    );
    outside.expect("tcp 8080 before-tcp6");

    let stdout = assert_applied(
        &cell,
        &init_args("[fd77::1]:15001", "[fd77::1]:5353", &["--ipv6", "on"]),
    );
    assert!(stdout.contains("ipv6: egress rules applied"), "{stdout}");

    assert_eq!(
        cell.client(AGENT_UID, &["tcp", "fd77::1", "8080", "agent-tcp6"]),
        "ok ok"
    );
    tagger.expect(&format!("tcp {TAGGER_PORT} agent-tcp6"));
    assert_eq!(
        cell.client(TAGGER_UID, &["tcp", "fd77::1", "15001", "tagger-node6"]),
        "ok ok"
    );
    outside.expect("tcp 15001 tagger-node6");
    cell.client(AGENT_UID, &["udp", "fd77::1", "53", "dns-udp6"]);
    outside.expect("udp 5353 dns-udp6");
    cell.client(AGENT_UID, &["udp", "fd77::1", "9999", "agent-udp6"]);
    outside.never("agent-tcp6");
    outside.never("agent-udp6");
}

/// Writes an executable shell script `name` into `dir`.
fn script(dir: &std::path::Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn ipv6_without_nat_is_dropped_not_left_open() {
    let cell = Cell::new("v6drop");
    let mut outside = cell.listen(false, &["tcp:fd77::1:8080"]);
    // An ip6tables-restore whose kernel has no IPv6 NAT.
    let bin = tempfile_dir("v6drop");
    script(
        &bin,
        "ip6tables-restore",
        "input=$(cat)\n\
         case \"$input\" in *'*nat'*) echo \"ip6tables-restore: can't initialize ip6tables table 'nat'\" >&2; exit 1;; esac\n\
         printf '%s\\n' \"$input\" | exec /usr/sbin/ip6tables-restore \"$@\"",
    );
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    let out = run(cell
        .inside("env")
        .arg(format!("PATH={path}"))
        .arg(INIT)
        .args(init_args("10.77.0.1:15001", "10.77.0.1:5353", &[])));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("ipv6: ALL ipv6 egress dropped except loopback (--ipv6 auto: no ipv6 nat"),
        "{stdout}"
    );
    let (_, v6) = cell.saved();
    assert!(
        v6.contains("-A CELLGATE_OUTPUT -o lo -j ACCEPT\n-A CELLGATE_OUTPUT -j DROP\n"),
        "{v6}"
    );
    assert!(!v6.contains("REDIRECT"), "{v6}");
    assert!(cell
        .client(AGENT_UID, &["tcp", "fd77::1", "8080", "agent-tcp6"])
        .starts_with("err"));
    outside.never("agent-tcp6");
    let _ = std::fs::remove_dir_all(&bin);
}

#[test]
fn ipv6_without_ip6tables_is_disabled_not_left_open() {
    let cell = Cell::new("v6off");
    let bin = tempfile_dir("v6off");
    script(
        &bin,
        "ip6tables-save",
        "echo 'ip6tables-save: not supported' >&2; exit 1",
    );
    script(
        &bin,
        "ip6tables-restore",
        "echo 'ip6tables-restore: not supported' >&2; exit 1",
    );
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    let out = run(cell
        .inside("env")
        .arg(format!("PATH={path}"))
        .arg(INIT)
        .args(init_args("10.77.0.1:15001", "10.77.0.1:5353", &[])));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("ipv6: disabled in this namespace with disable_ipv6"),
        "{stdout}"
    );
    let flag = run(cell
        .inside("cat")
        .arg("/proc/sys/net/ipv6/conf/all/disable_ipv6"));
    assert_eq!(text(&flag.stdout).trim(), "1");
    // `--ipv6 on` refuses instead.
    let out = cell
        .inside("env")
        .arg(format!("PATH={path}"))
        .arg(INIT)
        .args(init_args(
            "10.77.0.1:15001",
            "10.77.0.1:5353",
            &["--ipv6", "on"],
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--ipv6 on: the ipv6 rules could not be applied"));
    let _ = std::fs::remove_dir_all(&bin);
}

#[test]
fn dry_run_and_missing_capability_change_nothing() {
    let cell = Cell::new("nocap");
    let before = cell.saved();
    let args = init_args("10.77.0.1:15001", "10.77.0.1:5353", &[]);
    let as_nobody = |extra: &[&str]| {
        cell.inside("setpriv")
            .args([
                "--reuid",
                AGENT_UID,
                "--regid",
                AGENT_UID,
                "--clear-groups",
                INIT,
            ])
            .args(&args)
            .args(extra)
            .output()
            .unwrap()
    };
    let dry = as_nobody(&["--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry.stderr));
    let stdout = text(&dry.stdout);
    assert!(
        stdout.contains("-A CELLGATE_OUTPUT -p tcp -j REDIRECT --to-ports 15006\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("--- ip6tables-restore --noflush ---\n"),
        "{stdout}"
    );
    let denied = as_nobody(&[]);
    assert_eq!(denied.status.code(), Some(3));
    assert_eq!(
        text(&denied.stderr).trim(),
        "cellgate-init: needs CAP_NET_ADMIN in the pod's network namespace (run as root, or grant NET_ADMIN to the init container only)"
    );
    // Root without NET_ADMIN in its bounding set is refused the same way.
    let capless = cell
        .inside("setpriv")
        .args(["--bounding-set=-net_admin", "--inh-caps=-net_admin", INIT])
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(capless.status.code(), Some(3), "{}", text(&capless.stderr));
    assert_eq!(cell.saved(), before, "rules changed");
}

/// A fresh directory under the target's temporary directory.
fn tempfile_dir(test: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cellgate-init-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
