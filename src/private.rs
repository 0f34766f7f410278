//! Directories and files that only the caller (and root) can change: every
//! place rimg writes (the cache, the range cache, saved trees, logs, mount
//! records) is checked here before it is used, so another local user cannot
//! plant a symlink or a directory of their own and have rimg write through it
//! or read records they forged.
//!
//! The rule, as OpenSSH's `safe_path` has it: the directory itself is owned
//! by the caller and not writable by group or others; each directory above
//! it is owned by the caller or root and, if others may write it, sticky
//! (like `/tmp`); a symlink on the way is owned by the caller or root. A
//! missing directory is created mode 0700, one level at a time, and checked
//! after creation as if it had been there. Files are created with
//! `O_EXCL|O_NOFOLLOW` (a new name, never through a link) and renamed into
//! place; files opened to append or lock are opened with `O_NOFOLLOW`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Why a directory or file is not the caller's alone.
#[derive(Debug, thiserror::Error)]
pub enum Unsafe {
    #[error("{path}: owned by uid {owner}, not by this user (uid {me}); refused")]
    Owner { path: String, owner: u32, me: u32 },
    #[error("{path}: writable by others (mode {mode:o}); refused")]
    Writable { path: String, mode: u32 },
    #[error("{path}: open to other users (mode {mode:o}, must be 0700); refused")]
    Open { path: String, mode: u32 },
    #[error("{path}: a symlink owned by uid {owner}, not by this user or root; refused")]
    Link { path: String, owner: u32 },
    #[error("{path}: not a directory; refused")]
    NotDir { path: String },
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl From<Unsafe> for io::Error {
    fn from(e: Unsafe) -> io::Error {
        match e {
            Unsafe::Io { source, .. } => source,
            e => io::Error::new(io::ErrorKind::PermissionDenied, e),
        }
    }
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// How strict the check on the directory itself is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Not writable by group or others (a cache the user may share read-only).
    NotWritable,
    /// Nothing for group or others (0700): a directory rimg picks itself in a
    /// place others can write, such as `/tmp/rimg-<uid>`.
    Only,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Unsafe + '_ {
    move |source| Unsafe::Io {
        path: path.display().to_string(),
        source,
    }
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// Checks one directory above the target: owned by us or root, and either
/// not writable by others or sticky.
fn check_ancestor(path: &Path, meta: &fs::Metadata, me: u32) -> Result<(), Unsafe> {
    if !meta.is_dir() {
        return Err(Unsafe::NotDir { path: shown(path) });
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(Unsafe::Owner {
            path: shown(path),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(Unsafe::Writable {
            path: shown(path),
            mode,
        });
    }
    Ok(())
}

/// Checks the target directory itself.
fn check_target(path: &Path, meta: &fs::Metadata, me: u32, mode: Mode) -> Result<(), Unsafe> {
    if !meta.is_dir() {
        return Err(Unsafe::NotDir { path: shown(path) });
    }
    if meta.uid() != me {
        return Err(Unsafe::Owner {
            path: shown(path),
            owner: meta.uid(),
            me,
        });
    }
    let bits = meta.mode() & 0o7777;
    match mode {
        Mode::NotWritable if bits & 0o022 != 0 => Err(Unsafe::Writable {
            path: shown(path),
            mode: bits,
        }),
        Mode::Only if bits & 0o077 != 0 => Err(Unsafe::Open {
            path: shown(path),
            mode: bits,
        }),
        _ => Ok(()),
    }
}

/// Every directory of a path reached through a symlink, checked as ancestors.
fn check_resolved(target: &Path, me: u32) -> Result<(), Unsafe> {
    for dir in target.ancestors().skip(1) {
        let meta = fs::metadata(dir).map_err(io_at(dir))?;
        check_ancestor(dir, &meta, me)?;
    }
    Ok(())
}

/// Makes `path` (and any missing parent, mode 0700) and checks that it and
/// the way to it are the caller's alone (see the module doc). Returns the
/// path with symlinks resolved.
pub fn dir(path: &Path, mode: Mode) -> Result<PathBuf, Unsafe> {
    let me = euid();
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(io_at(path))?.join(path)
    };
    let names: Vec<_> = abs
        .components()
        .filter(|c| matches!(c, Component::Normal(_) | Component::ParentDir))
        .collect();
    let mut cur = PathBuf::from("/");
    for (i, comp) in names.iter().enumerate() {
        let name = match comp {
            Component::Normal(n) => n,
            _ => {
                cur.pop();
                continue;
            }
        };
        let last = i + 1 == names.len();
        let next = cur.join(name);
        let mut meta = match fs::symlink_metadata(&next) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match fs::DirBuilder::new().mode(0o700).create(&next) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                        return Err(io_at(&next)(e));
                    }
                    _ => {}
                }
                fs::symlink_metadata(&next).map_err(io_at(&next))?
            }
            Err(e) => return Err(io_at(&next)(e)),
        };
        if meta.file_type().is_symlink() {
            if meta.uid() != me && meta.uid() != 0 {
                return Err(Unsafe::Link {
                    path: shown(&next),
                    owner: meta.uid(),
                });
            }
            let target = fs::canonicalize(&next).map_err(io_at(&next))?;
            check_resolved(&target, me)?;
            meta = fs::metadata(&target).map_err(io_at(&target))?;
            cur = target;
        } else {
            cur = next;
        }
        if last {
            check_target(&cur, &meta, me, mode)?;
        } else {
            check_ancestor(&cur, &meta, me)?;
        }
    }
    Ok(cur)
}

/// Checks an opened file: a regular file owned by the caller and not
/// writable by others, so its contents are the caller's own words.
pub fn check_file(file: &File, path: &Path) -> Result<(), Unsafe> {
    let meta = file.metadata().map_err(io_at(path))?;
    let me = euid();
    if meta.uid() != me {
        return Err(Unsafe::Owner {
            path: shown(path),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if !meta.is_file() || mode & 0o022 != 0 {
        return Err(Unsafe::Writable {
            path: shown(path),
            mode,
        });
    }
    Ok(())
}

/// Options that never follow a symlink at the last component, and create
/// files 0600.
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600);
    o
}

/// Opens an existing file for reading without following a symlink, and
/// checks it is the caller's (see [`check_file`]).
pub fn open_own(path: &Path) -> io::Result<File> {
    let f = options().read(true).open(path)?;
    check_file(&f, path)?;
    Ok(f)
}

/// Makes the directory `path` (mode 0700) inside a directory already
/// checked, or takes one away from group and others if an older rimg made it
/// looser.
pub fn tighten_dir(path: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(Unsafe::NotDir { path: shown(path) }.into());
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Takes an opened file away from group and others (0600).
pub fn tighten_file(file: &File) -> io::Result<()> {
    if file.metadata()?.mode() & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` whole or not at all: a new temporary file
/// (`O_EXCL`, 0600) beside it, renamed over `path` (a rename replaces a
/// symlink there, never follows it).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_made_0700_and_accepted() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        let got = dir(&d, Mode::Only).unwrap();
        assert_eq!(got, fs::canonicalize(&d).unwrap());
        for p in [t.path().join("a"), d] {
            assert_eq!(fs::metadata(p).unwrap().mode() & 0o777, 0o700);
        }
    }

    #[test]
    fn a_directory_open_to_others_is_refused_by_its_mode() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let e = dir(&d, Mode::NotWritable).unwrap_err();
        assert!(matches!(e, Unsafe::Writable { .. }), "{e}");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        dir(&d, Mode::NotWritable).unwrap();
        let e = dir(&d, Mode::Only).unwrap_err();
        assert!(e.to_string().contains("must be 0700"), "{e}");
    }

    #[test]
    fn a_writable_parent_without_the_sticky_bit_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("p");
        fs::create_dir(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(dir(&p.join("c"), Mode::Only).is_err());
        assert!(!p.join("c").exists() || fs::metadata(p.join("c")).unwrap().is_dir());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o1777)).unwrap();
        dir(&p.join("c"), Mode::Only).unwrap();
    }

    #[test]
    fn a_file_in_place_of_the_directory_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert!(matches!(
            dir(&f, Mode::Only).unwrap_err(),
            Unsafe::NotDir { .. }
        ));
    }

    #[test]
    fn an_atomic_write_replaces_a_symlink_and_leaves_its_target_alone() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let rec = t.path().join("rec");
        std::os::unix::fs::symlink(&victim, &rec).unwrap();
        write_atomic(&rec, b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert_eq!(fs::read(&rec).unwrap(), b"new");
        assert!(!fs::symlink_metadata(&rec).unwrap().file_type().is_symlink());
        assert_eq!(fs::metadata(&rec).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn opening_through_a_symlink_or_a_world_writable_file_fails() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        open_own(&f).unwrap();
        let l = t.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert!(open_own(&l).is_err());
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(open_own(&f).is_err());
    }
}
