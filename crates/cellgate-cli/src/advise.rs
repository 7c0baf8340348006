//! `cellgate advise`: turns denied requests into a drafted capability patch, for a human to
//! review. It never applies anything.
//!
//! From the audit logs it takes the HTTP requests the policy denied for lack of a grant
//! (`no_capability`, `port_not_allowed`, `http_rule_mismatch`) and drafts, per cell, the
//! least capabilities that grant exactly them:
//!
//! - **Hosts** stay exact. Only when at least [`HOST_WILDCARD_MIN`] distinct subdomains directly
//!   under one parent (of at least two labels, never `*.com`) were denied does the draft use
//!   `*.parent` (which matches any subdomain at any depth: review it).
//! - **Ports**: those the requests were for.
//! - **Methods**: a capability per host and set of methods, so that a path seen only with `GET`
//!   is not granted `POST` because another path was.
//! - **Paths** stay exact. At least [`PATH_GLOB_MIN`] distinct paths of the same depth that
//!   differ in one segment only become a glob with `*` (one segment) there
//!   (`/repos/a/issues`, `/repos/b/issues`, `/repos/c/issues` → `/repos/*/issues`); at least
//!   [`PATH_GLOB_MIN`] of those left that share their first two segments become `/a/b/**`. A path with a `*` in it is not advised (a glob
//!   cannot name it literally).
//!
//! Without `-f`, the draft is printed as YAML capabilities per cell; with `-f CELL.yaml`, only
//! that cell's denials are used and the whole manifest with the capabilities appended is
//! printed, checked to parse and normalize as `cellgate run` and the operator would.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use cellgate_api::manifest::{CapabilitySpec, DestinationSpec, HttpRuleSpec};
use cellgate_audit::{Decision, Record};

/// Fewest sibling subdomains denied before the draft widens them to `*.parent`.
pub const HOST_WILDCARD_MIN: usize = 4;
/// Fewest sibling paths denied before the draft widens them to a glob.
pub const PATH_GLOB_MIN: usize = 3;
/// Reasons of denials a capability would have granted.
const ADVISED_REASONS: &[&str] = &["no_capability", "port_not_allowed", "http_rule_mismatch"];
/// Longest capability name (a DNS-1123 label).
const MAX_NAME_LEN: usize = 63;

/// `cellgate advise`.
#[derive(Debug, clap::Args)]
pub struct AdviseArgs {
    /// The cell to draft for: its denials only, printed as the whole manifest with the
    /// drafted capabilities appended.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Read logs whose hash chain does not verify.
    #[arg(long)]
    pub no_verify: bool,
    /// Audit logs (JSON lines).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// What was denied on one host: its ports, and each path with its methods.
type HostRequests = (BTreeSet<u16>, BTreeMap<String, BTreeSet<String>>);

/// The denied requests of one cell, by host.
#[derive(Debug, Default)]
struct Denied {
    hosts: BTreeMap<String, HostRequests>,
    requests: u64,
}

/// The port a record's request was for.
fn port_of(rec: &Record) -> Option<u16> {
    rec.port.or_else(|| {
        rec.destination
            .as_deref()?
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.port())
    })
}

/// Hosts widened to `*.parent` where enough siblings were denied.
fn host_groups(hosts: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut by_parent: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for h in hosts {
        if let Some((_, parent)) = h.split_once('.') {
            if parent.contains('.') && h.parse::<std::net::IpAddr>().is_err() {
                by_parent.entry(parent).or_default().push(h);
            }
        }
    }
    let mut out: BTreeMap<String, String> = hosts.iter().map(|h| (h.clone(), h.clone())).collect();
    for (parent, children) in by_parent {
        if children.len() >= HOST_WILDCARD_MIN {
            for c in children {
                out.insert(c.clone(), format!("*.{parent}"));
            }
        }
    }
    out
}

/// Path globs covering `paths`, least privilege first (see the module docs).
pub fn path_globs(paths: &BTreeSet<String>) -> Vec<String> {
    let segs = |p: &str| p.split('/').skip(1).map(str::to_owned).collect::<Vec<_>>();
    let mut left: BTreeSet<String> = paths.clone();
    let mut out = BTreeSet::new();
    // Same depth, differing in one segment only: that segment becomes `*` (the largest
    // groups first, each path in one group).
    loop {
        let mut by_shape: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for p in &left {
            let s = segs(p);
            for i in 0..s.len() {
                if s[i].is_empty() || s.len() < 2 {
                    continue;
                }
                let mut shape = s.clone();
                "*".clone_into(&mut shape[i]);
                by_shape
                    .entry(format!("/{}", shape.join("/")))
                    .or_default()
                    .insert(p.clone());
            }
        }
        let best = by_shape
            .into_iter()
            .filter(|(_, ps)| ps.len() >= PATH_GLOB_MIN)
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(&a.0)));
        let Some((glob, ps)) = best else { break };
        out.insert(glob);
        for p in ps {
            left.remove(&p);
        }
    }
    // A shared prefix of two segments: /a/b/**.
    let mut by_prefix: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in &left {
        let s = segs(p);
        if s.len() >= 3 && s[..2].iter().all(|x| !x.is_empty()) {
            by_prefix
                .entry(format!("/{}/{}", s[0], s[1]))
                .or_default()
                .push(p.clone());
        }
    }
    for (prefix, ps) in by_prefix {
        if ps.len() >= PATH_GLOB_MIN {
            out.insert(format!("{prefix}/**"));
            for p in ps {
                left.remove(&p);
            }
        }
    }
    out.extend(left);
    out.into_iter().collect()
}

/// A capability name from a host: `advised-api-github-com`, DNS-1123, unique in `taken`.
fn name_for(host: &str, taken: &mut BTreeSet<String>) -> String {
    let mut base: String = format!("advised-{}", host.replace("*.", "any."))
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    base.truncate(MAX_NAME_LEN - 4);
    let base = base.trim_end_matches('-').to_owned();
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

/// The drafted capabilities for one cell's denials; `taken`: names already in the cell.
fn draft(denied: &Denied, taken: &mut BTreeSet<String>) -> Vec<CapabilitySpec> {
    let hosts: BTreeSet<String> = denied.hosts.keys().cloned().collect();
    let groups = host_groups(&hosts);
    // Pooled by the host the draft names.
    let mut pooled: BTreeMap<String, HostRequests> = BTreeMap::new();
    for (host, (ports, paths)) in &denied.hosts {
        let key = groups.get(host).cloned().unwrap_or_else(|| host.clone());
        let entry = pooled.entry(key).or_default();
        entry.0.extend(ports);
        for (p, ms) in paths {
            entry
                .1
                .entry(p.clone())
                .or_default()
                .extend(ms.iter().cloned());
        }
    }
    let mut caps = Vec::new();
    for (host, (ports, paths)) in pooled {
        // One capability per set of methods.
        let mut by_methods: BTreeMap<BTreeSet<String>, BTreeSet<String>> = BTreeMap::new();
        for (p, ms) in paths {
            by_methods.entry(ms).or_default().insert(p);
        }
        for (methods, paths) in by_methods {
            caps.push(CapabilitySpec {
                name: name_for(&host, taken),
                destinations: vec![DestinationSpec {
                    host: Some(host.clone()),
                    cidr: None,
                    ports: ports.iter().copied().collect(),
                }],
                http: Some(HttpRuleSpec {
                    methods: methods.into_iter().collect(),
                    paths: path_globs(&paths),
                }),
                ..CapabilitySpec::default()
            });
        }
    }
    caps
}

/// `cellgate advise`.
///
/// # Errors
/// Unreadable files, a manifest that does not parse, a draft that does not validate.
pub fn run(args: AdviseArgs) -> anyhow::Result<ExitCode> {
    let manifest = match &args.file {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let cell = cellgate_api::manifest::parse_agent_cell(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
                .to_model()
                .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            Some((text, cell))
        }
        None => None,
    };
    let mut cells: BTreeMap<String, Denied> = BTreeMap::new();
    let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
    for file in &args.files {
        if let Err(e) = cellgate_audit::verify_path(file) {
            if matches!(e, cellgate_audit::VerifyError::Io { .. }) {
                anyhow::bail!("{e}");
            }
            if !args.no_verify {
                println!(
                    "{}: {e}; not advising from an audit log that does not verify (--no-verify to read it anyway)",
                    file.display()
                );
                return Ok(ExitCode::from(1));
            }
            eprintln!("{}: chain NOT verified: {e}", file.display());
        }
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(rec) = serde_json::from_str::<Record>(line) else {
                *skipped.entry("unreadable record".into()).or_default() += 1;
                continue;
            };
            if rec.decision != Decision::Deny || !ADVISED_REASONS.contains(&rec.reason.as_str()) {
                continue;
            }
            let (Some(ns), Some(name), Some(host), Some(method), Some(path), Some(port)) = (
                rec.namespace.as_deref(),
                rec.cell.as_deref(),
                rec.host.as_deref(),
                rec.method.as_deref(),
                rec.path.as_deref(),
                port_of(&rec),
            ) else {
                *skipped
                    .entry(format!(
                        "{} denial without host, method or path",
                        rec.protocol
                    ))
                    .or_default() += 1;
                continue;
            };
            if !matches!(rec.protocol.as_str(), "http" | "https") {
                *skipped
                    .entry(format!(
                        "{} denial (write tls/tcp capabilities by hand)",
                        rec.protocol
                    ))
                    .or_default() += 1;
                continue;
            }
            if path.contains('*') || rec.withheld.iter().any(|w| w == "path") {
                *skipped
                    .entry("path a glob cannot name literally (or redacted)".into())
                    .or_default() += 1;
                continue;
            }
            let key = format!("{ns}/{name}");
            if let Some((_, cell)) = &manifest {
                if key != format!("{}/{}", cell.namespace, cell.name) {
                    continue;
                }
            }
            let d = cells.entry(key).or_default();
            d.requests += 1;
            let h = d.hosts.entry(host.to_owned()).or_default();
            h.0.insert(port);
            h.1.entry(path.to_owned())
                .or_default()
                .insert(method.to_ascii_uppercase());
        }
    }
    let mut out = String::new();
    let total: u64 = cells.values().map(|d| d.requests).sum();
    let _ = writeln!(
        out,
        "# Drafted by `cellgate advise` from {total} denied request(s); review before applying.\n# Nothing was applied."
    );
    for (why, n) in &skipped {
        let _ = writeln!(out, "# not advised: {n} {why}");
    }
    match manifest {
        Some((text, cell)) => {
            let key = format!("{}/{}", cell.namespace, cell.name);
            let mut taken: BTreeSet<String> =
                cell.capabilities.iter().map(|c| c.name.clone()).collect();
            let caps = cells
                .get(&key)
                .map(|d| draft(d, &mut taken))
                .unwrap_or_default();
            let mut doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
            let list = doc
                .get_mut("spec")
                .and_then(|s| s.as_mapping_mut())
                .context("the manifest has no spec")?
                .entry("capabilities".into())
                .or_insert_with(|| serde_yaml::Value::Sequence(Vec::new()));
            let serde_yaml::Value::Sequence(list) = list else {
                anyhow::bail!("spec.capabilities is not a list");
            };
            for c in &caps {
                list.push(serde_yaml::to_value(c)?);
            }
            let merged = serde_yaml::to_string(&doc)?;
            // The draft must be a manifest the node accepts.
            cellgate_api::manifest::parse_agent_cell(&merged)
                .and_then(|m| m.to_model())
                .map_err(|e| anyhow::anyhow!("the drafted manifest does not validate: {e}"))?;
            let _ = writeln!(out, "# {} capability(ies) added to {key}", caps.len());
            out.push_str(&merged);
        }
        None => {
            #[derive(serde::Serialize)]
            struct Patch {
                cell: String,
                capabilities: Vec<CapabilitySpec>,
            }
            let patches: Vec<Patch> = cells
                .iter()
                .map(|(k, d)| Patch {
                    cell: k.clone(),
                    capabilities: draft(d, &mut BTreeSet::new()),
                })
                .collect();
            out.push_str(&serde_yaml::to_string(&patches)?);
        }
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn paths_widen_only_with_enough_siblings() {
        assert_eq!(
            path_globs(&set(&["/repos/a/issues", "/repos/b/issues"])),
            ["/repos/a/issues", "/repos/b/issues"]
        );
        assert_eq!(
            path_globs(&set(&["/u/a", "/u/b", "/u/c", "/other"])),
            ["/other", "/u/*"]
        );
        assert_eq!(
            path_globs(&set(&[
                "/repos/a/issues",
                "/repos/b/issues",
                "/repos/c/issues",
                "/repos/a/pulls"
            ])),
            ["/repos/*/issues", "/repos/a/pulls"]
        );
        assert_eq!(
            path_globs(&set(&["/v1/x/1", "/v1/x/2/y", "/v1/x/3/z/w", "/v2/q"])),
            ["/v1/x/**", "/v2/q"]
        );
    }

    #[test]
    fn hosts_widen_only_with_enough_siblings_under_a_real_parent() {
        let g = host_groups(&set(&["a.x.io", "b.x.io", "c.x.io", "api.github.com"]));
        assert!(g.values().all(|v| !v.starts_with('*')));
        let g = host_groups(&set(&[
            "a.x.io", "b.x.io", "c.x.io", "d.x.io", "e.com", "f.com", "g.com", "h.com",
        ]));
        assert_eq!(g["a.x.io"], "*.x.io");
        assert_eq!(g["e.com"], "e.com");
    }

    #[test]
    fn names_are_labels_and_unique() {
        let mut taken = set(&["advised-api-github-com"]);
        assert_eq!(
            name_for("api.github.com", &mut taken),
            "advised-api-github-com-2"
        );
        let long = format!("{}.example.com", "a".repeat(100));
        assert!(name_for(&long, &mut taken).len() <= MAX_NAME_LEN);
        assert_eq!(name_for("*.x.io", &mut taken), "advised-any-x-io");
    }
}
