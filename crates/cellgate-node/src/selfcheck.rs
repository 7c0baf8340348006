//! The enforcement self-check: each node proves, at an interval, that every cell on it is
//! governed, and says so in the AgentCell's `Governed` condition, a metric and the audit log.
//!
//! One probe ([`check`]): from inside the pod's network namespace (found under
//! `--self-check-netns-dir` as the one holding the pod's address, and entered by
//! [`probe::LocalProber`] in the node or by the `self-check-prober` beside it, [`prober`]), a
//! connection to the must-deny destination (`--self-check-target`, TEST-NET-1 by default) as an
//! ordinary user, carrying a line with a fresh nonce only the node knows. If the cell's rules
//! hold, they redirect it to the tagger, which tags it with the cell's token and hands it to the
//! node's intake; the intake reserves that destination (it is never forwarded, whatever a
//! capability says), takes the nonce ([`answer_probe`]), and answers [`probe::ANSWER`].
//!
//! `Governed=True` only when both ends agree: the intake received that nonce on a connection it
//! identified as this cell, and the probe's own connection got the intake's answer. Anything
//! else is `False` with a reason naming what the probe saw ([`reason`]): the connection was
//! refused where the rules send it (the tagger is gone), dropped or lost (the rules are gone),
//! answered by something else, or received under another identity. A probe that could not run
//! (no namespace holds the address, no privilege, no prober) proves nothing: `Unknown`. A
//! `False` that a tagger still starting could cause (`TaggerNotListening`, `NotReceivedByNode`)
//! is probed once more after [`CONFIRM_AFTER`] before it is reported, so a new pod does not
//! flap. A cell whose rules or tagger are gone turns `False` at the first probe after: within
//! one interval plus that probe's own time (its timeout at most).
//!
//! An agent gains nothing: the probe is the node's own connection, the nonce is never reused
//! and is known to the node (and, for a probe's lifetime, the prober) only, and a connection an
//! agent makes to the reserved destination itself is refused and audited like any other denial
//! (`self_check_reserved`). Probes are not requests: they take no budget, rate or connection
//! slot of the cell, write no per-probe audit record and never count toward `denial_rate`; a
//! change of a cell's `Governed` status is audited (a `control` record), with the reason.
//!
//! With `--self-check-interval off` nothing is probed, and in Kubernetes mode the condition of
//! each cell on the node says `Unknown` (`SelfCheckDisabled`) rather than keep an old answer.

pub mod netns;
pub mod probe;
pub mod prober;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cellgate_api::crd::{Condition, CONDITION_GOVERNED};
use futures_util::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::config::{ProberAddr, SelfCheckConfig};
use crate::decide::{ConnIdentity, Unadmitted};
use crate::Shared;

/// The condition's reasons (CamelCase, as Kubernetes conditions have them); the failure
/// counter `cellgate_self_check_failures_total` carries the same labels.
pub mod reason {
    /// True: the probe crossed the tagger and was refused by this node's intake.
    pub const PROBE_REFUSED_AT_NODE: &str = "ProbeRefusedAtNode";
    /// False: the probe was not redirected to the tagger (dropped in the pod, no route, or no
    /// answer at all: it left the pod).
    pub const RULES_MISSING: &str = "RulesMissing";
    /// False: the probe was refused where the rules send it: nothing listens there.
    pub const TAGGER_NOT_LISTENING: &str = "TaggerNotListening";
    /// False: the probe connected but the node's intake never received it.
    pub const NOT_RECEIVED_BY_NODE: &str = "NotReceivedByNode";
    /// False: something other than the node's intake answered the probe.
    pub const ANSWERED_BY_OTHER: &str = "AnsweredByOther";
    /// False: the node's intake received the probe as another cell.
    pub const WRONG_IDENTITY: &str = "WrongIdentity";
    /// False: the node's intake received the probe but refused the identity it carried.
    pub const IDENTITY_REFUSED: &str = "IdentityRefused";
    /// Unknown: no network namespace holds the pod's address.
    pub const NETWORK_NAMESPACE_NOT_FOUND: &str = "NetworkNamespaceNotFound";
    /// Unknown: the pod has no address in the family of the must-deny destination.
    pub const ADDRESS_FAMILY_MISMATCH: &str = "AddressFamilyMismatch";
    /// Unknown: the probe could not run (privilege, prober, random source).
    pub const PROBE_UNAVAILABLE: &str = "ProbeUnavailable";
    /// Unknown: the self-check is off on this node.
    pub const SELF_CHECK_DISABLED: &str = "SelfCheckDisabled";

    /// Every reason, for documentation and tests.
    pub const ALL: &[&str] = &[
        PROBE_REFUSED_AT_NODE,
        RULES_MISSING,
        TAGGER_NOT_LISTENING,
        NOT_RECEIVED_BY_NODE,
        ANSWERED_BY_OTHER,
        WRONG_IDENTITY,
        IDENTITY_REFUSED,
        NETWORK_NAMESPACE_NOT_FOUND,
        ADDRESS_FAMILY_MISMATCH,
        PROBE_UNAVAILABLE,
        SELF_CHECK_DISABLED,
    ];
}

/// A `False` verdict a starting tagger could cause is probed again after this long (or a
/// quarter of the interval, if shorter) before it is reported.
pub const CONFIRM_AFTER: Duration = Duration::from_millis(500);
/// With the self-check off, how often cells new on the node get their `Unknown` condition.
const DISABLED_REPORT_EVERY: Duration = Duration::from_secs(30);
/// Cells probed at once.
const CONCURRENT_PROBES: usize = 16;
/// How long a probe given up on may still arrive at the intake as the node's own.
const LATE_FOR: Duration = Duration::from_secs(60);
/// Most late nonces remembered (one per cell and round at most in practice).
const LATE_MAX: usize = 4096;

/// The status of a `Governed` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The probe proved the cell governed.
    True,
    /// The probe proved it is not.
    False,
    /// No probe ran, or it could not run.
    Unknown,
}

impl Status {
    /// `True`, `False` or `Unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// What one check concluded: the condition's status, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Status.
    pub status: Status,
    /// One of [`reason`].
    pub reason: &'static str,
    /// For humans; stable while the cause is (the condition is written only when it changes).
    pub message: String,
}

impl Verdict {
    fn new(status: Status, reason: &'static str, message: String) -> Self {
        Self {
            status,
            reason,
            message,
        }
    }
}

/// What the intake saw of a probe: the identity it admitted it as, or why it refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// The uid of the cell the token named, when the token verified.
    pub cell_uid: Option<String>,
    /// `namespace/name` of that cell.
    pub cell: Option<String>,
    /// The refusal's reason label, when the intake did not admit the connection.
    pub refusal: Option<String>,
}

/// The last verdict of a cell on this node.
#[derive(Debug, Clone)]
struct CellResult {
    namespace: String,
    name: String,
    verdict: Verdict,
    /// When the status last changed on this node.
    since: SystemTime,
}

enum Prober {
    Local(probe::LocalProber),
    Socket(PathBuf),
}

/// The self-check's state, shared by the loop and the intake ([`crate::Shared::self_check`]).
pub struct SelfCheck {
    target: SocketAddr,
    prober: Option<Prober>,
    /// Nonces of probes in flight → where the intake reports what it saw.
    pending: Mutex<HashMap<String, oneshot::Sender<Arrival>>>,
    /// Nonces of probes given up on (timed out) whose line may still reach the intake, with when:
    /// such a line is the node's own probe arriving late, not an agent's connection.
    late: Mutex<HashMap<String, std::time::Instant>>,
    /// Cell uid → the last verdict.
    results: Mutex<HashMap<String, CellResult>>,
    /// Cell uid → the condition last applied (or found already in place) in Kubernetes mode.
    written: Mutex<HashMap<String, Condition>>,
}

impl std::fmt::Debug for SelfCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfCheck")
            .field("target", &self.target)
            .field("on", &self.prober.is_some())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SelfCheck {
    /// The self-check `config` describes (probing only when it has an interval).
    pub fn new(config: &SelfCheckConfig) -> Self {
        let prober = config.interval.map(|_| match &config.prober {
            ProberAddr::InProcess => Prober::Local(probe::LocalProber::new(
                config.target,
                config.netns_dir.clone(),
            )),
            ProberAddr::Unix(p) => Prober::Socket(p.clone()),
        });
        Self {
            target: config.target,
            prober,
            pending: Mutex::default(),
            late: Mutex::default(),
            results: Mutex::default(),
            written: Mutex::default(),
        }
    }

    /// Remembers the nonce of a probe given up on for [`LATE_FOR`], forgetting older ones.
    fn gave_up(&self, nonce: String) {
        let now = std::time::Instant::now();
        let mut late = lock(&self.late);
        late.retain(|_, at| now.duration_since(*at) < LATE_FOR);
        if late.len() < LATE_MAX {
            late.insert(nonce, now);
        }
    }

    /// Whether `dst` is the must-deny destination the intake reserves for probes.
    pub fn reserves(&self, dst: SocketAddr) -> bool {
        dst.port() == self.target.port()
            && dst.ip().to_canonical() == self.target.ip().to_canonical()
    }

    /// The last status of each cell with a verdict: (namespace, name, status).
    pub fn statuses(&self) -> Vec<(String, String, Status)> {
        let mut v: Vec<_> = lock(&self.results)
            .values()
            .map(|r| (r.namespace.clone(), r.name.clone(), r.verdict.status))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    /// The last verdict of cell `uid`, if it has one.
    pub fn verdict(&self, uid: &str) -> Option<Verdict> {
        lock(&self.results).get(uid).map(|r| r.verdict.clone())
    }

    /// The `cellgate_cell_governed` gauge: 1 for each cell whose last verdict is `True`, 0 for
    /// `False`; a cell whose self-check is `Unknown` has no series.
    pub fn gauge(&self) -> crate::metrics::LabeledGauge {
        crate::metrics::LabeledGauge {
            name: "cellgate_cell_governed",
            help: "Enforcement self-check of each cell on this node: 1 when the last probe proved its traffic crosses the boundary (Governed=True), 0 when it proved it does not (Governed=False); no series while Unknown",
            series: self
                .statuses()
                .into_iter()
                .filter(|(_, _, s)| *s != Status::Unknown)
                .map(|(ns, name, s)| {
                    (
                        vec![("namespace", ns), ("cell", name)],
                        i64::from(s == Status::True),
                    )
                })
                .collect(),
        }
    }
}

/// Starts the self-check loop on `tasks`: probing at the interval, or, when it is off in
/// Kubernetes mode, writing `Unknown` conditions; nothing at all when it is off otherwise.
pub fn start(shared: &Arc<Shared>, tasks: &mut tokio::task::JoinSet<()>) {
    let config = &shared.config.self_check;
    match config.interval {
        Some(every) => tracing::info!(
            interval_ms = every.as_millis() as u64, target = %config.target,
            prober = ?config.prober, "enforcement self-check on"
        ),
        None if shared.config.kubernetes => {
            tracing::warn!("enforcement self-check off (--self-check-interval off): the cells' Governed condition says Unknown");
        }
        None => {
            tracing::info!("enforcement self-check off (--self-check-interval off)");
            return;
        }
    }
    tasks.spawn(run(shared.clone()));
}

async fn run(shared: Arc<Shared>) {
    let every = shared
        .config
        .self_check
        .interval
        .unwrap_or(DISABLED_REPORT_EVERY);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        round(&shared).await;
    }
}

/// A cell with a pod on this node, to probe.
#[derive(Debug, Clone)]
struct Target {
    uid: String,
    namespace: String,
    name: String,
    generation: i64,
    /// The pod's address in the family of the must-deny destination, if it has one.
    ip: Option<IpAddr>,
}

/// The cells with a pod address on this node ([`crate::Shared::pods`]: the pod watch's Running
/// pods in Kubernetes mode, `--pod` and bound tokens otherwise). Loopback and unspecified
/// addresses are not pod addresses any namespace could be told apart by; they are passed over.
fn targets(shared: &Shared, target: SocketAddr) -> Vec<Target> {
    let mut by_uid: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    if let Ok(pods) = shared.pods.read() {
        for (ip, uid) in pods.iter() {
            let ip = ip.to_canonical();
            if !ip.is_loopback() && !ip.is_unspecified() {
                by_uid.entry(uid.clone()).or_default().push(ip);
            }
        }
    }
    let family = target.ip().to_canonical().is_ipv4();
    by_uid
        .into_iter()
        .filter_map(|(uid, mut ips)| {
            let entry = shared.cells.get(&uid)?;
            ips.sort();
            Some(Target {
                namespace: entry.cell.namespace.clone(),
                name: entry.cell.name.clone(),
                generation: entry.cell.generation,
                ip: ips.into_iter().find(|ip| ip.is_ipv4() == family),
                uid,
            })
        })
        .collect()
}

/// One round: every cell on the node checked (a few at a time), reported, and the cells no
/// longer here forgotten.
async fn round(shared: &Arc<Shared>) {
    let targets = targets(shared, shared.self_check.target);
    lock(&shared.self_check.results).retain(|uid, _| targets.iter().any(|t| &t.uid == uid));
    lock(&shared.self_check.written).retain(|uid, _| targets.iter().any(|t| &t.uid == uid));
    futures_util::stream::iter(targets)
        .for_each_concurrent(CONCURRENT_PROBES, |t| async move {
            let (verdict, probed) = check(shared, &t).await;
            report(shared, &t, verdict, probed).await;
        })
        .await;
}

/// Checks one cell: the verdict, and whether a probe ran. A `False` is confirmed once.
async fn check(shared: &Shared, t: &Target) -> (Verdict, bool) {
    let sc = &shared.self_check;
    let Some(prober) = &sc.prober else {
        return (
            Verdict::new(
                Status::Unknown,
                reason::SELF_CHECK_DISABLED,
                format!(
                    "the enforcement self-check is off on node {} (--self-check-interval off)",
                    shared.config.node_name
                ),
            ),
            false,
        );
    };
    let Some(ip) = t.ip else {
        return (
            Verdict::new(
                Status::Unknown,
                reason::ADDRESS_FAMILY_MISMATCH,
                format!(
                    "the pod has no address in the family of the must-deny destination {}",
                    sc.target
                ),
            ),
            false,
        );
    };
    let first = probe_once(shared, prober, t, ip).await;
    // Only what a tagger still starting could cause is confirmed; the rest already waited out
    // the probe's timeout or saw the node answer.
    let racy = [reason::TAGGER_NOT_LISTENING, reason::NOT_RECEIVED_BY_NODE];
    if !racy.contains(&first.reason) {
        return (first, true);
    }
    let every = shared.config.self_check.interval.unwrap_or(CONFIRM_AFTER);
    tokio::time::sleep(CONFIRM_AFTER.min(every / 4)).await;
    (probe_once(shared, prober, t, ip).await, true)
}

async fn probe_once(shared: &Shared, prober: &Prober, t: &Target, ip: IpAddr) -> Verdict {
    let sc = &shared.self_check;
    let timeout = shared.config.self_check.timeout;
    let nonce = match probe::nonce() {
        Ok(n) => n,
        Err(detail) => {
            return classify(
                &probe::Outcome::Unavailable { detail },
                None,
                &t.uid,
                &context(shared, ip),
            )
        }
    };
    let (tx, mut rx) = oneshot::channel();
    lock(&sc.pending).insert(nonce.clone(), tx);
    let outcome = match prober {
        Prober::Local(p) => p.probe(ip, &nonce, timeout).await,
        Prober::Socket(path) => prober::ask(path, ip, &nonce, timeout).await,
    };
    if lock(&sc.pending).remove(&nonce).is_some() {
        sc.gave_up(nonce);
    }
    // The intake reports before it answers, so a probe that read the answer finds it here.
    let arrival = rx.try_recv().ok();
    tracing::debug!(cell = %format!("{}/{}", t.namespace, t.name), ip = %ip, ?outcome, ?arrival, "self-check probe");
    classify(&outcome, arrival.as_ref(), &t.uid, &context(shared, ip))
}

/// What a verdict's message names.
#[derive(Debug, Clone)]
pub struct Context {
    /// This node.
    pub node: String,
    /// The must-deny destination.
    pub target: SocketAddr,
    /// The probe's bound.
    pub timeout: Duration,
    /// The pod address probed from.
    pub ip: IpAddr,
}

fn context(shared: &Shared, ip: IpAddr) -> Context {
    Context {
        node: shared.config.node_name.clone(),
        target: shared.config.self_check.target,
        timeout: shared.config.self_check.timeout,
        ip,
    }
}

/// The verdict on what the probe saw (`outcome`) and what the intake saw (`arrival`) for the
/// cell `uid`. Pure.
///
/// `True` needs both: the intake admitted the nonce as this cell, and the probe's own
/// connection got the intake's answer. An arrival without the probe's own exchange (its
/// connection failed, or got another answer) is not taken as proof: the outcome decides.
pub fn classify(
    outcome: &probe::Outcome,
    arrival: Option<&Arrival>,
    uid: &str,
    cx: &Context,
) -> Verdict {
    use probe::Outcome as O;
    let (target, node) = (cx.target, &cx.node);
    let answered_by_node =
        matches!(outcome, O::Connected { answer } if answer.as_bytes() == probe::ANSWER);
    if let Some(a) = arrival.filter(|_| answered_by_node) {
        return match (&a.refusal, &a.cell_uid) {
            (Some(label), _) => Verdict::new(
                Status::False,
                reason::IDENTITY_REFUSED,
                format!("a probe from the pod's network namespace to {target} reached node {node}'s intake through the tagger, which refused the identity it carried ({label}): every connection of the cell is refused at the node"),
            ),
            (None, Some(u)) if u == uid => Verdict::new(
                Status::True,
                reason::PROBE_REFUSED_AT_NODE,
                format!("a probe from the pod's network namespace to {target} was redirected to the tagger, reached node {node}'s intake as this cell and was refused there; nothing left the pod"),
            ),
            (None, _) => Verdict::new(
                Status::False,
                reason::WRONG_IDENTITY,
                format!(
                    "a probe from the pod's network namespace reached node {node}'s intake as cell {}, not as this cell: the pod's tagger holds another cell's token",
                    a.cell.as_deref().unwrap_or("?")
                ),
            ),
        };
    }
    let not_governed = |reason, message| Verdict::new(Status::False, reason, message);
    let unknown = |reason, message| Verdict::new(Status::Unknown, reason, message);
    match outcome {
        O::NoNamespace { dir, .. } => unknown(
            reason::NETWORK_NAMESPACE_NOT_FOUND,
            format!("no network namespace under {dir} holds the pod address {}; the probe did not run", cx.ip),
        ),
        O::Unavailable { detail } => unknown(
            reason::PROBE_UNAVAILABLE,
            format!("the probe could not run: {detail}"),
        ),
        O::Refused => not_governed(
            reason::TAGGER_NOT_LISTENING,
            format!("a probe from the pod's network namespace to {target} was refused without reaching node {node}: nothing listens where the cell's rules redirect it (the tagger is gone), or the rules are gone and something outside refused it"),
        ),
        O::Dropped => not_governed(
            reason::RULES_MISSING,
            format!("a probe from the pod's network namespace to {target} was dropped inside the pod instead of being redirected to the tagger: the cell's redirect rules are missing (its egress fails, but not at the boundary)"),
        ),
        O::TimedOut => not_governed(
            reason::RULES_MISSING,
            format!("a probe from the pod's network namespace to {target} got no answer within {:?}: it was not redirected to the tagger (the cell's rules are missing) and left the pod", cx.timeout),
        ),
        O::Unreachable { detail } => not_governed(
            reason::RULES_MISSING,
            format!("a probe from the pod's network namespace to {target} was routed instead of redirected to the tagger ({detail}): the cell's rules are missing"),
        ),
        // Even the node's own answer, without the intake's record of this nonce: a replay.
        O::Connected { answer } if !answer.is_empty() => not_governed(
            reason::ANSWERED_BY_OTHER,
            format!("a probe from the pod's network namespace to {target} was answered by something other than node {node}'s intake"),
        ),
        O::Connected { .. } => not_governed(
            reason::NOT_RECEIVED_BY_NODE,
            format!("a probe from the pod's network namespace to {target} was accepted but never reached node {node}'s intake as this cell: the tagger cannot reach the node, or something else holds the tagger's port"),
        ),
    }
}

/// Records a verdict: metrics, the log and the audit on a change of status, and in Kubernetes
/// mode the condition.
async fn report(shared: &Arc<Shared>, t: &Target, verdict: Verdict, probed: bool) {
    let sc = &shared.self_check;
    if probed {
        shared
            .metrics
            .self_check_probe(verdict.reason, verdict.status == Status::True);
    }
    let now = SystemTime::now();
    let (previous, since) = {
        let mut results = lock(&sc.results);
        let previous = results.get(&t.uid).map(|r| (r.verdict.clone(), r.since));
        let since = match &previous {
            Some((v, since)) if v.status == verdict.status => *since,
            _ => now,
        };
        results.insert(
            t.uid.clone(),
            CellResult {
                namespace: t.namespace.clone(),
                name: t.name.clone(),
                verdict: verdict.clone(),
                since,
            },
        );
        (previous.map(|(v, _)| v), since)
    };
    let cell = format!("{}/{}", t.namespace, t.name);
    if previous.as_ref() != Some(&verdict) {
        match verdict.status {
            Status::True => {
                tracing::info!(cell = %cell, reason = verdict.reason, "cell governed: {}", verdict.message)
            }
            Status::False => {
                tracing::warn!(cell = %cell, reason = verdict.reason, "cell NOT governed: {}", verdict.message)
            }
            Status::Unknown => {
                tracing::info!(cell = %cell, reason = verdict.reason, "cell's governance unknown: {}", verdict.message)
            }
        }
    }
    let was = previous.map_or(Status::Unknown, |v| v.status);
    if was != verdict.status {
        audit_change(shared, t, &verdict).await;
    }
    if shared.config.kubernetes {
        write_condition(shared, t, &verdict, since).await;
    }
}

/// A `control` audit record of a change of a cell's `Governed` status.
async fn audit_change(shared: &Shared, t: &Target, verdict: &Verdict) {
    let label = match verdict.status {
        Status::True => "self_check_governed",
        Status::False => "self_check_not_governed",
        Status::Unknown => "self_check_unknown",
    };
    let mut rec = cellgate_audit::Record::new(
        &shared.config.node_name,
        "self_check",
        "tcp",
        cellgate_audit::Decision::Control,
        label,
    );
    rec.namespace = Some(t.namespace.clone());
    rec.cell = Some(t.name.clone());
    rec.cell_uid = Some(t.uid.clone());
    rec.cell_generation = Some(t.generation);
    rec.source = t.ip.map(|ip| ip.to_string());
    rec.destination = Some(shared.self_check.target.to_string());
    rec.port = Some(shared.self_check.target.port());
    rec.reasons = vec![verdict.reason.to_string(), verdict.message.clone()];
    if let Err(e) = crate::decide::record(shared, rec).await {
        tracing::error!(error = %e, "self-check record not written");
    }
}

/// Applies the `Governed` condition when it differs from what this node last applied or what
/// the API server already has. Keeps the API server's `lastTransitionTime` while the status
/// there is the same (a node restart is not a transition). A failed write is retried on the
/// next probe.
async fn write_condition(shared: &Shared, t: &Target, verdict: &Verdict, since: SystemTime) {
    let Some(kube) = shared.kube.get() else {
        return;
    };
    let existing = kube.cell_condition(&t.namespace, &t.name, CONDITION_GOVERNED);
    let last_transition_time = match &existing {
        Some(c) if c.status == verdict.status.as_str() && c.last_transition_time.is_some() => {
            c.last_transition_time.clone()
        }
        _ => Some(cellgate_audit::format_rfc3339(since)),
    };
    let condition = Condition {
        type_: CONDITION_GOVERNED.into(),
        status: verdict.status.as_str().into(),
        reason: verdict.reason.into(),
        message: verdict.message.clone(),
        last_transition_time,
        observed_generation: Some(t.generation),
    };
    let sc = &shared.self_check;
    if lock(&sc.written).get(&t.uid) == Some(&condition) {
        return;
    }
    if existing.as_ref() == Some(&condition) {
        lock(&sc.written).insert(t.uid.clone(), condition);
        return;
    }
    match kube.apply_governed(&t.namespace, &t.name, &condition).await {
        Ok(()) => {
            lock(&sc.written).insert(t.uid.clone(), condition);
        }
        Err(e) => {
            tracing::warn!(cell = %format!("{}/{}", t.namespace, t.name), error = %e,
                "could not write the Governed condition; retrying after the next probe");
        }
    }
}

/// The refusal of what reaches the reserved destination without being a probe in flight (an
/// agent's own connection, a request through another front door): a denial like any other.
pub fn refusal(dst: SocketAddr) -> crate::decide::Outcome {
    crate::decide::Outcome::deny(
        crate::decide::Reason::SelfCheckReserved,
        format!(
            "{dst} is reserved for the node's enforcement self-check; nothing is forwarded there"
        ),
        None,
    )
}

/// Takes a connection to the reserved destination if it is a probe in flight: reads the probe
/// line (bounded by [`probe::LINE_LEN`] and the probe timeout), reports what the intake made of
/// the connection (`admitted`) to the waiting check, answers [`probe::ANSWER`] and closes.
/// Returns `false` for anything else (an agent's own connection, a nonce not in flight): the
/// intake then refuses it like any other, audited.
pub async fn answer_probe(
    shared: &Shared,
    stream: &mut TcpStream,
    admitted: &Result<ConnIdentity, Box<Unadmitted>>,
) -> bool {
    let mut buf = [0u8; probe::LINE_LEN];
    let mut n = 0;
    let read = async {
        while n < buf.len() {
            match stream.read(buf.get_mut(n..).unwrap_or_default()).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
            if buf.get(..n).is_some_and(|b| b.contains(&b'\n')) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(shared.config.self_check.timeout, read).await;
    let Some(nonce) = probe::parse_line(buf.get(..n).unwrap_or_default()) else {
        return false;
    };
    let waiting = lock(&shared.self_check.pending).remove(nonce);
    // A probe given up on may arrive late: still the node's own connection, taken without a
    // report. Any other nonce is not a probe.
    if waiting.is_none() && lock(&shared.self_check.late).remove(nonce).is_none() {
        return false;
    }
    if let Some(tx) = waiting {
        let claims = match admitted {
            Ok(ident) => Some(&ident.claims),
            Err(r) => r.ident.as_ref().map(|i| &i.claims),
        };
        let _ = tx.send(Arrival {
            cell_uid: claims.map(|c| c.cell_uid.clone()),
            cell: claims.map(|c| format!("{}/{}", c.namespace, c.name)),
            refusal: admitted
                .as_ref()
                .err()
                .map(|r| r.out.reason.as_str().to_string()),
        });
    }
    shared.metrics.connection("self_check");
    let _ = stream.write_all(probe::ANSWER).await;
    let _ = stream.shutdown().await;
    true
}

#[cfg(test)]
mod tests {
    use super::probe::Outcome;
    use super::*;

    fn cx() -> Context {
        Context {
            node: "node-a".into(),
            target: crate::config::SELF_CHECK_TARGET,
            timeout: Duration::from_secs(2),
            ip: "10.1.2.3".parse().unwrap(),
        }
    }

    fn arrival(uid: &str) -> Arrival {
        Arrival {
            cell_uid: Some(uid.into()),
            cell: Some(format!("agents/{uid}")),
            refusal: None,
        }
    }

    fn node_answer() -> Outcome {
        Outcome::Connected {
            answer: String::from_utf8_lossy(probe::ANSWER).into_owned(),
        }
    }

    #[test]
    fn governed_needs_the_intake_and_the_probe_to_agree() {
        let v = classify(&node_answer(), Some(&arrival("u1")), "u1", &cx());
        assert_eq!(
            (v.status, v.reason),
            (Status::True, reason::PROBE_REFUSED_AT_NODE)
        );
        assert!(
            v.message.contains("192.0.2.1:9") && v.message.contains("node-a"),
            "{}",
            v.message
        );
        // The intake saw another cell.
        let v = classify(&node_answer(), Some(&arrival("u2")), "u1", &cx());
        assert_eq!(
            (v.status, v.reason),
            (Status::False, reason::WRONG_IDENTITY)
        );
        assert!(v.message.contains("agents/u2"), "{}", v.message);
        // The intake refused the identity.
        let refused = Arrival {
            refusal: Some("token_expired".into()),
            ..arrival("u1")
        };
        let v = classify(&node_answer(), Some(&refused), "u1", &cx());
        assert_eq!(
            (v.status, v.reason),
            (Status::False, reason::IDENTITY_REFUSED)
        );
        assert!(v.message.contains("token_expired"), "{}", v.message);
        // The nonce arrived, but the probe's own connection did not get the node's answer: the
        // arrival is no proof (someone else delivered it); the probe's outcome decides.
        let v = classify(&Outcome::TimedOut, Some(&arrival("u1")), "u1", &cx());
        assert_eq!((v.status, v.reason), (Status::False, reason::RULES_MISSING));
        let other = Outcome::Connected {
            answer: "220 smtp ready\r\n".into(),
        };
        let v = classify(&other, Some(&arrival("u1")), "u1", &cx());
        assert_eq!(
            (v.status, v.reason),
            (Status::False, reason::ANSWERED_BY_OTHER)
        );
        // The node's answer without an arrival: a replay of the answer, not a proof.
        let v = classify(&node_answer(), None, "u1", &cx());
        assert_eq!(
            (v.status, v.reason),
            (Status::False, reason::ANSWERED_BY_OTHER)
        );
    }

    #[test]
    fn each_outcome_names_its_cause() {
        let cases = [
            (Outcome::Refused, Status::False, reason::TAGGER_NOT_LISTENING),
            (Outcome::Dropped, Status::False, reason::RULES_MISSING),
            (Outcome::TimedOut, Status::False, reason::RULES_MISSING),
            (
                Outcome::Unreachable {
                    detail: "Network is unreachable (os error 101)".into(),
                },
                Status::False,
                reason::RULES_MISSING,
            ),
            (
                Outcome::Connected {
                    answer: String::new(),
                },
                Status::False,
                reason::NOT_RECEIVED_BY_NODE,
            ),
            (
                Outcome::NoNamespace {
                    dir: "/var/run/netns".into(),
                    searched: 3,
                },
                Status::Unknown,
                reason::NETWORK_NAMESPACE_NOT_FOUND,
            ),
            (
                Outcome::Unavailable {
                    detail: "cannot enter the network namespace /var/run/netns/x: Operation not permitted".into(),
                },
                Status::Unknown,
                reason::PROBE_UNAVAILABLE,
            ),
        ];
        for (o, status, r) in cases {
            let v = classify(&o, None, "u1", &cx());
            assert_eq!((v.status, v.reason), (status, r), "{o:?}");
            assert!(reason::ALL.contains(&v.reason));
            assert!(!v.message.is_empty());
        }
    }

    #[test]
    fn the_reserved_destination_is_matched_exactly() {
        let sc = SelfCheck::new(&SelfCheckConfig::off());
        assert!(sc.reserves("192.0.2.1:9".parse().unwrap()));
        assert!(sc.reserves("[::ffff:192.0.2.1]:9".parse().unwrap()));
        assert!(!sc.reserves("192.0.2.1:10".parse().unwrap()));
        assert!(!sc.reserves("192.0.2.2:9".parse().unwrap()));
    }

    #[test]
    fn nonces_given_up_on_are_remembered_a_while_and_bounded() {
        let sc = SelfCheck::new(&SelfCheckConfig::off());
        sc.gave_up("a".repeat(32));
        assert!(lock(&sc.late).contains_key(&"a".repeat(32)));
        lock(&sc.late).insert("b".repeat(32), std::time::Instant::now() - LATE_FOR);
        sc.gave_up("c".repeat(32));
        assert!(!lock(&sc.late).contains_key(&"b".repeat(32)));
        for i in 0..LATE_MAX + 10 {
            sc.gave_up(format!("{i:032x}"));
        }
        assert_eq!(lock(&sc.late).len(), LATE_MAX);
    }

    #[test]
    fn the_gauge_has_series_for_proven_cells_only() {
        let sc = SelfCheck::new(&SelfCheckConfig::off());
        for (uid, status) in [
            ("a", Status::True),
            ("b", Status::False),
            ("c", Status::Unknown),
        ] {
            lock(&sc.results).insert(
                uid.into(),
                CellResult {
                    namespace: "agents".into(),
                    name: uid.into(),
                    verdict: Verdict::new(status, reason::PROBE_UNAVAILABLE, String::new()),
                    since: SystemTime::now(),
                },
            );
        }
        let g = sc.gauge();
        let series: Vec<(String, i64)> =
            g.series.iter().map(|(l, v)| (l[1].1.clone(), *v)).collect();
        assert_eq!(series, vec![("a".into(), 1), ("b".into(), 0)]);
    }
}
