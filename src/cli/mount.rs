//! `rimg mount`, the background server it starts, `rimg umount` and
//! `rimg mounts`.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use rimg::digest::Digest;
use rimg::fuse::mounts::{self, MountRecord};
use rimg::image::{Blobs, ImageSource};
use rimg::local::{self, Location};
use rimg::registry::Credentials;

use super::*;

#[derive(clap::Args, serde::Serialize, serde::Deserialize)]
pub struct MountArgs {
    /// The image (see `rimg --help` for the forms of REF).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// An existing directory to mount the image on.
    pub mountpoint: PathBuf,
    /// Serve in the foreground instead of returning once mounted.
    #[arg(long)]
    pub foreground: bool,
    /// Let other users see the mount (needs user_allow_other for non-root).
    #[arg(long)]
    pub allow_other: bool,
    /// Fetch every layer before mounting; layers read by range are then
    /// fetched whole in the background.
    #[arg(long)]
    pub prefetch: bool,
    /// Mount one layer's own tree (0 = bottom, negative counts from the top).
    #[arg(long, allow_hyphen_values = true, value_name = "N")]
    pub layer: Option<i64>,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

/// The background server's command line: what it serves, for `ps`; the
/// settings come in the [`Handoff`].
#[derive(clap::Args)]
pub struct ServeArgs {
    pub reference: String,
    pub mountpoint: PathBuf,
}

#[derive(clap::Args)]
pub struct UmountArgs {
    /// Where the image is mounted; several may be given.
    #[arg(required_unless_present = "all")]
    pub mountpoints: Vec<PathBuf>,
    /// Unmount every mount this user's rimg made (those `rimg mounts` lists
    /// with a pid).
    #[arg(short = 'a', long, conflicts_with = "mountpoints")]
    pub all: bool,
    /// Detach now even if the mount is busy; it goes once nothing uses it
    /// (umount -l).
    #[arg(short = 'l', long)]
    pub lazy: bool,
}

#[derive(clap::Args)]
pub struct MountsArgs {
    /// One JSON object per mount and line.
    #[arg(long)]
    pub json: bool,
}

pub fn mount(args: &MountArgs) -> Result<()> {
    init_logging(args.log.verbose);
    let common = &args.common;
    // A state directory another user planted refuses the mount up front.
    mounts::checked_state_dir().context("mount records")?;
    if rimg::fuse::check_mountpoint(&args.mountpoint)? {
        eprintln!(
            "rimg: unmounted the dead rimg mount at {} first",
            args.mountpoint.display()
        );
    }
    let rt = runtime()?;
    // Resolve here so a bad reference, refused auth or missing platform is
    // reported on this terminal and nothing is mounted.
    let creds = common.registry.explicit_credentials()?;
    let (image, blobs, pinned) = common.locate_image(&rt, &args.reference, creds.clone())?;
    let source = Arc::new(common.source(
        image,
        blobs,
        bars(args.foreground && std::io::stderr().is_terminal()),
    )?);
    let only = args.layer.map(|l| source.layer_index(l)).transpose()?;
    if args.foreground {
        return serve_source(&rt, source, args, only, None);
    }
    let log_dir = rimg::private::dir(
        &common.cache.dir().join("logs"),
        rimg::private::Mode::NotWritable,
    )?;
    let canonical = std::fs::canonicalize(&args.mountpoint)?;
    let log_path = log_dir.join(format!(
        "mount-{}.log",
        Digest::of_bytes(canonical.as_os_str().as_encoded_bytes()).short()
    ));
    let log = rimg::private::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open the log {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(
        std::env::current_exe().context("cannot find the rimg executable")?,
    );
    cmd.arg("serve").arg(&pinned).arg(&canonical);

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
    let mut settings = MountArgs {
        reference: pinned,
        mountpoint: canonical.clone(),
        foreground: true,
        allow_other: args.allow_other,
        prefetch: args.prefetch,
        layer: args.layer,
        log: args.log,
        common: common.clone(),
    };
    // Made absolute here: the server runs elsewhere, and must use the
    // cache this process chose.
    settings.common.cache.cache_dir = Some(common.cache.dir());
    let handoff = Handoff {
        image: source.image.parts(),
        username: creds.as_ref().map(|c| c.username.clone()),
        password: creds.as_ref().map(|c| c.password.clone()),
        settings,
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
        source.source_name().0,
        canonical.display(),
        child.id(),
        log_path.display()
    );
    Ok(())
}

/// What `rimg mount` hands its background server on stdin.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Handoff {
    image: rimg::registry::ImageParts,
    username: Option<String>,
    password: Option<String>,
    /// Everything else the user asked for, as parsed here.
    settings: MountArgs,
}

pub fn serve(_argv: &ServeArgs) -> Result<()> {
    let result = (|| {
        let mut input = Vec::new();
        std::io::stdin()
            .read_to_end(&mut input)
            .context("reading the mount handoff")?;
        let handoff: Handoff =
            serde_json::from_slice(&input).context("the mount handoff on stdin is not valid")?;
        let args = &handoff.settings;
        let common = &args.common;
        init_logging(args.log.verbose);
        let rt = super::server_runtime()?;
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
                let (opened, blobs) = local::open(&spec, common.platform())?;
                if opened.digest != image.digest {
                    bail!(
                        "{spec} changed since it was opened (image {} is now {})",
                        image.digest,
                        opened.digest
                    );
                }
                blobs.into()
            }
            Location::Registry(_) => common.registry.client_with(creds)?.into(),
        };
        let source = Arc::new(common.source(image, blobs, bars(false))?);
        let only = args.layer.map(|l| source.layer_index(l)).transpose()?;
        serve_source(&rt, source, args, only, Some(()))
    })();
    if let Err(e) = &result {
        // The parent reads this line from the log to explain the failure.
        eprintln!("rimg: {}", one_line(e));
    }
    result
}

pub(super) fn serve_source(
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
    let (shown, tag) = source.source_name();
    let record = MountRecord {
        reference: shown,
        tag,
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
            record.reference,
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
            let m = match state.mounted().await {
                Ok(m) => m,
                Err(e) => return tracing::error!("prefetch: {}", rimg::report::Chain(&e)),
            };
            // Layers read by range fetch the rest of their chunks, the
            // files their producer marked first.
            for layer in m.layers.iter().filter(|l| l.ranged().is_some()) {
                let layer = Arc::clone(layer);
                tokio::task::spawn_blocking(move || {
                    let Some(r) = layer.ranged() else { return };
                    match r.prefetch() {
                        Ok(()) => tracing::info!(
                            "layer {} prefetched by range ({} bytes fetched)",
                            layer.digest,
                            r.fetched()
                        ),
                        Err(e) => return tracing::error!("prefetch: {}", rimg::report::Chain(&e)),
                    }
                    // Whole now: a published index it came through must match it.
                    if let Err(e) = layer.audit_index() {
                        tracing::error!("{}", rimg::report::Chain(&e));
                    }
                });
            }
        });
    }
    let served = mount.serve(rt);
    mounts::remove(&mountpoint);
    tracing::info!("unmounted {}", mountpoint.display());
    Ok(served?)
}

pub fn umount(args: &UmountArgs) -> Result<()> {
    if std::env::var_os(rimg::fuse::WATCH_ENV).is_some()
        && let [mountpoint] = &args.mountpoints[..]
    {
        return unmount_when_dead(mountpoint);
    }
    let all: Vec<PathBuf> = if args.all {
        // Only the mounts this user's rimg made (recorded in its state
        // directory): on a shared machine other users' mounts are theirs.
        mounts::list()
            .into_iter()
            .filter(|r| mounts::find(&r.mountpoint).is_some())
            .map(|r| r.mountpoint)
            .collect()
    } else {
        args.mountpoints.clone()
    };
    let mut failed = None;
    for m in &all {
        if let Err(e) = umount_one(m, args.lazy) {
            if all.len() > 1 {
                eprintln!("rimg: {}", one_line(&e));
            }
            failed = Some(e);
        }
    }
    match failed {
        Some(e) if all.len() == 1 => Err(e),
        Some(_) => bail!("some mounts were not unmounted"),
        None => Ok(()),
    }
}

fn umount_one(mountpoint: &std::path::Path, lazy: bool) -> Result<()> {
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
    rimg::fuse::unmount(&canonical, dead || lazy).map_err(|e| {
        let busy = e.raw_os_error() == Some(libc::EBUSY);
        let e = anyhow::Error::new(e).context(format!("cannot unmount {}", canonical.display()));
        if busy {
            e.context(format!(
                "{} is in use (a shell or program has it open; see `fuser -vm {}`); close it, or detach it now with `rimg umount --lazy`",
                canonical.display(),
                canonical.display()
            ))
        } else {
            e
        }
    })?;
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
pub(super) fn unmount_when_dead(mountpoint: &std::path::Path) -> Result<()> {
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

pub fn mounts(args: &MountsArgs) -> Result<()> {
    let list = mounts::list();
    let mut out = std::io::stdout().lock();
    if args.json {
        for r in list {
            let mut o = serde_json::Map::new();
            o.insert("reference".into(), r.reference.into());
            o.insert("digest".into(), r.digest.into());
            o.insert("state".into(), if r.dead { "dead" } else { "live" }.into());
            o.insert("pid".into(), (r.pid != 0).then_some(r.pid).into());
            let mountpoint = r.mountpoint.as_os_str().as_encoded_bytes();
            super::forensics::put_bytes(&mut o, "mountpoint", mountpoint);
            writeln!(out, "{}", serde_json::Value::Object(o))?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<50} {:<19} {:<5} {:>7} MOUNTPOINT",
        "REFERENCE", "DIGEST", "STATE", "PID"
    )?;
    for r in list {
        // A local image's tag is shown beside its file, never in its place.
        let shown = match &r.tag {
            Some(tag) => format!("{} ({tag})", r.reference),
            None => r.reference.clone(),
        };
        writeln!(
            out,
            "{:<50} {:<19} {:<5} {:>7} {}",
            shown,
            match Digest::parse(&r.digest) {
                Ok(d) => format!("sha256:{}", d.short()),
                Err(_) => "-".to_string(),
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
