//! Layers read by range: the bytes of a layer whose entry index came from
//! somewhere other than a download of the whole blob (a table of contents
//! inside the blob, or a published checkpoint index), fetched span by span
//! as reads need them.
//!
//! A layer's content is cut into spans, each decodable on its own from one
//! run of compressed bytes (an eStargz gzip member, a zstd:chunked frame, the
//! stretch of a gzip stream between two checkpoints). A read finds the spans
//! covering it by binary search, fetches the missing ones (plus a bounded
//! read-ahead) with as few Range requests as their compressed runs allow,
//! has each verified and decoded by the layer's [`SpanMap`], and only then
//! writes it into a sparse file at its address, which every later read of
//! it comes from. Nothing unverified is written; a span another thread is
//! fetching is waited for, not fetched twice.
//!
//! On disk, under `lazy/sha256/` (shared between processes like the layer
//! cache, under the same per-layer lock): `<hex>.data`, the sparse file of
//! decoded spans, and `<hex>.have`, a log of the span numbers it holds,
//! appended only after the data they name is durable.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::digest::Digest;

/// An error from verifying or decoding a span, or from fetching it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Reads verified bytes of a layer read by range (all of `buf`).
pub type VerifiedRead<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<(), BoxError>;

/// Where one span's decoded bytes live in the layer's address space and
/// where its compressed bytes are in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanLoc {
    /// Address of the first decoded byte.
    pub start: u64,
    /// Decoded bytes.
    pub len: u64,
    /// First compressed byte in the blob.
    pub coff: u64,
    /// Compressed bytes, from `coff`, that decode the span.
    pub clen: u64,
}

/// A layer's spans, sorted by `start` and not overlapping, and how each is
/// checked and decoded.
pub trait SpanMap: Send + Sync {
    fn count(&self) -> usize;
    fn span(&self, i: usize) -> SpanLoc;
    /// Verifies `compressed` (exactly the span's `clen` bytes from `coff`)
    /// and decodes it to the span's `len` bytes. The error names the layer
    /// and the file (or place) the span belongs to.
    fn decode(&self, i: usize, compressed: &[u8]) -> Result<Vec<u8>, BoxError>;
    /// Called before bytes at `offset` are served, with a reader of the
    /// layer's verified bytes: a map whose addresses come from an untrusted
    /// index checks here that they are what it claims.
    fn check_read(&self, _offset: u64, _read: VerifiedRead<'_>) -> Result<(), BoxError> {
        Ok(())
    }
    /// Whether addresses are offsets in the layer's uncompressed tar (so
    /// that, once every span is held, the spans are the tar).
    fn addresses_are_tar(&self) -> bool {
        false
    }
    /// Addresses below this are fetched first when the whole layer is
    /// prefetched (eStargz's prefetch landmark).
    fn prefetch_first(&self) -> Option<u64> {
        None
    }
}

/// Fetches byte ranges of a layer's blob; called from blocking threads.
pub trait RangeSource: Send + Sync {
    fn fetch(&self, start: u64, len: u64) -> Result<Vec<u8>, BoxError>;
}

#[derive(Debug, thiserror::Error)]
pub enum RangedError {
    #[error("layer {digest}: fetching bytes {start}..{end} of the blob")]
    Fetch {
        digest: String,
        start: u64,
        end: u64,
        #[source]
        source: BoxError,
    },
    /// A span that fails verification or decoding; the span map's error
    /// names the layer and the file.
    #[error(transparent)]
    Span(BoxError),
    #[error("layer {digest}: span {span} decodes to {got} bytes, not the {want} its index says")]
    Length {
        digest: String,
        span: usize,
        got: usize,
        want: u64,
    },
    #[error("layer {digest}: another reader failed to fetch span {span}")]
    Abandoned { digest: String, span: usize },
    #[error("range cache {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl From<RangedError> for io::Error {
    fn from(e: RangedError) -> io::Error {
        io::Error::other(e)
    }
}

/// Compressed runs closer than this are fetched in one request (the gap is
/// cheaper to download than another round trip).
const COALESCE_GAP: u64 = 64 * 1024;
/// No request asks for more than this.
const MAX_REQUEST: u64 = 16 << 20;
/// Decoded bytes past a read that are fetched with it when missing.
pub const READ_AHEAD: u64 = 512 * 1024;
/// Spans written but not yet logged are made durable and logged when this
/// many are pending or the oldest has waited this long.
const LOG_BATCH: usize = 64;
const LOG_DELAY: Duration = Duration::from_millis(500);

struct State {
    have: Vec<u64>,
    inflight: HashSet<usize>,
    /// Written but not yet durable and logged.
    pending: Vec<usize>,
    pending_since: Option<Instant>,
}

impl State {
    fn has(&self, i: usize) -> bool {
        self.have
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn set(&mut self, i: usize) {
        if let Some(w) = self.have.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
}

/// One layer read by range.
pub struct Ranged {
    digest: String,
    map: Box<dyn SpanMap>,
    source: Arc<dyn RangeSource>,
    data: File,
    data_path: PathBuf,
    log: File,
    log_path: PathBuf,
    state: Mutex<State>,
    done: Condvar,
    fetched: AtomicU64,
    end: u64,
}

impl std::fmt::Debug for Ranged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ranged")
            .field("digest", &self.digest)
            .finish()
    }
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> RangedError + '_ {
    move |source| RangedError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Ranged {
    /// Opens (creating when new) the range cache of layer `digest` at
    /// `stem` (`<stem>.data`, `<stem>.have`), with the spans it already holds.
    pub fn open(
        digest: &str,
        stem: &Path,
        map: Box<dyn SpanMap>,
        source: Arc<dyn RangeSource>,
    ) -> Result<Ranged, RangedError> {
        let data_path = stem.with_extension("data");
        let log_path = stem.with_extension("have");
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .append(p == log_path)
                .write(true)
                .open(p)
                .map_err(io_err(p))
        };
        let data = open(&data_path)?;
        let log = open(&log_path)?;
        let count = map.count();
        let mut state = State {
            have: vec![0; count.div_ceil(64)],
            inflight: HashSet::new(),
            pending: Vec::new(),
            pending_since: None,
        };
        let mut logged = Vec::new();
        (&log).read_to_end(&mut logged).map_err(io_err(&log_path))?;
        // A torn last record (a crash mid-append) is ignored.
        for rec in logged.chunks_exact(4) {
            let i = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize;
            if i < count {
                state.set(i);
            }
        }
        let end = (0..count)
            .next_back()
            .map_or(0, |i| map.span(i).start + map.span(i).len);
        Ok(Ranged {
            digest: digest.to_string(),
            map,
            source,
            data,
            data_path,
            log,
            log_path,
            state: Mutex::new(state),
            done: Condvar::new(),
            fetched: AtomicU64::new(0),
            end,
        })
    }

    /// Whether every span is held.
    pub fn complete(&self) -> bool {
        let (held, all) = self.held();
        held == all
    }

    /// Compressed bytes fetched so far by this reader.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Spans held, of all.
    pub fn held(&self) -> (usize, usize) {
        let s = self.lock();
        let n = s.have.iter().map(|w| w.count_ones() as usize).sum();
        (n, self.map.count())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The span holding address `at`.
    fn find(&self, at: u64) -> Option<usize> {
        let n = self.map.count();
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.map.span(mid).start <= at {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let i = lo.checked_sub(1)?;
        let s = self.map.span(i);
        (at < s.start + s.len).then_some(i)
    }

    /// Reads decoded bytes at `offset`, fetching what is missing first.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, RangedError> {
        if buf.is_empty() || offset >= self.end {
            return Ok(0);
        }
        let want = buf.len().min((self.end - offset) as usize);
        let last_byte = offset + want as u64 - 1;
        let (Some(first), Some(last)) = (self.find(offset), self.find(last_byte)) else {
            // Addresses between spans hold no file's bytes: zeros.
            buf[..want].fill(0);
            return Ok(want);
        };
        let verified = |o: u64, b: &mut [u8]| -> Result<(), BoxError> {
            let n = self.read_at(o, b)?;
            if n < b.len() {
                return Err("the layer ends there".into());
            }
            Ok(())
        };
        if let Err(e) = self.map.check_read(offset, &verified) {
            // The index lied: nothing it says is used again.
            tracing::warn!(
                "{}; dropping the range cache of layer {}",
                crate::report::Chain(&*e),
                self.digest
            );
            distrust(&self.data_path);
            return Err(RangedError::Span(e));
        }
        self.ensure(first, last, last_byte + 1 + READ_AHEAD)?;
        let mut done = 0;
        while done < want {
            match self
                .data
                .read_at(&mut buf[done..want], offset + done as u64)
            {
                Ok(0) => {
                    return Err(io_err(&self.data_path)(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the range cache ends before a span it holds",
                    )));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&self.data_path)(e)),
            }
        }
        Ok(want)
    }

    /// Fetches every span not yet held: first those the layer marks to
    /// fetch first, then the rest in order; stops at the first error.
    pub fn prefetch(&self) -> Result<(), RangedError> {
        if let Some(first) = self.map.prefetch_first() {
            self.prefetch_until(first)?;
        }
        self.prefetch_until(u64::MAX)
    }

    /// Fetches the spans holding addresses below `until`.
    pub fn prefetch_until(&self, until: u64) -> Result<(), RangedError> {
        let n = self.map.count();
        let mut i = 0;
        while i < n && self.map.span(i).start < until {
            // A batch of spans at a time, so reads in between get their turn.
            let mut j = i;
            let mut bytes = 0;
            while j + 1 < n && bytes < MAX_REQUEST && self.map.span(j + 1).start < until {
                bytes += self.map.span(j).clen;
                j += 1;
            }
            self.ensure(i, j, 0)?;
            i = j + 1;
        }
        self.flush_log(true)
    }

    /// Makes spans `first..=last` held, plus the spans after them that
    /// start before `ahead_until` when missing (best effort).
    fn ensure(&self, first: usize, last: usize, ahead_until: u64) -> Result<(), RangedError> {
        let n = self.map.count();
        // Read-ahead: the spans that start before `ahead_until` (the read's
        // end plus READ_AHEAD), so a read deep inside a large span adds none.
        let mut extra_end = last;
        while extra_end + 1 < n && self.map.span(extra_end + 1).start < ahead_until {
            extra_end += 1;
        }
        for round in 0..3 {
            // Later rounds are for required spans another reader gave up
            // on; read-ahead that failed is not asked for again.
            if round > 0 {
                extra_end = last;
            }
            let (mine, theirs) = {
                let mut s = self.lock();
                let mut mine = Vec::new();
                let mut theirs = Vec::new();
                for i in first..=extra_end {
                    if s.has(i) {
                        continue;
                    }
                    if s.inflight.contains(&i) {
                        if i <= last {
                            theirs.push(i);
                        }
                    } else {
                        s.inflight.insert(i);
                        mine.push(i);
                    }
                }
                (mine, theirs)
            };
            if mine.is_empty() && theirs.is_empty() {
                return Ok(());
            }
            let result = self.fetch_spans(&mine, last);
            {
                let mut s = self.lock();
                for i in &mine {
                    s.inflight.remove(i);
                }
                self.done.notify_all();
                // Wait out the spans others are fetching.
                while theirs.iter().any(|i| s.inflight.contains(i)) {
                    s = self.done.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            }
            result?;
            self.flush_log(false)?;
        }
        let s = self.lock();
        match (first..=last).find(|&i| !s.has(i)) {
            None => Ok(()),
            Some(span) => Err(RangedError::Abandoned {
                digest: self.digest.clone(),
                span,
            }),
        }
    }

    /// Fetches, verifies, decodes and writes `spans` (sorted); errors in
    /// spans past `required` (read-ahead) are logged, not returned.
    fn fetch_spans(&self, spans: &[usize], required: usize) -> Result<(), RangedError> {
        let mut k = 0;
        let mut first_err = None;
        while k < spans.len() {
            // One run: spans whose compressed bytes are near each other.
            let s0 = self.map.span(spans[k]);
            let (run_start, mut run_end) = (s0.coff, s0.coff + s0.clen);
            let mut m = k + 1;
            while m < spans.len() {
                let s = self.map.span(spans[m]);
                let end = run_end.max(s.coff + s.clen);
                if s.coff < run_start
                    || s.coff > run_end + COALESCE_GAP
                    || end - run_start > MAX_REQUEST
                {
                    break;
                }
                run_end = end;
                m += 1;
            }
            let run = &spans[k..m];
            k = m;
            for (i, e) in self.fetch_run(run, run_start, run_end) {
                if i <= required {
                    first_err.get_or_insert(e);
                } else {
                    // The read that needs it reports it; this one did not.
                    tracing::debug!("read-ahead: {}", crate::report::Chain(&e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Fetches one run and writes its spans; returns the spans that failed.
    fn fetch_run(&self, run: &[usize], start: u64, end: u64) -> Vec<(usize, RangedError)> {
        let fetched = self.source.fetch(start, end - start);
        let bytes = match fetched {
            Ok(b) if b.len() as u64 == end - start => b,
            other => {
                let source = match other {
                    Ok(b) => format!("got {} bytes", b.len()).into(),
                    Err(e) => e,
                };
                let e = RangedError::Fetch {
                    digest: self.digest.clone(),
                    start,
                    end,
                    source,
                };
                // One error for the run, reported against its first span
                // that a read needs (the caller finds it by span number).
                let msg = e.to_string();
                let mut out = vec![(run[0], e)];
                out.extend(run[1..].iter().map(|&i| {
                    (
                        i,
                        RangedError::Fetch {
                            digest: self.digest.clone(),
                            start,
                            end,
                            source: msg.clone().into(),
                        },
                    )
                }));
                return out;
            }
        };
        self.fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut failed = Vec::new();
        for &i in run {
            if let Err(e) = self.store_span(i, &bytes, start) {
                failed.push((i, e));
            }
        }
        failed
    }

    /// Verifies, decodes and writes span `i` from `bytes`, which start at
    /// blob offset `start`.
    fn store_span(&self, i: usize, bytes: &[u8], start: u64) -> Result<(), RangedError> {
        let s = self.map.span(i);
        let at = (s.coff - start) as usize;
        let compressed = &bytes[at..at + s.clen as usize];
        let decoded = self.map.decode(i, compressed).map_err(RangedError::Span)?;
        if decoded.len() as u64 != s.len {
            return Err(RangedError::Length {
                digest: self.digest.clone(),
                span: i,
                got: decoded.len(),
                want: s.len,
            });
        }
        self.data
            .write_all_at(&decoded, s.start)
            .map_err(io_err(&self.data_path))?;
        let mut st = self.lock();
        st.set(i);
        st.pending.push(i);
        st.pending_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Makes written spans durable, then logs them, when enough are
    /// pending (or always with `now`): a crash never leaves the log naming
    /// bytes that are not on disk.
    fn flush_log(&self, now: bool) -> Result<(), RangedError> {
        let pending = {
            let mut s = self.lock();
            let due = s.pending.len() >= LOG_BATCH
                || s.pending_since.is_some_and(|t| t.elapsed() >= LOG_DELAY);
            if s.pending.is_empty() || !(now || due) {
                return Ok(());
            }
            s.pending_since = None;
            std::mem::take(&mut s.pending)
        };
        self.data.sync_data().map_err(io_err(&self.data_path))?;
        let mut rec = Vec::with_capacity(pending.len() * 4);
        for i in pending {
            rec.extend_from_slice(&(i as u32).to_le_bytes());
        }
        (&self.log)
            .write_all(&rec)
            .map_err(io_err(&self.log_path))?;
        Ok(())
    }
}

impl Drop for Ranged {
    fn drop(&mut self) {
        if let Err(e) = self.flush_log(true) {
            tracing::warn!("{}", crate::report::Chain(&e));
        }
    }
}

impl super::Layer {
    /// For a layer read by range through an index whose addresses are tar
    /// offsets, once every span is held: indexes the tar the spans make and
    /// compares it with the index the layer was opened from. On any
    /// difference the kept index is dropped (the next opening reads the
    /// layer whole) and the error says so.
    pub fn audit_index(&self) -> Result<(), super::CacheError> {
        let super::Data::Ranged(r) = &self.data else {
            return Ok(());
        };
        if !r.map.addresses_are_tar() || !r.complete() {
            return Ok(());
        }
        let tar = super::Section {
            file: &r.data,
            pos: 0,
            end: r.end,
        };
        let real = crate::layer::index_tar(
            std::io::BufReader::with_capacity(1 << 20, tar),
            &self.digest,
        )?;
        if real == self.index()? {
            return Ok(());
        }
        distrust(&r.data_path);
        Err(super::CacheError::IndexMismatch {
            digest: self.digest.clone(),
        })
    }
}

/// Compares a kept index of `form` with a layer fetched whole; drops it
/// (with a warning) when they differ.
impl super::Cache {
    pub fn audit_ranged(&self, layer: &super::Layer, form: Form) {
        let hex = layer.digest.hex();
        let idx = self.ranged_stem(hex, form).with_extension("idx");
        let Ok(bytes) = std::fs::read(&idx) else {
            return;
        };
        let claimed = postcard::take_from_bytes::<super::IndexHeader>(&bytes)
            .ok()
            .and_then(|(_, rest)| postcard::from_bytes::<crate::layer::LayerIndex>(rest).ok());
        match (claimed, layer.index()) {
            (Some(c), Ok(real)) if c == real => {}
            (_, Err(e)) => tracing::warn!("{}", crate::report::Chain(&e)),
            _ => {
                tracing::warn!(
                    "layer {}: the published index kept for it differs from the layer itself; dropped",
                    layer.digest
                );
                distrust(&idx);
                let _ = std::fs::remove_file(idx.with_extension("data"));
                let _ = std::fs::remove_file(idx.with_extension("have"));
            }
        }
    }
}

/// Drops the index a range cache was opened from (the one at `stem` with
/// any extension) and marks it distrusted: an index that lied once is not
/// fetched and used again; the layer is read whole from then on.
fn distrust(stem: &Path) {
    for ext in ["idx", "meta"] {
        let _ = std::fs::remove_file(stem.with_extension(ext));
    }
    if let Err(e) = std::fs::write(stem.with_extension("distrusted"), b"") {
        tracing::warn!("{}: {e}", stem.with_extension("distrusted").display());
    }
}

/// A layer's range cache, as `rimg cache ls` shows it and eviction weighs it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RangedCache {
    pub digest: Digest,
    pub form: String,
    /// Disk the decoded chunks and metadata take (the data file is sparse).
    pub bytes: u64,
    /// Seconds since the epoch.
    pub last_use: i64,
}

impl super::Cache {
    /// Every kept range cache, least recently used first.
    pub fn ranged_list(&self) -> Vec<RangedCache> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.root.join("lazy/sha256");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".idx") else {
                continue;
            };
            let Some((hex, form)) = stem.split_once('-') else {
                continue;
            };
            let Ok(meta) = e.metadata() else { continue };
            let bytes = ["idx", "meta", "data", "have"]
                .iter()
                .filter_map(|ext| std::fs::metadata(dir.join(format!("{stem}.{ext}"))).ok())
                .map(|m| m.blocks() * 512)
                .sum();
            let Ok(digest) = Digest::parse(&format!("sha256:{hex}")) else {
                continue;
            };
            out.push(RangedCache {
                digest,
                form: form.to_string(),
                bytes,
                last_use: super::mtime_secs(&meta),
            });
        }
        out.sort_by_key(|r| r.last_use);
        out
    }

    /// Removes a range cache no mount is using; `false` when one is.
    pub(super) fn remove_ranged(&self, digest: &Digest, form: &str) -> bool {
        let hex = digest.hex();
        let Ok(lock) = self.lock_file(hex) else {
            return false;
        };
        if lock.try_lock().is_err() {
            return false;
        }
        let stem = self.root.join("lazy/sha256").join(format!("{hex}-{form}"));
        // Index first: without it nothing trusts the rest.
        for ext in ["idx", "meta", "data", "have", "distrusted"] {
            let _ = std::fs::remove_file(stem.with_extension(ext));
        }
        true
    }
}

/// Names the form a layer is read by range in (a table of contents, a
/// checkpoint index): the files of each form are kept apart.
pub type Form = &'static str;

impl super::Cache {
    fn ranged_stem(&self, hex: &str, form: Form) -> PathBuf {
        self.root.join("lazy/sha256").join(format!("{hex}-{form}"))
    }

    /// Whether an index of `form` for layer `digest` was found lying: the
    /// layer is then read whole.
    pub fn is_distrusted(&self, digest: &Digest, form: Form) -> bool {
        self.ranged_stem(digest.hex(), form)
            .with_extension("distrusted")
            .exists()
    }

    /// Marks the index of `form` for layer `digest` as not to be used.
    pub fn distrust(&self, digest: &Digest, form: Form) {
        distrust(&self.ranged_stem(digest.hex(), form).with_extension("idx"));
    }

    /// Whether the range cache of layer `digest` in `form` is kept.
    pub fn has_ranged(&self, digest: &Digest, form: Form) -> bool {
        self.ranged_stem(digest.hex(), form)
            .with_extension("idx")
            .exists()
    }

    /// Layer `desc` read by range in `form`. Its entry index and span
    /// metadata (opaque here) are made by `build` the first time (from the
    /// network) and kept; `map` makes the spans from the metadata; reads
    /// fetch through `source`. While the layer lives it holds the layer's
    /// lock shared, like any layer in use.
    pub fn open_ranged<E: From<super::CacheError>>(
        &self,
        desc: &crate::registry::LayerDesc,
        image_ref: &str,
        form: Form,
        build: impl FnOnce() -> Result<(crate::layer::LayerIndex, Vec<u8>), E>,
        map: impl Fn(&[u8]) -> Result<Box<dyn SpanMap>, E>,
        source: Arc<dyn RangeSource>,
    ) -> Result<Arc<super::Layer>, E> {
        use super::{CacheError, INDEX_VERSION, IndexHeader};
        let hex = desc.digest.hex().to_string();
        let dir = self.root.join("lazy/sha256");
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(&dir)
            .map_err(|e| CacheError::from(io_err(&dir)(e)))?;
        let lock = self.lock_file(&hex)?;
        let lock_path = self.root.join("locks").join(format!("{hex}.lock"));
        lock.lock_shared()
            .map_err(|e| CacheError::from(io_err(&lock_path)(e)))?;
        let stem = self.ranged_stem(&hex, form);
        let idx_path = stem.with_extension("idx");
        let meta_path = stem.with_extension("meta");
        let stored = match (
            super::read_index_header(&idx_path)?,
            std::fs::read(&meta_path),
        ) {
            (Some(Ok(h)), Ok(meta)) if h.version == INDEX_VERSION && h.digest == *desc.digest => {
                // Metadata an older rimg wrote is made again, not trusted.
                map(&meta).ok().map(|_| (h, meta))
            }
            _ => None,
        };
        let (header, meta) = match stored {
            Some(found) => found,
            None => {
                let (index, meta) = build()?;
                let end = index
                    .entries
                    .iter()
                    .map(|e| e.offset + e.size)
                    .max()
                    .unwrap_or(0);
                let header = IndexHeader {
                    version: INDEX_VERSION,
                    digest: desc.digest.clone(),
                    // Not verified: a layer read by range is never whole
                    // here; its spans are verified instead.
                    diff_id: desc.diff_id.clone().unwrap_or_default(),
                    blob_size: desc.size,
                    tar_size: end,
                };
                let write = |path: &Path, parts: &[&[u8]]| -> Result<(), CacheError> {
                    let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))
                        .map_err(|e| CacheError::from(io_err(path)(e)))?;
                    for p in parts {
                        tmp.as_file()
                            .write_all(p)
                            .map_err(|e| CacheError::from(io_err(path)(e)))?;
                    }
                    tmp.as_file()
                        .sync_data()
                        .map_err(|e| CacheError::from(io_err(path)(e)))?;
                    tmp.persist(path)
                        .map_err(|e| CacheError::from(io_err(path)(e.error)))?;
                    Ok(())
                };
                let encode =
                    |e: postcard::Error| CacheError::from(io_err(&idx_path)(io::Error::other(e)));
                let head = postcard::to_stdvec(&header).map_err(encode)?;
                let body = postcard::to_stdvec(&index).map_err(encode)?;
                // Metadata first: the index's presence says both are there.
                write(&meta_path, &[&meta])?;
                write(&idx_path, &[&head, &body])?;
                (header, meta)
            }
        };
        let spans = map(&meta)?;
        let reader = Ranged::open(&desc.digest, &stem, spans, source).map_err(CacheError::from)?;
        // Last use is the index file's mtime, as for whole layers.
        if let Ok(f) = std::fs::File::options().write(true).open(&idx_path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        self.note_image(&hex, image_ref);
        // Range caches grow as they are read; make room as a new one opens.
        if let Err(e) = self.evict(self.limit) {
            tracing::warn!("cache eviction: {}", crate::report::Chain(&e));
        }
        Ok(Arc::new(super::Layer {
            digest: header.digest,
            diff_id: header.diff_id,
            idx_path,
            data: super::Data::Ranged(Arc::new(reader)),
            _in_use: lock,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Spans that "compress" by xoring with 0x5a; each span's decoded bytes
    /// are checked against the content they must have.
    struct Xor {
        spans: Vec<SpanLoc>,
        content: Vec<u8>,
    }
    impl SpanMap for Xor {
        fn count(&self) -> usize {
            self.spans.len()
        }
        fn span(&self, i: usize) -> SpanLoc {
            self.spans[i]
        }
        fn decode(&self, i: usize, c: &[u8]) -> Result<Vec<u8>, BoxError> {
            let s = self.spans[i];
            let out: Vec<u8> = c.iter().map(|b| b ^ 0x5a).collect();
            if out[..] != self.content[s.start as usize..(s.start + s.len) as usize] {
                return Err(format!("layer sha256:x: file{i}: digest mismatch").into());
            }
            Ok(out)
        }
    }

    struct Blob {
        bytes: Mutex<Vec<u8>>,
        requests: AtomicUsize,
    }
    impl RangeSource for Blob {
        fn fetch(&self, start: u64, len: u64) -> Result<Vec<u8>, BoxError> {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let b = self.bytes.lock().unwrap();
            Ok(b[start as usize..(start + len) as usize].to_vec())
        }
    }

    /// Content of `n` spans of `len` bytes; the blob stores them xored,
    /// each after a 10-byte gap.
    fn layer(n: usize, len: u64) -> (Xor, Arc<Blob>) {
        let content: Vec<u8> = (0..n as u64 * len).map(|i| (i * 7 % 251) as u8).collect();
        let mut blob = Vec::new();
        let mut spans = Vec::new();
        for i in 0..n as u64 {
            blob.extend_from_slice(&[0u8; 10]);
            spans.push(SpanLoc {
                start: i * len,
                len,
                coff: blob.len() as u64,
                clen: len,
            });
            blob.extend(
                content[(i * len) as usize..((i + 1) * len) as usize]
                    .iter()
                    .map(|b| b ^ 0x5a),
            );
        }
        (
            Xor { spans, content },
            Arc::new(Blob {
                bytes: Mutex::new(blob),
                requests: AtomicUsize::new(0),
            }),
        )
    }

    #[test]
    fn a_read_fetches_its_covering_spans_in_one_request_and_later_reads_come_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (map, blob) = layer(64, 4096);
        let content = map.content.clone();
        let r = Ranged::open(
            "sha256:x",
            &dir.path().join("l"),
            Box::new(map),
            blob.clone(),
        )
        .unwrap();
        let mut buf = vec![0; 10_000];
        assert_eq!(r.read_at(5000, &mut buf).unwrap(), 10_000);
        assert_eq!(buf, content[5000..15_000]);
        assert_eq!(blob.requests.load(Ordering::Relaxed), 1);
        // Covering spans 1..=3 plus at most READ_AHEAD of read-ahead.
        assert!(
            r.fetched() <= 3 * 4106 + READ_AHEAD + 4106,
            "{}",
            r.fetched()
        );
        r.read_at(4096, &mut buf).unwrap();
        assert_eq!(blob.requests.load(Ordering::Relaxed), 1);
        drop(r);
        // A second opening knows what the first fetched.
        let (map, _) = layer(64, 4096);
        let r = Ranged::open(
            "sha256:x",
            &dir.path().join("l"),
            Box::new(map),
            blob.clone(),
        )
        .unwrap();
        r.read_at(5000, &mut buf).unwrap();
        assert_eq!(buf, content[5000..15_000]);
        assert_eq!(blob.requests.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_span_that_fails_verification_is_an_error_and_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (map, blob) = layer(4, 1000);
        blob.bytes.lock().unwrap()[10 + 1010 + 5] ^= 1; // in span 1
        let r = Ranged::open(
            "sha256:x",
            &dir.path().join("l"),
            Box::new(map),
            blob.clone(),
        )
        .unwrap();
        let mut buf = vec![0; 100];
        let e = r.read_at(1000, &mut buf).unwrap_err();
        let chain = e.to_string();
        assert!(chain.contains("sha256:x"), "{chain}");
        assert!(chain.contains("file1"), "{chain}");
        assert!(chain.contains("digest mismatch"), "{chain}");
        // Span 0 (before it) is fine; span 1 is not held, so asking again fetches again.
        r.read_at(0, &mut buf).unwrap();
        assert!(r.read_at(1000, &mut buf).is_err());
        assert_eq!(r.held().0, 3, "all spans but the bad one");
    }

    #[test]
    fn a_bad_read_ahead_span_does_not_fail_the_read_it_follows() {
        let dir = tempfile::tempdir().unwrap();
        let (map, blob) = layer(4, 1000);
        blob.bytes.lock().unwrap()[3 * 1010 + 12] ^= 1; // in span 3
        let content = map.content.clone();
        let r = Ranged::open("sha256:x", &dir.path().join("l"), Box::new(map), blob).unwrap();
        let mut buf = vec![0; 1000];
        r.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, content[..1000]);
        assert_eq!(r.held().0, 3);
    }

    #[test]
    fn concurrent_readers_fetch_each_span_once() {
        let dir = tempfile::tempdir().unwrap();
        let (map, blob) = layer(256, 1000);
        let content = map.content.clone();
        let r = Arc::new(
            Ranged::open(
                "sha256:x",
                &dir.path().join("l"),
                Box::new(map),
                blob.clone(),
            )
            .unwrap(),
        );
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (r, content) = (Arc::clone(&r), content.clone());
                std::thread::spawn(move || {
                    for k in 0..50u64 {
                        let at = (k * 4999 + t * 777) % 250_000;
                        let mut buf = vec![0; 3000];
                        let n = r.read_at(at, &mut buf).unwrap();
                        assert_eq!(buf[..n], content[at as usize..at as usize + n]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every span fetched at most once: the bytes fetched stay within the blob's.
        let total: u64 = 256 * 1010;
        assert!(r.fetched() <= total, "{} > {total}", r.fetched());
    }

    #[test]
    fn prefetch_fetches_everything_then_reads_need_no_network() {
        let dir = tempfile::tempdir().unwrap();
        let (map, blob) = layer(100, 3000);
        let content = map.content.clone();
        let r = Ranged::open(
            "sha256:x",
            &dir.path().join("l"),
            Box::new(map),
            blob.clone(),
        )
        .unwrap();
        r.prefetch().unwrap();
        assert_eq!(r.held(), (100, 100));
        let before = blob.requests.load(Ordering::Relaxed);
        assert!(before <= 3, "{before} requests for 300 kB");
        let mut buf = vec![0; content.len()];
        r.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, content);
        assert_eq!(blob.requests.load(Ordering::Relaxed), before);
    }
}
