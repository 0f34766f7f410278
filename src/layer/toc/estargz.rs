//! eStargz's framing: the footer that points at the TOC, and the TOC's own
//! gzip member (a tar holding `stargz.index.json`).

use std::io::Read;

use super::super::header::{HeaderError, parse_header};
use super::*;

/// Parses the 51-byte eStargz footer (an empty gzip member with FEXTRA whose
/// subfield `SG` holds `%016xSTARGZ`) and returns the TOC's offset in the
/// blob. The legacy 47-byte stargz footer is not accepted: its TOC ends 4
/// bytes later than [`parse`]'s contract assumes, and no current producer
/// writes it.
pub fn estargz_footer(footer: &[u8]) -> Result<u64, TocError> {
    let bad = |d: &str| Err(TocError::Footer(d.to_string()));
    if footer.len() as u64 != ESTARGZ_FOOTER {
        return bad(&format!(
            "{} bytes, expected {ESTARGZ_FOOTER}",
            footer.len()
        ));
    }
    // gzip header: magic, deflate, FEXTRA only (what the writer sets).
    if footer[0..3] != [0x1f, 0x8b, 8] || footer[3] & 0x04 == 0 || footer[3] & !0x04 != 0 {
        return bad("not a gzip member with an extra field");
    }
    let xlen = u16::from_le_bytes([footer[10], footer[11]]);
    if xlen != 26 {
        return bad(&format!("extra field of {xlen} bytes, expected 26"));
    }
    let extra = &footer[12..38];
    if &extra[0..2] != b"SG" || u16::from_le_bytes([extra[2], extra[3]]) != 22 {
        return bad("no SG subfield of 22 bytes");
    }
    if &extra[20..26] != b"STARGZ" {
        return bad("no STARGZ magic");
    }
    // The rest must be an empty stored block and an empty trailer.
    if footer[38..43] != [1, 0, 0, 0xff, 0xff] || footer[43..51].iter().any(|&b| b != 0) {
        return bad("not an empty gzip member");
    }
    let hex = std::str::from_utf8(&extra[4..20])
        .ok()
        .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()));
    let Some(off) = hex.and_then(|h| u64::from_str_radix(h, 16).ok()) else {
        return bad("the TOC offset is not 16 hex digits");
    };
    if off > i64::MAX as u64 {
        return bad("the TOC offset is out of range");
    }
    Ok(off)
}

/// The TOC JSON from the TOC's gzip member: a tar whose first entry is
/// `stargz.index.json`. Reads at most [`TOC_MAX`] bytes of JSON.
pub(super) fn toc_json(b: &Builder, bytes: &[u8]) -> Result<Vec<u8>, TocError> {
    let mut gz = flate2::bufread::GzDecoder::new(bytes);
    let mut block = [0u8; 512];
    gz.read_exact(&mut block)
        .map_err(|e| b.corrupt(format!("cannot decompress the TOC's tar header: {e}")))?;
    let h = match parse_header(&block) {
        Ok(h) => h,
        Err(HeaderError::NotTar(d)) => return Err(b.corrupt(d)),
        Err(HeaderError::Field(_, what)) => {
            return Err(b.corrupt(format!("the TOC's tar header has a bad {what}")));
        }
    };
    if h.name != b"stargz.index.json" || !matches!(h.typeflag, b'0' | 0) {
        return Err(b.corrupt(format!(
            "the TOC's tar entry is {:?}, not stargz.index.json",
            crate::names::escaped(&h.name)
        )));
    }
    if h.size < 0 || h.size as u64 > TOC_MAX {
        return Err(TocError::TooLarge {
            layer: b.layer.clone(),
            kind: b.kind,
        });
    }
    let mut json = Vec::new();
    (&mut gz)
        .take(h.size as u64)
        .read_to_end(&mut json)
        .map_err(|e| b.corrupt(format!("cannot decompress the TOC: {e}")))?;
    if json.len() as u64 != h.size as u64 {
        return Err(b.corrupt("the TOC's gzip member ends inside the JSON"));
    }
    Ok(json)
}
