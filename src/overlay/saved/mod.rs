//! The merged tree as it is kept: one fixed-layout byte format, read in
//! place. A fresh merge is written into it in memory; the cache saves those
//! bytes, and a warm mount maps the saved file and decodes nothing up front:
//! a lookup touches only the records, children and names it passes through,
//! so the kernel's page cache, not the server's heap, holds the metadata.
//!
//! # Format (version [`VERSION`]), all integers little-endian
//!
//! ```text
//! header, HEADER_LEN = 64 bytes
//!   0  magic      8 bytes  "RIMGTREE"
//!   8  version    u32
//!  12  nodes      u32      node records; node 0 is the root
//!  16  children   u32      entries in the children table
//!  20  reserved   u32      0
//!  24  names_len  u64      bytes of the names blob
//!  32  data_len   u64      bytes of the data blob
//!  40  blocks     u64      sum of every node's size in 4 KiB blocks (statfs)
//!  48  checksum   u64      xxh3-64 of the header (this field left out) and the chunk table
//!  56  reserved   u64      0
//! node records, nodes x 64 bytes
//!   0  kind u8 (File, Dir, Symlink, Hardlink, Char, Block, Fifo = 0..6)
//!   1  extras u8: 1 rdev, 2 link, 4 xattrs, 8 sparse map (what the data blob holds)
//!   2  layer u16     4 mode u32     8 uid u32     12 gid u32     16 nlink u32
//!  20  parent u32   24 first child (index into the children table) u32
//!  28  child count u32              32 size u64   40 mtime i64   48 offset u64
//!  56  extras offset into the data blob u64
//! children table, children x 8 bytes: name offset u32 (into the names blob), node u32;
//!   each directory's children are consecutive and sorted by name bytes
//! names blob: each name a u16 length and its bytes
//! data blob, at a node's extras offset, in this order, each only if flagged:
//!   rdev: major u32, minor u32
//!   link: u32 length, bytes
//!   xattrs: u32 count, then per attribute u32 name length, name (UTF-8), u32 value length, value
//!   sparse: u32 count, then per segment logical u64, stored u64, len u64
//! chunk table, one xxh3-64 per CHUNK (64 KiB) of everything between the
//!   header and the table (the last chunk may be shorter)
//! ```
//!
//! The sections follow each other with no gaps and end at the end of the
//! file. Nothing is believed before its checksum is checked: the header
//! and the chunk table when the file is opened (a few KiB even for a
//! million entries), each chunk the first time a read touches it. So a warm
//! mount's first lookup reads a handful of pages, not the whole file, even
//! when the file is not in the page cache. A chunk that fails its check is
//! never read: the tree reports itself [`Tree::damaged`] (the mount answers
//! EIO for what needed that chunk), removes the file so the next use
//! rebuilds it, and reads the chunk as zeros. [`Tree::open_checked`] checks
//! every chunk at once, for small trees and for commands that read the whole
//! tree anyway.
//! Every read is bounds-checked as well: bad bytes never cause a panic.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::MAX_SYMLINKS;
use super::tree::{NodeId, TreeError};
use crate::layer::{EntryKind, Segment};

mod format;
pub use format::*;

/// Where the bytes of a tree live.
enum Storage {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(v) => v,
            Storage::Mapped(m) => m,
        }
    }
}

/// The merged tree, read in place from its saved format. Node 0 is the
/// root; inode numbers are `id + 1`.
pub struct Tree {
    storage: Storage,
    nodes: u32,
    children_at: usize,
    children: u32,
    names_at: usize,
    names_len: usize,
    data_at: usize,
    data_len: usize,
    blocks: u64,
    /// Where the chunk table starts (the body ends).
    table_at: usize,
    /// One bit per chunk: checked and good.
    checked: Box<[AtomicU64]>,
    damaged: AtomicBool,
    /// The saved file, removed when a chunk fails its check.
    path: Option<PathBuf>,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree")
            .field("nodes", &self.nodes)
            .field("mapped", &matches!(self.storage, Storage::Mapped(_)))
            .finish()
    }
}

impl Tree {
    fn with(storage: Storage, l: Layout, path: Option<PathBuf>) -> Tree {
        let children_at = HEADER_LEN + l.nodes as usize * RECORD_LEN;
        let names_at = children_at + l.children as usize * CHILD_LEN;
        Tree {
            storage,
            nodes: l.nodes,
            children_at,
            children: l.children,
            names_at,
            names_len: l.names_len,
            data_at: names_at + l.names_len,
            data_len: l.data_len,
            blocks: l.blocks,
            table_at: HEADER_LEN + l.body_len,
            checked: (0..l.chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            damaged: AtomicBool::new(false),
            path,
        }
    }

    /// A tree from bytes in memory, checked whole.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Tree, SavedTreeError> {
        let l = parse_header(&bytes, bytes.len() as u64)?;
        let table_at = HEADER_LEN + l.body_len;
        if header_checksum(&bytes[..HEADER_LEN], &bytes[table_at..]) != l.checksum {
            return Err(SavedTreeError::Checksum);
        }
        let t = Tree::with(Storage::Owned(bytes), l, None);
        t.verify_all()?;
        Ok(t)
    }

    /// Bytes [`seal`]ed by this process a moment ago.
    pub(super) fn from_sealed(bytes: Vec<u8>) -> Tree {
        let l = parse_header(&bytes, bytes.len() as u64).expect("a tree this process wrote");
        let t = Tree::with(Storage::Owned(bytes), l, None);
        for w in t.checked.iter() {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        t
    }

    /// Maps a saved tree file, checking its header and chunk table only:
    /// nothing is decoded, and each chunk is checked when first read. A
    /// chunk found damaged later removes the file at `path`, if given.
    pub fn open(file: &File, path: Option<PathBuf>) -> Result<Tree, SavedTreeError> {
        Tree::open_with(file, path, false)
    }

    /// As [`Self::open`], but every chunk is checked now, by reading the
    /// file (normally from the page cache) through a buffer rather than
    /// through the map, so the check does not make the tree resident.
    pub fn open_checked(file: &File, path: Option<PathBuf>) -> Result<Tree, SavedTreeError> {
        Tree::open_with(file, path, true)
    }

    fn open_with(file: &File, path: Option<PathBuf>, whole: bool) -> Result<Tree, SavedTreeError> {
        let mut f = file;
        let len = f.metadata()?.len();
        let mut header = [0u8; HEADER_LEN];
        f.seek(SeekFrom::Start(0))?;
        let got = read_full(&mut f, &mut header)?;
        let l = parse_header(&header[..got], len)?;
        let mut table = vec![0u8; l.chunks * 8];
        f.seek(SeekFrom::Start((HEADER_LEN + l.body_len) as u64))?;
        if read_full(&mut f, &mut table)? != table.len() {
            return Err(SavedTreeError::Layout("truncated"));
        }
        if header_checksum(&header, &table) != l.checksum {
            return Err(SavedTreeError::Checksum);
        }
        if whole {
            f.seek(SeekFrom::Start(HEADER_LEN as u64))?;
            let mut buf = vec![0u8; 16 * CHUNK];
            let mut c = 0;
            let mut left = l.body_len;
            while left > 0 {
                let n = left.min(buf.len());
                if read_full(&mut f, &mut buf[..n])? != n {
                    return Err(SavedTreeError::Layout("truncated"));
                }
                for chunk in buf[..n].chunks(CHUNK) {
                    if xxhash_rust::xxh3::xxh3_64(chunk) != u64_at(&table, c * 8) {
                        let start = HEADER_LEN + c * CHUNK;
                        return Err(SavedTreeError::Chunk {
                            start,
                            end: start + chunk.len(),
                        });
                    }
                    c += 1;
                }
                left -= n;
            }
        }
        // SAFETY: the cache replaces saved trees by renaming a new file over
        // the old one and never writes into one in place, so the mapped
        // bytes do not change under us; every read below is bounds-checked
        // and checksummed all the same.
        let map = unsafe { memmap2::Mmap::map(file)? };
        if map.len() as u64 != len || map[..HEADER_LEN] != header {
            return Err(SavedTreeError::Layout("changed while it was opened"));
        }
        let t = Tree::with(Storage::Mapped(map), l, path);
        if whole {
            for w in t.checked.iter() {
                w.store(u64::MAX, Ordering::Relaxed);
            }
        }
        Ok(t)
    }

    /// The saved form, to write to a file.
    pub fn as_bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Whether the tree is read from a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped(_))
    }

    /// Checks every chunk now; for commands that read the whole tree anyway.
    pub fn verify_all(&self) -> Result<(), SavedTreeError> {
        let body = self.table_at - HEADER_LEN;
        for c in 0..body.div_ceil(CHUNK) {
            if !self.check_chunk(c, false) {
                let start = HEADER_LEN + c * CHUNK;
                return Err(SavedTreeError::Chunk {
                    start,
                    end: (start + CHUNK).min(self.table_at),
                });
            }
        }
        Ok(())
    }

    /// Whether a read met a chunk that failed its check: what was read
    /// since may be wrong, and the file is gone so the next use rebuilds it.
    pub fn damaged(&self) -> bool {
        self.damaged.load(Ordering::Relaxed)
    }

    /// Checks chunk `c` if not yet done; false if it is damaged. A read
    /// that meets damage (`report`) marks the tree damaged, says so, and
    /// removes the file; [`Self::verify_all`]'s caller reports for itself.
    fn check_chunk(&self, c: usize, report: bool) -> bool {
        let (word, bit) = (c / 64, 1u64 << (c % 64));
        let Some(w) = self.checked.get(word) else {
            return false;
        };
        if w.load(Ordering::Acquire) & bit != 0 {
            return true;
        }
        let b = self.storage.bytes();
        let start = HEADER_LEN + c * CHUNK;
        let end = (start + CHUNK).min(self.table_at);
        let good = b.get(start..end).is_some_and(|chunk| {
            xxhash_rust::xxh3::xxh3_64(chunk) == u64_at(b, self.table_at + c * 8)
        });
        if good {
            w.fetch_or(bit, Ordering::AcqRel);
        } else if report && !self.damaged.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "saved tree {}: checksum mismatch in bytes {start}..{end}; \
                 answering EIO for what needs them, and rebuilding it on the next use",
                self.path
                    .as_deref()
                    .map_or("(in memory)".into(), |p| p.display().to_string())
            );
            if let Some(p) = &self.path {
                let _ = std::fs::remove_file(p);
            }
        }
        good
    }

    /// The bytes at `at..at + len` of the body once their chunks are
    /// checked; zeros (as many) where they are out of range or damaged.
    fn checked_bytes(&self, at: usize, len: usize) -> &[u8] {
        const ZEROS: [u8; RECORD_LEN] = [0u8; RECORD_LEN];
        let end = at.saturating_add(len);
        if at < HEADER_LEN || end > self.table_at {
            return &ZEROS[..len.min(RECORD_LEN)];
        }
        let first = (at - HEADER_LEN) / CHUNK;
        let last = (end.max(at + 1) - 1 - HEADER_LEN) / CHUNK;
        if (first..=last).all(|c| self.check_chunk(c, true)) {
            &self.storage.bytes()[at..end]
        } else {
            &ZEROS[..len.min(RECORD_LEN)]
        }
    }

    pub fn root(&self) -> NodeId {
        0
    }

    pub fn len(&self) -> usize {
        self.nodes as usize
    }

    pub fn is_empty(&self) -> bool {
        self.nodes == 0
    }

    /// Every node's size in 4 KiB blocks, summed when the tree was made.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn record(&self, id: NodeId) -> &[u8] {
        if id >= self.nodes {
            return &[0u8; RECORD_LEN];
        }
        self.checked_bytes(HEADER_LEN + id as usize * RECORD_LEN, RECORD_LEN)
    }

    /// The data blob, checked whole on first use (it holds only links,
    /// xattrs, device numbers and sparse maps, so it is small).
    fn data(&self) -> &[u8] {
        self.checked_bytes(self.data_at, self.data_len)
    }

    /// A node's attributes and where its data lives. An id past the end
    /// reads as an empty file.
    pub fn node(&self, id: NodeId) -> NodeRef<'_> {
        let r = NodeRecord::load(self.record(id));
        let extras = r.extras;
        let mut n = NodeRef {
            kind: kind_of(r.kind),
            mode: r.mode,
            uid: r.uid,
            gid: r.gid,
            size: r.size,
            mtime: r.mtime,
            link: None,
            rdev: (0, 0),
            layer: r.layer,
            offset: r.offset,
            nlink: r.nlink,
            xattrs: &[],
            sparse: &[],
        };
        if extras == 0 {
            return n;
        }
        let data = self.data();
        let mut at = (r.extras_at as usize).min(data.len());
        if extras & HAS_RDEV != 0 {
            n.rdev = (u32_at(data, at), u32_at(data, at + 4));
            at += 8;
        }
        if extras & HAS_LINK != 0 {
            n.link = Some(sized(data, &mut at));
        }
        if extras & HAS_XATTRS != 0 {
            let start = at.min(data.len());
            let count = u32_at(data, at);
            at += 4;
            // A damaged count must not spin: each attribute takes bytes.
            for _ in 0..count {
                if at >= data.len() {
                    break;
                }
                sized(data, &mut at);
                sized(data, &mut at);
            }
            n.xattrs = &data[start..at.min(data.len())];
        }
        if extras & HAS_SPARSE != 0 {
            let start = at.min(data.len());
            let count = u32_at(data, at) as usize;
            let end = start
                .saturating_add(4)
                .saturating_add(count.saturating_mul(24))
                .min(data.len());
            n.sparse = &data[start..end];
        }
        n
    }

    /// The directory holding `id` (the root is its own parent). For a file with
    /// several names, the directory of the first.
    pub fn parent(&self, id: NodeId) -> NodeId {
        NodeRecord::load(self.record(id)).parent
    }

    fn name_at(&self, at: u32) -> &[u8] {
        let at = at as usize;
        if at.saturating_add(2) > self.names_len {
            return &[];
        }
        let len = u16_at(self.checked_bytes(self.names_at + at, 2), 0) as usize;
        let len = len.min(self.names_len - at - 2);
        self.checked_bytes(self.names_at + at + 2, len)
    }

    /// `(first, count)` of a directory's entries in the children table.
    fn child_range(&self, id: NodeId) -> (u32, u32) {
        let r = NodeRecord::load(self.record(id));
        let (first, count) = (r.first_child, r.child_count);
        let first = first.min(self.children);
        (first, count.min(self.children - first))
    }

    fn child_entry(&self, index: u32) -> (&[u8], NodeId) {
        let e = self.checked_bytes(self.children_at + index as usize * CHILD_LEN, CHILD_LEN);
        let c = ChildRecord::load(e);
        (self.name_at(c.name_at), c.node)
    }

    /// Binary search in the directory's sorted children.
    pub fn lookup(&self, parent: NodeId, name: &[u8]) -> Option<NodeId> {
        if parent >= self.nodes {
            return None;
        }
        let (first, count) = self.child_range(parent);
        let (mut lo, mut hi) = (first, first + count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (n, c) = self.child_entry(mid);
            match n.cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(c),
            }
        }
        None
    }

    /// Children in name order; `nth` (and so `skip`) jumps straight to a
    /// position, which is how a listing resumes at an offset.
    pub fn children(&self, id: NodeId) -> Children<'_> {
        let (first, count) = self.child_range(id);
        Children {
            tree: self,
            next: first,
            end: first + count,
        }
    }

    /// Resolves `path` from the image root. Symlinks in the middle are always
    /// followed, the last one only when `follow_last`; targets resolve inside the
    /// image (absolute ones against its root, `..` stops at the root).
    pub fn resolve(&self, path: &[u8], follow_last: bool) -> Result<NodeId, TreeError> {
        let mut pending: Vec<Vec<u8>> = path
            .split(|&b| b == b'/')
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        let mut cur = self.root();
        let mut walked: Vec<NodeId> = Vec::new();
        let mut followed = 0;
        while let Some(comp) = pending.pop() {
            match comp.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    cur = walked.pop().unwrap_or(self.root());
                    continue;
                }
                _ => {}
            }
            if self.node(cur).kind != EntryKind::Dir {
                return Err(TreeError::NotADirectory(path.to_vec()));
            }
            let next = self
                .lookup(cur, &comp)
                .ok_or_else(|| TreeError::NotFound(path.to_vec()))?;
            let is_last = pending.iter().all(|c| c.is_empty() || c == b".");
            let n = self.node(next);
            if n.kind == EntryKind::Symlink && (!is_last || follow_last) {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(TreeError::SymlinkLoop(path.to_vec()));
                }
                let target = n.link.unwrap_or_default();
                if target.starts_with(b"/") {
                    cur = self.root();
                    walked.clear();
                }
                pending.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                continue;
            }
            walked.push(cur);
            cur = next;
        }
        Ok(cur)
    }
}

fn read_full(f: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A directory's children, in name order.
pub struct Children<'a> {
    tree: &'a Tree,
    next: u32,
    end: u32,
}

impl<'a> Iterator for Children<'a> {
    type Item = (&'a [u8], NodeId);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        self.next += 1;
        Some(self.tree.child_entry(self.next - 1))
    }

    fn nth(&mut self, n: usize) -> Option<Self::Item> {
        self.next = (self.next as u64 + n as u64).min(self.end as u64) as u32;
        self.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = (self.end - self.next) as usize;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Children<'_> {}

impl DoubleEndedIterator for Children<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        self.end -= 1;
        Some(self.tree.child_entry(self.end))
    }
}

/// One node of a [`Tree`], its fixed fields copied out, its variable ones
/// borrowed from the tree's bytes.
#[derive(Debug, Clone, Copy)]
pub struct NodeRef<'a> {
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub link: Option<&'a [u8]>,
    pub rdev: (u32, u32),
    /// Index (bottom = 0) of the layer this entry's attributes and data come from.
    pub layer: u16,
    /// Where the file's bytes start in that layer's uncompressed tar.
    pub offset: u64,
    pub nlink: u32,
    /// Encoded xattrs: a count, then sized names and values.
    xattrs: &'a [u8],
    /// Encoded sparse map: a count, then segments.
    sparse: &'a [u8],
}

impl<'a> NodeRef<'a> {
    /// The entry's extended attributes as the image stores them (a name
    /// that is not UTF-8 could only come from a damaged file; it is skipped).
    pub fn xattrs(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + use<'a> {
        let b = self.xattrs;
        let count = u32_at(b, 0);
        let mut at = 4;
        // Bounded by the bytes as well as the count, which may be damaged.
        (0..count)
            .map_while(move |_| (at < b.len()).then_some(()))
            .filter_map(move |()| {
                let k = sized(b, &mut at);
                let v = sized(b, &mut at);
                Some((std::str::from_utf8(k).ok()?, v))
            })
    }

    /// A sparse file's data segments; `None` for a file stored whole.
    pub fn sparse(&self) -> Option<Cow<'static, [Segment]>> {
        if self.sparse.is_empty() {
            return None;
        }
        let count = u32_at(self.sparse, 0) as usize;
        // A damaged data blob (read as zeros) can leave fewer than 4 bytes.
        let segs: Vec<Segment> = self
            .sparse
            .get(4..)
            .unwrap_or_default()
            .chunks_exact(24)
            .take(count)
            .map(|s| Segment {
                logical: u64_at(s, 0),
                stored: u64_at(s, 8),
                len: u64_at(s, 16),
            })
            .collect();
        Some(Cow::Owned(segs))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;

    use super::super::differential::{Op, layer, op_strategy};
    use super::super::tree::{Applier, Node, merge};
    use super::*;
    use crate::layer::{Entry, LayerIndex};
    use crate::names;

    /// Gives the generated entries every kind of attribute the format keeps:
    /// owners, negative times, devices, xattrs, sparse maps.
    fn decorate(mut l: LayerIndex) -> LayerIndex {
        for e in &mut l.entries {
            let at = e.offset;
            e.uid = (at * 7) as u32;
            e.gid = (at * 11) as u32;
            e.mode = 0o600 | (at as u32 & 0o7077);
            e.mtime = if at % 2 == 0 { at as i64 } else { -(at as i64) };
            if e.kind == EntryKind::File {
                e.size = at * 4099;
                if at % 5 == 0 {
                    e.kind = EntryKind::Char;
                    e.rdev = (at as u32, 3);
                }
                if at % 4 == 1 {
                    e.sparse = Some(Box::new([Segment {
                        logical: at,
                        stored: 512,
                        len: 7,
                    }]));
                }
            }
            if at % 3 == 0 {
                e.xattrs = vec![
                    ("user.a".into(), at.to_le_bytes().to_vec()),
                    ("security.capability".into(), vec![]),
                ];
            }
        }
        l
    }

    fn stack_of(ops: &[Vec<Op>]) -> Vec<LayerIndex> {
        ops.iter()
            .enumerate()
            .map(|(n, ops)| decorate(layer(ops, n as u64)))
            .collect()
    }

    fn same_node(path: &[u8], a: &Node, b: NodeRef<'_>) -> Result<(), TestCaseError> {
        let a_x: Vec<(&str, &[u8])> = a.xattrs().collect();
        let b_x: Vec<(&str, &[u8])> = b.xattrs().collect();
        prop_assert_eq!(
            (a.kind, a.mode, a.uid, a.gid, a.size, a.mtime),
            (b.kind, b.mode, b.uid, b.gid, b.size, b.mtime),
            "{}",
            names::escaped(path)
        );
        prop_assert_eq!((a.layer, a.offset, a.rdev), (b.layer, b.offset, b.rdev));
        prop_assert_eq!(a.link.as_deref(), b.link);
        prop_assert_eq!(a_x, b_x);
        let b_sparse = b.sparse();
        prop_assert_eq!(a.sparse(), b_sparse.as_deref());
        Ok(())
    }

    /// The tree's bytes, read back from memory and from a mapped file, say
    /// what the layers applied in memory say, path by path.
    fn round_trip(ops: &[Vec<Op>]) -> Result<(), TestCaseError> {
        let stack = stack_of(ops);
        let refs: Vec<&LayerIndex> = stack.iter().collect();
        let mut ap = Applier::new();
        let applied = refs.iter().try_for_each(|l| ap.apply(l).map(drop));
        let Ok(built) = merge(&refs) else {
            prop_assert!(applied.is_err());
            return Ok(());
        };
        let from_memory = Tree::from_bytes(built.as_bytes().to_vec()).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(built.as_bytes()).unwrap();
        let mapped = Tree::open(&file, None).unwrap();
        let checked = Tree::open_checked(&file, None).unwrap();
        prop_assert!(mapped.is_mapped());
        let paths = ap.below(0, b"");
        for t in [&built, &from_memory, &mapped, &checked] {
            prop_assert_eq!(t.len(), {
                let reachable = ap.reachable();
                reachable.iter().filter(|r| **r).count()
            });
            let mut entries = 0;
            for (path, id) in &paths {
                let (dir, name) = names::split(path);
                let parent = ap.get(dir).unwrap();
                let mut cur = t.root();
                for c in names::components(dir) {
                    cur = t.lookup(cur, c).unwrap();
                }
                let got = t.lookup(cur, name).unwrap();
                same_node(path, ap.node(*id), t.node(got))?;
                prop_assert_eq!(ap.lookup(parent, name), Some(*id));
                if t.node(got).kind == EntryKind::Dir {
                    prop_assert_eq!(t.parent(got), cur);
                }
                entries += 1;
            }
            // Every name is found, and no other: children are sorted and whole.
            let mut listed = 0;
            let mut stack = vec![t.root()];
            while let Some(d) = stack.pop() {
                let names: Vec<&[u8]> = t.children(d).map(|(n, _)| n).collect();
                prop_assert!(names.windows(2).all(|w| w[0] < w[1]));
                for (i, (n, c)) in t.children(d).enumerate() {
                    prop_assert_eq!(t.children(d).nth(i), Some((n, c)));
                    if t.node(c).kind == EntryKind::Dir {
                        stack.push(c);
                    }
                    listed += 1;
                }
            }
            prop_assert_eq!(listed, entries);
            prop_assert_eq!(t.blocks(), built.blocks());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn saved_bytes_read_in_place_equal_the_tree_built_in_memory(
            stack in proptest::collection::vec(proptest::collection::vec(op_strategy(), 0..10), 1..4)
        ) {
            round_trip(&stack)?;
        }

        #[test]
        fn any_flipped_byte_is_rejected(at in 0usize..4096, bit in 0u8..8) {
            let bytes = sample().as_bytes().to_vec();
            let mut bad = bytes.clone();
            let at = at % bad.len();
            bad[at] ^= 1 << bit;
            prop_assert!(Tree::from_bytes(bad.clone()).is_err());
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&bad).unwrap();
            // Mapped: refused at open (header, chunk table), or damaged at
            // the first read of the chunk (here, the only one).
            prop_assert!(Tree::open_checked(&file, None).is_err());
            if let Ok(t) = Tree::open(&file, None) {
                prop_assert!(t.verify_all().is_err());
                let _ = t.resolve(b"bin/sh", true);
                prop_assert!(t.damaged());
            }
        }

        #[test]
        fn any_truncation_is_rejected(keep in 0usize..4096) {
            let bytes = sample().as_bytes().to_vec();
            let keep = keep % bytes.len();
            prop_assert!(Tree::from_bytes(bytes[..keep].to_vec()).is_err());
        }
    }

    fn sample() -> Tree {
        let mut dev = Entry::new(b"dev/null", EntryKind::Char);
        dev.rdev = (1, 3);
        let mut link = Entry::new(b"bin/sh", EntryKind::Symlink);
        link.link = Some(b"busybox".to_vec());
        let mut f = Entry::new(b"bin/busybox", EntryKind::File);
        f.xattrs = vec![("security.capability".into(), vec![1, 2, 3])];
        f.size = 12345;
        merge(&[&LayerIndex {
            entries: vec![dev, link, f],
        }])
        .unwrap()
    }

    #[test]
    fn a_sample_tree_reads_back_its_attributes() {
        let t = sample();
        let n = t.node(t.resolve(b"dev/null", false).unwrap());
        assert_eq!((n.kind, n.rdev), (EntryKind::Char, (1, 3)));
        let sh = t.resolve(b"bin/sh", true).unwrap();
        assert_eq!(sh, t.resolve(b"bin/busybox", false).unwrap());
        let x: Vec<_> = t.node(sh).xattrs().collect();
        assert_eq!(x, [("security.capability", &[1u8, 2, 3][..])]);
        assert_eq!(
            t.node(t.resolve(b"bin/sh", false).unwrap()).link,
            Some(&b"busybox"[..])
        );
        assert_eq!(t.blocks(), 4);
    }

    #[test]
    fn another_version_or_another_format_is_rejected() {
        let mut bytes = sample().as_bytes().to_vec();
        bytes[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        seal(&mut bytes);
        assert!(matches!(
            Tree::from_bytes(bytes),
            Err(SavedTreeError::Version { found }) if found == VERSION + 1
        ));
        // What rimg saved before this format: a postcard-encoded tree.
        let old = postcard::to_stdvec(&(4u32, vec![1u8, 2, 3])).unwrap();
        assert!(matches!(Tree::from_bytes(old), Err(SavedTreeError::Magic)));
        assert!(matches!(
            Tree::from_bytes(Vec::new()),
            Err(SavedTreeError::Magic)
        ));
    }

    #[test]
    fn a_damaged_file_is_rejected_by_its_checksum() {
        let mut bytes = sample().as_bytes().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        // The last bytes are the chunk table, checked at open.
        assert!(matches!(
            Tree::open(&file, None),
            Err(SavedTreeError::Checksum)
        ));
    }

    /// A tree of several chunks with one byte flipped in the names of its
    /// last directory; the file of it, and the tree mapped from it.
    fn damaged_in_its_last_chunk() -> (tempfile::TempPath, Tree) {
        let entries = (0..100)
            .flat_map(|d| (0..150).map(move |f| format!("d{d:02}/f{f:03}")))
            .map(|p| Entry::new(p.as_bytes(), EntryKind::File))
            .collect();
        let t = merge(&[&LayerIndex { entries }]).unwrap();
        let mut bytes = t.as_bytes().to_vec();
        assert!(bytes.len() > 16 * CHUNK);
        // Names are the body's last section: "f149" of the last directory,
        // a chunk away from the first directories' names.
        let at = bytes.windows(4).rposition(|w| w == b"f149").unwrap();
        bytes[at + 3] = b'8';
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&bytes).unwrap();
        let path = file.into_temp_path();
        let t = Tree::open(&File::open(&path).unwrap(), Some(path.to_path_buf())).unwrap();
        (path, t)
    }

    #[test]
    fn a_mapped_tree_checks_only_the_chunks_it_reads() {
        let (path, t) = damaged_in_its_last_chunk();
        // The first directory's records, children and names are sound.
        let f = t.resolve(b"d00/f050", false).unwrap();
        assert_eq!(t.node(f).kind, EntryKind::File);
        assert!(!t.damaged());
        assert!(path.exists());
        // Reading the damaged chunk is refused, and the file goes, so the
        // next use rebuilds it.
        let d = t.resolve(b"d99", false).unwrap();
        let names: Vec<Vec<u8>> = t.children(d).map(|(n, _)| n.to_vec()).collect();
        assert!(t.damaged());
        assert!(
            !names.iter().any(|n| n == b"f148" || n == b"f149"),
            "no damaged name is read"
        );
        assert!(!path.exists());
        assert!(matches!(t.verify_all(), Err(SavedTreeError::Chunk { .. })));
        let (path, _) = damaged_in_its_last_chunk();
        let whole = Tree::open_checked(&File::open(&path).unwrap(), None);
        assert!(matches!(whole, Err(SavedTreeError::Chunk { .. })));
    }

    #[test]
    fn listing_resumes_at_an_offset_without_walking_what_came_before() {
        let entries = (0..1000)
            .map(|i| Entry::new(format!("d/f{i:04}").as_bytes(), EntryKind::File))
            .collect();
        let t = merge(&[&LayerIndex { entries }]).unwrap();
        let d = t.resolve(b"d", false).unwrap();
        assert_eq!(t.children(d).len(), 1000);
        let (name, id) = t.children(d).nth(777).unwrap();
        assert_eq!(name, b"f0777");
        assert_eq!(t.lookup(d, b"f0777"), Some(id));
        assert_eq!(t.children(d).skip(998).count(), 2);
        assert_eq!(t.children(d).nth(5000), None);
        assert_eq!(t.lookup(d, b"f1000"), None);
    }

    /// A tree with every kind of extra (device, link, xattrs, sparse map).
    fn fuzz_sample() -> Vec<u8> {
        let mut dev = Entry::new(b"dev/null", EntryKind::Char);
        dev.rdev = (1, 3);
        let mut link = Entry::new(b"bin/sh", EntryKind::Symlink);
        link.link = Some(b"busybox".to_vec());
        let mut f = Entry::new(b"bin/busybox", EntryKind::File);
        f.xattrs = vec![("security.capability".into(), vec![1, 2, 3])];
        f.size = 12345;
        let mut sparse = Entry::new(b"var/sparse", EntryKind::File);
        sparse.size = 1 << 20;
        sparse.sparse = Some(Box::new([Segment {
            logical: 4096,
            stored: 0,
            len: 512,
        }]));
        let mut entries = vec![dev, link, f, sparse];
        entries
            .extend((0..40).map(|i| Entry::new(format!("etc/f{i}").as_bytes(), EntryKind::File)));
        merge(&[&LayerIndex { entries }])
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    /// Everything a mount can ask of a tree, bounded so a damaged count
    /// cannot make it run for long.
    fn read_everything(t: &Tree) {
        for id in 0..(t.len() as NodeId).saturating_add(2).min(10_000) {
            let n = t.node(id);
            let _ = (n.xattrs().take(100).count(), n.sparse(), t.parent(id));
            for (name, c) in t.children(id).take(1000) {
                let _ = (t.lookup(id, name), t.node(c).link);
            }
            let _ = t.children(id).nth(3);
            let _ = t.children(id).next_back();
        }
        for p in [&b"bin/sh"[..], b"var/sparse", b"a/../etc/f1", b"dev/null"] {
            let _ = t.resolve(p, true);
        }
    }

    /// Reads `bytes` as a saved tree every way rimg does: from memory, mapped
    /// (chunks checked as read) and checked whole. True if any accepted it.
    fn read_tree_bytes(bytes: &[u8]) -> bool {
        let mut accepted = false;
        if let Ok(t) = Tree::from_bytes(bytes.to_vec()) {
            read_everything(&t);
            accepted = true;
        }
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        if let Ok(t) = Tree::open(&file, None) {
            read_everything(&t);
            accepted |= !t.damaged();
        }
        if let Ok(t) = Tree::open_checked(&file, None) {
            read_everything(&t);
            accepted = true;
        }
        accepted
    }

    /// `sound` damaged, then sealed again: checksums that pass over bytes
    /// that make no sense, so every bounds check is reached.
    fn resealed(sound: &[u8], d: &crate::fuzzing::Damage) -> Vec<u8> {
        let body = parse_header(sound, sound.len() as u64).unwrap().body_len;
        let mut b = d.apply(&sound[..HEADER_LEN + body]);
        if b.len() < HEADER_LEN {
            return b;
        }
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        seal(&mut b);
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn damaged_tree_bytes_are_refused_or_read_without_a_panic(d in crate::fuzzing::damage()) {
            let sound = fuzz_sample();
            let bad = d.apply(&sound);
            let accepted = read_tree_bytes(&bad);
            prop_assert!(!accepted || bad == sound, "damage accepted: {d:?}");
        }

        #[test]
        fn damaged_tree_bytes_with_sound_checksums_are_read_without_a_panic(
            d in crate::fuzzing::damage()
        ) {
            read_tree_bytes(&resealed(&fuzz_sample(), &d));
        }
    }

    #[test]
    fn a_damaged_chunk_under_a_sparse_map_reads_as_no_map_not_a_panic() {
        // Records and names in the first chunk, the data blob reaching into
        // the second, damaged there. The link's
        // 58-byte target puts the sparse map at byte 62 of the data blob; a
        // damaged data chunk reads as 64 zeros, leaving the map 2 bytes.
        let mut link = Entry::new(b"a/link", EntryKind::Symlink);
        link.link = Some(vec![b't'; 58]);
        let mut sparse = Entry::new(b"a/sparse", EntryKind::File);
        sparse.size = 1 << 20;
        sparse.sparse = Some(Box::new([Segment {
            logical: 4096,
            stored: 0,
            len: 512,
        }]));
        let mut entries = vec![link, sparse];
        // Long link targets after them stretch the data blob into the next chunk.
        entries.extend((0..400).map(|i| {
            let mut e = Entry::new(format!("b/l{i:03}").as_bytes(), EntryKind::Symlink);
            e.link = Some(vec![b'u'; 200]);
            e
        }));
        let mut bytes = merge(&[&LayerIndex { entries }])
            .unwrap()
            .as_bytes()
            .to_vec();
        let l = parse_header(&bytes, bytes.len() as u64).unwrap();
        assert!(l.body_len > CHUNK);
        let data_end = HEADER_LEN + l.body_len;
        bytes[data_end - 1] ^= 0xff;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        let t = Tree::open(&file, None).unwrap();
        let id = t
            .lookup(t.lookup(t.root(), b"a").unwrap(), b"sparse")
            .unwrap();
        assert_eq!(t.node(id).sparse().as_deref().unwrap_or_default(), []);
        assert!(t.damaged());
    }

    #[test]
    fn the_saved_tree_corpus_is_refused_or_read_without_a_panic() {
        let sound = fuzz_sample();
        let resealed = resealed(
            &sound,
            &crate::fuzzing::Damage::Overwrite(200, vec![0xff; 40]),
        );
        for (name, bytes) in crate::fuzzing::corpus(
            "tree",
            &[("sound", sound.clone()), ("resealed-garbage", resealed)],
        ) {
            let accepted = read_tree_bytes(&bytes);
            assert!(
                !accepted || bytes == sound || name.starts_with("resealed"),
                "{name} accepted"
            );
        }
    }
}
