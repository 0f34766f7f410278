//! The CLI edge: each subcommand as a function over parsed arguments, one
//! file each, and what they share (options, logging, resolving an image).
//! This is the only place that uses anyhow; it adds the context a user needs.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};

mod cache;
mod docs;
mod export;
mod forensics;
mod index;
mod inspect;
mod ls;
mod mount;

pub use cache::{cache_clear, cache_ls, cache_prune, cache_verify};
pub use docs::{completions, man};
pub use export::export;
pub use forensics::{GrepArgs, deleted, diff, grep, log};
pub use index::index;
pub use inspect::{inspect, tags};
pub use ls::{cat, ls};
// Shared by several subcommands (and the tests below).
use ls::{format_time, shell_quote};
pub use mount::{mount, mounts, serve, umount};

use rimg::cache::Cache;
use rimg::digest::Digest;
use rimg::image::{Blobs, ImageSource};
use rimg::local::{self, Location};
use rimg::reference::Reference;
use rimg::registry::{
    Client, ClientOptions, CredentialStore, Credentials, Mirror, PlatformSpec, RegistriesConf,
    RegistryError, ResolvedImage,
};

/// Options every subcommand shares.
#[derive(Debug, Clone, Default)]
pub struct Common {
    pub platform: Option<String>,
    pub username: Option<String>,
    pub password_stdin: bool,
    pub plain_http: bool,
    pub insecure: bool,
    pub ca_certs: Vec<PathBuf>,
    pub mirrors: Vec<String>,
    pub cache_dir: Option<PathBuf>,
    pub cache_size: Option<String>,
    pub max_layer_size: Option<String>,
    pub verbose: u8,
    /// Seconds one operation keeps trying (RIMG_TIMEOUT).
    pub timeout: Option<u64>,
    /// Seconds without a byte before a connection counts as stalled (RIMG_STALL_TIMEOUT).
    pub stall_timeout: Option<u64>,
    /// Attempts per request (RIMG_RETRIES).
    pub retries: Option<u32>,
    pub allow_foreign_layers: bool,
    pub whole_layers: bool,
    pub no_index: bool,
}

pub struct LsArgs {
    pub reference: String,
    pub path: Vec<u8>,
    /// One layer as stored (negative counts from the top).
    pub layer: Option<i64>,
    pub long: bool,
    pub recursive: bool,
    /// One JSON object per entry and line.
    pub json: bool,
}

pub struct MountArgs {
    pub reference: String,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub allow_other: bool,
    pub prefetch: bool,
    pub layer: Option<i64>,
}

pub struct ExportArgs {
    pub reference: String,
    pub output: String,
    pub format: String,
    pub flatten: bool,
    pub tag: Option<String>,
    /// `keep` or `gzip`: see [`rimg::export::Compress`].
    pub compress: String,
}

/// An error chain on one line: `what: why: underlying cause`. Each level
/// says only its own part, so the chain joined says each thing once.
pub fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|cause| cause.to_string().replace('\n', " "))
        .collect::<Vec<_>>()
        .join(": ")
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

impl Common {
    pub(crate) fn platform(&self) -> Result<Option<PlatformSpec>> {
        self.platform
            .as_deref()
            .map(|p| p.parse::<PlatformSpec>().map_err(|e| anyhow!(e)))
            .transpose()
    }

    fn explicit_credentials(&self) -> Result<Option<Credentials>> {
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
            ..ClientOptions::default()
        };
        let opts = ClientOptions {
            deadline: self
                .timeout
                .map_or(opts.deadline, std::time::Duration::from_secs),
            read_timeout: self
                .stall_timeout
                .map_or(opts.read_timeout, std::time::Duration::from_secs),
            max_tries: self.retries.map_or(opts.max_tries, |r| r.max(1)),
            ..opts
        };
        Ok(Arc::new(Client::new(opts)?))
    }
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

/// The references `s` (bare or after `docker://`) may name, in the order to
/// try them: a short name through registries.conf's aliases and search
/// registries (docker's normalisation without them), each rewritten by its
/// `[[registry]]` and refused when that registry is blocked.
pub(crate) fn references(s: &str) -> Result<Vec<Reference>> {
    let s = s.strip_prefix("docker://").unwrap_or(s);
    let Some(conf) = registries_conf()? else {
        return Ok(vec![Reference::parse(s)?]);
    };
    conf.candidates(s)?
        .iter()
        .map(|r| Ok(conf.rewrite(r)?))
        .collect()
}

/// A registry reference, bare or after `docker://`: the first of [`references`].
pub(crate) fn parse_reference(s: &str) -> Result<Reference> {
    references(s)?
        .into_iter()
        .next()
        .context("no reference to try")
}

pub(crate) async fn resolve(
    client: &Client,
    common: &Common,
    reference: &Reference,
) -> Result<ResolvedImage> {
    let platform = common.platform()?;
    client
        .resolve(reference, platform.as_ref())
        .await
        .map_err(|e| about(e, reference, format!("cannot resolve {reference}")))
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

/// Parses sizes like `10G`, `500M`, `4096` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => bail!("size {s:?}: unknown unit (use K, M, G or T)"),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow!("size {s:?} is not a number with an optional K/M/G/T unit"))?;
    if !n.is_finite() || n < 0.0 {
        bail!("size {s:?} must be positive");
    }
    Ok((n * mult as f64) as u64)
}

const DEFAULT_CACHE_SIZE: u64 = 10 << 30;

impl Common {
    pub(crate) fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(rimg::cache::default_dir)
    }

    pub(crate) fn cache_limit(&self) -> Result<u64> {
        self.cache_size
            .as_deref()
            .map(parse_size)
            .transpose()
            .map(|s| s.unwrap_or(DEFAULT_CACHE_SIZE))
    }

    pub(crate) fn cache(&self) -> Result<Arc<Cache>> {
        let dir = self.cache_dir();
        let cache = Cache::open(&dir, self.cache_limit()?)
            .with_context(|| format!("cannot open the cache at {}", dir.display()))?;
        Ok(Arc::new(cache))
    }

    fn max_layer_size(&self) -> Result<u64> {
        match &self.max_layer_size {
            Some(s) => parse_size(s),
            None => self.cache_limit(),
        }
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
                let (image, blobs) = local::open(&spec, self.platform()?.as_ref())?;
                Ok((image, blobs.into(), spec.absolute()?.to_string()))
            }
            Location::Registry(r) => {
                let client = self.client_with(creds)?;
                // A short name may stand for several: the first that resolves.
                let mut first_error = None;
                for reference in references(r)? {
                    match rt.block_on(resolve(&client, self, &reference)) {
                        Ok(image) => {
                            let pinned = image.reference.with_digest(&image.digest).to_string();
                            return Ok((image, client.into(), pinned));
                        }
                        Err(e) => {
                            tracing::info!("{}", one_line(&e));
                            first_error.get_or_insert(e);
                        }
                    }
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
        let (image, blobs, _) = self.locate_image(rt, reference, self.explicit_credentials()?)?;
        Ok(Arc::new(self.lazy(ImageSource::new(
            image,
            blobs,
            self.cache()?,
            self.max_layer_size()?,
            bars(progress),
        ))))
    }

    /// Which layers may be read by range, as the flags say.
    pub(crate) fn lazy(&self, s: ImageSource) -> ImageSource {
        s.with_range_reads(!self.whole_layers)
            .with_published_indexes(!self.no_index)
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
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
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
