//! TOC-based layers made by the real producers (ctr-remote for eStargz,
//! skopeo for zstd:chunked): the TOC, read through rimg's library, gives the
//! same entries as indexing the whole decompressed layer, its chunks decode to
//! every file's exact bytes, and tampering is refused.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::process::Command;

use common::image::{Compress, LayerBuilder, layer_blob, push_alpine, push_image};
use common::*;
use rimg::layer::toc::{self, TocError, TocKind, TocLayer, TocLocation};
use rimg::layer::{EntryKind, LayerIndex, index_tar};

const HIDDEN: [&[u8]; 3] = [
    b"stargz.index.json",
    b".prefetch.landmark",
    b".no.prefetch.landmark",
];

/// A layer blob of a converted image and its descriptor.
struct Layer {
    digest: String,
    media_type: String,
    annotations: BTreeMap<String, String>,
    blob: Vec<u8>,
}

fn layers(reg: &Registry, repo: &str, tag: &str) -> Vec<Layer> {
    let out = run_ok(Command::new("curl").args([
        "-sSf",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("{}/v2/{repo}/manifests/{tag}", reg.url()),
    ]));
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().unwrap().to_string();
            Layer {
                blob: std::fs::read(reg.blob_file(&digest)).unwrap(),
                media_type: l["mediaType"].as_str().unwrap().to_string(),
                annotations: l["annotations"]
                    .as_object()
                    .map(|a| {
                        a.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default(),
                digest,
            }
        })
        .collect()
}

/// Where the TOC bytes are and what pins them, as the lead's fetcher will do it.
fn toc_of(l: &Layer) -> (TocKind, Vec<u8>, Option<String>) {
    match toc::locate(&l.media_type, &l.annotations).expect("a TOC location") {
        TocLocation::Range {
            kind,
            offset,
            len,
            digest,
            ..
        } => (
            kind,
            l.blob[offset as usize..(offset + len) as usize].to_vec(),
            Some(digest),
        ),
        TocLocation::EstargzFooter { digest } => {
            let end = l.blob.len() - toc::ESTARGZ_FOOTER as usize;
            let off = toc::estargz_footer(&l.blob[end..]).unwrap() as usize;
            (TocKind::Estargz, l.blob[off..end].to_vec(), digest)
        }
    }
}

fn parse(l: &Layer) -> TocLayer {
    let (kind, bytes, digest) = toc_of(l);
    toc::parse(
        kind,
        &bytes,
        digest.as_deref(),
        l.blob.len() as u64,
        &l.digest,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn decompress(l: &Layer, kind: TocKind) -> Vec<u8> {
    let mut out = Vec::new();
    match kind {
        TocKind::Estargz => {
            flate2::read::MultiGzDecoder::new(&l.blob[..])
                .read_to_end(&mut out)
                .unwrap();
        }
        TocKind::ZstdChunked => {
            zstd::stream::read::Decoder::new(&l.blob[..])
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
        }
    }
    out
}

fn without_offsets(mut i: LayerIndex) -> LayerIndex {
    for e in &mut i.entries {
        e.offset = 0;
    }
    i
}

/// (a) the TOC's index is the tar's, (b) the chunks rebuild every file.
/// Returns the parsed layers for further checks.
fn check_image(reg: &Registry, repo: &str, tag: &str, want: TocKind) -> Vec<(Layer, TocLayer)> {
    let mut out = Vec::new();
    for l in layers(reg, repo, tag) {
        let t = parse(&l);
        assert_eq!(t.kind, want);
        let tar = decompress(&l, want);
        let mut from_tar = index_tar(&tar[..], &l.digest).unwrap();
        if want == TocKind::Estargz {
            from_tar
                .entries
                .retain(|e| !HIDDEN.contains(&e.path.as_slice()));
        }
        assert_eq!(
            without_offsets(t.index.clone()),
            without_offsets(from_tar.clone()),
            "layer {}",
            l.digest
        );
        // Chunks tile the virtual space in order.
        let mut end = 0;
        for c in &t.chunks {
            assert!(c.start >= end, "chunks overlap or are unsorted");
            end = c.start + c.len;
        }
        let total: u64 = t
            .index
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| e.size)
            .sum();
        let mut virt = vec![0u8; total as usize];
        for c in &t.chunks {
            let comp = &l.blob[c.coff as usize..(c.coff + c.clen) as usize];
            let data = toc::decode_chunk(&t, c, comp).unwrap_or_else(|e| panic!("{e}"));
            virt[c.start as usize..(c.start + c.len) as usize].copy_from_slice(&data);
        }
        for (e, f) in t.index.entries.iter().zip(&from_tar.entries) {
            if e.kind == EntryKind::File {
                assert_eq!(
                    &virt[e.offset as usize..(e.offset + e.size) as usize],
                    &tar[f.offset as usize..(f.offset + f.size) as usize],
                    "{}",
                    String::from_utf8_lossy(&e.path)
                );
            }
        }
        out.push((l, t));
    }
    out
}

/// (c) a flipped byte in a chunk, a TOC with a wrong digest, and a chunk past
/// the blob's end are all refused.
fn check_tampering(l: &Layer, t: &TocLayer) {
    let c = t.chunks.iter().max_by_key(|c| c.len).expect("a chunk");
    let mut comp = l.blob[c.coff as usize..(c.coff + c.clen) as usize].to_vec();
    // Inside the compressed data proper (past gzip's 10-byte header).
    let at = match t.kind {
        TocKind::Estargz => 10,
        TocKind::ZstdChunked => comp.len() / 2,
    };
    comp[at] ^= 0x55;
    let e = toc::decode_chunk(t, c, &comp).unwrap_err();
    assert!(matches!(e, TocError::Chunk { .. }), "{e}");
    assert!(e.to_string().contains(&l.digest), "{e}");

    let (kind, bytes, _) = toc_of(l);
    let wrong = format!("sha256:{}", "0".repeat(64));
    let e = toc::parse(kind, &bytes, Some(&wrong), l.blob.len() as u64, &l.digest).unwrap_err();
    assert!(matches!(e, TocError::Digest { .. }), "{e}");
    assert!(e.to_string().contains(&l.digest), "{e}");

    // The same TOC with one chunk moved past the blob's end, re-framed the
    // way its producer frames it (and so unpinned).
    let json = toc_json(kind, &bytes);
    let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let blob_len = l.blob.len() as u64;
    let ent = v["entries"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["offset"].as_u64().unwrap_or(0) > 0)
        .unwrap();
    ent["offset"] = (blob_len + 4096).into();
    let json = serde_json::to_vec(&v).unwrap();
    let bytes = reframe(kind, &json);
    let size = match kind {
        // parse derives the TOC's offset from the blob's size.
        TocKind::Estargz => {
            let end = l.blob.len() - toc::ESTARGZ_FOOTER as usize;
            let off = toc::estargz_footer(&l.blob[end..]).unwrap();
            off + bytes.len() as u64 + toc::ESTARGZ_FOOTER
        }
        TocKind::ZstdChunked => blob_len,
    };
    let e = toc::parse(kind, &bytes, None, size, &l.digest).unwrap_err();
    assert!(matches!(e, TocError::Entry { .. }), "{e}");
    assert!(e.to_string().contains("outside the blob"), "{e}");
}

fn toc_json(kind: TocKind, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match kind {
        TocKind::Estargz => {
            let gz = flate2::read::GzDecoder::new(bytes);
            let mut a = tar::Archive::new(gz);
            let mut e = a.entries().unwrap().next().unwrap().unwrap();
            e.read_to_end(&mut out).unwrap();
        }
        TocKind::ZstdChunked => out = zstd::decode_all(bytes).unwrap(),
    }
    out
}

fn reframe(kind: TocKind, json: &[u8]) -> Vec<u8> {
    match kind {
        TocKind::Estargz => {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_ustar();
            h.set_size(json.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, "stargz.index.json", json).unwrap();
            let tar = b.into_inner().unwrap();
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &tar).unwrap();
            e.finish().unwrap()
        }
        TocKind::ZstdChunked => zstd::encode_all(json, 3).unwrap(),
    }
}

fn describe(parsed: &[(Layer, TocLayer)]) {
    for (l, t) in parsed {
        let max = t.chunks.iter().map(|c| c.len).max().unwrap_or(0);
        let skips = t.chunks.iter().filter(|c| c.skip > 0).count();
        let toc_len = toc_of(l).1.len();
        eprintln!(
            "{} {} bytes (TOC {toc_len}) {}: {} entries, {} chunks (largest {max}, {skips} with skip), prefetch_until {:?}, annotations {:?}",
            t.kind,
            l.blob.len(),
            l.media_type,
            t.index.entries.len(),
            t.chunks.len(),
            t.prefetch_until,
            l.annotations
        );
    }
}

#[test]
fn alpine_estargz_toc_matches_the_tar_and_chunks_rebuild_every_file() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "alpine", "3.20", "3.20.3", "amd64", true);
    lazy::estargz(&reg, "alpine:3.20", "alpine:esgz");
    let parsed = check_image(&reg, "alpine", "esgz", TocKind::Estargz);
    describe(&parsed);
    let (l, t) = &parsed[0];
    assert!(l.annotations.contains_key(toc::ESTARGZ_TOC_DIGEST));
    check_tampering(l, t);
}

#[test]
fn alpine_zstd_chunked_toc_matches_the_tar_and_chunks_rebuild_every_file() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "alpine", "3.20", "3.20.3", "amd64", true);
    lazy::zstd_chunked(&reg, "alpine:3.20", "alpine-zstd:1");
    let parsed = check_image(&reg, "alpine-zstd", "1", TocKind::ZstdChunked);
    describe(&parsed);
    let (l, t) = &parsed[0];
    check_tampering(l, t);
}

/// Two layers with every kind of entry the TOCs carry: hardlinks, symlinks,
/// a whiteout, an opaque directory, xattrs, devices, a fifo, odd names, and a
/// 5 MiB file that eStargz splits into 1 MiB chunks.
fn push_varied(reg: &Registry) {
    // Incompressible (xorshift), so zstd:chunked's rolling checksum splits it too.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..5 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut low = LayerBuilder::new();
    low.dir("etc", 0o755)
        .file("etc/hosts", b"127.0.0.1 localhost\n", 0o644)
        .file("etc/gone", b"to be whited out\n", 0o600)
        .dir("opq", 0o755)
        .file("opq/old", b"old\n", 0o644)
        .file("empty", b"", 0o644);
    let mut up = LayerBuilder::new();
    up.dir("data", 0o750)
        .file_owned("data/big.bin", &big, 0o640, 1000, 1000)
        .hardlink("data/big-link", "data/big.bin")
        .file("data/zeros", &vec![0u8; 300 * 1024], 0o644)
        .symlink("data/abs", "/etc/hosts")
        .symlink("data/rel", "../etc/hosts")
        .file_xattrs(
            "data/attrs",
            b"with xattrs\n",
            // containerd applies them when it unpacks the source: user.* only.
            &[("user.one", b"1"), ("user.bin", b"\x00\xff\n")],
        )
        .file("data/odd name \u{e9} \u{2603}\ttab", b"odd\n", 0o4755)
        .device("dev-null", false, 1, 3)
        .device("dev-loop", true, 7, 0)
        .fifo("fifo")
        .whiteout("etc/gone")
        .opaque("opq")
        .file("opq/new", b"new\n", 0o644);
    let blobs = [
        layer_blob(&low.finish(), Compress::Gzip, true),
        layer_blob(&up.finish(), Compress::Gzip, true),
    ];
    push_image(reg, "varied", "gz", &blobs, "amd64", true);
}

#[test]
fn varied_estargz_toc_matches_the_tar_with_chunked_large_files() {
    let reg = Registry::start(Auth::None);
    push_varied(&reg);
    lazy::estargz_with(&reg, "varied:gz", "varied:esgz", Some(1 << 20), &[]);
    let parsed = check_image(&reg, "varied", "esgz", TocKind::Estargz);
    describe(&parsed);
    let (_, t) = &parsed[1];
    let big = t
        .index
        .entries
        .iter()
        .position(|e| e.path == b"data/big.bin")
        .unwrap();
    assert_eq!(t.chunks.iter().filter(|c| c.file == big).count(), 5);
    assert!(
        t.index
            .entries
            .iter()
            .any(|e| e.kind == EntryKind::Hardlink
                && e.link.as_deref() == Some(&b"data/big.bin"[..]))
    );
    check_tampering(&parsed[1].0, t);
}

#[test]
fn varied_zstd_chunked_toc_matches_the_tar() {
    let reg = Registry::start(Auth::None);
    push_varied(&reg);
    lazy::zstd_chunked(&reg, "varied:gz", "varied-zstd:1");
    let parsed = check_image(&reg, "varied-zstd", "1", TocKind::ZstdChunked);
    describe(&parsed);
    check_tampering(&parsed[1].0, &parsed[1].1);
}

/// Go's JSON turns a name that is not UTF-8 into U+FFFD; both producers'
/// TOCs carry the mangled name, so the TOC is refused (the whole-layer path
/// shows the real one) instead of showing a name the layer does not have.
#[test]
fn names_that_are_not_utf8_make_the_toc_refused_not_mangled() {
    let reg = Registry::start(Auth::None);
    let mut b = LayerBuilder::new();
    b.file("ok", b"fine\n", 0o644)
        .file_bytes(b"latin1-\xe9.txt", b"latin1\n");
    let blob = layer_blob(&b.finish(), Compress::Gzip, true);
    push_image(&reg, "raw", "gz", &[blob], "amd64", true);
    lazy::estargz(&reg, "raw:gz", "raw:esgz");
    lazy::zstd_chunked(&reg, "raw:gz", "raw-zstd:1");
    for (repo, tag) in [("raw", "esgz"), ("raw-zstd", "1")] {
        for l in layers(&reg, repo, tag) {
            let (kind, bytes, digest) = toc_of(&l);
            let e = toc::parse(
                kind,
                &bytes,
                digest.as_deref(),
                l.blob.len() as u64,
                &l.digest,
            )
            .unwrap_err();
            assert!(e.to_string().contains("not UTF-8"), "{kind}: {e}");
        }
    }
}

/// Files a workload reads first (ctr-remote's record file) come first, and
/// the prefetch landmark after them gives where prefetching may stop.
#[test]
fn estargz_prefetch_landmark_follows_the_prioritized_files() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "alpine", "3.20", "3.20.3", "amd64", true);
    let first = ["/bin/busybox", "/etc/passwd"];
    lazy::estargz_with(&reg, "alpine:3.20", "alpine:prio", None, &first);
    let parsed = check_image(&reg, "alpine", "prio", TocKind::Estargz);
    describe(&parsed);
    let t = &parsed[0].1;
    let size_of = |p: &[u8]| {
        let e = t.index.entries.iter().find(|e| e.path == p).unwrap();
        assert!(e.offset + e.size <= t.prefetch_until.unwrap());
        e.size
    };
    let want = size_of(b"bin/busybox") + size_of(b"etc/passwd");
    assert_eq!(t.prefetch_until, Some(want));
}
