//! The trust bundle every cell's CA ConfigMap carries, and keeping it current.
//!
//! At start the operator reads the cell CA (`--ca-cert`, which may hold several certificates
//! during a CA rotation) and the system roots (`--system-roots`, a file in the operator's image,
//! or `none`) into one [`TrustBundle`] ([`TrustFiles::load`]): refused, and the operator does not
//! start, when either holds no certificate or a malformed one. [`Trust`] shares the current
//! bundle between the reconciler (which writes it into each cell's ConfigMap through
//! [`crate::desired::ca_bundle`]) and [`watch`], which re-reads both files every
//! [`POLL_INTERVAL`]: when their content changes and still makes a valid bundle, it is swapped in
//! and [`Trust::changes`] fires, on which the controller reconciles every cell
//! (`reconcile_all_on`). A change that does not make a bundle (a file half-written or gone) is
//! logged and the previous bundle stays.
//!
//! The files are compared by content, not by modification time: a ConfigMap or Secret volume is
//! updated by kubelet swapping a symlink, which leaves the old file's time as it was.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cellgate_tls::TrustBundle;
use futures_util::Stream;

/// How often [`watch`] re-reads the CA and system-roots files.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Most bytes the bundle, the trust store and the cell CA may take together: a ConfigMap holds at
/// most 1 MiB (keys included), and the object needs room for its metadata.
pub const MAX_BUNDLE_BYTES: usize = 1_000_000;

/// Where the bundle's inputs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustFiles {
    /// The cell CA certificate(s), PEM (`--ca-cert`).
    pub ca_cert: PathBuf,
    /// The system roots, PEM (`--system-roots`); `None`: the bundle holds the cell CA only.
    pub system_roots: Option<PathBuf>,
}

/// The text of both inputs as last read: what [`watch`] compares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustTexts {
    /// The CA file's text.
    pub ca_cert: String,
    /// The system roots file's text (`None` when not used).
    pub system_roots: Option<String>,
}

/// Why the bundle could not be built from the files.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustLoadError {
    /// The CA file cannot be read or holds no usable certificate.
    #[error("cannot use the CA certificate {path}: {reason}; check --ca-cert")]
    CaCert {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The system roots file cannot be read or holds no usable certificate.
    #[error("cannot use the system roots {path}: {reason}; check --system-roots (CELLGATE_SYSTEM_ROOTS): a PEM bundle of CA certificates, or `none` to give agents the cell CA only")]
    SystemRoots {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The bundle would not fit in a ConfigMap.
    #[error("the trust bundle would take {bytes} bytes, more than a ConfigMap holds ({MAX_BUNDLE_BYTES}); give --system-roots a smaller file")]
    TooLarge {
        /// Bundle, trust store and cell CA together.
        bytes: usize,
    },
}

impl TrustFiles {
    /// Reads both files.
    ///
    /// # Errors
    /// [`TrustLoadError::CaCert`] when the CA file cannot be read (or holds no usable certificate
    /// while the roots file cannot be read either), [`TrustLoadError::SystemRoots`] when the roots
    /// file cannot be read.
    pub fn read(&self) -> Result<TrustTexts, TrustLoadError> {
        let ca_cert = read(&self.ca_cert).map_err(|reason| TrustLoadError::CaCert {
            path: self.ca_cert.clone(),
            reason,
        })?;
        let system_roots = match &self.system_roots {
            Some(p) => Some(read(p).map_err(|reason| {
                // The CA is the operator's own input: its faults are reported before the roots'.
                match cellgate_tls::trust::parse_certificates(&ca_cert) {
                    Err(e) => TrustLoadError::CaCert {
                        path: self.ca_cert.clone(),
                        reason: e.to_string(),
                    },
                    Ok(_) => TrustLoadError::SystemRoots {
                        path: p.clone(),
                        reason,
                    },
                }
            })?),
            None => None,
        };
        Ok(TrustTexts {
            ca_cert,
            system_roots,
        })
    }

    /// The bundle of `texts` (as read from these files).
    ///
    /// # Errors
    /// [`TrustLoadError`]: a file with no certificate or a malformed one, or a bundle too large
    /// for a ConfigMap.
    pub fn build(&self, texts: &TrustTexts) -> Result<TrustBundle, TrustLoadError> {
        let bundle = TrustBundle::new(&texts.ca_cert, texts.system_roots.as_deref()).map_err(
            |e| match e {
                cellgate_tls::TrustError::CellCa(e) => TrustLoadError::CaCert {
                    path: self.ca_cert.clone(),
                    reason: e.to_string(),
                },
                cellgate_tls::TrustError::SystemRoots(e) => TrustLoadError::SystemRoots {
                    path: self.system_roots.clone().unwrap_or_default(),
                    reason: e.to_string(),
                },
            },
        )?;
        let bytes = bundle.pem().len() + bundle.pkcs12().len() + bundle.cell_ca_pem().len();
        if bytes > MAX_BUNDLE_BYTES {
            return Err(TrustLoadError::TooLarge { bytes });
        }
        Ok(bundle)
    }

    /// Reads both files and builds the bundle.
    ///
    /// # Errors
    /// As [`TrustFiles::read`] and [`TrustFiles::build`].
    pub fn load(&self) -> Result<(TrustTexts, TrustBundle), TrustLoadError> {
        let texts = self.read()?;
        let bundle = self.build(&texts)?;
        Ok((texts, bundle))
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

/// The current bundle, shared by the reconciler and [`watch`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Trust {
    current: Arc<RwLock<Arc<TrustBundle>>>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Trust {
    /// Starts with `bundle`.
    pub fn new(bundle: TrustBundle) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(bundle))),
            generation: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// The bundle to write now.
    pub fn current(&self) -> Arc<TrustBundle> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Makes `bundle` current. When it differs from the current one, every [`Trust::changes`]
    /// stream yields, and `true` is returned.
    pub fn replace(&self, bundle: TrustBundle) -> bool {
        {
            let mut current = self
                .current
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if **current == bundle {
                return false;
            }
            *current = Arc::new(bundle);
        }
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
        true
    }

    /// Yields once per change of the bundle made after this call (changes in quick succession
    /// may yield once): the trigger of the controller's `reconcile_all_on`.
    pub fn changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        let rx = self.generation.subscribe();
        futures_util::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
    }
}

impl From<TrustBundle> for Trust {
    fn from(bundle: TrustBundle) -> Self {
        Self::new(bundle)
    }
}

/// What one look at the files found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// The same text as before.
    Unchanged,
    /// New text, and a new bundle made current.
    Changed,
    /// New text with the same certificates (a comment, the order of blocks): nothing to write.
    SameCertificates,
    /// New text that does not make a bundle, or a file that cannot be read: the previous bundle
    /// stays; `new` tells whether this refusal was already reported.
    Refused {
        /// Why.
        error: TrustLoadError,
        /// Whether this text was not refused before (so it is logged once, not every poll).
        new: bool,
    },
}

/// One look at `files`: compares their text with `seen` (the text of the current bundle) and,
/// when it changed and makes a valid bundle, makes that bundle current in `trust`. `refused`
/// remembers the last text refused, so that a bad file is reported once.
pub fn poll_once(
    files: &TrustFiles,
    trust: &Trust,
    seen: &mut TrustTexts,
    refused: &mut Option<TrustTexts>,
) -> Poll {
    let texts = match files.read() {
        Ok(t) => t,
        Err(error) => {
            // Retried on the next poll; reported once while it lasts.
            let key = TrustTexts {
                ca_cert: format!("\0{error}"),
                system_roots: None,
            };
            let new = refused.as_ref() != Some(&key);
            *refused = Some(key);
            return Poll::Refused { error, new };
        }
    };
    if texts == *seen {
        *refused = None;
        return Poll::Unchanged;
    }
    match files.build(&texts) {
        Ok(bundle) => {
            *seen = texts;
            *refused = None;
            if trust.replace(bundle) {
                Poll::Changed
            } else {
                Poll::SameCertificates
            }
        }
        Err(error) => {
            let new = refused.as_ref() != Some(&texts);
            *refused = Some(texts);
            Poll::Refused { error, new }
        }
    }
}

/// Re-reads `files` every `interval` until the process ends, keeping `trust` current (see
/// [`poll_once`]); `seen` is the text the current bundle was built from. Run it on every replica:
/// it only reads files, and the controllers of the leader act on [`Trust::changes`].
pub async fn watch(files: TrustFiles, trust: Trust, mut seen: TrustTexts, interval: Duration) {
    let mut refused = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match poll_once(&files, &trust, &mut seen, &mut refused) {
            Poll::Unchanged => {}
            Poll::Changed => {
                let b = trust.current();
                tracing::info!(
                    ca_cert = %files.ca_cert.display(),
                    cell_cas = b.cell_cas().len(),
                    system_roots = b.system_roots().len(),
                    "trust bundle changed: writing it into every cell's CA ConfigMap"
                );
            }
            Poll::SameCertificates => {
                tracing::debug!("trust files changed, their certificates did not");
            }
            Poll::Refused { error, new } => {
                if new {
                    tracing::warn!(error = %error, "trust files changed but are refused; cells keep the previous bundle");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn ca(name: &str) -> String {
        cellgate_tls::Ca::generate(name)
            .expect("ca")
            .cert_pem()
            .to_string()
    }

    fn files(dir: &Path, roots: bool) -> TrustFiles {
        TrustFiles {
            ca_cert: dir.join("ca.crt"),
            system_roots: roots.then(|| dir.join("roots.pem")),
        }
    }

    #[test]
    fn load_refuses_missing_empty_and_malformed_files_naming_the_setting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = files(dir.path(), true);
        let err = f.load().expect_err("no ca");
        assert!(matches!(err, TrustLoadError::CaCert { .. }), "{err}");
        std::fs::write(dir.path().join("ca.crt"), ca("cell")).expect("write");
        let err = f.load().expect_err("no roots file");
        assert!(
            err.to_string().starts_with(&format!(
                "cannot use the system roots {}: ",
                dir.path().join("roots.pem").display()
            )),
            "{err}"
        );
        assert!(err.to_string().contains("`none`"), "{err}");
        std::fs::write(dir.path().join("roots.pem"), "# no certificates\n").expect("write");
        let err = f.load().expect_err("empty roots");
        assert!(
            err.to_string().contains("no PEM CERTIFICATE block"),
            "{err}"
        );
        std::fs::write(dir.path().join("roots.pem"), ca("root")).expect("write");
        let (_, b) = f.load().expect("valid");
        assert_eq!((b.cell_cas().len(), b.system_roots().len()), (1, 1));
        let (texts, b) = files(dir.path(), false).load().expect("cell CA only");
        assert_eq!(texts.system_roots, None);
        assert_eq!((b.cell_cas().len(), b.system_roots().len()), (1, 0));
        // A bundle that cannot fit a ConfigMap.
        let many: String = (0..1000).map(|i| ca(&format!("root {i}"))).collect();
        std::fs::write(dir.path().join("roots.pem"), many).expect("write");
        let err = f.load().expect_err("too large");
        assert!(matches!(err, TrustLoadError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_changed_file_swaps_the_bundle_and_fires_the_trigger_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = files(dir.path(), true);
        let (old, root) = (ca("cell old"), ca("root"));
        std::fs::write(dir.path().join("ca.crt"), &old).expect("write");
        std::fs::write(dir.path().join("roots.pem"), &root).expect("write");
        let (mut seen, bundle) = f.load().expect("load");
        let trust = Trust::new(bundle);
        let mut changes = Box::pin(trust.changes());
        let mut refused = None;
        assert_eq!(
            poll_once(&f, &trust, &mut seen, &mut refused),
            Poll::Unchanged
        );

        // The rotation adds the new CA beside the old one.
        let new = ca("cell new");
        std::fs::write(dir.path().join("ca.crt"), format!("{old}{new}")).expect("write");
        assert_eq!(
            poll_once(&f, &trust, &mut seen, &mut refused),
            Poll::Changed
        );
        assert_eq!(trust.current().cell_cas().len(), 2);
        tokio::time::timeout(Duration::from_secs(1), changes.next())
            .await
            .expect("a trigger")
            .expect("stream open");
        assert_eq!(
            poll_once(&f, &trust, &mut seen, &mut refused),
            Poll::Unchanged
        );

        // A broken file keeps the bundle, is reported once, fires nothing.
        std::fs::write(dir.path().join("roots.pem"), "garbage").expect("write");
        let first = poll_once(&f, &trust, &mut seen, &mut refused);
        assert!(
            matches!(first, Poll::Refused { new: true, .. }),
            "{first:?}"
        );
        let again = poll_once(&f, &trust, &mut seen, &mut refused);
        assert!(
            matches!(again, Poll::Refused { new: false, .. }),
            "{again:?}"
        );
        assert_eq!(trust.current().system_roots().len(), 1);
        // The system roots change: fires again.
        let root2 = ca("root 2");
        std::fs::write(dir.path().join("roots.pem"), format!("{root}{root2}")).expect("write");
        assert_eq!(
            poll_once(&f, &trust, &mut seen, &mut refused),
            Poll::Changed
        );
        assert_eq!(trust.current().system_roots().len(), 2);
        // Text that differs but holds the same certificates: no write, no trigger.
        std::fs::write(
            dir.path().join("roots.pem"),
            format!("# roots\n{root}\n{root2}"),
        )
        .expect("write");
        assert_eq!(
            poll_once(&f, &trust, &mut seen, &mut refused),
            Poll::SameCertificates
        );
        tokio::time::timeout(Duration::from_secs(1), changes.next())
            .await
            .expect("the second trigger")
            .expect("stream open");
        assert!(
            tokio::time::timeout(Duration::from_millis(100), changes.next())
                .await
                .is_err(),
            "no trigger for the same certificates"
        );
    }

    #[tokio::test]
    async fn watch_polls_the_files_on_its_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = files(dir.path(), false);
        std::fs::write(dir.path().join("ca.crt"), ca("cell old")).expect("write");
        let (seen, bundle) = f.load().expect("load");
        let trust = Trust::new(bundle);
        let mut changes = Box::pin(trust.changes());
        let task = tokio::spawn(watch(f, trust.clone(), seen, Duration::from_millis(20)));
        let new = ca("cell new");
        std::fs::write(dir.path().join("ca.crt"), &new).expect("write");
        tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .expect("the watcher saw the change")
            .expect("stream open");
        assert_eq!(trust.current().cell_ca_pem(), new);
        task.abort();
    }
}
