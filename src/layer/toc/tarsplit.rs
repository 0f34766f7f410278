//! zstd:chunked's tar-split: the layer's tar stream with file contents left
//! out, as vbatts/tar-split's `storage` package writes it (and
//! containers/storage stores it in a skippable frame, pinned by the TOC's
//! `tarSplitDigest`). It holds every byte of the stream except file
//! payloads: raw headers (extension headers and whiteouts included) and all
//! padding, byte for byte.
//!
//! The format is JSON lines, each `{"type":T,"name":..,"size":..,"payload":..,
//! "position":N}` with positions counting from 0: type 2 (a segment) carries
//! raw stream bytes in `payload` (base64); type 1 (a file) stands for `size`
//! payload bytes of the entry `name` (or `name_raw`, base64), its `payload`
//! the big-endian CRC-64 (ISO polynomial) of those bytes.
//!
//! What it is trusted for: nothing until its digest matches the TOC's pin;
//! then it is the stream's own headers, so the index made from it
//! ([`index_tar_split`]) is what indexing the stream gives, and the TOC's
//! entries are proved against it. Whether it matches the stream itself is
//! only known once the stream is: [`check_against_stream`].

use std::io::{self, BufRead, Read};

use base64::Engine as _;
use serde::Deserialize;

use crate::layer::{LayerError, LayerIndex};

/// A decompressed tar-split larger than this is refused.
pub const TARSPLIT_MAX: u64 = 1 << 30;
/// A line (one segment: a header with its extension data) longer than this
/// is refused.
const LINE_MAX: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TarSplitError {
    #[error("layer {layer}: its tar-split has digest {actual}, but the TOC pins {expected}")]
    Digest {
        layer: String,
        expected: String,
        actual: String,
    },
    #[error("layer {layer}: its tar-split is corrupt: {detail}")]
    Corrupt { layer: String, detail: String },
    #[error("layer {layer}: its tar-split's headers")]
    Tar {
        layer: String,
        #[source]
        source: LayerError,
    },
    #[error("layer {layer}: its tar-split disagrees with the tar stream: {detail}")]
    Stream { layer: String, detail: String },
}

/// One tar-split record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Raw bytes of the stream.
    Segment(Vec<u8>),
    /// `size` payload bytes with this CRC-64 (none for an empty payload).
    File { size: u64, crc: Option<u64> },
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: i64,
    #[serde(default)]
    size: i64,
    #[serde(default)]
    payload: Option<String>,
    position: i64,
}

/// The records of a tar-split, read one line at a time from its
/// decompressed JSON lines.
pub struct Items<R> {
    reader: R,
    layer: String,
    position: i64,
    line: Vec<u8>,
    total: u64,
}

impl<R: BufRead> Items<R> {
    pub fn new(reader: R, layer: &str) -> Items<R> {
        Items {
            reader,
            layer: layer.to_string(),
            position: 0,
            line: Vec::new(),
            total: 0,
        }
    }

    fn corrupt(&self, detail: impl Into<String>) -> TarSplitError {
        TarSplitError::Corrupt {
            layer: self.layer.clone(),
            detail: detail.into(),
        }
    }

    /// The next record, `None` at the end.
    pub fn next_item(&mut self) -> Result<Option<Item>, TarSplitError> {
        self.line.clear();
        let n = (&mut self.reader)
            .take(LINE_MAX as u64 + 1)
            .read_until(b'\n', &mut self.line)
            .map_err(|e| self.corrupt(format!("cannot decompress: {e}")))?;
        if n == 0 {
            return Ok(None);
        }
        if self.line.len() > LINE_MAX {
            return Err(self.corrupt(format!("a record longer than {LINE_MAX} bytes")));
        }
        self.total += n as u64;
        if self.total > TARSPLIT_MAX {
            return Err(self.corrupt(format!("more than {TARSPLIT_MAX} bytes")));
        }
        let raw: Raw = serde_json::from_slice(&self.line)
            .map_err(|e| self.corrupt(format!("record {}: {e}", self.position)))?;
        if raw.position != self.position {
            return Err(self.corrupt(format!(
                "record {} says it is at position {}",
                self.position, raw.position
            )));
        }
        self.position += 1;
        let payload = match &raw.payload {
            None => Vec::new(),
            Some(p) => base64::engine::general_purpose::STANDARD
                .decode(p)
                .map_err(|e| self.corrupt(format!("record {}: {e}", raw.position)))?,
        };
        match raw.kind {
            2 => Ok(Some(Item::Segment(payload))),
            1 => {
                let size = u64::try_from(raw.size)
                    .map_err(|_| self.corrupt(format!("record {}: negative size", raw.position)))?;
                let crc = match payload.len() {
                    0 => None,
                    8 => Some(u64::from_be_bytes(payload.try_into().expect("8 bytes"))),
                    n => {
                        return Err(self.corrupt(format!(
                            "record {}: a checksum of {n} bytes, not 8",
                            raw.position
                        )));
                    }
                };
                Ok(Some(Item::File { size, crc }))
            }
            t => Err(self.corrupt(format!("record {}: unknown type {t}", raw.position))),
        }
    }
}

/// Verifies a compressed tar-split against its pin and returns its records.
pub fn open<'a>(
    compressed: &'a [u8],
    digest: &[u8; 32],
    layer: &str,
) -> Result<Items<io::BufReader<zstd::stream::read::Decoder<'a, &'a [u8]>>>, TarSplitError> {
    use sha2::Digest as _;
    let got: [u8; 32] = sha2::Sha256::digest(compressed).into();
    if got != *digest {
        return Err(TarSplitError::Digest {
            layer: layer.to_string(),
            expected: format!("sha256:{}", hex::encode(digest)),
            actual: format!("sha256:{}", hex::encode(got)),
        });
    }
    let dec = zstd::stream::read::Decoder::with_buffer(compressed).map_err(|e| {
        TarSplitError::Corrupt {
            layer: layer.to_string(),
            detail: format!("zstd: {e}"),
        }
    })?;
    Ok(Items::new(io::BufReader::new(dec), layer))
}

/// The stream a tar-split describes with every payload byte zero: what
/// the tar reader needs to index the headers (it skips payloads).
struct Headers<'a, R> {
    items: &'a mut Items<R>,
    /// Bytes of the current segment still to give, or zeros of a payload.
    pending: Pending,
    pos: u64,
    /// `(address, size, crc)` of every non-empty payload.
    files: Vec<(u64, u64, Option<u64>)>,
    failed: Option<TarSplitError>,
}

enum Pending {
    Bytes(Vec<u8>, usize),
    Zeros(u64),
}

impl<R: BufRead> Read for Headers<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match &mut self.pending {
                Pending::Bytes(b, at) if *at < b.len() => {
                    let n = buf.len().min(b.len() - *at);
                    buf[..n].copy_from_slice(&b[*at..*at + n]);
                    *at += n;
                    self.pos += n as u64;
                    return Ok(n);
                }
                Pending::Zeros(left) if *left > 0 => {
                    let n = buf.len().min(*left as usize);
                    buf[..n].fill(0);
                    *left -= n as u64;
                    self.pos += n as u64;
                    return Ok(n);
                }
                _ => {}
            }
            match self.items.next_item() {
                Ok(None) => return Ok(0),
                Ok(Some(Item::Segment(b))) => self.pending = Pending::Bytes(b, 0),
                Ok(Some(Item::File { size, crc })) => {
                    if size > 0 {
                        self.files.push((self.pos, size, crc));
                    }
                    self.pending = Pending::Zeros(size);
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.failed = Some(e);
                    return Err(io::Error::other(msg));
                }
            }
        }
    }
}

/// A tar-split's index: the entries its headers make, exactly as
/// [`crate::layer::index_tar`] makes them from the stream (addresses are
/// the stream's), and each file's payload checksum by its address.
pub struct SplitIndex {
    pub index: LayerIndex,
    /// `(address, size, crc)` of every non-empty payload, in stream order.
    pub files: Vec<(u64, u64, Option<u64>)>,
    /// Bytes of the tar the tar-split describes.
    pub tar_size: u64,
}

/// Indexes the headers of a tar-split.
pub fn index_tar_split<R: BufRead>(
    items: &mut Items<R>,
    layer: &str,
) -> Result<SplitIndex, TarSplitError> {
    let mut h = Headers {
        items,
        pending: Pending::Zeros(0),
        pos: 0,
        files: Vec::new(),
        failed: None,
    };
    let indexed = crate::layer::index_tar(&mut h, layer);
    if let Some(e) = h.failed.take() {
        return Err(e);
    }
    let index = indexed.map_err(|source| TarSplitError::Tar {
        layer: layer.to_string(),
        source,
    })?;
    Ok(SplitIndex {
        index,
        files: h.files,
        tar_size: h.pos,
    })
}

/// Go's `hash/crc64` with the ISO table, as tar-split checksums payloads.
pub struct Crc64(u64);

const fn iso_table() -> [u64; 256] {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u64;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xD800_0000_0000_0000
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static ISO: [u64; 256] = iso_table();

impl Default for Crc64 {
    fn default() -> Self {
        Crc64(!0)
    }
}

impl Crc64 {
    pub fn update(&mut self, data: &[u8]) {
        let mut c = self.0;
        for &b in data {
            c = ISO[((c as u8) ^ b) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }
    pub fn value(&self) -> u64 {
        !self.0
    }
}

/// Checks a tar-split against a tar stream that was read whole (`stream`
/// reads `len` bytes of it at an offset): every segment byte that falls
/// inside the stream must be the stream's, every payload must lie inside it
/// with the checksum the tar-split states, and the tar-split must cover the
/// whole stream. Bytes it describes past the stream's end (the padding some
/// writers leave out of the compressed stream) must be zeros. Returns how
/// many such bytes follow the stream: appended, they make the exact tar the
/// tar-split was made from.
pub fn check_against_stream<R: BufRead>(
    items: &mut Items<R>,
    len: u64,
    stream: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    layer: &str,
) -> Result<u64, TarSplitError> {
    let lie = |detail: String| TarSplitError::Stream {
        layer: layer.to_string(),
        detail,
    };
    let io = |e: io::Error| lie(format!("cannot read the stream: {e}"));
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while let Some(item) = items.next_item()? {
        match item {
            Item::Segment(b) => {
                let inside = (len.saturating_sub(pos)).min(b.len() as u64) as usize;
                for (k, piece) in b[..inside].chunks(buf.len()).enumerate() {
                    let at = pos + (k * buf.len()) as u64;
                    let got = &mut buf[..piece.len()];
                    stream(at, got).map_err(io)?;
                    if got != piece {
                        let off = got.iter().zip(piece).position(|(a, b)| a != b).unwrap_or(0);
                        return Err(lie(format!(
                            "byte {} of the stream differs from the tar-split's",
                            at + off as u64
                        )));
                    }
                }
                if b[inside..].iter().any(|&c| c != 0) {
                    return Err(lie(format!(
                        "it describes bytes other than zero padding past the stream's end at {len}"
                    )));
                }
                pos += b.len() as u64;
            }
            Item::File { size, crc } => {
                if pos.checked_add(size).is_none_or(|e| e > len) {
                    return Err(lie(format!(
                        "a payload of {size} bytes at {pos} lies past the stream's end at {len}"
                    )));
                }
                let mut c = Crc64::default();
                let mut at = pos;
                while at < pos + size {
                    let n = (pos + size - at).min(buf.len() as u64) as usize;
                    stream(at, &mut buf[..n]).map_err(io)?;
                    c.update(&buf[..n]);
                    at += n as u64;
                }
                if let Some(want) = crc
                    && c.value() != want
                {
                    return Err(lie(format!(
                        "the payload at {pos} has CRC-64 {:016x}, the tar-split says {want:016x}",
                        c.value()
                    )));
                }
                pos += size;
            }
        }
    }
    if pos < len {
        return Err(lie(format!(
            "it ends at {pos}, before the stream's end at {len}"
        )));
    }
    Ok(pos - len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar-split of `tar` as tar-split writes one: for every header, a
    /// segment of the bytes since the last payload and a file record.
    pub(crate) fn write(tar: &[u8]) -> Vec<u8> {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let index = crate::layer::index_tar(tar, "test").expect("a tar");
        let (mut out, mut pos, mut n) = (Vec::new(), 0usize, 0);
        let mut line = |v: serde_json::Value| {
            out.extend(serde_json::to_vec(&v).expect("json"));
            out.push(b'\n');
        };
        for e in &index.entries {
            let (at, size) = (e.offset as usize, e.size as usize);
            line(serde_json::json!({"type": 2, "payload": b64(&tar[pos..at]), "position": n}));
            let mut c = Crc64::default();
            c.update(&tar[at..at + size]);
            let crc = (size > 0).then(|| b64(&c.value().to_be_bytes()));
            line(
                serde_json::json!({"type": 1, "name": "x", "size": size, "payload": crc, "position": n + 1}),
            );
            n += 2;
            pos = at + size;
        }
        line(serde_json::json!({"type": 2, "payload": b64(&tar[pos..]), "position": n}));
        out
    }

    fn tar(padding_to: usize) -> Vec<u8> {
        tar_mode(padding_to, 0o644)
    }

    fn tar_mode(padding_to: usize, mode: u32) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path("etc/motd").unwrap();
        h.set_size(6);
        h.set_mode(mode);
        h.set_cksum();
        b.append(&h, &b"hello\n"[..]).unwrap();
        let mut t = b.into_inner().unwrap();
        t.resize(t.len().div_ceil(padding_to) * padding_to, 0);
        t
    }

    fn items(split: &[u8]) -> Items<&[u8]> {
        Items::new(split, "sha256:l")
    }

    #[test]
    fn crc64_is_gos_iso_checksum() {
        let mut d = Crc64::default();
        d.update(b"123456789");
        // The CRC-64/GO-ISO check value.
        assert_eq!(d.value(), 0xb909_56c7_75a4_1001);
    }

    #[test]
    fn a_tar_splits_headers_index_as_the_stream_does() {
        let t = tar(10240);
        let split = write(&t);
        let s = index_tar_split(&mut items(&split), "sha256:l").unwrap();
        assert_eq!(
            s.index,
            crate::layer::index_tar(&t[..], "sha256:l").unwrap()
        );
        assert_eq!(s.tar_size, 10240);
        assert_eq!(s.files.len(), 1);
    }

    #[test]
    fn the_padding_a_stream_leaves_out_is_restored_from_the_tar_split_and_nothing_else() {
        let t = tar(10240);
        let split = write(&t);
        let short = &t[..2048];
        let mut read = |at: u64, b: &mut [u8]| -> io::Result<()> {
            b.copy_from_slice(&short[at as usize..at as usize + b.len()]);
            Ok(())
        };
        let pad = check_against_stream(&mut items(&split), 2048, &mut read, "sha256:l").unwrap();
        assert_eq!(pad, 10240 - 2048);
        // A tar-split whose padding is not zeros is refused.
        let mut lying = t.clone();
        lying[9000] = 1;
        let e = check_against_stream(&mut items(&write(&lying)), 2048, &mut read, "sha256:l");
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("other than zero padding")
        );
        // So is one whose header differs from the stream's.
        let other = tar_mode(10240, 0o4755);
        let e = check_against_stream(&mut items(&write(&other)), 2048, &mut read, "sha256:l");
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("byte 103 of the stream differs")
        );
        // And one that ends before the stream does.
        let e = check_against_stream(&mut items(&write(&t[..1536])), 2048, &mut read, "sha256:l");
        assert!(e.is_err());
    }

    #[test]
    fn a_payload_checksum_that_does_not_match_the_stream_is_refused() {
        let t = tar(1024);
        let mut other = t.clone();
        other[512] = b'j'; // "jello"
        let split = write(&other);
        let mut read = |at: u64, b: &mut [u8]| -> io::Result<()> {
            b.copy_from_slice(&t[at as usize..at as usize + b.len()]);
            Ok(())
        };
        let e = check_against_stream(&mut items(&split), t.len() as u64, &mut read, "sha256:l");
        assert!(e.unwrap_err().to_string().contains("CRC-64"));
    }

    #[test]
    fn records_out_of_position_or_of_unknown_type_are_corrupt() {
        let bad = b"{\"type\":2,\"payload\":\"\",\"position\":1}\n";
        assert!(items(bad).next_item().is_err());
        let bad = b"{\"type\":3,\"payload\":\"\",\"position\":0}\n";
        assert!(items(bad).next_item().is_err());
    }
}
