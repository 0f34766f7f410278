//! What rimg can open without the network: each image it resolved, kept in
//! `<cache>/images/<key>.json` (the reference asked for, the platform, and
//! the manifest and config bytes). When the registry cannot be reached, a
//! digest reference is served from here as it is (the bytes are checked
//! against the digest when rebuilt), and a tag falls back to the digest it
//! last resolved to, with a warning saying so. `rimg images` lists them.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use rimg::digest::Digest;
use rimg::reference::Reference;
use rimg::registry::{ImageParts, PlatformSpec, RegistryError, ResolvedImage};

use super::ls::{format_time, human_size};
use super::{CacheOpts, Verbosity};

/// One resolved image, as stored.
#[derive(Serialize, Deserialize)]
struct Record {
    /// The reference as asked for (a tag or a digest).
    asked: String,
    platform: String,
    resolved_at: i64,
    parts: ImageParts,
}

fn dir(cache: &Path) -> PathBuf {
    cache.join("images")
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn key(asked: &str, platform: &str) -> String {
    Digest::of_bytes(format!("{asked}\n{platform}").as_bytes())
        .short()
        .to_string()
}

/// Remembers that `asked` resolved to `image`. Best effort: a cache that
/// cannot be written only costs offline use.
pub(crate) fn remember(
    cache: &Path,
    asked: &Reference,
    platform: Option<&PlatformSpec>,
    image: &ResolvedImage,
) {
    let platform = platform
        .cloned()
        .unwrap_or_else(PlatformSpec::host)
        .to_string();
    let record = Record {
        asked: asked.to_string(),
        platform: platform.clone(),
        resolved_at: now(),
        parts: image.parts(),
    };
    let dir = dir(cache);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
        tmp.write_all(&serde_json::to_vec(&record)?)?;
        tmp.persist(dir.join(format!("{}.json", key(&record.asked, &platform))))?;
        Ok(())
    };
    if let Err(e) = write() {
        tracing::debug!("cannot remember {asked} in {}: {e}", dir.display());
    }
}

fn records(cache: &Path) -> Vec<(PathBuf, Record)> {
    let Ok(entries) = std::fs::read_dir(dir(cache)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| {
            let bytes = std::fs::read(e.path()).ok()?;
            Some((e.path(), serde_json::from_slice(&bytes).ok()?))
        })
        .collect()
}

/// Whether retrying later might work: the registry could not be reached.
pub(crate) fn offline(e: &RegistryError) -> bool {
    match e {
        RegistryError::Unreachable { .. }
        | RegistryError::Refused { .. }
        | RegistryError::Timeout { .. } => true,
        RegistryError::GaveUp { last, .. } => offline(last),
        _ => false,
    }
}

/// The image `asked` resolved to last time, for use while the registry is
/// unreachable: by digest, any record of that digest; by tag, that tag's.
pub(crate) fn recall(
    cache: &Path,
    asked: &Reference,
    platform: Option<&PlatformSpec>,
) -> Option<ResolvedImage> {
    let platform = platform
        .cloned()
        .unwrap_or_else(PlatformSpec::host)
        .to_string();
    let all = records(cache);
    let found = match &asked.digest {
        Some(d) => all.into_iter().find(|(_, r)| {
            let image_digest = Digest::of_bytes(&r.parts.manifest).to_string();
            // A manifest digest names one image; an index digest, one per platform.
            image_digest == *d
                || (r.parts.index_digest.as_deref() == Some(d.as_str()) && r.platform == platform)
        }),
        None => {
            let k = key(&asked.to_string(), &platform);
            all.into_iter()
                .find(|(p, _)| p.file_stem().is_some_and(|s| s.to_string_lossy() == k))
        }
    };
    let (path, record) = found?;
    let image = ResolvedImage::from_parts(record.parts).ok()?;
    if asked.digest.is_none() {
        tracing::warn!(
            "registry {} unreachable: using {}@{}, what {asked} resolved to at {} UTC",
            asked.registry,
            asked.name(),
            image.digest,
            format_time(record.resolved_at)
        );
    }
    // Marks it used, for `rimg images`.
    let _ = std::fs::File::options()
        .append(true)
        .open(&path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    Some(image)
}

#[derive(clap::Args)]
pub struct ImagesArgs {
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Sizes in bytes [default: on a terminal, as 1.5M].
    #[arg(long)]
    pub bytes: bool,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub cache: CacheOpts,
}

/// `rimg images`: every image the cache can open without the registry.
pub fn images(args: &ImagesArgs) -> Result<()> {
    super::init_logging(args.log.verbose);
    let root = args.cache.dir();
    let mut list: Vec<(i64, Record)> = records(&root)
        .into_iter()
        .map(|(p, r)| {
            let used = std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(r.resolved_at, |d| d.as_secs() as i64);
            (used, r)
        })
        .collect();
    list.sort_by(|a, b| {
        a.1.asked
            .cmp(&b.1.asked)
            .then(a.1.platform.cmp(&b.1.platform))
    });
    let human = !args.bytes && !args.json && std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:<50} {:<19} {:>10} {:<16} PLATFORM",
            "REFERENCE", "DIGEST", "SIZE", "LAST USED"
        )?;
    }
    for (used, r) in list {
        let Ok(image) = ResolvedImage::from_parts(r.parts) else {
            continue;
        };
        let size: u64 =
            image.layers.iter().map(|l| l.size).sum::<u64>() + image.config_bytes.len() as u64;
        if args.json {
            writeln!(
                out,
                "{}",
                serde_json::json!({
                    "reference": r.asked,
                    "digest": image.digest.to_string(),
                    "platform": r.platform,
                    "size": size,
                    "last_used": used,
                })
            )?;
            continue;
        }
        let size = if human {
            human_size(size)
        } else {
            size.to_string()
        };
        writeln!(
            out,
            "{:<50} sha256:{:<12} {:>10} {:<16} {}",
            r.asked,
            image
                .digest
                .strip_prefix("sha256:")
                .unwrap_or(&image.digest)
                .get(..12)
                .unwrap_or(""),
            size,
            format_time(used),
            r.platform
        )?;
    }
    Ok(out.flush()?)
}
