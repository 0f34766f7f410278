//! Keeping layers read by range in the cache: opening one (its index and
//! span metadata made once from the network, then kept), listing and
//! evicting range caches, and distrusting an index that was found lying.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{RangeSource, Ranged, SpanMap, io_err};
use crate::digest::Digest;

impl crate::cache::Layer {
    /// For a layer read by range through an index whose addresses are tar
    /// offsets, once every span is held: hashes the tar the spans make
    /// against the layer's diff_id, then indexes it and compares that with
    /// the index the layer was opened from. On any difference the kept
    /// index is distrusted and its range cache dropped (the next opening
    /// reads the layer whole) and the error names the first difference.
    pub fn audit_index(&self) -> Result<(), crate::cache::CacheError> {
        let crate::cache::Data::Ranged(r) = &self.data else {
            return Ok(());
        };
        if r.complete() {
            let read = |o: u64, b: &mut [u8]| -> Result<(), super::BoxError> {
                if r.read_at(o, b)? < b.len() {
                    return Err("the layer ends there".into());
                }
                Ok(())
            };
            if let Err(source) = r.map.audit_complete(&read, &*r.source, &self.diff_id) {
                drop_ranged(&r.data_path.with_extension("idx"));
                let e = crate::cache::CacheError::RangedNotLayer {
                    digest: self.digest.clone(),
                    source,
                };
                tracing::error!("{}", crate::report::Chain(&e));
                return Err(e);
            }
        }
        if !r.map.addresses_are_tar() || !r.complete() {
            return Ok(());
        }
        r.check_tar()?;
        let tar = crate::cache::Section {
            file: &r.data,
            pos: 0,
            end: r.end,
        };
        let real = crate::layer::index_tar(
            std::io::BufReader::with_capacity(1 << 20, tar),
            &self.digest,
        )?;
        let claimed = self.index()?;
        let Some(first) = crate::layer::first_difference(&claimed, &real, true) else {
            return Ok(());
        };
        r.drop_all();
        Err(crate::cache::CacheError::IndexMismatch {
            digest: self.digest.clone(),
            first,
        })
    }
}

/// Compares a kept index of `form` with a layer fetched whole; drops it
/// (with a warning) when they differ.
impl crate::cache::Cache {
    pub fn audit_ranged(&self, layer: &crate::cache::Layer, form: Form) {
        let hex = layer.digest.hex();
        let idx = self.ranged_stem(hex, form).with_extension("idx");
        let Ok(bytes) = std::fs::read(&idx) else {
            return;
        };
        let claimed = postcard::take_from_bytes::<crate::cache::IndexHeader>(&bytes)
            .ok()
            .and_then(|(_, rest)| postcard::from_bytes::<crate::layer::LayerIndex>(rest).ok());
        match (claimed, layer.index()) {
            (Some(c), Ok(real)) if c == real => {}
            (_, Err(e)) => tracing::warn!("{}", crate::report::Chain(&e)),
            (c, Ok(real)) => {
                let first = c
                    .and_then(|c| crate::layer::first_difference(&c, &real, true))
                    .map_or_else(|| "is unreadable".to_string(), |d| d.to_string());
                tracing::warn!(
                    "layer {}: the published index kept for it differs from the layer itself (it {first}); dropped",
                    layer.digest
                );
                distrust(&idx);
                let _ = std::fs::remove_file(idx.with_extension("data"));
                let _ = std::fs::remove_file(idx.with_extension("have"));
            }
        }
    }
}

impl crate::cache::Cache {
    /// Compares the index a table of contents gave layer number `n` (kept
    /// in `form`) with the layer's own tar stream, now fetched whole. On any
    /// difference: one error naming the layer and the first difference, and
    /// the range cache dropped and distrusted, so the stream is what is
    /// shown from then on.
    pub fn audit_toc(&self, layer: &crate::cache::Layer, form: Form, n: usize) {
        let idx = self
            .ranged_stem(layer.digest.hex(), form)
            .with_extension("idx");
        let Ok(bytes) = std::fs::read(&idx) else {
            return;
        };
        let claimed = postcard::take_from_bytes::<crate::cache::IndexHeader>(&bytes)
            .ok()
            .and_then(|(_, rest)| postcard::from_bytes::<crate::layer::LayerIndex>(rest).ok());
        let real = match layer.index() {
            Ok(r) => r,
            Err(e) => return tracing::warn!("{}", crate::report::Chain(&e)),
        };
        let difference = match &claimed {
            Some(c) => crate::layer::first_difference(c, &real, false).map(|d| d.to_string()),
            None => Some("its kept index is unreadable".into()),
        };
        if let Some(d) = difference {
            tracing::error!(
                "split view: layer {n} ({}): its table of contents {d}; its range cache is dropped and the tar stream is shown",
                layer.digest
            );
            drop_ranged(&idx);
        }
    }
}

/// Distrusts the index at `idx` and deletes every byte read through it.
pub(super) fn drop_ranged(idx: &Path) {
    distrust(idx);
    let _ = std::fs::remove_file(idx.with_extension("data"));
    let _ = std::fs::remove_file(idx.with_extension("have"));
}

/// Drops the index a range cache was opened from (the one at `stem` with
/// any extension) and marks it distrusted: an index that lied once is not
/// fetched and used again; the layer is read whole from then on.
pub(super) fn distrust(stem: &Path) {
    for ext in ["idx", "meta"] {
        let _ = std::fs::remove_file(stem.with_extension(ext));
    }
    if let Err(e) = crate::private::write_atomic(&stem.with_extension("distrusted"), b"") {
        tracing::warn!("{}: {e}", stem.with_extension("distrusted").display());
    }
}

/// A layer's range cache, as `rimg cache ls` shows it and eviction weighs it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RangedCache {
    pub digest: Digest,
    pub form: String,
    /// Disk the decoded chunks and metadata take (the data file is sparse).
    pub bytes: u64,
    /// Seconds since the epoch.
    pub last_use: i64,
}

impl crate::cache::Cache {
    /// Every kept range cache, least recently used first.
    pub fn ranged_list(&self) -> Vec<RangedCache> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.root.join("lazy/sha256");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".idx") else {
                continue;
            };
            let Some((hex, form)) = stem.split_once('-') else {
                continue;
            };
            let Ok(meta) = e.metadata() else { continue };
            let bytes = ["idx", "meta", "data", "have"]
                .iter()
                .filter_map(|ext| std::fs::metadata(dir.join(format!("{stem}.{ext}"))).ok())
                .map(|m| m.blocks() * 512)
                .sum();
            let Ok(digest) = Digest::parse(&format!("sha256:{hex}")) else {
                continue;
            };
            out.push(RangedCache {
                digest,
                form: form.to_string(),
                bytes,
                last_use: crate::cache::mtime_secs(&meta),
            });
        }
        out.sort_by_key(|r| r.last_use);
        out
    }

    /// Removes a range cache no mount is using; `false` when one is.
    pub(in crate::cache) fn remove_ranged(&self, digest: &Digest, form: &str) -> bool {
        let hex = digest.hex();
        let Ok(lock) = self.lock_file(hex) else {
            return false;
        };
        if lock.try_lock().is_err() {
            return false;
        }
        let stem = self.root.join("lazy/sha256").join(format!("{hex}-{form}"));
        // Index first: without it nothing trusts the rest.
        for ext in ["idx", "meta", "data", "have", "distrusted"] {
            let _ = std::fs::remove_file(stem.with_extension(ext));
        }
        true
    }
}

/// Names the form a layer is read by range in (a table of contents, a
/// checkpoint index): the files of each form are kept apart.
pub type Form = &'static str;

/// The forms a layer is read by range in, as the cache names them: a
/// table of contents taken on trust (`--trust-toc`), a zstd:chunked TOC
/// proved against its tar-split, a published gzip index.
pub const TOC: Form = "toc";
pub const TARSPLIT: Form = "tarsplit";
pub const GZ_INDEX: Form = "gzidx";

impl crate::cache::Cache {
    fn ranged_stem(&self, hex: &str, form: Form) -> PathBuf {
        self.root.join("lazy/sha256").join(format!("{hex}-{form}"))
    }

    /// Whether an index of `form` for layer `digest` was found lying: the
    /// layer is then read whole.
    pub fn is_distrusted(&self, digest: &Digest, form: Form) -> bool {
        self.ranged_stem(digest.hex(), form)
            .with_extension("distrusted")
            .exists()
    }

    /// Marks the index of `form` for layer `digest` as not to be used.
    pub fn distrust(&self, digest: &Digest, form: Form) {
        distrust(&self.ranged_stem(digest.hex(), form).with_extension("idx"));
    }

    /// Records that the index blob `index` (its digest) of layer `digest`
    /// in `form` was built in this cache from the verified layer, so that,
    /// once published, it is trusted here.
    pub fn note_local_index(&self, digest: &Digest, form: Form, index: &str) {
        if self.is_local_index(digest, form, index) {
            return;
        }
        let path = self.local_index_path(digest, form);
        let write = || -> io::Result<()> {
            std::fs::create_dir_all(self.root.join("lazy/sha256"))?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            f.write_all(format!("{index}\n").as_bytes())?;
            f.sync_data()
        };
        if let Err(e) = write() {
            tracing::warn!("{}: {e}", path.display());
        }
    }

    /// Whether the index blob `index` of layer `digest` in `form` was built
    /// in this cache ([`Self::note_local_index`]).
    pub fn is_local_index(&self, digest: &Digest, form: Form, index: &str) -> bool {
        std::fs::read_to_string(self.local_index_path(digest, form))
            .is_ok_and(|s| s.lines().any(|l| l == index))
    }

    fn local_index_path(&self, digest: &Digest, form: Form) -> PathBuf {
        self.ranged_stem(digest.hex(), form).with_extension("local")
    }

    /// Whether the range cache of layer `digest` in `form` is kept.
    pub fn has_ranged(&self, digest: &Digest, form: Form) -> bool {
        self.ranged_stem(digest.hex(), form)
            .with_extension("idx")
            .exists()
    }

    /// Layer `desc` read by range in `form`. Its entry index and span
    /// metadata (opaque here) are made by `build` the first time (from the
    /// network) and kept; `map` makes the spans from the metadata; reads
    /// fetch through `source`. While the layer lives it holds the layer's
    /// lock shared, like any layer in use.
    pub fn open_ranged<E: From<crate::cache::CacheError>>(
        &self,
        desc: &crate::registry::LayerDesc,
        image_ref: &str,
        form: Form,
        build: impl FnOnce() -> Result<(crate::layer::LayerIndex, Vec<u8>), E>,
        map: impl Fn(&[u8]) -> Result<Box<dyn SpanMap>, E>,
        source: Arc<dyn RangeSource>,
    ) -> Result<Arc<crate::cache::Layer>, E> {
        use crate::cache::{CacheError, INDEX_VERSION, IndexHeader};
        let hex = desc.digest.hex().to_string();
        let dir = self.root.join("lazy/sha256");
        // Like the rest of the cache, 0700: the decoded chunks are a private
        // image's file contents. A range cache made looser by an older rimg
        // is tightened.
        for d in [self.root.join("lazy"), dir.clone()] {
            crate::private::tighten_dir(&d).map_err(|e| CacheError::from(io_err(&d)(e)))?;
        }
        let lock = self.lock_file(&hex)?;
        let lock_path = self.root.join("locks").join(format!("{hex}.lock"));
        lock.lock_shared()
            .map_err(|e| CacheError::from(io_err(&lock_path)(e)))?;
        let stem = self.ranged_stem(&hex, form);
        let idx_path = stem.with_extension("idx");
        let meta_path = stem.with_extension("meta");
        let stored = match (
            crate::cache::read_index_header(&idx_path)?,
            std::fs::read(&meta_path),
        ) {
            (Some(Ok(h)), Ok(meta)) if h.version == INDEX_VERSION && h.digest == *desc.digest => {
                // Metadata an older rimg wrote is made again, not trusted.
                map(&meta).ok().map(|_| (h, meta))
            }
            _ => None,
        };
        let (header, meta) = match stored {
            Some(found) => found,
            None => {
                // Spans of whatever index was kept before are not this one's.
                for ext in ["data", "have"] {
                    let _ = std::fs::remove_file(stem.with_extension(ext));
                }
                let (index, meta) = build()?;
                let end = index
                    .entries
                    .iter()
                    .map(|e| e.offset + e.size)
                    .max()
                    .unwrap_or(0);
                let header = IndexHeader {
                    version: INDEX_VERSION,
                    digest: desc.digest.clone(),
                    // Not verified: a layer read by range is never whole
                    // here; its spans are verified instead.
                    diff_id: desc.diff_id.clone().unwrap_or_default(),
                    blob_size: desc.size,
                    tar_size: end,
                };
                let write = |path: &Path, parts: &[&[u8]]| -> Result<(), CacheError> {
                    let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))
                        .map_err(|e| CacheError::from(io_err(path)(e)))?;
                    for p in parts {
                        tmp.as_file()
                            .write_all(p)
                            .map_err(|e| CacheError::from(io_err(path)(e)))?;
                    }
                    tmp.as_file()
                        .sync_data()
                        .map_err(|e| CacheError::from(io_err(path)(e)))?;
                    tmp.persist(path)
                        .map_err(|e| CacheError::from(io_err(path)(e.error)))?;
                    Ok(())
                };
                let encode =
                    |e: postcard::Error| CacheError::from(io_err(&idx_path)(io::Error::other(e)));
                let head = postcard::to_stdvec(&header).map_err(encode)?;
                let body = postcard::to_stdvec(&index).map_err(encode)?;
                // Metadata first: the index's presence says both are there.
                write(&meta_path, &[&meta])?;
                write(&idx_path, &[&head, &body])?;
                (header, meta)
            }
        };
        let spans = map(&meta)?;
        let reader = Ranged::open_checked(&desc.digest, &stem, spans, source, desc.diff_id.clone())
            .map_err(CacheError::from)?;
        // Last use is the index file's mtime, as for whole layers.
        if let Ok(f) = std::fs::File::options().write(true).open(&idx_path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        self.note_image(&hex, image_ref);
        // Range caches grow as they are read; make room as a new one opens.
        if let Err(e) = self.evict(self.limit) {
            tracing::warn!("cache eviction: {}", crate::report::Chain(&e));
        }
        Ok(Arc::new(crate::cache::Layer {
            digest: header.digest,
            diff_id: header.diff_id,
            idx_path,
            data: crate::cache::Data::Ranged(reader.into_shared()),
            _in_use: lock,
        }))
    }
}
