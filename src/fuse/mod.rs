//! The FUSE side: mounting an [`ImageSource`](crate::image::ImageSource)
//! read-only, serving it until unmounted or signalled, and the record of live
//! mounts.

mod fs;
pub mod mounts;

use std::path::Path;
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL};

pub use fs::{ImageFs, LAYER_XATTR, Mounted, State};

use crate::image::ImageSource;

/// Session threads: enough that parallel readers never queue behind one another.
const SESSION_THREADS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("mount point {path}: {detail}")]
    MountPoint { path: String, detail: String },
    #[error("cannot mount {reference} at {path}: {source}")]
    Mount {
        reference: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serving {path}: {source}")]
    Serve {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct MountOptions {
    pub allow_other: bool,
    /// Mount one layer's own tree instead of the merged one.
    pub only_layer: Option<usize>,
}

/// Checks the mount point before anything is fetched or spawned.
pub fn check_mountpoint(path: &Path) -> Result<(), FuseError> {
    let fail = |detail: String| FuseError::MountPoint {
        path: path.display().to_string(),
        detail,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_dir() {
        return Err(fail("not a directory".into()));
    }
    let canonical = std::fs::canonicalize(path).map_err(|e| fail(e.to_string()))?;
    if mounts::kernel_mounts()
        .iter()
        .any(|(_, mp)| *mp == canonical)
    {
        return Err(fail("already has a rimg mount".into()));
    }
    Ok(())
}

/// Mount options, chosen deliberately:
/// - ro, nosuid, nodev: an image's setuid binaries and devices are shown, never honoured;
/// - default_permissions: the kernel checks modes, as on any local filesystem;
/// - auto_unmount: a server killed with -9 leaves no wedged mount. It runs through
///   fusermount3, which needs allow_root or allow_other; without `--allow-other`
///   rimg asks for allow_root, which adds nobody but root to who may look.
fn config(source_name: &str, opts: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
        MountOption::FSName(source_name.to_string()),
        MountOption::Subtype("rimg".into()),
        MountOption::AutoUnmount,
    ];
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::RootAndOwner
    };
    config.n_threads = Some(SESSION_THREADS);
    config.clone_fd = true;
    config
}

/// Unmounts `path`: directly when privileged, else through fusermount3.
/// `lazy` detaches it even while in use (a server that is going away).
pub fn unmount(path: &Path, lazy: bool) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EPERM) => {
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u");
            if lazy {
                cmd.arg("-z");
            }
            let status = cmd.arg(path).status()?;
            if status.success() {
                Ok(())
            } else {
                Err(std::io::Error::other(format!(
                    "fusermount3 -u exited with {status}"
                )))
            }
        }
        // Already gone (unmounted by someone else in the meantime).
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        _ => Err(err),
    }
}

/// A mounted session, not yet serving.
pub struct Mount {
    session: Session<ImageFs>,
    path: String,
    pub state: Arc<State>,
    /// Registered at mount time, so a signal that arrives as soon as the mount
    /// is announced is already caught.
    signals: (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
}

/// Mounts `source` at `mountpoint`. Returns once the kernel has the mount.
pub fn mount(
    rt: tokio::runtime::Handle,
    source: Arc<ImageSource>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<Mount, FuseError> {
    let reference = source.image.reference.to_string();
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        let _enter = rt.enter();
        let sig = |kind| {
            signal(kind).map_err(|source| FuseError::Serve {
                path: mountpoint.display().to_string(),
                source,
            })
        };
        (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?)
    };
    let state = State::new(Arc::clone(&source), opts.only_layer);
    let fs = ImageFs::new(rt, Arc::clone(&state));
    // Commas would split the option string that carries the source name.
    let name = reference.replace(',', "%2C");
    let session =
        Session::new(fs, mountpoint, &config(&name, opts)).map_err(|source| FuseError::Mount {
            reference,
            path: mountpoint.display().to_string(),
            source,
        })?;
    Ok(Mount {
        session,
        path: mountpoint.display().to_string(),
        state,
        signals,
    })
}

impl Mount {
    /// Serves until the filesystem is unmounted (by `rimg umount`, `fusermount3
    /// -u`, `umount`) or SIGINT/SIGTERM arrives, which unmounts it.
    pub fn serve(mut self, rt: &tokio::runtime::Runtime) -> Result<(), FuseError> {
        let mut unmounter = self.session.unmount_callable();
        let path = self.path.clone();
        let mountpoint = std::path::PathBuf::from(&self.path);
        let (mut term, mut int) = self.signals;
        rt.spawn(async move {
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
            tracing::info!("signal received; unmounting {path}");
            // Closing the auto_unmount socket alone leaves fusermount3 unsure
            // the mount is gone, so unmount explicitly as well.
            if let Err(e) = unmounter.unmount() {
                tracing::warn!("closing the auto_unmount watcher of {path}: {e}");
            }
            if let Err(e) = unmount(&mountpoint, true) {
                tracing::error!("unmounting {path}: {e}");
            }
            // The session ends once the kernel drops the connection; should a
            // request hold it, do not outlive the signal by more than a moment.
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            tracing::warn!("{path}: session still open 5 s after the signal; exiting");
            std::process::exit(0);
        });
        let path = self.path.clone();
        self.session
            .run()
            .map_err(|source| FuseError::Serve { path, source })
    }
}
