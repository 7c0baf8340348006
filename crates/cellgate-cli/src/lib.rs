//! `cellgate`: the command line for operators and developers.
//!
//! - `cellgate keys init --out DIR`: an Ed25519 signing key (`signing.key`, 0600) and its public
//!   half with a key id (`signing.pub`).
//! - `cellgate token issue --key FILE --cell CELL.yaml --ttl 10m [--bind ADDR]`: a cell token.
//! - `cellgate keys jwks FILE...`: one JWK set of the keys in the given `signing.pub` files (a
//!   node's trust during a signing key rotation).
//! - `cellgate ca init --out DIR`: the CA the node mints leaf certificates with.
//! - `cellgate ca rotate [--grace 24h] [--force]`, `cellgate ca status`: a rotation of a
//!   cluster's interception CA, run by the operator (see [`kubectl_ca`]).
//! - `cellgate audit verify FILE [--anchors FILE --anchor-key PUBKEY]`: proves an audit log
//!   untouched, or names the first bad record; with anchors, also that it was neither cut nor
//!   rewritten since they were signed.
//! - `cellgate run -f CELL.yaml -- COMMAND`: local mode (see [`run`]).
//! - `cellgate crd`: the CustomResourceDefinitions, as committed under `deploy/crds/`.
//! - `cellgate lockdown on|off --reason TEXT [-n NS]`: the kill switch of a running node, through
//!   its admin API (see [`admin`]).
//! - `cellgate approvals`, `cellgate approve ID [--for 10m] [--uses 1]`, `cellgate deny ID --reason
//!   TEXT`: requests held for a human on a running node (local mode).
//! - `cellgate policy replay --policies DIR [--cells DIR] [--max-new-denials N] AUDIT...`:
//!   re-decides recorded requests with a draft policy (see [`replay`]).
//! - `cellgate policy test DIR`: a pack's Rego tests and YAML cases, pass/fail (see [`policy`]).
//! - `cellgate explain -f CELL.yaml [--policies DIR] METHOD URL`: the decision on a request,
//!   its capability and each layer's verdict and rule (see [`explain`]).
//! - `cellgate advise AUDIT... [-f CELL.yaml]`: drafts the capabilities that would grant the
//!   denied requests of audit logs, as YAML to review (see [`advise`]); applies nothing.
//! - `cellgate policy history|rollback|promote NAME [-n NS | --cluster]`: the versions of a
//!   policy pack in a cluster, going back to one, switching a shadow pack to enforce after a
//!   replay of the recent audit (see [`kubectl_policy`]).
//! - `cellgate status|revoke|suspend|resume|audit CELL`: a cluster's cells (see [`kubectl`]); the
//!   same binary installed as `kubectl-cellgate` is the plugin `kubectl cellgate`.
//!
//! Exit codes: 0 success, 1 a check failed (e.g. a tampered log), 2 usage or input errors.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

pub mod admin;
pub mod advise;
pub mod explain;
pub mod kubectl;
pub mod kubectl_ca;
pub mod kubectl_policy;
pub mod policy;
pub mod replay;
mod run;

#[derive(Debug, Parser)]
#[command(
    name = "cellgate",
    version,
    about = "Cellgate: the governance boundary for AI agents."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Signing keys for cell tokens.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Cell tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The certificate authority for TLS interception: `ca init` (a CA on disk), `ca rotate` and
    /// `ca status` (a cluster's CA rotation).
    #[command(subcommand)]
    Ca(CaCmd),
    /// The audit log: `audit verify FILE`, `audit CELL` for a cell's recent decisions in a cluster, or `audit -A --since 1h --decision deny` across every node through the control API.
    Audit(AuditCommand),
    /// Runs a command inside a cell on this machine: the same boundary and manifest as in a cluster (needs root).
    Run(run::RunArgs),
    /// Prints the CustomResourceDefinitions (YAML) for `kubectl apply -f -`.
    Crd,
    /// Shows cells in the cluster: all in the namespace, or one in detail.
    Status(kubectl::StatusArgs),
    /// Removes a capability from a cell (edits the AgentCell) and waits until the node enforces it.
    Revoke(kubectl::RevokeArgs),
    /// Suspends a cell: every request it makes is denied, at once; the pod keeps running.
    Suspend(kubectl::CellArgs),
    /// Resumes a suspended cell.
    Resume(kubectl::CellArgs),
    /// The kill switch of a running node (local mode): `lockdown on|off --reason TEXT [-n NS]`.
    Lockdown(admin::LockdownArgs),
    /// Requests waiting for a human's approval on a running node (local mode).
    Approvals(admin::AdminArgs),
    /// Approves a waiting request: `approve ID [--for 10m] [--uses 1]`.
    Approve(admin::ApproveArgs),
    /// Denies a waiting request: `deny ID --reason TEXT`.
    Deny(admin::DenyArgs),
    /// Drafts capabilities (YAML, for review; never applied) that would grant the requests the
    /// audit logs show denied: `advise AUDIT... [-f CELL.yaml]`.
    Advise(advise::AdviseArgs),
    /// Policy tools: `policy replay` re-decides recorded requests with a draft policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Explains the decision on a request of a cell: capability, each layer's verdict and rule.
    Explain(explain::ExplainArgs),
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Re-decides the requests of audit logs with a draft policy: would-allow and would-deny
    /// counts, the decisions that change, and what could not be re-decided.
    Replay(replay::ReplayArgs),
    /// Runs the Rego tests and YAML cases of a pack (or a directory of packs): a pass/fail
    /// table, exit 1 on any failure.
    Test(policy::TestArgs),
    /// The accepted versions of a CellgatePolicy (or, with --cluster, a CellgateClusterPolicy)
    /// in a cluster, the one in force marked.
    History(kubectl_policy::HistoryArgs),
    /// Re-applies the spec of an accepted version (from its snapshot) with server-side apply;
    /// the operator validates it and records it as a new version.
    Rollback(kubectl_policy::RollbackArgs),
    /// Replays the recent audit with a shadow pack enforcing, prints the report, then (after
    /// confirmation, or --yes) sets its spec.mode to enforce.
    Promote(kubectl_policy::PromoteArgs),
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Writes signing.key (mode 0600) and signing.pub (JWK with key id) into DIR.
    Init {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Prints one JWK set (`{"keys":[...]}`) of the public keys in the given signing.pub files:
    /// what a node's --trust file holds while the signing key rotates (the old and the new key).
    Jwks {
        /// signing.pub files (a JWK or a JWK set each).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Prints an EdDSA JWT for the cell in CELL.yaml.
    Issue {
        /// signing.key from `cellgate keys init`.
        #[arg(long)]
        key: PathBuf,
        /// The AgentCell manifest.
        #[arg(long)]
        cell: PathBuf,
        /// Lifetime, e.g. 10m, 1h.
        #[arg(long, default_value = "10m")]
        ttl: String,
        /// Pod address the token is bound to.
        #[arg(long)]
        bind: Option<IpAddr>,
        /// Issuer claim.
        #[arg(long, default_value = cellgate_identity::token::LOCAL_ISSUER)]
        issuer: String,
        /// Print the claims as JSON on stderr too.
        #[arg(long)]
        verbose: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CaCmd {
    /// Writes ca.crt and ca.key (mode 0600) into DIR.
    Init {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "Cellgate CA")]
        name: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Starts a rotation of the cluster's interception CA: the operator introduces a new CA in
    /// every cell's bundle and every node, switches the nodes to it once all have it, and removes
    /// the old one after the grace period. No agent restarts.
    Rotate(kubectl_ca::RotateArgs),
    /// Shows the cluster's CA rotation: phase, CAs with fingerprints and expiry, which node has
    /// which, and what the operator waits for.
    Status(kubectl_ca::StatusArgs),
}

/// `audit`: either `audit verify FILE` or `audit CELL` (a cell's recent decisions from its node).
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AuditCommand {
    #[command(subcommand)]
    command: Option<AuditCmd>,
    #[command(flatten)]
    cell: kubectl::AuditArgs,
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Verifies the hash chain: prints `N records intact` (exit 0) or the first bad record (exit 1).
    ///
    /// With --anchors, also checks the log against anchors the node signed (keep a copy away
    /// from the node: `<log>.anchors`, or what the exporter sent): every anchor's signature,
    /// then the first record they contradict, or the cut.
    Verify {
        /// The audit log (JSON lines).
        file: PathBuf,
        /// Signed anchors of the chain head (JSON lines, as in `<log>.anchors`).
        #[arg(long, requires = "anchor_key")]
        anchors: Option<PathBuf>,
        /// The anchor key's public half: the signing.pub (JWK) of `cellgate keys init`, or a PEM PUBLIC KEY.
        #[arg(long, requires = "anchors")]
        anchor_key: Option<PathBuf>,
    },
}

/// The command line definition of `cellgate` (and `kubectl cellgate`): for checking command
/// lines without running them, e.g. those the documentation shows.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Entry point of both `cellgate` and `kubectl-cellgate`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cellgate: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keys(KeysCmd::Init { out }) => {
            let key = cellgate_identity::SigningKey::generate()?;
            let (k, p) = key.write_pair(&out)?;
            println!(
                "wrote {} (private, mode 0600) and {} (key id {})",
                k.display(),
                p.display(),
                key.kid()
            );
        }
        Command::Keys(KeysCmd::Jwks { files }) => {
            print!("{}", jwks(&files)?);
        }
        Command::Token(TokenCmd::Issue {
            key,
            cell,
            ttl,
            bind,
            issuer,
            verbose,
        }) => {
            let key = cellgate_identity::SigningKey::load(&key)?;
            let text = std::fs::read_to_string(&cell)
                .with_context(|| format!("reading {}", cell.display()))?;
            let manifest = cellgate_api::manifest::parse_agent_cell(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", cell.display()))?;
            let model = manifest
                .to_model()
                .map_err(|e| anyhow::anyhow!("{}: {e}", cell.display()))?;
            let ttl = humantime::parse_duration(&ttl)
                .with_context(|| format!("--ttl {ttl:?}: expected a duration like 10m"))?;
            if ttl.as_secs() == 0 {
                bail!("--ttl must be at least one second");
            }
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
            let claims = cellgate_identity::Claims::for_cell(
                &issuer,
                &model.uid,
                &model.namespace,
                &model.name,
                model.role.as_deref(),
                now,
                ttl.as_secs() as i64,
                bind,
            );
            let token =
                cellgate_identity::token::issue(&key, &claims).map_err(anyhow::Error::msg)?;
            if verbose {
                eprintln!("{}", serde_json_string(&claims));
            }
            println!("{token}");
        }
        Command::Ca(CaCmd::Init { out, name, force }) => {
            let files = cellgate_tls::ca::init(&out, &name, force)?;
            println!(
                "wrote {} and {} (private, mode 0600)",
                files.cert.display(),
                files.key.display()
            );
        }
        Command::Ca(CaCmd::Rotate(args)) => return kubectl::block_on(kubectl_ca::rotate(args)),
        Command::Ca(CaCmd::Status(args)) => return kubectl::block_on(kubectl_ca::status(args)),
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            return rt.block_on(run::run(args));
        }
        Command::Crd => {
            print!("{}", cellgate_api::crd::crds_yaml()?);
        }
        Command::Status(args) => return kubectl::block_on(kubectl::status(args)),
        Command::Lockdown(args) => return kubectl::block_on(admin::lockdown(args)),
        Command::Approvals(args) => return kubectl::block_on(admin::approvals(args)),
        Command::Approve(a) => {
            let body =
                serde_json::json!({"decision": "approve", "for": a.valid_for, "uses": a.uses});
            return kubectl::block_on(admin::decide(&a.id, &a.admin, body));
        }
        Command::Deny(a) => {
            let body = serde_json::json!({"decision": "deny", "reason": a.reason});
            return kubectl::block_on(admin::decide(&a.id, &a.admin, body));
        }
        Command::Policy(PolicyCmd::Replay(args)) => return replay::run(args),
        Command::Policy(PolicyCmd::Test(args)) => return policy::run(args),
        Command::Policy(PolicyCmd::History(args)) => {
            return kubectl::block_on(kubectl_policy::history(args))
        }
        Command::Policy(PolicyCmd::Rollback(args)) => {
            return kubectl::block_on(kubectl_policy::rollback_cmd(args))
        }
        Command::Policy(PolicyCmd::Promote(args)) => {
            return kubectl::block_on(kubectl_policy::promote(args))
        }
        Command::Explain(args) => return explain::run(args),
        Command::Advise(args) => return advise::run(args),
        Command::Revoke(args) => return kubectl::block_on(kubectl::revoke(args)),
        Command::Suspend(args) => return kubectl::block_on(kubectl::suspend(args, true)),
        Command::Resume(args) => return kubectl::block_on(kubectl::suspend(args, false)),
        Command::Audit(AuditCommand {
            command: None,
            cell,
        }) => {
            return kubectl::block_on(kubectl::audit(cell));
        }
        Command::Audit(AuditCommand {
            command:
                Some(AuditCmd::Verify {
                    file,
                    anchors: Some(anchors),
                    anchor_key: Some(key),
                }),
            ..
        }) => {
            let key = cellgate_audit::AnchorPublicKey::load(&key)?;
            return Ok(
                match cellgate_audit::verify_anchored(&file, &anchors, &key) {
                    Ok(r) => {
                        println!(
                            "{} records intact, {} anchors agree, last anchored record {}",
                            r.log.records, r.anchors, r.last_anchored
                        );
                        ExitCode::SUCCESS
                    }
                    Err(cellgate_audit::AnchorError::Io { path, source }) => {
                        anyhow::bail!("cannot read {}: {source}", path.display())
                    }
                    Err(e) => {
                        println!("{}: {e}", file.display());
                        ExitCode::from(1)
                    }
                },
            );
        }
        Command::Audit(AuditCommand {
            command: Some(AuditCmd::Verify { file, .. }),
            ..
        }) => {
            return Ok(match cellgate_audit::verify_path(&file) {
                Ok(report) => {
                    println!("{} records intact", report.records);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("{}: {e}", file.display());
                    ExitCode::from(1)
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One JWK set of every key in `files`, each key once (by key id), in the order given.
fn jwks(files: &[PathBuf]) -> anyhow::Result<String> {
    let mut keys: Vec<cellgate_identity::PublicKey> = Vec::new();
    for f in files {
        for k in cellgate_identity::PublicKey::load_all(f)? {
            if !keys.iter().any(|have| have.kid == k.kid) {
                keys.push(k);
            }
        }
    }
    let set: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| serde_json::from_str(&k.to_jwk_json()))
        .collect::<Result<_, _>>()?;
    Ok(format!("{}\n", serde_json::json!({ "keys": set })))
}

fn serde_json_string(c: &cellgate_identity::Claims) -> String {
    format!(
        "{{\"sub\":\"{}\",\"jti\":\"{}\",\"exp\":{},\"pod_addr\":{:?}}}",
        c.sub, c.jti, c.exp, c.pod_addr
    )
}
