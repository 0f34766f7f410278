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
    let (nodes, children) = (u32_at(h, 12), u32_at(h, 16));
    if nodes == 0 {
        return Err(SavedTreeError::Layout("no root node"));
    }
    let body = (nodes as u64 * RECORD_LEN as u64)
        .checked_add(children as u64 * CHILD_LEN as u64)
        .and_then(|n| n.checked_add(u64_at(h, 24)))
        .and_then(|n| n.checked_add(u64_at(h, 32)))
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
        names_len: u64_at(h, 24) as usize,
        data_len: u64_at(h, 32) as usize,
        blocks: u64_at(h, 40),
        checksum: u64_at(h, 48),
        body_len: body as usize,
        chunks: chunks as usize,
    })
}
