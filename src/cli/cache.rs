//! `rimg cache ls|verify|prune|clear`.

use std::io::Write;

use anyhow::{Result, bail};

use super::*;

#[derive(clap::Subcommand)]
pub enum CacheAction {
    /// Cached layers with sizes, last use and the images they belong to.
    Ls(CacheArgs),
    /// Evict least-recently-used layers until the cache fits SIZE.
    Prune(PruneArgs),
    /// Remove everything not in use by a running mount.
    Clear(CacheArgs),
    /// Re-hash every cached layer against its digest and diff_id; remove corrupt ones.
    Verify(CacheArgs),
}

#[derive(clap::Args)]
pub struct CacheArgs {
    /// `ls`: one JSON object per cached layer and line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub cache: CacheOpts,
}

#[derive(clap::Args)]
pub struct PruneArgs {
    /// The size to shrink the cache to, e.g. 500M [default: --cache-size].
    pub size: Option<options::Size>,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub cache: CacheOpts,
}

pub fn cache(action: &CacheAction) -> Result<()> {
    let (CacheAction::Ls(CacheArgs { log, .. })
    | CacheAction::Clear(CacheArgs { log, .. })
    | CacheAction::Verify(CacheArgs { log, .. })
    | CacheAction::Prune(PruneArgs { log, .. })) = action;
    init_logging(log.verbose);
    match action {
        CacheAction::Ls(a) => cache_ls(&a.cache, a.json),
        CacheAction::Prune(a) => cache_prune(a),
        CacheAction::Clear(a) => cache_clear(&a.cache),
        CacheAction::Verify(a) => cache_verify(&a.cache),
    }
}

fn cache_ls(opts: &CacheOpts, json: bool) -> Result<()> {
    let cache = opts.open()?;
    let mut out = std::io::stdout().lock();
    if json {
        // One object per cached layer: whole (`layer`) or read by range
        // (`range`, with the form of its table of contents or index).
        for l in cache.list()? {
            let o = serde_json::json!({
                "kind": "layer", "digest": l.digest.to_string(), "blob_size": l.blob_size,
                "unpacked_size": l.tar_size, "last_use": l.last_use, "images": l.images,
            });
            writeln!(out, "{o}")?;
        }
        for r in cache.ranged_list() {
            let o = serde_json::json!({
                "kind": "range", "digest": r.digest.to_string(), "bytes": r.bytes,
                "last_use": r.last_use, "form": r.form,
            });
            writeln!(out, "{o}")?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<19} {:>12} {:>12} {:<16} IMAGES",
        "LAYER", "BLOB", "UNPACKED", "LAST USE"
    )?;
    let mut total = 0;
    for l in cache.list()? {
        total += l.blob_size + l.tar_size;
        writeln!(
            out,
            "{:<19} {:>12} {:>12} {:<16} {}",
            format!("sha256:{}", l.digest.short()),
            l.blob_size,
            l.tar_size,
            format_time(l.last_use),
            l.images.join(", ")
        )?;
    }
    for r in cache.ranged_list() {
        total += r.bytes;
        writeln!(
            out,
            "{:<19} {:>12} {:>12} {:<16} read by range ({})",
            format!("sha256:{}", r.digest.short()),
            "-",
            r.bytes,
            format_time(r.last_use),
            r.form
        )?;
    }
    writeln!(out, "total {total} bytes in {}", cache.root().display())?;
    Ok(())
}

/// Re-hashes every cached layer; corrupt ones are removed and reported.
/// Fails when any was corrupt, so scripts notice.
fn cache_verify(opts: &CacheOpts) -> Result<()> {
    let cache = opts.open()?;
    let report = cache.verify()?;
    let mut out = std::io::stdout().lock();
    let mut bad = 0;
    for v in &report {
        if let Some(problem) = &v.problem {
            bad += 1;
            let action = if v.removed {
                "removed"
            } else {
                "in use by a mount, kept"
            };
            writeln!(out, "{}: {problem}; {action}", v.digest)?;
        }
    }
    writeln!(out, "{} layers checked, {bad} corrupt", report.len())?;
    if bad > 0 {
        bail!("{bad} corrupt layers found in {}", cache.root().display());
    }
    Ok(())
}

fn cache_prune(args: &PruneArgs) -> Result<()> {
    let cache = args.cache.open()?;
    let limit = args.size.unwrap_or(args.cache.cache_size).0;
    let freed = cache.prune(limit)?;
    println!("freed {freed} bytes");
    Ok(())
}

fn cache_clear(opts: &CacheOpts) -> Result<()> {
    let cache = opts.open()?;
    let freed = cache.prune(0)?;
    println!("freed {freed} bytes");
    Ok(())
}
