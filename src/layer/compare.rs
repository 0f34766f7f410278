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

/// The first difference between two indexes of one layer; its `Display`
/// says where, what, and both values ("etc/shadow: mode 0644 against
/// 0640"), with `a`'s value first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexDifference {
    /// Position in tar order of the first entry that differs.
    pub position: usize,
    /// The entry's path in `a` (or in `b` when `a` has no entry there).
    pub path: String,
    /// What differs: "entry", "path", "kind", "mode", "uid", "gid",
    /// "size", "mtime", "link", "rdev", "xattrs", "sparse".
    pub field: &'static str,
    /// The value in `a`, and in `b`.
    pub a: String,
    pub b: String,
}

impl fmt::Display for IndexDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            "entry" => write!(f, "entry {}: {} against {}", self.position, self.a, self.b),
            "path" => write!(
                f,
                "entry {} is {} against {}",
                self.position, self.a, self.b
            ),
            field => write!(f, "{}: {field} {} against {}", self.path, self.a, self.b),
        }
    }
}

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

/// The first entry where `a` and `b` differ in anything a reader sees
/// (see the module doc), or `None` when they agree entry for entry.
pub fn first_difference(a: &LayerIndex, b: &LayerIndex) -> Option<IndexDifference> {
    let n = a.entries.len().max(b.entries.len());
    for i in 0..n {
        let (x, y) = match (a.entries.get(i), b.entries.get(i)) {
            (Some(x), Some(y)) => (x, y),
            (x, y) => {
                let e = x.or(y).expect("one side has entry i");
                return Some(IndexDifference {
                    position: i,
                    path: escaped(&e.path).to_string(),
                    field: "entry",
                    a: x.map_or_else(|| "nothing".into(), describe),
                    b: y.map_or_else(|| "nothing".into(), describe),
                });
            }
        };
        if let Some(d) = entry_difference(x, y) {
            return Some(IndexDifference { position: i, ..d });
        }
    }
    None
}

fn entry_difference(x: &Entry, y: &Entry) -> Option<IndexDifference> {
    let diff = |field: &'static str, a: String, b: String| {
        Some(IndexDifference {
            position: 0,
            path: escaped(&x.path).to_string(),
            field,
            a,
            b,
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
        assert_eq!(first_difference(&index(vec![a]), &index(vec![b])), None);
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
        let d = first_difference(&index(vec![a]), &index(vec![b])).unwrap();
        assert_eq!(d.to_string(), "etc/shadow: mode 0644 against 0640");
    }

    #[test]
    fn a_missing_entry_is_the_first_difference_and_says_what_is_missing() {
        let dir = Entry::new(b"etc", EntryKind::Dir);
        let wh = Entry::new(b"etc/.wh.secret", EntryKind::File);
        let d = first_difference(&index(vec![dir.clone()]), &index(vec![dir, wh])).unwrap();
        assert_eq!(d.position, 1);
        assert_eq!(
            d.to_string(),
            "entry 1: nothing against regular file etc/.wh.secret"
        );
    }

    #[test]
    fn xattrs_compare_as_sets_and_links_by_target() {
        let mut a = Entry::new(b"bin/ping", EntryKind::File);
        a.xattrs = vec![("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())];
        let mut b = a.clone();
        b.xattrs.reverse();
        assert_eq!(
            first_difference(&index(vec![a.clone()]), &index(vec![b])),
            None
        );
        let mut c = a.clone();
        c.xattrs.push(("security.capability".into(), vec![1]));
        let d = first_difference(&index(vec![a]), &index(vec![c])).unwrap();
        assert_eq!(d.field, "xattrs");
        let l = |t: &[u8]| Entry {
            link: Some(t.to_vec()),
            ..Entry::new(b"x", EntryKind::Symlink)
        };
        let d = first_difference(
            &index(vec![l(b"/etc/motd")]),
            &index(vec![l(b"/etc/shadow")]),
        );
        assert_eq!(
            d.unwrap().to_string(),
            "x: link /etc/motd against /etc/shadow"
        );
    }
}
