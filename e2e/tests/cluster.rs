//! The real-cluster suite: switched on by `KUBECONFIG`, it installs the kustomize base into the
//! cluster that kubeconfig names (kind or any), applies an AgentCell, and from inside the agent's
//! pod runs an allowed request, a denied request, and a revocation with `kubectl cellgate revoke`
//! that must be enforced within a second.
//!
//! Without `KUBECONFIG` it prints that it did not run and passes: no Kubernetes API server can run
//! on the machines that run the rest of the suite (the operator, node and plugin are tested there
//! against kube-rs's mocked API service instead).
//!
//! Settings (environment):
//! - `KUBECONFIG`: the cluster (required to run).
//! - `CELLGATE_E2E_REGISTRY` (default `ghcr.io/cellgate`) and `CELLGATE_E2E_TAG` (default `0.1.0`):
//!   where the four images are (`kind load docker-image` them for kind; see README.md).
//! - `CELLGATE_E2E_AGENT_IMAGE` (default `curlimages/curl:8.10.1`): an image with curl and sleep.
//! - `CELLGATE_E2E_ALLOWED_URL` (default `https://example.com/`) and `CELLGATE_E2E_DENIED_URL`
//!   (default `https://example.org/`): the allowed URL's host is the cell's one capability.
//! - `CELLGATE_E2E_KEEP=1`: leave the namespaces in place afterwards, for a look.

use cellgate_e2e::{bin, workspace};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn kubectl(args: &[&str]) -> Output {
    Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl (install kubectl to run the cluster suite)")
}

fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl(args);
    assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn kubectl_apply(yaml: &str) {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .args(["apply", "--server-side", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("kubectl apply");
    assert!(out.status.success(), "kubectl apply: {}", text(&out));
}

/// `kubectl exec` into the agent container: curl's status code and body.
fn agent_curl(ns: &str, url: &str) -> (String, String) {
    let out = kubectl(&[
        "exec",
        "-n",
        ns,
        "e2e-agent",
        "-c",
        "agent",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        url,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    (code.trim().to_string(), body.to_string())
}

struct Cleanup {
    namespaces: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::env::var_os("CELLGATE_E2E_KEEP").is_some() {
            return;
        }
        for ns in &self.namespaces {
            let _ = kubectl(&["delete", "namespace", ns, "--wait=false"]);
        }
    }
}

#[test]
fn real_cluster_allowed_denied_and_revoked_from_an_agent_pod() {
    if std::env::var_os("KUBECONFIG").is_none() {
        // Written past the test harness's capture, so the run's log shows the suite did not run.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "NOTE real_cluster suite not run: KUBECONFIG is not set (see README.md: kind create \
             cluster, load the images, then KUBECONFIG=~/.kube/config cargo test -p cellgate-e2e --test cluster)"
        );
        return;
    }
    let registry = env_or("CELLGATE_E2E_REGISTRY", "ghcr.io/cellgate");
    let tag = env_or("CELLGATE_E2E_TAG", "0.1.0");
    let agent_image = env_or("CELLGATE_E2E_AGENT_IMAGE", "curlimages/curl:8.10.1");
    let allowed_url = env_or("CELLGATE_E2E_ALLOWED_URL", "https://example.com/");
    let denied_url = env_or("CELLGATE_E2E_DENIED_URL", "https://example.org/");
    let allowed_host = allowed_url
        .split("://")
        .nth(1)
        .and_then(|r| r.split(['/', ':']).next())
        .expect("host in CELLGATE_E2E_ALLOWED_URL")
        .to_string();
    let ns = "cellgate-e2e";
    let _cleanup = Cleanup {
        namespaces: vec![ns.to_string()],
    };

    // 1. Keys and CA, and the Secrets and ConfigMaps deploy/README.md tells an installer to create.
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    let ca = dir.path().join("ca");
    for args in [
        vec!["keys", "init", "--out", keys.to_str().expect("utf-8")],
        vec!["ca", "init", "--out", ca.to_str().expect("utf-8")],
    ] {
        let out = Command::new(bin("cellgate"))
            .args(&args)
            .output()
            .expect("cellgate");
        assert!(out.status.success(), "cellgate {args:?}: {}", text(&out));
    }
    // The admin token /audit requires (kubectl cellgate audit reads it from its Secret).
    let mut random = [0u8; 24];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").expect("urandom"),
        &mut random,
    )
    .expect("random bytes");
    let admin_token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(keys.join("admin-token"), admin_token).expect("admin token");
    let p = |d: &Path, f: &str| format!("--from-file={}", d.join(f).display());
    kubectl_apply(&kubectl_ok(&[
        "create",
        "namespace",
        "cellgate-system",
        "--dry-run=client",
        "-o",
        "yaml",
    ]));
    for (kind, name, files) in [
        (
            "secret generic",
            "cellgate-signing-key",
            vec![p(&keys, "signing.key"), p(&keys, "signing.pub")],
        ),
        ("configmap", "cellgate-trust", vec![p(&keys, "signing.pub")]),
        (
            "secret generic",
            "cellgate-ca",
            vec![p(&ca, "ca.crt"), p(&ca, "ca.key")],
        ),
        ("configmap", "cellgate-ca-bundle", vec![p(&ca, "ca.crt")]),
        (
            "secret generic",
            "cellgate-admin-token",
            vec![format!(
                "--from-file=token={}",
                keys.join("admin-token").display()
            )],
        ),
    ] {
        let mut args: Vec<&str> = vec!["create"];
        args.extend(kind.split(' '));
        args.extend([
            name,
            "-n",
            "cellgate-system",
            "--dry-run=client",
            "-o",
            "yaml",
        ]);
        args.extend(files.iter().map(String::as_str));
        kubectl_apply(&kubectl_ok(&args));
    }

    // 2. The kustomize base, with this cluster's node addresses and the images under test.
    let node_ips = kubectl_ok(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={.items[*].status.addresses[?(@.type==\"InternalIP\")].address}",
    ]);
    let cidrs: Vec<String> = node_ips
        .split_whitespace()
        .map(|ip| {
            if ip.contains(':') {
                format!("{ip}/128")
            } else {
                format!("{ip}/32")
            }
        })
        .collect();
    assert!(!cidrs.is_empty(), "no node InternalIP addresses");
    let rendered = kubectl_ok(&[
        "kustomize",
        workspace().join("deploy").to_str().expect("utf-8"),
    ])
    .replace("SET-ME-node-address-CIDRs", &cidrs.join(","))
    .replace("ghcr.io/cellgate/", &format!("{registry}/"))
    .replace(":0.1.0", &format!(":{tag}"));
    kubectl_apply(&rendered);
    kubectl_ok(&[
        "-n",
        "cellgate-system",
        "rollout",
        "status",
        "deployment/cellgate-operator",
        "--timeout=180s",
    ]);
    kubectl_ok(&[
        "-n",
        "cellgate-system",
        "rollout",
        "status",
        "daemonset/cellgate-node",
        "--timeout=180s",
    ]);

    // 3. A cell whose one capability is the allowed URL's host.
    kubectl_apply(&kubectl_ok(&[
        "create",
        "namespace",
        ns,
        "--dry-run=client",
        "-o",
        "yaml",
    ]));
    kubectl_apply(&format!(
        "apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {{name: e2e-agent, namespace: {ns}}}
spec:
  capabilities:
    - name: web
      destinations: [{{host: {allowed_host}, ports: [443]}}]
      http: {{methods: [GET]}}
  template:
    spec:
      securityContext: {{runAsUser: 1000, runAsGroup: 1000}}
      containers:
        - name: agent
          image: {agent_image}
          command: [sleep, '86400']
"
    ));
    kubectl_ok(&[
        "-n",
        ns,
        "wait",
        "agentcell/e2e-agent",
        "--for=condition=Enforced",
        "--timeout=180s",
    ]);
    kubectl_ok(&[
        "-n",
        ns,
        "wait",
        "pod/e2e-agent",
        "--for=condition=Ready",
        "--timeout=180s",
    ]);

    // 4. Allowed, then denied with the JSON body an agent can read.
    let (code, body) = agent_curl(ns, &allowed_url);
    assert_eq!(code, "200", "allowed request: {body}");
    let (code, body) = agent_curl(ns, &denied_url);
    assert_eq!(code, "403", "denied request: {body}");
    assert!(body.contains("cellgate_denied"), "{body}");

    // 5. Revocation with the plugin: it edits the AgentCell and waits for the node.
    let start = Instant::now();
    let out = Command::new(bin("kubectl-cellgate"))
        .args(["revoke", "e2e-agent", "web", "-n", ns, "--timeout", "10s"])
        .output()
        .expect("kubectl-cellgate");
    assert!(out.status.success(), "revoke: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("enforced by node"),
        "{}",
        text(&out)
    );
    // The promise: denied within one second of the edit.
    let (code, body) = loop {
        let (code, body) = agent_curl(ns, &allowed_url);
        if code == "403" || start.elapsed() > Duration::from_secs(5) {
            break (code, body);
        }
    };
    assert_eq!(code, "403", "after revoke: {body}");
    assert!(body.contains("cellgate_denied"), "{body}");
    let audit = Command::new(bin("kubectl-cellgate"))
        .args(["audit", "e2e-agent", "-n", ns, "--json"])
        .output()
        .expect("kubectl-cellgate audit");
    assert!(audit.status.success(), "audit: {}", text(&audit));
    assert!(
        String::from_utf8_lossy(&audit.stdout).contains("\"deny\""),
        "{}",
        text(&audit)
    );
    eprintln!(
        "revocation denied {} ms after `kubectl cellgate revoke` started",
        start.elapsed().as_millis()
    );
}
