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

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

use super::{Entry, EntryKind, LayerIndex, normalize};

mod estargz;
mod zstd_chunked;

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
    let mut b = Builder::new(kind, layer_digest);
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

/// `sha256:<hex>` (or bare hex, as containers/storage documents its digests)
/// to bytes.
fn sha256_of(s: &str) -> Option<[u8; 32]> {
    let h = s.strip_prefix("sha256:").unwrap_or(s);
    let mut out = [0u8; 32];
    hex::decode_to_slice(h, &mut out).ok()?;
    Some(out)
}

/// One TOC entry as both formats write it (the field names are shared;
/// `innerOffset` is eStargz's, `endOffset` and `chunkType` zstd:chunked's).
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    size: i64,
    modtime: Option<String>,
    #[serde(rename = "linkName")]
    link_name: String,
    mode: i64,
    uid: i64,
    gid: i64,
    offset: i64,
    #[serde(rename = "innerOffset")]
    inner_offset: i64,
    #[serde(rename = "endOffset")]
    end_offset: i64,
    #[serde(rename = "devMajor")]
    dev_major: i64,
    #[serde(rename = "devMinor")]
    dev_minor: i64,
    /// Values are base64 in both formats.
    xattrs: Option<BTreeMap<String, String>>,
    digest: String,
    #[serde(rename = "chunkOffset")]
    chunk_offset: i64,
    #[serde(rename = "chunkSize")]
    chunk_size: i64,
    #[serde(rename = "chunkDigest")]
    chunk_digest: String,
}

/// One chunk as the TOC states it, before its compressed length is known.
struct Piece {
    chunk_offset: u64,
    /// `None`: to the end of the file.
    size: Option<u64>,
    coff: u64,
    inner: u64,
    digest: Option<[u8; 32]>,
}

/// Per regular file with content: its pieces and what the format says about it.
struct FileInfo {
    entry: usize,
    first_piece: usize,
    digest: Option<[u8; 32]>,
    /// zstd:chunked's `endOffset`: where the file's last frame ends.
    end_offset: u64,
}

struct Builder {
    kind: TocKind,
    layer: String,
    entries: Vec<Entry>,
    pieces: Vec<Piece>,
    files: Vec<FileInfo>,
    /// Start of every gzip member holding content, hidden files' too (eStargz).
    member_starts: Vec<u64>,
    /// The regular file the next `chunk` entries continue, by normalised name;
    /// `usize::MAX` for a hidden one.
    current: Option<(Vec<u8>, usize)>,
    landmark: Option<usize>,
    no_prefetch: bool,
    seen: usize,
    version: Option<i64>,
    failed: Option<TocError>,
}

impl Builder {
    fn new(kind: TocKind, layer: &str) -> Builder {
        Builder {
            kind,
            layer: layer.to_string(),
            entries: Vec::new(),
            pieces: Vec::new(),
            files: Vec::new(),
            member_starts: Vec::new(),
            current: None,
            landmark: None,
            no_prefetch: false,
            seen: 0,
            version: None,
            failed: None,
        }
    }

    fn corrupt(&self, detail: impl Into<String>) -> TocError {
        TocError::Corrupt {
            layer: self.layer.clone(),
            kind: self.kind,
            detail: detail.into(),
        }
    }

    fn bad(&self, path: &[u8], detail: impl Into<String>) -> TocError {
        TocError::Entry {
            layer: self.layer.clone(),
            kind: self.kind,
            path: crate::names::escaped(path).to_string(),
            detail: detail.into(),
        }
    }

    fn check_digest(&self, want: Option<&str>, data: &[u8]) -> Result<(), TocError> {
        let Some(want) = want else { return Ok(()) };
        let got: [u8; 32] = Sha256::digest(data).into();
        if !want.starts_with("sha256:") || sha256_of(want) != Some(got) {
            return Err(TocError::Digest {
                layer: self.layer.clone(),
                kind: self.kind,
                expected: want.to_string(),
                actual: format!("sha256:{}", hex::encode(got)),
            });
        }
        Ok(())
    }

    fn read_json(&mut self, json: &[u8]) -> Result<(), TocError> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let r = TocSeed { b: self }
            .deserialize(&mut de)
            .and_then(|()| de.end());
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        r.map_err(|e| self.corrupt(format!("invalid JSON: {e}")))?;
        match self.version {
            Some(1) => Ok(()),
            v => Err(self.corrupt(format!("unsupported TOC version {v:?}"))),
        }
    }

    fn push(&mut self, raw: RawEntry) -> Result<(), TocError> {
        self.seen += 1;
        if self.seen > ENTRIES_MAX {
            return Err(TocError::TooManyEntries {
                layer: self.layer.clone(),
                kind: self.kind,
            });
        }
        let path = normalize(raw.name.as_bytes());
        // Go's JSON encoder replaces bytes that are not UTF-8 with U+FFFD, so
        // such a name in the tar reaches the TOC changed: refuse rather than
        // show a name the layer does not have.
        let mangled = |s: &str| s.contains('\u{fffd}');
        if mangled(&raw.name)
            || mangled(&raw.link_name)
            || raw.xattrs.iter().flatten().any(|(k, _)| mangled(k))
        {
            return Err(TocError::NotUtf8 {
                layer: self.layer.clone(),
                kind: self.kind,
                path: crate::names::escaped(&path).to_string(),
            });
        }
        let num = |v: i64, what: &str| {
            u64::try_from(v).map_err(|_| self.bad(&path, format!("negative {what}")))
        };
        let (offset, inner, chunk_offset, chunk_size) = (
            num(raw.offset, "offset")?,
            num(raw.inner_offset, "innerOffset")?,
            num(raw.chunk_offset, "chunkOffset")?,
            num(raw.chunk_size, "chunkSize")?,
        );
        let size = num(raw.size, "size")?;
        let end_offset = num(raw.end_offset, "endOffset")?;
        let chunk_digest = match raw.chunk_digest.as_str() {
            "" => None,
            d => Some(sha256_of(d).ok_or_else(|| self.bad(&path, "malformed chunkDigest"))?),
        };
        if raw.kind == "chunk" {
            let Some((name, file)) = &self.current else {
                return Err(self.bad(&path, "a chunk entry that follows no regular file"));
            };
            if *name != path {
                return Err(self.bad(&path, "a chunk entry named unlike the file before it"));
            }
            let file = *file;
            if self.kind == TocKind::Estargz && offset > 0 && inner == 0 {
                self.member_starts.push(offset);
            }
            if file != usize::MAX {
                self.pieces.push(Piece {
                    chunk_offset,
                    size: (chunk_size > 0).then_some(chunk_size),
                    coff: offset,
                    inner,
                    digest: chunk_digest,
                });
            }
            return Ok(());
        }
        self.current = None;
        let kind = match raw.kind.as_str() {
            "reg" => EntryKind::File,
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::Char,
            "block" => EntryKind::Block,
            "fifo" => EntryKind::Fifo,
            other => return Err(self.bad(&path, format!("unknown entry type {other:?}"))),
        };
        let file = kind == EntryKind::File;
        let hidden = self.kind == TocKind::Estargz && ESTARGZ_HIDDEN.contains(&path.as_slice());
        if self.kind == TocKind::Estargz && file && size > 0 && offset > 0 && inner == 0 {
            self.member_starts.push(offset);
        }
        if hidden {
            if path == b".prefetch.landmark" {
                self.landmark = Some(self.entries.len());
            } else if path == b".no.prefetch.landmark" {
                self.no_prefetch = true;
            }
            if file {
                self.current = Some((path, usize::MAX));
            }
            return Ok(());
        }
        let mtime = match raw.modtime.as_deref() {
            None | Some("") => 0,
            Some(t) => rfc3339_seconds(t)
                .ok_or_else(|| self.bad(&path, format!("malformed modtime {t:?}")))?,
        };
        let mut xattrs = Vec::new();
        for (k, v) in raw.xattrs.unwrap_or_default() {
            use base64::Engine;
            let v = base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .map_err(|_| self.bad(&path, format!("xattr {k:?} is not base64")))?;
            // index_tar skips empty values, as Go's tar reader does.
            if !v.is_empty() {
                xattrs.push((k, v));
            }
        }
        let idx = self.entries.len();
        if file && size > 0 {
            let digest = match raw.digest.as_str() {
                "" => None,
                d => Some(sha256_of(d).ok_or_else(|| self.bad(&path, "malformed digest"))?),
            };
            self.files.push(FileInfo {
                entry: idx,
                first_piece: self.pieces.len(),
                digest,
                end_offset,
            });
            self.pieces.push(Piece {
                chunk_offset,
                size: (chunk_size > 0).then_some(chunk_size),
                coff: offset,
                inner,
                digest: chunk_digest,
            });
            self.current = Some((path.clone(), idx));
        }
        let link = match kind {
            EntryKind::Hardlink => Some(normalize(raw.link_name.as_bytes())),
            EntryKind::Symlink => Some(raw.link_name.into_bytes()),
            _ => None,
        };
        self.entries.push(Entry {
            path,
            kind,
            mode: if kind == EntryKind::Symlink {
                0o777
            } else {
                raw.mode as u32 & 0o7777
            },
            uid: raw.uid as u32,
            gid: raw.gid as u32,
            size: if file { size } else { 0 },
            mtime,
            link,
            rdev: match kind {
                EntryKind::Char | EntryKind::Block => (raw.dev_major as u32, raw.dev_minor as u32),
                _ => (0, 0),
            },
            xattrs,
            offset: 0,
            sparse: None,
        });
        Ok(())
    }

    /// Lays files out in the virtual address space and turns pieces into
    /// chunks. `end` is where content may end: the TOC's offset for eStargz,
    /// the blob's size for zstd:chunked.
    fn finish(mut self, end: u64) -> Result<TocLayer, TocError> {
        let mut cursor = 0u64;
        let mut prefetch_until = self.no_prefetch.then_some(0);
        for (i, e) in self.entries.iter_mut().enumerate() {
            if self.landmark == Some(i) {
                prefetch_until = Some(cursor);
            }
            e.offset = cursor;
            if e.kind == EntryKind::File {
                cursor = cursor
                    .checked_add(e.size)
                    .ok_or_else(|| TocError::Corrupt {
                        layer: self.layer.clone(),
                        kind: self.kind,
                        detail: "file sizes overflow".into(),
                    })?;
            }
        }
        if self.landmark == Some(self.entries.len()) {
            prefetch_until = Some(cursor);
        }
        self.member_starts.sort_unstable();
        self.member_starts.dedup();
        let mut chunks = Vec::with_capacity(self.pieces.len());
        for (n, f) in self.files.iter().enumerate() {
            let pieces_end = self
                .files
                .get(n + 1)
                .map_or(self.pieces.len(), |g| g.first_piece);
            let pieces = &self.pieces[f.first_piece..pieces_end];
            let e = &self.entries[f.entry];
            let bad = |d: String| self.bad(&e.path, d);
            let mut at = 0u64;
            for (k, p) in pieces.iter().enumerate() {
                if p.chunk_offset != at {
                    return Err(bad(format!(
                        "chunk at {} where {at} was expected",
                        p.chunk_offset
                    )));
                }
                let len = match p.size {
                    Some(s) => s,
                    None if k + 1 == pieces.len() => e.size - at.min(e.size),
                    None => return Err(bad("a chunk without a size before the last".into())),
                };
                if len == 0 || len > e.size - at {
                    return Err(bad(format!(
                        "chunk of {len} bytes at {at} exceeds the file"
                    )));
                }
                if len > CHUNK_MAX || p.inner > CHUNK_MAX {
                    return Err(bad(format!(
                        "chunk of {len} bytes (after {} skipped) exceeds {CHUNK_MAX}",
                        p.inner
                    )));
                }
                let next = match self.kind {
                    TocKind::Estargz => {
                        let i = self.member_starts.partition_point(|&s| s <= p.coff);
                        self.member_starts.get(i).copied().unwrap_or(end)
                    }
                    TocKind::ZstdChunked => match pieces.get(k + 1) {
                        Some(q) => q.coff,
                        None => f.end_offset,
                    },
                };
                if p.coff == 0 || next <= p.coff || next > end {
                    return Err(bad(format!(
                        "compressed range {}..{next} lies outside the blob's content (which ends at {end})",
                        p.coff
                    )));
                }
                let digest = match (p.digest, pieces.len(), f.digest) {
                    (Some(d), _, _) => d,
                    (None, 1, Some(d)) => d,
                    _ => return Err(bad("a chunk without a digest".into())),
                };
                chunks.push(TocChunk {
                    start: e.offset + at,
                    len,
                    coff: p.coff,
                    clen: next - p.coff,
                    skip: p.inner,
                    digest,
                    file: f.entry,
                });
                at += len;
            }
            if at != e.size {
                return Err(bad(format!(
                    "chunks cover {at} bytes of a {} byte file",
                    e.size
                )));
            }
        }
        Ok(TocLayer {
            index: LayerIndex {
                entries: self.entries,
            },
            chunks,
            prefetch_until,
            kind: self.kind,
            layer: self.layer,
        })
    }
}

/// Streams the TOC's `entries` into the builder one at a time, so a huge TOC
/// costs its converted entries and not a second, raw copy of them.
struct TocSeed<'a> {
    b: &'a mut Builder,
}

impl<'de> DeserializeSeed<'de> for TocSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TocSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOC object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "version" => self.b.version = Some(map.next_value()?),
                "entries" => map.next_value_seed(EntriesSeed { b: &mut *self.b })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct EntriesSeed<'a> {
    b: &'a mut Builder,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of TOC entries")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(raw) = seq.next_element::<RawEntry>()? {
            if let Err(e) = self.b.push(raw) {
                self.b.failed = Some(e);
                return Err(de::Error::custom("refused entry"));
            }
        }
        Ok(())
    }
}

/// Whole seconds since the epoch (floored) of an RFC 3339 time as Go writes
/// it: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn rfc3339_seconds(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = &b[r];
        t.iter().all(u8::is_ascii_digit).then_some(())?;
        std::str::from_utf8(t).ok()?.parse().ok()
    };
    let (y, mo, d, h, mi, sec) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &b[19..];
    if rest.first() == Some(&b'.') {
        let digits = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        rest = &rest[1 + digits..];
    }
    let zone = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let d = |c: &u8| c.is_ascii_digit().then(|| (c - b'0') as i64);
            let off = (d(h1)? * 10 + d(h2)?) * 3600 + (d(m1)? * 10 + d(m2)?) * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec - zone)
}

#[cfg(test)]
mod tests;
