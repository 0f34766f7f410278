//! `rimg export`: the image as a docker, OCI or rootfs archive.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use super::*;

/// Counts bytes written, for the progress display.
pub(super) struct ProgressWriter<W> {
    inner: W,
    bar: indicatif::ProgressBar,
}

impl<W: Write> Write for ProgressWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub fn export(common: &Common, args: &ExportArgs) -> Result<()> {
    init_logging(common.verbose);
    let format = match args.format.as_str() {
        "docker" => rimg::export::Format::Docker,
        "oci" => rimg::export::Format::Oci,
        "rootfs" => rimg::export::Format::Rootfs,
        other => bail!("unknown export format {other:?} (docker, oci or rootfs)"),
    };
    let compress = match args.compress.as_str() {
        "keep" => rimg::export::Compress::Keep,
        "gzip" => rimg::export::Compress::Gzip,
        other => bail!("unknown --compress {other:?} (keep or gzip)"),
    };
    let to_stdout = args.output == "-";
    if to_stdout && std::io::stdout().is_terminal() {
        bail!("refusing to write a tar archive to a terminal; give a file name or redirect stdout");
    }
    let rt = runtime()?;
    let show = std::io::stderr().is_terminal();
    let source = common.open_image(&rt, &args.reference, show)?;
    let name = rimg::export::archive_name(&source, args.tag.as_deref())?;
    let bar = if show {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("writing {bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    if to_stdout {
        let out = ProgressWriter {
            inner: std::io::BufWriter::with_capacity(1 << 20, std::io::stdout()),
            bar: bar.clone(),
        };
        let mut out = rt.block_on(rimg::export::export(
            source,
            format,
            args.flatten,
            compress,
            name,
            out,
        ))?;
        out.flush()?;
        bar.finish_and_clear();
        return Ok(());
    }
    let target = PathBuf::from(&args.output);
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    // A temporary name in the same directory, renamed at the end, so an
    // interrupted export never leaves a file that looks complete.
    let tmp = tempfile::Builder::new()
        .prefix(".rimg-export-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let file = tmp.reopen()?;
    let out = ProgressWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        bar: bar.clone(),
    };
    let out = rt
        .block_on(rimg::export::export(
            source,
            format,
            args.flatten,
            compress,
            name,
            out,
        ))
        .with_context(|| format!("exporting to {}", target.display()))?;
    let file = out.inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    bar.finish_and_clear();
    tmp.persist(&target)
        .with_context(|| format!("cannot write {}", target.display()))?;
    Ok(())
}
