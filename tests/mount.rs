//! `rimg mount`: real kernel mounts of images in a real local registry,
//! compared entry by entry with umoci's unpacked rootfs.

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use common::fixtures::*;
use common::image::{push_alpine, push_image, push_index};
use common::listing::{assert_same_tree, tree_listing};
use common::*;

#[test]
fn alpine_mount_matches_umoci_unpack_entry_by_entry() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "library/alpine", "3.10", "3.10.9", "amd64", false);
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/library/alpine:3.10", reg.addr()), &[]);
    let (_keep, rootfs) = umoci_unpack(&reg, "library/alpine", "3.10");
    assert_same_tree(&m.path, &rootfs);
    let os = std::fs::read_to_string(m.path.join("etc/os-release")).unwrap();
    assert!(os.contains("VERSION_ID=3.10.9"), "{os}");
}

#[test]
fn rules_image_through_the_mount_matches_umoci() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", true);
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/rules:v1", reg.addr()), &[]);
    let (_keep, rootfs) = umoci_unpack(&reg, "rules", "v1");
    assert_same_tree(&m.path, &rootfs);
    // The rules themselves, so a shared mistake with umoci cannot hide.
    let p = &m.path;
    assert!(
        !p.join("data/sub").exists(),
        "whiteout must delete the subtree"
    );
    assert!(!p.join("etc/link").exists());
    assert!(!p.join("opq/old").exists() && !p.join("opq/lower").exists());
    assert!(p.join("opq/new").exists());
    assert!(p.join("replace_dir").is_file());
    assert!(p.join("replace_file/inside").is_file());
    assert!(!p.join("keep/k").exists() && p.join("keep/stays").exists());
    assert_eq!(
        std::fs::metadata(p.join("data")).unwrap().mode() & 0o7777,
        0o700
    );
    let prog = std::fs::metadata(p.join("usr/bin/prog")).unwrap();
    assert_eq!(prog.nlink(), 2);
    assert_eq!(
        prog.ino(),
        std::fs::metadata(p.join("usr/bin/prog-link2"))
            .unwrap()
            .ino()
    );
    assert_ne!(
        prog.ino(),
        std::fs::metadata(p.join("usr/bin/prog-link"))
            .unwrap()
            .ino()
    );
    assert_eq!(
        std::fs::read_to_string(p.join("etc/os-release")).unwrap(),
        "NAME=rules\nVERSION_ID=2\n"
    );
    let names: Vec<String> = walk(p).into_iter().filter(|n| n.contains(".wh.")).collect();
    assert!(names.is_empty(), "whiteouts must not show: {names:?}");
}

fn walk(root: &std::path::Path) -> Vec<String> {
    tree_listing(root).into_keys().collect()
}

#[test]
fn files_report_owner_mode_devices_and_layer_xattr() {
    let reg = Registry::start(Auth::None);
    let pushed = push_rules(&reg, "rules", "v1", false);
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/rules:v1", reg.addr()), &[]);
    let a = std::fs::metadata(m.path.join("data/a.txt")).unwrap();
    assert_eq!(
        (a.uid(), a.gid(), a.mode() & 0o7777, a.len()),
        (1000, 1000, 0o640, 14)
    );
    let su = std::fs::metadata(m.path.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755, "setuid is shown");
    let null = std::fs::symlink_metadata(m.path.join("dev/null")).unwrap();
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    let out = run_ok(
        Command::new("getfattr")
            .args(["-n", "user.rimg.layer", "--only-values"])
            .arg(m.path.join("etc/os-release")),
    );
    assert_eq!(out, pushed.layers[2]);
    let out = run_ok(
        Command::new("getfattr")
            .args(["-n", "user.comment", "--only-values"])
            .arg(m.path.join("data/x.txt")),
    );
    assert_eq!(out, "hello");
    let big = std::fs::read(m.path.join("big.bin")).unwrap();
    assert_eq!(big.len(), 300_000);
    assert!(big.iter().all(|&b| b == 0xab));
    // nosuid,nodev,ro and the reference as the source
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(m.path.to_str().unwrap()))
        .unwrap();
    assert!(
        line.contains("fuse.rimg")
            && line.contains("ro,")
            && line.contains("nosuid")
            && line.contains("nodev"),
        "{line}"
    );
    assert!(
        line.starts_with(&format!("{}/rules:v1", reg.addr())),
        "{line}"
    );
}

#[test]
fn cat_and_grep_work_over_the_mount() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "library/alpine", "3.20", "3.20.3", "amd64", true);
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/library/alpine:3.20", reg.addr()), &[]);
    let out = run_ok(Command::new("cat").arg(m.path.join("etc/os-release")));
    assert!(out.contains("3.20.3"));
    let out = run_ok(
        Command::new("grep")
            .args(["-r", "-l", "root:x:0:0"])
            .arg(m.path.join("etc")),
    );
    assert!(out.contains("etc/passwd"), "{out}");
    let mounts = env.ok(&["mounts"]);
    assert!(
        mounts.contains(m.path.to_str().unwrap()) && mounts.contains("alpine:3.20"),
        "{mounts}"
    );
}

#[test]
fn writes_fail_with_erofs() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", true);
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/rules:v1", reg.addr()), &[]);
    std::fs::read_dir(&m.path).unwrap().count();
    let erofs =
        |r: std::io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    erofs(std::fs::write(m.path.join("new"), b"x"));
    erofs(std::fs::write(m.path.join("etc/os-release"), b"x"));
    erofs(std::fs::create_dir(m.path.join("d")));
    erofs(std::fs::remove_file(m.path.join("etc/os-release")));
    erofs(std::fs::rename(m.path.join("abs"), m.path.join("abs2")));
    erofs(std::os::unix::fs::symlink("x", m.path.join("s")));
    erofs(std::fs::set_permissions(
        m.path.join("etc/os-release"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    ));
}

#[test]
fn layer_option_mounts_one_layer_with_its_whiteouts() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", true);
    let env = Env::new();
    let r = format!("{}/rules:v1", reg.addr());
    let m = Mounted::new(&env, &r, &["--layer", "1"]);
    assert!(m.path.join("data/.wh.sub").exists());
    assert!(m.path.join("opq/.wh..wh..opq").exists());
    assert!(
        !m.path.join("etc/os-release").exists(),
        "only layer 1's own entries"
    );
    drop(m);
    let top = Mounted::new(&env, &r, &["--layer=-1"]);
    assert!(top.path.join("keep/.wh.k").exists());
    let other = tempfile::tempdir().unwrap();
    let err = env.fails(&["mount", "--layer", "7", &r, other.path().to_str().unwrap()]);
    assert!(err.contains("layer 7"), "{err}");
}

#[test]
fn each_way_of_unmounting_works() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let env = Env::new();
    let r = format!("{}/a:1", reg.addr());
    let pid_of = |m: &Mounted| -> i32 {
        let out = env.ok(&["mounts"]);
        let line = out
            .lines()
            .find(|l| l.ends_with(m.path.to_str().unwrap()))
            .expect("listed");
        line.split_whitespace()
            .rev()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let gone = |m: &Mounted| wait_for(Duration::from_secs(10), || !m.is_mounted());

    let m = Mounted::new(&env, &r, &[]);
    env.ok(&["umount", m.path.to_str().unwrap()]);
    assert!(!m.is_mounted());
    assert!(!env.ok(&["mounts"]).contains(m.path.to_str().unwrap()));

    let m = Mounted::new(&env, &r, &[]);
    run_ok(Command::new("fusermount3").arg("-u").arg(&m.path));
    assert!(gone(&m));

    let m = Mounted::new(&env, &r, &[]);
    run_ok(Command::new("umount").arg(&m.path));
    assert!(gone(&m));

    for sig in [libc::SIGTERM, libc::SIGINT] {
        let m = Mounted::new(&env, &r, &[]);
        let pid = pid_of(&m);
        unsafe { libc::kill(pid, sig) };
        assert!(gone(&m), "signal {sig} must unmount");
        assert!(wait_for(Duration::from_secs(10), || !std::path::Path::new(
            &format!("/proc/{pid}")
        )
        .exists()));
    }

    // kill -9: the server's watcher cleans up; no wedged mount is left.
    // Used first, so the kernel holds the root's attributes and an open
    // directory needs no round trip: the dead server must still be noticed.
    let m = Mounted::new(&env, &r, &[]);
    std::fs::read_to_string(m.path.join("etc/os-release")).unwrap();
    std::fs::read_dir(&m.path).unwrap().count();
    let pid = pid_of(&m);
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(gone(&m), "kill -9 must not leave a wedged mount");
    assert!(std::fs::read_dir(&m.path).is_ok());
}

#[test]
fn a_registry_that_goes_away_gives_eio_and_a_later_access_retries() {
    let mut reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/a:1", reg.addr()), &[]);
    reg.stop();
    let started = std::time::Instant::now();
    let err = std::fs::read_to_string(m.path.join("etc/os-release")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "must not hang");
    // Right after a failure the next access gets the same answer at once,
    // rather than asking the dead registry again.
    let again = std::time::Instant::now();
    let err = std::fs::metadata(m.path.join("etc/passwd")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        again.elapsed() < Duration::from_secs(1),
        "{:?}",
        again.elapsed()
    );
    reg.restart();
    // After the short backoff, an access fetches again and succeeds.
    assert!(wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(m.path.join("etc/os-release")).is_ok_and(|s| s.contains("3.10.9"))
    }));
}

#[test]
fn bad_references_and_missing_platforms_fail_before_mounting() {
    let reg = Registry::start(Auth::Basic);
    push_alpine(&reg, "p", "1", "3.10.9", "amd64", false);
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().to_str().unwrap();
    let err = env.fails(&["mount", &format!("{}/p:1", reg.addr()), mp]);
    assert!(err.contains("authentication"), "{err}");
    let creds = Env::new()
        .set("RIMG_USERNAME", USER)
        .set("RIMG_PASSWORD", PASS);
    let err = creds.fails(&[
        "mount",
        "--platform",
        "linux/ppc64le",
        &format!("{}/p:1", reg.addr()),
        mp,
    ]);
    assert!(err.contains("platform") || err.contains("ppc64le"), "{err}");
    let err = env.fails(&["mount", "Bad/Ref", mp]);
    assert!(err.contains("lowercase"), "{err}");
    assert!(!is_mountpoint(dir.path()));
}

#[test]
fn eight_parallel_readers_all_make_progress() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.20.3", "amd64", false);
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/a:1", reg.addr()), &[]);
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("find . -type f -print0 | xargs -0 -P8 -n16 sha256sum | wc -l")
            .current_dir(&m.path),
    );
    let files = tree_listing(&m.path)
        .values()
        .filter(|e| e.kind == '-')
        .count();
    assert_eq!(out.trim().parse::<usize>().unwrap(), files);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let p = m.path.clone();
            std::thread::spawn(move || tree_listing(&p).len())
        })
        .collect();
    let counts: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        counts.windows(2).all(|w| w[0] == w[1]) && counts[0] > 50,
        "{counts:?}"
    );
}

#[test]
fn arm64_alpine_from_a_manifest_list_matches_umoci() {
    let reg = Registry::start(Auth::None);
    let amd = push_alpine(&reg, "alpine", "amd", "3.10.9", "amd64", false);
    let arm = push_alpine(&reg, "alpine", "arm", "3.10.9", "arm64/v8", false);
    push_index(
        &reg,
        "alpine",
        "3.10",
        &[("linux/amd64", &amd), ("linux/arm64/v8", &arm)],
        false,
    );
    let env = Env::new();
    let m = Mounted::new(
        &env,
        &format!("{}/alpine:3.10", reg.addr()),
        &["--platform", "linux/arm64"],
    );
    let (_keep, rootfs) = umoci_unpack(&reg, "alpine", "arm");
    assert_same_tree(&m.path, &rootfs);
    let busybox = std::fs::read(m.path.join("bin/busybox")).unwrap();
    assert_eq!(busybox[18], 0xb7, "an aarch64 ELF (e_machine 183)");
}

#[test]
fn layers_are_fetched_on_first_access_or_right_away_with_prefetch() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let r = format!("{}/a:1", reg.addr());
    let cached = |env: &Env| {
        env.ok(&["cache", "ls"])
            .lines()
            .filter(|l| l.starts_with("sha256:"))
            .count()
    };
    let env = Env::new();
    let m = Mounted::new(&env, &r, &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cached(&env), 0, "nothing is fetched at mount time");
    std::fs::metadata(&m.path).unwrap();
    assert_eq!(cached(&env), 0, "stat of the mount point fetches nothing");
    // `rimg mounts` and `rimg umount` ask the server whether it is alive.
    assert!(env.ok(&["mounts"]).contains(" live "));
    assert_eq!(
        cached(&env),
        0,
        "asking whether a mount is alive fetches nothing"
    );
    std::fs::read_dir(&m.path).unwrap().count();
    assert_eq!(cached(&env), 1);
    let env = Env::new();
    let _m = Mounted::new(&env, &r, &["--prefetch"]);
    assert!(
        wait_for(Duration::from_secs(30), || cached(&env) == 1),
        "--prefetch fetches without access"
    );
}

#[test]
fn a_path_needs_only_the_layers_from_the_top_down_to_the_one_that_decides_it() {
    let reg = Registry::start(Auth::None);
    let p = push_rules(&reg, "rules", "v1", true);
    // Without its bottom layer the image can still answer whatever the upper
    // layers decide.
    std::fs::remove_file(reg.blob_file(&p.layers[0])).unwrap();
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/rules:v1", reg.addr()), &[]);
    let os = std::fs::read_to_string(m.path.join("etc/os-release")).unwrap();
    assert_eq!(os, "NAME=rules\nVERSION_ID=2\n", "found in the top layer");
    let cached = || {
        env.ok(&["cache", "ls"])
            .lines()
            .filter(|l| l.starts_with("sha256:"))
            .count()
    };
    assert_eq!(cached(), 1, "only the top layer was fetched");
    // Whited out in the middle layer: decided there, no bottom layer needed.
    let gone = std::fs::metadata(m.path.join("data/sub/b.txt")).unwrap_err();
    assert_eq!(gone.raw_os_error(), Some(libc::ENOENT));
    assert_eq!(cached(), 2);
    // Only the bottom layer knows this one, and it cannot be fetched.
    let err = std::fs::metadata(m.path.join("data/a.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Listing a directory needs every layer below its nearest opaque marker.
    let err = std::fs::read_dir(m.path.join("etc"))
        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}

#[test]
fn inode_numbers_given_before_the_tree_exists_stay_the_same_after() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", false);
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/rules:v1", reg.addr()), &[]);
    let inodes = || -> Vec<u64> {
        [
            "usr/bin/prog",
            "usr/bin/prog-link2",
            "etc/os-release",
            "data",
        ]
        .iter()
        .map(|p| std::fs::symlink_metadata(m.path.join(p)).unwrap().ino())
        .collect()
    };
    let before = inodes();
    assert_eq!(
        before[0], before[1],
        "hardlinked names share an inode from the start"
    );
    // Building the whole tree (a listing) must not renumber anything.
    tree_listing(&m.path);
    assert_eq!(before, inodes());
    let listed = tree_listing(&m.path);
    assert_eq!(listed["usr/bin/prog"].links, ["usr/bin/prog-link2"]);
}

#[test]
fn a_name_longer_than_255_bytes_is_left_out_of_the_mount_and_its_directory_still_lists() {
    let reg = Registry::start(Auth::None);
    let long = "n".repeat(300);
    let mut l = common::image::LayerBuilder::new();
    l.dir("d", 0o755).file("d/a", b"a\n", 0o644);
    l.file(&format!("d/{long}"), b"long\n", 0o644);
    for i in 0..100 {
        l.file(&format!("d/z{i:03}"), b"z\n", 0o644);
    }
    let layer = l.finish();
    push_image(
        &reg,
        "long",
        "1",
        &[common::image::layer_blob(
            &layer,
            common::image::Compress::Gzip,
            true,
        )],
        "amd64",
        true,
    );
    let env = Env::new();
    let r = format!("{}/long:1", reg.addr());
    let m = Mounted::new(&env, &r, &[]);
    let mut names: Vec<String> = std::fs::read_dir(m.path.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 101, "every other entry is listed");
    assert_eq!(names[0], "a");
    assert_eq!(names[100], "z099");
    assert_eq!(
        std::fs::read_to_string(m.path.join("d/z050")).unwrap(),
        "z\n"
    );
    // Still reachable without the mount.
    assert!(env.ok(&["ls", &r, "d"]).contains(&long));
    assert_eq!(env.ok(&["cat", &r, &format!("d/{long}")]), "long\n");
}

#[test]
fn the_merged_tree_is_saved_once_every_layer_is_here_so_the_next_mount_loads_it() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", true);
    let r = format!("{}/rules:v1", reg.addr());
    let env = Env::new();
    let trees = env.cache_dir().join("trees");
    let saved = || std::fs::read_dir(&trees).is_ok_and(|d| d.count() > 0);

    // Cold: a top-layer file fetches one layer, and no tree is made for it.
    let m = Mounted::new(&env, &r, &[]);
    std::fs::read(m.path.join("etc/os-release")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!saved(), "nothing is merged while layers are missing");
    // A path decided below the top layer fetches the rest; once the last
    // arrives the tree is built and saved without any listing asking for it.
    std::fs::metadata(m.path.join("data/a.txt")).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), saved),
        "cold mount saves the tree"
    );
    let a = std::fs::metadata(m.path.join("usr/bin/prog")).unwrap();
    assert_eq!(a.nlink(), 2);
    drop(m);

    // Warm without a saved tree (an older cache): saved after the first lookups.
    std::fs::remove_dir_all(&trees).unwrap();
    let m = Mounted::new(&env, &r, &[]);
    std::fs::metadata(m.path.join("etc/os-release")).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), saved),
        "warm mount saves the tree"
    );
    // And the merged view is the same either way.
    let (_keep, rootfs) = umoci_unpack(&reg, "rules", "v1");
    assert_same_tree(&m.path, &rootfs);
}

/// The one saved tree file in the cache.
fn saved_tree_file(env: &Env) -> std::path::PathBuf {
    let trees = env.cache_dir().join("trees");
    let files: Vec<_> = std::fs::read_dir(&trees)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

#[test]
fn a_damaged_saved_tree_is_rebuilt_and_the_mount_shows_the_right_content() {
    let reg = Registry::start(Auth::None);
    push_rules(&reg, "rules", "v1", true);
    let r = format!("{}/rules:v1", reg.addr());
    let env = Env::new();
    let (_keep, rootfs) = umoci_unpack(&reg, "rules", "v1");
    // `ls` fetches every layer and saves the tree.
    let listing = env.ok(&["ls", "-R", &r]);
    let path = saved_tree_file(&env);
    let good = std::fs::read(&path).unwrap();
    let damaged = [
        {
            // One bit flipped in the middle: only the checksum can tell.
            let mut b = good.clone();
            let mid = b.len() / 2;
            b[mid] ^= 0x10;
            b
        },
        good[..good.len() - 3].to_vec(),
        // Another version of the format.
        {
            let mut b = good.clone();
            b[8] = b[8].wrapping_add(1);
            b
        },
    ];
    for bad in damaged {
        std::fs::write(&path, &bad).unwrap();
        let m = Mounted::new(&env, &r, &[]);
        assert_same_tree(&m.path, &rootfs);
        drop(m);
        // Rebuilt and saved again whole.
        assert_eq!(std::fs::read(&path).unwrap(), good);
    }
    // `ls` says why it rebuilt, and lists the same.
    std::fs::write(&path, &good[..100]).unwrap();
    let out = env.run(&["ls", "-R", &r]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("saved tree") && stderr.contains("truncated"),
        "{stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), listing);
    assert_eq!(std::fs::read(&path).unwrap(), good);
}

#[test]
fn umount_all_unmounts_every_mount_and_a_busy_one_needs_lazy() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let env = Env::new();
    let r = format!("{}/a:1", reg.addr());
    let (m1, m2) = (Mounted::new(&env, &r, &[]), Mounted::new(&env, &r, &[]));
    env.ok(&["umount", "--all"]);
    assert!(!m1.is_mounted() && !m2.is_mounted());

    let m = Mounted::new(&env, &r, &[]);
    let held = std::fs::File::open(m.path.join("etc/os-release")).unwrap();
    let err = env.fails(&["umount", m.path.to_str().unwrap()]);
    assert!(err.contains("--lazy") && err.contains("in use"), "{err}");
    assert!(m.is_mounted());
    env.ok(&["umount", "--lazy", m.path.to_str().unwrap()]);
    assert!(!m.is_mounted());
    drop(held);
}
