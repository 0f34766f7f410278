//! The CLI edge: each subcommand a function taking its own clap struct (one
//! file each), the shared option groups ([`options`]), and what commands
//! share (logging, resolving an image, progress bars, the one-line error).
//! This is the only place that uses anyhow; it adds the context a user needs.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};

mod across;
mod cache;
mod docs;
mod export;
mod forensics;
mod grep;
mod history;
mod images;
mod index;
mod inspect;
mod ls;
mod mount;
pub mod options;
mod trust;
mod verify;

// Shared by several subcommands (and the tests below).
use ls::format_time;
pub use options::{CacheOpts, Common, RegistryOpts, Verbosity};

use rimg::cache::Cache;
use rimg::digest::Digest;
use rimg::image::{Blobs, ImageSource};
use rimg::local::{self, Location};
use rimg::reference::Reference;
use rimg::registry::{
    Client, ClientOptions, CredentialStore, Credentials, Mirror, PlatformSpec, RegistriesConf,
    RegistryError, ResolvedImage,
};

/// Mount, inspect and export container images straight from a registry.
#[derive(Parser)]
#[command(
    name = "rimg",
    version,
    about,
    after_help = "REF is a registry reference (alpine:3.10, docker://host:5000/repo:tag) or an image in a file: docker-archive:PATH[:REPO:TAG], oci:DIR[:TAG], oci-archive:PATH[:TAG].\nOptions may also come before the command: rimg --platform linux/arm64 ls REF."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Print an image's resolved reference, platform, manifest, config and layers as JSON.
    Inspect(inspect::InspectArgs),
    /// List a repository's tags.
    Tags(inspect::TagsArgs),
    /// Images the cache can open without the registry: reference, digest,
    /// size, last use.
    Images(images::ImagesArgs),
    /// Print the image's config blob, exactly as stored (pipe it to jq).
    Config(inspect::ConfigArgs),
    /// List the image's merged filesystem.
    #[command(disable_help_flag = true)]
    Ls(ls::LsArgs),
    /// Write a file of the image to stdout (symlinks followed inside the image).
    Cat(ls::CatArgs),
    /// Every layer that changed PATH, oldest first, and how; with
    /// --all-tags or --tags, every release that changed it instead.
    Log(forensics::LogArgs),
    /// Entries some layer holds that the merged tree does not show, and what hid them.
    Deleted(forensics::DeletedArgs),
    /// Each layer: digest, compressed and unpacked size, entries and the
    /// step that made it; with --wasted, the bytes later layers hid.
    History(history::HistoryArgs),
    /// Paths that differ between two images: A(dded), D(eleted), M(odified).
    Diff(forensics::DiffArgs),
    /// Search file contents of the merged tree, without a mount; exit 0 if
    /// found, 1 if not, 2 on error, as grep. Several references (or
    /// --all-tags, --tags, --catalog) search many images, each distinct
    /// layer's files once, and lines start with the image (TAG:PATH:LINE).
    #[command(
        disable_help_flag = true,
        override_usage = "rimg grep [OPTIONS] PATTERN REF... [/PATH]...\n       rimg grep [OPTIONS] -e PATTERN... REF... [/PATH]...\n       rimg grep [OPTIONS] PATTERN REPO (--all-tags | --tags GLOB) [/PATH]...\n       rimg grep [OPTIONS] PATTERN --catalog HOST [--tags GLOB] [/PATH]..."
    )]
    Grep(grep::GrepArgs),
    /// Mount the image read-only at MOUNTPOINT.
    Mount(mount::MountArgs),
    /// Unmount a rimg mount.
    Umount(mount::UmountArgs),
    /// List rimg mounts.
    Mounts(mount::MountsArgs),
    /// Write the image as a docker/OCI archive or a rootfs tar.
    Export(export::ExportArgs),
    /// Check everything about an image: manifest, config and layer digests,
    /// every diff_id, every TOC and published index against its tar stream.
    Verify(verify::VerifyArgs),
    /// Shell completions, generated from the same definitions as --help.
    Completions(docs::CompletionsArgs),
    /// Manual pages: rimg.1 to stdout, or every page into --dir.
    Man(docs::ManArgs),
    /// Gzip checkpoint indexes: read plain gzip layers by range elsewhere.
    Index {
        #[command(subcommand)]
        action: index::IndexAction,
    },
    /// Show or free the layer cache.
    Cache {
        #[command(subcommand)]
        action: cache::CacheAction,
    },
    /// Print rimg's version.
    Version,
    /// Internal: serve a mount in the background (started by `rimg mount`).
    #[command(hide = true)]
    Serve(mount::ServeArgs),
}

/// Runs one command; the exit status is the command's (grep's 0/1/2), else
/// 0, or 1 after the one-line error.
pub fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Inspect(a) => inspect::inspect(&a),
        Command::Tags(a) => inspect::tags(&a),
        Command::Config(a) => inspect::config(&a),
        Command::Images(a) => images::images(&a),
        Command::Version => inspect::version(),
        Command::Ls(a) => ls::ls(&a),
        Command::Cat(a) => ls::cat(&a),
        Command::Log(a) => forensics::log(&a),
        Command::History(a) => history::history(&a),
        Command::Deleted(a) => forensics::deleted(&a),
        Command::Diff(a) => {
            // diff's exit status: 0 same, 1 different, 2 trouble.
            return match forensics::diff(&a) {
                Ok(differ) => ExitCode::from(u8::from(differ)),
                Err(e) => {
                    print_error(&e);
                    ExitCode::from(2)
                }
            };
        }
        Command::Grep(a) => {
            // grep's exit status: 0 found, 1 not found, 2 trouble.
            return match grep::grep(&a) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    print_error(&e);
                    ExitCode::from(2)
                }
            };
        }
        Command::Mount(a) => mount::mount(&a),
        Command::Serve(a) => mount::serve(&a),
        Command::Umount(a) => mount::umount(&a),
        Command::Mounts(a) => mount::mounts(&a),
        Command::Export(a) => export::export(&a),
        Command::Verify(a) => verify::verify(&a),
        Command::Completions(a) => docs::completions(&a),
        Command::Man(a) => docs::man(&a),
        Command::Index { action } => index::index(&action),
        Command::Cache { action } => cache::cache(&action),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // As a shell reports a process a signal stopped: 128 + SIGINT.
        Err(e) if e.is::<Interrupted>() => ExitCode::from(130),
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// A command stopped by SIGINT or SIGTERM, after its cleanup ran.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub(crate) struct Interrupted;

/// Runs `fut` until it ends or SIGINT/SIGTERM arrives; on a signal it is
/// dropped, so its temporary files are removed, and `Interrupted` returned.
pub(crate) async fn interruptible<T>(fut: impl Future<Output = T>) -> Result<T> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    tokio::select! {
        r = fut => Ok(r),
        _ = int.recv() => Err(Interrupted.into()),
        _ = term.recv() => Err(Interrupted.into()),
    }
}

/// The one line a failed command prints. A closed pipe on stdout (`rimg
/// cat ... | head`) is no error to report: once the command has cleaned
/// up, the process dies of SIGPIPE, silently, as coreutils do.
pub fn print_error(e: &anyhow::Error) {
    let broken_pipe = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        // SAFETY: restoring the default action and raising a signal have
        // no memory effects; the default action ends the process.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    eprintln!("rimg: {}", one_line(e));
}

/// The process arguments, with options given before the command moved after
/// it (`rimg --platform X ls REF` is `rimg ls --platform X REF`), so each
/// option is defined once, on the commands it applies to, and still works
/// in front as it always has. A leading `-v` becomes `--verbose`, so it
/// never turns into grep's `-v`.
pub fn argv() -> Vec<OsString> {
    use clap::CommandFactory;
    hoist_leading_options(std::env::args_os().collect(), &Cli::command())
}

fn hoist_leading_options(args: Vec<OsString>, cmd: &clap::Command) -> Vec<OsString> {
    let mut lead: Vec<OsString> = Vec::new();
    let mut i = 1;
    while let Some(s) = args.get(i).and_then(|a| a.to_str()) {
        if !s.starts_with('-') || s == "-" || s == "--" {
            break;
        }
        if matches!(s, "-h" | "--help" | "-V" | "--version") {
            return args;
        }
        if s.len() > 1 && s[1..].bytes().all(|b| b == b'v') {
            lead.extend(std::iter::repeat_n("--verbose".into(), s.len() - 1));
            i += 1;
            continue;
        }
        lead.push(s.into());
        let long = s.trim_start_matches('-');
        if !long.contains('=')
            && takes_value(cmd, long)
            && let Some(v) = args.get(i + 1)
        {
            lead.push(v.clone());
            i += 1;
        }
        i += 1;
    }
    if lead.is_empty() {
        return args;
    }
    let mut out = vec![args[0].clone()];
    let mut cur = cmd;
    while let Some(sub) = args
        .get(i)
        .and_then(|a| a.to_str())
        .and_then(|s| cur.find_subcommand(s))
    {
        out.push(args[i].clone());
        cur = sub;
        i += 1;
    }
    out.extend(lead);
    out.extend(args.into_iter().skip(i));
    out
}

/// Whether `--long` takes a value in whichever command defines it.
fn takes_value(cmd: &clap::Command, long: &str) -> bool {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long))
        .map(|a| a.get_action().takes_values())
        .or_else(|| {
            cmd.get_subcommands()
                .any(|s| takes_value(s, long))
                .then_some(true)
        })
        .unwrap_or(false)
}

/// An error chain on one line: `what: why: underlying cause`, escaped for a
/// terminal (registry text and names may hold control sequences). Each level
/// says only its own part, so the chain joined says each thing once.
pub fn one_line(e: &anyhow::Error) -> String {
    let chain: &(dyn std::error::Error + 'static) = e.as_ref();
    let line = rimg::report::Chain(chain).to_string();
    rimg::names::escaped_text(&line)
}

pub(crate) fn init_logging(verbose: u8) {
    // Libraries log what rimg reports itself in its one-line errors.
    let default = match verbose {
        0 => "rimg=warn",
        1 => "rimg=info",
        _ => "rimg=debug,fuser=info",
    };
    let filter = std::env::var("RIMG_LOG").unwrap_or_else(|_| default.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The background mount server's runtime: one worker, because its async
/// side only waits on the network and timers (inflating, reads by range and
/// tree building run on blocking threads, which retire soon after), so an
/// idle mount holds few threads.
pub(crate) fn server_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

impl RegistryOpts {
    pub(crate) fn explicit_credentials(&self) -> Result<Option<Credentials>> {
        if self.password_stdin {
            let username = self
                .username
                .clone()
                .context("--password-stdin needs --username")?;
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("cannot read the password from stdin")?;
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            return Ok(Some(Credentials {
                username,
                password,
                identity_token: None,
            }));
        }
        if self.username.is_some() {
            bail!("--username needs --password-stdin (passwords are never taken from arguments)");
        }
        Ok(None)
    }

    pub(crate) fn client(&self) -> Result<Arc<Client>> {
        self.client_with(self.explicit_credentials()?)
    }

    pub(crate) fn client_with(&self, explicit: Option<Credentials>) -> Result<Arc<Client>> {
        let mut mirrors = Vec::new();
        let env_mirrors = std::env::var("RIMG_MIRRORS").unwrap_or_default();
        for m in self.mirrors.iter().map(String::as_str).chain(
            env_mirrors
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty()),
        ) {
            mirrors.push(m.parse::<Mirror>().map_err(|e| anyhow!(e))?);
        }
        // registries.conf's mirrors come after --mirror and RIMG_MIRRORS.
        let conf = registries_conf()?;
        mirrors.extend(conf.map(RegistriesConf::mirrors).unwrap_or_default());
        let insecure_hosts = conf.map(RegistriesConf::insecure_hosts).unwrap_or_default();
        let opts = ClientOptions {
            plain_http: self.plain_http,
            insecure: self.insecure,
            ca_certs: self.ca_certs.clone(),
            mirrors,
            insecure_hosts,
            credentials: CredentialStore::from_env(explicit),
            foreign_urls: self.allow_foreign_layers,
            deadline: std::time::Duration::from_secs(self.timeout),
            read_timeout: std::time::Duration::from_secs(self.stall_timeout),
            max_tries: self.retries.max(1),
            ..ClientOptions::default()
        };
        Ok(Arc::new(Client::new(opts)?))
    }
}

/// A registry reference, bare or after `docker://`, with the mistakes a
/// user makes told apart from a bad reference: a URL, a registry without a
/// repository, a file on disk without its `docker-archive:` prefix.
pub(crate) fn parse_reference(s: &str) -> Result<Reference> {
    if let Some(rest) = s.strip_prefix("http://").or(s.strip_prefix("https://")) {
        bail!(
            "{s:?} is a URL; name the image as HOST/REPOSITORY[:TAG], e.g. {} (add --plain-http for a plain-HTTP registry)",
            rest.trim_end_matches('/')
        );
    }
    let r = s.strip_prefix("docker://").unwrap_or(s);
    if !r.contains('/')
        && let Some((host, port)) = r.split_once(':')
        && (host.contains('.') || host == "localhost")
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        bail!("{r} is a registry; name a repository in it: {r}/REPOSITORY[:TAG]");
    }
    let path = std::path::Path::new(r);
    if (r.contains('/') || r.ends_with(".tar")) && path.exists() {
        let form = if path.is_dir() {
            "oci"
        } else {
            "docker-archive"
        };
        bail!(
            "{r} is a {} on this machine, not an image in a registry; did you mean {form}:{r}?",
            if path.is_dir() { "directory" } else { "file" }
        );
    }
    references(r)?
        .into_iter()
        .next()
        .context("no reference to try")
}

/// The containers-registries.conf files podman reads (see
/// [`rimg::registry::RegistriesConf`]), read once; `None` when there are none.
pub(crate) fn registries_conf() -> Result<Option<&'static RegistriesConf>> {
    static CONF: std::sync::OnceLock<Result<Option<RegistriesConf>, String>> =
        std::sync::OnceLock::new();
    match CONF.get_or_init(|| RegistriesConf::load().map_err(|e| e.to_string())) {
        Ok(c) => Ok(c.as_ref()),
        Err(e) => bail!("{e}"),
    }
}

/// The references `r` may name, in the order to try them: a short name
/// through registries.conf's aliases and search registries (docker's
/// normalisation without them), each rewritten by its `[[registry]]` and
/// refused when that registry is blocked.
pub(crate) fn references(r: &str) -> Result<Vec<Reference>> {
    let Some(conf) = registries_conf()? else {
        return Ok(vec![Reference::parse(r)?]);
    };
    conf.candidates(r)?
        .iter()
        .map(|c| Ok(conf.rewrite(c)?))
        .collect()
}

/// Resolves `reference`; when the registry cannot be reached, the image it
/// resolved to last time, if the cache remembers it (see [`images`]).
pub(crate) async fn resolve(
    client: &Client,
    common: &Common,
    reference: &Reference,
) -> Result<ResolvedImage> {
    let cache = common.cache.dir();
    match client.resolve(reference, common.platform()).await {
        Ok(image) => {
            images::remember(&cache, reference, common.platform(), &image);
            Ok(image)
        }
        Err(e) => {
            if images::offline(&e)
                && let Some(image) = images::recall(&cache, reference, common.platform())
            {
                return Ok(image);
            }
            if let RegistryError::Api { status: 404, .. } = e {
                let hint = match &reference.digest {
                    Some(_) => "check the digest".to_string(),
                    None => format!("`rimg tags {}` lists the tags", reference.name()),
                };
                return Err(anyhow::Error::new(e).context(format!(
                    "{reference}: no such image in the registry; {hint}"
                )));
            }
            Err(about(e, reference, format!("cannot resolve {reference}")))
        }
    }
}

/// A registry error, with `doing` in front unless the error already names
/// the repository: most registry errors do (`R: manifest larger than ...`),
/// those about the connection name only the host. Said once either way.
pub(crate) fn about(e: RegistryError, reference: &Reference, doing: String) -> anyhow::Error {
    if e.to_string().contains(&reference.name()) {
        e.into()
    } else {
        anyhow::Error::new(e).context(doing)
    }
}

impl CacheOpts {
    pub(crate) fn open(&self) -> Result<Arc<Cache>> {
        let dir = self.dir();
        let cache = Cache::open(&dir, self.cache_size.0)
            .with_context(|| format!("cannot open the cache at {}", dir.display()))?;
        Ok(Arc::new(cache))
    }
}

impl Common {
    pub(crate) fn platform(&self) -> Option<&PlatformSpec> {
        self.platform.as_ref().map(|p| &p.0)
    }

    pub(crate) fn cache(&self) -> Result<Arc<Cache>> {
        self.cache.open()
    }

    fn max_layer_size(&self) -> u64 {
        self.max_layer_size.unwrap_or(self.cache.cache_size).0
    }

    /// The image `arg` names, from a registry or a local archive, with where
    /// its blobs come from and the argument a mount server opens it by again
    /// (the reference pinned to the digest, or the archive's absolute path).
    fn locate_image(
        &self,
        rt: &tokio::runtime::Runtime,
        arg: &str,
        creds: Option<Credentials>,
    ) -> Result<(ResolvedImage, Blobs, String)> {
        match local::locate(arg) {
            Location::Local(spec) => {
                let (image, blobs) = local::open(&spec, self.platform())?;
                self.admit_local(&spec, &image)?;
                Ok((image, blobs.into(), spec.absolute()?.to_string()))
            }
            Location::Registry(r) => {
                parse_reference(r)?;
                let r = r.strip_prefix("docker://").unwrap_or(r);
                let client = self.registry.client_with(creds)?;
                // A short name may stand for several (registries.conf's
                // search registries): the first that resolves.
                let mut first_error = None;
                for reference in references(r)? {
                    let image = match rt.block_on(resolve(&client, self, &reference)) {
                        Ok(image) => image,
                        Err(e) => {
                            tracing::info!("{}", one_line(&e));
                            first_error.get_or_insert(e);
                            continue;
                        }
                    };
                    // The trust step: before any layer is read. The image is
                    // read from these verified manifest bytes from here on.
                    self.admit(rt, &client, &reference, &image)?;
                    let pinned = image.reference.with_digest(&image.digest).to_string();
                    return Ok((image, client.into(), pinned));
                }
                Err(first_error.unwrap_or_else(|| anyhow!("{r}: no reference to try")))
            }
        }
    }

    /// Resolves `reference` and opens it for reading.
    pub(crate) fn open_image(
        &self,
        rt: &tokio::runtime::Runtime,
        reference: &str,
        progress: bool,
    ) -> Result<Arc<ImageSource>> {
        let creds = self.registry.explicit_credentials()?;
        self.open_image_as(rt, reference, bars(progress), creds)
    }

    /// As [`Self::open_image`], with credentials already read (a command
    /// opening many images reads stdin once) and its own progress. Every
    /// image opened passes the trust step ([`Self::locate_image`]).
    pub(crate) fn open_image_as(
        &self,
        rt: &tokio::runtime::Runtime,
        reference: &str,
        progress: Arc<dyn rimg::image::Progress>,
        creds: Option<Credentials>,
    ) -> Result<Arc<ImageSource>> {
        let (image, blobs, _) = self.locate_image(rt, reference, creds)?;
        Ok(Arc::new(self.source(image, blobs, progress)?))
    }

    /// An image source reading layers as the flags say.
    pub(crate) fn source(
        &self,
        image: ResolvedImage,
        blobs: Blobs,
        progress: Arc<dyn rimg::image::Progress>,
    ) -> Result<ImageSource> {
        Ok(
            ImageSource::new(image, blobs, self.cache()?, self.max_layer_size(), progress)
                .with_range_reads(!self.whole_layers)
                .with_published_indexes(!self.no_index)
                .with_trusted_tocs(self.trust_toc)
                .with_trusted_indexes(self.trust_index)
                .with_trust(Arc::new(self.trust()?)),
        )
    }
}
/// Writes a name: raw bytes to a pipe, quoted as GNU ls quotes on a terminal.
pub(crate) struct Names {
    terminal: bool,
}

impl Names {
    pub(crate) fn new() -> Names {
        Names {
            terminal: std::io::stdout().is_terminal(),
        }
    }

    pub(crate) fn write(&self, out: &mut dyn Write, name: &[u8]) -> std::io::Result<()> {
        if self.terminal {
            out.write_all(rimg::names::shell_quoted(name).as_bytes())
        } else {
            out.write_all(name)
        }
    }
}

/// Progress bars on stderr for layer downloads, or nothing.
pub(crate) fn bars(show: bool) -> Arc<dyn rimg::image::Progress> {
    if show {
        Arc::new(Bars(indicatif::MultiProgress::with_draw_target(
            indicatif::ProgressDrawTarget::stderr(),
        )))
    } else {
        Arc::new(rimg::image::Quiet)
    }
}

struct Bars(indicatif::MultiProgress);

struct Bar(indicatif::ProgressBar);

impl rimg::image::Progress for Bars {
    fn layer(&self, digest: &Digest, size: u64) -> Arc<dyn rimg::image::LayerProgress> {
        let bar = self.0.add(indicatif::ProgressBar::new(size));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(digest.short().to_string());
        Arc::new(Bar(bar))
    }
}

impl rimg::image::LayerProgress for Bar {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    fn done(&self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_that_are_urls_registries_or_files_say_what_to_type() {
        let e = parse_reference("http://host:5000/a/b")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host:5000/a/b") && e.contains("--plain-http"),
            "{e}"
        );
        let e = parse_reference("127.0.0.1:5000").unwrap_err().to_string();
        assert!(e.contains("127.0.0.1:5000/REPOSITORY"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.tar");
        std::fs::write(&file, b"").unwrap();
        let f = file.display().to_string();
        let e = parse_reference(&f).unwrap_err().to_string();
        assert!(e.contains(&format!("docker-archive:{f}")), "{e}");
        assert!(parse_reference("alpine:3.10").is_ok());
        assert!(parse_reference("localhost:5000/a:b").is_ok());
    }

    #[test]
    fn options_before_the_command_move_after_it() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let hoist = |a: &[&str]| -> Vec<String> {
            hoist_leading_options(a.iter().map(OsString::from).collect(), &cmd)
                .into_iter()
                .map(|s| s.into_string().unwrap())
                .collect()
        };
        assert_eq!(
            hoist(&["rimg", "--cache-dir", "cache", "cache", "ls"]),
            ["rimg", "cache", "ls", "--cache-dir", "cache"]
        );
        assert_eq!(
            hoist(&["rimg", "-vv", "--plain-http", "grep", "-v", "x", "r"]),
            [
                "rimg",
                "grep",
                "--verbose",
                "--verbose",
                "--plain-http",
                "-v",
                "x",
                "r"
            ]
        );
        assert_eq!(hoist(&["rimg", "ls", "r"]), ["rimg", "ls", "r"]);
        assert_eq!(hoist(&["rimg", "--help"]), ["rimg", "--help"]);
    }

    #[test]
    fn a_registry_error_naming_the_image_is_not_prefixed_with_it_again() {
        let r = Reference::parse("r.io/a:b").unwrap();
        let named = RegistryError::Invalid {
            what: "r.io/a:b".into(),
            kind: "image manifest",
            detail: "bad".into(),
        };
        let line = one_line(&about(named, &r, "cannot resolve r.io/a:b".into()));
        assert_eq!(line, "r.io/a:b: invalid image manifest: bad");
        let unnamed = RegistryError::Unreachable {
            registry: "r.io".into(),
            detail: "refused".into(),
        };
        let line = one_line(&about(unnamed, &r, "cannot resolve r.io/a:b".into()));
        assert_eq!(
            line,
            "cannot resolve r.io/a:b: cannot reach registry r.io: refused"
        );
    }

    #[test]
    fn one_line_joins_the_chain_without_repeats() {
        let e = anyhow!("inner").context("outer");
        assert_eq!(one_line(&e), "outer: inner");
    }
}
