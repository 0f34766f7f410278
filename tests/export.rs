//! `rimg export`: archives that skopeo, umoci and podman accept, holding the
//! same tree the mount shows.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures::*;
use common::image::{Pushed, push_alpine, sha256};
use common::listing::assert_same_tree;
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

/// `skopeo copy` of `src` (e.g. `docker-archive:FILE`) to an OCI layout,
/// unpacked by umoci: the tree another tool makes of rimg's archive.
fn unpacked_by_skopeo_and_umoci(src: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let layout = skopeo_to_oci(src, dir.path());
    unpack_layout(dir, &layout, "t")
}

fn skopeo_to_oci(src: &str, dir: &Path) -> PathBuf {
    let layout = dir.join("oci");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "-q", src])
            .arg(format!("oci:{}:t", layout.display())),
    );
    layout
}

/// Layers `skopeo inspect` sees in a docker archive.
fn skopeo_layer_count(archive: &Path) -> usize {
    let out = run_ok(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("docker-archive:{}", archive.display())),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["Layers"].as_array().map_or(0, Vec::len)
}

fn tar_names(archive: &Path) -> Vec<String> {
    run_ok(Command::new("tar").arg("-tf").arg(archive))
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn docker_archive_holds_docker_and_oci_views_with_original_blobs() {
    let reg = Registry::start(Auth::None);
    let p = push_rules(&reg, "rules", "v1", false);
    let env = Env::new();
    let r = format!("{}/rules:v1", reg.addr());
    let (_dir, out) = export(&env, &r, &[]);
    let names = tar_names(&out);
    for want in ["manifest.json", "repositories", "oci-layout", "index.json"] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    // Original compressed bytes, once each.
    for d in &p.layers {
        let name = format!("blobs/sha256/{}", &d[7..]);
        assert_eq!(names.iter().filter(|n| **n == name).count(), 1, "{name}");
    }
    let x = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&out)
            .arg("-C")
            .arg(x.path()),
    );
    for d in &p.layers {
        let bytes = std::fs::read(x.path().join("blobs/sha256").join(&d[7..])).unwrap();
        assert_eq!(sha256(&bytes), *d);
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(x.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest[0]["RepoTags"][0], r);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(x.path().join("index.json")).unwrap()).unwrap();
    let ann = &index["manifests"][0]["annotations"];
    assert_eq!(ann["io.containerd.image.name"], r);
    assert_eq!(ann["org.opencontainers.image.ref.name"], "v1");
    assert_eq!(index["manifests"][0]["digest"], p.manifest_digest);

    assert_eq!(skopeo_layer_count(&out), 3);

    // docker-archive -> OCI -> umoci equals the registry image through umoci.
    let (_a, ours) = unpacked_by_skopeo_and_umoci(&format!("docker-archive:{}", out.display()));
    let (_b, reference) = umoci_unpack(&reg, "rules", "v1");
    assert_same_tree(&ours, &reference);
    // The same file read as an OCI archive.
    let (_c, ours) = unpacked_by_skopeo_and_umoci(&format!("oci-archive:{}", out.display()));
    assert_same_tree(&ours, &reference);
}

#[test]
fn oci_format_is_a_layout_with_the_original_manifest() {
    let reg = Registry::start(Auth::None);
    let p = push_alpine(&reg, "library/alpine", "3.20", "3.20.3", "amd64", true);
    let env = Env::new();
    let (_dir, out) = export(
        &env,
        &format!("{}/library/alpine:3.20", reg.addr()),
        &["--format", "oci", "--tag", "mine/alpine:x"],
    );
    let names = tar_names(&out);
    assert!(
        !names.iter().any(|n| n == "manifest.json"),
        "no docker files in --format oci"
    );
    let x = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&out)
            .arg("-C")
            .arg(x.path()),
    );
    let m = std::fs::read(x.path().join("blobs/sha256").join(&p.manifest_digest[7..])).unwrap();
    assert_eq!(m, p.manifest, "the original manifest bytes");
    let (_a, ours) = unpacked_by_skopeo_and_umoci(&format!("oci-archive:{}:x", out.display()));
    let (_b, reference) = umoci_unpack(&reg, "library/alpine", "3.20");
    assert_same_tree(&ours, &reference);
}

#[test]
fn flattened_image_has_one_layer_holding_the_merged_tree() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", true);
    let env = Env::new();
    let (_dir, out) = export(&env, &format!("{}/rules:v1", reg.addr()), &["--flatten"]);
    assert_eq!(skopeo_layer_count(&out), 1);
    let (_a, ours) = unpacked_by_skopeo_and_umoci(&format!("docker-archive:{}", out.display()));
    let (_b, reference) = umoci_unpack(&reg, "rules", "v1");
    assert_same_tree(&ours, &reference);
    let cfg = run_ok(
        Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("docker-archive:{}", out.display())),
    );
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
    assert_eq!(cfg["history"].as_array().unwrap().len(), 1);
}

#[test]
fn rootfs_tar_extracts_to_umocis_rootfs() {
    let reg = Registry::start(Auth::None);
    for (repo, push) in [
        (
            "rules",
            Box::new(|r: &Registry| push_rules(r, "rules", "v1", false))
                as Box<dyn Fn(&Registry) -> Pushed>,
        ),
        (
            "alpine",
            Box::new(|r: &Registry| push_alpine(r, "alpine", "v1", "3.10.9", "amd64", false)),
        ),
    ] {
        push(&reg);
        let env = Env::new();
        let (_d, out) = export(
            &env,
            &format!("{}/{repo}:v1", reg.addr()),
            &["--format", "rootfs"],
        );
        let x = tempfile::tempdir().unwrap();
        run_ok(
            Command::new("tar")
                .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
                .arg(&out)
                .arg("-C")
                .arg(x.path()),
        );
        let (_b, reference) = umoci_unpack(&reg, repo, "v1");
        assert_same_tree(x.path(), &reference);
    }
}

#[test]
fn stdout_export_refuses_a_terminal_and_streams_to_a_pipe() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let env = Env::new();
    let r = format!("{}/a:1", reg.addr());
    let out = env.run(&["export", "--format", "rootfs", &r, "-"]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.tar");
    std::fs::write(&file, &out.stdout).unwrap();
    assert!(tar_names(&file).iter().any(|n| n == "etc/os-release"));
    // A terminal on stdout is refused (script(1) gives us one).
    let rimg = rimg_bin();
    let cache = env.cache_dir();
    let tty = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "RIMG_CACHE_DIR={} {} export {r} -",
            cache.display(),
            rimg.display()
        ))
        .arg("/dev/null")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&tty.stdout);
    assert!(text.contains("terminal"), "{text}");
}

#[test]
fn an_interrupted_export_leaves_no_file_that_looks_complete() {
    let reg = Registry::start(Auth::None);
    let p = push_alpine(&reg, "b", "1", "3.20.3", "amd64", false);
    // The manifest resolves, then the layer download fails part-way through the export.
    std::fs::remove_file(reg.blob_file(&p.layers[0])).unwrap();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.tar");
    let err = env.fails(&[
        "export",
        &format!("{}/b:1", reg.addr()),
        out.to_str().unwrap(),
    ]);
    assert!(err.contains(&p.layers[0]), "{err}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no temporary left behind"
    );
}

#[test]
fn podman_loads_the_default_archive() {
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!("podman is not installed; skipping");
        return;
    }
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "library/alpine", "3.10", "3.10.9", "amd64", false);
    let env = Env::new();
    let (dir, out) = export(
        &env,
        &format!("{}/library/alpine:3.10", reg.addr()),
        &["--tag", "rimg-test/alpine:loaded"],
    );
    let root = dir.path().join("podman-root");
    let runroot = dir.path().join("podman-run");
    let podman = |args: &[&str]| {
        Command::new("podman")
            .arg("--root")
            .arg(&root)
            .arg("--runroot")
            .arg(&runroot)
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .unwrap()
    };
    let load = podman(&["load", "-i", out.to_str().unwrap()]);
    assert!(
        load.status.success(),
        "podman load: {}",
        String::from_utf8_lossy(&load.stderr)
    );
    let images = podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    let list = String::from_utf8_lossy(&images.stdout);
    assert!(list.contains("rimg-test/alpine:loaded"), "{list}");
}

#[test]
fn an_interrupted_export_leaves_no_temporary_file_and_the_next_run_sweeps_old_ones() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "alpine", "3.20", "3.20.3", "amd64", true);
    // Slow enough that the export is still running when Ctrl-C comes.
    let slow = common::proxy::RedirectProxy::start_throttled(&reg, Some(200 << 10));
    let env = Env::new();
    let out_dir = tempfile::tempdir().unwrap();
    // What a process killed with -9 left (pid 999999 is not running).
    let stale = out_dir.path().join(".rimg-export-999999-abcdef");
    std::fs::write(&stale, b"partial").unwrap();
    let target = out_dir.path().join("a.tar");
    let r = format!("{}/alpine:3.20", slow.addr());
    let child = env
        .command(&["export", &r, &target.display().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{:?}", out.status);
    let left: Vec<_> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let tmp: Vec<_> = std::fs::read_dir(env.cache_dir().join("tmp"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(tmp.is_empty(), "cache tmp left behind: {tmp:?}");
}
