//! Content search of an image without a mount, with ripgrep's own libraries.
//!
//! Files are searched in the order their bytes lie in each layer's tar, by
//! several threads taking runs of neighbouring files, so a cold page cache is
//! read sequentially rather than file by file through the tree. Results are
//! reported per file through [`Report`], in no fixed order; a binary file
//! (one holding a NUL byte) reports that it matched, not its lines, as GNU
//! grep does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use grep_regex::RegexMatcherBuilder;
use grep_searcher::{BinaryDetection, Searcher, SearcherBuilder, Sink, SinkMatch};

use super::FileData;
use crate::cache::Layer;
use crate::layer::Segment;
use crate::names;

#[derive(Debug, thiserror::Error)]
pub enum GrepError {
    #[error("bad pattern: {0}")]
    Pattern(String),
    #[error("a search thread stopped unexpectedly")]
    Worker,
    #[error("{}: reading layer {digest}: {source}", names::escaped(.path))]
    Read {
        path: Vec<u8>,
        digest: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub pattern: String,
    pub ignore_case: bool,
    /// The pattern is a literal string, not a regular expression.
    pub fixed: bool,
    /// Stop at a file's first match (for `-l`).
    pub first_only: bool,
    pub threads: usize,
    /// Set (by Ctrl-C, say) to stop before the next file; what was found
    /// so far is reported.
    pub stop: Option<Arc<AtomicBool>>,
}

/// A file to search: where its bytes are.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub path: Vec<u8>,
    pub layer: usize,
    pub offset: u64,
    pub size: u64,
    pub sparse: Option<std::borrow::Cow<'a, [Segment]>>,
    /// For a deleted entry: the layer that hid it.
    pub hidden_by: Option<usize>,
}

/// What one file held.
#[derive(Debug, Default)]
pub struct Found {
    /// `(line number, line without its terminator)`, unless the file is binary.
    pub lines: Vec<(u64, Vec<u8>)>,
    pub count: u64,
    pub binary: bool,
}

/// Receives each file that matched, from any search thread.
pub trait Report: Sync {
    fn found(&self, target: &Target<'_>, found: &Found);
    /// A file was searched, matching or not (for progress).
    fn searched(&self, _target: &Target<'_>) {}
}

struct Collect<'a> {
    found: &'a mut Found,
    first_only: bool,
}

impl Sink for Collect<'_> {
    type Error = std::io::Error;

    fn matched(&mut self, _: &Searcher, mat: &SinkMatch<'_>) -> Result<bool, std::io::Error> {
        self.found.count += 1;
        if !self.found.binary {
            let mut line = mat.bytes().to_vec();
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            self.found
                .lines
                .push((mat.line_number().unwrap_or(0), line));
        }
        Ok(!self.first_only)
    }

    fn binary_data(&mut self, _: &Searcher, _: u64) -> Result<bool, std::io::Error> {
        self.found.binary = true;
        self.found.lines.clear();
        Ok(true)
    }
}

fn stopped(opts: &Options) -> bool {
    opts.stop
        .as_ref()
        .is_some_and(|s| s.load(Ordering::Relaxed))
}

/// Searches `targets`; says whether anything matched.
pub fn search(
    targets: &[Target<'_>],
    layers: &[Arc<Layer>],
    digests: &[String],
    opts: &Options,
    report: &dyn Report,
) -> Result<bool, GrepError> {
    let matcher = RegexMatcherBuilder::new()
        .case_insensitive(opts.ignore_case)
        .fixed_strings(opts.fixed)
        .line_terminator(Some(b'\n'))
        .build(&opts.pattern)
        .map_err(|e| GrepError::Pattern(e.to_string()))?;
    // Each layer's files in the order their bytes lie in its tar.
    let mut order: Vec<usize> = (0..targets.len())
        .filter(|&i| targets[i].size > 0)
        .collect();
    order.sort_by_key(|&i| (targets[i].layer, targets[i].offset));
    const RUN: usize = 32;
    let next = AtomicUsize::new(0);
    let any = AtomicBool::new(false);
    let threads = opts.threads.clamp(1, 16);
    let results: Vec<Result<(), GrepError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<(), GrepError> {
                    let mut searcher = SearcherBuilder::new()
                        .line_number(true)
                        .binary_detection(BinaryDetection::convert(b'\0'))
                        .build();
                    loop {
                        let start = next.fetch_add(RUN, Ordering::Relaxed);
                        if start >= order.len() {
                            return Ok(());
                        }
                        for &i in &order[start..(start + RUN).min(order.len())] {
                            if stopped(opts) {
                                return Ok(());
                            }
                            let t = &targets[i];
                            let Some(layer) = layers.get(t.layer) else {
                                continue;
                            };
                            let data =
                                FileData::new(Some(layer), t.offset, t.size, t.sparse.as_deref());
                            let mut found = Found::default();
                            let sink = Collect {
                                found: &mut found,
                                first_only: opts.first_only,
                            };
                            searcher
                                .search_reader(&matcher, data, sink)
                                .map_err(|source| GrepError::Read {
                                    path: t.path.clone(),
                                    digest: digests.get(t.layer).cloned().unwrap_or_default(),
                                    source,
                                })?;
                            if found.count > 0 {
                                any.store(true, Ordering::Relaxed);
                                report.found(t, &found);
                            }
                            report.searched(t);
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(Err(GrepError::Worker)))
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(any.load(Ordering::Relaxed))
}
