//! Proving a zstd:chunked table of contents against the layer's tar-split
//! before any entry is served: the tar-split (pinned by the TOC, fetched by
//! range) holds every header of the tar stream, whiteouts and extension
//! headers included. The entries its headers make must be the TOC's, entry
//! for entry; each file's content is then checked against the tar-split's
//! CRC-64 before any byte of the file is served (see `TocSpans`).
//!
//! What this trusts: that the tar-split describes the stream docker would
//! unpack. The manifest pins the blob, the blob's TOC pins the tar-split;
//! whether the stream itself agrees is checked whenever it is read whole
//! (`Cache::audit_toc`, and the diff_id check of the tar the tar-split
//! rebuilds).

use crate::layer::first_difference;
use crate::layer::toc::{self, TocLocation, tarsplit};
use crate::registry::LayerDesc;

use super::ranged::{RangedOpenError, RegistryRange, fetch_toc};

/// `(address, len, crc, entry)` per non-empty regular file, by address.
pub(super) type Crcs = Vec<(u64, u64, u64, usize)>;

/// A tar-split's range in the blob and its pin.
pub(super) type SplitAt = (u64, u64, [u8; 32]);

/// Fetches the TOC and its tar-split, and proves one against the other.
/// Returns the TOC, each file's checksum, and the tar-split's range and pin.
pub(super) fn proved_toc(
    source: &RegistryRange,
    desc: &LayerDesc,
    location: TocLocation,
) -> Result<(toc::TocLayer, Crcs, SplitAt), RangedOpenError> {
    let TocLocation::Range {
        tar_split: Some((ts_off, ts_len)),
        ..
    } = location
    else {
        return Err(RangedOpenError::NoTarSplit);
    };
    let t = fetch_toc(source, desc, location)?;
    let pin = t.tar_split_digest.ok_or(RangedOpenError::NoTarSplit)?;
    if ts_len > toc::TOC_MAX {
        return Err(RangedOpenError::TooLarge { len: ts_len });
    }
    let bytes = source
        .handle
        .block_on(
            source
                .client
                .blob_range(&source.reference, desc, ts_off, ts_len),
        )
        .map_err(RangedOpenError::Fetch)?;
    let mut items = tarsplit::open(&bytes, &pin, &desc.digest)?;
    let split = tarsplit::index_tar_split(&mut items, &desc.digest)?;
    if let Some(d) = first_difference(&t.index, &split.index, false) {
        return Err(RangedOpenError::SplitView {
            difference: d.to_string(),
        });
    }
    let mut crcs = Vec::new();
    for (i, (e, s)) in t.index.entries.iter().zip(&split.index.entries).enumerate() {
        if s.sparse.is_some() {
            return Err(RangedOpenError::SplitView {
                difference: format!(
                    "{}: a sparse file, which a TOC cannot describe",
                    crate::names::escaped(&s.path)
                ),
            });
        }
        if e.kind != crate::layer::EntryKind::File || e.size == 0 {
            continue;
        }
        let k = split.files.partition_point(|f| f.0 < s.offset);
        match split.files.get(k) {
            Some(&(at, size, Some(crc))) if at == s.offset && size == s.size => {
                crcs.push((e.offset, e.size, crc, i));
            }
            _ => {
                return Err(RangedOpenError::SplitView {
                    difference: format!(
                        "{}: the tar-split has no checksum of its content",
                        crate::names::escaped(&s.path)
                    ),
                });
            }
        }
    }
    crcs.sort_unstable();
    Ok((t, crcs, (ts_off, ts_len, pin)))
}

/// The diff_id of the tar a tar-split rebuilds with each non-empty payload,
/// in order, read at the address `crcs` gives it (TOC order is tar order).
pub(super) fn rebuilt_diff_id<R: std::io::BufRead>(
    items: &mut tarsplit::Items<R>,
    crcs: &Crcs,
    read: crate::cache::ranged::VerifiedRead<'_>,
) -> Result<String, crate::cache::ranged::BoxError> {
    use sha2::Digest as _;
    let mut by_tar: Vec<_> = crcs.iter().map(|c| (c.3, c.0, c.1)).collect();
    by_tar.sort_unstable();
    let mut files = by_tar.into_iter();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    while let Some(item) = items.next_item()? {
        match item {
            tarsplit::Item::Segment(b) => h.update(&b),
            tarsplit::Item::File { size: 0, .. } => {}
            tarsplit::Item::File { size, .. } => {
                let Some((_, start, len)) = files.next().filter(|f| f.2 == size) else {
                    return Err("the tar-split's payloads are not the TOC's files".into());
                };
                let mut at = start;
                while at < start + len {
                    let n = (start + len - at).min(buf.len() as u64) as usize;
                    read(at, &mut buf[..n])?;
                    h.update(&buf[..n]);
                    at += n as u64;
                }
            }
        }
    }
    if files.next().is_some() {
        return Err("the tar-split has fewer payloads than the TOC has files".into());
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}
