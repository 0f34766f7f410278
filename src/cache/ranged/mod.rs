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
//! cache, under the same per-layer lock): `<hex>-<form>.data`, the sparse file of
//! decoded spans, and `<hex>-<form>.have`, a log of the span numbers it holds,
//! appended only after the data they name is durable.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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
    /// Once every span is held: checks the whole layer against what pins
    /// it (`diff_id`), fetching what else that needs through `source`.
    /// `Ok(false)`: nothing to check this way.
    fn audit_complete(
        &self,
        _read: VerifiedRead<'_>,
        _source: &dyn RangeSource,
        _diff_id: &str,
    ) -> Result<bool, BoxError> {
        Ok(false)
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
    /// Every span held, the tar they make is not the layer's diff_id: the
    /// index lied (a forged window changes inflated bytes while the
    /// compressed ones hash right). Its range cache is dropped.
    #[error(
        "layer {digest}: the tar its index decoded hashes to {actual}, not its diff_id {expected}; the index is distrusted and its range cache dropped"
    )]
    TarDigest {
        digest: String,
        expected: String,
        actual: String,
    },
    /// An earlier check found the index lying: nothing more is served.
    #[error(
        "layer {digest}: its index was found lying; the layer is read whole from the next opening"
    )]
    Distrusted { digest: String },
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
/// (Each batch costs an fsync: a layer of many small files read whole
/// would otherwise sync every few hundred kilobytes.)
const LOG_BATCH: usize = 1024;
const LOG_DELAY: Duration = Duration::from_millis(500);

struct State {
    have: Vec<u64>,
    /// Spans set in `have`.
    held: usize,
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
        if let Some(w) = self.have.get_mut(i / 64)
            && *w & (1 << (i % 64)) == 0
        {
            *w |= 1 << (i % 64);
            self.held += 1;
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
    /// The diff_id the spans must hash to once all are held, for a map
    /// whose addresses are the tar.
    tar_digest: Option<String>,
    /// `Some(ok)` once the whole tar was hashed.
    tar_checked: Mutex<Option<bool>>,
    /// Set when the index was found lying: every later read fails.
    poisoned: std::sync::atomic::AtomicBool,
    stream: stream::Stream,
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
        Self::open_checked(digest, stem, map, source, None)
    }

    /// As [`Ranged::open`]; for a map whose addresses are the tar, once
    /// every span is held the tar is hashed and must be `diff_id`, else the
    /// range cache is dropped and the index distrusted.
    pub fn open_checked(
        digest: &str,
        stem: &Path,
        map: Box<dyn SpanMap>,
        source: Arc<dyn RangeSource>,
        diff_id: Option<String>,
    ) -> Result<Ranged, RangedError> {
        let data_path = stem.with_extension("data");
        let log_path = stem.with_extension("have");
        // 0600 and never through a symlink, like every file in the cache.
        let open = |p: &Path| {
            crate::private::options()
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
        for (f, p) in [(&data, &data_path), (&log, &log_path)] {
            crate::private::tighten_file(f).map_err(io_err(p))?;
        }
        let count = map.count();
        let mut state = State {
            have: vec![0; count.div_ceil(64)],
            held: 0,
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
        let map_is_tar = map.addresses_are_tar();
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
            tar_digest: diff_id.filter(|_| map_is_tar),
            tar_checked: Mutex::new(None),
            poisoned: std::sync::atomic::AtomicBool::new(false),
            stream: Default::default(),
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
        (self.lock().held, self.map.count())
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
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(RangedError::Distrusted {
                digest: self.digest.clone(),
            });
        }
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
            self.drop_all();
            return Err(RangedError::Span(e));
        }
        let before = self.fetched();
        self.ensure(first, last, last_byte + 1 + READ_AHEAD)?;
        if self.fetched() != before {
            self.after_demand_fetch();
        }
        // The read that completes the layer proves it first.
        self.check_tar()?;
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
        self.flush_log(true)?;
        self.check_tar()
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

mod keep;
mod prove;
mod stream;
use keep::distrust;
pub use keep::{Form, GZ_INDEX, RangedCache, TARSPLIT, TOC};
pub use stream::{STREAM_AFTER_FRACTION, STREAM_AFTER_REQUESTS, STREAM_WINDOW, STREAM_WORKERS};

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Spans that "compress" by xoring with 0x5a; each span's decoded bytes
    /// are checked against the content they must have.
    pub(super) struct Xor {
        pub(super) spans: Vec<SpanLoc>,
        pub(super) content: Vec<u8>,
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

    /// A range reader of `map` over `blob`, kept in `dir`.
    fn reader(dir: &tempfile::TempDir, map: Xor, blob: &Arc<Blob>) -> Ranged {
        Ranged::open(
            "sha256:x",
            &dir.path().join("l"),
            Box::new(map),
            blob.clone(),
        )
        .unwrap()
    }

    #[test]
    fn a_read_fetches_its_covering_spans_in_one_request_and_later_reads_come_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (map, blob) = layer(64, 4096);
        let content = map.content.clone();
        let r = reader(&dir, map, &blob);
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
        let r = reader(&dir, map, &blob);
        r.read_at(5000, &mut buf).unwrap();
        assert_eq!(buf, content[5000..15_000]);
        assert_eq!(blob.requests.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_span_that_fails_verification_is_an_error_and_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (map, blob) = layer(4, 1000);
        blob.bytes.lock().unwrap()[10 + 1010 + 5] ^= 1; // in span 1
        let r = reader(&dir, map, &blob);
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
        let r = reader(&dir, map, &blob);
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
        let r = Arc::new(reader(&dir, map, &blob));
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
        let r = reader(&dir, map, &blob);
        r.prefetch().unwrap();
        assert_eq!(r.held(), (100, 100));
        let before = blob.requests.load(Ordering::Relaxed);
        assert!(before <= 3, "{before} requests for 300 kB");
        let mut buf = vec![0; content.len()];
        r.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, content);
        assert_eq!(blob.requests.load(Ordering::Relaxed), before);
    }

    /// The `.have` log after half the layer was read, as the sound sample.
    fn have_sample() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let (map, blob) = layer(8, 1000);
        let r = reader(&dir, map, &blob);
        r.read_at(0, &mut vec![0; 4000]).unwrap();
        drop(r);
        std::fs::read(dir.path().join("l.have")).unwrap()
    }

    /// Opens a range cache whose data file holds only the spans `sound`
    /// logs, with `log` as its `.have` log, and reads the whole layer: every
    /// byte must be the layer's, whatever the log says (a span the log names
    /// but the data lacks would read as zeros, so the fuzz keeps the data
    /// whole: the log is what is damaged).
    fn read_with_have_log(log: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let (map, blob) = layer(8, 1000);
        let content = map.content.clone();
        let r = reader(&dir, map, &blob);
        r.prefetch().unwrap();
        drop(r);
        std::fs::write(dir.path().join("l.have"), log).unwrap();
        let (map, _) = layer(8, 1000);
        let r = match Ranged::open("sha256:x", &dir.path().join("l"), Box::new(map), blob) {
            Ok(r) => r,
            Err(_) => return Ok(()),
        };
        let mut buf = vec![0; content.len() + 10];
        let n = r.read_at(0, &mut buf).unwrap();
        proptest::prop_assert_eq!(&buf[..n], &content[..]);
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn a_damaged_have_log_is_read_without_a_panic_or_a_wrong_byte(
            d in crate::fuzzing::damage()
        ) {
            read_with_have_log(&d.apply(&have_sample()))?;
        }
    }

    #[test]
    fn the_have_log_corpus_is_read_without_a_panic_or_a_wrong_byte() {
        for (name, bytes) in crate::fuzzing::corpus("have", &[("sound", have_sample())]) {
            read_with_have_log(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
