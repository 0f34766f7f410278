//! Content search of an image without a mount, with ripgrep's own libraries.
//!
//! Files are searched in the order their bytes lie in each layer's tar, by
//! several threads taking runs of neighbouring files, so a cold page cache is
//! read sequentially rather than file by file through the tree. Results are
//! reported per file through [`Report`], in no fixed order (the caller sorts);
//! a binary file (one holding a NUL byte) reports that it matched, not its
//! lines, as GNU grep does. The options mean what GNU grep's do: several
//! patterns (`-e`), inverted (`-v`), words (`-w`), whole lines (`-x`),
//! context lines (`-A`/`-B`) and a match limit (`-m`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use grep_matcher::Matcher;
use grep_regex::{RegexMatcher, RegexMatcherBuilder};
use grep_searcher::{
    BinaryDetection, Searcher, SearcherBuilder, Sink, SinkContext, SinkContextKind, SinkMatch,
};

use super::FileData;
use crate::cache::Layer;
use crate::layer::{EntryKind, Segment};
use crate::names;
use crate::overlay::tree::{NodeId, Tree};

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
    /// A line matches if any of these does.
    pub patterns: Vec<String>,
    pub ignore_case: bool,
    /// The patterns are literal strings, not regular expressions.
    pub fixed: bool,
    /// Select the lines that do not match.
    pub invert: bool,
    /// A match must be a whole word.
    pub word: bool,
    /// A match must be a whole line.
    pub whole_line: bool,
    /// Lines of context before and after each match.
    pub before: usize,
    pub after: usize,
    /// Stop reading a file after this many selected lines (`-l` uses 1).
    pub max_count: Option<u64>,
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

/// Which files a walk of a tree takes: grep's `--include`, `--exclude`
/// (on a file's base name) and `--exclude-dir` (on a directory's).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub exclude_dir: Vec<String>,
}

impl Filter {
    /// Whether the walk searches the file at `path`.
    pub fn file(&self, path: &[u8]) -> bool {
        let base = names::split(path).1;
        let any = |globs: &[String]| globs.iter().any(|g| names::glob_match(g.as_bytes(), base));
        (self.include.is_empty() || any(&self.include)) && !any(&self.exclude)
    }

    /// Whether the walk goes into the directory at `path`.
    pub fn dir(&self, path: &[u8]) -> bool {
        let base = names::split(path).1;
        !self
            .exclude_dir
            .iter()
            .any(|g| names::glob_match(g.as_bytes(), base))
    }

    /// Every regular file at or below `start` (at `path`) the filter takes.
    /// A file named as `start` itself is taken whatever `--include` says, as
    /// grep searches a file named on its command line.
    pub fn files_below(
        &self,
        tree: &Tree,
        start: NodeId,
        path: &[u8],
        out: &mut Vec<(Vec<u8>, NodeId)>,
    ) {
        if tree.node(start).kind == EntryKind::File {
            out.push((path.to_vec(), start));
            return;
        }
        self.walk(tree, start, path, out);
    }

    fn walk(&self, tree: &Tree, start: NodeId, path: &[u8], out: &mut Vec<(Vec<u8>, NodeId)>) {
        match tree.node(start).kind {
            EntryKind::File if self.file(path) => out.push((path.to_vec(), start)),
            EntryKind::Dir if path.is_empty() || self.dir(path) => {
                for (name, c) in tree.children(start) {
                    self.walk(tree, c, &names::join(path, name), out);
                }
            }
            _ => {}
        }
    }
}

/// What one file held.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// Selected lines and their context, in file order, unless the file is binary.
    pub lines: Vec<Line>,
    /// Selected lines.
    pub count: u64,
    pub binary: bool,
}

/// A line of a file that matched, without its terminator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub number: u64,
    pub bytes: Vec<u8>,
    pub kind: LineKind,
    /// Byte ranges of the matches in a selected line (none when inverted).
    pub spans: Vec<(usize, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    Selected,
    Context,
    /// A gap between two groups of context (grep's `--`); no bytes.
    Break,
}

/// Receives each file that matched, from any search thread.
pub trait Report: Sync {
    fn found(&self, target: &Target<'_>, found: &Found);
    /// A file was searched, matching or not (for progress).
    fn searched(&self, _target: &Target<'_>) {}
}

struct Collect<'a> {
    found: &'a mut Found,
    matcher: &'a RegexMatcher,
    invert: bool,
    max_count: Option<u64>,
}

fn without_terminator(bytes: &[u8]) -> Vec<u8> {
    let mut line = bytes.to_vec();
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    line
}

impl Sink for Collect<'_> {
    type Error = std::io::Error;

    fn matched(&mut self, _: &Searcher, mat: &SinkMatch<'_>) -> Result<bool, std::io::Error> {
        self.found.count += 1;
        if !self.found.binary {
            let bytes = without_terminator(mat.bytes());
            let mut spans = Vec::new();
            if !self.invert {
                let _ = self.matcher.find_iter(&bytes, |m| {
                    if m.end() > m.start() {
                        spans.push((m.start(), m.end()));
                    }
                    true
                });
            }
            self.found.lines.push(Line {
                number: mat.line_number().unwrap_or(0),
                bytes,
                kind: LineKind::Selected,
                spans,
            });
        }
        Ok(self.max_count.is_none_or(|m| self.found.count < m))
    }

    fn context(&mut self, _: &Searcher, ctx: &SinkContext<'_>) -> Result<bool, std::io::Error> {
        if !self.found.binary && !matches!(ctx.kind(), SinkContextKind::Other) {
            self.found.lines.push(Line {
                number: ctx.line_number().unwrap_or(0),
                bytes: without_terminator(ctx.bytes()),
                kind: LineKind::Context,
                spans: Vec::new(),
            });
        }
        Ok(true)
    }

    fn context_break(&mut self, _: &Searcher) -> Result<bool, std::io::Error> {
        if !self.found.binary {
            self.found.lines.push(Line {
                number: 0,
                bytes: Vec::new(),
                kind: LineKind::Break,
                spans: Vec::new(),
            });
        }
        Ok(true)
    }

    fn binary_data(&mut self, _: &Searcher, _: u64) -> Result<bool, std::io::Error> {
        self.found.binary = true;
        self.found.lines.clear();
        Ok(true)
    }
}

/// The error of the pattern that is wrong, in the user's own words: the
/// patterns together are one regex with wrappers the user never wrote.
fn pattern_error(opts: &Options, all: grep_regex::Error) -> GrepError {
    let one_line = |e: &grep_regex::Error| {
        let text = e.to_string();
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        last.trim().trim_start_matches("error: ").to_string()
    };
    for p in &opts.patterns {
        if let Err(e) = RegexMatcherBuilder::new()
            .fixed_strings(opts.fixed)
            .line_terminator(Some(b'\n'))
            .build(p)
        {
            return GrepError::Pattern(format!("{p:?}: {}", one_line(&e)));
        }
    }
    GrepError::Pattern(one_line(&all))
}

fn stopped(opts: &Options) -> bool {
    opts.stop
        .as_ref()
        .is_some_and(|s| s.load(Ordering::Relaxed))
}

fn matcher(opts: &Options) -> Result<RegexMatcher, GrepError> {
    RegexMatcherBuilder::new()
        .case_insensitive(opts.ignore_case)
        .fixed_strings(opts.fixed)
        .word(opts.word)
        .whole_line(opts.whole_line)
        .line_terminator(Some(b'\n'))
        .build_many(&opts.patterns)
        .map_err(|e| pattern_error(opts, e))
}

/// Whether the patterns are valid, before anything is read.
pub fn check(opts: &Options) -> Result<(), GrepError> {
    matcher(opts).map(drop)
}

/// Searches `targets`; says whether anything matched.
pub fn search(
    targets: &[Target<'_>],
    layers: &[Arc<Layer>],
    digests: &[String],
    opts: &Options,
    report: &dyn Report,
) -> Result<bool, GrepError> {
    let matcher = matcher(opts)?;
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
                        .invert_match(opts.invert)
                        .before_context(opts.before)
                        .after_context(opts.after)
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
                                matcher: &matcher,
                                invert: opts.invert,
                                max_count: opts.max_count,
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
