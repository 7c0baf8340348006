//! The `AgentCell` manifest as a user writes it: the very YAML that `kubectl apply` takes and that
//! `cellgate run -f` and `cellgate-node --cells` read.
//!
//! The serde types here are *lenient* (unknown fields are tolerated, so that objects read back from
//! an API server of a newer version still parse). Strictness lives in [`parse_agent_cells`], the
//! file path: it rejects unknown fields under `spec`, checks every value, and names the field path
//! of each problem, e.g. `spec.capabilities[1].destinations[0].host: empty host`. A valid manifest
//! is then normalized by [`AgentCell::to_model`] into [`crate::model::Cell`], the one model every
//! front end (local files, Kubernetes) hands to the node.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::{
    Capability, Cell, Cidr, CredentialRef, Destination, DestinationTarget, HostPattern, HttpRule,
    Injection, Mode, TlsMode,
};

/// The API group and version of `AgentCell`.
pub const API_VERSION: &str = "cellgate.dev/v1alpha1";
/// The kind of the manifest.
pub const KIND: &str = "AgentCell";
/// Ports a destination gets when it names none: HTTP and HTTPS.
pub const DEFAULT_PORTS: [u16; 2] = [443, 80];
/// Longest DNS name (RFC 1035, without the trailing dot).
const MAX_HOST_LEN: usize = 253;
/// Longest DNS label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;
/// Longest object or capability name (a Kubernetes DNS-1123 label).
const MAX_NAME_LEN: usize = 63;
/// A manifest file larger than this is refused before parsing: cells are small documents, and the
/// node reads these files from a directory anyone with write access to it could fill.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

/// An `AgentCell` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCell {
    /// Must be `cellgate.dev/v1alpha1`.
    pub api_version: String,
    /// Must be `AgentCell`.
    pub kind: String,
    /// Object metadata; only name, namespace, uid, labels and annotations are read.
    pub metadata: ObjectMeta,
    /// What the cell may do.
    pub spec: AgentCellSpec,
}

/// The subset of Kubernetes object metadata Cellgate reads. Other keys are accepted and ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// The cell's name (a DNS-1123 label).
    #[serde(default)]
    pub name: Option<String>,
    /// Namespace; `default` when absent.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Set by the API server; derived from namespace and name in local mode.
    #[serde(default)]
    pub uid: Option<String>,
    /// Labels, available to policy as `input.cell.labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations (not used by policy).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Set by the API server; bumps on each spec change.
    #[serde(default)]
    pub generation: Option<i64>,
}

/// `spec` of an `AgentCell`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCellSpec {
    /// A role name for layered policy (`input.cell.role`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// When true, every request of the cell is denied at once.
    #[serde(default)]
    pub suspended: bool,
    /// What the cell may reach. No capability: everything is denied.
    #[serde(default)]
    pub capabilities: Vec<CapabilitySpec>,
    /// A cell-wide budget (enforced by the budget ledger; see the budgets guide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
    /// The agent's pod template, used by the operator; ignored in local mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<serde_json::Value>,
}

/// One capability: a set of destinations, optional HTTP rules, and how to treat them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapabilitySpec {
    /// Unique within the cell (a DNS-1123 label); named in decisions and audit records.
    #[serde(default)]
    pub name: String,
    /// Hosts (exact, or with a leading `*.` wildcard) or address ranges, with ports.
    #[serde(default)]
    pub destinations: Vec<DestinationSpec>,
    /// HTTP methods and path globs; absent means any HTTP request to the destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRuleSpec>,
    /// `enforce` (default) or `shadow` (record what would be denied, deny nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// `intercept` (default: decrypt, decide per HTTP request) or `passthrough` (decide on SNI
    /// and port only, never decrypt, no credential injection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsMode>,
    /// Where the capability's secret comes from and how it is injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialSpec>,
    /// A per-capability budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
    /// Whether a human must approve requests of this capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
}

/// One destination of a capability: exactly one of `host` or `cidr`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationSpec {
    /// `api.github.com`, or `*.githubusercontent.com` (any subdomain, not the bare name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// An address range such as `192.0.2.0/24`, matched against the dialled address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Allowed ports; `[443, 80]` when absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// HTTP rules of a capability.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRuleSpec {
    /// Allowed methods (any when empty).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path globs: `*` matches one segment, `**` any number (any path when empty).
    #[serde(default)]
    pub paths: Vec<String>,
}

/// Where a credential comes from and how it is injected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialSpec {
    /// A file in the secrets directory (local mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileCredential>,
    /// A Vault secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultCredential>,
    /// A Kubernetes Secret in the cell's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretCredential>,
    /// How the secret is put into the request.
    #[serde(default)]
    pub inject: InjectSpec,
}

/// `credential.file`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileCredential {
    /// File name inside the secrets directory.
    #[serde(default)]
    pub name: String,
}

/// `credential.vault`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VaultCredential {
    /// Vault path, e.g. `secret/data/github`.
    #[serde(default)]
    pub path: String,
    /// Field of the secret's data.
    #[serde(default)]
    pub field: String,
}

/// `credential.secret`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecretCredential {
    /// Secret name.
    #[serde(default)]
    pub name: String,
    /// Key in the Secret's data.
    #[serde(default)]
    pub key: String,
}

/// `credential.inject`: a header template or basic auth.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InjectSpec {
    /// Header to set (removed from the agent's request first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Header value template; `{{secret}}` is replaced by the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// HTTP basic auth with the secret as password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuthSpec>,
}

/// `inject.basicAuth`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BasicAuthSpec {
    /// The user name; the secret is the password.
    #[serde(default)]
    pub username: String,
}

/// A request and time budget.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetSpec {
    /// Total requests allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// Requests allowed per `window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_window: Option<u64>,
    /// The window, e.g. `1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Wall-clock lifetime, e.g. `2h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<String>,
}

/// Human approval of a capability's requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalSpec {
    /// Whether each request needs approval.
    #[serde(default)]
    pub required: bool,
}

/// One problem in a manifest, at a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// e.g. `spec.capabilities[1].destinations[0].host`
    pub path: String,
    /// e.g. `empty host`
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a manifest was refused: every problem found, each naming its field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// Which document of a multi-document file (0-based).
    pub document: usize,
    /// The problems, in document order; never empty.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for e in &self.errors {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            if self.document > 0 {
                write!(f, "document {}: ", self.document + 1)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ManifestError {
    fn one(document: usize, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            document,
            errors: vec![FieldError {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

/// Parses one or more `AgentCell` documents (separated by `---`) strictly, and validates them.
///
/// # Errors
/// The first document that fails, with every problem in it and its field path: YAML syntax,
/// wrong types, unknown fields under `spec`, and invalid values.
pub fn parse_agent_cells(text: &str) -> Result<Vec<AgentCell>, ManifestError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::one(
            0,
            "",
            format!(
                "manifest is {} bytes, over the {MAX_MANIFEST_BYTES} byte limit",
                text.len()
            ),
        ));
    }
    let mut cells = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        // An empty document (a stray `---`) is skipped, as kubectl does.
        let value: serde_yaml::Value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => return Err(ManifestError::one(index, "", format!("invalid YAML: {e}"))),
        };
        if value.is_null() {
            continue;
        }
        cells.push(parse_document(index, value)?);
    }
    if cells.is_empty() {
        return Err(ManifestError::one(0, "", "no AgentCell document found"));
    }
    Ok(cells)
}

/// Parses exactly one `AgentCell` document strictly.
///
/// # Errors
/// As [`parse_agent_cells`], and when the text holds more than one document.
pub fn parse_agent_cell(text: &str) -> Result<AgentCell, ManifestError> {
    let mut cells = parse_agent_cells(text)?;
    if cells.len() != 1 {
        return Err(ManifestError::one(
            1,
            "",
            format!("expected one AgentCell, found {}", cells.len()),
        ));
    }
    cells
        .pop()
        .ok_or_else(|| ManifestError::one(0, "", "no AgentCell document found"))
}

fn parse_document(index: usize, value: serde_yaml::Value) -> Result<AgentCell, ManifestError> {
    let mut unknown = Vec::new();
    let mut on_ignored = |path: serde_ignored::Path<'_>| unknown.push(render_ignored_path(&path));
    let de = serde_ignored::Deserializer::new(value, &mut on_ignored);
    let cell: AgentCell = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ManifestError::one(index, path, e.into_inner().to_string())
    })?;
    let mut errors: Vec<FieldError> = unknown
        .into_iter()
        // Metadata and status are the API server's; unknown keys there are fine.
        .filter(|p| !p.starts_with("metadata.") && !p.starts_with("status"))
        .map(|path| FieldError {
            path,
            message: "unknown field".into(),
        })
        .collect();
    cell.validate_into(&mut errors);
    if errors.is_empty() {
        Ok(cell)
    } else {
        Err(ManifestError {
            document: index,
            errors,
        })
    }
}

fn render_ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", render_ignored_path(parent)),
        Path::Map { parent, key } => {
            let p = render_ignored_path(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => render_ignored_path(parent),
    }
}

impl AgentCell {
    /// Checks every value; see [`parse_agent_cells`].
    ///
    /// # Errors
    /// Every problem found, each with its field path.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let mut errors = Vec::new();
        self.validate_into(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ManifestError {
                document: 0,
                errors,
            })
        }
    }

    fn validate_into(&self, errors: &mut Vec<FieldError>) {
        let mut err = |path: String, message: String| errors.push(FieldError { path, message });
        if self.api_version != API_VERSION {
            err(
                "apiVersion".into(),
                format!("expected {API_VERSION}, found {:?}", self.api_version),
            );
        }
        if self.kind != KIND {
            err(
                "kind".into(),
                format!("expected {KIND}, found {:?}", self.kind),
            );
        }
        match self.metadata.name.as_deref() {
            None | Some("") => err("metadata.name".into(), "missing name".into()),
            Some(n) => {
                if let Err(m) = check_dns_label(n) {
                    err("metadata.name".into(), m);
                }
            }
        }
        if let Some(ns) = self.metadata.namespace.as_deref() {
            if let Err(m) = check_dns_label(ns) {
                err("metadata.namespace".into(), m);
            }
        }
        if let Some(b) = &self.spec.budget {
            check_budget(b, "spec.budget", &mut err);
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, cap) in self.spec.capabilities.iter().enumerate() {
            let at = format!("spec.capabilities[{i}]");
            if cap.name.is_empty() {
                err(format!("{at}.name"), "missing capability name".into());
            } else if let Err(m) = check_dns_label(&cap.name) {
                err(format!("{at}.name"), m);
            } else if !seen.insert(cap.name.as_str()) {
                err(
                    format!("{at}.name"),
                    format!("duplicate capability name {:?}", cap.name),
                );
            }
            if cap.destinations.is_empty() {
                err(
                    format!("{at}.destinations"),
                    "a capability needs at least one destination".into(),
                );
            }
            for (j, d) in cap.destinations.iter().enumerate() {
                let dat = format!("{at}.destinations[{j}]");
                match (&d.host, &d.cidr) {
                    (Some(_), Some(_)) => {
                        err(dat.clone(), "set either host or cidr, not both".into())
                    }
                    (None, None) => err(dat.clone(), "set host or cidr".into()),
                    (Some(h), None) => {
                        if let Err(m) = parse_host_pattern(h) {
                            err(format!("{dat}.host"), m);
                        }
                    }
                    (None, Some(c)) => {
                        if let Err(m) = parse_cidr(c) {
                            err(format!("{dat}.cidr"), m);
                        }
                    }
                }
                for (k, p) in d.ports.iter().enumerate() {
                    if *p == 0 {
                        err(format!("{dat}.ports[{k}]"), "port 0 is not a port".into());
                    }
                }
            }
            if let Some(http) = &cap.http {
                for (k, m) in http.methods.iter().enumerate() {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                        err(
                            format!("{at}.http.methods[{k}]"),
                            format!("{m:?} is not an HTTP method"),
                        );
                    } else if m.eq_ignore_ascii_case("CONNECT") {
                        err(
                            format!("{at}.http.methods[{k}]"),
                            "CONNECT cannot be granted: tunnels would bypass the boundary".into(),
                        );
                    }
                }
                for (k, p) in http.paths.iter().enumerate() {
                    if !p.starts_with('/') {
                        err(
                            format!("{at}.http.paths[{k}]"),
                            format!("path glob {p:?} must start with /"),
                        );
                    } else if p.contains(['?', '#']) {
                        err(
                            format!("{at}.http.paths[{k}]"),
                            format!("path glob {p:?} must not contain a query or fragment"),
                        );
                    }
                }
                if cap.tls == Some(TlsMode::Passthrough) {
                    err(
                        format!("{at}.http"),
                        "http rules need TLS interception; remove them or set tls: intercept"
                            .into(),
                    );
                }
            }
            if let Some(c) = &cap.credential {
                let sources =
                    c.file.is_some() as u8 + c.vault.is_some() as u8 + c.secret.is_some() as u8;
                if sources != 1 {
                    err(
                        format!("{at}.credential"),
                        "set exactly one of file, vault or secret".into(),
                    );
                }
                if let Some(f) = &c.file {
                    if f.name.is_empty() || f.name.contains('/') || f.name.starts_with('.') {
                        err(
                            format!("{at}.credential.file.name"),
                            format!("{:?} is not a plain file name", f.name),
                        );
                    }
                }
                if let Some(v) = &c.vault {
                    if v.path.is_empty() {
                        err(format!("{at}.credential.vault.path"), "empty path".into());
                    }
                    if v.field.is_empty() {
                        err(format!("{at}.credential.vault.field"), "empty field".into());
                    }
                }
                if let Some(s) = &c.secret {
                    if s.name.is_empty() {
                        err(format!("{at}.credential.secret.name"), "empty name".into());
                    }
                    if s.key.is_empty() {
                        err(format!("{at}.credential.secret.key"), "empty key".into());
                    }
                }
                match (&c.inject.header, &c.inject.value, &c.inject.basic_auth) {
                    (Some(h), Some(v), None) => {
                        if h.is_empty()
                            || !h
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        {
                            err(
                                format!("{at}.credential.inject.header"),
                                format!("{h:?} is not a header name"),
                            );
                        }
                        if !v.contains("{{secret}}") {
                            err(
                                format!("{at}.credential.inject.value"),
                                "the template must contain {{secret}}".into(),
                            );
                        }
                    }
                    (None, None, Some(b)) => {
                        if b.username.contains(':') {
                            err(
                                format!("{at}.credential.inject.basicAuth.username"),
                                "a basic auth user name cannot contain ':'".into(),
                            );
                        }
                    }
                    _ => err(
                        format!("{at}.credential.inject"),
                        "set header and value, or basicAuth".into(),
                    ),
                }
                if cap.tls == Some(TlsMode::Passthrough) {
                    err(
                        format!("{at}.credential"),
                        "credentials need TLS interception; passthrough never decrypts".into(),
                    );
                }
            }
            if let Some(b) = &cap.budget {
                check_budget(b, &format!("{at}.budget"), &mut err);
            }
        }
    }

    /// Normalizes a validated manifest into the internal model.
    ///
    /// # Errors
    /// When the manifest does not validate.
    pub fn to_model(&self) -> Result<Cell, ManifestError> {
        self.validate()?;
        let namespace = self
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = self.metadata.name.clone().unwrap_or_default();
        let uid = self
            .metadata
            .uid
            .clone()
            .unwrap_or_else(|| local_uid(&namespace, &name));
        let mut capabilities = Vec::with_capacity(self.spec.capabilities.len());
        for cap in &self.spec.capabilities {
            let mut destinations = Vec::with_capacity(cap.destinations.len());
            for d in &cap.destinations {
                let target = match (&d.host, &d.cidr) {
                    (Some(h), _) => DestinationTarget::Host(
                        parse_host_pattern(h).map_err(|m| ManifestError::one(0, "", m))?,
                    ),
                    (None, Some(c)) => DestinationTarget::Cidr(
                        parse_cidr(c).map_err(|m| ManifestError::one(0, "", m))?,
                    ),
                    (None, None) => continue,
                };
                let mut ports = if d.ports.is_empty() {
                    DEFAULT_PORTS.to_vec()
                } else {
                    d.ports.clone()
                };
                ports.sort_unstable();
                ports.dedup();
                destinations.push(Destination { target, ports });
            }
            let http = cap.http.as_ref().map(|h| HttpRule {
                methods: h.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                paths: h.paths.clone(),
            });
            let credential = cap.credential.as_ref().map(|c| CredentialRef {
                source: c.clone(),
                injection: match (&c.inject.header, &c.inject.value, &c.inject.basic_auth) {
                    (_, _, Some(b)) => Injection::BasicAuth {
                        username: b.username.clone(),
                    },
                    (h, v, None) => Injection::Header {
                        name: h.clone().unwrap_or_default().to_ascii_lowercase(),
                        template: v.clone().unwrap_or_default(),
                    },
                },
            });
            capabilities.push(Capability {
                name: cap.name.clone(),
                mode: cap.mode.unwrap_or_default(),
                tls: cap.tls.unwrap_or_default(),
                destinations,
                http,
                credential,
                budget: cap.budget.clone(),
                approval: cap.approval.as_ref().is_some_and(|a| a.required),
            });
        }
        Ok(Cell {
            uid,
            namespace,
            name,
            role: self.spec.role.clone(),
            suspended: self.spec.suspended,
            labels: self.metadata.labels.clone(),
            generation: self.metadata.generation.unwrap_or(0),
            budget: self.spec.budget.clone(),
            capabilities,
        })
    }
}

/// The uid a cell gets in local mode, where no API server assigns one.
pub fn local_uid(namespace: &str, name: &str) -> String {
    format!("local:{namespace}:{name}")
}

fn check_budget(b: &BudgetSpec, at: &str, err: &mut impl FnMut(String, String)) {
    if b.requests_per_window.is_some() != b.window.is_some() {
        err(
            at.to_string(),
            "requestsPerWindow and window go together".into(),
        );
    }
    for (field, v) in [("window", &b.window), ("lifetime", &b.lifetime)] {
        if let Some(v) = v {
            if parse_duration(v).is_none() {
                err(
                    format!("{at}.{field}"),
                    format!("{v:?} is not a duration (like 30s, 5m, 2h)"),
                );
            }
        }
    }
}

/// Parses `30s`, `5m`, `2h`, `1d` (one unit) into seconds.
pub fn parse_duration(s: &str) -> Option<u64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult).filter(|v| *v > 0)
}

/// Checks a Kubernetes DNS-1123 label: lowercase alphanumerics and `-`, at most 63 characters,
/// starting and ending with an alphanumeric.
fn check_dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty name".into());
    }
    if s.len() > MAX_NAME_LEN {
        return Err(format!("{s:?} is longer than {MAX_NAME_LEN} characters"));
    }
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !s.starts_with('-') && !s.ends_with('-');
    if ok_chars && ok_ends {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must be lowercase letters, digits and '-', starting and ending with a letter or digit"
        ))
    }
}

/// Parses a destination host: an exact DNS name or `*.` followed by one.
///
/// # Errors
/// A message saying what is wrong (empty, a port, a bad character, a misplaced wildcard).
pub fn parse_host_pattern(raw: &str) -> Result<HostPattern, String> {
    let h = raw.trim().to_ascii_lowercase();
    let h = h.strip_suffix('.').unwrap_or(&h).to_string();
    if h.is_empty() {
        return Err("empty host".into());
    }
    let (wild, name) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest.to_string()),
        None => (false, h.clone()),
    };
    if name.contains('*') {
        return Err(format!(
            "{raw:?}: a wildcard is allowed only as a leading '*.'"
        ));
    }
    if name.contains(':') || name.contains('/') {
        return Err(format!(
            "{raw:?} is not a host name (no scheme, port or path; ports go in ports)"
        ));
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(format!("{raw:?} is an address: use cidr: {name}/32"));
    }
    check_dns_name(&name).map_err(|m| format!("{raw:?}: {m}"))?;
    if wild && !name.contains('.') {
        return Err(format!(
            "{raw:?}: a wildcard must cover a domain with at least two labels"
        ));
    }
    Ok(if wild {
        HostPattern::Wildcard(name)
    } else {
        HostPattern::Exact(name)
    })
}

/// Checks a DNS name (lowercase, no trailing dot): total and label lengths and LDH characters.
///
/// # Errors
/// A message naming the problem.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_HOST_LEN {
        return Err(format!("longer than {MAX_HOST_LEN} characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label".into());
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!("label longer than {MAX_LABEL_LEN} characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "label {label:?} has a character not allowed in a host name"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// Parses `192.0.2.0/24` or `2001:db8::/32`; a bare address means a single host.
///
/// # Errors
/// A message naming the problem.
pub fn parse_cidr(raw: &str) -> Result<Cidr, String> {
    let (addr, len) = match raw.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (raw, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{raw:?} is not an address range like 192.0.2.0/24"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = match len {
        None => max,
        Some(l) => l
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{raw:?}: prefix length must be 0..={max}"))?,
    };
    Ok(Cidr::new(addr, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata:
  name: research
  namespace: agents
  labels: {team: ml}
spec:
  role: researcher
  capabilities:
    - name: github-read
      destinations:
        - host: api.GitHub.com
          ports: [443]
        - host: "*.githubusercontent.com"
      http:
        methods: [get, HEAD]
        paths: ["/repos/**"]
    - name: internal
      mode: shadow
      destinations:
        - cidr: 192.0.2.0/24
          ports: [8443]
"#;

    fn errs(text: &str) -> Vec<String> {
        match parse_agent_cells(text) {
            Ok(_) => vec![],
            Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn parses_and_normalizes() {
        let cells = parse_agent_cells(GOOD).unwrap();
        let cell = cells[0].to_model().unwrap();
        assert_eq!(cell.uid, "local:agents:research");
        assert_eq!(cell.role.as_deref(), Some("researcher"));
        let c0 = &cell.capabilities[0];
        assert_eq!(c0.mode, Mode::Enforce);
        assert_eq!(
            c0.destinations[0].target,
            DestinationTarget::Host(HostPattern::Exact("api.github.com".into()))
        );
        assert_eq!(c0.destinations[1].ports, vec![80, 443]);
        assert_eq!(c0.http.as_ref().unwrap().methods, vec!["GET", "HEAD"]);
        assert_eq!(cell.capabilities[1].mode, Mode::Shadow);
    }

    #[test]
    fn empty_host_names_its_path() {
        let text = GOOD.replace("\"*.githubusercontent.com\"", "\"\"");
        assert_eq!(
            errs(&text),
            vec!["spec.capabilities[0].destinations[1].host: empty host"]
        );
        let text = GOOD.replace("cidr: 192.0.2.0/24", "host: \"\"");
        assert_eq!(
            errs(&text),
            vec!["spec.capabilities[1].destinations[0].host: empty host"]
        );
    }

    #[test]
    fn unknown_fields_under_spec_are_refused() {
        let text = GOOD.replace("role: researcher", "role: researcher\n  rol: x");
        assert_eq!(errs(&text), vec!["spec.rol: unknown field"]);
        let text = GOOD.replace(
            "paths: [\"/repos/**\"]",
            "paths: [\"/repos/**\"]\n        path: x",
        );
        assert_eq!(
            errs(&text),
            vec!["spec.capabilities[0].http.path: unknown field"]
        );
        // Unknown metadata (set by the API server) is fine.
        let text = GOOD.replace(
            "namespace: agents",
            "namespace: agents\n  resourceVersion: \"7\"",
        );
        assert!(errs(&text).is_empty());
    }

    #[test]
    fn type_errors_name_the_path() {
        let text = GOOD.replace("ports: [443]", "ports: [https]");
        let e = errs(&text);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("spec.capabilities[0].destinations[0].ports[0]: invalid type"),
            "{e:?}"
        );
        let text = GOOD.replace("mode: shadow", "mode: audit");
        let e = errs(&text);
        assert!(
            e[0].starts_with("spec.capabilities[1].mode: unknown variant"),
            "{e:?}"
        );
        let text = GOOD.replace("ports: [8443]", "ports: [70000]");
        assert!(errs(&text)[0].starts_with("spec.capabilities[1].destinations[0].ports[0]"));
    }

    #[test]
    fn bad_values() {
        let cases = [
            (
                "name: research",
                "name: Research",
                "metadata.name: \"Research\" must be",
            ),
            ("api.GitHub.com", "api.github.com:443", "is not a host name"),
            (
                "\"*.githubusercontent.com\"",
                "\"a.*.com\"",
                "wildcard is allowed only",
            ),
            (
                "\"*.githubusercontent.com\"",
                "\"*.com\"",
                "at least two labels",
            ),
            (
                "\"*.githubusercontent.com\"",
                "10.0.0.1",
                "is an address: use cidr",
            ),
            ("192.0.2.0/24", "192.0.2.0/33", "prefix length must be"),
            (
                "name: internal",
                "name: github-read",
                "duplicate capability name",
            ),
            ("\"/repos/**\"", "\"repos\"", "must start with /"),
            ("[get, HEAD]", "[CONNECT]", "CONNECT cannot be granted"),
            ("kind: AgentCell", "kind: Pod", "kind: expected AgentCell"),
            (
                "cellgate.dev/v1alpha1",
                "cellgate.dev/v2",
                "apiVersion: expected",
            ),
        ];
        for (from, to, want) in cases {
            let e = errs(&GOOD.replace(from, to)).join("\n");
            assert!(e.contains(want), "{from} -> {to}: {e}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(errs(&GOOD.replace("api.GitHub.com", &long))[0].contains("label longer than 63"));
    }

    #[test]
    fn passthrough_with_http_or_credential_is_refused() {
        let text = GOOD.replace(
            "      http:\n        methods",
            "      tls: passthrough\n      http:\n        methods",
        );
        assert!(
            errs(&text)[0].contains("spec.capabilities[0].http: http rules need TLS interception")
        );
    }

    #[test]
    fn credential_shape() {
        let text = GOOD.replace(
            "      mode: shadow\n",
            "      mode: shadow\n      credential:\n        file: {name: api-token}\n        inject: {header: Authorization, value: \"Bearer {{secret}}\"}\n",
        );
        let cell = parse_agent_cell(&text).unwrap().to_model().unwrap();
        let cred = cell.capabilities[1].credential.as_ref().unwrap();
        assert_eq!(
            cred.injection,
            Injection::Header {
                name: "authorization".into(),
                template: "Bearer {{secret}}".into()
            }
        );
        let bad = text.replace("Bearer {{secret}}", "Bearer");
        assert!(errs(&bad)[0].contains("credential.inject.value: the template must contain"));
        let bad = text.replace("file: {name: api-token}", "file: {name: ../etc/passwd}");
        assert!(errs(&bad)[0].contains("credential.file.name"));
    }

    #[test]
    fn multi_document_and_empty() {
        let two = format!(
            "{GOOD}\n---\n{}",
            GOOD.replace("name: research", "name: other")
        );
        assert_eq!(parse_agent_cells(&two).unwrap().len(), 2);
        assert!(parse_agent_cell(&two).is_err());
        assert!(parse_agent_cells("").is_err());
        assert!(errs("{{{")[0].contains("invalid YAML"));
        let huge = "#".repeat(MAX_MANIFEST_BYTES + 1);
        assert!(errs(&huge)[0].contains("byte limit"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(30));
        assert_eq!(parse_duration("5m"), Some(300));
        assert_eq!(parse_duration("2h"), Some(7200));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("5w"), None);
    }
}
