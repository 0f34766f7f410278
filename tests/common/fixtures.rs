//! The multi-layer "rules" image: every whiteout rule and entry type of the
//! OCI changeset spec in three layers, for comparison with umoci.

use super::Registry;
use super::image::{Blob, Compress, LayerBuilder, Pushed, layer_blob, push_image};

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub const LONG_DIR: &str = "long/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn rule_layers() -> Vec<Vec<u8>> {
    let long_file = format!("{LONG_DIR}/file-with-a-long-name.txt");
    let base = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", b"NAME=rules\nVERSION_ID=1\n", 0o644)
        .symlink("etc/link", "os-release")
        .symlink("abs", "/etc/os-release")
        .symlink("escape", "../../../../etc/os-release")
        .dir("data", 0o755)
        .file_owned("data/a.txt", b"owned by 1000\n", 0o640, 1000, 1000)
        .dir("data/sub", 0o755)
        .file("data/sub/b.txt", b"deleted later\n", 0o644)
        .file_xattrs(
            "data/x.txt",
            b"has xattrs\n",
            &[("user.comment", b"hello"), ("user.bin", b"\x00\x01\xff")],
        )
        .dir("opq", 0o755)
        .dir("opq/old", 0o755)
        .file("opq/old/x", b"hidden by opaque\n", 0o644)
        .file("opq/lower", b"hidden by opaque\n", 0o644)
        .dir("replace_dir", 0o755)
        .file(
            "replace_dir/child",
            b"gone when a file replaces the dir\n",
            0o644,
        )
        .file("replace_file", b"becomes a dir\n", 0o644)
        .dir("keep", 0o755)
        .file("keep/k", b"whited out by a hardlink whiteout\n", 0o644)
        .file("keep/stays", b"stays\n", 0o644)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/prog", b"#!/bin/sh\necho prog\n", 0o755)
        .hardlink("usr/bin/prog-link", "usr/bin/prog")
        .hardlink("usr/bin/prog-link2", "./usr/bin/prog")
        .file("usr/bin/su", b"setuid\n", 0o4755)
        .dir("tmp", 0o1777)
        .dir("dev", 0o755)
        .device("dev/null", false, 1, 3)
        .device("dev/sda", true, 8, 0)
        .fifo("dev/fifo")
        .dir("long", 0o755)
        .dir(LONG_DIR, 0o755)
        .file(&long_file, b"long name\n", 0o644)
        .file("big.bin", &vec![0xabu8; 300_000], 0o644)
        .finish();
    let middle = LayerBuilder::new()
        .whiteout("data/sub")
        .whiteout("etc/link")
        .file("opq/new", b"added with the opaque marker\n", 0o644)
        .opaque("opq")
        .file("replace_dir", b"a file over a dir\n", 0o600)
        .dir("replace_file", 0o750)
        .file("replace_file/inside", b"a dir over a file\n", 0o644)
        .dir("data", 0o700)
        .file("data/new.txt", b"new in layer 1\n", 0o644)
        .dir("hl", 0o755)
        .file("hl/a", b"hardlinked in layer 1\n", 0o644)
        .hardlink("hl/b", "hl/a")
        .finish();
    let top = LayerBuilder::new()
        // Like docker's layers, the changed file's directory is listed too.
        .dir("etc", 0o755)
        .dir("z", 0o755)
        .file(
            "z/target",
            b"target of a whiteout stored as a hardlink\n",
            0o644,
        )
        .hardlink("keep/.wh.k", "z/target")
        .file(
            "usr/bin/prog-link",
            b"replaces one name of a hardlink group\n",
            0o755,
        )
        .file("etc/os-release", b"NAME=rules\nVERSION_ID=2\n", 0o644)
        .finish();
    vec![base, middle, top]
}

/// Pushes the rules image (gzip layers) and returns what was pushed.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn push_rules(reg: &Registry, repo: &str, tag: &str, oci: bool) -> Pushed {
    let blobs: Vec<Blob> = rule_layers()
        .iter()
        .map(|t| layer_blob(t, Compress::Gzip, oci))
        .collect();
    push_image(reg, repo, tag, &blobs, "amd64", oci)
}
