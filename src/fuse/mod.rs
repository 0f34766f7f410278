//! The FUSE side: mounting an [`ImageSource`](crate::image::ImageSource)
//! read-only, serving it until unmounted or signalled, and the record of live
//! mounts.

mod attr;
mod fs;
pub mod mounts;
mod state;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use fuser::{Config, Session, SessionACL};

pub use fs::{ImageFs, LAYER_XATTR};
pub use state::{Mounted, State};

use crate::image::ImageSource;

/// Session threads. One is enough: every request that may wait (a layer
/// still downloading, a chunk fetched by range, the tree being built) is
/// handed to the runtime or a blocking thread, and the rest are answered
/// from memory or the page cache. Each thread more is one more per idle
/// mount.
const SESSION_THREADS: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("mount point {path}: {detail}")]
    MountPoint { path: String, detail: String },
    #[error("cannot mount {reference} at {path}")]
    Mount {
        reference: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serving {path}")]
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

/// Checks the mount point before anything is fetched or spawned. A rimg
/// mount there whose server has died is unmounted first; returns whether
/// there was one.
pub fn check_mountpoint(path: &Path) -> Result<bool, FuseError> {
    let fail = |detail: String| FuseError::MountPoint {
        path: path.display().to_string(),
        detail,
    };
    let absolute = mounts::absolute(path).map_err(|e| fail(e.to_string()))?;
    let mut cleared = false;
    if mounts::kernel_mounts()
        .iter()
        .any(|(_, mp)| *mp == absolute)
    {
        let record = mounts::find(&absolute);
        if !mounts::is_dead(&absolute, record.as_ref()) {
            return Err(fail("already has a rimg mount".into()));
        }
        unmount(&absolute, true)
            .map_err(|e| fail(format!("cannot unmount the dead rimg mount there: {e}")))?;
        mounts::remove(&absolute);
        cleared = true;
    }
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_dir() {
        return Err(fail("not a directory".into()));
    }
    Ok(cleared)
}

/// Mount options, chosen deliberately:
/// - ro, nosuid, nodev: an image's setuid binaries and devices are shown, never honoured;
/// - default_permissions: the kernel checks modes, as on any local filesystem;
/// - no allow_other/allow_root unless `--allow-other`: the kernel itself keeps
///   everyone but the owner out, on every path, cached or not. (allow_root
///   would make the kernel mount allow_other and leave the check to userspace,
///   which never sees requests the kernel answers from its caches.) It also
///   needs `user_allow_other` in /etc/fuse.conf, which stock systems lack;
/// - no auto_unmount: fusermount3 would stay behind, one more process and
///   thread per mount, to unmount when the server dies, but it cannot tell
///   that reliably (see `watch_for_death`); rimg's own watcher does it.
fn options(source_name: &str, opts: &MountOptions) -> String {
    let mut o = vec![
        "ro".to_string(),
        "nosuid".into(),
        "nodev".into(),
        "noatime".into(),
        "default_permissions".into(),
        format!("fsname={source_name}"),
        "subtype=rimg".into(),
    ];
    if opts.allow_other {
        o.push("allow_other".into());
    }
    o.join(",")
}

fn config(opts: &MountOptions) -> Config {
    let mut config = Config::default();
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(SESSION_THREADS);
    // Cloning the channel opens /dev/fuse again, which a plain user may not
    // be able to do (the mount itself goes through setuid fusermount3).
    config.clone_fd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok();
    config
}

/// The mount helper: `$FUSERMOUNT_PATH`, else `fusermount3` from `PATH`.
fn fusermount_bin() -> std::ffi::OsString {
    std::env::var_os("FUSERMOUNT_PATH").unwrap_or_else(|| "fusermount3".into())
}

/// Mounts through fusermount3 (setuid root, so plain users can mount), which
/// passes back the /dev/fuse descriptor over a socket. fuser would do this
/// itself but not without allow_root or allow_other in some versions, so
/// the mount is made here and the session built on the descriptor.
fn fusermount(mountpoint: &Path, options: &str) -> std::io::Result<(OwnedFd, UnixStream)> {
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = UnixStream::pair()?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(fusermount_bin());
    cmd.arg("-o")
        .arg(options)
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", theirs_fd.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only async-signal-safe fcntl calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(theirs_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(theirs_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            std::io::Error::new(e.kind(), "fusermount3 not found (install fuse3)")
        } else {
            e
        }
    })?;
    drop(theirs);
    match receive_fd(&ours) {
        Ok(fd) => {
            // Without auto_unmount fusermount3 exits once it has passed the
            // descriptor: reap it.
            drop(child.stderr.take());
            let _ = child.wait();
            Ok((fd, ours))
        }
        Err(e) => {
            let out = child.wait_with_output()?;
            let said = String::from_utf8_lossy(&out.stderr);
            let said = said.lines().map(str::trim).rfind(|l| !l.is_empty());
            Err(match said {
                Some(line) => std::io::Error::other(line.to_string()),
                None => {
                    std::io::Error::other(format!("fusermount3 exited with {}: {e}", out.status))
                }
            })
        }
    }
}

/// The descriptor fusermount3 sends as SCM_RIGHTS ancillary data.
fn receive_fd(sock: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    let n = loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "fusermount3 sent no descriptor",
        ));
    }
    // SAFETY: the kernel filled msg; CMSG_* walk the control buffer it describes.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if !cmsg.is_null()
            && (*cmsg).cmsg_level == libc::SOL_SOCKET
            && (*cmsg).cmsg_type == libc::SCM_RIGHTS
        {
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int);
            if fd >= 0 {
                return Ok(OwnedFd::from_raw_fd(fd));
            }
        }
    }
    Err(std::io::Error::other("fusermount3 sent no descriptor"))
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
    /// The socket fusermount3 passed the descriptor over.
    _watch: UnixStream,
    /// Our own watcher's pipe, where fusermount3's cannot help.
    _own_watch: Option<std::io::PipeWriter>,
}

/// Mounts `source` at `mountpoint`. Returns once the kernel has the mount.
pub fn mount(
    rt: tokio::runtime::Handle,
    source: Arc<ImageSource>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<Mount, FuseError> {
    // A local image is named by its file, not by the tags inside it.
    let reference = source.source_name().0;
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
    let fail = |source: std::io::Error| FuseError::Mount {
        reference: reference.clone(),
        path: mountpoint.display().to_string(),
        source,
    };
    let (fd, watch) = fusermount(mountpoint, &options(&name, opts)).map_err(fail)?;
    let config = config(opts);
    let session = Session::from_fd(fs, fd, config.acl, config).map_err(|e| {
        // Mounted but never served: do not leave it behind.
        let _ = unmount(mountpoint, true);
        fail(e)
    })?;
    let own_watch = watch_for_death(mountpoint)
        .map_err(|e| tracing::warn!("no watcher for a kill -9 of this server: {e}"))
        .ok();
    Ok(Mount {
        session,
        path: mountpoint.display().to_string(),
        state,
        signals,
        _watch: watch,
        _own_watch: own_watch,
    })
}

/// The death watcher: waits for end-of-file on stdin, then runs `$0 umount
/// $1` (rimg, the mount point) with stdin at its end.
const WATCH_SCRIPT: &str = r#"while read -r _; do :; done; exec "$0" umount "$1" </dev/null"#;

/// Set in the environment of the death watcher, a `rimg umount` that first
/// waits for its stdin to close.
pub const WATCH_ENV: &str = "RIMG_WATCH_SERVER";

/// fusermount3's `auto_unmount` (not used) decides a server is dead by opening the mount
/// point and expecting ENOTCONN. Once the kernel holds the root's attributes
/// (a day's TTL) and skips opendir (FUSE_NO_OPENDIR_SUPPORT), that open never
/// reaches the dead server and succeeds, so the mount is left behind; and
/// before libfuse 3.15 (Debian 12 has 3.14) it opens as root, which a plain
/// user's private mount refuses anyway. So rimg watches itself: `rimg umount`
/// started here waits on a pipe only this process holds, and once it reads
/// end-of-file the server is gone; it then unmounts the mount point only if
/// the mount there is dead (a request that always reaches the server fails
/// with ENOTCONN), never a live one mounted since. Killing the watcher as
/// well (a whole session killed) leaves a dead mount, which `rimg mounts`
/// shows and `rimg umount` or a new `rimg mount` clears.
///
/// The wait itself is a shell's (`read` until end-of-file), which costs a
/// few hundred kilobytes where an idle rimg costs several megabytes; only
/// once the server is gone does it become `rimg umount`.
fn watch_for_death(mountpoint: &Path) -> std::io::Result<std::io::PipeWriter> {
    use std::os::unix::process::CommandExt;
    let (reader, writer) = std::io::pipe()?;
    std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(WATCH_SCRIPT)
        .arg(std::env::current_exe()?)
        .arg(mountpoint)
        .env(WATCH_ENV, "1")
        .current_dir("/")
        .stdin(reader)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        // Not the server's signals (a Ctrl-C of a foreground mount).
        .process_group(0)
        .spawn()?;
    Ok(writer)
}

impl Mount {
    /// Serves until the filesystem is unmounted (by `rimg umount`, `fusermount3
    /// -u`, `umount`) or SIGINT/SIGTERM arrives, which unmounts it.
    pub fn serve(self, rt: &tokio::runtime::Runtime) -> Result<(), FuseError> {
        let path = self.path.clone();
        let mountpoint = std::path::PathBuf::from(&self.path);
        let (mut term, mut int) = self.signals;
        rt.spawn(async move {
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
            tracing::info!("signal received; unmounting {path}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allow_other_shares_a_mount_and_no_fusermount3_stays_behind() {
        let private = options(
            "r",
            &MountOptions {
                allow_other: false,
                only_layer: None,
            },
        );
        assert!(!private.contains("allow_other") && !private.contains("allow_root"));
        assert!(!private.split(',').any(|o| o == "auto_unmount"));
        assert!(private.starts_with("ro,nosuid,nodev,"));
        let shared = options(
            "r",
            &MountOptions {
                allow_other: true,
                only_layer: None,
            },
        );
        assert!(shared.split(',').any(|o| o == "allow_other"));
        assert_eq!(
            config(&MountOptions {
                allow_other: false,
                only_layer: None
            })
            .acl,
            SessionACL::Owner
        );
    }
}
