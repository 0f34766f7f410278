//! The indexer: a whole tar stream read once, extension headers and sparse
//! maps applied, each entry recorded with where its bytes are.

use std::io::{self, Read};

use super::*;

/// The first way an index that claims to describe a layer (a published
/// index, a table of contents) differs from the index of the layer's own
/// tar stream: the entry, the field and both values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Position in the entry list.
    pub entry: usize,
    pub path: String,
    /// What differs: `path`, `kind`, `mode`, ..., or `entry` when one list
    /// ends first.
    pub field: &'static str,
    /// As the claiming index has it (empty when it has no such entry).
    pub claimed: String,
    /// As the tar stream has it (empty when it has no such entry).
    pub real: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.field {
            "entry" if self.real.is_empty() => write!(
                f,
                "lists {} (entry {}), its tar stream does not",
                self.path, self.entry
            ),
            "entry" => write!(
                f,
                "does not list {} (entry {}), its tar stream has it",
                self.path, self.entry
            ),
            "path" => write!(
                f,
                "lists {} as entry {}, its tar stream has {} there",
                self.claimed, self.entry, self.real
            ),
            field => write!(
                f,
                "lists {} {field} {}, its tar stream has {}",
                self.path, self.claimed, self.real
            ),
        }
    }
}

/// Compares `claimed` with `real` (the index of the tar stream itself),
/// entry by entry in stream order (order decides which of two duplicates
/// wins and what a whiteout removes); `None` when they agree. Offsets are
/// compared only when `offsets` (both lists address the same tar).
pub fn first_difference(
    claimed: &LayerIndex,
    real: &LayerIndex,
    offsets: bool,
) -> Option<Difference> {
    let name = |p: &[u8]| crate::names::escaped(p).to_string();
    let (a, b) = (&claimed.entries, &real.entries);
    for k in 0..a.len().max(b.len()) {
        let (x, y) = match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) => (x, y),
            (Some(x), None) => {
                return Some(Difference {
                    entry: k,
                    path: name(&x.path),
                    field: "entry",
                    claimed: name(&x.path),
                    real: String::new(),
                });
            }
            (None, Some(y)) => {
                return Some(Difference {
                    entry: k,
                    path: name(&y.path),
                    field: "entry",
                    claimed: String::new(),
                    real: name(&y.path),
                });
            }
            (None, None) => break,
        };
        let diff = |field: &'static str, c: String, r: String| {
            Some(Difference {
                entry: k,
                path: name(&x.path),
                field,
                claimed: c,
                real: r,
            })
        };
        let link = |l: &Option<Vec<u8>>| l.as_deref().map_or("none".into(), name);
        let xattrs = |e: &Entry| {
            e.xattrs
                .iter()
                .map(|(k, v)| format!("{k}={}", name(v)))
                .collect::<Vec<_>>()
                .join(",")
        };
        let found = if x.path != y.path {
            diff("path", name(&x.path), name(&y.path))
        } else if x.kind != y.kind {
            diff("type", format!("{:?}", x.kind), format!("{:?}", y.kind))
        } else if x.mode != y.mode {
            diff("mode", format!("{:04o}", x.mode), format!("{:04o}", y.mode))
        } else if (x.uid, x.gid) != (y.uid, y.gid) {
            diff(
                "owner",
                format!("{}:{}", x.uid, x.gid),
                format!("{}:{}", y.uid, y.gid),
            )
        } else if x.size != y.size {
            diff("size", x.size.to_string(), y.size.to_string())
        } else if x.link != y.link {
            diff("link", link(&x.link), link(&y.link))
        } else if x.xattrs != y.xattrs {
            diff("xattrs", xattrs(x), xattrs(y))
        } else if x.mtime != y.mtime {
            diff("mtime", x.mtime.to_string(), y.mtime.to_string())
        } else if x.rdev != y.rdev {
            diff("device", format!("{:?}", x.rdev), format!("{:?}", y.rdev))
        } else if x.sparse != y.sparse {
            diff(
                "sparse map",
                format!("{:?}", x.sparse),
                format!("{:?}", y.sparse),
            )
        } else if offsets && x.offset != y.offset {
            diff("data offset", x.offset.to_string(), y.offset.to_string())
        } else {
            None
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Reads a whole tar stream and indexes it, accepting what Go's archive/tar
/// (and so docker) accepts. Reads to the end of `reader` so that wrapping
/// readers (hashes, digest checks) see every byte.
pub fn index_tar<R: Read>(reader: R, digest: &str) -> Result<LayerIndex, LayerError> {
    let mut r = Counting {
        inner: reader,
        pos: 0,
    };
    let mut t = Indexer {
        digest,
        entries: Vec::new(),
    };
    t.run(&mut r)?;
    // Whatever follows the end-of-archive marker is read so the layer's
    // digest covers the whole stream.
    r.skip(u64::MAX).map_err(|e| t.io(e))?;
    Ok(LayerIndex { entries: t.entries })
}

pub(super) struct Indexer<'a> {
    pub(super) digest: &'a str,
    pub(super) entries: Vec<Entry>,
}

impl Indexer<'_> {
    pub(super) fn io(&self, source: io::Error) -> LayerError {
        LayerError::Io {
            digest: self.digest.to_string(),
            source,
        }
    }

    pub(super) fn truncated(&self, offset: u64) -> LayerError {
        LayerError::Truncated {
            digest: self.digest.to_string(),
            offset,
        }
    }

    pub(super) fn refuse(&self, path: &[u8], detail: impl Into<String>) -> LayerError {
        LayerError::Refused {
            digest: self.digest.to_string(),
            path: crate::names::escaped(path).to_string(),
            detail: detail.into(),
        }
    }

    /// Reads exactly `buf.len()` bytes, or says where the stream ended.
    pub(super) fn must_fill<R: Read>(
        &self,
        r: &mut Counting<R>,
        buf: &mut [u8],
    ) -> Result<(), LayerError> {
        if r.fill(buf).map_err(|e| self.io(e))? < buf.len() {
            return Err(self.truncated(r.pos));
        }
        Ok(())
    }

    pub(super) fn run<R: Read>(&mut self, r: &mut Counting<R>) -> Result<(), LayerError> {
        let mut pending = Pending::default();
        let mut block = [0u8; BLOCK];
        loop {
            let start = r.pos;
            // The end of the stream at an entry boundary is a clean end, with or
            // without the two zero blocks (as Go and GNU tar read it); so is
            // one zero block and then the end.
            let n = r.fill(&mut block).map_err(|e| self.io(e))?;
            if n == 0 {
                return Ok(());
            }
            if n < BLOCK {
                return Err(self.truncated(r.pos));
            }
            if block.iter().all(|&b| b == 0) {
                let n = r.fill(&mut block).map_err(|e| self.io(e))?;
                if n == 0 || (n == BLOCK && block.iter().all(|&b| b == 0)) {
                    return Ok(());
                }
                if n < BLOCK {
                    return Err(self.truncated(r.pos));
                }
                return Err(LayerError::NotTar {
                    digest: self.digest.to_string(),
                    offset: start,
                    detail:
                        "a zero block followed by a header (a lone zero block ends the archive)"
                            .into(),
                });
            }
            let h = match parse_header(&block) {
                Ok(h) => h,
                Err(HeaderError::NotTar(detail)) => {
                    return Err(LayerError::NotTar {
                        digest: self.digest.to_string(),
                        offset: start,
                        detail: detail.into(),
                    });
                }
                Err(HeaderError::Field(name, what)) => {
                    return Err(self.refuse(
                        &name,
                        format!("the tar header's {what} field is not a number"),
                    ));
                }
            };
            // Go checks the header's own size before any PAX record can
            // replace it.
            if h.size < 0 && !header_only(h.typeflag) {
                return Err(self.refuse(&h.name, "negative size in the tar header"));
            }
            match h.typeflag {
                b'x' | b'g' | b'L' | b'K' => {
                    let data = self.special(r, &h)?;
                    match h.typeflag {
                        b'x' => {
                            let pax = parse_pax(&data).map_err(|e| self.refuse(&h.name, e))?;
                            pending.pax = Some(pax);
                        }
                        b'g' => {
                            // Global PAX records apply to no entry here: docker
                            // and containerd skip them. Go ends an entry's
                            // extension headers at one, so they are dropped too.
                            parse_pax(&data).map_err(|e| self.refuse(&h.name, e))?;
                            pending = Pending::default();
                        }
                        b'L' => pending.long_name = Some(cstr(&data).to_vec()),
                        _ => pending.long_link = Some(cstr(&data).to_vec()),
                    }
                }
                _ => {
                    let ext = std::mem::take(&mut pending);
                    self.entry(r, h, ext, &mut block)?;
                }
            }
        }
    }

    /// The data of an extension header, capped at [`EXTENSION_MAX`].
    pub(super) fn special<R: Read>(
        &self,
        r: &mut Counting<R>,
        h: &Header,
    ) -> Result<Vec<u8>, LayerError> {
        if h.size < 0 {
            return Err(self.refuse(&h.name, "negative size in the tar header"));
        }
        let size = h.size as u64;
        if size > EXTENSION_MAX {
            return Err(self.refuse(
                &h.name,
                format!("extension header of {size} bytes exceeds the {EXTENSION_MAX} byte limit"),
            ));
        }
        // Grown as bytes arrive, so a header that lies about its size costs
        // no more memory than the bytes that really follow it.
        let mut data = Vec::new();
        let mut chunk = [0u8; 8 * 1024];
        while (data.len() as u64) < size {
            let want = (size - data.len() as u64).min(chunk.len() as u64) as usize;
            self.must_fill(r, &mut chunk[..want])?;
            data.extend_from_slice(&chunk[..want]);
        }
        self.skip_padding(r, size)?;
        Ok(data)
    }

    /// Skips to the next block boundary; the stream may end inside the padding
    /// (the next header read then sees the end).
    pub(super) fn skip_padding<R: Read>(
        &self,
        r: &mut Counting<R>,
        size: u64,
    ) -> Result<(), LayerError> {
        r.skip(padded(size) - size).map_err(|e| self.io(e))?;
        Ok(())
    }

    pub(super) fn entry<R: Read>(
        &mut self,
        r: &mut Counting<R>,
        mut h: Header,
        ext: Pending,
        block: &mut [u8; BLOCK],
    ) -> Result<(), LayerError> {
        let mut size = h.size;
        let pax = ext.pax.unwrap_or_default();
        for (k, v) in &pax {
            if v.is_empty() {
                continue; // an empty record keeps the header's value
            }
            let bad = |what: &str| self.refuse(&h.name, format!("PAX {what} is not a number"));
            match k.as_slice() {
                b"path" => h.name = v.clone(),
                b"linkpath" => h.link = v.clone(),
                b"uid" => h.uid = decimal(v).ok_or_else(|| bad("uid"))?,
                b"gid" => h.gid = decimal(v).ok_or_else(|| bad("gid"))?,
                b"size" => size = decimal(v).ok_or_else(|| bad("size"))?,
                b"mtime" => h.mtime = pax_time(v).ok_or_else(|| bad("mtime"))?,
                b"atime" | b"ctime" => {
                    pax_time(v).ok_or_else(|| bad("atime or ctime"))?;
                }
                _ => {}
            }
        }
        // A GNU long name wins over a PAX path, as in Go (and so in docker,
        // containerd and umoci): agreeing with them leaves nothing ambiguous.
        if let Some(n) = ext.long_name.filter(|n| !n.is_empty()) {
            h.name = n;
        }
        if let Some(l) = ext.long_link.filter(|l| !l.is_empty()) {
            h.link = l;
        }
        if h.typeflag == TYPE_REG_A {
            h.typeflag = if h.name.ends_with(b"/") { b'5' } else { b'0' };
        }
        let stored = if header_only(h.typeflag) { 0 } else { size };
        if stored < 0 {
            return Err(self.refuse(&h.name, "negative size in the tar header"));
        }
        let mut map = if h.typeflag == TYPE_GNU_SPARSE {
            if h.format != Format::Gnu {
                return Err(self.refuse(&h.name, "a sparse entry in a non-GNU header"));
            }
            size = numeric(&block[483..495])
                .ok_or_else(|| self.refuse(&h.name, "the GNU sparse real size is not a number"))?;
            Some(self.old_gnu_map(r, &h, block)?)
        } else {
            None
        };
        let mut consumed = 0u64;
        if map.is_none()
            && let Some(v1) = pax_sparse_version(&pax)
        {
            if let Some(n) = pax.get(&b"GNU.sparse.name"[..]).filter(|n| !n.is_empty()) {
                h.name = n.clone();
            }
            let real = pax
                .get(&b"GNU.sparse.size"[..])
                .filter(|v| !v.is_empty())
                .or_else(|| {
                    pax.get(&b"GNU.sparse.realsize"[..])
                        .filter(|v| !v.is_empty())
                });
            if let Some(v) = real {
                size = decimal(v)
                    .ok_or_else(|| self.refuse(&h.name, "GNU sparse size is not a number"))?;
            }
            map = Some(if v1 {
                let (m, used) = self.pax_map_1_0(r, &h, stored as u64)?;
                consumed = used;
                m
            } else {
                self.pax_map_0_1(&h, &pax)?
            });
        }
        let data_offset = r.pos;
        let sparse = match map {
            None => None,
            Some(m) => {
                if header_only(h.typeflag) {
                    return Err(self.refuse(&h.name, "a sparse map on an entry that has no data"));
                }
                let have = stored as u64 - consumed;
                Some(self.segments(&h, m, size, have)?)
            }
        };
        // Skip what is stored (for types rimg does not show too).
        let rest = stored as u64 - consumed;
        if r.skip(rest).map_err(|e| self.io(e))? < rest {
            return Err(self.truncated(r.pos));
        }
        self.skip_padding(r, stored as u64)?;
        let kind = match h.typeflag {
            b'0' | b'7' | TYPE_GNU_SPARSE => EntryKind::File,
            // 'D' is a GNU incremental dump directory: GNU tar extracts it as
            // a directory (its data, a listing of names, is skipped).
            b'5' | b'D' => EntryKind::Dir,
            b'2' => EntryKind::Symlink,
            b'1' => EntryKind::Hardlink,
            b'3' => EntryKind::Char,
            b'4' => EntryKind::Block,
            b'6' => EntryKind::Fifo,
            other => {
                // Vendor extensions and volume labels carry no file.
                tracing::debug!(
                    "layer {}: skipping {:?} of tar type {:?}",
                    self.digest,
                    crate::names::escaped(&h.name),
                    other as char
                );
                return Ok(());
            }
        };
        let rdev = match kind {
            EntryKind::Char | EntryKind::Block => (h.dev.0 as u32, h.dev.1 as u32),
            _ => (0, 0),
        };
        let link = match kind {
            EntryKind::Hardlink => Some(path_of(&h.link)),
            EntryKind::Symlink => Some(link_of(&h.link)),
            _ => None,
        };
        // Empty values are skipped like every empty PAX record (Go does so).
        let xattrs = pax
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .filter_map(|(k, v)| {
                let name = k.strip_prefix(b"SCHILY.xattr.")?;
                Some((String::from_utf8_lossy(name).into_owned(), v.clone()))
            })
            .collect();
        let file = kind == EntryKind::File;
        self.entries.push(Entry {
            path: path_of(&h.name),
            kind,
            // A symlink's mode means nothing on Linux, which always shows 0777
            // (as umoci's and docker's extracted symlinks do).
            mode: if kind == EntryKind::Symlink {
                0o777
            } else {
                h.mode as u32 & 0o7777
            },
            uid: h.uid as u32,
            gid: h.gid as u32,
            size: if file { size as u64 } else { 0 },
            mtime: h.mtime,
            link,
            rdev,
            xattrs,
            offset: data_offset,
            sparse: if file { sparse } else { None },
        });
        Ok(())
    }

    /// The old GNU sparse map: up to 4 entries in the header, then 21 per
    /// extension block for as long as each says another follows.
    pub(super) fn old_gnu_map<R: Read>(
        &self,
        r: &mut Counting<R>,
        h: &Header,
        block: &mut [u8; BLOCK],
    ) -> Result<Vec<(i64, i64)>, LayerError> {
        let mut map = Vec::new();
        let (mut area, mut count, mut ext_at) = (386usize, 4usize, 482usize);
        loop {
            for i in 0..count {
                let e = area + i * 24;
                if block[e] == 0 {
                    break;
                }
                let (off, len) = (numeric(&block[e..e + 12]), numeric(&block[e + 12..e + 24]));
                let (Some(off), Some(len)) = (off, len) else {
                    return Err(self.refuse(&h.name, "a GNU sparse map entry is not a number"));
                };
                if map.len() >= SPARSE_MAX {
                    return Err(self.too_many(h));
                }
                map.push((off, len));
            }
            if block[ext_at] == 0 {
                return Ok(map);
            }
            self.must_fill(r, block)?;
            (area, count, ext_at) = (0, 21, 504);
        }
    }

    pub(super) fn too_many(&self, h: &Header) -> LayerError {
        self.refuse(
            &h.name,
            format!("the sparse map has more than {SPARSE_MAX} segments"),
        )
    }

    /// PAX sparse 0.0 and 0.1: `GNU.sparse.numblocks` and the folded map.
    pub(super) fn pax_map_0_1(&self, h: &Header, pax: &Pax) -> Result<Vec<(i64, i64)>, LayerError> {
        let bad = || self.refuse(&h.name, "malformed GNU sparse map in the PAX header");
        let n = pax
            .get(&b"GNU.sparse.numblocks"[..])
            .and_then(|v| decimal(v))
            .filter(|&n| n >= 0)
            .ok_or_else(bad)?;
        let text = pax
            .get(&b"GNU.sparse.map"[..])
            .map(Vec::as_slice)
            .unwrap_or_default();
        let nums: Vec<&[u8]> = if text.is_empty() {
            Vec::new()
        } else {
            text.split(|&c| c == b',').collect()
        };
        if nums.len() as u64 != 2 * n as u64 {
            return Err(bad());
        }
        if n as u64 > SPARSE_MAX as u64 {
            return Err(self.too_many(h));
        }
        nums.chunks(2)
            .map(|p| Some((decimal(p[0])?, decimal(p[1])?)))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)
    }

    /// PAX sparse 1.0: the map is newline-separated decimal numbers (count,
    /// then offset and length pairs) at the start of the entry's data, padded
    /// to a block. Read a block at a time with a bounded token, so a map
    /// without newlines cannot grow memory. Returns the map and the bytes of
    /// data it took.
    pub(super) fn pax_map_1_0<R: Read>(
        &self,
        r: &mut Counting<R>,
        h: &Header,
        stored: u64,
    ) -> Result<(Vec<(i64, i64)>, u64), LayerError> {
        let bad = || self.refuse(&h.name, "malformed GNU sparse 1.0 map");
        let mut block = [0u8; BLOCK];
        let mut used = 0u64;
        let mut token: Vec<u8> = Vec::new();
        let mut nums: Vec<i64> = Vec::new();
        let mut want: Option<usize> = None;
        loop {
            if used + BLOCK as u64 > stored {
                // The map runs past the entry's data.
                return Err(bad());
            }
            self.must_fill(r, &mut block)?;
            used += BLOCK as u64;
            for &c in &block {
                if c != b'\n' {
                    if token.len() >= 32 {
                        return Err(bad());
                    }
                    token.push(c);
                    continue;
                }
                let v = decimal(&token).ok_or_else(bad)?;
                token.clear();
                match want {
                    None => {
                        if v < 0 {
                            return Err(bad());
                        }
                        if v as u64 > SPARSE_MAX as u64 {
                            return Err(self.too_many(h));
                        }
                        want = Some(2 * v as usize);
                    }
                    Some(_) => nums.push(v),
                }
                if want == Some(nums.len()) {
                    break;
                }
            }
            if want == Some(nums.len()) {
                let map = nums.chunks(2).map(|p| (p[0], p[1])).collect();
                return Ok((map, used));
            }
        }
    }

    /// Checks a sparse map as Go (and BSD tar) do, and that the data stored
    /// is exactly what the map covers (Go fails the read otherwise).
    pub(super) fn segments(
        &self,
        h: &Header,
        map: Vec<(i64, i64)>,
        size: i64,
        have: u64,
    ) -> Result<Box<[Segment]>, LayerError> {
        let bad = |why: &str| self.refuse(&h.name, format!("invalid sparse map: {why}"));
        if size < 0 {
            return Err(bad("negative size"));
        }
        let mut out = Vec::with_capacity(map.len().min(1024));
        let (mut end, mut stored) = (0i64, 0u64);
        for (off, len) in map {
            if off < 0 || len < 0 {
                return Err(bad("a negative offset or length"));
            }
            let Some(e) = off.checked_add(len) else {
                return Err(bad("a segment overflows"));
            };
            if e > size {
                return Err(bad("a segment extends past the file's size"));
            }
            if off < end {
                return Err(bad("segments overlap or are out of order"));
            }
            end = e;
            if len > 0 {
                out.push(Segment {
                    logical: off as u64,
                    stored,
                    len: len as u64,
                });
                stored += len as u64;
            }
        }
        if stored != have {
            return Err(bad(&format!(
                "it covers {stored} bytes of data but the entry stores {have}"
            )));
        }
        Ok(out.into_boxed_slice())
    }
}

/// Which PAX sparse form the records describe: `Some(true)` for 1.0,
/// `Some(false)` for 0.0 and 0.1, `None` when the entry is not sparse (or
/// of a version Go does not know, which it reads as a plain file).
pub(super) fn pax_sparse_version(pax: &Pax) -> Option<bool> {
    let get = |k: &[u8]| pax.get(k).map(Vec::as_slice).unwrap_or_default();
    let (major, minor) = (get(b"GNU.sparse.major"), get(b"GNU.sparse.minor"));
    match (major, minor) {
        (b"0", b"0" | b"1") => Some(false),
        (b"1", b"0") => Some(true),
        (b"", b"") => (!get(b"GNU.sparse.map").is_empty()).then_some(false),
        _ => None,
    }
}
