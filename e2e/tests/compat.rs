//! Client compatibility: real clients run INSIDE a cell made by `cellgate run`, with no TLS flags
//! of their own: only the environment the cell sets (SSL_CERT_FILE, NODE_EXTRA_CA_CERTS,
//! JAVA_TOOL_OPTIONS, ...). Each test checks that an allowed request reached the upstream (its
//! answer describes the request it received) and, where a client can make one, that a denied
//! request gets the node's 403 JSON.
//!
//! Upstreams: `cellgate-demo-upstream` (HTTPS, h2 and HTTP/1.1, JSON echo, `/sse`) and
//! `e2e/compat/servers.py` (git smart HTTP via `git http-backend`, a WebSocket echo server).
//! The client programs are in `e2e/compat/`. Results: `docs/compatibility.md`.
//!
//! Needs root (network namespaces, iptables) and the workspace binaries (`cargo build --bins`).
//! Run: `cargo build --bins && cargo test -p cellgate-e2e --test compat -- --nocapture`.

use cellgate_e2e::{bin, workspace};
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The PATH of every cell run (and of root's helpers): no user-specific tool directories.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

use cellgate_e2e::require_root;

/// Fails clearly when a client is not installed (a missing client is a failure, not a skip).
fn require_tool(tool: &str, version_arg: &str, install: &str) -> String {
    let out = Command::new(tool)
        .arg(version_arg)
        .env("PATH", PATH)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is needed for this test ({install}): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let first = text.lines().next().unwrap_or_default().trim().to_string();
    eprintln!("compat: {tool}: {first}");
    first
}

/// A scratch directory the cell's user (nobody) can read, with the client programs copied in.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cellgate-compat-")
        .tempdir()
        .expect("temp dir");
    set_mode(dir.path(), 0o755);
    for f in std::fs::read_dir(workspace().join("e2e/compat")).expect("e2e/compat") {
        let f = f.expect("dir entry").path();
        if !f.is_file() {
            continue;
        }
        let to = dir.path().join(f.file_name().expect("file name"));
        std::fs::copy(&f, &to).expect("copy a client program");
        set_mode(&to, 0o644);
    }
    dir
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A server process that prints `listening on ADDR`; killed on drop. Its stderr is kept.
struct Server {
    child: Child,
    port: u16,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (sink, mut err) = (stderr.clone(), child.stderr.take().expect("stderr"));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "{cmd:?} did not print `listening on ADDR` within 20 s: {}",
                    stderr.lock().expect("lock")
                )
            });
        let port = line
            .strip_prefix("listening on ")
            .and_then(|a| a.rsplit(':').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{cmd:?} printed {line:?}, not `listening on ADDR`"));
        Server {
            child,
            port,
            stderr,
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cellgate-demo-upstream` for `api.compat`; its CA is written to `dir/upstream-ca.pem`.
fn demo_upstream(dir: &Path) -> Server {
    Server::start(
        Command::new(bin("cellgate-demo-upstream"))
            .args(["--names", "api.compat", "--ca-out"])
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"]),
    )
}

/// A manifest with one capability per `(name, host, port, methods, paths)`.
fn manifest(caps: &[(&str, &str, u16, &str, &str)]) -> String {
    let mut y = String::from(
        "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata:\n  name: compat\n  namespace: default\nspec:\n  capabilities:\n",
    );
    for (name, host, port, methods, paths) in caps {
        y.push_str(&format!(
            "    - name: {name}\n      destinations:\n        - host: {host}\n          ports: [{port}]\n      http:\n        methods: [{methods}]\n        paths: [{paths}]\n"
        ));
    }
    y
}

/// The `api.compat` capability: GET and POST under /v1/, and /sse. Everything else is denied.
fn api_manifest(port: u16) -> String {
    manifest(&[(
        "api",
        "api.compat",
        port,
        "GET, POST",
        "\"/v1/**\", \"/sse\"",
    )])
}

#[derive(Debug)]
struct CellOutput {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl CellOutput {
    fn context(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr (cellgate and the command)\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    fn line_starting(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no output line starts with {prefix:?}\n{}", self.context()))
    }
}

/// `cellgate run -f MANIFEST --upstream-ca ... --resolve ... -- sh -c SCRIPT`, in `dir`, with a
/// clean environment (PATH plus `extra_env`); killed after `limit`.
fn run_in_cell(
    dir: &Path,
    manifest: &str,
    cas: &[PathBuf],
    resolves: &[String],
    extra_env: &[(&str, String)],
    script: &str,
    limit: Duration,
) -> CellOutput {
    let file = dir.join("cell.yaml");
    std::fs::write(&file, manifest).expect("write the manifest");
    let mut cmd = Command::new(bin("cellgate"));
    cmd.arg("run").arg("-f").arg(&file);
    for ca in cas {
        cmd.arg("--upstream-ca").arg(ca);
    }
    for r in resolves {
        cmd.arg("--resolve").arg(r);
    }
    cmd.arg("--audit")
        .arg(dir.join("audit.jsonl"))
        .args(["--", "sh", "-c", script])
        .current_dir(dir)
        .env_clear()
        .env("PATH", PATH)
        .env("LANG", "C.UTF-8");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cellgate run");
    let collect = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = collect(Box::new(child.stdout.take().expect("stdout")));
    let err = collect(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            // SIGTERM first: cellgate stops the command and tears the cell down.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(6));
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`cellgate run` did not finish within {limit:?}\n--- stdout\n{}\n--- stderr\n{}",
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = CellOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    eprintln!("{}", o.context());
    assert!(
        o.status.success(),
        "the cell's command failed\n{}",
        o.context()
    );
    o
}

/// Asserts a line `STATUS PROTO BODY` is the upstream's answer to GET `path`, over `proto`.
fn assert_reached(o: &CellOutput, line: &str, path: &str, proto: &str) {
    let mut f = line.splitn(3, ' ');
    let (status, got_proto, body) = (
        f.next().unwrap_or_default(),
        f.next().unwrap_or_default(),
        f.next().unwrap_or_default(),
    );
    assert_eq!(status, "200", "GET {path}: {line}\n{}", o.context());
    assert_eq!(got_proto, proto, "GET {path}: {line}\n{}", o.context());
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| {
        panic!(
            "GET {path}: not the upstream's JSON ({e}): {line}\n{}",
            o.context()
        )
    });
    assert_eq!(v["method"], "GET", "{line}");
    assert_eq!(v["uri"], path, "the upstream saw another request: {line}");
}

/// Asserts `body` is the node's denial JSON for a request outside the capability.
fn assert_denial_json(o: &CellOutput, body: &str) {
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("not the node's 403 JSON ({e}): {body}\n{}", o.context()));
    assert_eq!(v["error"], "cellgate_denied", "{body}");
    assert_eq!(v["reason"], "http_rule_mismatch", "{body}");
    assert_eq!(v["cell"], "default/compat", "{body}");
}

/// Asserts a line `STATUS PROTO BODY` is the node's 403 JSON.
fn assert_denied(o: &CellOutput, line: &str, proto: &str) {
    let mut f = line.splitn(3, ' ');
    assert_eq!(
        f.next(),
        Some("403"),
        "expected a 403: {line}\n{}",
        o.context()
    );
    assert_eq!(f.next(), Some(proto), "{line}");
    assert_denial_json(o, f.next().unwrap_or_default());
}

/// Python packages the clients need, installed once (as root, `pip install --target`) into a
/// directory under target/ that the cell's user reads through PYTHONPATH. The system Python is
/// left alone.
fn python_deps() -> String {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        require_tool("python3", "--version", "apt-get install python3 python3-pip");
        let dir = workspace().join("target/e2e-compat-python");
        let have = Command::new("python3")
            .args(["-c", "import requests, websockets"])
            .env("PATH", PATH)
            .env("PYTHONPATH", &dir)
            .status()
            .is_ok_and(|s| s.success());
        if !have {
            let out = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
                .arg(&dir)
                .args(["requests", "websockets"])
                .env("PATH", PATH)
                .output()
                .expect("run python3 -m pip");
            assert!(
                out.status.success(),
                "pip install --target {} requests websockets failed (python3-pip and PyPI are needed): {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for p in walk(&dir) {
            set_mode(&p, if p.is_dir() { 0o755 } else { 0o644 });
        }
        dir.display().to_string()
    })
    .clone()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A test with the demo upstream: the scratch dir, the upstream, its port and CA.
fn api_fixture() -> (tempfile::TempDir, Server) {
    require_root();
    let dir = scratch();
    let up = demo_upstream(dir.path());
    (dir, up)
}

fn api_run(
    dir: &Path,
    up: &Server,
    env: &[(&str, String)],
    script: &str,
    limit: Duration,
) -> CellOutput {
    run_in_cell(
        dir,
        &api_manifest(up.port),
        &[dir.join("upstream-ca.pem")],
        &[format!("api.compat:{}:127.0.0.1", up.port)],
        env,
        script,
        limit,
    )
}

fn curl_test(flag: &str, path: &str, proto: &str) {
    let (dir, up) = api_fixture();
    require_tool("curl", "--version", "apt-get install curl");
    let p = up.port;
    // Each request prints one line: CODE HTTP/VERSION BODY.
    let get = |url: String| {
        format!(
            "curl -sS --max-time 20 {flag} -o body -w '%{{http_code}} HTTP/%{{http_version}} ' {url}; tr -d '\\n' < body; echo"
        )
    };
    let script = format!(
        "curl --version | head -1 >&2\ncd \"$(mktemp -d)\"\n{}\n{}",
        get(format!("https://api.compat:{p}{path}")),
        get(format!("https://api.compat:{p}/admin/users")),
    );
    let o = api_run(dir.path(), &up, &[], &script, Duration::from_secs(60));
    assert_reached(&o, o.line_starting("200 "), path, proto);
    assert_denied(&o, o.line_starting("403 "), proto);
}

#[test]
fn curl_http1_1() {
    curl_test("--http1.1", "/v1/curl-http1.1", "HTTP/1.1");
}

#[test]
fn curl_http2() {
    curl_test("--http2", "/v1/curl-http2", "HTTP/2");
}

fn python_http_test(client: &str) {
    let (dir, up) = api_fixture();
    let deps = python_deps();
    let p = up.port;
    let path = format!("/v1/python-{client}");
    let script = format!(
        "python3 --version >&2
         python3 http_get.py {client} https://api.compat:{p}{path} https://api.compat:{p}/admin/users"
    );
    let o = api_run(
        dir.path(),
        &up,
        &[("PYTHONPATH", deps)],
        &script,
        Duration::from_secs(60),
    );
    assert_reached(&o, o.line_starting("200 "), &path, "HTTP/1.1");
    assert_denied(&o, o.line_starting("403 "), "HTTP/1.1");
}

#[test]
fn python_urllib() {
    python_http_test("urllib");
}

#[test]
fn python_requests() {
    python_http_test("requests");
}

#[test]
fn node_fetch() {
    let (dir, up) = api_fixture();
    require_tool(
        "node",
        "--version",
        "apt-get install nodejs (v18 or later: global fetch)",
    );
    let p = up.port;
    let script = format!(
        "node fetch.js https://api.compat:{p}/v1/node-fetch https://api.compat:{p}/admin/users"
    );
    let o = api_run(dir.path(), &up, &[], &script, Duration::from_secs(60));
    // Node's fetch (undici) does not report the protocol; it speaks HTTP/1.1 unless told otherwise.
    assert_reached(&o, o.line_starting("200 "), "/v1/node-fetch", "-");
    assert_denied(&o, o.line_starting("403 "), "-");
}

#[test]
fn java_httpclient() {
    let (dir, up) = api_fixture();
    require_tool(
        "java",
        "-version",
        "apt-get install openjdk-17-jdk-headless",
    );
    let p = up.port;
    let script =
        format!("java Client.java https://api.compat:{p}/v1/java-httpclient https://api.compat:{p}/admin/users");
    let o = api_run(dir.path(), &up, &[], &script, Duration::from_secs(120));
    assert!(
        o.stderr.contains("Picked up JAVA_TOOL_OPTIONS"),
        "java did not read the cell's JAVA_TOOL_OPTIONS\n{}",
        o.context()
    );
    assert_reached(&o, o.line_starting("200 "), "/v1/java-httpclient", "HTTP_2");
    assert_denied(&o, o.line_starting("403 "), "HTTP_2");
}

#[test]
fn sse_stream_is_read_incrementally() {
    let (dir, up) = api_fixture();
    let deps = python_deps();
    let p = up.port;
    let script = format!("python3 sse_client.py https://api.compat:{p}/sse");
    let o = api_run(
        dir.path(),
        &up,
        &[("PYTHONPATH", deps)],
        &script,
        Duration::from_secs(60),
    );
    assert!(
        o.line_starting("status ")
            .starts_with("status 200 text/event-stream"),
        "{}",
        o.context()
    );
    let events: Vec<(f64, String)> = o
        .stdout
        .lines()
        .filter(|l| l.contains(" data:"))
        .map(|l| {
            let (t, d) = l.split_once(' ').expect("TIME DATA");
            (t.parse().expect("seconds"), d.to_string())
        })
        .collect();
    let data: Vec<&str> = events.iter().map(|(_, d)| d.as_str()).collect();
    assert_eq!(data.len(), 3, "three events expected\n{}", o.context());
    assert!(
        data.iter().all(|d| d.starts_with("data: event ")),
        "{data:?}"
    );
    // The upstream sends them 300 ms apart: if anything between buffered the stream, they would
    // arrive together.
    let spread = events[2].0 - events[0].0;
    assert!(
        spread >= 0.45,
        "the events arrived together ({spread:.3} s from first to last, 0.6 s sent): the stream was buffered\n{}",
        o.context()
    );
    assert!(
        events[1].0 - events[0].0 >= 0.15 && events[2].0 - events[1].0 >= 0.15,
        "{events:?}"
    );
}

#[test]
fn openssl_s_client_verifies_the_chain() {
    let (dir, up) = api_fixture();
    require_tool("openssl", "version", "apt-get install openssl");
    let p = up.port;
    let script = format!(
        "openssl version >&2
         printf 'GET /v1/openssl HTTP/1.1\\r\\nHost: api.compat:{p}\\r\\nConnection: close\\r\\n\\r\\n' |
           timeout 30 openssl s_client -connect api.compat:{p} -servername api.compat -verify_return_error -ign_eof 2>&1"
    );
    let o = api_run(dir.path(), &up, &[], &script, Duration::from_secs(60));
    assert!(
        o.stdout.contains("Verify return code: 0 (ok)"),
        "openssl did not verify the chain with its default paths\n{}",
        o.context()
    );
    assert!(o.stdout.contains("HTTP/1.1 200"), "{}", o.context());
    assert!(
        o.stdout
            .contains("depth=1 CN = Cellgate local CA (default/compat)"),
        "the chain is not the cell's\n{}",
        o.context()
    );
    // s_client prints the body and then its own `---` without a newline in between.
    let line = o.line_starting("{");
    let body = &line[..=line.rfind('}').expect("a JSON object")];
    let v: serde_json::Value = serde_json::from_str(body).expect("the upstream's JSON");
    assert_eq!(v["uri"], "/v1/openssl", "{body}");
}

/// `e2e/compat/servers.py` with a fresh CA for `git.compat` and `ws.compat`, serving `git_root`.
fn helper_servers(dir: &Path, git_root: &Path) -> Server {
    require_tool("python3", "--version", "apt-get install python3");
    Server::start(
        Command::new("python3")
            .arg(dir.join("servers.py"))
            .arg("--dir")
            .arg(dir.join("servers"))
            .args(["--names", "git.compat,ws.compat", "--git-root"])
            .arg(git_root),
    )
}

fn git(args: &[&str], cwd: &Path) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=compat",
            "-c",
            "user.email=compat@example.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(cwd)
        .env("PATH", PATH)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn git_clone_over_smart_https() {
    require_root();
    require_tool("git", "--version", "apt-get install git");
    let dir = scratch();
    let d = dir.path();
    // A repository with one commit, served bare under /git/repo.git.
    std::fs::create_dir_all(d.join("work")).expect("mkdir");
    git(&["init", "-q"], &d.join("work"));
    std::fs::write(d.join("work/README"), "hello from the compat repository\n").expect("write");
    git(&["add", "README"], &d.join("work"));
    git(&["commit", "-qm", "first"], &d.join("work"));
    std::fs::create_dir_all(d.join("repos")).expect("mkdir");
    git(
        &["clone", "-q", "--bare", "../work", "repo.git"],
        &d.join("repos"),
    );
    let srv = helper_servers(d, &d.join("repos"));
    let p = srv.port;
    let cell = manifest(&[("git", "git.compat", p, "GET, POST", "\"/git/repo.git/**\"")]);
    let script = format!(
        "git --version >&2
         cd \"$(mktemp -d)\"
         git clone https://git.compat:{p}/git/repo.git
         echo \"README: $(cat repo/README)\"
         echo \"HEAD: $(git -C repo log --format=%s -1)\"
         if git clone https://git.compat:{p}/git/other.git 2>err; then echo 'other: cloned'; else echo \"other: $(tr '\\n' ' ' < err)\"; fi"
    );
    let o = run_in_cell(
        d,
        &cell,
        &[d.join("servers/ca.pem")],
        &[format!("git.compat:{p}:127.0.0.1")],
        &[],
        &script,
        Duration::from_secs(60),
    );
    assert_eq!(
        o.line_starting("README: "),
        "README: hello from the compat repository",
        "{}",
        o.context()
    );
    assert_eq!(o.line_starting("HEAD: "), "HEAD: first");
    let log = srv.log();
    assert!(
        log.contains("git POST /repo.git/git-upload-pack"),
        "the smart protocol was not used (no git-upload-pack POST reached the server): {log}"
    );
    let other = o.line_starting("other: ");
    assert!(
        other.contains("403"),
        "a clone outside the capability must get a 403: {other}"
    );
    assert!(
        !log.contains("other.git"),
        "the denied clone reached the server: {log}"
    );
    eprintln!("compat: git server log:\n{log}");
}

#[test]
fn websocket_echo() {
    require_root();
    let deps = python_deps();
    let dir = scratch();
    let d = dir.path();
    std::fs::create_dir_all(d.join("repos")).expect("mkdir");
    let srv = helper_servers(d, &d.join("repos"));
    let p = srv.port;
    let cell = manifest(&[("ws", "ws.compat", p, "GET", "\"/ws\"")]);
    let script =
        format!("python3 ws_client.py wss://ws.compat:{p}/ws wss://ws.compat:{p}/ws-admin");
    let o = run_in_cell(
        d,
        &cell,
        &[d.join("servers/ca.pem")],
        &[format!("ws.compat:{p}:127.0.0.1")],
        &[("PYTHONPATH", deps)],
        &script,
        Duration::from_secs(60),
    );
    assert_eq!(
        o.line_starting("echo text: "),
        "echo text: hello through the cell",
        "{}",
        o.context()
    );
    assert_eq!(
        o.line_starting("echo binary: "),
        "echo binary: 000162696e617279ff"
    );
    let denied = o.line_starting("denied: ");
    let body = denied.strip_prefix("denied: 403 ").unwrap_or_else(|| {
        panic!(
            "the denied WebSocket must get a 403: {denied}\n{}",
            o.context()
        )
    });
    assert_denial_json(&o, body);
    assert!(
        srv.log().contains("\"GET /ws HTTP/1.1\" 101"),
        "{}",
        srv.log()
    );
}
