//! grep's output, text or JSON, for one image or many: the one place its
//! format is written. Across images each line starts with the image's tag
//! (`TAG:PATH:LINE`; a context line `TAG:PATH-N-LINE`, the tag being part
//! of the file's name), and JSON objects carry `ref`, `tag` and
//! `layer_digest` besides `path`, `layer` and, for a deleted file,
//! `deleted` and `hidden_by`.

use std::io::{IsTerminal, Write};

use serde_json::{Map, Value};

use super::super::Names;
use super::super::forensics::{absolute, put_bytes};
use super::{ColorWhen, GrepArgs};
use rimg::forensics::across::{Hit, ImageName};
use rimg::forensics::grep;

/// Whether `--color` means colour here.
pub(super) fn color(when: ColorWhen) -> bool {
    match when {
        ColorWhen::Always => true,
        ColorWhen::Never => false,
        ColorWhen::Auto => {
            std::io::stdout().is_terminal() && std::env::var("TERM").is_ok_and(|t| t != "dumb")
        }
    }
}

/// GNU grep's default colours (GREP_COLORS): match, file name, line
/// number, separator.
const SGR_MATCH: &str = "\x1b[01;31m\x1b[K";
const SGR_FILE: &str = "\x1b[35m\x1b[K";
const SGR_LINE: &str = "\x1b[32m\x1b[K";
const SGR_SEP: &str = "\x1b[36m\x1b[K";
const SGR_END: &str = "\x1b[m\x1b[K";

/// grep's output, text or JSON, for one image or many.
pub(super) struct Printer<'a> {
    pub(super) args: &'a GrepArgs,
    pub(super) names: Names,
    pub(super) color: bool,
    /// Name the file on each line (`-H`, `-h`, and grep's default).
    pub(super) filenames: bool,
    /// Groups of context lines, apart by `--`.
    pub(super) context: bool,
    /// Across images, the images, each line starting with its tag.
    pub(super) images: Option<&'a [ImageName]>,
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

    /// Across images, the image's tag and `sep`.
    fn image(&self, buf: &mut Vec<u8>, h: &Hit, sep: u8) {
        if let Some(images) = self.images {
            let mut tag = Vec::new();
            let _ = self.names.write(&mut tag, images[h.image].tag.as_bytes());
            self.paint(buf, SGR_FILE, &tag);
            self.paint(buf, SGR_SEP, &[sep]);
        }
    }

    /// The file: its image (`TAG:`), name and what layer it came from.
    fn name(&self, buf: &mut Vec<u8>, h: &Hit) {
        self.image(buf, h, b':');
        let mut name = Vec::new();
        let _ = self.names.write(&mut name, &absolute(&h.path));
        self.paint(buf, SGR_FILE, &name);
        if let Some(by) = h.hidden_by {
            let _ = write!(buf, " (deleted: layer {}, hidden by {by})", h.layer);
        } else if self.args.layers {
            let _ = write!(buf, " (layer {})", h.layer);
        }
    }

    /// `name:` `number:` before a line; `-` after them for context lines.
    fn prefix(&self, buf: &mut Vec<u8>, h: &Hit, number: u64, sep: u8) {
        if self.filenames {
            self.name(buf, h);
            self.paint(buf, SGR_SEP, &[sep]);
        } else {
            self.image(buf, h, sep);
        }
        if self.args.line_number {
            self.paint(buf, SGR_LINE, number.to_string().as_bytes());
            self.paint(buf, SGR_SEP, &[sep]);
        }
    }

    fn text(&self, buf: &mut Vec<u8>, h: &Hit) {
        let (a, f) = (self.args, &h.found);
        if a.files_with_matches || a.files_without_match {
            self.name(buf, h);
            buf.push(b'\n');
        } else if a.count {
            if self.filenames {
                self.name(buf, h);
                self.paint(buf, SGR_SEP, b":");
            } else {
                self.image(buf, h, b':');
            }
            let _ = writeln!(buf, "{}", f.count);
        } else if f.binary {
            let _ = write!(buf, "rimg: ");
            self.name(buf, h);
            let _ = writeln!(buf, ": binary file matches");
        } else {
            for line in &f.lines {
                self.line(buf, h, line);
            }
        }
    }

    fn line(&self, buf: &mut Vec<u8>, h: &Hit, line: &grep::Line) {
        match line.kind {
            grep::LineKind::Break => {
                if !self.args.only_matching {
                    self.paint(buf, SGR_SEP, b"--");
                    buf.push(b'\n');
                }
            }
            grep::LineKind::Context => {
                if !self.args.only_matching {
                    self.prefix(buf, h, line.number, b'-');
                    buf.extend_from_slice(&line.bytes);
                    buf.push(b'\n');
                }
            }
            grep::LineKind::Selected if self.args.only_matching => {
                for &(s, e) in &line.spans {
                    self.prefix(buf, h, line.number, b':');
                    self.paint(buf, SGR_MATCH, &line.bytes[s..e]);
                    buf.push(b'\n');
                }
            }
            grep::LineKind::Selected => {
                self.prefix(buf, h, line.number, b':');
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

    fn json(&self, buf: &mut Vec<u8>, h: &Hit) {
        let (a, f) = (self.args, &h.found);
        let base = || {
            let mut o = Map::new();
            if let Some(images) = self.images {
                o.insert("ref".into(), images[h.image].reference.clone().into());
                o.insert("tag".into(), images[h.image].tag.clone().into());
            }
            put_bytes(&mut o, "path", &absolute(&h.path));
            o.insert("layer".into(), h.layer.into());
            if self.images.is_some() {
                o.insert("layer_digest".into(), h.digest.clone().into());
            }
            if let Some(by) = h.hidden_by {
                o.insert("deleted".into(), true.into());
                o.insert("hidden_by".into(), by.into());
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

    /// Every hit the flags print, in the plan's order: files with a
    /// selected line; with `-L` those without; with `-c` both.
    pub(super) fn print(&self, hits: &[Hit], out: &mut dyn Write) -> std::io::Result<()> {
        let a = self.args;
        if a.quiet {
            return Ok(());
        }
        let mut first = true;
        for h in hits {
            let selected = h.found.count > 0;
            let shown = if a.files_without_match {
                !selected
            } else {
                selected || a.count
            };
            if !shown {
                continue;
            }
            let mut buf = Vec::new();
            if a.json {
                self.json(&mut buf, h);
            } else {
                self.text(&mut buf, h);
            }
            // Groups of context from different files are apart, as in grep.
            if self.context && !first && !a.json && !a.only_matching {
                let mut sep = Vec::new();
                self.paint(&mut sep, SGR_SEP, b"--");
                sep.push(b'\n');
                out.write_all(&sep)?;
            }
            first = false;
            out.write_all(&buf)?;
        }
        Ok(())
    }
}
