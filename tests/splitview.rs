//! Split view: hand-built zstd:chunked layers whose table of contents
//! disagrees with their tar stream (a hidden file, a setuid bit, another
//! owner, a symlink or hardlink elsewhere, a capability xattr, an omitted
//! whiteout or opaque marker, the first of two duplicates, swapped
//! contents). With the default options rimg shows exactly what umoci unpacks
//! from the tar stream, cold, after `--prefetch` and in either order of
//! cached states, or refuses and says why; with `--trust-toc` it shows the
//! TOC, which is what that option trusts. And issue 31: the tar-split
//! restores the padding a zstd stream leaves out, and one that lies is
//! refused.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use common::counting::CountingProxy;
use common::image::{Blob, Compress, LayerBuilder, layer_blob, push_blob, push_manifest, sha256};
use common::listing::{assert_same_tree, diff_listings, tree_listing};
use common::*;
use rimg::layer::toc::tarsplit::Crc64;
use rimg::layer::{EntryKind, index_tar};

/// A valid `security.capability` (revision 2, effective, cap_net_raw).
const CAP_NET_RAW: &[u8] = &[
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// `LayerBuilder`'s mtime, as Go writes it in a TOC.
const MTIME: &str = "2020-09-13T12:26:40Z";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn skippable(data: &[u8]) -> Vec<u8> {
    let mut f = 0x184D_2A50u32.to_le_bytes().to_vec();
    f.extend((data.len() as u32).to_le_bytes());
    f.extend(data);
    f
}

/// A tar-split of `tar`, as vbatts/tar-split writes one.
fn tar_split(tar: &[u8]) -> Vec<u8> {
    let index = index_tar(tar, "t").unwrap();
    let (mut out, mut pos, mut n) = (Vec::new(), 0usize, 0);
    let mut line = |v: serde_json::Value| {
        out.extend(serde_json::to_vec(&v).unwrap());
        out.push(b'\n');
    };
    for e in &index.entries {
        let (at, size) = (e.offset as usize, e.size as usize);
        line(serde_json::json!({"type": 2, "payload": b64(&tar[pos..at]), "position": n}));
        let mut c = Crc64::default();
        c.update(&tar[at..at + size]);
        let crc = (size > 0).then(|| b64(&c.value().to_be_bytes()));
        line(
            serde_json::json!({"type": 1, "name": "x", "size": size, "payload": crc, "position": n + 1}),
        );
        n += 2;
        pos = at + size;
    }
    line(serde_json::json!({"type": 2, "payload": b64(&tar[pos..]), "position": n}));
    out
}

/// How a hand-built zstd:chunked layer is made.
struct Chunked<'a> {
    /// The tar stream (its sha256 is the diff_id).
    stream: &'a [u8],
    /// The tar the TOC describes (file contents are found in the stream by digest).
    toc: &'a [u8],
    /// The tar the tar-split describes; `None`: no tar-split.
    split: Option<&'a [u8]>,
    /// How many bytes of the stream are compressed (the rest, padding, left out).
    cut: usize,
    /// Whether entries carry `endOffset` (stargz-snapshotter's writer leaves it out).
    end_offsets: bool,
}

/// A zstd:chunked blob framed as containers/storage frames it: every file
/// payload its own zstd frame, then the TOC and tar-split in skippable
/// frames, located and pinned by annotations.
fn chunked(c: &Chunked) -> (Blob, BTreeMap<String, String>) {
    let stream = &c.stream[..c.cut];
    let sidx = index_tar(c.stream, "s").unwrap();
    let mut cuts = vec![0usize];
    for e in &sidx.entries {
        if e.kind == EntryKind::File && e.size > 0 {
            cuts.extend([e.offset as usize, (e.offset + e.size) as usize]);
        }
    }
    cuts.push(stream.len());
    let mut blob = Vec::new();
    let mut frames: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1].min(stream.len()));
        if a >= b {
            continue;
        }
        let start = blob.len();
        blob.extend(zstd::encode_all(&stream[a..b], 3).unwrap());
        if sidx
            .entries
            .iter()
            .any(|e| e.offset as usize == a && e.size as usize == b - a)
        {
            frames.insert(sha256(&stream[a..b]), (start, blob.len()));
        }
    }
    let tidx = index_tar(c.toc, "t").unwrap();
    let entries: Vec<serde_json::Value> = tidx
        .entries
        .iter()
        .map(|e| {
            let kind = match e.kind {
                EntryKind::File => "reg",
                EntryKind::Dir => "dir",
                EntryKind::Symlink => "symlink",
                EntryKind::Hardlink => "hardlink",
                EntryKind::Char => "char",
                EntryKind::Block => "block",
                EntryKind::Fifo => "fifo",
            };
            let mut v = serde_json::json!({
                "type": kind, "name": String::from_utf8(e.path.clone()).unwrap(),
                "mode": e.mode, "uid": e.uid, "gid": e.gid, "modtime": MTIME,
                "linkName": e.link.as_ref().map(|l| String::from_utf8(l.clone()).unwrap()).unwrap_or_default(),
            });
            if !e.xattrs.is_empty() {
                v["xattrs"] = e.xattrs.iter().map(|(k, x)| (k.clone(), b64(x).into())).collect::<serde_json::Map<_, _>>().into();
            }
            if e.kind == EntryKind::File && e.size > 0 {
                let content = &c.toc[e.offset as usize..(e.offset + e.size) as usize];
                let d = sha256(content);
                let (start, end) = frames[&d];
                v["size"] = e.size.into();
                v["digest"] = d.into();
                v["offset"] = start.into();
                if c.end_offsets {
                    v["endOffset"] = end.into();
                }
            }
            v
        })
        .collect();
    let mut annotations = BTreeMap::new();
    let mut toc = serde_json::json!({"version": 1, "entries": entries});
    let split = c
        .split
        .map(|s| zstd::encode_all(&tar_split(s)[..], 3).unwrap());
    if let Some(s) = &split {
        toc["tarSplitDigest"] = sha256(s).into();
    }
    let json = serde_json::to_vec(&toc).unwrap();
    let ztoc = zstd::encode_all(&json[..], 3).unwrap();
    let at = blob.len() + 8;
    blob.extend(skippable(&ztoc));
    annotations.insert(
        "io.github.containers.zstd-chunked.manifest-position".to_string(),
        format!("{at}:{}:{}:1", ztoc.len(), json.len()),
    );
    annotations.insert(
        "io.github.containers.zstd-chunked.manifest-checksum".to_string(),
        sha256(&ztoc),
    );
    if let Some(s) = &split {
        let at = blob.len() + 8;
        blob.extend(skippable(s));
        annotations.insert(
            "io.github.containers.zstd-chunked.tarsplit-position".to_string(),
            format!("{at}:{}:{}", s.len(), 0),
        );
    }
    let b = Blob {
        digest: sha256(&blob),
        diff_id: sha256(c.stream),
        bytes: blob,
        media_type: ZSTD.into(),
    };
    (b, annotations)
}

/// Pushes an OCI image of `layers` (with their annotations) as `repo:tag`.
fn push(reg: &Registry, repo: &str, tag: &str, layers: &[(Blob, BTreeMap<String, String>)]) {
    for (l, _) in layers {
        push_blob(reg, repo, &l.bytes);
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.0.diff_id.clone()).collect::<Vec<_>>()},
    });
    let cb = serde_json::to_vec(&config).unwrap();
    let cd = push_blob(reg, repo, &cb);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": mt,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cb.len()},
        "layers": layers.iter().map(|(l, a)| serde_json::json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.bytes.len(), "annotations": a,
        })).collect::<Vec<_>>(),
    });
    push_manifest(reg, repo, tag, mt, &serde_json::to_vec(&manifest).unwrap());
}

/// The lower layer every case builds on.
fn base() -> Vec<u8> {
    let mut b = LayerBuilder::new();
    b.dir("c7", 0o755)
        .file("c7/secret", b"password=hunter2\n", 0o600)
        .dir("c8", 0o755)
        .dir("c8/opq", 0o755)
        .file("c8/opq/old", b"old\n", 0o644);
    b.finish()
}

/// One case: the stream's tar and the TOC's, each case under its own
/// directory so that all of them stack in one image.
/// A case's name, stream tar and TOC tar.
type Case = (&'static str, Vec<u8>, Vec<u8>);

fn cases() -> Vec<Case> {
    let both = |f: &dyn Fn(&mut LayerBuilder, bool)| {
        let (mut s, mut t) = (LayerBuilder::new(), LayerBuilder::new());
        f(&mut s, true);
        f(&mut t, false);
        (s.finish(), t.finish())
    };
    let tool = b"#!/bin/sh\necho tool\n";
    type Pair = (Vec<u8>, Vec<u8>);
    let list: Vec<(&str, Pair)> = vec![
        (
            "hidden backdoor",
            both(&|b, s| {
                b.dir("c1", 0o755).file("c1/ok", b"ok\n", 0o644);
                if s {
                    b.file("c1/backdoor", tool, 0o755);
                }
            }),
        ),
        (
            "setuid",
            both(&|b, s| {
                b.dir("c2", 0o755)
                    .file("c2/tool", tool, if s { 0o4755 } else { 0o755 });
            }),
        ),
        (
            "owner",
            both(&|b, s| {
                b.dir("c3", 0o755).file_owned(
                    "c3/conf",
                    b"conf\n",
                    0o644,
                    if s { 1000 } else { 0 },
                    0,
                );
            }),
        ),
        (
            "symlink",
            both(&|b, s| {
                b.dir("c4", 0o755)
                    .symlink("c4/link", if s { "/etc/shadow" } else { "/etc/motd" });
            }),
        ),
        (
            "hardlink",
            both(&|b, s| {
                b.dir("c5", 0o755).file("c5/motd", b"welcome\n", 0o644);
                if s {
                    b.hardlink("c5/passwd", "c5/motd");
                } else {
                    b.file("c5/passwd", b"welcome\n", 0o644);
                }
            }),
        ),
        (
            "capability",
            both(&|b, s| {
                b.dir("c6", 0o755);
                if s {
                    b.file_xattrs(
                        "c6/ping",
                        tool,
                        &[("security.capability", CAP_NET_RAW), ("user.cap", b"raw")],
                    );
                } else {
                    b.file("c6/ping", tool, 0o644);
                }
            }),
        ),
        (
            "omitted whiteout",
            both(&|b, s| {
                b.file("c7/other", b"x\n", 0o644);
                if s {
                    b.whiteout("c7/secret");
                }
            }),
        ),
        (
            "omitted opaque marker",
            both(&|b, s| {
                b.file("c8/opq/new", b"new\n", 0o644);
                if s {
                    b.opaque("c8/opq");
                }
            }),
        ),
        (
            "first of two duplicates",
            both(&|b, s| {
                b.dir("c9", 0o755).file("c9/dup", b"first\n", 0o644);
                if s {
                    b.file("c9/dup", b"second!\n", 0o600);
                }
            }),
        ),
    ];
    list.into_iter().map(|(n, (s, t))| (n, s, t)).collect()
}

/// The registry with every image these tests read, built once.
struct Fixture {
    reg: Registry,
}

/// Images: `plain:split` (every layer gzip, for umoci), `ts:split` (the
/// cases as zstd:chunked with a tar-split), `nots:split` (without one, and
/// without endOffset), `swap:ts` (swapped contents).
fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(build)
}

fn build() -> Fixture {
    let reg = Registry::start(Auth::None);
    let base = base();
    let cases = cases();
    let mut plain = vec![(layer_blob(&base, Compress::Gzip, true), BTreeMap::new())];
    let mut ts = plain.clone();
    let mut nots = plain.clone();
    for (_, s, t) in &cases {
        plain.push((layer_blob(s, Compress::Gzip, true), BTreeMap::new()));
        let c = |split: bool| Chunked {
            stream: s,
            toc: t,
            split: split.then_some(&s[..]),
            cut: s.len(),
            end_offsets: split,
        };
        ts.push(chunked(&c(true)));
        nots.push(chunked(&c(false)));
    }
    push(&reg, "plain", "split", &plain);
    push(&reg, "ts", "split", &ts);
    push(&reg, "nots", "split", &nots);
    Fixture { reg }
}

fn r(f: &Fixture, repo: &str) -> String {
    format!("{}/{repo}:split", f.reg.addr())
}

#[test]
fn a_toc_that_disagrees_with_its_tar_split_is_caught_for_every_case_and_the_stream_is_shown() {
    let f = fixture();
    let (_d, rootfs) = umoci_unpack(&f.reg, "plain", "split");
    // Cold, by default: each lying layer is named with its first
    // difference and read whole.
    let env = Env::new();
    let out = env.run(&["ls", &r(f, "ts"), "/"]);
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    let named = log.matches("split view").count();
    assert_eq!(named, cases().len(), "{log}");
    assert!(
        log.contains("lists c2/tool mode 0755, its tar stream has 4755"),
        "{log}"
    );
    let m = Mounted::new(&env, &r(f, "ts"), &[]);
    assert_same_tree(&m.path, &rootfs);
    drop(m);
    // Cold with --prefetch on a fresh cache.
    let env = Env::new();
    let m = Mounted::new(&env, &r(f, "ts"), &["--prefetch"]);
    assert_same_tree(&m.path, &rootfs);
}

#[test]
fn a_toc_without_tar_split_is_read_whole_by_default_and_trusted_only_when_asked() {
    let f = fixture();
    let (_d, rootfs) = umoci_unpack(&f.reg, "plain", "split");
    let env = Env::new();
    let m = Mounted::new(&env, &r(f, "nots"), &[]);
    assert_same_tree(&m.path, &rootfs);
    drop(m);
    // --trust-toc shows what the TOC says: a different tree (and entries
    // without endOffset are read, their ends derived).
    let env = Env::new();
    let out = env.run(&["--trust-toc", "ls", &r(f, "nots"), "/"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = Mounted::new(&env, &r(f, "nots"), &["--trust-toc"]);
    let trusted = tree_listing(&m.path);
    assert!(!diff_listings(&trusted, &tree_listing(&rootfs)).is_empty());
    assert_eq!(std::fs::read(m.path.join("c9/dup")).unwrap(), b"first\n");
    drop(m);
    // Then the whole layers: every TOC is compared with its stream, and
    // each difference logged and its range cache dropped.
    let out = env.run(&["--whole-layers", "ls", &r(f, "nots"), "/"]);
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(log.matches("split view").count(), cases().len(), "{log}");
    let m = Mounted::new(&env, &r(f, "nots"), &["--trust-toc"]);
    assert_same_tree(&m.path, &rootfs);
    drop(m);
    // The other order: whole first, then a trusting mount shows the stream.
    let env = Env::new();
    env.ok(&["--whole-layers", "ls", &r(f, "nots"), "/"]);
    let m = Mounted::new(&env, &r(f, "nots"), &["--trust-toc"]);
    assert_same_tree(&m.path, &rootfs);
}

#[test]
fn swapped_contents_under_an_honest_tar_split_are_refused_then_read_from_the_stream() {
    let reg = Registry::start(Auth::None);
    let mut s = LayerBuilder::new();
    s.file("a", b"content of a\n", 0o644)
        .file("b", b"content of b\n", 0o644);
    let s = s.finish();
    let mut t = LayerBuilder::new();
    t.file("a", b"content of b\n", 0o644)
        .file("b", b"content of a\n", 0o644);
    let t = t.finish();
    let l = chunked(&Chunked {
        stream: &s,
        toc: &t,
        split: Some(&s),
        cut: s.len(),
        end_offsets: true,
    });
    push(&reg, "swap", "ts", &[l]);
    let image = format!("{}/swap:ts", reg.addr());
    let env = Env::new();
    let e = env.fails(&["cat", &image, "/a"]);
    assert!(e.contains("split view") && e.contains("CRC-64"), "{e}");
    // The lying range cache is gone: the layer is read whole now.
    assert_eq!(env.ok(&["cat", &image, "/a"]), "content of a\n");
}

#[test]
fn an_honest_tar_split_layer_stays_lazy_and_exact() {
    let reg = Registry::start(Auth::None);
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut b = LayerBuilder::new();
    // The big file first: read-ahead runs forward from what is read.
    b.file("big", &big, 0o644)
        .dir("etc", 0o755)
        .file("etc/motd", b"hello\n", 0o644);
    let tar = b.finish();
    // Padded to GNU tar's 10240-byte record, of which the stream keeps none
    // past the end-of-archive blocks (issue 31).
    let mut padded = tar.clone();
    padded.resize(padded.len().div_ceil(10240) * 10240, 0);
    let cut = tar.len();
    let l = chunked(&Chunked {
        stream: &padded,
        toc: &padded,
        split: Some(&padded),
        cut,
        end_offsets: true,
    });
    let size = l.0.bytes.len() as u64;
    push(&reg, "honest", "ts", &[l]);
    let proxy = CountingProxy::start(&reg.addr(), None);
    let image = format!("{}/honest:ts", proxy.addr());
    let env = Env::new();
    assert_eq!(env.ok(&["cat", &image, "/etc/motd"]), "hello\n");
    let sent = proxy.sent();
    eprintln!("cold cat of a tar-split layer: {sent} of {size} bytes fetched");
    assert!(
        sent * 50 <= size,
        "a cold cat fetched {sent} of {size} bytes"
    );
    // Whole, the diff_id is verified with the padding the tar-split records.
    let env = Env::new();
    let out = env.run(&["-v", "--whole-layers", "cat", &image, "/etc/motd"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("restored"), "{log}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
}

#[test]
fn a_tar_split_that_lies_about_padding_is_refused_and_never_fixes_a_diff_id() {
    let reg = Registry::start(Auth::None);
    let mut b = LayerBuilder::new();
    b.file("etc/motd", b"hello\n", 0o644);
    let tar = b.finish();
    let mut padded = tar.clone();
    padded.resize(padded.len().div_ceil(10240) * 10240, 0);
    // The tar-split claims padding that is not zeros: the tar it rebuilds
    // hashes to the diff_id the config names, but it is not the stream's.
    let mut lying = padded.clone();
    let last = lying.len() - 1;
    lying[last] = 7;
    let mut l = chunked(&Chunked {
        stream: &lying,
        toc: &padded,
        split: Some(&lying),
        cut: tar.len(),
        end_offsets: true,
    });
    l.0.diff_id = sha256(&lying);
    push(&reg, "lie", "ts", &[l]);
    let image = format!("{}/lie:ts", reg.addr());
    let env = Env::new();
    let e = env.fails(&["--whole-layers", "cat", &image, "/etc/motd"]);
    assert!(e.contains("tar-split disagrees with the tar stream"), "{e}");
}

#[test]
fn skopeo_zstd_chunked_of_gnu_tar_layers_reads_the_same_whole_and_by_range_with_diff_ids_verified()
{
    let reg = Registry::start(Auth::None);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/motd"), b"hello from gnu tar\n").unwrap();
    std::fs::write(root.join("etc/odd"), vec![b'x'; 777]).unwrap();
    // GNU tar's default record (20 blocks), one block, and an odd three.
    let layers: Vec<Blob> = ["20", "1", "3"]
        .iter()
        .map(|b| {
            let out = std::process::Command::new("tar")
                .args(["--format=gnu", "-b", b, "-cf", "-", "-C"])
                .arg(&root)
                .arg("etc")
                .output()
                .unwrap();
            assert!(out.status.success());
            layer_blob(&out.stdout, Compress::Gzip, true)
        })
        .collect();
    common::image::push_image(&reg, "src", "gnu", &layers, "amd64", true);
    common::lazy::zstd_chunked(&reg, "src:gnu", "zc:gnu");
    let image = format!("{}/zc:gnu", reg.addr());
    for n in 0..3 {
        let layer = n.to_string();
        let whole = Env::new();
        let out = whole.run(&[
            "-v",
            "--whole-layers",
            "cat",
            "--layer",
            &layer,
            &image,
            "/etc/motd",
        ]);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "layer {n}: {log}");
        // The 10240-byte and odd records lose padding in the zstd stream;
        // the 512-byte one has none to lose.
        assert_eq!(
            n != 1,
            log.contains("zero bytes; restored"),
            "layer {n}: {log}"
        );
        let a = String::from_utf8_lossy(&out.stdout).into_owned();
        let ranged = Env::new();
        let b = ranged.ok(&["--trust-toc", "cat", "--layer", &layer, &image, "/etc/motd"]);
        assert_eq!(a, "hello from gnu tar\n");
        assert_eq!(a, b);
    }
}

#[test]
fn once_prefetched_the_tar_a_tar_split_rebuilds_must_hash_to_the_diff_id() {
    let reg = Registry::start(Auth::None);
    let mut b = LayerBuilder::new();
    b.dir("etc", 0o755)
        .file("etc/motd", b"hello\n", 0o644)
        .file("etc/issue", b"issue\n", 0o644);
    let tar = b.finish();
    let honest = chunked(&Chunked {
        stream: &tar,
        toc: &tar,
        split: Some(&tar),
        cut: tar.len(),
        end_offsets: true,
    });
    // The same layer under a config whose diff_id names another tar.
    let mut lying = honest.clone();
    lying.0.diff_id = sha256(b"another tar");
    push(&reg, "pf", "honest", std::slice::from_ref(&honest));
    push(&reg, "pf", "lying", &[lying]);
    let have = |env: &Env, ext: &str| {
        env.cache_dir().join(format!(
            "lazy/sha256/{}-tarsplit.{ext}",
            &honest.0.digest[7..]
        ))
    };
    for (tag, lies) in [("honest", false), ("lying", true)] {
        let env = Env::new();
        let image = format!("{}/pf:{tag}", reg.addr());
        let m = Mounted::new(&env, &image, &["--prefetch"]);
        // Both chunks held (4 bytes each in the log), then the check.
        let held = || std::fs::metadata(have(&env, "have")).is_ok_and(|m| m.len() >= 8);
        // A lying layer's chunks are dropped with its range cache.
        let done = wait_for(Duration::from_secs(30), || {
            if lies {
                have(&env, "distrusted").exists()
            } else {
                held()
            }
        });
        assert!(done, "{tag}: prefetch did not finish");
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(have(&env, "distrusted").exists(), lies, "{tag}");
        drop(m);
    }
}

#[test]
fn verify_names_the_split_view_of_a_lying_toc_with_or_without_tar_split() {
    let f = fixture();
    for repo in ["ts", "nots"] {
        let out = Env::new().run(&["verify", &r(f, repo)]);
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{repo}: {text}");
        assert!(
            text.contains("toc FAILED (split view: its table of contents "),
            "{repo}: {text}"
        );
        assert!(err.contains("failed verification"), "{repo}: {err}");
    }
}
