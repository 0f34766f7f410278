//! The record of what rimg has mounted: one small JSON file per mount under the
//! state directory, checked against /proc/self/mountinfo so stale records of
//! dead servers never show.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The filesystem type the kernel shows for rimg mounts (`fuse.rimg`).
pub const FS_TYPE: &str = "fuse.rimg";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    pub reference: String,
    pub digest: String,
    pub mountpoint: PathBuf,
    pub pid: u32,
    pub log: Option<PathBuf>,
    /// The server is gone but the kernel still has the mount (not saved).
    #[serde(skip, default)]
    pub dead: bool,
}

/// `$XDG_RUNTIME_DIR/rimg/mounts`, or `/run/rimg/mounts` for root, else under /tmp.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RIMG_STATE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&d).join("rimg/mounts");
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/rimg/mounts")
    } else {
        PathBuf::from(format!("/tmp/rimg-{uid}/mounts"))
    }
}

fn record_path(dir: &Path, mountpoint: &Path) -> PathBuf {
    let key = crate::digest::Digest::of_bytes(mountpoint.as_os_str().as_encoded_bytes());
    dir.join(format!("{}.json", &key.hex()[..16]))
}

pub fn save(record: &MountRecord) -> std::io::Result<()> {
    let dir = state_dir();
    std::fs::create_dir_all(&dir)?;
    let path = record_path(&dir, &record.mountpoint);
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, path)
}

pub fn remove(mountpoint: &Path) {
    let _ = std::fs::remove_file(record_path(&state_dir(), mountpoint));
}

pub fn find(mountpoint: &Path) -> Option<MountRecord> {
    let bytes = std::fs::read(record_path(&state_dir(), mountpoint)).ok()?;
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
