//! Byte-exact fidelity: images that are valid tar and valid OCI, shown
//! exactly as docker and umoci unpack them (names that are not UTF-8,
//! hardlinks across layers and to replaced targets, files written through
//! symlinked parents), through the mount, `ls`/`cat` and every export form.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::image::{Compress, LayerBuilder, layer_blob, push_image};
use common::listing::assert_same_tree;
use common::*;

const LATIN1: &[u8] = b"odd/latin1-\xe9.txt";
const RAW: &[u8] = b"odd/\xff\xfe";

fn long_raw_name() -> Vec<u8> {
    // Over 100 bytes: a GNU long-name header carries it.
    let mut p = b"odd/".to_vec();
    p.extend_from_slice(&[b'n'; 120]);
    p.extend_from_slice(b"-\xe9\xff.bin");
    p
}

/// Two layers with every case of issue 9 that umoci unpacks.
fn push_fidelity(reg: &Registry, repo: &str) {
    let mut low = LayerBuilder::new();
    low.dir("x", 0o755)
        .file("x/orig", b"orig-data\n", 0o644)
        .dir("odd", 0o755)
        .file_bytes(LATIN1, b"latin1\n")
        .file_bytes(RAW, b"raw\n")
        .file_bytes(&long_raw_name(), b"long\n")
        .symlink_bytes(b"odd/link-\xe9", b"latin1-\xe9.txt")
        .dir("etc", 0o755)
        .file("etc/base", b"base\n", 0o644)
        .symlink("abs", "/etc")
        .symlink("rel", "etc")
        .symlink("esc", "../../..")
        .dir("dup", 0o755);
    let mut high = LayerBuilder::new();
    // A hardlink to a file of the layer below.
    high.dir("x", 0o755)
        .hardlink("x/uplink", "x/orig")
        // A hardlink made before its target is replaced in the same layer.
        .dir("dup", 0o755)
        .file("dup/x", b"x1\n", 0o644)
        .hardlink("dup/y", "dup/x")
        .file("dup/x", b"x2\n", 0o644)
        // Files written through symlinked parents of the lower layer.
        .file("abs/injected-abs", b"a\n", 0o644)
        .file("rel/injected-rel", b"r\n", 0o644)
        .file("esc/escaped", b"e\n", 0o644);
    let blobs = [
        layer_blob(&low.finish(), Compress::Gzip, true),
        layer_blob(&high.finish(), Compress::Gzip, true),
    ];
    push_image(reg, repo, "v1", &blobs, "amd64", true);
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn at(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(std::ffi::OsStr::from_bytes(rel))
}

/// The cases themselves, so a mistake shared with umoci cannot hide.
fn check_cases(root: &Path) {
    assert_eq!(read(&at(root, LATIN1)), "latin1\n");
    assert_eq!(read(&at(root, RAW)), "raw\n");
    assert_eq!(read(&at(root, &long_raw_name())), "long\n");
    assert_eq!(read(&at(root, b"odd/link-\xe9")), "latin1\n");
    let orig = std::fs::metadata(root.join("x/orig")).unwrap();
    let up = std::fs::metadata(root.join("x/uplink")).unwrap();
    assert_eq!((orig.ino(), orig.nlink()), (up.ino(), 2));
    assert_eq!(read(&root.join("dup/x")), "x2\n");
    assert_eq!(read(&root.join("dup/y")), "x1\n");
    assert_ne!(
        std::fs::metadata(root.join("dup/x")).unwrap().ino(),
        std::fs::metadata(root.join("dup/y")).unwrap().ino()
    );
    assert_eq!(read(&root.join("etc/injected-abs")), "a\n");
    assert_eq!(read(&root.join("etc/injected-rel")), "r\n");
    assert_eq!(read(&root.join("escaped")), "e\n");
    for l in ["abs", "rel", "esc"] {
        assert!(
            std::fs::symlink_metadata(root.join(l))
                .unwrap()
                .file_type()
                .is_symlink(),
            "{l} must stay a symlink"
        );
    }
}

#[test]
fn odd_names_and_hardlinks_through_the_mount_match_umoci() {
    let reg = Registry::start(Auth::None);
    push_fidelity(&reg, "fidelity");
    let (_keep, rootfs) = umoci_unpack(&reg, "fidelity", "v1");
    check_cases(&rootfs);
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/fidelity:v1", reg.addr()), &[]);
    assert_same_tree(&m.path, &rootfs);
    check_cases(&m.path);
}

#[test]
fn a_cold_lookup_of_each_case_answers_what_the_tree_does() {
    // Before any listing, lookups go top down; each case must still come out
    // as the merged tree has it.
    let reg = Registry::start(Auth::None);
    push_fidelity(&reg, "fidelity");
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/fidelity:v1", reg.addr()), &[]);
    check_cases(&m.path);
}

#[test]
fn ls_writes_raw_bytes_to_a_pipe_and_cat_takes_any_bytes() {
    let reg = Registry::start(Auth::None);
    push_fidelity(&reg, "fidelity");
    let env = Env::new();
    let r = format!("{}/fidelity:v1", reg.addr());
    let out = env.command(&["ls", &r, "/odd"]).output().unwrap();
    assert!(out.status.success());
    let lines: Vec<&[u8]> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert!(
        lines.contains(&&b"/odd/latin1-\xe9.txt"[..]),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(lines.contains(&&b"/odd/\xff\xfe"[..]));
    let mut cat = env.command(&["cat", &r]);
    cat.arg(std::ffi::OsStr::from_bytes(b"/odd/latin1-\xe9.txt"));
    let out = cat.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"latin1\n");
    // A missing odd name is named in the error, escaped, on one line.
    let mut cat = env.command(&["cat", &r]);
    cat.arg(std::ffi::OsStr::from_bytes(b"/odd/\x1b[2Jmissing\xfa"));
    let out = cat.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("\\x1b[2Jmissing\\xfa"), "{err}");
    assert!(!err.contains('\x1b'), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn every_export_form_keeps_the_names_and_links() {
    let reg = Registry::start(Auth::None);
    push_fidelity(&reg, "fidelity");
    let (_keep, rootfs) = umoci_unpack(&reg, "fidelity", "v1");
    let env = Env::new();
    let r = format!("{}/fidelity:v1", reg.addr());
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in [
        ("docker.tar", vec![]),
        ("flat.tar", vec!["--flatten"]),
        ("oci.tar", vec!["--format", "oci"]),
    ] {
        let out = dir.path().join(name);
        let mut a = vec!["export"];
        a.extend(args.iter().copied());
        let o = out.display().to_string();
        a.extend([r.as_str(), o.as_str()]);
        env.ok(&a);
        let work = tempfile::tempdir().unwrap();
        let layout = work.path().join("oci");
        let transport = if name == "oci.tar" {
            "oci-archive"
        } else {
            "docker-archive"
        };
        run_ok(
            Command::new("skopeo")
                .args(["copy", "-q"])
                .arg(format!("{transport}:{}", out.display()))
                .arg(format!("oci:{}:t", layout.display())),
        );
        let (_k, unpacked) = unpack_layout(work, &layout, "t");
        assert_same_tree(&unpacked, &rootfs);
    }
    // The rootfs form, extracted by GNU tar.
    let out = dir.path().join("rootfs.tar");
    env.ok(&[
        "export",
        "--format",
        "rootfs",
        &r,
        &out.display().to_string(),
    ]);
    let x = dir.path().join("x");
    std::fs::create_dir(&x).unwrap();
    run_ok(
        Command::new("tar")
            .args([
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=user.*",
                "-xpf",
            ])
            .arg(&out)
            .arg("-C")
            .arg(&x),
    );
    assert_same_tree(&x, &rootfs);
}

#[test]
fn a_hardlink_to_nothing_fails_with_the_layer_and_the_name() {
    let reg = Registry::start(Auth::None);
    let mut l = LayerBuilder::new();
    l.dir("d", 0o755).hardlink("d/link", "d/missing");
    let blobs = [layer_blob(&l.finish(), Compress::Gzip, true)];
    push_image(&reg, "dangling", "v1", &blobs, "amd64", true);
    let env = Env::new();
    let err = env.fails(&["ls", &format!("{}/dangling:v1", reg.addr())]);
    assert!(err.contains("d/link") && err.contains("d/missing"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
