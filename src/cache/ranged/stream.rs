//! Switching a layer read by range to streaming once reads show that most
//! of it is wanted: a workload that reads every file (a scan, a checksum of
//! the whole image) would otherwise pay one round trip per file, which
//! costs far more than downloading the layer once.
//!
//! The switch is made after [`STREAM_AFTER_REQUESTS`] reads needed the
//! network, or once reads have fetched a [`STREAM_AFTER_FRACTION`]th of the
//! blob. From then on [`STREAM_WORKERS`] background threads walk the layer's
//! spans in blob order, claim the next [`STREAM_WINDOW`] of compressed bytes
//! not yet held nor being fetched, and fetch them with as few requests as
//! their runs allow; two such requests are in flight at once, so one
//! downloads while the next is asked. Every span is verified and decoded
//! by the layer's span map exactly as a read's would be (the same
//! `fetch_spans`), and held spans are skipped, so the bytes fetched stay
//! those of the blob plus the small gaps that coalescing downloads.
//!
//! Reads go on as before meanwhile: a span the stream has claimed is waited
//! for (it is in flight), any other missing span is fetched by the read
//! itself. A span that fails verification is logged and left out (the read
//! that wants it fails with the reason); a failed fetch stops the stream
//! (with a warning), and reads then fetch what they need themselves.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::{MAX_REQUEST, Ranged};

/// Reads that needed the network after which the rest is streamed: a
/// single file's read (one or two requests) never gets there; a scan of
/// many files gets there within a fraction of a second.
pub const STREAM_AFTER_REQUESTS: u64 = 32;
/// ... or once reads have fetched this fraction (1/n) of the blob.
pub const STREAM_AFTER_FRACTION: u64 = 8;
/// Compressed bytes one streaming step claims: large enough that a round
/// trip is small beside its download, small enough that a read waiting on
/// a claimed span does not wait long.
pub const STREAM_WINDOW: u64 = 4 << 20;
/// Streaming steps in flight at once.
pub const STREAM_WORKERS: usize = 2;

/// A layer's streaming state.
#[derive(Default)]
pub(super) struct Stream {
    /// The layer itself, for the background threads; unset for a reader
    /// not shared through [`Ranged::into_shared`], which never streams.
    me: OnceLock<Weak<Ranged>>,
    /// Reads that fetched something.
    demand: AtomicU64,
    started: AtomicBool,
    /// Next span to consider, in span order.
    cursor: Mutex<usize>,
    /// Compressed bytes the stream fetched.
    streamed: AtomicU64,
    /// Workers still running.
    running: AtomicU64,
}

impl Ranged {
    /// Shares the reader, letting it stream the rest of its layer in the
    /// background once reads show most of it is wanted.
    pub fn into_shared(self) -> Arc<Ranged> {
        let me = Arc::new(self);
        let _ = me.stream.me.set(Arc::downgrade(&me));
        me
    }

    /// Whether the rest of the layer is being (or was) streamed.
    pub fn streaming(&self) -> bool {
        self.stream.started.load(Ordering::Acquire)
    }

    /// Compressed bytes fetched by streaming, of all [`Ranged::fetched`].
    pub fn streamed(&self) -> u64 {
        self.stream.streamed.load(Ordering::Relaxed)
    }

    /// Total compressed bytes of the layer's spans.
    fn compressed_total(&self) -> u64 {
        (0..self.map.count()).map(|i| self.map.span(i).clen).sum()
    }

    /// Called after a read that had to fetch: starts streaming when reads
    /// have shown that most of the layer is wanted.
    pub(super) fn after_demand_fetch(&self) {
        let s = &self.stream;
        if s.started.load(Ordering::Acquire) {
            return;
        }
        let n = s.demand.fetch_add(1, Ordering::Relaxed) + 1;
        let dense = n >= STREAM_AFTER_REQUESTS
            || self.fetched().saturating_mul(STREAM_AFTER_FRACTION) >= self.compressed_total();
        if !dense || self.complete() {
            return;
        }
        let Some(me) = s.me.get() else { return };
        if s.started.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::info!(
            "layer {}: {n} reads needed the network; streaming the rest of the layer",
            self.digest
        );
        s.running.store(STREAM_WORKERS as u64, Ordering::Release);
        for k in 0..STREAM_WORKERS {
            let me = me.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("rimg-stream-{k}"))
                .spawn(move || stream_worker(me));
            if let Err(e) = spawned {
                tracing::warn!("layer {}: cannot start streaming: {e}", self.digest);
                s.running.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Claims the next window of spans neither held nor in flight, in
    /// span order; empty once the cursor has passed the last span.
    fn claim_window(&self) -> Vec<usize> {
        let n = self.map.count();
        let mut cursor = self.stream.cursor.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        let mut claimed = Vec::new();
        let mut bytes = 0;
        while *cursor < n && bytes < STREAM_WINDOW.min(MAX_REQUEST) {
            let i = *cursor;
            if !st.has(i) && !st.inflight.contains(&i) {
                let clen = self.map.span(i).clen;
                // A span larger than a window is a window of its own.
                if !claimed.is_empty() && bytes + clen > STREAM_WINDOW {
                    break;
                }
                st.inflight.insert(i);
                claimed.push(i);
                bytes += clen;
            }
            *cursor += 1;
        }
        claimed
    }

    /// One streaming step: fetches, verifies and keeps `spans` (claimed),
    /// then releases them to any read waiting.
    fn stream_step(&self, spans: &[usize]) -> Result<(), super::RangedError> {
        let before = self.fetched();
        let result = self.fetch_spans(spans, usize::MAX);
        self.stream
            .streamed
            .fetch_add(self.fetched().saturating_sub(before), Ordering::Relaxed);
        {
            let mut st = self.lock();
            for i in spans {
                st.inflight.remove(i);
            }
            self.done.notify_all();
        }
        result?;
        self.flush_log(false)
    }
}

/// A background streaming thread: steps until the layer is done, it
/// fails, or the layer is dropped.
fn stream_worker(me: Weak<Ranged>) {
    loop {
        let Some(r) = me.upgrade() else { return };
        let spans = r.claim_window();
        let outcome = if spans.is_empty() {
            None
        } else {
            Some(r.stream_step(&spans))
        };
        match outcome {
            Some(Ok(())) => continue,
            // A span that fails verification is not kept; the read that
            // wants it fetches it again and reports it. The rest is good.
            Some(Err(e @ (super::RangedError::Span(_) | super::RangedError::Length { .. }))) => {
                tracing::warn!("streaming: {}", crate::report::Chain(&e));
                continue;
            }
            Some(Err(e)) => {
                tracing::warn!(
                    "streaming the rest of the layer stopped: {}; reads fetch what they need",
                    crate::report::Chain(&e)
                );
                // Past the end: the other worker stops too.
                *r.stream.cursor.lock().unwrap_or_else(|e| e.into_inner()) = usize::MAX;
            }
            None => {}
        }
        if r.stream.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Err(e) = r.flush_log(true) {
                tracing::warn!("{}", crate::report::Chain(&e));
            }
            tracing::info!(
                "layer {}: streamed {} bytes; {} of {} spans held",
                r.digest,
                r.streamed(),
                r.held().0,
                r.map.count()
            );
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BoxError, RangeSource, SpanLoc};
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    // The span map of the range cache's own tests: spans xored with 0x5a.
    use super::super::tests::Xor;

    struct Blob {
        bytes: Vec<u8>,
        requests: AtomicUsize,
    }
    impl RangeSource for Blob {
        fn fetch(&self, start: u64, len: u64) -> Result<Vec<u8>, BoxError> {
            self.requests.fetch_add(1, Ordering::Relaxed);
            Ok(self.bytes[start as usize..(start + len) as usize].to_vec())
        }
    }

    const SPAN: u64 = 64 * 1024;

    /// A shared reader of `n` spans of SPAN bytes, with span `bad` (if
    /// any) damaged in the blob.
    fn layer(
        dir: &tempfile::TempDir,
        n: u64,
        bad: Option<u64>,
    ) -> (Arc<Ranged>, Arc<Blob>, Vec<u8>) {
        let content: Vec<u8> = (0..n * SPAN).map(|i| (i * 13 % 251) as u8).collect();
        let mut bytes: Vec<u8> = content.iter().map(|b| b ^ 0x5a).collect();
        if let Some(b) = bad {
            bytes[(b * SPAN + 7) as usize] ^= 1;
        }
        let spans = (0..n)
            .map(|i| SpanLoc {
                start: i * SPAN,
                len: SPAN,
                coff: i * SPAN,
                clen: SPAN,
            })
            .collect();
        let blob = Arc::new(Blob {
            bytes,
            requests: AtomicUsize::new(0),
        });
        let map = Xor {
            spans,
            content: content.clone(),
        };
        let r = Ranged::open(
            "sha256:x",
            &dir.path().join("l"),
            Box::new(map),
            blob.clone(),
        )
        .unwrap()
        .into_shared();
        (r, blob, content)
    }

    fn wait_until(cond: impl Fn() -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Reads one byte of span `i`: a read the read-ahead of earlier ones
    /// (at higher spans) never covers.
    fn read_span(r: &Ranged, i: u64, content: &[u8]) -> Result<(), super::super::RangedError> {
        let mut b = [0u8; 100];
        r.read_at(i * SPAN, &mut b)?;
        assert_eq!(
            b[..],
            content[(i * SPAN) as usize..(i * SPAN) as usize + 100]
        );
        Ok(())
    }

    #[test]
    fn many_reads_that_fetch_switch_to_streaming_every_span_once_in_few_requests() {
        let dir = tempfile::tempdir().unwrap();
        let n = 400;
        let (r, blob, content) = layer(&dir, n, None);
        for i in (n - STREAM_AFTER_REQUESTS..n).rev() {
            read_span(&r, i, &content).unwrap();
        }
        assert!(r.streaming());
        assert!(wait_until(|| r.complete()), "{:?}", r.held());
        let mut all = vec![0; content.len()];
        assert_eq!(r.read_at(0, &mut all).unwrap(), all.len());
        assert_eq!(all, content);
        // Every span once: the bytes fetched are the blob's.
        assert_eq!(r.fetched(), n * SPAN);
        let requests = blob.requests.load(Ordering::Relaxed) as u64;
        let windows = (n * SPAN).div_ceil(STREAM_WINDOW);
        assert!(
            requests <= STREAM_AFTER_REQUESTS + windows + 2,
            "{requests} requests"
        );
    }

    #[test]
    fn a_few_reads_never_stream() {
        let dir = tempfile::tempdir().unwrap();
        let (r, blob, content) = layer(&dir, 400, None);
        for i in [399, 200, 5] {
            read_span(&r, i, &content).unwrap();
        }
        assert!(!r.streaming());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(blob.requests.load(Ordering::Relaxed), 3);
        assert!(r.fetched() <= 3 * (SPAN + READ_AHEAD + SPAN));
    }

    #[test]
    fn a_span_failing_verification_while_streaming_is_skipped_and_fails_its_read() {
        let dir = tempfile::tempdir().unwrap();
        let n = 300;
        let (r, _blob, content) = layer(&dir, n, Some(10));
        for i in (n - STREAM_AFTER_REQUESTS..n).rev() {
            read_span(&r, i, &content).unwrap();
        }
        // Everything but the bad span arrives.
        assert!(
            wait_until(|| r.held().0 == n as usize - 1),
            "{:?}",
            r.held()
        );
        assert!(wait_until(|| r.stream.running.load(Ordering::Acquire) == 0));
        for i in 0..n {
            let got = read_span(&r, i, &content);
            assert_eq!(got.is_err(), i == 10, "span {i}: {got:?}");
        }
    }

    use super::super::READ_AHEAD;
}
