//! `cellgate run -f CELL.yaml -- COMMAND`: local mode, the same boundary as in a cluster.
//!
//! One run: a network namespace with a veth pair to the host; `cellgate-init` rules inside it;
//! the tagger inside, as its own user, holding the cell's token; the node outside (in this
//! process) with its DNS listener; a fresh CA and signing key; a trust bundle and the environment
//! common clients read; then COMMAND inside as an unprivileged user. Everything is torn down on
//! exit, Ctrl-C and SIGTERM, and a new run removes what a crashed run left.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};

/// Where runs keep their state (and pid, so a later run can clean up after a crashed one).
const STATE_ROOT: &str = "/run/cellgate";
/// Prefix of the namespaces runs create.
const NS_PREFIX: &str = "cgrun-";
/// The tagger's user id inside the cell (no login, no home).
const TAGGER_UID: u32 = 15006;
/// The tagger's port inside the cell.
const TAGGER_PORT: u16 = 15006;
/// Intake port of the node on the host side of the link.
const INTAKE_PORT: u16 = 15001;

/// Options of `cellgate run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The AgentCell manifest (the file `kubectl apply` takes).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Directory of secrets for `credential.file` capabilities.
    #[arg(long)]
    pub secrets: Option<PathBuf>,
    /// Audit log [default: ./cellgate-audit.jsonl]
    #[arg(long)]
    pub audit: Option<PathBuf>,
    /// Extra CA for upstream TLS; repeatable.
    #[arg(long = "upstream-ca")]
    pub upstream_ca: Vec<PathBuf>,
    /// HOST:PORT:ADDR pins a name to an address; repeatable.
    #[arg(long = "resolve")]
    pub resolve: Vec<String>,
    /// The user COMMAND runs as [default: nobody]
    #[arg(long = "as-user")]
    pub as_user: Option<String>,
    /// Extra Rego policy packs.
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// The node's admin API (for `cellgate lockdown`, `approvals`, `approve`, `deny`); when the
    /// default port is taken, any free port (the run prints which).
    #[arg(long, default_value = crate::admin::DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// Resolves `NAME` or `UID` to (uid, gid) from /etc/passwd.
fn lookup_user(spec: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && (f[0] == spec || f[2] == spec) {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    match spec.parse::<u32>() {
        Ok(uid) => Ok((uid, uid)),
        Err(_) => bail!("--as-user {spec:?}: no such user"),
    }
}

async fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces, links and state left by runs whose process is gone.
async fn clean_stale() {
    let Ok(list) = sh("ip", &["netns", "list"]).await else {
        return;
    };
    for name in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NS_PREFIX))
    {
        let pid = std::fs::read_to_string(Path::new(STATE_ROOT).join(name).join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if pid.is_some_and(pid_alive) {
            continue;
        }
        eprintln!("cellgate: removing {name}, left by a run that did not finish");
        teardown_ns(name).await;
    }
}

async fn teardown_ns(name: &str) {
    if let Ok(pids) = sh("ip", &["netns", "pids", name]).await {
        for p in pids.split_whitespace() {
            let _ = sh("kill", &["-KILL", p]).await;
        }
    }
    let _ = sh("ip", &["netns", "del", name]).await;
    let _ = sh("ip", &["link", "del", &host_veth(name)]).await;
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
    let _ = std::fs::remove_dir_all(Path::new(STATE_ROOT).join(name));
}

fn host_veth(name: &str) -> String {
    format!("cgh{}", name.trim_start_matches(NS_PREFIX))
}

fn cell_veth(name: &str) -> String {
    format!("cgc{}", name.trim_start_matches(NS_PREFIX))
}

fn sibling(bin: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .map(|d| d.join(bin))
        .unwrap_or_else(|| PathBuf::from(bin));
    if !p.exists() {
        bail!(
            "{} not found next to {}; build every binary (cargo build --bins)",
            p.display(),
            exe.display()
        );
    }
    Ok(p)
}

/// Writes the trust bundle (`cellgate_tls::trust`: the system roots plus the cell's CA) in every
/// form common clients read, and returns the environment that points them at it: the PEM bundle
/// for [`BUNDLE_ENV_VARS`](cellgate_tls::trust::BUNDLE_ENV_VARS), a hashed directory for
/// `SSL_CERT_DIR`, and a PKCS#12 trust store for `JAVA_TOOL_OPTIONS`. The operator builds the same
/// bundle and store for pods.
fn trust_env(dir: &Path, ca_pem: &str) -> anyhow::Result<BTreeMap<String, String>> {
    use cellgate_tls::trust;
    std::fs::create_dir_all(dir.join("certs"))?;
    let system = trust::SYSTEM_ROOTS_CANDIDATES
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|text| (*p, text)));
    let bundle = match &system {
        Some((path, text)) => cellgate_tls::TrustBundle::new(ca_pem, Some(text))
            .with_context(|| format!("building the cell's trust bundle from {path}"))?,
        None => {
            eprintln!(
                "cellgate: no system roots found ({}): the cell trusts its own CA only",
                trust::SYSTEM_ROOTS_CANDIDATES.join(", ")
            );
            cellgate_tls::TrustBundle::new(ca_pem, None)
                .context("building the cell's trust bundle")?
        }
    };
    let bundle_file = dir.join("ca-bundle.pem");
    std::fs::write(&bundle_file, bundle.pem())?;
    std::fs::write(dir.join("cellgate-ca.pem"), ca_pem)?;
    std::fs::write(dir.join("certs/cellgate-ca.pem"), ca_pem)?;
    // OpenSSL's SSL_CERT_DIR wants subject-hash links.
    let _ = std::process::Command::new("openssl")
        .args(["rehash"])
        .arg(dir.join("certs"))
        .stderr(Stdio::null())
        .status();
    let store = dir.join("truststore.p12");
    std::fs::write(&store, bundle.pkcs12())?;
    let b = bundle_file.display().to_string();
    let mut env: BTreeMap<String, String> = trust::BUNDLE_ENV_VARS
        .iter()
        .map(|k| (k.to_string(), b.clone()))
        .collect();
    env.insert(
        "SSL_CERT_DIR".into(),
        dir.join("certs").display().to_string(),
    );
    env.insert(
        trust::JAVA_TOOL_OPTIONS.into(),
        trust::java_tool_options(&store.display().to_string()),
    );
    for entry in walk(dir) {
        let mode = if entry.is_dir() { 0o755 } else { 0o644 };
        let _ = std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode));
    }
    Ok(env)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn chown(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}

/// Runs COMMAND in a cell. Returns its exit code.
///
/// # Errors
/// When the cell cannot be set up (not root, bad manifest, missing tools).
pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    if effective_uid() != 0 {
        bail!("cellgate run needs root: it creates a network namespace, a veth pair and iptables rules for the cell (try: sudo cellgate run ...)");
    }
    // From here on, SIGTERM and Ctrl-C never kill the run half-way: they are held until the
    // command runs (or set-up ends), then stop it, and the cell is torn down.
    use tokio::signal::unix::{signal, SignalKind};
    let mut sig_int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sig_term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let manifest = cellgate_api::manifest::parse_agent_cell(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let cell = manifest
        .to_model()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let (agent_uid, agent_gid) = lookup_user(args.as_user.as_deref().unwrap_or("nobody"))?;
    if agent_uid == 0 || agent_uid == TAGGER_UID {
        bail!("--as-user: the command must run as an unprivileged user other than the tagger's ({TAGGER_UID})");
    }
    let init_bin = sibling("cellgate-init")?;
    let tagger_bin = sibling("cellgate-tagger")?;
    clean_stale().await;

    let pid = std::process::id();
    let name = format!("{NS_PREFIX}{pid}");
    let state = Path::new(STATE_ROOT).join(&name);
    std::fs::create_dir_all(&state)?;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711))?;
    std::fs::write(state.join("pid"), pid.to_string())?;
    let guard = Teardown { name: name.clone() };

    // Addresses of the link: a /30 chosen from the pid, inside 10.203.0.0/16.
    let n = (pid % 16_000) as u16;
    let base = [10u8, 203, (n >> 6) as u8, ((n & 0x3f) << 2) as u8];
    let host_ip = Ipv4Addr::new(base[0], base[1], base[2], base[3] + 1);
    let cell_ip = Ipv4Addr::new(base[0], base[1], base[2], base[3] + 2);
    let (hv, cv) = (host_veth(&name), cell_veth(&name));
    sh("ip", &["netns", "add", &name]).await?;
    sh(
        "ip",
        &[
            "link", "add", &hv, "type", "veth", "peer", "name", &cv, "netns", &name,
        ],
    )
    .await?;
    sh("ip", &["addr", "add", &format!("{host_ip}/30"), "dev", &hv]).await?;
    sh("ip", &["link", "set", &hv, "up"]).await?;
    let in_ns = |a: &[&str]| {
        let mut v = vec!["netns", "exec", name.as_str()];
        v.extend_from_slice(a);
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    for cmd in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "addr", "add", &format!("{cell_ip}/30"), "dev", &cv],
        vec!["ip", "link", "set", &cv, "up"],
        vec!["ip", "route", "add", "default", "via", &host_ip.to_string()],
    ] {
        let a = in_ns(&cmd);
        sh("ip", &a.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    }
    std::fs::create_dir_all(Path::new("/etc/netns").join(&name))?;
    std::fs::write(
        Path::new("/etc/netns").join(&name).join("resolv.conf"),
        format!("nameserver {host_ip}\n"),
    )?;

    // Identity and the interception CA, fresh for this run.
    let keys = state.join("keys");
    let key = cellgate_identity::SigningKey::generate()?;
    key.write_pair(&keys)?;
    cellgate_tls::ca::init(
        &state.join("ca"),
        &format!("Cellgate local CA ({})", cell.key()),
        false,
    )?;
    let ca_pem = std::fs::read_to_string(state.join("ca/ca.crt"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let claims = cellgate_identity::Claims::for_cell(
        cellgate_identity::token::LOCAL_ISSUER,
        &cell.uid,
        &cell.namespace,
        &cell.name,
        cell.role.as_deref(),
        now,
        24 * 3600,
        Some(IpAddr::V4(cell_ip)),
    );
    let token = cellgate_identity::token::issue(&key, &claims).map_err(anyhow::Error::msg)?;
    let tagger_dir = state.join("tagger");
    std::fs::create_dir_all(&tagger_dir)?;
    std::fs::write(tagger_dir.join("token"), &token)?;
    std::fs::set_permissions(
        tagger_dir.join("token"),
        std::fs::Permissions::from_mode(0o400),
    )?;
    chown(&tagger_dir.join("token"), TAGGER_UID, TAGGER_UID)?;
    std::fs::set_permissions(&tagger_dir, std::fs::Permissions::from_mode(0o700))?;
    chown(&tagger_dir, TAGGER_UID, TAGGER_UID)?;
    let env = trust_env(&state.join("trust"), &ca_pem)?;

    // The node, on the host side of the link.
    let cells_dir = state.join("cells");
    std::fs::create_dir_all(&cells_dir)?;
    std::os::unix::fs::symlink(
        std::fs::canonicalize(&args.file)?,
        cells_dir.join("cell.yaml"),
    )?;
    let audit = args
        .audit
        .clone()
        .unwrap_or_else(|| PathBuf::from("cellgate-audit.jsonl"));
    let mut config = cellgate_node::NodeConfig::defaults();
    config.listen = SocketAddr::new(IpAddr::V4(host_ip), INTAKE_PORT);
    config.dns = Some(SocketAddr::new(IpAddr::V4(host_ip), 53));
    config.dns_loopback_as = Some(IpAddr::V4(host_ip));
    config.pods = vec![(
        IpAddr::V4(cell_ip),
        cell.namespace.clone(),
        cell.name.clone(),
    )];
    config.cells_dir = Some(cells_dir);
    config.policies_dir = args.policies.clone();
    config.secrets_dir = args.secrets.clone();
    config.ca_dir = Some(state.join("ca"));
    config.trust = vec![keys.join("signing.pub")];
    config.audit = audit.clone();
    config.upstream_ca = args.upstream_ca.clone();
    config.resolve = args
        .resolve
        .iter()
        .map(|r| cellgate_node::config::parse_resolve(r).map_err(anyhow::Error::msg))
        .collect::<Result<_, _>>()?;
    config.node_name = format!("local-{}", hostname());
    // The default admin port may be taken (another `cellgate run`, a node): then any free one,
    // printed below. An address given with --admin is used as given, or the run fails.
    config.admin = args.admin;
    config.admin_any_port_if_taken = args.admin.to_string() == crate::admin::DEFAULT_ADMIN;
    config.drain = Duration::from_secs(1);
    config.validate()?;
    let node = cellgate_node::run(config).await?;
    eprintln!(
        "cellgate: the node's admin API is on {} (cellgate approvals|approve|deny|lockdown --admin {})",
        node.admin_addr, node.admin_addr
    );
    let mut records = node.shared.audit.subscribe();
    let summary = std::sync::Arc::new(std::sync::Mutex::new(Summary::default()));
    let sink = summary.clone();
    let summary_task = tokio::spawn(async move {
        loop {
            match records.recv().await {
                Ok(r) => {
                    if r.reason == "approval_requested" {
                        let id = r
                            .reasons
                            .iter()
                            .find_map(|x| x.strip_prefix("approval_id="))
                            .unwrap_or("?");
                        eprintln!(
                            "cellgate: {} {}{} waits for approval {id} (capability {}): cellgate approve {id} | cellgate deny {id} --reason TEXT",
                            r.method.as_deref().unwrap_or(""),
                            r.host.as_deref().unwrap_or(""),
                            r.path.as_deref().unwrap_or(""),
                            r.capability.as_deref().unwrap_or(""),
                        );
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.add(&r);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("cellgate: the summary missed {n} records (the audit log has them)")
                }
                Err(_) => return,
            }
        }
    });

    // The boundary inside the cell.
    let dns = format!("{host_ip}:53");
    let node_addr = format!("{host_ip}:{INTAKE_PORT}");
    let tagger_uid = TAGGER_UID.to_string();
    let tagger_port = TAGGER_PORT.to_string();
    let init_args = in_ns(&[
        init_bin.to_str().unwrap_or_default(),
        "--tagger-uid",
        &tagger_uid,
        "--tagger-port",
        &tagger_port,
        "--node",
        &node_addr,
        "--dns",
        &dns,
        "--ipv6",
        "drop",
    ]);
    sh(
        "ip",
        &init_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await
    .context("applying the cell's egress rules")?;
    let listen = format!("127.0.0.1:{TAGGER_PORT}");
    let token_file = tagger_dir.join("token").display().to_string();
    let max_connections = tagger_max_connections(&cell, node.shared.ceilings()).to_string();
    let tagger_args = in_ns(&[
        "setpriv",
        "--reuid",
        &tagger_uid,
        "--regid",
        &tagger_uid,
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        tagger_bin.to_str().unwrap_or_default(),
        "--listen",
        &listen,
        "--node",
        &node_addr,
        "--token-file",
        &token_file,
        "--max-connections",
        &max_connections,
    ]);
    let mut tagger = tokio::process::Command::new("ip")
        .args(&tagger_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the tagger")?;
    wait_for_line(&mut tagger, "listening on")
        .await
        .context("the tagger did not start")?;

    // The command, as the agent.
    let agent_uid_s = agent_uid.to_string();
    let agent_gid_s = agent_gid.to_string();
    let mut cmd_args = in_ns(&[
        "setpriv",
        "--reuid",
        &agent_uid_s,
        "--regid",
        &agent_gid_s,
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]);
    cmd_args.extend(args.command.iter().cloned());
    let shown: String = args
        .command
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(60)
        .collect();
    eprintln!(
        "cellgate: cell {} ({} capabilities) at {cell_ip}; running `{shown}` as uid {agent_uid}",
        cell.key(),
        cell.capabilities.len()
    );
    let mut child = tokio::process::Command::new("ip")
        .args(&cmd_args)
        .envs(&env)
        .env("HOME", "/tmp")
        .kill_on_drop(true)
        .spawn()
        .context("starting the command")?;
    let code = wait_with_signals(&mut child, &mut sig_int, &mut sig_term).await;

    let _ = tagger.start_kill();
    let _ = node.shared.audit.flush().await;
    node.shutdown().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    summary_task.abort();
    drop(guard);
    teardown_ns(&name).await;
    if let Ok(s) = summary.lock() {
        s.print(&cell.key(), &audit);
    }
    Ok(code)
}

/// The tagger's `--max-connections`: the cell's connection ceiling as the node computes it for
/// its intake (`spec.limits.connections`, else the node's default), so both agree.
fn tagger_max_connections(
    cell: &cellgate_api::model::Cell,
    node_defaults: cellgate_node::limits::Ceilings,
) -> usize {
    cellgate_node::limits::Ceilings::of(cell, node_defaults).connections
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

async fn wait_for_line(child: &mut tokio::process::Child, needle: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(needle) {
                return Ok(());
            }
            eprintln!("cellgate-tagger: {line}");
        }
        bail!("it exited")
    })
    .await
    .context("timed out")?;
    // Keep forwarding the tagger's messages.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("cellgate-tagger: {line}");
        }
    });
    found
}

/// Waits for the command; Ctrl-C and SIGTERM are passed on, then it is killed after a grace period.
async fn wait_with_signals(
    child: &mut tokio::process::Child,
    int: &mut tokio::signal::unix::Signal,
    term: &mut tokio::signal::unix::Signal,
) -> ExitCode {
    let sig = tokio::select! {
        s = child.wait() => return exit_code(s.ok()),
        _ = int.recv() => "INT",
        _ = term.recv() => "TERM",
    };
    eprintln!("cellgate: SIG{sig}: stopping the command and tearing the cell down");
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .await;
    }
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(s) => exit_code(s.ok()),
        Err(_) => {
            let _ = child.kill().await;
            ExitCode::from(130)
        }
    }
}

fn exit_code(s: Option<std::process::ExitStatus>) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match s {
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
            (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
            _ => ExitCode::FAILURE,
        },
        None => ExitCode::FAILURE,
    }
}

/// Removes the cell if the run ends early (an error during set-up).
struct Teardown {
    name: String,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &host_veth(&name)])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&name));
        let _ = std::fs::remove_dir_all(Path::new(STATE_ROOT).join(&name));
    }
}

#[derive(Debug, Default)]
struct Summary {
    allowed: u64,
    denied: u64,
    shadow: u64,
    by_capability: BTreeMap<String, (u64, u64, u64)>,
    deny_reasons: BTreeMap<String, u64>,
    /// The last state of each budget seen in a record, by scope.
    budgets: BTreeMap<String, serde_json::Value>,
    lockdowns: Vec<String>,
}

/// One budget's state as a line: `requests 3/10, requestsPerWindow 1/2 (resets …)`.
fn budget_line(state: &serde_json::Value) -> String {
    let Some(m) = state.as_object() else {
        return state.to_string();
    };
    m.iter()
        .filter(|(k, _)| k.as_str() != "scope")
        .map(|(k, v)| {
            let get = |f: &str| {
                v.get(f)
                    .map(|x| x.to_string().trim_matches('"').to_string())
            };
            let mut s = match (get("used"), get("max")) {
                (Some(u), Some(m)) => format!("{k} {u}/{m}"),
                _ => k.clone(),
            };
            if let Some(at) = get("resets_at").filter(|a| a != "null") {
                s.push_str(&format!(" (resets {at})"));
            }
            if let Some(at) = get("ends_at") {
                s.push_str(&format!(" (ends {at})"));
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Summary {
    fn add(&mut self, r: &cellgate_audit::Record) {
        use cellgate_audit::Decision;
        if r.decision == Decision::Control && r.reason.starts_with("lockdown") {
            self.lockdowns
                .push(format!("{} ({})", r.reason, r.reasons.join("; ")));
            return;
        }
        for b in r
            .budget
            .as_ref()
            .and_then(|b| b.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(scope) = b.get("scope").and_then(|s| s.as_str()) {
                self.budgets.insert(scope.to_string(), b.clone());
            }
        }
        if matches!(
            r.reason.as_str(),
            "approval_requested"
                | "approval_granted"
                | "approval_rejected"
                | "llm_usage"
                | "llm_usage_unreadable"
        ) {
            // Events about a request, not decisions: the request has its own record.
            return;
        }
        let cap = r.capability.clone().unwrap_or_else(|| "(none)".into());
        let e = self.by_capability.entry(cap).or_default();
        match r.decision {
            Decision::Allow => {
                self.allowed += 1;
                e.0 += 1;
            }
            Decision::ShadowDeny => {
                self.shadow += 1;
                e.2 += 1;
            }
            Decision::Deny | Decision::Error | Decision::Approval | Decision::Control => {
                self.denied += 1;
                e.1 += 1;
                *self.deny_reasons.entry(r.reason.clone()).or_default() += 1;
            }
        }
    }

    fn print(&self, cell: &str, audit: &Path) {
        eprintln!(
            "cellgate: cell {cell}: {} allowed, {} denied, {} shadow-denied",
            self.allowed, self.denied, self.shadow
        );
        for (cap, (a, d, s)) in &self.by_capability {
            eprintln!("  {cap:<24} allowed {a:<5} denied {d:<5} shadow-denied {s}");
        }
        for (reason, n) in &self.deny_reasons {
            eprintln!("  denied {n} × {reason}");
        }
        for (scope, state) in &self.budgets {
            eprintln!("  budget {scope}: {}", budget_line(state));
        }
        for l in &self.lockdowns {
            eprintln!("  {l}");
        }
        eprintln!(
            "cellgate: audit log {} (check it: cellgate audit verify {})",
            audit.display(),
            audit.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(limits: &str) -> cellgate_api::model::Cell {
        let text = format!(
            "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {{name: triage, namespace: agents}}\nspec:\n  capabilities: []\n{limits}"
        );
        let manifest = cellgate_api::manifest::parse_agent_cell(&text).expect("manifest");
        manifest.to_model().expect("model")
    }

    #[test]
    fn the_tagger_gets_the_cells_connection_ceiling_or_the_nodes_default() {
        let defaults = cellgate_node::NodeConfig::defaults();
        let node = cellgate_node::limits::Ceilings {
            connections: defaults.cell_max_connections,
            requests_per_second: defaults.cell_requests_per_second,
        };
        assert_eq!(tagger_max_connections(&cell(""), node), 1024);
        assert_eq!(
            tagger_max_connections(&cell("  limits: {requestsPerSecond: 5}\n"), node),
            1024
        );
        assert_eq!(
            tagger_max_connections(&cell("  limits: {connections: 16}\n"), node),
            16
        );
    }
}
