//! The merged tree of an image: every layer applied bottom to top by the
//! rules in [`crate::overlay`]. While layers are applied, nodes and
//! directory maps live in memory ([`Applier`]); the finished tree is written
//! in the saved format of [`super::saved`] (one node per inode, hardlinked
//! names sharing a node, children sorted by name bytes) and read in place.

use std::collections::BTreeMap;

use super::saved::{
    CHILD_LEN, ChildRecord, HAS_LINK, HAS_RDEV, HAS_SPARSE, HAS_XATTRS, HEADER_LEN, Header,
    NodeRecord, RECORD_LEN, kind_code, seal,
};
pub use super::saved::{Children, NodeRef, SavedTreeError, Tree};
use super::{Change, MAX_SYMLINKS, classify};
use crate::layer::{Entry, EntryKind, LayerIndex, Segment};
use crate::names::{self, Escaped};

pub type NodeId = u32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("{}: no such file or directory", Escaped(.0))]
    NotFound(Vec<u8>),
    #[error("{}: not a directory", Escaped(.0))]
    NotADirectory(Vec<u8>),
    #[error("{}: too many levels of symbolic links", Escaped(.0))]
    SymlinkLoop(Vec<u8>),
    #[error("the image has more entries than rimg can number ({0})")]
    TooLarge(usize),
    /// As `docker load`, containerd and umoci fail such a layer.
    #[error(
        "layer {layer}: hardlink {} points at {}, {why}",
        Escaped(.path),
        Escaped(.target)
    )]
    Hardlink {
        layer: u16,
        path: Vec<u8>,
        target: Vec<u8>,
        why: &'static str,
    },
}

#[derive(Debug, Clone)]
pub struct Node {
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub link: Option<Box<[u8]>>,
    pub rdev: (u32, u32),
    xattrs: Option<Box<[Xattr]>>,
    /// Index (bottom = 0) of the layer this entry's attributes and data come from.
    pub layer: u16,
    /// Where the file's bytes start in that layer's uncompressed tar.
    pub offset: u64,
    /// A sparse file's data segments (see [`crate::layer::read_file`]);
    /// boxed twice so that it costs every node 8 bytes, not 16.
    sparse: Option<Box<Box<[Segment]>>>,
    pub nlink: u32,
    parent: NodeId,
}

impl Node {
    /// A sparse file's data segments; `None` for a file stored whole.
    pub fn sparse(&self) -> Option<&[Segment]> {
        self.sparse.as_deref().map(|s| &**s)
    }

    /// The entry's extended attributes as the image stores them.
    pub fn xattrs(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.xattrs
            .iter()
            .flatten()
            .map(|(k, v)| (k.as_ref(), v.as_ref()))
    }
}

/// An extended attribute: name and value.
type Xattr = (Box<str>, Box<[u8]>);

/// Nodes and directory maps while layers are applied.
struct Builder {
    nodes: Vec<Node>,
    dirs: Vec<BTreeMap<Box<[u8]>, NodeId>>,
    /// The directory of the previous entry: tars list a directory's entries
    /// together, so most lookups of a parent hit this. Forgotten whenever a
    /// directory or symlink loses a name, since a path may run through either.
    last_dir: Option<(Vec<u8>, NodeId)>,
}

fn implicit_dir(layer: u16, parent: NodeId) -> Node {
    node_from(&Entry::implicit_dir(b""), layer, parent)
}

fn node_from(e: &Entry, layer: u16, parent: NodeId) -> Node {
    Node {
        kind: e.kind,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        size: e.size,
        mtime: e.mtime,
        link: e.link.as_deref().map(Box::from),
        rdev: e.rdev,
        xattrs: (!e.xattrs.is_empty()).then(|| {
            e.xattrs
                .iter()
                .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.as_slice())))
                .collect()
        }),
        layer,
        offset: e.offset,
        sparse: e.sparse.clone().map(Box::new),
        nlink: 1,
        parent,
    }
}

/// What to do with a component that is in the way of a parent path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Only look, never following a symlink: what whiteouts and opaque
    /// markers name (see [`super`]).
    Literal,
    /// Only look: a missing or non-directory component ends the walk.
    Look,
    /// Create missing components as directories and replace non-directories.
    Make,
}

impl Builder {
    fn new() -> Builder {
        let mut root = implicit_dir(0, 0);
        root.nlink = 1;
        Builder {
            nodes: vec![root],
            dirs: vec![BTreeMap::new()],
            last_dir: None,
        }
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.dirs.push(BTreeMap::new());
        (self.nodes.len() - 1) as NodeId
    }

    fn is_dir(&self, id: NodeId) -> bool {
        self.nodes[id as usize].kind == EntryKind::Dir
    }

    /// Removes the name `name` from `dir`; a node loses one link.
    fn unlink(&mut self, dir: NodeId, name: &[u8]) {
        if let Some(id) = self.dirs[dir as usize].remove(name) {
            let n = &mut self.nodes[id as usize];
            n.nlink = n.nlink.saturating_sub(1);
            if matches!(n.kind, EntryKind::Dir | EntryKind::Symlink) {
                // It may be on the remembered path.
                self.last_dir = None;
            }
        }
    }

    fn insert(&mut self, dir: NodeId, name: &[u8], id: NodeId) {
        self.dirs[dir as usize].insert(name.into(), id);
    }

    /// The directory `path` names, its components resolved the way docker
    /// (in a chroot) and umoci (with securejoin) resolve them: a symlink is
    /// followed inside the image, absolute targets from its root, `..` stops
    /// at the root.
    ///
    /// With [`Walk::Make`], a missing component becomes a directory of
    /// `layer` and a non-directory in the way is replaced by one. A symlink
    /// that does not lead to a directory (dangling, to a file, or a loop) is
    /// itself replaced by a directory rather than anything made where it
    /// points: so an entry changes only its own name and its own parents,
    /// which is what lets [`super::partial`] know what a layer may touch.
    fn walk_dir(&mut self, path: &[u8], layer: u16, how: Walk) -> Option<NodeId> {
        let mut pending: Vec<Vec<u8>> = names::components(path).rev().map(<[u8]>::to_vec).collect();
        let mut cur: NodeId = 0;
        let mut followed = 0;
        // The outermost symlink being followed: its directory, its name, and
        // how many components were pending before its target was pushed.
        let mut via: Option<(NodeId, Vec<u8>, usize)> = None;
        while let Some(comp) = pending.pop() {
            if via
                .as_ref()
                .is_some_and(|(_, _, depth)| pending.len() < *depth)
            {
                via = None;
            }
            match comp.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    cur = self.nodes[cur as usize].parent;
                    continue;
                }
                _ => {}
            }
            let existing = self.dirs[cur as usize].get(comp.as_slice()).copied();
            cur = match existing {
                Some(id) if self.is_dir(id) => id,
                Some(id)
                    if how != Walk::Literal
                        && self.nodes[id as usize].kind == EntryKind::Symlink
                        && followed < MAX_SYMLINKS =>
                {
                    followed += 1;
                    if via.is_none() {
                        via = Some((cur, comp.clone(), pending.len()));
                    }
                    let target = self.nodes[id as usize].link.as_deref().unwrap_or_default();
                    if target.starts_with(b"/") {
                        cur = 0;
                    }
                    pending.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                    continue;
                }
                _ if how != Walk::Make => return None,
                existing => {
                    // Replace the symlink that led here, or what is in the way.
                    let (dir, name, in_the_way) = match via.take() {
                        Some((dir, name, depth)) => {
                            pending.truncate(depth);
                            (dir, name, true)
                        }
                        None => (cur, comp, existing.is_some()),
                    };
                    if in_the_way {
                        self.unlink(dir, &name);
                    }
                    let id = self.push(implicit_dir(layer, dir));
                    self.insert(dir, &name, id);
                    id
                }
            };
        }
        Some(cur)
    }

    /// The directory an entry goes into, through the remembered one when the
    /// tar lists siblings together.
    fn parent_dir(&mut self, dir_path: &[u8], layer: u16) -> NodeId {
        if let Some((p, id)) = &self.last_dir
            && p == dir_path
            && self.is_dir(*id)
        {
            return *id;
        }
        let id = self
            .walk_dir(dir_path, layer, Walk::Make)
            .expect("making a directory always yields one");
        self.last_dir = Some((dir_path.to_vec(), id));
        id
    }

    /// Applies one entry; says where it landed: `(directory, node)`.
    fn add(&mut self, e: &Entry, layer: u16) -> Result<Option<(NodeId, NodeId)>, TreeError> {
        if e.path.is_empty() {
            // The root's own entry: its attributes, never its identity.
            if e.kind == EntryKind::Dir {
                let old = &self.nodes[0];
                let mut root = node_from(e, layer, 0);
                root.nlink = old.nlink;
                self.nodes[0] = root;
            }
            return Ok(None);
        }
        let (dir_path, name) = names::split(&e.path);
        let dir = self.parent_dir(dir_path, layer);
        let existing = self.dirs[dir as usize].get(name).copied();
        if e.kind == EntryKind::Hardlink {
            let target = e.link.as_deref().unwrap_or_default();
            let (t_dir, t_name) = names::split(target);
            let found = self
                .walk_dir(t_dir, layer, Walk::Look)
                .and_then(|d| self.dirs[d as usize].get(t_name).copied());
            let t = match found {
                Some(t) if !self.is_dir(t) => t,
                other => {
                    return Err(TreeError::Hardlink {
                        layer,
                        path: e.path.clone(),
                        target: target.to_vec(),
                        why: if other.is_some() {
                            "a directory"
                        } else {
                            "which does not exist when the link is applied"
                        },
                    });
                }
            };
            if existing == Some(t) {
                return Ok(Some((dir, t)));
            }
            self.unlink(dir, name);
            self.nodes[t as usize].nlink += 1;
            self.insert(dir, name, t);
            return Ok(Some((dir, t)));
        }
        if let Some(old) = existing
            && e.kind == EntryKind::Dir
            && self.is_dir(old)
        {
            // Directory over directory: lower children stay, upper attributes win.
            let n = &mut self.nodes[old as usize];
            let keep = (n.nlink, n.parent);
            *n = node_from(e, layer, dir);
            (n.nlink, n.parent) = keep;
            return Ok(Some((dir, old)));
        }
        self.unlink(dir, name);
        let id = self.push(node_from(e, layer, dir));
        self.insert(dir, name, id);
        Ok(Some((dir, id)))
    }

    /// Applies one layer's changeset: markers first (they act on the layers
    /// below), then the entries in tar order.
    /// Returns where each entry landed (`None` for markers and the root).
    fn apply(&mut self, index: &LayerIndex, layer: u16) -> Result<Vec<Placed>, TreeError> {
        // Directories created implicitly belong to the layer being applied.
        self.last_dir = None;
        let mut regular = Vec::with_capacity(index.entries.len());
        for (k, e) in index.entries.iter().enumerate() {
            match classify(&e.path) {
                Change::Opaque { dir } => {
                    if let Some(d) = self.walk_dir(dir, layer, Walk::Literal) {
                        let names: Vec<Box<[u8]>> = self.dirs[d as usize].keys().cloned().collect();
                        for n in names {
                            self.unlink(d, &n);
                        }
                    }
                }
                Change::Whiteout { dir, name } => {
                    if !name.is_empty()
                        && let Some(d) = self.walk_dir(dir, layer, Walk::Literal)
                    {
                        self.unlink(d, name);
                    }
                }
                Change::Entry => regular.push((k, e)),
            }
        }
        self.last_dir = None;
        let mut placed = vec![None; index.entries.len()];
        for (k, e) in regular {
            placed[k] = self.add(e, layer)?;
        }
        Ok(placed)
    }

    /// One layer as stored: markers are shown as the files they are, and a
    /// hardlink to a file of another layer cannot be shown, so it is left out
    /// with a warning.
    fn apply_raw(&mut self, index: &LayerIndex) {
        for e in &index.entries {
            if let Err(err) = self.add(e, 0) {
                tracing::warn!("{err}; not shown in this single-layer view");
            }
        }
    }

    /// Renumbers reachable nodes densely, breadth first, and writes them in
    /// the saved format, freeing each directory map as it goes.
    fn finish(mut self) -> Result<Tree, TreeError> {
        let mut new_id: Vec<Option<NodeId>> = vec![None; self.nodes.len()];
        let mut order: Vec<NodeId> = vec![0];
        new_id[0] = Some(0);
        let mut i = 0;
        // A file's link count is its names that are still reachable: a name
        // under a directory that was whited out, or hidden, no longer counts.
        let mut names_of: Vec<u32> = vec![0];
        let mut children = 0usize;
        while i < order.len() {
            let old = order[i];
            for &child in self.dirs[old as usize].values() {
                children += 1;
                match new_id[child as usize] {
                    Some(id) => names_of[id as usize] += 1,
                    None => {
                        new_id[child as usize] = Some(order.len() as NodeId);
                        order.push(child);
                        names_of.push(1);
                    }
                }
            }
            i += 1;
        }
        if order.len() > u32::MAX as usize - 1 || children > u32::MAX as usize {
            return Err(TreeError::TooLarge(order.len()));
        }
        let too_large = || TreeError::TooLarge(order.len());
        let nodes_len = order.len() * RECORD_LEN;
        let mut out = vec![0u8; HEADER_LEN + nodes_len];
        out.reserve(children * CHILD_LEN);
        let mut names: Vec<u8> = Vec::new();
        // The data blob starts with a byte no node points at, so that an
        // extras offset of 0 never means anything.
        let mut data: Vec<u8> = vec![0];
        let mut blocks = 0u64;
        let mut next_child = 0u32;
        for (id, &old) in order.iter().enumerate() {
            let map = std::mem::take(&mut self.dirs[old as usize]);
            let n = &self.nodes[old as usize];
            let subdirs = map.values().filter(|&&c| self.is_dir(c)).count() as u32;
            let nlink = if n.kind == EntryKind::Dir {
                2 + subdirs
            } else {
                names_of[id].max(1)
            };
            let first = next_child;
            for (name, c) in &map {
                let at = u32::try_from(names.len()).map_err(|_| too_large())?;
                // Tar names may be longer than any filesystem allows; cut, never wrap.
                let bytes = &name[..name.len().min(u16::MAX as usize)];
                names.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
                names.extend_from_slice(bytes);
                let node = new_id[*c as usize].expect("reachable child");
                ChildRecord { name_at: at, node }.store(&mut out);
            }
            next_child += map.len() as u32;
            drop(map);
            blocks += n.size.div_ceil(4096);
            let mut extras = 0u8;
            let extras_at = data.len() as u64;
            if matches!(n.kind, EntryKind::Char | EntryKind::Block) || n.rdev != (0, 0) {
                extras |= HAS_RDEV;
                data.extend_from_slice(&n.rdev.0.to_le_bytes());
                data.extend_from_slice(&n.rdev.1.to_le_bytes());
            }
            let sized = |data: &mut Vec<u8>, b: &[u8]| -> Result<(), TreeError> {
                let len = u32::try_from(b.len()).map_err(|_| TreeError::TooLarge(b.len()))?;
                data.extend_from_slice(&len.to_le_bytes());
                data.extend_from_slice(b);
                Ok(())
            };
            if let Some(l) = &n.link {
                extras |= HAS_LINK;
                sized(&mut data, l)?;
            }
            if let Some(x) = &n.xattrs {
                extras |= HAS_XATTRS;
                data.extend_from_slice(&(x.len() as u32).to_le_bytes());
                for (k, v) in x.iter() {
                    sized(&mut data, k.as_bytes())?;
                    sized(&mut data, v)?;
                }
            }
            if let Some(s) = n.sparse() {
                extras |= HAS_SPARSE;
                data.extend_from_slice(&(s.len() as u32).to_le_bytes());
                for seg in s {
                    for v in [seg.logical, seg.stored, seg.len] {
                        data.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            let parent = new_id[n.parent as usize].unwrap_or(0);
            let record = NodeRecord {
                kind: kind_code(n.kind),
                extras,
                layer: n.layer,
                mode: n.mode,
                uid: n.uid,
                gid: n.gid,
                nlink,
                parent,
                first_child: first,
                child_count: next_child - first,
                size: n.size,
                mtime: n.mtime,
                offset: n.offset,
                extras_at: if extras == 0 { 0 } else { extras_at },
            };
            let r = &mut out[HEADER_LEN + id * RECORD_LEN..][..RECORD_LEN];
            record.store(r.try_into().expect("a record is RECORD_LEN bytes"));
        }
        drop(self);
        Header {
            nodes: order.len() as u32,
            children: children as u32,
            names_len: names.len() as u64,
            data_len: data.len() as u64,
            blocks,
            checksum: 0,
        }
        .store(&mut out[..HEADER_LEN]);
        out.extend_from_slice(&names);
        drop(names);
        out.extend_from_slice(&data);
        drop(data);
        seal(&mut out);
        Ok(Tree::from_sealed(out))
    }
}

/// Where an entry landed: its directory and its node.
pub type Placed = Option<(NodeId, NodeId)>;

/// Layers applied one at a time, by the same rules as [`merge`], for
/// questions about the states between them (a path's history, what a later
/// layer hid). Node ids stay valid across layers: a node that loses its last
/// name is unreachable, not reused.
pub struct Applier {
    b: Builder,
    next: u16,
}

impl Default for Applier {
    fn default() -> Self {
        Self::new()
    }
}

impl Applier {
    pub fn new() -> Applier {
        Applier {
            b: Builder::new(),
            next: 0,
        }
    }

    /// Applies the next layer; says where each of its entries landed.
    pub fn apply(&mut self, index: &LayerIndex) -> Result<Vec<Placed>, TreeError> {
        let placed = self.b.apply(index, self.next)?;
        self.next += 1;
        Ok(placed)
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.b.nodes[id as usize]
    }

    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.b.dirs.get(dir as usize)?.get(name).copied()
    }

    /// The node at `path`, symlinks not followed.
    pub fn get(&self, path: &[u8]) -> Option<NodeId> {
        let mut cur = 0;
        for c in names::components(path) {
            if !self.b.is_dir(cur) {
                return None;
            }
            cur = self.lookup(cur, c)?;
        }
        Some(cur)
    }

    /// Which nodes the root reaches now.
    pub fn reachable(&self) -> Vec<bool> {
        let mut seen = vec![false; self.b.nodes.len()];
        seen[0] = true;
        let mut stack = vec![0 as NodeId];
        while let Some(id) = stack.pop() {
            for &c in self.b.dirs[id as usize].values() {
                if !seen[c as usize] {
                    seen[c as usize] = true;
                    stack.push(c);
                }
            }
        }
        seen
    }

    /// `(path, node)` of everything below `dir`, whose path is `prefix`.
    pub fn below(&self, dir: NodeId, prefix: &[u8]) -> Vec<(Vec<u8>, NodeId)> {
        let mut out = Vec::new();
        let mut stack = vec![(prefix.to_vec(), dir)];
        while let Some((p, id)) = stack.pop() {
            for (name, &c) in &self.b.dirs[id as usize] {
                let path = names::join(&p, name);
                if self.b.is_dir(c) {
                    stack.push((path.clone(), c));
                }
                out.push((path, c));
            }
        }
        out
    }

    pub fn finish(self) -> Result<Tree, TreeError> {
        self.b.finish()
    }
}

/// Applies `layers` bottom to top by the overlay rules.
pub fn merge(layers: &[&LayerIndex]) -> Result<Tree, TreeError> {
    let mut b = Builder::new();
    for (i, l) in layers.iter().enumerate() {
        b.apply(l, i as u16)?;
    }
    b.finish()
}

/// One layer's own tree, whiteout files shown as stored (for forensics).
pub fn single_layer(layer: &LayerIndex) -> Tree {
    let mut b = Builder::new();
    b.apply_raw(layer);
    b.finish().expect("one layer fits")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry::new(path.as_bytes(), kind)
    }

    fn f(path: &str) -> Entry {
        entry(path, EntryKind::File)
    }
    fn d(path: &str) -> Entry {
        entry(path, EntryKind::Dir)
    }
    fn link(path: &str, kind: EntryKind, target: &str) -> Entry {
        Entry {
            link: Some(target.as_bytes().to_vec()),
            ..entry(path, kind)
        }
    }
    fn layer(entries: Vec<Entry>) -> LayerIndex {
        LayerIndex { entries }
    }

    /// Every path in the tree, with the layer it came from.
    fn listing(t: &Tree) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), t.root())];
        while let Some((p, id)) = stack.pop() {
            for (name, c) in t.children(id) {
                let name = String::from_utf8_lossy(name);
                let path = if p.is_empty() {
                    name.to_string()
                } else {
                    format!("{p}/{name}")
                };
                out.push(format!("{path}@{}", t.node(c).layer));
                stack.push((path, c));
            }
        }
        out.sort();
        out
    }

    fn merged(layers: Vec<LayerIndex>) -> Tree {
        let refs: Vec<&LayerIndex> = layers.iter().collect();
        merge(&refs).unwrap()
    }

    #[test]
    fn whiteout_deletes_lower_entry_and_its_subtree() {
        let t = merged(vec![
            layer(vec![d("a"), f("a/x"), d("a/sub"), f("a/sub/y"), f("b")]),
            layer(vec![f("a/.wh.sub"), f(".wh.b")]),
        ]);
        assert_eq!(listing(&t), ["a/x@0", "a@0"]);
    }

    #[test]
    fn whiteout_does_not_delete_the_same_layers_entry() {
        let t = merged(vec![layer(vec![f("x")]), layer(vec![f("x"), f(".wh.x")])]);
        assert_eq!(listing(&t), ["x@1"]);
    }

    #[test]
    fn opaque_marker_hides_lower_children_but_keeps_its_own_wherever_it_stands() {
        let t = merged(vec![
            layer(vec![d("d"), f("d/old"), d("d/olddir"), f("d/olddir/z")]),
            layer(vec![d("d"), f("d/new"), f("d/.wh..wh..opq"), f("d/newer")]),
        ]);
        assert_eq!(listing(&t), ["d/new@1", "d/newer@1", "d@1"]);
    }

    #[test]
    fn file_over_directory_removes_the_subtree() {
        let t = merged(vec![layer(vec![d("p"), f("p/child")]), layer(vec![f("p")])]);
        assert_eq!(listing(&t), ["p@1"]);
        assert_eq!(
            t.node(t.resolve(b"p", false).unwrap()).kind,
            EntryKind::File
        );
    }

    #[test]
    fn directory_over_file_replaces_it() {
        let t = merged(vec![layer(vec![f("p")]), layer(vec![d("p"), f("p/c")])]);
        assert_eq!(listing(&t), ["p/c@1", "p@1"]);
    }

    #[test]
    fn directory_over_directory_keeps_children_and_takes_upper_attributes() {
        let mut upper = d("p");
        upper.mode = 0o700;
        upper.uid = 42;
        let t = merged(vec![
            layer(vec![d("p"), f("p/low")]),
            layer(vec![upper, f("p/high")]),
        ]);
        assert_eq!(listing(&t), ["p/high@1", "p/low@0", "p@1"]);
        let p = t.node(t.resolve(b"p", false).unwrap());
        assert_eq!((p.mode, p.uid), (0o700, 42));
    }

    #[test]
    fn hardlinks_share_one_node_with_the_right_link_count() {
        let t = merged(vec![layer(vec![
            f("bin/busybox"),
            link("bin/sh", EntryKind::Hardlink, "bin/busybox"),
            link("bin/ls", EntryKind::Hardlink, "bin/busybox"),
        ])]);
        let a = t.resolve(b"bin/busybox", false).unwrap();
        assert_eq!(t.resolve(b"bin/sh", false).unwrap(), a);
        assert_eq!(t.resolve(b"bin/ls", false).unwrap(), a);
        assert_eq!(t.node(a).nlink, 3);
    }

    #[test]
    fn a_hardlink_to_a_lower_layers_file_links_to_it() {
        let t = merged(vec![
            layer(vec![d("x"), f("x/orig")]),
            layer(vec![link("x/uplink", EntryKind::Hardlink, "x/orig")]),
        ]);
        let orig = t.resolve(b"x/orig", false).unwrap();
        assert_eq!(t.resolve(b"x/uplink", false).unwrap(), orig);
        assert_eq!(t.node(orig).nlink, 2);
    }

    #[test]
    fn a_hardlink_keeps_the_file_its_target_was_when_it_was_applied() {
        // dup/y links to the first dup/x; the second dup/x replaces only that name.
        let mut x1 = f("dup/x");
        x1.offset = 100;
        let mut x2 = f("dup/x");
        x2.offset = 200;
        let t = merged(vec![layer(vec![
            d("dup"),
            x1,
            link("dup/y", EntryKind::Hardlink, "dup/x"),
            x2,
        ])]);
        let x = t.node(t.resolve(b"dup/x", false).unwrap());
        let y = t.node(t.resolve(b"dup/y", false).unwrap());
        assert_eq!((x.offset, x.nlink), (200, 1));
        assert_eq!((y.offset, y.nlink), (100, 1));
    }

    #[test]
    fn a_hardlink_to_nothing_or_to_a_directory_fails_the_merge() {
        // docker load, containerd and umoci all fail such a layer: link(2)
        // answers ENOENT or EPERM. Failing loudly beats dropping the name.
        let err = merge(&[&layer(vec![link("l", EntryKind::Hardlink, "missing")])]).unwrap_err();
        assert!(matches!(err, TreeError::Hardlink { layer: 0, .. }), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
        let err = merge(&[&layer(vec![
            d("dir"),
            link("l", EntryKind::Hardlink, "dir"),
        ])])
        .unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
        // A link made before its target exists in the same layer fails too.
        let err = merge(&[&layer(vec![link("l", EntryKind::Hardlink, "t"), f("t")])]).unwrap_err();
        assert!(matches!(err, TreeError::Hardlink { .. }), "{err}");
    }

    #[test]
    fn overwriting_one_name_of_a_hardlinked_file_lowers_its_link_count() {
        let t = merged(vec![
            layer(vec![f("a"), link("b", EntryKind::Hardlink, "a")]),
            layer(vec![f("b")]),
        ]);
        let a = t.resolve(b"a", false).unwrap();
        assert_eq!(t.node(a).nlink, 1);
        assert_ne!(t.resolve(b"b", false).unwrap(), a);
    }

    #[test]
    fn whiteouts_stored_as_hardlinks_never_appear() {
        let t = merged(vec![
            layer(vec![f("x"), f("y")]),
            layer(vec![f("y"), link(".wh.x", EntryKind::Hardlink, "y")]),
        ]);
        assert_eq!(listing(&t), ["y@1"]);
    }

    #[test]
    fn later_duplicates_in_one_layer_win() {
        let mut second = f("x");
        second.size = 9;
        let t = merged(vec![layer(vec![f("x"), second])]);
        assert_eq!(t.node(t.resolve(b"x", false).unwrap()).size, 9);
    }

    #[test]
    fn missing_parents_are_implicit_directories() {
        let t = merged(vec![layer(vec![f("a/b/c")])]);
        let b = t.node(t.resolve(b"a/b", false).unwrap());
        assert_eq!((b.kind, b.mode, b.uid), (EntryKind::Dir, 0o755, 0));
        assert_eq!(t.node(t.root()).nlink, 3);
    }

    #[test]
    fn a_symlinked_parent_is_followed_inside_the_root_as_runtimes_do() {
        let t = merged(vec![
            layer(vec![
                d("etc"),
                link("abs", EntryKind::Symlink, "/etc"),
                link("rel", EntryKind::Symlink, "etc"),
                link("esc", EntryKind::Symlink, "../../.."),
            ]),
            layer(vec![
                f("abs/injected-abs"),
                f("rel/injected-rel"),
                f("esc/escaped"),
            ]),
        ]);
        assert_eq!(
            listing(&t),
            [
                "abs@0",
                "esc@0",
                "escaped@1",
                "etc/injected-abs@1",
                "etc/injected-rel@1",
                "etc@0",
                "rel@0"
            ]
        );
    }

    #[test]
    fn an_explicit_directory_entry_replaces_a_symlink() {
        let t = merged(vec![
            layer(vec![d("real"), link("via", EntryKind::Symlink, "/real")]),
            layer(vec![d("via"), f("via/file")]),
        ]);
        assert_eq!(listing(&t), ["real@0", "via/file@1", "via@1"]);
    }

    #[test]
    fn a_whiteout_under_a_symlinked_parent_names_nothing() {
        // Markers name lower-layer paths literally (see the overlay module):
        // "e/secret" does not exist below, so nothing is hidden.
        let t = merged(vec![
            layer(vec![
                d("etc"),
                f("etc/secret"),
                link("e", EntryKind::Symlink, "etc"),
            ]),
            layer(vec![f("e/.wh.secret"), f("e/.wh..wh..opq")]),
        ]);
        assert_eq!(listing(&t), ["e@0", "etc/secret@0", "etc@0"]);
    }

    #[test]
    fn names_that_are_not_utf8_are_kept_byte_for_byte() {
        let mut e = f("x");
        e.path = b"odd/latin1-\xe9.txt".to_vec();
        let t = merged(vec![layer(vec![e])]);
        let odd = t.resolve(b"odd", false).unwrap();
        let names: Vec<&[u8]> = t.children(odd).map(|(n, _)| n).collect();
        assert_eq!(names, [&b"latin1-\xe9.txt"[..]]);
        assert!(t.resolve(b"odd/latin1-\xe9.txt", false).is_ok());
    }

    #[test]
    fn resolve_follows_symlinks_inside_the_image_only() {
        let t = merged(vec![layer(vec![
            d("etc"),
            f("etc/passwd"),
            link("abs", EntryKind::Symlink, "/etc/passwd"),
            link("up", EntryKind::Symlink, "../../../../etc/passwd"),
            link("dir", EntryKind::Symlink, "etc"),
        ])]);
        let passwd = t.resolve(b"etc/passwd", true).unwrap();
        assert_eq!(t.resolve(b"abs", true).unwrap(), passwd);
        assert_eq!(t.resolve(b"up", true).unwrap(), passwd);
        assert_eq!(t.resolve(b"dir/passwd", true).unwrap(), passwd);
        assert_ne!(t.resolve(b"abs", false).unwrap(), passwd);
        assert_eq!(t.resolve(b"/../../etc/passwd", true).unwrap(), passwd);
    }

    #[test]
    fn symlink_loops_are_reported() {
        let t = merged(vec![layer(vec![
            link("a", EntryKind::Symlink, "b"),
            link("b", EntryKind::Symlink, "a"),
        ])]);
        assert_eq!(
            t.resolve(b"a", true),
            Err(TreeError::SymlinkLoop(b"a".to_vec()))
        );
        assert!(matches!(
            t.resolve(b"missing", true),
            Err(TreeError::NotFound(_))
        ));
    }

    #[test]
    fn single_layer_view_shows_whiteouts_as_stored() {
        let t = single_layer(&layer(vec![f(".wh.gone"), d("d"), f("d/.wh..wh..opq")]));
        assert_eq!(listing(&t), [".wh.gone@0", "d/.wh..wh..opq@0", "d@0"]);
    }

    #[test]
    fn sparse_maps_survive_the_merge_hardlinks_and_a_saved_tree() {
        let seg = Segment {
            logical: 4096,
            stored: 0,
            len: 10,
        };
        let mut s = f("disk.img");
        s.size = 1 << 33;
        s.sparse = Some(Box::new([seg]));
        let t = merged(vec![layer(vec![
            s,
            link("alias", EntryKind::Hardlink, "disk.img"),
        ])]);
        let saved = Tree::from_bytes(t.as_bytes().to_vec()).unwrap();
        for t in [&t, &saved] {
            let n = t.node(t.resolve(b"alias", false).unwrap());
            assert_eq!((n.size, n.sparse().as_deref()), (1 << 33, Some(&[seg][..])));
        }
        assert_eq!(t.node(t.root()).sparse(), None);
    }

    #[test]
    fn inode_numbers_are_dense_after_deletions() {
        let t = merged(vec![
            layer(vec![d("a"), f("a/1"), f("a/2"), f("b")]),
            layer(vec![f(".wh.a")]),
        ]);
        assert_eq!(t.len(), 2);
        assert_eq!(listing(&t), ["b@0"]);
    }

    #[test]
    fn a_file_counts_only_the_names_that_are_still_reachable() {
        let t = merged(vec![
            layer(vec![
                d("d"),
                f("d/t"),
                link("l", EntryKind::Hardlink, "d/t"),
            ]),
            layer(vec![f(".wh.d")]),
        ]);
        assert_eq!(t.node(t.resolve(b"l", false).unwrap()).nlink, 1);
    }
}
