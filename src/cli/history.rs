//! `rimg history`: each layer as `docker history` shows it, with its
//! compressed size (the manifest's), its unpacked size (the file bytes its
//! tar holds), entry count and `created_by`; and with `--wasted`, the bytes
//! a layer holds that a later one overwrote or deleted, as dive counts them.

use std::io::{IsTerminal, Write};

use anyhow::{Result, bail};
use serde_json::json;

use super::forensics::{absolute, all_layers, created_by};
use super::ls::human_size;
use super::options::Size;
use super::{Common, Names, Verbosity, runtime};
use rimg::forensics;
use rimg::layer::EntryKind;

#[derive(clap::Args)]
pub struct HistoryArgs {
    /// The image (see `rimg --help` for the forms of REF).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// List the files later layers overwrote or deleted, biggest first,
    /// and their total: bytes shipped that no container sees.
    #[arg(long)]
    pub wasted: bool,
    /// With --wasted: fail (exit 1) when the total is above SIZE, e.g. 10M.
    #[arg(long, value_name = "SIZE", requires = "wasted")]
    pub fail_above: Option<Size>,
    /// Sizes in bytes [default: on a terminal, as 1.5M].
    #[arg(long)]
    pub bytes: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

pub fn history(args: &HistoryArgs) -> Result<()> {
    super::init_logging(args.log.verbose);
    let rt = runtime()?;
    let progress = std::io::stderr().is_terminal();
    let source = args.common.open_image(&rt, &args.reference, progress)?;
    let (_layers, indexes) = all_layers(&rt, &source)?;
    let human = !args.bytes && !args.json && std::io::stdout().is_terminal();
    let size = |n: u64| if human { human_size(n) } else { n.to_string() };
    let names = Names::new();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.wasted {
        let mut wasted: Vec<_> = forensics::deleted(&indexes)?
            .into_iter()
            .filter_map(|d| {
                let e = &indexes[d.layer].entries[d.entry];
                (e.kind == EntryKind::File).then_some((e.size, d))
            })
            .collect();
        wasted.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.path.cmp(&b.1.path)));
        let total: u64 = wasted.iter().map(|(s, _)| s).sum();
        for (bytes, d) in &wasted {
            if args.json {
                let mut o = serde_json::Map::new();
                super::forensics::put_bytes(&mut o, "path", &absolute(&d.path));
                o.insert("size".into(), (*bytes).into());
                o.insert("layer".into(), d.layer.into());
                o.insert("hidden_by".into(), d.hidden_by.into());
                o.insert("how".into(), d.how.as_str().into());
                writeln!(out, "{}", serde_json::Value::Object(o))?;
                continue;
            }
            write!(
                out,
                "{:>10} layer {:>3} {:<9} by {:>3}  ",
                size(*bytes),
                d.layer,
                d.how.as_str(),
                d.hidden_by
            )?;
            names.write(&mut out, &absolute(&d.path))?;
            writeln!(out)?;
        }
        if args.json {
            writeln!(out, "{}", json!({"total": total, "files": wasted.len()}))?;
        } else {
            writeln!(out, "wasted: {} in {} files", size(total), wasted.len())?;
        }
        out.flush()?;
        if let Some(limit) = args.fail_above
            && total > limit.0
        {
            bail!(
                "{}: {total} bytes wasted, above --fail-above {}",
                source.image.reference,
                limit.0
            );
        }
        return Ok(());
    }
    let created = created_by(&source);
    if !args.json {
        writeln!(
            out,
            "{:>3} {:<19} {:>10} {:>10} {:>7}  CREATED BY",
            "#", "LAYER", "SIZE", "UNPACKED", "ENTRIES"
        )?;
    }
    for (i, (desc, index)) in source.image.layers.iter().zip(&indexes).enumerate() {
        let unpacked: u64 = index
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| e.size)
            .sum();
        let by = created[i].clone().unwrap_or_default();
        if args.json {
            writeln!(
                out,
                "{}",
                json!({
                    "layer": i,
                    "digest": desc.digest.to_string(),
                    "size": desc.size,
                    "unpacked": unpacked,
                    "entries": index.entries.len(),
                    "created_by": created[i],
                })
            )?;
            continue;
        }
        let by: String = by.chars().filter(|c| !c.is_control()).collect();
        writeln!(
            out,
            "{i:>3} sha256:{:<12} {:>10} {:>10} {:>7}  {}",
            desc.digest.short(),
            size(desc.size),
            size(unpacked),
            index.entries.len(),
            rimg::names::escaped_text(&by)
        )?;
    }
    Ok(out.flush()?)
}
