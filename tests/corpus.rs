//! Go's archive/tar test corpus as a conformance suite: docker, containerd and
//! umoci all read layers with Go's reader, so rimg must read every tar it
//! reads, and the same way. Each corpus tar is pushed to a real registry as a
//! one-layer image, then mounted, listed (`ls -R`), `cat` and exported with
//! rimg, and compared with umoci's unpack of the same image. What Go does per file
//! comes from its reader_test.go; the outcome expected of rimg is recorded
//! per file below, so a regression names the file.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::image::{Compress, layer_blob, push_image};
use common::listing::{
    EntryInfo, assert_same_tree, diff_listings, from_lossless, lossless, tree_listing,
};
use common::*;

const TESTDATA: &str = "/usr/share/go-1.19/src/archive/tar/testdata";

enum Want {
    /// Go reads it, and rimg's mount, `cat` and rootfs export show exactly
    /// the tree umoci unpacks.
    Same,
    /// Go reads it; umoci refuses it for the reason given, and rimg serves
    /// the listed entries (`kind path size`) as docker or GNU tar would.
    Served(&'static str, &'static [&'static str]),
    /// Go refuses it, and so do umoci and rimg (whose one-line error names
    /// the layer and contains this).
    Refused(&'static str),
    /// Go reads a 60 GB sparse file; checked through the mount against Go's
    /// writer_test (umoci would write all 60 GB out, zeros included).
    Big,
}

use Want::*;

const CORPUS: &[(&str, Want)] = &[
    ("file-and-dir.tar", Same),
    (
        "gnu-incremental.tar",
        Served(
            "umoci knows neither GNU dump directories ('D') nor old GNU sparse files ('S'); \
             GNU tar extracts 'D' as a directory, and Go expands 'S'",
            &["d test2 0", "- test2/foo 64", "- test2/sparse 536870912"],
        ),
    ),
    ("gnu-long-nul.tar", Same),
    ("gnu-multi-hdrs.tar", Same),
    (
        "gnu-nil-sparse-data.tar",
        Served(
            "umoci does not know old GNU sparse files ('S'); Go expands them",
            &["- sparse.db 1000"],
        ),
    ),
    (
        "gnu-nil-sparse-hole.tar",
        Served(
            "umoci does not know old GNU sparse files ('S'); Go expands them",
            &["- sparse.db 1000"],
        ),
    ),
    ("gnu-not-utf8.tar", Same),
    ("gnu-sparse-big.tar", Big),
    ("gnu-utf8.tar", Same),
    ("gnu.tar", Same),
    ("hardlink.tar", Same),
    ("hdr-only.tar", Same),
    ("invalid-go17.tar", Same),
    ("issue10968.tar", Refused("not a tar header")),
    ("issue11169.tar", Refused("malformed PAX header")),
    ("issue12435.tar", Refused("field is not a number")),
    ("neg-size.tar", Refused("field is not a number")),
    ("nil-uid.tar", Same),
    ("pax-bad-hdr-file.tar", Refused("malformed PAX header")),
    (
        "pax-bad-hdr-large.tar.bz2",
        Refused("exceeds the 1048576 byte limit"),
    ),
    (
        "pax-bad-mtime-file.tar",
        Refused("PAX mtime is not a number"),
    ),
    (
        "pax-global-records.tar",
        Served(
            "umoci does not know global PAX headers ('g'); docker and containerd skip them, \
             and Go applies their records to no entry",
            &["- file1 0", "- file2 0", "- file3 0", "- file4 0"],
        ),
    ),
    ("pax-multi-hdrs.tar", Same),
    ("pax-nil-sparse-data.tar", Same),
    ("pax-nil-sparse-hole.tar", Same),
    // Go (like BSD tar) refuses a NUL inside a PAX path; GNU tar would cut
    // the name there. Refusing is also the safe side: two readers must never
    // see two different names for one entry.
    ("pax-nul-path.tar", Refused("NUL byte")),
    ("pax-nul-xattrs.tar", Refused("NUL byte")),
    ("pax-path-hdr.tar", Same),
    ("pax-pos-size-file.tar", Same),
    ("pax-records.tar", Same),
    ("pax-sparse-big.tar", Big),
    ("pax.tar", Same),
    (
        "sparse-formats.tar",
        Served(
            "umoci does not know old GNU sparse files ('S'); Go expands all four encodings",
            &[
                "- end 4",
                "- sparse-gnu 200",
                "- sparse-posix-0.0 200",
                "- sparse-posix-0.1 200",
                "- sparse-posix-1.0 200",
            ],
        ),
    ),
    ("star.tar", Same),
    ("trailing-slash.tar", Same),
    ("ustar-file-devs.tar", Same),
    ("ustar-file-reg.tar", Same),
    ("ustar.tar", Same),
    ("v7.tar", Same),
    // Both end 16 GiB early: truncated inside a file's data.
    ("writer-big-long.tar", Refused("truncated")),
    ("writer-big.tar", Refused("truncated")),
    ("writer.tar", Same),
    ("xattrs.tar", Same),
];

fn corpus_bytes(name: &str) -> Vec<u8> {
    let path = Path::new(TESTDATA).join(name);
    if name.ends_with(".bz2") {
        let out = Command::new("bzip2")
            .arg("-dc")
            .arg(&path)
            .output()
            .expect("bzip2 (scripts/install-deps.sh)");
        assert!(out.status.success(), "bzip2 -dc {}", path.display());
        return out.stdout;
    }
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/install-deps.sh)", path.display()))
}

fn repo_of(name: &str) -> String {
    format!("corpus/{}", name.split(".tar").next().unwrap())
}

/// `skopeo copy` + `umoci unpack`, or umoci's error.
fn umoci_try(reg: &Registry, repo: &str) -> Result<(tempfile::TempDir, PathBuf), String> {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{}/{repo}:t", reg.addr()))
            .arg(format!("oci:{}:t", layout.display())),
    );
    let bundle = dir.path().join("bundle");
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:t", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok((dir, bundle.join("rootfs")))
}

fn kind_path_size(listing: &BTreeMap<String, EntryInfo>) -> Vec<String> {
    listing
        .iter()
        .map(|(p, e)| format!("{} {p} {}", e.kind, e.size))
        .collect()
}

/// Every regular file's bytes through `rimg cat` equal the mount's.
fn cat_matches_mount(env: &Env, r: &str, mount: &Path, listing: &BTreeMap<String, EntryInfo>) {
    for (path, e) in listing {
        if e.kind != '-' || e.size > 1 << 20 {
            continue;
        }
        use std::os::unix::ffi::OsStrExt;
        let bytes = from_lossless(path);
        let name = std::ffi::OsStr::from_bytes(&bytes);
        let out = env.command(&["cat", r]).arg(name).output().unwrap();
        assert!(
            out.status.success(),
            "rimg cat {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.stdout,
            std::fs::read(mount.join(name)).unwrap(),
            "rimg cat {path}"
        );
    }
}

/// `rimg ls -R` names what the mount holds.
fn ls_matches_mount(env: &Env, r: &str, listing: &BTreeMap<String, EntryInfo>) -> bool {
    let out = env.command(&["ls", "-R", r]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Names come as raw bytes on a pipe; compare them losslessly.
    let mut names: Vec<String> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| lossless(l.strip_prefix(b"/").unwrap_or(l)))
        .collect();
    names.sort();
    names == listing.keys().cloned().collect::<Vec<_>>()
}

/// The rootfs export, extracted by GNU tar, shows the mount's tree.
fn export_matches(env: &Env, r: &str, listing: &BTreeMap<String, EntryInfo>) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rootfs.tar");
    env.ok(&["export", "--format", "rootfs", r, out.to_str().unwrap()]);
    let x = dir.path().join("x");
    std::fs::create_dir(&x).unwrap();
    run_ok(
        Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
            .arg(&out)
            .arg("-C")
            .arg(&x),
    );
    diff_listings(&tree_listing(&x), listing)
}

/// Go's writer_test: six stretches of 1e10 bytes, each ending in 100 bytes
/// of "0123456789" after zeros.
fn check_big(path: &Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len != 60_000_000_000 {
        return Err(format!("size {len}"));
    }
    for k in 1..=6u64 {
        let mut buf = [9u8; 200];
        f.read_exact_at(&mut buf, k * 10_000_000_000 - 200)
            .map_err(|e| e.to_string())?;
        if buf[..100] != [0u8; 100] || &buf[100..] != "0123456789".repeat(10).as_bytes() {
            return Err(format!("stretch {k} reads {:?}", &buf[90..110]));
        }
    }
    Ok(())
}

#[test]
fn go_tar_corpus_reads_as_go_and_umoci_read_it() {
    let reg = Registry::start(Auth::None);
    let env = Env::new();
    let mut failures = Vec::new();
    for (name, want) in CORPUS {
        let tar = corpus_bytes(name);
        let repo = repo_of(name);
        let blob = layer_blob(&tar, Compress::Gzip, true);
        push_image(&reg, &repo, "t", std::slice::from_ref(&blob), "amd64", true);
        let r = format!("{}/{repo}:t", reg.addr());
        let mut fail = |what: String| failures.push(format!("{name}: {what}"));
        match want {
            Refused(detail) => {
                let out = env.run(&["ls", "-R", &r]);
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("rimg: ")).collect();
                if out.status.success() {
                    fail("rimg serves what Go refuses".into());
                } else if lines.len() != 1
                    || !lines[0].contains(&format!("layer {}", blob.digest))
                    || !lines[0].contains(detail)
                    || err.contains("panicked")
                {
                    fail(format!(
                        "rimg's error should name the layer and say {detail:?}: {err}"
                    ));
                }
                if umoci_try(&reg, &repo).is_ok() {
                    fail("umoci unpacks what Go refuses".into());
                }
            }
            Big => {
                let m = Mounted::new(&env, &r, &[]);
                let file = std::fs::read_dir(&m.path).unwrap().next().unwrap().unwrap();
                if let Err(e) = check_big(&file.path()) {
                    fail(format!("through the mount: {e}"));
                }
            }
            Same | Served(..) => {
                let m = Mounted::new(&env, &r, &[]);
                let ours = tree_listing(&m.path);
                match (want, umoci_try(&reg, &repo)) {
                    (Same, Ok((_keep, rootfs))) => {
                        let d = diff_listings(&ours, &tree_listing(&rootfs));
                        if !d.is_empty() {
                            fail(format!("differs from umoci: {}", d.join("\n")));
                        }
                    }
                    (Same, Err(e)) => fail(format!("umoci refuses ({e}); expected the same tree")),
                    (Served(why, entries), Err(_)) => {
                        let got = kind_path_size(&ours);
                        if got != *entries {
                            fail(format!("serves {got:?}, expected {entries:?} ({why})"));
                        }
                    }
                    (Served(why, _), Ok(_)) => {
                        fail(format!("umoci unpacks it now; make it Same (was: {why})"))
                    }
                    _ => unreachable!(),
                }
                if !ls_matches_mount(&env, &r, &ours) {
                    fail("rimg ls -R names other entries than the mount".into());
                }
                cat_matches_mount(&env, &r, &m.path, &ours);
                let d = export_matches(&env, &r, &ours);
                if !d.is_empty() {
                    fail(format!(
                        "rootfs export differs from the mount: {}",
                        d.join("\n")
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus files misread:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn corpus_table_covers_every_tar_in_the_corpus() {
    let mut names: Vec<String> = std::fs::read_dir(TESTDATA)
        .unwrap_or_else(|e| panic!("{TESTDATA}: {e} (scripts/install-deps.sh)"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tar"))
        .collect();
    names.sort();
    let listed: Vec<String> = CORPUS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(listed, names);
}

/// A sparse file of `size` bytes holding `chunks` (offset, bytes).
fn sparse_file(dir: &Path, name: &str, size: u64, chunks: &[(u64, Vec<u8>)]) {
    let f = std::fs::File::create(dir.join(name)).unwrap();
    f.set_len(size).unwrap();
    for (at, data) in chunks {
        f.write_all_at(data, *at).unwrap();
    }
}

/// GNU tar's archive of `names` in `dir`, in `format`, sparse files detected.
fn gnu_tar(dir: &Path, args: &[&str], names: &[&str]) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args([
            "--sparse",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-b",
            "1",
        ])
        .args(args)
        .arg("-cf")
        .arg("-")
        .args(names)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Archives joined into one: each but the last loses its end-of-archive zero
/// blocks (the files here all end in data, so no data block is all zeros at
/// the end).
fn concat(tars: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, t) in tars.iter().enumerate() {
        let mut t = t.clone();
        if i + 1 < tars.len() {
            while t.len() >= 512 && t[t.len() - 512..].iter().all(|&b| b == 0) {
                t.truncate(t.len() - 512);
            }
        }
        out.extend_from_slice(&t);
    }
    out
}

fn chunks() -> Vec<(u64, Vec<u8>)> {
    let noise: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect();
    vec![
        (0, b"head of a sparse file\n".to_vec()),
        (10 << 20, noise),
        ((24 << 20) - 5, b"tail!".to_vec()),
    ]
}

fn push_tar(reg: &Registry, repo: &str, tar: &[u8]) -> String {
    push_image(
        reg,
        repo,
        "t",
        &[layer_blob(tar, Compress::Gzip, true)],
        "amd64",
        true,
    );
    format!("{}/{repo}:t", reg.addr())
}

fn cat_all(env: &Env, r: &str, mount: &Path) {
    for (path, e) in tree_listing(mount) {
        if e.kind == '-' {
            let out = env.run(&["cat", r, &path]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                out.stdout,
                std::fs::read(mount.join(&path)).unwrap(),
                "rimg cat {path}"
            );
        }
    }
}

#[test]
fn sparse_files_in_pax_encodings_match_umoci_through_the_mount_and_cat() {
    let src = tempfile::tempdir().unwrap();
    let names = ["pax00.img", "pax01.img", "pax10.img"];
    for n in names {
        sparse_file(src.path(), n, 24 << 20, &chunks());
    }
    let tar = concat(&[
        gnu_tar(
            src.path(),
            &["--format=posix", "--sparse-version=0.0"],
            &names[..1],
        ),
        gnu_tar(
            src.path(),
            &["--format=posix", "--sparse-version=0.1"],
            &names[1..2],
        ),
        gnu_tar(
            src.path(),
            &["--format=posix", "--sparse-version=1.0"],
            &names[2..],
        ),
    ]);
    // Stored sparse: far smaller than the 72 MiB the files hold.
    assert!(tar.len() < 1 << 20, "{} bytes", tar.len());
    let reg = Registry::start(Auth::None);
    let env = Env::new();
    let r = push_tar(&reg, "sparse/pax", &tar);
    let m = Mounted::new(&env, &r, &[]);
    let (_keep, rootfs) = umoci_unpack(&reg, "sparse/pax", "t");
    assert_same_tree(&m.path, &rootfs);
    for n in names {
        assert_eq!(
            std::fs::read(m.path.join(n)).unwrap(),
            std::fs::read(src.path().join(n)).unwrap(),
            "{n}"
        );
    }
    cat_all(&env, &r, &m.path);
}

#[test]
fn gnu_sparse_files_umoci_refuses_read_as_gnu_tar_extracts_them_and_export_expands_them() {
    let src = tempfile::tempdir().unwrap();
    for n in ["gnu.img", "pax10.img"] {
        sparse_file(src.path(), n, 24 << 20, &chunks());
    }
    let tar = concat(&[
        gnu_tar(src.path(), &["--format=gnu"], &["gnu.img"]),
        gnu_tar(
            src.path(),
            &["--format=posix", "--sparse-version=1.0"],
            &["pax10.img"],
        ),
    ]);
    let reg = Registry::start(Auth::None);
    let env = Env::new();
    let r = push_tar(&reg, "sparse/gnu", &tar);
    let m = Mounted::new(&env, &r, &[]);
    // umoci knows no old GNU sparse entries ('S'); GNU tar, which wrote them,
    // is the reference.
    let err = umoci_try(&reg, "sparse/gnu").unwrap_err();
    assert!(err.contains("typeflag"), "{err}");
    let x = tempfile::tempdir().unwrap();
    let layer = x.path().join("layer.tar");
    std::fs::write(&layer, &tar).unwrap();
    let out = x.path().join("out");
    std::fs::create_dir(&out).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xpf")
            .arg(&layer)
            .arg("-C")
            .arg(&out),
    );
    assert_same_tree(&m.path, &out);
    cat_all(&env, &r, &m.path);
    // The flattened export holds the files expanded, which umoci unpacks to
    // the same bytes.
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("flat.tar");
    env.ok(&["export", "--flatten", &r, archive.to_str().unwrap()]);
    let layout = dir.path().join("oci");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "-q"])
            .arg(format!("docker-archive:{}", archive.display()))
            .arg(format!("oci:{}:t", layout.display())),
    );
    let (_d, rootfs) = unpack_layout(dir, &layout, "t");
    assert_same_tree(&m.path, &rootfs);
}

#[test]
fn a_9_gib_sparse_file_has_its_full_size_and_reads_at_its_end() {
    let src = tempfile::tempdir().unwrap();
    let size: u64 = 9 << 30;
    sparse_file(
        src.path(),
        "big.img",
        size,
        &[(0, b"head".to_vec()), (size - 5, b"tail!".to_vec())],
    );
    let tar = gnu_tar(
        src.path(),
        &["--format=posix", "--sparse-version=1.0"],
        &["big.img"],
    );
    let reg = Registry::start(Auth::None);
    let env = Env::new();
    let r = push_tar(&reg, "sparse/big", &tar);
    let m = Mounted::new(&env, &r, &[]);
    let f = std::fs::File::open(m.path.join("big.img")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    let mut buf = [1u8; 10];
    f.read_exact_at(&mut buf, size - 10).unwrap();
    assert_eq!(&buf, b"\0\0\0\0\0tail!");
    f.read_exact_at(&mut buf, size / 2).unwrap();
    assert_eq!(buf, [0u8; 10]);
    let ls = env.ok(&["ls", "-l", &r, "/big.img"]);
    assert!(ls.contains(&size.to_string()), "{ls}");
}
