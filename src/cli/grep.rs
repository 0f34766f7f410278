//! `rimg grep`: GNU grep's flags, meaning what they mean there, over an
//! image's merged tree (and with `--deleted`, what later layers hid).
//! Output is sorted by path (bytes, as `LC_ALL=C sort` orders them), so two
//! runs print the same thing whatever order the search threads finish in.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde_json::{Map, Value};

use super::forensics::{absolute, digests, put_bytes};
use super::{Common, Names, runtime};
use rimg::forensics::{self, grep};
use rimg::layer::{EntryKind, LayerIndex};
use rimg::overlay::tree::{NodeId, Tree};

/// When to colour matches, as grep's `--color`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorWhen {
    Auto,
    Always,
    Never,
}

#[derive(clap::Args)]
pub struct GrepArgs {
    /// PATTERN (unless -e gives it), then the image, then paths in the
    /// image to search below [default: all of it].
    #[arg(value_name = "ARGS", required = true)]
    pub operands: Vec<OsString>,
    /// A pattern; repeatable: a line matches if any does.
    #[arg(
        short = 'e',
        long = "regexp",
        value_name = "PATTERN",
        help_heading = "Matching"
    )]
    pub regexp: Vec<String>,
    /// Patterns are (Rust syntax) extended regular expressions; the default.
    #[arg(
        short = 'E',
        long,
        conflicts_with = "fixed_strings",
        help_heading = "Matching"
    )]
    pub extended_regexp: bool,
    /// Patterns are fixed strings.
    #[arg(short = 'F', long, help_heading = "Matching")]
    pub fixed_strings: bool,
    /// Ignore case.
    #[arg(short = 'i', long, help_heading = "Matching")]
    pub ignore_case: bool,
    /// Select the lines that do not match.
    #[arg(short = 'v', long, help_heading = "Matching")]
    pub invert_match: bool,
    /// Match only whole words.
    #[arg(short = 'w', long, help_heading = "Matching")]
    pub word_regexp: bool,
    /// Match only whole lines.
    #[arg(short = 'x', long, help_heading = "Matching")]
    pub line_regexp: bool,
    /// Stop reading a file after NUM selected lines.
    #[arg(short = 'm', long, value_name = "NUM", help_heading = "Matching")]
    pub max_count: Option<u64>,
    /// Search only files whose base name matches GLOB; repeatable.
    #[arg(long, value_name = "GLOB", help_heading = "Files")]
    pub include: Vec<String>,
    /// Skip files whose base name matches GLOB; repeatable.
    #[arg(long, value_name = "GLOB", help_heading = "Files")]
    pub exclude: Vec<String>,
    /// Skip directories whose base name matches GLOB; repeatable.
    #[arg(long, value_name = "GLOB", help_heading = "Files")]
    pub exclude_dir: Vec<String>,
    /// Accepted for grep's habit: the search always recurses.
    #[arg(short = 'r', long, visible_short_alias = 'R', help_heading = "Files")]
    pub recursive: bool,
    /// Also search what later layers deleted (where leaked secrets hide).
    #[arg(long, help_heading = "Files")]
    pub deleted: bool,
    /// Only the names of files that have a selected line.
    #[arg(short = 'l', long, help_heading = "Output")]
    pub files_with_matches: bool,
    /// Only the names of files that have none.
    #[arg(short = 'L', long, help_heading = "Output")]
    pub files_without_match: bool,
    /// Only a count of selected lines per file.
    #[arg(short = 'c', long, help_heading = "Output")]
    pub count: bool,
    /// Only the matched parts of each line, one per line.
    #[arg(short = 'o', long, help_heading = "Output")]
    pub only_matching: bool,
    /// Print nothing; exit 0 on the first match.
    #[arg(short = 'q', long, visible_alias = "silent", help_heading = "Output")]
    pub quiet: bool,
    /// No messages about unreadable paths.
    #[arg(short = 's', long, help_heading = "Output")]
    pub no_messages: bool,
    /// Line numbers.
    #[arg(short = 'n', long, help_heading = "Output")]
    pub line_number: bool,
    /// Print the file name with each line (the default when searching a
    /// directory).
    #[arg(short = 'H', long, help_heading = "Output")]
    pub with_filename: bool,
    /// Never print file names.
    #[arg(
        short = 'h',
        long,
        conflicts_with = "with_filename",
        help_heading = "Output"
    )]
    pub no_filename: bool,
    /// NUM lines of context after each selected line.
    #[arg(short = 'A', long, value_name = "NUM", help_heading = "Output")]
    pub after_context: Option<usize>,
    /// NUM lines of context before each selected line.
    #[arg(short = 'B', long, value_name = "NUM", help_heading = "Output")]
    pub before_context: Option<usize>,
    /// NUM lines of context before and after.
    #[arg(short = 'C', long, value_name = "NUM", help_heading = "Output")]
    pub context: Option<usize>,
    /// Colour matches, file names and line numbers as GNU grep does.
    #[arg(long, visible_alias = "colour", value_enum, value_name = "WHEN",
          num_args = 0..=1, default_missing_value = "auto", default_value = "never",
          help_heading = "Output")]
    pub color: ColorWhen,
    /// Say which layer each match came from.
    #[arg(long, help_heading = "Output")]
    pub layers: bool,
    /// One JSON object per line.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// More logging (--verbose info, twice debug); -v is --invert-match here.
    #[arg(long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Print help (-h is --no-filename here, as in grep).
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
    #[command(flatten)]
    pub common: Common,
}

/// The operands split as grep reads them: with `-e`, none is the pattern.
struct Operands {
    patterns: Vec<String>,
    reference: String,
    paths: Vec<Vec<u8>>,
}

impl GrepArgs {
    fn operands(&self) -> Result<Operands> {
        let mut rest = self.operands.iter();
        let patterns = if self.regexp.is_empty() {
            let p = rest.next().context("no pattern given")?;
            vec![
                p.to_str()
                    .context("the pattern is not valid UTF-8")?
                    .to_string(),
            ]
        } else {
            self.regexp.clone()
        };
        let reference = rest
            .next()
            .context("no image given: rimg grep PATTERN REF [PATH]...")?
            .to_str()
            .context("the image reference is not valid UTF-8")?
            .to_string();
        let paths = rest.map(|p| p.as_bytes().to_vec()).collect();
        Ok(Operands {
            patterns,
            reference,
            paths,
        })
    }
}

/// Whether `name` matches a shell glob (`*`, `?`, `[...]`, `[!...]`, `\`),
/// as fnmatch without flags does.
pub(crate) fn glob_match(glob: &[u8], name: &[u8]) -> bool {
    match glob.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob_match(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && glob_match(rest, &name[1..]),
        Some((b'[', rest)) if rest.contains(&b']') => {
            let Some((&c, tail)) = name.split_first() else {
                return false;
            };
            let (negate, set) = match rest.first() {
                Some(b'!' | b'^') => (true, &rest[1..]),
                _ => (false, rest),
            };
            // A `]` first in the set is a member, not its end.
            let end = 1 + set[1..]
                .iter()
                .position(|&b| b == b']')
                .unwrap_or(set.len() - 1);
            if end >= set.len() {
                return glob[0] == c && glob_match(&glob[1..], tail);
            }
            let members = &set[..end];
            let mut hit = false;
            let mut i = 0;
            while i < members.len() {
                if i + 2 < members.len() && members[i + 1] == b'-' {
                    hit |= (members[i]..=members[i + 2]).contains(&c);
                    i += 3;
                } else {
                    hit |= members[i] == c;
                    i += 1;
                }
            }
            hit != negate && glob_match(&set[end + 1..], tail)
        }
        Some((b'\\', rest)) if !rest.is_empty() => {
            name.first() == Some(&rest[0]) && glob_match(&rest[1..], &name[1..])
        }
        Some((&g, rest)) => name.first() == Some(&g) && glob_match(rest, &name[1..]),
    }
}

/// Which files and directories the walk takes.
struct Filter<'a> {
    include: &'a [String],
    exclude: &'a [String],
    exclude_dir: &'a [String],
}

impl Filter<'_> {
    fn file(&self, path: &[u8]) -> bool {
        let base = rimg::names::split(path).1;
        let any = |globs: &[String]| globs.iter().any(|g| glob_match(g.as_bytes(), base));
        (self.include.is_empty() || any(self.include)) && !any(self.exclude)
    }

    fn dir(&self, path: &[u8]) -> bool {
        let base = rimg::names::split(path).1;
        !self
            .exclude_dir
            .iter()
            .any(|g| glob_match(g.as_bytes(), base))
    }
}

/// Every regular file at or below `start` the filter takes, with its path.
fn files_below(
    tree: &Tree,
    start: NodeId,
    path: &[u8],
    filter: &Filter<'_>,
    out: &mut Vec<(Vec<u8>, NodeId)>,
) {
    let n = tree.node(start);
    match n.kind {
        EntryKind::File if filter.file(path) => out.push((path.to_vec(), start)),
        EntryKind::Dir if path.is_empty() || filter.dir(path) => {
            for (name, c) in tree.children(start) {
                files_below(tree, c, &rimg::names::join(path, name), filter, out);
            }
        }
        _ => {}
    }
}

/// GNU grep's default colours (GREP_COLORS): match, file name, line
/// number, separator.
const SGR_MATCH: &str = "\x1b[01;31m\x1b[K";
const SGR_FILE: &str = "\x1b[35m\x1b[K";
const SGR_LINE: &str = "\x1b[32m\x1b[K";
const SGR_SEP: &str = "\x1b[36m\x1b[K";
const SGR_END: &str = "\x1b[m\x1b[K";

/// Path, then merged before deleted copies, then by layer.
type SortKey = (Vec<u8>, usize, usize);

struct Printer<'a> {
    args: &'a GrepArgs,
    names: Names,
    color: bool,
    filenames: bool,
    context: bool,
    /// Each file's output, keyed for sorting: path, then deleted copies by layer.
    outputs: Mutex<Vec<(SortKey, Vec<u8>)>>,
    matched: Mutex<Vec<(Vec<u8>, Option<usize>)>>,
}

impl Printer<'_> {
    fn paint(&self, buf: &mut Vec<u8>, sgr: &str, text: &[u8]) {
        if self.color {
            buf.extend_from_slice(sgr.as_bytes());
            buf.extend_from_slice(text);
            buf.extend_from_slice(SGR_END.as_bytes());
        } else {
            buf.extend_from_slice(text);
        }
    }

    /// The file name and what layer it came from.
    fn name(&self, buf: &mut Vec<u8>, t: &grep::Target<'_>) {
        let mut name = Vec::new();
        let _ = self.names.write(&mut name, &absolute(&t.path));
        self.paint(buf, SGR_FILE, &name);
        if let Some(h) = t.hidden_by {
            let _ = write!(buf, " (deleted: layer {}, hidden by {})", t.layer, h);
        } else if self.args.layers {
            let _ = write!(buf, " (layer {})", t.layer);
        }
    }

    /// `name:` `number:` before a line; `-` after them for context lines.
    fn prefix(&self, buf: &mut Vec<u8>, t: &grep::Target<'_>, number: u64, sep: u8) {
        if self.filenames {
            self.name(buf, t);
            self.paint(buf, SGR_SEP, &[sep]);
        }
        if self.args.line_number {
            self.paint(buf, SGR_LINE, number.to_string().as_bytes());
            self.paint(buf, SGR_SEP, &[sep]);
        }
    }

    fn text(&self, buf: &mut Vec<u8>, t: &grep::Target<'_>, f: &grep::Found) {
        let a = self.args;
        if a.files_with_matches || a.files_without_match {
            self.name(buf, t);
            buf.push(b'\n');
        } else if a.count {
            if self.filenames {
                self.name(buf, t);
                self.paint(buf, SGR_SEP, b":");
            }
            let _ = writeln!(buf, "{}", f.count);
        } else if f.binary {
            let _ = write!(buf, "rimg: ");
            self.name(buf, t);
            let _ = writeln!(buf, ": binary file matches");
        } else {
            for line in &f.lines {
                self.line(buf, t, line);
            }
        }
    }

    fn line(&self, buf: &mut Vec<u8>, t: &grep::Target<'_>, line: &grep::Line) {
        match line.kind {
            grep::LineKind::Break => {
                if !self.args.only_matching {
                    self.paint(buf, SGR_SEP, b"--");
                    buf.push(b'\n');
                }
            }
            grep::LineKind::Context => {
                if !self.args.only_matching {
                    self.prefix(buf, t, line.number, b'-');
                    buf.extend_from_slice(&line.bytes);
                    buf.push(b'\n');
                }
            }
            grep::LineKind::Selected if self.args.only_matching => {
                for &(s, e) in &line.spans {
                    self.prefix(buf, t, line.number, b':');
                    self.paint(buf, SGR_MATCH, &line.bytes[s..e]);
                    buf.push(b'\n');
                }
            }
            grep::LineKind::Selected => {
                self.prefix(buf, t, line.number, b':');
                let mut at = 0;
                if self.color {
                    for &(s, e) in &line.spans {
                        buf.extend_from_slice(&line.bytes[at..s]);
                        self.paint(buf, SGR_MATCH, &line.bytes[s..e]);
                        at = e;
                    }
                }
                buf.extend_from_slice(&line.bytes[at..]);
                buf.push(b'\n');
            }
        }
    }

    fn json(&self, buf: &mut Vec<u8>, t: &grep::Target<'_>, f: &grep::Found) {
        let a = self.args;
        let base = || {
            let mut o = Map::new();
            put_bytes(&mut o, "path", &absolute(&t.path));
            o.insert("layer".into(), t.layer.into());
            if let Some(h) = t.hidden_by {
                o.insert("deleted".into(), true.into());
                o.insert("hidden_by".into(), h.into());
            }
            o
        };
        if a.files_with_matches || a.files_without_match || a.count || f.binary {
            let mut o = base();
            o.insert("count".into(), f.count.into());
            o.insert("binary".into(), f.binary.into());
            let _ = writeln!(buf, "{}", Value::Object(o));
            return;
        }
        for line in f
            .lines
            .iter()
            .filter(|l| l.kind == grep::LineKind::Selected)
        {
            let mut o = base();
            o.insert("line_number".into(), line.number.into());
            put_bytes(&mut o, "line", &line.bytes);
            let _ = writeln!(buf, "{}", Value::Object(o));
        }
    }
}

impl grep::Report for Printer<'_> {
    fn found(&self, t: &grep::Target<'_>, f: &grep::Found) {
        let a = self.args;
        if f.count > 0 {
            self.matched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((t.path.clone(), t.hidden_by));
            if a.files_without_match {
                return;
            }
        }
        if a.quiet {
            return;
        }
        let mut buf = Vec::new();
        if a.json {
            self.json(&mut buf, t, f);
        } else {
            self.text(&mut buf, t, f);
        }
        let key = (t.path.clone(), t.hidden_by.map_or(0, |_| 1), t.layer);
        self.outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key, buf));
    }
}

/// The files to search, and whether grep would leave their names out (one
/// file operand and no directory).
fn targets<'t>(
    args: &GrepArgs,
    paths: &[Vec<u8>],
    tree: &'t Tree,
    layers: &[std::sync::Arc<rimg::cache::Layer>],
    source: &rimg::image::ImageSource,
) -> Result<(Vec<grep::Target<'t>>, bool)> {
    let filter = Filter {
        include: &args.include,
        exclude: &args.exclude,
        exclude_dir: &args.exclude_dir,
    };
    let mut files = Vec::new();
    let roots: Vec<Vec<u8>> = if paths.is_empty() {
        vec![Vec::new()]
    } else {
        paths.iter().map(|p| rimg::layer::normalize(p)).collect()
    };
    // grep names files unless it was given one file and no directory.
    let mut one_file = roots.len() == 1;
    for p in &roots {
        let id = match tree.resolve(&absolute(p), true) {
            Ok(id) => id,
            Err(e) if args.no_messages => {
                tracing::debug!("{}: {e}", rimg::names::escaped(&absolute(p)));
                continue;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(source.image.reference.to_string()));
            }
        };
        one_file &= tree.node(id).kind != EntryKind::Dir;
        // A file named on the command line is searched whatever --include says.
        if tree.node(id).kind == EntryKind::File {
            files.push((p.clone(), id));
        } else {
            files_below(tree, id, p, &filter, &mut files);
        }
    }
    let mut targets: Vec<grep::Target<'_>> = files
        .iter()
        .map(|(p, id)| {
            let n = tree.node(*id);
            grep::Target {
                path: p.clone(),
                layer: n.layer as usize,
                offset: n.offset,
                size: n.size,
                sparse: n.sparse(),
                hidden_by: None,
            }
        })
        .collect();
    if args.deleted {
        let indexes: Vec<LayerIndex> = layers
            .iter()
            .map(|l| l.index())
            .collect::<Result<_, _>>()
            .with_context(|| source.image.reference.to_string())?;
        for d in forensics::deleted(&indexes)? {
            let e = &indexes[d.layer].entries[d.entry];
            let under = roots.iter().any(|r| {
                r.is_empty() || d.path == *r || d.path.starts_with(&[&r[..], b"/"].concat())
            });
            if e.kind == EntryKind::File && under && filter.file(&d.path) {
                targets.push(grep::Target {
                    path: d.path.clone(),
                    layer: d.layer,
                    offset: e.offset,
                    size: e.size,
                    sparse: e
                        .sparse
                        .as_deref()
                        .map(|s| std::borrow::Cow::Owned(s.to_vec())),
                    hidden_by: Some(d.hidden_by),
                });
            }
        }
    }
    Ok((targets, one_file))
}

/// Searches the image; `Ok(true)` when something was selected (with `-L`:
/// when some file had nothing selected, as GNU grep 3.5+).
pub fn grep(args: &GrepArgs) -> Result<bool> {
    super::init_logging(args.verbose);
    let common = &args.common;
    let ops = args.operands()?;
    let rt = runtime()?;
    let source = common.open_image(&rt, &ops.reference, std::io::stderr().is_terminal())?;
    let (tree, layers) = rt.block_on(source.tree(None))?;
    let digests = digests(&source);
    let (targets, one_file) = targets(args, &ops.paths, &tree, &layers, &source)?;
    let (before, after) = (
        args.before_context.or(args.context).unwrap_or(0),
        args.after_context.or(args.context).unwrap_or(0),
    );
    let listing = args.files_with_matches || args.files_without_match || args.quiet;
    let opts = grep::Options {
        patterns: ops.patterns,
        ignore_case: args.ignore_case,
        fixed: args.fixed_strings,
        invert: args.invert_match,
        word: args.word_regexp,
        whole_line: args.line_regexp,
        before: if listing || args.count { 0 } else { before },
        after: if listing || args.count { 0 } else { after },
        max_count: if listing { Some(1) } else { args.max_count },
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    if opts.max_count == Some(0) {
        return Ok(false);
    }
    let color = match args.color {
        ColorWhen::Always => true,
        ColorWhen::Never => false,
        ColorWhen::Auto => {
            std::io::stdout().is_terminal() && std::env::var("TERM").is_ok_and(|t| t != "dumb")
        }
    };
    let printer = Printer {
        args,
        names: Names::new(),
        color: color && !args.json,
        filenames: args.with_filename || !(args.no_filename || one_file),
        context: (before > 0 || after > 0) && !listing && !args.count,
        outputs: Mutex::new(Vec::new()),
        matched: Mutex::new(Vec::new()),
    };
    let found = grep::search(&targets, &layers, &digests, &opts, &printer)
        .with_context(|| source.image.reference.to_string())?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let matched = std::mem::take(&mut *printer.matched.lock().unwrap_or_else(|e| e.into_inner()));
    let unmatched = targets
        .iter()
        .filter(|t| !matched.contains(&(t.path.clone(), t.hidden_by)));
    if args.files_without_match || (args.count && !args.quiet) {
        // grep -L names them; grep -c counts their 0.
        let none = grep::Found::default();
        for t in unmatched {
            grep::Report::found(&printer, t, &none);
        }
    }
    let mut outputs =
        std::mem::take(&mut *printer.outputs.lock().unwrap_or_else(|e| e.into_inner()));
    outputs.sort_by(|x, y| x.0.cmp(&y.0));
    for (i, (_, buf)) in outputs.iter().enumerate() {
        // Groups of context from different files are apart, as in grep.
        if printer.context && i > 0 && !args.json && !args.only_matching {
            let mut sep = Vec::new();
            printer.paint(&mut sep, SGR_SEP, b"--");
            sep.push(b'\n');
            out.write_all(&sep)?;
        }
        out.write_all(buf)?;
    }
    out.flush()?;
    if args.files_without_match {
        return Ok(targets.len() > matched.len());
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs_match_as_fnmatch_does() {
        assert!(glob_match(b"*.conf", b"app.conf"));
        assert!(!glob_match(b"*.conf", b"app.confx"));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(glob_match(b"[ab]*", b"bee"));
        assert!(!glob_match(b"[!ab]*", b"bee"));
        assert!(glob_match(b"[a-c]x", b"bx"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"\\*", b"*"));
        assert!(!glob_match(b"\\*", b"a"));
    }
}
