//! The kill switch: while a lockdown is on, every request of every cell (or of one namespace's
//! cells) is refused with reason `lockdown`, and what is open is closed at the next re-check.
//!
//! A lockdown is an overlay on everything else: turning it off restores exactly the state
//! before it. It is written to the state directory before it is reported as set, so a node
//! that restarts comes back locked; a lockdown file that cannot be read stops the node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// The lockdown file in the state directory.
pub const LOCKDOWN_FILE: &str = "lockdown.json";
/// Longest reason kept, bytes.
pub const MAX_REASON_BYTES: usize = 512;

/// One lockdown: why, since when, set by whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// Why, as the operator wrote it.
    pub reason: String,
    /// RFC 3339 time it was set.
    pub since: String,
    /// Who set it, as the caller was identified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// Every lockdown in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockState {
    /// Node-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Lock>,
    /// Per namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespaces: BTreeMap<String, Lock>,
}

impl LockState {
    /// Whether any lockdown is on.
    pub fn any(&self) -> bool {
        self.all.is_some() || !self.namespaces.is_empty()
    }
}

/// Why a lockdown change was refused.
#[derive(Debug, thiserror::Error)]
pub enum LockdownError {
    /// The file exists and cannot be read.
    #[error("lockdown file {path} is unreadable ({why}); the node does not start unlocked on a guess: fix or remove it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The change could not be written; nothing changed.
    #[error("lockdown not changed: {0}")]
    Write(String),
    /// A reason is required.
    #[error("a reason is required (at most {MAX_REASON_BYTES} bytes)")]
    Reason,
}

/// The node's lockdown state: its own (admin API, persisted) and the cluster's (Kubernetes
/// mode: the `cellgate-lockdown` ConfigMap, which the API server keeps). Either refuses.
#[derive(Debug)]
pub struct Lockdown {
    path: PathBuf,
    any: AtomicBool,
    state: RwLock<LockState>,
    cluster: RwLock<LockState>,
}

impl Lockdown {
    /// Reads the lockdown in `dir` (none when the file is missing).
    ///
    /// # Errors
    /// When the file exists and cannot be read or parsed.
    pub fn open(dir: &Path) -> Result<Self, LockdownError> {
        let path = dir.join(LOCKDOWN_FILE);
        let state = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LockState::default(),
            Err(e) => {
                return Err(LockdownError::Corrupt {
                    path,
                    why: e.to_string(),
                })
            }
            Ok(b) => serde_json::from_slice(&b).map_err(|e| LockdownError::Corrupt {
                path: path.clone(),
                why: e.to_string(),
            })?,
        };
        Ok(Self {
            path,
            any: AtomicBool::new(state.any()),
            state: RwLock::new(state),
            cluster: RwLock::new(LockState::default()),
        })
    }

    /// The lockdown that applies to a cell of `namespace`, if any (the node-wide one first).
    pub fn applies(&self, namespace: &str) -> Option<Lock> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let of = |s: &LockState| {
            s.all
                .clone()
                .or_else(|| s.namespaces.get(namespace).cloned())
        };
        let local = of(&self.state.read().unwrap_or_else(|p| p.into_inner()));
        local.or_else(|| of(&self.cluster.read().unwrap_or_else(|p| p.into_inner())))
    }

    /// The cluster's lockdowns, as last read from the API server.
    pub fn cluster_state(&self) -> LockState {
        self.cluster
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the cluster's lockdowns; returns whether they changed.
    pub fn set_cluster(&self, next: LockState) -> bool {
        let mut c = self.cluster.write().unwrap_or_else(|p| p.into_inner());
        if *c == next {
            return false;
        }
        *c = next;
        let local = self.state.read().unwrap_or_else(|p| p.into_inner()).any();
        self.any.store(local || c.any(), Ordering::Release);
        true
    }

    /// What is in force.
    pub fn state(&self) -> LockState {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Turns a lockdown on or off (node-wide when `namespace` is `None`), durably before it
    /// takes effect. Returns the state now in force.
    ///
    /// # Errors
    /// When the reason is missing or the file cannot be written (then nothing changed).
    pub fn set(
        &self,
        namespace: Option<&str>,
        on: bool,
        reason: &str,
        by: Option<String>,
    ) -> Result<LockState, LockdownError> {
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > MAX_REASON_BYTES {
            return Err(LockdownError::Reason);
        }
        let mut guard = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut next = guard.clone();
        let lock = Lock {
            reason: reason.to_string(),
            since: cellgate_audit::format_rfc3339(std::time::SystemTime::now()),
            by,
        };
        match (namespace, on) {
            (None, true) => next.all = Some(lock),
            (None, false) => next.all = None,
            (Some(ns), true) => {
                next.namespaces.insert(ns.to_string(), lock);
            }
            (Some(ns), false) => {
                next.namespaces.remove(ns);
            }
        }
        let bytes =
            serde_json::to_vec_pretty(&next).map_err(|e| LockdownError::Write(e.to_string()))?;
        crate::budget::write_atomically(&self.path, &bytes)
            .map_err(|e| LockdownError::Write(format!("{}: {e}", self.path.display())))?;
        self.any
            .store(next.any() || self.cluster_state().any(), Ordering::Release);
        *guard = next.clone();
        Ok(next)
    }
}

/// The cluster's lockdowns from the `cellgate-lockdown` ConfigMap's data: `cluster` and
/// `namespace.NS` keys, JSON values. A value that cannot be read still locks its scope (with a
/// reason saying so): a garbled lockdown is never read as none. Other keys are ignored.
pub fn from_configmap_data<'a>(data: impl Iterator<Item = (&'a String, &'a String)>) -> LockState {
    use cellgate_api::crd::{LOCKDOWN_KEY_CLUSTER, LOCKDOWN_KEY_NAMESPACE};
    let mut s = LockState::default();
    for (k, v) in data {
        let lock = serde_json::from_str::<Lock>(v).unwrap_or_else(|e| Lock {
            reason: format!("unreadable lockdown entry {k:?} ({e}); locked until it is fixed"),
            since: String::new(),
            by: None,
        });
        if k == LOCKDOWN_KEY_CLUSTER {
            s.all = Some(lock);
        } else if let Some(ns) = k
            .strip_prefix(LOCKDOWN_KEY_NAMESPACE)
            .filter(|n| !n.is_empty())
        {
            s.namespaces.insert(ns.to_string(), lock);
        } else {
            tracing::warn!(key = %k, "lockdown ConfigMap key is neither cluster nor namespace.NS; ignored");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_off_per_namespace_and_node_wide_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let l = Lockdown::open(dir.path()).unwrap();
        assert_eq!(l.applies("a"), None);
        l.set(Some("a"), true, "incident 42", Some("ops".into()))
            .unwrap();
        assert_eq!(l.applies("a").unwrap().reason, "incident 42");
        assert_eq!(l.applies("b"), None);
        l.set(None, true, "all hands", None).unwrap();
        assert_eq!(l.applies("b").unwrap().reason, "all hands");
        // A restart comes back locked.
        let again = Lockdown::open(dir.path()).unwrap();
        assert_eq!(again.state(), l.state());
        // Lifting the node-wide one leaves the namespace's.
        l.set(None, false, "over", None).unwrap();
        assert_eq!(l.applies("b"), None);
        assert!(l.applies("a").is_some());
        l.set(Some("a"), false, "over", None).unwrap();
        assert!(!l.state().any());
        assert!(matches!(
            l.set(None, true, "  ", None),
            Err(LockdownError::Reason)
        ));
    }

    #[test]
    fn the_clusters_lockdowns_add_to_the_nodes_and_garbled_ones_lock() {
        let dir = tempfile::tempdir().unwrap();
        let l = Lockdown::open(dir.path()).unwrap();
        let data: BTreeMap<String, String> = [
            (
                "namespace.agents".to_string(),
                r#"{"reason":"r1","since":"t"}"#.to_string(),
            ),
            ("namespace.bots".to_string(), "{not json".to_string()),
            ("other".to_string(), "x".to_string()),
        ]
        .into();
        assert!(l.set_cluster(from_configmap_data(data.iter())));
        assert_eq!(l.applies("agents").unwrap().reason, "r1");
        assert!(l.applies("bots").unwrap().reason.contains("unreadable"));
        assert!(l.applies("web").is_none());
        assert!(
            !l.set_cluster(from_configmap_data(data.iter())),
            "unchanged"
        );
        assert!(l.set_cluster(LockState::default()));
        assert!(l.applies("agents").is_none());
        // The node's own and the cluster's are independent.
        l.set(Some("web"), true, "local", None).unwrap();
        l.set_cluster(from_configmap_data(data.iter()));
        l.set_cluster(LockState::default());
        assert!(l.applies("web").is_some());
    }

    #[test]
    fn an_unreadable_lockdown_file_stops_the_node() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCKDOWN_FILE), b"{\"all\":").unwrap();
        assert!(matches!(
            Lockdown::open(dir.path()),
            Err(LockdownError::Corrupt { .. })
        ));
    }
}
