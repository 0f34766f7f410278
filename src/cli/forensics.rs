//! The forensic commands: `log`, `deleted`, `diff` and `grep`, printing the
//! records of [`rimg::forensics`] as text or as JSON lines.
//!
//! JSON: one object per line. A name that is valid UTF-8 goes in `path` (or
//! `target`, `line`); any other name in `path_bytes` (`target_bytes`,
//! `line_bytes`), base64-encoded, so no byte is ever lost.

use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use anyhow::{Context, Result};
use base64::Engine;
use serde_json::{Map, Value};

use super::{Common, Names, Verbosity, runtime};
use rimg::cache::Layer;
use rimg::forensics::{self, diff};
use rimg::image::ImageSource;
use rimg::layer::{EntryKind, LayerIndex};

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
pub(super) fn absolute(path: &[u8]) -> Vec<u8> {
    let mut p = b"/".to_vec();
    p.extend_from_slice(path);
    p
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
pub(super) fn all_layers(
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

pub(super) fn digests(source: &ImageSource) -> Vec<String> {
    source
        .image
        .layers
        .iter()
        .map(|l| l.digest.to_string())
        .collect()
}

/// The config history's `created_by` of each layer, empty layers skipped.
pub(super) fn created_by(source: &ImageSource) -> Vec<Option<String>> {
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

#[derive(clap::Args)]
pub struct LogArgs {
    /// The image (see `rimg --help` for the forms of REF); with --all-tags
    /// or --tags, the repository.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// The path whose history to show; any bytes.
    pub path: std::ffi::OsString,
    /// Everything below PATH too (one image only).
    #[arg(short = 'R')]
    pub recursive: bool,
    /// PATH release by release across every tag of the repository REF
    /// names, oldest first.
    #[arg(long, help_heading = "Images")]
    pub all_tags: bool,
    /// As --all-tags, for the tags that match GLOB (`*`, `?`, `[...]`).
    #[arg(long, value_name = "GLOB", help_heading = "Images")]
    pub tags: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

/// Every layer that changed the path in one image; with a tag selection,
/// the path release by release instead ([`super::across::log`]).
pub fn log(args: &LogArgs) -> Result<()> {
    super::init_logging(args.log.verbose);
    let (common, reference, path) = (&args.common, &args.reference, args.path.as_bytes());
    let (recursive, as_json) = (args.recursive, args.json);
    let select = super::across::Selection {
        all_tags: args.all_tags,
        tags: args.tags.clone(),
        catalog: None,
    };
    if select.is_many(std::slice::from_ref(reference)) {
        if recursive {
            anyhow::bail!("log -R is for one image; across tags, name one path");
        }
        return super::across::log(
            common,
            std::slice::from_ref(reference),
            &select,
            path,
            as_json,
        );
    }
    let rt = runtime()?;
    let source = common.open_image(&rt, reference, std::io::stderr().is_terminal())?;
    let (layers, indexes) = all_layers(&rt, &source)?;
    let digests = digests(&source);
    let records = forensics::history(&indexes, &layers, &digests, path, recursive)
        .with_context(|| source.image.reference.to_string())?;
    if records.is_empty() {
        anyhow::bail!(
            "{}: {}: no layer of the image ever held this path (see `rimg ls`)",
            source.image.reference,
            rimg::names::escaped(&absolute(&rimg::layer::normalize(path)))
        );
    }
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

#[derive(clap::Args)]
pub struct DeletedArgs {
    /// The image (see `rimg --help` for the forms of REF).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

pub fn deleted(args: &DeletedArgs) -> Result<()> {
    super::init_logging(args.log.verbose);
    let (common, reference, as_json) = (&args.common, &args.reference, args.json);
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

#[derive(clap::Args)]
pub struct DiffArgs {
    /// The old image.
    #[arg(value_name = "REF_A")]
    pub reference_a: String,
    /// The new image.
    #[arg(value_name = "REF_B")]
    pub reference_b: String,
    /// Say what changed in each modified path.
    #[arg(long)]
    pub long: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

/// Says whether the images differ (exit 1, as diff and `git diff
/// --exit-code`).
pub fn diff(args: &DiffArgs) -> Result<bool> {
    super::init_logging(args.log.verbose);
    let (common, a, b) = (&args.common, &args.reference_a, &args.reference_b);
    let (long, as_json) = (args.long, args.json);
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
    out.flush()?;
    Ok(!changes.is_empty())
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
