//! Keeping the cache: saved trees, the listing, verification, eviction and
//! the clean-up of what a crash left.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::*;

impl Cache {
    pub(super) fn tree_path(&self, image_digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self.root.join("trees").join(format!(
            "{}.v{TREE_FORMAT}.tree",
            parse_digest(image_digest)?.hex()
        )))
    }

    /// A merged tree saved for the image with manifest `image_digest`, so a
    /// warm mount neither reads layer indexes nor merges them again. `open`
    /// checks and maps the file at the path it is given (the format belongs
    /// to the overlay); a file it rejects is removed with a warning, so the
    /// tree is rebuilt and saved anew, never trusted.
    pub fn load_tree<T, E: std::error::Error + 'static>(
        &self,
        image_digest: &str,
        open: impl FnOnce(&File, &Path) -> Result<T, E>,
    ) -> Option<T> {
        let path = self.tree_path(image_digest).ok()?;
        let file = File::open(&path).ok()?;
        match open(&file, &path) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(
                    "saved tree {}: {}; rebuilding it",
                    path.display(),
                    crate::report::Chain(&e)
                );
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Whether a merged tree is saved for the image.
    pub fn has_tree(&self, image_digest: &str) -> bool {
        self.tree_path(image_digest).is_ok_and(|p| p.exists())
    }

    /// Saves a merged tree's bytes, whole or not at all (written aside, then
    /// renamed into place: a mapped older copy is never written into).
    pub fn store_tree(&self, image_digest: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let path = self.tree_path(image_digest)?;
        let dir = self.root.join("trees");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp")).map_err(io_err(&dir))?;
        tmp.as_file().write_all(bytes).map_err(io_err(tmp.path()))?;
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
            // Not a name the cache gives a layer: not one of its layers.
            let Ok(digest) = Digest::parse(&format!("sha256:{hex}")) else {
                continue;
            };
            out.push(CachedLayer {
                digest,
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
            let hex = l.digest.hex();
            let lock = self.lock_file(hex)?;
            let in_use = lock.try_lock().is_err();
            let problem = self.check_layer(hex)?;
            let removed = problem.is_some() && !in_use;
            if removed {
                self.remove_layer(hex);
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
    pub(super) fn check_layer(&self, hex: &str) -> Result<Option<String>, CacheError> {
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
            let mut h = Digest::hasher();
            let n = hash_into(&mut f, &mut h).map_err(io_err(p))?;
            Ok(Some((Digest::from_hasher(h).to_string(), n)))
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
    pub(super) fn remove_layer(&self, hex: &str) {
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

    pub(super) fn evict(&self, limit: u64) -> Result<u64, CacheError> {
        // Least recently used first, whole layers and range caches alike:
        // both lists are sorted by last use.
        let layers = self.list()?;
        let ranged = self.ranged_list();
        let mut total: u64 = layers.iter().map(|l| l.blob_size + l.tar_size).sum::<u64>()
            + ranged.iter().map(|r| r.bytes).sum::<u64>();
        let mut candidates: Vec<(
            i64,
            Option<&CachedLayer>,
            Option<&super::ranged::RangedCache>,
        )> = layers.iter().map(|l| (l.last_use, Some(l), None)).collect();
        candidates.extend(ranged.iter().map(|r| (r.last_use, None, Some(r))));
        candidates.sort_by_key(|c| c.0);
        let mut freed = 0;
        let mut busy = Vec::new();
        for (_, whole, by_range) in candidates {
            if total <= limit {
                break;
            }
            if let Some(r) = by_range {
                if self.remove_ranged(&r.digest, &r.form) {
                    total -= r.bytes;
                    freed += r.bytes;
                    tracing::info!(
                        "evicted the range cache of layer {} ({} bytes)",
                        r.digest,
                        r.bytes
                    );
                } else {
                    busy.push(r.digest.to_string());
                }
                continue;
            }
            let Some(l) = whole else { continue };
            let (digest, bytes) = (l.digest.clone(), l.blob_size + l.tar_size);
            let hex = digest.hex();
            let lock = self.lock_file(hex)?;
            if lock.try_lock().is_err() {
                busy.push(digest.to_string());
                continue;
            }
            self.remove_layer(hex);
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
    pub(super) fn clear_in_place(&self) {
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
    /// Removes what interrupted writes left in `tmp/`: a layer's staged
    /// files (`<short digest>-XXXXXX.blob`...) once no fetch holds that
    /// layer's lock, and atomic-write temporaries (`.tmpXXXXXX`) once they
    /// are older than any write takes.
    pub(super) fn clean_tmp(&self) {
        const STALE: std::time::Duration = std::time::Duration::from_secs(600);
        let dir = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = || {
                e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE))
            };
            let remove = match name.split_once('-') {
                Some((prefix, _)) if prefix.len() == 12 && !name.starts_with('.') => {
                    // A fetch in progress holds the exclusive lock of its layer.
                    let busy = fs::read_dir(self.root.join("locks"))
                        .ok()
                        .into_iter()
                        .flatten()
                        .flatten()
                        .filter(|l| l.file_name().to_string_lossy().starts_with(prefix))
                        .any(|l| File::open(l.path()).is_ok_and(|f| f.try_lock().is_err()));
                    !busy
                }
                _ => stale(),
            };
            if remove {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}
