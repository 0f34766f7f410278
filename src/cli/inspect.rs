//! `rimg inspect` and `rimg tags`: what a registry says about an image.

use std::io::Write;

use anyhow::Result;
use serde_json::json;

use rimg::local::{self, Location};
use rimg::registry::ResolvedImage;

use super::*;

pub fn inspect(common: &Common, reference: &str, raw: bool) -> Result<()> {
    init_logging(common.verbose);
    let reference = match local::locate(reference) {
        Location::Registry(r) => parse_reference(r)?,
        Location::Local(spec) => {
            let (image, _) = local::open(&spec, common.platform()?.as_ref())?;
            if raw {
                std::io::stdout().write_all(&image.manifest_bytes)?;
            } else {
                println!("{}", serde_json::to_string_pretty(&inspect_json(&image))?);
            }
            return Ok(());
        }
    };
    let client = common.client()?;
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
    let out = serde_json::to_string_pretty(&inspect_json(&image))?;
    println!("{out}");
    Ok(())
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

pub fn tags(common: &Common, repository: &str, json: bool) -> Result<()> {
    init_logging(common.verbose);
    let reference = parse_reference(repository)?;
    let client = common.client()?;
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
        if json {
            let o = serde_json::json!({"repository": repository, "tag": t});
            writeln!(out, "{o}")?;
        } else {
            writeln!(out, "{t}")?;
        }
    }
    Ok(())
}
