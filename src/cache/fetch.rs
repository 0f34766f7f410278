//! Getting a layer into the cache: the one streaming pass that copies the
//! blob aside, inflates, writes and indexes it, under the per-layer lock;
//! and layers indexed in place in a local archive.

use crate::layer::{self, Compression, LayerError};
use crate::registry::LayerDesc;
use flate2::bufread::MultiGzDecoder;
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;

use super::*;

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
    pub(super) fn fetch<F>(
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
}
