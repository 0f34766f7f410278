//! Local image sources: a `docker save` archive (a tar, or a directory in the
//! same layout as download-frozen-image-v2.sh writes), an OCI image layout
//! directory, and an OCI layout inside a tar. This module owns the transport
//! prefixes (`docker-archive:`, `oci:`, `oci-archive:`, `docker://`), choosing
//! one image in a file (by tag, then by platform as registries do), and handing
//! out blob readers that are verified against their digests, or, for an
//! uncompressed layer, where it lies so the cache reads it in place. Past this
//! module a local image is a [`ResolvedImage`] like any other, and its layers
//! go through the same cache.
//!
//! Nothing outside the archive is read: names taken from an archive's JSON are
//! refused when absolute or when they climb out with `..`; inside a tar,
//! symlinks and hardlinks between members are followed only among members; in
//! a directory every open is confined beneath it by the kernel (`openat2` with
//! `RESOLVE_BENEATH`), so a symlink that leads out is refused.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_spec::image::{Descriptor, ImageIndex};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::layer::{self, LayerError};
use crate::reference::Reference;
use crate::registry::{
    DOCKER_LIST, DOCKER_MANIFEST, ImageParts, OCI_INDEX, OCI_MANIFEST, PlatformSpec, RegistryError,
    ResolvedImage, describe_platform, select_platform, sha256_digest,
};

/// JSON documents (manifests, indexes, configs) bigger than this are refused.
const JSON_MAX: u64 = 32 << 20;
/// Symlinks followed between tar members before giving up.
const LINK_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: {entry}: {source}")]
    Entry {
        file: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: {entry}: no such entry in the archive")]
    Missing { file: String, entry: String },
    #[error("{file}: {entry}: the path leads outside the archive; refused")]
    Escapes { file: String, entry: String },
    #[error("{file}: not a readable tar archive: {detail}")]
    Tar { file: String, detail: String },
    #[error("{file}: {entry}: {detail}")]
    Invalid {
        file: String,
        entry: String,
        detail: String,
    },
    #[error("{file}: {detail}")]
    Choice { file: String, detail: String },
    #[error("{file}: {entry}: {source}")]
    Image {
        file: String,
        entry: String,
        #[source]
        source: Box<RegistryError>,
    },
}

/// What kind of local source, as its prefix names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    DockerArchive,
    Oci,
    OciArchive,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::DockerArchive => "docker-archive",
            Kind::Oci => "oci",
            Kind::OciArchive => "oci-archive",
        }
    }
}

/// A local source: `KIND:PATH[:PICK]`, where PICK is a RepoTag (docker) or a
/// tag (OCI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub kind: Kind,
    pub path: PathBuf,
    pub pick: Option<String>,
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.prefix(), self.path.display())?;
        if let Some(p) = &self.pick {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl Spec {
    /// The same source with an absolute path, for a process started elsewhere.
    pub fn absolute(&self) -> Result<Spec, LocalError> {
        let path = std::fs::canonicalize(&self.path).map_err(|source| LocalError::Io {
            file: self.path.display().to_string(),
            source,
        })?;
        Ok(Spec {
            path,
            ..self.clone()
        })
    }
}

/// Where an image comes from, as a command-line argument names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location<'a> {
    /// A registry reference (bare, or after `docker://`).
    Registry(&'a str),
    Local(Spec),
}

/// Reads the transport prefix. A bare reference stays a registry reference.
/// The path ends at the first `:` after the prefix unless the whole rest names
/// an existing file, as skopeo reads it, so `x.tar:alpine:3.10` picks
/// `alpine:3.10` from `x.tar`.
pub fn locate(arg: &str) -> Location<'_> {
    if let Some(r) = arg.strip_prefix("docker://") {
        return Location::Registry(r);
    }
    let kinds = [
        ("docker-archive:", Kind::DockerArchive),
        ("oci-archive:", Kind::OciArchive),
        ("oci:", Kind::Oci),
    ];
    for (prefix, kind) in kinds {
        let Some(rest) = arg.strip_prefix(prefix) else {
            continue;
        };
        let (path, pick) = if Path::new(rest).exists() {
            (rest, None)
        } else {
            match rest.split_once(':') {
                Some((p, pick)) if !pick.is_empty() => (p, Some(pick.to_string())),
                Some((p, _)) => (p, None),
                None => (rest, None),
            }
        };
        return Location::Local(Spec {
            kind,
            path: PathBuf::from(path),
            pick,
        });
    }
    Location::Registry(arg)
}

/// A tar member: where its bytes are, or what it links to.
#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, size: u64 },
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    Dir,
}

/// The files of an archive, by name.
enum Store {
    Tar {
        file: Arc<File>,
        members: HashMap<Vec<u8>, Member>,
    },
    /// An `O_PATH` descriptor of the directory every open stays beneath.
    Dir { root: File },
}

/// Hashes what it reads and fails at the end instead of reaching end-of-file
/// when the bytes do not match `expected`, as the cache requires of a blob.
struct Verified<R> {
    inner: R,
    hasher: Sha256,
    expected: String,
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
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
fn clean_name(name: &str) -> Option<Vec<u8>> {
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
fn layer_detail(e: LayerError) -> String {
    match e {
        LayerError::UnknownMediaType { .. } => "neither gzip, zstd nor a tar".to_string(),
        other => other.to_string(),
    }
}

impl Store {
    fn open(kind: Kind, path: &Path) -> Result<Store, LocalError> {
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
    fn open_entry(
        &self,
        file: &str,
        name: &str,
    ) -> Result<(Box<dyn Read + Send>, u64), LocalError> {
        let (f, offset, size) = self.locate(file, name)?;
        // Read as a section, so a file that grows meanwhile adds nothing.
        let r = crate::cache::Section {
            file: f,
            pos: offset,
            end: offset + size,
        };
        Ok((Box::new(r), size))
    }

    /// The file holding the entry `name`, and where in it the entry's bytes
    /// lie: a member of the archive, or a file beneath the directory.
    fn locate(&self, file: &str, name: &str) -> Result<(Arc<File>, u64, u64), LocalError> {
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
    fn read_small(&self, file: &str, name: &str) -> Result<Vec<u8>, LocalError> {
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
fn tar_members(file: &File, name: &str) -> Result<HashMap<Vec<u8>, Member>, LocalError> {
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
fn open_beneath(root: &File, name: &[u8]) -> io::Result<File> {
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

/// Where each blob of an opened local image lives, for the cache to read.
pub struct LocalBlobs {
    file: String,
    store: Store,
    /// Digest to entry name.
    entries: HashMap<String, String>,
}

impl LocalBlobs {
    /// `FILE: ENTRY` of the blob `digest`, for messages.
    pub fn describe(&self, digest: &str) -> String {
        match self.entries.get(digest) {
            Some(entry) => format!("{}: {entry}", self.file),
            None => self.file.clone(),
        }
    }

    /// Where the blob `digest` lies in a file when it is an uncompressed tar,
    /// which can be read in place instead of copied into the cache.
    pub fn in_place(&self, digest: &str, media_type: &str) -> Option<(Arc<File>, u64, u64)> {
        let entry = self.entries.get(digest)?;
        let (f, offset, size) = self.store.locate(&self.file, entry).ok()?;
        let mut head = vec![0u8; size.min(512) as usize];
        f.read_exact_at(&mut head, offset).ok()?;
        let plain = layer::detect(digest, media_type, &head).ok()? == layer::Compression::None;
        plain.then_some((f, offset, size))
    }

    /// A reader of the blob `digest` that fails at its end unless the bytes
    /// match the digest.
    pub fn open_blob(&self, digest: &str) -> Result<Box<dyn Read + Send>, LocalError> {
        let entry = self
            .entries
            .get(digest)
            .ok_or_else(|| LocalError::Missing {
                file: self.file.clone(),
                entry: digest.to_string(),
            })?;
        let (r, _) = self.store.open_entry(&self.file, entry)?;
        Ok(Box::new(Verified {
            inner: r,
            hasher: Sha256::new(),
            expected: digest.to_string(),
        }))
    }
}

/// Opens the image `spec` names, choosing a platform from an index as a
/// registry image would be chosen.
pub fn open(
    spec: &Spec,
    platform: Option<&PlatformSpec>,
) -> Result<(ResolvedImage, LocalBlobs), LocalError> {
    let file = spec.path.display().to_string();
    let store = Store::open(spec.kind, &spec.path)?;
    let (image, entries) = match spec.kind {
        Kind::DockerArchive => docker_archive(&file, &store, spec, platform)?,
        Kind::Oci | Kind::OciArchive => oci_layout(&file, &store, spec, platform)?,
    };
    Ok((
        image,
        LocalBlobs {
            file,
            store,
            entries,
        },
    ))
}

fn invalid(file: &str, entry: &str, detail: impl fmt::Display) -> LocalError {
    LocalError::Invalid {
        file: file.to_string(),
        entry: entry.to_string(),
        detail: detail.to_string(),
    }
}

/// A name rimg can use for an image that has none: from the file's name.
fn fallback_reference(path: &Path, tag: Option<&str>) -> Reference {
    let stem: String = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let stem = stem.trim_matches('-');
    let stem = if stem.is_empty() { "local" } else { stem };
    let tag = tag.unwrap_or("latest");
    Reference::parse(&format!("localhost/{stem}:{tag}"))
        .or_else(|_| Reference::parse(&format!("localhost/{stem}:latest")))
        .or_else(|_| Reference::parse("localhost/local:latest"))
        .expect("a valid fixed reference")
}

/// An explicit `--platform` must match a single-platform image, as for registries.
fn check_platform(
    file: &str,
    image: &ResolvedImage,
    platform: Option<&PlatformSpec>,
) -> Result<(), LocalError> {
    let c = &image.config;
    if let (Some(asked), None) = (platform, &image.index_digest)
        && !asked.matches(
            &c.os().to_string(),
            &c.architecture().to_string(),
            c.variant().as_deref(),
        )
    {
        return Err(LocalError::Choice {
            file: file.to_string(),
            detail: format!(
                "no image for platform {asked}; the image is {}",
                image.platform
            ),
        });
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The digest a blob stored as `blobs/sha256/<hex>` claims by its name.
fn digest_from_name(name: &str) -> Option<String> {
    let clean = clean_name(name)?;
    let s = std::str::from_utf8(&clean).ok()?;
    let hex = s.strip_prefix("blobs/sha256/")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| format!("sha256:{hex}"))
}

type Resolved = (ResolvedImage, HashMap<String, String>);

/// A `docker save` archive: one image of `manifest.json`, its config, and its
/// layers as a docker v2 manifest describes them.
fn docker_archive(
    file: &str,
    store: &Store,
    spec: &Spec,
    platform: Option<&PlatformSpec>,
) -> Result<Resolved, LocalError> {
    let bytes = store.read_small(file, "manifest.json")?;
    let list: Vec<DockerEntry> =
        serde_json::from_slice(&bytes).map_err(|e| invalid(file, "manifest.json", e))?;
    let tags_of = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
    let choices = || {
        list.iter()
            .enumerate()
            .map(|(i, e)| {
                let t = tags_of(e);
                if t.is_empty() {
                    format!("#{i} (untagged, config {})", e.config)
                } else {
                    t.join(", ")
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (entry, tag) = match &spec.pick {
        Some(pick) => {
            let want = Reference::parse(pick).ok();
            let found = list.iter().find_map(|e| {
                tags_of(e)
                    .into_iter()
                    .find(|t| {
                        t == pick
                            || want
                                .as_ref()
                                .is_some_and(|w| Reference::parse(t).ok().as_ref() == Some(w))
                    })
                    .map(|t| (e, Some(t)))
            });
            found.ok_or_else(|| LocalError::Choice {
                file: file.to_string(),
                detail: format!("no image tagged {pick}; the archive holds: {}", choices()),
            })?
        }
        None => match list.as_slice() {
            [one] => (one, tags_of(one).into_iter().next()),
            [] => return Err(invalid(file, "manifest.json", "lists no image")),
            _ => {
                return Err(LocalError::Choice {
                    file: file.to_string(),
                    detail: format!(
                        "holds {} images; name one as docker-archive:PATH:REPO:TAG ({})",
                        list.len(),
                        choices()
                    ),
                });
            }
        },
    };
    let config = store.read_small(file, &entry.config)?;
    let config_digest = sha256_digest(&config);
    if let Some(named) = digest_from_name(&entry.config)
        && named != config_digest
    {
        return Err(invalid(
            file,
            &entry.config,
            format!("content hashes to {config_digest}, but its name says {named}"),
        ));
    }
    let diff_ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(&config)
        .ok()
        .and_then(|v| {
            v["rootfs"]["diff_ids"].as_array().map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default();
    if !diff_ids.is_empty() && diff_ids.len() != entry.layers.len() {
        return Err(invalid(
            file,
            "manifest.json",
            format!(
                "names {} layers, but the config {} lists {} diff_ids",
                entry.layers.len(),
                entry.config,
                diff_ids.len()
            ),
        ));
    }
    let mut entries = HashMap::new();
    let mut layers = Vec::new();
    for (i, name) in entry.layers.iter().enumerate() {
        let (mut r, size) = store.open_entry(file, name)?;
        let read_err = |source| LocalError::Entry {
            file: file.to_string(),
            entry: name.clone(),
            source,
        };
        let mut head = Vec::with_capacity(512);
        (&mut r)
            .take(512)
            .read_to_end(&mut head)
            .map_err(read_err)?;
        let compression =
            layer::detect(name, "application/vnd.docker.image.rootfs.diff.tar", &head)
                .map_err(|e| invalid(file, name, layer_detail(e)))?;
        let media_type = match compression {
            layer::Compression::Gzip => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            layer::Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            layer::Compression::None => "application/vnd.docker.image.rootfs.diff.tar",
        };
        // The blob's digest: named by the entry, or (uncompressed) the diff_id
        // the config gives; either is verified as the layer is read. Otherwise
        // hashed now, since a manifest needs it.
        let digest = match (digest_from_name(name), diff_ids.get(i)) {
            (Some(d), _) => d,
            (None, Some(d)) if compression == layer::Compression::None => d.clone(),
            _ => {
                let mut h = Sha256::new();
                h.update(&head);
                crate::cache::hash_into(&mut r, &mut h).map_err(read_err)?;
                format!("sha256:{}", hex::encode(h.finalize()))
            }
        };
        entries.insert(digest.clone(), name.clone());
        layers.push(json!({"mediaType": media_type, "size": size, "digest": digest}));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": config.len(),
            "digest": config_digest,
        },
        "layers": layers,
    }))
    .map_err(|e| invalid(file, "manifest.json", e))?;
    let reference = tag
        .as_deref()
        .and_then(|t| Reference::parse(t).ok())
        .unwrap_or_else(|| fallback_reference(&spec.path, None));
    let image = ResolvedImage::from_parts(ImageParts {
        reference: reference.to_string(),
        index_digest: None,
        media_type: DOCKER_MANIFEST.to_string(),
        platform: None,
        manifest,
        config,
    })
    .map_err(|source| LocalError::Image {
        file: file.to_string(),
        entry: entry.config.clone(),
        source: Box::new(source),
    })?;
    check_platform(file, &image, platform)?;
    Ok((image, entries))
}

/// The entry name of a blob in an OCI layout.
fn blob_name(file: &str, digest: &str) -> Result<String, LocalError> {
    match digest.split_once(':') {
        Some((alg, hex))
            if !alg.is_empty()
                && alg.bytes().all(|b| b.is_ascii_alphanumeric())
                && !hex.is_empty()
                && hex.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(format!("blobs/{alg}/{hex}"))
        }
        _ => Err(invalid(
            file,
            "index.json",
            format!("bad digest {digest:?}"),
        )),
    }
}

/// A whole small blob, verified against its digest.
fn read_blob(file: &str, store: &Store, digest: &str) -> Result<Vec<u8>, LocalError> {
    let name = blob_name(file, digest)?;
    let bytes = store.read_small(file, &name)?;
    let actual = sha256_digest(&bytes);
    if actual != digest {
        return Err(invalid(
            file,
            &name,
            format!("content hashes to {actual}, expected {digest}"),
        ));
    }
    Ok(bytes)
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

fn annotation<'a>(d: &'a Descriptor, key: &str) -> Option<&'a str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// An OCI layout: `index.json`, an entry chosen by tag, an index in it
/// resolved to one platform, the manifest and its config.
fn oci_layout(
    file: &str,
    store: &Store,
    spec: &Spec,
    platform: Option<&PlatformSpec>,
) -> Result<Resolved, LocalError> {
    let top_bytes = store.read_small(file, "index.json")?;
    let top: ImageIndex =
        serde_json::from_slice(&top_bytes).map_err(|e| invalid(file, "index.json", e))?;
    let tags: Vec<&str> = top
        .manifests()
        .iter()
        .filter_map(|d| annotation(d, REF_NAME))
        .collect();
    let picked: Vec<Descriptor> = match &spec.pick {
        Some(tag) => top
            .manifests()
            .iter()
            .filter(|d| {
                annotation(d, REF_NAME) == Some(tag) || annotation(d, CONTAINERD_NAME) == Some(tag)
            })
            .cloned()
            .collect(),
        None => top.manifests().clone(),
    };
    let want = platform.cloned().unwrap_or_else(PlatformSpec::host);
    let no_platform = |available: String| LocalError::Choice {
        file: file.to_string(),
        detail: format!("no image for platform {want}; it holds: {available}"),
    };
    let chosen: Descriptor = match picked.as_slice() {
        [] => {
            return Err(LocalError::Choice {
                file: file.to_string(),
                detail: match &spec.pick {
                    Some(t) => format!("no image tagged {t}; tags: {}", tags.join(", ")),
                    None => "index.json lists no image".to_string(),
                },
            });
        }
        [one] => one.clone(),
        many if many.iter().all(|d| d.platform().is_some()) => {
            // Entries that differ by platform only: choose as from an index.
            let mut idx = top.clone();
            idx.set_manifests(many.to_vec());
            select_platform(&idx, &want).map_err(no_platform)?.clone()
        }
        many => {
            return Err(LocalError::Choice {
                file: file.to_string(),
                detail: format!(
                    "holds {} images; name one as {}:PATH:TAG (tags: {})",
                    many.len(),
                    spec.kind.prefix(),
                    if tags.is_empty() {
                        "none".to_string()
                    } else {
                        tags.join(", ")
                    }
                ),
            });
        }
    };
    let ref_name = annotation(&chosen, CONTAINERD_NAME)
        .and_then(|n| Reference::parse(n).ok())
        .or_else(|| {
            annotation(&chosen, REF_NAME)
                .filter(|n| n.contains('/'))
                .and_then(|n| Reference::parse(n).ok())
        })
        .unwrap_or_else(|| fallback_reference(&spec.path, annotation(&chosen, REF_NAME)));
    let mut digest = chosen.digest().to_string();
    let mut media_type = chosen.media_type().to_string();
    let mut bytes = read_blob(file, store, &digest)?;
    let mut index_digest = None;
    let mut platform_name = None;
    if matches!(media_type.as_str(), OCI_INDEX | DOCKER_LIST) {
        let entry = blob_name(file, &digest)?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|e| invalid(file, &entry, e))?;
        let child = select_platform(&index, &want).map_err(no_platform)?;
        platform_name = describe_platform(child);
        index_digest = Some(digest);
        digest = child.digest().to_string();
        media_type = child.media_type().to_string();
        bytes = read_blob(file, store, &digest)?;
    }
    let entry = blob_name(file, &digest)?;
    if !matches!(media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST) {
        return Err(invalid(
            file,
            &entry,
            format!("unsupported media type {media_type:?}"),
        ));
    }
    let manifest: oci_spec::image::ImageManifest =
        serde_json::from_slice(&bytes).map_err(|e| invalid(file, &entry, e))?;
    let config_digest = manifest.config().digest().to_string();
    let config = read_blob(file, store, &config_digest)?;
    let mut entries = HashMap::new();
    for l in manifest.layers() {
        let d = l.digest().to_string();
        let name = blob_name(file, &d)?;
        // Checked now, so a layout missing a layer fails before anything is mounted.
        store.open_entry(file, &name)?;
        entries.insert(d, name);
    }
    let image = ResolvedImage::from_parts(ImageParts {
        reference: ref_name.to_string(),
        index_digest,
        media_type,
        platform: platform_name,
        manifest: bytes,
        config,
    })
    .map_err(|source| LocalError::Image {
        file: file.to_string(),
        entry,
        source: Box::new(source),
    })?;
    check_platform(file, &image, platform)?;
    Ok((image, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_split_path_and_pick_as_skopeo_does() {
        assert_eq!(locate("alpine:3.10"), Location::Registry("alpine:3.10"));
        assert_eq!(
            locate("docker://localhost:5000/a:b"),
            Location::Registry("localhost:5000/a:b")
        );
        let Location::Local(s) = locate("docker-archive:/nonexistent/x.tar:alpine:3.10") else {
            panic!("local");
        };
        assert_eq!(s.kind, Kind::DockerArchive);
        assert_eq!(s.path, Path::new("/nonexistent/x.tar"));
        assert_eq!(s.pick.as_deref(), Some("alpine:3.10"));
        let Location::Local(s) = locate("oci:/nonexistent/dir") else {
            panic!("local");
        };
        assert_eq!((s.kind, s.pick), (Kind::Oci, None));
        let Location::Local(s) = locate("oci-archive:/nonexistent/a.tar:v1") else {
            panic!("local");
        };
        assert_eq!((s.kind, s.pick.as_deref()), (Kind::OciArchive, Some("v1")));
    }

    #[test]
    fn names_that_climb_out_or_are_absolute_are_refused() {
        assert_eq!(clean_name("./a/b/../c").unwrap(), b"a/c");
        assert!(clean_name("../x").is_none());
        assert!(clean_name("a/../../x").is_none());
        assert!(clean_name("/etc/passwd").is_none());
    }

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> tempfile::NamedTempFile {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let bytes = b.into_inner().unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        b.append_link(&mut h, name, target).unwrap();
    }

    fn read(store: &Store, name: &str) -> Result<Vec<u8>, LocalError> {
        store.read_small("t.tar", name)
    }

    #[test]
    fn links_between_tar_members_are_followed_inside_only() {
        let f = tar_with(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_size(5);
            h.set_mode(0o644);
            b.append_data(&mut h, "./real/data", &b"hello"[..]).unwrap();
            link(b, tar::EntryType::Symlink, "a/rel", "../real/data");
            link(b, tar::EntryType::Link, "a/hard", "real/data");
            link(b, tar::EntryType::Symlink, "a/out", "../../etc/passwd");
            link(b, tar::EntryType::Symlink, "a/abs", "/etc/passwd");
            link(b, tar::EntryType::Symlink, "loop/x", "y");
            link(b, tar::EntryType::Symlink, "loop/y", "x");
        });
        let store = Store::open(Kind::DockerArchive, f.path()).unwrap();
        assert_eq!(read(&store, "a/rel").unwrap(), b"hello");
        assert_eq!(read(&store, "a/hard").unwrap(), b"hello");
        for escaping in ["a/out", "a/abs", "../real/data", "/real/data"] {
            let err = read(&store, escaping).unwrap_err();
            assert!(
                matches!(err, LocalError::Escapes { .. }),
                "{escaping}: {err}"
            );
        }
        let err = read(&store, "loop/x").unwrap_err();
        assert!(err.to_string().contains("too many levels"), "{err}");
        let err = read(&store, "real/other").unwrap_err();
        assert!(
            err.to_string().contains("real/other: no such entry"),
            "{err}"
        );
    }

    #[test]
    fn a_member_that_ends_past_the_file_is_refused_at_open() {
        let f = tar_with(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_size(4096);
            h.set_mode(0o644);
            b.append_data(&mut h, "big", &[7u8; 4096][..]).unwrap();
        });
        let bytes = std::fs::read(f.path()).unwrap();
        std::fs::write(f.path(), &bytes[..512 + 1000]).unwrap();
        let err = Store::open(Kind::OciArchive, f.path()).err().unwrap();
        assert!(
            err.to_string().contains("truncated: big ends at byte"),
            "{err}"
        );
    }

    #[test]
    fn a_blob_that_does_not_match_its_digest_fails_at_its_end() {
        let mut r = Verified {
            inner: io::Cursor::new(b"hello".to_vec()),
            hasher: Sha256::new(),
            expected: sha256_digest(b"other"),
        };
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).unwrap_err();
        assert!(err.to_string().contains("expected"), "{err}");
        let mut r = Verified {
            inner: io::Cursor::new(b"hello".to_vec()),
            hasher: Sha256::new(),
            expected: sha256_digest(b"hello"),
        };
        r.read_to_end(&mut out).unwrap();
    }
}
