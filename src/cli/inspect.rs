//! `rimg inspect` and `rimg tags`: what a registry says about an image.

use std::io::Write;

use anyhow::Result;
use serde_json::json;

use rimg::local::{self, Location};
use rimg::registry::ResolvedImage;

use super::*;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// The image (see `rimg --help` for the forms of REF).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Print the manifest bytes exactly as served.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args)]
pub struct TagsArgs {
    /// The repository: HOST[:PORT]/NAME, or NAME on Docker Hub.
    pub repository: String,
    /// One JSON object per tag and line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub registry: RegistryOpts,
}

pub fn inspect(args: &InspectArgs) -> Result<()> {
    init_logging(args.log.verbose);
    let (common, raw) = (&args.common, args.raw);
    let reference = match local::locate(&args.reference) {
        Location::Registry(r) => parse_reference(r)?,
        Location::Local(spec) => {
            let (image, _) = local::open(&spec, common.platform())?;
            if raw {
                std::io::stdout().write_all(&image.manifest_bytes)?;
            } else {
                let mut out = inspect_json(&image);
                out["policy"] = policy_json(common.decide_local(&spec, &image));
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            return Ok(());
        }
    };
    let client = common.registry.client()?;
    let rt = runtime()?;
    if raw {
        let m = rt
            .block_on(client.fetch_manifest(&reference))
            .map_err(|e| {
                about(
                    e,
                    &reference,
                    format!("cannot fetch the manifest of {reference}"),
                )
            })?;
        std::io::stdout().write_all(&m.bytes)?;
        return Ok(());
    }
    let image = rt.block_on(resolve(&client, common, &reference))?;
    let mut out = inspect_json(&image);
    out["policy"] = policy_json(common.decide(&rt, &client, &reference, &image));
    let out = serde_json::to_string_pretty(&out)?;
    println!("{out}");
    Ok(())
}

/// The policy's answer and the signatures found, or why there is none.
fn policy_json(decision: Result<rimg::trust::Decision>) -> serde_json::Value {
    match decision {
        Ok(d) => serde_json::to_value(d).unwrap_or_default(),
        Err(e) => json!({"error": one_line(&e)}),
    }
}

pub(super) fn inspect_json(image: &ResolvedImage) -> serde_json::Value {
    let r = &image.reference;
    let cfg = image.config.config().clone().unwrap_or_default();
    let history: Vec<serde_json::Value> = image
        .config
        .history()
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|h| {
            json!({
                "created": h.created(),
                "created_by": h.created_by(),
                "comment": h.comment(),
                "empty_layer": h.empty_layer(),
            })
        })
        .collect();
    json!({
        "reference": {
            "name": r.to_string(),
            "registry": r.registry,
            "repository": r.repository,
            "tag": r.tag,
            "digest": image.index_digest.clone().unwrap_or_else(|| image.digest.clone()),
        },
        "platform": image.platform,
        "index": image.index_digest.as_ref().map(|d| json!({"digest": d})),
        "manifest": {
            "mediaType": image.media_type,
            "digest": image.digest,
            "size": image.manifest_bytes.len(),
        },
        "config": {
            "digest": image.config_digest,
            "created": image.config.created(),
            "env": cfg.env(),
            "cmd": cfg.cmd(),
            "entrypoint": cfg.entrypoint(),
            "workingDir": cfg.working_dir(),
            "user": cfg.user(),
            "labels": cfg.labels(),
            "history": history,
        },
        "layers": image.layers.iter().map(|l| json!({
            "digest": l.digest,
            "mediaType": l.media_type,
            "size": l.size,
        })).collect::<Vec<_>>(),
    })
}

pub fn tags(args: &TagsArgs) -> Result<()> {
    init_logging(args.log.verbose);
    let reference = parse_reference(&args.repository)?;
    let client = args.registry.client()?;
    let tags = runtime()?.block_on(client.tags(&reference)).map_err(|e| {
        about(
            e,
            &reference,
            format!("cannot list the tags of {}", reference.name()),
        )
    })?;
    let mut out = std::io::stdout().lock();
    let repository = reference.name();
    for t in tags {
        if args.json {
            let o = serde_json::json!({"repository": repository, "tag": t});
            writeln!(out, "{o}")?;
        } else {
            writeln!(out, "{t}")?;
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ConfigArgs {
    /// The image (see `rimg --help` for the forms of REF).
    #[arg(value_name = "REF")]
    pub reference: String,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

/// The image's config blob, exactly as stored (verified against its digest).
pub fn config(args: &ConfigArgs) -> Result<()> {
    init_logging(args.log.verbose);
    let common = &args.common;
    let image = match local::locate(&args.reference) {
        Location::Local(spec) => local::open(&spec, common.platform())?.0,
        Location::Registry(r) => {
            let reference = parse_reference(r)?;
            let client = common.registry.client()?;
            runtime()?.block_on(resolve(&client, common, &reference))?
        }
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&image.config_bytes)?;
    if !image.config_bytes.ends_with(b"\n") && std::io::IsTerminal::is_terminal(&out) {
        out.write_all(b"\n")?;
    }
    Ok(out.flush()?)
}

/// `rimg version`: the version, as `rimg --version` prints it.
pub fn version() -> Result<()> {
    println!("rimg {}", env!("CARGO_PKG_VERSION"));
    Ok(())
}
