//! MCP governance through a real cell, with the real Python MCP SDK on both ends: a FastMCP
//! server (Streamable HTTP, once answering in SSE streams and once in JSON) as the upstream, and
//! the SDK's client inside the cell (`cellgate run`), listing tools and resources, calling an
//! allowed and a refused tool, reading an allowed and a refused resource.
//!
//! Needs root (network namespaces, iptables) and a Python with the `mcp` package, named by
//! `MCP_PYTHON` (.ci/run installs it into its virtualenv and sets it; without it the test says
//! `NOTE ... not run`, and fails with `CI=true`).

use cellgate_e2e::{bin, free_port, workspace, Kill};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cellgate_e2e::require_root;

fn python() -> Option<PathBuf> {
    let Some(p) = std::env::var_os("MCP_PYTHON") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but MCP_PYTHON is not set: .ci/run installs the MCP SDK and sets it"
        );
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "NOTE mcp suite not run: MCP_PYTHON is not set (a Python with the mcp package; see docs/mcp.md)"
        );
        return None;
    };
    Some(PathBuf::from(p))
}

/// Starts the FastMCP server on a free port; waits until it accepts connections.
fn server(py: &PathBuf, json: bool, log: PathBuf) -> (Kill, u16) {
    let port = free_port();
    let mut c = Command::new(py);
    c.arg(workspace().join("e2e/mcp/server.py"))
        .arg(port.to_string());
    if json {
        c.arg("--json");
    }
    let child = c
        .stdout(Stdio::from(std::fs::File::create(log).expect("log")))
        .stderr(Stdio::null())
        .spawn()
        .expect("server");
    let k = Kill(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the MCP server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (k, port)
}

#[test]
fn a_real_mcp_client_in_a_cell_sees_and_uses_only_what_the_capability_allows() {
    require_root();
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let (_sse, sse_port) = server(&py, false, dir.path().join("sse.log"));
    let (_json, json_port) = server(&py, true, dir.path().join("json.log"));
    let cell = format!(
        "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {{name: mcp-agent}}
spec:
  capabilities:
    - name: tools
      destinations: [{{host: mcp.life, ports: [{sse_port}, {json_port}]}}]
      mcp:
        tools: {{allow: [\"search_*\", \"get_issue\"], deny: [\"delete_*\"]}}
        resources: {{allow: [\"repo://*\"]}}
"
    );
    let cell_file = dir.path().join("cell.yaml");
    std::fs::write(&cell_file, cell).expect("cell");
    // The agent runs as nobody, who cannot reach a virtualenv's interpreter under /root: it
    // runs the system's Python 3 with the SDK's packages on its path.
    let site = Command::new(&py)
        .args([
            "-c",
            "import mcp, os; print(os.path.dirname(os.path.dirname(mcp.__file__)))",
        ])
        .output()
        .expect("MCP_PYTHON");
    let site = String::from_utf8_lossy(&site.stdout).trim().to_string();
    let client = workspace().join("e2e/mcp/client.py");
    let script = format!(
        "export PYTHONPATH={site}; python3 {client} http://mcp.life:{sse_port}/mcp && python3 {client} http://mcp.life:{json_port}/mcp",
        client = client.display()
    );
    let out = Command::new(bin("cellgate"))
        .arg("run")
        .arg("-f")
        .arg(&cell_file)
        .arg("--audit")
        .arg(dir.path().join("audit.jsonl"))
        .args(["--resolve", &format!("mcp.life:{sse_port}:127.0.0.1")])
        .args(["--resolve", &format!("mcp.life:{json_port}:127.0.0.1")])
        .args(["--", "sh", "-c", &script])
        .current_dir(dir.path())
        .output()
        .expect("cellgate run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let seen: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("client JSON"))
        .collect();
    assert_eq!(seen.len(), 2, "{stdout}\n{stderr}");
    for (mode, s) in ["sse", "json"].iter().zip(&seen) {
        // Lists show only what is allowed.
        assert_eq!(
            s["tools"],
            serde_json::json!(["get_issue", "search_code"]),
            "{mode}: {s}"
        );
        assert_eq!(
            s["resources"],
            serde_json::json!(["repo://readme"]),
            "{mode}: {s}"
        );
        // Allowed calls go through; refused ones are JSON-RPC errors the SDK raises.
        assert_eq!(
            s["search"]["ok"],
            serde_json::json!(["found x"]),
            "{mode}: {s}"
        );
        assert_eq!(s["delete"]["error"]["code"], -32001, "{mode}: {s}");
        assert_eq!(
            s["delete"]["error"]["data"]["reason"], "mcp_tool_denied",
            "{mode}: {s}"
        );
        assert_eq!(
            s["delete"]["error"]["data"]["tool"], "delete_repo",
            "{mode}: {s}"
        );
        assert_eq!(
            s["readme"]["ok"],
            serde_json::json!(["read me"]),
            "{mode}: {s}"
        );
        assert_eq!(
            s["secret"]["error"]["data"]["reason"], "mcp_resource_denied",
            "{mode}: {s}"
        );
    }
    // The server never ran what was refused.
    for log in ["sse.log", "json.log"] {
        let text = std::fs::read_to_string(dir.path().join(log)).unwrap_or_default();
        assert!(
            !text.contains("DELETED") && !text.contains("SECRET READ"),
            "{log}: {text}"
        );
    }
    // Audited: each refusal names the tool or resource, with the MCP session.
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).expect("audit");
    let denied: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("record"))
        .filter(|r| r["reason"] == "mcp_tool_denied")
        .collect();
    assert_eq!(denied.len(), 2, "{audit}");
    for r in &denied {
        assert_eq!(r["decision"], "deny");
        assert_eq!(r["capability"], "tools");
        let reasons = r["reasons"].to_string();
        assert!(reasons.contains("delete_repo"), "{r}");
        assert!(reasons.contains("mcp_session="), "{r}");
    }
    assert!(
        audit.contains("\"reason\":\"mcp_resource_denied\""),
        "{audit}"
    );
}
