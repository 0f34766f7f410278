//! Which layers are read by range, and how: a layer whose table of contents
//! the manifest pins (eStargz, zstd:chunked) is opened from that table alone
//! and its files are fetched chunk by chunk; every other layer is fetched
//! whole. The span maps here verify each chunk against the digest its table
//! states before a byte of it is kept.
//!
//! A layer keeps the form it was first opened in while its range cache
//! lives (a layer read by range stays so even once it is also cached
//! whole), because a saved merged tree points at addresses in that form.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::gzindex::{GzMeta, GzSpans, LayerGzIndex};
use super::{Blobs, ImageError, ImageSource};
use crate::cache::ranged::{BoxError, RangeSource, SpanLoc, SpanMap};
use crate::cache::{CacheError, Layer};
use crate::layer::toc::{self, TocChunk, TocKind, TocLocation};
use crate::reference::Reference;
use crate::registry::{Client, LayerDesc, RegistryError};

/// The forms a layer is read by range in, as the cache names them.
pub(super) const TOC: &str = "toc";
pub(super) const GZ_INDEX: &str = "gzidx";

/// Tables of contents larger than this are refused before they are fetched.
const TOC_MAX: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RangedOpenError {
    #[error("fetching its table of contents")]
    Fetch(#[source] RegistryError),
    #[error(transparent)]
    Toc(#[from] toc::TocError),
    #[error("its table of contents is {len} bytes, over the {TOC_MAX}-byte bound")]
    TooLarge { len: u64 },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("its eStargz footer puts the table of contents at {at}, outside the {size}-byte blob")]
    Footer { at: u64, size: u64 },
    #[error(transparent)]
    Index(#[from] super::gzindex::GzIndexError),
    #[error(
        "its published gzip index is {len} bytes, over the {}-byte bound",
        super::gzindex::BLOB_MAX
    )]
    IndexTooLarge { len: u64 },
    #[error("its published gzip index {digest} hashes to {actual}")]
    IndexDigest { digest: String, actual: String },
    #[error("its saved span map is unreadable")]
    Meta(#[source] postcard::Error),
    #[error("its saved span map is of another index")]
    StaleMeta,
}

/// Fetches ranges of one blob from its registry, blocking the calling
/// thread (never a runtime thread) on the runtime that owns the client.
struct RegistryRange {
    client: Arc<Client>,
    reference: Reference,
    desc: LayerDesc,
    handle: tokio::runtime::Handle,
}

impl RangeSource for RegistryRange {
    fn fetch(&self, start: u64, len: u64) -> Result<Vec<u8>, BoxError> {
        let got = self.handle.block_on(self.client.blob_range(
            &self.reference,
            &self.desc,
            start,
            len,
        ))?;
        Ok(got.to_vec())
    }
}

/// start, len, coff, clen, skip, digest, file: a [`TocChunk`] as saved.
type SavedChunk = (u64, u64, u64, u64, u64, [u8; 32], usize);

/// A table of contents' chunks, as kept beside the range cache.
#[derive(Serialize, Deserialize)]
struct TocMeta {
    zstd: bool,
    layer: String,
    chunks: Vec<SavedChunk>,
    /// Each entry's path and address (`TocChunk::file` indexes them), for
    /// errors that say where in which file.
    paths: Vec<(Vec<u8>, u64)>,
    prefetch_until: Option<u64>,
}

/// The chunks, and their layer as far as errors name it (entries' paths
/// only: the index itself is the cache's).
struct TocSpans {
    layer: toc::TocLayer,
}

impl SpanMap for TocSpans {
    fn count(&self) -> usize {
        self.layer.chunks.len()
    }
    fn span(&self, i: usize) -> SpanLoc {
        let c = &self.layer.chunks[i];
        SpanLoc {
            start: c.start,
            len: c.len,
            coff: c.coff,
            clen: c.clen,
        }
    }
    fn decode(&self, i: usize, compressed: &[u8]) -> Result<Vec<u8>, BoxError> {
        Ok(toc::decode_chunk(
            &self.layer,
            &self.layer.chunks[i],
            compressed,
        )?)
    }
    fn prefetch_first(&self) -> Option<u64> {
        self.layer.prefetch_until
    }
}

fn toc_meta(t: &toc::TocLayer) -> TocMeta {
    TocMeta {
        zstd: matches!(t.kind, TocKind::ZstdChunked),
        layer: t.layer.clone(),
        chunks: t
            .chunks
            .iter()
            .map(|c| (c.start, c.len, c.coff, c.clen, c.skip, c.digest, c.file))
            .collect(),
        paths: t
            .index
            .entries
            .iter()
            .map(|e| (e.path.clone(), e.offset))
            .collect(),
        prefetch_until: t.prefetch_until,
    }
}

fn toc_spans(meta: &[u8]) -> Result<Box<dyn SpanMap>, RangedOpenError> {
    let m: TocMeta = postcard::from_bytes(meta).map_err(RangedOpenError::Meta)?;
    let entries = m
        .paths
        .iter()
        .map(|(p, offset)| crate::layer::Entry {
            offset: *offset,
            ..crate::layer::Entry::new(p, crate::layer::EntryKind::File)
        })
        .collect();
    let chunks = m
        .chunks
        .into_iter()
        .map(|(start, len, coff, clen, skip, digest, file)| TocChunk {
            start,
            len,
            coff,
            clen,
            skip,
            digest,
            file,
        })
        .collect();
    Ok(Box::new(TocSpans {
        layer: toc::TocLayer {
            index: crate::layer::LayerIndex { entries },
            chunks,
            prefetch_until: m.prefetch_until,
            kind: if m.zstd {
                TocKind::ZstdChunked
            } else {
                TocKind::Estargz
            },
            layer: m.layer,
        },
    }))
}

impl ImageSource {
    /// Layer `index` read by range when it can be and is not already
    /// cached whole; `None` means fetch it whole.
    pub(super) async fn ranged_layer(
        &self,
        index: usize,
    ) -> Result<Option<Arc<Layer>>, ImageError> {
        let Blobs::Registry(client) = &self.blobs else {
            return Ok(None);
        };
        let desc = self.image.layers[index].clone();
        let toc = self
            .range_reads
            .then(|| toc::locate(&desc.media_type, &desc.annotations));
        let plan = match toc.flatten() {
            Some(TocLocation::EstargzFooter { digest: None }) | None => None,
            Some(location) => Some(Plan::Toc(location)),
        };
        let plan = match plan {
            Some(p) => Some(p),
            None if self.range_reads
                && self.use_index
                && !self.cache.is_distrusted(&desc.digest, GZ_INDEX) =>
            {
                let kept = self.cache.has_ranged(&desc.digest, GZ_INDEX);
                if !kept && self.cache.blob_path(&desc.digest).is_some() {
                    return Ok(None);
                }
                let Some(d) = self.published().await.get(&desc.digest).cloned() else {
                    return Ok(None);
                };
                match self.index_trust(&desc.digest, &d).await {
                    Some(why) => {
                        tracing::info!(
                            "layer {}: published gzip index {} is trusted ({why})",
                            desc.digest,
                            d.digest()
                        );
                        Some(Plan::Published(Box::new(d)))
                    }
                    None => {
                        tracing::info!(
                            "layer {}: published gzip index {} ignored: it was not built in this cache, is not signed by a trusted key, and --trust-index was not given; the layer is read whole",
                            desc.digest,
                            d.digest()
                        );
                        return Ok(None);
                    }
                }
            }
            None => None,
        };
        let Some(plan) = plan else {
            return Ok(None);
        };
        let form = match plan {
            Plan::Toc(_) => TOC,
            Plan::Published(_) => GZ_INDEX,
        };
        if !self.cache.has_ranged(&desc.digest, form)
            && self.cache.blob_path(&desc.digest).is_some()
        {
            return Ok(None);
        }
        let source = Arc::new(RegistryRange {
            client: Arc::clone(client),
            reference: self.image.reference.clone(),
            desc: desc.clone(),
            handle: tokio::runtime::Handle::current(),
        });
        let cache = Arc::clone(&self.cache);
        let image_ref = self.image.reference.to_string();
        let fetcher = Arc::clone(&source);
        let d = desc.clone();
        let opened = tokio::task::spawn_blocking(move || match plan {
            Plan::Toc(location) => cache.open_ranged::<RangedOpenError>(
                &d,
                &image_ref,
                TOC,
                || {
                    let t = fetch_toc(&fetcher, &d, location)?;
                    tracing::info!(
                        "layer {}: read by range from its table of contents ({} entries, {} chunks)",
                        d.digest,
                        t.index.entries.len(),
                        t.chunks.len()
                    );
                    let meta = postcard::to_stdvec(&toc_meta(&t)).map_err(RangedOpenError::Meta)?;
                    Ok((t.index, meta))
                },
                toc_spans,
                source,
            ),
            Plan::Published(blob) => {
                let source_digest = blob.digest().to_string();
                cache.open_ranged::<RangedOpenError>(
                &d,
                &image_ref,
                GZ_INDEX,
                || {
                    let ix = fetch_gz_index(&fetcher, &d, &blob)?;
                    tracing::info!(
                        "layer {}: read by range through a published gzip index ({} entries, {} checkpoints)",
                        d.digest,
                        ix.entries.entries.len(),
                        ix.zran.spans.len()
                    );
                    let meta = postcard::to_stdvec(&GzMeta::new(&ix, &source_digest))
                        .map_err(RangedOpenError::Meta)?;
                    Ok((ix.entries, meta))
                },
                |meta| match GzMeta::read(meta, &source_digest) {
                    Some(m) => Ok(Box::new(GzSpans::new(m)) as Box<dyn SpanMap>),
                    // Made by an older rimg or from another index: made again.
                    None => Err(RangedOpenError::StaleMeta),
                },
                source,
            )
            }
        })
        .await
        .map_err(|source| ImageError::Worker {
            digest: desc.digest.clone(),
            source,
        })?;
        match opened {
            Ok(l) => Ok(Some(l)),
            // A registry that answers Range with the whole blob: the layer
            // is read whole, as it would be without an index or TOC.
            Err(RangedOpenError::Fetch(e)) if e.is_range_ignored() => {
                tracing::warn!(
                    "layer {}: {}; the layer is fetched whole",
                    desc.digest,
                    crate::report::Chain(&e)
                );
                Ok(None)
            }
            // A table that cannot say what the tar says (names Go's JSON
            // mangled): the whole layer can.
            Err(RangedOpenError::Toc(e @ toc::TocError::NotUtf8 { .. })) => {
                tracing::info!("{}; the layer is fetched whole", crate::report::Chain(&e));
                Ok(None)
            }
            // A published index is a hint: one that is malformed, or of
            // another layer, or cannot be had, costs a whole download, not
            // the image.
            Err(e) if form == GZ_INDEX => {
                let e = self.ranged_error(index, e);
                tracing::warn!("{}; the layer is fetched whole", crate::report::Chain(&e));
                if let ImageError::Ranged { source, .. } = &e
                    && !matches!(**source, RangedOpenError::Fetch(_))
                {
                    self.cache.distrust(&desc.digest, GZ_INDEX);
                }
                Ok(None)
            }
            Err(e) => Err(self.ranged_error(index, e)),
        }
    }

    pub(super) fn ranged_error(&self, index: usize, e: RangedOpenError) -> ImageError {
        ImageError::Ranged {
            index,
            digest: self.image.layers[index].digest.to_string(),
            reference: self.image.reference.to_string(),
            source: Box::new(e),
        }
    }
}

enum Plan {
    Toc(TocLocation),
    Published(Box<oci_spec::image::Descriptor>),
}

/// Fetches a published gzip index blob, checks its digest, and decodes it
/// for this exact layer (after one small range of the layer: a registry
/// that ignores Range is found now, and the layer read whole, not failed
/// read by read).
fn fetch_gz_index(
    source: &RegistryRange,
    desc: &LayerDesc,
    blob: &oci_spec::image::Descriptor,
) -> Result<LayerGzIndex, RangedOpenError> {
    source
        .handle
        .block_on(
            source
                .client
                .blob_range(&source.reference, desc, 0, desc.size.min(2)),
        )
        .map_err(RangedOpenError::Fetch)?;
    source.handle.block_on(fetch_index_blob(
        &source.client,
        &source.reference,
        desc,
        blob,
    ))
}

/// Fetches the published gzip index blob `blob` of layer `desc`, checks
/// its digest and bound, and decodes it for exactly that layer.
pub(super) async fn fetch_index_blob(
    client: &Client,
    reference: &Reference,
    desc: &LayerDesc,
    blob: &oci_spec::image::Descriptor,
) -> Result<LayerGzIndex, RangedOpenError> {
    let len = blob.size();
    if len > super::gzindex::BLOB_MAX {
        return Err(RangedOpenError::IndexTooLarge { len });
    }
    let blob_desc =
        LayerDesc {
            digest: blob.digest().to_string().parse().map_err(|_| {
                RangedOpenError::IndexDigest {
                    digest: blob.digest().to_string(),
                    actual: "an invalid digest".into(),
                }
            })?,
            media_type: blob.media_type().to_string(),
            size: len,
            urls: Vec::new(),
            diff_id: None,
            annotations: Default::default(),
        };
    let bytes = client
        .blob_range(reference, &blob_desc, 0, len)
        .await
        .map_err(RangedOpenError::Fetch)?;
    use sha2::Digest as _;
    let actual = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
    if actual != blob.digest().to_string() {
        return Err(RangedOpenError::IndexDigest {
            digest: blob.digest().to_string(),
            actual,
        });
    }
    Ok(LayerGzIndex::decode(&bytes, &desc.digest, desc.size)?)
}

/// Fetches and parses a layer's table of contents, verified against the
/// digest the manifest pins.
fn fetch_toc(
    source: &RegistryRange,
    desc: &LayerDesc,
    location: TocLocation,
) -> Result<toc::TocLayer, RangedOpenError> {
    let get = |start: u64, len: u64| -> Result<Vec<u8>, RangedOpenError> {
        if len > TOC_MAX {
            return Err(RangedOpenError::TooLarge { len });
        }
        source
            .handle
            .block_on(
                source
                    .client
                    .blob_range(&source.reference, desc, start, len),
            )
            .map(|b| b.to_vec())
            .map_err(RangedOpenError::Fetch)
    };
    match location {
        TocLocation::Range {
            kind,
            offset,
            len,
            digest,
            ..
        } => {
            let bytes = get(offset, len)?;
            Ok(toc::parse(
                kind,
                &bytes,
                Some(&digest),
                desc.size,
                &desc.digest,
            )?)
        }
        TocLocation::EstargzFooter { digest } => {
            let outside = |at| RangedOpenError::Footer {
                at,
                size: desc.size,
            };
            let footer_at = desc
                .size
                .checked_sub(toc::ESTARGZ_FOOTER)
                .ok_or(outside(0))?;
            let footer = get(footer_at, toc::ESTARGZ_FOOTER)?;
            let at = toc::estargz_footer(&footer)?;
            let len = footer_at.checked_sub(at).ok_or(outside(at))?;
            let bytes = get(at, len)?;
            Ok(toc::parse(
                TocKind::Estargz,
                &bytes,
                digest.as_deref(),
                desc.size,
                &desc.digest,
            )?)
        }
    }
}
