//! Answers for single paths before the merged tree exists: layers are read
//! from the top down, and the search stops at the first layer that decides
//! the path (holds it, whites it out, hides it with an opaque marker or a
//! non-directory), so a file in the top layer needs no lower layer.
//!
//! The answer must equal the merged tree's, so a layer answers only what it
//! can decide alone. Two things it cannot, and those paths are
//! [`Decision::Defer`]red to the tree:
//!
//! - entries that are not *literal*: an entry whose parent has no directory
//!   entry of its own earlier in the layer lands wherever the lower layers'
//!   symlinks lead. By the tree's rules such an entry changes only names
//!   equal to components of its own path (wherever they end up) and its
//!   unlisted parents themselves, so only paths with such a component, and
//!   those parents, are deferred;
//! - hardlinks: a link, and a file that any layer from here up links to,
//!   since the link's target and the file's link count depend on other layers.

use std::collections::{HashMap, HashSet};

use super::{Change, classify};
use crate::layer::{Entry, EntryKind, LayerIndex};
use crate::names;

/// One layer's index, arranged for path questions.
pub struct LayerView {
    entries: Vec<Entry>,
    /// Path -> its last entry (later duplicates win), markers excluded.
    by_path: HashMap<Vec<u8>, usize>,
    /// Paths this layer whites out in the layers below.
    whiteouts: HashSet<Vec<u8>>,
    /// Directories this layer makes opaque.
    opaque: HashSet<Vec<u8>>,
    /// Paths that are hardlinks, or that a hardlink of this layer names.
    linked: HashSet<Vec<u8>>,
    /// Directories this layer made after a non-directory had their name:
    /// what lower layers had below them is gone, as it is below any path
    /// whose entry here is not a directory.
    nondir: HashSet<Vec<u8>>,
    /// Components of the paths of the entries that are not literal.
    drifting: HashSet<Vec<u8>>,
    /// Parents that non-literal entries take for granted.
    unlisted: HashSet<Vec<u8>>,
}

impl LayerView {
    pub fn new(index: LayerIndex) -> LayerView {
        let mut v = LayerView {
            entries: Vec::new(),
            by_path: HashMap::new(),
            whiteouts: HashSet::new(),
            opaque: HashSet::new(),
            linked: HashSet::new(),
            nondir: HashSet::new(),
            drifting: HashSet::new(),
            unlisted: HashSet::new(),
        };
        // Directories this layer has made so far, to tell whether each
        // entry's parents are its own.
        let mut own_dirs: HashSet<&[u8]> = HashSet::new();
        for e in &index.entries {
            match classify(&e.path) {
                Change::Opaque { dir } => {
                    v.opaque.insert(dir.to_vec());
                    continue;
                }
                Change::Whiteout { dir, name } => {
                    v.whiteouts.insert(names::join(dir, name));
                    continue;
                }
                Change::Entry => {}
            }
            let mut literal = true;
            for a in names::ancestors(&e.path) {
                if !own_dirs.contains(a) {
                    literal = false;
                    v.unlisted.insert(a.to_vec());
                }
            }
            if !literal {
                v.drifting
                    .extend(names::components(&e.path).map(<[u8]>::to_vec));
            }
            if e.kind == EntryKind::Dir && literal {
                own_dirs.insert(&e.path);
            } else if own_dirs.remove(&e.path[..]) {
                // Its subdirectories went with it.
                let p: &[u8] = &e.path;
                own_dirs.retain(|d| !(d.len() > p.len() && d.starts_with(p) && d[p.len()] == b'/'));
            }
            if e.kind == EntryKind::Hardlink {
                v.linked.insert(e.path.clone());
                if let Some(t) = &e.link {
                    v.linked.insert(t.clone());
                    // A target whose parents are not this layer's own may be
                    // reached through a lower symlink: its real path is
                    // unknown here, so any path with its names is deferred.
                    if !names::ancestors(t).all(|a| own_dirs.contains(a)) {
                        v.drifting.extend(names::components(t).map(<[u8]>::to_vec));
                    }
                }
            }
        }
        // Where each path last became a non-directory (borrowed: views of
        // large layers are built on a cold mount's critical path).
        let mut last_nondir: HashMap<&[u8], usize> = HashMap::new();
        for (i, e) in index.entries.iter().enumerate() {
            if e.kind != EntryKind::Dir && classify(&e.path) == Change::Entry {
                last_nondir.insert(&e.path, i);
            }
        }
        // An entry below a name that this layer later turns into a
        // non-directory is gone with it.
        let buried: Vec<bool> = index
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                names::ancestors(&e.path).any(|a| last_nondir.get(a).is_some_and(|&k| k > i))
            })
            .collect();
        let was_nondir: Vec<Vec<u8>> = last_nondir.keys().map(|p| p.to_vec()).collect();
        for (e, buried) in index.entries.into_iter().zip(buried) {
            if classify(&e.path) != Change::Entry {
                continue;
            }
            if buried {
                v.by_path.remove(&e.path);
                continue;
            }
            v.by_path.insert(e.path.clone(), v.entries.len());
            v.entries.push(e);
        }
        // Names that were a non-directory before a directory took them back.
        for p in was_nondir {
            if v.get(&p).is_some_and(|e| e.kind == EntryKind::Dir) {
                v.nondir.insert(p);
            }
        }
        v
    }

    fn get(&self, path: &[u8]) -> Option<&Entry> {
        self.by_path.get(path).map(|&i| &self.entries[i])
    }

    /// Whether a hardlink of this layer involves `path`.
    pub fn links(&self, path: &[u8]) -> bool {
        self.linked.contains(path)
    }
}

/// What one layer says about a path.
#[derive(Debug)]
pub enum Decision {
    /// The layer holds the entry.
    Found(Entry),
    /// The path does not exist in the merged view.
    Gone,
    /// Lower layers decide.
    Continue,
    /// Only the merged tree can answer.
    Defer,
}

pub fn decide(v: &LayerView, path: &[u8]) -> Decision {
    if v.unlisted.contains(path) || names::components(path).any(|c| v.drifting.contains(c)) {
        return Decision::Defer;
    }
    if let Some(e) = v.get(path) {
        if v.links(path) {
            return Decision::Defer;
        }
        return Decision::Found(e.clone());
    }
    // An opaque marker at the root hides everything lower layers have.
    if !path.is_empty() && v.opaque.contains(&b""[..]) {
        return Decision::Gone;
    }
    for a in names::ancestors(path) {
        if v.whiteouts.contains(a) || v.opaque.contains(a) {
            return Decision::Gone;
        }
        if v.nondir.contains(a) || v.get(a).is_some_and(|e| e.kind != EntryKind::Dir) {
            return Decision::Gone;
        }
    }
    if v.whiteouts.contains(path) {
        return Decision::Gone;
    }
    Decision::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: EntryKind, link: Option<&str>) -> Entry {
        Entry {
            mode: 0o644,
            size: 1,
            link: link.map(Into::into),
            ..Entry::new(path.as_bytes(), kind)
        }
    }

    fn d(path: &str) -> Entry {
        e(path, EntryKind::Dir, None)
    }

    fn view(entries: Vec<Entry>) -> LayerView {
        LayerView::new(LayerIndex { entries })
    }

    #[test]
    fn a_layer_that_holds_the_path_decides_it() {
        let v = view(vec![d("etc"), e("etc/os-release", EntryKind::File, None)]);
        assert!(matches!(decide(&v, b"etc/os-release"), Decision::Found(_)));
        assert!(matches!(decide(&v, b"etc"), Decision::Found(_)));
        assert!(matches!(decide(&v, b"etc/passwd"), Decision::Continue));
    }

    #[test]
    fn whiteouts_opaque_markers_and_files_above_hide_lower_paths() {
        let v = view(vec![
            e("a/.wh.gone", EntryKind::File, None),
            e("o/.wh..wh..opq", EntryKind::File, None),
            e("f", EntryKind::File, None),
        ]);
        assert!(matches!(decide(&v, b"a/gone"), Decision::Gone));
        assert!(matches!(decide(&v, b"a/gone/deeper"), Decision::Gone));
        assert!(matches!(decide(&v, b"o/lower"), Decision::Gone));
        assert!(matches!(decide(&v, b"f/child"), Decision::Gone));
        assert!(matches!(decide(&v, b"a/other"), Decision::Continue));
    }

    #[test]
    fn entries_whose_parents_are_not_the_layers_own_defer_what_they_may_touch() {
        // "x/f" lands wherever the lower layers' "x" leads (it may be a symlink).
        let v = view(vec![
            e("x/f", EntryKind::File, None),
            d("y"),
            e("y/g", EntryKind::File, None),
        ]);
        assert!(matches!(decide(&v, b"x/f"), Decision::Defer));
        assert!(matches!(decide(&v, b"x"), Decision::Defer));
        assert!(matches!(decide(&v, b"elsewhere/f"), Decision::Defer));
        assert!(matches!(decide(&v, b"f/below"), Decision::Defer));
        // What the literal entries decide is still decided here.
        assert!(matches!(decide(&v, b"y/g"), Decision::Found(_)));
        assert!(matches!(decide(&v, b"x/other"), Decision::Defer));
        assert!(matches!(decide(&v, b"z/other"), Decision::Continue));
        // A directory entry after its child is too late for that child.
        let v = view(vec![e("x/f", EntryKind::File, None), d("x")]);
        assert!(matches!(decide(&v, b"x"), Decision::Defer));
    }

    #[test]
    fn hardlinked_names_defer_to_the_tree() {
        let v = view(vec![
            d("bin"),
            e("bin/prog", EntryKind::File, None),
            e("bin/alias", EntryKind::Hardlink, Some("bin/prog")),
            e("bin/other", EntryKind::File, None),
        ]);
        assert!(matches!(decide(&v, b"bin/prog"), Decision::Defer));
        assert!(matches!(decide(&v, b"bin/alias"), Decision::Defer));
        assert!(matches!(decide(&v, b"bin/other"), Decision::Found(_)));
        assert!(v.links(b"bin/prog"));
    }

    #[test]
    fn a_marker_under_a_lower_symlink_decides_only_its_literal_path() {
        let lower = view(vec![
            d("etc"),
            e("etc/secret", EntryKind::File, None),
            e("e", EntryKind::Symlink, Some("etc")),
        ]);
        let upper = view(vec![e("e/.wh.secret", EntryKind::File, None)]);
        assert!(matches!(decide(&upper, b"etc/secret"), Decision::Continue));
        assert!(matches!(decide(&lower, b"etc/secret"), Decision::Found(_)));
        let tree = super::super::tree::merge(&[
            &LayerIndex {
                entries: lower.entries.clone(),
            },
            &LayerIndex {
                entries: vec![e("e/.wh.secret", EntryKind::File, None)],
            },
        ])
        .unwrap();
        assert!(tree.resolve(b"etc/secret", false).is_ok());
    }

    #[test]
    fn a_directory_emptied_by_a_file_no_longer_vouches_for_its_subdirectories() {
        // "a/b" was this layer's directory, but "a" became a file and a
        // directory again: "a/b/f" lands in an implicit "a/b" the tree makes.
        let l = LayerIndex {
            entries: vec![
                d("a"),
                d("a/b"),
                e("a", EntryKind::File, None),
                d("a"),
                e("a/b/f", EntryKind::File, None),
            ],
        };
        let tree = super::super::tree::merge(&[&l]).unwrap();
        assert!(tree.resolve(b"a/b", false).is_ok());
        assert!(matches!(
            decide(&LayerView::new(l), b"a/b"),
            Decision::Defer
        ));
    }

    #[test]
    fn an_opaque_marker_at_the_root_hides_every_lower_path() {
        let v = view(vec![e(".wh..wh..opq", EntryKind::File, None)]);
        assert!(matches!(decide(&v, b"x"), Decision::Gone));
        assert!(matches!(decide(&v, b"x/y"), Decision::Gone));
    }

    #[test]
    fn a_hardlink_through_a_lower_symlink_defers_its_target_names() {
        // "l" links to "s/x", which is "d/x" when "s" is a symlink to "d"
        // below: "d/x" then has two names, which no single layer can see.
        let upper = view(vec![e("l", EntryKind::Hardlink, Some("s/x"))]);
        assert!(matches!(decide(&upper, b"d/x"), Decision::Defer));
    }
}
