//! The saved tree's bytes: constants, the header and its checksum, the
//! little-endian field readers, and sealing freshly written bytes. The
//! layout itself is documented in the parent module.

use std::io;

use xxhash_rust::xxh3::Xxh3;

use crate::layer::EntryKind;

pub const MAGIC: &[u8; 8] = b"RIMGTREE";
/// Bumped whenever the layout changes; an older file is rebuilt.
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const RECORD_LEN: usize = 64;
pub const CHILD_LEN: usize = 8;

pub(in crate::overlay) const CHECKSUM_AT: usize = 48;
/// Bytes covered by one entry of the chunk table.
pub const CHUNK: usize = 64 * 1024;

pub(in crate::overlay) const HAS_RDEV: u8 = 1;
pub(in crate::overlay) const HAS_LINK: u8 = 2;
pub(in crate::overlay) const HAS_XATTRS: u8 = 4;
pub(in crate::overlay) const HAS_SPARSE: u8 = 8;

/// One node of the saved tree: the 64-byte record both the writer
/// (`tree::Builder::finish`) and the reader ([`super::Tree::node`]) go
/// through, so an offset is spelled in one place. Adding a field means one
/// edit here plus a [`VERSION`] bump.
///
/// ```text
/// 0 kind  1 extras  2..4 layer  4..8 mode  8..12 uid  12..16 gid
/// 16..20 nlink  20..24 parent  24..28 first child  28..32 child count
/// 32..40 size  40..48 mtime  48..56 data offset in the layer
/// 56..64 extras offset in the data blob (0: none)
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(in crate::overlay) struct NodeRecord {
    pub kind: u8,
    pub extras: u8,
    pub layer: u16,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub parent: u32,
    pub first_child: u32,
    pub child_count: u32,
    pub size: u64,
    pub mtime: i64,
    pub offset: u64,
    pub extras_at: u64,
}

impl NodeRecord {
    /// Reads a record; a short slice (a damaged or truncated file) reads
    /// its missing bytes as zeros rather than panicking.
    pub fn load(r: &[u8]) -> NodeRecord {
        NodeRecord {
            kind: r.first().copied().unwrap_or(0),
            extras: r.get(1).copied().unwrap_or(0),
            layer: u16_at(r, 2),
            mode: u32_at(r, 4),
            uid: u32_at(r, 8),
            gid: u32_at(r, 12),
            nlink: u32_at(r, 16),
            parent: u32_at(r, 20),
            first_child: u32_at(r, 24),
            child_count: u32_at(r, 28),
            size: u64_at(r, 32),
            mtime: u64_at(r, 40) as i64,
            offset: u64_at(r, 48),
            extras_at: u64_at(r, 56),
        }
    }

    pub fn store(&self, r: &mut [u8; RECORD_LEN]) {
        r[0] = self.kind;
        r[1] = self.extras;
        r[2..4].copy_from_slice(&self.layer.to_le_bytes());
        r[4..8].copy_from_slice(&self.mode.to_le_bytes());
        r[8..12].copy_from_slice(&self.uid.to_le_bytes());
        r[12..16].copy_from_slice(&self.gid.to_le_bytes());
        r[16..20].copy_from_slice(&self.nlink.to_le_bytes());
        r[20..24].copy_from_slice(&self.parent.to_le_bytes());
        r[24..28].copy_from_slice(&self.first_child.to_le_bytes());
        r[28..32].copy_from_slice(&self.child_count.to_le_bytes());
        r[32..40].copy_from_slice(&self.size.to_le_bytes());
        r[40..48].copy_from_slice(&self.mtime.to_le_bytes());
        r[48..56].copy_from_slice(&self.offset.to_le_bytes());
        r[56..64].copy_from_slice(&self.extras_at.to_le_bytes());
    }
}

/// One entry of a directory's children table: where its name starts in the
/// names blob, and the node it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::overlay) struct ChildRecord {
    pub name_at: u32,
    pub node: u32,
}

impl ChildRecord {
    pub fn load(e: &[u8]) -> ChildRecord {
        ChildRecord {
            name_at: u32_at(e, 0),
            node: u32_at(e, 4),
        }
    }

    pub fn store(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.name_at.to_le_bytes());
        out.extend_from_slice(&self.node.to_le_bytes());
    }
}

/// The counts a header carries (the magic, version and checksum are
/// written by [`Header::store`] and [`seal`]).
///
/// ```text
/// 0..8 magic  8..12 version  12..16 nodes  16..20 children  20..24 zero
/// 24..32 names length  32..40 data length  40..48 blocks  48..56 checksum
/// 56..64 zero
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(in crate::overlay) struct Header {
    pub nodes: u32,
    pub children: u32,
    pub names_len: u64,
    pub data_len: u64,
    pub blocks: u64,
    pub checksum: u64,
}

impl Header {
    pub fn store(&self, h: &mut [u8]) {
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.nodes.to_le_bytes());
        h[16..20].copy_from_slice(&self.children.to_le_bytes());
        h[24..32].copy_from_slice(&self.names_len.to_le_bytes());
        h[32..40].copy_from_slice(&self.data_len.to_le_bytes());
        h[40..48].copy_from_slice(&self.blocks.to_le_bytes());
        h[CHECKSUM_AT..CHECKSUM_AT + 8].copy_from_slice(&self.checksum.to_le_bytes());
    }

    fn load(h: &[u8]) -> Header {
        Header {
            nodes: u32_at(h, 12),
            children: u32_at(h, 16),
            names_len: u64_at(h, 24),
            data_len: u64_at(h, 32),
            blocks: u64_at(h, 40),
            checksum: u64_at(h, CHECKSUM_AT),
        }
    }
}

/// Why saved tree bytes were not used.
#[derive(Debug, thiserror::Error)]
pub enum SavedTreeError {
    #[error("not a saved rimg tree (no magic number)")]
    Magic,
    #[error("saved by another version of the format ({found}, this rimg reads {VERSION})")]
    Version { found: u32 },
    #[error("{0}")]
    Layout(&'static str),
    #[error("checksum mismatch: the file is damaged")]
    Checksum,
    #[error("checksum mismatch in bytes {start}..{end}: the file is damaged")]
    Chunk { start: usize, end: usize },
    #[error("reading it")]
    Io(#[from] io::Error),
}

pub(in crate::overlay) fn kind_code(k: EntryKind) -> u8 {
    match k {
        EntryKind::File => 0,
        EntryKind::Dir => 1,
        EntryKind::Symlink => 2,
        EntryKind::Hardlink => 3,
        EntryKind::Char => 4,
        EntryKind::Block => 5,
        EntryKind::Fifo => 6,
    }
}

pub(in crate::overlay) fn kind_of(code: u8) -> EntryKind {
    match code {
        1 => EntryKind::Dir,
        2 => EntryKind::Symlink,
        3 => EntryKind::Hardlink,
        4 => EntryKind::Char,
        5 => EntryKind::Block,
        6 => EntryKind::Fifo,
        _ => EntryKind::File,
    }
}

pub(in crate::overlay) fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

pub(in crate::overlay) fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
}

pub(in crate::overlay) fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
}

/// A `u32` length and that many bytes at `*at`, moving `*at` past them.
pub(in crate::overlay) fn sized<'a>(b: &'a [u8], at: &mut usize) -> &'a [u8] {
    let len = u32_at(b, *at) as usize;
    let start = (*at + 4).min(b.len());
    let end = start.saturating_add(len).min(b.len());
    *at = end;
    &b[start..end]
}

pub(in crate::overlay) fn header_checksum(header: &[u8], table: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&header[..CHECKSUM_AT]);
    h.update(&header[CHECKSUM_AT + 8..HEADER_LEN]);
    h.update(table);
    h.digest()
}

/// Seals freshly written tree bytes (header and body): appends the chunk
/// table and fills in the header's checksum.
pub(in crate::overlay) fn seal(bytes: &mut Vec<u8>) {
    let body_end = bytes.len();
    let table: Vec<u64> = bytes[HEADER_LEN..]
        .chunks(CHUNK)
        .map(xxhash_rust::xxh3::xxh3_64)
        .collect();
    for h in table {
        bytes.extend_from_slice(&h.to_le_bytes());
    }
    let sum = header_checksum(&bytes[..HEADER_LEN], &bytes[body_end..]);
    bytes[CHECKSUM_AT..CHECKSUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
}

/// The sections a header describes, checked against the file's length.
pub(in crate::overlay) struct Layout {
    pub(super) nodes: u32,
    pub(super) children: u32,
    pub(super) names_len: usize,
    pub(super) data_len: usize,
    pub(super) blocks: u64,
    pub(super) checksum: u64,
    /// Bytes between the header and the chunk table.
    pub(super) body_len: usize,
    pub(super) chunks: usize,
}

pub(in crate::overlay) fn parse_header(h: &[u8], file_len: u64) -> Result<Layout, SavedTreeError> {
    if h.len() < HEADER_LEN || &h[..8] != MAGIC {
        return Err(if h.len() >= 8 && &h[..8] == MAGIC {
            SavedTreeError::Layout("shorter than its header")
        } else {
            SavedTreeError::Magic
        });
    }
    let version = u32_at(h, 8);
    if version != VERSION {
        return Err(SavedTreeError::Version { found: version });
    }
    let hd = Header::load(h);
    let (nodes, children) = (hd.nodes, hd.children);
    if nodes == 0 {
        return Err(SavedTreeError::Layout("no root node"));
    }
    let body = (nodes as u64 * RECORD_LEN as u64)
        .checked_add(children as u64 * CHILD_LEN as u64)
        .and_then(|n| n.checked_add(hd.names_len))
        .and_then(|n| n.checked_add(hd.data_len))
        .filter(|&n| n <= file_len);
    let Some(body) = body else {
        return Err(SavedTreeError::Layout("truncated"));
    };
    let chunks = body.div_ceil(CHUNK as u64);
    let expected = HEADER_LEN as u64 + body + chunks * 8;
    if expected > file_len {
        return Err(SavedTreeError::Layout("truncated"));
    }
    if expected < file_len {
        return Err(SavedTreeError::Layout(
            "its sections do not add up to its length",
        ));
    }
    Ok(Layout {
        nodes,
        children,
        names_len: hd.names_len as usize,
        data_len: hd.data_len as usize,
        blocks: hd.blocks,
        checksum: hd.checksum,
        body_len: body as usize,
        chunks: chunks as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_node_record_reads_back_what_was_stored(
            kind in 0u8..7, extras in 0u8..16, layer: u16, mode: u32, uid: u32, gid: u32,
            nlink: u32, parent: u32, first_child: u32, child_count: u32, size: u64,
            mtime: i64, offset: u64, extras_at: u64,
        ) {
            let r = NodeRecord {
                kind, extras, layer, mode, uid, gid, nlink, parent, first_child,
                child_count, size, mtime, offset, extras_at,
            };
            let mut bytes = [0u8; RECORD_LEN];
            r.store(&mut bytes);
            prop_assert_eq!(NodeRecord::load(&bytes), r);
        }

        #[test]
        fn a_short_record_reads_without_panicking(len in 0usize..RECORD_LEN) {
            let bytes = [0xffu8; RECORD_LEN];
            let _ = NodeRecord::load(&bytes[..len]);
            let _ = ChildRecord::load(&bytes[..len.min(CHILD_LEN)]);
        }
    }

    #[test]
    fn a_header_reads_back_what_was_stored() {
        let h = Header {
            nodes: 3,
            children: 2,
            names_len: 17,
            data_len: 9,
            blocks: 5,
            checksum: 0xdead_beef,
        };
        let mut bytes = [0u8; HEADER_LEN];
        h.store(&mut bytes);
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(Header::load(&bytes), h);
    }
}
