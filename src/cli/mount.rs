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

/// Arguments the background server needs to behave like this process.
pub(super) fn child_args(common: &Common) -> Vec<String> {
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
    if common.whole_layers {
        a.push("--whole-layers".into());
    }
    if common.no_index {
        a.push("--no-index".into());
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
    let source = Arc::new(common.lazy(ImageSource::new(
        image,
        blobs,
        common.cache()?,
        common.max_layer_size()?,
        bars(args.foreground && std::io::stderr().is_terminal()),
    )));
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
        Digest::of_bytes(canonical.as_os_str().as_encoded_bytes()).short()
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
pub(super) struct Handoff {
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
        let source = Arc::new(common.lazy(ImageSource::new(
            image,
            blobs,
            common.cache()?,
            common.max_layer_size()?,
            bars(false),
        )));
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

pub fn mounts(json: bool) -> Result<()> {
    let list = mounts::list();
    let mut out = std::io::stdout().lock();
    if json {
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
        writeln!(
            out,
            "{:<50} {:<19} {:<5} {:>7} {}",
            r.reference,
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
