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
use crate::layer::LayerIndex;
use crate::local::LocalBlobs;
use crate::overlay::tree::{self, Tree};
use crate::registry::{Client, LayerDesc, ResolvedImage};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    // The cache error names the digest.
    #[error("layer {index} of {reference}: {source}")]
    Layer {
        index: usize,
        digest: String,
        reference: String,
        #[source]
        source: Box<crate::cache::CacheError>,
    },
    #[error("merging the layers of {reference}: {source}")]
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
    #[error("worker for layer {digest} stopped: {detail}")]
    Worker { digest: String, detail: String },
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
    fn layer(&self, digest: &str, size: u64) -> Arc<dyn LayerProgress>;
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
    fn layer(&self, _: &str, _: u64) -> Arc<dyn LayerProgress> {
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
        }
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
                None => cache.ensure_layer(&desc, &image_ref, max, open),
            }
            .and_then(|layer| check_diff_id(layer, diff_id));
            bar.done();
            r
        })
        .await
        .map_err(|e| ImageError::Worker {
            digest: digest.clone(),
            detail: e.to_string(),
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
        if let Some(t) = self.cache.load_tree(&self.image.digest, open) {
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
        match self.cache.store_tree(&self.image.digest, t.as_bytes()) {
            // Served from the saved file from here on: the page cache holds
            // it, not this process's heap.
            Ok(()) => {
                if let Some(saved) = self.cache.load_tree(&self.image.digest, open) {
                    t = saved;
                }
            }
            Err(e) => tracing::warn!("cannot save the merged tree: {e}"),
        }
        Ok((t, layers))
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

    fn layer_error(&self, index: usize, source: crate::cache::CacheError) -> ImageError {
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

/// `sha256:abcdef012345...` -> `abcdef012345`
pub fn short_digest(d: &str) -> &str {
    let hex = d.split_once(':').map_or(d, |(_, h)| h);
    &hex[..hex.len().min(12)]
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
