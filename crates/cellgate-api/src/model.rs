//! The one internal model of a cell, produced by [`crate::manifest::AgentCell::to_model`] from a
//! local file or from an object read from the Kubernetes API, and consumed by the node.
//!
//! Everything here is normalized: host names are lowercase without a trailing dot, ports are
//! sorted and never empty, methods are uppercase.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::manifest::{BudgetSpec, CredentialSpec};

/// Whether a capability's denials are enforced.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Denials are enforced.
    #[default]
    Enforce,
    /// Denials are recorded as `shadow_deny`, and the request goes through.
    Shadow,
}

impl Mode {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

/// What the node does with TLS to a capability's destinations.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Terminate with a minted leaf, decide per HTTP request, inject credentials.
    #[default]
    Intercept,
    /// Decide on SNI and port only; bytes are relayed, never decrypted.
    Passthrough,
}

impl TlsMode {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Intercept => "intercept",
            TlsMode::Passthrough => "passthrough",
        }
    }
}

/// What a capability carries: HTTP requests (decided one by one), or raw TCP.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP (plaintext or intercepted TLS), and TLS passthrough: never a raw relay.
    #[default]
    Http,
    /// A raw TCP relay to the dialled address (CIDR destinations only): the bytes are not read.
    Tcp,
}

impl Protocol {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        }
    }
}

/// A normalized cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Unique id (the API server's uid, or `local:<namespace>:<name>`).
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Role for layered policy.
    pub role: Option<String>,
    /// Every request is denied while true.
    pub suspended: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `metadata.generation` (0 in local mode).
    pub generation: i64,
    /// Cell-wide budget.
    pub budget: Option<BudgetSpec>,
    /// Per-cell ceilings on the node (`spec.limits`).
    pub limits: Option<crate::manifest::LimitsSpec>,
    /// Capabilities in manifest order.
    pub capabilities: Vec<Capability>,
}

impl Cell {
    /// `namespace/name`, the way operators name a cell.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The capability of that name.
    pub fn capability(&self, name: &str) -> Option<&Capability> {
        self.capabilities.iter().find(|c| c.name == name)
    }

    /// Whether some capability names a host destination matching `host` (used by DNS control).
    pub fn allows_host(&self, host: &str) -> bool {
        self.capabilities.iter().any(|c| {
            c.destinations.iter().any(|d| match &d.target {
                DestinationTarget::Host(p) => p.matches(host),
                DestinationTarget::Cidr(_) => false,
            })
        })
    }
}

/// A normalized capability.
#[derive(Debug, Clone, PartialEq)]
pub struct Capability {
    /// Unique within the cell.
    pub name: String,
    /// Enforce or shadow.
    pub mode: Mode,
    /// Intercept or passthrough.
    pub tls: TlsMode,
    /// HTTP, or a raw TCP relay.
    pub protocol: Protocol,
    /// Whether names may resolve to loopback, link-local or the node's own addresses.
    pub allow_internal_addresses: bool,
    /// Never empty.
    pub destinations: Vec<Destination>,
    /// HTTP rules; `None` means any request.
    pub http: Option<HttpRule>,
    /// The credential to inject.
    pub credential: Option<CredentialRef>,
    /// Budget of this capability.
    pub budget: Option<BudgetSpec>,
    /// Whether requests need human approval.
    pub approval: bool,
    /// How they wait for it (when `approval`).
    pub approval_policy: ApprovalPolicy,
    /// Request bodies read for the policy (and for `mcp`, which implies it).
    pub inspect: Option<Inspect>,
    /// MCP governance.
    pub mcp: Option<McpRules>,
    /// Secrets and personal data looked for in requests.
    pub detect: Option<Detect>,
}

/// What a capability looks for in its requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detect {
    /// Secrets: refused or redacted.
    pub secrets: Option<crate::manifest::DetectAction>,
    /// Personal data: refused or redacted.
    pub pii: Option<crate::manifest::DetectAction>,
    /// High-entropy tokens count as secrets.
    pub entropy: bool,
    /// Detectors of one's own.
    pub patterns: Vec<DetectPattern>,
}

/// A detector of one's own: a name and a regex (checked to compile when the cell is loaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectPattern {
    /// Recorded name.
    pub name: String,
    /// The regex.
    pub regex: String,
    /// Counted as a secret (else personal data).
    pub secret: bool,
}

/// How a capability's request bodies are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inspect {
    /// Largest body read, bytes.
    pub max_bytes: u32,
    /// What a larger body gets.
    pub on_oversize: crate::manifest::OnOversize,
}

/// What an MCP client may use, per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct McpRules {
    /// Tools, by name.
    pub tools: McpRule,
    /// Resources, by URI.
    pub resources: McpRule,
    /// Prompts, by name.
    pub prompts: McpRule,
}

/// Allow and deny globs (`*`, `?`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct McpRule {
    /// `None`: everything not denied.
    pub allow: Option<Vec<String>>,
    /// Denied whatever `allow` says.
    pub deny: Vec<String>,
}

impl McpRule {
    /// Whether `name` may be used and seen.
    pub fn allows(&self, name: &str) -> bool {
        let allowed = self
            .allow
            .as_ref()
            .is_none_or(|a| a.iter().any(|g| glob_match(g, name)));
        allowed && !self.deny.iter().any(|g| glob_match(g, name))
    }
}

/// `*` matches any run of characters (`/` included), `?` one character; everything else itself.
pub fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    // Iterative matching with one backtrack point for the last `*`.
    let (mut gi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match g.get(gi) {
            Some('*') => {
                star = Some((gi, ti));
                gi += 1;
            }
            Some(c) if *c == '?' || Some(c) == t.get(ti) => {
                gi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sg, st)) => {
                    gi = sg + 1;
                    ti = st + 1;
                    star = Some((sg, st + 1));
                }
                None => return false,
            },
        }
    }
    g.get(gi..)
        .is_some_and(|rest| rest.iter().all(|c| *c == '*'))
}

/// How a capability's requests wait for a human's approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalPolicy {
    /// Hold the request, or answer at once and allow the same request once approved.
    pub mode: ApprovalMode,
    /// How long a request (hold) or an approval request (retry) waits, seconds.
    pub timeout_secs: u64,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        Self {
            mode: ApprovalMode::Hold,
            timeout_secs: crate::manifest::DEFAULT_APPROVAL_TIMEOUT_SECS,
        }
    }
}

pub use crate::manifest::ApprovalMode;

/// A destination: a host pattern or an address range, with ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// What is matched.
    pub target: DestinationTarget,
    /// Sorted, deduplicated, never empty.
    pub ports: Vec<u16>,
}

/// Host or address range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationTarget {
    /// Matched against the request's host (SNI, Host, :authority).
    Host(HostPattern),
    /// Matched against the address the agent dialled.
    Cidr(Cidr),
}

/// An exact host or a `*.` wildcard.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `api.github.com`
    Exact(String),
    /// `*.example.com`, stored as `example.com`: any subdomain, not the bare name.
    Wildcard(String),
}

impl HostPattern {
    /// Whether `host` (lowercase, no trailing dot) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }

    /// The manifest spelling.
    pub fn as_manifest(&self) -> String {
        match self {
            HostPattern::Exact(h) => h.clone(),
            HostPattern::Wildcard(s) => format!("*.{s}"),
        }
    }
}

/// An address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// Network address (host bits cleared).
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// A range; host bits of `addr` are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix.min(32)))
                    .unwrap_or(0);
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix.min(128)))
                    .unwrap_or(0);
                IpAddr::V6((bits & mask).into())
            }
        };
        Self { addr, prefix }
    }

    /// Whether `ip` is inside (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Cidr::new(ip, self.prefix).addr == self.addr
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// HTTP rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRule {
    /// Uppercase; empty = any.
    pub methods: Vec<String>,
    /// Globs; empty = any.
    pub paths: Vec<String>,
}

/// Where a capability's secret comes from and how it is injected.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialRef {
    /// The source as written.
    pub source: CredentialSpec,
    /// How it goes into the request.
    pub injection: Injection,
}

/// How a secret is put into a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection {
    /// Set header `name` (lowercase) to `template` with `{{secret}}` replaced.
    Header {
        /// Header name, lowercase.
        name: String,
        /// Template containing `{{secret}}`.
        template: String,
    },
    /// `Authorization: Basic base64(username:secret)`.
    BasicAuth {
        /// User name.
        username: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching() {
        let w = HostPattern::Wildcard("example.com".into());
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("badexample.com"));
        assert!(!w.matches(".example.com"));
        let e = HostPattern::Exact("example.com".into());
        assert!(e.matches("example.com"));
        assert!(!e.matches("a.example.com"));
    }

    #[test]
    fn cidr_contains() {
        let c = Cidr::new("192.0.2.77".parse().unwrap(), 24);
        assert_eq!(c.to_string(), "192.0.2.0/24");
        assert!(c.contains("192.0.2.1".parse().unwrap()));
        assert!(c.contains("::ffff:192.0.2.9".parse().unwrap()));
        assert!(!c.contains("192.0.3.1".parse().unwrap()));
        assert!(!c.contains("2001:db8::1".parse().unwrap()));
        let all = Cidr::new("0.0.0.0".parse().unwrap(), 0);
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6 = Cidr::new("2001:db8::".parse().unwrap(), 32);
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
    }
}
