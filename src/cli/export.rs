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

/// What `--format` writes.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    /// A `docker load` archive.
    Docker,
    /// An OCI image layout in a tar.
    Oci,
    /// The merged filesystem as one tar.
    Rootfs,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The image (see `rimg --help` for the forms of REF).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Output file, or - for stdout.
    #[arg(value_name = "OUTPUT")]
    pub output: String,
    /// Archive format.
    #[arg(long, value_enum, default_value = "docker")]
    pub format: ExportFormat,
    /// One layer holding the merged filesystem.
    #[arg(long)]
    pub flatten: bool,
    /// Image name in the archive [default: the reference].
    #[arg(long, value_name = "NAME:TAG")]
    pub tag: Option<String>,
    /// Layer compression in the archive: `keep` as stored, or `gzip`
    /// (re-encodes zstd and uncompressed layers, for docker 20.10).
    #[arg(long, value_name = "keep|gzip", default_value = "keep")]
    pub compress: String,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

pub fn export(args: &ExportArgs) -> Result<()> {
    init_logging(args.log.verbose);
    let common = &args.common;
    let format = match args.format {
        ExportFormat::Docker => rimg::export::Format::Docker,
        ExportFormat::Oci => rimg::export::Format::Oci,
        ExportFormat::Rootfs => rimg::export::Format::Rootfs,
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
        let done = rt.block_on(interruptible(rimg::export::export(
            source,
            format,
            args.flatten,
            compress,
            name,
            out,
        )));
        bar.finish_and_clear();
        let mut out = done??;
        out.flush()?;
        bar.finish_and_clear();
        return Ok(());
    }
    let target = PathBuf::from(&args.output);
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        bail!(
            "cannot write {}: directory {} does not exist (create it first)",
            target.display(),
            dir.display()
        );
    }
    sweep_exports(dir);
    // A temporary name in the same directory, renamed at the end, so an
    // interrupted export never leaves a file that looks complete. Ctrl-C
    // removes it; a kill -9 leaves it for the next export to sweep.
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{EXPORT_PREFIX}{}-", std::process::id()))
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let file = tmp.reopen()?;
    let out = ProgressWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        bar: bar.clone(),
    };
    let done = rt.block_on(interruptible(rimg::export::export(
        source,
        format,
        args.flatten,
        compress,
        name,
        out,
    )));
    bar.finish_and_clear();
    let out = done?.with_context(|| format!("exporting to {}", target.display()))?;
    let file = out.inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    bar.finish_and_clear();
    tmp.persist(&target)
        .with_context(|| format!("cannot write {}", target.display()))?;
    Ok(())
}

/// The temporary name an export writes before its rename: the prefix, then
/// the pid of the process writing it.
const EXPORT_PREFIX: &str = ".rimg-export-";

/// Removes the temporaries of exports into `dir` whose process is gone.
fn sweep_exports(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(EXPORT_PREFIX)) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !rimg::fuse::mounts::pid_alive(p)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
