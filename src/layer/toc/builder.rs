//! Turning a table of contents' JSON into the layer index and chunk map:
//! entries parsed one at a time (never the whole array in memory), checked
//! against the blob's bounds, and normalised as the tar reader would.

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

use super::*;

/// `sha256:<hex>` (or bare hex, as containers/storage documents its digests)
/// to bytes.
pub(super) fn sha256_of(s: &str) -> Option<[u8; 32]> {
    let h = s.strip_prefix("sha256:").unwrap_or(s);
    let mut out = [0u8; 32];
    hex::decode_to_slice(h, &mut out).ok()?;
    Some(out)
}

/// One TOC entry as both formats write it (the field names are shared;
/// `innerOffset` is eStargz's, `endOffset` and `chunkType` zstd:chunked's).
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RawEntry {
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) size: i64,
    pub(super) modtime: Option<String>,
    #[serde(rename = "linkName")]
    pub(super) link_name: String,
    pub(super) mode: i64,
    pub(super) uid: i64,
    pub(super) gid: i64,
    pub(super) offset: i64,
    #[serde(rename = "innerOffset")]
    pub(super) inner_offset: i64,
    #[serde(rename = "endOffset")]
    pub(super) end_offset: i64,
    #[serde(rename = "devMajor")]
    pub(super) dev_major: i64,
    #[serde(rename = "devMinor")]
    pub(super) dev_minor: i64,
    /// Values are base64 in both formats.
    pub(super) xattrs: Option<BTreeMap<String, String>>,
    pub(super) digest: String,
    #[serde(rename = "chunkOffset")]
    pub(super) chunk_offset: i64,
    #[serde(rename = "chunkSize")]
    pub(super) chunk_size: i64,
    #[serde(rename = "chunkDigest")]
    pub(super) chunk_digest: String,
}

/// One chunk as the TOC states it, before its compressed length is known.
pub(super) struct Piece {
    pub(super) chunk_offset: u64,
    /// `None`: to the end of the file.
    pub(super) size: Option<u64>,
    pub(super) coff: u64,
    pub(super) inner: u64,
    pub(super) digest: Option<[u8; 32]>,
}

/// Per regular file with content: its pieces and what the format says about it.
pub(super) struct FileInfo {
    pub(super) entry: usize,
    pub(super) first_piece: usize,
    pub(super) digest: Option<[u8; 32]>,
    /// zstd:chunked's `endOffset`: where the file's last frame ends.
    pub(super) end_offset: u64,
}

pub(super) struct Builder {
    pub(super) kind: TocKind,
    pub(super) layer: String,
    pub(super) entries: Vec<Entry>,
    pub(super) pieces: Vec<Piece>,
    pub(super) files: Vec<FileInfo>,
    /// Start of every gzip member holding content, hidden files' too (eStargz).
    pub(super) member_starts: Vec<u64>,
    /// The regular file the next `chunk` entries continue, by normalised name;
    /// `usize::MAX` for a hidden one.
    pub(super) current: Option<(Vec<u8>, usize)>,
    pub(super) landmark: Option<usize>,
    pub(super) no_prefetch: bool,
    pub(super) seen: usize,
    pub(super) version: Option<i64>,
    pub(super) failed: Option<TocError>,
    /// zstd:chunked's `tarSplitDigest`, as written.
    pub(super) tar_split_digest: Option<String>,
    /// Where the TOC starts: a zstd:chunked file without `endOffset` ends
    /// at the latest there.
    pub(super) toc_offset: u64,
}

impl Builder {
    pub(super) fn new(kind: TocKind, layer: &str) -> Builder {
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
            tar_split_digest: None,
            toc_offset: u64::MAX,
        }
    }

    pub(super) fn corrupt(&self, detail: impl Into<String>) -> TocError {
        TocError::Corrupt {
            layer: self.layer.clone(),
            kind: self.kind,
            detail: detail.into(),
        }
    }

    pub(super) fn bad(&self, path: &[u8], detail: impl Into<String>) -> TocError {
        TocError::Entry {
            layer: self.layer.clone(),
            kind: self.kind,
            path: crate::names::escaped(path).to_string(),
            detail: detail.into(),
        }
    }

    pub(super) fn check_digest(&self, want: Option<&str>, data: &[u8]) -> Result<(), TocError> {
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

    pub(super) fn read_json(&mut self, json: &[u8]) -> Result<(), TocError> {
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

    pub(super) fn push(&mut self, raw: RawEntry) -> Result<(), TocError> {
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
    pub(super) fn finish(mut self, end: u64) -> Result<TocLayer, TocError> {
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
        let mut starts: Vec<u64> = self.pieces.iter().map(|p| p.coff).collect();
        starts.sort_unstable();
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
                        None if f.end_offset != 0 => f.end_offset,
                        // No `endOffset`: up to the next content frame, or
                        // the TOC (as containers/storage derives it, but
                        // by blob order, so files sharing a frame work).
                        None => {
                            let i = starts.partition_point(|&s| s <= p.coff);
                            starts.get(i).copied().unwrap_or(self.toc_offset.min(end))
                        }
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
        let tar_split_digest = match &self.tar_split_digest {
            None => None,
            Some(d) => Some(
                d.strip_prefix("sha256:")
                    .and_then(sha256_of)
                    .ok_or_else(|| self.corrupt(format!("tarSplitDigest {d:?} is not sha256")))?,
            ),
        };
        Ok(TocLayer {
            index: LayerIndex {
                entries: self.entries,
            },
            chunks,
            prefetch_until,
            kind: self.kind,
            layer: self.layer,
            tar_split_digest,
        })
    }
}

/// Streams the TOC's `entries` into the builder one at a time, so a huge TOC
/// costs its converted entries and not a second, raw copy of them.
pub(super) struct TocSeed<'a> {
    pub(super) b: &'a mut Builder,
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
                "tarSplitDigest" => self.b.tar_split_digest = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

pub(super) struct EntriesSeed<'a> {
    pub(super) b: &'a mut Builder,
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
pub(super) fn rfc3339_seconds(s: &str) -> Option<i64> {
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
