//! Where a local image's bytes live: a tar (its members found by reading
//! headers only) or a directory (opened beneath its root, never outside),
//! and readers that verify what they yield.

use crate::layer::{self, LayerError};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use super::*;

/// A tar member: where its bytes are, or what it links to.
#[derive(Debug, Clone)]
pub(super) enum Member {
    File { offset: u64, size: u64 },
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    Dir,
}

/// The files of an archive, by name.
pub(super) enum Store {
    Tar {
        file: Arc<File>,
        members: HashMap<Vec<u8>, Member>,
    },
    /// An `O_PATH` descriptor of the directory every open stays beneath.
    Dir { root: File },
}

/// Hashes what it reads and fails at the end instead of reaching end-of-file
/// when the bytes do not match `expected`, as the cache requires of a blob.
pub(super) struct Verified<R> {
    pub(super) inner: R,
    pub(super) hasher: Sha256,
    pub(super) expected: String,
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let actual = crate::digest::Digest::from_hasher(self.hasher.clone());
            if actual != self.expected {
                return Err(io::Error::other(format!(
                    "content hashes to {actual}, expected {}",
                    self.expected
                )));
            }
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A name from an archive's JSON, as a relative path that stays inside it.
pub(super) fn clean_name(name: &str) -> Option<Vec<u8>> {
    if name.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in name.as_bytes().split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join(&b'/'))
}

/// Why a layer's first bytes are not a layer, without naming it again.
pub(super) fn layer_detail(e: LayerError) -> String {
    match e {
        LayerError::UnknownMediaType { .. } => "neither gzip, zstd nor a tar".to_string(),
        other => other.to_string(),
    }
}

impl Store {
    pub(super) fn open(kind: Kind, path: &Path) -> Result<Store, LocalError> {
        if path.as_os_str().is_empty() {
            return Err(LocalError::Choice {
                file: format!("{}:", kind.prefix()),
                detail: "no path given".to_string(),
            });
        }
        let file_name = path.display().to_string();
        let io_err = |source| LocalError::Io {
            file: file_name.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        let want_dir = kind == Kind::Oci || (kind == Kind::DockerArchive && meta.is_dir());
        if want_dir {
            if !meta.is_dir() {
                return Err(io_err(io::Error::other("not a directory")));
            }
            let c = std::ffi::CString::new(path.as_os_str().as_bytes())
                .map_err(|e| io_err(io::Error::other(e)))?;
            // SAFETY: `c` is a valid NUL-terminated path for the call.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(io_err(io::Error::last_os_error()));
            }
            // SAFETY: `fd` was just opened and is owned by nobody else.
            let root = unsafe { File::from_raw_fd(fd) };
            return Ok(Store::Dir { root });
        }
        if !meta.is_file() {
            // A pipe or device cannot be seeked, and reading one may never end.
            return Err(io_err(io::Error::other(
                "not a regular file (a tar archive must be a file)",
            )));
        }
        let file = File::open(path).map_err(io_err)?;
        let members = tar_members(&file, &file_name)?;
        Ok(Store::Tar {
            file: Arc::new(file),
            members,
        })
    }

    /// Opens the entry `name` with its size.
    pub(super) fn open_entry(
        &self,
        file: &str,
        name: &str,
    ) -> Result<(Box<dyn Read + Send>, u64), LocalError> {
        let (f, offset, size) = self.locate(file, name)?;
        // Read as a section, so a file that grows meanwhile adds nothing.
        let r = crate::layer::Section {
            file: f,
            pos: offset,
            end: offset + size,
        };
        Ok((Box::new(r), size))
    }

    /// The file holding the entry `name`, and where in it the entry's bytes
    /// lie: a member of the archive, or a file beneath the directory.
    pub(super) fn locate(
        &self,
        file: &str,
        name: &str,
    ) -> Result<(Arc<File>, u64, u64), LocalError> {
        let clean = clean_name(name).ok_or_else(|| LocalError::Escapes {
            file: file.to_string(),
            entry: name.to_string(),
        })?;
        let missing = || LocalError::Missing {
            file: file.to_string(),
            entry: name.to_string(),
        };
        let escapes = || LocalError::Escapes {
            file: file.to_string(),
            entry: name.to_string(),
        };
        match self {
            Store::Tar {
                file: archive,
                members,
            } => {
                let mut at = clean;
                for _ in 0..LINK_DEPTH {
                    match members.get(&at).ok_or_else(missing)? {
                        Member::File { offset, size } => {
                            return Ok((Arc::clone(archive), *offset, *size));
                        }
                        Member::Hardlink(target) => at = target.clone(),
                        Member::Symlink(target) => {
                            // Relative to the link's directory, and never out of the archive.
                            let mut joined = match at.iter().rposition(|&b| b == b'/') {
                                Some(i) => at[..=i].to_vec(),
                                None => Vec::new(),
                            };
                            if target.starts_with(b"/") {
                                return Err(escapes());
                            }
                            joined.extend_from_slice(target);
                            let s = String::from_utf8_lossy(&joined).into_owned();
                            at = clean_name(&s).ok_or_else(escapes)?;
                        }
                        Member::Dir => {
                            return Err(LocalError::Entry {
                                file: file.to_string(),
                                entry: name.to_string(),
                                source: io::Error::other("is a directory"),
                            });
                        }
                    }
                }
                Err(LocalError::Entry {
                    file: file.to_string(),
                    entry: name.to_string(),
                    source: io::Error::other("too many levels of symbolic links"),
                })
            }
            Store::Dir { root } => {
                let f = open_beneath(root, &clean).map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOENT) => missing(),
                    Some(libc::EXDEV) => escapes(),
                    _ => LocalError::Entry {
                        file: file.to_string(),
                        entry: name.to_string(),
                        source: e,
                    },
                })?;
                let meta = f.metadata().map_err(|source| LocalError::Entry {
                    file: file.to_string(),
                    entry: name.to_string(),
                    source,
                })?;
                if !meta.is_file() {
                    return Err(LocalError::Entry {
                        file: file.to_string(),
                        entry: name.to_string(),
                        source: io::Error::other("not a regular file"),
                    });
                }
                Ok((Arc::new(f), 0, meta.len()))
            }
        }
    }

    /// A small entry (JSON) read whole.
    pub(super) fn read_small(&self, file: &str, name: &str) -> Result<Vec<u8>, LocalError> {
        let (r, size) = self.open_entry(file, name)?;
        if size > JSON_MAX {
            return Err(LocalError::Invalid {
                file: file.to_string(),
                entry: name.to_string(),
                detail: format!("larger than {JSON_MAX} bytes"),
            });
        }
        let mut out = Vec::with_capacity(size as usize);
        r.take(JSON_MAX)
            .read_to_end(&mut out)
            .map_err(|source| LocalError::Entry {
                file: file.to_string(),
                entry: name.to_string(),
                source,
            })?;
        Ok(out)
    }
}

/// The members of the tar `file`, read header by header: data is skipped by
/// seeking, so opening a large archive reads a few blocks per member, not the
/// archive. A member whose data would end past the end of the file is refused
/// as truncated.
pub(super) fn tar_members(file: &File, name: &str) -> Result<HashMap<Vec<u8>, Member>, LocalError> {
    let bad = |detail: String| LocalError::Tar {
        file: name.to_string(),
        detail,
    };
    let len = file
        .metadata()
        .map_err(|source| LocalError::Io {
            file: name.to_string(),
            source,
        })?
        .len();
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    for entry in archive
        .entries_with_seek()
        .map_err(|e| bad(e.to_string()))?
    {
        let entry = entry.map_err(|e| bad(format!("truncated or damaged tar header: {e}")))?;
        let path = layer::normalize(&entry.path_bytes());
        let offset = entry.raw_file_position();
        let size = entry.size();
        let kind = entry.header().entry_type();
        let m = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if offset.checked_add(size).is_none_or(|end| end > len) {
                    return Err(bad(format!(
                        "truncated: {} ends at byte {}, past the end of the file ({len} bytes)",
                        String::from_utf8_lossy(&path),
                        offset.saturating_add(size)
                    )));
                }
                Member::File { offset, size }
            }
            tar::EntryType::Symlink => {
                Member::Symlink(entry.link_name_bytes().unwrap_or_default().into_owned())
            }
            tar::EntryType::Link => Member::Hardlink(layer::normalize(
                &entry.link_name_bytes().unwrap_or_default(),
            )),
            tar::EntryType::Directory => Member::Dir,
            _ => continue,
        };
        members.insert(path, m);
    }
    Ok(members)
}

/// Opens `name` beneath the directory `root`; the kernel refuses any path
/// (through `..` or a symlink) that would leave it.
pub(super) fn open_beneath(root: &File, name: &[u8]) -> io::Result<File> {
    let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // `struct open_how` as the kernel defines it (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        // Non-blocking, so a FIFO planted in a layout cannot hang the open;
        // the caller refuses anything but a regular file.
        flags: (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: the pointers are valid for the call and `how`'s size is passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}
