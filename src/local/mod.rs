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
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::layer::{self};
use crate::reference::Reference;
use crate::registry::{PlatformSpec, RegistryError, ResolvedImage};

mod formats;
mod store;

use formats::*;
use store::*;

/// JSON documents (manifests, indexes, configs) bigger than this are refused.
const JSON_MAX: u64 = 32 << 20;
/// Symlinks followed between tar members before giving up.
const LINK_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{file}")]
    Io {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: {entry}")]
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
    #[error("{file}: {entry}")]
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

/// Where each blob of an opened local image lives, for the cache to read.
pub struct LocalBlobs {
    file: String,
    /// `KIND:/absolute/path`: what the image is, wherever its tags say it
    /// came from.
    source: String,
    store: Store,
    /// Digest to entry name.
    entries: HashMap<String, String>,
}

impl LocalBlobs {
    /// The source as mounts show it, `docker-archive:/abs/path`: a file's
    /// RepoTags or ref names are only a detail, never its identity.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `FILE: ENTRY` of the blob `digest`, for messages.
    pub fn describe(&self, digest: &str) -> String {
        match self.entries.get(digest) {
            Some(entry) => format!("{}: {entry}", self.file),
            None => self.file.clone(),
        }
    }

    /// Where the blob `digest` lies in a file when it is an uncompressed tar,
    /// which can be read in place instead of copied into the cache. Only a
    /// file no one else can change qualifies (see [`unchangeable`]): its
    /// bytes are verified once, when indexed, and then read live.
    pub fn in_place(&self, digest: &str, media_type: &str) -> Option<(Arc<File>, u64, u64)> {
        let entry = self.entries.get(digest)?;
        let (f, offset, size) = self.store.locate(&self.file, entry).ok()?;
        if let Err(why) = unchangeable(&f) {
            tracing::info!(
                "layer {digest}: {}: {why}; copying it into the cache instead of reading it in place",
                self.describe(digest)
            );
            return None;
        }
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
            hasher: crate::digest::Digest::hasher(),
            expected: digest.to_string(),
        }))
    }
}

/// Whether no one but the caller and root can change the bytes of the open
/// file `f`: owned by one of them, and writable by neither group nor others
/// (an ACL granting write shows in the group bits). Renaming or replacing
/// the path does not matter: reads go through this open file.
fn unchangeable(f: &File) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    let me = crate::private::euid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "owned by uid {}, not by this user or root",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "writable by others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
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
    let path = std::fs::canonicalize(&spec.path).unwrap_or_else(|_| spec.path.clone());
    Ok((
        image,
        LocalBlobs {
            file,
            source: format!("{}:{}", spec.kind.prefix(), path.display()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

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
        let err = crate::report::Chain(&read(&store, "loop/x").unwrap_err()).to_string();
        assert!(err.contains("too many levels"), "{err}");
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
            hasher: Digest::hasher(),
            expected: Digest::of_bytes(b"other").to_string(),
        };
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).unwrap_err();
        assert!(err.to_string().contains("expected"), "{err}");
        let mut r = Verified {
            inner: io::Cursor::new(b"hello".to_vec()),
            hasher: Digest::hasher(),
            expected: Digest::of_bytes(b"hello").to_string(),
        };
        r.read_to_end(&mut out).unwrap();
    }
}
