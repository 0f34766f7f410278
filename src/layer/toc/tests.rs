//! Synthetic eStargz and zstd:chunked blobs framed as their producers frame
//! them (the real producers' output is checked in `tests/toc.rs`), and
//! hostile TOCs.

use std::io::Write;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::builder::rfc3339_seconds;
use super::*;

const LAYER: &str = "sha256:feedface";

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The footer exactly as stargz-snapshotter's `gzipFooterBytes` writes it.
fn footer(off: u64) -> Vec<u8> {
    let mut b = vec![
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 26, 0, b'S', b'G', 22, 0,
    ];
    b.extend_from_slice(format!("{off:016x}STARGZ").as_bytes());
    b.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    b.extend_from_slice(&[0; 8]);
    b
}

/// A file's content split into chunks of `chunk` bytes.
struct File<'a> {
    name: &'a str,
    data: &'a [u8],
    chunk: usize,
}

/// An eStargz blob: a leading member (where the first tar header would be),
/// one member per chunk, then the TOC member and the footer. Returns the
/// blob, the TOC range's bytes and the TOC JSON.
fn estargz_blob(files: &[File], extra: &[Value]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut blob = gz(b"headers");
    let mut entries = vec![json!({"name": "./", "type": "dir", "mode": 0o40755})];
    entries.extend_from_slice(extra);
    for f in files {
        let mut e = json!({"name": f.name, "type": "reg", "size": f.data.len(), "mode": 0o644,
            "modtime": "2020-09-13T12:26:40Z", "digest": sha(f.data)});
        for (i, c) in f.data.chunks(f.chunk).enumerate() {
            if i > 0 {
                e = json!({"name": f.name, "type": "chunk"});
            }
            e["offset"] = blob.len().into();
            e["chunkOffset"] = (i * f.chunk).into();
            if c.len() == f.chunk {
                e["chunkSize"] = c.len().into();
            }
            e["chunkDigest"] = sha(c).into();
            blob.extend(gz(c));
            entries.push(e.clone());
        }
    }
    let toc = serde_json::to_vec(&json!({"version": 1, "entries": entries})).unwrap();
    let off = blob.len();
    let member = estargz_toc_member(&toc);
    blob.extend(&member);
    blob.extend(footer(off as u64));
    (blob, member, toc)
}

fn estargz_toc_member(toc: &[u8]) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(toc.len() as u64);
    h.set_mode(0o644);
    t.append_data(&mut h, "stargz.index.json", toc).unwrap();
    gz(&t.into_inner().unwrap())
}

/// A zstd:chunked blob: one frame per chunk (a one-chunk file carries no
/// chunk fields), then the manifest frame. Returns blob, manifest range.
fn zstd_blob(files: &[File]) -> (Vec<u8>, std::ops::Range<usize>) {
    let mut blob = zstd::encode_all(&b"headers"[..], 1).unwrap();
    let mut entries = Vec::new();
    for f in files {
        let mut main = json!({"name": f.name, "type": "reg", "size": f.data.len(),
            "modtime": "2020-09-13T12:26:40.5+02:00", "digest": sha(f.data)});
        let chunks: Vec<&[u8]> = f.data.chunks(f.chunk).collect();
        let mut es = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let mut e = if i == 0 {
                main.clone()
            } else {
                json!({"name": f.name, "type": "chunk", "chunkOffset": i * f.chunk})
            };
            let off = blob.len();
            blob.extend(zstd::encode_all(*c, 1).unwrap());
            if i == 0 {
                main["offset"] = off.into();
                e["offset"] = off.into();
            }
            if chunks.len() > 1 {
                e["offset"] = off.into();
                e["chunkSize"] = c.len().into();
                e["chunkDigest"] = sha(c).into();
            }
            es.push(e);
        }
        if !es.is_empty() {
            es[0]["endOffset"] = blob.len().into();
        } else {
            es.push(main);
        }
        entries.extend(es);
    }
    let toc = serde_json::to_vec(&json!({"version": 1, "entries": entries})).unwrap();
    let m = zstd::encode_all(&toc[..], 3).unwrap();
    blob.extend([0x50, 0x2a, 0x4d, 0x18]);
    blob.extend((m.len() as u32).to_le_bytes());
    let start = blob.len();
    blob.extend(&m);
    (blob, start..start + m.len())
}

fn rebuild(t: &TocLayer, blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in &t.chunks {
        assert_eq!(c.start, out.len() as u64);
        let comp = &blob[c.coff as usize..(c.coff + c.clen) as usize];
        out.extend(decode_chunk(t, c, comp).unwrap());
    }
    out
}

fn big(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn estargz_chunks_rebuild_files_laid_out_back_to_back() {
    let (a, b) = (big(10_000), b"small".to_vec());
    let files = [
        File {
            name: "./a",
            data: &a,
            chunk: 4096,
        },
        File {
            name: "b",
            data: &b,
            chunk: 4096,
        },
    ];
    let (blob, member, toc) = estargz_blob(&files, &[]);
    let t = parse(
        TocKind::Estargz,
        &member,
        Some(&sha(&toc)),
        blob.len() as u64,
        LAYER,
    )
    .unwrap();
    assert_eq!(t.chunks.len(), 4);
    let paths: Vec<&[u8]> = t.index.entries.iter().map(|e| e.path.as_slice()).collect();
    assert_eq!(paths, [&b""[..], b"a", b"b"]);
    let e = &t.index.entries[1];
    assert_eq!(
        (e.mode, e.mtime, e.offset, e.size),
        (0o644, 1_600_000_000, 0, 10_000)
    );
    assert_eq!(t.index.entries[2].offset, 10_000);
    assert_eq!(rebuild(&t, &blob), [a, b].concat());
    assert_eq!(t.prefetch_until, None);
}

#[test]
fn estargz_hides_its_own_files_and_reports_the_prefetch_landmark() {
    let one = [0xfu8];
    let files = [
        File {
            name: "first",
            data: b"0123",
            chunk: 10,
        },
        File {
            name: ".prefetch.landmark",
            data: &one,
            chunk: 10,
        },
        File {
            name: "later",
            data: b"abcdef",
            chunk: 10,
        },
    ];
    let (blob, member, _) = estargz_blob(&files, &[]);
    let t = parse(TocKind::Estargz, &member, None, blob.len() as u64, LAYER).unwrap();
    let paths: Vec<&[u8]> = t.index.entries.iter().map(|e| e.path.as_slice()).collect();
    assert_eq!(paths, [&b""[..], b"first", b"later"]);
    assert_eq!(t.prefetch_until, Some(4));
    assert_eq!(rebuild(&t, &blob), b"0123abcdef");
    // The landmark's member still bounds the chunk before it.
    assert!(t.chunks[0].coff + t.chunks[0].clen <= t.chunks[1].coff);
}

#[test]
fn estargz_entries_carry_the_tar_attributes() {
    let extra = [
        json!({"name": "l", "type": "hardlink", "linkName": "./dir/../f"}),
        json!({"name": "s", "type": "symlink", "linkName": "../x/", "mode": 0o644}),
        json!({"name": "c", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 0o20666,
               "uid": 7, "gid": 8}),
        json!({"name": "x", "type": "reg", "xattrs": {"user.b": "Ag==", "user.a": "AQ==",
               "user.empty": ""}, "mode": 0o104755}),
    ];
    let (blob, member, _) = estargz_blob(&[], &extra);
    let t = parse(TocKind::Estargz, &member, None, blob.len() as u64, LAYER).unwrap();
    let e = &t.index.entries;
    assert_eq!(
        (e[1].kind, e[1].link.as_deref()),
        (EntryKind::Hardlink, Some(&b"f"[..]))
    );
    assert_eq!(
        (e[2].mode, e[2].link.as_deref()),
        (0o777, Some(&b"../x/"[..]))
    );
    assert_eq!(
        (e[3].rdev, e[3].mode, e[3].uid, e[3].gid),
        ((1, 3), 0o666, 7, 8)
    );
    assert_eq!(e[4].mode, 0o4755);
    assert_eq!(
        e[4].xattrs,
        [
            ("user.a".to_string(), vec![1]),
            ("user.b".to_string(), vec![2])
        ]
    );
    assert!(t.chunks.is_empty());
}

#[test]
fn estargz_toc_with_a_wrong_digest_is_refused() {
    let (blob, member, _) = estargz_blob(
        &[File {
            name: "a",
            data: b"x",
            chunk: 4,
        }],
        &[],
    );
    let e = parse(
        TocKind::Estargz,
        &member,
        Some(&sha(b"other")),
        blob.len() as u64,
        LAYER,
    );
    let e = e.unwrap_err();
    assert!(matches!(e, TocError::Digest { .. }));
    assert!(e.to_string().contains(LAYER));
}

#[test]
fn a_flipped_byte_in_a_chunk_is_refused_naming_the_file() {
    let a = big(5000);
    let (blob, member, _) = estargz_blob(
        &[File {
            name: "dir/a",
            data: &a,
            chunk: 2048,
        }],
        &[],
    );
    let t = parse(TocKind::Estargz, &member, None, blob.len() as u64, LAYER).unwrap();
    let c = &t.chunks[1];
    let mut comp = blob[c.coff as usize..(c.coff + c.clen) as usize].to_vec();
    comp[12] ^= 1;
    let e = decode_chunk(&t, c, &comp).unwrap_err().to_string();
    assert!(
        e.contains(LAYER) && e.contains("dir/a") && e.contains("2048"),
        "{e}"
    );
    // A short read is refused too.
    let e = decode_chunk(&t, c, &comp[..comp.len() - 1]).unwrap_err();
    assert!(matches!(e, TocError::Chunk { .. }));
}

#[test]
fn zstd_chunked_chunks_and_single_frame_files_rebuild() {
    let (a, b) = (big(9000), b"one frame".to_vec());
    let files = [
        File {
            name: "a",
            data: &a,
            chunk: 4000,
        },
        File {
            name: "b",
            data: &b,
            chunk: 100,
        },
        File {
            name: "empty",
            data: b"",
            chunk: 100,
        },
    ];
    let (blob, r) = zstd_blob(&files);
    let m = &blob[r.clone()];
    let t = parse(
        TocKind::ZstdChunked,
        m,
        Some(&sha(m)),
        blob.len() as u64,
        LAYER,
    )
    .unwrap();
    assert_eq!(t.chunks.len(), 4);
    // b's only chunk is pinned by the file digest.
    assert_eq!(t.chunks[3].digest[..], Sha256::digest(&b)[..]);
    assert_eq!(rebuild(&t, &blob), [a, b].concat());
    // 12:26:40.5 at +02:00, floored.
    assert_eq!(t.index.entries[0].mtime, 1_600_000_000 - 7200);
    assert_eq!(t.index.entries[2].size, 0);
}

#[test]
fn zstd_chunked_manifest_with_a_wrong_checksum_is_refused() {
    let (blob, r) = zstd_blob(&[File {
        name: "a",
        data: b"x",
        chunk: 4,
    }]);
    let mut m = blob[r].to_vec();
    let good = sha(&m);
    m[5] ^= 1;
    let e = parse(
        TocKind::ZstdChunked,
        &m,
        Some(&good),
        blob.len() as u64,
        LAYER,
    )
    .unwrap_err();
    assert!(matches!(e, TocError::Digest { .. }));
}

fn zstd_toc(entries: Value) -> Vec<u8> {
    zstd::encode_all(
        &serde_json::to_vec(&json!({"version": 1, "entries": entries})).unwrap()[..],
        1,
    )
    .unwrap()
}

fn refused(entries: Value, blob_size: u64) -> String {
    let m = zstd_toc(entries);
    parse(TocKind::ZstdChunked, &m, None, blob_size, LAYER)
        .unwrap_err()
        .to_string()
}

#[test]
fn hostile_tocs_are_refused_with_the_reason() {
    let reg = |size: u64, off: u64, end: u64| {
        json!({"name": "f", "type": "reg", "size": size, "offset": off, "endOffset": end,
               "digest": sha(b"")})
    };
    // Past the blob.
    let e = refused(json!([reg(10, 100, 200)]), 150);
    assert!(e.contains("outside the blob") && e.contains("f"), "{e}");
    // A frame that ends before it starts.
    let e = refused(json!([reg(10, 100, 100)]), 1000);
    assert!(e.contains("outside the blob"), "{e}");
    // Larger than a chunk may be.
    let e = refused(json!([reg(CHUNK_MAX + 1, 100, 200)]), 1000);
    assert!(e.contains("exceeds"), "{e}");
    // Chunks that leave a gap.
    let e = refused(
        json!([
            {"name": "f", "type": "reg", "size": 10, "offset": 10, "endOffset": 40,
             "chunkSize": 4, "chunkDigest": sha(b"")},
            {"name": "f", "type": "chunk", "offset": 20, "chunkOffset": 5, "chunkSize": 5,
             "chunkDigest": sha(b"")},
        ]),
        1000,
    );
    assert!(e.contains("expected"), "{e}");
    // Chunks that do not reach the end of the file.
    let e = refused(
        json!([
            {"name": "f", "type": "reg", "size": 10, "offset": 10, "endOffset": 40,
             "chunkSize": 4, "chunkDigest": sha(b"")},
            {"name": "f", "type": "chunk", "offset": 20, "chunkOffset": 4, "chunkSize": 4,
             "chunkDigest": sha(b"")},
        ]),
        1000,
    );
    assert!(e.contains("cover 8 bytes"), "{e}");
    // Several chunks and no chunk digests.
    let e = refused(
        json!([
            {"name": "f", "type": "reg", "size": 8, "offset": 10, "endOffset": 40,
             "chunkSize": 4, "digest": sha(b"")},
            {"name": "f", "type": "chunk", "offset": 20, "chunkOffset": 4, "chunkSize": 4},
        ]),
        1000,
    );
    assert!(e.contains("without a digest"), "{e}");
    let e = refused(json!([{"name": "f", "type": "chunk", "offset": 1}]), 1000);
    assert!(e.contains("follows no regular file"), "{e}");
    let e = refused(json!([{"name": "f", "type": "socket"}]), 1000);
    assert!(e.contains("unknown entry type"), "{e}");
    let e = refused(json!([{"name": "f", "type": "reg", "size": -1}]), 1000);
    assert!(e.contains("negative size"), "{e}");
    let e = refused(
        json!([{"name": "f", "type": "dir", "modtime": "yesterday"}]),
        1000,
    );
    assert!(e.contains("modtime"), "{e}");
    let e = refused(
        json!([{"name": "f", "type": "dir", "xattrs": {"user.a": "%%"}}]),
        1000,
    );
    assert!(e.contains("base64"), "{e}");
    let e = refused(json!([{"name": "bad-\u{fffd}", "type": "dir"}]), 1000);
    assert!(e.contains("not UTF-8"), "{e}");
    let e = refused(json!({"not": "a list"}), 1000);
    assert!(e.contains("invalid JSON"), "{e}");
    let m = zstd::encode_all(&br#"{"version":2,"entries":[]}"#[..], 1).unwrap();
    let e = parse(TocKind::ZstdChunked, &m, None, 10, LAYER).unwrap_err();
    assert!(e.to_string().contains("version"), "{e}");
}

#[test]
fn a_toc_over_the_size_limit_is_refused_without_reading_it_all() {
    let mut json = b"{\"version\":1,\"entries\":[]}".to_vec();
    json.resize(TOC_MAX as usize + 10, b' ');
    let m = zstd::encode_all(&json[..], 1).unwrap();
    let e = parse(TocKind::ZstdChunked, &m, None, 10, LAYER).unwrap_err();
    assert!(matches!(e, TocError::TooLarge { .. }), "{e}");
    // An eStargz TOC whose tar header claims more.
    let mut t = tar::Header::new_ustar();
    t.set_path("stargz.index.json").unwrap();
    t.set_size(TOC_MAX + 1);
    t.set_cksum();
    let member = gz(t.as_bytes());
    let e = parse(TocKind::Estargz, &member, None, 10_000, LAYER).unwrap_err();
    assert!(matches!(e, TocError::TooLarge { .. }), "{e}");
}

#[test]
fn a_toc_with_too_many_entries_is_refused() {
    let mut json = b"{\"version\":1,\"entries\":[".to_vec();
    for i in 0..=ENTRIES_MAX {
        if i > 0 {
            json.push(b',');
        }
        json.extend_from_slice(b"{\"type\":\"dir\"}");
    }
    json.extend_from_slice(b"]}");
    let m = zstd::encode_all(&json[..], 1).unwrap();
    let e = parse(TocKind::ZstdChunked, &m, None, 10, LAYER).unwrap_err();
    assert!(matches!(e, TocError::TooManyEntries { .. }), "{e}");
}

#[test]
fn the_estargz_footer_gives_the_toc_offset() {
    assert_eq!(estargz_footer(&footer(0x1234)).unwrap(), 0x1234);
    assert_eq!(footer(0).len() as u64, ESTARGZ_FOOTER);
    // The legacy 47-byte footer and a plain gzip trailer are not footers.
    assert!(estargz_footer(&footer(1)[..47]).is_err());
    let mut f = footer(1);
    f[36] = b'X';
    assert!(estargz_footer(&f).is_err());
    let mut f = footer(1);
    f[12..28].copy_from_slice(b"zz00000000000000");
    assert!(estargz_footer(&f).is_err());
}

#[test]
fn locate_reads_both_generations_of_zstd_chunked_annotations() {
    let ann = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let want = Some(TocLocation::Range {
        kind: TocKind::ZstdChunked,
        offset: 10,
        len: 20,
        uncompressed_len: 30,
        digest: "sha256:ab".into(),
        tar_split: None,
    });
    let zstd = "application/vnd.oci.image.layer.v1.tar+zstd";
    for (p, c) in [
        (ZSTD_CHUNKED_POSITION, ZSTD_CHUNKED_CHECKSUM),
        (ZSTD_CHUNKED_POSITION_OLD, ZSTD_CHUNKED_CHECKSUM_OLD),
    ] {
        assert_eq!(
            locate(zstd, &ann(&[(p, "10:20:30:1"), (c, "sha256:ab")])),
            want
        );
        assert_eq!(
            locate(zstd, &ann(&[(p, "10:20:30:2"), (c, "sha256:ab")])),
            None
        );
        assert_eq!(
            locate(zstd, &ann(&[(p, "10:20:30"), (c, "sha256:ab")])),
            None
        );
        assert_eq!(locate(zstd, &ann(&[(p, "10:20:30:1")])), None);
    }
    let gzip = "application/vnd.oci.image.layer.v1.tar+gzip";
    assert_eq!(
        locate(gzip, &ann(&[(ESTARGZ_TOC_DIGEST, "sha256:cd")])),
        Some(TocLocation::EstargzFooter {
            digest: Some("sha256:cd".into())
        })
    );
    assert_eq!(
        locate(
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            &ann(&[])
        ),
        Some(TocLocation::EstargzFooter { digest: None })
    );
    assert_eq!(
        locate("application/vnd.oci.image.layer.v1.tar", &ann(&[])),
        None
    );
}

#[test]
fn rfc3339_times_become_floored_epoch_seconds() {
    assert_eq!(rfc3339_seconds("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(rfc3339_seconds("2020-09-13T12:26:40Z"), Some(1_600_000_000));
    assert_eq!(
        rfc3339_seconds("2020-09-13T14:26:40.999+02:00"),
        Some(1_600_000_000)
    );
    assert_eq!(rfc3339_seconds("1969-12-31T23:59:59.5Z"), Some(-1));
    assert_eq!(rfc3339_seconds("2000-02-29T00:00:00Z"), Some(951_782_400));
    for bad in [
        "",
        "2020-09-13 12:26:40Z",
        "2020-13-01T00:00:00Z",
        "2020-09-13T12:26:40",
    ] {
        assert_eq!(rfc3339_seconds(bad), None, "{bad}");
    }
}

proptest! {
    #[test]
    fn any_footer_offset_round_trips(off in 0u64..=i64::MAX as u64) {
        prop_assert_eq!(estargz_footer(&footer(off)).unwrap(), off);
    }

    #[test]
    fn arbitrary_footer_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = estargz_footer(&b);
    }

    #[test]
    fn a_footer_with_any_byte_changed_is_refused_or_still_reads(
        off in 0u64..1 << 40, at in 0usize..51, x in 1u8..=255,
    ) {
        let mut f = footer(off);
        f[at] ^= x;
        // Only bytes the gzip header leaves free (MTIME, XFL, OS) and the hex
        // digits may change and still parse.
        if let Ok(v) = estargz_footer(&f) {
            prop_assert!((4..10).contains(&at) || (16..32).contains(&at), "{at}");
            prop_assert!((16..32).contains(&at) || v == off);
        }
    }

    /// Random TOCs (offsets, sizes, chunk splits, types) never panic, and
    /// whatever is accepted keeps every chunk inside the blob and tiles files.
    #[test]
    fn hostile_tocs_never_panic_and_accepted_ones_are_bounded(
        raw in proptest::collection::vec(
            (0usize..4, 0i64..3000, -1i64..3000, 0i64..3000, 0i64..3000, 0i64..100), 0..12),
        blob_size in 0u64..4000,
        estargz in any::<bool>(),
    ) {
        let types = ["reg", "chunk", "dir", "hardlink"];
        let entries: Vec<Value> = raw.iter().map(|&(t, size, off, end, cs, co)| json!({
            "name": "f", "type": types[t], "size": size, "offset": off, "endOffset": end,
            "chunkSize": cs, "chunkOffset": co, "chunkDigest": sha(b""), "digest": sha(b""),
            "innerOffset": co % 3,
        })).collect();
        let toc = serde_json::to_vec(&json!({"version": 1, "entries": entries})).unwrap();
        let (kind, bytes) = if estargz {
            (TocKind::Estargz, estargz_toc_member(&toc))
        } else {
            (TocKind::ZstdChunked, zstd::encode_all(&toc[..], 1).unwrap())
        };
        if let Ok(t) = parse(kind, &bytes, None, blob_size, LAYER) {
            let mut end = 0;
            for c in &t.chunks {
                prop_assert!(c.coff > 0 && c.clen > 0 && c.coff + c.clen <= blob_size);
                prop_assert!(c.start >= end);
                end = c.start + c.len;
            }
            for e in &t.index.entries {
                let covered: u64 = t.chunks.iter()
                    .filter(|c| c.start >= e.offset && c.start < e.offset + e.size)
                    .map(|c| c.len).sum();
                if e.kind == EntryKind::File {
                    prop_assert_eq!(covered, e.size);
                }
            }
        }
    }
}
