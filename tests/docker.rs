//! The docker engine as a real client (Debian's docker.io 20.10, its own
//! daemon per test): every `rimg export` form loaded into docker gives the
//! tree docker's own pull gives, and `rimg mount` shows that tree too, but
//! for the places where docker departs from umoci and containerd:
//! - docker's container init layer (`/.dockerenv`, `/etc/hosts`, `/dev`...)
//!   is in every `docker export`, so those paths are left out;
//! - the vfs driver's copy loses `user.*` xattrs (and turns hardlinked
//!   symlinks into copies), so xattrs are compared only as far as docker
//!   keeps them;
//! - docker applies a hardlink entry's own mode to the inode it links to
//!   (`chmod` after `link`); umoci and containerd keep the target's mode. The
//!   rules image's `usr/bin/prog` (0755) gets 0644 from the hardlink
//!   `usr/bin/prog-link2` under docker; asserted as such;
//! - `docker create` makes the config's working directory (`/root` here)
//!   when the image lacks it;
//! - docker refuses zstd layers (rimg reads them; `rimg export --compress
//!   gzip` makes an archive docker loads), GNU sparse entries and duplicate
//!   paths, and makes parent directories a layer implies 0600 where umoci
//!   makes them 0755; the rules images here hold none of these.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::docker::{Dockerd, INIT_LAYER};
use common::fixtures::{push_rules, rule_layers};
use common::image::{Compress, layer_blob, push_alpine, push_image};
use common::listing::{EntryInfo, diff_listings, tree_listing};
use common::*;

fn export(env: &Env, reference: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.tar");
    let mut args = vec!["export"];
    args.extend_from_slice(extra);
    args.push(reference);
    let o = out.display().to_string();
    args.push(&o);
    env.ok(&args);
    (dir, out)
}

/// A tree's listing without docker's init layer, and with only the xattrs
/// the vfs driver keeps (none in `user.*`).
fn comparable(root: &Path) -> BTreeMap<String, EntryInfo> {
    let mut l = tree_listing(root);
    for p in INIT_LAYER {
        l.remove(*p);
    }
    for e in l.values_mut() {
        e.xattrs.retain(|k, _| !k.starts_with("user."));
    }
    l
}

fn assert_same(
    what: &str,
    ours: &BTreeMap<String, EntryInfo>,
    docker: &BTreeMap<String, EntryInfo>,
) {
    let d = diff_listings(ours, docker);
    assert!(
        d.is_empty(),
        "{what}: {} entries differ from docker's pull:\n{}",
        d.len(),
        d.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(docker.len() > 3, "{what}: docker's tree is empty");
}

/// The images of these tests: every whiteout rule and entry type (docker
/// media types), and Alpine (OCI media types).
fn images(reg: &Registry) -> Vec<String> {
    push_rules(reg, "rules", "v1", false);
    push_alpine(reg, "alpine", "3.20", "3.20.3", "amd64", true);
    ["rules:v1", "alpine:3.20"]
        .iter()
        .map(|r| format!("{}/{r}", reg.addr()))
        .collect()
}

#[test]
fn every_export_form_loads_in_docker_with_the_tree_of_dockers_own_pull() {
    let reg = Registry::start(Auth::None);
    let docker = Dockerd::start();
    let env = Env::new();
    for (i, r) in images(&reg).iter().enumerate() {
        docker.ok(&["pull", r]);
        let (_p, pulled) = docker.tree(r);
        let want = comparable(&pulled);
        for (form, extra) in [
            ("default", &[][..]),
            ("flatten", &["--flatten"][..]),
            ("oci", &["--format", "oci"][..]),
        ] {
            let name = format!("rimg-test/{form}{i}:loaded");
            let mut args = extra.to_vec();
            args.extend(["--tag", &name]);
            let (_d, out) = export(&env, r, &args);
            if form == "oci" {
                // docker 20.10 loads no OCI layout archive (25 does): skopeo
                // copies it into the engine, as a user of that engine would.
                run_ok(
                    Command::new("skopeo")
                        .args(["copy", "-q", &docker.skopeo_host()])
                        .arg(format!("oci-archive:{}", out.display()))
                        .arg(format!("docker-daemon:{name}")),
                );
            } else {
                let loaded = docker.ok(&["load", "-i", out.to_str().unwrap()]);
                assert!(loaded.contains(&name), "{loaded}");
            }
            let (_t, tree) = docker.tree(&name);
            let ours = comparable(&tree);
            let mut want = want.clone();
            if form == "flatten" {
                // One layer, each file once with its own mode: docker has
                // no hardlink entry's mode to apply, as umoci has none.
                undo_departures(&ours, &mut want);
            }
            assert_same(&format!("{r} exported {form}"), &ours, &want);
        }
    }
}

/// Paths of the rules image whose mode docker takes from a hardlink entry
/// (0644) where umoci and rimg keep the file's own (0755).
const HARDLINK_MODE: &[&str] = &["usr/bin/prog", "usr/bin/prog-link2"];

/// Docker's tree of an image made comparable with umoci's semantics: the
/// departures above asserted, then undone.
fn undo_departures(ours: &BTreeMap<String, EntryInfo>, docker: &mut BTreeMap<String, EntryInfo>) {
    if !ours.contains_key("root") {
        docker.remove("root");
    }
    for p in HARDLINK_MODE {
        if let (Some(o), Some(d)) = (ours.get(*p), docker.get_mut(*p)) {
            assert_eq!(
                (o.mode, d.mode),
                (0o755, 0o644),
                "{p}: docker's departure changed"
            );
            d.mode = o.mode;
        }
    }
}

#[test]
fn a_mount_shows_the_tree_of_dockers_own_pull_but_for_known_departures() {
    let reg = Registry::start(Auth::None);
    let docker = Dockerd::start();
    let env = Env::new();
    for r in images(&reg) {
        docker.ok(&["pull", &r]);
        let (_p, pulled) = docker.tree(&r);
        let m = Mounted::new(&env, &r, &[]);
        let ours = comparable(&m.path);
        let mut want = comparable(&pulled);
        undo_departures(&ours, &mut want);
        assert_same(&format!("{r} mounted"), &ours, &want);
    }
}

#[test]
fn a_zstd_image_docker_refuses_loads_once_exported_with_compress_gzip() {
    let reg = Registry::start(Auth::None);
    let blobs: Vec<_> = rule_layers()
        .iter()
        .map(|t| layer_blob(t, Compress::Zstd, true))
        .collect();
    let pushed = push_image(&reg, "zstd", "v1", &blobs, "amd64", true);
    let r = format!("{}/zstd:v1", reg.addr());
    let docker = Dockerd::start();
    let env = Env::new();
    // Docker 20.10 pulls no zstd layer, and loads none as stored.
    assert!(
        !docker
            .command(&["pull", &r])
            .output()
            .unwrap()
            .status
            .success()
    );
    let (_k, kept) = export(&env, &r, &["--tag", "rimg-test/zstd:kept"]);
    let load = docker
        .command(&["load", "-i", kept.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!load.status.success(), "docker 20.10 loaded a zstd layer");

    let m = Mounted::new(&env, &r, &[]);
    let ours = comparable(&m.path);
    for (form, extra) in [("docker", &[][..]), ("oci", &["--format", "oci"][..])] {
        let name = format!("rimg-test/zstd-{form}:gzip");
        let mut args = vec!["--compress", "gzip", "--tag", &name];
        args.extend(extra);
        let (_d, out) = export(&env, &r, &args);
        // Same config (diff_ids unchanged), new gzip layers in the manifest.
        let x = tempfile::tempdir().unwrap();
        run_ok(
            Command::new("tar")
                .arg("-xf")
                .arg(&out)
                .arg("-C")
                .arg(x.path()),
        );
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(x.path().join("index.json")).unwrap()).unwrap();
        let digest = index["manifests"][0]["digest"].as_str().unwrap();
        let blob = |d: &str| std::fs::read(x.path().join("blobs/sha256").join(&d[7..])).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&blob(digest)).unwrap();
        assert_eq!(manifest["config"]["digest"], pushed.config_digest);
        for (layer, b) in manifest["layers"].as_array().unwrap().iter().zip(&blobs) {
            assert_eq!(
                layer["mediaType"],
                "application/vnd.oci.image.layer.v1.tar+gzip"
            );
            let gz = blob(layer["digest"].as_str().unwrap());
            assert_eq!(gz.len() as u64, layer["size"].as_u64().unwrap());
            let mut tar = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut tar)
                .unwrap();
            assert_eq!(common::image::sha256(&tar), b.diff_id, "diff_id kept");
        }
        if form == "oci" {
            run_ok(
                Command::new("skopeo")
                    .args(["copy", "-q", &docker.skopeo_host()])
                    .arg(format!("oci-archive:{}", out.display()))
                    .arg(format!("docker-daemon:{name}")),
            );
        } else {
            docker.ok(&["load", "-i", out.to_str().unwrap()]);
        }
        let (_t, tree) = docker.tree(&name);
        let mut want = comparable(&tree);
        undo_departures(&ours, &mut want);
        assert_same(
            &format!("{r} exported {form} --compress gzip"),
            &ours,
            &want,
        );
    }
}
