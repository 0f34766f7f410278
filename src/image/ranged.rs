//! Which layers are read by range, and how. A zstd:chunked layer with a
//! tar-split is opened from its table of contents once that table is proved
//! against the tar-split (see `image::tarsplit`); an eStargz layer, or a
//! zstd:chunked one without a tar-split, only when the user trusts tables of
//! contents (`--trust-toc`), since nothing short of the whole stream proves
//! them; a gzip layer through a published index. Files are then fetched
//! chunk by chunk, and the span maps here verify each chunk against the
//! digest its table states before a byte of it is kept. Every other layer
//! is fetched whole.
//!
//! A layer cached whole is read whole: the stream is what the manifest's
//! diff_id names, and a table of contents that disagrees with it has been
//! dropped (`Cache::audit_toc`). A gzip-indexed layer keeps the form it was
//! first opened in while its range cache lives, because a saved merged tree
//! points at addresses in that form.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::gzindex::{GzMeta, GzSpans, LayerGzIndex};
use super::{Blobs, ImageError, ImageSource};
use crate::cache::ranged::{BoxError, RangeSource, SpanLoc, SpanMap, VerifiedRead};
use crate::cache::{CacheError, Layer};
use crate::layer::toc::{self, TocChunk, TocKind, TocLocation};
use crate::reference::Reference;
use crate::registry::{Client, LayerDesc, RegistryError};

pub(super) use crate::cache::ranged::{GZ_INDEX, TARSPLIT, TOC};

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
    #[error("reading it: {0}")]
    Local(String),
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
    #[error("its table of contents pins no tar-split")]
    NoTarSplit,
    #[error(transparent)]
    TarSplit(#[from] toc::tarsplit::TarSplitError),
    #[error("split view: its table of contents {difference} (as its tar-split records it)")]
    SplitView { difference: String },
    #[error("its saved span map is of another index")]
    StaleMeta,
}

/// Fetches ranges of one blob from its registry, blocking the calling
/// thread (never a runtime thread) on the runtime that owns the client.
pub(super) struct RegistryRange {
    pub(super) client: Arc<Client>,
    pub(super) reference: Reference,
    desc: LayerDesc,
    pub(super) handle: tokio::runtime::Handle,
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
    /// `(address, len, crc, entry)`: the CRC-64 the tar-split gives each
    /// file's content, checked before any byte of the file is served.
    crcs: Vec<(u64, u64, u64, usize)>,
    /// The tar-split's range in the blob and its pin: once every chunk is
    /// held, the tar it rebuilds must hash to the diff_id.
    tar_split: Option<super::tarsplit::SplitAt>,
}

/// The chunks, and their layer as far as errors name it (entries' paths
/// only: the index itself is the cache's).
struct TocSpans {
    layer: toc::TocLayer,
    tar_split: Option<super::tarsplit::SplitAt>,
    /// Sorted by address (see [`TocMeta::crcs`]).
    crcs: Vec<(u64, u64, u64, usize)>,
    /// Files whose content matched their CRC-64.
    proved: std::sync::Mutex<std::collections::HashSet<usize>>,
}

thread_local! {
    /// Set while this thread reads a file to check its CRC-64: those reads
    /// are the check's own.
    static CHECKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
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
    fn audit_complete(
        &self,
        read: VerifiedRead<'_>,
        source: &dyn RangeSource,
        diff_id: &str,
    ) -> Result<bool, BoxError> {
        let Some((at, len, pin)) = self.tar_split.filter(|_| !diff_id.is_empty()) else {
            return Ok(false);
        };
        let bytes = source.fetch(at, len)?;
        let mut items = toc::tarsplit::open(&bytes, &pin, &self.layer.layer)?;
        let tar = super::tarsplit::rebuilt_diff_id(&mut items, &self.crcs, read)?;
        if tar != diff_id {
            return Err(format!(
                "split view: layer {}: the tar its tar-split and chunks rebuild hashes to {tar}, but the image config says {diff_id}",
                self.layer.layer
            )
            .into());
        }
        tracing::info!(
            "layer {}: every chunk held; the tar they rebuild with the tar-split matches the diff_id",
            self.layer.layer
        );
        Ok(true)
    }
    fn check_read(&self, offset: u64, read: VerifiedRead<'_>) -> Result<(), BoxError> {
        let Some(i) = self.crcs.partition_point(|c| c.0 <= offset).checked_sub(1) else {
            return Ok(());
        };
        let (start, len, want, entry) = self.crcs[i];
        if offset >= start + len || CHECKING.get() {
            return Ok(());
        }
        let proved = || self.proved.lock().unwrap_or_else(|e| e.into_inner());
        if proved().contains(&i) {
            return Ok(());
        }
        CHECKING.set(true);
        let mut crc = toc::tarsplit::Crc64::default();
        let mut buf = vec![0u8; (1 << 20).min(len as usize)];
        let mut at = start;
        let result = loop {
            if at >= start + len {
                break Ok(());
            }
            let n = (start + len - at).min(buf.len() as u64) as usize;
            if let Err(e) = read(at, &mut buf[..n]) {
                break Err(e);
            }
            crc.update(&buf[..n]);
            at += n as u64;
        };
        CHECKING.set(false);
        result?;
        if crc.value() != want {
            let path = self
                .layer
                .index
                .entries
                .get(entry)
                .map(|e| e.path.as_slice());
            return Err(format!(
                "split view: layer {}: {}: the content its TOC points at has CRC-64 {:016x}, its tar-split says {want:016x}",
                self.layer.layer,
                crate::names::escaped(path.unwrap_or_default()),
                crc.value()
            )
            .into());
        }
        proved().insert(i);
        Ok(())
    }
}

fn toc_meta(
    t: &toc::TocLayer,
    crcs: super::tarsplit::Crcs,
    tar_split: Option<super::tarsplit::SplitAt>,
) -> TocMeta {
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
        crcs,
        tar_split,
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
            tar_split_digest: None,
            kind: if m.zstd {
                TocKind::ZstdChunked
            } else {
                TocKind::Estargz
            },
            layer: m.layer,
        },
        crcs: m.crcs,
        tar_split: m.tar_split,
        proved: Default::default(),
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
            // A TOC is never preferred to the stream it should describe.
            Some(_) if self.cache.blob_path(&desc.digest).is_some() => return Ok(None),
            Some(location) => match self.toc_plan(index, location) {
                Some(p) => Some(p),
                None => return Ok(None),
            },
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
            Plan::TarSplit(_) => TARSPLIT,
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
                        "layer {}: read by range from its table of contents, trusted as --trust-toc says ({} entries, {} chunks)",
                        d.digest,
                        t.index.entries.len(),
                        t.chunks.len()
                    );
                    let meta = postcard::to_stdvec(&toc_meta(&t, Vec::new(), None))
                        .map_err(RangedOpenError::Meta)?;
                    Ok((t.index, meta))
                },
                toc_spans,
                source,
            ),
            Plan::TarSplit(location) => cache.open_ranged::<RangedOpenError>(
                &d,
                &image_ref,
                TARSPLIT,
                || {
                    let (t, crcs, split) = super::tarsplit::proved_toc(&fetcher, &d, location)?;
                    tracing::info!(
                        "layer {}: read by range from its table of contents, proved against its tar-split ({} entries, {} chunks)",
                        d.digest,
                        t.index.entries.len(),
                        t.chunks.len()
                    );
                    let meta = postcard::to_stdvec(&toc_meta(&t, crcs, Some(split)))
                        .map_err(RangedOpenError::Meta)?;
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
            // A TOC that disagrees with its tar-split, or a tar-split that
            // cannot be had or read: the layer's stream is read whole.
            Err(e) if form == TARSPLIT && !matches!(e, RangedOpenError::Fetch(_)) => {
                let e = self.ranged_error(index, e);
                tracing::error!("{}; the layer is fetched whole", crate::report::Chain(&e));
                self.cache.distrust(&desc.digest, TARSPLIT);
                Ok(None)
            }
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
    /// A table of contents taken on trust.
    Toc(TocLocation),
    /// A zstd:chunked TOC to prove against its tar-split.
    TarSplit(TocLocation),
    Published(Box<oci_spec::image::Descriptor>),
}

impl ImageSource {
    /// How layer `index`, whose TOC is at `location`, is read by range, if
    /// it is: proved against its tar-split when it has one, else only on
    /// trust (`--trust-toc`). `None`: read it whole (`-v` says why).
    fn toc_plan(&self, index: usize, location: TocLocation) -> Option<Plan> {
        let digest = &self.image.layers[index].digest;
        if let TocLocation::Range {
            tar_split: Some(_), ..
        } = location
            && !self.cache.is_distrusted(digest, TARSPLIT)
        {
            return Some(Plan::TarSplit(location));
        }
        if self.trust_toc && !self.cache.is_distrusted(digest, TOC) {
            return Some(Plan::Toc(location));
        }
        tracing::info!(
            "layer {index} ({digest}): its table of contents cannot be proved to describe its tar stream without reading the stream, so the layer is read whole (--trust-toc reads it by range)"
        );
        None
    }
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
pub(super) fn fetch_toc(
    source: &RegistryRange,
    desc: &LayerDesc,
    location: TocLocation,
) -> Result<toc::TocLayer, RangedOpenError> {
    read_toc(desc, location, |start, len| {
        source
            .handle
            .block_on(
                source
                    .client
                    .blob_range(&source.reference, desc, start, len),
            )
            .map(|b| b.to_vec())
            .map_err(RangedOpenError::Fetch)
    })
}

/// Reads and parses layer `desc`'s table of contents at `location`, its
/// bytes got from `get(start, len)` (by range from the registry, or from a
/// blob on disk: `rimg verify`).
pub(super) fn read_toc(
    desc: &LayerDesc,
    location: TocLocation,
    get: impl Fn(u64, u64) -> Result<Vec<u8>, RangedOpenError>,
) -> Result<toc::TocLayer, RangedOpenError> {
    let get = |start: u64, len: u64| {
        if len > TOC_MAX {
            return Err(RangedOpenError::TooLarge { len });
        }
        get(start, len)
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
            Ok(toc::parse_at(
                kind,
                &bytes,
                Some(&digest),
                desc.size,
                offset,
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
