//! The node follows a rotation of its interception CA and of the token signing keys without a
//! restart.
//!
//! [`watch`] re-reads the CA directory (`--ca`: the Secret `cellgate-ca` as kubelet mounts it,
//! `ca.crt`/`ca.key` and, while a new CA is introduced, `next.crt`/`next.key`) and the trust files
//! (`--trust`) every `watch_interval`. When the CA files changed and load ([`CaSet`]: each key is
//! its certificate's and can issue), the signing CA of both leaf minters is replaced (their cached
//! leaves of the old CA are dropped, so the next handshake gets a leaf of the new CA) and the next
//! CA is kept, loaded and checked, for the moment it starts signing. When the trust files changed
//! and parse, [`cellgate_identity::Verifier::set_keys`] trusts exactly the keys they hold. Files
//! that do not load leave what is in force as it is (the failure is logged and counted as
//! `cellgate_reload_failures_total{outcome="ca"|"trust"}`) and are read again on the next tick:
//! kubelet swaps a whole Secret or ConfigMap volume at once, so a half-written set is not seen for
//! long.
//!
//! In Kubernetes mode, [`report`] writes what the node holds into its Lease
//! `cellgate-node-<node>` in the control namespace (`cellgate_api::ca_rotation::NodeReport`: the
//! CA fingerprints loaded, the one it signs with, the token key ids it trusts, and its own pod
//! name), with server-side apply (field manager `cellgate-node`), at start, after every change,
//! and every [`REPORT_RENEW`] besides. The operator moves a rotation on only once every node pod's
//! own report shows what it needs.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cellgate_api::ca_rotation::{self, NodeReport, LABEL_NODE_REPORT, NODE_POD_SELECTOR};
use cellgate_api::crd::NODE_FIELD_MANAGER;
use cellgate_identity::PublicKey;
use cellgate_tls::ca::Ca;
use cellgate_tls::rotation::{CaDirContents, CaSet};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;

use crate::Shared;

/// How often a report is written even when nothing changed (its `renewTime` shows the node is
/// alive and reporting).
pub const REPORT_RENEW: Duration = Duration::from_secs(5 * 60);
/// How soon a report that could not be written is tried again.
pub const REPORT_RETRY: Duration = Duration::from_secs(10);

/// The CAs and trust the node holds besides what the minters and the verifier hold, and what the
/// files last held.
#[derive(Debug)]
pub struct NodeCas {
    next: RwLock<Option<Arc<Ca>>>,
    last_ca: Mutex<Option<CaDirContents>>,
    last_trust: Mutex<Option<Vec<String>>>,
    changed: watch::Sender<u64>,
}

impl NodeCas {
    /// What the node started with: `next`, the introduced CA, if the directory held one.
    pub fn new(next: Option<Arc<Ca>>) -> Self {
        Self {
            next: RwLock::new(next),
            last_ca: Mutex::new(None),
            last_trust: Mutex::new(None),
            changed: watch::channel(0).0,
        }
    }

    /// Resolves on every change of what the node holds.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn next(&self) -> Option<Arc<Ca>> {
        self.next
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Fingerprints of the CAs the node holds, the signing one first.
pub fn loaded(shared: &Shared) -> Vec<String> {
    let mut out = vec![shared.minter.ca().fingerprint().to_string()];
    if let Some(next) = shared.ca.next() {
        if !out.iter().any(|f| f == next.fingerprint()) {
            out.push(next.fingerprint().to_string());
        }
    }
    out
}

/// What the node reports now.
pub fn current_report(shared: &Shared) -> NodeReport {
    NodeReport {
        node: shared.config.node_name.clone(),
        pod: shared.config.pod_name.clone().unwrap_or_default(),
        loaded: loaded(shared),
        signing: shared.minter.ca().fingerprint().to_string(),
        token_keys: shared.verifier.key_ids(),
        time: None,
    }
}

/// Reads the CA directory and the trust files once and puts what changed in force. Returns
/// whether anything in force changed.
pub fn poll(shared: &Shared) -> bool {
    let ca = poll_ca(shared);
    let trust = poll_trust(shared);
    let changed = ca || trust;
    if changed {
        shared.ca.changed.send_modify(|g| *g = g.wrapping_add(1));
    }
    changed
}

fn poll_ca(shared: &Shared) -> bool {
    let Some(dir) = &shared.config.ca_dir else {
        return false;
    };
    let contents = match CaDirContents::read(dir) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "CA directory unreadable; the CA in force stays");
            shared.metrics.reload_refused("ca");
            return false;
        }
    };
    let mut last = shared
        .ca
        .last_ca
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.as_ref() == Some(&contents) {
        return false;
    }
    let set = match CaSet::from_contents(&contents, dir) {
        Ok(s) => s,
        Err(e) => {
            // Not remembered: read and tried again next tick (kubelet may be mid-swap).
            tracing::warn!(error = %e, "the CA files do not load; the CA in force stays");
            shared.metrics.reload_refused("ca");
            return false;
        }
    };
    *last = Some(contents);
    drop(last);
    let new_next = set.next.clone();
    let next_changed = {
        let mut next = shared
            .ca
            .next
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = next.as_ref().map(|c| c.fingerprint().to_string())
            != new_next.as_ref().map(|c| c.fingerprint().to_string());
        *next = new_next;
        changed
    };
    let signing_changed = shared.minter.set_ca(set.signing.clone());
    shared.minter_unnamed.set_ca(set.signing.clone());
    if signing_changed {
        tracing::warn!(
            ca.signing = %set.signing.fingerprint(),
            ca.loaded = ?set.fingerprints(),
            "the CA that signs new leaf certificates changed; cached leaves of the old CA dropped"
        );
    } else if next_changed {
        tracing::info!(
            ca.signing = %set.signing.fingerprint(),
            ca.loaded = ?set.fingerprints(),
            "CA set reloaded: new leaves are still signed with the same CA"
        );
    }
    signing_changed || next_changed
}

fn poll_trust(shared: &Shared) -> bool {
    if shared.config.trust.is_empty() {
        return false;
    }
    let mut texts = Vec::with_capacity(shared.config.trust.len());
    for p in &shared.config.trust {
        match std::fs::read_to_string(p) {
            Ok(t) => texts.push(t),
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "trust file unreadable; the token keys in force stay");
                shared.metrics.reload_refused("trust");
                return false;
            }
        }
    }
    let mut last = shared
        .ca
        .last_trust
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.as_ref() == Some(&texts) {
        return false;
    }
    let mut keys = Vec::new();
    for (p, t) in shared.config.trust.iter().zip(&texts) {
        match PublicKey::parse_all(t) {
            Ok(k) => keys.extend(k),
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "trust file refused; the token keys in force stay");
                shared.metrics.reload_refused("trust");
                return false;
            }
        }
    }
    *last = Some(texts);
    drop(last);
    let changed = shared.verifier.set_keys(&keys);
    if changed {
        tracing::warn!(trusted_keys = ?shared.verifier.key_ids(), "trusted token keys changed");
    }
    changed
}

/// Polls the CA directory and the trust files every `watch_interval`, until the node stops.
pub async fn watch(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.watch_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        poll(&shared);
    }
}

/// The server-side apply body of the node's report Lease.
pub fn report_lease(
    namespace: &str,
    report: &NodeReport,
    at: std::time::SystemTime,
) -> serde_json::Value {
    let mut labels: serde_json::Map<String, serde_json::Value> = NODE_POD_SELECTOR
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    labels.insert(LABEL_NODE_REPORT.to_string(), "ca".into());
    // MicroTime: six fractional digits, as k8s-openapi writes it.
    let renew = jiff::Timestamp::try_from(at)
        .ok()
        .and_then(|t| jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%S%.6fZ", t).ok())
        .unwrap_or_default();
    serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": ca_rotation::report_lease_name(&report.node),
            "namespace": namespace,
            "labels": labels,
            "annotations": report.annotations(),
        },
        "spec": {
            "holderIdentity": report.node,
            "renewTime": renew,
        },
    })
}

/// Writes the node's report Lease at start, after every change, and every [`REPORT_RENEW`];
/// a failed write is logged and tried again after [`REPORT_RETRY`]. Enforcement never waits on
/// it.
pub async fn report(shared: Arc<Shared>, client: kube::Client) {
    if shared.config.pod_name.is_none() {
        tracing::warn!("no --pod-name (CELLGATE_POD_NAME): the CA report names no pod, and the operator will not count it (a CA rotation waits for this node)");
    }
    let ns = shared.config.control_namespace.clone();
    let api: Api<Lease> = Api::namespaced(client, &ns);
    let name = ca_rotation::report_lease_name(&shared.config.node_name);
    let params = PatchParams::apply(NODE_FIELD_MANAGER).force();
    let mut changes = shared.ca.subscribe();
    let mut written: Option<NodeReport> = None;
    loop {
        let now = current_report(&shared);
        let wait = if written.as_ref() == Some(&now) {
            REPORT_RENEW
        } else {
            let body = report_lease(&ns, &now, std::time::SystemTime::now());
            match api.patch(&name, &params, &Patch::Apply(&body)).await {
                Ok(_) => {
                    tracing::debug!(lease = %name, ca.loaded = ?now.loaded, "CA report written");
                    written = Some(now);
                    REPORT_RENEW
                }
                Err(e) => {
                    tracing::warn!(lease = %name, error = %e, "could not write the CA report; retrying");
                    REPORT_RETRY
                }
            }
        };
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(wait) => {
                // Renew: written again even when unchanged.
                if wait == REPORT_RENEW {
                    written = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_lease_is_an_apply_the_operator_can_read_back() {
        let r = NodeReport {
            node: "node-a".into(),
            pod: "cellgate-node-x1".into(),
            loaded: vec!["aa".into(), "bb".into()],
            signing: "aa".into(),
            token_keys: vec!["k1".into(), "k2".into()],
            time: None,
        };
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let v = report_lease("cellgate-system", &r, at);
        assert_eq!(v["metadata"]["name"], "cellgate-node-node-a");
        assert_eq!(v["metadata"]["labels"][LABEL_NODE_REPORT], "ca");
        assert_eq!(
            v["metadata"]["labels"]["app.kubernetes.io/component"],
            "node"
        );
        assert_eq!(v["spec"]["renewTime"], "2023-11-14T22:13:20.123000Z");
        let lease: Lease = serde_json::from_value(v).expect("a Lease");
        let mut back = NodeReport::from_lease(&lease).expect("a report");
        assert!(back.time.is_some());
        back.time = None;
        assert_eq!(back, r);
    }
}
