//! Two merged trees compared entry by entry, in the manner of `git diff
//! --name-status` but with directories, and with everything under an added
//! or deleted directory.

use std::sync::Arc;

use super::{FileData, ForensicsError, sha256_hex};
use crate::cache::Layer;
use crate::layer::EntryKind;
use crate::names;
use crate::overlay::tree::{Node, NodeId, Tree};

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

/// Every path that differs, sorted by path bytes.
pub fn diff(a: &Side<'_>, b: &Side<'_>) -> Result<Vec<Difference>, ForensicsError> {
    let mut out = Vec::new();
    walk(a, b, a.tree.root(), b.tree.root(), &[], &mut out)?;
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(out)
}

fn subtree(side: &Side<'_>, id: NodeId, path: &[u8], status: Status, out: &mut Vec<Difference>) {
    out.push(Difference {
        status,
        path: path.to_vec(),
        what: Vec::new(),
    });
    if side.tree.node(id).kind == EntryKind::Dir {
        for (name, c) in side.tree.children(id) {
            subtree(side, c, &names::join(path, name), status, out);
        }
    }
}

fn walk(
    a: &Side<'_>,
    b: &Side<'_>,
    da: NodeId,
    db: NodeId,
    dir: &[u8],
    out: &mut Vec<Difference>,
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
                let what = compare(a, b, na, nb, &path)?;
                if !what.is_empty() {
                    out.push(Difference {
                        status: Status::Modified,
                        path: path.clone(),
                        what,
                    });
                }
                match (na.kind == EntryKind::Dir, nb.kind == EntryKind::Dir) {
                    (true, true) => walk(a, b, ca, cb, &path, out)?,
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

fn compare(
    a: &Side<'_>,
    b: &Side<'_>,
    na: &Node,
    nb: &Node,
    path: &[u8],
) -> Result<Vec<&'static str>, ForensicsError> {
    let mut what = Vec::new();
    if na.kind != nb.kind {
        what.push("type");
        return Ok(what);
    }
    if na.mode != nb.mode {
        what.push("mode");
    }
    if (na.uid, na.gid) != (nb.uid, nb.gid) {
        what.push("owner");
    }
    if na.kind == EntryKind::File {
        if na.size != nb.size {
            what.push("size");
            what.push("content");
        } else if !same_bytes(a, b, na, nb, path)? {
            what.push("content");
        }
    }
    if na.link != nb.link && na.kind == EntryKind::Symlink {
        what.push("target");
    }
    if matches!(na.kind, EntryKind::Char | EntryKind::Block) && na.rdev != nb.rdev {
        what.push("type");
    }
    let xa: Vec<_> = na.xattrs().collect();
    let xb: Vec<_> = nb.xattrs().collect();
    if xa != xb {
        what.push("xattrs");
    }
    Ok(what)
}

fn same_bytes(
    a: &Side<'_>,
    b: &Side<'_>,
    na: &Node,
    nb: &Node,
    path: &[u8],
) -> Result<bool, ForensicsError> {
    let da = a.digests.get(na.layer as usize);
    let db = b.digests.get(nb.layer as usize);
    if da.is_some() && da == db && na.offset == nb.offset {
        return Ok(true);
    }
    let hash = |side: &Side<'_>, n: &Node| -> Result<String, ForensicsError> {
        let digest = side
            .digests
            .get(n.layer as usize)
            .cloned()
            .unwrap_or_default();
        let data = FileData::of(side.layers, n).ok_or_else(|| ForensicsError::Read {
            path: path.to_vec(),
            digest: digest.clone(),
            source: std::io::Error::other("the layer is not open"),
        })?;
        sha256_hex(data).map_err(|source| ForensicsError::Read {
            path: path.to_vec(),
            digest,
            source,
        })
    };
    Ok(hash(a, na)? == hash(b, nb)?)
}
