//! Forensics: what the merged view alone cannot tell. Every answer comes from
//! the layers applied one at a time by the overlay's own rules
//! ([`crate::overlay::tree::Applier`]), so history, deletions, diffs and
//! greps agree with the mount by construction.
//!
//! - [`history`]: every layer that touched a path, and how;
//! - [`deleted`]: entries some layer holds that the merged tree does not
//!   show, with the layer that hid them and how (where leaked secrets hide);
//! - [`diff`]: two merged trees compared entry by entry;
//! - [`grep`]: a search of file contents without a mount;
//! - [`across`]: that search over many images (every tag of a repository),
//!   each distinct layer's files read once.
//!
//! Results are plain records; printing them (text or JSON) is the CLI's job.

pub mod across;
pub mod diff;
pub mod grep;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::cache::Layer;
pub use crate::image::FileData;
use crate::layer::{EntryKind, LayerIndex};
use crate::names;
use crate::overlay::tree::{Applier, Node, NodeId, TreeError};
use crate::overlay::{Change, classify};

#[derive(Debug, thiserror::Error)]
pub enum ForensicsError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("{}: reading layer {digest}", names::escaped(.path))]
    Read {
        path: Vec<u8>,
        digest: String,
        #[source]
        source: io::Error,
    },
}

/// sha256 of a reader's bytes, as hex.
pub fn sha256_hex(mut r: impl Read) -> io::Result<String> {
    let mut h = Sha256::new();
    crate::digest::hash_into(&mut r, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// What a path is after a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Content hash of a regular file.
    pub sha256: Option<String>,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
}

/// How a layer changed a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Added,
    Modified,
    /// By a whiteout.
    Removed,
    /// By an opaque directory, or a non-directory replacing a parent.
    Hidden,
    TypeChanged,
    /// Same content; owner, mode or time changed, or the entry was written again.
    Metadata,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Added => "added",
            Action::Modified => "modified",
            Action::Removed => "removed",
            Action::Hidden => "hidden",
            Action::TypeChanged => "type-changed",
            Action::Metadata => "metadata",
        }
    }
}

/// One layer's change to one path.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub layer: usize,
    pub path: Vec<u8>,
    pub action: Action,
    /// The path's state after the change (`None` once removed or hidden).
    pub after: Option<State>,
}

/// Where a node's attributes and bytes come from, to tell changes apart
/// without reading: equal origins mean equal content.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snap {
    id: NodeId,
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    link: Option<Vec<u8>>,
    layer: u16,
    offset: u64,
}

fn snap(id: NodeId, n: &Node) -> Snap {
    Snap {
        id,
        kind: n.kind,
        mode: n.mode,
        uid: n.uid,
        gid: n.gid,
        size: n.size,
        mtime: n.mtime,
        link: n.link.as_deref().map(<[u8]>::to_vec),
        layer: n.layer,
        offset: n.offset,
    }
}

/// Content hashes, each file read once.
struct Hashes<'a> {
    layers: &'a [Arc<Layer>],
    digests: &'a [String],
    done: HashMap<(u16, u64), String>,
}

impl Hashes<'_> {
    fn of(&mut self, path: &[u8], n: &Node) -> Result<String, ForensicsError> {
        if let Some(h) = self.done.get(&(n.layer, n.offset)) {
            return Ok(h.clone());
        }
        let digest = || {
            self.digests
                .get(n.layer as usize)
                .cloned()
                .unwrap_or_default()
        };
        let data = FileData::of_node(self.layers, n);
        let h = sha256_hex(data).map_err(|source| ForensicsError::Read {
            path: path.to_vec(),
            digest: digest(),
            source,
        })?;
        self.done.insert((n.layer, n.offset), h.clone());
        Ok(h)
    }
}

/// The layer's markers and entries, to say how it hid a path.
struct LayerChanges {
    whiteouts: BTreeSet<Vec<u8>>,
    opaque: BTreeSet<Vec<u8>>,
    nondirs: BTreeSet<Vec<u8>>,
    entries: BTreeSet<Vec<u8>>,
}

impl LayerChanges {
    fn new(index: &LayerIndex) -> LayerChanges {
        let mut c = LayerChanges {
            whiteouts: BTreeSet::new(),
            opaque: BTreeSet::new(),
            nondirs: BTreeSet::new(),
            entries: BTreeSet::new(),
        };
        for e in &index.entries {
            match classify(&e.path) {
                Change::Whiteout { dir, name } => {
                    c.whiteouts.insert(names::join(dir, name));
                }
                Change::Opaque { dir } => {
                    c.opaque.insert(dir.to_vec());
                }
                Change::Entry => {
                    if e.kind != EntryKind::Dir {
                        c.nondirs.insert(e.path.clone());
                    }
                    c.entries.insert(e.path.clone());
                }
            }
        }
        c
    }

    /// How this layer made `path` (which a lower layer put there) go away.
    fn how(&self, path: &[u8]) -> How {
        let mut up = names::ancestors(path).collect::<Vec<_>>();
        up.push(path);
        if up.iter().any(|a| self.whiteouts.contains(*a)) {
            How::Whiteout
        } else if self.opaque.contains(&b""[..])
            || names::ancestors(path).any(|a| self.opaque.contains(a))
        {
            How::Opaque
        } else if names::ancestors(path).any(|a| self.nondirs.contains(a)) {
            How::FileOverDirectory
        } else {
            How::Replaced
        }
    }
}

/// Every layer that changed `path` (and, with `recursive`, anything below
/// it), oldest first. Paths are literal: symlinks are not followed.
pub fn history(
    indexes: &[LayerIndex],
    layers: &[Arc<Layer>],
    digests: &[String],
    path: &[u8],
    recursive: bool,
) -> Result<Vec<LogRecord>, ForensicsError> {
    let path = crate::layer::normalize(path);
    let mut ap = Applier::new();
    let mut hashes = Hashes {
        layers,
        digests,
        done: HashMap::new(),
    };
    let mut before: BTreeMap<Vec<u8>, Snap> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, index) in indexes.iter().enumerate() {
        ap.apply(index)?;
        let changes = LayerChanges::new(index);
        let mut after: BTreeMap<Vec<u8>, Snap> = BTreeMap::new();
        if let Some(id) = ap.get(&path) {
            after.insert(path.clone(), snap(id, ap.node(id)));
            if recursive && ap.node(id).kind == EntryKind::Dir {
                for (p, c) in ap.below(id, &path) {
                    after.insert(p, snap(c, ap.node(c)));
                }
            }
        }
        let keys: BTreeSet<&Vec<u8>> = before.keys().chain(after.keys()).collect();
        for p in keys {
            let (b, a) = (before.get(p), after.get(p));
            let action = match (b, a) {
                (None, None) => continue,
                (None, Some(_)) => Action::Added,
                (Some(_), None) => match changes.how(p) {
                    How::Whiteout => Action::Removed,
                    _ => Action::Hidden,
                },
                (Some(b), Some(a)) if a.kind != b.kind => Action::TypeChanged,
                (Some(b), Some(a)) => {
                    let same_origin = (a.layer, a.offset) == (b.layer, b.offset);
                    let content_differs = a.kind == EntryKind::File
                        && !same_origin
                        && (a.size != b.size
                            || hashes.of(p, ap.node(a.id))? != hashes.of(p, &node_at(&ap, b))?);
                    let link_differs = a.link != b.link;
                    let meta_differs =
                        (a.mode, a.uid, a.gid, a.mtime) != (b.mode, b.uid, b.gid, b.mtime);
                    if content_differs || link_differs {
                        Action::Modified
                    } else if meta_differs || changes.entries.contains(p.as_slice()) {
                        Action::Metadata
                    } else {
                        continue;
                    }
                }
            };
            let after = match a {
                Some(a) => {
                    let n = ap.node(a.id);
                    Some(State {
                        kind: n.kind,
                        mode: n.mode,
                        uid: n.uid,
                        gid: n.gid,
                        size: if n.kind == EntryKind::File { n.size } else { 0 },
                        sha256: if n.kind == EntryKind::File {
                            Some(hashes.of(p, n)?)
                        } else {
                            None
                        },
                        target: (n.kind == EntryKind::Symlink)
                            .then(|| n.link.as_deref().unwrap_or_default().to_vec()),
                    })
                }
                None => None,
            };
            out.push(LogRecord {
                layer: i,
                path: p.clone(),
                action,
                after,
            });
        }
        before = after;
    }
    Ok(out)
}

/// A node as it was: attributes from the snapshot (a node changed in place,
/// such as a directory written again, has new ones now).
fn node_at(ap: &Applier, s: &Snap) -> Node {
    let mut n = ap.node(s.id).clone();
    n.layer = s.layer;
    n.offset = s.offset;
    n.size = s.size;
    n
}

/// How a later layer hid an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    Whiteout,
    Opaque,
    /// Another entry took its name (in a later layer or later in its own).
    Replaced,
    /// A non-directory took the place of one of its parents.
    FileOverDirectory,
}

impl How {
    pub fn as_str(self) -> &'static str {
        match self {
            How::Whiteout => "whiteout",
            How::Opaque => "opaque",
            How::Replaced => "replaced",
            How::FileOverDirectory => "file-over-directory",
        }
    }
}

/// An entry a layer holds that the merged tree does not show.
#[derive(Debug, Clone)]
pub struct Deleted {
    pub path: Vec<u8>,
    /// The layer holding the entry (and its bytes).
    pub layer: usize,
    /// Which of its entries.
    pub entry: usize,
    pub hidden_by: usize,
    pub how: How,
}

/// Every entry of every layer that the merged tree does not show, in layer
/// and tar order.
pub fn deleted(indexes: &[LayerIndex]) -> Result<Vec<Deleted>, TreeError> {
    struct Track {
        layer: usize,
        entry: usize,
        dir: NodeId,
        node: NodeId,
    }
    let mut ap = Applier::new();
    let mut live: Vec<Track> = Vec::new();
    let mut out = Vec::new();
    for (i, index) in indexes.iter().enumerate() {
        let placed = ap.apply(index)?;
        let changes = LayerChanges::new(index);
        let reach = ap.reachable();
        let name_of = |t: &Track| {
            names::split(&indexes[t.layer].entries[t.entry].path)
                .1
                .to_vec()
        };
        let alive = |t: &Track| {
            reach.get(t.dir as usize).copied().unwrap_or(false)
                && ap.lookup(t.dir, &name_of(t)) == Some(t.node)
        };
        let mut still = Vec::with_capacity(live.len());
        for t in live.drain(..) {
            if alive(&t) {
                still.push(t);
            } else {
                let path = indexes[t.layer].entries[t.entry].path.clone();
                out.push(Deleted {
                    how: changes.how(&path),
                    path,
                    layer: t.layer,
                    entry: t.entry,
                    hidden_by: i,
                });
            }
        }
        for (k, p) in placed.into_iter().enumerate() {
            let Some((dir, node)) = p else { continue };
            let t = Track {
                layer: i,
                entry: k,
                dir,
                node,
            };
            if alive(&t) {
                still.push(t);
            } else {
                // A later entry of the same layer took its place.
                out.push(Deleted {
                    path: index.entries[k].path.clone(),
                    layer: i,
                    entry: k,
                    hidden_by: i,
                    how: How::Replaced,
                });
            }
        }
        live = still;
    }
    out.sort_by_key(|d| (d.layer, d.entry));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Entry;

    fn e(path: &str, kind: EntryKind) -> Entry {
        Entry {
            mode: 0o644,
            ..Entry::new(path.as_bytes(), kind)
        }
    }

    fn layer(entries: Vec<Entry>) -> LayerIndex {
        LayerIndex { entries }
    }

    fn deleted_of(layers: &[LayerIndex]) -> Vec<(String, usize, usize, &'static str)> {
        deleted(layers)
            .unwrap()
            .into_iter()
            .map(|d| {
                (
                    String::from_utf8_lossy(&d.path).into_owned(),
                    d.layer,
                    d.hidden_by,
                    d.how.as_str(),
                )
            })
            .collect()
    }

    #[test]
    fn deleted_lists_each_hidden_entry_with_the_layer_that_hid_it_and_how() {
        let mut secret2 = e("s/key", EntryKind::File);
        secret2.offset = 1;
        let layers = [
            layer(vec![
                e("s", EntryKind::Dir),
                e("s/key", EntryKind::File),
                e("o", EntryKind::Dir),
                e("o/x", EntryKind::File),
                e("d", EntryKind::Dir),
                e("d/y", EntryKind::File),
                e("f", EntryKind::File),
            ]),
            layer(vec![
                e("s/.wh.key", EntryKind::File),
                e("o/.wh..wh..opq", EntryKind::File),
                e("d", EntryKind::File),
                e("f", EntryKind::File),
            ]),
            layer(vec![e("s", EntryKind::Dir), secret2]),
        ];
        assert_eq!(
            deleted_of(&layers),
            [
                ("s/key".into(), 0, 1, "whiteout"),
                ("o/x".into(), 0, 1, "opaque"),
                ("d".into(), 0, 1, "replaced"),
                ("d/y".into(), 0, 1, "file-over-directory"),
                ("f".into(), 0, 1, "replaced"),
            ]
        );
    }

    #[test]
    fn an_entry_written_twice_in_one_layer_shows_the_first_as_replaced() {
        let layers = [layer(vec![
            e("x", EntryKind::File),
            e("x", EntryKind::File),
        ])];
        assert_eq!(deleted_of(&layers), [("x".into(), 0, 0, "replaced")]);
    }

    #[test]
    fn nothing_is_deleted_when_a_directory_is_only_written_again() {
        let layers = [
            layer(vec![e("d", EntryKind::Dir), e("d/a", EntryKind::File)]),
            layer(vec![e("d", EntryKind::Dir), e("d/b", EntryKind::File)]),
        ];
        assert!(deleted_of(&layers).is_empty());
    }
}
