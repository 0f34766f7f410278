//! `rimg completions` and `rimg man`: shell completion scripts and manual
//! pages generated from the clap definitions, so they never drift from the
//! options rimg takes. `scripts/install-docs.sh` installs both.

use std::io::Write;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Write rimg.1 and a rimg-COMMAND.1 per command into DIR.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

pub fn completions(args: &CompletionsArgs) -> Result<()> {
    use clap::CommandFactory;
    let mut cmd = super::Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut cmd, "rimg", &mut out);
    Ok(out.flush()?)
}

/// `rimg.1` to stdout, or `rimg.1` and `rimg-SUBCOMMAND.1` for every visible
/// subcommand into `dir`.
pub fn man(args: &ManArgs) -> Result<()> {
    use clap::CommandFactory;
    let cmd = super::Cli::command();
    let Some(dir) = args.dir.as_deref() else {
        let mut out = std::io::stdout().lock();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        return Ok(out.flush()?);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("cannot write manual pages to {}", dir.display()))
}
