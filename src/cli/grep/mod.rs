//! `rimg grep`: GNU grep's flags, meaning what they mean there, over an
//! image's merged tree (and with `--deleted`, what later layers hid), or
//! over many images (several references, `--all-tags`, `--tags GLOB`,
//! `--catalog HOST`), each distinct file searched once
//! ([`rimg::forensics::across::Plan`]; one image is a plan of one).
//!
//! [`print`] is the one home of grep's output format, for one image or
//! many: across images each line starts with the image (`TAG:PATH:LINE`,
//! `TAG:PATH` for `-l`/`-L`, `TAG:PATH:COUNT` for `-c`) and JSON objects
//! carry `ref`, `tag` and `layer_digest`. Output is sorted by image, then
//! path (bytes, as `LC_ALL=C sort` orders them), so two runs print the same
//! thing whatever order the search threads finish in. Exit status as grep:
//! 0 selected, 1 not, 2 trouble (an image that could not be opened is
//! reported and the others still searched); 130 after Ctrl-C, once what
//! was found so far is printed.

mod print;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use super::across::{self, Opener, Selection};
use super::forensics::{absolute, digests};
use super::{Common, Names, one_line, runtime};
use print::{Printer, color};
use rimg::forensics::across::{Hit, ImageName, Plan};
use rimg::forensics::grep;
use rimg::layer::EntryKind;

/// When to colour matches, as grep's `--color`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorWhen {
    Auto,
    Always,
    Never,
}

#[derive(clap::Args)]
pub struct GrepArgs {
    /// PATTERN (unless -e gives it), then the images (references; with
    /// --all-tags or --tags, repositories), then, from the first operand
    /// starting with `/`, paths in the images to search below [default:
    /// all of it].
    #[arg(value_name = "ARGS", required_unless_present_any = ["regexp", "catalog"])]
    pub operands: Vec<OsString>,
    /// Every tag of each repository named; lines start with the tag.
    #[arg(long, help_heading = "Images")]
    pub all_tags: bool,
    /// The tags of each repository named that match GLOB (`*`, `?`, `[...]`).
    #[arg(long, value_name = "GLOB", help_heading = "Images")]
    pub tags: Option<String>,
    /// Every repository the registry HOST's `_catalog` lists (every tag, or
    /// those --tags matches).
    #[arg(long, value_name = "HOST", help_heading = "Images")]
    pub catalog: Option<String>,
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
    /// directory, and always across images).
    #[arg(short = 'H', long, help_heading = "Output")]
    pub with_filename: bool,
    /// Never print file names (across images, lines still start with the
    /// image: TAG:LINE).
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

/// The operands split as grep reads them: with `-e`, none is the pattern;
/// references run up to the first operand starting with `/`.
struct Operands {
    patterns: Vec<String>,
    references: Vec<String>,
    paths: Vec<Vec<u8>>,
}

impl GrepArgs {
    fn operands(&self) -> Result<Operands> {
        let mut rest = self.operands.iter().peekable();
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
        let mut references = Vec::new();
        while let Some(r) = rest.next_if(|o| !o.as_bytes().starts_with(b"/")) {
            let r = r.to_str().with_context(|| {
                format!(
                    "the image reference {} is not valid UTF-8",
                    rimg::names::escaped(r.as_bytes())
                )
            })?;
            references.push(r.to_string());
        }
        if references.is_empty() && self.catalog.is_none() {
            bail!("no image given: rimg grep PATTERN REF... [/PATH]...");
        }
        let paths = rest.map(|p| p.as_bytes().to_vec()).collect();
        Ok(Operands {
            patterns,
            references,
            paths,
        })
    }

    fn selection(&self) -> Selection {
        Selection {
            all_tags: self.all_tags,
            tags: self.tags.clone(),
            catalog: self.catalog.clone(),
        }
    }

    /// `-l`, `-L` and `-q` need one selected line per file at most.
    fn listing(&self) -> bool {
        self.files_with_matches || self.files_without_match || self.quiet
    }

    /// Lines of context before and after, as grep prints them.
    fn context_lines(&self) -> (usize, usize) {
        if self.listing() || self.count {
            return (0, 0);
        }
        (
            self.before_context.or(self.context).unwrap_or(0),
            self.after_context.or(self.context).unwrap_or(0),
        )
    }

    fn options(&self, patterns: Vec<String>, stop: Arc<AtomicBool>) -> grep::Options {
        let (before, after) = self.context_lines();
        grep::Options {
            patterns,
            ignore_case: self.ignore_case,
            fixed: self.fixed_strings,
            invert: self.invert_match,
            word: self.word_regexp,
            whole_line: self.line_regexp,
            before,
            after,
            max_count: if self.listing() {
                Some(1)
            } else {
                self.max_count
            },
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            stop: Some(stop),
        }
    }

    fn filter(&self) -> grep::Filter {
        grep::Filter {
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            exclude_dir: self.exclude_dir.clone(),
        }
    }
}

/// What the images opened told the command, beyond the plan.
struct Scan<'a> {
    args: &'a GrepArgs,
    many: bool,
    roots: Vec<Vec<u8>>,
    /// Whether some image has each root.
    found_roots: Vec<bool>,
    /// One image, one root, and that a file: grep names no file then.
    one_file: bool,
    /// Images that could not be opened or read.
    failed: usize,
}

impl Scan<'_> {
    /// Opens `reference` and adds its files to `plan`; nothing when Ctrl-C
    /// comes first. With one image a root it lacks is an error, as grep's
    /// for a missing file (unless `-s`).
    fn add(
        &mut self,
        opener: &Opener<'_>,
        stop: &AtomicBool,
        plan: &mut Plan,
        reference: &str,
        label: &str,
    ) -> Result<()> {
        let source = opener.open(reference)?;
        let rt = opener.runtime();
        let Some(tree) = rt.block_on(across::or_stop(stop, source.tree(None))) else {
            return Ok(());
        };
        let name = source.image.reference.to_string();
        let (tree, layers) = tree.with_context(|| name.clone())?;
        for (k, p) in self.roots.iter().enumerate() {
            match tree.resolve(&absolute(p), true) {
                Ok(id) => {
                    self.found_roots[k] = true;
                    self.one_file &= tree.node(id).kind != EntryKind::Dir;
                }
                Err(e) if self.many || self.args.no_messages => {
                    tracing::debug!("{name}: {e}");
                }
                // The error names the path itself.
                Err(e) => return Err(anyhow::Error::new(e).context(name.to_string())),
            }
        }
        let indexes = if self.args.deleted {
            let ix = layers.iter().map(|l| l.index());
            Some(
                ix.collect::<Result<Vec<_>, _>>()
                    .with_context(|| name.clone())?,
            )
        } else {
            None
        };
        let image = ImageName {
            reference: name.clone(),
            tag: label.to_string(),
        };
        plan.add(image, &tree, &layers, &digests(&source), indexes.as_deref())
            .with_context(|| name.clone())?;
        Ok(())
    }

    /// Opens every image in turn and adds it to `plan`. With many, one that
    /// fails is reported and counted, and the others still searched.
    fn open_all(
        &mut self,
        opener: &Opener<'_>,
        stop: &AtomicBool,
        plan: &mut Plan,
        refs: &[String],
    ) -> Result<()> {
        let opening = across::bar(
            if self.many { refs.len() as u64 } else { 0 },
            "opening {pos}/{len} images, {msg}",
        );
        for (r, label) in refs.iter().zip(across::labels(refs)) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            opening.set_message(format!(
                "{} fetched: {r}",
                indicatif::HumanBytes(opener.fetched())
            ));
            match self.add(opener, stop, plan, r, &label) {
                Ok(()) => {}
                Err(e) if !self.many => return Err(e),
                Err(e) => {
                    opening.suspend(|| eprintln!("rimg: {}", one_line(&e)));
                    self.failed += 1;
                }
            }
            opening.inc(1);
        }
        opening.finish_and_clear();
        Ok(())
    }

    /// grep's verdict once the output is printed: whether something was
    /// selected (with `-L`, some file named), or the trouble met.
    fn verdict(&self, hits: &[Hit], images: usize, refs: usize) -> Result<bool> {
        let args = self.args;
        let selected = if args.files_without_match {
            hits.iter().any(|h| h.found.count == 0)
        } else {
            hits.iter().any(|h| h.found.count > 0)
        };
        // grep -q: a selected line wins over trouble elsewhere.
        if args.quiet && selected {
            return Ok(true);
        }
        if self.failed > 0 {
            bail!("{} of {refs} images could not be searched", self.failed);
        }
        let missing: Vec<String> = (self.roots.iter().zip(&self.found_roots))
            .filter(|(_, found)| !**found)
            .map(|(p, _)| rimg::names::escaped(&absolute(p)).to_string())
            .collect();
        if self.many && !missing.is_empty() && !args.no_messages && images > 0 {
            bail!(
                "{}: in none of the {images} images searched",
                missing.join(", ")
            );
        }
        Ok(selected)
    }
}

/// Searches the image or images; `Ok(true)` when something was selected
/// (with `-L`: when some file had nothing selected, as GNU grep 3.5+).
pub fn grep(args: &GrepArgs) -> Result<bool> {
    super::init_logging(args.verbose);
    let ops = args.operands()?;
    let select = args.selection();
    let many = select.is_many(&ops.references);
    let rt = runtime()?;
    let stop = across::interrupt_flag(&rt);
    let opts = args.options(ops.patterns, Arc::clone(&stop));
    // A bad pattern is told before any image is opened.
    grep::check(&opts)?;
    if opts.max_count == Some(0) {
        return Ok(false);
    }
    let opener = Opener::new(&args.common, &rt, !many)?;
    let refs = if many {
        across::expand(&rt, &opener.client()?, &ops.references, &select)?
    } else {
        ops.references.clone()
    };
    let roots: Vec<Vec<u8>> = if ops.paths.is_empty() {
        vec![Vec::new()]
    } else {
        ops.paths
            .iter()
            .map(|p| rimg::layer::normalize(p))
            .collect()
    };
    let mut plan = Plan::new(roots.clone(), args.filter());
    let mut scan = Scan {
        args,
        many,
        found_roots: vec![false; roots.len()],
        one_file: !many && roots.len() == 1,
        roots,
        failed: 0,
    };
    scan.open_all(&opener, &stop, &mut plan, &refs)?;
    let (files, bytes) = plan.size();
    tracing::info!(
        "{} images, {} distinct layers, {files} distinct files ({bytes} bytes) to search",
        plan.images().len(),
        plan.layer_count()
    );
    let searching = across::bar(
        if many { bytes } else { 0 },
        "searching [{bar:30}] {bytes}/{total_bytes}",
    );
    let misses = args.files_without_match || (args.count && !args.quiet);
    let outcome = plan.search(&opts, misses, &|n| searching.inc(n));
    searching.finish_and_clear();
    let outcome = match (outcome, plan.images()) {
        (Ok(o), _) => o,
        (Err(e), [one]) if !many => {
            return Err(anyhow::Error::new(e).context(one.reference.clone()));
        }
        (Err(e), _) => return Err(e.into()),
    };
    let (before, after) = args.context_lines();
    let printer = Printer {
        args,
        names: Names::new(),
        color: color(args.color) && !args.json,
        filenames: args.with_filename || !(args.no_filename || scan.one_file),
        context: before > 0 || after > 0,
        images: many.then(|| plan.images()),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    printer.print(&outcome.hits, &mut out)?;
    out.flush()?;
    if stop.load(Ordering::Relaxed) {
        eprintln!(
            "rimg: interrupted: {} of {} images opened, {} of {files} distinct files searched",
            plan.images().len(),
            refs.len(),
            outcome.searched
        );
        // As a shell reports a command Ctrl-C stopped.
        std::process::exit(130);
    }
    scan.verdict(&outcome.hits, plan.images().len(), refs.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(argv: &[&str]) -> GrepArgs {
        let mut all = vec!["rimg", "grep"];
        all.extend_from_slice(argv);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Grep(a) => a,
            _ => unreachable!("grep parses as grep"),
        }
    }

    fn operands(argv: &[&str]) -> Operands {
        parse(argv).operands().unwrap()
    }

    #[test]
    fn references_run_up_to_the_first_path_and_e_takes_the_pattern() {
        let o = operands(&["KEY", "r.io/a:1", "r.io/b:2", "/etc", "/app"]);
        assert_eq!(o.patterns, ["KEY"]);
        assert_eq!(o.references, ["r.io/a:1", "r.io/b:2"]);
        assert_eq!(o.paths, [b"/etc".to_vec(), b"/app".to_vec()]);
        let o = operands(&["-e", "A", "-e", "B", "r.io/a", "--all-tags"]);
        assert_eq!(o.patterns, ["A", "B"]);
        assert_eq!(o.references, ["r.io/a"]);
        assert!(o.paths.is_empty());
        let o = operands(&["KEY", "--catalog", "r.io", "/srv"]);
        assert!(o.references.is_empty());
        assert_eq!(o.paths, [b"/srv".to_vec()]);
    }

    #[test]
    fn a_search_without_an_image_says_so() {
        let e = parse(&["-e", "KEY"]).operands().err().unwrap();
        assert!(e.to_string().contains("no image given"), "{e}");
    }
}
