//! The node's registry of cells, keyed by uid, fed from a directory of AgentCell files (local
//! mode) or from the API server's AgentCell watch ([`crate::kubernetes`]).
//!
//! Each file is parsed strictly; a file that fails is refused (logged with its path and field
//! path, counted) and the cells it held before stay as they were, so a bad edit never widens or
//! drops anyone's access by accident. The registry is swapped atomically and every change bumps
//! the node's state generation, which makes open tunnels re-check their authorization. A watch
//! event changes one entry ([`CellStore::upsert`], [`CellStore::remove`]): only that cell's policy
//! document is rebuilt; the compiled policy is untouched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use cellgate_api::manifest::{parse_agent_cells, MAX_MANIFEST_BYTES};
use cellgate_api::model::Cell;
use cellgate_api::policy::CellDoc;

/// A cell as the node holds it: the model plus its policy document, built once per change.
#[derive(Debug)]
pub struct CellEntry {
    /// The model.
    pub cell: Arc<Cell>,
    /// `input.cell` for the policy.
    pub doc: CellDoc,
    /// The same, converted once for the policy engine (with its derived index).
    pub value: cellgate_policy::CellValue,
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
}

/// The policy document of a cell (`input.cell`).
pub fn cell_doc(cell: &Cell) -> CellDoc {
    CellDoc::from_model(cell)
}

type Snapshot = Arc<HashMap<String, Arc<CellEntry>>>;

/// The registry: an atomically swapped snapshot.
#[derive(Debug, Default)]
pub struct CellStore {
    snapshot: RwLock<Snapshot>,
    /// What each file last contributed (path -> cells), so a broken file keeps its old cells.
    by_file: RwLock<BTreeMap<PathBuf, Vec<Cell>>>,
    fingerprint: RwLock<Vec<(PathBuf, SystemTime, u64)>>,
    last_errors: RwLock<Vec<String>>,
}

impl CellEntry {
    /// The entry of `cell`: its policy document, converted once for the engine.
    pub fn new(cell: Cell, source: Option<PathBuf>) -> Self {
        let doc = cell_doc(&cell);
        Self {
            value: cellgate_policy::CellValue::new(&doc),
            cell: Arc::new(cell),
            doc,
            source,
        }
    }
}

impl CellStore {
    /// The cell with this uid.
    pub fn get(&self, uid: &str) -> Option<Arc<CellEntry>> {
        self.snapshot.read().ok()?.get(uid).cloned()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Number of cells.
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    /// Whether there is no cell.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Problems found in the last scan (file: message).
    pub fn last_errors(&self) -> Vec<String> {
        self.last_errors
            .read()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Replaces every cell (the Kubernetes path and tests use this).
    pub fn replace_all(&self, cells: Vec<Cell>) {
        let map = cells
            .into_iter()
            .map(|cell| {
                let doc = cell_doc(&cell);
                (
                    cell.uid.clone(),
                    Arc::new(CellEntry {
                        value: cellgate_policy::CellValue::new(&doc),
                        cell: Arc::new(cell),
                        doc,
                        source: None,
                    }),
                )
            })
            .collect();
        if let Ok(mut s) = self.snapshot.write() {
            *s = Arc::new(map);
        }
    }

    /// The cell named `namespace/name`, if any (a scan: the Kubernetes path uses it to map a pod
    /// without an owner reference to its cell).
    pub fn find(&self, namespace: &str, name: &str) -> Option<Arc<CellEntry>> {
        self.snapshot()
            .values()
            .find(|e| e.cell.namespace == namespace && e.cell.name == name)
            .cloned()
    }

    /// Adds or replaces one cell (an AgentCell watch event). Only this cell's entry is built;
    /// the snapshot is copied only when a reader still holds it. Returns the previous entry.
    pub fn upsert(&self, cell: Cell) -> Option<Arc<CellEntry>> {
        let entry = Arc::new(CellEntry::new(cell, None));
        let mut s = self.snapshot.write().ok()?;
        Arc::make_mut(&mut s).insert(entry.cell.uid.clone(), entry)
    }

    /// Removes one cell; returns it if it was there.
    pub fn remove(&self, uid: &str) -> Option<Arc<CellEntry>> {
        let mut s = self.snapshot.write().ok()?;
        if !s.contains_key(uid) {
            return None;
        }
        Arc::make_mut(&mut s).remove(uid)
    }

    /// The uids of every cell.
    pub fn uids(&self) -> Vec<String> {
        self.snapshot().keys().cloned().collect()
    }

    /// Scans `dir` if anything in it changed; returns whether the registry changed.
    pub fn rescan(&self, dir: &Path) -> bool {
        let mut files: Vec<(PathBuf, SystemTime, u64)> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .filter_map(|p| {
                    let m = std::fs::metadata(&p).ok()?;
                    Some((p, m.modified().ok()?, m.len()))
                })
                .collect(),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the cells directory; keeping the cells we have");
                return false;
            }
        };
        files.sort();
        {
            let Ok(mut fp) = self.fingerprint.write() else {
                return false;
            };
            if *fp == files {
                return false;
            }
            *fp = files.clone();
        }
        let mut errors = Vec::new();
        let Ok(mut by_file) = self.by_file.write() else {
            return false;
        };
        by_file.retain(|p, _| files.iter().any(|(f, _, _)| f == p));
        for (path, _, len) in &files {
            if *len as usize > MAX_MANIFEST_BYTES {
                errors.push(format!(
                    "{}: over the {MAX_MANIFEST_BYTES} byte limit",
                    path.display()
                ));
                continue;
            }
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let parsed = parse_agent_cells(&text)
                .map_err(|e| e.to_string())
                .and_then(|docs| {
                    docs.iter()
                        .map(|d| d.to_model().map_err(|e| e.to_string()))
                        .collect::<Result<Vec<_>, _>>()
                });
            match parsed {
                Ok(cells) => {
                    by_file.insert(path.clone(), cells);
                }
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
        }
        let mut map: HashMap<String, Arc<CellEntry>> = HashMap::new();
        for (path, cells) in by_file.iter() {
            for cell in cells {
                if let Some(prev) = map.get(&cell.uid) {
                    errors.push(format!(
                        "{}: cell {} is also defined in {}; keeping the first",
                        path.display(),
                        cell.key(),
                        prev.source
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    ));
                    continue;
                }
                map.insert(
                    cell.uid.clone(),
                    Arc::new(CellEntry {
                        value: cellgate_policy::CellValue::new(&cell_doc(cell)),
                        doc: cell_doc(cell),
                        cell: Arc::new(cell.clone()),
                        source: Some(path.clone()),
                    }),
                );
            }
        }
        for e in &errors {
            tracing::warn!(error = %e, "refused a cell file; its previous cells stay in force");
        }
        if let Ok(mut le) = self.last_errors.write() {
            *le = errors;
        }
        tracing::info!(cells = map.len(), dir = %dir.display(), "cells loaded");
        if let Ok(mut s) = self.snapshot.write() {
            *s = Arc::new(map);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CELL: &str = "apiVersion: cellgate.dev/v1alpha1\nkind: AgentCell\nmetadata: {name: NAME}\nspec:\n  capabilities:\n    - name: web\n      destinations: [{host: example.com}]\n";

    #[test]
    fn broken_file_keeps_its_previous_cells() {
        let dir = tempfile::tempdir().unwrap();
        let store = CellStore::default();
        std::fs::write(dir.path().join("a.yaml"), CELL.replace("NAME", "a")).unwrap();
        std::fs::write(dir.path().join("b.yaml"), CELL.replace("NAME", "b")).unwrap();
        assert!(store.rescan(dir.path()));
        assert_eq!(store.len(), 2);
        assert!(!store.rescan(dir.path()), "no change, no reload");
        // Break a.yaml: its cell stays, the error is reported with file and field path.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(
            dir.path().join("a.yaml"),
            CELL.replace("NAME", "a").replace("example.com", "\"\""),
        )
        .unwrap();
        assert!(store.rescan(dir.path()));
        assert!(store.get("local:default:a").is_some());
        let errs = store.last_errors();
        assert!(
            errs[0].contains("a.yaml")
                && errs[0].contains("spec.capabilities[0].destinations[0].host: empty host"),
            "{errs:?}"
        );
        // Removing a file removes its cells.
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        assert!(store.rescan(dir.path()));
        assert!(store.get("local:default:b").is_none());
    }

    #[test]
    fn upsert_and_remove_change_one_entry() {
        let cell = |name: &str| {
            parse_agent_cells(&CELL.replace("NAME", name)).unwrap()[0]
                .to_model()
                .unwrap()
        };
        let store = CellStore::default();
        assert!(store.upsert(cell("a")).is_none());
        assert!(store.upsert(cell("b")).is_none());
        let held = store.snapshot();
        let b = store.get("local:default:b").unwrap();
        let mut a2 = cell("a");
        a2.suspended = true;
        let prev = store.upsert(a2).unwrap();
        assert!(!prev.cell.suspended);
        assert!(store.get("local:default:a").unwrap().cell.suspended);
        // The other cell's entry is the same allocation: it was not rebuilt.
        assert!(Arc::ptr_eq(&b, &store.get("local:default:b").unwrap()));
        // A reader's snapshot is not changed under it.
        assert!(!held["local:default:a"].cell.suspended);
        assert_eq!(
            store.find("default", "b").unwrap().cell.uid,
            "local:default:b"
        );
        assert!(store.remove("local:default:a").is_some());
        assert!(store.remove("local:default:a").is_none());
        assert_eq!(store.uids(), vec!["local:default:b".to_string()]);
    }
}
