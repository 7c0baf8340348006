//! Packs: the unit a policy set is made of, versioned and switched between `enforce` and
//! `shadow` one at a time.
//!
//! A pack is a directory that directly holds a `*.rego` file or a `pack.yaml` manifest; every
//! file below it (subdirectories included) belongs to it. Its name is the directory's name, its
//! version the first 12 hex digits of SHA-256 over its files (paths relative to the pack, and
//! contents, `pack.yaml` included), its mode the manifest's `mode` (`enforce` when there is no
//! manifest). Directories that hold neither are walked to find packs, so `--policies DIR` may
//! be one pack or a directory of packs, and `policies/` (with `base/` and `packs/*/`) is a set of
//! three.
//!
//! The grouping is computed from [`PolicyFile::relative`] alone, so sets built in memory
//! ([`crate::PolicySet::from_files`]) get the same packs as sets read from disk.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::PolicyError;
use crate::set::PolicyFile;

/// File name of a pack's manifest.
pub const MANIFEST_NAME: &str = "pack.yaml";
/// Length of a pack's (and a set's) version in hex digits.
pub(crate) const VERSION_HEX_LEN: usize = 12;

/// Whether a pack's `deny` rules deny, or only record what they would deny.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackMode {
    /// Its `deny` entries deny the request (its `shadow_deny` entries are still only recorded).
    #[default]
    Enforce,
    /// Its `deny` entries become shadow denials: the decision is `shadow_deny`, recorded as
    /// would-deny, and the request goes on.
    Shadow,
}

impl PackMode {
    /// `enforce` or `shadow`.
    pub fn as_str(self) -> &'static str {
        match self {
            PackMode::Enforce => "enforce",
            PackMode::Shadow => "shadow",
        }
    }
}

impl fmt::Display for PackMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `pack.yaml`, parsed strictly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackManifest {
    /// `enforce` (the default) or `shadow`.
    #[serde(default)]
    pub mode: PackMode,
    /// Free text for people; not used by the engine.
    #[serde(default)]
    pub description: Option<String>,
}

impl PackManifest {
    /// Parses a manifest.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Manifest`] naming the file and the field.
    pub fn parse(path: &Path, text: &str) -> Result<Self, PolicyError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text).map_err(|e| PolicyError::Manifest {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// One pack of a loaded set, as [`crate::PolicySet::packs`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackInfo {
    /// The pack directory's name (`base`, `deny-destructive`).
    pub name: String,
    /// First 12 hex digits of SHA-256 over its files (relative paths and contents).
    pub version: String,
    /// From its `pack.yaml`; `enforce` without one.
    pub mode: PackMode,
    /// Its files, as read (Rego files and the manifest).
    pub files: Vec<PathBuf>,
    /// The layer packages it declares: `x` for `package cellgate.layers.x` (sorted).
    pub layers: Vec<String>,
}

/// What a pack did in one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PackEffect {
    /// An entry of one of its enforced `deny` sets denied the request.
    Deny,
    /// An entry of its `deny` (pack in shadow mode) or `shadow_deny` sets would have denied it.
    ShadowDeny,
}

/// A pack that took part in a decision by denying or shadow-denying it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackVerdict {
    /// [`PackInfo::name`].
    pub name: String,
    /// [`PackInfo::version`].
    pub version: String,
    /// What it did.
    pub effect: PackEffect,
}

/// The packs of a list of files, before parsing: which files each holds.
#[derive(Debug)]
pub(crate) struct Grouped {
    /// Name, directory (relative), manifest, version, file indices.
    pub(crate) packs: Vec<PackDraft>,
}

#[derive(Debug)]
pub(crate) struct PackDraft {
    pub(crate) name: String,
    pub(crate) mode: PackMode,
    pub(crate) version: String,
    pub(crate) files: Vec<usize>,
}

/// Whether `f` is a pack manifest rather than Rego.
pub(crate) fn is_manifest(f: &PolicyFile) -> bool {
    f.relative.rsplit('/').next() == Some(MANIFEST_NAME)
}

fn dir_of(relative: &str) -> &str {
    relative.rsplit_once('/').map_or("", |(d, _)| d)
}

/// Groups `files` into packs (see the module documentation) and reads their manifests.
///
/// # Errors
///
/// [`PolicyError::Manifest`] for a manifest that does not parse, [`PolicyError::DuplicatePack`]
/// when two packs share a name.
pub(crate) fn group(files: &[PolicyFile]) -> Result<Grouped, PolicyError> {
    let dirs: BTreeSet<&str> = files.iter().map(|f| dir_of(&f.relative)).collect();
    let mut by_dir: BTreeMap<String, usize> = BTreeMap::new();
    let mut drafts: Vec<(String, String, Vec<usize>)> = Vec::new(); // dir, name, files
    for (i, f) in files.iter().enumerate() {
        let dir = dir_of(&f.relative);
        let comps: Vec<&str> = dir.split('/').collect();
        let pack_dir = (1..=comps.len())
            .map(|k| comps.get(..k).unwrap_or_default().join("/"))
            .find(|p| dirs.contains(p.as_str()))
            .unwrap_or_else(|| dir.to_owned());
        let slot = match by_dir.get(&pack_dir) {
            Some(&slot) => slot,
            None => {
                let name = pack_name(f, &pack_dir);
                drafts.push((pack_dir.clone(), name, Vec::new()));
                let slot = drafts.len().saturating_sub(1);
                by_dir.insert(pack_dir, slot);
                slot
            }
        };
        if let Some(d) = drafts.get_mut(slot) {
            d.2.push(i);
        }
    }
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut packs = Vec::with_capacity(drafts.len());
    for (dir, name, members) in drafts {
        if let Some(other) = seen.insert(name.clone(), dir.clone()) {
            return Err(PolicyError::DuplicatePack {
                name,
                first: other,
                second: dir,
            });
        }
        let mut mode = PackMode::Enforce;
        let mut h = Vec::with_capacity(members.len());
        for &i in &members {
            let Some(f) = files.get(i) else { continue };
            let inner = f
                .relative
                .strip_prefix(dir.as_str())
                .map_or(f.relative.as_str(), |r| r.trim_start_matches('/'));
            if is_manifest(f) && inner == MANIFEST_NAME {
                mode = PackManifest::parse(&f.path, &f.source)?.mode;
            }
            h.push((inner, f.source.as_str()));
        }
        packs.push(PackDraft {
            name,
            mode,
            version: hash_pairs(h),
            files: members,
        });
    }
    Ok(Grouped { packs })
}

/// The name of the directory holding the pack: `f.path` without as many trailing components as
/// `f.relative` has below `pack_dir` (so a root's own name, e.g. `packs`, when files sit at the
/// top of `--policies`); the last component of `pack_dir` when the path is too short.
fn pack_name(f: &PolicyFile, pack_dir: &str) -> String {
    let below = f
        .relative
        .strip_prefix(pack_dir)
        .unwrap_or(&f.relative)
        .trim_start_matches('/')
        .split('/')
        .count();
    f.path
        .ancestors()
        .nth(below)
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| pack_dir.rsplit('/').next().unwrap_or(pack_dir).to_owned())
}

/// First 12 hex digits of SHA-256 over (path, NUL, content, NUL) in sorted order.
pub(crate) fn hash_pairs(mut pairs: Vec<(&str, &str)>) -> String {
    pairs.sort_unstable();
    let mut h = Sha256::new();
    for (path, source) in pairs {
        h.update(path.as_bytes());
        h.update([0]);
        h.update(source.as_bytes());
        h.update([0]);
    }
    let mut v = hex::encode(h.finalize());
    v.truncate(VERSION_HEX_LEN);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str, relative: &str, source: &str) -> PolicyFile {
        PolicyFile {
            path: PathBuf::from(path),
            relative: relative.into(),
            source: source.into(),
        }
    }

    #[test]
    fn groups_directories_into_packs() {
        let files = vec![
            f("/p/base/a.rego", "0/base/a.rego", "a"),
            f("/p/base/lib/b.rego", "0/base/lib/b.rego", "b"),
            f(
                "/p/packs/x/pack.yaml",
                "0/packs/x/pack.yaml",
                "mode: shadow\n",
            ),
            f("/p/packs/x/sub/x.rego", "0/packs/x/sub/x.rego", "x"),
            f("/etc/flat/y.rego", "1/y.rego", "y"),
        ];
        let g = group(&files).unwrap();
        let got: Vec<(&str, PackMode, &[usize])> = g
            .packs
            .iter()
            .map(|p| (p.name.as_str(), p.mode, p.files.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("base", PackMode::Enforce, &[0, 1][..]),
                ("x", PackMode::Shadow, &[2, 3][..]),
                ("flat", PackMode::Enforce, &[4][..]),
            ]
        );
    }

    #[test]
    fn version_follows_content_not_location() {
        let a = group(&[f("/a/p/x.rego", "0/p/x.rego", "same")]).unwrap();
        let b = group(&[f("/b/q/p/x.rego", "packs/0/q/p/x.rego", "same")]).unwrap();
        assert_eq!(a.packs[0].version, b.packs[0].version);
        let c = group(&[f("/a/p/x.rego", "0/p/x.rego", "changed")]).unwrap();
        assert_ne!(a.packs[0].version, c.packs[0].version);
        assert_eq!(a.packs[0].version.len(), VERSION_HEX_LEN);
    }

    #[test]
    fn manifests_are_strict_and_names_unique() {
        let bad = [
            f("/p/x/pack.yaml", "0/x/pack.yaml", "mode: audit\n"),
            f("/p/x/x.rego", "0/x/x.rego", "x"),
        ];
        let e = group(&bad).unwrap_err();
        assert!(e.to_string().starts_with("/p/x/pack.yaml: "), "{e}");
        let unknown = [f("/p/x/pack.yaml", "0/x/pack.yaml", "mdoe: shadow\n")];
        assert!(group(&unknown).is_err());
        let dup = [
            f("/p/a/x/x.rego", "0/a/x/x.rego", "x"),
            f("/p/b/x/x.rego", "0/b/x/x.rego", "x"),
        ];
        assert!(matches!(
            group(&dup),
            Err(PolicyError::DuplicatePack { .. })
        ));
    }
}
