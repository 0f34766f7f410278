//! `rimg cache ls|verify|prune|clear`.

use std::io::Write;

use anyhow::{Result, bail};

use super::*;

pub fn cache_ls(common: &Common, json: bool) -> Result<()> {
    let cache = common.cache()?;
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
pub fn cache_verify(common: &Common) -> Result<()> {
    let cache = common.cache()?;
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

pub fn cache_prune(common: &Common, size: Option<&str>) -> Result<()> {
    let cache = common.cache()?;
    let limit = size
        .map(parse_size)
        .transpose()?
        .unwrap_or(common.cache_limit()?);
    let freed = cache.prune(limit)?;
    println!("freed {freed} bytes");
    Ok(())
}

pub fn cache_clear(common: &Common) -> Result<()> {
    let cache = common.cache()?;
    let freed = cache.prune(0)?;
    println!("freed {freed} bytes");
    Ok(())
}
