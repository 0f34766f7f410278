//! The Alpine minirootfs layers the tests push. `../shared/images` holds the
//! real tarballs in this project's workspace; a fresh clone has no such
//! folder, so there the same layer is generated from its shape
//! (`tests/fixtures/alpine/*.shape`: every entry in tar order with its type,
//! mode, owner, mtime, size and link target, written by `shape.py` from the
//! real tarball). The generated content is made up, but of the same kind per
//! file (ELF with the right machine, `#!/bin/sh` scripts, text, binary), and
//! the few files tests read by name (`etc/os-release`, `etc/alpine-release`,
//! `etc/passwd`...) say what Alpine's say. What tests rely on: names, order,
//! sizes, modes, symlinks, and an os-release naming the version.

use std::path::{Path, PathBuf};
use std::sync::Once;

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn shared_images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/images")
}

/// The gzip layer of Alpine `version` for `arch` (`x86_64`, `aarch64`): the
/// real one from `../shared/images` when present, else a generated one.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn alpine(version: &str, arch: &str) -> PathBuf {
    let name = format!("alpine-minirootfs-{version}-{arch}.tar.gz");
    let real = shared_images()
        .join(format!("alpine-{version}"))
        .join(&name);
    if real.exists() {
        return real;
    }
    static NOTE: Once = Once::new();
    NOTE.call_once(|| {
        eprintln!(
            "note: {} is missing; using alpine-like layers generated from tests/fixtures/alpine",
            shared_images().display()
        )
    });
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("alpine-like");
    let out = dir.join(&name);
    if !out.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let gz = generate(version, arch);
        // Test binaries run at once may generate the same file: each writes
        // its own and renames it into place (the bytes are the same).
        let tmp = tempfile::NamedTempFile::new_in(&dir).unwrap();
        std::fs::write(tmp.path(), gz).unwrap();
        tmp.persist(&out).unwrap();
    }
    out
}

/// The generated alpine-like layer, gzip-compressed, deterministic.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn generate(version: &str, arch: &str) -> Vec<u8> {
    let shape_file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/alpine")
        .join(format!("{version}-{arch}.shape"));
    let shape = std::fs::read_to_string(&shape_file)
        .unwrap_or_else(|e| panic!("{}: {e}", shape_file.display()));
    let mut b = tar::Builder::new(Vec::new());
    for line in shape.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let [kind, mode, uid, gid, mtime, size, name, link] = f[..] else {
            panic!("{}: bad line {line:?}", shape_file.display());
        };
        let mut h = tar::Header::new_gnu();
        h.set_mode(u32::from_str_radix(mode, 8).unwrap());
        h.set_uid(uid.parse().unwrap());
        h.set_gid(gid.parse().unwrap());
        h.set_mtime(mtime.parse().unwrap());
        h.set_size(0);
        match kind {
            "d" => {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, name, std::io::empty()).unwrap();
            }
            "l" | "h" => {
                h.set_entry_type(if kind == "l" {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                b.append_link(&mut h, name, link).unwrap();
            }
            _ => {
                let data = content(kind, name, size.parse().unwrap(), version, arch);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, &data[..]).unwrap();
            }
        }
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    gz.finish().unwrap()
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
/// A file's made-up content: of its kind and size, seeded by its name and size
/// (so a file the same in two versions is the same in both generated layers).
fn content(kind: &str, name: &str, size: usize, version: &str, arch: &str) -> Vec<u8> {
    let minor = version.rsplit_once('.').map_or(version, |(m, _)| m);
    let fixed = match name.trim_start_matches("./") {
        "etc/alpine-release" => Some(format!("{version}\n")),
        "etc/os-release" => Some(format!(
            "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID={version}\nPRETTY_NAME=\"Alpine Linux v{minor}\"\nHOME_URL=\"https://alpinelinux.org/\"\n"
        )),
        "etc/issue" => Some(format!("Welcome to Alpine Linux {minor}\n")),
        "etc/apk/arch" => Some(format!("{arch}\n")),
        "etc/hostname" => Some("localhost\n".into()),
        "etc/shells" => Some("# valid login shells\n/bin/sh\n/bin/ash\n".into()),
        "etc/passwd" => Some(
            "root:x:0:0:root:/root:/bin/ash\nbin:x:1:1:bin:/bin:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n".into(),
        ),
        "etc/group" => Some("root:x:0:root\nbin:x:1:root,bin\nshadow:x:42:\nnogroup:x:65533:\n".into()),
        "etc/shadow" => Some("root:!::0:::::\nbin:!::0:::::\nnobody:!::0:::::\n".into()),
        _ => None,
    };
    if let Some(text) = fixed {
        return text.into_bytes();
    }
    let mut seed = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes().chain(size.to_le_bytes()) {
        seed = (seed ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let mut rng = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut out = Vec::with_capacity(size);
    match kind.strip_prefix('e') {
        Some(machine) => {
            // ELF64, little endian, a shared object for `machine`.
            out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x03\0");
            out.extend_from_slice(&machine.parse::<u16>().unwrap().to_le_bytes());
            out.extend_from_slice(&[1, 0, 0, 0]);
        }
        None if kind == "s" => out.extend_from_slice(b"#!/bin/sh\n"),
        None => {}
    }
    const WORDS: &[&str] = &[
        "alpine",
        "root",
        "the",
        "of",
        "to",
        "file",
        "if",
        "then",
        "fi",
        "echo",
        "export",
        "path",
        "usr",
        "bin",
        "etc",
        "lib",
        "musl",
        "busybox",
        "config",
        "option",
        "#",
        "=",
        "\t",
        "localhost",
        "service",
        "default",
        "none",
        "0",
        "1",
        "yes",
        "no",
    ];
    let text = kind == "s" || kind == "t";
    while out.len() < size {
        if text {
            let r = rng();
            out.extend_from_slice(WORDS[r as usize % WORDS.len()].as_bytes());
            out.push(if (r >> 32) % 8 == 0 { b'\n' } else { b' ' });
        } else {
            // Four bits of entropy a byte: compresses about as machine code does.
            let r = rng();
            for i in 0..8 {
                out.push(((r >> (i * 8)) & 0x0f) as u8 * 17);
            }
        }
    }
    out.truncate(size);
    out
}
