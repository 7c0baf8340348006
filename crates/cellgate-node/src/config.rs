//! The node's configuration: a pure function of its command line and an environment map.
//!
//! Every flag has a `CELLGATE_` environment equivalent (flag `--upstream-ca` is
//! `CELLGATE_UPSTREAM_CA`; repeatable flags take a comma-separated list there). Flags win over the
//! environment. [`NodeConfig::validate`] is the one place values are checked; the resolved
//! configuration is logged at start (it holds no secrets: key material stays in files).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Command line of `cellgate-node`.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "cellgate-node",
    version,
    about = "Cellgate's per-node proxy: every request a cell sends out is identified, decided by policy and audited."
)]
pub struct NodeArgs {
    /// Tagged intake (PPv2 required) [env: CELLGATE_LISTEN] [default: 0.0.0.0:15001]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Admin endpoint: /healthz, /readyz, /metrics [env: CELLGATE_ADMIN] [default: 127.0.0.1:15021]
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Directory of AgentCell YAML files, watched for changes [env: CELLGATE_CELLS]
    #[arg(long)]
    pub cells: Option<PathBuf>,
    /// Extra Rego policy packs (layers), watched for changes [env: CELLGATE_POLICIES]
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// Base policy directory; the base policy built into the binary when absent [env: CELLGATE_BASE_POLICY]
    #[arg(long)]
    pub base_policy: Option<PathBuf>,
    /// Directory of secrets for `credential.file` capabilities [env: CELLGATE_SECRETS]
    #[arg(long)]
    pub secrets: Option<PathBuf>,
    /// CA directory (ca.crt, ca.key) from `cellgate ca init` [env: CELLGATE_CA]
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Trusted token signing key (signing.pub); repeatable [env: CELLGATE_TRUST]
    #[arg(long = "trust")]
    pub trust: Vec<PathBuf>,
    /// Audit log file (hash-chained JSON lines) [env: CELLGATE_AUDIT] [default: cellgate-audit.jsonl]
    #[arg(long)]
    pub audit: Option<PathBuf>,
    /// When an allowed request's record must be on disk: relaxed (queued; the request goes on at once) or strict (written and synced, by group commit, before the request is forwarded) [env: CELLGATE_AUDIT_DURABILITY] [default: relaxed]
    #[arg(long)]
    pub audit_durability: Option<String>,
    /// Ed25519 private key (PEM PKCS#8, e.g. signing.key from `cellgate keys init`) that signs anchors of the audit chain head into <audit>.anchors; without it no anchors are written [env: CELLGATE_AUDIT_ANCHOR_KEY]
    #[arg(long)]
    pub audit_anchor_key: Option<PathBuf>,
    /// Time between anchors of the audit chain head (one is written only when the head moved, and one at shutdown) [env: CELLGATE_AUDIT_ANCHOR_INTERVAL] [default: 10s]
    #[arg(long)]
    pub audit_anchor_interval: Option<String>,
    /// State directory: the budget ledger and the lockdown survive restarts here [env: CELLGATE_STATE_DIR] [default: cellgate-state beside the audit log]
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// LLM price table for spend budgets (YAML, USD per million tokens) [env: CELLGATE_PRICE_TABLE] [default: the shipped table]
    #[arg(long)]
    pub price_table: Option<PathBuf>,
    /// Extra CA bundle for upstream TLS, added to the system roots; repeatable [env: CELLGATE_UPSTREAM_CA]
    #[arg(long = "upstream-ca")]
    pub upstream_ca: Vec<PathBuf>,
    /// HOST:PORT:ADDR, like curl's --resolve; repeatable [env: CELLGATE_RESOLVE]
    #[arg(long = "resolve")]
    pub resolve: Vec<String>,
    /// DNS listener for cells (UDP and TCP) [env: CELLGATE_DNS]
    #[arg(long)]
    pub dns: Option<SocketAddr>,
    /// Envoy ext_authz gRPC listener: ADDR:PORT, or a Unix socket path (unix:PATH, or a path with a /) [env: CELLGATE_EXT_AUTHZ]
    #[arg(long)]
    pub ext_authz: Option<String>,
    /// ext_authz: also take the cell token from this request header when Envoy passes no PPv2 metadata [env: CELLGATE_EXT_AUTHZ_TOKEN_HEADER]
    #[arg(long)]
    pub ext_authz_token_header: Option<String>,
    /// A pod address and its cell, ADDR=NAMESPACE/NAME (DNS tells cells apart by address); repeatable [env: CELLGATE_POD]
    #[arg(long = "pod")]
    pub pod: Vec<String>,
    /// Node name written in audit records; with --kubernetes, the node whose pods are served (required there, from the downward API) [env: CELLGATE_NODE_NAME] [default: host name]
    #[arg(long)]
    pub node_name: Option<String>,
    /// With --kubernetes, this node pod's own name (downward API, metadata.name): the node's CA report names it, and the operator counts a report only from the pod running now [env: CELLGATE_POD_NAME]
    #[arg(long)]
    pub pod_name: Option<String>,
    /// Take cells, the pods on this node and token revocations from the Kubernetes API (in-cluster config or KUBECONFIG) instead of --cells and --pod [env: CELLGATE_KUBERNETES]
    #[arg(long)]
    pub kubernetes: bool,
    /// Namespace of the control plane, where the ConfigMap cellgate-revocations lives [env: CELLGATE_CONTROL_NAMESPACE] [default: cellgate-system]
    #[arg(long)]
    pub control_namespace: Option<String>,
    /// Most connections open at once [env: CELLGATE_MAX_CONNECTIONS] [default: 10000]
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most intake connections one cell may hold open, unless its spec.limits.connections says otherwise [env: CELLGATE_CELL_MAX_CONNECTIONS] [default: 1024]
    #[arg(long)]
    pub cell_max_connections: Option<usize>,
    /// Requests per second one cell may make (0: no ceiling), unless its spec.limits.requestsPerSecond says otherwise [env: CELLGATE_CELL_REQUESTS_PER_SECOND] [default: 0]
    #[arg(long)]
    pub cell_requests_per_second: Option<usize>,
    /// An HTTP connection (HTTP/1.1 keep-alive or HTTP/2) with no byte either way for this long is closed [env: CELLGATE_HTTP_IDLE_TIMEOUT] [default: 5m]
    #[arg(long)]
    pub http_idle_timeout: Option<String>,
    /// Grace period for open connections on SIGTERM [env: CELLGATE_DRAIN] [default: 10s]
    #[arg(long)]
    pub drain: Option<String>,
    /// Data-path worker threads [env: CELLGATE_WORKER_THREADS] [default: one per CPU the process may use]
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// File holding the token `/audit` on the admin port requires in the X-Cellgate-Admin-Token header; required for `/audit` in Kubernetes mode [env: CELLGATE_ADMIN_TOKEN_FILE]
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Log format: text or json [env: CELLGATE_LOG_FORMAT] [default: text]
    #[arg(long)]
    pub log_format: Option<String>,
    /// Vault address for `credential.vault` capabilities, http(s)://HOST:PORT [env: CELLGATE_VAULT_ADDR]
    #[arg(long)]
    pub vault_addr: Option<String>,
    /// Vault authentication: kubernetes, approle or token [env: CELLGATE_VAULT_AUTH] [default: kubernetes]
    #[arg(long)]
    pub vault_auth: Option<String>,
    /// Vault role for Kubernetes auth [env: CELLGATE_VAULT_ROLE] [default: cellgate-node]
    #[arg(long)]
    pub vault_role: Option<String>,
    /// Vault Kubernetes auth mount [env: CELLGATE_VAULT_K8S_MOUNT] [default: kubernetes]
    #[arg(long)]
    pub vault_k8s_mount: Option<String>,
    /// Service-account token for Vault Kubernetes auth [env: CELLGATE_VAULT_K8S_JWT_FILE] [default: /var/run/secrets/kubernetes.io/serviceaccount/token]
    #[arg(long)]
    pub vault_k8s_jwt_file: Option<PathBuf>,
    /// File holding a Vault token, for --vault-auth token [env: CELLGATE_VAULT_TOKEN_FILE]
    #[arg(long)]
    pub vault_token_file: Option<PathBuf>,
    /// File holding the AppRole role id, for --vault-auth approle [env: CELLGATE_VAULT_APPROLE_ROLE_ID_FILE]
    #[arg(long)]
    pub vault_approle_role_id_file: Option<PathBuf>,
    /// File holding the AppRole secret id, for --vault-auth approle [env: CELLGATE_VAULT_APPROLE_SECRET_ID_FILE]
    #[arg(long)]
    pub vault_approle_secret_id_file: Option<PathBuf>,
    /// Vault AppRole auth mount [env: CELLGATE_VAULT_APPROLE_MOUNT] [default: approle]
    #[arg(long)]
    pub vault_approle_mount: Option<String>,
    /// How long a Vault secret without a lease (KV v2) is reused before Vault is read again [env: CELLGATE_VAULT_KV_TTL] [default: 30s]
    #[arg(long)]
    pub vault_kv_ttl: Option<String>,
    /// Read `credential.secret` capabilities from the Kubernetes API [env: CELLGATE_K8S_SECRETS]
    #[arg(long)]
    pub k8s_secrets: bool,
    /// Bound on one credential backend call; past it the request is answered 503 [env: CELLGATE_CREDENTIAL_TIMEOUT] [default: 2s]
    #[arg(long)]
    pub credential_timeout: Option<String>,
    /// Alerts file (YAML: webhook sinks and thresholds, docs/operations.md); none: no alerts. A file that does not check stops the node [env: CELLGATE_ALERTS]
    #[arg(long)]
    pub alerts: Option<PathBuf>,
    /// OTLP collector to export audit records and request spans to; none: no export [env: OTEL_EXPORTER_OTLP_ENDPOINT, or the per-signal OTEL_EXPORTER_OTLP_{LOGS,TRACES}_ENDPOINT]
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport: grpc or http/protobuf [env: OTEL_EXPORTER_OTLP_PROTOCOL] [default: grpc]
    #[arg(long)]
    pub otlp_protocol: Option<String>,
    /// Audit records the export may fall behind before new requests are refused (audit_backlog) [env: CELLGATE_OTLP_MAX_BACKLOG] [default: 1000000]
    #[arg(long)]
    pub otlp_max_backlog: Option<u64>,
    /// How long the export may make no progress with records waiting before /readyz fails [env: CELLGATE_OTLP_STALL_AFTER] [default: 60s]
    #[arg(long)]
    pub otlp_stall_after: Option<String>,
    /// Export request spans too (true) or audit records only (false) [env: CELLGATE_OTLP_TRACES] [default: true]
    #[arg(long)]
    pub otlp_traces: Option<bool>,
    /// Time between enforcement self-checks of each cell on this node (a probe from inside the pod's network namespace to a must-deny destination; docs/kubernetes.md), or `off` [env: CELLGATE_SELF_CHECK_INTERVAL] [default: 30s]
    #[arg(long)]
    pub self_check_interval: Option<String>,
    /// The must-deny destination of the self-check probe, ADDR:PORT: the intake answers every connection to it itself and never forwards one, whatever a capability says [env: CELLGATE_SELF_CHECK_TARGET] [default: 192.0.2.1:9]
    #[arg(long)]
    pub self_check_target: Option<SocketAddr>,
    /// Bound on one probe (connect, then the node's answer), e.g. 2s or 500ms; shorter than the interval [env: CELLGATE_SELF_CHECK_TIMEOUT] [default: 2s]
    #[arg(long)]
    pub self_check_timeout: Option<String>,
    /// Directory of the pods' network namespaces (containerd and CRI-O bind them there), for the in-process prober [env: CELLGATE_SELF_CHECK_NETNS_DIR] [default: /var/run/netns]
    #[arg(long)]
    pub self_check_netns_dir: Option<PathBuf>,
    /// What enters the pods' network namespaces: `in-process` (the node itself; needs CAP_SYS_ADMIN) or unix:PATH, the socket of a `cellgate-node self-check-prober` beside the node [env: CELLGATE_SELF_CHECK_PROBER] [default: in-process]
    #[arg(long)]
    pub self_check_prober: Option<String>,
}

/// Command line of `cellgate-node self-check-prober`: the privileged half of the enforcement
/// self-check ([`crate::selfcheck::prober`]), run beside an unprivileged node.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "cellgate-node self-check-prober",
    version,
    about = "Enters pod network namespaces on the node's behalf and probes the must-deny destination from inside (needs CAP_SYS_ADMIN); answers only the node, over a Unix socket."
)]
pub struct ProberArgs {
    /// The Unix socket to serve, unix:PATH or a path [env: CELLGATE_SELF_CHECK_PROBER]
    #[arg(long)]
    pub socket: Option<String>,
    /// The must-deny destination, as the node's --self-check-target: the only one probed [env: CELLGATE_SELF_CHECK_TARGET] [default: 192.0.2.1:9]
    #[arg(long)]
    pub target: Option<SocketAddr>,
    /// Directory of the pods' network namespaces [env: CELLGATE_SELF_CHECK_NETNS_DIR] [default: /var/run/netns]
    #[arg(long)]
    pub netns_dir: Option<PathBuf>,
    /// Log format: text or json [env: CELLGATE_LOG_FORMAT] [default: text]
    #[arg(long)]
    pub log_format: Option<String>,
}

/// The default must-deny destination: TEST-NET-1 (RFC 5737, never routed), the discard port.
pub const SELF_CHECK_TARGET: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(192, 0, 2, 1),
    9,
));
/// The default directory of pod network namespaces.
pub const SELF_CHECK_NETNS_DIR: &str = "/var/run/netns";

/// Who enters the pods' network namespaces for the self-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProberAddr {
    /// The node itself, from a thread of its own (needs CAP_SYS_ADMIN).
    InProcess,
    /// A `cellgate-node self-check-prober` listening on this Unix socket.
    Unix(PathBuf),
}

impl ProberAddr {
    /// Parses `in-process`, `unix:PATH` or a path.
    ///
    /// # Errors
    /// A message naming the value.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "in-process" {
            return Ok(Self::InProcess);
        }
        match ListenAddr::parse(s) {
            Ok(ListenAddr::Unix(p)) => Ok(Self::Unix(p)),
            _ => Err(format!(
                "{s:?}: expected in-process or unix:PATH (the prober's socket)"
            )),
        }
    }
}

/// The enforcement self-check ([`crate::selfcheck`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfCheckConfig {
    /// Time between probes of each cell; `None`: off (explicitly: `--self-check-interval off`).
    pub interval: Option<Duration>,
    /// The must-deny destination the probe dials and the intake reserves.
    pub target: SocketAddr,
    /// Bound on one probe.
    pub timeout: Duration,
    /// Where the in-process prober looks for network namespaces.
    pub netns_dir: PathBuf,
    /// Who enters the namespaces.
    pub prober: ProberAddr,
}

impl SelfCheckConfig {
    /// Off, with the default target (still reserved by the intake) and bounds.
    pub fn off() -> Self {
        Self {
            interval: None,
            target: SELF_CHECK_TARGET,
            timeout: Duration::from_secs(2),
            netns_dir: PathBuf::from(SELF_CHECK_NETNS_DIR),
            prober: ProberAddr::InProcess,
        }
    }

    fn from_args_env(
        args: &NodeArgs,
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut c = Self::off();
        let interval = args
            .self_check_interval
            .clone()
            .or_else(|| get("CELLGATE_SELF_CHECK_INTERVAL"))
            .unwrap_or_else(|| "30s".into());
        c.interval = if interval == "off" {
            None
        } else {
            Some(parse_duration_ms(&interval).ok_or_else(|| {
                invalid(
                    "--self-check-interval",
                    format!("{interval:?} is not a duration like 30s, or off"),
                )
            })?)
        };
        if let Some(t) = args
            .self_check_target
            .or(match get("CELLGATE_SELF_CHECK_TARGET") {
                Some(v) => Some(v.parse().map_err(|_| {
                    invalid("--self-check-target", format!("{v:?} is not ADDR:PORT"))
                })?),
                None => None,
            })
        {
            c.target = t;
        }
        if let Some(t) = args
            .self_check_timeout
            .clone()
            .or_else(|| get("CELLGATE_SELF_CHECK_TIMEOUT"))
        {
            c.timeout = parse_duration_ms(&t).ok_or_else(|| {
                invalid(
                    "--self-check-timeout",
                    format!("{t:?} is not a duration like 2s or 500ms"),
                )
            })?;
        }
        if let Some(d) = args
            .self_check_netns_dir
            .clone()
            .or_else(|| get("CELLGATE_SELF_CHECK_NETNS_DIR").map(PathBuf::from))
        {
            c.netns_dir = d;
        }
        if let Some(p) = args
            .self_check_prober
            .clone()
            .or_else(|| get("CELLGATE_SELF_CHECK_PROBER"))
        {
            c.prober = ProberAddr::parse(&p).map_err(|m| invalid("--self-check-prober", m))?;
        }
        Ok(c)
    }

    /// Checks the values.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_self_check_target(self.target)?;
        if self.timeout.is_zero() {
            return Err(invalid("--self-check-timeout", "must be more than 0"));
        }
        if let Some(i) = self.interval {
            if self.timeout >= i {
                return Err(invalid(
                    "--self-check-timeout",
                    format!(
                        "{:?} is not shorter than the interval {i:?}: a probe must end before the next starts",
                        self.timeout
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A must-deny destination must be an address a pod would route out of itself: not loopback
/// (every namespace answers it locally), unspecified or multicast, and not port 0.
fn check_self_check_target(t: SocketAddr) -> Result<(), ConfigError> {
    let ip = t.ip().to_canonical();
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || t.port() == 0 {
        return Err(invalid(
            "--self-check-target",
            format!("{t} is loopback, unspecified, multicast or port 0: choose an address no pod has and no network routes, e.g. {SELF_CHECK_TARGET}"),
        ));
    }
    Ok(())
}

/// `500ms`, or a duration `parse_duration` takes (`2s`, `1m`).
fn parse_duration_ms(s: &str) -> Option<Duration> {
    match s.strip_suffix("ms") {
        Some(n) => n
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .map(Duration::from_millis),
        None => cellgate_api::manifest::parse_duration(s).map(Duration::from_secs),
    }
}

/// The resolved configuration of `cellgate-node self-check-prober`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProberConfig {
    /// The socket served.
    pub socket: PathBuf,
    /// The only destination probed.
    pub target: SocketAddr,
    /// Where network namespaces are looked for.
    pub netns_dir: PathBuf,
    /// JSON logs.
    pub log_json: bool,
}

impl ProberConfig {
    /// Resolves flags and the environment.
    ///
    /// # Errors
    /// The first invalid value, named.
    pub fn from_args_env(
        args: ProberArgs,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let socket = args
            .socket
            .or_else(|| get("CELLGATE_SELF_CHECK_PROBER"))
            .ok_or_else(|| invalid("--socket", "the prober needs the Unix socket to serve"))?;
        let socket = match ProberAddr::parse(&socket) {
            Ok(ProberAddr::Unix(p)) => p,
            _ => {
                return Err(invalid(
                    "--socket",
                    format!("{socket:?} is not unix:PATH or a path"),
                ))
            }
        };
        let target = match (args.target, get("CELLGATE_SELF_CHECK_TARGET")) {
            (Some(t), _) => t,
            (None, Some(v)) => v
                .parse()
                .map_err(|_| invalid("--target", format!("{v:?} is not ADDR:PORT")))?,
            (None, None) => SELF_CHECK_TARGET,
        };
        check_self_check_target(target)?;
        let log_format = args
            .log_format
            .or_else(|| get("CELLGATE_LOG_FORMAT"))
            .unwrap_or_else(|| "text".into());
        if log_format != "json" && log_format != "text" {
            return Err(invalid(
                "--log-format",
                format!("{log_format:?}: expected text or json"),
            ));
        }
        Ok(Self {
            socket,
            target,
            netns_dir: args
                .netns_dir
                .or_else(|| get("CELLGATE_SELF_CHECK_NETNS_DIR").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(SELF_CHECK_NETNS_DIR)),
            log_json: log_format == "json",
        })
    }
}

/// The OTLP export the flags and the standard `OTEL_*` variables name, if any.
fn otlp_config(
    args: &NodeArgs,
    env: &HashMap<String, String>,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<cellgate_otel::OtlpConfig>, ConfigError> {
    let max_backlog = match args
        .otlp_max_backlog
        .map(|v| v.to_string())
        .or_else(|| get("CELLGATE_OTLP_MAX_BACKLOG"))
    {
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            invalid(
                "--otlp-max-backlog",
                format!("{v:?} is not a number of records"),
            )
        })?),
        None => None,
    };
    let stall_after = match args
        .otlp_stall_after
        .clone()
        .or_else(|| get("CELLGATE_OTLP_STALL_AFTER"))
    {
        Some(v) => Some(
            cellgate_api::manifest::parse_duration(&v)
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    invalid(
                        "--otlp-stall-after",
                        format!("{v:?} is not a duration like 60s"),
                    )
                })?,
        ),
        None => None,
    };
    let traces = match args
        .otlp_traces
        .map(|v| v.to_string())
        .or_else(|| get("CELLGATE_OTLP_TRACES"))
    {
        Some(v) => Some(
            v.parse::<bool>()
                .map_err(|_| invalid("--otlp-traces", format!("{v:?} is not true or false")))?,
        ),
        None => None,
    };
    let flags = cellgate_otel::OtlpFlags {
        endpoint: args.otlp_endpoint.clone(),
        protocol: args.otlp_protocol.clone(),
        max_backlog,
        stall_after,
        traces,
    };
    cellgate_otel::OtlpConfig::resolve(&flags, env, "cellgate-node")
        .map_err(|m| invalid("--otlp-endpoint", m))
}

/// The credential backends the flags and environment name.
fn credential_backends(
    args: &NodeArgs,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<crate::credentials::BackendConfig, ConfigError> {
    use crate::credentials::{BackendConfig, VaultAuth, VaultConfig};
    let mut c = BackendConfig {
        k8s_secrets: args.k8s_secrets
            || get("CELLGATE_K8S_SECRETS").is_some_and(|v| v == "1" || v == "true"),
        ..BackendConfig::default()
    };
    if let Some(t) = args
        .credential_timeout
        .clone()
        .or_else(|| get("CELLGATE_CREDENTIAL_TIMEOUT"))
    {
        c.timeout = cellgate_api::manifest::parse_duration(&t)
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                invalid(
                    "--credential-timeout",
                    format!("{t:?} is not a duration like 2s"),
                )
            })?;
    }
    if let Some(t) = args
        .vault_kv_ttl
        .clone()
        .or_else(|| get("CELLGATE_VAULT_KV_TTL"))
    {
        c.vault_kv_ttl = cellgate_api::manifest::parse_duration(&t)
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                invalid(
                    "--vault-kv-ttl",
                    format!("{t:?} is not a duration like 30s"),
                )
            })?;
    }
    let Some(addr) = args
        .vault_addr
        .clone()
        .or_else(|| get("CELLGATE_VAULT_ADDR"))
    else {
        return Ok(c);
    };
    let auth = match args
        .vault_auth
        .clone()
        .or_else(|| get("CELLGATE_VAULT_AUTH"))
        .as_deref()
        .unwrap_or("kubernetes")
    {
        "kubernetes" => VaultAuth::Kubernetes {
            role: args
                .vault_role
                .clone()
                .or_else(|| get("CELLGATE_VAULT_ROLE"))
                .unwrap_or_else(|| "cellgate-node".into()),
            jwt_file: args
                .vault_k8s_jwt_file
                .clone()
                .or_else(|| get("CELLGATE_VAULT_K8S_JWT_FILE").map(PathBuf::from))
                .unwrap_or_else(|| {
                    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
                }),
            mount: args
                .vault_k8s_mount
                .clone()
                .or_else(|| get("CELLGATE_VAULT_K8S_MOUNT"))
                .unwrap_or_else(|| "kubernetes".into()),
        },
        "token" => VaultAuth::Token {
            file: args
                .vault_token_file
                .clone()
                .or_else(|| get("CELLGATE_VAULT_TOKEN_FILE").map(PathBuf::from))
                .ok_or_else(|| {
                    invalid(
                        "--vault-token-file",
                        "--vault-auth token needs a token file",
                    )
                })?,
        },
        "approle" => VaultAuth::AppRole {
            role_id_file: args
                .vault_approle_role_id_file
                .clone()
                .or_else(|| get("CELLGATE_VAULT_APPROLE_ROLE_ID_FILE").map(PathBuf::from))
                .ok_or_else(|| {
                    invalid(
                        "--vault-approle-role-id-file",
                        "--vault-auth approle needs a role-id file",
                    )
                })?,
            secret_id_file: args
                .vault_approle_secret_id_file
                .clone()
                .or_else(|| get("CELLGATE_VAULT_APPROLE_SECRET_ID_FILE").map(PathBuf::from))
                .ok_or_else(|| {
                    invalid(
                        "--vault-approle-secret-id-file",
                        "--vault-auth approle needs a secret-id file",
                    )
                })?,
            mount: args
                .vault_approle_mount
                .clone()
                .or_else(|| get("CELLGATE_VAULT_APPROLE_MOUNT"))
                .unwrap_or_else(|| "approle".into()),
        },
        other => {
            return Err(invalid(
                "--vault-auth",
                format!("{other:?}: expected kubernetes, approle or token"),
            ))
        }
    };
    c.vault = Some(VaultConfig { addr, auth });
    Ok(c)
}

/// One `--resolve` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveEntry {
    /// Lowercase host.
    pub host: String,
    /// Port, or `None` for `*` (any port).
    pub port: Option<u16>,
    /// Address to connect to.
    pub addr: IpAddr,
}

/// Where a stream listener binds: a TCP address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// TCP.
    Tcp(SocketAddr),
    /// Unix domain socket.
    Unix(PathBuf),
}

impl ListenAddr {
    /// Parses `ADDR:PORT`, `unix:PATH`, or a path containing a `/`.
    ///
    /// # Errors
    /// A message naming the value.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("{s:?}: empty socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Self::Tcp(a));
        }
        if s.contains('/') {
            return Ok(Self::Unix(PathBuf::from(s)));
        }
        Err(format!("{s:?} is not ADDR:PORT or a Unix socket path"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Tagged intake address.
    pub listen: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// When `admin`'s port is taken, bind any free port on its address instead of failing
    /// (`cellgate run`, which prints the address; never set by the node's flags).
    pub admin_any_port_if_taken: bool,
    /// Cells directory.
    pub cells_dir: Option<PathBuf>,
    /// Policy packs directory.
    pub policies_dir: Option<PathBuf>,
    /// Base policy directory, or the built-in one.
    pub base_policy_dir: Option<PathBuf>,
    /// Secrets directory for file credentials.
    pub secrets_dir: Option<PathBuf>,
    /// CA directory; `None` generates an in-memory CA (tests and dry runs).
    pub ca_dir: Option<PathBuf>,
    /// Trusted public keys.
    pub trust: Vec<PathBuf>,
    /// Audit log path.
    pub audit: PathBuf,
    /// When an allowed request's record must be on disk.
    pub audit_durability: AuditDurability,
    /// Key that signs anchors of the audit chain head (`None`: no anchors).
    pub audit_anchor_key: Option<PathBuf>,
    /// Time between anchors.
    pub audit_anchor_interval: Duration,
    /// State directory (`None`: `cellgate-state` beside the audit log).
    pub state_dir: Option<PathBuf>,
    /// LLM price table (`None`: the shipped one).
    pub price_table: Option<PathBuf>,
    /// Extra upstream CA files.
    pub upstream_ca: Vec<PathBuf>,
    /// Static resolution.
    pub resolve: Vec<ResolveEntry>,
    /// DNS listener.
    pub dns: Option<SocketAddr>,
    /// Envoy ext_authz gRPC listener.
    pub ext_authz: Option<ListenAddr>,
    /// ext_authz: lowercase request header that may carry the token when no PPv2 metadata does.
    pub ext_authz_token_header: Option<String>,
    /// Static pod addresses: (address, namespace, name).
    pub pods: Vec<(IpAddr, String, String)>,
    /// Local mode: a loopback address the node resolves is answered to cells as this address (the
    /// node's side of the cell's link), because inside the cell loopback is the cell itself. Any
    /// address works for the agent: every connection goes through the tagger, and the node
    /// connects to the address it resolves itself.
    pub dns_loopback_as: Option<IpAddr>,
    /// Node name.
    pub node_name: String,
    /// The node pod's name, in Kubernetes mode (named in its CA report).
    pub pod_name: Option<String>,
    /// Kubernetes mode: cells, pod addresses and revocations come from the API server.
    pub kubernetes: bool,
    /// The control plane's namespace (the revocations ConfigMap), in Kubernetes mode.
    pub control_namespace: String,
    /// Connection limit.
    pub max_connections: usize,
    /// Default per-cell connection ceiling (`spec.limits.connections` overrides it).
    pub cell_max_connections: usize,
    /// Default per-cell requests per second, 0 for none (`spec.limits.requestsPerSecond`).
    pub cell_requests_per_second: u32,
    /// An HTTP connection idle this long (no byte either way) is closed.
    pub http_idle_timeout: Duration,
    /// Drain grace.
    pub drain: Duration,
    /// Data-path worker threads (None: one per CPU the process may use).
    pub worker_threads: Option<usize>,
    /// Token file `/audit` requires (read at each request, so it can be rotated).
    pub admin_token_file: Option<PathBuf>,
    /// JSON logs.
    pub log_json: bool,
    /// How long the PPv2 header may take to arrive.
    pub header_timeout: Duration,
    /// How long the first bytes (ClientHello, request line) may take.
    pub first_bytes_timeout: Duration,
    /// HTTP request head read timeout.
    pub http_header_timeout: Duration,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// An opaque tunnel (passthrough, TCP, WebSocket) idle longer than this is closed.
    pub tunnel_idle_timeout: Duration,
    /// How often watched directories are polled.
    pub watch_interval: Duration,
    /// Largest request head accepted, bytes.
    pub max_header_bytes: usize,
    /// Credential backends besides the secrets directory (Vault, Kubernetes Secrets).
    pub credentials: crate::credentials::BackendConfig,
    /// Alerts file ([`crate::alerts`]); read and checked when the node starts.
    pub alerts: Option<PathBuf>,
    /// OTLP export of audit records and spans; `None`: no export.
    pub otlp: Option<cellgate_otel::OtlpConfig>,
    /// The enforcement self-check ([`crate::selfcheck`]).
    pub self_check: SelfCheckConfig,
}

/// When the record of an allowed request must be on disk (denials are always durable before
/// the answer is sent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuditDurability {
    /// Queued: the request goes on at once; the record is written within the writer's linger
    /// and synced within its sync interval (a full queue still refuses the request).
    #[default]
    Relaxed,
    /// Written and synced before the request is forwarded (or ext_authz answers OK), by the
    /// writer's group commit: concurrent requests share one sync.
    Strict,
}

impl AuditDurability {
    /// Parses `relaxed` or `strict`.
    ///
    /// # Errors
    /// A message naming the value.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "relaxed" => Ok(Self::Relaxed),
            "strict" => Ok(Self::Strict),
            other => Err(format!("{other:?}: expected relaxed or strict")),
        }
    }

    /// `relaxed` or `strict`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relaxed => "relaxed",
            Self::Strict => "strict",
        }
    }
}

/// Why the configuration is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value could not be parsed.
    #[error("{name}: {message}")]
    Invalid {
        /// Flag or variable.
        name: &'static str,
        /// What is wrong, with the value.
        message: String,
    },
}

fn invalid(name: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        message: message.into(),
    }
}

/// Parses one `HOST:PORT:ADDR` (`ADDR` may be an IPv6 address, bracketed or not; `PORT` may be `*`).
///
/// # Errors
/// A message naming the entry.
pub fn parse_resolve(s: &str) -> Result<ResolveEntry, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(host), Some(port), Some(addr)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{s:?} is not HOST:PORT:ADDR"));
    };
    let port = if port == "*" {
        None
    } else {
        Some(
            port.parse::<u16>()
                .map_err(|_| format!("{s:?}: bad port {port:?}"))?,
        )
    };
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let addr = addr
        .parse::<IpAddr>()
        .map_err(|_| format!("{s:?}: bad address {addr:?}"))?;
    if host.is_empty() {
        return Err(format!("{s:?}: empty host"));
    }
    Ok(ResolveEntry {
        host: host.trim_end_matches('.').to_ascii_lowercase(),
        port,
        addr,
    })
}

/// The static address for `host:port`, if a `--resolve` entry names one.
pub fn lookup_static(entries: &[ResolveEntry], host: &str, port: u16) -> Option<IpAddr> {
    entries
        .iter()
        .find(|e| e.host == host && e.port.is_none_or(|p| p == port))
        .map(|e| e.addr)
}

/// Parses `ADDR=NAMESPACE/NAME`.
///
/// # Errors
/// A message naming the entry.
pub fn parse_pod(s: &str) -> Result<(IpAddr, String, String), String> {
    let (addr, cell) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ADDR=NAMESPACE/NAME"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?}: bad address {addr:?}"))?;
    let (ns, name) = cell
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: the cell is NAMESPACE/NAME"))?;
    if ns.is_empty() || name.is_empty() {
        return Err(format!("{s:?}: empty namespace or name"));
    }
    Ok((addr, ns.to_string(), name.to_string()))
}

impl NodeConfig {
    /// Resolves flags and the environment (`env` is a map so tests never touch the process).
    ///
    /// # Errors
    /// The first invalid value, named.
    pub fn from_args_env(
        args: NodeArgs,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let credentials = credential_backends(&args, &get)?;
        let self_check = SelfCheckConfig::from_args_env(&args, &get)?;
        let otlp = otlp_config(&args, env, &get)?;
        let list = |k: &str| -> Vec<String> {
            get(k)
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let parse_addr = |name: &'static str,
                          flag: Option<SocketAddr>,
                          default: &str|
         -> Result<SocketAddr, ConfigError> {
            match (flag, get(name)) {
                (Some(a), _) => Ok(a),
                (None, Some(v)) => v
                    .parse()
                    .map_err(|_| invalid(name, format!("{v:?} is not ADDR:PORT"))),
                (None, None) => default.parse().map_err(|_| invalid(name, "bad default")),
            }
        };
        let listen = parse_addr("CELLGATE_LISTEN", args.listen, "0.0.0.0:15001")?;
        let admin = parse_addr("CELLGATE_ADMIN", args.admin, "127.0.0.1:15021")?;
        let path =
            |flag: Option<PathBuf>, name: &str| flag.or_else(|| get(name).map(PathBuf::from));
        let paths = |flag: Vec<PathBuf>, name: &str| {
            if flag.is_empty() {
                list(name).into_iter().map(PathBuf::from).collect()
            } else {
                flag
            }
        };
        let resolve_raw = if args.resolve.is_empty() {
            list("CELLGATE_RESOLVE")
        } else {
            args.resolve
        };
        let resolve = resolve_raw
            .iter()
            .map(|s| parse_resolve(s).map_err(|m| invalid("--resolve", m)))
            .collect::<Result<Vec<_>, _>>()?;
        // A number from its flag, else its environment variable.
        let number = |flag: Option<usize>, key: &'static str| match (flag, get(key)) {
            (Some(n), _) => Ok(Some(n)),
            (None, Some(v)) => v
                .parse()
                .map(Some)
                .map_err(|_| invalid(key, format!("{v:?} is not a number"))),
            (None, None) => Ok(None),
        };
        let max_connections =
            number(args.max_connections, "CELLGATE_MAX_CONNECTIONS")?.unwrap_or(10_000);
        let worker_threads = number(args.worker_threads, "CELLGATE_WORKER_THREADS")?;
        let cell_max_connections =
            number(args.cell_max_connections, "CELLGATE_CELL_MAX_CONNECTIONS")?.unwrap_or(1024);
        let cell_requests_per_second = u32::try_from(
            number(
                args.cell_requests_per_second,
                "CELLGATE_CELL_REQUESTS_PER_SECOND",
            )?
            .unwrap_or(0),
        )
        .map_err(|_| invalid("--cell-requests-per-second", "too large"))?;
        let http_idle_raw = args
            .http_idle_timeout
            .or_else(|| get("CELLGATE_HTTP_IDLE_TIMEOUT"))
            .unwrap_or_else(|| "5m".into());
        let http_idle_timeout = cellgate_api::manifest::parse_duration(&http_idle_raw)
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                invalid(
                    "--http-idle-timeout",
                    format!("{http_idle_raw:?} is not a duration like 5m"),
                )
            })?;
        let drain_raw = args
            .drain
            .or_else(|| get("CELLGATE_DRAIN"))
            .unwrap_or_else(|| "10s".into());
        let drain = cellgate_api::manifest::parse_duration(&drain_raw)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                invalid(
                    "--drain",
                    format!("{drain_raw:?} is not a duration like 10s"),
                )
            })?;
        let audit_durability = args
            .audit_durability
            .or_else(|| get("CELLGATE_AUDIT_DURABILITY"))
            .map(|v| AuditDurability::parse(&v).map_err(|m| invalid("--audit-durability", m)))
            .transpose()?
            .unwrap_or_default();
        let anchor_interval_raw = args
            .audit_anchor_interval
            .or_else(|| get("CELLGATE_AUDIT_ANCHOR_INTERVAL"))
            .unwrap_or_else(|| "10s".into());
        let audit_anchor_interval = cellgate_api::manifest::parse_duration(&anchor_interval_raw)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                invalid(
                    "--audit-anchor-interval",
                    format!("{anchor_interval_raw:?} is not a duration like 10s"),
                )
            })?;
        let log_format = args
            .log_format
            .or_else(|| get("CELLGATE_LOG_FORMAT"))
            .unwrap_or_else(|| "text".into());
        let kubernetes =
            args.kubernetes || get("CELLGATE_KUBERNETES").is_some_and(|v| v == "1" || v == "true");
        let explicit_node_name = args.node_name.or_else(|| get("CELLGATE_NODE_NAME"));
        if kubernetes && explicit_node_name.is_none() {
            return Err(invalid(
                "--node-name",
                "--kubernetes needs the node's name (CELLGATE_NODE_NAME from the downward API, spec.nodeName): it selects the pods this node serves",
            ));
        }
        let control_namespace = args
            .control_namespace
            .or_else(|| get("CELLGATE_CONTROL_NAMESPACE"))
            .unwrap_or_else(|| "cellgate-system".into());
        let node_name = explicit_node_name
            .or_else(|| get("HOSTNAME"))
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_else(|| "node".into());
        let dns = match (args.dns, get("CELLGATE_DNS")) {
            (Some(a), _) => Some(a),
            (None, Some(v)) => Some(
                v.parse()
                    .map_err(|_| invalid("CELLGATE_DNS", format!("{v:?} is not ADDR:PORT")))?,
            ),
            (None, None) => None,
        };
        let ext_authz = args
            .ext_authz
            .or_else(|| get("CELLGATE_EXT_AUTHZ"))
            .map(|v| ListenAddr::parse(&v).map_err(|m| invalid("--ext-authz", m)))
            .transpose()?;
        let ext_authz_token_header = args
            .ext_authz_token_header
            .or_else(|| get("CELLGATE_EXT_AUTHZ_TOKEN_HEADER"))
            .map(|h| h.to_ascii_lowercase());
        let pods_raw = if args.pod.is_empty() {
            list("CELLGATE_POD")
        } else {
            args.pod
        };
        let pods = pods_raw
            .iter()
            .map(|p| parse_pod(p).map_err(|m| invalid("--pod", m)))
            .collect::<Result<Vec<_>, _>>()?;
        let cfg = Self {
            credentials,
            dns,
            ext_authz,
            ext_authz_token_header,
            pods,
            listen,
            admin,
            admin_any_port_if_taken: false,
            cells_dir: path(args.cells, "CELLGATE_CELLS"),
            policies_dir: path(args.policies, "CELLGATE_POLICIES"),
            base_policy_dir: path(args.base_policy, "CELLGATE_BASE_POLICY"),
            ca_dir: path(args.ca, "CELLGATE_CA"),
            secrets_dir: path(args.secrets, "CELLGATE_SECRETS"),
            trust: paths(args.trust, "CELLGATE_TRUST"),
            audit: path(args.audit, "CELLGATE_AUDIT")
                .unwrap_or_else(|| PathBuf::from("cellgate-audit.jsonl")),
            audit_durability,
            audit_anchor_key: path(args.audit_anchor_key, "CELLGATE_AUDIT_ANCHOR_KEY"),
            audit_anchor_interval,
            state_dir: path(args.state_dir, "CELLGATE_STATE_DIR"),
            price_table: path(args.price_table, "CELLGATE_PRICE_TABLE"),
            upstream_ca: paths(args.upstream_ca, "CELLGATE_UPSTREAM_CA"),
            resolve,
            node_name,
            pod_name: args.pod_name.or_else(|| get("CELLGATE_POD_NAME")),
            kubernetes,
            control_namespace,
            max_connections,
            cell_max_connections,
            cell_requests_per_second,
            http_idle_timeout,
            drain,
            worker_threads,
            admin_token_file: args
                .admin_token_file
                .or_else(|| get("CELLGATE_ADMIN_TOKEN_FILE").map(PathBuf::from)),
            log_json: log_format == "json",
            alerts: path(args.alerts, "CELLGATE_ALERTS"),
            otlp,
            self_check,
            ..Self::defaults()
        };
        if log_format != "json" && log_format != "text" {
            return Err(invalid(
                "--log-format",
                format!("{log_format:?}: expected text or json"),
            ));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The state directory: `--state-dir`, else `cellgate-state` beside the audit log.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| {
            self.audit
                .parent()
                .unwrap_or(std::path::Path::new(""))
                .join("cellgate-state")
        })
    }

    /// Defaults for everything, listening on loopback port 0 (tests use this).
    pub fn defaults() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_any_port_if_taken: false,
            cells_dir: None,
            policies_dir: None,
            base_policy_dir: None,
            ca_dir: None,
            secrets_dir: None,
            trust: Vec::new(),
            audit: PathBuf::from("cellgate-audit.jsonl"),
            audit_durability: AuditDurability::Relaxed,
            audit_anchor_key: None,
            audit_anchor_interval: cellgate_audit::DEFAULT_ANCHOR_INTERVAL,
            state_dir: None,
            price_table: None,
            upstream_ca: Vec::new(),
            resolve: Vec::new(),
            dns: None,
            ext_authz: None,
            ext_authz_token_header: None,
            pods: Vec::new(),
            dns_loopback_as: None,
            node_name: "node".into(),
            pod_name: None,
            kubernetes: false,
            control_namespace: "cellgate-system".into(),
            max_connections: 10_000,
            cell_max_connections: 1024,
            cell_requests_per_second: 0,
            http_idle_timeout: Duration::from_secs(300),
            drain: Duration::from_secs(10),
            worker_threads: None,
            admin_token_file: None,
            log_json: false,
            header_timeout: Duration::from_secs(5),
            first_bytes_timeout: Duration::from_secs(10),
            http_header_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            tunnel_idle_timeout: Duration::from_secs(600),
            watch_interval: Duration::from_millis(250),
            max_header_bytes: 64 * 1024,
            credentials: crate::credentials::BackendConfig::default(),
            alerts: None,
            otlp: None,
            // Off for tests and embedders; the node's flags default to every 30s.
            self_check: SelfCheckConfig::off(),
        }
    }

    /// Checks values that parsing cannot.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.trust.is_empty() {
            return Err(invalid(
                "--trust",
                "at least one trusted signing key (signing.pub) is needed; without one every token is refused",
            ));
        }
        if let Some(h) = &self.ext_authz_token_header {
            if h.starts_with(':') || http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(invalid(
                    "--ext-authz-token-header",
                    format!("{h:?} is not a header name"),
                ));
            }
        }
        if self.kubernetes {
            if self.cells_dir.is_some() {
                return Err(invalid(
                    "--cells",
                    "--cells and --kubernetes are exclusive: in Kubernetes mode cells come from the AgentCell watch",
                ));
            }
            if !self.pods.is_empty() {
                return Err(invalid(
                    "--pod",
                    "--pod and --kubernetes are exclusive: in Kubernetes mode pod addresses come from the pod watch",
                ));
            }
            if self.node_name.is_empty() {
                return Err(invalid("--node-name", "empty node name"));
            }
            if self.control_namespace.is_empty() {
                return Err(invalid("--control-namespace", "empty namespace"));
            }
        }
        if let Some(n) = self.worker_threads {
            if !(1..=1024).contains(&n) {
                return Err(invalid(
                    "--worker-threads",
                    format!("{n} is not between 1 and 1024"),
                ));
            }
        }
        if self.max_connections == 0 {
            return Err(invalid("--max-connections", "must be at least 1"));
        }
        if self.cell_max_connections == 0 {
            return Err(invalid("--cell-max-connections", "must be at least 1"));
        }
        self.self_check.validate()?;
        if self.listen == self.admin && self.listen.port() != 0 {
            return Err(invalid(
                "--admin",
                "the admin and intake addresses must differ",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn flags_win_over_env() {
        let args = NodeArgs::parse_from([
            "cellgate-node",
            "--listen",
            "127.0.0.1:7000",
            "--trust",
            "a.pub",
        ]);
        let cfg = NodeConfig::from_args_env(
            args,
            &env(&[
                ("CELLGATE_LISTEN", "127.0.0.1:8000"),
                ("CELLGATE_ADMIN", "127.0.0.1:9000"),
                ("CELLGATE_RESOLVE", "x.test:443:10.0.0.1, y.test:*:[::1]"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 7000);
        assert_eq!(cfg.admin.port(), 9000);
        assert_eq!(cfg.resolve.len(), 2);
        assert_eq!(
            lookup_static(&cfg.resolve, "x.test", 443),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(lookup_static(&cfg.resolve, "x.test", 80), None);
        assert_eq!(
            lookup_static(&cfg.resolve, "y.test", 80),
            Some("::1".parse().unwrap())
        );
    }

    #[test]
    fn worker_threads_from_flag_or_env_and_checked() {
        let args = NodeArgs::parse_from(["cellgate-node", "--trust", "k.pub"]);
        let cfg = NodeConfig::from_args_env(args.clone(), &env(&[])).unwrap();
        assert_eq!(cfg.worker_threads, None);
        let cfg =
            NodeConfig::from_args_env(args.clone(), &env(&[("CELLGATE_WORKER_THREADS", "3")]))
                .unwrap();
        assert_eq!(cfg.worker_threads, Some(3));
        let flag =
            NodeArgs::parse_from(["cellgate-node", "--trust", "k.pub", "--worker-threads", "1"]);
        let cfg =
            NodeConfig::from_args_env(flag, &env(&[("CELLGATE_WORKER_THREADS", "3")])).unwrap();
        assert_eq!(
            cfg.worker_threads,
            Some(1),
            "the flag wins over the environment"
        );
        let e = NodeConfig::from_args_env(args.clone(), &env(&[("CELLGATE_WORKER_THREADS", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CELLGATE_WORKER_THREADS"), "{e}");
        let e = NodeConfig::from_args_env(args, &env(&[("CELLGATE_WORKER_THREADS", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--worker-threads"), "{e}");
    }

    #[test]
    fn per_cell_ceilings_and_http_idle_timeout_from_flag_or_env_and_checked() {
        let args = NodeArgs::parse_from(["cellgate-node", "--trust", "k.pub"]);
        let cfg = NodeConfig::from_args_env(args.clone(), &env(&[])).unwrap();
        assert_eq!(
            (
                cfg.cell_max_connections,
                cfg.cell_requests_per_second,
                cfg.http_idle_timeout
            ),
            (1024, 0, Duration::from_secs(300))
        );
        let cfg = NodeConfig::from_args_env(
            args.clone(),
            &env(&[
                ("CELLGATE_CELL_MAX_CONNECTIONS", "64"),
                ("CELLGATE_CELL_REQUESTS_PER_SECOND", "50"),
                ("CELLGATE_HTTP_IDLE_TIMEOUT", "90s"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (
                cfg.cell_max_connections,
                cfg.cell_requests_per_second,
                cfg.http_idle_timeout
            ),
            (64, 50, Duration::from_secs(90))
        );
        let flags = NodeArgs::parse_from([
            "cellgate-node",
            "--trust",
            "k.pub",
            "--cell-max-connections",
            "8",
            "--http-idle-timeout",
            "1m",
        ]);
        let cfg =
            NodeConfig::from_args_env(flags, &env(&[("CELLGATE_CELL_MAX_CONNECTIONS", "64")]))
                .unwrap();
        assert_eq!(cfg.cell_max_connections, 8, "the flag wins");
        assert_eq!(cfg.http_idle_timeout, Duration::from_secs(60));
        for (key, value, named) in [
            (
                "CELLGATE_CELL_MAX_CONNECTIONS",
                "0",
                "--cell-max-connections",
            ),
            (
                "CELLGATE_CELL_MAX_CONNECTIONS",
                "x",
                "CELLGATE_CELL_MAX_CONNECTIONS",
            ),
            ("CELLGATE_HTTP_IDLE_TIMEOUT", "0s", "--http-idle-timeout"),
            ("CELLGATE_HTTP_IDLE_TIMEOUT", "soon", "--http-idle-timeout"),
        ] {
            let e = NodeConfig::from_args_env(args.clone(), &env(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{key}={value}: {e}");
        }
    }

    #[test]
    fn ext_authz_takes_tcp_or_unix() {
        let args = NodeArgs::parse_from(["cellgate-node", "--trust", "k.pub"]);
        let cfg = NodeConfig::from_args_env(
            args.clone(),
            &env(&[("CELLGATE_EXT_AUTHZ", "unix:/run/cellgate/x.sock")]),
        )
        .unwrap();
        assert_eq!(
            cfg.ext_authz,
            Some(ListenAddr::Unix("/run/cellgate/x.sock".into()))
        );
        assert_eq!(
            ListenAddr::parse("127.0.0.1:15002"),
            Ok(ListenAddr::Tcp("127.0.0.1:15002".parse().unwrap()))
        );
        assert!(ListenAddr::parse("nope").is_err());
        let e = NodeConfig::from_args_env(
            args,
            &env(&[("CELLGATE_EXT_AUTHZ_TOKEN_HEADER", "bad header")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--ext-authz-token-header"), "{e}");
    }

    #[test]
    fn kubernetes_mode_needs_a_node_name_and_excludes_files() {
        let args = NodeArgs::parse_from(["cellgate-node", "--trust", "k.pub", "--kubernetes"]);
        let e = NodeConfig::from_args_env(args.clone(), &env(&[("HOSTNAME", "h")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--node-name"), "{e}");
        let cfg =
            NodeConfig::from_args_env(args.clone(), &env(&[("CELLGATE_NODE_NAME", "n1")])).unwrap();
        assert!(cfg.kubernetes);
        assert_eq!(cfg.node_name, "n1");
        assert_eq!(cfg.control_namespace, "cellgate-system");
        let cfg = NodeConfig::from_args_env(
            NodeArgs::parse_from(["cellgate-node", "--trust", "k.pub"]),
            &env(&[
                ("CELLGATE_KUBERNETES", "true"),
                ("CELLGATE_NODE_NAME", "n2"),
                ("CELLGATE_CONTROL_NAMESPACE", "cg"),
            ]),
        )
        .unwrap();
        assert!(cfg.kubernetes);
        assert_eq!(cfg.control_namespace, "cg");
        let e = NodeConfig::from_args_env(
            args,
            &env(&[
                ("CELLGATE_NODE_NAME", "n1"),
                ("CELLGATE_CELLS", "/tmp/cells"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--cells"), "{e}");
        let cfg = NodeConfig::from_args_env(
            NodeArgs::parse_from(["cellgate-node", "--trust", "k.pub"]),
            &env(&[("CELLGATE_NODE_NAME", "n1")]),
        )
        .unwrap();
        assert!(!cfg.kubernetes);
    }

    #[test]
    fn vault_approle_and_kv_ttl_from_flags_or_env_and_checked() {
        use crate::credentials::VaultAuth;
        let args = NodeArgs::parse_from(["cellgate-node", "--trust", "k.pub"]);
        let cfg = NodeConfig::from_args_env(args.clone(), &env(&[])).unwrap();
        assert_eq!(cfg.credentials.vault, None);
        assert_eq!(cfg.credentials.vault_kv_ttl, Duration::from_secs(30));
        let cfg = NodeConfig::from_args_env(
            args.clone(),
            &env(&[
                ("CELLGATE_VAULT_ADDR", "http://vault:8200"),
                ("CELLGATE_VAULT_AUTH", "approle"),
                ("CELLGATE_VAULT_APPROLE_ROLE_ID_FILE", "/run/vault/role-id"),
                (
                    "CELLGATE_VAULT_APPROLE_SECRET_ID_FILE",
                    "/run/vault/secret-id",
                ),
                ("CELLGATE_VAULT_KV_TTL", "5s"),
            ]),
        )
        .unwrap();
        let vault = cfg.credentials.vault.unwrap();
        assert_eq!(vault.addr, "http://vault:8200");
        assert_eq!(
            vault.auth,
            VaultAuth::AppRole {
                role_id_file: "/run/vault/role-id".into(),
                secret_id_file: "/run/vault/secret-id".into(),
                mount: "approle".into(),
            }
        );
        assert_eq!(cfg.credentials.vault_kv_ttl, Duration::from_secs(5));
        let flags = NodeArgs::parse_from([
            "cellgate-node",
            "--trust",
            "k.pub",
            "--vault-addr",
            "https://vault:8200",
            "--vault-auth",
            "approle",
            "--vault-approle-role-id-file",
            "/a/role",
            "--vault-approle-secret-id-file",
            "/a/secret",
            "--vault-approle-mount",
            "nodes",
            "--vault-kv-ttl",
            "1m",
        ]);
        let cfg = NodeConfig::from_args_env(
            flags,
            &env(&[
                ("CELLGATE_VAULT_APPROLE_MOUNT", "other"),
                ("CELLGATE_VAULT_KV_TTL", "5s"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cfg.credentials.vault.unwrap().auth,
            VaultAuth::AppRole {
                role_id_file: "/a/role".into(),
                secret_id_file: "/a/secret".into(),
                mount: "nodes".into(),
            },
            "the flags win"
        );
        assert_eq!(cfg.credentials.vault_kv_ttl, Duration::from_secs(60));
        let approle = [
            ("CELLGATE_VAULT_ADDR", "http://vault:8200"),
            ("CELLGATE_VAULT_AUTH", "approle"),
            ("CELLGATE_VAULT_APPROLE_ROLE_ID_FILE", "/r"),
            ("CELLGATE_VAULT_APPROLE_SECRET_ID_FILE", "/s"),
        ];
        for (drop, named) in [
            (
                "CELLGATE_VAULT_APPROLE_ROLE_ID_FILE",
                "--vault-approle-role-id-file",
            ),
            (
                "CELLGATE_VAULT_APPROLE_SECRET_ID_FILE",
                "--vault-approle-secret-id-file",
            ),
        ] {
            let pairs: Vec<_> = approle
                .iter()
                .filter(|(k, _)| *k != drop)
                .copied()
                .collect();
            let e = NodeConfig::from_args_env(args.clone(), &env(&pairs))
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "without {drop}: {e}");
        }
        for (key, value, named) in [
            ("CELLGATE_VAULT_AUTH", "userpass", "approle"),
            ("CELLGATE_VAULT_KV_TTL", "0s", "--vault-kv-ttl"),
            ("CELLGATE_VAULT_KV_TTL", "soon", "--vault-kv-ttl"),
        ] {
            let mut pairs = approle.to_vec();
            pairs.retain(|(k, _)| *k != key);
            pairs.push((key, value));
            let e = NodeConfig::from_args_env(args.clone(), &env(&pairs))
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{key}={value}: {e}");
        }
    }

    #[test]
    fn audit_durability_and_anchors_from_flag_or_env_and_checked() {
        let base = ["cellgate-node", "--trust", "k.pub"];
        let cfg = NodeConfig::from_args_env(NodeArgs::parse_from(base), &env(&[])).unwrap();
        assert_eq!(cfg.audit_durability, AuditDurability::Relaxed);
        assert_eq!(cfg.audit_anchor_key, None);
        assert_eq!(cfg.audit_anchor_interval, Duration::from_secs(10));
        let cfg = NodeConfig::from_args_env(
            NodeArgs::parse_from(base),
            &env(&[
                ("CELLGATE_AUDIT_DURABILITY", "strict"),
                ("CELLGATE_AUDIT_ANCHOR_KEY", "/keys/anchor.key"),
                ("CELLGATE_AUDIT_ANCHOR_INTERVAL", "1m"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.audit_durability, AuditDurability::Strict);
        assert_eq!(
            cfg.audit_anchor_key,
            Some(PathBuf::from("/keys/anchor.key"))
        );
        assert_eq!(cfg.audit_anchor_interval, Duration::from_secs(60));
        // The flag wins over the environment.
        let flags = NodeArgs::parse_from([
            "cellgate-node",
            "--trust",
            "k.pub",
            "--audit-durability",
            "relaxed",
            "--audit-anchor-interval",
            "5s",
        ]);
        let cfg = NodeConfig::from_args_env(
            flags,
            &env(&[
                ("CELLGATE_AUDIT_DURABILITY", "strict"),
                ("CELLGATE_AUDIT_ANCHOR_INTERVAL", "1h"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.audit_durability, AuditDurability::Relaxed);
        assert_eq!(cfg.audit_anchor_interval, Duration::from_secs(5));
        // Bad values are refused, naming the flag and the value.
        for (flag, value) in [
            ("--audit-durability", "STRICT"),
            ("--audit-durability", "sync"),
            ("--audit-durability", ""),
            ("--audit-anchor-interval", "0s"),
            ("--audit-anchor-interval", "10"),
            ("--audit-anchor-interval", "fast"),
        ] {
            let args = NodeArgs::parse_from(["cellgate-node", "--trust", "k.pub", flag, value]);
            let err = NodeConfig::from_args_env(args, &env(&[])).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(flag) && msg.contains(&format!("{value:?}")),
                "{flag} {value}: {msg}"
            );
        }
        let err = NodeConfig::from_args_env(
            NodeArgs::parse_from(base),
            &env(&[("CELLGATE_AUDIT_DURABILITY", "none")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("expected relaxed or strict"),
            "{err}"
        );
    }

    #[test]
    fn self_check_from_flag_or_env_off_explicitly_and_checked() {
        let parse = |flags: &[&str], e: &[(&str, &str)]| {
            let mut argv = vec!["cellgate-node", "--trust", "a.pub"];
            argv.extend_from_slice(flags);
            NodeConfig::from_args_env(NodeArgs::parse_from(argv), &env(e))
        };
        let c = parse(&[], &[]).unwrap().self_check;
        assert_eq!(c.interval, Some(Duration::from_secs(30)));
        assert_eq!(c.target, SELF_CHECK_TARGET);
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.netns_dir, PathBuf::from("/var/run/netns"));
        assert_eq!(c.prober, ProberAddr::InProcess);
        let c = parse(
            &["--self-check-interval", "1m"],
            &[
                ("CELLGATE_SELF_CHECK_INTERVAL", "5s"),
                ("CELLGATE_SELF_CHECK_TARGET", "198.51.100.7:7"),
                ("CELLGATE_SELF_CHECK_TIMEOUT", "500ms"),
                ("CELLGATE_SELF_CHECK_NETNS_DIR", "/run/netns"),
                (
                    "CELLGATE_SELF_CHECK_PROBER",
                    "unix:/run/cellgate-selfcheck/prober.sock",
                ),
            ],
        )
        .unwrap()
        .self_check;
        assert_eq!(c.interval, Some(Duration::from_secs(60)));
        assert_eq!(c.target, "198.51.100.7:7".parse().unwrap());
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.netns_dir, PathBuf::from("/run/netns"));
        assert_eq!(
            c.prober,
            ProberAddr::Unix("/run/cellgate-selfcheck/prober.sock".into())
        );
        let off = parse(&[], &[("CELLGATE_SELF_CHECK_INTERVAL", "off")]).unwrap();
        assert_eq!(off.self_check.interval, None);
        assert_eq!(NodeConfig::defaults().self_check.interval, None);
        for (flags, e, needle) in [
            (
                vec!["--self-check-interval", "0s"],
                vec![],
                "--self-check-interval",
            ),
            (
                vec![],
                vec![("CELLGATE_SELF_CHECK_INTERVAL", "never")],
                "or off",
            ),
            (
                vec!["--self-check-target", "127.0.0.1:9"],
                vec![],
                "loopback",
            ),
            (vec!["--self-check-target", "0.0.0.0:9"], vec![], "loopback"),
            (vec!["--self-check-target", "192.0.2.1:0"], vec![], "port 0"),
            (
                vec!["--self-check-interval", "2s", "--self-check-timeout", "2s"],
                vec![],
                "not shorter than the interval",
            ),
            (
                vec!["--self-check-prober", "127.0.0.1:9"],
                vec![],
                "expected in-process or unix:PATH",
            ),
        ] {
            let err = parse(&flags, &e).unwrap_err().to_string();
            assert!(err.contains(needle), "{flags:?} {e:?}: {err}");
        }
        // The timeout may equal the interval only when the check is off.
        parse(
            &["--self-check-interval", "off", "--self-check-timeout", "1m"],
            &[],
        )
        .unwrap();
    }

    #[test]
    fn prober_config_from_flag_or_env() {
        let c = ProberConfig::from_args_env(
            ProberArgs::parse_from(["prober", "--socket", "unix:/run/p.sock"]),
            &env(&[("CELLGATE_SELF_CHECK_TARGET", "192.0.2.9:9")]),
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/p.sock"));
        assert_eq!(c.target, "192.0.2.9:9".parse().unwrap());
        assert_eq!(c.netns_dir, PathBuf::from("/var/run/netns"));
        let err = ProberConfig::from_args_env(ProberArgs::parse_from(["prober"]), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--socket"), "{err}");
        let err = ProberConfig::from_args_env(
            ProberArgs::parse_from(["prober", "--socket", "/p.sock", "--target", "[::1]:9"]),
            &env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("loopback"), "{err}");
    }

    #[test]
    fn errors_name_the_value() {
        let args = NodeArgs::parse_from(["cellgate-node"]);
        let e = NodeConfig::from_args_env(args.clone(), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--trust"), "{e}");
        let e = NodeConfig::from_args_env(
            args.clone(),
            &env(&[("CELLGATE_TRUST", "k.pub"), ("CELLGATE_LISTEN", "nope")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"nope\""), "{e}");
        let e = NodeConfig::from_args_env(
            args,
            &env(&[
                ("CELLGATE_TRUST", "k.pub"),
                ("CELLGATE_RESOLVE", "x.test:443"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("HOST:PORT:ADDR"), "{e}");
    }
}
