//! `rimg verify REF`: one line per layer saying what was checked and how
//! it went (or one JSON object per line), then the verdict; non-zero exit
//! naming every failure.

use std::io::{IsTerminal, Write};

use anyhow::{Result, bail};
use rimg::image::{LayerReport, Outcome};

use super::*;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The image (see `rimg --help` for the forms of REF).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// One JSON object per line: one per layer, then the verdict.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

pub fn verify(args: &VerifyArgs) -> Result<()> {
    init_logging(args.log.verbose);
    let (common, reference, json) = (&args.common, args.reference.as_str(), args.json);
    let rt = runtime()?;
    // Signatures first: a rejected image is reported, never read.
    let (name, decision) = trust::decision_for(common, &rt, reference)?;
    let policy = trust::decision_json(&decision);
    if json && !decision.accepted {
        let verdict = serde_json::json!({"reference": name, "ok": false, "policy": policy});
        writeln!(std::io::stdout().lock(), "{verdict}")?;
    } else if !json {
        trust::write_decision(&mut std::io::stdout().lock(), &decision)?;
    }
    if !decision.accepted {
        decision.into_result(&name)?;
    }
    let source = common.open_image(&rt, reference, !json && std::io::stderr().is_terminal())?;
    let report = rt.block_on(source.verify())?;
    let mut out = std::io::stdout().lock();
    let failures = report.failures();
    if json {
        for l in &report.layers {
            writeln!(out, "{}", serde_json::to_string(&layer_json(l))?)?;
        }
        let verdict = serde_json::json!({
            "reference": report.reference,
            "digest": report.digest,
            "manifest": report.manifest,
            "config": report.config,
            "ok": failures.is_empty(),
            "failures": failures,
            "policy": policy,
        });
        writeln!(out, "{verdict}")?;
    } else {
        for (what, o) in [("manifest", &report.manifest), ("config", &report.config)] {
            writeln!(out, "{what} {}", outcome_text(o))?;
        }
        for l in &report.layers {
            let checks: Vec<String> = l
                .checks
                .iter()
                .map(|(c, o)| format!("{} {}", c.name(), outcome_text(o)))
                .collect();
            writeln!(
                out,
                "layer {} {} {}: {}",
                l.index,
                l.digest,
                kind(&l.media_type),
                checks.join(", ")
            )?;
        }
        if failures.is_empty() {
            writeln!(out, "{} {}: verified", report.reference, report.digest)?;
        }
    }
    out.flush()?;
    if !failures.is_empty() {
        bail!(
            "{} {} failed verification: {}",
            report.reference,
            report.digest,
            failures.join("; ")
        );
    }
    Ok(())
}

fn layer_json(l: &LayerReport) -> serde_json::Value {
    let checks: serde_json::Map<String, serde_json::Value> = l
        .checks
        .iter()
        .map(|(c, o)| {
            (
                c.name().to_string(),
                serde_json::to_value(o).unwrap_or_default(),
            )
        })
        .collect();
    serde_json::json!({
        "layer": l.index,
        "digest": l.digest,
        "media_type": l.media_type,
        "ok": l.failed().next().is_none(),
        "checks": checks,
    })
}

fn outcome_text(o: &Outcome) -> String {
    match o {
        Outcome::Ok => "ok".into(),
        Outcome::Failed(why) => format!("FAILED ({why})"),
        Outcome::Skipped(why) => format!("not checked ({why})"),
    }
}

/// The compression a media type names, as the summary line shows it.
fn kind(media_type: &str) -> &'static str {
    if media_type.ends_with("zstd") {
        "zstd"
    } else if media_type.ends_with("gzip") {
        "gzip"
    } else {
        "tar"
    }
}
