//! The CLI edge: each subcommand as a function over parsed arguments. This is
//! the only place that uses anyhow; it adds the context a user needs.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use crate::reference::Reference;
use crate::registry::{
    Client, ClientOptions, CredentialStore, Credentials, Mirror, PlatformSpec, ResolvedImage,
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
}

pub struct LsArgs {
    pub reference: String,
    pub path: String,
    pub long: bool,
    pub recursive: bool,
}

pub struct MountArgs {
    pub reference: String,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub allow_other: bool,
    pub prefetch: bool,
    pub layer: Option<i64>,
    pub ready_fd: Option<i32>,
}

pub struct ExportArgs {
    pub reference: String,
    pub output: String,
    pub format: String,
    pub flatten: bool,
    pub tag: Option<String>,
}

/// An error chain on one line: `what: why: underlying cause`.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string().replace('\n', " ");
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

pub(crate) fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = std::env::var("RIMG_LOG").unwrap_or_else(|_| default.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
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
        let opts = ClientOptions {
            plain_http: self.plain_http,
            insecure: self.insecure,
            ca_certs: self.ca_certs.clone(),
            mirrors,
            credentials: CredentialStore::from_env(self.explicit_credentials()?),
            ..ClientOptions::default()
        };
        Ok(Arc::new(Client::new(opts)?))
    }
}

pub(crate) fn parse_reference(s: &str) -> Result<Reference> {
    Ok(Reference::parse(s)?)
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
        .with_context(|| format!("cannot resolve {reference}"))
}

pub fn inspect(common: &Common, reference: &str, raw: bool) -> Result<()> {
    init_logging(common.verbose);
    let reference = parse_reference(reference)?;
    let client = common.client()?;
    let rt = runtime()?;
    if raw {
        let m = rt
            .block_on(client.fetch_manifest(&reference))
            .with_context(|| format!("cannot fetch the manifest of {reference}"))?;
        std::io::stdout().write_all(&m.bytes)?;
        return Ok(());
    }
    let image = rt.block_on(resolve(&client, common, &reference))?;
    let out = serde_json::to_string_pretty(&inspect_json(&image))?;
    println!("{out}");
    Ok(())
}

fn inspect_json(image: &ResolvedImage) -> serde_json::Value {
    let r = &image.reference;
    let cfg = image.config.config().clone().unwrap_or_default();
    let history: Vec<serde_json::Value> = image
        .config
        .history()
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|h| {
            json!({
                "created": h.created(),
                "created_by": h.created_by(),
                "comment": h.comment(),
                "empty_layer": h.empty_layer(),
            })
        })
        .collect();
    json!({
        "reference": {
            "name": r.to_string(),
            "registry": r.registry,
            "repository": r.repository,
            "tag": r.tag,
            "digest": image.index_digest.clone().unwrap_or_else(|| image.digest.clone()),
        },
        "platform": image.platform,
        "index": image.index_digest.as_ref().map(|d| json!({"digest": d})),
        "manifest": {
            "mediaType": image.media_type,
            "digest": image.digest,
            "size": image.manifest_bytes.len(),
        },
        "config": {
            "digest": image.config_digest,
            "created": image.config.created(),
            "env": cfg.env(),
            "cmd": cfg.cmd(),
            "entrypoint": cfg.entrypoint(),
            "workingDir": cfg.working_dir(),
            "user": cfg.user(),
            "labels": cfg.labels(),
            "history": history,
        },
        "layers": image.layers.iter().map(|l| json!({
            "digest": l.digest,
            "mediaType": l.media_type,
            "size": l.size,
        })).collect::<Vec<_>>(),
    })
}

pub fn tags(common: &Common, repository: &str) -> Result<()> {
    init_logging(common.verbose);
    let reference = parse_reference(repository)?;
    let client = common.client()?;
    let tags = runtime()?
        .block_on(client.tags(&reference))
        .with_context(|| format!("cannot list the tags of {}", reference.name()))?;
    let mut out = std::io::stdout().lock();
    for t in tags {
        writeln!(out, "{t}")?;
    }
    Ok(())
}

pub fn ls(_common: &Common, _args: &LsArgs) -> Result<()> {
    bail!("ls is not available yet")
}

pub fn cat(_common: &Common, _reference: &str, _path: &str) -> Result<()> {
    bail!("cat is not available yet")
}

pub fn mount(_common: &Common, _args: &MountArgs) -> Result<()> {
    bail!("mount is not available yet")
}

pub fn serve(_common: &Common, _args: &MountArgs) -> Result<()> {
    bail!("serve is not available yet")
}

pub fn umount(_mountpoint: &std::path::Path) -> Result<()> {
    bail!("umount is not available yet")
}

pub fn mounts() -> Result<()> {
    bail!("mounts is not available yet")
}

pub fn export(_common: &Common, _args: &ExportArgs) -> Result<()> {
    bail!("export is not available yet")
}

pub fn cache_ls(_common: &Common) -> Result<()> {
    bail!("cache ls is not available yet")
}

pub fn cache_prune(_common: &Common, _size: Option<&str>) -> Result<()> {
    bail!("cache prune is not available yet")
}

pub fn cache_clear(_common: &Common) -> Result<()> {
    bail!("cache clear is not available yet")
}
