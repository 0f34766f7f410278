//! One layer's tar stream: how it is compressed, and the index of its entries
//! (attributes, link targets, xattrs, and where each file's bytes start in the
//! uncompressed tar, so a read is one `read_at`).
//!
//! The reader follows Go's archive/tar (what docker, containerd and umoci
//! read with), checked against Go's own test corpus in `tests/corpus.rs`. It
//! is written here rather than taken from `tar::Archive` because layers need
//! what that reader does not give: Go's exact header rules, a cap on
//! extension headers, bounded sparse maps, and all four sparse encodings
//! (`tar` 0.4 expands none of the PAX ones).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// Extension headers (PAX, GNU long names) larger than this are refused.
pub const EXTENSION_MAX: u64 = 1 << 20;
const BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(
        "layer {digest}: unsupported media type {media_type:?} and the content is neither gzip, zstd nor tar"
    )]
    UnknownMediaType { digest: String, media_type: String },
    #[error("layer {digest}: not a valid tar stream at byte {offset}: {detail}")]
    NotTar {
        digest: String,
        offset: u64,
        detail: String,
    },
    #[error("layer {digest}: truncated (the tar stream ends inside an entry at byte {offset})")]
    Truncated { digest: String, offset: u64 },
    #[error("layer {digest}: {path}: {detail}")]
    Refused {
        digest: String,
        path: String,
        detail: String,
    },
    #[error("layer {digest}: {source}")]
    Io {
        digest: String,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

/// The compression of a layer: by the bytes themselves when they say, since
/// registries do mislabel layers, else by the media type.
pub fn detect(digest: &str, media_type: &str, head: &[u8]) -> Result<Compression, LayerError> {
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Compression::Gzip);
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Ok(Compression::Zstd);
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Ok(Compression::None);
    }
    let mt = media_type.to_ascii_lowercase();
    let known_tar = mt.ends_with(".tar")
        || mt.ends_with("tar.gzip")
        || mt.ends_with("+gzip")
        || mt.ends_with("+zstd")
        || mt.ends_with(".tar.zstd");
    // An empty layer, or an old-style (v7) tar with no ustar magic, under a tar media type.
    if known_tar && (head.is_empty() || head.len() >= BLOCK) {
        return Ok(Compression::None);
    }
    Err(LayerError::UnknownMediaType {
        digest: digest.to_string(),
        media_type: media_type.to_string(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A hard link to `link`, an earlier path of the same layer.
    Hardlink,
    Char,
    Block,
    Fifo,
}

/// One tar entry, normalised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative to the root, without leading `/` or `./`; empty for the root
    /// itself. Bytes as stored: Linux and tar allow names that are not UTF-8.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky; no type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    /// Symlink target verbatim; hardlink target normalised like `path`.
    pub link: Option<Vec<u8>>,
    /// Major and minor device numbers.
    pub rdev: (u32, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Where the file's bytes start in the uncompressed tar.
    pub offset: u64,
    /// A sparse file's data segments, stored back to back from `offset`;
    /// `None` for a file stored whole.
    pub sparse: Option<Box<[Segment]>>,
}

impl Entry {
    /// An empty entry of `kind` at `path`: owned by root, time zero, mode
    /// 0755 for a directory and 0644 for anything else.
    pub fn new(path: &[u8], kind: EntryKind) -> Entry {
        Entry {
            path: path.to_vec(),
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

    /// A directory no layer lists but whose children exist: mode 0755, owned
    /// by root, time zero (as runtimes create missing parents).
    pub fn implicit_dir(path: &[u8]) -> Entry {
        Entry::new(path, EntryKind::Dir)
    }
}

/// A layer's entries in tar order (duplicates kept; later ones win when merged).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndex {
    pub entries: Vec<Entry>,
}

/// Normalises a tar path inside the root: strips `/` and `./`, resolves `.`,
/// and clamps `..` at the root (as docker and containerd do), so no entry can
/// name anything outside the image.
pub fn normalize(path: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join(&b'/')
}

struct Counting<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Counting<R> {
    /// Fills `buf` or reports how many bytes came before the stream ended.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pos += n as u64;
        Ok(n)
    }

    fn skip(&mut self, mut n: u64) -> io::Result<u64> {
        let mut buf = [0u8; 64 * 1024];
        let mut skipped = 0;
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            let got = self.fill(&mut buf[..want])?;
            if got == 0 {
                break;
            }
            skipped += got as u64;
            n -= got as u64;
        }
        Ok(skipped)
    }
}

fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK as u64) * BLOCK as u64
}

/// A sparse file's map holds at most this many data segments (24 bytes each
/// in memory), so a hostile map cannot ask for unbounded memory.
pub const SPARSE_MAX: usize = 1 << 20;

/// One run of a sparse file's data: `len` bytes at logical offset `logical`,
/// stored `stored` bytes after the entry's `offset` (segments are stored back
/// to back; everything between them reads as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub logical: u64,
    pub stored: u64,
    pub len: u64,
}

/// Reads a file's bytes at logical position `pos` into `buf`, up to the end of
/// the file; returns how many. `read_at` reads the layer's uncompressed tar.
/// A sparse file's holes read as zeros; the segment holding `pos` is found by
/// binary search, so a read near the end of a huge sparse file is as cheap as
/// one at the start.
pub fn read_file(
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<usize>,
    offset: u64,
    size: u64,
    sparse: Option<&[Segment]>,
    pos: u64,
    buf: &mut [u8],
) -> io::Result<usize> {
    if pos >= size {
        return Ok(0);
    }
    let want = (size - pos).min(buf.len() as u64) as usize;
    let buf = &mut buf[..want];
    let Some(segs) = sparse else {
        read_full(read_at, offset + pos, buf)?;
        return Ok(want);
    };
    let mut i = segs.partition_point(|s| s.logical + s.len <= pos);
    let mut done = 0;
    while done < want {
        let at = pos + done as u64;
        let rest = (want - done) as u64;
        match segs.get(i) {
            Some(s) if s.logical <= at => {
                let within = at - s.logical;
                let n = (s.len - within).min(rest) as usize;
                read_full(
                    read_at,
                    offset + s.stored + within,
                    &mut buf[done..done + n],
                )?;
                done += n;
                i += 1;
            }
            next => {
                let hole_end = next.map_or(size, |s| s.logical);
                let n = (hole_end - at).min(rest) as usize;
                buf[done..done + n].fill(0);
                done += n;
            }
        }
    }
    Ok(want)
}

fn read_full(
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<usize>,
    at: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match read_at(at + done as u64, &mut buf[done..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the layer ends before the file's data does",
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The one place raw tar path bytes become an entry's path.
fn path_of(raw: &[u8]) -> Vec<u8> {
    normalize(raw)
}

/// The one place raw link target bytes become an entry's link.
fn link_of(raw: &[u8]) -> Vec<u8> {
    raw.to_vec()
}

/// Bytes up to the first NUL: tar's names are C strings (as Go, GNU and BSD
/// tar read them).
fn cstr(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

/// An octal field as Go's archive/tar reads it: NULs and spaces around it are
/// ignored, the digits end at a NUL, and empty is zero.
fn octal(b: &[u8]) -> Option<i64> {
    let Some(start) = b.iter().position(|&c| c != 0 && c != b' ') else {
        return Some(0);
    };
    let end = b
        .iter()
        .rposition(|&c| c != 0 && c != b' ')
        .unwrap_or(start);
    let digits = cstr(&b[start..=end]);
    if !digits.iter().all(|c| (b'0'..=b'7').contains(c)) {
        return None;
    }
    let mut x: u64 = 0;
    for &c in digits {
        x = x.checked_mul(8)?.checked_add((c - b'0') as u64)?;
    }
    Some(x as i64)
}

/// A numeric field: octal, or GNU base-256 (two's complement, big endian)
/// when the high bit of the first byte is set.
fn numeric(b: &[u8]) -> Option<i64> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        let inv = if b[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &c) in b.iter().enumerate() {
            let mut c = c ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 > 0 {
                return None;
            }
            x = x << 8 | c as u64;
        }
        if x >> 63 > 0 {
            return None;
        }
        return Some(if inv == 0xff { !(x as i64) } else { x as i64 });
    }
    octal(b)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    V7,
    Ustar,
    Star,
    Gnu,
}

/// One header block, decoded as Go's `readHeader` does.
struct Header {
    format: Format,
    typeflag: u8,
    name: Vec<u8>,
    link: Vec<u8>,
    size: i64,
    mode: i64,
    uid: i64,
    gid: i64,
    mtime: i64,
    dev: (i64, i64),
}

enum HeaderError {
    /// Not a header at all (checksum).
    NotTar(&'static str),
    /// A header whose named field does not parse.
    Field(Vec<u8>, &'static str),
}

fn parse_header(b: &[u8; BLOCK]) -> Result<Header, HeaderError> {
    let stored = octal(&b[148..156]).ok_or(HeaderError::NotTar("not a tar header"))?;
    let (mut unsigned, mut signed) = (0i64, 0i64);
    for (i, &c) in b.iter().enumerate() {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned += c as i64;
        signed += c as i8 as i64;
    }
    if stored != unsigned && stored != signed {
        return Err(HeaderError::NotTar("header checksum mismatch"));
    }
    let format = match (&b[257..263], &b[263..265], &b[508..512]) {
        (b"ustar\0", _, b"tar\0") => Format::Star,
        (b"ustar\0", _, _) => Format::Ustar,
        (b"ustar ", b" \0", _) => Format::Gnu,
        _ => Format::V7,
    };
    let mut name = cstr(&b[0..100]).to_vec();
    let field = |range: std::ops::Range<usize>, what: &'static str| {
        numeric(&b[range]).ok_or_else(|| HeaderError::Field(cstr(&b[0..100]).to_vec(), what))
    };
    let mut h = Header {
        format,
        typeflag: b[156],
        link: cstr(&b[157..257]).to_vec(),
        size: field(124..136, "size")?,
        mode: field(100..108, "mode")?,
        uid: field(108..116, "uid")?,
        gid: field(116..124, "gid")?,
        mtime: field(136..148, "mtime")?,
        dev: (0, 0),
        name: Vec::new(),
    };
    if format != Format::V7 {
        h.dev = (
            field(329..337, "device major")?,
            field(337..345, "device minor")?,
        );
        let prefix: &[u8] = match format {
            Format::Ustar => cstr(&b[345..500]),
            Format::Star => {
                field(476..488, "atime")?;
                field(488..500, "ctime")?;
                cstr(&b[345..476])
            }
            _ => {
                // Go before 1.8 wrote a ustar prefix into GNU headers; Go still
                // reads one there when the time fields it overlaps do not parse.
                let times_ok = (b[345] == 0 || numeric(&b[345..357]).is_some())
                    && (b[357] == 0 || numeric(&b[357..369]).is_some());
                let p = cstr(&b[345..500]);
                if !times_ok && p.is_ascii() { p } else { &[] }
            }
        };
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    h.name = name;
    Ok(h)
}

/// PAX records of one extended header, as Go's `parsePAX` keeps them: the last
/// record of a key wins, and GNU sparse 0.0's repeated offset/numbytes records
/// are folded into one `GNU.sparse.map`.
type Pax = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

fn parse_pax(mut s: &[u8]) -> Result<Pax, String> {
    let mut out = Pax::new();
    let mut map: Vec<&[u8]> = Vec::new();
    while !s.is_empty() {
        let bad = |why: &str| Err(format!("malformed PAX header: {why}"));
        let Some(sp) = s.iter().position(|&c| c == b' ') else {
            return bad("a record without a length");
        };
        let n: i64 = match std::str::from_utf8(&s[..sp])
            .ok()
            .and_then(|t| t.parse().ok())
        {
            Some(n) if n >= 5 && n as u64 <= s.len() as u64 => n,
            _ => return bad("a record length out of range"),
        };
        let n = n as usize;
        if n <= sp + 1 {
            return bad("a record length out of range");
        }
        let rec = &s[sp + 1..n - 1];
        if s[n - 1] != b'\n' {
            return bad("a record without its newline");
        }
        s = &s[n..];
        let Some(eq) = rec.iter().position(|&c| c == b'=') else {
            return bad("a record without '='");
        };
        let (k, v) = (&rec[..eq], &rec[eq + 1..]);
        let nul_in = |b: &[u8]| b.contains(&0);
        let valid = !k.is_empty()
            && match k {
                b"path" | b"linkpath" | b"uname" | b"gname" => !nul_in(v),
                _ => !nul_in(k),
            };
        if !valid {
            return Err(format!(
                "malformed PAX header: record {:?} has an empty key or a NUL byte",
                String::from_utf8_lossy(k)
            ));
        }
        match k {
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                let want: &[u8] = if map.len().is_multiple_of(2) {
                    b"GNU.sparse.offset"
                } else {
                    b"GNU.sparse.numbytes"
                };
                if k != want || v.contains(&b',') {
                    return bad("GNU sparse 0.0 records out of order");
                }
                map.push(v);
            }
            _ => {
                out.insert(k.to_vec(), v.to_vec());
            }
        }
    }
    if !map.is_empty() {
        out.insert(b"GNU.sparse.map".to_vec(), map.join(&b','));
    }
    Ok(out)
}

fn decimal(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Seconds of a PAX time (`secs[.fraction]`), validated as Go does.
fn pax_time(v: &[u8]) -> Option<i64> {
    let (secs, frac) = match v.iter().position(|&c| c == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &[][..]),
    };
    frac.iter().all(u8::is_ascii_digit).then_some(())?;
    decimal(secs)
}

/// Extension data gathered for the next real entry: the last header of each
/// kind wins, as in Go's reader (and GNU and BSD tar).
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Pax>,
}

const TYPE_REG_A: u8 = 0;
const TYPE_GNU_SPARSE: u8 = b'S';

/// Link, symlink, devices, directories and FIFOs never have data, whatever
/// their size field says (Go's `isHeaderOnlyType`).
fn header_only(typeflag: u8) -> bool {
    matches!(typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6')
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

struct Indexer<'a> {
    digest: &'a str,
    entries: Vec<Entry>,
}

impl Indexer<'_> {
    fn io(&self, source: io::Error) -> LayerError {
        LayerError::Io {
            digest: self.digest.to_string(),
            source,
        }
    }

    fn truncated(&self, offset: u64) -> LayerError {
        LayerError::Truncated {
            digest: self.digest.to_string(),
            offset,
        }
    }

    fn refuse(&self, path: &[u8], detail: impl Into<String>) -> LayerError {
        LayerError::Refused {
            digest: self.digest.to_string(),
            path: crate::names::escaped(path).to_string(),
            detail: detail.into(),
        }
    }

    /// Reads exactly `buf.len()` bytes, or says where the stream ended.
    fn must_fill<R: Read>(&self, r: &mut Counting<R>, buf: &mut [u8]) -> Result<(), LayerError> {
        if r.fill(buf).map_err(|e| self.io(e))? < buf.len() {
            return Err(self.truncated(r.pos));
        }
        Ok(())
    }

    fn run<R: Read>(&mut self, r: &mut Counting<R>) -> Result<(), LayerError> {
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
    fn special<R: Read>(&self, r: &mut Counting<R>, h: &Header) -> Result<Vec<u8>, LayerError> {
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
    fn skip_padding<R: Read>(&self, r: &mut Counting<R>, size: u64) -> Result<(), LayerError> {
        r.skip(padded(size) - size).map_err(|e| self.io(e))?;
        Ok(())
    }

    fn entry<R: Read>(
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
    fn old_gnu_map<R: Read>(
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

    fn too_many(&self, h: &Header) -> LayerError {
        self.refuse(
            &h.name,
            format!("the sparse map has more than {SPARSE_MAX} segments"),
        )
    }

    /// PAX sparse 0.0 and 0.1: `GNU.sparse.numblocks` and the folded map.
    fn pax_map_0_1(&self, h: &Header, pax: &Pax) -> Result<Vec<(i64, i64)>, LayerError> {
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
    fn pax_map_1_0<R: Read>(
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
    fn segments(
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
fn pax_sparse_version(pax: &Pax) -> Option<bool> {
    let get = |k: &[u8]| pax.get(k).map(Vec::as_slice).unwrap_or_default();
    let (major, minor) = (get(b"GNU.sparse.major"), get(b"GNU.sparse.minor"));
    match (major, minor) {
        (b"0", b"0" | b"1") => Some(false),
        (b"1", b"0") => Some(true),
        (b"", b"") => (!get(b"GNU.sparse.map").is_empty()).then_some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:test";

    fn builder() -> tar::Builder<Vec<u8>> {
        tar::Builder::new(Vec::new())
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_mtime(1_600_000_000);
        h
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn index(bytes: &[u8]) -> LayerIndex {
        index_tar(bytes, D).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn file_offsets_point_at_the_data() {
        let mut b = builder();
        file(&mut b, "a.txt", b"hello");
        file(&mut b, "./dir/b.txt", b"world!");
        let tar = b.into_inner().unwrap();
        let idx = index(&tar);
        assert_eq!(idx.entries.len(), 2);
        for (e, want) in idx.entries.iter().zip([&b"hello"[..], b"world!"]) {
            let at = e.offset as usize;
            assert_eq!(&tar[at..at + e.size as usize], want, "{:?}", e.path);
        }
        assert_eq!(idx.entries[1].path, b"dir/b.txt");
        assert_eq!((idx.entries[0].uid, idx.entries[0].gid), (1000, 100));
    }

    #[test]
    fn every_entry_type_is_indexed() {
        let mut b = builder();
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, "d/", io::empty()).unwrap();
        file(&mut b, "d/f", b"x");
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "d/s", "/etc/passwd").unwrap();
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        b.append_link(&mut h, "d/h", "./d/f").unwrap();
        let mut h = header(tar::EntryType::Char, 0o600, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        b.append_data(&mut h, "d/null", io::empty()).unwrap();
        let mut h = header(tar::EntryType::Block, 0o600, 0);
        h.set_device_major(8).unwrap();
        h.set_device_minor(1).unwrap();
        b.append_data(&mut h, "d/sda1", io::empty()).unwrap();
        let mut h = header(tar::EntryType::Fifo, 0o644, 0);
        b.append_data(&mut h, "d/fifo", io::empty()).unwrap();
        let idx = index(&b.into_inner().unwrap());
        let kinds: Vec<_> = idx.entries.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EntryKind::Dir,
                EntryKind::File,
                EntryKind::Symlink,
                EntryKind::Hardlink,
                EntryKind::Char,
                EntryKind::Block,
                EntryKind::Fifo
            ]
        );
        assert_eq!(idx.entries[2].link.as_deref(), Some(&b"/etc/passwd"[..]));
        assert_eq!(idx.entries[3].link.as_deref(), Some(&b"d/f"[..]));
        assert_eq!(idx.entries[4].rdev, (1, 3));
        assert_eq!(idx.entries[5].rdev, (8, 1));
    }

    #[test]
    fn long_names_and_links_use_gnu_or_pax_headers() {
        let long = format!("{}/file", "x".repeat(200));
        let mut b = builder();
        file(&mut b, &long, b"data");
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "l", &long).unwrap();
        let idx = index(&b.into_inner().unwrap());
        assert_eq!(idx.entries[0].path, long.as_bytes());
        assert_eq!(idx.entries[1].link.as_deref(), Some(long.as_bytes()));
    }

    fn pax_tar(records: &[(&str, &[u8])], name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = builder();
        b.append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        file(&mut b, name, data);
        b.into_inner().unwrap()
    }

    #[test]
    fn pax_records_override_header_fields() {
        let tar = pax_tar(
            &[
                ("path", b"pax/long/name"),
                ("uid", b"4000000"),
                ("gid", b"77"),
                ("mtime", b"1700000000.123456"),
                ("SCHILY.xattr.user.comment", b"hi"),
                ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
                ("SCHILY.xattr.user.empty", b""),
            ],
            "short",
            b"abc",
        );
        let e = &index(&tar).entries[0];
        assert_eq!(e.path, b"pax/long/name");
        assert_eq!((e.uid, e.gid), (4_000_000, 77));
        assert_eq!(e.mtime, 1_700_000_000);
        assert_eq!(e.xattrs.len(), 2);
        assert_eq!(e.xattrs[1], ("user.comment".to_string(), b"hi".to_vec()));
    }

    #[test]
    fn gnu_long_name_wins_over_a_pax_path_as_in_go() {
        // Two names for one entry are only dangerous when readers disagree on
        // which counts; taking Go's choice agrees with docker, containerd and
        // umoci, which all read with Go.
        let mut b = builder();
        b.append_pax_extensions([("path", &b"from/pax"[..])])
            .unwrap();
        // The tar crate writes a GNU long-name entry for paths over 100 bytes.
        file(&mut b, &"g".repeat(150), b"x");
        let idx = index(&b.into_inner().unwrap());
        assert_eq!(idx.entries[0].path, "g".repeat(150).as_bytes());
    }

    #[test]
    fn oversized_extension_headers_are_refused() {
        let mut b = builder();
        let big = vec![b'a'; (EXTENSION_MAX + 10) as usize];
        b.append_pax_extensions([("comment", &big[..])]).unwrap();
        file(&mut b, "f", b"x");
        let err = index_tar(&b.into_inner().unwrap()[..], D).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
    }

    /// Data segments of a test sparse file: logical offset and bytes.
    const SEGS: &[(u64, &[u8])] = &[
        (0, b"abc"),
        (100, b"de"),
        (1000, b"fghi"),
        (5000, b"j"),
        (6000, b"klmno"),
        (9000, b"pqr"),
    ];
    const SPARSE_SIZE: u64 = 10_000;

    fn expanded() -> Vec<u8> {
        let mut out = vec![0u8; SPARSE_SIZE as usize];
        for (at, data) in SEGS {
            out[*at as usize..*at as usize + data.len()].copy_from_slice(data);
        }
        out
    }

    fn stored_data() -> Vec<u8> {
        SEGS.iter().flat_map(|(_, d)| d.iter().copied()).collect()
    }

    fn put_octal(field: &mut [u8], v: u64) {
        let text = format!("{v:0w$o}\0", w = field.len() - 1);
        field.copy_from_slice(text.as_bytes());
    }

    fn padded_to_block(mut v: Vec<u8>) -> Vec<u8> {
        v.resize(padded(v.len() as u64) as usize, 0);
        v
    }

    /// Every byte of `e` read through [`read_file`], in reads of `step` bytes.
    fn contents(tar: &[u8], e: &Entry, step: usize) -> Vec<u8> {
        let mut read_at = |o: u64, b: &mut [u8]| {
            let o = (o as usize).min(tar.len());
            let n = b.len().min(tar.len() - o);
            b[..n].copy_from_slice(&tar[o..o + n]);
            Ok(n)
        };
        let mut out = Vec::new();
        let mut buf = vec![0u8; step];
        loop {
            let n = read_file(
                &mut read_at,
                e.offset,
                e.size,
                e.sparse.as_deref(),
                out.len() as u64,
                &mut buf,
            )
            .unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// Indexes `tar` (a sparse entry followed by a plain file) and checks both.
    fn assert_sparse_then_end(tar: &[u8], name: &str) {
        let idx = index(tar);
        assert_eq!(idx.entries.len(), 2, "{:?}", idx.entries);
        let e = &idx.entries[0];
        assert_eq!(
            (
                String::from_utf8_lossy(&e.path).into_owned(),
                e.kind,
                e.size
            ),
            (name.to_string(), EntryKind::File, SPARSE_SIZE)
        );
        assert_eq!(e.sparse.as_ref().map(|s| s.len()), Some(SEGS.len()));
        for step in [1, 7, 512, 20_000] {
            assert_eq!(contents(tar, e, step), expanded(), "reads of {step}");
        }
        assert_eq!(contents(tar, &idx.entries[1], 4096), b"end\n");
    }

    fn end_file(b: &mut tar::Builder<Vec<u8>>) {
        file(b, "end", b"end\n");
    }

    #[test]
    fn gnu_old_sparse_with_an_extension_block_reads_holes_as_zeros() {
        let data = stored_data();
        let mut h = header(tar::EntryType::GNUSparse, 0o644, data.len() as u64);
        h.set_path("sparse-gnu").unwrap();
        let gnu = h.as_gnu_mut().unwrap();
        for (i, (at, d)) in SEGS.iter().take(4).enumerate() {
            put_octal(&mut gnu.sparse[i].offset, *at);
            put_octal(&mut gnu.sparse[i].numbytes, d.len() as u64);
        }
        gnu.isextended[0] = 1;
        put_octal(&mut gnu.realsize, SPARSE_SIZE);
        h.set_cksum();
        // The rest of the map, in an extension block (not counted in the size).
        let mut ext = [0u8; BLOCK];
        for (i, (at, d)) in SEGS.iter().skip(4).enumerate() {
            put_octal(&mut ext[i * 24..i * 24 + 12], *at);
            put_octal(&mut ext[i * 24 + 12..i * 24 + 24], d.len() as u64);
        }
        let mut tar = h.as_bytes().to_vec();
        tar.extend_from_slice(&ext);
        tar.extend_from_slice(&padded_to_block(data));
        let mut b = builder();
        end_file(&mut b);
        tar.extend_from_slice(&b.into_inner().unwrap());
        assert_sparse_then_end(&tar, "sparse-gnu");
    }

    /// A PAX header with `records`, then a file header of `name` storing `data`.
    fn pax_entry(records: &[(&str, String)], name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = builder();
        b.append_pax_extensions(records.iter().map(|(k, v)| (*k, v.as_bytes())))
            .unwrap();
        file(&mut b, name, data);
        end_file(&mut b);
        b.into_inner().unwrap()
    }

    #[test]
    fn pax_sparse_0_0_repeated_offset_records_are_one_map() {
        let mut records = vec![
            ("GNU.sparse.size", SPARSE_SIZE.to_string()),
            ("GNU.sparse.numblocks", SEGS.len().to_string()),
        ];
        for (at, d) in SEGS {
            records.push(("GNU.sparse.offset", at.to_string()));
            records.push(("GNU.sparse.numbytes", d.len().to_string()));
        }
        let tar = pax_entry(&records, "sparse-0.0", &stored_data());
        assert_sparse_then_end(&tar, "sparse-0.0");
    }

    #[test]
    fn pax_sparse_0_1_map_and_name_records() {
        let map: Vec<String> = SEGS
            .iter()
            .map(|(at, d)| format!("{at},{}", d.len()))
            .collect();
        let records = [
            ("GNU.sparse.size", SPARSE_SIZE.to_string()),
            ("GNU.sparse.numblocks", SEGS.len().to_string()),
            ("GNU.sparse.map", map.join(",")),
            ("GNU.sparse.name", "real/name-0.1".to_string()),
        ];
        let tar = pax_entry(&records, "GNUSparseFile.0/name-0.1", &stored_data());
        assert_sparse_then_end(&tar, "real/name-0.1");
    }

    fn map_1_0() -> Vec<u8> {
        let mut map = format!("{}\n", SEGS.len());
        for (at, d) in SEGS {
            map += &format!("{at}\n{}\n", d.len());
        }
        padded_to_block(map.into_bytes())
    }

    #[test]
    fn pax_sparse_1_0_map_at_the_start_of_the_data() {
        let records = [
            ("GNU.sparse.major", "1".to_string()),
            ("GNU.sparse.minor", "0".to_string()),
            ("GNU.sparse.realsize", SPARSE_SIZE.to_string()),
            ("GNU.sparse.name", "sparse-1.0".to_string()),
        ];
        let mut data = map_1_0();
        data.extend_from_slice(&stored_data());
        let tar = pax_entry(&records, "GNUSparseFile.0/sparse-1.0", &data);
        assert_sparse_then_end(&tar, "sparse-1.0");
    }

    /// Go refuses all of these too, at its header (ErrHeader) or when the
    /// data is read (errMissData, errUnrefData), so refusing the layer agrees
    /// with what docker can extract. Where safety wins over Go: Go trusts a
    /// 1.0 map's count and the length of its numbers (memory grows with the
    /// input), while rimg refuses more than SPARSE_MAX segments (here before
    /// reading them) and numbers over 32 characters, so no map can make an
    /// index unbounded.
    #[test]
    fn bad_sparse_maps_are_refused_naming_the_entry() {
        let v1 = |map: &str, data: &[u8]| {
            let records = [
                ("GNU.sparse.major", "1".to_string()),
                ("GNU.sparse.minor", "0".to_string()),
                ("GNU.sparse.realsize", "100".to_string()),
                ("GNU.sparse.name", "bad.img".to_string()),
            ];
            let mut all = padded_to_block(map.as_bytes().to_vec());
            all.extend_from_slice(data);
            let tar = pax_entry(&records, "GNUSparseFile.0/bad.img", &all);
            index_tar(&tar[..], D).unwrap_err().to_string()
        };
        for (map, data, why) in [
            ("2\n10\n5\n12\n5\n", &b"0123456789"[..], "overlap"),
            (
                "1\n90\n20\n",
                b"01234567890123456789",
                "past the file's size",
            ),
            ("1\n0\n5\n", b"0123456789", "covers 5 bytes"),
            ("1\n0\n5\n", b"", "covers 5 bytes"),
            ("99999999\n", b"", "more than"),
            ("x\n", b"", "malformed"),
            (&"7".repeat(600), b"", "malformed"),
        ] {
            let err = v1(map, data);
            assert!(err.contains(why) && err.contains(D), "{map:?}: {err}");
            assert!(
                err.contains("bad.img") || err.contains("truncated"),
                "{err}"
            );
        }
    }

    #[test]
    fn reads_near_the_end_of_a_9_gib_sparse_file_touch_only_its_last_segment() {
        // 1M segments of 8 bytes spread over 9 GiB.
        let size: u64 = 9 << 30;
        let step = size / SPARSE_MAX as u64;
        let segs: Vec<Segment> = (0..SPARSE_MAX as u64)
            .map(|i| Segment {
                logical: i * step,
                stored: i * 8,
                len: 8,
            })
            .collect();
        let last = segs[segs.len() - 1];
        let mut reads = Vec::new();
        let mut read_at = |o: u64, b: &mut [u8]| {
            reads.push((o, b.len()));
            b.fill(7);
            Ok(b.len())
        };
        let mut buf = [1u8; 16];
        let n = read_file(
            &mut read_at,
            1000,
            size,
            Some(&segs),
            last.logical - 4,
            &mut buf,
        )
        .unwrap();
        assert_eq!(n, 16);
        assert_eq!(buf, [0, 0, 0, 0, 7, 7, 7, 7, 7, 7, 7, 7, 0, 0, 0, 0]);
        let n = read_file(&mut read_at, 1000, size, Some(&segs), size - 3, &mut buf).unwrap();
        assert_eq!((n, &buf[..3]), (3, &[0u8, 0, 0][..]));
        assert_eq!(
            reads,
            [(1000 + last.stored, 8)],
            "one read, of the last segment"
        );
    }

    /// Go's reader_test.go, file by file: what Go reads (entries as
    /// `kind path size [-> link]`) or that Go refuses it.
    const GO_CORPUS: &[(&str, Option<&[&str]>)] = &[
        ("file-and-dir.tar", Some(&["f small.txt 5", "d dir 0"])),
        (
            "gnu-incremental.tar",
            Some(&["d test2 0", "f test2/foo 64", "f test2/sparse 536870912"]),
        ),
        ("gnu-long-nul.tar", Some(&["f 0123456789 0"])),
        (
            "gnu-multi-hdrs.tar",
            Some(&["l GNU2/GNU2/long-path-name 0 -> GNU4/GNU4/long-linkpath-name"]),
        ),
        ("gnu-nil-sparse-data.tar", Some(&["f sparse.db 1000"])),
        ("gnu-nil-sparse-hole.tar", Some(&["f sparse.db 1000"])),
        ("gnu-sparse-big.tar", Some(&["f gnu-sparse 60000000000"])),
        // Go's name is "hi\x80\x81\x82\x83bye"; rimg shows it lossily
        // until names are bytes.
        ("gnu-not-utf8.tar", Some(&["f hi\\x80\\x81\\x82\\x83bye 0"])),
        (
            "gnu-utf8.tar",
            Some(&["f ☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹☺☻☹ 0"]),
        ),
        // Header-only types carry no data whatever their size says: the
        // second eight entries repeat the first eight with sizes set.
        (
            "hdr-only.tar",
            Some(&[
                "d dir 0",
                "p fifo 0",
                "f file 46",
                "h hardlink 0 -> file",
                "c null 0",
                "b sda 0",
                "l symlink 0 -> file",
                "l badlink 0 -> missing",
                "d dir 0",
                "p fifo 0",
                "f file 46",
                "h hardlink 0 -> file",
                "c null 0",
                "b sda 0",
                "l symlink 0 -> file",
                "l badlink 0 -> missing",
            ]),
        ),
        (
            "pax.tar",
            Some(&[
                "f a/123456789101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899100 7",
                "l a/b 0 -> 123456789101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899100",
            ]),
        ),
        (
            "trailing-slash.tar",
            Some(&[
                "d 123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789/123456789 0",
            ]),
        ),
        (
            "ustar.tar",
            Some(&[
                "f longname/longname/longname/longname/longname/longname/longname/longname/longname/longname/longname/longname/longname/longname/longname/file.txt 6",
            ]),
        ),
        ("gnu.tar", Some(&["f small.txt 5", "f small2.txt 11"])),
        (
            "hardlink.tar",
            Some(&["f file.txt 15", "h hard.txt 0 -> file.txt"]),
        ),
        (
            "invalid-go17.tar",
            Some(&[
                "f aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/foo 0",
            ]),
        ),
        ("issue10968.tar", None),
        ("issue11169.tar", None),
        ("issue12435.tar", None),
        ("neg-size.tar", None),
        ("nil-uid.tar", Some(&["f P1050238.JPG.log 14"])),
        ("pax-bad-hdr-file.tar", None),
        ("pax-bad-mtime-file.tar", None),
        (
            "pax-global-records.tar",
            Some(&["f file1 0", "f file2 0", "f file3 0", "f file4 0"]),
        ),
        (
            "pax-multi-hdrs.tar",
            Some(&["l bar 0 -> PAX4/PAX4/long-linkpath-name"]),
        ),
        ("pax-nil-sparse-data.tar", Some(&["f sparse.db 1000"])),
        ("pax-nil-sparse-hole.tar", Some(&["f sparse.db 1000"])),
        ("pax-nul-path.tar", None),
        ("pax-nul-xattrs.tar", None),
        ("pax-path-hdr.tar", Some(&[])),
        ("pax-pos-size-file.tar", Some(&["f foo 999"])),
        ("pax-records.tar", Some(&["f file 0"])),
        ("pax-sparse-big.tar", Some(&["f pax-sparse 60000000000"])),
        (
            "sparse-formats.tar",
            Some(&[
                "f sparse-gnu 200",
                "f sparse-posix-0.0 200",
                "f sparse-posix-0.1 200",
                "f sparse-posix-1.0 200",
                "f end 4",
            ]),
        ),
        ("star.tar", Some(&["f small.txt 5", "f small2.txt 11"])),
        ("ustar-file-devs.tar", Some(&["f file 0"])),
        ("ustar-file-reg.tar", Some(&["f foo 684"])),
        ("v7.tar", Some(&["f small.txt 5", "f small2.txt 11"])),
        ("writer-big-long.tar", None),
        ("writer-big.tar", None),
        (
            "writer.tar",
            Some(&[
                "f small.txt 5",
                "f small2.txt 11",
                "l link.txt 0 -> small.txt",
            ]),
        ),
        ("xattrs.tar", Some(&["f small.txt 5", "f small2.txt 11"])),
    ];

    pub(crate) const GO_TESTDATA: &str = "/usr/share/go-1.19/src/archive/tar/testdata";

    fn corpus_file(name: &str) -> Vec<u8> {
        let p = format!("{GO_TESTDATA}/{name}");
        std::fs::read(&p).unwrap_or_else(|e| {
            panic!("{p}: {e} (scripts/install-deps.sh installs golang-1.19-src)")
        })
    }

    fn describe(e: &Entry) -> String {
        let k = match e.kind {
            EntryKind::File => 'f',
            EntryKind::Dir => 'd',
            EntryKind::Symlink => 'l',
            EntryKind::Hardlink => 'h',
            EntryKind::Char => 'c',
            EntryKind::Block => 'b',
            EntryKind::Fifo => 'p',
        };
        let link = e
            .link
            .as_ref()
            .map(|l| format!(" -> {}", String::from_utf8_lossy(l)))
            .unwrap_or_default();
        format!("{k} {} {}{link}", crate::names::escaped(&e.path), e.size)
    }

    #[test]
    fn go_corpus_reads_as_go_reads_it() {
        for (name, want) in GO_CORPUS {
            let got = index_tar(&corpus_file(name)[..], D);
            match (want, got) {
                (Some(want), Ok(idx)) => {
                    let got: Vec<String> = idx.entries.iter().map(describe).collect();
                    assert_eq!(&got, want, "{name}");
                }
                (None, Err(e)) => {
                    let e = e.to_string();
                    assert!(
                        e.starts_with(&format!("layer {D}: ")) && !e.contains('\n'),
                        "{name}: {e}"
                    );
                }
                (want, got) => panic!("{name}: Go gives {want:?}, rimg {got:?}"),
            }
        }
    }

    #[test]
    fn go_corpus_sparse_files_hold_the_bytes_go_reads() {
        let tar = corpus_file("sparse-formats.tar");
        let idx = index(&tar);
        // Go: all four encodings hold the same 200 bytes, and the partial
        // reads begin "\0G\0o\0G\0o".
        let first = contents(&tar, &idx.entries[0], 3);
        assert_eq!(first.len(), 200);
        assert!(first.starts_with(b"\0G\0o\0G\0o"), "{first:?}");
        for e in &idx.entries[1..4] {
            assert_eq!(contents(&tar, e, 5), first, "{:?}", e.path);
        }
        assert_eq!(contents(&tar, &idx.entries[4], 512), b"end\n");
        // Go's writer_test: six 1e10-byte stretches, each ending in 100 bytes
        // of "0123456789"; checked at the ends only.
        for name in ["gnu-sparse-big.tar", "pax-sparse-big.tar"] {
            let tar = corpus_file(name);
            let e = &index(&tar).entries[0];
            let mut read_at = |o: u64, b: &mut [u8]| {
                let o = (o as usize).min(tar.len());
                let n = b.len().min(tar.len() - o);
                b[..n].copy_from_slice(&tar[o..o + n]);
                Ok(n)
            };
            for k in 1..=6u64 {
                let mut buf = [9u8; 200];
                let at = k * 10_000_000_000 - 200;
                read_file(
                    &mut read_at,
                    e.offset,
                    e.size,
                    e.sparse.as_deref(),
                    at,
                    &mut buf,
                )
                .unwrap();
                assert_eq!(&buf[..100], &[0u8; 100][..], "{name} {k}");
                assert_eq!(
                    &buf[100..],
                    "0123456789".repeat(10).as_bytes(),
                    "{name} {k}"
                );
            }
        }
        // Nil sparse data and holes: 1000 zeros.
        for name in ["gnu-nil-sparse-hole.tar", "pax-nil-sparse-hole.tar"] {
            let tar = corpus_file(name);
            assert_eq!(
                contents(&tar, &index(&tar).entries[0], 333),
                vec![0u8; 1000],
                "{name}"
            );
        }
    }

    #[test]
    fn the_end_of_the_stream_at_an_entry_boundary_is_a_clean_end() {
        let mut b = builder();
        file(&mut b, "a", b"hello");
        let tar = b.into_inner().unwrap();
        // Without the zero blocks, with one, and with the padding cut short.
        for cut in [1024, 1536, 517] {
            let idx = index(&tar[..cut]);
            assert_eq!(idx.entries.len(), 1, "cut at {cut}");
        }
        // Inside the data it is truncation.
        let err = index_tar(&tar[..514], D).unwrap_err();
        assert!(matches!(err, LayerError::Truncated { .. }), "{err}");
    }

    #[test]
    fn a_lone_zero_block_followed_by_a_header_is_refused_as_go_does() {
        let mut b = builder();
        file(&mut b, "a", b"x");
        let one = b.into_inner().unwrap();
        let mut tar = one[..1024].to_vec();
        tar.extend_from_slice(&[0u8; BLOCK]);
        tar.extend_from_slice(&one[..1024]);
        let err = index_tar(&tar[..], D).unwrap_err().to_string();
        assert!(err.contains("zero block"), "{err}");
    }

    #[test]
    fn the_last_of_two_extension_headers_of_one_kind_wins() {
        let mut b = builder();
        b.append_pax_extensions([("path", &b"first"[..]), ("uid", b"5")])
            .unwrap();
        b.append_pax_extensions([("path", &b"second"[..])]).unwrap();
        file(&mut b, "plain", b"x");
        let e = &index(&b.into_inner().unwrap()).entries[0];
        // The second PAX header replaces the first entirely (uid too).
        assert_eq!((e.path.as_slice(), e.uid), (&b"second"[..], 1000));
    }

    #[test]
    fn a_negative_header_size_is_refused_even_when_pax_replaces_it() {
        let mut h = header(tar::EntryType::Regular, 0o644, 0);
        h.as_gnu_mut().unwrap().size = [0xff; 12]; // -1 in base-256
        h.set_path("neg").unwrap();
        h.set_cksum();
        let mut b = builder();
        b.append_pax_extensions([("size", &b"0"[..])]).unwrap();
        b.append(&h, io::empty()).unwrap();
        let err = index_tar(&b.into_inner().unwrap()[..], D)
            .unwrap_err()
            .to_string();
        assert!(err.contains("neg: negative size"), "{err}");
        // Types without data ignore their size field, negative or not.
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        h.as_gnu_mut().unwrap().size = [0xff; 12];
        h.set_path("d/").unwrap();
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend_from_slice(&[0u8; 1024]);
        assert_eq!(index(&tar).entries[0].kind, EntryKind::Dir);
    }

    #[test]
    fn base256_sizes_are_read() {
        let mut h = header(tar::EntryType::Regular, 0o644, 0);
        // 9 GiB in GNU base-256: does not fit the 11 octal digits.
        let size: u64 = 9 << 30;
        let field = &mut h.as_gnu_mut().unwrap().size;
        *field = [0; 12];
        field[0] = 0x80;
        for i in 0..8 {
            field[11 - i] = (size >> (8 * i)) as u8;
        }
        h.set_cksum();
        assert_eq!(h.entry_size().unwrap(), size);
        let mut tar = h.as_bytes().to_vec();
        // Truncated data: the index must say so rather than invent a file.
        tar.extend_from_slice(&[0u8; 1024]);
        let err = index_tar(&tar[..], D).unwrap_err();
        assert!(matches!(err, LayerError::Truncated { .. }), "{err}");
    }

    #[test]
    fn dot_dot_and_absolute_paths_stay_inside_the_root() {
        assert_eq!(normalize(b"../../etc/passwd"), b"etc/passwd");
        assert_eq!(normalize(b"/abs/./x/../y"), b"abs/y");
        assert_eq!(normalize(b"./"), b"");
        assert_eq!(normalize(b"a/b/../../.."), b"");
    }

    #[test]
    fn truncated_and_garbage_streams_name_the_layer() {
        let mut b = builder();
        file(&mut b, "f", &[7u8; 2000]);
        let tar = b.into_inner().unwrap();
        let err = index_tar(&tar[..1000], D).unwrap_err().to_string();
        assert!(err.contains(D) && err.contains("truncated"), "{err}");
        let err = index_tar(&[0x41u8; 1024][..], D).unwrap_err().to_string();
        assert!(err.contains(D) && err.contains("not a valid tar"), "{err}");
    }

    #[test]
    fn compression_is_sniffed_before_trusting_the_media_type() {
        let gz = [0x1f, 0x8b, 8, 0];
        assert_eq!(
            detect(D, "application/vnd.oci.image.layer.v1.tar", &gz).unwrap(),
            Compression::Gzip
        );
        let zst = [0x28, 0xb5, 0x2f, 0xfd];
        assert_eq!(
            detect(D, "application/vnd.oci.image.layer.v1.tar+gzip", &zst).unwrap(),
            Compression::Zstd
        );
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert_eq!(
            detect(D, "application/octet-stream", &tar).unwrap(),
            Compression::None
        );
        assert!(detect(D, "application/x-unknown", b"garbage").is_err());
    }

    #[test]
    fn global_pax_headers_are_ignored() {
        let mut b = builder();
        let mut h = header(tar::EntryType::XGlobalHeader, 0o644, 0);
        let rec = b"20 comment=globals!\n";
        h.set_size(rec.len() as u64);
        b.append_data(&mut h, "pax_global_header", &rec[..])
            .unwrap();
        file(&mut b, "f", b"x");
        let idx = index(&b.into_inner().unwrap());
        assert_eq!(idx.entries.len(), 1);
        assert_eq!(idx.entries[0].path, b"f");
    }
}

/// Counts the heap bytes a thread holds, so tests can bound what the reader
/// allocates for hostile input.
#[cfg(test)]
mod alloc_meter {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<usize> = const { Cell::new(0) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    fn add(n: usize) {
        let _ = LIVE.try_with(|c| {
            let v = c.get() + n;
            c.set(v);
            let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
        });
    }

    fn sub(n: usize) {
        let _ = LIVE.try_with(|c| c.set(c.get().saturating_sub(n)));
    }

    struct Meter;

    // SAFETY: every call forwards to the system allocator unchanged.
    unsafe impl GlobalAlloc for Meter {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(l) };
            if !p.is_null() {
                add(l.size());
            }
            p
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(l) };
            if !p.is_null() {
                add(l.size());
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            unsafe { System.dealloc(p, l) };
            sub(l.size());
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            let q = unsafe { System.realloc(p, l, new) };
            if !q.is_null() {
                sub(l.size());
                add(new);
            }
            q
        }
    }

    #[global_allocator]
    static METER: Meter = Meter;

    /// What `f` returns, and the most heap bytes this thread held during it
    /// beyond what it held before.
    pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let out = f();
        (out, PEAK.with(Cell::get) - base)
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Well-formed archives to mutate: every sparse encoding, long names,
    /// links and PAX records, so mutations reach deep into the reader.
    fn seeds() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for name in [
            "sparse-formats.tar",
            "gnu-multi-hdrs.tar",
            "pax-multi-hdrs.tar",
            "hdr-only.tar",
            "pax.tar",
            "invalid-go17.tar",
            "gnu-sparse-big.tar",
            "xattrs.tar",
        ] {
            if let Ok(b) = std::fs::read(format!("{}/{name}", tests::GO_TESTDATA)) {
                out.push(b);
            }
        }
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("{}/../../x", "d".repeat(120)), &b"abc"[..])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        b.append_link(&mut h, "hl", "../../etc/passwd").unwrap();
        out.push(b.into_inner().unwrap());
        out
    }

    fn fix_checksums(tar: &mut [u8]) {
        for block in tar.chunks_exact_mut(BLOCK) {
            block[148..156].fill(b' ');
            let sum: u32 = block.iter().map(|&c| c as u32).sum();
            block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        }
    }

    fn clean(path: &[u8]) -> bool {
        path.is_empty()
            || path
                .split(|&b| b == b'/')
                .all(|c| !c.is_empty() && c != b"." && c != b"..")
    }

    fn check(tar: &[u8]) {
        let (res, peak) = alloc_meter::peak_during(|| index_tar(tar, "sha256:p"));
        // Proportional to the input, plus a little: no header can make the
        // reader reserve memory for bytes that never arrive.
        let bound = 64 * tar.len() + (256 << 10);
        assert!(peak <= bound, "{peak} bytes for {} input bytes", tar.len());
        let Ok(idx) = res else { return };
        for e in &idx.entries {
            assert!(clean(&e.path), "path {:?} leaves the root", e.path);
            if e.kind == EntryKind::Hardlink {
                assert!(clean(e.link.as_deref().unwrap_or_default()), "{:?}", e.link);
            }
            let Some(segs) = &e.sparse else { continue };
            let mut end = 0;
            for s in segs.iter() {
                assert!(s.logical >= end && s.logical + s.len <= e.size, "{segs:?}");
                end = s.logical + s.len;
            }
            let mut read_at = |o: u64, b: &mut [u8]| {
                let o = (o as usize).min(tar.len());
                let n = b.len().min(tar.len() - o);
                b[..n].copy_from_slice(&tar[o..o + n]);
                Ok(n)
            };
            let mut buf = [0u8; 300];
            for pos in [0, e.size / 2, e.size.saturating_sub(100)] {
                let n = read_file(&mut read_at, e.offset, e.size, Some(segs), pos, &mut buf);
                let n = n.expect("data the index accepted is in the tar");
                assert_eq!(n as u64, (e.size - pos).min(300));
            }
        }
    }

    #[test]
    fn an_extension_header_that_lies_about_its_size_costs_only_what_arrives() {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(EXTENSION_MAX);
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend_from_slice(&[b'x'; 1024]);
        let (res, peak) = alloc_meter::peak_during(|| index_tar(&tar[..], "sha256:p"));
        assert!(matches!(res, Err(LayerError::Truncated { .. })), "{res:?}");
        assert!(peak > 0 && peak < 64 << 10, "{peak} bytes");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_or_allocate_beyond_a_bound(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            fix in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if fix {
                fix_checksums(&mut bytes);
            }
            check(&bytes);
        }

        #[test]
        fn mutated_archives_never_panic_escape_the_root_or_allocate_beyond_a_bound(
            seed in any::<prop::sample::Index>(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
            cut in any::<prop::sample::Index>(),
            fix in any::<bool>(),
        ) {
            let seeds = seeds();
            let mut tar = seeds[seed.index(seeds.len())].clone();
            for (at, byte) in edits {
                let i = at.index(tar.len());
                tar[i] = byte;
            }
            if fix {
                fix_checksums(&mut tar);
            }
            let keep = cut.index(tar.len() + 1).max(tar.len() / 2);
            tar.truncate(keep);
            check(&tar);
        }
    }
}
