//! One layer's tar stream: how it is compressed, and the index of its entries
//! (attributes, link targets, xattrs, and where each file's bytes start in the
//! uncompressed tar, so a read is one `read_at`).
//!
//! The framing is parsed here rather than with `tar::Archive` because hostile
//! layers need what that reader does not give: a cap on extension headers,
//! refusal of a GNU long name combined with a PAX path, and refusal of sparse
//! files (which `tar` 0.4.46 does not expand in the PAX 1.0 form). Header
//! fields are still decoded by `tar::Header` and PAX records by
//! `tar::PaxExtensions`.

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
}

impl Entry {
    /// A directory no layer lists but whose children exist: mode 0755, owned
    /// by root, time zero (as runtimes create missing parents).
    pub fn implicit_dir(path: &[u8]) -> Entry {
        Entry {
            path: path.to_vec(),
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            link: None,
            rdev: (0, 0),
            xattrs: Vec::new(),
            offset: 0,
        }
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

/// Extension data gathered for the next real entry.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

/// Reads a whole tar stream and indexes it. Reads to the end of `reader` so
/// that wrapping readers (hashes, digest checks) see every byte.
pub fn index_tar<R: Read>(reader: R, digest: &str) -> Result<LayerIndex, LayerError> {
    let mut r = Counting {
        inner: reader,
        pos: 0,
    };
    let io_err = |source: io::Error| LayerError::Io {
        digest: digest.to_string(),
        source,
    };
    let mut entries = Vec::new();
    let mut pending = Pending::default();
    let mut block = [0u8; BLOCK];
    let mut zero_blocks = 0;
    loop {
        let start = r.pos;
        let n = r.fill(&mut block).map_err(io_err)?;
        if n == 0 && start == 0 {
            break; // an empty layer
        }
        if n == 0 && zero_blocks > 0 {
            break;
        }
        if n < BLOCK {
            return Err(LayerError::Truncated {
                digest: digest.to_string(),
                offset: r.pos,
            });
        }
        if block.iter().all(|&b| b == 0) {
            zero_blocks += 1;
            if zero_blocks == 2 {
                break;
            }
            continue;
        }
        zero_blocks = 0;
        let header = tar::Header::from_byte_slice(&block);
        let not_tar = |detail: String| LayerError::NotTar {
            digest: digest.to_string(),
            offset: start,
            detail,
        };
        let stored = header.cksum().map_err(|e| not_tar(e.to_string()))?;
        let computed: u32 = block
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    b' ' as u32
                } else {
                    b as u32
                }
            })
            .sum();
        if stored != computed {
            return Err(not_tar("header checksum mismatch".into()));
        }
        let size = header.entry_size().map_err(|e| not_tar(e.to_string()))?;
        let etype = header.entry_type();
        let is_ext = etype.is_gnu_longname()
            || etype.is_gnu_longlink()
            || etype.is_pax_local_extensions()
            || etype.is_pax_global_extensions();
        if is_ext {
            if size > EXTENSION_MAX {
                return Err(LayerError::Refused {
                    digest: digest.to_string(),
                    path: String::from_utf8_lossy(&header.path_bytes()).into_owned(),
                    detail: format!(
                        "extension header of {size} bytes exceeds the {EXTENSION_MAX} byte limit"
                    ),
                });
            }
            let mut data = vec![0u8; padded(size) as usize];
            if r.fill(&mut data).map_err(io_err)? < data.len() {
                return Err(LayerError::Truncated {
                    digest: digest.to_string(),
                    offset: r.pos,
                });
            }
            data.truncate(size as usize);
            let slot = if etype.is_gnu_longname() {
                &mut pending.long_name
            } else if etype.is_gnu_longlink() {
                &mut pending.long_link
            } else if etype.is_pax_local_extensions() {
                &mut pending.pax
            } else {
                // Global PAX headers: ignored, as docker and containerd ignore them.
                continue;
            };
            if slot.is_some() {
                return Err(not_tar(
                    "two extension headers of one kind for the same entry".into(),
                ));
            }
            // Long names end in NUL.
            if !etype.is_pax_local_extensions() {
                while data.last() == Some(&0) {
                    data.pop();
                }
            }
            *slot = Some(data);
            continue;
        }
        let ext = std::mem::take(&mut pending);
        let data_offset = r.pos;
        let (entry, stored) = build_entry(header, ext, size, data_offset, digest)?;
        // Skip what is stored, even for types that carry no file (some writers
        // give hardlinks a size).
        let want = padded(stored);
        if r.skip(want).map_err(io_err)? < want {
            return Err(LayerError::Truncated {
                digest: digest.to_string(),
                offset: r.pos,
            });
        }
        if let Some(e) = entry {
            entries.push(e);
        }
    }
    // Whatever follows the end-of-archive marker is read so the layer's
    // digest covers the whole stream.
    r.skip(u64::MAX).map_err(io_err)?;
    Ok(LayerIndex { entries })
}

fn build_entry(
    header: &tar::Header,
    ext: Pending,
    size: u64,
    offset: u64,
    digest: &str,
) -> Result<(Option<Entry>, u64), LayerError> {
    let raw_path = header.path_bytes().into_owned();
    let shown = String::from_utf8_lossy(&raw_path).into_owned();
    let refuse = |detail: &str| LayerError::Refused {
        digest: digest.to_string(),
        path: shown.clone(),
        detail: detail.to_string(),
    };
    let bad = |e: io::Error| refuse(&format!("bad header field: {e}"));
    let mut path = raw_path;
    let mut link = header.link_name_bytes().map(|l| l.into_owned());
    let mut size = size;
    // Some writers leave numeric fields empty; tar(1) reads those as zero.
    let mut mtime = header.mtime().unwrap_or(0) as i64;
    let mut uid = header.uid().unwrap_or(0);
    let mut gid = header.gid().unwrap_or(0);
    let mut xattrs = Vec::new();
    let mut pax_path = false;
    if let Some(pax) = &ext.pax {
        for rec in tar::PaxExtensions::new(pax) {
            let rec = rec.map_err(|e| refuse(&format!("malformed PAX header: {e}")))?;
            let key = rec.key_bytes();
            let value = rec.value_bytes();
            let text = || String::from_utf8_lossy(value).into_owned();
            match key {
                b"path" => {
                    path = value.to_vec();
                    pax_path = true;
                }
                b"linkpath" => link = Some(value.to_vec()),
                b"size" => {
                    size = text()
                        .parse()
                        .map_err(|_| refuse("PAX size is not a number"))?
                }
                b"uid" => {
                    uid = text()
                        .parse()
                        .map_err(|_| refuse("PAX uid is not a number"))?
                }
                b"gid" => {
                    gid = text()
                        .parse()
                        .map_err(|_| refuse("PAX gid is not a number"))?
                }
                b"mtime" => {
                    let t = text();
                    let whole = t.split('.').next().unwrap_or("0");
                    mtime = whole
                        .parse()
                        .map_err(|_| refuse("PAX mtime is not a number"))?;
                }
                k if k.starts_with(b"SCHILY.xattr.") => {
                    let name = String::from_utf8_lossy(&k[13..]).into_owned();
                    xattrs.push((name, value.to_vec()));
                }
                k if k.starts_with(b"GNU.sparse.") => {
                    return Err(refuse("sparse files (PAX GNU.sparse) are not supported"));
                }
                _ => {}
            }
        }
    }
    if let Some(long) = ext.long_name {
        if pax_path {
            return Err(refuse(
                "both a GNU long name and a PAX path: ambiguous, refused",
            ));
        }
        path = long;
    }
    if let Some(long) = ext.long_link {
        link = Some(long);
    }
    let etype = header.entry_type();
    if etype.is_gnu_sparse() {
        return Err(refuse("sparse files (GNU format) are not supported"));
    }
    let path_str = String::from_utf8_lossy(&path).into_owned();
    let kind = if etype.is_dir() || (etype.is_file() && path.ends_with(b"/")) {
        EntryKind::Dir
    } else if etype.is_file() || etype.is_contiguous() {
        EntryKind::File
    } else if etype.is_symlink() {
        EntryKind::Symlink
    } else if etype.is_hard_link() {
        EntryKind::Hardlink
    } else if etype.is_character_special() {
        EntryKind::Char
    } else if etype.is_block_special() {
        EntryKind::Block
    } else if etype.is_fifo() {
        EntryKind::Fifo
    } else {
        // Other types (sockets are never in tars; vendor extensions) carry no file.
        tracing::debug!(
            "layer {digest}: skipping {path_str:?} of tar type {:?}",
            etype.as_byte() as char
        );
        return Ok((None, size));
    };
    let rdev = match kind {
        EntryKind::Char | EntryKind::Block => (
            header.device_major().map_err(bad)?.unwrap_or(0),
            header.device_minor().map_err(bad)?.unwrap_or(0),
        ),
        _ => (0, 0),
    };
    let link = match kind {
        EntryKind::Hardlink => Some(normalize(link.as_deref().unwrap_or_default())),
        EntryKind::Symlink => link,
        _ => None,
    };
    let entry = Entry {
        path: normalize(&path),
        kind,
        mode: header.mode().map_err(bad)? & 0o7777,
        uid: uid as u32,
        gid: gid as u32,
        size: if kind == EntryKind::File { size } else { 0 },
        mtime,
        link,
        rdev,
        xattrs,
        offset,
    };
    Ok((Some(entry), size))
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
            ],
            "short",
            b"abc",
        );
        let e = &index(&tar).entries[0];
        assert_eq!(e.path, b"pax/long/name");
        assert_eq!((e.uid, e.gid), (4_000_000, 77));
        assert_eq!(e.mtime, 1_700_000_000);
        assert_eq!(e.xattrs.len(), 2);
        assert_eq!(e.xattrs[0], ("user.comment".to_string(), b"hi".to_vec()));
    }

    #[test]
    fn gnu_long_name_with_pax_path_is_refused_as_ambiguous() {
        let mut b = builder();
        b.append_pax_extensions([("path", &b"from/pax"[..])])
            .unwrap();
        // The tar crate writes a GNU long-name entry for paths over 100 bytes.
        file(&mut b, &"g".repeat(150), b"x");
        let err = index_tar(&b.into_inner().unwrap()[..], D).unwrap_err();
        assert!(err.to_string().contains("ambiguous"), "{err}");
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

    #[test]
    fn pax_sparse_files_are_refused_naming_the_path() {
        let tar = pax_tar(
            &[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")],
            "sparse.img",
            b"x",
        );
        let err = index_tar(&tar[..], D).unwrap_err().to_string();
        assert!(
            err.contains("sparse") && err.contains("sparse.img"),
            "{err}"
        );
    }

    #[test]
    fn base256_sizes_are_read() {
        let mut h = header(tar::EntryType::Regular, 0o644, 0);
        // 9 GiB in GNU base-256: does not fit the 11 octal digits.
        let size: u64 = 9 << 30;
        let field = &mut h.as_gnu_mut().unwrap().size;
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
