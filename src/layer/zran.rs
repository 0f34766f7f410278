//! Random access into gzip layers: a checkpoint index in the manner of zlib's
//! `examples/zran.c` (and SOCI's zTOC), built during the one pass that already
//! inflates a layer, and the decoder that turns one indexed span of compressed
//! bytes back into its exact uncompressed bytes.
//!
//! A checkpoint sits at a DEFLATE block boundary roughly every `spacing`
//! uncompressed bytes. It records where the block starts in the compressed
//! stream (byte and bit), where its output starts, and the 32 KiB of output
//! before it (the window back-references may reach into). Consecutive
//! checkpoints delimit spans; each span carries the sha256 of the compressed
//! bytes it needs, so a span fetched by range from an untrusted source is
//! verified before a byte of it is inflated.
//!
//! The first span starts at the gzip header (compressed offset 0, no window);
//! every later span starts inside a member, in raw DEFLATE. A span may cross
//! member boundaries (trailer, then a new gzip header).
//!
//! Inflation is zlib-rs through its zlib-compatible C API (`libz-rs-sys`),
//! since that API is what exposes `Z_BLOCK`, `inflatePrime` and the
//! dictionary calls; the `unsafe` in this module is confined to those calls.

use std::io::{self, Read};

use flate2::Compression;
use libz_rs_sys::{
    Z_BLOCK, Z_BUF_ERROR, Z_NO_FLUSH, Z_OK, Z_STREAM_END, inflate, inflateEnd,
    inflateGetDictionary, inflateInit2_, inflatePrime, inflateReset2, inflateSetDictionary,
    z_stream, zlibVersion,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Uncompressed bytes between checkpoints (SOCI uses the same).
pub const DEFAULT_SPACING: u64 = 4 << 20;
/// Largest span `decode_span` accepts, in uncompressed bytes; bounds the
/// allocation an index (which may come from anyone) can cause.
pub const MAX_SPAN_OUT: u64 = 64 << 20;
/// Largest span `decode_span` accepts, in compressed bytes. Stored blocks
/// expand by a few bytes per 64 KiB, so any honest span of at most
/// `MAX_SPAN_OUT` bytes fits well within this.
pub const MAX_SPAN_IN: u64 = 128 << 20;
/// The DEFLATE window: the most output a back-reference can reach.
pub const WINDOW: usize = 32 << 10;
/// Spacing is clamped to this so that honest spans stay decodable
/// (a span is `spacing` plus at most one deflate block, plus one read).
const MAX_SPACING: u64 = 32 << 20;
const IN_BUF: usize = 256 << 10;
/// zlib `windowBits`: gzip wrapper only, and raw deflate.
const GZIP_BITS: i32 = 31;
const RAW_BITS: i32 = -15;

#[derive(Debug, thiserror::Error)]
pub enum ZranError {
    #[error(
        "span at uncompressed offset {out} (compressed {cstart}+{clen}): the compressed bytes do not match the index's sha256"
    )]
    HashMismatch { out: u64, cstart: u64, clen: u64 },
    #[error("corrupt deflate data at compressed offset {offset}: {detail}")]
    Corrupt { offset: u64, detail: String },
    #[error("compressed data ends at byte {offset} before the stream (or span) is complete")]
    Truncated { offset: u64 },
    #[error("bad zran index: {0}")]
    BadIndex(String),
    #[error("reading the compressed stream")]
    Io(#[source] io::Error),
    #[error("zran index requested before the gzip stream was read to its end")]
    NotFinished,
    #[error("zlib-rs {call} failed with code {code}")]
    Zlib { call: &'static str, code: i32 },
}

/// One checkpointed stretch of the uncompressed stream and the compressed
/// bytes that decode it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ZSpan {
    /// Uncompressed offset of the span's first byte.
    pub out: u64,
    /// Uncompressed bytes in the span (spans tile `[0, uncompressed_size)`).
    pub out_len: u64,
    /// First compressed byte needed (includes the partial byte when `bits > 0`).
    pub cstart: u64,
    /// Compressed bytes needed from `cstart` to decode the whole span.
    pub clen: u64,
    /// Bits of the byte at `cstart` already consumed by the previous span (0..8).
    pub bits: u8,
    /// The window (up to 32 KiB of preceding output), raw-deflate-compressed.
    pub window: Vec<u8>,
    /// sha256 of compressed bytes `[cstart, cstart + clen)`.
    pub sha256: [u8; 32],
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ZranIndex {
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// At most [`SPANS_MAX`]: an index may come from anyone, and a count
    /// is refused before anything is allocated for it.
    #[serde(deserialize_with = "bounded_spans")]
    pub spans: Vec<ZSpan>,
}

/// Checkpoints an index may have: 4 TiB of tar at the default spacing.
pub const SPANS_MAX: usize = 1 << 20;

fn bounded_spans<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ZSpan>, D::Error> {
    d.deserialize_seq(BoundedSeq::<ZSpan>::new(SPANS_MAX, "checkpoints"))
}

/// Deserializes a sequence of at most `max` items, refusing a longer one
/// from its announced length before allocating, or as items arrive.
pub struct BoundedSeq<T> {
    max: usize,
    what: &'static str,
    _item: std::marker::PhantomData<T>,
}

impl<T> BoundedSeq<T> {
    pub fn new(max: usize, what: &'static str) -> Self {
        BoundedSeq {
            max,
            what,
            _item: std::marker::PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for BoundedSeq<T> {
    type Value = Vec<T>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at most {} {}", self.max, self.what)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let too_many = || {
            <A::Error as serde::de::Error>::custom(format!("more than {} {}", self.max, self.what))
        };
        let hint = seq.size_hint().unwrap_or(0);
        if hint > self.max {
            return Err(too_many());
        }
        let mut out = Vec::with_capacity(hint.min(4096));
        while let Some(x) = seq.next_element()? {
            if out.len() == self.max {
                return Err(too_many());
            }
            out.push(x);
        }
        Ok(out)
    }
}

impl ZranIndex {
    /// The span holding `uncompressed_offset`, or `None` past the end.
    pub fn span_of(&self, uncompressed_offset: u64) -> Option<usize> {
        if uncompressed_offset >= self.uncompressed_size {
            return None;
        }
        let i = self
            .spans
            .partition_point(|s| s.out <= uncompressed_offset)
            .checked_sub(1)?;
        let s = &self.spans[i];
        (uncompressed_offset - s.out < s.out_len).then_some(i)
    }

    /// Checks the index's shape (an index may come from anyone): spans tile
    /// the uncompressed stream in order, lie inside the compressed blob, and
    /// each is small enough for `decode_span`. Content is checked per span by
    /// its hash when decoded.
    pub fn validate(&self) -> Result<(), ZranError> {
        let bad = |m: String| Err(ZranError::BadIndex(m));
        let mut next = 0u64;
        for (i, s) in self.spans.iter().enumerate() {
            if s.out != next {
                return bad(format!("span {i} starts at {} instead of {next}", s.out));
            }
            if s.bits > 7 {
                return bad(format!("span {i} has bit offset {}", s.bits));
            }
            if s.out_len > MAX_SPAN_OUT || s.clen > MAX_SPAN_IN {
                return bad(format!("span {i} is larger than a span may be"));
            }
            match s.cstart.checked_add(s.clen) {
                Some(end) if end <= self.compressed_size => {}
                _ => return bad(format!("span {i} reaches past the compressed blob")),
            }
            next = s.out + s.out_len;
        }
        if next != self.uncompressed_size {
            return bad(format!(
                "spans cover {next} bytes but the stream has {}",
                self.uncompressed_size
            ));
        }
        Ok(())
    }
}

/// Owns one zlib-rs inflate stream. Boxed because zlib keeps a pointer back
/// to the `z_stream` in its state and checks it on every call.
struct Inflater {
    strm: Box<z_stream>,
}

// SAFETY: the z_stream and the state it points to are owned exclusively by
// this value (no thread-local or shared data in zlib-rs); the raw pointers
// into caller buffers are cleared after every call.
unsafe impl Send for Inflater {}

impl Inflater {
    fn new(window_bits: i32) -> Result<Self, ZranError> {
        let mut strm = Box::new(z_stream::default());
        let size = std::mem::size_of::<z_stream>() as i32;
        // SAFETY: strm is a default-initialised z_stream (zlib-rs's default
        // allocator) at a stable heap address; version and size are the
        // library's own.
        let code = unsafe { inflateInit2_(&mut *strm, window_bits, zlibVersion(), size) };
        if code != Z_OK {
            return Err(ZranError::Zlib {
                call: "inflateInit2",
                code,
            });
        }
        Ok(Inflater { strm })
    }

    /// One `inflate` call: returns (bytes consumed, bytes produced, code).
    fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: i32) -> (usize, usize, i32) {
        let avail_in = input.len().min(u32::MAX as usize) as u32;
        let avail_out = output.len().min(u32::MAX as usize) as u32;
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out;
        // SAFETY: the stream was initialised by inflateInit2_; next_in/next_out
        // point at `avail_in`/`avail_out` valid bytes of borrowed slices that
        // outlive this call.
        let code = unsafe { inflate(&mut *self.strm, flush) };
        let consumed = (avail_in - self.strm.avail_in) as usize;
        let produced = (avail_out - self.strm.avail_out) as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        (consumed, produced, code)
    }

    fn reset(&mut self, window_bits: i32) -> Result<(), ZranError> {
        // SAFETY: initialised stream; inflateReset2 only touches its state.
        let code = unsafe { inflateReset2(&mut *self.strm, window_bits) };
        zcheck("inflateReset2", code)
    }

    fn prime(&mut self, bits: i32, value: i32) -> Result<(), ZranError> {
        // SAFETY: initialised stream; bits is 1..=7.
        let code = unsafe { inflatePrime(&mut *self.strm, bits, value) };
        zcheck("inflatePrime", code)
    }

    fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), ZranError> {
        // SAFETY: initialised raw stream; dict is a valid slice of at most
        // WINDOW bytes, copied by the call.
        let code =
            unsafe { inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as u32) };
        zcheck("inflateSetDictionary", code)
    }

    /// Copies the current window (up to 32 KiB) into `buf`, returns its length.
    fn dictionary(&self, buf: &mut [u8; WINDOW]) -> Result<usize, ZranError> {
        let mut len: u32 = 0;
        // SAFETY: initialised stream whose window is at most 32 KiB (windowBits
        // 15), so it fits the WINDOW-byte buffer; len is a valid out pointer.
        let code = unsafe { inflateGetDictionary(&*self.strm, buf.as_mut_ptr(), &mut len) };
        zcheck("inflateGetDictionary", code)?;
        Ok((len as usize).min(WINDOW))
    }

    fn data_type(&self) -> i32 {
        self.strm.data_type
    }

    fn message(&self) -> String {
        if self.strm.msg.is_null() {
            return "invalid deflate data".to_string();
        }
        // SAFETY: zlib-rs sets msg to a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by inflateInit2_ and is ended once.
        unsafe { inflateEnd(&mut *self.strm) };
    }
}

fn zcheck(call: &'static str, code: i32) -> Result<(), ZranError> {
    if code == Z_OK {
        Ok(())
    } else {
        Err(ZranError::Zlib { call, code })
    }
}

/// An empty window is stored as no bytes at all (the first span, and spans
/// that start right after a member's header).
fn compress_window(window: &[u8]) -> Vec<u8> {
    use std::io::Write;
    if window.is_empty() {
        return Vec::new();
    }
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), Compression::best());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(window);
    enc.finish().unwrap_or_default()
}

fn expand_window(compressed: &[u8]) -> Result<Vec<u8>, ZranError> {
    let mut window = Vec::with_capacity(WINDOW);
    if compressed.is_empty() {
        return Ok(window);
    }
    flate2::read::DeflateDecoder::new(compressed)
        .take(WINDOW as u64 + 1)
        .read_to_end(&mut window)
        .map_err(|e| ZranError::BadIndex(format!("span window does not inflate: {e}")))?;
    if window.len() > WINDOW {
        return Err(ZranError::BadIndex("span window exceeds 32 KiB".into()));
    }
    Ok(window)
}

/// The span being recorded.
struct Open {
    out: u64,
    cstart: u64,
    bits: u8,
    window: Vec<u8>,
    hasher: Sha256,
}

impl Open {
    fn close(self, end_out: u64, end_in: u64) -> ZSpan {
        ZSpan {
            out: self.out,
            out_len: end_out - self.out,
            cstart: self.cstart,
            clen: end_in - self.cstart,
            bits: self.bits,
            window: self.window,
            sha256: self.hasher.finalize().into(),
        }
    }
}

/// Inflates a gzip stream (one or more concatenated members, like flate2's
/// `MultiGzDecoder`) while recording checkpoints; a drop-in `Read` for the
/// cache's single fetch pass. Trailing bytes after a member that are not a
/// gzip header are an error, as in Go's `gzip.Reader` and flate2.
pub struct ZranBuilder<R: Read> {
    src: R,
    spacing: u64,
    z: Result<Inflater, Option<ZranError>>,
    inbuf: Box<[u8]>,
    in_pos: usize,
    in_len: usize,
    eof: bool,
    total_in: u64,
    total_out: u64,
    /// The last 8 compressed bytes consumed: zlib-rs may hold up to 63 bits
    /// in its bit buffer at a block boundary, so the next block can start in
    /// any of them.
    tail: [u8; 8],
    member_ended: bool,
    done: bool,
    /// The error that stopped the pass; `finish` hands it out.
    failed: Option<ZranError>,
    spans: Vec<ZSpan>,
    open: Option<Open>,
    window_buf: Box<[u8; WINDOW]>,
}

impl<R: Read> ZranBuilder<R> {
    /// `spacing` is clamped to 1 B ..= 32 MiB so every span stays decodable.
    pub fn new(compressed: R, spacing: u64) -> Self {
        ZranBuilder {
            src: compressed,
            spacing: spacing.clamp(1, MAX_SPACING),
            z: Inflater::new(GZIP_BITS).map_err(Some),
            inbuf: vec![0; IN_BUF].into_boxed_slice(),
            in_pos: 0,
            in_len: 0,
            eof: false,
            total_in: 0,
            total_out: 0,
            tail: [0; 8],
            member_ended: false,
            done: false,
            failed: None,
            spans: Vec::new(),
            open: Some(Open {
                out: 0,
                cstart: 0,
                bits: 0,
                window: Vec::new(),
                hasher: Sha256::new(),
            }),
            window_buf: Box::new([0; WINDOW]),
        }
    }

    /// The index; call after `read` returned 0.
    pub fn finish(mut self) -> Result<ZranIndex, ZranError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if let Err(e) = &mut self.z {
            return Err(e.take().unwrap_or(ZranError::NotFinished));
        }
        if !self.done {
            return Err(ZranError::NotFinished);
        }
        let open = self.open.take().ok_or(ZranError::NotFinished)?;
        self.spans.push(open.close(self.total_out, self.total_in));
        Ok(ZranIndex {
            compressed_size: self.total_in,
            uncompressed_size: self.total_out,
            spans: std::mem::take(&mut self.spans),
        })
    }

    fn refill(&mut self) -> Result<(), ZranError> {
        loop {
            match self.src.read(&mut self.inbuf) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    self.in_pos = 0;
                    self.in_len = n;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ZranError::Io(e)),
            }
        }
        Ok(())
    }

    fn step(&mut self, buf: &mut [u8]) -> Result<usize, ZranError> {
        loop {
            if self.in_pos == self.in_len && !self.eof {
                self.refill()?;
            }
            let z = match &mut self.z {
                Ok(z) => z,
                Err(e) => return Err(e.take().unwrap_or(ZranError::NotFinished)),
            };
            if self.member_ended {
                if self.in_pos == self.in_len {
                    self.done = true;
                    return Ok(0);
                }
                // More bytes: another gzip member follows (its window starts empty).
                z.reset(GZIP_BITS)?;
                self.member_ended = false;
            }
            let since = self.total_out - self.open.as_ref().map_or(0, |o| o.out);
            // Stopping at block boundaries costs speed, so only ask for it once
            // a checkpoint is due.
            let flush = if since >= self.spacing {
                Z_BLOCK
            } else {
                Z_NO_FLUSH
            };
            let input = &self.inbuf[self.in_pos..self.in_len];
            let (consumed, produced, code) = z.inflate(input, buf, flush);
            if consumed > 0 {
                let used = &input[..consumed];
                if let Some(open) = &mut self.open {
                    open.hasher.update(used);
                }
                let keep = consumed.min(8);
                self.tail.copy_within(keep.., 0);
                self.tail[8 - keep..].copy_from_slice(&used[consumed - keep..]);
                self.in_pos += consumed;
                self.total_in += consumed as u64;
            }
            self.total_out += produced as u64;
            match code {
                Z_STREAM_END => {
                    // The next member starts where this one's trailer ended;
                    // bytes read ahead into the bit buffer would be lost.
                    if z.data_type() & 63 != 0 {
                        return Err(ZranError::Corrupt {
                            offset: self.total_in,
                            detail: "inflate read past the end of a gzip member".into(),
                        });
                    }
                    self.member_ended = true;
                }
                Z_OK | Z_BUF_ERROR => {}
                _ => {
                    return Err(ZranError::Corrupt {
                        offset: self.total_in,
                        detail: z.message(),
                    });
                }
            }
            if flush == Z_BLOCK && code == Z_OK {
                let dt = z.data_type();
                // At a block boundary (128), not after the last block (64);
                // the low 6 bits count consumed bits not yet used.
                if dt & 128 != 0 && dt & 64 == 0 {
                    self.checkpoint((dt & 63) as u8)?;
                }
            }
            if produced > 0 {
                return Ok(produced);
            }
            if consumed == 0 && !self.member_ended {
                if self.in_pos == self.in_len && self.eof {
                    return Err(ZranError::Truncated {
                        offset: self.total_in,
                    });
                }
                if self.in_pos < self.in_len {
                    return Err(ZranError::Corrupt {
                        offset: self.total_in,
                        detail: "inflate made no progress".into(),
                    });
                }
            }
        }
    }

    fn checkpoint(&mut self, unused_bits: u8) -> Result<(), ZranError> {
        let Ok(z) = &self.z else { return Ok(()) };
        // The next block starts this many bits before the end of the input consumed.
        let unused = u64::from(unused_bits);
        if unused > self.total_in * 8 {
            return Ok(());
        }
        let n = z.dictionary(&mut self.window_buf)?;
        let window = compress_window(&self.window_buf[..n]);
        let start_bit = self.total_in * 8 - unused;
        let cstart = start_bit / 8;
        let bits = (start_bit % 8) as u8;
        // Bytes [cstart, total_in) were consumed already; the next span needs them.
        let reread = (self.total_in - cstart) as usize;
        let mut hasher = Sha256::new();
        hasher.update(&self.tail[8 - reread..]);
        let next = Open {
            out: self.total_out,
            cstart,
            bits,
            window,
            hasher,
        };
        if let Some(open) = self.open.replace(next) {
            self.spans.push(open.close(self.total_out, self.total_in));
        }
        Ok(())
    }
}

impl<R: Read> Read for ZranBuilder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = &self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
        }
        if buf.is_empty() || self.done {
            return Ok(0);
        }
        match self.step(buf) {
            Ok(n) => Ok(n),
            Err(e) => {
                let kind = match &e {
                    ZranError::Io(io) => io.kind(),
                    ZranError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
                    _ => io::ErrorKind::InvalidData,
                };
                let err = io::Error::new(kind, e.to_string());
                self.failed = Some(e);
                Err(err)
            }
        }
    }
}

/// Verifies `compressed` (exactly `[cstart, cstart + clen)` of the blob)
/// against `span.sha256`, then inflates and returns exactly `span.out_len`
/// bytes. Copes with gzip member boundaries inside the span and with the
/// first span, which starts at the gzip header.
pub fn decode_span(span: &ZSpan, compressed: &[u8]) -> Result<Vec<u8>, ZranError> {
    if span.out_len > MAX_SPAN_OUT || span.clen > MAX_SPAN_IN {
        return Err(ZranError::BadIndex(format!(
            "span at {} is too large ({} bytes from {} compressed)",
            span.out, span.out_len, span.clen
        )));
    }
    if span.bits > 7 {
        return Err(ZranError::BadIndex(format!(
            "span at {} has bit offset {}",
            span.out, span.bits
        )));
    }
    if compressed.len() as u64 != span.clen {
        return Err(ZranError::BadIndex(format!(
            "span at {} needs {} compressed bytes, given {}",
            span.out,
            span.clen,
            compressed.len()
        )));
    }
    let digest: [u8; 32] = Sha256::digest(compressed).into();
    if digest != span.sha256 {
        return Err(ZranError::HashMismatch {
            out: span.out,
            cstart: span.cstart,
            clen: span.clen,
        });
    }
    let window = expand_window(&span.window)?;
    let out_len = span.out_len as usize;
    let mut out = vec![0u8; out_len];
    if out_len == 0 {
        return Ok(out);
    }
    // Only the first span starts at offset 0, and it starts at the gzip header.
    let mut raw = !(span.cstart == 0 && span.bits == 0 && window.is_empty());
    let mut z = Inflater::new(if raw { RAW_BITS } else { GZIP_BITS })?;
    let mut pos = 0usize;
    if span.bits > 0 {
        // The span starts mid-byte: feed that byte's unused high bits first.
        let Some(&first) = compressed.first() else {
            return Err(ZranError::Truncated {
                offset: span.cstart,
            });
        };
        z.prime(i32::from(8 - span.bits), i32::from(first >> span.bits))?;
        pos = 1;
    }
    if raw && !window.is_empty() {
        z.set_dictionary(&window)?;
    }
    let mut filled = 0usize;
    let offset = |pos: usize| span.cstart + pos as u64;
    while filled < out_len {
        let (consumed, produced, code) =
            z.inflate(&compressed[pos..], &mut out[filled..], Z_NO_FLUSH);
        pos += consumed;
        filled += produced;
        if filled == out_len {
            break;
        }
        match code {
            Z_STREAM_END => {
                if raw {
                    // Raw inflate stops at the end of the deflate data (at a
                    // byte boundary, possibly with whole bytes read ahead into
                    // its bit buffer); the member's 8-byte trailer follows.
                    let ahead = (z.data_type() & 63) as usize / 8;
                    pos = pos.saturating_sub(ahead).saturating_add(8);
                    raw = false;
                }
                if pos >= compressed.len() {
                    return Err(ZranError::Truncated {
                        offset: offset(compressed.len()),
                    });
                }
                z.reset(GZIP_BITS)?;
            }
            Z_OK | Z_BUF_ERROR => {
                if consumed == 0 && produced == 0 {
                    return Err(ZranError::Truncated {
                        offset: offset(pos),
                    });
                }
            }
            _ => {
                return Err(ZranError::Corrupt {
                    offset: offset(pos),
                    detail: z.message(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::MultiGzDecoder;
    use flate2::write::GzEncoder;
    use proptest::prelude::*;
    use std::io::Write;
    use std::path::PathBuf;

    fn images() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/images")
    }

    /// The real Alpine layers (gzip as Alpine's build wrote them) from
    /// `../shared/images`, by name. A fresh clone has no such folder: then
    /// mixed data compressed by the system's `gzip` stands in, so the tests
    /// still run on a stream no rimg code wrote.
    fn alpine_tarballs() -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for dir in std::fs::read_dir(images()).into_iter().flatten() {
            let dir = dir.unwrap().path();
            if !dir.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&dir).unwrap() {
                let f = f.unwrap().path();
                if f.to_string_lossy().ends_with(".tar.gz") {
                    out.push((f.display().to_string(), std::fs::read(&f).unwrap()));
                }
            }
        }
        out.sort();
        if out.is_empty() {
            eprintln!(
                "note: no Alpine tarballs in {}; using gzip -6 of generated data instead",
                images().display()
            );
            out.push((
                "9 MiB mixed, gzip -6".into(),
                system_gzip(&mixed_data(9 << 20, 5)),
            ));
        }
        out
    }

    /// `gzip -6` of `data`, by the system's gzip.
    fn system_gzip(data: &[u8]) -> Vec<u8> {
        let mut child = std::process::Command::new("gzip")
            .arg("-6")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("gzip");
        let mut stdin = child.stdin.take().unwrap();
        let data = data.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&data));
        let mut gz = Vec::new();
        child.stdout.take().unwrap().read_to_end(&mut gz).unwrap();
        writer.join().unwrap().unwrap();
        assert!(child.wait().unwrap().success());
        gz
    }

    fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::new(level));
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn full_inflate(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        MultiGzDecoder::new(gz).read_to_end(&mut out).unwrap();
        out
    }

    /// Runs the builder to the end with `chunk`-sized reads, as a consumer would.
    fn build(gz: &[u8], spacing: u64, chunk: usize) -> (Vec<u8>, ZranIndex) {
        let mut b = ZranBuilder::new(gz, spacing);
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = b.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        (out, b.finish().unwrap())
    }

    fn span_bytes<'a>(gz: &'a [u8], s: &ZSpan) -> &'a [u8] {
        &gz[s.cstart as usize..(s.cstart + s.clen) as usize]
    }

    /// Builds an index and proves every span decodes to its slice of the full inflate.
    fn check_all_spans(gz: &[u8], spacing: u64, chunk: usize) -> ZranIndex {
        let expected = full_inflate(gz);
        let (out, index) = build(gz, spacing, chunk);
        assert_eq!(out, expected, "builder output differs from MultiGzDecoder");
        assert_eq!(index.uncompressed_size, expected.len() as u64);
        assert_eq!(index.compressed_size, gz.len() as u64);
        index.validate().unwrap();
        for (i, s) in index.spans.iter().enumerate() {
            let got = decode_span(s, span_bytes(gz, s)).unwrap_or_else(|e| panic!("span {i}: {e}"));
            assert_eq!(
                got,
                &expected[s.out as usize..(s.out + s.out_len) as usize],
                "span {i} of {}",
                index.spans.len()
            );
        }
        index
    }

    /// Text and binary runs, so blocks of every kind appear (stored ones for the noise).
    fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let words = [
            "layer",
            "gzip",
            "window",
            "block",
            "checkpoint",
            "registry",
            "mount",
            "\n",
            "0x1f8b",
        ];
        let mut out = Vec::with_capacity(len + 4096);
        while out.len() < len {
            let kind = rng.u8(0..4);
            let n = rng.usize(1..4096);
            for _ in 0..n {
                match kind {
                    0 => out.push(rng.u8(..)),
                    1 => out.push(rng.u8(0..16)),
                    _ => {
                        out.extend_from_slice(words[rng.usize(..words.len())].as_bytes());
                        out.push(b' ');
                    }
                }
            }
        }
        out.truncate(len);
        out
    }

    #[test]
    fn every_span_of_the_alpine_layers_decodes_to_its_slice() {
        for (path, gz) in alpine_tarballs() {
            let index = check_all_spans(&gz, 64 << 10, 64 << 10);
            assert!(index.spans.len() > 10, "{path}: too few spans");
            let index = check_all_spans(&gz, DEFAULT_SPACING, 8192);
            assert!(index.spans.len() >= 2, "{path}");
        }
    }

    #[test]
    fn every_span_of_generated_data_decodes_with_any_read_size() {
        let data = mixed_data(3 << 20, 7);
        for level in [1, 6, 9] {
            let gz = gzip(&data, level);
            for chunk in [511usize, 64 << 10] {
                let index = check_all_spans(&gz, 64 << 10, chunk);
                // zlib-rs's level 1 (zlib-ng's deflate_quick) writes very long
                // blocks, and checkpoints can only sit between blocks.
                if level > 1 {
                    assert!(
                        index.spans.len() > 10,
                        "level {level}: {}",
                        index.spans.len()
                    );
                }
            }
        }
        // Byte-at-a-time reads (slow in debug builds, so on less data).
        check_all_spans(&gzip(&data[..300 << 10], 6), 16 << 10, 1);
    }

    #[test]
    fn concatenated_members_are_read_like_multigzdecoder() {
        let a = mixed_data(300 << 10, 1);
        let b = mixed_data(200 << 10, 2);
        let mut gz = gzip(&a, 6);
        gz.extend(gzip(&b, 6));
        // One span holding both members (boundary inside the first span).
        let index = check_all_spans(&gz, DEFAULT_SPACING, 4096);
        assert_eq!(index.spans.len(), 1);
        // A checkpoint inside the first member, so the boundary falls in a raw span.
        let index = check_all_spans(&gz, 100 << 10, 4096);
        let boundary = a.len() as u64;
        let i = index.span_of(boundary).unwrap();
        assert!(
            index.spans[i].out < boundary && i > 0,
            "boundary not inside a later span"
        );
        // Many members, some empty.
        let mut gz = Vec::new();
        for (i, part) in a.chunks(50 << 10).enumerate() {
            gz.extend(gzip(part, 6));
            if i % 2 == 0 {
                gz.extend(gzip(b"", 6));
            }
        }
        check_all_spans(&gz, 20 << 10, 1000);
    }

    #[test]
    fn tiny_streams_have_one_span() {
        let empty = gzip(b"", 6);
        let index = check_all_spans(&empty, DEFAULT_SPACING, 100);
        assert_eq!(index.uncompressed_size, 0);
        assert_eq!(index.spans.len(), 1);
        assert_eq!(index.span_of(0), None);
        assert_eq!(decode_span(&index.spans[0], &empty).unwrap(), b"");
        let small = gzip(b"hello, world\n", 6);
        let index = check_all_spans(&small, DEFAULT_SPACING, 3);
        assert_eq!(index.spans.len(), 1);
        assert_eq!(index.span_of(12), Some(0));
        assert_eq!(index.span_of(13), None);
        let mut two = empty.clone();
        two.extend(&small);
        check_all_spans(&two, 1, 100);
    }

    #[test]
    fn span_of_finds_the_span_holding_each_offset() {
        let data = mixed_data(1 << 20, 3);
        let gz = gzip(&data, 6);
        let (_, index) = build(&gz, 50 << 10, 1 << 16);
        for off in (0..data.len() as u64).step_by(997) {
            let s = &index.spans[index.span_of(off).unwrap()];
            assert!(s.out <= off && off < s.out + s.out_len);
        }
    }

    #[test]
    fn a_flipped_compressed_byte_is_a_hash_error() {
        let gz = gzip(&mixed_data(1 << 20, 4), 6);
        let (_, index) = build(&gz, 64 << 10, 1 << 16);
        for s in &index.spans {
            let mut bytes = span_bytes(&gz, s).to_vec();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x40;
            assert!(matches!(
                decode_span(s, &bytes),
                Err(ZranError::HashMismatch { .. })
            ));
            assert!(matches!(
                decode_span(s, &bytes[1..]),
                Err(ZranError::BadIndex(_))
            ));
        }
    }

    #[test]
    fn a_forged_index_never_panics_and_is_refused_when_the_hash_fails() {
        let data = mixed_data(1 << 20, 5);
        let gz = gzip(&data, 6);
        let (_, index) = build(&gz, 64 << 10, 1 << 16);
        let n = index.spans.len();
        assert!(n > 4);
        for i in 0..n {
            let s = &index.spans[i];
            let bytes = span_bytes(&gz, s);
            // Wrong offset: bytes from elsewhere fail the hash.
            let mut moved = s.clone();
            moved.cstart += 1;
            if moved.cstart + moved.clen <= gz.len() as u64 {
                assert!(decode_span(&moved, span_bytes(&gz, &moved)).is_err());
            }
            // Wrong window, right hash: an error or other bytes, never a panic.
            let mut forged = s.clone();
            forged.window = index.spans[(i + 1) % n].window.clone();
            let _ = decode_span(&forged, bytes);
            forged.window = vec![0xff; 40];
            assert!(matches!(
                decode_span(&forged, bytes),
                Err(ZranError::BadIndex(_))
            ));
            forged.window = compress_window(&vec![7u8; WINDOW + 1]);
            assert!(matches!(
                decode_span(&forged, bytes),
                Err(ZranError::BadIndex(_))
            ));
            // Wrong bit offset or length, right hash.
            for bits in 0..8 {
                let mut forged = s.clone();
                forged.bits = bits;
                let _ = decode_span(&forged, bytes);
            }
            let mut forged = s.clone();
            forged.out_len += 1 << 20;
            assert!(decode_span(&forged, bytes).is_err());
            forged.out_len = MAX_SPAN_OUT + 1;
            assert!(matches!(
                decode_span(&forged, bytes),
                Err(ZranError::BadIndex(_))
            ));
            let mut forged = s.clone();
            forged.bits = 8;
            assert!(matches!(
                decode_span(&forged, bytes),
                Err(ZranError::BadIndex(_))
            ));
        }
        let mut bad = index.clone();
        bad.spans[1].out += 1;
        assert!(bad.validate().is_err());
        let mut bad = index.clone();
        bad.spans[n - 1].clen += 1;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn truncated_and_trailing_garbage_streams_are_errors() {
        let gz = gzip(&mixed_data(200 << 10, 6), 6);
        for cut in [0, 5, 10, gz.len() / 2, gz.len() - 4] {
            let mut b = ZranBuilder::new(&gz[..cut], 4096);
            let mut sink = Vec::new();
            assert!(b.read_to_end(&mut sink).is_err(), "cut at {cut}");
            assert!(b.finish().is_err());
        }
        let mut junk = gz.clone();
        junk.extend_from_slice(b"not gzip");
        let mut b = ZranBuilder::new(&junk[..], 4096);
        assert!(b.read_to_end(&mut Vec::new()).is_err());
        assert!(b.finish().is_err());
        let b = ZranBuilder::new(&gz[..], 4096);
        assert!(matches!(b.finish(), Err(ZranError::NotFinished)));
    }

    #[test]
    fn the_builder_can_move_between_threads() {
        fn is_send<T: Send>() {}
        is_send::<ZranBuilder<std::fs::File>>();
    }

    /// Inflate throughput of the builder against flate2's MultiGzDecoder, and
    /// the serialized index size. Not a test: run with
    /// `cargo test --release --lib zran::tests::measure -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_throughput_and_index_size() {
        fn drain(mut r: impl Read) -> u64 {
            let mut buf = vec![0u8; 64 << 10];
            let mut n = 0u64;
            loop {
                match r.read(&mut buf).unwrap() {
                    0 => return n,
                    k => n += k as u64,
                }
            }
        }
        let mut inputs = alpine_tarballs();
        let gz = system_gzip(&mixed_data(200 << 20, 11));
        inputs.push(("200 MiB mixed, gzip -6".into(), gz));
        for (name, gz) in &inputs {
            let rate = |f: &dyn Fn() -> u64| {
                let t = std::time::Instant::now();
                let n = f();
                n as f64 / t.elapsed().as_secs_f64() / 1e6
            };
            // Alternate the two so drift in clock speed hits both alike.
            let (mut flate, mut zran) = (0.0f64, 0.0f64);
            for _ in 0..5 {
                zran = zran.max(rate(&|| {
                    let mut b = ZranBuilder::new(&gz[..], DEFAULT_SPACING);
                    let n = drain(&mut b);
                    b.finish().unwrap();
                    n
                }));
                flate = flate.max(rate(&|| drain(MultiGzDecoder::new(&gz[..]))));
            }
            let mut b = ZranBuilder::new(&gz[..], DEFAULT_SPACING);
            drain(&mut b);
            let index = b.finish().unwrap();
            let size = postcard::to_stdvec(&index).unwrap().len();
            println!(
                "{name}: {} -> {} bytes; MultiGzDecoder {flate:.0} MB/s, ZranBuilder {zran:.0} MB/s; \
                 {} spans, index {size} bytes = {:.2}% of compressed",
                gz.len(),
                index.uncompressed_size,
                index.spans.len(),
                100.0 * size as f64 / gz.len() as f64
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_members_and_spacing_decode_every_span(
            seed in any::<u64>(),
            len in 0usize..400_000,
            spacing in 1u64..65536,
            splits in proptest::collection::vec(any::<prop::sample::Index>(), 0..5),
            level in 0u32..10,
        ) {
            let data = mixed_data(len, seed);
            let mut cuts: Vec<usize> = splits.iter().map(|i| i.index(len + 1)).collect();
            cuts.push(0);
            cuts.push(len);
            cuts.sort();
            let mut gz = Vec::new();
            for w in cuts.windows(2) {
                gz.extend(gzip(&data[w[0]..w[1]], level));
            }
            let (out, index) = build(&gz, spacing, 16 << 10);
            prop_assert_eq!(&out, &data);
            index.validate().unwrap();
            for s in &index.spans {
                let got = decode_span(s, span_bytes(&gz, s)).unwrap();
                prop_assert_eq!(&got[..], &data[s.out as usize..(s.out + s.out_len) as usize]);
            }
        }
    }
}
