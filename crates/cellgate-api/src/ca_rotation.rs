//! The interception CA's rotation, as the operator, the nodes and `kubectl cellgate ca` agree on
//! it: the names of the objects, the state the operator keeps in the cluster, the request the
//! plugin writes, the report each node writes, and the one check of those reports that both the
//! operator (before it moves on) and the plugin (to show what is waited for) use. Pure: no I/O,
//! no clock, no certificate parsing (fingerprints come in as text, see `cellgate_tls::rotation`).
//!
//! Objects, all in the control namespace:
//!
//! | object | written by | holds |
//! |---|---|---|
//! | ConfigMap [`ROTATION_CONFIGMAP`] | the operator only ([`State`]) | the phase, the CA certificates, times, what the operator waits for |
//! | ConfigMap [`REQUEST_CONFIGMAP`] | the plugin, key [`KEY_REQUEST`] (the operator creates it empty) | the last [`RotateRequest`]: a request is all a user may write, never a certificate |
//! | Secret `cellgate-ca` ([`DEFAULT_CA_SECRET`]) | the operator (the installer creates it) | [`SECRET_CERT`]/[`SECRET_KEY`]: the CA the nodes sign with; [`SECRET_NEXT_CERT`]/[`SECRET_NEXT_KEY`]: the new CA while [`Phase::Introduced`] |
//! | ConfigMap `cellgate-ca-bundle` ([`DEFAULT_CA_BUNDLE_CONFIGMAP`]) | the operator (the installer creates it) | `ca.crt`: the published set, every CA certificate cells trust |
//! | Lease [`report_lease_name`] per node | that node ([`NodeReport`]) | the CAs it loaded, the one it signs with, the token keys it trusts |
//!
//! Phases: [`Phase::Idle`] → [`Phase::Introduced`] (the new CA is published in every cell's
//! bundle and handed to the nodes, which load it but sign with the old) → [`Phase::Active`] (the
//! nodes sign with the new CA; entered only once every node pod reports the new CA loaded and every
//! cell bundle holds it) → [`Phase::Retiring`] (every node signs with the new CA; the old stays in
//! the bundles for the grace period) → [`Phase::Idle`] (the old CA removed).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

/// The ConfigMap holding the rotation's state ([`State`]).
pub const ROTATION_CONFIGMAP: &str = "cellgate-ca-rotation";
/// The ConfigMap `kubectl cellgate ca rotate` writes its [`RotateRequest`] into. Apart from the
/// state so that who may ask for a rotation cannot write which CAs are published.
pub const REQUEST_CONFIGMAP: &str = "cellgate-ca-rotation-request";
/// The Secret the nodes mount at `/etc/cellgate/ca` (operator flag `--ca-secret`).
pub const DEFAULT_CA_SECRET: &str = "cellgate-ca";
/// The ConfigMap the operator mounts at `/etc/cellgate/ca` (operator flag `--ca-bundle-configmap`).
pub const DEFAULT_CA_BUNDLE_CONFIGMAP: &str = "cellgate-ca-bundle";
/// Key of the published set in [`DEFAULT_CA_BUNDLE_CONFIGMAP`].
pub const BUNDLE_KEY: &str = "ca.crt";

/// The Secret's key of the certificate the nodes sign with.
pub const SECRET_CERT: &str = "ca.crt";
/// The Secret's key of its private key.
pub const SECRET_KEY: &str = "ca.key";
/// The Secret's key of the new CA's certificate, while it is introduced.
pub const SECRET_NEXT_CERT: &str = "next.crt";
/// The Secret's key of the new CA's private key, while it is introduced.
pub const SECRET_NEXT_KEY: &str = "next.key";

/// State key: the [`Phase`].
pub const KEY_PHASE: &str = "phase";
/// State key: the CA the nodes sign with (PEM).
pub const KEY_SIGNING: &str = "signing.crt";
/// State key: the new CA, published but not signing yet ([`Phase::Introduced`]).
pub const KEY_NEXT: &str = "next.crt";
/// State key: the old CA, still published ([`Phase::Active`], [`Phase::Retiring`]).
pub const KEY_PREVIOUS: &str = "previous.crt";
/// State key: when the phase began (RFC 3339).
pub const KEY_SINCE: &str = "since";
/// State key: when every cell's CA ConfigMap was first seen holding the new CA
/// ([`Phase::Introduced`], RFC 3339): [`BUNDLE_PROPAGATION`] counts from then.
pub const KEY_BUNDLES_READY: &str = "bundlesReady";
/// State key: how long the old CA stays published once every node signs with the new one.
pub const KEY_GRACE: &str = "grace";
/// State key: when the old CA is removed ([`Phase::Retiring`], RFC 3339).
pub const KEY_RETIRE_AFTER: &str = "retireAfter";
/// State key: what the operator waits for before the next phase, in words.
pub const KEY_WAITING: &str = "waitingFor";
/// State key: the id of the last [`RotateRequest`] the operator acted on.
pub const KEY_HANDLED: &str = "handledRequest";
/// State key: what became of it (`started`, or why it was refused).
pub const KEY_OUTCOME: &str = "requestOutcome";
/// The key of [`REQUEST_CONFIGMAP`] `kubectl cellgate ca rotate` writes (JSON [`RotateRequest`],
/// field manager `kubectl-cellgate`); the operator never writes it.
pub const KEY_REQUEST: &str = "request";

/// Grace period when the request names none.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest grace period accepted: the old CA is kept in every bundle meanwhile.
pub const MAX_GRACE: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// How long the new CA stays [`Phase::Introduced`] after every cell's CA ConfigMap holds it
/// ([`KEY_BUNDLES_READY`]): kubelet refreshes a mounted ConfigMap within its sync period plus its
/// cache TTL (about a minute each by default), and the operator cannot see that happen in the
/// agents' pods.
pub const BUNDLE_PROPAGATION: Duration = Duration::from_secs(2 * 60);

/// Labels of the node DaemonSet's pods (chart and kustomize base alike).
pub const NODE_POD_SELECTOR: &str =
    "app.kubernetes.io/name=cellgate,app.kubernetes.io/component=node";
/// Label on every node report Lease (value `ca`): what the operator and the plugin list.
pub const LABEL_NODE_REPORT: &str = "cellgate.dev/node-report";
/// Annotation of a report: the node pod that wrote it.
pub const ANNOTATION_POD: &str = "cellgate.dev/pod";
/// Annotation of a report: SHA-256 fingerprints of the CAs the node has loaded, comma-separated.
pub const ANNOTATION_CA_LOADED: &str = "cellgate.dev/ca-loaded";
/// Annotation of a report: the fingerprint of the CA the node signs new leaves with.
pub const ANNOTATION_CA_SIGNING: &str = "cellgate.dev/ca-signing";
/// Annotation of a report: the key ids of the token keys the node trusts, comma-separated.
pub const ANNOTATION_TOKEN_KEYS: &str = "cellgate.dev/token-keys";
/// Annotation the operator puts on each cell's CA ConfigMap: fingerprints of the cell CAs in it.
pub const ANNOTATION_BUNDLE_CAS: &str = "cellgate.dev/ca-fingerprints";

/// Longest Kubernetes object name.
const MAX_NAME: usize = 253;

/// Name of `node`'s report Lease: `cellgate-node-<node>`, or for a node name too long for that,
/// the prefix and a hash of the name.
pub fn report_lease_name(node: &str) -> String {
    let name = format!("cellgate-node-{node}");
    if name.len() <= MAX_NAME {
        return name;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(node.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("cellgate-node-{hex}")
}

/// Where a rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// One CA, published and signing.
    #[default]
    Idle,
    /// A new CA is published and loaded by the nodes; the old one still signs.
    Introduced,
    /// The new CA signs (nodes move to it as they read the Secret); both are published.
    Active,
    /// Every node signs with the new CA; the old one stays published until the grace ends.
    Retiring,
}

impl Phase {
    /// The word in the state and on screen.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "Idle",
            Phase::Introduced => "Introduced",
            Phase::Active => "Active",
            Phase::Retiring => "Retiring",
        }
    }

    /// Parses [`Phase::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        [
            Phase::Idle,
            Phase::Introduced,
            Phase::Active,
            Phase::Retiring,
        ]
        .into_iter()
        .find(|p| p.as_str() == text.trim())
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rotation's state: the data of [`ROTATION_CONFIGMAP`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// The phase.
    pub phase: Phase,
    /// The CA the nodes sign with (PEM).
    pub signing: String,
    /// The new CA while [`Phase::Introduced`].
    pub next: Option<String>,
    /// The old CA while [`Phase::Active`] or [`Phase::Retiring`].
    pub previous: Option<String>,
    /// When the phase began (RFC 3339).
    pub since: Option<String>,
    /// When every cell bundle was first seen holding the new CA ([`Phase::Introduced`]).
    pub bundles_ready: Option<String>,
    /// The grace period of the rotation in progress (humantime text, e.g. `24h`).
    pub grace: Option<String>,
    /// When the old CA goes ([`Phase::Retiring`]).
    pub retire_after: Option<String>,
    /// What the operator waits for.
    pub waiting: Option<String>,
    /// The last request acted on.
    pub handled: Option<String>,
    /// What became of it.
    pub outcome: Option<String>,
}

impl State {
    /// Reads the state from the ConfigMap's data. Lenient about keys it does not know; refuses a
    /// state whose phase or certificates do not fit together, since acting on it could publish or
    /// remove the wrong CA.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, String> {
        let get = |k: &str| {
            data.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let phase_text = get(KEY_PHASE).ok_or_else(|| format!("no {KEY_PHASE}"))?;
        let phase = Phase::parse(&phase_text).ok_or_else(|| {
            format!("{KEY_PHASE} {phase_text:?} is not Idle, Introduced, Active or Retiring")
        })?;
        let state = State {
            phase,
            signing: get(KEY_SIGNING)
                .map(|p| format!("{p}\n"))
                .ok_or_else(|| format!("no {KEY_SIGNING}"))?,
            next: get(KEY_NEXT).map(|p| format!("{p}\n")),
            previous: get(KEY_PREVIOUS).map(|p| format!("{p}\n")),
            since: get(KEY_SINCE),
            bundles_ready: get(KEY_BUNDLES_READY),
            grace: get(KEY_GRACE),
            retire_after: get(KEY_RETIRE_AFTER),
            waiting: get(KEY_WAITING),
            handled: get(KEY_HANDLED),
            outcome: get(KEY_OUTCOME),
        };
        let needs = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("phase {phase} {what}"))
            }
        };
        match phase {
            Phase::Idle => needs(
                state.next.is_none() && state.previous.is_none(),
                "holds no next.crt or previous.crt",
            )?,
            Phase::Introduced => needs(
                state.next.is_some() && state.previous.is_none(),
                "holds next.crt and no previous.crt",
            )?,
            Phase::Active => needs(
                state.next.is_none() && state.previous.is_some(),
                "holds previous.crt and no next.crt",
            )?,
            Phase::Retiring => needs(
                state.next.is_none() && state.previous.is_some() && state.retire_after.is_some(),
                "holds previous.crt and retireAfter, and no next.crt",
            )?,
        }
        Ok(state)
    }

    /// The ConfigMap data for this state (every key the operator owns; absent ones are left out,
    /// so a server-side apply removes them).
    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut d = BTreeMap::new();
        d.insert(KEY_PHASE.to_string(), self.phase.to_string());
        d.insert(KEY_SIGNING.to_string(), self.signing.clone());
        let optional = [
            (KEY_NEXT, &self.next),
            (KEY_PREVIOUS, &self.previous),
            (KEY_SINCE, &self.since),
            (KEY_BUNDLES_READY, &self.bundles_ready),
            (KEY_GRACE, &self.grace),
            (KEY_RETIRE_AFTER, &self.retire_after),
            (KEY_WAITING, &self.waiting),
            (KEY_HANDLED, &self.handled),
            (KEY_OUTCOME, &self.outcome),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                d.insert(k.to_string(), v.clone());
            }
        }
        d
    }

    /// Every CA certificate cells must trust now, PEM, oldest role first (previous, signing,
    /// next), so the text does not change when the new CA moves from next to signing.
    pub fn published_pem(&self) -> String {
        let mut out = String::new();
        for pem in [&self.previous, &Some(self.signing.clone()), &self.next]
            .into_iter()
            .flatten()
        {
            out.push_str(pem.trim_end());
            out.push('\n');
        }
        out
    }

    /// The new CA of the rotation in progress: `next` while introduced, then `signing`.
    pub fn new_ca(&self) -> Option<&str> {
        match self.phase {
            Phase::Idle => None,
            Phase::Introduced => self.next.as_deref(),
            Phase::Active | Phase::Retiring => Some(&self.signing),
        }
    }
}

/// What `kubectl cellgate ca rotate` writes under [`KEY_REQUEST`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateRequest {
    /// Unique per request (the plugin uses the time it was made, RFC 3339 with nanoseconds).
    pub id: String,
    /// Grace period, humantime text (`24h`); [`DEFAULT_GRACE`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
    /// In [`Phase::Introduced`]: replace the new CA (not signing yet) by a fresh one.
    #[serde(default)]
    pub force: bool,
}

impl RotateRequest {
    /// The request in [`REQUEST_CONFIGMAP`]'s data, if any.
    ///
    /// # Errors
    /// A message when the key holds something else than a request.
    pub fn from_data(data: &BTreeMap<String, String>) -> Option<Result<Self, String>> {
        let text = data.get(KEY_REQUEST)?;
        Some(
            serde_json::from_str::<Self>(text)
                .map_err(|e| format!("{KEY_REQUEST} is not a rotation request: {e}")),
        )
    }

    /// The grace period asked for, checked.
    ///
    /// # Errors
    /// A message naming the value when it does not parse or is over [`MAX_GRACE`].
    pub fn grace(&self) -> Result<Duration, String> {
        let Some(text) = &self.grace else {
            return Ok(DEFAULT_GRACE);
        };
        let d = crate::manifest::parse_duration(text)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("grace {text:?} is not a duration such as 24h or 90m"))?;
        if d > MAX_GRACE {
            return Err(format!("grace {text:?} is longer than 30 days"));
        }
        Ok(d)
    }
}

/// What a node reports in its Lease.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeReport {
    /// The node (the Lease's `holderIdentity`).
    pub node: String,
    /// The node pod that wrote it.
    pub pod: String,
    /// Fingerprints of the CAs loaded.
    pub loaded: Vec<String>,
    /// Fingerprint of the CA new leaves are signed with.
    pub signing: String,
    /// Key ids of the trusted token keys.
    pub token_keys: Vec<String>,
    /// When it was last written (`spec.renewTime`, RFC 3339).
    pub time: Option<String>,
}

fn split_list(text: Option<&String>) -> Vec<String> {
    text.map(|t| {
        t.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    })
    .unwrap_or_default()
}

impl NodeReport {
    /// Reads a report Lease; `None` for a Lease that is not one.
    pub fn from_lease(lease: &Lease) -> Option<Self> {
        let a = lease.metadata.annotations.as_ref()?;
        let spec = lease.spec.as_ref()?;
        Some(Self {
            node: spec.holder_identity.clone()?,
            pod: a.get(ANNOTATION_POD).cloned().unwrap_or_default(),
            loaded: split_list(a.get(ANNOTATION_CA_LOADED)),
            signing: a.get(ANNOTATION_CA_SIGNING).cloned().unwrap_or_default(),
            token_keys: split_list(a.get(ANNOTATION_TOKEN_KEYS)),
            time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
        })
    }

    /// The annotations of its Lease.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (ANNOTATION_POD.to_string(), self.pod.clone()),
            (ANNOTATION_CA_LOADED.to_string(), self.loaded.join(",")),
            (ANNOTATION_CA_SIGNING.to_string(), self.signing.clone()),
            (ANNOTATION_TOKEN_KEYS.to_string(), self.token_keys.join(",")),
        ])
    }
}

/// A node pod of the DaemonSet that must report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePod {
    /// The pod.
    pub pod: String,
    /// Its node (empty while not scheduled).
    pub node: String,
}

/// The node pods that count: every pod of the list not finished and not being deleted (a Pending
/// pod counts: it may start at any time, and must report before anything moves on).
pub fn node_pods(pods: &[Pod]) -> Vec<NodePod> {
    let mut out: Vec<NodePod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .map(|p| NodePod {
            pod: p.metadata.name.clone().unwrap_or_default(),
            node: p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));
    out
}

/// What is asked of every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want<'a> {
    /// The CA with this fingerprint is loaded.
    Loaded(&'a str),
    /// New leaves are signed with the CA with this fingerprint.
    Signing(&'a str),
}

/// How one node pod stands against a [`Want`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCheck {
    /// As wanted.
    Ready,
    /// The pod is not scheduled on a node yet.
    Unscheduled,
    /// Its node has no report.
    NoReport,
    /// The node's report was written by another pod (an earlier one).
    OtherPod(String),
    /// The report does not name the wanted CA.
    Lacking,
}

impl NodeCheck {
    /// Whether the node is as wanted.
    pub fn is_ready(&self) -> bool {
        matches!(self, NodeCheck::Ready)
    }

    /// In words, for the waiting message and the plugin.
    pub fn describe(&self, want: Want<'_>) -> String {
        match self {
            NodeCheck::Ready => "ready".into(),
            NodeCheck::Unscheduled => "not scheduled yet".into(),
            NodeCheck::NoReport => "has not reported".into(),
            NodeCheck::OtherPod(p) => format!("the report is from pod {p}, not this one"),
            NodeCheck::Lacking => match want {
                Want::Loaded(_) => "has not loaded the new CA".into(),
                Want::Signing(_) => "does not sign with the new CA yet".into(),
            },
        }
    }
}

/// Checks every node pod against the reports: a pod counts as ready only when the report of its
/// node was written by that very pod and shows `want`. Fails closed: no report, a report from
/// another pod, or an unscheduled pod is not ready.
pub fn check_nodes(
    pods: &[NodePod],
    reports: &[NodeReport],
    want: Want<'_>,
) -> Vec<(NodePod, NodeCheck)> {
    pods.iter()
        .map(|p| {
            let check = if p.node.is_empty() {
                NodeCheck::Unscheduled
            } else {
                match reports.iter().find(|r| r.node == p.node) {
                    None => NodeCheck::NoReport,
                    Some(r) if r.pod != p.pod => NodeCheck::OtherPod(r.pod.clone()),
                    Some(r) => {
                        let ok = match want {
                            Want::Loaded(fp) => r.loaded.iter().any(|l| l == fp),
                            Want::Signing(fp) => r.signing == fp,
                        };
                        if ok {
                            NodeCheck::Ready
                        } else {
                            NodeCheck::Lacking
                        }
                    }
                }
            };
            (p.clone(), check)
        })
        .collect()
}

/// A fingerprint shortened for a line of text.
pub fn short(fingerprint: &str) -> &str {
    fingerprint.get(..16).unwrap_or(fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    const B: &str = "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n";

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn state_round_trips_and_publishes_in_a_stable_order() {
        let introduced = State {
            phase: Phase::Introduced,
            signing: A.into(),
            next: Some(B.into()),
            since: Some("2030-01-01T00:00:00Z".into()),
            grace: Some("24h".into()),
            ..State::default()
        };
        let back = State::from_data(&introduced.to_data()).expect("parses");
        assert_eq!(back, introduced);
        let active = State {
            phase: Phase::Active,
            signing: B.into(),
            previous: Some(A.into()),
            ..State::default()
        };
        assert_eq!(introduced.published_pem(), format!("{A}{B}"));
        assert_eq!(active.published_pem(), introduced.published_pem());
        assert_eq!(introduced.new_ca(), Some(B));
        assert_eq!(active.new_ca(), Some(B));
    }

    #[test]
    fn a_state_that_does_not_fit_its_phase_is_refused() {
        for (pairs, want) in [
            (vec![(KEY_SIGNING, A)], "no phase"),
            (vec![(KEY_PHASE, "Done"), (KEY_SIGNING, A)], "\"Done\""),
            (vec![(KEY_PHASE, "Idle")], "no signing.crt"),
            (
                vec![(KEY_PHASE, "Idle"), (KEY_SIGNING, A), (KEY_NEXT, B)],
                "phase Idle holds no next.crt",
            ),
            (
                vec![(KEY_PHASE, "Introduced"), (KEY_SIGNING, A)],
                "phase Introduced holds next.crt",
            ),
            (
                vec![(KEY_PHASE, "Retiring"), (KEY_SIGNING, A), (KEY_PREVIOUS, B)],
                "retireAfter",
            ),
        ] {
            let err = State::from_data(&data(&pairs)).expect_err("refused");
            assert!(err.contains(want), "{err} should name {want}");
        }
    }

    #[test]
    fn requests_and_their_grace() {
        let r = RotateRequest::from_data(&data(&[(KEY_REQUEST, r#"{"id":"t1","grace":"90m"}"#)]))
            .expect("present")
            .expect("parses");
        assert_eq!(r.grace(), Ok(Duration::from_secs(5400)));
        assert!(!r.force);
        assert!(RotateRequest::from_data(&data(&[])).is_none());
        assert!(RotateRequest::from_data(&data(&[(KEY_REQUEST, "now")]))
            .expect("present")
            .is_err());
        let none = RotateRequest {
            id: "t".into(),
            grace: None,
            force: false,
        };
        assert_eq!(none.grace(), Ok(DEFAULT_GRACE));
        for bad in ["soon", "31d"] {
            let r = RotateRequest {
                grace: Some(bad.into()),
                ..none.clone()
            };
            assert!(r.grace().expect_err(bad).contains(bad));
        }
    }

    #[test]
    fn only_the_running_pods_own_report_counts() {
        let pods = vec![
            NodePod {
                pod: "cellgate-node-a1".into(),
                node: "a".into(),
            },
            NodePod {
                pod: "cellgate-node-b2".into(),
                node: "b".into(),
            },
            NodePod {
                pod: "cellgate-node-c1".into(),
                node: "c".into(),
            },
            NodePod {
                pod: "cellgate-node-d1".into(),
                node: "d".into(),
            },
            NodePod {
                pod: "cellgate-node-x".into(),
                node: String::new(),
            },
        ];
        let report = |node: &str, pod: &str, loaded: &[&str], signing: &str| NodeReport {
            node: node.into(),
            pod: pod.into(),
            loaded: loaded.iter().map(|s| s.to_string()).collect(),
            signing: signing.into(),
            ..NodeReport::default()
        };
        let reports = vec![
            report("a", "cellgate-node-a1", &["old", "new"], "old"),
            // b's report comes from the pod before the current one
            report("b", "cellgate-node-b1", &["old", "new"], "old"),
            report("c", "cellgate-node-c1", &["old"], "old"),
        ];
        let checks: Vec<NodeCheck> = check_nodes(&pods, &reports, Want::Loaded("new"))
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        assert_eq!(
            checks,
            vec![
                NodeCheck::Ready,
                NodeCheck::OtherPod("cellgate-node-b1".into()),
                NodeCheck::Lacking,
                NodeCheck::NoReport,
                NodeCheck::Unscheduled,
            ]
        );
        let signing = check_nodes(&pods[..1], &reports, Want::Signing("new"));
        assert_eq!(signing[0].1, NodeCheck::Lacking);
        assert_eq!(
            signing[0].1.describe(Want::Signing("new")),
            "does not sign with the new CA yet"
        );
    }

    #[test]
    fn lease_names_fit_the_limit() {
        assert_eq!(report_lease_name("node-a"), "cellgate-node-node-a");
        let long = "n".repeat(250);
        let name = report_lease_name(&long);
        assert!(
            name.len() <= 253 && name.starts_with("cellgate-node-"),
            "{name}"
        );
        assert_eq!(name, report_lease_name(&long));
    }

    #[test]
    fn a_report_survives_its_lease() {
        let r = NodeReport {
            node: "a".into(),
            pod: "cellgate-node-a1".into(),
            loaded: vec!["f1".into(), "f2".into()],
            signing: "f1".into(),
            token_keys: vec!["k1".into()],
            time: None,
        };
        let lease = Lease {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(r.annotations()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some("a".into()),
                ..Default::default()
            }),
        };
        assert_eq!(NodeReport::from_lease(&lease), Some(r));
    }
}
