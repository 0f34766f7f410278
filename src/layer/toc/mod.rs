//! Tables of contents carried inside a layer blob (eStargz and
//! zstd:chunked): where to find one from the layer descriptor, how to verify
//! and parse it into the same [`LayerIndex`] `index_tar` builds from the whole
//! tar, and the chunk map that lets a reader fetch one file's compressed bytes
//! by Range and check them before serving any.
//!
//! Regular files are laid out back to back, in TOC order, in a *virtual*
//! address space: a file's `Entry::offset` is its first byte's address, and
//! [`TocLayer::chunks`] tiles every file's `[offset, offset + size)` with
//! chunks that each say which compressed bytes of the blob decode to them.
//!
//! What the producers write (stargz-snapshotter `estargz/`, containers/storage
//! `pkg/chunked`): every chunk of file content starts a fresh gzip member or
//! zstd frame, so a chunk is decoded from its own start. The tar header of a
//! file sits in the member or frame *before* its content; content is followed
//! in the same member/frame only by tar padding and later headers, which a
//! decoder stops before. eStargz's `innerOffset` (several small files packed in
//! one member, `--estargz-min-chunk-size`) is the only case where decoded
//! bytes come before a chunk's content ([`TocChunk::skip`]).
//!
//! Both TOCs are JSON written by Go, which turns bytes that are not UTF-8
//! into U+FFFD: a TOC naming anything with U+FFFD is refused, so the caller
//! falls back to reading the whole layer and shows the names the tar has.

use std::collections::BTreeMap;
use std::fmt;

use sha2::{Digest, Sha256};

use super::{Entry, EntryKind, LayerIndex, normalize};

mod builder;
mod estargz;
pub mod tarsplit;
mod zstd_chunked;

use builder::Builder;

pub use estargz::estargz_footer;

/// A decompressed TOC larger than this is refused.
pub const TOC_MAX: u64 = 64 << 20;
/// A TOC with more entries (files, directories, chunks) than this is refused.
pub const ENTRIES_MAX: usize = 1 << 20;
/// A chunk decoding to more bytes than this (or needing more than this
/// skipped first) is refused, so one read never buffers more.
pub const CHUNK_MAX: u64 = 64 << 20;
/// The eStargz footer: an empty gzip member whose extra field holds
/// `%016xSTARGZ`, the TOC's offset.
pub const ESTARGZ_FOOTER: u64 = 51;

/// The eStargz annotation pinning the TOC: sha256 of the uncompressed TOC JSON.
pub const ESTARGZ_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// zstd:chunked annotations, current names (containers/storage since 2022-11).
pub const ZSTD_CHUNKED_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
pub const ZSTD_CHUNKED_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
/// The names older writers use (Debian's skopeo 1.9.3 among them).
pub const ZSTD_CHUNKED_POSITION_OLD: &str = "io.containers.zstd-chunked.manifest-position";
pub const ZSTD_CHUNKED_CHECKSUM_OLD: &str = "io.containers.zstd-chunked.manifest-checksum";
/// Where zstd:chunked's tar-split is (`offset:len:uncompressed_len`); its
/// digest is the TOC's `tarSplitDigest`, as containers/storage pins it.
pub const ZSTD_CHUNKED_TARSPLIT_POSITION: &str =
    "io.github.containers.zstd-chunked.tarsplit-position";

/// The eStargz files that are format, not content: never shown.
const ESTARGZ_HIDDEN: [&[u8]; 3] = [
    b"stargz.index.json",
    b".prefetch.landmark",
    b".no.prefetch.landmark",
];

/// Leaves eStargz's own files out of an index made from the whole tar, as
/// the TOC path does: an eStargz layer ends with its TOC entry.
pub fn hide_estargz_files(index: &mut LayerIndex) {
    if index
        .entries
        .last()
        .is_some_and(|e| e.path == b"stargz.index.json")
    {
        index
            .entries
            .retain(|e| !ESTARGZ_HIDDEN.contains(&e.path.as_slice()));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TocKind {
    Estargz,
    ZstdChunked,
}

impl fmt::Display for TocKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TocKind::Estargz => "eStargz",
            TocKind::ZstdChunked => "zstd:chunked",
        })
    }
}

/// Where to fetch the TOC from, decided from the layer descriptor alone when possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TocLocation {
    /// zstd:chunked: the manifest's exact byte range and its pinned checksum
    /// (from annotations). `digest` is the sha256 of the range's bytes (the
    /// *compressed* manifest).
    Range {
        kind: TocKind,
        offset: u64,
        len: u64,
        uncompressed_len: u64,
        digest: String,
        /// The tar-split's compressed range `(offset, len)`, when the
        /// layer says where it is (its digest is in the TOC).
        tar_split: Option<(u64, u64)>,
    },
    /// eStargz: fetch the last [`ESTARGZ_FOOTER`] bytes of the blob, then
    /// [`estargz_footer`] gives the TOC offset. `digest` is the
    /// `containerd.io/snapshot/stargz/toc.digest` annotation if present (the
    /// sha256 of the uncompressed TOC JSON). Without it this is only a guess
    /// for a gzip layer: a footer that does not parse means a plain layer.
    EstargzFooter { digest: Option<String> },
}

/// Where a layer's TOC is, from its descriptor: zstd:chunked by its
/// annotations (new or old names; without a checksum annotation the TOC
/// could not be pinned, so `None`), eStargz by its TOC digest annotation or,
/// for any gzip layer, a footer worth trying.
pub fn locate(media_type: &str, annotations: &BTreeMap<String, String>) -> Option<TocLocation> {
    if let Some(loc) = zstd_chunked::locate(annotations) {
        return Some(loc);
    }
    if let Some(d) = annotations.get(ESTARGZ_TOC_DIGEST) {
        return Some(TocLocation::EstargzFooter {
            digest: Some(d.clone()),
        });
    }
    let mt = media_type.to_ascii_lowercase();
    (mt.ends_with("+gzip") || mt.ends_with(".tar.gzip"))
        .then_some(TocLocation::EstargzFooter { digest: None })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocLayer {
    /// Entries in TOC order, exactly as `crate::layer::index_tar` would
    /// produce them from the layer's tar (same normalisation, kinds, mode
    /// bits, uid/gid, mtime seconds, link targets, rdev, xattrs, whiteout
    /// files kept as entries) — except that eStargz's own files
    /// (stargz.index.json, .prefetch.landmark, .no.prefetch.landmark) are left
    /// out, and `Entry::offset` is a virtual address (see the module doc); for
    /// entries other than regular files it is the address the next file
    /// would get, and means nothing.
    pub index: LayerIndex,
    /// Sorted by `start`, non-overlapping, tiling each file's `[offset, offset+size)`.
    pub chunks: Vec<TocChunk>,
    /// Virtual address up to which files should be prefetched first: where
    /// eStargz's `.prefetch.landmark` sits; `Some(0)` for
    /// `.no.prefetch.landmark`; `None` when there is neither.
    pub prefetch_until: Option<u64>,
    pub kind: TocKind,
    /// The layer's digest, for errors.
    pub layer: String,
    /// zstd:chunked's `tarSplitDigest`: the sha256 of the compressed
    /// tar-split, which pins it.
    pub tar_split_digest: Option<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocChunk {
    /// Virtual address of the chunk's first byte.
    pub start: u64,
    /// Decoded bytes of file content.
    pub len: u64,
    /// Compressed offset in the blob where this chunk's gzip member or zstd frame starts.
    pub coff: u64,
    /// Compressed bytes to fetch: to the next member start (eStargz) or the
    /// frame's end (zstd:chunked).
    pub clen: u64,
    /// Decoded bytes to discard before the chunk's content (eStargz `innerOffset`).
    pub skip: u64,
    /// sha256 of the chunk's content: the TOC's `chunkDigest`, or the file's
    /// `digest` for a file stored as one chunk without one. A file of several
    /// chunks lacking any chunk digest is refused.
    pub digest: [u8; 32],
    /// Index in `index.entries` of the file this chunk belongs to.
    pub file: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TocError {
    #[error("eStargz footer: {0}")]
    Footer(String),
    #[error("layer {layer}: the {kind} TOC is corrupt: {detail}")]
    Corrupt {
        layer: String,
        kind: TocKind,
        detail: String,
    },
    #[error("layer {layer}: the {kind} TOC exceeds {TOC_MAX} bytes decompressed")]
    TooLarge { layer: String, kind: TocKind },
    #[error("layer {layer}: the {kind} TOC has more than {ENTRIES_MAX} entries")]
    TooManyEntries { layer: String, kind: TocKind },
    #[error("layer {layer}: the {kind} TOC has digest {actual}, but the layer pins {expected}")]
    Digest {
        layer: String,
        kind: TocKind,
        expected: String,
        actual: String,
    },
    /// The TOC is honest but cannot say what the tar holds (a name that is
    /// not UTF-8): the layer must be read whole.
    #[error(
        "layer {layer}: {kind} TOC entry {path}: a name with U+FFFD: the TOC cannot carry names that are not UTF-8"
    )]
    NotUtf8 {
        layer: String,
        kind: TocKind,
        path: String,
    },
    #[error("layer {layer}: {kind} TOC entry {path}: {detail}")]
    Entry {
        layer: String,
        kind: TocKind,
        path: String,
        detail: String,
    },
    #[error("layer {layer}: {path}: chunk at byte {offset} of the file: {detail}")]
    Chunk {
        layer: String,
        path: String,
        offset: u64,
        detail: String,
    },
}

/// Parses and verifies a TOC.
///
/// `bytes`: for eStargz, the blob from the TOC's offset (from
/// [`estargz_footer`]) up to, not including, the 51-byte footer; for
/// zstd:chunked, the manifest range of [`TocLocation::Range`].
///
/// `digest`, when given, is checked before anything is parsed. It covers:
/// for eStargz, the uncompressed TOC JSON (the content of the
/// `stargz.index.json` tar entry), as `containerd.io/snapshot/stargz/toc.digest`
/// pins it; for zstd:chunked, the compressed manifest bytes, i.e. `bytes`
/// itself, as `...zstd-chunked.manifest-checksum` pins it.
///
/// `blob_size` bounds every offset: a chunk outside the blob is an error.
pub fn parse(
    kind: TocKind,
    bytes: &[u8],
    digest: Option<&str>,
    blob_size: u64,
    layer_digest: &str,
) -> Result<TocLayer, TocError> {
    parse_at(kind, bytes, digest, blob_size, blob_size, layer_digest)
}

/// As [`parse`], for a zstd:chunked TOC whose compressed bytes start at
/// `toc_offset` in the blob: a file whose entry has no `endOffset` (as
/// stargz-snapshotter's zstd:chunked writer leaves it) ends where the next
/// file's content starts, and the last one where the TOC starts, as
/// containers/storage derives it.
pub fn parse_at(
    kind: TocKind,
    bytes: &[u8],
    digest: Option<&str>,
    blob_size: u64,
    toc_offset: u64,
    layer_digest: &str,
) -> Result<TocLayer, TocError> {
    let mut b = Builder::new(kind, layer_digest);
    b.toc_offset = toc_offset.min(blob_size);
    match kind {
        TocKind::Estargz => {
            let toc_offset = blob_size
                .checked_sub(ESTARGZ_FOOTER)
                .and_then(|v| v.checked_sub(bytes.len() as u64))
                .ok_or_else(|| b.corrupt("the TOC is larger than the blob"))?;
            let json = estargz::toc_json(&b, bytes)?;
            b.check_digest(digest, &json)?;
            b.read_json(&json)?;
            b.finish(toc_offset.min(blob_size))
        }
        TocKind::ZstdChunked => {
            b.check_digest(digest, bytes)?;
            let json = zstd_chunked::toc_json(&b, bytes)?;
            b.read_json(&json)?;
            b.finish(blob_size)
        }
    }
}

/// Decompresses one chunk (`compressed` = exactly `blob[coff, coff+clen)`),
/// verifies its digest, and returns its `len` bytes of content.
pub fn decode_chunk(
    layer: &TocLayer,
    chunk: &TocChunk,
    compressed: &[u8],
) -> Result<Vec<u8>, TocError> {
    use std::io::Read;
    let fail = |detail: String| {
        let e = layer.index.entries.get(chunk.file);
        TocError::Chunk {
            layer: layer.layer.clone(),
            path: e.map_or_else(String::new, |e| crate::names::escaped(&e.path).to_string()),
            offset: e.map_or(chunk.start, |e| chunk.start.saturating_sub(e.offset)),
            detail,
        }
    };
    if compressed.len() as u64 != chunk.clen {
        return Err(fail(format!(
            "got {} compressed bytes, expected {}",
            compressed.len(),
            chunk.clen
        )));
    }
    if chunk.len > CHUNK_MAX || chunk.skip > CHUNK_MAX {
        return Err(fail(format!("chunk larger than {CHUNK_MAX} bytes")));
    }
    let mut reader: Box<dyn Read + '_> = match layer.kind {
        // One member only: what follows is another chunk's.
        TocKind::Estargz => Box::new(flate2::bufread::GzDecoder::new(compressed)),
        TocKind::ZstdChunked => Box::new(
            zstd::stream::read::Decoder::with_buffer(compressed)
                .map_err(|e| fail(format!("zstd: {e}")))?
                .single_frame(),
        ),
    };
    let skipped = std::io::copy(&mut (&mut reader).take(chunk.skip), &mut std::io::sink())
        .map_err(|e| fail(format!("cannot decompress: {e}")))?;
    if skipped < chunk.skip {
        return Err(fail("the compressed stream ends early".into()));
    }
    let mut out = Vec::with_capacity(chunk.len as usize);
    (&mut reader)
        .take(chunk.len)
        .read_to_end(&mut out)
        .map_err(|e| fail(format!("cannot decompress: {e}")))?;
    if (out.len() as u64) < chunk.len {
        return Err(fail("the compressed stream ends early".into()));
    }
    let got: [u8; 32] = Sha256::digest(&out).into();
    if got != chunk.digest {
        return Err(fail(format!(
            "content has digest sha256:{}, the TOC says sha256:{}",
            hex::encode(got),
            hex::encode(chunk.digest)
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
