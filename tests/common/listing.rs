//! A directory tree described entry by entry (type, mode, owner, size,
//! content hash, link target, device numbers, xattrs, hardlink groups), to
//! compare rimg's view of an image with umoci's rootfs.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct EntryInfo {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub content: Option<String>,
    pub link: Option<String>,
    pub rdev: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Other names of the same inode (hardlinks), sorted, relative to the root.
    pub links: Vec<String>,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut out = BTreeMap::new();
    // SAFETY: c is a valid path; buffers are sized from the calls themselves.
    unsafe {
        let n = libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0);
        if n <= 0 {
            return out;
        }
        let mut names = vec![0u8; n as usize];
        let n = libc::llistxattr(
            c.as_ptr(),
            names.as_mut_ptr() as *mut libc::c_char,
            names.len(),
        );
        if n <= 0 {
            return out;
        }
        for name in names[..n as usize]
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
        {
            let key = String::from_utf8_lossy(name).into_owned();
            // Only the image's own user xattrs are compared; rimg adds user.rimg.*.
            if !key.starts_with("user.") || key.starts_with("user.rimg.") {
                continue;
            }
            let cname = CString::new(name).unwrap();
            let len = libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0);
            let mut value = vec![0u8; len.max(0) as usize];
            let len = libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr() as *mut libc::c_void,
                value.len(),
            );
            value.truncate(len.max(0) as usize);
            out.insert(key, value);
        }
    }
    out
}

/// A path as text without losing a byte: UTF-8 as it is, a backslash as
/// `\\`, any other byte as `\xNN` (the escape rimg documents for its own
/// output). [`from_lossless`] reverses it.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn lossless(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        out.push_str(&chunk.valid().replace('\\', "\\\\"));
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The bytes a [`lossless`] string stands for.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn from_lossless(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1)) {
            (b'\\', Some(b'\\')) => {
                out.push(b'\\');
                i += 2;
            }
            (b'\\', Some(b'x')) => {
                out.push(u8::from_str_radix(&s[i + 2..i + 4], 16).unwrap());
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Every entry under `root` (not following symlinks), keyed by relative path
/// (see [`lossless`]).
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn tree_listing(root: &Path) -> BTreeMap<String, EntryInfo> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = lossless(
                path.strip_prefix(root)
                    .unwrap()
                    .as_os_str()
                    .as_encoded_bytes(),
            );
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else if ft.is_fifo() {
                'p'
            } else {
                '-'
            };
            let content = (kind == '-').then(|| {
                let data =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                hex::encode(Sha256::digest(&data))
            });
            let link = (kind == 'l').then(|| {
                lossless(
                    std::fs::read_link(&path)
                        .unwrap()
                        .as_os_str()
                        .as_encoded_bytes(),
                )
            });
            if kind != 'd' && meta.nlink() > 1 {
                inodes.entry(meta.ino()).or_default().push(rel.clone());
            }
            out.insert(
                rel,
                EntryInfo {
                    kind,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    size: if kind == '-' { meta.len() } else { 0 },
                    content,
                    link,
                    rdev: if matches!(kind, 'c' | 'b') {
                        meta.rdev()
                    } else {
                        0
                    },
                    xattrs: xattrs(&path),
                    links: Vec::new(),
                },
            );
            if kind == 'd' {
                stack.push(path);
            }
        }
    }
    for names in inodes.values() {
        for n in names {
            let mut others: Vec<String> = names.iter().filter(|o| *o != n).cloned().collect();
            others.sort();
            out.get_mut(n).unwrap().links = others;
        }
    }
    out
}

/// Readable differences between two listings (empty when equal).
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn diff_listings(
    ours: &BTreeMap<String, EntryInfo>,
    reference: &BTreeMap<String, EntryInfo>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (path, r) in reference {
        match ours.get(path) {
            None => out.push(format!("missing: {path}")),
            Some(o) if o != r => out.push(format!("differs: {path}\n  ours: {o:?}\n  want: {r:?}")),
            _ => {}
        }
    }
    for path in ours.keys() {
        if !reference.contains_key(path) {
            out.push(format!("extra: {path}"));
        }
    }
    out
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn assert_same_tree(ours: &Path, reference: &Path) {
    let a = tree_listing(ours);
    let b = tree_listing(reference);
    let d = diff_listings(&a, &b);
    assert!(
        d.is_empty(),
        "{} differs from {} in {} entries:\n{}",
        ours.display(),
        reference.display(),
        d.len(),
        d.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(b.len() > 1, "the reference tree is empty");
}
