//! Local image sources: archives written by skopeo, podman, docker's
//! download-frozen-image-v2.sh layout and rimg's own export, mounted and
//! listed with the `docker-archive:`, `oci:` and `oci-archive:` prefixes and
//! compared with umoci's unpack of the same image from a registry; and the
//! bad archives each refused with one line naming the file and the entry.

mod common;

use std::path::Path;
use std::process::Command;

use common::fixtures::*;
use common::image::{LayerBuilder, push_alpine, push_index, sha256};
use common::listing::assert_same_tree;
use common::*;

fn skopeo_copy(src: &str, dest: &str) {
    run_ok(Command::new("skopeo").args(["copy", "-q", "--src-tls-verify=false", src, dest]));
}

/// The tree, `ls -R` and `cat` of `src` agree with umoci's unpack `reference`
/// and with what rimg shows of the registry image `registry_ref`.
fn assert_same_as_registry(env: &Env, src: &str, registry_ref: &str, reference: &Path) {
    let m = Mounted::new(env, src, &[]);
    assert_same_tree(&m.path, reference);
    assert_eq!(
        env.ok(&["ls", "-R", src]),
        env.ok(&["ls", "-R", registry_ref]),
        "{src}"
    );
    let out = env
        .command(&["cat", src, "etc/os-release"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout,
        std::fs::read(reference.join("etc/os-release")).unwrap(),
        "{src}"
    );
}

#[test]
fn skopeo_docker_archive_oci_dir_and_oci_archive_show_the_registry_tree() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", false);
    let (_u, reference) = umoci_unpack(&reg, "rules", "v1");
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let src = format!("docker://{}/rules:v1", reg.addr());
    let d = dir.path().display();
    for dest in [
        format!("docker-archive:{d}/d.tar:rules:v1"),
        format!("oci:{d}/layout:v1"),
        format!("oci-archive:{d}/o.tar:v1"),
    ] {
        skopeo_copy(&src, &dest);
    }
    let registry_ref = format!("{}/rules:v1", reg.addr());
    for local in [
        format!("docker-archive:{d}/d.tar"),
        format!("docker-archive:{d}/d.tar:rules:v1"),
        format!("oci:{d}/layout"),
        format!("oci:{d}/layout:v1"),
        format!("oci-archive:{d}/o.tar:v1"),
    ] {
        assert_same_as_registry(&env, &local, &registry_ref, &reference);
    }
    // docker:// names the registry explicitly.
    assert_same_as_registry(&env, &src, &registry_ref, &reference);
    let inspect: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", &format!("oci:{d}/layout:v1")])).unwrap();
    assert_eq!(inspect["layers"].as_array().unwrap().len(), 3);
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn uncompressed_layers_of_an_archive_are_read_in_place_without_a_copy() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", false);
    let (_u, reference) = umoci_unpack(&reg, "rules", "v1");
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("d.tar");
    skopeo_copy(
        &format!("docker://{}/rules:v1", reg.addr()),
        &format!("docker-archive:{}:rules:v1", tar.display()),
    );
    let src = format!("docker-archive:{}", tar.display());
    let env = Env::new();
    {
        let m = Mounted::new(&env, &src, &[]);
        assert_same_tree(&m.path, &reference);
    }
    // skopeo writes docker archives uncompressed: no layer was copied, and
    // each was indexed where it lies.
    assert_eq!(
        files_in(&env.cache_dir().join("layers/sha256")),
        Vec::<String>::new()
    );
    assert_eq!(files_in(&env.cache_dir().join("inplace")).len(), 3);
    // Warm: the kept indexes serve a second mount.
    let m = Mounted::new(&env, &src, &[]);
    assert_same_tree(&m.path, &reference);
    drop(m);
    // Export needs the blobs themselves: they are copied then.
    let out = dir.path().join("oci.tar");
    env.ok(&["export", "--format", "oci", &src, out.to_str().unwrap()]);
    let fresh = Env::new();
    let m = Mounted::new(&fresh, &format!("oci-archive:{}", out.display()), &[]);
    assert_same_tree(&m.path, &reference);
    drop(m);
    // An archive changed since it was indexed is indexed (and checked) again.
    let fresh = Env::new();
    fresh.ok(&["ls", &src]);
    flip_byte_at(&tar, &[0xab; 4096]);
    let err = fresh.fails(&["cat", &src, "big.bin"]);
    assert!(err.contains("d.tar") && err.contains("hashes to"), "{err}");
}

#[test]
fn an_empty_layer_of_zero_blocks_is_an_empty_layer() {
    // Older docker builds saved layers that changed nothing as 1024 zero bytes.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let real = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/x", b"from the real layer\n", 0o644)
        .finish();
    let empty = vec![0u8; 1024];
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(&real), sha256(&empty)]},
    }))
    .unwrap();
    std::fs::write(d.join("c.json"), &config).unwrap();
    for (name, bytes) in [("a", &real), ("b", &empty)] {
        std::fs::create_dir(d.join(name)).unwrap();
        std::fs::write(d.join(name).join("layer.tar"), bytes).unwrap();
    }
    std::fs::write(
        d.join("manifest.json"),
        br#"[{"Config":"c.json","RepoTags":["e:1"],"Layers":["a/layer.tar","b/layer.tar"]}]"#,
    )
    .unwrap();
    let env = Env::new();
    let src = format!("docker-archive:{}", d.display());
    let out = env.command(&["cat", &src, "etc/x"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"from the real layer\n");
}

fn podman(root: &Path, args: &[&str]) -> String {
    run_ok(
        Command::new("podman")
            .arg("--root")
            .arg(root.join("root"))
            .arg("--runroot")
            .arg(root.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args),
    )
}

#[test]
fn podman_save_in_both_formats_shows_the_registry_tree() {
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!("podman is not installed; skipping");
        return;
    }
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", true);
    let (_u, reference) = umoci_unpack(&reg, "rules", "v1");
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("{}/rules:v1", reg.addr());
    podman(dir.path(), &["pull", "-q", "--tls-verify=false", &name]);
    let docker = dir.path().join("docker.tar");
    let oci = dir.path().join("oci.tar");
    for (format, out) in [("docker-archive", &docker), ("oci-archive", &oci)] {
        podman(
            dir.path(),
            &[
                "save",
                "-q",
                "--format",
                format,
                "-o",
                out.to_str().unwrap(),
                &name,
            ],
        );
    }
    assert_same_as_registry(
        &env,
        &format!("docker-archive:{}", docker.display()),
        &name,
        &reference,
    );
    assert_same_as_registry(
        &env,
        &format!("oci-archive:{}", oci.display()),
        &name,
        &reference,
    );
}

/// The directory download-frozen-image-v2.sh writes: `<id>/layer.tar` (the
/// blob as downloaded, compressed), `<id>/json`, `<id>/VERSION`, the config as
/// `<hex>.json`, `manifest.json` and `repositories`.
fn frozen_dir(dir: &Path, tag: &str) -> (Vec<u8>, Vec<String>) {
    let blobs: Vec<_> = rule_layers()
        .iter()
        .map(|t| common::image::layer_blob(t, common::image::Compress::Gzip, false))
        .collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": blobs.iter().map(|b| b.diff_id.clone()).collect::<Vec<_>>()},
    }))
    .unwrap();
    let config_hex = sha256(&config)[7..].to_string();
    std::fs::write(dir.join(format!("{config_hex}.json")), &config).unwrap();
    let mut layers = Vec::new();
    for (i, b) in blobs.iter().enumerate() {
        let id = format!("{:064x}", i + 1);
        std::fs::create_dir_all(dir.join(&id)).unwrap();
        std::fs::write(dir.join(&id).join("layer.tar"), &b.bytes).unwrap();
        std::fs::write(dir.join(&id).join("VERSION"), "1.0").unwrap();
        std::fs::write(dir.join(&id).join("json"), format!("{{\"id\":\"{id}\"}}")).unwrap();
        layers.push(format!("{id}/layer.tar"));
    }
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": [tag],
        "Layers": layers,
    }]))
    .unwrap();
    std::fs::write(dir.join("manifest.json"), &manifest).unwrap();
    std::fs::write(dir.join("repositories"), "{}").unwrap();
    (manifest, layers)
}

#[test]
fn a_frozen_image_directory_and_its_tar_with_linked_layers_show_the_registry_tree() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", false);
    let (_u, reference) = umoci_unpack(&reg, "rules", "v1");
    let registry_ref = format!("{}/rules:v1", reg.addr());
    let dir = tempfile::tempdir().unwrap();
    let frozen = dir.path().join("frozen");
    std::fs::create_dir(&frozen).unwrap();
    let (_, layers) = frozen_dir(&frozen, "rules:v1");
    let src = format!("docker-archive:{}", frozen.display());
    assert_same_as_registry(&Env::new(), &src, &registry_ref, &reference);
    // Older `docker save` links a layer stored once from the other image
    // directories: a relative symlink between entries, followed inside.
    std::fs::create_dir(frozen.join("shared")).unwrap();
    std::fs::rename(frozen.join(&layers[1]), frozen.join("shared/layer.tar")).unwrap();
    std::os::unix::fs::symlink("../shared/layer.tar", frozen.join(&layers[1])).unwrap();
    assert_same_as_registry(&Env::new(), &src, &registry_ref, &reference);
    // The same layout as a tar, with the symlink as a tar member; from a
    // relative path, which the mount server must find from its own directory.
    run_ok(
        Command::new("tar")
            .arg("-cf")
            .arg(dir.path().join("frozen.tar"))
            .arg("-C")
            .arg(&frozen)
            .arg("."),
    );
    let env = Env::new();
    let m = tempfile::tempdir().unwrap();
    let out = env
        .command(&[
            "mount",
            "docker-archive:frozen.tar",
            m.path().to_str().unwrap(),
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(m.path(), &reference);
    run_ok(Command::new("fusermount3").arg("-u").arg(m.path()));
}

#[test]
fn export_then_mount_the_archive_shows_the_same_tree_in_both_formats() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", false);
    let env = Env::new();
    let r = format!("{}/rules:v1", reg.addr());
    let dir = tempfile::tempdir().unwrap();
    let docker = dir.path().join("out.tar");
    let oci = dir.path().join("oci.tar");
    env.ok(&["export", &r, docker.to_str().unwrap()]);
    env.ok(&["export", "--format", "oci", &r, oci.to_str().unwrap()]);
    let from_registry = Mounted::new(&env, &r, &[]);
    for src in [
        format!("docker-archive:{}", docker.display()),
        format!("oci-archive:{}", oci.display()),
        // The docker form holds an OCI layout too, as docker 25+ writes.
        format!("oci-archive:{}", docker.display()),
    ] {
        // A fresh cache, so the layers really come from the archive.
        let fresh = Env::new();
        let m = Mounted::new(&fresh, &src, &[]);
        assert_same_tree(&m.path, &from_registry.path);
    }
}

#[test]
fn a_platform_is_chosen_from_an_index_in_a_layout() {
    let reg = Registry::start(Auth::None);
    let amd = push_alpine(&reg, "multi", "amd64", "3.10.9", "amd64", true);
    let arm = push_alpine(&reg, "multi", "arm64", "3.10.9", "arm64/v8", true);
    push_index(
        &reg,
        "multi",
        "both",
        &[("linux/amd64", &amd), ("linux/arm64/v8", &arm)],
        true,
    );
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "-q", "--all", "--src-tls-verify=false"])
            .arg(format!("docker://{}/multi:both", reg.addr()))
            .arg(format!("oci:{}:both", layout.display())),
    );
    let src = format!("oci:{}:both", layout.display());
    let arm_inspect: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "--platform", "linux/arm64", &src])).unwrap();
    assert_eq!(arm_inspect["platform"], "linux/arm64/v8");
    assert_eq!(arm_inspect["manifest"]["digest"], arm.manifest_digest);
    let amd_inspect: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "--platform", "linux/amd64", &src])).unwrap();
    assert_eq!(amd_inspect["manifest"]["digest"], amd.manifest_digest);
    let err = env.fails(&["ls", "--platform", "linux/s390x", &src]);
    assert!(
        err.contains("linux/s390x") && err.contains("linux/arm64/v8"),
        "{err}"
    );
    // The arm64 rootfs, through the mount.
    let m = Mounted::new(&env, &src, &["--platform", "linux/arm64"]);
    assert!(m.path.join("lib/ld-musl-aarch64.so.1").exists());
}

/// A copy of `src` with the byte at the first occurrence of `needle` changed.
fn flip_byte_at(file: &Path, needle: &[u8]) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in file");
    bytes[at] ^= 0x01;
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn bad_archives_are_refused_naming_the_file_and_the_entry() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", false);
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = format!("docker://{}/rules:v1", reg.addr());

    // Truncated tar.
    let tar = d.join("d.tar");
    skopeo_copy(&src, &format!("docker-archive:{}:rules:v1", tar.display()));
    let whole = std::fs::read(&tar).unwrap();
    let cut = d.join("cut.tar");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let err = env.fails(&["ls", &format!("docker-archive:{}", cut.display())]);
    assert!(
        err.contains("cut.tar") && err.contains("truncated"),
        "{err}"
    );
    // Cut inside a header, and inside the last member's data.
    for at in [300, whole.len() - 3000] {
        std::fs::write(&cut, &whole[..at]).unwrap();
        let err = env.fails(&["ls", &format!("docker-archive:{}", cut.display())]);
        assert!(
            err.contains("cut.tar") && err.contains("truncated"),
            "{err}"
        );
    }

    // A layer whose bytes do not match the digest (skopeo's layers are
    // uncompressed, so their digest is the diff_id).
    let bad = d.join("bad.tar");
    std::fs::copy(&tar, &bad).unwrap();
    flip_byte_at(&bad, &[0xab; 4096]);
    let err = env.fails(&["ls", &format!("docker-archive:{}", bad.display())]);
    assert!(
        err.contains("bad.tar") && err.contains("hashes to"),
        "{err}"
    );

    // manifest.json naming a missing layer, a layer outside, an absolute path.
    let frozen = d.join("frozen");
    std::fs::create_dir(&frozen).unwrap();
    let (manifest, layers) = frozen_dir(&frozen, "rules:v1");
    let text = String::from_utf8(manifest).unwrap();
    for (replacement, says) in [
        ("nope/layer.tar", "no such entry"),
        ("../outside/layer.tar", "outside the archive"),
        ("/etc/passwd", "outside the archive"),
    ] {
        std::fs::write(
            frozen.join("manifest.json"),
            text.replace(&layers[1], replacement),
        )
        .unwrap();
        let err = env.fails(&["ls", &format!("docker-archive:{}", frozen.display())]);
        assert!(
            err.contains(&frozen.display().to_string())
                && err.contains(replacement)
                && err.contains(says),
            "{replacement}: {err}"
        );
    }

    // A layer that is no layer at all.
    std::fs::write(frozen.join("manifest.json"), &text).unwrap();
    let saved = std::fs::read(frozen.join(&layers[2])).unwrap();
    std::fs::write(frozen.join(&layers[2]), "just some text, no tar").unwrap();
    let err = env.fails(&["ls", &format!("docker-archive:{}", frozen.display())]);
    assert!(
        err.contains(&layers[2]) && err.contains("neither gzip, zstd nor a tar"),
        "{err}"
    );
    std::fs::write(frozen.join(&layers[2]), saved).unwrap();
    let err = env.fails(&["ls", "docker-archive:"]);
    assert!(err.contains("no path given"), "{err}");

    // A layer that is not what the config's diff_ids say.
    std::fs::write(frozen.join("manifest.json"), &text).unwrap();
    let config_name = text.split('"').find(|s| s.ends_with(".json")).unwrap();
    let config_path = frozen.join(config_name);
    let config = std::fs::read_to_string(&config_path).unwrap();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let first = config.split("sha256:").nth(1).unwrap()[..64].to_string();
    std::fs::write(
        &config_path,
        config.replace(&format!("sha256:{first}"), &wrong),
    )
    .unwrap();
    let err = env.fails(&["ls", &format!("docker-archive:{}", frozen.display())]);
    assert!(
        err.contains(&wrong) && err.contains("config says") && err.contains(&layers[0]),
        "{err}"
    );

    // A symlink out of an OCI layout, to a copy of the right bytes: refused
    // all the same, since nothing outside the layout is read.
    let layout = d.join("layout");
    skopeo_copy(&src, &format!("oci:{}:v1", layout.display()));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(&manifest_digest[7..])).unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let blob = layout.join("blobs/sha256").join(&layer[7..]);
    let outside = d.join("outside-blob");
    std::fs::rename(&blob, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, &blob).unwrap();
    let err = env.fails(&["ls", &format!("oci:{}:v1", layout.display())]);
    assert!(
        err.contains("layout") && err.contains(&layer[7..]) && err.contains("outside the archive"),
        "{err}"
    );
    std::fs::remove_file(&blob).unwrap();
    std::os::unix::fs::symlink(Path::new("../../../outside-blob"), &blob).unwrap();
    let err = env.fails(&["ls", &format!("oci:{}:v1", layout.display())]);
    assert!(err.contains("outside the archive"), "{err}");
    // A FIFO in place of a blob, and as the archive itself: refused, not waited on.
    std::fs::remove_file(&blob).unwrap();
    run_ok(Command::new("mkfifo").arg(&blob));
    let err = env.fails(&["ls", &format!("oci:{}:v1", layout.display())]);
    assert!(
        err.contains(&layer[7..]) && err.contains("not a regular file"),
        "{err}"
    );
    let err = env.fails(&["ls", &format!("oci-archive:{}", blob.display())]);
    assert!(err.contains("not a regular file"), "{err}");
    std::fs::remove_file(&blob).unwrap();
    std::fs::rename(&outside, &blob).unwrap();

    // A config that does not match its digest.
    let config = manifest["config"]["digest"].as_str().unwrap();
    let config_path = layout.join("blobs/sha256").join(&config[7..]);
    let mut bytes = std::fs::read(&config_path).unwrap();
    bytes.push(b' ');
    std::fs::write(&config_path, bytes).unwrap();
    let err = env.fails(&["ls", &format!("oci:{}:v1", layout.display())]);
    assert!(
        err.contains(&config[7..]) && err.contains("hashes to"),
        "{err}"
    );

    // A tar whose layer member is a symlink that leads out of the archive.
    let linked = d.join("linked.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&linked).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, data).unwrap();
        };
        add(
            "cfg.json",
            br#"{"os":"linux","architecture":"amd64","rootfs":{"type":"layers","diff_ids":[]}}"#,
        );
        add(
            "manifest.json",
            br#"[{"Config":"cfg.json","RepoTags":["x:1"],"Layers":["l/layer.tar"]}]"#,
        );
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "l/layer.tar", "../../etc/passwd")
            .unwrap();
        b.finish().unwrap();
    }
    let err = env.fails(&["ls", &format!("docker-archive:{}", linked.display())]);
    assert!(
        err.contains("linked.tar")
            && err.contains("l/layer.tar")
            && err.contains("outside the archive"),
        "{err}"
    );
}

#[test]
fn an_archive_of_several_images_needs_a_tag_and_lists_them() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let (manifest, _) = frozen_dir(dir.path(), "rules:v1");
    let mut list: Vec<serde_json::Value> = serde_json::from_slice(&manifest).unwrap();
    let mut second = list[0].clone();
    second["RepoTags"] = serde_json::json!(["other/rules:v2"]);
    list.push(second);
    std::fs::write(
        dir.path().join("manifest.json"),
        serde_json::to_vec(&list).unwrap(),
    )
    .unwrap();
    let base = format!("docker-archive:{}", dir.path().display());
    let err = env.fails(&["ls", &base]);
    assert!(
        err.contains("2 images") && err.contains("rules:v1") && err.contains("other/rules:v2"),
        "{err}"
    );
    let err = env.fails(&["ls", &format!("{base}:missing:v3")]);
    assert!(
        err.contains("missing:v3") && err.contains("other/rules:v2"),
        "{err}"
    );
    let listing = env.ok(&["ls", &format!("{base}:other/rules:v2"), "/etc"]);
    assert!(listing.contains("os-release"), "{listing}");
    // Picked by the normalised name, too.
    let inspect: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", &format!("{base}:docker.io/library/rules:v1")]))
            .unwrap();
    assert_eq!(inspect["reference"]["name"], "docker.io/library/rules:v1");
}
