//! Range-lazy reads of eStargz and zstd:chunked images made by the real
//! producers (ctr-remote, skopeo): a cold mount or `cat` fetches the table of
//! contents and the chunks a read covers, not the layer; the tree equals
//! umoci's unpack, mixed with plain gzip layers too; a tampered chunk or
//! table is refused without serving or keeping a wrong byte; prefetch, export
//! and a warm cache need no more of the registry than they should. These
//! producers write no tar-split, so each test trusts the TOC (`--trust-toc`);
//! without it such layers are read whole (tests/splitview.rs).

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::process::Command;
use std::time::Duration;

use common::counting::CountingProxy;
use common::image::{push_alpine, push_blob, push_manifest, sha256};
use common::listing::{assert_same_tree, diff_listings, tree_listing};
use common::*;
use rimg::layer::toc::{self, TocKind, TocLayer, TocLocation};

const HIDDEN: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// An environment that reads eStargz and zstd:chunked layers without a
/// tar-split by range (`--trust-toc`), as every test here is about that.
fn trusting() -> Env {
    Env::new().set("RIMG_TRUST_TOC", "true")
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// One registry with Alpine 3.20 pushed as `src:3.20`, converted to each of
/// `forms` (`esgz`: eStargz, `zchunked`: zstd:chunked) under that repository
/// name and tag 3.20.
fn converted(forms: &[&str]) -> Registry {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "src", "3.20", "3.20.3", "amd64", true);
    for f in forms {
        match *f {
            "esgz" => common::lazy::estargz(&reg, "src:3.20", "esgz:3.20"),
            "zchunked" => common::lazy::zstd_chunked(&reg, "src:3.20", "zchunked:3.20"),
            other => panic!("no form {other}"),
        }
    }
    reg
}

fn manifest(reg: &Registry, repo: &str, tag: &str) -> serde_json::Value {
    let out = run_ok(Command::new("curl").args([
        "-sSf",
        "-H",
        &format!("Accept: {OCI_MANIFEST}"),
        &format!("{}/v2/{repo}/manifests/{tag}", reg.url()),
    ]));
    serde_json::from_str(&out).unwrap()
}

fn manifest_layers(reg: &Registry, repo: &str, tag: &str) -> Vec<(String, u64)> {
    manifest(reg, repo, tag)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn blob_json(reg: &Registry, digest: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(reg.blob_file(digest)).unwrap()).unwrap()
}

/// umoci's unpack of the converted image, without the format's own files.
fn reference_rootfs(
    reg: &Registry,
    repo: &str,
    tag: &str,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, rootfs) = umoci_unpack(reg, repo, tag);
    for h in HIDDEN {
        let _ = std::fs::remove_file(rootfs.join(h));
    }
    (dir, rootfs)
}

/// Every regular file of the Alpine 3.20 rootfs, by path (no leading `./`).
fn alpine_files() -> BTreeMap<String, Vec<u8>> {
    let gz = std::fs::File::open(alpine("3.20.3", "x86_64")).unwrap();
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    let mut out = BTreeMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = e.path().unwrap().display().to_string();
        let path = path.trim_start_matches("./").to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.insert(path, data);
    }
    out
}

/// Where a layer's TOC is in its blob, and the TOC parsed and verified
/// through rimg's library, from the registry's own storage.
struct Toc {
    digest: String,
    blob: Vec<u8>,
    /// The TOC's bytes in the blob: for eStargz its gzip member (before the
    /// footer), for zstd:chunked the manifest range.
    range: std::ops::Range<usize>,
    layer: TocLayer,
}

fn toc_of(reg: &Registry, desc: &serde_json::Value) -> Toc {
    let digest = desc["digest"].as_str().unwrap().to_string();
    let blob = std::fs::read(reg.blob_file(&digest)).unwrap();
    let annotations: BTreeMap<String, String> = desc["annotations"]
        .as_object()
        .map(|a| {
            a.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let media_type = desc["mediaType"].as_str().unwrap();
    let (kind, range, pin) = match toc::locate(media_type, &annotations).expect("a TOC") {
        TocLocation::Range {
            kind,
            offset,
            len,
            digest,
            ..
        } => (kind, offset as usize..(offset + len) as usize, Some(digest)),
        TocLocation::EstargzFooter { digest } => {
            let end = blob.len() - toc::ESTARGZ_FOOTER as usize;
            let off = toc::estargz_footer(&blob[end..]).unwrap() as usize;
            (TocKind::Estargz, off..end, digest)
        }
    };
    let layer = toc::parse(
        kind,
        &blob[range.clone()],
        pin.as_deref(),
        blob.len() as u64,
        &digest,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Toc {
        digest,
        blob,
        range,
        layer,
    }
}

/// Flips a byte inside the compressed bytes of the first chunk of `path` in
/// the registry's storage (distribution 2.8 serves the blob as it is), and
/// checks through rimg's library that the chunk no longer verifies. Returns
/// where the chunk's compressed bytes start in the blob.
fn tamper_first_chunk(reg: &Registry, desc: &serde_json::Value, path: &str) -> u64 {
    let t = toc_of(reg, desc);
    let file = t
        .layer
        .index
        .entries
        .iter()
        .position(|e| e.path == path.as_bytes())
        .unwrap_or_else(|| panic!("{path} not in the TOC"));
    let c = t.layer.chunks.iter().find(|c| c.file == file).unwrap();
    // A third of the way in: past gzip's header, well before the next
    // file's tar header that an eStargz member ends with.
    let at = (c.coff + c.clen / 3) as usize;
    let mut blob = t.blob;
    blob[at] ^= 0x55;
    std::fs::write(reg.blob_file(&t.digest), &blob).unwrap();
    let compressed = &blob[c.coff as usize..(c.coff + c.clen) as usize];
    assert!(
        toc::decode_chunk(&t.layer, c, compressed).is_err(),
        "the tampered chunk of {path} still verifies"
    );
    c.coff
}

/// Everything the mount servers of `env` logged.
fn mount_logs(env: &Env) -> String {
    let mut out = String::new();
    if let Ok(dir) = std::fs::read_dir(env.cache_dir().join("logs")) {
        for e in dir.flatten() {
            out += &std::fs::read_to_string(e.path()).unwrap_or_default();
        }
    }
    out
}

/// Unmounts through rimg, which waits for the server to exit (so whatever it
/// keeps on exit is kept).
fn unmount(env: &Env, m: &Mounted) {
    env.ok(&["umount", &m.path.display().to_string()]);
}

#[test]
fn a_cold_mount_of_toc_images_reads_files_by_range_and_shows_umocis_tree() {
    let reg = converted(&["esgz", "zchunked"]);
    for repo in ["esgz", "zchunked"] {
        let layers = manifest_layers(&reg, repo, "3.20");
        let blob_bytes: u64 = layers.iter().map(|l| l.1).sum();
        let proxy = CountingProxy::start(&reg.addr(), None);
        let env = trusting();
        let r = format!("{}/{repo}:3.20", proxy.addr());
        let m = Mounted::new(&env, &r, &[]);
        let got = std::fs::read_to_string(m.path.join("etc/os-release")).unwrap();
        assert!(got.contains("Alpine Linux"), "{repo}: {got}");
        let sent = proxy.sent();
        assert!(
            sent * 3 < blob_bytes,
            "{repo}: a cold read of one file fetched {sent} bytes of {blob_bytes}"
        );
        // umoci reads no zstd; skopeo recompressed the same tar stream.
        let (_d, rootfs) = match repo {
            "zchunked" => umoci_unpack(&reg, "src", "3.20"),
            _ => reference_rootfs(&reg, repo, "3.20"),
        };
        assert_same_tree(&m.path, &rootfs);
        // The same bytes through the CLI, on a fresh cache.
        let env2 = trusting();
        proxy.reset();
        let out = env2.ok(&["cat", &r, "/etc/os-release"]);
        assert_eq!(out, got);
        assert!(
            proxy.sent() * 3 < blob_bytes,
            "{repo}: cat fetched {}",
            proxy.sent()
        );
    }
}

#[test]
fn a_tampered_chunk_fails_only_its_file_naming_layer_and_path_and_is_never_kept() {
    let reg = converted(&["esgz", "zchunked"]);
    let files = alpine_files();
    // The layer's first regular file: no other read's read-ahead reaches it.
    let victim = "bin/busybox";
    for repo in ["esgz", "zchunked"] {
        let m = manifest(&reg, repo, "3.20");
        let desc = &m["layers"][0];
        let digest = desc["digest"].as_str().unwrap();
        tamper_first_chunk(&reg, desc, victim);
        let r = format!("{}/{repo}:3.20", reg.addr());

        // `rimg cat`: one line naming the layer and the file, no wrong byte,
        // and the same again on the same cache (nothing wrong was kept).
        let env = trusting();
        for attempt in 0..2 {
            let out = env.run(&["cat", &r, &format!("/{victim}")]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{repo}: cat of a tampered file");
            assert_eq!(
                err.trim_end().lines().count(),
                1,
                "{repo} attempt {attempt}: one line on stderr: {err}"
            );
            assert!(
                err.starts_with("rimg: ") && err.contains(digest) && err.contains(victim),
                "{repo}: {err}"
            );
            assert!(
                files[victim].starts_with(&out.stdout),
                "{repo}: cat wrote bytes that are not the file's"
            );
        }
        // Other files of the layer read fine from the same cache.
        let out = env.ok(&["cat", &r, "/etc/os-release"]);
        assert_eq!(out.as_bytes(), files["etc/os-release"]);

        // A mount: EIO for the tampered file, the reason in the server's
        // log, every other file right, and EIO again on a second read.
        let env = trusting();
        let mnt = Mounted::new(&env, &r, &[]);
        let e = std::fs::read(mnt.path.join(victim)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{repo}: {e}");
        let log = mount_logs(&env);
        assert!(
            log.lines()
                .any(|l| l.contains(digest) && l.contains(victim) && l.contains("chunk")),
            "{repo}: the log does not give the reason:\n{log}"
        );
        for (path, want) in &files {
            if path != victim {
                let got = std::fs::read(mnt.path.join(path))
                    .unwrap_or_else(|e| panic!("{repo}: {path}: {e}"));
                assert!(got == *want, "{repo}: {path} differs");
            }
        }
        let e = std::fs::read(mnt.path.join(victim)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{repo}, again: {e}");
        unmount(&env, &mnt);
    }
}

#[test]
fn a_tampered_chunk_past_the_first_file_is_named_at_its_offset_and_spares_reads_before_it() {
    let reg = converted(&["esgz", "zchunked"]);
    let files = alpine_files();
    // Right after a small file, whose read-ahead reaches the tampered chunk.
    let victim = "lib/ld-musl-x86_64.so.1";
    let neighbour = "lib/sysctl.d/00-alpine.conf";
    for repo in ["esgz", "zchunked"] {
        let m = manifest(&reg, repo, "3.20");
        let desc = &m["layers"][0];
        let digest = desc["digest"].as_str().unwrap();
        let bad_at = tamper_first_chunk(&reg, desc, victim);
        let proxy = CountingProxy::start(&reg.addr(), None);
        let r = format!("{}/{repo}:3.20", proxy.addr());
        let env = trusting();
        let out = env.run(&["cat", &r, &format!("/{neighbour}")]);
        assert!(out.status.success(), "{repo}: {neighbour}");
        assert_eq!(out.stdout, files[neighbour], "{repo}: {neighbour}");
        // The bad chunk, read ahead, is fetched once, not again and again.
        let covering = proxy
            .blob_requests(digest)
            .iter()
            .filter_map(|q| {
                let (a, b) = q
                    .range
                    .as_deref()?
                    .strip_prefix("bytes=")?
                    .split_once('-')?;
                let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                (a <= bad_at && bad_at <= b).then_some(())
            })
            .count();
        assert!(
            covering <= 1,
            "{repo}: the tampered chunk was fetched {covering} times for one read"
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "",
            "{repo}: cat of a good file"
        );
        let err = env.fails(&["cat", &r, &format!("/{victim}")]);
        assert!(
            err.contains(digest) && err.contains(victim) && err.contains("chunk at byte 0 "),
            "{repo}: {err}"
        );
        let mnt = Mounted::new(&env, &r, &[]);
        let e = std::fs::read(mnt.path.join(victim)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{repo}: {e}");
        unmount(&env, &mnt);
        let log = mount_logs(&env);
        assert!(
            log.lines().any(|l| l.contains(digest)
                && l.contains(victim)
                && l.contains("chunk at byte 0 ")),
            "{repo}: the log does not give the reason:\n{log}"
        );
    }
}

/// Pushes `repo:new_tag`: the image `repo:tag` with its only layer replaced
/// by `blob`; the descriptor is the same otherwise (so the same pinned TOC
/// digest) unless `estargz_pin` gives a new eStargz TOC digest.
fn push_with_layer(
    reg: &Registry,
    repo: &str,
    tag: &str,
    new_tag: &str,
    blob: &[u8],
    estargz_pin: Option<&str>,
) -> String {
    let mut m = manifest(reg, repo, tag);
    let digest = push_blob(reg, repo, blob);
    m["layers"][0]["digest"] = digest.clone().into();
    m["layers"][0]["size"] = blob.len().into();
    if let Some(pin) = estargz_pin {
        m["layers"][0]["annotations"][toc::ESTARGZ_TOC_DIGEST] = pin.into();
    }
    push_manifest(
        reg,
        repo,
        new_tag,
        OCI_MANIFEST,
        &serde_json::to_vec(&m).unwrap(),
    );
    digest
}

/// The eStargz blob of `t` with its TOC JSON changed by `edit` and framed as
/// ctr-remote frames it (a gzip member holding a tar of
/// `stargz.index.json`) in place of the TOC, and the new JSON's digest (what
/// a pin of it would say).
fn estargz_with_toc(t: &Toc, edit: impl FnOnce(&mut serde_json::Value)) -> (Vec<u8>, String) {
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(&t.blob[t.range.clone()])
        .read_to_end(&mut tar_bytes)
        .unwrap();
    let mut a = tar::Archive::new(&tar_bytes[..]);
    let mut json = Vec::new();
    a.entries()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .read_to_end(&mut json)
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    edit(&mut v);
    let json = serde_json::to_vec(&v).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(json.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "stargz.index.json", &json[..])
        .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &b.into_inner().unwrap()).unwrap();
    let mut blob = t.blob[..t.range.start].to_vec();
    blob.extend(gz.finish().unwrap());
    // The footer names the TOC's offset, which has not moved.
    blob.extend_from_slice(&t.blob[t.range.end..]);
    (blob, sha256(&json))
}

/// The TOC entry of `path` (names may start with `./`).
fn toc_entry<'a>(v: &'a mut serde_json::Value, path: &str) -> &'a mut serde_json::Value {
    v["entries"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["name"].as_str().map(|n| n.trim_start_matches("./")) == Some(path))
        .unwrap_or_else(|| panic!("{path} not in the TOC"))
}

/// Images whose TOC must be refused, each layer a new blob pushed under its
/// own digest: `esgz:renamed-toc`, a well-formed eStargz TOC renaming
/// etc/os-release to etc/0s-release that the original annotation no longer
/// pins; `esgz:flipped-toc` and `zchunked:flipped-toc`, a byte flipped
/// inside the compressed TOC, also under the original pin;
/// `esgz:outside-toc`, a TOC pinned anew whose etc/os-release starts past
/// the blob's end. Returns (repository, tag, layer digest, a word the error
/// must hold besides the digest and "TOC") of each.
fn push_bad_tocs(reg: &Registry) -> Vec<(&'static str, &'static str, String, &'static str)> {
    let flipped = |t: &Toc| {
        let mut b = t.blob.clone();
        b[(t.range.start + t.range.end) / 2] ^= 0x55;
        b
    };
    let esgz = toc_of(reg, &manifest(reg, "esgz", "3.20")["layers"][0]);
    let (renamed, _) = estargz_with_toc(&esgz, |v| {
        toc_entry(v, "etc/os-release")["name"] = "etc/0s-release".into();
    });
    let past_end = esgz.blob.len() as u64 + 4096;
    let (outside, outside_pin) = estargz_with_toc(&esgz, |v| {
        toc_entry(v, "etc/os-release")["offset"] = past_end.into();
    });
    let zc = toc_of(reg, &manifest(reg, "zchunked", "3.20")["layers"][0]);
    let mut out: Vec<_> = [
        ("esgz", "renamed-toc", renamed, "pins"),
        ("esgz", "flipped-toc", flipped(&esgz), "TOC"),
        ("zchunked", "flipped-toc", flipped(&zc), "pins"),
    ]
    .into_iter()
    .map(|(repo, tag, blob, word)| {
        let digest = push_with_layer(reg, repo, "3.20", tag, &blob, None);
        (repo, tag, digest, word)
    })
    .collect();
    let digest = push_with_layer(
        reg,
        "esgz",
        "3.20",
        "outside-toc",
        &outside,
        Some(&outside_pin),
    );
    out.push(("esgz", "outside-toc", digest, "etc/os-release"));
    out
}

#[test]
fn a_toc_that_fails_its_pin_or_points_outside_the_blob_is_refused_by_ls_and_cat_naming_the_layer() {
    let reg = converted(&["esgz", "zchunked"]);
    for (repo, tag, digest, word) in push_bad_tocs(&reg) {
        let r = format!("{}/{repo}:{tag}", reg.addr());
        let env = trusting();
        let checks = [
            vec!["ls", "-R", r.as_str(), "/"],
            vec!["cat", r.as_str(), "/etc/os-release"],
            vec!["cat", r.as_str(), "/etc/0s-release"],
        ];
        for args in &checks {
            let out = env.run(args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{repo}:{tag}: {args:?} succeeded");
            assert_eq!(
                err.trim_end().lines().count(),
                1,
                "{repo}:{tag}: {args:?}: {err}"
            );
            assert!(
                err.contains(&digest) && err.contains("TOC") && err.contains(word),
                "{repo}:{tag}: {args:?}: {err}"
            );
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("0s-release"),
                "{repo}:{tag}: {args:?} showed an entry of the unverified TOC"
            );
        }
    }
}

#[test]
fn a_mount_whose_toc_is_refused_answers_eio_and_logs_why() {
    let reg = converted(&["esgz", "zchunked"]);
    for (repo, tag, digest, word) in push_bad_tocs(&reg) {
        let r = format!("{}/{repo}:{tag}", reg.addr());
        let env = trusting();
        // Refused at once with the reason, or mounted, answering EIO with
        // the reason in the server's log.
        let dir = tempfile::tempdir().unwrap();
        let out = env.run(&["mount", &r, &dir.path().display().to_string()]);
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            let listed =
                std::fs::read_dir(dir.path()).and_then(|d| d.collect::<Result<Vec<_>, _>>());
            let _ = env.run(&["umount", &dir.path().display().to_string()]);
            let e = listed.expect_err("the root of an image whose TOC fails its digest listed");
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{repo}:{tag}: {e}");
            let log = mount_logs(&env);
            assert!(
                log.lines()
                    .any(|l| l.contains(&digest) && l.contains("TOC") && l.contains(word)),
                "{repo}:{tag}: the log does not give the reason:\n{log}"
            );
        } else {
            assert_eq!(
                err.trim_end().lines().count(),
                1,
                "{repo}:{tag}: mount: {err}"
            );
            assert!(
                err.contains(&digest) && err.contains("TOC") && err.contains(word),
                "{repo}:{tag}: mount: {err}"
            );
        }
    }
}

/// Pushes `repo:new_tag`: the eStargz conversion `repo:esgz_tag` of
/// `repo:src_tag` with the layers where `plain[i]` holds taken from the
/// source (plain gzip) instead, and a config whose diff_ids match.
fn push_mixed(
    reg: &Registry,
    repo: &str,
    src_tag: &str,
    esgz_tag: &str,
    new_tag: &str,
    plain: &[bool],
) {
    let src = manifest(reg, repo, src_tag);
    let esgz = manifest(reg, repo, esgz_tag);
    let src_config = blob_json(reg, src["config"]["digest"].as_str().unwrap());
    let mut config = blob_json(reg, esgz["config"]["digest"].as_str().unwrap());
    let mut layers = Vec::new();
    for (i, &p) in plain.iter().enumerate() {
        if p {
            layers.push(src["layers"][i].clone());
            config["rootfs"]["diff_ids"][i] = src_config["rootfs"]["diff_ids"][i].clone();
        } else {
            layers.push(esgz["layers"][i].clone());
        }
    }
    assert_eq!(layers.len(), esgz["layers"].as_array().unwrap().len());
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let mut m = esgz.clone();
    m["config"]["digest"] = push_blob(reg, repo, &config_bytes).into();
    m["config"]["size"] = config_bytes.len().into();
    m["layers"] = layers.into();
    push_manifest(
        reg,
        repo,
        new_tag,
        OCI_MANIFEST,
        &serde_json::to_vec(&m).unwrap(),
    );
}

#[test]
fn a_mixed_image_of_estargz_and_plain_gzip_layers_merges_to_umocis_tree() {
    let reg = Registry::start(Auth::None);
    fixtures::push_rules(&reg, "rules", "gz", true);
    common::lazy::estargz(&reg, "rules:gz", "rules:esgz");
    // Whiteouts, an opaque directory and replaced entries in each kind of
    // layer hiding the other kind's files.
    for (tag, plain) in [
        ("mixed-egz", [false, true, false]),
        ("mixed-geg", [true, false, true]),
    ] {
        push_mixed(&reg, "rules", "gz", "esgz", tag, &plain);
        let env = trusting();
        let r = format!("{}/rules:{tag}", reg.addr());
        let m = Mounted::new(&env, &r, &[]);
        let (_d, rootfs) = reference_rootfs(&reg, "rules", tag);
        assert_same_tree(&m.path, &rootfs);
        unmount(&env, &m);
        // The eStargz layers were read by range, the gzip ones whole.
        let ranged = std::fs::read_dir(env.cache_dir().join("lazy/sha256")).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "idx"))
                .count()
        });
        let want = plain.iter().filter(|p| !**p).count();
        assert_eq!(ranged, want, "{tag}: layers read by range");
    }
}

#[test]
fn a_prefetched_estargz_mount_reads_every_file_after_the_registry_stops() {
    let mut reg = converted(&["esgz"]);
    let (_d, rootfs) = reference_rootfs(&reg, "esgz", "3.20");
    let env = trusting().set("RIMG_LOG", "rimg=info");
    let r = format!("{}/esgz:3.20", reg.addr());
    let m = Mounted::new(&env, &r, &["--prefetch"]);
    let done = wait_for(Duration::from_secs(60), || {
        let log = mount_logs(&env);
        log.contains("prefetched by range") || log.contains("prefetch: ")
    });
    let log = mount_logs(&env);
    assert!(
        done && log.contains("prefetched by range"),
        "no prefetch finished:\n{log}"
    );
    reg.stop();
    assert_same_tree(&m.path, &rootfs);
    unmount(&env, &m);
}

#[test]
fn export_of_an_estargz_image_writes_the_registrys_original_blobs() {
    let reg = converted(&["esgz"]);
    check_export_writes_original_blobs(&reg, "esgz");
}

#[test]
fn an_estargz_image_read_whole_hides_the_format_files_in_flatten_and_mount() {
    let reg = converted(&["esgz"]);
    let (_d, rootfs) = reference_rootfs(&reg, "esgz", "3.20");
    let r = format!("{}/esgz:3.20", reg.addr());
    let env = trusting();
    // --flatten: one layer of the merged tree, without the format's files.
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("flat.tar").display().to_string();
    env.ok(&["export", "--flatten", &r, &o]);
    let layout = dir.path().join("oci");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "-q", &format!("docker-archive:{o}")])
            .arg(format!("oci:{}:t", layout.display())),
    );
    let (_u, flat) = unpack_layout(tempfile::tempdir().unwrap(), &layout, "t");
    let mut problems = Vec::new();
    let d = diff_listings(&tree_listing(&flat), &tree_listing(&rootfs));
    if !d.is_empty() {
        problems.push(format!("--flatten: {d:?}"));
    }
    // A mount after the export downloaded the layer whole.
    let env = trusting();
    env.ok(&["export", &r, &o]);
    let m = Mounted::new(&env, &r, &[]);
    let d = diff_listings(&tree_listing(&m.path), &tree_listing(&rootfs));
    if !d.is_empty() {
        problems.push(format!("mount after export: {d:?}"));
    }
    unmount(&env, &m);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn export_of_a_zstd_chunked_image_writes_the_registrys_original_blobs() {
    let reg = converted(&["zchunked"]);
    check_export_writes_original_blobs(&reg, "zchunked");
}

/// `rimg export`, after a read by range, in both forms: skopeo sees the
/// registry's layers and the archive holds their exact bytes.
fn check_export_writes_original_blobs(reg: &Registry, repo: &str) {
    let r = format!("{}/{repo}:3.20", reg.addr());
    let registry_manifest = manifest(reg, repo, "3.20");
    let want: Vec<String> = manifest_layers(reg, repo, "3.20")
        .into_iter()
        .map(|l| l.0)
        .collect();
    // skopeo names a docker archive's layers by their diff_ids.
    let config = blob_json(reg, registry_manifest["config"]["digest"].as_str().unwrap());
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    let env = trusting();
    // A read by range first: the export must not be made of the range cache.
    env.ok(&["cat", &r, "/etc/os-release"]);
    let dir = tempfile::tempdir().unwrap();
    for (form, extra, skopeo_ref) in [
        ("docker-archive", vec![], "docker-archive:{}"),
        (
            "oci",
            vec!["--format", "oci", "--tag", "mine/x:t"],
            "oci-archive:{}:t",
        ),
    ] {
        let out = dir.path().join(format!("{form}.tar"));
        let mut args = vec!["export"];
        args.extend(&extra);
        let o = out.display().to_string();
        args.extend([r.as_str(), o.as_str()]);
        env.ok(&args);
        let inspect = run_ok(
            Command::new("skopeo")
                .arg("inspect")
                .arg(skopeo_ref.replace("{}", &o)),
        );
        let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
        let got: Vec<String> = v["Layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect();
        let names = if form == "oci" { &want } else { &diff_ids };
        assert_eq!(got, *names, "{repo} {form}: layer digests");
        // The bytes under those names are the blobs themselves.
        let x = dir.path().join(form);
        std::fs::create_dir(&x).unwrap();
        run_ok(Command::new("tar").arg("-xf").arg(&out).arg("-C").arg(&x));
        for d in &want {
            let bytes = std::fs::read(x.join("blobs/sha256").join(&d[7..])).unwrap();
            assert_eq!(sha256(&bytes), *d, "{repo} {form}");
            assert_eq!(bytes, std::fs::read(reg.blob_file(d)).unwrap());
        }
        // The OCI form keeps the descriptors' annotations (the TOC pins).
        if form == "oci" {
            let index = serde_json::from_slice::<serde_json::Value>(
                &std::fs::read(x.join("index.json")).unwrap(),
            )
            .unwrap();
            let md = index["manifests"][0]["digest"].as_str().unwrap();
            let ours: serde_json::Value = serde_json::from_slice(
                &std::fs::read(x.join("blobs/sha256").join(&md[7..])).unwrap(),
            )
            .unwrap();
            assert_eq!(ours["layers"], registry_manifest["layers"], "{repo}");
        }
    }
}

#[test]
fn a_warm_mount_reads_files_read_before_without_asking_for_the_layer() {
    let reg = converted(&["esgz", "zchunked"]);
    let files = alpine_files();
    let read = ["etc/os-release", "bin/busybox", "lib/libcrypto.so.3"];
    for repo in ["esgz", "zchunked"] {
        let (digest, _) = manifest_layers(&reg, repo, "3.20").remove(0);
        let proxy = CountingProxy::start(&reg.addr(), None);
        let r = format!("{}/{repo}:3.20", proxy.addr());
        let env = trusting();
        let m = Mounted::new(&env, &r, &[]);
        for p in read {
            assert!(std::fs::read(m.path.join(p)).unwrap() == files[p], "{p}");
        }
        assert!(
            !proxy.blob_requests(&digest).is_empty(),
            "{repo}: the cold mount asked nothing of the layer"
        );
        unmount(&env, &m);

        proxy.reset();
        let m = Mounted::new(&env, &r, &[]);
        for p in read {
            assert!(std::fs::read(m.path.join(p)).unwrap() == files[p], "{p}");
        }
        unmount(&env, &m);
        let out = env.ok(&["cat", &r, "/etc/os-release"]);
        assert_eq!(out.as_bytes(), files["etc/os-release"]);
        assert!(
            !proxy.requests().is_empty(),
            "{repo}: nothing went through the proxy"
        );
        assert_eq!(
            proxy.blob_requests(&digest),
            vec![],
            "{repo}: warm reads asked for the layer"
        );
    }
}

#[test]
fn ctr_remote_zstd_chunked_without_end_offsets_reads_by_range_when_trusted_and_whole_by_default() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "src", "3.20", "3.20.3", "amd64", true);
    common::lazy::ctr_remote_zstd_chunked(&reg, "src:3.20", "czc:3.20");
    let blob_bytes: u64 = manifest_layers(&reg, "czc", "3.20")
        .iter()
        .map(|l| l.1)
        .sum();
    let proxy = CountingProxy::start(&reg.addr(), None);
    let r = format!("{}/czc:3.20", proxy.addr());
    let trusted = trusting().ok(&["cat", &r, "/etc/os-release"]);
    assert!(trusted.contains("Alpine Linux"), "{trusted}");
    assert!(
        proxy.sent() * 3 < blob_bytes,
        "a trusted cold cat fetched {} of {blob_bytes}",
        proxy.sent()
    );
    proxy.reset();
    let whole = Env::new().ok(&["cat", &r, "/etc/os-release"]);
    assert_eq!(whole, trusted);
    assert!(
        proxy.sent() >= blob_bytes,
        "by default the layer is read whole"
    );
}

/// Files in the many-files image, each of `MANY_SIZE` bytes that do not
/// compress (so the layer is as large as its files).
const MANY_FILES: usize = 240;
const MANY_SIZE: usize = 40_000;

/// One registry with an image of `MANY_FILES` files in one layer pushed as
/// `src:many` and converted to eStargz and zstd:chunked (`esgz:many`,
/// `zchunked:many`); and the files, by path.
fn many_files() -> (Registry, BTreeMap<String, Vec<u8>>) {
    use common::image::{Compress, LayerBuilder, layer_blob, push_image};
    let mut files = BTreeMap::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut b = LayerBuilder::new();
    b.dir("data", 0o755);
    for i in 0..MANY_FILES {
        let data: Vec<u8> = (0..MANY_SIZE)
            .map(|_| {
                // xorshift64: bytes gzip and zstd cannot shrink.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let path = format!("data/f{i:04}");
        b.file(&path, &data, 0o644);
        files.insert(path, data);
    }
    let reg = Registry::start(Auth::None);
    let blob = layer_blob(&b.finish(), Compress::Gzip, true);
    push_image(&reg, "src", "many", &[blob], "amd64", true);
    common::lazy::estargz(&reg, "src:many", "esgz:many");
    common::lazy::zstd_chunked(&reg, "src:many", "zchunked:many");
    (reg, files)
}

/// Reads every file of the mount, last first (against the blob's order, so
/// that no read is served by the read-ahead of the one before), and returns
/// the paths whose read failed.
fn read_all_backwards(m: &Mounted, files: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let mut failed = Vec::new();
    for (path, want) in files.iter().rev() {
        match std::fs::read(m.path.join(path)) {
            Ok(got) => assert!(got == *want, "{path}: other bytes than the file's"),
            Err(_) => failed.push(path.clone()),
        }
    }
    failed
}

#[test]
fn reading_every_file_switches_to_streaming_the_layer_with_the_same_bytes_and_no_more_fetched() {
    let (reg, files) = many_files();
    for repo in ["esgz", "zchunked"] {
        let (digest, size) = manifest_layers(&reg, repo, "many").remove(0);
        let proxy = CountingProxy::start(&reg.addr(), None);
        let env = trusting();
        let m = Mounted::new(&env, &format!("{}/{repo}:many", proxy.addr()), &[]);
        assert_eq!(
            read_all_backwards(&m, &files),
            Vec::<String>::new(),
            "{repo}"
        );
        let requests = proxy.blob_requests(&digest).len();
        let sent = proxy.sent();
        unmount(&env, &m);
        // One request per file read before the switch, then a few large
        // ones: without the switch there would be one per file.
        assert!(
            requests < MANY_FILES / 2,
            "{repo}: {requests} requests for {MANY_FILES} files"
        );
        // Each chunk once; the coalesced gaps, the TOC and the headers are small.
        assert!(
            sent <= size + size / 20,
            "{repo}: fetched {sent} bytes of a {size}-byte layer"
        );
    }
}

#[test]
fn a_tampered_chunk_fails_only_its_file_when_the_layer_is_streamed() {
    let (reg, files) = many_files();
    let victim = "data/f0100";
    for repo in ["esgz", "zchunked"] {
        let desc = manifest(&reg, repo, "many")["layers"][0].clone();
        let digest = desc["digest"].as_str().unwrap().to_string();
        let bad_at = tamper_first_chunk(&reg, &desc, victim);
        let proxy = CountingProxy::start(&reg.addr(), None);
        let env = trusting();
        let m = Mounted::new(&env, &format!("{}/{repo}:many", proxy.addr()), &[]);
        // The victim is read after the switch: the stream meets the bad chunk first.
        assert_eq!(
            read_all_backwards(&m, &files),
            vec![victim.to_string()],
            "{repo}"
        );
        let e = std::fs::read(m.path.join(victim)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{repo}: {e}");
        unmount(&env, &m);
        let log = mount_logs(&env);
        assert!(
            log.lines()
                .any(|l| l.contains(&digest) && l.contains(victim)),
            "{repo}: the log does not name the bad chunk's file:\n{log}"
        );
        // Nothing unverified was kept: a new mount on the same cache fetches
        // the bad chunk again and fails again, reading nothing else anew.
        proxy.reset();
        let m = Mounted::new(&env, &format!("{}/{repo}:many", proxy.addr()), &[]);
        assert_eq!(
            read_all_backwards(&m, &files),
            vec![victim.to_string()],
            "{repo}"
        );
        unmount(&env, &m);
        let again: Vec<_> = proxy
            .blob_requests(&digest)
            .into_iter()
            .map(|q| q.range.unwrap_or_default())
            .collect();
        assert!(
            !again.is_empty()
                && again
                    .iter()
                    .all(|r| r.starts_with(&format!("bytes={bad_at}-"))),
            "{repo}: a warm cache with one bad chunk at {bad_at} asked for {again:?}"
        );
    }
}
