//! The CLI edge: each subcommand as a function over parsed arguments. This is
//! the only place that uses anyhow; it adds the context a user needs.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

mod forensics;
pub use forensics::{GrepArgs, deleted, diff, grep, log};

use rimg::cache::Cache;
use rimg::fuse::mounts::{self, MountRecord};
use rimg::image::{Blobs, ImageSource, short_digest};
use rimg::layer::EntryKind;
use rimg::local::{self, Location};
use rimg::names;
use rimg::overlay::tree::NodeId;
use rimg::reference::Reference;
use rimg::registry::{
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
    /// Seconds one operation keeps trying (RIMG_TIMEOUT).
    pub timeout: Option<u64>,
    /// Seconds without a byte before a connection counts as stalled (RIMG_STALL_TIMEOUT).
    pub stall_timeout: Option<u64>,
    /// Attempts per request (RIMG_RETRIES).
    pub retries: Option<u32>,
    pub allow_foreign_layers: bool,
}

pub struct LsArgs {
    pub reference: String,
    pub path: Vec<u8>,
    /// One layer as stored (negative counts from the top).
    pub layer: Option<i64>,
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
        let mut s = cause.to_string().replace('\n', " ");
        // A cause that begins by naming what an outer level already named
        // (`cannot resolve R` then `R: manifest ...`) says it once.
        while let Some((head, rest)) = s.split_once(": ")
            && head.len() >= 6
            && parts.iter().any(|p| p.contains(head))
        {
            s = rest.to_string();
        }
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
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
        let opts = ClientOptions {
            plain_http: self.plain_http,
            insecure: self.insecure,
            ca_certs: self.ca_certs.clone(),
            mirrors,
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

/// A registry reference, bare or after `docker://`.
pub(crate) fn parse_reference(s: &str) -> Result<Reference> {
    Ok(Reference::parse(s.strip_prefix("docker://").unwrap_or(s))?)
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
    let reference = match local::locate(reference) {
        Location::Registry(r) => parse_reference(r)?,
        Location::Local(spec) => {
            let (image, _) = local::open(&spec, common.platform()?.as_ref())?;
            if raw {
                std::io::stdout().write_all(&image.manifest_bytes)?;
            } else {
                println!("{}", serde_json::to_string_pretty(&inspect_json(&image))?);
            }
            return Ok(());
        }
    };
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
                let reference = parse_reference(r)?;
                let client = self.client_with(creds)?;
                let image = rt.block_on(resolve(&client, self, &reference))?;
                let pinned = image.reference.with_digest(&image.digest).to_string();
                Ok((image, client.into(), pinned))
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
        Ok(Arc::new(ImageSource::new(
            image,
            blobs,
            self.cache()?,
            self.max_layer_size()?,
            progress,
        )))
    }
}

fn mode_string(kind: EntryKind, mode: u32) -> String {
    let t = match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::Char => 'c',
        EntryKind::Block => 'b',
        EntryKind::Fifo => 'p',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(t);
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let set = mode & bit != 0;
        let special = match i {
            2 => mode & 0o4000 != 0,
            5 => mode & 0o2000 != 0,
            8 => mode & 0o1000 != 0,
            _ => false,
        };
        s.push(match (set, special) {
            (true, false) => *c,
            (false, false) => '-',
            (true, true) => {
                if i == 8 {
                    't'
                } else {
                    's'
                }
            }
            (false, true) => {
                if i == 8 {
                    'T'
                } else {
                    'S'
                }
            }
        });
    }
    s
}

fn format_time(secs: i64) -> String {
    // Civil-from-days (Howard Hinnant), so no date crate is needed for one column.
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

pub fn ls(common: &Common, args: &LsArgs) -> Result<()> {
    init_logging(common.verbose);
    let rt = runtime()?;
    let source = common.open_image(&rt, &args.reference, std::io::stderr().is_terminal())?;
    let only = args.layer.map(|l| source.layer_index(l)).transpose()?;
    let (tree, _layers) = rt.block_on(source.tree(only))?;
    // Layer numbers in the listing are the image's, even for one layer.
    let layer_no = |n: u16| only.unwrap_or(n as usize);
    let start = tree
        .resolve(&args.path, !args.long)
        .with_context(|| format!("{}: {}", source.image.reference, names::escaped(&args.path)))?;
    // Names go to a pipe as the bytes they are; a terminal gets them quoted
    // as GNU ls quotes them, so no name can move the cursor or hide a byte.
    let terminal = std::io::stdout().is_terminal();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let name_out = |out: &mut dyn Write, name: &[u8]| -> std::io::Result<()> {
        if terminal {
            out.write_all(shell_quote(name).as_bytes())
        } else {
            out.write_all(name)
        }
    };
    let base = normalize_display(&args.path);
    let print = |out: &mut dyn Write, path: &[u8], id: NodeId| -> std::io::Result<()> {
        let n = tree.node(id);
        if args.long {
            let layer = &source.image.layers[layer_no(n.layer)];
            let size = match n.kind {
                EntryKind::Char | EntryKind::Block => format!("{},{}", n.rdev.0, n.rdev.1),
                _ => n.size.to_string(),
            };
            write!(
                out,
                "{} {:>5} {:>5} {:>10} {} {}:{} ",
                mode_string(n.kind, n.mode),
                n.uid,
                n.gid,
                size,
                format_time(n.mtime),
                layer_no(n.layer),
                short_digest(&layer.digest),
            )?;
            name_out(out, path)?;
            if let Some(l) = &n.link {
                let arrow = if n.kind == EntryKind::Symlink {
                    "->"
                } else {
                    "=>"
                };
                write!(out, " {arrow} ")?;
                name_out(out, l)?;
            }
            writeln!(out)
        } else {
            name_out(out, path)?;
            writeln!(out)
        }
    };
    if tree.node(start).kind != EntryKind::Dir {
        print(&mut out, &base, start)?;
        return Ok(out.flush()?);
    }
    let mut stack = vec![(base, start)];
    while let Some((dir, id)) = stack.pop() {
        let mut subdirs = Vec::new();
        for (name, child) in tree.children(id) {
            let mut path = dir.clone();
            if path != b"/" {
                path.push(b'/');
            }
            path.extend_from_slice(name);
            print(&mut out, &path, child)?;
            if args.recursive && tree.node(child).kind == EntryKind::Dir {
                subdirs.push((path, child));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(out.flush()?)
}

fn normalize_display(path: &[u8]) -> Vec<u8> {
    let mut out = b"/".to_vec();
    out.extend_from_slice(&rimg::layer::normalize(path));
    out
}

/// A name quoted as GNU ls's default `shell-escape` style does on a
/// terminal: as it is when nothing in it needs quoting, else in single
/// quotes, with every unprintable byte as `$'\ooo'` outside them.
pub(crate) fn shell_quote(name: &[u8]) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"%+,-./:=@_^".contains(&b);
    if !name.is_empty() && name.iter().all(|&b| plain(b)) {
        return String::from_utf8_lossy(name).into_owned();
    }
    let mut out = String::new();
    let mut quoted = false;
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            if names::unsafe_on_a_terminal(c) {
                if quoted {
                    out.push('\'');
                    quoted = false;
                }
                let mut b = [0u8; 4];
                for byte in c.encode_utf8(&mut b).bytes() {
                    out.push_str(&format!("$'\\{byte:03o}'"));
                }
                continue;
            }
            if !quoted {
                out.push('\'');
                quoted = true;
            }
            if c == '\'' {
                out.push_str("'\\''");
            } else {
                out.push(c);
            }
        }
        for byte in chunk.invalid() {
            if quoted {
                out.push('\'');
                quoted = false;
            }
            out.push_str(&format!("$'\\{byte:03o}'"));
        }
    }
    if quoted {
        out.push('\'');
    }
    out
}

/// `layer`: read from that one layer as stored (negative counts from the
/// top), which is how bytes a later layer hid are recovered.
pub fn cat(common: &Common, reference: &str, path: &[u8], layer: Option<i64>) -> Result<()> {
    init_logging(common.verbose);
    let rt = runtime()?;
    let source = common.open_image(&rt, reference, std::io::stderr().is_terminal())?;
    let only = layer.map(|l| source.layer_index(l)).transpose()?;
    let (tree, layers) = rt.block_on(source.tree(only))?;
    let image_layer = |n: u16| only.unwrap_or(n as usize);
    let what = format!("{}: {}", source.image.reference, names::escaped(path));
    let id = tree.resolve(path, true).with_context(|| what.clone())?;
    let n = tree.node(id);
    if n.kind != EntryKind::File {
        bail!("{what}: not a regular file");
    }
    let mut data = rimg::image::FileData::of(&layers, n);
    let digest = &source.image.layers[image_layer(n.layer)].digest;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < n.size {
        let got = data
            .read(&mut buf)
            .with_context(|| format!("{what}: reading layer {digest}"))?;
        if got == 0 {
            bail!("{what}: layer {digest} ends before the file does");
        }
        out.write_all(&buf[..got])?;
        done += got as u64;
    }
    Ok(out.flush()?)
}

/// Arguments the background server needs to behave like this process.
fn child_args(common: &Common) -> Vec<String> {
    let mut a = Vec::new();
    if common.plain_http {
        a.push("--plain-http".into());
    }
    if common.insecure {
        a.push("--insecure".into());
    }
    for c in &common.ca_certs {
        a.push("--ca-cert".into());
        a.push(c.display().to_string());
    }
    for m in &common.mirrors {
        a.push("--mirror".into());
        a.push(m.clone());
    }
    a.push("--cache-dir".into());
    a.push(common.cache_dir().display().to_string());
    for (flag, v) in [
        ("--cache-size", &common.cache_size),
        ("--max-layer-size", &common.max_layer_size),
        ("--platform", &common.platform),
    ] {
        if let Some(v) = v {
            a.push(flag.into());
            a.push(v.clone());
        }
    }
    if common.verbose > 0 {
        a.push(format!("-{}", "v".repeat(common.verbose as usize)));
    }
    for (flag, v) in [
        ("--timeout", common.timeout),
        ("--stall-timeout", common.stall_timeout),
        ("--retries", common.retries.map(u64::from)),
    ] {
        if let Some(v) = v {
            a.push(flag.into());
            a.push(v.to_string());
        }
    }
    if common.allow_foreign_layers {
        a.push("--allow-foreign-layers".into());
    }
    a
}

pub fn mount(common: &Common, args: &MountArgs) -> Result<()> {
    init_logging(common.verbose);
    if rimg::fuse::check_mountpoint(&args.mountpoint)? {
        eprintln!(
            "rimg: unmounted the dead rimg mount at {} first",
            args.mountpoint.display()
        );
    }
    let rt = runtime()?;
    // Resolve here so a bad reference, refused auth or missing platform is
    // reported on this terminal and nothing is mounted.
    let creds = common.explicit_credentials()?;
    let (image, blobs, pinned) = common.locate_image(&rt, &args.reference, creds.clone())?;
    let source = Arc::new(ImageSource::new(
        image,
        blobs,
        common.cache()?,
        common.max_layer_size()?,
        args.foreground && std::io::stderr().is_terminal(),
    ));
    let only = args.layer.map(|l| source.layer_index(l)).transpose()?;
    if args.foreground {
        return serve_source(&rt, source, args, only, None);
    }
    let log_dir = common.cache_dir().join("logs");
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("cannot create {}", log_dir.display()))?;
    let canonical = std::fs::canonicalize(&args.mountpoint)?;
    let log_path = log_dir.join(format!(
        "mount-{}.log",
        &rimg::registry::sha256_digest(canonical.as_os_str().as_encoded_bytes())[7..19]
    ));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open the log {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(
        std::env::current_exe().context("cannot find the rimg executable")?,
    );
    cmd.args(child_args(common))
        .arg("serve")
        .arg(&pinned)
        .arg(&canonical);
    if args.allow_other {
        cmd.arg("--allow-other");
    }
    if args.prefetch {
        cmd.arg("--prefetch");
    }
    if let Some(l) = args.layer {
        cmd.arg(format!("--layer={l}"));
    }

    use std::os::unix::process::CommandExt;
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .env("RIMG_LOG_FILE", &log_path)
        // Its own process group: Ctrl-C at this terminal must not stop the server.
        .process_group(0);
    let mut child = cmd.spawn().context("cannot start the mount server")?;
    // The server gets the resolved image (and any credentials) on stdin, so it
    // neither asks the registry again nor sees a password in its arguments.
    let handoff = Handoff {
        image: source.image.parts(),
        username: creds.as_ref().map(|c| c.username.clone()),
        password: creds.as_ref().map(|c| c.password.clone()),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&serde_json::to_vec(&handoff)?)?;
    }
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    }
    if line.trim() != "ready" {
        let status = child.wait()?;
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let reason = log
            .lines()
            .rev()
            .find(|l| l.starts_with("rimg: "))
            .map(|l| l.trim_start_matches("rimg: ").to_string())
            .unwrap_or_else(|| format!("the mount server exited with {status}"));
        bail!("{reason} (log: {})", log_path.display());
    }
    println!(
        "mounted {} at {} (pid {}, log {})",
        source.image.reference,
        canonical.display(),
        child.id(),
        log_path.display()
    );
    Ok(())
}

/// What `rimg mount` hands its background server on stdin.
#[derive(serde::Serialize, serde::Deserialize)]
struct Handoff {
    image: rimg::registry::ImageParts,
    username: Option<String>,
    password: Option<String>,
}

pub fn serve(common: &Common, args: &MountArgs) -> Result<()> {
    init_logging(common.verbose);
    let result = (|| {
        let rt = runtime()?;
        let mut input = Vec::new();
        std::io::stdin()
            .read_to_end(&mut input)
            .context("reading the mount handoff")?;
        let handoff: Handoff =
            serde_json::from_slice(&input).context("the mount handoff on stdin is not valid")?;
        let creds = match (handoff.username, handoff.password) {
            (Some(username), Some(password)) => Some(Credentials {
                username,
                password,
                identity_token: None,
            }),
            _ => None,
        };
        let image = rimg::registry::ResolvedImage::from_parts(handoff.image)?;
        let blobs: Blobs = match local::locate(&args.reference) {
            Location::Local(spec) => {
                let (opened, blobs) = local::open(&spec, common.platform()?.as_ref())?;
                if opened.digest != image.digest {
                    bail!(
                        "{spec} changed since it was opened (image {} is now {})",
                        image.digest,
                        opened.digest
                    );
                }
                blobs.into()
            }
            Location::Registry(_) => common.client_with(creds)?.into(),
        };
        let source = Arc::new(ImageSource::new(
            image,
            blobs,
            common.cache()?,
            common.max_layer_size()?,
            false,
        ));
        let only = args.layer.map(|l| source.layer_index(l)).transpose()?;
        serve_source(&rt, source, args, only, Some(()))
    })();
    if let Err(e) = &result {
        // The parent reads this line from the log to explain the failure.
        eprintln!("rimg: {}", one_line(e));
    }
    result
}

fn serve_source(
    rt: &tokio::runtime::Runtime,
    source: Arc<ImageSource>,
    args: &MountArgs,
    only: Option<usize>,
    background: Option<()>,
) -> Result<()> {
    let mountpoint = std::fs::canonicalize(&args.mountpoint)
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    // --prefetch fetches (and verifies) every layer before mounting, so a
    // layer that cannot be had refuses the mount with its reason.
    if args.prefetch {
        match only {
            Some(i) => drop(rt.block_on(source.layer(i))?),
            None => drop(rt.block_on(source.layers())?),
        }
    }
    let opts = rimg::fuse::MountOptions {
        allow_other: args.allow_other,
        only_layer: only,
    };
    let mount = rimg::fuse::mount(rt.handle().clone(), Arc::clone(&source), &mountpoint, &opts)?;
    let record = MountRecord {
        reference: source.image.reference.to_string(),
        digest: source.image.digest.clone(),
        mountpoint: mountpoint.clone(),
        pid: std::process::id(),
        log: std::env::var_os("RIMG_LOG_FILE").map(PathBuf::from),
        dead: false,
    };
    if let Err(e) = mounts::save(&record) {
        tracing::warn!(
            "cannot record the mount in {}: {e}",
            mounts::state_dir().display()
        );
    }
    if background.is_some() {
        println!("ready");
        std::io::stdout().flush()?;
        // Nobody reads stdout once the parent has gone.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            use std::os::fd::AsRawFd;
            // SAFETY: both descriptors are valid for the duration of the call.
            unsafe { libc::dup2(null.as_raw_fd(), 1) };
        }
    } else {
        eprintln!(
            "mounted {} at {}; Ctrl-C unmounts",
            source.image.reference,
            mountpoint.display()
        );
    }
    tracing::info!(
        "serving {} ({}) at {}",
        record.reference,
        record.digest,
        mountpoint.display()
    );
    if args.prefetch {
        let state = Arc::clone(&mount.state);
        rt.spawn(async move {
            if let Err(e) = state.mounted().await {
                tracing::error!("prefetch: {e}");
            }
        });
    }
    let served = mount.serve(rt);
    mounts::remove(&mountpoint);
    tracing::info!("unmounted {}", mountpoint.display());
    Ok(served?)
}

pub fn umount(mountpoint: &std::path::Path) -> Result<()> {
    if std::env::var_os(rimg::fuse::WATCH_ENV).is_some() {
        return unmount_when_dead(mountpoint);
    }
    // Not canonicalize: a dead mount answers ENOTCONN, and it is exactly the
    // one that most needs unmounting.
    let canonical = mounts::absolute(mountpoint)
        .with_context(|| format!("mount point {}", mountpoint.display()))?;
    if !mounts::kernel_mounts()
        .iter()
        .any(|(_, mp)| *mp == canonical)
    {
        bail!("{} is not a rimg mount", canonical.display());
    }
    let record = mounts::find(&canonical);
    // A dead mount holds nothing to flush; detach it even if a shell sits in it.
    let dead = mounts::is_dead(&canonical, record.as_ref());
    rimg::fuse::unmount(&canonical, dead)
        .with_context(|| format!("cannot unmount {}", canonical.display()))?;
    if let Some(r) = record {
        for _ in 0..100 {
            if !mounts::pid_alive(r.pid) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    mounts::remove(&canonical);
    Ok(())
}

/// The death watcher a server starts (see `fuse::watch_for_death`): waits
/// for its stdin, which only the server holds, to close, then unmounts the
/// mount point only if the mount there is a dead one.
fn unmount_when_dead(mountpoint: &std::path::Path) -> Result<()> {
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    let canonical = mounts::absolute(mountpoint)?;
    if !mounts::kernel_mounts()
        .iter()
        .any(|(_, mp)| *mp == canonical)
    {
        return Ok(());
    }
    // Only the kernel's word: a record could be stale, and a live mount made
    // here since must stay.
    if mounts::disconnected(&canonical) {
        rimg::fuse::unmount(&canonical, true)?;
        mounts::remove(&canonical);
    }
    Ok(())
}

pub fn mounts() -> Result<()> {
    let list = mounts::list();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<50} {:<19} {:<5} {:>7} MOUNTPOINT",
        "REFERENCE", "DIGEST", "STATE", "PID"
    )?;
    for r in list {
        writeln!(
            out,
            "{:<50} {:<19} {:<5} {:>7} {}",
            r.reference,
            if r.digest.is_empty() {
                "-".to_string()
            } else {
                format!("sha256:{}", short_digest(&r.digest))
            },
            // A dead mount answers "Transport endpoint is not connected"
            // until `rimg umount` (or a new `rimg mount` there) clears it.
            if r.dead { "dead" } else { "live" },
            if r.pid == 0 {
                "-".to_string()
            } else {
                r.pid.to_string()
            },
            r.mountpoint.display()
        )?;
    }
    Ok(())
}

/// Counts bytes written, for the progress display.
struct ProgressWriter<W> {
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

pub fn cache_ls(common: &Common) -> Result<()> {
    let cache = common.cache()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<19} {:>12} {:>12} {:<16} IMAGES",
        "LAYER", "BLOB", "UNPACKED", "LAST USE"
    )?;
    let mut total = 0;
    for l in cache.list()? {
        total += l.blob_size + l.tar_size;
        writeln!(
            out,
            "{:<19} {:>12} {:>12} {:<16} {}",
            format!("sha256:{}", short_digest(&l.digest)),
            l.blob_size,
            l.tar_size,
            format_time(l.last_use),
            l.images.join(", ")
        )?;
    }
    writeln!(out, "total {total} bytes in {}", cache.root().display())?;
    Ok(())
}

/// Re-hashes every cached layer; corrupt ones are removed and reported.
/// Fails when any was corrupt, so scripts notice.
pub fn cache_verify(common: &Common) -> Result<()> {
    let cache = common.cache()?;
    let report = cache.verify()?;
    let mut out = std::io::stdout().lock();
    let mut bad = 0;
    for v in &report {
        if let Some(problem) = &v.problem {
            bad += 1;
            let action = if v.removed {
                "removed"
            } else {
                "in use by a mount, kept"
            };
            writeln!(out, "{}: {problem}; {action}", v.digest)?;
        }
    }
    writeln!(out, "{} layers checked, {bad} corrupt", report.len())?;
    if bad > 0 {
        bail!("{bad} corrupt layers found in {}", cache.root().display());
    }
    Ok(())
}

pub fn cache_prune(common: &Common, size: Option<&str>) -> Result<()> {
    let cache = common.cache()?;
    let limit = size
        .map(parse_size)
        .transpose()?
        .unwrap_or(common.cache_limit()?);
    let freed = cache.prune(limit)?;
    println!("freed {freed} bytes");
    Ok(())
}

pub fn cache_clear(common: &Common) -> Result<()> {
    let cache = common.cache()?;
    let freed = cache.prune(0)?;
    println!("freed {freed} bytes");
    Ok(())
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
    fn mode_strings_show_type_and_special_bits() {
        assert_eq!(mode_string(EntryKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(EntryKind::File, 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string(EntryKind::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(EntryKind::File, 0o2644), "-rw-r-Sr--");
    }

    #[test]
    fn times_format_as_utc_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13");
    }

    #[test]
    fn one_line_names_the_reference_once() {
        let e = anyhow::Error::new(std::io::Error::other(
            "r.io/a:b: manifest larger than 4 bytes",
        ))
        .context("cannot resolve r.io/a:b");
        assert_eq!(
            one_line(&e),
            "cannot resolve r.io/a:b: manifest larger than 4 bytes"
        );
    }

    #[test]
    fn one_line_joins_the_chain_without_repeats() {
        let e = anyhow!("inner").context("outer");
        assert_eq!(one_line(&e), "outer: inner");
    }
}
