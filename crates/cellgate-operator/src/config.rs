//! The operator's configuration: a pure function of its command-line arguments and an environment
//! map (`CELLGATE_*`), with one [`Config::validate`].
//!
//! Precedence is flag, then environment variable, then default; tests pass a map instead of
//! touching the process environment. The flags and variables are the table in
//! `docs/kubernetes.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use cellgate_api::model::Cidr;

/// `--signing-key` / `CELLGATE_SIGNING_KEY`.
pub const ENV_SIGNING_KEY: &str = "CELLGATE_SIGNING_KEY";
/// `--ca-cert` / `CELLGATE_CA_CERT`.
pub const ENV_CA_CERT: &str = "CELLGATE_CA_CERT";
/// `--system-roots` / `CELLGATE_SYSTEM_ROOTS`.
pub const ENV_SYSTEM_ROOTS: &str = "CELLGATE_SYSTEM_ROOTS";
/// `--ca-secret` / `CELLGATE_CA_SECRET`.
pub const ENV_CA_SECRET: &str = "CELLGATE_CA_SECRET";
/// `--ca-bundle-configmap` / `CELLGATE_CA_BUNDLE_CONFIGMAP`.
pub const ENV_CA_BUNDLE_CONFIGMAP: &str = "CELLGATE_CA_BUNDLE_CONFIGMAP";
/// `--token-ttl` / `CELLGATE_TOKEN_TTL`.
pub const ENV_TOKEN_TTL: &str = "CELLGATE_TOKEN_TTL";
/// `--init-image` / `CELLGATE_INIT_IMAGE`.
pub const ENV_INIT_IMAGE: &str = "CELLGATE_INIT_IMAGE";
/// `--tagger-image` / `CELLGATE_TAGGER_IMAGE`.
pub const ENV_TAGGER_IMAGE: &str = "CELLGATE_TAGGER_IMAGE";
/// `--node-cidr` (repeatable) / `CELLGATE_NODE_CIDRS` (comma-separated).
pub const ENV_NODE_CIDRS: &str = "CELLGATE_NODE_CIDRS";
/// `--control-namespace` / `CELLGATE_CONTROL_NAMESPACE`.
pub const ENV_CONTROL_NAMESPACE: &str = "CELLGATE_CONTROL_NAMESPACE";
/// `--admin` / `CELLGATE_ADMIN`.
pub const ENV_ADMIN: &str = "CELLGATE_ADMIN";
/// `--log-format` / `CELLGATE_LOG_FORMAT`.
pub const ENV_LOG_FORMAT: &str = "CELLGATE_LOG_FORMAT";
/// `--api-listen` / `CELLGATE_API_LISTEN`.
pub const ENV_API_LISTEN: &str = "CELLGATE_API_LISTEN";
/// `--api-tls-cert` / `CELLGATE_API_TLS_CERT`.
pub const ENV_API_TLS_CERT: &str = "CELLGATE_API_TLS_CERT";
/// `--api-tls-key` / `CELLGATE_API_TLS_KEY`.
pub const ENV_API_TLS_KEY: &str = "CELLGATE_API_TLS_KEY";
/// `--audit-log` / `CELLGATE_AUDIT_LOG`.
pub const ENV_AUDIT_LOG: &str = "CELLGATE_AUDIT_LOG";
/// `--cell-max-connections` / `CELLGATE_CELL_MAX_CONNECTIONS` (the node's variable of the same
/// name sets its own intake's default).
pub const ENV_CELL_MAX_CONNECTIONS: &str = "CELLGATE_CELL_MAX_CONNECTIONS";

/// `--lease-duration` / `CELLGATE_LEASE_DURATION`.
pub const ENV_LEASE_DURATION: &str = "CELLGATE_LEASE_DURATION";
/// `--lease-renew-deadline` / `CELLGATE_LEASE_RENEW_DEADLINE`.
pub const ENV_LEASE_RENEW_DEADLINE: &str = "CELLGATE_LEASE_RENEW_DEADLINE";
/// `--lease-retry-period` / `CELLGATE_LEASE_RETRY_PERIOD`.
pub const ENV_LEASE_RETRY_PERIOD: &str = "CELLGATE_LEASE_RETRY_PERIOD";
/// The pod's name (downward API, `metadata.name`): the replica's identity in the leader Lease.
pub const ENV_POD_NAME: &str = "POD_NAME";

/// Default `--signing-key`.
pub const DEFAULT_SIGNING_KEY: &str = "/etc/cellgate/signing/signing.key";
/// Default `--ca-cert`.
pub const DEFAULT_CA_CERT: &str = "/etc/cellgate/ca/ca.crt";
/// Default `--system-roots`: the Debian path, which the operator's image (distroless, Debian)
/// has.
pub const DEFAULT_SYSTEM_ROOTS: &str = cellgate_tls::trust::DEFAULT_SYSTEM_ROOTS;
/// The `--system-roots` value that leaves the system roots out: agents get the cell CA only.
pub const SYSTEM_ROOTS_NONE: &str = "none";
/// Default `--token-ttl`.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Default `--control-namespace`.
pub const DEFAULT_CONTROL_NAMESPACE: &str = "cellgate-system";
/// Default `--admin`.
pub const DEFAULT_ADMIN: &str = "0.0.0.0:8080";
/// Default `--api-listen`: the control API (HTTPS).
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:8443";
/// Default `--audit-log`: on the operator's writable volume (an emptyDir in the manifests).
pub const DEFAULT_AUDIT_LOG: &str = "/var/lib/cellgate-operator/audit.jsonl";
/// Default `--cell-max-connections`: the node's default for its intake, so a cell without
/// `spec.limits.connections` gets the same ceiling in the tagger as on the node.
pub const DEFAULT_CELL_MAX_CONNECTIONS: u32 = 1024;
/// Default `--lease-duration`: how long a standby waits, after it last saw the Lease change,
/// before it takes the Lease over (client-go's default).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Default `--lease-renew-deadline`: how long the leader keeps trying to renew before it stops
/// acting (client-go's default).
pub const DEFAULT_LEASE_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Default `--lease-retry-period`: time between two tries to acquire or renew (client-go's
/// default).
pub const DEFAULT_LEASE_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// Shortest token lifetime accepted: rotation happens at two thirds of it, and a shorter token
/// would churn the Secret faster than kubelet propagates it to the tagger (about a minute).
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(5 * 60);
/// Longest token lifetime accepted: a leaked token stays usable until it expires.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default `--init-image`: the image of this release.
pub fn default_init_image() -> String {
    format!(
        "ghcr.io/cellgate/cellgate-init:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Default `--tagger-image`: the image of this release.
pub fn default_tagger_image() -> String {
    format!(
        "ghcr.io/cellgate/cellgate-tagger:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The operator's command line. Every flag also reads a `CELLGATE_` variable (see
/// [`Config::resolve`]); clap's own `env` support is not used so that resolution stays a pure
/// function of an environment map.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Parser)]
#[command(
    name = "cellgate-operator",
    version,
    about = "Cellgate's Kubernetes control plane: reconciles AgentCells into pods, tokens and network policies."
)]
pub struct Args {
    /// Ed25519 signing key (PEM) for cell tokens [env: CELLGATE_SIGNING_KEY]
    /// [default: /etc/cellgate/signing/signing.key]
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// Interception CA certificate (PEM) mounted into agent containers [env: CELLGATE_CA_CERT]
    /// [default: /etc/cellgate/ca/ca.crt]
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// System roots (PEM) put beside the cell CA in every cell's trust bundle, so that agents
    /// also trust real servers reached through `tls: passthrough`; `none`: the cell CA only
    /// [env: CELLGATE_SYSTEM_ROOTS] [default: /etc/ssl/certs/ca-certificates.crt]
    #[arg(long, value_name = "FILE|none")]
    pub system_roots: Option<String>,
    /// Secret (control namespace) the nodes mount as their CA directory; a CA rotation writes
    /// the new CA into it [env: CELLGATE_CA_SECRET] [default: cellgate-ca]
    #[arg(long, value_name = "NAME")]
    pub ca_secret: Option<String>,
    /// ConfigMap (control namespace) holding the published CA certificates (ca.crt), the one
    /// --ca-cert is mounted from; a CA rotation keeps it current
    /// [env: CELLGATE_CA_BUNDLE_CONFIGMAP] [default: cellgate-ca-bundle]
    #[arg(long, value_name = "NAME")]
    pub ca_bundle_configmap: Option<String>,
    /// Lifetime of cell tokens, e.g. `1h` [env: CELLGATE_TOKEN_TTL] [default: 1h]
    #[arg(long, value_name = "DUR")]
    pub token_ttl: Option<String>,
    /// Image of the cellgate-init init container (`CELLGATE_INIT_IMAGE`; default: this release's).
    #[arg(
        long,
        value_name = "IMAGE",
        help = "Image of the cellgate-init init container [env: CELLGATE_INIT_IMAGE] [default: ghcr.io/cellgate/cellgate-init:<version>]"
    )]
    pub init_image: Option<String>,
    /// Image of the cellgate-tagger sidecar (`CELLGATE_TAGGER_IMAGE`; default: this release's).
    #[arg(
        long,
        value_name = "IMAGE",
        help = "Image of the cellgate-tagger sidecar [env: CELLGATE_TAGGER_IMAGE] [default: ghcr.io/cellgate/cellgate-tagger:<version>]"
    )]
    pub tagger_image: Option<String>,
    /// Address range of the nodes, where the node proxies listen; repeatable; required
    /// [env: CELLGATE_NODE_CIDRS, comma-separated]
    #[arg(long = "node-cidr", value_name = "CIDR")]
    pub node_cidrs: Vec<String>,
    /// Namespace of the control plane (revocations ConfigMap) [env: CELLGATE_CONTROL_NAMESPACE]
    /// [default: cellgate-system]
    #[arg(long, value_name = "NS")]
    pub control_namespace: Option<String>,
    /// Admin listener: /healthz, /readyz, /metrics [env: CELLGATE_ADMIN] [default: 0.0.0.0:8080]
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Log format: text or json [env: CELLGATE_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Control API listener (HTTPS) [env: CELLGATE_API_LISTEN] [default: 0.0.0.0:8443]
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<String>,
    /// Control API certificate chain (PEM); with --api-tls-key. Without both, a self-signed
    /// certificate is generated at start [env: CELLGATE_API_TLS_CERT]
    #[arg(long, value_name = "FILE")]
    pub api_tls_cert: Option<PathBuf>,
    /// Control API private key (PEM) [env: CELLGATE_API_TLS_KEY]
    #[arg(long, value_name = "FILE")]
    pub api_tls_key: Option<PathBuf>,
    /// The operator's own hash-chained audit log [env: CELLGATE_AUDIT_LOG]
    /// [default: /var/lib/cellgate-operator/audit.jsonl]
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Most connections a cell's tagger holds open at once (its `--max-connections`) when the
    /// cell's spec.limits.connections is not set [env: CELLGATE_CELL_MAX_CONNECTIONS]
    /// [default: 1024]
    #[arg(long, value_name = "N")]
    pub cell_max_connections: Option<String>,
    /// OTLP collector the operator's audit log (API calls, token and cell events) is exported
    /// to; none: no export [env: OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_LOGS_ENDPOINT]
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport: grpc or http/protobuf [env: OTEL_EXPORTER_OTLP_PROTOCOL] [default: grpc]
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// Leader election: a standby takes the Lease over when it has not changed for this long
    /// [env: CELLGATE_LEASE_DURATION] [default: 15s]
    #[arg(long, value_name = "DUR")]
    pub lease_duration: Option<String>,
    /// Leader election: the leader stops acting when it could not renew the Lease for this long;
    /// shorter than --lease-duration [env: CELLGATE_LEASE_RENEW_DEADLINE] [default: 10s]
    #[arg(long, value_name = "DUR")]
    pub lease_renew_deadline: Option<String>,
    /// Leader election: time between two tries to acquire or renew the Lease
    /// [env: CELLGATE_LEASE_RETRY_PERIOD] [default: 2s]
    #[arg(long, value_name = "DUR")]
    pub lease_retry_period: Option<String>,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The resolved configuration of the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The control plane's Ed25519 signing key (PEM `PRIVATE KEY`).
    pub signing_key: PathBuf,
    /// The interception CA certificate (PEM), copied into each cell's CA ConfigMap until the CA
    /// rotation state (`cellgate-ca-rotation`) says which CAs are published.
    pub ca_cert: PathBuf,
    /// The system roots (PEM) added to each cell's trust bundle; `None` (`--system-roots none`):
    /// the bundle holds the cell CA only.
    pub system_roots: Option<PathBuf>,
    /// The nodes' CA Secret, in the control namespace.
    pub ca_secret: String,
    /// The published CA certificates' ConfigMap, in the control namespace.
    pub ca_bundle_configmap: String,
    /// Lifetime of each minted token; rotated when less than a third is left.
    pub token_ttl: Duration,
    /// Image of `cellgate-init`.
    pub init_image: String,
    /// Image of `cellgate-tagger`.
    pub tagger_image: String,
    /// Node address ranges, normalized (`10.0.0.0/16`); the NetworkPolicy's egress targets.
    pub node_cidrs: Vec<String>,
    /// Namespace holding `cellgate-revocations`.
    pub control_namespace: String,
    /// Admin listener address.
    pub admin: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// Control API listener address (HTTPS).
    pub api_listen: SocketAddr,
    /// Control API certificate and key files; `None`: a self-signed certificate made at start.
    pub api_tls: Option<(PathBuf, PathBuf)>,
    /// The operator's audit log.
    pub audit_log: PathBuf,
    /// The tagger's `--max-connections` for cells without `spec.limits.connections`.
    pub cell_max_connections: u32,
    /// OTLP export of the operator's audit log; `None`: no export.
    pub otlp: Option<cellgate_otel::OtlpConfig>,
    /// Leader election timings; the Lease lives in [`Config::control_namespace`].
    pub lease: LeaseTimings,
    /// This replica's name in the Lease (`POD_NAME`); `None` outside a pod: [`crate::run`]
    /// then makes one up (`cellgate-operator-<random>`).
    pub identity: Option<String>,
}

/// Leader election timings, client-go's three (see [`crate::leader`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// A standby takes the Lease over when it has not seen it change for this long; written to
    /// the Lease as `leaseDurationSeconds` (whole seconds).
    pub lease_duration: Duration,
    /// The leader stops acting when its renewals have failed for this long.
    pub renew_deadline: Duration,
    /// Time between two tries to acquire or renew.
    pub retry_period: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        Self {
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_LEASE_RENEW_DEADLINE,
            retry_period: DEFAULT_LEASE_RETRY_PERIOD,
        }
    }
}

/// Why a configuration was refused. Each names the flag and the environment variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A value did not parse.
    #[error("{flag} ({env}): invalid value {value:?}: {reason}")]
    Invalid {
        /// The flag, e.g. `--token-ttl`.
        flag: &'static str,
        /// The environment variable.
        env: &'static str,
        /// The offending value.
        value: String,
        /// Why, with a hint.
        reason: String,
    },
    /// A required setting is missing.
    #[error("{flag} ({env}) is required: {hint}")]
    Missing {
        /// The flag.
        flag: &'static str,
        /// The environment variable.
        env: &'static str,
        /// What to give.
        hint: &'static str,
    },
}

impl ConfigError {
    /// A short stable label (for logs and exit reasons).
    pub fn label(&self) -> &'static str {
        match self {
            ConfigError::Invalid { .. } => "config_invalid",
            ConfigError::Missing { .. } => "config_missing",
        }
    }
}

fn pick(flag: Option<&String>, env: &BTreeMap<String, String>, name: &str) -> Option<String> {
    flag.cloned()
        .or_else(|| env.get(name).cloned())
        .filter(|v| !v.trim().is_empty())
}

impl Config {
    /// Resolves the configuration from the parsed flags and an environment map (flag, then
    /// variable, then default), then [`Config::validate`]s it.
    ///
    /// # Errors
    /// A value that does not parse or fails validation, naming the flag and variable.
    pub fn resolve(args: &Args, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let ttl_text = pick(args.token_ttl.as_ref(), env, ENV_TOKEN_TTL);
        let token_ttl = match ttl_text {
            None => DEFAULT_TOKEN_TTL,
            Some(t) => humantime::parse_duration(t.trim()).map_err(|e| ConfigError::Invalid {
                flag: "--token-ttl",
                env: ENV_TOKEN_TTL,
                value: t.clone(),
                reason: format!("{e}; write e.g. 1h or 30m"),
            })?,
        };
        let raw_cidrs: Vec<String> = if args.node_cidrs.is_empty() {
            env.get(ENV_NODE_CIDRS)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        } else {
            args.node_cidrs.clone()
        };
        let mut node_cidrs = Vec::with_capacity(raw_cidrs.len());
        for c in &raw_cidrs {
            let cidr = parse_cidr(c).map_err(|reason| ConfigError::Invalid {
                flag: "--node-cidr",
                env: ENV_NODE_CIDRS,
                value: c.clone(),
                reason,
            })?;
            let text = cidr.to_string();
            if !node_cidrs.contains(&text) {
                node_cidrs.push(text);
            }
        }
        let admin_text = pick(args.admin.as_ref(), env, ENV_ADMIN).unwrap_or(DEFAULT_ADMIN.into());
        let admin = admin_text
            .trim()
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError::Invalid {
                flag: "--admin",
                env: ENV_ADMIN,
                value: admin_text.clone(),
                reason: format!("{e}; write ADDR:PORT such as 0.0.0.0:8080"),
            })?;
        let api_text = pick(args.api_listen.as_ref(), env, ENV_API_LISTEN)
            .unwrap_or(DEFAULT_API_LISTEN.into());
        let api_listen =
            api_text
                .trim()
                .parse::<SocketAddr>()
                .map_err(|e| ConfigError::Invalid {
                    flag: "--api-listen",
                    env: ENV_API_LISTEN,
                    value: api_text.clone(),
                    reason: format!("{e}; write ADDR:PORT such as 0.0.0.0:8443"),
                })?;
        let path_of = |flag: Option<&PathBuf>, name: &str| {
            pick(flag.map(|p| p.display().to_string()).as_ref(), env, name).map(PathBuf::from)
        };
        let api_tls =
            match (
                path_of(args.api_tls_cert.as_ref(), ENV_API_TLS_CERT),
                path_of(args.api_tls_key.as_ref(), ENV_API_TLS_KEY),
            ) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                (Some(c), None) => return Err(ConfigError::Invalid {
                    flag: "--api-tls-cert",
                    env: ENV_API_TLS_CERT,
                    value: c.display().to_string(),
                    reason:
                        "given without --api-tls-key (CELLGATE_API_TLS_KEY): give both or neither"
                            .into(),
                }),
                (None, Some(k)) => return Err(ConfigError::Invalid {
                    flag: "--api-tls-key",
                    env: ENV_API_TLS_KEY,
                    value: k.display().to_string(),
                    reason:
                        "given without --api-tls-cert (CELLGATE_API_TLS_CERT): give both or neither"
                            .into(),
                }),
            };
        let otlp = {
            let flags = cellgate_otel::OtlpFlags {
                endpoint: args.otlp_endpoint.clone(),
                protocol: args.otlp_protocol.clone(),
                // The operator's log holds API calls and events, not requests: no spans.
                traces: Some(false),
                ..cellgate_otel::OtlpFlags::default()
            };
            let env: std::collections::HashMap<String, String> =
                env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            cellgate_otel::OtlpConfig::resolve(&flags, &env, "cellgate-operator").map_err(
                |reason| ConfigError::Invalid {
                    flag: "--otlp-endpoint",
                    env: "OTEL_EXPORTER_OTLP_ENDPOINT",
                    value: args.otlp_endpoint.clone().unwrap_or_default(),
                    reason,
                },
            )?
        };
        let system_roots = match pick(args.system_roots.as_ref(), env, ENV_SYSTEM_ROOTS) {
            None => Some(PathBuf::from(DEFAULT_SYSTEM_ROOTS)),
            Some(v) if v.trim().eq_ignore_ascii_case(SYSTEM_ROOTS_NONE) => None,
            Some(v) => Some(PathBuf::from(v.trim())),
        };
        let audit_log = path_of(args.audit_log.as_ref(), ENV_AUDIT_LOG)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_AUDIT_LOG));
        let cell_max_connections = match pick(
            args.cell_max_connections.as_ref(),
            env,
            ENV_CELL_MAX_CONNECTIONS,
        ) {
            None => DEFAULT_CELL_MAX_CONNECTIONS,
            Some(text) => text
                .trim()
                .parse::<u32>()
                .map_err(|e| ConfigError::Invalid {
                    flag: "--cell-max-connections",
                    env: ENV_CELL_MAX_CONNECTIONS,
                    value: text.clone(),
                    reason: format!("{e}; write a whole number of at least 1, e.g. 1024"),
                })?,
        };
        let duration =
            |flag: &'static str, name: &'static str, given: Option<&String>, default| match pick(
                given, env, name,
            ) {
                None => Ok(default),
                Some(t) => humantime::parse_duration(t.trim()).map_err(|e| ConfigError::Invalid {
                    flag,
                    env: name,
                    value: t.clone(),
                    reason: format!("{e}; write e.g. 15s or 2s"),
                }),
            };
        let lease = LeaseTimings {
            lease_duration: duration(
                "--lease-duration",
                ENV_LEASE_DURATION,
                args.lease_duration.as_ref(),
                DEFAULT_LEASE_DURATION,
            )?,
            renew_deadline: duration(
                "--lease-renew-deadline",
                ENV_LEASE_RENEW_DEADLINE,
                args.lease_renew_deadline.as_ref(),
                DEFAULT_LEASE_RENEW_DEADLINE,
            )?,
            retry_period: duration(
                "--lease-retry-period",
                ENV_LEASE_RETRY_PERIOD,
                args.lease_retry_period.as_ref(),
                DEFAULT_LEASE_RETRY_PERIOD,
            )?,
        };
        let log_format = match pick(args.log_format.as_ref(), env, ENV_LOG_FORMAT)
            .as_deref()
            .map(str::trim)
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    flag: "--log-format",
                    env: ENV_LOG_FORMAT,
                    value: other.to_string(),
                    reason: "expected text or json".into(),
                })
            }
        };
        let config = Config {
            signing_key: pick(
                args.signing_key
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .as_ref(),
                env,
                ENV_SIGNING_KEY,
            )
            .unwrap_or(DEFAULT_SIGNING_KEY.into())
            .into(),
            ca_cert: pick(
                args.ca_cert
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .as_ref(),
                env,
                ENV_CA_CERT,
            )
            .unwrap_or(DEFAULT_CA_CERT.into())
            .into(),
            system_roots,
            ca_secret: pick(args.ca_secret.as_ref(), env, ENV_CA_SECRET)
                .map(|s| s.trim().to_string())
                .unwrap_or(cellgate_api::ca_rotation::DEFAULT_CA_SECRET.into()),
            ca_bundle_configmap: pick(
                args.ca_bundle_configmap.as_ref(),
                env,
                ENV_CA_BUNDLE_CONFIGMAP,
            )
            .map(|s| s.trim().to_string())
            .unwrap_or(cellgate_api::ca_rotation::DEFAULT_CA_BUNDLE_CONFIGMAP.into()),
            token_ttl,
            init_image: pick(args.init_image.as_ref(), env, ENV_INIT_IMAGE)
                .unwrap_or_else(default_init_image),
            tagger_image: pick(args.tagger_image.as_ref(), env, ENV_TAGGER_IMAGE)
                .unwrap_or_else(default_tagger_image),
            node_cidrs,
            control_namespace: pick(args.control_namespace.as_ref(), env, ENV_CONTROL_NAMESPACE)
                .unwrap_or(DEFAULT_CONTROL_NAMESPACE.into()),
            admin,
            log_format,
            api_listen,
            api_tls,
            audit_log,
            cell_max_connections,
            otlp,
            lease,
            identity: pick(None, env, ENV_POD_NAME).map(|n| n.trim().to_string()),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the resolved values against each other and their bounds.
    ///
    /// # Errors
    /// No node CIDR, a token lifetime out of bounds, an empty image, or a control namespace that
    /// is not a DNS-1123 label.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_cidrs.is_empty() {
            return Err(ConfigError::Missing {
                flag: "--node-cidr",
                env: ENV_NODE_CIDRS,
                hint: "give the address ranges of the nodes (where cellgate-node listens), e.g. --node-cidr 10.0.0.0/16",
            });
        }
        if self.token_ttl < MIN_TOKEN_TTL || self.token_ttl > MAX_TOKEN_TTL {
            return Err(ConfigError::Invalid {
                flag: "--token-ttl",
                env: ENV_TOKEN_TTL,
                value: humantime::format_duration(self.token_ttl).to_string(),
                reason: format!(
                    "must be between {} and {}",
                    humantime::format_duration(MIN_TOKEN_TTL),
                    humantime::format_duration(MAX_TOKEN_TTL)
                ),
            });
        }
        for (flag, env, value) in [
            ("--init-image", ENV_INIT_IMAGE, &self.init_image),
            ("--tagger-image", ENV_TAGGER_IMAGE, &self.tagger_image),
        ] {
            if value.trim().is_empty() || value.chars().any(char::is_whitespace) {
                return Err(ConfigError::Invalid {
                    flag,
                    env,
                    value: value.clone(),
                    reason: "an image reference has no spaces and is not empty".into(),
                });
            }
        }
        if self.cell_max_connections == 0 {
            return Err(ConfigError::Invalid {
                flag: "--cell-max-connections",
                env: ENV_CELL_MAX_CONNECTIONS,
                value: "0".into(),
                reason: "must be at least 1: a tagger with no connection slot passes nothing"
                    .into(),
            });
        }
        self.validate_lease()?;
        if !is_dns_label(&self.control_namespace) {
            return Err(ConfigError::Invalid {
                flag: "--control-namespace",
                env: ENV_CONTROL_NAMESPACE,
                value: self.control_namespace.clone(),
                reason: "a namespace is a DNS-1123 label: lower case letters, digits and '-'"
                    .into(),
            });
        }
        for (flag, env, value) in [
            ("--ca-secret", ENV_CA_SECRET, &self.ca_secret),
            (
                "--ca-bundle-configmap",
                ENV_CA_BUNDLE_CONFIGMAP,
                &self.ca_bundle_configmap,
            ),
        ] {
            if !is_dns_subdomain(value) {
                return Err(ConfigError::Invalid {
                    flag,
                    env,
                    value: value.clone(),
                    reason: "an object name is a DNS-1123 subdomain: lower case letters, digits, '-' and '.', at most 253".into(),
                });
            }
        }
        Ok(())
    }

    /// client-go's rules: the Lease outlives the renew deadline (so the leader stops acting
    /// before a standby may take over), which outlasts a few retries; the duration is written in
    /// whole seconds.
    fn validate_lease(&self) -> Result<(), ConfigError> {
        let LeaseTimings {
            lease_duration,
            renew_deadline,
            retry_period,
        } = self.lease;
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        if retry_period.is_zero() {
            return Err(ConfigError::Invalid {
                flag: "--lease-retry-period",
                env: ENV_LEASE_RETRY_PERIOD,
                value: fmt(retry_period),
                reason: "must be more than 0, e.g. 2s".into(),
            });
        }
        // client-go's JitterFactor (1.2): a renewal gets at least one retry before its deadline.
        if renew_deadline.as_millis() * 10 <= retry_period.as_millis() * 12 {
            return Err(ConfigError::Invalid {
                flag: "--lease-renew-deadline",
                env: ENV_LEASE_RENEW_DEADLINE,
                value: fmt(renew_deadline),
                reason: format!(
                    "must be more than 1.2 times --lease-retry-period ({})",
                    fmt(retry_period)
                ),
            });
        }
        if lease_duration <= renew_deadline {
            return Err(ConfigError::Invalid {
                flag: "--lease-duration",
                env: ENV_LEASE_DURATION,
                value: fmt(lease_duration),
                reason: format!(
                    "must be more than --lease-renew-deadline ({}): the leader must stop acting before a standby may take over",
                    fmt(renew_deadline)
                ),
            });
        }
        if lease_duration.subsec_nanos() != 0 || lease_duration.as_secs() > i32::MAX as u64 {
            return Err(ConfigError::Invalid {
                flag: "--lease-duration",
                env: ENV_LEASE_DURATION,
                value: fmt(lease_duration),
                reason: "the Lease holds whole seconds: write e.g. 15s".into(),
            });
        }
        Ok(())
    }

    /// The configuration as one log line's worth of fields. Nothing here is secret (the signing
    /// key is a path), but the key file's content is never logged.
    pub fn summary(&self) -> String {
        format!(
            "signing_key={} ca_cert={} ca_secret={} ca_bundle_configmap={} system_roots={} token_ttl={} init_image={} tagger_image={} node_cidrs={} control_namespace={} admin={} log_format={:?} api_listen={} api_tls={} audit_log={} cell_max_connections={} lease_duration={} lease_renew_deadline={} lease_retry_period={} identity={}",
            self.signing_key.display(),
            self.ca_cert.display(),
            self.ca_secret,
            self.ca_bundle_configmap,
            self.system_roots
                .as_ref()
                .map_or(SYSTEM_ROOTS_NONE.into(), |p| p.display().to_string()),
            humantime::format_duration(self.token_ttl),
            self.init_image,
            self.tagger_image,
            self.node_cidrs.join(","),
            self.control_namespace,
            self.admin,
            self.log_format,
            self.api_listen,
            match &self.api_tls {
                Some((c, k)) => format!("{},{}", c.display(), k.display()),
                None => "self-signed".into(),
            },
            self.audit_log.display(),
            self.cell_max_connections,
            humantime::format_duration(self.lease.lease_duration),
            humantime::format_duration(self.lease.renew_deadline),
            humantime::format_duration(self.lease.retry_period),
            self.identity.as_deref().unwrap_or("-"),
        )
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Parses `ADDR/PREFIX` (a bare address is a single host) and clears host bits.
fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let text = text.trim();
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr: std::net::IpAddr = addr
        .parse()
        .map_err(|e| format!("{e}; write e.g. 10.0.0.0/16 or fd00::/64"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix {p:?} is not a number from 0 to {max}"))?,
    };
    Ok(Cidr::new(addr, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_operator_log_is_exported_when_an_otlp_endpoint_is_set() {
        let args = Args::parse_from(["cellgate-operator", "--node-cidr", "10.0.0.7/16"]);
        let c = Config::resolve(&args, &BTreeMap::new()).expect("valid");
        assert_eq!(c.otlp, None);
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]);
        let c = Config::resolve(&args, &e).expect("valid");
        let otlp = c.otlp.expect("export configured");
        assert_eq!(otlp.logs_endpoint, "http://collector:4318/v1/logs");
        assert_eq!(otlp.service_name, "cellgate-operator");
        assert_eq!(otlp.traces_endpoint, None, "the operator sends no spans");
        let bad = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]);
        let err = Config::resolve(&args, &bad).expect_err("no scheme");
        assert!(err.to_string().contains("--otlp-endpoint"), "{err}");
    }

    #[test]
    fn the_ca_objects_default_to_the_installers_names_and_are_checked() {
        let args = Args::parse_from(["cellgate-operator", "--node-cidr", "10.0.0.7/16"]);
        let c = Config::resolve(&args, &BTreeMap::new()).expect("valid");
        assert_eq!(
            (c.ca_secret.as_str(), c.ca_bundle_configmap.as_str()),
            ("cellgate-ca", "cellgate-ca-bundle")
        );
        let e = env(&[
            (ENV_CA_SECRET, "corp-ca"),
            (ENV_CA_BUNDLE_CONFIGMAP, "corp.ca-bundle"),
        ]);
        let c = Config::resolve(&args, &e).expect("valid");
        assert_eq!(
            (c.ca_secret.as_str(), c.ca_bundle_configmap.as_str()),
            ("corp-ca", "corp.ca-bundle")
        );
        let err = Config::resolve(&args, &env(&[(ENV_CA_SECRET, "Corp_CA")])).expect_err("bad");
        assert!(err.to_string().contains("--ca-secret"), "{err}");
    }

    #[test]
    fn defaults_need_only_node_cidrs() {
        let args = Args::parse_from(["cellgate-operator", "--node-cidr", "10.0.0.7/16"]);
        let c = Config::resolve(&args, &BTreeMap::new()).expect("valid");
        assert_eq!(c.signing_key, PathBuf::from(DEFAULT_SIGNING_KEY));
        assert_eq!(c.ca_cert, PathBuf::from(DEFAULT_CA_CERT));
        assert_eq!(
            c.system_roots,
            Some(PathBuf::from("/etc/ssl/certs/ca-certificates.crt"))
        );
        assert!(c
            .summary()
            .contains("system_roots=/etc/ssl/certs/ca-certificates.crt"));
        assert_eq!(c.token_ttl, Duration::from_secs(3600));
        assert_eq!(c.node_cidrs, ["10.0.0.0/16"]);
        assert_eq!(c.control_namespace, "cellgate-system");
        assert_eq!(c.admin, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.api_listen, "0.0.0.0:8443".parse().expect("addr"));
        assert_eq!(c.api_tls, None);
        assert_eq!(c.audit_log, PathBuf::from(DEFAULT_AUDIT_LOG));
        assert_eq!(c.cell_max_connections, 1024);
        assert!(c.summary().contains("cell_max_connections=1024"));
        assert!(c.init_image.starts_with("ghcr.io/cellgate/cellgate-init:"));
        assert!(c
            .tagger_image
            .starts_with("ghcr.io/cellgate/cellgate-tagger:"));
    }

    #[test]
    fn environment_fills_what_flags_leave_out_and_flags_win() {
        let e = env(&[
            (ENV_NODE_CIDRS, "10.0.0.0/24, 192.168.1.0/24"),
            (ENV_TOKEN_TTL, "30m"),
            (ENV_CONTROL_NAMESPACE, "cg"),
            (ENV_ADMIN, "127.0.0.1:9000"),
            (ENV_LOG_FORMAT, "json"),
            (ENV_INIT_IMAGE, "r/init:env"),
            (ENV_SIGNING_KEY, "/env/key"),
            (ENV_API_LISTEN, "127.0.0.1:9443"),
            (ENV_API_TLS_CERT, "/tls/tls.crt"),
            (ENV_API_TLS_KEY, "/tls/tls.key"),
            (ENV_AUDIT_LOG, "/env/audit.jsonl"),
        ]);
        let args = Args::parse_from([
            "cellgate-operator",
            "--init-image",
            "r/init:flag",
            "--token-ttl",
            "2h",
        ]);
        let c = Config::resolve(&args, &e).expect("valid");
        assert_eq!(c.node_cidrs, ["10.0.0.0/24", "192.168.1.0/24"]);
        assert_eq!(c.token_ttl, Duration::from_secs(7200));
        assert_eq!(c.init_image, "r/init:flag");
        assert_eq!(c.signing_key, PathBuf::from("/env/key"));
        assert_eq!(c.control_namespace, "cg");
        assert_eq!(c.admin.port(), 9000);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.api_listen.port(), 9443);
        assert_eq!(
            c.api_tls,
            Some((PathBuf::from("/tls/tls.crt"), PathBuf::from("/tls/tls.key")))
        );
        assert_eq!(c.audit_log, PathBuf::from("/env/audit.jsonl"));
        // Repeated flags replace the variable entirely.
        let args = Args::parse_from([
            "cellgate-operator",
            "--node-cidr",
            "fd00::1/64",
            "--node-cidr",
            "10.1.0.0/16",
        ]);
        let c = Config::resolve(&args, &e).expect("valid");
        assert_eq!(c.node_cidrs, ["fd00::/64", "10.1.0.0/16"]);
    }

    #[test]
    fn cell_max_connections_from_flag_or_environment() {
        let e = env(&[
            (ENV_NODE_CIDRS, "10.0.0.0/8"),
            (ENV_CELL_MAX_CONNECTIONS, "64"),
        ]);
        let c = Config::resolve(&Args::default(), &e).expect("valid");
        assert_eq!(c.cell_max_connections, 64);
        let args = Args::parse_from(["cellgate-operator", "--cell-max-connections", "8"]);
        let c = Config::resolve(&args, &e).expect("valid");
        assert_eq!(c.cell_max_connections, 8, "the flag wins");
        for bad in ["0", "-1", "many", "4294967296"] {
            let e = env(&[
                (ENV_NODE_CIDRS, "10.0.0.0/8"),
                (ENV_CELL_MAX_CONNECTIONS, bad),
            ]);
            let err = Config::resolve(&Args::default(), &e)
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains("--cell-max-connections (CELLGATE_CELL_MAX_CONNECTIONS)"),
                "{err}"
            );
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn lease_timings_default_to_client_go_and_are_checked_against_each_other() {
        let args = Args::parse_from(["cellgate-operator", "--node-cidr", "10.0.0.0/8"]);
        let c = Config::resolve(&args, &BTreeMap::new()).expect("valid");
        assert_eq!(
            c.lease,
            LeaseTimings {
                lease_duration: Duration::from_secs(15),
                renew_deadline: Duration::from_secs(10),
                retry_period: Duration::from_secs(2),
            }
        );
        assert_eq!(c.identity, None);
        assert!(c.summary().contains(
            "lease_duration=15s lease_renew_deadline=10s lease_retry_period=2s identity=-"
        ));
        let e = env(&[
            (ENV_LEASE_DURATION, "30s"),
            (ENV_LEASE_RENEW_DEADLINE, "20s"),
            (ENV_LEASE_RETRY_PERIOD, "4s"),
            (ENV_POD_NAME, "cellgate-operator-7d9f-abcde"),
        ]);
        let c = Config::resolve(&args, &e).expect("valid");
        assert_eq!(c.lease.lease_duration, Duration::from_secs(30));
        assert_eq!(c.lease.renew_deadline, Duration::from_secs(20));
        assert_eq!(c.lease.retry_period, Duration::from_secs(4));
        assert_eq!(c.identity.as_deref(), Some("cellgate-operator-7d9f-abcde"));
        let flags = Args::parse_from([
            "cellgate-operator",
            "--node-cidr",
            "10.0.0.0/8",
            "--lease-retry-period",
            "1s",
        ]);
        assert_eq!(
            Config::resolve(&flags, &e)
                .expect("valid")
                .lease
                .retry_period,
            Duration::from_secs(1)
        );
        let bad = |pairs: &[(&str, &str)]| {
            Config::resolve(&args, &env(pairs))
                .expect_err("invalid")
                .to_string()
        };
        let err = bad(&[(ENV_LEASE_DURATION, "10s")]);
        assert!(
            err.contains("--lease-duration (CELLGATE_LEASE_DURATION)")
                && err.contains("must be more than --lease-renew-deadline (10s)"),
            "{err}"
        );
        let err = bad(&[(ENV_LEASE_RENEW_DEADLINE, "2s")]);
        assert!(
            err.contains("--lease-renew-deadline") && err.contains("1.2 times"),
            "{err}"
        );
        assert!(bad(&[(ENV_LEASE_RETRY_PERIOD, "0s")]).contains("must be more than 0"));
        assert!(bad(&[(ENV_LEASE_DURATION, "15500ms")]).contains("whole seconds"));
        assert!(bad(&[(ENV_LEASE_RETRY_PERIOD, "often")]).contains("--lease-retry-period"));
    }

    #[test]
    fn system_roots_from_flag_or_environment_and_none_leaves_them_out() {
        let e = env(&[
            (ENV_NODE_CIDRS, "10.0.0.0/8"),
            (ENV_SYSTEM_ROOTS, "/etc/pki/tls/certs/ca-bundle.crt"),
        ]);
        let c = Config::resolve(&Args::default(), &e).expect("valid");
        assert_eq!(
            c.system_roots,
            Some(PathBuf::from("/etc/pki/tls/certs/ca-bundle.crt"))
        );
        let args = Args::parse_from(["cellgate-operator", "--system-roots", "none"]);
        let c = Config::resolve(&args, &e).expect("valid");
        assert_eq!(
            c.system_roots, None,
            "the flag wins; none: the cell CA only"
        );
        assert!(c.summary().contains("system_roots=none"));
        let e = env(&[(ENV_NODE_CIDRS, "10.0.0.0/8"), (ENV_SYSTEM_ROOTS, "NONE")]);
        assert_eq!(
            Config::resolve(&Args::default(), &e)
                .expect("valid")
                .system_roots,
            None
        );
        // Empty is unset: the default.
        let e = env(&[(ENV_NODE_CIDRS, "10.0.0.0/8"), (ENV_SYSTEM_ROOTS, "")]);
        assert_eq!(
            Config::resolve(&Args::default(), &e)
                .expect("valid")
                .system_roots,
            Some(PathBuf::from(DEFAULT_SYSTEM_ROOTS))
        );
    }

    #[test]
    fn refusals_name_the_flag_and_variable() {
        let none = BTreeMap::new();
        let err = Config::resolve(&Args::default(), &none).expect_err("no cidr");
        assert!(err
            .to_string()
            .contains("--node-cidr (CELLGATE_NODE_CIDRS) is required"));
        let bad = |pairs: &[(&str, &str)]| {
            let mut e = env(&[(ENV_NODE_CIDRS, "10.0.0.0/8")]);
            e.extend(env(pairs));
            Config::resolve(&Args::default(), &e)
                .expect_err("invalid")
                .to_string()
        };
        assert!(bad(&[(ENV_NODE_CIDRS, "10.0.0.0/33")]).contains("--node-cidr"));
        assert!(bad(&[(ENV_NODE_CIDRS, "nodes")]).contains("\"nodes\""));
        assert!(bad(&[(ENV_TOKEN_TTL, "soon")]).contains("--token-ttl"));
        assert!(bad(&[(ENV_TOKEN_TTL, "10s")]).contains("must be between"));
        assert!(bad(&[(ENV_ADMIN, "8080")]).contains("--admin"));
        assert!(bad(&[(ENV_LOG_FORMAT, "xml")]).contains("expected text or json"));
        assert!(bad(&[(ENV_CONTROL_NAMESPACE, "Cell_Gate")]).contains("DNS-1123"));
        assert!(bad(&[(ENV_TAGGER_IMAGE, "a b")]).contains("--tagger-image"));
        assert!(bad(&[(ENV_API_LISTEN, "8443")]).contains("--api-listen"));
        assert!(bad(&[(ENV_API_TLS_CERT, "/c.pem")]).contains("give both or neither"));
        assert!(bad(&[(ENV_API_TLS_KEY, "/k.pem")]).contains("--api-tls-key"));
    }
}
