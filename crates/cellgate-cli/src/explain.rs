//! `cellgate explain -f CELL.yaml [--policies DIR] METHOD URL`: the decision a request of the
//! cell would get, with the capability that granted or refused it and, per layer (cluster,
//! namespace, role, cell), the verdict and the rules (`file:line`) that produced it. Decided
//! with the same compiled set the node would serve ([`cellgate_policy::PolicySet::explain`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use cellgate_api::policy::{AddrDoc, CellDoc, IdentityDoc, InputDoc, RequestDoc, INPUT_VERSION};
use cellgate_policy::{Explanation, PolicySet};

/// `cellgate explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The AgentCell manifest.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Policy packs (a pack, or a directory of packs), as the node's --policies.
    #[arg(long)]
    pub policies: Vec<PathBuf>,
    /// Base policy directory; the base policy built into the binary when absent.
    #[arg(long)]
    pub base_policy: Option<PathBuf>,
    /// The address the agent dialled (what CIDR destinations match); the host itself when it
    /// is an address literal, none otherwise.
    #[arg(long)]
    pub address: Option<std::net::IpAddr>,
    /// Print the explanation as JSON.
    #[arg(long)]
    pub json: bool,
    /// The HTTP method, e.g. GET.
    pub method: String,
    /// The URL, e.g. https://api.github.com/repos/a/b.
    pub url: String,
}

/// The input document of the request, as the node would build it on its intake.
///
/// # Errors
///
/// A manifest that does not parse, a URL that is not absolute http(s), a path the node would
/// refuse.
pub fn input(args: &ExplainArgs) -> anyhow::Result<InputDoc> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let cell = cellgate_api::manifest::parse_agent_cell(&text)
        .and_then(|m| m.to_model())
        .map_err(|e| anyhow!("{}: {e}", args.file.display()))?;
    let uri: http::Uri = args
        .url
        .parse()
        .with_context(|| format!("{:?} is not a URL", args.url))?;
    let protocol = match uri.scheme_str() {
        Some("https") => "https",
        Some("http") => "http",
        _ => bail!(
            "{:?}: the URL must start with https:// or http://",
            args.url
        ),
    };
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("{:?} names no host", args.url))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let port = uri
        .port_u16()
        .unwrap_or(if protocol == "https" { 443 } else { 80 });
    let raw_path = if uri.path().is_empty() {
        "/"
    } else {
        uri.path()
    };
    let path = cellgate_api::path::canonicalize(raw_path)
        .map_err(|e| anyhow!("the node refuses the path {raw_path:?}: {e}"))?
        .into_owned();
    let address = args
        .address
        .map(|a| a.to_string())
        .or_else(|| host.parse::<std::net::IpAddr>().ok().map(|a| a.to_string()))
        .unwrap_or_default();
    let time_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Ok(InputDoc {
        version: INPUT_VERSION.into(),
        time_ns,
        front_door: "intake".into(),
        source: AddrDoc {
            address: "0.0.0.0".into(),
            port: 0,
        },
        identity: IdentityDoc {
            jti: "explain".into(),
            cell_uid: cell.uid.clone(),
            namespace: cell.namespace.clone(),
            name: cell.name.clone(),
            role: cell.role.clone(),
        },
        cell: CellDoc::from_model(&cell),
        request: RequestDoc {
            protocol: protocol.into(),
            sni: (protocol == "https").then(|| host.clone()),
            host: Some(host),
            port,
            method: Some(args.method.to_ascii_uppercase()),
            path: Some(path),
            query: uri.query().map(str::to_owned),
            headers: Default::default(),
            destination: AddrDoc { address, port },
            dns_type: None,
            json: None,
        },
    })
}

/// Runs `cellgate explain`: exit 0 whatever the decision (2 when the input or the policy
/// cannot be read).
///
/// # Errors
///
/// An unreadable manifest or policy, a policy that does not load or evaluate.
pub fn run(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let input = input(&args)?;
    let files = crate::policy::load_files(args.base_policy.as_deref(), &args.policies)?;
    let set = PolicySet::from_files(files).map_err(|e| anyhow!("policy refused: {e}"))?;
    let x = set.explain(&input)?;
    if args.json {
        let packs = set.packs();
        let body = serde_json::json!({
            "request": {
                "method": input.request.method,
                "url": args.url,
                "cell": format!("{}/{}", input.cell.namespace, input.cell.name),
            },
            "explanation": x,
            "packs": packs,
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", text(&set, &input, &x));
    }
    Ok(ExitCode::SUCCESS)
}

fn text(set: &PolicySet, input: &InputDoc, x: &Explanation) -> String {
    let d = &x.decision;
    let r = &input.request;
    let mut out = format!(
        "request     {} {}://{}:{}{}\ncell        {}/{}{}\n",
        r.method.as_deref().unwrap_or("-"),
        r.protocol,
        r.host.as_deref().unwrap_or("-"),
        r.port,
        r.path.as_deref().unwrap_or(""),
        input.cell.namespace,
        input.cell.name,
        input
            .cell
            .role
            .as_deref()
            .map(|r| format!(" (role {r})"))
            .unwrap_or_default(),
    );
    out.push_str(&format!("decision    {} ({})\n", d.outcome, d.reason));
    let cap = match (&d.capability, d.outcome.as_str()) {
        (None, _) => "none reaches this destination".to_owned(),
        (Some(c), "allow") => format!("{c} ({}) grants", d.mode.as_deref().unwrap_or("-")),
        (Some(c), _) if d.reason == "allowed" => format!("{c} grants"),
        (Some(c), _)
            if matches!(
                d.reason.as_str(),
                "http_rule_mismatch"
                    | "port_not_allowed"
                    | "tls_passthrough_required"
                    | "tcp_capability_required"
            ) =>
        {
            format!(
                "{c} ({}) reaches it but refuses",
                d.mode.as_deref().unwrap_or("-")
            )
        }
        (Some(c), _) => format!(
            "{c} ({}) would grant; a layer refuses",
            d.mode.as_deref().unwrap_or("-")
        ),
    };
    out.push_str(&format!("capability  {cap}\n"));
    for m in &d.reasons {
        out.push_str(&format!("reason      {m}\n"));
    }
    let packs: Vec<String> = set
        .packs()
        .iter()
        .map(|p| format!("{}@{} ({})", p.name, p.version, p.mode))
        .collect();
    out.push_str(&format!(
        "policy      {}: {}\n\nlayer       verdict      rule\n",
        x.policy_version,
        packs.join(", ")
    ));
    for l in &x.layers {
        let hits: Vec<_> = l.rules.iter().filter_map(|&i| x.rules.get(i)).collect();
        if hits.is_empty() {
            out.push_str(&format!("{:<10}  {:<11}  -\n", l.layer.as_str(), l.verdict));
        }
        for (n, h) in hits.iter().enumerate() {
            let (layer, verdict) = if n == 0 {
                (l.layer.as_str(), l.verdict)
            } else {
                ("", "")
            };
            let at = if h.line == 0 {
                h.file.display().to_string()
            } else {
                format!("{}:{}", h.file.display(), h.line)
            };
            out.push_str(&format!(
                "{layer:<10}  {verdict:<11}  {} {} ({}, pack {}): {}\n",
                h.rule,
                at,
                match h.effect {
                    cellgate_policy::PackEffect::Deny => "deny",
                    cellgate_policy::PackEffect::ShadowDeny => "shadow",
                },
                h.pack,
                h.messages.join("; ")
            ));
        }
    }
    out
}
