//! Comparing two indexes of one layer made from different sources (a table
//! of contents, a tar-split, a published index, the tar stream itself): the
//! first entry where they disagree, said so that a person can check it.
//!
//! Only what a reader of the layer sees is compared: entries in order (so a
//! missing whiteout, an extra file or a reordered duplicate all count), and
//! each entry's path, kind, mode, owner, size, mtime, link target, device
//! numbers, xattrs and sparse layout. Where a file's bytes sit (`offset`)
//! is not: a table of contents and the tar address bytes differently.

use std::fmt;

use super::{Entry, EntryKind, LayerIndex};
use crate::names::escaped;

/// The first way an index that claims to describe a layer (a table of
/// contents, a tar-split, a published index) differs from the index of the
/// layer's own tar stream: the entry, the field and both values. Its
/// `Display` reads after "layer N's TOC": "lists etc/shadow mode 0644, its
/// tar stream has 0640".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Position in tar order of the first entry that differs.
    pub entry: usize,
    /// The entry's path in the claiming index (or in the stream when the
    /// claiming index has no entry there).
    pub path: String,
    /// What differs: "entry", "path", "kind", "mode", "uid", "gid",
    /// "size", "mtime", "link", "rdev", "xattrs", "sparse", "data offset".
    pub field: &'static str,
    /// As the claiming index has it ("nothing" when it has no such entry).
    pub claimed: String,
    /// As the tar stream has it ("nothing" when it has no such entry).
    pub real: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            "entry" if self.real == NOTHING => write!(
                f,
                "lists {} (entry {}), its tar stream does not",
                self.claimed, self.entry
            ),
            "entry" => write!(
                f,
                "does not list {} (entry {}), its tar stream has it",
                self.real, self.entry
            ),
            "path" => write!(
                f,
                "lists {} as entry {}, its tar stream has {} there",
                self.claimed, self.entry, self.real
            ),
            field => write!(
                f,
                "lists {} {field} {}, its tar stream has {}",
                self.path, self.claimed, self.real
            ),
        }
    }
}

const NOTHING: &str = "nothing";

fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::File => "regular file",
        EntryKind::Dir => "directory",
        EntryKind::Symlink => "symlink",
        EntryKind::Hardlink => "hardlink",
        EntryKind::Char => "character device",
        EntryKind::Block => "block device",
        EntryKind::Fifo => "fifo",
    }
}

fn describe(e: &Entry) -> String {
    format!("{} {}", kind_name(e.kind), escaped(&e.path))
}

fn link(l: &Option<Vec<u8>>) -> String {
    l.as_deref()
        .map_or_else(|| "none".into(), |l| escaped(l).to_string())
}

fn xattrs(x: &[(String, Vec<u8>)]) -> String {
    if x.is_empty() {
        return "none".into();
    }
    let mut sorted: Vec<_> = x.iter().collect();
    sorted.sort();
    sorted
        .iter()
        .map(|(k, v)| format!("{}={}", escaped(k.as_bytes()), escaped(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The first entry where `claimed` and `real` (the index of the tar stream
/// itself) differ in anything a reader sees (see the module doc), in stream
/// order (order decides which of two duplicates wins and what a whiteout
/// removes), or `None` when they agree entry for entry. Where file bytes sit
/// is compared only with `offsets` (both indexes address the same tar).
pub fn first_difference(
    claimed: &LayerIndex,
    real: &LayerIndex,
    offsets: bool,
) -> Option<Difference> {
    let n = claimed.entries.len().max(real.entries.len());
    for i in 0..n {
        let (x, y) = match (claimed.entries.get(i), real.entries.get(i)) {
            (Some(x), Some(y)) => (x, y),
            (x, y) => {
                let e = x.or(y).expect("one side has entry i");
                return Some(Difference {
                    entry: i,
                    path: escaped(&e.path).to_string(),
                    field: "entry",
                    claimed: x.map_or_else(|| NOTHING.into(), describe),
                    real: y.map_or_else(|| NOTHING.into(), describe),
                });
            }
        };
        if let Some(d) = entry_difference(x, y, offsets) {
            return Some(Difference { entry: i, ..d });
        }
    }
    None
}

fn entry_difference(x: &Entry, y: &Entry, offsets: bool) -> Option<Difference> {
    let diff = |field: &'static str, a: String, b: String| {
        Some(Difference {
            entry: 0,
            path: escaped(&x.path).to_string(),
            field,
            claimed: a,
            real: b,
        })
    };
    if x.path != y.path {
        return diff("path", describe(x), describe(y));
    }
    if x.kind != y.kind {
        return diff("kind", kind_name(x.kind).into(), kind_name(y.kind).into());
    }
    if x.mode != y.mode {
        return diff("mode", format!("{:04o}", x.mode), format!("{:04o}", y.mode));
    }
    if x.uid != y.uid {
        return diff("uid", x.uid.to_string(), y.uid.to_string());
    }
    if x.gid != y.gid {
        return diff("gid", x.gid.to_string(), y.gid.to_string());
    }
    if x.size != y.size {
        return diff("size", x.size.to_string(), y.size.to_string());
    }
    if x.mtime != y.mtime {
        return diff("mtime", x.mtime.to_string(), y.mtime.to_string());
    }
    if x.link != y.link {
        return diff("link", link(&x.link), link(&y.link));
    }
    if x.rdev != y.rdev {
        let r = |(ma, mi): (u32, u32)| format!("{ma},{mi}");
        return diff("rdev", r(x.rdev), r(y.rdev));
    }
    let (mut xa, mut ya) = (x.xattrs.clone(), y.xattrs.clone());
    xa.sort();
    ya.sort();
    if xa != ya {
        return diff("xattrs", xattrs(&x.xattrs), xattrs(&y.xattrs));
    }
    let layout = |e: &Entry| {
        e.sparse.as_ref().map(|s| {
            s.iter()
                .map(|g| format!("{}+{}", g.logical, g.len))
                .collect::<Vec<_>>()
                .join(",")
        })
    };
    if layout(x) != layout(y) {
        let s = |v: Option<String>| v.unwrap_or_else(|| "not sparse".into());
        return diff("sparse", s(layout(x)), s(layout(y)));
    }
    if offsets {
        let stored = |e: &Entry| {
            e.sparse
                .as_ref()
                .map(|s| s.iter().map(|g| g.stored).collect::<Vec<_>>())
        };
        if x.offset != y.offset || stored(x) != stored(y) {
            return diff("data offset", x.offset.to_string(), y.offset.to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: Vec<Entry>) -> LayerIndex {
        LayerIndex { entries }
    }

    #[test]
    fn equal_indexes_differ_nowhere_even_at_other_offsets() {
        let mut a = Entry::new(b"etc/motd", EntryKind::File);
        a.offset = 512;
        let mut b = a.clone();
        b.offset = 0;
        assert_eq!(
            first_difference(&index(vec![a.clone()]), &index(vec![b.clone()]), false),
            None
        );
        assert_eq!(
            first_difference(&index(vec![a]), &index(vec![b]), true)
                .unwrap()
                .field,
            "data offset"
        );
    }

    #[test]
    fn a_mode_difference_names_the_path_and_both_modes() {
        let a = Entry {
            mode: 0o644,
            ..Entry::new(b"etc/shadow", EntryKind::File)
        };
        let b = Entry {
            mode: 0o640,
            ..a.clone()
        };
        let d = first_difference(&index(vec![a]), &index(vec![b]), false).unwrap();
        assert_eq!(
            d.to_string(),
            "lists etc/shadow mode 0644, its tar stream has 0640"
        );
    }

    #[test]
    fn a_missing_entry_is_the_first_difference_and_says_what_is_missing() {
        let dir = Entry::new(b"etc", EntryKind::Dir);
        let wh = Entry::new(b"etc/.wh.secret", EntryKind::File);
        let d = first_difference(&index(vec![dir.clone()]), &index(vec![dir, wh]), false).unwrap();
        assert_eq!(d.entry, 1);
        assert_eq!(
            d.to_string(),
            "does not list regular file etc/.wh.secret (entry 1), its tar stream has it"
        );
    }

    #[test]
    fn xattrs_compare_as_sets_and_links_by_target() {
        let mut a = Entry::new(b"bin/ping", EntryKind::File);
        a.xattrs = vec![("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())];
        let mut b = a.clone();
        b.xattrs.reverse();
        assert_eq!(
            first_difference(&index(vec![a.clone()]), &index(vec![b]), false),
            None
        );
        let mut c = a.clone();
        c.xattrs.push(("security.capability".into(), vec![1]));
        let d = first_difference(&index(vec![a]), &index(vec![c]), false).unwrap();
        assert_eq!(d.field, "xattrs");
        let l = |t: &[u8]| Entry {
            link: Some(t.to_vec()),
            ..Entry::new(b"x", EntryKind::Symlink)
        };
        let d = first_difference(
            &index(vec![l(b"/etc/motd")]),
            &index(vec![l(b"/etc/shadow")]),
            false,
        );
        assert_eq!(
            d.unwrap().to_string(),
            "lists x link /etc/motd, its tar stream has /etc/shadow"
        );
    }
}
