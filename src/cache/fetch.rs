//! Getting a layer into the cache: the one streaming pass that copies the
//! blob aside, inflates, writes and indexes it, under the per-layer lock;
//! and layers indexed in place in a local archive.
//!
//! The pass is a pipeline of stages, each its own function: [`sniff`] the
//! compression, [`inflate_and_index`] (tee the tar aside while hashing it,
//! under the size limit), then [`Staged::publish`] (fsync, rename, index last).

use crate::digest::Digest;
use crate::layer::{self, Compression, LayerError, LayerIndex};
use crate::registry::LayerDesc;
use flate2::bufread::MultiGzDecoder;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use tempfile::NamedTempFile;

use super::*;

/// Why a layer's blob stream could not be opened; see [`Cache::ensure_layer`].
type BlobError = Box<dyn std::error::Error + Send + Sync>;

impl Cache {
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
        F: FnMut() -> Result<Box<dyn Read + Send>, BlobError>,
    {
        let hex = desc.digest.hex();
        let want = desc.diff_id.as_deref();
        let lock = self.lock_file(hex)?;
        let lock_path = self.root.join("locks").join(format!("{hex}.lock"));
        let loaded = |lock: &File| -> Result<Option<Arc<Layer>>, CacheError> {
            let handle = lock.try_clone().map_err(io_err(&lock_path))?;
            Ok(self.load(hex, want, handle)?.map(|l| {
                self.note_image(hex, image_ref);
                Arc::new(l)
            }))
        };
        // Shared first: the common case is a layer that is already here.
        lock.lock_shared().map_err(io_err(&lock_path))?;
        if let Some(l) = loaded(&lock)? {
            return Ok(l);
        }
        lock.unlock().map_err(io_err(&lock_path))?;
        if let Some(l) = self.lock_exclusive(&lock, &lock_path, loaded)? {
            return Ok(l);
        }
        let result = self.fetch_verified(desc, hex, want, &lock, max_layer_size, &mut open_blob);
        // Back to shared: in use from here on.
        lock.unlock().map_err(io_err(&lock_path))?;
        result?;
        lock.lock_shared().map_err(io_err(&lock_path))?;
        let layer = self.load(hex, want, lock)?.ok_or_else(|| CacheError::Io {
            path: self.paths(hex).2.display().to_string(),
            source: io::Error::other("evicted right after it was fetched"),
        })?;
        self.note_image(hex, image_ref);
        if let Err(e) = self.evict(self.limit) {
            tracing::warn!("cache eviction: {}", crate::report::Chain(&e));
        }
        Ok(Arc::new(layer))
    }

    /// Takes `lock` exclusively, or returns the layer if another holder
    /// published it meanwhile. Never waits for the exclusive lock blindly:
    /// flock lets new shared locks past a waiting exclusive one, so a process
    /// (or a thread of this one: each handle locks on its own) that fetched
    /// the layer and now uses it would keep a waiter out forever. While the
    /// lock is taken, waits for shared instead (that waits out a fetch in
    /// progress) and looks again.
    fn lock_exclusive(
        &self,
        lock: &File,
        lock_path: &Path,
        loaded: impl Fn(&File) -> Result<Option<Arc<Layer>>, CacheError>,
    ) -> Result<Option<Arc<Layer>>, CacheError> {
        let step = std::time::Duration::from_millis(50);
        let mut waited = std::time::Duration::ZERO;
        loop {
            match lock.try_lock() {
                Ok(()) => return Ok(None),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err(lock_path)(e)),
            }
            lock.lock_shared().map_err(io_err(lock_path))?;
            if let Some(l) = loaded(lock)? {
                return Ok(Some(l));
            }
            lock.unlock().map_err(io_err(lock_path))?;
            // In use by someone, yet not loadable: damaged under a mount.
            if waited > IN_USE_WAIT {
                return Err(CacheError::Io {
                    path: lock_path.display().to_string(),
                    source: io::Error::other(
                        "the layer is in use by another mount but unreadable here; unmount it and retry",
                    ),
                });
            }
            std::thread::sleep(step);
            waited += step;
        }
    }

    /// Under the exclusive lock: fetches the layer unless a previous holder
    /// did, downloading again a blob whose bytes fail their digest.
    fn fetch_verified<F>(
        &self,
        desc: &LayerDesc,
        hex: &str,
        want: Option<&str>,
        lock: &File,
        max: u64,
        open_blob: &mut F,
    ) -> Result<(), CacheError>
    where
        F: FnMut() -> Result<Box<dyn Read + Send>, BlobError>,
    {
        let lock_path = self.root.join("locks").join(format!("{hex}.lock"));
        let handle = lock.try_clone().map_err(io_err(&lock_path))?;
        if self.load(hex, want, handle)?.is_some() {
            return Ok(());
        }
        let mut tries = 0;
        loop {
            tries += 1;
            match self.fetch(desc, max, open_blob) {
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
    }

    /// One streaming pass: the blob is copied aside as it arrives, inflated,
    /// written out as a tar and indexed; files are renamed into place, index
    /// last, only after the stream ended cleanly.
    pub(super) fn fetch<F>(
        &self,
        desc: &LayerDesc,
        max: u64,
        open_blob: &mut F,
    ) -> Result<(), CacheError>
    where
        F: FnMut() -> Result<Box<dyn Read + Send>, BlobError>,
    {
        let digest = &desc.digest;
        let staged = Staged::new(self, digest)?;
        let reader = open_blob().map_err(|source| CacheError::Fetch {
            digest: digest.clone(),
            source,
        })?;
        let mut compressed = Tee::new(
            reader,
            BufWriter::with_capacity(IO_BUFFER, staged.blob.as_file()),
            u64::MAX,
        );
        let (compression, head) = sniff(&mut compressed, desc)?;
        let mut source =
            io::BufReader::with_capacity(IO_BUFFER, io::Cursor::new(head).chain(&mut compressed));
        let inflated = inflate_and_index(&mut source, compression, digest, max, &staged.tar);
        let (mut index, tar_size, hasher) = match inflated {
            Ok(done) => done,
            Err(err)
                if matches!(
                    err,
                    CacheError::TooLarge { .. } | CacheError::Corrupt { .. }
                ) =>
            {
                return Err(err);
            }
            Err(err) => {
                // Bytes damaged on the way show as a bad gzip or tar stream
                // before the digest fails at the end: reading the rest (at
                // most the size the manifest states) tells the two apart.
                if let Err(e) = io::copy(&mut source, &mut io::sink())
                    && let c @ CacheError::Corrupt { .. } = classify(e, digest)
                {
                    return Err(c);
                }
                return Err(err);
            }
        };
        // Whatever trails the compressed stream still belongs to the blob.
        io::copy(&mut source, &mut io::sink()).map_err(|e| classify(e, digest))?;
        drop(source);
        // Only now is the blob known to be what its digest says, so a
        // diff_id mismatch is the config's, not the network's.
        compressed.out.flush().map_err(io_err(staged.blob.path()))?;
        let (diff_id, tar_size) =
            self.verify_diff_id(desc, compression, &staged, hasher, tar_size)?;
        // eStargz's own files are format, not content: not shown, as
        // stargz-snapshotter does not show them, however the layer is read.
        if compression == Compression::Gzip {
            layer::toc::hide_estargz_files(&mut index);
        }
        let blob_size = compressed.count;
        drop(compressed);
        let header = IndexHeader {
            version: INDEX_VERSION,
            digest: digest.clone(),
            diff_id,
            blob_size,
            tar_size,
        };
        staged.publish(self, &header, &index)
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
        let hex = desc.digest.hex();
        let lock = self.lock_file(hex)?;
        let lock_path = self.root.join("locks").join(format!("{hex}.lock"));
        lock.lock_shared().map_err(io_err(&lock_path))?;
        let want = desc.diff_id.as_deref();
        if let Some(l) = self.load(hex, want, lock.try_clone().map_err(io_err(&lock_path))?)? {
            self.note_image(hex, image_ref);
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
        let key = Digest::of_bytes(identity.as_bytes());
        // Named by the layer first, so clearing the cache can find its lock.
        let idx_path = dir.join(format!("{hex}-{}.idx", &key.hex()[..16]));
        let layer = |diff_id: String, tar: File| Layer {
            digest: desc.digest.clone(),
            diff_id,
            idx_path: idx_path.clone(),
            data: Data::Tar {
                file: tar,
                base: offset,
            },
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
        let section = Section {
            file: archive,
            pos: offset,
            end: offset + size,
        };
        let mut plain = Tee::new(section, io::sink(), u64::MAX);
        plain.hasher = Some(Digest::hasher());
        let index = match layer::index_tar(&mut plain, &desc.digest) {
            Ok(i) => i,
            Err(LayerError::Io { source, .. }) => {
                return Err(classify(source, &desc.digest));
            }
            Err(e) => return Err(e.into()),
        };
        let actual = Digest::from_hasher(plain.hasher.take().expect("hasher")).to_string();
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
        let bytes = encode_index(&header, &index).map_err(io_err(&idx_path))?;
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp")).map_err(io_err(&dir))?;
        tmp.as_file()
            .write_all(&bytes)
            .map_err(io_err(tmp.path()))?;
        tmp.persist(&idx_path)
            .map_err(|e| io_err(&idx_path)(e.error))?;
        Ok(Arc::new(layer(actual, tar)))
    }
}

impl Cache {
    /// The diff_id of the tar just written (`tar_size` bytes hashed by
    /// `hasher`), checked against the config's. Some zstd:chunked writers
    /// leave out the zeros that pad the tar to its record size, which the
    /// diff_id covers: the tar-split says how many, byte for byte; without
    /// one, only zeros to a record of some blocking factor are tried, and
    /// only a result that hashes to the diff_id (which then proves them).
    /// Restored padding is written to the tar. Returns the diff_id and the
    /// tar's size.
    fn verify_diff_id(
        &self,
        desc: &LayerDesc,
        compression: Compression,
        staged: &Staged,
        hasher: sha2::Sha256,
        tar_size: u64,
    ) -> Result<(String, u64), CacheError> {
        let digest = &desc.digest;
        let diff_id = Digest::from_hasher(hasher.clone()).to_string();
        let Some(expected) = desc.diff_id.as_ref().filter(|e| **e != diff_id) else {
            return Ok((diff_id, tar_size));
        };
        let pad = match compression {
            Compression::Zstd => self.tar_split_padding(desc, staged, tar_size)?,
            _ => None,
        };
        let padded = match pad {
            Some(p) => with_zeros(&hasher, p).filter(|(_, d)| d == expected),
            None if compression == Compression::Zstd => (1..=64u64)
                .map(|b| (b * 512 - tar_size % (b * 512)) % (b * 512))
                .filter_map(|p| with_zeros(&hasher, p))
                .find(|(_, d)| d == expected),
            None => None,
        };
        let Some((pad, padded)) = padded else {
            return Err(CacheError::DiffId {
                digest: digest.clone(),
                expected: expected.clone(),
                actual: diff_id,
            });
        };
        use std::os::unix::fs::FileExt;
        staged
            .tar
            .as_file()
            .write_all_at(&vec![0u8; pad as usize], tar_size)
            .map_err(io_err(staged.tar.path()))?;
        tracing::info!(
            "layer {digest}: the zstd stream leaves out the tar's last {pad} zero bytes; restored, and the diff_id verified"
        );
        Ok((padded, tar_size + pad))
    }

    /// For a zstd:chunked layer whose tar-split the TOC pins: checks the
    /// tar-split against the stream just written (`tar_size` bytes) and
    /// returns how many zero bytes of padding it records past the stream's
    /// end. `None` without a tar-split the TOC pins; one that disagrees
    /// with the stream is an error (and distrusted for range reads).
    fn tar_split_padding(
        &self,
        desc: &LayerDesc,
        staged: &Staged,
        tar_size: u64,
    ) -> Result<Option<u64>, CacheError> {
        use crate::layer::toc::{self, TocLocation, tarsplit};
        use std::os::unix::fs::FileExt;
        let Some(TocLocation::Range {
            kind,
            offset,
            len,
            digest,
            tar_split: Some((ts_off, ts_len)),
            ..
        }) = toc::locate(&desc.media_type, &desc.annotations)
        else {
            return Ok(None);
        };
        let blob = staged.blob.as_file();
        let read = |at: u64, n: u64| -> Option<Vec<u8>> {
            if n > toc::TOC_MAX {
                return None;
            }
            let mut b = vec![0u8; n as usize];
            blob.read_exact_at(&mut b, at).ok().map(|()| b)
        };
        let refuse = |e: &(dyn std::error::Error + 'static)| {
            tracing::warn!("{}; the tar-split is not used", crate::report::Chain(e));
            self.distrust(&desc.digest, crate::cache::ranged::TARSPLIT);
        };
        let Some(bytes) = read(offset, len) else {
            return Ok(None);
        };
        let t = match toc::parse_at(kind, &bytes, Some(&digest), desc.size, offset, &desc.digest) {
            Ok(t) => t,
            Err(e) => {
                refuse(&e);
                return Ok(None);
            }
        };
        let (Some(pin), Some(split)) = (t.tar_split_digest, read(ts_off, ts_len)) else {
            return Ok(None);
        };
        let tar = staged.tar.as_file();
        let mut stream = |at: u64, b: &mut [u8]| tar.read_exact_at(b, at);
        let checked = tarsplit::open(&split, &pin, &desc.digest).and_then(|mut items| {
            tarsplit::check_against_stream(&mut items, tar_size, &mut stream, &desc.digest)
        });
        match checked {
            Ok(pad) => Ok(Some(pad)),
            Err(e) => {
                self.distrust(&desc.digest, crate::cache::ranged::TARSPLIT);
                Err(e.into())
            }
        }
    }
}

/// The diff_id of the tar hashed so far with `pad` zero bytes appended
/// (at most a MiB: tar padding is a record, not a payload).
fn with_zeros(hasher: &sha2::Sha256, pad: u64) -> Option<(u64, String)> {
    (pad > 0 && pad <= 1 << 20).then(|| {
        let mut h = hasher.clone();
        sha2::Digest::update(&mut h, vec![0u8; pad as usize]);
        (pad, Digest::from_hasher(h).to_string())
    })
}

/// Reads the blob's first bytes and tells its compression by them (or by
/// the media type); returns them, since they are part of the stream.
fn sniff(
    compressed: &mut impl Read,
    desc: &LayerDesc,
) -> Result<(Compression, Vec<u8>), CacheError> {
    let mut head = Vec::with_capacity(512);
    compressed
        .take(512)
        .read_to_end(&mut head)
        .map_err(|e| classify(e, &desc.digest))?;
    let compression = layer::detect(&desc.digest, &desc.media_type, &head)?;
    Ok((compression, head))
}

/// Inflates `source`, writing the tar to `tar_out` while hashing and
/// indexing it; refuses a tar larger than `max`. Returns the index, the
/// tar's size and its digest (the diff_id).
fn inflate_and_index(
    source: &mut impl io::BufRead,
    compression: Compression,
    digest: &Digest,
    max: u64,
    tar_out: &NamedTempFile,
) -> Result<(LayerIndex, u64, sha2::Sha256), CacheError> {
    let decoder: Box<dyn Read + '_> = match compression {
        Compression::Gzip => Box::new(MultiGzDecoder::new(source)),
        Compression::Zstd => {
            Box::new(
                zstd::Decoder::with_buffer(source).map_err(|e| CacheError::Fetch {
                    digest: digest.clone(),
                    source: Box::new(e),
                })?,
            )
        }
        Compression::None => Box::new(source),
    };
    let mut plain = Tee::new(
        decoder,
        BufWriter::with_capacity(IO_BUFFER, tar_out.as_file()),
        max,
    );
    plain.hasher = Some(Digest::hasher());
    let indexed = layer::index_tar(&mut plain, digest);
    // The limit is checked here, whatever error the cut-off stream caused.
    if plain.over_limit() {
        return Err(CacheError::TooLarge {
            digest: digest.clone(),
            limit: max,
        });
    }
    let index = indexed.map_err(|e| match e {
        LayerError::Io { source, .. } => classify(source, digest),
        other => other.into(),
    })?;
    plain.out.flush().map_err(io_err(tar_out.path()))?;
    let hasher = plain.hasher.take().expect("hasher");
    Ok((index, plain.count, hasher))
}

/// A layer's three files, written under `tmp/` and renamed into place.
struct Staged {
    blob: NamedTempFile,
    tar: NamedTempFile,
    idx: NamedTempFile,
}

impl Staged {
    fn new(cache: &Cache, digest: &Digest) -> Result<Staged, CacheError> {
        let tmp_dir = cache.root.join("tmp");
        let tmp = |suffix: &str| {
            tempfile::Builder::new()
                .prefix(&format!("{}-", digest.short()))
                .suffix(suffix)
                .tempfile_in(&tmp_dir)
                .map_err(io_err(&tmp_dir))
        };
        Ok(Staged {
            blob: tmp(".blob")?,
            tar: tmp(".tar")?,
            idx: tmp(".idx")?,
        })
    }

    /// Writes the index, makes all three durable, then renames them into
    /// place, index last: a crash never leaves an index naming missing bytes.
    fn publish(
        self,
        cache: &Cache,
        header: &IndexHeader,
        index: &LayerIndex,
    ) -> Result<(), CacheError> {
        let bytes = encode_index(header, index).map_err(io_err(self.idx.path()))?;
        self.idx
            .as_file()
            .write_all(&bytes)
            .map_err(io_err(self.idx.path()))?;
        for f in [&self.blob, &self.tar, &self.idx] {
            f.as_file().sync_data().map_err(io_err(f.path()))?;
        }
        let (blob_path, tar_path, idx_path) = cache.paths(header.digest.hex());
        for (f, to) in [
            (self.blob, blob_path),
            (self.tar, tar_path),
            (self.idx, idx_path),
        ] {
            f.persist(&to).map_err(|e| io_err(&to)(e.error))?;
        }
        Ok(())
    }
}

/// An index file's bytes: the header, then the index.
fn encode_index(header: &IndexHeader, index: &LayerIndex) -> io::Result<Vec<u8>> {
    let mut bytes = postcard::to_stdvec(header).map_err(io::Error::other)?;
    bytes.extend(postcard::to_stdvec(index).map_err(io::Error::other)?);
    Ok(bytes)
}
