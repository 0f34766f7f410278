//! Search across many images (the tags of a repository, the repositories of
//! a registry) with each distinct file of each distinct layer read once.
//!
//! A [`Plan`] takes the images one at a time: their merged trees say which
//! layer and which offset each visible file comes from (and, with deleted
//! entries, which files a later layer hid). Files are keyed by the layer's
//! digest and the offset of their bytes, so N tags on one base add only
//! the files of the layers they do not share. [`Plan::search`] then reads
//! each distinct file once ([`super::grep::search`]) and reports a match for
//! every image and path that shows, or hid, that file. One image is a plan
//! of one: `rimg grep` of a single reference takes the same path, so which
//! files a search takes (roots, `--include`/`--exclude`, `--deleted`) and
//! the order of its results are decided here once.
//!
//! Trusts the trees and layers it is given (they come from the cache, which
//! checked them); owns nothing on disk.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::grep::{self, Filter, Found, GrepError, Target};
use crate::cache::Layer;
use crate::layer::{EntryKind, LayerIndex};
use crate::overlay::tree::{Tree, TreeError};

/// One image of the search, as the caller names it.
#[derive(Debug, Clone)]
pub struct ImageName {
    /// The full reference (`registry/repository:tag`).
    pub reference: String,
    /// The tag (or digest) it is reported under.
    pub tag: String,
}

/// Where one image shows (or hid) one distinct file.
#[derive(Debug, Clone)]
struct Sighting {
    image: usize,
    path: Arc<[u8]>,
    /// The layer of that image holding the bytes.
    layer: usize,
    hidden_by: Option<usize>,
}

/// One match for one image and path (or, asked for misses, one file
/// searched without a match: an empty [`Found`]).
#[derive(Debug, Clone)]
pub struct Hit {
    /// Index into [`Plan::images`].
    pub image: usize,
    /// The path, relative to the image's root.
    pub path: Arc<[u8]>,
    /// The layer of that image holding the bytes, and its digest.
    pub layer: usize,
    pub digest: String,
    /// For a file only `--deleted` finds: the layer that hid it.
    pub hidden_by: Option<usize>,
    pub found: Arc<Found>,
}

/// What was searched and found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// In image order, then path, then visible before deleted, then layer.
    pub hits: Vec<Hit>,
    /// Distinct files searched out of those planned (fewer when stopped).
    pub searched: usize,
}

/// The distinct files of many images, with where each image shows them.
#[derive(Default)]
pub struct Plan {
    roots: Vec<Vec<u8>>,
    filter: Filter,
    images: Vec<ImageName>,
    /// Distinct layers: `(digest, read by range)` to position.
    layer_at: HashMap<(String, bool), usize>,
    layers: Vec<Arc<Layer>>,
    digests: Vec<String>,
    /// Distinct files: `(layer position, offset)` to target.
    file_at: HashMap<(usize, u64), usize>,
    targets: Vec<Target<'static>>,
    seen: Vec<Vec<Sighting>>,
}

impl Plan {
    /// A plan to search below `roots` (relative paths; empty for the
    /// root) the files `filter` takes, in each image added.
    pub fn new(roots: Vec<Vec<u8>>, filter: Filter) -> Plan {
        Plan {
            roots,
            filter,
            ..Plan::default()
        }
    }

    pub fn images(&self) -> &[ImageName] {
        &self.images
    }

    /// Distinct files to search, and their bytes.
    pub fn size(&self) -> (usize, u64) {
        (
            self.targets.len(),
            self.targets.iter().map(|t| t.size).sum(),
        )
    }

    /// Distinct layers the images hold.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Adds an image: the regular files of `tree` at or below each of the
    /// plan's roots (one the image lacks adds nothing) that its filter
    /// takes, and with `deleted` those files that [`super::deleted`] finds
    /// below them too.
    pub fn add(
        &mut self,
        name: ImageName,
        tree: &Tree,
        layers: &[Arc<Layer>],
        digests: &[String],
        deleted: Option<&[LayerIndex]>,
    ) -> Result<(), TreeError> {
        let mut files = Vec::new();
        for r in &self.roots {
            // Across images a path may be in some only: where it is not,
            // there is nothing below it to search.
            match tree.resolve(r, true) {
                Ok(id) => self.filter.files_below(tree, id, r, &mut files),
                Err(TreeError::NotFound(_) | TreeError::NotADirectory(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let indexes = deleted.unwrap_or_default();
        let mut hidden = Vec::new();
        if deleted.is_some() {
            for d in super::deleted(indexes)? {
                let under = self.roots.iter().any(|r| {
                    r.is_empty() || d.path == *r || d.path.starts_with(&[&r[..], b"/"].concat())
                });
                let file = indexes[d.layer].entries[d.entry].kind == EntryKind::File;
                if file && under && self.filter.file(&d.path) {
                    hidden.push(d);
                }
            }
        }
        let image = self.images.len();
        self.images.push(name);
        // Where this image's layers sit among the distinct ones.
        let at: Vec<usize> = layers
            .iter()
            .zip(digests)
            .map(|(l, d)| {
                let key = (d.clone(), l.ranged().is_some());
                *self.layer_at.entry(key).or_insert_with(|| {
                    self.layers.push(Arc::clone(l));
                    self.digests.push(d.clone());
                    self.layers.len() - 1
                })
            })
            .collect();
        for (path, id) in files {
            let n = tree.node(id);
            let layer = n.layer as usize;
            let Some(&pos) = at.get(layer) else { continue };
            let sighting = Sighting {
                image,
                path: path.into(),
                layer,
                hidden_by: None,
            };
            self.place(pos, n.offset, n.size, n.sparse(), sighting);
        }
        for d in hidden {
            let Some(&pos) = at.get(d.layer) else {
                continue;
            };
            let e = &indexes[d.layer].entries[d.entry];
            let sparse = e.sparse.as_deref().map(|s| Cow::Owned(s.to_vec()));
            let sighting = Sighting {
                image,
                path: d.path.into(),
                layer: d.layer,
                hidden_by: Some(d.hidden_by),
            };
            self.place(pos, e.offset, e.size, sparse, sighting);
        }
        Ok(())
    }

    fn place(
        &mut self,
        layer: usize,
        offset: u64,
        size: u64,
        sparse: Option<Cow<'static, [crate::layer::Segment]>>,
        s: Sighting,
    ) {
        let i = *self.file_at.entry((layer, offset)).or_insert_with(|| {
            self.targets.push(Target {
                path: s.path.to_vec(),
                layer,
                offset,
                size,
                sparse,
                hidden_by: None,
            });
            self.seen.push(Vec::new());
            self.targets.len() - 1
        });
        self.seen[i].push(s);
    }

    /// Reads each distinct file once; every image and path showing a file
    /// that matched gets a [`Hit`], and with `misses` every one showing a
    /// file searched without a match too (with an empty [`Found`]: grep's
    /// `-L` and `-c` name those). `progress` hears the bytes searched.
    pub fn search(
        &self,
        opts: &grep::Options,
        misses: bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Outcome, GrepError> {
        let collect = Collect {
            plan: self,
            found: Mutex::new(Vec::new()),
            // An empty file is searched by having nothing to read.
            done: self
                .targets
                .iter()
                .map(|t| AtomicBool::new(t.size == 0))
                .collect(),
            searched: AtomicU64::new(0),
            progress,
        };
        grep::search(&self.targets, &self.layers, &self.digests, opts, &collect)?;
        let mut found: Vec<Option<Arc<Found>>> = vec![None; self.targets.len()];
        for (i, f) in collect
            .found
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
        {
            found[i] = Some(Arc::new(f));
        }
        let none = Arc::new(Found::default());
        let mut hits = Vec::new();
        for (i, f) in found.into_iter().enumerate() {
            let f = match f {
                Some(f) => f,
                None if misses && collect.done[i].load(Ordering::Relaxed) => Arc::clone(&none),
                None => continue,
            };
            let pos = self.targets[i].layer;
            for s in &self.seen[i] {
                hits.push(Hit {
                    image: s.image,
                    path: Arc::clone(&s.path),
                    layer: s.layer,
                    digest: self.digests[pos].clone(),
                    hidden_by: s.hidden_by,
                    found: Arc::clone(&f),
                });
            }
        }
        hits.sort_by(|a, b| {
            let key = |h: &Hit| {
                (
                    h.image,
                    Arc::clone(&h.path),
                    h.hidden_by.is_some(),
                    h.layer,
                    h.hidden_by,
                )
            };
            key(a).cmp(&key(b))
        });
        let searched = collect.searched.load(Ordering::Relaxed) as usize;
        Ok(Outcome { hits, searched })
    }
}

/// Gathers what matched, by target, and which targets were searched.
struct Collect<'a> {
    plan: &'a Plan,
    found: Mutex<Vec<(usize, Found)>>,
    done: Vec<AtomicBool>,
    searched: AtomicU64,
    progress: &'a (dyn Fn(u64) + Sync),
}

impl grep::Report for Collect<'_> {
    fn found(&self, t: &Target<'_>, found: &Found) {
        let Some(&i) = self.plan.file_at.get(&(t.layer, t.offset)) else {
            return;
        };
        self.found
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((i, found.clone()));
    }

    fn searched(&self, t: &Target<'_>) {
        if let Some(&i) = self.plan.file_at.get(&(t.layer, t.offset)) {
            self.done[i].store(true, Ordering::Relaxed);
        }
        self.searched.fetch_add(1, Ordering::Relaxed);
        (self.progress)(t.size);
    }
}

/// What a path is in one image's merged tree (literal: a symlink is not
/// followed), with content hashes remembered by layer digest and offset so
/// a file that releases share is read once.
#[derive(Default)]
pub struct PathStates {
    hashes: HashMap<(String, u64), String>,
}

impl PathStates {
    pub fn new() -> PathStates {
        PathStates::default()
    }

    /// `path`'s state in `tree`, or `None` when the image does not have it.
    pub fn state(
        &mut self,
        tree: &Tree,
        layers: &[Arc<Layer>],
        digests: &[String],
        path: &[u8],
    ) -> Result<Option<super::State>, super::ForensicsError> {
        let path = crate::layer::normalize(path);
        let id = match tree.resolve(&path, false) {
            Ok(id) => id,
            Err(TreeError::NotFound(_) | TreeError::NotADirectory(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let n = tree.node(id);
        let file = n.kind == EntryKind::File;
        let sha256 = if file {
            let digest = digests.get(n.layer as usize).cloned().unwrap_or_default();
            let key = (digest.clone(), n.offset);
            match self.hashes.get(&key) {
                Some(h) => Some(h.clone()),
                None => {
                    let data = super::FileData::of(layers, n);
                    let h =
                        super::sha256_hex(data).map_err(|source| super::ForensicsError::Read {
                            path: path.clone(),
                            digest,
                            source,
                        })?;
                    self.hashes.insert(key, h.clone());
                    Some(h)
                }
            }
        } else {
            None
        };
        Ok(Some(super::State {
            kind: n.kind,
            mode: n.mode,
            uid: n.uid,
            gid: n.gid,
            size: if file { n.size } else { 0 },
            sha256,
            target: (n.kind == EntryKind::Symlink).then(|| n.link.unwrap_or_default().to_vec()),
        }))
    }
}

/// How a path went from one release to the next (`None`: it did not change,
/// or is absent from both).
pub fn release_change(
    before: Option<&super::State>,
    after: Option<&super::State>,
) -> Option<super::Action> {
    use super::Action;
    match (before, after) {
        (None, None) => None,
        (None, Some(_)) => Some(Action::Added),
        (Some(_), None) => Some(Action::Removed),
        (Some(b), Some(a)) if b == a => None,
        (Some(b), Some(a)) if b.kind != a.kind => Some(Action::TypeChanged),
        (Some(b), Some(a)) if b.sha256 != a.sha256 || b.target != a.target => {
            Some(Action::Modified)
        }
        (Some(_), Some(_)) => Some(Action::Metadata),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(sha: &str, mode: u32) -> crate::forensics::State {
        crate::forensics::State {
            kind: EntryKind::File,
            mode,
            uid: 0,
            gid: 0,
            size: 1,
            sha256: Some(sha.into()),
            target: None,
        }
    }

    #[test]
    fn release_changes_tell_added_modified_metadata_and_removed() {
        use crate::forensics::Action;
        let (a, b, a2) = (file("a", 0o644), file("b", 0o644), file("a", 0o600));
        assert_eq!(release_change(None, None), None);
        assert_eq!(release_change(None, Some(&a)), Some(Action::Added));
        assert_eq!(release_change(Some(&a), Some(&a)), None);
        assert_eq!(release_change(Some(&a), Some(&b)), Some(Action::Modified));
        assert_eq!(release_change(Some(&a), Some(&a2)), Some(Action::Metadata));
        assert_eq!(release_change(Some(&a), None), Some(Action::Removed));
        let dir = crate::forensics::State {
            kind: EntryKind::Dir,
            sha256: None,
            ..a.clone()
        };
        assert_eq!(
            release_change(Some(&a), Some(&dir)),
            Some(Action::TypeChanged)
        );
    }
}
