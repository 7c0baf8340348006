//! The objects a cell should have, as pure functions of the `AgentCell` and the operator's
//! settings: no I/O, no clock, no randomness. The reconciler applies what these return; the golden
//! tests under `tests/golden/` pin their output.
//!
//! Start with [`pod`]: it refuses templates that would break the boundary ([`TemplateError`]) and
//! otherwise wraps the agent's containers with `cellgate-init` and the `cellgate-tagger` sidecar.

use std::collections::BTreeMap;

use cellgate_api::crd::{
    ca_bundle_name, cell_labels, network_policy_name, pod_name, service_account_name,
    token_secret_name, AgentCellResource, ANNOTATION_TOKEN_EXPIRY, ANNOTATION_TOKEN_ID,
    CA_BUNDLE_KEY, TOKEN_SECRET_KEY,
};
use cellgate_tls::trust::{self as trust_files, TrustBundle};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource,
    ObjectFieldSelector, Pod, PodSpec, PodTemplateSpec, SecretVolumeSource, SecurityContext,
    ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::Resource;
use sha2::{Digest, Sha256};

/// The node proxy's tagged intake port (PPv2 required).
pub const NODE_INTAKE_PORT: i32 = 15001;
/// The node proxy's DNS port (UDP and TCP).
pub const NODE_DNS_PORT: i32 = 15053;
/// The tagger's uid: cellgate-init exempts it from the redirect, so no agent may run as it.
pub const TAGGER_UID: i64 = 15006;
/// The tagger's listening port on the pod's loopback.
pub const TAGGER_PORT: u16 = 15006;
/// Name of the init container that sets up the pod's iptables rules.
pub const INIT_CONTAINER: &str = "cellgate-init";
/// Name of the tagger sidecar (a native sidecar: an init container with `restartPolicy: Always`).
pub const TAGGER_CONTAINER: &str = "cellgate-tagger";
/// Volume holding the token Secret, mounted by the tagger only.
pub const TOKEN_VOLUME: &str = "cellgate-token";
/// Where the tagger finds the token directory.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/cellgate/token";
/// Volume holding the CA ConfigMap, mounted into the agent's containers.
pub const CA_VOLUME: &str = "cellgate-ca";
/// Where agent containers find the CA ConfigMap's files (a whole-volume mount, never `subPath`,
/// so that kubelet refreshes them when the ConfigMap changes).
pub const CA_MOUNT_PATH: &str = "/etc/cellgate/ca";
/// The cell CA certificate(s) alone (key `ca.crt`).
pub const CA_FILE: &str = "/etc/cellgate/ca/ca.crt";
/// Key of the PEM trust bundle in the CA ConfigMap: the system roots plus the cell CA(s).
pub const BUNDLE_KEY: &str = "bundle.pem";
/// The PEM trust bundle agent clients are pointed at ([`CA_ENV_VARS`]).
pub const BUNDLE_FILE: &str = "/etc/cellgate/ca/bundle.pem";
/// Key (in `binaryData`) of the Java trust store in the CA ConfigMap: PKCS#12, the same
/// certificates as [`BUNDLE_KEY`].
pub const TRUSTSTORE_KEY: &str = "truststore.p12";
/// The Java trust store `JAVA_TOOL_OPTIONS` names.
pub const TRUSTSTORE_FILE: &str = "/etc/cellgate/ca/truststore.p12";
/// Environment variables common clients read for a CA bundle file; each is set to
/// [`BUNDLE_FILE`], replacing a value of the template's.
pub const CA_ENV_VARS: [&str; 9] = trust_files::BUNDLE_ENV_VARS;
/// The JVM's options variable: Cellgate's trust-store options are appended to the template's
/// value ([`java_tool_options_env`]).
pub const JAVA_TOOL_OPTIONS_ENV: &str = trust_files::JAVA_TOOL_OPTIONS;
/// Where a template's `JAVA_TOOL_OPTIONS` given with `valueFrom` is moved, so that
/// `JAVA_TOOL_OPTIONS` can reference it (`$(CELLGATE_AGENT_JAVA_TOOL_OPTIONS) -D...`).
pub const AGENT_JAVA_TOOL_OPTIONS_ENV: &str = "CELLGATE_AGENT_JAVA_TOOL_OPTIONS";
/// Annotation on the pod: hash of the desired pod, to recreate it when the template changes.
pub const ANNOTATION_TEMPLATE_HASH: &str = "cellgate.dev/template-hash";
/// Environment variable holding the node's address (downward API `status.hostIP`).
pub const NODE_IP_ENV: &str = "CELLGATE_NODE_IP";

/// What the desired objects depend on besides the cell: the operator's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Image of `cellgate-init`.
    pub init_image: String,
    /// Image of `cellgate-tagger`.
    pub tagger_image: String,
    /// Node address ranges for the NetworkPolicy, normalized.
    pub node_cidrs: Vec<String>,
    /// The tagger's `--max-connections` for a cell without `spec.limits.connections`.
    pub cell_max_connections: u32,
}

/// A minted token as it goes into the cell's Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The signed JWT.
    pub token: String,
    /// Its `jti`.
    pub id: String,
    /// Its expiry, RFC 3339.
    pub expiry: String,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a bearer credential: never in logs.
        f.debug_struct("IssuedToken")
            .field("id", &self.id)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

/// Why a desired object cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredError {
    /// The AgentCell lacks metadata the children need (name, namespace or uid).
    #[error("the AgentCell has no {0}; objects read from the API server always have one")]
    MissingMetadata(&'static str),
    /// The pod template is refused.
    #[error(transparent)]
    Template(#[from] TemplateError),
}

/// A pod template that is refused, at a field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TemplateError {
    /// e.g. `spec.template.spec.containers[0].securityContext.privileged`
    pub path: String,
    /// e.g. `privileged containers are refused: ...`
    pub reason: String,
}

impl TemplateError {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

struct Names {
    name: String,
    namespace: String,
    owner: OwnerReference,
}

fn names(cell: &AgentCellResource) -> Result<Names, DesiredError> {
    let name = cell
        .metadata
        .name
        .clone()
        .ok_or(DesiredError::MissingMetadata("name"))?;
    let namespace = cell
        .metadata
        .namespace
        .clone()
        .ok_or(DesiredError::MissingMetadata("namespace"))?;
    let owner = cell
        .controller_owner_ref(&())
        .ok_or(DesiredError::MissingMetadata("uid"))?;
    Ok(Names {
        name,
        namespace,
        owner,
    })
}

fn meta(n: &Names, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(n.namespace.clone()),
        labels: Some(cell_labels(&n.name)),
        owner_references: Some(vec![n.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// The cell's ServiceAccount: the pod's identity, with no API token mounted.
///
/// # Errors
/// [`DesiredError::MissingMetadata`] when the cell has no name, namespace or uid.
pub fn service_account(cell: &AgentCellResource) -> Result<ServiceAccount, DesiredError> {
    let n = names(cell)?;
    Ok(ServiceAccount {
        metadata: meta(&n, service_account_name(&n.name)),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    })
}

/// The Secret holding the cell's token (key `token`), annotated with its id and expiry.
///
/// # Errors
/// [`DesiredError::MissingMetadata`] when the cell has no name, namespace or uid.
pub fn token_secret(
    cell: &AgentCellResource,
    token: &IssuedToken,
) -> Result<k8s_openapi::api::core::v1::Secret, DesiredError> {
    let n = names(cell)?;
    let mut metadata = meta(&n, token_secret_name(&n.name));
    metadata.annotations = Some(BTreeMap::from([
        (ANNOTATION_TOKEN_ID.to_string(), token.id.clone()),
        (ANNOTATION_TOKEN_EXPIRY.to_string(), token.expiry.clone()),
    ]));
    Ok(k8s_openapi::api::core::v1::Secret {
        metadata,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            TOKEN_SECRET_KEY.to_string(),
            ByteString(token.token.clone().into_bytes()),
        )])),
        ..Default::default()
    })
}

/// The ConfigMap mounted into the agent's containers at [`CA_MOUNT_PATH`]: `ca.crt` (the cell
/// CA certificate(s) as given to the operator), `bundle.pem` (the system roots plus the cell
/// CA(s)) and, in `binaryData`, `truststore.p12` (the same certificates as a Java PKCS#12 trust
/// store). `trust` is built once per change of its inputs, so this stays a pure function.
///
/// # Errors
/// [`DesiredError::MissingMetadata`] when the cell has no name, namespace or uid.
pub fn ca_bundle(cell: &AgentCellResource, trust: &TrustBundle) -> Result<ConfigMap, DesiredError> {
    let n = names(cell)?;
    Ok(ConfigMap {
        metadata: meta(&n, ca_bundle_name(&n.name)),
        data: Some(BTreeMap::from([
            (CA_BUNDLE_KEY.to_string(), trust.cell_ca_pem().to_string()),
            (BUNDLE_KEY.to_string(), trust.pem().to_string()),
        ])),
        binary_data: Some(BTreeMap::from([(
            TRUSTSTORE_KEY.to_string(),
            ByteString(trust.pkcs12().to_vec()),
        )])),
        ..ConfigMap::default()
    })
}

/// The cell's NetworkPolicy: egress only to the node proxies' intake (TCP 15001) and DNS
/// (UDP and TCP 15053) on the node ranges. Ingress is not restricted.
///
/// # Errors
/// [`DesiredError::MissingMetadata`] when the cell has no name, namespace or uid.
pub fn network_policy(
    cell: &AgentCellResource,
    settings: &Settings,
) -> Result<NetworkPolicy, DesiredError> {
    let n = names(cell)?;
    let port = |protocol: &str, port: i32| NetworkPolicyPort {
        protocol: Some(protocol.into()),
        port: Some(IntOrString::Int(port)),
        end_port: None,
    };
    Ok(NetworkPolicy {
        metadata: meta(&n, network_policy_name(&n.name)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    cellgate_api::crd::LABEL_CELL.to_string(),
                    n.name.clone(),
                )])),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Egress".into()]),
            egress: Some(vec![NetworkPolicyEgressRule {
                to: Some(
                    settings
                        .node_cidrs
                        .iter()
                        .map(|c| NetworkPolicyPeer {
                            ip_block: Some(IPBlock {
                                cidr: c.clone(),
                                except: None,
                            }),
                            ..NetworkPolicyPeer::default()
                        })
                        .collect(),
                ),
                ports: Some(vec![
                    port("TCP", NODE_INTAKE_PORT),
                    port("UDP", NODE_DNS_PORT),
                    port("TCP", NODE_DNS_PORT),
                ]),
            }]),
            ingress: None,
        }),
    })
}

/// Parses `spec.template` leniently (unknown fields are dropped) and refuses what would break
/// the boundary.
///
/// # Errors
/// A [`TemplateError`] naming the field: no template or no containers; a type error; privileged
/// mode; added capabilities; host network, PID or IPC namespaces; a shared process namespace;
/// hostPath volumes; uid 0 or the tagger's uid 15006; reserved container, volume or mount
/// names; any reference to the cell's token Secret.
pub fn validate_template(
    cell_name: &str,
    template: Option<&serde_json::Value>,
) -> Result<PodTemplateSpec, TemplateError> {
    let Some(value) = template else {
        return Err(TemplateError::new(
            "spec.template",
            "required on Kubernetes: the agent's pod template (metadata, spec)",
        ));
    };
    let tpl: PodTemplateSpec = serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." || inner.is_empty() {
            "spec.template".to_string()
        } else {
            format!("spec.template.{inner}")
        };
        TemplateError::new(path, format!("not a valid PodTemplateSpec: {}", e.inner()))
    })?;
    let Some(spec) = tpl.spec.as_ref() else {
        return Err(TemplateError::new(
            "spec.template.spec",
            "required: the pod spec",
        ));
    };
    let p = "spec.template.spec";
    if spec.containers.is_empty() {
        return Err(TemplateError::new(
            format!("{p}.containers"),
            "at least one container is required",
        ));
    }
    for (field, on, what) in [
        (
            "hostNetwork",
            spec.host_network,
            "host networking bypasses the boundary",
        ),
        (
            "hostPID",
            spec.host_pid,
            "the host's PID namespace exposes other pods",
        ),
        (
            "hostIPC",
            spec.host_ipc,
            "the host's IPC namespace exposes other pods",
        ),
        (
            "shareProcessNamespace",
            spec.share_process_namespace,
            "a shared process namespace exposes the tagger, which holds the token",
        ),
    ] {
        if on == Some(true) {
            return Err(TemplateError::new(
                format!("{p}.{field}"),
                format!("refused: {what}"),
            ));
        }
    }
    if let Some(uid) = spec.security_context.as_ref().and_then(|s| s.run_as_user) {
        check_uid(&format!("{p}.securityContext.runAsUser"), uid)?;
    }
    let token_secret = token_secret_name(cell_name);
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let vp = format!("{p}.volumes[{i}]");
        if v.name == TOKEN_VOLUME || v.name == CA_VOLUME {
            return Err(TemplateError::new(
                format!("{vp}.name"),
                format!("{:?} is reserved for Cellgate", v.name),
            ));
        }
        if v.host_path.is_some() {
            return Err(TemplateError::new(
                format!("{vp}.hostPath"),
                "refused: a hostPath volume reaches the node's files, other pods' tokens included",
            ));
        }
        if v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(&token_secret) {
            return Err(token_ref(format!("{vp}.secret.secretName"), &token_secret));
        }
        for (j, src) in v
            .projected
            .as_ref()
            .and_then(|pr| pr.sources.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
        {
            if src.secret.as_ref().map(|s| s.name.as_str()) == Some(&token_secret) {
                return Err(token_ref(
                    format!("{vp}.projected.sources[{j}].secret.name"),
                    &token_secret,
                ));
            }
        }
    }
    let groups = [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or(&[]),
        ),
        ("containers", spec.containers.as_slice()),
    ];
    for (field, list) in groups {
        for (i, c) in list.iter().enumerate() {
            check_container(&format!("{p}.{field}[{i}]"), c, &token_secret)?;
        }
    }
    Ok(tpl)
}

fn token_ref(path: String, secret: &str) -> TemplateError {
    TemplateError::new(
        path,
        format!("refused: {secret:?} holds the cell's token, which only the tagger may read"),
    )
}

fn check_uid(path: &str, uid: i64) -> Result<(), TemplateError> {
    match uid {
        0 => Err(TemplateError::new(
            path,
            "refused: agent containers run as non-root (uid 0 asked)",
        )),
        TAGGER_UID => Err(TemplateError::new(
            path,
            format!("refused: uid {TAGGER_UID} is the tagger's, whose traffic is not redirected"),
        )),
        _ => Ok(()),
    }
}

fn check_container(path: &str, c: &Container, token_secret: &str) -> Result<(), TemplateError> {
    if c.name == INIT_CONTAINER || c.name == TAGGER_CONTAINER {
        return Err(TemplateError::new(
            format!("{path}.name"),
            format!("{:?} is reserved for Cellgate", c.name),
        ));
    }
    if let Some(sc) = &c.security_context {
        if sc.privileged == Some(true) {
            return Err(TemplateError::new(
                format!("{path}.securityContext.privileged"),
                "refused: a privileged container can undo the pod's redirect rules",
            ));
        }
        if let Some(add) = sc.capabilities.as_ref().and_then(|c| c.add.as_ref()) {
            if !add.is_empty() {
                return Err(TemplateError::new(
                    format!("{path}.securityContext.capabilities.add"),
                    format!(
                        "refused: added capabilities {add:?}; only cellgate-init holds NET_ADMIN and NET_RAW"
                    ),
                ));
            }
        }
        if let Some(uid) = sc.run_as_user {
            check_uid(&format!("{path}.securityContext.runAsUser"), uid)?;
        }
    }
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        if m.name == TOKEN_VOLUME || m.name == CA_VOLUME {
            return Err(TemplateError::new(
                format!("{path}.volumeMounts[{i}].name"),
                format!("{:?} is reserved for Cellgate", m.name),
            ));
        }
        if m.mount_path.trim_end_matches('/') == CA_MOUNT_PATH {
            return Err(TemplateError::new(
                format!("{path}.volumeMounts[{i}].mountPath"),
                format!("{CA_MOUNT_PATH} is where Cellgate mounts its CA bundle"),
            ));
        }
    }
    for (i, e) in c.env.iter().flatten().enumerate() {
        let name = e
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .map(|s| s.name.as_str());
        if name == Some(token_secret) {
            return Err(token_ref(
                format!("{path}.env[{i}].valueFrom.secretKeyRef.name"),
                token_secret,
            ));
        }
    }
    for (i, e) in c.env_from.iter().flatten().enumerate() {
        if e.secret_ref.as_ref().map(|s| s.name.as_str()) == Some(token_secret) {
            return Err(token_ref(
                format!("{path}.envFrom[{i}].secretRef.name"),
                token_secret,
            ));
        }
    }
    Ok(())
}

fn node_ip_env() -> EnvVar {
    EnvVar {
        name: NODE_IP_ENV.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: "status.hostIP".into(),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn init_container(settings: &Settings) -> Container {
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(settings.init_image.clone()),
        env: Some(vec![
            node_ip_env(),
            env("CELLGATE_INIT_TAGGER_UID", TAGGER_UID.to_string()),
            env("CELLGATE_INIT_TAGGER_PORT", TAGGER_PORT.to_string()),
            env(
                "CELLGATE_INIT_NODE",
                format!("$({NODE_IP_ENV}):{NODE_INTAKE_PORT}"),
            ),
            env(
                "CELLGATE_INIT_DNS",
                format!("$({NODE_IP_ENV}):{NODE_DNS_PORT}"),
            ),
        ]),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// The cell's connection ceiling, enforced by its tagger: `spec.limits.connections`, else the
/// operator's default. (A 0 never gets here: the CRD schema and `to_model` refuse it, and the
/// tagger itself would refuse to start with it.)
pub fn tagger_max_connections(cell: &AgentCellResource, settings: &Settings) -> u32 {
    cell.spec
        .limits
        .as_ref()
        .and_then(|l| l.connections)
        .unwrap_or(settings.cell_max_connections)
}

fn tagger_container(settings: &Settings, max_connections: u32) -> Container {
    Container {
        name: TAGGER_CONTAINER.into(),
        image: Some(settings.tagger_image.clone()),
        restart_policy: Some("Always".into()),
        args: Some(vec![
            "--listen".into(),
            format!("127.0.0.1:{TAGGER_PORT}"),
            "--node".into(),
            format!("$({NODE_IP_ENV}):{NODE_INTAKE_PORT}"),
            "--token-file".into(),
            format!("{TOKEN_MOUNT_PATH}/{TOKEN_SECRET_KEY}"),
            "--max-connections".into(),
            max_connections.to_string(),
        ]),
        env: Some(vec![node_ip_env()]),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME.into(),
            mount_path: TOKEN_MOUNT_PATH.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        security_context: Some(SecurityContext {
            run_as_user: Some(TAGGER_UID),
            run_as_group: Some(TAGGER_UID),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// `JAVA_TOOL_OPTIONS` with Cellgate's trust-store options after the template's own (the last
/// `-D` of a property wins, so ours take effect): a literal value is kept in front of them; a
/// `valueFrom` is moved to [`AGENT_JAVA_TOOL_OPTIONS_ENV`] and referenced, which Kubernetes
/// expands in the container. Returns the variables to add, in order.
fn java_tool_options_env(template: Option<EnvVar>) -> Vec<EnvVar> {
    let ours = trust_files::java_tool_options(TRUSTSTORE_FILE);
    match template {
        Some(EnvVar {
            value_from: Some(from),
            ..
        }) => vec![
            EnvVar {
                name: AGENT_JAVA_TOOL_OPTIONS_ENV.into(),
                value: None,
                value_from: Some(from),
            },
            env(
                JAVA_TOOL_OPTIONS_ENV,
                format!("$({AGENT_JAVA_TOOL_OPTIONS_ENV}) {ours}"),
            ),
        ],
        Some(EnvVar { value: Some(v), .. }) if !v.trim().is_empty() => {
            vec![env(JAVA_TOOL_OPTIONS_ENV, format!("{} {ours}", v.trim()))]
        }
        _ => vec![env(JAVA_TOOL_OPTIONS_ENV, ours)],
    }
}

/// Applies Cellgate's changes to one agent container: CA mount, client variables (replacing any
/// of the same name; `JAVA_TOOL_OPTIONS` merged, see [`java_tool_options_env`]) and the forced
/// non-root security context. Everything else is kept.
fn wrap_agent_container(mut c: Container) -> Container {
    let mut java = None;
    let mut env_vars: Vec<EnvVar> = Vec::new();
    for e in c.env.take().unwrap_or_default() {
        match e.name.as_str() {
            n if CA_ENV_VARS.contains(&n) || n == AGENT_JAVA_TOOL_OPTIONS_ENV => {}
            // The last definition is the one the container would have seen.
            JAVA_TOOL_OPTIONS_ENV => java = Some(e),
            _ => env_vars.push(e),
        }
    }
    env_vars.extend(CA_ENV_VARS.iter().map(|name| env(name, BUNDLE_FILE)));
    env_vars.extend(java_tool_options_env(java));
    c.env = Some(env_vars);
    c.volume_mounts
        .get_or_insert_with(Vec::new)
        .push(VolumeMount {
            name: CA_VOLUME.into(),
            mount_path: CA_MOUNT_PATH.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    let sc = c
        .security_context
        .get_or_insert_with(SecurityContext::default);
    sc.run_as_non_root = Some(true);
    sc.allow_privilege_escalation = Some(false);
    sc.capabilities = Some(Capabilities {
        add: None,
        drop: Some(vec!["ALL".into()]),
    });
    c
}

/// The hash of a desired pod (without its hash annotation): 16 hex digits of SHA-256 over its
/// JSON. Any change of the template or of the images changes it.
pub fn pod_hash(pod: &Pod) -> String {
    let mut pod = pod.clone();
    if let Some(a) = pod.metadata.annotations.as_mut() {
        a.remove(ANNOTATION_TEMPLATE_HASH);
    }
    // Serializing a k8s-openapi type cannot fail (no maps with non-string keys).
    let bytes = serde_json::to_vec(&pod).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))[..16].to_string()
}

/// The cell's pod, built from `spec.template` with Cellgate's containers, volumes and identity,
/// and annotated with [`ANNOTATION_TEMPLATE_HASH`].
///
/// # Errors
/// [`DesiredError::Template`] when [`validate_template`] refuses the template, and
/// [`DesiredError::MissingMetadata`] when the cell has no name, namespace or uid.
pub fn pod(cell: &AgentCellResource, settings: &Settings) -> Result<Pod, DesiredError> {
    let n = names(cell)?;
    let tpl = validate_template(&n.name, cell.spec.template.as_ref())?;
    let tpl_meta = tpl.metadata.unwrap_or_default();
    let mut spec: PodSpec = tpl.spec.unwrap_or_default();

    let mut labels = tpl_meta.labels.unwrap_or_default();
    labels.extend(cell_labels(&n.name));
    let annotations = tpl_meta.annotations.unwrap_or_default();

    let mut init = vec![
        init_container(settings),
        tagger_container(settings, tagger_max_connections(cell, settings)),
    ];
    init.extend(
        spec.init_containers
            .take()
            .unwrap_or_default()
            .into_iter()
            .map(wrap_agent_container),
    );
    spec.init_containers = Some(init);
    spec.containers = std::mem::take(&mut spec.containers)
        .into_iter()
        .map(wrap_agent_container)
        .collect();
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: TOKEN_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(token_secret_name(&n.name)),
            // Files are root-owned; the tagger runs as 15006 and must read the token. Only the
            // tagger mounts this volume, so no other container sees the file at all.
            default_mode: Some(0o444),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
    volumes.push(Volume {
        name: CA_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: ca_bundle_name(&n.name),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    });
    spec.service_account_name = Some(service_account_name(&n.name));
    #[allow(deprecated)]
    {
        spec.service_account = None;
    }
    spec.automount_service_account_token = Some(false);
    spec.ephemeral_containers = None;

    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&n.name)),
            namespace: Some(n.namespace.clone()),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: Some(vec![n.owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    };
    let hash = pod_hash(&pod);
    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_TEMPLATE_HASH.to_string(), hash);
    Ok(pod)
}

/// Placeholder put in the token Secret by [`render_yaml`]: the real token is minted at reconcile.
pub const RENDER_TOKEN_PLACEHOLDER: &str = "<minted by cellgate-operator>";

/// The objects the operator would create for `cell`, as one multi-document YAML stream
/// (ServiceAccount, Secret with a placeholder token, CA ConfigMap, NetworkPolicy, Pod). Pure: for
/// previews (`cellgate` CLI, docs) and reviews of what a template becomes.
///
/// # Errors
/// [`DesiredError`] as from [`pod`] (a refused template) or a cell without name, namespace or uid.
pub fn render_yaml(
    cell: &AgentCellResource,
    settings: &Settings,
    trust: &TrustBundle,
) -> Result<String, DesiredError> {
    let placeholder = IssuedToken {
        token: RENDER_TOKEN_PLACEHOLDER.into(),
        id: "<jti>".into(),
        expiry: "<expiry>".into(),
    };
    let docs = [
        serde_yaml::to_string(&service_account(cell)?),
        serde_yaml::to_string(&token_secret(cell, &placeholder)?),
        serde_yaml::to_string(&ca_bundle(cell, trust)?),
        serde_yaml::to_string(&network_policy(cell, settings)?),
        serde_yaml::to_string(&pod(cell, settings)?),
    ];
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        // k8s-openapi types always serialize.
        out.push_str(&doc.unwrap_or_default());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn settings() -> Settings {
        Settings {
            init_image: "ghcr.io/cellgate/cellgate-init:test".into(),
            tagger_image: "ghcr.io/cellgate/cellgate-tagger:test".into(),
            node_cidrs: vec!["10.0.0.0/16".into(), "fd00:10::/64".into()],
            cell_max_connections: 1024,
        }
    }

    fn cell(template: serde_json::Value) -> AgentCellResource {
        serde_json::from_value(json!({
            "apiVersion": "cellgate.dev/v1alpha1", "kind": "AgentCell",
            "metadata": {"name": "triage", "namespace": "agents", "uid": "0b1c2d3e-0000-4000-8000-000000000001", "generation": 2},
            "spec": {
                "role": "support",
                "capabilities": [{"name": "github", "destinations": [{"host": "api.github.com"}]}],
                "template": template,
            }
        }))
        .expect("cell")
    }

    fn agent_template() -> serde_json::Value {
        json!({
            "metadata": {"labels": {"app": "triage", "cellgate.dev/cell": "spoofed"}, "annotations": {"team": "support"}},
            "spec": {
                "serviceAccountName": "default",
                "restartPolicy": "Always",
                "initContainers": [{"name": "fetch", "image": "busybox:1.36", "command": ["true"]}],
                "containers": [{
                    "name": "agent",
                    "image": "ghcr.io/example/agent:1.0",
                    "args": ["--serve"],
                    "env": [{"name": "MODE", "value": "triage"}, {"name": "SSL_CERT_FILE", "value": "/mine.pem"}],
                    "resources": {"limits": {"memory": "512Mi"}},
                    "securityContext": {"runAsUser": 1000, "readOnlyRootFilesystem": true},
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}]
                }],
                "volumes": [{"name": "work", "emptyDir": {}}],
                "futureField": {"ignored": true}
            }
        })
    }

    /// Compares `value` as YAML with the committed file; `CELLGATE_UPDATE_GOLDEN=1` rewrites it.
    fn golden(name: &str, value: &impl serde::Serialize) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        let actual = serde_yaml::to_string(value).expect("yaml");
        if std::env::var_os("CELLGATE_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &actual).expect("write golden");
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run with CELLGATE_UPDATE_GOLDEN=1 to create it",
                path.display()
            )
        });
        assert!(
            expected == actual,
            "{} drifted from the code; if intended, rerun with CELLGATE_UPDATE_GOLDEN=1\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        );
    }

    #[test]
    fn pod_matches_golden() {
        let pod = pod(&cell(agent_template()), &settings()).expect("pod");
        golden("pod.yaml", &pod);
    }

    fn tagger_args(pod: &Pod) -> Vec<String> {
        let spec = pod.spec.as_ref().expect("spec");
        let init = spec.init_containers.as_ref().expect("init");
        let tagger = init
            .iter()
            .find(|c| c.name == TAGGER_CONTAINER)
            .expect("tagger");
        tagger.args.clone().expect("args")
    }

    fn max_connections_arg(pod: &Pod) -> Option<String> {
        let args = tagger_args(pod);
        let at = args.iter().position(|a| a == "--max-connections")?;
        assert_eq!(args.iter().filter(|a| *a == "--max-connections").count(), 1);
        args.get(at + 1).cloned()
    }

    #[test]
    fn the_tagger_gets_the_cells_connection_ceiling_from_its_limits() {
        let mut c = cell(agent_template());
        c.spec.limits = Some(cellgate_api::manifest::LimitsSpec {
            connections: Some(32),
            requests_per_second: Some(5),
        });
        let p = pod(&c, &settings()).expect("pod");
        assert_eq!(max_connections_arg(&p).as_deref(), Some("32"));
        // The ceiling is part of the pod: changing it changes the template hash (pod recreated).
        let before = p.metadata.annotations.as_ref().expect("a")[ANNOTATION_TEMPLATE_HASH].clone();
        c.spec.limits = Some(cellgate_api::manifest::LimitsSpec {
            connections: Some(33),
            requests_per_second: None,
        });
        let p = pod(&c, &settings()).expect("pod");
        assert_eq!(max_connections_arg(&p).as_deref(), Some("33"));
        assert_ne!(
            p.metadata.annotations.as_ref().expect("a")[ANNOTATION_TEMPLATE_HASH],
            before
        );
    }

    #[test]
    fn without_limits_the_tagger_gets_the_operators_default_ceiling() {
        let mut s = settings();
        s.cell_max_connections = 77;
        let mut c = cell(agent_template());
        assert_eq!(c.spec.limits, None);
        let p = pod(&c, &s).expect("pod");
        assert_eq!(max_connections_arg(&p).as_deref(), Some("77"));
        // Limits that set only a request rate leave the connection ceiling at the default.
        c.spec.limits = Some(cellgate_api::manifest::LimitsSpec {
            connections: None,
            requests_per_second: Some(5),
        });
        let p = pod(&c, &s).expect("pod");
        assert_eq!(max_connections_arg(&p).as_deref(), Some("77"));
        assert_eq!(tagger_max_connections(&c, &s), 77);
    }

    #[test]
    fn pod_shape_follows_the_contract() {
        let pod = pod(&cell(agent_template()), &settings()).expect("pod");
        let spec = pod.spec.as_ref().expect("spec");
        let init = spec.init_containers.as_ref().expect("init");
        let names: Vec<_> = init.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["cellgate-init", "cellgate-tagger", "fetch"]);
        // Only cellgate-init adds capabilities.
        let adders: Vec<_> = init
            .iter()
            .chain(&spec.containers)
            .filter(|c| {
                c.security_context
                    .as_ref()
                    .and_then(|s| s.capabilities.as_ref())
                    .and_then(|c| c.add.as_ref())
                    .is_some_and(|a| !a.is_empty())
            })
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(adders, ["cellgate-init"]);
        // Only the tagger mounts the token, and it is a native sidecar.
        let token_mounters: Vec<_> = init
            .iter()
            .chain(&spec.containers)
            .filter(|c| {
                c.volume_mounts
                    .iter()
                    .flatten()
                    .any(|m| m.name == TOKEN_VOLUME)
            })
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(token_mounters, ["cellgate-tagger"]);
        assert_eq!(init[1].restart_policy.as_deref(), Some("Always"));
        // The agent keeps its own settings, gets the CA and loses privileges.
        let agent = &spec.containers[0];
        assert_eq!(agent.args.as_deref(), Some(&["--serve".to_string()][..]));
        let sc = agent.security_context.as_ref().expect("sc");
        assert_eq!(sc.run_as_user, Some(1000));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let env: Vec<_> = agent.env.iter().flatten().collect();
        assert_eq!(
            env.iter()
                .filter(|e| e.name == "SSL_CERT_FILE")
                .map(|e| e.value.as_deref())
                .collect::<Vec<_>>(),
            [Some(BUNDLE_FILE)]
        );
        for name in CA_ENV_VARS {
            assert_eq!(
                env.iter().filter(|e| e.name == name).count(),
                1,
                "{name} set once"
            );
        }
        assert_eq!(
            env.iter()
                .find(|e| e.name == JAVA_TOOL_OPTIONS_ENV)
                .and_then(|e| e.value.as_deref()),
            Some("-Djavax.net.ssl.trustStore=/etc/cellgate/ca/truststore.p12 -Djavax.net.ssl.trustStorePassword=changeit -Djavax.net.ssl.trustStoreType=PKCS12")
        );
        // The whole ConfigMap is mounted (no subPath: kubelet refreshes the files).
        let mount = agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == CA_VOLUME)
            .expect("CA mount");
        assert_eq!(mount.mount_path, CA_MOUNT_PATH);
        assert_eq!(mount.sub_path, None);
        assert!(env.iter().any(|e| e.name == "MODE"));
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some("cellgate-triage")
        );
        assert_eq!(spec.automount_service_account_token, Some(false));
        let labels = pod.metadata.labels.as_ref().expect("labels");
        assert_eq!(
            labels.get("cellgate.dev/cell").map(String::as_str),
            Some("triage")
        );
        assert_eq!(labels.get("app").map(String::as_str), Some("triage"));
        let owner = &pod.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.kind, "AgentCell");
    }

    fn agent_env(template: serde_json::Value) -> Vec<EnvVar> {
        let p = pod(&cell(template), &settings()).expect("pod");
        let spec = p.spec.expect("spec");
        spec.containers[0].env.clone().expect("env")
    }

    #[test]
    fn java_tool_options_of_the_template_are_kept_before_cellgates() {
        let ours = trust_files::java_tool_options(TRUSTSTORE_FILE);
        // A literal value: kept in front, so Cellgate's trust store (the last -D) wins.
        let mut t = agent_template();
        t["spec"]["containers"][0]["env"] = json!([
            {"name": "JAVA_TOOL_OPTIONS", "value": " -Xmx256m -Dfile.encoding=UTF-8 "},
            {"name": "MODE", "value": "triage"}
        ]);
        let env = agent_env(t);
        let java: Vec<_> = env
            .iter()
            .filter(|e| e.name == JAVA_TOOL_OPTIONS_ENV)
            .collect();
        assert_eq!(java.len(), 1);
        assert_eq!(
            java[0].value.as_deref(),
            Some(format!("-Xmx256m -Dfile.encoding=UTF-8 {ours}").as_str())
        );
        assert!(!env.iter().any(|e| e.name == AGENT_JAVA_TOOL_OPTIONS_ENV));
        // From a ConfigMap: moved aside and referenced, expanded by Kubernetes in the container.
        let mut t = agent_template();
        t["spec"]["containers"][0]["env"] = json!([{
            "name": "JAVA_TOOL_OPTIONS",
            "valueFrom": {"configMapKeyRef": {"name": "jvm", "key": "options"}}
        }]);
        let env = agent_env(t);
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        let (moved, java) = (
            names
                .iter()
                .position(|n| *n == AGENT_JAVA_TOOL_OPTIONS_ENV)
                .expect("moved"),
            names
                .iter()
                .position(|n| *n == JAVA_TOOL_OPTIONS_ENV)
                .expect("set"),
        );
        assert!(
            moved < java,
            "a $(VAR) reference needs the variable defined before it"
        );
        let from = env[moved].value_from.as_ref().expect("valueFrom kept");
        assert_eq!(
            from.config_map_key_ref.as_ref().expect("ref").key,
            "options"
        );
        assert_eq!(
            env[java].value.as_deref(),
            Some(format!("$(CELLGATE_AGENT_JAVA_TOOL_OPTIONS) {ours}").as_str())
        );
        // Empty or absent: ours alone.
        let mut t = agent_template();
        t["spec"]["containers"][0]["env"] = json!([{"name": "JAVA_TOOL_OPTIONS", "value": "  "}]);
        let env = agent_env(t);
        assert_eq!(
            env.iter()
                .find(|e| e.name == JAVA_TOOL_OPTIONS_ENV)
                .and_then(|e| e.value.clone()),
            Some(ours)
        );
    }

    #[test]
    fn hash_changes_with_the_template_and_not_with_capabilities() {
        let base = cell(agent_template());
        let h = |c: &AgentCellResource| {
            pod(c, &settings())
                .expect("pod")
                .metadata
                .annotations
                .expect("a")[ANNOTATION_TEMPLATE_HASH]
                .clone()
        };
        let mut caps = base.clone();
        caps.spec.capabilities.clear();
        caps.spec.suspended = true;
        assert_eq!(h(&base), h(&caps));
        let mut tpl = agent_template();
        tpl["spec"]["containers"][0]["image"] = json!("ghcr.io/example/agent:2.0");
        assert_ne!(h(&base), h(&cell(tpl)));
        let p = pod(&base, &settings()).expect("pod");
        assert_eq!(pod_hash(&p), h(&base));
    }

    #[test]
    fn service_account_matches_golden() {
        golden(
            "serviceaccount.yaml",
            &service_account(&cell(agent_template())).expect("sa"),
        );
    }

    #[test]
    fn secret_matches_golden() {
        let token = IssuedToken {
            token: "eyJhbGciOiJFZERTQSJ9.e30.c2ln".into(),
            id: "5b3c0f0e-1111-4222-8333-444455556666".into(),
            expiry: "2030-01-01T01:00:00Z".into(),
        };
        let s = token_secret(&cell(agent_template()), &token).expect("secret");
        golden("secret.yaml", &s);
        assert!(
            !format!("{token:?}").contains("eyJ"),
            "Debug must not print the token"
        );
    }

    /// The committed test certificates (`tests/fixtures/`): a cell CA and a "system" root.
    pub(crate) fn fixture_trust() -> TrustBundle {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("fixture");
        TrustBundle::new(&read("cell-ca.pem"), Some(&read("system-root.pem"))).expect("bundle")
    }

    #[test]
    fn ca_bundle_matches_golden() {
        let trust = fixture_trust();
        let cm = ca_bundle(&cell(agent_template()), &trust).expect("cm");
        golden("configmap-ca.yaml", &cm);
        let data = cm.data.as_ref().expect("data");
        assert_eq!(
            data[CA_BUNDLE_KEY],
            trust.cell_ca_pem(),
            "ca.crt is the cell CA alone"
        );
        assert_eq!(data[BUNDLE_KEY], trust.pem());
        let subjects: Vec<String> = trust_files::parse_certificates(&data[BUNDLE_KEY])
            .expect("pem")
            .iter()
            .map(|c| c.subject().to_string())
            .collect();
        assert_eq!(
            subjects,
            ["CN=Golden system root", "CN=Cellgate golden cell CA"]
        );
        let binary = cm.binary_data.as_ref().expect("binaryData");
        assert_eq!(binary[TRUSTSTORE_KEY].0, trust.pkcs12());
        // Built again from the same certificates: the same object, so applying it changes nothing.
        assert_eq!(
            ca_bundle(&cell(agent_template()), &fixture_trust()).expect("cm"),
            cm
        );
    }

    #[test]
    fn every_cell_ca_goes_into_the_bundle_during_a_rotation() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("fixture");
        let new_ca = cellgate_tls::Ca::generate("Cellgate new cell CA").expect("ca");
        let both = format!("{}{}", read("cell-ca.pem"), new_ca.cert_pem());
        let trust = TrustBundle::new(&both, Some(&read("system-root.pem"))).expect("bundle");
        let cm = ca_bundle(&cell(agent_template()), &trust).expect("cm");
        let data = cm.data.as_ref().expect("data");
        assert_eq!(data[CA_BUNDLE_KEY], both);
        let subjects: Vec<String> = trust_files::parse_certificates(&data[BUNDLE_KEY])
            .expect("pem")
            .iter()
            .map(|c| {
                c.subject()
                    .split(',')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(
            subjects,
            [
                "CN=Golden system root",
                "CN=Cellgate golden cell CA",
                "CN=Cellgate new cell CA"
            ]
        );
    }

    #[test]
    fn network_policy_matches_golden() {
        golden(
            "networkpolicy.yaml",
            &network_policy(&cell(agent_template()), &settings()).expect("np"),
        );
    }

    fn refusal(patch: impl FnOnce(&mut serde_json::Value)) -> TemplateError {
        let mut tpl = agent_template();
        patch(&mut tpl);
        match pod(&cell(tpl), &settings()) {
            Err(DesiredError::Template(e)) => e,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn refuses_templates_that_break_the_boundary() {
        let c0 = "spec.template.spec.containers[0]";
        type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
        let cases: Vec<(&str, Edit, String)> = vec![
            (
                "privileged",
                Box::new(|t| {
                    t["spec"]["containers"][0]["securityContext"]["privileged"] = json!(true)
                }),
                format!("{c0}.securityContext.privileged"),
            ),
            (
                "added capabilities",
                Box::new(|t| {
                    t["spec"]["containers"][0]["securityContext"]["capabilities"] =
                        json!({"add": ["NET_ADMIN"]})
                }),
                format!("{c0}.securityContext.capabilities.add"),
            ),
            (
                "host network",
                Box::new(|t| t["spec"]["hostNetwork"] = json!(true)),
                "spec.template.spec.hostNetwork".into(),
            ),
            (
                "root",
                Box::new(|t| t["spec"]["containers"][0]["securityContext"]["runAsUser"] = json!(0)),
                format!("{c0}.securityContext.runAsUser"),
            ),
            (
                "tagger uid",
                Box::new(|t| {
                    t["spec"]["containers"][0]["securityContext"]["runAsUser"] = json!(15006)
                }),
                format!("{c0}.securityContext.runAsUser"),
            ),
            (
                "pod-level tagger uid",
                Box::new(|t| t["spec"]["securityContext"] = json!({"runAsUser": 15006})),
                "spec.template.spec.securityContext.runAsUser".into(),
            ),
            (
                "privileged init container",
                Box::new(|t| {
                    t["spec"]["initContainers"][0]["securityContext"] = json!({"privileged": true})
                }),
                "spec.template.spec.initContainers[0].securityContext.privileged".into(),
            ),
            (
                "token secret volume",
                Box::new(|t| {
                    t["spec"]["volumes"][0] =
                        json!({"name": "work", "secret": {"secretName": "cellgate-triage-token"}})
                }),
                "spec.template.spec.volumes[0].secret.secretName".into(),
            ),
            (
                "token secret env",
                Box::new(|t| {
                    t["spec"]["containers"][0]["envFrom"] =
                        json!([{"secretRef": {"name": "cellgate-triage-token"}}])
                }),
                format!("{c0}.envFrom[0].secretRef.name"),
            ),
            (
                "hostPath",
                Box::new(|t| {
                    t["spec"]["volumes"][0] = json!({"name": "work", "hostPath": {"path": "/"}})
                }),
                "spec.template.spec.volumes[0].hostPath".into(),
            ),
            (
                "reserved name",
                Box::new(|t| t["spec"]["containers"][0]["name"] = json!("cellgate-tagger")),
                format!("{c0}.name"),
            ),
            (
                "wrong type",
                Box::new(|t| t["spec"]["containers"][0]["image"] = json!(7)),
                format!("{c0}.image"),
            ),
            (
                "no containers",
                Box::new(|t| t["spec"]["containers"] = json!([])),
                "spec.template.spec.containers".into(),
            ),
        ];
        for (what, patch, path) in cases {
            let err = refusal(patch);
            assert_eq!(err.path, path, "{what}: {err}");
        }
        let err = pod(&cell(serde_json::Value::Null), &settings()).expect_err("no template");
        assert!(err.to_string().contains("spec.template"), "{err}");
        let mut no_tpl = cell(agent_template());
        no_tpl.spec.template = None;
        let err = pod(&no_tpl, &settings()).expect_err("no template");
        assert!(
            err.to_string().starts_with("spec.template: required"),
            "{err}"
        );
    }

    #[test]
    fn render_lists_every_child_in_order() {
        let y =
            render_yaml(&cell(agent_template()), &settings(), &fixture_trust()).expect("render");
        let kinds: Vec<_> = y.lines().filter_map(|l| l.strip_prefix("kind: ")).collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "Secret",
                "ConfigMap",
                "NetworkPolicy",
                "Pod"
            ]
        );
    }

    #[test]
    fn objects_need_a_uid_for_their_owner_reference() {
        let mut c = cell(agent_template());
        c.metadata.uid = None;
        assert_eq!(
            service_account(&c).expect_err("no uid"),
            DesiredError::MissingMetadata("uid")
        );
    }
}
