//! `rimg completions` and `rimg man`: shell completion scripts and manual
//! pages generated from the clap definitions, so they never drift from the
//! options rimg takes. `scripts/install-docs.sh` installs both.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> Result<()> {
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, "rimg", &mut out);
    Ok(out.flush()?)
}

/// `rimg.1` to stdout, or `rimg.1` and `rimg-SUBCOMMAND.1` for every visible
/// subcommand into `dir`.
pub fn man(cmd: clap::Command, dir: Option<&Path>) -> Result<()> {
    let Some(dir) = dir else {
        let mut out = std::io::stdout().lock();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        return Ok(out.flush()?);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("cannot write manual pages to {}", dir.display()))
}
