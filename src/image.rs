//! An image opened for reading: its resolved manifest, its layers fetched into
//! the cache on first need (in parallel, inflating while downloading), and the
//! merged tree built from them. FUSE, `ls`, `cat` and export all start here.
//! Blobs come from a registry or from a local archive ([`Blobs`]); past the
//! fetch, the two are the same.

use std::borrow::Cow;
use std::io::Read;
use std::sync::Arc;

use futures_util::future::try_join_all;

use crate::cache::{Cache, Layer};
use crate::digest::Digest;
use crate::layer::LayerIndex;
use crate::local::LocalBlobs;
use crate::overlay::tree::{self, Tree};
use crate::registry::{Client, LayerDesc, ResolvedImage};

mod gzindex;
#[cfg(test)]
mod ondisk_fuzz;
mod ranged;
mod tarsplit;
mod verify;
pub use gzindex::{ARTIFACT_TYPE, LayerGzIndex};
pub use ranged::RangedOpenError;
pub use verify::{LayerCheck, LayerReport, Outcome, Report};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    // The cache error names the digest.
    #[error("layer {index} of {reference}")]
    Layer {
        index: usize,
        digest: Digest,
        reference: String,
        #[source]
        source: Box<crate::cache::CacheError>,
    },
    #[error("merging the layers of {reference}")]
    Tree {
        reference: String,
        #[source]
        source: crate::overlay::tree::TreeError,
    },
    #[error("{reference} has {count} layers; layer {asked} does not exist")]
    NoSuchLayer {
        reference: String,
        count: usize,
        asked: i64,
    },
    #[error("layer {index} ({digest}) of {reference}: reading it by range")]
    Ranged {
        index: usize,
        digest: String,
        reference: String,
        #[source]
        source: Box<RangedOpenError>,
    },
    #[error("{reference} is not in a registry; gzip indexes are published to one")]
    NotRemote { reference: String },
    #[error("publishing the gzip index of {reference}")]
    Push {
        reference: String,
        #[source]
        source: crate::registry::RegistryError,
    },
    #[error("worker for layer {digest} stopped")]
    Worker {
        digest: Digest,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Where an image's blobs are read from.
#[derive(Clone)]
pub enum Blobs {
    Registry(Arc<Client>),
    Local(Arc<LocalBlobs>),
}

impl From<Arc<Client>> for Blobs {
    fn from(c: Arc<Client>) -> Blobs {
        Blobs::Registry(c)
    }
}

impl From<LocalBlobs> for Blobs {
    fn from(l: LocalBlobs) -> Blobs {
        Blobs::Local(Arc::new(l))
    }
}

/// Hears how layer downloads go, for whoever shows progress (the CLI draws
/// bars with it; the library draws nothing).
pub trait Progress: Send + Sync {
    /// A layer of `size` compressed bytes starts downloading.
    fn layer(&self, digest: &Digest, size: u64) -> Arc<dyn LayerProgress>;
}

/// One layer's download.
pub trait LayerProgress: Send + Sync {
    /// `bytes` more of the blob arrived.
    fn advance(&self, bytes: u64);
    /// The layer is in the cache, or failed.
    fn done(&self);
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn layer(&self, _: &Digest, _: u64) -> Arc<dyn LayerProgress> {
        Arc::new(Quiet)
    }
}

impl LayerProgress for Quiet {
    fn advance(&self, _: u64) {}
    fn done(&self) {}
}

/// A resolved image with access to its layers.
pub struct ImageSource {
    pub image: ResolvedImage,
    blobs: Blobs,
    cache: Arc<Cache>,
    max_layer_size: u64,
    progress: Arc<dyn Progress>,
    /// Layers whose table of contents the manifest pins are read by range.
    range_reads: bool,
    /// Gzip layers with a published index are read by range.
    use_index: bool,
    /// Whether eStargz and zstd:chunked TOCs without a tar-split are read
    /// by range on trust (`--trust-toc`).
    trust_toc: bool,
    /// Published gzip indexes are used without being built here or signed.
    trust_index: bool,
    /// The trust policy, which says whose signature makes a published
    /// index trusted (none: no signature does).
    trust: Option<Arc<crate::trust::Trust>>,
    published: tokio::sync::OnceCell<gzindex::Published>,
}

/// Counts bytes to the progress listener as the decompressor pulls them.
struct Counted<R> {
    inner: R,
    progress: Arc<dyn LayerProgress>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

impl ImageSource {
    pub fn new(
        image: ResolvedImage,
        blobs: impl Into<Blobs>,
        cache: Arc<Cache>,
        max_layer_size: u64,
        progress: Arc<dyn Progress>,
    ) -> Self {
        ImageSource {
            image,
            blobs: blobs.into(),
            cache,
            max_layer_size,
            progress,
            range_reads: true,
            use_index: true,
            trust_toc: false,
            trust_index: false,
            trust: None,
            published: tokio::sync::OnceCell::new(),
        }
    }

    /// The registry client the blobs come from (`None` for a file).
    pub fn registry_client(&self) -> Option<&Arc<Client>> {
        match &self.blobs {
            Blobs::Registry(c) => Some(c),
            _ => None,
        }
    }

    /// Whether published gzip indexes are used (the default).
    pub fn with_published_indexes(mut self, on: bool) -> Self {
        self.use_index = on;
        self
    }

    /// Whether a table of contents that cannot be proved against its tar
    /// stream (eStargz, zstd:chunked without a tar-split) is trusted to
    /// read its layer by range; by default such a layer is read whole.
    pub fn with_trusted_tocs(mut self, on: bool) -> Self {
        self.trust_toc = on;
        self
    }

    /// Whether a published gzip index is used even when it was not built
    /// in this cache and is not signed by a trusted key (`--trust-index`).
    /// The trust policy whose keys make a signed published index trusted.
    pub fn with_trust(mut self, trust: Arc<crate::trust::Trust>) -> Self {
        self.trust = Some(trust);
        self
    }

    pub fn with_trusted_indexes(mut self, on: bool) -> Self {
        self.trust_index = on;
        self
    }

    /// Whether layers that allow it are read by range (the default) or
    /// always fetched whole.
    pub fn with_range_reads(mut self, on: bool) -> Self {
        self.range_reads = on;
        self
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Maps `--layer N` (negative counts from the top) to a layer index.
    pub fn layer_index(&self, asked: i64) -> Result<usize, ImageError> {
        let count = self.image.layers.len() as i64;
        let idx = if asked < 0 { count + asked } else { asked };
        if idx < 0 || idx >= count {
            return Err(ImageError::NoSuchLayer {
                reference: self.image.reference.to_string(),
                count: count as usize,
                asked,
            });
        }
        Ok(idx as usize)
    }

    /// Layer `index`, from the cache or fetched now. Runs the download on the
    /// runtime and the inflate-and-index pass on a blocking thread.
    pub async fn layer(&self, index: usize) -> Result<Arc<Layer>, ImageError> {
        self.layer_from(index, true).await
    }

    /// Every layer with its blob in the cache (as export needs), none read in place.
    pub async fn cached_layers(&self) -> Result<Vec<Arc<Layer>>, ImageError> {
        try_join_all((0..self.image.layers.len()).map(|i| self.layer_from(i, false))).await
    }

    /// Layer `index`; an uncompressed layer of a local archive is read in
    /// place when `in_place` allows, else the blob is copied into the cache.
    async fn layer_from(&self, index: usize, in_place: bool) -> Result<Arc<Layer>, ImageError> {
        if in_place && let Some(l) = self.ranged_layer(index).await? {
            return Ok(l);
        }
        let desc: LayerDesc = self.image.layers[index].clone();
        let reference = self.image.reference.clone();
        let image_ref = reference.to_string();
        let origin = self.origin(index);
        let blobs = self.blobs.clone();
        // Checked once the layer is in the cache, whatever it came from.
        let diff_id = self.image.config.rootfs().diff_ids().get(index).cloned();
        let cache = Arc::clone(&self.cache);
        let max = self.max_layer_size;
        let bar = self.progress.layer(&desc.digest, desc.size);
        let handle = tokio::runtime::Handle::current();
        let digest = desc.digest.clone();
        // A few layers at a time: each takes a blocking thread.
        let _slot = match &self.blobs {
            Blobs::Registry(client) => Some(client.layer_slot().await),
            // A local file needs no download slot; its layers are read in place
            // or inflated one blocking thread each.
            Blobs::Local(_) => None,
        };
        let result = tokio::task::spawn_blocking(move || {
            let _enter = handle.enter();
            let open =
                || -> Result<Box<dyn Read + Send>, Box<dyn std::error::Error + Send + Sync>> {
                    tracing::info!(
                        "fetching layer {index} {} ({} bytes)",
                        desc.digest,
                        desc.size
                    );
                    let inner: Box<dyn Read + Send> = match &blobs {
                        Blobs::Registry(client) => Box::new(client.blob_reader(&reference, &desc)),
                        Blobs::Local(local) => local.open_blob(&desc.digest)?,
                    };
                    Ok(Box::new(Counted {
                        inner,
                        progress: Arc::clone(&bar),
                    }))
                };
            let at = match &blobs {
                Blobs::Local(local) if in_place => local.in_place(&desc.digest, &desc.media_type),
                _ => None,
            };
            let r = match at {
                Some((file, offset, size)) => {
                    tracing::info!("layer {index} {} read in place", desc.digest);
                    cache.ensure_layer_in_place(&desc, &image_ref, &file, offset, size)
                }
                None => cache
                    .ensure_layer(&desc, &image_ref, max, open)
                    .inspect(|l| {
                        // A published index kept for this layer must match it.
                        cache.audit_ranged(l, ranged::GZ_INDEX);
                        // So must a table of contents it was read by.
                        for form in [ranged::TARSPLIT, ranged::TOC] {
                            cache.audit_toc(l, form, index);
                        }
                    }),
            }
            .and_then(|layer| check_diff_id(layer, diff_id));
            bar.done();
            r
        })
        .await
        .map_err(|source| ImageError::Worker {
            digest: digest.clone(),
            source,
        })?;
        result.map_err(|source| ImageError::Layer {
            index,
            digest,
            reference: origin,
            source: Box::new(source),
        })
    }

    /// Every layer, fetched in parallel.
    pub async fn layers(&self) -> Result<Vec<Arc<Layer>>, ImageError> {
        try_join_all((0..self.image.layers.len()).map(|i| self.layer(i))).await
    }

    /// The merged tree (or one layer's own tree when `only` is given), with
    /// the layers its data lives in. A saved tree is checked whole first.
    pub async fn tree(&self, only: Option<usize>) -> Result<(Tree, Vec<Arc<Layer>>), ImageError> {
        self.tree_checked(only, true).await
    }

    /// As [`Self::tree`], but a saved tree is checked chunk by chunk as it
    /// is read (see [`Tree::damaged`]): what a mount wants, whose first
    /// lookup should not wait for the whole file.
    pub async fn tree_in_place(
        &self,
        only: Option<usize>,
    ) -> Result<(Tree, Vec<Arc<Layer>>), ImageError> {
        self.tree_checked(only, false).await
    }

    async fn tree_checked(
        &self,
        only: Option<usize>,
        whole: bool,
    ) -> Result<(Tree, Vec<Arc<Layer>>), ImageError> {
        let open = |f: &std::fs::File, p: &std::path::Path| {
            // A small tree is checked whole even for a mount (a few
            // milliseconds at most): damage is then found before anything
            // is answered, and the tree rebuilt at once.
            let small = f.metadata().is_ok_and(|m| m.len() <= EAGER_CHECK_BYTES);
            if whole || small {
                Tree::open_checked(f, Some(p.to_path_buf()))
            } else {
                Tree::open(f, Some(p.to_path_buf()))
            }
        };
        if let Some(i) = only {
            let layer = self.layer(i).await?;
            let index = layer.index().map_err(|e| self.layer_error(i, e))?;
            return Ok((tree::single_layer(&index), vec![layer]));
        }
        let started = std::time::Instant::now();
        let layers = self.layers().await?;
        let key = self.tree_key(layers.iter().map(|l| l.ranged().is_some()));
        if let Some(t) = self.cache.load_tree(&key, open) {
            tracing::info!(
                "{}: saved tree of {} entries loaded in {:?}",
                self.image.reference,
                t.len(),
                started.elapsed()
            );
            return Ok((t, layers));
        }
        let fetched = started.elapsed();
        let mut indexes = Vec::with_capacity(layers.len());
        for (i, l) in layers.iter().enumerate() {
            indexes.push(l.index().map_err(|e| self.layer_error(i, e))?);
        }
        let refs: Vec<&LayerIndex> = indexes.iter().collect();
        let mut t = tree::merge(&refs).map_err(|source| ImageError::Tree {
            reference: self.image.reference.to_string(),
            source,
        })?;
        drop(indexes);
        tracing::info!(
            "{}: {} entries; layers ready in {:?}, merged in {:?}",
            self.image.reference,
            t.len(),
            fetched,
            started.elapsed() - fetched
        );
        match self.cache.store_tree(&key, t.as_bytes()) {
            // Served from the saved file from here on: the page cache holds
            // it, not this process's heap.
            Ok(()) => {
                if let Some(saved) = self.cache.load_tree(&key, open) {
                    t = saved;
                }
            }
            Err(e) => tracing::warn!("cannot save the merged tree: {}", crate::report::Chain(&e)),
        }
        Ok((t, layers))
    }

    /// What the merged tree is saved under: the image's digest when every
    /// layer is read whole, else a digest of it and which layers are read
    /// by range (their files' addresses differ from a whole layer's).
    fn tree_key(&self, ranged: impl Iterator<Item = bool>) -> String {
        let forms: String = ranged.map(|r| if r { 'R' } else { 'W' }).collect();
        if !forms.contains('R') {
            return self.image.digest.to_string();
        }
        use sha2::Digest as _;
        let key = sha2::Sha256::digest(format!("{}/{forms}", self.image.digest));
        format!("sha256:{}", hex::encode(key))
    }

    /// The key [`Self::tree`] will save the merged tree under, told from
    /// the cache alone (a layer with a kept range cache is read by range).
    pub fn predicted_tree_key(&self) -> String {
        let ranged = self.image.layers.iter().map(|l| {
            self.range_reads
                && matches!(self.blobs, Blobs::Registry(_))
                && (self.cache.blob_path(&l.digest).is_none()
                    && (self.cache.has_ranged(&l.digest, ranged::TARSPLIT)
                        || self.trust_toc && self.cache.has_ranged(&l.digest, ranged::TOC))
                    || self.use_index && self.cache.has_ranged(&l.digest, ranged::GZ_INDEX))
        });
        self.tree_key(ranged)
    }

    /// Where the image comes from, as mounts show it, and a detail: the
    /// registry reference; or for a local image its file
    /// (`docker-archive:/abs/path`) and, as the detail, the tag it carries.
    pub fn source_name(&self) -> (String, Option<String>) {
        match &self.blobs {
            Blobs::Registry(_) => (self.image.reference.to_string(), None),
            Blobs::Local(local) => (
                local.source().to_string(),
                Some(self.image.reference.to_string()),
            ),
        }
    }

    /// The image, and for a local one the file and entry layer `index` is
    /// read from, as errors name them.
    fn origin(&self, index: usize) -> String {
        match &self.blobs {
            Blobs::Registry(_) => self.image.reference.to_string(),
            Blobs::Local(local) => format!(
                "{} ({})",
                self.image.reference,
                local.describe(&self.image.layers[index].digest)
            ),
        }
    }

    pub(crate) fn layer_error(&self, index: usize, source: crate::cache::CacheError) -> ImageError {
        ImageError::Layer {
            index,
            digest: self.image.layers[index].digest.clone(),
            reference: self.origin(index),
            source: Box::new(source),
        }
    }
}

/// Saved trees up to this size (about 100,000 entries) are checksummed
/// whole when opened for a mount; larger ones chunk by chunk as read.
const EAGER_CHECK_BYTES: u64 = 8 << 20;

/// The layer, if its uncompressed content is what the config says it is.
fn check_diff_id(
    layer: Arc<Layer>,
    expected: Option<String>,
) -> Result<Arc<Layer>, crate::cache::CacheError> {
    match expected {
        Some(expected) if expected != layer.diff_id => Err(crate::cache::CacheError::DiffId {
            digest: layer.digest.clone(),
            expected,
            actual: layer.diff_id.clone(),
        }),
        _ => Ok(layer),
    }
}

/// A file's bytes in its layer, holes of a sparse file as zeros, as a
/// reader: how export, forensics and anything else outside the mount read
/// a file of an image.
pub struct FileData<'a> {
    /// `None` when the file's layer is not open (a tree given without its
    /// layers); reading then fails, unless the file is empty.
    layer: Option<&'a Layer>,
    offset: u64,
    size: u64,
    sparse: Option<Cow<'a, [crate::layer::Segment]>>,
    pos: u64,
}

impl<'a> FileData<'a> {
    pub fn new(
        layer: Option<&'a Layer>,
        offset: u64,
        size: u64,
        sparse: Option<&'a [crate::layer::Segment]>,
    ) -> Self {
        FileData {
            layer,
            offset,
            size,
            sparse: sparse.map(Cow::Borrowed),
            pos: 0,
        }
    }

    /// The bytes of a merged node, whose layer is `layers[node.layer]`.
    pub fn of(layers: &'a [Arc<Layer>], n: crate::overlay::tree::NodeRef<'_>) -> Self {
        let layer = layers.get(n.layer as usize).map(|l| &**l);
        FileData {
            sparse: n.sparse(),
            ..Self::new(layer, n.offset, n.size, None)
        }
    }

    /// The bytes of a node while layers are applied ([`crate::overlay::tree::Applier`]).
    pub fn of_node(layers: &'a [Arc<Layer>], n: &'a crate::overlay::tree::Node) -> Self {
        let layer = layers.get(n.layer as usize).map(|l| &**l);
        Self::new(layer, n.offset, n.size, n.sparse())
    }
}

impl Read for FileData<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let layer = self.layer;
        let mut read_at = |o: u64, b: &mut [u8]| match layer {
            Some(l) => l.read_at(o, b),
            None => Err(std::io::Error::other("the file's layer is not open")),
        };
        let n = crate::layer::read_file(
            &mut read_at,
            self.offset,
            self.size,
            self.sparse.as_deref(),
            self.pos,
            buf,
        )?;
        self.pos += n as u64;
        Ok(n)
    }
}
