//! Gzip checkpoint indexes shared through the registry (issue 13): machine A
//! reads an image whole and pushes its index; machine B, with its own cache,
//! reads single files by range, verified, and shows the same tree. A forged
//! index never makes a wrong byte; `--no-index` ignores it.

mod common;

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::counting::CountingProxy;
use common::image::{
    Blob, Compress, LayerBuilder, Pushed, layer_blob, push_alpine, push_blob, push_image,
    push_manifest, sha256,
};
use common::listing::assert_same_tree;
use common::*;
use rimg::image::LayerGzIndex;
use rimg::layer::{Entry, EntryKind};

#[test]
fn a_pushed_index_lets_another_cache_read_one_file_by_range() {
    let reg = Registry::start(Auth::None);
    let pushed = push_alpine(&reg, "src", "3.20", "3.20.3", "amd64", true);
    let _ = pushed;
    let a = Env::new();
    let r = format!("{}/src:3.20", reg.addr());
    let out = a.ok(&["index", "push", &r]);
    assert!(out.contains("pushed sha256:"), "{out}");
    let want = a.ok(&["cat", &r, "/etc/os-release"]);

    let proxy = CountingProxy::start(&reg.addr(), None);
    let b = Env::new();
    let rb = format!("{}/src:3.20", proxy.addr());
    let got = b.ok(&["cat", "-v", "--trust-index", &rb, "/etc/os-release"]);
    assert_eq!(got, want);
    let blob = std::fs::metadata(alpine("3.20.3", "x86_64")).unwrap().len();
    assert!(proxy.sent() < blob, "fetched {} of {blob}", proxy.sent());
}

// ---- A two-layer image whose bottom layer has many checkpoints ----

const REPO: &str = "big";
const TAG: &str = "v1";
/// Near the end of the bottom layer.
const SMALL: &str = "etc/small.txt";
/// ~10 MB, deep in the bottom layer.
const LARGE: &str = "data/deep/large.bin";
/// In the bottom layer, deleted by the top one.
const GONE: &str = "data/gone.bin";
/// Two of the 1 MiB files of the bottom layer (same size, different bytes).
const SAME_SIZE: [&str; 2] = ["data/f03.bin", "data/f04.bin"];
const MIB: usize = 1 << 20;
/// Headers, manifests, config, the referrers index: what a read costs on
/// the wire besides layer and index bytes.
const SLACK: u64 = 256 << 10;

struct Image {
    bottom: Blob,
    top: Blob,
    /// Path -> content of the bottom layer's files that the tests read.
    small: Vec<u8>,
    large: Vec<u8>,
    same_size: [Vec<u8>; 2],
}

/// Pseudo-random bytes from a 32-letter alphabet: about 5 bits of entropy
/// per byte, so gzip keeps roughly two thirds of them.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for k in 0..8 {
            out.push(b'0' + ((x >> (k * 8)) as u8 & 31));
        }
    }
    out.truncate(len);
    out
}

/// gzip -1 (the system's: an unoptimised test build compresses 40 MB slowly).
fn gzip_blob(tar: &[u8]) -> Blob {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-1", "-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = tar.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    Blob {
        digest: sha256(&out.stdout),
        diff_id: sha256(tar),
        bytes: out.stdout,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    }
}

/// Built once for all tests of this file: ~40 MB of tar, ~27 MB of gzip.
fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let mut b = LayerBuilder::new();
        b.dir("data", 0o755)
            .dir("data/deep", 0o755)
            .dir("etc", 0o755);
        let mut same_size = [Vec::new(), Vec::new()];
        let large = noise(1000, 10 * MIB + 12345);
        for i in 0..26u64 {
            let name = format!("data/f{i:02}.bin");
            let data = noise(i, MIB);
            if let Some(k) = SAME_SIZE.iter().position(|s| *s == name) {
                same_size[k] = data.clone();
            }
            b.file(&name, &data, 0o644);
            if i == 8 {
                b.file(LARGE, &large, 0o644);
                b.file(GONE, &noise(2000, 300_000), 0o644);
            }
        }
        let small = b"a small file near the end of the layer\n".repeat(30);
        b.file(SMALL, &small, 0o644);
        b.file("data/tail.bin", &noise(3000, MIB / 2), 0o644);
        let bottom = gzip_blob(&b.finish());
        let mut t = LayerBuilder::new();
        t.dir("data", 0o755).whiteout(GONE).dir("etc", 0o755).file(
            "etc/top.txt",
            b"from the top layer\n",
            0o644,
        );
        let top = layer_blob(&t.finish(), Compress::Gzip, true);
        Image {
            bottom,
            top,
            small,
            large,
            same_size,
        }
    })
}

fn push_big(reg: &Registry) -> Pushed {
    let im = image();
    push_image(
        reg,
        REPO,
        TAG,
        &[im.bottom.clone(), im.top.clone()],
        "amd64",
        true,
    )
}

fn curl_get(reg: &Registry, path: &str, accept: &str) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-sSf", "-H", &format!("Accept: {accept}")])
        .arg(format!("{}{path}", reg.url()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "GET {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The fallback-tag index listing the image's referrers (distribution 2.8
/// has no referrers API).
fn referrers_tag(pushed: &Pushed) -> String {
    pushed.manifest_digest.replace(':', "-")
}

/// The newest published index artifact: its manifest, and per layer digest
/// the index blob's digest and size.
fn published(reg: &Registry, pushed: &Pushed) -> (serde_json::Value, Vec<(String, String, u64)>) {
    let index: serde_json::Value = serde_json::from_slice(&curl_get(
        reg,
        &format!("/v2/{REPO}/manifests/{}", referrers_tag(pushed)),
        OCI_INDEX,
    ))
    .unwrap();
    let newest = index["manifests"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(newest["artifactType"], rimg::image::ARTIFACT_TYPE);
    let manifest: serde_json::Value = serde_json::from_slice(&curl_get(
        reg,
        &format!(
            "/v2/{REPO}/manifests/{}",
            newest["digest"].as_str().unwrap()
        ),
        OCI_MANIFEST,
    ))
    .unwrap();
    let blobs = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["annotations"]["dev.rimg.layer.digest"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect();
    (manifest, blobs)
}

/// The published index of the bottom layer, decoded from the registry's
/// storage, and the size of every index blob of the artifact.
fn bottom_index(reg: &Registry, pushed: &Pushed) -> (LayerGzIndex, u64) {
    let (_, blobs) = published(reg, pushed);
    let im = image();
    let (_, digest, _) = blobs
        .iter()
        .find(|(layer, _, _)| *layer == im.bottom.digest)
        .expect("an index of the bottom layer");
    let bytes = std::fs::read(reg.blob_file(digest)).unwrap();
    let ix = LayerGzIndex::decode(&bytes, &im.bottom.digest, im.bottom.bytes.len() as u64).unwrap();
    (ix, blobs.iter().map(|b| b.2).sum())
}

/// Pushes `ix` as the bottom layer's index in a new artifact referring to
/// the image, listed after (newer than) the ones before it.
fn push_forged(reg: &Registry, pushed: &Pushed, ix: &LayerGzIndex) {
    let (mut manifest, _) = published(reg, pushed);
    let bytes = ix.encode().unwrap();
    let digest = push_blob(reg, REPO, &bytes);
    for l in manifest["layers"].as_array_mut().unwrap() {
        if l["annotations"]["dev.rimg.layer.digest"] == ix.layer.as_str() {
            l["digest"] = digest.clone().into();
            l["size"] = bytes.len().into();
        }
    }
    // A distinct manifest even when the same forgery is pushed twice.
    manifest["annotations"] = serde_json::json!({"org.example.forged": digest});
    let body = serde_json::to_vec(&manifest).unwrap();
    let mdigest = push_manifest(reg, REPO, &sha256(&body), OCI_MANIFEST, &body);
    let tag = referrers_tag(pushed);
    let mut index: serde_json::Value = serde_json::from_slice(&curl_get(
        reg,
        &format!("/v2/{REPO}/manifests/{tag}"),
        OCI_INDEX,
    ))
    .unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": mdigest,
            "size": body.len(),
            "artifactType": rimg::image::ARTIFACT_TYPE,
        }));
    let body = serde_json::to_vec(&index).unwrap();
    push_manifest(reg, REPO, &tag, OCI_INDEX, &body);
}

/// The index entry of `path`.
fn entry<'a>(ix: &'a LayerGzIndex, path: &str) -> &'a Entry {
    ix.entries
        .entries
        .iter()
        .find(|e| e.path == path.as_bytes())
        .unwrap_or_else(|| panic!("{path} is not in the index"))
}

/// Compressed bytes a read of `path` may fetch from the bottom layer: the
/// spans covering its tar header and data, plus one span of read-ahead.
fn span_bytes(ix: &LayerGzIndex, path: &str) -> (u64, usize) {
    let e = entry(ix, path);
    let first = ix.zran.span_of(e.offset - 512).unwrap();
    let last = ix.zran.span_of(e.offset + e.size - 1).unwrap();
    let last = (last + 1).min(ix.zran.spans.len() - 1);
    let bytes = ix.zran.spans[first..=last].iter().map(|s| s.clen).sum();
    (bytes, last - first + 1)
}

/// `rimg cat` of `path` on `env`: its bytes, asserted to have succeeded.
fn cat(env: &Env, reference: &str, path: &str, extra: &[&str]) -> Vec<u8> {
    let mut args = vec!["cat"];
    args.extend_from_slice(extra);
    let p = format!("/{path}");
    args.extend([reference, p.as_str()]);
    let out = env.run(&args);
    assert!(
        out.status.success(),
        "rimg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn another_cache_reads_a_small_and_a_large_file_by_range_and_mounts_umocis_tree() {
    let im = image();
    let reg = Registry::start(Auth::None);
    let pushed = push_big(&reg);
    let r = format!("{}/{REPO}:{TAG}", reg.addr());
    let a = Env::new();
    let out = a.ok(&["index", "push", &r]);
    assert!(out.contains("pushed sha256:"), "{out}");
    let want_small = cat(&a, &r, SMALL, &[]);
    let want_large = cat(&a, &r, LARGE, &[]);
    assert_eq!(want_small, im.small);
    assert_eq!(want_large, im.large);

    let (ix, index_bytes) = bottom_index(&reg, &pushed);
    assert!(
        ix.zran.spans.len() >= 8,
        "{} checkpoints",
        ix.zran.spans.len()
    );
    let blob = im.bottom.bytes.len() as u64;
    let top = im.top.bytes.len() as u64;
    let proxy = CountingProxy::start(&reg.addr(), None);
    let b = Env::new();
    let rb = format!("{}/{REPO}:{TAG}", proxy.addr());

    let got = cat(&b, &rb, SMALL, &["--trust-index"]);
    assert_eq!(got, want_small);
    let (spans, n) = span_bytes(&ix, SMALL);
    let bound = index_bytes + spans + top + SLACK;
    eprintln!(
        "small file: fetched {} bytes ({n} spans {spans}, indexes {index_bytes}) of a {blob}-byte layer",
        proxy.sent()
    );
    assert!(
        proxy.sent() <= bound,
        "a cold cat of {SMALL} fetched {} bytes, over {bound}",
        proxy.sent()
    );

    proxy.reset();
    let got = cat(&b, &rb, LARGE, &["--trust-index"]);
    assert!(got == want_large, "{LARGE} differs from machine A's");
    let (spans, n) = span_bytes(&ix, LARGE);
    // A read this large passes the point where the rest of the layer is
    // streamed (issue 28): at most the streaming steps in flight when the
    // cat ends come on top of its own spans.
    let streaming = rimg::cache::ranged::STREAM_WINDOW * rimg::cache::ranged::STREAM_WORKERS as u64;
    let bound = index_bytes + spans + top + SLACK + streaming;
    eprintln!(
        "large file: fetched {} bytes ({n} spans {spans}) of a {blob}-byte layer",
        proxy.sent()
    );
    assert!(
        proxy.sent() <= bound,
        "a cat of {LARGE} fetched {} bytes, over {bound}",
        proxy.sent()
    );
    assert!(proxy.sent() < blob);

    let m = Mounted::new(&b, &rb, &["--trust-index"]);
    assert!(!m.path.join(GONE).exists(), "the whiteout hides {GONE}");
    let (_d, rootfs) = umoci_unpack(&reg, REPO, TAG);
    assert_same_tree(&m.path, &rootfs);
}

#[test]
fn a_cold_cat_of_a_file_well_inside_one_span_fetches_only_that_span() {
    let im = image();
    let reg = Registry::start(Auth::None);
    let pushed = push_big(&reg);
    let r = format!("{}/{REPO}:{TAG}", reg.addr());
    Env::new().ok(&["index", "push", &r]);
    let (ix, index_bytes) = bottom_index(&reg, &pushed);
    // A 1 MiB file inside one span that ends well past the 512 KiB
    // read-ahead after it.
    let (name, data, spans) = (0..26)
        .find_map(|i| {
            let name = format!("data/f{i:02}.bin");
            let e = entry(&ix, &name);
            let k = ix.zran.span_of(e.offset - 512)?;
            let s = &ix.zran.spans[k];
            let end = e.offset + e.size + (1 << 20);
            (s.out + s.out_len > end).then(|| (name, noise(i, MIB), s.clen))
        })
        .expect("a file well inside a span");
    let proxy = CountingProxy::start(&reg.addr(), None);
    let rb = format!("{}/{REPO}:{TAG}", proxy.addr());
    assert!(cat(&Env::new(), &rb, &name, &["--trust-index"]) == data);
    let bound = index_bytes + spans + im.top.bytes.len() as u64 + SLACK;
    assert!(
        proxy.sent() <= bound,
        "a cold cat of {name} fetched {} bytes; its span is {spans}, the indexes {index_bytes}",
        proxy.sent()
    );
}

#[test]
fn index_build_reports_an_index_under_two_percent_of_the_layers() {
    let reg = Registry::start(Auth::None);
    push_big(&reg);
    let r = format!("{}/{REPO}:{TAG}", reg.addr());
    let out = Env::new().ok(&["index", "build", &r]);
    eprintln!("{out}");
    let total = out
        .lines()
        .find(|l| l.contains("bytes of index for"))
        .unwrap_or_else(|| panic!("no total line: {out}"));
    let pct: f64 = total
        .rsplit_once('(')
        .and_then(|(_, p)| p.strip_suffix("%)"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no percentage: {total}"));
    assert!(pct < 2.0, "{total}");
    assert!(total.starts_with("2 gzip layers"), "{total}");
    // The bottom layer's own line: many checkpoints, a small fraction.
    let short = &image().bottom.digest[7..19];
    let line = out.lines().find(|l| l.contains(short)).unwrap();
    let spans: usize = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(spans >= 8, "{line}");
}

/// Runs `rimg cat` of `path` on a fresh cache and insists it either fails
/// with one line naming the layer and the file, or prints `want`; never
/// other bytes (a failure may have printed a prefix of `want`). Returns the
/// refusal: the error line, or the warning that set the index aside.
fn cat_is_right_or_refused(reg: &Registry, path: &str, want: &[u8]) -> Option<String> {
    let env = Env::new();
    let r = format!("{}/{REPO}:{TAG}", reg.addr());
    let p = format!("/{path}");
    let out = env.run(&["cat", "--trust-index", &r, &p]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    if out.status.success() {
        assert!(out.stdout == want, "cat of {path} printed wrong bytes");
        // A published index found wrong before use is set aside with a
        // warning and the layer read whole: refused, as far as the index goes.
        return err
            .lines()
            .find(|l| l.contains("the layer is fetched whole"))
            .map(str::to_string);
    }
    assert!(
        want.starts_with(&out.stdout),
        "a failed cat of {path} printed bytes that are not the file's"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("rimg: ")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(lines[0].contains(&image().bottom.digest), "{}", lines[0]);
    assert!(lines[0].contains(path), "{}", lines[0]);
    Some(lines[0].to_string())
}

/// A registry with the image and machine A's honest index pushed; the
/// honest index of the bottom layer.
fn with_honest_index() -> (Registry, Pushed, LayerGzIndex) {
    let reg = Registry::start(Auth::None);
    let pushed = push_big(&reg);
    let r = format!("{}/{REPO}:{TAG}", reg.addr());
    Env::new().ok(&["index", "push", &r]);
    let (honest, _) = bottom_index(&reg, &pushed);
    (reg, pushed, honest)
}

/// `ix` with the data offset of `path` set to `offset`.
fn moved(ix: &LayerGzIndex, path: &str, offset: u64) -> LayerGzIndex {
    let mut ix = ix.clone();
    ix.entries
        .entries
        .iter_mut()
        .find(|e| e.path == path.as_bytes())
        .unwrap()
        .offset = offset;
    ix
}

#[test]
fn an_index_entry_moved_onto_another_files_data_of_the_same_size_is_refused() {
    let im = image();
    let (reg, pushed, honest) = with_honest_index();
    // data/f03.bin's data offset set to data/f04.bin's (both 1 MiB).
    let other = entry(&honest, SAME_SIZE[1]).offset;
    push_forged(&reg, &pushed, &moved(&honest, SAME_SIZE[0], other));
    let err = cat_is_right_or_refused(&reg, SAME_SIZE[0], &im.same_size[0]);
    eprintln!("moved onto another file: {err:?}");
    assert!(err.is_some(), "the moved offset went unnoticed");
    // The file whose bytes it pointed at still reads right (or is refused).
    cat_is_right_or_refused(&reg, SAME_SIZE[1], &im.same_size[1]);
}

#[test]
fn an_index_entry_moved_into_another_files_data_is_refused() {
    let im = image();
    let (reg, pushed, honest) = with_honest_index();
    // The small file placed 4 MiB into the large one.
    let inside = entry(&honest, LARGE).offset + 4 * MIB as u64;
    push_forged(&reg, &pushed, &moved(&honest, SMALL, inside));
    let err = cat_is_right_or_refused(&reg, SMALL, &im.small);
    eprintln!("moved into another file: {err:?}");
    assert!(err.is_some(), "the moved offset went unnoticed");
    let err = err.unwrap();
    assert!(
        err.contains("tar header") || err.contains("where no file's data can be"),
        "{err}"
    );
    // The large file, now overlapped by the forged entry: right or refused.
    cat_is_right_or_refused(&reg, LARGE, &im.large);
    // Moved by one byte: no tar header in front of it.
    push_forged(
        &reg,
        &pushed,
        &moved(&honest, SMALL, entry(&honest, SMALL).offset + 1),
    );
    let err = cat_is_right_or_refused(&reg, SMALL, &im.small);
    assert!(err.is_some(), "an offset one byte off went unnoticed");
}

#[test]
fn a_span_with_a_wrong_hash_is_refused() {
    let im = image();
    let (reg, pushed, honest) = with_honest_index();
    // The span holding the small file.
    let mut ix = honest.clone();
    let i = ix.zran.span_of(entry(&honest, SMALL).offset).unwrap();
    ix.zran.spans[i].sha256[0] ^= 1;
    push_forged(&reg, &pushed, &ix);
    let err = cat_is_right_or_refused(&reg, SMALL, &im.small);
    eprintln!("wrong span hash: {err:?}");
    assert!(err.is_some(), "a span with a wrong hash was used");
    // A span in the middle of the large file: some of it may be printed,
    // never a wrong byte.
    let mut ix = honest.clone();
    let i = ix
        .zran
        .span_of(entry(&honest, LARGE).offset + 5 * MIB as u64)
        .unwrap();
    ix.zran.spans[i].sha256[31] ^= 0x80;
    push_forged(&reg, &pushed, &ix);
    let err = cat_is_right_or_refused(&reg, LARGE, &im.large);
    assert!(err.is_some(), "a span with a wrong hash was used");
}

#[test]
fn no_index_fetches_the_layer_whole_and_reads_the_same_bytes() {
    let im = image();
    let reg = Registry::start(Auth::None);
    push_big(&reg);
    let r = format!("{}/{REPO}:{TAG}", reg.addr());
    Env::new().ok(&["index", "push", &r]);
    let proxy = CountingProxy::start(&reg.addr(), None);
    let d = Env::new();
    let rd = format!("{}/{REPO}:{TAG}", proxy.addr());
    let got = cat(&d, &rd, SMALL, &["--no-index"]);
    assert_eq!(got, im.small);
    let blob = im.bottom.bytes.len() as u64;
    assert!(
        proxy.sent() >= blob,
        "--no-index fetched {} bytes of a {blob}-byte layer",
        proxy.sent()
    );
    assert!(d.cache_dir().join("blobs").exists());
}

/// The log of the mount at `m` in `env`'s cache.
fn mount_log(env: &Env) -> String {
    let mut out = String::new();
    if let Ok(dir) = std::fs::read_dir(env.cache_dir().join("logs")) {
        for f in dir.flatten() {
            out += &std::fs::read_to_string(f.path()).unwrap_or_default();
        }
    }
    out
}

/// Machine B mounts with `--prefetch` through an index with an invented
/// entry and waits for the server to drop it; returns B, the proxy and B's
/// reference.
fn prefetch_through_an_invented_entry() -> (Registry, CountingProxy, Env, String) {
    let im = image();
    let (reg, pushed, mut ix) = with_honest_index();
    let mut invented = Entry::new(INVENTED.as_bytes(), EntryKind::File);
    invented.offset = entry(&ix, SMALL).offset;
    ix.entries.entries.push(invented);
    push_forged(&reg, &pushed, &ix);

    let proxy = CountingProxy::start(&reg.addr(), None);
    let b = Env::new();
    let rb = format!("{}/{REPO}:{TAG}", proxy.addr());
    {
        let m = Mounted::new(&b, &rb, &["--prefetch", "--trust-index"]);
        // Until the whole layer is had, the invented entry shows.
        assert!(m.path.join(INVENTED).exists());
        let dropped = wait_for(Duration::from_secs(120), || {
            let log = mount_log(&b);
            log.lines()
                .any(|l| l.contains("differs from the layer itself") && l.contains(INVENTED))
        });
        assert!(dropped, "log: {}", mount_log(&b));
        // Found lying: this mount refuses the layer's bytes from then on.
        let e = std::fs::read(m.path.join(SMALL)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        let _ = im;
    }
    (reg, proxy, b, rb)
}

const INVENTED: &str = "etc/invented.txt";

#[test]
fn prefetch_through_an_index_whose_entries_differ_logs_that_it_was_dropped() {
    prefetch_through_an_invented_entry();
}

#[test]
fn after_prefetch_dropped_an_index_the_next_mount_reads_the_layer_whole() {
    let im = image();
    let (_reg, proxy, b, rb) = prefetch_through_an_invented_entry();
    proxy.reset();
    let m = Mounted::new(&b, &rb, &["--trust-index"]);
    assert_eq!(std::fs::read(m.path.join(SMALL)).unwrap(), im.small);
    let blob = im.bottom.bytes.len() as u64;
    assert!(
        !m.path.join(INVENTED).exists(),
        "the dropped index is used again; fetched {} bytes",
        proxy.sent()
    );
    assert!(
        proxy.sent() >= blob,
        "the next mount fetched {} bytes of a {blob}-byte layer",
        proxy.sent()
    );
}

// ---- Issue 23: a published index is used only when trusted; a trusted
// ---- one that lies is refused or found out, never served as the layer ----

/// The published index of the top layer (the one with the whiteout).
fn top_index(reg: &Registry, pushed: &Pushed) -> LayerGzIndex {
    let (_, blobs) = published(reg, pushed);
    let im = image();
    let (_, digest, _) = blobs
        .iter()
        .find(|(layer, _, _)| *layer == im.top.digest)
        .expect("an index of the top layer");
    let bytes = std::fs::read(reg.blob_file(digest)).unwrap();
    LayerGzIndex::decode(&bytes, &im.top.digest, im.top.bytes.len() as u64).unwrap()
}

/// A fresh cache with default options mounts exactly umoci's tree and
/// reads the small and large files right: the published index, whatever
/// it says, is ignored.
fn default_view_is_umocis(reg: &Registry) {
    let im = image();
    let env = Env::new();
    let r = format!("{}/{REPO}:{TAG}", reg.addr());
    let out = env.run(&["cat", "-v", &r, &format!("/{SMALL}")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(out.stdout, im.small);
    assert!(err.contains("ignored"), "no reason logged: {err}");
    let m = Mounted::new(&env, &r, &[]);
    assert!(std::fs::read(m.path.join(LARGE)).unwrap() == im.large);
    let (_d, rootfs) = umoci_unpack(reg, REPO, TAG);
    assert_same_tree(&m.path, &rootfs);
}

/// `rimg verify` of the image: (success, stdout, stderr).
fn verify(reg: &Registry, extra: &[&str]) -> (bool, String, String) {
    let r = format!("{}/{REPO}:{TAG}", reg.addr());
    let mut args = vec!["verify"];
    args.extend_from_slice(extra);
    args.push(&r);
    let out = Env::new().run(&args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every checkpoint window replaced by as many `Z`s: the compressed spans
/// still hash right, the inflated bytes do not.
fn forge_windows(ix: &LayerGzIndex) -> LayerGzIndex {
    use std::io::{Read, Write};
    let mut ix = ix.clone();
    for s in ix.zran.spans.iter_mut().filter(|s| !s.window.is_empty()) {
        let mut w = Vec::new();
        flate2::read::DeflateDecoder::new(&s.window[..])
            .read_to_end(&mut w)
            .unwrap();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&vec![b'Z'; w.len()]).unwrap();
        s.window = e.finish().unwrap();
    }
    ix
}

#[test]
fn an_honest_index_published_elsewhere_is_ignored_without_trust_and_the_layer_read_whole() {
    let im = image();
    let (reg, _, _) = with_honest_index();
    let proxy = CountingProxy::start(&reg.addr(), None);
    let rb = format!("{}/{REPO}:{TAG}", proxy.addr());
    let out = Env::new().run(&["cat", "-v", &rb, &format!("/{SMALL}")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(out.stdout, im.small);
    assert!(err.contains("--trust-index was not given"), "{err}");
    let blob = im.bottom.bytes.len() as u64;
    assert!(proxy.sent() >= blob, "fetched {} of {blob}", proxy.sent());
}

#[test]
fn forged_windows_are_ignored_by_default_found_by_verify_and_purged_after_a_trusted_prefetch() {
    let im = image();
    let (reg, pushed, honest) = with_honest_index();
    push_forged(&reg, &pushed, &forge_windows(&honest));
    default_view_is_umocis(&reg);
    let (ok, out, err) = verify(&reg, &[]);
    assert!(!ok, "{out}");
    assert!(err.contains("forged window"), "{err}");
    assert!(out.contains("index FAILED"), "{out}");

    // Trusted anyway: once every span is held the tar is hashed against
    // its diff_id, the index distrusted and its bytes dropped.
    let b = Env::new();
    let r = format!("{}/{REPO}:{TAG}", reg.addr());
    {
        let _m = Mounted::new(&b, &r, &["--prefetch", "--trust-index"]);
        let found = wait_for(Duration::from_secs(120), || {
            mount_log(&b).contains("not its diff_id")
        });
        assert!(found, "log: {}", mount_log(&b));
    }
    let lazy = b.cache_dir().join("lazy/sha256");
    let hex = &im.bottom.digest[7..];
    for ext in ["data", "have", "idx"] {
        let p = lazy.join(format!("{hex}-gzidx.{ext}"));
        assert!(!p.exists(), "{} kept after the mismatch", p.display());
    }
    assert!(lazy.join(format!("{hex}-gzidx.distrusted")).exists());
    // The honest index published again: the same cache reads right bytes.
    push_forged(&reg, &pushed, &honest);
    assert!(cat(&b, &r, LARGE, &["--trust-index"]) == im.large);
    assert_eq!(cat(&b, &r, SMALL, &["--trust-index"]), im.small);
}

/// With `--trust-index`, a fresh cache reads `SMALL` right and the
/// refusal of the index is logged with `reason`.
fn trusted_cat_refuses_the_index(reg: &Registry, reason: &str) {
    let r = format!("{}/{REPO}:{TAG}", reg.addr());
    for path in [SMALL, SAME_SIZE[1]] {
        let env = Env::new();
        let out = env.run(&["cat", "-v", "--trust-index", &r, &format!("/{path}")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let want: &[u8] = if path == SMALL {
            &image().small
        } else {
            &image().same_size[1]
        };
        assert!(out.stdout == want, "wrong bytes of {path}");
        assert!(err.contains(reason), "{reason:?} not in {err}");
    }
}

#[test]
fn an_index_with_a_sparse_entry_over_other_bytes_is_refused_even_when_trusted() {
    let (reg, pushed, honest) = with_honest_index();
    let mut ix = honest.clone();
    let large = entry(&honest, LARGE).offset;
    let e = ix
        .entries
        .entries
        .iter_mut()
        .find(|e| e.path == SMALL.as_bytes())
        .unwrap();
    // 1-byte segments picked out of the large file's data.
    e.offset = large;
    e.sparse = Some(
        (0..e.size)
            .map(|i| rimg::layer::Segment {
                logical: i,
                stored: i * 37,
                len: 1,
            })
            .collect(),
    );
    push_forged(&reg, &pushed, &ix);
    default_view_is_umocis(&reg);
    trusted_cat_refuses_the_index(&reg, "a sparse file");
    let (ok, _, err) = verify(&reg, &[]);
    assert!(!ok && err.contains("a sparse file"), "{err}");
}

#[test]
fn an_index_with_a_hardlink_or_a_long_setuid_name_is_refused_even_when_trusted() {
    let (reg, pushed, honest) = with_honest_index();
    let mut ix = honest.clone();
    let mut link = Entry::new(b"etc/passwd", EntryKind::Hardlink);
    link.link = Some(SMALL.as_bytes().to_vec());
    ix.entries.entries.push(link);
    push_forged(&reg, &pushed, &ix);
    trusted_cat_refuses_the_index(&reg, "a hardlink");

    let mut ix = honest.clone();
    let e = ix
        .entries
        .entries
        .iter_mut()
        .find(|e| e.path == SAME_SIZE[0].as_bytes())
        .unwrap();
    e.path = format!("data/{}", "x".repeat(109)).into_bytes();
    e.mode = 0o4755;
    push_forged(&reg, &pushed, &ix);
    default_view_is_umocis(&reg);
    trusted_cat_refuses_the_index(&reg, "long-name or PAX header");
    let (ok, _, err) = verify(&reg, &[]);
    assert!(!ok && err.contains("long-name"), "{err}");
}

#[test]
fn an_omitted_whiteout_is_ignored_by_default_and_found_by_verify() {
    let (reg, pushed, _) = with_honest_index();
    let mut top = top_index(&reg, &pushed);
    let before = top.entries.entries.len();
    top.entries
        .entries
        .retain(|e| !e.path.ends_with(b".wh.gone.bin"));
    assert_eq!(top.entries.entries.len(), before - 1);
    push_forged(&reg, &pushed, &top);
    default_view_is_umocis(&reg);
    let (ok, out, err) = verify(&reg, &[]);
    assert!(!ok, "{out}");
    assert!(err.contains("split view"), "{err}");
    assert!(err.contains(".wh.gone.bin"), "{err}");
}

#[test]
fn a_small_index_of_thirty_million_entries_is_refused_quickly_even_when_trusted() {
    use std::io::Write;
    let (reg, pushed, honest) = with_honest_index();
    let mut plain = postcard::to_stdvec(&(1u32, &honest.layer, honest.blob_size)).unwrap();
    let mut n: u64 = 30_000_000;
    while n >= 0x80 {
        plain.push(n as u8 | 0x80);
        n >>= 7;
    }
    plain.push(n as u8);
    let one = postcard::to_stdvec(&Entry::new(b"x", EntryKind::File)).unwrap();
    let mut z = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    z.write_all(&plain).unwrap();
    for _ in 0..3_000_000 {
        z.write_all(&one).unwrap();
    }
    let bomb = z.finish().unwrap();
    assert!(bomb.len() < 100_000, "{} bytes", bomb.len());
    // Pushed as the bottom layer's index blob, in place of the honest one.
    let (mut manifest, _) = published(&reg, &pushed);
    let digest = push_blob(&reg, REPO, &bomb);
    for l in manifest["layers"].as_array_mut().unwrap() {
        if l["annotations"]["dev.rimg.layer.digest"] == honest.layer.as_str() {
            l["digest"] = digest.clone().into();
            l["size"] = bomb.len().into();
        }
    }
    manifest["annotations"] = serde_json::json!({"org.example.bomb": digest});
    let body = serde_json::to_vec(&manifest).unwrap();
    let mdigest = push_manifest(&reg, REPO, &sha256(&body), OCI_MANIFEST, &body);
    let tag = referrers_tag(&pushed);
    let mut index: serde_json::Value = serde_json::from_slice(&curl_get(
        &reg,
        &format!("/v2/{REPO}/manifests/{tag}"),
        OCI_INDEX,
    ))
    .unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": OCI_MANIFEST, "digest": mdigest, "size": body.len(),
            "artifactType": rimg::image::ARTIFACT_TYPE,
        }));
    let body = serde_json::to_vec(&index).unwrap();
    push_manifest(&reg, REPO, &tag, OCI_INDEX, &body);

    let started = std::time::Instant::now();
    let env = Env::new();
    let r = format!("{}/{REPO}:{TAG}", reg.addr());
    let out = env.run(&["cat", "-v", "--trust-index", &r, &format!("/{SMALL}")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(out.stdout, image().small);
    assert!(
        err.contains("lists 30000000 entries, more than 1048576"),
        "{err}"
    );
    // Refused before the layer's whole download starts, not after minutes
    // of decoding.
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "{:?}",
        started.elapsed()
    );
    let lazy = env.cache_dir().join("lazy/sha256");
    for f in std::fs::read_dir(&lazy).into_iter().flatten().flatten() {
        let len = f.metadata().unwrap().len();
        assert!(len < 1 << 20, "{} is {len} bytes", f.path().display());
    }
}

#[test]
fn verify_passes_an_honest_image_and_index_and_says_so_per_layer() {
    let (reg, _, _) = with_honest_index();
    let (ok, out, err) = verify(&reg, &[]);
    assert!(ok, "{out}{err}");
    let bottom = &image().bottom.digest;
    let line = out
        .lines()
        .find(|l| l.contains(bottom.as_str()))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("gzip: digest ok, diff_id ok, index ok"),
        "{line}"
    );
    assert!(out.contains("verified"), "{out}");
    let (ok, out, _) = verify(&reg, &["--json"]);
    assert!(ok);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0]["checks"]["index"]["result"], "ok");
    assert_eq!(lines[2]["ok"], true);
    assert_eq!(lines[2]["policy"]["accepted"], true);
}

#[test]
fn a_registry_that_ignores_range_serves_the_layer_whole_through_a_trusted_index() {
    let im = image();
    let (reg, _, _) = with_honest_index();
    let front = common::proxy::RedirectProxy::start(&reg);
    let r = format!("{}/{REPO}:{TAG}", front.addr());
    let out = Env::new().run(&["cat", "--trust-index", &r, &format!("/{SMALL}")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(out.stdout, im.small);
    assert!(err.contains("ignores Range"), "{err}");
}
