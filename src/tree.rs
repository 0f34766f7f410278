//! The merged, whiteout-aware filesystem tree of an image, exactly as the OCI
//! image spec's "Applying Changesets" describes it, in a compact arena: one
//! node per inode (hardlinked names share a node), children sorted by name.

use std::collections::{BTreeMap, HashMap};

use crate::layer::{Entry, EntryKind, LayerIndex, Segment};

pub type NodeId = u32;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("{0}: no such file or directory in the image")]
    NotFound(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{0}: too many levels of symbolic links")]
    SymlinkLoop(String),
    #[error("the image has more entries than rimg can number ({0})")]
    TooLarge(usize),
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Node {
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub link: Option<Box<str>>,
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
    /// `(name, child)` in name order; names live in the tree's arena.
    children: Box<[(NameRef, NodeId)]>,
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

/// Offset of a name in [`Tree`]'s arena: one allocation for all names keeps
/// a large tree's memory near its entry count.
type NameRef = u32;

/// The merged tree. Node 0 is the root; inode numbers are `id + 1`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Tree {
    #[serde(deserialize_with = "nodes_in_one_allocation")]
    nodes: Vec<Node>,
    /// Every name, each as a little-endian u16 length and its bytes.
    names: Vec<u8>,
}

/// serde's `Vec` grows by doubling past a cautious first guess, which briefly
/// holds two copies of a large tree; the exact length postcard records lets
/// the nodes land in one allocation. The bound keeps a corrupt length from
/// asking for absurd memory.
fn nodes_in_one_allocation<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Node>, D::Error> {
    struct Nodes;
    impl<'de> serde::de::Visitor<'de> for Nodes {
        type Value = Vec<Node>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a sequence of tree nodes")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<Node>, A::Error> {
            let mut nodes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 22));
            while let Some(n) = seq.next_element()? {
                nodes.push(n);
            }
            Ok(nodes)
        }
    }
    d.deserialize_seq(Nodes)
}

impl Tree {
    pub fn root(&self) -> NodeId {
        0
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// The directory holding `id` (the root is its own parent). For a file with
    /// several names, the directory of the first.
    pub fn parent(&self, id: NodeId) -> NodeId {
        self.nodes[id as usize].parent
    }

    fn name_bytes(&self, at: NameRef) -> &[u8] {
        let at = at as usize;
        let len = self
            .names
            .get(at..at + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as usize);
        self.names.get(at + 2..at + 2 + len).unwrap_or_default()
    }

    pub fn lookup(&self, parent: NodeId, name: &str) -> Option<NodeId> {
        let children = &self.nodes.get(parent as usize)?.children;
        children
            .binary_search_by(|(n, _)| self.name_bytes(*n).cmp(name.as_bytes()))
            .ok()
            .map(|i| children[i].1)
    }

    /// Children in name order.
    pub fn children(&self, id: NodeId) -> impl Iterator<Item = (&str, NodeId)> + '_ {
        self.nodes[id as usize]
            .children
            .iter()
            .map(|(n, c)| (std::str::from_utf8(self.name_bytes(*n)).unwrap_or(""), *c))
    }

    /// Resolves `path` from the image root. Symlinks in the middle are always
    /// followed, the last one only when `follow_last`; targets resolve inside the
    /// image (absolute ones against its root, `..` stops at the root).
    pub fn resolve(&self, path: &str, follow_last: bool) -> Result<NodeId, TreeError> {
        let mut pending: Vec<String> = path.split('/').rev().map(str::to_string).collect();
        let mut cur = self.root();
        let mut walked: Vec<NodeId> = Vec::new();
        let mut followed = 0;
        while let Some(comp) = pending.pop() {
            match comp.as_str() {
                "" | "." => continue,
                ".." => {
                    cur = walked.pop().unwrap_or(self.root());
                    continue;
                }
                _ => {}
            }
            if self.node(cur).kind != EntryKind::Dir {
                return Err(TreeError::NotADirectory(path.to_string()));
            }
            let next = self
                .lookup(cur, &comp)
                .ok_or_else(|| TreeError::NotFound(path.to_string()))?;
            let is_last = pending.iter().all(|c| c.is_empty() || c == ".");
            let n = self.node(next);
            if n.kind == EntryKind::Symlink && (!is_last || follow_last) {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(TreeError::SymlinkLoop(path.to_string()));
                }
                let target = n.link.as_deref().unwrap_or("");
                if target.starts_with('/') {
                    cur = self.root();
                    walked.clear();
                }
                pending.extend(target.split('/').rev().map(str::to_string));
                continue;
            }
            walked.push(cur);
            cur = next;
        }
        Ok(cur)
    }
}

/// Nodes and directory maps while layers are applied.
struct Builder {
    nodes: Vec<Node>,
    dirs: Vec<BTreeMap<Box<str>, NodeId>>,
    /// The directory of the previous entry: tars list a directory's entries
    /// together, so most lookups of a parent hit this.
    last_dir: Option<(String, NodeId)>,
}

fn implicit_dir(layer: u16, parent: NodeId) -> Node {
    node_from(&Entry::implicit_dir(""), layer, parent)
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
        children: Box::new([]),
    }
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

    fn get(&self, path: &str) -> Option<NodeId> {
        let mut cur = 0;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            if self.nodes[cur as usize].kind != EntryKind::Dir {
                return None;
            }
            cur = *self.dirs[cur as usize].get(comp)?;
        }
        Some(cur)
    }

    /// Removes the name `name` from `dir`; a node loses one link.
    fn unlink(&mut self, dir: NodeId, name: &str) {
        if let Some(id) = self.dirs[dir as usize].remove(name) {
            let n = &mut self.nodes[id as usize];
            n.nlink = n.nlink.saturating_sub(1);
            if n.kind == EntryKind::Dir {
                // It may be on the remembered path.
                self.last_dir = None;
            }
        }
    }

    /// The directory at `path`, creating missing or non-directory components
    /// as implicit directories (symlinks are never followed).
    fn ensure_dir(&mut self, path: &str, layer: u16) -> NodeId {
        let mut cur = 0;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            cur = match self.dirs[cur as usize].get(comp).copied() {
                Some(id) if self.nodes[id as usize].kind == EntryKind::Dir => id,
                existing => {
                    if existing.is_some() {
                        self.unlink(cur, comp);
                    }
                    let id = self.push(implicit_dir(layer, cur));
                    self.dirs[cur as usize].insert(comp.into(), id);
                    id
                }
            };
        }
        cur
    }

    fn add(&mut self, e: &Entry, layer: u16) {
        if e.path.is_empty() {
            // The root's own entry: its attributes, never its identity.
            if e.kind == EntryKind::Dir {
                let old = &self.nodes[0];
                let mut root = node_from(e, layer, 0);
                root.nlink = old.nlink;
                self.nodes[0] = root;
            }
            return;
        }
        let (dir_path, name) = e.path.rsplit_once('/').unwrap_or(("", &e.path));
        let dir = match &self.last_dir {
            Some((p, id)) if p == dir_path && self.nodes[*id as usize].kind == EntryKind::Dir => {
                *id
            }
            _ => {
                let id = self.ensure_dir(dir_path, layer);
                self.last_dir = Some((dir_path.to_string(), id));
                id
            }
        };
        let existing = self.dirs[dir as usize].get(name).copied();
        if e.kind == EntryKind::Hardlink {
            let target = e.link.as_deref().unwrap_or("");
            match self.get(target) {
                Some(t)
                    if self.nodes[t as usize].layer == layer
                        && self.nodes[t as usize].kind != EntryKind::Dir =>
                {
                    if existing == Some(t) {
                        return;
                    }
                    self.unlink(dir, name);
                    self.nodes[t as usize].nlink += 1;
                    self.dirs[dir as usize].insert(name.into(), t);
                }
                _ => tracing::warn!(
                    "layer {layer}: hardlink {} points at {target:?}, which this layer does not hold; dropped",
                    e.path
                ),
            }
            return;
        }
        if let Some(old) = existing
            && e.kind == EntryKind::Dir
            && self.nodes[old as usize].kind == EntryKind::Dir
        {
            // Directory over directory: lower children stay, upper attributes win.
            let n = &mut self.nodes[old as usize];
            let keep = (n.nlink, n.parent);
            *n = node_from(e, layer, dir);
            (n.nlink, n.parent) = keep;
            return;
        }
        self.unlink(dir, name);
        let id = self.push(node_from(e, layer, dir));
        self.dirs[dir as usize].insert(name.into(), id);
    }

    /// Applies one layer's changeset.
    fn apply(&mut self, index: &LayerIndex, layer: u16, whiteouts: bool) {
        // Directories created implicitly belong to the layer being applied.
        self.last_dir = None;
        // Later duplicates win: keep only the last entry for each path.
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(index.entries.len());
        for (i, e) in index.entries.iter().enumerate() {
            last.insert(e.path.as_str(), i);
        }
        let live = index
            .entries
            .iter()
            .enumerate()
            .filter(|(i, e)| last.get(e.path.as_str()) == Some(i))
            .map(|(_, e)| e);
        if !whiteouts {
            for e in live {
                self.add(e, layer);
            }
            return;
        }
        let mut regular = Vec::with_capacity(index.entries.len());
        let mut opaque = Vec::new();
        let mut deleted = Vec::new();
        for e in live {
            let (dir, name) = e.path.rsplit_once('/').unwrap_or(("", &e.path));
            if name == OPAQUE {
                opaque.push(dir);
            } else if let Some(target) = name.strip_prefix(WHITEOUT) {
                deleted.push((dir, target));
            } else {
                regular.push(e);
            }
        }
        // Whiteouts and opaque markers act on lower layers only, so they are
        // applied before this layer's own entries, wherever they stand in the tar.
        for dir in opaque {
            if let Some(d) = self
                .get(dir)
                .filter(|&d| self.nodes[d as usize].kind == EntryKind::Dir)
            {
                let names: Vec<Box<str>> = self.dirs[d as usize].keys().cloned().collect();
                for n in names {
                    self.unlink(d, &n);
                }
            }
        }
        for (dir, name) in deleted {
            if name.is_empty() {
                continue;
            }
            if let Some(d) = self
                .get(dir)
                .filter(|&d| self.nodes[d as usize].kind == EntryKind::Dir)
            {
                self.unlink(d, name);
            }
        }
        for e in regular {
            self.add(e, layer);
        }
    }

    /// Renumbers reachable nodes densely, depth first, and freezes the maps.
    fn finish(mut self) -> Result<Tree, TreeError> {
        let mut new_id: Vec<Option<NodeId>> = vec![None; self.nodes.len()];
        let mut order: Vec<NodeId> = vec![0];
        new_id[0] = Some(0);
        let mut i = 0;
        while i < order.len() {
            let old = order[i];
            for &child in self.dirs[old as usize].values() {
                if new_id[child as usize].is_none() {
                    new_id[child as usize] = Some(order.len() as NodeId);
                    order.push(child);
                }
            }
            i += 1;
        }
        if order.len() > u32::MAX as usize - 1 {
            return Err(TreeError::TooLarge(order.len()));
        }
        let mut dirs = std::mem::take(&mut self.dirs);
        let mut nodes: Vec<Node> = Vec::with_capacity(order.len());
        let mut names: Vec<u8> = Vec::new();
        for &old in &order {
            let mut n = std::mem::replace(&mut self.nodes[old as usize], implicit_dir(0, 0));
            n.parent = new_id[n.parent as usize].unwrap_or(0);
            let map = std::mem::take(&mut dirs[old as usize]);
            n.children = map
                .into_iter()
                .map(|(name, c)| {
                    let at = names.len() as NameRef;
                    // Tar names may be longer than any filesystem allows; cut, never wrap.
                    let bytes = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
                    names.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
                    names.extend_from_slice(bytes);
                    (at, new_id[c as usize].expect("reachable child"))
                })
                .collect();
            nodes.push(n);
        }
        if names.len() > NameRef::MAX as usize {
            return Err(TreeError::TooLarge(order.len()));
        }
        names.shrink_to_fit();
        // Directory link counts: 2 plus one per subdirectory.
        for id in 0..nodes.len() {
            if nodes[id].kind == EntryKind::Dir {
                let subdirs = nodes[id]
                    .children
                    .iter()
                    .filter(|(_, c)| nodes[*c as usize].kind == EntryKind::Dir)
                    .count() as u32;
                nodes[id].nlink = 2 + subdirs;
            }
        }
        Ok(Tree { nodes, names })
    }
}

/// Applies `layers` bottom to top with OCI whiteout rules.
pub fn merge(layers: &[&LayerIndex]) -> Result<Tree, TreeError> {
    let mut b = Builder::new();
    for (i, l) in layers.iter().enumerate() {
        b.apply(l, i as u16, true);
    }
    b.finish()
}

/// One layer's own tree, whiteout files shown as stored (for forensics).
pub fn single_layer(layer: &LayerIndex) -> Tree {
    let mut b = Builder::new();
    b.apply(layer, 0, false);
    b.finish().expect("one layer fits")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.to_string(),
            kind,
            mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            link: None,
            rdev: (0, 0),
            xattrs: Vec::new(),
            offset: 0,
            sparse: None,
        }
    }

    fn f(path: &str) -> Entry {
        entry(path, EntryKind::File)
    }
    fn d(path: &str) -> Entry {
        entry(path, EntryKind::Dir)
    }
    fn link(path: &str, kind: EntryKind, target: &str) -> Entry {
        Entry {
            link: Some(target.to_string()),
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
        assert_eq!(t.node(t.resolve("p", false).unwrap()).kind, EntryKind::File);
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
        let p = t.node(t.resolve("p", false).unwrap());
        assert_eq!((p.mode, p.uid), (0o700, 42));
    }

    #[test]
    fn hardlinks_share_one_node_with_the_right_link_count() {
        let t = merged(vec![layer(vec![
            f("bin/busybox"),
            link("bin/sh", EntryKind::Hardlink, "bin/busybox"),
            link("bin/ls", EntryKind::Hardlink, "bin/busybox"),
        ])]);
        let a = t.resolve("bin/busybox", false).unwrap();
        assert_eq!(t.resolve("bin/sh", false).unwrap(), a);
        assert_eq!(t.resolve("bin/ls", false).unwrap(), a);
        assert_eq!(t.node(a).nlink, 3);
    }

    #[test]
    fn hardlinks_resolve_only_inside_their_layer() {
        let t = merged(vec![
            layer(vec![f("target")]),
            layer(vec![link("l", EntryKind::Hardlink, "target")]),
        ]);
        assert_eq!(listing(&t), ["target@0"]);
    }

    #[test]
    fn overwriting_one_name_of_a_hardlinked_file_lowers_its_link_count() {
        let t = merged(vec![
            layer(vec![f("a"), link("b", EntryKind::Hardlink, "a")]),
            layer(vec![f("b")]),
        ]);
        let a = t.resolve("a", false).unwrap();
        assert_eq!(t.node(a).nlink, 1);
        assert_ne!(t.resolve("b", false).unwrap(), a);
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
        assert_eq!(t.node(t.resolve("x", false).unwrap()).size, 9);
    }

    #[test]
    fn missing_parents_are_implicit_directories() {
        let t = merged(vec![layer(vec![f("a/b/c")])]);
        let b = t.node(t.resolve("a/b", false).unwrap());
        assert_eq!((b.kind, b.mode, b.uid), (EntryKind::Dir, 0o755, 0));
        assert_eq!(t.node(t.root()).nlink, 3);
    }

    #[test]
    fn symlinked_parent_in_a_lower_layer_is_replaced_not_followed() {
        let t = merged(vec![
            layer(vec![d("real"), link("via", EntryKind::Symlink, "/real")]),
            layer(vec![f("via/file")]),
        ]);
        assert_eq!(listing(&t), ["real@0", "via/file@1", "via@1"]);
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
        let passwd = t.resolve("etc/passwd", true).unwrap();
        assert_eq!(t.resolve("abs", true).unwrap(), passwd);
        assert_eq!(t.resolve("up", true).unwrap(), passwd);
        assert_eq!(t.resolve("dir/passwd", true).unwrap(), passwd);
        assert_ne!(t.resolve("abs", false).unwrap(), passwd);
        assert_eq!(t.resolve("/../../etc/passwd", true).unwrap(), passwd);
    }

    #[test]
    fn symlink_loops_are_reported() {
        let t = merged(vec![layer(vec![
            link("a", EntryKind::Symlink, "b"),
            link("b", EntryKind::Symlink, "a"),
        ])]);
        assert_eq!(
            t.resolve("a", true),
            Err(TreeError::SymlinkLoop("a".into()))
        );
        assert!(matches!(
            t.resolve("missing", true),
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
        let saved: Tree = postcard::from_bytes(&postcard::to_stdvec(&t).unwrap()).unwrap();
        for t in [&t, &saved] {
            let n = t.node(t.resolve("alias", false).unwrap());
            assert_eq!((n.size, n.sparse()), (1 << 33, Some(&[seg][..])));
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
}
