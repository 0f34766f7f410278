//! The forensic commands: `log`, `deleted`, `diff` and `grep`, printing the
//! records of [`rimg::forensics`] as text or as JSON lines.
//!
//! JSON: one object per line. A name that is valid UTF-8 goes in `path` (or
//! `target`, `line`); any other name in `path_bytes` (`target_bytes`,
//! `line_bytes`), base64-encoded, so no byte is ever lost.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use base64::Engine;
use serde_json::{Map, Value};

use super::{Common, runtime, shell_quote};
use rimg::cache::Layer;
use rimg::forensics::{self, diff, grep};
use rimg::image::ImageSource;
use rimg::layer::{EntryKind, LayerIndex};
use rimg::overlay::tree::{NodeId, Tree};

/// Puts `bytes` in `obj` under `key` if UTF-8, else base64 under `key_bytes`.
pub(super) fn put_bytes(obj: &mut Map<String, Value>, key: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            obj.insert(key.into(), s.into());
        }
        Err(_) => {
            obj.insert(
                format!("{key}_bytes"),
                base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .into(),
            );
        }
    }
}

/// An absolute path as bytes.
fn absolute(path: &[u8]) -> Vec<u8> {
    let mut p = b"/".to_vec();
    p.extend_from_slice(path);
    p
}

/// Writes a name: raw bytes to a pipe, quoted as GNU ls quotes on a terminal.
struct Names {
    terminal: bool,
}

impl Names {
    fn new() -> Names {
        Names {
            terminal: std::io::stdout().is_terminal(),
        }
    }

    fn write(&self, out: &mut dyn Write, name: &[u8]) -> std::io::Result<()> {
        if self.terminal {
            out.write_all(shell_quote(name).as_bytes())
        } else {
            out.write_all(name)
        }
    }
}

pub(super) fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::File => "file",
        EntryKind::Dir => "dir",
        EntryKind::Symlink => "symlink",
        EntryKind::Hardlink => "hardlink",
        EntryKind::Char => "char",
        EntryKind::Block => "block",
        EntryKind::Fifo => "fifo",
    }
}

/// Every layer fetched, with its index.
fn all_layers(
    rt: &tokio::runtime::Runtime,
    source: &ImageSource,
) -> Result<(Vec<Arc<Layer>>, Vec<LayerIndex>)> {
    let layers = rt.block_on(source.layers())?;
    let mut indexes = Vec::with_capacity(layers.len());
    for l in &layers {
        indexes.push(
            l.index()
                .with_context(|| format!("{}: layer {}", source.image.reference, l.digest))?,
        );
    }
    Ok((layers, indexes))
}

fn digests(source: &ImageSource) -> Vec<String> {
    source
        .image
        .layers
        .iter()
        .map(|l| l.digest.to_string())
        .collect()
}

/// The config history's `created_by` of each layer, empty layers skipped.
fn created_by(source: &ImageSource) -> Vec<Option<String>> {
    let config: Value = serde_json::from_slice(&source.image.config_bytes).unwrap_or_default();
    let mut out: Vec<Option<String>> = config["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| !h["empty_layer"].as_bool().unwrap_or(false))
        .map(|h| h["created_by"].as_str().map(str::to_string))
        .collect();
    out.resize(source.image.layers.len(), None);
    out
}

pub fn log(
    common: &Common,
    reference: &str,
    path: &[u8],
    recursive: bool,
    as_json: bool,
) -> Result<()> {
    super::init_logging(common.verbose);
    let rt = runtime()?;
    let source = common.open_image(&rt, reference, std::io::stderr().is_terminal())?;
    let (layers, indexes) = all_layers(&rt, &source)?;
    let digests = digests(&source);
    let records = forensics::history(&indexes, &layers, &digests, path, recursive)
        .with_context(|| source.image.reference.to_string())?;
    let created = created_by(&source);
    let names = Names::new();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for r in &records {
        let a = r.after.as_ref();
        if as_json {
            let mut o = Map::new();
            o.insert("layer".into(), r.layer.into());
            o.insert("digest".into(), digests[r.layer].clone().into());
            o.insert("created_by".into(), created[r.layer].clone().into());
            o.insert("action".into(), r.action.as_str().into());
            put_bytes(&mut o, "path", &absolute(&r.path));
            if let Some(a) = a {
                o.insert("type".into(), kind_name(a.kind).into());
                o.insert("size".into(), a.size.into());
                o.insert("sha256".into(), a.sha256.clone().into());
                o.insert("mode".into(), format!("{:04o}", a.mode).into());
                o.insert("uid".into(), a.uid.into());
                o.insert("gid".into(), a.gid.into());
                if let Some(t) = &a.target {
                    put_bytes(&mut o, "target", t);
                }
            }
            writeln!(out, "{}", Value::Object(o))?;
            continue;
        }
        write!(
            out,
            "{:>3} {} {:<12} ",
            r.layer,
            source.image.layers[r.layer].digest.short(),
            r.action.as_str()
        )?;
        names.write(&mut out, &absolute(&r.path))?;
        if let Some(a) = a {
            write!(
                out,
                " {} {:04o} {}:{} {}",
                kind_name(a.kind),
                a.mode,
                a.uid,
                a.gid,
                a.size
            )?;
            if let Some(h) = &a.sha256 {
                write!(out, " sha256:{}", &h[..12])?;
            }
            if let Some(t) = &a.target {
                write!(out, " -> ")?;
                names.write(&mut out, t)?;
            }
        }
        if let Some(c) = &created[r.layer] {
            let c: String = c.chars().filter(|c| !c.is_control()).take(60).collect();
            write!(out, "  # {c}")?;
        }
        writeln!(out)?;
    }
    Ok(out.flush()?)
}

pub fn deleted(common: &Common, reference: &str, as_json: bool) -> Result<()> {
    super::init_logging(common.verbose);
    let rt = runtime()?;
    let source = common.open_image(&rt, reference, std::io::stderr().is_terminal())?;
    let (_layers, indexes) = all_layers(&rt, &source)?;
    let list = forensics::deleted(&indexes).with_context(|| source.image.reference.to_string())?;
    let names = Names::new();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for d in &list {
        let e = &indexes[d.layer].entries[d.entry];
        if as_json {
            let mut o = Map::new();
            put_bytes(&mut o, "path", &absolute(&d.path));
            o.insert("layer".into(), d.layer.into());
            o.insert("hidden_by".into(), d.hidden_by.into());
            o.insert("how".into(), d.how.as_str().into());
            o.insert("type".into(), kind_name(e.kind).into());
            o.insert("size".into(), e.size.into());
            writeln!(out, "{}", Value::Object(o))?;
            continue;
        }
        names.write(&mut out, &absolute(&d.path))?;
        writeln!(
            out,
            "  {} {} in layer {}, hidden by layer {} ({})",
            kind_name(e.kind),
            e.size,
            d.layer,
            d.hidden_by,
            d.how.as_str()
        )?;
    }
    Ok(out.flush()?)
}

pub fn diff(common: &Common, a: &str, b: &str, long: bool, as_json: bool) -> Result<()> {
    super::init_logging(common.verbose);
    let rt = runtime()?;
    let progress = std::io::stderr().is_terminal();
    let sa = common.open_image(&rt, a, progress)?;
    let sb = common.open_image(&rt, b, progress)?;
    let (da, db) = (digests(&sa), digests(&sb));
    // Two images on one base: try the layers above it alone first.
    let shared = da.iter().zip(&db).take_while(|(x, y)| x == y).count();
    let quick = if shared > 0 {
        let above = |s: &Arc<ImageSource>, d: &[String]| {
            let s = Arc::clone(s);
            let d = d.to_vec();
            async move {
                let mut out = Vec::new();
                for (i, digest) in d.iter().enumerate().skip(shared) {
                    let layer = s.layer(i).await?;
                    let index = layer
                        .index()
                        .with_context(|| format!("{}: layer {digest}", s.image.reference))?;
                    out.push((index, layer, digest.clone()));
                }
                anyhow::Ok(out)
            }
        };
        let (ua, ub) = rt.block_on(async { tokio::try_join!(above(&sa, &da), above(&sb, &db)) })?;
        diff::diff_above_base(&ua, &ub)?
    } else {
        None
    };
    if quick.is_some() {
        tracing::info!("the {shared} shared base layers were not needed");
    }
    let changes = match quick {
        Some(c) => c,
        None => diff_trees(&rt, &sa, &sb, &da, &db)?,
    };
    let names = Names::new();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for c in &changes {
        if as_json {
            let mut o = Map::new();
            o.insert("change".into(), c.status.letter().to_string().into());
            put_bytes(&mut o, "path", &absolute(&c.path));
            o.insert("what".into(), c.what.clone().into());
            writeln!(out, "{}", Value::Object(o))?;
            continue;
        }
        write!(out, "{} ", c.status.letter())?;
        names.write(&mut out, &absolute(&c.path))?;
        if long && !c.what.is_empty() {
            write!(out, " ({})", c.what.join(", "))?;
        }
        writeln!(out)?;
    }
    Ok(out.flush()?)
}

/// The diff of the two merged trees, every layer fetched.
fn diff_trees(
    rt: &tokio::runtime::Runtime,
    sa: &ImageSource,
    sb: &ImageSource,
    da: &[String],
    db: &[String],
) -> Result<Vec<diff::Difference>> {
    let ((ta, la), (tb, lb)) =
        rt.block_on(async { tokio::try_join!(sa.tree(None), sb.tree(None)) })?;
    Ok(diff::diff(
        &diff::Side {
            tree: &ta,
            layers: &la,
            digests: da,
        },
        &diff::Side {
            tree: &tb,
            layers: &lb,
            digests: db,
        },
    )?)
}

pub struct GrepArgs {
    pub pattern: String,
    pub reference: String,
    pub paths: Vec<Vec<u8>>,
    pub ignore_case: bool,
    pub fixed: bool,
    pub files_with_matches: bool,
    pub count: bool,
    pub line_number: bool,
    pub layers: bool,
    pub deleted: bool,
    pub json: bool,
}

/// Every regular file at or below `start`, with its path.
fn files_below(tree: &Tree, start: NodeId, path: &[u8], out: &mut Vec<(Vec<u8>, NodeId)>) {
    let n = tree.node(start);
    match n.kind {
        EntryKind::File => out.push((path.to_vec(), start)),
        EntryKind::Dir => {
            for (name, c) in tree.children(start) {
                files_below(tree, c, &rimg::names::join(path, name), out);
            }
        }
        _ => {}
    }
}

struct Printer<'a> {
    args: &'a GrepArgs,
    names: Names,
    out: Mutex<std::io::Stdout>,
}

impl grep::Report for Printer<'_> {
    fn found(&self, t: &grep::Target<'_>, f: &grep::Found) {
        let a = self.args;
        let path = absolute(&t.path);
        let mut buf: Vec<u8> = Vec::new();
        if a.json {
            let base = || {
                let mut o = Map::new();
                put_bytes(&mut o, "path", &path);
                o.insert("layer".into(), t.layer.into());
                if let Some(h) = t.hidden_by {
                    o.insert("deleted".into(), true.into());
                    o.insert("hidden_by".into(), h.into());
                }
                o
            };
            if a.files_with_matches || a.count || f.binary {
                let mut o = base();
                o.insert("count".into(), f.count.into());
                o.insert("binary".into(), f.binary.into());
                let _ = writeln!(buf, "{}", Value::Object(o));
            } else {
                for (n, line) in &f.lines {
                    let mut o = base();
                    o.insert("line_number".into(), (*n).into());
                    put_bytes(&mut o, "line", line);
                    let _ = writeln!(buf, "{}", Value::Object(o));
                }
            }
        } else {
            let prefix = |buf: &mut Vec<u8>| {
                let _ = self.names.write(buf, &path);
                if let Some(h) = t.hidden_by {
                    let _ = write!(buf, " (deleted: layer {}, hidden by {})", t.layer, h);
                } else if a.layers {
                    let _ = write!(buf, " (layer {})", t.layer);
                }
            };
            if a.files_with_matches {
                prefix(&mut buf);
                buf.push(b'\n');
            } else if a.count {
                prefix(&mut buf);
                let _ = writeln!(buf, ":{}", f.count);
            } else if f.binary {
                let _ = write!(buf, "rimg: ");
                prefix(&mut buf);
                let _ = writeln!(buf, ": binary file matches");
            } else {
                for (n, line) in &f.lines {
                    prefix(&mut buf);
                    buf.push(b':');
                    if a.line_number {
                        let _ = write!(buf, "{n}:");
                    }
                    buf.extend_from_slice(line);
                    buf.push(b'\n');
                }
            }
        }
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = out.write_all(&buf);
    }
}

/// Searches the image; `Ok(true)` when something matched.
pub fn grep(common: &Common, args: &GrepArgs) -> Result<bool> {
    super::init_logging(common.verbose);
    let rt = runtime()?;
    let source = common.open_image(&rt, &args.reference, std::io::stderr().is_terminal())?;
    let (tree, layers) = rt.block_on(source.tree(None))?;
    let digests = digests(&source);
    let mut files = Vec::new();
    let roots: Vec<Vec<u8>> = if args.paths.is_empty() {
        vec![Vec::new()]
    } else {
        args.paths
            .iter()
            .map(|p| rimg::layer::normalize(p))
            .collect()
    };
    for p in &roots {
        let id = tree.resolve(p, true).with_context(|| {
            format!(
                "{}: {}",
                source.image.reference,
                rimg::names::escaped(&absolute(p))
            )
        })?;
        files_below(&tree, id, p, &mut files);
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
    let indexes: Vec<LayerIndex>;
    if args.deleted {
        indexes = layers
            .iter()
            .map(|l| l.index())
            .collect::<Result<_, _>>()
            .with_context(|| source.image.reference.to_string())?;
        for d in forensics::deleted(&indexes)? {
            let e = &indexes[d.layer].entries[d.entry];
            let under = roots.iter().any(|r| {
                r.is_empty() || d.path == *r || d.path.starts_with(&[&r[..], b"/"].concat())
            });
            if e.kind == EntryKind::File && under {
                targets.push(grep::Target {
                    path: d.path.clone(),
                    layer: d.layer,
                    offset: e.offset,
                    size: e.size,
                    sparse: e.sparse.as_deref().map(std::borrow::Cow::Borrowed),
                    hidden_by: Some(d.hidden_by),
                });
            }
        }
    }
    let opts = grep::Options {
        pattern: args.pattern.clone(),
        ignore_case: args.ignore_case,
        fixed: args.fixed,
        first_only: args.files_with_matches,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let printer = Printer {
        args,
        names: Names::new(),
        out: Mutex::new(std::io::stdout()),
    };
    let found = grep::search(&targets, &layers, &digests, &opts, &printer)
        .with_context(|| source.image.reference.to_string())?;
    Ok(found)
}
