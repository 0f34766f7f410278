//! `rimg verify`: everything about an image that can be checked against
//! the digests its manifest pins, layer by layer. Each layer is fetched and
//! inflated whole (its blob digest and diff_id checked on the way), and
//! whatever claims to describe it without being it (a published gzip
//! index, a table of contents) is compared with its tar stream, entries
//! and bytes. Trusts nothing but the manifest's digest: a check that cannot
//! be made says so instead of passing.

use std::io::Read;
use std::sync::Arc;

use serde::Serialize;

use super::{ImageError, ImageSource};
use crate::cache::{CacheError, Layer};
use crate::digest::Digest;
use crate::layer::zran;

/// One check of one layer; the list grows as rimg learns to check more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerCheck {
    /// The blob hashes to the digest the manifest gives it.
    Digest,
    /// The uncompressed tar hashes to the config's diff_id.
    DiffId,
    /// A published gzip index lists the tar's entries and decodes to its
    /// bytes.
    Index,
    /// A table of contents (eStargz, zstd:chunked) lists the tar's entries.
    Toc,
}

impl LayerCheck {
    pub fn name(self) -> &'static str {
        match self {
            LayerCheck::Digest => "digest",
            LayerCheck::DiffId => "diff_id",
            LayerCheck::Index => "index",
            LayerCheck::Toc => "toc",
        }
    }
}

/// How one check went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// What was wrong, in one line.
    Failed(String),
    /// Why it could not be made.
    Skipped(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub index: usize,
    pub digest: Digest,
    pub media_type: String,
    pub checks: Vec<(LayerCheck, Outcome)>,
}

impl LayerReport {
    pub fn failed(&self) -> impl Iterator<Item = (LayerCheck, &str)> {
        self.checks.iter().filter_map(|(c, o)| match o {
            Outcome::Failed(why) => Some((*c, why.as_str())),
            _ => None,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub reference: String,
    pub digest: String,
    pub manifest: Outcome,
    pub config: Outcome,
    pub layers: Vec<LayerReport>,
}

impl Report {
    /// Every failure, as `what: why`.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (what, o) in [("manifest", &self.manifest), ("config", &self.config)] {
            if let Outcome::Failed(why) = o {
                out.push(format!("{what}: {why}"));
            }
        }
        for l in &self.layers {
            for (c, why) in l.failed() {
                out.push(format!("layer {} {}: {why}", l.index, c.name()));
            }
        }
        out
    }
}

fn sha256(bytes: &[u8]) -> String {
    Digest::of_bytes(bytes).to_string()
}

impl ImageSource {
    /// Verifies the image: manifest and config against their digests, then
    /// every layer (see [`LayerCheck`]), one at a time.
    pub async fn verify(&self) -> Result<Report, ImageError> {
        let im = &self.image;
        let digest_of = |what: &str, bytes: &[u8], want: &str| {
            let got = sha256(bytes);
            if got == want {
                Outcome::Ok
            } else {
                Outcome::Failed(format!("{what} hashes to {got}, not {want}"))
            }
        };
        let manifest = digest_of("the manifest", &im.manifest_bytes, &im.digest);
        let config = digest_of("the config", &im.config_bytes, &im.config_digest);
        let mut layers = Vec::new();
        for i in 0..im.layers.len() {
            layers.push(self.verify_layer(i).await?);
        }
        Ok(Report {
            reference: im.reference.to_string(),
            digest: im.digest.clone(),
            manifest,
            config,
            layers,
        })
    }

    async fn verify_layer(&self, i: usize) -> Result<LayerReport, ImageError> {
        let desc = self.image.layers[i].clone();
        let mut report = LayerReport {
            index: i,
            digest: desc.digest.clone(),
            media_type: desc.media_type.clone(),
            checks: Vec::new(),
        };
        let layer = match self.layer_from(i, false).await {
            Ok(l) => l,
            Err(ImageError::Layer { source, .. }) => {
                let why = crate::report::Chain(&*source).to_string();
                let (digest, diff_id) = match *source {
                    CacheError::DiffId { .. } => (Outcome::Ok, Outcome::Failed(why)),
                    _ => (
                        Outcome::Failed(why),
                        Outcome::Skipped("the blob could not be read".into()),
                    ),
                };
                report.checks.push((LayerCheck::Digest, digest));
                report.checks.push((LayerCheck::DiffId, diff_id));
                return Ok(report);
            }
            Err(e) => return Err(e),
        };
        report.checks.push((LayerCheck::Digest, Outcome::Ok));
        report.checks.push((LayerCheck::DiffId, Outcome::Ok));
        if let Some(o) = self.verify_published_index(i, &layer).await {
            report.checks.push((LayerCheck::Index, o));
        }
        // Only a pinned TOC says anything: a gzip layer whose annotations
        // pin none is read whole, never through a TOC.
        if let Some(location) = crate::layer::toc::locate(&desc.media_type, &desc.annotations)
            .filter(|l| {
                !matches!(
                    l,
                    crate::layer::toc::TocLocation::EstargzFooter { digest: None }
                )
            })
        {
            report
                .checks
                .push((LayerCheck::Toc, self.verify_toc(i, location, &layer).await));
        }
        Ok(report)
    }

    /// Compares layer `i`'s table of contents, read from its verified
    /// blob, with the index of its tar stream: a split view is named by its
    /// first difference.
    async fn verify_toc(
        &self,
        i: usize,
        location: crate::layer::toc::TocLocation,
        layer: &Arc<Layer>,
    ) -> Outcome {
        let desc = self.image.layers[i].clone();
        let Some(path) = self.cache.blob_path(&desc.digest) else {
            return Outcome::Skipped("the layer's blob is not kept".into());
        };
        let layer = Arc::clone(layer);
        let checked = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let toc = super::ranged::read_toc(&desc, location, |start, len| {
                let mut b = vec![0; len as usize];
                f.read_exact_at(&mut b, start).map_err(|e| {
                    super::RangedOpenError::Local(format!("{}: {e}", path.display()))
                })?;
                Ok(b)
            })
            .map_err(|e| crate::report::Chain(&e).to_string())?;
            let real = layer
                .index()
                .map_err(|e| crate::report::Chain(&e).to_string())?;
            match crate::layer::first_difference(&toc.index, &real, false) {
                Some(d) => Err(format!("split view: its table of contents {d}")),
                None => Ok(()),
            }
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match checked {
            Ok(()) => Outcome::Ok,
            Err(why) => Outcome::Failed(why),
        }
    }

    /// Compares the published gzip index of layer `i` (if any) with the
    /// layer, whole and verified: its entries, then every checkpoint's
    /// bytes. `None` when no index is published for it.
    async fn verify_published_index(&self, i: usize, layer: &Arc<Layer>) -> Option<Outcome> {
        let super::Blobs::Registry(client) = &self.blobs else {
            return None;
        };
        let desc = &self.image.layers[i];
        let blob = self.published().await.get(&desc.digest).cloned()?;
        let ix = match super::ranged::fetch_index_blob(client, &self.image.reference, desc, &blob)
            .await
        {
            Ok(ix) => ix,
            Err(e) => {
                return Some(Outcome::Failed(format!(
                    "published index {}: {}",
                    blob.digest(),
                    crate::report::Chain(&e)
                )));
            }
        };
        let real = match layer.index() {
            Ok(r) => r,
            Err(e) => return Some(Outcome::Skipped(crate::report::Chain(&e).to_string())),
        };
        if let Some(d) = crate::layer::first_difference(&ix.entries, &real, true) {
            return Some(Outcome::Failed(format!(
                "split view: the published index {} {d}",
                blob.digest()
            )));
        }
        let Some(path) = self.cache.blob_path(&desc.digest) else {
            return Some(Outcome::Skipped("the layer's blob is not kept".into()));
        };
        let layer = Arc::clone(layer);
        let checked = tokio::task::spawn_blocking(move || spans_match(&ix, &path, &layer))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        Some(match checked {
            Ok(()) => Outcome::Ok,
            Err(why) => Outcome::Failed(format!(
                "the published index {} is forged: {why}",
                blob.digest()
            )),
        })
    }
}

/// Whether every checkpoint of `ix` decodes, from the blob at `blob`, to
/// the layer's own tar bytes (a forged window does not).
fn spans_match(
    ix: &super::LayerGzIndex,
    blob: &std::path::Path,
    layer: &Layer,
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(blob).map_err(|e| format!("{}: {e}", blob.display()))?;
    for (k, s) in ix.zran.spans.iter().enumerate() {
        let mut compressed = vec![0; s.clen as usize];
        f.read_exact_at(&mut compressed, s.cstart)
            .map_err(|e| format!("{}: {e}", blob.display()))?;
        let decoded = zran::decode_span(s, &compressed)
            .map_err(|e| format!("checkpoint {k}: {}", crate::report::Chain(&e)))?;
        let mut real = vec![0; s.out_len as usize];
        let mut r = crate::image::FileData::new(Some(layer), s.out, s.out_len, None);
        r.read_exact(&mut real)
            .map_err(|e| format!("reading tar bytes at {}: {e}", s.out))?;
        if let Some(at) = decoded.iter().zip(&real).position(|(a, b)| a != b) {
            return Err(format!(
                "checkpoint {k} decodes tar byte {} as {:#04x}, the layer has {:#04x} (a forged window)",
                s.out + at as u64,
                decoded[at],
                real[at]
            ));
        }
    }
    Ok(())
}
