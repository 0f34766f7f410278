//! The on-disk, content-addressed layer cache: each layer's original blob, its
//! uncompressed tar and the tar's entry index, published only once complete
//! and verified, shared safely between processes, and kept under a size limit
//! by evicting least recently used layers that no mount is using.
//!
//! Layout under the root (mode 0700):
//! - `blobs/sha256/<hex>`: the blob as the registry served it (for export);
//! - `layers/sha256/<hex>.tar`: the uncompressed tar that reads come from;
//! - `layers/sha256/<hex>.idx`: the index; its presence marks a layer complete;
//! - `layers/sha256/<hex>.refs`: the image references that used the layer;
//! - `locks/<hex>.lock`: exclusive while fetching or evicting, shared while in use;
//! - `inplace/<key>.idx`: the index of an uncompressed layer read in place from
//!   an image archive on disk, keyed by the digest and the archive's identity;
//! - `lazy/sha256/<hex>-<form>.{data,have}`: the range cache of a layer read
//!   a span at a time (see [`ranged`]; `<form>` says how it is addressed);
//! - `trees/`: merged trees saved for warm mounts (`overlay::saved`);
//! - `logs/`: the logs of background mount servers;
//! - `tmp/`: files being written, renamed into place when done.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::layer::{LayerError, LayerIndex};
use crate::registry::RegistryError;

mod fetch;
mod maintain;
pub mod ranged;

/// A layer whose bytes fail their digest is downloaded again from the start
/// this many times before the error.
const REFETCHES: u32 = 2;

/// Bumped whenever the index format changes, so old indexes are rebuilt.
const INDEX_VERSION: u32 = 5;
const IO_BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {digest}: download failed")]
    Fetch {
        digest: Digest,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "layer {digest}: downloaded content does not match the digest (got {actual}; downloaded {tries} times)"
    )]
    Corrupt {
        digest: Digest,
        actual: String,
        tries: u32,
    },
    #[error(
        "layer {digest} inflates past {limit} bytes (the cache size or --max-layer-size); refused"
    )]
    TooLarge { digest: Digest, limit: u64 },
    #[error(
        "layer {digest}: uncompressed content hashes to {actual}, but the image config says {expected}"
    )]
    DiffId {
        digest: Digest,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A zstd:chunked layer's tar-split that disagrees with its stream:
    /// never used to make the stream match its diff_id.
    #[error("{0}; it is not used to restore the tar the diff_id names")]
    TarSplit(#[from] crate::layer::toc::tarsplit::TarSplitError),
    #[error(transparent)]
    Ranged(#[from] ranged::RangedError),
    #[error(
        "layer {digest}: the published index it was read through differs from the layer itself (it {first}); the index is distrusted and its range cache dropped"
    )]
    IndexMismatch {
        digest: Digest,
        first: crate::layer::Difference,
    },
    #[error(
        "layer {digest}: what its range cache holds is not the layer (its range cache is dropped)"
    )]
    RangedNotLayer {
        digest: Digest,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Unsafe(#[from] crate::private::Unsafe),
    #[error("invalid layer digest {0:?}")]
    BadDigest(String),
    /// A layer read in place whose bytes are not the ones its digest names
    /// (the layer and its digest are named by the caller's context).
    #[error("the layer's content hashes to {actual}, not to its digest")]
    Digest { actual: String },
}

/// Bumped whenever the saved tree's encoding or the merge rules change, so a
/// tree saved by an older rimg is rebuilt rather than trusted.
const TREE_FORMAT: u32 = 2;

/// The header of a layer index: `None` when there is no index, `Err` when
/// it cannot be decoded.
fn read_index_header(idx: &Path) -> Result<Option<Result<IndexHeader, ()>>, CacheError> {
    let mut head = Vec::with_capacity(HEADER_MAX);
    match File::open(idx) {
        Ok(f) => f
            .take(HEADER_MAX as u64)
            .read_to_end(&mut head)
            .map_err(io_err(idx))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(idx)(e)),
    };
    Ok(Some(
        postcard::take_from_bytes::<IndexHeader>(&head)
            .map(|(h, _)| h)
            .map_err(|_| ()),
    ))
}

pub(crate) use crate::digest::hash_into;

/// How long to wait for a layer that others hold but that cannot be read.
const IN_USE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `$RIMG_CACHE_DIR`, `$XDG_CACHE_HOME/rimg` or `~/.cache/rimg`.
pub fn default_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("RIMG_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("rimg")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/rimg")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/rimg"))
}

/// An index file is this header followed by the `LayerIndex`, both postcard;
/// opening a layer reads only the header.
#[derive(Serialize, Deserialize)]
struct IndexHeader {
    version: u32,
    digest: Digest,
    diff_id: String,
    blob_size: u64,
    tar_size: u64,
}

/// Enough of an index file to hold the header.
const HEADER_MAX: usize = 512;

/// A cached layer, open for reading. While it lives, it holds a shared lock
/// that keeps other processes from evicting it.
pub struct Layer {
    pub digest: Digest,
    pub diff_id: String,
    idx_path: PathBuf,
    data: Data,
    _in_use: File,
}

/// Where a layer's bytes are read from.
enum Data {
    /// An uncompressed tar: the cache's own copy (`base` 0), or a member of
    /// an archive on disk read in place (`base` its offset).
    Tar { file: File, base: u64 },
    /// Fetched by range as reads need them; the index's offsets are
    /// addresses in the ranged layer's own space.
    Ranged(Arc<ranged::Ranged>),
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("digest", &self.digest)
            .finish()
    }
}

impl Layer {
    /// The layer's entry index, read from disk on demand: once a tree is built
    /// the index is no longer needed, so it is not kept in memory.
    pub fn index(&self) -> Result<LayerIndex, CacheError> {
        let bytes = fs::read(&self.idx_path).map_err(io_err(&self.idx_path))?;
        let bad = |e: postcard::Error| io_err(&self.idx_path)(io::Error::other(e));
        let (_, rest) = postcard::take_from_bytes::<IndexHeader>(&bytes).map_err(bad)?;
        postcard::from_bytes(rest).map_err(bad)
    }

    /// Reads from the uncompressed tar at `offset`. This is the one interface
    /// the tree and FUSE read through, whatever form the storage takes.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        match &self.data {
            Data::Tar { file, base } => file.read_at(buf, base + offset),
            Data::Ranged(r) => Ok(r.read_at(offset, buf)?),
        }
    }

    /// The range reader of a layer read by range: reads may wait for the
    /// network, so FUSE must not make them on its session thread.
    pub fn ranged(&self) -> Option<&Arc<ranged::Ranged>> {
        match &self.data {
            Data::Ranged(r) => Some(r),
            Data::Tar { .. } => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CachedLayer {
    pub digest: Digest,
    pub blob_size: u64,
    pub tar_size: u64,
    /// Seconds since the epoch.
    pub last_use: i64,
    pub images: Vec<String>,
}

/// One layer's result from [`Cache::verify`].
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub digest: Digest,
    /// What is wrong, or `None` when the layer is intact.
    pub problem: Option<String>,
    /// Removed (it was corrupt and no mount was using it).
    pub removed: bool,
}

pub struct Cache {
    root: PathBuf,
    limit: u64,
}

/// Copies everything read through it to `out`, counting (and, with a
/// hasher, hashing) it. Past `limit` bytes it fails, and [`Tee::over_limit`]
/// tells the caller that this is why.
struct Tee<R, W> {
    inner: R,
    out: W,
    hasher: Option<Sha256>,
    count: u64,
    limit: u64,
}

impl<R, W> Tee<R, W> {
    fn new(inner: R, out: W, limit: u64) -> Tee<R, W> {
        Tee {
            inner,
            out,
            hasher: None,
            count: 0,
            limit,
        }
    }

    fn over_limit(&self) -> bool {
        self.count > self.limit
    }
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.over_limit() {
            return Err(io::Error::other("size limit reached"));
        }
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.over_limit() {
            return Err(io::Error::other("size limit reached"));
        }
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// A digest named by a string from outside the typed path (a saved tree's
/// image, a file name in the cache).
fn parse_digest(digest: &str) -> Result<Digest, CacheError> {
    Digest::parse(digest).map_err(|_| CacheError::BadDigest(digest.to_string()))
}

fn mtime_secs(meta: &fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64)
}

impl Cache {
    /// Opens (making it if missing) the cache at `root`, which must be this
    /// user's alone: owned by the caller, not writable by others, reached
    /// through directories only the caller or root can change (see
    /// [`crate::private`]). A cache another user could write is refused, so
    /// no planted file or symlink is ever read or written through.
    pub fn open(root: &Path, limit: u64) -> Result<Cache, CacheError> {
        crate::private::dir(root, crate::private::Mode::NotWritable)?;
        for sub in ["blobs/sha256", "layers/sha256", "locks", "tmp"] {
            crate::private::dir(&root.join(sub), crate::private::Mode::NotWritable)?;
        }
        let cache = Cache {
            root: root.to_path_buf(),
            limit,
        };
        // What an interrupted run left is swept by the next one.
        cache.clean_tmp();
        Ok(cache)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn paths(&self, hex: &str) -> (PathBuf, PathBuf, PathBuf) {
        let layers = self.root.join("layers/sha256");
        (
            self.root.join("blobs/sha256").join(hex),
            layers.join(format!("{hex}.tar")),
            layers.join(format!("{hex}.idx")),
        )
    }

    fn lock_file(&self, hex: &str) -> Result<File, CacheError> {
        let path = self.root.join("locks").join(format!("{hex}.lock"));
        crate::private::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))
    }

    /// The original blob of a cached layer.
    pub fn blob_path(&self, digest: &Digest) -> Option<PathBuf> {
        let (blob, _, idx) = self.paths(digest.hex());
        (idx.exists() && blob.exists()).then_some(blob)
    }

    /// Opens a complete layer, or `None` if it is not (or no longer validly) cached.
    fn load(
        &self,
        hex: &str,
        expected_diff_id: Option<&str>,
        in_use: File,
    ) -> Result<Option<Layer>, CacheError> {
        let (_, tar_path, idx_path) = self.paths(hex);
        let file = match read_index_header(&idx_path)? {
            None => return Ok(None),
            Some(Ok(h)) => h,
            Some(Err(())) => {
                tracing::warn!(
                    "{}: unreadable index; rebuilding the layer",
                    idx_path.display()
                );
                return Ok(None);
            }
        };
        if file.version != INDEX_VERSION {
            return Ok(None);
        }
        // The same blob under an image config that claims another diff_id.
        if let Some(expected) = expected_diff_id
            && expected != file.diff_id
        {
            return Err(CacheError::DiffId {
                digest: file.digest,
                expected: expected.to_string(),
                actual: file.diff_id,
            });
        }
        let tar = match File::open(&tar_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&tar_path)(e)),
        };
        let len = tar.metadata().map_err(io_err(&tar_path))?.len();
        if len != file.tar_size {
            tracing::warn!(
                "{}: size does not match its index; rebuilding",
                tar_path.display()
            );
            return Ok(None);
        }
        // Last use is the index file's mtime.
        if let Ok(f) = crate::private::options().write(true).open(&idx_path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Ok(Some(Layer {
            digest: file.digest,
            diff_id: file.diff_id,
            idx_path,
            data: Data::Tar { file: tar, base: 0 },
            _in_use: in_use,
        }))
    }

    fn note_image(&self, hex: &str, image_ref: &str) {
        let path = self.root.join("layers/sha256").join(format!("{hex}.refs"));
        let known = fs::read_to_string(&path).unwrap_or_default();
        if !known.lines().any(|l| l == image_ref)
            && let Ok(mut f) = crate::private::options()
                .create(true)
                .append(true)
                .open(&path)
        {
            let _ = writeln!(f, "{image_ref}");
        }
    }
}

pub(crate) use crate::layer::Section;

/// Turns a digest mismatch of the download (which a blob reader reports as
/// the `RegistryError` inside an `io::Error`) back into its own error.
fn classify(e: io::Error, digest: &Digest) -> CacheError {
    if let Some(RegistryError::Digest { actual, .. }) =
        e.get_ref().and_then(|i| i.downcast_ref::<RegistryError>())
    {
        return CacheError::Corrupt {
            digest: digest.clone(),
            actual: actual.clone(),
            tries: 1,
        };
    }
    CacheError::Fetch {
        digest: digest.clone(),
        source: Box::new(e),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::registry::LayerDesc;

    type Opener =
        Box<dyn FnMut() -> Result<Box<dyn Read + Send>, Box<dyn std::error::Error + Send + Sync>>>;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn desc(blob: &[u8]) -> LayerDesc {
        LayerDesc {
            digest: Digest::of_bytes(blob),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            size: blob.len() as u64,
            urls: vec![],
            diff_id: None,
            annotations: Default::default(),
        }
    }

    fn serve(blob: Vec<u8>) -> Opener {
        Box::new(move || Ok(Box::new(io::Cursor::new(blob.clone())) as Box<dyn Read + Send>))
    }

    /// Fails after `n` good bytes, like a dropped connection or a digest mismatch.
    struct Broken {
        data: io::Cursor<Vec<u8>>,
        left: usize,
    }
    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::Error::other("connection reset"));
            }
            let n = buf.len().min(self.left);
            let got = self.data.read(&mut buf[..n])?;
            self.left -= got;
            Ok(got)
        }
    }

    fn files_under(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["blobs/sha256", "layers/sha256", "tmp"] {
            for e in fs::read_dir(dir.join(sub)).unwrap() {
                out.push(format!(
                    "{sub}/{}",
                    e.unwrap().file_name().to_string_lossy()
                ));
            }
        }
        out
    }

    #[test]
    fn a_layer_is_fetched_once_then_loaded_from_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let tar = tar_of(&[("etc/os-release", b"NAME=test\n")]);
        let blob = gzip(&tar);
        let d = desc(&blob);
        let layer = cache
            .ensure_layer(&d, "r:1", u64::MAX, serve(blob.clone()))
            .unwrap();
        let index = layer.index().unwrap();
        let e = &index.entries[0];
        let mut buf = vec![0; e.size as usize];
        layer.read_at(e.offset, &mut buf).unwrap();
        assert_eq!(buf, b"NAME=test\n");
        assert_eq!(
            layer.diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&tar)))
        );
        let again = cache
            .ensure_layer(&d, "r:2", u64::MAX, || {
                panic!("a cached layer must not be fetched again")
            })
            .unwrap();
        assert_eq!(again.index().unwrap(), index);
        assert_eq!(fs::read(cache.blob_path(&d.digest).unwrap()).unwrap(), blob);
        let listed = cache.list().unwrap();
        assert_eq!(listed[0].images, ["r:1", "r:2"]);
    }

    #[test]
    fn a_layer_published_while_others_hold_it_is_found_not_waited_for() {
        // Someone holds the layer's lock shared (a mount using it) while it
        // is not yet here; then it appears. flock lets shared locks past a
        // waiting exclusive one, so a fetcher blocked on the exclusive lock
        // would wait as long as the mount lives. It must find the layer.
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(dir.path(), u64::MAX).unwrap());
        let blob = gzip(&tar_of(&[("f", b"data")]));
        let d = desc(&blob);
        let hex = d.digest.hex().to_string();
        let holder = cache.lock_file(&hex).unwrap();
        holder.lock_shared().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (cache, d) = (Arc::clone(&cache), d.clone());
            std::thread::spawn(move || {
                let r = cache.ensure_layer(&d, "r:1", u64::MAX, || panic!("fetched while held"));
                tx.send(r.map(|l| l.diff_id.clone())).unwrap();
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        // Another process publishes it (here: fetched into a second cache
        // and moved into place).
        let other = tempfile::tempdir().unwrap();
        let c2 = Cache::open(other.path(), u64::MAX).unwrap();
        let l2 = c2
            .ensure_layer(&d, "r:2", u64::MAX, serve(blob.clone()))
            .unwrap();
        let (src, dst) = (c2.paths(&hex), cache.paths(&hex));
        fs::copy(&src.0, &dst.0).unwrap();
        fs::copy(&src.1, &dst.1).unwrap();
        fs::copy(&src.2, &dst.2).unwrap();
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("found without waiting for the holder")
            .unwrap();
        assert_eq!(got, l2.diff_id);
        drop(holder);
    }

    #[test]
    fn a_download_that_breaks_leaves_nothing_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let blob = gzip(&tar_of(&[("f", &[1u8; 100_000])]));
        let d = desc(&blob);
        let broken = blob.clone();
        let err = cache
            .ensure_layer(&d, "r", u64::MAX, move || {
                Ok(Box::new(Broken {
                    data: io::Cursor::new(broken.clone()),
                    left: 600,
                }) as Box<dyn Read + Send>)
            })
            .unwrap_err();
        assert!(err.to_string().contains(d.digest.as_str()), "{err}");
        assert_eq!(files_under(dir.path()), Vec::<String>::new());
        // The next run fetches it whole.
        cache.ensure_layer(&d, "r", u64::MAX, serve(blob)).unwrap();
    }

    #[test]
    fn a_gzip_bomb_is_stopped_at_the_size_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let blob = gzip(&tar_of(&[("zeros", &vec![0u8; 4 << 20])]));
        let d = desc(&blob);
        let err = cache
            .ensure_layer(&d, "r", 1 << 20, serve(blob))
            .unwrap_err();
        assert!(matches!(err, CacheError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("inflates past"), "{err}");
        assert_eq!(files_under(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_blob_that_is_not_a_tar_is_refused_naming_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let blob = gzip(
            b"this is not a tar archive at all, just text. "
                .repeat(20)
                .as_slice(),
        );
        let d = desc(&blob);
        let err = cache
            .ensure_layer(&d, "r", u64::MAX, serve(blob))
            .unwrap_err();
        assert!(err.to_string().contains(d.digest.as_str()), "{err}");
        assert_eq!(files_under(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn zstd_and_plain_layers_are_read_by_their_magic() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let tar = tar_of(&[("a", b"1")]);
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        for blob in [zst, tar.clone()] {
            let d = desc(&blob);
            let l = cache.ensure_layer(&d, "r", u64::MAX, serve(blob)).unwrap();
            assert_eq!(l.index().unwrap().entries[0].path, b"a");
        }
    }

    fn corrupt_reader(blob: Vec<u8>) -> Box<dyn Read + Send> {
        /// Serves the bytes, then fails as `BlobReader` does on a digest mismatch.
        struct R(io::Cursor<Vec<u8>>);
        impl Read for R {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match self.0.read(buf)? {
                    0 => Err(io::Error::other(RegistryError::Digest {
                        what: "download".into(),
                        expected: "sha256:a".into(),
                        actual: "sha256:b".into(),
                    })),
                    n => Ok(n),
                }
            }
        }
        Box::new(R(io::Cursor::new(blob)))
    }

    #[test]
    fn a_download_that_fails_its_digest_is_fetched_again_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let blob = gzip(&tar_of(&[("f", &data)]));
        let d = desc(&blob);
        // A flipped byte in the gzip stream: the inflater fails first.
        let mut flipped = blob.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        let mut calls = 0;
        let layer = cache
            .ensure_layer(&d, "r", u64::MAX, || {
                calls += 1;
                Ok(if calls < 3 {
                    corrupt_reader(flipped.clone())
                } else {
                    Box::new(io::Cursor::new(blob.clone()))
                })
            })
            .unwrap();
        assert_eq!(calls, 3);
        assert_eq!(layer.index().unwrap().entries[0].path, b"f");
    }

    #[test]
    fn a_download_that_keeps_failing_its_digest_is_reported_once_and_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let blob = gzip(&tar_of(&[("f", b"data")]));
        let d = desc(&blob);
        let mut calls = 0;
        let err = cache
            .ensure_layer(&d, "r", u64::MAX, || {
                calls += 1;
                Ok(corrupt_reader(blob.clone()))
            })
            .unwrap_err();
        assert_eq!(calls, 1 + REFETCHES);
        let msg = err.to_string();
        assert_eq!(
            msg,
            format!(
                "layer {}: downloaded content does not match the digest (got sha256:b; downloaded 3 times)",
                d.digest
            )
        );
        assert_eq!(files_under(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_layer_whose_diff_id_differs_from_the_config_is_refused_and_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let tar = tar_of(&[("f", b"data")]);
        let blob = gzip(&tar);
        let mut d = desc(&blob);
        let wrong = format!("sha256:{}", "0".repeat(64));
        d.diff_id = Some(wrong.clone());
        let err = cache
            .ensure_layer(&d, "r", u64::MAX, serve(blob.clone()))
            .unwrap_err();
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        assert!(
            matches!(&err, CacheError::DiffId { expected, actual: a, .. } if *expected == wrong && *a == actual),
            "{err}"
        );
        assert_eq!(files_under(dir.path()), Vec::<String>::new());
        // Cached under a right config, the layer is still refused under the wrong one.
        d.diff_id = Some(actual);
        cache
            .ensure_layer(&d, "r", u64::MAX, serve(blob.clone()))
            .unwrap();
        d.diff_id = Some(wrong);
        let err = cache
            .ensure_layer(&d, "r", u64::MAX, || panic!("cached"))
            .unwrap_err();
        assert!(matches!(err, CacheError::DiffId { .. }), "{err}");
    }

    #[test]
    fn verify_removes_a_layer_whose_tar_was_damaged_and_keeps_intact_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let mut digests = Vec::new();
        for i in 0..2u8 {
            let blob = gzip(&tar_of(&[("f", &[i; 1000])]));
            let d = desc(&blob);
            drop(cache.ensure_layer(&d, "r", u64::MAX, serve(blob)).unwrap());
            digests.push(d);
        }
        let tar = dir
            .path()
            .join("layers/sha256")
            .join(format!("{}.tar", digests[0].digest.hex()));
        let mut bytes = fs::read(&tar).unwrap();
        bytes[600] ^= 1;
        fs::write(&tar, bytes).unwrap();
        let report = cache.verify().unwrap();
        let bad: Vec<_> = report.iter().filter(|v| v.problem.is_some()).collect();
        assert_eq!(bad.len(), 1, "{report:?}");
        assert_eq!(bad[0].digest, digests[0].digest);
        assert!(bad[0].removed);
        assert!(bad[0].problem.as_ref().unwrap().contains("diff_id"));
        let left: Vec<Digest> = cache
            .list()
            .unwrap()
            .into_iter()
            .map(|l| l.digest)
            .collect();
        assert_eq!(left, [digests[1].digest.clone()]);
    }

    #[test]
    fn a_layer_read_in_place_is_indexed_once_and_cleared_when_unused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let tar = tar_of(&[("etc/os-release", b"NAME=inplace\n")]);
        // The layer at offset 100 of a bigger file, as a member of an archive.
        let mut archive = vec![9u8; 100];
        archive.extend_from_slice(&tar);
        archive.extend_from_slice(&[9u8; 50]);
        let path = dir.path().join("archive");
        fs::write(&path, &archive).unwrap();
        let file = File::open(&path).unwrap();
        let d = desc(&tar);
        let size = tar.len() as u64;
        let layer = cache
            .ensure_layer_in_place(&d, "r", &file, 100, size)
            .unwrap();
        let e = &layer.index().unwrap().entries[0];
        let mut buf = vec![0; e.size as usize];
        layer.read_at(e.offset, &mut buf).unwrap();
        assert_eq!(buf, b"NAME=inplace\n");
        assert_eq!(layer.diff_id, d.digest);
        assert_eq!(
            files_under(dir.path()),
            Vec::<String>::new(),
            "nothing copied"
        );
        let indexes = || fs::read_dir(dir.path().join("inplace")).unwrap().count();
        assert_eq!(indexes(), 1);
        // The wrong bytes (off by one) are refused, and nothing kept for them.
        assert!(
            cache
                .ensure_layer_in_place(&d, "r", &file, 101, size)
                .is_err()
        );
        assert_eq!(indexes(), 1);
        cache.prune(0).unwrap();
        assert_eq!(indexes(), 1, "kept while in use");
        drop(layer);
        cache.prune(0).unwrap();
        assert_eq!(indexes(), 0);
    }

    #[test]
    fn eviction_keeps_the_limit_and_spares_layers_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let mut held = Vec::new();
        let mut digests = Vec::new();
        for i in 0..3u8 {
            let blob = gzip(&tar_of(&[("f", &vec![i; 50_000])]));
            let d = desc(&blob);
            let l = cache.ensure_layer(&d, "r", u64::MAX, serve(blob)).unwrap();
            digests.push(d.digest.clone());
            if i == 0 {
                held.push(l);
            }
            // Distinct last-use times (the index's mtime) for a
            // deterministic order, set rather than waited for.
            let idx = cache.paths(d.digest.hex()).2;
            File::options()
                .write(true)
                .open(&idx)
                .unwrap()
                .set_modified(
                    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i as u64),
                )
                .unwrap();
        }
        let freed = cache.prune(0).unwrap();
        assert!(freed > 0);
        let left: Vec<Digest> = cache
            .list()
            .unwrap()
            .into_iter()
            .map(|l| l.digest)
            .collect();
        assert_eq!(left, [digests[0].clone()], "only the layer in use survives");
        drop(held);
        cache.prune(0).unwrap();
        assert!(cache.list().unwrap().is_empty());
    }

    #[test]
    fn crash_leftovers_in_tmp_are_cleaned_and_fresh_writes_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let tmp = dir.path().join("tmp");
        let old = SystemTime::now() - std::time::Duration::from_secs(2 * 3600);
        for name in [".tmpAbC123", "0123456789ab-Xy12Zq.tar"] {
            let f = File::create(tmp.join(name)).unwrap();
            f.set_modified(old).unwrap();
        }
        // A tree being saved right now by another process.
        File::create(tmp.join(".tmpNow123")).unwrap();
        // A layer being fetched: its lock is held.
        let busy = "fedcba987654";
        File::create(tmp.join(format!("{busy}-Qw12Er.blob"))).unwrap();
        let lock = cache
            .lock_file(&format!("{busy}{}", "0".repeat(52)))
            .unwrap();
        lock.lock().unwrap();
        cache.clean_tmp();
        let mut left: Vec<_> = fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".tmpNow123", "fedcba987654-Qw12Er.blob"]);
    }

    #[test]
    fn a_cache_directory_others_can_write_is_refused_naming_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("c");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        let Err(e) = Cache::open(&root, u64::MAX) else {
            panic!("opened");
        };
        let e = e.to_string();
        assert!(
            e.contains(&root.display().to_string()) && e.contains("refused"),
            "{e}"
        );
        assert!(!root.join("tmp").exists(), "nothing made in it");
    }

    /// A layer's index file, and what it indexes.
    fn idx_sample() -> (tempfile::TempDir, Cache, LayerDesc, Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), u64::MAX).unwrap();
        let blob = gzip(&tar_of(&[
            ("etc/os-release", b"NAME=test\n"),
            ("bin/sh", b"#!"),
        ]));
        let d = desc(&blob);
        cache
            .ensure_layer(&d, "r", u64::MAX, serve(blob.clone()))
            .unwrap();
        let idx = fs::read(cache.paths(d.digest.hex()).2).unwrap();
        (dir, cache, d, blob, idx)
    }

    /// Puts `bytes` in place of the layer's index and opens the layer: it is
    /// rebuilt, or its index reads as an error or as an index. (The index
    /// file carries no checksum of its own: a flipped bit in a name is read
    /// as that name; what the fuzz proves is no panic and a bounded answer.)
    fn open_with_idx(
        cache: &Cache,
        d: &LayerDesc,
        blob: &[u8],
        sound: &LayerIndex,
        bytes: &[u8],
    ) -> Result<(), String> {
        fs::write(cache.paths(d.digest.hex()).2, bytes).unwrap();
        let Ok(layer) = cache.ensure_layer(d, "r", u64::MAX, serve(blob.to_vec())) else {
            return Ok(());
        };
        match layer.index() {
            Ok(i) if i.entries.len() > sound.entries.len() + 64 => {
                Err(format!("{} entries read", i.entries.len()))
            }
            _ => Ok(()),
        }
    }

    #[test]
    fn damaged_index_files_are_rebuilt_or_refused_without_a_panic() {
        use proptest::test_runner::{Config, TestRunner};
        let (_dir, cache, d, blob, idx) = idx_sample();
        let sound = cache
            .ensure_layer(&d, "r", u64::MAX, serve(blob.clone()))
            .unwrap()
            .index()
            .unwrap();
        let mut runner = TestRunner::new(Config::with_cases(300));
        runner
            .run(&crate::fuzzing::damage(), |damage| {
                open_with_idx(&cache, &d, &blob, &sound, &damage.apply(&idx))
                    .map_err(proptest::test_runner::TestCaseError::fail)
            })
            .unwrap();
    }

    #[test]
    fn the_index_file_corpus_is_rebuilt_or_refused_without_a_panic() {
        let (_dir, cache, d, blob, idx) = idx_sample();
        let sound = cache
            .ensure_layer(&d, "r", u64::MAX, serve(blob.clone()))
            .unwrap()
            .index()
            .unwrap();
        for (name, bytes) in crate::fuzzing::corpus("idx", &[("sound", idx)]) {
            open_with_idx(&cache, &d, &blob, &sound, &bytes)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
