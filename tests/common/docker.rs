//! A private docker engine (Debian's docker.io) as a real client: its own
//! socket, data root and exec root under a temporary folder, the vfs storage
//! driver, no networking set up (no iptables, no bridge), and plain HTTP to
//! loopback registries. Stopped, and its folder removed, on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::run_ok;

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct Dockerd {
    pub dir: tempfile::TempDir,
    child: Child,
    socket: PathBuf,
}

/// Entries docker's container init layer adds or replaces in every
/// container (so in `docker export`), whatever the image holds.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub const INIT_LAYER: &[&str] = &[
    ".dockerenv",
    "dev",
    "dev/console",
    "dev/pts",
    "dev/shm",
    "etc/hostname",
    "etc/hosts",
    "etc/mtab",
    "etc/resolv.conf",
    "proc",
    "sys",
];

impl Dockerd {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn start() -> Dockerd {
        let dir = tempfile::Builder::new()
            .prefix("dockerd")
            .tempdir()
            .unwrap();
        let p = |n: &str| dir.path().join(n);
        // unix socket paths are limited to 108 bytes: keep it short.
        let socket = p("d.sock");
        let log = std::fs::File::create(p("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .args([
                "--storage-driver",
                "vfs",
                "--iptables=false",
                "--ip6tables=false",
            ])
            .args(["--bridge=none", "--insecure-registry", "127.0.0.0/8"])
            .arg("--data-root")
            .arg(p("data"))
            .arg("--exec-root")
            .arg(p("exec"))
            .arg("--pidfile")
            .arg(p("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("dockerd must be installed (docker.io, scripts/install-deps.sh)");
        let mut d = Dockerd { dir, child, socket };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if d.child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                panic!("dockerd did not start: {}", d.log());
            }
            if d.socket.exists()
                && d.command(&["version"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            {
                return d;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// The docker CLI of the same package (Debian's, in /usr/bin), on this
    /// engine's socket, with a config folder of its own.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn command(&self, args: &[&str]) -> Command {
        let cli = if Path::new("/usr/bin/docker").exists() {
            "/usr/bin/docker"
        } else {
            "docker"
        };
        let mut c = Command::new(cli);
        c.env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.dir.path().join("config"))
            .args(args);
        c
    }

    /// Runs the CLI and insists on success; returns stdout.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.command(args))
    }

    /// `docker-daemon:` destination options for skopeo, to this engine.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn skopeo_host(&self) -> String {
        format!("--dest-daemon-host=unix://{}", self.socket.display())
    }

    /// The tree docker makes of `image`: `docker create`, `docker export`,
    /// extracted as root keeping owners, modes and xattrs.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn tree(&self, image: &str) -> (tempfile::TempDir, PathBuf) {
        let out = tempfile::tempdir().unwrap();
        let id = self
            .ok(&["create", image, "/nonexistent"])
            .trim()
            .to_string();
        let tar = out.path().join("export.tar");
        self.ok(&["export", "-o", tar.to_str().unwrap(), &id]);
        self.ok(&["rm", &id]);
        let root = out.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        run_ok(
            Command::new("tar")
                .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
                .arg(&tar)
                .arg("-C")
                .arg(&root),
        );
        std::fs::remove_file(&tar).unwrap();
        (out, root)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM: dockerd stops its containerd and cleans its exec root.
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
