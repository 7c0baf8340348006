//! [`PolicyStore`]: the node's current policy set, swapped atomically and only for a set that
//! loaded, passed its tests and compiled. With no valid set, every request is denied.
//!
//! [`PolicyStore::spawn_watcher`] polls the policy directories and reloads on change; a refused
//! set is logged, counted and remembered in [`PolicyStore::last_error`], and the previous set
//! keeps serving.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use cellgate_api::policy::{DecisionDoc, InputDoc, REASON_NO_POLICY, REASON_POLICY_ERROR};
use sha2::{Digest, Sha256};

use crate::error::PolicyError;
use crate::set::{read_policy_files, PolicySet};

/// Default polling interval of [`PolicyStore::spawn_watcher`].
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// What `/readyz` reports about policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyStatus {
    /// A valid set is serving.
    Ready {
        /// Its version.
        version: String,
    },
    /// No valid set has ever loaded; every request is denied.
    NoPolicy {
        /// Why the last attempt failed.
        error: String,
    },
}

impl fmt::Display for PolicyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyStatus::Ready { version } => write!(f, "policy {version}"),
            PolicyStatus::NoPolicy { error } => write!(f, "no valid policy: {error}"),
        }
    }
}

/// The node's current policy set.
#[derive(Debug, Default)]
pub struct PolicyStore {
    current: RwLock<Option<Arc<PolicySet>>>,
    last_error: Mutex<Option<String>>,
    refusals: AtomicU64,
    reloads: AtomicU64,
}

impl PolicyStore {
    /// An empty store: denies everything until a set loads.
    pub fn new() -> Self {
        Self::default()
    }

    /// The serving set, if any.
    pub fn current(&self) -> Option<Arc<PolicySet>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Readiness as reported by `/readyz`.
    pub fn status(&self) -> PolicyStatus {
        match self.current() {
            Some(set) => PolicyStatus::Ready {
                version: set.version().to_owned(),
            },
            None => PolicyStatus::NoPolicy {
                error: self
                    .last_error()
                    .unwrap_or_else(|| "not loaded yet".to_owned()),
            },
        }
    }

    /// The message of the last refused load, if the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many sets were refused since start.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// How many sets were installed since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Loads a set and installs it; on failure the serving set (if any) stays.
    ///
    /// # Errors
    ///
    /// The [`PolicyError`] that refused the new set (also kept in [`PolicyStore::last_error`]).
    pub fn reload(&self, base: &Path, extras: &[PathBuf]) -> Result<String, PolicyError> {
        match PolicySet::load(base, extras) {
            Ok(set) => Ok(self.install(set)),
            Err(e) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Installs an already loaded set; returns its version.
    pub fn install(&self, set: PolicySet) -> String {
        let version = set.version().to_owned();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(set));
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.reloads.fetch_add(1, Ordering::Relaxed);
        version
    }

    /// Decides a request, closed on failure: no set → deny `no_policy`; an evaluation error →
    /// deny `policy_error` with the error as the reason text. Returns the decision and the
    /// version that made it (`None` without a set).
    pub fn decide(&self, input: &InputDoc) -> (DecisionDoc, Option<String>) {
        let Some(set) = self.current() else {
            return (
                DecisionDoc::node_deny(REASON_NO_POLICY, self.status().to_string()),
                None,
            );
        };
        let decision = set
            .evaluate(input)
            .unwrap_or_else(|e| DecisionDoc::node_deny(REASON_POLICY_ERROR, e.to_string()));
        (decision, Some(set.version().to_owned()))
    }

    /// Polls `base` and `extras` every `interval` and reloads when a `.rego` file appears,
    /// disappears or changes. Refusals are logged with `tracing::warn`, counted, and not
    /// retried until the files change again. Must be called within a tokio runtime.
    pub fn spawn_watcher(
        self: Arc<Self>,
        base: PathBuf,
        extras: Vec<PathBuf>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_seen: Option<[u8; 32]> = None;
            loop {
                ticker.tick().await;
                let store = Arc::clone(&self);
                let (base, extras) = (base.clone(), extras.clone());
                let seen = last_seen;
                let polled = tokio::task::spawn_blocking(move || {
                    let print = fingerprint(&base, &extras);
                    if Some(print) == seen {
                        return print;
                    }
                    match store.reload(&base, &extras) {
                        Ok(version) => tracing::info!(policy.version = %version, "policy loaded"),
                        Err(e) => tracing::warn!(
                            error = %e,
                            refusals = store.refusals(),
                            serving = store.current().map(|s| s.version().to_owned()),
                            "policy refused; the previous policy stays"
                        ),
                    }
                    print
                })
                .await;
                match polled {
                    Ok(print) => last_seen = Some(print),
                    Err(e) => tracing::warn!(error = %e, "policy watcher poll failed"),
                }
            }
        })
    }
}

/// SHA-256 over every `.rego` file's path and content (or the read error) under the roots.
fn fingerprint(base: &Path, extras: &[PathBuf]) -> [u8; 32] {
    let mut h = Sha256::new();
    match read_policy_files(base, extras) {
        Ok(files) => {
            for f in files {
                h.update(f.relative.as_bytes());
                h.update([0]);
                h.update(f.source.as_bytes());
                h.update([0]);
            }
        }
        Err(e) => h.update(e.to_string().as_bytes()),
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const GOOD: &str = r#"package cellgate.authz
import rego.v1
decision := {"allow": false, "outcome": "deny", "capability": null, "mode": null,
  "reason": "no_capability", "reasons": [], "hint": null}
"#;

    fn write(dir: &Path, name: &str, body: &str) {
        std::fs::write(dir.join(name), body).unwrap();
    }

    #[test]
    fn empty_store_denies() {
        let store = PolicyStore::new();
        let (d, v) = store.decide(&InputDoc::default());
        assert!(!d.allow);
        assert_eq!(d.reason, REASON_NO_POLICY);
        assert!(v.is_none());
        assert!(store.status().to_string().starts_with("no valid policy: "));
    }

    #[test]
    fn reload_keeps_previous_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.rego", GOOD);
        let store = PolicyStore::new();
        let v1 = store.reload(dir.path(), &[]).unwrap();
        assert_eq!(
            store.status(),
            PolicyStatus::Ready {
                version: v1.clone()
            }
        );

        write(
            dir.path(),
            "a.rego",
            "package cellgate.authz\nimport rego.v1\ndecision := {\n",
        );
        let err = store.reload(dir.path(), &[]).unwrap_err();
        assert!(err.to_string().contains("a.rego:"), "{err}");
        assert_eq!(store.current().unwrap().version(), v1);
        assert_eq!(store.refusals(), 1);
        assert!(store.last_error().unwrap().contains("a.rego:"));

        write(
            dir.path(),
            "a.rego",
            &GOOD.replace("no_capability", "policy_denied"),
        );
        let v2 = store.reload(dir.path(), &[]).unwrap();
        assert_ne!(v1, v2);
        assert_eq!(store.current().unwrap().version(), v2);
        assert!(store.last_error().is_none());
        assert_eq!(store.decide(&InputDoc::default()).0.reason, "policy_denied");
    }

    #[test]
    fn no_policy_status_carries_the_error() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.rego",
            "package cellgate.authz\nimport rego.v1\nx if {\n",
        );
        let store = PolicyStore::new();
        assert!(store.reload(dir.path(), &[]).is_err());
        let status = store.status().to_string();
        assert!(status.starts_with("no valid policy: "), "{status}");
        assert!(status.contains("a.rego:"), "{status}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_picks_up_changes() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.rego", GOOD);
        let store = Arc::new(PolicyStore::new());
        let task = Arc::clone(&store).spawn_watcher(
            dir.path().to_path_buf(),
            vec![],
            Duration::from_millis(50),
        );
        let wait = |want: &'static str| {
            let store = Arc::clone(&store);
            async move {
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(1) {
                    if store.decide(&InputDoc::default()).0.reason == want {
                        return start.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("watcher did not install a policy answering {want} within 1 s");
            }
        };
        wait("no_capability").await;
        write(
            dir.path(),
            "a.rego",
            &GOOD.replace("no_capability", "policy_denied"),
        );
        wait("policy_denied").await;

        // A broken edit is refused and counted; the previous policy keeps answering.
        write(
            dir.path(),
            "a.rego",
            "package cellgate.authz\nimport rego.v1\nx if {\n",
        );
        let start = Instant::now();
        while store.refusals() == 0 && start.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.refusals(), 1);
        assert_eq!(store.decide(&InputDoc::default()).0.reason, "policy_denied");
        task.abort();
    }
}
