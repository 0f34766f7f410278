//! `rimg index build|push`: the gzip checkpoint indexes that let other
//! machines read an image's plain gzip layers by range.

use std::io::{IsTerminal, Write};

use anyhow::Result;

use std::path::PathBuf;

use super::*;

/// Builds (and with `push`, publishes) the image's gzip indexes, printing
/// each layer's index size against its blob.
#[derive(clap::Subcommand)]
pub enum IndexAction {
    /// Build the gzip checkpoint index of every gzip layer (fetching the
    /// layers whole if need be) and print its size against the layer's.
    Build(IndexArgs),
    /// Build the indexes and push them as an artifact referring to the
    /// image, so other machines read its gzip layers by range.
    Push(PushArgs),
}

#[derive(clap::Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub index: IndexArgs,
    /// Sign the index artifact with this cosign private key (encrypted PEM).
    #[arg(long, value_name = "KEY")]
    pub sign_by_sigstore_private_key: Option<PathBuf>,
    /// The key's passphrase, first line of FILE [default: $COSIGN_PASSWORD].
    #[arg(long, value_name = "FILE", requires = "sign_by_sigstore_private_key")]
    pub sign_passphrase_file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct IndexArgs {
    /// The image (see `rimg --help` for the forms of REF).
    #[arg(value_name = "REF")]
    pub reference: String,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

pub fn index(action: &IndexAction) -> Result<()> {
    let (args, push, sign) = match action {
        IndexAction::Build(a) => (a, false, None),
        IndexAction::Push(p) => (
            &p.index,
            true,
            p.sign_by_sigstore_private_key
                .as_deref()
                .map(|key| trust::SignArgs {
                    key,
                    passphrase_file: p.sign_passphrase_file.as_deref(),
                }),
        ),
    };
    let sign = sign.as_ref();
    init_logging(args.log.verbose);
    let (common, reference) = (&args.common, &args.reference);
    let rt = runtime()?;
    let source = common.open_image(&rt, reference, std::io::stderr().is_terminal())?;
    let built = rt.block_on(source.build_gz_indexes())?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<19} {:>12} {:>10} {:>7} {:>6}",
        "LAYER", "BLOB", "INDEX", "SPANS", "SIZE"
    )?;
    let (mut blobs, mut indexes) = (0u64, 0u64);
    for (_, ix) in &built {
        let size = ix.encode()?.len() as u64;
        blobs += ix.blob_size;
        indexes += size;
        writeln!(
            out,
            "{:<19} {:>12} {:>10} {:>7} {:>5.2}%",
            format!("sha256:{}", ix.layer.short()),
            ix.blob_size,
            size,
            ix.zran.spans.len(),
            100.0 * size as f64 / ix.blob_size.max(1) as f64
        )?;
    }
    writeln!(
        out,
        "{} gzip layers: {indexes} bytes of index for {blobs} bytes of layers ({:.2}%)",
        built.len(),
        100.0 * indexes as f64 / blobs.max(1) as f64
    )?;
    if push {
        let digest = rt.block_on(source.push_gz_indexes(&built))?;
        writeln!(
            out,
            "pushed {digest} ({}) referring to {}@{}",
            rimg::image::ARTIFACT_TYPE,
            source.image.reference,
            source.image.digest
        )?;
        if let (Some(sign), Some(client)) = (sign, source.registry_client()) {
            let repo = &source.image.reference;
            let sig = trust::sign_artifact(&rt, client, repo, &digest, sign)?;
            writeln!(
                out,
                "signed {digest}: {}:{} ({sig})",
                repo.name(),
                rimg::trust::cosign::signature_tag(&digest)?
            )?;
        }
    }
    Ok(())
}
