//! Two merged trees compared entry by entry, in the manner of `git diff
//! --name-status` but with directories, and with everything under an added
//! or deleted directory.

use std::borrow::Cow;
use std::sync::Arc;

use std::collections::BTreeSet;

use super::{FileData, ForensicsError, sha256_hex};
use crate::cache::Layer;
use crate::layer::{Entry, EntryKind, LayerIndex};
use crate::names;
use crate::overlay::partial::{Decision, LayerView, decide};
use crate::overlay::tree::{NodeId, NodeRef, Tree};
use crate::overlay::{Change, classify};

/// One side of a diff: a merged tree, the layers its bytes live in, and
/// their digests (equal digest and offset mean equal bytes, unread).
pub struct Side<'a> {
    pub tree: &'a Tree,
    pub layers: &'a [Arc<Layer>],
    pub digests: &'a [String],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Added,
    Deleted,
    Modified,
}

impl Status {
    pub fn letter(self) -> char {
        match self {
            Status::Added => 'A',
            Status::Deleted => 'D',
            Status::Modified => 'M',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub status: Status,
    pub path: Vec<u8>,
    /// For `M`: which of type, mode, owner, size, content, target, xattrs.
    pub what: Vec<&'static str>,
}

/// Every path that differs, sorted by path bytes. Iterative, not
/// recursive: a hostile image's depth is bounded by nothing but its entry
/// count, and must not overflow the stack.
pub fn diff(a: &Side<'_>, b: &Side<'_>) -> Result<Vec<Difference>, ForensicsError> {
    let mut out = Vec::new();
    let mut dirs = vec![(a.tree.root(), b.tree.root(), Vec::new())];
    // Each directory pair is taken once in a sound tree; the bound keeps a
    // damaged one whose children loop back from running forever.
    let mut budget = a.tree.len().min(b.tree.len()) + 1;
    while let Some((da, db, dir)) = dirs.pop() {
        if budget == 0 {
            break;
        }
        budget -= 1;
        walk(a, b, da, db, &dir, &mut out, &mut dirs)?;
    }
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(out)
}

/// `path` and everything under it, as `status`; with an explicit stack (see
/// [`diff`]), each node taken at most once per node of the tree.
fn subtree(side: &Side<'_>, id: NodeId, path: &[u8], status: Status, out: &mut Vec<Difference>) {
    let mut stack = vec![(id, path.to_vec())];
    let mut budget = side.tree.len();
    while let Some((id, path)) = stack.pop() {
        if budget == 0 {
            break;
        }
        budget -= 1;
        if side.tree.node(id).kind == EntryKind::Dir {
            for (name, c) in side.tree.children(id) {
                stack.push((c, names::join(&path, name)));
            }
        }
        out.push(Difference {
            status,
            path,
            what: Vec::new(),
        });
    }
}

fn walk(
    a: &Side<'_>,
    b: &Side<'_>,
    da: NodeId,
    db: NodeId,
    dir: &[u8],
    out: &mut Vec<Difference>,
    dirs: &mut Vec<(NodeId, NodeId, Vec<u8>)>,
) -> Result<(), ForensicsError> {
    let mut ia = a.tree.children(da).peekable();
    let mut ib = b.tree.children(db).peekable();
    loop {
        let order = match (ia.peek(), ib.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((na, _)), Some((nb, _))) => na.cmp(nb),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (name, id) = ia.next().expect("peeked");
                subtree(a, id, &names::join(dir, name), Status::Deleted, out);
            }
            std::cmp::Ordering::Greater => {
                let (name, id) = ib.next().expect("peeked");
                subtree(b, id, &names::join(dir, name), Status::Added, out);
            }
            std::cmp::Ordering::Equal => {
                let (name, ca) = ia.next().expect("peeked");
                let (_, cb) = ib.next().expect("peeked");
                let path = names::join(dir, name);
                let (na, nb) = (a.tree.node(ca), b.tree.node(cb));
                let what = compare(&Item::of_node(a, na), &Item::of_node(b, nb), &path)?;
                if !what.is_empty() {
                    out.push(Difference {
                        status: Status::Modified,
                        path: path.clone(),
                        what,
                    });
                }
                match (na.kind == EntryKind::Dir, nb.kind == EntryKind::Dir) {
                    (true, true) => dirs.push((ca, cb, path)),
                    (true, false) => {
                        for (n, c) in a.tree.children(ca) {
                            subtree(a, c, &names::join(&path, n), Status::Deleted, out);
                        }
                    }
                    (false, true) => {
                        for (n, c) in b.tree.children(cb) {
                            subtree(b, c, &names::join(&path, n), Status::Added, out);
                        }
                    }
                    (false, false) => {}
                }
            }
        }
    }
    Ok(())
}

/// What is compared of an entry, from a merged node or a layer entry.
struct Item<'a> {
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    link: Option<&'a [u8]>,
    rdev: (u32, u32),
    xattrs: Vec<(&'a str, &'a [u8])>,
    /// Where the bytes are: the layer's digest and the file's offset.
    digest: Option<&'a str>,
    offset: u64,
    layer: Option<&'a Layer>,
    sparse: Option<Cow<'a, [crate::layer::Segment]>>,
}

impl<'a> Item<'a> {
    fn of_node(side: &Side<'a>, n: NodeRef<'a>) -> Item<'a> {
        Item {
            kind: n.kind,
            mode: n.mode,
            uid: n.uid,
            gid: n.gid,
            size: n.size,
            link: n.link,
            rdev: n.rdev,
            xattrs: n.xattrs().collect(),
            digest: side.digests.get(n.layer as usize).map(String::as_str),
            offset: n.offset,
            layer: side.layers.get(n.layer as usize).map(|l| &**l),
            sparse: n.sparse(),
        }
    }

    fn of_entry(e: &'a Entry, digest: &'a str, layer: &'a Layer) -> Item<'a> {
        Item {
            kind: e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            link: e.link.as_deref(),
            rdev: e.rdev,
            xattrs: e
                .xattrs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect(),
            digest: Some(digest),
            offset: e.offset,
            layer: Some(layer),
            sparse: e.sparse.as_deref().map(Cow::Borrowed),
        }
    }

    fn hash(&self, path: &[u8]) -> Result<String, ForensicsError> {
        let digest = self.digest.unwrap_or_default().to_string();
        sha256_hex(FileData::new(
            self.layer,
            self.offset,
            self.size,
            self.sparse.as_deref(),
        ))
        .map_err(|source| ForensicsError::Read {
            path: path.to_vec(),
            digest,
            source,
        })
    }
}

fn compare(a: &Item<'_>, b: &Item<'_>, path: &[u8]) -> Result<Vec<&'static str>, ForensicsError> {
    let mut what = Vec::new();
    if a.kind != b.kind {
        what.push("type");
        return Ok(what);
    }
    if a.mode != b.mode {
        what.push("mode");
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        what.push("owner");
    }
    if a.kind == EntryKind::File {
        let same_place = a.digest.is_some() && a.digest == b.digest && a.offset == b.offset;
        if a.size != b.size {
            what.push("size");
            what.push("content");
        } else if !same_place && a.hash(path)? != b.hash(path)? {
            what.push("content");
        }
    }
    if a.kind == EntryKind::Symlink && a.link != b.link {
        what.push("target");
    }
    if matches!(a.kind, EntryKind::Char | EntryKind::Block) && a.rdev != b.rdev {
        what.push("type");
    }
    if a.xattrs != b.xattrs {
        what.push("xattrs");
    }
    Ok(what)
}

/// The diff from the layers above a shared base alone, or `None` when the
/// answer needs the base: some path one side's own layers decide is left to
/// the base by the other's (or hides a base directory, or depends on it in a
/// way a single layer cannot tell, such as a hardlink or an opaque marker).
/// `upper_*` are each side's layers above the base, bottom first.
pub fn diff_above_base(
    upper_a: &[(LayerIndex, Arc<Layer>, String)],
    upper_b: &[(LayerIndex, Arc<Layer>, String)],
) -> Result<Option<Vec<Difference>>, ForensicsError> {
    let views = |u: &[(LayerIndex, Arc<Layer>, String)]| -> Vec<LayerView> {
        u.iter()
            .map(|(i, _, _)| LayerView::new(i.clone()))
            .collect()
    };
    let (va, vb) = (views(upper_a), views(upper_b));
    // What an opaque marker hides is in the base: the same markers on both
    // sides hide the same, any other difference needs the base.
    let opaque = |u: &[(LayerIndex, Arc<Layer>, String)]| -> BTreeSet<Vec<u8>> {
        u.iter()
            .flat_map(|(i, _, _)| &i.entries)
            .filter_map(|e| match classify(&e.path) {
                Change::Opaque { dir } => Some(dir.to_vec()),
                _ => None,
            })
            .collect()
    };
    if opaque(upper_a) != opaque(upper_b) {
        return Ok(None);
    }
    // Every path either side's own layers mention, and their parents.
    let mut candidates: BTreeSet<Vec<u8>> = BTreeSet::new();
    for (index, _, _) in upper_a.iter().chain(upper_b) {
        for e in &index.entries {
            let path = match classify(&e.path) {
                Change::Entry => e.path.clone(),
                Change::Whiteout { dir, name } => names::join(dir, name),
                Change::Opaque { dir } => dir.to_vec(),
            };
            for a in names::ancestors(&path) {
                candidates.insert(a.to_vec());
            }
            candidates.insert(path);
        }
    }
    let top_down = |views: &[LayerView], path: &[u8]| -> Option<Option<(usize, Entry)>> {
        for (i, v) in views.iter().enumerate().rev() {
            match decide(v, path) {
                Decision::Found(_) if views[i + 1..].iter().any(|u| u.links(path)) => return None,
                Decision::Found(e) => return Some(Some((i, e))),
                Decision::Gone => return Some(None),
                Decision::Defer => return None,
                Decision::Continue => {}
            }
        }
        // Left to the base.
        None
    };
    let mut out = Vec::new();
    for path in &candidates {
        let (Some(a), Some(b)) = (top_down(&va, path), top_down(&vb, path)) else {
            if top_down(&va, path).is_none() && top_down(&vb, path).is_none() {
                // Neither side decides it: both show the base's. But a
                // hardlink or a non-literal entry may be why; then only the
                // tree can tell.
                if !va
                    .iter()
                    .chain(&vb)
                    .any(|v| v.links(path) || matches!(decide(v, path), Decision::Defer))
                {
                    continue;
                }
            }
            return Ok(None);
        };
        match (a, b) {
            (None, None) => {}
            (Some((_, ea)), Some((_, eb)))
                if ea.kind != eb.kind
                    && (ea.kind == EntryKind::Dir || eb.kind == EntryKind::Dir) =>
            {
                // The directory side may hold base entries the other lacks.
                return Ok(None);
            }
            (Some((i, ea)), Some((j, eb))) => {
                // Both a directory: what the base has in it must show on
                // both sides or on neither (one side may have whited the
                // directory out and made it again). A name no tar can hold
                // asks about exactly that.
                if ea.kind == EntryKind::Dir {
                    let probe = names::join(path, b"\0");
                    if top_down(&va, &probe) != top_down(&vb, &probe) {
                        return Ok(None);
                    }
                }
                let ia = Item::of_entry(&ea, &upper_a[i].2, &upper_a[i].1);
                let ib = Item::of_entry(&eb, &upper_b[j].2, &upper_b[j].1);
                let what = compare(&ia, &ib, path)?;
                if !what.is_empty() {
                    out.push(Difference {
                        status: Status::Modified,
                        path: path.clone(),
                        what,
                    });
                }
            }
            // Only a non-directory stands alone; a directory may hold base entries.
            (Some((_, e)), None) if e.kind != EntryKind::Dir => out.push(Difference {
                status: Status::Deleted,
                path: path.clone(),
                what: Vec::new(),
            }),
            (None, Some((_, e))) if e.kind != EntryKind::Dir => out.push(Difference {
                status: Status::Added,
                path: path.clone(),
                what: Vec::new(),
            }),
            _ => return Ok(None),
        }
    }
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::tree::merge;

    fn deep(depth: usize, leaf: &str) -> Tree {
        let path: String = (0..depth).map(|_| "d/").collect::<String>() + leaf;
        merge(&[&LayerIndex {
            entries: vec![Entry::new(path.as_bytes(), EntryKind::File)],
        }])
        .unwrap()
    }

    #[test]
    fn a_deep_tree_is_diffed_within_a_small_stack() {
        // Recursion would take a frame per level; 64 KiB holds a few dozen.
        let (a, b) = (deep(2000, "x"), deep(2000, "y"));
        let got = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                let side = |t| Side {
                    tree: t,
                    layers: &[],
                    digests: &[],
                };
                diff(&side(&a), &side(&b)).unwrap()
            })
            .unwrap()
            .join()
            .unwrap();
        let got: Vec<_> = got.iter().map(|d| (d.status, d.path.len())).collect();
        assert_eq!(got, [(Status::Deleted, 4001), (Status::Added, 4001)]);
    }
}
