//! `rimg index build|push`: the gzip checkpoint indexes that let other
//! machines read an image's plain gzip layers by range.

use std::io::{IsTerminal, Write};

use anyhow::Result;

use super::*;

/// Builds (and with `push`, publishes) the image's gzip indexes, printing
/// each layer's index size against its blob.
pub fn index(common: &Common, reference: &str, push: bool, sign: Option<&SignArgs>) -> Result<()> {
    init_logging(common.verbose);
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
