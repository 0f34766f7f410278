//! `rimg ls`, `rimg cat` and `rimg cache`: the merged tree without FUSE, the
//! cache's guarantees, and hostile layers.

mod common;

use std::time::Duration;

use common::fixtures::*;
use common::image::{Blob, Compress, LayerBuilder, layer_blob, push_alpine, push_image, sha256};
use common::proxy::RedirectProxy;
use common::*;

fn rules_ref(reg: &Registry) -> String {
    push_rules(reg, "rules", "v1", false);
    format!("{}/rules:v1", reg.addr())
}

#[test]
fn ls_lists_the_merged_tree_with_layer_of_origin() {
    let reg = Registry::start(Auth::None);
    let p = push_rules(&reg, "rules", "v1", false);
    let env = Env::new();
    let r = format!("{}/rules:v1", reg.addr());
    let top = env.ok(&["ls", &r]);
    let names: Vec<&str> = top.lines().collect();
    assert!(names.contains(&"/etc") && names.contains(&"/z"), "{top}");
    assert!(!top.contains(".wh."), "{top}");
    let long = env.ok(&["ls", "-l", &r, "/data"]);
    let a = long
        .lines()
        .find(|l| l.ends_with("/data/a.txt"))
        .expect(&long);
    assert!(a.starts_with("-rw-r----- "), "{a}");
    assert!(a.contains(" 1000  1000 ") && a.contains(" 14 "), "{a}");
    let short0 = &p.layers[0][7..19];
    assert!(a.contains(&format!("0:{short0}")), "{a}");
    let os = env.ok(&["ls", "-l", &r, "/etc/os-release"]);
    assert!(os.contains(&format!("2:{}", &p.layers[2][7..19])), "{os}");
    let all = env.ok(&["ls", "-R", &r]);
    assert!(all.lines().any(|l| l == "/opq/new"));
    assert!(!all.lines().any(|l| l.starts_with("/data/sub")), "{all}");
    let dev = env.ok(&["ls", "-l", &r, "/dev"]);
    assert!(
        dev.lines()
            .any(|l| l.starts_with("crw-rw---- ") && l.contains(" 1,3 ")),
        "{dev}"
    );
    assert!(
        dev.lines()
            .any(|l| l.starts_with("brw-rw---- ") && l.contains(" 8,0 ")),
        "{dev}"
    );
    let links = env.ok(&["ls", "-l", &r, "/abs"]);
    assert!(links.contains("/abs -> /etc/os-release"), "{links}");
}

#[test]
fn cat_follows_symlinks_inside_the_image_only() {
    let reg = Registry::start(Auth::None);
    let env = Env::new();
    let r = rules_ref(&reg);
    let want = "NAME=rules\nVERSION_ID=2\n";
    assert_eq!(env.ok(&["cat", &r, "/etc/os-release"]), want);
    // An absolute target resolves against the image root, never the host's.
    assert_eq!(env.ok(&["cat", &r, "/abs"]), want);
    // `..` past the root stays at the image root.
    assert_eq!(env.ok(&["cat", &r, "/escape"]), want);
    let err = env.fails(&["cat", &r, "/etc/shadow"]);
    assert!(err.contains("/etc/shadow") && err.contains(&r), "{err}");
    let err = env.fails(&["cat", &r, "/etc"]);
    assert!(err.contains("not a regular file"), "{err}");
    let big = env.run(&["cat", &r, "/big.bin"]);
    assert_eq!(big.stdout.len(), 300_000);
}

#[test]
fn a_second_run_loads_the_index_without_fetching_again() {
    let mut reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let env = Env::new();
    let r = format!("{}/a:1@{}", reg.addr(), {
        let v: serde_json::Value =
            serde_json::from_str(&env.ok(&["inspect", &format!("{}/a:1", reg.addr())])).unwrap();
        v["manifest"]["digest"].as_str().unwrap().to_string()
    });
    env.ok(&["cat", &r, "/etc/alpine-release"]);
    // Delete the blob from the registry: a cached layer must not be fetched again.
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", &r])).unwrap();
    let layer = v["layers"][0]["digest"].as_str().unwrap().to_string();
    std::fs::remove_file(reg.blob_file(&layer)).unwrap();
    reg.restart();
    assert_eq!(env.ok(&["cat", &r, "/etc/alpine-release"]).trim(), "3.10.9");
    let ls = env.ok(&["cache", "ls"]);
    assert!(
        ls.contains(&layer[7..19]) && ls.contains(&format!("{}/a:1", reg.addr())),
        "{ls}"
    );
}

#[test]
fn cache_prune_and_clear_free_space() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    push_alpine(&reg, "b", "1", "3.20.3", "amd64", false);
    let env = Env::new();
    env.ok(&["cat", &format!("{}/a:1", reg.addr()), "/etc/os-release"]);
    std::thread::sleep(Duration::from_millis(1100));
    env.ok(&["cat", &format!("{}/b:1", reg.addr()), "/etc/os-release"]);
    assert_eq!(
        env.ok(&["cache", "ls"])
            .lines()
            .filter(|l| l.starts_with("sha256:"))
            .count(),
        2
    );
    // A limit that holds one layer evicts the least recently used one.
    let out = env.ok(&["cache", "prune", "15M"]);
    assert!(out.starts_with("freed "), "{out}");
    let ls = env.ok(&["cache", "ls"]);
    assert_eq!(
        ls.lines().filter(|l| l.starts_with("sha256:")).count(),
        1,
        "{ls}"
    );
    assert!(
        ls.contains("/b:1"),
        "the most recently used layer stays: {ls}"
    );
    env.ok(&["cache", "clear"]);
    assert_eq!(
        env.ok(&["cache", "ls"])
            .lines()
            .filter(|l| l.starts_with("sha256:"))
            .count(),
        0
    );
    // A small --cache-size evicts on its own after a fetch.
    env.ok(&[
        "--cache-size",
        "9M",
        "cat",
        &format!("{}/a:1", reg.addr()),
        "/etc/os-release",
    ]);
    env.ok(&[
        "--cache-size",
        "9M",
        "cat",
        &format!("{}/b:1", reg.addr()),
        "/etc/os-release",
    ]);
    assert_eq!(
        env.ok(&["cache", "ls"])
            .lines()
            .filter(|l| l.starts_with("sha256:"))
            .count(),
        1
    );
}

#[test]
fn zstd_and_uncompressed_layers_merge_like_gzip_ones() {
    let reg = Registry::start(Auth::None);
    let layers = rule_layers();
    let blobs = vec![
        layer_blob(&layers[0], Compress::Zstd, true),
        layer_blob(&layers[1], Compress::None, true),
        layer_blob(&layers[2], Compress::Gzip, true),
    ];
    push_image(&reg, "mixed", "v1", &blobs, "amd64", true);
    push_rules(&reg, "rules", "v1", true);
    let env = Env::new();
    let a = env.ok(&["ls", "-R", "-l", &format!("{}/mixed:v1", reg.addr())]);
    let b = env.ok(&["ls", "-R", "-l", &format!("{}/rules:v1", reg.addr())]);
    // Same tree; only the layer digests in the last column differ.
    let strip = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| {
                l.split(' ')
                    .filter(|w| !w.contains(':') || w.len() < 14)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    };
    assert_eq!(strip(&a), strip(&b));
}

fn hostile_image(reg: &Registry, repo: &str, tar: &[u8]) -> String {
    push_image(
        reg,
        repo,
        "v1",
        &[layer_blob(tar, Compress::Gzip, false)],
        "amd64",
        false,
    );
    format!("{}/{repo}:v1", reg.addr())
}

fn assert_cache_clean(env: &Env) {
    let cache = env.cache_dir();
    for sub in ["layers/sha256", "blobs/sha256", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(cache.join(sub))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{sub} must be empty: {left:?}");
    }
}

#[test]
fn dot_dot_and_absolute_paths_stay_inside_the_root() {
    let reg = Registry::start(Auth::None);
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    let mut b = LayerBuilder::new();
    // Raw names: the tar crate's path setters refuse `..`, attackers' tools do not.
    for name in ["../../escape.txt", "/abs.txt", "a/../../b.txt"] {
        let mut hh = h.clone();
        hh.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        hh.set_size(2);
        hh.set_cksum();
        b.raw(hh, b"x\n");
    }
    let tar = b
        .symlink("evil", "/tmp")
        .file("evil/pwned", b"no\n", 0o644)
        .finish();
    let r = hostile_image(&reg, "hostile", &tar);
    let env = Env::new();
    let ls = env.ok(&["ls", "-R", &r]);
    for want in ["/escape.txt", "/abs.txt", "/b.txt", "/evil/pwned"] {
        assert!(ls.lines().any(|l| l == want), "{want} missing: {ls}");
    }
    let m = Mounted::new(&env, &r, &[]);
    assert_eq!(
        std::fs::read_to_string(m.path.join("escape.txt")).unwrap(),
        "x\n"
    );
    assert!(
        m.path.join("evil").is_dir(),
        "a symlinked parent is replaced, never followed"
    );
    assert!(!std::path::Path::new("/tmp/pwned").exists());
}

#[test]
fn a_gzip_bomb_stops_at_the_size_bound() {
    let reg = Registry::start(Auth::None);
    let tar = LayerBuilder::new()
        .file("zeros", &vec![0u8; 64 << 20], 0o644)
        .finish();
    let r = hostile_image(&reg, "bomb", &tar);
    let env = Env::new();
    let err = env.fails(&["--max-layer-size", "8M", "cat", &r, "/zeros"]);
    assert!(
        err.contains("inflates past") && err.contains("sha256:"),
        "{err}"
    );
    assert_cache_clean(&env);
}

#[test]
fn truncated_and_non_tar_blobs_fail_naming_the_layer() {
    let reg = Registry::start(Auth::None);
    let env = Env::new();
    let full = LayerBuilder::new()
        .file("f", &vec![7u8; 100_000], 0o644)
        .finish();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", full[..30_000].to_vec()),
        ("text", b"just some text, not a tar archive ".repeat(40)),
    ];
    for (repo, tar) in cases {
        let blob = layer_blob(&tar, Compress::Gzip, false);
        push_image(
            &reg,
            repo,
            "v1",
            std::slice::from_ref(&blob),
            "amd64",
            false,
        );
        let err = env.fails(&["cat", &format!("{}/{repo}:v1", reg.addr()), "/f"]);
        assert!(err.contains(&blob.digest), "{repo}: {err}");
        assert_cache_clean(&env);
    }
    // Bytes that are neither gzip nor tar, under a gzip media type.
    let garbage = b"\x00garbage".repeat(100);
    let blob = Blob {
        digest: sha256(&garbage),
        diff_id: sha256(&garbage),
        bytes: garbage,
        media_type: "application/vnd.docker.image.rootfs.diff.tar.gzip".into(),
    };
    push_image(
        &reg,
        "garbage",
        "v1",
        std::slice::from_ref(&blob),
        "amd64",
        false,
    );
    let err = env.fails(&["cat", &format!("{}/garbage:v1", reg.addr()), "/f"]);
    assert!(err.contains(&blob.digest), "{err}");
    assert_cache_clean(&env);
}

#[test]
fn kill_9_mid_download_leaves_nothing_the_next_run_trusts() {
    let reg = Registry::start(Auth::None);
    // Incompressible data so the blob is big on the wire.
    let mut data = vec![0u8; 3 << 20];
    let mut x: u64 = 0x2545F4914F6CDD1D;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let tar = LayerBuilder::new()
        .file("random.bin", &data, 0o644)
        .finish();
    push_image(
        &reg,
        "big",
        "v1",
        &[layer_blob(&tar, Compress::Gzip, false)],
        "amd64",
        false,
    );
    let slow = RedirectProxy::start_throttled(&reg, Some(1 << 20));
    let env = Env::new();
    let r = format!("{}/big:v1", slow.addr());
    let mut child = env
        .command(&["cat", &r, "/random.bin"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tmp = env.cache_dir().join("tmp");
    let started = wait_for(Duration::from_secs(30), || {
        std::fs::read_dir(&tmp)
            .map(|d| {
                d.flatten().any(|e| {
                    e.path().extension().is_some_and(|x| x == "blob")
                        && e.metadata().is_ok_and(|m| m.len() > 100_000)
                })
            })
            .unwrap_or(false)
    });
    assert!(started, "the download never started");
    child.kill().unwrap();
    child.wait().unwrap();
    let idx: Vec<_> = std::fs::read_dir(env.cache_dir().join("layers/sha256"))
        .unwrap()
        .flatten()
        .collect();
    assert!(idx.is_empty(), "a killed download must publish nothing");
    // The next run (straight to the registry) fetches it whole and gets the right bytes.
    let out = env.run(&["cat", &format!("{}/big:v1", reg.addr()), "/random.bin"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == data,
        "content differs after a killed download"
    );
}

#[test]
fn two_processes_sharing_a_cache_download_a_layer_once() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let slow = RedirectProxy::start_throttled(&reg, Some(2 << 20));
    let env = Env::new();
    let r = format!("{}/a:1", slow.addr());
    let spawn = || {
        env.command(&["cat", &r, "/etc/alpine-release"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3.10.9");
    }
    // One config fetch each, one layer fetch in all.
    assert_eq!(slow.cdn_requests(), 3, "the layer must be downloaded once");
}

#[test]
fn a_layer_in_use_by_a_mount_is_not_evicted() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/a:1", reg.addr()), &[]);
    assert!(
        std::fs::read_to_string(m.path.join("etc/os-release"))
            .unwrap()
            .contains("3.10.9")
    );
    env.ok(&["cache", "clear"]);
    assert_eq!(
        env.ok(&["cache", "ls"])
            .lines()
            .filter(|l| l.starts_with("sha256:"))
            .count(),
        1
    );
    assert!(std::fs::read(m.path.join("bin/busybox")).unwrap().len() > 100_000);
    env.ok(&["umount", m.path.to_str().unwrap()]);
    env.ok(&["cache", "clear"]);
    assert_eq!(
        env.ok(&["cache", "ls"])
            .lines()
            .filter(|l| l.starts_with("sha256:"))
            .count(),
        0
    );
}
