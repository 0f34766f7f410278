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
//! - `tmp/`: files being written, renamed into place when done.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use flate2::bufread::MultiGzDecoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::layer::{self, Compression, LayerError, LayerIndex};
use crate::registry::{LayerDesc, RegistryError};

/// A layer whose bytes fail their digest is downloaded again from the start
/// this many times before the error.
const REFETCHES: u32 = 2;

/// Bumped whenever the index format changes, so old indexes are rebuilt.
const INDEX_VERSION: u32 = 4;
const IO_BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {digest}: download failed: {detail}")]
    Fetch { digest: String, detail: String },
    #[error(
        "layer {digest}: downloaded content does not match the digest (got {actual}; downloaded {tries} times)"
    )]
    Corrupt {
        digest: String,
        actual: String,
        tries: u32,
    },
    #[error(
        "layer {digest} inflates past {limit} bytes (the cache size or --max-layer-size); refused"
    )]
    TooLarge { digest: String, limit: u64 },
    #[error(
        "layer {digest}: uncompressed content hashes to {actual}, but the image config says {expected}"
    )]
    DiffId {
        digest: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Layer(#[from] LayerError),
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

/// Feeds everything `r` yields to `h`; returns how many bytes.
pub(crate) fn hash_into(r: &mut impl Read, h: &mut Sha256) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

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
    digest: String,
    diff_id: String,
    blob_size: u64,
    tar_size: u64,
}

/// Enough of an index file to hold the header.
const HEADER_MAX: usize = 512;

/// A cached layer, open for reading. While it lives, it holds a shared lock
/// that keeps other processes from evicting it.
pub struct Layer {
    pub digest: String,
    pub diff_id: String,
    idx_path: PathBuf,
    tar: File,
    /// Where the layer's tar starts in `tar`: 0 for the cache's own copy, the
    /// member's offset for a layer read in place from an archive.
    base: u64,
    _in_use: File,
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
        self.tar.read_at(buf, self.base + offset)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CachedLayer {
    pub digest: String,
    pub blob_size: u64,
    pub tar_size: u64,
    /// Seconds since the epoch.
    pub last_use: i64,
    pub images: Vec<String>,
}

/// One layer's result from [`Cache::verify`].
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub digest: String,
    /// What is wrong, or `None` when the layer is intact.
    pub problem: Option<String>,
    /// Removed (it was corrupt and no mount was using it).
    pub removed: bool,
}

pub struct Cache {
    root: PathBuf,
    limit: u64,
}

/// Copies everything read through it to `out`, hashing and counting it.
struct Tee<R, W> {
    inner: R,
    out: W,
    hasher: Option<Sha256>,
    count: u64,
    limit: u64,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other(TooLargeMarker));
        }
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[derive(Debug)]
struct TooLargeMarker;
impl std::fmt::Display for TooLargeMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("size limit reached")
    }
}
impl std::error::Error for TooLargeMarker {}

fn hex_of(digest: &str) -> Result<&str, CacheError> {
    match digest.split_once(':') {
        Some(("sha256", hex)) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(hex)
        }
        _ => Err(CacheError::BadDigest(digest.to_string())),
    }
}

fn mtime_secs(meta: &fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64)
}

impl Cache {
    pub fn open(root: &Path, limit: u64) -> Result<Cache, CacheError> {
        for sub in ["blobs/sha256", "layers/sha256", "locks", "tmp"] {
            let dir = root.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err(&dir))?;
        }
        Ok(Cache {
            root: root.to_path_buf(),
            limit,
        })
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
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))
    }

    /// The original blob of a cached layer.
    pub fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = hex_of(digest).ok()?;
        let (blob, _, idx) = self.paths(hex);
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
        if let Ok(f) = File::options().write(true).open(&idx_path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Ok(Some(Layer {
            digest: file.digest,
            diff_id: file.diff_id,
            idx_path,
            tar,
            base: 0,
            _in_use: in_use,
        }))
    }

    fn note_image(&self, hex: &str, image_ref: &str) {
        let path = self.root.join("layers/sha256").join(format!("{hex}.refs"));
        let known = fs::read_to_string(&path).unwrap_or_default();
        if !known.lines().any(|l| l == image_ref)
            && let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&path)
        {
            let _ = writeln!(f, "{image_ref}");
        }
    }

    /// The layer `desc`, from the cache or fetched with `open_blob` now.
    ///
    /// `open_blob` must return a reader that fails instead of reaching
    /// end-of-file when the blob does not match its digest (as
    /// `registry::BlobReader` does): nothing is published before that end.
    pub fn ensure_layer<F>(
        &self,
        desc: &LayerDesc,
        image_ref: &str,
        max_layer_size: u64,
        mut open_blob: F,
    ) -> Result<Arc<Layer>, CacheError>
    where
        F: FnMut() -> Result<Box<dyn Read + Send>, Box<dyn std::error::Error + Send + Sync>>,
    {
        let hex = hex_of(&desc.digest)?.to_string();
        let want = desc.diff_id.as_deref();
        let lock = self.lock_file(&hex)?;
        let lock_path = self.root.join("locks").join(format!("{hex}.lock"));
        // Shared first: the common case is a layer that is already here.
        lock.lock_shared().map_err(io_err(&lock_path))?;
        if let Some(l) = self.load(&hex, want, lock.try_clone().map_err(io_err(&lock_path))?)? {
            self.note_image(&hex, image_ref);
            return Ok(Arc::new(l));
        }
        lock.unlock().map_err(io_err(&lock_path))?;
        // Exclusive while fetching. Never wait for it blindly: flock lets new
        // shared locks past a waiting exclusive one, so a process (or a
        // thread of this one: each handle locks on its own) that fetched
        // the layer and now uses it would keep a waiter out forever. While
        // the lock is taken, wait for shared instead (that waits out a fetch
        // in progress) and look again.
        let mut waited = std::time::Duration::ZERO;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
            }
            lock.lock_shared().map_err(io_err(&lock_path))?;
            if let Some(l) = self.load(&hex, want, lock.try_clone().map_err(io_err(&lock_path))?)? {
                self.note_image(&hex, image_ref);
                return Ok(Arc::new(l));
            }
            lock.unlock().map_err(io_err(&lock_path))?;
            // In use by someone, yet not loadable: damaged under a mount.
            if waited > IN_USE_WAIT {
                return Err(CacheError::Io {
                    path: lock_path.display().to_string(),
                    source: io::Error::other(
                        "the layer is in use by another mount but unreadable here; unmount it and retry",
                    ),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            waited += std::time::Duration::from_millis(50);
        }
        let result: Result<(), CacheError> = (|| {
            if self
                .load(&hex, want, lock.try_clone().map_err(io_err(&lock_path))?)?
                .is_some()
            {
                return Ok(());
            }
            let mut tries = 0;
            loop {
                tries += 1;
                match self.fetch(desc, &hex, max_layer_size, &mut open_blob) {
                    Err(CacheError::Corrupt { .. }) if tries <= REFETCHES => {
                        tracing::warn!(
                            "layer {}: downloaded content does not match the digest; downloading it again",
                            desc.digest
                        );
                    }
                    Err(CacheError::Corrupt { digest, actual, .. }) => {
                        return Err(CacheError::Corrupt {
                            digest,
                            actual,
                            tries,
                        });
                    }
                    other => return other,
                }
            }
        })();
        // Back to shared: in use from here on.
        lock.unlock().map_err(io_err(&lock_path))?;
        result?;
        lock.lock_shared().map_err(io_err(&lock_path))?;
        let layer = self.load(&hex, want, lock)?.ok_or_else(|| CacheError::Io {
            path: self.paths(&hex).2.display().to_string(),
            source: io::Error::other("evicted right after it was fetched"),
        })?;
        self.note_image(&hex, image_ref);
        if let Err(e) = self.evict(self.limit) {
            tracing::warn!("cache eviction: {e}");
        }
        Ok(Arc::new(layer))
    }

    /// One streaming pass: the blob is copied aside as it arrives, inflated,
    /// written out as a tar and indexed; files are renamed into place, index
    /// last, only after the stream ended cleanly.
    fn fetch<F>(
        &self,
        desc: &LayerDesc,
        hex: &str,
        max: u64,
        open_blob: &mut F,
    ) -> Result<(), CacheError>
    where
        F: FnMut() -> Result<Box<dyn Read + Send>, Box<dyn std::error::Error + Send + Sync>>,
    {
        let digest = &desc.digest;
        let tmp_dir = self.root.join("tmp");
        let tmp = |suffix: &str| {
            tempfile::Builder::new()
                .prefix(&format!("{}-", &hex[..12]))
                .suffix(suffix)
                .tempfile_in(&tmp_dir)
                .map_err(io_err(&tmp_dir))
        };
        let blob_tmp = tmp(".blob")?;
        let tar_tmp = tmp(".tar")?;
        let idx_tmp = tmp(".idx")?;
        let reader = open_blob().map_err(|e| CacheError::Fetch {
            digest: digest.clone(),
            detail: e.to_string(),
        })?;
        let fetch_err = |e: io::Error| CacheError::Fetch {
            digest: digest.clone(),
            detail: e.to_string(),
        };
        let mut compressed = Tee {
            inner: reader,
            out: BufWriter::with_capacity(IO_BUFFER, blob_tmp.as_file()),
            hasher: None,
            count: 0,
            limit: u64::MAX,
        };
        let mut head = Vec::with_capacity(512);
        (&mut compressed)
            .take(512)
            .read_to_end(&mut head)
            .map_err(|e| classify(e, digest, max))?;
        let compression = layer::detect(digest, &desc.media_type, &head)?;
        let mut source =
            io::BufReader::with_capacity(IO_BUFFER, io::Cursor::new(head).chain(&mut compressed));
        let decoder: Box<dyn Read + '_> = match compression {
            Compression::Gzip => Box::new(MultiGzDecoder::new(&mut source)),
            Compression::Zstd => {
                Box::new(zstd::Decoder::with_buffer(&mut source).map_err(fetch_err)?)
            }
            Compression::None => Box::new(&mut source),
        };
        let mut plain = Tee {
            inner: decoder,
            out: BufWriter::with_capacity(IO_BUFFER, tar_tmp.as_file()),
            hasher: Some(Sha256::new()),
            count: 0,
            limit: max,
        };
        let indexed = layer::index_tar(&mut plain, digest);
        let index = match indexed {
            Ok(i) => i,
            Err(e) => {
                let err = match e {
                    LayerError::Io { source, .. } => classify(source, digest, max),
                    other => other.into(),
                };
                if matches!(
                    err,
                    CacheError::TooLarge { .. } | CacheError::Corrupt { .. }
                ) {
                    return Err(err);
                }
                // Bytes damaged on the way show as a bad gzip or tar stream
                // before the digest fails at the end: reading the rest (at
                // most the size the manifest states) tells the two apart.
                drop(plain);
                if let Err(e) = io::copy(&mut source, &mut io::sink())
                    && let c @ CacheError::Corrupt { .. } = classify(e, digest, max)
                {
                    return Err(c);
                }
                return Err(err);
            }
        };
        let tar_size = plain.count;
        let diff_id = format!(
            "sha256:{}",
            hex::encode(plain.hasher.take().expect("hasher").finalize())
        );
        plain.out.flush().map_err(io_err(tar_tmp.path()))?;
        drop(plain);
        // Whatever trails the compressed stream still belongs to the blob.
        io::copy(&mut source, &mut io::sink()).map_err(|e| classify(e, digest, max))?;
        drop(source);
        // Only now is the blob known to be what its digest says, so a
        // diff_id mismatch is the config's, not the network's.
        if let Some(expected) = &desc.diff_id
            && *expected != diff_id
        {
            return Err(CacheError::DiffId {
                digest: digest.clone(),
                expected: expected.clone(),
                actual: diff_id,
            });
        }
        compressed.out.flush().map_err(io_err(blob_tmp.path()))?;
        let blob_size = compressed.count;
        drop(compressed);

        let header = IndexHeader {
            version: INDEX_VERSION,
            digest: digest.clone(),
            diff_id,
            blob_size,
            tar_size,
        };
        let encode = |e: postcard::Error| io_err(idx_tmp.path())(io::Error::other(e));
        let mut bytes = postcard::to_stdvec(&header).map_err(encode)?;
        bytes.extend(postcard::to_stdvec(&index).map_err(encode)?);
        idx_tmp
            .as_file()
            .write_all(&bytes)
            .map_err(io_err(idx_tmp.path()))?;
        // Durable before visible: a crash never leaves an index naming missing bytes.
        for f in [&blob_tmp, &tar_tmp, &idx_tmp] {
            f.as_file().sync_data().map_err(io_err(f.path()))?;
        }
        let (blob_path, tar_path, idx_path) = self.paths(hex);
        blob_tmp
            .persist(&blob_path)
            .map_err(|e| io_err(&blob_path)(e.error))?;
        tar_tmp
            .persist(&tar_path)
            .map_err(|e| io_err(&tar_path)(e.error))?;
        idx_tmp
            .persist(&idx_path)
            .map_err(|e| io_err(&idx_path)(e.error))?;
        Ok(())
    }

    /// The layer `desc`, an uncompressed tar of `size` bytes at `offset` in
    /// `archive`, read in place: nothing is copied. It is indexed once while
    /// its digest is checked, and the index kept under a key of the digest and
    /// the archive's identity (device, inode, size, change time, offset), so an
    /// archive changed since is indexed again. A copy the cache already holds
    /// is used instead.
    pub fn ensure_layer_in_place(
        &self,
        desc: &LayerDesc,
        image_ref: &str,
        archive: &File,
        offset: u64,
        size: u64,
    ) -> Result<Arc<Layer>, CacheError> {
        use std::os::unix::fs::MetadataExt;
        let hex = hex_of(&desc.digest)?.to_string();
        let lock = self.lock_file(&hex)?;
        let lock_path = self.root.join("locks").join(format!("{hex}.lock"));
        lock.lock_shared().map_err(io_err(&lock_path))?;
        let want = desc.diff_id.as_deref();
        if let Some(l) = self.load(&hex, want, lock.try_clone().map_err(io_err(&lock_path))?)? {
            self.note_image(&hex, image_ref);
            return Ok(Arc::new(l));
        }
        let dir = self.root.join("inplace");
        let meta = archive.metadata().map_err(io_err(&dir))?;
        let identity = format!(
            "{hex} {} {} {} {}.{} {offset} {size}",
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.ctime(),
            meta.ctime_nsec()
        );
        let key = hex::encode(Sha256::digest(identity.as_bytes()));
        // Named by the layer first, so clearing the cache can find its lock.
        let idx_path = dir.join(format!("{hex}-{}.idx", &key[..16]));
        let layer = |diff_id: String, tar: File| Layer {
            digest: desc.digest.clone(),
            diff_id,
            idx_path: idx_path.clone(),
            tar,
            base: offset,
            _in_use: lock,
        };
        let tar = archive.try_clone().map_err(io_err(&idx_path))?;
        let mut head = Vec::with_capacity(HEADER_MAX);
        if File::open(&idx_path)
            .and_then(|f| f.take(HEADER_MAX as u64).read_to_end(&mut head))
            .is_ok()
            && let Ok((h, _)) = postcard::take_from_bytes::<IndexHeader>(&head)
            && h.version == INDEX_VERSION
            && h.digest == desc.digest
            && h.tar_size == size
        {
            return Ok(Arc::new(layer(h.diff_id, tar)));
        }
        // Indexed from the archive while hashed; published only if the hash is the digest.
        let mut plain = Tee {
            inner: Section {
                file: archive,
                pos: offset,
                end: offset + size,
            },
            out: io::sink(),
            hasher: Some(Sha256::new()),
            count: 0,
            limit: u64::MAX,
        };
        let index = match layer::index_tar(&mut plain, &desc.digest) {
            Ok(i) => i,
            Err(LayerError::Io { source, .. }) => {
                return Err(classify(source, &desc.digest, u64::MAX));
            }
            Err(e) => return Err(e.into()),
        };
        let actual = format!(
            "sha256:{}",
            hex::encode(plain.hasher.take().expect("hasher").finalize())
        );
        if actual != desc.digest || plain.count != size {
            return Err(CacheError::Digest { actual });
        }
        let header = IndexHeader {
            version: INDEX_VERSION,
            digest: desc.digest.clone(),
            diff_id: actual.clone(),
            blob_size: size,
            tar_size: size,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let encode = |e: postcard::Error| io_err(&idx_path)(io::Error::other(e));
        let mut bytes = postcard::to_stdvec(&header).map_err(encode)?;
        bytes.extend(postcard::to_stdvec(&index).map_err(encode)?);
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp")).map_err(io_err(&dir))?;
        tmp.as_file()
            .write_all(&bytes)
            .map_err(io_err(tmp.path()))?;
        tmp.persist(&idx_path)
            .map_err(|e| io_err(&idx_path)(e.error))?;
        Ok(Arc::new(layer(actual, tar)))
    }

    fn tree_path(&self, image_digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self
            .root
            .join("trees")
            .join(format!("{}.v{TREE_FORMAT}.tree", hex_of(image_digest)?)))
    }

    /// A merged tree saved for the image with manifest `image_digest`, so a
    /// warm mount neither reads layer indexes nor merges them again.
    pub fn load_tree<T: serde::de::DeserializeOwned>(&self, image_digest: &str) -> Option<T> {
        // Decoded from a buffered reader, not from the whole file in memory,
        // so the file and the tree never both count against peak memory.
        let file = File::open(self.tree_path(image_digest).ok()?).ok()?;
        let mut scratch = vec![0u8; 64 * 1024];
        let reader = io::BufReader::with_capacity(IO_BUFFER, file);
        let (version, (reader, scratch)) =
            postcard::from_io::<u32, _>((reader, &mut scratch)).ok()?;
        if version != INDEX_VERSION {
            return None;
        }
        postcard::from_io::<T, _>((reader, scratch))
            .ok()
            .map(|(t, _)| t)
    }

    /// Whether a merged tree is saved for the image.
    pub fn has_tree(&self, image_digest: &str) -> bool {
        self.tree_path(image_digest).is_ok_and(|p| p.exists())
    }

    pub fn store_tree<T: Serialize>(&self, image_digest: &str, tree: &T) -> Result<(), CacheError> {
        let path = self.tree_path(image_digest)?;
        let dir = self.root.join("trees");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let encode = |e: postcard::Error| io_err(&path)(io::Error::other(e));
        let mut bytes = postcard::to_stdvec(&INDEX_VERSION).map_err(encode)?;
        bytes.extend(postcard::to_stdvec(tree).map_err(encode)?);
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp")).map_err(io_err(&dir))?;
        tmp.as_file()
            .write_all(&bytes)
            .map_err(io_err(tmp.path()))?;
        tmp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
        Ok(())
    }

    /// Cached layers, least recently used first.
    pub fn list(&self) -> Result<Vec<CachedLayer>, CacheError> {
        let dir = self.root.join("layers/sha256");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".idx") else {
                continue;
            };
            let Ok(meta) = e.metadata() else { continue };
            let (blob, tar, _) = self.paths(hex);
            let size = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
            let refs = fs::read_to_string(dir.join(format!("{hex}.refs"))).unwrap_or_default();
            out.push(CachedLayer {
                digest: format!("sha256:{hex}"),
                blob_size: size(&blob),
                tar_size: size(&tar),
                last_use: mtime_secs(&meta),
                images: refs.lines().map(str::to_string).collect(),
            });
        }
        out.sort_by_key(|l| l.last_use);
        Ok(out)
    }

    /// Re-hashes every cached layer: the blob against its digest, the tar
    /// against its diff_id (and the size its index states). Corrupt layers
    /// are removed, so the next use fetches them again; layers in use by a
    /// mount are checked but left in place.
    pub fn verify(&self) -> Result<Vec<Verified>, CacheError> {
        let mut out = Vec::new();
        for l in self.list()? {
            let hex = hex_of(&l.digest)?.to_string();
            let lock = self.lock_file(&hex)?;
            let in_use = lock.try_lock().is_err();
            let problem = self.check_layer(&hex)?;
            let removed = problem.is_some() && !in_use;
            if removed {
                self.remove_layer(&hex);
            }
            out.push(Verified {
                digest: l.digest,
                problem,
                removed,
            });
        }
        Ok(out)
    }

    /// What is wrong with a cached layer, if anything.
    fn check_layer(&self, hex: &str) -> Result<Option<String>, CacheError> {
        let (blob, tar, idx) = self.paths(hex);
        let header = match read_index_header(&idx)? {
            None => return Ok(None),
            Some(Ok(h)) => h,
            Some(Err(())) => return Ok(Some("unreadable index".into())),
        };
        let hash = |p: &Path| -> Result<Option<(String, u64)>, CacheError> {
            let mut f = match File::open(p) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(p)(e)),
            };
            let mut h = Sha256::new();
            let n = hash_into(&mut f, &mut h).map_err(io_err(p))?;
            Ok(Some((format!("sha256:{}", hex::encode(h.finalize())), n)))
        };
        match hash(&blob)? {
            None => return Ok(Some("blob missing".into())),
            Some((d, _)) if d != header.digest => {
                return Ok(Some(format!("blob hashes to {d}")));
            }
            _ => {}
        }
        match hash(&tar)? {
            None => Ok(Some("uncompressed tar missing".into())),
            Some((_, n)) if n != header.tar_size => Ok(Some(format!(
                "uncompressed tar has {n} bytes, its index says {}",
                header.tar_size
            ))),
            Some((d, _)) if d != header.diff_id => Ok(Some(format!(
                "uncompressed tar hashes to {d}, not its diff_id {}",
                header.diff_id
            ))),
            _ => Ok(None),
        }
    }

    /// Removes a layer's files, index first: once it is gone, nothing
    /// trusts the rest. Saved trees point into layers; they are cheap to
    /// rebuild.
    fn remove_layer(&self, hex: &str) {
        let (blob, tar, idx) = self.paths(hex);
        for p in [
            idx,
            tar,
            blob,
            self.root.join("layers/sha256").join(format!("{hex}.refs")),
        ] {
            let _ = fs::remove_file(p);
        }
        let _ = fs::remove_dir_all(self.root.join("trees"));
    }

    /// Evicts least recently used layers until the cache holds at most `limit`
    /// bytes, skipping layers in use. Returns the bytes freed.
    pub fn prune(&self, limit: u64) -> Result<u64, CacheError> {
        self.evict(limit)
    }

    fn evict(&self, limit: u64) -> Result<u64, CacheError> {
        // Least recently used first: `list` sorts by last use.
        let layers = self.list()?;
        let mut total: u64 = layers.iter().map(|l| l.blob_size + l.tar_size).sum();
        let mut freed = 0;
        let mut busy = Vec::new();
        for l in &layers {
            if total <= limit {
                break;
            }
            let (digest, bytes) = (l.digest.clone(), l.blob_size + l.tar_size);
            let hex = hex_of(&digest)?.to_string();
            let lock = self.lock_file(&hex)?;
            if lock.try_lock().is_err() {
                busy.push(digest);
                continue;
            }
            self.remove_layer(&hex);
            total -= bytes;
            freed += bytes;
            tracing::info!("evicted layer {digest} ({bytes} bytes)");
        }
        if total > limit && !busy.is_empty() {
            tracing::info!(
                "{} layers in use were kept although the cache is over its limit",
                busy.len()
            );
        }
        if limit == 0 {
            self.clear_in_place();
        }
        self.clean_tmp();
        Ok(freed)
    }

    /// Removes the indexes of layers read in place that no mount is using.
    fn clear_in_place(&self) {
        let Ok(entries) = fs::read_dir(self.root.join("inplace")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((hex, _)) = name.split_once('-') else {
                continue;
            };
            if let Ok(lock) = self.lock_file(hex)
                && lock.try_lock().is_ok()
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Removes temporary files that no process is writing (left by a crash).
    fn clean_tmp(&self) {
        let dir = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(prefix) = name.get(..12) else {
                continue;
            };
            // A fetch in progress holds the exclusive lock of its layer.
            let busy = fs::read_dir(self.root.join("locks"))
                .ok()
                .into_iter()
                .flatten()
                .flatten()
                .filter(|l| l.file_name().to_string_lossy().starts_with(prefix))
                .any(|l| File::open(l.path()).is_ok_and(|f| f.try_lock().is_err()));
            if !busy {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// A section of a file, read with `pread`; a file that ends before the
/// section does is an error. Borrowed or shared, as the caller holds it.
pub(crate) struct Section<F> {
    pub(crate) file: F,
    pub(crate) pos: u64,
    pub(crate) end: u64,
}

impl<F: std::borrow::Borrow<File>> Read for Section<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.end - self.pos).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.borrow().read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside the member",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Turns the size-limit marker and a digest mismatch of the download back
/// into their own errors.
fn classify(e: io::Error, digest: &str, limit: u64) -> CacheError {
    let inner = e.get_ref();
    let too_large = inner.is_some_and(|inner| inner.is::<TooLargeMarker>());
    if let Some(RegistryError::Digest { actual, .. }) =
        inner.and_then(|i| i.downcast_ref::<RegistryError>())
    {
        return CacheError::Corrupt {
            digest: digest.to_string(),
            actual: actual.clone(),
            tries: 1,
        };
    }
    if too_large {
        CacheError::TooLarge {
            digest: digest.to_string(),
            limit,
        }
    } else {
        CacheError::Fetch {
            digest: digest.to_string(),
            detail: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            digest: format!("sha256:{}", hex::encode(Sha256::digest(blob))),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            size: blob.len() as u64,
            urls: vec![],
            diff_id: None,
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
        let hex = hex_of(&d.digest).unwrap().to_string();
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
        assert!(err.to_string().contains(&d.digest), "{err}");
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
        assert!(err.to_string().contains(&d.digest), "{err}");
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
            .join(format!("{}.tar", hex_of(&digests[0].digest).unwrap()));
        let mut bytes = fs::read(&tar).unwrap();
        bytes[600] ^= 1;
        fs::write(&tar, bytes).unwrap();
        let report = cache.verify().unwrap();
        let bad: Vec<_> = report.iter().filter(|v| v.problem.is_some()).collect();
        assert_eq!(bad.len(), 1, "{report:?}");
        assert_eq!(bad[0].digest, digests[0].digest);
        assert!(bad[0].removed);
        assert!(bad[0].problem.as_ref().unwrap().contains("diff_id"));
        let left: Vec<String> = cache
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
            let idx = cache.paths(hex_of(&d.digest).unwrap()).2;
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
        let left: Vec<String> = cache
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
}
