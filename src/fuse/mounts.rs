//! The record of what rimg has mounted: one small JSON file per mount under the
//! state directory, checked against /proc/self/mountinfo so stale records of
//! dead servers never show.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::private;

/// The filesystem type the kernel shows for rimg mounts (`fuse.rimg`).
pub const FS_TYPE: &str = "fuse.rimg";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    /// The registry reference, or a local image's `KIND:/abs/path`.
    pub reference: String,
    /// For a local image, the tag it carries (a detail, not its source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    pub digest: String,
    pub mountpoint: PathBuf,
    pub pid: u32,
    pub log: Option<PathBuf>,
    /// The server is gone but the kernel still has the mount (not saved).
    #[serde(skip, default)]
    pub dead: bool,
}

/// `$RIMG_STATE_DIR`, `$XDG_RUNTIME_DIR/rimg/mounts`, `/run/rimg/mounts` for
/// root, else `/tmp/rimg-<uid>/mounts`.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RIMG_STATE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&d).join("rimg/mounts");
    }
    let uid = private::euid();
    if uid == 0 {
        PathBuf::from("/run/rimg/mounts")
    } else {
        PathBuf::from(format!("/tmp/rimg-{uid}/mounts"))
    }
}

/// The state directory, made if missing and checked to be this user's alone
/// (see [`crate::private`]). Under `/tmp`, where anyone may have made
/// `rimg-<uid>` first, it and `mounts` must be exactly 0700 and ours; a
/// directory planted there is refused, never used (set `XDG_RUNTIME_DIR` or
/// `RIMG_STATE_DIR` to a directory of your own instead).
pub fn checked_state_dir() -> Result<PathBuf, private::Unsafe> {
    let dir = state_dir();
    let shared_tmp = std::env::var_os("RIMG_STATE_DIR").is_none()
        && std::env::var_os("XDG_RUNTIME_DIR").is_none()
        && private::euid() != 0;
    if shared_tmp && let Some(parent) = dir.parent() {
        private::dir(parent, private::Mode::Only)?;
        return private::dir(&dir, private::Mode::Only);
    }
    private::dir(&dir, private::Mode::NotWritable)
}

fn record_path(dir: &Path, mountpoint: &Path) -> PathBuf {
    let key = crate::digest::Digest::of_bytes(mountpoint.as_os_str().as_encoded_bytes());
    dir.join(format!("{}.json", &key.hex()[..16]))
}

/// Writes the record: a new 0600 file renamed into place, so a symlink or
/// file planted under its name is replaced, never written through.
pub fn save(record: &MountRecord) -> std::io::Result<()> {
    let dir = checked_state_dir()?;
    let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    private::write_atomic(&record_path(&dir, &record.mountpoint), &bytes)
}

pub fn remove(mountpoint: &Path) {
    if let Ok(dir) = checked_state_dir() {
        let _ = std::fs::remove_file(record_path(&dir, mountpoint));
    }
}

/// The record of the mount at `mountpoint`, if there is one this user wrote:
/// a record in a directory or file others could write is not believed.
pub fn find(mountpoint: &Path) -> Option<MountRecord> {
    let dir = checked_state_dir().ok()?;
    let mut f = private::open_own(&record_path(&dir, mountpoint)).ok()?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut f, 1 << 20), &mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Mount points of `fuse.rimg` filesystems, from the kernel's own table.
pub fn kernel_mounts() -> Vec<(String, PathBuf)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            // Fields: id parent major:minor root mountpoint opts [optional...] - fstype source superopts
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = unescape(left.split(' ').nth(4)?);
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = unescape(r.next()?);
            (fstype == FS_TYPE).then(|| (source, PathBuf::from(mountpoint)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// rimg mounts: the kernel's list joined with our records, each marked dead
/// when its server is gone.
pub fn list() -> Vec<MountRecord> {
    kernel_mounts()
        .into_iter()
        .map(|(source, mountpoint)| {
            let record = find(&mountpoint);
            let dead = is_dead(&mountpoint, record.as_ref());
            let mut r = record.unwrap_or(MountRecord {
                reference: source,
                tag: None,
                digest: String::new(),
                mountpoint,
                pid: 0,
                log: None,
                dead: false,
            });
            r.dead = dead;
            r
        })
        .collect()
}

pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether the server of the mount at `mountpoint` is gone: a request that
/// always reaches the server (statfs; stat and open may be answered from the
/// kernel's caches) finds the endpoint not connected, or the recorded server
/// has exited (one that exits cleanly removes its record).
pub fn is_dead(mountpoint: &Path, record: Option<&MountRecord>) -> bool {
    disconnected(mountpoint) || record.is_some_and(|r| !pid_alive(r.pid))
}

/// Whether the mount at `mountpoint` has lost its server, asked of the
/// kernel. statfs is never cached, and rimg answers it at once, without
/// building the tree or fetching anything.
pub fn disconnected(mountpoint: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: path is NUL-terminated and buf is a properly sized out-parameter.
    let r = unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut buf)
    };
    // ECONNABORTED: a request caught by the kernel tearing the connection down.
    r < 0
        && matches!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED)
        )
}

/// `path` canonicalized; for a dead mount, which answers ENOTCONN, its parent
/// canonicalized and its own name kept.
pub fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    match std::fs::canonicalize(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(e);
            };
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            Ok(std::fs::canonicalize(parent)?.join(name))
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_octal_escapes_are_decoded() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn record_paths_differ_per_mountpoint() {
        let d = Path::new("/s");
        assert_ne!(
            record_path(d, Path::new("/a")),
            record_path(d, Path::new("/b"))
        );
    }
}
