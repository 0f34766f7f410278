//! Answers for single paths before the merged tree exists: layers are read
//! from the top down, and the search stops at the first layer that decides
//! the path (holds it, whites it out, hides it with an opaque marker or a
//! non-directory), so a file in the top layer needs no lower layer.

use std::collections::{HashMap, HashSet};

use crate::layer::{Entry, EntryKind, LayerIndex};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// One layer's index, arranged for path questions.
pub struct LayerView {
    entries: Vec<Entry>,
    /// Path -> entry (later duplicates win), whiteout files excluded.
    by_path: HashMap<String, usize>,
    /// Directories that have entries below them in this layer.
    parents: HashSet<String>,
    /// Paths this layer whites out in the layers below.
    whiteouts: HashSet<String>,
    /// Directories this layer makes opaque.
    opaque: HashSet<String>,
    /// Hardlink target -> how many other names link to it.
    links_to: HashMap<String, u32>,
}

fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Proper ancestors of `path`, shallowest first.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

impl LayerView {
    pub fn new(index: LayerIndex) -> LayerView {
        let mut v = LayerView {
            entries: Vec::new(),
            by_path: HashMap::new(),
            parents: HashSet::new(),
            whiteouts: HashSet::new(),
            opaque: HashSet::new(),
            links_to: HashMap::new(),
        };
        for e in index.entries {
            let (dir, name) = split(&e.path);
            for a in ancestors(&e.path) {
                v.parents.insert(a.to_string());
            }
            if name == OPAQUE {
                v.opaque.insert(dir.to_string());
                continue;
            }
            if let Some(target) = name.strip_prefix(WHITEOUT) {
                v.whiteouts.insert(join(dir, target));
                continue;
            }
            if e.kind == EntryKind::Hardlink
                && let Some(t) = &e.link
            {
                *v.links_to.entry(t.clone()).or_default() += 1;
            }
            v.by_path.insert(e.path.clone(), v.entries.len());
            v.entries.push(e);
        }
        v
    }

    fn get(&self, path: &str) -> Option<&Entry> {
        self.by_path.get(path).map(|&i| &self.entries[i])
    }
}

/// What one layer says about a path.
pub enum Decision {
    /// The layer holds the entry: `key` is shared by the names of one
    /// hardlinked file, `nlink` counts them.
    Found {
        entry: Entry,
        key: String,
        nlink: u32,
    },
    /// The layer has entries below the path but no entry for it.
    Implicit,
    /// The path does not exist in the merged view.
    Gone,
    /// Lower layers decide.
    Continue,
}

pub fn decide(v: &LayerView, path: &str) -> Decision {
    if let Some(e) = v.get(path) {
        if e.kind == EntryKind::Hardlink {
            let target = e.link.clone().unwrap_or_default();
            // A link to nothing in its own layer is dropped by the merge too.
            return match v.get(&target) {
                Some(t) if t.kind != EntryKind::Dir => Decision::Found {
                    entry: Entry {
                        path: path.to_string(),
                        ..t.clone()
                    },
                    nlink: v.links_to.get(&target).copied().unwrap_or(0) + 1,
                    key: target,
                },
                _ => Decision::Continue,
            };
        }
        let nlink = v.links_to.get(path).copied().unwrap_or(0) + 1;
        return Decision::Found {
            entry: e.clone(),
            key: path.to_string(),
            nlink,
        };
    }
    if v.parents.contains(path) {
        return Decision::Implicit;
    }
    for a in ancestors(path) {
        if v.whiteouts.contains(a) || v.opaque.contains(a) {
            return Decision::Gone;
        }
        if v.get(a).is_some_and(|e| e.kind != EntryKind::Dir) {
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
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 1,
            mtime: 0,
            link: link.map(str::to_string),
            rdev: (0, 0),
            xattrs: vec![],
            offset: 0,
            sparse: None,
        }
    }

    fn view(entries: Vec<Entry>) -> LayerView {
        LayerView::new(LayerIndex { entries })
    }

    #[test]
    fn a_layer_that_holds_the_path_decides_it() {
        let v = view(vec![e("etc/os-release", EntryKind::File, None)]);
        assert!(matches!(
            decide(&v, "etc/os-release"),
            Decision::Found { .. }
        ));
        assert!(matches!(decide(&v, "etc"), Decision::Implicit));
        assert!(matches!(decide(&v, "etc/passwd"), Decision::Continue));
    }

    #[test]
    fn whiteouts_opaque_markers_and_files_above_hide_lower_paths() {
        let v = view(vec![
            e("a/.wh.gone", EntryKind::File, None),
            e("o/.wh..wh..opq", EntryKind::File, None),
            e("f", EntryKind::File, None),
        ]);
        assert!(matches!(decide(&v, "a/gone"), Decision::Gone));
        assert!(matches!(decide(&v, "a/gone/deeper"), Decision::Gone));
        assert!(matches!(decide(&v, "o/lower"), Decision::Gone));
        assert!(matches!(decide(&v, "f/child"), Decision::Gone));
        assert!(matches!(decide(&v, "a/other"), Decision::Continue));
    }

    #[test]
    fn hardlinks_share_a_key_and_count_their_names() {
        let v = view(vec![
            e("bin/prog", EntryKind::File, None),
            e("bin/alias", EntryKind::Hardlink, Some("bin/prog")),
        ]);
        let (Decision::Found { key: a, nlink, .. }, Decision::Found { key: b, .. }) =
            (decide(&v, "bin/prog"), decide(&v, "bin/alias"))
        else {
            panic!("both names exist");
        };
        assert_eq!((a.as_str(), b.as_str(), nlink), ("bin/prog", "bin/prog", 2));
    }
}
