//! Gzip checkpoint indexes shared through the registry: what one machine
//! that read a plain gzip layer whole publishes so that others can read it
//! by range (zlib's zran, as SOCI and nydus do).
//!
//! The artifact (pushed by `rimg index push` as a referrer of the image
//! manifest, found through the referrers API or its `sha256-<hex>` fallback
//! tag):
//! - `artifactType` [`ARTIFACT_TYPE`];
//! - one layer blob per gzip layer of the image, media type [`BLOB_TYPE`],
//!   annotated with [`LAYER_ANNOTATION`] = the image layer's digest; its
//!   content is zstd-compressed postcard of [`LayerGzIndex`]: the layer's
//!   tar entries and its checkpoints (every ~4 MiB of tar, each with its
//!   32 KiB window, deflated, and the sha256 of the compressed span).
//!
//! Trust: anyone who can push to the repository can push an index, and
//! what an index says cannot be fully checked until the whole layer is
//! held: its entry list (a hidden file, an omitted whiteout) and its 32 KiB
//! checkpoint windows (which change inflated bytes while the compressed
//! ones hash right). So a published index is used only when trusted: built
//! in this cache ([`Cache::note_local_index`]), signed by a key the policy
//! trusts ([`ImageSource::published_index_signed`]), or vouched for by the
//! user (`--trust-index`). An untrusted one is ignored and the layer read
//! whole.
//!
//! Even a trusted index is checked as far as it can be: it is used only for
//! the exact layer digest and size it names; its decoded size is bounded by
//! the layer's, its entries and checkpoints are capped; indexes with sparse
//! files, hardlinks or file names a tar header cannot hold alone are
//! refused (their headers cannot be checked from one block); each span's
//! compressed bytes are checked against its hash before it is decoded;
//! before a file's bytes are served, the tar header in front of them must
//! describe that file (name, size, mode); once every span is held the tar
//! must hash to the layer's diff_id; and when the layer is fetched whole or
//! prefetched, the index is compared with the real one. Any mismatch
//! distrusts the index and drops every byte it decoded. `--no-index` turns
//! all of this off.
//!
//! [`Cache::note_local_index`]: crate::cache::Cache::note_local_index

use std::collections::HashMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::cache::ranged::{BoxError, SpanLoc, SpanMap, VerifiedRead};
use crate::digest::Digest;
use crate::layer::zran::{self, ZranIndex};
use crate::layer::{Entry, EntryKind, LayerIndex};

pub const ARTIFACT_TYPE: &str = "application/vnd.rimg.gzip-index.v1";
pub const BLOB_TYPE: &str = "application/vnd.rimg.gzip-index.layer.v1+zstd";
pub const LAYER_ANNOTATION: &str = "dev.rimg.layer.digest";
/// A published layer index larger than this is not fetched.
pub const BLOB_MAX: u64 = 256 << 20;
/// Decoded, an index may be at most this large, and at most
/// [`DECODED_PER_BLOB_BYTE`] times its layer's blob plus [`DECODED_SLACK`]
/// (an honest index is a few percent of its layer).
const DECODED_MAX: u64 = 256 << 20;
const DECODED_PER_BLOB_BYTE: u64 = 2;
const DECODED_SLACK: u64 = 1 << 20;
/// Entries an index may list: as many as a table of contents.
pub const ENTRIES_MAX: usize = crate::layer::toc::ENTRIES_MAX;
/// The longest file name a tar header holds without an extension header.
const HEADER_NAME_MAX: usize = 100;
const FORMAT: u32 = 1;

/// One layer's published index.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LayerGzIndex {
    pub format: u32,
    /// The layer blob's digest and size this index is of.
    pub layer: Digest,
    pub blob_size: u64,
    #[serde(deserialize_with = "bounded_entries")]
    pub entries: LayerIndex,
    pub zran: ZranIndex,
}

/// A [`LayerIndex`] of at most [`ENTRIES_MAX`] entries, refused from its
/// announced count before anything is allocated.
fn bounded_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<LayerIndex, D::Error> {
    #[derive(Deserialize)]
    struct Bounded {
        #[serde(deserialize_with = "entries")]
        entries: Vec<Entry>,
    }
    fn entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Entry>, D::Error> {
        d.deserialize_seq(zran::BoundedSeq::<Entry>::new(ENTRIES_MAX, "entries"))
    }
    Bounded::deserialize(d).map(|b| LayerIndex { entries: b.entries })
}

#[derive(Debug, thiserror::Error)]
pub enum GzIndexError {
    #[error("the published index is not a rimg gzip index (format {0})")]
    Format(u32),
    #[error("the published index cannot be decoded")]
    Decode(#[source] BoxError),
    #[error("the published index is of layer {found}, not this one")]
    OtherLayer { found: Digest },
    #[error("the published index puts file data at tar offset {at}, where no file's data can be")]
    Layout { at: u64 },
    #[error("the published index's checkpoints are malformed")]
    Zran(#[source] zran::ZranError),
    #[error("the published index lists {count} entries, more than {ENTRIES_MAX}")]
    TooManyEntries { count: u64 },
    #[error(
        "the published index decodes to more than {limit} bytes, over the bound for a {blob}-byte layer"
    )]
    TooLarge { limit: u64, blob: u64 },
    #[error(
        "the published index lists {path}, {why}: its tar header cannot be checked from one block, so the index is not used"
    )]
    Unchecked { path: String, why: &'static str },
}

/// Why an entry's tar header could not be checked before its bytes are
/// served, if so: such an index is refused whole.
fn unchecked(e: &Entry) -> Option<&'static str> {
    if e.sparse.is_some() {
        return Some("a sparse file");
    }
    if e.kind == EntryKind::Hardlink {
        return Some("a hardlink");
    }
    let data = e.kind == EntryKind::File && e.size > 0;
    if data && (e.path.len() > HEADER_NAME_MAX || !e.path.is_ascii()) {
        return Some("a name that needs a long-name or PAX header");
    }
    None
}

impl LayerGzIndex {
    pub fn encode(&self) -> Result<Vec<u8>, GzIndexError> {
        let plain = postcard::to_stdvec(self).map_err(|e| GzIndexError::Decode(e.into()))?;
        zstd::encode_all(&plain[..], 9).map_err(|e| GzIndexError::Decode(e.into()))
    }

    /// Decodes a published index of the layer `digest` of `size` bytes,
    /// checking it names exactly that layer and has well-formed spans.
    pub fn decode(bytes: &[u8], digest: &str, size: u64) -> Result<LayerGzIndex, GzIndexError> {
        let limit = size
            .saturating_mul(DECODED_PER_BLOB_BYTE)
            .saturating_add(DECODED_SLACK)
            .min(DECODED_MAX);
        let mut plain = Vec::new();
        zstd::stream::read::Decoder::new(bytes)
            .map_err(|e| GzIndexError::Decode(e.into()))?
            .take(limit + 1)
            .read_to_end(&mut plain)
            .map_err(|e| GzIndexError::Decode(e.into()))?;
        if plain.len() as u64 > limit {
            return Err(GzIndexError::TooLarge { limit, blob: size });
        }
        // The entry count is read before the entries: a count over the cap
        // is refused with that reason (the bounded deserializer refuses it
        // too, but postcard drops custom messages).
        if let Ok((_, rest)) = postcard::take_from_bytes::<(u32, Digest, u64)>(&plain)
            && let Ok((count, _)) = postcard::take_from_bytes::<u64>(rest)
            && count > ENTRIES_MAX as u64
        {
            return Err(GzIndexError::TooManyEntries { count });
        }
        let ix: LayerGzIndex =
            postcard::from_bytes(&plain).map_err(|e| GzIndexError::Decode(e.into()))?;
        if ix.format != FORMAT {
            return Err(GzIndexError::Format(ix.format));
        }
        if *ix.layer != *digest || ix.blob_size != size || ix.zran.compressed_size != size {
            return Err(GzIndexError::OtherLayer { found: ix.layer });
        }
        ix.zran.validate().map_err(GzIndexError::Zran)?;
        if let Some((e, why)) = ix
            .entries
            .entries
            .iter()
            .find_map(|e| unchecked(e).map(|why| (e, why)))
        {
            return Err(GzIndexError::Unchecked {
                path: crate::names::escaped(&e.path).to_string(),
                why,
            });
        }
        // In a real tar every file's data has its own place after its
        // header; overlapping data would let one file's check vouch for
        // another's bytes.
        let mut data: Vec<(u64, u64)> = ix
            .entries
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| {
                let stored = e.sparse.as_deref().map_or(e.size, |s| {
                    s.iter().map(|g| g.stored + g.len).max().unwrap_or(0)
                });
                (e.offset, stored)
            })
            .filter(|&(_, len)| len > 0)
            .collect();
        data.sort_unstable();
        let mut end = 0;
        for (at, len) in data {
            if at < end + 512
                || at
                    .checked_add(len)
                    .is_none_or(|e| e > ix.zran.uncompressed_size)
            {
                return Err(GzIndexError::Layout { at });
            }
            end = at + len;
        }
        Ok(ix)
    }
}

/// What is kept beside the range cache of a layer read through a
/// published index: its checkpoints, and each file's data offset with what
/// its tar header must say.
#[derive(Serialize, Deserialize)]
pub(super) struct GzMeta {
    /// [`META_MAGIC`]: metadata an older rimg wrote is made again.
    magic: [u8; 8],
    /// The published index blob it was made from: a kept range cache is
    /// used only while that index is the one published (and trusted).
    pub(super) source: String,
    layer: Digest,
    zran: ZranIndex,
    /// Sorted by offset: (data offset, size, mode, path) of every regular
    /// file with data.
    files: Vec<(u64, u64, u32, Vec<u8>)>,
}

const META_MAGIC: [u8; 8] = *b"rimgGz02";

impl GzMeta {
    pub(super) fn new(ix: &LayerGzIndex, source: &str) -> GzMeta {
        let mut files: Vec<(u64, u64, u32, Vec<u8>)> = ix
            .entries
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File && e.size > 0 && e.sparse.is_none())
            .map(|e| (e.offset, e.size, e.mode, e.path.clone()))
            .collect();
        files.sort();
        GzMeta {
            magic: META_MAGIC,
            source: source.to_string(),
            layer: ix.layer.clone(),
            zran: ix.zran.clone(),
            files,
        }
    }

    /// Reads metadata this rimg wrote from the index blob `source`.
    pub(super) fn read(bytes: &[u8], source: &str) -> Option<GzMeta> {
        let m: GzMeta = postcard::from_bytes(bytes).ok()?;
        (m.magic == META_MAGIC && m.source == source).then_some(m)
    }
}

/// The spans of a layer read through a published gzip index.
pub(super) struct GzSpans {
    meta: GzMeta,
    /// Files whose tar header was checked.
    checked: std::sync::Mutex<Vec<u64>>,
}

impl GzSpans {
    pub(super) fn new(meta: GzMeta) -> GzSpans {
        let words = meta.files.len().div_ceil(64);
        GzSpans {
            meta,
            checked: std::sync::Mutex::new(vec![0; words]),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("layer {layer}: span at tar offset {out}")]
struct SpanError {
    layer: Digest,
    out: u64,
    #[source]
    source: zran::ZranError,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "layer {layer}: the published index puts {path} at tar offset {offset}, but the tar header there says otherwise ({why}); the index is not trusted"
)]
pub struct ForgedOffset {
    layer: Digest,
    path: String,
    offset: u64,
    why: String,
}

impl SpanMap for GzSpans {
    fn count(&self) -> usize {
        self.meta.zran.spans.len()
    }
    fn span(&self, i: usize) -> SpanLoc {
        let s = &self.meta.zran.spans[i];
        SpanLoc {
            start: s.out,
            len: s.out_len,
            coff: s.cstart,
            clen: s.clen,
        }
    }
    fn decode(&self, i: usize, compressed: &[u8]) -> Result<Vec<u8>, BoxError> {
        let s = &self.meta.zran.spans[i];
        zran::decode_span(s, compressed).map_err(|source| {
            Box::new(SpanError {
                layer: self.meta.layer.clone(),
                out: s.out,
                source,
            }) as BoxError
        })
    }
    fn addresses_are_tar(&self) -> bool {
        true
    }
    fn check_read(&self, offset: u64, read: VerifiedRead<'_>) -> Result<(), BoxError> {
        let files = &self.meta.files;
        let Some(k) = files.partition_point(|f| f.0 <= offset).checked_sub(1) else {
            return Ok(());
        };
        let (at, size, mode, path) = &files[k];
        if offset >= at + size {
            return Ok(());
        }
        let bit = |c: &Vec<u64>| c[k / 64] & (1 << (k % 64)) != 0;
        if bit(&self.checked.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(());
        }
        let forged = |why: String| -> BoxError {
            Box::new(ForgedOffset {
                layer: self.meta.layer.clone(),
                path: crate::names::escaped(path).to_string(),
                offset: *at,
                why,
            })
        };
        let header_at = at
            .checked_sub(512)
            .ok_or_else(|| forged("no room for a header".into()))?;
        let mut block = [0u8; 512];
        read(header_at, &mut block)?;
        check_header(&block, *size, *mode, path).map_err(forged)?;
        let mut c = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        c[k / 64] |= 1 << (k % 64);
        Ok(())
    }
}

/// Whether the tar header block in front of a file's data describes it:
/// a valid checksum, a regular file, its size, its mode and its whole name
/// (an index whose file names need extension headers is refused when
/// decoded, so the header alone must hold the name).
fn check_header(block: &[u8; 512], size: u64, mode: u32, path: &[u8]) -> Result<(), String> {
    let h = tar::Header::from_byte_slice(block);
    let stored = h.cksum().map_err(|_| "no checksum".to_string())?;
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u32
            }
        })
        .sum();
    if stored != sum {
        return Err("not a tar header".into());
    }
    let t = h.entry_type();
    if !(t.is_file() || t == tar::EntryType::Continuous) {
        return Err(format!("entry type {:?}", t.as_byte() as char));
    }
    // A PAX size overrides the field; a field that disagrees is only
    // wrong when it could hold the size.
    let field = h.entry_size().map_err(|_| "unreadable size".to_string())?;
    if field != size && size < 0o77777777777 {
        return Err(format!("size {field}, the index says {size}"));
    }
    let name = crate::layer::normalize(&h.path_bytes());
    // A full name field may hold a name cut short: `./` in front of a
    // 99-byte path (as `tar -C dir .` writes) takes 101 bytes. Only exactly
    // that cut is accepted; any other name is a lie.
    let cut = |p: &[u8]| p.len() >= 100 && p[..100] == block[..100];
    let dotted = [b"./".as_slice(), path].concat();
    if name != path && !(block[99] != 0 && (cut(path) || cut(&dotted))) {
        return Err(format!("name {}", crate::names::escaped(&name)));
    }
    // No extension header can change a mode.
    let stored = h.mode().map_err(|_| "unreadable mode".to_string())? & 0o7777;
    if stored != mode {
        return Err(format!("mode {stored:04o}, the index says {mode:04o}"));
    }
    Ok(())
}

/// The newest rimg index artifact that refers to the image: its manifest's
/// digest (what a signature would cover) and its blob descriptors by layer
/// digest.
#[derive(Default)]
pub(super) struct Published {
    pub(super) artifact: String,
    pub(super) blobs: HashMap<String, oci_spec::image::Descriptor>,
}

impl Published {
    pub(super) fn get(&self, layer: &str) -> Option<&oci_spec::image::Descriptor> {
        self.blobs.get(layer)
    }
}

pub(super) fn published_from(
    manifest: &oci_spec::image::ImageManifest,
) -> HashMap<String, oci_spec::image::Descriptor> {
    let mut out = HashMap::new();
    for l in manifest.layers() {
        if l.media_type().to_string() != BLOB_TYPE {
            continue;
        }
        if let Some(d) = l
            .annotations()
            .as_ref()
            .and_then(|a| a.get(LAYER_ANNOTATION))
        {
            out.insert(d.clone(), l.clone());
        }
    }
    out
}

/// Builds a layer's published index from its blob (read locally, once).
pub fn build(
    layer_digest: &Digest,
    blob: impl Read,
    entries: LayerIndex,
) -> Result<LayerGzIndex, zran::ZranError> {
    let blob = std::io::BufReader::with_capacity(1 << 20, blob);
    let mut b = zran::ZranBuilder::new(blob, zran::DEFAULT_SPACING);
    std::io::copy(&mut b, &mut std::io::sink()).map_err(zran::ZranError::Io)?;
    let zran = b.finish()?;
    Ok(LayerGzIndex {
        format: FORMAT,
        layer: layer_digest.clone(),
        blob_size: zran.compressed_size,
        entries,
        zran,
    })
}

/// Publishing and finding indexes.
impl super::ImageSource {
    /// Builds the published index of every gzip layer, from the layers
    /// cached whole (fetched now if need be): `(layer number, index)`.
    pub async fn build_gz_indexes(&self) -> Result<Vec<(usize, LayerGzIndex)>, super::ImageError> {
        let layers = self.cached_layers().await?;
        let mut out = Vec::new();
        for (i, layer) in layers.into_iter().enumerate() {
            let desc = self.image.layers[i].clone();
            let Some(blob) = self.cache.blob_path(&desc.digest) else {
                continue;
            };
            let entries = layer.index().map_err(|e| self.layer_error(i, e))?;
            let built =
                tokio::task::spawn_blocking(move || -> Result<_, super::RangedOpenError> {
                    let mut f = std::fs::File::open(&blob).map_err(|e| {
                        super::RangedOpenError::Cache(crate::cache::CacheError::Io {
                            path: blob.display().to_string(),
                            source: e,
                        })
                    })?;
                    let mut head = [0u8; 2];
                    let gzip = f.read_exact(&mut head).is_ok() && head == [0x1f, 0x8b];
                    if !gzip {
                        return Ok(None);
                    }
                    let f = std::fs::File::open(&blob).map_err(|e| {
                        super::RangedOpenError::Cache(crate::cache::CacheError::Io {
                            path: blob.display().to_string(),
                            source: e,
                        })
                    })?;
                    Ok(Some(build(&desc.digest, f, entries).map_err(|e| {
                        super::RangedOpenError::Index(GzIndexError::Zran(e))
                    })?))
                })
                .await
                .map_err(|source| super::ImageError::Worker {
                    digest: self.image.layers[i].digest.clone(),
                    source,
                })?
                .map_err(|e| self.ranged_error(i, e))?;
            if let Some(ix) = built {
                // Built here from the verified layer: this cache trusts it
                // when it is published (the encoding is deterministic).
                let bytes = ix
                    .encode()
                    .map_err(|e| self.ranged_error(i, super::RangedOpenError::Index(e)))?;
                self.cache.note_local_index(
                    &ix.layer,
                    super::ranged::GZ_INDEX,
                    Digest::of_bytes(&bytes).as_ref(),
                );
                out.push((i, ix));
            }
        }
        Ok(out)
    }

    /// Pushes the image's gzip indexes as an artifact referring to its
    /// manifest; returns the artifact's digest and the blobs' sizes.
    pub async fn push_gz_indexes(
        &self,
        built: &[(usize, LayerGzIndex)],
    ) -> Result<String, super::ImageError> {
        let super::Blobs::Registry(client) = &self.blobs else {
            return Err(super::ImageError::NotRemote {
                reference: self.image.reference.to_string(),
            });
        };
        let mut layers = Vec::new();
        for (i, ix) in built {
            let bytes = ix
                .encode()
                .map_err(|e| self.ranged_error(*i, super::RangedOpenError::Index(e)))?;
            layers.push(crate::registry::ArtifactBlob {
                media_type: BLOB_TYPE.to_string(),
                bytes: bytes.into(),
                annotations: [(LAYER_ANNOTATION.to_string(), ix.layer.to_string())].into(),
            });
        }
        let subject = oci_spec::image::DescriptorBuilder::default()
            .media_type(oci_spec::image::MediaType::from(
                self.image.media_type.as_str(),
            ))
            .digest(
                self.image
                    .digest
                    .parse::<oci_spec::image::Digest>()
                    .map_err(|e| super::ImageError::Push {
                        reference: self.image.reference.to_string(),
                        source: crate::registry::RegistryError::Invalid {
                            what: self.image.digest.to_string(),
                            kind: "digest",
                            detail: e.to_string(),
                        },
                    })?,
            )
            .size(self.image.manifest_bytes.len() as u64)
            .build()
            .expect("all descriptor fields set");
        let artifact = crate::registry::Artifact {
            artifact_type: ARTIFACT_TYPE.to_string(),
            config: None,
            layers,
            annotations: Default::default(),
        };
        client
            .push_referrer(&self.image.reference, &subject, &artifact)
            .await
            .map_err(|source| super::ImageError::Push {
                reference: self.image.reference.to_string(),
                source,
            })
    }

    /// Whether the published index artifact `artifact` (a manifest digest)
    /// is signed the cosign way by a key the trust policy's
    /// `sigstoreSigned` requirements name for this image's repository.
    /// A signature that cannot be fetched or checked counts as none.
    pub(super) async fn published_index_signed(&self, artifact: &str) -> bool {
        let (Some(trust), super::Blobs::Registry(client)) = (&self.trust, &self.blobs) else {
            return false;
        };
        match trust
            .artifact_signed(client, &self.image.reference, artifact)
            .await
        {
            Ok(signed) => signed,
            Err(e) => {
                tracing::info!(
                    "{}: the signature of published index {artifact}: {}",
                    self.image.reference,
                    crate::report::Chain(&e)
                );
                false
            }
        }
    }

    /// Why the published index blob `blob` of layer `layer` may be used, or
    /// `None` when it is not trusted (and so must be ignored).
    pub(super) async fn index_trust(
        &self,
        layer: &Digest,
        blob: &oci_spec::image::Descriptor,
    ) -> Option<&'static str> {
        if self.trust_index {
            return Some("--trust-index");
        }
        if self
            .cache
            .is_local_index(layer, super::ranged::GZ_INDEX, blob.digest().as_ref())
        {
            return Some("built in this cache");
        }
        let artifact = self.published().await.artifact.clone();
        if self.published_index_signed(&artifact).await {
            return Some("signed by a trusted key");
        }
        None
    }

    /// The newest published index artifact of the image, by layer digest;
    /// empty when there is none or it cannot be had (an index is a hint).
    pub(super) async fn published(&self) -> &Published {
        self.published
            .get_or_init(|| async {
                let super::Blobs::Registry(client) = &self.blobs else {
                    return Published::default();
                };
                match self.find_published(client).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(
                            "{}: looking for a published gzip index: {}",
                            self.image.reference,
                            crate::report::Chain(&e)
                        );
                        Published::default()
                    }
                }
            })
            .await
    }

    async fn find_published(
        &self,
        client: &crate::registry::Client,
    ) -> Result<Published, crate::registry::RegistryError> {
        let found = client
            .referrers(
                &self.image.reference,
                &self.image.digest,
                Some(ARTIFACT_TYPE),
            )
            .await?;
        let Some(newest) = found.last() else {
            return Ok(Published::default());
        };
        let digest = newest.digest().to_string();
        let raw = client
            .fetch_manifest(&self.image.reference.with_digest(&digest))
            .await?;
        let manifest: oci_spec::image::ImageManifest =
            serde_json::from_slice(&raw.bytes).map_err(|e| {
                crate::registry::RegistryError::Invalid {
                    what: format!("gzip index {digest}"),
                    kind: "image manifest",
                    detail: e.to_string(),
                }
            })?;
        let blobs = published_from(&manifest);
        tracing::info!(
            "{}: published gzip index {digest} covers {} layers",
            self.image.reference,
            blobs.len()
        );
        Ok(Published {
            artifact: digest,
            blobs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn header_before(tar: &[u8], data_at: u64) -> [u8; 512] {
        tar[data_at as usize - 512..data_at as usize]
            .try_into()
            .unwrap()
    }

    #[test]
    fn the_header_in_front_of_a_file_must_describe_it() {
        let tar = tar_of(&[("etc/a", b"aaaa"), ("etc/b", b"bbbbbbbb")]);
        let idx = crate::layer::index_tar(&tar[..], "sha256:t").unwrap();
        let (a, b) = (&idx.entries[0], &idx.entries[1]);
        assert!(check_header(&header_before(&tar, a.offset), a.size, a.mode, &a.path).is_ok());
        // A forged index pointing b's name at a's bytes: name and size differ.
        let e = check_header(&header_before(&tar, a.offset), b.size, b.mode, &b.path).unwrap_err();
        assert!(e.contains("size"), "{e}");
        let e = check_header(&header_before(&tar, a.offset), a.size, a.mode, b"etc/b").unwrap_err();
        assert!(e.contains("name"), "{e}");
        // An offset into the middle of data: no valid header there.
        let mut junk = [b'x'; 512];
        junk[0] = b'e';
        assert!(check_header(&junk, a.size, a.mode, &a.path).is_err());
        // A forged mode (a setuid bit the tar does not have).
        let e = check_header(&header_before(&tar, a.offset), a.size, 0o4755, &a.path).unwrap_err();
        assert!(e.contains("mode"), "{e}");
    }

    #[test]
    fn a_name_cut_short_by_a_dot_slash_prefix_is_not_a_lie() {
        // 99 bytes of path; with "./" in front the header's 100 bytes cut it.
        let path = format!("usr/{}", "x".repeat(95));
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(4);
        h.as_old_mut()
            .name
            .copy_from_slice(&format!("./{path}").as_bytes()[..100]);
        h.set_cksum();
        let block: [u8; 512] = h.as_bytes()[..].try_into().unwrap();
        assert!(check_header(&block, 4, 0o644, path.as_bytes()).is_ok());
        // Another name in a full field is still refused.
        let other = format!("usr/{}", "y".repeat(95));
        assert!(check_header(&block, 4, 0o644, other.as_bytes()).is_err());
    }

    #[test]
    fn a_published_index_is_refused_for_another_layer_or_size() {
        let tar = tar_of(&[("f", b"data")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let blob = gz.finish().unwrap();
        let entries = crate::layer::index_tar(&tar[..], "sha256:l").unwrap();
        let l = Digest::of_bytes(b"l");
        let ix = build(&l, &blob[..], entries).unwrap();
        let bytes = ix.encode().unwrap();
        let n = blob.len() as u64;
        assert_eq!(LayerGzIndex::decode(&bytes, &l, n).unwrap(), ix);
        assert!(matches!(
            LayerGzIndex::decode(&bytes, &Digest::of_bytes(b"other"), n),
            Err(GzIndexError::OtherLayer { .. })
        ));
        assert!(LayerGzIndex::decode(&bytes, &l, n + 1).is_err());
        assert!(LayerGzIndex::decode(&bytes[..bytes.len() / 2], &l, n).is_err());
    }

    /// An honest index of a small gzip layer, its layer digest and size.
    fn small_index() -> (LayerGzIndex, Digest, u64) {
        let tar = tar_of(&[("etc/a", b"aaaa"), ("etc/b", b"bbbbbbbb")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let blob = gz.finish().unwrap();
        let entries = crate::layer::index_tar(&tar[..], "sha256:l").unwrap();
        let l = Digest::of_bytes(&blob);
        (build(&l, &blob[..], entries).unwrap(), l, blob.len() as u64)
    }

    #[test]
    fn an_index_with_entries_whose_headers_cannot_be_checked_is_refused() {
        let (honest, l, n) = small_index();
        let forge = |f: &dyn Fn(&mut LayerGzIndex)| {
            let mut ix = honest.clone();
            f(&mut ix);
            LayerGzIndex::decode(&ix.encode().unwrap(), &l, n).unwrap_err()
        };
        let e = forge(&|ix| {
            ix.entries.entries[0].sparse = Some(Box::new([crate::layer::Segment {
                logical: 0,
                stored: 0,
                len: 1,
            }]))
        });
        assert!(e.to_string().contains("sparse"), "{e}");
        let e = forge(&|ix| {
            let mut h = Entry::new(b"etc/passwd", EntryKind::Hardlink);
            h.link = Some(b"etc/a".to_vec());
            ix.entries.entries.push(h);
        });
        assert!(e.to_string().contains("hardlink"), "{e}");
        let e = forge(&|ix| ix.entries.entries[0].path = vec![b'x'; 114]);
        assert!(e.to_string().contains("long-name"), "{e}");
    }

    #[test]
    fn a_tiny_index_announcing_millions_of_entries_is_refused_before_decoding_them() {
        use std::io::Write;
        let (honest, l, n) = small_index();
        let mut plain = postcard::to_stdvec(&(1u32, &l, n)).unwrap();
        plain.extend(postcard::to_stdvec(&30_000_000u64).unwrap());
        let one = postcard::to_stdvec(&Entry::new(b"x", EntryKind::File)).unwrap();
        let mut z = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        z.write_all(&plain).unwrap();
        for _ in 0..1000 {
            z.write_all(&one).unwrap();
        }
        let bomb = z.finish().unwrap();
        let e = LayerGzIndex::decode(&bomb, &l, n).unwrap_err();
        assert!(
            matches!(e, GzIndexError::TooManyEntries { count: 30_000_000 }),
            "{e}"
        );
        // Decoding past twice the layer plus 1 MiB is refused as it inflates.
        let mut z = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        z.write_all(&vec![0u8; 3 << 20]).unwrap();
        let e = LayerGzIndex::decode(&z.finish().unwrap(), &l, n).unwrap_err();
        assert!(matches!(e, GzIndexError::TooLarge { .. }), "{e}");
        let _ = honest;
    }
}
