//! zstd:chunked's framing: the annotations that locate and pin the manifest
//! (the TOC), a zstd frame stored inside a skippable frame near the blob's end.

use std::io::Read;

use super::*;

/// `offset:len:uncompressed_len:type` (type 1, the CRFS-style TOC) from the
/// position annotation, with the checksum annotation of the same generation.
pub(super) fn locate(annotations: &BTreeMap<String, String>) -> Option<TocLocation> {
    let (pos, sum) = [
        (ZSTD_CHUNKED_POSITION, ZSTD_CHUNKED_CHECKSUM),
        (ZSTD_CHUNKED_POSITION_OLD, ZSTD_CHUNKED_CHECKSUM_OLD),
    ]
    .into_iter()
    .find_map(|(p, c)| Some((annotations.get(p)?, annotations.get(c)?)))?;
    let mut parts = pos.split(':').map(|p| p.parse::<u64>().ok());
    let (Some(Some(offset)), Some(Some(len)), Some(Some(uncompressed_len)), Some(Some(1)), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    // `offset:len:uncompressed_len`; one that does not parse is ignored
    // (the layer is then read whole, not trusted).
    let tar_split = annotations
        .get(ZSTD_CHUNKED_TARSPLIT_POSITION)
        .and_then(|p| {
            let mut parts = p.split(':').map(|p| p.parse::<u64>().ok());
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(Some(o)), Some(Some(l)), Some(Some(_)), None) => Some((o, l)),
                _ => None,
            }
        });
    Some(TocLocation::Range {
        kind: TocKind::ZstdChunked,
        offset,
        len,
        uncompressed_len,
        digest: sum.clone(),
        tar_split,
    })
}

/// Decompresses the manifest (one zstd frame), at most [`TOC_MAX`] bytes.
pub(super) fn toc_json(b: &Builder, bytes: &[u8]) -> Result<Vec<u8>, TocError> {
    let dec = zstd::stream::read::Decoder::with_buffer(bytes)
        .map_err(|e| b.corrupt(format!("zstd: {e}")))?
        .single_frame();
    let mut json = Vec::new();
    dec.take(TOC_MAX + 1)
        .read_to_end(&mut json)
        .map_err(|e| b.corrupt(format!("cannot decompress the TOC: {e}")))?;
    if json.len() as u64 > TOC_MAX {
        return Err(TocError::TooLarge {
            layer: b.layer.clone(),
            kind: b.kind,
        });
    }
    Ok(json)
}
