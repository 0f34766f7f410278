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

mod compare;
mod header;
mod index;
pub mod toc;
pub mod zran;

pub use compare::{Difference, first_difference};
use header::*;
pub use index::*;

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
    #[error("layer {digest}")]
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

/// A section of a file, read with `pread`; a file that ends before the
/// section does is an error. Borrowed or shared, as the caller holds it.
pub(crate) struct Section<F> {
    pub(crate) file: F,
    pub(crate) pos: u64,
    pub(crate) end: u64,
}

impl<F: std::borrow::Borrow<std::fs::File>> Read for Section<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.end - self.pos).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n =
            std::os::unix::fs::FileExt::read_at(self.file.borrow(), &mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside the member",
            ));
        }
        self.pos += n as u64;
        Ok(n)
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
